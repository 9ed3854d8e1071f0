//! The AVX2 kernel: 8 weight rows (half a tile) side by side in the lanes of each 256-bit register.
//!
//! The same scheme as [`super::vnni`] on half the width, with `maddubs` + `madd` for the integer block
//! sums: a register holds one 4-value chunk of one block for 8 weight rows, multiplied by that chunk of
//! an activation block broadcast to every lane. Q4 nibbles (0..15) against 8-bit activations keep every
//! partial sum of a block within i16 (`8 * 2 * 15 * 128`), so a block's 8 chunks add up in i16 before one
//! `madd`; Q8_0 moves each weight's sign onto the activation (`maddubs` takes one unsigned operand) and
//! widens every chunk. A pass takes the tile's blocks in order (the weights stream in memory order, and
//! each block's share of the tile [`PREFETCH`] bytes ahead is prefetched as it goes), each block into
//! lane `b % 16` of its row's and half's 16 lane accumulators (in memory: they would not fit in
//! registers), which then reduce in the canonical order: the scalar reference's bits. Twelve or more
//! rows go to the kernel of prepared tiles instead ([`prepared`]). Results are stored whole where a half
//! tile has all 8 columns, masked only in a matrix's last, partial tile ([`Keep`]).
//!
//! No L2 prefetch further ahead, as [`super::vnni`] has: on the Zen 3 host it made single-stream decode
//! slower at every distance tried, 0.86-0.96x at 16-48 KiB (BENCHMARKS.md, 2026-12-08).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::dot::Q8Row;
use super::pack::{self, GROUP, TILE};
use super::simd::{IntFormat, Out};
use super::wtile::{self, PREFETCH};

/// Activation rows multiplied together by one pass over a tile.
const ROWS: usize = 6;

/// Fewest activation rows that go to the kernel of prepared tiles ([`prepared`]): with fewer, unpacking
/// every tile once more than [`pass`] does costs more than it saves. On the Zen 3 host, one thread, with
/// the weights streaming from memory as in a model's step (Q4_1 1536x576 and Q8_0, both paths
/// interleaved in one process, 9 rounds): 8 rows 5-9% slower through the prepared tiles, 12 rows 2-8%
/// faster, 16 rows 2-9% faster (with the weights in cache, an earlier session found 4 rows 0.7x, 12-16
/// even). Two threads running batched decode take about 16 sequences each ([`crate::shard`]'s sequence
/// groups), fewer on a slower core.
const PREP_MIN_ROWS: usize = 12;

/// `w_j · acts[i]` into `out` for the `n` weight rows `w_j` held by the tiles `w` (`rb` bytes per row,
/// format `f`) and every activation row, as [`super::simd::tile`] does.
///
/// # Safety
/// The CPU has AVX2 and F16C; `w` holds `n.div_ceil(16)` tiles; `out` covers `n` columns of
/// `acts.len()` rows that only this call writes.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn tile(f: IntFormat, w: &[u8], rb: usize, n: usize, acts: &[Q8Row], out: Out) {
    match f {
        IntFormat::Q4_0 => tiles_as::<{ IntFormat::Q4_0 as u8 }>(w, rb, n, acts, out),
        IntFormat::Q4_1 => tiles_as::<{ IntFormat::Q4_1 as u8 }>(w, rb, n, acts, out),
        IntFormat::Q8_0 => tiles_as::<{ IntFormat::Q8_0 as u8 }>(w, rb, n, acts, out),
        IntFormat::Q4K => tiles_as::<{ IntFormat::Q4K as u8 }>(w, rb, n, acts, out),
        IntFormat::Q6K => tiles_as::<{ IntFormat::Q6K as u8 }>(w, rb, n, acts, out),
        IntFormat::Q5 => tiles_as::<{ IntFormat::Q5 as u8 }>(w, rb, n, acts, out),
    }
}

