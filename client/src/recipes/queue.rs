//! Shared machinery of the queue-based recipes ([`Mutex`](super::Mutex),
//! [`RwLock`](super::RwLock), [`Semaphore`](super::Semaphore)):
//! ephemeral-sequential children of a container directory, a decision over
//! the sorted queue, a watch on what the decision says to wait for, and the
//! held node the public guards wrap. [`LeaderElection`](super::LeaderElection)
//! shares the node helpers.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockd_proto::v1 as proto;
use tokio::time::Instant;

use super::holds_lock_compare;
use crate::client::Client;
use crate::error::Error;
use crate::session::{Session, SessionHandle};
use crate::watch::{WatchEventKind, WatchOptions};
use crate::Result;

/// Wait before retrying a read in [`HeldNode::lost_or_deleted`].
const RETRY: Duration = Duration::from_millis(500);

/// One node of the queue, as listed.
#[derive(Debug)]
pub(super) struct Entry {
    /// Sequence number (shared counter of the directory).
    pub seq: u64,
    /// Index into the prefixes the queue was listed with.
    pub kind: usize,
    /// Full path.
    pub path: String,
}

/// What to do given the sorted queue and our position in it.
pub(super) enum Decision {
    /// We hold.
    Hold,
    /// Wait for the deletion of this node, then list again.
    WaitFor(String),
    /// Wait for the deletion of any queue node ahead of us, then list again.
    WaitAnyEarlier,
}

/// A directory of ephemeral-sequential contender nodes.
#[derive(Clone, Debug)]
pub(super) struct Queue {
    pub client: Client,
    pub dir: String,
    pub session: SessionHandle,
    /// How many times the directory was listed (shared by clones).
    lists: Arc<AtomicU64>,
}

