//! Test support: builds the guest components once, starts real node
//! processes on ephemeral ports, and talks to them over sockets.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use http::{Method, StatusCode};
use nimbus_api::{NODE_FILE, NodeInfo};
use nimbus_cli::client::{self, Admin, Reply};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Builds a guest workspace for wasm32-wasip2 (cargo caches between runs).
fn build_guests(dir: &Path) {
    let out = Command::new(env!("CARGO"))
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "building the guests in {} failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Paths of the built guest components.
pub struct Guests {
    pub testbed: PathBuf,
    pub command: PathBuf,
    pub foreign_import: PathBuf,
    pub preinit: PathBuf,
    pub preinit_trap: PathBuf,
    pub hello: PathBuf,
    pub api: PathBuf,
}

pub fn guests() -> &'static Guests {
    static GUESTS: OnceLock<Guests> = OnceLock::new();
    GUESTS.get_or_init(|| {
        let root = repo_root();
        build_guests(&root.join("tests/fixtures"));
        build_guests(&root.join("examples"));
        let f = root.join("tests/fixtures/target/wasm32-wasip2/release");
        let e = root.join("examples/target/wasm32-wasip2/release");
        Guests {
            testbed: f.join("testbed.wasm"),
            command: f.join("command.wasm"),
            foreign_import: f.join("foreign_import.wasm"),
            preinit: f.join("preinit.wasm"),
            preinit_trap: f.join("preinit_trap.wasm"),
            hello: e.join("hello.wasm"),
            api: e.join("api.wasm"),
        }
    })
}

/// A node process.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub gateway: String,
    pub admin: Admin,
}

