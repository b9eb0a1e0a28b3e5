//! openraft's state machine glue: applies committed entries to the
//! in-memory tree (`store::State`), builds and installs snapshots.
//!
//! Owns: the applied log id, the last applied membership, snapshot files.
//! Snapshots are the whole state encoded with postcard in a checksummed
//! frame, written to `snapshot/current.bin` atomically. The state machine
//! itself is not persisted between snapshots: after a restart openraft
//! replays the log from the snapshot's last log id.
//!
//! Must never: let apply depend on anything but the entries.

use std::io::{self, Cursor};
use std::path::PathBuf;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use super::log::{checked_payload, decode_framed, encode_checked, write_atomic};
use super::types::{LogId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig};
use crate::store::{Applied, AppliedResult, Command, Event, State};

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    state: State,
}

/// What the state machine holds besides the tree.
#[derive(Default)]
pub struct Applier {
    /// The tree, the revision and the instance bindings.
    pub state: State,
    /// Last applied log id.
    pub last_applied: Option<LogId>,
    /// Last applied membership.
    pub last_membership: StoredMembership,
}

/// Observes what the state machine applies, on every member, in log order.
///
/// Called with the state machine's write lock held: implementations must be
/// quick and must not block (push to a buffer, `try_send`, notify).
pub trait ApplyHook: Send + Sync + 'static {
    /// A command was applied at log `index`, leaving the cluster at
    /// `revision`, with this result and these events (empty if nothing
    /// in the tree changed).
    fn applied(
        &self,
        index: u64,
        revision: u64,
        command: &Command,
        result: &Applied,
        events: &[Event],
    );

    /// The state was replaced wholesale (loaded at start or installed from
    /// a snapshot) and now stands at `revision`; no events exist for what
    /// came before.
    fn reset(&self, revision: u64, state: &State);
}

struct Shared {
    data: RwLock<Applier>,
    dir: PathBuf,
    hooks: RwLock<Vec<Arc<dyn ApplyHook>>>,
}

/// The state machine handed to openraft; clones share one state.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

impl StateMachineStore {
    /// Opens the state machine, loading the last snapshot under `dir`.
    pub fn open(dir: PathBuf) -> io::Result<StateMachineStore> {
        std::fs::create_dir_all(&dir)?;
        let mut applier = Applier::default();
        let path = dir.join("current.bin");
        if path.exists() {
            let bytes = std::fs::read(&path)?;
            let snap: SnapshotFile = decode_framed(&bytes).map_err(|e| {
                io::Error::new(e.kind(), format!("snapshot {}: {e}", path.display()))
            })?;
            applier.state = snap.state;
            applier.last_applied = snap.meta.last_log_id;
            applier.last_membership = snap.meta.last_membership;
        }
        Ok(StateMachineStore {
            shared: Arc::new(Shared {
                data: RwLock::new(applier),
                dir,
                hooks: RwLock::new(Vec::new()),
            }),
        })
    }

