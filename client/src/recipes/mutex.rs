//! [`Mutex`]: a distributed lock (Curator's `InterProcessMutex`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockd_proto::v1 as proto;
use tokio::time::Instant;

use crate::client::Client;
use crate::error::Error;
use crate::session::{Session, SessionHandle};
use crate::watch::{WatchEventKind, WatchOptions};
use crate::Result;

use super::queue::{delete_node, ensure_container, seq_of, sleep_until_opt, spawn_delete, Cleanup};

pub use lockd_proto::layout::LOCK_PREFIX;

/// How many times a create is retried after the lock directory vanished
/// under it (a container is deleted once its last child goes).
const CREATE_ATTEMPTS: u32 = 5;

/// The compare that holds only while the lock node `node_path`, created at
/// revision `token`, still exists: `create_revision(node_path) == token`.
///
/// Added to a transaction, it makes the transaction apply only while that
/// acquisition still holds the lock (a deleted node has `create_revision`
/// 0, and a later node at the same path has a higher one). This is what
/// [`MutexGuard::guarded_txn`] adds; use it directly when the token and
/// path were handed over from another process (e.g. `lockctl lock` exports
/// `LOCKD_FENCING_TOKEN`).
pub fn holds_lock_compare(node_path: impl Into<String>, token: u64) -> proto::Compare {
    proto::Compare {
        path: node_path.into(),
        op: proto::compare::Op::Equal as i32,
        target: Some(proto::compare::Target::CreateRevision(token)),
    }
}

/// A distributed mutual-exclusion lock on a lock directory such as
/// `/locks/build` (ZooKeeper Curator's `InterProcessMutex`, without
/// reentrancy).
///
/// # Layout and algorithm
///
/// 1. Create an ephemeral-sequential child `NAME/lock-` owned by the
///    session, through [`Client::create_protected`] (a request id, so a lost
///    reply never leaves an orphan). If `NAME` is missing it is created as a
///    *container* (with missing parents) and the create is retried.
/// 2. List `NAME`. The contender with the lowest sequence number holds the
///    lock.
/// 3. Otherwise watch only the immediate predecessor (a key watch starting
///    at the list's revision + 1, so a deletion between the list and the
///    watch is not missed) until it is deleted, then list again. A release
///    therefore wakes exactly one waiter (no herd effect).
///
/// The **fencing token** of an acquisition is the `create_revision` of the
/// contender's node: revisions are cluster-wide and never reused, so the
/// tokens of successive holders strictly increase.
///
/// If the session is lost while waiting, [`Mutex::lock`] fails with
/// [`Error::SessionLost`]. If it is cancelled (the future dropped) or
/// times out, its node is deleted. A `Mutex` is cheap to clone; each call to
/// [`Mutex::lock`] is a separate contender (a task holding the lock that
/// calls `lock` again waits for itself forever).
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// use lockd_client::recipes::Mutex;
///
/// let session = client.open_session(Duration::from_secs(10)).await?;
/// let mutex = Mutex::new(client.clone(), "/locks/build", &session);
/// let guard = mutex.lock().await?;
/// println!("holding {} with token {}", guard.path(), guard.fencing_token());
/// // ... work, passing guard.fencing_token() to external resources ...
/// guard.unlock().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Mutex {
    client: Client,
    dir: String,
    session: SessionHandle,
    lists: Arc<AtomicU64>,
}

