//! The embedded queue: SQLite in WAL mode with `synchronous = FULL`, one
//! connection owned by a writer thread that group-commits.

use crate::{
    Attempt, BoxFuture, Claimed, Enqueued, InvocationRecord, NewInvocation, Outcome, Queue,
    QueueError, QueueStats, ScheduleMark, State, StoredResponse, Trigger, now_ms,
};
use rusqlite::{Connection, OptionalExtension, Row, params};
use std::path::Path;
use tokio::sync::{mpsc, oneshot};

/// Jobs committed together at most.
const MAX_BATCH: usize = 1024;
/// Jobs waiting for the writer at most; senders wait beyond.
const CHANNEL_DEPTH: usize = 16 * 1024;
/// Succeeded invocations are kept this long for inspection, then pruned.
pub const RETENTION_MS: i64 = 24 * 3600 * 1000;
/// How often pruning runs.
const PRUNE_EVERY_MS: i64 = 60 * 1000;

type Done = Box<dyn FnOnce(Option<String>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Done + Send>;

/// The embedded [`Queue`].
pub struct SqliteQueue {
    jobs: mpsc::Sender<Job>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS invocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    function TEXT NOT NULL,
    target TEXT,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    ce_source TEXT NOT NULL,
    ce_type TEXT NOT NULL,
    ce_time INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    age_from INTEGER NOT NULL,
    due_at INTEGER NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    attempts_total INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    parent TEXT
);
CREATE INDEX IF NOT EXISTS invocations_due ON invocations(state, function, due_at);
CREATE INDEX IF NOT EXISTS invocations_by_function ON invocations(function, seq);
CREATE TABLE IF NOT EXISTS attempts (
    invocation TEXT NOT NULL,
    n INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    duration_ms REAL NOT NULL,
    status INTEGER,
    error TEXT,
    PRIMARY KEY (invocation, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    function TEXT NOT NULL,
    key TEXT NOT NULL,
    invocation TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (function, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS schedule_marks (
    function TEXT NOT NULL,
    key TEXT NOT NULL,
    last_tick INTEGER NOT NULL,
    PRIMARY KEY (function, key)
) WITHOUT ROWID;
";

impl SqliteQueue {
    /// Opens (creating) the queue database at `path` and starts its writer.
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             PRAGMA foreign_keys = OFF;",
        )?;
        conn.execute_batch(SCHEMA)?;
        let (jobs, rx) = mpsc::channel(CHANNEL_DEPTH);
        std::thread::Builder::new()
            .name("nimbus-queue".into())
            .spawn(move || writer(conn, rx))
            .map_err(|e| QueueError::Open(e.to_string()))?;
        Ok(Self { jobs })
    }

    /// Runs `f` on the writer inside the next group commit; resolves once the
    /// transaction holding it is durable.
    fn call<T, F>(&self, f: F) -> BoxFuture<'_, Result<T, QueueError>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, QueueError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = in_savepoint(conn, f);
            Box::new(move |commit_error: Option<String>| {
                let result = match commit_error {
                    None => result,
                    Some(e) => Err(QueueError::Open(format!("commit failed: {e}"))),
                };
                let _ = tx.send(result);
            })
        });
        Box::pin(async move {
            self.jobs.send(job).await.map_err(|_| QueueError::Stopped)?;
            rx.await.map_err(|_| QueueError::Stopped)?
        })
    }
}

fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, QueueError>,
) -> Result<T, QueueError> {
    conn.execute_batch("SAVEPOINT job")?;
    match f(conn) {
        Ok(v) => {
            conn.execute_batch("RELEASE job")?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
            Err(e)
        }
    }
}

