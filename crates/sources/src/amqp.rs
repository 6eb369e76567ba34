//! RabbitMQ queues over AMQP 0-9-1.
//!
//! The consumer opens one channel with a prefetch of `concurrency` (so the
//! broker never sends more than the function can run at once) and consumes
//! the queue with manual acknowledgements. A message is acknowledged
//! (basic.ack) once its function succeeded or it was dead-lettered into
//! Nimbus; failures are retried in place meanwhile, with the function's
//! backoff, while the message stays unacknowledged in the broker. A message
//! the function cannot take (not serving) is rejected with requeue after a
//! pause. A message in flight when the node dies is redelivered by the
//! broker (at least once).
//!
//! The client here speaks the part of the protocol a consumer and a test
//! publisher need: connection negotiation with PLAIN login and heartbeats,
//! one channel, queue declare / delete, basic.qos / consume / publish /
//! ack / reject.

use crate::wire::{Cursor, Url, Writer, decode};
use crate::{BoxFuture, Deliver, EventSource, Message, SourceError, StatusCell, Verdict};
use nimbus_manifest::Amqp;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Mutex, mpsc};

/// Longest a connection attempt (and the negotiation) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The heartbeat asked for: a connection silent for twice this is dead.
const HEARTBEAT: Duration = Duration::from_secs(20);
/// Largest frame accepted (and offered).
const FRAME_MAX: u32 = 128 * 1024;
/// Largest message body accepted from a broker.
const MAX_BODY: u64 = 64 << 20;
/// Longest an ack is held back for an older delivery still running.
const HOLD_FOR: Duration = Duration::from_millis(20);
/// How long a message the function could not take waits before it goes
/// back to the queue.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);
const FRAME_END: u8 = 0xCE;

/// Where to connect and how to log in, parsed from `amqp://` URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
}

impl Target {
    /// Parses `amqp://[user:password@]host[:port][/vhost]` (vhost `/` when
    /// the path is empty; `%2F` for a slash inside it).
    pub fn parse(url: &str) -> Result<Self, SourceError> {
        let u = Url::parse(
            url,
            &["amqp://"],
            "amqp",
            "amqp://user:password@host:port/vhost",
            5672,
        )?;
        let (user, password) = match (u.user, u.password) {
            (None, _) => ("guest".to_owned(), "guest".to_owned()),
            (Some(user), password) => (user, password.unwrap_or_default()),
        };
        let vhost = match u.path.as_str() {
            "" => "/".to_owned(),
            v => decode(v),
        };
        Ok(Self {
            host: u.host,
            port: u.port,
            user,
            password,
            vhost,
        })
    }
}

/// Builds method arguments.
#[derive(Default)]
struct Args(Vec<u8>);

impl Args {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn short(mut self, s: &str) -> Self {
        let s = &s.as_bytes()[..s.len().min(255)];
        self.0.push(s.len() as u8);
        self.0.extend_from_slice(s);
        self
    }
    fn long(mut self, s: &[u8]) -> Self {
        self.0.extend_from_slice(&(s.len() as u32).to_be_bytes());
        self.0.extend_from_slice(s);
        self
    }
    /// An empty field table.
    fn table(self) -> Self {
        self.u32(0)
    }
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
    out
}

fn method(channel: u16, class: u16, id: u16, args: Args) -> Vec<u8> {
    let mut payload = class.to_be_bytes().to_vec();
    payload.extend_from_slice(&id.to_be_bytes());
    payload.extend_from_slice(&args.0);
    frame(1, channel, &payload)
}

