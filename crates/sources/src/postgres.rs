//! PostgreSQL change data capture through a logical replication slot.
//!
//! A deploy checks logical decoding is on and the tables exist; the
//! consumer, once the deploy succeeded, creates a publication for the
//! source's tables and operations and a `pgoutput` slot, both named after
//! the source; removing the source drops both, so no slot is left behind to
//! hold WAL. The consumer streams the slot over the replication protocol
//! (`START_REPLICATION`), so a change reaches the function as soon as its
//! transaction commits. pgoutput sends only committed transactions, so the
//! consumer delivers each row change as it reads it: with concurrency 1
//! (the default) one at a time in commit order, otherwise up to
//! `concurrency` at once. It holds no more changes in memory than it runs,
//! however large the transaction (the socket's flow control holds
//! PostgreSQL back meanwhile). Only after every change of a transaction,
//! and of every transaction before it, succeeded (or was dead-lettered)
//! does it confirm the slot past the commit. A crash in between streams the
//! transaction again: at least once, nothing lost.

use crate::pg::{Conn, Replicated, Target, ident, literal};
use crate::wire::Cursor;
use crate::{BoxFuture, Deliver, EventSource, Message, SourceError, StatusCell, Verdict};
use nimbus_manifest::{Operation, Postgres};
use serde_json::{Map, Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

/// How often the consumer tells PostgreSQL how far it got, at the least
/// (PostgreSQL ends a silent stream after `wal_sender_timeout`, 60 s by
/// default).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Wait before offering a change again that the node did not take.
const NOT_TAKEN_DELAY: Duration = Duration::from_secs(1);

/// How far the transactions read so far are handled. The slot may be
/// confirmed past a commit only once every change of that transaction and
/// of every one before it is handled: with changes running at once, a
/// later transaction can finish first.
#[derive(Debug, Default)]
struct Progress {
    /// Transactions not yet confirmable, oldest first: the end of the
    /// commit record once it was read, and the changes still running.
    open: VecDeque<(Option<u64>, usize)>,
    /// The number of the transaction at the front of `open`.
    first: u64,
}

impl Progress {
    /// A transaction begins; returns its number.
    fn begin(&mut self) -> u64 {
        self.open.push_back((None, 0));
        self.first + self.open.len() as u64 - 1
    }

    fn entry(&mut self, txn: u64) -> Option<&mut (Option<u64>, usize)> {
        let at = usize::try_from(txn.checked_sub(self.first)?).ok()?;
        self.open.get_mut(at)
    }

    /// One change of transaction `txn` starts running.
    fn started(&mut self, txn: u64) {
        if let Some(t) = self.entry(txn) {
            t.1 += 1;
        }
    }

    /// One change of `txn` is handled; returns how far the slot may now be
    /// confirmed, if that moved.
    fn finished(&mut self, txn: u64) -> Option<u64> {
        if let Some(t) = self.entry(txn) {
            t.1 = t.1.saturating_sub(1);
        }
        self.settle()
    }

    /// The commit record of `txn` was read, ending at `end_lsn`.
    fn committed(&mut self, txn: u64, end_lsn: u64) -> Option<u64> {
        if let Some(t) = self.entry(txn) {
            t.0 = Some(end_lsn);
        }
        self.settle()
    }

    /// Drops the handled transactions at the front; returns the end of the
    /// last one dropped.
    fn settle(&mut self) -> Option<u64> {
        let mut upto = None;
        while let Some(&(Some(end), 0)) = self.open.front() {
            self.open.pop_front();
            self.first += 1;
            upto = Some(end);
        }
        upto
    }

    /// Whether everything read so far is handled.
    fn idle(&self) -> bool {
        self.open.is_empty()
    }
}

/// One decoded pgoutput message.
#[derive(Debug, PartialEq)]
enum Decoded {
    Begin {
        /// Where the transaction's commit record starts.
        commit_lsn: u64,
        xid: u32,
    },
    Commit {
        end_lsn: u64,
    },
    Relation(Relation),
    Change {
        relation: u32,
        operation: Operation,
        old: Option<Vec<Cell>>,
        new: Option<Vec<Cell>>,
    },
    /// Types, origins, messages, truncates: nothing to deliver.
    Other,
}

#[derive(Debug, Clone, PartialEq)]
struct Relation {
    id: u32,
    schema: String,
    table: String,
    /// Column names and type ids.
    columns: Vec<(String, u32)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    /// A TOASTed value the change did not touch: not sent.
    Unchanged,
    Text(String),
}

/// pgoutput's strings and tuples.
impl Cursor<'_> {
    fn cstr(&mut self) -> Result<String, SourceError> {
        let rest = self.b.get(self.at..).unwrap_or_default();
        let end = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| SourceError::Protocol("a pgoutput string is unterminated".into()))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.at += end + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Cell>, SourceError> {
        let n = self.u16()?;
        (0..n)
            .map(|_| {
                Ok(match self.u8()? {
                    b'n' => Cell::Null,
                    b'u' => Cell::Unchanged,
                    b't' => {
                        let len = self.u32()? as usize;
                        Cell::Text(String::from_utf8_lossy(self.take(len)?).into_owned())
                    }
                    k => {
                        return Err(SourceError::Protocol(format!(
                            "unknown pgoutput column kind {k}"
                        )));
                    }
                })
            })
            .collect()
    }
}

