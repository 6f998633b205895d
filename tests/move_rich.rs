//! The whole move on the fixture that carries everything a migration must: `haul copy` as a
//! real process between two real clusters, then an independent comparison (pg_dump schema,
//! per-table counts and digests, sequences, materialized views) that uses none of haul's code.

mod common;

use std::process::Command;

use common::{compare_databases, load_rich};

#[test]
fn copy_moves_the_rich_database_exactly() -> anyhow::Result<()> {
    let (source, target) = common::two_clusters()?;
    load_rich(&source, "rich")?;
    target.create_database("rich")?;

    let out = Command::new(env!("CARGO_BIN_EXE_haul"))
        .args([
            "copy",
            "--source",
            &source.url("rich"),
            "--target",
            &target.url("rich"),
        ])
        // Small chunks so the big tables split (by key and by pages) and run in parallel.
        .args(["--chunk-size", "4MB", "--jobs", "3", "--keep-ledger"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "haul copy failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("result     done"), "{stdout}");
    assert!(stdout.contains("verified"), "{stdout}");

    let diffs = compare_databases(&source.url("rich"), &target.url("rich"))?;
    assert!(
        diffs.is_empty(),
        "source and target differ:\n{}",
        diffs.join("\n")
    );

    // Exactly once: one ledger row per chunk, and more chunks than tables (splitting happened).
    let ledger = target.psql(
        "rich",
        "SELECT count(*), count(DISTINCT chunk_id), count(DISTINCT table_name) FROM haul.ledger",
    )?;
    let nums: Vec<i64> = ledger
        .split('|')
        .map(|v| v.trim().parse())
        .collect::<Result<_, _>>()?;
    assert_eq!(
        nums[0], nums[1],
        "a chunk appears twice in the ledger: {ledger}"
    );
    assert!(
        nums[0] > nums[2],
        "no table was split into chunks: {ledger}"
    );
    let split = target.psql(
        "rich",
        "SELECT count(*) FROM haul.ledger WHERE table_name IN ('public.big_events', 'public.audit_log')",
    )?;
    assert!(
        split.trim().parse::<i64>()? >= 4,
        "big tables were not split: {split}"
    );

    // Triggers did not fire during the load.
    let fired = target.psql(
        "rich",
        r#"SELECT count(*) FROM "Sales"."Orders" WHERE note = 'trigger fired'"#,
    )?;
    assert_eq!(fired.trim(), "0");
    Ok(())
}
