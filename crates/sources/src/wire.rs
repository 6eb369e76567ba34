//! What the broker clients share: URL parsing, a big-endian reader, the
//! gathering writer of a connection, and the reconnect loop of a consumer.

use crate::{RECONNECT_FIRST, RECONNECT_MAX, SourceError, StatusCell};
use std::future::Future;
use std::sync::Mutex;
use std::time::Instant;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;

/// The parts of `scheme://[user[:password]@]host[:port][/path][?query]`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Url {
    /// The userinfo before its first `:` (all of it without one), decoded.
    pub user: Option<String>,
    /// The userinfo after its first `:`, decoded.
    pub password: Option<String>,
    pub host: String,
    pub port: u16,
    /// After the first `/`, without the query; not decoded.
    pub path: String,
}

/// An error about `url` (shown without its password).
pub(crate) fn bad_url(kind: &str, url: &str, why: &str) -> SourceError {
    SourceError::Config(format!(
        "invalid {kind} url `{}`: {why}",
        nimbus_manifest::source::redact(url)
    ))
}

/// Percent-decoding, for names and passwords in URLs.
pub(crate) fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Url {
    /// Parses a URL with one of `schemes`; `kind` and `form` name it in
    /// errors.
    pub fn parse(
        url: &str,
        schemes: &[&str],
        kind: &str,
        form: &str,
        default_port: u16,
    ) -> Result<Self, SourceError> {
        let bad = |why: &str| bad_url(kind, url, why);
        let rest = schemes
            .iter()
            .find_map(|s| url.strip_prefix(s))
            .ok_or_else(|| bad(&format!("write {form}")))?;
        let rest = rest.split('?').next().unwrap_or(rest);
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p.to_owned()),
            None => (rest, String::new()),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo.map(|u| u.split_once(':')) {
            None => (None, None),
            Some(Some((u, p))) => (Some(decode(u)), Some(decode(p))),
            Some(None) => (userinfo.map(decode), None),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse()
                    .map_err(|_| bad(&format!("`{p}` is not a port number")))?,
            ),
            _ => (hostport, default_port),
        };
        if host.is_empty() {
            return Err(bad("the host is missing"));
        }
        Ok(Self {
            user,
            password,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            path,
        })
    }
}

/// The connection's sending half. Concurrent sends are gathered: each
/// appends its bytes to a queue, and whoever then holds the socket writes
/// everything queued in one system call, so a busy consumer's
/// acknowledgements leave in batches instead of one write each. A send
/// returns once its own bytes were written, or with the error of the write
/// that carried them.
pub(crate) struct Writer {
    socket: tokio::sync::Mutex<OwnedWriteHalf>,
    queue: Mutex<Queued>,
}

#[derive(Default)]
struct Queued {
    bytes: Vec<u8>,
    /// Sends queued so far, and how many of them are written.
    appended: u64,
    written: u64,
    /// Why the connection's last write failed.
    failed: Option<String>,
}

impl Writer {
    pub(crate) fn new(socket: OwnedWriteHalf) -> Self {
        Self {
            socket: tokio::sync::Mutex::new(socket),
            queue: Mutex::new(Queued::default()),
        }
    }

    pub(crate) async fn send(&self, bytes: &[u8]) -> Result<(), SourceError> {
        let poisoned = || SourceError::Disconnected("the connection's writer failed".into());
        let mine = {
            let mut q = self.queue.lock().map_err(|_| poisoned())?;
            q.bytes.extend_from_slice(bytes);
            q.appended += 1;
            q.appended
        };
        // Let the other ready tasks queue theirs first: a consumer's
        // acknowledgements then share a write.
        tokio::task::yield_now().await;
        let mut socket = self.socket.lock().await;
        let (batch, upto) = {
            let mut q = self.queue.lock().map_err(|_| poisoned())?;
            if q.written >= mine {
                return Ok(());
            }
            if let Some(why) = &q.failed {
                return Err(SourceError::Disconnected(why.clone()));
            }
            (std::mem::take(&mut q.bytes), q.appended)
        };
        let result = socket.write_all(&batch).await;
        let mut q = self.queue.lock().map_err(|_| poisoned())?;
        match result {
            Ok(()) => {
                q.written = upto;
                Ok(())
            }
            Err(e) => {
                q.failed = Some(e.to_string());
                Err(SourceError::Disconnected(e.to_string()))
            }
        }
    }
}

