//! The AVX-512 VNNI kernel: the 16 weight rows of a tile side by side in the lanes of each register.
//!
//! A register holds one 4-value chunk of one block for the tile's 16 rows (the layout of
//! [`super::pack`]), and one `dpbusd` against that chunk of an activation block broadcast to every lane
//! adds 4 products to each of the 16 rows' block sums: eight of them give the block's exact integer sums
//! `p_b` for 16 weight rows. The scaling is the canonical one of [`super::simd`] with the 16 weight rows
//! side by side: lane accumulator `l` takes `acc + (dw_b*da_b) * p_b` (Q4_1: `acc + ((dw_b*da_b) * p_b +
//! mw_b*sa_b)`) for the blocks `b = l, l + 16, ...` in order, starting from 0.0. With several activation
//! rows the lane accumulators are formed in pairs `(i, i + 8)`, the first step of the fixed reduction
//! (`h[i] = acc[i] + acc[i + 8]`), and the eight pairs are added in the tree's order, so per activation
//! row only two accumulators are live while the blocks stream; a single activation row (decode) takes the
//! blocks in their order into 16 lane accumulators instead (every block independent until the reduction).
//! Either way the results of 16 weight rows come out in one register. Same operations in the same order:
//! the scalar reference's bits, for any row width (no short-group special case) and any number of
//! activation rows.
//!
//! Up to [`ROWS`] activation rows share each block's weights (4 over an unpacked tile on AMD Zen 4:
//! [`rows_per_pass`]); fewer than [`PREP_ROWS`] rows unpack the nibbles as they stream the tiles
//! (prefetching [`PREFETCH`] bytes ahead into L1 and [`STREAM_FAR`] bytes ahead into L2), and
//! with more the first pass over a tile also stores its blocks unpacked into a buffer
//! ([`super::wtile::WeightTile`]) that the passes after it read.

use std::arch::x86_64::*;
use std::cell::{Cell, RefCell};
use std::sync::OnceLock;

use super::dot::{AlignedBytes, Q8Row};
use super::pack::{self, GROUP, QK, TILE};
use super::simd::{IntFormat, Out};
use super::wtile::{self, Prefetch, WeightTile, PREFETCH};

/// Most activation rows multiplied together by one pass over a tile.
const ROWS: usize = 6;

/// Rows per pass on an AMD Zen 4 core ([`rows_per_pass`]).
const ZEN4_ROWS: usize = 4;

/// Activation rows per pass over an unpacked tile on this CPU: [`ZEN4_ROWS`] on AMD's family 19h
/// (Zen 4: Zen 3 has no AVX-512, so it never runs this kernel), [`ROWS`] elsewhere;
/// `FLOTILLA_VNNI_ROWS=4|6` overrides it. A pass of 6 rows keeps more values live than 32 registers hold
/// (the reduction's partial sums besides a block's weights and the rows' accumulators), on any core; on
/// Zen 4, 4 rows a pass in a copy of the kernel compiled on its own made a batched step of 32 sequences
/// faster on one thread, median 1.04x over nine paired runs (1.01-1.08x; BENCHMARKS.md, 2026-12-06,
/// eighteenth session). On Intel (the AMX host kind, its AVX-512 kernel timed alone) 4 rows a pass was
/// 0.90-1.01x of 6 (BENCHMARKS.md, 2026-12-07), so 6 stays there; on the Zen 5 VM (family 1Ah) 4 rows
/// a pass ran a batched step of 32 sequences at 0.95-0.97x of 6 on one thread and 1.01x on two, and
/// prefill at 0.91-0.96x (paired runs, two each; twenty-fourth session), so 6 stays there too.
pub fn rows_per_pass() -> usize {
    static PER: OnceLock<usize> = OnceLock::new();
    *PER.get_or_init(|| match std::env::var("FLOTILLA_VNNI_ROWS").as_deref() {
        Ok("4") => ZEN4_ROWS,
        Ok("6") => ROWS,
        _ if amd_family() == Some(0x19) => ZEN4_ROWS,
        _ => ROWS,
    })
}

