//! `nimbus-gateway` owns HTTP ingress to functions: the listener loop, the
//! route table (swapped atomically on deploy), admission control, request
//! body limits, and the mapping of every invocation outcome to an HTTP
//! answer. It holds no state of its own beyond the current route table; the
//! node builds tables from the registry and hands them over.

pub mod admission;
pub mod intake;
pub mod router;
pub mod server;
pub mod webhook;

use admission::{Admission, Permit, RETRY_AFTER_SECS};
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use nimbus_api::{ErrorBody, ErrorResponse, INVOCATION_ID_HEADER};
use nimbus_engine::{FunctionRuntime, InvokeError};
use nimbus_manifest::FunctionName;
use nimbus_telemetry::ErrorKind;
use nimbus_telemetry::spans::{Invocation as SpanFacts, SpanSink};
use nimbus_telemetry::trace::{TRACEPARENT, TraceContext};
use router::{Lookup, Router};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use wasmtime_wasi_http::Error as HttpError;

/// Set on answers the node made in place of the function's (timeout, trap,
/// throttling...): the failure's code.
pub const ERROR_HEADER: &str = "nimbus-error";

/// The trace id of an invocation, answered to the caller.
pub const TRACE_ID_HEADER: &str = "nimbus-trace-id";

/// Body of every response the node sends.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Body handed to functions.
pub type RequestBody = UnsyncBoxBody<Bytes, HttpError>;

/// A function version that can take requests.
pub struct Deployed {
    pub name: FunctionName,
    pub version: u64,
    pub runtime: FunctionRuntime,
    pub admission: Arc<Admission>,
    /// Largest request body accepted, in bytes.
    pub max_body: u64,
    /// The version's configuration (routes, retry policy, destinations,
    /// schedules).
    pub config: nimbus_manifest::FunctionConfig,
    /// Signature checks of the webhook routes, by route path.
    pub webhooks: HashMap<String, Arc<webhook::Verifier>>,
    pub metrics: nimbus_telemetry::FunctionMetrics,
}

/// Routes and functions of one moment; replaced whole on every change.
#[derive(Default)]
pub struct RouteTable {
    router: Router<Deployed>,
    functions: HashMap<FunctionName, Arc<Deployed>>,
}

impl RouteTable {
    /// Builds the table serving `functions`.
    pub fn new(functions: impl IntoIterator<Item = Arc<Deployed>>) -> Self {
        let mut table = Self::default();
        for f in functions {
            for route in &f.config.routes {
                table.router.insert(route.clone(), f.clone());
            }
            table.functions.insert(f.name.clone(), f);
        }
        table
    }

    /// The serving version of a function.
    pub fn function(&self, name: &str) -> Option<&Arc<Deployed>> {
        self.functions.get(name)
    }

    /// Every serving function.
    pub fn functions(&self) -> impl Iterator<Item = &Arc<Deployed>> {
        self.functions.values()
    }

    /// Where `method path` routes, when it routes to `function`: an
    /// asynchronous invocation replayed later gets the same route headers as
    /// the request that queued it.
    pub fn route_info(&self, method: &str, path: &str, function: &str) -> RouteInfo {
        match self.router.lookup(method, path) {
            Lookup::Found(m) if m.target.name.as_str() == function => RouteInfo {
                route: m.route.path.to_string(),
                params: m.params,
                rest: m.rest,
                ..RouteInfo::default()
            },
            _ => RouteInfo::default(),
        }
    }
}

/// The gateway: the current route table and the invocation counters.
pub struct Gateway {
    table: RwLock<Arc<RouteTable>>,
    invocations: AtomicU64,
    next_id: AtomicU64,
    id_prefix: u64,
    intake: Option<Arc<dyn intake::Intake>>,
    /// Where each invocation's spans go (OTLP export), when configured.
    spans: Option<Arc<dyn SpanSink>>,
}

impl Default for Gateway {
    fn default() -> Self {
        Self::new(None)
    }
}

