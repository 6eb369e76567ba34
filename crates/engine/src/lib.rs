//! `nimbus-engine` is the only crate that configures wasmtime.
//!
//! It owns the engine (Cranelift, epoch interruption, the pooling instance
//! allocator and every limit that goes with it), the validation of uploaded
//! components, their pre-initialisation (a component exporting
//! `wizer-initialize` starts every instance from the state it left), the
//! content-addressed store of compiled artifacts, the
//! pre-instantiated handle of each deployed version, when its code stays in
//! memory (a fixed idle time, or one learnt from its idle times), and the execution of one
//! HTTP request in a fresh instance under its timeout and memory cap. The
//! gateway hands it a `hyper` request and gets a streamed response back; every
//! other trigger (async, cron, brokers) reaches functions through the same
//! [`FunctionRuntime::invoke`] call.

mod artifact;
mod epoch;
pub mod keepalive;
mod limits;
pub mod outbound;
mod output;
mod preinit;
mod runtime;
mod validate;

pub use artifact::{ArtifactStore, ComponentDigest};
pub use limits::*;
pub use outbound::{OutboundPolicy, OutboundRule, OutboundRuleError};
pub use runtime::{
    Engine, EngineError, EngineStats, FunctionLimits, FunctionRuntime, FunctionSpec,
    InstanceOrigin, InvokeError, InvokeOutcome, Load, ResponseBody, Trimmed,
};
pub use validate::ComponentError;
