//! Event sources against the real brokers on this machine. A test whose
//! broker is not running fails in CI and says so loudly elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use nimbus_queue::State;
use nimbus_sources::resp::{Conn, Target, Value};
use std::time::Duration;
use support::*;

const REDIS: &str = "redis://127.0.0.1:6379";

/// A connection to the machine's Redis, or `None` (after a loud warning)
/// when it is not running outside CI.
async fn redis() -> Option<Conn> {
    service(
        &format!("Redis at {REDIS}"),
        "redis-server --daemonize yes --port 6379 --save \"\" --appendonly no",
        Conn::connect(&Target::parse(REDIS).unwrap()).await,
    )
}

async fn xadd_many(conn: &mut Conn, stream: &str, n: usize, extra: &str) {
    for i in 0..n {
        conn.cmd(&[
            b"XADD",
            stream.as_bytes(),
            b"*",
            b"n",
            i.to_string().as_bytes(),
            b"extra",
            extra.as_bytes(),
        ])
        .await
        .unwrap();
    }
}

async fn pending(conn: &mut Conn, stream: &str, group: &str) -> i64 {
    let v = conn
        .cmd(&[b"XPENDING", stream.as_bytes(), group.as_bytes()])
        .await
        .unwrap();
    match v.into_array().into_iter().next() {
        Some(Value::Int(n)) => n,
        other => panic!("unexpected XPENDING answer {other:?}"),
    }
}

/// Waits until `group` holds no entry of `stream` pending in the Redis at
/// `url`.
async fn all_acknowledged(url: &str, stream: &str, group: &str) {
    eventually(
        Duration::from_secs(30),
        "every entry acknowledged",
        || async {
            let mut c = Conn::connect(&Target::parse(url).unwrap()).await.unwrap();
            (pending(&mut c, stream, group).await == 0).then_some(())
        },
    )
    .await;
}

/// Publishes `n` entries to `stream` while `node` runs, dies by `kill -9`
/// once a fifth of them ran, and comes back; returns the restarted node and
/// the executions before the kill, once every entry ran.
async fn publish_through_kill_9(
    node: Node,
    recorder: &Recorder,
    stream: &str,
    n: usize,
) -> (Node, usize) {
    let publisher = {
        let stream = stream.to_owned();
        tokio::spawn(async move {
            let mut c = Conn::connect(&Target::parse(REDIS).unwrap()).await.unwrap();
            xadd_many(&mut c, &stream, n, "").await;
        })
    };
    eventually(Duration::from_secs(120), "some entries to run", || async {
        (recorder.hits().len() >= n / 5).then_some(())
    })
    .await;
    let before = recorder.hits().len();
    let node = node.restart_after_kill9();
    publisher.await.unwrap();
    eventually(Duration::from_secs(240), "every entry to run", || async {
        (recorder.executions().len() >= n).then_some(())
    })
    .await;
    (node, before)
}

fn consumer(recorder: &Recorder, stream: &str, relay_query: &str, extra: &str) -> String {
    consumer_of(REDIS, recorder, stream, relay_query, extra)
}