/// Decodes one pgoutput (protocol 1) message.
fn decode(b: &[u8]) -> Result<Decoded, SourceError> {
    let mut r = Cursor::new(b);
    Ok(match r.u8()? {
        b'B' => {
            let commit_lsn = r.u64()?;
            r.u64()?; // commit time
            Decoded::Begin {
                commit_lsn,
                xid: r.u32()?,
            }
        }
        b'C' => {
            r.u8()?; // flags
            r.u64()?; // commit lsn
            Decoded::Commit { end_lsn: r.u64()? }
        }
        b'R' => {
            let id = r.u32()?;
            let schema = r.cstr()?;
            let table = r.cstr()?;
            r.u8()?; // replica identity
            let n = r.u16()?;
            let columns = (0..n)
                .map(|_| {
                    r.u8()?; // flags
                    let name = r.cstr()?;
                    let ty = r.u32()?;
                    r.u32()?; // type modifier
                    Ok((name, ty))
                })
                .collect::<Result<_, SourceError>>()?;
            Decoded::Relation(Relation {
                id,
                schema,
                table,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32()?;
            r.u8()?; // 'N'
            Decoded::Change {
                relation,
                operation: Operation::Insert,
                old: None,
                new: Some(r.tuple()?),
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(SourceError::Protocol(
                    "an update without its new row".into(),
                ));
            }
            Decoded::Change {
                relation,
                operation: Operation::Update,
                old,
                new: Some(r.tuple()?),
            }
        }
        b'D' => {
            let relation = r.u32()?;
            r.u8()?; // 'K' or 'O'
            Decoded::Change {
                relation,
                operation: Operation::Delete,
                old: Some(r.tuple()?),
                new: None,
            }
        }
        _ => Decoded::Other,
    })
}

/// A text value as JSON, typed by its PostgreSQL type id where JSON has
/// the type (numbers, booleans, JSON); everything else stays a string.
fn typed(ty: u32, text: &str) -> Value {
    match ty {
        // int2, int4, int8, oid
        21 | 23 | 20 | 26 => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| text.into()),
        // float4, float8
        700 | 701 => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| text.into()),
        16 => Value::Bool(text == "t"),
        // json, jsonb
        114 | 3802 => serde_json::from_str(text).unwrap_or_else(|_| text.into()),
        _ => text.into(),
    }
}

