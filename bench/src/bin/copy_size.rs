//! `haul copy` of a database of a given size (default 300 MB of table data), then the
//! independent comparison from `haul-pgcluster` (pg_dump schema, per-table counts and digests,
//! sequences), which shares no code with haul's transfer. Prints time, throughput, bytes read
//! and on the wire, peak memory, and the comparison's verdict.
//!
//!     cargo build --release -p haul -p haul-bench
//!     ./target/release/copy_size [MB] [CHUNK_SIZE]

use anyhow::Context;
use haul_bench::{haul_bin, measure};
use haul_pgcluster::{compare_databases, Cluster, ClusterOptions};

fn main() -> anyhow::Result<()> {
    let mb: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(300);
    let chunk = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "256MB".to_string());
    let source = Cluster::start(ClusterOptions::default())?;
    let target = Cluster::start(ClusterOptions::default())?;
    source.create_database("shop")?;
    target.create_database("shop")?;
    // About 250 bytes a row in `events`, a fifth of that again in `lines`.
    let rows = mb * 1_000_000 / 300;
    println!("building a {mb} MB source ({rows} events) ...");
    source
        .psql(
            "shop",
            &format!(
                "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT NULL, kind text NOT NULL, \
                   payload jsonb, amount numeric(14,2), note text); \
                 INSERT INTO events SELECT g, timestamptz '2024-01-01' + g * interval '1 second', 'kind-' || (g % 17), \
                   jsonb_build_object('session', md5(g::text), 'step', g % 50, 'tags', jsonb_build_array(g % 3, g % 7)), \
                   (g % 100000) / 100.0, CASE WHEN g % 5 = 0 THEN NULL ELSE repeat(md5((g * 7)::text), 2) END \
                 FROM generate_series(1, {rows}) g; \
                 CREATE TABLE lines (event_id bigint REFERENCES events (id), line int, sku text, qty int); \
                 INSERT INTO lines SELECT g, 1 + g % 3, 'SKU-' || (g % 5000), g % 9 FROM generate_series(1, {rows} / 5) g; \
                 CREATE INDEX ON events (kind); CREATE SEQUENCE invoice START 100; SELECT setval('invoice', 12345); ANALYZE;"
            ),
        )
        .context("build source")?;
    let size = source.psql("shop", "SELECT pg_size_pretty(sum(pg_table_size(oid))) FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace")?;
    println!("source tables: {size}");

    let run = measure(
        &haul_bin(),
        &[
            "copy".into(),
            "--source".into(),
            source.url("shop"),
            "--target".into(),
            target.url("shop"),
            "--jobs".into(),
            "4".into(),
            "--chunk-size".into(),
            chunk,
        ],
    )?;
    println!(
        "haul copy: {:.1} s, peak {:.1} MiB, {}",
        run.secs,
        run.peak_mib,
        if run.ok { "ok" } else { "FAILED" }
    );
    println!("{}", run.stdout.trim_end());
    if !run.ok {
        println!("{}", run.stderr_tail);
        anyhow::bail!("haul copy failed");
    }
    let diffs = compare_databases(&source.url("shop"), &target.url("shop"))?;
    if diffs.is_empty() {
        println!("independent comparison: source and target are equal (schema, every table's rows and digest, sequences)");
    } else {
        println!(
            "independent comparison found {} differences:\n{}",
            diffs.len(),
            diffs.join("\n")
        );
        anyhow::bail!("source and target differ");
    }
    Ok(())
}