/// How far ahead of the tile being multiplied the streaming path (fewer than [`PREP_ROWS`] rows: decode)
/// also asks for the weights into L2, in bytes, beyond the [`PREFETCH`] bytes it asks for into L1; at
/// least [`PREFETCH`] beyond the L1 prefetch, so a tile wider than 16 KiB (rows of more than about 1,600
/// Q4_1 values; none in the default model) is not asked for twice at one distance. Against L1 alone,
/// single-stream decode ran faster on Zen 4 (medians 1.03x on one thread, 1.05x on two) and on the
/// 480 MiB-L3 AMX host (1.01-1.08x); on Zen 5 its sign followed the host's speed (1.04x while it ran
/// slow, 0.93-1.00x while fast). 24 KiB ran level with 32 on Zen 4 and the AMX host; 64 KiB was slower on
/// the AMX host's two threads and on Zen 5. Every distance's paired runs are in BENCHMARKS.md
/// (2026-12-07, twenty-second to twenty-fourth sessions). On Emerald Rapids without AMX (twenty-seventh
/// session, six alternating pairs of runs) it ran one thread's decode at 0.90-1.38x (median 1.11x) and
/// two threads' at 0.95-1.04x (median 0.98x), whose halves of the model sit in the L3 there.
const STREAM_FAR: usize = 3 * PREFETCH;

