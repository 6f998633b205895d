//! Live progress on a terminal (`status --wait`, `start --wait`, `copy`, `demo`): one bar for
//! the job and one for each table with chunks in flight, drawn with indicatif on stderr. Each
//! says rows and bytes done, raw and on the wire, the rate now, an ETA and the chunks retried;
//! the job's bar also the cap in force. Off a terminal, `operator::follow` prints plain lines.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use haul_proto as pb;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use haul_core::bandwidth::show_rate;

use crate::operator::human_bytes;

/// A rate from successive totals: the change over each poll, smoothed.
#[derive(Debug, Default)]
pub struct Rate {
    last: Option<(Instant, u64)>,
    per_sec: Option<f64>,
}

impl Rate {
    /// Smoothing per second of observation: the rate follows a change within a few seconds
    /// without jumping at every chunk boundary.
    const WEIGHT_PER_SEC: f64 = 0.35;

    /// Take the total at `now`; returns the smoothed rate so far, if there is one.
    pub fn observe(&mut self, now: Instant, total: u64) -> Option<f64> {
        match self.last {
            None => self.last = Some((now, total)),
            Some((then, before)) => {
                let dt = now.saturating_duration_since(then).as_secs_f64();
                // Polls a quarter second apart; changes below half a second are noise.
                if dt >= 0.5 {
                    let now_rate = total.saturating_sub(before) as f64 / dt;
                    let w = (Self::WEIGHT_PER_SEC * dt).min(1.0);
                    self.per_sec = Some(match self.per_sec {
                        Some(r) => r + w * (now_rate - r),
                        None => now_rate,
                    });
                    self.last = Some((now, total));
                }
            }
        }
        self.per_sec
    }
}

/// How long `left` bytes take at `rate` bytes a second, for people ("1m 20s"), if knowable.
pub fn eta(left: u64, rate: Option<f64>) -> Option<String> {
    let rate = rate.filter(|r| *r >= 1.0)?;
    if left == 0 {
        return None;
    }
    let secs = (left as f64 / rate).round() as u64;
    Some(humantime::format_duration(Duration::from_secs(secs)).to_string())
}

/// A count for a bar: 1234567 rows as "1.23M".
pub fn count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.2}M", n as f64 / 1e6),
        _ => format!("{:.2}G", n as f64 / 1e9),
    }
}

/// The text beside a bar, for the job or one table.
#[allow(clippy::too_many_arguments)]
pub fn bar_message(
    chunks_done: u64,
    chunks: u64,
    in_flight: Option<u32>,
    rows: u64,
    raw: u64,
    wire: u64,
    rate: Option<f64>,
    left: u64,
    retries: u64,
) -> String {
    let mut m = format!("chunks {chunks_done}/{chunks}");
    if let Some(n) = in_flight {
        m.push_str(&format!(" ({n} in flight)"));
    }
    m.push_str(&format!(
        "  rows {}  {} read, {} on the wire",
        count(rows),
        human_bytes(raw),
        human_bytes(wire)
    ));
    if let Some(r) = rate {
        m.push_str(&format!("  {}/s read", human_bytes(r as u64)));
    }
    if let Some(e) = eta(left, rate) {
        m.push_str(&format!("  ETA {e}"));
    }
    m.push_str(&format!("  retried {retries}"));
    m
}

struct TableBar {
    bar: ProgressBar,
    rate: Rate,
}

/// The bars of one job on stderr.
pub struct Bars {
    multi: MultiProgress,
    job: ProgressBar,
    rate: Rate,
    tables: BTreeMap<String, TableBar>,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl Bars {
    pub fn new() -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        let job = multi.add(ProgressBar::new(1));
        job.set_style(style("{prefix:.bold} [{bar:30}] {percent:>3}% {wide_msg}"));
        Bars {
            multi,
            job,
            rate: Rate::default(),
            tables: BTreeMap::new(),
        }
    }

