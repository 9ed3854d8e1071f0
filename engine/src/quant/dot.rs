//! Activation quantization to 8-bit blocks, and the fixed-order f32 dot product.

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
