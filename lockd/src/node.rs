//! One lockd member: identity, storage, Raft, and the operations the API
//! layer needs (propose a write, linearize a read, administer membership).
//!
//! Owns: routing writes to the leader (locally or over the peer RPC), the
//! read barrier, the bounded wait for a leader, the binding of this member's
//! node id to its data-dir instance.
//! Must never: acknowledge a write Raft has not applied, or report a write
//! as "not applied" when it may have been.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::{BasicNode, ReadPolicy, ServerState};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::identity::{Identity, IdentityError};
use crate::metrics::Metrics;
use crate::raft::log::LogStore;
use crate::raft::network::{decode, encode, Network, PeerError, Peers};
use crate::raft::sm::StateMachineStore;
use crate::raft::types::{Metrics as RaftMetrics, Raft, Request};
use crate::sessions::{SessionConfig, Tracker};
use crate::store::path::Limits;
use crate::store::{Applied, Command};
use crate::watch::{WatchConfig, WatchHub};

/// Member configuration (from flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// Raft node id.
    pub id: u64,
    /// Cluster id recorded in the data dir and checked on every peer message.
    pub cluster_id: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// gRPC listen address (clients and peers).
    pub listen: SocketAddr,
    /// Address others use to reach this member.
    pub advertise: String,
    /// HTTP listen address for /healthz, /readyz, /metrics.
    pub http_listen: Option<SocketAddr>,
    /// Initial voters (id, address); empty: wait to be initialized or added.
    pub initial_members: Vec<(u64, String)>,
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// How long a follower waits without hearing from the leader before it
    /// campaigns (randomized up to 1.2x).
    pub election_timeout: Duration,
    /// Log entries between snapshots; the log is purged behind snapshots.
    pub snapshot_threshold: u64,
    /// Key and value limits.
    pub limits: Limits,
    /// Upper bound on one client request, including waiting for a leader.
    pub request_timeout: Duration,
    /// On graceful shutdown, a leader first hands leadership to its most
    /// caught-up voter (see [`LockdNode::hand_over_leadership`]). Off for
    /// `lockd dev`, which stops every member at once.
    pub hand_over_on_shutdown: bool,
    /// Session TTL bounds and checkpointing.
    pub sessions: SessionConfig,
    /// Watch history and per-watcher buffer limits.
    pub watch: WatchConfig,
    /// Progress notices go to watches idle this long.
    pub watch_progress_interval: Duration,
}

impl Config {
    /// A configuration with lockd's defaults for everything but the
    /// addresses and paths.
    pub fn new(id: u64, data_dir: PathBuf, listen: SocketAddr) -> Config {
        Config {
            id,
            cluster_id: "lockd".to_string(),
            data_dir,
            listen,
            advertise: listen.to_string(),
            http_listen: None,
            initial_members: Vec::new(),
            heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            snapshot_threshold: 10_000,
            limits: Limits::default(),
            request_timeout: Duration::from_secs(10),
            hand_over_on_shutdown: true,
            sessions: SessionConfig::default(),
            watch: WatchConfig::default(),
            watch_progress_interval: Duration::from_secs(10),
        }
    }
}

/// Why a request could not be served.
#[derive(Debug, Error)]
pub enum NodeError {
    /// Nothing was applied; retrying elsewhere or later is safe.
    #[error("{0}")]
    Unavailable(String),
    /// The write may or may not have been applied.
    #[error("{0}")]
    Ambiguous(String),
    /// The request is invalid for the cluster's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A member-internal failure.
    #[error("{0}")]
    Internal(String),
    /// The session is unknown, closed or expired.
    #[error("{0}")]
    SessionExpired(String),
}

/// The reply to a forwarded write.
#[derive(Debug, Serialize, Deserialize)]
pub enum ProposeReply {
    /// Applied; here is the result.
    Applied(Applied),
    /// The receiver is not the leader (and did not append the write).
    NotLeader(Option<u64>),
    /// See [`NodeError::Ambiguous`].
    Ambiguous(String),
    /// See [`NodeError::Unavailable`].
    Unavailable(String),
}

/// The reply to a forwarded read-index request.
#[derive(Debug, Serialize, Deserialize)]
pub enum ReadIndexReply {
    /// Apply up to this log index, then read.
    Index(u64),
    /// The receiver is not the leader.
    NotLeader(Option<u64>),
    /// Leadership could not be confirmed.
    Unavailable(String),
}

