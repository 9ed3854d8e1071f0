//! Quantized weight matrices and the matmul that multiplies activations by them.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod dequant;
pub mod dot;
pub mod pack;
pub mod simd;
#[cfg(target_arch = "x86_64")]
mod vnni;
#[cfg(target_arch = "x86_64")]
mod wtile;

use std::ops::Range;

use candle_core::quantized::GgmlDType;

use crate::error::{EngineError, Result};
use dot::{AlignedBytes, Q8Row};
use simd::IntFormat;

/// The integer format a GGUF format is held in (in the tiles of [`pack`]), for the formats with integer
/// kernels: their own, and Q5_0 as Q8_0. A Q5_0 weight is `d * (q - 16)` with `q` in 0..32, which is the
/// Q8_0 block of the same scale and the bytes `q - 16`: the same values exactly, multiplied as Q8_0 is
/// (against 8-bit activations, as llama.cpp multiplies Q5_0), at 34 bytes a block instead of 22.
/// llama.cpp's K-quant mixes fall back to Q5_0 for rows whose width is not a multiple of 256 (most of
/// SmolLM2-135M's matrices in a `Q4_K_M` file), and to Q5_1 in a `Q5_K_M` one; Q5_1 and Q5_K are held
/// as [`IntFormat::Q5`].
fn int_format(dtype: GgmlDType) -> Option<IntFormat> {
    match dtype {
        GgmlDType::Q4_0 => Some(IntFormat::Q4_0),
        GgmlDType::Q4_1 => Some(IntFormat::Q4_1),
        GgmlDType::Q8_0 | GgmlDType::Q5_0 => Some(IntFormat::Q8_0),
        GgmlDType::Q4K => Some(IntFormat::Q4K),
        GgmlDType::Q6K => Some(IntFormat::Q6K),
        GgmlDType::Q5_1 | GgmlDType::Q5K => Some(IntFormat::Q5),
        _ => None,
    }
}

/// A GGUF Q6_K row as [`IntFormat::Q6K`] blocks of 32 (f32 scales of the two 16-value halves, then the
/// 32 unsigned 6-bit values, one per byte): a half's scale is `d * sc` (a 16-bit by 8-bit product, exact
/// in f32), so `scale * (q - 32)` is Q6_K's `d * sc * (q - 32)` to the bit.
fn q6_k_as_blocks(row: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(row.len() / 210 * 8 * 40);
    for sb in row.chunks_exact(210) {
        let d = dequant::f16_at(sb, 208);
        // block b is quarter b % 4 of half b / 4: value l (0..32) from ql/qh as ggml lays them out
        for b in 0..8 {
            let (half, quarter) = (b / 4, b % 4);
            let (ql, qh, sc) = (&sb[64 * half..64 * half + 64], &sb[128 + 32 * half..160 + 32 * half], &sb[192 + 8 * half..200 + 8 * half]);
            for h in 0..2 {
                out.extend_from_slice(&(d * (sc[h + 2 * quarter] as i8) as f32).to_le_bytes());
            }
            out.extend((0..32).map(|l| {
                // quarters 0 and 1: low nibbles of ql[l] and ql[l + 32]; 2 and 3: their high nibbles
                let byte = ql[l + 32 * (quarter % 2)];
                let low = if quarter < 2 { byte & 0xF } else { byte >> 4 };
                low | (((qh[l] >> (2 * quarter)) & 3) << 4)
            }));
        }
    }
    out
}

/// The 20 value bytes of an [`IntFormat::Q5`] block holding the 5-bit values `q`: 16 bytes of their low
/// nibbles as in Q4_1 (byte `i`: value `i` low, value `16 + i` high), then 4 bytes of their fifth bits
/// (byte `i`, bit `c`: value `4c + i`), so that each 4-value chunk of nibbles (values `4c..4c + 4` and
/// `16 + 4c..`) finds its fifth bits at one bit position of the same 4 bytes ([`pack::weight_value`]).
fn q5_values(q: &[u8; 32]) -> [u8; 20] {
    let mut out = [0u8; 20];
    for i in 0..16 {
        out[i] = (q[i] & 0xF) | (q[16 + i] << 4);
    }
    for (j, &v) in q.iter().enumerate() {
        out[16 + j % 4] |= (v >> 4) << (j / 4);
    }
    out
}

