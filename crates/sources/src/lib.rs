//! `nimbus-sources` owns event sources: consumers inside the node that read
//! a broker and hand every message to a function as a CloudEvent over HTTP,
//! acknowledging it only once the function succeeded or the message was
//! copied to the dead-letter queue.
//!
//! Each broker implements [`EventSource`]; the [`Supervisor`] starts, stops
//! and restarts exactly the consumers a deploy adds, removes or changes,
//! reconnects with backoff when a broker is down, and reports each
//! consumer's health. Delivery is behind [`Deliver`], so this crate knows
//! nothing of how functions run (the node wires it to the dispatcher).
//! A consumer holds at most a bounded number of messages (those running,
//! at most `concurrency`, and for some brokers as many again waiting), so a
//! slow function leaves its backlog in the broker, not in memory. A source
//! with `events_per_invocation` runs that many times as many messages, each
//! marked ([`PerInvocation`]) so the dispatcher batches them into
//! invocations.

pub mod amqp;
pub mod jetstream;
pub mod mqtt;
pub mod nats;
pub mod pg;
pub mod postgres;
pub mod redis;
pub mod resp;
pub mod s3;
mod wire;

use nimbus_manifest::{BrokerUrl, Format, Source, SourceKind};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A boxed future, for trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a source failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Config(String),
    #[error("cannot reach the broker at {0}")]
    Unreachable(String),
    #[error("the broker refused the credentials: {0}")]
    Auth(String),
    #[error("the broker answered an error: {0}")]
    Server(String),
    #[error("the connection to the broker broke: {0}")]
    Disconnected(String),
    #[error("unexpected answer from the broker: {0}")]
    Protocol(String),
}

/// A message on its way to a function.
#[derive(Clone, Debug)]
pub struct Message {
    pub function: String,
    /// CloudEvents `id`: unique within the source (e.g. a stream entry id).
    pub id: String,
    pub ce_source: String,
    pub ce_type: String,
    /// Extension attributes (`ce-…`) and other headers.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Set when the broker redelivers a message after a failure (with a
    /// delay it honours): the function gets one attempt per delivery, and
    /// this says which. `None`: retries happen in place.
    pub delivery: Option<Delivery>,
    /// Set when the source hands its function several messages per
    /// invocation.
    pub per_invocation: Option<PerInvocation>,
}

/// How a source that batches messages into invocations runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PerInvocation {
    /// Most messages one invocation receives.
    pub events: u32,
    /// Most such invocations at once.
    pub invocations: u32,
}

/// Marks every message of a source as batched into invocations.
struct Batched {
    inner: Arc<dyn Deliver>,
    per_invocation: PerInvocation,
}

impl Deliver for Batched {
    fn deliver(&self, mut message: Message) -> BoxFuture<'_, Verdict> {
        message.per_invocation = Some(self.per_invocation);
        self.inner.deliver(message)
    }
}

/// One delivery of a message the broker retries itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// 1 for the first delivery.
    pub attempt: u32,
    /// When the message entered the broker (ms since the epoch): its age,
    /// for the retry policy's `max_age`, counts from here.
    pub first_at_ms: i64,
}

/// What became of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The function succeeded: acknowledge.
    Succeeded,
    /// Out of attempts, or refused: copied to the dead-letter queue, so
    /// acknowledge.
    DeadLettered,
    /// Not handled (the function is not serving, the node is stopping, the
    /// dead-letter copy failed): leave it to the broker's redelivery.
    Retry,
    /// One attempt of a [`Delivery`] failed and the policy allows another:
    /// have the broker deliver it again after this long.
    RetryAfter(Duration),
}

/// Runs a message through its function, with the function's retry policy.
pub trait Deliver: Send + Sync {
    fn deliver(&self, message: Message) -> BoxFuture<'_, Verdict>;
}

/// Health and counters of one running source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    pub function: String,
    /// The source's key: type, broker (without credentials) and stream.
    pub source: String,
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub delivered: u64,
    pub dead_lettered: u64,
}

/// Shared view of a running source's status.
#[derive(Clone, Default)]
pub struct StatusCell(Arc<Mutex<SourceStatus>>);

