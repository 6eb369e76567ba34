//! Several broker messages per invocation (`events_per_invocation` above 1).
//!
//! Each message still runs its own attempts, with its own retry policy,
//! dead-letter copy and acknowledgement; only the attempt itself is shared.
//! An attempt joins the source's waiting line; a runner task (at most
//! `invocations` at once) takes up to `events` waiting attempts and runs
//! them as one invocation whose body is a CloudEvents batch
//! (`application/cloudevents-batch+json`: a JSON array of events in
//! structured mode). A batch starts at once when none of the
//! source runs, and another only once enough events wait: a whole batch's
//! worth with one running, half of it with two, and so on. So a quiet
//! source invokes at once with what it has and no event waits longer than
//! the invocations before it, a busy source fills its batches instead of
//! spreading what waits over every free slot, and a source that can hold
//! fewer messages than a batch (a broker's in-flight limit) still runs
//! several batches at once.
//!
//! The function answers for the whole batch: a success status settles
//! every event, unless the body lists some as failed the way AWS Lambda's
//! partial batch responses do (`{"batchItemFailures": [{"itemIdentifier":
//! "<event id>"}]}`); those are retried (or dead-lettered) alone, the rest
//! are done. A failure status, a trap or a timeout fails every event of
//! the batch.

use crate::dispatcher::{Dispatcher, Which, build_batch_request};
use base64::Engine as _;
use nimbus_gateway::Deployed;
use nimbus_queue::{Claimed, StoredResponse};
use std::collections::{HashSet, VecDeque};
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// What one attempt came to: the status, an error and the response kept.
pub(crate) type AttemptResult = (Option<u16>, Option<String>, Option<StoredResponse>);

/// The media type of a CloudEvents batch.
pub(crate) const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// Why an event the function listed in `batchItemFailures` failed.
const REPORTED_FAILED: &str = "the function reported this event as failed (batchItemFailures)";

/// One source's attempts waiting to be invoked together.
pub(crate) struct Batching {
    events: usize,
    invocations: usize,
    line: Mutex<Line>,
}

#[derive(Default)]
struct Line {
    waiting: VecDeque<Waiting>,
    /// Invocations running now.
    running: usize,
}

struct Waiting {
    id: String,
    attempt: u32,
    created_at: i64,
    traceparent: Option<String>,
    /// The event in structured mode, rendered by its own task.
    event: Vec<u8>,
    answer: oneshot::Sender<AttemptResult>,
}

/// Frees an invocation's slot when it ends, however it ends.
struct Running(Arc<Batching>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut line) = self.0.line.lock() {
            line.running -= 1;
        }
    }
}

impl Batching {
    pub(crate) fn new(events: u32, invocations: u32) -> Self {
        Self {
            events: events.max(1) as usize,
            invocations: invocations.max(1) as usize,
            line: Mutex::new(Line::default()),
        }
    }

    /// Events per invocation and invocations at once.
    pub(crate) fn shape(&self) -> (u32, u32) {
        (self.events as u32, self.invocations as u32)
    }

    /// The next batch, if one may start now: a slot is free and either
    /// nothing runs (so nothing waits longer than it must) or, with `r`
    /// batches running, `events / (r + 1)` wait (so a busy source fills its
    /// batches instead of spreading what waits over every free slot).
    fn next_batch(self: &Arc<Self>) -> Option<(Running, Vec<Waiting>)> {
        let mut line = self.line.lock().ok()?;
        let may_start = line.running < self.invocations
            && !line.waiting.is_empty()
            && (line.running == 0 || line.waiting.len() >= self.events.div_ceil(line.running + 1));
        if !may_start {
            return None;
        }
        line.running += 1;
        let take = line.waiting.len().min(self.events);
        let batch = line.waiting.drain(..take).collect();
        Some((Running(self.clone()), batch))
    }

    /// Attempt `n` of `c`, in whichever batch takes it. The attempt
    /// waits in the line; if a batch may start now, a runner task starts
    /// with it and goes on with the next ones as long as they may start, so
    /// every batch that ends is followed by a look at what waits, and no
    /// waiting task needs waking but the ones whose events are done.
    pub(crate) async fn attempt(
        self: &Arc<Self>,
        dispatcher: &Arc<Dispatcher>,
        c: &Claimed,
        n: u32,
    ) -> AttemptResult {
        let (answer, mine) = oneshot::channel();
        let mut event = Vec::with_capacity(c.body.len() + 512);
        write_structured(&mut event, c, n);
        if let Ok(mut line) = self.line.lock() {
            line.waiting.push_back(Waiting {
                id: c.id.clone(),
                attempt: n,
                created_at: c.created_at,
                traceparent: c
                    .headers
                    .iter()
                    .find(|(k, _)| k == nimbus_telemetry::trace::TRACEPARENT)
                    .map(|(_, v)| v.clone()),
                event,
                answer,
            });
        }
        if let Some(first) = self.next_batch() {
            tokio::spawn(run(self.clone(), dispatcher.clone(), c.clone(), first));
        }
        mine.await.unwrap_or_else(|_| {
            (
                None,
                Some("the invocation carrying this event was cancelled".to_owned()),
                None,
            )
        })
    }
}

