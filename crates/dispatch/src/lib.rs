//! `nimbus-dispatch` owns the execution of asynchronous work: the intake
//! that stores accepted events and wakes the dispatcher, the dispatcher that
//! claims due invocations per function within its async concurrency, runs
//! them through the gateway's invoke path as CloudEvents, applies the retry
//! policy and sends outcomes to their destinations, and the scheduler that
//! turns cron ticks into queued events exactly once. It also runs broker
//! messages through their attempts, one invocation each or, for a source
//! with `events_per_invocation`, several per invocation as a CloudEvents
//! batch (`batch`).
//!
//! Durable state lives behind [`nimbus_queue::Queue`]; nothing here keeps
//! per-event state in memory beyond what is running, so a node restart
//! loses nothing and a million queued events cost no RAM.

mod batch;
mod dispatcher;
mod schedule;

pub use dispatcher::{Dispatcher, MAX_RESULT_BYTES, MessageOutcome, NodeIntake, Signal, rfc3339};
pub use schedule::Scheduler;
