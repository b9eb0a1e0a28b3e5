//! The whole Raft vocabulary of lockd in one place: the type configuration
//! and the aliases the rest of the crate uses.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::store::{Applied, Command};

/// A command as it travels through the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// What to apply.
    pub command: Command,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.command {
            crate::store::Command::Txn(t) => write!(
                f,
                "txn(compares={}, success={}, failure={})",
                t.compares.len(),
                t.success.len(),
                t.failure.len()
            ),
            crate::store::Command::BindInstance { node_id, .. } => write!(f, "bind({node_id})"),
            crate::store::Command::OpenSession { ttl_ms } => {
                write!(f, "open-session(ttl={ttl_ms}ms)")
            }
            crate::store::Command::CloseSession { session_id } => {
                write!(f, "close-session({session_id})")
            }
            crate::store::Command::ExpireSessions { session_ids } => {
                write!(f, "expire-sessions({})", session_ids.len())
            }
            crate::store::Command::CheckpointSessions { remaining } => {
                write!(f, "checkpoint-sessions({})", remaining.len())
            }
        }
    }
}

openraft::declare_raft_types!(
    /// lockd's Raft type configuration.
    pub TypeConfig:
        D = Request,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// Raft handle.
pub type Raft = openraft::Raft<TypeConfig, crate::raft::sm::StateMachineStore>;
/// Log id.
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// Vote.
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// Log entry.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// Membership as stored with its log id.
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// Snapshot with lockd's snapshot data (the encoded state machine).
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;
/// Snapshot bytes, held in memory while sent or installed.
pub type SnapshotData = std::io::Cursor<Vec<u8>>;
/// Raft metrics.
pub type Metrics = openraft::RaftMetrics<TypeConfig>;
