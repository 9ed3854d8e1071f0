//! A contiguous range of decoder layers and the batched forward pass over them.

use std::ops::Range;
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::quant::QWeight;
use crate::{attention, ops, pool, quant};

/// Weights of one decoder layer.
struct Layer {
    attn_norm: Vec<f32>,
    wq: QWeight,
    wk: QWeight,
    wv: QWeight,
    /// Qwen2-style projection biases.
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    wo: QWeight,
    ffn_norm: Vec<f32>,
    w_gate: QWeight,
    w_up: QWeight,
    w_down: QWeight,
}

/// Final norm and output projection, held by the last stage.
struct Head {
    norm: Vec<f32>,
    output: Arc<QWeight>,
}

/// What one sequence brings to a stage.
#[derive(Debug, Clone, Copy)]
pub enum StageInput<'a> {
    /// Token ids (first stage).
    Tokens(&'a [u32]),
    /// Hidden states from the previous stage, `rows x n_embd`.
    Hidden(&'a [f32]),
}

/// One sequence's part of a batched forward: its cache and its new positions.
#[derive(Debug)]
pub struct SeqStep<'a> {
    pub cache: &'a mut KvCache,
    pub input: StageInput<'a>,
}

/// What a stage produces for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum StageOutput {
    /// Hidden states of every new position, `rows x n_embd` (middle stages).
    Hidden(Vec<f32>),
    /// Logits of the last new position (last stage).
    Logits(Vec<f32>),
}

impl StageOutput {
    /// The logits, if this came from the last stage.
    pub fn into_logits(self) -> Option<Vec<f32>> {
        match self {
            Self::Logits(l) => Some(l),
            Self::Hidden(_) => None,
        }
    }
}

/// Layers `[start, end)` of a model; the first stage also embeds tokens, the last one also produces logits.
pub struct Shard {
    cfg: Arc<ModelConfig>,
    range: Range<usize>,
    embedding: Option<Arc<QWeight>>,
    layers: Vec<Layer>,
    head: Option<Head>,
    inv_freq: Vec<f64>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("model", &self.cfg.name).field("range", &self.range).finish()
    }
}

fn matrix(g: &mut GgufFile, name: &str, dims: &[usize], exact: bool) -> Result<QWeight> {
    let w = g.read_weight(name)?.expect_dims(dims)?;
    Ok(if exact { w.into_exact() } else { w })
}

fn norm_weight(g: &mut GgufFile, name: &str, width: usize) -> Result<Vec<f32>> {
    Ok(g.read_weight(name)?.expect_dims(&[width])?.dequantize())
}

fn opt_bias(g: &mut GgufFile, name: &str, width: usize) -> Result<Option<Vec<f32>>> {
    if g.has_tensor(name) {
        norm_weight(g, name, width).map(Some)
    } else {
        Ok(None)
    }
}

