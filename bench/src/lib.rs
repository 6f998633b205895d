//! Shared pieces of the benchmark programs: running a command while sampling its peak memory.
//!
//! Benchmarks print figures; they assert nothing. Compare ratios within one run: this machine
//! is shared and noisy.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// What one run of a command cost.
pub struct Run {
    pub secs: f64,
    /// Peak resident memory of the process tree's largest member, in MiB (from /usr/bin/time).
    pub peak_mib: f64,
    pub ok: bool,
    pub stdout: String,
    pub stderr_tail: String,
}

/// Run `program args` under GNU time to read its peak RSS (the max over the process and the
/// children it waited for).
pub fn measure(program: &str, args: &[String]) -> anyhow::Result<Run> {
    let started = Instant::now();
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("HAULBENCH %M")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program} (is GNU time installed? apt-get install time)"))?;
    let secs = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let kib: f64 = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("HAULBENCH "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    if let Ok(path) = std::env::var("HAUL_BENCH_STDERR") {
        let _ = std::fs::write(path, stderr.as_bytes());
    }
    let tail: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("HAULBENCH"))
        .collect();
    Ok(Run {
        secs,
        peak_mib: kib / 1024.0,
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr_tail: tail[tail.len().saturating_sub(5)..].join("\n"),
    })
}

pub fn wait(d: Duration) {
    std::thread::sleep(d);
}

/// The haul binary next to this benchmark (same profile directory), or `HAUL_BIN`.
pub fn haul_bin() -> String {
    if let Ok(p) = std::env::var("HAUL_BIN") {
        return p;
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("haul")))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "haul".to_string())
}
