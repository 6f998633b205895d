//! One bandwidth cap for a whole job: two senders share it (the coordinator divides it by the
//! leases each holds), the sum of their wire bytes stays under it, `haul bwlimit` changes it
//! while the move runs, and status shows the cap in force and the rate achieved.

mod common;

use std::time::{Duration, Instant};

use common::procs::{self, failure_line, free_addr, haul};

fn status(coord: &str, certs: &str) -> Option<serde_json::Value> {
    let out = haul(&["status", "--coordinator", coord, "--certs", certs, "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn two_senders_share_one_cap_that_changes_while_the_job_runs() -> anyhow::Result<()> {
    let (source, target) = common::two_clusters()?;
    source.create_database("db")?;
    target.create_database("db")?;
    // About 30 MB of COPY data; uncompressed on the wire (codec none), so wire bytes are the
    // rows' bytes.
    source.psql(
        "db",
        "CREATE TABLE bulk (id bigint PRIMARY KEY, pad text NOT NULL); \
         INSERT INTO bulk SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 110000) AS g; \
         ANALYZE bulk;",
    )?;
    let dir = tempfile::tempdir()?;
    let d = |p: &str| dir.path().join(p).display().to_string();
    let certs = d("certs");
    assert!(
        haul(&["certs", "init", "--dir", &certs, "--host", "127.0.0.1"])
            .status
            .success()
    );
    assert!(
        haul(&["certs", "issue", "--dir", &certs, "--role", "sender", "--name", "sender2"])
            .status
            .success()
    );
    let (coord, recv) = (free_addr(), free_addr());
    let _coordinator = procs::spawn(
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
    let _receiver = procs::spawn(
        dir.path(),
        "receiver",
        &[
            "--coordinator",
            &coord,
            "--listen",
            &recv,
            "--target",
            &target.url("db"),
            "--state",
            &d("rstate"),
            "--spool",
            &d("spool"),
            "--certs",
            &certs,
        ],
    )?;
    let src = source.url("db");
    let sender1 = procs::spawn(
        dir.path(),
        "sender",
        &[
            "--coordinator",
            &coord,
            "--source",
            &src,
            "--state",
            &d("s1"),
            "--certs",
            &certs,
        ],
    )?;
    // Its own log directory: an agent logs to DIR/ROLE.log.
    let second = dir.path().join("second");
    std::fs::create_dir_all(&second)?;
    let sender2 = procs::spawn(
        &second,
        "sender",
        &[
            "--coordinator",
            &coord,
            "--source",
            &src,
            "--state",
            &d("s2"),
            "--certs",
            &certs,
            "--name",
            "sender2",
        ],
    )?;

    // A timetable whose one rule holds all day, every day: 3 MB/s.
    let mut started = false;
    for _ in 0..100 {
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
            "--codec",
            "none",
            "--bwlimit",
            "daily 00:00,3MB",
        ]);
        if out.status.success() {
            started = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::ensure!(started, "could not start the job");

    // Watch the move: (seconds, wire bytes done, cap in force).
    let t0 = Instant::now();
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let mut raised_at: Option<f64> = None;
    let mut cap_text = String::new();
    // The achieved rate status reports (from the senders' renewals), under the first cap.
    let mut reported: Vec<f64> = Vec::new();
    let end = loop {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "the move did not end"
        );
        let Some(s) = status(&coord, &certs) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let now = t0.elapsed().as_secs_f64();
        if s["phase"] == "copying" {
            samples.push((
                now,
                s["wire_bytes_done"].as_u64().unwrap_or(0),
                s["cap_bytes_per_sec"].as_u64().unwrap_or(0),
            ));
            if raised_at.is_none() && now > 2.0 {
                reported.push(s["wire_rate"].as_f64().unwrap_or(0.0));
            }
            if cap_text.is_empty() {
                cap_text = s["cap"].as_str().unwrap_or_default().to_string();
            }
        }
        // Raise the cap once 9 MB are across.
        if raised_at.is_none() && s["wire_bytes_done"].as_u64().unwrap_or(0) > 9_000_000 {
            let out = haul(&[
                "bwlimit",
                "--coordinator",
                &coord,
                "--certs",
                &certs,
                "12MB",
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let said = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(said.contains("cap now 12.0 MB/s (96 Mbit/s)"), "{said}");
            raised_at = Some(t0.elapsed().as_secs_f64());
        }
        if s["phase"] == "done" || s["phase"] == "failed" {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(end["phase"], "done", "{end}");
    assert_eq!(
        cap_text, "3.0 MB/s (24 Mbit/s) (timetable)",
        "status shows the cap in force in both units"
    );
    let raised_at = raised_at.expect("the cap was raised");

    // Under the first cap, the two senders together stayed under 3 MB/s (plus one renewal
    // period of slack, and chunk reports landing in lumps). Chunk-level progress counts a
    // chunk when it is reported, so measure over the whole stretch, not sample to sample.
    let before: Vec<&(f64, u64, u64)> = samples.iter().filter(|s| s.0 < raised_at).collect();
    let (first, last) = (before[0], before[before.len() - 1]);
    let secs = last.0 - first.0;
    anyhow::ensure!(
        secs > 2.0,
        "too little time under the first cap: {samples:?}"
    );
    let rate = (last.1 - first.1) as f64 / secs;
    assert!(
        rate < 3_000_000.0 * 1.15,
        "{rate:.0} B/s under a 3 MB/s cap: {samples:?}"
    );
    let top = reported.iter().cloned().fold(0.0, f64::max);
    assert!(
        top > 1_000_000.0 && top < 3_000_000.0 * 1.3,
        "status's wire rate under a 3 MB/s cap: {reported:?}"
    );
    // The new cap reached status within 2 s, and the move ran faster after it.
    let changed = samples
        .iter()
        .find(|s| s.0 > raised_at && s.2 == 12_000_000)
        .expect("status shows the new cap");
    assert!(changed.0 - raised_at < 2.0, "{samples:?}");
    let after: Vec<&(f64, u64, u64)> = samples.iter().filter(|s| s.0 > raised_at + 1.0).collect();
    if after.len() >= 2 {
        let (a, b) = (after[0], after[after.len() - 1]);
        if b.0 - a.0 > 1.0 {
            let faster = (b.1 - a.1) as f64 / (b.0 - a.0);
            assert!(
                faster > 3_000_000.0 * 1.3,
                "{faster:.0} B/s after raising the cap to 12 MB/s: {samples:?}"
            );
        }
    }
    // Both senders carried chunks.
    for (name, log) in [
        ("sender", sender1.log_text()),
        ("sender2", sender2.log_text()),
    ] {
        assert!(log.contains("chunk applied"), "{name} sent nothing:\n{log}");
    }
    let diffs = common::compare_databases(&source.url("db"), &target.url("db"))?;
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));

    // A timetable that makes no sense: one line, nothing changed.
    let out = haul(&[
        "bwlimit",
        "--coordinator",
        &coord,
        "--certs",
        &certs,
        "Mon-Fri 25:00,1MB",
    ]);
    assert!(failure_line(&out).contains("not a time of day"), "{out:?}");
    Ok(())
}

/// A capped move measured where it crosses the link: the bytes the link emulator forwards from
/// sender to receiver, in 1 s windows, stay under the cap (plus the protocol's framing).
#[test]
fn a_capped_move_stays_under_its_cap_on_the_wire() -> anyhow::Result<()> {
    let m = haul_faults::moves::Move::new(haul_faults::moves::Setup {
        bin: common::procs::HAUL.into(),
        link_to_receiver: true,
        bulk_mb: 10,
        chunk_size: Some("1MB"),
        jobs: Some("3"),
        bwlimit: Some("2MB"),
        codec: Some("none"),
        drop_ledger: true,
        ..Default::default()
    })?;
    let link = m.to_receiver.as_ref().expect("a link to the receiver");
    // Sample the bytes forwarded every 100 ms until the job is over.
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let t0 = Instant::now();
    loop {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(90),
            "the move did not end"
        );
        samples.push((Instant::now(), link.forwarded_up()));
        if samples.len().is_multiple_of(5) {
            if let Some(s) = m.status() {
                if s["phase"] != "copying" && s["phase"] != "planning" {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    m.finish()?;
    // Every 1 s window from the first byte on: at most the cap plus 10% (framing, TLS).
    let first = samples
        .iter()
        .position(|s| s.1 > 0)
        .expect("bytes crossed the link");
    let mut windows = Vec::new();
    for i in first..samples.len() {
        if let Some(j) =
            (i..samples.len()).find(|&j| samples[j].0 - samples[i].0 >= Duration::from_secs(1))
        {
            let secs = (samples[j].0 - samples[i].0).as_secs_f64();
            windows.push((samples[j].1 - samples[i].1) as f64 / secs);
        }
    }
    anyhow::ensure!(
        windows.len() >= 20,
        "too short a move to judge: {windows:?}"
    );
    let top = windows.iter().cloned().fold(0.0, f64::max);
    assert!(
        top <= 2_000_000.0 * 1.10,
        "a 1 s window at {top:.0} B/s under a 2 MB/s cap"
    );
    // And the cap was used: the move did not crawl.
    let mean = windows.iter().sum::<f64>() / windows.len() as f64;
    assert!(
        mean > 2_000_000.0 * 0.6,
        "mean {mean:.0} B/s under a 2 MB/s cap"
    );
    Ok(())
}
