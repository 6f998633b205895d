//! Verification: along the way (each chunk read back from the target after it commits and
//! compared with the sender's row digest) and afterwards with `haul verify`, which names every
//! difference down to its chunk and key range.

mod common;

use common::procs::{failure_line, haul};
use common::{compare_databases, two_clusters};

/// Two key-split tables, a table without a key, a user type in an array (its OID differs on
/// the target), and large objects.
const DB: &str = "
CREATE TYPE mood AS ENUM ('low', 'high');
CREATE TYPE pair AS (a int, m mood);
CREATE TABLE events (id bigint PRIMARY KEY, moods mood[], p pair, body text);
INSERT INTO events SELECT g, ARRAY['low', 'high']::mood[], ROW(g, 'high')::pair, repeat('e', 200)
FROM generate_series(1, 20000) AS g;
CREATE TABLE notes (id int PRIMARY KEY, body text);
INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 3000) AS g;
CREATE TABLE loose (v text);
INSERT INTO loose SELECT 'row ' || g FROM generate_series(1, 5000) AS g;
SELECT count(lo_from_bytea(800000 + g, convert_to(repeat('lo', 100 * g), 'UTF8')))
FROM generate_series(1, 30) AS g;
ANALYZE;
";

/// `haul copy` from `source` into `target` with `extra` flags and `failpoints` armed.
fn copy_armed(
    source: &str,
    target: &str,
    extra: &[&str],
    failpoints: &str,
) -> std::io::Result<std::process::Output> {
    std::process::Command::new(common::procs::HAUL)
        .args(["copy", "--source", source, "--target", target])
        .args(extra)
        .env("HAUL_FAILPOINTS", failpoints)
        .output()
}

fn run(args: &[&str]) -> (bool, String) {
    let out = haul(args);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_move_is_verified_chunk_by_chunk_and_haul_verify_names_every_difference() -> anyhow::Result<()>
{
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    source.psql("db", DB)?;
    target.create_database("db")?;
    let (src, dst) = (source.url("db"), target.url("db"));
    let (ok, out) = run(&[
        "copy",
        "--source",
        &src,
        "--target",
        &dst,
        "--chunk-size",
        "1MB",
    ]);
    assert!(ok, "{out}");
    // Every key-ranged chunk was compared as it was applied; only the table without a key
    // was compared whole at the end.
    let line = out
        .lines()
        .find(|l| l.starts_with("verified"))
        .unwrap_or_default()
        .to_string();
    assert!(line.contains("chunks compared during the move"), "{out}");
    let (ok, out) = run(&[
        "verify",
        "--source",
        &src,
        "--target",
        &dst,
        "--chunk-size",
        "1MB",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("equal"), "{out}");

    // A changed row, a deleted row and a changed large object: each named with its chunk.
    target.psql(
        "db",
        "UPDATE events SET body = 'changed' WHERE id = 15000; \
         DELETE FROM notes WHERE id = 7; \
         SELECT lo_put(800005, 0, '\\x00'::bytea);",
    )?;
    let (ok, out) = run(&[
        "verify",
        "--source",
        &src,
        "--target",
        &dst,
        "--chunk-size",
        "1MB",
    ]);
    assert!(!ok, "{out}");
    let mismatch = |what: &str| {
        out.lines()
            .find(|l| l.starts_with("MISMATCH") && l.contains(what))
            .map(str::to_string)
    };
    let events = mismatch("public.events chunk").unwrap_or_else(|| panic!("{out}"));
    assert!(
        events.contains("id in [") && events.contains("contents differ"),
        "the changed row's chunk and key range: {events}"
    );
    let notes = mismatch("public.notes chunk").unwrap_or_else(|| panic!("{out}"));
    assert!(
        notes.contains("source 3000 rows") && notes.contains("target 2999 rows"),
        "{notes}"
    );
    let objects = mismatch("large objects chunk").unwrap_or_else(|| panic!("{out}"));
    assert!(objects.contains("contents differ"), "{objects}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("MISMATCH")).count(),
        3,
        "exactly the three differences: {out}"
    );
    let last = failure_line(&haul(&["verify", "--source", &src, "--target", &dst]));
    assert!(last.contains("3 difference(s)"), "{last}");
    Ok(())
}

/// A chunk changed on the target after it committed (a trigger, a user) is caught by the
/// read-back while the move goes on; the job fails naming the table, chunk and key range.
#[test]
fn a_chunk_changed_after_commit_fails_the_job_naming_it() -> anyhow::Result<()> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    source.psql(
        "db",
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 1000) AS g;",
    )?;
    target.create_database("db")?;
    let out = copy_armed(
        &source.url("db"),
        &target.url("db"),
        &[],
        "alter-after-commit",
    )?;
    let line = failure_line(&out);
    assert!(
        line.contains("chunk(s) whose rows differ") && line.contains("public.t chunk 1 (whole)"),
        "{line}"
    );
    assert!(
        line.contains("source 1000 rows") && line.contains("target 999 rows"),
        "{line}"
    );
    Ok(())
}

