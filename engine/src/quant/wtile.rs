//! A weight tile unpacked for many activation rows: the operand the batched kernels ([`super::amx`],
//! [`super::vnni`]) read once per block and activation tile or pass ([`prep`] unpacks one for the AMX
//! kernel; the VNNI kernel's first pass over a tile stores its blocks as it unpacks them); and the weight
//! prefetching the kernels share.
//!
//! Block `b` is 8 lines of 64 bytes: line `k` holds value chunk `k` (values `4k..4k+4`) of the 16 rows,
//! row `n` at bytes `4n..4n+4` (Q4 weights as unsigned nibbles, Q5's as unsigned bytes, Q8_0's and Q6K's
//! as signed bytes or, for `dpbusd`, unsigned: [`block_values`]); its scales and (Q4_1, Q4K, Q5)
//! minimums or (Q6K) second scales are 16 f32 lanes, row `n` in lane `n`. The zero rows that pad a
//! matrix's last tile have zero scales.

use std::arch::x86_64::*;
use std::cell::{Cell, RefCell};
use std::thread::LocalKey;

use super::pack;
use super::simd::IntFormat;

/// Weight rows in a tile.
pub const T: usize = pack::TILE;

/// 64 bytes on a 64-byte boundary.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line(pub [u8; 64]);

/// One laid-out weight tile (buffers reused from tile to tile).
#[derive(Default)]
pub struct WeightTile {
    /// `[block][8 chunks][64]`.
    pub w: Vec<Line>,
    /// Scales and minimums as f32, `[block][16]`.
    pub dw: Vec<Line>,
    pub mw: Vec<Line>,
}

impl WeightTile {
    /// The 8 lines of block `b`.
    #[inline(always)]
    pub fn values(&self, b: usize) -> *const __m512i {
        // SAFETY (of the pointer arithmetic): callers stay below the blocks laid out
        self.w.as_ptr().wrapping_add(b * 8) as *const __m512i
    }

    #[inline(always)]
    pub fn scales(&self, b: usize) -> *const f32 {
        self.dw.as_ptr().wrapping_add(b) as *const f32
    }

    #[inline(always)]
    pub fn minimums(&self, b: usize) -> *const f32 {
        self.mw.as_ptr().wrapping_add(b) as *const f32
    }
}

/// This thread's spare buffers of one kind (the last ones its matmuls gave back with [`keep_spare`]), or
/// new ones: a batched step lays out its activation rows again for every matmul.
pub fn take_spare<T: Default + 'static>(slot: &'static LocalKey<Cell<Option<T>>>) -> T {
    // (a thread being torn down has no slot left, and gets new ones)
    slot.try_with(Cell::take).ok().flatten().unwrap_or_default()
}

/// Keeps `spare` for this thread's next [`take_spare`] of its kind.
pub fn keep_spare<T: 'static>(slot: &'static LocalKey<Cell<Option<T>>>, spare: T) {
    let _ = slot.try_with(|c| c.set(Some(spare)));
}

/// `v` as `len` copies of `x`, in the buffer it has.
pub fn refill<T: Clone>(v: &mut Vec<T>, len: usize, x: T) {
    v.clear();
    v.resize(len, x);
}

/// How far ahead of the tile being multiplied the streaming kernels ([`super::vnni`], [`super::avx2`])
/// prefetch the weights, in bytes (at least a tile): single-stream decode streams ~100 MB of weights per
/// token, and only this many bytes in flight come close to one core's DRAM bandwidth (1 KiB reached
/// 25-28 GB/s on the Zen 5 VM, 8 KiB 37 GB/s of its ~41).
pub const PREFETCH: usize = 8192;

/// Prefetches the lines of the `len` bytes at `p` (which may lie past the weights: a prefetch never
/// faults).
#[inline(always)]
pub fn prefetch(p: *const u8, len: usize) {
    prefetch_with::<_MM_HINT_T0>(p, len)
}

/// [`prefetch`] into L2 only.
#[inline(always)]
pub fn prefetch_l2(p: *const u8, len: usize) {
    prefetch_with::<_MM_HINT_T1>(p, len)
}

#[inline(always)]
fn prefetch_with<const HINT: i32>(p: *const u8, len: usize) {
    let mut off = 0;
    while off < len {
        // SAFETY: x86_64 always has SSE; a prefetch reads nothing the program sees and never faults
        unsafe { _mm_prefetch::<HINT>(p.wrapping_add(off) as *const i8) };
        off += 64;
    }
}

/// Memory the forward pass reads soon after the matmuls running now (the next layer's key/value caches
/// in a batched decode step), queued per thread: the batched kernels ([`super::vnni`], [`super::avx2`])
/// prefetch a few of its lines for every tile and activation row they multiply, while they are bound
/// by arithmetic and leave the memory path idle.
#[derive(Default)]
struct Ahead {
    /// (address, bytes), and where the prefetching stands in them
    ranges: Vec<(usize, usize)>,
    at: usize,
    off: usize,
}

thread_local! {
    static AHEAD: RefCell<Ahead> = RefCell::new(Ahead::default());
}

