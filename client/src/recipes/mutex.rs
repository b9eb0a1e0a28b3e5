//! [`Mutex`]: a distributed lock (Curator's `InterProcessMutex`).

use std::future::Future;
use std::time::Duration;

use lockd_proto::v1 as proto;
use tokio::time::Instant;

use super::queue::{held_node_accessors, Decision, Entry, HeldNode, Queue};
use crate::client::Client;
use crate::session::Session;
use crate::Result;

pub use lockd_proto::layout::LOCK_PREFIX;

/// The compare that holds only while the lock node `node_path`, created at
/// revision `token`, still exists: `create_revision(node_path) == token`.
///
/// Added to a transaction, it makes the transaction apply only while that
/// acquisition still holds the lock (a deleted node has `create_revision`
/// 0, and a later node at the same path has a higher one). This is what
/// [`MutexGuard::guarded_txn`] adds; use it directly when the token and
/// path were handed over from another process (e.g. `lockctl lock` exports
/// `LOCKD_FENCING_TOKEN`).
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use lockd_client::proto;
/// use lockd_client::recipes::holds_lock_compare;
///
/// // In a command run by `lockctl lock /locks/build -- CMD`:
/// let path = std::env::var("LOCKD_LOCK_PATH").unwrap_or_default();
/// let token: u64 = std::env::var("LOCKD_FENCING_TOKEN")
///     .ok()
///     .and_then(|t| t.parse().ok())
///     .unwrap_or(0);
/// let r = client
///     .txn(proto::TxnRequest {
///         compare: vec![holds_lock_compare(path, token)],
///         success: vec![proto::Op {
///             op: Some(proto::op::Op::Delete(proto::DeleteRequest {
///                 path: "/build/scratch".into(),
///                 ..Default::default()
///             })),
///         }],
///         ..Default::default()
///     })
///     .await?;
/// if !r.succeeded {
///     eprintln!("the lock moved on: nothing done");
/// }
/// # Ok(())
/// # }
/// ```
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
/// [`Error::SessionLost`](crate::Error::SessionLost). If it is cancelled (the future dropped) or
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
    queue: Queue,
}

/// The lowest contender holds; the others wait for their predecessor.
fn decide(q: &[Entry], pos: usize) -> Decision {
    match pos {
        0 => Decision::Hold,
        _ => Decision::WaitFor(q[pos - 1].path.clone()),
    }
}

impl Mutex {
    /// A lock on the directory `name` (e.g. `/locks/build`), whose contender
    /// nodes are owned by `session`. Nothing is sent until a lock call.
    pub fn new(client: Client, name: impl Into<String>, session: &Session) -> Mutex {
        Mutex {
            queue: Queue::new(client, name, session),
        }
    }

    /// The lock directory.
    pub fn name(&self) -> &str {
        &self.queue.dir
    }

    /// How many times this mutex (and its clones) listed the lock directory:
    /// once per acquisition attempt plus once per predecessor deletion seen.
    /// Diagnostics (it shows that a release wakes only the next waiter).
    pub fn list_count(&self) -> u64 {
        self.queue.list_count()
    }

    /// Waits until the lock is held. Fails with [`Error::SessionLost`](crate::Error::SessionLost) if
    /// the session is lost first, or with the client's error when the
    /// cluster cannot be reached.
    pub async fn lock(&self) -> Result<MutexGuard> {
        let inner = self.queue.hold(&[LOCK_PREFIX], 0, decide).await?;
        Ok(MutexGuard { inner })
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

    async fn acquire(&self, deadline: Option<Instant>) -> Result<Option<MutexGuard>> {
        let held = self
            .queue
            .acquire(&[LOCK_PREFIX], 0, deadline, decide)
            .await?;
        Ok(held.map(|inner| MutexGuard { inner }))
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
///
/// ```no_run
/// # async fn demo(mutex: lockd_client::recipes::Mutex) -> Result<(), lockd_client::Error> {
/// use lockd_client::proto;
///
/// let guard = mutex.lock().await?;
/// let write = proto::TxnRequest {
///     success: vec![proto::Op {
///         op: Some(proto::op::Op::Put(proto::PutRequest {
///             path: "/build/state".into(),
///             data: format!("token={}", guard.fencing_token()).into_bytes(),
///             ..Default::default()
///         })),
///     }],
///     ..Default::default()
/// };
/// tokio::select! {
///     r = guard.guarded_txn(write) => {
///         if !r?.succeeded {
///             println!("fenced off: the lock moved on");
///         }
///     }
///     why = guard.lost() => println!("lock lost: {why}"),
/// }
/// guard.unlock().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct MutexGuard {
    inner: HeldNode,
}

held_node_accessors!(MutexGuard, "lock", "/locks/build/lock-0000000042");

impl MutexGuard {
    /// A future that resolves, with the reason, once the lock must be
    /// assumed gone: the session is lost, or our node was deleted (e.g. by
    /// an operator). Independent of `self`, so it can be raced against work.
    pub fn lost(&self) -> impl Future<Output = String> + Send + 'static {
        self.inner.lost_or_deleted()
    }

    /// Releases the lock (deletes our node if it is still ours). `Ok` also
    /// when the node was already gone.
    pub async fn unlock(self) -> Result<()> {
        self.inner.release().await
    }
}

#[cfg(test)]
mod tests {
    use super::super::queue::seq_of;
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

    #[test]
    fn lowest_holds_others_wait_for_their_predecessor() {
        let q: Vec<Entry> = (0..3)
            .map(|i| Entry {
                seq: 10 + i,
                kind: 0,
                path: format!("/l/lock-{i}"),
            })
            .collect();
        assert!(matches!(decide(&q, 0), Decision::Hold));
        assert!(matches!(decide(&q, 2), Decision::WaitFor(p) if p == "/l/lock-1"));
    }
}
