//! The configuration file's shape: serde structs with defaults and no unknown keys.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The cookie a node uses when none is configured; refused on non-loopback cluster addresses.
pub const DEFAULT_COOKIE: &str = "flotilla-insecure-default-cookie";

/// The whole configuration, as written in a TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub node: NodeSection,
    pub cluster: ClusterSection,
    pub http: HttpSection,
    pub model: ModelSection,
    pub parallelism: ParallelismSection,
}

/// This node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Unique name in the cluster; a restarted node rejoins under it.
    pub name: String,
    /// Relative weight for placement (a node with 2.0 gets about twice the layers of one with 1.0).
    pub capacity: f64,
    /// Compute threads for the engine (0: one per available core; at most 48 are used).
    pub threads: usize,
    /// Milliseconds a node takes at most to drain and leave on SIGTERM/SIGINT or `admin shutdown`.
    pub leave_timeout_ms: u64,
    /// Accept `flotilla admin inject-panic` (chaos testing only).
    pub fault_injection: bool,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self { name: "node1".into(), capacity: 1.0, threads: 0, leave_timeout_ms: 5000, fault_injection: false }
    }
}

/// The actor mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// `host:port` the cluster server listens on.
    pub listen: String,
    /// Host peers dial to reach this node (default: the listen IP, or the node name when listening on all interfaces).
    pub advertise: Option<String>,
    /// `host:port` of nodes to join through.
    pub seeds: Vec<String>,
    /// Shared secret every node of the cluster must present (also `FLOTILLA_COOKIE`).
    pub cookie: String,
    /// Milliseconds between heartbeats to each peer.
    pub heartbeat_interval_ms: u64,
    /// Missed heartbeats before a peer is marked down.
    pub heartbeat_misses: u32,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7400".into(),
            advertise: None,
            seeds: Vec::new(),
            cookie: DEFAULT_COOKIE.into(),
            heartbeat_interval_ms: 250,
            heartbeat_misses: 6,
        }
    }
}

/// The OpenAI-compatible HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// `host:port` the API listens on.
    pub listen: String,
    /// Bearer tokens accepted; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Requests waiting beyond this many get HTTP 429.
    pub queue_limit: usize,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// How long a request already under way waits for a full placement to resume on (after losing
    /// its pipeline while too little capacity is left) before it fails; new requests get 503 at once.
    pub resume_wait_ms: u64,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self { listen: "127.0.0.1:8080".into(), api_keys: Vec::new(), queue_limit: 256, max_body_bytes: 4 << 20, resume_wait_ms: 30_000 }
    }
}

/// The served model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// GGUF file, the same on every node.
    pub path: PathBuf,
    /// Model id shown by `/v1/models` (default: the file stem).
    pub id: Option<String>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { path: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"), id: None }
    }
}

/// How the model is spread over the nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelismSection {
    /// Data-parallel copies of the model.
    pub replicas: Count,
    /// Pipeline stages per copy.
    pub stages: Count,
    /// Requests running at once on one replica (more wait in the queue).
    pub max_batch: u32,
}

impl Default for ParallelismSection {
    fn default() -> Self {
        Self { replicas: Count::Auto, stages: Count::Auto, max_batch: 32 }
    }
}

/// A number, or `auto` to let placement choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Auto,
    Fixed(u32),
}

impl Serialize for Count {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Count::Auto => s.serialize_str("auto"),
            Count::Fixed(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a positive integer or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Count, E> {
                u32::try_from(v).map(Count::Fixed).map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Count, E> {
                u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative"))).and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Count, E> {
                match v.trim() {
                    "auto" => Ok(Count::Auto),
                    s => s.parse::<u32>().map(Count::Fixed).map_err(|_| E::custom(format!("{v:?} is neither a positive integer nor \"auto\""))),
                }
            }
        }
        d.deserialize_any(V)
    }
}
