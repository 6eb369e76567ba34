//! The admin API: JSON over HTTP behind a bearer token. Described in
//! `docs/openapi.yaml`.

use crate::state::{ChangeError, NodeState};
use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use nimbus_api::{
    ComponentInfo, DeployRequest, EngineCounters, FunctionDetail, FunctionSummary, InvokeRequest,
    InvokeResponse, NodeStatus, RollbackRequest, VersionInfo,
};
use nimbus_engine::{ComponentDigest, EngineError};
use nimbus_gateway::{Body, RouteInfo, json_error, json_response};
use nimbus_manifest::FunctionName;
use nimbus_store::{FunctionRecord, StoreError};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Largest JSON body the admin API reads.
const MAX_JSON_BYTES: usize = 16 << 20;
/// Largest component the admin API accepts.
pub const MAX_COMPONENT_BYTES: usize = 512 << 20;
/// Largest response body `invoke` returns through the admin API.
const MAX_INVOKE_RESPONSE_BYTES: usize = 16 << 20;

type Response = hyper::Response<Body>;

/// An admin API failure, as status + code + message.
pub(crate) struct ApiError(StatusCode, &'static str, String);

impl ApiError {
    fn bad_request(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, "bad_request", msg.into())
    }
    fn not_found(msg: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, "not_found", msg.into())
    }
    pub(crate) fn into_response(self) -> Response {
        json_error(self.0, self.1, self.2, None)
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        let msg = e.to_string();
        match e {
            ChangeError::Plan(crate::deploy::PlanError::BadDigest(_)) => {
                Self(StatusCode::BAD_REQUEST, "bad_digest", msg)
            }
            ChangeError::Plan(crate::deploy::PlanError::Invalid { .. }) => {
                Self(StatusCode::BAD_REQUEST, "invalid_config", msg)
            }
            ChangeError::Plan(_) => Self(StatusCode::CONFLICT, "conflict", msg),
            ChangeError::NoSuchFunction(_) => Self::not_found(msg),
            ChangeError::MissingComponent(_) => {
                Self(StatusCode::BAD_REQUEST, "missing_component", msg)
            }
            ChangeError::NothingToRollBack { .. } => {
                Self(StatusCode::CONFLICT, "no_earlier_version", msg)
            }
            ChangeError::Store(StoreError::NoSuchVersion { .. }) => Self::not_found(msg),
            ChangeError::MissingSecret { .. } | ChangeError::SecretUnavailable { .. } => {
                Self(StatusCode::BAD_REQUEST, "missing_secret", msg)
            }
            ChangeError::Source { .. } => Self(StatusCode::BAD_REQUEST, "bad_source", msg),
            ChangeError::NoSuchDestination { .. } => {
                Self(StatusCode::BAD_REQUEST, "no_such_destination", msg)
            }
            ChangeError::Store(StoreError::NoSuchFunction(_)) => Self::not_found(msg),
            ChangeError::Engine {
                source: EngineError::Component(_),
                ..
            } => Self(StatusCode::BAD_REQUEST, "invalid_component", msg),
            other => {
                tracing::error!(error = %other, "admin request failed");
                Self(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    other.to_string(),
                )
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ChangeError::Store(e).into()
    }
}

/// Compares tokens in time independent of where they differ.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn authorized(state: &NodeState, req: &hyper::Request<Incoming>) -> bool {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| token_matches(t.trim().as_bytes(), state.token.as_bytes()))
}