/// Where a request was routed, passed to the function as headers, and what
/// started it.
#[derive(Default)]
pub struct RouteInfo {
    pub route: String,
    pub params: Vec<(String, String)>,
    pub rest: Option<String>,
    /// `http` unless set.
    pub trigger: Option<&'static str>,
    /// The attempt number of an asynchronous invocation.
    pub attempt: Option<u32>,
    /// When the work started waiting (ms since the epoch): a queued
    /// invocation's acceptance, a broker message's publication. Its span
    /// then covers the wait.
    pub waiting_since_ms: Option<i64>,
}

impl Gateway {
    /// A gateway; `intake` takes asynchronous invocations.
    pub fn new(intake: Option<Arc<dyn intake::Intake>>) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default()
            ^ (u64::from(std::process::id()) << 32);
        Self {
            table: RwLock::new(Arc::new(RouteTable::default())),
            invocations: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            id_prefix: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            intake,
            spans: None,
        }
    }

    /// Records every invocation's spans into `sink`.
    pub fn with_spans(mut self, sink: Arc<dyn SpanSink>) -> Self {
        self.spans = Some(sink);
        self
    }

    /// The table serving now.
    pub fn table(&self) -> Arc<RouteTable> {
        match self.table.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the table: requests that already hold the old one finish on
    /// it, new requests see the new one.
    pub fn swap(&self, table: RouteTable) {
        let table = Arc::new(table);
        match self.table.write() {
            Ok(mut t) => *t = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
    }

    /// Invocations started since the node started.
    pub fn invocations(&self) -> u64 {
        self.invocations.load(Ordering::Relaxed)
    }

    fn next_invocation_id(&self) -> Arc<str> {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(24);
        nimbus_telemetry::trace::push_hex(&mut id, &self.id_prefix.to_be_bytes());
        // At least 8 digits of the counter, more once it passes them.
        let n = n.to_be_bytes();
        let skip = n.iter().take(4).take_while(|b| **b == 0).count();
        nimbus_telemetry::trace::push_hex(&mut id, &n[skip..]);
        id.into()
    }

    /// Serves one gateway request: route, admit, invoke.
    pub async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Body> {
        let table = self.table();
        let (method, path) = (req.method().as_str(), req.uri().path());
        let (deployed, info) = match table.router.lookup(method, path) {
            Lookup::Found(m) => {
                let route = m.route.path.to_string();
                let s3 = m.route.format == nimbus_manifest::Format::S3;
                if m.route.webhook.is_some() {
                    let deployed = m.target.clone();
                    drop(table);
                    let Some(verifier) = deployed.webhooks.get(&route).cloned() else {
                        return json_error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "webhook_unconfigured",
                            "this webhook route has no secret loaded",
                            None,
                        );
                    };
                    return self
                        .accept_async(&deployed, req, &route, Some(&verifier), s3)
                        .await;
                }
                let wants_async = match intake::wants_async(req.headers()) {
                    Ok(wants) => wants,
                    Err(e) => {
                        return json_error(
                            StatusCode::BAD_REQUEST,
                            "bad_invocation_type",
                            e.to_string(),
                            None,
                        );
                    }
                };
                if s3 || wants_async {
                    let deployed = m.target.clone();
                    drop(table);
                    return self.accept_async(&deployed, req, &route, None, s3).await;
                }
                (
                    m.target.clone(),
                    RouteInfo {
                        route,
                        params: m.params,
                        rest: m.rest,
                        ..RouteInfo::default()
                    },
                )
            }
            Lookup::MethodNotAllowed(allowed) => {
                let mut resp = json_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!(
                        "{method} is not allowed on {path}; allowed: {}",
                        allowed.join(", ")
                    ),
                    None,
                );
                if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                    resp.headers_mut().insert(header::ALLOW, v);
                }
                return resp;
            }
            Lookup::NotFound => {
                return json_error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no function serves {method} {path}"),
                    None,
                );
            }
        };
        drop(table);
        let req = req.map(|b| b.map_err(HttpError::from).boxed_unsync());
        self.invoke(&deployed, req, info).await
    }

    /// Runs `req` through `deployed`, under its admission control and body
    /// limit, and turns the outcome into a response.
    pub async fn invoke(
        &self,
        deployed: &Arc<Deployed>,
        req: hyper::Request<RequestBody>,
        info: RouteInfo,
    ) -> hyper::Response<Body> {
        let id = self.next_invocation_id();
        self.invoke_as(deployed, req, info, id).await
    }

    /// [`Gateway::invoke`] under a given invocation id (an asynchronous
    /// invocation keeps its id across attempts).
    pub async fn invoke_as(
        &self,
        deployed: &Arc<Deployed>,
        mut req: hyper::Request<RequestBody>,
        info: RouteInfo,
        id: Arc<str>,
    ) -> hyper::Response<Body> {
        let started = Instant::now();
        let wall_start = std::time::SystemTime::now();
        self.invocations.fetch_add(1, Ordering::Relaxed);
        let trigger = info.trigger.unwrap_or("http");
        let attempt = info.attempt;
        deployed.metrics.invoked();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();

        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > deployed.max_body) {
            return too_large(deployed.max_body, &id);
        }

        let permit = match deployed.admission.acquire().await {
            Ok(permit) => permit,
            Err(throttled) => {
                deployed.metrics.failed(ErrorKind::Throttled);
                tracing::info!(
                    target: "nimbus::invocation",
                    invocation_id = %id,
                    function = %deployed.name,
                    version = deployed.version,
                    trigger,
                    attempt,
                    status = 429,
                    "throttled: {throttled}"
                );
                let mut resp = json_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "throttled",
                    throttled.to_string(),
                    Some(&*id),
                );
                resp.headers_mut()
                    .insert(ERROR_HEADER, HeaderValue::from_static("throttled"));
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
                return resp;
            }
        };

        let admitted = started.elapsed();
        let headers = req.headers_mut();
        // The caller's trace continues (or one starts); the function sees
        // this invocation as the parent of whatever it does next.
        let caller = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        let trace = caller.map_or_else(TraceContext::root, |parent| parent.child());
        let timing = Timing {
            wall_start,
            admitted,
            // A context Nimbus minted for queued work stands for no span:
            // the invocation is then the trace's root.
            parent: caller.and_then(|c| c.parent_span()),
            queued: info.waiting_since_ms.map_or(Duration::ZERO, |since| {
                let since = std::time::UNIX_EPOCH + Duration::from_millis(since.max(0) as u64);
                wall_start.duration_since(since).unwrap_or_default()
            }),
        };
        let trace_id = trace.trace_id_hex();
        if let Ok(v) = HeaderValue::from_str(&trace.header()) {
            headers.insert(TRACEPARENT, v);
        }
        headers.remove("nimbus-route");
        remove_prefixed(headers, "nimbus-param-");
        headers.remove("nimbus-path-info");
        // Hex digits only: always a valid header value.
        let id_header = HeaderValue::from_str(&id).ok();
        if let Some(v) = &id_header {
            headers.insert(INVOCATION_ID_HEADER, v.clone());
        }
        if !info.route.is_empty()
            && let Ok(v) = HeaderValue::from_str(&info.route)
        {
            headers.insert("nimbus-route", v);
        }
        for (name, value) in &info.params {
            let name =
                http::HeaderName::try_from(format!("nimbus-param-{}", name.to_ascii_lowercase()));
            if let (Ok(name), Ok(value)) = (name, HeaderValue::from_str(value)) {
                headers.insert(name, value);
            }
        }
        if let Some(rest) = &info.rest
            && let Ok(v) = HeaderValue::from_str(rest)
        {
            headers.insert("nimbus-path-info", v);
        }
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, HeaderValue::from_static("localhost"));
        }

        let exceeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let req = req.map(|body| {
            LimitedBody {
                inner: body,
                remaining: deployed.max_body,
                limit: deployed.max_body,
                exceeded: exceeded.clone(),
            }
            .boxed_unsync()
        });

        let cold = deployed.runtime.claim_cold();
        if cold {
            deployed.metrics.coldstart();
        }
        let result = deployed
            .runtime
            .invoke(req, id.clone(), trigger, Some(trace))
            .await;
        let elapsed = started.elapsed();
        let mut response = match result {
            _ if exceeded.load(Ordering::Relaxed) => too_large(deployed.max_body, &id),
            Ok(outcome) => {
                let (parts, body) = outcome.response.into_parts();
                deployed.metrics.instantiated(outcome.instantiate);
                if parts.status.is_server_error() {
                    deployed.metrics.failed(ErrorKind::Status5xx);
                }
                // The summary line is written when the body is done, with
                // the whole duration and the instance's peak memory.
                let summary = Summary {
                    id: id.clone(),
                    method: method.clone(),
                    path: path.clone(),
                    trigger,
                    attempt,
                    trace,
                    status: parts.status.as_u16(),
                    to_head: elapsed,
                    instantiate: outcome.instantiate,
                    instance: outcome.instance,
                    cold,
                    peak_memory: outcome.peak_memory.clone(),
                    timing,
                    spans: self.spans.clone(),
                };
                let body =
                    ResponseStream::prefetch(body, permit, deployed.clone(), started, summary)
                        .await;
                hyper::Response::from_parts(parts, body.boxed_unsync())
            }
            Err(e) => {
                deployed.metrics.failed(match &e {
                    InvokeError::Timeout(_) => ErrorKind::Timeout,
                    InvokeError::MemoryLimit(_) | InvokeError::Trap(_) => ErrorKind::Trap,
                    InvokeError::Capacity(_) => ErrorKind::Throttled,
                    _ => ErrorKind::Other,
                });
                deployed.metrics.finished(elapsed);
                if let Some(sink) = &self.spans {
                    sink.record(Arc::new(SpanFacts {
                        trace_id: trace.trace_id,
                        span_id: trace.span_id,
                        parent: timing.parent,
                        id: id.clone(),
                        function: deployed.runtime.name().clone(),
                        version: deployed.version,
                        trigger,
                        attempt,
                        method: nimbus_telemetry::spans::method_name(method.as_str()),
                        path: path.clone(),
                        status: None,
                        cold,
                        start: timing.wall_start,
                        queued: timing.queued,
                        admitted: timing.admitted,
                        // A failed invocation does not say when its
                        // instance was ready: execution covers both.
                        instantiate: Duration::ZERO,
                        elapsed,
                        error: Some(e.to_string()),
                    }));
                }
                let (status, code) = match &e {
                    InvokeError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
                    InvokeError::MemoryLimit(_) => {
                        (StatusCode::INTERNAL_SERVER_ERROR, "memory_limit")
                    }
                    InvokeError::Trap(_) => (StatusCode::INTERNAL_SERVER_ERROR, "trap"),
                    InvokeError::NoResponse => (StatusCode::INTERNAL_SERVER_ERROR, "no_response"),
                    InvokeError::Guest(_) => (StatusCode::INTERNAL_SERVER_ERROR, "function_error"),
                    InvokeError::Capacity(_) => (StatusCode::SERVICE_UNAVAILABLE, "capacity"),
                    InvokeError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                    InvokeError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
                };
                tracing::warn!(
                    target: "nimbus::invocation",
                    invocation_id = %id,
                    function = %deployed.name,
                    version = deployed.version,
                    method = %method,
                    path = %path,
                    trigger,
                    attempt,
                    trace_id = %trace_id,
                    span_id = %trace.span_id_hex(),
                    status = status.as_u16(),
                    duration_ms = elapsed.as_secs_f64() * 1000.0,
                    billed_ms = (elapsed.as_secs_f64() * 1000.0).ceil() as u64,
                    "faas.coldstart" = cold,
                    error = %e,
                    "invocation failed"
                );
                // The caller sees the kind of failure; the reason (which may
                // reveal the function's internals) stays in the node log.
                let message = match &e {
                    InvokeError::Timeout(_)
                    | InvokeError::MemoryLimit(_)
                    | InvokeError::Capacity(_) => e.to_string(),
                    _ => format!(
                        "the function failed ({code}); see the node log for invocation {id}"
                    ),
                };
                let mut resp = json_error(status, code, message, Some(&*id));
                resp.headers_mut()
                    .insert(ERROR_HEADER, HeaderValue::from_static(code));
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
                }
                resp
            }
        };
        if let Some(v) = id_header {
            response.headers_mut().insert(INVOCATION_ID_HEADER, v);
        }
        if let Ok(v) = HeaderValue::from_str(&trace_id) {
            response.headers_mut().insert(TRACE_ID_HEADER, v);
        }
        if method == Method::HEAD {
            // HEAD answers carry no body, whatever the function wrote.
            let (parts, _) = response.into_parts();
            return hyper::Response::from_parts(parts, empty());
        }
        response
    }
}

