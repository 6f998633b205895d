//! Each role killed at the points where a crash is most likely to lose or double something:
//! during planning, and between a chunk's commit on the target and its acknowledgment. The
//! role dies on the spot (`std::process::abort` at a failpoint, which like `kill -9` flushes
//! nothing), is restarted with the same state, and the move must complete with source equal to
//! target and every chunk exactly once in the ledger. Mid-chunk kills are in `restart.rs`,
//! `resume.rs` and `chaos.rs`.

mod common;

use std::time::{Duration, Instant};

use common::moves::{self, Move, Setup};
use haul_faults::Agent;

fn killed_at(point: &'static str, role: fn(&mut Move) -> &mut Agent) -> anyhow::Result<()> {
    let mut m = moves::start(Setup {
        failpoints: Some(point),
        ..Default::default()
    })?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !role(&mut m).exited() {
        anyhow::ensure!(Instant::now() < deadline, "{point} never fired");
        std::thread::sleep(Duration::from_millis(20));
    }
    role(&mut m).restart()?;
    m.finish()?;
    let log = role(&mut m).log_text();
    assert!(
        log.contains(&format!("failpoint {point} fired")),
        "the role did not die at {point}:\n{log}"
    );
    Ok(())
}

#[test]
fn receiver_dies_after_commit_before_its_receipt() -> anyhow::Result<()> {
    killed_at("die-after-commit", |m| &mut m.receiver)
}

#[test]
fn sender_dies_after_the_receipt_before_its_report() -> anyhow::Result<()> {
    killed_at("die-before-chunk-report", |m| &mut m.sender)
}

#[test]
fn coordinator_dies_on_a_chunk_report() -> anyhow::Result<()> {
    killed_at("die-on-chunk-report", |m| &mut m.coordinator)
}

#[test]
fn sender_dies_while_planning() -> anyhow::Result<()> {
    killed_at("die-before-plan-report", |m| &mut m.sender)
}

#[test]
fn receiver_dies_while_planning() -> anyhow::Result<()> {
    killed_at("die-before-pre-data", |m| &mut m.receiver)
}

#[test]
fn coordinator_dies_while_planning() -> anyhow::Result<()> {
    killed_at("die-on-plan-report", |m| &mut m.coordinator)
}

