//! The scheduler actor: one per node, in process group `scheduler:{node}`; only the leader's is
//! active. The active scheduler computes the placement from the membership view, publishes each
//! node's role to its worker, waits until every worker of the placement has loaded its layers, and
//! then admits requests: each goes to the least-loaded replica (running requests over capacity),
//! up to `max_batch` per replica; beyond that requests wait in a bounded queue, and beyond the
//! queue they are refused (HTTP 429).
//!
//! Every assignment is answered (`Loaded`). One a worker refused, because its node does not see this
//! scheduler as the leader yet or because it follows a newer epoch (another scheduler led for a moment
//! while the views converged), is sent again, or the placement is issued again above that epoch, until
//! every worker of the placement holds it: the placement cannot stay unready on a lost or refused message.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use flotilla_config::Count;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};

use crate::membership::SharedIdentity;
use crate::placement::{moved_layers, plan, NodeInfo, Placement};
use crate::protocol::SCOPE;
use crate::view::{Member, MemberState};
use crate::wire::Wire;
use crate::work::{AdmitReply, AdmitReq, Assignment, LoadOutcome, Loaded, RebalanceStatus, Release, Role, SchedulerStatus};
use crate::worker::{member, WorkerMsg};

/// Process group of the scheduler on `node`.
pub fn group(node: &str) -> String {
    format!("scheduler:{node}")
}

/// What the local membership actor tells the scheduler whenever the view changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewUpdate {
    pub leader: Option<String>,
    pub members: Vec<Member>,
}

#[derive(RactorClusterMessage)]
pub enum SchedulerMsg {
    /// From the local membership actor.
    View(Wire<ViewUpdate>),
    /// From the local membership actor (`admin rebalance` reached the leader): plan again from scratch.
    Rebalance,
    /// From a worker.
    Loaded(Wire<Loaded>),
    /// From a session: a pipeline for a request (answered when one is free).
    #[rpc]
    Admit(Wire<AdmitReq>, RpcReplyPort<Wire<AdmitReply>>),
    /// From a session: its request is over.
    Release(Wire<Release>),
    #[rpc]
    Status(RpcReplyPort<Wire<SchedulerStatus>>),
    /// From itself, every `TICK`: sends assignments again (see `resend`).
    Tick,
}

/// How often the scheduler checks for assignments to send again.
const TICK: Duration = Duration::from_millis(200);
/// An assignment not yet acknowledged is sent again after this long,
const RESEND_AFTER: Duration = Duration::from_millis(500);
/// and an acknowledged one this often, which finds a worker that took another scheduler's placement since.
const CONFIRM_EVERY: Duration = Duration::from_secs(2);

pub struct SchedulerArgs {
    pub node: String,
    pub identity: SharedIdentity,
    pub n_layers: u32,
    pub replicas: Count,
    pub stages: Count,
    /// Requests that may wait for a free slot.
    pub queue_limit: usize,
    /// Requests running at once on one replica.
    pub max_batch: u32,
}

pub struct Scheduler;

