//! NATS sources: core subjects (at most once) and JetStream durable pull
//! consumers (at least once).
//!
//! A JetStream message is acknowledged (`+ACK`) once its function
//! succeeded. A failed attempt the retry policy allows again is handed back
//! with `-NAK` and the policy's backoff as the delay, so JetStream itself
//! redelivers it and a crash between attempts loses nothing; the delivery
//! count JetStream keeps is the attempt number. After the last attempt the
//! message is copied to the dead-letter queue and terminated (`+TERM`), so
//! it is never delivered again. While a function runs, progress (`+WPI`) is
//! reported so a long invocation is not redelivered under it.
//!
//! Order: with `concurrency = 1` messages start one at a time in stream
//! order; a message waiting for its retry does not hold back the next.

use crate::nats::{Client, Msg, Target, unique_token};
use crate::{BoxFuture, Deliver, Delivery, EventSource, Message, SourceError, StatusCell, Verdict};
use nimbus_manifest::{JetStream, Nats, StartAt};

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long one pull request waits for messages before the server ends it.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// Most bytes one pull asks for (a whole batch of large messages would
/// otherwise sit in memory); never less than the server's largest message,
/// or a larger one could never be pulled.
const PULL_MAX_BYTES: u64 = 8 << 20;
/// Longest wait for an answer of the JetStream API.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Redelivery delay of a message whose function is not serving.
const NOT_SERVING_DELAY: Duration = Duration::from_secs(1);

/// Headers a NATS message carries on to the function: its content type
/// and trace context.
fn carried_headers(msg: &Msg) -> Vec<(String, String)> {
    let mut headers = vec![(
        "content-type".to_owned(),
        msg.header("content-type")
            .unwrap_or("application/octet-stream")
            .to_owned(),
    )];
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = msg.header(name) {
            headers.push((name.to_owned(), v.to_owned()));
        }
    }
    headers.push(("ce-natssubject".to_owned(), msg.subject.clone()));
    headers
}

/// A core NATS subscription.
pub struct SubjectSource {
    function: String,
    target: Target,
    subject: String,
    queue_group: String,
    concurrency: u32,
    ce_source: String,
}

impl SubjectSource {
    pub fn new(
        function: &str,
        url: &str,
        config: &Nats,
        concurrency: u32,
    ) -> Result<Self, SourceError> {
        let target = Target::parse(url)?;
        Ok(Self {
            function: function.to_owned(),
            ce_source: format!("nats://{}:{}/{}", target.host, target.port, config.subject),
            subject: config.subject.clone(),
            queue_group: config
                .queue_group
                .clone()
                .unwrap_or_else(|| format!("nimbus-{function}")),
            concurrency,
            target,
        })
    }

    async fn session(
        &self,
        deliver: &Arc<dyn Deliver>,
        status: &StatusCell,
        slots: &Arc<Semaphore>,
    ) -> Result<(), SourceError> {
        let name = format!("nimbus:{}:{}", self.function, self.subject);
        let client = Client::connect(&self.target, &name).await?;
        let mut messages = client
            .subscribe(&self.subject, Some(&self.queue_group))
            .await?;
        status.healthy();
        let prefix = unique_token();
        let mut n = 0u64;
        while let Some(msg) = messages.recv().await {
            if msg.status.is_some() {
                continue;
            }
            // Waiting here stops the reading: the server, not this node,
            // holds (or, past its limit, drops) what a slow function
            // cannot take.
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| SourceError::Disconnected("stopping".into()))?;
            n += 1;
            let message = Message {
                function: self.function.clone(),
                id: format!("{prefix}-{n}"),
                ce_source: self.ce_source.clone(),
                ce_type: "nats.message".into(),
                headers: carried_headers(&msg),
                body: msg.payload,
                delivery: None,
                per_invocation: None,
            };
            let deliver = deliver.clone();
            let status = status.clone();
            tokio::spawn(async move {
                status.counted(&deliver.deliver(message).await);
                drop(permit);
            });
        }
        Err(client.closed_error())
    }
}

impl EventSource for SubjectSource {
    fn check(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            Client::connect(&self.target, "nimbus:check").await?;
            Ok(())
        })
    }

    fn run(
        self: Arc<Self>,
        deliver: Arc<dyn Deliver>,
        status: StatusCell,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let slots = Arc::new(Semaphore::new(self.concurrency as usize));
            let this = self.clone();
            crate::wire::reconnecting(
                "nats",
                &self.function,
                &self.subject,
                status.clone(),
                || this.session(&deliver, &status, &slots),
            )
            .await;
        })
    }
}