/// The kernel for format `F` (`IntFormat as u8`). The format is a const parameter here and in
/// [`prepared`], not an argument: with it an argument, once the prepared tiles unpacked Q5's fifth bits
/// LLVM compiled the prepared kernel once for all formats, testing the format at run time in every
/// term (`avx2::tile` grew from 212 to 370 KB, and `Q5_K_M` prefill on the AVX2 level was 7% slower).
#[inline(always)]
unsafe fn tiles_as<const F: u8>(w: &[u8], rb: usize, n: usize, acts: &[Q8Row], out: Out) {
    let f = IntFormat::from_id(F);
    let (nb, m, tb) = (rb / f.block_bytes(), acts.len(), TILE * rb);
    // (Q6K: every row count through the passes; the prepared tiles hold one scale per block)
    if m >= PREP_MIN_ROWS && f != IntFormat::Q6K {
        return prepared::tiles::<F>(w, rb, n, acts, out);
    }
    let ahead = PREFETCH.max(tb);
    // the first weights, which no earlier tile prefetched
    wtile::prefetch(w.as_ptr(), w.len().min(ahead));
    for j0 in (0..n).step_by(TILE) {
        let tile = w.as_ptr().add(j0 / TILE * tb);
        let keep = [Keep::new(n - j0, 0), Keep::new(n - j0, 1)];
        let at = |r: usize| out.offset(r, j0);
        // the first pass over the tile prefetches, block by block, the weights `ahead` bytes on
        let pf = |r: usize| if r == 0 { tile.wrapping_add(ahead) } else { std::ptr::null() };
        let mut r = 0;
        while r < m {
            match m - r {
                1 => pass::<1>(f, tile, nb, &acts[r..r + 1], at(r), keep, pf(r)),
                2 => pass::<2>(f, tile, nb, &acts[r..r + 2], at(r), keep, pf(r)),
                3 => pass::<3>(f, tile, nb, &acts[r..r + 3], at(r), keep, pf(r)),
                4 => pass::<4>(f, tile, nb, &acts[r..r + 4], at(r), keep, pf(r)),
                5 => pass::<5>(f, tile, nb, &acts[r..r + 5], at(r), keep, pf(r)),
                _ => pass::<ROWS>(f, tile, nb, &acts[r..r + ROWS], at(r), keep, pf(r)),
            }
            r += ROWS;
        }
    }
}

/// `R` activation rows against a tile, its blocks in order: block `b` adds to lane `b % 16` of each
/// row's and half's accumulators (kept in memory: 16 lanes would not fit in registers), which then
/// reduce in the canonical order; the results of row `r` go to `out.row(r)`, the lanes in `keep`.
/// Unless `ahead` is null, each block also prefetches its share of the tile there.
#[inline(always)]
unsafe fn pass<const R: usize>(f: IntFormat, tile: *const u8, nb: usize, acts: &[Q8Row], out: Out, keep: [Keep; 2], ahead: *const u8) {
    // Not zeroed up front: a lane's first block adds its term to 0.0 (the same bits as an add to a
    // zeroed lane) instead. Zeroing the array (1-6 KiB) was a `memset` per pass: 4.6% of two-thread
    // decode's samples on the Zen 1 host (BENCHMARKS.md, 2026-12-05, second session).
    assert_eq!(acts.len(), R, "a pass takes R rows");
    let mut acc = MaybeUninit::<[[[__m256; GROUP]; 2]; R]>::uninit();
    let base = acc.as_mut_ptr() as *mut __m256;
    let lane = |r: usize, h: usize, l: usize| base.add((r * 2 + h) * GROUP + l);
    let share = TILE * f.block_bytes();
    let zero = _mm256_setzero_ps();
    for b in 0..nb {
        let l = b % GROUP;
        if !ahead.is_null() {
            wtile::prefetch(ahead.wrapping_add(b * share), share);
        }
        for h in 0..2 {
            let blk = Half { f, p: tile, nb, h }.block(b);
            for (r, x) in acts.iter().enumerate().take(R) {
                let a = lane(r, h, l);
                let sum = if b < GROUP { zero } else { *a };
                *a = _mm256_add_ps(sum, term(f, &blk, x, b));
            }
        }
    }
    // lanes without blocks (rows under 16 blocks) are 0.0
    for r in 0..R {
        for h in 0..2 {
            for l in nb..GROUP {
                *lane(r, h, l) = zero;
            }
        }
    }
    // a reference: `assume_init` moved the array, a 4-6 KiB `memcpy` per pass of 4-6 rows
    let acc = acc.assume_init_ref();
    for (r, acc) in acc.iter().enumerate() {
        for (h, a) in acc.iter().enumerate() {
            let hs: [__m256; 8] = std::array::from_fn(|i| _mm256_add_ps(a[i], a[i + 8]));
            let v = _mm256_add_ps(
                _mm256_add_ps(_mm256_add_ps(hs[0], hs[4]), _mm256_add_ps(hs[2], hs[6])),
                _mm256_add_ps(_mm256_add_ps(hs[1], hs[5]), _mm256_add_ps(hs[3], hs[7])),
            );
            keep[h].store(out.row(r).add(8 * h), v);
        }
    }
}