/// Small tables cross in groups, restored in one transaction, and each member is read back
/// before the group's receipt: a member changed right after the commit is named.
#[test]
fn a_small_table_changed_after_its_group_commits_is_named() -> anyhow::Result<()> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    let mut sql = String::new();
    for i in 0..20 {
        sql.push_str(&format!(
            "CREATE TABLE s{i} (id int PRIMARY KEY, v text); \
             INSERT INTO s{i} SELECT g, 'v' || g FROM generate_series(1, 5) AS g;"
        ));
    }
    source.psql("db", &sql)?;
    target.create_database("db")?;
    let out = copy_armed(
        &source.url("db"),
        &target.url("db"),
        &[],
        "alter-after-commit",
    )?;
    let line = failure_line(&out);
    assert!(
        line.contains("chunk(s) whose rows differ") && line.contains("(whole)"),
        "{line}"
    );
    assert_eq!(line.matches("public.s").count(), 1, "one table: {line}");
    assert!(
        line.contains("source 5 rows") && line.contains("target 4 rows"),
        "{line}"
    );
    Ok(())
}

/// A table without an integer key is cut by ctid pages, which select other rows on the target:
/// its chunks cannot be read back one by one. Once its last chunk is in, the whole table is
/// digested on the target while the move goes on, and compared with the sum of the sender's
/// chunk digests, which catches a changed row.
#[test]
fn a_page_split_table_is_compared_whole_against_its_chunks() -> anyhow::Result<()> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    source.psql(
        "db",
        "CREATE TABLE loose (v text); \
         INSERT INTO loose SELECT repeat('row ' || g, 20) FROM generate_series(1, 20000) AS g; ANALYZE;",
    )?;
    target.create_database("db")?;
    let copy = |db: &str, failpoints: &str| {
        copy_armed(
            &source.url("db"),
            &target.url(db),
            &["--chunk-size", "512kB"],
            failpoints,
        )
    };
    let out = copy("db", "")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("verified   1 tables"), "{stdout}");
    // Every chunk counts as compared during the move: the table was read back whole once its
    // last chunk committed, not at the end.
    let compared = stdout
        .split_once("verified")
        .and_then(|(_, rest)| rest.split_once('(')?.1.split_once(" chunks compared"))
        .map(|(n, _)| n.to_string())
        .unwrap_or_default();
    let (done, all) = compared.split_once(" of ").unwrap_or(("", "?"));
    assert!(
        done == all && all != "0",
        "every chunk compared during the move: {stdout}"
    );

    target.create_database("db2")?;
    let line = failure_line(&copy("db2", "alter-after-commit")?);
    assert!(
        line.contains("1 table(s) that differ") && line.contains("public.loose"),
        "{line}"
    );
    Ok(())
}

