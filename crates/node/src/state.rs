//! The node's live state: registry, engine and the gateway's route table,
//! kept consistent by serialising every change behind one lock.

use crate::deploy::{self, PlanError, Step};
use nimbus_api::{Change, DeployRequest, DeployResponse, DeployedFunction, NodeInfo};
use nimbus_dispatch::{NodeIntake, Scheduler};
use nimbus_engine::{
    ComponentDigest, Engine, EngineError, FunctionLimits, FunctionSpec, Load, OutboundPolicy,
};
use nimbus_gateway::admission::Admission;
use nimbus_gateway::{Deployed, Gateway, RouteTable};
use nimbus_manifest::Destination;
use nimbus_manifest::{FunctionConfig, FunctionName};
use nimbus_queue::Queue;
use nimbus_store::{FunctionRecord, Registry, StoreError, Upsert};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a change to the node's functions failed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("function `{0}` does not exist")]
    NoSuchFunction(String),
    #[error("component {0} was not uploaded: PUT it to /v1/components/{0} first")]
    MissingComponent(String),
    #[error("function `{name}` has no version before v{active} to roll back to")]
    NothingToRollBack { name: String, active: u64 },
    #[error("function `{name}` v{version}: {source}")]
    Engine {
        name: String,
        version: u64,
        #[source]
        source: EngineError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "function `{function}`: the webhook route {route} reads its secret from the environment variable {var}, which is not set on the node; set it where `nimbus up` runs"
    )]
    MissingSecret {
        function: String,
        route: String,
        var: String,
    },
    #[error(
        "function `{function}` sends its results to function `{target}`, which is not deployed: deploy it too or change destinations"
    )]
    NoSuchDestination { function: String, target: String },
    #[error(
        "function `{function}`: the secret {name} is read from {from}, which is not set or not readable on the node; set it where `nimbus up` runs"
    )]
    SecretUnavailable {
        function: String,
        name: String,
        from: String,
    },
    #[error("function `{function}`: source {source_key} cannot be used: {reason}")]
    Source {
        function: String,
        source_key: String,
        reason: String,
    },
    #[error("queue: {0}")]
    Queue(#[from] nimbus_queue::QueueError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Everything a node holds.
pub struct NodeState {
    pub engine: Arc<Engine>,
    pub registry: Arc<dyn Registry>,
    pub gateway: Arc<Gateway>,
    pub token: String,
    pub info: NodeInfo,
    pub data_dir: PathBuf,
    pub started: Instant,
    /// Start time in seconds since the Unix epoch.
    pub started_unix: f64,
    /// Functions the node could not load, with the reason.
    failed: Mutex<BTreeMap<FunctionName, String>>,
    /// Serialises deploys, rollbacks and removals.
    changes: tokio::sync::Mutex<()>,
    /// Concurrent compiles of uploaded components.
    pub compiles: tokio::sync::Semaphore,
    /// Asynchronous work: the queue and what wakes its consumers.
    pub intake: Arc<NodeIntake>,
    pub scheduler: Arc<Scheduler>,
    pub sources: Arc<nimbus_sources::Supervisor>,
    /// Function output, kept for `nimbus logs`.
    pub logs: Arc<nimbus_telemetry::logs::LogStore>,
    /// Set when the node starts stopping: ends live log streams.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Where buckets keep their objects.
    pub buckets: Arc<dyn nimbus_buckets::BucketStore>,
    /// The functions' alert rules and their states.
    pub alerts: Arc<crate::alerts::Alerts>,
    /// Whether new versions count their invocations.
    pub metrics: std::sync::atomic::AtomicBool,
    /// Recent readings of every function's counters, for the dashboard.
    pub history: Arc<crate::history::History>,
    /// The latest spans, for the dashboard's timelines.
    pub recent_spans: std::sync::OnceLock<Arc<nimbus_telemetry::spans::RecentSpans>>,
}

/// Compiles that may run at once (each uses all cores while it lasts).
const MAX_CONCURRENT_COMPILES: usize = 2;

/// Functions whose code a start maps before serving (the most recently
/// deployed): a few hundred microseconds each, so start-up stays fast
/// however many functions are deployed.
const PRELOAD_AT_START: usize = 64;

/// How long a start waits for the instances it prepares for those
/// functions before it serves anyway: ample for 64 ordinary instantiations
/// (tens to hundreds of microseconds each), and a function whose
/// instantiation hangs cannot hold the node back for its whole timeout.
const PREPARE_AT_START_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

fn spec_of(
    name: &FunctionName,
    version: u64,
    digest: &ComponentDigest,
    config: &FunctionConfig,
) -> Result<FunctionSpec, ChangeError> {
    let secrets = resolve_secrets(name, config)?;
    Ok(FunctionSpec {
        name: name.to_string(),
        version,
        digest: digest.clone(),
        env: config
            .env
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
            .chain(secrets.iter().cloned())
            .collect(),
        limits: FunctionLimits {
            memory_bytes: config.limits.memory.get() << 20,
            timeout: config.limits.timeout.get(),
        },
        outbound: OutboundPolicy::new(config.allowed_outbound_hosts.clone()),
        secrets: nimbus_telemetry::redact::Redactor::new(secrets.into_iter().map(|(_, v)| v)),
        reuse: config.reuse.get(),
        prewarm: config.prewarm.get(),
        max_idle_instances: config.limits.max_concurrency.get(),
    })
}

/// Reads the function's secrets where they live on the node.
fn resolve_secrets(
    name: &FunctionName,
    config: &FunctionConfig,
) -> Result<Vec<(String, String)>, ChangeError> {
    config
        .secrets
        .iter()
        .map(|(var, from)| {
            let value = match from {
                nimbus_manifest::SecretSource::Env(e) => std::env::var(e.as_str()).ok(),
                nimbus_manifest::SecretSource::File(path) => std::fs::read_to_string(path)
                    .ok()
                    .map(|v| v.strip_suffix('\n').unwrap_or(&v).to_owned()),
            };
            value
                .filter(|v| !v.is_empty())
                .map(|v| (var.as_str().to_owned(), v))
                .ok_or_else(|| ChangeError::SecretUnavailable {
                    function: name.to_string(),
                    name: var.as_str().to_owned(),
                    from: from.to_string(),
                })
        })
        .collect()
}

impl NodeState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Arc<Engine>,
        registry: Arc<dyn Registry>,
        gateway: Arc<Gateway>,
        token: String,
        info: NodeInfo,
        data_dir: PathBuf,
        intake: Arc<NodeIntake>,
        scheduler: Arc<Scheduler>,
        sources: Arc<nimbus_sources::Supervisor>,
        logs: Arc<nimbus_telemetry::logs::LogStore>,
        buckets: Arc<dyn nimbus_buckets::BucketStore>,
    ) -> Self {
        Self {
            engine,
            registry,
            gateway,
            token,
            info,
            data_dir,
            started: Instant::now(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default(),
            failed: Mutex::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
            compiles: tokio::sync::Semaphore::new(MAX_CONCURRENT_COMPILES),
            intake,
            scheduler,
            sources,
            logs,
            stopping: tokio::sync::watch::Sender::new(false),
            buckets,
            alerts: Arc::default(),
            metrics: std::sync::atomic::AtomicBool::new(true),
            recent_spans: std::sync::OnceLock::new(),
            history: Arc::default(),
        }
    }

    /// The queue of asynchronous work.
    pub fn queue(&self) -> &Arc<dyn Queue> {
        &self.intake.queue
    }

    /// Queued, running and dead-lettered work per function (empty when the
    /// queue cannot answer: the readers show zeros rather than fail).
    pub async fn queue_stats(&self) -> HashMap<String, nimbus_queue::QueueStats> {
        self.queue()
            .stats()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|q| (q.function.clone(), q))
            .collect()
    }

    /// After the serving set changed: records which schedules exist (new
    /// ones start now), and wakes the scheduler and the dispatcher so work
    /// queued for a function that just became servable runs.
    async fn settle(&self, records: &[FunctionRecord]) -> Result<(), ChangeError> {
        let schedules = records
            .iter()
            .flat_map(|r| {
                r.active
                    .config
                    .schedules
                    .iter()
                    .map(|s| (r.name.to_string(), s.key()))
            })
            .collect();
        self.queue()
            .sync_schedules(schedules, nimbus_queue::now_ms())
            .await?;
        self.scheduler.changed.notify_one();
        let sources = self
            .gateway
            .table()
            .functions()
            .flat_map(|d| {
                d.config
                    .sources
                    .iter()
                    .map(|s| (d.name.to_string(), s.clone()))
            })
            .collect();
        self.sources.sync(sources);
        for r in records {
            self.intake.signal.wake(r.name.as_str(), 0);
        }
        Ok(())
    }

    /// Functions that failed to load, with the reason.
    pub fn failed(&self) -> BTreeMap<FunctionName, String> {
        self.failed.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Longest drain needed: the longest function timeout plus a grace.
    pub fn drain_timeout(&self) -> Duration {
        self.gateway
            .table()
            .functions()
            .map(|f| f.runtime.spec().limits.timeout)
            .max()
            .unwrap_or(Duration::ZERO)
            + crate::DRAIN_GRACE
    }

    /// Builds a servable version off the async executor.
    async fn prepare(
        &self,
        name: &FunctionName,
        version: u64,
        digest: &str,
        config: &FunctionConfig,
        admission: Option<Arc<Admission>>,
        load: Load,
    ) -> Result<Arc<Deployed>, ChangeError> {
        let digest = ComponentDigest::parse(digest)
            .ok_or_else(|| ChangeError::Plan(PlanError::BadDigest(digest.to_owned())))?;
        if !self.engine.has_component(&digest) {
            // A stored component can still be recompiled (engine upgrade);
            // only a digest never uploaded is refused here.
            let stored = self
                .data_dir
                .join("artifacts/components")
                .join(format!("{digest}.wasm"));
            if !stored.exists() {
                return Err(ChangeError::MissingComponent(digest.to_string()));
            }
        }
        let spec = spec_of(name, version, &digest, config)?;
        let engine = self.engine.clone();
        let runtime = tokio::task::spawn_blocking(move || engine.prepare(spec, load))
            .await
            .map_err(|e| ChangeError::Internal(e.to_string()))?
            .map_err(|source| ChangeError::Engine {
                name: name.to_string(),
                version,
                source,
            })?;
        let mut webhooks = HashMap::new();
        for route in &config.routes {
            if let Some(spec) = &route.webhook {
                let var = spec.secret_env.as_str();
                let secret = std::env::var(var)
                    .ok()
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| ChangeError::MissingSecret {
                        function: name.to_string(),
                        route: route.path.to_string(),
                        var: var.to_owned(),
                    })?;
                webhooks.insert(
                    route.path.to_string(),
                    Arc::new(nimbus_gateway::webhook::Verifier::new(
                        spec.clone(),
                        secret.as_bytes(),
                    )),
                );
            }
        }
        let limit = config.limits.max_concurrency.get();
        let admission = admission
            .filter(|a| a.limit() == limit)
            .unwrap_or_else(|| Arc::new(Admission::new(limit)));
        Ok(Arc::new(Deployed {
            name: name.clone(),
            version,
            runtime,
            admission,
            max_body: config.limits.max_body.get() << 20,
            config: config.clone(),
            webhooks,
            metrics: if self.metrics.load(std::sync::atomic::Ordering::Relaxed) {
                nimbus_telemetry::FunctionMetrics::default()
            } else {
                nimbus_telemetry::FunctionMetrics::off()
            },
        }))
    }

    /// Builds a servable handle for a record's active version.
    async fn prepare_active(
        &self,
        r: &FunctionRecord,
        load: Load,
    ) -> Result<Arc<Deployed>, ChangeError> {
        self.prepare(
            &r.name,
            r.active.version,
            &r.active.digest,
            &r.active.config,
            None,
            load,
        )
        .await
    }

    /// Loads every function in the registry (at start).
    pub async fn load_all(&self) -> Result<(), ChangeError> {
        let records = self.registry.functions()?;
        let mut deployed = Vec::new();
        let mut failed = BTreeMap::new();
        // The most recently deployed functions are mapped before the node
        // serves, each with an instance ready, so their first request after
        // a restart costs what a warm one does; the others stay on disk
        // until their first request, so functions nobody calls cost no
        // memory.
        let mut recent: Vec<&FunctionRecord> = records.iter().collect();
        recent.sort_by_key(|r| std::cmp::Reverse(r.updated_at));
        let preload: std::collections::HashSet<&FunctionName> = recent
            .iter()
            .take(PRELOAD_AT_START)
            .map(|r| &r.name)
            .collect();
        for r in &records {
            let load = if preload.contains(&r.name) {
                Load::Now
            } else {
                Load::OnFirstRequest
            };
            match self.prepare_active(r, load).await {
                Ok(d) => deployed.push(d),
                Err(e) => {
                    tracing::error!(function = %r.name, version = r.active.version, error = %e, "cannot load function");
                    failed.insert(r.name.clone(), e.to_string());
                }
            }
        }
        let stats = self.engine.stats();
        tracing::info!(
            functions = deployed.len(),
            failed = failed.len(),
            compiled = stats.compiled,
            loaded_from_cache = stats.loaded_from_cache,
            "loaded deployed functions"
        );
        if let Ok(mut f) = self.failed.lock() {
            *f = failed;
        }
        let mapped: Vec<_> = deployed
            .iter()
            .filter(|d| d.runtime.is_loaded() && d.runtime.spec().prewarm == 0)
            .map(|d| d.runtime.clone())
            .collect();
        self.gateway.swap(RouteTable::new(deployed));
        crate::idle::restore_idle_times(self);
        self.warm_up();
        // In a fresh process the first instance of a function also pays
        // the first touches of its pool slot and stacks (a few hundred
        // microseconds against tens): paid here, before the node serves.
        let mut preparing = tokio::task::JoinSet::new();
        for runtime in mapped {
            preparing.spawn(async move { runtime.load_ahead().await });
        }
        let all = async { while preparing.join_next().await.is_some() {} };
        if tokio::time::timeout(PREPARE_AT_START_WAIT, all)
            .await
            .is_err()
        {
            tracing::debug!("serving before every instance prepared at start is ready");
            preparing.detach_all();
        }
        self.settle(&records).await
    }

    /// Tops up the serving versions that keep instances warm (`prewarm`),
    /// each on a task of its own: their code is loaded and their instances
    /// made off any request's path.
    pub fn warm_up(&self) {
        for d in self.gateway.table().functions() {
            if d.runtime.needs_warming() {
                let runtime = d.runtime.clone();
                tokio::spawn(async move { runtime.warm().await });
            }
        }
    }

    /// Builds and swaps in the table for `records`, reusing what serves
    /// already and taking freshly prepared versions from `fresh`.
    fn publish(&self, records: &[FunctionRecord], mut fresh: HashMap<FunctionName, Arc<Deployed>>) {
        let table = self.gateway.table();
        let mut serving = Vec::new();
        for r in records {
            if let Some(d) = fresh.remove(&r.name) {
                serving.push(d);
            } else if let Some(d) = table.function(r.name.as_str())
                && d.version == r.active.version
            {
                serving.push(d.clone());
            }
        }
        if let Ok(mut failed) = self.failed.lock() {
            failed.retain(|name, _| {
                records.iter().any(|r| &r.name == name) && !serving.iter().any(|d| &d.name == name)
            });
        }
        let kept: std::collections::HashSet<*const Deployed> =
            serving.iter().map(Arc::as_ptr).collect();
        let retired: Vec<Arc<Deployed>> = table
            .functions()
            .filter(|old| !kept.contains(&Arc::as_ptr(old)))
            .cloned()
            .collect();
        self.gateway.swap(RouteTable::new(serving));
        // Replaced or removed versions give back their waiting instances
        // before the new ones are warmed.
        for d in &retired {
            d.runtime.retire();
        }
        self.warm_up();
        let keep: Vec<ComponentDigest> = records
            .iter()
            .filter_map(|r| ComponentDigest::parse(&r.active.digest))
            .collect();
        self.engine.retain_components(&keep);
    }

    fn next_version(&self, name: &FunctionName) -> Result<u64, ChangeError> {
        Ok(self
            .registry
            .versions(name)?
            .last()
            .map_or(1, |v| v.version + 1))
    }

    /// Applies the desired state of one app.
    pub async fn deploy(&self, request: DeployRequest) -> Result<DeployResponse, ChangeError> {
        let _guard = self.changes.lock().await;
        let current = self.registry.functions()?;
        let steps = deploy::plan(&current, &request)?;
        check_destinations(&current, &request)?;
        let table = self.gateway.table();

        let mut fresh = HashMap::new();
        let mut upserts = Vec::new();
        for step in steps
            .iter()
            .filter(|s| matches!(s.change, Change::Created | Change::Updated))
        {
            check_sources(&step.name, &step.config).await?;
            let version = self.next_version(&step.name)?;
            let admission = table
                .function(step.name.as_str())
                .map(|d| d.admission.clone());
            let d = self
                .prepare(
                    &step.name,
                    version,
                    &step.digest,
                    &step.config,
                    admission,
                    Load::Now,
                )
                .await?;
            fresh.insert(step.name.clone(), d);
            upserts.push(Upsert {
                name: step.name.clone(),
                digest: step.digest.clone(),
                config: step.config.clone(),
            });
        }
        // A function that failed to load at start is loaded again even when
        // its configuration did not change.
        let failed = self.failed();
        for step in steps
            .iter()
            .filter(|s| s.change == Change::Unchanged && failed.contains_key(&s.name))
        {
            if let Some(r) = current.iter().find(|r| r.name == step.name) {
                let d = self.prepare_active(r, Load::Now).await?;
                fresh.insert(step.name.clone(), d);
            }
        }
        let removals: Vec<FunctionName> = steps
            .iter()
            .filter(|s| s.change == Change::Removed)
            .map(|s| s.name.clone())
            .collect();

        let records = if upserts.is_empty() && removals.is_empty() {
            current
        } else {
            self.registry.apply(&request.app, &upserts, &removals)?
        };
        for d in fresh.values() {
            if let Some(r) = records.iter().find(|r| r.name == d.name)
                && r.active.version != d.version
            {
                return Err(ChangeError::Internal(format!(
                    "version of `{}` changed during the deploy",
                    d.name
                )));
            }
        }
        self.publish(&records, fresh);
        self.settle(&records).await?;

        let functions = steps
            .iter()
            .map(|s: &Step| {
                let version = records
                    .iter()
                    .find(|r| r.name == s.name)
                    .map_or(0, |r| r.active.version);
                DeployedFunction {
                    name: s.name.clone(),
                    change: s.change,
                    version,
                    routes: s.config.routes.iter().map(ToString::to_string).collect(),
                }
            })
            .collect::<Vec<_>>();
        for f in &functions {
            if f.change != Change::Unchanged {
                tracing::info!(app = %request.app, function = %f.name, version = f.version, change = ?f.change, "deployed");
            }
        }
        Ok(DeployResponse {
            app: request.app,
            functions,
        })
    }

    /// Activates an earlier version.
    pub async fn rollback(
        &self,
        name: &FunctionName,
        to: Option<u64>,
    ) -> Result<FunctionRecord, ChangeError> {
        let _guard = self.changes.lock().await;
        let record = self
            .registry
            .function(name)?
            .ok_or_else(|| ChangeError::NoSuchFunction(name.to_string()))?;
        let versions = self.registry.versions(name)?;
        let active = record.active.version;
        let target = match to {
            Some(v) => {
                versions
                    .iter()
                    .find(|x| x.version == v)
                    .ok_or(StoreError::NoSuchVersion {
                        function: name.to_string(),
                        version: v,
                    })?
            }
            None => versions
                .iter()
                .rev()
                .find(|x| x.version < active)
                .ok_or_else(|| ChangeError::NothingToRollBack {
                    name: name.to_string(),
                    active,
                })?,
        };
        let admission = self
            .gateway
            .table()
            .function(name.as_str())
            .map(|d| d.admission.clone());
        let d = self
            .prepare(
                name,
                target.version,
                &target.digest,
                &target.config,
                admission,
                Load::Now,
            )
            .await?;
        // Routes of the target version must still be free, and its
        // `prewarm` must fit beside the others'.
        let others: Vec<FunctionRecord> = self
            .registry
            .functions()?
            .into_iter()
            .filter(|r| &r.name != name)
            .collect();
        deploy::check_prewarm(
            others
                .iter()
                .map(|r| (&r.name, &r.active.config))
                .chain(std::iter::once((name, &target.config))),
        )?;
        for route in &target.config.routes {
            for other in &others {
                if let Some(o) = other
                    .active
                    .config
                    .routes
                    .iter()
                    .find(|o| o.conflicts_with(route))
                {
                    return Err(ChangeError::Plan(PlanError::RouteConflict {
                        name: name.to_string(),
                        route: route.to_string(),
                        other: other.name.to_string(),
                        other_route: o.to_string(),
                    }));
                }
            }
        }
        let updated = self.registry.activate(name, target.version)?;
        let records = self.registry.functions()?;
        self.publish(&records, HashMap::from([(name.clone(), d)]));
        self.settle(&records).await?;
        tracing::info!(function = %name, from = active, to = target.version, "rolled back");
        Ok(updated)
    }

    /// Removes a function.
    pub async fn remove(&self, name: &FunctionName) -> Result<(), ChangeError> {
        let _guard = self.changes.lock().await;
        if !self.registry.remove(name)? {
            return Err(ChangeError::NoSuchFunction(name.to_string()));
        }
        let records = self.registry.functions()?;
        self.publish(&records, HashMap::new());
        self.settle(&records).await?;
        tracing::info!(function = %name, "removed");
        Ok(())
    }
}

