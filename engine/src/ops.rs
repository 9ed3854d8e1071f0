//! Row-wise tensor operations of the forward pass, on plain f32 slices with a fixed evaluation order.

use crate::config::RopeStyle;
use crate::quant::dot::dot_f32;

/// RMS-normalizes each `width`-wide row of `x` in place and scales by `weight` (sum of squares in f64).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    for (row, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let ss: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = 1.0 / ((ss / width as f64) as f32 + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// Rotary tables for one position: `(cos, sin)` per rotated pair.
pub fn rope_table(pos: usize, inv_freq: &[f64], out: &mut Vec<(f32, f32)>) {
    out.clear();
    out.extend(inv_freq.iter().map(|&f| {
        let theta = pos as f64 * f;
        (theta.cos() as f32, theta.sin() as f32)
    }));
}

/// Inverse frequencies `base^(-2i/dims)`, divided by optional per-pair factors (llama 3 `rope_freqs`).
pub fn rope_inv_freq(dims: usize, base: f32, factors: Option<&[f32]>) -> Vec<f64> {
    (0..dims / 2)
        .map(|i| {
            let f = (base as f64).powf(-2.0 * i as f64 / dims as f64);
            match factors {
                Some(fs) => f / fs[i] as f64,
                None => f,
            }
        })
        .collect()
}

/// Rotates every `head_dim`-wide head in `x` (one position) by the table.
pub fn apply_rope(x: &mut [f32], head_dim: usize, table: &[(f32, f32)], style: RopeStyle) {
    let half = table.len();
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &(c, s)) in table.iter().enumerate() {
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c - x1 * s;
            head[b] = x0 * s + x1 * c;
        }
    }
}

/// `silu(gate) * up`, elementwise, into `gate`: `g / (1 + e^-g) * u` with [`exp_fixed`], 16 or 8 at a
/// time where the CPU has AVX-512 or AVX2 (the same operations per element, so the same bits).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu halves differ in length");
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has the features of the path taken; the slices have equal lengths (checked).
        if is_x86_feature_detected!("avx512f") {
            return unsafe { expvec::swiglu512(gate, up) };
        }
        if is_x86_feature_detected!("avx2") {
            return unsafe { expvec::swiglu256(gate, up) };
        }
    }
    swiglu_scalar(gate, up);
}

fn swiglu_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp_fixed(-*g)) * u;
    }
}

// e^x = 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, the first exact in n * C1),
// and e^r from Cephes' degree-6 polynomial on |r| <= ln 2 / 2.
const EXP_LO: f32 = -87.336_55; // ln(2^-126): below, the result is 0
const EXP_HI: f32 = 88.0; // n stays <= 127
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_C1: f32 = 0.693_359_375;
const LN2_C2: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];

/// `e^x` by a fixed sequence of f32 operations (no fused multiply-add), so every build and every vector
/// width gives the same bits: within a few ulp of the exact value, 0 below `ln(2^-126)` (no subnormal
/// results), `e^88` above 88.
#[inline(always)]
fn exp_fixed(x: f32) -> f32 {
    let xc = x.max(EXP_LO).min(EXP_HI);
    let n = (xc * LOG2E).round_ties_even();
    let r = (xc - n * LN2_C1) - n * LN2_C2;
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p * r + c;
    }
    let y = (p * (r * r) + r) + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < EXP_LO {
        0.0
    } else {
        y * scale
    }
}

/// [`swiglu`] on 512-bit and 256-bit vectors: [`exp_fixed`]'s operations lane by lane.
#[cfg(target_arch = "x86_64")]
mod expvec {
    use std::arch::x86_64::*;

