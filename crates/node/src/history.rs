//! Recent history of every function's counters, for the dashboard's charts:
//! a reading every [`EVERY`], the last [`KEPT`] of them per function. A
//! function never invoked since the node started keeps nothing, so idle
//! functions cost no memory.

use crate::state::NodeState;
use nimbus_telemetry::Snapshot;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the counters are read.
pub const EVERY: Duration = Duration::from_secs(10);
/// Readings kept per function: an hour.
pub const KEPT: usize = 360;

/// One reading of a function's counters.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Point {
    /// ms since the epoch.
    pub at: i64,
    pub version: u64,
    pub counters: Snapshot,
}

/// The readings of every function.
#[derive(Default)]
pub struct History {
    points: Mutex<HashMap<String, VecDeque<Point>>>,
}

impl History {
    /// The readings of `function`, oldest first.
    pub fn of(&self, function: &str) -> Vec<Point> {
        self.points
            .lock()
            .ok()
            .and_then(|p| p.get(function).map(|d| d.iter().cloned().collect()))
            .unwrap_or_default()
    }

    /// Takes one reading of every deployed function.
    fn sample(&self, state: &NodeState) {
        let at = nimbus_queue::now_ms();
        let table = state.gateway.table();
        let Ok(mut points) = self.points.lock() else {
            return;
        };
        points.retain(|name, _| table.function(name).is_some());
        for d in table.functions() {
            let kept = points.get_mut(d.name.as_str());
            if kept.is_none() && d.metrics.invocations() == 0 {
                continue;
            }
            let counters = d.metrics.snapshot();
            let kept = match kept {
                Some(k) => k,
                None => points.entry(d.name.to_string()).or_default(),
            };
            if kept.len() == KEPT {
                kept.pop_front();
            }
            kept.push_back(Point {
                at,
                version: d.version,
                counters,
            });
        }
    }
}

/// Reads the counters every [`EVERY`] until the node stops.
pub async fn run(
    state: Arc<NodeState>,
    history: Arc<History>,
    shutdown: tokio::sync::watch::Receiver<Option<Duration>>,
) {
    crate::every(EVERY, shutdown, || history.sample(&state)).await;
}
