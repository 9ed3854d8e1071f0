//! The cluster side of flotilla: the actors every node runs (supervisor, membership, admin), the
//! messages that cross nodes, and the pure policies they run (membership view, failure detection).

pub mod admin;
pub mod client;
pub mod failure_detector;
pub mod membership;
pub mod metrics;
pub mod placement;
pub mod protocol;
pub mod scheduler;
pub mod sessions;
pub mod supervisor;
pub mod view;
pub mod wire;
pub mod work;
pub mod worker;

pub use failure_detector::{FailureDetector, PeerHealth, Transition};
pub use protocol::{AdminReply, AdminRequest, ClusterStatus};
pub use view::{Member, MemberState, MembershipView};
