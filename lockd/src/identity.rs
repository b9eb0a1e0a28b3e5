//! Member identity: each data dir records the cluster id, the node id and a
//! random instance id fixed when the dir was created.
//!
//! A member refuses to start when its flags disagree with its data dir. The
//! instance id is what lets the cluster recognise a member whose disk was
//! wiped: the cluster binds each node id to the first instance that used it
//! (see `store::Command::BindInstance`), and a new instance under an old id
//! is refused by its peers.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

const FILE: &str = "identity.json";

/// Who this member is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Cluster id (from `--cluster-id`).
    pub cluster_id: String,
    /// Raft node id (from `--id`).
    pub node_id: u64,
    /// Random id of this data dir.
    pub instance: String,
}

/// Why a data dir cannot be used.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// The data dir belongs to another node id.
    #[error(
        "data dir {dir} belongs to node id {recorded}, but this member was started with --id {flag}; \
         start it with --id {recorded}, or give the new member an empty data dir"
    )]
    NodeIdMismatch {
        /// The data dir.
        dir: PathBuf,
        /// Id recorded in the dir.
        recorded: u64,
        /// Id given by flag.
        flag: u64,
    },
    /// The data dir belongs to another cluster.
    #[error(
        "data dir {dir} belongs to cluster {recorded:?}, but this member was started with --cluster-id {flag:?}"
    )]
    ClusterIdMismatch {
        /// The data dir.
        dir: PathBuf,
        /// Cluster recorded in the dir.
        recorded: String,
        /// Cluster given by flag.
        flag: String,
    },
    /// The directory has files but no identity.
    #[error("data dir {0} is not empty and has no {FILE}; refusing to use it")]
    Foreign(PathBuf),
    /// Reading or writing failed.
    #[error("data dir {dir}: {source}")]
    Io {
        /// The data dir.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The identity file is unreadable.
    #[error("data dir {dir}: {FILE} is corrupt: {message}")]
    Corrupt {
        /// The data dir.
        dir: PathBuf,
        /// Decoder message.
        message: String,
    },
}

impl Identity {
    /// Loads the identity of `dir`, or creates one if the dir is new or
    /// empty, and checks it against the flags.
    pub fn load_or_create(
        dir: &Path,
        cluster_id: &str,
        node_id: u64,
    ) -> Result<Identity, IdentityError> {
        let io = |source| IdentityError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(FILE);
        if path.exists() {
            let bytes = fs::read(&path).map_err(io)?;
            let id: Identity =
                serde_json::from_slice(&bytes).map_err(|e| IdentityError::Corrupt {
                    dir: dir.to_path_buf(),
                    message: e.to_string(),
                })?;
            if id.node_id != node_id {
                return Err(IdentityError::NodeIdMismatch {
                    dir: dir.to_path_buf(),
                    recorded: id.node_id,
                    flag: node_id,
                });
            }
            if id.cluster_id != cluster_id {
                return Err(IdentityError::ClusterIdMismatch {
                    dir: dir.to_path_buf(),
                    recorded: id.cluster_id,
                    flag: cluster_id.to_string(),
                });
            }
            return Ok(id);
        }
        let has_files = fs::read_dir(dir).map_err(io)?.next().is_some();
        if has_files {
            return Err(IdentityError::Foreign(dir.to_path_buf()));
        }
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(|e| io(std::io::Error::other(e.to_string())))?;
        let instance = raw.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let id = Identity {
            cluster_id: cluster_id.to_string(),
            node_id,
            instance,
        };
        let bytes = serde_json::to_vec_pretty(&id).map_err(|e| io(std::io::Error::other(e)))?;
        crate::raft::log::write_atomic(&path, &bytes).map_err(io)?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_checked_against_flags() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = Identity::load_or_create(dir.path(), "c1", 2).expect("create");
        let b = Identity::load_or_create(dir.path(), "c1", 2).expect("reload");
        assert_eq!(a, b);
        assert_eq!(a.instance.len(), 32);
        let e = Identity::load_or_create(dir.path(), "c1", 5).expect_err("id mismatch");
        assert!(e.to_string().contains("belongs to node id 2"), "{e}");
        assert!(e.to_string().contains("--id 5"), "{e}");
        let e = Identity::load_or_create(dir.path(), "other", 2).expect_err("cluster mismatch");
        assert!(e.to_string().contains("cluster \"c1\""), "{e}");
    }

    #[test]
    fn a_wiped_dir_gets_a_new_instance() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = Identity::load_or_create(dir.path(), "c", 1).expect("create");
        fs::remove_file(dir.path().join(FILE)).expect("wipe");
        let b = Identity::load_or_create(dir.path(), "c", 1).expect("recreate");
        assert_ne!(a.instance, b.instance);
    }

    #[test]
    fn refuses_a_non_empty_dir_without_identity() {
        let dir = tempfile::tempdir().expect("tmp");
        fs::write(dir.path().join("something"), b"x").expect("write");
        let e = Identity::load_or_create(dir.path(), "c", 1).expect_err("foreign");
        assert!(matches!(e, IdentityError::Foreign(_)));
    }
}
