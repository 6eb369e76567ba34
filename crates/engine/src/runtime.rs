//! The wasmtime engine, the compile/load path of components, and the
//! execution of one request in a fresh instance: prepared ahead of the
//! request when the function is in use, so instantiation and the reset of
//! the previous instance stay off the request's path.

use crate::artifact::{ArtifactStore, ComponentDigest};
use crate::epoch::EpochTicker;
use crate::keepalive::{self, IdleHistory, Verdict};
use crate::limits::*;
use crate::outbound::{self, Denial, OutboundPolicy};
use crate::output::{FunctionOutput, OutputTag};
use crate::preinit;
use crate::validate::{self, ComponentError};
use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap,
    UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

/// Body of a function's response, streamed as the guest writes it.
pub type ResponseBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// Failures of the engine itself (not of a user's component).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error("artifact store: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("wasmtime: {0}")]
    Wasmtime(String),
}

impl EngineError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    fn wasmtime(e: wasmtime::Error) -> Self {
        Self::Wasmtime(format!("{e:#}"))
    }
}

/// Why an invocation produced no (complete) response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InvokeError {
    #[error("the function did not finish within its timeout of {0:?}")]
    Timeout(Duration),
    #[error("the function exceeded its memory limit of {0} MiB")]
    MemoryLimit(u64),
    #[error("the function trapped: {0}")]
    Trap(String),
    #[error("the function returned without sending a response")]
    NoResponse,
    #[error("the function answered with an error: {0}")]
    Guest(String),
    #[error("no instance slot is free: {0}")]
    Capacity(String),
    #[error("the request could not be handed to the function: {0}")]
    BadRequest(String),
    #[error("the function's code could not be loaded: {0}")]
    Unavailable(String),
}

/// Counters of the compile/load path, shown by `nimbus status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct EngineStats {
    /// Components compiled (to baseline code, which serves at once) since
    /// the node started.
    pub compiled: u64,
    /// Optimising compiles finished in the background since the node
    /// started.
    pub optimized: u64,
    /// Compiled artifacts loaded from disk since the node started.
    pub loaded_from_cache: u64,
}

/// Limits of one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionLimits {
    /// Cap of each linear memory, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock time one invocation may take, response body included.
    pub timeout: Duration,
}

/// Everything the engine needs to serve one version of a function.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    pub name: String,
    pub version: u64,
    pub digest: ComponentDigest,
    pub env: Vec<(String, String)>,
    pub limits: FunctionLimits,
    pub outbound: OutboundPolicy,
    /// The function's secret values, kept out of its captured output.
    pub secrets: nimbus_telemetry::redact::Redactor,
    /// Requests one instance serves, one after another, before it is
    /// recycled. 1 (the default) gives every request a fresh instance.
    pub reuse: u32,
    /// Idle reusable instances kept at most (the function's concurrency).
    pub max_idle_instances: u32,
    /// Instances kept instantiated ahead of requests (0: none). A version
    /// that keeps some holds its code and never scales to zero.
    pub prewarm: u32,
}

/// When a prepared version loads its compiled code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// Now: the version is linked (and so checked) before it is published.
    Now,
    /// On its first request: a node restart maps no code for functions
    /// nobody calls.
    OnFirstRequest,
}

/// The node's wasmtime engine.
pub struct Engine {
    core: Arc<Core>,
    /// Where function output is kept, besides the node log.
    log_sink: Option<Arc<dyn nimbus_telemetry::logs::LogSink>>,
    /// The width of a bin of each function's idle-time histogram, when
    /// functions learn their idle times (adaptive keep-alive).
    idle_resolution: Option<Duration>,
}

/// What the engine and every version it prepared share: wasmtime's engines
/// and linkers, the artifact store and the code loaded in memory.
struct Core {
    /// The optimising tier (Cranelift): what serves in the long run.
    inner: wasmtime::Engine,
    linker: Linker<Host>,
    /// The baseline tier (Winch): compiles several times faster, so a new
    /// component serves while the optimising compile runs.
    baseline: wasmtime::Engine,
    baseline_linker: Linker<Host>,
    artifacts: ArtifactStore,
    fingerprint: String,
    baseline_fingerprint: String,
    /// Linked code by component, shared by every version (of any function)
    /// with the same component.
    loaded: Mutex<HashMap<ComponentDigest, Linked>>,
    /// Components whose optimising compile is running.
    optimizing: Mutex<std::collections::HashSet<ComponentDigest>>,
    compiled: AtomicU64,
    optimized: AtomicU64,
    loaded_from_disk: AtomicU64,
    /// Advances both engines' epochs while guest code runs.
    ticker: Arc<EpochTicker>,
    /// Reference point of the versions' idle clocks.
    epoch: Instant,
    /// Instances prepared ahead of a lone request's successor, across all
    /// functions, against [`MAX_PREPARED_INSTANCES`].
    prepared: AtomicUsize,
    /// Instances kept ready for `prewarm`, against [`MAX_PREWARMED_INSTANCES`].
    prewarmed: AtomicUsize,
    /// Instances alive in the optimising tier's pool.
    pool: Option<wasmtime::PoolingAllocatorMetrics>,
    /// Each function's idle times, held by its live versions.
    idle_histories: Mutex<HashMap<Arc<str>, std::sync::Weak<IdleHistory>>>,
}

/// Linked code of one component, in one tier.
#[derive(Clone)]
struct Linked {
    pre: ProxyPre<Host>,
    /// Compiled by the optimising tier (else by the baseline tier, replaced
    /// once the optimising compile is done).
    optimized: bool,
}

impl Drop for Core {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

/// Settings both tiers share.
fn config() -> Config {
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .wasm_backtrace_max_frames(None)
        .max_wasm_stack(MAX_WASM_STACK_BYTES)
        .memory_init_cow(true)
        // No `.eh_frame` for guest code: wasmtime traps and collects guest
        // backtraces without it, and only native debuggers and profilers
        // read it. Registering it costs every code load (on a cold start's
        // path), and libgcc's unwinder unregisters by searching a list of
        // every registration, so unloads slowed down with the number of
        // functions loaded.
        .native_unwind_info(false);
    config
}

/// A linker with what every function may import.
fn linker(engine: &wasmtime::Engine) -> Result<Linker<Host>, EngineError> {
    let mut linker = Linker::<Host>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(EngineError::wasmtime)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(EngineError::wasmtime)?;
    Ok(linker)
}

fn fingerprint(engine: &wasmtime::Engine) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

impl Engine {
    /// Builds the engine and opens the artifact store under `artifact_root`.
    pub fn new(artifact_root: &Path) -> Result<Self, EngineError> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(MAX_INSTANCES)
            .total_core_instances(MAX_INSTANCES * 4)
            .total_memories(MAX_INSTANCES)
            .total_tables(MAX_INSTANCES * 2)
            .total_stacks(MAX_INSTANCES)
            .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
            .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
            .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
            .max_memory_size(MAX_MEMORY_BYTES as usize)
            .table_elements(MAX_TABLE_ELEMENTS)
            .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT_BYTES)
            .table_keep_resident(TABLE_KEEP_RESIDENT_BYTES)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut optimizing = config();
        optimizing
            .strategy(wasmtime::Strategy::Cranelift)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let inner = wasmtime::Engine::new(&optimizing).map_err(EngineError::wasmtime)?;
        // Baseline code serves only until its optimised replacement is
        // ready, so its instances are allocated on demand rather than from
        // a second pool reserving address space for the node's lifetime.
        let mut quick = config();
        quick
            .strategy(wasmtime::Strategy::Winch)
            .allocation_strategy(InstanceAllocationStrategy::OnDemand);
        let baseline = wasmtime::Engine::new(&quick).map_err(EngineError::wasmtime)?;