/// Removes every header whose name starts with `prefix`, so a caller cannot
/// forge the headers the gateway sets.
fn remove_prefixed(headers: &mut http::HeaderMap, prefix: &str) {
    let doomed: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(prefix))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

fn too_large(limit: u64, id: &str) -> hyper::Response<Body> {
    json_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!(
            "the request body exceeds this function's limit of {limit} bytes (limits.max_body in nimbus.toml)"
        ),
        Some(id),
    )
}

/// An empty body.
pub fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> hyper::Response<Body> {
    let bytes = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = hyper::Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The JSON error answer used by the gateway and the admin API.
pub fn json_error(
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
    invocation_id: Option<&str>,
) -> hyper::Response<Body> {
    json_response(
        status,
        &ErrorResponse {
            error: ErrorBody {
                code: code.to_owned(),
                message: message.into(),
                invocation_id: invocation_id.map(str::to_owned),
            },
        },
    )
}

/// Counts request body bytes and fails the stream past the limit.
struct LimitedBody {
    inner: RequestBody,
    remaining: u64,
    limit: u64,
    exceeded: Arc<std::sync::atomic::AtomicBool>,
}

impl HttpBody for LimitedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.remaining {
                        this.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(HttpError::HttpRequestBodySize(Some(
                            this.limit,
                        )))));
                    }
                    this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A function's response body on its way out. It holds the invocation's