/// Reads big-endian numbers and byte runs off a message.
pub(crate) struct Cursor<'a> {
    pub b: &'a [u8],
    pub at: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Self { b, at: 0 }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], SourceError> {
        let s = self.b.get(self.at..self.at + n).ok_or_else(|| {
            SourceError::Protocol("a message from the broker is cut short".into())
        })?;
        self.at += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, SourceError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, SourceError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, SourceError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, SourceError> {
        Ok(((self.u32()? as u64) << 32) | self.u32()? as u64)
    }
}

/// How many messages a consumer holds: those running and as many again
/// waiting, so the next ones are already here when a slot frees up. A
/// consumer that pulls whole batches (JetStream: `batch`, the size of one
/// pull; 0 for the others) holds twice the larger of the two and pulls
/// once half is free, so a pull fetches a whole batch while the other half
/// keeps the slots busy. With one slot, one message: waiting ones could
/// take the slot out of order.
pub(crate) fn room(concurrency: u32, batch: u32) -> usize {
    match concurrency {
        1 => 1,
        n => 2 * n.max(batch) as usize,
    }
}

/// Runs `session` again and again until the source is dropped: a session
/// returns only on an error, which is reported in the source's status and
/// logged, then retried after a backoff doubling from [`RECONNECT_FIRST`]
/// to [`RECONNECT_MAX`] (and starting over after a session that lasted).
pub(crate) async fn reconnecting<F, Fut>(
    kind: &str,
    function: &str,
    what: &str,
    status: StatusCell,
    mut session: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), SourceError>>,
{
    let mut backoff = RECONNECT_FIRST;
    loop {
        let started = Instant::now();
        if let Err(e) = session().await {
            status.failed(&e);
            tracing::warn!(function = %function, source = %what, error = %e, retry_in = ?backoff, "{kind} source disconnected");
        }
        if started.elapsed() > RECONNECT_MAX {
            backoff = RECONNECT_FIRST;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// Aborts a background task (a pinger, a status ticker) when the session
/// that owns it ends.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    #[test]
    fn room_fits_a_whole_read_in_each_half() {
        // One slot: one message, so order holds.
        assert_eq!(room(1, 16), 1);
        // A pushing broker: the running ones and as many again.
        assert_eq!(room(8, 0), 16);
        // A pulling consumer: each half holds a whole pull...
        assert_eq!(room(4, 16), 32);
        // ...or the running ones, whichever is more.
        assert_eq!(room(64, 16), 128);
    }

    /// Concurrent sends share writes, yet each one's bytes arrive whole
    /// and once; after the peer is gone a send says so.
    #[tokio::test]
    async fn gathered_sends_arrive_whole_and_failures_are_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_read, write) = client.unwrap().into_split();
        let (mut peer, _) = server.unwrap();
        let writer = Arc::new(Writer::new(write));
        let sends: Vec<_> = (0..200)
            .map(|i| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.send(format!("<{i:03}>").as_bytes()).await })
            })
            .collect();
        for s in sends {
            s.await.unwrap().unwrap();
        }
        let mut got = vec![0u8; 200 * 5];
        tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut got))
            .await
            .expect("every send's bytes arrive")
            .unwrap();
        let mut seen: Vec<&[u8]> = got.chunks(5).collect();
        seen.sort();
        let want: Vec<String> = (0..200).map(|i| format!("<{i:03}>")).collect();
        assert_eq!(seen, want.iter().map(|w| w.as_bytes()).collect::<Vec<_>>());

        drop(peer);
        let mut failed = false;
        for _ in 0..50 {
            if writer.send(&[b'x'; 4096]).await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(failed, "sends to a closed peer kept succeeding");
    }

    #[test]
    fn urls_split() {
        let u = Url::parse(
            "x://a%40b:p%3Aw@[::1]:99/db/x?q=1",
            &["x://"],
            "x",
            "x://h",
            1,
        )
        .unwrap();
        assert_eq!(u.user.as_deref(), Some("a@b"));
        assert_eq!(u.password.as_deref(), Some("p:w"));
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 99, "db/x")
        );
        let u = Url::parse("x://tok@h", &["x://"], "x", "x://h", 7).unwrap();
        assert_eq!(
            (u.user.as_deref(), u.password, u.port),
            (Some("tok"), None, 7)
        );
        let e = Url::parse("y://h", &["x://"], "x", "x://h", 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid x url") && e.contains("write x://h"),
            "{e}"
        );
        let e = Url::parse("x://u:secret@h:port", &["x://"], "x", "x://h", 1)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
    }
}
