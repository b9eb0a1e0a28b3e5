//! [`LeaderElection`]: leader election in the style of client-go's
//! `leaderelection`, on the lock layout. [`LeaderLatch`](super::LeaderLatch)
//! (Curator's) is built on it.

use std::time::Duration;

use lockd_proto::v1 as proto;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::client::Client;
use crate::error::Error;
use crate::session::{Session, SessionState};
use crate::watch::{WatchEventKind, WatchOptions};
use crate::Result;

use super::queue::{create_contender, delete_node, seq_of, trim_dir};

pub use lockd_proto::layout::CANDIDATE_PREFIX;

/// The longest default [`ElectionConfig::retry_period`] (client-go's
/// default retry period).
const MAX_DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

/// How long a [`LeaderObserver`] waits before retrying after an error.
const OBSERVER_RETRY: Duration = Duration::from_millis(500);

/// Configuration of a [`LeaderElection`]: client-go's `LeaseDuration`,
/// `RenewDeadline` and `RetryPeriod`.
///
/// Build it with [`ElectionConfig::new`], which derives the other two from
/// the TTL, then adjust them with [`ElectionConfig::with_renew_deadline`]
/// and [`ElectionConfig::with_retry_period`] (or by assigning the fields).
/// [`LeaderElection::new`] checks it with [`ElectionConfig::validate`]:
/// `0 < retry_period < renew_deadline < lease_ttl`.
///
/// ```
/// use std::time::Duration;
/// use lockd_client::recipes::ElectionConfig;
///
/// let config = ElectionConfig::new("scheduler-1", Duration::from_secs(15));
/// assert_eq!(config.renew_deadline, Duration::from_secs(10)); // 2/3 of the TTL
/// assert_eq!(config.retry_period, Duration::from_secs(2)); // TTL/5, at most 2 s
///
/// let config = config
///     .with_renew_deadline(Duration::from_secs(5))
///     .with_retry_period(Duration::from_secs(1));
/// assert!(config.validate().is_ok());
///
/// // The renew deadline must be shorter than the TTL.
/// let bad = config.with_renew_deadline(Duration::from_secs(15));
/// assert!(bad.validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ElectionConfig {
    /// This candidate's identity, stored as its node's data and reported to
    /// observers (e.g. a host name and pid).
    pub identity: String,
    /// TTL of the session that owns the candidate node (client-go's lease
    /// duration): how long after this process dies or is cut off the next
    /// candidate may take over. The server may clamp it to its bounds (by
    /// default 1 s to 5 min).
    pub lease_ttl: Duration,
    /// How long a leader may go without renewing its session before it
    /// stops leading (client-go's `RenewDeadline`; default 2/3 of
    /// `lease_ttl`).
    ///
    /// Counted from the *sending* of the last keepalive the cluster
    /// acknowledged, and checked while the session is not
    /// [`SessionState::Connected`]: a leader whose session has been
    /// [`SessionState::Suspended`] until `renew_deadline` has passed since
    /// that last renewal reports [`ElectionEvent::StoppedLeading`], deletes
    /// its node (retrying every `retry_period`, until that succeeds or the
    /// session is lost, so a stale node never blocks the election) and
    /// campaigns again. The session's lease runs until `lease_ttl` after
    /// that same renewal, so a leader that cannot reach the cluster stops
    /// at least `lease_ttl - renew_deadline` before any other candidate can
    /// start: that margin absorbs clock drift and the time the process
    /// needs to stop its work. This is stricter than waiting for
    /// [`SessionState::Lost`], which ends a term in any case. Must be
    /// shorter than `lease_ttl`.
    pub renew_deadline: Duration,
    /// How long a candidate waits before retrying after an error talking to
    /// the cluster (opening a session, creating or deleting its node,
    /// listing, watching) (client-go's `RetryPeriod`; default `lease_ttl /
    /// 5`, at most 2 s). It is also the campaign's keepalive cadence (at
    /// most every `lease_ttl / 3`, the sessions' default), as client-go's
    /// leader renews its lease every retry period: the renew deadline is
    /// then measured from a renewal at most one retry period old. Must be
    /// positive and shorter than `renew_deadline`.
    pub retry_period: Duration,
}

