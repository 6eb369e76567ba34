//! The bucket API on the admin listener (put, get, head, list and delete of
//! objects, bodies streamed both ways) and the object events it raises:
//! every write and delete queues one `object.created` / `object.deleted`
//! invocation for each deployed function with a matching bucket trigger,
//! through the same durable queue, retries and dead-letter queue as any
//! asynchronous invocation.
//!
//! A change is answered only after its events are queued. A node that
//! crashes between storing an object and queueing its events never
//! answered the request, so the client's retry raises them.

use crate::state::NodeState;
use futures::{StreamExt as _, TryStreamExt as _};
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt as _, BodyStream, StreamBody};
use hyper::body::{Frame, Incoming};
use nimbus_buckets::{BucketError, BucketName, ObjectInfo, ObjectKey};
use nimbus_gateway::intake::Intake as _;
use nimbus_gateway::{Body, json_error, json_response};
use nimbus_manifest::ObjectChange;
use nimbus_queue::{NewInvocation, Trigger};

/// Largest object the API accepts (S3's limit for one PUT).
pub const MAX_OBJECT_BYTES: u64 = 5 << 30;
/// Most objects one listing page returns.
const MAX_PAGE: usize = 1000;

type Response = hyper::Response<Body>;

fn error(status: StatusCode, code: &'static str, message: String) -> Response {
    json_error(status, code, message, None)
}

fn store_error(e: BucketError) -> Response {
    match e {
        BucketError::TooLarge(max) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "object_too_large",
            format!("the object is larger than the limit of {max} bytes; nothing was stored"),
        ),
        BucketError::Body(e) => error(
            StatusCode::BAD_REQUEST,
            "body_failed",
            format!("reading the object's body failed: {e}; nothing was stored"),
        ),
        BucketError::Backend(e) => {
            tracing::error!(error = %e, "the object store failed");
            let mut resp = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("the object store failed: {e}; retry later"),
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1));
            resp
        }
    }
}

/// Serves `/v1/buckets/{bucket}/objects[/{key...}]`.
pub async fn handle(
    state: &NodeState,
    method: &Method,
    bucket: &str,
    req: hyper::Request<Incoming>,
) -> Response {
    let bucket = match bucket.parse::<BucketName>() {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_bucket", e.to_string()),
    };
    // The key is the rest of the path as sent, so a trailing or doubled
    // `/` is refused rather than silently dropped.
    let base = format!("/v1/buckets/{bucket}/objects");
    let raw = req
        .uri()
        .path()
        .strip_prefix(base.as_str())
        .map(|r| r.strip_prefix('/').unwrap_or(r))
        .unwrap_or_default()
        .to_owned();
    if raw.is_empty() {
        return match *method {
            Method::GET => list(state, bucket, &req).await,
            _ => crate::admin::method_not_allowed(method, req.uri().path(), "GET"),
        };
    }
    let key = match nimbus_gateway::router::percent_decode(&raw).parse::<ObjectKey>() {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_key", e.to_string()),
    };
    match *method {
        Method::PUT => put(state, bucket, key, req).await,
        Method::GET => get(state, bucket, key, &req, false).await,
        Method::HEAD => get(state, bucket, key, &req, true).await,
        Method::DELETE => delete(state, bucket, key).await,
        _ => crate::admin::method_not_allowed(method, req.uri().path(), "PUT, GET, HEAD, DELETE"),
    }
}

async fn put(
    state: &NodeState,
    bucket: BucketName,
    key: ObjectKey,
    req: hyper::Request<Incoming>,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_OBJECT_BYTES) {
        return store_error(BucketError::TooLarge(MAX_OBJECT_BYTES));
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = BodyStream::new(req.into_body())
        .try_filter_map(|frame| futures::future::ready(Ok(frame.into_data().ok())))
        .map_err(std::io::Error::other)
        .boxed();
    let info = match state
        .buckets
        .put(bucket.clone(), key, content_type, body, MAX_OBJECT_BYTES)
        .await
    {
        Ok(info) => info,
        Err(e) => return store_error(e),
    };
    changed(
        state,
        &bucket,
        info,
        ObjectChange::Created,
        StatusCode::CREATED,
    )
    .await
}

async fn delete(state: &NodeState, bucket: BucketName, key: ObjectKey) -> Response {
    match state.buckets.delete(bucket.clone(), key.clone()).await {
        Ok(Some(info)) => {
            changed(state, &bucket, info, ObjectChange::Deleted, StatusCode::OK).await
        }
        Ok(None) => not_found(&bucket, &key),
        Err(e) => store_error(e),
    }
}

fn not_found(bucket: &BucketName, key: &ObjectKey) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no_such_object",
        format!("bucket `{bucket}` has no object `{key}`"),
    )
}