/// The CPU family of an AMD processor (base plus extended family, as the vendor's manuals count it).
fn amd_family() -> Option<u32> {
    // SAFETY: leaves 0 and 1 exist on every x86-64 processor (newer toolchains declare `__cpuid` safe)
    #[allow(unused_unsafe)]
    let (vendor, sig) = unsafe { (__cpuid(0), __cpuid(1).eax) };
    let name: Vec<u8> = [vendor.ebx, vendor.edx, vendor.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    let base = (sig >> 8) & 0xF;
    (name == b"AuthenticAMD").then(|| if base == 0xF { base + ((sig >> 20) & 0xFF) } else { base })
}

/// Fewest activation rows for which a tile is unpacked once into a buffer instead of in every pass.
pub const PREP_ROWS: usize = 8;
const _: () = assert!(PREP_ROWS > ROWS && PREP_ROWS > ZEN4_ROWS, "a tile's first pass leaves rows for the passes after it");

thread_local! {
    static SCRATCH: RefCell<WeightTile> = RefCell::new(WeightTile::default());
    static SPARE_PASSES: Cell<Option<PassRows>> = const { Cell::new(None) };
}

/// Activation rows laid out for the passes, once per matmul: pass `p` holds rows `p * per..` (at most
/// `per`, the rows per pass) block after block, each block's rows side by side (values `[b][r][32]`, then
/// `d`, `s` and `sums` and `lo_sums` as `[b][r]`), so a pass reaches every row from one base at fixed
/// offsets.
#[derive(Default)]
pub struct PassRows {
    per: usize,
    qs: AlignedBytes,
    d: Vec<f32>,
    s: Vec<f32>,
    sums: Vec<i32>,
    lo_sums: Vec<i32>,
}

impl PassRows {
    /// Laid out for this CPU's passes: [`rows_per_pass`] over an unpacked tile, [`ROWS`] below
    /// [`PREP_ROWS`] rows (each pass over a packed tile unpacks it again).
    pub fn new(rows: &[Q8Row]) -> Self {
        Self::with_rows_per_pass(rows, if rows.len() < PREP_ROWS { ROWS } else { rows_per_pass() })
    }

    /// Laid out for passes of `per` rows: [`ROWS`] or [`ZEN4_ROWS`] (the kernel has a copy for each).
    pub fn with_rows_per_pass(rows: &[Q8Row], per: usize) -> Self {
        assert!(per == ROWS || per == ZEN4_ROWS, "{per} rows a pass");
        let (nb, m) = (rows.first().map_or(0, Q8Row::blocks), rows.len());
        // this thread's buffers of the last call, if it gave them back (every value is written below)
        let mut p = wtile::take_spare(&SPARE_PASSES);
        p.per = per;
        wtile::refill(&mut p.d, m * nb, 0.0);
        wtile::refill(&mut p.s, m * nb, 0.0);
        wtile::refill(&mut p.sums, m * nb, 0);
        wtile::refill(&mut p.lo_sums, m * nb, 0);
        p.qs.reset_zeroed(m * nb * QK);
        for (i, row) in rows.iter().enumerate() {
            let (p0, r) = (i / per * per, i % per);
            let n = (m - p0).min(per);
            for b in 0..nb {
                let at = p0 * nb + b * n + r;
                p.qs[at * QK..(at + 1) * QK].copy_from_slice(&row.qs[pack::act_index(b, 0)..pack::act_index(b + 1, 0)]);
                (p.d[at], p.s[at], p.sums[at], p.lo_sums[at]) = (row.d[b], row.s[b], row.sums[b], row.lo_sums[b]);
            }
        }
        p
    }

    /// Keeps these buffers for this thread's next [`PassRows::new`] (a batched decode step lays out
    /// rows for every matmul).
    pub fn recycle(self) {
        wtile::keep_spare(&SPARE_PASSES, self);
    }

    /// Rows per pass of this layout.
    #[cfg(test)]
    pub(crate) fn per(&self) -> usize {
        self.per
    }

    /// The pass starting at row `r0` of rows with `nb` blocks.
    fn pass(&self, r0: usize, nb: usize) -> PassPtrs {
        let at = r0 * nb;
        PassPtrs {
            qs: self.qs[at * QK..].as_ptr(),
            d: self.d[at..].as_ptr(),
            s: self.s[at..].as_ptr(),
            sums: self.sums[at..].as_ptr(),
            lo_sums: self.lo_sums[at..].as_ptr(),
        }
    }
}

/// One pass's rows in [`PassRows`] (or one block of them, [`lane`]): its first values, scales, scaled
/// sums and integer sums (of the blocks and of their first halves).
#[derive(Clone, Copy)]
struct PassPtrs {
    qs: *const i8,
    d: *const f32,
    s: *const f32,
    sums: *const i32,
    lo_sums: *const i32,
}

/// `tiles_as` specialised for format `f` (one copy per format) and `$rp` rows a pass: a macro, so each
/// caller's copies are compiled into that caller with its target features.
macro_rules! by_format {
    ($f:expr, $rp:ident, ($($arg:expr),*)) => {
        match $f {
            IntFormat::Q4_0 => tiles_as::<Q4_0, $rp>($($arg),*),
            IntFormat::Q4_1 => tiles_as::<Q4_1, $rp>($($arg),*),
            IntFormat::Q8_0 => tiles_as::<Q8_0, $rp>($($arg),*),
            IntFormat::Q4K => tiles_as::<Q4K, $rp>($($arg),*),
            IntFormat::Q5 => tiles_as::<Q5, $rp>($($arg),*),
            IntFormat::Q6K => tiles_as::<Q6K, $rp>($($arg),*),
        }
    };
}

/// `w_j · acts[i]` into `out` for the `n` weight rows `w_j` held by the tiles `w` (`rb` bytes per row,
/// format `f`) and every activation row, as [`super::simd::tile`] does; `passes` holds the rows laid out
/// for passes when there are two or more.
///
/// # Safety
/// The CPU has AVX-512 (F, BW, VL, VNNI) and F16C; `w` holds `n.div_ceil(16)` tiles; `out` covers `n`
/// columns of `acts.len()` rows that only this call writes; every row of `acts` has the `rb /
/// f.block_bytes()` blocks of a weight row (the kernel reads them unchecked); `passes` was made from `acts`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
pub unsafe fn tile(f: IntFormat, w: &[u8], rb: usize, n: usize, acts: &[Q8Row], passes: Option<&PassRows>, out: Out) {
    // the first weights, which no earlier tile prefetched
    wtile::prefetch(w.as_ptr(), w.len().min(PREFETCH));
    if acts.is_empty() {
        return;
    }
    let rows = Rows { one: &acts[0], m: acts.len(), passes };
    if passes.is_some_and(|p| p.per == ZEN4_ROWS) {
        return tiles_4_rows(f, w, rb, n, rows, out);
    }
    by_format!(f, ROWS, (w, rb, n, rows, out))
}

/// [`tile`] in passes of [`ZEN4_ROWS`] rows, compiled as a function of its own: 3 rows a pass inlined
/// into `tile` beside the 6-row copy ran level with 6 in the kernel timer on Zen 4, 3 and 4 on their own
/// ran faster (BENCHMARKS.md, 2026-12-06, eighteenth session). The 6-row source in `tile` is unchanged
/// (its machine code was not measured again on the hosts that run it).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
#[inline(never)]
unsafe fn tiles_4_rows(f: IntFormat, w: &[u8], rb: usize, n: usize, rows: Rows, out: Out) {
    by_format!(f, ZEN4_ROWS, (w, rb, n, rows, out))
}

/// The formats as const parameters (the kernels are compiled once per format; [`IntFormat::from_id`]).
const Q4_0: u8 = IntFormat::Q4_0 as u8;
const Q4_1: u8 = IntFormat::Q4_1 as u8;
const Q8_0: u8 = IntFormat::Q8_0 as u8;
const Q4K: u8 = IntFormat::Q4K as u8;
const Q5: u8 = IntFormat::Q5 as u8;
const Q6K: u8 = IntFormat::Q6K as u8;

/// The activation rows of a call: the first one (all there is for decode), how many, and their pass
/// layout when there are several.
#[derive(Clone, Copy)]
struct Rows<'a> {
    one: &'a Q8Row,
    m: usize,
    passes: Option<&'a PassRows>,
}

