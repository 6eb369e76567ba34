//! `nimbus-api` defines the admin API's wire types, shared by the node that
//! serves them and the CLI that calls them, and where a local node leaves
//! its address and token for the CLI to find. `docs/openapi.yaml` describes
//! the same API for other clients.

use nimbus_manifest::{AppName, FunctionConfig, FunctionName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// File in the data directory holding the admin bearer token (mode 0600).
pub const TOKEN_FILE: &str = "admin-token";
/// File in the data directory describing the running node.
pub const NODE_FILE: &str = "node.json";
/// Response header carrying the invocation id.
pub const INVOCATION_ID_HEADER: &str = "nimbus-invocation-id";

/// Where a local node listens; written to [`NODE_FILE`] at start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub gateway_url: String,
    pub admin_url: String,
    pub pid: u32,
}

/// `POST /v1/deploy`: the desired state of one app.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub app: AppName,
    pub functions: BTreeMap<FunctionName, DeployFunction>,
}

/// One function of a deploy: its component (uploaded before with
/// `PUT /v1/components/{digest}`) and configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployFunction {
    /// sha256 of the component, as 64 lowercase hex digits.
    pub component: String,
    pub config: FunctionConfig,
}

/// What a deploy did to one function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Created,
    Updated,
    Unchanged,
    Removed,
}

/// One line of a deploy's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeployedFunction {
    pub name: FunctionName,
    pub change: Change,
    /// Active version after the deploy (0 when removed).
    pub version: u64,
    pub routes: Vec<String>,
}

/// `POST /v1/deploy` response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeployResponse {
    pub app: AppName,
    pub functions: Vec<DeployedFunction>,
}

/// `PUT /v1/components/{digest}` response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ComponentInfo {
    pub digest: String,
    pub size: u64,
}

/// A function in listings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FunctionSummary {
    pub name: FunctionName,
    pub app: AppName,
    pub version: u64,
    pub digest: String,
    pub routes: Vec<String>,
    pub config: FunctionConfig,
    /// Unix time in milliseconds of the last change.
    pub updated_at: i64,
    /// Invocations running now.
    pub in_flight: u64,
    /// Whether its code is in memory (false: scaled to zero, or not called
    /// since the node started; the next request loads it).
    #[serde(default)]
    pub loaded: bool,
    /// Instances waiting for a request: reusable ones (with `reuse` above
    /// 1) and ones prepared ahead of the next request.
    #[serde(default)]
    pub idle_instances: u64,
    /// When its code is kept in memory, learnt from its idle times (absent
    /// until they are predictable, or with `--keep-alive fixed`: then
    /// `--scale-to-zero-after` applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<KeepAliveWindow>,
    /// Whether the node could load it (false: see `error`).
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A version in a function's history.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: u64,
    pub digest: String,
    pub created_at: i64,
    pub active: bool,
}

/// `GET /v1/functions/{name}` response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FunctionDetail {
    #[serde(flatten)]
    pub summary: FunctionSummary,
    pub versions: Vec<VersionInfo>,
    /// Health and counters of the function's event sources.
    #[serde(default)]
    pub sources: Vec<SourceHealth>,
}

/// `POST /v1/functions/{name}/rollback` body.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// Version to activate; the one before the active version when absent.
    #[serde(default)]
    pub to: Option<u64>,
}

/// `POST /v1/functions/{name}/invoke` body: a request to run through the
/// function as if it came to the gateway.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeRequest {
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: Option<String>,
}

/// `POST /v1/functions/{name}/invoke` response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InvokeResponse {
    pub invocation_id: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body, as UTF-8 (lossy when `binary` is true).
    pub body: String,
    pub binary: bool,
    pub duration_ms: f64,
}

/// Counters of the engine's compile/load path.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct EngineCounters {
    /// Components compiled since the node started (by the baseline tier,
    /// which serves at once).
    pub compiled: u64,
    /// Optimising compiles finished in the background since the node
    /// started; their code replaces the baseline's.
    #[serde(default)]
    pub optimized: u64,
    /// Compiled artifacts loaded from disk since the node started.
    pub loaded_from_cache: u64,
}

/// A function's learnt keep-alive window, in milliseconds after the start
/// of its last invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepAliveWindow {
    /// Its code is loaded again from here (0: it stays loaded after a
    /// call).
    pub load_at_ms: u64,
    /// Its code leaves memory from here.
    pub unload_at_ms: u64,
}

/// `GET /v1/status` response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub gateway_url: String,
    pub admin_url: String,
    pub data_dir: String,
    pub functions: u64,
    pub functions_failed: u64,
    pub in_flight: u64,
    pub invocations: u64,
    /// Asynchronous invocations waiting, running, and dead-lettered.
    #[serde(default)]
    pub async_queued: u64,
    #[serde(default)]
    pub async_running: u64,
    #[serde(default)]
    pub dead_lettered: u64,
    /// Event sources and their health.
    #[serde(default)]
    pub sources: Vec<SourceHealth>,
    pub engine: EngineCounters,
    pub engine_fingerprint: String,
}

/// Counters of one serving function version, for `nimbus top`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FunctionStats {
    pub function: String,
    pub version: u64,
    pub in_flight: u64,
    pub queued: u64,
    pub async_queued: u64,
    /// ms since the epoch when read.
    pub at: i64,
    pub counters: nimbus_telemetry::Snapshot,
}

/// Health of one event source.
pub use nimbus_sources::SourceStatus as SourceHealth;

/// The answer to an accepted asynchronous invocation (202).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AsyncAccepted {
    pub invocation_id: String,
    pub status: String,
    /// The same Idempotency-Key was seen before: this is the earlier
    /// invocation and nothing new was queued.
    #[serde(default)]
    pub duplicate: bool,
    /// Where to poll the invocation (admin API, needs the token).
    pub location: String,
}

/// A request to redrive dead-lettered invocations.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveRequest {
    /// These invocations; every dead-lettered one of the function when
    /// empty and `all` is set.
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub all: bool,
}

/// One schedule and its next fire times.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScheduleInfo {
    pub function: String,
    pub cron: String,
    pub timezone: String,
    pub catch_up: String,
    /// Last fired tick, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tick: Option<String>,
    /// The next fire times, RFC 3339.
    pub next: Vec<String>,
}

/// Every error of the admin API and the gateway: `{"error": {...}}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

/// The error itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `not_found`, `timeout`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation_id: Option<String>,
}