/// A GGUF Q5_1 row as [`IntFormat::Q5`] blocks (f32 scale and minimum, the f16 ones exactly, then the 32
/// 5-bit values, [`q5_values`]): `scale * q + minimum` is Q5_1's `q * d + m` to the bit.
fn q5_1_as_blocks(row: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(row.len() / 24 * 28);
    for blk in row.chunks_exact(24) {
        out.extend_from_slice(&dequant::f16_at(blk, 0).to_le_bytes());
        out.extend_from_slice(&dequant::f16_at(blk, 2).to_le_bytes());
        let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
        let qs = &blk[8..24];
        // value j < 16: the low nibble of qs[j] and bit j of qh; j >= 16: the high nibble of qs[j - 16]
        // and bit j
        let q = std::array::from_fn(|j| {
            let low = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
            low | ((((qh >> j) & 1) as u8) << 4)
        });
        out.extend_from_slice(&q5_values(&q));
    }
    out
}

/// A GGUF Q5_K row as [`IntFormat::Q5`] blocks of 32: sub-block `j` of a super-block has scale `d * sc_j`
/// and minimum `-(dmin * m_j)` (exact in f32, as Q4_K's), so `scale * q + minimum` is Q5_K's
/// `d * sc_j * q - dmin * m_j` to the bit.
fn q5_k_as_blocks(row: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(row.len() / 176 * 8 * 28);
    for sb in row.chunks_exact(176) {
        let (qh, ql) = (&sb[16..48], &sb[48..176]);
        for j in 0..8 {
            out.extend_from_slice(&k_scale_and_minimum(sb, j));
            // sub-block j: the low (even j) or high (odd j) nibbles of the pair's 32 bytes, and bit j of
            // each qh byte
            let q = &ql[32 * (j / 2)..32 * (j / 2) + 32];
            let q = std::array::from_fn(|l| (if j % 2 == 0 { q[l] & 0xF } else { q[l] >> 4 }) | (((qh[l] >> j) & 1) << 4));
            out.extend_from_slice(&q5_values(&q));
        }
    }
    out
}

/// A GGUF Q4_K row as [`IntFormat::Q4K`] blocks of 32 (f32 scale, f32 minimum, 16 bytes of nibbles as in
/// Q4_1): sub-block `j` of a super-block has scale `d * sc_j` and minimum `-(dmin * m_j)` (a 16-bit by
/// 6-bit product, exact in f32), so `scale * q + minimum` is Q4_K's `d * sc_j * q - dmin * m_j` to the
/// bit, and the canonical sum is Q4_1's.
fn q4_k_as_blocks(row: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(row.len() / 144 * 8 * 24);
    for sb in row.chunks_exact(144) {
        for j in 0..8 {
            out.extend_from_slice(&k_scale_and_minimum(sb, j));
            // sub-block j is the low (even j) or high (odd j) nibbles of the pair's 32 bytes
            let q = &sb[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
            let v = |l: usize| if j % 2 == 0 { q[l] & 0xF } else { q[l] >> 4 };
            out.extend((0..16).map(|l| v(l) | (v(l + 16) << 4)));
        }
    }
    out
}

/// Sub-block `j`'s f32 scale `d * sc_j` and minimum `-(dmin * m_j)` of a Q4_K or Q5_K super-block `sb`
/// (`d`, `dmin` and the 6-bit scales and minimums at the same places in both), little-endian.
fn k_scale_and_minimum(sb: &[u8], j: usize) -> [u8; 8] {
    let (d, dmin) = (dequant::f16_at(sb, 0), dequant::f16_at(sb, 2));
    let (sc, m) = dequant::scale_min_k4(j, &sb[4..16]);
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&(d * sc as f32).to_le_bytes());
    out[4..].copy_from_slice(&(-(dmin * m as f32)).to_le_bytes());
    out
}

/// A GGUF Q5_0 row in Q8_0 blocks with the same values (see [`int_format`]).
fn q5_0_as_q8_0(row: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(row.len() / 22 * 34);
    for blk in row.chunks_exact(22) {
        // the 5-bit values as ggml assembles them (the test against candle's dequantization checks the
        // values come out the same)
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        out.extend_from_slice(&blk[0..2]);
        let start = out.len();
        out.resize(start + 32, 0);
        for j in 0..16 {
            let h0 = (((qh >> j) << 4) & 0x10) as u8;
            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
            out[start + j] = (((blk[6 + j] & 0xF) | h0) as i8 - 16) as u8;
            out[start + j + 16] = (((blk[6 + j] >> 4) | h1) as i8 - 16) as u8;
        }
    }
    out
}