/// Which of a half tile's 8 columns a matrix has (its last tile may be partial).
#[derive(Clone, Copy)]
struct Keep {
    mask: __m256i,
    full: bool,
}

impl Keep {
    /// Half `h` of a tile whose first column has `cols` columns from it on in the matrix.
    #[inline(always)]
    unsafe fn new(cols: usize, h: usize) -> Self {
        let c = cols.saturating_sub(8 * h).min(8);
        Keep { mask: _mm256_cmpgt_epi32(_mm256_set1_epi32(c as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), full: c == 8 }
    }

    /// Writes the lanes of `v` whose columns exist to `p`: a plain store when all do. A masked store is
    /// microcoded on AMD's cores: on the Zen 3 host 14% of the prepared kernel's samples fell just after
    /// one, and plain stores made its 32-row matmuls 1-10% faster (BENCHMARKS.md, 2026-12-04).
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m256) {
        if self.full {
            _mm256_storeu_ps(p, v)
        } else {
            _mm256_maskstore_ps(p, self.mask, v)
        }
    }
}

/// Rows `8h..8h + 8` of a packed tile.
struct Half {
    f: IntFormat,
    p: *const u8,
    nb: usize,
    h: usize,
}

/// One block of a half tile: 8 registers of unsigned bytes (Q4 nibbles; Q8_0 magnitudes, with the
/// signed values at `signs`), the scales and (Q4_1) minimums.
struct Block {
    w: [__m256i; 8],
    signs: *const u8,
    dw: __m256,
    mw: __m256,
}

impl Half {
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> Block {
        let (f, nb) = (self.f, self.nb);
        let v = self.p.add(pack::values_at(f, b) + 32 * self.h);
        let mut w = [_mm256_setzero_si256(); 8];
        match f {
            IntFormat::Q4_0 | IntFormat::Q4_1 | IntFormat::Q4K => {
                let low = _mm256_set1_epi8(0x0F);
                for c in 0..4 {
                    let x = _mm256_loadu_si256(v.add(64 * c) as *const __m256i);
                    w[c] = _mm256_and_si256(x, low);
                    w[c + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(x), low);
                }
            }
            IntFormat::Q8_0 => {
                for (k, wk) in w.iter_mut().enumerate() {
                    let x = _mm256_loadu_si256(v.add(64 * k) as *const __m256i);
                    *wk = _mm256_sign_epi8(x, x);
                }
            }
            IntFormat::Q6K => {
                for (k, wk) in w.iter_mut().enumerate() {
                    *wk = _mm256_loadu_si256(v.add(64 * k) as *const __m256i);
                }
            }
            IntFormat::Q5 => w = q5_chunks(v),
        }
        let half = 8 * pack::scale_bytes(f) * self.h;
        let dw = scales8(f, self.p.add(pack::scales_at(f, nb, b) + half));
        let mw = if f.two_scales() { scales8(f, self.p.add(pack::minimums_at(f, nb, b) + half)) } else { _mm256_setzero_ps() };
        Block { w, signs: v, dw, mw }
    }
}

/// The 8 value chunks of half a tile's Q5 block whose lines start at `v`: the nibbles with their fifth
/// bits at bit 4 ([`pack`]'s Q5 lines; 16-bit shifts move no bit from one byte to bit 4 of another).
#[inline(always)]
unsafe fn q5_chunks(v: *const u8) -> [__m256i; 8] {
    let (low, five) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
    // (macros and a loop, not closures: a closure does not inherit the target features)
    let mut x = [_mm256_setzero_si256(); 5];
    for (k, xk) in x.iter_mut().enumerate() {
        *xk = _mm256_loadu_si256(v.add(64 * k) as *const __m256i);
    }
    macro_rules! put {
        ($nibbles:expr, $bits:expr) => {
            _mm256_or_si256(_mm256_and_si256($nibbles, low), _mm256_and_si256($bits, five))
        };
    }
    [
        put!(x[0], _mm256_slli_epi16::<4>(x[4])),
        put!(x[1], _mm256_slli_epi16::<3>(x[4])),
        put!(x[2], _mm256_slli_epi16::<2>(x[4])),
        put!(x[3], _mm256_slli_epi16::<1>(x[4])),
        put!(_mm256_srli_epi16::<4>(x[0]), x[4]),
        put!(_mm256_srli_epi16::<4>(x[1]), _mm256_srli_epi16::<1>(x[4])),
        put!(_mm256_srli_epi16::<4>(x[2]), _mm256_srli_epi16::<2>(x[4])),
        put!(_mm256_srli_epi16::<4>(x[3]), _mm256_srli_epi16::<3>(x[4])),
    ]
}