/// Regression: a restore whose RPC was dropped (its sender died) while its transaction was open
/// returned the connection to the pool with the transaction still open. The next user of the
/// connection saw the uncommitted ledger row and answered "already applied", and the chunk was
/// lost when that transaction later rolled back (found by `restart.rs` as a table one row short).
#[test]
fn a_restore_abandoned_mid_transaction_is_rolled_back() -> anyhow::Result<()> {
    let mut m = moves::start(Setup {
        failpoints: Some("stall-before-fence"),
        ..Default::default()
    })?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !m
        .receiver
        .log_text()
        .contains("failpoint stall-before-fence fired")
    {
        anyhow::ensure!(Instant::now() < deadline, "the failpoint never fired");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The restore now sits in its transaction, rows copied and ledger row inserted: take its
    // sender away.
    m.sender.restart()?;
    m.finish()?;
    let log = m.receiver.log_text();
    assert!(
        !log.contains("already a transaction in progress"),
        "a pooled connection was reused inside an abandoned transaction:\n{log}"
    );
    Ok(())
}

/// Every step of finalize where the receiver works, in order. Each `die-` point ends the
/// receiver there and each `stall-` point holds it there for a few seconds.
const RECEIVER_STEPS: [&str; 7] = [
    "in-post-data-wave1",
    "in-post-data-wave2",
    "before-sequences",
    "before-matviews",
    "before-digests",
    "after-digests",
    "in-cleanup",
];

fn wait_for_line(agent: &Agent, line: &str, deadline: Instant) -> anyhow::Result<()> {
    while !agent.log_text().contains(line) {
        if Instant::now() >= deadline {
            let log = agent.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!("never logged: {line}\nlast lines:\n{}", tail.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Arm `points` (each fires once across restarts) in a move that drops its ledger at the end,
/// and restart `role` each time it dies at one of them, in order. The move must end `done`,
/// equal, and with no haul schema left on the target.
fn dies_at_each(points: &[&str], role: fn(&mut Move) -> &mut Agent) -> anyhow::Result<()> {
    let armed: &'static str = Box::leak(points.join(",").into_boxed_str());
    let mut m = moves::start(Setup {
        failpoints: Some(armed),
        drop_ledger: true,
        bwlimit: Some("0"),
        ..Default::default()
    })?;
    let deadline = Instant::now() + Duration::from_secs(240);
    for point in points {
        while !role(&mut m).exited() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{point} never fired:\n{}",
                role(&mut m).log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = role(&mut m).log_text();
        anyhow::ensure!(
            log.contains(&format!("failpoint {point} fired")),
            "the role died elsewhere than at {point}:\n{log}"
        );
        role(&mut m).restart()?;
    }
    m.finish()?;
    Ok(())
}

/// Hold the receiver at each finalize step in turn and kill `role` while it is held there.
fn killed_during_each_step(role: fn(&mut Move) -> &mut Agent) -> anyhow::Result<()> {
    let points: Vec<String> = RECEIVER_STEPS
        .iter()
        .map(|s| format!("stall-{s}"))
        .collect();
    let armed: &'static str = Box::leak(points.join(",").into_boxed_str());
    let mut m = moves::start(Setup {
        failpoints: Some(armed),
        drop_ledger: true,
        bwlimit: Some("0"),
        ..Default::default()
    })?;
    let deadline = Instant::now() + Duration::from_secs(240);
    for point in &points {
        if let Err(e) = wait_for_line(&m.receiver, &format!("failpoint {point} fired"), deadline) {
            let tail = |a: &Agent| {
                let log = a.log_text();
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            };
            anyhow::bail!(
                "{e:#}\ncoordinator:\n{}\nsender:\n{}",
                tail(&m.coordinator),
                tail(&m.sender)
            );
        }
        role(&mut m).restart()?;
    }
    m.finish()?;
    Ok(())
}

#[test]
fn receiver_dies_at_every_finalize_step() -> anyhow::Result<()> {
    let points: Vec<String> = RECEIVER_STEPS.iter().map(|s| format!("die-{s}")).collect();
    let points: Vec<&str> = points.iter().map(String::as_str).collect();
    dies_at_each(&points, |m| &mut m.receiver)
}

#[test]
fn sender_dies_at_every_finalize_step() -> anyhow::Result<()> {
    dies_at_each(
        &[
            "die-before-receiver-finalize",
            "die-before-final-report",
            "die-before-cleanup-report",
        ],
        |m| &mut m.sender,
    )
}

#[test]
fn coordinator_dies_on_the_final_and_cleanup_reports() -> anyhow::Result<()> {
    dies_at_each(&["die-on-final-report", "die-on-cleanup-report"], |m| {
        &mut m.coordinator
    })
}

#[test]
fn coordinator_killed_during_every_finalize_step() -> anyhow::Result<()> {
    killed_during_each_step(|m| &mut m.coordinator)
}

#[test]
fn sender_killed_during_every_finalize_step() -> anyhow::Result<()> {
    killed_during_each_step(|m| &mut m.sender)
}

/// Regression: a coordinator killed while the receiver applied post-data handed the finalize
/// task out again on restart, post-data was applied a second time, and the job failed for good
/// with "cannot create index … relation … already exists".
#[test]
fn a_coordinator_restart_during_post_data_does_not_apply_it_twice() -> anyhow::Result<()> {
    let mut m = moves::start(Setup {
        failpoints: Some("stall-in-post-data-wave1"),
        drop_ledger: true,
        bwlimit: Some("0"),
        ..Default::default()
    })?;
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_for_line(
        &m.receiver,
        "failpoint stall-in-post-data-wave1 fired",
        deadline,
    )?;
    m.coordinator.restart()?;
    let s = m.finish()?;
    assert_eq!(s["phase"], "done", "{s}");
    let log = m.receiver.log_text();
    assert!(!log.contains("already exists"), "{log}");
    Ok(())
}

/// Each role killed while a split table is being read back whole during the copy (held at
/// `stall-in-split-check`) and restarted: the job still ends done, verified, equal by the
/// independent comparison, with no ledger left. A receiver killed there loses the read, and
/// finalize reads the table itself.
#[test]
fn each_role_killed_during_a_split_table_read_back() -> anyhow::Result<()> {
    type Role = fn(&mut Move) -> &mut Agent;
    let roles: [(&str, Role); 3] = [
        ("receiver", |m| &mut m.receiver),
        ("coordinator", |m| &mut m.coordinator),
        ("sender", |m| &mut m.sender),
    ];
    for (name, role) in roles {
        let mut m = moves::start(Setup {
            failpoints: Some("stall-in-split-check"),
            drop_ledger: true,
            bwlimit: Some("0"),
            ..Default::default()
        })?;
        let deadline = Instant::now() + Duration::from_secs(120);
        wait_for_line(
            &m.receiver,
            "failpoint stall-in-split-check fired",
            deadline,
        )?;
        role(&mut m).restart()?;
        let s = m
            .finish()
            .map_err(|e| e.context(format!("{name} killed during a split table's read-back")))?;
        assert_eq!(s["phase"], "done", "{name}: {s}");
    }
    Ok(())
}

/// The receiver killed just after it built a loaded table's indexes and keys while the copy
/// went on (post-data during the copy, before finalize), and restarted: the job ends done and
/// equal by the independent comparison (which covers indexes and keys as pg_dump prints them),
/// and no index or key is made twice, by the restarted receiver's own early sessions or by
/// finalize.
#[test]
fn receiver_killed_after_post_data_built_during_the_copy() -> anyhow::Result<()> {
    let mut m = moves::start(Setup {
        failpoints: Some("die-in-early-post-data"),
        drop_ledger: true,
        bwlimit: Some("0"),
        ..Default::default()
    })?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !m.receiver.exited() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the receiver never built a table's post-data during the copy:\n{}",
            m.receiver.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = m.receiver.log_text();
    anyhow::ensure!(
        log.contains("failpoint die-in-early-post-data fired"),
        "the receiver died elsewhere:\n{log}"
    );
    m.receiver.restart()?;
    let s = m.finish()?;
    assert_eq!(s["phase"], "done", "{s}");
    let log = m.receiver.log_text();
    assert!(!log.contains("already exists"), "{log}");
    assert!(!log.contains("failed during the copy"), "{log}");
    Ok(())
}

/// Indexes and keys of the fixture's kinds (unique, GIN, on an expression, partial, on quoted
/// names, on partitions) built while the copy goes on, as each table split in chunks finishes
/// loading: the target ends equal to the source by the independent comparison, which covers
/// them as pg_dump prints them, and none was made twice.
#[test]
fn indexes_and_keys_are_built_as_their_tables_finish_loading() -> anyhow::Result<()> {
    let m = moves::start(Setup {
        // Small chunks: most tables are split, so each is loaded before the job ends.
        chunk_size: Some("64KB"),
        ..Default::default()
    })?;
    let s = m.finish()?;
    assert_eq!(s["phase"], "done", "{s}");
    let log = m.receiver.log_text();
    let early: u64 = log
        .lines()
        .find(|l| l.contains("post-data entries applied during the copy"))
        .and_then(|l| l.split("entries=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(early >= 8, "{early} entries built during the copy:\n{log}");
    assert!(!log.contains("already exists"), "{log}");
    assert!(!log.contains("failed during the copy"), "{log}");
    Ok(())
}