/// The reply to a keepalive (forwarded or local).
#[derive(Debug, Serialize, Deserialize)]
pub enum KeepAliveReply {
    /// Renewed; the TTL.
    Ttl(u64),
    /// The session is unknown, closed or expired.
    Expired,
    /// The receiver does not lead (or has not started its clocks yet).
    NotLeader(Option<u64>),
}

/// Fatal conditions that stop the member.
#[derive(Debug, Error)]
pub enum StartError {
    /// The data dir disagrees with the flags.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Storage could not be opened.
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    /// openraft refused the configuration or failed to start.
    #[error("raft: {0}")]
    Raft(String),
}

/// A running member.
pub struct LockdNode {
    /// Configuration.
    pub config: Config,
    /// Identity of the data dir.
    pub identity: Arc<Identity>,
    /// Raft handle.
    pub raft: Raft,
    /// The state machine (for local reads).
    pub sm: StateMachineStore,
    /// Peer channels.
    pub peers: Peers,
    /// Metrics.
    pub metrics: Metrics,
    /// Session clocks (meaningful on the leader).
    pub sessions: Arc<Tracker>,
    /// Watch history and subscribers (served by this member).
    pub watch: Arc<WatchHub>,
}

fn raft_err<E: std::fmt::Display>(e: E) -> StartError {
    StartError::Raft(e.to_string())
}