/// The 8 scales (or minimums) at `p`: f16, Q4K's, Q6K's and Q5's f32.
#[inline(always)]
unsafe fn scales8(f: IntFormat, p: *const u8) -> __m256 {
    if pack::scale_bytes(f) == 4 {
        _mm256_loadu_ps(p as *const f32)
    } else {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// One block's term of the canonical sum for the half tile's 8 weight rows and activation row `x`.
#[inline(always)]
unsafe fn term(f: IntFormat, blk: &Block, x: &Q8Row, b: usize) -> __m256 {
    let ones = _mm256_set1_epi16(1);
    let a = x.qs.as_ptr().add(pack::act_index(b, 0));
    let chunk = |k: usize| (a.add(4 * k) as *const i32).read_unaligned();
    let mut p = match f {
        IntFormat::Q4_0 | IntFormat::Q4_1 | IntFormat::Q4K | IntFormat::Q5 => {
            let mut s0 = _mm256_maddubs_epi16(blk.w[0], _mm256_set1_epi32(chunk(0)));
            let mut s1 = _mm256_maddubs_epi16(blk.w[1], _mm256_set1_epi32(chunk(1)));
            for k in (2..8).step_by(2) {
                s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(blk.w[k], _mm256_set1_epi32(chunk(k))));
                s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(blk.w[k + 1], _mm256_set1_epi32(chunk(k + 1))));
            }
            if f == IntFormat::Q5 {
                // unsigned 5-bit weights: a chunk's pairs at most 2 * 31 * 128, four chunks' (31744) in
                // i16 but not eight: the two sums of four widened apart
                _mm256_add_epi32(_mm256_madd_epi16(s0, ones), _mm256_madd_epi16(s1, ones))
            } else {
                _mm256_madd_epi16(_mm256_add_epi16(s0, s1), ones)
            }
        }
        IntFormat::Q8_0 => {
            let mut p = _mm256_setzero_si256();
            for k in 0..8 {
                let sg = _mm256_loadu_si256(blk.signs.add(64 * k) as *const __m256i);
                let ak = _mm256_sign_epi8(_mm256_set1_epi32(chunk(k)), sg);
                p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_maddubs_epi16(blk.w[k], ak), ones));
            }
            p
        }
        IntFormat::Q6K => {
            // unsigned 6-bit weights: a chunk's pairs at most 2 * 63 * 128, two chunks' in i16; each
            // half's sum on its own (chunks 0..4 are values 0..16), less 32 x its activations' sum
            // (macros, not closures: a closure does not inherit the target features)
            macro_rules! pair {
                ($k:expr) => {
                    _mm256_madd_epi16(
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(blk.w[$k], _mm256_set1_epi32(chunk($k))),
                            _mm256_maddubs_epi16(blk.w[$k + 1], _mm256_set1_epi32(chunk($k + 1))),
                        ),
                        ones,
                    )
                };
            }
            let lo = *x.lo_sums.get_unchecked(b);
            let plo = _mm256_sub_epi32(_mm256_add_epi32(pair!(0), pair!(2)), _mm256_set1_epi32(lo << 5));
            let phi = _mm256_sub_epi32(_mm256_add_epi32(pair!(4), pair!(6)), _mm256_set1_epi32((*x.sums.get_unchecked(b) - lo) << 5));
            let da = _mm256_set1_ps(*x.d.get_unchecked(b));
            let tlo = _mm256_mul_ps(_mm256_mul_ps(blk.dw, da), _mm256_cvtepi32_ps(plo));
            return _mm256_add_ps(tlo, _mm256_mul_ps(_mm256_mul_ps(blk.mw, da), _mm256_cvtepi32_ps(phi)));
        }
    };
    if f == IntFormat::Q4_0 {
        // the nibbles were taken unsigned: subtract 8 x the activation block's sum
        p = _mm256_sub_epi32(p, _mm256_set1_epi32(*x.sums.get_unchecked(b) << 3));
    }
    let mut term = _mm256_mul_ps(_mm256_mul_ps(blk.dw, _mm256_set1_ps(*x.d.get_unchecked(b))), _mm256_cvtepi32_ps(p));
    if f.has_min() {
        term = _mm256_add_ps(term, _mm256_mul_ps(blk.mw, _mm256_set1_ps(*x.s.get_unchecked(b))));
    }
    term
}

