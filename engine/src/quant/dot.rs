//! Activation quantization to 8-bit blocks, and the fixed-order f32 dot product.

use super::pack::{act_index, GROUP};

/// Elements per 8-bit activation block.
pub const QK8: usize = 32;

/// One row of activations quantized to 8-bit blocks: `x ≈ d * q`, with `sums = Σq` and `s = d * Σq` per
/// block. The values are in the layout of [`super::pack`] (block after block), padded with zero blocks to
/// whole groups (`d`, `s` and `sums` too); `len` is the unpadded width.
#[derive(Debug, Clone, Default)]
pub struct Q8Row {
    pub len: usize,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub sums: Vec<i32>,
    /// `Σq` of each block's first 16 values (Q6K weights have a scale per 16 values), summed by the
    /// quantizer beside `sums`.
    pub lo_sums: Vec<i32>,
    pub qs: AlignedBytes,
}

/// Bytes on 64-byte boundaries: a 512-bit load of an activation chunk or a weight tile's line never
/// straddles two cache lines (which would cost two loads on the kernels' hottest path).
#[derive(Debug, Clone, Default)]
pub struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; 64]);

impl AlignedBytes {
    /// Makes this `len` zero bytes long, reusing the allocation.
    pub fn reset_zeroed(&mut self, len: usize) {
        self.lines.clear();
        self.lines.resize(len.div_ceil(64), Line([0; 64]));
        self.len = len;
    }
}

impl AlignedBytes {
    /// The bytes as unsigned.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: as in `deref`; u8 and i8 have the same layout.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u8, self.len) }
    }

    /// The bytes as unsigned, mutable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref_mut`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u8, self.len) }
    }
}

impl From<&[u8]> for AlignedBytes {
    fn from(b: &[u8]) -> Self {
        let mut a = AlignedBytes::default();
        a.reset_zeroed(b.len());
        a.bytes_mut().copy_from_slice(b);
        a
    }
}

impl std::ops::Deref for AlignedBytes {
    type Target = [i8];
    fn deref(&self) -> &[i8] {
        // SAFETY: `lines` holds at least `len` initialized bytes (`Line` is plain bytes, no padding).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const i8, self.len) }
    }
}

impl std::ops::DerefMut for AlignedBytes {
    fn deref_mut(&mut self) -> &mut [i8] {
        // SAFETY: as in `deref`, and the borrow is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut i8, self.len) }
    }
}

impl Q8Row {
    /// Quantizes `x` (length a multiple of 32) into 8-bit blocks, one scale per block.
    pub fn quantize(x: &[f32]) -> Self {
        let mut row = Q8Row::default();
        row.quantize_into(x);
        row
    }

    /// As `quantize`, reusing this row's buffers.
    pub fn quantize_into(&mut self, x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") {
            // SAFETY: the CPU has these features. Element-wise the same IEEE operations as the portable
            // build (see `quantize_avx512`), so the same bits.
            return unsafe { self.quantize_avx512(x) };
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2. The same element-wise IEEE operations as the portable build (no
            // fused or reassociated arithmetic), so the bits are the same on every machine.
            return unsafe { self.quantize_avx2(x) };
        }
        self.fill(x)
    }