/// Serves one admin request.
pub async fn handle(state: Arc<NodeState>, req: hyper::Request<Incoming>) -> Response {
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return method_not_allowed(req.method(), &path, "GET, HEAD");
        }
        return json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" }));
    }
    // The dashboard's page and files (its data needs the token).
    if req.method() == Method::GET
        && let Some(page) = crate::ui::serve(&path)
    {
        return page;
    }
    if !authorized(&state, &req) {
        let mut resp = json_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token: send `Authorization: Bearer <token>` with the token from the node's data directory (admin-token)",
            None,
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return resp;
    }
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method().clone();
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "status"]) => Ok(status(&state).await),
        (&Method::GET, ["metrics"]) => Ok(metrics(&state).await),
        (&Method::GET, ["v1", "stats"]) => Ok(stats(&state).await),
        (&Method::GET, ["v1", "functions"]) => list(&state),
        (&Method::GET, ["v1", "functions", name]) => detail(&state, name),
        (&Method::DELETE, ["v1", "functions", name]) => remove(&state, name).await,
        (&Method::POST, ["v1", "functions", name, "rollback"]) => rollback(&state, name, req).await,
        (&Method::POST, ["v1", "functions", name, "invoke"]) => invoke(&state, name, req).await,
        (&Method::POST, ["v1", "functions", name, "invocations"]) => {
            submit(&state, name, req).await
        }
        (&Method::GET, ["v1", "functions", name, "invocations"]) => {
            invocations(&state, name, &req, None).await
        }
        (&Method::GET, ["v1", "functions", name, "dlq"]) => {
            invocations(&state, name, &req, Some(nimbus_queue::State::Failed)).await
        }
        (&Method::POST, ["v1", "functions", name, "dlq", "redrive"]) => {
            redrive(&state, name, req).await
        }
        (&Method::DELETE, ["v1", "functions", name, "dlq"]) => purge(&state, name).await,
        (&Method::GET, ["v1", "invocations", id]) => invocation(&state, id).await,
        (&Method::GET, ["v1", "invocations", id, "spans"]) => Ok(spans(&state, id)),
        (&Method::GET, ["v1", "schedules"]) => schedules(&state).await,
        (&Method::GET, ["v1", "alerts"]) => {
            Ok(json_response(StatusCode::OK, &state.alerts.states()))
        }
        (&Method::GET, ["v1", "functions", name, "logs"]) => logs(&state, name, &req),
        (&Method::GET, ["v1", "functions", name, "history"]) => function_name(name)
            .map(|name| json_response(StatusCode::OK, &state.history.of(name.as_str()))),
        (&Method::HEAD | &Method::GET, ["v1", "components", digest]) => {
            has_component(&state, digest)
        }
        (&Method::PUT, ["v1", "components", digest]) => upload(&state, digest, req).await,
        (&Method::POST, ["v1", "deploy"]) => deploy(&state, req).await,
        (_, ["v1", "buckets", bucket, "objects", ..]) => {
            let bucket = (*bucket).to_owned();
            Ok(crate::buckets::handle(&state, &method, &bucket, req).await)
        }
        (method, segments) => match allowed_methods(segments) {
            Some(allowed) => return method_not_allowed(method, &path, allowed),
            None if segments.first() == Some(&"v1") => Err(ApiError(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no admin endpoint {method} {path}; see docs/openapi.yaml"),
            )),
            None => Err(ApiError::not_found(format!(
                "no admin endpoint {method} {path}"
            ))),
        },
    };
    result.unwrap_or_else(ApiError::into_response)
}

/// The methods an admin path answers, for a request that used another
/// one; `None` for a path the API does not have. Buckets answer their own.
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    Some(match segments {
        ["metrics"]
        | [
            "v1",
            "status" | "stats" | "functions" | "schedules" | "alerts",
        ]
        | ["v1", "functions", _, "logs" | "history"]
        | ["v1", "invocations", _]
        | ["v1", "invocations", _, "spans"] => "GET",
        ["v1", "functions", _] | ["v1", "functions", _, "dlq"] => "GET, DELETE",
        ["v1", "functions", _, "invocations"] => "GET, POST",
        ["v1", "deploy"]
        | ["v1", "functions", _, "rollback" | "invoke"]
        | ["v1", "functions", _, "dlq", "redrive"] => "POST",
        ["v1", "components", _] => "GET, HEAD, PUT",
        _ => return None,
    })
}

/// 405 with the `Allow` header a client needs to correct the request.
pub(crate) fn method_not_allowed(method: &Method, path: &str, allowed: &'static str) -> Response {
    let mut resp = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {path}: use {allowed}"),
        None,
    );
    resp.headers_mut()
        .insert(header::ALLOW, http::HeaderValue::from_static(allowed));
    resp
}

async fn read_json<T: DeserializeOwned>(req: hyper::Request<Incoming>) -> Result<T, ApiError> {
    let bytes = read_body(req, MAX_JSON_BYTES).await?;
    if bytes.is_empty() {
        return serde_json::from_slice(b"{}")
            .map_err(|e| ApiError::bad_request(format!("the request needs a JSON body: {e}")));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid JSON at line {} column {}: {e}",
            e.line(),
            e.column()
        ))
    })
}

