//! What the broker clients share: URL parsing, a big-endian reader, and
//! the reconnect loop of a consumer.

use crate::{RECONNECT_FIRST, RECONNECT_MAX, SourceError, StatusCell};
use std::future::Future;
use std::time::Instant;

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
/// waiting, so the next ones are already here when a slot frees up. With
/// one slot, one message: waiting ones could take the slot out of order.
pub(crate) fn room(concurrency: u32) -> usize {
    match concurrency {
        1 => 1,
        n => 2 * n as usize,
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
