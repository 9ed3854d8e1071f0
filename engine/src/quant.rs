//! Quantized weight matrices and the matmul that multiplies activations by them.

mod dequant;
pub mod dot;

use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use crate::error::{EngineError, Result};
use dot::Q8Row;

/// Output columns handled by one parallel task.
const COLS_PER_TASK: usize = 32;

/// How a weight format is multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// Integer dot against 8-bit quantized activations.
    Q4_0,
    Q4_1,
    Q8_0,
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
    data: Vec<u8>,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QWeight({} {:?} {:?})", self.name, self.dtype, self.dims)
    }
}

impl QWeight {
    /// Wraps raw GGUF tensor bytes; checks the format is one this engine can use.
    pub fn new(name: &str, dtype: GgmlDType, dims: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        let kernel = match dtype {
            GgmlDType::Q4_0 => Kernel::Q4_0,
            GgmlDType::Q4_1 => Kernel::Q4_1,
            GgmlDType::Q8_0 => Kernel::Q8_0,
            GgmlDType::F32
            | GgmlDType::F16
            | GgmlDType::BF16
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K => Kernel::Dequant,
            other => return Err(EngineError::UnsupportedTensorType { name: name.to_string(), dtype: format!("{other:?}") }),
        };
        let row_len = *dims.last().unwrap_or(&1);
        let rows = dims.iter().rev().skip(1).product::<usize>();
        let row_bytes = row_len / dtype.block_size() * dtype.type_size();
        if data.len() != rows * row_bytes {
            return Err(EngineError::TensorShape { name: name.to_string(), expected: vec![rows * row_bytes], actual: vec![data.len()] });
        }
        Ok(Self { name: name.to_string(), dtype, dims, rows, row_len, row_bytes, kernel, data })
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

    fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Dequantizes row `r` into `out` (length `row_len`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let b = self.row(r);
        let bs = self.dtype.block_size();
        let ts = self.dtype.type_size();
        let f: fn(&[u8], &mut [f32]) = match self.dtype {
            GgmlDType::F32 => dequant::f32_block,
            GgmlDType::F16 => dequant::f16_block,
            GgmlDType::BF16 => dequant::bf16_block,
            GgmlDType::Q4_0 => dequant::q4_0,
            GgmlDType::Q4_1 => dequant::q4_1,
            GgmlDType::Q5_0 => dequant::q5_0,
            GgmlDType::Q5_1 => dequant::q5_1,
            GgmlDType::Q8_0 => dequant::q8_0,
            GgmlDType::Q4K => dequant::q4_k,
            GgmlDType::Q5K => dequant::q5_k,
            GgmlDType::Q6K => dequant::q6_k,
            _ => unreachable!("format checked in QWeight::new"),
        };
        if bs == 1 {
            f(b, out);
        } else {
            for (blk, o) in b.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
                f(blk, o);
            }
        }
    }

    /// The whole tensor as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.row_len];
        for (r, o) in out.chunks_exact_mut(self.row_len).enumerate() {
            self.dequantize_row(r, o);
        }
        out
    }

    /// `out[i, j] = x[i, :] · W[j, :]` for `m` rows of `x`; each element is one fixed-order dot product,
    /// so a row's result does not depend on `m`, the other rows or the thread count.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (k, n) = (self.row_len, self.rows);
        assert_eq!(x.len(), m * k, "matmul input for {} has {} values, expected {m}x{k}", self.name, x.len());
        let q8: Vec<Q8Row> = match self.kernel {
            Kernel::Dequant => Vec::new(),
            _ => x.chunks_exact(k).map(Q8Row::quantize).collect(),
        };
        // Column-major scratch: each task owns whole output columns.
        let mut out_t = vec![0f32; n * m];
        let work = |(t, chunk): (usize, &mut [f32])| {
            let c0 = t * COLS_PER_TASK;
            let mut wrow = if self.kernel == Kernel::Dequant { vec![0f32; k] } else { Vec::new() };
            for (ci, col) in chunk.chunks_exact_mut(m).enumerate() {
                let j = c0 + ci;
                let w = self.row(j);
                match self.kernel {
                    Kernel::Q4_0 => col.iter_mut().zip(&q8).for_each(|(o, a)| *o = dot::dot_q4_0(w, a)),
                    Kernel::Q4_1 => col.iter_mut().zip(&q8).for_each(|(o, a)| *o = dot::dot_q4_1(w, a)),
                    Kernel::Q8_0 => col.iter_mut().zip(&q8).for_each(|(o, a)| *o = dot::dot_q8_0(w, a)),
                    Kernel::Dequant => {
                        self.dequantize_row(j, &mut wrow);
                        col.iter_mut().zip(x.chunks_exact(k)).for_each(|(o, a)| *o = dot::dot_f32(&wrow, a));
                    }
                }
            }
        };
        if n * m >= 4096 {
            out_t.par_chunks_mut(COLS_PER_TASK * m).enumerate().for_each(work);
        } else {
            out_t.chunks_mut(COLS_PER_TASK * m).enumerate().for_each(work);
        }
        let mut out = vec![0f32; m * n];
        for j in 0..n {
            for i in 0..m {
                out[i * n + j] = out_t[j * m + i];
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
