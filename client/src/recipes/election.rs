//! [`LeaderElection`]: leader election in the style of client-go's
//! `leaderelection` (and Curator's `LeaderLatch`), on the lock layout.

use std::time::Duration;

use lockd_proto::v1 as proto;
use tokio::sync::{mpsc, oneshot, watch};

use crate::client::Client;
use crate::error::Error;
use crate::session::{Session, SessionState};
use crate::watch::{WatchEventKind, WatchOptions};
use crate::Result;

use super::queue::{delete_node, ensure_container, seq_of, trim_dir};

pub use lockd_proto::layout::CANDIDATE_PREFIX;

/// How long to wait before retrying after an error talking to the cluster.
const RETRY_PERIOD: Duration = Duration::from_millis(500);

/// Configuration of a [`LeaderElection`].
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    /// This candidate's identity, stored as its node's data and reported to
    /// observers (e.g. a host name and pid).
    pub identity: String,
    /// TTL of the session that owns the candidate node (client-go's lease
    /// duration): how long after this process dies or is cut off the next
    /// candidate may take over.
    pub lease_ttl: Duration,
}

/// What a campaign reports, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElectionEvent {
    /// We became leader. `fencing_token` is our candidate node's
    /// `create_revision`: it strictly increases across successive terms of
    /// leadership of this election (pass it to resources you write to).
    StartedLeading {
        /// Our node's `create_revision`.
        fencing_token: u64,
        /// Our candidate node (for guarded writes with
        /// [`holds_lock_compare`](super::holds_lock_compare)).
        path: String,
    },
    /// We are no longer leader (resigned, session lost, node deleted or
    /// campaign cancelled). Stop acting as leader.
    StoppedLeading {
        /// Why.
        reason: String,
    },
    /// The observed leader changed (reported for others and for us).
    NewLeader {
        /// The new leader's identity.
        identity: String,
        /// The new leader's fencing token.
        fencing_token: u64,
    },
}

/// A leader election on a directory such as `/elections/scheduler`.
///
/// # Layout and algorithm
///
/// The same as [`Mutex`](super::Mutex): each candidate creates an
/// ephemeral-sequential child `NAME/candidate-` (data: its identity) owned
/// by its own session (TTL [`ElectionConfig::lease_ttl`]) in the container
/// directory `NAME`. The lowest child is the leader; every other candidate
/// watches only its immediate predecessor. The fencing token of a term is
/// the leader node's `create_revision`.
///
/// # What is promised
///
/// * A campaign reports [`ElectionEvent::StoppedLeading`] no later than its
///   session becomes [`SessionState::Lost`] on the client. The client-side
///   Lost is conservative: it fires once the TTL has passed since the
///   *sending* of the last acknowledged keepalive, which is never later
///   than the server's expiry. A new leader can only start once our node is
///   deleted (we resigned, or the server expired the session). Hence, as
///   long as this process is not paused (GC, SIGSTOP, a stopped VM) and its
///   monotonic clock runs at the rate of the server's, the terms of two
///   candidates never overlap in real time: ours ends before theirs begins.
/// * A paused process can still act after its term ended: use the fencing
///   token (or guarded writes) against that.
/// * While the session is [`SessionState::Suspended`] the campaign stays
///   leader (the node may well still exist). As Curator advises, callers
///   that must not act without certainty should pause on Suspended: see
///   [`Campaign::session_state`].
///
/// After a session is lost the campaign opens a new one and campaigns again,
/// until cancelled.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    client: Client,
    dir: String,
    config: ElectionConfig,
}

impl LeaderElection {
    /// An election on the directory `name`. Nothing is sent until
    /// [`LeaderElection::campaign`].
    pub fn new(client: Client, name: impl Into<String>, config: ElectionConfig) -> Self {
        LeaderElection {
            client,
            dir: trim_dir(name.into()),
            config,
        }
    }

    /// The election directory.
    pub fn name(&self) -> &str {
        &self.dir
    }

    /// Starts campaigning in a background task (needs a Tokio runtime) and
    /// keeps campaigning until [`Campaign::cancel`] or drop.
    pub fn campaign(&self) -> Campaign {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(SessionState::Suspended);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        let task = Task {
            client: self.client.clone(),
            dir: self.dir.clone(),
            config: self.config.clone(),
            events: events_tx,
            cmds: cmd_rx,
            state: state_tx,
        };
        tokio::spawn(async move {
            task.run(stop_rx).await;
            let _ = done_tx.send(());
        });
        Campaign {
            events,
            cmds: cmd_tx,
            state,
            stop: Some(stop_tx),
            done: Some(done),
        }
    }

