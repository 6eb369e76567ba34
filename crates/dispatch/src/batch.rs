//! Several broker messages per invocation (`events_per_invocation` above 1).
//!
//! Each message still runs its own attempts, with its own retry policy,
//! dead-letter copy and acknowledgement; only the attempt itself is shared.
//! An attempt joins the source's waiting line; whoever holds one of the
//! source's `invocations` slots takes up to `events` waiting attempts, its
//! own or others', and runs them as one invocation whose body is a
//! CloudEvents batch (`application/cloudevents-batch+json`: a JSON array of
//! events in structured mode). Nothing waits for a batch to fill: a quiet
//! source invokes at once with what it has, a busy one fills its batches
//! while the slots are taken.
//!
//! The function answers for the whole batch: a success status settles
//! every event, unless the body lists some as failed the way AWS Lambda's
//! partial batch responses do (`{"batchItemFailures": [{"itemIdentifier":
//! "<event id>"}]}`); those are retried (or dead-lettered) alone, the rest
//! are done. A failure status, a trap or a timeout fails every event of
//! the batch.

use crate::dispatcher::{Dispatcher, build_batch_request, rfc3339};
use base64::Engine as _;
use nimbus_gateway::Deployed;
use nimbus_queue::{Claimed, StoredResponse};
use serde_json::{Map, Value};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{Semaphore, oneshot};

/// What one attempt came to: the status, an error and the response kept.
pub(crate) type AttemptResult = (Option<u16>, Option<String>, Option<StoredResponse>);

/// The media type of a CloudEvents batch.
pub(crate) const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// Why an event the function listed in `batchItemFailures` failed.
const REPORTED_FAILED: &str = "the function reported this event as failed (batchItemFailures)";

/// One source's attempts waiting to be invoked together.
pub(crate) struct Batching {
    shape: (u32, u32),
    events: usize,
    slots: Semaphore,
    waiting: Mutex<VecDeque<Waiting>>,
}

struct Waiting {
    event: Claimed,
    attempt: u32,
    answer: oneshot::Sender<AttemptResult>,
}

impl Batching {
    pub(crate) fn new(events: u32, invocations: u32) -> Self {
        Self {
            shape: (events, invocations),
            events: events.max(1) as usize,
            slots: Semaphore::new(invocations.max(1) as usize),
            waiting: Mutex::new(VecDeque::new()),
        }
    }

    /// Events per invocation and invocations at once.
    pub(crate) fn shape(&self) -> (u32, u32) {
        self.shape
    }

    /// Attempt `n` of `c`, in whichever batch takes it.
    pub(crate) async fn attempt(
        &self,
        dispatcher: &Dispatcher,
        deployed: &Arc<Deployed>,
        c: &Claimed,
        n: u32,
    ) -> AttemptResult {
        let (answer, mut mine) = oneshot::channel();
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.push_back(Waiting {
                event: c.clone(),
                attempt: n,
                answer,
            });
        }
        let lost = || {
            (
                None,
                Some("the invocation carrying this event was cancelled".to_owned()),
                None,
            )
        };
        loop {
            let slot = tokio::select! {
                biased;
                got = &mut mine => return got.unwrap_or_else(|_| lost()),
                slot = self.slots.acquire() => slot,
            };
            let batch: Vec<Waiting> = match self.waiting.lock() {
                Ok(mut waiting) => {
                    let take = waiting.len().min(self.events);
                    waiting.drain(..take).collect()
                }
                Err(_) => Vec::new(),
            };
            if batch.is_empty() {
                // Another slot's batch took this attempt: its answer comes.
                drop(slot);
                return mine.await.unwrap_or_else(|_| lost());
            }
            let results = dispatcher.invoke_batch(deployed, &batch_view(&batch)).await;
            drop(slot);
            for (w, result) in batch.into_iter().zip(results) {
                let _ = w.answer.send(result);
            }
        }
    }
}

fn batch_view(batch: &[Waiting]) -> Vec<(&Claimed, u32)> {
    batch.iter().map(|w| (&w.event, w.attempt)).collect()
}

/// Attempt `n` of `c` as an event in structured mode (CloudEvents' JSON
/// format): its attributes, its extensions (the source's `ce-` headers and
/// the trace context), the attempt (`nimbusattempt`) and its data: JSON as
/// it is, other text as a string, anything else in base64.
pub(crate) fn structured(c: &Claimed, n: u32) -> Value {
    let mut e = Map::new();
    e.insert("specversion".into(), "1.0".into());
    e.insert("id".into(), c.id.clone().into());
    e.insert("source".into(), c.ce_source.clone().into());
    e.insert("type".into(), c.ce_type.clone().into());
    e.insert("time".into(), rfc3339(c.ce_time).into());
    let mut content_type = None;
    for (k, v) in &c.headers {
        let k = k.to_ascii_lowercase();
        if k == "content-type" {
            content_type = Some(v.as_str());
            e.insert("datacontenttype".into(), v.clone().into());
        } else if k == "traceparent" || k == "tracestate" {
            e.insert(k, v.clone().into());
        } else if let Some(name) = k.strip_prefix("ce-") {
            let core = ["specversion", "id", "source", "type", "time"];
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            if valid && !core.contains(&name) {
                e.insert(name.to_owned(), v.clone().into());
            }
        }
    }
    e.insert("nimbusattempt".into(), n.into());
    let json = content_type.is_some_and(|t| {
        let t = t.split(';').next().unwrap_or_default().trim();
        t.eq_ignore_ascii_case("application/json") || t.ends_with("+json")
    });
    let parsed = json
        .then(|| serde_json::from_slice::<Value>(&c.body).ok())
        .flatten();
    match (parsed, std::str::from_utf8(&c.body)) {
        (Some(data), _) => {
            e.insert("data".into(), data);
        }
        (None, Ok(text)) => {
            e.insert("data".into(), text.into());
        }
        (None, Err(_)) => {
            e.insert(
                "data_base64".into(),
                base64::engine::general_purpose::STANDARD
                    .encode(&c.body)
                    .into(),
            );
        }
    }
    Value::Object(e)
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
    /// Runs `batch` (each event with its attempt number) as one
    /// invocation, and says what became of each event.
    pub(crate) async fn invoke_batch(
        &self,
        deployed: &Arc<Deployed>,
        batch: &[(&Claimed, u32)],
    ) -> Vec<AttemptResult> {
        let Some(&(first, n)) = batch.first() else {
            return Vec::new();
        };
        let body = Value::Array(batch.iter().map(|&(c, n)| structured(c, n)).collect());
        let request = match serde_json::to_vec(&body) {
            Ok(body) => build_batch_request(first, body),
            Err(e) => Err(format!("cannot encode the batch: {e}")),
        };
        let (status, error, response) = match request {
            Ok(request) => self.send(deployed, request, first, n).await,
            Err(e) => (None, Some(e), None),
        };
        let succeeded = status.is_some_and(|s| s < 400);
        let failed = match (&response, succeeded) {
            (Some(r), true) => reported_failures(&r.body),
            _ => HashSet::new(),
        };
        batch
            .iter()
            .map(|&(c, _)| {
                if !succeeded {
                    (status, error.clone(), response.clone())
                } else if failed.contains(&c.id) {
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
