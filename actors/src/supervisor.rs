//! The node supervisor: the root actor of every node. It starts ractor_cluster's `NodeServer`, the
//! membership actor and the admin actor as linked children, restarts a child that fails, and on
//! `Leave` (SIGINT/SIGTERM or `admin shutdown`) drains, tells the peers it is leaving and stops.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_config::NodeConfig;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{NodeServer, NodeServerMessage, RactorMessage};

use crate::admin::Admin;
use crate::membership::{Membership, MembershipArgs, MembershipMsg, SharedIdentity};
use crate::scheduler::{Scheduler, SchedulerArgs};
use crate::sessions::{Registry, Sessions, SessionsArgs};
use crate::view::MemberState;
use crate::worker::{Worker, WorkerArgs};

/// Largest inbound frame accepted from a peer (activations of long prompts travel in one frame).
pub const MAX_FRAME_BYTES: u64 = 64 << 20;
/// More restarts of one child than this within [`RESTART_WINDOW`] stop the node.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

#[derive(RactorMessage)]
pub enum SupervisorMsg {
    /// Drain, leave the cluster and stop (the reason is logged).
    Leave(String),
}

/// Start-up arguments. `exit_code` is set when the supervisor stops: 0 after a clean leave.
pub struct SupervisorArgs {
    pub config: NodeConfig,
    pub exit_code: Arc<AtomicI32>,
    /// This node's record, shared with the HTTP side (which reads the leader from it).
    pub identity: SharedIdentity,
    /// Open requests of this node, shared with the HTTP side.
    pub registry: Registry,
    /// Layers of the served model.
    pub n_layers: u32,
}

pub struct NodeSupervisor;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Child {
    NodeServer,
    Membership,
    Admin,
    Worker,
    Scheduler,
    Sessions,
}

pub struct SupervisorState {
    config: NodeConfig,
    identity: SharedIdentity,
    node_server: ActorRef<NodeServerMessage>,
    membership: ActorRef<MembershipMsg>,
    admin: ActorCell,
    others: Vec<(Child, ActorCell)>,
    registry: Registry,
    n_layers: u32,
    restarts: VecDeque<(Child, Instant)>,
    leaving: bool,
    exit_code: Arc<AtomicI32>,
}

impl SupervisorState {
    fn which(&self, cell: &ActorCell) -> Option<Child> {
        let id = cell.get_id();
        if id == self.node_server.get_id() {
            Some(Child::NodeServer)
        } else if id == self.membership.get_id() {
            Some(Child::Membership)
        } else if id == self.admin.get_id() {
            Some(Child::Admin)
        } else {
            self.others.iter().find(|(_, c)| c.get_id() == id).map(|(k, _)| *k)
        }
    }

    fn membership_args(&self, supervisor: ActorRef<SupervisorMsg>) -> MembershipArgs {
        membership_args(&self.config, &self.identity, &self.node_server, supervisor)
    }

    async fn restart(&mut self, myself: &ActorRef<SupervisorMsg>, child: Child, why: &str) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        self.restarts.retain(|(_, t)| now.duration_since(*t) < RESTART_WINDOW);
        let recent = self.restarts.iter().filter(|(c, _)| *c == child).count();
        if recent >= MAX_RESTARTS {
            return Err(format!("{child:?} failed {} times within {RESTART_WINDOW:?}; giving up: {why}", recent + 1).into());
        }
        self.restarts.push_back((child, now));
        tracing::warn!(?child, reason = why, "restarting a failed child");
        match child {
            Child::NodeServer => return Err(format!("the cluster server stopped: {why}").into()),
            Child::Membership => {
                let (m, _) = Actor::spawn_linked(None, Membership, self.membership_args(myself.clone()), myself.get_cell()).await?;
                self.membership = m;
            }
            Child::Admin => {
                let (a, _) = Actor::spawn_linked(None, Admin, (), myself.get_cell()).await?;
                self.admin = a.get_cell();
            }
            other => {
                let cell = spawn_serving(other, &self.config, &self.identity, &self.registry, self.n_layers, myself.get_cell()).await?;
                self.others.retain(|(k, _)| *k != other);
                self.others.push((other, cell));
            }
        }
        Ok(())
    }
}

