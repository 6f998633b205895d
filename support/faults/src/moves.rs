//! A whole move with the three roles as processes, for tests that break things in the middle of
//! it: kill a role, cut or stall a link. `finish` waits for the end and checks the outcome
//! independently: source equals target, and the ledger holds every chunk exactly once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use haul_pgcluster::{compare_databases, Cluster, ClusterOptions};

use crate::{free_addr, Agent, Link};

/// The database moved, on both clusters.
pub const DB: &str = "rich";

fn run(bin: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", bin.display()))
}

/// `haul status --json` of the latest job, once the coordinator answers.
fn status(bin: &Path, coord: &str, certs: &str) -> Option<serde_json::Value> {
    let out = run(
        bin,
        &["status", "--coordinator", coord, "--certs", certs, "--json"],
    )
    .ok()?;
    // A failed job's status exits non-zero, and still prints its JSON.
    serde_json::from_slice(&out.stdout).ok()
}

/// Wait until the job has at least `n` chunks done (and is still copying).
fn wait_for_chunks(bin: &Path, coord: &str, certs: &str, n: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Some(s) = status(bin, coord, certs) {
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

/// What to move and how to break it.
#[derive(Default)]
pub struct Setup {
    /// The haul binary.
    pub bin: PathBuf,
    /// SQL loaded into the source database first (a fixture), if any.
    pub fixture: Option<PathBuf>,
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
    /// `haul start` options (defaults: 1MB chunks, 2MB/s cap, the default codec, 2 jobs).
    pub chunk_size: Option<&'static str>,
    pub jobs: Option<&'static str>,
    pub bwlimit: Option<&'static str>,
    pub codec: Option<&'static str>,
    /// More flags for the receiver.
    pub receiver_args: Vec<&'static str>,
    /// More flags for `haul start`.
    pub start_args: Vec<&'static str>,
    /// Give the target the source's schema before the job starts (for `--no-schema`).
    pub target_schema: bool,
    /// More flags for the coordinator (owned: an address picked at run time, say).
    pub coordinator_args: Vec<String>,
    /// `haul start --connections` (default: haul's choice).
    pub connections: Option<&'static str>,
    /// With `link_to_receiver`: a cap per TCP connection through that link (0 = none), set
    /// before the job starts.
    pub link_connection_rate: u64,
    /// Failpoints armed in every role (`HAUL_FAILPOINTS`), each firing once across restarts.
    pub failpoints: Option<&'static str>,
    /// Let the job drop its ledger at the end, as it does by default. Off here unless asked
    /// for: most tests read the ledger afterwards to prove each chunk went in exactly once.
    pub drop_ledger: bool,
}

/// Two clusters with the rich fixture, a CA, and the three roles as processes, with a job
/// started that is stretched over several seconds (small chunks, a bandwidth cap).
pub struct Move {
    pub bin: PathBuf,
    pub source: Cluster,
    pub target: Cluster,
    _dir: tempfile::TempDir,
    pub coord: String,
    pub certs: String,
    /// The address the receiver advertises (through the link, when there is one).
    pub receiver_addr: String,
    pub coordinator: Agent,
    pub receiver: Agent,
    pub sender: Agent,
    pub to_receiver: Option<Link>,
    pub to_coordinator: Option<Link>,
    pub drop_ledger: bool,
}

impl Move {
    pub fn new(setup: Setup) -> anyhow::Result<Move> {
        let (source, target) = two_clusters()?;
        source.create_database(DB)?;
        target.create_database(DB)?;
        if let Some(sql) = &setup.fixture {
            let text =
                std::fs::read_to_string(sql).with_context(|| format!("read {}", sql.display()))?;
            source
                .psql(DB, &text)
                .with_context(|| format!("load {} into the source", sql.display()))?;
        }
        if setup.bulk_mb > 0 {
            // About 210 bytes per row in binary COPY.
            let rows = setup.bulk_mb * 1_000_000 / 210;
            source.psql(
                DB,
                &format!(
                    "CREATE TABLE public.bulk (id bigint PRIMARY KEY, pad text NOT NULL); \
                     INSERT INTO public.bulk SELECT g, repeat(md5(g::text), 6) \
                     FROM generate_series(1, {rows}) AS g; ANALYZE public.bulk;"
                ),
            )?;
        }
        if setup.target_schema {
            target.psql(DB, &schema_of(&source, DB)?)?;
        }

        let dir = tempfile::tempdir()?;
        let d = |p: &str| dir.path().join(p).display().to_string();
        let certs = d("certs");
        let bin = setup.bin.clone();
        anyhow::ensure!(run(&bin, &["certs", "init", "--dir", &certs])?
            .status
            .success());
        let coord = free_addr();
        let recv = free_addr();
        let to_receiver = if setup.link_to_receiver {
            let l = Link::start(&recv)?;
            l.set_connection_rate(setup.link_connection_rate);
            Some(l)
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
        let mut env = Vec::new();
        if let Some(points) = setup.failpoints {
            let once = dir.path().join("failpoints");
            std::fs::create_dir_all(&once)?;
            env.push(("HAUL_FAILPOINTS".to_string(), points.to_string()));
            env.push((
                "HAUL_FAILPOINTS_ONCE_DIR".to_string(),
                once.display().to_string(),
            ));
        }
        let spool = setup
            .spool
            .as_ref()
            .map_or_else(|| d("spool"), |p| p.display().to_string());
        let (source_url, target_url) = (source.url(DB), target.url(DB));
        let mut cargs = vec!["--listen", &coord, "--state", &cstate, "--certs", &certs];
        if let Some(t) = setup.lease_timeout {
            cargs.extend(["--lease-timeout", t]);
        }
        cargs.extend(setup.coordinator_args.iter().map(String::as_str));
        let coordinator = Agent::spawn_with_env(&bin, dir.path(), "coordinator", &cargs, &env)?;
        let mut rargs = vec![
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
        ];
        rargs.extend(setup.receiver_args.iter().copied());
        let receiver = Agent::spawn_with_env(&bin, dir.path(), "receiver", &rargs, &env)?;
        let sender = Agent::spawn_with_env(
            &bin,
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
            &env,
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
                setup.jobs.unwrap_or("2"),
                "--bwlimit",
                setup.bwlimit.unwrap_or("2MB"),
            ];
            if let Some(codec) = setup.codec {
                args.extend(["--codec", codec]);
            }
            if let Some(n) = setup.connections {
                args.extend(["--connections", n]);
            }
            if !setup.drop_ledger {
                args.push("--keep-ledger");
            }
            args.extend(setup.start_args.iter().copied());
            let out = run(&bin, &args)?;
            if out.status.success() {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "could not start the job");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Move {
            bin,
            source,
            target,
            _dir: dir,
            coord,
            certs,
            receiver_addr: advertise.clone(),
            coordinator,
            receiver,
            sender,
            to_receiver,
            to_coordinator,
            drop_ledger: setup.drop_ledger,
        })
    }

    /// A path inside the move's temp dir (`rstate` is the receiver's state, `spool` its spool).
    pub fn path(&self, p: &str) -> std::path::PathBuf {
        self._dir.path().join(p)
    }

    pub fn wait_for_chunks(&self, n: u64) -> anyhow::Result<u64> {
        wait_for_chunks(&self.bin, &self.coord, &self.certs, n)
    }

    /// `haul status --json` of the job, if the coordinator answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        status(&self.bin, &self.coord, &self.certs)
    }

    /// Wait for the end, then check the outcome independently. Returns the final status.
    pub fn finish(&self) -> anyhow::Result<serde_json::Value> {
        // A coordinator just restarted may not be listening yet.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.status().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = run(
            &self.bin,
            &[
                "status",
                "--coordinator",
                &self.coord,
                "--certs",
                &self.certs,
                "--wait",
            ],
        )?;
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
        let diffs = compare_databases(&self.source.url(DB), &self.target.url(DB))?;
        anyhow::ensure!(
            diffs.is_empty(),
            "source and target differ:\n{}",
            diffs.join("\n")
        );
        let s = self.status().context("no status")?;
        if self.drop_ledger {
            let left = self.target.psql(
                DB,
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'haul'",
            )?;
            anyhow::ensure!(
                left.trim() == "0",
                "the haul schema is still on the target after the job finished"
            );
            anyhow::ensure!(
                s["ledger_dropped"] == true,
                "status does not say the ledger was dropped: {s}"
            );
            return Ok(s);
        }
        let ledger = self.target.psql(
            DB,
            "SELECT count(*), count(DISTINCT chunk_id) FROM haul.ledger",
        )?;
        let (rows, distinct) = ledger.split_once('|').unwrap_or(("", ""));
        anyhow::ensure!(rows == distinct, "a chunk was applied twice: {ledger}");
        let planned = s["chunks"].as_u64().unwrap_or(0);
        anyhow::ensure!(
            rows.trim().parse::<u64>()? == planned,
            "ledger has {rows} chunks, plan has {planned}"
        );
        // Each table's ledger rows add up to what the table holds: a chunk's ledger row was
        // committed with that chunk's rows and no others.
        let off = self.target.psql(
            DB,
            "DO $$ DECLARE t text; r regclass; n bigint; l bigint; bad text := ''; BEGIN \
               FOR t, l IN SELECT table_name, sum(rows) FROM haul.ledger GROUP BY table_name LOOP \
                 SELECT c.oid::regclass INTO r FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace \
                   WHERE s.nspname || '.' || c.relname = t; \
                 IF t = 'pg_catalog.pg_largeobject' THEN \
                   SELECT count(*) INTO n FROM pg_largeobject_metadata; \
                 ELSE \
                   EXECUTE format('SELECT count(*) FROM ONLY %s', r) INTO n; \
                 END IF; \
                 IF n <> l THEN bad := bad || format('%s: ledger %s rows, table %s; ', t, l, n); END IF; \
               END LOOP; \
               IF bad <> '' THEN RAISE EXCEPTION 'ledger disagrees: %', bad; END IF; END $$",
        );
        anyhow::ensure!(off.is_ok(), "{off:?}");
        Ok(s)
    }
}

