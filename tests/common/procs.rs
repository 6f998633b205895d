//! Running haul's roles as real processes in tests (the processes themselves are
//! `haul_faults::Agent`): spawn, log to a file, kill on drop.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

pub const HAUL: &str = env!("CARGO_BIN_EXE_haul");

#[allow(unused_imports)]
pub use haul_faults::{free_addr, Agent};

/// Spawn a role of the haul binary under test.
pub fn spawn(dir: &Path, role: &str, args: &[&str]) -> anyhow::Result<Agent> {
    Agent::spawn(Path::new(HAUL), dir, role, args)
}

/// Run `haul ARGS` to completion.
pub fn haul(args: &[&str]) -> Output {
    Command::new(HAUL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the haul binary")
}

/// The last line of a failed command's stderr, after checking it failed cleanly: non-zero exit,
/// no panic, and a last line of the form `haul: ...`.
pub fn failure_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "panicked:\n{stderr}");
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string();
    assert!(
        last.starts_with("haul: "),
        "last stderr line is not one clear error:\n{stderr}"
    );
    last
}
