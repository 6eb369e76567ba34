//! Limits hold per request, against a real node: timeouts, memory caps,
//! traps, concurrency, body sizes, and streaming of large bodies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_functions_fail_alone() {
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "limits",
        &[
            (
                "spin",
                &g.testbed,
                "routes = [\"/spin/*\"]\nlimits = { timeout = \"3s\" }",
            ),
            (
                "bomb",
                &g.testbed,
                "routes = [\"/bomb/*\"]\nlimits = { memory = 32 }",
            ),
            (
                "ok",
                &g.testbed,
                "routes = [\"/ok/*\"]\nenv = { VERSION = \"fine\" }",
            ),
        ],
    ));

    // Two infinite loops (one per core) while another function answers.
    let started = Instant::now();
    let spins: Vec<_> = (0..2)
        .map(|_| {
            let url = node.url("/spin/spin");
            tokio::spawn(async move {
                (
                    request(Method::GET, &url, Bytes::new()).await,
                    Instant::now(),
                )
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        let r = node.get("/ok/ok").await;
        assert_status(&r, StatusCode::OK);
        assert_eq!(r.text(), "ok fine");
    }
    assert!(
        spins.iter().all(|s| !s.is_finished()),
        "the other function must answer while the guests are still looping"
    );
    for spin in spins {
        let (r, done) = spin.await.unwrap();
        assert_status(&r, StatusCode::GATEWAY_TIMEOUT);
        let err: nimbus_api::ErrorResponse = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(err.error.code, "timeout");
        // The timeout (3 s) holds within a second.
        assert!(
            done - started < Duration::from_secs(4),
            "timeout took {:?}",
            done - started
        );
    }

    // Memory bomb: growth fails at the cap, the guest aborts, 500.
    let r = node.get("/bomb/membomb").await;
    assert_status(&r, StatusCode::INTERNAL_SERVER_ERROR);
    let err: nimbus_api::ErrorResponse = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(err.error.code, "memory_limit", "{}", r.text());

    // Stack overflow, explicit trap, no response: 500 each.
    for (path, code) in [
        ("/ok/stack", "trap"),
        ("/ok/trap", "trap"),
        ("/ok/noresponse", "no_response"),
    ] {
        let r = node.get(path).await;
        assert_status(&r, StatusCode::INTERNAL_SERVER_ERROR);
        let err: nimbus_api::ErrorResponse = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(err.error.code, code, "{path}: {}", r.text());
    }
    // The node logs the reasons.
    let log = node.log();
    assert!(log.contains("stack overflow"), "{log}");
    assert!(log.contains("exceeded its memory limit of 32 MiB"), "{log}");

    // And keeps serving.
    assert_eq!(node.get("/ok/ok").await.text(), "ok fine");
    assert_eq!(node.get("/bomb/ok").await.status, StatusCode::OK);

    // Every outcome is counted in the Prometheus metrics (token required).
    let r = node
        .admin
        .raw(Method::GET, "/metrics", "text/plain", Bytes::new())
        .await
        .unwrap();
    assert_status(&r, StatusCode::OK);
    let text = r.text();
    for line in [
        r#"faas_invocations_total{function="ok",version="1"} 9"#,
        r#"faas_errors_total{function="ok",version="1",kind="trap"} 2"#,
        r#"faas_errors_total{function="ok",version="1",kind="other"} 1"#,
        r#"faas_timeouts_total{function="spin",version="1"} 2"#,
        r#"faas_errors_total{function="bomb",version="1",kind="trap"} 1"#,
        r#"faas_coldstarts_total{function="ok",version="1"} 1"#,
        r#"faas_invoke_duration_seconds_count{function="ok",version="1"} 9"#,
        r#"nimbus_in_flight{function="ok",version="1"} 0"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    let anonymous = nimbus_cli::client::send(
        Method::GET,
        &format!("{}/metrics", node.admin.url),
        &[],
        Bytes::new(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_concurrency_requests_get_429_never_hang() {
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "narrow",
        &[(
            "narrow",
            &g.testbed,
            "routes = [\"/narrow/*\"]\nlimits = { max_concurrency = 4 }",
        )],
    ));
    let url = node.url("/narrow/sleep?ms=100");
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { request(Method::GET, &url, Bytes::new()).await })
        })
        .collect();
    let all = tokio::time::timeout(Duration::from_secs(120), futures_join(tasks))
        .await
        .expect("requests hung");
    let ok = all.iter().filter(|r| r.status == StatusCode::OK).count();
    let throttled: Vec<_> = all
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(ok + throttled.len(), 500, "only 200 and 429 are expected");
    assert!(ok >= 4, "{ok} succeeded");
    assert!(!throttled.is_empty(), "nothing was throttled");
    assert!(
        throttled
            .iter()
            .all(|r| r.headers.get("retry-after").is_some())
    );
}

