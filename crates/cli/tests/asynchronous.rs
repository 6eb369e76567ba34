//! Asynchronous invocations against a real node: durability across kill -9,
//! retry conformance, the dead-letter queue, destinations, idempotency,
//! webhooks and schedules. A recorder outside the node counts every
//! execution, so duplicates and losses are seen whatever the node reports.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use nimbus_api::AsyncAccepted;
use nimbus_cli::client;
use nimbus_queue::{InvocationRecord, State};
use std::collections::HashSet;
use std::time::Duration;
use support::*;

async fn submit(node: &Node, path: &str, headers: &[(&str, &str)], body: &str) -> AsyncAccepted {
    let mut all = vec![("nimbus-invocation-type", "async")];
    all.extend_from_slice(headers);
    let reply = client::send(
        Method::POST,
        &node.url(path),
        &all,
        Bytes::from(body.to_owned()),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_status(&reply, StatusCode::ACCEPTED);
    assert!(reply.headers.contains_key("location"));
    serde_json::from_slice(&reply.body).unwrap()
}

async fn record(node: &Node, id: &str) -> InvocationRecord {
    node.admin
        .call(Method::GET, &format!("/v1/invocations/{id}"), None::<&()>)
        .await
        .unwrap()
}

async fn settled(node: &Node, id: &str) -> InvocationRecord {
    eventually(
        Duration::from_secs(60),
        "the invocation to settle",
        || async {
            let r = record(node, id).await;
            matches!(r.state, State::Succeeded | State::Failed).then_some(r)
        },
    )
    .await
}

fn relay(recorder: &Recorder, extra: &str) -> String {
    format!(
        "env = {{ ACTION = \"relay\", RECORDER = \"{}\" }}\nallowed_outbound_hosts = [\"{}\"]\n{extra}",
        recorder.url, recorder.url
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_policy_into_the_dead_letter_queue() {
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    let flaky = relay(
        &recorder,
        &format!(
            "routes = [\"/flaky\"]\nretry = {{ attempts = 3, initial_backoff = \"200ms\", max_backoff = \"1s\" }}\n\
             destinations = {{ on_success = {{ function = \"audit\" }}, on_failure = {{ url = \"{}/failed\" }} }}",
            recorder.url
        ),
    );
    node.deploy(&manifest(
        "jobs",
        &[
            ("flaky", &g.testbed, &flaky),
            ("audit", &g.testbed, &relay(&recorder, "")),
        ],
    ));

    // Fails twice, succeeds on the third attempt.
    let ok = submit(
        &node,
        "/flaky?fail=2",
        &[("content-type", "text/plain")],
        "hello",
    )
    .await;
    let r = settled(&node, &ok.invocation_id).await;
    assert_eq!(r.state, State::Succeeded, "{r:?}");
    let statuses: Vec<Option<u16>> = r.attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [Some(500), Some(500), Some(200)]);
    // Equal jitter: the waits lie in the upper half of 200 ms, then 400 ms.
    let gap = |i: usize| r.attempts[i].started_at - r.attempts[i - 1].started_at;
    assert!(
        (100..=200 + 400).contains(&gap(1)),
        "first backoff {} ms",
        gap(1)
    );
    assert!(
        (200..=400 + 400).contains(&gap(2)),
        "second backoff {} ms",
        gap(2)
    );
    // The function saw the attempt number and the CloudEvents attributes.
    let hits: Vec<Hit> = recorder
        .hits()
        .into_iter()
        .filter(|h| h.get("ce-id") == ok.invocation_id)
        .collect();
    let attempts: Vec<&str> = hits.iter().map(|h| h.get("nimbus-attempt")).collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert_eq!(hits[0].get("ce-type"), "nimbus.invocation");
    assert_eq!(hits[0].get("ce-source"), "/nimbus/http/flaky");
    assert_eq!(hits[0].get("body_len"), "5");
    assert!(hits[0].get("ce-time").contains('T'));
    // On success, the audit function got the outcome as an event.
    let audited = eventually(
        Duration::from_secs(30),
        "the success destination",
        || async {
            recorder
                .hits()
                .into_iter()
                .find(|h| h.get("ce-type") == "nimbus.invocation.succeeded")
        },
    )
    .await;
    assert_eq!(audited.get("nimbus-trigger"), "destination");

    // Fails every time: exactly one dead-letter record after 3 attempts,
    // and the failure webhook receives the record.
    let bad = submit(&node, "/flaky?fail=99", &[], "x").await;
    let r = settled(&node, &bad.invocation_id).await;
    assert_eq!(r.state, State::Failed);
    assert_eq!(r.attempts.len(), 3);
    assert!(r.error.as_deref().unwrap().contains("3 of 3"), "{r:?}");
    let dlq: Vec<InvocationRecord> = node
        .admin
        .call(Method::GET, "/v1/functions/flaky/dlq", None::<&()>)
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].id, bad.invocation_id);
    let failed = eventually(Duration::from_secs(30), "the failure webhook", || async {
        recorder.hits().into_iter().find(|h| h.path == "/failed")
    })
    .await;
    let body: serde_json::Value = serde_json::from_slice(&failed.body).unwrap();
    assert_eq!(body["invocation_id"], bad.invocation_id.as_str());
    assert_eq!(body["status"], "failed");
    assert_eq!(body["attempts"], 3);

    // A 400 is not retried.
    let refused = submit(&node, "/flaky?fail=99&status=400", &[], "x").await;
    let r = settled(&node, &refused.invocation_id).await;
    assert_eq!((r.state, r.attempts.len()), (State::Failed, 1));
    assert!(r.error.unwrap().starts_with("not retryable"));

    // The CLI lists the dead-letter queue, redrives and purges it.
    let out = node.cli(&["dlq", "ls", "flaky"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&bad.invocation_id) && text.contains(&refused.invocation_id));
    let out = node.cli(&["dlq", "redrive", "flaky", "--id", &bad.invocation_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = eventually(Duration::from_secs(30), "the redriven attempts", || async {
        let r = record(&node, &bad.invocation_id).await;
        (r.state == State::Failed && r.attempts.len() == 6).then_some(r)
    })
    .await;
    assert_eq!(r.attempts.last().unwrap().n, 6);
    let out = node.cli(&["invocation", &bad.invocation_id]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 of 3 attempts failed"));
    let out = node.cli(&["dlq", "purge", "flaky"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("purged 2"));
    assert!(
        node.cli(&["dlq", "ls", "flaky"])
            .stdout
            .starts_with(b"INVOCATION")
    );
    let status = node.status().await;
    assert_eq!(status.dead_lettered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_runs_once() {
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "jobs",
        &[(
            "once",
            &g.testbed,
            &relay(&recorder, "routes = [\"/once/:order\"]"),
        )],
    ));
    let submissions = (0..5).map(|_| {
        let url = node.url("/once/42");
        tokio::spawn(async move {
            let reply = client::send(
                Method::POST,
                &url,
                &[
                    ("nimbus-invocation-type", "async"),
                    ("idempotency-key", "order-42"),
                ],
                Bytes::from_static(b"pay"),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
            assert_status(&reply, StatusCode::ACCEPTED);
            serde_json::from_slice::<AsyncAccepted>(&reply.body).unwrap()
        })
    });
    let mut accepted = Vec::new();
    for s in submissions {
        accepted.push(s.await.unwrap());
    }
    let ids: HashSet<&str> = accepted.iter().map(|a| a.invocation_id.as_str()).collect();
    assert_eq!(ids.len(), 1, "{accepted:?}");
    assert_eq!(accepted.iter().filter(|a| !a.duplicate).count(), 1);
    let id = accepted[0].invocation_id.clone();
    settled(&node, &id).await;
    // A later resubmission within the window is the same invocation.
    let again = submit(&node, "/once/42", &[("idempotency-key", "order-42")], "pay").await;
    assert_eq!(again.invocation_id, id);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(recorder.executions().get(&id), Some(&1));
    assert_eq!(recorder.hits().len(), 1);
    // Replayed later, the request still carries its route.
    assert_eq!(recorder.hits()[0].get("nimbus-route"), "/once/:order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_ten_thousand_queued_loses_nothing() {
    const N: usize = 10_000;
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "jobs",
        &[(
            "work",
            &g.testbed,
            &relay(
                &recorder,
                "routes = [\"/work\"]\nlimits = { async_concurrency = 4 }\nretry = { initial_backoff = \"100ms\" }",
            ),
        )],
    ));
    // 10,000 events and one poison event that traps every time, submitted
    // by 16 clients at once.
    let url = node.url("/work");
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in (c..N).step_by(16) {
                    let body = if i == N / 2 {
                        "poison".to_owned()
                    } else {
                        format!("event {i}")
                    };
                    let reply = client::send(
                        Method::POST,
                        &url,
                        &[("nimbus-invocation-type", "async")],
                        Bytes::from(body.clone()),
                        Duration::from_secs(30),
                    )
                    .await
                    .unwrap();
                    assert_status(&reply, StatusCode::ACCEPTED);
                    let a: AsyncAccepted = serde_json::from_slice(&reply.body).unwrap();
                    ids.push((a.invocation_id, body == "poison"));
                }
                ids
            })
        })
        .collect();
    let mut accepted = Vec::new();
    for c in clients {
        accepted.extend(c.await.unwrap());
    }
    assert_eq!(accepted.len(), N);
    let before = node.status().await;
    assert!(
        before.async_queued > 0,
        "the kill must find queued work: {before:?}"
    );
    let executed_before = recorder.hits().len();
    let node = node.restart_after_kill9();

    let status = eventually(Duration::from_secs(240), "the queue to drain", || async {
        let s = node.status().await;
        (s.async_queued == 0 && s.async_running == 0).then_some(s)
    })
    .await;
    assert_eq!(status.dead_lettered, 1, "only the poison event fails");
    let executions = recorder.executions();
    let mut lost = Vec::new();
    let mut duplicates = 0;
    for (id, poison) in &accepted {
        match executions.get(id) {
            None if !*poison => lost.push(id.clone()),
            Some(n) if *n > 1 => duplicates += n - 1,
            _ => {}
        }
    }
    eprintln!(
        "kill -9 with {} of {N} queued ({executed_before} executed before the kill): {} lost, {duplicates} duplicate executions",
        before.async_queued,
        lost.len()
    );
    assert!(lost.is_empty(), "lost {} invocations", lost.len());
    let poison = accepted.iter().find(|(_, p)| *p).unwrap();
    let r = record(&node, &poison.0).await;
    assert_eq!(r.state, State::Failed);
    assert_eq!(r.attempts.len(), 3);
    assert!(
        r.attempts
            .iter()
            .all(|a| a.error.as_deref() == Some("trap")),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_run_only_when_signed() {
    let recorder = Recorder::start().await;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with_env(
        dir,
        &[
            ("GH_SECRET", "It's a Secret to Everybody"),
            ("STRIPE_SECRET", "whsec_x"),
        ],
    );
    let g = guests();
    let gh = relay(
        &recorder,
        "routes = [{ path = \"/hooks/github\", methods = [\"POST\"], webhook = { preset = \"github\", secret_env = \"GH_SECRET\" } }]",
    );
    let stripe = relay(
        &recorder,
        "routes = [{ path = \"/hooks/stripe\", webhook = { preset = \"stripe\", secret_env = \"STRIPE_SECRET\" } }]",
    );
    node.deploy(&manifest(
        "hooks",
        &[("gh", &g.testbed, &gh), ("stripe", &g.testbed, &stripe)],
    ));
    let post = |path: &'static str, headers: Vec<(&'static str, String)>, body: &'static str| {
        let url = node.url(path);
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            client::send(
                Method::POST,
                &url,
                &h,
                Bytes::from_static(body.as_bytes()),
                Duration::from_secs(30),
            )
            .await
            .unwrap()
        }
    };
    let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17".to_owned();
    let ok = post(
        "/hooks/github",
        vec![
            ("x-hub-signature-256", good.clone()),
            ("x-github-event", "push".into()),
            ("x-github-delivery", "d-1".into()),
        ],
        "Hello, World!",
    )
    .await;
    assert_status(&ok, StatusCode::ACCEPTED);
    let first: AsyncAccepted = serde_json::from_slice(&ok.body).unwrap();
    // GitHub redelivers with the same delivery id: the same invocation.
    let again = post(
        "/hooks/github",
        vec![
            ("x-hub-signature-256", good),
            ("x-github-delivery", "d-1".into()),
        ],
        "Hello, World!",
    )
    .await;
    let second: AsyncAccepted = serde_json::from_slice(&again.body).unwrap();
    assert_eq!(second.invocation_id, first.invocation_id);
    let hit = eventually(Duration::from_secs(30), "the webhook to run", || async {
        recorder
            .hits()
            .into_iter()
            .find(|h| h.get("ce-id") == first.invocation_id)
    })
    .await;
    assert_eq!(hit.get("ce-type"), "com.github.push");
    assert_eq!(hit.get("nimbus-trigger"), "webhook");

    for (headers, why) in [
        (vec![], "no `x-hub-signature-256`"),
        (
            vec![("x-hub-signature-256", format!("sha256={}", "0".repeat(64)))],
            "does not match",
        ),
        (vec![("x-hub-signature-256", "md5=abc".into())], "malformed"),
    ] {
        let r = post("/hooks/github", headers, "Hello, World!").await;
        assert_status(&r, StatusCode::UNAUTHORIZED);
        assert!(r.text().contains(why), "{why}: {}", r.text());
    }

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let sign = |t: i64| {
        let sig = nimbus_gateway::webhook::sign_hex(b"whsec_x", format!("{t}.{{}}").as_bytes());
        format!("t={t},v1={sig}")
    };
    let fresh = post("/hooks/stripe", vec![("stripe-signature", sign(now))], "{}").await;
    assert_status(&fresh, StatusCode::ACCEPTED);
    let replayed = post(
        "/hooks/stripe",
        vec![("stripe-signature", sign(now - 3600))],
        "{}",
    )
    .await;
    assert_status(&replayed, StatusCode::UNAUTHORIZED);
    assert!(replayed.text().contains("tolerance"));

    // Refused deliveries were never queued.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gh_list: Vec<InvocationRecord> = node
        .admin
        .call(Method::GET, "/v1/functions/gh/invocations", None::<&()>)
        .await
        .unwrap();
    assert_eq!(gh_list.len(), 1);

    // A webhook whose secret is missing on the node is a deploy error.
    let missing = relay(
        &recorder,
        "routes = [{ path = \"/hooks/other\", webhook = { preset = \"github\", secret_env = \"NOT_SET_ANYWHERE\" } }]",
    );
    let out = node.deploy_cli(&manifest("other", &[("other", &g.testbed, &missing)]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT_SET_ANYWHERE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Schedule ticks (by their ce-time) recorded in the queue for `function`.
async fn ticks(node: &Node, function: &str) -> Vec<String> {
    let list: Vec<InvocationRecord> = node
        .admin
        .call(
            Method::GET,
            &format!("/v1/functions/{function}/invocations?limit=1000"),
            None::<&()>,
        )
        .await
        .unwrap();
    let mut t: Vec<String> = list
        .iter()
        .map(|r| {
            assert_eq!(r.ce_type, "nimbus.schedule");
            jiff::Timestamp::from_millisecond(r.ce_time)
                .unwrap()
                .to_string()
        })
        .collect();
    t.sort();
    t
}

fn seconds(ticks: &[String]) -> Vec<i64> {
    ticks
        .iter()
        .map(|t| t.parse::<jiff::Timestamp>().unwrap().as_second())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_fire_each_tick_once_across_a_restart() {
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "cron",
        &[
            (
                "every",
                &g.testbed,
                &relay(
                    &recorder,
                    "[[functions.every.schedules]]\ncron = \"* * * * * *\"\ncatch_up = \"all\"\npayload = '{\"job\":\"sweep\"}'",
                ),
            ),
            (
                "latest",
                &g.testbed,
                &relay(
                    &recorder,
                    "[[functions.latest.schedules]]\ncron = \"* * * * * *\"\ncatch_up = \"last\"",
                ),
            ),
        ],
    ));
    let listed = node.cli(&["schedules"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("* * * * * *") && text.contains("UTC"),
        "{text}"
    );

    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut node = node;
    node.kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let node = node.restart_after_kill9();
    tokio::time::sleep(Duration::from_millis(3500)).await;

    let every = seconds(&ticks(&node, "every").await);
    assert!(every.len() >= 8, "{every:?}");
    // catch_up = "all": one invocation per second, none skipped, none twice.
    for pair in every.windows(2) {
        assert_eq!(pair[1] - pair[0], 1, "ticks {every:?}");
    }
    let latest = seconds(&ticks(&node, "latest").await);
    let unique: HashSet<i64> = latest.iter().copied().collect();
    assert_eq!(unique.len(), latest.len(), "a tick fired twice: {latest:?}");
    // catch_up = "last": the outage left a gap of skipped ticks.
    assert!(
        latest.windows(2).any(|p| p[1] - p[0] >= 3),
        "no gap in {latest:?}"
    );
    // Each tick ran with its payload.
    let hit = recorder
        .hits()
        .into_iter()
        .find(|h| h.get("ce-type") == "nimbus.schedule")
        .unwrap();
    assert_eq!(hit.get("nimbus-trigger"), "schedule");
}

fn trace_of(traceparent: &str) -> &str {
    traceparent.split('-').nth(1).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_id_follows_the_work() {
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "traced",
        &[(
            "traced",
            &g.testbed,
            &relay(&recorder, "routes = [\"/traced\"]"),
        )],
    ));
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";

    // A request that carries a trace: the function sees the same trace with
    // its own span, its outbound request continues it, the caller gets the
    // trace id back.
    let reply = client::send(
        Method::GET,
        &node.url("/traced?sync=1"),
        &[("traceparent", caller)],
        Bytes::new(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_status(&reply, StatusCode::OK);
    assert_eq!(reply.headers["nimbus-trace-id"], trace);
    let hit = recorder
        .hits()
        .into_iter()
        .find(|h| h.get("sync") == "1")
        .unwrap();
    assert_eq!(trace_of(hit.get("traceparent")), trace);
    assert_ne!(hit.get("traceparent"), caller, "the function is a new span");
    assert_eq!(
        trace_of(hit.get("h-traceparent")),
        trace,
        "outbound continues it"
    );

    // Asynchronous work keeps the caller's trace across the queue.
    let queued = submit(&node, "/traced?async=1", &[("traceparent", caller)], "x").await;
    settled(&node, &queued.invocation_id).await;
    let hit = recorder
        .hits()
        .into_iter()
        .find(|h| h.get("async") == "1")
        .unwrap();
    assert_eq!(trace_of(hit.get("traceparent")), trace);

    // Without one, a trace starts and is answered.
    let reply = node.get("/traced?fresh=1").await;
    let started = reply.headers["nimbus-trace-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(started.len(), 32);
    let hit = recorder
        .hits()
        .into_iter()
        .find(|h| h.get("fresh") == "1")
        .unwrap();
    assert_eq!(trace_of(hit.get("traceparent")), started);
    // The node's summary line of the invocation carries it too, with the
    // billed duration and the instance's peak memory.
    let line = eventually(Duration::from_secs(10), "the summary line", || async {
        node.log()
            .lines()
            .find(|l| l.contains(&format!("\"trace_id\":\"{started}\"")))
            .map(str::to_owned)
    })
    .await;
    let summary: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(summary["billed_ms"].as_u64().unwrap() >= 1, "{line}");
    assert!(summary["peak_memory_bytes"].as_u64().unwrap() > 0, "{line}");
    assert_eq!(summary["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_notifications_on_a_route_become_object_events() {
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    let f = relay(
        &recorder,
        "routes = [{ path = \"/hooks/minio\", methods = [\"POST\"], format = \"s3\" }]",
    );
    node.deploy(&manifest("objects", &[("thumbs", &g.testbed, &f)]));
    // What MinIO's webhook target posts.
    let notification = r#"{"EventName":"s3:ObjectCreated:Put","Key":"photos/a b.png","Records":[
        {"eventVersion":"2.0","eventSource":"minio:s3","eventTime":"2026-11-27T06:00:00.000Z",
         "eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"photos"},
         "object":{"key":"a+b.png","size":512,"eTag":"d41d8cd98f00b204e9800998ecf8427e"}}},
        {"eventVersion":"2.0","eventSource":"minio:s3","eventTime":"2026-11-27T06:00:01.000Z",
         "eventName":"s3:ObjectRemoved:Delete","s3":{"bucket":{"name":"photos"},
         "object":{"key":"old.png"}}}]}"#;
    let reply = client::send(
        Method::POST,
        &node.url("/hooks/minio"),
        &[("content-type", "application/json")],
        Bytes::from_static(notification.as_bytes()),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    let accepted: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(accepted["invocation_ids"].as_array().unwrap().len(), 2);
    let hits = eventually(Duration::from_secs(30), "2 object events", || async {
        let mut hits = recorder.hits();
        hits.sort_by_key(|h| h.get("ce-type").to_owned());
        (hits.len() >= 2).then_some(hits)
    })
    .await;
    assert_eq!(hits[0].get("ce-type"), "object.created");
    assert_eq!(hits[0].get("ce-source"), "s3://photos");
    let created: serde_json::Value = serde_json::from_str(hits[0].get("body")).unwrap();
    assert_eq!(created["key"], "a b.png");
    assert_eq!(created["size"], 512);
    assert_eq!(hits[1].get("ce-type"), "object.deleted");
    assert_eq!(hits[1].get("nimbus-trigger"), "http");

    // Anything else is refused, and nothing runs.
    let reply = client::send(
        Method::POST,
        &node.url("/hooks/minio"),
        &[],
        Bytes::from_static(b"{\"hello\":1}"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&reply.body).contains("Records"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(recorder.hits().len(), 2);
}
