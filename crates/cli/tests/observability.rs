//! Observability from the command line: `nimbus logs` (function output
//! stored with its invocation id, read back with filters, followed live),
//! `nimbus top` (live traffic per function), and alert rules reaching
//! their webhook.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use http::StatusCode;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn print(node: &Node, lines: u64) -> String {
    let reply = node.get(&format!("/t/print?lines={lines}")).await;
    assert_status(&reply, StatusCode::OK);
    reply.headers[nimbus_api::INVOCATION_ID_HEADER]
        .to_str()
        .unwrap()
        .to_owned()
}

/// Runs `nimbus logs` until its output contains `want` (lines are stored
/// asynchronously, a few milliseconds after the function wrote them).
fn logs_until(node: &Node, args: &[&str], want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = stdout(&node.cli(args));
        if text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "`{want}` never showed in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_stored_filtered_and_followed() {
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "logs",
        &[("chatty", &g.testbed, "routes = [\"/t/*\"]")],
    ));

    let first = print(&node, 3).await;
    let second = print(&node, 2).await;
    let all = logs_until(&node, &["logs", "chatty"], &second);
    let of_first: Vec<&str> = all.lines().filter(|l| l.contains(&first)).collect();
    assert_eq!(of_first.len(), 3, "{all}");
    assert!(of_first[2].ends_with("line 2 from the testbed"), "{all}");
    assert!(of_first[0].contains(" v1 "), "{all}");

    let only = stdout(&node.cli(&["logs", "chatty", "--invocation", &second]));
    assert_eq!(only.lines().count(), 2, "{only}");
    assert!(only.lines().all(|l| l.contains(&second)));
    let grep = stdout(&node.cli(&["logs", "chatty", "--grep", "line 2"]));
    assert_eq!(grep.lines().count(), 1, "{grep}");
    let recent = stdout(&node.cli(&["logs", "chatty", "--since", "1m", "--limit", "2"]));
    assert_eq!(recent.lines().count(), 2, "the newest 2: {recent}");
    assert!(recent.lines().all(|l| l.contains(&second)), "{recent}");
    let json = stdout(&node.cli(&["logs", "chatty", "-o", "json"]));
    let lines: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["stream"], "stdout");
    // In the node's own log, an output line says whose invocation it is,
    // what started it and where it sits in its trace.
    let log = node.log();
    let line: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["target"] == "nimbus::function" && l["invocation_id"] == first.as_str())
        .unwrap_or_else(|| panic!("no output line of {first} in:\n{log}"));
    for field in ["function", "version", "trigger", "trace_id", "span_id"] {
        assert!(!line[field].is_null(), "{field} missing: {line}");
    }
    assert_eq!(line["trigger"], "http");
    // The node keeps readings of the counters for the dashboard's charts.
    let history = eventually(
        Duration::from_secs(20),
        "a reading of the counters",
        || async {
            let points: Vec<serde_json::Value> = node
                .admin
                .call(
                    http::Method::GET,
                    "/v1/functions/chatty/history",
                    None::<&()>,
                )
                .await
                .unwrap();
            points.last().cloned()
        },
    )
    .await;
    assert!(
        history["counters"]["invocations"].as_u64() >= Some(2),
        "{history}"
    );
    assert_eq!(history["version"], 1);

    // Follow: lines written after `logs -f` started show up in it.
    let mut follower = Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args(["logs", "chatty", "-f", "--limit", "1"])
        .env("NIMBUS_DATA_DIR", node.data_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    // The past line first.
    let past = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(past.contains(&second), "{past}");
    let third = print(&node, 1).await;
    let live = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(
        live.contains(&third) && live.ends_with("line 0 from the testbed"),
        "{live}"
    );
    follower.kill().unwrap();
    follower.wait().unwrap();

    // A function writing megabytes is cut at the cap, with a marker.
    let flood = print(&node, 100_000).await;
    let cut = logs_until(
        &node,
        &[
            "logs",
            "chatty",
            "--invocation",
            &flood,
            "--grep",
            "truncated",
        ],
        "output truncated",
    );
    assert_eq!(cut.lines().count(), 1, "{cut}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_live_traffic() {
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "top",
        &[
            ("busy", &g.testbed, "routes = [\"/busy/*\"]"),
            ("idle", &g.testbed, "routes = [\"/idle/*\"]"),
        ],
    ));
    let url = node.url("/busy/ok");
    let traffic = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(4);
        let mut n = 0;
        while Instant::now() < until {
            let r = request(http::Method::GET, &url, bytes::Bytes::new()).await;
            assert_status(&r, StatusCode::OK);
            n += 1;
        }
        n
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = tokio::task::spawn_blocking({
        let dir = node.data_dir();
        move || {
            Command::new(env!("CARGO_BIN_EXE_nimbus"))
                .args(["top", "--once", "--interval", "1.5", "-o", "json"])
                .env("NIMBUS_DATA_DIR", dir)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let sent = traffic.await.unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["function"], "busy", "busiest first: {rows:?}");
    let rps = rows[0]["requests_per_s"].as_f64().unwrap();
    assert!(rps > 1.0 && sent > 0, "{rps} req/s while {sent} were sent");
    assert!(rows[0]["p50_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(rows[1]["requests_per_s"].as_f64().unwrap(), 0.0);
    // The text view has a header and both functions.
    let text = stdout(&node.cli(&["top", "--once", "--interval", "0.2"]));
    assert!(
        text.contains("REQ/S") && text.contains("busy") && text.contains("idle"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_and_resolve_through_their_webhook() {
    let recorder = Recorder::start().await;
    let node = Node::start();
    let g = guests();
    let extra = format!(
        "routes = [\"/svc/*\"]\nalerts = [{{ metric = \"error_rate\", above = 0.5, window = \"2s\", webhook = \"{}/alert?ce-id=hook&fail=1\" }}]",
        recorder.url
    );
    node.deploy(&manifest("alerting", &[("svc", &g.testbed, &extra)]));
    let notices = |state: &'static str| {
        let recorder = &recorder;
        move || async move {
            recorder
                .hits()
                .into_iter()
                .filter(|h| h.path == "/alert")
                .map(|h| serde_json::from_slice::<serde_json::Value>(&h.body).unwrap())
                .find(|n| n["state"] == state)
        }
    };
    // Every request fails: the error rate goes over 0.5.
    for _ in 0..10 {
        let reply = node.get("/svc/trap").await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let fired = eventually(
        Duration::from_secs(20),
        "the alert to fire",
        notices("firing"),
    )
    .await;
    assert_eq!(fired["function"], "svc");
    assert_eq!(fired["alert"], "error_rate");
    assert_eq!(fired["threshold"], 0.5);
    assert!(fired["value"].as_f64().unwrap() > 0.5, "{fired}");
    let states: Vec<serde_json::Value> = node
        .admin
        .call(http::Method::GET, "/v1/alerts", None::<&()>)
        .await
        .unwrap();
    assert_eq!(states[0]["firing"], true, "{states:?}");
    // Then only successes, long enough for the failures to leave the
    // window: it resolves.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_status(&node.get("/svc/ok").await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resolved = eventually(
        Duration::from_secs(20),
        "the alert to resolve",
        notices("resolved"),
    )
    .await;
    assert!(resolved["value"].as_f64().unwrap() <= 0.5, "{resolved}");
    let hits = recorder.hits();
    let log = node.log();
    assert!(
        log.contains("alert firing") && log.contains("alert resolved"),
        "{log}"
    );
    // One notice per change, not one per evaluation; the webhook failed
    // the first delivery, which was retried.
    let mut states: Vec<String> = hits
        .iter()
        .filter(|h| h.path == "/alert")
        .map(|h| {
            let n: serde_json::Value = serde_json::from_slice(&h.body).unwrap();
            n["state"].as_str().unwrap().to_owned()
        })
        .collect();
    states.sort();
    assert_eq!(states, ["firing", "firing", "resolved"]);
}

/// The test's OTLP receiver (`tests/otlp/receiver.py`, on the OpenTelemetry
/// project's own protobuf and gRPC definitions) on free ports: its gRPC
/// and HTTP endpoints, and the file it appends spans to. `None` (loudly)
/// outside CI when its Python packages are missing.
fn otlp_receiver() -> Option<(Daemon, u16, std::path::PathBuf)> {
    python_modules(
        "an OTLP receiver (Python grpcio and opentelemetry-proto)",
        "grpc, opentelemetry.proto.collector.trace.v1",
        "pip install grpcio opentelemetry-proto",
    )?;
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The daemon's port is the gRPC one; HTTP comes up first, then gRPC.
    let out = std::env::temp_dir().join(format!("nimbus-spans-{http}.jsonl"));
    let _ = std::fs::remove_file(&out);
    let file = out.display().to_string();
    let daemon = Daemon::start("python3", move |port, _| {
        vec![
            repo_root()
                .join("tests/otlp/receiver.py")
                .display()
                .to_string(),
            port.to_string(),
            http.to_string(),
            file.clone(),
        ]
    })?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", http)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((daemon, http, out))
}

/// The spans the receiver got so far.
fn received(out: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_real_otlp_receiver_over_grpc_and_http() {
    let Some((receiver, http, out)) = otlp_receiver() else {
        return;
    };
    let g = guests();
    for (protocol, endpoint) in [
        ("grpc", format!("http://127.0.0.1:{}", receiver.port)),
        ("http", format!("http://127.0.0.1:{http}")),
    ] {
        let node = Node::start_with_env(
            tempfile::tempdir().unwrap(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ],
        );
        node.deploy(&manifest(
            "traced",
            &[("svc", &g.testbed, "routes = [\"/t/*\"]")],
        ));
        // A caller's trace: the invocation's span is its child.
        let trace = format!("{:032x}", rand_u128());
        let caller_span = "00f067aa0ba902b7";
        let reply = nimbus_cli::client::send(
            http::Method::GET,
            &node.url("/t/ok"),
            &[("traceparent", &format!("00-{trace}-{caller_span}-01"))],
            bytes::Bytes::new(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        let id = reply.headers["nimbus-invocation-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let spans = eventually(Duration::from_secs(30), "the spans to arrive", || async {
            let spans: Vec<_> = received(&out)
                .into_iter()
                .filter(|s| s["trace_id"] == trace.as_str())
                .collect();
            (spans.len() >= 4).then_some(spans)
        })
        .await;
        let root = spans.iter().find(|s| s["parent"] == caller_span).unwrap();
        assert_eq!(root["via"], protocol);
        assert_eq!(root["service"], "nimbus");
        assert_eq!(root["name"], "http svc");
        assert_eq!(root["kind"], 2, "a server span");
        assert_eq!(root["attributes"]["faas.invocation_id"], id.as_str());
        assert_eq!(root["attributes"]["faas.coldstart"], true);
        assert_eq!(root["attributes"]["http.response.status_code"], 200);
        for step in ["admission", "instantiate", "execute"] {
            let s = spans.iter().find(|s| s["name"] == step).unwrap();
            assert_eq!(
                s["parent"], root["span_id"],
                "{step} is a step of the invocation"
            );
            assert!(s["start"].as_u64() >= root["start"].as_u64());
            assert!(s["end"].as_u64() <= root["end"].as_u64());
        }
        // A failed invocation's span says so.
        let failing = format!("{:032x}", rand_u128());
        let reply = nimbus_cli::client::send(
            http::Method::GET,
            &node.url("/t/trap"),
            &[("traceparent", &format!("00-{failing}-{caller_span}-01"))],
            bytes::Bytes::new(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        let failed = eventually(Duration::from_secs(30), "the failed span", || async {
            received(&out)
                .into_iter()
                .find(|s| s["trace_id"] == failing.as_str() && s["parent"] == caller_span)
        })
        .await;
        assert_eq!(failed["status"], 2, "status error: {failed}");
        // A queued invocation's attempt continues the caller's trace, its
        // span beginning with the wait in the queue.
        let queued = format!("{:032x}", rand_u128());
        let reply = nimbus_cli::client::send(
            http::Method::GET,
            &node.url("/t/ok"),
            &[
                ("traceparent", &format!("00-{queued}-{caller_span}-01")),
                ("nimbus-invocation-type", "async"),
            ],
            bytes::Bytes::new(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        let spans = eventually(Duration::from_secs(30), "the attempt's spans", || async {
            let spans: Vec<_> = received(&out)
                .into_iter()
                .filter(|s| s["trace_id"] == queued.as_str())
                .collect();
            (spans.len() >= 5).then_some(spans)
        })
        .await;
        let attempt = spans.iter().find(|s| s["parent"] == caller_span).unwrap();
        assert_eq!(attempt["attributes"]["nimbus.attempt"], 1, "{attempt}");
        let wait = spans.iter().find(|s| s["name"] == "queue").unwrap();
        assert_eq!(wait["parent"], attempt["span_id"]);
        assert_eq!(wait["start"], attempt["start"]);
        // Queued work without a caller's trace gets one of its own, whose
        // attempt is the root: no span points at a parent never recorded.
        let reply = nimbus_cli::client::send(
            http::Method::GET,
            &node.url("/t/ok"),
            &[("nimbus-invocation-type", "async")],
            bytes::Bytes::new(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        let id = reply.headers["nimbus-invocation-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let attempt = eventually(Duration::from_secs(30), "the untraced attempt", || async {
            received(&out)
                .into_iter()
                .find(|s| s["attributes"]["faas.invocation_id"] == id.as_str())
        })
        .await;
        assert_eq!(attempt["parent"], "", "a root span: {attempt}");
        let trace = attempt["trace_id"].as_str().unwrap().to_owned();
        let spans = eventually(Duration::from_secs(30), "its steps", || async {
            let spans: Vec<_> = received(&out)
                .into_iter()
                .filter(|s| s["trace_id"] == trace.as_str())
                .collect();
            (spans.len() >= 5).then_some(spans)
        })
        .await;
        for s in &spans {
            let parent = s["parent"].as_str().unwrap();
            assert!(
                parent.is_empty() || spans.iter().any(|p| p["span_id"] == parent),
                "{s} points at a span that was never recorded"
            );
        }
    }
    drop(receiver);
}

fn rand_u128() -> u128 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    t ^ (u128::from(std::process::id()) << 64) | 1
}
