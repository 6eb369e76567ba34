//! Redis Streams through a consumer group.
//!
//! Entries are read with XREADGROUP, each handed to the function, and
//! acknowledged (XACK) once it succeeded or was dead-lettered. Entries left
//! pending are never lost: at every (re)connection this consumer first reads
//! its own pending entries again, and entries pending longer than
//! `claim_idle` in any other consumer (one that crashed) are taken over with
//! XAUTOCLAIM. Order: with `concurrency = 1` entries run one at a time in
//! stream order (a retried entry is retried before the next one starts).

use crate::resp::{Conn, Target, Value};
use crate::{BoxFuture, Deliver, EventSource, Message, SourceError, StatusCell, Verdict};
use nimbus_manifest::RedisStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// How long one XREADGROUP waits for new entries.
const BLOCK_MS: &str = "2000";
/// This node's consumer name within the group.
const CONSUMER: &str = "nimbus";
/// Most entries one XACK carries.
const MAX_ACK_BATCH: usize = 1024;

/// An entry to acknowledge, and who waits for the answer.
type AckRequest = (String, oneshot::Sender<Result<(), SourceError>>);

pub struct RedisStreamSource {
    function: String,
    target: Target,
    stream: String,
    group: String,
    claim_idle: Duration,
    concurrency: u32,
    batch: u32,
    ce_source: String,
    /// Entries being delivered now. A claim or a re-read of pending entries
    /// can return them again (their idle time grows while a slow function
    /// runs); they are not delivered twice at once.
    in_flight: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// One stream entry.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    id: String,
    fields: Vec<(String, String)>,
}

fn entries(list: Value) -> Vec<Entry> {
    list.into_array()
        .into_iter()
        .filter_map(|e| {
            let mut parts = e.into_array().into_iter();
            let id = parts.next()?.as_text()?;
            let flat = parts.next().map(Value::into_array).unwrap_or_default();
            let fields = flat
                .chunks(2)
                .filter_map(|kv| Some((kv.first()?.as_text()?, kv.get(1)?.as_text()?)))
                .collect();
            Some(Entry { id, fields })
        })
        .collect()
}

/// Entries of an XREADGROUP reply (one stream).
fn read_reply(v: Value) -> Vec<Entry> {
    v.into_array()
        .into_iter()
        .next()
        .map(|s| entries(s.into_array().into_iter().nth(1).unwrap_or(Value::Nil)))
        .unwrap_or_default()
}

impl RedisStreamSource {
    pub fn new(
        function: &str,
        url: &str,
        config: &RedisStream,
        concurrency: u32,
        batch: u32,
    ) -> Result<Self, SourceError> {
        let target = Target::parse(url)?;
        let ce_source = format!(
            "redis://{}:{}/{}/{}",
            target.host, target.port, target.db, config.stream
        );
        Ok(Self {
            function: function.to_owned(),
            group: config
                .group
                .clone()
                .unwrap_or_else(|| format!("nimbus-{function}")),
            stream: config.stream.clone(),
            claim_idle: config.claim_idle.get(),
            concurrency,
            batch,
            ce_source,
            target,
            in_flight: Default::default(),
        })
    }

    /// Entries the source holds (running, waiting for a slot, or being
    /// acknowledged): the running ones and as many again. Not more: an
    /// entry waiting here stays pending in the group with its idle time
    /// growing, so a long wait would let another consumer claim it.
    fn room(&self) -> usize {
        crate::wire::room(self.concurrency, 0)
    }

    /// Entries one read asks for: `batch`, at most half the room.
    fn read_size(&self) -> usize {
        (self.room() / 2).clamp(1, self.batch as usize)
    }