/// admission slot until the body has been sent, so a streaming response
/// counts against concurrency.
///
/// Before the response head is handed to hyper, the first frame the guest
/// writes (and whatever follows at once) is gathered, so the head and the
/// first bytes leave in one write; when the guest has already finished, the
/// exact length is known and the response goes out with `Content-Length`
/// instead of chunked framing.
struct ResponseStream {
    ready: std::collections::VecDeque<Result<Frame<Bytes>, std::io::Error>>,
    rest: Option<nimbus_engine::ResponseBody>,
    _permit: Permit,
    /// Whose invocation this is and when it started: its duration is
    /// recorded when the body is done (sent, or abandoned by the client).
    deployed: Arc<Deployed>,
    started: Instant,
    summary: Summary,
}

/// What the invocation's summary line says.
struct Summary {
    id: Arc<str>,
    method: Method,
    path: String,
    trigger: &'static str,
    attempt: Option<u32>,
    trace: TraceContext,
    status: u16,
    /// Until the response head.
    to_head: std::time::Duration,
    instantiate: std::time::Duration,
    /// Where the instance came from: new, prepared ahead or reused.
    instance: nimbus_engine::InstanceOrigin,
    cold: bool,
    peak_memory: Arc<AtomicU64>,
    timing: Timing,
    spans: Option<Arc<dyn SpanSink>>,
}