/// A row as a JSON object; columns a change did not carry are left out.
fn row(relation: &Relation, cells: &[Cell]) -> Value {
    let mut out = Map::new();
    for ((name, ty), cell) in relation.columns.iter().zip(cells) {
        match cell {
            Cell::Null => {
                out.insert(name.clone(), Value::Null);
            }
            Cell::Text(t) => {
                out.insert(name.clone(), typed(*ty, t));
            }
            Cell::Unchanged => {}
        }
    }
    Value::Object(out)
}

/// An LSN as PostgreSQL writes it.
fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[cfg(test)]
fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// A change ready for its function.
struct Change<'a> {
    lsn: String,
    xid: u32,
    commit_lsn: u64,
    relation: &'a Relation,
    operation: Operation,
    old: Option<Value>,
    new: Option<Value>,
}

pub struct PostgresSource {
    function: String,
    target: Target,
    tables: Vec<(String, String)>,
    operations: Vec<Operation>,
    slot: String,
    concurrency: u32,
}

impl PostgresSource {
    pub fn new(
        function: &str,
        url: &str,
        config: &Postgres,
        concurrency: u32,
    ) -> Result<Self, SourceError> {
        let target = Target::parse(url)?;
        let tables = config
            .tables
            .iter()
            .map(|t| match t.split_once('.') {
                Some((s, t)) => (s.to_owned(), t.to_owned()),
                None => ("public".to_owned(), t.clone()),
            })
            .collect();
        let slot = config.slot.clone().unwrap_or_else(|| {
            format!("nimbus_{}", function.to_ascii_lowercase().replace('-', "_"))
        });
        Ok(Self {
            function: function.to_owned(),
            target,
            tables,
            operations: config.operations.clone(),
            slot,
            concurrency: concurrency.max(1),
        })
    }

    /// Checks logical decoding is on and the tables exist; returns the
    /// tables as quoted SQL names.
    async fn verify(&self, conn: &mut Conn) -> Result<Vec<String>, SourceError> {
        let level = conn.execute("SHOW wal_level").await?;
        let level = level.first().and_then(|r| r.first().cloned().flatten());
        if level.as_deref() != Some("logical") {
            return Err(SourceError::Config(format!(
                "PostgreSQL at {}:{} has wal_level = {}; change data capture needs wal_level = logical (ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)",
                self.target.host,
                self.target.port,
                level.unwrap_or_default()
            )));
        }
        let mut names = Vec::new();
        for (schema, table) in &self.tables {
            let name = format!("{}.{}", ident(schema), ident(table));
            let found = conn
                .execute(&format!("SELECT to_regclass({})", literal(&name)))
                .await?;
            if found
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .is_none()
            {
                return Err(SourceError::Config(format!(
                    "the table {schema}.{table} does not exist in database {}",
                    self.target.database
                )));
            }
            names.push(name);
        }
        Ok(names)
    }

    /// [`Self::verify`], then creates (or updates) the publication and
    /// creates the slot unless they exist. Run when the consumer starts,
    /// not by the deploy's check, so a deploy that fails later leaves no
    /// slot behind.
    async fn ensure(&self, conn: &mut Conn) -> Result<(), SourceError> {
        let names = self.verify(conn).await?;
        let publish: Vec<&str> = self
            .operations
            .iter()
            .map(|o| match o {
                Operation::Insert => "insert",
                Operation::Update => "update",
                Operation::Delete => "delete",
            })
            .collect();
        let publication = ident(&self.slot);
        let exists = conn
            .execute(&format!(
                "SELECT 1 FROM pg_publication WHERE pubname = {}",
                literal(&self.slot)
            ))
            .await?;
        let tables = names.join(", ");
        let with = literal(&publish.join(", "));
        if exists.is_empty() {
            conn.execute(&format!(
                "CREATE PUBLICATION {publication} FOR TABLE {tables} WITH (publish = {with})"
            ))
            .await?;
        } else {
            conn.execute(&format!(
                "ALTER PUBLICATION {publication} SET TABLE {tables}"
            ))
            .await?;
            conn.execute(&format!(
                "ALTER PUBLICATION {publication} SET (publish = {with})"
            ))
            .await?;
        }
        let slot = conn
            .execute(&format!(
                "SELECT plugin FROM pg_replication_slots WHERE slot_name = {}",
                literal(&self.slot)
            ))
            .await?;
        if slot.is_empty() {
            conn.execute(&format!(
                "SELECT pg_create_logical_replication_slot({}, 'pgoutput')",
                literal(&self.slot)
            ))
            .await?;
            tracing::info!(function = %self.function, slot = %self.slot, "created the replication slot");
        }
        Ok(())
    }

