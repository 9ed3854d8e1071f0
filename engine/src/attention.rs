//! Causal attention of query rows over a sequence's cached keys and values.
//!
//! The cache holds a layer's keys in *key blocks* ([`key_index`]): 16 positions side by side per
//! element, so one 512-bit load holds element `d` of 16 keys and a block's 16 scores come out of
//! vertical multiply-adds, with no reduction across lanes. Values stay one row per position.
//!
//! Every build computes the same canonical result (the portable build is the reference), so the bits
//! do not depend on the CPU: for query row `t` (position `start + t`) of head `h`, reading cache head
//! `g = h / (n_head / n_head_kv)`, and each visible key `j <= start + t`:
//! - `s_j = dot(q, k_j) * scale`, where `dot` sums 8 interleaved partial products (`p[l]` takes elements
//!   `l, l + 8, ...` in order), then `((p0+p4)+(p1+p5)) + ((p2+p6)+(p3+p7)) + tail` (the elements past
//!   the last whole 8, in order, from 0.0); `scale = 1 / sqrt(head_dim)`;
//! - `e_j = exp(s_j - max_j s_j)` with [`crate::ops::exp_fixed`];
//! - `sum`: lane `l` takes `e_j` for `j = l, l + 16, ...` in order, and the 16 lanes reduce in the
//!   fixed tree of the integer kernels (`h[i] = a[i] + a[i+8]`, then `((h0+h4)+(h2+h6)) +
//!   ((h1+h5)+(h3+h7))`);
//! - `o[d] = (Σ_j e_j * v_j[d]) * (1 / sum)`, the sum in key order from 0.0.
//!
//! Multiplies and adds are never fused.

use crate::ops::exp_fixed;

/// Positions per key block.
pub const KEY_BLOCK: usize = 16;

/// Where element `d` of cache head `g` at position `p` sits in a layer's keys (`n_kv` cache heads of
/// `head_dim` elements): block `p / 16`, then head, then element, then position within the block.
#[inline(always)]
pub fn key_index(p: usize, g: usize, d: usize, n_kv: usize, head_dim: usize) -> usize {
    ((p / KEY_BLOCK * n_kv + g) * head_dim + d) * KEY_BLOCK + p % KEY_BLOCK
}

/// Floats a layer's keys take for `positions` positions (whole blocks).
pub fn key_len(positions: usize, kv_dim: usize) -> usize {
    positions.div_ceil(KEY_BLOCK) * KEY_BLOCK * kv_dim
}

/// Keys given as rows (one `n_kv * head_dim` row per position) in the key-block layout.
pub fn key_blocks(rows: &[f32], n_kv: usize, head_dim: usize) -> Vec<f32> {
    let kv_dim = n_kv * head_dim;
    let positions = rows.len() / kv_dim;
    let mut out = vec![0f32; key_len(positions, kv_dim)];
    for (p, row) in rows.chunks_exact(kv_dim).enumerate() {
        for g in 0..n_kv {
            for d in 0..head_dim {
                out[key_index(p, g, d, n_kv, head_dim)] = row[g * head_dim + d];
            }
        }
    }
    out
}

/// One sequence's part of a batched attention: its query rows and its whole cache.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    pub q: &'a [f32],
    /// Keys in the key-block layout.
    pub k: &'a [f32],
    /// Values, one row per position.
    pub v: &'a [f32],
    /// Position of the first query row.
    pub start: usize,
}

/// Causal attention of `q` rows at positions `start..start+rows` over cached keys/values `0..start+rows`
/// (`k` in key blocks, `v` one `kv_dim`-wide row per position); `q`/`out` hold one `n_head * head_dim`
/// row per query.
#[allow(clippy::too_many_arguments)]
pub fn attention(q: &[f32], k: &[f32], v: &[f32], start: usize, n_head: usize, n_head_kv: usize, head_dim: usize, out: &mut [f32]) {
    attention_many(&[AttnSeq { q, k, v, start }], n_head, n_head_kv, head_dim, out)
}

