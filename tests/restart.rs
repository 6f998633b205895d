//! Agents die and come back: each role is killed with SIGKILL in the middle of a move and
//! restarted on the same state; the move completes, source and target compare equal, and the
//! target's ledger holds every chunk exactly once. A restarted sender that held the job's
//! snapshot makes the coordinator have a new one exported, and the job says it is no longer
//! consistent as of one snapshot.

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

/// Two clusters with the rich fixture, a CA, and the three roles as processes.
struct Move {
    source: Cluster,
    target: Cluster,
    _dir: tempfile::TempDir,
    coord: String,
    certs: String,
    coordinator: Agent,
    receiver: Agent,
    sender: Agent,
}

impl Move {
    fn new() -> anyhow::Result<Move> {
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
        anyhow::ensure!(haul(&["certs", "init", "--dir", &certs]).status.success());
        let coord = free_addr();
        let recv = free_addr();
        let coordinator = Agent::spawn(
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
        let receiver = Agent::spawn(
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
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = haul(&[
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
            ]);
            if out.status.success() {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "could not start the job");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Move {
            source,
            target,
            _dir: dir,
            coord,
            certs,
            coordinator,
            receiver,
            sender,
        })
    }

    fn wait_for_chunks(&self, n: u64) -> anyhow::Result<u64> {
        wait_for_chunks(&self.coord, &self.certs, n)
    }

    /// Wait for the end, then check the outcome independently. Returns the final status.
    fn finish(&self) -> anyhow::Result<serde_json::Value> {
        let out = haul(&[
            "status",
            "--coordinator",
            &self.coord,
            "--certs",
            &self.certs,
            "--wait",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "the move did not finish after the kills\n{stdout}\n{}\ncoordinator:\n{}\nreceiver:\n{}\nsender:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.coordinator.log_text(),
            self.receiver.log_text(),
            self.sender.log_text()
        );
        if std::env::var_os("HAUL_TEST_LOGS").is_some() {
            eprintln!(
                "coordinator:\n{}\nreceiver:\n{}\nsender:\n{}",
                self.coordinator.log_text(),
                self.receiver.log_text(),
                self.sender.log_text()
            );
        }
        let diffs = compare_databases(&self.source.url("rich"), &self.target.url("rich"))?;
        anyhow::ensure!(
            diffs.is_empty(),
            "source and target differ:\n{}",
            diffs.join("\n")
        );
        let ledger = self.target.psql(
            "rich",
            "SELECT count(*), count(DISTINCT chunk_id) FROM haul.ledger",
        )?;
        let (rows, distinct) = ledger.split_once('|').unwrap_or(("", ""));
        anyhow::ensure!(rows == distinct, "a chunk was applied twice: {ledger}");
        let s = status(&self.coord, &self.certs).ok_or_else(|| anyhow::anyhow!("no status"))?;
        let planned = s["chunks"].as_u64().unwrap_or(0);
        anyhow::ensure!(
            rows.trim().parse::<u64>()? == planned,
            "ledger has {rows} chunks, plan has {planned}"
        );
        Ok(s)
    }
}

#[test]
fn coordinator_and_receiver_survive_kill_9() -> anyhow::Result<()> {
    let mut m = Move::new()?;
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
    let mut m = Move::new()?;
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
