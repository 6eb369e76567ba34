//! Function output kept for reading back: every line a function writes to
//! stdout or stderr, with its invocation id, in an embedded store under
//! retention limits (age and size), and a live feed for followers.
//!
//! Capturing never slows a function: lines go into a bounded channel and a
//! writer thread inserts them in batches. When the writer falls behind,
//! lines are dropped and counted rather than buffered without bound.

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Lines waiting for the writer at most.
const CHANNEL_DEPTH: usize = 64 * 1024;
/// Lines inserted per transaction at most.
const MAX_BATCH: usize = 4096;
/// Lines a live follower may lag behind before it misses some.
const FOLLOW_DEPTH: usize = 4096;
/// How often retention is enforced.
const PRUNE_EVERY: Duration = Duration::from_secs(30);

/// One line of function output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Position in the store (0 until stored).
    #[serde(default)]
    pub seq: i64,
    /// ms since the epoch.
    pub at: i64,
    pub function: String,
    pub version: u64,
    pub invocation: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub text: String,
}

/// Where captured output goes.
pub trait LogSink: Send + Sync {
    /// Takes one line; never blocks.
    fn line(&self, line: LogLine);
}

/// What a reader asks for.
#[derive(Clone, Debug, Default)]
pub struct LogQuery {
    pub function: String,
    /// Lines at or after this time (ms).
    pub since: Option<i64>,
    pub invocation: Option<String>,
    /// Lines containing this text.
    pub grep: Option<String>,
    /// Lines after this position.
    pub after_seq: Option<i64>,
    /// The newest `limit` lines matching.
    pub limit: usize,
}

impl LogQuery {
    /// Whether a live line matches (everything but `since` and `limit`).
    pub fn matches(&self, line: &LogLine) -> bool {
        line.function == self.function
            && self
                .invocation
                .as_ref()
                .is_none_or(|i| &line.invocation == i)
            && self.grep.as_ref().is_none_or(|g| line.text.contains(g))
    }
}

/// How much output is kept.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub max_age: Duration,
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 86_400),
            max_bytes: 256 << 20,
        }
    }
}