/// Method arguments and content headers: short and long strings, field
/// values and tables.
impl<'a> Cursor<'a> {
    fn short(&mut self) -> Result<String, SourceError> {
        let n = self.u8()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn long(&mut self) -> Result<&'a [u8], SourceError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// A field value; strings (and what prints as one) come back as text.
    fn value(&mut self) -> Result<Option<String>, SourceError> {
        Ok(match self.u8()? {
            b't' | b'b' | b'B' => Some(self.u8()?.to_string()),
            b's' | b'u' => Some(self.u16()?.to_string()),
            b'I' => Some((self.u32()? as i32).to_string()),
            b'i' => Some(self.u32()?.to_string()),
            b'l' => Some((self.u64()? as i64).to_string()),
            b'T' => Some(self.u64()?.to_string()),
            b'f' => {
                self.take(4)?;
                None
            }
            b'd' => {
                self.take(8)?;
                None
            }
            b'D' => {
                self.take(5)?;
                None
            }
            b'S' | b'x' => Some(String::from_utf8_lossy(self.long()?).into_owned()),
            b'A' => {
                let inner = self.long()?;
                let mut c = Cursor { b: inner, at: 0 };
                while c.at < inner.len() {
                    c.value()?;
                }
                None
            }
            b'F' => {
                self.table()?;
                None
            }
            b'V' => None,
            t => {
                return Err(SourceError::Protocol(format!(
                    "unknown amqp field type {:?}",
                    t as char
                )));
            }
        })
    }

    fn table(&mut self) -> Result<Vec<(String, String)>, SourceError> {
        let inner = self.long()?;
        let mut c = Cursor { b: inner, at: 0 };
        let mut out = Vec::new();
        while c.at < inner.len() {
            let name = c.short()?;
            if let Some(v) = c.value()? {
                out.push((name, v));
            }
        }
        Ok(out)
    }
}

/// What a content header says of a message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Properties {
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    pub message_id: Option<String>,
    pub timestamp: Option<u64>,
}

/// Decodes a content header's properties (after class, weight and size).
fn properties(c: &mut Cursor<'_>) -> Result<Properties, SourceError> {
    let flags = c.u16()?;
    let mut p = Properties::default();
    let has = |bit: u16| flags & (1 << bit) != 0;
    if has(15) {
        p.content_type = Some(c.short()?);
    }
    if has(14) {
        c.short()?; // content-encoding
    }
    if has(13) {
        p.headers = c.table()?;
    }
    if has(12) {
        c.u8()?; // delivery-mode
    }
    if has(11) {
        c.u8()?; // priority
    }
    for bit in [10, 9, 8] {
        if has(bit) {
            c.short()?; // correlation-id, reply-to, expiration
        }
    }
    if has(7) {
        p.message_id = Some(c.short()?);
    }
    if has(6) {
        p.timestamp = Some(c.u64()?);
    }
    for bit in [5, 4, 3, 2] {
        if has(bit) {
            c.short()?; // type, user-id, app-id, cluster-id
        }
    }
    Ok(p)
}

/// A delivered message.
#[derive(Debug)]
pub struct Delivery {
    pub tag: u64,
    pub redelivered: bool,
    pub exchange: String,
    pub routing_key: String,
    pub properties: Properties,
    pub body: Vec<u8>,
}

/// A method frame: class, id and arguments.
type MethodFrame = (u16, u16, Vec<u8>);

async fn read_frame(
    read: &mut BufReader<OwnedReadHalf>,
) -> Result<(u8, u16, Vec<u8>), SourceError> {
    let broken = |e: std::io::Error| SourceError::Disconnected(e.to_string());
    let kind = read.read_u8().await.map_err(broken)?;
    let channel = read.read_u16().await.map_err(broken)?;
    let size = read.read_u32().await.map_err(broken)?;
    if size > FRAME_MAX {
        return Err(SourceError::Protocol(format!("a frame of {size} bytes")));
    }
    let mut payload = vec![0; size as usize + 1];
    read.read_exact(&mut payload).await.map_err(broken)?;
    if payload.pop() != Some(FRAME_END) {
        return Err(SourceError::Protocol(
            "a frame without its end marker".into(),
        ));
    }
    Ok((kind, channel, payload))
}

fn close_reason(args: &[u8]) -> String {
    let mut c = Cursor { b: args, at: 0 };
    let code = c.u16().unwrap_or(0);
    let text = c.short().unwrap_or_default();
    format!("{code} {text}")
}

/// An open connection with one channel.
pub struct Client {
    write: Arc<Writer>,
    replies: Mutex<mpsc::Receiver<Result<MethodFrame, SourceError>>>,
    deliveries: Mutex<Option<mpsc::Receiver<Delivery>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

const CHANNEL: u16 = 1;

impl Client {
    /// Connects, logs in and opens the channel; `name` is what the broker
    /// shows for the connection.
    pub async fn connect(target: &Target, name: &str) -> Result<Self, SourceError> {
        let addr = format!("{}:{}", target.host, target.port);
        tokio::time::timeout(CONNECT_TIMEOUT, Self::open(target, &addr, name))
            .await
            .map_err(|_| SourceError::Unreachable(format!("{addr} (timed out)")))?
    }