impl Shard {
    /// Loads layers `range` of the model in `g`, reading only the tensors this shard needs.
    /// With `exact`, matmuls skip 8-bit activation quantization (see [`QWeight::into_exact`]).
    pub fn load(g: &mut GgufFile, cfg: Arc<ModelConfig>, range: Range<usize>, exact: bool) -> Result<Self> {
        if range.start >= range.end || range.end > cfg.n_layers {
            return Err(EngineError::LayerRangeOutOfBounds { start: range.start, end: range.end, layers: cfg.n_layers });
        }
        let (d, q_dim, kv_dim, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let first = range.start == 0;
        let last = range.end == cfg.n_layers;
        let mut embedding = None;
        if first || (last && cfg.tied_embeddings) {
            embedding = Some(Arc::new(matrix(g, "token_embd.weight", &[cfg.vocab_size, d], exact)?));
        }
        let mut layers = Vec::with_capacity(range.len());
        for i in range.clone() {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: norm_weight(g, &n("attn_norm.weight"), d)?,
                wq: matrix(g, &n("attn_q.weight"), &[q_dim, d], exact)?,
                wk: matrix(g, &n("attn_k.weight"), &[kv_dim, d], exact)?,
                wv: matrix(g, &n("attn_v.weight"), &[kv_dim, d], exact)?,
                bq: opt_bias(g, &n("attn_q.bias"), q_dim)?,
                bk: opt_bias(g, &n("attn_k.bias"), kv_dim)?,
                bv: opt_bias(g, &n("attn_v.bias"), kv_dim)?,
                wo: matrix(g, &n("attn_output.weight"), &[d, q_dim], exact)?,
                ffn_norm: norm_weight(g, &n("ffn_norm.weight"), d)?,
                w_gate: matrix(g, &n("ffn_gate.weight"), &[ff, d], exact)?,
                w_up: matrix(g, &n("ffn_up.weight"), &[ff, d], exact)?,
                w_down: matrix(g, &n("ffn_down.weight"), &[d, ff], exact)?,
            });
        }
        let head = if last {
            let output = if cfg.tied_embeddings {
                embedding.clone().expect("read above for tied models")
            } else {
                Arc::new(matrix(g, "output.weight", &[cfg.vocab_size, d], exact)?)
            };
            Some(Head { norm: norm_weight(g, "output_norm.weight", d)?, output })
        } else {
            None
        };
        if !first {
            embedding = None;
        }
        let factors = if g.has_tensor("rope_freqs.weight") { Some(norm_weight(g, "rope_freqs.weight", cfg.rope_dims / 2)?) } else { None };
        let inv_freq = ops::rope_inv_freq(cfg.rope_dims, cfg.rope_theta, factors.as_deref());
        Ok(Self { cfg, range, embedding, layers, head, inv_freq })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Arc<ModelConfig> {
        &self.cfg
    }

    /// Global layer indices held.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Whether this shard embeds tokens (takes token ids as input).
    pub fn is_first(&self) -> bool {
        self.embedding.is_some()
    }

