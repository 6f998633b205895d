//! A whole move with the three roles as processes, for tests that break things in the middle of
//! it: kill a role, cut or stall a link. `finish` waits for the end and checks the outcome
//! independently: source equals target, and the ledger holds every chunk exactly once.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use super::link::Link;
use super::procs::{free_addr, haul, Agent};
use super::{compare_databases, load_rich, Cluster};

/// `haul status --json` of the latest job, once the coordinator answers.
pub fn status(coord: &str, certs: &str) -> Option<serde_json::Value> {
    let out = haul(&["status", "--coordinator", coord, "--certs", certs, "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Wait until the job has at least `n` chunks done (and is still copying).
pub fn wait_for_chunks(coord: &str, certs: &str, n: u64) -> anyhow::Result<u64> {
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

/// Where to put link emulators, and the coordinator's lease timeout.
#[derive(Default)]
pub struct Setup {
    /// A link between the sender and the receiver (the receiver advertises the link's address).
    pub link_to_receiver: bool,
    /// A link between the sender and the coordinator (the receiver talks to it directly).
    pub link_to_coordinator: bool,
    pub lease_timeout: Option<&'static str>,
    /// Where the receiver spools (default: inside the move's temp dir).
    pub spool: Option<std::path::PathBuf>,
    /// Add `public.bulk`, about this many MB of binary COPY data (0 = none), so chunks span
    /// many blocks.
    pub bulk_mb: u64,
    /// `haul start` options (defaults: 1MB chunks, 2MB/s cap, the default codec).
    pub chunk_size: Option<&'static str>,
    pub bwlimit: Option<&'static str>,
    pub codec: Option<&'static str>,
}

/// Two clusters with the rich fixture, a CA, and the three roles as processes, with a job
/// started that is stretched over several seconds (small chunks, a bandwidth cap).
pub struct Move {
    pub source: Cluster,
    pub target: Cluster,
    _dir: tempfile::TempDir,
    pub coord: String,
    pub certs: String,
    pub coordinator: Agent,
    pub receiver: Agent,
    pub sender: Agent,
    pub to_receiver: Option<Link>,
    pub to_coordinator: Option<Link>,
}

impl Move {
    pub fn new(setup: Setup) -> anyhow::Result<Move> {
        let (source, target) = super::two_clusters()?;
        load_rich(&source, "rich")?;
        target.create_database("rich")?;
        if setup.bulk_mb > 0 {
            // About 210 bytes per row in binary COPY.
            let rows = setup.bulk_mb * 1_000_000 / 210;
            source.psql(
                "rich",
                &format!(
                    "CREATE TABLE public.bulk (id bigint PRIMARY KEY, pad text NOT NULL); \
                     INSERT INTO public.bulk SELECT g, repeat(md5(g::text), 6) \
                     FROM generate_series(1, {rows}) AS g; ANALYZE public.bulk;"
                ),
            )?;
        }

        let dir = tempfile::tempdir()?;
        let d = |p: &str| dir.path().join(p).display().to_string();
        let certs = d("certs");
        anyhow::ensure!(haul(&["certs", "init", "--dir", &certs]).status.success());
        let coord = free_addr();
        let recv = free_addr();
        let to_receiver = if setup.link_to_receiver {
            Some(Link::start(&recv)?)
        } else {
            None
        };
        let to_coordinator = if setup.link_to_coordinator {
            Some(Link::start(&coord)?)
        } else {
            None
        };
        let advertise = to_receiver
            .as_ref()
            .map_or(recv.clone(), |l| l.addr.clone());
        let sender_coord = to_coordinator
            .as_ref()
            .map_or(coord.clone(), |l| l.addr.clone());
        let (cstate, rstate, sstate) = (d("cstate"), d("rstate"), d("sstate"));
        let spool = setup
            .spool
            .as_ref()
            .map_or_else(|| d("spool"), |p| p.display().to_string());
        let (source_url, target_url) = (source.url("rich"), target.url("rich"));
        let mut cargs = vec!["--listen", &coord, "--state", &cstate, "--certs", &certs];
        if let Some(t) = setup.lease_timeout {
            cargs.extend(["--lease-timeout", t]);
        }
        let coordinator = Agent::spawn(dir.path(), "coordinator", &cargs)?;
        let receiver = Agent::spawn(
            dir.path(),
            "receiver",
            &[
                "--coordinator",
                &coord,
                "--listen",
                &recv,
                "--advertise",
                &advertise,
                "--target",
                &target_url,
                "--state",
                &rstate,
                "--spool",
                &spool,
                "--certs",
                &certs,
            ],
        )?;
        let sender = Agent::spawn(
            dir.path(),
            "sender",
            &[
                "--coordinator",
                &sender_coord,
                "--source",
                &source_url,
                "--state",
                &sstate,
                "--certs",
                &certs,
            ],
        )?;
        // Small chunks and a bandwidth cap stretch the move over several seconds of kills.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut args = vec![
                "start",
                "--coordinator",
                &coord,
                "--certs",
                &certs,
                "--chunk-size",
                setup.chunk_size.unwrap_or("1MB"),
                "--jobs",
                "2",
                "--bwlimit",
                setup.bwlimit.unwrap_or("2MB"),
            ];
            if let Some(codec) = setup.codec {
                args.extend(["--codec", codec]);
            }
            let out = haul(&args);
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
            to_receiver,
            to_coordinator,
        })
    }

    /// A path inside the move's temp dir (`rstate` is the receiver's state, `spool` its spool).
    pub fn path(&self, p: &str) -> std::path::PathBuf {
        self._dir.path().join(p)
    }

    pub fn wait_for_chunks(&self, n: u64) -> anyhow::Result<u64> {
        wait_for_chunks(&self.coord, &self.certs, n)
    }

    /// Wait for the end, then check the outcome independently. Returns the final status.
    pub fn finish(&self) -> anyhow::Result<serde_json::Value> {
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
