//! A small HTTP/1.1 client for the admin API (and for tests that talk to a
//! node over real sockets): one connection per request; bodies in memory,
//! except objects, which stream both ways.

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use nimbus_api::{ErrorResponse, NODE_FILE, NodeInfo, TOKEN_FILE};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;
use std::time::Duration;

/// A response, whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Encodes `text` for a query value: unreserved characters and those in
/// `keep` stay, the rest become `%XX`.
pub fn percent_encode(text: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits `http://host:port/prefix` into the address to dial and the path
/// prefix.
fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("unsupported URL `{url}`: the admin API is reached over plain http://HOST:PORT");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() {
        bail!("URL `{url}` has no host");
    }
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    // A base URL's trailing slash goes; a query is kept as written.
    let path = if path.contains('?') {
        path
    } else {
        path.trim_end_matches('/')
    };
    Ok((authority, path.to_owned()))
}

/// Opens a request to `url` (`http://host:port/path`) and returns the
/// response head with the body still to read.
async fn open(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let length = body.len() as u64;
    open_body(method, url, headers, Full::new(body), Some(length)).await
}

/// Like [`open`], with a body that streams (`length` is sent as
/// `Content-Length` when known, else the body is chunked).
async fn open_body<B>(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: B,
    length: Option<u64>,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (authority, path) = split_url(url)?;
    let path = if path.is_empty() {
        "/".to_owned()
    } else {
        path
    };
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake failed")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path.as_str())
        .header(header::HOST, authority.as_str());
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    if let Some(length) = length {
        builder = builder.header(header::CONTENT_LENGTH, length);
    }
    let request = builder.body(body).context("invalid request")?;
    sender.send_request(request).await.context("request failed")
}

/// A request body read from a file or stdin on a thread of its own, in
/// chunks, so an upload never sits in memory whole.
pub struct ReadBody {
    chunks: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
}

impl ReadBody {
    /// Chunks read from `reader`, at most a few in flight.
    pub fn spawn(mut reader: impl std::io::Read + Send + 'static) -> Self {
        const CHUNK: usize = 256 << 10;
        let (tx, chunks) = tokio::sync::mpsc::channel(4);
        std::thread::spawn(move || {
            loop {
                let mut buf = vec![0u8; CHUNK];
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        break;
                    }
                }
            }
        });
        Self { chunks }
    }
}

impl hyper::body::Body for ReadBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.chunks
            .poll_recv(cx)
            .map(|chunk| chunk.map(|r| r.map(hyper::body::Frame::data)))
    }
}

/// Reads a response's (small) body whole into a [`Reply`].
pub async fn whole(response: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<Reply> {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .context("reading the response failed")?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Sends one request to `url` (`http://host:port/path`).
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    let work = async { whole(open(method, url, headers, body).await?).await };
    tokio::time::timeout(timeout, work)
        .await
        .with_context(|| format!("no answer from {url} within {timeout:?}"))?
}

/// Sends a GET and hands each line of the (streaming) answer to `each` as
/// it arrives, until the server ends it. A non-2xx answer is an error.
pub async fn stream_lines(
    url: &str,
    headers: &[(&str, &str)],
    mut each: impl FnMut(&str),
) -> anyhow::Result<()> {
    let response = open(Method::GET, url, headers, Bytes::new()).await?;
    let (parts, mut body) = response.into_parts();
    if !parts.status.is_success() {
        let bytes = body.collect().await?.to_bytes();
        return decode::<serde_json::Value>(Reply {
            status: parts.status,
            headers: parts.headers,
            body: bytes,
        })
        .map(|_| ());
    }
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the stream broke")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            each(String::from_utf8_lossy(&line[..nl]).trim_end_matches('\r'));
        }
    }
    Ok(())
}

/// Where the admin API is and how to authenticate.
#[derive(Clone, Debug)]
pub struct Admin {
    pub url: String,
    pub token: String,
    pub timeout: Duration,
}

