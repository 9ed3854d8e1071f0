//! Runtime-selected integer kernels: tiles of 16 weight rows (output columns) against every activation
//! row.
//!
//! Every path computes the same canonical sum, so scalar, AVX2, AVX-512 VNNI and AMX results are
//! bit-identical on any machine, for any batch size. Weights are in the tiles and activations in the
//! groups of [`super::pack`]. For each block `b` the exact integer dot product `p_b = Σ w·q` (the true
//! signed weights) goes to lane `l = b % 16` of 16 f32 accumulators as `acc[l] + (dw_b*da_b) * p_b`, for
//! Q4_1 `acc[l] + ((dw_b*da_b) * p_b + mw_b*sa_b)` (multiplies then adds, never fused), each lane from
//! 0.0; the result is `reduce(acc)` with `h[i] = acc[i] + acc[i+8]`, then
//! `((h0+h4)+(h2+h6)) + ((h1+h5)+(h3+h7))`. How the integer sums are formed (and in which order) cannot
//! change them. The SIMD paths hold a tile's weight rows side by side in the lanes of a register, so
//! each output element's lane accumulators and reduction are separate registers and vertical adds.

use std::sync::OnceLock;

use super::dot::Q8Row;
use super::pack::{self, GROUP, QK, TILE};

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
#[repr(u8)]
pub enum IntFormat {
    Q4_0,
    Q4_1,
    Q8_0,
    /// GGUF Q4_K, held as Q4_1 blocks of 32 with f32 scales and minimums (`d * sc` and `-dmin * m` of the
    /// sub-block, exact in f32): Q4_1's canonical sum.
    Q4K,
    /// GGUF Q6_K, held as blocks of 32 unsigned 6-bit values `q` (one per byte, as Q8_0's) with two f32
    /// scales, `d * sc` of the block's two 16-value sub-blocks (exact in f32); a weight is `scale * (q -
    /// 32)`. The canonical term sums the halves: `(dlo*da)*plo + (dhi*da)*phi`.
    Q6K,
    /// GGUF Q5_1 and Q5_K, held as blocks of 32 unsigned 5-bit values `q` (their low nibbles as Q4_1's,
    /// then 4 bytes of fifth bits, [`super::pack`]) with an f32 scale and minimum (Q5_1's f16 pair;
    /// Q5_K's `d * sc` and `-(dmin * m)` of the sub-block, exact in f32): a weight is `scale * q +
    /// minimum`, and the canonical sum is Q4_1's.
    Q5,
}

impl IntFormat {
    /// The format `f as u8` was taken from: a kernel generic over `const F: u8` has its format as a
    /// constant in each copy.
    #[inline(always)]
    pub const fn from_id(id: u8) -> Self {
        match id {
            0 => Self::Q4_0,
            1 => Self::Q4_1,
            2 => Self::Q8_0,
            3 => Self::Q4K,
            4 => Self::Q6K,
            5 => Self::Q5,
            _ => panic!("not an IntFormat"),
        }
    }

    /// Bytes per 32-element block (as held: Q4K's scale and minimum as f32).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q4K => 24,
            Self::Q6K => 40,
            Self::Q5 => 28,
        }
    }

    /// Whether the values are 4-bit nibbles (else bytes).
    #[inline(always)]
    pub fn nibbles(self) -> bool {
        !matches!(self, Self::Q8_0 | Self::Q6K | Self::Q5)
    }

    /// Whether a block holds a second f32 or f16 per row after its scale: Q4_1's, Q4K's and Q5's
    /// minimum, or Q6K's second scale.
    #[inline(always)]
    pub fn two_scales(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q4K | Self::Q6K | Self::Q5)
    }

    /// Whether a block has a minimum (`w = d * q + m`), whose term `m * sa` the canonical sum adds.
    #[inline(always)]
    pub fn has_min(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q4K | Self::Q5)
    }
}

/// Where a tile's results go: the result of weight row `j` (counted from the tile's first) and activation
/// row `i` at `row(i) + j`, the activation rows' results `stride` apart in one buffer or each in a buffer
/// of its own.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    base: *mut f32,
    stride: usize,
    /// One pointer per activation row (null: rows `stride` apart from `base`).
    table: *const *mut f32,
    /// Columns added to every row's pointer.
    col: usize,
}

