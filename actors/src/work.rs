//! Messages of the inference path: what schedulers, workers and sessions send each other.

use flotilla_engine::SamplingParams;
use serde::{Deserialize, Serialize};

use crate::placement::Placement;

/// A request, named by the node that owns its session and a number unique on that node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReqId {
    pub origin: String,
    pub id: u64,
}

impl std::fmt::Display for ReqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.origin, self.id)
    }
}

/// What one worker serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub replica: u32,
    pub stage: u32,
    pub n_stages: u32,
    /// Layers `[start, end)`.
    pub start: u32,
    pub end: u32,
    /// Node of the next stage (none for the last).
    pub next: Option<String>,
}

impl Role {
    /// Whether `other` asks this worker for the same computation: the same layers, stage position and
    /// next stage (the replica's number is only the scheduler's bookkeeping).
    pub fn same_work(&self, other: &Role) -> bool {
        (self.stage, self.n_stages, self.start, self.end, &self.next) == (other.stage, other.n_stages, other.start, other.end, &other.next)
    }
}

/// The scheduler's instruction to one worker for a placement epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub epoch: u64,
    pub role: Option<Role>,
    /// The node whose scheduler published this (loaded reports go there).
    pub leader: String,
}

/// First step of a sequence on a pipeline: what the last stage needs to sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirstStep {
    pub params: SamplingParams,
    /// `tokens[..n_prompt]` is the prompt; the rest were generated before a resume.
    pub n_prompt: u32,
}

/// One sequence's step at one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqWork {
    pub req: ReqId,
    /// Placement epoch the request was admitted under.
    pub epoch: u64,
    /// Positions already in this stage's cache for the sequence.
    pub start: u32,
    /// The new tokens of this step.
    pub tokens: Vec<u32>,
    /// Hidden states of the new positions as little-endian f32 (empty at stage 0).
    pub hidden: Vec<u8>,
    pub first: Option<FirstStep>,
}

/// A token sampled by a last stage, for the session that owns the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenOut {
    pub req: ReqId,
    /// Index of the token in the output.
    pub index: u32,
    pub token: u32,
}

/// A step a worker could not run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqFailure {
    pub req: ReqId,
    pub node: String,
    pub reason: String,
}

/// Tokens and failures for the sessions of one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SessionBatch {
    pub tokens: Vec<TokenOut>,
    pub failures: Vec<SeqFailure>,
}

/// A worker's answer to an `Assignment`: every assignment gets one, so the scheduler never waits on
/// a worker that silently ignored it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Loaded {
    pub node: String,
    /// The epoch of the assignment answered.
    pub epoch: u64,
    pub outcome: LoadOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LoadOutcome {
    /// The worker holds the assigned layers (or none, if it was assigned none).
    Loaded,
    /// The layers could not be loaded.
    Failed(String),
    /// The worker already follows a newer epoch (another scheduler led briefly and numbered its own
    /// placement): the scheduler issues its placement again above `current`.
    Stale { current: u64 },
    /// The worker's node does not see the sender as the leader (yet): the scheduler sends it again.
    NotLeader { leader: Option<String> },
}

/// What a worker is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct WorkerStats {
    pub node: String,
    pub epoch: u64,
    pub role: Option<Role>,
    pub loaded: bool,
    /// Sequences with a KV cache here.
    pub sequences: u32,
    pub kv_bytes: u64,
    /// Steps waiting for the compute thread.
    pub queue_depth: u32,
    pub last_batch: u32,
    pub batches: u64,
    pub forward_seconds: f64,
}

/// A session asks the active scheduler for a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdmitReq {
    pub req: ReqId,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    /// Nodes the session cannot reach now (a stage it found gone): replicas through them are avoided
    /// while another one exists.
    #[serde(default)]
    pub avoid: Vec<String>,
}

/// The scheduler's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdmitReply {
    Admitted {
        epoch: u64,
        replica: u32,
        stages: Vec<String>,
    },
    /// The queue is full: try again later (HTTP 429).
    Busy {
        queued: u32,
    },
    /// No full placement (HTTP 503).
    Unavailable(String),
    /// This scheduler is not (or no longer) the leader's: ask the leader of the asker's view again.
    NotLeader(String),
}

/// A session is done with its pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub req: ReqId,
    pub epoch: u64,
    pub replica: u32,
}

/// The scheduler's state, for `/ready` and `admin status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SchedulerStatus {
    pub node: String,
    pub active: bool,
    pub placement: Option<Placement>,
    /// Every node of the placement has loaded its layers.
    pub ready: bool,
    pub loaded: Vec<String>,
    /// Requests running on each replica.
    pub running: Vec<u32>,
    pub waiting: u32,
    pub error: Option<String>,
    /// The change to the current placement epoch: in progress while `ready` is false.
    #[serde(default)]
    pub rebalance: Option<RebalanceStatus>,
}

/// How the active scheduler's latest placement change is going.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebalanceStatus {
    pub epoch: u64,
    /// The epoch it replaces (none for the first placement this scheduler made).
    pub from_epoch: Option<u64>,
    /// Layers that nodes must load because they did not hold them before.
    pub moved_layers: u32,
    /// Unix time in milliseconds when it was planned.
    pub planned_at_ms: u64,
    /// When the last worker reported its layers loaded (none while in progress).
    pub ready_at_ms: Option<u64>,
    /// Nodes of the placement that have not yet reported their layers loaded.
    pub pending: Vec<String>,
}