        let artifacts = ArtifactStore::open(artifact_root).map_err(EngineError::io(format!(
            "opening {}",
            artifact_root.display()
        )))?;

        let pool = inner.pooling_allocator_metrics();
        let ticker = EpochTicker::spawn(vec![inner.weak(), baseline.weak()])
            .map_err(EngineError::io("starting the epoch ticker"))?;

        Ok(Self {
            core: Arc::new(Core {
                linker: linker(&inner)?,
                fingerprint: fingerprint(&inner),
                inner,
                baseline_linker: linker(&baseline)?,
                baseline_fingerprint: format!("{}-baseline", fingerprint(&baseline)),
                baseline,
                artifacts,
                loaded: Mutex::new(HashMap::new()),
                optimizing: Mutex::new(std::collections::HashSet::new()),
                compiled: AtomicU64::new(0),
                optimized: AtomicU64::new(0),
                loaded_from_disk: AtomicU64::new(0),
                ticker,
                epoch: Instant::now(),
                prepared: AtomicUsize::new(0),
                prewarmed: AtomicUsize::new(0),
                pool,
                idle_histories: Mutex::new(HashMap::new()),
            }),
            log_sink: None,
            idle_resolution: None,
        })
    }

    /// Versions prepared afterwards learn their idle times in bins
    /// `resolution` wide and, once those are predictable, follow them
    /// rather than the fixed idle time given to [`FunctionRuntime::trim`]
    /// ([`crate::keepalive`]).
    pub fn with_adaptive_keep_alive(mut self, resolution: Duration) -> Self {
        self.idle_resolution = Some(resolution);
        self
    }

    /// Keeps function output in `sink` too (versions prepared afterwards).
    pub fn with_log_sink(mut self, sink: Arc<dyn nimbus_telemetry::logs::LogSink>) -> Self {
        self.log_sink = Some(sink);
        self
    }

    /// Identifies the engine's code generation; part of every artifact name.
    pub fn fingerprint(&self) -> &str {
        &self.core.fingerprint
    }

    /// Counters of the compile/load path.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            compiled: self.core.compiled.load(Ordering::Relaxed),
            optimized: self.core.optimized.load(Ordering::Relaxed),
            loaded_from_cache: self.core.loaded_from_disk.load(Ordering::Relaxed),
        }
    }

    /// Validates an uploaded component, compiles it and stores both the
    /// component and its compiled artifact. A component already compiled by
    /// this engine is not compiled again. A new component is compiled by the
    /// baseline tier, which serves at once, and by the optimising tier in
    /// the background, whose code replaces the baseline's when it is done.
    /// CPU-heavy: call it off the async executor (e.g. in `spawn_blocking`).
    pub fn compile(&self, bytes: &[u8]) -> Result<ComponentDigest, EngineError> {
        validate::check_header(bytes)?;
        let digest = ComponentDigest::of(bytes);
        let core = &self.core;
        if core.cached(&digest).is_some() {
            return Ok(digest);
        }
        if core.has_compiled(&digest) && Core::pre(core, &digest).is_ok() {
            return Ok(digest);
        }
        Core::compile_tiered(core, &digest, bytes)?;
        Ok(digest)
    }

    /// Builds the handle that serves `spec`, with its code loaded now or on
    /// its first request.
    pub fn prepare(&self, spec: FunctionSpec, load: Load) -> Result<FunctionRuntime, EngineError> {
        let core = &self.core;
        // Without a compiled artifact (an engine upgrade) the component is
        // recompiled now rather than on some caller's request.
        let pre = match load {
            Load::OnFirstRequest
                if core.cached(&spec.digest).is_some() || core.has_compiled(&spec.digest) =>
            {
                None
            }
            _ => Some(Core::pre(core, &spec.digest)?),
        };
        let reuse = spec.reuse.max(1);
        Ok(FunctionRuntime {
            inner: Arc::new(FunctionInner {
                core: self.core.clone(),
                log_sink: self.log_sink.clone(),
                name: spec.name.as_str().into(),
                pre: RwLock::new(pre),
                loading: tokio::sync::Mutex::new(()),
                cold: AtomicBool::new(true),
                last_used_ms: AtomicU64::new(self.core.now_ms()),
                loaded_ahead_of: AtomicU64::new(u64::MAX),
                unloads_after_call: AtomicBool::new(false),
                idle_times: self
                    .idle_resolution
                    .map(|bin| core.idle_history(spec.name.as_str(), bin)),
                idle: Mutex::new(Vec::new()),
                running: AtomicUsize::new(0),
                warming: AtomicBool::new(false),
                retired: AtomicBool::new(false),
                warm_retry_ms: AtomicU64::new(0),
                reuse,
                policy: Arc::new(spec.outbound.clone()),
                spec,
            }),
        })
    }

    /// What each deployed function has learnt of its idle times, by name
    /// (functions that learnt nothing yet are left out).
    pub fn idle_snapshots(&self) -> Vec<(String, keepalive::IdleSnapshot)> {
        let Ok(map) = self.core.idle_histories.lock() else {
            return Vec::new();
        };
        map.iter()
            .filter_map(|(name, history)| Some((name.to_string(), history.upgrade()?.snapshot()?)))
            .collect()
    }

    /// Gives the deployed function `name` back what an earlier run of the
    /// node learnt of its idle times. Returns whether it was taken: not
    /// when no version of `name` is deployed, the engine does not learn
    /// idle times, or they were learnt at another resolution.
    pub fn restore_idle_snapshot(&self, name: &str, snapshot: &keepalive::IdleSnapshot) -> bool {
        let Ok(map) = self.core.idle_histories.lock() else {
            return false;
        };
        map.get(name)
            .and_then(std::sync::Weak::upgrade)
            .is_some_and(|history| history.restore(snapshot))
    }

    /// Forgets loaded code that no version in `keep` uses; versions that
    /// still hold it keep it until they are unloaded.
    pub fn retain_components(&self, keep: &[ComponentDigest]) {
        if let Ok(mut map) = self.core.loaded.lock() {
            map.retain(|digest, _| keep.contains(digest));
        }
    }

    /// Whether a component with this digest was uploaded and compiled.
    pub fn has_component(&self, digest: &ComponentDigest) -> bool {
        let core = &self.core;
        core.cached(digest).is_some()
            || (core.artifacts.component_path(digest).exists() && core.has_compiled(digest))
    }
}

