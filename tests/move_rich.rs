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

/// Indexes and keys in a tablespace of their own, and beside them ones in the default: built
/// while the copy goes on (each table is split in chunks, so its indexes go as soon as it is
/// loaded, on parallel sessions, out of pg_dump's order), each lands in its own tablespace on
/// the target, by the catalog and by the independent comparison.
#[test]
fn indexes_built_during_the_copy_keep_their_tablespaces() -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (source, target) = common::two_clusters()?;
    for c in [&source, &target] {
        let dir = c.dir().join("ts_fast");
        std::fs::create_dir(&dir)?;
        let owner = std::fs::metadata(c.data_dir())?;
        std::os::unix::fs::chown(&dir, Some(owner.uid()), Some(owner.gid()))?;
        c.psql(
            "postgres",
            &format!("CREATE TABLESPACE fast LOCATION '{}'", dir.display()),
        )?;
        c.create_database("ts")?;
    }
    source.psql(
        "ts",
        "CREATE TABLE a (id int PRIMARY KEY, x text NOT NULL); \
         CREATE INDEX a_x ON a (x) TABLESPACE fast; \
         CREATE TABLE b (id int PRIMARY KEY USING INDEX TABLESPACE fast, y text NOT NULL); \
         CREATE INDEX b_y ON b (y); \
         CREATE TABLE c (id int PRIMARY KEY, z text NOT NULL); \
         CREATE UNIQUE INDEX c_z ON c (z) TABLESPACE fast; \
         INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, 20000) g; \
         INSERT INTO b SELECT g, md5((g * 3)::text) FROM generate_series(1, 20000) g; \
         INSERT INTO c SELECT g, md5((g * 7)::text) FROM generate_series(1, 20000) g;",
    )?;
    let out = Command::new(env!("CARGO_BIN_EXE_haul"))
        .args([
            "copy",
            "--source",
            &source.url("ts"),
            "--target",
            &target.url("ts"),
            "--chunk-size",
            "64KB",
            "--log",
            "info",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "haul copy failed:\n{stderr}");
    assert!(
        stderr.contains("post-data entries applied during the copy"),
        "no index was built during the copy:\n{stderr}"
    );
    let where_sql = "SELECT string_agg(indexname || '=' || coalesce(tablespace, '-'), ' ' \
                     ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'public'";
    let on_source = source.psql("ts", where_sql)?;
    assert_eq!(
        on_source.trim(),
        "a_pkey=- a_x=fast b_pkey=fast b_y=- c_pkey=- c_z=fast"
    );
    assert_eq!(target.psql("ts", where_sql)?.trim(), on_source.trim());
    let diffs = compare_databases(&source.url("ts"), &target.url("ts"))?;
    assert!(
        diffs.is_empty(),
        "source and target differ:\n{}",
        diffs.join("\n")
    );
    Ok(())
}
