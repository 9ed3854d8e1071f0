//! The cluster membership view: who is in the cluster, under which incarnation, in which state, and
//! who leads. A pure data structure; the membership actor feeds it what peers announce and what the
//! failure detector concludes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Life cycle of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Connected, not yet confirmed by a heartbeat.
    Joining,
    Up,
    /// Heartbeats are late.
    Suspect,
    /// Failed: heartbeats stopped or the connection died.
    Down,
    /// Moving its work elsewhere before leaving.
    Draining,
    /// Left on purpose.
    Left,
}

impl MemberState {
    /// Whether the member can lead the cluster: up, or up with late heartbeats. Suspicion alone does not
    /// move the leadership (a busy leader whose beats are late keeps its queue and placement); only
    /// down, draining or left does.
    pub fn can_lead(self) -> bool {
        matches!(self, MemberState::Up | MemberState::Suspect)
    }

    /// Whether the member is still part of the cluster (possibly unhealthy).
    pub fn is_present(self) -> bool {
        !matches!(self, MemberState::Down | MemberState::Left)
    }
}

/// One node as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// Grows each time the node (re)starts or rejoins after being declared down.
    pub incarnation: u64,
    pub cluster_addr: String,
    pub http_addr: String,
    pub capacity: f64,
    pub state: MemberState,
    /// What the node last reported about itself.
    #[serde(default)]
    pub load: crate::protocol::NodeLoad,
}

/// What applying an announcement changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A name not seen before.
    Joined,
    /// A known name under a newer incarnation.
    Rejoined,
    /// Same incarnation: details or state updated.
    Updated,
    /// Nothing new (or an older incarnation, ignored).
    Unchanged,
}

/// The membership view, ordered by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MembershipView {
    members: BTreeMap<String, Member>,
}

impl MembershipView {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies an announcement about a member: newer incarnations replace older ones; older ones are ignored.
    pub fn upsert(&mut self, m: Member) -> Change {
        match self.members.get_mut(&m.name) {
            None => {
                self.members.insert(m.name.clone(), m);
                Change::Joined
            }
            Some(cur) if m.incarnation > cur.incarnation => {
                *cur = m;
                Change::Rejoined
            }
            Some(cur) if m.incarnation == cur.incarnation && *cur != m => {
                *cur = m;
                Change::Updated
            }
            Some(_) => Change::Unchanged,
        }
    }

    /// Sets the state of `name` if it is still at `incarnation`; returns whether anything changed.
    pub fn set_state(&mut self, name: &str, incarnation: u64, state: MemberState) -> bool {
        match self.members.get_mut(name) {
            Some(m) if m.incarnation == incarnation && m.state != state => {
                m.state = state;
                true
            }
            _ => false,
        }
    }

    /// One member.
    pub fn get(&self, name: &str) -> Option<&Member> {
        self.members.get(name)
    }

    /// All members in name order.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// Number of members in `state`.
    pub fn count(&self, state: MemberState) -> usize {
        self.members.values().filter(|m| m.state == state).count()
    }

    /// The leader: the first member, by name, that is up or suspect. Every node with the same view picks
    /// the same one.
    pub fn leader(&self) -> Option<&Member> {
        self.members.values().find(|m| m.state.can_lead())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemberState::*;

    fn m(name: &str, inc: u64, state: MemberState) -> Member {
        Member {
            name: name.into(),
            incarnation: inc,
            cluster_addr: format!("127.0.0.1:74{inc:02}"),
            http_addr: "127.0.0.1:8080".into(),
            capacity: 1.0,
            state,
            load: Default::default(),
        }
    }

    #[test]
    fn announcements_table() {
        // (announcement, expected change, resulting incarnation, resulting state)
        let cases = [
            (m("a", 1, Joining), Change::Joined, 1, Joining),
            (m("a", 1, Up), Change::Updated, 1, Up),
            (m("a", 1, Up), Change::Unchanged, 1, Up),
            (m("a", 0, Up), Change::Unchanged, 1, Up),
            (m("a", 2, Joining), Change::Rejoined, 2, Joining),
            (m("a", 1, Down), Change::Unchanged, 2, Joining),
        ];
        let mut v = MembershipView::new();
        for (i, (ann, change, inc, state)) in cases.into_iter().enumerate() {
            assert_eq!(v.upsert(ann), change, "case {i}");
            let a = v.get("a").unwrap();
            assert_eq!((a.incarnation, a.state), (inc, state), "case {i}");
        }
    }

    #[test]
    fn state_changes_only_apply_to_the_current_incarnation() {
        let mut v = MembershipView::new();
        v.upsert(m("a", 3, Up));
        assert!(!v.set_state("a", 2, Down), "stale incarnation");
        assert!(v.set_state("a", 3, Down));
        assert!(!v.set_state("a", 3, Down), "no change");
        assert!(!v.set_state("zz", 1, Down), "unknown member");
        assert_eq!(v.count(Down), 1);
    }

    #[test]
    fn leader_is_the_first_up_or_suspect_member_by_name() {
        let mut v = MembershipView::new();
        assert!(v.leader().is_none());
        v.upsert(m("node2", 1, Up));
        v.upsert(m("node3", 1, Up));
        v.upsert(m("node1", 1, Joining));
        assert_eq!(v.leader().unwrap().name, "node2");
        v.set_state("node1", 1, Up);
        assert_eq!(v.leader().unwrap().name, "node1");
        v.set_state("node1", 1, Suspect);
        assert_eq!(v.leader().unwrap().name, "node1", "late heartbeats do not move the leadership");
        v.set_state("node1", 1, Down);
        assert_eq!(v.leader().unwrap().name, "node2");
        v.set_state("node2", 1, Draining);
        assert_eq!(v.leader().unwrap().name, "node3");
    }

    #[test]
    fn states_serialize_lowercase() {
        let s = serde_json::to_string(&[Joining, Up, Suspect, Down, Draining, Left]).unwrap();
        assert_eq!(s, r#"["joining","up","suspect","down","draining","left"]"#);
        assert!(Up.can_lead() && Suspect.can_lead() && !Joining.can_lead() && !Draining.can_lead());
        assert!(Draining.is_present() && !Left.is_present());
    }
}
