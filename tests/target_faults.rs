//! The target side misbehaves: the target PostgreSQL restarts mid-restore (retried from the
//! spool, nothing re-sent over the link), a spooled chunk is altered on disk after it was
//! verified (caught by its digest, discarded, fetched again, never committed), and the spool's
//! disk fills up (a clear error, then recovery once space returns).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::moves::{self, Setup};
use common::procs::HAUL;
use common::{compare_databases, load_rich, Cluster, ClusterOptions};

#[test]
fn target_restart_is_retried_from_the_spool() -> anyhow::Result<()> {
    let mut m = moves::start(Setup::default())?;
    let done = m.wait_for_chunks(3)?;
    m.target.kill()?;
    std::thread::sleep(Duration::from_millis(1500));
    m.target.start_again()?;
    m.wait_for_chunks(done + 3)?;
    m.finish()?;
    let receiver = m.receiver.log_text();
    // A chunk loading while it arrived falls back to its spool; one restoring from its spool
    // retries from it.
    assert!(
        receiver.contains("retrying from spool") || receiver.contains("restored from the spool"),
        "no restore was retried:\n{receiver}"
    );
    // Each such line names the job, the chunk, its table and the agent.
    for line in receiver
        .lines()
        .filter(|l| l.contains("retrying from spool") || l.contains("restored from the spool"))
    {
        for field in ["job=", "chunk=", "table=", "agent="] {
            assert!(line.contains(field), "{field} missing: {line}");
        }
    }
    let sender = m.sender.log_text();
    assert!(
        !sender.contains("failed to copy chunk"),
        "a chunk was sent again although the spool had it:\n{sender}"
    );
    Ok(())
}

#[test]
fn corrupt_spool_is_discarded_and_fetched_again() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    load_rich(&c, "src")?;
    c.create_database("dst")?;
    let out = Command::new(HAUL)
        .args([
            "copy",
            "--source",
            &c.url("src"),
            "--target",
            &c.url("dst"),
            "--chunk-size",
            "4MB",
            "--keep-ledger",
        ])
        .env("HAUL_FAILPOINTS", "corrupt-spool")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("failpoint corrupt-spool fired"), "{stderr}");
    assert!(
        stderr.contains("changed on disk") || stderr.contains("is unreadable"),
        "the altered spool was not caught:\n{stderr}"
    );
    let diffs = compare_databases(&c.url("src"), &c.url("dst"))?;
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let once = c.psql(
        "dst",
        "SELECT count(*) = count(DISTINCT chunk_id) FROM haul.ledger",
    )?;
    assert_eq!(once.trim(), "t");
    Ok(())
}

/// A block altered after the sender hashed it reaches the receiver, which loads chunks while
/// they arrive: the digest at the trailer differs, the open transaction is rolled back, and the
/// chunk sent again commits once.
#[test]
fn a_block_altered_before_the_wire_never_commits() -> anyhow::Result<()> {
    let c = Cluster::start(ClusterOptions::default())?;
    load_rich(&c, "src")?;
    c.create_database("dst")?;
    let out = Command::new(HAUL)
        .args([
            "copy",
            "--source",
            &c.url("src"),
            "--target",
            &c.url("dst"),
            "--chunk-size",
            "4MB",
            "--codec",
            "none",
            "--keep-ledger",
        ])
        .env("HAUL_FAILPOINTS", "corrupt-block")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("failpoint corrupt-block fired"), "{stderr}");
    assert!(
        stderr.contains("chunk digest mismatch"),
        "the altered block was not caught:\n{stderr}"
    );
    let diffs = compare_databases(&c.url("src"), &c.url("dst"))?;
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let once = c.psql(
        "dst",
        "SELECT count(*) = count(DISTINCT chunk_id) AND bool_and(length(digest) = 32) FROM haul.ledger",
    )?;
    assert_eq!(once.trim(), "t");
    Ok(())
}

#[test]
fn full_spool_disk_is_reported_then_recovers() -> anyhow::Result<()> {
    // A real small filesystem for the spool: needs root to mount (CI and the dev machines run
    // as root; elsewhere this test says so and stops).
    let mnt = tempfile::tempdir()?;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24M", "tmpfs"])
        .arg(mnt.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!(
            "skipping full_spool_disk_is_reported_then_recovers: cannot mount a tmpfs (not root?)"
        );
        return Ok(());
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());

    let m = moves::start(Setup {
        spool: Some(mnt.path().join("spool")),
        ..Default::default()
    })?;
    let done = m.wait_for_chunks(2)?;
    // Fill the disk, and keep it full (restored chunks free their spool files): every spool
    // write fails from now on.
    let filler = mnt.path().join("filler");
    let top_up = || {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&filler)
        {
            let block = vec![0u8; 64 << 10];
            while std::io::Write::write_all(&mut f, &block).is_ok() {}
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        top_up();
        if m.sender
            .log_text()
            .contains("is full (no space left on device)")
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no clear disk-full error:\n{}",
            m.sender.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Space returns; the move carries on.
    std::fs::remove_file(&filler)?;
    m.wait_for_chunks(done + 3)?;
    m.finish()?;
    Ok(())
}
