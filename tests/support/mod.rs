//! Multi-process test harness: real `flotilla node` processes on 127.0.0.1, driven by real
//! `flotilla admin` calls. Every process is killed when the `Cluster` is dropped, even when the test fails.

#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

pub mod load;

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");
pub const COOKIE: &str = "test-cookie";

/// The real model (SmolLM2-135M-Instruct Q4_1), fetched by `scripts/fetch-model.sh`.
pub fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh (make test does)", p.display());
    p
}

/// A port nobody listens on right now, below the kernel's ephemeral range (32768 and up) so that no
/// outgoing connection or port-0 listener takes it before the node binds it. Each test process
/// (nextest runs one per test) draws from its own block of ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let block = 20000 + (std::process::id() % 500) as u16 * 24;
    loop {
        let p = block + NEXT.fetch_add(1, Ordering::Relaxed) % 24;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

pub struct NodeProc {
    pub name: String,
    pub cluster: String,
    pub http: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub env: Vec<(String, String)>,
    pub seeds: Vec<String>,
    pub model: PathBuf,
}

impl NodeProc {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("node is running").id() as i32)
    }

    pub fn signal(&self, s: Signal) {
        kill(self.pid(), s).unwrap();
    }

    /// Waits for the process to exit and returns its exit code (None: killed by a signal).
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("node is running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            assert!(Instant::now() < deadline, "{} did not exit within {within:?}; log:\n{}", self.name, self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["node", "--name", &self.name, "--cluster-listen", &self.cluster, "--http-listen", &self.http])
            .args(["--seeds", &self.seeds.join(",")])
            .arg("--model")
            .arg(&self.model)
            .env("FLOTILLA__NODE__THREADS", "1")
            .env("FLOTILLA_COOKIE", COOKIE)
            // FLOTILLA_TEST_RUST_LOG (say `info,flotilla_actors=debug`) sets the nodes' log filter when chasing a failure.
            .env("RUST_LOG", std::env::var("FLOTILLA_TEST_RUST_LOG").unwrap_or_else(|_| "info,ractor_cluster=warn".into()))
            .env_remove("FLOTILLA__NODE__FAULT_INJECTION")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn flotilla node"));
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// Nodes started together, seeded with each other.
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes named node1..nodeN serving a tiny synthetic model; `env` applies to every node.
    pub fn start(n: usize, env: &[(&str, &str)]) -> Cluster {
        Self::start_with(n, env, None)
    }

    /// Starts `n` nodes serving `model` (default: a tiny synthetic model written for the test).
    pub fn start_with(n: usize, env: &[(&str, &str)], model: Option<&std::path::Path>) -> Cluster {
        Self::start_custom(n, env, model, &[])
    }

    /// As `start_with`, node `i` with `capacities[i]` where given.
    pub fn start_custom(n: usize, env: &[(&str, &str)], model: Option<&std::path::Path>, capacities: &[f64]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let model = match model {
            Some(m) => m.to_path_buf(),
            None => {
                let p = dir.path().join("tiny.gguf");
                flotilla_engine::synthetic::write(&p, &flotilla_engine::synthetic::SyntheticSpec::default()).unwrap();
                p
            }
        };
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let seeds: Vec<String> = ports.iter().map(|(c, _)| format!("127.0.0.1:{c}")).collect();
        let mut nodes = Vec::new();
        for (i, (c, h)) in ports.iter().enumerate() {
            let name = format!("node{}", i + 1);
            nodes.push(NodeProc {
                log: dir.path().join(format!("{name}.log")),
                name,
                cluster: format!("127.0.0.1:{c}"),
                http: format!("127.0.0.1:{h}"),
                child: None,
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .chain(capacities.get(i).map(|c| ("FLOTILLA__NODE__CAPACITY".to_string(), c.to_string())))
                    .collect(),
                seeds: seeds.clone(),
                model: model.clone(),
            });
        }
        let mut cluster = Cluster { nodes, dir };
        for node in cluster.nodes.iter_mut() {
            node.spawn();
        }
        cluster
    }

    /// Adds and starts another node seeded with the existing ones, with extra environment.
    pub fn add(&mut self, name: &str, env: &[(&str, &str)]) -> usize {
        let mut node = self.new_node(name, env);
        node.spawn();
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Another node seeded with the existing ones, not started yet (`spawn` starts it).
    pub fn new_node(&self, name: &str, env: &[(&str, &str)]) -> NodeProc {
        let seeds = self.nodes.iter().map(|n| n.cluster.clone()).collect();
        NodeProc {
            log: self.dir.path().join(format!("{name}.log")),
            name: name.into(),
            cluster: format!("127.0.0.1:{}", free_port()),
            http: format!("127.0.0.1:{}", free_port()),
            child: None,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            seeds,
            model: self.nodes[0].model.clone(),
        }
    }

    /// Starts node `i` again with the same name, ports and environment.
    pub fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "restart of a running node");
        self.nodes[i].spawn();
    }

    pub fn node(&mut self, name: &str) -> &mut NodeProc {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }

    pub fn get_node(&self, name: &str) -> &NodeProc {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    /// `flotilla admin status --json` through node `via`, or None if the call failed.
    pub fn status(&self, via: usize) -> Option<Value> {
        let out = admin(&self.nodes[via].cluster, COOKIE, &["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `pred` holds for the status seen through node `via`; panics with the last status and the logs.
    pub fn wait_status(&self, via: usize, within: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            if let Some(s) = self.status(via) {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            if Instant::now() > deadline {
                panic!("{what}: not seen through {} within {within:?}; last status: {last:#?}\n{}", self.nodes[via].name, self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// POSTs a JSON body to node `i`'s HTTP API; returns the status and the parsed body.
    pub fn post(&self, i: usize, path: &str, body: &Value) -> (u16, Value, Option<String>) {
        post_to(&self.nodes[i].http, path, body)
    }

    /// GETs a path from node `i`: the status and the body.
    pub fn get(&self, i: usize, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.nodes[i].http);
        match ureq::get(&url).timeout(Duration::from_secs(10)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Waits until node `i` answers `/ready` with 200.
    pub fn wait_ready(&self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (code, body) = self.get(i, "/ready");
            if code == 200 {
                return;
            }
            if Instant::now() > deadline {
                panic!("{} not ready within {within:?}: {code} {body}\n{}", self.nodes[i].name, self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn logs(&self) -> String {
        self.nodes.iter().map(|n| format!("----- {} -----\n{}", n.name, n.log_text())).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in self.nodes.iter_mut() {
            if let Some(mut c) = n.child.take() {
                let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
                let _ = c.wait();
            }
        }
        // FLOTILLA_TEST_LOG_DIR keeps every cluster's node logs (one folder per cluster) when chasing a failure.
        if let Ok(keep) = std::env::var("FLOTILLA_TEST_LOG_DIR") {
            let to = std::path::Path::new(&keep).join(self.dir.path().file_name().unwrap().to_string_lossy().trim_start_matches('.'));
            if std::fs::create_dir_all(&to).is_ok() {
                for n in &self.nodes {
                    let _ = std::fs::copy(&n.log, to.join(n.log.file_name().unwrap()));
                }
            }
        }
    }
}

/// POSTs JSON to `path` on the HTTP address `addr`: the status, the body (JSON when it parses) and `Retry-After`.
/// A transport error (refused, reset, no answer within 120 s) is status 0 with the error as the body, so
/// that the caller's check fails with its own context (the nodes' logs) rather than a bare panic in a thread.
pub fn post_to(addr: &str, path: &str, body: &Value) -> (u16, Value, Option<String>) {
    let url = format!("http://{addr}{path}");
    let r = ureq::post(&url).timeout(Duration::from_secs(120)).set("Content-Type", "application/json").send_string(&body.to_string());
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return (0, Value::String(format!("POST {url}: {e}")), None),
    };
    let status = resp.status();
    let retry = resp.header("Retry-After").map(str::to_string);
    let text = resp.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), retry)
}

/// Runs `flotilla admin --node ADDR --cookie C ARGS...` (bounded by its own --timeout).
pub fn admin(addr: &str, cookie: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["admin", "--node", addr, "--cookie", cookie, "--timeout", "3"])
        .args(args)
        .env_remove("FLOTILLA_COOKIE")
        .stdin(Stdio::null())
        .output()
        .expect("run flotilla admin")
}

pub fn member<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["members"].as_array()?.iter().find(|m| m["name"] == name)
}

pub fn state_of(status: &Value, name: &str) -> Option<String> {
    member(status, name).and_then(|m| m["state"].as_str()).map(str::to_string)
}

pub fn incarnation_of(status: &Value, name: &str) -> u64 {
    member(status, name).and_then(|m| m["incarnation"].as_u64()).unwrap_or(0)
}

/// Every one of `names` is up, and nobody else is listed.
pub fn all_up(status: &Value, names: &[&str]) -> bool {
    let members = status["members"].as_array().map(|a| a.len()).unwrap_or(0);
    members == names.len() && names.iter().all(|n| state_of(status, n).as_deref() == Some("up"))
}

/// The first event in `status` about `node` reaching `to` at or after `since_ms`.
pub fn event_at(status: &Value, node: &str, to: &str, since_ms: u64) -> Option<u64> {
    status["events"].as_array()?.iter().filter(|e| e["node"] == node && e["to"] == to).filter_map(|e| e["at_ms"].as_u64()).find(|&t| t >= since_ms)
}