impl Core {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether either tier's artifact of `digest` is on disk.
    fn has_compiled(&self, digest: &ComponentDigest) -> bool {
        self.artifacts
            .compiled_path(digest, &self.fingerprint)
            .exists()
            || self
                .artifacts
                .compiled_path(digest, &self.baseline_fingerprint)
                .exists()
    }

    /// The idle times of the function `name`: those its live versions
    /// share, else new ones.
    fn idle_history(&self, name: &str, resolution: Duration) -> Arc<IdleHistory> {
        let new = || Arc::new(IdleHistory::new(resolution.as_millis() as u64));
        let Ok(mut map) = self.idle_histories.lock() else {
            return new();
        };
        if let Some(history) = map.get(name).and_then(std::sync::Weak::upgrade) {
            return history;
        }
        // Removed functions leave dead entries; drop them as new ones come.
        map.retain(|_, history| history.strong_count() > 0);
        let history = new();
        map.insert(name.into(), Arc::downgrade(&history));
        history
    }

    fn cached(&self, digest: &ComponentDigest) -> Option<Linked> {
        self.loaded.lock().ok()?.get(digest).cloned()
    }

    /// Compiles a component with the baseline tier, stores it, links it,
    /// and starts the optimising compile (which stores the baseline
    /// artifact first).
    fn compile_tiered(
        core: &Arc<Self>,
        digest: &ComponentDigest,
        bytes: &[u8],
    ) -> Result<Linked, EngineError> {
        let started = Instant::now();
        let component = Component::new(&core.baseline, bytes)
            .map_err(|e| ComponentError::Invalid(format!("{e:#}")))?;
        validate::check_interfaces(&core.baseline, &core.baseline_linker, &component)?;
        core.artifacts
            .put_component(digest, bytes)
            .map_err(EngineError::io("storing the component"))?;
        core.compiled.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            digest = %digest,
            component_bytes = bytes.len(),
            compile_ms = started.elapsed().as_millis() as u64,
            "compiled component (baseline)"
        );
        let linked = core.link(digest, &component, false)?;
        Self::optimize_in_background(core, digest, bytes.to_vec(), Some(component));
        Ok(linked)
    }

    /// Compiles a component with the optimising tier on a thread of its
    /// own, stores the artifact and puts its code in place of the
    /// baseline's, unless that compile is already running. A `baseline`
    /// component just compiled has its artifact stored there first (off
    /// the deploy's path: it only spares a restart a compile), so a restart
    /// before the optimising compile is done maps code instead of
    /// compiling.
    fn optimize_in_background(
        core: &Arc<Self>,
        digest: &ComponentDigest,
        bytes: Vec<u8>,
        baseline: Option<Component>,
    ) {
        let fresh = core
            .optimizing
            .lock()
            .map(|mut running| running.insert(digest.clone()))
            .unwrap_or(false);
        if !fresh {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("nimbus-optimize".into())
            .spawn({
                let core = core.clone();
                let digest = digest.clone();
                move || {
                    if let Some(component) = baseline
                        && let Err(e) = core.store_baseline(&digest, &component)
                    {
                        tracing::warn!(digest = %digest, error = %e, "cannot store the baseline artifact; a restart compiles the component again");
                    }
                    if let Err(e) = core.optimize(&digest, &bytes) {
                        tracing::warn!(digest = %digest, error = %e, "optimising compile failed; the baseline code keeps serving");
                    }
                    if let Ok(mut running) = core.optimizing.lock() {
                        running.remove(&digest);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(digest = %digest, error = %e, "cannot start the optimising compile; the baseline code keeps serving");
            if let Ok(mut running) = core.optimizing.lock() {
                running.remove(digest);
            }
        }
    }

    fn store_baseline(
        &self,
        digest: &ComponentDigest,
        component: &Component,
    ) -> Result<(), EngineError> {
        let serialized = component.serialize().map_err(EngineError::wasmtime)?;
        self.artifacts
            .put_compiled(digest, &self.baseline_fingerprint, &serialized)
            .map(drop)
            .map_err(EngineError::io("storing the compiled artifact"))
    }

    fn optimize(&self, digest: &ComponentDigest, bytes: &[u8]) -> Result<(), EngineError> {
        let started = Instant::now();
        let snapshot = preinit::exports_initializer(bytes)
            .then(|| self.preinitialize(digest, bytes))
            .flatten();
        let compiled = snapshot
            .as_deref()
            .map(|code| Component::new(&self.inner, code));
        let component = match compiled {
            Some(Ok(component)) => component,
            failed => {
                if let Some(Err(e)) = failed {
                    tracing::warn!(digest = %digest, error = %format!("{e:#}"), "the pre-initialised component does not compile; it serves as uploaded");
                }
                Component::new(&self.inner, bytes)
                    .map_err(|e| ComponentError::Invalid(format!("{e:#}")))?
            }
        };
        let serialized = component.serialize().map_err(EngineError::wasmtime)?;
        self.artifacts
            .put_compiled(digest, &self.fingerprint, &serialized)
            .map_err(EngineError::io("storing the compiled artifact"))?;
        self.optimized.fetch_add(1, Ordering::Relaxed);
        // Only code someone uses is kept in memory; otherwise the artifact
        // waits on disk for the next load.
        let in_use = self
            .loaded
            .lock()
            .map(|l| l.contains_key(digest))
            .unwrap_or(false);
        if in_use {
            self.link(digest, &component, true)?;
        }
        tracing::info!(
            digest = %digest,
            component_bytes = bytes.len(),
            compile_ms = started.elapsed().as_millis() as u64,
            "optimised component"
        );
        Ok(())
    }

    /// Runs the component's initialisation function once, with the
    /// baseline tier, and returns the component rewritten to start from the
    /// state it left; `None` (with a warning saying why) if that cannot be
    /// done, and the component then serves as uploaded. The run sees no
    /// environment, files or network, and its output is discarded: it
    /// belongs to the component, which any number of functions may share.
    fn preinitialize(&self, digest: &ComponentDigest, bytes: &[u8]) -> Option<Vec<u8>> {
        let started = Instant::now();
        let _ticking = self.ticker.ticking();
        let host = Host::new(
            WasiCtx::builder().build(),
            Hooks {
                policy: Arc::new(OutboundPolicy::default()),
                function: format!("component {digest}").into(),
                trace: None,
            },
            PREINIT_MEMORY_BYTES,
            Arc::new(AtomicU64::new(0)),
            started + PREINIT_TIMEOUT,
        );
        let mut store = Store::new(&self.baseline, host);
        store.limiter(|host| &mut host.limiter);
        store.set_epoch_deadline(
            (PREINIT_TIMEOUT.as_millis() / EPOCH_TICK.as_millis().max(1)) as u64,
        );
        // The snapshot is taken by a library working on user input: should
        // it panic, the component still gets its optimised code.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            preinit::preinitialize(&self.baseline_linker, store, bytes, PREINIT_TIMEOUT)
        }))
        .unwrap_or_else(|_| {
            Err(preinit::PreinitError::Unsupported(
                "the snapshot failed unexpectedly".into(),
            ))
        });
        match run {
            Ok(snapshot) => {
                tracing::info!(
                    digest = %digest,
                    component_bytes = bytes.len(),
                    snapshot_bytes = snapshot.len(),
                    init_ms = started.elapsed().as_millis() as u64,
                    "pre-initialised component"
                );
                Some(snapshot)
            }
            Err(e) => {
                tracing::warn!(digest = %digest, error = %e, "cannot pre-initialise the component; it serves as uploaded");
                None
            }
        }
    }

    /// Links a component against the host's imports, once per component
    /// and tier.
    fn link(
        &self,
        digest: &ComponentDigest,
        component: &Component,
        optimized: bool,
    ) -> Result<Linked, EngineError> {
        let linker = if optimized {
            &self.linker
        } else {
            &self.baseline_linker
        };
        let pre = linker
            .instantiate_pre(component)
            .map_err(|e| ComponentError::Link(format!("{e:#}")))?;
        let pre = ProxyPre::new(pre).map_err(|e| ComponentError::Link(format!("{e:#}")))?;
        let linked = Linked { pre, optimized };
        if let Ok(mut map) = self.loaded.lock() {
            map.insert(digest.clone(), linked.clone());
        }
        Ok(linked)
    }

    /// Maps a compiled artifact of one tier, if it is there and usable.
    fn map_artifact(&self, digest: &ComponentDigest, optimized: bool) -> Option<Component> {
        let (engine, fingerprint) = if optimized {
            (&self.inner, &self.fingerprint)
        } else {
            (&self.baseline, &self.baseline_fingerprint)
        };
        // Opened without a separate existence check: a missing artifact is
        // told apart only once the load failed, off the usual path.
        let path = self.artifacts.compiled_path(digest, fingerprint);
        #[allow(unsafe_code)]
        // SAFETY: the file was produced by `Component::serialize` of an
        // engine with this fingerprint, written to a temporary name and
        // renamed into place after an fsync, and nothing else writes to the
        // artifact directory; wasmtime additionally checks its header and
        // compatibility hash before using it.
        let loaded = unsafe { Component::deserialize_file(engine, &path) };
        match loaded {
            Ok(component) => {
                self.loaded_from_disk.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(digest = %digest, optimized, "loaded compiled artifact from cache");
                Some(component)
            }
            Err(_) if !path.exists() => None,
            Err(e) => {
                tracing::warn!(
                    digest = %digest,
                    optimized,
                    error = %format!("{e:#}"),
                    "compiled artifact unusable"
                );
                None
            }
        }
    }

    /// The linked code of a component: from memory, else mapped from its
    /// optimised artifact on disk, else from its baseline artifact (and
    /// the optimising compile started again), else compiled from the
    /// stored component (after an engine upgrade, or if the artifacts are
    /// unusable).
    fn pre(core: &Arc<Self>, digest: &ComponentDigest) -> Result<Linked, EngineError> {
        if let Some(linked) = core.cached(digest) {
            return Ok(linked);
        }
        if let Some(component) = core.map_artifact(digest, true) {
            return core.link(digest, &component, true);
        }
        let bytes = core
            .artifacts
            .read_component(digest)
            .map_err(EngineError::io(format!("reading component {digest}")))?;
        if ComponentDigest::of(&bytes) != *digest {
            return Err(EngineError::Io {
                context: format!("component {digest}"),
                source: std::io::Error::other("stored component does not match its digest"),
            });
        }
        if let Some(component) = core.map_artifact(digest, false) {
            let linked = core.link(digest, &component, false)?;
            Self::optimize_in_background(core, digest, bytes, None);
            return Ok(linked);
        }
        Self::compile_tiered(core, digest, &bytes)
    }
}

