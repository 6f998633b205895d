//! What verification costs: the same database moved twice in one run, with `haul copy` and
//! with `haul copy --no-verify`, into two empty targets, after one uncounted warm-up move,
//! alternating the order over rounds so neither always runs on a warmer machine. Prints each run's time and the ratio verified /
//! unverified (the budget is 1.15), then checks both targets with the independent comparison.
//!
//!     cargo build --release -p haul -p haul-bench
//!     ./target/release/verify_cost [MB] [ROUNDS]     # default 1000 MB, 2 rounds
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
    let source = Cluster::start(ClusterOptions::default())?;
    let target = Cluster::start(ClusterOptions::default())?;
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
        let run = measure(&haul_bin(), &args)?;
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