impl Mutex {
    /// A lock on the directory `name` (e.g. `/locks/build`), whose contender
    /// nodes are owned by `session`. Nothing is sent until a lock call.
    pub fn new(client: Client, name: impl Into<String>, session: &Session) -> Mutex {
        let mut dir: String = name.into();
        while dir.len() > 1 && dir.ends_with('/') {
            dir.pop();
        }
        Mutex {
            client,
            dir,
            session: session.handle(),
            lists: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The lock directory.
    pub fn name(&self) -> &str {
        &self.dir
    }

    /// How many times this mutex (and its clones) listed the lock directory:
    /// once per acquisition attempt plus once per predecessor deletion seen.
    /// Diagnostics (it shows that a release wakes only the next waiter).
    pub fn list_count(&self) -> u64 {
        self.lists.load(Ordering::Relaxed)
    }

    /// Waits until the lock is held. Fails with [`Error::SessionLost`] if
    /// the session is lost first, or with the client's error when the
    /// cluster cannot be reached.
    pub async fn lock(&self) -> Result<MutexGuard> {
        match self.acquire(None).await? {
            Some(g) => Ok(g),
            None => Err(Error::SessionLost(format!(
                "{}: acquisition ended without the lock",
                self.dir
            ))),
        }
    }

    /// Takes the lock if nobody holds it or waits for it; `Ok(None)`
    /// otherwise (our contender node is deleted again).
    pub async fn try_lock(&self) -> Result<Option<MutexGuard>> {
        self.acquire(Some(Instant::now())).await
    }

    /// Like [`Mutex::lock`], giving up after `timeout` with `Ok(None)` (our
    /// contender node is deleted again).
    pub async fn lock_timeout(&self, timeout: Duration) -> Result<Option<MutexGuard>> {
        self.acquire(Some(Instant::now() + timeout)).await
    }

    fn lost_error(&self) -> Error {
        Error::SessionLost(self.session.reason())
    }

    /// Ensures the directory exists as a container.
    async fn ensure_dir(&self) -> Result<()> {
        ensure_container(&self.client, &self.dir).await
    }

    /// Creates our contender node.
    async fn create_node(&self) -> Result<proto::Node> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = self
                .client
                .create_protected(proto::CreateRequest {
                    path: format!("{}/{LOCK_PREFIX}", self.dir),
                    session_id: self.session.id,
                    sequential: true,
                    ..Default::default()
                })
                .await;
            match r {
                Ok(r) => {
                    return r.node.ok_or_else(|| {
                        Error::Rpc(tonic::Status::internal("create answered without a node"))
                    })
                }
                Err(Error::NotFound(m)) if m.starts_with("session expired") => {
                    return Err(Error::SessionLost(m))
                }
                Err(Error::NotFound(_)) if attempt < CREATE_ATTEMPTS => self.ensure_dir().await?,
                Err(e) => return Err(e),
            }
        }
    }

