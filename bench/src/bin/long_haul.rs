//! Long-haul speed and caps: haul's three roles as processes, moving a realistic database plus
//! data that does not compress, through the link emulator (`haul_faults::Link`) between sender
//! and receiver, against a plain `COPY TO STDOUT | COPY FROM STDIN` pipe (psql to psql, through
//! the same emulated link, the same number of tables at once, with pre-data before and
//! post-data after). Prints, per scenario: wall time, goodput (table bytes a second), bytes on
//! the wire, compression ratio, peak RSS per agent, and haul / pipe. Then a cap run: 20 Mbit/s
//! over two senders, changed live to 50 Mbit/s, with the rate the link saw in each 1 s window.
//!
//!     cargo build --release -p haul -p haul-bench
//!     ./target/release/long_haul [MB] [INCOMPRESSIBLE_MB] [SCENARIO ...]
//!
//! Defaults: 1000 MB of table data (time series, events with text and jsonb, notes) and 400 MB
//! of incompressible bytea; scenarios `loopback 100M-60ms 100M-150ms lfn` (the last is 1 Gbit/s,
//! 150 ms, at most 50 Mbit/s per TCP connection), `lfn-incompressible` (that path, moving only
//! the bytea), then `cap`. Figures from one run on a shared
//! machine: compare ratios. `HAUL_BENCH_CODEC=zstd:3` runs haul with that `--codec` and
//! prints its choices; `HAUL_BENCH_ARGS="--no-verify"` adds flags to `haul start`;
//! `HAUL_BENCH_PIPE=0` skips the pipe.

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use haul_bench::haul_bin;
use haul_faults::{free_addr, Agent, Link};
use haul_pgcluster::{Cluster, ClusterOptions};

const MBIT: u64 = 1_000_000 / 8;

struct Scenario {
    name: &'static str,
    /// Link rate, bytes a second (0: no link at all, loopback).
    rate: u64,
    rtt_ms: u64,
    /// Cap per TCP connection, bytes a second (0: none).
    per_connection: u64,
    /// Move only this table (haul's `--tables`, the pipe's one table); all when `None`.
    only: Option<&'static str>,
}

const SCENARIOS: [Scenario; 5] = [
    Scenario {
        name: "loopback",
        rate: 0,
        rtt_ms: 0,
        per_connection: 0,
        only: None,
    },
    Scenario {
        name: "100M-60ms",
        rate: 100 * MBIT,
        rtt_ms: 60,
        per_connection: 0,
        only: None,
    },
    Scenario {
        name: "100M-150ms",
        rate: 100 * MBIT,
        rtt_ms: 150,
        per_connection: 0,
        only: None,
    },
    Scenario {
        name: "lfn",
        rate: 1000 * MBIT,
        rtt_ms: 150,
        per_connection: 50 * MBIT,
        only: None,
    },
    // The issue's case for the long fat path: only the data that does not compress, so the
    // link, not the CPU's compression, decides, and "busy" is the share of it haul fills.
    Scenario {
        name: "lfn-incompressible",
        rate: 1000 * MBIT,
        rtt_ms: 150,
        per_connection: 50 * MBIT,
        only: Some("blobs"),
    },
];

