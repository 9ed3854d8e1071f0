//! The membership actor: one per node, in process group `membership`. It keeps the live view of the
//! cluster, heartbeats every peer's membership actor, dials seeds and lost peers, and routes admin
//! commands to the node they name.
//!
//! Who decides what:
//! - A node is the only source of its own record (incarnation, addresses, capacity, and the states
//!   it can claim: joining, up, draining, left). It sends the record with every heartbeat.
//! - Each node judges liveness itself: `suspect` and `down` come from its own failure detector
//!   (heartbeat answers) and from ractor_cluster's session events (a closed socket is `down` at once).
//! - A peer declared down stays down until it shows a newer incarnation. Heartbeats carry the
//!   sender's view of the receiver, so a node that learns it was declared down rejoins with a new
//!   incarnation by itself.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeEventSubscription, NodeServerMessage, RactorClusterMessage};
use serde::{Deserialize, Serialize};

use crate::admin::AdminMsg;
use crate::failure_detector::{FailureDetector, PeerHealth};
use crate::protocol::{AdminReply, AdminRequest, Announce, Beat, ClusterStatus, MembershipEvent, NodeLoad, ADMIN_GROUP, MEMBERSHIP_GROUP, SCOPE};
use crate::scheduler::{SchedulerMsg, ViewUpdate};
use crate::supervisor::SupervisorMsg;
use crate::view::{Change, MemberState, MembershipView};
use crate::wire::{self, Wire};

/// How many membership events `status` keeps.
const EVENT_LOG: usize = 64;
/// Longest wait between two dials of the same unreachable address.
const MAX_DIAL_BACKOFF: Duration = Duration::from_secs(5);
const MIN_DIAL_BACKOFF: Duration = Duration::from_millis(100);
/// A dial that has not led to an authenticated session by then may be retried.
const DIAL_PENDING: Duration = Duration::from_secs(2);
/// Time allowed for a command forwarded to another node.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// This node's own record; owned by the supervisor so that it survives restarts of the membership actor.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub incarnation: u64,
    pub cluster_addr: String,
    pub http_addr: String,
    pub capacity: f64,
    /// What this node claims: joining, up, draining or left.
    pub state: MemberState,
    pub placement_epoch: u64,
    /// The leader as this node sees it.
    pub leader: Option<String>,
    pub started: Instant,
}

impl Identity {
    /// A fresh identity; the incarnation is the start time, so a restarted node always has a higher one.
    pub fn new(name: String, cluster_addr: String, http_addr: String, capacity: f64) -> Self {
        Self {
            name,
            incarnation: unix_ms(),
            cluster_addr,
            http_addr,
            capacity,
            state: MemberState::Joining,
            placement_epoch: 0,
            leader: None,
            started: Instant::now(),
        }
    }
}

pub type SharedIdentity = Arc<Mutex<Identity>>;

/// A ractor_cluster session event, as the membership actor receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionEvent {
    pub kind: SessionEventKind,
    pub node_id: u64,
    /// Member name of the peer (its ractor node name up to the `@`), once authenticated.
    pub peer: Option<String>,
    /// `host:port` the peer is dialled at, once authenticated.
    pub connection_string: Option<String>,
    pub peer_addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionEventKind {
    Opened,
    Authenticated,
    Ready,
    Disconnected,
}

/// The outcome of a heartbeat this node sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BeatOutcome {
    pub node_id: u64,
    pub result: Result<Beat, String>,
    /// Round trip of the call, in seconds.
    pub rtt_s: f64,
}

/// The outcome of a dial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DialOutcome {
    pub addr: String,
    pub error: Option<String>,
}

/// Messages of the membership actor. The first three come from peers; the rest are local.
#[derive(RactorClusterMessage)]
pub enum MembershipMsg {
    /// A peer's heartbeat; the answer is this node's own.
    #[rpc]
    Heartbeat(Wire<Beat>, RpcReplyPort<Wire<Beat>>),
    /// A peer leaves on purpose.
    #[rpc]
    Leaving(Wire<Announce>, RpcReplyPort<bool>),
    /// An admin command addressed to this node, forwarded by the node that received it.
    #[rpc]
    Command(Wire<AdminRequest>, RpcReplyPort<Wire<AdminReply>>),
    /// From the local admin actor: run or route an admin command.
    #[rpc]
    Admin(Wire<AdminRequest>, RpcReplyPort<Wire<AdminReply>>),
    /// From the supervisor: announce `left` to every peer, then answer.
    #[rpc]
    LeaveCluster(RpcReplyPort<bool>),
    /// Heartbeat period.
    Tick,
    Session(Wire<SessionEvent>),
    BeatDone(Wire<BeatOutcome>),
    DialDone(Wire<DialOutcome>),
}