    async fn open(target: &Target, addr: &str, name: &str) -> Result<Self, SourceError> {
        let stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| SourceError::Unreachable(format!("{addr} ({e})")))?;
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let io = |e: std::io::Error| SourceError::Disconnected(e.to_string());
        write.write_all(b"AMQP\x00\x00\x09\x01").await.map_err(io)?;
        // connection.start → start-ok (PLAIN), tune → tune-ok, open.
        let expect =
            |got: (u8, u16, Vec<u8>), class: u16, id: u16| -> Result<Vec<u8>, SourceError> {
                let (kind, _, payload) = got;
                let mut c = Cursor { b: &payload, at: 0 };
                let (k, i) = (c.u16()?, c.u16()?);
                if kind == 1 && (k, i) == (10, 50) {
                    let reason = close_reason(&payload[4..]);
                    return Err(if reason.starts_with("403") {
                        SourceError::Auth(reason)
                    } else {
                        SourceError::Server(reason)
                    });
                }
                if kind != 1 || (k, i) != (class, id) {
                    return Err(SourceError::Protocol(format!(
                        "{addr} answered method {k}.{i} where {class}.{id} was expected"
                    )));
                }
                Ok(payload[4..].to_vec())
            };
        let first = read_frame(&mut read).await.map_err(|e| match e {
            SourceError::Protocol(_) => {
                SourceError::Protocol(format!("{addr} did not answer as an AMQP 0-9-1 broker"))
            }
            e => e,
        })?;
        expect(first, 10, 10)?;
        let mut response = vec![0];
        response.extend_from_slice(target.user.as_bytes());
        response.push(0);
        response.extend_from_slice(target.password.as_bytes());
        let props = Args::default()
            .short("product")
            .u8(b'S')
            .long(b"nimbus")
            .short("connection_name")
            .u8(b'S')
            .long(name.as_bytes());
        let start_ok = Args({
            let mut v = (props.0.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(&props.0);
            v
        })
        .short("PLAIN")
        .long(&response)
        .short("en_US");
        write
            .write_all(&method(0, 10, 11, start_ok))
            .await
            .map_err(io)?;
        // A refused login closes the connection, sometimes without a reason.
        let tune = match read_frame(&mut read).await {
            Ok(f) => expect(f, 10, 30)?,
            Err(SourceError::Disconnected(_)) => {
                return Err(SourceError::Auth(format!(
                    "{addr} closed the connection at login (wrong user or password?)"
                )));
            }
            Err(e) => return Err(e),
        };
        let mut c = Cursor { b: &tune, at: 0 };
        let channel_max = c.u16()?;
        let frame_max = c.u32()?;
        let frame_max = if frame_max == 0 {
            FRAME_MAX
        } else {
            frame_max.min(FRAME_MAX)
        };
        let heartbeat = HEARTBEAT.as_secs() as u16;
        write
            .write_all(&method(
                0,
                10,
                31,
                Args::default()
                    .u16(channel_max.max(1))
                    .u32(frame_max)
                    .u16(heartbeat),
            ))
            .await
            .map_err(io)?;
        write
            .write_all(&method(
                0,
                10,
                40,
                Args::default().short(&target.vhost).short("").u8(0),
            ))
            .await
            .map_err(io)?;
        expect(read_frame(&mut read).await?, 10, 41).map_err(|e| match e {
            SourceError::Server(r) if r.starts_with("530") => {
                SourceError::Auth(format!("no access to vhost {}: {r}", target.vhost))
            }
            e => e,
        })?;
        write
            .write_all(&method(CHANNEL, 20, 10, Args::default().short("")))
            .await
            .map_err(io)?;
        expect(read_frame(&mut read).await?, 20, 11)?;

        let write = Arc::new(Writer::new(write));
        let (reply_tx, replies) = mpsc::channel(16);
        let (delivery_tx, deliveries) = mpsc::channel(1024);
        let reader = tokio::spawn(read_loop(read, write.clone(), reply_tx, delivery_tx));
        let beater = {
            let write = write.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(HEARTBEAT / 2);
                loop {
                    every.tick().await;
                    if write.send(&frame(8, 0, &[])).await.is_err() {
                        return;
                    }
                }
            })
        };
        Ok(Self {
            write,
            replies: Mutex::new(replies),
            deliveries: Mutex::new(Some(deliveries)),
            tasks: vec![reader, beater],
        })
    }

    async fn send(&self, bytes: Vec<u8>) -> Result<(), SourceError> {
        self.write.send(&bytes).await
    }

    /// Sends a method and waits for the broker's answer, which must be
    /// `class.id`.
    async fn call(
        &self,
        class: u16,
        id: u16,
        args: Args,
        answer: u16,
    ) -> Result<Vec<u8>, SourceError> {
        let mut replies = self.replies.lock().await;
        self.send(method(CHANNEL, class, id, args)).await?;
        match replies.recv().await {
            None => Err(SourceError::Disconnected("the connection closed".into())),
            Some(Err(e)) => Err(e),
            Some(Ok((k, i, args))) if (k, i) == (class, answer) => Ok(args),
            Some(Ok((k, i, _))) => Err(SourceError::Protocol(format!(
                "the broker answered {k}.{i} to {class}.{id}"
            ))),
        }
    }

    /// Checks the queue exists: its message and consumer counts.
    pub async fn queue_exists(&self, queue: &str) -> Result<(u32, u32), SourceError> {
        let args = Args::default().u16(0).short(queue).u8(0b1).table();
        let ok = self.call(50, 10, args, 11).await?;
        let mut c = Cursor { b: &ok, at: 0 };
        c.short()?;
        Ok((c.u32()?, c.u32()?))
    }

    /// Declares a durable queue (tests and tools).
    pub async fn declare_queue(&self, queue: &str) -> Result<(), SourceError> {
        let args = Args::default().u16(0).short(queue).u8(0b10).table();
        self.call(50, 10, args, 11).await.map(|_| ())
    }

    /// Deletes a queue (tests and tools).
    pub async fn delete_queue(&self, queue: &str) -> Result<(), SourceError> {
        let args = Args::default().u16(0).short(queue).u8(0);
        self.call(50, 40, args, 41).await.map(|_| ())
    }

    /// Publishes a persistent message to the default exchange, routed to
    /// `queue`, with `headers` (string values).
    pub async fn publish(
        &self,
        queue: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), SourceError> {
        let mut out = method(
            CHANNEL,
            60,
            40,
            Args::default().u16(0).short("").short(queue).u8(0),
        );
        let mut table = Args::default();
        for (k, v) in headers {
            table = table.short(k).u8(b'S').long(v.as_bytes());
        }
        // Content type, headers and delivery mode 2 (persistent).
        let header = Args::default()
            .u16(60)
            .u16(0)
            .u64(body.len() as u64)
            .u16((1 << 15) | (1 << 13) | (1 << 12))
            .short("application/octet-stream")
            .long(&table.0)
            .u8(2);
        out.extend(frame(2, CHANNEL, &header.0));
        for chunk in body.chunks(FRAME_MAX as usize - 8) {
            out.extend(frame(3, CHANNEL, chunk));
        }
        self.send(out).await
    }

    /// Limits unacknowledged deliveries to `prefetch` and starts consuming
    /// `queue`; deliveries arrive on the returned channel.
    pub async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
    ) -> Result<mpsc::Receiver<Delivery>, SourceError> {
        self.call(60, 10, Args::default().u32(0).u16(prefetch).u8(0), 11)
            .await?;
        let args = Args::default().u16(0).short(queue).short(tag).u8(0).table();
        self.call(60, 20, args, 21).await?;
        self.deliveries
            .lock()
            .await
            .take()
            .ok_or_else(|| SourceError::Protocol("already consuming".into()))
    }

    pub async fn ack(&self, tag: u64) -> Result<(), SourceError> {
        self.settle(&[Settlement::Ack {
            tag,
            multiple: false,
        }])
        .await
    }

    /// Tells the broker what became of deliveries, in one write.
    async fn settle(&self, settlements: &[Settlement]) -> Result<(), SourceError> {
        let mut out = Vec::with_capacity(settlements.len() * 21);
        for s in settlements {
            out.extend(match *s {
                Settlement::Ack { tag, multiple } => method(
                    CHANNEL,
                    60,
                    80,
                    Args::default().u64(tag).u8(u8::from(multiple)),
                ),
                // basic.reject with requeue.
                Settlement::Requeue { tag } => {
                    method(CHANNEL, 60, 90, Args::default().u64(tag).u8(1))
                }
            });
        }
        self.send(out).await
    }
}