impl Queue {
    pub fn new(client: Client, name: impl Into<String>, session: &Session) -> Queue {
        Queue {
            client,
            dir: trim_dir(name.into()),
            session: session.handle(),
            lists: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How many times this queue (and its clones) listed the directory.
    pub fn list_count(&self) -> u64 {
        self.lists.load(Ordering::Relaxed)
    }

    pub fn lost_error(&self) -> Error {
        Error::SessionLost(self.session.reason())
    }

    /// Creates our node `DIR/PREFIX<seq>`, ephemeral-sequential.
    pub async fn create_node(&self, prefix: &str) -> Result<proto::Node> {
        create_contender(&self.client, &self.dir, prefix, self.session.id, Vec::new()).await
    }

    fn node_gone(&self, path: &str) -> Error {
        if self.session.is_lost() {
            self.lost_error()
        } else {
            Error::SessionLost(format!(
                "node {path} was deleted (session {})",
                self.session.id
            ))
        }
    }

    /// [`Queue::acquire`] without a deadline: waits until we hold.
    pub async fn hold(
        &self,
        prefixes: &[&str],
        kind: usize,
        decide: impl Fn(&[Entry], usize) -> Decision,
    ) -> Result<HeldNode> {
        match self.acquire(prefixes, kind, None, decide).await? {
            Some(held) => Ok(held),
            // Only a deadline ends an acquisition without a node.
            None => Err(Error::SessionLost(format!(
                "{}: acquisition ended without holding",
                self.dir
            ))),
        }
    }

    /// Creates `DIR/prefixes[kind]<seq>` and waits until `decide(queue,
    /// our_index)` says we hold. `Ok(None)` when `deadline` passed first (our
    /// node is deleted again). The queue holds the nodes matching any of
    /// `prefixes`, sorted by sequence number.
    pub async fn acquire(
        &self,
        prefixes: &[&str],
        kind: usize,
        deadline: Option<Instant>,
        decide: impl Fn(&[Entry], usize) -> Decision,
    ) -> Result<Option<HeldNode>> {
        if self.session.is_lost() {
            return Err(self.lost_error());
        }
        let node = self.create_node(prefixes[kind]).await?;
        let token = node.create_revision;
        let mut cleanup = Cleanup {
            client: self.client.clone(),
            node: Some((node.path.clone(), token)),
        };
        let full: Vec<String> = prefixes
            .iter()
            .map(|p| format!("{}/{p}", self.dir))
            .collect();
        // Every list reads a state that includes our create (and, after a
        // wake-up, the deletion that woke us). That is all the decision
        // needs: contenders ahead of us were created before us and never
        // come back once deleted, so any member's state at or after that
        // revision answers "is anyone ahead of us?" exactly as a
        // linearizable read would, without the leader round trip. (0: a
        // linearizable list.)
        let mut min_revision = token;
        loop {
            self.lists.fetch_add(1, Ordering::Relaxed);
            let listed = self
                .client
                .list_with(proto::ListRequest {
                    path: self.dir.clone(),
                    serializable: min_revision > 0,
                    min_revision,
                })
                .await;
            let list = match listed {
                Ok(l) => l,
                // The directory exists as long as our node does.
                Err(Error::NotFound(_)) => {
                    cleanup.disarm();
                    return Err(self.node_gone(&node.path));
                }
                Err(e) => {
                    cleanup.now().await;
                    return Err(e);
                }
            };
            let mut queue: Vec<Entry> = Vec::new();
            let mut ours = None;
            for c in &list.children {
                for (k, p) in full.iter().enumerate() {
                    if let Some(seq) = seq_of(p, &c.path) {
                        if c.path == node.path && c.create_revision == token {
                            ours = Some(seq);
                        }
                        queue.push(Entry {
                            seq,
                            kind: k,
                            path: c.path.clone(),
                        });
                        break;
                    }
                }
            }
            queue.sort_by_key(|e| e.seq);
            let Some(pos) = ours.and_then(|s| queue.iter().position(|e| e.seq == s)) else {
                cleanup.disarm();
                return Err(self.node_gone(&node.path));
            };
            let our_seq = queue[pos].seq;
            let decision = decide(&queue, pos);
            if let Decision::Hold = decision {
                cleanup.disarm();
                return Ok(Some(HeldNode {
                    client: self.client.clone(),
                    session: self.session.clone(),
                    name: self.dir.clone(),
                    path: node.path.clone(),
                    token,
                    released: false,
                }));
            }
            if deadline.is_some_and(|d| d <= Instant::now()) {
                cleanup.now().await;
                return Ok(None);
            }
            let rev = list.header.as_ref().map_or(0, |h| h.revision);
            let opts = match &decision {
                Decision::WaitFor(p) => WatchOptions::key(p.clone()),
                _ => WatchOptions::subtree(self.dir.clone()),
            };
            let mut watcher = self.client.watch(WatchOptions {
                no_put: true,
                ..opts.from_revision(rev + 1)
            });
            let woken = async {
                loop {
                    match watcher.next().await {
                        Ok(ev) if ev.kind == WatchEventKind::Delete => {
                            let path = ev.node.path.as_str();
                            let earlier = full
                                .iter()
                                .any(|p| seq_of(p, path).is_some_and(|s| s < our_seq));
                            if matches!(decision, Decision::WaitFor(_)) || earlier {
                                return Ok(ev.revision);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => return Err(e),
                    }
                }
            };
            tokio::select! {
                r = woken => match r {
                    Ok(rev) => min_revision = min_revision.max(rev),
                    // History gone: a linearizable list tells the current
                    // state.
                    Err(Error::Compacted { .. }) => min_revision = 0,
                    Err(e) => {
                        cleanup.now().await;
                        return Err(e);
                    }
                },
                _ = self.session.lost() => {
                    cleanup.now().await;
                    return Err(self.lost_error());
                }
                _ = sleep_until_opt(deadline) => {
                    cleanup.now().await;
                    return Ok(None);
                }
            }
        }
    }
}

pub(super) fn trim_dir(mut dir: String) -> String {
    while dir.len() > 1 && dir.ends_with('/') {
        dir.pop();
    }
    dir
}

pub(super) fn no_node() -> Error {
    Error::Rpc(tonic::Status::internal("create answered without a node"))
}

/// Creates the ephemeral-sequential node `DIR/PREFIX<seq>` with `data`,
/// owned by session `session_id`, in one write: a transaction that also
/// creates `dir` as a container (with missing parents) when it is missing
/// (`exists(dir) ? create child : create dir + create child`, the same
/// transaction the server's Lock service runs). It carries a request id,
/// so a lost reply is retried without leaving an orphan.
pub(super) async fn create_contender(
    client: &Client,
    dir: &str,
    prefix: &str,
    session_id: u64,
    data: Vec<u8>,
) -> Result<proto::Node> {
    let create = |r: proto::CreateRequest| proto::Op {
        op: Some(proto::op::Op::Create(r)),
    };
    let child = create(proto::CreateRequest {
        path: lockd_proto::layout::child_prefix(dir, prefix),
        data,
        session_id,
        sequential: true,
        ..Default::default()
    });
    let mkdir = create(proto::CreateRequest {
        path: dir.to_string(),
        parents: true,
        container: true,
        ..Default::default()
    });
    let req = proto::TxnRequest {
        compare: vec![proto::Compare {
            path: dir.to_string(),
            op: proto::compare::Op::Equal as i32,
            target: Some(proto::compare::Target::Exists(true)),
        }],
        success: vec![child.clone()],
        failure: vec![mkdir, child],
        request_id: String::new(),
        request_session_id: session_id,
    };
    let r = match client.txn_protected(req).await {
        Ok(r) => r,
        Err(Error::NotFound(m)) if m.starts_with("session expired") => {
            return Err(Error::SessionLost(m))
        }
        Err(e) => return Err(e),
    };
    match r.results.into_iter().last().and_then(|o| o.result) {
        Some(proto::op_result::Result::Create(c)) => c.node.ok_or_else(no_node),
        _ => Err(no_node()),
    }
}

pub(super) use lockd_proto::layout::seq_of;

pub(super) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Deletes `path` if it is still the node created at `token`.
pub(super) async fn delete_node(client: &Client, path: &str, token: u64) -> Result<()> {
    let req = proto::TxnRequest {
        compare: vec![holds_lock_compare(path, token)],
        success: vec![proto::Op {
            op: Some(proto::op::Op::Delete(proto::DeleteRequest {
                path: path.to_string(),
                expected_version: None,
                recursive: false,
            })),
        }],
        ..Default::default()
    };
    match client.txn(req.clone()).await {
        Ok(_) => Ok(()),
        Err(Error::Ambiguous(_)) => client.txn(req).await.map(|_| ()),
        Err(e) => Err(e),
    }
}

/// Deletes the node in the background, if a Tokio runtime is running.
pub(super) fn spawn_delete(client: Client, path: String, token: u64) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            if let Err(e) = delete_node(&client, &path, token).await {
                tracing::debug!(%path, error = %e, "releasing node failed");
            }
        });
    }
}

