//! `flotilla generate` as a user runs it: streaming text, --json, --stages, and clear errors.

mod common;

use common::flotilla;

fn json_run(path: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let out = flotilla()
        .args(["generate", "--model"])
        .arg(path)
        .args(["--prompt", "the cat", "--max-tokens", "12", "--json"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn json_output_has_ids_text_and_timings_and_is_split_invariant() {
    let (_d, p) = common::model(5);
    let one = json_run(&p, &[]);
    for key in ["prompt_token_ids", "output_token_ids", "text", "timings"] {
        assert!(one.get(key).is_some(), "missing {key} in {one}");
    }
    assert!(one["timings"]["decode_tok_s"].as_f64().unwrap() > 0.0);
    for extra in [&["--stages", "3"][..], &["--stages", "5"], &["--split", "1,4"], &["--threads", "2"]] {
        let other = json_run(&p, extra);
        assert_eq!(other["output_token_ids"], one["output_token_ids"], "{extra:?}");
        assert_eq!(other["text"], one["text"]);
    }
    let seeded = json_run(&p, &["--temperature", "0.8", "--seed", "7"]);
    assert_eq!(seeded["output_token_ids"], json_run(&p, &["--temperature", "0.8", "--seed", "7", "--stages", "2"])["output_token_ids"]);
}

#[test]
fn streamed_text_equals_json_text() {
    let (_d, p) = common::model(5);
    let out = flotilla().args(["generate", "--model"]).arg(&p).args(["--prompt", "the cat", "--max-tokens", "12"]).output().unwrap();
    assert!(out.status.success());
    let streamed = String::from_utf8(out.stdout).unwrap();
    let json = json_run(&p, &[]);
    assert_eq!(streamed.strip_suffix('\n').unwrap(), json["text"].as_str().unwrap());
}

#[test]
fn bad_input_exits_non_zero_with_a_clear_message() {
    let (d, p) = common::model(5);
    let junk = d.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not a model").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--model".into(), "/no/such/file.gguf".into()], "cannot open model file"),
        (vec!["--model".into(), junk.display().to_string()], "not a GGUF file"),
        (vec!["--model".into(), p.display().to_string(), "--temperature".into(), "-1".into()], "temperature"),
        (vec!["--model".into(), p.display().to_string(), "--stages".into(), "9".into()], "stages"),
        (vec!["--model".into(), p.display().to_string(), "--split".into(), "3,2".into()], "boundaries"),
    ];
    for (args, needle) in cases {
        let out = flotilla().arg("generate").args(&args).args(["--prompt", "x"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: stderr {err:?} should mention {needle:?}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