/// How a weight format is multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// Integer dot against 8-bit quantized activations.
    Int(IntFormat),
    /// Dequantize each weight row to f32, then a fixed-order f32 dot.
    Dequant,
}

/// A weight tensor as stored in GGUF: `rows x row_len` (rows are output features), in its block format.
#[derive(Clone)]
pub struct QWeight {
    name: String,
    dtype: GgmlDType,
    dims: Vec<usize>,
    rows: usize,
    row_len: usize,
    row_bytes: usize,
    kernel: Kernel,
    /// The integer format the data is held in ([`int_format`]), if any (kept after
    /// [`QWeight::into_exact`]).
    held: Option<IntFormat>,
    /// As in the file, except that the formats with integer kernels are held in the tiles of [`pack`]
    /// (`row_bytes` per row in the held format, the last tile padded to 16 rows), even after
    /// [`QWeight::into_exact`].
    data: AlignedBytes,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QWeight({} {:?} {:?})", self.name, self.dtype, self.dims)
    }
}

impl QWeight {
    /// Wraps raw GGUF tensor bytes; checks the format is one this engine can use.
    pub fn new(name: &str, dtype: GgmlDType, dims: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        let held = int_format(dtype);
        let kernel = match (held, dtype) {
            (Some(f), _) => Kernel::Int(f),
            (None, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => Kernel::Dequant,
            (None, other) => return Err(EngineError::UnsupportedTensorType { name: name.to_string(), dtype: format!("{other:?}") }),
        };
        let row_len = *dims.last().unwrap_or(&1);
        let rows = dims.iter().rev().skip(1).product::<usize>();
        let file_row_bytes = row_len / dtype.block_size() * dtype.type_size();
        if data.len() != rows * file_row_bytes {
            return Err(EngineError::TensorShape { name: name.to_string(), expected: vec![rows * file_row_bytes], actual: vec![data.len()] });
        }
        let (row_bytes, data) = match kernel {
            Kernel::Int(f) => {
                let row_bytes = row_len / pack::QK * f.block_bytes();
                let mut out = AlignedBytes::default();
                out.reset_zeroed(pack::tiled_len(rows, row_bytes));
                for (t, src) in data.chunks(pack::TILE * file_row_bytes).enumerate() {
                    let tile = &mut out.bytes_mut()[t * pack::TILE * row_bytes..(t + 1) * pack::TILE * row_bytes];
                    for (n, row) in src.chunks_exact(file_row_bytes).enumerate() {
                        match dtype {
                            GgmlDType::Q5_0 => pack::pack_row(f, &q5_0_as_q8_0(row), tile, n),
                            GgmlDType::Q4K => pack::pack_row(f, &q4_k_as_blocks(row), tile, n),
                            GgmlDType::Q6K => pack::pack_row(f, &q6_k_as_blocks(row), tile, n),
                            GgmlDType::Q5_1 => pack::pack_row(f, &q5_1_as_blocks(row), tile, n),
                            GgmlDType::Q5K => pack::pack_row(f, &q5_k_as_blocks(row), tile, n),
                            _ => pack::pack_row(f, row, tile, n),
                        }
                    }
                }
                (row_bytes, out)
            }
            Kernel::Dequant => (file_row_bytes, AlignedBytes::from(&data[..])),
        };
        Ok(Self { name: name.to_string(), dtype, dims, rows, row_len, row_bytes, kernel, held, data })
    }

    /// Multiplies by dequantized f32 weights and unquantized activations instead of 8-bit integer dots:
    /// slower, but free of activation rounding (used to check the forward pass against a float reference).
    pub fn into_exact(mut self) -> Self {
        self.kernel = Kernel::Dequant;
        self
    }

    /// Tensor name in the GGUF file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Shape, outermost first.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Block format.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Number of rows (output features of a matrix).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements per row (input features of a matrix).
    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }

    /// Checks the shape is `expected` (outermost first).
    pub fn expect_dims(self, expected: &[usize]) -> Result<Self> {
        if self.dims != expected {
            return Err(EngineError::TensorShape { name: self.name, expected: expected.to_vec(), actual: self.dims });
        }
        Ok(self)
    }

