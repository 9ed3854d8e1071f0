//! Failover under load: a 4-node cluster (one replica per node) serving 64 concurrent requests,
//! greedy and seeded, while one node is killed, hung or drained. Every request must complete with
//! exactly the tokens of the single-process engine: no gap, no duplicate, no error.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use support::load::body;
use support::*;

const REQUESTS: usize = 64;

fn cases() -> Vec<load::Case> {
    load::cases(REQUESTS, 7, 24)
}

/// The single-process engine's tokens for every case (cached; the same for every test).
fn reference() -> Vec<Vec<u32>> {
    load::reference("chaos-reference-v2", &cases())
}

/// Runs the 64 requests against the nodes `via` (round-robin); `fault` runs once tokens are flowing on
/// `victim`'s worker. Returns after checking every answer.
fn under_load(c: &Cluster, via: &[usize], victim: &str, fault: impl FnOnce(&Cluster)) {
    let want = reference();
    let cases = cases();
    let done = AtomicUsize::new(0);
    let cref: &Cluster = c;
    let results: Vec<(usize, u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, case)| {
                let done = &done;
                s.spawn(move || {
                    let (code, v, _) = cref.post(via[i % via.len()], "/v1/completions", &body(case));
                    done.fetch_add(1, Ordering::Relaxed);
                    (i, code, v)
                })
            })
            .collect();
        // Wait until the victim holds sequences, then strike.
        let s0 = cref.wait_status(via[0], Duration::from_secs(60), "sequences on the victim", |s| {
            s["workers"].as_array().is_some_and(|ws| ws.iter().any(|w| w["node"] == victim && w["sequences"].as_u64() >= Some(8)))
        });
        let running = s0["workers"].as_array().unwrap().iter().find(|w| w["node"] == victim).unwrap()["sequences"].clone();
        let finished_before = done.load(Ordering::Relaxed);
        eprintln!("fault on {victim} with {running} sequences there and {finished_before} of {REQUESTS} requests finished");
        fault(cref);
        assert!(finished_before < REQUESTS, "the fault came after the load");
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut failures = Vec::new();
    for (i, code, v) in results {
        if code != 200 {
            failures.push(format!("request {i}: HTTP {code}: {v}"));
            continue;
        }
        let ids: Vec<u32> = v["choices"][0]["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        if ids != want[i] {
            failures.push(format!("request {i} differs:\n  got  {ids:?}\n  want {:?}", want[i]));
        }
    }
    assert!(failures.is_empty(), "{} of {REQUESTS} requests went wrong:\n{}\n{}", failures.len(), failures.join("\n"), c.logs());
}

fn replicas(s: &Value) -> usize {
    s["scheduler"]["placement"]["replicas"].as_array().map(|r| r.len()).unwrap_or(0)
}

fn four_nodes() -> Cluster {
    four_nodes_with(&[])
}

fn four_nodes_with(env: &[(&str, &str)]) -> Cluster {
    reference();
    let c = Cluster::start_with(4, env, Some(&model_path()));
    for i in 0..4 {
        c.wait_ready(i, Duration::from_secs(60));
    }
    c.wait_status(0, Duration::from_secs(10), "4 replicas", |s| replicas(s) == 4);
    c
}

#[test]
fn two_nodes_joining_under_load_take_work() {
    reference();
    // Eight running requests per replica: the rest wait in the queue and go to the new replicas once they are loaded.
    let env = [("FLOTILLA__PARALLELISM__MAX_BATCH", "8")];
    let mut c = Cluster::start_with(2, &env, Some(&model_path()));
    for i in 0..2 {
        c.wait_ready(i, Duration::from_secs(60));
    }
    let newcomers = std::sync::Mutex::new(vec![c.new_node("node3", &env), c.new_node("node4", &env)]);
    under_load(&c, &[0, 1], "node1", |_| {
        for n in newcomers.lock().unwrap().iter_mut() {
            n.spawn();
        }
    });
    c.nodes.extend(newcomers.into_inner().unwrap());
    let s = c.wait_status(0, Duration::from_secs(10), "4 replicas", |s| replicas(s) == 4 && s["scheduler"]["ready"] == true);
    for n in ["node3", "node4"] {
        let w = s["workers"].as_array().unwrap().iter().find(|w| w["node"] == n).unwrap_or_else(|| panic!("no worker stats for {n}: {s:#}"));
        assert!(w["batches"].as_u64().unwrap() > 0, "{n} took no work: {w}");
    }
}

