//! Following and cutover under load: pgbench writes to the source from before the bulk copy
//! until cutover, at a fixed rate or as fast as this machine goes, while haul's three roles
//! (real processes) copy and then follow. Prints the source's write rate against haul's apply
//! rate, the lag while following (p50, p99, max, sampled from `haul status --json` every half
//! second), and the cutover time from the end of writes to a verified, finished job, then
//! checks source and target with the independent comparison.
//!
//!     cargo build --release -p haul -p haul-bench
//!     ./target/release/follow_lag [SCALE] [RATE|max] [FOLLOW_SECS]    # default 20 200 30
//!
//! pgbench's tables (scale 20: 2M accounts, about 300 MB) are the moved database;
//! `pgbench_history` has no key, so the job runs with `--replica-identity-full`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use haul_bench::haul_bin;
use haul_faults::{free_addr, Agent};
use haul_pgcluster::{compare_databases, pg_bin, Cluster, ClusterOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scale: u32 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(20);
    let rate = args.get(1).cloned().unwrap_or_else(|| "200".into());
    let follow_secs: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(30);
    let max = rate == "max";
    if !max {
        rate.parse::<u32>()
            .with_context(|| format!("rate {rate:?}: a number of transactions a second, or max"))?;
    }

    let source = Cluster::start(ClusterOptions {
        extra_conf: vec![("wal_level".into(), "logical".into())],
        ..Default::default()
    })?;
    let target = Cluster::start(ClusterOptions::default())?;
    source.create_database("src")?;
    target.create_database("dst")?;
    let pgbench = pg_bin("pgbench")?;
    println!("pgbench -i -s {scale} ...");
    let init = Command::new(&pgbench)
        .args(["-i", "-q", "-s", &scale.to_string()])
        .arg(source.url("src"))
        .output()
        .context("run pgbench -i")?;
    anyhow::ensure!(
        init.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let size = source.psql(
        "src",
        "SELECT pg_size_pretty(sum(pg_table_size(oid))) FROM pg_class WHERE relname LIKE 'pgbench_%' AND relkind = 'r'",
    )?;
    println!("source tables: {size}");

    let dir = tempfile::tempdir()?;
    let d = |p: &str| dir.path().join(p).display().to_string();
    let bin = haul_bin();
    let bin = std::path::Path::new(&bin);
    let certs = d("certs");
    let out = Command::new(bin)
        .args(["certs", "init", "--dir", &certs])
        .output()?;
    anyhow::ensure!(out.status.success(), "haul certs init failed");
    let (coord, recv) = (free_addr(), free_addr());
    let _coordinator = Agent::spawn(
        bin,
        dir.path(),
        "coordinator",
        &["--listen", &coord, "--state", &d("c"), "--certs", &certs],
    )?;
    let receiver = Agent::spawn(
        bin,
        dir.path(),
        "receiver",
        &[
            "--coordinator",
            &coord,
            "--listen",
            &recv,
            "--target",
            &target.url("dst"),
            "--state",
            &d("r"),
            "--spool",
            &d("spool"),
            "--certs",
            &certs,
        ],
    )?;
    let sender = Agent::spawn(
        bin,
        dir.path(),
        "sender",
        &[
            "--coordinator",
            &coord,
            "--source",
            &source.url("src"),
            "--state",
            &d("s"),
            "--certs",
            &certs,
        ],
    )?;

    // The application: from before the copy until cutover.
    let mut bench_args = vec![
        "-n".to_string(),
        "-c".into(),
        "4".into(),
        "-j".into(),
        "2".into(),
        "-T".into(),
        "100000".into(),
        "-P".into(),
        "1".into(),
    ];
    if !max {
        bench_args.extend(["-R".into(), rate.clone()]);
    }
    let mut app = Command::new(&pgbench)
        .args(&bench_args)
        .arg(source.url("src"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start pgbench")?;
    // pgbench -P prints "progress: 5.0 s, 199.8 tps, ..." each second on stderr.
    let stderr = app.stderr.take().context("pgbench's stderr")?;
    let tps_log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Instant, f64)>::new()));
    let log = tps_log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let tps = line
                .strip_prefix("progress: ")
                .and_then(|l| l.split(", ").nth(1))
                .and_then(|t| t.strip_suffix(" tps"))
                .and_then(|t| t.parse::<f64>().ok());
            if let (Some(tps), Ok(mut v)) = (tps, log.lock()) {
                v.push((Instant::now(), tps));
            }
        }
    });
    std::thread::sleep(Duration::from_secs(2));

    let t0 = Instant::now();
    let out = Command::new(bin)
        .args([
            "start",
            "--coordinator",
            &coord,
            "--certs",
            &certs,
            "--follow",
            "--replica-identity-full",
            "--jobs",
            "4",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "haul start failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = || -> Option<serde_json::Value> {
        let out = Command::new(bin)
            .args([
                "status",
                "--coordinator",
                &coord,
                "--certs",
                &certs,
                "--json",
            ])
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };

    // The copy, then following: lag sampled every half second.
    let mut following_at: Option<Instant> = None;
    let mut lag_secs: Vec<f64> = Vec::new();
    let mut lag_bytes: Vec<u64> = Vec::new();
    let mut first_tx: Option<(Instant, u64)> = None;
    let mut last_tx: Option<(Instant, u64)> = None;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let Some(s) = status() else { continue };
        let phase = s["phase"].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(
            phase != "failed",
            "the job failed: {}\nsender:\n{}\nreceiver:\n{}",
            s["error"],
            sender.log_text(),
            receiver.log_text()
        );
        if phase != "following" {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(1800),
                "no following after 30 minutes"
            );
            continue;
        }
        let now = Instant::now();
        let at = *following_at.get_or_insert_with(|| {
            println!(
                "copied and verified in {:.1} s; following",
                t0.elapsed().as_secs_f64()
            );
            now
        });
        // The first seconds catch up with what was written during the copy.
        let tx = s["follow"]["transactions"].as_u64().unwrap_or(0);
        if now.duration_since(at) >= Duration::from_secs(3) {
            lag_secs.push(s["lag_seconds"].as_f64().unwrap_or(0.0));
            lag_bytes.push(s["lag_bytes"].as_u64().unwrap_or(0));
            first_tx.get_or_insert((now, tx));
            last_tx = Some((now, tx));
        }
        if now.duration_since(at) >= Duration::from_secs(follow_secs + 3) {
            break;
        }
    }
    let follow_start = following_at.context("never followed")? + Duration::from_secs(3);
    let source_tps: Vec<f64> = tps_log
        .lock()
        .map(|v| {
            v.iter()
                .filter(|(t, _)| *t >= follow_start)
                .map(|(_, r)| *r)
                .collect()
        })
        .unwrap_or_default();

    // One large transaction while following (a bulk load of a million history rows, about
    // 80 MB of changes): the follower streams it, so memory stays bounded.
    let rss_before = (sender.peak_rss_mib(), receiver.peak_rss_mib());
    let big = Instant::now();
    source.psql(
        "src",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, filler) \
         SELECT 1, 1, g, 1, now(), 'bulk' FROM generate_series(1, 1000000) g",
    )?;
    let committed = big.elapsed().as_secs_f64();
    let big_until = Instant::now() + Duration::from_secs(600);
    let applied_after = loop {
        std::thread::sleep(Duration::from_millis(500));
        let lag = status().map(|s| s["lag_seconds"].as_f64().unwrap_or(0.0));
        if lag.is_some_and(|l| l < 1.0) || Instant::now() > big_until {
            break big.elapsed().as_secs_f64();
        }
    };
    let rss_after = (sender.peak_rss_mib(), receiver.peak_rss_mib());

    // Cutover: the application stops writing, then the operator cuts over.
    app.kill().ok();
    app.wait().ok();
    let stopped = Instant::now();
    let out = Command::new(bin)
        .args([
            "cutover",
            "--coordinator",
            &coord,
            "--certs",
            &certs,
            "--wait",
            "--timeout",
            "10m",
        ])
        .output()?;
    let cutover_secs = stopped.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "cutover failed: {stdout}\n{}\nsender:\n{}",
        String::from_utf8_lossy(&out.stderr),
        sender.log_text()
    );

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let apply_rate = match (first_tx, last_tx) {
        (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
            (n1 - n0) as f64 / t1.duration_since(t0).as_secs_f64()
        }
        _ => 0.0,
    };
    // The trend: the mean of the first five samples against the last five.
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (lag_first, lag_last) = (
        avg(&lag_secs[..lag_secs.len().min(5)]),
        avg(&lag_secs[lag_secs.len().saturating_sub(5)..]),
    );
    lag_secs.sort_by(f64::total_cmp);
    lag_bytes.sort();
    let pct = |p: f64| -> (f64, u64) {
        if lag_secs.is_empty() {
            return (0.0, 0);
        }
        let i = ((lag_secs.len() - 1) as f64 * p).round() as usize;
        (lag_secs[i], lag_bytes[i])
    };
    println!(
        "source writes   {} tps asked; {:.1} tps done while following (pgbench, mean of {} seconds)",
        if max { "max".to_string() } else { rate.clone() },
        mean(&source_tps),
        source_tps.len()
    );
    println!("apply rate      {apply_rate:.1} transactions/s on the target while following");
    for (name, p) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
        let (s, b) = pct(p);
        println!(
            "lag {name}         {s:.2} s, {b} bytes ({} samples)",
            lag_secs.len()
        );
    }
    println!(
        "lag trend       {lag_first:.2} s over the first five samples, {lag_last:.2} s over the last five: {}",
        if lag_last <= lag_first.max(2.0) {
            "the apply keeps up"
        } else {
            "the apply falls behind"
        }
    );
    println!(
        "cutover         {cutover_secs:.1} s from the end of writes to a verified, finished job"
    );
    for l in stdout
        .lines()
        .filter(|l| l.starts_with("cutover") || l.starts_with("result"))
    {
        println!("  {l}");
    }
    println!(
        "large transaction  1,000,000 rows in one transaction, committed on the source in {committed:.1} s, \
         applied and the lag under 1 s {applied_after:.1} s after it began"
    );
    let mib = |v: Option<f64>| v.map_or("-".to_string(), |m| format!("{m:.0}"));
    println!(
        "peak RSS        sender {} MiB, receiver {} MiB before it; {} and {} MiB after",
        mib(rss_before.0),
        mib(rss_before.1),
        mib(rss_after.0),
        mib(rss_after.1)
    );
    let diffs = compare_databases(&source.url("src"), &target.url("dst"))?;
    if diffs.is_empty() {
        println!("independent comparison: source and target equal");
    } else {
        println!(
            "independent comparison: {} difference(s): {diffs:?}",
            diffs.len()
        );
    }
    Ok(())
}