const TABLES: [&str; 4] = ["readings", "events", "notes", "blobs"];
const JOBS: usize = 4;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mb: u64 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let noise_mb: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(400);
    let wanted: Vec<&str> = args.iter().skip(2).map(String::as_str).collect();
    let run_it = |name: &str| wanted.is_empty() || wanted.contains(&name);

    let source = Cluster::start(ClusterOptions::default())?;
    let target = Cluster::start(ClusterOptions::default())?;
    source.create_database("src")?;
    println!(
        "building the source: {mb} MB of table data and {noise_mb} MB that does not compress ..."
    );
    build_source(&source, mb, noise_mb)?;
    let table_bytes: u64 = source
        .psql(
            "src",
            "SELECT sum(pg_table_size(oid)) FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace",
        )?
        .trim()
        .parse()?;
    println!("source tables: {:.0} MB on disk", table_bytes as f64 / 1e6);
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs").display().to_string();
    let out = Command::new(haul_bin())
        .args(["certs", "init", "--dir", &certs])
        .output()?;
    anyhow::ensure!(out.status.success(), "haul certs init failed");

    println!();
    println!(
        "{:<11} {:>6} {:>9} {:>10} {:>7} {:>22} | {:>6} {:>9} {:>10} | {:>6} {:>6}",
        "scenario",
        "haul s",
        "goodput",
        "wire",
        "ratio",
        "peak RSS c/r/s MiB",
        "pipe s",
        "goodput",
        "wire",
        "h/p",
        "busy"
    );
    for s in SCENARIOS.iter().filter(|s| run_it(s.name)) {
        let h = haul_move(&source, &target, dir.path(), &certs, s, 1, None)?;
        // HAUL_BENCH_PIPE=0: haul only, to iterate on haul (the pipe's figures print as 0).
        let p = if std::env::var("HAUL_BENCH_PIPE").is_ok_and(|v| v == "0") {
            Moved::none()
        } else {
            pipe_move(&source, &target, s)?
        };
        let bytes = match s.only {
            Some(t) => source
                .psql("src", &format!("SELECT pg_table_size('public.{t}')"))?
                .trim()
                .parse()?,
            None => table_bytes,
        };
        let gp = |secs: f64| bytes as f64 / secs / 1e6;
        let busy = if s.rate > 0 {
            format!("{:.0}%", 100.0 * h.wire as f64 / (s.rate as f64 * h.secs))
        } else {
            "-".into()
        };
        println!(
            "{:<11} {:>6.1} {:>7.1}MB/s {:>8.0}MB {:>6.1}x {:>22} | {:>6.1} {:>7.1}MB/s {:>8.0}MB | {:>6.2} {:>6}",
            s.name,
            h.secs,
            gp(h.secs),
            h.wire as f64 / 1e6,
            h.raw as f64 / h.wire.max(1) as f64,
            format!("{:.0}/{:.0}/{:.0}", h.rss[0], h.rss[1], h.rss[2]),
            p.secs,
            gp(p.secs),
            p.wire as f64 / 1e6,
            gp(h.secs) / gp(p.secs),
            busy,
        );
        println!("{:<11} haul's chunks crossed as: {}", "", h.codecs);
    }
    if run_it("cap") {
        println!();
        println!("cap: 20 Mbit/s over two senders through 100 Mbit/s, 60 ms; changed to 50 Mbit/s after 12 s");
        let s = &SCENARIOS[1];
        let h = haul_move(
            &source,
            &target,
            dir.path(),
            &certs,
            s,
            2,
            Some(("20Mbit", "50Mbit", 12.0)),
        )?;
        println!(
            "  moved in {:.1} s, {:.0} MB on the wire",
            h.secs,
            h.wire as f64 / 1e6
        );
        let mut line = String::from("  Mbit/s per 1 s window:");
        for (i, w) in h.windows.iter().enumerate() {
            line.push_str(&format!(" {:.1}", w * 8.0 / 1e6));
            if i == h.changed_window {
                line.push_str(" |");
            }
        }
        println!("{line}");
        let before = &h.windows[..h.changed_window.min(h.windows.len())];
        let over = before
            .iter()
            .filter(|w| **w > 20.0 * MBIT as f64 * 1.10)
            .count();
        println!(
            "  before the change: {} windows, {} above cap + 10%; mean {:.2} Mbit/s",
            before.len(),
            over,
            before.iter().sum::<f64>() / before.len().max(1) as f64 * 8.0 / 1e6
        );
        if let Some(at) = h.new_rate_after {
            println!(
                "  the link first saw over 30 Mbit/s in a 1 s window {at:.1} s after the change"
            );
        }
    }
    Ok(())
}

impl Moved {
    /// A move that was not made.
    fn none() -> Moved {
        Moved {
            secs: f64::NAN,
            raw: 0,
            wire: 0,
            rss: [0.0; 3],
            windows: Vec::new(),
            changed_window: 0,
            new_rate_after: None,
            codecs: String::new(),
        }
    }
}

/// What one move did.
struct Moved {
    secs: f64,
    raw: u64,
    wire: u64,
    /// Peak RSS of coordinator, receiver, sender, MiB.
    rss: [f64; 3],
    /// Cap runs: wire bytes a second in each 1 s window, and where the change fell.
    windows: Vec<f64>,
    changed_window: usize,
    new_rate_after: Option<f64>,
    /// The codecs haul's chunks took (`--codec auto`).
    codecs: String,
}

fn fresh_target(target: &Cluster) -> anyhow::Result<()> {
    target.psql("postgres", "DROP DATABASE IF EXISTS dst")?;
    target.create_database("dst")
}

