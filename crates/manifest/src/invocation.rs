//! Asynchronous invocation settings: retries, destinations, schedules and
//! webhook verification.

use crate::limits::parse_duration;
use crate::names::{EnvName, FunctionName};
use nimbus_cron::{Cron, Zone};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A duration written as `"500ms"`, `"30s"`, `"5m"`, `"6h"`, `"1d"` or a
/// number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Period(Duration);

impl Period {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            _ if ms == 0 => f.write_str("0s"),
            _ if !ms.is_multiple_of(1000) => write!(f, "{ms}ms"),
            _ if ms.is_multiple_of(86_400_000) => write!(f, "{}d", ms / 86_400_000),
            _ if ms.is_multiple_of(3_600_000) => write!(f, "{}h", ms / 3_600_000),
            _ if ms.is_multiple_of(60_000) => write!(f, "{}m", ms / 60_000),
            _ => write!(f, "{}s", ms / 1000),
        }
    }
}

impl Serialize for Period {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Period;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"500ms\", \"30s\", \"5m\" or \"6h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Period, E> {
                parse_duration(v, "duration").map(Period).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Period, E> {
                u64::try_from(v)
                    .map(Period::from_secs)
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Period, E> {
                Ok(Period::from_secs(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Most attempts a function may ask for.
pub const MAX_ATTEMPTS: u32 = 100;
/// Longest an event may wait for success.
pub const MAX_EVENT_AGE: Duration = Duration::from_secs(14 * 86_400);

/// How asynchronous invocations of a function are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawRetry", into = "RawRetry")]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 3).
    pub attempts: u32,
    /// Backoff before the second attempt (default 1s); doubles each time.
    pub initial_backoff: Period,
    /// Longest backoff (default 5m).
    pub max_backoff: Period,
    /// An event older than this goes to the dead-letter queue without
    /// another attempt (default 6h).
    pub max_age: Period,
    /// How long an `Idempotency-Key` is remembered (default 24h).
    pub idempotency_window: Period,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            initial_backoff: Period::from_secs(1),
            max_backoff: Period::from_secs(300),
            max_age: Period::from_secs(6 * 3600),
            idempotency_window: Period::from_secs(24 * 3600),
        }
    }
}

impl RetryPolicy {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The longest backoff after attempt `attempt` (1-based) failed; the
    /// actual wait is drawn from its upper half (equal jitter).
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(40);
        self.initial_backoff
            .get()
            .saturating_mul(1u32 << exp.min(31))
            .min(self.max_backoff.get())
    }

    /// The wait after attempt `attempt` failed, given `unit` in [0, 1).
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.backoff_ceiling(attempt);
        let half = ceiling / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default = "default_attempts")]
    attempts: u32,
    #[serde(default = "default_initial")]
    initial_backoff: Period,
    #[serde(default = "default_max_backoff")]
    max_backoff: Period,
    #[serde(default = "default_max_age")]
    max_age: Period,
    #[serde(default = "default_window")]
    idempotency_window: Period,
}

fn default_attempts() -> u32 {
    RetryPolicy::default().attempts
}
fn default_initial() -> Period {
    RetryPolicy::default().initial_backoff
}
fn default_max_backoff() -> Period {
    RetryPolicy::default().max_backoff
}
fn default_max_age() -> Period {
    RetryPolicy::default().max_age
}
fn default_window() -> Period {
    RetryPolicy::default().idempotency_window
}

impl TryFrom<RawRetry> for RetryPolicy {
    type Error = String;
    fn try_from(r: RawRetry) -> Result<Self, String> {
        if r.attempts == 0 || r.attempts > MAX_ATTEMPTS {
            return Err(format!(
                "invalid retry.attempts {}: use a whole number from 1 to {MAX_ATTEMPTS} (1 means no retry)",
                r.attempts
            ));
        }
        if r.initial_backoff.get() < Duration::from_millis(10) {
            return Err(format!(
                "invalid retry.initial_backoff {}: use at least 10ms",
                r.initial_backoff
            ));
        }
        if r.max_backoff.get() < r.initial_backoff.get() {
            return Err(format!(
                "retry.max_backoff {} is shorter than retry.initial_backoff {}",
                r.max_backoff, r.initial_backoff
            ));
        }
        if r.max_age.get() < Duration::from_secs(1) || r.max_age.get() > MAX_EVENT_AGE {
            return Err(format!(
                "invalid retry.max_age {}: use a duration from 1s to 14d",
                r.max_age
            ));
        }
        if r.idempotency_window.get() > MAX_EVENT_AGE {
            return Err(format!(
                "invalid retry.idempotency_window {}: use at most 14d",
                r.idempotency_window
            ));
        }
        Ok(Self {
            attempts: r.attempts,
            initial_backoff: r.initial_backoff,
            max_backoff: r.max_backoff,
            max_age: r.max_age,
            idempotency_window: r.idempotency_window,
        })
    }
}

