//! Spans: the timed steps of an invocation (the request at the gateway,
//! admission, instantiation, execution). The gateway hands each finished
//! invocation's facts ([`Invocation`]) to a [`SpanSink`], which keeps them
//! ([`RecentSpans`], for the dashboard) or exports them (OTLP,
//! `nimbus-otlp`); the span records are built from the facts only then, off
//! the request path. Their ids are the ones the trace context carries, so a
//! span a function or a caller records with the propagated `traceparent`
//! joins the same tree.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

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

/// Where finished invocations' spans go. Recording must never block an
/// invocation: a sink that cannot keep up drops them (and counts them).
pub trait SpanSink: Send + Sync {
    fn record(&self, invocation: Arc<Invocation>);
}

/// What the gateway knows about one finished invocation.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub trace_id: [u8; 16],
    /// The invocation's span: the parent the function saw.
    pub span_id: [u8; 8],
    /// The caller's span, when it sent a trace context.
    pub parent: Option<[u8; 8]>,
    pub id: Arc<str>,
    pub function: Arc<str>,
    pub version: u64,
    /// `http`, `webhook`, `schedule`, `source`, `bucket`, `api`...
    pub trigger: &'static str,
    pub attempt: Option<u32>,
    pub method: std::borrow::Cow<'static, str>,
    pub path: String,
    /// The response status; none when the function failed before one.
    pub status: Option<u16>,
    pub cold: bool,
    /// When the attempt reached the gateway.
    pub start: SystemTime,
    /// How long the work waited before that (in the queue, or at the
    /// broker); the invocation's span begins when the wait did.
    pub queued: Duration,
    /// Waiting for an admission slot.
    pub admitted: Duration,
    /// Creating the instance (zero when unknown: a failed invocation).
    pub instantiate: Duration,
    /// Until the response was sent (or the failure answered).
    pub elapsed: Duration,
    pub error: Option<String>,
}

/// A method's name without a copy for the common ones.
pub fn method_name(method: &str) -> std::borrow::Cow<'static, str> {
    const COMMON: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
    match COMMON.iter().find(|m| **m == method) {
        Some(m) => std::borrow::Cow::Borrowed(m),
        None => std::borrow::Cow::Owned(method.to_owned()),
    }
}

/// A step's span id: derived from the invocation's, so building the spans
/// twice (dashboard and export) gives the same ids, without randomness on
/// the request path.
fn step_id(of: [u8; 8], step: u8) -> [u8; 8] {
    let mixed = u64::from_be_bytes(of) ^ (u64::from(step)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let id = if mixed == 0 { 1 } else { mixed };
    id.to_be_bytes()
}

impl Invocation {
    /// The invocation's span and its steps: the wait (when there was one),
    /// admission, instantiation, execution.
    pub fn spans(&self) -> Vec<SpanRecord> {
        let at = |d: Duration| self.start + d;
        let exec_start = (self.admitted + self.instantiate).min(self.elapsed);
        // OpenTelemetry's FaaS trigger names.
        let faas_trigger = match self.trigger {
            "http" | "webhook" => "http",
            "schedule" => "timer",
            "source" | "bucket" => "pubsub",
            _ => "other",
        };
        let mut attributes = vec![
            ("faas.invocation_id", Value::Str(self.id.to_string())),
            ("faas.name", Value::Str(self.function.to_string())),
            ("faas.version", Value::Int(self.version as i64)),
            ("faas.trigger", Value::Str(faas_trigger.to_owned())),
            ("faas.coldstart", Value::Bool(self.cold)),
            ("nimbus.trigger", Value::Str(self.trigger.to_owned())),
            ("http.request.method", Value::Str(self.method.to_string())),
            ("url.path", Value::Str(self.path.clone())),
        ];
        if let Some(status) = self.status {
            attributes.push(("http.response.status_code", Value::Int(status.into())));
        }
        if let Some(n) = self.attempt {
            attributes.push(("nimbus.attempt", Value::Int(n.into())));
        }
        let failed = self.error.clone().or_else(|| {
            self.status
                .filter(|s| *s >= 500)
                .map(|s| format!("status {s}"))
        });
        let step =
            |n: u8, name: &str, from: Duration, to: Duration, error: Option<String>| SpanRecord {
                trace_id: self.trace_id,
                span_id: step_id(self.span_id, n),
                parent: Some(self.span_id),
                name: name.to_owned(),
                kind: SpanKind::Internal,
                start: at(from),
                end: at(to.max(from)),
                attributes: Vec::new(),
                error,
            };
        let began = self.start.checked_sub(self.queued).unwrap_or(self.start);
        let mut spans = vec![
            SpanRecord {
                trace_id: self.trace_id,
                span_id: self.span_id,
                parent: self.parent,
                name: format!("{} {}", self.trigger, self.function),
                kind: if faas_trigger == "http" {
                    SpanKind::Server
                } else {
                    SpanKind::Consumer
                },
                start: began,
                end: at(self.elapsed),
                attributes,
                error: failed.clone(),
            },
            step(1, "admission", Duration::ZERO, self.admitted, None),
            step(2, "instantiate", self.admitted, exec_start, None),
            step(3, "execute", exec_start, self.elapsed, failed),
        ];
        if !self.queued.is_zero() {
            spans.insert(
                1,
                SpanRecord {
                    start: began,
                    end: self.start,
                    ..step(4, "queue", Duration::ZERO, Duration::ZERO, None)
                },
            );
        }
        spans
    }
}

/// The latest invocations' spans, kept in memory for the dashboard's
/// timelines; the oldest go first past the capacity.
pub struct RecentSpans {
    invocations: std::sync::Mutex<std::collections::VecDeque<Arc<Invocation>>>,
    capacity: usize,
}

impl RecentSpans {
    pub fn new(capacity: usize) -> Self {
        Self {
            invocations: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(capacity)),
            capacity,
        }
    }

    /// The spans of invocation `id` (each attempt's, for an asynchronous
    /// one), in start order.
    pub fn of_invocation(&self, id: &str) -> Vec<SpanRecord> {
        let Ok(kept) = self.invocations.lock() else {
            return Vec::new();
        };
        let mut out: Vec<SpanRecord> = kept
            .iter()
            .filter(|i| &*i.id == id)
            .flat_map(|i| i.spans())
            .collect();
        out.sort_by_key(|s| s.start);
        out
    }
}

