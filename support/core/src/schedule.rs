//! Bandwidth caps that change with the time of the week: `--bwlimit` and `haul bwlimit` take a
//! plain rate, `off`, or a timetable such as
//!
//! ```text
//! Mon-Fri 08:00,200Mbit 19:00,off; Sat-Sun off
//! ```
//!
//! A timetable is rules separated by `;`. A rule names days (`Mon`, `Mon-Fri`, `Sat,Sun`,
//! `Fri-Mon`, or `daily`) and then either one rate for the whole day or change points
//! `HH:MM,RATE`, each in force until the next change point. Before a day's first change point
//! the rate of the last point before it holds, so the week is one cycle: above, Monday before
//! 08:00 is `off`, from Sunday. Rates take the units `--bwlimit` takes (`MB`, `MiB`, `Mbit`,
//! ...); `off` is no cap. The coordinator evaluates a timetable in its configured time zone.
//!
//! Pure logic: the caller says what minute of the week it is.

use anyhow::{bail, Context};

use crate::bandwidth::{parse_rate, show_rate};

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const MINUTES_A_DAY: u32 = 24 * 60;
const MINUTES_A_WEEK: u32 = 7 * MINUTES_A_DAY;

/// A cap spec, parsed: a constant rate (bytes per second, 0 = no cap) or a weekly timetable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Change points: minute of the week (0 = Monday 00:00) and the rate from then on.
    /// Sorted; one point at minute 0 for a constant rate.
    points: Vec<(u32, u64)>,
    constant: bool,
}

/// The rate a schedule gives at some minute, and when (and to what) it next changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InForce {
    pub bytes_per_sec: u64,
    /// The next change: minute of the week and the rate then; None for a constant rate.
    pub next: Option<(u32, u64)>,
}

impl Schedule {
    pub fn constant(bytes_per_sec: u64) -> Schedule {
        Schedule {
            points: vec![(0, bytes_per_sec)],
            constant: true,
        }
    }

    pub fn is_constant(&self) -> bool {
        self.constant
    }

    /// Parse a rate, `off`, or a timetable.
    pub fn parse(spec: &str) -> anyhow::Result<Schedule> {
        let spec = spec.trim();
        // A rate starts with a digit (or is off); a timetable starts with days.
        let first = spec.split_whitespace().next().unwrap_or_default();
        let rate_like = first.starts_with(|c: char| c.is_ascii_digit() || c == '.')
            || ["off", "unlimited"]
                .iter()
                .any(|w| first.eq_ignore_ascii_case(w));
        if !spec.contains(';') && rate_like {
            return Ok(Schedule::constant(parse_rate(spec)?));
        }
        let mut points: Vec<(u32, u64)> = Vec::new();
        for rule in spec.split(';').map(str::trim).filter(|r| !r.is_empty()) {
            let mut words = rule.split_whitespace();
            let days_word = words.next().unwrap_or_default();
            let days = parse_days(days_word).with_context(|| {
                format!(
                    "timetable rule {rule:?}: it starts with the days it holds for (Mon-Fri, Sat,Sun, daily)"
                )
            })?;
            let changes: Vec<&str> = words.collect();
            if changes.is_empty() {
                bail!("timetable rule {rule:?} names days but no rate; add a rate (Sat-Sun off) or change points (08:00,200Mbit)");
            }
            let mut day_points = Vec::new();
            for c in &changes {
                match c.split_once(',') {
                    Some((time, rate)) => {
                        let at = parse_time(time)
                            .with_context(|| format!("timetable rule {rule:?}"))?;
                        let r = parse_rate(rate).with_context(|| format!("timetable rule {rule:?}"))?;
                        day_points.push((at, r));
                    }
                    None if changes.len() == 1 => {
                        let r = parse_rate(c).with_context(|| format!("timetable rule {rule:?}"))?;
                        day_points.push((0, r));
                    }
                    None => bail!(
                        "timetable rule {rule:?}: {c:?} is not a change point; write HH:MM,RATE (e.g. 19:00,off)"
                    ),
                }
            }
            for d in days {
                for &(at, r) in &day_points {
                    let minute = d * MINUTES_A_DAY + at;
                    match points.iter().find(|(m, _)| *m == minute) {
                        Some((_, other)) if *other != r => bail!(
                            "timetable: {} {:02}:{:02} is given two rates ({} and {})",
                            DAYS[d as usize],
                            at / 60,
                            at % 60,
                            show_rate(*other),
                            show_rate(r)
                        ),
                        Some(_) => {}
                        None => points.push((minute, r)),
                    }
                }
            }
        }
        if points.is_empty() {
            bail!("empty timetable: give a rate, off, or rules such as \"Mon-Fri 08:00,200Mbit 19:00,off; Sat-Sun off\"");
        }
        points.sort();
        Ok(Schedule {
            points,
            constant: false,
        })
    }

    /// The rate at `minute` of the week (0 = Monday 00:00).
    pub fn at(&self, minute: u32) -> InForce {
        let minute = minute % MINUTES_A_WEEK;
        let i = self
            .points
            .iter()
            .rposition(|(m, _)| *m <= minute)
            .unwrap_or(self.points.len() - 1);
        let bytes_per_sec = self.points[i].1;
        if self.constant {
            return InForce {
                bytes_per_sec,
                next: None,
            };
        }
        // The next point whose rate differs, going round the week once.
        let n = self.points.len();
        let next = (1..=n)
            .map(|k| self.points[(i + k) % n])
            .find(|(_, r)| *r != bytes_per_sec);
        InForce {
            bytes_per_sec,
            next,
        }
    }
}