/// One deployed version of a function, ready to serve.
#[derive(Clone)]
pub struct FunctionRuntime {
    inner: Arc<FunctionInner>,
}

struct FunctionInner {
    core: Arc<Core>,
    log_sink: Option<Arc<dyn nimbus_telemetry::logs::LogSink>>,
    name: Arc<str>,
    /// The version's linked code; `None` until its first request, and again
    /// once it has been unloaded for idleness.
    pre: RwLock<Option<Linked>>,
    /// Held while the code loads, so concurrent first requests load it once.
    loading: tokio::sync::Mutex<()>,
    /// Whether the next invocation is the first since the code was loaded.
    cold: AtomicBool,
    /// When an invocation last started, on the core's clock (when the
    /// version was prepared, before its first).
    last_used_ms: AtomicU64,
    /// The `last_used_ms` after which the code was last loaded ahead of a
    /// request.
    loaded_ahead_of: AtomicU64,
    /// Whether the window the last sweep applied unloads the code right
    /// after each call (read on the request path instead of the
    /// histogram, which takes a lock).
    unloads_after_call: AtomicBool,
    /// The times between the starts of consecutive invocations of the
    /// function (shared with its other versions), when the engine learns
    /// them.
    idle_times: Option<Arc<IdleHistory>>,
    /// Instances waiting for their next request: reusable ones (reuse > 1)
    /// and prepared ones.
    idle: Mutex<Vec<Idle>>,
    /// Invocations from their start until their response body is done.
    running: AtomicUsize,
    /// Set while a task tops the idle instances up to `prewarm`.
    warming: AtomicBool,
    /// Set once a newer version (or none) serves the function: requests
    /// still finishing on this one keep no instance for later.
    retired: AtomicBool,
    /// When warming may next load the code, on the core's clock, after it
    /// failed to: a sweep then neither retries nor logs the error again
    /// before [`PREWARM_RETRY_AFTER`].
    warm_retry_ms: AtomicU64,
    reuse: u32,
    policy: Arc<OutboundPolicy>,
    spec: FunctionSpec,
}