    /// Whether this shard produces logits.
    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down].iter().map(|w| w.size_bytes()).sum::<usize>()
                    + 4 * (l.attn_norm.len() + l.ffn_norm.len())
            })
            .sum();
        let emb = self.embedding.as_ref().map_or(0, |e| e.size_bytes());
        let head = self.head.as_ref().map_or(0, |h| if self.is_first() && self.cfg.tied_embeddings { 0 } else { h.output.size_bytes() });
        layers + emb + head
    }

    /// An empty cache for one sequence on this shard.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.range.start, self.layers.len(), self.cfg.n_head_kv, self.cfg.head_dim)
    }

    /// Runs one batched step: every sequence brings its new positions (any number, any start).
    /// Returns, per sequence in order, hidden states (middle stages) or last-position logits (last stage).
    pub fn forward(&self, batch: &mut [SeqStep<'_>]) -> Result<Vec<StageOutput>> {
        let cfg = &*self.cfg;
        let d = cfg.n_embd;
        // Check every sequence before touching any cache.
        let mut rows = Vec::with_capacity(batch.len());
        for s in batch.iter() {
            if s.cache.layers() != self.range {
                return Err(EngineError::StageInput { reason: format!("cache for layers {:?} used on shard {:?}", s.cache.layers(), self.range) });
            }
            let n = match (s.input, self.is_first()) {
                (StageInput::Tokens(t), true) => {
                    if let Some(&id) = t.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                        return Err(EngineError::TokenOutOfRange { id, vocab: cfg.vocab_size });
                    }
                    t.len()
                }
                (StageInput::Hidden(h), false) => {
                    if h.len() % d != 0 {
                        return Err(EngineError::HiddenBytes { bytes: h.len() * 4, width: d });
                    }
                    h.len() / d
                }
                (StageInput::Tokens(_), false) => {
                    return Err(EngineError::StageInput { reason: format!("shard {:?} takes hidden states, not tokens", self.range) })
                }
                (StageInput::Hidden(_), true) => {
                    return Err(EngineError::StageInput { reason: "the first shard takes tokens, not hidden states".into() })
                }
            };
            if n == 0 {
                return Err(EngineError::StageInput { reason: "a sequence in the batch has no new positions".into() });
            }
            let needed = s.cache.len() + n;
            if needed > cfg.context_length {
                return Err(EngineError::ContextOverflow { needed, context: cfg.context_length });
            }
            rows.push(n);
        }
        // A batch of many short sequences (batched decode): each thread runs the whole stage for its own
        // run of sequences, with no step shared between threads.
        if let Some(groups) = sequence_groups(&rows, &pool::shares()) {
            return self.forward_groups(batch, &rows, &groups);
        }
        let total: usize = rows.iter().sum();
        // each sequence's first row in the batch's rows
        let first = first_rows(&rows);

        // Rows in parts: one per thread for a prompt, each part's rows carried through the row-wise steps
        // and matmuls of a layer by the thread that owns it; one part of all rows otherwise. The parts
        // follow the threads' learnt speeds, so they are cut again for every layer.
        let mut parts = row_parts(total, &pool::shares());
        let inputs: Vec<StageInput> = batch.iter().map(|s| s.input).collect();
        let starts: Vec<usize> = batch.iter().map(|s| s.cache.len()).collect();
        // which sequence row r is, and which of its new positions
        let locate = |r: usize| {
            let i = first.partition_point(|&f| f <= r) - 1;
            (i, r - first[i])
        };

        // The input rows of every sequence in one [total, d] matrix, with their rotary tables (by absolute
        // position).
        let mut x = vec![0f32; total * d];
        let mut tables: Vec<Vec<(f32, f32)>> = vec![Vec::new(); total];
        {
            let mut ps: Vec<_> = split_rows_mut(&mut x, d, &parts).into_iter().zip(split_rows_mut(&mut tables, 1, &parts)).zip(&parts).collect();
            pool::each_part_mut(&mut ps, &sizes(&parts), |_, ((xs, ts), part)| {
                for ((r, xr), t) in part.clone().zip(xs.chunks_exact_mut(d)).zip(ts.iter_mut()) {
                    let (i, j) = locate(r);
                    match inputs[i] {
                        StageInput::Tokens(toks) => self.embedding.as_ref().expect("first stage").dequantize_row(toks[j] as usize, xr),
                        StageInput::Hidden(h) => xr.copy_from_slice(&h[j * d..(j + 1) * d]),
                    }
                    ops::rope_table(starts[i] + j, &self.inv_freq, t);
                }
            });
        }

        let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
        // every layer's buffers (written whole by each layer), and each part's normed rows
        let mut q = vec![0f32; total * q_dim];
        let mut k = vec![0f32; total * kv_dim];
        let mut v = vec![0f32; total * kv_dim];
        let mut attn = vec![0f32; total * q_dim];
        let mut bufs: Vec<PartBuffers> = Vec::new();
        for (li, l) in self.layers.iter().enumerate() {
            if li > 0 {
                parts = row_parts(total, &pool::shares());
            }
            if bufs.len() != parts.len() || bufs.iter().zip(&parts).any(|(b, p)| b.rows != p.len()) {
                bufs = parts.iter().map(|p| PartBuffers::new(p.len(), d, cfg.n_ff)).collect();
            }
            {
                let mut ps: Vec<_> = split_rows_mut(&mut q, q_dim, &parts)
                    .into_iter()
                    .zip(split_rows_mut(&mut k, kv_dim, &parts))
                    .zip(split_rows_mut(&mut v, kv_dim, &parts))
                    .zip(bufs.iter_mut().zip(&parts))
                    .collect();
                pool::each_part_mut(&mut ps, &sizes(&parts), |_, (((q, k), v), (b, part))| {
                    self.attention_input(l, &x[part.start * d..part.end * d], &tables[part.clone()], &mut b.normed, q, k, v)
                });
            }
            // each sequence's cache on its own (a position's keys touch a line per key block row)
            pool::each_mut(batch, |i, s| {
                let (a, b) = (first[i], first[i] + rows[i]);
                s.cache.push(li, &k[a * kv_dim..b * kv_dim], &v[a * kv_dim..b * kv_dim]);
            });
            let mut seqs = Vec::with_capacity(batch.len());
            let mut r0 = 0;
            for (s, &n) in batch.iter().zip(&rows) {
                let (kc, vc) = s.cache.layer(li);
                seqs.push(attention::AttnSeq { q: &q[r0 * q_dim..(r0 + n) * q_dim], k: kc, v: vc, start: s.cache.len() });
                r0 += n;
            }
            // (what the matmuls since have not prefetched, the attention asks for itself)
            quant::prefetch_ahead(std::iter::empty());
            attention::attention_many(&seqs, cfg.n_head, cfg.n_head_kv, cfg.head_dim, &mut attn);
            // the next layer's caches, fetched while the matmuls up to its attention run
            if li + 1 < self.layers.len() {
                quant::prefetch_ahead(batch.iter().flat_map(|s| {
                    let (k, v) = s.cache.layer(li + 1);
                    [(k.as_ptr() as *const u8, size_of_val(k)), (v.as_ptr() as *const u8, size_of_val(v))]
                }));
            }
            let mut ps: Vec<_> = split_rows_mut(&mut x, d, &parts).into_iter().zip(bufs.iter_mut().zip(&parts)).collect();
            pool::each_part_mut(&mut ps, &sizes(&parts), |_, (x, (b, part))| {
                self.attention_output_and_ffn(l, &attn[part.start * q_dim..part.end * q_dim], b, x)
            });
        }
        quant::prefetch_ahead(std::iter::empty());
        for (s, &n) in batch.iter_mut().zip(&rows) {
            s.cache.advance(n);
        }

        let Some(head) = &self.head else {
            let mut out = Vec::with_capacity(batch.len());
            let mut r0 = 0;
            for &n in &rows {
                out.push(StageOutput::Hidden(x[r0 * d..(r0 + n) * d].to_vec()));
                r0 += n;
            }
            return Ok(out);
        };
        // Logits only for each sequence's last position.
        let mut last = Vec::with_capacity(batch.len() * d);
        let mut r0 = 0;
        for &n in &rows {
            r0 += n;
            last.extend_from_slice(&x[(r0 - 1) * d..r0 * d]);
        }
        let mut normed = vec![0f32; last.len()];
        ops::rms_norm(&last, &head.norm, cfg.rms_eps, &mut normed);
        // each sequence's logits straight into a vector of its own
        Ok(head.output.matmul_rows(&normed, batch.len()).into_iter().map(StageOutput::Logits).collect())
    }
}