/// Starts one of the children that serve requests.
async fn spawn_serving(
    which: Child,
    c: &NodeConfig,
    identity: &SharedIdentity,
    registry: &Registry,
    n_layers: u32,
    sup: ActorCell,
) -> Result<ActorCell, ActorProcessingErr> {
    Ok(match which {
        Child::Worker => {
            Actor::spawn_linked(None, Worker, WorkerArgs { node: c.name.clone(), model_path: c.model_path.clone(), identity: identity.clone() }, sup)
                .await?
                .0
                .get_cell()
        }
        Child::Scheduler => {
            let args = SchedulerArgs {
                node: c.name.clone(),
                identity: identity.clone(),
                n_layers,
                replicas: c.replicas,
                stages: c.stages,
                queue_limit: c.queue_limit,
                max_batch: c.max_batch,
            };
            Actor::spawn_linked(None, Scheduler, args, sup).await?.0.get_cell()
        }
        Child::Sessions => {
            Actor::spawn_linked(None, Sessions, SessionsArgs { node: c.name.clone(), registry: registry.clone() }, sup).await?.0.get_cell()
        }
        other => unreachable!("{other:?} is not a serving child"),
    })
}

fn membership_args(
    c: &NodeConfig,
    identity: &SharedIdentity,
    node_server: &ActorRef<NodeServerMessage>,
    supervisor: ActorRef<SupervisorMsg>,
) -> MembershipArgs {
    MembershipArgs {
        identity: identity.clone(),
        node_server: node_server.clone(),
        supervisor,
        seeds: c.seed_addrs(),
        heartbeat_interval: c.heartbeat_interval,
        heartbeat_misses: c.heartbeat_misses,
        fault_injection: c.fault_injection,
    }
}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: SupervisorArgs) -> Result<Self::State, ActorProcessingErr> {
        let c = args.config;
        let identity = args.identity;
        {
            let id = identity.lock().expect("identity lock");
            tracing::info!(name = %c.name, incarnation = id.incarnation, cluster = %id.cluster_addr, "starting node");
        }
        let server = NodeServer::new(
            c.cluster_listen.port(),
            c.cookie.clone(),
            c.name.clone(),
            c.advertise_host.clone(),
            None,
            Some(NodeConnectionMode::Transitive),
        )
        .with_listen_addr(c.cluster_listen.ip())
        .with_max_inbound_frame_size(MAX_FRAME_BYTES);
        let (node_server, _) = Actor::spawn_linked(None, server, (), myself.get_cell())
            .await
            .map_err(|e| format!("cannot listen on cluster.listen {}: {e}", c.cluster_listen))?;
        let mut others = Vec::new();
        for which in [Child::Sessions, Child::Worker, Child::Scheduler] {
            others.push((which, spawn_serving(which, &c, &identity, &args.registry, args.n_layers, myself.get_cell()).await?));
        }
        let (membership, _) =
            Actor::spawn_linked(None, Membership, membership_args(&c, &identity, &node_server, myself.clone()), myself.get_cell()).await?;
        let (admin, _) = Actor::spawn_linked(None, Admin, (), myself.get_cell()).await?;
        Ok(SupervisorState {
            config: c,
            identity,
            node_server,
            membership,
            admin: admin.get_cell(),
            others,
            registry: args.registry,
            n_layers: args.n_layers,
            restarts: VecDeque::new(),
            leaving: false,
            exit_code: args.exit_code,
        })
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, msg: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Leave(reason) => {
                if st.leaving {
                    return Ok(());
                }
                st.leaving = true;
                tracing::info!(%reason, timeout = ?st.config.leave_timeout, "draining and leaving the cluster");
                {
                    let mut id = st.identity.lock().expect("identity lock");
                    if id.state != MemberState::Left {
                        id.state = MemberState::Draining;
                    }
                }
                // Draining: the scheduler moves this node's layers elsewhere (sequences running on them resume on the
                // new placement); the requests this node's clients sent run to completion, within the time allowed.
                let deadline = Instant::now() + st.config.leave_timeout.saturating_sub(Duration::from_millis(1500));
                while !st.registry.is_empty() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if !st.registry.is_empty() {
                    tracing::warn!(open = st.registry.len(), "leaving with requests still open: their clients lose their connections");
                }
                let told = st.membership.call(MembershipMsg::LeaveCluster, Some(st.config.leave_timeout)).await;
                if !matches!(told, Ok(ractor::rpc::CallResult::Success(true))) {
                    tracing::warn!("could not tell every peer that this node leaves; they will see it fail instead");
                }
                st.exit_code.store(0, Ordering::SeqCst);
                st.node_server.stop(Some("leaving".into()));
                myself.stop(Some("left the cluster".into()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(child) = st.which(&cell) {
                    tracing::error!(?child, error = %err, "child failed");
                    if !st.leaving {
                        st.restart(&myself, child, &err.to_string()).await?;
                    }
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(child) = st.which(&cell) {
                    if !st.leaving {
                        let why = reason.unwrap_or_else(|| "stopped".into());
                        st.restart(&myself, child, &why).await?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}