/// Runs batches of `line` for `lead`'s function and route, starting with
/// `first`, until none may start. Each batch runs the function's version
/// serving when it starts.
async fn run(
    line: Arc<Batching>,
    dispatcher: Arc<Dispatcher>,
    lead: Claimed,
    first: (Running, Vec<Waiting>),
) {
    let mut next = Some(first);
    while let Some((running, batch)) = next {
        let results = match dispatcher.deployed(&lead.function) {
            Some(deployed) => dispatcher.invoke_batch(&deployed, &lead, &batch).await,
            None => batch
                .iter()
                .map(|_| (None, Some("the function is not serving".to_owned()), None))
                .collect(),
        };
        for (w, result) in batch.into_iter().zip(results) {
            let _ = w.answer.send(result);
        }
        drop(running);
        next = line.next_batch();
    }
}

/// Attempt `n` of `c` as an event in structured mode (CloudEvents' JSON
/// format), written to `out`: its attributes, its extensions (the source's
/// `ce-` headers and the trace context), the attempt (`nimbusattempt`) and
/// its data: JSON as it is, other text as a string, anything else in
/// base64. Written directly rather than through a `serde_json::Value`: the
/// data is copied once, and nothing else is allocated.
fn write_structured(out: &mut Vec<u8>, c: &Claimed, n: u32) {
    fn text(out: &mut Vec<u8>, s: &str) {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
    fn field(out: &mut Vec<u8>, name: &str, value: &str) {
        out.push(b',');
        text(out, name);
        out.push(b':');
        text(out, value);
    }
    out.extend_from_slice(br#"{"specversion":"1.0""#);
    field(out, "id", &c.id);
    field(out, "source", &c.ce_source);
    field(out, "type", &c.ce_type);
    out.extend_from_slice(br#","time":""#);
    // RFC 3339 needs no escaping.
    if let Ok(t) = jiff::Timestamp::from_millisecond(c.ce_time) {
        let _ = write!(out, "{t}");
    }
    out.push(b'"');
    let mut content_type = None;
    let mut written: Vec<&str> = Vec::new();
    for (k, v) in &c.headers {
        let name = if k.eq_ignore_ascii_case("content-type") {
            content_type = Some(v.as_str());
            "datacontenttype"
        } else if k == "traceparent" || k == "tracestate" {
            k.as_str()
        } else if let Some(name) = k.strip_prefix("ce-") {
            let core = ["specversion", "id", "source", "type", "time"];
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            if !valid || core.contains(&name) {
                continue;
            }
            name
        } else {
            continue;
        };
        // The first of a repeated header, as a JSON object has each name
        // once.
        if !written.contains(&name) {
            written.push(name);
            field(out, name, v);
        }
    }
    let _ = write!(out, r#","nimbusattempt":{n}"#);
    let json = content_type.is_some_and(|t| {
        let t = t.split(';').next().unwrap_or_default().trim();
        t.eq_ignore_ascii_case("application/json") || t.ends_with("+json")
    });
    if json && serde_json::from_slice::<serde::de::IgnoredAny>(&c.body).is_ok() {
        out.extend_from_slice(br#","data":"#);
        out.extend_from_slice(&c.body);
    } else if let Ok(body) = std::str::from_utf8(&c.body) {
        field(out, "data", body);
    } else {
        let encoded = base64::engine::general_purpose::STANDARD.encode(&c.body);
        field(out, "data_base64", &encoded);
    }
    out.push(b'}');
}

/// The ids a successful batch's response lists as failed, the way AWS
/// Lambda's partial batch responses do. A body that is not such a report
/// lists none.
pub(crate) fn reported_failures(body: &str) -> HashSet<String> {
    #[derive(serde::Deserialize)]
    struct Report {
        #[serde(rename = "batchItemFailures")]
        failures: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(rename = "itemIdentifier")]
        id: String,
    }
    serde_json::from_str::<Report>(body)
        .map(|r| r.failures.into_iter().map(|i| i.id).collect())
        .unwrap_or_default()
}

impl Dispatcher {
    /// Runs `batch` as one invocation, under the first event's id, and
    /// says what became of each event; the request carries the first
    /// event's trace context. `lead` is the event whose attempt started
    /// the runner (it may have gone in an earlier batch): the batch's
    /// function and route are its.
    async fn invoke_batch(
        &self,
        deployed: &Arc<Deployed>,
        lead: &Claimed,
        batch: &[Waiting],
    ) -> Vec<AttemptResult> {
        let Some(first) = batch.first() else {
            return Vec::new();
        };
        let mut body =
            Vec::with_capacity(batch.iter().map(|w| w.event.len() + 1).sum::<usize>() + 1);
        body.push(b'[');
        for (i, w) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&w.event);
        }
        body.push(b']');
        let which = Which {
            id: &first.id,
            n: first.attempt,
            created_at: first.created_at,
        };
        let (status, error, response) =
            match build_batch_request(lead, first.traceparent.as_deref(), body) {
                Ok(request) => self.send(deployed, request, lead, which).await,
                Err(e) => (None, Some(e), None),
            };
        let succeeded = status.is_some_and(|s| s < 400);
        let failed = match (&response, succeeded) {
            (Some(r), true) => reported_failures(&r.body),
            _ => HashSet::new(),
        };
        batch
            .iter()
            .map(|w| {
                if !succeeded {
                    (status, error.clone(), response.clone())
                } else if failed.contains(&w.id) {
                    (None, Some(REPORTED_FAILED.to_owned()), response.clone())
                } else {
                    // What a success returned is not kept.
                    (status, None, None)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_queue::Trigger;

    fn event(id: &str, headers: &[(&str, &str)], body: &[u8]) -> Claimed {
        Claimed {
            id: id.into(),
            function: "f".into(),
            target: None,
            trigger: Trigger::Source,
            method: "POST".into(),
            path: "/".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: bytes::Bytes::copy_from_slice(body),
            ce_source: "redis://h:6379/0/orders".into(),
            ce_type: "redis.stream.entry".into(),
            ce_time: 1_700_000_000_000,
            created_at: 0,
            age_from: 0,
            attempt: 0,
            attempts_total: 0,
            parent: None,
        }
    }

    fn structured(c: &Claimed, n: u32) -> serde_json::Value {
        let mut out = Vec::new();
        write_structured(&mut out, c, n);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn events_are_structured_with_their_extensions_and_data() {
        let json = event(
            "1-0",
            &[
                ("content-type", "application/json"),
                ("ce-redisstream", "orders"),
                ("ce-id", "shadowed"),
                ("ce-not-an-attribute", "x"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("mqtt-property-k", "v"),
            ],
            br#"{"sku":"tea"}"#,
        );
        assert_eq!(
            structured(&json, 2),
            serde_json::json!({
                "specversion": "1.0",
                "id": "1-0",
                "source": "redis://h:6379/0/orders",
                "type": "redis.stream.entry",
                "time": "2023-11-14T22:13:20Z",
                "datacontenttype": "application/json",
                "redisstream": "orders",
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "nimbusattempt": 2,
                "data": {"sku": "tea"},
            })
        );
        // Text that claims to be JSON but is not stays text; bytes that are
        // not UTF-8 go in base64.
        let text = structured(
            &event("a", &[("content-type", "application/json")], b"{no"),
            1,
        );
        assert_eq!(text["data"], "{no");
        let bytes = structured(&event("b", &[], &[0xff, 0x00]), 1);
        assert_eq!(bytes["data_base64"], "/wA=");
        assert!(bytes.get("data").is_none());
    }

    #[test]
    fn batches_start_at_once_when_idle_and_fill_when_busy() {
        let line = Arc::new(Batching::new(8, 3));
        let wait = |n: usize| {
            let mut l = line.line.lock().unwrap();
            for _ in 0..n {
                let (answer, _) = oneshot::channel();
                l.waiting.push_back(Waiting {
                    id: String::new(),
                    attempt: 1,
                    created_at: 0,
                    traceparent: None,
                    event: Vec::new(),
                    answer,
                });
            }
        };
        let sizes = |b: &Option<(Running, Vec<Waiting>)>| b.as_ref().map(|(_, w)| w.len());
        assert!(line.next_batch().is_none(), "nothing waits");
        // Nothing runs: one event goes at once.
        wait(1);
        let first = line.next_batch();
        assert_eq!(sizes(&first), Some(1));
        // One runs: another starts with half a batch (8 / 2), not before.
        wait(3);
        assert!(line.next_batch().is_none());
        wait(1);
        let second = line.next_batch();
        assert_eq!(sizes(&second), Some(4));
        // Two run: a third once 3 wait (8 / 3, rounded up), at most 8.
        wait(2);
        assert!(line.next_batch().is_none());
        wait(10);
        let third = line.next_batch();
        assert_eq!(sizes(&third), Some(8));
        // Every slot is taken: the rest waits for one to end.
        assert!(line.next_batch().is_none());
        drop(first);
        assert_eq!(sizes(&line.next_batch()), Some(4));
        drop((second, third));
        assert_eq!(line.line.lock().unwrap().running, 0);
    }

    #[test]
    fn partial_batch_responses_name_the_failed_events() {
        let failed = reported_failures(
            r#"{"batchItemFailures": [{"itemIdentifier": "2-0"}, {"itemIdentifier": "7-0"}]}"#,
        );
        assert_eq!(failed, HashSet::from(["2-0".to_owned(), "7-0".to_owned()]));
        // Anything else reports no failure.
        for body in ["ok", "", "{}", r#"{"batchItemFailures": "2-0"}"#, "[]"] {
            assert!(reported_failures(body).is_empty(), "{body}");
        }
    }
}