    async fn acquire(&self, deadline: Option<Instant>) -> Result<Option<MutexGuard>> {
        if self.session.is_lost() {
            return Err(self.lost_error());
        }
        let node = self.create_node().await?;
        let token = node.create_revision;
        let mut cleanup = Cleanup {
            client: self.client.clone(),
            node: Some((node.path.clone(), token)),
        };
        let node_prefix = format!("{}/{LOCK_PREFIX}", self.dir);
        loop {
            self.lists.fetch_add(1, Ordering::Relaxed);
            let list = match self.client.list(self.dir.clone()).await {
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
            let mut contenders: Vec<(u64, &proto::Node)> = list
                .children
                .iter()
                .filter_map(|c| Some((seq_of(&node_prefix, &c.path)?, c)))
                .collect();
            contenders.sort_by_key(|(seq, _)| *seq);
            let Some(pos) = contenders
                .iter()
                .position(|(_, c)| c.path == node.path && c.create_revision == token)
            else {
                cleanup.disarm();
                return Err(self.node_gone(&node.path));
            };
            if pos == 0 {
                cleanup.disarm();
                return Ok(Some(MutexGuard {
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
            let pred = contenders[pos - 1].1.path.clone();
            let rev = list.header.as_ref().map_or(0, |h| h.revision);
            let mut watcher = self.client.watch(WatchOptions {
                no_put: true,
                ..WatchOptions::key(pred).from_revision(rev + 1)
            });
            let pred_deleted = async {
                loop {
                    match watcher.next().await {
                        Ok(ev) if ev.kind == WatchEventKind::Delete => return Ok(()),
                        Ok(_) => {}
                        Err(e) => return Err(e),
                    }
                }
            };
            tokio::select! {
                r = pred_deleted => match r {
                    Ok(()) => {}
                    // History gone: the list tells the current state.
                    Err(Error::Compacted { .. }) => {}
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

    fn node_gone(&self, path: &str) -> Error {
        if self.session.is_lost() {
            self.lost_error()
        } else {
            Error::SessionLost(format!(
                "lock node {path} was deleted (session {})",
                self.session.id
            ))
        }
    }
}

/// A held [`Mutex`]. Release it with [`MutexGuard::unlock`]; dropping it
/// releases in the background (best effort, when a Tokio runtime is
/// running), and the session's end releases it in any case.
///
/// # Fencing
///
/// Holding the guard does not prove the lock is still held *now*: the
/// process may have been paused (GC, swap, a stopped VM) past its session's
/// TTL while the lock moved on. Two defences:
///
/// * **Writes to lockd**: use [`MutexGuard::guarded_txn`] (or add
///   [`holds_lock_compare`] to a transaction). The server applies it only
///   if our lock node still exists with our token as `create_revision`, so a
///   stale holder's write is rejected (the transaction does not succeed).
/// * **External resources**: pass [`MutexGuard::fencing_token`] with every
///   request. The resource remembers the highest token it has accepted for
///   this lock and rejects requests with a lower one (for a database: `UPDATE
///   ... SET fence = $token WHERE fence <= $token`, or a compare-and-set on a
///   stored token). Tokens of successive holders strictly increase, so once
///   a newer holder has been seen the paused one can no longer act.
///
/// [`MutexGuard::lost`] resolves when the lock must be assumed gone
/// (session lost, or our node deleted): stop work that relies on it.
#[derive(Debug)]
pub struct MutexGuard {
    client: Client,
    session: SessionHandle,
    name: String,
    path: String,
    token: u64,
    released: bool,
}

impl MutexGuard {
    /// The fencing token: our node's `create_revision`, strictly increasing
    /// across successive holders of the lock.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Our contender node, e.g. `/locks/build/lock-0000000042`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The lock directory.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The session owning our node.
    pub fn session_id(&self) -> u64 {
        self.session.id
    }

    /// True once the session is lost (the lock must be assumed gone). Does
    /// not notice a node deleted by someone else; see [`MutexGuard::lost`].
    pub fn is_lost(&self) -> bool {
        self.session.is_lost()
    }

    /// The compare that holds only while this acquisition holds the lock;
    /// see [`holds_lock_compare`].
    pub fn compare(&self) -> proto::Compare {
        holds_lock_compare(self.path.clone(), self.token)
    }

    /// Runs `req` with [`MutexGuard::compare`] added to its compares: it
    /// applies its `success` ops only while we still hold the lock.
    /// `succeeded == false` means one of the compares failed (ours
    /// included); check [`MutexGuard::is_lost`] or re-read to tell which.
    pub async fn guarded_txn(&self, mut req: proto::TxnRequest) -> Result<proto::TxnResponse> {
        req.compare.push(self.compare());
        self.client.txn(req).await
    }

    /// A future that resolves, with the reason, once the lock must be
    /// assumed gone: the session is lost, or our node was deleted (e.g. by
    /// an operator). Independent of `self`, so it can be raced against work.
    pub fn lost(&self) -> impl Future<Output = String> + Send + 'static {
        let client = self.client.clone();
        let session = self.session.clone();
        let path = self.path.clone();
        let token = self.token;
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
                            tokio::time::sleep(Duration::from_millis(500)).await;
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
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            };
            tokio::select! {
                why = session.lost() => format!("session lost: {why}"),
                why = node_gone => why,
            }
        }
    }

    /// Releases the lock (deletes our node if it is still ours). `Ok` also
    /// when the node was already gone.
    pub async fn unlock(mut self) -> Result<()> {
        self.released = true;
        delete_node(&self.client, &self.path, self.token).await
    }
}

impl Drop for MutexGuard {
    fn drop(&mut self) {
        if !self.released {
            spawn_delete(self.client.clone(), self.path.clone(), self.token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers() {
        let p = "/locks/a/lock-";
        assert_eq!(seq_of(p, "/locks/a/lock-0000000042"), Some(42));
        assert_eq!(seq_of(p, "/locks/a/lock-"), None);
        assert_eq!(seq_of(p, "/locks/a/lock-00x"), None);
        assert_eq!(seq_of(p, "/locks/a/other-0000000001"), None);
    }

    #[test]
    fn compare_targets_create_revision() {
        let c = holds_lock_compare("/l/lock-0000000001", 7);
        assert_eq!(c.op, proto::compare::Op::Equal as i32);
        assert_eq!(c.target, Some(proto::compare::Target::CreateRevision(7)));
    }
}