/// When an invocation started and was admitted, and whose span it
/// continues.
#[derive(Clone, Copy)]
struct Timing {
    wall_start: std::time::SystemTime,
    /// Time spent waiting for an admission slot.
    admitted: Duration,
    /// The caller's span, when it sent a trace context.
    parent: Option<[u8; 8]>,
    /// How long the work waited before this attempt (queue or broker).
    queued: Duration,
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        self.deployed.metrics.finished(elapsed);
        let s = &mut self.summary;
        self.deployed
            .metrics
            .peak_memory(s.peak_memory.load(Ordering::Relaxed));
        let ms = elapsed.as_secs_f64() * 1000.0;
        tracing::info!(
            target: "nimbus::invocation",
            invocation_id = %s.id,
            function = %self.deployed.name,
            version = self.deployed.version,
            method = %s.method,
            path = %s.path,
            trigger = s.trigger,
            attempt = s.attempt,
            trace_id = %s.trace.trace_id_hex(),
            span_id = %s.trace.span_id_hex(),
            status = s.status,
            duration_ms = ms,
            // Metered by the started millisecond.
            billed_ms = ms.ceil() as u64,
            head_ms = s.to_head.as_secs_f64() * 1000.0,
            instantiate_us = s.instantiate.as_micros() as u64,
            instance = s.instance.as_str(),
            peak_memory_bytes = s.peak_memory.load(Ordering::Relaxed),
            "faas.coldstart" = s.cold,
            "invocation"
        );
        if let Some(sink) = &s.spans {
            sink.record(Arc::new(SpanFacts {
                trace_id: s.trace.trace_id,
                span_id: s.trace.span_id,
                parent: s.timing.parent,
                id: s.id.clone(),
                function: self.deployed.runtime.name().clone(),
                version: self.deployed.version,
                trigger: s.trigger,
                attempt: s.attempt,
                method: nimbus_telemetry::spans::method_name(s.method.as_str()),
                // The summary line is written: the path moves, no copy.
                path: std::mem::take(&mut s.path),
                status: Some(s.status),
                cold: s.cold,
                start: s.timing.wall_start,
                queued: s.timing.queued,
                admitted: s.timing.admitted,
                instantiate: s.instantiate,
                elapsed,
                error: None,
            }));
        }
    }
}