/// Start-up arguments.
pub struct MembershipArgs {
    pub identity: SharedIdentity,
    pub node_server: ActorRef<NodeServerMessage>,
    pub supervisor: ActorRef<SupervisorMsg>,
    pub seeds: Vec<String>,
    pub heartbeat_interval: Duration,
    pub heartbeat_misses: u32,
    pub fault_injection: bool,
}

pub struct Membership;

/// A peer node whose membership actor this node heartbeats.
struct Peer {
    name: String,
    actor: ActorRef<MembershipMsg>,
    last: Option<Announce>,
    beat_in_flight: bool,
}

/// An authenticated ractor_cluster session.
struct Session {
    peer: String,
    connection_string: String,
}

#[derive(Default)]
struct Dial {
    next_at: Option<Instant>,
    backoff: Duration,
    pending_until: Option<Instant>,
}

pub struct MembershipState {
    args: MembershipArgs,
    view: MembershipView,
    fd: FailureDetector,
    /// By session (`ActorId::Remote::node_id`).
    peers: HashMap<u64, Peer>,
    sessions: HashMap<u64, Session>,
    /// Sessions opened but not (yet) authenticated.
    unauthenticated: HashMap<u64, String>,
    dials: HashMap<String, Dial>,
    events: VecDeque<MembershipEvent>,
    clock: Instant,
    last_tick: Instant,
    rejected_sessions: u64,
    answered_once: bool,
    /// Members marked down only because their connection closed. Unlike a peer that stopped answering
    /// heartbeats, such a peer may come back under the same incarnation (the pause or the broken link
    /// may have been on this side).
    revivable: BTreeSet<(String, u64)>,
    /// What the local scheduler was last told.
    published: Option<Published>,
    /// Fault injection (`admin cut-link`): peers whose link this node keeps closed until the instant.
    cut_links: HashMap<String, Instant>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

struct Events(ActorRef<MembershipMsg>);

impl Events {
    fn send(&self, kind: SessionEventKind, s: &NodeServerSessionInformation) {
        let (peer, connection_string) = match &s.peer_name {
            Some(n) => (Some(member_name(&n.name).to_string()), Some(n.connection_string.clone())),
            None => (None, None),
        };
        let ev = SessionEvent { kind, node_id: s.node_id, peer, connection_string, peer_addr: s.peer_addr.clone() };
        let _ = self.0.cast(MembershipMsg::Session(Wire::Ok(ev)));
    }
}

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, s: NodeServerSessionInformation) {
        self.send(SessionEventKind::Opened, &s);
    }
    fn node_session_authenticated(&self, s: NodeServerSessionInformation) {
        self.send(SessionEventKind::Authenticated, &s);
    }
    fn node_session_ready(&self, s: NodeServerSessionInformation) {
        self.send(SessionEventKind::Ready, &s);
    }
    fn node_session_disconnected(&self, s: NodeServerSessionInformation) {
        self.send(SessionEventKind::Disconnected, &s);
    }
}