#[inline(always)]
unsafe fn tiles_as<const F: u8, const RP: usize>(w: &[u8], rb: usize, n: usize, acts: Rows, out: Out) {
    let f = IntFormat::from_id(F);
    let (nb, m, tb) = (rb / f.block_bytes(), acts.m, TILE * rb);
    if n == 0 || m == 0 {
        return;
    }
    assert!(w.len() >= n.div_ceil(TILE) * tb);
    // the one row that [`single`] reads, checked once a call rather than once a tile
    if acts.passes.is_none() {
        let x = acts.one;
        assert!(x.blocks() == nb && x.qs.len() >= nb * QK && [x.d.len(), x.s.len(), x.sums.len(), x.lo_sums.len()].iter().all(|&l| l >= nb));
    }
    if m < PREP_ROWS {
        // at least a tile ahead, so a block's part of it was asked for a tile ago
        let ahead = PREFETCH.max(tb);
        let far = STREAM_FAR.max(ahead + PREFETCH);
        for j0 in (0..n).step_by(TILE) {
            let at = j0 / TILE * tb;
            let src = Packed { p: w.as_ptr().add(at), nb, ahead: w.as_ptr().wrapping_add(at + ahead), far: w.as_ptr().wrapping_add(at + far) };
            rows::<F, Packed, RP>(&src, nb, acts, out, j0, n, 0..acts.m);
        }
        return;
    }
    // taken out of the thread-local for the call (a closure would not inherit the target features)
    let mut wt = SCRATCH.with(|c| std::mem::take(&mut *c.borrow_mut()));
    // (every value is written by a tile's first pass before the passes after it read it)
    wt.w.resize(nb * 8, wtile::Line([0; 64]));
    wt.dw.resize(nb, wtile::Line([0; 64]));
    wt.mw.resize(nb, wtile::Line([0; 64]));
    for j0 in (0..n).step_by(TILE) {
        let t = j0 / TILE;
        let next = &w[((t + 1) * tb).min(w.len())..((t + 2) * tb).min(w.len())];
        // the next tile a few lines per block read, over every pass
        let pf = Prefetch::new(next, nb * m.div_ceil(RP));
        let first = Unpacking {
            p: w.as_ptr().add(t * tb),
            nb,
            w: wt.w.as_mut_ptr() as *mut __m512i,
            dw: wt.dw.as_mut_ptr() as *mut f32,
            mw: wt.mw.as_mut_ptr() as *mut f32,
            pf: &pf,
        };
        // (m >= PREP_ROWS > RP: at least two passes)
        rows::<F, Unpacking, RP>(&first, nb, acts, out, j0, n, 0..RP);
        rows::<F, Prepped, RP>(&Prepped { t: &wt, pf: &pf }, nb, acts, out, j0, n, RP..m);
    }
    SCRATCH.with(|c| *c.borrow_mut() = wt);
}

