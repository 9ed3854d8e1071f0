//! The batched integer kernel on Intel AMX (`tdpbsud` / `tdpbssd` on 16x16 tiles), for many activation
//! rows at once (prefill, batched decode).
//!
//! It computes the canonical sum of [`super::simd`] bit for bit: one tile product per 32-value block
//! (`K = 32`) gives the exact integer block sums `p_b` of 16 activation rows by 16 weight rows, and the
//! scaling then runs as in the scalar reference, with 512-bit vectors across the 16 weight rows: lane
//! accumulator `l = b % 16` of every (row, weight row) pair takes `acc + (dw_b*da_b) * p_b` (Q4_1:
//! `acc + ((dw_b*da_b) * p_b + mw_b*sa_b)`) for the blocks `b = l, l + 16, ...` in order, and the 16
//! lane accumulators reduce in the same fixed tree. The blocks are multiplied and scaled lane by lane
//! (`0, 16, 32, ..., 1, 17, ...`), so one lane's accumulators stay in registers over its blocks and
//! start from 0.0 there, as in the reference, without a buffer to clear. Integer sums are exact and the
//! float operations are the same ones in the same order, so the bits are those of the scalar reference.
//!
//! Tiles: `tmm0` the 16x16 `i32` products, `tmm1` 16 activation rows of one block (32 signed bytes
//! each, in value order), `tmm2` one block of 16 weight rows (8 rows of 16 x 4 bytes: value `4k + j` of
//! weight row `n` at `k * 64 + 4n + j`; Q4 weights as unsigned nibbles, Q5's as unsigned bytes, Q8_0's as
//! signed bytes). That is [`super::pack`]'s layout of Q8_0 values, so Q8_0 tiles are loaded from the
//! packed weights as they are; the other formats' values are unpacked once per weight tile
//! ([`wtile::prep`]). Every format's scales and minimums are read from the packed tile (unpacking them
//! too took 2 of a Q4 block's 10 stores). Q6K's two scales per block take two products of `K = 16` per
//! block, one per 16-value half (its values less 32 as signed bytes), and its term sums the halves as
//! the reference does. The instructions are written in `asm!` (the AMX intrinsics are not stable Rust);
//! Linux hands out the tile state only after `arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked once by
//! [`available`].

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::{Cell, RefCell};
use std::sync::OnceLock;

use super::dot::Q8Row;
use super::pack::{self, act_index, GROUP, QK};
use super::simd::{IntFormat, Out};
use super::wtile::{self, Line, Prefetch, WeightTile, T};

/// Whether the CPU has AMX-INT8 and the kernel lets this process use the tile state (asked once).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // SAFETY: cpuid and xgetbv are always present on x86_64 Linux targets that reach here (xgetbv only
        // after cpuid says the OS enabled XSAVE).
        unsafe {
            let l7 = __cpuid_count(7, 0);
            let (tile, int8) = ((l7.edx >> 24) & 1 == 1, (l7.edx >> 25) & 1 == 1);
            let osxsave = (__cpuid(1).ecx >> 27) & 1 == 1;
            if !(tile && int8 && osxsave) {
                return false;
            }
            // XTILECFG (17) and XTILEDATA (18) enabled by the OS
            if _xgetbv(0) & (0b11 << 17) != 0b11 << 17 {
                return false;
            }
            #[cfg(target_os = "linux")]
            {
                const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
                const XFEATURE_XTILEDATA: libc::c_long = 18;
                libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
            }
            #[cfg(not(target_os = "linux"))]
            false
        }
    })
}

/// Activation rows laid out for the tile loads: per tile of 16 rows and per block, the 16 rows' 32 values
/// in value order (rows past the end are zeros), and each row's scale, scaled sum and integer sum of
/// that block side by side.
#[derive(Default)]
pub struct Tiles {
    nb: usize,
    m: usize,
    /// `[tile][block][row][32]` bytes.
    values: Vec<Line>,
    /// `[tile][block][row]`.
    d: Vec<f32>,
    s: Vec<f32>,
    sums: Vec<i32>,
}