    use super::{EXP_HI, EXP_LO, EXP_P, LN2_C1, LN2_C2, LOG2E};

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn swiglu512(gate: &mut [f32], up: &[f32]) {
        let n = gate.len() / 16 * 16;
        let one = _mm512_set1_ps(1.0);
        for i in (0..n).step_by(16) {
            let g = _mm512_loadu_ps(gate.as_ptr().add(i));
            let x = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(i32::MIN)));
            let xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
            let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(xc, _mm512_set1_ps(LOG2E)));
            let r = _mm512_sub_ps(_mm512_sub_ps(xc, _mm512_mul_ps(k, _mm512_set1_ps(LN2_C1))), _mm512_mul_ps(k, _mm512_set1_ps(LN2_C2)));
            let mut p = _mm512_set1_ps(EXP_P[0]);
            for c in &EXP_P[1..] {
                p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(*c));
            }
            let y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), one);
            let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)));
            let low = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_LO));
            let e = _mm512_maskz_mul_ps(!low, y, _mm512_castsi512_ps(bits));
            let u = _mm512_loadu_ps(up.as_ptr().add(i));
            _mm512_storeu_ps(gate.as_mut_ptr().add(i), _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u));
        }
        super::swiglu_scalar(&mut gate[n..], &up[n..]);
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn swiglu256(gate: &mut [f32], up: &[f32]) {
        let n = gate.len() / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..n).step_by(8) {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let x = _mm256_xor_ps(g, _mm256_set1_ps(-0.0));
            let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
            let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(xc, _mm256_set1_ps(LOG2E)));
            let r = _mm256_sub_ps(_mm256_sub_ps(xc, _mm256_mul_ps(k, _mm256_set1_ps(LN2_C1))), _mm256_mul_ps(k, _mm256_set1_ps(LN2_C2)));
            let mut p = _mm256_set1_ps(EXP_P[0]);
            for c in &EXP_P[1..] {
                p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(*c));
            }
            let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), one);
            let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)));
            let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(EXP_LO));
            let e = _mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u));
        }
        super::swiglu_scalar(&mut gate[n..], &up[n..]);
    }
}

/// `x += y`, elementwise.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Causal attention of `q` rows at positions `start..start+rows` over cached keys/values `0..start+rows`.
///
/// `k`/`v` hold one `kv_dim`-wide row per position; `q`/`out` hold one `n_head * head_dim` row per query.
/// Each output element depends only on its own query row and the cache prefix it can see; heads run in
/// parallel when there is enough work, which changes no result.
#[allow(clippy::too_many_arguments)]
pub fn attention(q: &[f32], k: &[f32], v: &[f32], start: usize, n_head: usize, n_head_kv: usize, head_dim: usize, out: &mut [f32]) {
    attention_many(&[AttnSeq { q, k, v, start }], n_head, n_head_kv, head_dim, out)
}

/// One sequence's part of a batched attention: its query rows and its whole cache.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Position of the first query row.
    pub start: usize,
}

/// [`attention`] for several sequences whose query rows follow each other in `out`: each (sequence, head,
/// up to 16 query rows) is one task, so a batch of short decode steps runs in parallel as well as a long
/// prompt.
pub fn attention_many(seqs: &[AttnSeq<'_>], n_head: usize, n_head_kv: usize, head_dim: usize, out: &mut [f32]) {
    /// Query rows per task: a long prompt splits into many tasks, so threads share it evenly.
    const ROWS_PER_TASK: usize = 16;
    let q_dim = n_head * head_dim;
    // tasks: (sequence, head, first row, end row, output row of the first row)
    let mut units = Vec::new();
    let (mut rows, mut work) = (0, 0);
    for (i, s) in seqs.iter().enumerate() {
        let n = s.q.len() / q_dim;
        for h in 0..n_head {
            for t0 in (0..n).step_by(ROWS_PER_TASK) {
                units.push((i, h, t0, (t0 + ROWS_PER_TASK).min(n), rows + t0));
            }
        }
        rows += n;
        work += n * (s.start + n) * head_dim * n_head;
    }
    let unit = |u: usize, emit: &mut dyn FnMut(usize, &[f32])| {
        let (i, h, t0, t1, _) = units[u];
        let s = &seqs[i];
        attention_head(HeadJob { q: &s.q[t0 * q_dim..t1 * q_dim], k: s.k, v: s.v, start: s.start + t0, h, n_head, n_head_kv, head_dim }, emit);
    };
    // each task writes its own (rows, head) slots of `out`, straight from its buffer
    let dst = OutPtr(out.as_mut_ptr(), out.len());
    let task = |u: usize| {
        let (_, h, _, _, r0) = units[u];
        unit(u, &mut |t, o| {
            let at = (r0 + t) * q_dim + h * head_dim;
            let (ptr, len) = dst.get();
            assert!(at + head_dim <= len, "attention output out of bounds");
            // SAFETY: in bounds (checked), and the (row, head) slots of different tasks are disjoint, so no
            // other thread writes these elements while `out` is borrowed by this call
            unsafe { std::ptr::copy_nonoverlapping(o.as_ptr(), ptr.add(at), head_dim) };
        });
    };
    if work < 1 << 16 || crate::pool::current_threads() == 1 {
        (0..units.len()).for_each(task);
    } else {
        crate::pool::for_each(units.len(), task);
    }
}

/// The attention output shared by tasks that write disjoint (row, head) slots: pointer and length.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32, usize);
// SAFETY: only used for disjoint writes while the buffer is exclusively borrowed by `attention_many`
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// (a method, so closures capture the whole `Sync` value rather than its raw pointer field)
    fn get(self) -> (*mut f32, usize) {
        (self.0, self.1)
    }
}