/// An instance kept for its next request, with what that request resets:
/// one that served requests already (`reuse`), or one prepared ahead of
/// its first.
struct Idle {
    store: Store<Host>,
    proxy: Proxy,
    stdout: FunctionOutput,
    stderr: FunctionOutput,
    /// Requests it has served.
    served: u32,
    /// Its linear memory after the last request.
    memory: u64,
    since_ms: u64,
    /// Whether it runs the optimising tier's code.
    optimized: bool,
    /// Held while the instance was prepared and has not served yet.
    prepared: Option<PreparedTicket>,
}

/// Counts an invocation in [`FunctionInner::running`] while it lives.
struct Running(Arc<FunctionInner>);

impl Running {
    fn start(f: &Arc<FunctionInner>) -> Self {
        f.running.fetch_add(1, Ordering::Relaxed);
        Self(f.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its invocation counted as running until it
/// is done.
struct Counted<B> {
    body: B,
    _running: Running,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Which of the node's budgets a prepared instance counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Budget {
    /// Made after a request that ran alone, for the function's next one,
    /// and at start for the functions mapped then:
    /// [`MAX_PREPARED_INSTANCES`], and only while the pool is less than
    /// half in use.
    Ahead,
    /// Kept for a function with `prewarm`: [`MAX_PREWARMED_INSTANCES`],
    /// which the node's deploys never promise past.
    Prewarm,
}

impl Budget {
    /// The node's count of instances held against this budget.
    fn count(self, core: &Core) -> &AtomicUsize {
        match self {
            Self::Ahead => &core.prepared,
            Self::Prewarm => &core.prewarmed,
        }
    }
}

/// Counts a prepared instance against its budget until it serves its first
/// request or is dropped.
struct PreparedTicket {
    core: Arc<Core>,
    budget: Budget,
}

impl PreparedTicket {
    /// A ticket, unless the budget is spent (or, for instances prepared
    /// ahead, the pool is more than half in use).
    fn take(core: &Arc<Core>, budget: Budget) -> Option<Self> {
        let max = match budget {
            Budget::Ahead => {
                let live = core.pool.as_ref().map_or(0, |p| p.component_instances());
                if live >= PREPARE_BELOW_LIVE_INSTANCES {
                    return None;
                }
                MAX_PREPARED_INSTANCES
            }
            Budget::Prewarm => MAX_PREWARMED_INSTANCES as usize,
        };
        let before = budget.count(core).fetch_add(1, Ordering::Relaxed);
        let ticket = Self {
            core: core.clone(),
            budget,
        };
        (before < max).then_some(ticket)
    }
}

impl Drop for PreparedTicket {
    fn drop(&mut self) {
        self.budget
            .count(&self.core)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response head from the function, with its body still streaming.
pub struct InvokeOutcome {
    pub response: http::Response<ResponseBody>,
    /// Time spent getting the instance: creating it, or taking a waiting
    /// one.
    pub instantiate: Duration,
    /// Where the instance came from.
    pub instance: InstanceOrigin,
    /// Largest linear memory of the instance in bytes; final once the body
    /// has been read.
    pub peak_memory: Arc<AtomicU64>,
}

/// Where the instance that ran an invocation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceOrigin {
    /// Created for the invocation, on its path.
    New,
    /// Created ahead of the invocation, after an earlier one; it had served
    /// no request before.
    Prepared,
    /// Kept from earlier invocations (`reuse`).
    Reused,
}

impl InstanceOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Prepared => "prepared",
            Self::Reused => "reused",
        }
    }
}

/// What [`FunctionRuntime::trim`] released.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// Idle reusable instances dropped.
    pub instances: usize,
    /// Whether the version's code was unloaded.
    pub unloaded: bool,
    /// Whether the version's next request is expected soon and its code is
    /// not loaded: [`FunctionRuntime::load_ahead`] loads it.
    pub load_ahead: bool,
}

impl FunctionRuntime {
    /// The spec this runtime was built from.
    pub fn spec(&self) -> &FunctionSpec {
        &self.inner.spec
    }

    /// The function's name, shared (no copy per invocation).
    pub fn name(&self) -> &Arc<str> {
        &self.inner.name
    }

    /// Whether the invocation about to start is a cold start: the first
    /// since the version's code was loaded. Each load is claimed once.
    pub fn claim_cold(&self) -> bool {
        self.inner.cold.swap(false, Ordering::Relaxed)
    }

    /// Whether the version's code is in memory.
    pub fn is_loaded(&self) -> bool {
        self.inner.pre.read().map(|p| p.is_some()).unwrap_or(false)
    }

