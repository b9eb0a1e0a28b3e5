//! [`Semaphore`]: a distributed counting semaphore (Curator's
//! `InterProcessSemaphoreV2`).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::queue::{held_node_accessors, Decision, Entry, HeldNode, Queue};
use crate::client::Client;
use crate::session::Session;
use crate::Result;

pub use lockd_proto::layout::PERMIT_PREFIX;

/// A distributed semaphore with `N` leases on a directory such as
/// `/semaphores/db-pool` (Curator's `InterProcessSemaphoreV2` semantics:
/// at most `N` leases are held at once, each owned by a session).
///
/// # Layout and algorithm
///
/// A queue: each acquisition creates an ephemeral-sequential child
/// `NAME/permit-` of a container directory (the [`Mutex`](super::Mutex)
/// layout), and **the first `N` children in sequence order hold a lease**.
/// A contender further back watches the directory for deletions and lists
/// again when a node ahead of it goes. Leases are therefore granted in
/// arrival order (fair, no starvation), and one node per contender is all
/// the state there is (no internal mutex, no lease counter to repair after a
/// crash: a dead holder's session deletes its node).
///
/// Every client of one semaphore must use the same `N`. A release wakes all
/// waiters' watches (each lists once), unlike the Mutex's predecessor watch;
/// fine for the small waiter counts semaphores see.
///
/// The **fencing token** of a lease is its node's `create_revision`.
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// use lockd_client::recipes::Semaphore;
///
/// let session = client.open_session(Duration::from_secs(10)).await?;
/// let sem = Semaphore::new(client.clone(), "/semaphores/db-pool", 3, &session);
/// let lease = sem.acquire().await?;
/// // ... at most 3 holders run this at once ...
/// lease.release().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Semaphore {
    queue: Queue,
    leases: usize,
}

impl Semaphore {
    /// A semaphore on the directory `name` with `leases` leases (at least 1),
    /// whose nodes are owned by `session`. Nothing is sent until an acquire.
    pub fn new(
        client: Client,
        name: impl Into<String>,
        leases: usize,
        session: &Session,
    ) -> Semaphore {
        Semaphore {
            queue: Queue::new(client, name, session),
            leases: leases.max(1),
        }
    }

    /// The semaphore directory.
    pub fn name(&self) -> &str {
        &self.queue.dir
    }

    /// The number of leases.
    pub fn leases(&self) -> usize {
        self.leases
    }

    /// Waits until a lease is held. Fails with [`Error::SessionLost`](crate::Error::SessionLost) if
    /// the session is lost first.
    pub async fn acquire(&self) -> Result<Lease> {
        let inner = self.queue.hold(&[PERMIT_PREFIX], 0, self.decide()).await?;
        Ok(Lease { inner })
    }

    /// Like [`Semaphore::acquire`], giving up after `timeout` with
    /// `Ok(None)` (our node is deleted again).
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<Option<Lease>> {
        self.acquire_until(Some(Instant::now() + timeout)).await
    }

    async fn acquire_until(&self, deadline: Option<Instant>) -> Result<Option<Lease>> {
        let held = self
            .queue
            .acquire(&[PERMIT_PREFIX], 0, deadline, self.decide())
            .await?;
        Ok(held.map(|inner| Lease { inner }))
    }

    /// The first `leases` nodes hold; the others wait for any deletion
    /// ahead of them.
    fn decide(&self) -> impl Fn(&[Entry], usize) -> Decision {
        let n = self.leases;
        move |_, pos| {
            if pos < n {
                Decision::Hold
            } else {
                Decision::WaitAnyEarlier
            }
        }
    }
}

/// A lease of a [`Semaphore`]. Release it with [`Lease::release`];
/// dropping it releases in the background, and the session's end releases
/// it in any case. See [`MutexGuard`](super::MutexGuard) for fencing.
///
/// ```no_run
/// # async fn demo(sem: lockd_client::recipes::Semaphore) -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
///
/// if let Some(lease) = sem.acquire_timeout(Duration::from_secs(5)).await? {
///     println!("lease {} (token {})", lease.path(), lease.fencing_token());
///     lease.release().await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Lease {
    inner: HeldNode,
}

held_node_accessors!(Lease, "semaphore", "/semaphores/db-pool/permit-0000000042");

impl Lease {
    /// Resolves, with the reason, once the session is lost.
    pub fn lost(&self) -> impl Future<Output = String> + Send + 'static {
        self.inner.lost()
    }

    /// Returns the lease (deletes our node if it is still ours).
    pub async fn release(self) -> Result<()> {
        self.inner.release().await
    }
}
