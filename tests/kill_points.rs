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
