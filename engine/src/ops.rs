//! Row-wise tensor operations of the forward pass, on plain f32 slices with a fixed evaluation order.

use crate::config::RopeStyle;

/// RMS-normalizes each `width`-wide row of `x` in place and scales by `weight` (sum of squares in f64,
/// in [`sum_squares`]' fixed order).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    for (row, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let ss = sum_squares(row);
        let scale = 1.0 / ((ss / width as f64) as f32 + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// `Σ v²` in f64 as 8 interleaved partial sums (`p[l]` takes elements `l, l + 8, ...` in order), then
/// `((p0+p4)+(p1+p5)) + ((p2+p6)+(p3+p7)) + tail` (the elements past the last whole 8, in order): independent
/// lanes the compiler vectorizes, the same bits in every build.
#[inline]
fn sum_squares(row: &[f32]) -> f64 {
    let mut p = [0f64; 8];
    let chunks = row.chunks_exact(8);
    let mut tail = 0f64;
    for &v in chunks.remainder() {
        tail += v as f64 * v as f64;
    }
    for c in chunks {
        for l in 0..8 {
            p[l] += c[l] as f64 * c[l] as f64;
        }
    }
    ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7])) + tail
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
// the published constants, digit for digit (the f32 values are the same)
#[allow(clippy::excessive_precision)]
const LN2_C1: f32 = 0.693_359_375;
const LN2_C2: f32 = -2.121_944_4e-4;
#[allow(clippy::excessive_precision)]
const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];

/// `e^x` by a fixed sequence of f32 operations (no fused multiply-add), so every build and every vector
/// width gives the same bits: within a few ulp of the exact value, 0 below `ln(2^-126)` (no subnormal
/// results), `e^88` above 88.
#[inline(always)]
#[allow(clippy::manual_clamp)] // max then min, the operations the vector builds use (clamp treats NaN otherwise)
pub(crate) fn exp_fixed(x: f32) -> f32 {
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

/// [`exp_fixed`] and [`swiglu`] on 512-bit and 256-bit vectors: [`exp_fixed`]'s operations lane by lane.
#[cfg(target_arch = "x86_64")]
pub(crate) mod expvec {
    use std::arch::x86_64::*;

    use super::{EXP_HI, EXP_LO, EXP_P, LN2_C1, LN2_C2, LOG2E};

    /// [`super::exp_fixed`] on 16 lanes.
    #[inline(always)]
    pub(crate) unsafe fn exp512(x: __m512) -> __m512 {
        let xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(xc, _mm512_set1_ps(LOG2E)));
        let r = _mm512_sub_ps(_mm512_sub_ps(xc, _mm512_mul_ps(k, _mm512_set1_ps(LN2_C1))), _mm512_mul_ps(k, _mm512_set1_ps(LN2_C2)));
        let mut p = _mm512_set1_ps(EXP_P[0]);
        for c in &EXP_P[1..] {
            p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(*c));
        }
        let y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), _mm512_set1_ps(1.0));
        let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)));
        let low = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_LO));
        _mm512_maskz_mul_ps(!low, y, _mm512_castsi512_ps(bits))
    }

    /// [`super::exp_fixed`] on 8 lanes.
    #[inline(always)]
    pub(crate) unsafe fn exp256(x: __m256) -> __m256 {
        let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(xc, _mm256_set1_ps(LOG2E)));
        let r = _mm256_sub_ps(_mm256_sub_ps(xc, _mm256_mul_ps(k, _mm256_set1_ps(LN2_C1))), _mm256_mul_ps(k, _mm256_set1_ps(LN2_C2)));
        let mut p = _mm256_set1_ps(EXP_P[0]);
        for c in &EXP_P[1..] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.0));
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)));
        let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(EXP_LO));
        _mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn swiglu512(gate: &mut [f32], up: &[f32]) {
        let n = gate.len() / 16 * 16;
        let one = _mm512_set1_ps(1.0);
        for i in (0..n).step_by(16) {
            let g = _mm512_loadu_ps(gate.as_ptr().add(i));
            let x = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(i32::MIN)));
            let e = exp512(x);
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
            let e = exp256(_mm256_xor_ps(g, _mm256_set1_ps(-0.0)));
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
}
