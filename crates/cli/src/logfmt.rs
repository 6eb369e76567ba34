//! The node's JSON log lines: one object per event, with `timestamp`
//! (RFC 3339, UTC, microseconds), `level`, the event's fields in order
//! (`message` first) and `target`.
//!
//! Written straight into the line's buffer, without an intermediate map or
//! UTF-8 re-validation: every invocation logs a line, so its formatting is
//! on the request path.

use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats events as JSON lines.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        // For a `log` record, its own target and level, not the bridge's.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        writer.write_str("{\"timestamp\":\"")?;
        timestamp(&mut writer, std::time::SystemTime::now())?;
        write!(writer, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = Fields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        string(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct Fields<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        // Not the `log` bridge's own fields (`log.target`, `log.file`...):
        // the line's `target` already names where a record came from.
        if self.result.is_ok() && !field.name().starts_with("log.") {
            self.result = self
                .out
                .write_char(',')
                .and_then(|()| string(self.out, field.name()))
                .and_then(|()| self.out.write_char(':'))
                .and_then(|()| value(self.out));
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |out| {
            if value.is_finite() {
                write!(out, "{value}")
            } else {
                out.write_str("null")
            }
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| string(out, value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, |out| quoted(out, format_args!("{value}")));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| quoted(out, format_args!("{value:?}")));
    }
}

/// Writes `s` as a JSON string.
fn string(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(s)?;
    out.write_char('"')
}

/// Writes what `args` formats as a JSON string, escaping as it goes.
fn quoted(out: &mut impl fmt::Write, args: fmt::Arguments<'_>) -> fmt::Result {
    out.write_char('"')?;
    Escaped(&mut *out).write_fmt(args)?;
    out.write_char('"')
}

/// Escapes what passes through for the inside of a JSON string.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

/// Writes `t` as `2026-11-29T02:31:20.895353` (UTC).
fn timestamp(out: &mut impl fmt::Write, t: std::time::SystemTime) -> fmt::Result {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let day_secs = secs % 86_400;
    let (y, m, d) = civil(days);
    write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60,
        since.subsec_micros()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01.
fn civil(days: i64) -> (i64, u32, u32) {
    // Counted in 400-year eras from 0000-03-01, so that the leap day ends
    // each year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn dates_match_the_calendar() {
        let at = |secs: u64, micros: u32| {
            let mut s = String::new();
            timestamp(&mut s, UNIX_EPOCH + Duration::new(secs, micros * 1000)).unwrap();
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        // The last second of a leap day, and the first after it.
        assert_eq!(at(951_868_799, 999_999), "2000-02-29T23:59:59.999999Z");
        assert_eq!(at(951_868_800, 0), "2000-03-01T00:00:00.000000Z");
        // A century that is not a leap year.
        assert_eq!(at(4_107_542_400, 1), "2100-03-01T00:00:00.000001Z");
        assert_eq!(at(1_795_746_680, 895_353), "2026-11-27T02:31:20.895353Z");
        assert_eq!(at(1_798_761_599, 0), "2026-12-31T23:59:59.000000Z");
    }

    #[test]
    fn every_day_follows_the_one_before() {
        // 1970 to 2400, day by day: each date is the next valid one.
        let (mut y, mut m, mut d) = civil(0);
        for days in 1..156_000 {
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            let next = if d < len {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
            assert_eq!(civil(days), next, "day {days}");
            (y, m, d) = next;
        }
    }

    /// Collects what the formatter writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn events_are_json_objects_with_every_field() {
        let out = Lines::default();
        let subscriber = || {
            let out = out.clone();
            tracing_subscriber::fmt()
                .event_format(JsonLines)
                .with_writer(move || out.clone())
                .finish()
        };
        let tricky = "quote \" backslash \\ newline \n tab \t bell \u{7} é 雲";
        let error = std::io::Error::other("disk \"full\"");
        tracing::subscriber::with_default(subscriber(), || {
            tracing::info!(
                target: "nimbus::invocation",
                id = %"abc",
                count = 3u64,
                delta = -4i64,
                ms = 0.052086999999999994,
                nan = f64::NAN,
                ok = true,
                text = tricky,
                debug = ?vec!["a"],
                error = &error as &(dyn std::error::Error + 'static),
                "invocation {}", "done"
            );
            tracing::warn!("plain");
        });
        // A `log` record, through the bridge `init` installs: its own
        // target, none of the bridge's fields.
        tracing::subscriber::with_default(subscriber(), || {
            let record = log::Record::builder()
                .args(format_args!("from log"))
                .level(log::Level::Warn)
                .target("some_crate::module")
                .build();
            tracing_log::format_trace(&record).unwrap();
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        let l = &lines[0];
        assert_eq!(l["level"], "INFO");
        assert_eq!(l["message"], "invocation done");
        assert_eq!(l["id"], "abc");
        assert_eq!(l["count"], 3);
        assert_eq!(l["delta"], -4);
        assert_eq!(l["ms"], 0.052086999999999994);
        assert_eq!(l["nan"], serde_json::Value::Null);
        assert_eq!(l["ok"], true);
        assert_eq!(l["text"], tricky);
        assert_eq!(l["debug"], "[\"a\"]");
        assert_eq!(l["error"], "disk \"full\"");
        assert_eq!(l["target"], "nimbus::invocation");
        let ts = l["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-11-29T02:31:20.895353Z".len(), "{ts}");
        assert!(ts.ends_with('Z'), "{ts}");
        // Fields keep their order, the message first.
        let first = text.lines().next().unwrap();
        assert!(first.starts_with("{\"timestamp\":\""), "{first}");
        let at = |k: &str| first.find(&format!("\"{k}\":")).unwrap();
        assert!(at("level") < at("message") && at("message") < at("id"));
        assert!(at("id") < at("count") && at("error") < at("target"));
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["message"], "plain");
        let bridged = lines[2].as_object().unwrap();
        assert_eq!(bridged["target"], "some_crate::module");
        assert_eq!(bridged["message"], "from log");
        assert_eq!(bridged["level"], "WARN");
        assert!(
            bridged.keys().all(|k| !k.starts_with("log.")),
            "{bridged:?}"
        );
    }
}
