//! A NATS client speaking the client protocol (text commands, headers,
//! no-responders): enough for core subscriptions, request/reply and the
//! JetStream API, which is request/reply on `$JS.API.…` subjects.
//!
//! One task reads the connection and routes each message to its
//! subscription's bounded channel; a full channel stops the reading, so a
//! slow consumer pushes back on the server instead of growing memory.

use crate::SourceError;
use crate::wire::{Url, Writer, bad_url};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot};

/// Longest a connection attempt (and the handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// NATS's default `max_payload`, for a server that does not say.
const DEFAULT_MAX_PAYLOAD: u64 = 1 << 20;

/// Largest message accepted from a server (its `max_payload` is 1 MiB by
/// default, 64 MiB at most).
const MAX_PAYLOAD: usize = 64 << 20;
/// Messages a subscription holds before the reader waits for it.
const SUBSCRIPTION_BUFFER: usize = 1024;

/// Where to connect and how to log in, parsed from `nats://` URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
}

impl Target {
    /// Parses `nats://[user:password@|token@]host[:port]`.
    pub fn parse(url: &str) -> Result<Self, SourceError> {
        let u = Url::parse(url, &["nats://"], "nats", "nats://host:port", 4222)?;
        if !u.path.trim_matches('/').is_empty() {
            return Err(bad_url("nats", url, "a nats url has no path"));
        }
        // A userinfo without `:` is a token.
        let (user, password, token) = match (u.user, u.password) {
            (Some(t), None) => (None, None, Some(t)),
            (user, password) => (user, password, None),
        };
        Ok(Self {
            host: u.host,
            port: u.port,
            user,
            password,
            token,
        })
    }
}