/// Every destination function of the request must exist once it applies:
/// in the request itself or deployed by another app.
fn check_destinations(
    current: &[FunctionRecord],
    request: &DeployRequest,
) -> Result<(), ChangeError> {
    let exists = |name: &FunctionName| {
        request.functions.contains_key(name)
            || current
                .iter()
                .any(|r| &r.name == name && r.app != request.app)
    };
    for (name, f) in &request.functions {
        let d = &f.config.destinations;
        for dest in [&d.on_success, &d.on_failure].into_iter().flatten() {
            if let Destination::Function(target) = dest
                && !exists(target)
            {
                return Err(ChangeError::NoSuchDestination {
                    function: name.to_string(),
                    target: target.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Longest a deploy waits for one source's broker to answer.
const SOURCE_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Every source of a new version must be usable before it is deployed.
async fn check_sources(name: &FunctionName, config: &FunctionConfig) -> Result<(), ChangeError> {
    for source in &config.sources {
        let failed = |reason: String| ChangeError::Source {
            function: name.to_string(),
            source_key: source.key(),
            reason,
        };
        let consumer =
            nimbus_sources::build(name.as_str(), source).map_err(|e| failed(e.to_string()))?;
        match tokio::time::timeout(SOURCE_CHECK_TIMEOUT, consumer.check()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(failed(e.to_string())),
            Err(_) => {
                return Err(failed(format!(
                    "the broker did not answer within {SOURCE_CHECK_TIMEOUT:?}"
                )));
            }
        }
    }
    Ok(())
}
