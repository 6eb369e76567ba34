//! Per-function limits, each a validated newtype with its default.

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// Largest `memory` a function may set, in MiB.
pub const MAX_MEMORY_MIB: u64 = 4096;
/// Largest `timeout` a function may set.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Largest `max_concurrency` a function may set.
pub const MAX_CONCURRENCY: u32 = 1000;
/// Largest `max_body` a function may set, in MiB.
pub const MAX_BODY_MIB: u64 = 16 * 1024;
/// Largest `reuse` a function may set: an instance recycled at least every
/// million requests keeps whatever a guest leaks bounded.
pub const MAX_REUSE: u32 = 1_000_000;
/// Largest `prewarm` a function may set: the node keeps at most 100
/// instances ready across all its functions, and refuses a deploy whose
/// `prewarm` values add up to more.
pub const MAX_PREWARM: u32 = 100;

/// Limits of one function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Linear memory cap in MiB (default 128).
    #[serde(default = "default_memory")]
    pub memory: MemoryMib,
    /// Wall-clock time of one invocation (default 30s).
    #[serde(default)]
    pub timeout: Timeout,
    /// Invocations running at once (default 100); more wait briefly, then 429.
    #[serde(default = "default_concurrency")]
    pub max_concurrency: Concurrency,
    /// Largest request body in MiB (default 32); larger requests get 413.
    #[serde(default = "default_body")]
    pub max_body: BodyMib,
    /// Asynchronous invocations running at once (default: half of
    /// `max_concurrency`, so queued work never starves HTTP traffic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_concurrency: Option<Concurrency>,
}

impl Limits {
    /// The async concurrency in effect.
    pub fn async_concurrency(&self) -> u32 {
        self.async_concurrency
            .map(Concurrency::get)
            .unwrap_or((self.max_concurrency.get() / 2).max(1))
            .min(self.max_concurrency.get())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: default_memory(),
            timeout: Timeout::default(),
            max_concurrency: default_concurrency(),
            max_body: default_body(),
            async_concurrency: None,
        }
    }
}

fn default_memory() -> MemoryMib {
    MemoryMib(128)
}
fn default_concurrency() -> Concurrency {
    Concurrency(100)
}
fn default_body() -> BodyMib {
    BodyMib(32)
}

macro_rules! bounded_int {
    ($(#[$doc:meta])* $ty:ident($int:ty), $min:expr, $max:expr, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "i64", into = "i64")]
        pub struct $ty($int);

        impl $ty {
            /// The value.
            pub fn get(self) -> $int {
                self.0
            }
        }

        impl TryFrom<i64> for $ty {
            type Error = String;
            fn try_from(v: i64) -> Result<Self, String> {
                let min = i64::try_from($min).unwrap_or(i64::MAX);
                let max = i64::try_from($max).unwrap_or(i64::MAX);
                if v < min || v > max {
                    return Err(format!(concat!("invalid ", $what, " {}: use a whole number from {} to {}"), v, min, max));
                }
                <$int>::try_from(v).map(Self).map_err(|e| e.to_string())
            }
        }

        impl From<$ty> for i64 {
            fn from(v: $ty) -> i64 {
                i64::try_from(v.0).unwrap_or(i64::MAX)
            }
        }
    };
}

bounded_int!(
    /// Memory in MiB.
    MemoryMib(u64), 1u64, MAX_MEMORY_MIB, "memory (MiB)"
);
bounded_int!(
    /// Concurrent invocations.
    Concurrency(u32), 1u32, MAX_CONCURRENCY, "max_concurrency"
);
bounded_int!(
    /// Requests one instance serves, one after another, before it is
    /// recycled (1: a fresh instance per request).
    Reuse(u32), 1u32, MAX_REUSE, "reuse"
);

impl Reuse {
    /// A fresh instance for every request.
    pub const FRESH: Self = Self(1);

    /// Whether every request gets a fresh instance.
    pub fn is_fresh(&self) -> bool {
        self.0 == 1
    }
}

impl Default for Reuse {
    fn default() -> Self {
        Self::FRESH
    }
}

bounded_int!(
    /// Instances kept instantiated ahead of requests, so that many
    /// requests at once start without instantiating (0: none).
    #[derive(Default)]
    Prewarm(u32), 0u32, MAX_PREWARM, "prewarm"
);

impl Prewarm {
    /// No instance kept ahead: the function scales to zero when idle.
    pub fn is_none(&self) -> bool {
        self.0 == 0
    }
}

/// Checks that `prewarm` fits the function's concurrency: instances kept
/// ahead beyond `max_concurrency` could never all serve at once.
pub fn check_prewarm(prewarm: Prewarm, limits: &Limits) -> Result<(), String> {
    let max = limits.max_concurrency.get();
    if prewarm.get() > max {
        return Err(format!(
            "prewarm {} is more than max_concurrency {max}: lower prewarm or raise limits.max_concurrency",
            prewarm.get()
        ));
    }
    Ok(())
}

bounded_int!(
    /// Body size in MiB.
    BodyMib(u64), 0u64, MAX_BODY_MIB, "max_body (MiB)"
);

/// Parses `500ms`, `30s`, `2m`, `1h`, `7d` or bare seconds; `what` names
/// the setting in the error.
pub fn parse_duration(text: &str, what: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!(
            "invalid {what} `{text}`: write a number with a unit, e.g. \"500ms\", \"30s\" or \"2m\""
        )
    })?;
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("invalid {what} `{text}`: too long"))
    };
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        other => Err(format!(
            "invalid {what} `{text}`: unknown unit `{other}`; use ms, s, m, h or d"
        )),
    }
}

/// A timeout: `"30s"`, `"500ms"`, `"2m"`, or a number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Timeout(Duration);

impl Timeout {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }

    /// Parses `30s`, `500ms`, `2m`, `1h` or bare seconds.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::new(parse_duration(text, "timeout")?)
    }

    fn new(d: Duration) -> Result<Self, String> {
        if d < Duration::from_millis(1) || d > MAX_TIMEOUT {
            return Err(format!(
                "invalid timeout {d:?}: use a duration from 1ms to {}m",
                MAX_TIMEOUT.as_secs() / 60
            ));
        }
        Ok(Self(d))
    }
}

impl Default for Timeout {
    fn default() -> Self {
        Self(Duration::from_secs(30))
    }
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Timeout {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Timeout;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a duration such as \"30s\", \"500ms\" or \"2m\", or a number of seconds",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timeout, E> {
                Timeout::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Timeout, E> {
                let secs =
                    u64::try_from(v).map_err(|_| E::custom("a timeout cannot be negative"))?;
                Timeout::new(Duration::from_secs(secs)).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Timeout, E> {
                Timeout::new(Duration::from_secs(v)).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse() {
        assert_eq!(
            Timeout::parse("500ms").unwrap().get(),
            Duration::from_millis(500)
        );
        assert_eq!(
            Timeout::parse("2m").unwrap().get(),
            Duration::from_secs(120)
        );
        assert_eq!(Timeout::parse("7").unwrap().get(), Duration::from_secs(7));
        assert!(Timeout::parse("5 parsecs").is_err());
        assert!(Timeout::parse("0s").is_err());
        assert!(Timeout::parse("2h").is_err());
        assert_eq!(Timeout::parse("1500ms").unwrap().to_string(), "1500ms");
    }

    #[test]
    fn bounds_are_enforced() {
        assert!(MemoryMib::try_from(0).is_err());
        assert!(MemoryMib::try_from(4097).is_err());
        assert_eq!(MemoryMib::try_from(64).unwrap().get(), 64);
        assert!(Concurrency::try_from(-1).is_err());
    }
}