    /// Campaigns until `cancel` resolves, calling `on_event` for every event;
    /// then resigns and closes the session.
    pub async fn run(
        &self,
        cancel: impl std::future::Future<Output = ()>,
        mut on_event: impl FnMut(ElectionEvent),
    ) {
        let mut c = self.campaign();
        tokio::pin!(cancel);
        loop {
            tokio::select! {
                _ = &mut cancel => break,
                ev = c.next() => match ev {
                    Some(ev) => on_event(ev),
                    None => break,
                },
            }
        }
        let rest = c.cancel().await;
        rest.into_iter().for_each(on_event);
    }
}

enum Cmd {
    Resign,
}

/// A running campaign; see [`LeaderElection::campaign`]. Dropping it stops
/// campaigning and releases (deletes our node, closes the session) in the
/// background.
#[derive(Debug)]
pub struct Campaign {
    events: mpsc::UnboundedReceiver<ElectionEvent>,
    cmds: mpsc::UnboundedSender<Cmd>,
    state: watch::Receiver<SessionState>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<()>>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resign")
    }
}

impl Campaign {
    /// The next event; `None` once the campaign has ended.
    pub async fn next(&mut self) -> Option<ElectionEvent> {
        self.events.recv().await
    }

    /// The state of the session currently owning our node (it is replaced
    /// by a new session after a loss). A leader that must not act without
    /// certainty should pause while it is [`SessionState::Suspended`]; the
    /// campaign itself stops leading on [`SessionState::Lost`].
    pub fn session_state(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// Gives up leadership if we hold it: our node is deleted so the next
    /// candidate takes over at once, and we rejoin at the back of the
    /// queue. Does nothing when not leader.
    pub fn resign(&self) {
        let _ = self.cmds.send(Cmd::Resign);
    }

    /// Stops campaigning: resigns (deletes our node), closes the session
    /// and returns the remaining events (including a final
    /// [`ElectionEvent::StoppedLeading`] if we were leader).
    pub async fn cancel(mut self) -> Vec<ElectionEvent> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
        let mut rest = Vec::new();
        while let Ok(ev) = self.events.try_recv() {
            rest.push(ev);
        }
        rest
    }
}

