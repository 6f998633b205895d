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

/// SQL for realistic table data of about `mb` MB on disk: a time series of readings
/// (timestamps, numerics; about 100 bytes a row), events with text and jsonb (330), and an
/// append-only log of notes without a key (120). Shared by the benchmarks that move it.
pub fn realistic_tables_sql(mb: u64) -> String {
    let readings = mb * 1_000_000 * 4 / 10 / 100;
    let events = mb * 1_000_000 * 4 / 10 / 330;
    let notes = mb * 1_000_000 * 2 / 10 / 120;
    format!(
        "CREATE TABLE readings (id bigint PRIMARY KEY, sensor int NOT NULL, at timestamptz NOT NULL, \
           value double precision, quality numeric(6,3)); \
         INSERT INTO readings SELECT g, g % 500, timestamptz '2024-01-01' + g * interval '100 ms', \
           sin(g / 1000.0) * 40 + (g % 17), (g % 1000) / 1000.0 FROM generate_series(1, {readings}) g; \
         CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT NULL, kind text NOT NULL, \
           payload jsonb, amount numeric(14,2), note text); \
         INSERT INTO events SELECT g, timestamptz '2024-01-01' + g * interval '1 second', 'kind-' || (g % 17), \
           jsonb_build_object('session', md5(g::text), 'step', g % 50, 'tags', jsonb_build_array(g % 3, g % 7)), \
           (g % 100000) / 100.0, CASE WHEN g % 5 = 0 THEN NULL ELSE repeat(md5((g * 7)::text), 2) END \
         FROM generate_series(1, {events}) g; \
         CREATE TABLE notes (at timestamptz NOT NULL, author text, body text); \
         INSERT INTO notes SELECT timestamptz '2024-01-01' + g * interval '1 minute', 'user' || (g % 300), \
           'note ' || g || ' ' || md5(g::text) || ' ' || md5((g * 3)::text) FROM generate_series(1, {notes}) g; \
         ANALYZE;"
    )
}
