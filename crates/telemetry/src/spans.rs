//! Spans: the timed steps of an invocation (the request at the gateway,
//! admission, instantiation, execution) as plain records, handed to a
//! [`SpanSink`] that exports them (OTLP, `nimbus-otlp`). Their ids are the
//! ones the trace context carries, so a span a function or a caller records
//! with the propagated `traceparent` joins the same tree.

use std::time::SystemTime;

/// What a span stands for, as OpenTelemetry names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// Work a request from outside started.
    Server,
    /// A step inside the node.
    Internal,
    /// Work a queue or a broker handed over.
    Consumer,
}

/// An attribute's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The span this one is part of; none for a trace's root.
    pub parent: Option<[u8; 8]>,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// Where finished spans go. Recording must never block an invocation: a
/// sink that cannot keep up drops spans (and counts them).
pub trait SpanSink: Send + Sync {
    fn record(&self, span: SpanRecord);
}

/// A fresh span id.
pub fn span_id() -> [u8; 8] {
    crate::trace::TraceContext::root().span_id
}
