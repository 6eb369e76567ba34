//! A Redis connection speaking RESP2: enough for consumer groups (XGROUP,
//! XREADGROUP, XAUTOCLAIM, XACK), authentication and database selection.

use crate::SourceError;
use crate::wire::{Url, bad_url};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest a connection attempt (and authentication) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest bulk string or array accepted from a server.
const MAX_LEN: i64 = 512 << 20;

/// A reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Nil,
    Status(String),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Bulk(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::Status(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }

    pub fn into_array(self) -> Vec<Value> {
        match self {
            Value::Array(a) => a,
            _ => Vec::new(),
        }
    }
}

/// Where to connect and how to log in, parsed from `redis://` URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl Target {
    /// Parses `redis://[user[:password]@]host[:port][/db]`.
    pub fn parse(url: &str) -> Result<Self, SourceError> {
        if url.starts_with("rediss://") {
            return Err(bad_url(
                "redis",
                url,
                "TLS (rediss://) is not supported yet; use redis://",
            ));
        }
        let u = Url::parse(url, &["redis://"], "redis", "redis://host:port", 6379)?;
        // A userinfo without `:` is a password alone.
        let (user, password) = match (u.user, u.password) {
            (Some(p), None) => (None, Some(p)),
            (user, password) => (user.filter(|u| !u.is_empty()), password),
        };
        let db = match u.path.trim_matches('/') {
            "" => 0,
            d => d
                .parse()
                .map_err(|_| bad_url("redis", url, "the database is not a number"))?,
        };
        Ok(Self {
            host: u.host,
            port: u.port,
            user,
            password,
            db,
        })
    }
}

/// One connection.
pub struct Conn {
    io: BufReader<TcpStream>,
}

impl Conn {
    /// Connects, authenticates and selects the database.
    pub async fn connect(target: &Target) -> Result<Self, SourceError> {
        let work = async {
            let tcp = TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map_err(|e| {
                    SourceError::Unreachable(format!("{}:{}: {e}", target.host, target.port))
                })?;
            let _ = tcp.set_nodelay(true);
            let mut conn = Self {
                io: BufReader::new(tcp),
            };
            if let Some(password) = &target.password {
                let mut args: Vec<&[u8]> = vec![b"AUTH"];
                if let Some(user) = &target.user {
                    args.push(user.as_bytes());
                }
                args.push(password.as_bytes());
                conn.cmd(&args)
                    .await
                    .map_err(|e| SourceError::Auth(e.to_string()))?;
            }
            if target.db != 0 {
                conn.cmd(&[b"SELECT", target.db.to_string().as_bytes()])
                    .await?;
            }
            conn.cmd(&[b"PING"]).await?;
            Ok(conn)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, work)
            .await
            .map_err(|_| {
                SourceError::Unreachable(format!(
                    "{}:{} did not answer within {CONNECT_TIMEOUT:?}",
                    target.host, target.port
                ))
            })?
    }

    /// Sends one command and reads its reply; a server error is an `Err`.
    pub async fn cmd(&mut self, args: &[&[u8]]) -> Result<Value, SourceError> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.io.get_mut().write_all(&out).await.map_err(io)?;
        self.read().await
    }

    async fn line(&mut self) -> Result<String, SourceError> {
        let mut line = Vec::new();
        let n = self.io.read_until(b'\n', &mut line).await.map_err(io)?;
        if n == 0 {
            return Err(SourceError::Disconnected(
                "the server closed the connection".into(),
            ));
        }
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    fn read(
        &mut self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Value, SourceError>> + Send + '_>> {
        Box::pin(async move {
            let line = self.line().await?;
            let (kind, rest) = line.split_at(line.len().min(1));
            let len = || -> Result<i64, SourceError> {
                rest.parse::<i64>()
                    .ok()
                    .filter(|n| *n <= MAX_LEN)
                    .ok_or_else(|| SourceError::Protocol(format!("bad length `{rest}`")))
            };
            match kind {
                "+" => Ok(Value::Status(rest.to_owned())),
                "-" => Err(SourceError::Server(rest.to_owned())),
                ":" => Ok(Value::Int(len()?)),
                "$" => {
                    let n = len()?;
                    if n < 0 {
                        return Ok(Value::Nil);
                    }
                    let mut buf = vec![0u8; n as usize + 2];
                    self.io.read_exact(&mut buf).await.map_err(io)?;
                    buf.truncate(n as usize);
                    Ok(Value::Bulk(buf))
                }
                "*" => {
                    let n = len()?;
                    if n < 0 {
                        return Ok(Value::Nil);
                    }
                    let mut items = Vec::with_capacity(n.min(1024) as usize);
                    for _ in 0..n {
                        items.push(self.read().await?);
                    }
                    Ok(Value::Array(items))
                }
                _ => Err(SourceError::Protocol(format!("unexpected reply `{line}`"))),
            }
        })
    }
}

fn io(e: std::io::Error) -> SourceError {
    SourceError::Disconnected(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let t = Target::parse("redis://app:s3cret@cache.internal:6380/2").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.user.as_deref(),
                t.password.as_deref(),
                t.db
            ),
            ("cache.internal", 6380, Some("app"), Some("s3cret"), 2)
        );
        let t = Target::parse("redis://127.0.0.1").unwrap();
        assert_eq!((t.port, t.db, t.password), (6379, 0, None));
        let t = Target::parse("redis://:pw@h").unwrap();
        assert_eq!((t.user, t.password.as_deref()), (None, Some("pw")));
        for bad in [
            "http://x",
            "redis://",
            "redis://h:port",
            "redis://h/db",
            "rediss://h",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        let e = Target::parse("redis://u:hunter2@h:x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