/// Every activation row against the tile of weight rows `j0..j0 + 16` (those below `n`), `RP` rows a
/// pass (the layout of `acts.passes`).
#[inline(always)]
unsafe fn rows<const F: u8, S: Source, const RP: usize>(src: &S, nb: usize, acts: Rows, out: Out, j0: usize, n: usize, span: std::ops::Range<usize>) {
    let nw = (n - j0).min(TILE);
    let keep: __mmask16 = if nw == TILE { 0xFFFF } else { (1u16 << nw) - 1 };
    let at = |r: usize| out.offset(r, j0);
    let Some(passes) = acts.passes else {
        assert_eq!(acts.m, 1, "several activation rows need their pass layout");
        return single::<F, S>(src, nb, acts.one, at(0), keep);
    };
    assert_eq!(passes.per, RP);
    for r in span.step_by(RP) {
        let p = passes.pass(r, nb);
        wtile::some_ahead((acts.m - r).min(RP));
        match (acts.m - r).min(RP) {
            1 => pass::<F, 1, S>(src, nb, p, at(r), keep),
            2 => pass::<F, 2, S>(src, nb, p, at(r), keep),
            3 => pass::<F, 3, S>(src, nb, p, at(r), keep),
            4 => pass::<F, 4, S>(src, nb, p, at(r), keep),
            5 => pass::<F, 5, S>(src, nb, p, at(r), keep),
            _ => pass::<F, RP, S>(src, nb, p, at(r), keep),
        }
    }
}

/// One block of a tile's 16 weight rows, ready for `dpbusd`: 8 registers of unsigned bytes (chunk `k`
/// of every row), the scales and (Q4_1) minimums.
struct Block {
    w: [__m512i; 8],
    dw: __m512,
    mw: __m512,
}

/// Where a pass takes a tile's blocks from.
trait Source {
    /// Block `b` of the tile, whose format is `f`.
    unsafe fn block(&self, f: IntFormat, b: usize) -> Block;
}

/// The packed tile itself: nibbles (and Q5's fifth bits) unpacked, Q8_0 values offset by 128, on every
/// read.
struct Packed {
    p: *const u8,
    nb: usize,
    /// the tile `PREFETCH` bytes ahead, whose part of block `b` is prefetched when `b` is read
    ahead: *const u8,
    /// the tile [`STREAM_FAR`] bytes ahead, whose part of block `b` is asked for into L2 then
    far: *const u8,
}

impl Source for Packed {
    #[inline(always)]
    unsafe fn block(&self, f: IntFormat, b: usize) -> Block {
        let bb = TILE * f.block_bytes();
        wtile::prefetch(self.ahead.wrapping_add(b * bb), bb);
        wtile::prefetch_l2(self.far.wrapping_add(b * bb), bb);
        unpack(f, self.p, self.nb, b)
    }
}

/// Block `b` of the packed tile at `p` (rows of `nb` blocks) unpacked.
#[inline(always)]
unsafe fn unpack(f: IntFormat, p: *const u8, nb: usize, b: usize) -> Block {
    let w = wtile::block_values(f, p.add(pack::values_at(f, b)) as *const __m512i, true);
    let dw = wtile::scales16(f, p.add(pack::scales_at(f, nb, b)));
    let mw = if f.two_scales() { wtile::scales16(f, p.add(pack::minimums_at(f, nb, b))) } else { _mm512_setzero_ps() };
    Block { w, dw, mw }
}

/// The packed tile as the first pass over it reads it ([`Packed`]'s unpacking), each block also stored
/// into a [`WeightTile`] as it is read, for the passes after it ([`Prepped`]): the stores run beside the
/// pass's multiplies, where unpacking the tile into the buffer in a loop of its own before the passes
/// (`wtile::prep`, 4.9% of a 32-sequence decode step on Zen 4) made every block's lines be loaded once
/// more and held the multiplies back meanwhile. In the kernel timer on Zen 4 (one thread, Q4_1, the two
/// ways alternating call by call) this made 32 rows 1.03-1.07x faster (4 or 6 rows a pass), 8-9 rows
/// 1.11-1.17x and 128 rows 1.01x, with the same bits (BENCHMARKS.md, 2026-12-07, twenty-first session).
struct Unpacking<'a> {
    p: *const u8,
    nb: usize,
    /// the buffer's values, scales and minimums (block `b` at `w + 8b`, `dw + 16b`, `mw + 16b`)
    w: *mut __m512i,
    dw: *mut f32,
    mw: *mut f32,
    /// the next tile, a few lines per block read
    pf: &'a Prefetch,
}

