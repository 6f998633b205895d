//! Small tables are leased, streamed and restored in groups (one lease, one stream, one target
//! transaction for up to 64 of them), each with its own ledger row. These moves carry the rich
//! fixture plus 150 tiny tables (a few of them empty) through the three roles, kill each role
//! around a group (mid-stream, after its commit, before and on its report), and check independently that source
//! equals target and that every table is in the ledger exactly once with its own rows.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::moves::{Move, Setup};
use haul_faults::Agent;

const TINY: usize = 150;

/// The rich fixture and `TINY` tiny tables in their own schema, written to `dir`.
fn fixture(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let mut sql = std::fs::read_to_string(common::RICH_SQL)?;
    sql.push_str("\nCREATE SCHEMA tiny;\n");
    for i in 0..TINY {
        sql.push_str(&format!(
            "CREATE TABLE tiny.t{i} (id int PRIMARY KEY, v text, at date DEFAULT '2024-01-01');\n"
        ));
        // Every tenth table is empty.
        if i % 10 != 0 {
            sql.push_str(&format!(
                "INSERT INTO tiny.t{i} (id, v) SELECT g, 'row ' || g || ' of {i}' FROM generate_series(1, {}) g;\n",
                1 + i % 7
            ));
        }
    }
    let path = dir.join("groups.sql");
    std::fs::write(&path, sql)?;
    Ok(path)
}

fn start(dir: &tempfile::TempDir, failpoints: Option<&'static str>) -> anyhow::Result<Move> {
    Move::new(Setup {
        bin: common::procs::HAUL.into(),
        fixture: Some(fixture(dir.path())?),
        failpoints,
        ..Default::default()
    })
}

/// Group lines the sender logged: (tables in the group) each.
fn groups_logged(sender: &Agent) -> Vec<usize> {
    sender
        .log_text()
        .lines()
        .filter(|l| l.contains("group of small tables applied"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("tables="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

#[test]
fn small_tables_cross_in_groups_each_applied_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let m = start(&dir, None)?;
    let status = m.finish()?;
    let groups = groups_logged(&m.sender);
    let grouped: usize = groups.iter().sum();
    assert!(
        grouped >= TINY && groups.iter().all(|&n| (2..=64).contains(&n)),
        "the tiny tables went in groups of 2 to 64: {groups:?}"
    );
    assert!(
        groups.len() * 10 < grouped,
        "far fewer leases than tables: {groups:?}"
    );
    // One chunk (and one ledger row, checked by finish) per table, grouped or not.
    let chunks = status["chunks"].as_u64().unwrap_or(0) as usize;
    assert!(chunks > TINY, "{status}");
    assert_eq!(status["chunks_done"].as_u64(), Some(chunks as u64));
    // Each member was read back and compared along the way.
    assert!(
        status["chunks_checked"].as_u64().unwrap_or(0) as usize >= TINY,
        "{status}"
    );
    Ok(())
}

fn killed_in_a_group(point: &'static str, role: fn(&mut Move) -> &mut Agent) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut m = start(&dir, Some(point))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !role(&mut m).exited() {
        anyhow::ensure!(Instant::now() < deadline, "{point} never fired");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = role(&mut m).log_text();
    assert!(log.contains(&format!("failpoint {point} fired")), "{log}");
    role(&mut m).restart()?;
    // finish: equal databases, every chunk once in the ledger, each table's ledger rows
    // adding up to its rows.
    m.finish()?;
    assert!(!groups_logged(&m.sender).is_empty());
    Ok(())
}

/// The group committed on the target, its receipt never left: the group goes out again and
/// the ledger finds every member applied.
#[test]
fn receiver_dies_right_after_a_group_commits() -> anyhow::Result<()> {
    killed_in_a_group("die-after-group-commit", |m| &mut m.receiver)
}

/// The group is applied and its receipt reached the sender, which dies before reporting it:
/// the restarted sender finds every member in the ledger.
#[test]
fn sender_dies_between_a_groups_receipt_and_its_report() -> anyhow::Result<()> {
    killed_in_a_group("die-before-group-report", |m| &mut m.sender)
}

/// The coordinator dies on a group's report: after its restart the group goes out again and
/// the ledger answers for every member.
#[test]
fn coordinator_dies_on_a_groups_report() -> anyhow::Result<()> {
    killed_in_a_group("die-on-group-report", |m| &mut m.coordinator)
}

/// The sender dies with a group's stream half sent: nothing of it commits, and the group is
/// sent again whole by the restarted sender.
#[test]
fn sender_dies_in_the_middle_of_a_group() -> anyhow::Result<()> {
    killed_in_a_group("die-mid-group", |m| &mut m.sender)
}
