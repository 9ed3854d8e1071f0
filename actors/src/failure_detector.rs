//! Heartbeat failure detection as a pure state machine (no clocks, no I/O): the caller reports
//! heartbeat acknowledgements and ticks with the current time; the detector answers with transitions.
//!
//! A peer that answers is `Alive`. One that has not answered for more than two heartbeat intervals is
//! `Suspect`; after `misses` intervals without an answer it is `Dead` and stays dead until it answers
//! again (the membership layer then sees it rejoin under a new incarnation).

use std::collections::BTreeMap;
use std::time::Duration;

/// What the detector believes about one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerHealth {
    Alive,
    Suspect,
    Dead,
}

/// A change of belief, reported once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub peer: String,
    pub from: PeerHealth,
    pub to: PeerHealth,
    /// Whole heartbeat intervals since the last answer.
    pub missed: u32,
}

#[derive(Debug, Clone)]
struct Peer {
    /// Milliseconds (caller's clock) of the last answer, or of when tracking began.
    last_ack_ms: u64,
    health: PeerHealth,
}

/// Tracks every peer's last heartbeat answer.
#[derive(Debug, Clone)]
pub struct FailureDetector {
    interval_ms: u64,
    misses: u32,
    peers: BTreeMap<String, Peer>,
}

impl FailureDetector {
    /// Heartbeats every `interval`; a peer is dead after `misses` intervals without an answer.
    pub fn new(interval: Duration, misses: u32) -> Self {
        Self { interval_ms: (interval.as_millis() as u64).max(1), misses: misses.max(1), peers: BTreeMap::new() }
    }

    /// Time from the last answer until a peer is declared dead.
    pub fn detection_time(&self) -> Duration {
        Duration::from_millis(self.interval_ms * self.misses as u64)
    }

    /// Starts tracking `peer` as alive at `now_ms` (idempotent for a known peer).
    pub fn track(&mut self, peer: &str, now_ms: u64) {
        self.peers.entry(peer.to_string()).or_insert(Peer { last_ack_ms: now_ms, health: PeerHealth::Alive });
    }

    /// Stops tracking `peer` (it left).
    pub fn forget(&mut self, peer: &str) {
        self.peers.remove(peer);
    }

    /// `peer` answered a heartbeat at `now_ms`; returns the transition back to alive, if any.
    pub fn ack(&mut self, peer: &str, now_ms: u64) -> Option<Transition> {
        let p = self.peers.entry(peer.to_string()).or_insert(Peer { last_ack_ms: now_ms, health: PeerHealth::Alive });
        p.last_ack_ms = p.last_ack_ms.max(now_ms);
        let from = p.health;
        p.health = PeerHealth::Alive;
        (from != PeerHealth::Alive).then(|| Transition { peer: peer.to_string(), from, to: PeerHealth::Alive, missed: 0 })
    }

    /// Re-evaluates every peer at `now_ms`; returns the changes, in peer-name order.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Transition> {
        let mut out = Vec::new();
        for (name, p) in self.peers.iter_mut() {
            let missed = (now_ms.saturating_sub(p.last_ack_ms) / self.interval_ms) as u32;
            let health = if missed >= self.misses {
                PeerHealth::Dead
            } else if missed >= 2 {
                PeerHealth::Suspect
            } else {
                p.health.min_alive()
            };
            if health != p.health {
                out.push(Transition { peer: name.clone(), from: p.health, to: health, missed });
                p.health = health;
            }
        }
        out
    }

    /// Current belief about `peer`.
    pub fn health(&self, peer: &str) -> Option<PeerHealth> {
        self.peers.get(peer).map(|p| p.health)
    }

    /// Whole intervals since `peer` last answered.
    pub fn missed(&self, peer: &str, now_ms: u64) -> Option<u32> {
        self.peers.get(peer).map(|p| (now_ms.saturating_sub(p.last_ack_ms) / self.interval_ms) as u32)
    }
}

impl PeerHealth {
    /// A dead peer stays dead until it answers; otherwise time alone never revives a peer.
    fn min_alive(self) -> Self {
        match self {
            PeerHealth::Dead => PeerHealth::Dead,
            _ => PeerHealth::Alive,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PeerHealth::*;

    /// One step of a scripted schedule: at `t` ms, optionally an ack from "b", then a tick; expected health after.
    struct Step {
        t: u64,
        ack: bool,
        expect: PeerHealth,
        transition: Option<(PeerHealth, PeerHealth)>,
    }

    fn run(steps: &[Step]) {
        let mut fd = FailureDetector::new(Duration::from_millis(100), 5);
        fd.track("b", 0);
        for (i, s) in steps.iter().enumerate() {
            let mut changes = Vec::new();
            if s.ack {
                changes.extend(fd.ack("b", s.t));
            }
            changes.extend(fd.tick(s.t));
            assert_eq!(fd.health("b"), Some(s.expect), "step {i} at {} ms", s.t);
            let got = changes.last().map(|c| (c.from, c.to));
            assert_eq!(got, s.transition, "step {i} at {} ms: {changes:?}", s.t);
        }
    }

    #[test]
    fn healthy_peer_stays_alive() {
        run(&[
            Step { t: 100, ack: true, expect: Alive, transition: None },
            Step { t: 200, ack: true, expect: Alive, transition: None },
            Step { t: 399, ack: false, expect: Alive, transition: None },
        ]);
    }

    #[test]
    fn silent_peer_goes_suspect_then_dead_once() {
        run(&[
            Step { t: 150, ack: false, expect: Alive, transition: None },
            Step { t: 200, ack: false, expect: Suspect, transition: Some((Alive, Suspect)) },
            Step { t: 450, ack: false, expect: Suspect, transition: None },
            Step { t: 500, ack: false, expect: Dead, transition: Some((Suspect, Dead)) },
            Step { t: 5000, ack: false, expect: Dead, transition: None },
        ]);
    }

    #[test]
    fn suspect_peer_that_answers_recovers() {
        run(&[
            Step { t: 250, ack: false, expect: Suspect, transition: Some((Alive, Suspect)) },
            Step { t: 300, ack: true, expect: Alive, transition: Some((Suspect, Alive)) },
            Step { t: 450, ack: false, expect: Alive, transition: None },
        ]);
    }

    #[test]
    fn dead_peer_revives_only_by_answering() {
        run(&[
            Step { t: 600, ack: false, expect: Dead, transition: Some((Alive, Dead)) },
            Step { t: 700, ack: false, expect: Dead, transition: None },
            Step { t: 800, ack: true, expect: Alive, transition: Some((Dead, Alive)) },
        ]);
    }

    #[test]
    fn stale_ack_does_not_move_time_back() {
        let mut fd = FailureDetector::new(Duration::from_millis(100), 3);
        fd.track("b", 0);
        fd.ack("b", 250);
        fd.ack("b", 100); // reordered reply
        assert!(fd.tick(400).is_empty(), "150 ms after the newest ack is only one interval");
        assert_eq!(fd.missed("b", 400), Some(1));
        assert_eq!(fd.detection_time(), Duration::from_millis(300));
    }

    #[test]
    fn forgotten_peers_are_not_reported() {
        let mut fd = FailureDetector::new(Duration::from_millis(100), 3);
        fd.track("a", 0);
        fd.track("b", 0);
        fd.forget("a");
        let t = fd.tick(1000);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].peer, "b");
    }
}