/// The kernel for [`PREP_MIN_ROWS`] or more activation rows: each pair of tiles is first unpacked into
/// a buffer (Q4 nibbles as bytes, Q8_0 magnitudes beside the signed values, Q5 nibbles and fifth bits as bytes,
/// scales and minimums as f32, [`prepared::prep`]); then, for one activation row at a time, each of its
/// 4-value chunks is broadcast once and multiplied by the four half tiles' weights, read from the buffer
/// as `maddubs` needs them. A row's lane accumulators per half tile are taken one lane after another (blocks `l`,
/// `l + 16`, ... in order), so each stays in a register until its last block, in four groups of four
/// lanes that each give one term of the canonical reduction. Against [`pass`] this saves unpacking
/// each block's nibbles once per pass, three of four broadcasts per term, and the accumulators' trips
/// through memory (and the memset that cleared them). For the Q4 formats the activations are offset by
/// 128 once per call (unsigned, `maddubs`' first operand) and the nibbles are its second, the one
/// operand `maddubs` can read from memory: the weights' loads fold into the multiplies (a load and an
/// instruction less per chunk and half tile), at the cost of one subtraction of a bias the unpacking
/// stores ([`prepared::prep`]); on the Zen 3 host kind Q4_1 matmuls of 32 rows took 5-13% less time
/// this way (BENCHMARKS.md, 2026-12-04, second session). On that host `maddubs`, `madd` and the float
/// multiplies share two pipes (`scripts/host-probe.c`: 2 per cycle in all): the 8 `maddubs`, one
/// `madd` and three `mulps` of a Q4_1 block, half tile and row need 6 cycles there, and the whole term
/// (with the 7 `paddw`, the conversion, two adds and the loads) took 3.0-3.4 ns (7.4-8.4 cycles) in an
/// ideal loop on data in the first-level cache, this kernel 3.5-4.0 ns before that change (BENCHMARKS.md,
/// 2026-12-04). The integer sums are exact in any order, so the bits are the scalar reference's.
mod prepared {
    use super::*;

    /// 32 bytes on a 32-byte boundary.
    #[derive(Clone, Copy)]
    #[repr(C, align(32))]
    pub struct Y([u8; 32]);

    /// Lines per (block, half tile): the 8 value chunks (Q8_0: 8 magnitudes, then 8 signed), the
    /// scales, (Q4_1, Q4K, Q5) the minimums and (Q4 formats) the bias line ([`bias`]).
    #[inline(always)]
    pub fn stride(f: IntFormat) -> usize {
        match f {
            IntFormat::Q4_0 => 10,
            IntFormat::Q4_1 | IntFormat::Q4K => 11,
            IntFormat::Q8_0 => 17,
            IntFormat::Q5 => 10,
            IntFormat::Q6K => unreachable!("Q6K takes the pass kernel"),
        }
    }

    /// Line of a Q4 (block, half) entry's bias: per 16-bit lane of a `maddubs` product, 128 times the
    /// sum of the two nibbles it takes, over the block's 8 chunks (at most `8 * 128 * 30`): what
    /// offsetting the activations by 128 adds to the lane's sum ([`lane`]).
    #[inline(always)]
    fn bias(f: IntFormat) -> usize {
        if f.has_min() {
            10
        } else {
            9
        }
    }

    /// Line of the scales in a (block, half) entry.
    #[inline(always)]
    fn scales(f: IntFormat) -> usize {
        if f == IntFormat::Q8_0 {
            16
        } else {
            8
        }
    }

