//! Agents die and come back: the coordinator and the receiver are each killed with SIGKILL in
//! the middle of a move and restarted on the same state; the move completes, source and target
//! compare equal, and the target's ledger holds every chunk exactly once.

mod common;

use std::time::{Duration, Instant};

use common::procs::{free_addr, haul, Agent};
use common::{compare_databases, load_rich, Cluster, ClusterOptions};

/// `haul status --json` of the latest job, once the coordinator answers.
fn status(coord: &str, certs: &str) -> Option<serde_json::Value> {
    let out = haul(&["status", "--coordinator", coord, "--certs", certs, "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Wait until the job has at least `n` chunks done (and is still copying).
fn wait_for_chunks(coord: &str, certs: &str, n: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Some(s) = status(coord, certs) {
            let done = s["chunks_done"].as_u64().unwrap_or(0);
            anyhow::ensure!(s["phase"] != "failed", "job failed: {}", s["error"]);
            if done >= n {
                anyhow::ensure!(
                    s["phase"] == "copying",
                    "the move ended before the kill: {s}"
                );
                return Ok(done);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("no progress to {n} chunks")
}

#[test]
fn coordinator_and_receiver_survive_kill_9() -> anyhow::Result<()> {
    let (source, target) = std::thread::scope(|s| {
        let a = s.spawn(|| Cluster::start(ClusterOptions::default()));
        let b = s.spawn(|| Cluster::start(ClusterOptions::default()));
        (a.join(), b.join())
    });
    let source = source.map_err(|_| anyhow::anyhow!("start panicked"))??;
    let target = target.map_err(|_| anyhow::anyhow!("start panicked"))??;
    load_rich(&source, "rich")?;
    target.create_database("rich")?;

    let dir = tempfile::tempdir()?;
    let d = |p: &str| dir.path().join(p).display().to_string();
    let certs = d("certs");
    assert!(haul(&["certs", "init", "--dir", &certs]).status.success());
    let coord = free_addr();
    let recv = free_addr();
    let mut coordinator = Agent::spawn(
        dir.path(),
        "coordinator",
        &[
            "--listen",
            &coord,
            "--state",
            &d("cstate"),
            "--certs",
            &certs,
        ],
    )?;
    let mut receiver = Agent::spawn(
        dir.path(),
        "receiver",
        &[
            "--coordinator",
            &coord,
            "--listen",
            &recv,
            "--target",
            &target.url("rich"),
            "--state",
            &d("rstate"),
            "--spool",
            &d("spool"),
            "--certs",
            &certs,
        ],
    )?;
    let sender = Agent::spawn(
        dir.path(),
        "sender",
        &[
            "--coordinator",
            &coord,
            "--source",
            &source.url("rich"),
            "--state",
            &d("sstate"),
            "--certs",
            &certs,
        ],
    )?;

    // Small chunks and a bandwidth cap stretch the move over several seconds of kills.
    let start = || {
        haul(&[
            "start",
            "--coordinator",
            &coord,
            "--certs",
            &certs,
            "--chunk-size",
            "1MB",
            "--jobs",
            "2",
            "--bwlimit",
            "2MB",
        ])
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !start().status.success() {
        anyhow::ensure!(Instant::now() < deadline, "could not start the job");
        std::thread::sleep(Duration::from_millis(100));
    }

    let before = wait_for_chunks(&coord, &certs, 3)?;
    coordinator.restart()?;
    let after_coordinator = wait_for_chunks(&coord, &certs, before + 3)?;
    receiver.restart()?;
    wait_for_chunks(&coord, &certs, after_coordinator + 3)?;

    let out = haul(&[
        "status",
        "--coordinator",
        &coord,
        "--certs",
        &certs,
        "--wait",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the move did not finish after the kills\n{stdout}\n{}\ncoordinator:\n{}\nreceiver:\n{}\nsender:\n{}",
        String::from_utf8_lossy(&out.stderr),
        coordinator.log_text(),
        receiver.log_text(),
        sender.log_text()
    );

    let diffs = compare_databases(&source.url("rich"), &target.url("rich"))?;
    assert!(
        diffs.is_empty(),
        "source and target differ:\n{}",
        diffs.join("\n")
    );
    let ledger = target.psql(
        "rich",
        "SELECT count(*), count(DISTINCT chunk_id) FROM haul.ledger",
    )?;
    let (rows, distinct) = ledger.split_once('|').unwrap_or(("", ""));
    assert_eq!(rows, distinct, "a chunk was applied twice: {ledger}");
    let planned = status(&coord, &certs)
        .and_then(|s| s["chunks"].as_u64())
        .unwrap_or(0);
    assert_eq!(
        rows.trim().parse::<u64>()?,
        planned,
        "ledger rows vs planned chunks"
    );
    Ok(())
}