    fn message(&self, change: &Change<'_>, index: usize) -> Message {
        let op = match change.operation {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
        };
        let table = format!("{}.{}", change.relation.schema, change.relation.table);
        let body = json!({
            "operation": op,
            "schema": change.relation.schema,
            "table": change.relation.table,
            "old": change.old,
            "new": change.new,
            "xid": change.xid,
            "lsn": change.lsn,
            "commit_lsn": lsn_text(change.commit_lsn),
        });
        Message {
            function: self.function.clone(),
            // Unique and stable across readings of the slot.
            id: format!("{}-{index}", lsn_text(change.commit_lsn)),
            ce_source: format!(
                "postgres://{}:{}/{}/{table}",
                self.target.host, self.target.port, self.target.database
            ),
            ce_type: format!("postgres.row.{op}"),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("ce-subject".into(), table.clone()),
                ("ce-pgtable".into(), table),
                ("ce-pgoperation".into(), op.into()),
                ("ce-pgxid".into(), change.xid.to_string()),
                ("ce-pglsn".into(), change.lsn.clone()),
            ],
            body: serde_json::to_vec(&body).unwrap_or_default(),
            delivery: None,
            per_invocation: None,
        }
    }

    /// One connected session: streams the slot and delivers each
    /// transaction's changes once it has committed (in order with one slot
    /// of concurrency); returns only on an error.
    async fn session(
        &self,
        deliver: &Arc<dyn Deliver>,
        status: &StatusCell,
    ) -> Result<(), SourceError> {
        {
            let mut conn = Conn::connect(&self.target).await?;
            self.ensure(&mut conn).await?;
        }
        let conn = Conn::connect_replication(&self.target).await?;
        let (mut stream, feedback) = conn.start_replication(&self.slot, &self.slot).await?;
        status.healthy();
        // How far every change is handled. The server hears it as soon as
        // it moves (confirmations in quick succession share one message)
        // and at least every STATUS_INTERVAL, also while a function runs
        // (or PostgreSQL would end the stream after its
        // wal_sender_timeout).
        let confirmed = Arc::new(AtomicU64::new(0));
        let moved = Arc::new(Notify::new());
        let confirmer = {
            let (feedback, confirmed, moved) = (feedback.clone(), confirmed.clone(), moved.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(STATUS_INTERVAL);
                loop {
                    tokio::select! {
                        _ = every.tick() => {}
                        _ = moved.notified() => {}
                    }
                    if feedback
                        .confirm(confirmed.load(Ordering::Acquire))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            })
        };
        let _confirmer = crate::wire::AbortOnDrop(confirmer);
        let advance = {
            let moved = moved.clone();
            move |upto: Option<u64>| {
                if let Some(lsn) = upto {
                    confirmed.fetch_max(lsn, Ordering::AcqRel);
                    moved.notify_one();
                }
            }
        };
        let progress = Arc::new(Mutex::new(Progress::default()));
        let running = Arc::new(Semaphore::new(self.concurrency as usize));
        let mut relations: HashMap<u32, Relation> = HashMap::new();
        // The transaction being read: its number in `progress`, its id, its
        // commit's LSN and the index of its next change.
        let (mut txn, mut xid, mut commit_lsn, mut index) = (0, 0, 0, 0);
        loop {
            let data = match stream.next().await? {
                Replicated::Keepalive { wal_end, reply } => {
                    // With every change read so far handled, everything
                    // sent is: confirming it lets PostgreSQL recycle WAL
                    // that held only other tables' changes.
                    let idle = progress.lock().map(|p| p.idle()).unwrap_or(false);
                    if idle {
                        advance(Some(wal_end));
                    } else if reply {
                        moved.notify_one();
                    }
                    continue;
                }
                Replicated::Data { lsn, data } => (lsn, data),
            };
            let (lsn, data) = data;
            match decode(&data)? {
                Decoded::Begin {
                    commit_lsn: at,
                    xid: x,
                } => {
                    (xid, commit_lsn, index) = (x, at, 0);
                    txn = progress.lock().map(|mut p| p.begin()).unwrap_or(0);
                }
                Decoded::Relation(rel) => {
                    relations.insert(rel.id, rel);
                }
                Decoded::Change {
                    relation,
                    operation,
                    old,
                    new,
                } => {
                    let rel = relations.get(&relation).ok_or_else(|| {
                        SourceError::Protocol(format!("a change to unknown relation {relation}"))
                    })?;
                    let change = Change {
                        lsn: lsn_text(lsn),
                        xid,
                        commit_lsn,
                        old: old.map(|c| row(rel, &c)),
                        new: new.map(|c| row(rel, &c)),
                        relation: rel,
                        operation,
                    };
                    let message = self.message(&change, index);
                    index += 1;
                    // Waiting here stops the reading: PostgreSQL holds what
                    // the function cannot take yet. With one slot, a change
                    // starts only once the one before it is handled.
                    let slot = running
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| SourceError::Disconnected("stopping".into()))?;
                    if let Ok(mut p) = progress.lock() {
                        p.started(txn);
                    }
                    let (deliver, status, progress) =
                        (deliver.clone(), status.clone(), progress.clone());
                    let advance = advance.clone();
                    tokio::spawn(async move {
                        loop {
                            let verdict = deliver.deliver(message.clone()).await;
                            status.counted(&verdict);
                            if matches!(verdict, Verdict::Succeeded | Verdict::DeadLettered) {
                                break;
                            }
                            // Not taken (the function is not being served
                            // right now): the order holds, so wait.
                            tokio::time::sleep(NOT_TAKEN_DELAY).await;
                        }
                        advance(progress.lock().ok().and_then(|mut p| p.finished(txn)));
                        drop(slot);
                    });
                }
                Decoded::Commit { end_lsn } => {
                    advance(
                        progress
                            .lock()
                            .ok()
                            .and_then(|mut p| p.committed(txn, end_lsn)),
                    );
                }
                Decoded::Other => {}
            }
        }
    }
}

