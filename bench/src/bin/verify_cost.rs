//! What verification costs: the same database moved twice in one run, with `haul copy` and
//! with `haul copy --no-verify`, into two empty targets, after one uncounted warm-up move,
//! alternating the order over rounds so neither always runs on a warmer machine. Prints each run's time and the ratio verified /
//! unverified (the budget is 1.15), then checks both targets with the independent comparison.
//!
//!     cargo build --release -p haul -p haul-bench
//!     ./target/release/verify_cost [MB] [ROUNDS] [durable]   # default 1000 MB, 2 rounds
//!
//! The clusters are throwaway test clusters (fsync and full_page_writes off) unless `durable` is
//! given, which keeps PostgreSQL's defaults (fsync on), as a production server runs. Each move
//! also prints the CPU-seconds the whole machine spent during it (from `/proc/stat`): both
//! databases and all three roles share this machine's cores, so what verification adds is
//! CPU, and the ratio is bounded by how busy the unverified move already keeps them.
//!
//! The source is realistic table data: a time series of readings (timestamps, numerics), events
//! with text and jsonb, and an append-only log of notes.

use anyhow::Context;
use haul_bench::{haul_bin, measure};
use haul_pgcluster::{compare_databases, Cluster, ClusterOptions};

fn main() -> anyhow::Result<()> {
    let mb: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let rounds: u32 = std::env::args()
        .nth(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2);
    let durable = std::env::args().nth(3).as_deref() == Some("durable");
    let options = || {
        let mut o = ClusterOptions::default();
        if durable {
            o.extra_conf = vec![
                ("fsync".into(), "on".into()),
                ("full_page_writes".into(), "on".into()),
            ];
        }
        o
    };
    println!(
        "clusters: {}",
        if durable {
            "durable (fsync on, full_page_writes on)"
        } else {
            "throwaway (fsync off, full_page_writes off)"
        }
    );
    let source = Cluster::start(options())?;
    let target = Cluster::start(options())?;
    source.create_database("src")?;
    println!("building a {mb} MB source (readings, events, notes) ...");
    source
        .psql("src", &haul_bench::realistic_tables_sql(mb))
        .context("build source")?;
    let size = source.psql(
        "src",
        "SELECT pg_size_pretty(sum(pg_table_size(oid))) FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace",
    )?;
    println!("source tables: {size}");

    let cpu = std::cell::RefCell::new((0.0f64, 0.0f64));
    let copy = |db: &str, verify: bool| -> anyhow::Result<f64> {
        target.psql("postgres", &format!("DROP DATABASE IF EXISTS {db}"))?;
        target.create_database(db)?;
        let mut args = vec![
            "copy".to_string(),
            "--source".into(),
            source.url("src"),
            "--target".into(),
            target.url(db),
            "--jobs".into(),
            "4".into(),
            "--chunk-size".into(),
            "64MB".into(),
        ];
        if !verify {
            args.push("--no-verify".into());
        }
        let busy_before = machine_busy_secs();
        let run = measure(&haul_bin(), &args)?;
        let busy = machine_busy_secs() - busy_before;
        println!(
            "  {}: {:.1} s, {busy:.1} CPU-s ({:.0}% of {} cores busy)",
            if verify { "verified" } else { "unverified" },
            run.secs,
            100.0 * busy / run.secs / cores(),
            cores()
        );
        {
            let mut c = cpu.borrow_mut();
            if verify {
                c.0 += busy;
            } else {
                c.1 += busy;
            }
        }
        if !run.ok {
            println!("{}\n{}", run.stdout, run.stderr_tail);
            anyhow::bail!("haul copy failed");
        }
        if verify {
            if let Some(l) = run.stdout.lines().find(|l| l.starts_with("verified")) {
                println!("  {l}");
            }
        }
        Ok(run.secs)
    };
    // One move first, not counted: the first read of the source pays for a cold cache.
    println!(
        "warm-up move (not counted): {:.1} s",
        copy("unverified", false)?
    );
    *cpu.borrow_mut() = (0.0, 0.0);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first.
        if round % 2 == 0 {
            with.push(copy("verified", true)?);
            without.push(copy("unverified", false)?);
        } else {
            without.push(copy("unverified", false)?);
            with.push(copy("verified", true)?);
        }
        println!(
            "round {}: haul copy {:.1} s, haul copy --no-verify {:.1} s, ratio {:.2}",
            round + 1,
            with[with.len() - 1],
            without[without.len() - 1],
            with[with.len() - 1] / without[without.len() - 1]
        );
    }
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    println!(
        "verified move {:.1} s, unverified {:.1} s (sums over {rounds} rounds): ratio {:.2} (budget 1.15)",
        sum(&with),
        sum(&without),
        sum(&with) / sum(&without)
    );
    let (cpu_with, cpu_without) = *cpu.borrow();
    println!(
        "CPU-seconds of the whole machine: verified {cpu_with:.1}, unverified {cpu_without:.1} (ratio {:.2})",
        cpu_with / cpu_without.max(0.001)
    );
    for db in ["verified", "unverified"] {
        let diffs = compare_databases(&source.url("src"), &target.url(db))?;
        anyhow::ensure!(
            diffs.is_empty(),
            "{db} target differs: {}",
            diffs.join("\n")
        );
    }
    println!("independent comparison: both targets equal the source");
    Ok(())
}

/// CPU-seconds the machine has spent busy (user, nice, system, irq, softirq) since boot.
fn machine_busy_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq
    let busy: f64 = [0usize, 1, 2, 5, 6]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum();
    busy / 100.0
}

fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}
