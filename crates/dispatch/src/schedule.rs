//! Cron schedules: every tick becomes one CloudEvent in the durable queue.
//!
//! Each schedule's last fired tick is stored with the queue and advanced in
//! the same transaction that queues the tick's event, so a tick fires once
//! even across crashes and restarts. Ticks missed while the node was down
//! follow the schedule's `catch_up` policy.

use crate::dispatcher::{NodeIntake, rfc3339};
use jiff::Timestamp;
use nimbus_gateway::Gateway;
use nimbus_gateway::intake::Intake as _;
use nimbus_manifest::invocation::MAX_CATCH_UP;
use nimbus_manifest::{CatchUp, Schedule};
use nimbus_queue::{NewInvocation, Tick, Trigger, now_ms};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// A tick fired this late is "missed" for `catch_up = "none"`.
const ON_TIME_GRACE_MS: i64 = 2_000;
/// Longest outage caught up: older ticks are never fired.
const MAX_LOOKBACK_MS: i64 = 7 * 86_400_000;
/// Longest sleep between checks.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Which ticks to fire, given the ticks due since the last one fired
/// (oldest first) and the time now (both ms).
pub(crate) fn to_fire(policy: CatchUp, due: &[i64], now: i64) -> &[i64] {
    match (policy, due.split_last()) {
        (_, None) => &[],
        (CatchUp::All, _) => &due[due.len().saturating_sub(MAX_CATCH_UP)..],
        (CatchUp::Last, Some((_, rest))) => &due[rest.len()..],
        (CatchUp::None, Some((last, rest))) if now - last <= ON_TIME_GRACE_MS => &due[rest.len()..],
        (CatchUp::None, Some(_)) => &[],
    }
}

/// The ticks of `schedule` after `last` up to `now` (ms), oldest first,
/// at most MAX_CATCH_UP + 1, and the tick after `now`.
pub(crate) fn due_ticks(schedule: &Schedule, last: i64, now: i64) -> (Vec<i64>, Option<i64>) {
    let tz = schedule.timezone.tz();
    let from = last.max(now - MAX_LOOKBACK_MS);
    let Ok(mut t) = Timestamp::from_millisecond(from) else {
        return (Vec::new(), None);
    };
    let mut due = VecDeque::new();
    loop {
        let Some(next) = schedule.cron.next_after(t, tz) else {
            return (due.into(), None);
        };
        let ms = next.as_millisecond();
        if ms > now {
            return (due.into(), Some(ms));
        }
        due.push_back(ms);
        if due.len() > MAX_CATCH_UP + 1 {
            due.pop_front();
        }
        t = next;
    }
}

/// Fires schedules into the queue.
pub struct Scheduler {
    pub intake: Arc<NodeIntake>,
    pub gateway: Arc<Gateway>,
    /// Woken when deployed schedules change.
    pub changed: Notify,
}

impl Scheduler {
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<Option<Duration>>) {
        loop {
            if shutdown.borrow().is_some() {
                return;
            }
            let sleep = match self.fire_due().await {
                Ok(next) => next
                    .map(|at| Duration::from_millis((at - now_ms()).max(0) as u64))
                    .unwrap_or(MAX_SLEEP)
                    .min(MAX_SLEEP),
                Err(e) => {
                    tracing::error!(error = %e, "schedules could not fire; trying again");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.changed.notified() => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Fires every due tick; returns when the next one is due.
    async fn fire_due(&self) -> Result<Option<i64>, nimbus_queue::QueueError> {
        let marks: HashMap<(String, String), i64> = self
            .intake
            .queue
            .schedule_marks()
            .await?
            .into_iter()
            .map(|m| ((m.function, m.key), m.last_tick))
            .collect();
        let table = self.gateway.table();
        let now = now_ms();
        let mut next_wake: Option<i64> = None;
        for deployed in table.functions() {
            for schedule in &deployed.config.schedules {
                let key = schedule.key();
                let Some(&last) = marks.get(&(deployed.name.to_string(), key.clone())) else {
                    continue;
                };
                let (due, next) = due_ticks(schedule, last, now);
                if let Some(n) = next {
                    next_wake = Some(next_wake.map_or(n, |w: i64| w.min(n)));
                }
                let fire = to_fire(schedule.catch_up, &due, now);
                for &tick in fire {
                    let e = self
                        .intake
                        .accept(tick_event(deployed.name.as_str(), schedule, &key, tick))
                        .await?;
                    if !e.duplicate {
                        tracing::info!(
                            function = %deployed.name,
                            schedule = %key,
                            tick = %rfc3339(tick),
                            invocation_id = %e.id,
                            "schedule fired"
                        );
                    }
                }
                if let Some(&latest) = due.last()
                    && fire.last() != Some(&latest)
                {
                    let skipped = due.len() - fire.len();
                    tracing::info!(
                        function = %deployed.name,
                        schedule = %key,
                        skipped,
                        "missed ticks skipped by the catch-up policy"
                    );
                    self.intake
                        .queue
                        .mark_schedule(deployed.name.as_str(), &key, latest)
                        .await?;
                }
            }
        }
        Ok(next_wake)
    }
}

fn tick_event(function: &str, schedule: &Schedule, key: &str, tick: i64) -> NewInvocation {
    let payload = schedule.payload.clone().unwrap_or_default();
    let content_type = if serde_json::from_str::<serde_json::Value>(&payload).is_ok() {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    NewInvocation {
        function: function.to_owned(),
        target: None,
        trigger: Trigger::Schedule,
        method: "POST".into(),
        path: "/".into(),
        headers: vec![
            ("content-type".into(), content_type.into()),
            ("ce-subject".into(), key.to_owned()),
        ],
        body: payload.into_bytes().into(),
        ce_source: format!("/nimbus/schedule/{function}"),
        ce_type: "nimbus.schedule".into(),
        ce_time: Some(tick),
        not_before: None,
        idempotency: None,
        parent: None,
        tick: Some(Tick {
            schedule: key.to_owned(),
            at: tick,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_second(catch_up: &str) -> Schedule {
        toml::from_str(&format!(
            "cron = \"* * * * * *\"\ncatch_up = \"{catch_up}\""
        ))
        .unwrap()
    }

    #[test]
    fn ticks_between_marks() {
        let s = every_second("all");
        let (due, next) = due_ticks(&s, 10_000, 13_500);
        assert_eq!(due, [11_000, 12_000, 13_000]);
        assert_eq!(next, Some(14_000));
        let (due, _) = due_ticks(&s, 13_000, 13_500);
        assert!(due.is_empty());
    }

    #[test]
    fn catch_up_policies() {
        let due = [11_000, 12_000, 13_000];
        assert_eq!(to_fire(CatchUp::All, &due, 13_100), &due);
        assert_eq!(to_fire(CatchUp::Last, &due, 13_100), &[13_000]);
        assert_eq!(to_fire(CatchUp::None, &due, 13_100), &[13_000]);
        assert!(to_fire(CatchUp::None, &due, 60_000).is_empty());
        assert!(to_fire(CatchUp::Last, &[], 0).is_empty());
        let many: Vec<i64> = (0..5000).collect();
        assert_eq!(to_fire(CatchUp::All, &many, 5000).len(), MAX_CATCH_UP);
    }
}
