//! Asynchronous ingress: requests marked `Nimbus-Invocation-Type: async`
//! and verified webhook deliveries are stored durably and answered 202 with
//! the invocation's id and where to poll it; a function runs them later.

use crate::{Body, Deployed, Gateway, json_error, json_response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use nimbus_api::{AsyncAccepted, INVOCATION_ID_HEADER};
use nimbus_manifest::WebhookPreset;
use nimbus_queue::{BoxFuture, Enqueued, Idempotency, NewInvocation, QueueError, Trigger};
use std::sync::Arc;

/// Header asking for an asynchronous invocation.
pub const INVOCATION_TYPE_HEADER: &str = "nimbus-invocation-type";
/// Header deduplicating submissions.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Largest body stored for an asynchronous invocation: it is kept in the
/// queue until the function succeeds.
pub const MAX_ASYNC_BODY: u64 = 16 << 20;

/// Where accepted asynchronous work goes: the node's queue, which wakes
/// its dispatcher.
pub trait Intake: Send + Sync {
    /// Stores `new` durably, as one trace across its attempts: the one
    /// its `traceparent` carries, or a new one.
    fn accept(&self, new: NewInvocation) -> BoxFuture<'_, Result<Enqueued, QueueError>>;
    /// The URL at which an invocation's status can be polled.
    fn location(&self, id: &str) -> String;
}

/// A `Nimbus-Invocation-Type` that is neither `sync` nor `async`.
#[derive(Debug, thiserror::Error)]
#[error(
    "nimbus-invocation-type `{0}` is neither sync nor async: send `Nimbus-Invocation-Type: async` to queue the request, or leave the header out"
)]
pub struct BadInvocationType(String);

/// Whether the caller asked for an asynchronous invocation
/// (`Nimbus-Invocation-Type: async`; `sync` or no header runs it now).
pub fn wants_async(headers: &HeaderMap) -> Result<bool, BadInvocationType> {
    let Some(value) = headers.get(INVOCATION_TYPE_HEADER) else {
        return Ok(false);
    };
    let text = value.to_str().map(str::trim).unwrap_or_default();
    if text.eq_ignore_ascii_case("async") {
        Ok(true)
    } else if text.eq_ignore_ascii_case("sync") {
        Ok(false)
    } else {
        Err(BadInvocationType(
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        ))
    }
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum ReadError {
    TooLarge(u64),
    Failed(String),
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_limited<B>(headers: &HeaderMap, body: B, limit: u64) -> Result<Bytes, ReadError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ReadError::TooLarge(limit));
    }
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge(limit)),
        Err(e) => Err(ReadError::Failed(e.to_string())),
    }
}

/// Headers never stored with an event: hop-by-hop headers, the framing
/// (recomputed on delivery) and the gateway's own.
fn stored_header(name: &str) -> bool {
    !matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "expect"
            | INVOCATION_TYPE_HEADER
            | INVOCATION_ID_HEADER
    ) && !name.starts_with("nimbus-param-")
        && !matches!(name, "nimbus-route" | "nimbus-path-info")
}

/// Builds the event for a request to `function`.
#[allow(clippy::too_many_arguments)]
pub fn new_invocation(
    function: &str,
    trigger: Trigger,
    method: &http::Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
    idempotency_window: std::time::Duration,
    ce_source: String,
    default_type: &str,
) -> Result<NewInvocation, String> {
    let key = headers
        .get(IDEMPOTENCY_KEY_HEADER)
        .map(|v| {
            v.to_str()
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
                .map(str::to_owned)
                .ok_or_else(|| {
                    format!(
                        "the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                    )
                })
        })
        .transpose()?;
    let ce_type = headers
        .get("ce-type")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .unwrap_or(default_type)
        .to_owned();
    let ce_source = headers
        .get("ce-source")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .unwrap_or(ce_source);
    // The caller's `traceparent` is kept; `Intake::accept` starts a trace
    // for work that came without a valid one.
    let stored: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| stored_header(k.as_str()))
        .filter(|(k, _)| !matches!(k.as_str(), "ce-id" | "ce-specversion" | "ce-time"))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    Ok(NewInvocation {
        function: function.to_owned(),
        target: None,
        trigger,
        method: method.as_str().to_owned(),
        path: path_and_query.to_owned(),
        headers: stored,
        body,
        ce_source,
        ce_type,
        ce_time: None,
        not_before: None,
        idempotency: key.map(|key| Idempotency {
            key,
            window_ms: idempotency_window.as_millis() as i64,
        }),
        parent: None,
        tick: None,
    })
}

/// The 202 answer for an accepted invocation.
pub fn accepted(intake: &dyn Intake, e: &Enqueued) -> hyper::Response<Body> {
    let location = intake.location(&e.id);
    let mut resp = json_response(
        StatusCode::ACCEPTED,
        &AsyncAccepted {
            invocation_id: e.id.clone(),
            status: "queued".into(),
            duplicate: e.duplicate,
            location: location.clone(),
        },
    );
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&e.id) {
        h.insert(INVOCATION_ID_HEADER, v);
    }
    if e.duplicate {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

/// The answer when the queue cannot take the event.
pub fn unavailable(e: &QueueError) -> hyper::Response<Body> {
    tracing::error!(error = %e, "cannot queue an asynchronous invocation");
    let mut resp = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "queue_unavailable",
        format!("the invocation was not accepted: {e}; retry later"),
        None,
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(1));
    resp
}

