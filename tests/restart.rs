//! Agents die and come back: each role is killed with SIGKILL in the middle of a move and
//! restarted on the same state; the move completes, source and target compare equal, and the
//! target's ledger holds every chunk exactly once. A restarted sender that held the job's
//! snapshot makes the coordinator have a new one exported, and the job says it is no longer
//! consistent as of one snapshot.

mod common;

use common::moves::{self, Setup};

#[test]
fn coordinator_and_receiver_survive_kill_9() -> anyhow::Result<()> {
    let mut m = moves::start(Setup::default())?;
    let before = m.wait_for_chunks(3)?;
    m.coordinator.restart()?;
    let after_coordinator = m.wait_for_chunks(before + 3)?;
    m.receiver.restart()?;
    m.wait_for_chunks(after_coordinator + 3)?;
    let s = m.finish()?;
    assert_eq!(s["consistent"], true, "{s}");
    Ok(())
}

#[test]
fn sender_restart_exports_a_new_snapshot() -> anyhow::Result<()> {
    let mut m = moves::start(Setup::default())?;
    let before = m.wait_for_chunks(3)?;
    m.sender.restart()?;
    m.wait_for_chunks(before + 3)?;
    let s = m.finish()?;
    // The first snapshot died with the sender: the chunks are split between two snapshots, and
    // the target's ledger agrees.
    assert_eq!(s["consistent"], false, "{s}");
    let snapshots = s["snapshots"].as_array().map(|a| a.len()).unwrap_or(0);
    assert_eq!(snapshots, 2, "{s}");
    let in_ledger = m.target.psql(
        "rich",
        "SELECT count(DISTINCT snapshot_id) FROM haul.ledger",
    )?;
    assert_eq!(in_ledger.trim(), "2");
    Ok(())
}
