//! A database of many small tables (default 10,000), moved by `haul copy` and by
//! `pg_dump -j2 -Fd` + `pg_restore -j2` on the same machine, one after the other.
//! Prints wall time and peak memory of each, and their ratio.
//!
//!     cargo build --release -p haul -p haul-bench
//!     ./target/release/many_tables [TABLES]

use anyhow::Context;
use haul_bench::{haul_bin, measure};
use haul_pgcluster::{pg_bin, Cluster, ClusterOptions};

fn main() -> anyhow::Result<()> {
    let tables: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    // pg_dump locks every table in one transaction: the lock table must hold them all.
    let locks = (tables / 100 + 64) as u32;
    let opts = ClusterOptions {
        max_locks_per_transaction: Some(locks.max(64)),
        ..Default::default()
    };
    let source = Cluster::start(opts.clone())?;
    let target = Cluster::start(opts)?;
    source.create_database("many")?;
    println!("creating {tables} tables with 10 rows, a primary key and an index each ...");
    let mut sql = String::new();
    for i in 0..tables {
        sql.push_str(&format!(
            "CREATE TABLE t{i} (id serial PRIMARY KEY, name text NOT NULL, at timestamptz DEFAULT now());\n\
             CREATE INDEX t{i}_name ON t{i} (name);\n\
             INSERT INTO t{i} (name) SELECT 'row ' || g FROM generate_series(1, 10) g;\n"
        ));
        if i % 500 == 499 {
            source.psql("many", &sql).context("create tables")?;
            sql.clear();
        }
    }
    if !sql.is_empty() {
        source.psql("many", &sql).context("create tables")?;
    }

    target.create_database("haul")?;
    let haul = measure(
        &haul_bin(),
        &[
            "copy".into(),
            "--source".into(),
            source.url("many"),
            "--target".into(),
            target.url("haul"),
            "--jobs".into(),
            "4".into(),
            "--log".into(),
            std::env::var("HAUL_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        ],
    )?;
    println!(
        "haul copy:                 {:>7.1} s  peak {:>7.1} MiB  {}",
        haul.secs,
        haul.peak_mib,
        if haul.ok { "ok" } else { "FAILED" }
    );
    if !haul.ok {
        println!("{}", haul.stderr_tail);
    }

    if std::env::var("HAUL_BENCH_SKIP_PEER").is_ok() {
        return Ok(());
    }
    target.create_database("pgdump")?;
    let dir = tempfile_dir()?;
    let dump_dir = format!("{dir}/dump");
    std::env::remove_var("HAUL_BENCH_STDERR");
    let dump = measure(
        &pg_bin("pg_dump")?.display().to_string(),
        &[
            "-j2".into(),
            "-Fd".into(),
            "-f".into(),
            dump_dir.clone(),
            format!("--dbname={}", source.url("many")),
        ],
    )?;
    let restore = measure(
        &pg_bin("pg_restore")?.display().to_string(),
        &[
            "-j2".into(),
            format!("--dbname={}", target.url("pgdump")),
            dump_dir.clone(),
        ],
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    let peer = dump.secs + restore.secs;
    println!(
        "pg_dump -j2 + pg_restore -j2: {:>5.1} s  peak {:>7.1} MiB  {}",
        peer,
        dump.peak_mib.max(restore.peak_mib),
        if dump.ok && restore.ok {
            "ok"
        } else {
            "FAILED"
        }
    );
    if !dump.ok || !restore.ok {
        println!("{}\n{}", dump.stderr_tail, restore.stderr_tail);
    }
    println!(
        "haul time / pg_dump+pg_restore time = {:.2}",
        haul.secs / peer
    );
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<String> {
    let base = std::env::temp_dir().join(format!("haul-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    Ok(base.display().to_string())
}
