//! Alert rules (`alerts` in a function's manifest): every second the node
//! reads each function's measures, and a rule whose measure crosses its
//! threshold over its window fires; coming back resolves it. Both are
//! logged and POSTed to the rule's webhook through the durable queue, so
//! the function's retry policy applies to the webhook too.
//!
//! Rates and the latency percentile are computed from the counters'
//! growth over the window (a reading at or before the window's start is
//! kept as the baseline). Queue age and DLQ size are levels: they fire once
//! they have stayed above the threshold for the whole window, and resolve
//! as soon as they are at or below it.

use crate::state::NodeState;
use nimbus_gateway::intake::Intake as _;
use nimbus_manifest::{Alert, AlertMetric};
use nimbus_queue::{NewInvocation, Trigger};
use nimbus_telemetry::Snapshot;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often rules are evaluated.
pub const TICK: Duration = Duration::from_secs(1);

/// One reading of a function's measures.
#[derive(Clone, Debug)]
pub struct Reading {
    pub at_ms: i64,
    pub version: u64,
    pub counters: Snapshot,
    pub queue_age_ms: f64,
    pub dlq: u64,
}

/// A change of a rule's state.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub firing: bool,
    pub value: f64,
}

/// One rule of one function and the readings its window needs.
pub struct Watch {
    alert: Alert,
    readings: VecDeque<Reading>,
    firing: bool,
    last: Option<f64>,
}

impl Watch {
    pub fn new(alert: Alert) -> Self {
        Self {
            alert,
            readings: VecDeque::new(),
            firing: false,
            last: None,
        }
    }

    /// Adds a reading; answers the rule's change of state, if any.
    pub fn observe(&mut self, reading: Reading) -> Option<Change> {
        // A new version starts its counters from zero.
        if self
            .readings
            .back()
            .is_some_and(|r| r.version != reading.version)
        {
            self.readings.clear();
        }
        // A version's counters start at zero when it starts serving, which
        // was at most a tick before its first reading here.
        if self.readings.is_empty() {
            self.readings.push_back(Reading {
                at_ms: reading.at_ms - TICK.as_millis() as i64,
                counters: Snapshot::default(),
                ..reading.clone()
            });
        }
        let start = reading.at_ms - self.alert.window.get().as_millis() as i64;
        self.readings.push_back(reading);
        while self.readings.len() >= 2 && self.readings[1].at_ms <= start {
            self.readings.pop_front();
        }
        let value = self.value(start)?;
        self.last = Some(value);
        let breach = value > self.alert.above.get();
        if breach == self.firing {
            return None;
        }
        self.firing = breach;
        Some(Change {
            firing: breach,
            value,
        })
    }

    /// The measure over the window starting at `start`, if it can be told.
    fn value(&self, start: i64) -> Option<f64> {
        let base = self.readings.front()?;
        let last = self.readings.back()?;
        let (a, b) = (&base.counters, &last.counters);
        let ratio = |num: u64, den: u64| {
            if den == 0 {
                0.0
            } else {
                num as f64 / den as f64
            }
        };
        let invocations = b.invocations.saturating_sub(a.invocations);
        Some(match self.alert.metric {
            AlertMetric::ErrorRate => ratio(b.errors.saturating_sub(a.errors), invocations),
            AlertMetric::ColdStartRate => {
                ratio(b.coldstarts.saturating_sub(a.coldstarts), invocations)
            }
            AlertMetric::P99Latency => {
                nimbus_telemetry::quantile(a, b, 0.99).unwrap_or(0.0) * 1000.0
            }
            AlertMetric::QueueAge | AlertMetric::DlqSize => {
                let level = |r: &Reading| match self.alert.metric {
                    AlertMetric::QueueAge => r.queue_age_ms,
                    _ => r.dlq as f64,
                };
                let lowest = self
                    .readings
                    .iter()
                    .map(level)
                    .fold(f64::INFINITY, f64::min);
                // Above for the whole window needs readings that cover it;
                // at or below the threshold is known at once.
                if base.at_ms > start && level(last) > self.alert.above.get() {
                    return None;
                }
                lowest.min(level(last))
            }
        })
    }
}