impl Admin {
    /// Finds the admin API: `url`/`token` when given (flags or
    /// `NIMBUS_URL`/`NIMBUS_TOKEN`), else the local node described in
    /// `data_dir`.
    pub fn discover(
        url: Option<String>,
        token: Option<String>,
        data_dir: &Path,
    ) -> anyhow::Result<Self> {
        let url = match url {
            Some(url) => url,
            None => {
                let path = data_dir.join(NODE_FILE);
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "no local node found ({} is missing): start one with `nimbus up`, or set NIMBUS_URL and NIMBUS_TOKEN",
                        path.display()
                    )
                })?;
                let info: NodeInfo = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a node description", path.display()))?;
                info.admin_url
            }
        };
        let token = match token {
            Some(token) => token,
            None => {
                let path = data_dir.join(TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "cannot read the admin token {}: set NIMBUS_TOKEN or pass --data-dir",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_owned()
            }
        };
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            token,
            timeout: Duration::from_secs(600),
        })
    }

    /// Sends a request with the token; returns the raw reply.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> anyhow::Result<Reply> {
        let auth = format!("Bearer {}", self.token);
        send(
            method,
            &format!("{}{path}", self.url),
            &[("authorization", &auth), ("content-type", content_type)],
            body,
            self.timeout,
        )
        .await
        .with_context(|| format!("cannot reach the admin API at {}", self.url))
    }

    /// Sends a request with the token and extra headers.
    pub async fn raw_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<Reply> {
        let auth = format!("Bearer {}", self.token);
        let mut all = vec![("authorization", auth.as_str())];
        all.extend_from_slice(headers);
        send(
            method,
            &format!("{}{path}", self.url),
            &all,
            body,
            self.timeout,
        )
        .await
        .with_context(|| format!("cannot reach the admin API at {}", self.url))
    }

    /// Sends a request whose body streams and returns the response head,
    /// with its body still to read. The timeout covers the head only when
    /// `head_timeout` is set: an upload's head comes after its whole body,
    /// and a download's body may take longer than any fixed timeout.
    pub async fn open_stream<B>(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: B,
        length: Option<u64>,
        head_timeout: bool,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let auth = format!("Bearer {}", self.token);
        let mut all = vec![("authorization", auth.as_str())];
        all.extend_from_slice(headers);
        let url = format!("{}{path}", self.url);
        let open = open_body(method, &url, &all, body, length);
        let opened = if head_timeout {
            tokio::time::timeout(self.timeout, open)
                .await
                .with_context(|| format!("no answer from {url} within {:?}", self.timeout))?
        } else {
            open.await
        };
        opened.with_context(|| format!("cannot reach the admin API at {}", self.url))
    }

    /// GETs `path` and hands each line of the streaming answer to `each`.
    pub async fn stream(&self, path: &str, each: impl FnMut(&str)) -> anyhow::Result<()> {
        let auth = format!("Bearer {}", self.token);
        stream_lines(
            &format!("{}{path}", self.url),
            &[("authorization", &auth), ("accept", "text/event-stream")],
            each,
        )
        .await
        .with_context(|| format!("cannot follow {path} on {}", self.url))
    }

    /// Sends JSON (or nothing) and decodes the JSON answer, turning API
    /// errors into readable ones.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let reply = self.raw(method, path, "application/json", bytes).await?;
        decode(reply)
    }
}

/// Decodes a JSON reply, or explains the API error it carries.
pub fn decode<T: DeserializeOwned>(reply: Reply) -> anyhow::Result<T> {
    if !reply.status.is_success() {
        if let Ok(err) = serde_json::from_slice::<ErrorResponse>(&reply.body) {
            bail!("{} ({})", err.error.message, reply.status);
        }
        bail!("the node answered {}: {}", reply.status, reply.text());
    }
    serde_json::from_slice(&reply.body)
        .with_context(|| format!("unexpected answer from the node: {}", reply.text()))
}