/// A ractor node name is `name@host`; members are known by `name`.
pub fn member_name(node_name: &str) -> &str {
    node_name.split('@').next().unwrap_or(node_name)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

impl MembershipState {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn identity(&self) -> Identity {
        self.args.identity.lock().expect("identity lock").clone()
    }

    fn announce(&self) -> Announce {
        let id = self.identity();
        Announce {
            name: id.name,
            incarnation: id.incarnation,
            cluster_addr: id.cluster_addr,
            http_addr: id.http_addr,
            capacity: id.capacity,
            state: id.state,
            placement_epoch: id.placement_epoch,
            load: NodeLoad {
                uptime_s: id.started.elapsed().as_secs_f64(),
                rss_bytes: rss_bytes(),
                peers: self.peers.values().filter(|p| p.last.is_some()).count() as u32,
                bad_messages: wire::bad_messages(),
                rejected_sessions: self.rejected_sessions,
            },
        }
    }

    fn record(&mut self, node: &str, incarnation: u64, from: Option<MemberState>, to: MemberState, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::info!(node, incarnation, ?from, ?to, %reason, "membership change");
        if self.events.len() == EVENT_LOG {
            self.events.pop_front();
        }
        self.events.push_back(MembershipEvent { at_ms: unix_ms(), node: node.to_string(), incarnation, from, to, reason });
    }

    /// Refreshes this node's own entry in the view.
    fn refresh_self(&mut self) {
        let a = self.announce();
        let prev = self.view.get(&a.name).map(|m| (m.incarnation, m.state));
        let state = a.state;
        self.view.upsert(a.member(state));
        if prev != Some((a.incarnation, state)) {
            let why = if prev.is_some_and(|p| p.0 != a.incarnation) { "this node, under a new incarnation" } else { "this node" };
            self.record(&a.name, a.incarnation, prev.map(|p| p.1), state, why);
        }
    }

    fn set_state(&mut self, name: &str, to: MemberState, reason: &str) {
        let Some(m) = self.view.get(name) else { return };
        let (inc, from) = (m.incarnation, m.state);
        if self.view.set_state(name, inc, to) {
            self.record(name, inc, Some(from), to, reason);
        }
    }

    /// Applies what a peer says about itself (and about us).
    fn on_announce(&mut self, a: Announce, your_state: Option<(u64, MemberState)>) {
        let me = self.identity();
        if a.name == me.name {
            return;
        }
        if let Some((inc, MemberState::Down)) = your_state {
            if inc == me.incarnation {
                let new = unix_ms().max(me.incarnation + 1);
                self.args.identity.lock().expect("identity lock").incarnation = new;
                tracing::warn!(peer = %a.name, old = inc, new, "a peer had declared this node down; rejoining under a new incarnation");
                self.refresh_self();
            }
        }
        {
            let mut id = self.args.identity.lock().expect("identity lock");
            id.placement_epoch = id.placement_epoch.max(a.placement_epoch);
        }
        let cur = self.view.get(&a.name).map(|m| (m.incarnation, m.state));
        if let Some((inc, state)) = cur {
            let revive = state == MemberState::Down && self.revivable.contains(&(a.name.clone(), inc));
            if inc > a.incarnation || (inc == a.incarnation && matches!(state, MemberState::Down | MemberState::Left) && !revive) {
                return; // stale, or dead until it shows a new incarnation
            }
        }
        self.revivable.remove(&(a.name.clone(), a.incarnation));
        if let Some((_, MemberState::Down)) = cur {
            // Let the view accept a state change at the same incarnation.
            self.view.set_state(&a.name, a.incarnation, MemberState::Joining);
        }
        let state = match (a.state, self.fd.health(&a.name)) {
            (MemberState::Left, _) => MemberState::Left,
            (_, Some(PeerHealth::Suspect)) => MemberState::Suspect,
            (s, _) => s,
        };
        let (name, inc) = (a.name.clone(), a.incarnation);
        match self.view.upsert(a.member(state)) {
            Change::Joined => self.record(&name, inc, None, state, "joined"),
            Change::Rejoined => self.record(&name, inc, cur.map(|c| c.1), state, "rejoined under a new incarnation"),
            Change::Updated if cur.map(|c| c.1) != Some(state) => {
                let why = if cur.map(|c| c.1) == Some(MemberState::Down) { "reconnected" } else { "announced" };
                self.record(&name, inc, cur.map(|c| c.1), state, why)
            }
            _ => {}
        }
    }

    /// What this node tells `name` about itself: `down` only when `name` stopped answering heartbeats.
    fn my_view_of(&self, name: &str) -> Option<(u64, MemberState)> {
        self.view
            .get(name)
            .map(|m| (m.incarnation, m.state))
            .filter(|(inc, s)| !(*s == MemberState::Down && self.revivable.contains(&(name.to_string(), *inc))))
    }

    fn status(&mut self) -> ClusterStatus {
        self.refresh_self();
        let id = self.identity();
        ClusterStatus {
            node: id.name,
            protocol_version: wire::PROTOCOL_VERSION,
            leader: self.view.leader().map(|m| m.name.clone()),
            placement_epoch: id.placement_epoch,
            members: self.view.members().cloned().collect(),
            events: self.events.iter().cloned().collect(),
            scheduler: None,
            workers: Vec::new(),
        }
    }

    /// Tells the local scheduler about a new leader or a change of members (and updates the membership gauges).
    fn publish_view(&mut self) {
        let m = crate::metrics::m();
        for s in [MemberState::Joining, MemberState::Up, MemberState::Suspect, MemberState::Down, MemberState::Draining, MemberState::Left] {
            m.cluster_nodes.with_label_values(&[state_name(s)]).set(self.view.count(s) as i64);
        }
        m.placement_epoch.set(self.identity().placement_epoch as i64);
        let leader = self.view.leader().map(|m| m.name.clone());
        let key = (leader.clone(), self.view.members().map(|m| (m.name.clone(), m.incarnation, m.state, m.capacity.to_bits())).collect::<Vec<_>>());
        if self.published.as_ref() == Some(&key) {
            return;
        }
        let me = {
            let mut id = self.args.identity.lock().expect("identity lock");
            id.leader = leader.clone();
            id.name.clone()
        };
        let update = ViewUpdate { leader, members: self.view.members().cloned().collect() };
        match crate::worker::member::<SchedulerMsg>(&crate::scheduler::group(&me)) {
            Some(s) if s.get_id().is_local() => {
                let _ = s.cast(SchedulerMsg::View(Wire::Ok(update)));
                self.published = Some(key);
            }
            _ => {} // not started yet (or restarting): try again on the next tick
        }
    }

    fn peer_by_name(&self, name: &str) -> Option<ActorRef<MembershipMsg>> {
        self.peers.values().find(|p| p.name == name).map(|p| p.actor.clone())
    }

    /// A peer's session is gone: its socket closed (`revivable`), or it was evicted after missed heartbeats.
    fn lose_peer(&mut self, node_id: u64, reason: &str, revivable: bool) {
        if let Some(p) = self.peers.remove(&node_id) {
            self.fd.forget(&p.name);
            if revivable && self.sessions.values().any(|s| s.peer == p.name) {
                // A duplicate session lost ractor_cluster's election; the peer is still connected through the other one.
                tracing::debug!(peer = %p.name, "switching to the peer's surviving session");
                return;
            }
            if let Some(m) = self.view.get(&p.name) {
                if m.state.is_present() {
                    let inc = m.incarnation;
                    self.set_state(&p.name, MemberState::Down, reason);
                    if revivable {
                        self.revivable.insert((p.name.clone(), inc));
                    } else {
                        self.revivable.remove(&(p.name.clone(), inc));
                    }
                }
            }
        }
    }

    /// Picks up membership actors of newly connected peers (and replacements after a restart) from the process group.
    fn sync_peers(&mut self) {
        let now = self.now_ms();
        let mut seen = BTreeSet::new();
        for cell in ractor::pg::get_scoped_members(&SCOPE.to_string(), &MEMBERSHIP_GROUP.to_string()) {
            let ractor::ActorId::Remote { node_id, .. } = cell.get_id() else { continue };
            let Some(session) = self.sessions.get(&node_id) else { continue };
            seen.insert(node_id);
            let actor: ActorRef<MembershipMsg> = cell.into();
            match self.peers.get_mut(&node_id) {
                Some(p) => {
                    if p.actor.get_id() != actor.get_id() {
                        tracing::info!(peer = %p.name, "peer's membership actor was restarted");
                        p.actor = actor;
                        p.beat_in_flight = false;
                    }
                }
                None => {
                    let name = session.peer.clone();
                    // One session per peer: a stale entry for the same name (old session) is dropped.
                    let stale: Vec<u64> = self.peers.iter().filter(|(_, p)| p.name == name).map(|(id, _)| *id).collect();
                    for id in stale {
                        self.peers.remove(&id);
                    }
                    self.fd.forget(&name);
                    self.fd.track(&name, now);
                    crate::metrics::m().heartbeat_misses.with_label_values(&[name.as_str()]);
                    self.peers.insert(node_id, Peer { name, actor, last: None, beat_in_flight: false });
                }
            }
        }
        let gone: Vec<u64> = self.peers.keys().filter(|id| !seen.contains(id)).copied().collect();
        for id in gone {
            self.lose_peer(id, "membership actor left the process group", true);
        }
    }

    fn send_heartbeats(&mut self, myself: &ActorRef<MembershipMsg>) {
        let timeout = self.args.heartbeat_interval * 2;
        let from = self.announce();
        let views: HashMap<u64, Option<(u64, MemberState)>> = self.peers.iter().map(|(id, p)| (*id, self.my_view_of(&p.name))).collect();
        for (&node_id, p) in self.peers.iter_mut() {
            if p.beat_in_flight {
                continue;
            }
            p.beat_in_flight = true;
            let beat = Beat { from: from.clone(), your_state: views[&node_id] };
            let actor = p.actor.clone();
            let me = myself.clone();
            tokio::spawn(async move {
                let sent = Instant::now();
                let result = actor
                    .call(|port| MembershipMsg::Heartbeat(Wire::Ok(beat), port), Some(timeout))
                    .await
                    .map_err(|e| format!("heartbeat not sent: {e}"))
                    .and_then(|r| match r {
                        ractor::rpc::CallResult::Success(w) => w.into_result(),
                        ractor::rpc::CallResult::Timeout => Err("heartbeat timed out".into()),
                        ractor::rpc::CallResult::SenderError => Err("session closed before the answer".into()),
                    });
                let _ = me.cast(MembershipMsg::BeatDone(Wire::Ok(BeatOutcome { node_id, result, rtt_s: sent.elapsed().as_secs_f64() })));
            });
        }
    }

    fn apply_detector(&mut self, now: u64) {
        for t in self.fd.tick(now) {
            let node_id = self.peers.iter().find(|(_, p)| p.name == t.peer).map(|(id, _)| *id);
            match t.to {
                PeerHealth::Suspect => {
                    if self.view.get(&t.peer).is_some_and(|m| matches!(m.state, MemberState::Up | MemberState::Draining | MemberState::Joining)) {
                        self.set_state(&t.peer, MemberState::Suspect, &format!("{} heartbeats missed", t.missed));
                    }
                }
                PeerHealth::Alive => self.restore(&t.peer),
                PeerHealth::Dead => {
                    let reason = format!("{} heartbeats missed", t.missed);
                    if let Some(id) = node_id {
                        self.lose_peer(id, &reason, false);
                        self.evict_session(id, &reason);
                    } else {
                        self.fd.forget(&t.peer);
                        self.set_state(&t.peer, MemberState::Down, &reason);
                    }
                }
            }
        }
    }

    /// A suspect peer answered again: back to what it claims.
    fn restore(&mut self, name: &str) {
        let claimed = self.peers.values().find(|p| p.name == name).and_then(|p| p.last.as_ref()).map(|a| a.state);
        if let (Some(claimed), Some(m)) = (claimed, self.view.get(name)) {
            if m.state == MemberState::Suspect {
                self.set_state(name, claimed, "heartbeats answered again");
            }
        }
    }

    /// Whether the link to `peer` is cut by fault injection now (forgets cuts that have ended).
    fn link_cut(&mut self, peer: &str) -> bool {
        let now = Instant::now();
        self.cut_links.retain(|_, until| *until > now);
        self.cut_links.contains_key(peer)
    }

    /// Closes every session to `peer` (fault injection).
    fn cut_sessions(&self, peer: &str) {
        for (&node_id, s) in &self.sessions {
            if s.peer == peer {
                self.evict_session(node_id, &format!("link to {peer} cut by fault injection"));
            }
        }
    }

    /// Stops the session to a peer that stopped answering, so that it reconnects (and rejoins) when it comes back.
    fn evict_session(&self, node_id: u64, reason: &str) {
        let node = self.args.node_server.clone();
        let reason = reason.to_string();
        tokio::spawn(async move {
            let sessions = node.call(NodeServerMessage::GetSessions, Some(Duration::from_millis(500))).await;
            if let Ok(ractor::rpc::CallResult::Success(sessions)) = sessions {
                if let Some(s) = sessions.get(&node_id) {
                    tracing::warn!(node_id, %reason, "closing the session of an unresponsive peer");
                    s.actor.stop(Some(reason));
                }
            }
        });
    }

    fn dial(&mut self, myself: &ActorRef<MembershipMsg>) {
        let me = self.identity();
        let mut targets: BTreeSet<String> = self.args.seeds.iter().cloned().collect();
        targets.extend(self.view.members().filter(|m| m.state != MemberState::Left).map(|m| m.cluster_addr.clone()));
        targets.remove(&me.cluster_addr);
        let now = Instant::now();
        self.cut_links.retain(|_, until| *until > now);
        for m in self.cut_links.keys().filter_map(|peer| self.view.get(peer)) {
            targets.remove(&m.cluster_addr);
        }
        let connected: BTreeSet<&str> = self.sessions.values().map(|s| s.connection_string.as_str()).collect();
        for addr in targets {
            let d = self.dials.entry(addr.clone()).or_insert_with(|| Dial { backoff: MIN_DIAL_BACKOFF, ..Default::default() });
            if connected.contains(addr.as_str()) {
                d.backoff = MIN_DIAL_BACKOFF;
                d.pending_until = None;
                continue;
            }
            if d.pending_until.is_some_and(|t| now < t) || d.next_at.is_some_and(|t| now < t) {
                continue;
            }
            d.pending_until = Some(now + DIAL_PENDING);
            d.next_at = Some(now + d.backoff);
            d.backoff = (d.backoff * 2).min(MAX_DIAL_BACKOFF);
            let node = self.args.node_server.clone();
            let me = myself.clone();
            tokio::spawn(async move {
                let error = ractor_cluster::client_connect(&node, addr.as_str()).await.err().map(|e| e.to_string());
                let _ = me.cast(MembershipMsg::DialDone(Wire::Ok(DialOutcome { addr, error })));
            });
        }
    }

    /// Runs an admin command addressed to this node.
    fn apply_local(&mut self, cmd: AdminRequest) -> AdminReply {
        let name = self.identity().name;
        let mut id = self.args.identity.lock().expect("identity lock");
        let reply = match cmd {
            AdminRequest::Status => {
                return {
                    drop(id);
                    AdminReply::Status(self.status())
                }
            }
            AdminRequest::Drain(_) => match id.state {
                MemberState::Up | MemberState::Joining => {
                    id.state = MemberState::Draining;
                    AdminReply::Done(format!("{name} is draining"))
                }
                MemberState::Draining => AdminReply::Done(format!("{name} was already draining")),
                s => AdminReply::Error(format!("{name} is {s:?} and cannot drain")),
            },
            AdminRequest::Undrain(_) => match id.state {
                MemberState::Draining => {
                    id.state = MemberState::Up;
                    AdminReply::Done(format!("{name} is up again"))
                }
                s => AdminReply::Error(format!("{name} is not draining (it is {})", state_name(s))),
            },
            AdminRequest::Rebalance => match crate::worker::member::<SchedulerMsg>(&crate::scheduler::group(&name)) {
                Some(s) if s.cast(SchedulerMsg::Rebalance).is_ok() => AdminReply::Done(format!("{name} (leader) is planning a new placement")),
                _ => AdminReply::Error(format!("the scheduler of {name} is not running")),
            },
            AdminRequest::Shutdown(_) => {
                let _ = self.args.supervisor.cast(SupervisorMsg::Leave("admin shutdown".into()));
                AdminReply::Done(format!("{name} is leaving the cluster"))
            }
            AdminRequest::InjectPanic { child, .. } => {
                if !self.args.fault_injection {
                    AdminReply::Error(format!("fault injection is disabled on {name} (node.fault_injection = false)"))
                } else {
                    match child.as_str() {
                        "membership" => {
                            drop(id);
                            panic!("fault injection: membership actor told to panic");
                        }
                        "admin" => match ractor::pg::get_scoped_local_members(&SCOPE.to_string(), &ADMIN_GROUP.to_string()).first() {
                            Some(cell) => {
                                let admin: ActorRef<AdminMsg> = cell.clone().into();
                                let _ = admin.cast(AdminMsg::Crash);
                                AdminReply::Done(format!("admin actor of {name} told to panic"))
                            }
                            None => AdminReply::Error(format!("{name} has no admin actor running")),
                        },
                        other => AdminReply::Error(format!("unknown child {other:?}: expected membership or admin")),
                    }
                }
            }
            AdminRequest::CutLink { peer, ms, .. } => {
                if !self.args.fault_injection {
                    AdminReply::Error(format!("fault injection is disabled on {name} (node.fault_injection = false)"))
                } else if peer == name {
                    AdminReply::Error(format!("{name} has no link to itself"))
                } else if self.view.get(&peer).is_none() {
                    AdminReply::Error(format!("no node named {peer} in the cluster"))
                } else {
                    tracing::warn!(%peer, ms, "fault injection: cutting the link");
                    self.cut_links.insert(peer.clone(), Instant::now() + Duration::from_millis(ms));
                    self.cut_sessions(&peer);
                    AdminReply::Done(format!("link {name} <-> {peer} cut for {ms} ms"))
                }
            }
        };
        drop(id);
        self.refresh_self();
        reply
    }
}

/// The lowercase name of a state, as in JSON.
pub fn state_name(s: MemberState) -> &'static str {
    match s {
        MemberState::Joining => "joining",
        MemberState::Up => "up",
        MemberState::Suspect => "suspect",
        MemberState::Down => "down",
        MemberState::Draining => "draining",
        MemberState::Left => "left",
    }
}