/// What the consumer tells the broker about a delivery it is done with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settlement {
    /// basic.ack; with `multiple`, of every unsettled delivery up to `tag`.
    Ack { tag: u64, multiple: bool },
    /// basic.reject, putting the message back in the queue.
    Requeue { tag: u64 },
}

/// The channel's deliveries the broker still holds for this consumer, and
/// how finished ones are told to it in as few frames as it can: the acks of
/// every delivery below the oldest one still running share one basic.ack
/// with `multiple`, so a busy queue costs the broker one ack frame per batch
/// instead of one per message. A delivery that finishes before an older one
/// has its ack held back until the older one finishes (the broker settles a
/// run of acks from the front of its list cheaply, and single acks out of
/// order dearly), but never for long nor for many: past `hold_max` held
/// acks, or when the settling task's `HOLD_FOR` runs out, they go one by
/// one. A delivery still running (or waiting to be requeued) is never
/// covered by an ack with `multiple`.
#[derive(Debug)]
struct Unsettled {
    /// Delivered and not yet acknowledged or requeued on the wire.
    tags: std::collections::BTreeSet<u64>,
    /// Finished, their acks held back for an older delivery still running.
    held: std::collections::BTreeSet<u64>,
    hold_max: usize,
}

impl Unsettled {
    fn new(hold_max: usize) -> Self {
        Self {
            tags: Default::default(),
            held: Default::default(),
            hold_max,
        }
    }

