//! A PostgreSQL connection speaking the frontend/backend protocol 3.0:
//! startup, authentication (trust, password, SCRAM-SHA-256), simple
//! queries with rows in text form, and the streaming replication protocol
//! of a logical slot (`START_REPLICATION`: changes as they commit, the
//! client confirming how far it has handled them).

use crate::SourceError;
use crate::wire::{Url, bad_url, decode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest a connection attempt (and authentication) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message accepted from a server.
const MAX_MESSAGE: usize = 256 << 20;

/// Where to connect and how to log in, parsed from `postgres://` URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
}

impl Target {
    /// Parses `postgres://[user[:password]@]host[:port]/database`.
    pub fn parse(url: &str) -> Result<Self, SourceError> {
        let u = Url::parse(
            url,
            &["postgres://", "postgresql://"],
            "postgres",
            "postgres://user@host:port/database",
            5432,
        )?;
        if u.path.is_empty() {
            return Err(bad_url(
                "postgres",
                url,
                "the database name is missing (…/database)",
            ));
        }
        Ok(Self {
            host: u.host,
            port: u.port,
            user: u.user.unwrap_or_else(|| "postgres".to_owned()),
            password: u.password,
            database: decode(&u.path),
        })
    }
}

/// An error the server reported: its SQLSTATE and message.
fn server_error(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    for field in body.split(|b| *b == 0) {
        if let Some((&kind, value)) = field.split_first() {
            let value = String::from_utf8_lossy(value).into_owned();
            match kind {
                b'C' => code = value,
                b'M' => message = value,
                _ => {}
            }
        }
    }
    (code, message)
}

/// A query the server refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    pub code: String,
    pub message: String,
}

/// A text-form row: one value per column, `None` for NULL.
pub type Row = Vec<Option<String>>;

/// An open connection.
pub struct Conn {
    stream: BufReader<TcpStream>,
}

/// A frontend message: its type byte, then its length and body.
fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// The client side of SCRAM-SHA-256 (RFC 7677), without channel binding.
struct Scram {
    nonce: String,
    first_bare: String,
    salted: Vec<u8>,
    auth_message: String,
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, data).as_ref().to_vec()
}

impl Scram {
    fn new() -> Result<Self, SourceError> {
        let mut raw = [0u8; 18];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| SourceError::Protocol("no randomness for SCRAM".into()))?;
        let nonce = B64.encode(raw);
        Ok(Self {
            first_bare: format!("n=,r={nonce}"),
            nonce,
            salted: Vec::new(),
            auth_message: String::new(),
        })
    }

    fn client_first(&self) -> String {
        format!("n,,{}", self.first_bare)
    }

    fn client_final(&mut self, server_first: &str, password: &str) -> Result<String, SourceError> {
        let bad = || SourceError::Protocol("a malformed SCRAM challenge".into());
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in server_first.split(',') {
            match part.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v.to_owned()),
                Some(("s=", v)) => salt = B64.decode(v).ok(),
                Some(("i=", v)) => iterations = v.parse::<u32>().ok(),
                _ => {}
            }
        }
        let (nonce, salt, iterations) = (
            nonce.ok_or_else(bad)?,
            salt.ok_or_else(bad)?,
            iterations.ok_or_else(bad)?,
        );
        if !nonce.starts_with(&self.nonce) {
            return Err(bad());
        }
        let rounds = std::num::NonZeroU32::new(iterations).ok_or_else(bad)?;
        let mut salted = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            rounds,
            &salt,
            password.as_bytes(),
            &mut salted,
        );
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = ring::digest::digest(&ring::digest::SHA256, &client_key);
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{server_first},{without_proof}", self.first_bare);
        let signature = hmac(stored_key.as_ref(), self.auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(a, b)| a ^ b)
            .collect();
        self.salted = salted.to_vec();
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    fn verify(&self, server_final: &str) -> bool {
        let server_key = hmac(&self.salted, b"Server Key");
        let expected = hmac(&server_key, self.auth_message.as_bytes());
        server_final
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .is_some_and(|v| v == expected)
    }
}

impl Conn {
    /// Connects and logs in.
    pub async fn connect(target: &Target) -> Result<Self, SourceError> {
        Self::connect_as(target, false).await
    }

    /// Connects as a logical replication client of the database, which
    /// can [`Conn::start_replication`].
    pub async fn connect_replication(target: &Target) -> Result<Self, SourceError> {
        Self::connect_as(target, true).await
    }

    async fn connect_as(target: &Target, replication: bool) -> Result<Self, SourceError> {
        let addr = format!("{}:{}", target.host, target.port);
        tokio::time::timeout(CONNECT_TIMEOUT, Self::open(target, &addr, replication))
            .await
            .map_err(|_| SourceError::Unreachable(format!("{addr} (timed out)")))?
    }