impl StatusCell {
    fn update(&self, f: impl FnOnce(&mut SourceStatus)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }
    pub fn healthy(&self) {
        self.update(|s| {
            s.healthy = true;
        });
    }
    pub fn failed(&self, e: &SourceError) {
        self.update(|s| {
            s.healthy = false;
            s.last_error = Some(e.to_string());
        });
    }
    pub fn counted(&self, verdict: &Verdict) {
        self.update(|s| match verdict {
            Verdict::Succeeded => s.delivered += 1,
            Verdict::DeadLettered => s.dead_lettered += 1,
            Verdict::Retry | Verdict::RetryAfter(_) => {}
        });
    }
    pub fn get(&self) -> SourceStatus {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// A consumer of one broker for one function.
pub trait EventSource: Send + Sync {
    /// Checks the broker can be used (reachable, credentials, stream or
    /// group can be created): run at deploy, so a bad source fails the
    /// deploy with its cause.
    fn check(&self) -> BoxFuture<'_, Result<(), SourceError>>;

    /// Releases what the source holds in the broker (a durable consumer,
    /// a replication slot) once it is removed from the manifest. Not called
    /// when the node merely stops.
    fn remove(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async { Ok(()) })
    }

    /// Consumes until dropped, reconnecting with backoff.
    fn run(
        self: Arc<Self>,
        deliver: Arc<dyn Deliver>,
        status: StatusCell,
    ) -> BoxFuture<'static, ()>;
}

/// Builds the consumer of `source` for `function`, resolving the broker URL
/// from the node's environment when the manifest names a variable.
pub fn build(function: &str, source: &Source) -> Result<Arc<dyn EventSource>, SourceError> {
    let url = |u: &BrokerUrl| match u {
        BrokerUrl::Literal(u) => Ok(u.clone()),
        BrokerUrl::Env(var) => std::env::var(var.as_str())
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                SourceError::Config(format!(
                    "the broker URL variable {} is not set on the node",
                    var.as_str()
                ))
            }),
        // Read when the consumer is built (at the deploy that starts it and
        // at node start): a rotated secret takes a redeploy or a restart.
        BrokerUrl::File(path) => std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .map_err(|e| {
                SourceError::Config(format!("cannot read the broker URL file {path}: {e}"))
            })
            .and_then(|t| {
                if t.is_empty() {
                    Err(SourceError::Config(format!(
                        "the broker URL file {path} is empty"
                    )))
                } else {
                    Ok(t)
                }
            }),
    };
    match &source.kind {
        // A read brings at least one invocation's worth of entries.
        SourceKind::RedisStream(s) => Ok(Arc::new(redis::RedisStreamSource::new(
            function,
            &url(&s.url)?,
            s,
            source.messages_at_once(),
            source.batch.max(source.events_per_invocation),
        )?)),
        SourceKind::Nats(s) => Ok(Arc::new(jetstream::SubjectSource::new(
            function,
            &url(&s.url)?,
            s,
            source.messages_at_once(),
        )?)),
        SourceKind::Mqtt(s) => Ok(Arc::new(mqtt::MqttSource::new(
            function,
            &url(&s.url)?,
            s,
            source.messages_at_once(),
        )?)),
        SourceKind::Amqp(s) => Ok(Arc::new(amqp::AmqpSource::new(
            function,
            &url(&s.url)?,
            s,
            source.messages_at_once(),
        )?)),
        SourceKind::Postgres(s) => Ok(Arc::new(postgres::PostgresSource::new(
            function,
            &url(&s.url)?,
            s,
            source.messages_at_once(),
        )?)),
        SourceKind::JetStream(s) => Ok(Arc::new(jetstream::JetStreamSource::new(
            function,
            &url(&s.url)?,
            s,
            source.messages_at_once(),
            source.batch,
        )?)),
    }
}

/// Backoff between reconnection attempts: doubles from the first to the
/// last.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(100);
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

struct Running {
    status: StatusCell,
    task: tokio::task::JoinHandle<()>,
}

/// Runs the sources of every deployed function.
pub struct Supervisor {
    deliver: Arc<dyn Deliver>,
    running: Mutex<HashMap<(String, Source), Running>>,
}

impl Supervisor {
    pub fn new(deliver: Arc<dyn Deliver>) -> Self {
        Self {
            deliver,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Makes the running consumers exactly `desired`: stops the ones no
    /// longer wanted (a changed source is a different one), starts the new.
    /// A source that cannot be built is reported in its status.
    pub fn sync(&self, desired: Vec<(String, Source)>) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        running.retain(|key, r| {
            let keep = desired.contains(key);
            if !keep {
                r.task.abort();
                tracing::info!(function = %key.0, source = %key.1, "source stopped");
                // Gone from the manifest (not merely changed): release what
                // it holds in the broker.
                let replaced = desired
                    .iter()
                    .any(|(f, s)| *f == key.0 && s.key() == key.1.key());
                if !replaced && let Ok(consumer) = build(&key.0, &key.1) {
                    let (function, source) = key.clone();
                    tokio::spawn(async move {
                        match consumer.remove().await {
                            Ok(()) => tracing::info!(function = %function, source = %source, "source removed"),
                            Err(e) => tracing::warn!(function = %function, source = %source, error = %e, "could not release the removed source in its broker"),
                        }
                    });
                }
            }
            keep
        });
        for (function, source) in desired {
            if running.contains_key(&(function.clone(), source.clone())) {
                continue;
            }
            let status = StatusCell::default();
            status.update(|s| {
                s.function = function.clone();
                s.source = source.key();
            });
            let task = match build(&function, &source) {
                Ok(consumer) => {
                    tracing::info!(function = %function, source = %source, "source started");
                    let mut deliver: Arc<dyn Deliver> = match source.format {
                        Format::Message => self.deliver.clone(),
                        Format::S3 => Arc::new(s3::S3Events {
                            inner: self.deliver.clone(),
                        }),
                    };
                    if source.events_per_invocation > 1 {
                        deliver = Arc::new(Batched {
                            inner: deliver,
                            per_invocation: PerInvocation {
                                events: source.events_per_invocation,
                                invocations: source.concurrency,
                            },
                        });
                    }
                    tokio::spawn(consumer.run(deliver, status.clone()))
                }
                Err(e) => {
                    status.failed(&e);
                    tokio::spawn(async {})
                }
            };
            running.insert((function, source), Running { status, task });
        }
    }

    /// Status of every source, by function.
    pub fn statuses(&self) -> Vec<SourceStatus> {
        let mut out: Vec<SourceStatus> = self
            .running
            .lock()
            .map(|r| r.values().map(|r| r.status.get()).collect())
            .unwrap_or_default();
        out.sort_by(|a, b| (&a.function, &a.source).cmp(&(&b.function, &b.source)));
        out
    }

    /// Stops every consumer: messages in flight are not acknowledged and
    /// come back from the broker. What the sources hold in their brokers
    /// stays, for the next start.
    pub fn stop(&self) {
        if let Ok(mut running) = self.running.lock() {
            for (_, r) in running.drain() {
                r.task.abort();
            }
        }
    }
}
