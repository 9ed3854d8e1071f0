//! Activation quantization to 8-bit blocks and the scalar integer dot products against weight blocks.
//!
//! Each output element is one dot product with a fixed block order, whatever the batch size or thread
//! count: that is what keeps shard and batch invariance bit-exact.

use super::dequant::f16_at;

/// Elements per 8-bit activation block.
pub const QK8: usize = 32;

/// One row of activations quantized to 8-bit blocks: `x ≈ d * q`, with `s = d * Σq` for formats with a minimum.
#[derive(Debug, Clone, Default)]
pub struct Q8Row {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub qs: Vec<i8>,
}

impl Q8Row {
    /// Quantizes `x` (length a multiple of 32) into 8-bit blocks, one scale per block.
    pub fn quantize(x: &[f32]) -> Self {
        let mut row = Q8Row::default();
        row.quantize_into(x);
        row
    }

    /// As `quantize`, reusing this row's buffers.
    pub fn quantize_into(&mut self, x: &[f32]) {
        debug_assert_eq!(x.len() % QK8, 0);
        let nb = x.len() / QK8;
        self.d.clear();
        self.s.clear();
        self.qs.clear();
        self.qs.reserve(x.len());
        for blk in x.chunks_exact(QK8) {
            let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for &v in blk {
                let q = (v * id).round() as i8;
                sum += q as i32;
                self.qs.push(q);
            }
            self.d.push(d);
            self.s.push(d * sum as f32);
        }
        debug_assert_eq!(self.d.len(), nb);
    }
}

/// Q4_0 weight row (18-byte blocks) · Q8 activation row.
pub fn dot_q4_0(w: &[u8], a: &Q8Row) -> f32 {
    let mut acc = 0f32;
    for (i, b) in w.chunks_exact(18).enumerate() {
        let q8 = &a.qs[i * QK8..(i + 1) * QK8];
        let qs = &b[2..18];
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += ((qs[j] & 0xF) as i32 - 8) * q8[j] as i32;
            sumi += ((qs[j] >> 4) as i32 - 8) * q8[j + 16] as i32;
        }
        acc += (f16_at(b, 0) * a.d[i]) * sumi as f32;
    }
    acc
}

/// Q4_1 weight row (20-byte blocks) · Q8 activation row (uses the block sums for the minimum).
pub fn dot_q4_1(w: &[u8], a: &Q8Row) -> f32 {
    let mut acc = 0f32;
    for (i, b) in w.chunks_exact(20).enumerate() {
        let q8 = &a.qs[i * QK8..(i + 1) * QK8];
        let qs = &b[4..20];
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += (qs[j] & 0xF) as i32 * q8[j] as i32;
            sumi += (qs[j] >> 4) as i32 * q8[j + 16] as i32;
        }
        acc += (f16_at(b, 0) * a.d[i]) * sumi as f32 + f16_at(b, 2) * a.s[i];
    }
    acc
}

/// Q8_0 weight row (34-byte blocks) · Q8 activation row.
pub fn dot_q8_0(w: &[u8], a: &Q8Row) -> f32 {
    let mut acc = 0f32;
    for (i, b) in w.chunks_exact(34).enumerate() {
        let q8 = &a.qs[i * QK8..(i + 1) * QK8];
        let mut sumi = 0i32;
        for j in 0..32 {
            sumi += (b[2 + j] as i8) as i32 * q8[j] as i32;
        }
        acc += (f16_at(b, 0) * a.d[i]) * sumi as f32;
    }
    acc
}

/// Fixed-order f32 dot product (8 interleaved partial sums, combined in a fixed tree).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut p = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            p[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut tail = 0f32;
    for i in chunks * 8..a.len() {
        tail += a[i] * b[i];
    }
    ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7])) + tail
}