    /// Show a status reply fetched with `in_flight_tables`.
    pub fn update(&mut self, s: &pb::JobStatusReply) {
        let now = Instant::now();
        let phase = if s.paused {
            format!("{} (paused)", s.phase)
        } else {
            s.phase.clone()
        };
        self.job.set_prefix(phase);
        self.job.set_length(s.est_bytes_total.max(1));
        self.job
            .set_position(s.est_bytes_done.min(s.est_bytes_total));
        let rate = self.rate.observe(now, s.raw_bytes_done);
        // Planned bytes left, in read bytes: the plan's estimate scaled by what was read so far.
        let left = left_raw(s.est_bytes_total, s.est_bytes_done, s.raw_bytes_done);
        let mut msg = bar_message(
            s.chunks_done,
            s.chunks,
            None,
            s.rows_done,
            s.raw_bytes_done,
            s.wire_bytes_done,
            rate.filter(|_| s.phase == "copying"),
            if s.phase == "copying" { left } else { 0 },
            s.retries,
        );
        if s.phase == "copying" {
            msg.push_str(&format!("  wire {}/s", human_bytes(s.wire_rate as u64)));
        }
        if s.cap_bytes_per_sec > 0 {
            msg.push_str(&format!("  cap {}", cap_text(s.cap_bytes_per_sec)));
        }
        if !s.step.is_empty() {
            msg.push_str(&format!("  ({})", s.step));
        }
        if !s.error.is_empty() && s.phase != "failed" {
            msg.push_str(&format!("  ({})", s.error));
        }
        self.job.set_message(msg);

        let mut seen = Vec::with_capacity(s.table_progress.len());
        for t in &s.table_progress {
            let name = t
                .table
                .as_ref()
                .map(|t| format!("{}.{}", t.schema, t.name))
                .unwrap_or_default();
            seen.push(name.clone());
            let entry = self.tables.entry(name.clone()).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(1));
                bar.set_style(style("  {prefix:<28!} [{bar:20}] {wide_msg}"));
                bar.set_prefix(name);
                TableBar {
                    bar,
                    rate: Rate::default(),
                }
            });
            entry.bar.set_length(t.est_bytes.max(1));
            entry.bar.set_position(t.est_bytes_done.min(t.est_bytes));
            let rate = entry.rate.observe(now, t.raw_bytes_done);
            entry.bar.set_message(bar_message(
                t.chunks_done as u64,
                t.chunks as u64,
                Some(t.chunks_in_flight),
                t.rows_done,
                t.raw_bytes_done,
                t.wire_bytes_done,
                rate,
                left_raw(t.est_bytes, t.est_bytes_done, t.raw_bytes_done),
                t.retries,
            ));
        }
        // A table with nothing in flight any more leaves the screen.
        let gone: Vec<String> = self
            .tables
            .keys()
            .filter(|k| !seen.contains(k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(t) = self.tables.remove(&k) {
                t.bar.finish_and_clear();
                self.multi.remove(&t.bar);
            }
        }
    }

    /// The job is over: the table bars go, the job's bar stays with its last line.
    pub fn finish(self) {
        for (_, t) in self.tables {
            t.bar.finish_and_clear();
            self.multi.remove(&t.bar);
        }
        self.job.abandon();
    }
}

/// A cap for a bar: its bytes a second, without show_rate's bits in parentheses.
fn cap_text(bytes_per_sec: u64) -> String {
    let full = show_rate(bytes_per_sec);
    full.split(" (").next().unwrap_or(&full).to_string()
}

/// Raw bytes still to read, from the plan's estimate scaled by the raw bytes read so far per
/// planned byte done (the plan measures pages on disk; COPY data is larger or smaller).
pub fn left_raw(est_total: u64, est_done: u64, raw_done: u64) -> u64 {
    let left = est_total.saturating_sub(est_done);
    if est_done == 0 || raw_done == 0 {
        return left;
    }
    (left as f64 * raw_done as f64 / est_done as f64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_smoothed_over_polls_and_ignores_short_ones() {
        let t0 = Instant::now();
        let mut r = Rate::default();
        assert_eq!(r.observe(t0, 0), None);
        // Too soon: no rate yet.
        assert_eq!(r.observe(t0 + Duration::from_millis(200), 1_000), None);
        let first = r
            .observe(t0 + Duration::from_secs(1), 10_000_000)
            .expect("a rate");
        assert!((first - 10_000_000.0).abs() < 1.0, "{first}");
        // The rate halves: the smoothed one moves towards it, not all the way at once.
        let next = r
            .observe(t0 + Duration::from_secs(2), 15_000_000)
            .expect("a rate");
        assert!(next < 10_000_000.0 && next > 5_000_000.0, "{next}");
    }

    #[test]
    fn eta_and_counts_read_as_people_expect() {
        assert_eq!(eta(0, Some(10.0)), None);
        assert_eq!(eta(100, None), None);
        assert_eq!(eta(600, Some(10.0)).as_deref(), Some("1m"));
        assert_eq!(count(999), "999");
        assert_eq!(count(12_345), "12.3k");
        assert_eq!(count(1_234_567), "1.23M");
        assert_eq!(left_raw(100, 50, 200), 200);
        assert_eq!(left_raw(100, 0, 0), 100);
    }

    #[test]
    fn a_bar_says_rows_bytes_rate_eta_and_retries() {
        let m = bar_message(
            3,
            16,
            Some(2),
            12_345,
            48_000_000,
            20_000_000,
            Some(2e6),
            4e6 as u64,
            1,
        );
        assert_eq!(
            m,
            "chunks 3/16 (2 in flight)  rows 12.3k  48.0 MB read, 20.0 MB on the wire  2.0 MB/s read  ETA 2s  retried 1"
        );
    }
}
