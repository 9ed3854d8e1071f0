//! Placement: which node holds which layers of which replica. Pure and deterministic: the same
//! members, capacities and previous placement give the same answer on every node.
//!
//! Shape: `parallelism.replicas` R x `parallelism.stages` P, each a number or `auto`. Both `auto`:
//! one stage per replica and one replica per node (the model fits on every node; data parallelism
//! needs no activation traffic). One fixed: the other is `nodes / fixed`. Nodes beyond R x P are spares.
//!
//! Layers: each replica's stages hold contiguous ranges, sized in proportion to their nodes'
//! capacities (largest remainder, at least one layer each). Any node count works.
//!
//! Minimal movement: replicas whose nodes are all still present are kept as they were; a replica
//! that lost nodes keeps its ranges when spares can stand in for the lost nodes (only their layers
//! move); new replicas are built from the remaining nodes.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_config::Count;
use serde::{Deserialize, Serialize};

/// A node that can hold layers.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub capacity: f64,
}

/// One stage of one replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageAssignment {
    pub node: String,
    /// Layers `[start, end)`.
    pub start: u32,
    pub end: u32,
}

/// The whole placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Placement {
    pub epoch: u64,
    pub n_layers: u32,
    /// `replicas[r][s]`: stage `s` of replica `r`.
    pub replicas: Vec<Vec<StageAssignment>>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    #[error("no node is up to hold the model")]
    NoNodes,
    #[error("{replicas} replicas x {stages} stages need {needed} nodes; {have} are up")]
    TooFewNodes { replicas: u32, stages: u32, needed: usize, have: usize },
    #[error("{stages} stages for a model of {layers} layers: at most one stage per layer")]
    TooManyStages { stages: u32, layers: u32 },
}

impl Placement {
    /// Where `node` serves: `(replica, stage, assignment)`.
    pub fn find(&self, node: &str) -> Option<(usize, usize, &StageAssignment)> {
        self.replicas.iter().enumerate().find_map(|(r, st)| st.iter().enumerate().find(|(_, a)| a.node == node).map(|(s, a)| (r, s, a)))
    }

    /// Whether the two placements assign the same layers to the same nodes (epochs aside).
    pub fn same_layout(&self, other: &Placement) -> bool {
        self.n_layers == other.n_layers && self.replicas == other.replicas
    }

    /// Every node that holds layers.
    pub fn nodes(&self) -> BTreeSet<&str> {
        self.replicas.iter().flatten().map(|a| a.node.as_str()).collect()
    }

    fn holdings(&self) -> BTreeMap<&str, (u32, u32)> {
        self.replicas.iter().flatten().map(|a| (a.node.as_str(), (a.start, a.end))).collect()
    }
}

/// Layers that nodes must load to go from `prev` to `next` (a layer a node already held costs nothing).
pub fn moved_layers(prev: Option<&Placement>, next: &Placement) -> u32 {
    let before = prev.map(|p| p.holdings()).unwrap_or_default();
    next.replicas
        .iter()
        .flatten()
        .map(|a| {
            let kept = before.get(a.node.as_str()).map(|&(s, e)| e.min(a.end).saturating_sub(s.max(a.start))).unwrap_or(0);
            (a.end - a.start) - kept
        })
        .sum()
}

/// Splits `layers` into contiguous ranges proportional to `weights`, each at least one layer.
pub fn split_layers(layers: u32, weights: &[f64]) -> Vec<(u32, u32)> {
    let n = weights.len();
    assert!(n > 0 && n as u32 <= layers, "one layer per stage at least");
    let total: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| layers as f64 * w / total).collect();
    let mut count: Vec<u32> = exact.iter().map(|x| (x.floor() as u32).max(1)).collect();
    let mut sum: u32 = count.iter().sum();
    // Largest remainders first (ties: earlier stage), then take back from the largest if the minimums overshot.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())).then(a.cmp(&b)));
    let mut i = 0;
    while sum < layers {
        count[order[i % n]] += 1;
        sum += 1;
        i += 1;
    }
    while sum > layers {
        let j =
            (0..n).filter(|&j| count[j] > 1).max_by(|&a, &b| count[a].cmp(&count[b]).then(b.cmp(&a))).expect("some stage has more than one layer");
        count[j] -= 1;
        sum -= 1;
    }
    let mut start = 0;
    count
        .into_iter()
        .map(|c| {
            let r = (start, start + c);
            start += c;
            r
        })
        .collect()
}