impl Source for Unpacking<'_> {
    #[inline(always)]
    unsafe fn block(&self, f: IntFormat, b: usize) -> Block {
        self.pf.some();
        let blk = unpack(f, self.p, self.nb, b);
        for (k, wk) in blk.w.iter().enumerate() {
            _mm512_store_si512(self.w.add(b * 8 + k), *wk);
        }
        _mm512_store_ps(self.dw.add(16 * b), blk.dw);
        if f.two_scales() {
            _mm512_store_ps(self.mw.add(16 * b), blk.mw);
        }
        blk
    }
}

/// A tile unpacked by the first pass over it ([`Unpacking`]: unsigned values, f32 scales), and the next
/// tile to prefetch.
struct Prepped<'a> {
    t: &'a WeightTile,
    pf: &'a Prefetch,
}

impl Source for Prepped<'_> {
    #[inline(always)]
    unsafe fn block(&self, f: IntFormat, b: usize) -> Block {
        self.pf.some();
        let v = self.t.values(b);
        let mut w = [_mm512_setzero_si512(); 8];
        for (k, wk) in w.iter_mut().enumerate() {
            *wk = _mm512_load_si512(v.add(k));
        }
        let dw = _mm512_load_ps(self.t.scales(b));
        let mw = if f.two_scales() { _mm512_load_ps(self.t.minimums(b)) } else { _mm512_setzero_ps() };
        Block { w, dw, mw }
    }
}

/// `R` activation rows against a tile: the 16 weight rows' results of row `r` go to
/// `out.row(r)`, the lanes in `keep`.
#[inline(always)]
unsafe fn pass<const F: u8, const R: usize, S: Source>(src: &S, nb: usize, acts: PassPtrs, out: Out, keep: __mmask16) {
    // h[i] = acc[i] + acc[i + 8], then ((h0 + h4) + (h2 + h6)) + ((h1 + h5) + (h3 + h7)), the pairs
    // taken in that order so each sum is formed as soon as its two terms are: three partial sums live
    // instead of all eight pairs (48 registers at 6 rows, kept on the stack and zeroed there by a
    // `memset` for every pass: 6.7% of a batched step on Zen 4). A loop, not eight copies of `pair`
    // (nor `array::from_fn`: a closure would not inherit the target features).
    let zero = [_mm512_setzero_ps(); R];
    let (mut first, mut half, mut left) = (zero, zero, zero);
    let mut v = zero;
    for (k, i) in [0, 4, 2, 6, 1, 5, 3, 7].into_iter().enumerate() {
        let h = pair::<F, R, S>(src, nb, i, acts);
        match k {
            0 | 2 | 4 | 6 => first = h,
            1 | 5 => half = add::<R>(first, h),
            3 => left = add::<R>(half, add::<R>(first, h)),
            _ => v = add::<R>(left, add::<R>(half, add::<R>(first, h))),
        }
    }
    for (r, v) in v.iter().enumerate() {
        _mm512_mask_storeu_ps(out.row(r), keep, *v);
    }
}

