//! `nimbus-node` is the composition root of a Nimbus node and the home of
//! its admin API.
//!
//! Start-up follows config → validate → build → spawn: [`NodeConfig`] is
//! checked and the data directory, registry and engine are opened, every
//! deployed function is loaded from its compiled artifact, and only then are
//! the gateway and admin listeners bound and served. Deploys, rollbacks and
//! removals go through [`state::NodeState`], which records them in the
//! registry and swaps the gateway's route table atomically.

mod admin;
mod alerts;
mod buckets;
mod deliver;
mod deploy;
mod history;
mod idle;
pub mod state;
mod ui;

use anyhow::Context as _;
use nimbus_api::{NODE_FILE, NodeInfo, TOKEN_FILE};
use nimbus_engine::Engine;
use nimbus_gateway::Gateway;
use nimbus_store::SqliteRegistry;
use state::NodeState;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How to run a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Gateway address (functions).
    pub listen: SocketAddr,
    /// Admin API address.
    pub admin_listen: SocketAddr,
    /// Directory of the SQLite database, artifacts and token.
    pub data_dir: PathBuf,
    /// How much function output is kept.
    pub log_retention: nimbus_telemetry::logs::Retention,
    /// Where buckets keep their objects.
    pub objects: ObjectStorage,
    /// Whether invocations are counted for `/metrics`, `nimbus top`, the
    /// dashboard and alerts, and their spans kept for the dashboard (off
    /// only to measure what recording costs).
    pub metrics: bool,
    /// Where spans are exported over OTLP, if anywhere.
    pub otlp: Option<(String, nimbus_otlp::Protocol)>,
    /// Idle time after which a function's instances and code leave memory
    /// (`None`: never).
    pub scale_to_zero_after: Option<Duration>,
    /// The bin width of the idle-time histograms by which functions with
    /// predictable idle times leave memory and come back ahead of their
    /// next call (`None`: the fixed time above for every function).
    pub adaptive_keep_alive: Option<Duration>,
}

/// Where buckets keep their objects.
#[derive(Clone, Debug, Default)]
pub enum ObjectStorage {
    /// Under the data directory (`objects/`).
    #[default]
    Local,
    /// In an S3-compatible service: `s3://BUCKET[/PREFIX]`, configured by
    /// the `AWS_*` environment variables.
    S3(String),
}

/// Opens the object store and proves it answers.
async fn open_objects(
    storage: &ObjectStorage,
    data_dir: &Path,
) -> anyhow::Result<Arc<dyn nimbus_buckets::BucketStore>> {
    Ok(match storage {
        ObjectStorage::Local => {
            let dir = data_dir.join("objects");
            Arc::new(
                nimbus_buckets::LocalDisk::open(&dir).with_context(|| {
                    format!("cannot open the object store in {}", dir.display())
                })?,
            )
        }
        ObjectStorage::S3(url) => {
            let store = nimbus_buckets::S3Store::connect(url)?;
            store
                .check()
                .await
                .context("cannot use the object store (check the AWS_* settings)")?;
            Arc::new(store)
        }
    })
}

/// A node whose listeners are bound.
pub struct RunningNode {
    pub gateway_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shutdown: watch::Sender<Option<Duration>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    state: Arc<NodeState>,
}

impl RunningNode {
    /// Asks the node to stop: listeners close, in-flight requests drain for
    /// up to the longest function timeout.
    pub fn shutdown(&self) {
        // Sources stop pulling; what they hold unacknowledged comes back
        // from the broker.
        self.state.sources.stop();
        let _ = self.state.stopping.send(true);
        let _ = self.shutdown.send(Some(self.state.drain_timeout()));
    }

    /// Waits until both servers have drained and stopped.
    pub async fn wait(self) {
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = std::fs::remove_file(self.state.data_dir.join(NODE_FILE));
        tracing::info!("node stopped");
    }
}