fn writer(conn: Connection, mut rx: mpsc::Receiver<Job>) {
    let mut last_prune = 0i64;
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            // The jobs never ran; dropping them tells each caller the queue
            // failed (QueueError::Stopped), and nothing was acknowledged.
            tracing::error!(error = %e, jobs = jobs.len(), "the queue cannot begin a transaction");
            drop(jobs);
            continue;
        }
        let done: Vec<Done> = jobs.into_iter().map(|job| job(&conn)).collect();
        let now = now_ms();
        if now - last_prune > PRUNE_EVERY_MS {
            last_prune = now;
            if let Err(e) = prune(&conn, now - RETENTION_MS) {
                tracing::warn!(error = %e, "pruning old invocations failed");
            }
        }
        let commit_error = conn.execute_batch("COMMIT").err().map(|e| e.to_string());
        if commit_error.is_some() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for d in done {
            d(commit_error.clone());
        }
    }
}

fn prune(conn: &Connection, before: i64) -> Result<(), rusqlite::Error> {
    conn.execute(
        "DELETE FROM attempts WHERE invocation IN
           (SELECT id FROM invocations WHERE state = 'succeeded' AND updated_at < ?1)",
        params![before],
    )?;
    conn.execute(
        "DELETE FROM invocations WHERE state = 'succeeded' AND updated_at < ?1",
        params![before],
    )?;
    conn.execute(
        "DELETE FROM idempotency WHERE expires_at < ?1",
        params![now_ms()],
    )?;
    Ok(())
}

/// 128 random bits as hex: invocation ids cannot be guessed.
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source: fall back to time and a counter, still unique.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes[..8].copy_from_slice(&now_ms().to_le_bytes());
        bytes[8..].copy_from_slice(&n.to_le_bytes());
    }
    hex::encode(bytes)
}

fn insert(conn: &Connection, new: &NewInvocation, now: i64) -> Result<String, QueueError> {
    let id = new_id();
    let headers = serde_json::to_string(&new.headers).map_err(|e| QueueError::Corrupt {
        id: id.clone(),
        reason: e.to_string(),
    })?;
    let due = new.not_before.unwrap_or(now);
    conn.prepare_cached(
        "INSERT INTO invocations (id, function, target, trigger, state, method, path, headers,
           body, ce_source, ce_type, ce_time, created_at, updated_at, age_from, due_at, parent)
         VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?12, ?13, ?14)",
    )?
    .execute(params![
        id,
        new.function,
        new.target,
        new.trigger.as_str(),
        new.method,
        new.path,
        headers,
        &new.body[..],
        new.ce_source,
        new.ce_type,
        new.ce_time.unwrap_or(now),
        now,
        due,
        new.parent,
    ])?;
    Ok(id)
}

fn enqueue(conn: &Connection, new: NewInvocation) -> Result<Enqueued, QueueError> {
    let now = now_ms();
    if let Some(key) = &new.idempotency {
        let existing: Option<String> = conn
            .prepare_cached(
                "SELECT invocation FROM idempotency
                 WHERE function = ?1 AND key = ?2 AND expires_at > ?3",
            )?
            .query_row(params![new.function, key.key, now], |r| r.get(0))
            .optional()?;
        if let Some(id) = existing {
            return Ok(Enqueued {
                id,
                duplicate: true,
            });
        }
    }
    if let Some(tick) = &new.tick {
        let last: Option<i64> = conn
            .prepare_cached(
                "SELECT last_tick FROM schedule_marks WHERE function = ?1 AND key = ?2",
            )?
            .query_row(params![new.function, tick.schedule], |r| r.get(0))
            .optional()?;
        if last.is_some_and(|l| l >= tick.at) {
            return Ok(Enqueued {
                id: String::new(),
                duplicate: true,
            });
        }
        conn.prepare_cached(
            "INSERT INTO schedule_marks (function, key, last_tick) VALUES (?1, ?2, ?3)
             ON CONFLICT (function, key) DO UPDATE SET last_tick = excluded.last_tick",
        )?
        .execute(params![new.function, tick.schedule, tick.at])?;
    }
    let id = insert(conn, &new, now)?;
    if let Some(key) = &new.idempotency {
        conn.prepare_cached(
            "INSERT INTO idempotency (function, key, invocation, expires_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (function, key) DO UPDATE
               SET invocation = excluded.invocation, expires_at = excluded.expires_at",
        )?
        .execute(params![
            new.function,
            key.key,
            id,
            now.saturating_add(key.window_ms)
        ])?;
    }
    Ok(Enqueued {
        id,
        duplicate: false,
    })
}