/// Queues the change's events and answers with the object and their ids.
async fn changed(
    state: &NodeState,
    bucket: &BucketName,
    info: ObjectInfo,
    change: ObjectChange,
    status: StatusCode,
) -> Response {
    let ids = match raise(state, bucket, &info, change).await {
        Ok(ids) => ids,
        Err(e) => return nimbus_gateway::intake::unavailable(&e),
    };
    let mut body = serde_json::to_value(&info).unwrap_or_default();
    if let Some(o) = body.as_object_mut() {
        o.insert("bucket".into(), bucket.as_str().into());
        o.insert("invocation_ids".into(), ids.into());
    }
    let mut resp = json_response(status, &body);
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", info.etag)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// Queues one invocation per deployed function whose trigger matches.
async fn raise(
    state: &NodeState,
    bucket: &BucketName,
    info: &ObjectInfo,
    change: ObjectChange,
) -> Result<Vec<String>, nimbus_queue::QueueError> {
    let table = state.gateway.table();
    let watchers: Vec<String> = table
        .functions()
        .filter(|d| {
            d.config
                .buckets
                .iter()
                .any(|t| t.matches(bucket.as_str(), &info.key, change))
        })
        .map(|d| d.name.to_string())
        .collect();
    let mut ids = Vec::with_capacity(watchers.len());
    for function in watchers {
        let new = object_event(&function, bucket, info, change);
        let queued = state.intake.accept(new).await?;
        tracing::info!(
            target: "nimbus::invocation",
            invocation_id = %queued.id,
            function = %function,
            trigger = "bucket",
            event = change.ce_type(),
            bucket = %bucket,
            key = %info.key,
            status = 202,
            "accepted"
        );
        ids.push(queued.id);
    }
    Ok(ids)
}

/// The invocation that tells `function` about a change: the same body as
/// an S3 notification's record gives, so one handler serves both.
fn object_event(
    function: &str,
    bucket: &BucketName,
    info: &ObjectInfo,
    change: ObjectChange,
) -> NewInvocation {
    let event = nimbus_sources::s3::ObjectEvent {
        kind: change.ce_type(),
        bucket: bucket.to_string(),
        key: info.key.clone(),
        size: (change == ObjectChange::Created).then_some(info.size),
        etag: Some(info.etag.clone()),
        event: match change {
            ObjectChange::Created => "ObjectCreated:Put",
            ObjectChange::Deleted => "ObjectRemoved:Delete",
        }
        .to_owned(),
        time: Some(
            jiff::Timestamp::from_millisecond(nimbus_queue::now_ms())
                .map(|t| t.to_string())
                .unwrap_or_default(),
        ),
    };
    NewInvocation {
        function: function.to_owned(),
        target: None,
        trigger: Trigger::Bucket,
        method: "POST".into(),
        path: "/".into(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("ce-subject".into(), info.key.clone()),
        ],
        body: serde_json::to_vec(&event.to_json())
            .unwrap_or_default()
            .into(),
        ce_source: format!("/nimbus/bucket/{bucket}"),
        ce_type: change.ce_type().to_owned(),
        ce_time: None,
        not_before: None,
        idempotency: None,
        parent: None,
        tick: None,
    }
}

/// An HTTP date (`Last-Modified`).
fn http_date(ms: i64) -> Option<String> {
    let t = jiff::Timestamp::from_millisecond(ms).ok()?;
    Some(
        t.to_zoned(jiff::tz::TimeZone::UTC)
            .strftime("%a, %d %b %Y %H:%M:%S GMT")
            .to_string(),
    )
}

fn object_headers(resp: &mut Response, info: &ObjectInfo) {
    let h = resp.headers_mut();
    let ct = info
        .content_type
        .as_deref()
        .unwrap_or("application/octet-stream");
    if let Ok(v) = HeaderValue::from_str(ct) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", info.etag)) {
        h.insert(header::ETAG, v);
    }
    if let Some(v) = http_date(info.modified_ms).and_then(|d| HeaderValue::from_str(&d).ok()) {
        h.insert(header::LAST_MODIFIED, v);
    }
}

async fn get(
    state: &NodeState,
    bucket: BucketName,
    key: ObjectKey,
    req: &hyper::Request<Incoming>,
    head_only: bool,
) -> Response {
    let result = if head_only {
        state
            .buckets
            .head(bucket.clone(), key.clone())
            .await
            .map(|o| o.map(|info| (info, None)))
    } else {
        state
            .buckets
            .get(bucket.clone(), key.clone())
            .await
            .map(|o| o.map(|o| (o.info, Some(o.body))))
    };
    let (info, stream) = match result {
        Ok(Some(found)) => found,
        Ok(None) => return not_found(&bucket, &key),
        Err(e) => return store_error(e),
    };
    let unchanged = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .any(|t| t.trim() == "*" || t.trim().trim_matches('"') == info.etag)
        });
    let mut resp = if unchanged {
        let mut r = hyper::Response::new(nimbus_gateway::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let body = match stream {
            Some(s) => StreamBody::new(s.map_ok(Frame::data)).boxed_unsync(),
            None => nimbus_gateway::empty(),
        };
        let mut r = hyper::Response::new(body);
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
        r
    };
    object_headers(&mut resp, &info);
    resp
}

async fn list(state: &NodeState, bucket: BucketName, req: &hyper::Request<Incoming>) -> Response {
    let param = |k| crate::admin::query_value(req, k);
    let limit = match crate::admin::limit_param(req, MAX_PAGE) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let prefix = param("prefix").unwrap_or_default();
    let after = param("after").filter(|a| !a.is_empty());
    match state
        .buckets
        .list(bucket.clone(), prefix, after, limit)
        .await
    {
        Ok(listing) => {
            let mut body = serde_json::to_value(&listing).unwrap_or_default();
            if let Some(o) = body.as_object_mut() {
                o.insert("bucket".into(), bucket.as_str().into());
            }
            json_response(StatusCode::OK, &body)
        }
        Err(e) => store_error(e),
    }
}