async fn read_body(req: hyper::Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body exceeds the admin API's limit of {limit} bytes"),
        )
    };
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body failed: {e}"
        ))),
    }
}

fn function_name(name: &str) -> Result<FunctionName, ApiError> {
    name.parse::<FunctionName>()
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

fn summary(state: &NodeState, r: &FunctionRecord) -> FunctionSummary {
    let table = state.gateway.table();
    let serving = table.function(r.name.as_str());
    let failed = state.failed();
    FunctionSummary {
        name: r.name.clone(),
        app: r.app.clone(),
        version: r.active.version,
        digest: r.active.digest.clone(),
        routes: r
            .active
            .config
            .routes
            .iter()
            .map(ToString::to_string)
            .collect(),
        config: r.active.config.clone(),
        updated_at: r.updated_at,
        in_flight: serving.map_or(0, |d| d.admission.in_flight()),
        loaded: serving.is_some_and(|d| d.runtime.is_loaded()),
        idle_instances: serving.map_or(0, |d| d.runtime.idle_instances() as u64),
        keep_alive: serving
            .and_then(|d| d.runtime.keep_alive_window())
            .map(|w| nimbus_api::KeepAliveWindow {
                load_at_ms: w.load_at_ms,
                unload_at_ms: w.unload_at_ms,
            }),
        ready: serving.is_some(),
        error: failed.get(&r.name).cloned(),
    }
}

async fn status(state: &NodeState) -> Response {
    let queue = state.queue().stats().await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read queue counts");
        Vec::new()
    });
    let table = state.gateway.table();
    let stats = state.engine.stats();
    let failed = state.failed();
    json_response(
        StatusCode::OK,
        &NodeStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_secs: state.started.elapsed().as_secs(),
            gateway_url: state.info.gateway_url.clone(),
            admin_url: state.info.admin_url.clone(),
            data_dir: state.data_dir.display().to_string(),
            functions: table.functions().count() as u64,
            functions_failed: failed.len() as u64,
            in_flight: table.functions().map(|d| d.admission.in_flight()).sum(),
            invocations: state.gateway.invocations(),
            async_queued: queue.iter().map(|q| q.queued).sum(),
            async_running: queue.iter().map(|q| q.running).sum(),
            dead_lettered: queue.iter().map(|q| q.failed).sum(),
            sources: state.sources.statuses(),
            engine: EngineCounters {
                compiled: stats.compiled,
                optimized: stats.optimized,
                loaded_from_cache: stats.loaded_from_cache,
            },
            engine_fingerprint: state.engine.fingerprint().to_owned(),
        },
    )
}

/// Counters of every serving function, for `nimbus top`.
async fn stats(state: &NodeState) -> Response {
    let queue = state.queue_stats().await;
    let at = nimbus_queue::now_ms();
    let table = state.gateway.table();
    let mut list: Vec<nimbus_api::FunctionStats> = table
        .functions()
        .map(|d| nimbus_api::FunctionStats {
            function: d.name.to_string(),
            version: d.version,
            in_flight: d.admission.in_flight(),
            queued: d.admission.queued() as u64,
            async_queued: queue.get(d.name.as_str()).map_or(0, |q| q.queued),
            at,
            counters: d.metrics.snapshot(),
        })
        .collect();
    list.sort_by(|a, b| a.function.cmp(&b.function));
    json_response(StatusCode::OK, &list)
}

/// Prometheus text: per function version and for the process.
async fn metrics(state: &NodeState) -> Response {
    let queue = state.queue_stats().await;
    let now = nimbus_queue::now_ms();
    let table = state.gateway.table();
    let mut functions: Vec<_> = table.functions().collect();
    functions.sort_by(|a, b| a.name.cmp(&b.name));
    let samples: Vec<nimbus_telemetry::FunctionSample<'_>> = functions
        .iter()
        .map(|d| {
            let q = queue.get(d.name.as_str());
            nimbus_telemetry::FunctionSample {
                function: d.name.as_str(),
                version: d.version,
                metrics: &d.metrics,
                in_flight: d.admission.in_flight(),
                queued: d.admission.queued() as u64,
                async_queued: q.map_or(0, |q| q.queued),
                async_running: q.map_or(0, |q| q.running),
                dead_lettered: q.map_or(0, |q| q.failed),
                oldest_queued_age: q
                    .and_then(|q| q.oldest_queued_at)
                    .map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0),
            }
        })
        .collect();
    let process = nimbus_telemetry::ProcessSample::read(state.started_unix);
    let mut resp = hyper::Response::new(nimbus_gateway::full(nimbus_telemetry::render(
        &samples, &process,
    )));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

