//! Buckets: the object API on the admin listener, the events it raises,
//! on local disk and on a real S3-compatible server (moto's, from PyPI,
//! started by the test).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use nimbus_cli::client::{self, Reply};
use sha2::{Digest as _, Sha256};
use std::time::Duration;
use support::*;

/// A function reporting every event to `recorder`, watching `uploads`
/// under `images/`; and one that always fails, watching `strict/`.
fn watchers(recorder: &Recorder) -> String {
    let g = guests();
    let relay = |query: &str, extra: &str| {
        format!(
            "env = {{ ACTION = \"relay\", RECORDER = \"{url}\", RELAY_QUERY = \"{query}\" }}\nallowed_outbound_hosts = [\"{url}\"]\n{extra}",
            url = recorder.url
        )
    };
    manifest(
        "objects",
        &[
            (
                "thumbs",
                &g.testbed,
                &relay(
                    "fn=thumbs",
                    "buckets = [{ bucket = \"uploads\", prefix = \"images/\" }]",
                ),
            ),
            (
                "strict",
                &g.testbed,
                &relay(
                    "fn=strict&fail=99&status=500",
                    "buckets = [{ bucket = \"uploads\", prefix = \"strict/\", events = [\"created\"] }]\n\
                     retry = { attempts = 2, initial_backoff = \"100ms\", max_backoff = \"200ms\" }",
                ),
            ),
        ],
    )
}

async fn call(
    node: &Node,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    node.admin
        .raw_with(method, path, headers, body)
        .await
        .unwrap()
}

async fn req(node: &Node, method: Method, path: &str) -> Reply {
    call(node, method, path, &[], Bytes::new()).await
}

async fn put(node: &Node, path: &str, body: &'static [u8]) -> Reply {
    call(node, Method::PUT, path, &[], Bytes::from_static(body)).await
}

/// `reply` has `status` and says `what`.
fn refused(reply: &Reply, status: StatusCode, what: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert!(reply.text().contains(what), "{}", reply.text());
}

fn json(reply: &Reply) -> serde_json::Value {
    serde_json::from_slice(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.text()))
}

