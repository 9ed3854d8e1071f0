//! The worker actor: one per node, in process group `worker:{node}`. It holds the layer range the
//! placement gives this node and the KV caches of the sequences passing through it.
//!
//! The actor only forwards messages to a dedicated compute thread, so its loop never blocks. The
//! thread does continuous batching: it takes every step that is waiting, runs one batched forward,
//! and sends each sequence on, hidden states to the next stage's worker, or (at the last stage) the
//! sampled token to the session that owns the request.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use flotilla_engine::sampling::sample;
use flotilla_engine::{hidden_from_bytes, hidden_to_bytes, KvCache, Model, SamplingParams, SeqStep, Shard, StageInput, StageOutput};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;

use crate::membership::SharedIdentity;
use crate::protocol::SCOPE;
use crate::scheduler::SchedulerMsg;
use crate::sessions::SessionsMsg;
use crate::wire::Wire;
use crate::work::{Assignment, LoadOutcome, Loaded, ReqId, Role, SeqFailure, SeqWork, SessionBatch, TokenOut, WorkerStats};

/// Process group of the worker on `node`.
pub fn group(node: &str) -> String {
    format!("worker:{node}")
}

/// The first member of a process group (local or remote).
pub fn member<M: ractor::Message>(group: &str) -> Option<ActorRef<M>> {
    ractor::pg::get_scoped_members(&SCOPE.to_string(), &group.to_string()).into_iter().next().map(Into::into)
}

#[derive(RactorClusterMessage)]
pub enum WorkerMsg {
    /// From the active scheduler: this node's role in a placement epoch.
    Assign(Wire<Assignment>),
    /// Steps of sequences, from a session (stage 0) or the previous stage.
    Step(Wire<Vec<SeqWork>>),
    /// Drop these sequences' caches (finished or cancelled).
    Free(Wire<Vec<ReqId>>),
    #[rpc]
    Stats(RpcReplyPort<Wire<WorkerStats>>),
}

pub struct WorkerArgs {
    pub node: String,
    pub model_path: PathBuf,
    /// This node's identity: the worker takes assignments only from the leader its node sees.
    pub identity: SharedIdentity,
}

pub struct Worker;

pub struct WorkerState {
    jobs: Sender<Job>,
    stats: Arc<Mutex<WorkerStats>>,
}

enum Job {
    Assign(Assignment),
    Steps(Vec<SeqWork>),
    Free(Vec<ReqId>),
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = WorkerArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: WorkerArgs) -> Result<Self::State, ActorProcessingErr> {
        let stats = Arc::new(Mutex::new(WorkerStats { node: args.node.clone(), ..Default::default() }));
        let (tx, rx) = channel();
        let mut compute = Compute {
            node: args.node.clone(),
            model_path: args.model_path,
            identity: args.identity,
            model: None,
            current: None,
            epoch: 0,
            epoch_leader: None,
            load_error: None,
            seqs: HashMap::new(),
            stats: stats.clone(),
        };
        std::thread::Builder::new().name(format!("flotilla-worker-{}", args.node)).spawn(move || compute.run(rx))?;
        ractor::pg::join_scoped(SCOPE.to_string(), group(&args.node), vec![myself.get_cell()]);
        Ok(WorkerState { jobs: tx, stats })
    }

    async fn handle(&self, _myself: ActorRef<Self::Msg>, msg: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let job = match msg {
            WorkerMsg::Assign(Wire::Ok(a)) => Job::Assign(a),
            WorkerMsg::Step(Wire::Ok(s)) => {
                st.stats.lock().expect("stats lock").queue_depth += s.len() as u32;
                Job::Steps(s)
            }
            WorkerMsg::Free(Wire::Ok(ids)) => Job::Free(ids),
            WorkerMsg::Stats(port) => {
                let _ = port.send(Wire::Ok(st.stats.lock().expect("stats lock").clone()));
                return Ok(());
            }
            WorkerMsg::Assign(Wire::Bad(e)) | WorkerMsg::Step(Wire::Bad(e)) | WorkerMsg::Free(Wire::Bad(e)) => {
                tracing::warn!(error = %e, "worker ignores an undecodable message");
                return Ok(());
            }
        };
        st.jobs.send(job).map_err(|_| "the compute thread has stopped")?;
        Ok(())
    }
}

