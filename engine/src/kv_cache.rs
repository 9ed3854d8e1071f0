//! Per-sequence key/value cache for the layers of one shard.

use crate::attention::{key_index, key_len, KEY_BLOCK};

/// Keys and values of one sequence for every layer a shard holds: keys in the key blocks of
/// [`crate::attention`] (16 positions side by side), values one `kv_dim`-wide row per position.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// First global layer index; a cache only fits the shard it was made for.
    first_layer: usize,
    n_kv: usize,
    head_dim: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Positions held (equal for every layer between forwards).
    len: usize,
}

impl KvCache {
    pub(crate) fn new(first_layer: usize, n_layers: usize, n_kv: usize, head_dim: usize) -> Self {
        Self { first_layer, n_kv, head_dim, keys: vec![Vec::new(); n_layers], values: vec![Vec::new(); n_layers], len: 0 }
    }

    fn kv_dim(&self) -> usize {
        self.n_kv * self.head_dim
    }

    /// Number of positions cached: the position the next token gets.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The layer range this cache covers.
    pub fn layers(&self) -> std::ops::Range<usize> {
        self.first_layer..self.first_layer + self.keys.len()
    }

    /// Forgets every position from `len` on (e.g. to re-run a suffix). The last key block keeps the old
    /// keys past `len`, which no query sees and the next positions overwrite.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            let kv_dim = self.kv_dim();
            for (k, v) in self.keys.iter_mut().zip(&mut self.values) {
                k.truncate(key_len(len, kv_dim));
                v.truncate(len * kv_dim);
            }
            self.len = len;
        }
    }

    /// Bytes one more position takes (keys and values of every layer).
    pub fn size_bytes_per_position(&self) -> usize {
        2 * self.keys.len() * self.kv_dim() * 4
    }

    /// Bytes held by cached keys and values.
    pub fn size_bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|v| v.len() * 4).sum()
    }

    /// Keys and values (rows) of the positions after the cached ones, for one layer.
    pub(crate) fn push(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (n_kv, hd) = (self.n_kv, self.head_dim);
        let kv_dim = n_kv * hd;
        let keys = &mut self.keys[layer];
        let end = self.len + k.len() / kv_dim;
        keys.resize(keys.len().max(key_len(end, kv_dim)), 0.0);
        for (i, row) in k.chunks_exact(kv_dim).enumerate() {
            let p = self.len + i;
            for g in 0..n_kv {
                // the 16 positions of a block sit side by side: element d of this position every 16 floats
                let at = key_index(p, g, 0, n_kv, hd);
                let dst = keys[at..at + (hd - 1) * KEY_BLOCK + 1].iter_mut().step_by(KEY_BLOCK);
                for (o, &x) in dst.zip(&row[g * hd..(g + 1) * hd]) {
                    *o = x;
                }
            }
        }
        self.values[layer].extend_from_slice(v);
    }

    /// A layer's keys (key blocks) and values (rows).
    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }

    pub(crate) fn advance(&mut self, rows: usize) {
        self.len += rows;
    }
}