/// One activation row against a tile, the blocks in their order into 16 lane accumulators (every block
/// independent of the others until the reduction: the most work in flight while the weights stream).
#[inline(always)]
unsafe fn single<const F: u8, S: Source>(src: &S, nb: usize, x: &Q8Row, out: Out, keep: __mmask16) {
    let f = IntFormat::from_id(F);
    let mut acc = [_mm512_setzero_ps(); GROUP];
    for g0 in (0..nb).step_by(GROUP) {
        // the group's values and scales from bases of their own ([`base`])
        let (qs, d, s) = (base(x.qs.as_ptr().add(pack::act_index(g0, 0))), base(x.d.as_ptr().add(g0)), base(x.s.as_ptr().add(g0)));
        let (sums, lo) = (base(x.sums.as_ptr().add(g0)), base(x.lo_sums.as_ptr().add(g0)));
        macro_rules! block {
            ($l:literal) => {
                if g0 + $l < nb {
                    let t = term(f, &src.block(f, g0 + $l), qs.add(pack::act_index($l, 0)), *d.add($l), *s.add($l), *sums.add($l), *lo.add($l));
                    acc[$l] = _mm512_add_ps(acc[$l], t);
                }
            };
        }
        block!(0);
        block!(1);
        block!(2);
        block!(3);
        block!(4);
        block!(5);
        block!(6);
        block!(7);
        block!(8);
        block!(9);
        block!(10);
        block!(11);
        block!(12);
        block!(13);
        block!(14);
        block!(15);
    }
    let mut h = [_mm512_setzero_ps(); 8];
    for (i, hi) in h.iter_mut().enumerate() {
        *hi = _mm512_add_ps(acc[i], acc[i + 8]);
    }
    let v = _mm512_add_ps(
        _mm512_add_ps(_mm512_add_ps(h[0], h[4]), _mm512_add_ps(h[2], h[6])),
        _mm512_add_ps(_mm512_add_ps(h[1], h[5]), _mm512_add_ps(h[3], h[7])),
    );
    _mm512_mask_storeu_ps(out.row(0), keep, v);
}

#[inline(always)]
unsafe fn add<const R: usize>(a: [__m512; R], b: [__m512; R]) -> [__m512; R] {
    let mut out = a;
    for r in 0..R {
        out[r] = _mm512_add_ps(a[r], b[r]);
    }
    out
}

/// `h[i] = acc[i] + acc[i + 8]` of `R` activation rows against the tile's 16 weight rows: lane
/// accumulators `i` and `i + 8` over their blocks. Inlined once into the loop of [`pass`] that takes
/// the eight pairs. Before, `pass` called it from a closure, so it carried the kernel's target features
/// (an `#[inline(always)]` function without them had its intrinsics become calls there) and LLVM chose
/// whether to inline it: unrelated changes (a fifth format; Q5's unpacking in the AVX2 kernel) left all
/// its copies out of line, and Q4_1 ran 6-20% slower on the VNNI level (BENCHMARKS.md, 2026-12-05).
#[inline(always)]
unsafe fn pair<const F: u8, const R: usize, S: Source>(src: &S, nb: usize, i: usize, acts: PassPtrs) -> [__m512; R] {
    add::<R>(lane::<F, R, S>(src, nb, i, acts), lane::<F, R, S>(src, nb, i + 8, acts))
}

/// Lane accumulator `l` of `R` activation rows against the tile's 16 weight rows.
#[inline(always)]
unsafe fn lane<const F: u8, const R: usize, S: Source>(src: &S, nb: usize, l: usize, acts: PassPtrs) -> [__m512; R] {
    let f = IntFormat::from_id(F);
    let mut acc = [_mm512_setzero_ps(); R];
    // every row written out (a loop over the rows is not always unrolled, and then the accumulators
    // live in memory)
    macro_rules! rows {
        ($blk:expr, $p:expr, $($r:literal)*) => {
            $(
                if $r < R {
                    let t = term(f, $blk, $p.qs.add($r * QK), *$p.d.add($r), *$p.s.add($r), *$p.sums.add($r), *$p.lo_sums.add($r));
                    acc[$r] = _mm512_add_ps(acc[$r], t);
                }
            )*
        };
    }
    const _: () = assert!(ROWS <= 6 && ZEN4_ROWS <= 6, "rows! writes out 6 rows");
    let mut b = l;
    while b < nb {
        let blk = src.block(f, b);
        // the block's rows from bases of their own ([`base`])
        let at = b * R;
        let p = PassPtrs {
            qs: base(acts.qs.add(at * QK)),
            d: base(acts.d.add(at)),
            s: base(acts.s.add(at)),
            sums: base(acts.sums.add(at)),
            lo_sums: base(acts.lo_sums.add(at)),
        };
        rows!(&blk, p, 0 1 2 3 4 5);
        b += GROUP;
    }
    acc
}