fn corrupt(id: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Corrupt {
        id: id.to_owned(),
        reason: e.to_string(),
    }
}

fn claimed_from_row(r: &Row<'_>) -> rusqlite::Result<(Claimed, String, String)> {
    let trigger: String = r.get("trigger")?;
    let headers: String = r.get("headers")?;
    Ok((
        Claimed {
            id: r.get("id")?,
            function: r.get("function")?,
            target: r.get("target")?,
            trigger: Trigger::Api,
            method: r.get("method")?,
            path: r.get("path")?,
            headers: Vec::new(),
            body: r.get::<_, Vec<u8>>("body")?.into(),
            ce_source: r.get("ce_source")?,
            ce_type: r.get("ce_type")?,
            ce_time: r.get("ce_time")?,
            created_at: r.get("created_at")?,
            age_from: r.get("age_from")?,
            attempt: r.get("attempt")?,
            attempts_total: r.get("attempts_total")?,
            parent: r.get("parent")?,
        },
        trigger,
        headers,
    ))
}

fn claim(
    conn: &Connection,
    function: &str,
    limit: usize,
    now: i64,
) -> Result<Vec<Claimed>, QueueError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE invocations SET state = 'running', updated_at = ?3
         WHERE seq IN (SELECT seq FROM invocations
                       WHERE state = 'queued' AND function = ?1 AND due_at <= ?3
                       ORDER BY due_at, seq LIMIT ?2)
         RETURNING seq, id, function, target, trigger, method, path, headers, body, ce_source,
                   ce_type, ce_time, created_at, age_from, attempt, attempts_total, parent, due_at",
    )?;
    let mut rows = stmt.query(params![function, limit as i64, now])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let order: (i64, i64) = (row.get("due_at")?, row.get("seq")?);
        let (mut c, trigger, headers) = claimed_from_row(row)?;
        c.trigger = Trigger::parse(&trigger).ok_or_else(|| corrupt(&c.id, "unknown trigger"))?;
        c.headers = serde_json::from_str(&headers).map_err(|e| corrupt(&c.id, e))?;
        out.push((order, c));
    }
    out.sort_by_key(|(order, _)| *order);
    Ok(out.into_iter().map(|(_, c)| c).collect())
}

fn finish(
    conn: &Connection,
    id: &str,
    attempt: Option<&Attempt>,
    outcome: &Outcome,
    follow_up: Option<&NewInvocation>,
) -> Result<(), QueueError> {
    let now = now_ms();
    if let Some(attempt) = attempt {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO attempts (invocation, n, started_at, duration_ms, status, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            id,
            attempt.n,
            attempt.started_at,
            attempt.duration_ms,
            attempt.status,
            attempt.error
        ])?;
    }
    // Counters move only when an attempt ran.
    let (counted, total) = match attempt {
        Some(a) => (1, Some(a.n)),
        None => (0, None),
    };
    let to_json = |r: &Option<StoredResponse>| -> Result<Option<String>, QueueError> {
        r.as_ref()
            .map(|r| serde_json::to_string(r).map_err(|e| corrupt(id, e)))
            .transpose()
    };
    match outcome {
        Outcome::Succeeded(response) => {
            let result = to_json(&Some(response.clone()))?;
            conn.prepare_cached(
                "UPDATE invocations SET state = 'succeeded', updated_at = ?2, result = ?3,
                   error = NULL, attempt = attempt + ?4,
                   attempts_total = COALESCE(?5, attempts_total)
                 WHERE id = ?1",
            )?
            .execute(params![id, now, result, counted, total])?;
        }
        Outcome::Retry { at, response } => {
            conn.prepare_cached(
                "UPDATE invocations SET state = 'queued', updated_at = ?2, due_at = ?3,
                   result = ?4, attempt = attempt + ?5,
                   attempts_total = COALESCE(?6, attempts_total)
                 WHERE id = ?1",
            )?
            .execute(params![id, now, at, to_json(response)?, counted, total])?;
        }
        Outcome::Failed { reason, response } => {
            conn.prepare_cached(
                "UPDATE invocations SET state = 'failed', updated_at = ?2, result = ?3,
                   error = ?4, attempt = attempt + ?5,
                   attempts_total = COALESCE(?6, attempts_total)
                 WHERE id = ?1",
            )?
            .execute(params![id, now, to_json(response)?, reason, counted, total])?;
        }
    }
    if let Some(next) = follow_up {
        insert(conn, next, now)?;
    }
    Ok(())
}