fn list(state: &NodeState) -> Result<Response, ApiError> {
    let records = state.registry.functions()?;
    let list: Vec<FunctionSummary> = records.iter().map(|r| summary(state, r)).collect();
    Ok(json_response(StatusCode::OK, &list))
}

fn detail(state: &NodeState, name: &str) -> Result<Response, ApiError> {
    let name = function_name(name)?;
    let record = state
        .registry
        .function(&name)?
        .ok_or_else(|| ApiError::not_found(format!("function `{name}` does not exist")))?;
    let versions = state
        .registry
        .versions(&name)?
        .into_iter()
        .map(|v| VersionInfo {
            active: v.version == record.active.version,
            version: v.version,
            digest: v.digest,
            created_at: v.created_at,
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &FunctionDetail {
            summary: summary(state, &record),
            versions,
            sources: state
                .sources
                .statuses()
                .into_iter()
                .filter(|s| s.function == name.as_str())
                .collect(),
        },
    ))
}

async fn remove(state: &NodeState, name: &str) -> Result<Response, ApiError> {
    let name = function_name(name)?;
    state.remove(&name).await?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "removed": name }),
    ))
}

async fn rollback(
    state: &NodeState,
    name: &str,
    req: hyper::Request<Incoming>,
) -> Result<Response, ApiError> {
    let name = function_name(name)?;
    let body: RollbackRequest = read_json(req).await?;
    let record = state.rollback(&name, body.to).await?;
    Ok(json_response(StatusCode::OK, &summary(state, &record)))
}

async fn invoke(
    state: &NodeState,
    name: &str,
    req: hyper::Request<Incoming>,
) -> Result<Response, ApiError> {
    let name = function_name(name)?;
    let body: InvokeRequest = read_json(req).await?;
    let table = state.gateway.table();
    let deployed = table
        .function(name.as_str())
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("function `{name}` is not deployed")))?;
    drop(table);
    let method = body
        .method
        .as_deref()
        .unwrap_or(if body.body.is_some() { "POST" } else { "GET" });
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| ApiError::bad_request(format!("invalid method `{method}`")))?;
    let path = body.path.as_deref().unwrap_or("/");
    if !path.starts_with('/') {
        return Err(ApiError::bad_request(format!(
            "path `{path}` must start with `/`"
        )));
    }
    let mut builder = hyper::Request::builder().method(method).uri(path);
    let mut has_host = false;
    for (k, v) in &body.headers {
        has_host |= k.eq_ignore_ascii_case("host");
        builder = builder.header(k.as_str(), v.as_str());
    }
    if !has_host {
        builder = builder.header(header::HOST, "localhost");
    }
    let payload = Bytes::from(body.body.unwrap_or_default());
    let request = builder
        .header(header::CONTENT_LENGTH, payload.len())
        .body(
            http_body_util::Full::new(payload)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))?;
    let started = Instant::now();
    let response = state
        .gateway
        .invoke(&deployed, request, RouteInfo::default())
        .await;
    let (parts, body) = response.into_parts();
    let bytes = Limited::new(body, MAX_INVOKE_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::BAD_GATEWAY,
                "response_failed",
                format!("reading the function's response failed: {e}"),
            )
        })?
        .to_bytes();
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let invocation_id = parts
        .headers
        .get(nimbus_api::INVOCATION_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (text, binary) = match std::str::from_utf8(&bytes) {
        Ok(t) => (t.to_owned(), false),
        Err(_) => (String::from_utf8_lossy(&bytes).into_owned(), true),
    };
    Ok(json_response(
        StatusCode::OK,
        &InvokeResponse {
            invocation_id,
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: text,
            binary,
            duration_ms,
        },
    ))
}

impl From<nimbus_queue::QueueError> for ApiError {
    fn from(e: nimbus_queue::QueueError) -> Self {
        tracing::error!(error = %e, "queue request failed");
        Self(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_unavailable",
            e.to_string(),
        )
    }
}

