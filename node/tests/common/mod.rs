//! What the `flotilla` command-line tests share: the binary, and a tiny synthetic model to run it on.

use std::process::Command;

use flotilla_engine::synthetic::{self, SyntheticSpec};

pub fn flotilla() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
}

/// A synthetic llama-family model of `layers` layers, written into a temporary directory (removed when
/// the returned guard drops).
pub fn model(layers: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    synthetic::write(&p, &SyntheticSpec { layers, ..Default::default() }).unwrap();
    (dir, p)
}