/// This node's layers for the current role.
struct Current {
    role: Role,
    /// Epoch since which the role has not changed: work admitted since then may run here.
    since: u64,
    shard: Shard,
    /// KV bytes of 32 sequences (the default `max_batch`) at full context: the denominator of the usage ratio.
    kv_capacity: u64,
}

/// One sequence's state at this stage.
struct Seq {
    cache: KvCache,
    /// Last stage only: every token so far (prompt, then output) and how many are the prompt.
    context: Vec<u32>,
    n_prompt: usize,
    params: SamplingParams,
}

struct Compute {
    node: String,
    model_path: PathBuf,
    identity: SharedIdentity,
    model: Option<Model>,
    current: Option<Current>,
    epoch: u64,
    /// The scheduler that issued `epoch`.
    epoch_leader: Option<String>,
    /// Why the layers of `epoch`'s assignment could not be loaded.
    load_error: Option<String>,
    seqs: HashMap<ReqId, Seq>,
    stats: Arc<Mutex<WorkerStats>>,
}

impl Compute {
    fn run(&mut self, rx: Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            jobs.extend(rx.try_iter());
            let mut steps = Vec::new();
            for job in jobs {
                match job {
                    Job::Steps(s) => steps.extend(s),
                    Job::Free(ids) => {
                        for id in ids {
                            self.seqs.remove(&id);
                        }
                        self.update_stats(0, 0.0);
                    }
                    Job::Assign(a) => {
                        self.run_steps(std::mem::take(&mut steps));
                        self.assign(a);
                    }
                }
            }
            self.run_steps(steps);
        }
    }

    fn assign(&mut self, a: Assignment) {
        let outcome = self.take(&a);
        tracing::debug!(epoch = a.epoch, leader = %a.leader, ?outcome, "assignment answered");
        match member::<SchedulerMsg>(&crate::scheduler::group(&a.leader)) {
            Some(s) => {
                let _ = s.cast(SchedulerMsg::Loaded(Wire::Ok(Loaded { node: self.node.clone(), epoch: a.epoch, outcome })));
            }
            None => tracing::debug!(leader = %a.leader, "the scheduler that sent an assignment is gone"),
        }
    }

    /// Applies an assignment, or says why not: only the leader this node sees may assign, and never
    /// an epoch older than the one the worker follows (two schedulers may lead at once for a moment,
    /// while the views converge, and number their placements independently).
    fn take(&mut self, a: &Assignment) -> LoadOutcome {
        let leader = self.identity.lock().expect("identity lock").leader.clone();
        if leader.as_deref() != Some(a.leader.as_str()) {
            return LoadOutcome::NotLeader { leader };
        }
        // Two schedulers numbering from the same gossiped maximum reach equal epochs: an equal epoch from
        // another leader is another placement, so it is refused as stale too (and issued again above).
        let same_epoch = a.epoch == self.epoch;
        if a.epoch < self.epoch || (same_epoch && self.epoch_leader.as_deref().is_some_and(|l| l != a.leader)) {
            return LoadOutcome::Stale { current: self.epoch };
        }
        if let Some(e) = self.load_error.as_ref().filter(|_| same_epoch) {
            return LoadOutcome::Failed(e.clone()); // the same assignment sent again: not loaded twice
        }
        self.epoch = a.epoch;
        self.epoch_leader = Some(a.leader.clone());
        self.load_error = None;
        let outcome = match a.role.clone() {
            None => {
                if self.current.take().is_some() {
                    tracing::info!(epoch = a.epoch, "released this node's layers");
                }
                self.seqs.clear();
                LoadOutcome::Loaded
            }
            Some(role) if self.current.as_ref().is_some_and(|c| c.role.same_work(&role)) => {
                // Same layers and the same next stage: caches and in-flight work stay valid, even if the
                // replica was renumbered because another one went away.
                if let Some(c) = self.current.as_mut() {
                    c.role = role;
                }
                LoadOutcome::Loaded
            }
            Some(role) => {
                self.current = None;
                self.seqs.clear();
                let t0 = Instant::now();
                match self.load(&role) {
                    Ok(shard) => {
                        crate::metrics::m().shard_load_seconds.observe(t0.elapsed().as_secs_f64());
                        tracing::info!(epoch = a.epoch, replica = role.replica, stage = role.stage, layers = ?(role.start..role.end), "layers loaded");
                        let kv_capacity = (shard.new_cache().size_bytes_per_position() * shard.config().context_length * 32) as u64;
                        self.current = Some(Current { role, since: a.epoch, shard, kv_capacity });
                        LoadOutcome::Loaded
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot load the assigned layers");
                        self.load_error = Some(e.clone());
                        LoadOutcome::Failed(e)
                    }
                }
            }
        };
        self.update_stats(0, 0.0);
        outcome
    }

    fn load(&mut self, role: &Role) -> Result<Shard, String> {
        if self.model.is_none() {
            self.model = Some(Model::open(&self.model_path).map_err(|e| format!("opening {}: {e}", self.model_path.display()))?);
        }
        let model = self.model.as_mut().expect("opened above");
        model.load_shard(role.start as usize..role.end as usize).map_err(|e| e.to_string())
    }

    fn fail(&self, failures: &mut BTreeMap<String, SessionBatch>, req: &ReqId, reason: String) {
        tracing::debug!(%req, %reason, "step refused");
        failures.entry(req.origin.clone()).or_default().failures.push(SeqFailure { req: req.clone(), node: self.node.clone(), reason });
    }

    fn run_steps(&mut self, mut steps: Vec<SeqWork>) {
        while !steps.is_empty() {
            // One step per sequence per forward; a second step of the same sequence waits for the next round.
            let mut seen = HashSet::new();
            let (now, later): (Vec<SeqWork>, Vec<SeqWork>) = steps.into_iter().partition(|w| seen.insert(w.req.clone()));
            self.forward(now);
            steps = later;
        }
    }

    fn forward(&mut self, steps: Vec<SeqWork>) {
        if steps.is_empty() {
            return;
        }
        let mut out: BTreeMap<String, SessionBatch> = BTreeMap::new();
        let n = steps.len() as u32;
        {
            let mut s = self.stats.lock().expect("stats lock");
            s.queue_depth = s.queue_depth.saturating_sub(n);
        }
        let Some(cur) = &self.current else {
            for w in &steps {
                self.fail(&mut out, &w.req, format!("{} holds no layers in epoch {}", self.node, self.epoch));
            }
            return self.send_sessions(out);
        };
        let (is_first, is_last, width) = (cur.role.stage == 0, cur.role.next.is_none(), cur.shard.config().n_embd);
        // Admit each step or fail it.
        let mut batch: Vec<(SeqWork, Seq, Vec<f32>)> = Vec::new();
        for w in steps {
            if w.epoch < cur.since || w.epoch > self.epoch {
                self.fail(
                    &mut out,
                    &w.req,
                    format!("stale placement epoch {} on {} (role since {}, now {})", w.epoch, self.node, cur.since, self.epoch),
                );
                continue;
            }
            let seq = match &w.first {
                Some(f) => Seq { cache: cur.shard.new_cache(), context: w.tokens.clone(), n_prompt: f.n_prompt as usize, params: f.params.clone() },
                None => match self.seqs.remove(&w.req) {
                    Some(mut s) => {
                        if is_last {
                            s.context.extend_from_slice(&w.tokens);
                        }
                        s
                    }
                    None => {
                        self.fail(&mut out, &w.req, format!("{} has no cache for {}", self.node, w.req));
                        continue;
                    }
                },
            };
            if seq.cache.len() != w.start as usize {
                self.fail(&mut out, &w.req, format!("{}: cache holds {} positions, step starts at {}", self.node, seq.cache.len(), w.start));
                continue;
            }
            let hidden = if is_first {
                Vec::new()
            } else {
                match hidden_from_bytes(&w.hidden, width) {
                    Ok(h) if h.len() == w.tokens.len() * width => h,
                    Ok(h) => {
                        self.fail(&mut out, &w.req, format!("{} hidden values for {} tokens", h.len(), w.tokens.len()));
                        continue;
                    }
                    Err(e) => {
                        self.fail(&mut out, &w.req, e.to_string());
                        continue;
                    }
                }
            };
            tracing::trace!(req = %w.req, stage = cur.role.stage, start = w.start, tokens = w.tokens.len(), "step");
            batch.push((w, seq, hidden));
        }
        if batch.is_empty() {
            return self.send_sessions(out);
        }
        let t0 = Instant::now();
        let result = {
            let mut steps: Vec<SeqStep> = batch
                .iter_mut()
                .map(|(w, s, h)| SeqStep { cache: &mut s.cache, input: if is_first { StageInput::Tokens(&w.tokens) } else { StageInput::Hidden(h) } })
                .collect();
            cur.shard.forward(&mut steps)
        };
        let secs = t0.elapsed().as_secs_f64();
        let next = cur.role.next.clone();
        match result {
            Err(e) => {
                for (w, _, _) in &batch {
                    self.fail(&mut out, &w.req, format!("forward failed on {}: {e}", self.node));
                }
            }
            Ok(outputs) => {
                let mut onward = Vec::new();
                for ((w, seq, _), o) in batch.into_iter().zip(outputs) {
                    match o {
                        StageOutput::Logits(logits) => {
                            let output = &seq.context[seq.n_prompt.min(seq.context.len())..];
                            let index = output.len();
                            let token = sample(&logits, &seq.params, index as u64, &seq.context, output);
                            out.entry(w.req.origin.clone()).or_default().tokens.push(TokenOut { req: w.req.clone(), index: index as u32, token });
                        }
                        StageOutput::Hidden(h) => onward.push(SeqWork { hidden: hidden_to_bytes(&h), ..w.clone() }),
                    }
                    self.seqs.insert(w.req, seq);
                }
                if !onward.is_empty() {
                    let next = next.expect("a middle stage has a next stage");
                    let bytes: usize = onward.iter().map(|w| w.hidden.len()).sum();
                    crate::metrics::m().activation_bytes_sent.with_label_values(&[next.as_str()]).inc_by(bytes as u64);
                    match member::<WorkerMsg>(&group(&next)) {
                        Some(wk) if wk.cast(WorkerMsg::Step(Wire::Ok(onward.clone()))).is_ok() => {}
                        _ => {
                            for w in &onward {
                                self.fail(&mut out, &w.req, format!("next stage {next} is unreachable"));
                            }
                        }
                    }
                }
            }
        }
        self.update_stats(n, secs);
        self.send_sessions(out);
    }

    fn send_sessions(&self, out: BTreeMap<String, SessionBatch>) {
        for (origin, batch) in out {
            match member::<SessionsMsg>(&crate::sessions::group(&origin)) {
                Some(s) => {
                    let _ = s.cast(SessionsMsg::Deliver(Wire::Ok(batch)));
                }
                None => tracing::debug!(%origin, "the node owning these requests is gone"),
            }
        }
    }

    fn update_stats(&self, batch: u32, secs: f64) {
        let mut s = self.stats.lock().expect("stats lock");
        s.epoch = self.epoch;
        s.role = self.current.as_ref().map(|c| c.role.clone());
        s.loaded = self.current.is_some();
        s.sequences = self.seqs.len() as u32;
        s.kv_bytes = self.seqs.values().map(|q| q.cache.size_bytes() as u64).sum();
        let m = crate::metrics::m();
        m.sequences_held.set(s.sequences as i64);
        m.kv_cache_bytes.set(s.kv_bytes as i64);
        m.layers_held.set(s.role.as_ref().map_or(0, |r| (r.end - r.start) as i64));
        if let Some(c) = &self.current {
            m.kv_cache_usage.set(if c.kv_capacity == 0 { 0.0 } else { s.kv_bytes as f64 / c.kv_capacity as f64 });
        }
        if batch > 0 {
            m.batch_size.observe(batch as f64);
            m.forward_seconds.observe(secs);
            s.last_batch = batch;
            s.batches += 1;
            s.forward_seconds += secs;
        }
    }
}
