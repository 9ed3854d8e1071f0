//! The admin actor: one per node, in process group `admin`. It is the door `flotilla admin` knocks
//! on; it hands each request to the local membership actor, which answers it or routes it to the
//! node it names.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;

use crate::membership::MembershipMsg;
use crate::protocol::{AdminReply, AdminRequest, ClusterStatus, ADMIN_GROUP, MEMBERSHIP_GROUP, SCOPE};
use crate::scheduler::SchedulerMsg;
use crate::wire::Wire;
use crate::worker::{member, WorkerMsg};

/// How long a request may take end to end on the node that received it.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(RactorClusterMessage)]
pub enum AdminMsg {
    /// An operator request.
    #[rpc]
    Call(Wire<AdminRequest>, RpcReplyPort<Wire<AdminReply>>),
    /// Fault injection: panic (the supervisor restarts this actor).
    Crash,
}

pub struct Admin;

/// Adds the leader scheduler's status and every reachable worker's statistics (each asked at once, 1 s at most).
async fn add_serving(s: &mut ClusterStatus) {
    let t = Some(Duration::from_secs(1));
    if let Some(sched) = s.leader.as_deref().and_then(|l| member::<SchedulerMsg>(&crate::scheduler::group(l))) {
        if let Ok(ractor::rpc::CallResult::Success(Wire::Ok(st))) = sched.call(SchedulerMsg::Status, t).await {
            s.scheduler = Some(st);
        }
    }
    let mut calls = tokio::task::JoinSet::new();
    for m in s.members.iter().filter(|m| m.state.is_present()) {
        if let Some(w) = member::<WorkerMsg>(&crate::worker::group(&m.name)) {
            calls.spawn(async move { w.call(WorkerMsg::Stats, t).await });
        }
    }
    while let Some(r) = calls.join_next().await {
        if let Ok(Ok(ractor::rpc::CallResult::Success(Wire::Ok(w)))) = r {
            s.workers.push(w);
        }
    }
    s.workers.sort_by(|a, b| a.node.cmp(&b.node));
}

/// The local membership actor, looked up on each request so that a restarted one is found.
fn local_membership() -> Option<ActorRef<MembershipMsg>> {
    ractor::pg::get_scoped_local_members(&SCOPE.to_string(), &MEMBERSHIP_GROUP.to_string()).into_iter().next().map(Into::into)
}

impl Actor for Admin {
    type Msg = AdminMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        ractor::pg::join_scoped(SCOPE.to_string(), ADMIN_GROUP.to_string(), vec![myself.get_cell()]);
        Ok(())
    }

    async fn handle(&self, _myself: ActorRef<Self::Msg>, msg: Self::Msg, _: &mut ()) -> Result<(), ActorProcessingErr> {
        match msg {
            AdminMsg::Call(Wire::Ok(req), port) => {
                tracing::info!(?req, "admin request");
                let Some(membership) = local_membership() else {
                    let _ = port.send(Wire::Ok(AdminReply::Error("the membership actor is restarting; try again".into())));
                    return Ok(());
                };
                // Off the actor's loop: a request routed to a slow node must not hold up the next one.
                tokio::spawn(async move {
                    let r = match membership.call(|p| MembershipMsg::Admin(Wire::Ok(req), p), Some(ADMIN_TIMEOUT)).await {
                        Ok(ractor::rpc::CallResult::Success(Wire::Ok(AdminReply::Status(mut s)))) => {
                            add_serving(&mut s).await;
                            Wire::Ok(AdminReply::Status(s))
                        }
                        Ok(ractor::rpc::CallResult::Success(w)) => w,
                        Ok(ractor::rpc::CallResult::Timeout) => Wire::Ok(AdminReply::Error("the membership actor did not answer in time".into())),
                        _ => Wire::Ok(AdminReply::Error("the membership actor is restarting; try again".into())),
                    };
                    let _ = port.send(r);
                });
            }
            AdminMsg::Call(Wire::Bad(e), port) => {
                let _ = port.send(Wire::Ok(AdminReply::Error(format!("undecodable admin request: {e}"))));
            }
            AdminMsg::Crash => panic!("fault injection: admin actor told to panic"),
        }
        Ok(())
    }
}