/// Opens state, loads functions, binds and serves.
pub async fn start(config: NodeConfig) -> anyhow::Result<RunningNode> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    let data_dir = config
        .data_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", config.data_dir.display()))?;
    let token = load_or_create_token(&data_dir)?;
    let registry = SqliteRegistry::open(&data_dir.join("state.db"))
        .with_context(|| format!("cannot open {}", data_dir.join("state.db").display()))?;
    let logs =
        nimbus_telemetry::logs::LogStore::open(&data_dir.join("logs.db"), config.log_retention)
            .with_context(|| format!("cannot open {}", data_dir.join("logs.db").display()))?;
    let mut engine = Engine::new(&data_dir.join("artifacts"))
        .context("cannot start the engine")?
        .with_log_sink(logs.clone());
    // Code that never leaves memory has nothing to learn.
    let adaptive = config
        .adaptive_keep_alive
        .filter(|_| config.scale_to_zero_after.is_some());
    if let Some(bin) = adaptive {
        engine = engine.with_adaptive_keep_alive(bin);
    }
    let queue: Arc<dyn nimbus_queue::Queue> = Arc::new(
        nimbus_queue::SqliteQueue::open(&data_dir.join("queue.db"))
            .with_context(|| format!("cannot open {}", data_dir.join("queue.db").display()))?,
    );

    let objects = open_objects(&config.objects, &data_dir).await?;
    let spans = match &config.otlp {
        Some((endpoint, protocol)) => Some(nimbus_otlp::start(endpoint, *protocol)?),
        None => None,
    };

    let gateway_listener = TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (is another node running? use --listen to pick another address)",
            config.listen
        )
    })?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (use --admin-listen to pick another address)",
                config.admin_listen
            )
        })?;
    let gateway_addr = gateway_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let info = NodeInfo {
        gateway_url: format!("http://{gateway_addr}"),
        admin_url: format!("http://{admin_addr}"),
        pid: std::process::id(),
    };
    let signal = Arc::new(nimbus_dispatch::Signal::default());
    let intake = Arc::new(nimbus_dispatch::NodeIntake {
        queue: queue.clone(),
        signal: signal.clone(),
        admin_url: info.admin_url.clone(),
    });
    // The latest spans stay in memory for the dashboard; with a collector
    // configured they are exported too.
    let recent_spans = Arc::new(nimbus_telemetry::spans::RecentSpans::new(RECENT_SPANS));
    let mut sinks: Vec<Arc<dyn nimbus_telemetry::spans::SpanSink>> = Vec::new();
    if config.metrics {
        sinks.push(recent_spans.clone());
    }
    sinks.extend(spans.map(|otlp| otlp as Arc<dyn nimbus_telemetry::spans::SpanSink>));
    let mut gateway = Gateway::new(Some(intake.clone()));
    if !sinks.is_empty() {
        gateway = gateway.with_spans(Arc::new(nimbus_telemetry::spans::Fanout(sinks)));
    }
    let gateway = Arc::new(gateway);
    let dispatcher = Arc::new(nimbus_dispatch::Dispatcher::new(
        queue.clone(),
        gateway.clone(),
        signal,
    ));
    let sources = Arc::new(nimbus_sources::Supervisor::new(Arc::new(
        deliver::NodeDeliver {
            dispatcher: dispatcher.clone(),
        },
    )));
    let scheduler = Arc::new(nimbus_dispatch::Scheduler {
        intake: intake.clone(),
        gateway: gateway.clone(),
        changed: tokio::sync::Notify::new(),
    });

    let state = Arc::new(NodeState::new(
        Arc::new(engine),
        Arc::new(registry),
        gateway.clone(),
        token,
        info.clone(),
        data_dir.clone(),
        intake,
        scheduler.clone(),
        sources,
        logs,
        objects,
    ));
    state
        .metrics
        .store(config.metrics, std::sync::atomic::Ordering::Relaxed);
    let _ = state.recent_spans.set(recent_spans);
    state.load_all().await?;

    write_node_file(&data_dir, &info)?;

    let (shutdown, rx) = watch::channel(None);
    let gw = gateway.clone();
    let gateway_task = tokio::spawn(nimbus_gateway::server::serve(
        gateway_listener,
        move |req| {
            let gw = gw.clone();
            async move { gw.handle(req).await }
        },
        rx.clone(),
    ));
    let dispatch_task = tokio::spawn(dispatcher.run(rx.clone()));
    let alert_task = tokio::spawn(alerts::run(state.clone(), state.alerts.clone(), rx.clone()));
    let history_task = tokio::spawn(history::run(
        state.clone(),
        state.history.clone(),
        rx.clone(),
    ));
    let schedule_task = tokio::spawn(scheduler.run(rx.clone()));
    let idle_task = tokio::spawn(idle::run(
        state.clone(),
        config.scale_to_zero_after,
        adaptive,
        rx.clone(),
    ));
    let admin_state = state.clone();
    let admin_task = tokio::spawn(nimbus_gateway::server::serve(
        admin_listener,
        move |req| {
            let state = admin_state.clone();
            async move { admin::handle(state, req).await }
        },
        rx,
    ));
    tracing::info!(
        gateway = %info.gateway_url,
        admin = %info.admin_url,
        data_dir = %data_dir.display(),
        functions = state.gateway.table().functions().count(),
        "node started"
    );
    Ok(RunningNode {
        gateway_addr,
        admin_addr,
        shutdown,
        tasks: vec![
            gateway_task,
            admin_task,
            dispatch_task,
            schedule_task,
            alert_task,
            history_task,
            idle_task,
        ],
        state,
    })
}

/// Calls `tick` every `period` (late ticks delayed, not bunched) until the
/// node stops.
pub(crate) async fn every(
    period: Duration,
    mut shutdown: watch::Receiver<Option<Duration>>,
    mut tick: impl FnMut(),
) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => tick(),
            _ = shutdown.changed() => return,
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn write_node_file(data_dir: &Path, info: &NodeInfo) -> anyhow::Result<()> {
    let path = data_dir.join(NODE_FILE);
    let tmp = data_dir.join(format!(".{NODE_FILE}.tmp"));
    let text = serde_json::to_vec_pretty(info)?;
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reads the admin token, creating it (mode 0600) on first start.
fn load_or_create_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("cannot read random bytes for the admin token")?;
    let token = format!("nmb_{}", hex::encode(bytes));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    tracing::info!(path = %path.display(), "created the admin token");
    Ok(token)
}

/// Invocations whose spans are kept in memory for the dashboard.
const RECENT_SPANS: usize = 4096;

/// Longest a drain waits beyond the longest function timeout.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);