/// What the local scheduler is told: the leader and (name, incarnation, state, capacity) of each member.
type Published = (Option<String>, Vec<(String, u64, MemberState, u64)>);

fn reply<T>(port: RpcReplyPort<T>, v: T) {
    if port.send(v).is_err() {
        tracing::debug!("the caller stopped waiting for an answer");
    }
}

/// Sends `cmd` to another node's membership actor and answers `port` with its reply (off the actor's loop).
fn forward(target: ActorRef<MembershipMsg>, node: String, cmd: AdminRequest, port: RpcReplyPort<Wire<AdminReply>>) {
    tokio::spawn(async move {
        let r = match target.call(|p| MembershipMsg::Command(Wire::Ok(cmd), p), Some(FORWARD_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(Wire::Ok(r))) => r,
            Ok(ractor::rpc::CallResult::Success(Wire::Bad(e))) => AdminReply::Error(format!("{node} sent an undecodable answer: {e}")),
            Ok(ractor::rpc::CallResult::Timeout) => AdminReply::Error(format!("{node} did not answer within {FORWARD_TIMEOUT:?}")),
            Ok(ractor::rpc::CallResult::SenderError) | Err(_) => AdminReply::Error(format!("lost the connection to {node}")),
        };
        reply(port, Wire::Ok(r));
    });
}

