//! lockd: a Raft-backed lock and coordination service.
//!
//! A map of the crate:
//! - [`store`]: the deterministic state machine (the tree of nodes, the
//!   revision, transactions). Pure: commands in, state and events out.
//! - [`raft`]: openraft glue: the type configuration, the durable log with
//!   group commit, the state machine and snapshot store, and the peer
//!   network over gRPC.
//! - [`node`]: one member: routes writes to the leader, linearizes reads,
//!   binds its node id to its data dir.
//! - [`api`]: the gRPC services (KV, Cluster, and the peer Raft service).
//! - [`server`]: serves a member on its gRPC and HTTP ports.
//! - [`sessions`]: the leader's session clocks: keepalives, expiry and TTL
//!   checkpoints, all decided here and applied through Raft.
//! - [`identity`]: the cluster id, node id and instance recorded in a data dir.
//! - [`metrics`]: Prometheus metrics.
//! - [`watch`]: watch streams: the history of recent events and the fan-out
//!   of applied events to subscribers.

pub mod api;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod server;
pub mod sessions;
pub mod store;
pub mod watch;