/// Lines of the queue prefetched per weight tile and activation row multiplied. A 32-sequence decode step
/// of SmolLM2 multiplies about 10,000 (tile, row) pairs between two layers' attention, so 8 lines each
/// cover a layer's caches (2-4 MB at 50-80 positions) with room to spare. On the Zen 4 VM (one thread),
/// 48 lines per 6-row pass did as well as 64 and better than 32; 256 at once between tiles, or
/// `prefetcht0`, did no better. Not in the AMX kernel: on an Emerald Rapids AMX host (300 MB of L3, which
/// holds the caches anyway), the same 8 lines per weight tile and activation row made 32-sequence batched
/// decode 6% slower (BENCHMARKS.md, 2026-12-05).
const AHEAD_LINES: usize = 8;

/// Replaces this thread's queue of memory to prefetch during batched matmuls with `ranges` (start and
/// length in bytes; an empty iterator clears it). The memory may be freed before its turn comes: a
/// prefetch never faults.
pub fn prefetch_ahead(ranges: impl IntoIterator<Item = (*const u8, usize)>) {
    AHEAD.with(|a| {
        let mut a = a.borrow_mut();
        a.ranges.clear();
        a.ranges.extend(ranges.into_iter().map(|(p, n)| (p as usize, n)));
        (a.at, a.off) = (0, 0);
    });
}

/// The queue's next lines for `rows` activation rows against one weight tile.
#[inline]
pub fn some_ahead(rows: usize) {
    AHEAD.with(|a| {
        let a = &mut *a.borrow_mut();
        let mut lines = AHEAD_LINES * rows;
        while lines > 0 && a.at < a.ranges.len() {
            let (p, n) = a.ranges[a.at];
            while lines > 0 && a.off < n {
                // SAFETY: x86_64 always has SSE; a prefetch reads nothing the program sees and never faults
                unsafe { _mm_prefetch::<_MM_HINT_T1>((p + a.off) as *const i8) };
                a.off += 64;
                lines -= 1;
            }
            if a.off >= n {
                (a.at, a.off) = (a.at + 1, 0);
            }
        }
    });
}

/// The lines of the next tile, prefetched a few at a time while the current one is multiplied (all at
/// once would stall on the fill buffers).
pub struct Prefetch {
    p: Cell<*const u8>,
    left: Cell<usize>,
    per: usize,
}

impl Prefetch {
    /// `next` spread over `steps` calls of [`Prefetch::some`].
    pub fn new(next: &[u8], steps: usize) -> Self {
        let lines = next.len().div_ceil(64);
        Prefetch { p: Cell::new(next.as_ptr()), left: Cell::new(lines), per: lines.div_ceil(steps.max(1)) }
    }

    /// The next few lines.
    #[inline(always)]
    pub unsafe fn some(&self) {
        let (mut p, left) = (self.p.get(), self.left.get());
        for _ in 0..self.per.min(left) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
            p = p.add(64);
        }
        self.p.set(p);
        self.left.set(left.saturating_sub(self.per));
    }
}

/// The 16 scales (or minimums) at `p`: f16, Q4K's, Q5's and Q6K's f32.
///
/// # Safety
/// The CPU has AVX-512 F and F16C; `p` points at 16 of them.
#[inline(always)]
pub unsafe fn scales16(f: IntFormat, p: *const u8) -> __m512 {
    if pack::scale_bytes(f) == 4 {
        _mm512_loadu_ps(p as *const f32)
    } else {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// The 8 value chunks of a Q5 block whose lines start at `v`: the nibbles with their fifth bits at bit 4
/// ([`pack`]'s Q5 lines; 16-bit shifts move no bit from one byte to bit 4 of another).
///
/// # Safety
/// The CPU has AVX-512 F and BW; `v` points at the block's 5 lines.
#[inline(always)]
pub unsafe fn q5_chunks(v: *const __m512i) -> [__m512i; 8] {
    let (low, five) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x10));
    let bits = _mm512_loadu_si512(v.add(4) as *const _);
    // (macros, not closures: a closure does not inherit the target features)
    macro_rules! put {
        ($nibbles:expr, $bits:expr) => {
            _mm512_or_si512(_mm512_and_si512($nibbles, low), _mm512_and_si512($bits, five))
        };
    }
    macro_rules! x {
        ($c:expr) => {
            _mm512_loadu_si512(v.add($c) as *const _)
        };
    }
    [
        put!(x!(0), _mm512_slli_epi16::<4>(bits)),
        put!(x!(1), _mm512_slli_epi16::<3>(bits)),
        put!(x!(2), _mm512_slli_epi16::<2>(bits)),
        put!(x!(3), _mm512_slli_epi16::<1>(bits)),
        put!(_mm512_srli_epi16::<4>(x!(0)), bits),
        put!(_mm512_srli_epi16::<4>(x!(1)), _mm512_srli_epi16::<1>(bits)),
        put!(_mm512_srli_epi16::<4>(x!(2)), _mm512_srli_epi16::<2>(bits)),
        put!(_mm512_srli_epi16::<4>(x!(3)), _mm512_srli_epi16::<3>(bits)),
    ]
}