/// Deletes a node whose acquisition did not complete (also on drop).
pub(super) struct Cleanup {
    pub client: Client,
    pub node: Option<(String, u64)>,
}

impl Cleanup {
    pub fn disarm(&mut self) {
        self.node = None;
    }

    pub async fn now(&mut self) {
        if let Some((path, token)) = self.node.take() {
            if let Err(e) = delete_node(&self.client, &path, token).await {
                tracing::debug!(%path, error = %e, "deleting node failed");
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some((path, token)) = self.node.take() {
            spawn_delete(self.client.clone(), path, token);
        }
    }
}

/// A held node: what the public guards wrap. Deleted on drop (background).
#[derive(Debug)]
pub(super) struct HeldNode {
    pub client: Client,
    pub session: SessionHandle,
    pub name: String,
    pub path: String,
    pub token: u64,
    pub released: bool,
}

impl HeldNode {
    pub fn compare(&self) -> proto::Compare {
        holds_lock_compare(self.path.clone(), self.token)
    }

    pub async fn guarded_txn(&self, mut req: proto::TxnRequest) -> Result<proto::TxnResponse> {
        req.compare.push(self.compare());
        self.client.txn(req).await
    }

    /// Resolves once the session is lost.
    pub fn lost(&self) -> impl Future<Output = String> + Send + 'static {
        let session = self.session.clone();
        async move { format!("session lost: {}", session.lost().await) }
    }

    /// Resolves once the session is lost or our node was deleted (read,
    /// then watched for its deletion; read again after a watch error).
    pub fn lost_or_deleted(&self) -> impl Future<Output = String> + Send + 'static {
        let client = self.client.clone();
        let path = self.path.clone();
        let token = self.token;
        let lost = self.lost();
        async move {
            let node_gone = async {
                loop {
                    let rev = match client.get(path.clone()).await {
                        Ok(r) if r.node.as_ref().map(|n| n.create_revision) == Some(token) => {
                            r.header.map_or(0, |h| h.revision)
                        }
                        Ok(_) | Err(Error::NotFound(_)) => {
                            return format!("lock node {path} was deleted")
                        }
                        Err(_) => {
                            tokio::time::sleep(RETRY).await;
                            continue;
                        }
                    };
                    let mut w = client.watch(WatchOptions {
                        no_put: true,
                        ..WatchOptions::key(path.clone()).from_revision(rev + 1)
                    });
                    loop {
                        match w.next().await {
                            Ok(ev) if ev.kind == WatchEventKind::Delete => {
                                return format!("lock node {path} was deleted")
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    tokio::time::sleep(RETRY).await;
                }
            };
            tokio::select! {
                why = lost => why,
                why = node_gone => why,
            }
        }
    }

    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        delete_node(&self.client, &self.path, self.token).await
    }
}

/// The accessors every guard over a [`HeldNode`] (in its field `inner`)
/// shares: `fencing_token`, `path`, `name`, `session_id`, `is_lost`,
/// `compare` and `guarded_txn`. `$what` names the recipe ("lock",
/// "semaphore"), `$node` is an example node path.
macro_rules! held_node_accessors {
    ($guard:ty, $what:literal, $node:literal) => {
        impl $guard {
            #[doc = concat!("The fencing token: our node's `create_revision`, strictly \
                increasing across successive acquisitions of the ", $what, ".")]
            pub fn fencing_token(&self) -> u64 {
                self.inner.token
            }

            #[doc = concat!("Our node, e.g. `", $node, "`.")]
            pub fn path(&self) -> &str {
                &self.inner.path
            }

            #[doc = concat!("The ", $what, " directory.")]
            pub fn name(&self) -> &str {
                &self.inner.name
            }

            /// The session owning our node.
            pub fn session_id(&self) -> u64 {
                self.inner.session.id
            }

            #[doc = concat!("True once the session is lost (the ", $what, " must be \
                assumed gone). Does not notice a node deleted by someone else.")]
            pub fn is_lost(&self) -> bool {
                self.inner.session.is_lost()
            }

            #[doc = concat!("The compare that holds only while this acquisition holds \
                the ", $what, "; see \
                [`holds_lock_compare`](crate::recipes::holds_lock_compare).")]
            pub fn compare(&self) -> lockd_proto::v1::Compare {
                self.inner.compare()
            }

            #[doc = concat!("Runs `req` with the compare of `compare()` added to its \
                compares: it applies its `success` ops only while we still hold the ", $what,
                ". `succeeded == false` means one of the compares failed (ours included); \
                check `is_lost()` or re-read to tell which.")]
            pub async fn guarded_txn(
                &self,
                req: lockd_proto::v1::TxnRequest,
            ) -> crate::Result<lockd_proto::v1::TxnResponse> {
                self.inner.guarded_txn(req).await
            }
        }
    };
}
pub(super) use held_node_accessors;

impl Drop for HeldNode {
    fn drop(&mut self) {
        if !self.released {
            spawn_delete(self.client.clone(), self.path.clone(), self.token);
        }
    }
}
