//! The wasmtime engine, the compile/load path of components, and the
//! execution of one request in a fresh instance.

use crate::artifact::{ArtifactStore, ComponentDigest};
use crate::limits::*;
use crate::outbound::{self, Denial, OutboundPolicy};
use crate::output::{FunctionOutput, OutputTag};
use crate::validate::{self, ComponentError};
use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap,
    UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
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
}

/// Counters of the compile/load path, shown by `nimbus status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct EngineStats {
    /// Components compiled with Cranelift since the node started.
    pub compiled: u64,
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
}

/// The node's wasmtime engine.
pub struct Engine {
    inner: wasmtime::Engine,
    linker: Linker<Host>,
    artifacts: ArtifactStore,
    fingerprint: String,
    components: Mutex<HashMap<ComponentDigest, Component>>,
    compiled: AtomicU64,
    loaded: AtomicU64,
    ticker_stop: Arc<AtomicBool>,
    /// Where function output is kept, besides the node log.
    log_sink: Option<Arc<dyn nimbus_telemetry::logs::LogSink>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
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
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .wasm_backtrace_max_frames(None)
            .max_wasm_stack(MAX_WASM_STACK_BYTES)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let inner = wasmtime::Engine::new(&config).map_err(EngineError::wasmtime)?;

        let mut linker = Linker::<Host>::new(&inner);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(EngineError::wasmtime)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(EngineError::wasmtime)?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        inner.precompile_compatibility_hash().hash(&mut hasher);
        let fingerprint = format!("{:016x}", hasher.finish());

        let artifacts = ArtifactStore::open(artifact_root).map_err(EngineError::io(format!(
            "opening {}",
            artifact_root.display()
        )))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(inner.weak(), ticker_stop.clone())
            .map_err(EngineError::io("starting the epoch ticker"))?;