/// [`attention`] for several sequences whose query rows follow each other in `out`: each (sequence, cache
/// head, up to 16 query rows) is one task for the query heads that share that cache head, so a batch of
/// short decode steps runs in parallel as well as a long prompt, and a cache head's keys and values are
/// read from memory by one thread for all its query heads (tasks per query head, claimed by turns, had
/// both threads pull the same lines: 32 decode sequences on 2 threads ran at 1.07x one).
pub fn attention_many(seqs: &[AttnSeq<'_>], n_head: usize, n_head_kv: usize, head_dim: usize, out: &mut [f32]) {
    /// Query rows per task: a long prompt splits into many tasks, so threads share it evenly.
    const ROWS_PER_TASK: usize = 16;
    assert!(n_head_kv > 0 && n_head.is_multiple_of(n_head_kv), "{n_head} query heads over {n_head_kv} cache heads");
    let q_dim = n_head * head_dim;
    assert_eq!(out.len(), seqs.iter().map(|s| s.q.len()).sum::<usize>(), "attention output size");
    // tasks: (sequence, cache head, first row, end row, output row of the first row)
    let mut units = Vec::new();
    let (mut rows, mut work) = (0, 0);
    for (i, s) in seqs.iter().enumerate() {
        let n = s.q.len() / q_dim;
        let visible = s.start + n;
        assert!(
            s.k.len() >= key_len(visible, n_head_kv * head_dim) && s.v.len() >= visible * n_head_kv * head_dim,
            "cache shorter than the visible positions"
        );
        for g in 0..n_head_kv {
            for t0 in (0..n).step_by(ROWS_PER_TASK) {
                units.push((i, g, t0, (t0 + ROWS_PER_TASK).min(n), rows + t0));
            }
        }
        rows += n;
        work += n * (s.start + n) * head_dim * n_head;
    }
    let dst = OutPtr(out.as_mut_ptr());
    // The keys and values of the task two ahead, asked for before this one runs: a decode step finds
    // its caches in memory (the weights streamed since evicted them), in runs of a few lines that the
    // hardware prefetcher hardly starts on (32 decode sequences, one thread: 15% less time; the task right
    // after this one was too close, its lines half in flight already). At most the first
    // `PREFETCH_POSITIONS` positions: a long cache streams well enough on its own.
    const AHEAD: usize = 2;
    const PREFETCH_POSITIONS: usize = 256;
    let kv_dim = n_head_kv * head_dim;
    let fetch = |u: usize| {
        let Some(&(i, g, _, t1, _)) = units.get(u) else { return };
        let s = &seqs[i];
        let visible = (s.start + t1).min(PREFETCH_POSITIONS);
        for b in 0..visible.div_ceil(KEY_BLOCK) {
            prefetch(s.k[key_index(b * KEY_BLOCK, g, 0, n_head_kv, head_dim)..].as_ptr(), head_dim * KEY_BLOCK);
        }
        for p in 0..visible {
            prefetch(s.v[p * kv_dim + g * head_dim..].as_ptr(), head_dim);
        }
    };
    let task = |u: usize| {
        if u == 0 {
            (0..AHEAD).for_each(fetch);
        }
        fetch(u + AHEAD);
        let (i, g, t0, t1, r0) = units[u];
        let s = &seqs[i];
        let per = n_head / n_head_kv;
        let mut h = g * per;
        while h < (g + 1) * per {
            let heads = ((g + 1) * per - h).min(MAX_HEADS);
            let job = HeadJob { q: &s.q[t0 * q_dim..t1 * q_dim], k: s.k, v: s.v, start: s.start + t0, h, n_head, n_head_kv, head_dim };
            // SAFETY: rows r0.. of `out` hold the task's query rows (sizes checked above), and the (row,
            // head) slots of different tasks are disjoint, so no other thread writes them while `out` is
            // borrowed
            unsafe { head_group(job, heads, dst.get().add(r0 * q_dim + h * head_dim), q_dim) };
            h += heads;
        }
    };
    if work < 1 << 16 || crate::pool::current_threads() == 1 {
        (0..units.len()).for_each(task);
    } else {
        crate::pool::for_each(units.len(), task);
    }
}

/// Asks for the lines of `len` values at `p` to be brought into the second-level cache.
#[inline(always)]
fn prefetch(p: *const f32, len: usize) {
    crate::quant::prefetch_l2(p as *const u8, len * 4)
}

/// The attention output shared by tasks that write disjoint (row, head) slots.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used for disjoint writes while the buffer is exclusively borrowed by `attention_many`
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// (a method, so closures capture the whole `Sync` value rather than its raw pointer field)
    fn get(self) -> *mut f32 {
        self.0
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

    /// The query vector of row `t`.
    #[inline(always)]
    fn query(&self, t: usize) -> &[f32] {
        self.query_of(t, 0)
    }

    /// The query vector of row `t` for head `h + i`.
    #[inline(always)]
    fn query_of(&self, t: usize, i: usize) -> &[f32] {
        let q_dim = self.n_head * self.head_dim;
        &self.q[t * q_dim + (self.h + i) * self.head_dim..][..self.head_dim]
    }
}

/// Most query heads one pass over a cache head's keys and values serves (three heads' score
/// accumulators, 24 registers, still leave room for the key and its products).
const MAX_HEADS: usize = 3;

/// Every row of query heads `j.h..j.h + heads` (at most [`MAX_HEADS`], all reading the same cache head)
/// into `out`, head `j.h + i` at `out + i * head_dim` (row `t` at `+ t * stride`), built for the widest
/// vectors the CPU has: the canonical operations in the same order, so the same bits. With AVX-512 one
/// pass loads each key block and value row once for all of the heads; AVX2 (16 registers, one head's 8
/// partial sums) and the portable build take one head per pass.
///
/// # Safety
/// `out` has room for every head's rows at that stride.
unsafe fn head_group(j: HeadJob<'_>, heads: usize, out: *mut f32, stride: usize) {
    assert!((1..=MAX_HEADS).contains(&heads));
    let each = |i: usize| (HeadJob { h: j.h + i, ..j }, out.wrapping_add(i * j.head_dim));
    #[cfg(target_arch = "x86_64")]
    {
        if j.head_dim.is_multiple_of(16) && is_x86_feature_detected!("avx512f") {
            return match heads {
                1 => x86::heads512::<1>(j, out, stride),
                2 => x86::heads512::<2>(j, out, stride),
                _ => x86::heads512::<3>(j, out, stride),
            };
        }
        if j.head_dim.is_multiple_of(8) && is_x86_feature_detected!("avx2") {
            return (0..heads).map(each).for_each(|(job, o)| x86::head256(job, o, stride));
        }
    }
    (0..heads).map(each).for_each(|(job, o)| head_portable(job, o, stride))
}

/// The 16 lanes of a sum in the fixed tree.
#[inline(always)]
fn reduce16(a: &[f32; KEY_BLOCK]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| a[i] + a[i + 8]);
    ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]))
}

