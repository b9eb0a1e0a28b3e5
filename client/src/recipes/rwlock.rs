//! [`RwLock`]: a distributed read-write lock (Curator's
//! `InterProcessReadWriteLock`).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::queue::{held_node_accessors, Decision, Entry, HeldNode, Queue};
use crate::client::Client;
use crate::session::Session;
use crate::Result;

pub use lockd_proto::layout::READ_PREFIX;
pub use lockd_proto::layout::WRITE_PREFIX;

const PREFIXES: [&str; 2] = [READ_PREFIX, WRITE_PREFIX];
const READ: usize = 0;
const WRITE: usize = 1;

/// A distributed read-write lock on a directory such as `/locks/db`
/// (Curator's `InterProcessReadWriteLock`, without reentrancy or
/// downgrading): any number of readers share it, a writer holds it alone.
///
/// # Layout and algorithm
///
/// The lock layout of [`Mutex`](super::Mutex), with two kinds of
/// ephemeral-sequential children in the same container directory:
/// `NAME/read-` and `NAME/write-`. Both take their sequence number from the
/// directory's single counter, so the children form one queue in arrival
/// order.
///
/// * A **reader** holds when no `write-` node precedes it; otherwise it
///   watches only the nearest preceding `write-` node and lists again when
///   it goes.
/// * A **writer** holds when its node is the lowest; otherwise it watches
///   its immediate predecessor (reader or writer).
///
/// Writers are not starved: a reader arriving after a waiting writer has
/// that writer ahead of it, so it queues behind it instead of joining the
/// current readers.
///
/// The **fencing token** of an acquisition is its node's `create_revision`,
/// as for [`Mutex`](super::Mutex). Tokens of successive *writers* strictly
/// increase; concurrent readers have distinct tokens, each greater than the
/// token of every writer that held before them.
///
/// Session loss, cancellation and timeouts behave as for
/// [`Mutex`](super::Mutex).
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// use lockd_client::recipes::RwLock;
///
/// let session = client.open_session(Duration::from_secs(10)).await?;
/// let lock = RwLock::new(client.clone(), "/locks/db", &session);
/// let r = lock.read().await?;
/// // ... read, alongside other readers ...
/// r.unlock().await?;
/// let w = lock.write().await?;
/// println!("exclusive, token {}", w.fencing_token());
/// w.unlock().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RwLock {
    queue: Queue,
}

/// Which side of a [`RwLock`] a guard holds.
///
/// ```no_run
/// # async fn demo(lock: lockd_client::recipes::RwLock) -> Result<(), lockd_client::Error> {
/// use lockd_client::recipes::RwLockMode;
///
/// let guard = lock.read().await?;
/// assert_eq!(guard.mode(), RwLockMode::Read);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RwLockMode {
    /// Shared with other readers.
    Read,
    /// Exclusive.
    Write,
}

impl RwLock {
    /// A read-write lock on the directory `name` (e.g. `/locks/db`), whose
    /// nodes are owned by `session`. Nothing is sent until a lock call.
    pub fn new(client: Client, name: impl Into<String>, session: &Session) -> RwLock {
        RwLock {
            queue: Queue::new(client, name, session),
        }
    }

    /// The lock directory.
    pub fn name(&self) -> &str {
        &self.queue.dir
    }

    /// Waits until a read (shared) lock is held.
    pub async fn read(&self) -> Result<RwLockGuard> {
        self.wait(RwLockMode::Read).await
    }

    /// Waits until the write (exclusive) lock is held.
    pub async fn write(&self) -> Result<RwLockGuard> {
        self.wait(RwLockMode::Write).await
    }

    /// Like [`RwLock::read`], giving up after `timeout` with `Ok(None)`.
    pub async fn read_timeout(&self, timeout: Duration) -> Result<Option<RwLockGuard>> {
        self.acquire(RwLockMode::Read, Some(Instant::now() + timeout))
            .await
    }