impl Shard {
    /// [`Shard::forward`] of each run of sequences `groups` (consecutive, covering the batch) on a thread
    /// of its own: inside a task the pool runs every region on that thread alone, so each run takes the
    /// one-part path, as a batch of its own. A sequence's result does not depend on the other sequences
    /// in its batch, so the results are those of the whole batch in one. [`Shard::forward`] checked every
    /// sequence before, so no run fails on its input after another has written its caches.
    fn forward_groups(&self, batch: &mut [SeqStep<'_>], rows: &[usize], groups: &[Range<usize>]) -> Result<Vec<StageOutput>> {
        let mut rest = batch;
        let mut runs: Vec<_> = groups
            .iter()
            .map(|g| {
                let (run, tail) = std::mem::take(&mut rest).split_at_mut(g.len());
                rest = tail;
                (run, None::<Result<Vec<StageOutput>>>)
            })
            .collect();
        assert!(rest.is_empty(), "the groups cover the batch");
        let sizes: Vec<usize> = groups.iter().map(|g| rows[g.clone()].iter().sum()).collect();
        pool::each_part_mut(&mut runs, &sizes, |_, (run, out)| *out = Some(self.forward(run)));
        let mut out = Vec::new();
        for (_, r) in runs {
            out.extend(r.expect("every run ran")?);
        }
        Ok(out)
    }

    /// A layer's attention input for some rows `x` (with their rotary tables): normed (into `h`), projected
    /// to queries, keys and values (with biases) into `q`, `k`, `v`, rotated.
    #[allow(clippy::too_many_arguments)]
    fn attention_input(&self, l: &Layer, x: &[f32], tables: &[Vec<(f32, f32)>], h: &mut [f32], q: &mut [f32], k: &mut [f32], v: &mut [f32]) {
        let cfg = &*self.cfg;
        let (d, n) = (cfg.n_embd, tables.len());
        norm_rows(cfg, x, &l.attn_norm, h);
        SharedInput::new(h, n, d).matmul_many_into([&l.wq, &l.wk, &l.wv], [&mut *q, &mut *k, &mut *v]);
        add_bias(q, l.bq.as_deref());
        add_bias(k, l.bk.as_deref());
        add_bias(v, l.bv.as_deref());
        rope_rows(cfg, q, cfg.q_dim(), tables);
        rope_rows(cfg, k, cfg.kv_dim(), tables);
    }

    /// The rest of a layer for some rows: the attention output `attn` projected and added to the residual
    /// stream `x`, then the feed-forward block (its input normed into `b.normed`, its gate and up
    /// projections in `b.gate`, `b.up`) added to it.
    fn attention_output_and_ffn(&self, l: &Layer, attn: &[f32], b: &mut PartBuffers, x: &mut [f32]) {
        let cfg = &*self.cfg;
        let d = cfg.n_embd;
        let n = x.len() / d;
        let o = l.wo.matmul(attn, n);
        add_rows(d, x, &o);
        norm_rows(cfg, x, &l.ffn_norm, &mut b.normed);
        SharedInput::new(&b.normed, n, d).matmul_many_into([&l.w_gate, &l.w_up], [&mut b.gate, &mut b.up]);
        let (gate, up, ff) = (&mut b.gate[..], &b.up[..], cfg.n_ff);
        pool::rows_mut(gate, ff, PAR, |rows, part| ops::swiglu(part, &up[rows.start * ff..rows.end * ff]));
        let down = l.w_down.matmul(gate, n);
        add_rows(d, x, &down);
    }
}

/// A part's buffers for a layer's row-wise steps (written whole by each layer, allocated again only when
/// the part's size changes): the normed input of the attention and of the feed-forward block, and the
/// feed-forward gate and up projections.
struct PartBuffers {
    rows: usize,
    normed: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl PartBuffers {
    fn new(rows: usize, width: usize, ff: usize) -> Self {
        PartBuffers { rows, normed: vec![0.0; rows * width], gate: vec![0.0; rows * ff], up: vec![0.0; rows * ff] }
    }
}

/// Row-wise steps run in parallel parts of rows (same bits) once there is this much of them (values).
const PAR: usize = 1 << 14;

fn norm_rows(cfg: &ModelConfig, x: &[f32], w: &[f32], h: &mut [f32]) {
    let d = cfg.n_embd;
    pool::rows_mut(h, d, PAR, |rows, part| ops::rms_norm(&x[rows.start * d..rows.end * d], w, cfg.rms_eps, part))
}

fn add_rows(d: usize, x: &mut [f32], y: &[f32]) {
    pool::rows_mut(x, d, PAR, |rows, part| ops::add_assign(part, &y[rows.start * d..rows.end * d]))
}

fn rope_rows(cfg: &ModelConfig, x: &mut [f32], width: usize, tables: &[Vec<(f32, f32)>]) {
    pool::rows_mut(x, width, PAR, |rows, part| {
        for (r, row) in rows.zip(part.chunks_exact_mut(width)) {
            ops::apply_rope(row, cfg.head_dim, &tables[r], cfg.rope_style);
        }
    })
}

/// Rows each thread's part of a prompt needs at least; fewer (decode, small batches) stay one part, and
/// the matmuls split their columns instead, so each weight streams from memory once per step.
const PART_MIN_ROWS: usize = 32;

/// The batch's `total` rows in parts: one per thread (`shares`, the threads' learnt shares of the
/// speed), each its share of the rows in whole tiles of 16 rows (the batched kernels' unit), when there
/// are at least [`PART_MIN_ROWS`] rows per thread; else one part. A thread that carries its rows through
/// a layer's row-wise steps and matmuls finds them in its own cache (split by matmul columns, half of
/// every step's input comes from the other core), and a layer runs in three parallel regions instead of
/// twenty. Every row's result is the same either way. A part that would be empty is left out.
#[allow(clippy::single_range_in_vec_init, reason = "one part holding every row is meant")]
fn row_parts(total: usize, shares: &[f64]) -> Vec<Range<usize>> {
    if shares.len() < 2 || total < shares.len() * PART_MIN_ROWS {
        return vec![0..total];
    }
    let tiles = total.div_ceil(16);
    pool::cut(tiles, shares).into_iter().filter(|r| !r.is_empty()).map(|r| r.start * 16..(r.end * 16).min(total)).collect()
}

/// Each part's rows.
fn sizes(parts: &[Range<usize>]) -> Vec<usize> {
    parts.iter().map(|p| p.len()).collect()
}

/// Rows per thread a batch needs at least for [`sequence_groups`]: the batched kernels' per-row cost
/// levels off from about 16 activation rows, and a thread running its own sequences streams every
/// weight itself.
const GROUP_MIN_ROWS: usize = 16;

/// The fewest rows of one run (a thread with a small share of the speed gets fewer than
/// [`GROUP_MIN_ROWS`]; the batched kernels unpack each weight tile once from 8 activation rows).
const GROUP_LEAST_ROWS: usize = 8;

/// The batch's sequences (their new rows `rows`) in one run of consecutive sequences per thread
/// (`shares`, the threads' learnt shares of the speed), when the batch has at least [`GROUP_MIN_ROWS`]
/// rows per thread and each run gets at least [`GROUP_LEAST_ROWS`] and no more than a quarter over its
/// share of the rows; else `None` (a long prompt, or too few rows), and the rows go
/// into [`row_parts`]. 32 decode steps on two threads ran about 10% faster this way than with every
/// matmul's columns split between the threads (about 20 parallel regions per layer; BENCHMARKS.md,
/// Emerald Rapids).
fn sequence_groups(rows: &[usize], shares: &[f64]) -> Option<Vec<Range<usize>>> {
    let threads = shares.len();
    let total: usize = rows.iter().sum();
    if threads < 2 || rows.len() < threads || total < threads * GROUP_MIN_ROWS {
        return None;
    }
    let sum: f64 = shares.iter().sum();
    let share: Vec<f64> = shares.iter().map(|s| s / sum).collect();
    // cut before the sequence whose first row is nearest each share's end
    let starts = first_rows(rows);
    let mut cuts = vec![0];
    let mut acc = 0.0;
    for s in &share[..threads - 1] {
        acc += s;
        let target = total as f64 * acc;
        let gap = |i: usize| (starts[i] as f64 - target).abs();
        let i = (0..rows.len()).min_by(|&a, &b| gap(a).total_cmp(&gap(b))).expect("rows is not empty");
        cuts.push(i);
    }
    cuts.push(rows.len());
    let groups: Vec<Range<usize>> = cuts.windows(2).map(|w| w[0]..w[1]).collect();
    let fits = groups.iter().zip(&share).all(|(g, s)| {
        let n: usize = rows[g.clone()].iter().sum();
        let most = (total as f64 * s * 1.25).ceil() as usize;
        !g.is_empty() && n >= GROUP_LEAST_ROWS && n <= most
    });
    fits.then_some(groups)
}

/// Where each sequence's rows start among the batch's rows (`rows[i]` rows for sequence `i`).
fn first_rows(rows: &[usize]) -> Vec<usize> {
    rows.iter().scan(0, |r0, &n| Some(std::mem::replace(r0, *r0 + n))).collect()
}

/// `x` (rows of `width` items) cut into the consecutive row ranges `parts` (which cover it).
fn split_rows_mut<'a, T>(mut x: &'a mut [T], width: usize, parts: &[Range<usize>]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let (a, b) = std::mem::take(&mut x).split_at_mut(p.len() * width);
        out.push(a);
        x = b;
    }
    out
}