async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A request body of `remaining` zero bytes, produced chunk by chunk.
struct Zeros {
    remaining: u64,
    chunk: Bytes,
}

impl Body for Zeros {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Sends a streamed body (chunked, or with a declared length) and counts
/// the response body without keeping it.
async fn stream(url: &str, size: u64, declare_length: bool) -> (StatusCode, u64, Bytes) {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut builder = hyper::Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", authority);
    if declare_length {
        builder = builder.header("content-length", size);
    }
    let body = Zeros {
        remaining: size,
        chunk: Bytes::from(vec![0u8; 1 << 20]),
    };
    let response = match sender.send_request(builder.body(body).unwrap()).await {
        Ok(r) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = response.status();
    let mut body = response.into_body();
    let mut total = 0u64;
    let mut head = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            total += data.len() as u64;
            if head.len() < 4096 {
                head.extend_from_slice(&data[..data.len().min(4096)]);
            }
        }
    }
    (status, total, Bytes::from(head))
}

/// Posts `size` bytes over a raw socket while reading the answer, and
/// returns the status code the node sent (the node may answer, and close,
/// before the body is through).
async fn raw_post(url: &str, size: usize, declare_length: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let framing = if declare_length {
        format!("content-length: {size}")
    } else {
        "transfer-encoding: chunked".to_owned()
    };
    let head = format!("POST {path} HTTP/1.1\r\nhost: {authority}\r\n{framing}\r\n\r\n");
    tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        let chunk = vec![0u8; 64 << 10];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            if declare_length {
                writer.write_all(&chunk[..n]).await?;
            } else {
                writer.write_all(format!("{n:x}\r\n").as_bytes()).await?;
                writer.write_all(&chunk[..n]).await?;
                writer.write_all(b"\r\n").await?;
            }
            left -= n;
        }
        if !declare_length {
            writer.write_all(b"0\r\n\r\n").await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(30), reader.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.split(' ').nth(1).unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gigabyte_bodies_stream_both_ways_and_limits_answer_413() {
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "bodies",
        &[
            (
                "stream",
                &g.testbed,
                "routes = [\"/stream/*\"]\nlimits = { max_body = 2048, timeout = \"5m\" }",
            ),
            (
                "small",
                &g.testbed,
                "routes = [\"/small/*\"]\nlimits = { max_body = 1 }",
            ),
        ],
    ));
    const GIB: u64 = 1 << 30;
    let before = peak_rss_kib(node.pid());

    let (status, _, body) = stream(&node.url("/stream/count"), GIB, false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, GIB.to_string());

    let (status, total, _) = stream(&node.url("/stream/big?mb=1024"), 0, true).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(total, GIB);

    let (status, total, _) = stream(&node.url("/stream/echo"), 256 << 20, true).await;
    assert_eq!((status, total), (StatusCode::OK, 256 << 20));

    let peak = peak_rss_kib(node.pid());
    assert!(
        peak < 512 * 1024,
        "node peak RSS {peak} KiB (before: {before} KiB): bodies must stream, not sit in memory"
    );

    // Over the limit: declared → 413 before the function runs; chunked →
    // 413 once the limit is crossed. The node answers before the client has
    // sent everything.
    assert_eq!(
        raw_post(&node.url("/small/count"), 2 << 20, true).await,
        "413"
    );
    assert_eq!(
        raw_post(&node.url("/small/count"), 2 << 20, false).await,
        "413"
    );
    let (status, _, body) = stream(&node.url("/small/count"), 1 << 20, false).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, Bytes::from((1u64 << 20).to_string()))
    );
}

