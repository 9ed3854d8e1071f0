//! The Docker image and `docker/compose.yaml` under real container faults. Builds the base image
//! offline when it is missing (`docker/build-base.sh`), builds the flotilla image from this test's
//! binary, brings up node1..3 with compose under a project name of its own, and sends load through
//! node1's published port while:
//!
//! - node3 is cut off the network (`docker network disconnect`): it is marked down, every request
//!   completes with the single-process engine's tokens, and after `docker network connect` it rejoins;
//! - node2 is killed (`docker kill`) while it holds sequences: every request completes identically; it
//!   is started again and rejoins;
//! - node3 is restarted (`docker restart`): it rejoins, takes layers and serves part of the next load.
//!
//! Every container, network, volume and the image are removed when the test ends, also when it fails
//! (a Drop guard), and leftovers of earlier runs that were killed are removed when it starts. Without a
//! Docker engine the test prints "skipped: docker not available" and passes.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::load::body;
use support::*;

const REQUESTS: usize = 30;
const BASE_IMAGE: &str = "debian:bookworm-slim";
const IMAGE_REPO: &str = "flotilla-test";
const PROJECT_PREFIX: &str = "flotilla-test-";
const DOCKER_COOKIE: &str = "docker-test-cookie";

// ---------------------------------------------------------------------------------------------
// The load and its reference answers (as tests/chaos.rs).

fn cases() -> Vec<load::Case> {
    load::cases(REQUESTS, 11, 32)
}

/// The single-process engine's tokens for every case (cached in the target directory).
fn reference() -> Vec<Vec<u32>> {
    load::reference("docker-reference-v2", &cases())
}

fn http_post(url: &str, body: &Value) -> (u16, Value) {
    let r = ureq::post(url).timeout(Duration::from_secs(180)).set("Content-Type", "application/json").send_string(&body.to_string());
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return (0, Value::String(format!("POST {url}: {e}"))),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn http_get(url: &str) -> (u16, String) {
    match ureq::get(url).timeout(Duration::from_secs(5)).call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

fn replicas(s: &Value) -> usize {
    s["scheduler"]["placement"]["replicas"].as_array().map(|r| r.len()).unwrap_or(0)
}

fn holds_layers(s: &Value, node: &str) -> bool {
    s["scheduler"]["placement"]["replicas"].to_string().contains(&format!("\"{node}\""))
}

fn worker<'a>(s: &'a Value, node: &str) -> Option<&'a Value> {
    s["workers"].as_array()?.iter().find(|w| w["node"] == node)
}

/// The whole cluster serves: three members up, three replicas placed, one of them on each node.
fn serving(s: &Value) -> bool {
    let names = ["node1", "node2", "node3"];
    all_up(s, &names) && replicas(s) == 3 && s["scheduler"]["ready"] == true && names.iter().all(|n| holds_layers(s, n))
}

