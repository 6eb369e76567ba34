//! PostgreSQL change data capture against the machine's PostgreSQL (with
//! wal_level = logical, which `.ci/run` sets). Without it a test fails in CI
//! and says so loudly elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use nimbus_queue::State;
use nimbus_sources::pg::{Conn, Target};
use std::time::Duration;
use support::*;

const PG: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn connect() -> Conn {
    Conn::connect(&Target::parse(PG).unwrap()).await.unwrap()
}

/// The machine's PostgreSQL with logical decoding on, or `None` (after a
/// loud warning) outside CI.
async fn pg() -> Option<Conn> {
    let usable = match Conn::connect(&Target::parse(PG).unwrap()).await {
        Ok(mut c) => {
            let level = c.execute("SHOW wal_level").await.unwrap();
            match level[0][0].as_deref() {
                Some("logical") => Ok(c),
                other => Err(format!("wal_level is {other:?}, not logical")),
            }
        }
        Err(e) => Err(e.to_string()),
    };
    service(
        &format!("PostgreSQL at {PG} with wal_level = logical"),
        "the PostgreSQL lines of .ci/run",
        usable,
    )
}

fn consumer(recorder: &Recorder, source: &str, relay_query: &str, extra: &str) -> String {
    let source = format!("type = \"postgres\"\nurl = \"{PG}\"\n{source}");
    relay_consumer(recorder, &source, relay_query, extra)
}

async fn slot_exists(conn: &mut Conn, slot: &str) -> bool {
    !conn
        .execute(&format!(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await
        .unwrap()
        .is_empty()
}

/// Capture starts once the consumer has created its slot.
async fn slot_created(slot: &str) {
    eventually(
        Duration::from_secs(10),
        "the slot to be created",
        || async {
            let mut c = connect().await;
            slot_exists(&mut c, slot).await.then_some(())
        },
    )
    .await;
}

/// Removing a source drops its slot.
async fn slot_dropped(slot: &str) {
    eventually(
        Duration::from_secs(20),
        "the slot to be dropped",
        || async {
            let mut c = connect().await;
            (!slot_exists(&mut c, slot).await).then_some(())
        },
    )
    .await;
}

/// Drops a test's replication slot and publication when the test ends,
/// passed or failed: a slot left behind holds the server's WAL for good.
/// Declared before the node, so it runs after the node was killed.
struct SlotCleanup(String);

impl Drop for SlotCleanup {
    fn drop(&mut self) {
        let slot = self.0.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let Ok(mut conn) = Conn::connect(&Target::parse(PG).unwrap()).await else {
                    return;
                };
                // The killed node's walsender may take a moment to let go.
                for _ in 0..50 {
                    let gone = conn
                        .execute(&format!(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                             WHERE slot_name = '{slot}' AND NOT active"
                        ))
                        .await
                        .is_ok()
                        && !slot_exists(&mut conn, &slot).await;
                    if gone {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let _ = conn
                    .execute(&format!("DROP PUBLICATION IF EXISTS {slot}"))
                    .await;
            });
        });
        let _ = cleanup.join();
    }
}