/// What the reply subject of a JetStream message says about it:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.
/// <timestamp ns>.<pending>`, with a domain and an account hash after
/// `ACK` on newer servers.
#[derive(Debug, PartialEq, Eq)]
struct AckInfo {
    delivered: u32,
    stream_sequence: u64,
    timestamp_ns: i64,
}

fn ack_info(reply: &str) -> Option<AckInfo> {
    // Runs once per message: no allocation.
    let at = match reply.bytes().filter(|&b| b == b'.').count() + 1 {
        9 => 4,
        n if n >= 11 => 6,
        _ => return None,
    };
    let mut tokens = reply.split('.');
    if tokens.next() != Some("$JS") || tokens.next() != Some("ACK") {
        return None;
    }
    let mut tokens = tokens.skip(at - 2);
    let delivered = tokens.next()?.parse().ok()?;
    let stream_sequence = tokens.next()?.parse().ok()?;
    // The consumer sequence.
    tokens.next()?;
    let timestamp_ns = tokens.next()?.parse().ok()?;
    Some(AckInfo {
        delivered,
        stream_sequence,
        timestamp_ns,
    })
}

/// An error answer of the JetStream API.
#[derive(Debug)]
struct ApiError {
    code: u16,
    description: String,
}

/// A JetStream stream read by a durable pull consumer.
pub struct JetStreamSource {
    function: String,
    target: Target,
    stream: String,
    consumer: String,
    filter: Option<String>,
    start: StartAt,
    ack_wait: Duration,
    concurrency: u32,
    batch: u32,
    ce_source: String,
}

impl JetStreamSource {
    pub fn new(
        function: &str,
        url: &str,
        config: &JetStream,
        concurrency: u32,
        batch: u32,
    ) -> Result<Self, SourceError> {
        let target = Target::parse(url)?;
        Ok(Self {
            function: function.to_owned(),
            ce_source: format!("nats://{}:{}/{}", target.host, target.port, config.stream),
            stream: config.stream.clone(),
            consumer: config
                .consumer
                .clone()
                .unwrap_or_else(|| format!("nimbus-{function}")),
            filter: config.filter_subject.clone(),
            start: config.start,
            ack_wait: config.ack_wait.get(),
            concurrency,
            batch,
            target,
        })
    }

    /// Calls the JetStream API: the outer error is the connection's, the
    /// inner one the API's answer.
    async fn api(
        &self,
        client: &Client,
        subject: &str,
        body: &serde_json::Value,
    ) -> Result<Result<serde_json::Value, ApiError>, SourceError> {
        let payload = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let reply = match client.request(subject, &payload, API_TIMEOUT).await {
            Err(SourceError::Server(e)) if e.starts_with("nothing answers") => {
                return Err(SourceError::Config(format!(
                    "JetStream is not enabled on nats://{}:{} (start nats-server with -js)",
                    self.target.host, self.target.port
                )));
            }
            other => other?,
        };
        let v: serde_json::Value = serde_json::from_slice(&reply.payload).map_err(|e| {
            SourceError::Protocol(format!(
                "the JetStream API answered {subject} with bad JSON: {e}"
            ))
        })?;
        Ok(match v.get("error") {
            Some(err) => Err(ApiError {
                code: err.get("code").and_then(|c| c.as_u64()).unwrap_or(0) as u16,
                description: err
                    .get("description")
                    .and_then(|d| d.as_str())
                    .unwrap_or("unknown error")
                    .to_owned(),
            }),
            None => Ok(v),
        })
    }

    /// Checks JetStream is on and the stream exists.
    async fn verify(&self, client: &Client) -> Result<(), SourceError> {
        let info = format!("$JS.API.STREAM.INFO.{}", self.stream);
        if let Err(e) = self.api(client, &info, &serde_json::Value::Null).await? {
            return Err(if e.code == 404 {
                SourceError::Config(format!(
                    "the stream {} does not exist on nats://{}:{}; create it first (e.g. `nats stream add {}`)",
                    self.stream, self.target.host, self.target.port, self.stream
                ))
            } else {
                SourceError::Server(e.description)
            });
        }
        Ok(())
    }