/// An input multiplied by several matrices: quantized to 8-bit blocks once, on first use.
struct SharedInput<'a> {
    x: &'a [f32],
    rows: usize,
    width: usize,
    q8: std::cell::OnceCell<crate::quant::Q8Rows>,
}

impl<'a> SharedInput<'a> {
    fn new(x: &'a [f32], rows: usize, width: usize) -> Self {
        Self { x, rows, width, q8: std::cell::OnceCell::new() }
    }

    fn q8(&self) -> &[crate::quant::dot::Q8Row] {
        self.q8.get_or_init(|| crate::quant::quantize_rows(self.x, self.width))
    }

    /// Every matrix times this input, into `outs`; matrices that take 8-bit input share one parallel
    /// region.
    fn matmul_many_into<const N: usize>(&self, ws: [&QWeight; N], mut outs: [&mut [f32]; N]) {
        if ws.iter().all(|w| w.takes_q8()) {
            crate::quant::matmul_q8_many_into(&ws, self.q8(), &mut outs);
        } else {
            for (w, o) in ws.iter().zip(outs) {
                if w.takes_q8() {
                    crate::quant::matmul_q8_many_into(&[w], self.q8(), &mut [o]);
                } else {
                    w.matmul_into(self.x, self.rows, o);
                }
            }
        }
    }
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            ops::add_assign(row, b);
        }
    }
}