impl Drop for Campaign {
    fn drop(&mut self) {
        // Sending makes the task release; it finishes in the background.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// How a term of leadership (or the wait for one) ended.
enum End {
    /// Resigned or our node vanished: create a new node.
    Recreate,
    /// The session is lost: open a new one.
    SessionLost,
    /// Cancelled: release and return.
    Stop,
}

struct Task {
    client: Client,
    dir: String,
    config: ElectionConfig,
    events: mpsc::UnboundedSender<ElectionEvent>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    state: watch::Sender<SessionState>,
}

impl Task {
    fn emit(&self, ev: ElectionEvent) {
        let _ = self.events.send(ev);
    }

    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        // NewLeader comes from an observer of the whole directory.
        let observer = {
            let events = self.events.clone();
            let mut obs = observe(self.client.clone(), self.dir.clone());
            tokio::spawn(async move {
                while let Some(l) = obs.next().await {
                    if let Some(l) = l {
                        let ev = ElectionEvent::NewLeader {
                            identity: l.identity,
                            fencing_token: l.fencing_token,
                        };
                        if events.send(ev).is_err() {
                            break;
                        }
                    }
                }
            })
        };
        loop {
            let session = tokio::select! {
                r = self.client.open_session(self.config.lease_ttl) => r,
                _ = &mut stop => break,
            };
            let session = match session {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "election: opening a session failed");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_PERIOD) => continue,
                        _ = &mut stop => break,
                    }
                }
            };
            let end = self.with_session(&session, &mut stop).await;
            match end {
                End::Stop => {
                    let _ = session.close().await;
                    break;
                }
                End::SessionLost | End::Recreate => {
                    let _ = self.state.send(SessionState::Lost);
                    drop(session);
                }
            }
        }
        observer.abort();
    }

    /// Campaigns with one session until it is lost or we are stopped.
    async fn with_session(&mut self, session: &Session, stop: &mut oneshot::Receiver<()>) -> End {
        let mut st = session.state();
        let _ = self.state.send(*st.borrow_and_update());
        let forward = {
            let tx = self.state.clone();
            let mut st = st.clone();
            async move {
                loop {
                    if st.changed().await.is_err() {
                        return std::future::pending::<()>().await;
                    }
                    let s = *st.borrow_and_update();
                    let _ = tx.send(s);
                }
            }
        };
        tokio::pin!(forward);
        loop {
            if session.is_lost() {
                return End::SessionLost;
            }
            let node = tokio::select! {
                r = self.create_node(session) => r,
                _ = &mut *stop => return End::Stop,
                _ = &mut forward => unreachable!(),
            };
            let node = match node {
                Ok(n) => n,
                Err(Error::SessionLost(_)) => return End::SessionLost,
                Err(e) => {
                    tracing::debug!(error = %e, "election: creating candidate failed");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_PERIOD) => continue,
                        _ = &mut *stop => return End::Stop,
                        _ = session.lost() => return End::SessionLost,
                    }
                }
            };
            let end = tokio::select! {
                e = self.candidate(session, &node, stop) => e,
                _ = &mut forward => unreachable!(),
            };
            match end {
                End::Recreate => continue,
                End::SessionLost => return End::SessionLost,
                End::Stop => return End::Stop,
            }
        }
    }

    /// Ensures the directory exists as a container.
    async fn ensure_dir(&self) -> Result<()> {
        ensure_container(&self.client, &self.dir).await
    }

    async fn create_node(&self, session: &Session) -> Result<proto::Node> {
        for attempt in 1.. {
            let r = self
                .client
                .create_protected(proto::CreateRequest {
                    path: format!("{}/{CANDIDATE_PREFIX}", self.dir),
                    data: self.config.identity.clone().into_bytes(),
                    session_id: session.id(),
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
                Err(Error::NotFound(_)) if attempt < 5 => self.ensure_dir().await?,
                Err(e) => return Err(e),
            }
        }
        unreachable!()
    }

    /// Waits for leadership with `node`, leads, and reports how it ended.
    async fn candidate(
        &mut self,
        session: &Session,
        node: &proto::Node,
        stop: &mut oneshot::Receiver<()>,
    ) -> End {
        let token = node.create_revision;
        let prefix = format!("{}/{CANDIDATE_PREFIX}", self.dir);
        loop {
            let list = tokio::select! {
                r = self.client.list(self.dir.clone()) => r,
                _ = &mut *stop => return self.release(node, None).await,
                _ = session.lost() => return End::SessionLost,
            };
            let list = match list {
                Ok(l) => l,
                Err(Error::NotFound(_)) => return End::Recreate,
                Err(e) => {
                    tracing::debug!(error = %e, "election: list failed");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_PERIOD) => continue,
                        _ = &mut *stop => return self.release(node, None).await,
                        _ = session.lost() => return End::SessionLost,
                    }
                }
            };
            let rev = list.header.as_ref().map_or(0, |h| h.revision);
            let mut cands: Vec<(u64, &proto::Node)> = list
                .children
                .iter()
                .filter_map(|c| Some((seq_of(&prefix, &c.path)?, c)))
                .collect();
            cands.sort_by_key(|(s, _)| *s);
            let Some(pos) = cands
                .iter()
                .position(|(_, c)| c.path == node.path && c.create_revision == token)
            else {
                // Our node is gone (expired or deleted by someone).
                return if session.is_lost() {
                    End::SessionLost
                } else {
                    End::Recreate
                };
            };
            if pos == 0 {
                return self.lead(session, node, rev, stop).await;
            }
            let pred = cands[pos - 1].1.path.clone();
            let mut w = self.client.watch(WatchOptions {
                no_put: true,
                ..WatchOptions::key(pred).from_revision(rev + 1)
            });
            let deleted = async {
                loop {
                    match w.next().await {
                        Ok(ev) if ev.kind == WatchEventKind::Delete => return,
                        Ok(_) => {}
                        Err(_) => return tokio::time::sleep(RETRY_PERIOD).await,
                    }
                }
            };
            tokio::select! {
                _ = deleted => {}
                _ = &mut *stop => return self.release(node, None).await,
                _ = session.lost() => return End::SessionLost,
                // Resigning while not leader: nothing to give up.
                Some(Cmd::Resign) = self.cmds.recv() => {}
            }
        }
    }

    /// Deletes our node; reports StoppedLeading with `reason` if given.
    async fn release(&self, node: &proto::Node, reason: Option<&str>) -> End {
        if let Some(reason) = reason {
            self.emit(ElectionEvent::StoppedLeading {
                reason: reason.to_string(),
            });
        }
        if let Err(e) = delete_node(&self.client, &node.path, node.create_revision).await {
            tracing::debug!(error = %e, "election: deleting candidate failed");
        }
        End::Stop
    }

    async fn lead(
        &mut self,
        session: &Session,
        node: &proto::Node,
        rev: u64,
        stop: &mut oneshot::Receiver<()>,
    ) -> End {
        self.emit(ElectionEvent::StartedLeading {
            fencing_token: node.create_revision,
            path: node.path.clone(),
        });
        let client = self.client.clone();
        let path = node.path.clone();
        let node_gone = async move {
            let mut w = client.watch(WatchOptions {
                no_put: true,
                ..WatchOptions::key(path.clone()).from_revision(rev + 1)
            });
            loop {
                match w.next().await {
                    Ok(ev) if ev.kind == WatchEventKind::Delete => return,
                    Ok(_) => {}
                    Err(_) => {
                        // Re-check by reading; on errors keep trusting the
                        // session (Lost ends the term anyway).
                        tokio::time::sleep(RETRY_PERIOD).await;
                        match client.get(path.clone()).await {
                            Err(Error::NotFound(_)) => return,
                            Ok(r) => {
                                let r2 = r.header.map_or(0, |h| h.revision);
                                w = client.watch(WatchOptions {
                                    no_put: true,
                                    ..WatchOptions::key(path.clone()).from_revision(r2 + 1)
                                });
                            }
                            Err(_) => {}
                        }
                    }
                }
            }
        };
        tokio::select! {
            why = session.lost() => {
                self.emit(ElectionEvent::StoppedLeading { reason: format!("session lost: {why}") });
                End::SessionLost
            }
            _ = &mut *stop => self.release(node, Some("cancelled")).await,
            _ = node_gone => {
                self.emit(ElectionEvent::StoppedLeading {
                    reason: format!("candidate node {} was deleted", node.path),
                });
                End::Recreate
            }
            Some(Cmd::Resign) = self.cmds.recv() => {
                self.release(node, Some("resigned")).await;
                End::Recreate
            }
        }
    }
}