/// The shape `(replicas, stages)` for `n` nodes.
pub fn shape(n: usize, n_layers: u32, replicas: Count, stages: Count) -> Result<(u32, u32), PlacementError> {
    if n == 0 {
        return Err(PlacementError::NoNodes);
    }
    let n32 = n as u32;
    let (r, p) = match (replicas, stages) {
        (Count::Auto, Count::Auto) => (n32, 1),
        (Count::Fixed(r), Count::Auto) => (r, (n32 / r.max(1)).clamp(1, n_layers)),
        (Count::Auto, Count::Fixed(p)) => ((n32 / p.max(1)).max(1), p),
        (Count::Fixed(r), Count::Fixed(p)) => (r, p),
    };
    if p > n_layers {
        return Err(PlacementError::TooManyStages { stages: p, layers: n_layers });
    }
    if (r * p) as usize > n {
        return Err(PlacementError::TooFewNodes { replicas: r, stages: p, needed: (r * p) as usize, have: n });
    }
    Ok((r, p))
}

/// Plans a placement for `nodes` (any order). `epoch` is left to the caller.
pub fn plan(nodes: &[NodeInfo], n_layers: u32, replicas: Count, stages: Count, prev: Option<&Placement>) -> Result<Placement, PlacementError> {
    let (r, p) = shape(nodes.len(), n_layers, replicas, stages)?;
    let (r, p) = (r as usize, p as usize);
    let capacity: BTreeMap<&str, f64> = nodes.iter().map(|n| (n.name.as_str(), n.capacity)).collect();
    let mut free: BTreeSet<&str> = capacity.keys().copied().collect();
    let mut out: Vec<Vec<StageAssignment>> = Vec::new();

    let prev = prev.filter(|pp| pp.n_layers == n_layers && pp.replicas.first().is_some_and(|s| s.len() == p));
    if let Some(pp) = prev {
        // 1. Replicas whose nodes are all present stay as they are.
        let mut broken = Vec::new();
        for rep in &pp.replicas {
            if out.len() < r && rep.iter().all(|a| free.contains(a.node.as_str())) {
                for a in rep {
                    free.remove(a.node.as_str());
                }
                out.push(rep.clone());
            } else {
                broken.push(rep);
            }
        }
        // 2. Broken replicas keep their ranges where spares can stand in for the lost nodes.
        for rep in broken {
            if out.len() >= r {
                break;
            }
            let present: Vec<&str> = rep.iter().filter(|a| free.contains(a.node.as_str())).map(|a| a.node.as_str()).collect();
            let missing = rep.len() - present.len();
            let spares: Vec<&str> = free.iter().copied().filter(|n| !present.contains(n)).collect();
            if spares.len() < missing {
                continue;
            }
            let mut spares = by_capacity(spares, &capacity);
            let mut fixed = Vec::new();
            for a in rep {
                let node = if free.contains(a.node.as_str()) { a.node.as_str() } else { spares.remove(0) };
                free.remove(node);
                fixed.push(StageAssignment { node: node.to_string(), start: a.start, end: a.end });
            }
            out.push(fixed);
        }
    }
    // 3. New replicas from the remaining nodes: highest capacity first, each to the replica with the least capacity so far.
    let need = r - out.len();
    if need > 0 {
        let pool = by_capacity(free.iter().copied().collect(), &capacity);
        let mut groups: Vec<Vec<&str>> = vec![Vec::new(); need];
        for node in pool.into_iter().take(need * p) {
            let g = (0..need)
                .filter(|&g| groups[g].len() < p)
                .min_by(|&a, &b| {
                    let ca: f64 = groups[a].iter().map(|n| capacity[n]).sum();
                    let cb: f64 = groups[b].iter().map(|n| capacity[n]).sum();
                    ca.total_cmp(&cb).then(a.cmp(&b))
                })
                .expect("a group with room");
            groups[g].push(node);
        }
        for mut g in groups {
            g.sort();
            let weights: Vec<f64> = g.iter().map(|n| capacity[n]).collect();
            out.push(
                split_layers(n_layers, &weights)
                    .into_iter()
                    .zip(g)
                    .map(|((start, end), node)| StageAssignment { node: node.to_string(), start, end })
                    .collect(),
            );
        }
    }
    Ok(Placement { epoch: 0, n_layers, replicas: out })
}