impl LockdNode {
    /// Opens storage, checks identity and starts Raft.
    pub async fn start(config: Config, metrics: Metrics) -> Result<Arc<LockdNode>, StartError> {
        let identity = Arc::new(Identity::load_or_create(
            &config.data_dir,
            &config.cluster_id,
            config.id,
        )?);
        let log = LogStore::open(&config.data_dir.join("raft"), metrics.clone())?;
        let sm = StateMachineStore::open(config.data_dir.join("snapshot"))?;
        let (sessions, session_signals) = Tracker::new(config.sessions);
        sm.add_hook(sessions.clone());
        let watch = WatchHub::new(config.watch);
        sm.add_hook(watch.clone());
        let peers = Peers::new(identity.clone(), sm.clone(), config.request_timeout);
        let et = config.election_timeout.as_millis() as u64;
        let raft_config = openraft::Config {
            cluster_name: config.cluster_id.clone(),
            heartbeat_interval: config.heartbeat.as_millis() as u64,
            // openraft's follower campaigns once its leader lease (which is
            // election_timeout_max) AND a timeout drawn from [min, max) have
            // passed since it last heard from the leader. With 0.4 and 0.6 of
            // the configured timeout, a follower campaigns between 1.0x and
            // 1.2x of it after the leader goes silent (etcd: 1x-2x); with
            // [et, 2 et) it would wait 3x-4x.
            election_timeout_min: et * 2 / 5,
            election_timeout_max: et * 3 / 5,
            install_snapshot_timeout: 10_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_threshold),
            max_in_snapshot_log_to_keep: (config.snapshot_threshold / 10).min(1000),
            // A partitioned member that comes back runs a pre-vote first and
            // cannot depose a healthy leader by bumping the term.
            enable_pre_vote: Some(true),
            // The state machine is rebuilt from snapshot + log at start and the
            // commit index is not persisted, so a restarted leader must not
            // resume leadership without an election: it would serve reads from
            // a state machine that has not replayed what was committed.
            enable_leader_restore: Some(false),
            ..Default::default()
        }
        .validate()
        .map_err(raft_err)?;
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            Network::new(peers.clone()),
            log,
            sm.clone(),
        )
        .await
        .map_err(raft_err)?;
        let node = Arc::new(LockdNode {
            config,
            identity,
            raft,
            sm,
            peers,
            metrics,
            sessions,
            watch,
        });
        if !node.config.initial_members.is_empty() {
            node.initialize_if_new().await?;
        }
        tokio::spawn(bind_identity(node.clone()));
        tokio::spawn(crate::sessions::run(node.clone(), session_signals));
        Ok(node)
    }

    async fn initialize_if_new(&self) -> Result<(), StartError> {
        if self.raft.is_initialized().await.map_err(raft_err)? {
            return Ok(());
        }
        let members: BTreeMap<u64, BasicNode> = self
            .config
            .initial_members
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
            .collect();
        // Every listed member initializes with the same membership; openraft
        // accepts that, and restarts skip this (the log is not empty).
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(e)) => {
                tracing::info!(error = %e, "not initializing: already initialized");
                Ok(())
            }
            Err(e) => Err(raft_err(e)),
        }
    }

    /// Resolves when the member must stop (its identity was refused).
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.peers.fatal()
    }

    /// Stops the member with a reason.
    pub fn set_fatal(&self, reason: String) {
        self.peers.set_fatal(reason);
    }

    /// If this member leads, hands leadership to the voter that has
    /// replicated the most of the log and waits (up to `within`) until
    /// another member leads. Called on graceful shutdown, so a restarted or
    /// drained leader costs clients a leadership transfer (tens of
    /// milliseconds) instead of an election timeout. Returns the new
    /// leader, or None when this member did not lead, had no other voter,
    /// or the transfer did not finish in time (shutdown goes on: the
    /// cluster then elects a leader as after a crash).
    pub async fn hand_over_leadership(&self, within: Duration) -> Option<u64> {
        let m = self.raft_metrics();
        let me = self.config.id;
        if m.current_leader != Some(me) {
            return None;
        }
        let matched = |id: &u64| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(id).cloned().flatten())
                .map(|l| l.index)
        };
        let to = m
            .membership_config
            .voter_ids()
            .filter(|v| *v != me)
            .max_by_key(|v| (matched(v), std::cmp::Reverse(*v)))?;
        tracing::info!(to, "shutting down: handing leadership over");
        if let Err(e) = self.raft.trigger().transfer_leader(to).await {
            tracing::warn!(error = %e, "leadership transfer not started");
            return None;
        }
        let moved = self
            .raft
            .wait(Some(within))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != me),
                "leadership moved away",
            )
            .await;
        match moved {
            Ok(m) => m.current_leader,
            Err(e) => {
                tracing::warn!(error = %e, "leadership did not move before shutdown");
                None
            }
        }
    }

    /// Current Raft metrics.
    pub fn raft_metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow_watched().clone()
    }

    fn addr_of(&self, id: u64) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// Waits until some leader is known, up to `deadline`.
    async fn wait_leader(&self, deadline: Instant) -> Result<u64, NodeError> {
        let mut rx = self.raft.metrics();
        loop {
            if let Some(l) = rx.borrow_and_update().current_leader {
                return Ok(l);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(NodeError::Unavailable("raft has stopped".into())),
                Err(_) => {
                    return Err(NodeError::Unavailable(
                        "no leader: the cluster has no quorum reachable from this member".into(),
                    ))
                }
            }
        }
    }

    /// Waits for a leader other than `old` (or any leader if `old` is None).
    async fn wait_new_leader(&self, old: Option<u64>, deadline: Instant) -> Result<u64, NodeError> {
        let mut rx = self.raft.metrics();
        loop {
            let cur = rx.borrow_and_update().current_leader;
            if cur.is_some() && cur != old {
                return Ok(cur.unwrap_or_default());
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(NodeError::Unavailable(
                    "no leader: the cluster has no quorum reachable from this member".into(),
                ));
            }
        }
    }

    /// After `leader` answered "not leader" (naming `next`, if it knows):
    /// go to `next` if it is another member; otherwise the leader is
    /// between states (just elected and its lease not yet confirmed, or
    /// stepping down), so back off briefly and ask again.
    async fn next_leader(
        &self,
        leader: u64,
        next: Option<u64>,
        backoff: &mut Duration,
        deadline: Instant,
    ) -> Result<Option<u64>, NodeError> {
        if let Some(n) = next.filter(|n| *n != leader) {
            return Ok(Some(n));
        }
        if Instant::now() + *backoff >= deadline {
            return Err(NodeError::Unavailable(format!(
                "no leader: member {leader} is not ready to lead and no other leader emerged"
            )));
        }
        tokio::time::sleep(*backoff).await;
        *backoff = (*backoff * 2).min(Duration::from_millis(100));
        Ok(None)
    }

    /// After `leader` could not be reached (or could not confirm its
    /// leadership): take a new leader as soon as one is known, or retry the
    /// same one after a short backoff; give up with `last` at the deadline.
    async fn after_unreachable(
        &self,
        leader: u64,
        last: String,
        backoff: &mut Duration,
        deadline: Instant,
    ) -> Result<Option<u64>, NodeError> {
        if Instant::now() >= deadline {
            return Err(NodeError::Unavailable(last));
        }
        let retry_at = (Instant::now() + *backoff * 4).min(deadline);
        *backoff = (*backoff * 2).min(Duration::from_millis(100));
        Ok(self.wait_new_leader(Some(leader), retry_at).await.ok())
    }

    fn leader_deadline(&self) -> Instant {
        Instant::now()
            + self
                .config
                .request_timeout
                .min(Duration::from_secs(5) + self.config.election_timeout * 2)
    }

    /// Proposes a command through Raft, forwarding to the leader if needed.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn propose(&self, command: Command) -> Result<Applied, NodeError> {
        let deadline = self.leader_deadline();
        let mut hint: Option<u64> = None;
        let mut backoff = Duration::from_millis(5);
        loop {
            let leader = match hint.take() {
                Some(l) => l,
                None => self.wait_leader(deadline).await?,
            };
            let reply = if leader == self.config.id {
                self.propose_local(command.clone()).await
            } else {
                self.metrics.forwarded();
                self.forward_propose(leader, &command).await
            };
            match reply {
                ProposeReply::Applied(a) => return Ok(a),
                ProposeReply::Ambiguous(m) => return Err(NodeError::Ambiguous(m)),
                ProposeReply::NotLeader(next) => {
                    hint = self
                        .next_leader(leader, next, &mut backoff, deadline)
                        .await?;
                }
                ProposeReply::Unavailable(m) => {
                    hint = self
                        .after_unreachable(leader, m, &mut backoff, deadline)
                        .await?;
                }
            }
        }
    }

    /// Proposes on this member, which believes it leads.
    pub async fn propose_local(&self, command: Command) -> ProposeReply {
        let write = self.raft.client_write(Request { command });
        match tokio::time::timeout(self.config.request_timeout, write).await {
            Ok(Ok(resp)) => ProposeReply::Applied(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                ProposeReply::NotLeader(f.leader_id)
            }
            Ok(Err(RaftError::APIError(e))) => ProposeReply::Ambiguous(format!(
                "leadership changed while the write was in flight; it may or may not have been applied ({e})"
            )),
            Ok(Err(RaftError::Fatal(e))) => ProposeReply::Unavailable(format!("raft has stopped: {e}")),
            Err(_) => ProposeReply::Ambiguous(format!(
                "the write was not committed within {:?}; it may or may not have been applied",
                self.config.request_timeout
            )),
        }
    }

    async fn forward_propose(&self, leader: u64, command: &Command) -> ProposeReply {
        let Some(addr) = self.addr_of(leader) else {
            return ProposeReply::Unavailable(format!("leader {leader} has no known address"));
        };
        let payload = match encode(&Request {
            command: command.clone(),
        }) {
            Ok(p) => p,
            Err(e) => return ProposeReply::Unavailable(e.to_string()),
        };
        let mut client = match self.peers.client(&addr) {
            Ok(c) => c,
            Err(e) => return ProposeReply::Unavailable(e.to_string()),
        };
        let env = self.peers.envelope(leader, payload);
        let call = client.propose(env);
        match tokio::time::timeout(self.config.request_timeout + Duration::from_secs(1), call).await {
            Ok(Ok(resp)) => match decode::<ProposeReply>(&resp.into_inner().payload) {
                Ok(r) => r,
                Err(e) => ProposeReply::Ambiguous(format!("undecodable reply from leader: {e}")),
            },
            // UNAVAILABLE: the leader could not be reached; the write was not
            // delivered. Anything else after sending is ambiguous.
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {
                ProposeReply::Unavailable(format!("leader {leader} at {addr} unreachable: {}", s.message()))
            }
            Ok(Err(s)) => ProposeReply::Ambiguous(format!(
                "forwarding to leader {leader} failed after sending: {}; the write may or may not have been applied",
                s.message()
            )),
            Err(_) => ProposeReply::Ambiguous(format!(
                "leader {leader} did not answer in time; the write may or may not have been applied"
            )),
        }
    }

    /// Waits until this member has applied everything committed before the
    /// call (read-index through the leader), so a local read is linearizable.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn read_barrier(&self) -> Result<(), NodeError> {
        let deadline = self.leader_deadline();
        let mut hint: Option<u64> = None;
        let mut backoff = Duration::from_millis(5);
        let index = loop {
            let leader = match hint.take() {
                Some(l) => l,
                None => self.wait_leader(deadline).await?,
            };
            let reply = if leader == self.config.id {
                self.read_index_local().await
            } else {
                self.forward_read_index(leader).await
            };
            match reply {
                ReadIndexReply::Index(i) => break i,
                ReadIndexReply::NotLeader(next) => {
                    hint = self
                        .next_leader(leader, next, &mut backoff, deadline)
                        .await?;
                }
                ReadIndexReply::Unavailable(m) => {
                    hint = self
                        .after_unreachable(leader, m, &mut backoff, deadline)
                        .await?;
                }
            }
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(wait))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(|e| {
                NodeError::Unavailable(format!("this member did not catch up in time: {e}"))
            })?;
        Ok(())
    }

    /// Renews a session on this member, which believes it leads.
    pub fn keepalive_local(&self, session_id: u64) -> KeepAliveReply {
        let m = self.raft_metrics();
        if m.state != ServerState::Leader {
            return KeepAliveReply::NotLeader(m.current_leader.filter(|l| *l != self.config.id));
        }
        let ttl = self.sm.read().state.session(session_id).map(|s| s.ttl_ms);
        if !self.sessions.is_leading() {
            // Elected, but the clocks start on the next turn of the session
            // task: ask again in a moment.
            return KeepAliveReply::NotLeader(None);
        }
        match self.sessions.keepalive(session_id, ttl) {
            Some(ttl) => KeepAliveReply::Ttl(ttl),
            None => KeepAliveReply::Expired,
        }
    }

    /// Renews a session through the leader; Ok(ttl), or Err(FailedPrecondition
    /// "session expired") if the session is gone.
    pub async fn keepalive(&self, session_id: u64) -> Result<u64, NodeError> {
        let deadline = self.leader_deadline();
        let mut hint: Option<u64> = None;
        let mut backoff = Duration::from_millis(5);
        loop {
            let leader = match hint.take() {
                Some(l) => l,
                None => self.wait_leader(deadline).await?,
            };
            let reply = if leader == self.config.id {
                self.keepalive_local(session_id)
            } else {
                match self.forward_keepalive(leader, session_id).await {
                    Ok(r) => r,
                    Err(m) => {
                        hint = self
                            .after_unreachable(leader, m, &mut backoff, deadline)
                            .await?;
                        continue;
                    }
                }
            };
            match reply {
                KeepAliveReply::Ttl(t) => return Ok(t),
                KeepAliveReply::Expired => {
                    return Err(NodeError::SessionExpired(format!(
                        "session {session_id} expired or does not exist"
                    )))
                }
                KeepAliveReply::NotLeader(next) => {
                    hint = self
                        .next_leader(leader, next, &mut backoff, deadline)
                        .await?;
                }
            }
        }
    }

    async fn forward_keepalive(
        &self,
        leader: u64,
        session_id: u64,
    ) -> Result<KeepAliveReply, String> {
        let addr = self
            .addr_of(leader)
            .ok_or_else(|| format!("leader {leader} has no known address"))?;
        let mut client = self.peers.client(&addr).map_err(|e| e.to_string())?;
        let payload = encode(&session_id).map_err(|e| e.to_string())?;
        let env = self.peers.envelope(leader, payload);
        match tokio::time::timeout(self.config.request_timeout, client.keep_alive(env)).await {
            Ok(Ok(r)) => decode(&r.into_inner().payload).map_err(|e| e.to_string()),
            Ok(Err(s)) => Err(format!("leader {leader}: {}", s.message())),
            Err(_) => Err(format!("leader {leader} did not answer in time")),
        }
    }

    /// Confirms leadership and returns the read index (on the leader).
    pub async fn read_index_local(&self) -> ReadIndexReply {
        let fut = self.raft.get_read_linearizer(ReadPolicy::ReadIndex);
        match tokio::time::timeout(self.config.request_timeout, fut).await {
            Ok(Ok(lin)) => ReadIndexReply::Index(lin.read_log_id().index()),
            Ok(Err(RaftError::APIError(e))) => match e {
                openraft::errors::LinearizableReadError::ForwardToLeader(f) => {
                    ReadIndexReply::NotLeader(f.leader_id)
                }
                other => ReadIndexReply::Unavailable(other.to_string()),
            },
            Ok(Err(e)) => ReadIndexReply::Unavailable(e.to_string()),
            Err(_) => {
                ReadIndexReply::Unavailable("leadership could not be confirmed in time".into())
            }
        }
    }

    async fn forward_read_index(&self, leader: u64) -> ReadIndexReply {
        let Some(addr) = self.addr_of(leader) else {
            return ReadIndexReply::Unavailable(format!("leader {leader} has no known address"));
        };
        let mut client = match self.peers.client(&addr) {
            Ok(c) => c,
            Err(e) => return ReadIndexReply::Unavailable(e.to_string()),
        };
        let env = self.peers.envelope(leader, Vec::new());
        match tokio::time::timeout(self.config.request_timeout, client.read_index(env)).await {
            Ok(Ok(r)) => decode(&r.into_inner().payload)
                .unwrap_or_else(|e: PeerError| ReadIndexReply::Unavailable(e.to_string())),
            Ok(Err(s)) => ReadIndexReply::Unavailable(format!("leader {leader}: {}", s.message())),
            Err(_) => {
                ReadIndexReply::Unavailable(format!("leader {leader} did not answer in time"))
            }
        }
    }

    /// The role of this member.
    pub fn role(m: &RaftMetrics) -> lockd_proto::v1::Role {
        use lockd_proto::v1::Role;
        let initialized = m.membership_config.membership().nodes().next().is_some();
        if !initialized {
            return Role::Uninitialized;
        }
        match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => {
                let voter = m.membership_config.voter_ids().any(|v| v == m.id);
                if voter {
                    Role::Follower
                } else {
                    Role::Learner
                }
            }
            ServerState::Shutdown => Role::Unknown,
        }
    }

    /// Ready: a member of an initialized cluster with a known leader, its
    /// node id bound to this data dir, and caught up (applied what it knows
    /// to be committed).
    pub fn is_ready(&self) -> bool {
        let m = self.raft_metrics();
        let member = m.membership_config.membership().get_node(&m.id).is_some();
        let committed = m.local_committed.map(|l| l.index);
        let applied = m.last_applied.map(|l| l.index);
        let bound = self.sm.read().state.instance_of(m.id) == Some(self.identity.instance.as_str());
        member
            && bound
            && m.current_leader.is_some()
            && applied >= committed
            && self.fatal().borrow().is_none()
    }

    /// Voter and learner ids of the current membership.
    pub fn member_ids(&self) -> (BTreeSet<u64>, BTreeSet<u64>) {
        let m = self.raft_metrics();
        let voters: BTreeSet<u64> = m.membership_config.voter_ids().collect();
        let all: BTreeSet<u64> = m.membership_config.nodes().map(|(id, _)| *id).collect();
        let learners = all.difference(&voters).copied().collect();
        (voters, learners)
    }
}