const RECORD_COLUMNS: &str = "id, function, target, trigger, state, method, path, ce_source,
    ce_type, ce_time, created_at, updated_at, due_at, length(body) AS body_bytes, result, error,
    parent";

fn record_from_row(r: &Row<'_>) -> Result<InvocationRecord, QueueError> {
    let id: String = r.get("id")?;
    let trigger: String = r.get("trigger")?;
    let state: String = r.get("state")?;
    let state = State::parse(&state).ok_or_else(|| corrupt(&id, "unknown state"))?;
    let result: Option<String> = r.get("result")?;
    let result = result
        .map(|t| serde_json::from_str::<StoredResponse>(&t).map_err(|e| corrupt(&id, e)))
        .transpose()?;
    Ok(InvocationRecord {
        function: r.get("function")?,
        target: r.get("target")?,
        trigger: Trigger::parse(&trigger).ok_or_else(|| corrupt(&id, "unknown trigger"))?,
        state,
        method: r.get("method")?,
        path: r.get("path")?,
        ce_source: r.get("ce_source")?,
        ce_type: r.get("ce_type")?,
        ce_time: r.get("ce_time")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
        next_attempt_at: (state == State::Queued)
            .then(|| r.get("due_at"))
            .transpose()?,
        body_bytes: r.get::<_, i64>("body_bytes")?.max(0) as u64,
        attempts: Vec::new(),
        result,
        error: r.get("error")?,
        parent: r.get("parent")?,
        id,
    })
}

fn attempts_of(conn: &Connection, id: &str) -> Result<Vec<Attempt>, QueueError> {
    let mut stmt = conn.prepare_cached(
        "SELECT n, started_at, duration_ms, status, error FROM attempts
         WHERE invocation = ?1 ORDER BY n",
    )?;
    let rows = stmt.query_map(params![id], |r| {
        Ok(Attempt {
            n: r.get(0)?,
            started_at: r.get(1)?,
            duration_ms: r.get(2)?,
            status: r.get(3)?,
            error: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn get(conn: &Connection, id: &str) -> Result<Option<InvocationRecord>, QueueError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {RECORD_COLUMNS} FROM invocations WHERE id = ?1"
    ))?;
    let mut rows = stmt.query(params![id])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let mut record = record_from_row(row)?;
    record.attempts = attempts_of(conn, id)?;
    Ok(Some(record))
}

fn list(
    conn: &Connection,
    function: &str,
    state: Option<State>,
    limit: usize,
) -> Result<Vec<InvocationRecord>, QueueError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {RECORD_COLUMNS} FROM invocations
         WHERE function = ?1 AND (?2 IS NULL OR state = ?2)
         ORDER BY seq DESC LIMIT ?3"
    ))?;
    let mut rows = stmt.query(params![function, state.map(State::as_str), limit as i64])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(record_from_row(row)?);
    }
    for r in &mut out {
        r.attempts = attempts_of(conn, &r.id)?;
    }
    Ok(out)
}