fn query_param<'a>(req: &'a hyper::Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// A yes/no query parameter: `true`/`1` or `false`/`0`; absent or empty
/// is no.
fn bool_param(req: &hyper::Request<Incoming>, key: &str) -> Result<bool, ApiError> {
    match query_param(req, key) {
        None | Some("" | "false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key} `{}` is not a yes/no value: use {key}=true or {key}=false",
            percent_decode(other)
        ))),
    }
}

/// The query parameter `key`, decoded.
pub(crate) fn query_value(req: &hyper::Request<Incoming>, key: &str) -> Option<String> {
    query_param(req, key).map(percent_decode)
}

/// Decodes `%XX` escapes of a query value, where `+` is a space (invalid
/// escapes stay as written).
fn percent_decode(text: &str) -> String {
    nimbus_gateway::router::percent_decode(&text.replace('+', " "))
}

/// The `limit` query parameter: 100 when absent, else 1 to `max`.
pub(crate) fn limit_param(req: &hyper::Request<Incoming>, max: usize) -> Result<usize, ApiError> {
    match query_param(req, "limit") {
        None => Ok(100.min(max)),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be a number from 1 to {max}"))
            }),
    }
}

/// `POST /v1/functions/{name}/invocations`: the body is the event. Runs
/// synchronously unless `Nimbus-Invocation-Type: async` (or `?type=async`)
/// asks to queue it.
async fn submit(
    state: &NodeState,
    name: &str,
    req: hyper::Request<Incoming>,
) -> Result<Response, ApiError> {
    let name = function_name(name)?;
    let deployed = state
        .gateway
        .table()
        .function(name.as_str())
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("function `{name}` is not deployed")))?;
    let asynchronous = nimbus_gateway::intake::wants_async(req.headers()).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "bad_invocation_type",
            e.to_string(),
        )
    })? || match query_param(&req, "type") {
        None | Some("") => false,
        Some(t) if t.eq_ignore_ascii_case("async") => true,
        Some(t) if t.eq_ignore_ascii_case("sync") => false,
        Some(t) => {
            return Err(ApiError::bad_request(format!(
                "type `{}` is neither sync nor async",
                percent_decode(t)
            )));
        }
    };
    let path = percent_decode(query_param(&req, "path").unwrap_or("/"));
    if !path.starts_with('/') || path.parse::<http::Uri>().is_err() {
        return Err(ApiError::bad_request(format!(
            "path `{path}` must be an absolute path such as /orders"
        )));
    }
    let (parts, body) = req.into_parts();
    let limit = deployed
        .max_body
        .min(nimbus_gateway::intake::MAX_ASYNC_BODY);
    let body = nimbus_gateway::intake::read_limited(&parts.headers, body, limit)
        .await
        .map_err(|e| match e {
            nimbus_gateway::intake::ReadError::TooLarge(limit) => ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the event body may be at most {limit} bytes"),
            ),
            nimbus_gateway::intake::ReadError::Failed(e) => {
                ApiError::bad_request(format!("reading the request body failed: {e}"))
            }
        })?;
    if !asynchronous {
        let mut builder = hyper::Request::builder()
            .method(parts.method.clone())
            .uri(path.as_str());
        for (k, v) in &parts.headers {
            if !matches!(k.as_str(), "authorization" | "host" | "content-length") {
                builder = builder.header(k, v);
            }
        }
        let request = builder
            .header(header::HOST, "localhost")
            .header(header::CONTENT_LENGTH, body.len())
            .body(
                http_body_util::Full::new(body)
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))?;
        let info = RouteInfo {
            trigger: Some("api"),
            ..RouteInfo::default()
        };
        return Ok(state.gateway.invoke(&deployed, request, info).await);
    }
    let mut headers = parts.headers.clone();
    // The admin token is for the node, never for the function.
    headers.remove(header::AUTHORIZATION);
    let new = nimbus_gateway::intake::new_invocation(
        name.as_str(),
        nimbus_queue::Trigger::Api,
        &parts.method,
        &path,
        &headers,
        body,
        deployed.config.retry.idempotency_window.get(),
        format!("/nimbus/api/{name}"),
        "nimbus.invocation",
    )
    .map_err(ApiError::bad_request)?;
    let intake = &state.intake;
    match nimbus_gateway::intake::Intake::accept(intake.as_ref(), new).await {
        Ok(e) => Ok(nimbus_gateway::intake::accepted(intake.as_ref(), &e)),
        Err(e) => Ok(nimbus_gateway::intake::unavailable(&e)),
    }
}