// ---------------------------------------------------------------------------------------------
// Running docker.

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Out {
    fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs a command to its end, killing it after `within`; output goes through files (no pipe can fill up).
fn run_cmd(program: &str, args: &[&str], env: &[(String, String)], within: Duration) -> Out {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(std::fs::File::create(&out_path).unwrap()).stderr(std::fs::File::create(&err_path).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Out { ok: false, stdout: String::new(), stderr: format!("cannot run {program}: {e}") },
    };
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let mut stderr = read(&err_path);
    if status.is_none() {
        stderr.push_str(&format!("\n[{program} {args:?} killed after {within:?}]"));
    }
    Out { ok: status.is_some_and(|s| s.success()), stdout: read(&out_path), stderr }
}

fn docker(args: &[&str], within: Duration) -> Out {
    run_cmd("docker", args, &[], within)
}

/// `docker info` works and a compose implementation is there: the compose command, else why not.
fn detect() -> Result<Vec<String>, String> {
    let info = docker(&["info", "--format", "{{.ServerVersion}}"], Duration::from_secs(30));
    if !info.ok {
        return Err(format!("docker info failed: {}", info.text().trim()));
    }
    if docker(&["compose", "version"], Duration::from_secs(30)).ok {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    if run_cmd("docker-compose", &["version"], &[], Duration::from_secs(30)).ok {
        return Ok(vec!["docker-compose".into()]);
    }
    Err("neither `docker compose` nor `docker-compose` works".into())
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a `flotilla-test-<pid>-<n>` project name or `<pid>-<n>` image tag.
fn owner_pid(s: &str) -> Option<u32> {
    s.split('-').next()?.parse().ok()
}

/// Removes the containers, networks, volumes and images of earlier runs whose test process is gone
/// (a run killed by a timeout cannot clean up after itself).
fn remove_stale() {
    let t = Duration::from_secs(60);
    let mut projects: Vec<String> = Vec::new();
    let ps = docker(&["ps", "-a", "--filter", "label=com.docker.compose.project", "--format", "{{.Label \"com.docker.compose.project\"}}"], t);
    let nets = docker(&["network", "ls", "--filter", "label=com.docker.compose.project", "--format", "{{.Label \"com.docker.compose.project\"}}"], t);
    let vols = docker(&["volume", "ls", "--filter", "label=com.docker.compose.project", "--format", "{{.Label \"com.docker.compose.project\"}}"], t);
    for line in ps.stdout.lines().chain(nets.stdout.lines()).chain(vols.stdout.lines()) {
        if let Some(rest) = line.trim().strip_prefix(PROJECT_PREFIX) {
            if owner_pid(rest).is_some_and(|p| !pid_alive(p)) && !projects.iter().any(|p| p == line.trim()) {
                projects.push(line.trim().to_string());
            }
        }
    }
    for p in &projects {
        eprintln!("removing the leftovers of an earlier run: compose project {p}");
        remove_project(p);
    }
    if let Ok(dirs) = std::fs::read_dir(repo_root().join("target/docker")) {
        for d in dirs.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            if name.strip_prefix("test-").and_then(owner_pid).is_some_and(|p| !pid_alive(p)) {
                let _ = std::fs::remove_dir_all(d.path());
            }
        }
    }
    let images = docker(&["images", IMAGE_REPO, "--format", "{{.Tag}}"], t);
    for tag in images.stdout.lines().map(str::trim).filter(|t| owner_pid(t).is_some_and(|p| !pid_alive(p))) {
        eprintln!("removing the leftovers of an earlier run: image {IMAGE_REPO}:{tag}");
        docker(&["rmi", "-f", &format!("{IMAGE_REPO}:{tag}")], t);
    }
}

/// Removes everything docker holds with the compose project's label.
fn remove_project(project: &str) {
    let t = Duration::from_secs(60);
    let label = format!("label=com.docker.compose.project={project}");
    let ids = |args: &[&str]| docker(args, t).stdout.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let containers = ids(&["ps", "-aq", "--filter", &label]);
    if !containers.is_empty() {
        let mut a = vec!["rm", "-f", "-v"];
        a.extend(containers.iter().map(String::as_str));
        docker(&a, t);
    }
    for net in ids(&["network", "ls", "-q", "--filter", &label]) {
        docker(&["network", "rm", &net], t);
    }
    for vol in ids(&["volume", "ls", "-q", "--filter", &label]) {
        docker(&["volume", "rm", "-f", &vol], t);
    }
}

/// What docker still holds for the project: containers, networks and volumes, one per line.
fn project_leftovers(project: &str) -> String {
    let t = Duration::from_secs(60);
    let label = format!("label=com.docker.compose.project={project}");
    let mut left = String::new();
    for kind in [&["ps", "-a"][..], &["network", "ls"][..], &["volume", "ls"][..]] {
        let mut a = kind.to_vec();
        a.extend(["-q", "--filter", &label]);
        let out = docker(&a, t);
        assert!(out.ok, "docker {a:?}: {}", out.text());
        for id in out.stdout.split_whitespace() {
            left.push_str(&format!("{} {id}\n", kind[0]));
        }
    }
    left
}

/// `debian:bookworm-slim`, from `docker/build-base.sh` (debootstrap + docker import) when it is missing.
fn ensure_base_image() {
    if docker(&["image", "inspect", BASE_IMAGE], Duration::from_secs(30)).ok {
        return;
    }
    eprintln!("{BASE_IMAGE} is missing: building it offline with docker/build-base.sh");
    let script = repo_root().join("docker/build-base.sh");
    let out = run_cmd("bash", &[script.to_str().unwrap()], &[], Duration::from_secs(900));
    assert!(out.ok, "docker/build-base.sh failed:\n{}", out.text());
    assert!(docker(&["image", "inspect", BASE_IMAGE], Duration::from_secs(30)).ok, "build-base.sh made no {BASE_IMAGE}");
}

/// Builds the image from docker/Dockerfile with this test's binary. Returns the images of the earlier
/// stages that the classic builder keeps untagged (BuildKit keeps none), for removal with the image.
fn build_image(tag: &str, id: &str) -> Vec<String> {
    let root = repo_root();
    // The dev-profile binary without its debug info (20 MB instead of 380), staged where .dockerignore lets it in.
    let stage = root.join("target/docker").join(format!("test-{id}"));
    std::fs::create_dir_all(&stage).unwrap();
    struct Staged(PathBuf);
    impl Drop for Staged {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _staged = Staged(stage.clone());
    let bin = stage.join("flotilla");
    let strip = run_cmd("objcopy", &["--strip-debug", BIN, bin.to_str().unwrap()], &[], Duration::from_secs(120));
    if !strip.ok {
        eprintln!("objcopy --strip-debug failed ({}); the image gets the binary as it is", strip.text().trim());
        std::fs::copy(BIN, &bin).unwrap();
    }
    let build_arg = format!("BINARY={}", bin.strip_prefix(&root).unwrap().display());
    let dockerfile = root.join("docker/Dockerfile");
    let args = ["build", "-f", dockerfile.to_str().unwrap(), "--build-arg", &build_arg, "-t", tag, root.to_str().unwrap()];
    let out = docker(&args, Duration::from_secs(600));
    assert!(out.ok, "docker {args:?} failed:\n{}", out.text());
    // Classic builder output: "Step 5/19 : FROM ..." starts a stage; the " ---> ID" line before it ends the previous one.
    let mut stages = Vec::new();
    let mut last_id: Option<&str> = None;
    for line in out.stdout.lines() {
        if let Some(id) = line.trim().strip_prefix("---> ").filter(|id| id.len() >= 12 && id.chars().all(|c| c.is_ascii_hexdigit())) {
            last_id = Some(id);
        } else if line.starts_with("Step ") && line.contains(" : FROM ") {
            if let Some(id) = last_id.take() {
                let tags = docker(&["image", "inspect", "--format", "{{len .RepoTags}}", id], Duration::from_secs(30));
                if tags.ok && tags.stdout.trim() == "0" {
                    stages.push(id.to_string());
                }
            }
        }
    }
    stages
}

// ---------------------------------------------------------------------------------------------
// The compose cluster.

/// A compose project of this test; Drop takes it down with its volumes and removes the image, also
/// when the test fails.
struct Compose {
    compose: Vec<String>,
    project: String,
    image: String,
    port: u16,
    env: Vec<(String, String)>,
    /// Container ids by service (they stay the same through kill, start, restart and reconnect).
    ids: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Untagged images of the build's earlier stages.
    stage_images: Vec<String>,
    done: bool,
}

impl Compose {
    fn new(compose: Vec<String>, project: String, image: String) -> Compose {
        let port = free_port();
        let root = repo_root();
        let env = vec![
            ("FLOTILLA_IMAGE".to_string(), image.clone()),
            ("FLOTILLA_HTTP_BIND".to_string(), "127.0.0.1".to_string()),
            ("FLOTILLA_HTTP_PORT".to_string(), port.to_string()),
            ("FLOTILLA_COOKIE".to_string(), DOCKER_COOKIE.to_string()),
            ("FLOTILLA_MODELS".to_string(), root.join("models").display().to_string()),
            ("FLOTILLA_THREADS".to_string(), "1".to_string()),
            ("RUST_LOG".to_string(), "info,ractor_cluster=warn".to_string()),
        ];
        Compose { compose, project, image, port, env, ids: Default::default(), stage_images: Vec::new(), done: false }
    }

    fn run(&self, args: &[&str], within: Duration) -> Out {
        let file = repo_root().join("docker/compose.yaml");
        let mut all: Vec<&str> = self.compose[1..].iter().map(String::as_str).collect();
        all.extend(["-p", &self.project, "-f", file.to_str().unwrap()]);
        all.extend(args);
        run_cmd(&self.compose[0], &all, &self.env, within)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn container(&self, service: &str) -> String {
        if let Some(id) = self.ids.lock().unwrap().get(service) {
            return id.clone();
        }
        let out = self.run(&["ps", "-q", service], Duration::from_secs(60));
        let id = out.stdout.trim().to_string();
        assert!(out.ok && !id.is_empty(), "no container for {service}: {}", out.text());
        self.ids.lock().unwrap().insert(service.to_string(), id.clone());
        id
    }

    fn network(&self) -> String {
        format!("{}_flotilla", self.project)
    }

    fn logs(&self) -> String {
        self.run(&["logs", "--no-color", "--tail", "400"], Duration::from_secs(60)).text()
    }

    /// `flotilla admin status --json` inside node1's container, or None when it failed.
    fn status(&self) -> Option<Value> {
        let node1 = self.container("node1");
        let args = ["exec", &node1, "flotilla", "admin", "--node", "127.0.0.1:7400", "--cookie", DOCKER_COOKIE, "--timeout", "3", "status", "--json"];
        let out = docker(&args, Duration::from_secs(20));
        if !out.ok {
            return None;
        }
        serde_json::from_str(&out.stdout).ok()
    }

    fn wait_status(&self, within: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            if Instant::now() > deadline {
                panic!("{what}: not seen through node1 within {within:?}; last status: {last:#?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (code, body) = http_get(&self.url("/ready"));
            if code == 200 {
                return;
            }
            if Instant::now() > deadline {
                panic!("node1 not ready on {} within {within:?}: {code} {body}", self.url("/ready"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Takes the project down (containers, networks, volumes) and removes the image; returns what
    /// `down` printed when it failed.
    fn teardown(&mut self) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let down = self.run(&["down", "-v", "--remove-orphans", "--timeout", "5"], Duration::from_secs(180));
        // Whatever `down` left (it failed, or timed out) goes by label.
        remove_project(&self.project);
        let mut errors = Vec::new();
        if !down.ok {
            errors.push(format!("down: {}", down.text()));
        }
        for image in std::iter::once(&self.image).chain(&self.stage_images) {
            let r = docker(&["rmi", "-f", image], Duration::from_secs(120));
            if !r.ok && !r.stderr.contains("No such image") {
                errors.push(format!("rmi {image}: {}", r.text()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.done {
            eprintln!("----- compose logs of {} -----\n{}", self.project, self.logs());
        }
        if let Err(e) = self.teardown() {
            eprintln!("teardown of {}: {e}", self.project);
        }
    }
}

/// Sends every case through node1's published port; `fault` runs once `victim` holds at least
/// `min_sequences` sequences. Checks every answer against the single-process engine.
fn under_load(c: &Compose, victim: &str, min_sequences: u64, fault: impl FnOnce(&Compose)) {
    let want = reference();
    let cases = cases();
    let url = c.url("/v1/completions");
    let done = AtomicUsize::new(0);
    let started = Instant::now();
    let results: Vec<(usize, u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, case)| {
                let (done, url) = (&done, &url);
                s.spawn(move || {
                    let (code, v) = http_post(url, &body(case));
                    done.fetch_add(1, Ordering::Relaxed);
                    (i, code, v)
                })
            })
            .collect();
        let s0 = c.wait_status(Duration::from_secs(90), &format!("{min_sequences} sequences on {victim}"), |s| {
            worker(s, victim).is_some_and(|w| w["sequences"].as_u64() >= Some(min_sequences))
        });
        let finished_before = done.load(Ordering::Relaxed);
        eprintln!(
            "[{:>5.1}s] {victim} holds {} sequences, {finished_before} of {REQUESTS} requests finished",
            started.elapsed().as_secs_f64(),
            worker(&s0, victim).unwrap()["sequences"]
        );
        fault(c);
        assert!(finished_before < REQUESTS, "the fault came after the load");
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("[{:>5.1}s] all {REQUESTS} requests answered", started.elapsed().as_secs_f64());
    let mut failures = Vec::new();
    for (i, code, v) in results {
        if code != 200 {
            failures.push(format!("request {i}: HTTP {code}: {v}"));
            continue;
        }
        let ids: Vec<u32> =
            v["choices"][0]["token_ids"].as_array().map(|a| a.iter().filter_map(|t| t.as_u64()).map(|t| t as u32).collect()).unwrap_or_default();
        if ids != want[i] {
            failures.push(format!("request {i} differs:\n  got  {ids:?}\n  want {:?}", want[i]));
        }
    }
    assert!(failures.is_empty(), "{} of {REQUESTS} requests went wrong:\n{}", failures.len(), failures.join("\n"));
}

fn step(t0: Instant, what: &str) {
    eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
}

#[test]
fn compose_cluster_survives_kill_partition_and_restart() {
    let compose = match detect() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipped: docker not available ({why})");
            return;
        }
    };
    let t0 = Instant::now();
    reference();
    remove_stale();
    ensure_base_image();
    step(t0, "base image ready");

    let id = format!("{}-{}", std::process::id(), unix_ms());
    let mut c = Compose::new(compose, format!("{PROJECT_PREFIX}{id}"), format!("{IMAGE_REPO}:{id}"));
    c.stage_images = build_image(&c.image, &id);
    step(t0, &format!("built {}", c.image));
    // The image runs as a non-root user, with the health check on /ready.
    let cfg = docker(&["image", "inspect", "--format", "{{.Config.User}} {{json .Config.Healthcheck.Test}}", &c.image], Duration::from_secs(30));
    assert!(cfg.ok && cfg.stdout.starts_with("flotilla"), "image user: {}", cfg.text());
    assert!(cfg.stdout.contains("/ready"), "image health check: {}", cfg.text());

    let up = c.run(&["up", "-d", "--no-build"], Duration::from_secs(300));
    assert!(up.ok, "compose up failed:\n{}", up.text());
    let ps = c.run(&["ps", "--services", "--filter", "status=running"], Duration::from_secs(60));
    let mut running: Vec<&str> = ps.stdout.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    running.sort();
    assert_eq!(running, ["node1", "node2", "node3"], "plain `up` starts the three nodes (monitoring is a profile): {}", ps.text());
    c.wait_ready(Duration::from_secs(180));
    c.wait_status(Duration::from_secs(120), "node1..3 up, one replica on each", serving);
    step(t0, "cluster of 3 containers serving");
    // The container health check (flotilla health on /ready) passes.
    let node1 = c.container("node1");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = docker(&["inspect", "--format", "{{.State.Health.Status}}", &node1], Duration::from_secs(30));
        if h.stdout.trim() == "healthy" {
            break;
        }
        assert!(Instant::now() < deadline, "node1's health check: {}", h.text());
        std::thread::sleep(Duration::from_millis(500));
    }

    // 1. A real partition: node3 loses its network while it holds sequences.
    let node3 = c.container("node3");
    let net = c.network();
    let cut_at = std::cell::Cell::new(None);
    under_load(&c, "node3", 4, |c| {
        let out = docker(&["network", "disconnect", &net, &node3], Duration::from_secs(60));
        assert!(out.ok, "network disconnect: {}", out.text());
        cut_at.set(Some(Instant::now()));
        // Marked down, and its layers placed without it.
        c.wait_status(Duration::from_secs(30), "node3 marked down and out of the placement", |s| {
            state_of(s, "node3").as_deref() == Some("down") && replicas(s) == 2 && !holds_layers(s, "node3")
        });
        step(t0, "node3 is cut off and marked down");
    });
    // Partitioned for a few seconds at least, then back on the network under its service name.
    if let Some(left) = Duration::from_secs(5).checked_sub(cut_at.get().unwrap().elapsed()) {
        std::thread::sleep(left);
    }
    let s = c.status().expect("status through node1");
    assert_eq!(state_of(&s, "node3").as_deref(), Some("down"), "node3 is still partitioned: {:#}", s["members"]);
    let out = docker(&["network", "connect", "--alias", "node3", &net, &node3], Duration::from_secs(60));
    assert!(out.ok, "network connect: {}", out.text());
    c.wait_status(Duration::from_secs(60), "node3 rejoined after the partition", serving);
    step(t0, "node3 reconnected and serving again");

    // 2. docker kill (SIGKILL) of node2 while it holds sequences.
    let node2 = c.container("node2");
    under_load(&c, "node2", 4, |_| {
        let out = docker(&["kill", &node2], Duration::from_secs(60));
        assert!(out.ok, "docker kill: {}", out.text());
        step(t0, "node2 killed");
    });
    c.wait_status(Duration::from_secs(30), "node2 marked down and out of the placement", |s| {
        state_of(s, "node2").as_deref() == Some("down") && replicas(s) == 2 && !holds_layers(s, "node2")
    });
    let out = docker(&["start", &node2], Duration::from_secs(60));
    assert!(out.ok, "docker start: {}", out.text());
    c.wait_status(Duration::from_secs(90), "node2 rejoined after kill and start", serving);
    step(t0, "node2 started again and serving");

    // 3. docker restart (SIGTERM: a clean leave, then a new start) of node3.
    let before_restart = unix_ms();
    let incarnation = incarnation_of(&c.status().expect("status through node1"), "node3");
    let out = docker(&["restart", "--time", "15", &node3], Duration::from_secs(120));
    assert!(out.ok, "docker restart: {}", out.text());
    let s = c.wait_status(Duration::from_secs(90), "node3 rejoined after docker restart", serving);
    let gone = event_at(&s, "node3", "left", before_restart).or_else(|| event_at(&s, "node3", "down", before_restart));
    assert!(gone.is_some(), "no event shows node3 leaving for the restart: {:#}", s["events"]);
    assert!(incarnation_of(&s, "node3") > incarnation, "node3 came back as a new incarnation: {:#}", s["members"]);
    step(t0, "node3 restarted and serving");
    // The restarted node takes work again: it holds sequences under the next load, and every answer is right.
    under_load(&c, "node3", 2, |_| {});
    step(t0, "load after the restart answered identically");

    let project = c.project.clone();
    let images: Vec<String> = std::iter::once(c.image.clone()).chain(c.stage_images.clone()).collect();
    c.teardown().unwrap_or_else(|e| panic!("teardown: {e}"));
    let left = project_leftovers(&project);
    assert!(left.is_empty(), "compose down left behind:\n{left}");
    for image in images {
        assert!(!docker(&["image", "inspect", &image], Duration::from_secs(30)).ok, "{image} was not removed");
    }
    step(t0, "torn down: no containers, networks, volumes or image left");
}