    fn delivered(&mut self, tag: u64) {
        self.tags.insert(tag);
    }

    /// Whether acks are held back.
    fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// The frames that settle `done` (tag, acknowledged rather than
    /// requeued). Requeues come first, so an ack with `multiple` written
    /// after them in the same batch finds them settled already.
    fn settle(&mut self, done: &mut [(u64, bool)]) -> Vec<Settlement> {
        done.sort_unstable();
        let mut frames = Vec::new();
        for &(tag, ack) in done.iter() {
            if ack {
                self.held.insert(tag);
            } else {
                self.tags.remove(&tag);
                frames.push(Settlement::Requeue { tag });
            }
        }
        // Every unsettled delivery below this one is held.
        let oldest_running = self
            .tags
            .iter()
            .find(|t| !self.held.contains(t))
            .copied()
            .unwrap_or(u64::MAX);
        let below: Vec<u64> = self.held.range(..oldest_running).copied().collect();
        for tag in &below {
            self.held.remove(tag);
            self.tags.remove(tag);
        }
        match below.as_slice() {
            [] => {}
            [tag] => frames.push(Settlement::Ack {
                tag: *tag,
                multiple: false,
            }),
            [.., last] => frames.push(Settlement::Ack {
                tag: *last,
                multiple: true,
            }),
        }
        if self.held.len() > self.hold_max {
            frames.extend(self.flush());
        }
        frames
    }

    /// The held acks, one by one.
    fn flush(&mut self) -> Vec<Settlement> {
        let held = std::mem::take(&mut self.held);
        held.into_iter()
            .map(|tag| {
                self.tags.remove(&tag);
                Settlement::Ack {
                    tag,
                    multiple: false,
                }
            })
            .collect()
    }
}

/// What the session's settling task hears, in delivery order.
enum Settle {
    Delivered(u64),
    /// The function is done: acknowledge (`true`) or requeue (`false`).
    Done(u64, bool),
}