/// A ce-id's place in commit order: the commit's LSN, then the change's
/// index within it.
fn commit_order(ce_id: &str) -> (u64, usize) {
    let (lsn, index) = ce_id.rsplit_once('-').unwrap();
    let (hi, lo) = lsn.split_once('/').unwrap();
    (
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap(),
        index.parse().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_changes_survive_kill_9_in_commit_order() {
    const TRANSACTIONS: usize = 100;
    const ROWS: usize = 100;
    let Some(mut conn) = pg().await else {
        return;
    };
    let table = unique("cdc", "_");
    let slot = unique("nimbus_t", "_");
    let _cleanup = SlotCleanup(slot.clone());
    conn.execute(&format!(
        "CREATE TABLE {table} (id serial PRIMARY KEY, n int NOT NULL, note text)"
    ))
    .await
    .unwrap();
    conn.execute(&format!("ALTER TABLE {table} REPLICA IDENTITY FULL"))
        .await
        .unwrap();
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    let source = format!("tables = [\"{table}\"]\nslot = \"{slot}\"\nbatch = 500");
    node.deploy(&manifest(
        "events",
        &[("consume", &g.testbed, &consumer(&recorder, &source, "", ""))],
    ));
    slot_created(&slot).await;
    // 10,000 row changes in 100 transactions, written while the node runs,
    // dies and comes back.
    let writer = {
        let table = table.clone();
        tokio::spawn(async move {
            let mut c = connect().await;
            for t in 0..TRANSACTIONS {
                let from = t * ROWS;
                c.execute(&format!(
                    "INSERT INTO {table} (n) SELECT g FROM generate_series({from}, {}) g",
                    from + ROWS - 1
                ))
                .await
                .unwrap();
            }
        })
    };
    let total = TRANSACTIONS * ROWS;
    eventually(Duration::from_secs(120), "some changes to run", || async {
        (recorder.hits().len() >= total / 5).then_some(())
    })
    .await;
    let before = recorder.hits().len();
    let node = node.restart_after_kill9();
    writer.await.unwrap();
    eventually(Duration::from_secs(300), "every change to run", || async {
        (recorder.executions().len() >= total).then_some(())
    })
    .await;
    let hits = recorder.hits();
    let (distinct, duplicates) = tally(&recorder, "ce-id");
    eprintln!(
        "postgres, kill -9 after {before} of {total} changes: {} distinct changes ran, {duplicates} duplicate executions",
        distinct
    );
    assert_eq!(distinct, total, "every change ran at least once");
    // In commit order: each change first ran after every change committed
    // before it.
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<(u64, usize)> = hits
        .iter()
        .filter(|h| seen.insert(h.get("ce-id").to_owned()))
        .map(|h| commit_order(h.get("ce-id")))
        .collect();
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "changes ran out of commit order"
    );
    let hit = &hits[0];
    assert_eq!(hit.get("ce-type"), "postgres.row.insert");
    assert_eq!(hit.get("ce-pgtable"), format!("public.{table}"));
    assert_eq!(
        hit.get("ce-source"),
        format!("postgres://127.0.0.1:5432/test/public.{table}")
    );
    assert!(!hit.get("ce-pgxid").is_empty() && hit.get("ce-pglsn").contains('/'));
    let body: serde_json::Value = serde_json::from_str(hit.get("body")).unwrap();
    assert_eq!(body["new"]["n"], 0, "{body}");
    assert_eq!(body["old"], serde_json::Value::Null);

    // Updates and deletes carry the old row (REPLICA IDENTITY FULL).
    let mark = recorder.hits().len();
    conn.execute(&format!("UPDATE {table} SET note = 'paid' WHERE n = 5"))
        .await
        .unwrap();
    conn.execute(&format!("DELETE FROM {table} WHERE n = 6"))
        .await
        .unwrap();
    let later = eventually(
        Duration::from_secs(30),
        "the update and the delete",
        || async {
            let hits = recorder.hits();
            (hits.len() >= mark + 2).then(|| hits[mark..].to_vec())
        },
    )
    .await;
    let update: serde_json::Value = serde_json::from_str(later[0].get("body")).unwrap();
    assert_eq!(later[0].get("ce-type"), "postgres.row.update");
    assert_eq!(update["old"]["note"], serde_json::Value::Null);
    assert_eq!(update["new"]["note"], "paid");
    let delete: serde_json::Value = serde_json::from_str(later[1].get("body")).unwrap();
    assert_eq!(later[1].get("ce-type"), "postgres.row.delete");
    assert_eq!(delete["old"]["n"], 6);
    assert_eq!(delete["new"], serde_json::Value::Null);

    // Removing the source drops its slot and publication.
    node.deploy(&manifest("events", &[("consume", &g.testbed, "")]));
    eventually(
        Duration::from_secs(20),
        "the slot and the publication to be dropped",
        || async {
            let mut c = connect().await;
            let publication = c
                .execute(&format!(
                    "SELECT 1 FROM pg_publication WHERE pubname = '{slot}'"
                ))
                .await
                .unwrap();
            (!slot_exists(&mut c, &slot).await && publication.is_empty()).then_some(())
        },
    )
    .await;
    conn.execute(&format!("DROP TABLE {table}")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failures_are_dead_lettered_and_the_slot_moves_on() {
    let Some(mut conn) = pg().await else {
        return;
    };
    let table = unique("cdc_fail", "_");
    let slot = unique("nimbus_t", "_");
    let _cleanup = SlotCleanup(slot.clone());
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();

    // A table that does not exist refuses the deploy, naming it.
    let missing = format!("tables = [\"{table}\"]\nslot = \"{slot}\"");
    let out = node.deploy_cli(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &consumer(&recorder, &missing, "", ""),
        )],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("the table public.{table} does not exist")),
        "{err}"
    );

    conn.execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .unwrap();
    let source =
        format!("tables = [\"public.{table}\"]\nslot = \"{slot}\"\noperations = [\"insert\"]");
    node.deploy(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &consumer(
                &recorder,
                &source,
                "fail=99",
                "retry = { attempts = 2, initial_backoff = \"50ms\" }",
            ),
        )],
    ));
    slot_created(&slot).await;
    conn.execute(&format!("INSERT INTO {table} SELECT generate_series(1, 5)"))
        .await
        .unwrap();
    // Deletes are not among the operations: never delivered.
    conn.execute(&format!("DELETE FROM {table} WHERE id = 1"))
        .await
        .unwrap();
    let dlq = dead_letters(&node, 5).await;
    for r in &dlq {
        assert_eq!(r.state, State::Failed);
        assert_eq!(r.attempts.len(), 2, "{r:?}");
        assert_eq!(r.ce_type, "postgres.row.insert");
    }
    // The slot moved past them: a restarted node gets none of them again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let node = node.restart_after_kill9();
    source_healthy(&node).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        recorder.hits().len(),
        10,
        "two attempts each, no redelivery"
    );
    node.deploy(&manifest("events", &[("consume", &g.testbed, "")]));
    slot_dropped(&slot).await;
    conn.execute(&format!("DROP TABLE {table}")).await.unwrap();
}