/// Two clusters (source and target), started side by side.
pub fn two_clusters() -> anyhow::Result<(Cluster, Cluster)> {
    let (a, b) = std::thread::scope(|s| {
        // The source can be followed: logical decoding needs wal_level = logical.
        let a = s.spawn(|| {
            Cluster::start(ClusterOptions {
                extra_conf: vec![("wal_level".into(), "logical".into())],
                ..Default::default()
            })
        });
        let b = s.spawn(|| Cluster::start(ClusterOptions::default()));
        (a.join(), b.join())
    });
    Ok((
        a.map_err(|_| anyhow::anyhow!("starting a cluster panicked"))??,
        b.map_err(|_| anyhow::anyhow!("starting a cluster panicked"))??,
    ))
}

/// A database's schema as `pg_dump --schema-only` prints it, to load elsewhere with psql.
pub fn schema_of(cluster: &Cluster, db: &str) -> anyhow::Result<String> {
    let pg_dump = haul_pgcluster::pg_bin("pg_dump")?;
    let out = std::process::Command::new(pg_dump)
        .args(["--schema-only", "-d"])
        .arg(cluster.url(db))
        .output()
        .context("run pg_dump")?;
    anyhow::ensure!(
        out.status.success(),
        "pg_dump --schema-only: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}