impl Queue for SqliteQueue {
    fn enqueue(&self, new: NewInvocation) -> BoxFuture<'_, Result<Enqueued, QueueError>> {
        self.call(move |conn| enqueue(conn, new))
    }

    fn claim(
        &self,
        function: &str,
        limit: usize,
        now: i64,
    ) -> BoxFuture<'_, Result<Vec<Claimed>, QueueError>> {
        let function = function.to_owned();
        self.call(move |conn| claim(conn, &function, limit, now))
    }

    fn finish(
        &self,
        id: &str,
        attempt: Option<Attempt>,
        outcome: Outcome,
        follow_up: Option<NewInvocation>,
    ) -> BoxFuture<'_, Result<(), QueueError>> {
        let id = id.to_owned();
        self.call(move |conn| finish(conn, &id, attempt.as_ref(), &outcome, follow_up.as_ref()))
    }

    fn dead_letter(
        &self,
        new: NewInvocation,
        attempts: Vec<Attempt>,
        reason: String,
        response: Option<StoredResponse>,
    ) -> BoxFuture<'_, Result<String, QueueError>> {
        self.call(move |conn| {
            let id = insert(conn, &new, now_ms())?;
            let last = attempts.len();
            for (i, attempt) in attempts.iter().enumerate() {
                let outcome = if i + 1 == last {
                    Outcome::Failed {
                        reason: reason.clone(),
                        response: response.clone(),
                    }
                } else {
                    Outcome::Retry {
                        at: attempt.started_at,
                        response: None,
                    }
                };
                finish(conn, &id, Some(attempt), &outcome, None)?;
            }
            if attempts.is_empty() {
                finish(conn, &id, None, &Outcome::Failed { reason, response }, None)?;
            }
            Ok(id)
        })
    }

    fn recover(&self) -> BoxFuture<'_, Result<u64, QueueError>> {
        self.call(|conn| {
            Ok(conn.execute(
                "UPDATE invocations SET state = 'queued' WHERE state = 'running'",
                [],
            )? as u64)
        })
    }

    fn pending(&self) -> BoxFuture<'_, Result<Vec<(String, i64)>, QueueError>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT function, MIN(due_at) FROM invocations WHERE state = 'queued'
                 GROUP BY function",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<InvocationRecord>, QueueError>> {
        let id = id.to_owned();
        self.call(move |conn| get(conn, &id))
    }

    fn list(
        &self,
        function: &str,
        state: Option<State>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<InvocationRecord>, QueueError>> {
        let function = function.to_owned();
        self.call(move |conn| list(conn, &function, state, limit))
    }

    fn redrive(
        &self,
        function: &str,
        ids: Option<Vec<String>>,
    ) -> BoxFuture<'_, Result<u64, QueueError>> {
        let function = function.to_owned();
        self.call(move |conn| {
            let now = now_ms();
            let sql = "UPDATE invocations SET state = 'queued', due_at = ?2, age_from = ?2,
                         updated_at = ?2, attempt = 0, error = NULL
                       WHERE function = ?1 AND state = 'failed'";
            match ids {
                None => Ok(conn.execute(sql, params![function, now])? as u64),
                Some(ids) => {
                    let mut stmt = conn.prepare_cached(&format!("{sql} AND id = ?3"))?;
                    let mut n = 0;
                    for id in ids {
                        n += stmt.execute(params![function, now, id])? as u64;
                    }
                    Ok(n)
                }
            }
        })
    }

    fn purge(&self, function: &str) -> BoxFuture<'_, Result<u64, QueueError>> {
        let function = function.to_owned();
        self.call(move |conn| {
            conn.execute(
                "DELETE FROM attempts WHERE invocation IN
                   (SELECT id FROM invocations WHERE function = ?1 AND state = 'failed')",
                params![function],
            )?;
            Ok(conn.execute(
                "DELETE FROM invocations WHERE function = ?1 AND state = 'failed'",
                params![function],
            )? as u64)
        })
    }

    fn stats(&self) -> BoxFuture<'_, Result<Vec<QueueStats>, QueueError>> {
        self.call(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT function,
                   SUM(state = 'queued'), SUM(state = 'running'), SUM(state = 'failed'),
                   MIN(CASE WHEN state = 'queued' THEN created_at END)
                 FROM invocations WHERE state != 'succeeded' GROUP BY function ORDER BY function",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(QueueStats {
                    function: r.get(0)?,
                    queued: r.get::<_, i64>(1)?.max(0) as u64,
                    running: r.get::<_, i64>(2)?.max(0) as u64,
                    failed: r.get::<_, i64>(3)?.max(0) as u64,
                    oldest_queued_at: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn schedule_marks(&self) -> BoxFuture<'_, Result<Vec<ScheduleMark>, QueueError>> {
        self.call(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT function, key, last_tick FROM schedule_marks")?;
            let rows = stmt.query_map([], |r| {
                Ok(ScheduleMark {
                    function: r.get(0)?,
                    key: r.get(1)?,
                    last_tick: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn sync_schedules(
        &self,
        schedules: Vec<(String, String)>,
        start: i64,
    ) -> BoxFuture<'_, Result<(), QueueError>> {
        self.call(move |conn| {
            let existing: Vec<(String, String)> = conn
                .prepare_cached("SELECT function, key FROM schedule_marks")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for (function, key) in existing.iter().filter(|s| !schedules.contains(s)) {
                conn.execute(
                    "DELETE FROM schedule_marks WHERE function = ?1 AND key = ?2",
                    params![function, key],
                )?;
            }
            for (function, key) in schedules.iter().filter(|s| !existing.contains(s)) {
                conn.execute(
                    "INSERT INTO schedule_marks (function, key, last_tick) VALUES (?1, ?2, ?3)",
                    params![function, key, start],
                )?;
            }
            Ok(())
        })
    }

    fn mark_schedule(
        &self,
        function: &str,
        key: &str,
        at: i64,
    ) -> BoxFuture<'_, Result<(), QueueError>> {
        let (function, key) = (function.to_owned(), key.to_owned());
        self.call(move |conn| {
            conn.execute(
                "UPDATE schedule_marks SET last_tick = MAX(last_tick, ?3)
                 WHERE function = ?1 AND key = ?2",
                params![function, key, at],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Idempotency, Tick};

    fn new(function: &str) -> NewInvocation {
        NewInvocation {
            function: function.into(),
            target: None,
            trigger: Trigger::Api,
            method: "POST".into(),
            path: "/".into(),
            headers: vec![("content-type".into(), "text/plain".into())],
            body: bytes::Bytes::from_static(b"payload"),
            ce_source: "/test".into(),
            ce_type: "test".into(),
            ce_time: None,
            not_before: None,
            idempotency: None,
            parent: None,
            tick: None,
        }
    }

    fn ok() -> StoredResponse {
        StoredResponse {
            status: 200,
            headers: vec![],
            body: "ok".into(),
            binary: false,
            truncated: false,
        }
    }

    fn attempt(n: u32) -> Attempt {
        Attempt {
            n,
            started_at: now_ms(),
            duration_ms: 1.0,
            status: Some(500),
            error: None,
        }
    }

    #[tokio::test]
    async fn lifecycle_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let id = {
            let q = SqliteQueue::open(&path).unwrap();
            let e = q.enqueue(new("f")).await.unwrap();
            let claimed = q.claim("f", 10, now_ms()).await.unwrap();
            assert_eq!(claimed.len(), 1);
            assert_eq!(&claimed[0].body[..], b"payload");
            assert_eq!(claimed[0].headers[0].1, "text/plain");
            // Claimed work is not handed out twice.
            assert!(q.claim("f", 10, now_ms()).await.unwrap().is_empty());
            e.id
        };
        // A restart finds the running invocation and queues it again.
        let q = SqliteQueue::open(&path).unwrap();
        assert_eq!(q.recover().await.unwrap(), 1);
        let claimed = q.claim("f", 10, now_ms()).await.unwrap();
        assert_eq!(claimed[0].id, id);
        q.finish(
            &id,
            Some(attempt(1)),
            Outcome::Retry {
                at: now_ms() + 60_000,
                response: None,
            },
            None,
        )
        .await
        .unwrap();
        assert!(q.claim("f", 10, now_ms()).await.unwrap().is_empty());
        let later = q.claim("f", 10, now_ms() + 61_000).await.unwrap();
        assert_eq!(later[0].attempt, 1);
        q.finish(&id, Some(attempt(2)), Outcome::Succeeded(ok()), None)
            .await
            .unwrap();
        let r = q.get(&id).await.unwrap().unwrap();
        assert_eq!(r.state, State::Succeeded);
        assert_eq!(r.attempts.len(), 2);
        assert_eq!(r.result.unwrap().status, 200);
    }

    #[tokio::test]
    async fn dead_letters_redrive_and_purge() {
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteQueue::open(&dir.path().join("q.db")).unwrap();
        let a = q.enqueue(new("f")).await.unwrap().id;
        let b = q.enqueue(new("f")).await.unwrap().id;
        for _ in q.claim("f", 10, now_ms()).await.unwrap() {}
        for id in [&a, &b] {
            q.finish(
                id,
                Some(attempt(1)),
                Outcome::Failed {
                    reason: "boom".into(),
                    response: None,
                },
                None,
            )
            .await
            .unwrap();
        }
        assert_eq!(q.list("f", Some(State::Failed), 10).await.unwrap().len(), 2);
        assert_eq!(q.stats().await.unwrap()[0].failed, 2);
        assert_eq!(q.redrive("f", Some(vec![a.clone()])).await.unwrap(), 1);
        let again = q.claim("f", 10, now_ms()).await.unwrap();
        assert_eq!((again.len(), again[0].attempt), (1, 0));
        assert_eq!(again[0].attempts_total, 1);
        assert_eq!(q.purge("f").await.unwrap(), 1);
        assert!(q.get(&b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn idempotency_keys_and_ticks_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let q = std::sync::Arc::new(SqliteQueue::open(&dir.path().join("q.db")).unwrap());
        let keyed = || {
            let mut n = new("f");
            n.idempotency = Some(Idempotency {
                key: "k1".into(),
                window_ms: 60_000,
            });
            n
        };
        let results = futures_join(q.clone(), (0..5).map(|_| keyed()).collect()).await;
        assert!(results.iter().all(|r| r.id == results[0].id));
        assert_eq!(results.iter().filter(|r| !r.duplicate).count(), 1);

        let tick = |at| {
            let mut n = new("f");
            n.tick = Some(Tick {
                schedule: "* * * * * UTC".into(),
                at,
            });
            n
        };
        assert!(!q.enqueue(tick(1000)).await.unwrap().duplicate);
        assert!(q.enqueue(tick(1000)).await.unwrap().duplicate);
        assert!(!q.enqueue(tick(2000)).await.unwrap().duplicate);
        assert_eq!(q.schedule_marks().await.unwrap()[0].last_tick, 2000);
    }

    async fn futures_join(
        q: std::sync::Arc<SqliteQueue>,
        news: Vec<NewInvocation>,
    ) -> Vec<Enqueued> {
        let handles: Vec<_> = news
            .into_iter()
            .map(|n| {
                let q = q.clone();
                tokio::spawn(async move { q.enqueue(n).await.unwrap() })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }
}