impl Actor for Membership {
    type Msg = MembershipMsg;
    type State = MembershipState;
    type Arguments = MembershipArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: MembershipArgs) -> Result<Self::State, ActorProcessingErr> {
        args.node_server
            .cast(NodeServerMessage::SubscribeToEvents { id: "membership".into(), subscription: Box::new(Events(myself.clone())) })
            .map_err(|e| format!("cannot subscribe to cluster events: {e}"))?;
        let fd = FailureDetector::new(args.heartbeat_interval, args.heartbeat_misses);
        let mut st = MembershipState {
            args,
            view: MembershipView::new(),
            fd,
            peers: HashMap::new(),
            sessions: HashMap::new(),
            unauthenticated: HashMap::new(),
            dials: HashMap::new(),
            events: VecDeque::new(),
            clock: Instant::now(),
            last_tick: Instant::now(),
            rejected_sessions: 0,
            answered_once: false,
            revivable: BTreeSet::new(),
            published: None,
            cut_links: HashMap::new(),
            ticker: None,
        };
        // Sessions that exist already (after a restart of this actor).
        if let Ok(ractor::rpc::CallResult::Success(sessions)) =
            st.args.node_server.call(NodeServerMessage::GetSessions, Some(Duration::from_secs(1))).await
        {
            for (id, s) in sessions {
                if let Some(n) = &s.peer_name {
                    st.sessions.insert(id, Session { peer: member_name(&n.name).to_string(), connection_string: n.connection_string.clone() });
                }
            }
        }
        st.refresh_self();
        ractor::pg::join_scoped(SCOPE.to_string(), MEMBERSHIP_GROUP.to_string(), vec![myself.get_cell()]);
        Ok(st)
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        st.ticker = Some(myself.send_interval(st.args.heartbeat_interval, || MembershipMsg::Tick));
        st.dial(&myself);
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        if let Some(t) = st.ticker.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, msg: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            MembershipMsg::Tick => {
                let now = Instant::now();
                let gap = now.duration_since(st.last_tick);
                st.last_tick = now;
                if gap > st.fd.detection_time() {
                    // This process was not scheduled (SIGSTOP, a VM pause): the silence was ours, not the peers'.
                    tracing::warn!(?gap, "this node was paused; restarting heartbeat timing");
                    let t = st.now_ms();
                    let names: Vec<String> = st.peers.values().map(|p| p.name.clone()).collect();
                    for n in names {
                        st.fd.ack(&n, t);
                    }
                }
                st.sync_peers();
                st.send_heartbeats(&myself);
                let t = st.now_ms();
                st.apply_detector(t);
                let joining = st.identity().state == MemberState::Joining;
                if joining {
                    let me = st.identity().cluster_addr;
                    let alone = st.args.seeds.iter().all(|s| *s == me);
                    let grace = st.identity().started.elapsed() > st.fd.detection_time() * 3;
                    if st.answered_once || alone || grace {
                        st.args.identity.lock().expect("identity lock").state = MemberState::Up;
                    }
                }
                st.refresh_self();
                st.dial(&myself);
            }
            MembershipMsg::Heartbeat(beat, port) => match beat {
                Wire::Ok(beat) => {
                    let name = beat.from.name.clone();
                    if st.peers.values().any(|p| p.name == name) {
                        let t = st.now_ms();
                        if let Some(tr) = st.fd.ack(&name, t) {
                            if tr.to == PeerHealth::Alive {
                                st.restore(&name);
                            }
                        }
                    }
                    st.on_announce(beat.from, beat.your_state);
                    let answer = Beat { from: st.announce(), your_state: st.my_view_of(&name) };
                    reply(port, Wire::Ok(answer));
                }
                Wire::Bad(e) => reply(port, Wire::Bad(format!("undecodable heartbeat: {e}"))),
            },
            MembershipMsg::BeatDone(Wire::Ok(BeatOutcome { node_id, result, rtt_s })) => {
                let Some(p) = st.peers.get_mut(&node_id) else { return Ok(()) };
                p.beat_in_flight = false;
                let m = crate::metrics::m();
                match &result {
                    Ok(_) => m.heartbeat_rtt.with_label_values(&[p.name.as_str()]).observe(rtt_s),
                    Err(_) => m.heartbeat_misses.with_label_values(&[p.name.as_str()]).inc(),
                }
                match result {
                    Ok(beat) => {
                        p.last = Some(beat.from.clone());
                        let name = p.name.clone();
                        st.answered_once = true;
                        let t = st.now_ms();
                        let revived = st.fd.ack(&name, t).is_some_and(|tr| tr.to == PeerHealth::Alive);
                        st.on_announce(beat.from, beat.your_state);
                        if revived {
                            st.restore(&name);
                        }
                    }
                    Err(e) => tracing::debug!(peer = %p.name, error = %e, "heartbeat failed"),
                }
            }
            MembershipMsg::Leaving(a, port) => {
                if let Wire::Ok(a) = a {
                    let name = a.name.clone();
                    let id = st.peers.iter().find(|(_, p)| p.name == name).map(|(id, _)| *id);
                    if let Some(id) = id {
                        st.peers.remove(&id);
                    }
                    st.fd.forget(&name);
                    let mut left = a;
                    left.state = MemberState::Left;
                    let cur = st.view.get(&name).map(|m| m.state);
                    st.view.upsert(left.member(MemberState::Left));
                    if st.view.get(&name).map(|m| m.state) == Some(MemberState::Left) && cur != Some(MemberState::Left) {
                        st.record(&name, left.incarnation, cur, MemberState::Left, "left the cluster");
                    }
                }
                reply(port, true);
            }
            MembershipMsg::Command(cmd, port) => {
                let r = match cmd {
                    Wire::Ok(cmd) => st.apply_local(cmd),
                    Wire::Bad(e) => AdminReply::Error(format!("undecodable command: {e}")),
                };
                reply(port, Wire::Ok(r));
            }
            MembershipMsg::Admin(cmd, port) => {
                let cmd = match cmd {
                    Wire::Ok(c) => c,
                    Wire::Bad(e) => {
                        reply(port, Wire::Ok(AdminReply::Error(format!("undecodable command: {e}"))));
                        return Ok(());
                    }
                };
                let me = st.identity().name;
                let target = match &cmd {
                    AdminRequest::Status => None,
                    AdminRequest::Rebalance => st.view.leader().map(|m| m.name.clone()),
                    AdminRequest::Drain(n) | AdminRequest::Undrain(n) | AdminRequest::Shutdown(n) => Some(n.clone()),
                    AdminRequest::InjectPanic { node, .. } | AdminRequest::CutLink { node, .. } => Some(node.clone()),
                };
                match target {
                    Some(t) if t != me => match st.peer_by_name(&t) {
                        Some(actor) => forward(actor, t, cmd, port),
                        None => {
                            let known = st.view.get(&t).map(|m| state_name(m.state));
                            let msg = match known {
                                Some(s) => format!("node {t} is {s} and not connected to {me}"),
                                None => format!("no node named {t} in the cluster"),
                            };
                            reply(port, Wire::Ok(AdminReply::Error(msg)));
                        }
                    },
                    _ => {
                        let r = st.apply_local(cmd);
                        reply(port, Wire::Ok(r));
                    }
                }
            }
            MembershipMsg::LeaveCluster(port) => {
                st.args.identity.lock().expect("identity lock").state = MemberState::Left;
                st.refresh_self();
                let a = st.announce();
                // All peers at once: a peer that is itself leaving must not hold up the others.
                let mut calls = tokio::task::JoinSet::new();
                for p in st.peers.values() {
                    let actor = p.actor.clone();
                    let a = a.clone();
                    calls.spawn(async move { actor.call(|port| MembershipMsg::Leaving(Wire::Ok(a), port), Some(Duration::from_secs(1))).await });
                }
                let n = calls.len();
                let mut told = 0;
                while let Some(r) = calls.join_next().await {
                    if matches!(r, Ok(Ok(ractor::rpc::CallResult::Success(true)))) {
                        told += 1;
                    }
                }
                tracing::info!(told, peers = n, "announced leaving to the peers");
                reply(port, true);
            }
            MembershipMsg::Session(Wire::Ok(ev)) => match ev.kind {
                SessionEventKind::Opened => {
                    st.unauthenticated.insert(ev.node_id, ev.peer_addr);
                }
                SessionEventKind::Authenticated | SessionEventKind::Ready => {
                    st.unauthenticated.remove(&ev.node_id);
                    if let (Some(peer), Some(cs)) = (ev.peer, ev.connection_string) {
                        if let Some(d) = st.dials.get_mut(&cs) {
                            d.backoff = MIN_DIAL_BACKOFF;
                            d.pending_until = None;
                        }
                        if st.link_cut(&peer) {
                            // Fault injection: the peer (or a transitive connect) dialled through a cut link.
                            st.evict_session(ev.node_id, &format!("link to {peer} cut by fault injection"));
                        }
                        st.sessions.insert(ev.node_id, Session { peer, connection_string: cs });
                    }
                    if ev.kind == SessionEventKind::Ready {
                        st.sync_peers();
                        st.send_heartbeats(&myself);
                    }
                }
                SessionEventKind::Disconnected => {
                    if let Some(addr) = st.unauthenticated.remove(&ev.node_id) {
                        st.rejected_sessions += 1;
                        crate::metrics::m().rejected_sessions.inc();
                        tracing::warn!(peer_addr = %addr, "a cluster connection closed before authenticating (wrong cookie, or not a flotilla node)");
                    }
                    st.sessions.remove(&ev.node_id);
                    st.lose_peer(ev.node_id, "connection lost", true);
                }
            },
            MembershipMsg::DialDone(Wire::Ok(d)) => {
                if let Some(e) = d.error {
                    tracing::debug!(addr = %d.addr, error = %e, "dial failed");
                    if let Some(x) = st.dials.get_mut(&d.addr) {
                        x.pending_until = None;
                    }
                }
            }
            MembershipMsg::Session(Wire::Bad(e)) | MembershipMsg::BeatDone(Wire::Bad(e)) | MembershipMsg::DialDone(Wire::Bad(e)) => {
                tracing::warn!(error = %e, "ignoring an undecodable local message");
            }
        }
        st.publish_view();
        Ok(())
    }
}