    /// Dequantizes row `r` into `out` (length `row_len`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if let Some(p) = self.held {
            let f: fn(&[u8], &mut [f32]) = match p {
                IntFormat::Q4_0 => dequant::q4_0,
                IntFormat::Q4_1 => dequant::q4_1,
                IntFormat::Q8_0 => dequant::q8_0,
                IntFormat::Q4K => dequant::q4_k_held,
                IntFormat::Q6K => dequant::q6_k_held,
                IntFormat::Q5 => dequant::q5_held,
            };
            let tile = &self.data.bytes()[r / pack::TILE * pack::TILE * self.row_bytes..][..pack::TILE * self.row_bytes];
            let nb = self.row_len / pack::QK;
            let mut blk = [0u8; 40];
            let blk = &mut blk[..p.block_bytes()];
            for (i, o) in out.chunks_exact_mut(pack::QK).enumerate() {
                pack::unpack_block(p, tile, nb, r % pack::TILE, i, blk);
                f(blk, o);
            }
            return;
        }
        let b = &self.data.bytes()[r * self.row_bytes..(r + 1) * self.row_bytes];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has AVX2 and F16C (checked above)
            return unsafe { dequant::row_avx2(self.dtype, b, out) };
        }
        dequant::row(self.dtype, b, out)
    }

    /// The whole tensor as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.row_len];
        for (r, o) in out.chunks_exact_mut(self.row_len).enumerate() {
            self.dequantize_row(r, o);
        }
        out
    }

    /// Whether this weight multiplies 8-bit quantized activations (see [`QWeight::matmul_q8`]).
    pub fn takes_q8(&self) -> bool {
        matches!(self.kernel, Kernel::Int(_))
    }

    /// `out[i, j] = x[i, :] · W[j, :]` for `m` rows of `x`; each element is one fixed-order dot product,
    /// so a row's result does not depend on `m`, the other rows, the thread count or the SIMD level.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut out: Vec<f32> = Vec::with_capacity(m * self.rows);
        // SAFETY: the buffer holds m rows of `rows` columns, and `matmul_to` writes every element (not
        // zeroed first: a memset the size of the result on every matmul was 4-6% of batched decode)
        unsafe {
            self.matmul_to(x, m, simd::Out::strided(out.as_mut_ptr(), self.rows));
            out.set_len(m * self.rows);
        }
        out
    }

    /// As [`QWeight::matmul`], into a buffer of the caller's (`m` rows of [`QWeight::rows`] columns).
    pub fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(out.len(), m * self.rows, "matmul output for {}", self.name);
        // SAFETY: the buffer holds m rows of `rows` columns and is borrowed exclusively for the call
        unsafe { self.matmul_to(x, m, simd::Out::strided(out.as_mut_ptr(), self.rows)) }
    }

    /// As [`QWeight::matmul`], each row of the result in a vector of its own (the logits of a batch,
    /// handed out one per sequence without a copy).
    pub fn matmul_rows(&self, x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let mut outs: Vec<Vec<f32>> = (0..m).map(|_| Vec::with_capacity(self.rows)).collect();
        let table: Vec<*mut f32> = outs.iter_mut().map(|o| o.as_mut_ptr()).collect();
        // SAFETY: every row's buffer holds `rows` columns, `table` outlives the call, and `matmul_to` writes
        // every element
        unsafe {
            self.matmul_to(x, m, simd::Out::table(table.as_ptr()));
            for o in &mut outs {
                o.set_len(self.rows);
            }
        }
        outs
    }

    /// Writes `x · Wᵀ` through `out`.
    ///
    /// # Safety
    /// `out` covers `m` rows of `self.rows` columns that nothing else writes meanwhile.
    unsafe fn matmul_to(&self, x: &[f32], m: usize, out: simd::Out) {
        let k = self.row_len;
        assert_eq!(x.len(), m * k, "matmul input for {} has {} values, expected {m}x{k}", self.name, x.len());
        match self.kernel {
            Kernel::Int(_) => self.matmul_q8_to(simd::detected(), &quantize_rows(x, k), out),
            Kernel::Dequant => columns(self.rows, m, out, |cols, out| {
                // a few weight rows dequantized at a time (in the first-level cache together), then every
                // activation row's dots with them
                const ROWS: usize = 4;
                let mut w = vec![0f32; ROWS * k];
                for j0 in cols.clone().step_by(ROWS) {
                    let n = (cols.end - j0).min(ROWS);
                    for (jj, wr) in w.chunks_exact_mut(k).take(n).enumerate() {
                        self.dequantize_row(j0 + jj, wr);
                    }
                    // SAFETY: as promised by `columns`
                    dot::dots_f32(&w[..n * k], x, k, |i, jj, v| unsafe { out.put(j0 - cols.start + jj, i, v) });
                }
            }),
        }
    }

    /// As [`QWeight::matmul`] for activations already quantized (shared by matrices with the same input).
    pub fn matmul_q8(&self, rows: &[Q8Row]) -> Vec<f32> {
        self.matmul_q8_at(simd::detected(), rows)
    }

    /// As [`QWeight::matmul_q8`] with an explicit kernel level (tests compare levels).
    pub fn matmul_q8_at(&self, level: simd::Level, rows: &[Q8Row]) -> Vec<f32> {
        let mut out: Vec<f32> = Vec::with_capacity(rows.len() * self.rows);
        // SAFETY: as in `matmul`
        unsafe {
            self.matmul_q8_to(level, rows, simd::Out::strided(out.as_mut_ptr(), self.rows));
            out.set_len(rows.len() * self.rows);
        }
        out
    }

    /// # Safety
    /// As [`QWeight::matmul_to`], for `rows.len()` rows.
    unsafe fn matmul_q8_to(&self, level: simd::Level, rows: &[Q8Row], out: simd::Out) {
        let Kernel::Int(f) = self.kernel else {
            panic!("{} ({:?}) does not take 8-bit activations", self.name, self.dtype);
        };
        assert!(rows.iter().all(|r| r.len == self.row_len), "activation width for {}", self.name);
        let acts = simd::Acts::new(level, rows);
        // SAFETY: as promised by `columns`; `acts` was made for `level`
        columns(self.rows, rows.len(), out, |cols, out| unsafe {
            simd::tile(level, f, self.tiles_bytes(&cols), self.row_bytes, cols.len(), &acts, out)
        })
    }

    /// The tiles holding the rows `rows` (which start on a tile).
    fn tiles_bytes(&self, rows: &Range<usize>) -> &[u8] {
        assert_eq!(rows.start % pack::TILE, 0);
        let tb = pack::TILE * self.row_bytes;
        &self.data.bytes()[rows.start / pack::TILE * tb..rows.end.div_ceil(pack::TILE) * tb]
    }
}

