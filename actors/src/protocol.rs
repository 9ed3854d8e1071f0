//! Everything that crosses nodes besides ractor_cluster's own frames: what a node announces about
//! itself, heartbeats, admin commands and their replies. All of it travels as [`crate::wire::Wire`].

use serde::{Deserialize, Serialize};

use crate::view::{Member, MemberState};

/// Process group scope of every flotilla actor.
pub const SCOPE: &str = "flotilla";
/// Process group of the membership actors, one per node.
pub const MEMBERSHIP_GROUP: &str = "membership";
/// Process group of the admin actors, one per node.
pub const ADMIN_GROUP: &str = "admin";

/// What a node reports about its own resource use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    pub uptime_s: f64,
    pub rss_bytes: u64,
    /// Peers with a live, heartbeating session.
    pub peers: u32,
    /// Messages from peers that did not decode (wrong version, garbage).
    pub bad_messages: u64,
    /// Inbound or outbound sessions that closed before authenticating (wrong cookie, not a flotilla node, garbage).
    pub rejected_sessions: u64,
}

/// A node's claims about itself, sent with every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announce {
    pub name: String,
    pub incarnation: u64,
    pub cluster_addr: String,
    pub http_addr: String,
    pub capacity: f64,
    /// `joining`, `up`, `draining` or `left`: the states a node can claim for itself.
    pub state: MemberState,
    /// The highest placement epoch this node knows.
    pub placement_epoch: u64,
    pub load: NodeLoad,
}

impl Announce {
    /// The member record this announcement describes, in `state`.
    pub fn member(&self, state: MemberState) -> Member {
        Member {
            name: self.name.clone(),
            incarnation: self.incarnation,
            cluster_addr: self.cluster_addr.clone(),
            http_addr: self.http_addr.clone(),
            capacity: self.capacity,
            state,
            load: self.load.clone(),
        }
    }
}

/// A heartbeat and its answer have the same shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Beat {
    pub from: Announce,
    /// How the sender sees the receiver: `(incarnation, state)`. A node told it is `down` at its
    /// current incarnation rejoins under a new one.
    pub your_state: Option<(u64, MemberState)>,
}

/// Operator commands, sent by `flotilla admin` to any node's admin actor and routed to the node they name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminRequest {
    Status,
    /// Stop giving the node new work (later issues also move its shards away).
    Drain(String),
    /// Undo `Drain`.
    Undrain(String),
    /// Ask the leader for a new placement epoch.
    Rebalance,
    /// Make the node drain and leave the cluster, then exit.
    Shutdown(String),
    /// Chaos testing: make a supervised child of `node` panic. Refused unless `node.fault_injection` is set there.
    InjectPanic {
        node: String,
        child: String,
    },
    /// Chaos testing: `node` closes its connection to `peer` and refuses every reconnection, in either
    /// direction, for `ms` milliseconds (a cut link; both stay connected to everyone else). Refused
    /// unless `node.fault_injection` is set on `node`.
    CutLink {
        node: String,
        peer: String,
        ms: u64,
    },
}

/// A membership change, kept in a short log for `admin status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembershipEvent {
    /// Unix time in milliseconds, on the node that saw it.
    pub at_ms: u64,
    pub node: String,
    pub incarnation: u64,
    pub from: Option<MemberState>,
    pub to: MemberState,
    pub reason: String,
}

/// The answer to `Status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node: String,
    pub protocol_version: u32,
    pub leader: Option<String>,
    pub placement_epoch: u64,
    pub members: Vec<Member>,
    /// Most recent last.
    pub events: Vec<MembershipEvent>,
    /// The active scheduler's view: placement, readiness, running and waiting requests.
    #[serde(default)]
    pub scheduler: Option<crate::work::SchedulerStatus>,
    /// Each reachable worker: role, sequences held, queue depth, last batch size.
    #[serde(default)]
    pub workers: Vec<crate::work::WorkerStats>,
}

/// The answer to an [`AdminRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // one reply per operator command; boxing would buy nothing
pub enum AdminReply {
    Status(ClusterStatus),
    Done(String),
    Error(String),
}