impl ResponseStream {
    async fn prefetch(
        mut body: nimbus_engine::ResponseBody,
        permit: Permit,
        deployed: Arc<Deployed>,
        started: Instant,
        summary: Summary,
    ) -> Self {
        use http_body_util::BodyExt as _;
        let mut ready = std::collections::VecDeque::new();
        let mut rest = None;
        match body.frame().await {
            None => {}
            Some(first) => {
                let failed = first.is_err();
                ready.push_back(first);
                if !failed {
                    loop {
                        let next = std::future::poll_fn(|cx| {
                            Poll::Ready(Pin::new(&mut body).poll_frame(cx))
                        })
                        .await;
                        match next {
                            Poll::Ready(None) => break,
                            Poll::Ready(Some(frame)) => {
                                let failed = frame.is_err();
                                ready.push_back(frame);
                                if failed {
                                    break;
                                }
                            }
                            Poll::Pending => {
                                rest = Some(body);
                                break;
                            }
                        }
                    }
                }
            }
        }
        Self {
            ready,
            rest,
            _permit: permit,
            deployed,
            started,
            summary,
        }
    }
}

impl HttpBody for ResponseStream {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(frame) = self.ready.pop_front() {
            return Poll::Ready(Some(frame));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .ready
            .iter()
            .filter_map(|f| f.as_ref().ok().and_then(Frame::data_ref))
            .map(|d| d.len() as u64)
            .sum();
        match &self.rest {
            None if self
                .ready
                .iter()
                .all(|f| f.as_ref().is_ok_and(Frame::is_data)) =>
            {
                SizeHint::with_exact(buffered)
            }
            None => SizeHint::default(),
            Some(rest) => {
                let mut hint = rest.size_hint();
                hint.set_lower(hint.lower() + buffered);
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
        }
    }
}