    async fn open(target: &Target, addr: &str, replication: bool) -> Result<Self, SourceError> {
        let stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| SourceError::Unreachable(format!("{addr} ({e})")))?;
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            stream: BufReader::new(stream),
        };
        let mut startup = 196608u32.to_be_bytes().to_vec(); // protocol 3.0
        for (k, v) in [
            ("user", target.user.as_str()),
            ("database", target.database.as_str()),
            ("application_name", "nimbus"),
            ("client_encoding", "UTF8"),
        ] {
            cstr(&mut startup, k);
            cstr(&mut startup, v);
        }
        if replication {
            cstr(&mut startup, "replication");
            cstr(&mut startup, "database");
        }
        startup.push(0);
        let mut first = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
        first.extend_from_slice(&startup);
        conn.write(&first).await?;
        let password = || {
            target.password.clone().ok_or_else(|| {
                SourceError::Auth(format!(
                    "{addr} asks for a password; put it in the url (postgres://user:password@…)"
                ))
            })
        };
        let mut scram: Option<Scram> = None;
        loop {
            let (kind, body) = conn.read().await?;
            match kind {
                b'R' => {
                    let code = body
                        .get(..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    match code {
                        Some(0) => {}
                        Some(3) => {
                            let mut m = Vec::new();
                            cstr(&mut m, &password()?);
                            conn.write(&message(b'p', &m)).await?;
                        }
                        Some(10) => {
                            let s = Scram::new()?;
                            let first = s.client_first();
                            let mut m = Vec::new();
                            cstr(&mut m, "SCRAM-SHA-256");
                            m.extend_from_slice(&(first.len() as u32).to_be_bytes());
                            m.extend_from_slice(first.as_bytes());
                            conn.write(&message(b'p', &m)).await?;
                            scram = Some(s);
                        }
                        Some(11) => {
                            let s = scram.as_mut().ok_or_else(|| {
                                SourceError::Protocol("SCRAM out of order".into())
                            })?;
                            let challenge = String::from_utf8_lossy(&body[4..]).into_owned();
                            let answer = s.client_final(&challenge, &password()?)?;
                            conn.write(&message(b'p', answer.as_bytes())).await?;
                        }
                        Some(12) => {
                            let ok = scram
                                .as_ref()
                                .is_some_and(|s| s.verify(&String::from_utf8_lossy(&body[4..])));
                            if !ok {
                                return Err(SourceError::Auth(format!(
                                    "{addr} could not prove it knows the password"
                                )));
                            }
                        }
                        Some(other) => {
                            return Err(SourceError::Auth(format!(
                                "{addr} asks for an authentication method Nimbus does not speak ({other}); use scram-sha-256, password or trust"
                            )));
                        }
                        None => {
                            return Err(SourceError::Protocol(
                                "a short authentication message".into(),
                            ));
                        }
                    }
                }
                b'E' => {
                    let (code, msg) = server_error(&body);
                    return Err(if code.starts_with("28") {
                        SourceError::Auth(msg)
                    } else {
                        SourceError::Server(msg)
                    });
                }
                b'Z' => return Ok(conn),
                // Parameter status, backend key data, notices.
                _ => {}
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), SourceError> {
        self.stream
            .get_mut()
            .write_all(bytes)
            .await
            .map_err(|e| SourceError::Disconnected(e.to_string()))
    }

    async fn read(&mut self) -> Result<(u8, Vec<u8>), SourceError> {
        let broken = |e: std::io::Error| SourceError::Disconnected(e.to_string());
        let kind = self.stream.read_u8().await.map_err(broken)?;
        let len = self.stream.read_u32().await.map_err(broken)? as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            return Err(SourceError::Protocol(format!("a message of {len} bytes")));
        }
        let mut body = vec![0; len - 4];
        self.stream.read_exact(&mut body).await.map_err(broken)?;
        Ok((kind, body))
    }

    /// Runs `sql` (one statement) and returns its rows; a statement the
    /// server refuses is the inner error.
    pub async fn query(&mut self, sql: &str) -> Result<Result<Vec<Row>, QueryError>, SourceError> {
        let mut body = Vec::new();
        cstr(&mut body, sql);
        self.write(&message(b'Q', &body)).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (kind, body) = self.read().await?;
            match kind {
                b'D' => rows.push(parse_row(&body)?),
                b'E' => {
                    let (code, message) = server_error(&body);
                    error = Some(QueryError { code, message });
                }
                b'Z' => {
                    return Ok(match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    });
                }
                _ => {}
            }
        }
    }

    /// [`Conn::query`], with a refusal as a server error.
    pub async fn execute(&mut self, sql: &str) -> Result<Vec<Row>, SourceError> {
        self.query(sql)
            .await?
            .map_err(|e| SourceError::Server(e.message))
    }
}