fn by_capacity<'a>(mut nodes: Vec<&'a str>, capacity: &BTreeMap<&str, f64>) -> Vec<&'a str> {
    nodes.sort_by(|a, b| capacity[b].total_cmp(&capacity[a]).then(a.cmp(b)));
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;
    use Count::{Auto, Fixed};

    fn nodes(caps: &[f64]) -> Vec<NodeInfo> {
        caps.iter().enumerate().map(|(i, &c)| NodeInfo { name: format!("n{}", i + 1), capacity: c }).collect()
    }

    fn check_cover(p: &Placement) {
        let mut used = BTreeSet::new();
        for rep in &p.replicas {
            let mut at = 0;
            for a in rep {
                assert_eq!(a.start, at, "contiguous: {p:?}");
                assert!(a.end > a.start, "non-empty: {p:?}");
                assert!(used.insert(a.node.clone()), "a node serves one stage: {p:?}");
                at = a.end;
            }
            assert_eq!(at, p.n_layers, "every layer exactly once per replica: {p:?}");
        }
    }

    #[test]
    fn every_layer_once_per_replica_for_1_to_9_nodes_and_all_shapes() {
        for n in 1..=9 {
            for (rc, sc) in
                [(Auto, Auto), (Fixed(1), Auto), (Auto, Fixed(1)), (Auto, Fixed(2)), (Auto, Fixed(3)), (Fixed(2), Auto), (Fixed(1), Fixed(n as u32))]
            {
                let caps: Vec<f64> = (0..n).map(|i| 1.0 + (i % 3) as f64).collect();
                match plan(&nodes(&caps), 30, rc, sc, None) {
                    Ok(p) => {
                        check_cover(&p);
                        let (r, s) = shape(n, 30, rc, sc).unwrap();
                        assert_eq!(p.replicas.len(), r as usize);
                        assert!(p.replicas.iter().all(|rep| rep.len() == s as usize));
                    }
                    Err(e) => assert!(matches!(e, PlacementError::TooFewNodes { .. }), "{n} nodes, {rc:?}x{sc:?}: {e}"),
                }
            }
        }
    }

    #[test]
    fn shapes() {
        let cases = [
            (1, Auto, Auto, Ok((1, 1))),
            (3, Auto, Auto, Ok((3, 1))),
            (3, Fixed(1), Auto, Ok((1, 3))),
            (4, Fixed(2), Auto, Ok((2, 2))),
            (5, Auto, Fixed(2), Ok((2, 2))),
            (7, Fixed(1), Auto, Ok((1, 7))),
            (2, Fixed(1), Fixed(3), Err(PlacementError::TooFewNodes { replicas: 1, stages: 3, needed: 3, have: 2 })),
            (0, Auto, Auto, Err(PlacementError::NoNodes)),
        ];
        for (n, r, s, want) in cases {
            assert_eq!(shape(n, 30, r, s), want, "{n} nodes {r:?} x {s:?}");
        }
        assert_eq!(shape(40, 30, Fixed(1), Fixed(31)), Err(PlacementError::TooManyStages { stages: 31, layers: 30 }));
        assert_eq!(shape(40, 30, Fixed(1), Auto), Ok((1, 30)), "auto stages stop at one layer each");
    }

    #[test]
    fn capacity_weighting() {
        let p = plan(&nodes(&[1.0, 2.0, 3.0]), 30, Fixed(1), Auto, None).unwrap();
        let sizes: Vec<u32> = p.replicas[0].iter().map(|a| a.end - a.start).collect();
        assert_eq!(sizes, vec![5, 10, 15]);
        assert_eq!(split_layers(30, &[1.0, 1.0, 1.0, 1.0]), vec![(0, 8), (8, 16), (16, 23), (23, 30)]);
        assert_eq!(split_layers(3, &[100.0, 1.0, 1.0]), vec![(0, 1), (1, 2), (2, 3)], "at least one layer each");
        assert_eq!(split_layers(30, &[0.5, 1.5]), vec![(0, 8), (8, 30)]);
        // Replicas are balanced by total capacity.
        let p = plan(&nodes(&[4.0, 3.0, 2.0, 1.0]), 30, Fixed(2), Auto, None).unwrap();
        let totals: Vec<f64> =
            p.replicas.iter().map(|r| r.iter().map(|a| [4.0, 3.0, 2.0, 1.0][a.node[1..].parse::<usize>().unwrap() - 1]).sum()).collect();
        assert_eq!(totals, vec![5.0, 5.0]);
    }

    #[test]
    fn deterministic_whatever_the_input_order() {
        let mut ns = nodes(&[1.0, 2.0, 3.0, 1.0, 2.0]);
        let a = plan(&ns, 30, Auto, Fixed(2), None).unwrap();
        ns.reverse();
        assert_eq!(plan(&ns, 30, Auto, Fixed(2), None).unwrap(), a);
    }

    #[test]
    fn minimal_movement_on_join_and_leave() {
        // Data parallel: a join adds one replica (one full model loaded), a leave moves nothing.
        let three = plan(&nodes(&[1.0; 3]), 30, Auto, Auto, None).unwrap();
        let four = plan(&nodes(&[1.0; 4]), 30, Auto, Auto, Some(&three)).unwrap();
        assert_eq!(moved_layers(Some(&three), &four), 30);
        let mut left = nodes(&[1.0; 4]);
        left.remove(1);
        let after = plan(&left, 30, Auto, Auto, Some(&four)).unwrap();
        assert_eq!(moved_layers(Some(&four), &after), 0);
        check_cover(&after);

        // 2 x 2 with a spare: a lost node is replaced by the spare, which loads only its layers.
        let five = plan(&nodes(&[1.0; 5]), 30, Fixed(2), Fixed(2), None).unwrap();
        let spare = nodes(&[1.0; 5]).into_iter().map(|n| n.name).find(|n| five.find(n).is_none()).unwrap();
        let lost = five.replicas[1][0].clone();
        let rest: Vec<NodeInfo> = nodes(&[1.0; 5]).into_iter().filter(|n| n.name != lost.node).collect();
        let healed = plan(&rest, 30, Fixed(2), Fixed(2), Some(&five)).unwrap();
        check_cover(&healed);
        assert_eq!(moved_layers(Some(&five), &healed), lost.end - lost.start);
        assert_eq!(healed.find(&spare).unwrap().2.start, lost.start);

        // A join to a fixed shape is a spare: nothing moves.
        let more: Vec<NodeInfo> = nodes(&[1.0; 6]);
        assert_eq!(moved_layers(Some(&five), &plan(&more, 30, Fixed(2), Fixed(2), Some(&five)).unwrap()), 0);

        // 2 x 2 losing a node without a spare: one replica survives untouched.
        let four = plan(&nodes(&[1.0; 4]), 30, Auto, Fixed(2), None).unwrap();
        let gone = four.replicas[0][1].node.clone();
        let rest: Vec<NodeInfo> = nodes(&[1.0; 4]).into_iter().filter(|n| n.name != gone).collect();
        let after = plan(&rest, 30, Auto, Fixed(2), Some(&four)).unwrap();
        assert_eq!(after.replicas.len(), 1);
        assert_eq!(after.replicas[0], four.replicas[1]);
        assert_eq!(moved_layers(Some(&four), &after), 0);
    }
}
