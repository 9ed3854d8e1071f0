//! The admin client: joins the mesh as a short-lived node (never a member: it runs no membership
//! actor), finds the admin actor of the node it dialled through the `admin` process group, and calls it.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::admin::AdminMsg;
use crate::protocol::{AdminReply, AdminRequest, ADMIN_GROUP, SCOPE};
use crate::wire::Wire;

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("authentication failed: {addr} closed the connection during the handshake (wrong cookie?)")]
    AuthFailed { addr: String },
    #[error("timed out after {after:?} {waiting}")]
    Timeout { after: Duration, waiting: String },
    #[error("{0}")]
    Protocol(String),
}

#[derive(Debug)]
enum Ev {
    Authenticated,
    Ready(u64),
    Disconnected,
}

struct Forward(UnboundedSender<Ev>);

impl NodeEventSubscription for Forward {
    fn node_session_opened(&self, _: NodeServerSessionInformation) {}
    fn node_session_authenticated(&self, _: NodeServerSessionInformation) {
        let _ = self.0.send(Ev::Authenticated);
    }
    fn node_session_ready(&self, s: NodeServerSessionInformation) {
        let _ = self.0.send(Ev::Ready(s.node_id));
    }
    fn node_session_disconnected(&self, _: NodeServerSessionInformation) {
        let _ = self.0.send(Ev::Disconnected);
    }
}

/// Sends `req` to the node whose cluster port is `addr` and returns its answer, all within `timeout`.
pub async fn admin_call(addr: &str, cookie: &str, req: AdminRequest, timeout: Duration) -> Result<AdminReply, ClientError> {
    let name = format!("flotilla-admin-{}", std::process::id());
    let server = NodeServer::new(0, cookie.to_string(), name, "127.0.0.1".into(), None, Some(NodeConnectionMode::Isolated))
        .with_listen_addr(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let (node, handle) =
        Actor::spawn(None, server, ()).await.map_err(|e| ClientError::Protocol(format!("cannot start the admin client's cluster server: {e}")))?;
    let result = call(&node, addr, req, timeout).await;
    node.stop(None);
    let _ = tokio::time::timeout(Duration::from_secs(1), handle).await;
    result
}

async fn call(node: &ActorRef<NodeServerMessage>, addr: &str, req: AdminRequest, timeout: Duration) -> Result<AdminReply, ClientError> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let (tx, mut rx) = unbounded_channel();
    node.cast(NodeServerMessage::SubscribeToEvents { id: "admin-client".into(), subscription: Box::new(Forward(tx)) })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    match tokio::time::timeout(left(), ractor_cluster::client_connect(node, addr)).await {
        Err(_) => return Err(ClientError::Timeout { after: timeout, waiting: format!("connecting to {addr}") }),
        Ok(Err(e)) => return Err(ClientError::Unreachable { addr: addr.to_string(), reason: e.to_string() }),
        Ok(Ok(())) => {}
    }
    let mut authenticated = false;
    let node_id = loop {
        match tokio::time::timeout(left(), rx.recv()).await {
            Err(_) => return Err(ClientError::Timeout { after: timeout, waiting: format!("for the handshake with {addr}") }),
            Ok(None) => return Err(ClientError::Protocol("the admin client's cluster server stopped".into())),
            Ok(Some(Ev::Authenticated)) => authenticated = true,
            Ok(Some(Ev::Ready(id))) => break id,
            Ok(Some(Ev::Disconnected)) if !authenticated => return Err(ClientError::AuthFailed { addr: addr.to_string() }),
            Ok(Some(Ev::Disconnected)) => return Err(ClientError::Unreachable { addr: addr.to_string(), reason: "connection lost".into() }),
        }
    };
    // The peer's process groups are synchronised by the time the session is ready; allow a moment anyway.
    let admin = loop {
        let found = ractor::pg::get_scoped_members(&SCOPE.to_string(), &ADMIN_GROUP.to_string())
            .into_iter()
            .find(|c| matches!(c.get_id(), ractor::ActorId::Remote { node_id: n, .. } if n == node_id));
        if let Some(c) = found {
            break ActorRef::<AdminMsg>::from(c);
        }
        if left().is_zero() {
            return Err(ClientError::Timeout { after: timeout, waiting: format!("for {addr}'s admin actor (is it a flotilla node?)") });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    match admin.call(|p| AdminMsg::Call(Wire::Ok(req), p), Some(left().max(Duration::from_millis(1)))).await {
        Ok(ractor::rpc::CallResult::Success(Wire::Ok(r))) => Ok(r),
        Ok(ractor::rpc::CallResult::Success(Wire::Bad(e))) => Err(ClientError::Protocol(format!("undecodable answer: {e}"))),
        Ok(ractor::rpc::CallResult::Timeout) => Err(ClientError::Timeout { after: timeout, waiting: format!("for {addr} to answer") }),
        Ok(ractor::rpc::CallResult::SenderError) | Err(_) => {
            Err(ClientError::Unreachable { addr: addr.to_string(), reason: "connection lost before the answer".into() })
        }
    }
}
