//! Bandwidth: parsing operator-written rates and a limiter that keeps a sender's wire bytes
//! under a cap. The limiter uses governor's GCRA with a burst of a tenth of a second, so the
//! rate holds over short windows too, not just on average.

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
    if t.eq_ignore_ascii_case("unlimited") || t == "0" {
        return Ok(0);
    }
    parse_quantity(s, t, "bandwidth")
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

/// Keeps the bytes passed through [`Limiter::consume`] under a rate.
pub struct Limiter {
    inner: Option<(Gcra, TokioClock, u32)>,
}

/// The limiter counts in KiB cells so that any practical rate fits governor's u32 quotas.
const CELL: u64 = 1024;

impl Limiter {
    /// `bytes_per_sec == 0` means unlimited.
    pub fn new(bytes_per_sec: u64) -> Limiter {
        if bytes_per_sec == 0 {
            return Limiter { inner: None };
        }
        let cells = (bytes_per_sec / CELL).clamp(1, u32::MAX as u64) as u32;
        let burst = (cells / 10).max(16);
        let quota = Quota::per_second(NonZeroU32::new(cells).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        let clock = TokioClock::default();
        Limiter {
            inner: Some((
                RateLimiter::direct_with_clock(quota, clock.clone()),
                clock,
                burst,
            )),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.inner.is_none()
    }

    /// Wait until `bytes` may be sent.
    pub async fn consume(&self, bytes: usize) {
        let Some((limiter, clock, burst)) = &self.inner else {
            return;
        };
        let mut cells = (bytes as u64).div_ceil(CELL);
        while cells > 0 {
            let n = cells.min(*burst as u64) as u32;
            let Some(n_nz) = NonZeroU32::new(n) else {
                return;
            };
            match limiter.check_n(n_nz) {
                Ok(Ok(())) => cells -= n as u64,
                Ok(Err(not_until)) => {
                    tokio::time::sleep(not_until.wait_time_from(clock.now())).await;
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
        // 10 MiB at 1 MiB/s, less the initial burst of 0.1 s.
        let secs = start.elapsed().as_secs_f64();
        assert!((9.5..=10.5).contains(&secs), "took {secs}s");
    }
}
