//! The intake and the dispatcher. Attempts run through the gateway's own
//! invoke path, so admission, limits, metrics and logs are the same as for
//! HTTP requests.

use crate::batch::{AttemptResult, BATCH_CONTENT_TYPE, Batching};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, header};
use http_body_util::BodyExt;
use nimbus_gateway::intake::Intake;
use nimbus_gateway::{Deployed, ERROR_HEADER, Gateway, RouteInfo};
use nimbus_manifest::{Destination, RetryPolicy};
use nimbus_queue::{
    Attempt, BoxFuture, Claimed, Enqueued, NewInvocation, Outcome, Queue, QueueError,
    StoredResponse, Trigger, now_ms,
};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Response bytes kept as an invocation's result.
pub const MAX_RESULT_BYTES: usize = 64 << 10;
/// How often the dispatcher rescans the queue for due work it was not told
/// about (e.g. work of a function that was not deployed when it was
/// queued).
const RESCAN_EVERY_MS: i64 = 30_000;
/// Longest a delivery to a destination URL may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Wake-ups for the dispatcher: which function has work due, and when.
#[derive(Default)]
pub struct Signal {
    due: Mutex<Vec<(String, i64)>>,
    notify: Notify,
}

impl Signal {
    /// Work of `function` is due at `at` (ms).
    pub fn wake(&self, function: &str, at: i64) {
        if let Ok(mut due) = self.due.lock() {
            due.push((function.to_owned(), at));
        }
        self.notify.notify_one();
    }

    fn drain(&self) -> Vec<(String, i64)> {
        self.due
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }
}

/// Stores accepted invocations and wakes the dispatcher.
pub struct NodeIntake {
    pub queue: Arc<dyn Queue>,
    pub signal: Arc<Signal>,
    /// The admin API's base URL, for `Location`.
    pub admin_url: String,
}

impl Intake for NodeIntake {
    fn accept(&self, mut new: NewInvocation) -> BoxFuture<'_, Result<Enqueued, QueueError>> {
        Box::pin(async move {
            traced(&mut new.headers);
            let function = new.function.clone();
            let due = new.not_before.unwrap_or(0);
            let e = self.queue.enqueue(new).await?;
            if !e.duplicate {
                self.signal.wake(&function, due);
            }
            Ok(e)
        })
    }

    fn location(&self, id: &str) -> String {
        format!("{}/v1/invocations/{id}", self.admin_url)
    }
}

/// Work handed over for later (queued, or a broker message) is one trace
/// across its attempts and destinations: the caller's, or, when it sent no
/// valid `traceparent`, one minted here, whose attempts are the trace's
/// root spans.
fn traced(headers: &mut Vec<(String, String)>) {
    use nimbus_telemetry::trace::{TRACEPARENT, TraceContext};
    let valid = headers
        .iter()
        .any(|(k, v)| k == TRACEPARENT && TraceContext::parse(v).is_some());
    if !valid {
        headers.retain(|(k, _)| k != TRACEPARENT);
        headers.push((TRACEPARENT.to_owned(), TraceContext::mint().header()));
    }
}

/// Which attempt an invocation is: the invocation id it runs under, the
/// attempt number, and when the work was accepted.
pub(crate) struct Which<'a> {
    pub id: &'a str,
    pub n: u32,
    pub created_at: i64,
}

/// What the retry policy makes of an attempt.
#[derive(Debug, PartialEq)]
pub(crate) enum Decision {
    Succeeded,
    Retry { at: i64 },
    Failed { reason: String },
}

/// Whether a failed attempt may be retried: no answer, timeouts,
/// throttling and server errors may pass; other client errors will not.
fn retryable(status: Option<u16>) -> bool {
    match status {
        None => true,
        Some(s) => s == 408 || s == 429 || s >= 500,
    }
}