    /// Creates the group at the end of the stream unless it exists.
    async fn ensure_group(&self, conn: &mut Conn) -> Result<(), SourceError> {
        match conn
            .cmd(&[
                b"XGROUP",
                b"CREATE",
                self.stream.as_bytes(),
                self.group.as_bytes(),
                b"$",
                b"MKSTREAM",
            ])
            .await
        {
            Ok(_) => Ok(()),
            Err(SourceError::Server(e)) if e.starts_with("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn message(&self, entry: Entry) -> Message {
        let fields: serde_json::Map<String, serde_json::Value> = entry
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let body = serde_json::to_vec(&fields).unwrap_or_default();
        Message {
            function: self.function.clone(),
            id: entry.id.clone(),
            ce_source: self.ce_source.clone(),
            ce_type: "redis.stream.entry".into(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("ce-redisstream".into(), self.stream.clone()),
                ("ce-redisid".into(), entry.id),
                ("ce-redisgroup".into(), self.group.clone()),
            ],
            body,
            delivery: None,
            per_invocation: None,
        }
    }

    /// XREADGROUP: up to `count` entries after `id` (`>`: never delivered;
    /// an id: this consumer's pending ones after it), waiting `block` ms.
    async fn read_group(
        &self,
        conn: &mut Conn,
        count: &str,
        block: Option<&str>,
        id: &str,
    ) -> Result<Vec<Entry>, SourceError> {
        let mut args: Vec<&[u8]> = vec![
            b"XREADGROUP",
            b"GROUP",
            self.group.as_bytes(),
            CONSUMER.as_bytes(),
            b"COUNT",
            count.as_bytes(),
        ];
        if let Some(ms) = block {
            args.extend([b"BLOCK".as_slice(), ms.as_bytes()]);
        }
        args.extend([b"STREAMS".as_slice(), self.stream.as_bytes(), id.as_bytes()]);
        Ok(read_reply(conn.cmd(&args).await?))
    }

    /// Acknowledges entries on `conn`: one XACK carries every entry whose
    /// function finished while the previous XACK was on its way, so a busy
    /// source pays one round trip per batch, not per entry. Each request
    /// is answered once its XACK was, so an entry leaves `in_flight` only
    /// once the group no longer holds it pending. Ends when every sender
    /// is gone, or at the first failed XACK.
    fn acknowledge(self: Arc<Self>, mut conn: Conn) -> mpsc::UnboundedSender<AckRequest> {
        // Unbounded in type only: each request holds one of the source's
        // slots until it is answered.
        let (tx, mut rx) = mpsc::unbounded_channel::<AckRequest>();
        tokio::spawn(async move {
            let mut batch: Vec<AckRequest> = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.push(first);
                while batch.len() < MAX_ACK_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let mut args: Vec<&[u8]> = Vec::with_capacity(batch.len() + 3);
                args.extend([
                    b"XACK".as_slice(),
                    self.stream.as_bytes(),
                    self.group.as_bytes(),
                ]);
                args.extend(batch.iter().map(|(id, _)| id.as_bytes()));
                let result = conn.cmd(&args).await.map(|_| ());
                let broken = result.is_err();
                for (_, done) in batch.drain(..) {
                    let _ = done.send(result.clone());
                }
                if broken {
                    // The session sees the channel closed and reconnects;
                    // the entries come back as its own pending ones.
                    break;
                }
            }
        });
        tx
    }

    /// One connected session: returns only on a broker error.
    async fn session(
        self: &Arc<Self>,
        deliver: &Arc<dyn Deliver>,
        status: &StatusCell,
        room: &Arc<Semaphore>,
        running: &Arc<Semaphore>,
    ) -> Result<(), SourceError> {
        let mut reader = Conn::connect(&self.target).await?;
        let mut acker = Conn::connect(&self.target).await?;
        // Named, so operators see in CLIENT LIST whose connections these are.
        let name = format!("nimbus:{}:{}", self.function, self.stream);
        for conn in [&mut reader, &mut acker] {
            conn.cmd(&[b"CLIENT", b"SETNAME", name.as_bytes()]).await?;
        }
        let acker = self.clone().acknowledge(acker);
        self.ensure_group(&mut reader).await?;
        status.healthy();
        // Our own pending entries first: delivered before a crash or a
        // broken connection, never acknowledged.
        let mut own_cursor = Some("0".to_owned());
        let mut claim_cursor = "0-0".to_owned();
        let mut last_claim = Instant::now();
        let read_size = self.read_size();
        loop {
            if acker.is_closed() {
                return Err(SourceError::Disconnected(
                    "acknowledging entries failed".into(),
                ));
            }
            // A read waits until a whole read's worth of room is free: the
            // entries still held keep the slots busy meanwhile, so
            // functions do not starve while the next entries come, and a
            // busy source pays one read per `batch` entries instead of one
            // per freed slot.
            let mut held = Vec::with_capacity(read_size);
            while held.len() < read_size {
                held.push(
                    room.clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| SourceError::Disconnected("stopping".into()))?,
                );
            }
            let count = held.len().to_string();
            let batch = if let Some(cursor) = &own_cursor {
                let got = self.read_group(&mut reader, &count, None, cursor).await?;
                own_cursor = got.last().map(|e| e.id.clone());
                got
            } else if last_claim.elapsed() >= self.claim_idle / 2 {
                last_claim = Instant::now();
                let idle = self.claim_idle.as_millis().to_string();
                let reply = reader
                    .cmd(&[
                        b"XAUTOCLAIM",
                        self.stream.as_bytes(),
                        self.group.as_bytes(),
                        CONSUMER.as_bytes(),
                        idle.as_bytes(),
                        claim_cursor.as_bytes(),
                        b"COUNT",
                        count.as_bytes(),
                    ])
                    .await?;
                let mut parts = reply.into_array().into_iter();
                claim_cursor = parts
                    .next()
                    .and_then(|c| c.as_text())
                    .unwrap_or_else(|| "0-0".into());
                let got = entries(parts.next().unwrap_or(Value::Nil));
                if !got.is_empty() {
                    tracing::info!(function = %self.function, stream = %self.stream, entries = got.len(), "claimed entries left pending by another consumer");
                }
                got
            } else {
                self.read_group(&mut reader, &count, Some(BLOCK_MS), ">")
                    .await?
            };
            let batch: Vec<Entry> = match self.in_flight.lock() {
                Ok(mut running) => batch
                    .into_iter()
                    .filter(|e| running.insert(e.id.clone()))
                    .collect(),
                Err(_) => batch,
            };
            // Unused slots go back as `held` is dropped.
            for (entry, permit) in batch.into_iter().zip(held) {
                let this = self.clone();
                let deliver = deliver.clone();
                let acker = acker.clone();
                let status = status.clone();
                let running = running.clone();
                tokio::spawn(async move {
                    let id = entry.id.clone();
                    let message = this.message(entry);
                    let verdict = {
                        let _slot = running.acquire_owned().await;
                        deliver.deliver(message).await
                    };
                    status.counted(&verdict);
                    if matches!(verdict, Verdict::Succeeded | Verdict::DeadLettered) {
                        let (done, answer) = oneshot::channel();
                        let acked = match acker.send((id.clone(), done)) {
                            Ok(()) => answer.await.ok(),
                            Err(_) => None,
                        }
                        .unwrap_or_else(|| {
                            Err(SourceError::Disconnected(
                                "the acknowledging connection closed".into(),
                            ))
                        });
                        if let Err(e) = acked {
                            // Redelivered after reconnection: at least once.
                            tracing::warn!(function = %this.function, entry = %id, error = %e, "could not acknowledge an entry");
                        }
                    }
                    if let Ok(mut running) = this.in_flight.lock() {
                        running.remove(&id);
                    }
                    drop(permit);
                });
            }
        }
    }
}

