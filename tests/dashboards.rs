//! The Grafana dashboards against a real Prometheus scraping a real 3-node cluster: every panel query
//! must parse and return at least one series. Also checks the dashboards' structure and runs
//! `promtool check metrics` on every node's `/metrics`.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

fn dashboards() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dashboards");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            out.push((p.file_name().unwrap().to_string_lossy().to_string(), serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()));
        }
    }
    assert_eq!(out.len(), 3, "overview, cluster and node dashboards");
    out
}

#[test]
fn dashboards_are_valid_grafana_json() {
    for (name, d) in dashboards() {
        assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 30), "{name}: schemaVersion");
        assert!(d["uid"].is_string() && d["title"].is_string(), "{name}: uid and title");
        let vars: Vec<&str> = d["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
        assert!(vars.contains(&"datasource") && vars.contains(&"node"), "{name}: variables {vars:?}");
        let panels = d["panels"].as_array().unwrap();
        assert!(!panels.is_empty(), "{name}: no panels");
        let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
        assert_eq!(ids.len(), panels.len(), "{name}: panel ids are unique");
        for p in panels {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{name}: panel {} uses the datasource variable", p["title"]);
            assert!(p["gridPos"]["w"].as_u64().is_some(), "{name}: panel {} has a position", p["title"]);
            for t in p["targets"].as_array().unwrap() {
                assert!(t["expr"].as_str().is_some_and(|e| e.contains("flotilla_")), "{name}: {t}");
                assert_eq!(t["datasource"]["uid"], "${datasource}");
            }
        }
    }
}

struct Prom(Child);

impl Drop for Prom {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_panel_query_returns_series_from_a_real_prometheus() {
    let have = |b: &str| Command::new(b).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    assert!(have("prometheus") && have("promtool"), "prometheus and promtool are missing: apt-get install prometheus (.ci/run does)");
    let c = Cluster::start(3, &[("FLOTILLA__PARALLELISM__REPLICAS", "1")]);
    for i in 0..3 {
        c.wait_ready(i, Duration::from_secs(30));
    }
    c.wait_status(0, Duration::from_secs(30), "one 3-stage pipeline loaded", |s| {
        s["scheduler"]["ready"] == true && s["scheduler"]["placement"]["replicas"][0].as_array().map(|r| r.len()) == Some(3)
    });
    // Prometheus scraping the three nodes every second.
    let port = free_port();
    let targets: Vec<String> = c.nodes.iter().map(|n| format!("\"{}\"", n.http)).collect();
    let cfg = c.dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: flotilla\n    static_configs:\n      - targets: [{}]\n", targets.join(", ")),
    )
    .unwrap();
    let log = std::fs::File::create(c.dir.path().join("prometheus.log")).unwrap();
    let _prom = Prom(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", c.dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // Some load, a bad request and a cancelled-free run of requests.
    for i in 0..6 {
        let (code, v, _) = c.post(i % 3, "/v1/completions", &json!({ "prompt": format!("load {i}"), "max_tokens": 8, "ignore_eos": true }));
        assert_eq!(code, 200, "{v}");
    }
    let api = format!("http://127.0.0.1:{port}/api/v1/query");
    let query = |expr: &str| -> Option<Value> {
        let r = ureq::get(&api).query("query", expr).timeout(Duration::from_secs(5)).call().ok()?;
        r.into_json::<Value>().ok()
    };
    // Wait until every node has been scraped a few times.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = query("count(count_over_time(up{job=\"flotilla\"}[1m]) >= 4)")
            .and_then(|v| v["data"]["result"][0]["value"][1].as_str().map(String::from));
        if up.as_deref() == Some("3") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the 3 nodes: {up:?}\n{}",
            std::fs::read_to_string(c.dir.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for i in 0..3 {
        let (code, v, _) = c.post(i, "/v1/completions", &json!({ "prompt": format!("more {i}"), "max_tokens": 4 }));
        assert_eq!(code, 200, "{v}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut empty = Vec::new();
    let mut checked = 0;
    for (name, d) in dashboards() {
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap().replace("$node", ".*");
                let v = query(&expr).unwrap_or_else(|| panic!("{name}: {expr}: no answer"));
                assert_eq!(v["status"], "success", "{name} / {}: {expr}: {v}", p["title"]);
                if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                    empty.push(format!("{name} / {}: {expr}", p["title"]));
                }
                checked += 1;
            }
        }
    }
    assert!(empty.is_empty(), "queries without a series:\n{}", empty.join("\n"));
    assert!(checked >= 25, "{checked} queries");
    // promtool on each node's exposition.
    for i in 0..3 {
        let (_, text) = c.get(i, "/metrics");
        let mut child =
            Command::new("promtool").args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "promtool on node{}: {said}", i + 1);
    }
}
