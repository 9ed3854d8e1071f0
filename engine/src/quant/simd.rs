//! Runtime-selected integer kernels: one weight row (output column) against every activation row.
//!
//! Every path computes the same canonical sum, so scalar, AVX2 and AVX-512 VNNI results are
//! bit-identical on any machine, for any batch size. Weights and activations are in the grouped layout of
//! [`super::pack`]. For each block `b` the exact integer dot product `p_b = Σ w·q` (the true signed
//! weights) goes to lane `l = b % 16` of 16 f32 accumulators as `acc[l] + (dw_b*da_b) * p_b`, for Q4_1
//! `acc[l] + ((dw_b*da_b) * p_b + mw_b*sa_b)` (multiplies then adds, never fused); the result is
//! `reduce(acc)` with `h[i] = acc[i] + acc[i+8]`, then `((h0+h4)+(h2+h6)) + ((h1+h5)+(h3+h7))`.
//! How the integer sums are formed (and in which order) cannot change them, so the SIMD paths take each
//! group's 16 blocks at once: eight `dpbusd` (or `maddubs`) leave the 16 block sums in 16 lanes.

use std::sync::OnceLock;

use super::dequant::f16_at;
use super::dot::Q8Row;
use super::pack::{self, GROUP, QK};

/// Instruction-set level of the integer kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Portable Rust, the reference.
    Scalar,
    /// AVX2 (`maddubs` + `madd`), 256-bit vectors: a group in two halves of 8 blocks.
    Avx2,
    /// AVX-512 VNNI (`dpbusd`) on 512-bit vectors: a whole group of 16 blocks per register.
    Avx512Vnni,
    /// AVX-512 VNNI, and Intel AMX tile products (`super::amx`) for [`AMX_MIN_ROWS`] or more activation
    /// rows.
    Avx512Amx,
}

/// Fewest activation rows that go to the AMX kernel (fewer do not repay laying out a weight tile).
pub const AMX_MIN_ROWS: usize = 12;

/// The best level this CPU supports, capped by `FLOTILLA_KERNEL=scalar|avx2|avx512` when set.
pub fn detected() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = best_supported();
        match std::env::var("FLOTILLA_KERNEL").as_deref() {
            Ok("scalar") => Level::Scalar,
            Ok("avx2") => best.min(Level::Avx2),
            Ok("avx512") => best.min(Level::Avx512Vnni),
            _ => best,
        }
    })
}

/// Every level this CPU can run (for tests).
pub fn supported() -> Vec<Level> {
    [Level::Scalar, Level::Avx2, Level::Avx512Vnni, Level::Avx512Amx].into_iter().filter(|&l| l <= best_supported()).collect()
}

fn best_supported() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c");
        if avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
        {
            return if super::amx::available() { Level::Avx512Amx } else { Level::Avx512Vnni };
        }
        if avx2 {
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

/// Where a tile's results go: the result of weight row `j` (counted from the tile's first) and activation
/// row `i` at `ptr + i * stride + j`.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub ptr: *mut f32,
    pub stride: usize,
}

impl Out {
    /// # Safety
    /// The element is in bounds of the buffer and no other thread writes it.
    #[inline(always)]
    unsafe fn put(self, j: usize, i: usize, v: f32) {
        *self.ptr.add(i * self.stride + j) = v;
    }
}

/// Activation rows as the kernels of one level read them: the rows, and for the AMX kernel their blocks
/// laid out as tiles (once per matmul, shared by every task).
pub struct Acts<'a> {
    pub rows: &'a [Q8Row],
    #[cfg(target_arch = "x86_64")]
    tiles: Option<super::amx::Tiles>,
}

impl<'a> Acts<'a> {
    pub fn new(level: Level, rows: &'a [Q8Row]) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the AMX level is only detected on CPUs with AVX2.
            let tiles = (level == Level::Avx512Amx && rows.len() >= AMX_MIN_ROWS).then(|| unsafe { super::amx::Tiles::new(rows) });
            Acts { rows, tiles }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = level;
            Acts { rows }
        }
    }
}

/// `w_j · acts[i]` into `out` for the consecutive weight rows `w_j` of `w` (each `row_bytes` long, grouped
/// layout, format `f`) and every activation row.
///
/// # Safety
/// `out` covers `w.len() / row_bytes` columns of `acts.rows.len()` rows that only this call writes;
/// `acts` was made for `level`.
pub unsafe fn tile(level: Level, f: IntFormat, w: &[u8], row_bytes: usize, acts: &Acts, out: Out) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = &acts.tiles {
        return super::amx::tile(f, w, row_bytes, t, out);
    }
    let acts = acts.rows;
    debug_assert!(acts.iter().all(|a| a.blocks() * f.block_bytes() == row_bytes));
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::tile_avx2(f, w, row_bytes, acts, out),
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni | Level::Avx512Amx => x86::tile_avx512(f, w, row_bytes, acts, out),
        _ => {
            for (j, wr) in w.chunks_exact(row_bytes).enumerate() {
                for (i, a) in acts.iter().enumerate() {
                    out.put(j, i, row_scalar(f, wr, a));
                }
            }
        }
    }
}

/// The fixed reduction of the 16 lanes.
#[inline(always)]
fn reduce(a: [f32; GROUP]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|i| a[i] + a[i + 8]);
    ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]))
}