/// Applies `policy` to attempt number `counted` (1-based, counting toward
/// the policy) of an event whose age started at `age_from`.
pub(crate) fn decide(
    policy: &RetryPolicy,
    counted: u32,
    status: Option<u16>,
    error: Option<&str>,
    now: i64,
    age_from: i64,
    jitter: f64,
) -> Decision {
    if status.is_some_and(|s| s < 400) {
        return Decision::Succeeded;
    }
    let what = match (status, error) {
        (Some(s), Some(e)) => format!("status {s} ({e})"),
        (Some(s), None) => format!("status {s}"),
        (None, Some(e)) => e.to_owned(),
        (None, None) => "no answer".to_owned(),
    };
    if !retryable(status) {
        return Decision::Failed {
            reason: format!("not retryable: {what}"),
        };
    }
    if counted >= policy.attempts {
        return Decision::Failed {
            reason: format!(
                "{counted} of {} attempts failed; the last: {what}",
                policy.attempts
            ),
        };
    }
    let at = now + policy.backoff(counted, jitter).as_millis() as i64;
    let max_age = policy.max_age.get().as_millis() as i64;
    if at - age_from > max_age {
        return Decision::Failed {
            reason: format!(
                "expired: the next attempt would come after max_age {} (last: {what})",
                policy.max_age
            ),
        };
    }
    Decision::Retry { at }
}