impl SpanSink for RecentSpans {
    fn record(&self, invocation: Arc<Invocation>) {
        if let Ok(mut kept) = self.invocations.lock() {
            if kept.len() == self.capacity {
                kept.pop_front();
            }
            kept.push_back(invocation);
        }
    }
}

/// Hands every invocation to each of several sinks.
pub struct Fanout(pub Vec<Arc<dyn SpanSink>>);

impl SpanSink for Fanout {
    fn record(&self, invocation: Arc<Invocation>) {
        for sink in &self.0 {
            sink.record(invocation.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation(id: &str, span: u8) -> Arc<Invocation> {
        Arc::new(Invocation {
            trace_id: [1; 16],
            span_id: [span; 8],
            parent: Some([9; 8]),
            id: id.into(),
            function: "hello".into(),
            version: 2,
            trigger: "http",
            attempt: None,
            method: "GET".into(),
            path: "/hello".into(),
            status: Some(502),
            cold: true,
            start: SystemTime::now(),
            queued: Duration::ZERO,
            admitted: Duration::from_micros(10),
            instantiate: Duration::from_micros(100),
            elapsed: Duration::from_micros(500),
            error: None,
        })
    }

    #[test]
    fn an_invocation_is_a_span_with_three_steps() {
        let spans = invocation("a", 5).spans();
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["http hello", "admission", "instantiate", "execute"]);
        assert_eq!(spans[0].parent, Some([9; 8]));
        assert_eq!(spans[0].kind, SpanKind::Server);
        assert_eq!(spans[0].error.as_deref(), Some("status 502"));
        for s in &spans[1..] {
            assert_eq!(s.parent, Some([5; 8]));
            assert!(s.start >= spans[0].start && s.end <= spans[0].end);
        }
        // Queued work: the span begins with the wait, a step of its own.
        let mut queued = (*invocation("q", 6)).clone();
        queued.queued = Duration::from_millis(40);
        let spans = queued.spans();
        assert_eq!(spans[1].name, "queue");
        assert_eq!(spans[0].start, spans[1].start);
        assert_eq!(spans[1].end, queued.start);
        let spans = invocation("a", 5).spans();
        // Steps have their own, stable ids.
        let again = invocation("a", 5).spans();
        assert_eq!(spans[3].span_id, again[3].span_id);
        assert_ne!(spans[1].span_id, spans[2].span_id);
        assert_ne!(spans[1].span_id, [5; 8]);
    }

    #[test]
    fn recent_spans_find_an_invocation_and_forget_the_oldest() {
        let recent = RecentSpans::new(2);
        recent.record(invocation("old", 1));
        recent.record(invocation("inv", 2));
        recent.record(invocation("inv", 3));
        assert_eq!(recent.of_invocation("inv").len(), 8, "two attempts");
        assert!(recent.of_invocation("old").is_empty(), "pushed out");
    }
}