/// A rule's state, for the admin API.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AlertState {
    pub function: String,
    pub metric: &'static str,
    pub above: f64,
    pub window: String,
    pub firing: bool,
    /// The measure at the last evaluation.
    pub value: Option<f64>,
}

/// Every rule of every deployed function, by function and rule.
#[derive(Default)]
pub struct Alerts {
    watches: Mutex<HashMap<(String, String), Watch>>,
}

impl Alerts {
    /// The rules and their states, ordered by function.
    pub fn states(&self) -> Vec<AlertState> {
        let Ok(watches) = self.watches.lock() else {
            return Vec::new();
        };
        let mut list: Vec<AlertState> = watches
            .iter()
            .map(|((function, _), w)| AlertState {
                function: function.clone(),
                metric: w.alert.metric.as_str(),
                above: w.alert.above.get(),
                window: w.alert.window.to_string(),
                firing: w.firing,
                value: w.last,
            })
            .collect();
        list.sort_by(|a, b| (&a.function, a.metric).cmp(&(&b.function, b.metric)));
        list
    }

    /// Evaluates every rule once; answers the webhook deliveries to queue.
    async fn evaluate(&self, state: &NodeState) -> Vec<NewInvocation> {
        let table = state.gateway.table();
        let watched: Vec<_> = table
            .functions()
            .filter(|d| !d.config.alerts.is_empty())
            .cloned()
            .collect();
        if watched.is_empty() {
            if let Ok(mut w) = self.watches.lock() {
                w.clear();
            }
            return Vec::new();
        }
        let queue = state.queue_stats().await;
        let now = nimbus_queue::now_ms();
        let Ok(mut watches) = self.watches.lock() else {
            return Vec::new();
        };
        watches.retain(|(function, key), _| {
            watched.iter().any(|d| {
                d.name.as_str() == function && d.config.alerts.iter().any(|a| a.key() == *key)
            })
        });
        let mut sends = Vec::new();
        for d in &watched {
            let q = queue.get(d.name.as_str());
            let reading = Reading {
                at_ms: now,
                version: d.version,
                counters: d.metrics.snapshot(),
                queue_age_ms: q
                    .and_then(|q| q.oldest_queued_at)
                    .map_or(0.0, |t| (now - t).max(0) as f64),
                dlq: q.map_or(0, |q| q.failed),
            };
            for alert in &d.config.alerts {
                let watch = watches
                    .entry((d.name.to_string(), alert.key()))
                    .or_insert_with(|| Watch::new(alert.clone()));
                if let Some(change) = watch.observe(reading.clone()) {
                    sends.push(notice(d.name.as_str(), d.version, alert, &change, now));
                }
            }
        }
        sends
    }
}

/// Logs a change and builds its webhook delivery.
fn notice(function: &str, version: u64, alert: &Alert, change: &Change, now: i64) -> NewInvocation {
    let metric = alert.metric.as_str();
    let state = if change.firing { "firing" } else { "resolved" };
    if change.firing {
        tracing::warn!(target: "nimbus::alert", function, version, alert = metric, value = change.value, threshold = alert.above.get(), window = %alert.window, "alert firing");
    } else {
        tracing::info!(target: "nimbus::alert", function, version, alert = metric, value = change.value, threshold = alert.above.get(), window = %alert.window, "alert resolved");
    }
    let body = serde_json::json!({
        "alert": metric,
        "state": state,
        "function": function,
        "version": version,
        "value": change.value,
        "threshold": alert.above.get(),
        "window": alert.window.to_string(),
        "at": nimbus_dispatch::rfc3339(now),
    });
    NewInvocation {
        function: function.to_owned(),
        target: Some(alert.webhook.clone()),
        trigger: Trigger::Alert,
        method: "POST".into(),
        path: "/".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::to_vec(&body).unwrap_or_default().into(),
        ce_source: format!("/nimbus/functions/{function}/alerts"),
        ce_type: format!("nimbus.alert.{state}"),
        ce_time: Some(now),
        not_before: None,
        idempotency: None,
        parent: None,
        tick: None,
    }
}

