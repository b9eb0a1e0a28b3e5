//! Rust client for lockd, a Raft-backed lock and coordination service.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lockd_client::Error> {
//! let client = lockd_client::Client::connect(["127.0.0.1:7001", "127.0.0.1:7002"])?;
//! client.put("/config", "v1").await?;
//! let got = client.get("/config").await?;
//! assert_eq!(got.node.map(|n| n.data), Some(b"v1".to_vec()));
//! let status = client.cluster().status().await?;
//! println!("leader: {}", status.leader_id);
//! # Ok(())
//! # }
//! ```
//!
//! See [`Client`] for the failover and retry rules, and [`Error`] for how
//! failures are reported (notably [`Error::Ambiguous`] for writes whose
//! outcome is unknown).
#![deny(missing_docs)]

mod client;
mod error;
pub mod recipes;
mod retry;
mod session;
mod watch;

pub use client::{Client, ClientOptions, Cluster};
pub use error::Error;
/// The generated `lockd.v1` protobuf types and gRPC stubs.
pub use lockd_proto::v1 as proto;
pub use session::{new_request_id, Session, SessionState};
pub use watch::{WatchEvent, WatchEventKind, WatchOptions, WatchScope, Watcher};

/// Convenience alias for results of this crate.
///
/// ```no_run
/// async fn config(client: &lockd_client::Client) -> lockd_client::Result<Vec<u8>> {
///     Ok(client.get("/config").await?.node.map(|n| n.data).unwrap_or_default())
/// }
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;
