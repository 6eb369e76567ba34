//! RabbitMQ sources against the machine's RabbitMQ (guest/guest on 5672).
//! Without it a test fails in CI and says so loudly elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use nimbus_queue::State;
use nimbus_sources::amqp::{Client, Target};
use std::time::Duration;
use support::*;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/";

async fn connect() -> Client {
    Client::connect(&Target::parse(AMQP).unwrap(), "nimbus-test")
        .await
        .unwrap()
}

/// The machine's RabbitMQ, or `None` (after a loud warning) outside CI.
async fn rabbit() -> Option<Client> {
    service(
        &format!("RabbitMQ at {AMQP}"),
        "rabbitmq-server -detached",
        Client::connect(&Target::parse(AMQP).unwrap(), "nimbus-test").await,
    )
}

/// Publishes `n` messages, then waits until the broker has handled them
/// (a later synchronous call on the same channel is answered after them).
async fn publish_many(client: &Client, queue: &str, prefix: &str, n: usize) {
    for i in 0..n {
        client
            .publish(queue, &[], format!("{prefix}{i}").as_bytes())
            .await
            .unwrap();
    }
    client.queue_exists(queue).await.unwrap();
}

fn consumer(recorder: &Recorder, queue: &str, relay_query: &str, extra: &str) -> String {
    let source = format!("type = \"amqp\"\nurl = \"{AMQP}\"\nqueue = \"{queue}\"\nconcurrency = 8");
    relay_consumer(recorder, &source, relay_query, extra)
}

/// Nothing ready in the queue, and a consumer on it.
async fn drained(client: &Client, queue: &str) -> bool {
    let (messages, consumers) = client.queue_exists(queue).await.unwrap();
    messages == 0 && consumers == 1
}

/// Nothing ready or unacknowledged in the machine's RabbitMQ queue (the
/// protocol's count leaves out what is delivered and unacknowledged), and
/// a consumer on it.
async fn settled(client: &Client, queue: &str) -> bool {
    if !drained(client, queue).await {
        return false;
    }
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .any(|(name, unacked)| name == queue && unacked.trim() == "0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_messages_survive_kill_9() {
    const N: usize = 10_000;
    let Some(client) = rabbit().await else {
        return;
    };
    let queue = unique("nimbus-test-jobs", "-");
    client.declare_queue(&queue).await.unwrap();
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "events",
        &[("consume", &g.testbed, &consumer(&recorder, &queue, "", ""))],
    ));
    let publisher = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let c = connect().await;
            c.publish(
                &queue,
                &[(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )],
                b"traced",
            )
            .await
            .unwrap();
            publish_many(&c, &queue, "m-", N).await;
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
        (recorder.executions_by("body").len() > N).then_some(())
    })
    .await;
    let (distinct, duplicates) = tally(&recorder, "body");
    eprintln!(
        "amqp, kill -9 after {before} of {N} executions: {} distinct messages ran, {duplicates} duplicate executions",
        distinct - 1
    );
    assert_eq!(distinct, N + 1, "every message ran at least once");
    let hits = recorder.hits();
    let traced = hits.iter().find(|h| h.get("body") == "traced").unwrap();
    assert_eq!(traced.get("ce-type"), "amqp.message");
    assert_eq!(
        traced.get("ce-source"),
        format!("amqp://127.0.0.1:5672//{queue}")
    );
    assert_eq!(traced.get("ce-amqpqueue"), queue);
    assert_eq!(traced.get("ce-amqproutingkey"), queue);
    assert!(
        traced
            .get("traceparent")
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "the publisher's trace continues: {:?}",
        traced.query
    );
    eventually(
        Duration::from_secs(30),
        "every message acknowledged",
        || async { settled(&client, &queue).await.then_some(()) },
    )
    .await;
    assert!(node.status().await.sources[0].healthy);
    client.delete_queue(&queue).await.unwrap();
}