    /// [`quantize_block`] 32 values at a time on 256-bit vectors: the same steps as
    /// [`Q8Row::quantize_avx512`] (maximum of absolute values ignoring NaN, the same scale and reciprocal,
    /// per value the same multiply, clamp, truncation and half-away-from-zero correction, NaN lanes 0),
    /// with the comparisons' all-ones lanes (-1) subtracted or added as the corrections.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn quantize_avx2(&mut self, x: &[f32]) {
        use std::arch::x86_64::*;
        self.start(x.len());
        let nb = x.len() / QK8;
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        for b in 0..nb {
            let p = x.as_ptr().add(b * QK8);
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
            // max(|v|, m) keeps m where v is NaN, as f32::max does
            let mut m = _mm256_setzero_ps();
            for vi in v {
                m = _mm256_max_ps(_mm256_and_ps(vi, abs), m);
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
            let round = |v: __m256| {
                let x = _mm256_mul_ps(v, id);
                let xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
                let t = _mm256_cvttps_epi32(xc);
                let r = _mm256_sub_ps(xc, _mm256_cvtepi32_ps(t));
                let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(r, _mm256_set1_ps(0.5)));
                let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(r, _mm256_set1_ps(-0.5)));
                let n = _mm256_add_epi32(_mm256_sub_epi32(t, up), down);
                // NaN lanes (unordered with themselves) are 0
                _mm256_and_si256(n, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(x, x)))
            };
            let n: [__m256i; 4] = std::array::from_fn(|i| round(v[i]));
            let hsum = |s8: __m256i| {
                let s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256::<1>(s8));
                let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
                _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)))
            };
            // values 0..16 are n[0] and n[1]
            let lo8 = _mm256_add_epi32(n[0], n[1]);
            let (lo_sum, sum) = (hsum(lo8), hsum(_mm256_add_epi32(lo8, _mm256_add_epi32(n[2], n[3]))));
            // every value is within -128..=127, so the saturating packs keep them; the packs work
            // within 128-bit halves, and the permute puts the 32 bytes back in order
            let w01 = _mm256_packs_epi32(n[0], n[1]);
            let w23 = _mm256_packs_epi32(n[2], n[3]);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(self.qs.as_mut_ptr().add(act_index(b, 0)) as *mut __m256i, bytes);
            self.d.push(d);
            self.s.push(d * sum as f32);
            self.sums.push(sum);
            self.lo_sums.push(lo_sum);
        }
        self.finish();
    }

    /// The portable build (tests compare the SIMD one against it).
    pub fn quantize_portable(x: &[f32]) -> Self {
        let mut row = Q8Row::default();
        row.fill(x);
        row
    }

    /// [`quantize_block`] 32 values at a time: the maximum of absolute values ignoring NaN (`max(|v|, m)`
    /// returns `m` for a NaN `v`, as `f32::max` does), the same scale and reciprocal, then per value the
    /// same multiply, clamp, truncation and half-away-from-zero correction, NaN lanes set to 0.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn quantize_avx512(&mut self, x: &[f32]) {
        use std::arch::x86_64::*;
        self.start(x.len());
        let nb = x.len() / QK8;
        let whole = nb / GROUP * GROUP;
        let (lo, hi) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
        let round = |v: __m512, id: __m512| {
            let x = _mm512_mul_ps(v, id);
            let xc = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
            let t = _mm512_cvttps_epi32(xc);
            let r = _mm512_sub_ps(xc, _mm512_cvtepi32_ps(t));
            // r is exact and within (-1, 1), so 2r is exact and truncates to 1 where r >= 0.5, to -1
            // where r <= -0.5, else to 0: the correction
            let n = _mm512_add_epi32(t, _mm512_cvttps_epi32(_mm512_add_ps(r, r)));
            // NaN lanes (unordered with themselves) are 0
            _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(x, x), n)
        };
        // 16 blocks at a time: their maxima and their sums each reduced in one transpose (block `b` of
        // the 16 taken in turn `TRANSPOSED[b]`, so lane `b` of the result is block `b`'s), and the scales,
        // reciprocals and scaled sums computed in one vector; the maximum of values without NaN (`max(|v|,
        // m)` keeps `m` for a NaN `v`) and an integer sum do not depend on the order, and the rest is the
        // same operations lane by lane
        const TRANSPOSED: [usize; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];
        const _: () = assert!(GROUP == 16, "a group is one register of blocks");
        for g0 in (0..whole).step_by(GROUP) {
            let p = x.as_ptr().add(g0 * QK8);
            let mut m = [_mm512_setzero_ps(); GROUP];
            for (mi, &b) in m.iter_mut().zip(&TRANSPOSED) {
                let (v0, v1) = (_mm512_loadu_ps(p.add(b * QK8)), _mm512_loadu_ps(p.add(b * QK8 + 16)));
                *mi = _mm512_max_ps(_mm512_abs_ps(v1), _mm512_max_ps(_mm512_abs_ps(v0), _mm512_setzero_ps()));
            }
            let d = _mm512_div_ps(transpose_reduce::<true>(m), _mm512_set1_ps(127.0));
            // 1 / d where d != 0.0 (as `!=` in Rust: true for NaN), else 0.0
            let id = _mm512_maskz_div_ps(_mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(d, _mm512_setzero_ps()), _mm512_set1_ps(1.0), d);
            let mut ids = [0f32; GROUP];
            _mm512_storeu_ps(ids.as_mut_ptr(), id);
            let (mut n, mut nlo) = ([_mm512_setzero_ps(); GROUP], [_mm512_setzero_ps(); GROUP]);
            for ((ni, nl), &b) in n.iter_mut().zip(&mut nlo).zip(&TRANSPOSED) {
                let (v0, v1) = (_mm512_loadu_ps(p.add(b * QK8)), _mm512_loadu_ps(p.add(b * QK8 + 16)));
                let idb = _mm512_set1_ps(ids[b]);
                let (n0, n1) = (round(v0, idb), round(v1, idb));
                let q = self.qs.as_mut_ptr().add(act_index(g0 + b, 0));
                _mm_storeu_si128(q as *mut __m128i, _mm512_cvtepi32_epi8(n0));
                _mm_storeu_si128(q.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(n1));
                *ni = _mm512_castsi512_ps(_mm512_add_epi32(n0, n1));
                *nl = _mm512_castsi512_ps(n0);
            }
            let sums = _mm512_castps_si512(transpose_reduce::<false>(n));
            let (mut da, mut sa, mut ia, mut la) = ([0f32; GROUP], [0f32; GROUP], [0i32; GROUP], [0i32; GROUP]);
            _mm512_storeu_si512(la.as_mut_ptr() as *mut _, _mm512_castps_si512(transpose_reduce::<false>(nlo)));
            _mm512_storeu_ps(da.as_mut_ptr(), d);
            _mm512_storeu_ps(sa.as_mut_ptr(), _mm512_mul_ps(d, _mm512_cvtepi32_ps(sums)));
            _mm512_storeu_si512(ia.as_mut_ptr() as *mut _, sums);
            self.d.extend_from_slice(&da);
            self.s.extend_from_slice(&sa);
            self.sums.extend_from_slice(&ia);
            self.lo_sums.extend_from_slice(&la);
        }
        for b in whole..nb {
            let p = x.as_ptr().add(b * QK8);
            let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let m = _mm512_max_ps(_mm512_abs_ps(v1), _mm512_max_ps(_mm512_abs_ps(v0), _mm512_setzero_ps()));
            let amax = _mm512_reduce_max_ps(m);
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let (n0, n1) = (round(v0, id), round(v1, id));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(n0, n1));
            let mut q = [0i32; 8];
            _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(n0));
            _mm_storeu_si128(q.as_mut_ptr().add(4) as *mut __m128i, _mm512_cvtepi32_epi8(n1));
            std::ptr::copy_nonoverlapping(q.as_ptr() as *const i8, self.qs.as_mut_ptr().add(act_index(b, 0)), QK8);
            self.d.push(d);
            self.s.push(d * sum as f32);
            self.sums.push(sum);
            self.lo_sums.push(_mm512_reduce_add_epi32(n0));
        }
        self.finish();
    }

    /// Clears the row for `len` values: every buffer empty, the values zeroed to whole groups.
    fn start(&mut self, len: usize) {
        assert_eq!(len % QK8, 0);
        let padded = (len / QK8).div_ceil(GROUP) * GROUP;
        self.len = len;
        // (room for the padded blocks at once: no growing as the blocks are pushed)
        for v in [&mut self.d, &mut self.s] {
            v.clear();
            v.reserve(padded);
        }
        for v in [&mut self.sums, &mut self.lo_sums] {
            v.clear();
            v.reserve(padded);
        }
        self.qs.reset_zeroed(padded * QK8);
    }

    /// Pads the per-block values with zero blocks to whole groups.
    fn finish(&mut self) {
        let padded = self.blocks().div_ceil(GROUP) * GROUP;
        self.d.resize(padded, 0.0);
        self.s.resize(padded, 0.0);
        self.sums.resize(padded, 0);
        self.lo_sums.resize(padded, 0);
    }

    #[inline(always)]
    fn fill(&mut self, x: &[f32]) {
        self.start(x.len());
        let mut q = [0i8; QK8];
        for (b, blk) in x.chunks_exact(QK8).enumerate() {
            let (d, sum) = quantize_block(blk.try_into().expect("32 values"), &mut q);
            let at = act_index(b, 0);
            self.qs[at..at + QK8].copy_from_slice(&q);
            self.d.push(d);
            self.s.push(d * sum as f32);
            self.sums.push(sum);
            self.lo_sums.push(q[..16].iter().map(|&v| v as i32).sum());
        }
        self.finish();
    }

    /// Number of (unpadded) blocks.
    pub fn blocks(&self) -> usize {
        self.len / QK8
    }

    /// Value `j` of block `b`.
    #[inline(always)]
    pub fn value(&self, b: usize, j: usize) -> i8 {
        self.qs[act_index(b, j)]
    }
}

