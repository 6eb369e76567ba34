//! MQTT sources against a real Mosquitto the test starts itself (on a free
//! port, with persistence and no cap on what it queues for a session), so
//! a test can restart it. Publishing goes through `mosquitto_pub`. Without
//! Mosquitto a test fails in CI and says so loudly elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use nimbus_queue::State;
use std::io::Write;
use std::time::Duration;
use support::*;

fn mosquitto() -> Option<Daemon> {
    Daemon::start("/usr/sbin/mosquitto", |port, dir| {
        // Started as root, Mosquitto drops to its own user, which must be
        // able to write its database here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 0\n",
                dir.display()
            ),
        )
        .unwrap();
        vec!["-c".into(), conf.display().to_string()]
    })
}

/// Publishes one QoS 1 message per line with the Mosquitto client.
fn publish(port: u16, topic: &str, lines: Vec<String>) {
    let mut child = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-l",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (Debian's mosquitto-clients)");
    let mut stdin = child.stdin.take().unwrap();
    for l in lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

fn consumer(recorder: &Recorder, port: u16, relay_query: &str, extra: &str) -> String {
    let source = format!(
        "type = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{port}\"\ntopics = [\"plant/+/temp\", \"alerts/#\"]\nconcurrency = 8"
    );
    relay_consumer(recorder, &source, relay_query, extra)
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_messages_survive_kill_9() {
    const N: usize = 10_000;
    let Some(broker) = mosquitto() else {
        return;
    };
    let port = broker.port;
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "events",
        &[("consume", &g.testbed, &consumer(&recorder, port, "", ""))],
    ));
    source_healthy(&node).await;
    // Published while the node runs, dies and comes back: the broker keeps
    // the session's messages meanwhile.
    let publisher =
        tokio::task::spawn_blocking(move || publish(port, "plant/7/temp", numbered("m-", N)));
    eventually(Duration::from_secs(120), "some messages to run", || async {
        (recorder.hits().len() >= N / 5).then_some(())
    })
    .await;
    let before = recorder.hits().len();
    let node = node.restart_after_kill9();
    publisher.await.unwrap();
    eventually(Duration::from_secs(240), "every message to run", || async {
        (recorder.executions_by("body").len() >= N).then_some(())
    })
    .await;
    let (distinct, duplicates) = tally(&recorder, "body");
    eprintln!(
        "mqtt, kill -9 after {before} of {N} executions: {} distinct messages ran, {duplicates} duplicate executions",
        distinct
    );
    assert_eq!(distinct, N, "every message ran at least once");
    let bodies = recorder.executions_by("body");
    assert!(bodies.contains_key("m-0") && bodies.contains_key("m-9999"));
    let hit = recorder.hits().into_iter().next().unwrap();
    assert_eq!(hit.get("ce-type"), "mqtt.message");
    assert_eq!(hit.get("ce-source"), format!("mqtt://127.0.0.1:{port}"));
    assert_eq!(hit.get("ce-mqtttopic"), "plant/7/temp");
    assert_eq!(hit.get("ce-subject"), "plant/7/temp");
    assert_eq!(hit.get("ce-mqttqos"), "1");
    // Every message acknowledged: after another restart nothing comes back.
    let settled = recorder.hits().len();
    let node = node.restart_after_kill9();
    source_healthy(&node).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        recorder.hits().len() - settled <= 8,
        "at most the messages in flight at the kill come back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_failures_are_dead_lettered_and_acknowledged() {
    let Some(broker) = mosquitto() else {
        return;
    };
    let port = broker.port;
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();

    // A broker that cannot be reached refuses the deploy, naming the source.
    let out = node.deploy_cli(&manifest(
        "events",
        &[("consume", &g.testbed, &consumer(&recorder, 1, "", ""))],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mqtt:mqtt://127.0.0.1:1") && err.contains("cannot reach"),
        "{err}"
    );

    node.deploy(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &consumer(
                &recorder,
                port,
                "fail=99",
                "retry = { attempts = 2, initial_backoff = \"50ms\" }",
            ),
        )],
    ));
    source_healthy(&node).await;
    publish(port, "alerts/boiler/pressure", numbered("bad-", 20));
    let dlq = dead_letters(&node, 20).await;
    for r in &dlq {
        assert_eq!(r.state, State::Failed);
        assert_eq!(r.attempts.len(), 2, "{r:?}");
    }
    // Acknowledged: a new session gets none of them again.
    let node = node.restart_after_kill9();
    source_healthy(&node).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        recorder.hits().len(),
        40,
        "two attempts each, no redelivery"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_source_recovers_from_a_broker_restart() {
    const N: usize = 3_000;
    let Some(mut broker) = mosquitto() else {
        return;
    };
    let port = broker.port;
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "events",
        &[("consume", &g.testbed, &consumer(&recorder, port, "", ""))],
    ));
    source_healthy(&node).await;
    let (before, after): (Vec<String>, Vec<String>) = numbered("r-", N)
        .into_iter()
        .partition(|m| m[2..].parse::<usize>().unwrap() < N / 2);
    publish(port, "plant/1/temp", before);
    eventually(Duration::from_secs(120), "some messages to run", || async {
        (recorder.hits().len() >= N / 10).then_some(())
    })
    .await;
    // The broker restarts mid-stream (a clean shutdown, which writes its
    // sessions to disk). The second half is published as soon as it is
    // back, while the node is still reconnecting: the session and its
    // subscription survived the restart, so the broker queues them.
    broker.stop("TERM");
    let at_stop = recorder.hits().len();
    source_unhealthy(&node).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.spawn();
    publish(port, "plant/1/temp", after);
    eventually(Duration::from_secs(240), "every message to run", || async {
        (recorder.executions_by("body").len() >= N).then_some(())
    })
    .await;
    let (distinct, duplicates) = tally(&recorder, "body");
    eprintln!(
        "mqtt, broker restarted after {at_stop} of {N} executions: {} distinct messages ran, {duplicates} duplicate executions",
        distinct
    );
    assert_eq!(distinct, N);
    let status = node.status().await;
    assert!(status.sources[0].healthy, "{:?}", status.sources);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_session_outlives_the_node_and_carries_properties() {
    const N: usize = 500;
    let Some(broker) = mosquitto() else {
        return;
    };
    let port = broker.port;
    let recorder = Recorder::start().await;
    let source = format!(
        "type = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{port}\"\ntopics = [\"plant/+/temp\"]\nversion = \"5\"\nconcurrency = 4"
    );
    let mut node = consumer_node(&recorder, &source).await;
    // MQTT 5 properties: a content type and the publisher's trace.
    let out = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            "mqttv5",
            "-q",
            "1",
        ])
        .args(["-t", "plant/1/temp", "-m", "{\"c\":21}"])
        .args(["-D", "publish", "content-type", "application/json"])
        .args(["-D", "publish", "user-property", "traceparent"])
        .arg("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .args(["-D", "publish", "user-property", "Sensor-Room", "boiler"])
        .output()
        .expect("mosquitto_pub");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hit = eventually(Duration::from_secs(30), "the first message", || async {
        recorder.hits().into_iter().next()
    })
    .await;
    assert_eq!(hit.get("body"), "{\"c\":21}");
    assert_eq!(
        hit.get("content-type"),
        "application/json",
        "{:?}",
        hit.query
    );
    assert!(
        hit.get("traceparent")
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{:?}",
        hit.query
    );
    assert_eq!(hit.get("ce-mqtttopic"), "plant/1/temp");
    assert_eq!(hit.get("mqtt-property-sensor-room"), "boiler");

    // Published while the node is down: the session (which never expires)
    // keeps them for the node's return.
    node.kill9();
    publish(port, "plant/2/temp", numbered("down-", N));
    let _node = node.restart_after_kill9();
    eventually(Duration::from_secs(120), "every message to run", || async {
        (recorder.executions_by("body").len() > N).then_some(())
    })
    .await;
    let (distinct, duplicates) = tally(&recorder, "body");
    eprintln!(
        "mqtt 5, {N} published while the node was down: {} ran, {duplicates} duplicates",
        distinct - 1
    );
    assert_eq!(distinct, N + 1);
}
