//! `nimbus-dispatch` owns the execution of asynchronous work: the intake
//! that stores accepted events and wakes the dispatcher, the dispatcher that
//! claims due invocations per function within its async concurrency, runs
//! them through the gateway's invoke path as CloudEvents, applies the retry
//! policy and sends outcomes to their destinations, and the scheduler that
//! turns cron ticks into queued events exactly once.
//!
//! Durable state lives behind [`nimbus_queue::Queue`]; nothing here keeps
//! per-event state in memory beyond what is running, so a node restart
//! loses nothing and a million queued events cost no RAM.

mod dispatcher;
mod schedule;

pub use dispatcher::{Dispatcher, MAX_RESULT_BYTES, MessageOutcome, NodeIntake, Signal, rfc3339};
pub use schedule::Scheduler;
