//! `nimbus-cron` owns schedule arithmetic: parsing cron expressions (five
//! fields, or six with seconds first), naming IANA time zones, and computing
//! the next fire time after an instant with correct daylight-saving
//! behaviour.
//!
//! Daylight-saving rules follow the long-standing behaviour of system cron:
//! - A schedule with a fixed hour (`30 2 * * *`) fires once per matching
//!   local day. A local time skipped by a spring-forward jump fires at the
//!   same offset after the jump (02:30 becomes 03:30); a local time repeated
//!   by a fall-back jump fires only on its first occurrence.
//! - A schedule that runs every hour (`*/15 * * * *`) follows real time: it
//!   fires in both passes of a repeated hour and not at all in a skipped one,
//!   so the interval between fires stays what the expression says.

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan as _};
use std::fmt;
use std::str::FromStr;

/// Why a cron expression or time zone was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error(
        "cron expression `{0}` has {1} fields: write 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
    )]
    FieldCount(String, usize),
    #[error("cron field {field} `{text}`: {reason}")]
    Field {
        field: &'static str,
        text: String,
        reason: String,
    },
    #[error(
        "unknown time zone `{0}`: use an IANA name such as \"UTC\", \"Europe/Berlin\" or \"America/New_York\""
    )]
    TimeZone(String),
}

/// One field's allowed values as a bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Bits(u64);

impl Bits {
    fn has(self, v: u8) -> bool {
        v < 64 && self.0 & (1 << v) != 0
    }
}

#[derive(Clone, Copy)]
struct FieldSpec {
    name: &'static str,
    min: u8,
    max: u8,
    names: &'static [&'static str],
}

const SECOND: FieldSpec = FieldSpec {
    name: "seconds",
    min: 0,
    max: 59,
    names: &[],
};
const MINUTE: FieldSpec = FieldSpec {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
};
const HOUR: FieldSpec = FieldSpec {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
};
const DAY_OF_MONTH: FieldSpec = FieldSpec {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
};
const MONTH: FieldSpec = FieldSpec {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
};
/// Day of week: 0 and 7 are Sunday.
const DAY_OF_WEEK: FieldSpec = FieldSpec {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
};

impl FieldSpec {
    fn value(&self, text: &str) -> Result<u8, String> {
        if let Some(i) = self.names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
            return Ok(i as u8 + if self.min == 1 { 1 } else { 0 });
        }
        let v: u8 = text.parse().map_err(|_| {
            if self.names.is_empty() {
                format!("`{text}` is not a number")
            } else {
                format!(
                    "`{text}` is not a number or a name ({})",
                    self.names.join(", ")
                )
            }
        })?;
        if v < self.min || v > self.max {
            return Err(format!("{v} is outside {}-{}", self.min, self.max));
        }
        Ok(v)
    }

    /// Parses `*`, `a`, `a-b`, `*/n`, `a-b/n`, `a/n` and comma lists.
    fn parse(&self, text: &str) -> Result<(Bits, bool), CronError> {
        let err = |reason: String| CronError::Field {
            field: self.name,
            text: text.to_owned(),
            reason,
        };
        let mut bits = 0u64;
        let mut star = false;
        for part in text.split(',') {
            let (range, step) = match part.split_once('/') {
                Some((r, s)) => {
                    let step: u8 = s
                        .parse()
                        .ok()
                        .filter(|&s| s > 0)
                        .ok_or_else(|| err(format!("step `{s}` must be a positive number")))?;
                    (r, step)
                }
                None => (part, 1),
            };
            let (lo, hi) = if range == "*" {
                star |= step == 1;
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a).map_err(&err)?, self.value(b).map_err(&err)?);
                if a > b {
                    return Err(err(format!("range {a}-{b} runs backwards")));
                }
                (a, b)
            } else {
                let a = self.value(range).map_err(&err)?;
                (a, if step > 1 { self.max } else { a })
            };
            let mut v = lo;
            while v <= hi {
                bits |= 1 << v;
                v = match v.checked_add(step) {
                    Some(n) => n,
                    None => break,
                };
            }
        }
        if bits == 0 {
            return Err(err("matches nothing".into()));
        }
        Ok((Bits(bits), star))
    }
}

/// A parsed cron expression.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cron {
    text: String,
    seconds: Bits,
    minutes: Bits,
    hours: Bits,
    days: Bits,
    months: Bits,
    weekdays: Bits,
    days_star: bool,
    weekdays_star: bool,
    every_hour: bool,
}