        Ok(Self {
            inner,
            linker,
            artifacts,
            fingerprint,
            components: Mutex::new(HashMap::new()),
            compiled: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            ticker_stop,
            log_sink: None,
        })
    }

    /// Keeps function output in `sink` too (versions prepared afterwards).
    pub fn with_log_sink(mut self, sink: Arc<dyn nimbus_telemetry::logs::LogSink>) -> Self {
        self.log_sink = Some(sink);
        self
    }

    /// Identifies the engine's code generation; part of every artifact name.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Counters of the compile/load path.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            compiled: self.compiled.load(Ordering::Relaxed),
            loaded_from_cache: self.loaded.load(Ordering::Relaxed),
        }
    }

    /// Validates an uploaded component, compiles it and stores both the
    /// component and its compiled artifact. A component already compiled by
    /// this engine is not compiled again. CPU-heavy: call it off the async
    /// executor (e.g. in `spawn_blocking`).
    pub fn compile(&self, bytes: &[u8]) -> Result<ComponentDigest, EngineError> {
        validate::check_header(bytes)?;
        let digest = ComponentDigest::of(bytes);
        if self.cached(&digest).is_some() {
            return Ok(digest);
        }
        let compiled_path = self.artifacts.compiled_path(&digest, &self.fingerprint);
        if compiled_path.exists() && self.load(&digest).is_ok() {
            return Ok(digest);
        }
        let component = self.compile_and_store(&digest, bytes)?;
        self.remember(&digest, component);
        Ok(digest)
    }

    fn compile_and_store(
        &self,
        digest: &ComponentDigest,
        bytes: &[u8],
    ) -> Result<Component, EngineError> {
        let started = Instant::now();
        let component = Component::new(&self.inner, bytes)
            .map_err(|e| ComponentError::Invalid(format!("{e:#}")))?;
        validate::check_interfaces(&self.inner, &self.linker, &component)?;
        let serialized = component.serialize().map_err(EngineError::wasmtime)?;
        self.artifacts
            .put_component(digest, bytes)
            .map_err(EngineError::io("storing the component"))?;
        self.artifacts
            .put_compiled(digest, &self.fingerprint, &serialized)
            .map_err(EngineError::io("storing the compiled artifact"))?;
        self.compiled.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            digest = %digest,
            component_bytes = bytes.len(),
            compile_ms = started.elapsed().as_millis() as u64,
            "compiled component"
        );
        Ok(component)
    }

    fn cached(&self, digest: &ComponentDigest) -> Option<Component> {
        self.components.lock().ok()?.get(digest).cloned()
    }

    fn remember(&self, digest: &ComponentDigest, component: Component) {
        if let Ok(mut map) = self.components.lock() {
            map.insert(digest.clone(), component);
        }
    }

    /// Loads a component for serving: from memory, else from its compiled
    /// artifact on disk, else by recompiling the stored component (after an
    /// engine upgrade, or if the artifact is unusable).
    pub fn load(&self, digest: &ComponentDigest) -> Result<Component, EngineError> {
        if let Some(component) = self.cached(digest) {
            return Ok(component);
        }
        let path = self.artifacts.compiled_path(digest, &self.fingerprint);
        if path.exists() {
            #[allow(unsafe_code)]
            // SAFETY: the file was produced by `Component::serialize` of an
            // engine with this fingerprint, written to a temporary name and
            // renamed into place after an fsync, and nothing else writes to
            // the artifact directory; wasmtime additionally checks its header
            // and compatibility hash before using it.
            let loaded = unsafe { Component::deserialize_file(&self.inner, &path) };
            match loaded {
                Ok(component) => {
                    self.loaded.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(digest = %digest, "loaded compiled artifact from cache");
                    self.remember(digest, component.clone());
                    return Ok(component);
                }
                Err(e) => tracing::warn!(
                    digest = %digest,
                    error = %format!("{e:#}"),
                    "compiled artifact unusable; recompiling from the stored component"
                ),
            }
        }
        let bytes = self
            .artifacts
            .read_component(digest)
            .map_err(EngineError::io(format!("reading component {digest}")))?;
        if ComponentDigest::of(&bytes) != *digest {
            return Err(EngineError::Io {
                context: format!("component {digest}"),
                source: std::io::Error::other("stored component does not match its digest"),
            });
        }
        let component = self.compile_and_store(digest, &bytes)?;
        self.remember(digest, component.clone());
        Ok(component)
    }

    /// Builds the pre-instantiated handle that serves `spec`.
    pub fn prepare(&self, spec: FunctionSpec) -> Result<FunctionRuntime, EngineError> {
        let component = self.load(&spec.digest)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| ComponentError::Link(format!("{e:#}")))?;
        let pre = ProxyPre::new(pre).map_err(|e| ComponentError::Link(format!("{e:#}")))?;
        Ok(FunctionRuntime {
            inner: Arc::new(FunctionInner {
                log_sink: self.log_sink.clone(),
                name: spec.name.as_str().into(),
                engine: self.inner.clone(),
                pre,
                policy: Arc::new(spec.outbound.clone()),
                spec,
            }),
        })
    }

    /// Forgets in-memory components that no live function uses.
    pub fn retain_components(&self, keep: &[ComponentDigest]) {
        if let Ok(mut map) = self.components.lock() {
            map.retain(|digest, _| keep.contains(digest));
        }
    }
}