/// Largest page of invocations.
const MAX_LIST: usize = 1000;

async fn invocations(
    state: &NodeState,
    name: &str,
    req: &hyper::Request<Incoming>,
    forced: Option<nimbus_queue::State>,
) -> Result<Response, ApiError> {
    let name = function_name(name)?;
    let wanted = match (forced, query_param(req, "state")) {
        (Some(s), _) => Some(s),
        (None, None | Some("")) => None,
        (None, Some(s)) => Some(nimbus_queue::State::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown state `{s}`: use queued, running, succeeded or failed"
            ))
        })?),
    };
    let limit = limit_param(req, MAX_LIST)?;
    let list = state.queue().list(name.as_str(), wanted, limit).await?;
    Ok(json_response(StatusCode::OK, &list))
}

/// `GET /v1/invocations/{id}/spans`: the invocation's spans still in
/// memory (its own, then its steps), times in ms since the epoch.
fn spans(state: &NodeState, id: &str) -> Response {
    use nimbus_telemetry::spans::{SpanKind, Value};
    let ms = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let hex = |b: &[u8]| {
        let mut s = String::new();
        nimbus_telemetry::trace::push_hex(&mut s, b);
        s
    };
    let list: Vec<serde_json::Value> = state
        .recent_spans
        .get()
        .map(|r| r.of_invocation(id))
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            let attributes: serde_json::Map<String, serde_json::Value> = s
                .attributes
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::Str(s) => serde_json::Value::from(s.as_str()),
                        Value::Int(i) => serde_json::Value::from(*i),
                        Value::Bool(b) => serde_json::Value::from(*b),
                    };
                    ((*k).to_owned(), v)
                })
                .collect();
            serde_json::json!({
                "name": s.name,
                "trace_id": hex(&s.trace_id),
                "span_id": hex(&s.span_id),
                "parent": s.parent.map(|p| hex(&p)),
                "kind": match s.kind {
                    SpanKind::Server => "server",
                    SpanKind::Internal => "internal",
                    SpanKind::Consumer => "consumer",
                },
                "start_ms": ms(s.start),
                "duration_ms": ms(s.end) - ms(s.start),
                "error": s.error,
                "attributes": attributes,
            })
        })
        .collect();
    json_response(StatusCode::OK, &list)
}

async fn invocation(state: &NodeState, id: &str) -> Result<Response, ApiError> {
    match state.queue().get(id).await? {
        Some(r) => Ok(json_response(StatusCode::OK, &r)),
        None => Err(ApiError::not_found(format!(
            "no asynchronous invocation `{id}` (finished ones are kept for 24h)"
        ))),
    }
}

async fn redrive(
    state: &NodeState,
    name: &str,
    req: hyper::Request<Incoming>,
) -> Result<Response, ApiError> {
    let name = function_name(name)?;
    let body: nimbus_api::RedriveRequest = read_json(req).await?;
    let ids = match (body.all, body.ids.is_empty()) {
        (true, true) => None,
        (false, false) => Some(body.ids),
        _ => {
            return Err(ApiError::bad_request(
                "send {\"ids\": [...]} to redrive some invocations or {\"all\": true} for all of them",
            ));
        }
    };
    let n = state.queue().redrive(name.as_str(), ids).await?;
    state.intake.signal.wake(name.as_str(), 0);
    tracing::info!(function = %name, invocations = n, "redrove dead-lettered invocations");
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "redriven": n }),
    ))
}

async fn purge(state: &NodeState, name: &str) -> Result<Response, ApiError> {
    let name = function_name(name)?;
    let n = state.queue().purge(name.as_str()).await?;
    tracing::info!(function = %name, invocations = n, "purged the dead-letter queue");
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "purged": n }),
    ))
}