impl Cron {
    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn day_matches(&self, date: Date) -> bool {
        if !self.months.has(date.month() as u8) {
            return false;
        }
        let dom = self.days.has(date.day() as u8);
        let wd = date.weekday().to_sunday_zero_offset() as u8;
        let dow = self.weekdays.has(wd) || (wd == 0 && self.weekdays.has(7));
        // As in every cron: when both day fields are restricted, either
        // matching is enough.
        match (self.days_star, self.weekdays_star) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            (false, false) => dom || dow,
        }
    }

    fn time_matches(&self, dt: DateTime) -> bool {
        self.minutes.has(dt.minute() as u8) && self.seconds.has(dt.second() as u8)
    }

    /// The first local date-time strictly after `after` matching every
    /// field, or `None` when there is none within eight years (e.g. 30 Feb).
    fn next_civil(&self, after: DateTime) -> Option<DateTime> {
        let mut dt = after.with().subsec_nanosecond(0).build().ok()?;
        dt = dt.checked_add(1.second()).ok()?;
        let limit = after.date().checked_add(8.years()).ok()?;
        while dt.date() <= limit {
            if !self.day_matches(dt.date()) {
                dt = dt
                    .date()
                    .tomorrow()
                    .ok()?
                    .to_datetime(jiff::civil::Time::midnight());
                continue;
            }
            if !self.hours.has(dt.hour() as u8) {
                dt = dt
                    .with()
                    .minute(0)
                    .second(0)
                    .build()
                    .ok()?
                    .checked_add(1.hour())
                    .ok()?;
                continue;
            }
            if !self.minutes.has(dt.minute() as u8) {
                dt = dt
                    .with()
                    .second(0)
                    .build()
                    .ok()?
                    .checked_add(1.minute())
                    .ok()?;
                continue;
            }
            if !self.seconds.has(dt.second() as u8) {
                dt = dt.checked_add(1.second()).ok()?;
                continue;
            }
            return Some(dt);
        }
        None
    }

    /// The next fire time strictly after `after` in `tz`.
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        if self.every_hour {
            self.next_real(after, tz)
        } else {
            self.next_wall(after, tz)
        }
    }

    /// Fixed-hour schedules follow the wall clock (see the crate docs).
    fn next_wall(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let mut local = after.to_zoned(tz.clone()).datetime();
        for _ in 0..64 {
            let candidate = self.next_civil(local)?;
            // Compatible: a skipped time moves forward by the gap, a repeated
            // time takes its first occurrence.
            let at = tz.to_ambiguous_timestamp(candidate).compatible().ok()?;
            if at > after {
                return Some(at);
            }
            local = candidate;
        }
        None
    }

    /// Every-hour schedules follow real time (see the crate docs).
    fn next_real(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let mut t = Timestamp::from_second(after.as_second()).ok()?;
        t = t.checked_add(1.second()).ok()?;
        let limit = t.checked_add((8 * 366 * 24).hours()).ok()?;
        while t <= limit {
            let local = t.to_zoned(tz.clone()).datetime();
            if !self.day_matches(local.date()) {
                let next_day = local
                    .date()
                    .tomorrow()
                    .ok()?
                    .to_datetime(jiff::civil::Time::midnight());
                let at = tz.to_ambiguous_timestamp(next_day).compatible().ok()?;
                t = if at > t {
                    at
                } else {
                    t.checked_add(1.hour()).ok()?
                };
                continue;
            }
            if self.time_matches(local) {
                return Some(t);
            }
            t = if self.minutes.has(local.minute() as u8) {
                t.checked_add(1.second()).ok()?
            } else {
                t.checked_add(i64::from(60 - local.second()).seconds())
                    .ok()?
            };
        }
        None
    }
}

impl FromStr for Cron {
    type Err = CronError;

