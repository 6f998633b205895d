//! The target's ledger over a job's life: gone when a job is done (the target ends as the
//! source is), kept on request, and never mistaken for another job's work when a second move
//! comes into a target that still holds an earlier job's ledger.

mod common;

use common::procs::{failure_line, haul};
use common::{compare_databases, two_clusters};

const THREE: &str = "CREATE TABLE a (id int PRIMARY KEY, v text); \
    INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 3000) g; \
    CREATE TABLE b (id int PRIMARY KEY, a_id int REFERENCES a); \
    INSERT INTO b SELECT g, g FROM generate_series(1, 2000) g; \
    CREATE TABLE c (body text); INSERT INTO c SELECT 'c' || g FROM generate_series(1, 302) g;";

fn copy(source: &str, target: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["copy", "--source", source, "--target", target];
    args.extend_from_slice(extra);
    haul(&args)
}

fn haul_schemas(c: &common::Cluster) -> anyhow::Result<String> {
    c.psql(
        "db",
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'haul'",
    )
}

#[test]
fn a_finished_move_leaves_no_haul_schema_unless_kept() -> anyhow::Result<()> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    source.psql("db", THREE)?;
    target.create_database("db")?;
    let out = copy(&source.url("db"), &target.url("db"), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ledger     dropped"), "{stdout}");
    assert_eq!(haul_schemas(&target)?.trim(), "0");
    // With the haul schema gone, the target's dump is the source's.
    let diffs = compare_databases(&source.url("db"), &target.url("db"))?;
    assert!(diffs.is_empty(), "{diffs:?}");

    target.create_database("kept")?;
    let out = copy(&source.url("db"), &target.url("kept"), &["--keep-ledger"]);
    assert!(out.status.success());
    let rows = target.psql("kept", "SELECT count(*) FROM haul.ledger")?;
    assert_eq!(rows.trim(), "3", "one ledger row per table's chunk");
    Ok(())
}

/// Regression: every one-process `copy` named its job `job-1`, so a second move into a target
/// that kept the first one's ledger took the old rows `(job-1, 1..3)` for its own, reported
/// `done` with 5302 rows, and left the (emptied) tables with none.
#[test]
fn a_second_move_into_a_target_with_an_old_ledger_is_refused_naming_it() -> anyhow::Result<()> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    source.psql("db", THREE)?;
    target.create_database("db")?;
    let (src, dst) = (source.url("db"), target.url("db"));
    let first = copy(&src, &dst, &["--keep-ledger"]);
    assert!(first.status.success());
    let old_job: String = target.psql("db", "SELECT DISTINCT job_id FROM haul.ledger")?;
    let old_job = old_job.trim().to_string();
    target.psql("db", "TRUNCATE a, b, c")?;

    // Into the emptied tables.
    let line = failure_line(&copy(&src, &dst, &["--no-schema", "--no-verify"]));
    assert!(
        line.contains("ledger of another haul job") && line.contains(&old_job),
        "{line}"
    );
    // With schema creation.
    let line = failure_line(&copy(&src, &dst, &[]));
    assert!(
        line.contains("ledger of another haul job") && line.contains(&old_job),
        "{line}"
    );
    // Nothing was written by either: the tables are still empty.
    let n = target.psql(
        "db",
        "SELECT (SELECT count(*) FROM a) + (SELECT count(*) FROM b) + (SELECT count(*) FROM c)",
    )?;
    assert_eq!(n.trim(), "0");

    // Cleared as the message says, the same move goes through and moves every row.
    target.psql("db", "DROP SCHEMA haul CASCADE")?;
    let out = copy(&src, &dst, &["--no-schema"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rows       5302"), "{stdout}");
    let diffs = compare_databases(&src, &dst)?;
    assert!(diffs.is_empty(), "{diffs:?}");
    Ok(())
}

#[test]
fn job_ids_are_unique_across_runs() -> anyhow::Result<()> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    source.psql(
        "db",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)",
    )?;
    let mut ids = Vec::new();
    for db in ["one", "two"] {
        target.create_database(db)?;
        let out = copy(&source.url("db"), &target.url(db), &[]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{stdout}");
        let id = stdout
            .lines()
            .find_map(|l| l.strip_prefix("job        "))
            .map(str::trim)
            .unwrap_or_default()
            .to_string();
        assert_eq!(id.len(), 36, "a UUID: {id}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    Ok(())
}

/// Regression: pre-data and post-data are uploaded side by side, and post-data's upload wrote
/// how to undo it into `haul.undo` at once. When it ended before pre-data's preflight had made
/// the ledger (10,000 tables made that likely), the job failed with `relation "haul.undo" does
/// not exist`. Post-data's upload now only stores the script; its undo is written at finalize,
/// before it is applied. Here pre-data's preflight is held back until post-data is in.
#[test]
fn post_data_uploaded_before_the_preflight_made_the_ledger() -> anyhow::Result<()> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    source.psql("db", THREE)?;
    target.create_database("db")?;
    let out = std::process::Command::new(common::procs::HAUL)
        .args([
            "copy",
            "--source",
            &source.url("db"),
            "--target",
            &target.url("db"),
        ])
        .env("HAUL_FAILPOINTS", "stall-before-preflight")
        .env("HAUL_FAILPOINT_STALL_MS", "2000")
        .output()?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        failure_line(&out)
    );
    let diffs = compare_databases(&source.url("db"), &target.url("db"))?;
    assert!(diffs.is_empty(), "{diffs:?}");
    Ok(())
}