impl ElectionConfig {
    /// A configuration with client-go-like defaults derived from the TTL:
    /// `renew_deadline` = 2/3 of `lease_ttl` (client-go: 10 s of 15 s) and
    /// `retry_period` = `lease_ttl / 5`, at most 2 s (client-go: 2 s).
    pub fn new(identity: impl Into<String>, lease_ttl: Duration) -> ElectionConfig {
        ElectionConfig {
            identity: identity.into(),
            lease_ttl,
            renew_deadline: lease_ttl * 2 / 3,
            retry_period: (lease_ttl / 5).min(MAX_DEFAULT_RETRY_PERIOD),
        }
    }

    /// Sets [`ElectionConfig::renew_deadline`].
    pub fn with_renew_deadline(mut self, renew_deadline: Duration) -> ElectionConfig {
        self.renew_deadline = renew_deadline;
        self
    }

    /// Sets [`ElectionConfig::retry_period`].
    pub fn with_retry_period(mut self, retry_period: Duration) -> ElectionConfig {
        self.retry_period = retry_period;
        self
    }

    /// Checks `0 < retry_period < renew_deadline < lease_ttl`; fails with
    /// [`Error::InvalidArgument`] naming the values that do not fit.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::InvalidArgument(format!("election config: {m}")));
        if self.retry_period.is_zero() {
            return fail("retry_period must be positive".into());
        }
        if self.renew_deadline >= self.lease_ttl {
            return fail(format!(
                "renew_deadline ({:?}) must be shorter than lease_ttl ({:?})",
                self.renew_deadline, self.lease_ttl
            ));
        }
        if self.retry_period >= self.renew_deadline {
            return fail(format!(
                "retry_period ({:?}) must be shorter than renew_deadline ({:?})",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// What a campaign reports, in order.
///
/// ```no_run
/// # async fn demo(mut campaign: lockd_client::recipes::Campaign) {
/// use lockd_client::recipes::ElectionEvent;
///
/// let mut term = None;
/// while let Some(ev) = campaign.next().await {
///     match ev {
///         ElectionEvent::StartedLeading { fencing_token, path } => term = Some((path, fencing_token)),
///         ElectionEvent::StoppedLeading { reason } => {
///             term = None; // stop leader-only work now
///             eprintln!("stopped leading: {reason}");
///         }
///         ElectionEvent::NewLeader { identity, .. } => println!("leader: {identity}"),
///     }
/// }
/// # }
/// ```
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
/// * A leader whose session cannot renew reports
///   [`ElectionEvent::StoppedLeading`] once
///   [`ElectionConfig::renew_deadline`] has passed since the sending of its
///   last acknowledged keepalive, and in any case no later than its session
///   becomes [`SessionState::Lost`] on the client. The client-side Lost is
///   conservative: it fires once the TTL has passed since that same
///   sending, which is never later than the server's expiry. A new leader
///   can only start once our node is deleted (we resigned or stepped down,
///   or the server expired the session). Hence, as long as this process is
///   not paused (GC, SIGSTOP, a stopped VM) and its monotonic clock runs at
///   the rate of the server's, the terms of two candidates never overlap in
///   real time: ours ends before theirs begins, by at least `lease_ttl -
///   renew_deadline` when we were cut off.
/// * A paused process can still act after its term ended: use the fencing
///   token (or guarded writes) against that.
/// * While the session is [`SessionState::Suspended`] and the renew
///   deadline has not passed, the campaign stays leader (the node may well
///   still exist). As Curator advises, callers that must not act without
///   certainty should pause on Suspended: see [`Campaign::session_state`].
///
/// After stepping down the campaign campaigns again (with the same session
/// if it recovers, else with a new one) until cancelled.
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// use lockd_client::recipes::{ElectionConfig, ElectionEvent, LeaderElection};
///
/// let config = ElectionConfig::new("scheduler-1", Duration::from_secs(15));
/// let election = LeaderElection::new(client, "/elections/scheduler", config)?;
/// let mut campaign = election.campaign();
/// while let Some(ev) = campaign.next().await {
///     match ev {
///         ElectionEvent::StartedLeading { fencing_token, .. } => {
///             println!("leading, token {fencing_token}")
///         }
///         ElectionEvent::StoppedLeading { reason } => println!("stopped: {reason}"),
///         ElectionEvent::NewLeader { identity, .. } => println!("leader: {identity}"),
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct LeaderElection {
    client: Client,
    dir: String,
    config: ElectionConfig,
}

impl LeaderElection {
    /// An election on the directory `name`. Nothing is sent until
    /// [`LeaderElection::campaign`]. Fails with [`Error::InvalidArgument`]
    /// when `config` does not pass [`ElectionConfig::validate`].
    pub fn new(client: Client, name: impl Into<String>, config: ElectionConfig) -> Result<Self> {
        config.validate()?;
        Ok(LeaderElection {
            client,
            dir: trim_dir(name.into()),
            config,
        })
    }

    /// The election directory.
    pub fn name(&self) -> &str {
        &self.dir
    }

    /// The configuration.
    pub fn config(&self) -> &ElectionConfig {
        &self.config
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
    ///
    /// ```no_run
    /// # async fn demo(election: lockd_client::recipes::LeaderElection) {
    /// election
    ///     .run(async { tokio::signal::ctrl_c().await.ok(); }, |ev| println!("{ev:?}"))
    ///     .await;
    /// # }
    /// ```
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
///
/// ```no_run
/// # async fn demo(election: lockd_client::recipes::LeaderElection) {
/// use lockd_client::recipes::ElectionEvent;
/// use lockd_client::SessionState;
///
/// let mut campaign = election.campaign();
/// let state = campaign.session_state();
/// if let Some(ElectionEvent::StartedLeading { fencing_token, .. }) = campaign.next().await {
///     if *state.borrow() == SessionState::Connected {
///         println!("acting as leader with token {fencing_token}");
///     }
///     campaign.resign(); // hand over to the next candidate
/// }
/// let rest = campaign.cancel().await; // e.g. the final StoppedLeading
/// # }
/// ```
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
    /// campaign itself stops leading once
    /// [`ElectionConfig::renew_deadline`] passes without a renewal, and on
    /// [`SessionState::Lost`] at the latest.
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
    /// Resigned, stepped down or our node vanished: create a new node.
    Recreate,
    /// The session is lost: open a new one.
    SessionLost,
    /// Cancelled: release and return.
    Stop,
}

/// Resolves once the session has gone `renew_deadline` without a renewal
/// while it is not [`SessionState::Connected`], and returns how long it has
/// gone. `renewed` tells when the session was last renewed for certain (the
/// sending of the last acknowledged keepalive). Never resolves while the
/// session stays Connected.
async fn renew_deadline_passed(
    mut state: watch::Receiver<SessionState>,
    renewed: impl Fn() -> Instant,
    renew_deadline: Duration,
) -> Duration {
    let mut updates = true;
    loop {
        if *state.borrow_and_update() == SessionState::Connected {
            if !updates || state.changed().await.is_err() {
                return std::future::pending().await;
            }
            continue;
        }
        let at = renewed() + renew_deadline;
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {
                // A renewal may have come in at the same moment.
                let since = Instant::now().saturating_duration_since(renewed());
                if since >= renew_deadline && *state.borrow() != SessionState::Connected {
                    return since;
                }
            }
            r = state.changed(), if updates => updates = r.is_ok(),
        }
    }
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

    /// Waits one retry period; `Some` when stopped or the session was lost
    /// first.
    async fn pause(&self, session: &Session, stop: &mut oneshot::Receiver<()>) -> Option<End> {
        tokio::select! {
            _ = tokio::time::sleep(self.config.retry_period) => None,
            _ = &mut *stop => Some(End::Stop),
            _ = session.lost() => Some(End::SessionLost),
        }
    }

    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        // NewLeader comes from an observer of the whole directory.
        let observer = {
            let events = self.events.clone();
            let mut obs = observe(self.client.clone(), self.dir.clone());
            obs.retry = self.config.retry_period;
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
        let (ttl, retry) = (self.config.lease_ttl, self.config.retry_period);
        loop {
            let session = tokio::select! {
                r = self.client.open_session_every(ttl, Some(retry)) => r,
                _ = &mut stop => break,
            };
            let session = match session {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "election: opening a session failed");
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => continue,
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
                _ = session.lost() => return End::SessionLost,
                _ = &mut forward => unreachable!(),
            };
            let node = match node {
                Ok(n) => n,
                Err(Error::SessionLost(_)) => return End::SessionLost,
                Err(e) => {
                    tracing::debug!(error = %e, "election: creating candidate failed");
                    match self.pause(session, stop).await {
                        Some(end) => return end,
                        None => continue,
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

    async fn create_node(&self, session: &Session) -> Result<proto::Node> {
        let data = self.config.identity.clone().into_bytes();
        create_contender(
            &self.client,
            &self.dir,
            CANDIDATE_PREFIX,
            session.id(),
            data,
        )
        .await
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
                    match self.pause(session, stop).await {
                        Some(End::Stop) => return self.release(node, None).await,
                        Some(end) => return end,
                        None => continue,
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
            let retry = self.config.retry_period;
            let deleted = async {
                loop {
                    match w.next().await {
                        Ok(ev) if ev.kind == WatchEventKind::Delete => return,
                        Ok(_) => {}
                        Err(_) => return tokio::time::sleep(retry).await,
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

    /// After the renew deadline passed: deletes our node, retrying until it
    /// is gone (or the session is lost, which deletes it anyway), so that
    /// it does not keep the next candidate from leading.
    async fn step_down(
        &self,
        session: &Session,
        node: &proto::Node,
        stop: &mut oneshot::Receiver<()>,
    ) -> End {
        loop {
            let r = tokio::select! {
                biased;
                // Closing the session (see `run`) deletes the node.
                _ = &mut *stop => return End::Stop,
                _ = session.lost() => return End::SessionLost,
                r = delete_node(&self.client, &node.path, node.create_revision) => r,
            };
            match r {
                Ok(()) => return End::Recreate,
                Err(e) => {
                    tracing::debug!(error = %e, "election: deleting candidate after stepping down failed");
                    if let Some(end) = self.pause(session, stop).await {
                        return end;
                    }
                }
            }
        }
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
        let retry = self.config.retry_period;
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
                        // session (the renew deadline ends the term anyway).
                        tokio::time::sleep(retry).await;
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
        let handle = session.handle();
        let renew_deadline = self.config.renew_deadline;
        let deadline_passed = {
            let handle = handle.clone();
            renew_deadline_passed(
                handle.state.clone(),
                move || handle.renewed_at(),
                renew_deadline,
            )
        };
        tokio::select! {
            biased;
            why = session.lost() => {
                self.emit(ElectionEvent::StoppedLeading { reason: format!("session lost: {why}") });
                End::SessionLost
            }
            _ = &mut *stop => self.release(node, Some("cancelled")).await,
            since = deadline_passed => {
                self.emit(ElectionEvent::StoppedLeading {
                    reason: format!(
                        "renew deadline passed: session {} not renewed for {since:?} \
                         (renew_deadline {renew_deadline:?})",
                        handle.id
                    ),
                });
                self.step_down(session, node, stop).await
            }
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
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) {
/// use lockd_client::recipes::{observe, Leader};
///
/// let mut obs = observe(client, "/elections/scheduler");
/// if let Some(Some(Leader { identity, fencing_token, path })) = obs.next().await {
///     println!("{identity} leads with token {fencing_token} ({path})");
/// }
/// # }
/// ```
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
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) {
/// let mut obs = lockd_client::recipes::observe(client, "/elections/scheduler");
/// while let Some(leader) = obs.next().await {
///     match leader {
///         Some(l) => println!("leader: {} (token {})", l.identity, l.fencing_token),
///         None => println!("no leader"),
///     }
/// }
/// # }
/// ```
pub struct LeaderObserver {
    client: Client,
    dir: String,
    prefix: String,
    watcher: Option<crate::watch::Watcher>,
    last: Option<Option<Leader>>,
    /// Wait after an error.
    retry: Duration,
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
/// After an error it waits 500 ms and lists again.
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) {
/// let mut obs = lockd_client::recipes::observe(client, "/elections/scheduler");
/// let current = obs.next().await.flatten();
/// println!("leader now: {:?}", current.map(|l| l.identity));
/// # }
/// ```
pub fn observe(client: Client, name: impl Into<String>) -> LeaderObserver {
    let dir = trim_dir(name.into());
    LeaderObserver {
        prefix: format!("{dir}/{CANDIDATE_PREFIX}"),
        client,
        dir,
        watcher: None,
        last: None,
        retry: OBSERVER_RETRY,
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
                    // A missing directory has no revision of its own. The
                    // revision read *before* a second look bounds what the
                    // watch must replay: if the directory is still missing,
                    // whatever creates it comes after that revision. (The
                    // revision read after the first look could already
                    // include the directory and its candidates, and a watch
                    // from there would never report them.)
                    let before = self.client.get("/").await?;
                    let rev = before.header.map_or(0, |h| h.revision);
                    match self.client.list(self.dir.clone()).await {
                        Err(Error::NotFound(_)) => return Ok((None, rev)),
                        Ok(_) => continue,
                        Err(e) => return Err(e),
                    }
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
                    tokio::time::sleep(self.retry).await;
                }
            }
            let (leader, rev) = match self.current().await {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(self.retry).await;
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
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn candidate_sequence_numbers() {
        let p = "/e/a/candidate-";
        assert_eq!(seq_of(p, "/e/a/candidate-0000000007"), Some(7));
        assert_eq!(seq_of(p, "/e/a/lock-0000000007"), None);
        assert_eq!(trim_dir("/e/a//".into()), "/e/a");
    }

    #[test]
    fn config_defaults_follow_the_ttl() {
        let c = ElectionConfig::new("me", Duration::from_secs(15));
        assert_eq!(c.identity, "me");
        assert_eq!(c.renew_deadline, Duration::from_secs(10));
        assert_eq!(c.retry_period, MAX_DEFAULT_RETRY_PERIOD);
        assert!(c.validate().is_ok());
        // Short TTLs: TTL/5, still valid.
        let c = ElectionConfig::new("me", Duration::from_secs(2));
        assert_eq!(c.retry_period, Duration::from_millis(400));
        assert!(c.validate().is_ok());
        for ms in [1, 3, 10, 999] {
            let c = ElectionConfig::new("me", Duration::from_millis(ms));
            assert!(c.validate().is_ok(), "{c:?}");
        }
    }

    #[test]
    fn config_validation_names_the_problem() {
        let base = ElectionConfig::new("me", Duration::from_secs(6));
        let msg = |c: ElectionConfig| match c.validate() {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("{c:?}: {other:?}"),
        };
        let m = msg(base.clone().with_renew_deadline(Duration::from_secs(6)));
        assert!(
            m.contains("renew_deadline (6s) must be shorter than lease_ttl (6s)"),
            "{m}"
        );
        let m = msg(base.clone().with_retry_period(Duration::from_secs(4)));
        assert!(
            m.contains("retry_period (4s) must be shorter than renew_deadline (4s)"),
            "{m}"
        );
        let m = msg(base.clone().with_retry_period(Duration::ZERO));
        assert!(m.contains("retry_period must be positive"), "{m}");
        let m = msg(ElectionConfig::new("me", Duration::ZERO));
        assert!(m.starts_with("election config: "), "{m}");
    }

    #[tokio::test]
    async fn invalid_config_is_refused_by_the_constructor() {
        let client = Client::connect(["127.0.0.1:1"]).unwrap();
        let config = ElectionConfig::new("me", Duration::from_secs(5))
            .with_renew_deadline(Duration::from_secs(9));
        let r = LeaderElection::new(client, "/e/x", config);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    }

    /// A session state and renewal clock driven by hand.
    struct FakeSession {
        state: watch::Sender<SessionState>,
        renewed: Arc<Mutex<Instant>>,
    }

    impl FakeSession {
        fn new() -> FakeSession {
            FakeSession {
                state: watch::channel(SessionState::Connected).0,
                renewed: Arc::new(Mutex::new(Instant::now())),
            }
        }
        fn renew(&self) {
            *self.renewed.lock().unwrap() = Instant::now();
            self.state.send_replace(SessionState::Connected);
        }
        fn set(&self, s: SessionState) {
            self.state.send_replace(s);
        }
        /// The watchdog, spawned; resolves with (when it fired, since).
        fn watchdog(&self, d: Duration) -> tokio::task::JoinHandle<(Instant, Duration)> {
            let renewed = self.renewed.clone();
            let fut =
                renew_deadline_passed(self.state.subscribe(), move || *renewed.lock().unwrap(), d);
            tokio::spawn(async move {
                let since = fut.await;
                (Instant::now(), since)
            })
        }
    }

    const RD: Duration = Duration::from_secs(4);

    #[tokio::test(start_paused = true)]
    async fn renew_deadline_never_fires_while_connected() {
        let s = FakeSession::new();
        let w = s.watchdog(RD);
        tokio::time::sleep(RD * 10).await;
        assert!(!w.is_finished());
        w.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn renew_deadline_counts_from_the_last_renewal() {
        let s = FakeSession::new();
        let w = s.watchdog(RD);
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.renew();
        let renewed = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Keepalives start failing 1 s after the last renewal.
        s.set(SessionState::Suspended);
        let (at, since) = w.await.unwrap();
        assert_eq!(at, renewed + RD, "fires renew_deadline after the renewal");
        assert_eq!(since, RD);
    }

    #[tokio::test(start_paused = true)]
    async fn renew_deadline_resets_when_keepalives_recover() {
        let s = FakeSession::new();
        let w = s.watchdog(RD);
        s.set(SessionState::Suspended);
        tokio::time::sleep(RD - Duration::from_millis(100)).await;
        s.renew();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!w.is_finished(), "recovered just in time");
        s.set(SessionState::Suspended);
        let renewed = *s.renewed.lock().unwrap();
        let (at, _) = w.await.unwrap();
        assert_eq!(at, renewed + RD);
    }

    #[tokio::test(start_paused = true)]
    async fn renew_deadline_passed_already_fires_at_once() {
        let s = FakeSession::new();
        tokio::time::sleep(RD * 2).await;
        let t0 = Instant::now();
        // Suspended long after the last renewal (e.g. a stall noticed late).
        s.set(SessionState::Suspended);
        let (at, since) = s.watchdog(RD).await.unwrap();
        assert_eq!(at, t0);
        assert_eq!(since, RD * 2);
        // Lost counts as not renewed too.
        let s = FakeSession::new();
        let w = s.watchdog(RD);
        s.set(SessionState::Lost);
        let (at, _) = w.await.unwrap();
        assert_eq!(at, *s.renewed.lock().unwrap() + RD);
    }

    #[tokio::test(start_paused = true)]
    async fn renew_deadline_still_fires_when_the_session_task_ends() {
        let s = FakeSession::new();
        let w = s.watchdog(RD);
        s.set(SessionState::Suspended);
        let renewed = *s.renewed.lock().unwrap();
        drop(s.state);
        let (at, _) = w.await.unwrap();
        assert_eq!(at, renewed + RD);
    }
}