/// A message received on a subscription.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Msg {
    pub subject: String,
    pub reply: Option<String>,
    /// The status of a control message (`NATS/1.0 404 No Messages`).
    pub status: Option<u16>,
    pub description: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Msg {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The status, its description and the headers of an HMSG.
type HeaderBlock = (Option<u16>, String, Vec<(String, String)>);

/// Parses the header block of an HMSG: `NATS/1.0[ status[ description]]`
/// then `Name: value` lines.
fn parse_headers(block: &[u8]) -> Result<HeaderBlock, SourceError> {
    let text = String::from_utf8_lossy(block);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let rest = first
        .strip_prefix("NATS/1.0")
        .ok_or_else(|| SourceError::Protocol(format!("bad header line `{first}`")))?
        .trim();
    let (status, description) = match rest.split_once(' ') {
        Some((code, d)) => (code.parse().ok(), d.trim().to_owned()),
        None => (rest.parse().ok(), String::new()),
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok((status, description, headers))
}

type Subscriptions = Arc<Mutex<HashMap<u64, mpsc::Sender<Msg>>>>;
type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Msg>>>>;

/// A connected client. Dropping it closes the connection.
pub struct Client {
    writer: Arc<Writer>,
    subs: Subscriptions,
    pending: Pending,
    next: AtomicU64,
    inbox: String,
    closed: Arc<Mutex<Option<String>>>,
    reader: tokio::task::JoinHandle<()>,
    /// The largest message the server takes (its INFO's `max_payload`).
    max_payload: u64,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A name no other client uses: the process id, the time and a counter.
pub fn unique_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}{:x}{:x}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Client {
    /// Connects, logs in and waits for the server to accept (a PING
    /// answered by PONG), so bad credentials fail here.
    pub async fn connect(target: &Target, name: &str) -> Result<Self, SourceError> {
        let addr = format!("{}:{}", target.host, target.port);
        let handshake = async {
            let stream = TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map_err(|e| SourceError::Unreachable(format!("{addr} ({e})")))?;
            let _ = stream.set_nodelay(true);
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let info = read_line(&mut read).await?;
            let Some(info) = info.strip_prefix("INFO ") else {
                return Err(SourceError::Protocol(format!(
                    "{addr} did not greet as a NATS server"
                )));
            };
            let max_payload = serde_json::from_str::<serde_json::Value>(info)
                .ok()
                .and_then(|i| i.get("max_payload").and_then(serde_json::Value::as_u64))
                .unwrap_or(DEFAULT_MAX_PAYLOAD);
            let mut connect = serde_json::json!({
                "verbose": false,
                "pedantic": false,
                "lang": "rust",
                "version": env!("CARGO_PKG_VERSION"),
                "protocol": 1,
                "headers": true,
                "no_responders": true,
                "name": name,
            });
            if let (Some(user), Some(pass)) = (&target.user, &target.password) {
                connect["user"] = user.as_str().into();
                connect["pass"] = pass.as_str().into();
            }
            if let Some(token) = &target.token {
                connect["auth_token"] = token.as_str().into();
            }
            write
                .write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
                .await
                .map_err(|e| SourceError::Disconnected(e.to_string()))?;
            loop {
                let line = read_line(&mut read).await?;
                match line.as_str() {
                    "PONG" => return Ok((read, write, max_payload)),
                    "+OK" => {}
                    "PING" => {
                        let _ = write.write_all(b"PONG\r\n").await;
                    }
                    l if l.starts_with("-ERR") => {
                        let why = l.trim_start_matches("-ERR").trim().trim_matches('\'');
                        return Err(if why.to_ascii_lowercase().contains("author") {
                            SourceError::Auth(why.to_owned())
                        } else {
                            SourceError::Server(why.to_owned())
                        });
                    }
                    _ => {}
                }
            }
        };
        let (read, write, max_payload) =
            tokio::time::timeout(CONNECT_TIMEOUT, handshake)
                .await
                .map_err(|_| SourceError::Unreachable(format!("{addr} (timed out)")))??;
        let writer = Arc::new(Writer::new(write));
        let subs: Subscriptions = Default::default();
        let pending: Pending = Default::default();
        let closed: Arc<Mutex<Option<String>>> = Default::default();
        let inbox = format!("_INBOX.{}", unique_token());
        let reader = tokio::spawn(read_loop(
            read,
            writer.clone(),
            subs.clone(),
            pending.clone(),
            closed.clone(),
            format!("{inbox}.r."),
        ));
        let client = Self {
            writer,
            subs,
            pending,
            next: AtomicU64::new(1),
            inbox,
            closed,
            reader,
            max_payload,
        };
        // Replies to every request arrive on one wildcard subscription.
        let sid = client.next.fetch_add(1, Ordering::Relaxed);
        client
            .send(format!("SUB {}.r.* {sid}\r\n", client.inbox).into_bytes())
            .await?;
        Ok(client)
    }

    /// The largest message the server takes.
    pub fn max_payload(&self) -> u64 {
        self.max_payload
    }

    /// Why the connection closed, once it has.
    pub fn closed_error(&self) -> SourceError {
        let why = self
            .closed
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .unwrap_or_else(|| "the connection closed".into());
        SourceError::Disconnected(why)
    }

    async fn send(&self, bytes: Vec<u8>) -> Result<(), SourceError> {
        self.writer.send(&bytes).await
    }

    /// A subject under this client's inbox, for replies.
    pub fn inbox(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.inbox)
    }

    /// Subscribes to `subject` (in `queue` group, when given).
    pub async fn subscribe(
        &self,
        subject: &str,
        queue: Option<&str>,
    ) -> Result<mpsc::Receiver<Msg>, SourceError> {
        let sid = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        if let Ok(mut subs) = self.subs.lock() {
            subs.insert(sid, tx);
        }
        let line = match queue {
            Some(q) => format!("SUB {subject} {q} {sid}\r\n"),
            None => format!("SUB {subject} {sid}\r\n"),
        };
        self.send(line.into_bytes()).await?;
        Ok(rx)
    }

    /// Publishes `payload` to `subject`, asking for replies on `reply`.
    pub async fn publish(
        &self,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
    ) -> Result<(), SourceError> {
        // Written by hand: this runs once per acknowledgement.
        let reply = reply.unwrap_or("");
        let mut bytes = Vec::with_capacity(subject.len() + reply.len() + payload.len() + 32);
        bytes.extend_from_slice(b"PUB ");
        bytes.extend_from_slice(subject.as_bytes());
        bytes.push(b' ');
        if !reply.is_empty() {
            bytes.extend_from_slice(reply.as_bytes());
            bytes.push(b' ');
        }
        push_decimal(&mut bytes, payload.len());
        bytes.extend_from_slice(b"\r\n");
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(b"\r\n");
        self.send(bytes).await
    }

    /// Publishes `payload` with headers.
    pub async fn publish_with_headers(
        &self,
        subject: &str,
        headers: &[(&str, &str)],
        payload: &[u8],
    ) -> Result<(), SourceError> {
        let mut block = String::from("NATS/1.0\r\n");
        for (k, v) in headers {
            block.push_str(&format!("{k}: {v}\r\n"));
        }
        block.push_str("\r\n");
        let mut bytes = format!(
            "HPUB {subject} {} {}\r\n{block}",
            block.len(),
            block.len() + payload.len()
        )
        .into_bytes();
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(b"\r\n");
        self.send(bytes).await
    }

    /// Sends a request and waits for its reply. A status 503 (nobody
    /// listens on `subject`) is an error.
    pub async fn request(
        &self,
        subject: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Msg, SourceError> {
        let token = self.next.fetch_add(1, Ordering::Relaxed).to_string();
        let reply = format!("{}.r.{token}", self.inbox);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(token.clone(), tx);
        }
        let result = async {
            self.publish(subject, Some(&reply), payload).await?;
            match tokio::time::timeout(timeout, rx).await {
                Err(_) => Err(SourceError::Server(format!(
                    "no reply to {subject} within {timeout:?}"
                ))),
                Ok(Err(_)) => Err(self.closed_error()),
                Ok(Ok(m)) if m.status == Some(503) => {
                    Err(SourceError::Server(format!("nothing answers on {subject}")))
                }
                Ok(Ok(m)) => Ok(m),
            }
        }
        .await;
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&token);
        }
        result
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.closed.lock().map(|c| c.is_none()).unwrap_or(false)
    }
}