/// A uniformly random number in [0, 1) for backoff jitter (from the
/// thread's id generator: a decision costs no system call).
fn jitter() -> f64 {
    (nimbus_telemetry::trace::next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// RFC 3339 time of `ms` since the epoch.
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// What became of a broker message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageOutcome {
    Succeeded,
    DeadLettered,
    /// The function is not serving (or the dead-letter copy failed): the
    /// broker should deliver it again.
    NotServing,
    /// The attempt failed and the policy allows another after this long.
    RetryAfter(Duration),
}

/// Runs asynchronous invocations.
pub struct Dispatcher {
    queue: Arc<dyn Queue>,
    gateway: Arc<Gateway>,
    signal: Arc<Signal>,
    running: Mutex<HashMap<String, u32>>,
    idle: Notify,
    /// The waiting lines of sources that batch messages into invocations,
    /// by function and source. Held by the attempts in them only: a line
    /// with nothing waiting or running goes away.
    batching: Mutex<HashMap<String, HashMap<String, std::sync::Weak<Batching>>>>,
}

impl Dispatcher {
    pub fn new(queue: Arc<dyn Queue>, gateway: Arc<Gateway>, signal: Arc<Signal>) -> Self {
        Self {
            queue,
            gateway,
            signal,
            running: Mutex::new(HashMap::new()),
            idle: Notify::new(),
            batching: Mutex::new(HashMap::new()),
        }
    }

    /// The waiting line of `function`'s source `source`: `events` per
    /// invocation, `invocations` at once.
    fn batching(
        &self,
        function: &str,
        source: &str,
        events: u32,
        invocations: u32,
    ) -> Arc<Batching> {
        let Ok(mut lines) = self.batching.lock() else {
            return Arc::new(Batching::new(events, invocations));
        };
        // Looked up by reference: a message costs no key.
        if let Some(line) = lines
            .get(function)
            .and_then(|of| of.get(source))
            .and_then(std::sync::Weak::upgrade)
            && line.shape() == (events.max(1), invocations.max(1))
        {
            return line;
        }
        for of in lines.values_mut() {
            of.retain(|_, line| line.strong_count() > 0);
        }
        lines.retain(|_, of| !of.is_empty());
        let line = Arc::new(Batching::new(events, invocations));
        lines
            .entry(function.to_owned())
            .or_default()
            .insert(source.to_owned(), Arc::downgrade(&line));
        line
    }

    /// The version of `function` serving now.
    pub(crate) fn deployed(&self, function: &str) -> Option<Arc<Deployed>> {
        self.gateway.table().function(function).cloned()
    }

    fn running_of(&self, function: &str) -> u32 {
        self.running
            .lock()
            .map(|r| r.get(function).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn total_running(&self) -> u32 {
        self.running.lock().map(|r| r.values().sum()).unwrap_or(0)
    }

    fn adjust(&self, function: &str, up: bool) {
        if let Ok(mut r) = self.running.lock() {
            let n = r.entry(function.to_owned()).or_insert(0);
            if up {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    r.remove(function);
                }
            }
        }
        if !up {
            self.idle.notify_waiters();
        }
    }

    async fn rescan(&self, due: &mut HashMap<String, BinaryHeap<Reverse<i64>>>) {
        match self.queue.pending().await {
            Ok(pending) => {
                for (function, at) in pending {
                    due.entry(function).or_default().push(Reverse(at));
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the queue"),
        }
    }

    /// Claims and starts due work until shutdown, then waits (up to the
    /// drain timeout) for running attempts. Attempts cut short stay marked
    /// running and are queued again at the next start.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<Option<Duration>>) {
        match self.queue.recover().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                invocations = n,
                "queued again the invocations cut short by the last stop"
            ),
            Err(e) => tracing::error!(error = %e, "cannot recover the queue"),
        }
        let mut due: HashMap<String, BinaryHeap<Reverse<i64>>> = HashMap::new();
        self.rescan(&mut due).await;
        let mut last_scan = now_ms();
        let drain = loop {
            if let Some(drain) = *shutdown.borrow() {
                break drain;
            }
            for (function, at) in self.signal.drain() {
                due.entry(function).or_default().push(Reverse(at));
            }
            let now = now_ms();
            if now - last_scan > RESCAN_EVERY_MS {
                last_scan = now;
                self.rescan(&mut due).await;
            }
            let mut next_wake = now + RESCAN_EVERY_MS;
            let table = self.gateway.table();
            let mut claims = Vec::new();
            for (function, heap) in due.iter_mut() {
                let Some(&Reverse(first)) = heap.peek() else {
                    continue;
                };
                if first > now {
                    next_wake = next_wake.min(first);
                    continue;
                }
                let Some(deployed) = table.function(function) else {
                    // Left queued: a deploy of the function wakes it.
                    heap.clear();
                    continue;
                };
                let limit = deployed.config.limits.async_concurrency();
                let running = self.running_of(function);
                if running >= limit {
                    // A finishing attempt wakes the function again.
                    continue;
                }
                while heap.peek().is_some_and(|Reverse(t)| *t <= now) {
                    heap.pop();
                }
                if let Some(&Reverse(later)) = heap.peek() {
                    next_wake = next_wake.min(later);
                }
                let free = (limit - running) as usize;
                claims.push((deployed.clone(), free));
            }
            due.retain(|_, h| !h.is_empty());
            drop(table);
            let results = futures::future::join_all(claims.into_iter().map(|(d, free)| {
                let queue = self.queue.clone();
                async move {
                    let r = queue.claim(d.name.as_str(), free, now).await;
                    (d, free, r)
                }
            }))
            .await;
            for (deployed, free, result) in results {
                match result {
                    Ok(claimed) => {
                        if claimed.len() == free {
                            // There may be more due work than room.
                            due.entry(deployed.name.to_string())
                                .or_default()
                                .push(Reverse(now));
                        }
                        for c in claimed {
                            self.start(deployed.clone(), c);
                        }
                    }
                    Err(e) => {
                        tracing::error!(function = %deployed.name, error = %e, "cannot claim queued invocations");
                        due.entry(deployed.name.to_string())
                            .or_default()
                            .push(Reverse(now + 1000));
                    }
                }
            }
            let sleep = Duration::from_millis(next_wake.saturating_sub(now_ms()).max(0) as u64);
            tokio::select! {
                _ = self.signal.notify.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.changed() => {}
            }
        };
        let deadline = tokio::time::Instant::now() + drain;
        while self.total_running() > 0 {
            // Registered before the check, so a finish in between is seen.
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.total_running() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                tracing::warn!(
                    running = self.total_running(),
                    "stopping with asynchronous invocations still running; they run again at the next start"
                );
                break;
            }
        }
    }

    /// Runs a broker message through its function now. Out of attempts, or
    /// on a final status, it is copied to the dead-letter queue.
    ///
    /// With `delivery` unset, failed attempts are retried in place with the
    /// function's policy (the message stays unacknowledged in its broker
    /// meanwhile, so a crash loses nothing). With `delivery` set, the broker
    /// redelivers: this is attempt `delivery.attempt`, and a retryable
    /// failure returns [`MessageOutcome::RetryAfter`] with the policy's
    /// backoff.
    ///
    /// `batched`: the source hands its function up to `.0` messages per
    /// invocation, `.1` invocations at once (see [`crate::batch`]).
    pub async fn run_message(
        self: &Arc<Self>,
        id: &str,
        mut new: NewInvocation,
        delivery: Option<(u32, i64)>,
        batched: Option<(u32, u32)>,
    ) -> MessageOutcome {
        let first = now_ms();
        let (previous, age_from) = match delivery {
            Some((attempt, first_at)) => (attempt.saturating_sub(1), first_at.min(first)),
            None => (0, first),
        };
        traced(&mut new.headers);
        let batching = batched.map(|(events, invocations)| {
            self.batching(&new.function, &new.ce_source, events, invocations)
        });
        // The message moves into the attempts' form; what only a
        // dead-letter copy needs stays behind in `new`.
        let mut c = Claimed {
            id: id.to_owned(),
            function: std::mem::take(&mut new.function),
            target: None,
            trigger: new.trigger,
            method: std::mem::take(&mut new.method),
            path: std::mem::take(&mut new.path),
            headers: std::mem::take(&mut new.headers),
            body: new.body.clone(),
            ce_source: std::mem::take(&mut new.ce_source),
            ce_type: std::mem::take(&mut new.ce_type),
            ce_time: new.ce_time.unwrap_or(age_from),
            created_at: age_from,
            age_from,
            attempt: previous,
            attempts_total: previous,
            parent: None,
        };
        let mut attempts = Vec::new();
        loop {
            let Some(deployed) = self.gateway.table().function(&c.function).cloned() else {
                return MessageOutcome::NotServing;
            };
            let n = c.attempt + 1;
            let started_at = now_ms();
            let clock = std::time::Instant::now();
            let (status, error, response) = match &batching {
                Some(line) => line.attempt(self, &c, n).await,
                None => self.invoke(&deployed, &c, n).await,
            };
            attempts.push(Attempt {
                n,
                started_at,
                duration_ms: clock.elapsed().as_secs_f64() * 1000.0,
                status,
                error: error.clone(),
            });
            let decision = decide(
                &deployed.config.retry,
                n,
                status,
                error.as_deref(),
                now_ms(),
                c.age_from,
                jitter(),
            );
            match decision {
                Decision::Succeeded => return MessageOutcome::Succeeded,
                Decision::Retry { at } if delivery.is_some() => {
                    return MessageOutcome::RetryAfter(Duration::from_millis(
                        (at - now_ms()).max(0) as u64,
                    ));
                }
                Decision::Retry { at } => {
                    c.attempt = n;
                    c.attempts_total = n;
                    let wait = (at - now_ms()).max(0) as u64;
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Decision::Failed { reason } => {
                    tracing::warn!(
                        target: "nimbus::invocation",
                        invocation_id = %c.id,
                        function = %c.function,
                        source = %c.ce_source,
                        attempts = n,
                        reason = %reason,
                        "dead-lettered"
                    );
                    let copy = NewInvocation {
                        function: c.function,
                        method: c.method,
                        path: c.path,
                        headers: c.headers,
                        ce_source: c.ce_source,
                        ce_type: c.ce_type,
                        ..new
                    };
                    return match self
                        .queue
                        .dead_letter(copy, attempts, reason, response)
                        .await
                    {
                        Ok(_) => MessageOutcome::DeadLettered,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot dead-letter a message; the broker redelivers it");
                            MessageOutcome::NotServing
                        }
                    };
                }
            }
        }
    }

    fn start(self: &Arc<Self>, deployed: Arc<Deployed>, claimed: Claimed) {
        self.adjust(&claimed.function, true);
        let this = self.clone();
        tokio::spawn(async move {
            let function = claimed.function.clone();
            this.attempt(deployed, claimed).await;
            this.adjust(&function, false);
            this.signal.wake(&function, 0);
        });
    }

    async fn attempt(&self, deployed: Arc<Deployed>, c: Claimed) {
        let policy = deployed.config.retry;
        let started_at = now_ms();
        let max_age = policy.max_age.get().as_millis() as i64;
        if started_at - c.age_from > max_age {
            let reason = format!("expired: older than max_age {}", policy.max_age);
            self.conclude(&deployed, &c, None, Decision::Failed { reason }, None)
                .await;
            return;
        }
        let n = c.attempts_total + 1;
        let clock = std::time::Instant::now();
        let (status, error, response) = match &c.target {
            Some(url) => self.deliver(&c, url, n).await,
            None => self.invoke(&deployed, &c, n).await,
        };
        let attempt = Attempt {
            n,
            started_at,
            duration_ms: clock.elapsed().as_secs_f64() * 1000.0,
            status,
            error: error.clone(),
        };
        let decision = decide(
            &policy,
            c.attempt + 1,
            status,
            error.as_deref(),
            now_ms(),
            c.age_from,
            jitter(),
        );
        self.conclude(&deployed, &c, Some(attempt), decision, response)
            .await;
    }

    /// Records the outcome and queues the destination delivery with it.
    async fn conclude(
        &self,
        deployed: &Deployed,
        c: &Claimed,
        attempt: Option<Attempt>,
        decision: Decision,
        response: Option<StoredResponse>,
    ) {
        let attempts = attempt.as_ref().map_or(c.attempts_total, |a| a.n);
        let (outcome, follow_up) = match decision {
            Decision::Succeeded => {
                let response = response.unwrap_or_else(|| StoredResponse {
                    status: 200,
                    headers: Vec::new(),
                    body: String::new(),
                    binary: false,
                    truncated: false,
                });
                let follow = destination_event(
                    deployed.config.destinations.on_success.as_ref(),
                    c,
                    "succeeded",
                    attempts,
                    Some(&response),
                    None,
                );
                (Outcome::Succeeded(response), follow)
            }
            Decision::Retry { at } => {
                self.signal.wake(&c.function, at);
                (Outcome::Retry { at, response }, None)
            }
            Decision::Failed { reason } => {
                tracing::warn!(
                    target: "nimbus::invocation",
                    invocation_id = %c.id,
                    function = %c.function,
                    trigger = c.trigger.as_str(),
                    attempts,
                    reason = %reason,
                    "dead-lettered"
                );
                let follow = destination_event(
                    deployed.config.destinations.on_failure.as_ref(),
                    c,
                    "failed",
                    attempts,
                    response.as_ref(),
                    Some(&reason),
                );
                (Outcome::Failed { reason, response }, follow)
            }
        };
        let wake = follow_up.as_ref().map(|f| f.function.clone());
        if let Err(e) = self.queue.finish(&c.id, attempt, outcome, follow_up).await {
            // The invocation stays marked running and runs again at the
            // next start: at least once, never lost.
            tracing::error!(invocation_id = %c.id, error = %e, "cannot record an attempt");
        }
        if let Some(function) = wake {
            self.signal.wake(&function, 0);
        }
    }

    async fn invoke(&self, deployed: &Arc<Deployed>, c: &Claimed, n: u32) -> AttemptResult {
        match build_request(c, n) {
            Ok(request) => {
                let which = Which {
                    id: &c.id,
                    n,
                    created_at: c.created_at,
                };
                self.send(deployed, request, c, which).await
            }
            Err(e) => (None, Some(e), None),
        }
    }

    /// Runs `request` through the gateway as invocation `which` of `c`'s
    /// function and route (`c` is one of the events of a batch), and keeps
    /// what it returned.
    pub(crate) async fn send(
        &self,
        deployed: &Arc<Deployed>,
        request: hyper::Request<nimbus_gateway::RequestBody>,
        c: &Claimed,
        which: Which<'_>,
    ) -> AttemptResult {
        let path = c.path.split('?').next().unwrap_or("/");
        let info = RouteInfo {
            trigger: Some(c.trigger.as_str()),
            attempt: Some(which.n),
            // A first attempt waited since the work was accepted (or, for
            // a broker message, published).
            waiting_since_ms: (which.n == 1).then_some(which.created_at),
            ..self
                .gateway
                .table()
                .route_info(&c.method, path, &c.function)
        };
        let response = self
            .gateway
            .invoke_as(deployed, request, info, which.id.into())
            .await;
        let (parts, body) = response.into_parts();
        let error = parts
            .headers
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (body, truncated) = read_capped(body).await;
        let mut stored = stored_response(parts.status.as_u16(), &parts.headers, body, truncated);
        // What is kept and shown (DLQ, invocation records, destinations)
        // never holds the function's secrets nor the request's credentials.
        let secrets = deployed
            .runtime
            .spec()
            .secrets
            .with_credentials(c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if !secrets.is_empty() {
            stored.body = secrets.text(&stored.body).into_owned();
            for (_, v) in &mut stored.headers {
                *v = secrets.text(v).into_owned();
            }
        }
        (Some(parts.status.as_u16()), error, Some(stored))
    }

    async fn deliver(
        &self,
        c: &Claimed,
        url: &str,
        n: u32,
    ) -> (Option<u16>, Option<String>, Option<StoredResponse>) {
        let mut headers = c.headers.clone();
        headers.extend(cloudevent_headers(c, n).map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        }));
        match nimbus_engine::outbound::deliver(
            url,
            &headers,
            c.body.clone(),
            DELIVERY_TIMEOUT,
            MAX_RESULT_BYTES,
        )
        .await
        {
            Ok(d) => {
                let mut map = http::HeaderMap::new();
                for (k, v) in &d.headers {
                    if let (Ok(k), Ok(v)) = (
                        HeaderName::from_bytes(k.as_bytes()),
                        HeaderValue::from_str(v),
                    ) {
                        map.append(k, v);
                    }
                }
                let stored = stored_response(d.status, &map, d.body, d.truncated);
                (Some(d.status), None, Some(stored))
            }
            Err(e) => (None, Some(e), None),
        }
    }
}

