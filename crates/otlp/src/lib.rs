//! `nimbus-otlp` owns the export of the node's spans over OTLP, through
//! the OpenTelemetry SDK's exporter: protobuf over HTTP (`/v1/traces`) or
//! gRPC. [`OtlpSink`] is the node's [`SpanSink`]: recording an invocation
//! is a non-blocking send on a bounded channel (a full channel drops it
//! and counts it, so a slow collector never slows an invocation); a task
//! builds its spans, batches them (up to [`BATCH`], or every
//! [`FLUSH_EVERY`]) and exports them, keeping the span and trace ids Nimbus
//! propagated.

use nimbus_telemetry::spans::{Invocation, SpanKind as Kind, SpanRecord, SpanSink, Value};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Invocations waiting for export at most; more are dropped.
pub const QUEUE: usize = 4096;
/// Spans per export request at most.
pub const BATCH: usize = 512;
/// Longest a recorded span waits before it is exported.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Longest one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How spans travel to the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Protobuf over HTTP, to `<endpoint>/v1/traces` (port 4318 by
    /// convention).
    Http,
    /// gRPC (port 4317 by convention).
    Grpc,
}

impl std::str::FromStr for Protocol {
    type Err = OtlpError;
    fn from_str(s: &str) -> Result<Self, OtlpError> {
        match s {
            "http" | "http/protobuf" => Ok(Self::Http),
            "grpc" => Ok(Self::Grpc),
            other => Err(OtlpError::Config(format!(
                "unknown OTLP protocol `{other}`: use http (protobuf over HTTP) or grpc"
            ))),
        }
    }
}

/// Why export cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("{0}")]
    Config(String),
}

/// Sends spans to the export task.
pub struct OtlpSink {
    tx: mpsc::Sender<Arc<Invocation>>,
    dropped: AtomicU64,
}

impl SpanSink for OtlpSink {
    fn record(&self, invocation: Arc<Invocation>) {
        if self.tx.try_send(invocation).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl OtlpSink {
    /// Invocations whose spans were dropped because the export fell
    /// behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Checks the endpoint and starts exporting to it; the task runs until
/// every [`OtlpSink`] is dropped, exporting what is left.
pub fn start(endpoint: &str, protocol: Protocol) -> Result<Arc<OtlpSink>, OtlpError> {
    let bad = || {
        OtlpError::Config(format!(
            "invalid OTLP endpoint `{endpoint}`: write http://HOST:PORT (4318 for http, 4317 for grpc)"
        ))
    };
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(bad)?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad());
    }
    let mut exporter = match protocol {
        Protocol::Http => {
            // A bare endpoint gets the traces path, as the SDK's
            // environment variable does.
            let url = if rest.contains('/') {
                endpoint.to_owned()
            } else {
                format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .with_timeout(EXPORT_TIMEOUT)
                .build()
        }
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build(),
    }
    .map_err(|e| OtlpError::Config(format!("cannot export spans to {endpoint}: {e}")))?;
    exporter.set_resource(
        &Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", "nimbus"),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build(),
    );
    let (tx, mut rx) = mpsc::channel::<Arc<Invocation>>(QUEUE);
    let endpoint = endpoint.to_owned();
    tokio::spawn(async move {
        let scope = InstrumentationScope::builder("nimbus")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let mut batch: Vec<SpanData> = Vec::with_capacity(BATCH);
        loop {
            let first = rx.recv().await;
            let Some(first) = first else { break };
            batch.extend(first.spans().into_iter().map(|s| span_data(s, &scope)));
            let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(next)) => {
                        batch.extend(next.spans().into_iter().map(|s| span_data(s, &scope)));
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let spans = std::mem::take(&mut batch);
            if let Err(e) = exporter.export(spans).await {
                tracing::warn!(endpoint = %endpoint, error = %e, "could not export spans");
            }
        }
        let _ = exporter.shutdown();
    });
    Ok(Arc::new(OtlpSink {
        tx,
        dropped: AtomicU64::new(0),
    }))
}

/// A Nimbus span as the SDK's exporter takes it.
fn span_data(s: SpanRecord, scope: &InstrumentationScope) -> SpanData {
    let context = SpanContext::new(
        TraceId::from_bytes(s.trace_id),
        SpanId::from_bytes(s.span_id),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    );
    SpanData {
        span_context: context,
        parent_span_id: s.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: false,
        span_kind: match s.kind {
            Kind::Server => SpanKind::Server,
            Kind::Internal => SpanKind::Internal,
            Kind::Consumer => SpanKind::Consumer,
        },
        name: s.name.into(),
        start_time: s.start,
        end_time: s.end,
        attributes: s
            .attributes
            .into_iter()
            .map(|(k, v)| match v {
                Value::Str(v) => KeyValue::new(k, v),
                Value::Int(v) => KeyValue::new(k, v),
                Value::Bool(v) => KeyValue::new(k, v),
            })
            .collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match s.error {
            Some(e) => Status::error(e),
            None => Status::Unset,
        },
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_protocols_are_checked() {
        assert!("grpc".parse::<Protocol>().is_ok());
        assert!("zipkin".parse::<Protocol>().is_err());
        assert!(matches!(
            start("localhost:4317", Protocol::Grpc),
            Err(OtlpError::Config(_))
        ));
    }

    #[test]
    fn spans_keep_their_ids() {
        let scope = InstrumentationScope::builder("nimbus").build();
        let now = std::time::SystemTime::now();
        let d = span_data(
            SpanRecord {
                trace_id: [1; 16],
                span_id: [2; 8],
                parent: Some([3; 8]),
                name: "http hello".into(),
                kind: Kind::Server,
                start: now,
                end: now,
                attributes: vec![("faas.coldstart", Value::Bool(true))],
                error: Some("trap".into()),
            },
            &scope,
        );
        assert_eq!(d.span_context.trace_id(), TraceId::from_bytes([1; 16]));
        assert_eq!(d.span_context.span_id(), SpanId::from_bytes([2; 8]));
        assert_eq!(d.parent_span_id, SpanId::from_bytes([3; 8]));
        assert_eq!(d.span_kind, SpanKind::Server);
        assert_eq!(d.attributes.len(), 1);
        assert!(matches!(d.status, Status::Error { .. }));
    }
}