    /// [`Self::verify`], then creates the durable consumer unless it
    /// exists.
    async fn ensure(&self, client: &Client) -> Result<(), SourceError> {
        self.verify(client).await?;
        let mut config = serde_json::json!({
            "durable_name": self.consumer,
            "ack_policy": "explicit",
            "ack_wait": self.ack_wait.as_nanos() as u64,
            // Attempts are counted by Nimbus, which terminates a message
            // after the last one.
            "max_deliver": -1,
            "deliver_policy": match self.start { StartAt::New => "new", StartAt::All => "all" },
            "replay_policy": "instant",
        });
        if let Some(f) = &self.filter {
            config["filter_subject"] = f.as_str().into();
        }
        let create = format!(
            "$JS.API.CONSUMER.DURABLE.CREATE.{}.{}",
            self.stream, self.consumer
        );
        let body = serde_json::json!({ "stream_name": self.stream, "config": config });
        if let Err(e) = self.api(client, &create, &body).await? {
            // A consumer that exists with settings the server will not
            // change in place is used as it is.
            let info = format!("$JS.API.CONSUMER.INFO.{}.{}", self.stream, self.consumer);
            if self
                .api(client, &info, &serde_json::Value::Null)
                .await?
                .is_err()
            {
                return Err(SourceError::Server(format!(
                    "cannot create the consumer {} on stream {}: {}",
                    self.consumer, self.stream, e.description
                )));
            }
            tracing::warn!(function = %self.function, stream = %self.stream, consumer = %self.consumer, error = %e.description, "using the existing consumer with its own settings");
        }
        Ok(())
    }

    /// Messages the consumer holds (running, waiting for a slot, or on
    /// their way).
    fn room(&self) -> usize {
        crate::wire::room(self.concurrency, self.batch)
    }

    fn message(&self, msg: Msg, info: &AckInfo) -> Message {
        let mut headers = carried_headers(&msg);
        headers.extend([
            ("ce-natsstream".to_owned(), self.stream.clone()),
            (
                "ce-natssequence".to_owned(),
                info.stream_sequence.to_string(),
            ),
            ("ce-natsdelivered".to_owned(), info.delivered.to_string()),
        ]);
        Message {
            function: self.function.clone(),
            id: info.stream_sequence.to_string(),
            ce_source: self.ce_source.clone(),
            ce_type: "nats.jetstream.message".into(),
            headers,
            body: msg.payload,
            delivery: Some(Delivery {
                attempt: info.delivered.max(1),
                first_at_ms: info.timestamp_ns / 1_000_000,
            }),
            per_invocation: None,
        }
    }

    /// Delivers one message, reporting progress while the function runs,
    /// then acknowledges it as the verdict says.
    async fn handle(
        self: Arc<Self>,
        client: Arc<Client>,
        deliver: Arc<dyn Deliver>,
        status: StatusCell,
        msg: Msg,
        permit: OwnedSemaphorePermit,
        running: Arc<Semaphore>,
    ) {
        let Some(reply) = msg.reply.clone() else {
            return;
        };
        let Some(info) = ack_info(&reply) else {
            tracing::warn!(function = %self.function, reply = %reply, "a jetstream message without its acknowledgement subject");
            return;
        };
        let message = self.message(msg, &info);
        // Waits for a free slot first; progress is reported meanwhile too.
        let run = async move {
            let _slot = running.acquire_owned().await;
            deliver.deliver(message).await
        };
        tokio::pin!(run);
        let mut progress = tokio::time::interval(self.ack_wait / 3);
        progress.tick().await;
        let verdict = loop {
            tokio::select! {
                v = &mut run => break v,
                _ = progress.tick() => {
                    let _ = client.publish(&reply, None, b"+WPI").await;
                }
            }
        };
        status.counted(&verdict);
        let nak = |d: Duration| format!("-NAK {{\"delay\":{}}}", d.as_nanos()).into_bytes();
        let answer = match verdict {
            Verdict::Succeeded => b"+ACK".to_vec(),
            Verdict::DeadLettered => b"+TERM".to_vec(),
            Verdict::RetryAfter(d) => nak(d),
            Verdict::Retry => nak(NOT_SERVING_DELAY),
        };
        if let Err(e) = client.publish(&reply, None, &answer).await {
            // Redelivered after ack_wait: at least once.
            tracing::warn!(function = %self.function, sequence = info.stream_sequence, error = %e, "could not acknowledge a jetstream message");
        }
        drop(permit);
    }