/// The canonical dot product of one weight row (grouped layout) with one activation row.
pub fn row_scalar(f: IntFormat, w: &[u8], a: &Q8Row) -> f32 {
    let nb = a.blocks();
    let mut acc = [0f32; GROUP];
    for b in 0..nb {
        let (base, g, i) = pack::locate(f, nb, b);
        let grp = &w[base..base + g * f.block_bytes()];
        let s = pack::scales_at(f, g);
        let dw = f16_at(grp, s + 2 * i);
        let p: i32 = (0..QK)
            .map(|j| {
                let w = match f {
                    IntFormat::Q4_0 | IntFormat::Q4_1 => {
                        let byte = grp[(j % 16) / 4 * 4 * g + 4 * i + j % 4];
                        let nib = (if j < 16 { byte & 0xF } else { byte >> 4 }) as i32;
                        if f == IntFormat::Q4_0 {
                            nib - 8
                        } else {
                            nib
                        }
                    }
                    IntFormat::Q8_0 => grp[j / 4 * 4 * g + 4 * i + j % 4] as i8 as i32,
                };
                w * a.value(b, j) as i32
            })
            .sum();
        let l = b % GROUP;
        let mut term = (dw * a.d[b]) * p as f32;
        if f == IntFormat::Q4_1 {
            term = term + f16_at(grp, s + 2 * g + 2 * i) * a.s[b];
        }
        acc[l] = acc[l] + term;
    }
    reduce(acc)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// How far ahead of the group being multiplied the weights are prefetched, in bytes: single-stream
    /// decode streams ~100 MB of weights per token, and only this many bytes in flight come close to one
    /// core's DRAM bandwidth (1 KiB reached 25-28 GB/s on the Zen 5 VM, 8 KiB 37 GB/s of its ~41).
    const PREFETCH: usize = 8192;

    /// Bytes of activation values per group (the padded, full-group layout).
    const ACT_GROUP: usize = GROUP * QK;

    /// Bytes of weight rows that every chunk of activation rows passes over before the next slice.
    const SLICE_BYTES: usize = 192 * 1024;

    /// Activation rows sharing one unpacking of a group's weights.
    const ROWS_512: usize = 6;
    const ROWS_256: usize = 4;

    /// Pointers to the values, scales, scaled sums and integer sums of `R` activation rows (plain loops:
    /// a closure would not inherit the callers' target features).
    #[inline(always)]
    #[allow(clippy::type_complexity)]
    fn act_ptrs<const R: usize>(acts: &[Q8Row]) -> ([*const i8; R], [*const f32; R], [*const f32; R], [*const i32; R]) {
        let mut p = ([std::ptr::null(); R], [std::ptr::null(); R], [std::ptr::null(); R], [std::ptr::null(); R]);
        for r in 0..R {
            (p.0[r], p.1[r], p.2[r], p.3[r]) = (acts[r].qs.as_ptr(), acts[r].d.as_ptr(), acts[r].s.as_ptr(), acts[r].sums.as_ptr());
        }
        p
    }

    /// Prefetches the weights `PREFETCH` bytes past a group of `len` bytes at `p` (the rows of a matrix
    /// are contiguous, and prefetches never fault).
    #[inline(always)]
    unsafe fn prefetch(p: *const u8, len: usize) {
        let mut off = 0;
        while off < len {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off + PREFETCH) as *const i8);
            off += 64;
        }
    }

    #[inline(always)]
    unsafe fn reduce8(h: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    // ---- AVX-512 VNNI: a group of 16 blocks per register ----

    /// A group's weights unpacked once for every activation row: 8 registers of unsigned bytes (chunk
    /// `k` of each block in lane `b`), the scales and minimums as f32, the lanes that hold blocks.
    struct Group512 {
        w: [__m512i; 8],
        dw: __m512,
        mw: __m512,
        lanes: __mmask16,
    }

    #[inline(always)]
    unsafe fn load512(p: *const u8, full: bool, bytes: usize) -> __m512i {
        if full {
            _mm512_loadu_si512(p as *const _)
        } else {
            _mm512_maskz_loadu_epi8((1u64 << bytes) - 1, p as *const i8)
        }
    }

    #[inline(always)]
    unsafe fn scales512(p: *const u8, full: bool, g: usize) -> __m512 {
        let h = if full { _mm256_loadu_si256(p as *const __m256i) } else { _mm256_maskz_loadu_epi16((1u16 << g) - 1, p as *const i16) };
        _mm512_cvtph_ps(h)
    }

    /// The 16 lanes of block sums of a group: weights `w` (chunk `k` of every block) against the
    /// activation chunks at `a + 64k`, in two chains.
    #[inline(always)]
    unsafe fn block_sums512(w: &[__m512i; 8], a: *const i8) -> __m512i {
        let ld = |k: usize| a.add(k * 64) as *const __m512i;
        let mut i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_loadu_si512(ld(0) as *const _));
        let mut i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_loadu_si512(ld(1) as *const _));
        for k in (2..8).step_by(2) {
            i0 = _mm512_dpbusd_epi32(i0, w[k], _mm512_loadu_si512(ld(k) as *const _));
            i1 = _mm512_dpbusd_epi32(i1, w[k + 1], _mm512_loadu_si512(ld(k + 1) as *const _));
        }
        _mm512_add_epi32(i0, i1)
    }

    /// The short last group (1 to 8 blocks) of a chunk of activation rows, transposed so that one register
    /// holds that group of several rows: lane `rr * gp + i` is block `i` of row `rr` of the panel (`gp`, the
    /// group's size rounded up to a power of two, lanes per row). Eight `dpbusd` then serve `16 / gp` rows
    /// instead of one, for weights broadcast to every row's lanes.
    pub(super) struct Panels {
        g: usize,
        gp: usize,
        /// rows per panel
        per: usize,
        /// panels in use
        n: usize,
        qs: [[__m512i; 8]; 4],
        d: [__m512; 4],
        s: [__m512; 4],
        sums: [__m512i; 4],
        /// per pair of rows `(2p, 2p + 1)`: the panel lanes of their blocks, in lanes `0..g` and `8..8 + g`
        pair_idx: [__m512i; 4],
        /// lanes `0..g` and `8..8 + g`
        pair_lanes: __mmask16,
    }

    /// Panels of `acts` for weight rows of `rb` bytes, if their last group is short enough to gain.
    #[inline(always)]
    pub(super) unsafe fn panels512<const R: usize>(f: IntFormat, rb: usize, acts: &[Q8Row]) -> Option<Panels> {
        let nb = rb / f.block_bytes();
        let g = nb % GROUP;
        if g == 0 || g > 8 {
            return None;
        }
        let gp = g.next_power_of_two();
        let per = GROUP / gp;
        let n = R.div_ceil(per);
        let t0 = nb - g;
        let mut qs = [[[0i8; 64]; 8]; 4];
        let (mut d, mut s, mut sums) = ([[0f32; GROUP]; 4], [[0f32; GROUP]; 4], [[0i32; GROUP]; 4]);
        for (r, a) in acts.iter().enumerate().take(R) {
            let (q, lane0) = (r / per, (r % per) * gp);
            for i in 0..g {
                for (k, dst) in qs[q].iter_mut().enumerate() {
                    let src = t0 * QK + k * 64 + 4 * i;
                    dst[4 * (lane0 + i)..4 * (lane0 + i) + 4].copy_from_slice(&a.qs[src..src + 4]);
                }
                d[q][lane0 + i] = a.d[t0 + i];
                s[q][lane0 + i] = a.s[t0 + i];
                sums[q][lane0 + i] = a.sums[t0 + i];
            }
        }
        let mut pair_idx = [_mm512_setzero_si512(); 4];
        for (pr, idx) in pair_idx.iter_mut().enumerate() {
            let (a, b) = (((2 * pr) % per * gp) as i32, ((2 * pr + 1) % per * gp) as i32);
            let lanes: [i32; 16] = std::array::from_fn(|l| (if l < 8 { a + l as i32 } else { b + l as i32 - 8 }) & 15);
            *idx = _mm512_loadu_si512(lanes.as_ptr() as *const _);
        }
        let m = (1u16 << g) - 1;
        let mut p = Panels {
            g,
            gp,
            per,
            n,
            qs: [[_mm512_setzero_si512(); 8]; 4],
            d: [_mm512_setzero_ps(); 4],
            s: [_mm512_setzero_ps(); 4],
            sums: [_mm512_setzero_si512(); 4],
            pair_idx,
            pair_lanes: m | m << 8,
        };
        for q in 0..n {
            for k in 0..8 {
                p.qs[q][k] = _mm512_loadu_si512(qs[q][k].as_ptr() as *const _);
            }
            p.d[q] = _mm512_loadu_ps(d[q].as_ptr());
            p.s[q] = _mm512_loadu_ps(s[q].as_ptr());
            p.sums[q] = _mm512_loadu_si512(sums[q].as_ptr() as *const _);
        }
        Some(p)
    }

    /// The `bytes` at `p` (at most `4 * gp`) repeated every `4 * gp` bytes, zeros filling each repeat.
    #[inline(always)]
    unsafe fn bcast512(p: *const u8, bytes: usize, gp: usize) -> __m512i {
        match gp {
            1 => _mm512_set1_epi32((p as *const i32).read_unaligned()),
            2 => _mm512_broadcastq_epi64(_mm_maskz_loadu_epi8((1u16 << bytes) - 1, p as *const i8)),
            4 => _mm512_broadcast_i32x4(_mm_maskz_loadu_epi8(((1u32 << bytes) - 1) as u16, p as *const i8)),
            _ => _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi8(((1u64 << bytes) - 1) as u32, p as *const i8)),
        }
    }

    /// `g` f16 values at `p` as f32, repeated every `gp` lanes (zeros filling each repeat).
    #[inline(always)]
    unsafe fn bcast_scales512(p: *const u8, g: usize, gp: usize) -> __m512 {
        let h = match gp {
            1 => _mm256_set1_epi16((p as *const i16).read_unaligned()),
            2 => _mm256_set1_epi32((p as *const i32).read_unaligned()),
            4 => _mm256_broadcastq_epi64(_mm_maskz_loadu_epi16((1u8 << g) - 1, p as *const i16)),
            _ => _mm256_broadcastsi128_si256(_mm_maskz_loadu_epi16(((1u16 << g) - 1) as u8, p as *const i16)),
        };
        _mm512_cvtph_ps(h)
    }

    /// A group's weights: `gp == 0` as they are (a short group masked), else broadcast to every row of a
    /// panel (period `gp` blocks). Q4_0 and Q8_0 weights become unsigned (`+8`, `+128`); the kernel
    /// subtracts the offset times the activations' sum.
    #[inline(always)]
    unsafe fn group512(f: IntFormat, grp: *const u8, g: usize, gp: usize) -> Group512 {
        let full = g == GROUP;
        let mut w = [_mm512_setzero_si512(); 8];
        match f {
            IntFormat::Q4_0 | IntFormat::Q4_1 => {
                let m = _mm512_set1_epi8(0x0F);
                for c in 0..4 {
                    let v = values512(grp.add(c * 4 * g), g, gp);
                    w[c] = _mm512_and_si512(v, m);
                    w[c + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m);
                }
            }
            IntFormat::Q8_0 => {
                let m = _mm512_set1_epi8(-128);
                for (k, wk) in w.iter_mut().enumerate() {
                    *wk = _mm512_xor_si512(values512(grp.add(k * 4 * g), g, gp), m);
                }
            }
        }
        let s = pack::scales_at(f, g);
        let dw = scales_of512(grp.add(s), g, gp);
        let mw = if f == IntFormat::Q4_1 { scales_of512(grp.add(s + 2 * g), g, gp) } else { _mm512_setzero_ps() };
        Group512 { w, dw, mw, lanes: if full { !0 } else { (1u16 << g) - 1 } }
    }

    /// One chunk of a group's values (`4g` bytes at `p`): as they are, or repeated every `4 * gp` bytes.
    #[inline(always)]
    unsafe fn values512(p: *const u8, g: usize, gp: usize) -> __m512i {
        if gp == 0 {
            load512(p, g == GROUP, 4 * g)
        } else {
            bcast512(p, 4 * g, gp)
        }
    }

    /// A group's `g` f16 scales as f32: as they are, or repeated every `gp` lanes.
    #[inline(always)]
    unsafe fn scales_of512(p: *const u8, g: usize, gp: usize) -> __m512 {
        if gp == 0 {
            scales512(p, g == GROUP, g)
        } else {
            bcast_scales512(p, g, gp)
        }
    }

    /// `R` activation rows against one weight row.
    #[inline(always)]
    unsafe fn rows512<const R: usize>(f: IntFormat, w: &[u8], acts: &[Q8Row], out: Out, prep: &Prep512) {
        let tail = &prep.panels;
        let nb = w.len() / f.block_bytes();
        // a short last group goes through the panels when there are any
        let grouped = if tail.is_some() { nb / GROUP * GROUP } else { nb };
        let acc = groups512::<R>(f, w, grouped, acts);
        let Some(pn) = tail else {
            return finish512::<R>(&acc, None, out);
        };
        let grp = w.as_ptr().add(grouped * f.block_bytes());
        prefetch(grp, pn.g * f.block_bytes());
        let tw = group512(f, grp, pn.g, pn.gp);
        let mut terms = [_mm512_setzero_ps(); 4];
        for (q, term) in terms.iter_mut().enumerate().take(pn.n) {
            let p = block_sums512(&tw.w, pn.qs[q].as_ptr() as *const i8);
            *term = term512(f, tw.dw, tw.mw, p, pn.sums[q], pn.d[q], pn.s[q]);
        }
        // row r's terms sit in lanes (r % per) * gp .. + g of panel r / per; both rows of an even pair
        // sit in one panel
        let mut pairs = [_mm512_setzero_ps(); 4];
        for (p, t) in pairs.iter_mut().enumerate().take(R.div_ceil(2)) {
            *t = _mm512_permutexvar_ps(pn.pair_idx[p], terms[2 * p / pn.per]);
        }
        finish512::<R>(&acc, Some((&pairs, pn.pair_lanes)), out);
    }

    /// The accumulators of `R` activation rows against one weight row over its first `blocks` blocks
    /// (whole groups, and a short last group masked when `blocks` ends the row).
    #[inline(always)]
    unsafe fn groups512<const R: usize>(f: IntFormat, w: &[u8], blocks: usize, acts: &[Q8Row]) -> [__m512; R] {
        let bb = f.block_bytes();
        let nb = w.len() / bb;
        debug_assert!(acts.len() == R);
        debug_assert!(acts.iter().all(|a| a.qs.len() >= nb.div_ceil(GROUP) * ACT_GROUP && a.d.len() >= nb.div_ceil(GROUP) * GROUP));
        let (qs, d, s, sums) = act_ptrs::<R>(acts);
        let wp = w.as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        let mut gi = 0;
        while gi * GROUP < blocks {
            let g = (nb - gi * GROUP).min(GROUP);
            let grp = wp.add(gi * GROUP * bb);
            prefetch(grp, g * bb);
            let gw = group512(f, grp, g, 0);
            for r in 0..R {
                let at = gi * GROUP;
                let p = block_sums512(&gw.w, qs[r].add(gi * ACT_GROUP));
                let (da, sa) = (_mm512_loadu_ps(d[r].add(at)), _mm512_loadu_ps(s[r].add(at)));
                let term = term512(f, gw.dw, gw.mw, p, _mm512_loadu_si512(sums[r].add(at) as *const _), da, sa);
                acc[r] = _mm512_mask_add_ps(acc[r], gw.lanes, acc[r], term);
            }
            gi += 1;
        }
        acc
    }

    /// One activation row's short last group of 1 or 2 blocks, laid out for [`rows512_8x1`]: chunk `k`
    /// of block `b` in lane `k * g + b` (the layout of a weight row's last group), repeated in both halves
    /// where two weight rows share a register; scales and sums in lanes `b` and `8 + b`.
    pub(super) struct TailOne {
        g: usize,
        /// Q4: chunks 0..4 (low nibbles' values) and 4..8 (high nibbles'); Q8_0: all 8 chunks in `lo`
        lo: __m512i,
        hi: __m512i,
        d: __m512,
        s: __m512,
        sums: __m512i,
        lanes: __mmask16,
    }

    /// What [`rows512`] and [`rows512_8x1`] share across the weight rows of a tile.
    pub(super) struct Prep512 {
        panels: Option<Panels>,
        one: Option<TailOne>,
    }

    #[inline(always)]
    pub(super) unsafe fn prep512<const R: usize>(f: IntFormat, rb: usize, acts: &[Q8Row]) -> Prep512 {
        let nb = rb / f.block_bytes();
        let g = nb % GROUP;
        let one = if R == 1 && (g == 1 || g == 2) {
            let a = &acts[0];
            let t0 = nb - g;
            let mut v = [[0i32; 16]; 2];
            // chunk k (values 4k..4k+4) of block t0 + b
            let chunk = |k: usize, b: usize| (a.qs.as_ptr().add(pack::act_index(t0 + b, 4 * k)) as *const i32).read_unaligned();
            let (mut d, mut s, mut sums) = ([0f32; 16], [0f32; 16], [0i32; 16]);
            for b in 0..g {
                match f {
                    IntFormat::Q4_0 | IntFormat::Q4_1 => {
                        for c in 0..4 {
                            for half in 0..2 {
                                v[0][8 * half + c * g + b] = chunk(c, b);
                                v[1][8 * half + c * g + b] = chunk(4 + c, b);
                            }
                        }
                    }
                    IntFormat::Q8_0 => {
                        for k in 0..8 {
                            if g == 1 {
                                v[0][k] = chunk(k, b);
                                v[0][8 + k] = chunk(k, b);
                            } else {
                                v[0][k * g + b] = chunk(k, b);
                            }
                        }
                    }
                }
                for half in 0..2 {
                    d[8 * half + b] = a.d[t0 + b];
                    s[8 * half + b] = a.s[t0 + b];
                    sums[8 * half + b] = a.sums[t0 + b];
                }
            }
            let m = (1u16 << g) - 1;
            Some(TailOne {
                g,
                lo: _mm512_loadu_si512(v[0].as_ptr() as *const _),
                hi: _mm512_loadu_si512(v[1].as_ptr() as *const _),
                d: _mm512_loadu_ps(d.as_ptr()),
                s: _mm512_loadu_ps(s.as_ptr()),
                sums: _mm512_loadu_si512(sums.as_ptr() as *const _),
                lanes: m | m << 8,
            })
        } else {
            None
        };
        Prep512 { panels: if one.is_some() { None } else { panels512::<R>(f, rb, acts) }, one }
    }

    /// A Q8_0 row's 2-block last group at `p` against the activation chunks `a`, one row per register:
    /// chunks `k` and `k + 4` summed into the low half.
    #[inline(always)]
    unsafe fn q8_tail2(p: *const u8, a: __m512i) -> __m512i {
        let v = _mm512_xor_si512(_mm512_loadu_si512(p as *const _), _mm512_set1_epi8(-128));
        let x = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, a);
        _mm512_add_epi32(x, _mm512_shuffle_i64x2::<0b01_00_11_10>(x, x))
    }

    /// The `g` (1 or 2) f16 values at `a` and at `b` as f32 in lanes `0..g` and `8..8 + g`.
    #[inline(always)]
    unsafe fn pair_scales(a: *const u8, b: *const u8, g: usize) -> __m512 {
        let h = |p: *const u8| if g == 1 { (p as *const u16).read_unaligned() as i32 } else { (p as *const i32).read_unaligned() };
        _mm512_cvtph_ps(_mm256_setr_epi32(h(a), 0, 0, 0, h(b), 0, 0, 0))
    }

    /// Weight rows `j0..j0 + 8` of `w` against one activation row whose short last group is `t`: the
    /// whole groups row by row, the last groups of two weight rows per register (their block sums in
    /// lanes `b` and `8 + b`, the pairs [`finish512`] adds), then the eight results reduced side by side.
    /// Returns how many rows it did (a multiple of 8).
    #[inline(always)]
    unsafe fn rows512_8x1(f: IntFormat, w: &[u8], rb: usize, act: &Q8Row, out: Out, t: &TailOne) -> usize {
        let nb = rb / f.block_bytes();
        let (g, grouped) = (t.g, nb - t.g);
        let n = w.len() / rb / 8 * 8;
        let s = pack::scales_at(f, g);
        for j0 in (0..n).step_by(8) {
            let mut acc = [_mm512_setzero_ps(); 8];
            for (j, a) in acc.iter_mut().enumerate() {
                *a = groups512::<1>(f, &w[(j0 + j) * rb..(j0 + j + 1) * rb], grouped, std::slice::from_ref(act))[0];
            }
            let mut pairs = [_mm512_setzero_ps(); 4];
            for (p, pair) in pairs.iter_mut().enumerate() {
                let j = 2 * p;
                // (plain pointers and functions: a closure would not inherit the caller's target features)
                let (tj, tj1) =
                    (w.as_ptr().add((j0 + j) * rb + grouped * f.block_bytes()), w.as_ptr().add((j0 + j + 1) * rb + grouped * f.block_bytes()));
                let x = match f {
                    IntFormat::Q4_0 | IntFormat::Q4_1 => {
                        let m = u32::MAX >> (32 - 16 * g);
                        let v = _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(m, tj as *const i8)),
                            _mm256_maskz_loadu_epi8(m, tj1 as *const i8),
                        );
                        let m4 = _mm512_set1_epi8(0x0F);
                        let lo = _mm512_and_si512(v, m4);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                        _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, t.lo), hi, t.hi)
                    }
                    IntFormat::Q8_0 if g == 1 => {
                        let v = _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(_mm256_loadu_si256(tj as *const __m256i)),
                            _mm256_loadu_si256(tj1 as *const __m256i),
                        );
                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(v, _mm512_set1_epi8(-128)), t.lo)
                    }
                    IntFormat::Q8_0 => _mm512_shuffle_i64x2::<0x44>(q8_tail2(tj, t.lo), q8_tail2(tj1, t.lo)),
                };
                // in each half, the lanes of one block (lane mod g) summed: quarters, then 64-bit halves
                let x = _mm512_add_epi32(x, _mm512_shuffle_i32x4::<0b10_11_00_01>(x, x));
                let mut x = _mm512_add_epi32(x, _mm512_shuffle_epi32::<0b01_00_11_10>(x));
                if g == 1 {
                    x = _mm512_add_epi32(x, _mm512_shuffle_epi32::<0b10_11_00_01>(x));
                }
                let dw = pair_scales(tj.add(s), tj1.add(s), g);
                let mw = if f == IntFormat::Q4_1 { pair_scales(tj.add(s + 2 * g), tj1.add(s + 2 * g), g) } else { _mm512_setzero_ps() };
                *pair = term512(f, dw, mw, x, t.sums, t.d, t.s);
            }
            finish512::<8>(&acc, Some((&pairs, t.lanes)), Out { ptr: out.ptr.add(j0), stride: 1 });
        }
        n
    }

    /// The results of `R <= 8` rows from their accumulators (and the short last group's terms, in panels),
    /// reduced side by side: each step adds the same pairs of lanes as [`reduce`] (after the last group's
    /// terms are added to lanes `0..g`), for several rows per instruction.
    #[inline(always)]
    unsafe fn finish512<const R: usize>(acc: &[__m512; R], tail: Option<(&[__m512; 4], __mmask16)>, out: Out) {
        debug_assert!(R <= 8);
        let zero = _mm512_setzero_ps();
        // rows 2p, 2p+1: lanes 0..8 and 8..16 of h[p] hold h[i] = a[i] + a[i+8] of each
        let mut h = [zero; 4];
        for p in 0..R.div_ceil(2) {
            let (a, b) = (acc[2 * p], if 2 * p + 1 < R { acc[2 * p + 1] } else { zero });
            let mut lo = _mm512_shuffle_f32x4::<0x44>(a, b);
            let hi = _mm512_shuffle_f32x4::<0xEE>(a, b);
            if let Some((pairs, lanes)) = tail {
                lo = _mm512_mask_add_ps(lo, lanes, lo, pairs[p]);
            }
            h[p] = _mm512_add_ps(lo, hi);
        }
        // quarter q of e[k] is row 4k+q: e[i] = h[i] + h[i+4]
        let e0 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(h[0], h[1]), _mm512_shuffle_f32x4::<0xDD>(h[0], h[1]));
        let e1 = if R > 4 { _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(h[2], h[3]), _mm512_shuffle_f32x4::<0xDD>(h[2], h[3])) } else { zero };
        // quarter q: e0+e2, e1+e3 of row q, then of row q+4
        let f = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(e0, e1), _mm512_shuffle_ps::<0xEE>(e0, e1));
        // lane 4q: row q, lane 4q+1: row q+4
        let z = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(f, f), _mm512_shuffle_ps::<0xDD>(f, f));
        let mut v = [0f32; 16];
        _mm512_storeu_ps(v.as_mut_ptr(), z);
        for r in 0..R {
            out.put(0, r, v[4 * (r % 4) + r / 4]);
        }
    }

    /// A group's canonical per-block terms from its block sums `p`: the Q4_0/Q8_0 offset taken back out
    /// with the activations' integer sums, then `(dw*da)*p`, plus `mw*sa` for Q4_1 (the sums' lanes are
    /// unused for Q4_1 and `sa`'s for the others).
    #[inline(always)]
    unsafe fn term512(f: IntFormat, dw: __m512, mw: __m512, p: __m512i, sums: __m512i, da: __m512, sa: __m512) -> __m512 {
        let p = match f {
            IntFormat::Q4_0 => _mm512_sub_epi32(p, _mm512_slli_epi32::<3>(sums)),
            IntFormat::Q8_0 => _mm512_sub_epi32(p, _mm512_slli_epi32::<7>(sums)),
            IntFormat::Q4_1 => p,
        };
        let term = _mm512_mul_ps(_mm512_mul_ps(dw, da), _mm512_cvtepi32_ps(p));
        if f == IntFormat::Q4_1 {
            _mm512_add_ps(term, _mm512_mul_ps(mw, sa))
        } else {
            term
        }
    }

    /// Activation rows `r0..r0 + R` against every weight row of `w`: those rows' activations stay in the
    /// first-level cache while the weight rows stream past.
    macro_rules! tile_fn {
        ($name:ident, $rows:ident, $prep:ident, $lead:ident, $features:literal, $max:expr, [$($n:literal),*]) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(f: IntFormat, w: &[u8], rb: usize, acts: &[Q8Row], out: Out) {
                #[inline(always)]
                unsafe fn chunk<const R: usize>(f: IntFormat, w: &[u8], rb: usize, acts: &[Q8Row], out: Out, r0: usize) {
                    let acts = &acts[r0..r0 + R];
                    let prep = $prep::<R>(f, rb, acts);
                    let done = $lead::<R>(f, w, rb, acts, Out { ptr: out.ptr.add(r0 * out.stride), stride: out.stride }, &prep);
                    for (j, wr) in w.chunks_exact(rb).enumerate().skip(done) {
                        $rows::<R>(f, wr, acts, Out { ptr: out.ptr.add(r0 * out.stride + j), stride: out.stride }, &prep);
                    }
                }
                #[inline(always)]
                unsafe fn all(f: IntFormat, w: &[u8], rb: usize, acts: &[Q8Row], out: Out) {
                    // weight rows in slices that stay in the second-level cache while every chunk of
                    // activation rows passes over them
                    let per = (SLICE_BYTES / rb).max(1);
                    for (s, ws) in w.chunks(per * rb).enumerate() {
                        let out = Out { ptr: out.ptr.add(s * per), stride: out.stride };
                        let mut r = 0;
                        while r + $max <= acts.len() {
                            chunk::<{ $max }>(f, ws, rb, acts, out, r);
                            r += $max;
                        }
                        match acts.len() - r {
                            0 => {}
                            $($n => chunk::<$n>(f, ws, rb, acts, out, r),)*
                            _ => unreachable!("fewer rows than a chunk are left"),
                        }
                    }
                }
                // the first weights of this range, which no earlier group prefetched
                let mut off = 0;
                while off < w.len().min(PREFETCH) {
                    _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().add(off) as *const i8);
                    off += 64;
                }
                // one specialised copy per format
                match f {
                    IntFormat::Q4_0 => all(IntFormat::Q4_0, w, rb, acts, out),
                    IntFormat::Q4_1 => all(IntFormat::Q4_1, w, rb, acts, out),
                    IntFormat::Q8_0 => all(IntFormat::Q8_0, w, rb, acts, out),
                }
            }
        };
    }

    /// The leading weight rows a single activation row with a 1- or 2-block last group takes eight at a
    /// time (decode's common case: a 576-wide row is 16 + 2 blocks).
    #[inline(always)]
    unsafe fn lead512<const R: usize>(f: IntFormat, w: &[u8], rb: usize, acts: &[Q8Row], out: Out, prep: &Prep512) -> usize {
        // (`one` is only prepared for a single activation row; a `match`, not a closure, which would not
        // inherit the caller's target features)
        match &prep.one {
            Some(t) => rows512_8x1(f, w, rb, &acts[0], out, t),
            None => 0,
        }
    }

    tile_fn!(tile_avx512, rows512, prep512, lead512, "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni", ROWS_512, [1, 2, 3, 4, 5]);

    // ---- AVX2: a group in two halves of 8 blocks ----

    /// Half `h` of a group's weights: 8 registers of bytes (Q4: unsigned nibbles; Q8_0: absolute values,
    /// with the signed values kept to move their signs onto the activations), scales, the lanes in use.
    struct Half256 {
        w: [__m256i; 8],
        signs: [__m256i; 8],
        dw: __m256,
        mw: __m256,
        lanes: __m256,
        blocks: usize,
    }

    #[inline(always)]
    unsafe fn load256(p: *const u8, blocks: usize, mask: __m256i) -> __m256i {
        if blocks == 8 {
            _mm256_loadu_si256(p as *const __m256i)
        } else {
            _mm256_maskload_epi32(p as *const i32, mask)
        }
    }

    #[inline(always)]
    unsafe fn scales256(p: *const u8, blocks: usize) -> __m256 {
        let h = if blocks == 8 {
            _mm_loadu_si128(p as *const __m128i)
        } else {
            let mut buf = [0u16; 8];
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr() as *mut u8, 2 * blocks);
            _mm_loadu_si128(buf.as_ptr() as *const __m128i)
        };
        _mm256_cvtph_ps(h)
    }

    #[inline(always)]
    unsafe fn half256(f: IntFormat, grp: *const u8, g: usize, h: usize) -> Half256 {
        let blocks = g.saturating_sub(8 * h).min(8);
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(blocks as i32), idx);
        let mut w = [_mm256_setzero_si256(); 8];
        let mut signs = [_mm256_setzero_si256(); 8];
        match f {
            IntFormat::Q4_0 | IntFormat::Q4_1 => {
                let m = _mm256_set1_epi8(0x0F);
                for c in 0..4 {
                    let v = load256(grp.add(c * 4 * g + 32 * h), blocks, mask);
                    w[c] = _mm256_and_si256(v, m);
                    w[c + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m);
                }
            }
            IntFormat::Q8_0 => {
                for k in 0..8 {
                    let v = load256(grp.add(k * 4 * g + 32 * h), blocks, mask);
                    signs[k] = v;
                    w[k] = _mm256_sign_epi8(v, v);
                }
            }
        }
        let s = pack::scales_at(f, g) + 16 * h;
        let dw = scales256(grp.add(s), blocks);
        let mw = if f == IntFormat::Q4_1 { scales256(grp.add(s + 2 * g), blocks) } else { _mm256_setzero_ps() };
        Half256 { w, signs, dw, mw, lanes: _mm256_castsi256_ps(mask), blocks }
    }

    #[inline(always)]
    unsafe fn ld256(a: *const i8, k: usize) -> __m256i {
        _mm256_loadu_si256(a.add(k * 64) as *const __m256i)
    }

    /// The 8 block sums of half `h` of a group for the activation values at `a` (that group's start).
    #[inline(always)]
    unsafe fn sums256(f: IntFormat, hw: &Half256, a: *const i8, h: usize, sums: *const i32) -> __m256i {
        let a = a.add(32 * h);
        let ones = _mm256_set1_epi16(1);
        match f {
            IntFormat::Q4_0 | IntFormat::Q4_1 => {
                // nibble x 8-bit pairs stay within i16 even summed over all 8 chunks (8 * 2 * 15 * 127)
                let mut p0 = _mm256_maddubs_epi16(hw.w[0], ld256(a, 0));
                let mut p1 = _mm256_maddubs_epi16(hw.w[1], ld256(a, 1));
                for k in (2..8).step_by(2) {
                    p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(hw.w[k], ld256(a, k)));
                    p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(hw.w[k + 1], ld256(a, k + 1)));
                }
                let p = _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones);
                if f == IntFormat::Q4_0 {
                    _mm256_sub_epi32(p, _mm256_slli_epi32::<3>(_mm256_loadu_si256(sums as *const __m256i)))
                } else {
                    p
                }
            }
            IntFormat::Q8_0 => {
                let mut p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(hw.w[0], _mm256_sign_epi8(ld256(a, 0), hw.signs[0])), ones);
                let mut p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hw.w[1], _mm256_sign_epi8(ld256(a, 1), hw.signs[1])), ones);
                for k in (2..8).step_by(2) {
                    p0 = _mm256_add_epi32(p0, _mm256_madd_epi16(_mm256_maddubs_epi16(hw.w[k], _mm256_sign_epi8(ld256(a, k), hw.signs[k])), ones));
                    p1 = _mm256_add_epi32(
                        p1,
                        _mm256_madd_epi16(_mm256_maddubs_epi16(hw.w[k + 1], _mm256_sign_epi8(ld256(a, k + 1), hw.signs[k + 1])), ones),
                    );
                }
                _mm256_add_epi32(p0, p1)
            }
        }
    }

    #[inline(always)]
    unsafe fn no_prep<const R: usize>(_: IntFormat, _: usize, _: &[Q8Row]) {}

    /// `R` activation rows against one weight row.
    #[inline(always)]
    unsafe fn rows256<const R: usize>(f: IntFormat, w: &[u8], acts: &[Q8Row], out: Out, _: &()) {
        let bb = f.block_bytes();
        let nb = w.len() / bb;
        debug_assert!(acts.len() == R);
        debug_assert!(acts.iter().all(|a| a.qs.len() >= nb.div_ceil(GROUP) * ACT_GROUP && a.d.len() >= nb.div_ceil(GROUP) * GROUP));
        let (qs, d, s, sums) = act_ptrs::<R>(acts);
        let wp = w.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut gi = 0;
        while gi * GROUP < nb {
            let g = (nb - gi * GROUP).min(GROUP);
            let grp = wp.add(gi * GROUP * bb);
            prefetch(grp, g * bb);
            for h in 0..2 {
                if 8 * h >= g {
                    break;
                }
                let hw = half256(f, grp, g, h);
                let at = gi * GROUP + 8 * h;
                for r in 0..R {
                    let p = sums256(f, &hw, qs[r].add(gi * ACT_GROUP), h, sums[r].add(at));
                    let dd = _mm256_mul_ps(hw.dw, _mm256_loadu_ps(d[r].add(at)));
                    let mut term = _mm256_mul_ps(dd, _mm256_cvtepi32_ps(p));
                    if f == IntFormat::Q4_1 {
                        term = _mm256_add_ps(term, _mm256_mul_ps(hw.mw, _mm256_loadu_ps(s[r].add(at))));
                    }
                    let t = _mm256_add_ps(acc[r][h], term);
                    acc[r][h] = if hw.blocks == 8 { t } else { _mm256_blendv_ps(acc[r][h], t, hw.lanes) };
                }
            }
            gi += 1;
        }
        for r in 0..R {
            out.put(0, r, reduce8(_mm256_add_ps(acc[r][0], acc[r][1])));
        }
    }

    #[inline(always)]
    unsafe fn no_lead<const R: usize>(_: IntFormat, _: &[u8], _: usize, _: &[Q8Row], _: Out, _: &()) -> usize {
        0
    }

    tile_fn!(tile_avx2, rows256, no_prep, no_lead, "avx2,f16c", ROWS_256, [1, 2, 3]);
}
