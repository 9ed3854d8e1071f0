//! Runtime-selected integer kernels: one weight row (output column) against every activation row.
//!
//! Every path computes the same canonical sum, so scalar, AVX2 and AVX-512 VNNI results are
//! bit-identical on any machine, for any batch size: each 32-value block splits into 8 lanes of 4
//! products (exact integers); lane `l` accumulates `lane[l] + (dw*da) * p_l` (a multiply then an add,
//! never fused) in two interleaved sets, even and odd blocks, so two dependency chains run at once;
//! Q4_1 minimums accumulate `mins + mw*sa` the same way; the result is `reduce(even + odd) + (mins_even +
//! mins_odd)` with `reduce(l) = ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`.

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
    /// AVX-512 VNNI + VBMI on 512-bit vectors: an even and an odd block per instruction, the two halves
    /// of a register holding exactly the even and odd accumulator sets of the narrower paths.
    Avx512Zmm,
}

/// The best level this CPU supports, capped by `FLOTILLA_KERNEL=scalar|avx2|vnni256` when set.
pub fn detected() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = best_supported();
        match std::env::var("FLOTILLA_KERNEL").as_deref() {
            Ok("scalar") => Level::Scalar,
            Ok("avx2") => best.min(Level::Avx2),
            Ok("vnni256") => best.min(Level::Avx512Vnni),
            _ => best,
        }
    })
}

/// Every level this CPU can run (for tests).
pub fn supported() -> Vec<Level> {
    [Level::Scalar, Level::Avx2, Level::Avx512Vnni, Level::Avx512Zmm].into_iter().filter(|&l| l <= best_supported()).collect()
}