/// Increments the engine's epoch every [`EPOCH_TICK`] on a dedicated thread
/// until `stop` is set or the engine is dropped.
fn spawn_epoch_ticker(engine: wasmtime::EngineWeak, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("nimbus-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                match engine.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .map(drop)
}

/// One deployed version of a function, ready to serve.
#[derive(Clone)]
pub struct FunctionRuntime {
    inner: Arc<FunctionInner>,
}

struct FunctionInner {
    log_sink: Option<Arc<dyn nimbus_telemetry::logs::LogSink>>,
    name: Arc<str>,
    engine: wasmtime::Engine,
    pre: ProxyPre<Host>,
    policy: Arc<OutboundPolicy>,
    spec: FunctionSpec,
}

/// A response head from the function, with its body still streaming.
pub struct InvokeOutcome {
    pub response: http::Response<ResponseBody>,
    /// Time spent creating the instance.
    pub instantiate: Duration,
    /// Largest linear memory of the instance in bytes; final once the body
    /// has been read.
    pub peak_memory: Arc<AtomicU64>,
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

    /// Runs `request` in a fresh instance. Returns once the function has set
    /// its response head; the body streams afterwards, under the same
    /// deadline.
    pub async fn invoke<B>(
        &self,
        request: hyper::Request<B>,
        invocation_id: Arc<str>,
        trigger: &'static str,
    ) -> Result<InvokeOutcome, InvokeError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<HttpError>,
    {
        let started = Instant::now();
        let f = &self.inner;
        let timeout = f.spec.limits.timeout;
        let deadline = started + timeout;
        let peak_memory = Arc::new(AtomicU64::new(0));
        // The gateway set the invocation's trace context on the request.
        let trace = request
            .headers()
            .get(nimbus_telemetry::trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(nimbus_telemetry::trace::TraceContext::parse);
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
        let trace_ids = trace.map(|t| (t.trace_id_hex(), t.span_id_hex()));
        let stdout = FunctionOutput::new(tag.clone(), "stdout");
        let stderr = FunctionOutput::new(tag, "stderr");
        let mut wasi = WasiCtx::builder();
        wasi.envs(&f.spec.env)
            .stdout(stdout.clone())
            .stderr(stderr.clone());
        let host = Host {
            table: ResourceTable::new(),
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks: Hooks {
                policy: f.policy.clone(),
                function: f.name.clone(),
                trace,
            },
            limiter: Limiter {
                memory_bytes: usize::try_from(f.spec.limits.memory_bytes).unwrap_or(usize::MAX),
                denied: false,
                peak: peak_memory.clone(),
            },
            deadline,
        };
        let mut store = Store::new(&f.engine, host);
        store.limiter(|host| &mut host.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });

        let (sender, receiver) = tokio::sync::oneshot::channel();
        let mut http = store.data_mut().http();
        let req = http
            .new_incoming_request(Scheme::Http, request)
            .map_err(|e| InvokeError::BadRequest(format!("{e:#}")))?;
        let out = http
            .new_response_outparam(sender)
            .map_err(|e| InvokeError::BadRequest(format!("{e:#}")))?;
        let proxy =
            match tokio::time::timeout_at(deadline.into(), f.pre.instantiate_async(&mut store))
                .await
            {
                Ok(Ok(proxy)) => proxy,
                Ok(Err(e)) => return Err(classify(e, &store, &f.spec.limits, true)),
                Err(_) => return Err(InvokeError::Timeout(timeout)),
            };
        let instantiate = started.elapsed();
        let limits = f.spec.limits;
        let name = f.name.clone();
        let version = f.spec.version;
        let task = tokio::spawn(async move {
            let call = proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, req, out);
            let result = match tokio::time::timeout_at(deadline.into(), call).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(classify(e, &store, &limits, false)),
                Err(_) => Err(InvokeError::Timeout(limits.timeout)),
            };
            stdout.flush_pending();
            stderr.flush_pending();
            if let Err(e) = &result {
                // Also after the response head was sent (a failure while
                // streaming), so the reason is always tied to the invocation.
                tracing::warn!(
                    invocation_id = &*invocation,
                    function = &*name,
                    version,
                    trigger,
                    trace_id = trace_ids.as_ref().map(|t| t.0.as_str()),
                    span_id = trace_ids.as_ref().map(|t| t.1.as_str()),
                    error = %e,
                    "guest failed"
                );
            }
            result
        });
        match receiver.await {
            Ok(Ok(response)) => Ok(InvokeOutcome {
                peak_memory,
                response: response.map(|body| {
                    body.map_err(|e| std::io::Error::other(e.to_string()))
                        .boxed_unsync()
                }),
                instantiate,
            }),
            Ok(Err(code)) => Err(InvokeError::Guest(format!("{code:?}"))),
            Err(_) => match task.await {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => Err(InvokeError::NoResponse),
                Err(join) => Err(InvokeError::Trap(format!("invocation task failed: {join}"))),
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

impl Engine {
    /// Whether a component with this digest was uploaded and compiled.
    pub fn has_component(&self, digest: &ComponentDigest) -> bool {
        self.cached(digest).is_some()
            || (self.artifacts.component_path(digest).exists()
                && self
                    .artifacts
                    .compiled_path(digest, &self.fingerprint)
                    .exists())
    }
}
