//! `nimbus-cli` is the `nimbus` command: a thin layer that starts a node
//! (`nimbus up`) or drives one through its admin API (`deploy`, `ls`,
//! `status`, `invoke`, `rm`, `rollback`, `invocations`, `dlq`, `schedules`, `logs`, `top`, `objects`). It also exports the small HTTP
//! client the integration tests use to talk to a real node.

pub mod client;
pub mod deploy;
pub mod invocations;
pub mod logfmt;
pub mod logs;
pub mod objects;
pub mod output;
pub mod top;