fn consumer_of(
    redis: &str,
    recorder: &Recorder,
    stream: &str,
    relay_query: &str,
    extra: &str,
) -> String {
    let source = format!(
        "type = \"redis-stream\"\nurl = \"{redis}\"\nstream = \"{stream}\"\nconcurrency = 8\nbatch = 32\nclaim_idle = \"2s\""
    );
    relay_consumer(recorder, &source, relay_query, extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stream_messages_survive_kill_9() {
    const N: usize = 10_000;
    let Some(mut conn) = redis().await else {
        return;
    };
    let recorder = Recorder::start().await;
    let stream = unique("nimbus-test-orders", "-");
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "events",
        &[("consume", &g.testbed, &consumer(&recorder, &stream, "", ""))],
    ));
    let (node, before) = publish_through_kill_9(node, &recorder, &stream, N).await;
    let (distinct, duplicates) = tally(&recorder, "ce-id");
    eprintln!(
        "redis stream, kill -9 after {before} of {N} executions: {} distinct messages ran, {duplicates} duplicate executions",
        distinct
    );
    assert_eq!(distinct, N, "every entry ran at least once");
    let hit = recorder.hits().into_iter().next().unwrap();
    assert_eq!(hit.get("ce-type"), "redis.stream.entry");
    assert_eq!(
        hit.get("ce-source"),
        format!("redis://127.0.0.1:6379/0/{stream}")
    );
    assert_eq!(hit.get("nimbus-trigger"), "source");
    // Everything acknowledged in the end.
    let group = "nimbus-consume";
    all_acknowledged(REDIS, &stream, group).await;
    let status = node.status().await;
    assert_eq!(status.sources.len(), 1);
    assert!(status.sources[0].healthy, "{:?}", status.sources);
    conn.cmd(&[b"DEL", stream.as_bytes()]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stream_failures_are_dead_lettered_and_acknowledged() {
    let Some(mut conn) = redis().await else {
        return;
    };
    let recorder = Recorder::start().await;
    let stream = unique("nimbus-test-failing", "-");
    let node = Node::start();
    let g = guests();

    // A broker that cannot be reached refuses the deploy, naming the source.
    let unreachable = format!(
        "[[functions.consume.sources]]\ntype = \"redis-stream\"\nurl = \"redis://127.0.0.1:1\"\nstream = \"{stream}\"\n"
    );
    let out = node.deploy_cli(&manifest(
        "events",
        &[("consume", &g.testbed, &unreachable)],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("redis-stream:redis://127.0.0.1:1") && err.contains("cannot reach"),
        "{err}"
    );

    // The function always fails: each entry is tried twice, dead-lettered,
    // and acknowledged, so the broker does not deliver it again.
    node.deploy(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &consumer(
                &recorder,
                &stream,
                "fail=99",
                "retry = { attempts = 2, initial_backoff = \"50ms\" }",
            ),
        )],
    ));
    // The broker drops the source's connections: it reconnects.
    let name = format!("nimbus:consume:{stream}");
    let killed = eventually(Duration::from_secs(30), "the source to connect", || async {
        let mut c = Conn::connect(&Target::parse(REDIS).unwrap()).await.unwrap();
        let list = c
            .cmd(&[b"CLIENT", b"LIST"])
            .await
            .unwrap()
            .as_text()
            .unwrap();
        let ids: Vec<String> = list
            .lines()
            .filter(|l| l.contains(&format!(" name={name} ")))
            .filter_map(|l| l.split(' ').next()?.strip_prefix("id=").map(str::to_owned))
            .collect();
        for id in &ids {
            c.cmd(&[b"CLIENT", b"KILL", b"ID", id.as_bytes()])
                .await
                .unwrap();
        }
        (!ids.is_empty()).then_some(ids.len())
    })
    .await;
    assert_eq!(killed, 2, "a reader and an acknowledger");
    for i in 0..20 {
        conn.cmd(&[
            b"XADD",
            stream.as_bytes(),
            b"*",
            b"fail",
            b"99",
            b"n",
            i.to_string().as_bytes(),
        ])
        .await
        .unwrap();
    }
    let dlq = dead_letters(&node, 20).await;
    for r in &dlq {
        assert_eq!(r.state, State::Failed);
        assert_eq!(r.attempts.len(), 2, "{r:?}");
        assert!(r.ce_source.ends_with(&stream));
    }
    all_acknowledged(REDIS, &stream, "nimbus-consume").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        recorder.hits().len(),
        40,
        "two attempts each, no redelivery"
    );
    let status = node.status().await;
    assert_eq!(status.sources[0].dead_lettered, 20);
    let text = String::from_utf8_lossy(&node.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains("source") && text.contains("healthy"),
        "{text}"
    );
    conn.cmd(&[b"DEL", stream.as_bytes()]).await.unwrap();
}

/// Function `consume` taking entries of `stream` 25 at a time, two batches at
/// once, through the testbed's `relay-batch` (each event reported to
/// `recorder` with `relay_query`), with two attempts per entry.
fn batch_consumer(recorder: &Recorder, stream: &str, relay_query: &str) -> String {
    format!(
        "env = {{ ACTION = \"relay-batch\", RECORDER = \"{url}\", RELAY_QUERY = \"{relay_query}\" }}\n\
         allowed_outbound_hosts = [\"{url}\"]\n\
         retry = {{ attempts = 2, initial_backoff = \"50ms\" }}\n\
         [[functions.consume.sources]]\n\
         type = \"redis-stream\"\nurl = \"{REDIS}\"\nstream = \"{stream}\"\n\
         concurrency = 2\nevents_per_invocation = 25\nclaim_idle = \"2s\"\n",
        url = recorder.url
    )
}

/// Batched delivery loses nothing to a `kill -9` either: entries of batches
/// in flight stay pending in the group and run again after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stream_batches_survive_kill_9() {
    const N: usize = 5_000;
    let Some(mut conn) = redis().await else {
        return;
    };
    let recorder = Recorder::start().await;
    let stream = unique("nimbus-test-batches-killed", "-");
    let node = node_with_consumer(&batch_consumer(&recorder, &stream, "")).await;
    let (node, before) = publish_through_kill_9(node, &recorder, &stream, N).await;
    let (distinct, duplicates) = tally(&recorder, "ce-id");
    eprintln!(
        "redis stream in batches, kill -9 after {before} of {N} executions: {distinct} distinct entries ran, {duplicates} duplicate executions"
    );
    assert_eq!(distinct, N, "every entry ran at least once");
    all_acknowledged(REDIS, &stream, "nimbus-consume").await;
    assert!(node.status().await.sources[0].healthy);
    conn.cmd(&[b"DEL", stream.as_bytes()]).await.unwrap();
}