impl EventSource for RedisStreamSource {
    fn check(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            let mut conn = Conn::connect(&self.target).await?;
            self.ensure_group(&mut conn).await
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
                "redis",
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
    fn reads_fill_half_the_room() {
        let source = |concurrency, batch| {
            let config: RedisStream = serde_json::from_value(
                serde_json::json!({"url": "redis://127.0.0.1", "stream": "orders"}),
            )
            .unwrap();
            RedisStreamSource::new("f", "redis://127.0.0.1", &config, concurrency, batch).unwrap()
        };
        // One slot: one entry at a time, in stream order.
        assert_eq!((source(1, 16).room(), source(1, 16).read_size()), (1, 1));
        // The running entries and as many again; reads of `batch`...
        assert_eq!(
            (source(16, 16).room(), source(16, 16).read_size()),
            (32, 16)
        );
        assert_eq!(
            (source(64, 16).room(), source(64, 16).read_size()),
            (128, 16)
        );
        // ...at most half the room, so a read never waits for every slot.
        assert_eq!((source(4, 16).room(), source(4, 16).read_size()), (8, 4));
    }

    #[test]
    fn replies_become_entries() {
        let bulk = |s: &str| Value::Bulk(s.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("orders"),
            Value::Array(vec![Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![bulk("sku"), bulk("tea"), bulk("qty"), bulk("3")]),
            ])]),
        ])]);
        let got = read_reply(reply);
        assert_eq!(
            got,
            [Entry {
                id: "1-0".into(),
                fields: vec![("sku".into(), "tea".into()), ("qty".into(), "3".into())]
            }]
        );
        assert!(read_reply(Value::Nil).is_empty());
    }
}