async fn read_line(read: &mut BufReader<OwnedReadHalf>) -> Result<String, SourceError> {
    let mut line = Vec::new();
    let n = read
        .take(64 * 1024)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| SourceError::Disconnected(e.to_string()))?;
    if n == 0 {
        return Err(SourceError::Disconnected(
            "the server closed the connection".into(),
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(SourceError::Protocol("a protocol line is too long".into()));
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

async fn read_exact(read: &mut BufReader<OwnedReadHalf>, n: usize) -> Result<Vec<u8>, SourceError> {
    if n > MAX_PAYLOAD {
        return Err(SourceError::Protocol(format!(
            "a message of {n} bytes is too large"
        )));
    }
    let mut buf = vec![0; n + 2];
    read.read_exact(&mut buf)
        .await
        .map_err(|e| SourceError::Disconnected(e.to_string()))?;
    buf.truncate(n);
    Ok(buf)
}

/// `MSG <subject> <sid> [reply] <bytes>` or
/// `HMSG <subject> <sid> [reply] <header bytes> <total bytes>`.
fn parse_msg_line(line: &str) -> Result<(String, u64, Option<String>, usize, usize), SourceError> {
    let bad = || SourceError::Protocol(format!("bad message line `{line}`"));
    let mut parts: Vec<&str> = line.split_ascii_whitespace().collect();
    let headers = parts.first() == Some(&"HMSG");
    let num = |s: Option<&str>| s.and_then(|s| s.parse::<usize>().ok()).ok_or_else(bad);
    let total = num(parts.pop())?;
    let header_len = if headers { num(parts.pop())? } else { 0 };
    if header_len > total {
        return Err(bad());
    }
    let (subject, sid, reply) = match parts.as_slice() {
        [_, s, sid] => (s, sid, None),
        [_, s, sid, r] => (s, sid, Some(r.to_string())),
        _ => return Err(bad()),
    };
    let sid = sid.parse().map_err(|_| bad())?;
    Ok((subject.to_string(), sid, reply, header_len, total))
}

async fn read_loop(
    mut read: BufReader<OwnedReadHalf>,
    writer: Arc<Writer>,
    subs: Subscriptions,
    pending: Pending,
    closed: Arc<Mutex<Option<String>>>,
    reply_prefix: String,
) {
    let result: Result<(), SourceError> = async {
        loop {
            let line = read_line(&mut read).await?;
            if line.starts_with("MSG ") || line.starts_with("HMSG ") {
                let (subject, sid, reply, header_len, total) = parse_msg_line(&line)?;
                let data = read_exact(&mut read, total).await?;
                let (status, description, headers) = if header_len > 0 {
                    parse_headers(&data[..header_len])?
                } else {
                    (None, String::new(), Vec::new())
                };
                let msg = Msg {
                    subject,
                    reply,
                    status,
                    description,
                    headers,
                    payload: data[header_len..].to_vec(),
                };
                if let Some(token) = msg.subject.strip_prefix(&reply_prefix) {
                    let waiter = pending.lock().ok().and_then(|mut p| p.remove(token));
                    if let Some(w) = waiter {
                        let _ = w.send(msg);
                    }
                    continue;
                }
                let tx = subs.lock().ok().and_then(|s| s.get(&sid).cloned());
                if let Some(tx) = tx {
                    // Waits while the subscriber is behind: backpressure.
                    let _ = tx.send(msg).await;
                }
            } else if line == "PING" {
                writer.send(b"PONG\r\n").await?;
            } else if let Some(err) = line.strip_prefix("-ERR") {
                let err = err.trim().trim_matches('\'').to_owned();
                // Errors that close the connection end it; the rest (such as
                // a permission violation on one subject) are logged.
                if err.to_ascii_lowercase().contains("permissions violation") {
                    tracing::warn!(error = %err, "the nats server refused an operation");
                } else {
                    return Err(SourceError::Server(err));
                }
            }
            // +OK, PONG and INFO need no answer.
        }
    }
    .await;
    let why = match result {
        Err(e) => e.to_string(),
        Ok(()) => "the connection closed".into(),
    };
    if let Ok(mut c) = closed.lock() {
        *c = Some(why);
    }
    // Subscribers see their channel end; requesters see their reply dropped.
    if let Ok(mut s) = subs.lock() {
        s.clear();
    }
    if let Ok(mut p) = pending.lock() {
        p.clear();
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let t = Target::parse("nats://app:pw@broker:4223").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("broker", 4223));
        assert_eq!(t.user.as_deref(), Some("app"));
        assert_eq!(t.password.as_deref(), Some("pw"));
        let t = Target::parse("nats://tok@127.0.0.1").unwrap();
        assert_eq!(t.port, 4222);
        assert_eq!(t.token.as_deref(), Some("tok"));
        for bad in ["redis://h", "nats://", "nats://h:port", "nats://h/x"] {
            let e = Target::parse(bad).unwrap_err().to_string();
            assert!(e.contains("invalid nats url"), "{e}");
        }
        let e = Target::parse("nats://u:secret@h:x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn decimals_are_written() {
        for n in [0, 7, 10, 4096, usize::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
    }

    #[test]
    fn message_lines_and_headers_parse() {
        assert_eq!(
            parse_msg_line("MSG a.b 3 12").unwrap(),
            ("a.b".into(), 3, None, 0, 12)
        );
        assert_eq!(
            parse_msg_line("HMSG a 1 $JS.ACK.x 30 42").unwrap(),
            ("a".into(), 1, Some("$JS.ACK.x".into()), 30, 42)
        );
        assert!(parse_msg_line("HMSG a 1 40 30").is_err());
        assert!(parse_msg_line("MSG a").is_err());
        let (status, description, headers) =
            parse_headers(b"NATS/1.0 404 No Messages\r\n\r\n").unwrap();
        assert_eq!((status, description.as_str()), (Some(404), "No Messages"));
        assert!(headers.is_empty());
        let (status, _, headers) =
            parse_headers(b"NATS/1.0\r\ntraceparent: 00-ab-cd-01\r\nA: b\r\n\r\n").unwrap();
        assert_eq!(status, None);
        assert_eq!(headers[0], ("traceparent".into(), "00-ab-cd-01".into()));
    }
}
