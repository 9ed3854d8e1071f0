//! The OpenAI-compatible API as clients meet it: bad input, API keys, cancellation, a real OpenAI
//! client library (Python's `openai`) whose answers must equal `flotilla generate`, and `flotilla bench
//! load`, the load generator operators point at it.
// `[0..n]`: a list of shard ranges that holds one shard (the whole model)
#![allow(clippy::single_range_in_vec_init)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// Sends raw bytes as an HTTP/1.1 POST and returns (status, body).
fn raw_post(addr: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body); // the server may answer 413 and close before reading it all
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[test]
fn bad_input_gets_clear_errors_and_good_requests_still_succeed() {
    let c = Cluster::start_with(1, &[("FLOTILLA__HTTP__MAX_BODY_BYTES", "1048576")], None);
    c.wait_ready(0, Duration::from_secs(30));
    let addr = c.nodes[0].http.clone();
    let long_prompt = "hello ".repeat(400); // the synthetic model's context is 256 tokens
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("malformed JSON", "/v1/completions", br#"{"prompt": "x","#.to_vec(), 400, "invalid request body"),
        ("wrong type", "/v1/completions", br#"{"prompt": 5}"#.to_vec(), 400, "invalid request body"),
        ("negative max_tokens", "/v1/completions", br#"{"prompt": "x", "max_tokens": -1}"#.to_vec(), 400, "max_tokens"),
        ("huge max_tokens", "/v1/completions", br#"{"prompt": "x", "max_tokens": 1000000000000}"#.to_vec(), 400, "max_tokens"),
        ("zero max_tokens", "/v1/completions", br#"{"prompt": "x", "max_tokens": 0}"#.to_vec(), 400, "max_tokens"),
        ("negative temperature", "/v1/completions", br#"{"prompt": "x", "temperature": -1}"#.to_vec(), 400, "temperature"),
        ("top_p above 1", "/v1/completions", br#"{"prompt": "x", "top_p": 1.5}"#.to_vec(), 400, "top_p"),
        ("unknown field", "/v1/completions", br#"{"prompt": "x", "colour": "red"}"#.to_vec(), 400, "unknown field `colour`"),
        ("n = 2", "/v1/completions", br#"{"prompt": "x", "n": 2}"#.to_vec(), 400, "n = 1"),
        ("token id outside the vocabulary", "/v1/completions", br#"{"prompt": [1, 99999999]}"#.to_vec(), 400, "outside the vocabulary"),
        ("invalid UTF-8", "/v1/completions", b"{\"prompt\": \"\xff\xfe\"}".to_vec(), 400, "invalid request body"),
        ("unknown model", "/v1/completions", br#"{"prompt": "x", "model": "gpt-17"}"#.to_vec(), 404, "not served here"),
        ("prompt over the context", "/v1/completions", json!({ "prompt": long_prompt }).to_string().into_bytes(), 400, "context window"),
        ("empty messages", "/v1/chat/completions", br#"{"messages": []}"#.to_vec(), 400, "at least one message"),
        ("bad role", "/v1/chat/completions", br#"{"messages": [{"role": "wizard", "content": "hi"}]}"#.to_vec(), 400, "role"),
        ("missing messages", "/v1/chat/completions", br#"{"model": "x"}"#.to_vec(), 400, "messages"),
        ("unknown route", "/v1/embeddings", br#"{}"#.to_vec(), 404, "no such route"),
        ("10 MB body", "/v1/completions", vec![b' '; 10 << 20], 413, "larger than"),
    ];
    // Good requests run alongside the bad ones.
    std::thread::scope(|s| {
        let good: Vec<_> = (0..4)
            .map(|i| {
                let c = &c;
                s.spawn(move || c.post(0, "/v1/completions", &json!({ "prompt": format!("good {i}"), "max_tokens": 8, "temperature": 0 })))
            })
            .collect();
        for (what, path, body, status, needle) in &cases {
            let (code, text) = raw_post(&addr, path, body);
            assert_eq!(code, *status, "{what}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
            let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{what}: no error.message: {v}"));
            assert!(msg.contains(needle) || v["error"]["param"] == *needle, "{what}: {v}");
            assert!(v["error"]["type"].is_string(), "{what}: {v}");
        }
        for g in good {
            let (code, v, _) = g.join().unwrap();
            assert_eq!(code, 200, "{v}");
            assert!(v["choices"][0]["finish_reason"].as_str().is_some(), "{v}");
        }
    });
    let (code, _) = c.get(0, "/v1/completions");
    assert_eq!(code, 405);
    let (code, v, _) = c.post(0, "/v1/chat/completions", &json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 4 }));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
}

#[test]
fn api_keys_are_required_when_configured() {
    let c = Cluster::start_with(1, &[("FLOTILLA__HTTP__API_KEYS", "k1,k2")], None);
    let url = format!("http://{}", c.nodes[0].http);
    c.wait_ready(0, Duration::from_secs(30));
    let (code, _) = c.get(0, "/health");
    assert_eq!(code, 200, "health needs no key");
    let body = json!({ "prompt": "hi", "max_tokens": 2 }).to_string();
    for auth in [None, Some("Bearer nope"), Some("k1")] {
        let mut r = ureq::post(&format!("{url}/v1/completions")).set("Content-Type", "application/json");
        if let Some(a) = auth {
            r = r.set("Authorization", a);
        }
        match r.send_string(&body) {
            Err(ureq::Error::Status(401, resp)) => {
                let v: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
                assert!(v["error"]["message"].as_str().unwrap().contains("API key"), "{v}");
            }
            other => panic!("{auth:?}: expected 401, got {other:?}"),
        }
    }
    for key in ["k1", "k2"] {
        let r = ureq::post(&format!("{url}/v1/completions")).set("Authorization", &format!("Bearer {key}")).send_string(&body).unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = ureq::get(&format!("{url}/v1/models")).set("Authorization", "Bearer k2").call().unwrap();
    assert_eq!(r.status(), 200);
}

/// `flotilla bench load` as an operator runs it against a node: every request counted, exactly
/// `--max-tokens` generated by each (`ignore_eos`), latencies reported; a node that is not there gives
/// errors in the report rather than a crash, and bad arguments a clear message.
#[test]
fn bench_load_measures_a_node_and_reports_what_failed() {
    let c = Cluster::start_with(1, &[], None);
    c.wait_ready(0, Duration::from_secs(30));
    let load = |url: &str, extra: &[&str]| {
        Command::new(BIN)
            .args(["bench", "load", "--url", url, "--requests", "6", "--concurrency", "3", "--max-tokens", "5", "--timeout", "60"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = load(&format!("http://{}", c.nodes[0].http), &["--json"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), c.logs());
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r["completed"].as_u64(), r["errors"].as_u64(), r["generated_tokens"].as_u64()), (Some(6), Some(0), Some(30)), "{r}");
    assert!(r["generated_tok_s"].as_f64().unwrap() > 0.0, "{r}");
    let (p50, p99) = (r["ttft_p50_s"].as_f64().unwrap(), r["ttft_p99_s"].as_f64().unwrap());
    assert!(p50 > 0.0 && p50 <= p99, "{r}");
    assert!(r["itl_p50_s"].as_f64().unwrap() >= 0.0 && r.get("first_error").is_none(), "{r}");
    // the text report says the same in one line
    let out = load(&format!("http://{}", c.nodes[0].http), &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("6 requests (0 errors) at concurrency 3"), "{text}");

    // nobody listening: every request an error, the first one reported
    let out = load(&format!("http://127.0.0.1:{}", free_port()), &["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r["completed"].as_u64(), r["errors"].as_u64()), (Some(0), Some(6)), "{r}");
    assert!(!r["first_error"].as_str().unwrap().is_empty(), "{r}");

    for zero in ["--requests", "--concurrency"] {
        let out = Command::new(BIN).args(["bench", "load", "--url", "http://127.0.0.1:1", zero, "0"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("must be at least 1") && !err.contains("panicked"), "{zero}: {err}");
    }
}

/// Reads `n` SSE data lines of a streamed request, then drops the connection.
fn stream_and_drop(url: &str, body: &Value, n: usize) {
    let resp = ureq::post(url).send_json(body.clone()).unwrap();
    let mut lines = BufReader::new(resp.into_reader()).lines();
    let mut got = 0;
    while got < n {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("data: ") => got += 1,
            Some(Ok(_)) => {}
            _ => panic!("the stream ended before {n} chunks"),
        }
    }
}

/// Token ids of a whole streamed answer (the final chunk carries them).
fn stream_ids(url: &str, body: &Value) -> Vec<u32> {
    let resp = ureq::post(url).send_json(body.clone()).unwrap();
    let mut ids = None;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        let Some(d) = line.strip_prefix("data: ") else { continue };
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(d).unwrap();
        if let Some(t) = v["choices"][0]["token_ids"].as_array() {
            ids = Some(t.iter().map(|x| x.as_u64().unwrap() as u32).collect());
        }
    }
    ids.expect("a final chunk with token_ids")
}

#[test]
fn dropped_streams_free_their_caches_on_every_stage() {
    let c = Cluster::start_with(3, &[("FLOTILLA__PARALLELISM__REPLICAS", "1")], Some(&model_path()));
    for i in 0..3 {
        c.wait_ready(i, Duration::from_secs(60));
    }
    c.wait_status(0, Duration::from_secs(30), "one 3-stage pipeline loaded", |s| {
        s["scheduler"]["ready"] == true && s["scheduler"]["placement"]["replicas"][0].as_array().map(|r| r.len()) == Some(3)
    });
    // What the kept streams must produce: the single-process engine's tokens.
    let mut model = flotilla_engine::Model::open(model_path()).unwrap();
    let layers = model.config().n_layers;
    let pipeline = flotilla_engine::Pipeline::new(model.load_shards(&[0..layers]).unwrap()).unwrap();
    let prompts: Vec<String> = (0..8).map(|i| format!("Story number {i}:")).collect();
    let params = flotilla_engine::SamplingParams { max_tokens: 48, ignore_eos: true, ..Default::default() };
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| pipeline.generate(model.tokenizer(), &model.tokenizer().encode(p, true).unwrap(), &params, |_| {}).unwrap().output_token_ids)
        .collect();
    let url = format!("http://{}/v1/completions", c.nodes[0].http);
    std::thread::scope(|s| {
        let dropped: Vec<_> = (0..8)
            .map(|i| {
                let url = url.clone();
                s.spawn(move || {
                    let body =
                        json!({ "prompt": format!("Dropped story {i}:"), "max_tokens": 400, "temperature": 0, "stream": true, "ignore_eos": true });
                    stream_and_drop(&url, &body, 3);
                })
            })
            .collect();
        let kept: Vec<_> = prompts
            .iter()
            .map(|p| {
                let url = url.clone();
                s.spawn(move || {
                    let body =
                        json!({ "prompt": p, "max_tokens": 48, "temperature": 0, "stream": true, "ignore_eos": true, "return_token_ids": true });
                    stream_ids(&url, &body)
                })
            })
            .collect();
        for d in dropped {
            d.join().unwrap();
        }
        let dropped_at = Instant::now();
        for (i, k) in kept.into_iter().enumerate() {
            assert_eq!(k.join().unwrap(), want[i], "kept stream {i}");
        }
        // Every stage lets go of every sequence: the dropped ones at their next token, the others when done.
        let s = c.wait_status(0, Duration::from_secs(5), "no sequences left on any stage", |s| {
            s["workers"].as_array().is_some_and(|w| w.len() == 3 && w.iter().all(|w| w["sequences"] == 0))
        });
        eprintln!("caches freed {:?} after the drops: {}", dropped_at.elapsed(), s["workers"]);
    });
    // The dropped requests did not run to their 400 tokens.
    let s = c.status(0).unwrap();
    let batches: u64 = s["workers"].as_array().unwrap().iter().map(|w| w["batches"].as_u64().unwrap()).max().unwrap();
    assert!(batches < 300, "dropped streams kept generating: {batches} batches on one stage");
}

#[test]
fn the_openai_python_client_gets_what_flotilla_generate_gives() {
    let have = Command::new("python3").args(["-c", "import openai"]).status().map(|s| s.success()).unwrap_or(false);
    assert!(have, "Python's openai package is missing: pip install -r tests/requirements-api.txt (make test does)");
    let c = Cluster::start_with(2, &[], Some(&model_path()));
    for i in 0..2 {
        c.wait_ready(i, Duration::from_secs(60));
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/openai_client.py");
    let out = Command::new("python3").arg(&script).arg(format!("http://{}/v1", c.nodes[1].http)).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let generate = |args: &[&str]| -> String {
        let out = Command::new(BIN).arg("generate").arg("--model").arg(model_path()).args(args).args(["--json", "--threads", "1"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["text"].as_str().unwrap().to_string()
    };
    let chat = generate(&["--chat", "--prompt", "Name a colour.", "--max-tokens", "12"]);
    let text = generate(&["--prompt", "The capital of France is", "--max-tokens", "12"]);
    assert_eq!(got["chat"], chat.as_str(), "{got:#}");
    assert_eq!(got["chat_stream"], chat.as_str(), "{got:#}");
    assert_eq!(got["completion"], text.as_str(), "{got:#}");
    assert_eq!(got["completion_stream"], text.as_str(), "{got:#}");
    assert_eq!(got["models"], json!(["SmolLM2-135M-Instruct.Q4_1"]));
    assert_eq!(got["usage_completion_tokens"], 12);
}
