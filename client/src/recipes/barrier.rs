//! [`Barrier`] and [`DoubleBarrier`] (Curator's `DistributedBarrier` and
//! `DistributedDoubleBarrier`, the ZooKeeper barrier recipes).

use std::time::Duration;

use lockd_proto::v1 as proto;
use tokio::time::Instant;

use super::queue::{seq_of, sleep_until_opt, trim_dir, Cleanup, Queue};
use crate::client::Client;
use crate::error::Error;
use crate::session::Session;
use crate::watch::{WatchEventKind, WatchOptions};
use crate::Result;

pub use lockd_proto::layout::MEMBER_PREFIX;

pub use lockd_proto::layout::READY_NODE;

/// Waits for the first `kind` event on `path` at or after revision `from`.
/// A compacted history counts as an event (the caller re-reads).
async fn wait_event(client: &Client, path: &str, from: u64, kind: WatchEventKind) -> Result<()> {
    let mut w = client.watch(WatchOptions {
        no_put: kind == WatchEventKind::Delete,
        no_delete: kind == WatchEventKind::Put,
        ..WatchOptions::key(path).from_revision(from)
    });
    loop {
        match w.next().await {
            Ok(ev) if ev.kind == kind => return Ok(()),
            Ok(_) => {}
            Err(Error::Compacted { .. }) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Deletes `path`; `Ok` when it is already gone.
async fn delete_if_exists(client: &Client, path: &str) -> Result<()> {
    let mut ambiguous = 0;
    loop {
        match client.delete(path).await {
            Ok(_) | Err(Error::NotFound(_)) => return Ok(()),
            Err(Error::Ambiguous(_)) if ambiguous < 3 => ambiguous += 1,
            Err(e) => return Err(e),
        }
    }
}

/// A barrier node that blocks waiters while it exists (Curator's
/// `DistributedBarrier`): a coordinator calls [`Barrier::set_barrier`],
/// workers call [`Barrier::wait_on_barrier`], which returns once the
/// coordinator calls [`Barrier::remove_barrier`].
///
/// The node is persistent (it outlives the session of whoever set it).
/// Waiting is a get, then a key watch for its deletion starting just after
/// the get's revision, so a removal between the two is not missed.
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use lockd_client::recipes::Barrier;
///
/// let barrier = Barrier::new(client.clone(), "/barriers/deploy");
/// barrier.set_barrier().await?;
/// // elsewhere: barrier.wait_on_barrier().await?;
/// barrier.remove_barrier().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Barrier {
    client: Client,
    path: String,
}

impl Barrier {
    /// A barrier whose node is `path` (e.g. `/barriers/deploy`).
    pub fn new(client: Client, path: impl Into<String>) -> Barrier {
        Barrier {
            client,
            path: trim_dir(path.into()),
        }
    }

    /// The barrier node's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Sets the barrier (creates its node, with missing parents). `Ok` if it
    /// is already set.
    pub async fn set_barrier(&self) -> Result<()> {
        let r = self
            .client
            .create_protected(proto::CreateRequest {
                path: self.path.clone(),
                parents: true,
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) | Err(Error::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes the barrier (deletes its node), releasing all waiters. `Ok`
    /// if it is not set.
    pub async fn remove_barrier(&self) -> Result<()> {
        delete_if_exists(&self.client, &self.path).await
    }

    /// True while the barrier is set.
    pub async fn is_set(&self) -> Result<bool> {
        Ok(self.state().await?.is_some())
    }

    /// `Some(revision)` of the read if the node exists, `None` if not.
    async fn state(&self) -> Result<Option<u64>> {
        match self.client.get(self.path.clone()).await {
            Ok(r) if r.node.is_some() => Ok(Some(r.header.map_or(0, |h| h.revision))),
            Ok(_) | Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits until the barrier is not set (returns at once if it is not).
    pub async fn wait_on_barrier(&self) -> Result<()> {
        self.wait_until(None).await.map(|_| ())
    }

    /// Like [`Barrier::wait_on_barrier`], giving up after `timeout`:
    /// `Ok(true)` if the barrier is gone, `Ok(false)` on timeout.
    pub async fn wait_on_barrier_timeout(&self, timeout: Duration) -> Result<bool> {
        self.wait_until(Some(Instant::now() + timeout)).await
    }

    async fn wait_until(&self, deadline: Option<Instant>) -> Result<bool> {
        loop {
            let Some(rev) = self.state().await? else {
                return Ok(true);
            };
            tokio::select! {
                r = wait_event(&self.client, &self.path, rev + 1, WatchEventKind::Delete) => r?,
                _ = sleep_until_opt(deadline) => return Ok(false),
            }
        }
    }
}

/// A double barrier for `N` members (Curator's `DistributedDoubleBarrier`,
/// the ZooKeeper double-barrier recipe): [`DoubleBarrier::enter`] blocks
/// until `N` members have entered, [`DoubleBarrier::leave`] until all of
/// them have left.
///
/// # Layout and algorithm
///
/// A container directory `NAME` holding one ephemeral-sequential
/// `NAME/member-` node per member (owned by its session) and, once `N`
/// members are in, a persistent `NAME/ready` node.
///
/// * **Enter**: create our member node, list; if `ready` exists, or at
///   least `N` members are listed (then create `ready`), we are in;
///   otherwise watch `ready` (from the list's revision + 1) and list again.
/// * **Leave**: list the members; none left: done. Only ours: delete
///   `ready`, then ours, done. Ours is the lowest: wait for the highest to
///   go. Otherwise delete ours (if still there) and wait for the lowest to
///   go. Then list again. Each waiter watches one node.
///
/// Every member must use the same `N`. A member whose session is lost
/// counts as having left. Leave waits for the members present when it
/// began (members created later are the next round's), so a member that
/// finished leaving may enter again at once. One `DoubleBarrier` is one member; rounds can be
/// repeated (enter, leave, enter, ...) once all members of a round left.
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// use lockd_client::recipes::DoubleBarrier;
///
/// let session = client.open_session(Duration::from_secs(10)).await?;
/// let mut b = DoubleBarrier::new(client.clone(), "/barriers/job", 4, &session);
/// b.enter().await?; // all 4 members are here
/// // ... compute ...
/// b.leave().await?; // all 4 members are done
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct DoubleBarrier {
    queue: Queue,
    members: usize,
    /// Our member node and its `create_revision`, between enter and leave.
    node: Option<(String, u64)>,
    /// Revision of the first list of the current leave: members created
    /// after it belong to the next round.
    leaving_since: Option<u64>,
}

impl DoubleBarrier {
    /// A member of the double barrier on directory `name` for `members`
    /// members (at least 1), its node owned by `session`.
    pub fn new(
        client: Client,
        name: impl Into<String>,
        members: usize,
        session: &Session,
    ) -> DoubleBarrier {
        DoubleBarrier {
            queue: Queue::new(client, name, session),
            members: members.max(1),
            node: None,
            leaving_since: None,
        }
    }

    /// The barrier directory.
    pub fn name(&self) -> &str {
        &self.queue.dir
    }

    /// Our member node while entered (or entering), e.g.
    /// `/barriers/job/member-0000000003`.
    pub fn node(&self) -> Option<&str> {
        self.node.as_ref().map(|(p, _)| p.as_str())
    }

    fn ready_path(&self) -> String {
        format!("{}/{READY_NODE}", self.queue.dir)
    }

    /// Enters and waits until `N` members have entered. Calling it again
    /// while entered returns at once.
    pub async fn enter(&mut self) -> Result<()> {
        self.enter_until(None).await.map(|_| ())
    }

    /// Like [`DoubleBarrier::enter`], giving up after `timeout` with
    /// `Ok(false)` (our member node is deleted again).
    pub async fn enter_timeout(&mut self, timeout: Duration) -> Result<bool> {
        self.enter_until(Some(Instant::now() + timeout)).await
    }

    /// Leaves and waits until every member has left.
    pub async fn leave(&mut self) -> Result<()> {
        self.leave_until(None).await.map(|_| ())
    }

    /// Like [`DoubleBarrier::leave`], giving up after `timeout` with
    /// `Ok(false)` (our node may already be deleted; call again to finish).
    pub async fn leave_timeout(&mut self, timeout: Duration) -> Result<bool> {
        self.leave_until(Some(Instant::now() + timeout)).await
    }

    async fn list(&self) -> Result<(Vec<(u64, proto::Node)>, bool, u64)> {
        let list = match self.queue.client.list(self.queue.dir.clone()).await {
            Ok(l) => l,
            Err(Error::NotFound(_)) => return Ok((Vec::new(), false, 0)),
            Err(e) => return Err(e),
        };
        let prefix = format!("{}/{MEMBER_PREFIX}", self.queue.dir);
        let ready = self.ready_path();
        let has_ready = list.children.iter().any(|c| c.path == ready);
        let mut members: Vec<(u64, proto::Node)> = list
            .children
            .into_iter()
            .filter_map(|c| Some((seq_of(&prefix, &c.path)?, c)))
            .collect();
        members.sort_by_key(|(s, _)| *s);
        let rev = list.header.map_or(0, |h| h.revision);
        Ok((members, has_ready, rev))
    }

    async fn enter_until(&mut self, deadline: Option<Instant>) -> Result<bool> {
        if self.queue.session.is_lost() {
            return Err(self.queue.lost_error());
        }
        if self.node.is_some() {
            return Ok(true);
        }
        let node = self.queue.create_node(MEMBER_PREFIX).await?;
        let mut cleanup = Cleanup {
            client: self.queue.client.clone(),
            node: Some((node.path.clone(), node.create_revision)),
        };
        let ready = self.ready_path();
        loop {
            let (members, has_ready, rev) = match self.list().await {
                Ok(l) => l,
                Err(e) => {
                    cleanup.now().await;
                    return Err(e);
                }
            };
            if !members.iter().any(|(_, m)| m.path == node.path) {
                cleanup.disarm();
                return Err(Error::SessionLost(format!(
                    "member node {} was deleted",
                    node.path
                )));
            }
            let mut entered = has_ready;
            if !entered && members.len() >= self.members {
                let r = self
                    .queue
                    .client
                    .create_protected(proto::CreateRequest {
                        path: ready.clone(),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(_) | Err(Error::AlreadyExists(_)) => entered = true,
                    Err(e) => {
                        cleanup.now().await;
                        return Err(e);
                    }
                }
            }
            if entered {
                cleanup.disarm();
                self.node = Some((node.path.clone(), node.create_revision));
                return Ok(true);
            }
            tokio::select! {
                r = wait_event(&self.queue.client, &ready, rev + 1, WatchEventKind::Put) => {
                    if let Err(e) = r {
                        cleanup.now().await;
                        return Err(e);
                    }
                }
                _ = self.queue.session.lost() => {
                    cleanup.now().await;
                    return Err(self.queue.lost_error());
                }
                _ = sleep_until_opt(deadline) => {
                    cleanup.now().await;
                    return Ok(false);
                }
            }
        }
    }

    async fn leave_until(&mut self, deadline: Option<Instant>) -> Result<bool> {
        let client = self.queue.client.clone();
        loop {
            let (mut members, _, rev) = self.list().await?;
            // This round's members: those created before we began leaving.
            // A member already back for the next round is not waited for.
            let since = *self.leaving_since.get_or_insert(rev);
            members.retain(|(_, m)| m.create_revision <= since);
            let ours = self.node.as_ref().and_then(|(p, t)| {
                members
                    .iter()
                    .position(|(_, m)| &m.path == p && m.create_revision == *t)
            });
            if members.is_empty() {
                self.node = None;
                self.leaving_since = None;
                return Ok(true);
            }
            let wait_for = match ours {
                Some(_) if members.len() == 1 => {
                    // The last one: clear `ready` for the next round, then go.
                    delete_if_exists(&client, &self.ready_path()).await?;
                    if let Some((p, t)) = self.node.take() {
                        super::queue::delete_node(&client, &p, t).await?;
                    }
                    self.leaving_since = None;
                    return Ok(true);
                }
                Some(0) => members[members.len() - 1].1.path.clone(),
                _ => {
                    if let Some((p, t)) = self.node.take() {
                        super::queue::delete_node(&client, &p, t).await?;
                    }
                    members[0].1.path.clone()
                }
            };
            tokio::select! {
                r = wait_event(&client, &wait_for, rev + 1, WatchEventKind::Delete) => r?,
                _ = sleep_until_opt(deadline) => return Ok(false),
            }
        }
    }
}