pub struct SchedulerState {
    args: SchedulerArgs,
    active: bool,
    members: Vec<Member>,
    placement: Option<Placement>,
    loaded: BTreeSet<String>,
    failed: BTreeMap<String, String>,
    running: Vec<u32>,
    waiting: VecDeque<(AdmitReq, RpcReplyPort<Wire<AdmitReply>>)>,
    error: Option<String>,
    /// The latest placement change (`pending` is filled in when status is asked).
    rebalance: Option<RebalanceStatus>,
    /// The assignment of each node that holds layers in the placement, and when it was last sent.
    assigned: BTreeMap<String, (Assignment, Instant)>,
    /// Every node sent an assignment for the placement (holders of layers and nodes told to hold none).
    targets: BTreeSet<String>,
    /// The first epoch of the current layout: releases of requests admitted since then count.
    layout_since: u64,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl SchedulerState {
    fn ready(&self) -> bool {
        self.placement.as_ref().is_some_and(|p| p.nodes().iter().all(|n| self.loaded.contains(*n)))
    }

    fn status(&self) -> SchedulerStatus {
        SchedulerStatus {
            node: self.args.node.clone(),
            active: self.active,
            placement: self.placement.clone(),
            ready: self.ready(),
            loaded: self.loaded.iter().cloned().collect(),
            running: self.running.clone(),
            waiting: self.waiting.len() as u32,
            error: self.error.clone().or_else(|| (!self.failed.is_empty()).then(|| format!("{:?}", self.failed))),
            rebalance: self.rebalance.clone().map(|mut r| {
                if let Some(p) = &self.placement {
                    r.pending = p.nodes().into_iter().filter(|n| !self.loaded.contains(*n)).map(String::from).collect();
                }
                r
            }),
        }
    }

    fn replan(&mut self, force: bool) {
        let nodes: Vec<NodeInfo> = self
            .members
            .iter()
            .filter(|m| matches!(m.state, MemberState::Up | MemberState::Suspect))
            .map(|m| NodeInfo { name: m.name.clone(), capacity: m.capacity })
            .collect();
        let prev = self.placement.clone();
        match plan(&nodes, self.args.n_layers, self.args.replicas, self.args.stages, if force { None } else { prev.as_ref() }) {
            Ok(p) => {
                if !force && prev.as_ref().is_some_and(|q| q.same_layout(&p)) {
                    return;
                }
                let targets: BTreeSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
                self.issue(p, prev, targets, false);
            }
            Err(e) => {
                if self.placement.is_some() || self.error.is_none() {
                    tracing::warn!(error = %e, "no full placement");
                }
                self.placement = None;
                self.rebalance = None;
                self.assigned.clear();
                self.error = Some(e.to_string());
                self.answer_waiting(AdmitReply::Unavailable(e.to_string()));
            }
        }
    }

    /// The current placement again under a new epoch above `above` (a worker follows that epoch): the
    /// same layers on the same nodes and replicas, so no worker reloads anything and the running counts
    /// carry over.
    fn reissue(&mut self, above: u64) {
        let Some(p) = self.placement.clone() else { return };
        {
            let mut id = self.args.identity.lock().expect("identity lock");
            id.placement_epoch = id.placement_epoch.max(above);
        }
        tracing::info!(epoch = p.epoch, above, "a worker follows a newer epoch; issuing the placement again above it");
        let targets = self.targets.clone();
        self.issue(p.clone(), Some(p), targets, true);
    }

    /// Numbers `p` with a fresh epoch, makes it current, and sends every node in `targets`, in `p` or
    /// in `prev` its assignment (its role, or none). `renumber`: `p` is the current layout again.
    fn issue(&mut self, mut p: Placement, prev: Option<Placement>, mut targets: BTreeSet<String>, renumber: bool) {
        let epoch = {
            let mut id = self.args.identity.lock().expect("identity lock");
            id.placement_epoch = id.placement_epoch.max(prev.as_ref().map_or(0, |q| q.epoch)) + 1;
            id.placement_epoch
        };
        p.epoch = epoch;
        if renumber {
            if let Some(r) = self.rebalance.as_mut() {
                r.epoch = epoch;
            }
        } else {
            crate::metrics::m().rebalances.inc();
            let moved = moved_layers(prev.as_ref(), &p);
            tracing::info!(epoch, replicas = p.replicas.len(), moved_layers = moved, "new placement");
            self.rebalance = Some(RebalanceStatus {
                epoch,
                from_epoch: prev.as_ref().map(|q| q.epoch),
                moved_layers: moved,
                planned_at_ms: crate::membership::unix_ms(),
                ready_at_ms: None,
                pending: Vec::new(),
            });
            self.running = vec![0; p.replicas.len()];
            self.layout_since = epoch;
        }
        self.error = None;
        self.loaded.clear();
        self.failed.clear();
        self.assigned.clear();
        targets.extend(p.nodes().into_iter().map(String::from));
        if let Some(q) = &prev {
            targets.extend(q.nodes().into_iter().map(String::from));
        }
        for node in &targets {
            let role = p.find(node).map(|(r, s, a)| Role {
                replica: r as u32,
                stage: s as u32,
                n_stages: p.replicas[r].len() as u32,
                start: a.start,
                end: a.end,
                next: p.replicas[r].get(s + 1).map(|n| n.node.clone()),
            });
            let a = Assignment { epoch, role, leader: self.args.node.clone() };
            if !send_assignment(node, &a) {
                tracing::warn!(%node, "no worker found for a node in the placement");
            }
            if a.role.is_some() {
                self.assigned.insert(node.clone(), (a, Instant::now()));
            }
        }
        self.targets = targets;
        self.placement = Some(p);
    }

    /// Sends again every assignment of the placement not acknowledged for `RESEND_AFTER`, and every
    /// `CONFIRM_EVERY` one that was (a worker that took another scheduler's placement since answers
    /// `Stale`); not one whose layers failed to load.
    fn resend(&mut self) {
        let now = Instant::now();
        for (node, (a, sent)) in self.assigned.iter_mut() {
            let after = if self.loaded.contains(node) { CONFIRM_EVERY } else { RESEND_AFTER };
            if !self.failed.contains_key(node) && now.duration_since(*sent) >= after {
                let found = send_assignment(node, a);
                tracing::debug!(%node, epoch = a.epoch, found, "sending an assignment again");
                *sent = now;
            }
        }
    }

    /// A worker's answer to an assignment.
    fn on_loaded(&mut self, l: Loaded) {
        if self.placement.as_ref().is_none_or(|p| p.epoch != l.epoch) {
            return; // an answer for an epoch that has been replaced
        }
        match l.outcome {
            LoadOutcome::Loaded => {
                self.loaded.insert(l.node);
            }
            LoadOutcome::Failed(e) => {
                self.failed.insert(l.node, e);
            }
            // A node told to hold nothing may keep another placement's layers: nothing here waits on it.
            LoadOutcome::Stale { current } if self.assigned.contains_key(&l.node) => return self.reissue(current),
            LoadOutcome::Stale { .. } => return,
            LoadOutcome::NotLeader { leader } => {
                // Its node's view has not caught up (or has moved on): `resend` asks again.
                tracing::debug!(node = %l.node, ?leader, "a worker does not see this scheduler as the leader yet");
                return;
            }
        }
        if self.ready() {
            if let Some(r) = self.rebalance.as_mut().filter(|r| r.epoch == l.epoch && r.ready_at_ms.is_none()) {
                let now = crate::membership::unix_ms();
                r.ready_at_ms = Some(now);
                tracing::info!(epoch = l.epoch, took_ms = now.saturating_sub(r.planned_at_ms), "placement ready: every worker has its layers");
            }
        }
        self.drain_waiting();
    }

    /// Answers every waiting request with `reply` (and empties the queue).
    fn answer_waiting(&mut self, reply: AdmitReply) {
        for (_, port) in self.waiting.drain(..) {
            let _ = port.send(Wire::Ok(reply.clone()));
        }
    }

    /// The replica with the fewest running requests per unit of capacity that has room, among those that
    /// avoid every node in `avoid` when there are such replicas.
    fn pick(&self, avoid: &[String]) -> Option<usize> {
        let p = self.placement.as_ref()?;
        let cap: BTreeMap<&str, f64> = self.members.iter().map(|m| (m.name.as_str(), m.capacity)).collect();
        let clear = |r: usize| !p.replicas[r].iter().any(|s| avoid.contains(&s.node));
        let any_clear = (0..p.replicas.len()).any(clear);
        (0..p.replicas.len()).filter(|&r| !any_clear || clear(r)).filter(|&r| self.running[r] < self.args.max_batch).min_by(|&a, &b| {
            let load = |r: usize| {
                let c: f64 = p.replicas[r].iter().map(|s| cap.get(s.node.as_str()).copied().unwrap_or(1.0)).sum::<f64>() / p.replicas[r].len() as f64;
                (self.running[r] as f64 + 1.0) / c
            };
            load(a).total_cmp(&load(b)).then(a.cmp(&b))
        })
    }

    fn admit(&mut self, req: AdmitReq, port: RpcReplyPort<Wire<AdmitReply>>) {
        if !self.active {
            let _ = port.send(Wire::Ok(AdmitReply::NotLeader(format!("{} is not the leader", self.args.node))));
            return;
        }
        let Some(p) = &self.placement else {
            let why = self.error.clone().unwrap_or_else(|| "no placement yet".into());
            let _ = port.send(Wire::Ok(AdmitReply::Unavailable(why)));
            return;
        };
        if self.ready() && self.waiting.is_empty() {
            if let Some(r) = self.pick(&req.avoid) {
                self.running[r] += 1;
                let stages = p.replicas[r].iter().map(|a| a.node.clone()).collect();
                let _ = port.send(Wire::Ok(AdmitReply::Admitted { epoch: p.epoch, replica: r as u32, stages }));
                return;
            }
        }
        if self.waiting.len() >= self.args.queue_limit {
            let _ = port.send(Wire::Ok(AdmitReply::Busy { queued: self.waiting.len() as u32 }));
            return;
        }
        self.waiting.push_back((req, port));
    }

    fn drain_waiting(&mut self) {
        while self.ready() && !self.waiting.is_empty() {
            let Some(r) = self.pick(&self.waiting[0].0.avoid) else { return };
            let (_, port) = self.waiting.pop_front().expect("not empty");
            if port.is_closed() {
                continue;
            }
            let p = self.placement.as_ref().expect("ready");
            self.running[r] += 1;
            let stages = p.replicas[r].iter().map(|a| a.node.clone()).collect();
            let _ = port.send(Wire::Ok(AdmitReply::Admitted { epoch: p.epoch, replica: r as u32, stages }));
        }
    }
}

/// Sends `node`'s worker its assignment; false when the node has no worker in the mesh (now).
fn send_assignment(node: &str, a: &Assignment) -> bool {
    member::<WorkerMsg>(&crate::worker::group(node)).is_some_and(|w| w.cast(WorkerMsg::Assign(Wire::Ok(a.clone()))).is_ok())
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: SchedulerArgs) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join_scoped(SCOPE.to_string(), group(&args.node), vec![myself.get_cell()]);
        Ok(SchedulerState {
            args,
            active: false,
            members: Vec::new(),
            placement: None,
            loaded: BTreeSet::new(),
            failed: BTreeMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            error: None,
            rebalance: None,
            assigned: BTreeMap::new(),
            targets: BTreeSet::new(),
            layout_since: 0,
            ticker: None,
        })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        st.ticker = Some(myself.send_interval(TICK, || SchedulerMsg::Tick));
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        if let Some(t) = st.ticker.take() {
            t.abort();
        }
        crate::metrics::m().is_leader.set(0);
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, msg: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        self.dispatch(myself, msg, st).await?;
        let m = crate::metrics::m();
        m.is_leader.set(st.active as i64);
        m.requests_waiting.set(st.waiting.len() as i64);
        m.cluster_replicas.set(st.placement.as_ref().map_or(0, |p| p.replicas.len() as i64));
        m.cluster_requests_running.set(st.running.iter().map(|&r| r as i64).sum());
        Ok(())
    }
}