/// A leader as seen by [`observe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    /// The leader's identity (its node's data).
    pub identity: String,
    /// The leader's fencing token (its node's `create_revision`).
    pub fencing_token: u64,
    /// The leader's node.
    pub path: String,
}

/// Follows the leader of an election without campaigning; see [`observe`].
pub struct LeaderObserver {
    client: Client,
    dir: String,
    prefix: String,
    watcher: Option<crate::watch::Watcher>,
    last: Option<Option<Leader>>,
}

impl std::fmt::Debug for LeaderObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderObserver")
            .field("dir", &self.dir)
            .field("last", &self.last)
            .finish()
    }
}

/// Observes the election `name` without campaigning: watches the directory
/// subtree and reports the lowest candidate. [`LeaderObserver::next`] first
/// returns the current leader (or `None`: no leader), then every change.
pub fn observe(client: Client, name: impl Into<String>) -> LeaderObserver {
    let dir = trim_dir(name.into());
    LeaderObserver {
        prefix: format!("{dir}/{CANDIDATE_PREFIX}"),
        client,
        dir,
        watcher: None,
        last: None,
    }
}

impl LeaderObserver {
    /// The current leader by a linearizable list (and a get of the lowest
    /// child for its data: a list omits data), and the list's revision.
    async fn current(&self) -> Result<(Option<Leader>, u64)> {
        loop {
            let l = match self.client.list(self.dir.clone()).await {
                Ok(l) => l,
                Err(Error::NotFound(_)) => {
                    let r = self.client.get("/").await?;
                    return Ok((None, r.header.map_or(0, |h| h.revision)));
                }
                Err(e) => return Err(e),
            };
            let rev = l.header.as_ref().map_or(0, |h| h.revision);
            let Some((_, lowest)) = l
                .children
                .iter()
                .filter_map(|c| Some((seq_of(&self.prefix, &c.path)?, c)))
                .min_by_key(|(s, _)| *s)
            else {
                return Ok((None, rev));
            };
            match self.client.get(lowest.path.clone()).await {
                Ok(r) => match r.node {
                    Some(n) if n.create_revision == lowest.create_revision => {
                        let leader = Leader {
                            identity: String::from_utf8_lossy(&n.data).into_owned(),
                            fencing_token: n.create_revision,
                            path: n.path,
                        };
                        return Ok((Some(leader), rev));
                    }
                    // Replaced in between: list again.
                    _ => continue,
                },
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The next leader change: `Some(leader)` or `Some(None)` when there is
    /// no leader. Never returns `None` (keeps retrying on errors); the
    /// `Option` is for use as a stream.
    pub async fn next(&mut self) -> Option<Option<Leader>> {
        loop {
            if let Some(w) = self.watcher.as_mut() {
                if w.next().await.is_err() {
                    self.watcher = None;
                    tokio::time::sleep(RETRY_PERIOD).await;
                }
            }
            let (leader, rev) = match self.current().await {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(RETRY_PERIOD).await;
                    continue;
                }
            };
            if self.watcher.is_none() {
                self.watcher = Some(
                    self.client
                        .watch(WatchOptions::subtree(self.dir.clone()).from_revision(rev + 1)),
                );
            }
            if self.last.as_ref() != Some(&leader) {
                self.last = Some(leader.clone());
                return Some(leader);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_sequence_numbers() {
        let p = "/e/a/candidate-";
        assert_eq!(seq_of(p, "/e/a/candidate-0000000007"), Some(7));
        assert_eq!(seq_of(p, "/e/a/lock-0000000007"), None);
        assert_eq!(trim_dir("/e/a//".into()), "/e/a");
    }
}
