//! Chaos at a larger size than CI's: a move of a few hundred MB as three processes, with link
//! emulators between the sender and the receiver and between the sender and the coordinator.
//! One event after another: a role killed with SIGKILL and restarted, or a link reset; every
//! kind comes up once in each round of five, in an order the seed picks.
//! After each event it waits for every chunk that was in flight to be applied, so what the
//! event cost can be told apart from the next one's.
//!
//! Printed per event: the streams in flight, how long until bytes flowed again, and the bytes
//! the receiver was sent twice for those chunks (its own count, from each chunk's high-water
//! mark). Printed at the end: bytes that crossed the sender-receiver link against the bytes the
//! chunks needed, less the protocol overhead measured by a first run with no events. Chunks go
//! uncompressed (`--codec none`) so that every byte can be accounted for exactly.
//!
//!     cargo build --release -p haul -p haul-bench
//!     ./target/release/chaos_large [MB] [EVENTS] [SEED]
//!     HAUL_BENCH_LINK_RATE=8000000 ./target/release/chaos_large 300 10   # link-bound

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use haul_bench::haul_bin;
use haul_faults::moves::{Move, Setup};

const BLOCK: f64 = (1 << 20) as f64;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// `HAUL_BENCH_LINK_RATE=BYTES_PER_SEC` makes the sender-receiver link the bottleneck instead
/// of the sender's `--bwlimit`: the sender then fills its HTTP/2 window, and a cut loses what is
/// in the pipe.
fn link_rate() -> Option<u64> {
    std::env::var("HAUL_BENCH_LINK_RATE").ok()?.parse().ok()
}

fn start(mb: u64) -> anyhow::Result<Move> {
    let m = Move::new(setup(mb))?;
    if let (Some(rate), Some(link)) = (link_rate(), m.to_receiver.as_ref()) {
        link.set_rate(rate);
    }
    Ok(m)
}

fn setup(mb: u64) -> Setup {
    Setup {
        bin: haul_bin().into(),
        bulk_mb: mb,
        link_to_receiver: true,
        link_to_coordinator: true,
        lease_timeout: Some("5s"),
        chunk_size: Some("16MB"),
        bwlimit: Some(if link_rate().is_some() { "0" } else { "8MB" }),
        codec: Some("none"),
        jobs: Some("3"),
        ..Default::default()
    }
}

fn num(s: &serde_json::Value, key: &str) -> u64 {
    s[key].as_u64().unwrap_or(0)
}

fn done_ids(s: &serde_json::Value) -> HashSet<u64> {
    s["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|u| u["chunk_ids"].as_array().into_iter().flatten())
        .filter_map(|v| v.as_u64())
        .collect()
}

/// Bytes the chunks needed: the applied streams' bytes plus what earlier streams delivered
/// (resumed). Raw equals wire with `--codec none`.
fn useful(s: &serde_json::Value) -> u64 {
    num(s, "wire_bytes_done") + num(s, "resumed_bytes_done")
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mb: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(400);
    let events: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(12);
    let seed: u64 = args
        .get(3)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 | 1)
                .unwrap_or(7)
        });
    println!("chaos_large: {mb} MB, {events} events, seed {seed}");

    // Run 1: no events, to measure the protocol's own overhead on this link.
    let started = Instant::now();
    let calm = start(mb).context("start the calm run")?;
    let s = calm.finish()?;
    let calm_crossed = calm.to_receiver.as_ref().map_or(0, |l| l.forwarded_up());
    let overhead = calm_crossed as f64 / useful(&s).max(1) as f64;
    println!(
        "calm run: {:.1} MB crossed for {:.1} MB of chunks (overhead {:.2}%), {:.0} s",
        calm_crossed as f64 / 1e6,
        useful(&s) as f64 / 1e6,
        (overhead - 1.0) * 100.0,
        started.elapsed().as_secs_f64()
    );
    drop(calm);

    // Run 2: chaos.
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut m = start(mb).context("start the chaos run")?;
    let link = |m: &Move| m.to_receiver.as_ref().map_or(0, |l| l.forwarded_up());
    while link(&m) < 20_000_000 {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "{:<28} {:>9} {:>14} {:>16}",
        "event", "in flight", "flowing again", "sent twice"
    );
    let (mut interrupted, mut kills, mut resets) = (0u64, 0, 0);
    // Every kind of event comes up once in each round of five, in an order the seed picks.
    let mut order = [0u64, 1, 2, 3, 4];
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for round in 0..events {
        let Some(s) = m.status() else { break };
        if s["phase"] != "copying" || num(&s, "chunks") <= num(&s, "chunks_done") + 2 {
            break;
        }
        let in_flight: Vec<u64> = s["in_flight"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_u64())
            .collect();
        let resent_before = num(&s, "resent_bytes_done");
        let what = match order[round % order.len()] {
            0 => {
                m.coordinator.restart()?;
                "kill -9 coordinator"
            }
            1 => {
                m.receiver.restart()?;
                "kill -9 receiver"
            }
            2 => {
                m.sender.restart()?;
                "kill -9 sender"
            }
            3 => {
                m.to_receiver.as_ref().context("link")?.reset();
                "reset sender-receiver link"
            }
            _ => {
                m.to_coordinator.as_ref().context("link")?.reset();
                "reset sender-coordinator link"
            }
        };
        if what.starts_with("kill") {
            kills += 1;
        } else {
            resets += 1;
        }
        let at = Instant::now();
        let from = link(&m);
        while link(&m) < from + (1 << 20) && at.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let flowing = at.elapsed();
        // Wait for the chunks that were in flight, so their cost is this event's.
        let s = loop {
            let s = m.status().unwrap_or_default();
            let done = done_ids(&s);
            if in_flight.iter().all(|c| done.contains(c)) || s["phase"] != "copying" {
                break s;
            }
            anyhow::ensure!(
                at.elapsed() < Duration::from_secs(300),
                "chunks in flight at the event never finished"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        interrupted += in_flight.len() as u64;
        let twice = num(&s, "resent_bytes_done").saturating_sub(resent_before);
        println!(
            "{what:<28} {:>9} {:>12.1} s {:>9.2} blocks",
            in_flight.len(),
            flowing.as_secs_f64(),
            twice as f64 / BLOCK
        );
        std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
    }
    let s = m.finish()?;
    let crossed = link(&m);
    let needed = useful(&s) as f64 * overhead;
    let extra = (crossed as f64 - needed).max(0.0);
    println!(
        "chaos run: {kills} kills, {resets} link resets, {interrupted} streams in flight at them; rows lost 0, rows duplicated 0 (independent comparison and ledger), {:.0} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "link: {:.1} MB crossed for {:.1} MB of chunks; beyond the calm run's overhead {:.2} MB = {:.2} blocks per stream in flight at an event",
        crossed as f64 / 1e6,
        useful(&s) as f64 / 1e6,
        extra / 1e6,
        extra / BLOCK / interrupted.max(1) as f64
    );
    println!(
        "receiver: {:.2} MB received twice in all; {:.1} MB resumed instead of sent again; consistent as of one snapshot: {}",
        num(&s, "resent_bytes_done") as f64 / 1e6,
        num(&s, "resumed_bytes_done") as f64 / 1e6,
        s["consistent"]
    );
    Ok(())
}