    /// One connected session: returns only on a broker error.
    async fn session(
        self: &Arc<Self>,
        deliver: &Arc<dyn Deliver>,
        status: &StatusCell,
        slots: &Arc<Semaphore>,
        running: &Arc<Semaphore>,
    ) -> Result<(), SourceError> {
        let name = format!("nimbus:{}:{}", self.function, self.stream);
        let client = Arc::new(Client::connect(&self.target, &name).await?);
        self.ensure(&client).await?;
        let pull_inbox = client.inbox("pull");
        let mut inbox = client.subscribe(&pull_inbox, None).await?;
        status.healthy();
        let next = format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            self.stream, self.consumer
        );
        // A pull asks for half the room once half the room is free: the
        // other half still holds messages for the running slots, so
        // functions do not starve while the next batch comes, and a busy
        // consumer pays one pull round trip per half-room of messages.
        let half = (self.room() / 2).max(1);
        loop {
            // Ask only for as many messages as there is room for.
            let mut held = Vec::with_capacity(half);
            while held.len() < half {
                held.push(
                    slots
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| SourceError::Disconnected("stopping".into()))?,
                );
            }
            let request = serde_json::json!({
                "batch": held.len(),
                "max_bytes": PULL_MAX_BYTES.max(client.max_payload()),
                "expires": PULL_EXPIRES.as_nanos() as u64,
            });
            client
                .publish(&next, Some(&pull_inbox), request.to_string().as_bytes())
                .await?;
            let deadline = tokio::time::Instant::now() + PULL_EXPIRES + API_TIMEOUT;
            while !held.is_empty() {
                let msg = match tokio::time::timeout_at(deadline, inbox.recv()).await {
                    // The request ended unseen: ask again.
                    Err(_) => break,
                    Ok(None) => return Err(client.closed_error()),
                    Ok(Some(m)) => m,
                };
                match msg.status {
                    None => {}
                    // Idle heartbeat.
                    Some(100) => continue,
                    // No messages, or the request expired.
                    Some(404 | 408) => break,
                    // The request's byte budget is spent: ask again.
                    Some(409) if msg.description.contains("MaxBytes") => break,
                    Some(code) => {
                        return Err(SourceError::Server(format!(
                            "pulling from {}: {code} {}",
                            self.consumer, msg.description
                        )));
                    }
                }
                let Some(permit) = held.pop() else { break };
                tokio::spawn(self.clone().handle(
                    client.clone(),
                    deliver.clone(),
                    status.clone(),
                    msg,
                    permit,
                    running.clone(),
                ));
            }
        }
    }
}

impl EventSource for JetStreamSource {
    fn check(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            // The consumer is created here, so messages published once the
            // deploy returns are never missed; one left by a deploy that
            // fails later holds no more than its position.
            let client = Client::connect(&self.target, "nimbus:check").await?;
            self.ensure(&client).await
        })
    }

    fn remove(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            let client = Client::connect(&self.target, "nimbus:remove").await?;
            let delete = format!("$JS.API.CONSUMER.DELETE.{}.{}", self.stream, self.consumer);
            match self.api(&client, &delete, &serde_json::Value::Null).await? {
                Ok(_) => Ok(()),
                Err(e) if e.code == 404 => Ok(()),
                Err(e) => Err(SourceError::Server(e.description)),
            }
        })
    }

    fn run(
        self: Arc<Self>,
        deliver: Arc<dyn Deliver>,
        status: StatusCell,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let room = Arc::new(Semaphore::new(self.room()));
            let running = Arc::new(Semaphore::new(self.concurrency as usize));
            let this = self.clone();
            crate::wire::reconnecting(
                "jetstream",
                &self.function,
                &self.stream,
                status.clone(),
                || this.session(&deliver, &status, &room, &running),
            )
            .await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgement_subjects_parse() {
        assert_eq!(
            ack_info("$JS.ACK.ORDERS.nimbus-f.3.120.117.1700000000123456789.5"),
            Some(AckInfo {
                delivered: 3,
                stream_sequence: 120,
                timestamp_ns: 1_700_000_000_123_456_789,
            })
        );
        assert_eq!(
            ack_info("$JS.ACK.hub.ACCHASH.ORDERS.nimbus-f.1.7.7.1700000000000000000.0.tok"),
            Some(AckInfo {
                delivered: 1,
                stream_sequence: 7,
                timestamp_ns: 1_700_000_000_000_000_000,
            })
        );
        assert_eq!(ack_info("_INBOX.x"), None);
        assert_eq!(ack_info("$JS.ACK.a.b.c"), None);
        assert_eq!(ack_info("$JS.NAK.ORDERS.nimbus-f.3.120.117.17.5"), None);
        assert_eq!(ack_info("$JS.ACK.ORDERS.nimbus-f.x.120.117.17.5"), None);
    }
}
