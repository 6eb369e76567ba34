//! Bad input never crashes or wedges the node, the admin API needs its
//! token, and functions reach only the network they were granted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use nimbus_cli::client::{self, Admin};
use sha2::{Digest, Sha256};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn upload(admin: &Admin, bytes: Vec<u8>) -> client::Reply {
    let digest = hex::encode(Sha256::digest(&bytes));
    admin
        .raw(
            Method::PUT,
            &format!("/v1/components/{digest}"),
            "application/wasm",
            Bytes::from(bytes),
        )
        .await
        .unwrap()
}

fn message(reply: &client::Reply) -> String {
    let err: nimbus_api::ErrorResponse = serde_json::from_slice(&reply.body)
        .unwrap_or_else(|_| panic!("not a JSON error: {}", reply.text()));
    err.error.message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_components_and_requests_get_clear_4xx() {
    let node = Node::start();
    let g = guests();
    let hello = std::fs::read(&g.hello).unwrap();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "random bytes",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
            "not a component",
        ),
        ("empty", Vec::new(), "empty"),
        (
            "core module",
            b"\0asm\x01\0\0\0".to_vec(),
            "core WebAssembly module",
        ),
        (
            "truncated",
            hello[..hello.len() / 2].to_vec(),
            "invalid component",
        ),
        (
            "command",
            std::fs::read(&g.command).unwrap(),
            "does not export wasi:http/incoming-handler",
        ),
        (
            "foreign import",
            std::fs::read(&g.foreign_import).unwrap(),
            "imports `nimbus-test:foreign/ledger",
        ),
    ];
    for (what, bytes, expected) in cases {
        let r = upload(&node.admin, bytes).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.text());
        assert!(message(&r).contains(expected), "{what}: {}", r.text());
    }

    // Through the CLI, the refusal names the function and the reason.
    let out = node.deploy_cli(&manifest(
        "bad",
        &[("cmd", &g.command, "routes = [\"/cmd\"]")],
    ));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`cmd`") && stderr.contains("does not export wasi:http/incoming-handler"),
        "{stderr}"
    );

    // Digest that does not match the bytes.
    let r = node
        .admin
        .raw(
            Method::PUT,
            &format!("/v1/components/{}", "0".repeat(64)),
            "application/wasm",
            Bytes::from(hello.clone()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());

    // Huge upload: refused from its declared length, without reading it.
    let addr = node.admin.url.strip_prefix("http://").unwrap().to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "PUT /v1/components/{} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ncontent-length: 100000000000\r\n\r\n",
        "a".repeat(64),
        node.admin.token
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");

    // Malformed JSON, unknown keys, unknown functions, undeclared components.
    for (method, path, body, status) in [
        (
            Method::POST,
            "/v1/deploy",
            "{not json",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/deploy",
            r#"{"app":"a","functions":{},"extra":1}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/deploy",
            r#"{"app":"Bad App","functions":{}}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/deploy",
            &format!(
                r#"{{"app":"a","functions":{{"f":{{"component":"{}","config":{{}}}}}}}}"#,
                "b".repeat(64)
            ),
            StatusCode::BAD_REQUEST,
        ),
        (Method::GET, "/v1/functions/nope", "", StatusCode::NOT_FOUND),
        (
            Method::GET,
            "/v1/functions/NOT_A_NAME",
            "",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/functions/nope/invoke",
            "{}",
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/v1/functions/nope/rollback",
            "{}",
            StatusCode::NOT_FOUND,
        ),
        (
            Method::DELETE,
            "/v1/functions/nope",
            "",
            StatusCode::NOT_FOUND,
        ),
        (Method::GET, "/v1/nothing", "", StatusCode::NOT_FOUND),
        (
            Method::GET,
            "/v1/functions/NOT_A_NAME/history",
            "",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/functions/nope/logs?follow=maybe",
            "",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/v1/components/xyz",
            "",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let r = node
            .admin
            .raw(
                method.clone(),
                path,
                "application/json",
                Bytes::from(body.to_owned()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, status, "{method} {path} {body}: {}", r.text());
        assert!(!message(&r).is_empty());
    }

    // A known path with a method it does not take: 405 naming the ones it
    // does, in the message and in `Allow`.
    for (method, path, allowed) in [
        (Method::DELETE, "/v1/status", "GET"),
        (Method::POST, "/v1/functions/nope", "GET, DELETE"),
        (Method::PUT, "/v1/functions/nope/invocations", "GET, POST"),
        (Method::GET, "/v1/deploy", "POST"),
        (
            Method::PATCH,
            "/v1/buckets/photos/objects/k",
            "PUT, GET, HEAD, DELETE",
        ),
        (Method::POST, "/healthz", "GET, HEAD"),
    ] {
        let r = node
            .admin
            .raw(method.clone(), path, "application/json", Bytes::new())
            .await
            .unwrap();
        assert_eq!(
            r.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {}",
            r.text()
        );
        assert_eq!(r.headers["allow"], allowed, "{method} {path}");
        assert!(message(&r).contains(allowed), "{}", r.text());
    }

    // No token, wrong token: 401.
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", "Basic abc")],
    ] {
        let r = client::send(
            Method::GET,
            &format!("{}/v1/functions", node.admin.url),
            &headers,
            Bytes::new(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    // The token file is private to its owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node.data_dir().join("admin-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The CLI reaches a node elsewhere through NIMBUS_URL and NIMBUS_TOKEN.
    let run = |token: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nimbus"))
            .args(["status", "--output", "json"])
            .env("NIMBUS_DATA_DIR", "/nonexistent")
            .env("NIMBUS_URL", &node.admin.url)
            .env("NIMBUS_TOKEN", token)
            .output()
            .unwrap()
    };
    let out = run(&node.admin.token);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("wrong");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    // After all that, the node still deploys and serves.
    node.deploy(&manifest(
        "good",
        &[("hello", &g.hello, "routes = [\"/hello\"]")],
    ));
    assert_status(&node.get("/hello").await, StatusCode::OK);

    // An invocation type other than sync or async is refused, not run
    // synchronously by default, on a route and through the admin API.
    let hello_url = node.url("/hello");
    for (kind, status) in [("sync", StatusCode::OK), ("later", StatusCode::BAD_REQUEST)] {
        let r = client::send(
            Method::GET,
            &hello_url,
            &[("nimbus-invocation-type", kind)],
            Bytes::new(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(r.status, status, "{kind}: {}", r.text());
        if status == StatusCode::BAD_REQUEST {
            assert!(
                message(&r).contains("neither sync nor async"),
                "{}",
                r.text()
            );
        }
    }
    let r = node
        .admin
        .raw(
            Method::POST,
            "/v1/functions/hello/invocations?type=later",
            "text/plain",
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(
        message(&r).contains("neither sync nor async"),
        "{}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_errors_are_located_and_route_conflicts_refused() {
    let node = Node::start();
    let g = guests();
    let out = node.deploy_cli(&format!(
        "[app]\nname = \"a\"\n\n[functions.f]\ncomponent = \"{}\"\ntiemout = \"3s\"\n",
        g.hello.display()
    ));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nimbus.toml:6:1") && stderr.contains("unknown field `tiemout`"),
        "{stderr}"
    );

    let out = node.deploy_cli(&format!(
        "[app]\nname = \"a\"\n\n[functions.f]\ncomponent = \"{}\"\nlimits = {{ memory = \"lots\" }}\n",
        g.hello.display()
    ));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nimbus.toml:6:"), "{stderr}");

    let out = node.deploy_cli(&manifest(
        "a",
        &[(
            "f",
            std::path::Path::new("/nonexistent/f.wasm"),
            "routes = [\"/f\"]",
        )],
    ));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the component of `f`"));

    // Another app may not take a route that is served already.
    node.deploy(&manifest(
        "first",
        &[("one", &g.hello, "routes = [\"/shared/:id\"]")],
    ));
    let out = node.deploy_cli(&manifest(
        "second",
        &[("two", &g.hello, "routes = [\"/shared/:key\"]")],
    ));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("conflicts with route `/shared/:id` of function `one`"),
        "{stderr}"
    );
    // Nor a function name.
    let out = node.deploy_cli(&manifest(
        "second",
        &[("one", &g.hello, "routes = [\"/elsewhere\"]")],
    ));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to app `first`"));
    assert_status(&node.get("/shared/1").await, StatusCode::OK);
}

/// A local HTTP server answering `pong`, for outbound tests.
async fn pong_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\npong",
                    )
                    .await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http_is_denied_unless_listed() {
    let node = Node::start();
    let g = guests();
    let port = pong_server().await;
    let other = pong_server().await;
    node.deploy(&manifest(
        "outbound",
        &[
            ("allowed", &g.testbed, &format!("routes = [\"/allowed/*\"]\nallowed_outbound_hosts = [\"http://127.0.0.1:{port}\"]")),
            ("closed", &g.testbed, "routes = [\"/closed/*\"]"),
            ("public", &g.testbed, "routes = [\"/public/*\"]\nallowed_outbound_hosts = [\"*:*\"]"),
        ],
    ));
    let fetch = |f: &str, url: &str| format!("/{f}/fetch?url={url}");

    let r = node
        .get(&fetch("allowed", &format!("http://127.0.0.1:{port}/")))
        .await;
    assert_eq!(r.text(), "fetched 200 pong");

    for (f, url) in [
        ("closed", format!("http://127.0.0.1:{port}/")),
        ("allowed", format!("http://127.0.0.1:{other}/")),
        ("public", format!("http://127.0.0.1:{port}/")),
        ("public", format!("http://localhost:{port}/")),
        (
            "public",
            "http://169.254.169.254/latest/meta-data/".to_owned(),
        ),
        ("public", "http://10.0.0.1/".to_owned()),
        ("public", "http://[::1]:80/".to_owned()),
    ] {
        let r = node.get(&fetch(f, &url)).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{f} {url}: {}", r.text());
        assert!(
            r.text().contains("HttpRequestDenied"),
            "{f} {url}: {}",
            r.text()
        );
    }
    assert!(node.log().contains("outbound request refused"));
}

/// Bytes of every file under `dir`.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_credentials_never_show() {
    const SECRET: &str = "canary-secret-5f1d9a";
    const TOKEN: &str = "canary-token-83c2e7";
    const COOKIE: &str = "canary-cookie-0b6e41";
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("db-password");
    std::fs::write(&secret_file, "canary-file-secret-77aa\n").unwrap();
    let node = Node::start_with_env(dir, &[("NIMBUS_TEST_CANARY", SECRET)]);
    let g = guests();
    let config = format!(
        "routes = [\"/leak/*\"]\nsecrets = {{ API_KEY = {{ env = \"NIMBUS_TEST_CANARY\" }}, DB_PASSWORD = {{ file = \"{}\" }} }}\nretry = {{ attempts = 1 }}",
        secret_file.display()
    );
    node.deploy(&manifest("leaky", &[("leaky", &g.testbed, &config)]));
    let auth = format!("Bearer {TOKEN}");
    let cookie = format!("session={COOKIE}");
    let headers = [
        ("authorization", auth.as_str()),
        ("cookie", cookie.as_str()),
    ];
    // The function gets its secrets and the caller's credentials...
    let reply = client::send(
        Method::GET,
        &node.url("/leak/leak?name=API_KEY"),
        &headers,
        Bytes::new(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        reply.text().contains(SECRET),
        "the function sees its secret"
    );
    let reply = client::send(
        Method::GET,
        &node.url("/leak/leak?name=DB_PASSWORD"),
        &headers,
        Bytes::new(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(
        reply.text().contains("canary-file-secret-77aa"),
        "{}",
        reply.text()
    );
    // ...also asynchronously, failing into the dead-letter queue.
    let mut async_headers = headers.to_vec();
    async_headers.push(("nimbus-invocation-type", "async"));
    let reply = client::send(
        Method::GET,
        &node.url("/leak/leak?name=API_KEY"),
        &async_headers,
        Bytes::new(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let accepted: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let id = accepted["invocation_id"].as_str().unwrap().to_owned();
    let dlq = eventually(Duration::from_secs(30), "the DLQ entry", || async {
        let reply = node
            .admin
            .raw(Method::GET, "/v1/functions/leaky/dlq", "", Bytes::new())
            .await
            .unwrap();
        reply.text().contains(&id).then(|| reply.text())
    })
    .await;
    let record = node
        .admin
        .raw(
            Method::GET,
            &format!("/v1/invocations/{id}"),
            "",
            Bytes::new(),
        )
        .await
        .unwrap()
        .text();
    let logs = node.cli(&["logs", "leaky", "--limit", "100"]);
    let logs = String::from_utf8_lossy(&logs.stdout).into_owned();
    assert!(logs.contains("my secret is [redacted]"), "{logs}");
    assert!(
        logs.contains("called with [redacted] and [redacted]"),
        "{logs}"
    );
    assert!(logs.contains("token only: [redacted]"), "{logs}");
    assert!(record.contains("secret [redacted] auth"), "{record}");
    // ...and none of it shows anywhere a user can read.
    let canaries = [SECRET, TOKEN, COOKIE, "canary-file-secret-77aa"];
    let status = node.cli(&["status", "leaky", "-o", "json"]);
    let shown = [
        ("logs", logs),
        ("the DLQ", dlq),
        ("the invocation", record),
        (
            "status",
            String::from_utf8_lossy(&status.stdout).into_owned(),
        ),
        ("the node's log", node.log()),
    ];
    for (what, text) in &shown {
        for c in canaries {
            assert!(!text.contains(c), "{c} shows in {what}:\n{text}");
        }
    }
    // Nor is any secret stored by the node (the queue keeps the async
    // request's own headers to replay it; nothing else holds them).
    for (path, bytes) in files_under(&node.data_dir()) {
        let text = String::from_utf8_lossy(&bytes);
        for c in [SECRET, "canary-file-secret-77aa"] {
            assert!(!text.contains(c), "{c} is stored in {}", path.display());
        }
    }
}
