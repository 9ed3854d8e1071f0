//! `/metrics` on real nodes: the text format parses, counters equal what was served, membership and
//! failover show up.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;
use support::*;

/// The value of the first sample of `name` whose labels contain every `key="value"` of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))).then(|| value.parse().ok()).flatten()
    })
}

fn metrics(c: &Cluster, i: usize) -> String {
    let (code, text) = c.get(i, "/metrics");
    assert_eq!(code, 200, "{text}");
    text
}

#[test]
fn counters_equal_what_was_served_and_the_format_parses() {
    let c = Cluster::start(1, &[]);
    c.wait_ready(0, Duration::from_secs(30));
    let mut prompt_tokens = 0;
    let mut generated = 0;
    for i in 0..5u64 {
        let (code, v, _) =
            c.post(0, "/v1/completions", &json!({ "prompt": format!("request {i}"), "max_tokens": 3 + i, "ignore_eos": true, "seed": i }));
        assert_eq!(code, 200, "{v}");
        prompt_tokens += v["usage"]["prompt_tokens"].as_u64().unwrap();
        generated += v["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(generated, 3 + 4 + 5 + 6 + 7);
    let (code, _, _) = c.post(0, "/v1/completions", &json!({ "prompt": "x", "temperature": -1 }));
    assert_eq!(code, 400);
    let text = metrics(&c, 0);
    // Every sample line is `name{labels} value` with a number, and carries the node and model labels.
    for l in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l:?}"));
        assert!(value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value), "bad value in {l:?}");
        assert!(series.starts_with("flotilla_"), "{l}");
        assert!(series.contains("node=\"node1\"") && series.contains("model=\"tiny\""), "{l}");
    }
    assert!(text.contains("# HELP flotilla_time_to_first_token_seconds"), "{text}");
    assert!(text.contains("# TYPE flotilla_inter_token_latency_seconds histogram"), "{text}");
    assert_eq!(sample(&text, "flotilla_request_success_total", &[("finished_reason", "length")]), Some(5.0), "{text}");
    assert_eq!(sample(&text, "flotilla_generation_tokens_total", &[]), Some(generated as f64));
    assert_eq!(sample(&text, "flotilla_prompt_tokens_total", &[]), Some(prompt_tokens as f64));
    assert_eq!(sample(&text, "flotilla_time_to_first_token_seconds_count", &[]), Some(5.0));
    assert_eq!(sample(&text, "flotilla_inter_token_latency_seconds_count", &[]), Some((generated - 5) as f64));
    assert_eq!(sample(&text, "flotilla_num_requests_running", &[]), Some(0.0));
    assert_eq!(sample(&text, "flotilla_is_leader", &[]), Some(1.0));
    assert_eq!(sample(&text, "flotilla_cluster_replicas", &[]), Some(1.0));
    assert_eq!(sample(&text, "flotilla_layers_held", &[]), Some(4.0));
    assert!(sample(&text, "flotilla_batch_size_count", &[]).unwrap() >= generated as f64, "{text}");
    // A 400 is rejected before a request starts: it is not a served request.
    assert_eq!(sample(&text, "flotilla_request_failures_total", &[("reason", "invalid")]), Some(0.0));
    // promtool, where installed (.ci/run installs Debian's prometheus package), checks the exposition.
    if let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let problems = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !problems.contains("error"), "promtool: {problems}");
    }
}

#[test]
fn a_killed_node_and_a_resumed_request_show_up() {
    let c = Cluster::start_with(3, &[], Some(&model_path()));
    for i in 0..3 {
        c.wait_ready(i, Duration::from_secs(60));
    }
    c.wait_status(0, Duration::from_secs(30), "3 replicas loaded", |s| {
        s["scheduler"]["ready"] == true && s["scheduler"]["placement"]["replicas"].as_array().map(|r| r.len()) == Some(3)
    });
    std::thread::scope(|s| {
        // Requests owned by node1; those on node2's or node3's replica must resume when it dies.
        let reqs: Vec<_> = (0..6)
            .map(|i| {
                let c = &c;
                s.spawn(move || {
                    c.post(
                        0,
                        "/v1/completions",
                        &json!({ "prompt": format!("Long story {i}"), "max_tokens": 200, "ignore_eos": true, "temperature": 0 }),
                    )
                })
            })
            .collect();
        let st = c.wait_status(0, Duration::from_secs(30), "work on node3", |s| {
            s["workers"].as_array().is_some_and(|w| w.iter().any(|w| w["node"] == "node3" && w["sequences"].as_u64() > Some(0)))
        });
        let _ = st;
        c.get_node("node3").signal(Signal::SIGKILL);
        for r in reqs {
            let (code, v, _) = r.join().unwrap();
            assert_eq!(code, 200, "{v}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics(&c, 0);
        let down = sample(&text, "flotilla_cluster_nodes", &[("state", "down")]);
        let up = sample(&text, "flotilla_cluster_nodes", &[("state", "up")]);
        let resumed = sample(&text, "flotilla_requests_resumed_total", &[]).unwrap_or(0.0);
        if down == Some(1.0) && up == Some(2.0) && resumed >= 1.0 {
            assert_eq!(sample(&text, "flotilla_request_success_total", &[("finished_reason", "length")]), Some(6.0));
            break;
        }
        assert!(Instant::now() < deadline, "down {down:?} up {up:?} resumed {resumed}:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