/// The summary of one function, as `GET /v1/functions/{name}` reports it.
async fn summary(node: &Node, name: &str) -> nimbus_api::FunctionSummary {
    let detail: nimbus_api::FunctionDetail = node
        .admin
        .call(Method::GET, &format!("/v1/functions/{name}"), None::<&()>)
        .await
        .unwrap();
    detail.summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_instances_serve_their_quota_then_recycle() {
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "reuse",
        &[
            ("warm", &g.testbed, "routes = [\"/warm/*\"]\nreuse = 3"),
            ("fresh", &g.testbed, "routes = [\"/fresh/*\"]"),
        ],
    ));

    // One request at a time: the same instance serves three, then a new
    // one takes over. Its memory (a counter) proves which instance ran.
    let mut served = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..7 {
        let r = node.get("/warm/served").await;
        assert_status(&r, StatusCode::OK);
        served.push(r.text());
        ids.push(
            r.headers[nimbus_api::INVOCATION_ID_HEADER]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(served, ["1", "2", "3", "1", "2", "3", "1"]);
    // The instance in use, plus the replacement prepared for a recycled
    // one whenever the next request started before it was ready.
    let warm = summary(&node, "warm").await.idle_instances;
    assert!((1..=3).contains(&warm), "idle instances of warm: {warm}");

    // Without reuse every request has an instance of its own (its counter
    // starts at 1). After a request runs alone, an instance is prepared
    // for the next one, which takes it instead of instantiating on its
    // path; the invocation's log line says so.
    // (Instances are prepared from optimised code only: until the
    // background compile is done, requests keep instantiating.)
    eventually(
        Duration::from_secs(60),
        "an instance prepared for the next request",
        || async {
            assert_eq!(node.get("/fresh/served").await.text(), "1");
            tokio::time::sleep(Duration::from_millis(50)).await;
            (summary(&node, "fresh").await.idle_instances >= 1).then_some(())
        },
    )
    .await;
    let r = node.get("/fresh/served").await;
    assert_eq!(r.text(), "1");
    let id = r.headers[nimbus_api::INVOCATION_ID_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    let line = eventually(
        Duration::from_secs(10),
        "the invocation's log line",
        || async {
            node.log()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["invocation_id"] == id.as_str() && l["instance"].is_string())
        },
    )
    .await;
    assert_eq!(line["instance"], "prepared", "{line}");
    for _ in 0..3 {
        assert_eq!(node.get("/fresh/served").await.text(), "1");
    }

    // Each output line belongs to the invocation that wrote it, although
    // one instance wrote several.
    let log = node.log();
    for (id, n) in ids.iter().zip(&served) {
        let line = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["invocation_id"] == id.as_str() && l["stream"] == "stdout")
            .unwrap_or_else(|| panic!("no output line of invocation {id}:\n{log}"));
        assert_eq!(line["message"], format!("served {n}"), "{line}");
    }

    // An instance that failed is never used again: the trap takes the idle
    // instance (which had served one request) and the next request starts
    // from a fresh one.
    assert_status(
        &node.get("/warm/trap").await,
        StatusCode::INTERNAL_SERVER_ERROR,
    );
    assert_eq!(node.get("/warm/served").await.text(), "1");

    // Concurrent requests each get an instance of their own.
    let all: Vec<_> = (0..8)
        .map(|_| {
            let url = node.url("/warm/sleep?ms=300");
            tokio::spawn(async move { request(Method::GET, &url, Bytes::new()).await })
        })
        .collect();
    for r in all {
        assert_status(&r.await.unwrap(), StatusCode::OK);
    }
    // Each kept for its next request, plus the replacement prepared after
    // the trap when it was not ready yet as the eight started.
    let idle = summary(&node, "warm").await.idle_instances;
    assert!(
        (2..=9).contains(&idle),
        "idle instances after 8 at once: {idle}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_functions_scale_to_zero_and_come_back() {
    let node = Node::start_with_env(
        tempfile::tempdir().unwrap(),
        &[("NIMBUS_SCALE_TO_ZERO_AFTER", "1s")],
    );
    let g = guests();
    node.deploy(&manifest(
        "zero",
        &[("z", &g.testbed, "routes = [\"/z/*\"]\nreuse = 100")],
    ));
    assert_eq!(node.get("/z/served").await.text(), "1");
    let s = summary(&node, "z").await;
    assert!(s.loaded && s.idle_instances == 1, "{s:?}");

    // A second without requests: instances and code leave memory.
    let s = eventually(
        Duration::from_secs(10),
        "the function to scale to zero",
        || async {
            let s = summary(&node, "z").await;
            (!s.loaded && s.idle_instances == 0).then_some(s)
        },
    )
    .await;
    assert!(s.ready, "{s:?}");
    assert!(node.log().contains("scaled to zero"), "{}", node.log());

    // The next request maps the artifact again: a cold start, counted and
    // logged as one, from a fresh instance, without compiling.
    let compiled = node.status().await.engine.compiled;
    let r = node.get("/z/served").await;
    assert_status(&r, StatusCode::OK);
    assert_eq!(r.text(), "1");
    assert_eq!(node.status().await.engine.compiled, compiled);
    assert!(summary(&node, "z").await.loaded);
    assert_metric(
        &node,
        r#"faas_coldstarts_total{function="z",version="1"} 2"#,
    )
    .await;
    let log = invocation_line(&node, &r).await;
    assert_eq!(log["faas.coldstart"], true, "{log}");

    // A restart maps the most recently deployed functions (64) before it
    // serves, each with an instance ready; the others stay on disk until
    // their first request.
    let mut extra = String::from("[app]\nname = \"many\"\n");
    for i in 0..64 {
        extra.push_str(&format!(
            "\n[functions.m{i}]\ncomponent = \"{}\"\nroutes = [\"/m{i}/*\"]\n",
            g.testbed.display()
        ));
    }
    node.deploy(&extra);
    let node = node.restart_after_kill9();
    let list: Vec<nimbus_api::FunctionSummary> = node
        .admin
        .call(Method::GET, "/v1/functions", None::<&()>)
        .await
        .unwrap();
    assert_eq!(list.len(), 65);
    let cold: Vec<_> = list.iter().filter(|f| !f.loaded).collect();
    assert_eq!(
        cold.len(),
        1,
        "one function beyond the 64 preloaded: {list:?}"
    );
    let first_request = |f: &nimbus_api::FunctionSummary| {
        let route = format!("{}/served", f.routes[0].trim_end_matches("/*"));
        let node = &node;
        async move {
            let r = node.get(&route).await;
            assert_eq!(r.text(), "1");
            invocation_line(node, &r).await
        }
    };
    let line = first_request(cold[0]).await;
    assert_eq!(line["instance"], "new", "{line}");
    assert_eq!(line["faas.coldstart"], true, "{line}");
    assert!(summary(&node, cold[0].name.as_str()).await.loaded);
    let preloaded = list.iter().find(|f| f.loaded).unwrap();
    assert_eq!(preloaded.idle_instances, 1, "{preloaded:?}");
    let line = first_request(preloaded).await;
    assert_eq!(line["instance"], "prepared", "{line}");
    assert_eq!(line["faas.coldstart"], false, "{line}");
    assert_eq!(node.status().await.engine.compiled, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_called_at_regular_intervals_leaves_memory_between_calls() {
    // Idle times learnt in bins of 200 ms; the fixed window (an hour) would
    // keep the function loaded throughout.
    let env = [
        ("NIMBUS_SCALE_TO_ZERO_AFTER", "1h"),
        ("NIMBUS_KEEP_ALIVE_RESOLUTION", "200ms"),
    ];
    let node = Node::start_with_env(tempfile::tempdir().unwrap(), &env);
    let g = guests();
    node.deploy(&manifest(
        "tick",
        &[("p", &g.testbed, "routes = [\"/p/*\"]")],
    ));
    // Nine calls 1.5 s apart: eight idle times, enough to predict the next.
    for i in 0..9 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
        }
        assert_status(&node.get("/p/served").await, StatusCode::OK);
        if i < 8 {
            let s = summary(&node, "p").await;
            assert!(s.loaded && s.keep_alive.is_none(), "call {i}: {s:?}");
        }
    }
    let w = summary(&node, "p")
        .await
        .keep_alive
        .expect("a window learnt from eight regular idle times");
    // 1.5 s and a little more between starts: bin 7 or, on a slow
    // machine, a later one. Loaded from the bin's start less 10%, unloaded
    // from its end plus 10%.
    assert!(
        (1_200..2_000).contains(&w.load_at_ms) && w.unload_at_ms > w.load_at_ms + 200,
        "{w:?}"
    );

    // Right after the call the code leaves memory, and comes back ahead of
    // the next call, which starts warm.
    leaves_memory_and_comes_back(&node, "p").await;
    let r = node.get("/p/served").await;
    assert_status(&r, StatusCode::OK);
    assert_eq!(invocation_line(&node, &r).await["faas.coldstart"], false);
    // One cold start in all: the first call.
    assert_metric(
        &node,
        r#"faas_coldstarts_total{function="p",version="1"} 1"#,
    )
    .await;
    let log = node.log();
    assert!(log.contains("scaled to zero"), "{log}");
    assert!(
        log.contains("loading ahead of the next expected request"),
        "{log}"
    );

    // A new version goes on from what the function learnt. Deployed right
    // after that call, it has the window at once; counted from that call
    // (to the old version), its code leaves memory and comes back ahead of
    // the next call, which starts warm.
    node.deploy(&manifest(
        "tick",
        &[("p", &g.testbed, "routes = [\"/p/*\"]\nenv = { V = \"2\" }")],
    ));
    let s = summary(&node, "p").await;
    assert!(s.version == 2 && s.keep_alive.is_some(), "{s:?}");
    leaves_memory_and_comes_back(&node, "p").await;
    let r = node.get("/p/served").await;
    assert_status(&r, StatusCode::OK);
    let line = invocation_line(&node, &r).await;
    assert_eq!(line["version"], 2, "{line}");
    assert_eq!(line["faas.coldstart"], false, "{line}");

    // Stopped and started again, the node gives the function back what it
    // learnt: the window is there before any call.
    let learnt = summary(&node, "p").await.keep_alive;
    assert!(learnt.is_some());
    let node = node.restart_with_env(&env);
    let s = summary(&node, "p").await;
    assert_eq!(s.keep_alive, learnt, "{s:?}");
    assert!(node.log().contains("restored learnt idle times"));
}

/// Waits for `function`'s code to leave memory, then to be loaded again
/// ahead of its next call.
async fn leaves_memory_and_comes_back(node: &Node, function: &str) {
    eventually(
        Duration::from_secs(5),
        &format!("{function}'s code to leave memory"),
        || async { (!summary(node, function).await.loaded).then_some(()) },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        &format!("{function}'s code to be loaded ahead of the next call"),
        || async { summary(node, function).await.loaded.then_some(()) },
    )
    .await;
}

/// Asserts that the node's `/metrics` has `line`.
async fn assert_metric(node: &Node, line: &str) {
    let metrics = node
        .admin
        .raw(Method::GET, "/metrics", "text/plain", Bytes::new())
        .await
        .unwrap()
        .text();
    assert!(
        metrics.lines().any(|l| l == line),
        "missing `{line}` in:\n{metrics}"
    );
}

/// The invocation log line of `reply`'s invocation.
async fn invocation_line(node: &Node, reply: &nimbus_cli::client::Reply) -> serde_json::Value {
    let id = reply.headers[nimbus_api::INVOCATION_ID_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    eventually(
        Duration::from_secs(5),
        "the invocation's summary line",
        || async {
            node.log()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["invocation_id"] == id.as_str() && l["faas.coldstart"].is_boolean())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewarmed_functions_start_warm_and_never_scale_to_zero() {
    let node = Node::start_with_env(
        tempfile::tempdir().unwrap(),
        &[("NIMBUS_SCALE_TO_ZERO_AFTER", "1s")],
    );
    let g = guests();
    node.deploy(&manifest(
        "warm",
        &[
            ("ready", &g.testbed, "routes = [\"/ready/*\"]\nprewarm = 2"),
            ("lazy", &g.testbed, "routes = [\"/lazy/*\"]"),
        ],
    ));
    let ready = || async {
        let s = summary(&node, "ready").await;
        (s.loaded && s.idle_instances == 2).then_some(s)
    };
    // Without any request, once its optimised code is there: code in
    // memory and two instances waiting.
    eventually(Duration::from_secs(60), "two instances kept ready", ready).await;
    // Past the scale-to-zero time, the other function has left memory and
    // this one has not.
    eventually(
        Duration::from_secs(10),
        "the other function to scale to zero",
        || async { (!summary(&node, "lazy").await.loaded).then_some(()) },
    )
    .await;
    let s = summary(&node, "ready").await;
    assert!(s.loaded && s.idle_instances == 2, "{s:?}");

    // Two requests at once each start on a waiting instance: no cold
    // start, nothing instantiated on their path.
    let (a, b) = tokio::join!(node.get("/ready/served"), node.get("/ready/served"));
    for r in [&a, &b] {
        assert_status(r, StatusCode::OK);
        assert_eq!(r.text(), "1", "a fresh instance serves each request");
        let line = invocation_line(&node, r).await;
        assert_eq!(line["instance"], "prepared", "{line}");
        assert_eq!(line["faas.coldstart"], false, "{line}");
    }
    // What they took is made again.
    eventually(
        Duration::from_secs(10),
        "the instances to be refilled",
        ready,
    )
    .await;
    assert_metric(
        &node,
        r#"faas_coldstarts_total{function="ready",version="1"} 0"#,
    )
    .await;

    // `nimbus status` says so.
    let out = node.cli(&["status", "ready"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("prewarm     2 instances kept ready; never scales to zero"),
        "{text}"
    );

    // After a crash the node makes them again before any request.
    let node = node.restart_after_kill9();
    eventually(
        Duration::from_secs(30),
        "two instances ready after a restart",
        || async {
            let s = summary(&node, "ready").await;
            (s.loaded && s.idle_instances == 2).then_some(())
        },
    )
    .await;
    let r = node.get("/ready/served").await;
    assert_status(&r, StatusCode::OK);
    let line = invocation_line(&node, &r).await;
    assert_eq!(line["instance"], "prepared", "{line}");
    assert_eq!(line["faas.coldstart"], false, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_gets_the_prewarm_its_predecessor_held() {
    // The node's whole prewarm budget goes to one function; a request
    // still running on its first version keeps that version alive after
    // the second is deployed.
    let node = Node::start();
    let g = guests();
    let version = |n: u64| {
        manifest(
            "warm",
            &[(
                "ready",
                &g.testbed,
                &format!(
                    "routes = [\"/ready/*\"]\nprewarm = 100\nenv = {{ GENERATION = \"{n}\" }}"
                ),
            )],
        )
    };
    let all_ready = |v: u64| {
        let node = &node;
        move || async move {
            let s = summary(node, "ready").await;
            (s.version == v && s.loaded && s.idle_instances == 100).then_some(())
        }
    };
    node.deploy(&version(1));
    eventually(
        Duration::from_secs(120),
        "100 instances ready",
        all_ready(1),
    )
    .await;
    let url = node.url("/ready/sleep?ms=20000");
    let in_flight = tokio::spawn(async move { request(Method::GET, &url, Bytes::new()).await });
    eventually(Duration::from_secs(10), "the request to start", || async {
        (summary(&node, "ready").await.in_flight == 1).then_some(())
    })
    .await;
    node.deploy(&version(2));
    // Version 1's waiting instances gave their budget back at once: the
    // new version is ready while the old request is still running.
    eventually(
        Duration::from_secs(60),
        "version 2's 100 instances ready",
        all_ready(2),
    )
    .await;
    assert!(
        !in_flight.is_finished(),
        "version 2 was warmed only once version 1 was gone"
    );
    let r = in_flight.await.unwrap();
    assert_status(&r, StatusCode::OK);
    assert!(r.text().starts_with("slept 20000"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewarm_beyond_what_a_function_may_run_is_refused() {
    let node = Node::start();
    let g = guests();
    for (settings, expected) in [
        (
            "prewarm = 5\nlimits = { max_concurrency = 2 }",
            "prewarm 5 is more than max_concurrency 2: lower prewarm or raise limits.max_concurrency",
        ),
        (
            "prewarm = 101",
            "invalid prewarm 101: use a whole number from 0 to 100",
        ),
    ] {
        let out = node.deploy_cli(&manifest(
            "toomany",
            &[("t", &g.testbed, &format!("routes = [\"/t/*\"]\n{settings}"))],
        ));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{settings}: accepted");
        assert!(err.contains(expected), "{settings}: {err}");
    }
    // The admin API refuses what the manifest would.
    let digest = "0".repeat(64);
    let body = serde_json::json!({
        "app": "toomany",
        "functions": { "t": {
            "component": digest,
            "config": { "prewarm": 5, "limits": { "max_concurrency": 2 } }
        } }
    });
    let r = node
        .admin
        .raw(
            Method::POST,
            "/v1/deploy",
            "application/json",
            Bytes::from(body.to_string()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(r.text().contains("invalid_config"), "{}", r.text());

    // Across apps, prewarm adds up to at most the node's 100 ready
    // instances; every function below that gets all it asks for, whatever
    // the others hold.
    let warm = |app: &str, name: &str, n: u32| {
        manifest(
            app,
            &[(
                name,
                &g.testbed,
                &format!("routes = [\"/{name}/*\"]\nprewarm = {n}"),
            )],
        )
    };
    node.deploy(&warm("big", "big", 60));
    let out = node.deploy_cli(&warm("more", "more", 41));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "41 more accepted");
    assert!(
        err.contains("prewarm adds up to 101 instances across the node (big: 60, more: 41), more than the 100 it keeps ready"),
        "{err}"
    );
    node.deploy(&warm("more", "more", 40));
    for (name, n) in [("big", 60), ("more", 40)] {
        eventually(
            Duration::from_secs(60),
            &format!("{n} instances ready for {name}"),
            || async {
                let s = summary(&node, name).await;
                (s.idle_instances == n).then_some(s)
            },
        )
        .await;
    }
}