    /// Unpacks one packed tile (rows of `nb` blocks) into `dst`: entry `(b, h)` at line `(2b + h) *
    /// stride(f)`.
    #[inline(always)]
    pub unsafe fn prep<const F: u8>(tile: *const u8, nb: usize, dst: *mut Y) {
        let f = IntFormat::from_id(F);
        let low = _mm256_set1_epi8(0x0F);
        let st = stride(f);
        for b in 0..nb {
            for h in 0..2 {
                let v = tile.add(pack::values_at(f, b) + 32 * h);
                let o = dst.add((2 * b + h) * st) as *mut __m256i;
                match f {
                    IntFormat::Q4_0 | IntFormat::Q4_1 | IntFormat::Q4K => {
                        // each byte's 8 nibbles summed (at most 120), then 128 (unsigned) times each
                        // pair of those sums
                        let mut sum = _mm256_setzero_si256();
                        for c in 0..4 {
                            let x = _mm256_loadu_si256(v.add(64 * c) as *const __m256i);
                            let (lo, hi) = (_mm256_and_si256(x, low), _mm256_and_si256(_mm256_srli_epi16::<4>(x), low));
                            _mm256_store_si256(o.add(c), lo);
                            _mm256_store_si256(o.add(c + 4), hi);
                            sum = _mm256_add_epi8(sum, _mm256_add_epi8(lo, hi));
                        }
                        _mm256_store_si256(o.add(self::bias(f)), _mm256_maddubs_epi16(_mm256_set1_epi8(-128), sum));
                    }
                    IntFormat::Q8_0 => {
                        for k in 0..8 {
                            let x = _mm256_loadu_si256(v.add(64 * k) as *const __m256i);
                            _mm256_store_si256(o.add(k), _mm256_sign_epi8(x, x));
                            _mm256_store_si256(o.add(8 + k), x);
                        }
                    }
                    IntFormat::Q5 => {
                        for (k, wk) in q5_chunks(v).into_iter().enumerate() {
                            _mm256_store_si256(o.add(k), wk);
                        }
                    }
                    IntFormat::Q6K => unreachable!("Q6K takes the pass kernel"),
                }
                let half = 8 * pack::scale_bytes(f) * h;
                let sc = o.add(scales(f)) as *mut f32;
                _mm256_store_ps(sc, scales8(f, tile.add(pack::scales_at(f, nb, b) + half)));
                if f.has_min() {
                    _mm256_store_ps(sc.add(8), scales8(f, tile.add(pack::minimums_at(f, nb, b) + half)));
                }
            }
        }
    }

    /// As [`super::tiles_as`], through prepared pairs of tiles.
    #[inline(always)]
    pub unsafe fn tiles<const F: u8>(w: &[u8], rb: usize, n: usize, acts: &[Q8Row], out: Out) {
        let f = IntFormat::from_id(F);
        let (nb, tb) = (rb / f.block_bytes(), TILE * rb);
        let per_tile = 2 * nb * stride(f);
        let mut buf: Vec<Y> = Vec::with_capacity(2 * per_tile);
        let mut part: Vec<Partial> = vec![[[_mm256_setzero_ps(); 4]; 2]; acts.len()];
        let dst = buf.as_mut_ptr();
        // Q4 formats: every row's activations offset by 128, `nb * 32` bytes a row ([`lane`])
        let mut flipped: Vec<Y> = Vec::new();
        if f.nibbles() {
            flipped.reserve_exact(acts.len() * nb);
            let top = _mm256_set1_epi8(i8::MIN);
            for x in acts {
                for b in 0..nb {
                    let v = _mm256_loadu_si256(x.qs.as_ptr().add(pack::act_index(b, 0)) as *const __m256i);
                    let mut y = Y([0; 32]);
                    _mm256_store_si256(y.0.as_mut_ptr() as *mut __m256i, _mm256_xor_si256(v, top));
                    flipped.push(y);
                }
            }
        }
        let flip = if flipped.is_empty() { std::ptr::null() } else { flipped.as_ptr() as *const i8 };
        let tiles = n.div_ceil(TILE);
        wtile::prefetch(w.as_ptr(), w.len().min(2 * tb));
        let mut t = 0;
        while t < tiles {
            let pair = (tiles - t).min(2);
            let j0 = t * TILE;
            for i in 0..pair {
                prep::<F>(w.as_ptr().add((t + i) * tb), nb, dst.add(i * per_tile));
            }
            // the next pair's weights, a few lines per activation row
            let next = &w[((t + pair) * tb).min(w.len())..((t + pair + 2) * tb).min(w.len())];
            let pf = wtile::Prefetch::new(next, 4 * acts.len());
            wtile::some_ahead(pair * acts.len());
            let keep = |h: usize| Keep::new(n - j0, h);
            let half = |h: usize| dst.add((h / 2) * per_tile + (h % 2) * stride(f)) as *const Y;
            let at = out.offset(0, j0);
            if pair == 2 {
                rows::<F, 4>([half(0), half(1), half(2), half(3)], nb, acts, flip, &mut part, at, [keep(0), keep(1), keep(2), keep(3)], &pf);
            } else {
                rows::<F, 2>([half(0), half(1)], nb, acts, flip, &mut part, at, [keep(0), keep(1)], &pf);
            }
            t += pair;
        }
    }

