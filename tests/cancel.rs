//! `haul cancel` on real moves of the rich fixture (schemas, partitions, foreign keys, views, a
//! materialized view, sequences, large objects): the target ends as the preflight found it,
//! compared with an untouched database of the same target cluster by the independent
//! comparison (pg_dump of the schema, every table, sequence and large object), and the `haul`
//! schema is gone. With `--keep-target` nothing is undone and the output says what is there.

mod common;

use std::time::{Duration, Instant};

use common::moves::{self, Move, Setup};
use common::procs::{failure_line, haul};
use haul_faults::moves::{schema_of, DB};

fn cancel(m: &Move, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["cancel", "--coordinator", &m.coord, "--certs", &m.certs];
    args.extend(extra);
    haul(&args)
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has_haul_schema(m: &Move) -> anyhow::Result<bool> {
    Ok(m.target
        .psql(DB, "SELECT to_regnamespace('haul') IS NOT NULL")?
        .trim()
        == "t")
}

/// Wait until the job has done `n` chunks, and is still copying.
fn copying_with(m: &Move, n: u64) -> anyhow::Result<()> {
    let done = m.wait_for_chunks(n)?;
    let s = m.status().unwrap_or_default();
    anyhow::ensure!(
        s["phase"] == "copying",
        "the job left copying before the cancel ({done} chunks): {s}"
    );
    Ok(())
}

/// The target's database against an untouched one of the same cluster: no difference.
fn as_found(m: &Move, pristine: &str) -> anyhow::Result<()> {
    let diffs = haul_pgcluster::compare_databases(&m.target.url(pristine), &m.target.url(DB))?;
    anyhow::ensure!(
        diffs.is_empty(),
        "the target is not as the preflight found it:\n{}",
        diffs.join("\n")
    );
    anyhow::ensure!(!has_haul_schema(m)?, "schema haul left on the target");
    Ok(())
}

#[test]
fn a_job_cancelled_while_copying_leaves_the_target_as_it_found_it() -> anyhow::Result<()> {
    let m = moves::start(Setup {
        bulk_mb: 24,
        bwlimit: Some("4MB"),
        ..Default::default()
    })?;
    m.target.create_database("pristine")?;
    copying_with(&m, 4)?;
    let out = cancel(&m, &[]);
    let said = text(&out);
    assert!(out.status.success(), "{said}{}", failure_line(&out));
    assert!(said.contains("cancelling"), "{said}");
    assert!(said.contains("result     cancelled"), "{said}");
    assert!(
        said.contains("undone     drop the objects pre-data created"),
        "{said}"
    );
    assert!(
        said.contains("undone     remove the large objects"),
        "{said}"
    );
    assert!(
        said.contains("left       nothing: the target is as the preflight found it"),
        "{said}"
    );
    as_found(&m, "pristine")?;

    // Over for good: status says so and exits non-zero; steering it again is refused.
    let s = m.status().unwrap_or_default();
    assert_eq!(s["phase"], "cancelled", "{s}");
    let out = haul(&[
        "status",
        "--coordinator",
        &m.coord,
        "--certs",
        &m.certs,
        "--wait",
    ]);
    assert!(
        !out.status.success(),
        "status --wait of a cancelled job exited 0"
    );
    assert!(
        failure_line(&out).contains("was cancelled"),
        "{}",
        failure_line(&out)
    );
    for again in [
        cancel(&m, &[]),
        haul(&["resume", "--coordinator", &m.coord, "--certs", &m.certs]),
    ] {
        assert!(!again.status.success(), "{}", text(&again));
        assert!(
            failure_line(&again).contains("cancelled"),
            "{}",
            failure_line(&again)
        );
    }
    // Nothing of the job reaches the target afterwards.
    std::thread::sleep(Duration::from_secs(2));
    as_found(&m, "pristine")?;
    assert!(!m.sender.log_text().contains("panicked"));
    Ok(())
}

/// Cancelled while post-data is going in (held there by a failpoint): indexes, keys and
/// foreign keys between the tables are undone before the tables.
#[test]
fn a_job_cancelled_during_post_data_is_undone_whole() -> anyhow::Result<()> {
    let m = moves::start(Setup {
        failpoints: Some("stall-in-post-data-wave2"),
        bwlimit: Some("0"),
        ..Default::default()
    })?;
    m.target.create_database("pristine")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !m
        .receiver
        .log_text()
        .contains("failpoint stall-in-post-data-wave2 fired")
    {
        anyhow::ensure!(Instant::now() < deadline, "post-data never began");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = cancel(&m, &[]);
    let said = text(&out);
    assert!(out.status.success(), "{said}{}", failure_line(&out));
    assert!(
        said.contains("undone     drop the indexes, keys and triggers post-data created"),
        "{said}"
    );
    assert!(said.contains("left       nothing"), "{said}");
    as_found(&m, "pristine")?;
    Ok(())
}

/// Into a target that had the schema (`--no-schema`): the cancel empties the tables again and
/// sets the sequences back, so the target equals a copy of the schema nothing was loaded into.
#[test]
fn a_no_schema_job_cancelled_empties_what_it_loaded() -> anyhow::Result<()> {
    let m = moves::start(Setup {
        target_schema: true,
        start_args: vec!["--no-schema"],
        bulk_mb: 16,
        bwlimit: Some("4MB"),
        ..Default::default()
    })?;
    let schema = schema_of(&m.source, DB)?;
    m.target.create_database("pristine")?;
    m.target.psql("pristine", &schema)?;
    copying_with(&m, 4)?;
    let out = cancel(&m, &[]);
    let said = text(&out);
    assert!(out.status.success(), "{said}{}", failure_line(&out));
    assert!(
        said.contains("undone     empty the loaded tables"),
        "{said}"
    );
    assert!(!said.contains("pre-data"), "{said}");
    assert!(said.contains("left       nothing"), "{said}");
    as_found(&m, "pristine")?;
    Ok(())
}

/// `--keep-target`: nothing is undone, and the output names what the job left there.
#[test]
fn cancel_keep_target_says_what_the_job_left() -> anyhow::Result<()> {
    let m = moves::start(Setup {
        bulk_mb: 16,
        bwlimit: Some("4MB"),
        ..Default::default()
    })?;
    copying_with(&m, 4)?;
    let out = cancel(&m, &["--keep-target"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}{}", failure_line(&out));
    assert!(said.contains("undone     nothing"), "{said}");
    assert!(said.contains("left       rows in "), "{said}");
    assert!(
        said.contains("left       schema haul with the job's ledger"),
        "{said}"
    );
    assert!(has_haul_schema(&m)?, "--keep-target dropped the ledger");
    let chunks: i64 = m
        .target
        .psql(DB, "SELECT count(*) FROM haul.ledger")?
        .trim()
        .parse()?;
    assert!(chunks >= 4, "{chunks} chunks in the ledger");
    let s = m.status().unwrap_or_default();
    assert_eq!(s["phase"], "cancelled", "{s}");
    assert!(s["left"].as_array().is_some_and(|l| !l.is_empty()), "{s}");
    Ok(())
}

/// The coordinator restarted while the receiver holds the undo (a failpoint stalls it there):
/// the cancel is handed out again, runs again harmlessly, and the job ends cancelled with the
/// target as it was.
#[test]
fn a_coordinator_restart_during_the_undo_still_ends_cancelled() -> anyhow::Result<()> {
    let mut m = moves::start(Setup {
        bulk_mb: 16,
        bwlimit: Some("4MB"),
        failpoints: Some("stall-in-cleanup"),
        ..Default::default()
    })?;
    m.target.create_database("pristine")?;
    copying_with(&m, 3)?;
    let out = cancel(&m, &["--no-wait"]);
    assert!(out.status.success(), "{}", failure_line(&out));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !m
        .receiver
        .log_text()
        .contains("failpoint stall-in-cleanup fired")
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the undo never reached the receiver"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m.coordinator.restart()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = m.status().unwrap_or_default();
        if s["phase"] == "cancelled" {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "never cancelled: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(s["left"].as_array().is_some_and(|l| l.is_empty()), "{s}");
    as_found(&m, "pristine")?;
    Ok(())
}

/// The receiver killed in the middle of the undo, then the sender killed after it, before its
/// report: each comes back, the undo is handed out again, and the job ends cancelled with the
/// target as it was.
#[test]
fn a_receiver_and_a_sender_killed_during_the_undo_still_end_cancelled() -> anyhow::Result<()> {
    let mut m = moves::start(Setup {
        bulk_mb: 16,
        bwlimit: Some("4MB"),
        failpoints: Some("die-in-cleanup,die-before-cleanup-report"),
        ..Default::default()
    })?;
    m.target.create_database("pristine")?;
    copying_with(&m, 3)?;
    let out = cancel(&m, &["--no-wait"]);
    assert!(out.status.success(), "{}", failure_line(&out));
    let deadline = Instant::now() + Duration::from_secs(60);
    for (point, receiver) in [
        ("die-in-cleanup", true),
        ("die-before-cleanup-report", false),
    ] {
        loop {
            let agent = if receiver {
                &mut m.receiver
            } else {
                &mut m.sender
            };
            if agent.exited() {
                let log = agent.log_text();
                anyhow::ensure!(
                    log.contains(&format!("failpoint {point} fired")),
                    "died elsewhere than at {point}:\n{log}"
                );
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{point} never fired");
            std::thread::sleep(Duration::from_millis(20));
        }
        if receiver {
            m.receiver.restart()?;
        } else {
            m.sender.restart()?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let s = loop {
        let s = m.status().unwrap_or_default();
        if s["phase"] == "cancelled" {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "never cancelled: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(s["left"].as_array().is_some_and(|l| l.is_empty()), "{s}");
    as_found(&m, "pristine")?;
    Ok(())
}
