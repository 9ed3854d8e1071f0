//! The scheduler actor: one per node, in process group `scheduler:{node}`; only the leader's is
//! active. The active scheduler computes the placement from the membership view, publishes each
//! node's role to its worker, waits until every worker of the placement has loaded its layers, and
//! then admits requests: each goes to the least-loaded replica (running requests over capacity),
//! up to `max_batch` per replica; beyond that requests wait in a bounded queue, and beyond the
//! queue they are refused (HTTP 429).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use flotilla_config::Count;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};

use crate::membership::SharedIdentity;
use crate::placement::{moved_layers, plan, NodeInfo, Placement};
use crate::protocol::SCOPE;
use crate::view::{Member, MemberState};
use crate::wire::Wire;
use crate::work::{AdmitReply, AdmitReq, Assignment, Loaded, RebalanceStatus, Release, Role, SchedulerStatus};
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
}

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
            Ok(mut p) => {
                if !force && prev.as_ref().is_some_and(|q| q.same_layout(&p)) {
                    return;
                }
                let epoch = {
                    let mut id = self.args.identity.lock().expect("identity lock");
                    id.placement_epoch = id.placement_epoch.max(prev.as_ref().map_or(0, |q| q.epoch)) + 1;
                    id.placement_epoch
                };
                p.epoch = epoch;
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
                self.error = None;
                self.loaded.clear();
                self.failed.clear();
                self.running = vec![0; p.replicas.len()];
                let mut targets: BTreeSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
                if let Some(q) = &prev {
                    targets.extend(q.nodes().into_iter().map(String::from));
                }
                for node in targets {
                    let role = p.find(&node).map(|(r, s, a)| Role {
                        replica: r as u32,
                        stage: s as u32,
                        n_stages: p.replicas[r].len() as u32,
                        start: a.start,
                        end: a.end,
                        next: p.replicas[r].get(s + 1).map(|n| n.node.clone()),
                    });
                    let a = Assignment { epoch, role, leader: self.args.node.clone() };
                    match member::<WorkerMsg>(&crate::worker::group(&node)) {
                        Some(w) => {
                            let _ = w.cast(WorkerMsg::Assign(Wire::Ok(a)));
                        }
                        None => tracing::warn!(%node, "no worker found for a node in the placement"),
                    }
                }
                self.placement = Some(p);
            }
            Err(e) => {
                if self.placement.is_some() || self.error.is_none() {
                    tracing::warn!(error = %e, "no full placement");
                }
                self.placement = None;
                self.rebalance = None;
                self.error = Some(e.to_string());
                self.answer_waiting(AdmitReply::Unavailable(e.to_string()));
            }
        }
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
        })
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, _st: &mut Self::State) -> Result<(), ActorProcessingErr> {
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
            SchedulerMsg::Loaded(Wire::Ok(l)) => {
                if st.placement.as_ref().is_some_and(|p| p.epoch == l.epoch) {
                    match l.error {
                        None => {
                            st.loaded.insert(l.node);
                        }
                        Some(e) => {
                            st.failed.insert(l.node, e);
                        }
                    }
                    if st.ready() {
                        if let Some(r) = st.rebalance.as_mut().filter(|r| r.epoch == l.epoch && r.ready_at_ms.is_none()) {
                            let now = crate::membership::unix_ms();
                            r.ready_at_ms = Some(now);
                            tracing::info!(
                                epoch = l.epoch,
                                took_ms = now.saturating_sub(r.planned_at_ms),
                                "placement ready: every worker has its layers"
                            );
                        }
                    }
                    st.drain_waiting();
                }
            }
            SchedulerMsg::Admit(Wire::Ok(req), port) => st.admit(req, port),
            SchedulerMsg::Admit(Wire::Bad(e), port) => {
                let _ = port.send(Wire::Ok(AdmitReply::Unavailable(format!("undecodable admission request: {e}"))));
            }
            SchedulerMsg::Release(Wire::Ok(r)) => {
                if st.placement.as_ref().is_some_and(|p| p.epoch == r.epoch) {
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
}
