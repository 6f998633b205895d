//! One bandwidth cap per job, across all its senders. The cap in force comes from the job's
//! spec (a rate, off, or a timetable evaluated in the coordinator's time zone); the
//! coordinator divides it among the senders by their demand (the leases each holds) and tells
//! each its share when it takes a lease and when it renews (at least once a second).
//!
//! Why grants are two-phase: a share that shrinks is granted at once, but one that grows only
//! out of what the other senders' current grants leave free. A sender learns of a smaller share
//! only at its next renewal, so granting the newcomer its fair share at once would let the sum
//! exceed the cap for up to a second; instead the newcomer starts at a trickle and grows as the
//! others give way.

use std::collections::{HashMap, VecDeque};

use haul_core::bandwidth::show_rate;
use haul_core::schedule::{minute_of_week, show_minute, InForce, Schedule};

/// The least a sender with leases is granted (bytes per second): 0 would mean no cap.
const TRICKLE: u64 = 1024;

/// How far back the achieved rate looks.
const WINDOW_MS: u64 = 3_000;

/// A job's cap state that lives only in memory: what each sender was last granted and the wire
/// bytes reported lately.
#[derive(Default, Debug, Clone)]
pub struct CapState {
    grants: HashMap<String, u64>,
    sent: VecDeque<(u64, u64)>,
}

impl CapState {
    /// `agent` sent `bytes` more on the wire (reported at `now_ms`).
    pub fn record_sent(&mut self, now_ms: u64, bytes: u64) {
        if bytes > 0 {
            self.sent.push_back((now_ms, bytes));
        }
        while self
            .sent
            .front()
            .is_some_and(|(t, _)| now_ms.saturating_sub(*t) > WINDOW_MS)
        {
            self.sent.pop_front();
        }
    }

    /// Wire bytes per second over the last few seconds, all senders together.
    pub fn rate(&self, now_ms: u64) -> f64 {
        let bytes: u64 = self
            .sent
            .iter()
            .filter(|(t, _)| now_ms.saturating_sub(*t) <= WINDOW_MS)
            .map(|(_, b)| b)
            .sum();
        bytes as f64 / (WINDOW_MS as f64 / 1000.0)
    }

    /// The share of `cap` (0 = none) for `agent`, which holds `mine` of the job's `total`
    /// leases, remembered as its grant. Senders without leases get nothing to send with.
    pub fn grant(&mut self, agent: &str, cap: u64, mine: usize, total: usize) -> u64 {
        if cap == 0 {
            self.grants.clear();
            return 0;
        }
        if mine == 0 || total == 0 {
            self.grants.remove(agent);
            return TRICKLE;
        }
        let fair = (cap as u128 * mine as u128 / total as u128) as u64;
        let others: u64 = self
            .grants
            .iter()
            .filter(|(a, _)| a.as_str() != agent)
            .map(|(_, g)| *g)
            .sum();
        let room = cap.saturating_sub(others);
        let g = fair.min(room).max(TRICKLE);
        self.grants.insert(agent.to_string(), g);
        g
    }

    /// Forget a sender's grant (its leases went back).
    pub fn release(&mut self, agent: &str) {
        self.grants.remove(agent);
    }
}

/// A job's cap spec as stored: the operator's text, or a constant from an older record.
pub fn spec_of(bwlimit: &str, bwlimit_bytes: u64) -> String {
    if bwlimit.trim().is_empty() {
        bwlimit_bytes.to_string()
    } else {
        bwlimit.to_string()
    }
}

/// What minute of the week it is in `tz` now (0 = Monday 00:00).
pub fn minute_now(tz: &jiff::tz::TimeZone) -> u32 {
    let z = jiff::Timestamp::now().to_zoned(tz.clone());
    minute_of_week(
        z.weekday().to_monday_zero_offset() as u32,
        z.hour() as u32,
        z.minute() as u32,
    )
}

/// The cap `spec` puts in force at `minute`, and a line saying so for people.
pub fn in_force(spec: &str, minute: u32, tz_name: &str) -> (InForce, String) {
    let schedule = match Schedule::parse(spec) {
        Ok(s) => s,
        // Specs are checked before they are stored; an unreadable one caps nothing.
        Err(_) => Schedule::constant(0),
    };
    let now = schedule.at(minute);
    let mut text = show_rate(now.bytes_per_sec);
    if now.bytes_per_sec == 0 {
        text = "off (no cap)".to_string();
    }
    if let Some((at, rate)) = now.next {
        text.push_str(&format!(
            " until {} {tz_name}, then {} (timetable)",
            show_minute(at),
            show_rate(rate)
        ));
    } else if !schedule.is_constant() {
        text.push_str(" (timetable)");
    }
    (now, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_demand_and_never_sum_past_the_cap() {
        let cap = 1_000_000;
        let mut c = CapState::default();
        // A alone gets all of it.
        assert_eq!(c.grant("a", cap, 2, 2), cap);
        // B joins with as many leases: it starts at a trickle, since A still holds the cap.
        assert_eq!(c.grant("b", cap, 2, 4), TRICKLE);
        // A renews and gives way; then B grows into the room.
        assert_eq!(c.grant("a", cap, 2, 4), cap / 2);
        assert_eq!(c.grant("b", cap, 2, 4), cap / 2);
        // Demand shifts: B holds three of four leases.
        assert_eq!(c.grant("a", cap, 1, 4), cap / 4);
        assert_eq!(c.grant("b", cap, 3, 4), cap * 3 / 4);
        // A leaves; B takes the rest at its next renewal.
        c.release("a");
        assert_eq!(c.grant("b", cap, 3, 3), cap);
        // Off: no cap for anyone.
        assert_eq!(c.grant("b", 0, 3, 3), 0);
    }

    #[test]
    fn the_achieved_rate_looks_a_few_seconds_back() {
        let mut c = CapState::default();
        c.record_sent(1_000, 3_000_000);
        c.record_sent(2_000, 3_000_000);
        assert_eq!(c.rate(2_000), 2_000_000.0);
        // At 4.5 s the first report is out of the window, the second still in.
        c.record_sent(4_500, 0);
        assert_eq!(c.rate(4_500), 1_000_000.0);
        c.record_sent(9_000, 0);
        assert_eq!(c.rate(9_000), 0.0);
    }

    #[test]
    fn the_cap_in_force_is_said_in_both_units_with_what_comes_next() {
        let spec = "Mon-Fri 08:00,200Mbit 19:00,off; Sat-Sun off";
        let (now, text) = in_force(spec, minute_of_week(0, 9, 0), "UTC");
        assert_eq!(now.bytes_per_sec, 25_000_000);
        assert_eq!(
            text,
            "25.0 MB/s (200 Mbit/s) until Mon 19:00 UTC, then off (timetable)"
        );
        let (_, text) = in_force("50MB", 0, "UTC");
        assert_eq!(text, "50.0 MB/s (400 Mbit/s)");
        assert_eq!(in_force("0", 0, "UTC").1, "off (no cap)");
        assert_eq!(spec_of("", 2_000_000), "2000000");
    }
}