impl Gateway {
    /// Accepts a request for asynchronous execution: verifies the webhook
    /// signature when the route has one, stores the event, answers 202.
    pub(crate) async fn accept_async(
        &self,
        deployed: &Arc<Deployed>,
        req: hyper::Request<hyper::body::Incoming>,
        route_path: &str,
        webhook: Option<&crate::webhook::Verifier>,
        s3: bool,
    ) -> hyper::Response<Body> {
        let Some(intake) = self.intake.as_deref() else {
            return json_error(
                StatusCode::NOT_IMPLEMENTED,
                "async_unavailable",
                "this node does not run asynchronous invocations",
                None,
            );
        };
        let (parts, body) = req.into_parts();
        let limit = deployed.max_body.min(MAX_ASYNC_BODY);
        let body = match read_limited(&parts.headers, body, limit).await {
            Ok(b) => b,
            Err(ReadError::TooLarge(limit)) => {
                return json_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!(
                        "an asynchronous invocation's body is stored until it runs and may be at most {limit} bytes (limits.max_body, at most 16 MiB)"
                    ),
                    None,
                );
            }
            Err(ReadError::Failed(e)) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("reading the request body failed: {e}"),
                    None,
                );
            }
        };
        let (trigger, default_type) = match webhook {
            Some(verifier) => {
                let now = nimbus_queue::now_ms() / 1000;
                if let Err(rejection) = verifier.verify(&parts.headers, &body, now) {
                    tracing::warn!(
                        target: "nimbus::invocation",
                        function = %deployed.name,
                        route = route_path,
                        trigger = "webhook",
                        status = 401,
                        "webhook refused: {rejection}"
                    );
                    return json_error(
                        StatusCode::UNAUTHORIZED,
                        "bad_signature",
                        format!("webhook signature check failed: {rejection}"),
                        None,
                    );
                }
                (Trigger::Webhook, webhook_type(verifier, &parts.headers))
            }
            None => (Trigger::Http, "nimbus.invocation".to_owned()),
        };
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let mut new = match new_invocation(
            deployed.name.as_str(),
            trigger,
            &parts.method,
            &path,
            &parts.headers,
            body,
            deployed.config.retry.idempotency_window.get(),
            format!("/nimbus/{}{}", trigger.as_str(), route_path),
            &default_type,
        ) {
            Ok(n) => n,
            Err(e) => return json_error(StatusCode::BAD_REQUEST, "bad_request", e, None),
        };
        // GitHub redelivers with the same delivery id: run it once.
        if new.idempotency.is_none()
            && webhook.is_some_and(|v| v.spec().preset == Some(WebhookPreset::Github))
            && let Some(delivery) = parts
                .headers
                .get("x-github-delivery")
                .and_then(|v| v.to_str().ok())
        {
            new.idempotency = Some(Idempotency {
                key: format!("github:{delivery}"),
                window_ms: deployed.config.retry.idempotency_window.get().as_millis() as i64,
            });
        }
        if s3 {
            return accept_object_events(intake, deployed, new).await;
        }
        match intake.accept(new).await {
            Ok(e) => {
                tracing::info!(
                    target: "nimbus::invocation",
                    invocation_id = %e.id,
                    function = %deployed.name,
                    trigger = trigger.as_str(),
                    duplicate = e.duplicate,
                    status = 202,
                    "accepted"
                );
                accepted(intake, &e)
            }
            Err(e) => unavailable(&e),
        }
    }
}

/// Queues one invocation per object change in an S3 event notification
/// (the request `new` carries), each with its own CloudEvents type, source
/// and subject, and answers 202 with their ids.
async fn accept_object_events(
    intake: &dyn Intake,
    deployed: &Deployed,
    new: NewInvocation,
) -> hyper::Response<Body> {
    let Some(events) = nimbus_sources::s3::records(&new.body) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "not_s3_notification",
            "this route takes S3 event notifications: a JSON object with a Records array, as S3 and MinIO send them",
            None,
        );
    };
    // Each record's invocation starts from the request without its body
    // (a notification can be large and hold many records).
    let mut template = new;
    template.body = Bytes::new();
    template
        .headers
        .retain(|(k, _)| k != "content-type" && k != "content-length" && k != "ce-subject");
    let mut ids = Vec::with_capacity(events.len());
    for (i, e) in events.into_iter().enumerate() {
        let mut one = template.clone();
        one.ce_type = e.kind.to_owned();
        one.ce_source = format!("s3://{}", e.bucket);
        one.headers.extend([
            ("content-type".to_owned(), "application/json".to_owned()),
            ("ce-subject".to_owned(), e.key.clone()),
        ]);
        // A redelivered notification queues each record once.
        if let Some(idem) = &mut one.idempotency {
            idem.key = format!("{}#{i}", idem.key);
        }
        one.body = serde_json::to_vec(&e.to_json()).unwrap_or_default().into();
        match intake.accept(one).await {
            Ok(q) => {
                tracing::info!(
                    target: "nimbus::invocation",
                    invocation_id = %q.id,
                    function = %deployed.name,
                    trigger = template.trigger.as_str(),
                    event = e.kind,
                    status = 202,
                    "accepted"
                );
                ids.push(q.id);
            }
            Err(err) => return unavailable(&err),
        }
    }
    json_response(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "invocation_ids": ids, "status": "queued" }),
    )
}

/// The CloudEvents type of a verified webhook delivery.
fn webhook_type(verifier: &crate::webhook::Verifier, headers: &HeaderMap) -> String {
    match verifier.spec().preset {
        Some(WebhookPreset::Github) => headers
            .get("x-github-event")
            .and_then(|v| v.to_str().ok())
            .filter(|e| e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            .map_or_else(
                || "com.github.webhook".into(),
                |e| format!("com.github.{e}"),
            ),
        Some(WebhookPreset::Stripe) => "com.stripe.webhook".into(),
        None => "nimbus.webhook".into(),
    }
}