/// A body of `n` bytes that is not all one value.
fn content(n: usize) -> Bytes {
    Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

/// Puts, reads, lists and deletes through the API of `node`, and checks
/// the events `recorder` saw. `sha_etags`: the store's ETag is the
/// content's SHA-256 (local disk).
async fn exercise(node: &Node, recorder: &Recorder, sha_etags: bool) {
    let big = content(12 << 20);
    let reply = call(
        node,
        Method::PUT,
        "/v1/buckets/uploads/objects/images/cat%201.png",
        &[("content-type", "image/png")],
        big.clone(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let stored = json(&reply);
    assert_eq!(stored["key"], "images/cat 1.png");
    assert_eq!(stored["size"], big.len());
    assert_eq!(stored["invocation_ids"].as_array().unwrap().len(), 1);
    let etag = stored["etag"].as_str().unwrap().to_owned();
    if sha_etags {
        assert_eq!(etag, hex::encode(Sha256::digest(&big)));
    }
    assert!(!etag.is_empty());

    // Outside the watched prefix: stored, no event.
    let reply = put(node, "/v1/buckets/uploads/objects/docs/a.txt", b"hello").await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(json(&reply)["invocation_ids"].as_array().unwrap().len(), 0);

    // Read back whole, with its type and tag; unchanged is 304.
    let reply = req(
        node,
        Method::GET,
        "/v1/buckets/uploads/objects/images/cat%201.png",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body == big, "the content came back different");
    assert_eq!(reply.headers["content-type"], "image/png");
    assert_eq!(reply.headers["etag"], format!("\"{etag}\"").as_str());
    assert!(reply.headers.contains_key("last-modified"));
    let tag = format!("\"{etag}\"");
    let reply = call(
        node,
        Method::GET,
        "/v1/buckets/uploads/objects/images/cat%201.png",
        &[("if-none-match", &tag)],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    let reply = req(node, Method::HEAD, "/v1/buckets/uploads/objects/docs/a.txt").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-length"], "5");
    assert!(reply.body.is_empty());

    // Listing: by prefix, and page by page.
    for k in ["images/b.png", "images/a.png"] {
        let reply = put(node, &format!("/v1/buckets/uploads/objects/{k}"), b"x").await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    let list = json(
        &req(
            node,
            Method::GET,
            "/v1/buckets/uploads/objects?prefix=images/",
        )
        .await,
    );
    let keys: Vec<&str> = list["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["images/a.png", "images/b.png", "images/cat 1.png"]);
    let first = json(&req(node, Method::GET, "/v1/buckets/uploads/objects?limit=2").await);
    assert_eq!(first["objects"].as_array().unwrap().len(), 2);
    assert_eq!(first["objects"][0]["key"], "docs/a.txt");
    let after = first["next_after"].as_str().unwrap();
    let rest = json(
        &req(
            node,
            Method::GET,
            &format!("/v1/buckets/uploads/objects?limit=2&after={after}"),
        )
        .await,
    );
    let keys: Vec<&str> = rest["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["images/b.png", "images/cat 1.png"]);
    assert!(rest.get("next_after").is_none());
    let empty = json(&req(node, Method::GET, "/v1/buckets/elsewhere/objects").await);
    assert_eq!(empty["objects"].as_array().unwrap().len(), 0);

    // Delete: an event, then the object is gone.
    let reply = req(
        node,
        Method::DELETE,
        "/v1/buckets/uploads/objects/images/cat%201.png",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(json(&reply)["invocation_ids"].as_array().unwrap().len(), 1);
    let reply = req(
        node,
        Method::DELETE,
        "/v1/buckets/uploads/objects/images/cat%201.png",
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = req(
        node,
        Method::GET,
        "/v1/buckets/uploads/objects/images/cat%201.png",
    )
    .await;
    refused(
        &reply,
        StatusCode::NOT_FOUND,
        "no object `images/cat 1.png`",
    );

    // Bad names are refused with what to do.
    let reply = put(node, "/v1/buckets/uploads/objects/a//b", b"x").await;
    refused(&reply, StatusCode::BAD_REQUEST, "invalid object key");
    let reply = put(node, "/v1/buckets/Uploads/objects/a", b"x").await;
    refused(&reply, StatusCode::BAD_REQUEST, "invalid bucket name");

    // The watcher saw: cat created, a.png and b.png created, cat deleted.
    let hits = eventually(Duration::from_secs(30), "4 object events", || async {
        let hits: Vec<Hit> = recorder
            .hits()
            .into_iter()
            .filter(|h| h.get("fn") == "thumbs")
            .collect();
        (hits.len() >= 4).then_some(hits)
    })
    .await;
    let created: Vec<&Hit> = hits
        .iter()
        .filter(|h| h.get("ce-type") == "object.created")
        .collect();
    let deleted: Vec<&Hit> = hits
        .iter()
        .filter(|h| h.get("ce-type") == "object.deleted")
        .collect();
    assert_eq!((created.len(), deleted.len()), (3, 1), "{hits:?}");
    let cat = created
        .iter()
        .find(|h| h.get("ce-subject") == "images/cat 1.png")
        .unwrap();
    assert_eq!(cat.get("ce-source"), "/nimbus/bucket/uploads");
    assert_eq!(cat.get("nimbus-trigger"), "bucket");
    let body: serde_json::Value = serde_json::from_str(cat.get("body")).unwrap();
    assert_eq!(body["bucket"], "uploads");
    assert_eq!(body["key"], "images/cat 1.png");
    assert_eq!(body["size"], big.len());
    assert_eq!(body["etag"], etag.as_str());
    assert_eq!(body["event"], "ObjectCreated:Put");
    let body: serde_json::Value = serde_json::from_str(deleted[0].get("body")).unwrap();
    assert_eq!(body["key"], "images/cat 1.png");
    assert_eq!(body["event"], "ObjectRemoved:Delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_on_local_disk_round_trip_raise_events_and_survive_a_crash() {
    let recorder = Recorder::start().await;
    let mut node = Node::start();
    node.deploy(&watchers(&recorder));
    exercise(&node, &recorder, true).await;

    // A watcher that always fails: its events retry, then dead-letter.
    let reply = put(&node, "/v1/buckets/uploads/objects/strict/x", b"x").await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let dead = eventually(Duration::from_secs(30), "the event in the DLQ", || async {
        let list: Vec<nimbus_queue::InvocationRecord> = node
            .admin
            .call(Method::GET, "/v1/functions/strict/dlq", None::<&()>)
            .await
            .unwrap();
        (list.len() == 1).then_some(list)
    })
    .await;
    assert_eq!(dead[0].attempts.len(), 2);
    assert_eq!(
        recorder
            .hits()
            .iter()
            .filter(|h| h.get("fn") == "strict")
            .count(),
        2
    );

    // The CLI drives the same API.
    let file = node.dir.path().join("report.csv");
    std::fs::write(&file, "a,b\n1,2\n").unwrap();
    let out = node.cli(&[
        "objects",
        "put",
        "uploads/reports/q1.csv",
        file.to_str().unwrap(),
        "--content-type",
        "text/csv",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = node.cli(&["objects", "ls", "uploads/reports/"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("reports/q1.csv") && listing.contains("KEY"),
        "{listing}"
    );
    let out = node.cli(&["objects", "get", "uploads/reports/q1.csv"]);
    assert_eq!(out.stdout, b"a,b\n1,2\n");
    // Objects stream through the CLI both ways: a 48 MiB file goes up and
    // comes back while the CLI's peak memory stays a fraction of it.
    let big = node.dir.path().join("big.bin");
    let data: Vec<u8> = (0..48u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(&big, &data).unwrap();
    let back = node.dir.path().join("back.bin");
    for args in [
        vec!["objects", "put", "uploads/big.bin", big.to_str().unwrap()],
        vec!["objects", "get", "uploads/big.bin", back.to_str().unwrap()],
    ] {
        assert!(
            std::path::Path::new("/usr/bin/time").exists() || std::env::var_os("CI").is_none(),
            "GNU time is needed under CI (apt-get install time)"
        );
        if !std::path::Path::new("/usr/bin/time").exists() {
            eprintln!("SKIPPED: the CLI's peak memory (no /usr/bin/time)");
            assert!(node.cli(&args).status.success());
            continue;
        }
        let out = std::process::Command::new("/usr/bin/time")
            .args(["-f", "peak-kib %M", env!("CARGO_BIN_EXE_nimbus")])
            .args(&args)
            .env("NIMBUS_DATA_DIR", node.data_dir())
            .env_remove("NIMBUS_URL")
            .env_remove("NIMBUS_TOKEN")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        let peak: u64 = stderr
            .lines()
            .find_map(|l| l.strip_prefix("peak-kib "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no peak memory in: {stderr}"));
        assert!(
            peak < 32 << 10,
            "{args:?} peaked at {peak} KiB for a 48 MiB object"
        );
    }
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the object came back different"
    );

    let out = node.cli(&["objects", "get", "uploads/reports/none.csv"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no object"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What was acknowledged survives kill -9; nothing half-written shows.
    node.kill9();
    let node = node.restart_after_kill9();
    let reply = req(&node, Method::GET, "/v1/buckets/uploads/objects/docs/a.txt").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"hello");
    let out = node.cli(&["objects", "rm", "uploads/reports/q1.csv"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = req(
        &node,
        Method::HEAD,
        "/v1/buckets/uploads/objects/reports/q1.csv",
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

/// moto's S3 server on a free port, or `None` (loudly) outside CI when
/// moto is not installed.
fn moto() -> Option<Daemon> {
    python_modules(
        "moto's S3 server",
        "moto.server",
        "pip install 'moto[server]'",
    )?;
    Daemon::start("python3", |port, _| {
        [
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    })
}

fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("NIMBUS_OBJECT_STORE", "s3://nimbus-test/node-a".to_owned()),
        ("AWS_ENDPOINT_URL", endpoint.to_owned()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_on_an_s3_compatible_server() {
    let Some(moto) = moto() else { return };
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    // The S3 bucket Nimbus keeps its buckets in.
    let made = client::send(
        Method::PUT,
        &format!("{endpoint}/nimbus-test"),
        &[],
        Bytes::new(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(made.status.is_success(), "{made:?}");

    let recorder = Recorder::start().await;
    let env = s3_env(&endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = Node::start_with_env(tempfile::tempdir().unwrap(), &env);
    node.deploy(&watchers(&recorder));
    exercise(&node, &recorder, false).await;

    // The objects are in the S3 bucket, under the node's prefix, as
    // another S3 client sees them.
    use object_store::ObjectStoreExt as _;
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_region("us-east-1")
        .with_bucket_name("nimbus-test")
        .build()
        .unwrap();
    let raw = s3
        .get(&object_store::path::Path::from("node-a/uploads/docs/a.txt"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&raw[..], b"hello");
    // Nothing but the node's data directory is written locally.
    assert!(!node.data_dir().join("objects").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_object_store_stops_the_node_before_it_listens() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .envs(s3_env(&format!("http://127.0.0.1:{port}")))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot use the object store"), "{err}");
    assert!(!dir.path().join(nimbus_api::NODE_FILE).exists());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args(["up", "--object-store", "ftp://x"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("write local or s3://BUCKET"));
}