impl From<RetryPolicy> for RawRetry {
    fn from(p: RetryPolicy) -> Self {
        Self {
            attempts: p.attempts,
            initial_backoff: p.initial_backoff,
            max_backoff: p.max_backoff,
            max_age: p.max_age,
            idempotency_window: p.idempotency_window,
        }
    }
}

/// Where the outcome of an asynchronous invocation is sent.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawDestination", into = "RawDestination")]
pub enum Destination {
    /// Another function, invoked asynchronously with the record.
    Function(FunctionName),
    /// An HTTP(S) URL, sent the record by POST with retries.
    Url(String),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    function: Option<FunctionName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
}

/// `url` must be an absolute `http://` or `https://` URL.
pub(crate) fn check_http_url(what: &str, url: &str) -> Result<(), String> {
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"));
    match rest {
        Some(rest)
            if !rest.is_empty()
                && !rest.starts_with('/')
                && !rest.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "invalid {what} `{url}`: write an absolute http:// or https:// URL"
        )),
    }
}

impl TryFrom<RawDestination> for Destination {
    type Error = String;
    fn try_from(r: RawDestination) -> Result<Self, String> {
        match (r.function, r.url) {
            (Some(f), None) => Ok(Self::Function(f)),
            (None, Some(url)) => check_http_url("destination url", &url).map(|()| Self::Url(url)),
            _ => Err(
                "a destination is either { function = \"name\" } or { url = \"https://...\" }"
                    .into(),
            ),
        }
    }
}

impl From<Destination> for RawDestination {
    fn from(d: Destination) -> Self {
        match d {
            Destination::Function(f) => Self {
                function: Some(f),
                url: None,
            },
            Destination::Url(u) => Self {
                function: None,
                url: Some(u),
            },
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Function(name) => write!(f, "function {name}"),
            Self::Url(url) => f.write_str(url),
        }
    }
}

/// Destinations of a function's asynchronous results.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destinations {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_success: Option<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<Destination>,
}

impl Destinations {
    pub fn is_empty(&self) -> bool {
        self.on_success.is_none() && self.on_failure.is_none()
    }
}

/// What a schedule does with ticks missed while the node was down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Fire the latest missed tick once.
    #[default]
    Last,
    /// Fire nothing; wait for the next tick.
    None,
    /// Fire every missed tick (at most [`MAX_CATCH_UP`]).
    All,
}

/// Most missed ticks `catch_up = "all"` fires after an outage.
pub const MAX_CATCH_UP: usize = 1000;

/// A cron schedule of a function.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Five fields, or six with seconds first.
    #[serde(with = "as_text")]
    pub cron: Cron,
    /// IANA zone the expression is read in (default UTC).
    #[serde(default = "Zone::utc", with = "as_text")]
    pub timezone: Zone,
    /// Body of every tick's event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(default)]
    pub catch_up: CatchUp,
}

impl Schedule {
    /// What identifies the schedule across deploys: its expression and zone.
    pub fn key(&self) -> String {
        format!("{} {}", self.cron, self.timezone)
    }
}

mod as_text {
    use serde::{Deserialize, Deserializer, Serializer, de};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// A signature scheme preset for an inbound webhook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookPreset {
    /// `X-Hub-Signature-256: sha256=<hex>` over the body.
    Github,
    /// `Stripe-Signature: t=<unix>,v1=<hex>` over `"<t>.<body>"`, with a
    /// timestamp tolerance against replay.
    Stripe,
}

/// How a signature is encoded in its header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    #[default]
    Hex,
    Base64,
}

/// Signature verification of a webhook route: HMAC-SHA256 over the body.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawWebhook", into = "RawWebhook")]
pub struct Webhook {
    pub preset: Option<WebhookPreset>,
    /// Node environment variable holding the shared secret.
    pub secret_env: EnvName,
    /// Header carrying the signature (set by the preset).
    pub header: String,
    pub encoding: SignatureEncoding,
    /// Text before the signature in the header, e.g. `sha256=`.
    pub prefix: String,
    /// Stripe: how far the signed timestamp may be from now.
    pub tolerance: Period,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    preset: Option<WebhookPreset>,
    secret_env: EnvName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encoding: Option<SignatureEncoding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tolerance: Option<Period>,
}

/// Default Stripe timestamp tolerance.
pub const DEFAULT_TOLERANCE: Period = Period::from_secs(300);

