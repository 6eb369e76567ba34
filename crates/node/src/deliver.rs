//! Wires event sources to the dispatcher: a broker message becomes a
//! CloudEvent request to its function, with the function's retry policy.

use nimbus_dispatch::{Dispatcher, MessageOutcome};
use nimbus_queue::{NewInvocation, Trigger};
use nimbus_sources::{BoxFuture, Deliver, Message, Verdict};
use std::sync::Arc;

pub struct NodeDeliver {
    pub dispatcher: Arc<Dispatcher>,
}

impl Deliver for NodeDeliver {
    fn deliver(&self, m: Message) -> BoxFuture<'_, Verdict> {
        Box::pin(async move {
            let id = m.id.clone();
            let new = NewInvocation {
                function: m.function,
                target: None,
                trigger: Trigger::Source,
                method: "POST".into(),
                path: "/".into(),
                headers: m.headers,
                body: m.body.into(),
                ce_source: m.ce_source,
                ce_type: m.ce_type,
                ce_time: None,
                not_before: None,
                idempotency: None,
                parent: None,
                tick: None,
            };
            let delivery = m.delivery.map(|d| (d.attempt, d.first_at_ms));
            let batched = m.per_invocation.map(|p| (p.events, p.invocations));
            match self
                .dispatcher
                .run_message(&id, new, delivery, batched)
                .await
            {
                MessageOutcome::Succeeded => Verdict::Succeeded,
                MessageOutcome::DeadLettered => Verdict::DeadLettered,
                MessageOutcome::NotServing => Verdict::Retry,
                MessageOutcome::RetryAfter(d) => Verdict::RetryAfter(d),
            }
        })
    }
}