/// What a replication stream carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Replicated {
    /// One decoded change message (`XLogData`) at `lsn`.
    Data { lsn: u64, data: Vec<u8> },
    /// The server's position; it wants a status update soon when
    /// `reply` is set.
    Keepalive { wal_end: u64, reply: bool },
}

/// Microseconds since 2000-01-01, PostgreSQL's epoch.
fn pg_now() -> i64 {
    const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            d.as_micros() as i64 - (PG_EPOCH_UNIX_SECS as i64 * 1_000_000)
        })
}

/// A standby status update: everything up to `lsn` is handled and may be
/// discarded from the slot.
fn status_update(lsn: u64) -> Vec<u8> {
    let mut body = vec![b'r'];
    for v in [lsn, lsn, lsn] {
        body.extend_from_slice(&v.to_be_bytes());
    }
    body.extend_from_slice(&pg_now().to_be_bytes());
    body.push(0);
    message(b'd', &body)
}

fn replicated(body: &[u8]) -> Result<Replicated, SourceError> {
    let short = || SourceError::Protocol("a short replication message".into());
    let u64_at = |at: usize| -> Result<u64, SourceError> {
        body.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(short)
    };
    match body.first() {
        Some(b'w') => Ok(Replicated::Data {
            lsn: u64_at(1)?,
            data: body.get(25..).ok_or_else(short)?.to_vec(),
        }),
        Some(b'k') => Ok(Replicated::Keepalive {
            wal_end: u64_at(1)?,
            reply: *body.get(17).ok_or_else(short)? == 1,
        }),
        other => Err(SourceError::Protocol(format!(
            "an unknown replication message {other:?}"
        ))),
    }
}

/// What a replication stream reads from: the bytes the connection had
/// already buffered, then the socket.
type StreamReader =
    BufReader<tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::net::tcp::OwnedReadHalf>>;

/// Reads a replication stream.
pub struct ReplicationStream {
    reader: StreamReader,
}

/// Tells the server how far the client has got; shared with a timer so
/// the server hears from the client while a change is being handled.
#[derive(Clone)]
pub struct Feedback {
    writer: std::sync::Arc<crate::wire::Writer>,
}

impl Feedback {
    /// Confirms everything up to `lsn`.
    pub async fn confirm(&self, lsn: u64) -> Result<(), SourceError> {
        self.writer.send(&status_update(lsn)).await
    }
}

impl Conn {
    /// Starts streaming the logical slot `slot` with pgoutput, from where
    /// it was last confirmed. Needs a [`Conn::connect_replication`]
    /// connection.
    pub async fn start_replication(
        mut self,
        slot: &str,
        publication: &str,
    ) -> Result<(ReplicationStream, Feedback), SourceError> {
        let mut body = Vec::new();
        cstr(
            &mut body,
            &format!(
                "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {})",
                ident(slot),
                literal(&ident(publication))
            ),
        );
        self.write(&message(b'Q', &body)).await?;
        loop {
            let (kind, body) = self.read().await?;
            match kind {
                // CopyBothResponse: the stream begins.
                b'W' => break,
                b'E' => return Err(SourceError::Server(server_error(&body).1)),
                _ => {}
            }
        }
        // The first changes may have arrived with the CopyBothResponse:
        // they are in the buffer, and must be read before the socket.
        let buffered = self.stream.buffer().to_vec();
        let (read, write) = self.stream.into_inner().into_split();
        Ok((
            ReplicationStream {
                reader: BufReader::new(std::io::Cursor::new(buffered).chain(read)),
            },
            Feedback {
                writer: std::sync::Arc::new(crate::wire::Writer::new(write)),
            },
        ))
    }
}

impl ReplicationStream {
    /// The next message of the stream.
    pub async fn next(&mut self) -> Result<Replicated, SourceError> {
        loop {
            let broken = |e: std::io::Error| SourceError::Disconnected(e.to_string());
            let kind = self.reader.read_u8().await.map_err(broken)?;
            let len = self.reader.read_u32().await.map_err(broken)? as usize;
            if !(4..=MAX_MESSAGE).contains(&len) {
                return Err(SourceError::Protocol(format!("a message of {len} bytes")));
            }
            let mut body = vec![0; len - 4];
            self.reader.read_exact(&mut body).await.map_err(broken)?;
            match kind {
                b'd' => return replicated(&body),
                b'E' => return Err(SourceError::Server(server_error(&body).1)),
                b'c' | b'C' | b'Z' => {
                    return Err(SourceError::Disconnected(
                        "the server ended the replication stream".into(),
                    ));
                }
                // Notices, parameter changes.
                _ => {}
            }
        }
    }
}