impl EventSource for PostgresSource {
    fn check(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            let mut conn = Conn::connect(&self.target).await?;
            self.verify(&mut conn).await.map(|_| ())
        })
    }

    fn remove(&self) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move {
            let mut conn = Conn::connect(&self.target).await?;
            // The consumer may still hold the slot for a moment.
            let mut last = None;
            for _ in 0..50 {
                match conn
                    .query(&format!(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {}",
                        literal(&self.slot)
                    ))
                    .await?
                {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e.message),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if let Some(e) = last {
                return Err(SourceError::Server(e));
            }
            conn.execute(&format!("DROP PUBLICATION IF EXISTS {}", ident(&self.slot)))
                .await?;
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
            crate::wire::reconnecting(
                "postgres",
                &self.function,
                &self.slot,
                status.clone(),
                || this.session(&deliver, &status),
            )
            .await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot moves past a commit only once that transaction and every
    /// one before it are handled, whatever order their changes finish in.
    #[test]
    fn confirmation_waits_for_earlier_transactions() {
        let mut p = Progress::default();
        let a = p.begin();
        p.started(a);
        p.started(a);
        assert_eq!(p.committed(a, 100), None, "two changes still running");
        let b = p.begin();
        p.started(b);
        assert_eq!(p.committed(b, 200), None);
        // The later transaction finishes first: nothing to confirm yet.
        assert_eq!(p.finished(b), None);
        assert_eq!(p.finished(a), None);
        assert!(!p.idle());
        // The last change of the first one releases both.
        assert_eq!(p.finished(a), Some(200));
        assert!(p.idle());
        // A transaction with no delivered change (other tables, filtered
        // operations) is confirmed at its commit.
        let c = p.begin();
        assert_eq!(p.committed(c, 300), Some(300));
        // One still being read holds back nothing before it but itself.
        let d = p.begin();
        p.started(d);
        assert_eq!(p.finished(d), None, "its commit has not been read");
        assert_eq!(p.committed(d, 400), Some(400));
        // Numbers of transactions already settled are ignored.
        assert_eq!(p.finished(a), None);
        assert!(p.idle());
    }

    fn relation_message() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend_from_slice(&16385u32.to_be_bytes());
        b.extend_from_slice(b"public\0orders\0");
        b.push(b'd');
        b.extend_from_slice(&3u16.to_be_bytes());
        for (name, ty) in [("id", 23u32), ("note", 25), ("paid", 16)] {
            b.push(1);
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
        }
        b
    }

    fn tuple(cells: &[Option<&str>]) -> Vec<u8> {
        let mut b = (cells.len() as u16).to_be_bytes().to_vec();
        for c in cells {
            match c {
                None => b.push(b'n'),
                Some(t) => {
                    b.push(b't');
                    b.extend_from_slice(&(t.len() as u32).to_be_bytes());
                    b.extend_from_slice(t.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn pgoutput_messages_decode() {
        let Decoded::Relation(rel) = decode(&relation_message()).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(rel.table, "orders");
        assert_eq!(rel.columns[2], ("paid".to_owned(), 16));

        let mut update = vec![b'U'];
        update.extend_from_slice(&16385u32.to_be_bytes());
        update.push(b'O');
        update.extend(tuple(&[Some("7"), Some("old"), Some("f")]));
        update.push(b'N');
        update.extend(tuple(&[Some("7"), None, Some("t")]));
        let Decoded::Change {
            operation,
            old,
            new,
            ..
        } = decode(&update).unwrap()
        else {
            panic!("not a change")
        };
        assert_eq!(operation, Operation::Update);
        assert_eq!(
            row(&rel, &old.unwrap()),
            json!({"id": 7, "note": "old", "paid": false})
        );
        assert_eq!(
            row(&rel, &new.unwrap()),
            json!({"id": 7, "note": null, "paid": true})
        );

        let mut begin = vec![b'B'];
        begin.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        begin.extend_from_slice(&0u64.to_be_bytes());
        begin.extend_from_slice(&741u32.to_be_bytes());
        assert_eq!(
            decode(&begin).unwrap(),
            Decoded::Begin {
                commit_lsn: 0x1_0000_0010,
                xid: 741
            }
        );
        let mut commit = vec![b'C', 0];
        commit.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        commit.extend_from_slice(&0x1_0000_0020u64.to_be_bytes());
        commit.extend_from_slice(&0u64.to_be_bytes());
        assert_eq!(
            decode(&commit).unwrap(),
            Decoded::Commit {
                end_lsn: 0x1_0000_0020
            }
        );
        assert!(decode(&[b'I', 0, 0]).is_err());
    }

    #[test]
    fn lsns_and_types() {
        assert_eq!(lsn_text(0x1_0000_0020), "1/20");
        assert_eq!(parse_lsn("1/20"), Some(0x1_0000_0020));
        assert_eq!(typed(114, "{\"a\":1}"), json!({"a": 1}));
        assert_eq!(typed(1700, "1.50"), json!("1.50"));
    }
}