const CE_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");
const CE_ID: HeaderName = HeaderName::from_static("ce-id");
const CE_SOURCE: HeaderName = HeaderName::from_static("ce-source");
const CE_TYPE: HeaderName = HeaderName::from_static("ce-type");
const CE_TIME: HeaderName = HeaderName::from_static("ce-time");
const NIMBUS_ATTEMPT: HeaderName = HeaderName::from_static("nimbus-attempt");
const NIMBUS_TRIGGER: HeaderName = HeaderName::from_static("nimbus-trigger");

/// The CloudEvents binary-mode attributes of an attempt. An attribute that
/// cannot be a header value (a broker's message id with control
/// characters) is left out.
fn cloudevent_headers(c: &Claimed, n: u32) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
    let text = |s: &str| HeaderValue::from_str(s).ok();
    [
        (CE_SPECVERSION, Some(HeaderValue::from_static("1.0"))),
        (CE_ID, text(&c.id)),
        (CE_SOURCE, text(&c.ce_source)),
        (CE_TYPE, text(&c.ce_type)),
        (CE_TIME, text(&rfc3339(c.ce_time))),
        (NIMBUS_ATTEMPT, Some(HeaderValue::from(n))),
        (
            NIMBUS_TRIGGER,
            Some(HeaderValue::from_static(c.trigger.as_str())),
        ),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k, v?)))
}