    fn from_str(text: &str) -> Result<Self, CronError> {
        let trimmed = text.trim();
        let expanded = match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            _ => trimmed,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let (sec, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => return Err(CronError::FieldCount(trimmed.to_owned(), n)),
        };
        let (seconds, _) = SECOND.parse(sec)?;
        let (minutes, _) = MINUTE.parse(rest[0])?;
        let (hours, hours_star) = HOUR.parse(rest[1])?;
        let (days, days_star) = DAY_OF_MONTH.parse(rest[2])?;
        let (months, _) = MONTH.parse(rest[3])?;
        let (weekdays, weekdays_star) = DAY_OF_WEEK.parse(rest[4])?;
        Ok(Self {
            text: trimmed.to_owned(),
            seconds,
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_star,
            weekdays_star,
            every_hour: hours_star,
        })
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// An IANA time zone, checked against the bundled database.
#[derive(Clone, Debug)]
pub struct Zone {
    name: String,
    tz: TimeZone,
}

impl Zone {
    /// UTC.
    pub fn utc() -> Self {
        Self {
            name: "UTC".into(),
            tz: TimeZone::UTC,
        }
    }

    /// The zone's IANA name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The zone's rules.
    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for Zone {}
impl std::hash::Hash for Zone {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl FromStr for Zone {
    type Err = CronError;
    fn from_str(name: &str) -> Result<Self, CronError> {
        let tz = TimeZone::get(name).map_err(|_| CronError::TimeZone(name.to_owned()))?;
        Ok(Self {
            name: name.to_owned(),
            tz,
        })
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn fires(expr: &str, zone: &str, from: &str, n: usize) -> Vec<String> {
        let cron: Cron = expr.parse().unwrap();
        let zone: Zone = zone.parse().unwrap();
        let mut t = ts(from);
        let mut out = Vec::new();
        for _ in 0..n {
            t = cron.next_after(t, zone.tz()).unwrap();
            out.push(t.to_zoned(zone.tz().clone()).to_string());
        }
        out
    }

    #[test]
    fn parses_fields_names_and_steps() {
        let c: Cron = "*/15 9-17 * JAN-MAR mon-fri".parse().unwrap();
        assert!(c.minutes.has(45) && !c.minutes.has(50));
        assert!(c.hours.has(9) && c.hours.has(17) && !c.hours.has(18));
        assert!(c.months.has(3) && !c.months.has(4));
        assert!(c.weekdays.has(1) && c.weekdays.has(5) && !c.weekdays.has(0));
        let s: Cron = "*/10 * * * * *".parse().unwrap();
        assert!(s.seconds.has(50) && !s.seconds.has(5));
        assert!("5/20 * * * *".parse::<Cron>().unwrap().minutes.has(45));
        for bad in [
            "* * * *",
            "60 * * * *",
            "* * 0 * *",
            "*/0 * * * *",
            "5-1 * * * *",
            "* * * FOO *",
            "* * * * * * *",
        ] {
            assert!(bad.parse::<Cron>().is_err(), "{bad}");
        }
        assert!(matches!(
            "* * *".parse::<Cron>(),
            Err(CronError::FieldCount(_, 3))
        ));
    }

    #[test]
    fn every_minute_and_every_second() {
        assert_eq!(
            fires("* * * * *", "UTC", "2026-01-01T00:00:30Z", 2),
            [
                "2026-01-01T00:01:00+00:00[UTC]",
                "2026-01-01T00:02:00+00:00[UTC]"
            ]
        );
        assert_eq!(
            fires("* * * * * *", "UTC", "2026-01-01T00:00:30.5Z", 2),
            [
                "2026-01-01T00:00:31+00:00[UTC]",
                "2026-01-01T00:00:32+00:00[UTC]"
            ]
        );
    }

    #[test]
    fn day_of_month_or_day_of_week() {
        // 1st of the month or any Monday: 2026-06-01 is a Monday.
        assert_eq!(
            fires("0 12 1 * MON", "UTC", "2026-05-31T00:00:00Z", 3),
            [
                "2026-06-01T12:00:00+00:00[UTC]",
                "2026-06-08T12:00:00+00:00[UTC]",
                "2026-06-15T12:00:00+00:00[UTC]"
            ]
        );
        // Sunday as 7.
        assert_eq!(
            fires("0 0 * * 7", "UTC", "2026-06-01T00:00:00Z", 1),
            ["2026-06-07T00:00:00+00:00[UTC]"]
        );
        // 29 February only in leap years.
        assert_eq!(
            fires("0 0 29 2 *", "UTC", "2026-01-01T00:00:00Z", 1),
            ["2028-02-29T00:00:00+00:00[UTC]"]
        );
        assert!(
            "0 0 30 2 *"
                .parse::<Cron>()
                .unwrap()
                .next_after(ts("2026-01-01T00:00:00Z"), &TimeZone::UTC)
                .is_none()
        );
    }

    #[test]
    fn fixed_hour_across_spring_forward() {
        // New York skips 02:00-03:00 on 2026-03-08.
        assert_eq!(
            fires("30 2 * * *", "America/New_York", "2026-03-07T12:00:00Z", 3),
            [
                "2026-03-08T03:30:00-04:00[America/New_York]",
                "2026-03-09T02:30:00-04:00[America/New_York]",
                "2026-03-10T02:30:00-04:00[America/New_York]"
            ]
        );
    }

    #[test]
    fn fixed_hour_across_fall_back_fires_once() {
        // New York repeats 01:00-02:00 on 2026-11-01.
        assert_eq!(
            fires("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", 2),
            [
                "2026-11-01T01:30:00-04:00[America/New_York]",
                "2026-11-02T01:30:00-05:00[America/New_York]"
            ]
        );
    }

    #[test]
    fn every_hour_follows_real_time_across_fall_back() {
        let got = fires(
            "0,30 * * * *",
            "America/New_York",
            "2026-11-01T04:50:00Z",
            5,
        );
        assert_eq!(
            got,
            [
                "2026-11-01T01:00:00-04:00[America/New_York]",
                "2026-11-01T01:30:00-04:00[America/New_York]",
                "2026-11-01T01:00:00-05:00[America/New_York]",
                "2026-11-01T01:30:00-05:00[America/New_York]",
                "2026-11-01T02:00:00-05:00[America/New_York]"
            ]
        );
    }

    #[test]
    fn every_hour_skips_the_missing_hour() {
        let got = fires("0 * * * *", "America/New_York", "2026-03-08T05:30:00Z", 2);
        assert_eq!(
            got,
            [
                "2026-03-08T01:00:00-05:00[America/New_York]",
                "2026-03-08T03:00:00-04:00[America/New_York]"
            ]
        );
    }

    #[test]
    fn zones_are_checked() {
        assert!("Europe/Berlin".parse::<Zone>().is_ok());
        assert!(matches!(
            "Mars/Olympus".parse::<Zone>(),
            Err(CronError::TimeZone(_))
        ));
    }
}
