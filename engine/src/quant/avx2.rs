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
//! registers), which then reduce in the canonical order: the scalar reference's bits.

use std::arch::x86_64::*;

use super::dot::Q8Row;
use super::pack::{self, GROUP, TILE};
use super::simd::{IntFormat, Out};
use super::wtile::{self, PREFETCH};

/// Activation rows multiplied together by one pass over a tile.
const ROWS: usize = 6;

/// `w_j · acts[i]` into `out` for the `n` weight rows `w_j` held by the tiles `w` (`rb` bytes per row,
/// format `f`) and every activation row, as [`super::simd::tile`] does.
///
/// # Safety
/// The CPU has AVX2 and F16C; `w` holds `n.div_ceil(16)` tiles; `out` covers `n` columns of
/// `acts.len()` rows that only this call writes.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn tile(f: IntFormat, w: &[u8], rb: usize, n: usize, acts: &[Q8Row], out: Out) {
    match f {
        IntFormat::Q4_0 => tiles_as(IntFormat::Q4_0, w, rb, n, acts, out),
        IntFormat::Q4_1 => tiles_as(IntFormat::Q4_1, w, rb, n, acts, out),
        IntFormat::Q8_0 => tiles_as(IntFormat::Q8_0, w, rb, n, acts, out),
    }
}

#[inline(always)]
unsafe fn tiles_as(f: IntFormat, w: &[u8], rb: usize, n: usize, acts: &[Q8Row], out: Out) {
    let (nb, m, tb) = (rb / f.block_bytes(), acts.len(), TILE * rb);
    let ahead = PREFETCH.max(tb);
    // the first weights, which no earlier tile prefetched
    wtile::prefetch(w.as_ptr(), w.len().min(ahead));
    for j0 in (0..n).step_by(TILE) {
        let tile = w.as_ptr().add(j0 / TILE * tb);
        let keep =
            |h: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32((n - j0).saturating_sub(8 * h).min(8) as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        let keep = [keep(0), keep(1)];
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
unsafe fn pass<const R: usize>(f: IntFormat, tile: *const u8, nb: usize, acts: &[Q8Row], out: Out, keep: [__m256i; 2], ahead: *const u8) {
    let mut acc = [[[_mm256_setzero_ps(); GROUP]; 2]; R];
    let share = TILE * f.block_bytes();
    for b in 0..nb {
        let l = b % GROUP;
        if !ahead.is_null() {
            wtile::prefetch(ahead.wrapping_add(b * share), share);
        }
        for h in 0..2 {
            let blk = Half { f, p: tile, nb, h }.block(b);
            for (acc, x) in acc.iter_mut().zip(acts) {
                let a = &mut acc[h][l];
                *a = _mm256_add_ps(*a, term(f, &blk, x, b));
            }
        }
    }
    // lanes without blocks (rows under 16 blocks) stay 0.0
    for (r, acc) in acc.iter().enumerate() {
        for (h, a) in acc.iter().enumerate() {
            let hs: [__m256; 8] = std::array::from_fn(|i| _mm256_add_ps(a[i], a[i + 8]));
            let v = _mm256_add_ps(
                _mm256_add_ps(_mm256_add_ps(hs[0], hs[4]), _mm256_add_ps(hs[2], hs[6])),
                _mm256_add_ps(_mm256_add_ps(hs[1], hs[5]), _mm256_add_ps(hs[3], hs[7])),
            );
            _mm256_maskstore_ps(out.row(r).add(8 * h), keep[h], v);
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
            IntFormat::Q4_0 | IntFormat::Q4_1 => {
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
        }
        let s = self.p.add(pack::scales_at(f, nb, b) + 16 * self.h);
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(s as *const __m128i));
        let mw = if f == IntFormat::Q4_1 { _mm256_cvtph_ps(_mm_loadu_si128(s.add(2 * TILE * nb) as *const __m128i)) } else { _mm256_setzero_ps() };
        Block { w, signs: v, dw, mw }
    }
}

/// One block's term of the canonical sum for the half tile's 8 weight rows and activation row `x`.
#[inline(always)]
unsafe fn term(f: IntFormat, blk: &Block, x: &Q8Row, b: usize) -> __m256 {
    let ones = _mm256_set1_epi16(1);
    let a = x.qs.as_ptr().add(pack::act_index(b, 0));
    let chunk = |k: usize| (a.add(4 * k) as *const i32).read_unaligned();
    let mut p = match f {
        IntFormat::Q4_0 | IntFormat::Q4_1 => {
            let mut s0 = _mm256_maddubs_epi16(blk.w[0], _mm256_set1_epi32(chunk(0)));
            let mut s1 = _mm256_maddubs_epi16(blk.w[1], _mm256_set1_epi32(chunk(1)));
            for k in (2..8).step_by(2) {
                s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(blk.w[k], _mm256_set1_epi32(chunk(k))));
                s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(blk.w[k + 1], _mm256_set1_epi32(chunk(k + 1))));
            }
            _mm256_madd_epi16(_mm256_add_epi16(s0, s1), ones)
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
    };
    if f == IntFormat::Q4_0 {
        // the nibbles were taken unsigned: subtract 8 x the activation block's sum
        p = _mm256_sub_epi32(p, _mm256_set1_epi32(*x.sums.get_unchecked(b) << 3));
    }
    let mut term = _mm256_mul_ps(_mm256_mul_ps(blk.dw, _mm256_set1_ps(*x.d.get_unchecked(b))), _mm256_cvtepi32_ps(p));
    if f == IntFormat::Q4_1 {
        term = _mm256_add_ps(term, _mm256_mul_ps(blk.mw, _mm256_set1_ps(*x.s.get_unchecked(b))));
    }
    term
}