/// Binds this member's node id to its data-dir instance once it is part of
/// a cluster, and stops the member if the id is bound to another instance.
async fn bind_identity(node: Arc<LockdNode>) {
    let me = node.config.id;
    let mut rx = node.raft.metrics();
    loop {
        let in_cluster = {
            let m = rx.borrow_and_update();
            m.membership_config.membership().get_node(&me).is_some() && m.current_leader.is_some()
        };
        if in_cluster {
            let bound = node.sm.read().state.instance_of(me).map(str::to_string);
            match bound {
                Some(b) if b == node.identity.instance => {
                    tracing::info!(instance = %b, "node id bound to this data dir");
                    return;
                }
                Some(b) => {
                    node.set_fatal(format!(
                        "node id {me} was already used by this cluster with another data dir (instance {b}); \
                         a member with an empty data dir must join as a new member with a new id"
                    ));
                    return;
                }
                None => {
                    let cmd = Command::BindInstance {
                        node_id: me,
                        instance: node.identity.instance.clone(),
                    };
                    match node.propose(cmd).await {
                        Ok(Applied { result: Ok(_), .. }) => {
                            tracing::info!(instance = %node.identity.instance, "node id bound to this data dir");
                            return;
                        }
                        Ok(Applied { result: Err(e), .. }) => {
                            node.set_fatal(e.message);
                            return;
                        }
                        Err(e) => {
                            tracing::info!(error = %e, "binding node id to data dir failed; retrying")
                        }
                    }
                }
            }
        }
        // Re-check on every metrics change, and at least twice a second.
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