    /// Registers an observer of applied commands. It is told the current
    /// state at once (`reset`), then every apply from here on.
    pub fn add_hook(&self, hook: Arc<dyn ApplyHook>) {
        // Hold the state lock so no apply slips between reset and registration.
        let data = self.write();
        hook.reset(data.state.revision(), &data.state);
        self.shared
            .hooks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    fn hooks(&self) -> Vec<Arc<dyn ApplyHook>> {
        self.shared
            .hooks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Read access to the applied state (serializable reads).
    pub fn read(&self) -> RwLockReadGuard<'_, Applier> {
        self.shared.data.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applier> {
        self.shared.data.write().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot_path(&self) -> PathBuf {
        self.shared.dir.join("current.bin")
    }

    fn load_snapshot(&self) -> io::Result<Option<Snapshot>> {
        let path = self.snapshot_path();
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path)?;
        // Verify the whole file, but decode only the metadata in front of
        // the state: the tree itself is decoded when a snapshot is installed.
        let payload = checked_payload(&bytes)?;
        let (meta, _rest): (SnapshotMeta, _) = postcard::take_from_bytes(payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Cursor::new(bytes),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // Encode under the read lock: apply waits, reads do not.
        let (meta, bytes) = {
            let data = self.read();
            let meta = SnapshotMeta {
                last_log_id: data.last_applied,
                last_membership: data.last_membership.clone(),
            };
            let file = SnapshotFile {
                meta: meta.clone(),
                state: data.state.clone(),
            };
            (meta, file)
        };
        let encoded = tokio::task::spawn_blocking({
            let path = self.snapshot_path();
            move || -> io::Result<Vec<u8>> {
                let bytes = encode_checked(&bytes)?;
                write_atomic(&path, &bytes)?;
                Ok(bytes)
            }
        })
        .await
        .map_err(io::Error::other)??;
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = encoded.len(), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(encoded),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let data = self.read();
        Ok((data.last_applied, data.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let hooks = self.hooks();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let applied = {
                let mut data = self.write();
                data.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => Applied {
                        revision: data.state.revision(),
                        result: Ok(AppliedResult::None),
                    },
                    EntryPayload::Normal(req) => {
                        let index = entry.log_id.index;
                        let (applied, events) = data.state.apply(index, &req.command);
                        for h in &hooks {
                            h.applied(index, applied.revision, &req.command, &applied, &events);
                        }
                        applied
                    }
                    EntryPayload::Membership(m) => {
                        data.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        Applied {
                            revision: data.state.revision(),
                            result: Ok(AppliedResult::None),
                        }
                    }
                }
            };
            if let Some(r) = responder {
                r.send(applied);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let bytes = snapshot.into_inner();
        let file: SnapshotFile = decode_framed(&bytes)?;
        if file.meta.last_log_id != meta.last_log_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot data does not match its metadata",
            ));
        }
        let path = self.snapshot_path();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(io::Error::other)??;
        let mut data = self.write();
        data.state = file.state;
        data.last_applied = meta.last_log_id;
        data.last_membership = meta.last_membership.clone();
        for h in self.hooks() {
            h.reset(data.state.revision(), &data.state);
        }
        tracing::info!(last_log_id = ?meta.last_log_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.load_snapshot())
            .await
            .map_err(io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::{Entry, Request};
    use crate::store::{Command, Op, Txn};
    use openraft::entry::RaftEntry;
    use openraft::vote::RaftLeaderId;

    fn put(index: u64, path: &str) -> Entry {
        let lid = openraft::impls::leader_id_adv::LeaderId::<u64, u64>::new(1, 1).to_committed();
        Entry::new_normal(
            LogId::new(lid, index),
            Request {
                command: Command::Txn(Txn {
                    compares: vec![],
                    success: vec![Op::Put {
                        path: path.into(),
                        data: path.as_bytes().to_vec(),
                        expected_version: None,
                        parents: true,
                    }],
                    failure: vec![],
                    request: None,
                }),
            },
        )
    }

    #[tokio::test]
    async fn snapshot_survives_reopen_and_installs_elsewhere() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut sm = StateMachineStore::open(dir.path().join("a")).expect("open");
        let entries: Vec<_> = (1..=20)
            .map(|i| Ok((put(i, &format!("/d/k{i}")), None)))
            .collect();
        sm.apply(futures::stream::iter(entries))
            .await
            .expect("apply");
        let snap = sm.build_snapshot().await.expect("build");
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(20));

        // Reopening loads the state from the snapshot file.
        let mut reopened = StateMachineStore::open(dir.path().join("a")).expect("reopen");
        let (applied, _) = reopened.applied_state().await.expect("applied");
        assert_eq!(applied.map(|l| l.index), Some(20));
        assert_eq!(reopened.read().state, sm.read().state);
        let current = reopened
            .get_current_snapshot()
            .await
            .expect("read")
            .expect("present");
        assert_eq!(current.meta, snap.meta);

        // Installing it on another member reproduces the same state.
        let mut other = StateMachineStore::open(dir.path().join("b")).expect("open b");
        other
            .install_snapshot(&current.meta, current.snapshot)
            .await
            .expect("install");
        assert_eq!(other.read().state, sm.read().state);
        assert_eq!(other.read().state.revision(), 20);

        // A corrupted snapshot file refuses to load.
        let path = dir.path().join("a").join("current.bin");
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).expect("write");
        assert!(StateMachineStore::open(dir.path().join("a")).is_err());
    }
}