impl Scheduler {
    async fn dispatch(&self, _myself: ActorRef<SchedulerMsg>, msg: SchedulerMsg, st: &mut SchedulerState) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::View(Wire::Ok(v)) => {
                let active = v.leader.as_deref() == Some(st.args.node.as_str());
                st.members = v.members;
                if active != st.active {
                    tracing::info!(active, "scheduler role changed");
                }
                st.active = active;
                if active {
                    st.replan(false);
                    st.drain_waiting();
                } else {
                    st.placement = None;
                    st.rebalance = None;
                    st.assigned.clear();
                    st.error = Some("this scheduler is not the leader".into());
                    // The queue moves to the new leader: each waiting session asks it again.
                    st.answer_waiting(AdmitReply::NotLeader(format!("{} stopped leading", st.args.node)));
                }
            }
            SchedulerMsg::Rebalance => {
                if st.active {
                    st.replan(true);
                }
            }
            SchedulerMsg::Loaded(Wire::Ok(l)) => st.on_loaded(l),
            SchedulerMsg::Tick => {
                if st.active {
                    st.resend();
                }
            }
            SchedulerMsg::Admit(Wire::Ok(req), port) => st.admit(req, port),
            SchedulerMsg::Admit(Wire::Bad(e), port) => {
                let _ = port.send(Wire::Ok(AdmitReply::Unavailable(format!("undecodable admission request: {e}"))));
            }
            SchedulerMsg::Release(Wire::Ok(r)) => {
                if st.placement.as_ref().is_some_and(|p| (st.layout_since..=p.epoch).contains(&r.epoch)) {
                    if let Some(n) = st.running.get_mut(r.replica as usize) {
                        *n = n.saturating_sub(1);
                    }
                }
                st.drain_waiting();
            }
            SchedulerMsg::Status(port) => {
                let _ = port.send(Wire::Ok(st.status()));
            }
            SchedulerMsg::View(Wire::Bad(e)) | SchedulerMsg::Loaded(Wire::Bad(e)) | SchedulerMsg::Release(Wire::Bad(e)) => {
                tracing::warn!(error = %e, "scheduler ignores an undecodable message");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::membership::Identity;
    use crate::work::ReqId;

    fn member(name: &str, state: MemberState) -> Member {
        Member {
            name: name.into(),
            incarnation: 1,
            cluster_addr: "127.0.0.1:1".into(),
            http_addr: "127.0.0.1:2".into(),
            capacity: 1.0,
            state,
            load: Default::default(),
        }
    }

    fn view(leader: &str, members: &[(&str, MemberState)]) -> SchedulerMsg {
        let members = members.iter().map(|&(n, s)| member(n, s)).collect();
        SchedulerMsg::View(Wire::Ok(ViewUpdate { leader: Some(leader.into()), members }))
    }

    async fn ask(s: &ActorRef<SchedulerMsg>, id: u64) -> ractor::rpc::CallResult<Wire<AdmitReply>> {
        let req = AdmitReq { req: ReqId { origin: "sched-test-a".into(), id }, prompt_tokens: 4, max_tokens: 4, avoid: Vec::new() };
        s.call(|p| SchedulerMsg::Admit(Wire::Ok(req), p), Some(Duration::from_secs(5))).await.expect("the scheduler answers")
    }

    /// A request waiting in the leader's queue (the placement is not loaded yet) is told to ask again
    /// elsewhere when this scheduler stops leading, and a scheduler that does not lead says so: neither
    /// is a 503 for the client (the session asks the new leader).
    #[tokio::test]
    async fn a_scheduler_that_stops_leading_sends_its_queue_to_the_new_leader() {
        let identity = Arc::new(Mutex::new(Identity::new("sched-test-a".into(), "127.0.0.1:1".into(), "127.0.0.1:2".into(), 1.0)));
        let args = SchedulerArgs {
            node: "sched-test-a".into(),
            identity,
            n_layers: 4,
            replicas: Count::Auto,
            stages: Count::Auto,
            queue_limit: 8,
            max_batch: 2,
        };
        let (s, handle) = Actor::spawn(None, Scheduler, args).await.unwrap();
        let both = [("sched-test-a", MemberState::Up), ("sched-test-b", MemberState::Up)];
        s.cast(view("sched-test-a", &both)).unwrap();
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { ask(&s, 1).await }
        });
        // The request waits: no worker has loaded the placement.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "a request waits while the placement loads");
        // Late heartbeats from b do not change anything here; b becoming the leader does.
        s.cast(view("sched-test-a", &[("sched-test-a", MemberState::Up), ("sched-test-b", MemberState::Suspect)])).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        s.cast(view("sched-test-b", &both)).unwrap();
        match waiting.await.unwrap() {
            ractor::rpc::CallResult::Success(Wire::Ok(AdmitReply::NotLeader(why))) => assert!(why.contains("sched-test-a"), "{why}"),
            other => panic!("expected NotLeader, got {other:?}"),
        }
        match ask(&s, 2).await {
            ractor::rpc::CallResult::Success(Wire::Ok(AdmitReply::NotLeader(_))) => {}
            other => panic!("expected NotLeader, got {other:?}"),
        }
        s.stop(None);
        handle.await.unwrap();
    }

    async fn status(s: &ActorRef<SchedulerMsg>) -> SchedulerStatus {
        match s.call(SchedulerMsg::Status, Some(Duration::from_secs(5))).await.expect("the scheduler answers") {
            ractor::rpc::CallResult::Success(Wire::Ok(st)) => st,
            other => panic!("no status: {other:?}"),
        }
    }

    /// Waits until `pred` holds for the scheduler's status (10 s at most) and returns it.
    async fn status_until(s: &ActorRef<SchedulerMsg>, pred: impl Fn(&SchedulerStatus) -> bool) -> SchedulerStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = status(s).await;
            if pred(&st) || Instant::now() > deadline {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Two schedulers lead for a moment while the views converge, and number their placements
    /// independently. A worker whose node does not see this scheduler as the leader refuses its
    /// assignment, and one that follows the other scheduler's epoch, equal or newer, refuses it as stale;
    /// the scheduler sends it again and issues the same placement above the worker's epoch, so it becomes
    /// ready, also when the worker takes the other placement after this one was ready (running requests
    /// are kept). Before, the worker dropped an older epoch silently and every request waited in the queue.
    #[tokio::test]
    async fn refused_assignments_are_sent_again_and_another_leaders_epoch_is_overtaken() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        flotilla_engine::synthetic::write(&model, &flotilla_engine::synthetic::SyntheticSpec::default()).unwrap();
        let (a, b) = ("sched-test-resend-a", "sched-test-resend-b");
        let identity = Arc::new(Mutex::new(Identity::new(a.into(), "127.0.0.1:1".into(), "127.0.0.1:2".into(), 1.0)));
        identity.lock().unwrap().leader = Some(b.into());
        let wargs = crate::worker::WorkerArgs { node: a.into(), model_path: model, identity: identity.clone() };
        let (w, wh) = Actor::spawn(None, crate::worker::Worker, wargs).await.unwrap();
        // The other scheduler (b, which this node sees as the leader) assigns epoch 1: the number a's
        // first placement will get too.
        let role = Role { replica: 0, stage: 0, n_stages: 1, start: 0, end: 4, next: None };
        let from_b = |epoch| WorkerMsg::Assign(Wire::Ok(Assignment { epoch, role: Some(role.clone()), leader: b.into() }));
        w.cast(from_b(1)).unwrap();

        let args = SchedulerArgs {
            node: a.into(),
            identity: identity.clone(),
            n_layers: 4,
            replicas: Count::Auto,
            stages: Count::Auto,
            queue_limit: 8,
            max_batch: 2,
        };
        let (s, sh) = Actor::spawn(None, Scheduler, args).await.unwrap();
        s.cast(view(a, &[(a, MemberState::Up)])).unwrap();
        // a's assignment is refused while this node still follows b (and sent again meanwhile).
        tokio::time::sleep(Duration::from_millis(800)).await;
        let st = status(&s).await;
        assert!(st.active && !st.ready, "not ready while the worker follows another leader: {st:?}");
        // The node's view moves to a: the next resend meets a worker at b's epoch 1, which refuses a's
        // epoch 1 as stale, and the scheduler issues the same placement above it.
        identity.lock().unwrap().leader = Some(a.into());
        let st = status_until(&s, |st| st.ready).await;
        assert!(st.ready, "the placement became ready: {st:?}");
        let epoch = st.placement.as_ref().unwrap().epoch;
        assert!(epoch > 1, "issued above the worker's epoch 1: {epoch}");
        let r = st.rebalance.clone().unwrap();
        assert_eq!((r.epoch, r.from_epoch, r.moved_layers), (epoch, None, 4), "one rebalance, renumbered: {st:?}");
        let ask = AdmitReq { req: ReqId { origin: a.into(), id: 1 }, prompt_tokens: 4, max_tokens: 4, avoid: Vec::new() };
        match s.call(|p| SchedulerMsg::Admit(Wire::Ok(ask), p), Some(Duration::from_secs(5))).await.unwrap() {
            ractor::rpc::CallResult::Success(Wire::Ok(AdmitReply::Admitted { epoch: e, stages, .. })) => {
                assert_eq!((e, stages), (epoch, vec![a.to_string()]));
            }
            other => panic!("expected an admission, got {other:?}"),
        }

        // After ready, b leads this node for a moment and assigns a newer epoch; a finds out when it
        // confirms its assignments, and issues above that, keeping the running request.
        identity.lock().unwrap().leader = Some(b.into());
        w.cast(from_b(epoch + 5)).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        identity.lock().unwrap().leader = Some(a.into());
        let st = status_until(&s, |st| st.ready && st.placement.as_ref().unwrap().epoch > epoch + 5).await;
        assert!(st.ready && st.placement.as_ref().unwrap().epoch > epoch + 5, "issued above b's epoch {}: {st:?}", epoch + 5);
        assert_eq!(st.running, vec![1], "the running request still counts: {st:?}");
        s.cast(SchedulerMsg::Release(Wire::Ok(Release { req: ReqId { origin: a.into(), id: 1 }, epoch, replica: 0 }))).unwrap();
        let st = status_until(&s, |st| st.running == [0]).await;
        assert_eq!(st.running, vec![0], "its release, under the epoch it was admitted in, counts: {st:?}");
        s.stop(None);
        w.stop(None);
        sh.await.unwrap();
        wh.await.unwrap();
    }
}
