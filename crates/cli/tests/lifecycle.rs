//! A user's path through Nimbus, against real node processes: deploy,
//! serve, list, invoke, redeploy, roll back, remove, restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use http::{Method, StatusCode};
use nimbus_api::{FunctionDetail, FunctionSummary};
use std::time::Duration;
use support::*;

fn examples_manifest(greeting: &str) -> String {
    let g = guests();
    manifest(
        "examples",
        &[
            (
                "hello",
                &g.hello,
                &format!("routes = [\"/hello\"]\nenv = {{ GREETING = \"{greeting}\" }}"),
            ),
            (
                "api",
                &g.api,
                "routes = [{ path = \"/api/greet/:name\", methods = [\"GET\"] }, { path = \"/api/orders\", methods = [\"POST\"] }, \"/api/*\"]",
            ),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_serve_manage_and_roll_back() {
    let node = Node::start();

    // Deploy prints the routes it now serves.
    let out = node.deploy(&examples_manifest("Hello"));
    assert!(
        out.contains("hello") && out.contains("created") && out.contains(&node.url("/hello")),
        "{out}"
    );

    let r = node.get("/hello").await;
    assert_status(&r, StatusCode::OK);
    assert_eq!(r.text(), "Hello from Nimbus!\n");
    assert!(r.headers.contains_key("nimbus-invocation-id"));

    // The second example: path parameters, query string, JSON, status codes.
    let r = node.get("/api/greet/ada?shout=true").await;
    assert_status(&r, StatusCode::OK);
    assert_eq!(r.text(), r#"{"message":"HELLO, ADA!"}"#);
    let r = request(
        Method::POST,
        &node.url("/api/orders"),
        r#"{"item":"tea","quantity":3}"#.into(),
    )
    .await;
    assert_status(&r, StatusCode::CREATED);
    let order: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(order["quantity"], 3);
    assert_eq!(
        order["total_cents"],
        order["unit_price_cents"].as_u64().unwrap() * 3
    );
    let r = request(Method::POST, &node.url("/api/orders"), "not json".into()).await;
    assert_status(&r, StatusCode::BAD_REQUEST);
    let r = request(
        Method::POST,
        &node.url("/api/orders"),
        r#"{"item":"tea","quantity":0}"#.into(),
    )
    .await;
    assert_eq!(r.status.as_u16(), 422);
    assert_status(&node.get("/api/nothing-here").await, StatusCode::NOT_FOUND);
    // Method restrictions: GET-only route answers 405 with Allow... unless a
    // wildcard route of the same function takes every method.
    let r = request(
        Method::DELETE,
        &node.url("/hello/../nothing"),
        bytes::Bytes::new(),
    )
    .await;
    assert_status(&r, StatusCode::NOT_FOUND);

    // Unchanged manifest: a no-op.
    let out = node.deploy(&examples_manifest("Hello"));
    assert!(out.contains("nothing changed"), "{out}");
    let list: Vec<FunctionSummary> = node
        .admin
        .call(Method::GET, "/v1/functions", None::<&()>)
        .await
        .unwrap();
    assert!(list.iter().all(|f| f.version == 1), "{list:?}");

    // One function changed: only it is redeployed.
    let out = node.deploy(&examples_manifest("Howdy"));
    assert!(
        out.lines()
            .any(|l| l.starts_with("hello") && l.contains("v2") && l.contains("updated")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("api") && l.contains("v1") && l.contains("unchanged")),
        "{out}"
    );
    assert_eq!(node.get("/hello").await.text(), "Howdy from Nimbus!\n");

    // CLI listings, as text and as JSON.
    let out = node.cli(&["ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("NAME")
            && text.contains("hello")
            && text.contains("v2"),
        "{text}"
    );
    let out = node.cli(&["ls", "--output", "json"]);
    let list: Vec<FunctionSummary> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.len(), 2);
    let out = node.cli(&["status", "--output", "json"]);
    let status: nimbus_api::NodeStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status.functions, 2);
    let out = node.cli(&["status", "hello", "--output", "json"]);
    let detail: FunctionDetail = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(detail.versions.len(), 2);

    // Invoke through the admin API.
    let out = node.cli(&["invoke", "api", "--path", "/api/greet/bob"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        r#"{"message":"Hello, bob!"}"#
    );
    let out = node.cli(&[
        "invoke",
        "api",
        "--path",
        "/api/orders",
        "-d",
        r#"{"item":"x","quantity":1}"#,
        "-H",
        "content-type: application/json",
        "--output",
        "json",
    ]);
    let r: nimbus_api::InvokeResponse = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r.status, 201);
    assert!(!r.invocation_id.is_empty());

    // Roll back to the previous version, then forward again by number.
    let out = node.cli(&["rollback", "hello"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node.get("/hello").await.text(), "Hello from Nimbus!\n");
    let out = node.cli(&["rollback", "hello", "--to", "2"]);
    assert!(out.status.success());
    assert_eq!(node.get("/hello").await.text(), "Howdy from Nimbus!\n");
    let out = node.cli(&["rollback", "hello", "--to", "9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no version 9"));

    // Remove: the route stops answering, the other function stays.
    let out = node.cli(&["rm", "hello"]);
    assert!(out.status.success());
    assert_status(&node.get("/hello").await, StatusCode::NOT_FOUND);
    assert_status(&node.get("/api/greet/x").await, StatusCode::OK);
    let out = node.cli(&["rm", "hello"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    // Removing a function from the manifest removes it on deploy.
    let g = guests();
    let out = node.deploy(&manifest(
        "examples",
        &[("hello", &g.hello, "routes = [\"/hello\"]")],
    ));
    assert!(
        out.lines()
            .any(|l| l.starts_with("api") && l.contains("removed")),
        "{out}"
    );
    assert_status(&node.get("/api/greet/x").await, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_kill9_serves_same_versions_without_recompiling() {
    let node = Node::start();
    node.deploy(&examples_manifest("Hello"));
    node.deploy(&examples_manifest("Again"));
    assert!(node.status().await.engine.compiled >= 2);

    let node = node.restart_after_kill9();
    assert_eq!(node.get("/hello").await.text(), "Again from Nimbus!\n");
    assert_status(&node.get("/api/greet/x").await, StatusCode::OK);
    let status = node.status().await;
    assert_eq!(
        status.engine.compiled, 0,
        "a restart must not recompile: {status:?}"
    );
    assert!(status.engine.loaded_from_cache >= 2, "{status:?}");
    let detail: FunctionDetail = node
        .admin
        .call(Method::GET, "/v1/functions/hello", None::<&()>)
        .await
        .unwrap();
    assert_eq!(detail.summary.version, 2);

    // A half-written artifact is never served: garbage under an artifact's
    // name is detected, and the stored component is compiled again.
    let compiled = node.data_dir().join("artifacts/compiled");
    let mut node = node;
    node.kill9();
    for entry in std::fs::read_dir(&compiled).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    }
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    let node = Node::start_in(dir);
    assert_eq!(node.get("/hello").await.text(), "Again from Nimbus!\n");
    assert!(node.status().await.engine.compiled >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_exporting_wizer_initialize_start_from_their_snapshot() {
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "preinit",
        &[
            ("snap", &g.preinit, "routes = [\"/snap\"]"),
            ("again", &g.preinit, "routes = [\"/again\"]\nreuse = 5"),
            ("trap", &g.preinit_trap, "routes = [\"/trap\"]"),
        ],
    ));
    // The baseline code serves at once, initialising on its first request
    // as it would on any other host.
    let first = node.get("/snap").await.text();
    assert!(first.contains("init_runs=1 requests=1"), "{first}");
    let checksum = first.rsplit("checksum=").next().unwrap().to_owned();

    // The optimised code starts every fresh instance from the state
    // `wizer-initialize` left: initialised once, at build time, and with no
    // request of an earlier instance behind it.
    eventually(
        Duration::from_secs(120),
        "the pre-initialised code",
        || async {
            let s = node.status().await;
            (s.engine.optimized >= 2).then_some(())
        },
    )
    .await;
    for _ in 0..3 {
        let text = node.get("/snap").await.text();
        assert_eq!(
            text,
            format!("preinitialized=true init_runs=1 requests=1 checksum={checksum}"),
            "{}",
            node.log()
        );
    }
    // A reused instance starts from the snapshot too, and keeps its own
    // state between the requests it serves.
    let a = node.get("/again").await.text();
    let b = node.get("/again").await.text();
    assert!(
        a.starts_with("preinitialized=true init_runs=1 requests=1"),
        "{a}"
    );
    assert!(
        b.starts_with("preinitialized=true init_runs=1 requests=2"),
        "{b}"
    );
    assert!(node.log().contains("pre-initialised component"));

    // A component whose initialisation traps is compiled as uploaded, and
    // the node log says why.
    let r = node.get("/trap").await;
    assert_status(&r, StatusCode::OK);
    assert_eq!(r.text(), "served as uploaded\n");
    let log = node.log();
    let warning = log
        .lines()
        .find(|l| l.contains("cannot pre-initialise the component"))
        .unwrap_or_else(|| panic!("no warning in the log:\n{log}"));
    assert!(warning.contains("`wizer-initialize` failed"), "{warning}");

    // The snapshot is the stored optimised artifact: a restart maps it.
    let node = node.restart_after_kill9();
    let text = node.get("/snap").await.text();
    assert!(
        text.starts_with("preinitialized=true init_runs=1 requests=1"),
        "{text}"
    );
    assert_eq!(node.status().await.engine.compiled, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let mut node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "drain",
        &[("slow", &g.testbed, "routes = [\"/slow/*\"]")],
    ));
    let url = node.url("/slow/sleep?ms=1500");
    let in_flight =
        tokio::spawn(async move { request(Method::GET, &url, bytes::Bytes::new()).await });
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let pid = node.pid().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let r = in_flight.await.unwrap();
    assert_status(&r, StatusCode::OK);
    assert!(r.text().starts_with("slept 1500"), "{}", r.text());
    let status = node.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "node exit: {status:?}\n{}", node.log());
    assert!(!node.data_dir().join(nimbus_api::NODE_FILE).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeploy_under_load_fails_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let node = Node::start();
    let g = guests();
    let m = |v: u32| {
        manifest(
            "load",
            &[(
                "busy",
                &g.testbed,
                &format!("routes = [\"/busy/*\"]\nenv = {{ VERSION = \"v{v}\" }}"),
            )],
        )
    };
    node.deploy(&m(1));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let url = node.url("/busy/sleep?ms=20");
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = request(Method::GET, &url, bytes::Bytes::new()).await;
                    seen.push((r.status, r.text()));
                }
                seen
            })
        })
        .collect();
    for v in 2..=3 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        node.deploy(&m(v));
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    let mut versions = std::collections::BTreeSet::new();
    for client in clients {
        let seen = client.await.unwrap();
        let mut last = 0;
        for (status, body) in &seen {
            assert_eq!(
                *status,
                StatusCode::OK,
                "a request failed during a redeploy: {body}"
            );
            let v: u32 = body.rsplit('v').next().unwrap().parse().unwrap();
            assert!(v >= last, "a client went back from v{last} to v{v}");
            last = v;
            versions.insert(v);
        }
        total += seen.len();
    }
    assert!(total >= 50, "only {total} requests ran");
    assert_eq!(versions.into_iter().collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(node.get("/busy/ok").await.text().ends_with("v3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_components_serve_from_baseline_code_until_optimised() {
    let node = Node::start();
    node.deploy(&examples_manifest("Tiered"));
    // Serving right after the deploy, whichever tier's code runs.
    assert_eq!(node.get("/hello").await.text(), "Tiered from Nimbus!\n");
    let status = node.status().await;
    assert!(status.engine.compiled >= 2, "{status:?}");

    // The optimising compiles finish in the background and take over.
    let status = eventually(
        Duration::from_secs(120),
        "the optimising compiles",
        || async {
            let s = node.status().await;
            (s.engine.optimized == s.engine.compiled).then_some(s)
        },
    )
    .await;
    assert!(status.engine.optimized >= 2, "{status:?}");
    for _ in 0..3 {
        assert_eq!(node.get("/hello").await.text(), "Tiered from Nimbus!\n");
    }
    // Both tiers' artifacts are on disk: a restart maps code either way.
    let names: Vec<String> = std::fs::read_dir(node.data_dir().join("artifacts/compiled"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let baseline = names
        .iter()
        .filter(|n| n.ends_with("-baseline.cwasm"))
        .count();
    assert_eq!(baseline * 2, names.len(), "{names:?}");
}

/// `nimbus deploy --build` with the repository's nimbus.toml, the README's
/// first command: its build steps put the examples where the manifest reads
/// them even when the environment moves cargo's output elsewhere; a build
/// step that leaves no component is refused before anything is deployed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_build_puts_components_where_the_manifest_reads_them() {
    let node = Node::start();
    let elsewhere = tempfile::tempdir().unwrap();
    let deploy_build = |manifest: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nimbus"))
            .args(["deploy", "--build", manifest.to_str().unwrap()])
            .env("NIMBUS_DATA_DIR", node.data_dir())
            .env("CARGO_TARGET_DIR", elsewhere.path())
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("NIMBUS_URL")
            .env_remove("NIMBUS_TOKEN")
            .output()
            .unwrap()
    };

    // A copy of the repository's manifest and examples, never built.
    let copy = tempfile::tempdir().unwrap();
    let root = repo_root();
    std::fs::copy(root.join("nimbus.toml"), copy.path().join("nimbus.toml")).unwrap();
    for file in [
        "Cargo.toml",
        "Cargo.lock",
        "hello/Cargo.toml",
        "hello/src/lib.rs",
        "api/Cargo.toml",
        "api/src/lib.rs",
    ] {
        let to = copy.path().join("examples").join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(root.join("examples").join(file), to).unwrap();
    }
    let out = deploy_build(&copy.path().join("nimbus.toml"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node.get("/hello").await.text(), "Hello from Nimbus!\n");
    assert_status(&node.get("/api/greet/ada").await, StatusCode::OK);

    // A command that succeeds without writing the component.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nimbus.toml");
    std::fs::write(
        &path,
        "[app]\nname = \"ghosts\"\n\n[functions.ghost]\ncomponent = \"out/ghost.wasm\"\nbuild = { command = \"true\" }\nroutes = [\"/ghost\"]\n",
    )
    .unwrap();
    let out = deploy_build(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the build command of `ghost` succeeded but left no component at")
            && stderr.contains("out/ghost.wasm")
            && stderr.contains("CARGO_TARGET_DIR is set"),
        "{stderr}"
    );
    assert_status(&node.get("/ghost").await, StatusCode::NOT_FOUND);
    assert_eq!(node.get("/hello").await.text(), "Hello from Nimbus!\n");
}