/// Lane `i` of the result: the maximum (`MAX`) or the 32-bit integer sum of the 16 lanes of `a[j]`, where
/// `j` is `i`'s place in `[0, 4, 8, 12, 1, 5, ..., 15]` (the lanes come out 4x4-transposed), reduced in
/// halves, quarters, pairs and single lanes of the registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose_reduce<const MAX: bool>(a: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let op = |x: __m512, y: __m512| {
        if MAX {
            _mm512_max_ps(x, y)
        } else {
            _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(x), _mm512_castps_si512(y)))
        }
    };
    let h: [__m512; 8] = std::array::from_fn(|i| {
        op(_mm512_shuffle_f32x4::<0b01_00_01_00>(a[2 * i], a[2 * i + 1]), _mm512_shuffle_f32x4::<0b11_10_11_10>(a[2 * i], a[2 * i + 1]))
    });
    let q: [__m512; 4] = std::array::from_fn(|i| {
        op(_mm512_shuffle_f32x4::<0b10_00_10_00>(h[2 * i], h[2 * i + 1]), _mm512_shuffle_f32x4::<0b11_01_11_01>(h[2 * i], h[2 * i + 1]))
    });
    let p: [__m512; 2] = std::array::from_fn(|i| {
        let (x, y) = (_mm512_castps_pd(q[2 * i]), _mm512_castps_pd(q[2 * i + 1]));
        op(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)))
    });
    op(_mm512_shuffle_ps::<0b10_00_10_00>(p[0], p[1]), _mm512_shuffle_ps::<0b11_01_11_01>(p[0], p[1]))
}