/// One query head of one sequence: its query rows, its whole cache, the position of its first row.
#[derive(Debug, Clone, Copy)]
struct HeadJob<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    start: usize,
    h: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
}

impl HeadJob<'_> {
    /// Query row width, cache row width, the cache head this query head reads, the score scale.
    #[inline(always)]
    fn layout(&self) -> (usize, usize, usize, f32) {
        let (n, hd) = (self.n_head, self.head_dim);
        (n * hd, self.n_head_kv * hd, self.h / (n / self.n_head_kv), 1.0 / (hd as f32).sqrt())
    }
}

/// One query head over all query rows; `emit(row, output)` receives each row's result. Built for AVX2
/// where the CPU has it: the same element-wise operations in the same order, so the same bits.
fn attention_head(j: HeadJob<'_>, emit: impl FnMut(usize, &[f32])) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        unsafe {
            let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq");
            return match (j.head_dim, avx512) {
                (64, true) => fixed::head512::<8>(j, emit),
                (128, true) => fixed::head512::<16>(j, emit),
                (64, false) => fixed::head::<8>(j, emit),
                (128, false) => fixed::head::<16>(j, emit),
                _ => attention_head_avx2(j, emit),
            };
        }
    }
    attention_head_any::<Portable>(j, emit)
}

/// The AVX2 attention for a head width of `8 * C`: the query and the output accumulators stay in
/// registers, and two keys' dot products run interleaved. Every value is computed by the same
/// operations in the same order as [`attention_head_any`] (lane `l` of a dot sums elements `l, l+8, ...`
/// in order; each output element adds `p_j * v_j` for `j` in order), so the bits are the same.
#[cfg(target_arch = "x86_64")]
mod fixed {
    use std::arch::x86_64::*;

    use crate::quant::dot::sum_lanes as finish;

    /// One key's scaled dot product with the query chunks `qv` (lane `l` sums elements `l, l+8, ...`).
    #[inline(always)]
    unsafe fn score<const C: usize>(qv: &[__m256; C], key: *const f32, scale: f32) -> f32 {
        let mut p = _mm256_setzero_ps();
        for (c, q) in qv.iter().enumerate() {
            p = _mm256_add_ps(p, _mm256_mul_ps(*q, _mm256_loadu_ps(key.add(8 * c))));
        }
        finish(p) * scale
    }

