//! `nimbus-queue` owns durable asynchronous work: invocations accepted for
//! later execution, their attempt history, the dead-letter queue, the
//! idempotency window and the last fired tick of every schedule.
//!
//! [`Queue`] is the extension point; [`SqliteQueue`] is the embedded
//! default. It keeps one connection on a dedicated thread and commits
//! whatever arrived together in one transaction (group commit), so every
//! accepted invocation is fsync'd before it is acknowledged while thousands
//! per second share the cost of each fsync. Nothing is held in memory per
//! queued event: a million queued invocations cost disk, not RAM. A cluster
//! mode implements the same trait on a distributed log.

mod sqlite;

pub use sqlite::SqliteQueue;

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

/// A boxed future, so [`Queue`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Failures of the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue database: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("stored invocation {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("the queue has stopped")]
    Stopped,
    #[error("cannot open the queue: {0}")]
    Open(String),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// What started an invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The admin API.
    Api,
    /// A gateway route with `Nimbus-Invocation-Type: async`.
    Http,
    /// A verified webhook route.
    Webhook,
    /// A cron schedule tick.
    Schedule,
    /// The outcome of another invocation sent to its destination.
    Destination,
    /// A broker message (its source in `ce_source`).
    Source,
    /// A change to an object of one of the node's buckets.
    Bucket,
    /// An alert firing or resolving, sent to its webhook.
    Alert,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Http => "http",
            Self::Webhook => "webhook",
            Self::Schedule => "schedule",
            Self::Destination => "destination",
            Self::Source => "source",
            Self::Bucket => "bucket",
            Self::Alert => "alert",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "api" => Self::Api,
            "http" => Self::Http,
            "webhook" => Self::Webhook,
            "schedule" => Self::Schedule,
            "destination" => Self::Destination,
            "source" => Self::Source,
            "bucket" => Self::Bucket,
            "alert" => Self::Alert,
            _ => return None,
        })
    }
}

/// Where an invocation is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for its first attempt or for a retry.
    Queued,
    /// An attempt is running.
    Running,
    /// An attempt succeeded.
    Succeeded,
    /// Out of attempts, expired or refused: in the dead-letter queue.
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" | "dead" | "dlq" => Self::Failed,
            _ => return None,
        })
    }
}

/// A request to run later.
#[derive(Clone, Debug)]
pub struct NewInvocation {
    /// The function it belongs to (for destinations: whose outcome it is).
    pub function: String,
    /// A URL to POST to instead of invoking the function.
    pub target: Option<String>,
    pub trigger: Trigger,
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Shared, so each attempt's request and a dead-letter copy take no
    /// copy of it.
    pub body: bytes::Bytes,
    /// CloudEvents `source` and `type`.
    pub ce_source: String,
    pub ce_type: String,
    /// CloudEvents `time` in ms (a schedule's tick); the acceptance time
    /// when `None`.
    pub ce_time: Option<i64>,
    /// The first attempt waits until then (ms); at once when `None`.
    pub not_before: Option<i64>,
    /// Deduplication: the same key within the window returns the first
    /// invocation instead of queueing another.
    pub idempotency: Option<Idempotency>,
    /// The invocation whose outcome this carries.
    pub parent: Option<String>,
    /// Advances a schedule's mark in the same transaction.
    pub tick: Option<Tick>,
}

/// An idempotency key and how long it holds.
#[derive(Clone, Debug)]
pub struct Idempotency {
    pub key: String,
    pub window_ms: i64,
}

/// A schedule tick being fired.
#[derive(Clone, Debug)]
pub struct Tick {
    pub schedule: String,
    /// The scheduled time, ms.
    pub at: i64,
}

/// The answer to an enqueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueued {
    pub id: String,
    /// The idempotency key (or schedule tick) was seen before: `id` is the
    /// earlier invocation and nothing new was queued.
    pub duplicate: bool,
}

/// An invocation claimed for an attempt.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub id: String,
    pub function: String,
    pub target: Option<String>,
    pub trigger: Trigger,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Shared, so each attempt's request and a dead-letter copy take no
    /// copy of it.
    pub body: bytes::Bytes,
    pub ce_source: String,
    pub ce_type: String,
    pub ce_time: i64,
    pub created_at: i64,
    /// Start of the event's age, for the policy's max age (reset by a
    /// redrive).
    pub age_from: i64,
    /// Attempts made so far that count toward the policy.
    pub attempt: u32,
    /// Attempts made so far in all (a redrive restarts `attempt` only).
    pub attempts_total: u32,
    pub parent: Option<String>,
}