/// One block: `d = max|x| / 127`, `q = round(x * (1/d))` (halves away from zero), returns `(d, Σq)`.
/// Written so the compiler can vectorize it: the maximum in 8 lanes (exact in any order) and the rounding
/// as truncation plus a correction (exact for these magnitudes; NaN gives 0 as `f32::round` would).
#[inline(always)]
fn quantize_block(blk: &[f32; QK8], q: &mut [i8; QK8]) -> (f32, i32) {
    let mut m = [0f32; 8];
    for c in blk.chunks_exact(8) {
        for l in 0..8 {
            m[l] = m[l].max(c[l].abs());
        }
    }
    let amax = m.iter().fold(0f32, |a, &v| a.max(v));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(blk) {
        // clamped first: the same result for every finite value, and an infinite one (a subnormal
        // scale's reciprocal) saturates instead of overflowing the correction below
        let x = (v * id).clamp(-128.0, 127.0);
        let t = x as i32;
        let r = x - t as f32;
        let n = (t + (r >= 0.5) as i32 - (r <= -0.5) as i32).clamp(-128, 127);
        *o = n as i8;
        sum += n;
    }
    (d, sum)
}

/// Fixed-order f32 dot product (8 interleaved partial sums, combined in a fixed tree).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut p = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            p[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ta.iter().zip(tb) {
        tail += x * y;
    }
    ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7])) + tail
}

/// [`dot_f32`] of every weight row of `ws` with every activation row of `xs` (rows of `k` values), each
/// result given to `put(activation row, weight row, value)`: the same bits as one [`dot_f32`] each, with
/// several rows' partial sums in flight at once where the CPU has AVX (each weight chunk loaded once
/// for two activation rows, and eight independent sums instead of one dependent chain).
pub fn dots_f32(ws: &[f32], xs: &[f32], k: usize, mut put: impl FnMut(usize, usize, f32)) {
    assert!(k > 0 && ws.len().is_multiple_of(k) && xs.len().is_multiple_of(k), "rows of {k} values");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx") && is_x86_feature_detected!("sse3") {
        // SAFETY: the CPU has AVX and SSE3 (checked above)
        return unsafe { dots_f32_avx(ws, xs, k, &mut put) };
    }
    for (i, x) in xs.chunks_exact(k).enumerate() {
        for (j, w) in ws.chunks_exact(k).enumerate() {
            put(i, j, dot_f32(w, x));
        }
    }
}