/// Several matrices with the same 8-bit input in one parallel region (one fork-join instead of one each),
/// each result into a buffer of the caller's (`rows.len()` rows of the matrix's output width). Each
/// result is bit-identical to [`QWeight::matmul_q8`] of that matrix alone.
pub fn matmul_q8_many_into(ws: &[&QWeight], rows: &[Q8Row], outs: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), outs.len(), "one output per matrix");
    let dst: Vec<simd::Out> = outs
        .iter_mut()
        .zip(ws)
        .map(|(o, w)| {
            assert_eq!(o.len(), rows.len() * w.rows, "output size for {}", w.name);
            simd::Out::strided(o.as_mut_ptr(), w.rows)
        })
        .collect();
    let level = simd::detected();
    let m = rows.len();
    for w in ws {
        assert!(w.takes_q8(), "{} does not take 8-bit activations", w.name);
        assert!(rows.iter().all(|r| r.len == w.row_len), "activation width for {}", w.name);
    }
    let acts = simd::Acts::new(level, rows);
    // the tasks split the matrices' tiles, one after another; a task's tiles may span several matrices
    let tiles: Vec<usize> = ws.iter().map(|w| w.rows.div_ceil(pack::TILE)).collect();
    let mut first = Vec::with_capacity(ws.len() + 1);
    let mut total = 0;
    for t in &tiles {
        first.push(total);
        total += t;
    }
    first.push(total);
    split_tiles(total, m, |ts| {
        let mut t = ts.start;
        while t < ts.end {
            let i = first.partition_point(|&s| s <= t) - 1;
            let end = ts.end.min(first[i + 1]);
            let w = ws[i];
            let Kernel::Int(f) = w.kernel else { unreachable!("checked above") };
            let cols = (t - first[i]) * pack::TILE..((end - first[i]) * pack::TILE).min(w.rows);
            // SAFETY: columns `cols` of matrix i belong to this task alone, and its buffer (borrowed
            // exclusively for the call) holds m rows of w.rows columns
            unsafe {
                let at = dst[i].offset(0, cols.start);
                simd::tile(level, f, w.tiles_bytes(&cols), w.row_bytes, cols.len(), &acts, at);
            }
            t = end;
        }
    });
}