impl Tiles {
    /// The layout of `rows`, one task per tile of 16 rows when the pool has several threads (a serial
    /// copy between the parallel matmuls held the other threads up).
    pub fn new(rows: &[Q8Row]) -> Self {
        let nb = rows.first().map_or(0, Q8Row::blocks);
        let tiles = rows.len().div_ceil(T);
        // this thread's buffers of the last call, if it gave them back, zeroed as new ones are (rows past
        // the end stay zero)
        let mut t = wtile::take_spare(&SPARE_TILES);
        (t.nb, t.m) = (nb, rows.len());
        wtile::refill(&mut t.values, tiles * nb * T / 2, Line([0; 64]));
        wtile::refill(&mut t.d, tiles * nb * T, 0.0);
        wtile::refill(&mut t.s, tiles * nb * T, 0.0);
        wtile::refill(&mut t.sums, tiles * nb * T, 0);
        let per_tile = nb * T;
        let mut parts: Vec<TilePart> = t
            .values
            .chunks_mut(per_tile / 2)
            .zip(t.d.chunks_mut(per_tile))
            .zip(t.s.chunks_mut(per_tile))
            .zip(t.sums.chunks_mut(per_tile))
            .map(|(((values, d), s), sums)| TilePart { values, d, s, sums })
            .collect();
        crate::pool::each_mut(&mut parts, |i, p| {
            let values = line_bytes(p.values);
            for (row, r) in rows[i * T..((i + 1) * T).min(rows.len())].iter().enumerate() {
                for b in 0..nb {
                    let at = b * T + row;
                    values[at * QK..(at + 1) * QK].copy_from_slice(&r.qs[act_index(b, 0)..act_index(b + 1, 0)]);
                    p.d[at] = r.d[b];
                    p.s[at] = r.s[b];
                    p.sums[at] = r.sums[b];
                }
            }
        });
        t
    }

    /// Keeps these buffers for this thread's next [`Tiles::new`] (a batched step lays out rows for every
    /// matmul).
    pub fn recycle(self) {
        wtile::keep_spare(&SPARE_TILES, self);
    }
}

/// One activation tile's share of [`Tiles`].
struct TilePart<'a> {
    values: &'a mut [Line],
    d: &'a mut [f32],
    s: &'a mut [f32],
    sums: &'a mut [i32],
}

/// Lines as signed bytes.
fn line_bytes(l: &mut [Line]) -> &mut [i8] {
    // SAFETY: `Line` is 64 plain bytes (repr(C)), so the lines are `64 * len` initialised bytes
    unsafe { std::slice::from_raw_parts_mut(l.as_mut_ptr() as *mut i8, l.len() * 64) }
}

/// Per-thread buffers of the kernel.
struct Scratch {
    /// The weight tile being multiplied.
    wt: WeightTile,
    /// Two batches of tile products, `[2][BATCH][16 rows][64]`.
    c: Vec<Line>,
    /// The 16 lane accumulators of 16 activation rows, `[lane][row]`, 16 weight rows each.
    acc: Vec<Line>,
    /// The blocks in lane order: lane 0's blocks `0, 16, 32, ...`, then lane 1's, ...
    order: Vec<usize>,
}

