//! Multi-process mesh tests: real `flotilla node` processes on 127.0.0.1, real sockets, real
//! signals, observed through `flotilla admin`. Heartbeats every 250 ms, dead after 6 misses (1.5 s).

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const ALL3: [&str; 3] = ["node1", "node2", "node3"];

#[test]
fn three_nodes_form_one_cluster_seen_from_every_node() {
    let c = Cluster::start(3, &[]);
    for via in 0..3 {
        c.wait_status(via, Duration::from_secs(5), "all three up", |s| all_up(s, &ALL3));
    }
    let s = c.status(1).unwrap();
    assert_eq!(s["leader"], "node1", "{s:#}");
    assert_eq!(s["node"], "node2");
    for n in &c.nodes {
        let m = member(&s, &n.name).unwrap();
        assert_eq!(m["cluster_addr"], n.cluster.as_str());
        assert_eq!(m["http_addr"], n.http.as_str());
        assert_eq!(m["capacity"], 1.0);
        assert!(m["incarnation"].as_u64().unwrap() > 0);
    }
    // The admin client is not a member, however often it calls.
    assert_eq!(s["members"].as_array().unwrap().len(), 3);

    // Commands are routed to the node they name, whichever node receives them.
    let out = admin(&c.nodes[0].cluster, COOKIE, &["drain", "node3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.wait_status(1, Duration::from_secs(3), "node3 draining", |s| state_of(s, "node3").as_deref() == Some("draining"));
    let out = admin(&c.nodes[1].cluster, COOKIE, &["undrain", "node3", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    c.wait_status(0, Duration::from_secs(3), "node3 up again", |s| all_up(s, &ALL3));

    // Rebalance goes to the leader and raises the placement epoch everywhere.
    let before = c.status(2).unwrap()["placement_epoch"].as_u64().unwrap();
    let out = admin(&c.nodes[2].cluster, COOKIE, &["rebalance"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.wait_status(2, Duration::from_secs(3), "epoch raised", |s| s["placement_epoch"].as_u64() > Some(before));

    // Bad commands fail with a message and a non-zero exit.
    let out = admin(&c.nodes[0].cluster, COOKIE, &["drain", "nosuchnode"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node named nosuchnode"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = admin(&c.nodes[0].cluster, COOKIE, &["inject-panic", "node2", "membership"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fault injection is disabled"), "{}", String::from_utf8_lossy(&out.stderr));
    c.wait_status(0, Duration::from_secs(2), "still all up", |s| all_up(s, &ALL3));
}

#[test]
fn killed_node_is_down_within_a_second_and_rejoins_with_a_higher_incarnation() {
    let mut c = Cluster::start(3, &[]);
    let s = c.wait_status(0, Duration::from_secs(5), "all up", |s| all_up(s, &ALL3));
    let old = incarnation_of(&s, "node3");
    let killed_at = unix_ms();
    c.node("node3").signal(Signal::SIGKILL);
    assert_eq!(c.node("node3").wait_exit(Duration::from_secs(5)), None);
    for via in 0..2 {
        let s = c.wait_status(via, Duration::from_secs(3), "node3 down", |s| state_of(s, "node3").as_deref() == Some("down"));
        let at = event_at(&s, "node3", "down", killed_at).expect("a down event");
        assert!(at - killed_at < 1000, "node3 marked down {} ms after kill -9 (via {via})", at - killed_at);
    }
    c.restart(2);
    let s = c.wait_status(0, Duration::from_secs(5), "node3 back up", |s| all_up(s, &ALL3) && incarnation_of(s, "node3") > old);
    assert!(incarnation_of(&s, "node3") > old);
    c.wait_status(2, Duration::from_secs(5), "restarted node sees everyone", |s| all_up(s, &ALL3));
}

#[test]
fn hung_node_is_down_within_three_seconds_and_back_after_sigcont() {
    let mut c = Cluster::start(3, &[]);
    let s = c.wait_status(0, Duration::from_secs(5), "all up", |s| all_up(s, &ALL3));
    let old = incarnation_of(&s, "node2");
    let stopped_at = unix_ms();
    c.node("node2").signal(Signal::SIGSTOP);
    for via in [0, 2] {
        let s = c.wait_status(via, Duration::from_secs(5), "node2 down", |s| state_of(s, "node2").as_deref() == Some("down"));
        let at = event_at(&s, "node2", "down", stopped_at).expect("a down event");
        assert!(at - stopped_at < 3000, "node2 marked down {} ms after SIGSTOP (via {via})", at - stopped_at);
    }
    c.node("node2").signal(Signal::SIGCONT);
    let s = c.wait_status(0, Duration::from_secs(10), "node2 back up", |s| all_up(s, &ALL3) && incarnation_of(s, "node2") > old);
    assert!(incarnation_of(&s, "node2") > old);
    c.wait_status(1, Duration::from_secs(5), "node2 sees everyone up", |s| all_up(s, &ALL3));
    c.wait_status(2, Duration::from_secs(5), "node3 sees everyone up", |s| all_up(s, &ALL3));
}

#[test]
fn wrong_cookie_is_refused_and_the_cluster_is_unaffected() {
    let mut c = Cluster::start(3, &[]);
    c.wait_status(0, Duration::from_secs(5), "all up", |s| all_up(s, &ALL3));
    // A node with the wrong cookie keeps trying to join through the seeds and is refused each time.
    c.add("intruder", &[("FLOTILLA_COOKIE", "wrong-cookie")]);
    let out = admin(&c.nodes[0].cluster, "wrong-cookie", &["status", "--json"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication failed"), "{err}");
    std::thread::sleep(Duration::from_secs(2));
    for via in 0..3 {
        let s = c.wait_status(via, Duration::from_secs(3), "still the same three", |s| all_up(s, &ALL3));
        assert!(member(&s, "intruder").is_none());
    }
    let s = c.status(0).unwrap();
    assert!(member(&s, "node1").unwrap()["load"]["rejected_sessions"].as_u64().unwrap() >= 1, "{s:#}");
    // The intruder sees nobody.
    let out = admin(&c.nodes[3].cluster, "wrong-cookie", &["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let own: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(own["members"].as_array().unwrap().len(), 1, "{own:#}");
}

#[test]
fn admin_client_errors_are_clear() {
    // Nothing listens: unreachable, non-zero.
    let out = admin(&format!("127.0.0.1:{}", free_port()), COOKIE, &["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"), "{}", String::from_utf8_lossy(&out.stderr));
    // Something that is not a flotilla node and never answers: timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = admin(&silent.local_addr().unwrap().to_string(), COOKIE, &["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn garbage_and_huge_frames_do_not_hurt_a_node() {
    let c = Cluster::start(3, &[]);
    c.wait_status(0, Duration::from_secs(5), "all up", |s| all_up(s, &ALL3));
    let target = &c.nodes[0].cluster;
    // Random garbage.
    let mut s = TcpStream::connect(target).unwrap();
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let _ = s.write_all(&garbage);
    drop(s);
    // A 100 MB length prefix, then a trickle of bytes.
    let mut s = TcpStream::connect(target).unwrap();
    let _ = s.write_all(&(100_000_000u64).to_be_bytes());
    let _ = s.write_all(&[0u8; 1024]);
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    // A plausible small frame that is not protobuf.
    let mut s = TcpStream::connect(target).unwrap();
    let _ = s.write_all(&8u64.to_be_bytes());
    let _ = s.write_all(&[0xff; 8]);
    drop(s);
    std::thread::sleep(Duration::from_millis(500));
    for via in 0..3 {
        c.wait_status(via, Duration::from_secs(3), "cluster intact", |s| all_up(s, &ALL3));
    }
    let s = c.status(0).unwrap();
    assert!(member(&s, "node1").unwrap()["load"]["rejected_sessions"].as_u64().unwrap() >= 3, "{s:#}");
}

#[test]
fn sigterm_and_admin_shutdown_leave_cleanly() {
    let mut c = Cluster::start(3, &[]);
    c.wait_status(0, Duration::from_secs(5), "all up", |s| all_up(s, &ALL3));
    let since = unix_ms();
    c.node("node3").signal(Signal::SIGTERM);
    assert_eq!(c.node("node3").wait_exit(Duration::from_secs(10)), Some(0), "{}", c.logs());
    let s = c.wait_status(0, Duration::from_secs(3), "node3 left", |s| state_of(s, "node3").as_deref() == Some("left"));
    assert!(event_at(&s, "node3", "down", since).is_none(), "node3 was seen to fail, not leave: {s:#}");
    c.wait_status(1, Duration::from_secs(3), "node3 left (node2)", |s| state_of(s, "node3").as_deref() == Some("left"));

    // The same through the admin RPC, sent to another node.
    let out = admin(&c.nodes[0].cluster, COOKIE, &["shutdown", "node2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.node("node2").wait_exit(Duration::from_secs(10)), Some(0), "{}", c.logs());
    let s = c.wait_status(0, Duration::from_secs(3), "node2 left", |s| state_of(s, "node2").as_deref() == Some("left"));
    assert_eq!(state_of(&s, "node1").as_deref(), Some("up"));
    assert_eq!(s["leader"], "node1");
}

#[test]
fn a_panicking_child_is_restarted_and_the_node_stays() {
    // Without a backtrace: printing one (RUST_BACKTRACE=1, as CI has it) symbolises this debug binary for
    // over 1.5 s on a loaded 2-core machine, in the panicking thread, before the supervisor hears of the
    // failure: longer than the peers' failure detection, so node2 was marked down (seen locally, 9 in 10
    // runs beside two busy loops). The test is about the restart, not about printing backtraces.
    let c = Cluster::start(3, &[("FLOTILLA__NODE__FAULT_INJECTION", "true"), ("RUST_BACKTRACE", "0")]);
    c.wait_status(0, Duration::from_secs(5), "all up", |s| all_up(s, &ALL3));
    let old = incarnation_of(&c.status(0).unwrap(), "node2");
    let since = unix_ms();
    let out = admin(&c.nodes[0].cluster, COOKIE, &["inject-panic", "node2", "membership"]);
    // The reply may or may not make it out before the panic; the node must recover either way.
    let _ = out;
    std::thread::sleep(Duration::from_millis(1500));
    for via in 0..3 {
        let s = c.wait_status(via, Duration::from_secs(5), "all up after a membership panic", |s| all_up(s, &ALL3));
        assert!(event_at(&s, "node2", "down", since).is_none(), "node2 was marked down: {s:#}\n{}", c.logs());
    }
    assert_eq!(incarnation_of(&c.status(0).unwrap(), "node2"), old, "a restarted child is not a new incarnation");
    // Sent through node1: a call to the very actor that panics may lose its answer.
    let out = admin(&c.nodes[0].cluster, COOKIE, &["inject-panic", "node2", "admin"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.wait_status(1, Duration::from_secs(5), "admin answers again", |s| all_up(s, &ALL3));
    let log = c.nodes[1].log_text();
    assert_eq!(log.matches("restarting a failed child").count(), 2, "{log}");
}