fn link_for(s: &Scenario, upstream: &str) -> anyhow::Result<Option<Link>> {
    if s.rate == 0 {
        return Ok(None);
    }
    let l = Link::start(upstream)?;
    l.set_rate(s.rate);
    l.set_delay(Duration::from_millis(s.rtt_ms / 2));
    l.set_connection_rate(s.per_connection);
    Ok(Some(l))
}

/// haul with its roles as processes; `senders` of them; a cap run changes `cap.0` to `cap.1`
/// after `cap.2` seconds and samples the link.
fn haul_move(
    source: &Cluster,
    target: &Cluster,
    dir: &Path,
    certs: &str,
    s: &Scenario,
    senders: usize,
    cap: Option<(&str, &str, f64)>,
) -> anyhow::Result<Moved> {
    fresh_target(target)?;
    let run = tempfile::tempdir_in(dir)?;
    let d = |p: &str| run.path().join(p).display().to_string();
    let (coord, recv) = (free_addr(), free_addr());
    let link = link_for(s, &recv)?;
    let advertise = link.as_ref().map_or(recv.clone(), |l| l.addr.clone());
    let bin = haul_bin();
    let bin = Path::new(&bin);
    let coordinator = Agent::spawn(
        bin,
        run.path(),
        "coordinator",
        &["--listen", &coord, "--state", &d("c"), "--certs", certs],
    )?;
    let receiver = Agent::spawn(
        bin,
        run.path(),
        "receiver",
        &[
            "--coordinator",
            &coord,
            "--listen",
            &recv,
            "--advertise",
            &advertise,
            "--target",
            &target.url("dst"),
            "--state",
            &d("r"),
            "--spool",
            &d("spool"),
            "--certs",
            certs,
        ],
    )?;
    let mut sender_agents = Vec::new();
    for i in 0..senders {
        let sub = run.path().join(format!("s{i}"));
        std::fs::create_dir_all(&sub)?;
        if i > 0 {
            let name = format!("sender{i}");
            let out = Command::new(bin)
                .args([
                    "certs", "issue", "--dir", certs, "--role", "sender", "--name", &name,
                ])
                .output()?;
            anyhow::ensure!(out.status.success(), "issue a sender certificate");
        }
        let name = if i == 0 {
            "sender".to_string()
        } else {
            format!("sender{i}")
        };
        sender_agents.push(Agent::spawn(
            bin,
            &sub,
            "sender",
            &[
                "--coordinator",
                &coord,
                "--source",
                &source.url("src"),
                "--state",
                &sub.join("state").display().to_string(),
                "--certs",
                certs,
                "--name",
                &name,
            ],
        )?);
    }
    let jobs = JOBS.to_string();
    let extra = std::env::var("HAUL_BENCH_ARGS").unwrap_or_default();
    let mut start = vec!["start", "--coordinator", &coord, "--certs", certs];
    if !extra.contains("--jobs") {
        start.extend(["--jobs", &jobs]);
    }
    // HAUL_BENCH_CODEC: another --codec for haul (zstd:3, say); its choices are printed.
    let codec = std::env::var("HAUL_BENCH_CODEC").unwrap_or_default();
    if !codec.is_empty() {
        start.extend(["--codec", codec.as_str()]);
    }
    // HAUL_BENCH_ARGS: more `haul start` flags, split on spaces (`--no-verify`, say), to see
    // what a part of haul costs; its `--jobs` or `--chunk-size` replace the bench's.
    start.extend(extra.split_whitespace());
    let only = s.only.map(|t| format!("public.{t}"));
    if let (Some(t), None) = (&only, cap) {
        start.extend(["--tables", t.as_str()]);
    }
    match cap {
        // The data that does not compress, in small chunks: both senders busy throughout.
        Some((first, _, _)) => start.extend([
            "--bwlimit",
            first,
            "--tables",
            "public.blobs",
            "--chunk-size",
            "4MB",
        ]),
        None if extra.contains("--chunk-size") => {}
        None => start.extend(["--chunk-size", "64MB"]),
    }
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(30);
    loop {
        let out = Command::new(bin).args(&start).output()?;
        if out.status.success() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "haul start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut changed: Option<f64> = None;
    let mut phases: Vec<(f64, String)> = Vec::new();
    let status = loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = t0.elapsed().as_secs_f64();
        if let Some(l) = &link {
            samples.push((now, l.forwarded_up()));
        }
        if let Some((_, second, after)) = cap {
            if changed.is_none() && now >= after {
                let out = Command::new(bin)
                    .args(["bwlimit", "--coordinator", &coord, "--certs", certs, second])
                    .output()?;
                anyhow::ensure!(out.status.success(), "haul bwlimit failed");
                changed = Some(t0.elapsed().as_secs_f64());
            }
        }
        if !samples.len().is_multiple_of(5) && link.is_some() {
            continue;
        }
        let out = Command::new(bin)
            .args([
                "status",
                "--coordinator",
                &coord,
                "--certs",
                certs,
                "--json",
            ])
            .output()?;
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            continue;
        };
        if let Some(p) = v["phase"].as_str() {
            if phases.last().is_none_or(|(_, q): &(f64, String)| q != p) {
                phases.push((now, p.to_string()));
            }
        }
        if v["phase"] == "done" || v["phase"] == "failed" {
            break v;
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(
        status["phase"] == "done",
        "haul move failed: {}\nreceiver:\n{}",
        status["error"],
        receiver.log_text()
    );
    let rss = [
        coordinator.peak_rss_mib().unwrap_or(0.0),
        receiver.peak_rss_mib().unwrap_or(0.0),
        sender_agents
            .iter()
            .filter_map(Agent::peak_rss_mib)
            .fold(0.0, f64::max),
    ];
    if !codec.is_empty() {
        for a in &sender_agents {
            for l in a.log_text().lines().filter(|l| l.contains("codec choice")) {
                println!("    {l}");
            }
        }
    }
    // HAUL_BENCH_GREP: print the agents' log lines that contain any of its `|`-separated
    // parts (set RUST_LOG to match).
    if let Ok(needles) = std::env::var("HAUL_BENCH_GREP") {
        let needles: Vec<&str> = needles.split('|').collect();
        for a in sender_agents.iter().chain([&receiver, &coordinator]) {
            let text = a.log_text();
            for l in text
                .lines()
                .filter(|l| needles.iter().any(|n| l.contains(n)))
            {
                println!("    {l}");
            }
        }
    }
    let raw = status["raw_bytes_done"].as_u64().unwrap_or(0);
    let wire = link
        .as_ref()
        .map_or(status["wire_bytes_done"].as_u64().unwrap_or(0), |l| {
            l.forwarded_up()
        });
    // 1 s windows of the link's forwarded bytes.
    let mut windows = Vec::new();
    let mut changed_window = usize::MAX;
    let mut new_rate_after = None;
    let mut i = 0;
    while let Some(j) = (i..samples.len()).find(|&j| samples[j].0 - samples[i].0 >= 1.0) {
        let rate = (samples[j].1 - samples[i].1) as f64 / (samples[j].0 - samples[i].0);
        if let Some(c) = changed {
            if changed_window == usize::MAX && samples[j].0 >= c {
                changed_window = windows.len();
            }
            if new_rate_after.is_none() && samples[i].0 >= c && rate > 30.0 * MBIT as f64 {
                new_rate_after = Some(samples[j].0 - c);
            }
        }
        windows.push(rate);
        i = j;
    }
    // HAUL_BENCH_TIMELINE=1: the link's Mbit/s in each 1 s window, and when each phase began.
    if cap.is_none() && std::env::var("HAUL_BENCH_TIMELINE").is_ok_and(|v| v == "1") {
        let line: Vec<String> = windows
            .iter()
            .map(|w| format!("{:.0}", w * 8.0 / 1e6))
            .collect();
        println!("    Mbit/s per 1 s window: {}", line.join(" "));
        let phases: Vec<String> = phases
            .iter()
            .map(|(t, p)| format!("{p} at {t:.1} s"))
            .collect();
        println!("    phases: {}", phases.join(", "));
    }
    Ok(Moved {
        secs,
        raw,
        wire,
        rss,
        windows,
        changed_window,
        new_rate_after,
        codecs: status["codecs"].as_str().unwrap_or_default().to_string(),
    })
}

/// The plain pipe: pre-data, then each table `psql COPY TO STDOUT` into a TCP connection
/// through the link into `psql COPY FROM STDIN`, JOBS at once, then post-data.
fn pipe_move(source: &Cluster, target: &Cluster, s: &Scenario) -> anyhow::Result<Moved> {
    fresh_target(target)?;
    let t0 = Instant::now();
    let (src, dst) = (source.url("src"), target.url("dst"));
    let section = |name: &str| -> anyhow::Result<()> {
        let dump = Command::new("pg_dump")
            .args(["--section", name, "--no-owner", "--no-privileges", &src])
            .output()?;
        anyhow::ensure!(dump.status.success(), "pg_dump --section {name}");
        let mut psql = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &dst])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        psql.stdin
            .take()
            .context("psql stdin")?
            .write_all(&dump.stdout)?;
        anyhow::ensure!(psql.wait()?.success(), "load {name}");
        Ok(())
    };
    section("pre-data")?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let link = link_for(s, &addr)?;
    let dial = link.as_ref().map_or(addr.clone(), |l| l.addr.clone());
    let tables: Vec<String> = TABLES
        .iter()
        .filter(|t| s.only.is_none_or(|o| o == **t))
        .map(|t| t.to_string())
        .collect();
    let queue = std::sync::Mutex::new(tables.clone());
    let n_tables = tables.len();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let dst = &dst;
        let receiving = scope.spawn(move || -> anyhow::Result<()> {
            let mut handlers = Vec::new();
            for _ in 0..n_tables {
                let (conn, _) = listener.accept()?;
                handlers.push(std::thread::spawn({
                    let dst = dst.clone();
                    move || -> anyhow::Result<()> {
                        let mut reader = std::io::BufReader::new(conn);
                        let mut table = String::new();
                        reader.read_line(&mut table)?;
                        let copy = format!("COPY {} FROM STDIN", table.trim());
                        let mut psql = Command::new("psql")
                            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &dst, "-c", &copy])
                            .stdin(Stdio::piped())
                            .spawn()?;
                        let mut stdin = psql.stdin.take().context("psql stdin")?;
                        std::io::copy(&mut reader, &mut stdin)?;
                        drop(stdin);
                        anyhow::ensure!(psql.wait()?.success(), "{copy}");
                        Ok(())
                    }
                }));
            }
            for h in handlers {
                h.join()
                    .map_err(|_| anyhow::anyhow!("receiving thread panicked"))??;
            }
            Ok(())
        });
        // JOBS tables at once.
        let mut sending = Vec::new();
        let (queue, dial, src) = (&queue, &dial, &src);
        for _ in 0..JOBS.min(tables.len()) {
            sending.push(scope.spawn(move || -> anyhow::Result<()> {
                loop {
                    let Some(t) = queue.lock().map_err(|_| anyhow::anyhow!("queue"))?.pop() else {
                        return Ok(());
                    };
                    let mut conn = std::net::TcpStream::connect(dial)?;
                    writeln!(conn, "{t}")?;
                    let copy = format!("COPY {t} TO STDOUT");
                    let mut psql = Command::new("psql")
                        .args(["-X", "-q", src, "-c", &copy])
                        .stdout(Stdio::piped())
                        .spawn()?;
                    let mut out = psql.stdout.take().context("psql stdout")?;
                    std::io::copy(&mut out, &mut conn)?;
                    conn.shutdown(std::net::Shutdown::Write)?;
                    anyhow::ensure!(psql.wait()?.success(), "{copy}");
                }
            }));
        }
        for h in sending {
            h.join()
                .map_err(|_| anyhow::anyhow!("sending thread panicked"))??;
        }
        receiving
            .join()
            .map_err(|_| anyhow::anyhow!("receiving thread panicked"))??;
        Ok(())
    })?;
    section("post-data")?;
    let secs = t0.elapsed().as_secs_f64();
    let wire = link.as_ref().map_or(0, |l| l.forwarded_up());
    Ok(Moved {
        secs,
        raw: wire,
        wire,
        rss: [0.0; 3],
        windows: Vec::new(),
        changed_window: 0,
        new_rate_after: None,
        codecs: String::new(),
    })
}

/// The realistic tables (as `verify_cost` builds them) and `blobs`: bytea made of md5 output,
/// which no codec can shrink.
fn build_source(source: &Cluster, mb: u64, noise_mb: u64) -> anyhow::Result<()> {
    source.psql("src", &haul_bench::realistic_tables_sql(mb))?;
    let blobs = noise_mb * 1_000_000 / 1060;
    source.psql(
        "src",
        &format!(
            "CREATE TABLE blobs (id bigint PRIMARY KEY, data bytea NOT NULL); \
             INSERT INTO blobs SELECT g, decode((SELECT string_agg(md5(g || ':' || r), '') \
               FROM generate_series(1, 64) r), 'hex') FROM generate_series(1, {blobs}) g; \
             ANALYZE blobs;"
        ),
    )?;
    Ok(())
}
