//! Bandwidth: parsing operator-written rates, showing them, and a limiter that keeps a
//! sender's wire bytes under a cap. The limiter uses governor's GCRA with a burst of a tenth of
//! a second, so the rate holds over short windows too, not just on average.

use std::num::NonZeroU32;

use anyhow::{bail, Context};
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Parse a rate such as `10MB`, `512KiB`, `100Mbit`, `1.5GB/s`, or `0`/`unlimited` (no cap).
/// Returns bytes per second; 0 means unlimited.
pub fn parse_rate(s: &str) -> anyhow::Result<u64> {
    let t = s.trim().trim_end_matches("/s").trim();
    if t.is_empty() {
        bail!("empty bandwidth: use a rate such as 10MB, 512KiB or 100Mbit, or 0 for no cap");
    }
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("off") || t == "0" {
        return Ok(0);
    }
    parse_quantity(s, t, "bandwidth")
}

/// A rate as operators read it, in both units so that it is never ambiguous:
/// `25.0 MB/s (200 Mbit/s)`; 0 is `off`.
pub fn show_rate(bytes_per_sec: u64) -> String {
    if bytes_per_sec == 0 {
        return "off".to_string();
    }
    let b = bytes_per_sec as f64;
    let bits = b * 8.0;
    let (bv, bu) = if b >= 1e9 {
        (b / 1e9, "GB/s")
    } else if b >= 1e6 {
        (b / 1e6, "MB/s")
    } else {
        (b / 1e3, "kB/s")
    };
    let (tv, tu) = if bits >= 1e9 {
        (bits / 1e9, "Gbit/s")
    } else if bits >= 1e6 {
        (bits / 1e6, "Mbit/s")
    } else {
        (bits / 1e3, "kbit/s")
    };
    format!("{bv:.1} {bu} ({} {tu})", trim_float(tv))
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// Parse a size such as `256MB`, `64MiB` or `1GB` into bytes.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    if t.is_empty() {
        bail!("empty size: use a size such as 256MB or 1GiB");
    }
    parse_quantity(s, t, "size")
}

