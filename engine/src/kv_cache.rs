//! Per-sequence key/value cache for the layers of one shard.

/// Keys and values of one sequence for every layer a shard holds, one `kv_dim`-wide row per position.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// First global layer index; a cache only fits the shard it was made for.
    first_layer: usize,
    kv_dim: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Positions held (equal for every layer between forwards).
    len: usize,
}

impl KvCache {
    pub(crate) fn new(first_layer: usize, n_layers: usize, kv_dim: usize) -> Self {
        Self { first_layer, kv_dim, keys: vec![Vec::new(); n_layers], values: vec![Vec::new(); n_layers], len: 0 }
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

    /// Forgets every position from `len` on (e.g. to re-run a suffix).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for (k, v) in self.keys.iter_mut().zip(&mut self.values) {
                k.truncate(len * self.kv_dim);
                v.truncate(len * self.kv_dim);
            }
            self.len = len;
        }
    }

    /// Bytes held by cached keys and values.
    /// Bytes one more position takes (keys and values of every layer).
    pub fn size_bytes_per_position(&self) -> usize {
        2 * self.keys.len() * self.kv_dim * 4
    }

    pub fn size_bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|v| v.len() * 4).sum()
    }

    pub(crate) fn push(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        self.keys[layer].extend_from_slice(k);
        self.values[layer].extend_from_slice(v);
    }

    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }

    pub(crate) fn advance(&mut self, rows: usize) {
        self.len += rows;
    }
}
