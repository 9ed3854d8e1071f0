//! The cluster side of flotilla. Policies are plain structs with synchronous methods that return
//! decisions (membership view, failure detection); the actors that do the I/O build on them.

pub mod failure_detector;
pub mod membership;

pub use failure_detector::{FailureDetector, PeerHealth, Transition};
pub use membership::{Member, MemberState, MembershipView};