    /// Instances waiting for a request: reusable ones and prepared ones.
    pub fn idle_instances(&self) -> usize {
        self.inner.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    /// Stops the version keeping instances once another version (or none)
    /// serves the function: the ones waiting are dropped at once, giving
    /// back the budget they held (`prewarm` promised to the new version
    /// included), and the requests still finishing here keep none for
    /// later nor prepare any.
    pub fn retire(&self) {
        let f = &self.inner;
        f.retired.store(true, Ordering::Release);
        if let Ok(mut idle) = f.idle.lock() {
            idle.clear();
        }
    }

    /// Releases what idleness no longer justifies: idle instances unused
    /// for [`IDLE_INSTANCE_KEEP`], and the version's code once no invocation
    /// has started for `unload_after` (the compiled artifact stays on disk
    /// and the next request maps it again), or as its learnt idle times
    /// say when they are predictable. `None` never unloads. A version with
    /// `prewarm` keeps its code and that many idle instances.
    pub fn trim(&self, unload_after: Option<Duration>) -> Trimmed {
        let f = &self.inner;
        let now = f.core.now_ms();
        let mut trimmed = Trimmed::default();
        if let Ok(mut idle) = f.idle.lock() {
            let keep_ms = IDLE_INSTANCE_KEEP.as_millis() as u64;
            // Oldest first: instances join at the end.
            let stale = idle
                .iter()
                .take_while(|i| now.saturating_sub(i.since_ms) >= keep_ms)
                .count()
                .min(idle.len().saturating_sub(self.prewarm()));
            idle.drain(..stale);
            trimmed.instances = stale;
        }
        if f.spec.prewarm > 0 {
            return trimmed;
        }
        let fixed_ms = unload_after.map(|after| after.as_millis() as u64);
        let window = match fixed_ms {
            Some(_) => self.keep_alive_window(),
            None => None,
        };
        // A learnt window counts from the function's last call, which may
        // have been to the version this one replaced; the fixed time from
        // this version's last call (or its deploy).
        let last_used = match (window, &f.idle_times) {
            (Some(_), Some(history)) => history.last_call_ms(),
            _ => None,
        }
        .unwrap_or_else(|| f.last_used_ms.load(Ordering::Relaxed));
        let idle_ms = now.saturating_sub(last_used);
        f.unloads_after_call
            .store(window.is_some_and(|w| w.load_at_ms > 0), Ordering::Relaxed);
        match keepalive::verdict(window, idle_ms, fixed_ms) {
            Verdict::Keep => {}
            // Once per idle time: a load that failed is not retried
            // before the next request.
            Verdict::Load => {
                trimmed.load_ahead = !self.is_loaded()
                    && f.loaded_ahead_of.swap(last_used, Ordering::Relaxed) != last_used;
            }
            // Code an invocation still runs is in use, however long ago it
            // started.
            Verdict::Unload if f.running.load(Ordering::Relaxed) > 0 => {}
            Verdict::Unload => {
                if let Ok(mut pre) = f.pre.write()
                    && pre.is_some()
                {
                    *pre = None;
                    f.cold.store(true, Ordering::Relaxed);
                    if let Ok(mut idle) = f.idle.lock() {
                        trimmed.instances += idle.len();
                        idle.clear();
                    }
                    trimmed.unloaded = true;
                }
            }
        }
        trimmed
    }

    /// When the version's code is expected to be needed, learnt from the
    /// function's idle times (`None`: not learnt, or not predictable yet; the fixed
    /// idle time applies).
    pub fn keep_alive_window(&self) -> Option<keepalive::Window> {
        self.inner.idle_times.as_ref()?.window()
    }

    /// Loads the version's code ahead of a request (one its idle times
    /// predict, or the first after a restart), with an instance ready for
    /// it; that request is then no cold start.
    pub async fn load_ahead(&self) {
        if self.inner.retired.load(Ordering::Acquire) || self.code().await.is_err() {
            // `code` logged why; the request will try again on its path.
            return;
        }
        self.prepare(Budget::Ahead).await;
        self.inner.cold.store(false, Ordering::Relaxed);
    }

    /// Instances this version keeps ready: `prewarm`, within its
    /// concurrency.
    fn prewarm(&self) -> usize {
        let spec = &self.inner.spec;
        spec.prewarm.min(spec.max_idle_instances) as usize
    }

    /// Whether the version keeps fewer idle instances than `prewarm` asks.
    pub fn needs_warming(&self) -> bool {
        let want = self.prewarm();
        want > 0 && self.idle_instances() < want
    }

    /// Loads the code of a version with `prewarm` and instantiates
    /// instances until that many wait for requests. Instances are made only
    /// of optimised code (a new component serves from baseline code until
    /// its optimising compile is done, then the next call fills up), and
    /// within the node's [`MAX_PREWARMED_INSTANCES`]. One call at a time per
    /// version does the work; others return at once. Code that cannot be
    /// loaded is tried again after [`PREWARM_RETRY_AFTER`].
    pub async fn warm(&self) {
        let f = &self.inner;
        if self.prewarm() == 0
            || f.retired.load(Ordering::Acquire)
            || f.warming.swap(true, Ordering::AcqRel)
        {
            return;
        }
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _done = Done(&f.warming);
        if f.core.now_ms() < f.warm_retry_ms.load(Ordering::Relaxed) {
            return;
        }
        if self.code().await.is_err() {
            // `code` logged why; requests still try on their own path.
            let retry = f.core.now_ms() + PREWARM_RETRY_AFTER.as_millis() as u64;
            f.warm_retry_ms.store(retry, Ordering::Relaxed);
            return;
        }
        while self.needs_warming() {
            if !self.prepare(Budget::Prewarm).await {
                break;
            }
        }
        if self.idle_instances() > 0 {
            // Code and an instance ready ahead of the next request: it
            // starts warm.
            f.cold.store(false, Ordering::Relaxed);
        }
    }

    /// The version's linked code, loaded first if it is not in memory; the
    /// optimised tier's as soon as it is ready.
    async fn code(&self) -> Result<Linked, InvokeError> {
        let f = &self.inner;
        let current = f.pre.read().ok().and_then(|p| p.clone());
        match current {
            Some(linked) if linked.optimized => return Ok(linked),
            Some(linked) => {
                // Baseline code: take the optimised code once it is there.
                return Ok(match f.core.cached(&f.spec.digest) {
                    Some(better) if better.optimized => {
                        if let Ok(mut slot) = f.pre.write() {
                            *slot = Some(better.clone());
                        }
                        // Instances of the baseline tier are not reused.
                        if let Ok(mut idle) = f.idle.lock() {
                            idle.clear();
                        }
                        better
                    }
                    _ => linked,
                });
            }
            None => {}
        }
        let _loading = f.loading.lock().await;
        if let Ok(pre) = f.pre.read()
            && let Some(linked) = pre.as_ref()
        {
            return Ok(linked.clone());
        }
        let started = Instant::now();
        let linked = Core::pre(&f.core, &f.spec.digest).map_err(|e| {
            tracing::error!(function = &*f.name, version = f.spec.version, error = %e, "cannot load the function's code");
            InvokeError::Unavailable(e.to_string())
        })?;
        if let Ok(mut slot) = f.pre.write() {
            *slot = Some(linked.clone());
        }
        tracing::debug!(
            function = &*f.name,
            version = f.spec.version,
            load_us = started.elapsed().as_micros() as u64,
            "loaded the function's code"
        );
        Ok(linked)
    }

    /// A new instance of `linked` whose output is tagged `tag`.
    async fn instantiate(
        &self,
        linked: &Linked,
        tag: OutputTag,
        trace: Option<nimbus_telemetry::trace::TraceContext>,
        peak_memory: Arc<AtomicU64>,
        deadline: Instant,
    ) -> Result<(Store<Host>, Proxy, FunctionOutput, FunctionOutput), InvokeError> {
        let f = &self.inner;
        let stdout = FunctionOutput::new(tag.clone(), "stdout");
        let stderr = FunctionOutput::new(tag, "stderr");
        let mut wasi = WasiCtx::builder();
        wasi.envs(&f.spec.env)
            .stdout(stdout.clone())
            .stderr(stderr.clone());
        let host = Host::new(
            wasi.build(),
            Hooks {
                policy: f.policy.clone(),
                function: f.name.clone(),
                trace,
            },
            f.spec.limits.memory_bytes,
            peak_memory,
            deadline,
        );
        let mut store = Store::new(linked.pre.engine(), host);
        store.limiter(|host| &mut host.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        // Start functions are guest code: epochs advance while they run.
        let ticking = f.core.ticker.ticking();
        let instantiated =
            tokio::time::timeout_at(deadline.into(), linked.pre.instantiate_async(&mut store))
                .await;
        drop(ticking);
        match instantiated {
            Ok(Ok(proxy)) => Ok((store, proxy, stdout, stderr)),
            Ok(Err(e)) => Err(classify(e, &store, &f.spec.limits, true)),
            Err(_) => Err(InvokeError::Timeout(f.spec.limits.timeout)),
        }
    }

    /// Puts `instance` in the pool for a next request while the version's
    /// code is loaded and the pool has room; else gives it back.
    fn keep(&self, instance: Idle) -> Option<Idle> {
        let f = &self.inner;
        // An unloaded or retired version holds no instances.
        if self.is_loaded()
            && !f.retired.load(Ordering::Acquire)
            && let Ok(mut pool) = f.idle.lock()
            && pool.len() < f.spec.max_idle_instances as usize
        {
            pool.push(instance);
            return None;
        }
        Some(instance)
    }

    /// Instantiates the version's optimised code ahead of its next request,
    /// when the code is loaded and `budget` has room for one more prepared
    /// instance; returns whether it did. Called after an HTTP request that
    /// ran alone and for the functions a start maps ([`Budget::Ahead`]), so
    /// only functions in use hold prepared instances; like reusable ones
    /// they are dropped after [`IDLE_INSTANCE_KEEP`] unused. A version kept
    /// warm calls it for `prewarm` ([`Budget::Prewarm`]) and keeps those.
    async fn prepare(&self, budget: Budget) -> bool {
        let f = &self.inner;
        if f.retired.load(Ordering::Acquire) {
            return false;
        }
        let Some(linked) = f.pre.read().ok().and_then(|p| p.clone()) else {
            return false;
        };
        let room = f
            .idle
            .lock()
            .is_ok_and(|pool| pool.len() < f.spec.max_idle_instances as usize);
        if !linked.optimized || !room {
            return false;
        }
        let Some(ticket) = PreparedTicket::take(&f.core, budget) else {
            return false;
        };
        // Replaced by the invocation's own tag when it starts.
        let tag = OutputTag {
            sink: f.log_sink.clone(),
            redactor: f.spec.secrets.clone(),
            trace: None,
            trigger: "http",
            function: f.name.clone(),
            version: f.spec.version,
            invocation: Arc::from(""),
        };
        let peak = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + f.spec.limits.timeout;
        match self
            .instantiate(&linked, tag, None, peak.clone(), deadline)
            .await
        {
            Ok((store, proxy, stdout, stderr)) => self
                .keep(Idle {
                    store,
                    proxy,
                    stdout,
                    stderr,
                    served: 0,
                    memory: peak.load(Ordering::Relaxed),
                    since_ms: f.core.now_ms(),
                    optimized: true,
                    prepared: Some(ticket),
                })
                .is_none(),
            Err(e) => {
                tracing::debug!(
                    function = &*f.name,
                    version = f.spec.version,
                    error = %e,
                    "cannot prepare an instance"
                );
                false
            }
        }
    }

    /// Runs `request` in a fresh instance (one prepared ahead when one is
    /// waiting), or in an idle one when the function reuses instances. `trace` is the invocation's context (the
    /// one its `traceparent` header carries), continued by its output lines
    /// and outbound requests. Returns once the function has set its
    /// response head; the body streams afterwards, under the same deadline.
    pub async fn invoke<B>(
        &self,
        request: hyper::Request<B>,
        invocation_id: Arc<str>,
        trigger: &'static str,
        trace: Option<nimbus_telemetry::trace::TraceContext>,
    ) -> Result<InvokeOutcome, InvokeError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<HttpError>,
    {
        let started = Instant::now();
        let running = Running::start(&self.inner);
        let f = &self.inner;
        let now = f.core.now_ms();
        f.last_used_ms.store(now, Ordering::Relaxed);
        if let Some(history) = &f.idle_times {
            history.called(now);
        }
        let timeout = f.spec.limits.timeout;
        let deadline = started + timeout;
        // Output never shows the function's secrets nor the credentials
        // this request carried.
        let redactor = f.spec.secrets.with_credentials(
            request
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
        );
        let tag = OutputTag {
            redactor,
            trace,
            trigger,
            sink: f.log_sink.clone(),
            function: f.name.clone(),
            version: f.spec.version,
            invocation: invocation_id,
        };
        let invocation = tag.invocation.clone();
        let waiting = f
            .idle
            .lock()
            .ok()
            .and_then(|mut idle| idle.pop())
            // An instance of baseline code is dropped once optimised code
            // is there: the fresh instance below runs that.
            .filter(|i| i.optimized || !f.core.cached(&f.spec.digest).is_some_and(|l| l.optimized));
        let (mut store, proxy, stdout, stderr, served, peak_memory, optimized, origin) =
            match waiting {
                Some(mut i) => {
                    let origin = if i.prepared.take().is_some() {
                        InstanceOrigin::Prepared
                    } else {
                        InstanceOrigin::Reused
                    };
                    let peak_memory = Arc::new(AtomicU64::new(i.memory));
                    let host = i.store.data_mut();
                    host.hooks.trace = trace;
                    host.limiter.denied = false;
                    host.limiter.peak = peak_memory.clone();
                    host.deadline = deadline;
                    i.stdout.begin(tag.clone());
                    i.stderr.begin(tag);
                    i.store.set_epoch_deadline(1);
                    (
                        i.store,
                        i.proxy,
                        i.stdout,
                        i.stderr,
                        i.served,
                        peak_memory,
                        i.optimized,
                        origin,
                    )
                }
                None => {
                    let linked = self.code().await?;
                    let peak_memory = Arc::new(AtomicU64::new(0));
                    let (store, proxy, stdout, stderr) = self
                        .instantiate(&linked, tag, trace, peak_memory.clone(), deadline)
                        .await?;
                    (
                        store,
                        proxy,
                        stdout,
                        stderr,
                        0,
                        peak_memory,
                        linked.optimized,
                        InstanceOrigin::New,
                    )
                }
            };
        let instantiate = started.elapsed();

        let (sender, mut receiver) = tokio::sync::oneshot::channel();
        let mut http = store.data_mut().http();
        let req = http
            .new_incoming_request(Scheme::Http, request)
            .map_err(|e| InvokeError::BadRequest(format!("{e:#}")))?;
        let out = http
            .new_response_outparam(sender)
            .map_err(|e| InvokeError::BadRequest(format!("{e:#}")))?;
        let this = self.clone();
        let peak = peak_memory.clone();
        let mut call = Box::pin(async move {
            let f = &*this.inner;
            // The epochs advance while the guest can run.
            let ticking = f.core.ticker.ticking();
            let limits = f.spec.limits;
            let call = proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, req, out);
            let result = match tokio::time::timeout_at(deadline.into(), call).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(classify(e, &store, &limits, false)),
                Err(_) => Err(InvokeError::Timeout(limits.timeout)),
            };
            drop(ticking);
            stdout.flush_pending();
            stderr.flush_pending();
            if let Err(e) = &result {
                // Also after the response head was sent (a failure while
                // streaming), so the reason is always tied to the
                // invocation. A failed instance is never reused.
                tracing::warn!(
                    invocation_id = &*invocation,
                    function = &*f.name,
                    version = f.spec.version,
                    trigger,
                    trace_id = trace.map(|t| t.trace_id_hex()),
                    span_id = trace.map(|t| t.span_id_hex()),
                    error = %e,
                    "guest failed"
                );
            }
            let instance = Idle {
                store,
                proxy,
                stdout,
                stderr,
                served: served + 1,
                memory: peak.load(Ordering::Relaxed),
                since_ms: f.core.now_ms(),
                optimized,
                prepared: None,
            };
            let kept = if result.is_ok() && instance.served < f.reuse {
                this.keep(instance)
            } else {
                Some(instance)
            };
            // An HTTP request running alone leaves what follows it to a task
            // of its own, which runs once this request's task has handed the
            // response over: dropping the store (which resets its memory
            // slot) and preparing a replacement for the next request. With
            // others running there is no idle time to hide that work in, and
            // queued work and event sources (whose deliveries follow one
            // another) measured slower with it, so there the store is
            // dropped here and nothing is prepared.
            // A version kept warm refills what this request took, off its
            // path, whatever else is running, and holds no more than its
            // `prewarm` (a refill that finished first leaves nothing to
            // prepare ahead).
            if this.needs_warming() {
                tokio::spawn(async move {
                    drop(kept);
                    this.warm().await;
                });
            } else if let Some(done) = kept {
                if trigger == "http"
                    && this.prewarm() == 0
                    && this.inner.running.load(Ordering::Relaxed) <= 1
                {
                    // A version whose learnt window unloads its code after
                    // each call would drop that instance unused.
                    let ahead = !this.inner.unloads_after_call.load(Ordering::Relaxed);
                    tokio::spawn(async move {
                        drop(done);
                        if ahead {
                            this.prepare(Budget::Ahead).await;
                        }
                    });
                } else {
                    drop(done);
                }
            }
            result
        });
        let outcome = |response: http::Response<WasiBody>| InvokeOutcome {
            peak_memory: peak_memory.clone(),
            response: response.map(|body| {
                Counted {
                    body: body.map_err(|e| std::io::Error::other(e.to_string())),
                    _running: running,
                }
                .boxed_unsync()
            }),
            instantiate,
            instance: origin,
        };
        // The guest runs on this task until it sets its response head; a
        // guest that is done by then (most are) costs no task of its own.
        // One still writing its body continues on a task, while the body
        // streams to the caller.
        tokio::select! {
            biased;
            result = &mut call => match receiver.try_recv() {
                Ok(Ok(response)) => Ok(outcome(response)),
                Ok(Err(code)) => Err(InvokeError::Guest(format!("{code:?}"))),
                Err(_) => match result {
                    Err(e) => Err(e),
                    Ok(()) => Err(InvokeError::NoResponse),
                },
            },
            head = &mut receiver => match head {
                Ok(Ok(response)) => {
                    tokio::spawn(call);
                    Ok(outcome(response))
                }
                Ok(Err(code)) => {
                    tokio::spawn(call);
                    Err(InvokeError::Guest(format!("{code:?}")))
                }
                Err(_) => match call.await {
                    Err(e) => Err(e),
                    Ok(()) => Err(InvokeError::NoResponse),
                },
            },
        }
    }
}