fn best_supported() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vbmi")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("f16c")
        {
            return Level::Avx512Zmm;
        }
        if is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("f16c")
        {
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
        Level::Scalar => out.iter_mut().zip(acts).for_each(|(o, a)| *o = row_scalar(f, w, a)),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::column_avx2(f, w, acts, out) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni => unsafe { x86::column_vnni(f, w, acts, out) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Zmm => unsafe { x86::column_zmm(f, w, acts, out) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => out.iter_mut().zip(acts).for_each(|(o, a)| *o = row_scalar(f, w, a)),
    }
}

/// Scale and minimum of a block.
#[inline(always)]
fn scales(f: IntFormat, b: &[u8]) -> (f32, f32) {
    (f16_at(b, 0), if f == IntFormat::Q4_1 { f16_at(b, 2) } else { 0.0 })
}

/// Weight value `j` (0..32) of a block, as the signed integer the dot product uses.
#[inline(always)]
fn weight(f: IntFormat, b: &[u8], j: usize) -> i32 {
    match f {
        IntFormat::Q4_0 => (if j < 16 { b[2 + j] & 0xF } else { b[2 + j - 16] >> 4 }) as i32 - 8,
        IntFormat::Q4_1 => (if j < 16 { b[4 + j] & 0xF } else { b[4 + j - 16] >> 4 }) as i32,
        IntFormat::Q8_0 => (b[2 + j] as i8) as i32,
    }
}

/// The fixed reduction of the 8 lanes.
#[inline(always)]
fn reduce(l: [f32; 8]) -> f32 {
    let a = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (a[0] + a[2]) + (a[1] + a[3])
}

/// The canonical dot product of one weight row with one activation row.
pub fn row_scalar(f: IntFormat, w: &[u8], a: &Q8Row) -> f32 {
    let mut lanes = [[0f32; 8]; 2];
    let mut mins = [0f32; 2];
    for (blk, b) in w.chunks_exact(f.block_bytes()).enumerate() {
        let (dw, mw) = scales(f, b);
        let dd = dw * a.d[blk];
        let q8 = &a.qs[blk * QK8..(blk + 1) * QK8];
        for (l, lane) in lanes[blk % 2].iter_mut().enumerate() {
            let p: i32 = (4 * l..4 * l + 4).map(|j| weight(f, b, j) * q8[j] as i32).sum();
            *lane = *lane + dd * p as f32;
        }
        if f == IntFormat::Q4_1 {
            mins[blk % 2] = mins[blk % 2] + mw * a.s[blk];
        }
    }
    reduce(std::array::from_fn(|l| lanes[0][l] + lanes[1][l])) + (mins[0] + mins[1])
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// How far ahead of the block being multiplied the weights are prefetched, in bytes: single-stream
    /// decode streams ~100 MB of weights per token, and the hardware prefetcher alone leaves about 15%
    /// of the decode speed on the table (measured on the 512-bit path).
    const PREFETCH: usize = 1024;

    /// The 32 weights of a block as bytes, signed for Q4_0 (centred) and Q8_0.
    #[inline(always)]
    unsafe fn weights(f: IntFormat, b: *const u8) -> __m256i {
        match f {
            IntFormat::Q4_0 | IntFormat::Q4_1 => {
                let off = if f == IntFormat::Q4_0 { 2 } else { 4 };
                let q = _mm_loadu_si128(b.add(off) as *const __m128i);
                let m = _mm_set1_epi8(0x0F);
                let v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(q), m), _mm_and_si128(q, m));
                if f == IntFormat::Q4_0 {
                    _mm256_sub_epi8(v, _mm256_set1_epi8(8))
                } else {
                    v
                }
            }
            IntFormat::Q8_0 => _mm256_loadu_si256(b.add(2) as *const __m256i),
        }
    }

    /// f16 to f32 with F16C: exact, so equal to the scalar conversion.
    #[inline(always)]
    unsafe fn f16c(b: *const u8) -> f32 {
        _mm256_cvtss_f32(f16c8(b))
    }

    /// The f16 at `b` converted exactly, in all 8 lanes. Broadcasting the bits first avoids an insert
    /// into a live register (a false dependency that serialised the block loop).
    #[inline(always)]
    unsafe fn f16c8(b: *const u8) -> __m256 {
        let bits = (b as *const i16).read_unaligned();
        _mm256_cvtph_ps(_mm_set1_epi16(bits))
    }

    #[inline(always)]
    unsafe fn reduce8(acc: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// One block of one weight row against `R` activation rows, into one accumulator set.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn step<const R: usize>(
        f: IntFormat,
        b: *const u8,
        blk: usize,
        qs: &[*const i8; R],
        d: &[*const f32; R],
        s: &[*const f32; R],
        acc: &mut [__m256; R],
        mins: &mut [f32; R],
        lanes: &impl Fn(__m256i, __m256i) -> __m256i,
    ) {
        let wv = weights(f, b);
        let wu = if f == IntFormat::Q4_1 { wv } else { _mm256_sign_epi8(wv, wv) };
        let dw = f16c8(b);
        let mw = if f == IntFormat::Q4_1 { f16c(b.add(2)) } else { 0.0 };
        for r in 0..R {
            let av = _mm256_loadu_si256(qs[r].add(blk * QK8) as *const __m256i);
            let av = if f == IntFormat::Q4_1 { av } else { _mm256_sign_epi8(av, wv) };
            let p = lanes(wu, av);
            // the same f32 product as the scalar `dw * da`, in every lane
            let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*d[r].add(blk)));
            acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(dd, _mm256_cvtepi32_ps(p)));
            if f == IntFormat::Q4_1 {
                mins[r] = mins[r] + mw * *s[r].add(blk);
            }
        }
    }

    /// Pointers to the quantized values, scales and sums of `R` activation rows (plain loops: a closure
    /// would not inherit the callers' target features).
    #[inline(always)]
    #[allow(clippy::type_complexity)]
    fn act_ptrs<const R: usize>(acts: &[Q8Row]) -> ([*const i8; R], [*const f32; R], [*const f32; R]) {
        let (mut qs, mut d, mut s) = ([std::ptr::null::<i8>(); R], [std::ptr::null::<f32>(); R], [std::ptr::null::<f32>(); R]);
        for r in 0..R {
            (qs[r], d[r], s[r]) = (acts[r].qs.as_ptr(), acts[r].d.as_ptr(), acts[r].s.as_ptr());
        }
        (qs, d, s)
    }

    /// `R` rows against one weight row, sharing each block's unpacked weights and scales.
    /// `lanes(w, a)` gives the 8 exact lane sums of a block.
    #[inline(always)]
    unsafe fn rows<const R: usize>(f: IntFormat, w: &[u8], acts: &[Q8Row], out: &mut [f32], lanes: impl Fn(__m256i, __m256i) -> __m256i) {
        let bb = f.block_bytes();
        let nb = w.len() / bb;
        debug_assert!(acts.len() == R && out.len() == R);
        debug_assert!(acts.iter().all(|a| a.qs.len() >= nb * QK8 && a.d.len() >= nb && a.s.len() >= nb));
        let (qs, d, s) = act_ptrs::<R>(acts);
        let wp = w.as_ptr();
        let mut even = [_mm256_setzero_ps(); R];
        let mut odd = [_mm256_setzero_ps(); R];
        let mut mins_even = [0f32; R];
        let mut mins_odd = [0f32; R];
        let mut blk = 0;
        while blk + 2 <= nb {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(blk * bb + PREFETCH) as *const i8);
            step::<R>(f, wp.add(blk * bb), blk, &qs, &d, &s, &mut even, &mut mins_even, &lanes);
            step::<R>(f, wp.add((blk + 1) * bb), blk + 1, &qs, &d, &s, &mut odd, &mut mins_odd, &lanes);
            blk += 2;
        }
        if blk < nb {
            step::<R>(f, wp.add(blk * bb), blk, &qs, &d, &s, &mut even, &mut mins_even, &lanes);
        }
        for r in 0..R {
            out[r] = reduce8(_mm256_add_ps(even[r], odd[r])) + (mins_even[r] + mins_odd[r]);
        }
    }

    /// All rows, four at a time.
    #[inline(always)]
    unsafe fn all_rows(f: IntFormat, w: &[u8], acts: &[Q8Row], out: &mut [f32], lanes: impl Fn(__m256i, __m256i) -> __m256i + Copy) {
        let mut r = 0;
        while r + 4 <= acts.len() {
            rows::<4>(f, w, &acts[r..r + 4], &mut out[r..r + 4], lanes);
            r += 4;
        }
        match acts.len() - r {
            3 => rows::<3>(f, w, &acts[r..], &mut out[r..], lanes),
            2 => rows::<2>(f, w, &acts[r..], &mut out[r..], lanes),
            1 => rows::<1>(f, w, &acts[r..], &mut out[r..], lanes),
            _ => {}
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn column_avx2(f: IntFormat, w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
        let ones = _mm256_set1_epi16(1);
        let lanes = move |wv, av| _mm256_madd_epi16(_mm256_maddubs_epi16(wv, av), ones);
        // one specialised copy per format
        match f {
            IntFormat::Q4_0 => all_rows(IntFormat::Q4_0, w, acts, out, lanes),
            IntFormat::Q4_1 => all_rows(IntFormat::Q4_1, w, acts, out, lanes),
            IntFormat::Q8_0 => all_rows(IntFormat::Q8_0, w, acts, out, lanes),
        }
    }

    #[target_feature(enable = "avx2,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn column_vnni(f: IntFormat, w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
        let lanes = |wv, av| _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, av);
        match f {
            IntFormat::Q4_0 => all_rows(IntFormat::Q4_0, w, acts, out, lanes),
            IntFormat::Q4_1 => all_rows(IntFormat::Q4_1, w, acts, out, lanes),
            IntFormat::Q8_0 => all_rows(IntFormat::Q8_0, w, acts, out, lanes),
        }
    }

    /// The 32 weights of two consecutive blocks (`b`, `b + bb`) as bytes, block 0 in the low 256 bits:
    /// the same byte order per block as [`weights`]. Q4_1's are unsigned; Q4_0's and Q8_0's signed.
    #[inline(always)]
    unsafe fn weights2(f: IntFormat, b: *const u8, bb: usize) -> __m512i {
        match f {
            IntFormat::Q4_0 | IntFormat::Q4_1 => {
                let off = if f == IntFormat::Q4_0 { 2 } else { 4 };
                let q = _mm256_set_m128i(_mm_loadu_si128(b.add(bb + off) as *const __m128i), _mm_loadu_si128(b.add(off) as *const __m128i));
                let m = _mm256_set1_epi8(0x0F);
                let lo = _mm256_and_si256(q, m); // [lo0 | lo1]
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m); // [hi0 | hi1]
                let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi); // [lo0 lo1 hi0 hi1]
                let z = _mm512_shuffle_i64x2::<0b11_01_10_00>(z, z); // [lo0 hi0 lo1 hi1]
                if f == IntFormat::Q4_0 {
                    _mm512_sub_epi8(z, _mm512_set1_epi8(8))
                } else {
                    z
                }
            }
            IntFormat::Q8_0 => _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_loadu_si256(b.add(2) as *const __m256i)),
                _mm256_loadu_si256(b.add(bb + 2) as *const __m256i),
            ),
        }
    }

    /// Weights and scales of a block pair, unpacked once and shared by every activation row.
    struct Pair {
        /// Q4_1: unsigned weights; others: absolute values (the sign goes onto the activations).
        wu: __m512i,
        /// Bytes whose weight is negative (signed formats).
        neg: __mmask64,
        /// `[dw0 x 8 | dw1 x 8]`
        dw: __m512,
        /// Q4_1: `[mw0, mw1, 0, 0]`.
        mw: __m128,
    }

    /// Permutation indices of [`pair`] for one format (made once per weight row).
    struct PairIdx {
        /// bytes `[qs0, qs0, qs1, qs1]`: low nibbles from the first copy of each block, high from the second
        bytes: __m512i,
        /// f16 words `[d0 x 8, d1 x 8]`, then `[m0, m1, ...]`
        words: __m512i,
    }

    #[inline(always)]
    unsafe fn pair_idx(f: IntFormat) -> PairIdx {
        let bb = f.block_bytes();
        let off = if f == IntFormat::Q4_0 { 2 } else { 4 };
        let mut bytes = [0u8; 64];
        for (i, v) in bytes.iter_mut().enumerate() {
            *v = ((if i < 32 { off } else { bb + off }) + i % 16) as u8;
        }
        let (d0, d1) = (0u16, (bb / 2) as u16);
        let mut words = [0u16; 32];
        for (i, v) in words.iter_mut().enumerate().take(16) {
            *v = if i < 8 { d0 } else { d1 };
        }
        words[16] = d0 + 1;
        words[17] = d1 + 1;
        PairIdx { bytes: _mm512_loadu_si512(bytes.as_ptr() as *const _), words: _mm512_loadu_si512(words.as_ptr() as *const _) }
    }

    /// For the 4-bit formats, one masked load of both blocks, then byte and word permutes (VBMI) that
    /// place the nibbles and the f16 scales; Q8_0 (68 bytes per pair) loads its two halves.
    #[inline(always)]
    unsafe fn pair(f: IntFormat, b: *const u8, bb: usize, idx: &PairIdx) -> Pair {
        match f {
            IntFormat::Q4_0 | IntFormat::Q4_1 => {
                let raw = _mm512_maskz_loadu_epi8((1u64 << (2 * bb)) - 1, b as *const i8);
                let q = _mm512_permutexvar_epi8(idx.bytes, raw);
                let hi = _mm512_srli_epi16::<4>(q);
                let v = _mm512_and_si512(_mm512_mask_blend_epi8(0xFFFF_0000_FFFF_0000, q, hi), _mm512_set1_epi8(0x0F));
                let words = _mm512_permutexvar_epi16(idx.words, raw);
                let dw = _mm512_cvtph_ps(_mm512_castsi512_si256(words));
                if f == IntFormat::Q4_1 {
                    let mw = _mm_cvtph_ps(_mm256_castsi256_si128(_mm512_extracti64x4_epi64::<1>(words)));
                    let mw = _mm_castsi128_ps(_mm_move_epi64(_mm_castps_si128(mw))); // [m0, m1, 0, 0]
                    Pair { wu: v, neg: 0, dw, mw }
                } else {
                    let wv = _mm512_sub_epi8(v, _mm512_set1_epi8(8));
                    Pair { wu: _mm512_abs_epi8(wv), neg: _mm512_movepi8_mask(wv), dw, mw: _mm_setzero_ps() }
                }
            }
            IntFormat::Q8_0 => {
                let wv = weights2(f, b, bb);
                let bits = |p: *const u8| (p as *const i16).read_unaligned();
                let dw = _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16(bits(b.add(bb))), _mm_set1_epi16(bits(b))));
                Pair { wu: _mm512_abs_epi8(wv), neg: _mm512_movepi8_mask(wv), dw, mw: _mm_setzero_ps() }
            }
        }
    }

    /// Two blocks of one weight row against `R` activation rows: lanes 0..8 go to the even set, 8..16
    /// to the odd set, each lane `acc + (dw*da) * p` exactly as in [`step`]; Q4_1's minimums in lanes
    /// 0 (even) and 1 (odd) of `mins`, `mins + mw*s` as in the scalar chain.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn step2<const R: usize>(
        f: IntFormat,
        b: *const u8,
        bb: usize,
        blk: usize,
        qs: &[*const i8; R],
        d: &[*const f32; R],
        s: &[*const f32; R],
        acc: &mut [__m512; R],
        mins: &mut [__m128; R],
        idx: &PairIdx,
    ) {
        let w = pair(f, b, bb, idx);
        let pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        for r in 0..R {
            let av = _mm512_loadu_si512(qs[r].add(blk * QK8) as *const _);
            let av = if f == IntFormat::Q4_1 { av } else { _mm512_mask_sub_epi8(av, w.neg, _mm512_setzero_si512(), av) };
            let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.wu, av);
            let da = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(d[r].add(blk) as *const f64))));
            let dd = _mm512_mul_ps(w.dw, da);
            acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(dd, _mm512_cvtepi32_ps(p)));
            if f == IntFormat::Q4_1 {
                let s2 = _mm_castpd_ps(_mm_load_sd(s[r].add(blk) as *const f64));
                mins[r] = _mm_add_ps(mins[r], _mm_mul_ps(w.mw, s2));
            }
        }
    }

    /// `R` rows against one weight row, two blocks per step; an odd last block takes the 256-bit VNNI
    /// step on the even half, continuing the same chain.
    #[inline(always)]
    unsafe fn rows_zmm<const R: usize>(f: IntFormat, w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
        let bb = f.block_bytes();
        let nb = w.len() / bb;
        debug_assert!(acts.len() == R && out.len() == R);
        debug_assert!(acts.iter().all(|a| a.qs.len() >= nb * QK8 && a.d.len() >= nb && a.s.len() >= nb));
        let (qs, d, s) = act_ptrs::<R>(acts);
        let wp = w.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        let mut mins = [_mm_setzero_ps(); R];
        let idx = pair_idx(f);
        let mut blk = 0;
        while blk + 2 <= nb {
            // the rows of a matrix are contiguous: fetch ahead into the next rows (prefetches never fault)
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(blk * bb + PREFETCH) as *const i8);
            step2::<R>(f, wp.add(blk * bb), bb, blk, &qs, &d, &s, &mut acc, &mut mins, &idx);
            blk += 2;
        }
        // (plain loops: a closure would not inherit the target features and would call the intrinsics)
        let mut even = [_mm256_setzero_ps(); R];
        let mut odd = [_mm256_setzero_ps(); R];
        let mut mins_even = [0f32; R];
        for r in 0..R {
            even[r] = _mm512_castps512_ps256(acc[r]);
            odd[r] = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[r])));
            mins_even[r] = _mm_cvtss_f32(mins[r]);
        }
        if blk < nb {
            let lanes = |wv, av| _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, av);
            step::<R>(f, wp.add(blk * bb), blk, &qs, &d, &s, &mut even, &mut mins_even, &lanes);
        }
        for r in 0..R {
            let mins_odd = _mm_cvtss_f32(_mm_movehdup_ps(mins[r]));
            out[r] = reduce8(_mm256_add_ps(even[r], odd[r])) + (mins_even[r] + mins_odd);
        }
    }

    #[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    pub(super) unsafe fn column_zmm(f: IntFormat, w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
        #[inline(always)]
        unsafe fn all(f: IntFormat, w: &[u8], acts: &[Q8Row], out: &mut [f32]) {
            let mut r = 0;
            while r + ZMM_ROWS <= acts.len() {
                rows_zmm::<ZMM_ROWS>(f, w, &acts[r..r + ZMM_ROWS], &mut out[r..r + ZMM_ROWS]);
                r += ZMM_ROWS;
            }
            let (a, o) = (&acts[r..], &mut out[r..]);
            match a.len() {
                0 => {}
                1 => rows_zmm::<1>(f, w, a, o),
                2 => rows_zmm::<2>(f, w, a, o),
                3 => rows_zmm::<3>(f, w, a, o),
                4 => rows_zmm::<4>(f, w, a, o),
                5 => rows_zmm::<5>(f, w, a, o),
                6 => rows_zmm::<6>(f, w, a, o),
                7 => rows_zmm::<7>(f, w, a, o),
                _ => unreachable!("fewer than ZMM_ROWS rows are left"),
            }
        }
        match f {
            IntFormat::Q4_0 => all(IntFormat::Q4_0, w, acts, out),
            IntFormat::Q4_1 => all(IntFormat::Q4_1, w, acts, out),
            IntFormat::Q8_0 => all(IntFormat::Q8_0, w, acts, out),
        }
    }

    /// Activation rows sharing one unpacking of a weight block pair on the 512-bit path.
    const ZMM_ROWS: usize = 8;
}
