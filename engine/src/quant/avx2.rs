//! The AVX2 kernel: 8 weight rows (half a tile) side by side in the lanes of each 256-bit register.
//!
//! The same scheme as [`super::vnni`] on half the width, with `maddubs` + `madd` for the integer block
//! sums: a register holds one 4-value chunk of one block for 8 weight rows, multiplied by that chunk of
//! an activation block broadcast to every lane. Q4 nibbles (0..15) against 8-bit activations keep every
//! partial sum of a block within i16 (`8 * 2 * 15 * 128`), so a block's 8 chunks add up in i16 before one
//! `madd`; Q8_0 moves each weight's sign onto the activation (`maddubs` takes one unsigned operand) and
//! widens every chunk. Lane accumulators are formed in the reduction's order and folded into it at
//! once, as in [`super::vnni`]: the scalar reference's bits.

use std::arch::x86_64::*;

use super::dot::Q8Row;
use super::pack::{self, GROUP, TILE};
use super::simd::{IntFormat, Out};

/// Activation rows multiplied together by one pass over a half tile.
const ROWS: usize = 2;

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
    for j0 in (0..n).step_by(TILE) {
        let tile = w.as_ptr().add(j0 / TILE * tb);
        // the next tile comes from memory while this one is multiplied
        let mut off = 0;
        while off < tb {
            _mm_prefetch::<_MM_HINT_T0>(tile.wrapping_add(tb + off) as *const i8);
            off += 64;
        }
        for h in 0..2 {
            let j = j0 + 8 * h;
            if j >= n {
                break;
            }
            let half = Half { f, p: tile, nb, h };
            let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32((n - j).min(8) as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            let at = |r: usize| out.offset(r, j);
            let mut r = 0;
            while r + ROWS <= m {
                pass::<ROWS>(&half, &acts[r..r + ROWS], at(r), keep);
                r += ROWS;
            }
            if r < m {
                pass::<1>(&half, &acts[r..], at(r), keep);
            }
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

/// `R` activation rows against a half tile: the 8 weight rows' results of row `r` go to
/// `out.row(r)`, the lanes in `keep`.
#[inline(always)]
unsafe fn pass<const R: usize>(half: &Half, acts: &[Q8Row], out: Out, keep: __m256i) {
    // the reduction's order, lane by lane, as in `vnni::pass`
    macro_rules! h {
        ($i:literal) => {
            add::<R>(lane::<R>(half, $i, acts), lane::<R>(half, $i + 8, acts))
        };
    }
    let (h0, h4) = (h!(0), h!(4));
    let q = add::<R>(h0, h4);
    let (h2, h6) = (h!(2), h!(6));
    let s = add::<R>(q, add::<R>(h2, h6));
    let (h1, h5) = (h!(1), h!(5));
    let q = add::<R>(h1, h5);
    let (h3, h7) = (h!(3), h!(7));
    let v = add::<R>(s, add::<R>(q, add::<R>(h3, h7)));
    for (r, v) in v.iter().enumerate() {
        _mm256_maskstore_ps(out.row(r), keep, *v);
    }
}

#[inline(always)]
unsafe fn add<const R: usize>(a: [__m256; R], b: [__m256; R]) -> [__m256; R] {
    let mut out = a;
    for r in 0..R {
        out[r] = _mm256_add_ps(a[r], b[r]);
    }
    out
}

/// Lane accumulator `l` of `R` activation rows against the half tile's 8 weight rows.
#[inline(always)]
unsafe fn lane<const R: usize>(half: &Half, l: usize, acts: &[Q8Row]) -> [__m256; R] {
    let (f, nb) = (half.f, half.nb);
    let mut acc = [_mm256_setzero_ps(); R];
    let ones = _mm256_set1_epi16(1);
    let mut b = l;
    while b < nb {
        let blk = half.block(b);
        for (r, x) in acts.iter().enumerate().take(R) {
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
            acc[r] = _mm256_add_ps(acc[r], term);
        }
        b += GROUP;
    }
    acc
}