/// Most past lines one log request returns.
const MAX_LOG_LINES: usize = 10_000;
/// A comment line keeps idle live streams open through proxies.
const SSE_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// `GET /v1/functions/{name}/logs`: stored output as JSON, or with
/// `follow=true` as Server-Sent Events (the past lines, then live ones).
fn logs(
    state: &NodeState,
    name: &str,
    req: &hyper::Request<Incoming>,
) -> Result<Response, ApiError> {
    use nimbus_telemetry::logs::LogQuery;
    let name = function_name(name)?;
    let since = match query_param(req, "since").map(percent_decode) {
        None => None,
        Some(s) if s.is_empty() => None,
        Some(s) => {
            let ago = nimbus_manifest::limits::parse_duration(&s, "since")
                .map_err(ApiError::bad_request)?;
            Some(nimbus_queue::now_ms() - ago.as_millis() as i64)
        }
    };
    let limit = limit_param(req, MAX_LOG_LINES)?;
    let nonempty = |k: &str| {
        query_param(req, k)
            .map(percent_decode)
            .filter(|v| !v.is_empty())
    };
    let query = LogQuery {
        function: name.to_string(),
        since,
        invocation: nonempty("invocation"),
        grep: nonempty("grep"),
        after_seq: None,
        limit,
    };
    let follow = bool_param(req, "follow")?;
    // Subscribe before reading the past, so no line falls between the two.
    let live = follow.then(|| state.logs.follow());
    let past = state.logs.query(&query).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot read the log store: {e}"),
        )
    })?;
    let Some(live) = live else {
        return Ok(json_response(StatusCode::OK, &past));
    };
    let last_seq = past.last().map_or(0, |l| l.seq);
    let stopping = state.stopping.subscribe();
    let events = sse_stream(past, live, query, last_seq, stopping);
    let mut resp = hyper::Response::new(http_body_util::BodyExt::boxed_unsync(
        http_body_util::StreamBody::new(events),
    ));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    Ok(resp)
}

type SseFrame = Result<hyper::body::Frame<Bytes>, std::io::Error>;

fn sse_event(line: &nimbus_telemetry::logs::LogLine) -> SseFrame {
    let json = serde_json::to_string(line).unwrap_or_default();
    Ok(hyper::body::Frame::data(Bytes::from(format!(
        "id: {}\ndata: {json}\n\n",
        line.seq
    ))))
}

/// The past lines, then live lines matching `query`, until the node stops
/// or the client goes away.
fn sse_stream(
    past: Vec<nimbus_telemetry::logs::LogLine>,
    live: tokio::sync::broadcast::Receiver<nimbus_telemetry::logs::LogLine>,
    query: nimbus_telemetry::logs::LogQuery,
    last_seq: i64,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> impl futures::Stream<Item = SseFrame> + Send + 'static {
    use tokio::sync::broadcast::error::RecvError;
    let backlog = futures::stream::iter(past.iter().map(sse_event).collect::<Vec<_>>());
    let tail = futures::stream::unfold(
        (live, query, last_seq, stopping),
        |(mut live, query, last_seq, mut stopping)| async move {
            loop {
                if *stopping.borrow() {
                    return None;
                }
                let next = tokio::select! {
                    r = live.recv() => r,
                    _ = stopping.changed() => return None,
                    _ = tokio::time::sleep(SSE_KEEPALIVE) => {
                        let frame = Ok(hyper::body::Frame::data(Bytes::from_static(b": keep-alive\n\n")));
                        return Some((frame, (live, query, last_seq, stopping)));
                    }
                };
                match next {
                    Ok(line) if line.seq > last_seq && query.matches(&line) => {
                        let frame = sse_event(&line);
                        return Some((frame, (live, query, line.seq, stopping)));
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => {
                        let note = format!(": {n} lines skipped: the reader fell behind\n\n");
                        let frame = Ok(hyper::body::Frame::data(Bytes::from(note)));
                        return Some((frame, (live, query, last_seq, stopping)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    );
    futures::StreamExt::chain(backlog, tail)
}

/// Fire times listed per schedule.
const NEXT_FIRES: usize = 3;

async fn schedules(state: &NodeState) -> Result<Response, ApiError> {
    let marks: HashMap<(String, String), i64> = state
        .queue()
        .schedule_marks()
        .await?
        .into_iter()
        .map(|m| ((m.function, m.key), m.last_tick))
        .collect();
    let records = state.registry.functions()?;
    let now = jiff::Timestamp::now();
    let mut out = Vec::new();
    for r in &records {
        for s in &r.active.config.schedules {
            let mut next = Vec::new();
            let mut t = now;
            while next.len() < NEXT_FIRES {
                match s.cron.next_after(t, s.timezone.tz()) {
                    Some(n) => {
                        next.push(n.to_zoned(s.timezone.tz().clone()).to_string());
                        t = n;
                    }
                    None => break,
                }
            }
            out.push(nimbus_api::ScheduleInfo {
                function: r.name.to_string(),
                cron: s.cron.to_string(),
                timezone: s.timezone.to_string(),
                catch_up: format!("{:?}", s.catch_up).to_ascii_lowercase(),
                last_tick: marks
                    .get(&(r.name.to_string(), s.key()))
                    .map(|&t| nimbus_dispatch::rfc3339(t)),
                next,
            });
        }
    }
    Ok(json_response(StatusCode::OK, &out))
}

fn parse_digest(digest: &str) -> Result<ComponentDigest, ApiError> {
    ComponentDigest::parse(digest).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "bad_digest",
            format!(
                "`{digest}` is not a component digest: expected 64 lowercase hex digits (sha256)"
            ),
        )
    })
}

fn has_component(state: &NodeState, digest: &str) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    if state.engine.has_component(&digest) {
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "digest": digest.as_str() }),
        ))
    } else {
        Err(ApiError::not_found(format!(
            "component {digest} was not uploaded"
        )))
    }
}

