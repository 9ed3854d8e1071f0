//! `flotilla bench engine` as a user runs it: the JSON report, the text report, and clear errors for bad
//! input. Speed itself is measured, not asserted (BENCHMARKS.md).

mod common;

use common::flotilla;

/// `bench engine` on `model` with `extra`, and short runs for the options `extra` leaves out.
fn bench(model: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let short = [("--prompt-tokens", "8"), ("--gen-tokens", "4"), ("--runs", "2")];
    let mut cmd = flotilla();
    cmd.args(["bench", "engine", "--model"]).arg(model);
    for (flag, value) in short.into_iter().filter(|(flag, _)| !extra.contains(flag)) {
        cmd.args([flag, value]);
    }
    cmd.args(extra).output().unwrap()
}

fn rate(report: &serde_json::Value, key: &str) -> f64 {
    let r = report[key].as_f64().unwrap_or_else(|| panic!("no number {key} in {report}"));
    assert!(r.is_finite() && r > 0.0, "{key} = {r}");
    r
}

/// `a` and `b` equal but for the last bits that a trip through JSON text may change.
fn same(a: f64, b: f64, report: &serde_json::Value) {
    assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} against {b} in {report}");
}

#[test]
fn json_report_has_the_throughputs_and_the_setup() {
    let (_d, p) = common::model(3);
    for threads in ["1", "2"] {
        let out = bench(&p, &["--threads", threads, "--batch", "3", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for key in ["prefill_tok_s", "decode_tok_s", "batch_decode_tok_s", "batch_over_decode"] {
            rate(&report, key);
        }
        assert!(report.get("vs_threads").is_none(), "{report}");
        assert_eq!(report["threads"].as_u64(), Some(threads.parse().unwrap()), "{report}");
        assert_eq!(report["thread_shares"].as_array().map(Vec::len), Some(threads.parse().unwrap()), "{report}");
        assert_eq!((report["batch"].as_u64(), report["runs"].as_u64()), (Some(3), Some(2)), "{report}");
        assert_eq!((report["prompt_tokens"].as_u64(), report["gen_tokens"].as_u64()), (Some(8), Some(4)), "{report}");
        assert!(!report["kernel"].as_str().unwrap().is_empty());
    }
    // without --batch, no batched figure
    let out = bench(&p, &["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rate(&report, "decode_tok_s");
    assert!(report.get("batch_decode_tok_s").is_none(), "{report}");
    assert!(report.get("batch_over_decode").is_none(), "{report}");
}

#[test]
fn vs_threads_reports_the_second_thread_count_and_its_speedups() {
    let (_d, p) = common::model(3);
    let out = bench(&p, &["--threads", "1", "--vs-threads", "2", "--batch", "3", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["threads"].as_u64(), Some(1), "{report}");
    rate(&report, "decode_tok_s");
    let vs = &report["vs_threads"];
    assert_eq!(vs["threads"].as_u64(), Some(2), "{report}");
    assert_eq!(vs["thread_shares"].as_array().map(Vec::len), Some(2), "{report}");
    let keys =
        ["prefill_tok_s", "decode_tok_s", "batch_decode_tok_s", "batch_over_decode", "prefill_speedup", "decode_speedup", "batch_decode_speedup"];
    for key in keys {
        rate(vs, key);
    }
    // with one timed run each median is that run's figure, so every ratio is the figures' own
    let out = bench(&p, &["--threads", "1", "--vs-threads", "2", "--batch", "3", "--runs", "1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vs = &report["vs_threads"];
    for (what, ratio) in [("prefill_tok_s", "prefill_speedup"), ("decode_tok_s", "decode_speedup"), ("batch_decode_tok_s", "batch_decode_speedup")] {
        same(rate(vs, ratio), rate(vs, what) / rate(&report, what), &report);
    }
    for r in [&report, vs] {
        same(rate(r, "batch_over_decode"), rate(r, "batch_decode_tok_s") / rate(r, "decode_tok_s"), &report);
    }
    // without --batch, no batched figures for either thread count
    let out = bench(&p, &["--vs-threads", "2", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rate(&report["vs_threads"], "decode_speedup");
    for key in ["batch_decode_tok_s", "batch_over_decode", "batch_decode_speedup"] {
        assert!(report["vs_threads"].get(key).is_none(), "{key} in {report}");
    }
    // the text report
    let out = bench(&p, &["--vs-threads", "2", "--batch", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in ["threads 1", "with 2 threads, each run beside one with 1:", "prefill: ", "decode:  ", "batched decode: ", "learnt shares"] {
        assert!(text.contains(needle), "{needle:?} not in {text:?}");
    }
}

#[test]
fn trace_says_where_each_pool_of_several_threads_spent_its_steps() {
    let (_d, p) = common::model(3);
    let out = bench(&p, &["--threads", "1", "--vs-threads", "2", "--trace", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // the report on standard output stays one JSON object
    let _: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("trace, --threads 1"), "a pool of one thread runs no parallel region: {err}");
    let prefill = err.find("trace, --vs-threads 2: prefill of 8 tokens\n").unwrap_or_else(|| panic!("no prefill trace in {err}"));
    let decode = err.find("trace, --vs-threads 2: 4 decode steps\n").unwrap_or_else(|| panic!("no decode trace in {err}"));
    assert!(prefill < decode, "{err}");
    for part in [&err[prefill..decode], &err[decode..]] {
        assert!(part.contains("us a step, ") && part.contains("% of it outside the parallel regions."), "{part}");
    }
    // the decode steps' matmuls split their tiles between the two threads
    assert!(err[decode..].contains(" units:"), "{err}");
    assert!(!err.contains("batched decode steps"), "no batch asked for: {err}");
    // with --batch, the batched steps too (32 sequences on two threads: one region a step, each thread
    // its own sequences, unless the learnt shares are too uneven for that)
    let out = bench(&p, &["--threads", "1", "--vs-threads", "2", "--batch", "32", "--trace"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    let at = err.find("trace, --vs-threads 2: 4 batched decode steps of 32 sequences\n").unwrap_or_else(|| panic!("no batched trace in {err}"));
    let batched = &err[at..];
    assert!(err.find("trace, --vs-threads 2: 4 decode steps\n").is_some_and(|d| d < at), "{err}");
    assert!(batched.contains("% of it outside the parallel regions.") && batched.contains(" units:"), "{batched}");
}

#[test]
fn text_report_names_each_measurement() {
    let (_d, p) = common::model(3);
    let out = bench(&p, &["--batch", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in ["threads 1", "prefill (8 tokens):", "decode  (4 tokens):", "batched decode (2 sequences):", "x single-stream"] {
        assert!(text.contains(needle), "{needle:?} not in {text:?}");
    }
}

#[test]
fn bad_input_exits_non_zero_with_a_clear_message() {
    let (d, p) = common::model(3);
    let junk = d.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not a model").unwrap();
    let cases: Vec<(&std::path::Path, Vec<&str>, &str)> = vec![
        (std::path::Path::new("/no/such/file.gguf"), vec![], "cannot open model file"),
        (&junk, vec![], "not a GGUF file"),
        (&p, vec!["--runs", "0"], "must be at least 1"),
        (&p, vec!["--gen-tokens", "0"], "must be at least 1"),
        (&p, vec!["--batch", "0"], "--batch must be at least 1"),
        (&p, vec!["--threads", "many"], "invalid value"),
        (&p, vec!["--vs-threads", "two"], "invalid value"),
    ];
    for (model, extra, needle) in cases {
        let out = bench(model, &extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} should fail");
        assert!(err.contains(needle), "{extra:?}: stderr {err:?} should mention {needle:?}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