/// The 8 value chunks of a packed block whose lines start at `v`, as a [`WeightTile`] holds them: Q4
/// values as unsigned nibbles, Q5's as unsigned bytes; with `unsigned` (`dpbusd`'s operand) Q8_0 values
/// offset by 128 and Q6K's kept as they are, without, Q8_0 values kept and Q6K's less 32 (signed, for
/// `tdpbssd`).
///
/// # Safety
/// The CPU has AVX-512 F and BW; `v` points at the block's lines.
#[inline(always)]
pub unsafe fn block_values(f: IntFormat, v: *const __m512i, unsigned: bool) -> [__m512i; 8] {
    let mut w = [_mm512_setzero_si512(); 8];
    // (loops, not closures: a closure does not inherit the target features)
    match f {
        IntFormat::Q4_0 | IntFormat::Q4_1 | IntFormat::Q4K => {
            let low = _mm512_set1_epi8(0x0F);
            for c in 0..4 {
                let x = _mm512_loadu_si512(v.add(c) as *const _);
                w[c] = _mm512_and_si512(x, low);
                w[c + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(x), low);
            }
        }
        IntFormat::Q5 => w = q5_chunks(v),
        IntFormat::Q8_0 => {
            let flip = _mm512_set1_epi8(if unsigned { -128 } else { 0 });
            for (k, wk) in w.iter_mut().enumerate() {
                *wk = _mm512_xor_si512(_mm512_loadu_si512(v.add(k) as *const _), flip);
            }
        }
        IntFormat::Q6K => {
            let off = _mm512_set1_epi8(if unsigned { 0 } else { 32 });
            for (k, wk) in w.iter_mut().enumerate() {
                *wk = _mm512_sub_epi8(_mm512_loadu_si512(v.add(k) as *const _), off);
            }
        }
    }
    w
}

/// Unpacks the values of one packed tile (rows of `nb` blocks, [`super::pack`]'s layout) into `s`, signed
/// as `tdpbssd` takes them ([`block_values`]); the AMX kernel reads the scales from the packed tile.
///
/// # Safety
/// The CPU has AVX-512 (F, BW); `tile` is one whole tile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
pub unsafe fn prep(f: IntFormat, tile: &[u8], nb: usize, s: &mut WeightTile) {
    assert_eq!(tile.len(), T * nb * f.block_bytes());
    s.w.resize(nb * 8, Line([0; 64]));
    let dst = s.w.as_mut_ptr() as *mut __m512i;
    let p = tile.as_ptr();
    for b in 0..nb {
        let w = block_values(f, p.add(pack::values_at(f, b)) as *const __m512i, false);
        for (k, wk) in w.into_iter().enumerate() {
            _mm512_store_si512(dst.add(b * 8 + k), wk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_unpack_every_row_and_value_signed_or_unsigned() {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")) {
            eprintln!("skipped: no AVX-512");
            return;
        }
        for f in [IntFormat::Q4_0, IntFormat::Q4_1, IntFormat::Q8_0, IntFormat::Q4K, IntFormat::Q5, IntFormat::Q6K] {
            for nb in [1, 2, 3, 16, 17, 18, 33, 48] {
                let mut tile = crate::quant::tests::random_bytes(T * nb * f.block_bytes(), 7 + nb as u64);
                if f == IntFormat::Q6K {
                    // 6-bit values, as a held tile has
                    tile[..T * nb * pack::value_bytes(f)].iter_mut().for_each(|v| *v &= 63);
                }
                for unsigned in [false, true] {
                    // signed through `prep`, as the AMX kernel unpacks a tile; unsigned block by block, as
                    // the VNNI kernel does
                    let mut t = WeightTile::default();
                    // SAFETY: the CPU has the features (checked above), `tile` is one tile, and each block's
                    // lines are in it
                    unsafe {
                        if unsigned {
                            t.w.resize(nb * 8, Line([0; 64]));
                            for b in 0..nb {
                                let w = block_values(f, tile.as_ptr().add(pack::values_at(f, b)) as *const __m512i, true);
                                for (k, wk) in w.into_iter().enumerate() {
                                    _mm512_storeu_si512(t.w[b * 8 + k].0.as_mut_ptr() as *mut _, wk);
                                }
                            }
                        } else {
                            prep(f, &tile, nb, &mut t);
                        }
                    }
                    for b in 0..nb {
                        for n in 0..T {
                            for j in 0..32 {
                                let want = pack::weight_value(f, &tile, n, b, j);
                                let want = match f {
                                    IntFormat::Q8_0 if unsigned => want + 128,
                                    IntFormat::Q6K if !unsigned => want - 32,
                                    _ => want,
                                };
                                let got = t.w[b * 8 + j / 4].0[4 * n + j % 4];
                                let signed = matches!(f, IntFormat::Q8_0 | IntFormat::Q6K) && !unsigned;
                                let got = if signed { got as i8 as i32 } else { got as i32 };
                                assert_eq!(got, want, "{f:?} nb={nb} block {b} row {n} value {j} unsigned={unsigned}");
                            }
                        }
                    }
                }
            }
        }
    }
}