/// Turns a wasmtime error into the reason an invocation failed.
fn classify(
    e: wasmtime::Error,
    store: &Store<Host>,
    limits: &FunctionLimits,
    instantiating: bool,
) -> InvokeError {
    if store.data().limiter.denied {
        return InvokeError::MemoryLimit(limits.memory_bytes >> 20);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => InvokeError::Timeout(limits.timeout),
        Some(Trap::StackOverflow) => InvokeError::Trap("stack overflow".into()),
        Some(trap) => InvokeError::Trap(trap.to_string()),
        None if instantiating => {
            let text = format!("{e:#}");
            if text.contains("limit") && text.contains("reached") {
                InvokeError::Capacity(text)
            } else {
                InvokeError::Trap(text)
            }
        }
        None => InvokeError::Trap(format!("{e:#}")),
    }
}

/// Per-request state of a store.
struct Host {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: Hooks,
    limiter: Limiter,
    deadline: Instant,
}

impl Host {
    /// A store's state: `wasi` and `hooks` as given, linear memory capped
    /// at `memory_bytes` (its peak kept in `peak`), until `deadline`.
    fn new(
        wasi: WasiCtx,
        hooks: Hooks,
        memory_bytes: u64,
        peak: Arc<AtomicU64>,
        deadline: Instant,
    ) -> Self {
        Self {
            table: ResourceTable::new(),
            wasi,
            http: WasiHttpCtx::new(),
            hooks,
            limiter: Limiter {
                memory_bytes: usize::try_from(memory_bytes).unwrap_or(usize::MAX),
                denied: false,
                peak,
            },
            deadline,
        }
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Caps linear memory growth and remembers that it did, so a failure after
/// a refused growth is reported as the memory limit it is.
struct Limiter {
    memory_bytes: usize,
    denied: bool,
    /// Largest linear memory the instance had, for the invocation record.
    peak: Arc<AtomicU64>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.denied = true;
            return Ok(false);
        }
        self.peak.fetch_max(desired as u64, Ordering::Relaxed);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Outbound HTTP of one invocation, under its function's policy.
struct Hooks {
    policy: Arc<OutboundPolicy>,
    function: Arc<str>,
    /// The invocation's trace context, continued by outbound requests.
    trace: Option<nimbus_telemetry::trace::TraceContext>,
}

type SendResult = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>;

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        let policy = self.policy.clone();
        let function = self.function.clone();
        let mut request = request;
        // Outbound requests continue the invocation's trace unless the
        // function set its own context.
        if let Some(trace) = &self.trace
            && !request
                .headers()
                .contains_key(nimbus_telemetry::trace::TRACEPARENT)
            && let Ok(v) = http::HeaderValue::from_str(&trace.child().header())
        {
            request
                .headers_mut()
                .insert(nimbus_telemetry::trace::TRACEPARENT, v);
        }
        Box::new(async move {
            let dest =
                outbound::destination(request.uri()).ok_or(HttpError::HttpRequestUriInvalid)?;
            let addr = match policy.resolve(&dest).await {
                Ok(addr) => addr,
                Err(denial) => {
                    tracing::warn!(function = &*function, reason = %denial, "outbound request refused");
                    return Err(match denial {
                        Denial::Unresolved(_) => HttpError::DnsError {
                            rcode: Some("address not found".into()),
                            info_code: None,
                        },
                        Denial::NotAllowed(_) | Denial::SpecialAddress { .. } => {
                            HttpError::HttpRequestDenied
                        }
                    });
                }
            };
            outbound::send_to(addr, &dest, request).await
        })
    }
}