/// The request carrying a batch of events to `lead`'s route, with the trace
/// context `traceparent`; each event's own attributes are in the body.
pub(crate) fn build_batch_request(
    lead: &Claimed,
    traceparent: Option<&str>,
    body: Vec<u8>,
) -> Result<hyper::Request<nimbus_gateway::RequestBody>, String> {
    use nimbus_telemetry::trace::TRACEPARENT;
    let mut request = hyper::Request::builder()
        .method(http::Method::POST)
        .uri(lead.path.as_str())
        .header(header::CONTENT_TYPE, BATCH_CONTENT_TYPE)
        .header(header::CONTENT_LENGTH, body.len())
        .header(NIMBUS_TRIGGER, lead.trigger.as_str())
        .body(
            http_body_util::Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .map_err(|e| format!("the batch request is invalid: {e}"))?;
    if let Some(v) = traceparent.and_then(|v| HeaderValue::from_str(v).ok()) {
        request.headers_mut().insert(TRACEPARENT, v);
    }
    Ok(request)
}

fn build_request(
    c: &Claimed,
    n: u32,
) -> Result<hyper::Request<nimbus_gateway::RequestBody>, String> {
    let method = http::Method::from_bytes(c.method.as_bytes())
        .map_err(|_| format!("stored method `{}` is invalid", c.method))?;
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(c.path.as_str())
        .body(
            http_body_util::Full::new(c.body.clone())
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .map_err(|e| format!("stored request is invalid: {e}"))?;
    let headers = request.headers_mut();
    headers.reserve(c.headers.len() + 8);
    for (k, v) in &c.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            if k.as_str().starts_with("ce-") || k.as_str().starts_with("nimbus-") {
                headers.insert(k, v);
            } else {
                headers.append(k, v);
            }
        }
    }
    for (k, v) in cloudevent_headers(c, n) {
        headers.insert(k, v);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(c.body.len()));
    Ok(request)
}