/// Settles the session's deliveries on `client`, batching whatever finished
/// while the previous write was on its way, with at most a quarter of the
/// `prefetch` window's acks held back (see [`Unsettled`]). Ends when every
/// sender is gone (after sending what it held) or a write failed (the
/// connection is gone: the broker redelivers what it held).
fn settling(client: Arc<Client>, function: String, prefetch: u16) -> mpsc::UnboundedSender<Settle> {
    // Unbounded in type only: the broker sends at most `prefetch`
    // unacknowledged deliveries, each with at most two events here.
    let (tx, mut rx) = mpsc::unbounded_channel::<Settle>();
    tokio::spawn(async move {
        let mut unsettled = Unsettled::new(usize::from(prefetch) / 4);
        let mut done = Vec::new();
        let mut events = Vec::new();
        // Since when acks are held back.
        let mut held_since: Option<tokio::time::Instant> = None;
        loop {
            let mut frames = Vec::new();
            if let Some(since) = held_since {
                match tokio::time::timeout_at(since + HOLD_FOR, rx.recv_many(&mut events, 1024))
                    .await
                {
                    Ok(n) if n > 0 => {}
                    // Out of time, or every sender is gone: what is held
                    // goes now.
                    _ => frames = unsettled.flush(),
                }
            } else if rx.recv_many(&mut events, 1024).await == 0 {
                break;
            }
            for event in events.drain(..) {
                match event {
                    Settle::Delivered(tag) => unsettled.delivered(tag),
                    Settle::Done(tag, ack) => done.push((tag, ack)),
                }
            }
            if !done.is_empty() {
                frames.extend(unsettled.settle(&mut done));
            }
            if !frames.is_empty()
                && let Err(e) = client.settle(&frames).await
            {
                // Redelivered by the broker: at least once.
                tracing::warn!(function = %function, messages = frames.len(), error = %e, "could not acknowledge amqp messages");
                break;
            }
            done.clear();
            held_since = match (unsettled.holding(), held_since) {
                (false, _) => None,
                (true, Some(since)) => Some(since),
                (true, None) => Some(tokio::time::Instant::now()),
            };
        }
    });
    tx
}