/// A table split by key ranges is digested whole at the end against the sum of its chunks
/// (reading each range back during the load would scan the index-less target table once per
/// chunk); when it differs, its chunks are read back one by one and the job's error names the
/// chunk and key range that differ.
#[test]
fn a_key_split_table_that_differs_is_drilled_down_to_its_chunk() -> anyhow::Result<()> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    source.psql(
        "db",
        "CREATE TABLE big (id int PRIMARY KEY, v text); \
         INSERT INTO big SELECT g, repeat('v' || g, 10) FROM generate_series(1, 30000) AS g; ANALYZE;",
    )?;
    target.create_database("db")?;
    let out = copy_armed(
        &source.url("db"),
        &target.url("db"),
        &["--chunk-size", "256kB"],
        "alter-after-commit",
    )?;
    let line = failure_line(&out);
    assert!(
        line.contains("chunk(s) whose rows differ") && line.contains("public.big chunk"),
        "{line}"
    );
    assert!(line.contains("id in ["), "the key range is named: {line}");
    assert_eq!(
        line.matches("public.big chunk").count(),
        1,
        "only the changed chunk: {line}"
    );
    Ok(())
}

/// A source with `big`, 30,000 rows that 256 kB chunks split by key, and an empty target.
fn big_split_table() -> anyhow::Result<(common::Cluster, common::Cluster)> {
    let (source, target) = two_clusters()?;
    source.create_database("db")?;
    source.psql(
        "db",
        "CREATE TABLE big (id int PRIMARY KEY, v text); \
         INSERT INTO big SELECT g, repeat('v' || g, 10) FROM generate_series(1, 30000) AS g; ANALYZE;",
    )?;
    Ok((source, target))
}

/// `haul copy` of `big` into a new database `db` of `target`, in 256 kB chunks, logging at
/// info, with `failpoints` armed and one more environment setting.
fn copy_into(
    source: &common::Cluster,
    target: &common::Cluster,
    db: &str,
    failpoints: &str,
    env: (&str, &str),
) -> anyhow::Result<std::process::Output> {
    target.create_database(db)?;
    Ok(std::process::Command::new(common::procs::HAUL)
        .args([
            "copy",
            "--source",
            &source.url("db"),
            "--target",
            &target.url(db),
        ])
        .args(["--chunk-size", "256kB", "--log", "info"])
        .env("HAUL_FAILPOINTS", failpoints)
        .env(env.0, env.1)
        .output()?)
}

