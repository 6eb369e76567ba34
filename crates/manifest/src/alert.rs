//! Alert rules: a threshold on one of a function's measures over a window;
//! crossing it (and coming back) is sent to a webhook.

use crate::invocation::{Period, check_http_url};
use serde::{Deserialize, Serialize};
use std::hash::{Hash, Hasher};

/// What an alert watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertMetric {
    /// Failed invocations / invocations in the window (0 to 1).
    ErrorRate,
    /// The 99th percentile of durations in the window, in ms.
    P99Latency,
    /// Cold starts / invocations in the window (0 to 1).
    ColdStartRate,
    /// Age of the oldest queued asynchronous invocation, in ms, above the
    /// threshold for the whole window.
    QueueAge,
    /// Dead-lettered invocations kept, above the threshold for the whole
    /// window.
    DlqSize,
}

impl AlertMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ErrorRate => "error_rate",
            Self::P99Latency => "p99_latency",
            Self::ColdStartRate => "cold_start_rate",
            Self::QueueAge => "queue_age",
            Self::DlqSize => "dlq_size",
        }
    }

    /// Whether the measure is a ratio of the window's invocations.
    pub fn is_rate(self) -> bool {
        matches!(self, Self::ErrorRate | Self::ColdStartRate)
    }
}

/// A finite, non-negative threshold.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Threshold(f64);

impl Threshold {
    pub fn get(self) -> f64 {
        self.0
    }
}

impl PartialEq for Threshold {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Threshold {}

impl Hash for Threshold {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

/// `{ metric = "error_rate", above = 0.05, window = "1m", webhook = "https://..." }`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawAlert")]
pub struct Alert {
    pub metric: AlertMetric,
    /// Fires when the measure goes above this; resolves at or below it.
    pub above: Threshold,
    pub window: Period,
    /// Where firing and resolving are POSTed.
    pub webhook: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlert {
    metric: AlertMetric,
    above: f64,
    #[serde(default = "default_window")]
    window: Period,
    webhook: String,
}

fn default_window() -> Period {
    Period::from_secs(60)
}

impl TryFrom<RawAlert> for Alert {
    type Error = String;
    fn try_from(r: RawAlert) -> Result<Self, String> {
        let metric = r.metric.as_str();
        if !r.above.is_finite() || r.above < 0.0 {
            return Err(format!(
                "invalid threshold {} for {metric}: use a number of at least 0",
                r.above
            ));
        }
        if r.metric.is_rate() && r.above >= 1.0 {
            return Err(format!(
                "invalid threshold {} for {metric}: a rate is a fraction, use 0 to below 1 (e.g. 0.05 for 5%)",
                r.above
            ));
        }
        let (min, max) = (Period::from_secs(1), Period::from_secs(86_400));
        if r.window.get() < min.get() || r.window.get() > max.get() {
            return Err(format!(
                "invalid alert window {}: use {min} to {max}",
                r.window
            ));
        }
        check_http_url("alert webhook", &r.webhook)?;
        Ok(Self {
            metric: r.metric,
            above: Threshold(r.above),
            window: r.window,
            webhook: r.webhook,
        })
    }
}

impl Alert {
    /// What identifies the alert within its function.
    pub fn key(&self) -> String {
        format!(
            "{}>{}/{}",
            self.metric.as_str(),
            self.above.get(),
            self.window
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_parse_and_refuse_nonsense() {
        let a: Alert = toml::from_str(
            "metric = \"error_rate\"\nabove = 0.05\nwindow = \"30s\"\nwebhook = \"https://hooks.example.com/a\"",
        )
        .unwrap();
        assert_eq!(a.metric, AlertMetric::ErrorRate);
        assert_eq!(a.window.get().as_secs(), 30);
        let d: Alert =
            toml::from_str("metric = \"p99_latency\"\nabove = 250\nwebhook = \"http://h/x\"")
                .unwrap();
        assert_eq!(d.window.get().as_secs(), 60);
        for (bad, says) in [
            (
                "metric = \"error_rate\"\nabove = 5\nwebhook = \"http://h\"",
                "fraction",
            ),
            (
                "metric = \"dlq_size\"\nabove = -1\nwebhook = \"http://h\"",
                "at least 0",
            ),
            (
                "metric = \"dlq_size\"\nabove = 1\nwebhook = \"ftp://h\"",
                "http://",
            ),
            (
                "metric = \"dlq_size\"\nabove = 1\nwindow = \"0s\"\nwebhook = \"http://h\"",
                "window",
            ),
            (
                "metric = \"cpu\"\nabove = 1\nwebhook = \"http://h\"",
                "unknown variant",
            ),
            (
                "metric = \"dlq_size\"\nabove = 1\nwebhook = \"http://h\"\nfoo = 1",
                "unknown field",
            ),
        ] {
            let e = toml::from_str::<Alert>(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