/// Hidden states as the bytes that cross a stage boundary (f32, little-endian).
pub fn hidden_to_bytes(h: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(h.len() * 4);
    for v in h {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Hidden states back from their wire bytes; `width` is the model width.
pub fn hidden_from_bytes(b: &[u8], width: usize) -> Result<Vec<f32>> {
    if width == 0 || !b.len().is_multiple_of(4 * width) {
        return Err(EngineError::HiddenBytes { bytes: b.len(), width });
    }
    Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_groups_cut_between_sequences_near_the_threads_shares() {
        let even = |t: usize| vec![1.0 / t as f64; t];
        assert_eq!(sequence_groups(&[1; 32], &even(1)), None, "one thread");
        assert_eq!(sequence_groups(&[1; 32], &even(2)), Some(vec![0..16, 16..32]));
        assert_eq!(sequence_groups(&[1; 31], &even(2)), None, "too few rows for a second run");
        assert_eq!(sequence_groups(&[1; 48], &even(3)), Some(vec![0..16, 16..32, 32..48]));
        assert_eq!(sequence_groups(&[128], &even(2)), None, "one prompt: row parts");
        assert_eq!(sequence_groups(&[37, 50, 23], &even(2)), None, "no cut near an even share");
        assert_eq!(sequence_groups(&[20, 3, 20, 1, 2], &even(2)), Some(vec![0..2, 2..5]));
        // a thread with 40% of the speed gets 40% of the rows, down to 8 rows
        assert_eq!(sequence_groups(&[1; 32], &[0.55, 0.45]), Some(vec![0..18, 18..32]));
        assert_eq!(sequence_groups(&[1; 32], &[0.6, 0.4]), Some(vec![0..19, 19..32]));
        assert_eq!(sequence_groups(&[1; 32], &[0.25, 0.75]), Some(vec![0..8, 8..32]));
        assert_eq!(sequence_groups(&[1; 32], &[0.2, 0.8]), None, "under 8 rows for a run");
        for threads in 2..5 {
            for n in 1..80 {
                let rows: Vec<usize> = (0..n).map(|i| 1 + i % 3).collect();
                if let Some(g) = sequence_groups(&rows, &even(threads)) {
                    assert_eq!(g.len(), threads);
                    assert_eq!((g[0].start, g[threads - 1].end), (0, n));
                    assert!(g.windows(2).all(|w| w[0].end == w[1].start));
                    assert!(g.iter().all(|g| rows[g.clone()].iter().sum::<usize>() >= GROUP_LEAST_ROWS));
                }
            }
        }
    }

    #[test]
    fn row_parts_cover_every_row_once_in_whole_tiles() {
        let even = |t: usize| vec![1.0 / t as f64; t];
        assert_eq!(row_parts(128, &even(1)), vec![0..128]);
        assert_eq!(row_parts(32, &even(2)), vec![0..32], "too few rows per thread: one part");
        assert_eq!(row_parts(128, &even(2)), vec![0..64, 64..128]);
        assert_eq!(row_parts(110, &even(3)), vec![0..48, 48..80, 80..110]);
        assert_eq!(row_parts(128, &[0.36, 0.64]), vec![0..48, 48..128], "a slower thread gets fewer tiles");
        let skewed = [vec![0.7, 0.3], vec![0.2, 0.3, 0.5], vec![0.1, 0.1, 0.1, 0.7]];
        for shares in (1..5).map(even).chain(skewed) {
            for total in 1..300 {
                let parts = row_parts(total, &shares);
                let threads = shares.len();
                assert_eq!(parts.first().unwrap().start, 0);
                assert_eq!(parts.last().unwrap().end, total);
                assert!(parts.windows(2).all(|w| w[0].end == w[1].start && w[0].end % 16 == 0 && !w[0].is_empty()));
                assert!(parts.len() == 1 || parts.iter().all(|p| !p.is_empty()), "{total} rows, {threads} threads");
            }
        }
    }
}