/// [`dots_f32`] on 256-bit vectors: up to [`DOT_ROWS`] activation rows against up to [`DOT_COLS`] weight
/// rows per pass, lane `l` of each accumulator being partial sum `l` of that pair's [`dot_f32`].
///
/// # Safety
/// The CPU has AVX and SSE3.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,sse3")]
unsafe fn dots_f32_avx(ws: &[f32], xs: &[f32], k: usize, put: &mut impl FnMut(usize, usize, f32)) {
    let (n, m) = (ws.len() / k, xs.len() / k);
    for i0 in (0..m).step_by(DOT_ROWS) {
        for j0 in (0..n).step_by(DOT_COLS) {
            match ((m - i0).min(DOT_ROWS), (n - j0).min(DOT_COLS)) {
                (1, 1) => dots_pass::<1, 1>(ws, xs, k, i0, j0, put),
                (1, 2) => dots_pass::<1, 2>(ws, xs, k, i0, j0, put),
                (1, 3) => dots_pass::<1, 3>(ws, xs, k, i0, j0, put),
                (1, _) => dots_pass::<1, DOT_COLS>(ws, xs, k, i0, j0, put),
                (_, 1) => dots_pass::<DOT_ROWS, 1>(ws, xs, k, i0, j0, put),
                (_, 2) => dots_pass::<DOT_ROWS, 2>(ws, xs, k, i0, j0, put),
                (_, 3) => dots_pass::<DOT_ROWS, 3>(ws, xs, k, i0, j0, put),
                _ => dots_pass::<DOT_ROWS, DOT_COLS>(ws, xs, k, i0, j0, put),
            }
        }
    }
}

/// Activation rows of one pass of [`dots_f32_avx`].
#[cfg(target_arch = "x86_64")]
const DOT_ROWS: usize = 2;

/// Weight rows of one pass of [`dots_f32_avx`] (with [`DOT_ROWS`], 8 accumulators, 4 weight chunks and an
/// activation chunk: 13 of the 16 registers).
#[cfg(target_arch = "x86_64")]
const DOT_COLS: usize = 4;

/// Activation rows `i0..i0 + R` against weight rows `j0..j0 + C`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,sse3")]
#[inline]
unsafe fn dots_pass<const R: usize, const C: usize>(ws: &[f32], xs: &[f32], k: usize, i0: usize, j0: usize, put: &mut impl FnMut(usize, usize, f32)) {
    use std::arch::x86_64::*;
    let n8 = k / 8 * 8;
    let w: [*const f32; C] = std::array::from_fn(|c| ws[(j0 + c) * k..].as_ptr());
    let x: [*const f32; R] = std::array::from_fn(|r| xs[(i0 + r) * k..].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut at = 0;
    while at < n8 {
        let wv: [__m256; C] = std::array::from_fn(|c| _mm256_loadu_ps(w[c].add(at)));
        for r in 0..R {
            let xv = _mm256_loadu_ps(x[r].add(at));
            for c in 0..C {
                acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_mul_ps(wv[c], xv));
            }
        }
        at += 8;
    }
    for r in 0..R {
        for c in 0..C {
            let mut tail = 0f32;
            for t in n8..k {
                tail += *w[c].add(t) * *x[r].add(t);
            }
            put(i0 + r, j0 + c, sum_lanes(acc[r][c]) + tail);
        }
    }
}

/// The 8 partial sums of [`dot_f32`] in its fixed tree: `[p0+p4, p1+p5, p2+p6, p3+p7]`, then
/// `(s0+s1) + (s2+s3)`.
///
/// # Safety
/// The CPU has AVX and SSE3.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,sse3")]
#[inline]
pub unsafe fn sum_lanes(p: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(p), _mm256_extractf128_ps::<1>(p));
    let h = _mm_hadd_ps(s, s);
    _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
}