/// `Mon 08:00` for a minute of the week.
pub fn show_minute(minute: u32) -> String {
    let m = minute % MINUTES_A_WEEK;
    let (d, t) = (m / MINUTES_A_DAY, m % MINUTES_A_DAY);
    format!("{} {:02}:{:02}", DAYS[d as usize], t / 60, t % 60)
}

/// The minute of the week for a weekday (0 = Monday), hour and minute.
pub fn minute_of_week(weekday_from_monday: u32, hour: u32, minute: u32) -> u32 {
    (weekday_from_monday % 7) * MINUTES_A_DAY + hour.min(23) * 60 + minute.min(59)
}

/// A day by its name or a prefix of it of three letters or more (`Mon`, `monday`, `Thurs`).
fn day_index(s: &str) -> Option<u32> {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let s = s.to_ascii_lowercase();
    if s.len() < 3 {
        return None;
    }
    FULL.iter()
        .position(|f| f.starts_with(&s))
        .map(|i| i as u32)
}

fn parse_days(s: &str) -> anyhow::Result<Vec<u32>> {
    if s.eq_ignore_ascii_case("daily") || s == "*" {
        return Ok((0..7).collect());
    }
    let mut out = Vec::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        let (Some(a), Some(b)) = (day_index(a), day_index(b)) else {
            bail!("{item:?} is not a day or a range of days (Mon, Mon-Fri, Fri-Mon)");
        };
        let mut d = a;
        loop {
            if !out.contains(&d) {
                out.push(d);
            }
            if d == b {
                break;
            }
            d = (d + 1) % 7;
        }
    }
    if out.is_empty() {
        bail!("no days");
    }
    Ok(out)
}

fn parse_time(s: &str) -> anyhow::Result<u32> {
    let (h, m) = s
        .split_once(':')
        .with_context(|| format!("{s:?} is not a time; write HH:MM"))?;
    let (Ok(h), Ok(m)) = (h.parse::<u32>(), m.parse::<u32>()) else {
        bail!("{s:?} is not a time; write HH:MM");
    };
    if h > 23 || m > 59 || (m < 10 && !s.ends_with(&format!("0{m}"))) {
        bail!("{s:?} is not a time of day; write HH:MM from 00:00 to 23:59");
    }
    Ok(h * 60 + m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MBIT200: u64 = 25_000_000;

    #[test]
    fn the_example_timetable() {
        let s = Schedule::parse("Mon-Fri 08:00,200Mbit 19:00,off; Sat-Sun off").expect("parses");
        let table = [
            // (day, hour, minute) -> rate
            ((0, 7, 59), 0),
            ((0, 8, 0), MBIT200),
            ((2, 12, 30), MBIT200),
            ((4, 18, 59), MBIT200),
            ((4, 19, 0), 0),
            ((5, 12, 0), 0),
            ((6, 23, 59), 0),
        ];
        for ((d, h, m), want) in table {
            assert_eq!(
                s.at(minute_of_week(d, h, m)).bytes_per_sec,
                want,
                "{}",
                show_minute(minute_of_week(d, h, m))
            );
        }
        let now = s.at(minute_of_week(0, 9, 0));
        assert_eq!(now.next, Some((minute_of_week(0, 19, 0), 0)));
        assert_eq!(show_minute(now.next.expect("next").0), "Mon 19:00");
        // Friday evening: the next change is Monday 08:00.
        assert_eq!(
            s.at(minute_of_week(4, 20, 0)).next,
            Some((minute_of_week(0, 8, 0), MBIT200))
        );
    }

    #[test]
    fn before_a_days_first_point_the_previous_rate_holds() {
        let s = Schedule::parse("Mon 09:00,10MB; Wed 22:00,1MB").expect("parses");
        assert_eq!(s.at(minute_of_week(0, 8, 0)).bytes_per_sec, 1_000_000);
        assert_eq!(s.at(minute_of_week(1, 3, 0)).bytes_per_sec, 10_000_000);
        assert_eq!(s.at(minute_of_week(3, 3, 0)).bytes_per_sec, 1_000_000);
    }

    #[test]
    fn constants_days_and_lists() {
        assert_eq!(
            Schedule::parse("100Mbit").expect("rate").at(5),
            InForce {
                bytes_per_sec: 12_500_000,
                next: None
            }
        );
        assert!(Schedule::parse("off").expect("off").is_constant());
        let s =
            Schedule::parse("Sat,Sun 50MB; Fri-Mon 23:00,off; daily 06:00,5MB").expect("parses");
        assert_eq!(s.at(minute_of_week(5, 1, 0)).bytes_per_sec, 50_000_000);
        assert_eq!(s.at(minute_of_week(5, 7, 0)).bytes_per_sec, 5_000_000);
        assert_eq!(s.at(minute_of_week(2, 23, 30)).bytes_per_sec, 5_000_000);
        assert_eq!(s.at(minute_of_week(0, 23, 30)).bytes_per_sec, 0);
        assert!(Schedule::parse("monday 10:00,1MB; TUESDAY 1MB").is_ok());
    }

    #[test]
    fn bad_timetables_say_what_is_wrong() {
        let table = [
            ("Mon-Fri", "names days but no rate"),
            ("Mon-Fri 25:00,1MB", "not a time of day"),
            ("Mon-Fri 8:5,1MB", "not a time of day"),
            ("Funday 1MB", "not a day"),
            ("Mon 10:00,fast", "not a positive number"),
            ("Mon 10:00 1MB", "not a change point"),
            ("Mon 10:00,1MB; Mon 10:00,2MB", "given two rates"),
            (" ; ", "empty timetable"),
            ("12", "below 1 KiB"),
        ];
        for (spec, want) in table {
            let e = format!("{:#}", Schedule::parse(spec).expect_err(spec));
            assert!(e.contains(want), "{spec}: {e}");
        }
    }
}
