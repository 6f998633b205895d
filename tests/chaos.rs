//! Chaos, bounded for CI: while a move runs, random roles are killed with SIGKILL and restarted
//! and random links are reset, one event after another, each followed by a wait for progress.
//! At the end: rows lost 0, rows duplicated 0 (independent comparison and the ledger), and it
//! prints what it did: kills, resets, bytes re-sent over the link, time from restart to progress.
//!
//! `HAUL_CHAOS_SEED` replays a run; `HAUL_CHAOS_EVENTS` sets how many events (default 8).

mod common;

use std::time::{Duration, Instant};

use common::moves::{self, Setup};

/// A small deterministic generator (xorshift), so a failing run can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn chaos_loses_nothing_and_duplicates_nothing() -> anyhow::Result<()> {
    let seed: u64 = std::env::var("HAUL_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 | 1)
                .unwrap_or(7)
        });
    let events: usize = std::env::var("HAUL_CHAOS_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    eprintln!("chaos seed {seed} ({events} events); replay with HAUL_CHAOS_SEED={seed}");
    let mut rng = Rng(seed);

    let mut m = moves::start(Setup {
        link_to_receiver: true,
        link_to_coordinator: true,
        lease_timeout: Some("5s"),
        ..Default::default()
    })?;
    let (mut kills, mut resets) = (0, 0);
    let mut recoveries: Vec<(String, Duration)> = Vec::new();
    let mut done = m.wait_for_chunks(2)?;
    for _ in 0..events {
        let s = m.status().unwrap_or_default();
        if s["phase"] != "copying" || s["chunks"].as_u64().unwrap_or(0) <= done + 2 {
            break; // too close to the end for another event to mean anything
        }
        let what = match rng.below(5) {
            0 => {
                m.coordinator.restart()?;
                "kill coordinator"
            }
            1 => {
                m.receiver.restart()?;
                "kill receiver"
            }
            2 => {
                m.sender.restart()?;
                "kill sender"
            }
            3 => {
                m.to_receiver.as_ref().expect("link").reset();
                "reset sender-receiver link"
            }
            _ => {
                m.to_coordinator.as_ref().expect("link").reset();
                "reset sender-coordinator link"
            }
        };
        if what.starts_with("kill") {
            kills += 1;
        } else {
            resets += 1;
        }
        let since = Instant::now();
        done = m.wait_for_chunks(done + 1)?;
        recoveries.push((what.to_string(), since.elapsed()));
        // Let a little happen before the next blow.
        std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
    }
    let end = m.finish()?;

    // Rows lost 0 and rows duplicated 0: `finish` compared every table's count and digest
    // independently and checked the ledger holds each chunk once. Say what it took.
    let wire = end["wire_bytes_done"].as_u64().unwrap_or(0);
    let crossed = m.to_receiver.as_ref().map_or(0, |l| l.forwarded());
    eprintln!("chaos: {kills} kills, {resets} link resets, rows lost 0, rows duplicated 0");
    eprintln!(
        "chaos: {} bytes crossed the sender-receiver link for {} bytes of applied chunks: {} re-sent or protocol overhead",
        crossed,
        wire,
        crossed.saturating_sub(wire)
    );
    for (what, took) in &recoveries {
        eprintln!(
            "chaos: {what}: next chunk done {:.1} s later",
            took.as_secs_f64()
        );
    }
    assert!(
        kills + resets > 0,
        "no chaos happened (the move was too quick)"
    );
    Ok(())
}