    /// Largest prepared data of the `H` half tiles together (bytes) taken row after row rather than lane
    /// group after lane group: a pair of Q4_1 tiles of 18-block rows (the model's 576-wide inputs, 24.75
    /// KiB with the bias lines) stays in row order, as before the bias lines (either order measured the
    /// same for it on the Zen 3 host).
    const ROW_ORDER_MAX_BYTES: usize = 26 << 10;

    /// A row's partial sums between lane groups, per half tile (the first `H` of 4): `(h0+h4)+(h2+h6)`,
    /// then `h1+h5` (one buffer per call, for every row).
    type Partial = [[__m256; 4]; 2];

    /// The lanes of the canonical reduction in the order [`rows`] takes them: group `g` gives one term
    /// of `((h0+h4)+(h2+h6)) + ((h1+h5)+(h3+h7))` (`h_i` = lanes `i` and `i + 8`).
    const GROUPS: [[usize; 4]; 4] = [[0, 8, 4, 12], [2, 10, 6, 14], [1, 9, 5, 13], [3, 11, 7, 15]];

    /// Every activation row against `H` prepared half tiles (`halves[h]` points at its block 0; half
    /// `h`'s results go to columns `8h..8h + 8`, the lanes in `keep[h]`). The 16 lanes are taken in
    /// four groups of four ([`GROUPS`]). Up to [`ROW_ORDER_MAX_BYTES`] of prepared data, a row's four
    /// groups go one after another; above it, every row's group goes before the next group, so the
    /// weights of a group's blocks stay in the first-level cache across the rows (a pair of Q4_1 tiles of
    /// 48-block rows is 66 KiB). Each row keeps two partial sums per half between groups. Unless `flip` is
    /// null, row `r`'s values are read from `flip + r * nb * 32` (the Q4 formats' offset activations).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn rows<const F: u8, const H: usize>(
        halves: [*const Y; H],
        nb: usize,
        acts: &[Q8Row],
        flip: *const i8,
        part: &mut [Partial],
        out: Out,
        keep: [Keep; H],
        pf: &wtile::Prefetch,
    ) {
        let f = IntFormat::from_id(F);
        let qs = |r: usize| if flip.is_null() { acts[r].qs.as_ptr() } else { flip.add(r * nb * 32) };
        if nb * H * stride(f) * 32 <= ROW_ORDER_MAX_BYTES {
            // the half tiles fit the cache: one row's four groups after another
            for (r, x) in acts.iter().enumerate() {
                for g in 0..GROUPS.len() {
                    group::<F, H>(&halves, nb, g, x, qs(r), &mut part[r], out.offset(r, 0), &keep, pf);
                }
            }
        } else {
            for g in 0..GROUPS.len() {
                for (r, x) in acts.iter().enumerate() {
                    group::<F, H>(&halves, nb, g, x, qs(r), &mut part[r], out.offset(r, 0), &keep, pf);
                }
            }
        }
    }

    /// Lane group `g` of one activation row `x` whose values are read at `qs` (results through
    /// `out.row(0)`).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn group<const F: u8, const H: usize>(
        halves: &[*const Y; H],
        nb: usize,
        g: usize,
        x: &Q8Row,
        qs: *const i8,
        pr: &mut Partial,
        out: Out,
        keep: &[Keep; H],
        pf: &wtile::Prefetch,
    ) {
        pf.some();
        let lanes = GROUPS[g];
        let x = (qs, x.d.as_ptr(), x.s.as_ptr(), x.sums.as_ptr());
        // lanes i, i + 8, i + 4, i + 12: h_i + h_(i+4)
        let (a0, a1) = (lane::<F, H>(halves, nb, lanes[0], x), lane::<F, H>(halves, nb, lanes[1], x));
        let hi: [__m256; H] = std::array::from_fn(|h| _mm256_add_ps(a0[h], a1[h]));
        let (a2, a3) = (lane::<F, H>(halves, nb, lanes[2], x), lane::<F, H>(halves, nb, lanes[3], x));
        for h in 0..H {
            let t = _mm256_add_ps(hi[h], _mm256_add_ps(a2[h], a3[h]));
            match g {
                0 => pr[0][h] = t,
                1 => pr[0][h] = _mm256_add_ps(pr[0][h], t),
                2 => pr[1][h] = t,
                _ => {
                    let v = _mm256_add_ps(pr[0][h], _mm256_add_ps(pr[1][h], t));
                    keep[h].store(out.row(0).add(8 * h), v);
                }
            }
        }
    }

    /// Lane `l`'s accumulators (blocks `l`, `l + 16`, ... in order) of one activation row (its values,
    /// offset by 128 for the Q4 formats, its scales, scaled sums and sums) for `H` prepared half tiles.
    #[inline(always)]
    unsafe fn lane<const F: u8, const H: usize>(
        halves: &[*const Y; H],
        nb: usize,
        l: usize,
        (qs, d, s, sums): (*const i8, *const f32, *const f32, *const i32),
    ) -> [__m256; H] {
        let f = IntFormat::from_id(F);
        let (step, sc) = (2 * stride(f), scales(f));
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); H];
        let mut b = l;
        while b < nb {
            let a = qs.add(pack::act_index(b, 0));
            let chunk = |k: usize| (a.add(4 * k) as *const i32).read_unaligned();
            let e: [*const __m256i; H] = std::array::from_fn(|h| halves[h].add(b * step) as *const __m256i);
            let mut p = [_mm256_setzero_si256(); H];
            match f {
                IntFormat::Q4_0 | IntFormat::Q4_1 | IntFormat::Q4K => {
                    // `qs` holds the activations offset by 128 (unsigned), so the nibbles (0..15, taken
                    // as signed) are `maddubs`' second operand, read straight from memory; a lane's
                    // pairs (at most 2 * 255 * 15) add up over the block's 8 chunks in wrapping i16,
                    // and less the bias ([`bias`]) the lane holds its exact sum of activation times
                    // nibble (at most 16 * 128 * 15 in size); then one `madd`
                    for k in 0..8 {
                        let ak = _mm256_set1_epi32(chunk(k));
                        for h in 0..H {
                            let m = _mm256_maddubs_epi16(ak, _mm256_load_si256(e[h].add(k)));
                            p[h] = if k == 0 { m } else { _mm256_add_epi16(p[h], m) };
                        }
                    }
                    for (ph, eh) in p.iter_mut().zip(e) {
                        *ph = _mm256_madd_epi16(_mm256_sub_epi16(*ph, _mm256_load_si256(eh.add(bias(f)))), ones);
                    }
                    if f == IntFormat::Q4_0 {
                        let c = _mm256_set1_epi32(*sums.add(b) << 3);
                        for ph in p.iter_mut() {
                            *ph = _mm256_sub_epi32(*ph, c);
                        }
                    }
                }
                IntFormat::Q8_0 => {
                    for k in 0..8 {
                        let ak = _mm256_set1_epi32(chunk(k));
                        for h in 0..H {
                            let sa = _mm256_sign_epi8(ak, _mm256_load_si256(e[h].add(8 + k)));
                            let m = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_load_si256(e[h].add(k)), sa), ones);
                            p[h] = _mm256_add_epi32(p[h], m);
                        }
                    }
                }
                IntFormat::Q5 => {
                    // the unsigned 5-bit values are `maddubs`' first operand, the activations its
                    // second: a lane's pairs at most 2 * 31 * 128, four chunks' (31744) in i16, the two
                    // sums of four widened apart
                    let mut q = [[_mm256_setzero_si256(); 2]; H];
                    for k in 0..8 {
                        let ak = _mm256_set1_epi32(chunk(k));
                        for h in 0..H {
                            let m = _mm256_maddubs_epi16(_mm256_load_si256(e[h].add(k)), ak);
                            q[h][k / 4] = if k % 4 == 0 { m } else { _mm256_add_epi16(q[h][k / 4], m) };
                        }
                    }
                    for (ph, qh) in p.iter_mut().zip(q) {
                        *ph = _mm256_add_epi32(_mm256_madd_epi16(qh[0], ones), _mm256_madd_epi16(qh[1], ones));
                    }
                }
                IntFormat::Q6K => unreachable!("Q6K takes the pass kernel"),
            }
            let da = _mm256_set1_ps(*d.add(b));
            let sa = if f.has_min() { _mm256_set1_ps(*s.add(b)) } else { _mm256_setzero_ps() };
            for h in 0..H {
                let scale = e[h].add(sc) as *const f32;
                let mut term = _mm256_mul_ps(_mm256_mul_ps(_mm256_load_ps(scale), da), _mm256_cvtepi32_ps(p[h]));
                if f.has_min() {
                    term = _mm256_add_ps(term, _mm256_mul_ps(_mm256_load_ps(scale.add(8)), sa));
                }
                acc[h] = _mm256_add_ps(acc[h], term);
            }
            b += GROUP;
        }
        acc
    }
}