/// A block's canonical term for the tile's 16 weight rows and one activation row: its values at `a`,
/// its scale `d`, scaled sum `s` and integer sum `sum` (`lo` of its first 16 values).
#[inline(always)]
unsafe fn term(f: IntFormat, blk: &Block, a: *const i8, d: f32, s: f32, sum: i32, lo: i32) -> __m512 {
    if f == IntFormat::Q6K {
        // unsigned 6-bit weights, each half's sum on its own (chunks 0..4 are values 0..16), less 32 x
        // its activations' sum; the halves' scales in the scales' and minimums' places (a macro, not a
        // closure: a closure does not inherit the target features)
        macro_rules! half {
            ($k0:literal) => {{
                let i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), blk.w[$k0], chunk(a, $k0));
                let i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), blk.w[$k0 + 1], chunk(a, $k0 + 1));
                let i0 = _mm512_dpbusd_epi32(i0, blk.w[$k0 + 2], chunk(a, $k0 + 2));
                _mm512_add_epi32(i0, _mm512_dpbusd_epi32(i1, blk.w[$k0 + 3], chunk(a, $k0 + 3)))
            }};
        }
        let plo = _mm512_sub_epi32(half!(0), _mm512_set1_epi32(lo << 5));
        let phi = _mm512_sub_epi32(half!(4), _mm512_set1_epi32((sum - lo) << 5));
        let da = _mm512_set1_ps(d);
        let tlo = _mm512_mul_ps(_mm512_mul_ps(blk.dw, da), _mm512_cvtepi32_ps(plo));
        return _mm512_add_ps(tlo, _mm512_mul_ps(_mm512_mul_ps(blk.mw, da), _mm512_cvtepi32_ps(phi)));
    }
    let mut i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), blk.w[0], chunk(a, 0));
    let mut i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), blk.w[1], chunk(a, 1));
    for k in (2..8).step_by(2) {
        i0 = _mm512_dpbusd_epi32(i0, blk.w[k], chunk(a, k));
        i1 = _mm512_dpbusd_epi32(i1, blk.w[k + 1], chunk(a, k + 1));
    }
    let mut p = _mm512_add_epi32(i0, i1);
    // Q4_0 and Q8_0 weights were taken unsigned (+8, +128): the offset times the activations' sum
    match f {
        IntFormat::Q4_0 => p = _mm512_sub_epi32(p, _mm512_set1_epi32(sum << 3)),
        IntFormat::Q8_0 => p = _mm512_sub_epi32(p, _mm512_set1_epi32(sum << 7)),
        IntFormat::Q4_1 | IntFormat::Q4K | IntFormat::Q5 => {}
        IntFormat::Q6K => unreachable!("Q6K's term is above"),
    }
    let term = _mm512_mul_ps(_mm512_mul_ps(blk.dw, _mm512_set1_ps(d)), _mm512_cvtepi32_ps(p));
    if f.has_min() {
        _mm512_add_ps(term, _mm512_mul_ps(blk.mw, _mm512_set1_ps(s)))
    } else {
        term
    }
}

/// `p` itself, through an empty `asm!` the optimizer cannot see into, so that the activations' loads
/// folded into `dpbusd` and `mulps` (as broadcast operands) address `p + displacement`. Otherwise LLVM
/// folds `first + index * stride` into an indexed address (`base + index`), and Intel cores split a
/// load-and-operate instruction with three register operands and an indexed address into two
/// micro-ops ("unlamination"): on an Emerald Rapids core the batched Q4_1 kernel ran 1.2x faster with
/// these bases, and no slower at one activation row (BENCHMARKS.md, 2026-12-06, seventeenth session).
#[inline(always)]
#[allow(clippy::pointers_in_nomem_asm_block)] // the asm touches no memory: it only hides `p`'s value
unsafe fn base<T>(mut p: *const T) -> *const T {
    std::arch::asm!("/* {0} */", inout(reg) p, options(pure, nomem, nostack, preserves_flags));
    p
}

/// Chunk `k` of a block of activations (values `4k..4k+4` at `a`) in every lane.
#[inline(always)]
unsafe fn chunk(a: *const i8, k: usize) -> __m512i {
    _mm512_set1_epi32((a.add(4 * k) as *const i32).read_unaligned())
}