    /// Scores to `exp(s - max)` in place, in order; returns their sum (in order).
    #[inline(always)]
    fn softmax(scores: &mut [f32]) -> f32 {
        let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        sum
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn head<const C: usize>(j: super::HeadJob<'_>, mut emit: impl FnMut(usize, &[f32])) {
        let super::HeadJob { q, k, v, start, h, head_dim, .. } = j;
        debug_assert_eq!(head_dim, 8 * C);
        let (q_dim, kv_dim, kvh, scale) = j.layout();
        let mut scores: Vec<f32> = Vec::new();
        let mut oh = [0f32; 128];
        let (kp, vp) = (k.as_ptr().add(kvh * head_dim), v.as_ptr().add(kvh * head_dim));
        for (t, qrow) in q.chunks_exact(q_dim).enumerate() {
            let visible = start + t + 1;
            assert!(k.len() >= visible * kv_dim && v.len() >= visible * kv_dim, "cache shorter than the visible positions");
            let mut qv = [_mm256_setzero_ps(); C];
            for c in 0..C {
                qv[c] = _mm256_loadu_ps(qrow.as_ptr().add(h * head_dim + 8 * c));
            }
            scores.clear();
            scores.reserve(visible);
            let mut j = 0;
            while j + 2 <= visible {
                let (k0, k1) = (kp.add(j * kv_dim), kp.add((j + 1) * kv_dim));
                let (mut p0, mut p1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for c in 0..C {
                    p0 = _mm256_add_ps(p0, _mm256_mul_ps(qv[c], _mm256_loadu_ps(k0.add(8 * c))));
                    p1 = _mm256_add_ps(p1, _mm256_mul_ps(qv[c], _mm256_loadu_ps(k1.add(8 * c))));
                }
                scores.push(finish(p0) * scale);
                scores.push(finish(p1) * scale);
                j += 2;
            }
            if j < visible {
                scores.push(score(&qv, kp.add(j * kv_dim), scale));
            }
            let sum = softmax(&mut scores);
            let mut o = [_mm256_setzero_ps(); C];
            for (j, &p) in scores.iter().enumerate() {
                let (pv, vj) = (_mm256_set1_ps(p), vp.add(j * kv_dim));
                for c in 0..C {
                    o[c] = _mm256_add_ps(o[c], _mm256_mul_ps(pv, _mm256_loadu_ps(vj.add(8 * c))));
                }
            }
            let inv = _mm256_set1_ps(1.0 / sum);
            for c in 0..C {
                _mm256_storeu_ps(oh.as_mut_ptr().add(8 * c), _mm256_mul_ps(o[c], inv));
            }
            emit(t, &oh[..head_dim]);
        }
    }

    /// [`head`] on 512-bit registers, the same bits: four keys' dot products at once (two keys per
    /// register, each half holding one key's 8 lanes), their lanes summed side by side in the same pairs
    /// as [`finish`]; the value sums 16 elements per register (element-wise, so in the same order).
    #[target_feature(enable = "avx2,avx512f,avx512dq")]
    pub(super) unsafe fn head512<const C: usize>(j: super::HeadJob<'_>, mut emit: impl FnMut(usize, &[f32])) {
        let super::HeadJob { q, k, v, start, h, head_dim, .. } = j;
        debug_assert!(head_dim == 8 * C && C.is_multiple_of(2));
        let (q_dim, kv_dim, kvh, scale) = j.layout();
        let mut scores: Vec<f32> = Vec::new();
        let mut oh = [0f32; 128];
        let (kp, vp) = (k.as_ptr().add(kvh * head_dim), v.as_ptr().add(kvh * head_dim));
        // lanes 0, 4, 8, 12 of the side-by-side sums
        let pick = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
        for (t, qrow) in q.chunks_exact(q_dim).enumerate() {
            let visible = start + t + 1;
            assert!(k.len() >= visible * kv_dim && v.len() >= visible * kv_dim, "cache shorter than the visible positions");
            let mut qv = [_mm256_setzero_ps(); C];
            let mut q2 = [_mm512_setzero_ps(); C];
            for c in 0..C {
                qv[c] = _mm256_loadu_ps(qrow.as_ptr().add(h * head_dim + 8 * c));
                q2[c] = _mm512_broadcast_f32x8(qv[c]);
            }
            scores.clear();
            scores.reserve(visible + 4);
            let mut j = 0;
            while j + 4 <= visible {
                let key = |i: usize| kp.add((j + i) * kv_dim);
                let (mut p01, mut p23) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for c in 0..C {
                    let k01 = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(_mm256_loadu_ps(key(0).add(8 * c))), _mm256_loadu_ps(key(1).add(8 * c)));
                    let k23 = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(_mm256_loadu_ps(key(2).add(8 * c))), _mm256_loadu_ps(key(3).add(8 * c)));
                    p01 = _mm512_add_ps(p01, _mm512_mul_ps(q2[c], k01));
                    p23 = _mm512_add_ps(p23, _mm512_mul_ps(q2[c], k23));
                }
                // quarter i: lanes l + (l+4) of key i
                let s = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(p01, p23), _mm512_shuffle_f32x4::<0xDD>(p01, p23));
                // lanes 4i, 4i+1: (s0+s1), (s2+s3); then their sum in lane 4i
                let hs = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(s, s), _mm512_shuffle_ps::<0xDD>(s, s));
                let z = _mm512_add_ps(hs, _mm512_movehdup_ps(hs));
                let four = _mm512_castps512_ps128(_mm512_permutexvar_ps(pick, z));
                _mm_storeu_ps(scores.as_mut_ptr().add(j), _mm_mul_ps(four, _mm_set1_ps(scale)));
                scores.set_len(j + 4);
                j += 4;
            }
            while j < visible {
                scores.push(score(&qv, kp.add(j * kv_dim), scale));
                j += 1;
            }
            let sum = softmax(&mut scores);
            let mut o = [_mm512_setzero_ps(); 8];
            for (j, &p) in scores.iter().enumerate() {
                let (pv, vj) = (_mm512_set1_ps(p), vp.add(j * kv_dim));
                for c in 0..C / 2 {
                    o[c] = _mm512_add_ps(o[c], _mm512_mul_ps(pv, _mm512_loadu_ps(vj.add(16 * c))));
                }
            }
            let inv = _mm512_set1_ps(1.0 / sum);
            for c in 0..C / 2 {
                _mm512_storeu_ps(oh.as_mut_ptr().add(16 * c), _mm512_mul_ps(o[c], inv));
            }
            emit(t, &oh[..head_dim]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attention_head_avx2(j: HeadJob<'_>, emit: impl FnMut(usize, &[f32])) {
    attention_head_any::<Avx>(j, emit)
}

/// The f32 dot product an attention build uses (all give the same bits as [`dot_f32`]).
trait Dot {
    fn dot(a: &[f32], b: &[f32]) -> f32;
}

struct Portable;

impl Dot for Portable {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot_f32(a, b)
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx;

#[cfg(target_arch = "x86_64")]
impl Dot for Avx {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only used by the AVX2 build of the attention
        unsafe { crate::quant::dot::dot_f32_avx(a, b) }
    }
}

#[inline(always)]
fn attention_head_any<D: Dot>(j: HeadJob<'_>, mut emit: impl FnMut(usize, &[f32])) {
    let HeadJob { q, k, v, start, h, head_dim, .. } = j;
    let (q_dim, kv_dim, kvh, scale) = j.layout();
    let mut scores = Vec::new();
    let mut oh = vec![0f32; head_dim];
    for (t, qrow) in q.chunks_exact(q_dim).enumerate() {
        let visible = start + t + 1;
        let qh = &qrow[h * head_dim..(h + 1) * head_dim];
        scores.clear();
        // (plain loops: a closure would not inherit the caller's target features)
        for j in 0..visible {
            scores.push(D::dot(qh, &k[j * kv_dim + kvh * head_dim..][..head_dim]) * scale);
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        oh.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let vj = &v[j * kv_dim + kvh * head_dim..][..head_dim];
            for (o, &vv) in oh.iter_mut().zip(vj) {
                *o += p * vv;
            }
        }
        let inv = 1.0 / sum;
        for o in oh.iter_mut() {
            *o *= inv;
        }
        emit(t, &oh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fixed_is_within_a_few_ulp_of_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp_fixed(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_7;
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        assert_eq!(exp_fixed(0.0), 1.0);
        assert_eq!(exp_fixed(-100.0), 0.0);
        assert_eq!(exp_fixed(f32::NEG_INFINITY), 0.0);
        assert!(exp_fixed(1000.0).is_finite());
    }

    #[test]
    fn swiglu_vector_paths_give_the_scalar_bits() {
        let mut specials = vec![0.0, -0.0, 1e-30, -1e-30, 87.4, -87.4, 88.5, -88.5, 100.0, -100.0, f32::INFINITY, f32::NEG_INFINITY];
        specials.extend(crate::quant::tests::random(300, 9).iter().map(|v| v * 12.0));
        for len in [1usize, 7, 8, 15, 16, 17, 33, 312] {
            let gate: Vec<f32> = specials.iter().cycle().take(len).copied().collect();
            let up: Vec<f32> = crate::quant::tests::random(len, 3);
            let mut want = gate.clone();
            swiglu_scalar(&mut want, &up);
            let mut got = gate.clone();
            swiglu(&mut got, &up);
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "len {len}");
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") {
                let mut got = gate.clone();
                unsafe { expvec::swiglu256(&mut got, &up) };
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "avx2, len {len}"
                );
            }
        }
    }

    #[test]
    fn rms_norm_unit_rows() {
        let mut out = [0f32; 4];
        rms_norm(&[2.0, 2.0, -2.0, -2.0], &[1.0, 0.5, 1.0, 1.0], 0.0, &mut out);
        assert_eq!(out, [1.0, 0.5, -1.0, -1.0]);
    }

    #[test]
    fn rope_position_zero_is_identity() {
        let inv = rope_inv_freq(4, 10000.0, None);
        let mut t = Vec::new();
        rope_table(0, &inv, &mut t);
        let mut x = [1.0, 2.0, 3.0, 4.0];
        apply_rope(&mut x, 4, &t, RopeStyle::Interleaved);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn rope_rotates_pairs() {
        let mut t = Vec::new();
        rope_table(1, &[std::f64::consts::FRAC_PI_2], &mut t);
        let mut x = [1.0, 0.0];
        apply_rope(&mut x, 2, &t, RopeStyle::Interleaved);
        assert!((x[0]).abs() < 1e-6 && (x[1] - 1.0).abs() < 1e-6, "{x:?}");
    }

    #[test]
    fn attention_single_key_returns_its_value() {
        let q = [1.0, 0.0];
        let k = [0.5, 0.5];
        let v = [3.0, -1.0];
        let mut out = [0f32; 2];
        attention(&q, &k, &v, 0, 1, 1, 2, &mut out);
        assert_eq!(out, [3.0, -1.0]);
    }

    #[test]
    fn every_attention_build_gives_the_portable_bits() {
        // head widths with a fixed-width build (64, 128) and without (40), GQA 6 heads over 2
        for &hd in &[64usize, 128, 40] {
            let (n_head, n_kv, rows, start) = (6, 2, 5, 11);
            let rnd = crate::quant::tests::random;
            let q = rnd(rows * n_head * hd, 1);
            let k = rnd((start + rows) * n_kv * hd, 2);
            let v = rnd((start + rows) * n_kv * hd, 3);
            let mut got = vec![0f32; q.len()];
            attention(&q, &k, &v, start, n_head, n_kv, hd, &mut got);
            let mut want = vec![0f32; q.len()];
            let q_dim = n_head * hd;
            for h in 0..n_head {
                let job = HeadJob { q: &q, k: &k, v: &v, start, h, n_head, n_head_kv: n_kv, head_dim: hd };
                attention_head_any::<Portable>(job, |t, o| want[t * q_dim + h * hd..][..hd].copy_from_slice(o));
            }
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "head width {hd}");
        }
    }

    #[test]
    fn attention_is_causal() {
        // two positions, the first query must not see the second key
        let q = [1.0, 0.0, 1.0, 0.0];
        let k = [1.0, 0.0, 1.0, 0.0];
        let v = [1.0, 1.0, 5.0, 5.0];
        let mut out = [0f32; 4];
        attention(&q, &k, &v, 0, 1, 1, 2, &mut out);
        assert_eq!(&out[..2], &[1.0, 1.0]);
        assert!((out[2] - 3.0).abs() < 1e-6);
    }
}