thread_local! {
    /// Scores (then weights) of the row being computed, in whole key blocks.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The reference build.
///
/// # Safety
/// `out` has room for the job's rows at that stride.
unsafe fn head_portable(j: HeadJob<'_>, out: *mut f32, stride: usize) {
    let (_, kv_dim, g, scale) = j.layout();
    let (hd, n_kv) = (j.head_dim, j.n_head_kv);
    let mut scores = Vec::new();
    for t in 0..j.q.len() / (j.n_head * hd) {
        let visible = j.start + t + 1;
        let q = j.query(t);
        scores.clear();
        for p in 0..visible {
            let mut part = [0f32; 8];
            for c in 0..hd / 8 {
                for (l, pl) in part.iter_mut().enumerate() {
                    let d = 8 * c + l;
                    *pl += q[d] * j.k[key_index(p, g, d, n_kv, hd)];
                }
            }
            let mut tail = 0f32;
            #[allow(clippy::needless_range_loop)] // q and the keys side by side, as in the loop above
            for d in hd / 8 * 8..hd {
                tail += q[d] * j.k[key_index(p, g, d, n_kv, hd)];
            }
            let dot = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7])) + tail;
            scores.push(dot * scale);
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut lanes = [0f32; KEY_BLOCK];
        for (p, s) in scores.iter_mut().enumerate() {
            *s = exp_fixed(*s - max);
            lanes[p % KEY_BLOCK] += *s;
        }
        let inv = 1.0 / reduce16(&lanes);
        let o = std::slice::from_raw_parts_mut(out.add(t * stride), hd);
        o.fill(0.0);
        for (p, &e) in scores.iter().enumerate() {
            for (od, &vd) in o.iter_mut().zip(&j.v[p * kv_dim + g * hd..][..hd]) {
                *od += e * vd;
            }
        }
        for od in o.iter_mut() {
            *od *= inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{key_index, HeadJob, KEY_BLOCK, SCORES};
    use crate::ops::expvec::{exp256, exp512};

    /// [`super::head_portable`] for the `P` query heads `j.h..j.h + P`, which read the same cache head
    /// (head `j.h + i` written at `out + i * head_dim`): each key block and value row is loaded once for
    /// all of them. 16 keys per 512-bit register (one key block), the value sums 16 elements per register.
    #[target_feature(enable = "avx512f,avx2")]
    pub(super) unsafe fn heads512<const P: usize>(j: HeadJob<'_>, out: *mut f32, stride: usize) {
        let (_, kv_dim, g, scale) = j.layout();
        let (hd, n_kv) = (j.head_dim, j.n_head_kv);
        let mut scores = SCORES.with(|c| std::mem::take(&mut *c.borrow_mut()));
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for t in 0..j.q.len() / (j.n_head * hd) {
            let visible = j.start + t + 1;
            let blocks = visible.div_ceil(KEY_BLOCK);
            // head i's scores (then weights) at sp + i * width
            let width = blocks * KEY_BLOCK;
            let q: [*const f32; P] = std::array::from_fn(|i| j.query_of(t, i).as_ptr());
            scores.clear();
            scores.reserve(P * width);
            let sp = scores.as_mut_ptr();
            let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); P];
            for b in 0..blocks {
                let kb = j.k.as_ptr().add(key_index(b * KEY_BLOCK, g, 0, n_kv, hd));
                let mut part = [[_mm512_setzero_ps(); 8]; P];
                for c in 0..hd / 8 {
                    for l in 0..8 {
                        let d = 8 * c + l;
                        let key = _mm512_loadu_ps(kb.add(d * KEY_BLOCK));
                        for (pi, qi) in part.iter_mut().zip(&q) {
                            pi[l] = _mm512_add_ps(pi[l], _mm512_mul_ps(_mm512_set1_ps(*qi.add(d)), key));
                        }
                    }
                }
                // positions past the visible ones (the block's end) take no part
                let seen =
                    _mm512_cmplt_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32((b * KEY_BLOCK) as i32)), _mm512_set1_epi32(visible as i32));
                for (i, (part, max)) in part.iter().zip(&mut max).enumerate() {
                    // (head widths here are whole multiples of 16: the tail is 0.0, added as in the reference)
                    let dot = _mm512_add_ps(
                        _mm512_add_ps(
                            _mm512_add_ps(_mm512_add_ps(part[0], part[4]), _mm512_add_ps(part[1], part[5])),
                            _mm512_add_ps(_mm512_add_ps(part[2], part[6]), _mm512_add_ps(part[3], part[7])),
                        ),
                        _mm512_setzero_ps(),
                    );
                    let s = _mm512_mul_ps(dot, _mm512_set1_ps(scale));
                    let s = _mm512_mask_blend_ps(seen, _mm512_set1_ps(f32::NEG_INFINITY), s);
                    *max = _mm512_max_ps(*max, s);
                    _mm512_storeu_ps(sp.add(i * width + b * KEY_BLOCK), s);
                }
            }
            let mut inv = [_mm512_setzero_ps(); P];
            for (i, (inv, max)) in inv.iter_mut().zip(&max).enumerate() {
                let si = sp.add(i * width);
                let m = _mm512_set1_ps(_mm512_reduce_max_ps(*max));
                let mut lanes = _mm512_setzero_ps();
                for b in 0..blocks {
                    let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(si.add(b * KEY_BLOCK)), m));
                    lanes = _mm512_add_ps(lanes, e);
                    _mm512_storeu_ps(si.add(b * KEY_BLOCK), e);
                }
                let mut l = [0f32; KEY_BLOCK];
                _mm512_storeu_ps(l.as_mut_ptr(), lanes);
                *inv = _mm512_set1_ps(1.0 / super::reduce16(&l));
            }
            let vp = j.v.as_ptr().add(g * hd);
            let o = out.add(t * stride);
            // up to 128 elements (8 registers) per head at a time (64 with three heads), every key for each
            let per_pass = if P == 3 { 4 } else { 8 };
            for c0 in (0..hd).step_by(per_pass * KEY_BLOCK) {
                let n = ((hd - c0) / KEY_BLOCK).min(per_pass);
                let mut acc = [[_mm512_setzero_ps(); 8]; P];
                for p in 0..visible {
                    let row = vp.add(p * kv_dim + c0);
                    for c in 0..n {
                        let val = _mm512_loadu_ps(row.add(c * KEY_BLOCK));
                        for (i, a) in acc.iter_mut().enumerate() {
                            a[c] = _mm512_add_ps(a[c], _mm512_mul_ps(_mm512_set1_ps(*sp.add(i * width + p)), val));
                        }
                    }
                }
                for (i, (a, inv)) in acc.iter().zip(&inv).enumerate() {
                    for (c, a) in a.iter().enumerate().take(n) {
                        _mm512_storeu_ps(o.add(i * hd + c0 + c * KEY_BLOCK), _mm512_mul_ps(*a, *inv));
                    }
                }
            }
        }
        SCORES.with(|c| *c.borrow_mut() = scores);
    }

    /// [`super::head_portable`] with 8 keys per 256-bit register (half a key block).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn head256(j: HeadJob<'_>, out: *mut f32, stride: usize) {
        let (_, kv_dim, g, scale) = j.layout();
        let (hd, n_kv) = (j.head_dim, j.n_head_kv);
        let mut scores = SCORES.with(|c| std::mem::take(&mut *c.borrow_mut()));
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for t in 0..j.q.len() / (j.n_head * hd) {
            let visible = j.start + t + 1;
            let halves = visible.div_ceil(8);
            let q = j.query(t).as_ptr();
            scores.clear();
            scores.reserve(halves.div_ceil(2) * KEY_BLOCK);
            let sp = scores.as_mut_ptr();
            let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
            for hb in 0..halves {
                let kb = j.k.as_ptr().add(key_index(hb / 2 * KEY_BLOCK, g, 0, n_kv, hd) + 8 * (hb % 2));
                let mut part = [_mm256_setzero_ps(); 8];
                for c in 0..hd / 8 {
                    for (l, pl) in part.iter_mut().enumerate() {
                        let d = 8 * c + l;
                        *pl = _mm256_add_ps(*pl, _mm256_mul_ps(_mm256_set1_ps(*q.add(d)), _mm256_loadu_ps(kb.add(d * KEY_BLOCK))));
                    }
                }
                let dot = _mm256_add_ps(
                    _mm256_add_ps(
                        _mm256_add_ps(_mm256_add_ps(part[0], part[4]), _mm256_add_ps(part[1], part[5])),
                        _mm256_add_ps(_mm256_add_ps(part[2], part[6]), _mm256_add_ps(part[3], part[7])),
                    ),
                    _mm256_setzero_ps(),
                );
                let s = _mm256_mul_ps(dot, _mm256_set1_ps(scale));
                let seen = _mm256_cmpgt_epi32(_mm256_set1_epi32(visible as i32), _mm256_add_epi32(lane, _mm256_set1_epi32((hb * 8) as i32)));
                let s = _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), s, _mm256_castsi256_ps(seen));
                max = _mm256_max_ps(max, s);
                _mm256_storeu_ps(sp.add(hb * 8), s);
            }
            let mut mx = [0f32; 8];
            _mm256_storeu_ps(mx.as_mut_ptr(), max);
            let m = _mm256_set1_ps(mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)));
            // lanes 0..8 of the sum take the even halves, lanes 8..16 the odd ones
            let mut lanes = [_mm256_setzero_ps(); 2];
            for hb in 0..halves {
                let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sp.add(hb * 8)), m));
                lanes[hb % 2] = _mm256_add_ps(lanes[hb % 2], e);
                _mm256_storeu_ps(sp.add(hb * 8), e);
            }
            let mut l = [0f32; KEY_BLOCK];
            _mm256_storeu_ps(l.as_mut_ptr(), lanes[0]);
            _mm256_storeu_ps(l.as_mut_ptr().add(8), lanes[1]);
            let inv = _mm256_set1_ps(1.0 / super::reduce16(&l));
            let vp = j.v.as_ptr().add(g * hd);
            let o = out.add(t * stride);
            // up to 64 elements (8 registers) at a time, every key for each
            for c0 in (0..hd).step_by(64) {
                let n = ((hd - c0) / 8).min(8);
                let mut acc = [_mm256_setzero_ps(); 8];
                for p in 0..visible {
                    let (e, row) = (_mm256_set1_ps(*sp.add(p)), vp.add(p * kv_dim + c0));
                    for (c, a) in acc.iter_mut().enumerate().take(n) {
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(e, _mm256_loadu_ps(row.add(8 * c))));
                    }
                }
                for (c, a) in acc.iter().enumerate().take(n) {
                    _mm256_storeu_ps(o.add(c0 + 8 * c), _mm256_mul_ps(*a, inv));
                }
            }
        }
        SCORES.with(|c| *c.borrow_mut() = scores);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_single_key_returns_its_value() {
        let q = [1.0, 0.0];
        let k = key_blocks(&[0.5, 0.5], 1, 2);
        let v = [3.0, -1.0];
        let mut out = [0f32; 2];
        attention(&q, &k, &v, 0, 1, 1, 2, &mut out);
        assert_eq!(out, [3.0, -1.0]);
    }

    #[test]
    fn attention_is_causal() {
        // two positions, the first query must not see the second key
        let q = [1.0, 0.0, 1.0, 0.0];
        let k = key_blocks(&[1.0, 0.0, 1.0, 0.0], 1, 2);
        let v = [1.0, 1.0, 5.0, 5.0];
        let mut out = [0f32; 4];
        attention(&q, &k, &v, 0, 1, 1, 2, &mut out);
        assert_eq!(&out[..2], &[1.0, 1.0]);
        assert!((out[2] - 3.0).abs() < 1e-6);
    }

    #[test]
    fn key_blocks_hold_every_element_once() {
        let (n_kv, hd, positions) = (3, 8, 21);
        let rows: Vec<f32> = (0..positions * n_kv * hd).map(|i| i as f32).collect();
        let k = key_blocks(&rows, n_kv, hd);
        assert_eq!(k.len(), 32 * n_kv * hd);
        for p in 0..positions {
            for g in 0..n_kv {
                for d in 0..hd {
                    assert_eq!(k[key_index(p, g, d, n_kv, hd)], rows[(p * n_kv + g) * hd + d]);
                }
            }
        }
    }

    #[test]
    fn attention_matches_a_float64_softmax() {
        let (n_head, n_kv, hd, rows, start) = (4, 2, 64, 3, 37);
        let rnd = crate::quant::tests::random;
        let (q, kr, v) = (rnd(rows * n_head * hd, 5), rnd((start + rows) * n_kv * hd, 6), rnd((start + rows) * n_kv * hd, 7));
        let mut got = vec![0f32; q.len()];
        attention(&q, &key_blocks(&kr, n_kv, hd), &v, start, n_head, n_kv, hd, &mut got);
        for t in 0..rows {
            for h in 0..n_head {
                let g = h / (n_head / n_kv);
                let qh = &q[(t * n_head + h) * hd..][..hd];
                let s: Vec<f64> = (0..=start + t)
                    .map(|p| (0..hd).map(|d| qh[d] as f64 * kr[(p * n_kv + g) * hd + d] as f64).sum::<f64>() / (hd as f64).sqrt())
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let want: f64 = e.iter().enumerate().map(|(p, w)| w * v[(p * n_kv + g) * hd + d] as f64).sum::<f64>() / z;
                    let have = got[(t * n_head + h) * hd + d] as f64;
                    assert!((have - want).abs() < 1e-5, "row {t} head {h} element {d}: {have} vs {want}");
                }
            }
        }
    }

    #[test]
    fn every_attention_build_gives_the_portable_bits() {
        // head widths 64 and 128 (every build), 40 (AVX2 and portable), 36 (portable only: a tail past the
        // last whole 8); rows ending inside a key block and on its edge; GQA 6 heads over 2, and groups of
        // 5 and of 1 query heads per cache head (a pass over the cache serves up to three heads: 3 + 2, 1)
        let shapes = [(64usize, 5usize, 11usize), (128, 3, 29), (40, 4, 12), (36, 2, 14), (64, 1, 15), (64, 17, 0)];
        for (&(hd, rows, start), (n_head, n_kv)) in shapes.iter().flat_map(|s| [(s, (6, 2)), (s, (10, 2)), (s, (3, 3))]) {
            let rnd = crate::quant::tests::random;
            let q = rnd(rows * n_head * hd, 1);
            let k = key_blocks(&rnd((start + rows) * n_kv * hd, 2), n_kv, hd);
            let v = rnd((start + rows) * n_kv * hd, 3);
            let q_dim = n_head * hd;
            let mut want = vec![0f32; q.len()];
            for h in 0..n_head {
                let job = HeadJob { q: &q, k: &k, v: &v, start, h, n_head, n_head_kv: n_kv, head_dim: hd };
                // SAFETY: `want` holds every row at stride q_dim
                unsafe { head_portable(job, want.as_mut_ptr().add(h * hd), q_dim) };
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let mut got = vec![0f32; q.len()];
            attention(&q, &k, &v, start, n_head, n_kv, hd, &mut got);
            assert_eq!(bits(&got), bits(&want), "head width {hd}, dispatched build");
            #[cfg(target_arch = "x86_64")]
            for (build, ok) in
                [("avx512", hd % 16 == 0 && is_x86_feature_detected!("avx512f")), ("avx2", hd % 8 == 0 && is_x86_feature_detected!("avx2"))]
            {
                if !ok {
                    continue;
                }
                let mut got = vec![0f32; q.len()];
                for h in 0..n_head {
                    let job = HeadJob { q: &q, k: &k, v: &v, start, h, n_head, n_head_kv: n_kv, head_dim: hd };
                    // SAFETY: the CPU has the build's features; `got` holds every row at stride q_dim
                    unsafe {
                        let o = got.as_mut_ptr().add(h * hd);
                        if build == "avx512" {
                            x86::heads512::<1>(job, o, q_dim)
                        } else {
                            x86::head256(job, o, q_dim)
                        }
                    }
                }
                assert_eq!(bits(&got), bits(&want), "head width {hd}, {build}");
            }
        }
    }
}