/// With `concurrency` above 1, changes run at once (order is given up for
/// throughput), and the slot still moves past every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_changes_run_at_once_when_concurrency_allows() {
    const ROWS: usize = 20;
    let Some(mut conn) = pg().await else {
        return;
    };
    let table = unique("cdc_wide", "_");
    let slot = unique("nimbus_t", "_");
    let _cleanup = SlotCleanup(slot.clone());
    conn.execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .unwrap();
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    // Each report is answered only once four are in at the same time:
    // changes delivered one at a time would each wait alone.
    let source = format!("tables = [\"{table}\"]\nslot = \"{slot}\"\nconcurrency = 4");
    node.deploy(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &consumer(&recorder, &source, "hold=4", ""),
        )],
    ));
    slot_created(&slot).await;
    conn.execute(&format!(
        "INSERT INTO {table} SELECT generate_series(1, {ROWS})"
    ))
    .await
    .unwrap();
    let end = conn.execute("SELECT pg_current_wal_lsn()").await.unwrap()[0][0]
        .clone()
        .unwrap();
    eventually(Duration::from_secs(60), "every change to run", || async {
        (recorder.hits().len() >= ROWS).then_some(())
    })
    .await;
    let hits = recorder.hits();
    let (distinct, duplicates) = tally(&recorder, "ce-id");
    assert_eq!((distinct, duplicates), (ROWS, 0));
    let alone: Vec<_> = hits
        .iter()
        .filter(|h| h.get("held") != "together")
        .map(|h| h.get("ce-id").to_owned())
        .collect();
    assert!(alone.is_empty(), "changes that ran alone: {alone:?}");
    // Confirmed past the transaction once all of its changes are done.
    eventually(
        Duration::from_secs(10),
        "the slot to be confirmed past the changes",
        || async {
            let mut c = connect().await;
            let past = c
                .execute(&format!(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}' \
                     AND confirmed_flush_lsn >= '{end}'::pg_lsn"
                ))
                .await
                .unwrap();
            (!past.is_empty()).then_some(())
        },
    )
    .await;
    node.deploy(&manifest("events", &[("consume", &g.testbed, "")]));
    slot_dropped(&slot).await;
    conn.execute(&format!("DROP TABLE {table}")).await.unwrap();
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server of the test's own (the machine's is shared), with
/// logical decoding on, run as the `postgres` user on a free port, its data
/// in a temporary directory that outlives restarts.
fn own_postgres() -> Option<Daemon> {
    if !std::path::Path::new(PG_BIN).join("initdb").exists() {
        assert!(std::env::var_os("CI").is_none(), "CI needs {PG_BIN}/initdb");
        eprintln!("\n!!!!! SKIPPED: {PG_BIN}/initdb is not installed\n");
        return None;
    }
    Daemon::start("/usr/bin/setpriv", |port, dir| {
        let data = dir.join("data");
        if !data.exists() {
            let owned = std::process::Command::new("chown")
                .args(["postgres:postgres", &dir.display().to_string()])
                .status()
                .unwrap();
            assert!(owned.success());
            let init = std::process::Command::new("/usr/bin/setpriv")
                .args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
                .arg(format!("{PG_BIN}/initdb"))
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
                .arg(&data)
                .output()
                .unwrap();
            assert!(
                init.status.success(),
                "{}",
                String::from_utf8_lossy(&init.stderr)
            );
        }
        [
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            &format!("{PG_BIN}/postgres"),
            "-D",
            &data.display().to_string(),
            "-p",
            &port.to_string(),
            "-k",
            &dir.display().to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "wal_level=logical",
        ]
        .map(str::to_owned)
        .to_vec()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_source_recovers_from_a_server_crash() {
    const TRANSACTIONS: usize = 300;
    const ROWS: usize = 10;
    let Some(mut server) = own_postgres() else {
        return;
    };
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", server.port);
    let target = Target::parse(&url).unwrap();
    // Accepting connections comes a moment after the port opens.
    let mut conn = eventually(
        Duration::from_secs(30),
        "the server to accept logins",
        || async { Conn::connect(&target).await.ok() },
    )
    .await;
    conn.execute("CREATE TABLE readings (id serial PRIMARY KEY, n int NOT NULL)")
        .await
        .unwrap();
    let insert = |from: usize| {
        let rows: Vec<String> = (from..from + ROWS).map(|n| format!("({n})")).collect();
        format!("INSERT INTO readings (n) VALUES {}", rows.join(","))
    };
    let recorder = Recorder::start().await;
    let source = format!("type = \"postgres\"\nurl = \"{url}\"\ntables = [\"readings\"]");
    let node = consumer_node(&recorder, &source).await;
    for t in 0..TRANSACTIONS / 2 {
        conn.execute(&insert(t * ROWS)).await.unwrap();
    }
    eventually(Duration::from_secs(120), "some changes to run", || async {
        (recorder.hits().len() >= TRANSACTIONS * ROWS / 10).then_some(())
    })
    .await;
    // The server crashes mid-stream; committed transactions are in its WAL.
    server.stop("KILL");
    let at_crash = recorder.hits().len();
    source_unhealthy(&node).await;
    server.spawn();
    let mut conn = eventually(Duration::from_secs(60), "the server to recover", || async {
        Conn::connect(&target).await.ok()
    })
    .await;
    for t in TRANSACTIONS / 2..TRANSACTIONS {
        conn.execute(&insert(t * ROWS)).await.unwrap();
    }
    let n_of = |h: &Hit| -> Option<i64> {
        let body: serde_json::Value = serde_json::from_str(h.get("body")).ok()?;
        body["new"]["n"].as_i64()
    };
    eventually(Duration::from_secs(240), "every change to run", || async {
        let seen: std::collections::HashSet<i64> =
            recorder.hits().iter().filter_map(n_of).collect();
        (seen.len() >= TRANSACTIONS * ROWS).then_some(())
    })
    .await;
    let hits = recorder.hits();
    let seen: std::collections::HashSet<i64> = hits.iter().filter_map(n_of).collect();
    eprintln!(
        "postgres, server killed after {at_crash} of {} changes: {} distinct changes ran, {} duplicate executions",
        TRANSACTIONS * ROWS,
        seen.len(),
        hits.len() - seen.len()
    );
    assert_eq!(seen.len(), TRANSACTIONS * ROWS);
    assert!(
        seen.iter()
            .all(|n| (0..(TRANSACTIONS * ROWS) as i64).contains(n))
    );
    source_healthy(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_streams_through_bounded_memory() {
    const ROWS: usize = 10_000;
    const NOTE: usize = 4_000;
    // A server of its own: every slot on a server decodes every
    // transaction, and this one would slow the other tests' slots.
    let Some(server) = own_postgres() else {
        return;
    };
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", server.port);
    let target = Target::parse(&url).unwrap();
    let connect = || async { Conn::connect(&target).await.ok() };
    let mut conn = eventually(
        Duration::from_secs(30),
        "the server to accept logins",
        connect,
    )
    .await;
    let table = "big";
    let slot = "nimbus_big";
    conn.execute(&format!(
        "CREATE TABLE {table} (id serial PRIMARY KEY, note text NOT NULL)"
    ))
    .await
    .unwrap();
    let node = Node::start();
    let g = guests();
    let source = format!(
        "[[functions.consume.sources]]\ntype = \"postgres\"\nurl = \"{url}\"\ntables = [\"{table}\"]\nslot = \"{slot}\""
    );
    node.deploy(&manifest("events", &[("consume", &g.testbed, &source)]));
    eventually(
        Duration::from_secs(10),
        "the slot to be created",
        || async {
            let mut c = connect().await?;
            slot_exists(&mut c, slot).await.then_some(())
        },
    )
    .await;
    let before = peak_rss_kib(node.pid());
    // One transaction of 40 MB of row data.
    conn.execute(&format!(
        "INSERT INTO {table} (note) SELECT repeat(md5(g::text), {}) FROM generate_series(1, {ROWS}) g",
        NOTE / 32
    ))
    .await
    .unwrap();
    eventually(Duration::from_secs(240), "every change to run", || async {
        let s = node.status().await.sources.into_iter().next()?;
        (s.delivered >= ROWS as u64).then_some(())
    })
    .await;
    let grew = peak_rss_kib(node.pid()).saturating_sub(before);
    eprintln!(
        "postgres, one transaction of {} MB: the node's peak RSS grew by {} MiB",
        ROWS * NOTE / 1_000_000,
        grew / 1024
    );
    assert!(
        grew < 24 * 1024,
        "the node's peak memory grew by {grew} KiB for one transaction"
    );
    node.deploy(&manifest("events", &[("consume", &g.testbed, "")]));
    eventually(
        Duration::from_secs(20),
        "the slot to be dropped",
        || async {
            let mut c = connect().await?;
            (!slot_exists(&mut c, slot).await).then_some(())
        },
    )
    .await;
}
