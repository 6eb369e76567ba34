//! S3 event notifications, as S3 and MinIO send them to a broker: each
//! record of a notification becomes one object event for the function
//! (`object.created` or `object.deleted`, with the bucket, key, size and
//! ETag), whatever broker carried it.

use crate::{BoxFuture, Deliver, Message, Verdict};
use serde_json::{Value, json};
use std::sync::Arc;

/// One object change from a notification record.
#[derive(Debug, PartialEq)]
pub struct ObjectEvent {
    /// `object.created` or `object.deleted`.
    pub kind: &'static str,
    pub bucket: String,
    /// The object key, decoded (notifications carry it URL-encoded).
    pub key: String,
    pub size: Option<u64>,
    pub etag: Option<String>,
    /// The notification's own name, e.g. `ObjectCreated:Put`.
    pub event: String,
    pub time: Option<String>,
}

impl ObjectEvent {
    /// The event's body for the function.
    pub fn to_json(&self) -> Value {
        json!({
            "bucket": self.bucket,
            "key": self.key,
            "size": self.size,
            "etag": self.etag,
            "event": self.event,
            "time": self.time,
        })
    }
}

/// A key as S3 writes it in notifications: form-encoded.
fn decode_key(key: &str) -> String {
    crate::wire::decode(&key.replace('+', " "))
}

/// The object events of `body`, or `None` when it is not an S3 event
/// notification. Records of other kinds (reads, restores, test events)
/// are left out.
pub fn records(body: &[u8]) -> Option<Vec<ObjectEvent>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let list = v.get("Records")?.as_array()?;
    Some(
        list.iter()
            .filter_map(|r| {
                let event = r.get("eventName")?.as_str()?;
                let name = event.strip_prefix("s3:").unwrap_or(event);
                let kind = if name.starts_with("ObjectCreated") {
                    "object.created"
                } else if name.starts_with("ObjectRemoved") {
                    "object.deleted"
                } else {
                    return None;
                };
                let s3 = r.get("s3")?;
                let object = s3.get("object")?;
                Some(ObjectEvent {
                    kind,
                    bucket: s3.get("bucket")?.get("name")?.as_str()?.to_owned(),
                    key: decode_key(object.get("key")?.as_str()?),
                    size: object.get("size").and_then(Value::as_u64),
                    etag: object
                        .get("eTag")
                        .and_then(Value::as_str)
                        .map(|e| e.trim_matches('"').to_owned()),
                    event: name.to_owned(),
                    time: r
                        .get("eventTime")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                })
            })
            .collect(),
    )
}

/// How bad a verdict is for the message that carried it: the message is
/// answered with the worst of its records' verdicts.
fn severity(v: &Verdict) -> u8 {
    match v {
        Verdict::Succeeded => 0,
        Verdict::DeadLettered => 1,
        Verdict::RetryAfter(_) => 2,
        Verdict::Retry => 3,
    }
}

/// Delivers each record of a notification as an event of its own.
pub struct S3Events {
    pub inner: Arc<dyn Deliver>,
}

impl Deliver for S3Events {
    fn deliver(&self, message: Message) -> BoxFuture<'_, Verdict> {
        Box::pin(async move {
            let Some(events) = records(&message.body) else {
                tracing::warn!(function = %message.function, source = %message.ce_source, "a message that is not an S3 event notification; passed on as it is");
                return self.inner.deliver(message).await;
            };
            // Each record's event starts from the message without its body
            // (a notification can be large and hold many records).
            let mut template = message;
            template.body = Vec::new();
            template
                .headers
                .retain(|(k, _)| k != "content-type" && k != "ce-subject");
            let mut worst = Verdict::Succeeded;
            for (i, e) in events.into_iter().enumerate() {
                let mut headers = template.headers.clone();
                headers.extend([
                    ("content-type".to_owned(), "application/json".to_owned()),
                    ("ce-subject".to_owned(), e.key.clone()),
                ]);
                let body = e.to_json();
                let verdict = self
                    .inner
                    .deliver(Message {
                        id: format!("{}-{i}", template.id),
                        ce_source: format!("s3://{}", e.bucket),
                        ce_type: e.kind.to_owned(),
                        headers,
                        body: serde_json::to_vec(&body).unwrap_or_default(),
                        ..template.clone()
                    })
                    .await;
                if severity(&verdict) > severity(&worst) {
                    worst = verdict;
                }
            }
            worst
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_become_object_events() {
        // The shape MinIO sends (S3's is the same without the top-level
        // EventName and Key).
        let body = br#"{"EventName":"s3:ObjectCreated:Put","Key":"photos/cat 1.jpg","Records":[
            {"eventVersion":"2.0","eventSource":"minio:s3","eventTime":"2026-11-27T06:00:00.000Z",
             "eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"photos"},
             "object":{"key":"cat+1%2B.jpg","size":2048,"eTag":"\"9b2cf535f27731c974343645a3985328\""}}},
            {"eventSource":"aws:s3","eventName":"ObjectRemoved:Delete",
             "s3":{"bucket":{"name":"photos"},"object":{"key":"old.jpg"}}},
            {"eventSource":"aws:s3","eventName":"ObjectRestore:Completed",
             "s3":{"bucket":{"name":"photos"},"object":{"key":"x"}}}]}"#;
        let events = records(body).unwrap();
        assert_eq!(events.len(), 2, "restores are not object changes");
        assert_eq!(events[0].kind, "object.created");
        assert_eq!(events[0].key, "cat 1+.jpg");
        assert_eq!(events[0].size, Some(2048));
        assert_eq!(
            events[0].etag.as_deref(),
            Some("9b2cf535f27731c974343645a3985328")
        );
        assert_eq!(events[1].kind, "object.deleted");
        assert_eq!(events[1].size, None);
        assert!(records(b"{\"hello\":1}").is_none());
        assert!(records(b"not json").is_none());
        assert_eq!(records(br#"{"Records":[]}"#), Some(vec![]));
    }

    #[test]
    fn the_worst_verdict_answers_the_message() {
        use std::time::Duration;
        let order = [
            Verdict::Succeeded,
            Verdict::DeadLettered,
            Verdict::RetryAfter(Duration::from_secs(1)),
            Verdict::Retry,
        ];
        assert!(order.windows(2).all(|w| severity(&w[0]) < severity(&w[1])));
    }
}