#[test]
fn a_node_restarted_after_kill_9_takes_layers_again() {
    let mut c = four_nodes();
    c.node("node3").signal(Signal::SIGKILL);
    c.node("node3").wait_exit(Duration::from_secs(5));
    c.wait_status(0, Duration::from_secs(5), "3 replicas", |s| replicas(s) == 3 && !s["scheduler"]["placement"].to_string().contains("node3"));
    c.restart(2);
    let s = c.wait_status(0, Duration::from_secs(30), "node3 serves again", |s| {
        replicas(s) == 4 && s["scheduler"]["ready"] == true && s["scheduler"]["placement"].to_string().contains("node3")
    });
    assert_eq!(state_of(&s, "node3").as_deref(), Some("up"));
    let r = &s["scheduler"]["rebalance"];
    assert!(
        r["ready_at_ms"].is_u64() && r["pending"] == json!([]) && r["moved_layers"].as_u64() > Some(0),
        "the rebalance that gave node3 layers is over: {r}"
    );
    let (code, v, _) = c.post(2, "/v1/completions", &body(&cases()[0]));
    assert_eq!(code, 200, "{v}");
    let ids: Vec<u32> = v["choices"][0]["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, reference()[0]);
}

#[test]
fn kill_9_of_a_worker_node_mid_generation() {
    let c = four_nodes();
    under_load(&c, &[0, 1], "node4", |c| c.get_node("node4").signal(Signal::SIGKILL));
}

#[test]
fn kill_9_of_the_leader_mid_generation() {
    let c = four_nodes();
    under_load(&c, &[1, 2], "node1", |c| c.get_node("node1").signal(Signal::SIGKILL));
    let s = c.status(1).unwrap();
    assert_eq!(s["leader"], "node2", "{s:#}");
}

#[test]
fn a_node_hung_for_ten_seconds_mid_generation() {
    let c = four_nodes();
    under_load(&c, &[0, 1], "node3", |c| {
        c.get_node("node3").signal(Signal::SIGSTOP);
        std::thread::sleep(Duration::from_secs(10));
        c.get_node("node3").signal(Signal::SIGCONT);
    });
    c.wait_status(0, Duration::from_secs(10), "node3 back", |s| all_up(s, &["node1", "node2", "node3", "node4"]));
}

#[test]
fn drain_of_a_node_mid_generation() {
    let c = four_nodes();
    let addr = c.nodes[0].cluster.clone();
    under_load(&c, &[0, 1], "node4", |_| {
        let out = admin(&addr, COOKIE, &["drain", "node4"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    });
    let s = c.wait_status(0, Duration::from_secs(5), "node4 draining", |s| state_of(s, "node4").as_deref() == Some("draining"));
    let p = &s["scheduler"]["placement"]["replicas"];
    assert!(!p.to_string().contains("node4"), "a draining node holds no layers: {p}");
}

#[test]
fn a_cut_link_between_two_nodes_heals() {
    // node2 cuts its link to node4 for 3 s while its clients' requests run on every replica, node4's
    // included: node2 sees node4 down and moves those requests elsewhere; the leader (node1) still sees
    // node4 up and keeps it in the placement; after the cut both reconnect and every request is correct.
    let c = four_nodes_with(&[("FLOTILLA__NODE__FAULT_INJECTION", "true")]);
    let addr = c.nodes[1].cluster.clone();
    under_load(&c, &[1], "node4", |c| {
        let out = admin(&addr, COOKIE, &["cut-link", "node2", "node4", "--ms", "3000"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let s = c.wait_status(1, Duration::from_secs(3), "node2 sees node4 down", |s| state_of(s, "node4").as_deref() == Some("down"));
        assert_eq!(s["leader"], "node1", "{s:#}");
        let s = c.status(0).unwrap();
        assert_eq!(state_of(&s, "node4").as_deref(), Some("up"), "the leader still reaches node4: {s:#}");
    });
    let names = ["node1", "node2", "node3", "node4"];
    c.wait_status(1, Duration::from_secs(15), "node2 sees node4 again", |s| all_up(s, &names));
    c.wait_status(3, Duration::from_secs(15), "node4 sees node2 again", |s| all_up(s, &names));
    let s = c.wait_status(0, Duration::from_secs(5), "4 replicas", |s| replicas(s) == 4 && s["scheduler"]["ready"] == true);
    let w = s["workers"].as_array().unwrap().iter().find(|w| w["node"] == "node4").unwrap_or_else(|| panic!("no worker stats for node4: {s:#}"));
    assert!(w["batches"].as_u64().unwrap() > 0, "node4 served: {w}");
}

#[test]
fn cut_link_needs_fault_injection() {
    let c = Cluster::start(2, &[]);
    // Both up first (/ready can answer while a node still shows as joining).
    c.wait_status(0, Duration::from_secs(30), "both up", |s| all_up(s, &["node1", "node2"]));
    let out = admin(&c.nodes[0].cluster, COOKIE, &["cut-link", "node1", "node2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fault injection is disabled"), "{}", String::from_utf8_lossy(&out.stderr));
    let s = c.status(0).unwrap();
    assert!(all_up(&s, &["node1", "node2"]), "{s:#}");
}

/// Two nodes as one 2-stage pipeline: losing either leaves too little capacity for a full placement.
/// Starts 8 requests through node1, kills node2 once it holds sequences, runs `meanwhile`, and returns
/// every answer in request order.
fn pipeline_losing_a_stage(resume_wait_ms: &str, meanwhile: impl FnOnce(&mut Cluster)) -> Vec<(u16, Value)> {
    reference();
    let env = [("FLOTILLA__PARALLELISM__STAGES", "2"), ("FLOTILLA__HTTP__RESUME_WAIT_MS", resume_wait_ms)];
    let mut c = Cluster::start_with(2, &env, Some(&model_path()));
    for i in 0..2 {
        c.wait_ready(i, Duration::from_secs(60));
    }
    let addr = c.nodes[0].http.clone();
    let cases = cases();
    std::thread::scope(|s| {
        let handles: Vec<_> = cases[..8]
            .iter()
            .map(|case| {
                let addr = &addr;
                s.spawn(move || {
                    let (code, v, _) = post_to(addr, "/v1/completions", &body(case));
                    (code, v)
                })
            })
            .collect();
        c.wait_status(0, Duration::from_secs(60), "sequences on node2", |s| {
            s["workers"].as_array().is_some_and(|ws| ws.iter().any(|w| w["node"] == "node2" && w["sequences"].as_u64() >= Some(4)))
        });
        c.node("node2").signal(Signal::SIGKILL);
        c.node("node2").wait_exit(Duration::from_secs(5));
        c.wait_status(0, Duration::from_secs(5), "node2 down", |s| state_of(s, "node2").as_deref() == Some("down"));
        // A new request is refused at once: there is no full placement.
        let (code, v, _) = c.post(0, "/v1/completions", &json!({ "prompt": "Hello", "max_tokens": 4 }));
        assert_eq!(code, 503, "{v}");
        meanwhile(&mut c);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn requests_under_way_wait_for_capacity_to_come_back() {
    let results = pipeline_losing_a_stage("60000", |c| {
        std::thread::sleep(Duration::from_secs(2));
        c.restart(1);
    });
    let want = reference();
    for (i, (code, v)) in results.iter().enumerate() {
        assert_eq!(*code, 200, "request {i}: {v}");
        let ids: Vec<u32> = v["choices"][0]["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want[i], "request {i}");
    }
}

#[test]
fn requests_under_way_fail_clearly_when_capacity_stays_gone() {
    let results = pipeline_losing_a_stage("1500", |_| {});
    for (i, (code, v)) in results.iter().enumerate() {
        assert_eq!(*code, 503, "request {i}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("lost its pipeline") && msg.contains("no full placement came back within 1.5s"), "request {i}: {msg}");
    }
}