fn parse_quantity(s: &str, t: &str, what: &str) -> anyhow::Result<u64> {
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .with_context(|| format!("{what} {s:?}: {num:?} is not a positive number"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "kbit" => 1e3 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        other => bail!(
            "{what} {s:?}: unknown unit {other:?}; use B, KB, KiB, MB, MiB, GB, GiB, kbit, Mbit or Gbit"
        ),
    };
    let bytes = (value * mult).round();
    if bytes < 1024.0 {
        bail!("{what} {s:?} is below 1 KiB; use a larger value");
    }
    Ok(bytes as u64)
}

/// A governor clock that reads tokio's clock, so the limiter waits with tokio timers and tests
/// can drive it with `tokio::time::pause()`.
#[derive(Clone)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;

/// One rate's bucket: governor's GCRA and its burst, in cells.
struct Bucket {
    gcra: Gcra,
    burst: u32,
}

/// Keeps the bytes passed through [`Limiter::consume`] under a rate that can change while
/// streams run ([`Limiter::set_rate`]): the coordinator divides a job's cap among senders and
/// changes it on a timetable or an operator's word, and a stream in the middle of a chunk
/// follows the new rate at its next slice.
pub struct Limiter {
    clock: TokioClock,
    /// None: unlimited.
    bucket: std::sync::RwLock<Option<std::sync::Arc<Bucket>>>,
    rate: std::sync::atomic::AtomicU64,
}

/// The limiter counts in KiB cells so that any practical rate fits governor's u32 quotas.
const CELL: u64 = 1024;

/// How long a waiting stream sleeps at most before it looks at the rate again.
const RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

impl Limiter {
    /// `bytes_per_sec == 0` means unlimited.
    pub fn new(bytes_per_sec: u64) -> Limiter {
        let clock = TokioClock::default();
        Limiter {
            bucket: std::sync::RwLock::new(Self::bucket(bytes_per_sec, &clock)),
            clock,
            rate: std::sync::atomic::AtomicU64::new(bytes_per_sec),
        }
    }

    /// A bucket for `bytes_per_sec`, emptied: a new rate starts without a burst, so a cap
    /// lowered (or set) now holds from now.
    fn bucket(bytes_per_sec: u64, clock: &TokioClock) -> Option<std::sync::Arc<Bucket>> {
        if bytes_per_sec == 0 {
            return None;
        }
        let cells = (bytes_per_sec / CELL).clamp(1, u32::MAX as u64) as u32;
        let burst = (cells / 10).max(16);
        let quota = Quota::per_second(NonZeroU32::new(cells).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        let gcra = RateLimiter::direct_with_clock(quota, clock.clone());
        if let Some(b) = NonZeroU32::new(burst) {
            let _ = gcra.check_n(b);
        }
        Some(std::sync::Arc::new(Bucket { gcra, burst }))
    }

    /// Change the rate (0: unlimited). Streams waiting now continue at the new rate.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        if self
            .rate
            .swap(bytes_per_sec, std::sync::atomic::Ordering::SeqCst)
            == bytes_per_sec
        {
            return;
        }
        let b = Self::bucket(bytes_per_sec, &self.clock);
        if let Ok(mut slot) = self.bucket.write() {
            *slot = b;
        }
    }

    /// The rate in force, bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn is_unlimited(&self) -> bool {
        self.rate() == 0
    }

    /// The most bytes the limiter lets through at once (a tenth of a second's worth, at least
    /// 16 KiB); None when unlimited. Senders cut blocks no larger, so that what the limiter
    /// meters is also what the wire sees in one go.
    pub fn burst_bytes(&self) -> Option<u64> {
        let slot = self.bucket.read().ok()?;
        slot.as_ref().map(|b| b.burst as u64 * CELL)
    }

    fn current(&self) -> Option<std::sync::Arc<Bucket>> {
        self.bucket.read().ok().and_then(|b| b.clone())
    }

    /// Wait until `bytes` may be sent, in slices no larger than the burst.
    pub async fn consume(&self, bytes: usize) {
        let mut cells = (bytes as u64).div_ceil(CELL);
        while cells > 0 {
            let Some(b) = self.current() else {
                return;
            };
            let n = cells.min(b.burst as u64) as u32;
            let Some(n_nz) = NonZeroU32::new(n) else {
                return;
            };
            match b.gcra.check_n(n_nz) {
                Ok(Ok(())) => cells -= n as u64,
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    tokio::time::sleep(wait.min(RECHECK)).await;
                }
                // n <= burst by construction, so capacity always suffices; stop rather than spin.
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates() {
        let table = [
            ("10MB", Some(10_000_000)),
            ("10MB/s", Some(10_000_000)),
            ("512KiB", Some(524_288)),
            ("100Mbit", Some(12_500_000)),
            ("1.5GB", Some(1_500_000_000)),
            ("0", Some(0)),
            ("unlimited", Some(0)),
            ("off", Some(0)),
            ("12", None),
            ("-5MB", None),
            ("10 parsecs", None),
            ("", None),
        ];
        for (input, want) in table {
            assert_eq!(parse_rate(input).ok(), want, "{input}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_holds_the_rate() {
        let lim = Limiter::new(1024 * 1024);
        let start = tokio::time::Instant::now();
        for _ in 0..40 {
            lim.consume(256 * 1024).await;
        }
        // 10 MiB at 1 MiB/s: no initial burst.
        let secs = start.elapsed().as_secs_f64();
        assert!((9.8..=10.3).contains(&secs), "took {secs}s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_rate_reaches_a_waiting_stream_and_starts_without_a_burst() {
        let lim = std::sync::Arc::new(Limiter::new(100 * 1024));
        let start = tokio::time::Instant::now();
        let l = lim.clone();
        // 2 MiB at 100 KiB/s would take 20 s; after 1 s the rate goes to 1 MiB/s.
        let stream = tokio::spawn(async move { l.consume(2 << 20).await });
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        lim.set_rate(1 << 20);
        assert_eq!(lim.burst_bytes(), Some(104_448));
        stream.await.expect("stream");
        // About 100 KiB in the first second, the rest at 1 MiB/s.
        let secs = start.elapsed().as_secs_f64();
        assert!((2.7..=3.2).contains(&secs), "took {secs}s");
        lim.set_rate(0);
        assert!(lim.is_unlimited());
        let t = tokio::time::Instant::now();
        lim.consume(100 << 20).await;
        assert_eq!(t.elapsed().as_secs(), 0);
    }

    #[test]
    fn rates_show_in_both_units() {
        assert_eq!(show_rate(25_000_000), "25.0 MB/s (200 Mbit/s)");
        assert_eq!(show_rate(1_250_000_000), "1.2 GB/s (10 Gbit/s)");
        assert_eq!(show_rate(64_000), "64.0 kB/s (512 kbit/s)");
        assert_eq!(show_rate(0), "off");
    }
}
