//! Runtime-selected integer kernels: one weight row (output column) against every activation row.
//!
//! Only the exact integer block sums are vectorized; each block's float contribution is added in the
//! same scalar order on every path, so all paths (scalar, AVX2, AVX-512 VNNI) give bit-identical
//! results, on any machine, for any batch size.

use std::sync::OnceLock;

use super::dequant::f16_at;
use super::dot::{Q8Row, QK8};

/// Instruction-set level of the integer kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Portable Rust, the reference.
    Scalar,
    /// AVX2 (`maddubs` + `madd`).
    Avx2,
    /// AVX-512 VNNI on 256-bit vectors (`dpbusd`).
    Avx512Vnni,
}

/// The best level this CPU supports, capped by `FLOTILLA_KERNEL=scalar|avx2` when set.
pub fn detected() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = best_supported();
        match std::env::var("FLOTILLA_KERNEL").as_deref() {
            Ok("scalar") => Level::Scalar,
            Ok("avx2") => best.min(Level::Avx2),
            _ => best,
        }
    })
}

/// Every level this CPU can run (for tests).
pub fn supported() -> Vec<Level> {
    [Level::Scalar, Level::Avx2, Level::Avx512Vnni].into_iter().filter(|&l| l <= best_supported()).collect()
}

fn best_supported() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
            return Level::Avx512Vnni;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// Weight formats with integer kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl IntFormat {
    /// Bytes per 32-element block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// `out[i] = w · acts[i]` for one weight row `w` in format `f`.
pub fn column(level: Level, f: IntFormat, w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
    match level {
        Level::Scalar => column_scalar(f, w, acts, out),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::column_avx2(f, w, acts, out) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni => unsafe { x86::column_vnni(f, w, acts, out) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => column_scalar(f, w, acts, out),
    }
}

/// A block's float contribution (`dw`, `mw`: the block's scale and minimum), shared by every path so
/// they round identically.
#[inline(always)]
fn block_term(f: IntFormat, dw: f32, mw: f32, a: &Q8Row, blk: usize, sumi: i32) -> f32 {
    match f {
        IntFormat::Q4_1 => (dw * a.d[blk]) * sumi as f32 + mw * a.s[blk],
        IntFormat::Q4_0 | IntFormat::Q8_0 => (dw * a.d[blk]) * sumi as f32,
    }
}

/// Scale and minimum of a block.
#[inline(always)]
fn scales(f: IntFormat, b: &[u8]) -> (f32, f32) {
    (f16_at(b, 0), if f == IntFormat::Q4_1 { f16_at(b, 2) } else { 0.0 })
}

/// Exact integer sum of one block's products.
#[inline(always)]
fn block_sumi_scalar(f: IntFormat, b: &[u8], q8: &[i8]) -> i32 {
    let mut sumi = 0i32;
    match f {
        IntFormat::Q4_0 => {
            for j in 0..16 {
                sumi += ((b[2 + j] & 0xF) as i32 - 8) * q8[j] as i32 + ((b[2 + j] >> 4) as i32 - 8) * q8[j + 16] as i32;
            }
        }
        IntFormat::Q4_1 => {
            for j in 0..16 {
                sumi += (b[4 + j] & 0xF) as i32 * q8[j] as i32 + (b[4 + j] >> 4) as i32 * q8[j + 16] as i32;
            }
        }
        IntFormat::Q8_0 => {
            for j in 0..32 {
                sumi += (b[2 + j] as i8) as i32 * q8[j] as i32;
            }
        }
    }
    sumi
}

fn column_scalar(f: IntFormat, w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
    out.fill(0.0);
    for (blk, b) in w.chunks_exact(f.block_bytes()).enumerate() {
        let (dw, mw) = scales(f, b);
        for (o, a) in out.iter_mut().zip(acts) {
            let sumi = block_sumi_scalar(f, b, &a.qs[blk * QK8..(blk + 1) * QK8]);
            *o += block_term(f, dw, mw, a, blk, sumi);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// The 32 weight values of a block as bytes for the unsigned operand, plus whether they are signed.
    #[inline(always)]
    unsafe fn weights(f: IntFormat, b: &[u8]) -> __m256i {
        match f {
            IntFormat::Q4_0 | IntFormat::Q4_1 => {
                let off = if f == IntFormat::Q4_0 { 2 } else { 4 };
                let q = _mm_loadu_si128(b.as_ptr().add(off) as *const __m128i);
                let m = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(q, m);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), m);
                _mm256_set_m128i(hi, lo)
            }
            IntFormat::Q8_0 => _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i),
        }
    }

    /// Q4_0 values are stored +8: Σ(q-8)a = Σqa - 8Σa, all exact in i32.
    #[inline(always)]
    fn fix_q4_0(f: IntFormat, raw: i32, a: &Q8Row, blk: usize) -> i32 {
        if f == IntFormat::Q4_0 {
            raw - 8 * a.isum[blk]
        } else {
            raw
        }
    }

    /// f16 to f32 with F16C: exact, so equal to the scalar conversion.
    #[inline(always)]
    unsafe fn f16c(b: &[u8], off: usize) -> f32 {
        let bits = u16::from_le_bytes([b[off], b[off + 1]]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    #[inline(always)]
    unsafe fn scales_f16c(f: IntFormat, b: &[u8]) -> (f32, f32) {
        (f16c(b, 0), if f == IntFormat::Q4_1 { f16c(b, 2) } else { 0.0 })
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn column_avx2(f: IntFormat, w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
        out.fill(0.0);
        let ones = _mm256_set1_epi16(1);
        for (blk, b) in w.chunks_exact(f.block_bytes()).enumerate() {
            let wv = weights(f, b);
            let wabs = if f == IntFormat::Q8_0 { _mm256_sign_epi8(wv, wv) } else { wv };
            let (dw, mw) = scales_f16c(f, b);
            for (o, a) in out.iter_mut().zip(acts) {
                let q8 = &a.qs[blk * QK8..(blk + 1) * QK8];
                let av = _mm256_loadu_si256(q8.as_ptr() as *const __m256i);
                let av = if f == IntFormat::Q8_0 { _mm256_sign_epi8(av, wv) } else { av };
                let sumi = hsum(_mm256_madd_epi16(_mm256_maddubs_epi16(wabs, av), ones));
                *o += block_term(f, dw, mw, a, blk, fix_q4_0(f, sumi, a, blk));
            }
        }
    }

    #[target_feature(enable = "avx2,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn column_vnni(f: IntFormat, w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
        out.fill(0.0);
        for (blk, b) in w.chunks_exact(f.block_bytes()).enumerate() {
            let wv = weights(f, b);
            let wabs = if f == IntFormat::Q8_0 { _mm256_sign_epi8(wv, wv) } else { wv };
            let (dw, mw) = scales_f16c(f, b);
            for (o, a) in out.iter_mut().zip(acts) {
                let q8 = &a.qs[blk * QK8..(blk + 1) * QK8];
                let av = _mm256_loadu_si256(q8.as_ptr() as *const __m256i);
                let av = if f == IntFormat::Q8_0 { _mm256_sign_epi8(av, wv) } else { av };
                let sumi = hsum(_mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs, av));
                *o += block_term(f, dw, mw, a, blk, fix_q4_0(f, sumi, a, blk));
            }
        }
    }
}