/// Closes the broker side of the connections named `name`, as an operator
/// (or a broker under pressure) would.
fn close_connections(name: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let pids: Vec<String> = text
        .lines()
        .filter(|l| l.contains(name))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    for pid in &pids {
        std::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "closed by the test"])
            .status()
            .unwrap();
    }
    pids.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_failures_are_dead_lettered_and_acknowledged() {
    let Some(client) = rabbit().await else {
        return;
    };
    let queue = unique("nimbus-test-failing", "-");
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();

    // A queue that does not exist refuses the deploy, naming it.
    let out = node.deploy_cli(&manifest(
        "events",
        &[("consume", &g.testbed, &consumer(&recorder, &queue, "", ""))],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("the queue {queue} does not exist")),
        "{err}"
    );

    client.declare_queue(&queue).await.unwrap();
    node.deploy(&manifest(
        "events",
        &[(
            "consume",
            &g.testbed,
            &consumer(
                &recorder,
                &queue,
                "fail=99",
                "retry = { attempts = 2, initial_backoff = \"50ms\" }",
            ),
        )],
    ));
    // The broker closes the source's connection: it reconnects.
    let name = format!("nimbus:consume:{queue}");
    let closed = eventually(Duration::from_secs(60), "the source to connect", || async {
        let n = close_connections(&name);
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(closed, 1);
    publish_many(&client, &queue, "bad-", 20).await;
    let dlq = dead_letters(&node, 20).await;
    for r in &dlq {
        assert_eq!(r.state, State::Failed);
        assert_eq!(r.attempts.len(), 2, "{r:?}");
    }
    eventually(
        Duration::from_secs(30),
        "every message acknowledged",
        || async { settled(&client, &queue).await.then_some(()) },
    )
    .await;
    // Acknowledged: a restarted node gets none of them again.
    let node = node.restart_after_kill9();
    source_healthy(&node).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        recorder.hits().len(),
        40,
        "two attempts each, no redelivery"
    );
    client.delete_queue(&queue).await.unwrap();
}

/// A RabbitMQ node of the test's own (the machine's is shared), on free
/// ports with its data in a temporary directory that outlives restarts.
struct OwnRabbit {
    port: u16,
    dist_port: u16,
    dir: tempfile::TempDir,
    /// The start script, which ends when the broker does.
    script: std::sync::Mutex<Option<std::process::Child>>,
}

const RABBIT_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl OwnRabbit {
    /// Starts one, or returns `None` (loudly) outside CI when RabbitMQ is
    /// not installed.
    fn start() -> Option<OwnRabbit> {
        if !std::path::Path::new(RABBIT_SERVER).exists() {
            assert!(std::env::var_os("CI").is_none(), "CI needs {RABBIT_SERVER}");
            eprintln!("\n!!!!! SKIPPED: {RABBIT_SERVER} is not installed\n");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let rabbit = OwnRabbit {
            port: free_port(),
            dist_port: free_port(),
            dir,
            script: std::sync::Mutex::new(None),
        };
        std::fs::write(
            rabbit.dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{}\n", rabbit.port),
        )
        .unwrap();
        rabbit.spawn();
        Some(rabbit)
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/", self.port)
    }

    /// Starts the node (again) and waits until it accepts connections.
    fn spawn(&self) {
        let d = self.dir.path();
        let script = std::process::Command::new(RABBIT_SERVER)
            .env(
                "RABBITMQ_NODENAME",
                format!("nimbus-test-{}@localhost", self.port),
            )
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("plugins"))
            .env("HOME", d)
            .current_dir(d)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        *self.script.lock().unwrap() = Some(script);
        for _ in 0..600 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("RabbitMQ did not start on port {}", self.port);
    }

    /// Stops the broker's VM with `signal` and waits until it is gone.
    fn stop(&self, signal: &str) {
        let Ok(pid) = std::fs::read_to_string(self.dir.path().join("pid")) else {
            return;
        };
        let pid = pid.trim().to_owned();
        let _ = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status();
        for _ in 0..600 {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists()
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            {
                if let Some(mut script) = self.script.lock().unwrap().take() {
                    let _ = script.kill();
                    let _ = script.wait();
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("RabbitMQ (pid {pid}) did not stop");
    }
}

impl Drop for OwnRabbit {
    fn drop(&mut self) {
        self.stop("KILL");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_source_recovers_from_a_broker_restart() {
    const N: usize = 3_000;
    let Some(broker) = OwnRabbit::start() else {
        return;
    };
    let url = broker.url();
    let target = Target::parse(&url).unwrap();
    let client = Client::connect(&target, "nimbus-test").await.unwrap();
    let queue = "nimbus-test-restart";
    client.declare_queue(queue).await.unwrap();
    let recorder = Recorder::start().await;
    let source = format!("type = \"amqp\"\nurl = \"{url}\"\nqueue = \"{queue}\"\nconcurrency = 8");
    let node = consumer_node(&recorder, &source).await;
    publish_many(&client, queue, "before-", N / 2).await;
    eventually(Duration::from_secs(120), "some messages to run", || async {
        (recorder.hits().len() >= N / 10).then_some(())
    })
    .await;
    // A clean shutdown: the durable queue and its persistent messages,
    // including those delivered but not yet acknowledged, are on disk.
    broker.stop("TERM");
    let at_stop = recorder.hits().len();
    source_unhealthy(&node).await;
    broker.spawn();
    let client = Client::connect(&target, "nimbus-test").await.unwrap();
    publish_many(&client, queue, "after-", N / 2).await;
    eventually(Duration::from_secs(240), "every message to run", || async {
        (recorder.executions_by("body").len() >= N).then_some(())
    })
    .await;
    let (distinct, duplicates) = tally(&recorder, "body");
    eprintln!(
        "amqp, broker restarted after {at_stop} of {N} executions: {distinct} distinct messages ran, {duplicates} duplicate executions"
    );
    assert_eq!(distinct, N);
    source_healthy(&node).await;
    eventually(
        Duration::from_secs(30),
        "every message acknowledged",
        || async { drained(&client, queue).await.then_some(()) },
    )
    .await;
}