    /// Like [`RwLock::write`], giving up after `timeout` with `Ok(None)`.
    pub async fn write_timeout(&self, timeout: Duration) -> Result<Option<RwLockGuard>> {
        self.acquire(RwLockMode::Write, Some(Instant::now() + timeout))
            .await
    }

    async fn wait(&self, mode: RwLockMode) -> Result<RwLockGuard> {
        let decide = move |q: &[Entry], pos: usize| decide(mode, q, pos);
        let inner = self.queue.hold(&PREFIXES, kind(mode), decide).await?;
        Ok(RwLockGuard { inner, mode })
    }

    async fn acquire(
        &self,
        mode: RwLockMode,
        deadline: Option<Instant>,
    ) -> Result<Option<RwLockGuard>> {
        let decide = move |q: &[Entry], pos: usize| decide(mode, q, pos);
        let held = self
            .queue
            .acquire(&PREFIXES, kind(mode), deadline, decide)
            .await?;
        Ok(held.map(|inner| RwLockGuard { inner, mode }))
    }
}

fn kind(mode: RwLockMode) -> usize {
    match mode {
        RwLockMode::Read => READ,
        RwLockMode::Write => WRITE,
    }
}

fn decide(mode: RwLockMode, q: &[Entry], pos: usize) -> Decision {
    match mode {
        RwLockMode::Write if pos == 0 => Decision::Hold,
        RwLockMode::Write => Decision::WaitFor(q[pos - 1].path.clone()),
        RwLockMode::Read => match q[..pos].iter().rev().find(|e| e.kind == WRITE) {
            None => Decision::Hold,
            Some(w) => Decision::WaitFor(w.path.clone()),
        },
    }
}

/// A held [`RwLock`] (read or write). Release it with
/// [`RwLockGuard::unlock`]; dropping it releases in the background, and the
/// session's end releases it in any case. See
/// [`MutexGuard`](super::MutexGuard) for fencing.
///
/// ```no_run
/// # async fn demo(lock: lockd_client::recipes::RwLock) -> Result<(), lockd_client::Error> {
/// let guard = lock.write().await?;
/// println!("{:?} {} (token {})", guard.mode(), guard.path(), guard.fencing_token());
/// guard.unlock().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RwLockGuard {
    inner: HeldNode,
    mode: RwLockMode,
}

held_node_accessors!(RwLockGuard, "lock", "/locks/db/write-0000000042");

impl RwLockGuard {
    /// Read or write.
    pub fn mode(&self) -> RwLockMode {
        self.mode
    }

    /// Resolves, with the reason, once the session is lost. Independent of
    /// `self`, so it can be raced against work.
    pub fn lost(&self) -> impl Future<Output = String> + Send + 'static {
        self.inner.lost()
    }

    /// Releases the lock (deletes our node if it is still ours).
    pub async fn unlock(self) -> Result<()> {
        self.inner.release().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(kinds: &[usize]) -> Vec<Entry> {
        kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| Entry {
                seq: i as u64,
                kind,
                path: format!("/l/{}{i}", PREFIXES[kind]),
            })
            .collect()
    }

    fn waits_for(d: Decision) -> Option<String> {
        match d {
            Decision::Hold => None,
            Decision::WaitFor(p) => Some(p),
            Decision::WaitAnyEarlier => Some("*".into()),
        }
    }

    #[test]
    fn readers_share_writers_queue() {
        let queue = q(&[READ, READ, WRITE, READ, WRITE]);
        assert_eq!(waits_for(decide(RwLockMode::Read, &queue, 1)), None);
        assert_eq!(
            waits_for(decide(RwLockMode::Write, &queue, 2)).as_deref(),
            Some("/l/read-1")
        );
        // A reader behind a waiting writer waits for that writer.
        assert_eq!(
            waits_for(decide(RwLockMode::Read, &queue, 3)).as_deref(),
            Some("/l/write-2")
        );
        assert_eq!(
            waits_for(decide(RwLockMode::Write, &queue, 4)).as_deref(),
            Some("/l/read-3")
        );
    }
}