async fn read_capped(mut body: nimbus_gateway::Body) -> (Bytes, bool) {
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            let room = MAX_RESULT_BYTES.saturating_sub(kept.len());
            kept.extend_from_slice(&data[..data.len().min(room)]);
            if data.len() > room {
                return (kept.into(), true);
            }
        }
    }
    (kept.into(), false)
}

fn stored_response(
    status: u16,
    headers: &http::HeaderMap,
    body: Bytes,
    truncated: bool,
) -> StoredResponse {
    let (text, binary) = match std::str::from_utf8(&body) {
        Ok(t) => (t.to_owned(), false),
        Err(_) => (String::from_utf8_lossy(&body).into_owned(), true),
    };
    StoredResponse {
        status,
        headers: headers
            .iter()
            .filter(|(k, _)| !nimbus_telemetry::redact::sensitive_header(k.as_str()))
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
            .collect(),
        body: text,
        binary,
        truncated,
    }
}

/// The event sending an outcome to its destination. Destinations are one
/// hop: the outcome of a destination delivery goes nowhere, so two
/// functions naming each other cannot loop.
fn destination_event(
    destination: Option<&Destination>,
    c: &Claimed,
    status: &str,
    attempts: u32,
    response: Option<&StoredResponse>,
    error: Option<&str>,
) -> Option<NewInvocation> {
    let destination = destination?;
    if c.trigger == Trigger::Destination || c.target.is_some() {
        return None;
    }
    let record = serde_json::json!({
        "invocation_id": c.id,
        "function": c.function,
        "status": status,
        "trigger": c.trigger.as_str(),
        "ce_type": c.ce_type,
        "attempts": attempts,
        "request": { "method": c.method, "path": c.path, "body_bytes": c.body.len() },
        "response": response,
        "error": error,
    });
    // The delivery continues the trace of the invocation it reports on.
    let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    headers.extend(
        c.headers
            .iter()
            .filter(|(k, _)| k == nimbus_telemetry::trace::TRACEPARENT)
            .cloned(),
    );
    let (function, target) = match destination {
        Destination::Function(f) => (f.to_string(), None),
        Destination::Url(u) => (c.function.clone(), Some(u.clone())),
    };
    Some(NewInvocation {
        function,
        target,
        trigger: Trigger::Destination,
        method: "POST".into(),
        path: "/".into(),
        headers,
        body: serde_json::to_vec(&record).unwrap_or_default().into(),
        ce_source: format!("/nimbus/functions/{}", c.function),
        ce_type: format!("nimbus.invocation.{status}"),
        ce_time: None,
        not_before: None,
        idempotency: None,
        parent: Some(c.id.clone()),
        tick: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_manifest::Period;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            initial_backoff: Period::from_millis(100),
            max_backoff: Period::from_millis(1000),
            max_age: Period::from_secs(60),
            ..RetryPolicy::default()
        }
    }

    fn claimed(id: &str, headers: &[(&str, &str)]) -> Claimed {
        Claimed {
            id: id.to_owned(),
            function: "f".into(),
            target: None,
            trigger: Trigger::Source,
            method: "POST".into(),
            path: "/hook?x=1".into(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            body: Bytes::from_static(b"{\"n\":1}"),
            ce_source: "nats://127.0.0.1:4222/ORDERS".into(),
            ce_type: "nats.jetstream.message".into(),
            ce_time: 1_700_000_000_123,
            created_at: 0,
            age_from: 0,
            attempt: 1,
            attempts_total: 1,
            parent: None,
        }
    }

    #[test]
    fn attempts_carry_their_cloudevent_attributes() {
        let c = claimed(
            "42",
            &[
                ("content-type", "application/json"),
                ("x-tag", "a"),
                ("x-tag", "b"),
                // Attributes the message names itself are Nimbus's to set.
                ("ce-id", "forged"),
                ("ce-natssequence", "42"),
            ],
        );
        let r = build_request(&c, 2).unwrap();
        assert_eq!(r.method(), "POST");
        assert_eq!(r.uri(), "/hook?x=1");
        let h = r.headers();
        let one = |k: &str| h.get(k).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(one("ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(h.get_all("ce-id").iter().count(), 1);
        assert_eq!(one("ce-id").as_deref(), Some("42"));
        assert_eq!(
            one("ce-source").as_deref(),
            Some("nats://127.0.0.1:4222/ORDERS")
        );
        assert_eq!(one("ce-type").as_deref(), Some("nats.jetstream.message"));
        assert_eq!(one("ce-time").as_deref(), Some("2023-11-14T22:13:20.123Z"));
        assert_eq!(one("ce-natssequence").as_deref(), Some("42"));
        assert_eq!(one("nimbus-attempt").as_deref(), Some("2"));
        assert_eq!(one("nimbus-trigger").as_deref(), Some("source"));
        assert_eq!(one("content-type").as_deref(), Some("application/json"));
        assert_eq!(h.get_all("x-tag").iter().count(), 2);
        assert_eq!(one("content-length").as_deref(), Some("7"));

        // A broker's id that cannot be a header value is left out, not
        // made up.
        let r = build_request(&claimed("bad\nid", &[]), 1).unwrap();
        assert!(r.headers().get("ce-id").is_none());
        assert_eq!(
            r.headers().get("nimbus-attempt").unwrap().to_str().unwrap(),
            "1"
        );
    }

    #[test]
    fn success_and_client_errors_are_final() {
        let p = policy();
        assert_eq!(
            decide(&p, 1, Some(204), None, 0, 0, 0.5),
            Decision::Succeeded
        );
        assert!(matches!(
            decide(&p, 1, Some(400), None, 0, 0, 0.5),
            Decision::Failed { reason } if reason.starts_with("not retryable")
        ));
        assert!(matches!(
            decide(&p, 1, Some(404), None, 0, 0, 0.5),
            Decision::Failed { .. }
        ));
    }

    #[test]
    fn retryable_failures_back_off_until_the_budget_is_spent() {
        let p = policy();
        for status in [Some(500), Some(503), Some(504), Some(408), Some(429), None] {
            assert_eq!(
                decide(&p, 1, status, None, 1000, 0, 0.0),
                Decision::Retry { at: 1050 },
                "{status:?}"
            );
        }
        assert_eq!(
            decide(&p, 2, Some(500), None, 1000, 0, 0.0),
            Decision::Retry { at: 1100 }
        );
        assert!(matches!(
            decide(&p, 3, Some(500), Some("trap"), 1000, 0, 0.0),
            Decision::Failed { reason } if reason.contains("3 of 3") && reason.contains("trap")
        ));
    }

    #[test]
    fn events_past_their_age_are_not_retried() {
        let p = policy();
        assert!(matches!(
            decide(&p, 1, Some(500), None, 59_990, 0, 0.0),
            Decision::Failed { reason } if reason.starts_with("expired")
        ));
    }
}