/// Empty (no allocation): what the thread-local holds while a call has the buffers.
impl Default for Scratch {
    fn default() -> Self {
        Scratch { wt: WeightTile::default(), c: Vec::new(), acc: Vec::new(), order: Vec::new() }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    static SPARE_TILES: Cell<Option<Tiles>> = const { Cell::new(None) };
}

/// The tile configuration (palette 1): products (tmm0, tmm3, tmm4, tmm5) 16 x 64 bytes, activations (tmm1,
/// tmm6) 16 x 32, weights (tmm2, tmm7) 8 x 64; for the half blocks of Q6K (`halves`) activations 16 x 16
/// and weights 4 x 64.
#[repr(C, align(64))]
struct Config([u8; 64]);

fn config(halves: bool) -> Config {
    let mut c = Config([0; 64]);
    c.0[0] = 1;
    let (ka, kw) = if halves { (16, 4) } else { (32, 8) };
    for (t, rows, colsb) in [(0usize, 16u8, 64u16), (3, 16, 64), (4, 16, 64), (5, 16, 64), (1, 16, ka), (6, 16, ka), (2, kw, 64), (7, kw, 64)] {
        c.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
        c.0[48 + t] = rows;
    }
    c
}

/// `w_j · acts[i]` for the `n` weight rows held by the tiles `w` (format `f`, `rb` bytes per row) and
/// every activation row of `tiles`, into `out` as [`super::simd::tile`] does.
///
/// # Safety
/// [`available`] is true, the CPU has AVX-512 (F, BW, VL); `w` holds `n.div_ceil(16)` whole tiles; `out`
/// covers `n` columns of as many rows as `tiles` holds, which only this call writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
pub unsafe fn tile(f: IntFormat, w: &[u8], rb: usize, n: usize, tiles: &Tiles, out: Out) {
    let nb = tiles.nb;
    if n == 0 || tiles.m == 0 {
        return;
    }
    // taken out of the thread-local for the call (a closure would not inherit the target features)
    let mut scratch = SCRATCH.with(|c| std::mem::take(&mut *c.borrow_mut()));
    let s = &mut scratch;
    s.c.resize(2 * BATCH * T, Line([0; 64]));
    s.acc.resize(T * T, Line([0; 64]));
    s.order.clear();
    s.order.extend((0..GROUP.min(nb)).flat_map(|l| (l..nb).step_by(GROUP)));
    let halves = f == IntFormat::Q6K;
    let cfg = config(halves);
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    for j0 in (0..n).step_by(T) {
        let nw = (n - j0).min(T);
        // the next weight tile (contiguous bytes) comes from memory while this one is multiplied, a few
        // lines per block (all at once would stall on the fill buffers)
        let next = &w[((j0 + T) * rb).min(w.len())..((j0 + 2 * T) * rb).min(w.len())];
        let mut pf = Prefetch::new(next, nb * tiles.m.div_ceil(T));
        let tile = &w[j0 * rb..(j0 + T) * rb];
        // Q8_0's packed values are already the weight tiles' layout, signed; the other formats' are
        // unpacked (the scales are read from the packed tile by every format)
        let values = if f == IntFormat::Q8_0 {
            tile.as_ptr()
        } else {
            wtile::prep(f, tile, nb, &mut s.wt);
            s.wt.w.as_ptr() as *const u8
        };
        for t in 0..tiles.m.div_ceil(T) {
            let mt = (tiles.m - t * T).min(T);
            let at = out.offset(t * T, j0);
            // (Q6K, and only Q6K, takes two products per block)
            match f {
                IntFormat::Q4_0 => tile_product::<1, { IntFormat::Q4_0 as u8 }>(tiles, t, mt, nw, values, tile.as_ptr(), s, &mut pf, at),
                IntFormat::Q4_1 => tile_product::<1, { IntFormat::Q4_1 as u8 }>(tiles, t, mt, nw, values, tile.as_ptr(), s, &mut pf, at),
                IntFormat::Q8_0 => tile_product::<1, { IntFormat::Q8_0 as u8 }>(tiles, t, mt, nw, values, tile.as_ptr(), s, &mut pf, at),
                IntFormat::Q4K => tile_product::<1, { IntFormat::Q4K as u8 }>(tiles, t, mt, nw, values, tile.as_ptr(), s, &mut pf, at),
                IntFormat::Q5 => tile_product::<1, { IntFormat::Q5 as u8 }>(tiles, t, mt, nw, values, tile.as_ptr(), s, &mut pf, at),
                IntFormat::Q6K => tile_product::<2, { IntFormat::Q6K as u8 }>(tiles, t, mt, nw, values, tile.as_ptr(), s, &mut pf, at),
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
    SCRATCH.with(|c| *c.borrow_mut() = scratch);
}

/// Blocks whose tile products are in flight together (tmm0, tmm3, tmm4, tmm5).
const BATCH: usize = 4;

/// Starts the tile products `k0..k0 + BATCH` (those there are) of the blocks in `order`, `U` per block
/// (Q6K's two halves of 16 values: product `k` is half `k % U` of block `order[k / U]`): activation tile
/// at `a`, weight tiles at `w`, each product's pair in tmm1/tmm2 or tmm6/tmm7 by turns, products into the
/// four C tiles.
#[inline(always)]
unsafe fn issue<const U: usize>(signed: bool, a: *const u8, w: *const u8, order: &[usize], k0: usize) {
    macro_rules! product {
        ($k:literal, $c:literal, $ta:literal, $tb:literal) => {
            if let Some(&b) = order.get((k0 + $k) / U) {
                let h = (k0 + $k) % U;
                let (pa, pw) = (a.add(b * T * QK + h * QK / U), w.add(b * 512 + h * 512 / U));
                asm!(
                    concat!("tilezero ", $c),
                    concat!("tileloadd ", $ta, ", [{a} + {sa}*1]"),
                    concat!("tileloadd ", $tb, ", [{w} + {sw}*1]"),
                    a = in(reg) pa, sa = in(reg) QK, w = in(reg) pw, sw = in(reg) 64usize,
                    options(nostack, readonly),
                );
                if signed {
                    asm!(concat!("tdpbssd ", $c, ", ", $ta, ", ", $tb), options(nostack, nomem));
                } else {
                    asm!(concat!("tdpbsud ", $c, ", ", $ta, ", ", $tb), options(nostack, nomem));
                }
            }
        };
    }
    product!(0, "tmm0", "tmm1", "tmm2");
    product!(1, "tmm3", "tmm6", "tmm7");
    product!(2, "tmm4", "tmm1", "tmm2");
    product!(3, "tmm5", "tmm6", "tmm7");
}

/// Stores the products `k0..k0 + BATCH` in the issue order (those below `n`) to `c`, 1 KiB each.
#[inline(always)]
unsafe fn store(c: *mut u8, k0: usize, n: usize) {
    macro_rules! put {
        ($k:literal, $c:literal) => {
            if k0 + $k < n {
                asm!(concat!("tilestored [{c} + {s}*1], ", $c), c = in(reg) c.add($k * 1024), s = in(reg) 64usize, options(nostack));
            }
        };
    }
    put!(0, "tmm0");
    put!(1, "tmm3");
    put!(2, "tmm4");
    put!(3, "tmm5");
}

/// The results of activation tile `t` (`mt` valid rows) against a weight tile (`nw` valid rows; its
/// values laid out for the tile loads at `wt`, the packed tile with its scales at `tile`), into `out`
/// (row 0, weight row 0 of the tile), with `U` tile products per block (2: Q6K's halves). The format
/// `F` (`IntFormat as u8`) is a const parameter: as an argument, LLVM compiled one scaling loop for all
/// formats, with a jump on the format in every block and its 16 accumulators spilled to the stack.
/// The products of the next blocks run on the tile unit while the vector units scale the previous
/// ones. Blocks go in lane order (`s.order`), so the 16 rows' accumulators of one lane stay in
/// registers over all its blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_product<const U: usize, const F: u8>(
    tiles: &Tiles,
    t: usize,
    mt: usize,
    nw: usize,
    wt: *const u8,
    tile: *const u8,
    s: &mut Scratch,
    pf: &mut Prefetch,
    out: Out,
) {
    let f = IntFormat::from_id(F);
    let nb = tiles.nb;
    let a = (tiles.values.as_ptr() as *const u8).add(t * nb * T * QK);
    let (d, sa, sums) = (tiles.d.as_ptr().add(t * nb * T), tiles.s.as_ptr().add(t * nb * T), tiles.sums.as_ptr().add(t * nb * T));
    let c = s.c.as_mut_ptr() as *mut u8;
    let lanes = s.acc.as_mut_ptr() as *mut __m512;
    let order = &s.order[..nb];
    // Q6K's weights were taken less 32 (signed), as Q8_0's
    let signed = matches!(f, IntFormat::Q8_0 | IntFormat::Q6K);
    // rows past `mt` hold zeros (their results are not stored), so every loop runs all 16 rows
    let mut acc = [_mm512_setzero_ps(); T];
    let mut lane = order.first().map_or(0, |b| b % GROUP);
    // batch i is stored while batch i + 1 is issued, and scaled one step later (its stores have landed);
    // a batch holds whole blocks (`BATCH` is a multiple of `U`)
    let products = nb * U;
    let batches = products.div_ceil(BATCH);
    issue::<U>(signed, a, wt, order, 0);
    for i in 0..=batches {
        if i < batches {
            store(c.add((i % 2) * BATCH * 1024), i * BATCH, products);
            if i + 1 < batches {
                issue::<U>(signed, a, wt, order, (i + 1) * BATCH);
            }
        }
        if i == 0 {
            continue;
        }
        let (k0, buf) = ((i - 1) * BATCH / U, c.add(((i - 1) % 2) * BATCH * 1024));
        for (k, &b) in order[k0..(k0 + BATCH / U).min(nb)].iter().enumerate() {
            if b % GROUP != lane {
                // the lane's last block is done: its accumulators, from 0.0 as in the reference
                for (r, v) in acc.iter_mut().enumerate() {
                    _mm512_store_ps(lanes.add(lane * T + r) as *mut f32, *v);
                    *v = _mm512_setzero_ps();
                }
                lane = b % GROUP;
            }
            pf.some();
            let cb = buf.add(k * U * 1024);
            let dw = wtile::scales16(f, tile.add(pack::scales_at(f, nb, b)));
            let mw = if f.two_scales() { wtile::scales16(f, tile.add(pack::minimums_at(f, nb, b))) } else { _mm512_setzero_ps() };
            let at = b * T;
            if U == 2 {
                // Q6K: `(dlo*da)*plo + (dhi*da)*phi`, the halves' scales in the scales' and minimums' places
                for (r, v) in acc.iter_mut().enumerate() {
                    let plo = _mm512_load_si512(cb.add(r * 64) as *const __m512i);
                    let phi = _mm512_load_si512(cb.add(1024 + r * 64) as *const __m512i);
                    let da = _mm512_set1_ps(*d.add(at + r));
                    let tlo = _mm512_mul_ps(_mm512_mul_ps(dw, da), _mm512_cvtepi32_ps(plo));
                    *v = _mm512_add_ps(*v, _mm512_add_ps(tlo, _mm512_mul_ps(_mm512_mul_ps(mw, da), _mm512_cvtepi32_ps(phi))));
                }
                continue;
            }
            for (r, v) in acc.iter_mut().enumerate() {
                let mut p = _mm512_load_si512(cb.add(r * 64) as *const __m512i);
                if f == IntFormat::Q4_0 {
                    // the nibbles were taken unsigned: subtract 8 x the activation block's sum
                    p = _mm512_sub_epi32(p, _mm512_set1_epi32(8 * *sums.add(at + r)));
                }
                let mut term = _mm512_mul_ps(_mm512_mul_ps(dw, _mm512_set1_ps(*d.add(at + r))), _mm512_cvtepi32_ps(p));
                if f.has_min() {
                    term = _mm512_add_ps(term, _mm512_mul_ps(mw, _mm512_set1_ps(*sa.add(at + r))));
                }
                *v = _mm512_add_ps(*v, term);
            }
        }
    }
    for (r, v) in acc.iter().enumerate() {
        _mm512_store_ps(lanes.add(lane * T + r) as *mut f32, *v);
    }
    // lanes without blocks (rows of fewer than 16 blocks) sum nothing
    for l in nb..GROUP {
        for r in 0..T {
            _mm512_store_ps(lanes.add(l * T + r) as *mut f32, _mm512_setzero_ps());
        }
    }
    let keep: __mmask16 = if nw == T { 0xFFFF } else { (1u16 << nw) - 1 };
    for r in 0..mt {
        let mut h = [_mm512_setzero_ps(); 8];
        for (i, hi) in h.iter_mut().enumerate() {
            *hi = _mm512_add_ps(_mm512_load_ps(lanes.add(i * T + r) as *const f32), _mm512_load_ps(lanes.add((i + 8) * T + r) as *const f32));
        }
        let v = _mm512_add_ps(
            _mm512_add_ps(_mm512_add_ps(h[0], h[4]), _mm512_add_ps(h[2], h[6])),
            _mm512_add_ps(_mm512_add_ps(h[1], h[5]), _mm512_add_ps(h[3], h[7])),
        );
        _mm512_mask_storeu_ps(out.row(r), keep, v);
    }
}