/// The embedded log store (SQLite, its own file).
pub struct LogStore {
    tx: std::sync::mpsc::SyncSender<LogLine>,
    live: tokio::sync::broadcast::Sender<LogLine>,
    reader: std::sync::Mutex<Connection>,
    dropped: Arc<AtomicU64>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl LogStore {
    /// Opens (creating) the store at `path` and starts its writer.
    pub fn open(path: &Path, retention: Retention) -> Result<Arc<Self>, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS lines (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 at INTEGER NOT NULL,
                 function TEXT NOT NULL,
                 version INTEGER NOT NULL,
                 invocation TEXT NOT NULL,
                 stream TEXT NOT NULL,
                 text TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS lines_by_function ON lines(function, seq);
             CREATE INDEX IF NOT EXISTS lines_by_invocation ON lines(invocation);",
        )?;
        let reader = Connection::open(path)?;
        reader.execute_batch("PRAGMA busy_timeout = 5000;")?;
        let (tx, rx) = std::sync::mpsc::sync_channel(CHANNEL_DEPTH);
        let (live, _) = tokio::sync::broadcast::channel(FOLLOW_DEPTH);
        let store = Arc::new(Self {
            tx,
            live: live.clone(),
            reader: std::sync::Mutex::new(reader),
            dropped: Arc::new(AtomicU64::new(0)),
        });
        std::thread::Builder::new()
            .name("nimbus-logs".into())
            .spawn(move || writer(conn, rx, live, retention))
            .map_err(|e| {
                rusqlite::Error::ToSqlConversionFailure(Box::new(std::io::Error::other(e)))
            })?;
        Ok(store)
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stored lines matching `q`, oldest first.
    pub fn query(&self, q: &LogQuery) -> Result<Vec<LogLine>, rusqlite::Error> {
        let conn = self
            .reader
            .lock()
            .map_err(|_| rusqlite::Error::InvalidQuery)?;
        let mut stmt = conn.prepare_cached(
            "SELECT seq, at, function, version, invocation, stream, text FROM lines
             WHERE function = ?1
               AND (?2 IS NULL OR at >= ?2)
               AND (?3 IS NULL OR invocation = ?3)
               AND (?4 IS NULL OR instr(text, ?4) > 0)
               AND (?5 IS NULL OR seq > ?5)
             ORDER BY seq DESC LIMIT ?6",
        )?;
        let rows = stmt.query_map(
            params![
                q.function,
                q.since,
                q.invocation,
                q.grep,
                q.after_seq,
                q.limit as i64
            ],
            |r| {
                Ok(LogLine {
                    seq: r.get(0)?,
                    at: r.get(1)?,
                    function: r.get(2)?,
                    version: r.get::<_, i64>(3)?.max(0) as u64,
                    invocation: r.get(4)?,
                    stream: r.get(5)?,
                    text: r.get(6)?,
                })
            },
        )?;
        let mut lines: Vec<LogLine> = rows.collect::<Result<_, _>>()?;
        lines.reverse();
        Ok(lines)
    }

    /// Lines as they are stored.
    pub fn follow(&self) -> tokio::sync::broadcast::Receiver<LogLine> {
        self.live.subscribe()
    }
}

impl LogSink for LogStore {
    fn line(&self, line: LogLine) {
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn writer(
    mut conn: Connection,
    rx: std::sync::mpsc::Receiver<LogLine>,
    live: tokio::sync::broadcast::Sender<LogLine>,
    retention: Retention,
) {
    let mut last_prune = std::time::Instant::now();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(l) => batch.push(l),
                Err(_) => break,
            }
        }
        let stored = (|| -> Result<Vec<LogLine>, rusqlite::Error> {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO lines (at, function, version, invocation, stream, text)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for l in &mut batch {
                    stmt.execute(params![
                        l.at,
                        l.function,
                        l.version as i64,
                        l.invocation,
                        l.stream,
                        l.text
                    ])?;
                    l.seq = tx.last_insert_rowid();
                }
            }
            tx.commit()?;
            Ok(batch)
        })();
        match stored {
            Ok(lines) => {
                for l in lines {
                    let _ = live.send(l);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot store function output"),
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = std::time::Instant::now();
            if let Err(e) = prune(&conn, retention) {
                tracing::warn!(error = %e, "cannot prune function output");
            }
        }
    }
}

/// Drops lines older than the age limit, then the oldest lines until the
/// text kept fits the size limit.
fn prune(conn: &Connection, retention: Retention) -> Result<(), rusqlite::Error> {
    let cutoff = now_ms() - retention.max_age.as_millis() as i64;
    conn.execute("DELETE FROM lines WHERE at < ?1", params![cutoff])?;
    let total: i64 = conn.query_row(
        "SELECT COALESCE(SUM(length(text)) + COUNT(*) * 64, 0) FROM lines",
        [],
        |r| r.get(0),
    )?;
    let excess = total - retention.max_bytes as i64;
    if excess > 0 {
        // Lines are of similar size on average: drop the oldest share.
        let count: i64 = conn.query_row("SELECT COUNT(*) FROM lines", [], |r| r.get(0))?;
        let drop = (count as f64 * excess as f64 / total as f64).ceil() as i64;
        conn.execute(
            "DELETE FROM lines WHERE seq IN (SELECT seq FROM lines ORDER BY seq LIMIT ?1)",
            params![drop],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(function: &str, invocation: &str, text: &str, at: i64) -> LogLine {
        LogLine {
            seq: 0,
            at,
            function: function.into(),
            version: 1,
            invocation: invocation.into(),
            stream: "stdout".into(),
            text: text.into(),
        }
    }

    fn wait_for(store: &LogStore, q: &LogQuery, n: usize) -> Vec<LogLine> {
        for _ in 0..200 {
            let got = store.query(q).unwrap();
            if got.len() >= n {
                return got;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("lines did not arrive");
    }

    #[test]
    fn lines_are_stored_filtered_and_followed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(&dir.path().join("logs.db"), Retention::default()).unwrap();
        let mut live = store.follow();
        let now = now_ms();
        store.line(line("f", "i1", "hello world", now));
        store.line(line("f", "i2", "second", now));
        store.line(line("g", "i3", "other function", now));
        let all = LogQuery {
            function: "f".into(),
            limit: 10,
            ..LogQuery::default()
        };
        let got = wait_for(&store, &all, 2);
        assert_eq!(
            got.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["hello world", "second"]
        );
        let by_inv = LogQuery {
            invocation: Some("i2".into()),
            ..all.clone()
        };
        assert_eq!(store.query(&by_inv).unwrap().len(), 1);
        let by_text = LogQuery {
            grep: Some("world".into()),
            ..all.clone()
        };
        assert_eq!(store.query(&by_text).unwrap()[0].invocation, "i1");
        let newest = LogQuery { limit: 1, ..all };
        assert_eq!(store.query(&newest).unwrap()[0].text, "second");
        assert_eq!(live.blocking_recv().unwrap().text, "hello world");
    }

    #[test]
    fn retention_drops_old_and_excess_lines() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("l.db")).unwrap();
        drop(conn);
        let store = LogStore::open(&dir.path().join("l.db"), Retention::default()).unwrap();
        let old = now_ms() - 8 * 86_400_000;
        for i in 0..100 {
            store.line(line(
                "f",
                "i",
                &"x".repeat(1000),
                if i < 10 { old } else { now_ms() },
            ));
        }
        let q = LogQuery {
            function: "f".into(),
            limit: 1000,
            ..LogQuery::default()
        };
        wait_for(&store, &q, 100);
        let conn = Connection::open(dir.path().join("l.db")).unwrap();
        prune(
            &conn,
            Retention {
                max_age: Duration::from_secs(7 * 86_400),
                max_bytes: 50_000,
            },
        )
        .unwrap();
        let left = store.query(&q).unwrap();
        assert!(left.iter().all(|l| l.at > old), "old lines stay");
        assert!(left.len() <= 50 && left.len() >= 40, "{} left", left.len());
    }
}
