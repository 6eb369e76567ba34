//! NATS sources against real NATS servers: the machine's (JetStream
//! enabled, port 4222) and, for the broker-restart test, one this test
//! starts itself. A test whose server is not there fails in CI and says so
//! loudly elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use nimbus_queue::State;
use nimbus_sources::nats::{Client, Target};
use serde_json::{Value, json};
use std::time::Duration;
use support::*;

const NATS: &str = "nats://127.0.0.1:4222";

async fn connect(url: &str) -> Client {
    Client::connect(&Target::parse(url).unwrap(), "nimbus-test")
        .await
        .unwrap()
}

/// The machine's NATS, or `None` (after a loud warning) when it is not
/// running outside CI.
async fn nats() -> Option<Client> {
    service(
        &format!("NATS with JetStream at {NATS}"),
        "nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server &",
        Client::connect(&Target::parse(NATS).unwrap(), "nimbus-test").await,
    )
}

async fn api(client: &Client, subject: &str, body: Value) -> Value {
    let payload = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let reply = client
        .request(subject, &payload, Duration::from_secs(5))
        .await
        .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

async fn create_stream(client: &Client, stream: &str, subjects: &str) {
    let v = api(
        client,
        &format!("$JS.API.STREAM.CREATE.{stream}"),
        json!({ "name": stream, "subjects": [subjects], "storage": "file" }),
    )
    .await;
    assert!(v.get("error").is_none(), "{v}");
}

async fn delete_stream(client: &Client, stream: &str) {
    api(
        client,
        &format!("$JS.API.STREAM.DELETE.{stream}"),
        Value::Null,
    )
    .await;
}

/// Publishes `n` messages, each stored by JetStream before the next.
async fn publish_many(client: &Client, subject: &str, n: usize, body: &str) {
    for i in 0..n {
        let reply = client
            .request(
                subject,
                format!("{body}{i}").as_bytes(),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        let ack: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert!(ack.get("seq").is_some(), "not stored: {ack}");
    }
}

async fn consumer_info(client: &Client, stream: &str, consumer: &str) -> Value {
    api(
        client,
        &format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
        Value::Null,
    )
    .await
}

/// Nothing delivered and unacknowledged, nothing left to deliver.
async fn settled(client: &Client, stream: &str, consumer: &str) -> bool {
    let info = consumer_info(client, stream, consumer).await;
    info["num_ack_pending"] == 0 && info["num_pending"] == 0
}

/// Waits until Nimbus's consumer on `stream` has acknowledged everything.
async fn all_acknowledged(client: &Client, stream: &str) {
    eventually(
        Duration::from_secs(30),
        "every message acknowledged",
        || async {
            settled(client, stream, "nimbus-consume")
                .await
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_messages_survive_kill_9() {
    const N: usize = 10_000;
    let Some(client) = nats().await else {
        return;
    };
    let recorder = Recorder::start().await;
    let stream = unique("NIMBUS_KILL", "_");
    let subject = stream.to_lowercase();
    create_stream(&client, &stream, &format!("{subject}.>")).await;
    let source = format!(
        "type = \"jetstream\"\nurl = \"{NATS}\"\nstream = \"{stream}\"\nack_wait = \"3s\"\nconcurrency = 8\nbatch = 32"
    );
    let node = consumer_node(&recorder, &source).await;
    // Published while the node runs, dies and comes back.
    let publisher = {
        let subject = format!("{subject}.created");
        tokio::spawn(async move {
            let c = connect(NATS).await;
            publish_many(&c, &subject, N, "order-").await;
        })
    };
    eventually(Duration::from_secs(120), "some messages to run", || async {
        (recorder.hits().len() >= N / 5).then_some(())
    })
    .await;
    let before = recorder.hits().len();
    let node = node.restart_after_kill9();
    publisher.await.unwrap();
    eventually(Duration::from_secs(240), "every message to run", || async {
        (recorder.executions().len() >= N).then_some(())
    })
    .await;
    let (distinct, duplicates) = tally(&recorder, "ce-id");
    eprintln!(
        "jetstream, kill -9 after {before} of {N} executions: {} distinct messages ran, {duplicates} duplicate executions",
        distinct
    );
    assert_eq!(distinct, N, "every message ran at least once");
    let hit = recorder
        .hits()
        .into_iter()
        .find(|h| h.get("ce-id") == "1")
        .unwrap();
    assert_eq!(hit.get("ce-type"), "nats.jetstream.message");
    assert_eq!(
        hit.get("ce-source"),
        format!("nats://127.0.0.1:4222/{stream}")
    );
    assert_eq!(hit.get("ce-natsstream"), stream);
    assert_eq!(hit.get("ce-natssequence"), "1");
    assert_eq!(hit.get("ce-natssubject"), format!("{subject}.created"));
    assert_eq!(hit.get("nimbus-trigger"), "source");
    assert_eq!(hit.get("body_len"), "7", "the payload `order-0`");
    all_acknowledged(&client, &stream).await;
    let status = node.status().await;
    assert_eq!(status.sources.len(), 1);
    assert!(status.sources[0].healthy, "{:?}", status.sources);
    delete_stream(&client, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_failures_are_dead_lettered_and_terminated() {
    let Some(client) = nats().await else {
        return;
    };
    let recorder = Recorder::start().await;
    let stream = unique("NIMBUS_FAIL", "_");
    let subject = stream.to_lowercase();
    let node = Node::start();
    let g = guests();

    // A stream that does not exist refuses the deploy, naming it; so does a
    // server that cannot be reached.
    let missing = format!("type = \"jetstream\"\nurl = \"{NATS}\"\nstream = \"{stream}\"");
    let out = node.deploy_cli(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &relay_consumer(&recorder, &missing, "", ""),
        )],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("the stream {stream} does not exist")),
        "{err}"
    );
    let unreachable = "type = \"jetstream\"\nurl = \"nats://127.0.0.1:1\"\nstream = \"S\"";
    let out = node.deploy_cli(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &relay_consumer(&recorder, unreachable, "", ""),
        )],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("jetstream:nats://127.0.0.1:1:S") && err.contains("cannot reach"),
        "{err}"
    );

    // The function always fails: each message is delivered twice (the
    // second time by JetStream, after the backoff), dead-lettered and
    // terminated, so it is never delivered again.
    create_stream(&client, &stream, &format!("{subject}.>")).await;
    let source =
        format!("type = \"jetstream\"\nurl = \"{NATS}\"\nstream = \"{stream}\"\nconcurrency = 4");
    node.deploy(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &relay_consumer(
                &recorder,
                &source,
                "fail=99",
                "retry = { attempts = 2, initial_backoff = \"200ms\" }",
            ),
        )],
    ));
    publish_many(&client, &format!("{subject}.x"), 20, "").await;
    let dlq = dead_letters(&node, 20).await;
    for r in &dlq {
        assert_eq!(r.state, State::Failed);
        assert_eq!(r.attempts.last().unwrap().n, 2, "{r:?}");
        assert!(r.ce_source.ends_with(&stream));
    }
    eventually(Duration::from_secs(30), "every message settled", || async {
        settled(&client, &stream, "nimbus-consume")
            .await
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hits = recorder.hits();
    assert_eq!(hits.len(), 40, "two deliveries each, none after");
    // The second delivery says so, and waited for the backoff.
    let second = hits
        .iter()
        .find(|h| h.get("ce-natsdelivered") == "2")
        .unwrap();
    let first = hits
        .iter()
        .find(|h| h.get("ce-id") == second.get("ce-id") && h.get("ce-natsdelivered") == "1")
        .unwrap();
    assert!(second.at - first.at >= Duration::from_millis(100));
    assert_eq!(node.status().await.sources[0].dead_lettered, 20);

    // Removing the source deletes its durable consumer.
    node.deploy(&manifest("events", &[("consume", &g.testbed, "")]));
    eventually(
        Duration::from_secs(10),
        "the consumer to be deleted",
        || async {
            let info = consumer_info(&client, &stream, "nimbus-consume").await;
            (info["error"]["code"] == 404).then_some(())
        },
    )
    .await;
    delete_stream(&client, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_subjects_reach_functions_with_their_trace() {
    let Some(client) = nats().await else {
        return;
    };
    let recorder = Recorder::start().await;
    let subject = unique("nimbus-core", "_").replace('_', ".");
    let source = format!("type = \"nats\"\nurl = \"{NATS}\"\nsubject = \"{subject}.*\"");
    let _node = consumer_node(&recorder, &source).await;
    // The subscription is made before the health turns; give the server a
    // round trip to register it.
    let probe = connect(NATS).await;
    probe
        .request("$JS.API.INFO", b"", Duration::from_secs(5))
        .await
        .unwrap();
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for i in 0..100 {
        client
            .publish_with_headers(
                &format!("{subject}.n{i}"),
                &[("traceparent", trace), ("Content-Type", "text/plain")],
                b"hello",
            )
            .await
            .unwrap();
    }
    let hits = eventually(Duration::from_secs(30), "100 messages to run", || async {
        let hits = recorder.hits();
        (hits.len() >= 100).then_some(hits)
    })
    .await;
    assert_eq!(hits.len(), 100);
    let hit = hits
        .iter()
        .find(|h| h.get("ce-natssubject") == format!("{subject}.n7"))
        .unwrap();
    assert_eq!(hit.get("ce-type"), "nats.message");
    assert_eq!(hit.get("content-type"), "text/plain");
    // The publisher's trace continues into the function.
    assert!(
        hit.get("traceparent")
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{:?}",
        hit.query
    );
}

/// A NATS server of the test's own, so it can be stopped and started.
fn own_nats() -> Option<Daemon> {
    Daemon::start("/usr/sbin/nats-server", |port, dir| {
        vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            dir.display().to_string(),
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_source_recovers_from_a_broker_restart() {
    const N: usize = 3_000;
    let Some(mut server) = own_nats() else {
        return;
    };
    let url = format!("nats://127.0.0.1:{}", server.port);
    let client = connect(&url).await;
    create_stream(&client, "WORK", "work.>").await;
    publish_many(&client, "work.item", N, "").await;
    drop(client);
    let recorder = Recorder::start().await;
    let source = format!(
        "type = \"jetstream\"\nurl = \"{url}\"\nstream = \"WORK\"\nstart = \"all\"\nack_wait = \"3s\"\nconcurrency = 4"
    );
    let node = consumer_node(&recorder, &source).await;
    eventually(Duration::from_secs(120), "some messages to run", || async {
        (recorder.hits().len() >= N / 5).then_some(())
    })
    .await;
    // The broker dies mid-stream (kill -9) and is down for a while.
    server.stop("KILL");
    let at_kill = recorder.hits().len();
    source_unhealthy(&node).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.spawn();
    eventually(Duration::from_secs(240), "every message to run", || async {
        (recorder.executions().len() >= N).then_some(())
    })
    .await;
    let (distinct, duplicates) = tally(&recorder, "ce-id");
    eprintln!(
        "jetstream, broker killed after {at_kill} of {N} executions and restarted: {} distinct messages ran, {duplicates} duplicate executions",
        distinct
    );
    assert_eq!(distinct, N);
    let client = connect(&url).await;
    all_acknowledged(&client, "WORK").await;
    assert!(node.status().await.sources[0].healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_notifications_become_object_events() {
    let Some(client) = nats().await else {
        return;
    };
    let recorder = Recorder::start().await;
    let stream = unique("NIMBUS_S3", "_");
    let subject = stream.to_lowercase();
    create_stream(&client, &stream, &format!("{subject}.>")).await;
    let source = format!(
        "type = \"jetstream\"\nurl = \"{NATS}\"\nstream = \"{stream}\"\nformat = \"s3\"\nconcurrency = 1"
    );
    let _node = consumer_node(&recorder, &source).await;
    // What MinIO publishes for a bucket notification target.
    let notification = r#"{"EventName":"s3:ObjectCreated:Put","Key":"photos/cat 1.jpg","Records":[
        {"eventVersion":"2.0","eventSource":"minio:s3","eventTime":"2026-11-27T06:00:00.000Z",
         "eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"photos"},
         "object":{"key":"cat+1.jpg","size":2048,"eTag":"9b2cf535f27731c974343645a3985328"}}},
        {"eventVersion":"2.0","eventSource":"minio:s3","eventTime":"2026-11-27T06:00:01.000Z",
         "eventName":"s3:ObjectRemoved:Delete","s3":{"bucket":{"name":"photos"},
         "object":{"key":"old.jpg"}}}]}"#;
    let target = format!("{subject}.minio");
    for body in [notification, "not a notification"] {
        client
            .request(&target, body.as_bytes(), Duration::from_secs(5))
            .await
            .unwrap();
    }
    let hits = eventually(Duration::from_secs(30), "3 events", || async {
        let hits = recorder.hits();
        (hits.len() >= 3).then_some(hits)
    })
    .await;
    assert_eq!(hits[0].get("ce-type"), "object.created");
    assert_eq!(hits[0].get("ce-source"), "s3://photos");
    assert_eq!(hits[0].get("ce-subject"), "cat 1.jpg");
    let created: Value = serde_json::from_str(hits[0].get("body")).unwrap();
    assert_eq!(created["key"], "cat 1.jpg");
    assert_eq!(created["size"], 2048);
    assert_eq!(created["etag"], "9b2cf535f27731c974343645a3985328");
    assert_eq!(hits[1].get("ce-type"), "object.deleted");
    assert_eq!(hits[1].get("ce-subject"), "old.jpg");
    // Anything else passes on as it is.
    assert_eq!(hits[2].get("ce-type"), "nats.jetstream.message");
    assert_eq!(hits[2].get("body"), "not a notification");
    all_acknowledged(&client, &stream).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(recorder.hits().len(), 3);
    delete_stream(&client, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_large_messages_come_in_byte_bounded_pulls() {
    const N: usize = 40;
    let Some(client) = nats().await else {
        return;
    };
    let stream = unique("NIMBUS_BIG", "_");
    let subject = format!("{}.x", stream.to_lowercase());
    create_stream(&client, &stream, &format!("{}.>", stream.to_lowercase())).await;
    // 40 messages of ~900 KB: a pull of the default batch asks for at most
    // 8 MiB, which the server answers with a few messages and a 409.
    let big = "x".repeat(900_000);
    for i in 0..N {
        let reply = client
            .request(
                &subject,
                format!("{i:03}{big}").as_bytes(),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert!(reply.payload.starts_with(b"{\"stream\""), "not stored");
    }
    let recorder = Recorder::start().await;
    let source = format!(
        "type = \"jetstream\"\nurl = \"{NATS}\"\nstream = \"{stream}\"\nstart = \"all\"\nconcurrency = 4"
    );
    let node = consumer_node(&recorder, &source).await;
    eventually(
        Duration::from_secs(120),
        "every large message to run",
        || async {
            let sizes: Vec<String> = recorder
                .hits()
                .iter()
                .map(|h| h.get("body_len").to_owned())
                .collect();
            (sizes.len() >= N).then_some(sizes)
        },
    )
    .await
    .iter()
    .for_each(|len| assert_eq!(len, "900003"));
    all_acknowledged(&client, &stream).await;
    // A spent byte budget ends a pull, it is no broker failure: the
    // session never broke.
    let status = node.status().await;
    assert!(status.sources[0].healthy);
    assert_eq!(status.sources[0].last_error, None, "{:?}", status.sources);
    delete_stream(&client, &stream).await;
}