impl TryFrom<RawWebhook> for Webhook {
    type Error = String;
    fn try_from(r: RawWebhook) -> Result<Self, String> {
        let (header, prefix) = match r.preset {
            Some(WebhookPreset::Github) => ("x-hub-signature-256", "sha256="),
            Some(WebhookPreset::Stripe) => ("stripe-signature", ""),
            None => ("", ""),
        };
        if r.preset.is_some() && (r.header.is_some() || r.encoding.is_some() || r.prefix.is_some())
        {
            return Err(
                "a webhook with a preset sets its own header, encoding and prefix: remove them or the preset".into(),
            );
        }
        if r.tolerance.is_some() && r.preset != Some(WebhookPreset::Stripe) {
            return Err("webhook tolerance applies only to preset = \"stripe\"".into());
        }
        let header = r.header.unwrap_or_else(|| header.to_owned());
        if header.is_empty() {
            return Err(
                "a webhook needs preset = \"github\" | \"stripe\", or the header that carries the signature".into(),
            );
        }
        if http_header_name_invalid(&header) {
            return Err(format!("invalid webhook header name `{header}`"));
        }
        Ok(Self {
            preset: r.preset,
            secret_env: r.secret_env,
            header: header.to_ascii_lowercase(),
            encoding: r.encoding.unwrap_or_default(),
            prefix: r.prefix.unwrap_or_else(|| prefix.to_owned()),
            tolerance: r.tolerance.unwrap_or(DEFAULT_TOLERANCE),
        })
    }
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b))
}

impl From<Webhook> for RawWebhook {
    fn from(w: Webhook) -> Self {
        let preset = w.preset.is_some();
        Self {
            preset: w.preset,
            secret_env: w.secret_env,
            header: (!preset).then_some(w.header),
            encoding: (!preset).then_some(w.encoding),
            prefix: (!preset).then_some(w.prefix),
            tolerance: (w.preset == Some(WebhookPreset::Stripe)).then_some(w.tolerance),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            initial_backoff: Period::from_millis(100),
            max_backoff: Period::from_millis(1000),
            ..RetryPolicy::default()
        };
        let ceilings: Vec<u128> = (1..=6).map(|a| p.backoff_ceiling(a).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(3, 0.0).as_millis(), 200);
        assert_eq!(p.backoff(3, 0.999_999).as_millis(), 399);
    }

    #[test]
    fn bad_retry_settings_are_refused() {
        let parse = |t: &str| toml::from_str::<RetryPolicy>(t);
        assert!(parse("attempts = 0").is_err());
        assert!(parse("initial_backoff = \"5m\"\nmax_backoff = \"1m\"").is_err());
        assert!(parse("max_age = \"30d\"").is_err());
        assert!(parse("attemps = 3").is_err());
        let p = parse("attempts = 5\nmax_age = \"1h\"").unwrap();
        assert_eq!((p.attempts, p.max_age.get().as_secs()), (5, 3600));
    }

    #[test]
    fn destinations_are_a_function_or_a_url() {
        let d: Destination = toml::from_str("function = \"audit\"").unwrap();
        assert_eq!(d, Destination::Function("audit".parse().unwrap()));
        assert!(toml::from_str::<Destination>("url = \"ftp://x\"").is_err());
        assert!(toml::from_str::<Destination>("url = \"http://x\"\nfunction = \"a\"").is_err());
    }

    #[test]
    fn webhooks_take_a_preset_or_a_header() {
        let w: Webhook = toml::from_str("preset = \"github\"\nsecret_env = \"GH\"").unwrap();
        assert_eq!(
            (w.header.as_str(), w.prefix.as_str()),
            ("x-hub-signature-256", "sha256=")
        );
        let w: Webhook =
            toml::from_str("secret_env = \"S\"\nheader = \"X-Signature\"\nencoding = \"base64\"")
                .unwrap();
        assert_eq!(w.encoding, SignatureEncoding::Base64);
        assert!(toml::from_str::<Webhook>("secret_env = \"S\"").is_err());
        assert!(
            toml::from_str::<Webhook>("preset = \"github\"\nsecret_env = \"S\"\nheader = \"x\"")
                .is_err()
        );
        // Round trip through the wire form.
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<Webhook>(&json).unwrap(), w);
    }

    #[test]
    fn schedules_check_expression_and_zone() {
        let s: Schedule =
            toml::from_str("cron = \"*/5 * * * *\"\ntimezone = \"Europe/Berlin\"").unwrap();
        assert_eq!(s.key(), "*/5 * * * * Europe/Berlin");
        assert_eq!(s.catch_up, CatchUp::Last);
        let e = toml::from_str::<Schedule>("cron = \"* * *\"").unwrap_err();
        assert!(e.to_string().contains("5 (minute"), "{e}");
        let e = toml::from_str::<Schedule>("cron = \"* * * * *\"\ntimezone = \"Nowhere/City\"")
            .unwrap_err();
        assert!(e.to_string().contains("IANA"), "{e}");
    }
}