/// With `events_per_invocation`, entries that wait together reach the
/// function as one CloudEvents batch. Each entry keeps its own attempts:
/// the ones the function lists as failed (a partial batch response) are
/// tried again, then dead-lettered, while the rest of their batch is done,
/// and every entry is acknowledged once settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stream_entries_arrive_in_batches() {
    const N: usize = 400;
    let Some(mut conn) = redis().await else {
        return;
    };
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    let batched = |stream: &str, relay_query: &str| batch_consumer(&recorder, stream, relay_query);
    // Every entry's first attempt is reported failed, its second succeeds.
    let stream = unique("nimbus-test-batches", "-");
    node.deploy(&manifest(
        "events",
        &[("consume", &g.testbed, &batched(&stream, "fail=1"))],
    ));
    source_healthy(&node).await;
    xadd_many(&mut conn, &stream, N, "").await;
    eventually(
        Duration::from_secs(120),
        "every entry to run twice",
        || async { (recorder.hits().len() >= 2 * N).then_some(()) },
    )
    .await;
    let hits = recorder.hits();
    let (distinct, duplicates) = tally(&recorder, "ce-id");
    assert_eq!((distinct, duplicates), (N, N), "each entry tried twice");
    for id in recorder.executions().keys() {
        let mut attempts: Vec<&str> = hits
            .iter()
            .filter(|h| h.get("ce-id") == id)
            .map(|h| h.get("nimbus-attempt"))
            .collect();
        attempts.sort();
        assert_eq!(attempts, ["1", "2"], "{id}");
    }
    let sizes: Vec<usize> = hits
        .iter()
        .map(|h| h.get("batch-size").parse().unwrap())
        .collect();
    let largest = sizes.iter().copied().max().unwrap();
    eprintln!(
        "{N} entries in {} batches, the largest of {largest}",
        sizes.iter().map(|&n| 1.0 / n as f64).sum::<f64>().round()
    );
    assert!(
        (2..=25).contains(&largest),
        "entries published together share invocations, at most 25 each: {largest}"
    );
    let hit = &hits[0];
    assert_eq!(hit.get("ce-type"), "redis.stream.entry");
    assert_eq!(hit.get("ce-redisstream"), stream);
    assert_eq!(hit.get("content-type"), "application/json");
    assert!(hit.get("data").contains("\"n\""), "{:?}", hit.get("data"));
    assert_eq!(hit.get("traceparent").len(), 55);
    all_acknowledged(REDIS, &stream, "nimbus-consume").await;
    let status = node.status().await;
    assert_eq!(
        (status.sources[0].delivered, status.sources[0].dead_lettered),
        (N as u64, 0)
    );

    // Events failed on every attempt are dead-lettered one by one.
    let failing = unique("nimbus-test-batches-failing", "-");
    node.deploy(&manifest(
        "events",
        &[("consume", &g.testbed, &batched(&failing, "fail=99"))],
    ));
    source_healthy(&node).await;
    xadd_many(&mut conn, &failing, 30, "").await;
    let dlq = dead_letters(&node, 30).await;
    for r in &dlq {
        assert_eq!(r.state, State::Failed);
        assert_eq!(r.attempts.len(), 2, "{r:?}");
        assert!(
            r.attempts[1]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("batchItemFailures")),
            "{r:?}"
        );
    }
    all_acknowledged(REDIS, &failing, "nimbus-consume").await;
    for s in [&stream, &failing] {
        conn.cmd(&[b"DEL", s.as_bytes()]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stream_source_recovers_from_a_broker_restart() {
    const N: usize = 3_000;
    // A Redis of the test's own that keeps its data (an fsynced append-only
    // file), so it can be killed and started again.
    let Some(mut server) = Daemon::start("/usr/bin/redis-server", |port, dir| {
        [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir.display().to_string(),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ]
        .map(str::to_owned)
        .to_vec()
    }) else {
        return;
    };
    let url = format!("redis://127.0.0.1:{}", server.port);
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &consumer_of(&url, &recorder, "work", "", ""),
        )],
    ));
    let mut conn = Conn::connect(&Target::parse(&url).unwrap()).await.unwrap();
    xadd_many(&mut conn, "work", N / 2, "before").await;
    eventually(Duration::from_secs(120), "some entries to run", || async {
        (recorder.hits().len() >= N / 10).then_some(())
    })
    .await;
    // The broker dies mid-stream (kill -9) and comes back; the second half
    // is added once it is up, while the source is still reconnecting.
    server.stop("KILL");
    let at_kill = recorder.hits().len();
    source_unhealthy(&node).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.spawn();
    // Accepting connections is not answering: a Redis loading its
    // append-only file refuses commands (LOADING) for a while.
    let mut conn = eventually(
        Duration::from_secs(60),
        "the restarted redis to answer",
        || async { Conn::connect(&Target::parse(&url).unwrap()).await.ok() },
    )
    .await;
    xadd_many(&mut conn, "work", N / 2, "after").await;
    eventually(Duration::from_secs(240), "every entry to run", || async {
        (recorder.executions().len() >= N).then_some(())
    })
    .await;
    let (distinct, duplicates) = tally(&recorder, "ce-id");
    eprintln!(
        "redis stream, broker killed after {at_kill} of {N} executions and restarted: {} distinct entries ran, {duplicates} duplicate executions",
        distinct
    );
    assert_eq!(distinct, N);
    all_acknowledged(&url, "work", "nimbus-consume").await;
    assert!(node.status().await.sources[0].healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_passwords_never_show() {
    const CANARY: &str = "canary-5b7e0c1d";
    // A Redis of the test's own that requires a password.
    let Some(server) = Daemon::start("/usr/bin/redis-server", |port, dir| {
        [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir.display().to_string(),
            "--save",
            "",
            "--requirepass",
            CANARY,
        ]
        .map(str::to_owned)
        .to_vec()
    }) else {
        return;
    };
    let good = format!("redis://:{CANARY}@127.0.0.1:{}", server.port);
    let wrong = format!("redis://:{CANARY}-wrong@127.0.0.1:{}", server.port);
    let recorder = Recorder::start().await;
    let node = Node::start_with_env(
        tempfile::tempdir().unwrap(),
        &[("ORDERS_REDIS", good.as_str())],
    );
    let g = guests();

    // A wrong password written in the manifest: refused, without the
    // password in the error.
    let out = node.deploy_cli(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &consumer_of(&wrong, &recorder, "orders", "", ""),
        )],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains(":***@127.0.0.1") && !err.contains(CANARY),
        "{err}"
    );

    // The right one from the node's environment: it works.
    let source = "type = \"redis-stream\"\nurl_env = \"ORDERS_REDIS\"\nstream = \"orders\"";
    node.deploy(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &relay_consumer(&recorder, source, "", ""),
        )],
    ));
    source_healthy(&node).await;
    let mut conn = Conn::connect(&Target::parse(&good).unwrap()).await.unwrap();
    xadd_many(&mut conn, "orders", 3, "").await;
    eventually(Duration::from_secs(30), "3 entries to run", || async {
        (recorder.hits().len() >= 3).then_some(())
    })
    .await;

    // Nowhere a user or operator looks.
    let status = String::from_utf8_lossy(&node.cli(&["status", "-o", "json"]).stdout).into_owned();
    let text = String::from_utf8_lossy(&node.cli(&["status"]).stdout).into_owned();
    let logs = String::from_utf8_lossy(&node.cli(&["logs", "consume"]).stdout).into_owned();
    let ls = String::from_utf8_lossy(&node.cli(&["ls"]).stdout).into_owned();
    // The function's own status lists its source, healthy, with what it
    // delivered.
    let detail = eventually(Duration::from_secs(10), "the source's count", || async {
        let text = String::from_utf8_lossy(&node.cli(&["status", "consume"]).stdout).into_owned();
        text.contains(":orders healthy: 3 delivered, 0 dead-lettered")
            .then_some(text)
    })
    .await;
    let detail_json =
        String::from_utf8_lossy(&node.cli(&["status", "consume", "-o", "json"]).stdout)
            .into_owned();
    for (what, seen) in [
        ("status -o json", &status),
        ("status", &text),
        ("status consume", &detail),
        ("status consume -o json", &detail_json),
        ("logs", &logs),
        ("ls", &ls),
        ("the node's log", &node.log()),
    ] {
        assert!(
            !seen.contains(CANARY),
            "the password shows in {what}:\n{seen}"
        );
    }
    assert!(status.contains("$ORDERS_REDIS"), "{status}");

    // Or from a secrets file on the node.
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("orders-redis");
    std::fs::write(&file, format!("{good}\n")).unwrap();
    let source = format!(
        "type = \"redis-stream\"\nurl_file = \"{}\"\nstream = \"orders\"",
        file.display()
    );
    node.deploy(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &relay_consumer(&recorder, &source, "", ""),
        )],
    ));
    source_healthy(&node).await;
    let status = String::from_utf8_lossy(&node.cli(&["status", "-o", "json"]).stdout).into_owned();
    assert!(
        status.contains("file:") && !status.contains(CANARY),
        "{status}"
    );
    assert!(!node.log().contains(CANARY));
}