/// A clean copy of `big` that succeeded and verified its one table; its log.
fn verified_clean(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", failure_line(out));
    assert!(stdout.contains("verified   1 tables"), "{stdout}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A copy of `big` with a row deleted after commit, failed naming that one chunk.
fn names_the_changed_chunk(out: &std::process::Output) {
    let line = failure_line(out);
    assert!(
        line.contains("chunk(s) whose rows differ") && line.contains("public.big chunk"),
        "{line}"
    );
    assert_eq!(line.matches("public.big chunk").count(), 1, "{line}");
}

/// A split table is read back whole once its last chunk is in, while the rest of the job
/// copies. Finalize does not wait for that read before post-data: when it reaches the
/// comparison it takes the read's result (waiting for it if need be) instead of reading the
/// table a second time. Held back here until finalize has started, the read still decides:
/// a clean move verifies equal with the table read once, and a changed row is still found and
/// named down to its chunk.
#[test]
fn finalize_uses_the_split_table_read_still_running_instead_of_reading_again() -> anyhow::Result<()>
{
    let (source, target) = big_split_table()?;
    let copy = |db: &str, failpoints: &str| {
        copy_into(
            &source,
            &target,
            db,
            failpoints,
            ("HAUL_FAILPOINT_STALL_MS", "3000"),
        )
    };
    let log = verified_clean(&copy("clean", "stall-in-split-check")?);
    // Equal by the independent comparison too, not only by haul's word.
    let diffs = compare_databases(&source.url("db"), &target.url("clean"))?;
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let reads = log
        .lines()
        .filter(|l| l.contains("reading tables back whole on the target"))
        .count();
    assert_eq!(reads, 1, "the table is read back once:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("tables compared whole at finalize") && l.contains("reused=1")),
        "finalize started before the read ended and took its result:\n{log}"
    );

    names_the_changed_chunk(&copy("changed", "stall-in-split-check,alter-after-commit")?);
    Ok(())
}

/// The same, with the table read back at the end in page ranges on several connections (as
/// tables over 64 MB are; here pieces of 8 pages): a clean move verifies equal, and a changed
/// row is still found and drilled down to its one chunk.
#[test]
fn a_table_read_back_in_pieces_verifies_and_still_names_the_changed_chunk() -> anyhow::Result<()> {
    let (source, target) = big_split_table()?;
    let copy = |db: &str, failpoints: &str| {
        copy_into(
            &source,
            &target,
            db,
            failpoints,
            ("HAUL_READBACK_PIECE_PAGES", "8"),
        )
    };
    let log = verified_clean(&copy("clean", "")?);
    let pieces: u64 = log
        .lines()
        .find(|l| l.contains("reading tables back whole on the target"))
        .and_then(|l| l.split("pieces=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the table was not read back at the end:\n{log}"));
    assert!(pieces > 10, "read back in {pieces} pieces");
    names_the_changed_chunk(&copy("changed", "alter-after-commit")?);
    Ok(())
}

/// `haul verify --coordinator`: a finished job compared again by its own agents (the sender
/// reads the source, the receiver the target; the operator's process holds no URL), with every
/// difference named down to the job's chunk.
#[test]
fn a_finished_job_is_verified_through_its_agents_down_to_the_chunk() -> anyhow::Result<()> {
    let m = common::moves::start(common::moves::Setup {
        chunk_size: Some("4MB"),
        bwlimit: Some("200MB"),
        drop_ledger: true,
        ..Default::default()
    })?;
    m.finish()?;
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", "--coordinator", &m.coord, "--certs", &m.certs];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (ok, out) = verify(&[]);
    assert!(ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("verified"))
        .unwrap_or_default();
    assert!(
        line.contains("and large objects") && line.contains("sequences: equal"),
        "{out}"
    );

    // A changed row and a deleted row in two chunks of the split table, a changed large
    // object, a sequence set back.
    m.target.psql(
        haul_faults::moves::DB,
        "UPDATE public.big_events SET payload = 'changed' WHERE id = 1000; \
         DELETE FROM public.big_events WHERE id = 1200000; \
         SELECT lo_put(910003, 0, '\\x00'); \
         SELECT setval('public.fresh_seq', 99);",
    )?;
    let (ok, out) = verify(&[]);
    assert!(!ok, "{out}");
    let mismatches: Vec<&str> = out.lines().filter(|l| l.starts_with("MISMATCH")).collect();
    let big: Vec<&&str> = mismatches
        .iter()
        .filter(|l| l.contains("public.big_events chunk"))
        .collect();
    assert_eq!(big.len(), 2, "{out}");
    assert!(big.iter().any(|l| l.contains("contents differ")), "{out}");
    assert!(
        mismatches.iter().any(|l| l.contains("large objects chunk")),
        "{out}"
    );
    assert!(
        mismatches
            .iter()
            .any(|l| l.contains("sequence public.fresh_seq")),
        "{out}"
    );
    assert_eq!(mismatches.len(), 4, "{out}");

    // --tables limits the comparison (and leaves large objects and sequences out).
    let (ok, out) = verify(&["--tables", "public.customers"]);
    assert!(ok, "{out}");
    assert!(out.contains("verified   1 tables"), "{out}");

    // A job that is not there: one line naming it, non-zero.
    let out = haul(&[
        "verify",
        "--coordinator",
        &m.coord,
        "--certs",
        &m.certs,
        "--job",
        "no-such-job",
    ]);
    assert!(!out.status.success());
    assert_eq!(failure_line(&out), "haul: no job no-such-job");
    Ok(())
}

/// A verify run whose sender dies in the middle goes to the sender's new process, from the
/// start, and the operator's `haul verify` still ends with the result.
#[test]
fn a_verify_run_outlives_the_sender_carrying_it() -> anyhow::Result<()> {
    let mut m = common::moves::start(common::moves::Setup {
        chunk_size: Some("4MB"),
        bwlimit: Some("200MB"),
        drop_ledger: true,
        failpoints: Some("die-in-verify"),
        ..Default::default()
    })?;
    m.finish()?;
    let verify = std::process::Command::new(common::procs::HAUL)
        .args(["verify", "--coordinator", &m.coord, "--certs", &m.certs])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !m.sender.exited() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the sender never died in the verify run:\n{}",
            m.sender.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(m
        .sender
        .log_text()
        .contains("failpoint die-in-verify fired"));
    m.sender.restart()?;
    let out = verify.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("sequences: equal"), "{text}");
    Ok(())
}