/// Computes `n` output columns of `m` rows in parallel tasks owning whole tiles of 16 columns:
/// `f(columns, out)` writes the results of `columns` (which start on a tile) through `out` (which points
/// at the first of them) and nothing else.
fn columns(n: usize, m: usize, out: simd::Out, f: impl Fn(Range<usize>, simd::Out) + Sync) {
    split_tiles(n.div_ceil(pack::TILE), m, |ts| {
        let cols = ts.start * pack::TILE..(ts.end * pack::TILE).min(n);
        // SAFETY: each task alone writes its columns, for rows the caller's `out` covers
        f(cols.clone(), unsafe { out.offset(0, cols.start) })
    });
}

/// Runs `f` on ranges of tiles that cover `0..tiles` once, in parallel tasks, for `m` activation rows.
fn split_tiles(tiles: usize, m: usize, f: impl Fn(Range<usize>) + Sync) {
    if m == 0 || tiles == 0 {
        return;
    }
    // one contiguous range of tiles per thread: with one activation row (decode) the weights stream from
    // memory and every range start waits on it; with more, the batched kernels prefetch the next tile
    // within a range, and smaller tasks (4 per thread) were slower on the Sapphire Rapids VM (128 rows,
    // Q4_1 576x1536 on 2 threads: 349 against 424 us). Each thread's range is its learnt share of the
    // tiles (`pool::shares`: equal shares give sizes within one tile, the larger first), so a thread on a
    // slower core gets fewer.
    let shares = crate::pool::shares();
    if shares.len() == 1 || tiles == 1 {
        return f(0..tiles);
    }
    let parts = crate::pool::cut(tiles, &shares);
    let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    crate::pool::for_each_part(&sizes, |t| {
        if !parts[t].is_empty() {
            f(parts[t].clone())
        }
    });
}

/// Queues memory for this thread's batched matmuls to prefetch while they run, replacing what was queued
/// (start and length in bytes; an empty iterator clears the queue): the next layer's key/value caches in a
/// batched decode step, which the matmuls before them leave time to fetch. Nothing on other machines.
pub fn prefetch_ahead(ranges: impl IntoIterator<Item = (*const u8, usize)>) {
    #[cfg(target_arch = "x86_64")]
    wtile::prefetch_ahead(ranges);
    #[cfg(not(target_arch = "x86_64"))]
    drop(ranges);
}

/// Asks for the lines of the `len` bytes at `p` (which may lie past any allocation: a prefetch never
/// faults) to be brought into the second-level cache. Nothing on other machines.
#[inline(always)]
pub fn prefetch_l2(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    wtile::prefetch_l2(p, len);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// Quantizes each `k`-wide row of `x` to 8-bit blocks (rows in parallel when there are many).
pub fn quantize_rows(x: &[f32], k: usize) -> Q8Rows {
    let one = |row: &[f32]| {
        let mut q = spare_row();
        q.quantize_into(row);
        q
    };
    Q8Rows(if x.len() >= 1 << 13 && crate::pool::current_threads() > 1 {
        crate::pool::map(x.len() / k, |i| one(&x[i * k..(i + 1) * k]))
    } else {
        x.chunks_exact(k).map(one).collect()
    })
}

/// Activation rows quantized by [`quantize_rows`]. Dropped, their buffers become the dropping thread's
/// spares, which the next rows it quantizes reuse: a 32-sequence decode step of SmolLM2 quantizes about
/// 3,800 rows, each in five buffers, and allocating them afresh (and growing them) was 2-3% of its time.
pub struct Q8Rows(Vec<Q8Row>);

impl std::ops::Deref for Q8Rows {
    type Target = [Q8Row];
    fn deref(&self) -> &[Q8Row] {
        &self.0
    }
}

impl Drop for Q8Rows {
    fn drop(&mut self) {
        // (a thread being torn down has no spares left to keep them in)
        let _ = SPARE_ROWS.try_with(|s| {
            let mut s = s.borrow_mut();
            let room = MAX_SPARE_ROWS.saturating_sub(s.len());
            s.extend(self.0.drain(..).take(room));
        });
    }
}

/// Most spare rows a thread keeps (a 1536-wide row holds about 2.3 KB).
const MAX_SPARE_ROWS: usize = 256;

thread_local! {
    static SPARE_ROWS: std::cell::RefCell<Vec<Q8Row>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A spare row of this thread's, or a new one.
fn spare_row() -> Q8Row {
    SPARE_ROWS.try_with(|s| s.borrow_mut().pop()).ok().flatten().unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests;