async fn read_loop(
    mut read: BufReader<OwnedReadHalf>,
    write: Arc<Writer>,
    replies: mpsc::Sender<Result<MethodFrame, SourceError>>,
    deliveries: mpsc::Sender<Delivery>,
) {
    let result: Result<(), SourceError> = async {
        // A delivery being assembled from its method, header and body frames.
        let mut pending: Option<(Delivery, u64)> = None;
        loop {
            let (kind, channel, payload) =
                tokio::time::timeout(HEARTBEAT * 2, read_frame(&mut read))
                    .await
                    .map_err(|_| {
                        SourceError::Disconnected("the broker stopped answering".into())
                    })??;
            match kind {
                1 => {
                    let mut c = Cursor { b: &payload, at: 0 };
                    let (class, id) = (c.u16()?, c.u16()?);
                    match (class, id) {
                        (60, 60) => {
                            c.short()?; // consumer tag
                            let tag = c.u64()?;
                            let redelivered = c.u8()? & 1 == 1;
                            let exchange = c.short()?;
                            let routing_key = c.short()?;
                            pending = Some((
                                Delivery {
                                    tag,
                                    redelivered,
                                    exchange,
                                    routing_key,
                                    properties: Properties::default(),
                                    body: Vec::new(),
                                },
                                0,
                            ));
                        }
                        (10, 50) | (20, 40) => {
                            let reason = close_reason(&payload[4..]);
                            let ok = if class == 10 { (10, 51) } else { (20, 41) };
                            let _ = write
                                .send(&method(channel, ok.0, ok.1, Args::default()))
                                .await;
                            let e = if reason.starts_with("404") {
                                SourceError::Config(reason)
                            } else {
                                SourceError::Server(reason)
                            };
                            let _ = replies.send(Err(e.clone())).await;
                            return Err(e);
                        }
                        _ => {
                            let _ = replies.send(Ok((class, id, payload[4..].to_vec()))).await;
                        }
                    }
                }
                2 => {
                    if let Some((d, size)) = pending.as_mut() {
                        let mut c = Cursor { b: &payload, at: 0 };
                        c.u16()?; // class
                        c.u16()?; // weight
                        *size = c.u64()?;
                        if *size > MAX_BODY {
                            return Err(SourceError::Protocol(format!(
                                "a message of {size} bytes is too large"
                            )));
                        }
                        d.properties = properties(&mut c)?;
                    }
                }
                3 => {
                    if let Some((d, _)) = pending.as_mut() {
                        d.body.extend_from_slice(&payload);
                    }
                }
                _ => {} // heartbeats
            }
            // A delivery is complete once its body is all there.
            if matches!(kind, 2 | 3)
                && let Some((d, size)) = &pending
                && d.body.len() as u64 >= *size
                && let Some((d, _)) = pending.take()
                && deliveries.send(d).await.is_err()
            {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = result {
        let _ = replies.try_send(Err(e));
    }
}

/// A RabbitMQ queue consumer for one function.
pub struct AmqpSource {
    function: String,
    target: Target,
    queue: String,
    concurrency: u32,
    ce_source: String,
}

impl AmqpSource {
    pub fn new(
        function: &str,
        url: &str,
        config: &Amqp,
        concurrency: u32,
    ) -> Result<Self, SourceError> {
        let target = Target::parse(url)?;
        let vhost = if target.vhost == "/" {
            String::new()
        } else {
            target.vhost.clone()
        };
        Ok(Self {
            function: function.to_owned(),
            ce_source: format!(
                "amqp://{}:{}/{vhost}/{}",
                target.host, target.port, config.queue
            ),
            queue: config.queue.clone(),
            concurrency,
            target,
        })
    }

    fn not_found(&self, e: SourceError) -> SourceError {
        match e {
            SourceError::Config(r) if r.starts_with("404") => SourceError::Config(format!(
                "the queue {} does not exist in vhost {} ({r}); declare it first",
                self.queue, self.target.vhost
            )),
            e => e,
        }
    }

    fn message(&self, d: Delivery) -> Message {
        let p = d.properties;
        let mut headers = vec![(
            "content-type".to_owned(),
            p.content_type
                .unwrap_or_else(|| "application/octet-stream".into()),
        )];
        for (k, v) in &p.headers {
            if k == "traceparent" || k == "tracestate" {
                headers.push((k.clone(), v.clone()));
            }
        }
        headers.extend([
            ("ce-amqpqueue".to_owned(), self.queue.clone()),
            ("ce-amqpexchange".to_owned(), d.exchange),
            ("ce-amqproutingkey".to_owned(), d.routing_key),
            ("ce-amqpredelivered".to_owned(), d.redelivered.to_string()),
        ]);
        Message {
            function: self.function.clone(),
            id: p.message_id.unwrap_or_else(crate::nats::unique_token),
            ce_source: self.ce_source.clone(),
            ce_type: "amqp.message".into(),
            headers,
            body: d.body,
            delivery: None,
            per_invocation: None,
        }
    }

    async fn session(
        &self,
        deliver: &Arc<dyn Deliver>,
        status: &StatusCell,
    ) -> Result<(), SourceError> {
        let name = format!("nimbus:{}:{}", self.function, self.queue);
        let client = Arc::new(Client::connect(&self.target, &name).await?);
        client
            .queue_exists(&self.queue)
            .await
            .map_err(|e| self.not_found(e))?;
        let tag = format!("nimbus:{}", self.function);
        // The broker sends at most `prefetch` unacknowledged messages: those
        // running and, but for one slot, as many again waiting.
        let prefetch = crate::wire::room(self.concurrency, 0).min(u16::MAX as usize) as u16;
        let mut deliveries = client.consume(&self.queue, prefetch, &tag).await?;
        status.healthy();
        let running = Arc::new(tokio::sync::Semaphore::new(self.concurrency as usize));
        let settle = settling(client.clone(), self.function.clone(), prefetch);
        while let Some(d) = deliveries.recv().await {
            let tag = d.tag;
            let message = self.message(d);
            // Before the function can finish: an ack with `multiple` for a
            // later delivery must know this one is still running.
            let _ = settle.send(Settle::Delivered(tag));
            let (settle, deliver, status) = (settle.clone(), deliver.clone(), status.clone());
            let running = running.clone();
            tokio::spawn(async move {
                let slot = running.acquire_owned().await;
                let verdict = deliver.deliver(message).await;
                drop(slot);
                status.counted(&verdict);
                let ack = matches!(verdict, Verdict::Succeeded | Verdict::DeadLettered);
                if !ack {
                    tokio::time::sleep(REQUEUE_DELAY).await;
                }
                // A closed channel: the connection is gone and the broker
                // redelivers the message (at least once).
                let _ = settle.send(Settle::Done(tag, ack));
            });
        }
        let mut replies = client.replies.lock().await;
        Err(match replies.try_recv() {
            Ok(Err(e)) => self.not_found(e),
            _ => SourceError::Disconnected("the broker closed the connection".into()),
        })
    }
}

impl EventSource for AmqpSource {
    fn check(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            let client = Client::connect(&self.target, "nimbus:check").await?;
            client
                .queue_exists(&self.queue)
                .await
                .map_err(|e| self.not_found(e))?;
            Ok(())
        })
    }

    fn run(
        self: Arc<Self>,
        deliver: Arc<dyn Deliver>,
        status: StatusCell,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let this = self.clone();
            crate::wire::reconnecting("amqp", &self.function, &self.queue, status.clone(), || {
                this.session(&deliver, &status)
            })
            .await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let t = Target::parse("amqp://app:s%3Acret@mq:5673/prod").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.vhost.as_str()),
            ("mq", 5673, "prod")
        );
        assert_eq!((t.user.as_str(), t.password.as_str()), ("app", "s:cret"));
        let t = Target::parse("amqp://127.0.0.1").unwrap();
        assert_eq!(
            (t.user.as_str(), t.vhost.as_str(), t.port),
            ("guest", "/", 5672)
        );
        assert_eq!(Target::parse("amqp://h/%2Fx").unwrap().vhost, "/x");
        assert!(Target::parse("amqps://h").is_err());
    }

    #[test]
    fn finished_deliveries_below_the_oldest_running_share_one_ack() {
        let ack = |tag, multiple| Settlement::Ack { tag, multiple };
        let mut u = Unsettled::new(8);
        for tag in 1..=6 {
            u.delivered(tag);
        }
        // 3 still runs: 1 and 2 share an ack, 4 and 5 wait for it.
        assert_eq!(
            u.settle(&mut [(5, true), (2, true), (1, true), (4, true)]),
            [ack(2, true)]
        );
        assert!(u.holding());
        // 3 is requeued: the reject goes first, then one ack for the rest
        // (nothing below 6 is unsettled any more).
        assert_eq!(
            u.settle(&mut [(6, true), (3, false)]),
            [Settlement::Requeue { tag: 3 }, ack(6, true)]
        );
        for tag in 7..=9 {
            u.delivered(tag);
        }
        // A requeue inside the run: rejected before the ack that spans it.
        assert_eq!(
            u.settle(&mut [(9, true), (8, false), (7, true)]),
            [Settlement::Requeue { tag: 8 }, ack(9, true)]
        );
        assert!(u.tags.is_empty() && !u.holding());
    }

    #[test]
    fn held_acks_go_one_by_one_past_the_limit_or_on_flush() {
        let ack = |tag| Settlement::Ack {
            tag,
            multiple: false,
        };
        let mut u = Unsettled::new(2);
        for tag in 1..=6 {
            u.delivered(tag);
        }
        // 1 runs on; 2 and 3 are held, a third held one is past the limit.
        assert_eq!(u.settle(&mut [(2, true), (3, true)]), []);
        assert_eq!(u.settle(&mut [(4, true)]), [ack(2), ack(3), ack(4)]);
        // Held when time runs out: the flush sends it alone.
        assert_eq!(u.settle(&mut [(6, true)]), []);
        assert_eq!(u.flush(), [ack(6)]);
        assert!(u.flush().is_empty());
        // 1 ends while 5 runs: nothing is held below it.
        assert_eq!(u.settle(&mut [(1, true)]), [ack(1)]);
        assert_eq!(u.tags.iter().copied().collect::<Vec<_>>(), [5]);
    }

    #[test]
    fn content_headers_decode() {
        let mut table = Args::default()
            .short("traceparent")
            .u8(b'S')
            .long(b"00-ab-cd-01");
        table = table.short("n").u8(b'I').u32(7).short("f").u8(b'd').u64(0);
        let header = Args::default()
            .u16((1 << 15) | (1 << 13) | (1 << 7) | (1 << 6))
            .short("text/plain")
            .long(&table.0)
            .short("m-1")
            .u64(1_700_000_000);
        let p = properties(&mut Cursor {
            b: &header.0,
            at: 0,
        })
        .unwrap();
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.message_id.as_deref(), Some("m-1"));
        assert_eq!(p.timestamp, Some(1_700_000_000));
        assert_eq!(
            p.headers,
            [
                ("traceparent".to_owned(), "00-ab-cd-01".to_owned()),
                ("n".to_owned(), "7".to_owned())
            ]
        );
        let f = frame(8, 0, &[]);
        assert_eq!(f, [8, 0, 0, 0, 0, 0, 0, FRAME_END]);
    }
}