// SAFETY: an `Out` is handed to parallel tasks that each write their own columns only.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Row `i` at `base + i * stride`.
    pub fn strided(base: *mut f32, stride: usize) -> Self {
        Out { base, stride, table: std::ptr::null(), col: 0 }
    }

    /// Row `i` at `table[i]` (the table outlives every use of this `Out`).
    pub fn table(table: *const *mut f32) -> Self {
        Out { base: std::ptr::null_mut(), stride: 0, table, col: 0 }
    }

    /// Where activation row `i`'s results start.
    ///
    /// # Safety
    /// `i` is one of the rows this `Out` covers.
    #[inline(always)]
    pub unsafe fn row(self, i: usize) -> *mut f32 {
        if self.table.is_null() {
            self.base.add(i * self.stride + self.col)
        } else {
            (*self.table.add(i)).add(self.col)
        }
    }

    /// The results from activation row `i` and column `j` on.
    ///
    /// # Safety
    /// As [`Out::row`].
    #[inline(always)]
    pub unsafe fn offset(self, i: usize, j: usize) -> Self {
        if self.table.is_null() {
            Out { base: self.base.add(i * self.stride), col: self.col + j, ..self }
        } else {
            Out { table: self.table.add(i), col: self.col + j, ..self }
        }
    }

    /// # Safety
    /// The element is in bounds of the buffer and no other thread writes it.
    #[inline(always)]
    pub(crate) unsafe fn put(self, j: usize, i: usize, v: f32) {
        *self.row(i).add(j) = v;
    }
}

/// Activation rows as the kernels of one level read them: the rows, and for the AMX kernel their blocks
/// laid out as tiles (once per matmul, shared by every task).
pub struct Acts<'a> {
    pub rows: &'a [Q8Row],
    #[cfg(target_arch = "x86_64")]
    tiles: Option<super::amx::Tiles>,
    /// The rows laid out for the AVX-512 kernel's passes (two or more rows that AMX does not take).
    #[cfg(target_arch = "x86_64")]
    passes: Option<super::vnni::PassRows>,
}

impl<'a> Acts<'a> {
    pub fn new(level: Level, rows: &'a [Q8Row]) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let tiles = (level == Level::Avx512Amx && rows.len() >= AMX_MIN_ROWS).then(|| super::amx::Tiles::new(rows));
            let vnni = matches!(level, Level::Avx512Vnni | Level::Avx512Amx) && tiles.is_none() && rows.len() > 1;
            let passes = vnni.then(|| super::vnni::PassRows::new(rows));
            Acts { rows, tiles, passes }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = level;
            Acts { rows }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Acts<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.passes.take() {
            p.recycle();
        }
        if let Some(t) = self.tiles.take() {
            t.recycle();
        }
    }
}

/// `w_j · acts[i]` into `out` for the `n` weight rows `w_j` held by the tiles `w` (`row_bytes` per row,
/// format `f`) and every activation row.
///
/// # Safety
/// `w` holds `n.div_ceil(16)` whole tiles; `out` covers `n` columns of `acts.rows.len()` rows that only
/// this call writes; `acts` was made for `level` (a group of matrices with one input shares one `acts`
/// whatever their formats).
pub unsafe fn tile(level: Level, f: IntFormat, w: &[u8], row_bytes: usize, n: usize, acts: &Acts, out: Out) {
    #[cfg(target_arch = "x86_64")]
    if let (Level::Avx512Amx, Some(t)) = (level, &acts.tiles) {
        return super::amx::tile(f, w, row_bytes, n, t, out);
    }
    #[cfg(target_arch = "x86_64")]
    let passes = acts.passes.as_ref();
    let acts = acts.rows;
    assert!(acts.iter().all(|a| a.blocks() * f.block_bytes() == row_bytes));
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => super::avx2::tile(f, w, row_bytes, n, acts, out),
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni | Level::Avx512Amx => super::vnni::tile(f, w, row_bytes, n, acts, passes, out),
        _ => {
            for j in 0..n {
                let t = &w[j / TILE * TILE * row_bytes..][..TILE * row_bytes];
                for (i, a) in acts.iter().enumerate() {
                    out.put(j, i, row_scalar(f, t, j % TILE, a));
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

/// The canonical dot product of row `n` of a weight tile with one activation row.
#[allow(clippy::assign_op_pattern)] // `acc = acc + term`, the kernels' operations as they write them
pub fn row_scalar(f: IntFormat, tile: &[u8], n: usize, a: &Q8Row) -> f32 {
    let nb = a.blocks();
    let mut acc = [0f32; GROUP];
    for b in 0..nb {
        let dw = pack::scale(f, tile, pack::scales_at(f, nb, b), n);
        let l = b % GROUP;
        if f == IntFormat::Q6K {
            let half = |h: usize| (16 * h..16 * h + 16).map(|j| (pack::weight_value(f, tile, n, b, j) - 32) * a.value(b, j) as i32).sum::<i32>();
            let dhi = pack::scale(f, tile, pack::minimums_at(f, nb, b), n);
            let term = (dw * a.d[b]) * half(0) as f32 + (dhi * a.d[b]) * half(1) as f32;
            acc[l] = acc[l] + term;
            continue;
        }
        let p: i32 = (0..QK)
            .map(|j| {
                let w = pack::weight_value(f, tile, n, b, j);
                let w = if f == IntFormat::Q4_0 { w - 8 } else { w };
                w * a.value(b, j) as i32
            })
            .sum();
        let mut term = (dw * a.d[b]) * p as f32;
        if f.has_min() {
            term = term + pack::scale(f, tile, pack::minimums_at(f, nb, b), n) * a.s[b];
        }
        acc[l] = acc[l] + term;
    }
    reduce(acc)
}
