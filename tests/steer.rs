//! Steering a real move: `haul pause` revokes the job's leases and nothing more of it crosses
//! the link; `haul resume` hands the chunks out again, and they continue at the byte offsets
//! the receiver holds instead of from their start. The chunks are 16 MB, capped at 4 MB/s, so
//! the pause lands in the middle of chunks.

mod common;

use std::time::{Duration, Instant};

use common::moves::{self, Move, Setup};
use common::procs::{failure_line, haul};

fn steer(m: &Move, what: &str) -> anyhow::Result<String> {
    let out = haul(&[what, "--coordinator", &m.coord, "--certs", &m.certs]);
    anyhow::ensure!(out.status.success(), "haul {what}: {}", failure_line(&out));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_paused_job_sends_nothing_and_resumes_at_its_offsets() -> anyhow::Result<()> {
    let m = moves::start(Setup {
        link_to_receiver: true,
        bulk_mb: 48,
        chunk_size: Some("16MB"),
        bwlimit: Some("4MB"),
        codec: Some("none"),
        ..Default::default()
    })?;
    let link = m.to_receiver.as_ref().expect("link");
    let deadline = Instant::now() + Duration::from_secs(60);
    while link.forwarded_up() < 5_000_000 {
        anyhow::ensure!(Instant::now() < deadline, "the move never got going");
        std::thread::sleep(Duration::from_millis(20));
    }

    let said = steer(&m, "pause")?;
    assert!(said.contains("paused"), "{said}");
    // The senders hear of the revocation at their next renewal (at least once a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = m.status().unwrap_or_default();
        let idle = s["in_flight"].as_array().is_some_and(|a| a.is_empty());
        if s["paused"] == true && idle {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "still leased after pause: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["phase"], "copying", "{status}");
    std::thread::sleep(Duration::from_millis(1500));
    let before = link.forwarded_up();
    std::thread::sleep(Duration::from_secs(3));
    let during = link.forwarded_up() - before;
    // HTTP/2 pings may cross; no chunk bytes do.
    assert!(during < 16 << 10, "{during} bytes crossed while paused");
    let still = m.status().unwrap_or_default();
    assert_eq!(still["paused"], true, "{still}");
    assert!(
        still["in_flight"].as_array().is_some_and(|a| a.is_empty()),
        "leased while paused: {still}"
    );

    let said = steer(&m, "resume")?;
    assert!(said.contains("resumed"), "{said}");
    let end = m.finish()?;
    assert_eq!(end["paused"], false, "{end}");
    let resumed = end["resumed_bytes_done"].as_u64().unwrap_or(0);
    assert!(
        resumed >= 1 << 20,
        "chunks started over instead of continuing: {resumed} bytes resumed\n{end}"
    );
    let out = haul(&["resume", "--coordinator", &m.coord, "--certs", &m.certs]);
    assert!(!out.status.success(), "a finished job resumed");
    assert!(
        failure_line(&out).contains("only a job that is still moving"),
        "{}",
        failure_line(&out)
    );
    Ok(())
}