/// Evaluates the rules every [`TICK`] until the node stops.
pub async fn run(
    state: Arc<NodeState>,
    alerts: Arc<Alerts>,
    mut shutdown: tokio::sync::watch::Receiver<Option<Duration>>,
) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        for send in alerts.evaluate(&state).await {
            if let Err(e) = state.intake.accept(send).await {
                tracing::error!(error = %e, "cannot queue an alert's webhook delivery");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(metric: &str, above: f64, window: &str) -> Alert {
        toml::from_str(&format!(
            "metric = \"{metric}\"\nabove = {above}\nwindow = \"{window}\"\nwebhook = \"http://h/\""
        ))
        .unwrap()
    }

    fn reading(at_s: i64, invocations: u64, errors: u64) -> Reading {
        Reading {
            at_ms: at_s * 1000,
            version: 1,
            counters: Snapshot {
                invocations,
                errors,
                ..Snapshot::default()
            },
            queue_age_ms: 0.0,
            dlq: 0,
        }
    }

    #[test]
    fn error_rate_fires_over_the_window_and_resolves() {
        let mut w = Watch::new(alert("error_rate", 0.5, "10s"));
        assert_eq!(w.observe(reading(0, 0, 0)), None);
        assert_eq!(w.observe(reading(1, 10, 1)), None, "10% errors");
        let fired = w.observe(reading(2, 20, 11)).unwrap();
        assert!(fired.firing && (fired.value - 0.55).abs() < 1e-9);
        assert_eq!(w.observe(reading(3, 30, 21)), None, "still firing");
        // 100 good invocations dilute the window's errors.
        let resolved = w.observe(reading(4, 130, 21)).unwrap();
        assert!(!resolved.firing);
        // Old errors leave the window: the baseline moves with it.
        assert_eq!(w.observe(reading(14, 130, 21)), None);
        assert_eq!(w.readings.len(), 2);
        // Failures before a version's first reading count: its counters
        // started at zero.
        let mut fresh = Watch::new(alert("error_rate", 0.5, "10s"));
        assert!(fresh.observe(reading(0, 10, 10)).unwrap().firing);
        // A new version restarts the counters without a false alarm.
        let mut r = reading(15, 1, 0);
        r.version = 2;
        assert_eq!(w.observe(r), None);
    }

    #[test]
    fn levels_fire_only_after_a_whole_window_above() {
        let mut w = Watch::new(alert("dlq_size", 0.0, "3s"));
        let level = |at, dlq| Reading {
            dlq,
            ..reading(at, 0, 0)
        };
        assert_eq!(w.observe(level(0, 0)), None);
        assert_eq!(w.observe(level(1, 2)), None);
        assert_eq!(w.observe(level(3, 2)), None, "0 at the window's start");
        let fired = w.observe(level(4, 2)).unwrap();
        assert!(fired.firing && fired.value == 2.0);
        let resolved = w.observe(level(5, 0)).unwrap();
        assert!(!resolved.firing, "resolves at once");
    }

    #[test]
    fn latency_is_the_windows_percentile() {
        let mut w = Watch::new(alert("p99_latency", 100.0, "10s"));
        let mut slow = reading(1, 5, 0);
        slow.counters.duration_count = 5;
        slow.counters.duration_buckets = vec![0; nimbus_telemetry::DURATION_BUCKETS.len()];
        let last = nimbus_telemetry::DURATION_BUCKETS.len() - 1;
        slow.counters.duration_buckets[last] = 5;
        assert_eq!(w.observe(reading(0, 0, 0)), None);
        let fired = w.observe(slow).unwrap();
        assert!(fired.firing && fired.value > 100.0, "{fired:?}");
    }
}
