//! Running haul's roles as real processes in tests: spawn, log to a file, kill on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const HAUL: &str = env!("CARGO_BIN_EXE_haul");

/// A role running as its own process; killed when dropped.
pub struct Agent {
    child: Child,
    role: String,
    args: Vec<String>,
    pub log: PathBuf,
}

impl Agent {
    pub fn spawn(dir: &Path, role: &str, args: &[&str]) -> anyhow::Result<Agent> {
        let log = dir.join(format!("{role}.log"));
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let child = Self::start(role, &args, &log)?;
        Ok(Agent {
            child,
            role: role.to_string(),
            args,
            log,
        })
    }

    fn start(role: &str, args: &[String], log: &Path) -> anyhow::Result<Child> {
        // Append, so a restarted process's log follows its predecessor's.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let err = out.try_clone()?;
        Ok(Command::new(HAUL)
            .arg(role)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()?)
    }

    /// SIGKILL: no chance to flush, drain or say goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start the same role again with the same arguments (state directories included).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.child = Self::start(&self.role, &self.args, &self.log)?;
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `haul ARGS` to completion.
pub fn haul(args: &[&str]) -> Output {
    Command::new(HAUL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the haul binary")
}

/// A loopback address nobody listens on right now.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
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