/// One attempt at an invocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based, over the invocation's whole life.
    pub n: u32,
    /// ms since the epoch.
    pub started_at: i64,
    pub duration_ms: f64,
    /// The response status, when the function answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A response kept as an invocation's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// UTF-8 text, or lossy text when `binary`.
    pub body: String,
    #[serde(default)]
    pub binary: bool,
    /// The body was longer than what is kept.
    #[serde(default)]
    pub truncated: bool,
}

/// How an attempt ended, as decided by the retry policy.
#[derive(Clone, Debug)]
pub enum Outcome {
    Succeeded(StoredResponse),
    /// Try again at `at` (ms).
    Retry {
        at: i64,
        response: Option<StoredResponse>,
    },
    /// Into the dead-letter queue.
    Failed {
        reason: String,
        response: Option<StoredResponse>,
    },
}

/// Everything known about an invocation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InvocationRecord {
    pub id: String,
    pub function: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub trigger: Trigger,
    pub state: State,
    pub method: String,
    pub path: String,
    pub ce_source: String,
    pub ce_type: String,
    pub ce_time: i64,
    pub created_at: i64,
    pub updated_at: i64,
    /// When the next attempt is due, while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<i64>,
    pub body_bytes: u64,
    pub attempts: Vec<Attempt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<StoredResponse>,
    /// Why it is in the dead-letter queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// Counts of one function's asynchronous work.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    pub function: String,
    pub queued: u64,
    pub running: u64,
    pub failed: u64,
    /// Acceptance time of the oldest queued invocation (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_queued_at: Option<i64>,
}

/// The last fired tick of a schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleMark {
    pub function: String,
    /// The schedule's key (expression and zone).
    pub key: String,
    /// ms since the epoch.
    pub last_tick: i64,
}

/// Durable storage of asynchronous work.
pub trait Queue: Send + Sync {
    /// Stores an invocation durably (fsync'd) and returns its id.
    fn enqueue(&self, new: NewInvocation) -> BoxFuture<'_, Result<Enqueued, QueueError>>;

    /// Claims up to `limit` due invocations of `function` for an attempt.
    fn claim(
        &self,
        function: &str,
        limit: usize,
        now: i64,
    ) -> BoxFuture<'_, Result<Vec<Claimed>, QueueError>>;

    /// Records an attempt (`None` when the event expired before one ran)
    /// and its outcome; `follow_up` (a destination delivery) is queued in
    /// the same transaction.
    fn finish(
        &self,
        id: &str,
        attempt: Option<Attempt>,
        outcome: Outcome,
        follow_up: Option<NewInvocation>,
    ) -> BoxFuture<'_, Result<(), QueueError>>;

    /// Stores an event that already failed (a broker message out of
    /// attempts) straight into the dead-letter queue, with its attempts.
    fn dead_letter(
        &self,
        new: NewInvocation,
        attempts: Vec<Attempt>,
        reason: String,
        response: Option<StoredResponse>,
    ) -> BoxFuture<'_, Result<String, QueueError>>;

    /// Puts invocations left running by a previous process back in the
    /// queue; returns how many. Called once at start.
    fn recover(&self) -> BoxFuture<'_, Result<u64, QueueError>>;

    /// Functions with queued work and the earliest due time of each.
    fn pending(&self) -> BoxFuture<'_, Result<Vec<(String, i64)>, QueueError>>;

    /// One invocation with its attempts.
    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<InvocationRecord>, QueueError>>;

    /// A function's invocations, newest first, optionally in one state.
    fn list(
        &self,
        function: &str,
        state: Option<State>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<InvocationRecord>, QueueError>>;

    /// Queues dead-lettered invocations again with a fresh attempt budget:
    /// the listed ones, or all of the function's when `ids` is `None`.
    fn redrive(
        &self,
        function: &str,
        ids: Option<Vec<String>>,
    ) -> BoxFuture<'_, Result<u64, QueueError>>;

    /// Deletes a function's dead-lettered invocations.
    fn purge(&self, function: &str) -> BoxFuture<'_, Result<u64, QueueError>>;

    /// Per-function counts.
    fn stats(&self) -> BoxFuture<'_, Result<Vec<QueueStats>, QueueError>>;

    /// Last fired tick (ms) of every schedule, by function and key.
    fn schedule_marks(&self) -> BoxFuture<'_, Result<Vec<ScheduleMark>, QueueError>>;

    /// Makes the set of schedules `(function, key)`: new ones start marked
    /// at `start` (no catch-up before they existed), vanished ones are
    /// forgotten.
    fn sync_schedules(
        &self,
        schedules: Vec<(String, String)>,
        start: i64,
    ) -> BoxFuture<'_, Result<(), QueueError>>;

    /// Advances a schedule's mark without firing (missed ticks skipped by
    /// its catch-up policy).
    fn mark_schedule(
        &self,
        function: &str,
        key: &str,
        at: i64,
    ) -> BoxFuture<'_, Result<(), QueueError>>;
}