fn parse_row(body: &[u8]) -> Result<Row, SourceError> {
    let short = || SourceError::Protocol("a data row is cut short".into());
    let n = u16::from_be_bytes([
        *body.first().ok_or_else(short)?,
        *body.get(1).ok_or_else(short)?,
    ]);
    let mut at = 2;
    let mut row = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let len = body.get(at..at + 4).ok_or_else(short)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        at += 4;
        if len < 0 {
            row.push(None);
            continue;
        }
        let value = body.get(at..at + len as usize).ok_or_else(short)?;
        row.push(Some(String::from_utf8_lossy(value).into_owned()));
        at += len as usize;
    }
    Ok(row)
}

/// `value` as a SQL string literal.
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// `name` as a SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that logs the client in, answers START_REPLICATION and
    /// sends the first change in the same write: the change must not be
    /// lost with the connection's read buffer.
    #[tokio::test]
    async fn changes_sent_with_the_stream_start_are_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let _ = s.read(&mut buf).await.unwrap(); // startup
            let mut hello = message(b'R', &0u32.to_be_bytes());
            hello.extend(message(b'Z', b"I"));
            s.write_all(&hello).await.unwrap();
            let _ = s.read(&mut buf).await.unwrap(); // START_REPLICATION
            let mut w = vec![b'w'];
            w.extend_from_slice(&[0; 24]);
            w.extend_from_slice(b"B-first");
            let mut burst = message(b'W', &[0, 0, 0]);
            burst.extend(message(b'd', &w));
            s.write_all(&burst).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let target = Target::parse(&format!("postgres://u@127.0.0.1:{port}/db")).unwrap();
        let conn = Conn::connect_replication(&target).await.unwrap();
        let (mut stream, _feedback) = conn.start_replication("s", "s").await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(2), stream.next())
            .await
            .expect("the first change was lost")
            .unwrap();
        assert_eq!(
            first,
            Replicated::Data {
                lsn: 0,
                data: b"B-first".to_vec()
            }
        );
        server.abort();
    }

    #[test]
    fn urls_parse() {
        let t = Target::parse("postgres://app:p%40ss@db:5433/shop").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.database.as_str()),
            ("db", 5433, "shop")
        );
        assert_eq!(
            (t.user.as_str(), t.password.as_deref()),
            ("app", Some("p@ss"))
        );
        let t = Target::parse("postgresql://127.0.0.1/test?sslmode=disable").unwrap();
        assert_eq!((t.user.as_str(), t.port), ("postgres", 5432));
        for bad in [
            "mysql://h/db",
            "postgres://h",
            "postgres://h/",
            "postgres://h:x/db",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replication_messages_parse() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x16B3748u64.to_be_bytes());
        w.extend_from_slice(&0x16B3800u64.to_be_bytes());
        w.extend_from_slice(&0i64.to_be_bytes());
        w.extend_from_slice(b"B...");
        assert_eq!(
            replicated(&w).unwrap(),
            Replicated::Data {
                lsn: 0x16B3748,
                data: b"B...".to_vec()
            }
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&42u64.to_be_bytes());
        k.extend_from_slice(&0i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            replicated(&k).unwrap(),
            Replicated::Keepalive {
                wal_end: 42,
                reply: true
            }
        );
        assert!(replicated(&k[..5]).is_err());
        assert!(replicated(b"x").is_err());
        let update = status_update(7);
        assert_eq!(update[0], b'd');
        assert_eq!(update.len(), 1 + 4 + 1 + 8 * 3 + 8 + 1);
        assert_eq!(&update[6..14], &7u64.to_be_bytes());
    }

    #[test]
    fn rows_and_quoting() {
        let mut body = vec![0, 2];
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"hi");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(parse_row(&body).unwrap(), [Some("hi".to_owned()), None]);
        assert!(parse_row(&[0, 1, 0, 0, 0, 9]).is_err());
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn scram_matches_rfc_7677() {
        // The exchange of RFC 7677, section 3 (user "user", password
        // "pencil").
        let mut s = Scram {
            nonce: "rOprNGfwEbeRWgbNEkqO".into(),
            first_bare: "n=user,r=rOprNGfwEbeRWgbNEkqO".into(),
            salted: Vec::new(),
            auth_message: String::new(),
        };
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let last = s.client_final(server_first, "pencil").unwrap();
        assert_eq!(
            last,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert!(s.verify("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="));
        assert!(!s.verify("v=AAAA"));
    }
}