async fn upload(
    state: &NodeState,
    digest: &str,
    req: hyper::Request<Incoming>,
) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    // The permit is taken before the body is read, so at most
    // MAX_CONCURRENT_COMPILES uploads are held in memory at once.
    let _permit = state.compiles.acquire().await.map_err(|e| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            e.to_string(),
        )
    })?;
    let bytes = read_body(req, MAX_COMPONENT_BYTES).await?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != digest.as_str() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "digest_mismatch",
            format!(
                "the uploaded bytes have sha256 {actual}, not {digest}: upload the file whose digest is in the URL"
            ),
        ));
    }
    let size = bytes.len() as u64;
    let engine = state.engine.clone();
    let compiled = tokio::task::spawn_blocking(move || engine.compile(&bytes))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match compiled {
        Ok(d) => Ok(json_response(
            StatusCode::CREATED,
            &ComponentInfo {
                digest: d.to_string(),
                size,
            },
        )),
        Err(EngineError::Component(e)) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_component",
            e.to_string(),
        )),
        Err(e) => {
            tracing::error!(error = %e, "storing a component failed");
            Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.to_string(),
            ))
        }
    }
}

async fn deploy(state: &NodeState, req: hyper::Request<Incoming>) -> Result<Response, ApiError> {
    let request: DeployRequest = read_json(req).await?;
    let response = state.deploy(request).await?;
    Ok(json_response(StatusCode::OK, &response))
}

#[cfg(test)]
mod tests {
    use super::{allowed_methods, token_matches};

    /// Every path of `docs/openapi.yaml` that the admin router dispatches
    /// itself, with the methods the spec gives it.
    fn spec_paths() -> Vec<(String, Vec<String>)> {
        let spec = include_str!("../../../docs/openapi.yaml");
        let mut paths: Vec<(String, Vec<String>)> = Vec::new();
        for line in spec.lines() {
            if line.starts_with("components:") {
                break;
            }
            if let Some(path) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                paths.push((path.to_owned(), Vec::new()));
            } else if let Some(method) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':'))
                && ["get", "put", "post", "delete", "head", "patch"].contains(&method)
                && let Some((_, methods)) = paths.last_mut()
            {
                methods.push(method.to_uppercase());
            }
        }
        paths
    }

    #[test]
    fn the_router_takes_the_methods_the_spec_documents() {
        let paths = spec_paths();
        assert!(paths.len() > 20, "{paths:?}");
        for (path, mut documented) in paths {
            // Answered before routing (the probe) or by the buckets module.
            if path == "healthz" || path.starts_with("v1/buckets/") {
                continue;
            }
            let segments: Vec<&str> = path
                .split('/')
                .map(|s| if s.starts_with('{') { "x" } else { s })
                .collect();
            let allowed = allowed_methods(&segments)
                .unwrap_or_else(|| panic!("/{path} is documented but not routed"));
            let mut routed: Vec<String> = allowed.split(", ").map(str::to_owned).collect();
            routed.sort();
            documented.sort();
            assert_eq!(routed, documented, "/{path}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
        assert!(!token_matches(b"", b"abc"));
    }
}