impl Node {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    /// The node's log, with every line logged so far. The node writes its
    /// lines from a thread of their own a few milliseconds after they are
    /// logged, so this reads until the file has stopped growing for 100 ms
    /// (for at most 5 s).
    pub fn log(&self) -> String {
        let read = || std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = read();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = read();
            if now.len() == last.len() || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// Starts a node in a fresh temporary directory.
    pub fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir)
    }

    /// Starts a node whose data directory is `dir/data`.
    pub fn start_in(dir: tempfile::TempDir) -> Node {
        Self::start_with_env(dir, &[])
    }

    /// Starts a node with extra environment variables.
    pub fn start_with_env(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Node {
        let data = dir.path().join("data");
        let _ = std::fs::remove_file(data.join(NODE_FILE));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("node.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nimbus"))
            .args([
                "up",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .arg("--data-dir")
            .arg(&data)
            .env("NIMBUS_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(60);
        let info: NodeInfo = loop {
            if let Ok(text) = std::fs::read_to_string(data.join(NODE_FILE))
                && let Ok(info) = serde_json::from_str::<NodeInfo>(&text)
                && info.pid == pid
            {
                break info;
            }
            assert!(
                Instant::now() < deadline,
                "node did not start:\n{}",
                std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let admin = Admin::discover(Some(info.admin_url), None, &data).unwrap();
        Node {
            dir,
            child: Some(child),
            gateway: info.gateway_url,
            admin,
        }
    }

    /// Kills the node with SIGKILL and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Kills the node and starts a new one on the same data directory.
    pub fn restart_after_kill9(mut self) -> Node {
        self.kill9();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Node::start_in(dir)
    }

    /// Stops the node with SIGTERM, as a user would, waits for it to exit,
    /// and starts a new one on the same data directory with `env`.
    pub fn restart_with_env(mut self, env: &[(&str, &str)]) -> Node {
        if let Some(mut c) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            let exit = c.wait().unwrap();
            assert!(
                exit.success(),
                "the node exited with {exit}:\n{}",
                self.log()
            );
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Node::start_with_env(dir, env)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Writes `manifest` into the node's directory and deploys it with the
    /// `nimbus` CLI, as a user would.
    pub fn deploy_cli(&self, manifest: &str) -> std::process::Output {
        let path = self.dir.path().join("nimbus.toml");
        std::fs::write(&path, manifest).unwrap();
        self.cli(&["deploy", path.to_str().unwrap()])
    }

    /// Runs the `nimbus` CLI against this node (found through its data dir).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_nimbus"))
            .args(args)
            .env("NIMBUS_DATA_DIR", self.data_dir())
            .env_remove("NIMBUS_URL")
            .env_remove("NIMBUS_TOKEN")
            .output()
            .unwrap()
    }

    /// Deploys `manifest`, panicking with the CLI's output if it fails.
    pub fn deploy(&self, manifest: &str) -> String {
        let out = self.deploy_cli(manifest);
        assert!(
            out.status.success(),
            "deploy failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway)
    }

    pub async fn get(&self, path: &str) -> Reply {
        request(Method::GET, &self.url(path), Bytes::new()).await
    }

    pub async fn status(&self) -> nimbus_api::NodeStatus {
        self.admin
            .call(Method::GET, "/v1/status", None::<&()>)
            .await
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One request over a fresh connection, with a generous timeout.
pub async fn request(method: Method, url: &str, body: Bytes) -> Reply {
    client::send(method, url, &[], body, Duration::from_secs(60))
        .await
        .unwrap()
}

/// A manifest of one app, with `functions` given as TOML tables.
pub fn manifest(app: &str, functions: &[(&str, &Path, &str)]) -> String {
    let mut text = format!("[app]\nname = \"{app}\"\n");
    for (name, component, rest) in functions {
        text.push_str(&format!(
            "\n[functions.{name}]\ncomponent = \"{}\"\n{rest}\n",
            component.display()
        ));
    }
    text
}

pub fn assert_status(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status, "unexpected answer: {}", reply.text());
}

/// Peak resident memory of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One request the recorder received.
#[derive(Clone, Debug)]
pub struct Hit {
    pub path: String,
    pub query: std::collections::HashMap<String, String>,
    pub body: Bytes,
    pub at: Instant,
}

impl Hit {
    pub fn get(&self, key: &str) -> &str {
        self.query.get(key).map_or("", String::as_str)
    }
}

fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP server outside the node that functions report to, so tests see
/// every execution (including duplicates) whatever the node believes.
/// `GET /record?ce-id=..&fail=N&status=S` answers S (default 500) to the
/// first N hits of that ce-id and 200 after; anything else answers 200.
/// `POST /batch?fail=N` takes a CloudEvents batch: each event is a hit
/// (its attributes under the header names of binary mode, `batch-size`
/// the number of events), and the answer is a partial batch response
/// listing the events that the same `fail` rule fails.
pub struct Recorder {
    pub url: String,
    hits: std::sync::Arc<std::sync::Mutex<Vec<Hit>>>,
}

impl Recorder {
    pub async fn start() -> Recorder {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits: std::sync::Arc<std::sync::Mutex<Vec<Hit>>> = Default::default();
        let shared = hits.clone();
        // Reports that asked to be held, so far.
        let held = std::sync::Arc::new(tokio::sync::watch::Sender::new(0usize));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let hits = shared.clone();
                let held = held.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let hits = hits.clone();
                        let held = held.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let path = req.uri().path().to_owned();
                            let header_trace = req
                                .headers()
                                .get("traceparent")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let mut query: std::collections::HashMap<String, String> = req
                                .uri()
                                .query()
                                .unwrap_or("")
                                .split('&')
                                .filter(|kv| !kv.is_empty())
                                .map(|kv| {
                                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                                    (unescape(k), unescape(v))
                                })
                                .collect();
                            query.insert("h-traceparent".into(), header_trace);
                            // `hold=N`: answered only once N held reports are
                            // here at the same time (each group of N in
                            // turn), or after 10 s; the hit says which.
                            if let Ok(n) = query
                                .get("hold")
                                .map_or("", String::as_str)
                                .parse::<usize>()
                            {
                                let mut nth = 0;
                                held.send_modify(|c| {
                                    *c += 1;
                                    nth = *c;
                                });
                                let group_full = nth.div_ceil(n.max(1)) * n.max(1);
                                let mut seen = held.subscribe();
                                let together = tokio::time::timeout(
                                    Duration::from_secs(10),
                                    seen.wait_for(|c| *c >= group_full),
                                )
                                .await
                                .is_ok();
                                query.insert(
                                    "held".into(),
                                    if together { "together" } else { "alone" }.into(),
                                );
                            }
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            // The status the `fail` rule gives a hit.
                            let record = |hit: Hit| {
                                let mut hits = hits.lock().unwrap();
                                let id = hit.get("ce-id").to_owned();
                                let nth = hits
                                    .iter()
                                    .filter(|h| !id.is_empty() && h.get("ce-id") == id)
                                    .count();
                                let fail: usize = hit.get("fail").parse().unwrap_or(0);
                                let status: u16 = hit.get("status").parse().unwrap_or(500);
                                hits.push(hit);
                                if nth < fail { status } else { 200 }
                            };
                            let (status, answer) = if path == "/batch" {
                                let events: Vec<serde_json::Value> =
                                    serde_json::from_slice(&body).unwrap();
                                let mut failed = Vec::new();
                                for e in &events {
                                    let mut query = query.clone();
                                    let text = |v: &serde_json::Value| match v {
                                        serde_json::Value::String(s) => s.clone(),
                                        other => other.to_string(),
                                    };
                                    for (k, v) in e.as_object().unwrap() {
                                        let key = match k.as_str() {
                                            "nimbusattempt" => "nimbus-attempt".to_owned(),
                                            "datacontenttype" => "content-type".to_owned(),
                                            "traceparent" | "data" => k.clone(),
                                            other => format!("ce-{other}"),
                                        };
                                        query.insert(key, text(v));
                                    }
                                    query.insert("batch-size".into(), events.len().to_string());
                                    let id = text(&e["id"]);
                                    let hit = Hit {
                                        path: path.clone(),
                                        query,
                                        body: Bytes::from(text(&e["data"])),
                                        at: Instant::now(),
                                    };
                                    if record(hit) != 200 {
                                        failed.push(serde_json::json!({"itemIdentifier": id}));
                                    }
                                }
                                let answer = serde_json::json!({"batchItemFailures": failed});
                                (200, answer.to_string())
                            } else {
                                let status = record(Hit {
                                    path,
                                    query,
                                    body,
                                    at: Instant::now(),
                                });
                                (status, format!("recorded {status}"))
                            };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(Bytes::from(answer)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Recorder { url, hits }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Executions per ce-id.
    pub fn executions(&self) -> std::collections::HashMap<String, usize> {
        self.executions_by("ce-id")
    }

    /// Executions per value of `key` (e.g. `body`, for events without an
    /// id of their own).
    pub fn executions_by(&self, key: &str) -> std::collections::HashMap<String, usize> {
        let mut out = std::collections::HashMap::new();
        for h in self.hits.lock().unwrap().iter() {
            *out.entry(h.get(key).to_owned()).or_insert(0) += 1;
        }
        out
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after
/// `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A daemon's command line for its port and directory.
type DaemonArgs = Box<dyn Fn(u16, &Path) -> Vec<String> + Send>;

/// A broker of the test's own (the machine's are shared and cannot be
/// restarted by a test), on a free port with its data in a temporary
/// directory that outlives restarts.
pub struct Daemon {
    pub port: u16,
    pub dir: tempfile::TempDir,
    binary: &'static str,
    args: DaemonArgs,
    child: Option<std::process::Child>,
}

impl Daemon {
    /// Starts `binary` with `args(port, dir)`, or returns `None` (loudly)
    /// when it is not installed outside CI.
    pub fn start(
        binary: &'static str,
        args: impl Fn(u16, &Path) -> Vec<String> + Send + 'static,
    ) -> Option<Daemon> {
        if binary.starts_with('/') && !Path::new(binary).exists() {
            if std::env::var_os("CI").is_some() {
                panic!("CI needs {binary}");
            }
            eprintln!("\n!!!!! SKIPPED: {binary} is not installed\n");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut daemon = Daemon {
            port,
            dir: tempfile::tempdir().unwrap(),
            binary,
            args: Box::new(args),
            child: None,
        };
        daemon.spawn();
        Some(daemon)
    }

    /// Starts it (again), and waits until it accepts connections.
    pub fn spawn(&mut self) {
        let child = std::process::Command::new(self.binary)
            .args((self.args)(self.port, self.dir.path()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..400 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not start on port {}", self.binary, self.port);
    }

    /// Stops it with `signal` (`KILL`, or `TERM` for a clean shutdown).
    pub fn stop(&mut self, signal: &str) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args([&format!("-{signal}"), &c.id().to_string()])
                .status();
            c.wait().unwrap();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop("KILL");
    }
}

/// A shared broker or database the test needs: `Some` when `connected`
/// worked; otherwise a failure under CI and a loud skip elsewhere.
pub fn service<T, E: std::fmt::Display>(
    what: &str,
    start_with: &str,
    connected: Result<T, E>,
) -> Option<T> {
    match connected {
        Ok(c) => Some(c),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "\n!!!!! SKIPPED: {what} cannot be used ({e}); start it with\n!!!!! {start_with}\n"
            );
            None
        }
        Err(e) => panic!("CI needs {what}: {e}"),
    }
}

/// Whether Python can import `modules` (comma-separated): `Some` when it
/// can; otherwise a failure under CI and a loud skip elsewhere.
pub fn python_modules(what: &str, modules: &str, install: &str) -> Option<()> {
    let installed = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .map_err(|e| e.to_string())
        .and_then(|o| {
            if o.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&o.stderr).into_owned())
            }
        });
    service(what, install, installed)
}

/// A name no earlier run used: `prefix`, `sep`, the time in ns.
pub fn unique(prefix: &str, sep: &str) -> String {
    format!(
        "{prefix}{sep}{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// The manifest lines of function `consume`: the testbed's relay reporting
/// to `recorder` (with `relay_query` added), `extra` settings, and one
/// source given by its TOML lines.
pub fn relay_consumer(recorder: &Recorder, source: &str, relay_query: &str, extra: &str) -> String {
    format!(
        "env = {{ ACTION = \"relay\", RECORDER = \"{url}\", RELAY_QUERY = \"{relay_query}\" }}\nallowed_outbound_hosts = [\"{url}\"]\n{extra}\n\
         [[functions.consume.sources]]\n{source}\n",
        url = recorder.url
    )
}

/// A node running function `consume` (the relay reporting to `recorder`)
/// with one source given by its TOML lines, once the source is healthy.
pub async fn consumer_node(recorder: &Recorder, source: &str) -> Node {
    node_with_consumer(&relay_consumer(recorder, source, "", "")).await
}

/// A node running function `consume` (the testbed) with the manifest lines
/// `lines`, once its first source is healthy.
pub async fn node_with_consumer(lines: &str) -> Node {
    let node = Node::start();
    node.deploy(&manifest(
        "events",
        &[("consume", &guests().testbed, lines)],
    ));
    source_healthy(&node).await;
    node
}

/// Waits until function `consume` has `n` dead-lettered invocations.
pub async fn dead_letters(node: &Node, n: usize) -> Vec<nimbus_queue::InvocationRecord> {
    eventually(
        Duration::from_secs(60),
        &format!("{n} dead-lettered messages"),
        || async {
            let list: Vec<nimbus_queue::InvocationRecord> = node
                .admin
                .call(Method::GET, "/v1/functions/consume/dlq", None::<&()>)
                .await
                .unwrap();
            (list.len() == n).then_some(list)
        },
    )
    .await
}

/// Waits until the node's first source reports healthy.
pub async fn source_healthy(node: &Node) {
    eventually(
        Duration::from_secs(30),
        "the source to be healthy",
        || async {
            node.status()
                .await
                .sources
                .first()
                .is_some_and(|s| s.healthy)
                .then_some(())
        },
    )
    .await;
}

/// Waits until the node's first source reports unhealthy, and returns it.
pub async fn source_unhealthy(node: &Node) -> nimbus_api::SourceHealth {
    let down = eventually(
        Duration::from_secs(30),
        "the source to turn unhealthy",
        || async {
            let s = node.status().await.sources.into_iter().next()?;
            (!s.healthy).then_some(s)
        },
    )
    .await;
    assert!(down.last_error.is_some(), "{down:?}");
    down
}

/// Distinct events run and duplicate executions, counted by `key`.
pub fn tally(recorder: &Recorder, key: &str) -> (usize, usize) {
    let executions = recorder.executions_by(key);
    let duplicates = executions.values().map(|n| n - 1).sum();
    (executions.len(), duplicates)
}
