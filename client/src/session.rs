//! Sessions (leases): [`Client::open_session`] returns a [`Session`] kept
//! alive in the background, whose ephemeral nodes
//! ([`Client::create_ephemeral`]) live as long as it does. Also the
//! request-id ("protected") creates of [`Client::create_protected`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockd_proto::v1 as proto;
use proto::session_client::SessionClient;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::client::{request, Client};
use crate::error::Error;
use crate::retry::{describe, Backoff, Kind};

/// How a [`Session`] looks from the client.
///
/// ```no_run
/// # async fn demo(session: lockd_client::Session) {
/// use lockd_client::SessionState;
///
/// let mut state = session.state();
/// loop {
///     match *state.borrow_and_update() {
///         SessionState::Connected => println!("working"),
///         SessionState::Suspended => println!("keepalives failing: pausing work"),
///         SessionState::Lost => break,
///     }
///     if state.changed().await.is_err() {
///         break;
///     }
/// }
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// The last keepalive was acknowledged.
    Connected,
    /// Keepalives are failing (the client is reconnecting), but the TTL has
    /// not certainly run out: the session and its ephemeral nodes may still
    /// exist. Do not start new work that relies on them.
    Suspended,
    /// The session is gone, or may be: the server said it expired, or no
    /// keepalive was acknowledged within the TTL. Final. Assume every
    /// ephemeral node of the session (and every lock or leadership built on
    /// one) is gone.
    Lost,
}

/// A session (lease) on the cluster, kept alive by a background task.
///
/// Obtained with [`Client::open_session`]. The task sends a keepalive every
/// TTL/3 over a `Session.KeepAlive` stream and reconnects to the next
/// endpoint (with backoff) when the stream fails; [`Session::state`] reports
/// [`SessionState::Connected`], [`SessionState::Suspended`] while keepalives
/// fail, and [`SessionState::Lost`] once the server says the session expired
/// or when the TTL has passed since the *sending* of the last acknowledged
/// keepalive. The server renews on receipt, so that client-side deadline is
/// never later than the server's: once it passes the client stops trusting
/// the session, even if the server has not expired it yet.
///
/// [`Session::close`] ends the session on the server at once, deleting its
/// ephemeral nodes. Dropping a `Session` stops the keepalives and, if the
/// Tokio runtime is still running, closes it in the background (best
/// effort: otherwise the server expires it after the TTL).
///
/// ```no_run
/// # async fn demo() -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// use lockd_client::{Client, SessionState};
///
/// let client = Client::connect(["127.0.0.1:7001", "127.0.0.1:7002"])?;
/// let session = client.open_session(Duration::from_secs(10)).await?;
/// let node = client.create_ephemeral("/workers/w1", "host-a", &session).await?;
/// println!("registered {} in session {}", node.node.unwrap().path, session.id());
///
/// let mut state = session.state();
/// while *state.borrow_and_update() != SessionState::Lost {
///     if state.changed().await.is_err() {
///         break;
///     }
/// }
/// // Lost: the ephemeral node must be assumed gone.
/// # Ok(())
/// # }
/// ```
pub struct Session {
    id: u64,
    ttl: Duration,
    client: Client,
    state: watch::Receiver<SessionState>,
    lost_reason: Arc<Mutex<Option<String>>>,
    renewed: Arc<Mutex<Instant>>,
    /// Sending stops the task quietly; dropping it makes the task close the
    /// session on the server.
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("ttl", &self.ttl)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Session {
    /// The session id (what [`proto::Node::ephemeral_owner`] holds).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The TTL granted by the server (the requested one, clamped to the
    /// server's bounds).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A receiver of the session's state; see [`SessionState`].
    pub fn state(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// True once the session is [`SessionState::Lost`].
    pub fn is_lost(&self) -> bool {
        *self.state.borrow() == SessionState::Lost
    }

    /// Waits until the session is [`SessionState::Lost`] and returns why.
    pub async fn lost(&self) -> String {
        self.handle().lost().await
    }

    /// A cheap, owned view of this session for recipes (id, state, reason).
    pub(crate) fn handle(&self) -> SessionHandle {
        SessionHandle {
            id: self.id,
            state: self.state.clone(),
            lost_reason: self.lost_reason.clone(),
            renewed: self.renewed.clone(),
        }
    }

    /// Why the session was lost, once it is.
    pub fn lost_reason(&self) -> Option<String> {
        self.lost_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the keepalives and closes the session on the server, which
    /// deletes its ephemeral nodes at once.
    ///
    /// A close whose answer is lost is retried (closing twice has the same
    /// effect as once), so `Ok` means the session is gone. Fails with
    /// [`Error::NotFound`] ("session expired ...") when the session had
    /// already expired, and with [`Error::Unavailable`] or
    /// [`Error::Ambiguous`] when no member could be asked; the session then
    /// expires after its TTL.
    pub async fn close(mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let id = self.id;
        match self.client.close_session(id).await {
            Ok(_) => Ok(()),
            Err(Error::Ambiguous(first)) => match self.client.close_session(id).await {
                Ok(_) => Ok(()),
                // The first attempt did it.
                Err(e) if is_expired(&e) => Ok(()),
                Err(Error::Unavailable(m)) => Err(Error::Ambiguous(format!("{first}; retry: {m}"))),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }
}

/// What a recipe needs of a [`Session`] without borrowing it.
#[derive(Clone, Debug)]
pub(crate) struct SessionHandle {
    pub(crate) id: u64,
    pub(crate) state: watch::Receiver<SessionState>,
    lost_reason: Arc<Mutex<Option<String>>>,
    renewed: Arc<Mutex<Instant>>,
}

impl SessionHandle {
    /// True once the session is [`SessionState::Lost`].
    pub(crate) fn is_lost(&self) -> bool {
        *self.state.borrow() == SessionState::Lost
    }

    /// Why the session was lost (or a generic reason).
    pub(crate) fn reason(&self) -> String {
        self.lost_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| format!("session {}: keepalive task ended", self.id))
    }

    /// When the session was last renewed for certain: the *sending* time of
    /// the last acknowledged keepalive (or of the open). The lease runs at
    /// least until this instant plus the TTL.
    pub(crate) fn renewed_at(&self) -> Instant {
        *self.renewed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the session is lost; returns why.
    pub(crate) async fn lost(&self) -> String {
        let mut rx = self.state.clone();
        loop {
            if *rx.borrow_and_update() == SessionState::Lost {
                break;
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
        self.reason()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Dropping `stop` (not sending on it) tells the task to close the
        // session on the server before it ends. If the runtime is gone, the
        // task is gone too and the server expires the session.
        self.stop.take();
    }
}

/// True for the server's answer about an unknown or expired session.
fn is_expired(e: &Error) -> bool {
    matches!(e, Error::NotFound(m) if m.starts_with("session expired"))
}

fn status_is_expired(s: &Status) -> bool {
    s.code() == Code::NotFound
}

/// A new random request id: 16 hex characters. See
/// [`Client::create_protected`].
///
/// ```
/// let id = lockd_client::new_request_id();
/// assert_eq!(id.len(), 16);
/// assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
/// ```
pub fn new_request_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No OS randomness: time and a process-wide counter still make
        // collisions between retries of different requests unlikely.
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let c = COUNTER.fetch_add(1, Ordering::Relaxed);
        b = (t ^ c.rotate_left(48) ^ u64::from(std::process::id()).rotate_left(32)).to_be_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Client {
    /// Opens a session with the given TTL (the server clamps it to its
    /// bounds, by default 1s..5min; see [`Session::ttl`]) and starts keeping
    /// it alive in the background.
    ///
    /// Opening is a write: it fails over to another member only when the
    /// failure proves nothing was opened. [`Error::Ambiguous`] means a
    /// session may have been opened; nobody keeps it alive, so the server
    /// expires it after the TTL.
    ///
    /// Must be called within a Tokio runtime, which runs the keepalive task.
    pub async fn open_session(&self, ttl: Duration) -> Result<Session, Error> {
        self.open_session_every(ttl, None).await
    }

    /// [`Client::open_session`], sending keepalives every `keepalive` (at
    /// most every TTL/3, the default, whatever is asked) rather than every
    /// TTL/3. A shorter cadence notices a failing keepalive stream sooner
    /// and keeps [`SessionHandle::renewed_at`] more recent; the stream is
    /// still only given up after TTL/3 without an answer.
    pub(crate) async fn open_session_every(
        &self,
        ttl: Duration,
        keepalive: Option<Duration>,
    ) -> Result<Session, Error> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        // The server starts the session clock when it applies the open,
        // after this instant: a deadline counted from here is conservative.
        let sent = Instant::now();
        let r = self
            .call(Kind::Write, self.timeout(), |ch, t| {
                let r = request(proto::OpenSessionRequest { ttl_ms }, t);
                async move { SessionClient::new(ch).open(r).await }
            })
            .await?;
        let ttl = Duration::from_millis(r.ttl_ms.max(1));
        let interval = keepalive.map_or(interval_for(ttl), |k| {
            k.max(MIN_INTERVAL).min(interval_for(ttl))
        });
        let renewed = Arc::new(Mutex::new(sent));
        let (state_tx, state_rx) = watch::channel(SessionState::Connected);
        let (stop_tx, stop_rx) = oneshot::channel();
        let lost_reason = Arc::new(Mutex::new(None));
        let keeper = Keeper {
            client: self.clone(),
            id: r.session_id,
            ttl,
            interval,
            lease: Lease::new(sent, ttl),
            renewed: renewed.clone(),
            state: state_tx,
            lost_reason: lost_reason.clone(),
        };
        let task = tokio::spawn(keeper.run(stop_rx));
        Ok(Session {
            id: r.session_id,
            ttl,
            client: self.clone(),
            state: state_rx,
            lost_reason,
            renewed,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Closes session `id` on the server, deleting its ephemeral nodes. A
    /// write, with the usual retry rules; an unknown or expired session
    /// fails with [`Error::NotFound`] ("session expired ..."). Prefer
    /// [`Session::close`] for a session this process keeps alive.
    pub async fn close_session(&self, id: u64) -> Result<proto::CloseSessionResponse, Error> {
        self.call(Kind::Write, self.timeout(), |ch, t| {
            let r = request(proto::CloseSessionRequest { session_id: id }, t);
            async move { SessionClient::new(ch).close(r).await }
        })
        .await
    }

    /// TTL, remaining time (as the leader sees it) and ephemeral nodes of
    /// session `id`; [`Error::NotFound`] ("session expired ...") when it is
    /// unknown or expired.
    pub async fn session_info(&self, id: u64) -> Result<proto::SessionInfoResponse, Error> {
        self.call(Kind::Read, self.timeout(), |ch, t| {
            let r = request(proto::SessionInfoRequest { session_id: id }, t);
            async move { SessionClient::new(ch).info(r).await }
        })
        .await
    }

    /// Creates an ephemeral node at `path`, owned by `session`: it is deleted
    /// when the session is closed or expires. Uses
    /// [`Client::create_protected`], so a create whose answer was lost is
    /// retried without risk of a second node.
    ///
    /// For a sequential ephemeral node (a lock or election candidate), call
    /// [`Client::create_protected`] with `session_id` and `sequential` set.
    /// Fails with [`Error::NotFound`] ("session expired ...") if the session
    /// is gone.
    pub async fn create_ephemeral(
        &self,
        path: impl Into<String>,
        data: impl Into<Vec<u8>>,
        session: &Session,
    ) -> Result<proto::CreateResponse, Error> {
        self.create_protected(proto::CreateRequest {
            path: path.into(),
            data: data.into(),
            session_id: session.id(),
            ..Default::default()
        })
        .await
    }

    /// Creates a node like [`Client::create_with`], but safe to retry:
    /// ZooKeeper Curator's "protected mode".
    ///
    /// If `req.request_id` is empty it is set to [`new_request_id`]. When an
    /// attempt's outcome is unknown ([`Error::Ambiguous`]: timeout, lost
    /// connection), the same request is sent again with the same id until a
    /// definite answer arrives or [`ClientOptions::retry_budget`] is spent.
    /// The server remembers the result of each request id (per session for
    /// ephemeral nodes, else in a bounded table shared by all clients), so a
    /// retry of a create that was applied returns the node the first attempt
    /// created instead of creating a second one. This matters most for
    /// sequential nodes, whose name the caller cannot guess: without it, a
    /// lost answer leaves an orphan `lock-000000000N` that nobody owns.
    ///
    /// Once an attempt was ambiguous, a later "unavailable" is reported as
    /// [`Error::Ambiguous`] too. The dedup table is bounded (1000 entries per
    /// session, 10000 without one), so retries should not be delayed for long.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client, session: lockd_client::Session)
    /// # -> Result<(), lockd_client::Error> {
    /// use lockd_client::proto::CreateRequest;
    /// let r = client
    ///     .create_protected(CreateRequest {
    ///         path: "/locks/build/lock-".into(),
    ///         session_id: session.id(),
    ///         sequential: true,
    ///         parents: true,
    ///         ..Default::default()
    ///     })
    ///     .await?;
    /// println!("my lock node: {}", r.node.unwrap().path); // .../lock-0000000007
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// [`ClientOptions::retry_budget`]: crate::ClientOptions::retry_budget
    pub async fn create_protected(
        &self,
        mut req: proto::CreateRequest,
    ) -> Result<proto::CreateResponse, Error> {
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        let id = req.request_id.clone();
        self.retry_ambiguous(&id, || self.create_with(req.clone()))
            .await
    }

    /// A transaction made safe to retry like [`Client::create_protected`]:
    /// it carries a request id (set here if empty, scoped to
    /// `request_session_id`), and an ambiguous outcome is retried with the
    /// same id, so the server applies it at most once and a retry returns
    /// the first attempt's result.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client, session: lockd_client::Session)
    /// # -> Result<(), lockd_client::Error> {
    /// use lockd_client::proto::{op, CreateRequest, Op, TxnRequest};
    /// let create = |path: &str| Op {
    ///     op: Some(op::Op::Create(CreateRequest {
    ///         path: path.into(),
    ///         session_id: session.id(),
    ///         ..Default::default()
    ///     })),
    /// };
    /// let r = client
    ///     .txn_protected(TxnRequest {
    ///         success: vec![create("/a"), create("/b")],
    ///         request_session_id: session.id(),
    ///         ..Default::default()
    ///     })
    ///     .await?;
    /// assert!(r.succeeded);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn txn_protected(
        &self,
        mut req: proto::TxnRequest,
    ) -> Result<proto::TxnResponse, Error> {
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        let id = req.request_id.clone();
        self.retry_ambiguous(&id, || self.txn(req.clone())).await
    }

    /// Runs `attempt` until it is not ambiguous, within the retry budget.
    /// Once an attempt was ambiguous, a later "unavailable" is ambiguous too.
    async fn retry_ambiguous<T, F, Fut>(&self, request_id: &str, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        let mut ambiguous: Option<String> = None;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let err = match attempt().await {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            match err {
                Error::Ambiguous(m) => {
                    tracing::debug!(request_id, error = %m, "outcome unknown; retrying with the same request id");
                    let first = ambiguous.get_or_insert(m).clone();
                    let delay = backoff.next_delay();
                    if start.elapsed() + delay >= self.options().retry_budget {
                        return Err(Error::Ambiguous(format!(
                            "{first} (request id {request_id}, {attempts} attempts in {:.1?})",
                            start.elapsed()
                        )));
                    }
                    tokio::time::sleep(delay).await;
                }
                Error::Unavailable(m) if ambiguous.is_some() => {
                    return Err(Error::Ambiguous(format!(
                        "{} (request id {request_id}); then: {m}",
                        ambiguous.unwrap_or_default()
                    )));
                }
                e => return Err(e),
            }
        }
    }
}

/// The client-side lease clock: the session is certainly alive until
/// `deadline`, the send time of the last acknowledged keepalive (or of the
/// open) plus the TTL.
#[derive(Debug, Clone, Copy)]
struct Lease {
    deadline: Instant,
}

impl Lease {
    fn new(sent: Instant, ttl: Duration) -> Self {
        Lease {
            deadline: sent + ttl,
        }
    }

    /// A keepalive sent at `sent` was acknowledged with `ttl`.
    fn ack(&mut self, sent: Instant, ttl: Duration) {
        self.deadline = self.deadline.max(sent + ttl);
    }

    #[cfg(test)]
    fn expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }
}

/// The shortest keepalive period.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Default keepalive period for a TTL.
fn interval_for(ttl: Duration) -> Duration {
    (ttl / 3).max(MIN_INTERVAL)
}

/// How long a keepalive may stay unanswered before the stream is given up.
fn stall_limit(ttl: Duration, request_timeout: Duration) -> Duration {
    interval_for(ttl).min(request_timeout)
}

/// How the keepalive loop ended.
enum Exit {
    /// [`Session::close`]: end quietly, the caller closes.
    Stopped,
    /// The [`Session`] was dropped: close on the server.
    Dropped,
    /// Lost; close on the server if it may still be alive there.
    Lost { close: bool },
}

/// Result of one keepalive stream.
enum Step {
    Exit(Exit),
    /// The stream failed; `acked` when it had acknowledged a keepalive.
    Failed {
        msg: String,
        acked: bool,
    },
}

struct Keeper {
    client: Client,
    id: u64,
    ttl: Duration,
    /// Time between keepalives.
    interval: Duration,
    lease: Lease,
    /// Shared with [`SessionHandle::renewed_at`].
    renewed: Arc<Mutex<Instant>>,
    state: watch::Sender<SessionState>,
    lost_reason: Arc<Mutex<Option<String>>>,
}

impl Keeper {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let exit = self.keep(&mut stop).await;
        let close = match exit {
            Exit::Stopped => false,
            Exit::Dropped => true,
            Exit::Lost { close } => close,
        };
        if close {
            let limit = self.client.timeout();
            match tokio::time::timeout(limit, self.client.close_session(self.id)).await {
                Ok(Ok(_)) => tracing::debug!(session = self.id, "session closed"),
                Ok(Err(e)) => {
                    tracing::debug!(session = self.id, error = %e, "closing the session failed")
                }
                Err(_) => tracing::debug!(session = self.id, "closing the session timed out"),
            }
        }
    }

    fn set(&self, s: SessionState) {
        self.state.send_if_modified(|cur| {
            if *cur == s || *cur == SessionState::Lost {
                false
            } else {
                *cur = s;
                true
            }
        });
    }

    fn lose(&self, reason: String, close: bool) -> Exit {
        tracing::warn!(session = self.id, %reason, "session lost");
        *self.lost_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.set(SessionState::Lost);
        Exit::Lost { close }
    }

    fn lose_by_deadline(&self) -> Exit {
        self.lose(
            format!(
                "session {}: no keepalive acknowledged within the TTL ({:?})",
                self.id, self.ttl
            ),
            true,
        )
    }

    fn lose_expired(&self, s: &Status) -> Exit {
        let reason = if s.message().contains(&self.id.to_string()) {
            s.message().to_string()
        } else {
            format!("session {}: {}", self.id, s.message())
        };
        self.lose(reason, false)
    }

    async fn keep(&mut self, stop: &mut oneshot::Receiver<()>) -> Exit {
        let (mut idx, n) = self.client.current_endpoint();
        let mut backoff = Backoff::new();
        loop {
            let (msg, acked) = match self.stream(idx, stop).await {
                Step::Exit(e) => return e,
                Step::Failed { msg, acked } => (msg, acked),
            };
            if acked {
                backoff = Backoff::new();
            }
            tracing::debug!(session = self.id, error = %msg, "keepalive stream failed; reconnecting");
            self.set(SessionState::Suspended);
            idx = (idx + 1) % n;
            let delay = backoff.next_delay();
            tokio::select! {
                biased;
                r = &mut *stop => return stopped(r),
                _ = tokio::time::sleep_until(self.lease.deadline) => return self.lose_by_deadline(),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Runs one keepalive stream on endpoint `idx` until it fails or the
    /// session ends.
    async fn stream(&mut self, idx: usize, stop: &mut oneshot::Receiver<()>) -> Step {
        let (name, ch) = self.client.channel_at(idx);
        let name = name.to_string();
        let interval = self.interval;
        let stall = stall_limit(self.ttl, self.client.timeout());
        let (tx, rx) = mpsc::channel(8);
        let req = proto::KeepAliveRequest {
            session_id: self.id,
        };
        let mut pending: VecDeque<Instant> = VecDeque::new();
        // The first keepalive goes out with the call.
        let _ = tx.try_send(req);
        pending.push_back(Instant::now());
        let mut next_send = Instant::now() + interval;
        let mut acked = false;
        let failed = |msg: String, acked: bool| Step::Failed {
            msg: format!("{name}: {msg}"),
            acked,
        };

        // No grpc-timeout on the call: the stream is meant to live long.
        let mut sc = SessionClient::new(ch);
        let call = sc.keep_alive(ReceiverStream::new(rx));
        let mut stream = tokio::select! {
            biased;
            r = &mut *stop => return Step::Exit(stopped(r)),
            _ = tokio::time::sleep_until(self.lease.deadline) => return Step::Exit(self.lose_by_deadline()),
            r = tokio::time::timeout(stall, call) => match r {
                Err(_) => return failed(format!("no answer within {stall:?}"), false),
                Ok(Err(s)) if status_is_expired(&s) => return Step::Exit(self.lose_expired(&s)),
                Ok(Err(s)) => return failed(describe(&s), false),
                Ok(Ok(resp)) => resp.into_inner(),
            },
        };
        loop {
            let stall_at = pending.front().map(|t| *t + stall);
            tokio::select! {
                biased;
                r = &mut *stop => return Step::Exit(stopped(r)),
                _ = tokio::time::sleep_until(self.lease.deadline) => return Step::Exit(self.lose_by_deadline()),
                m = stream.message() => match m {
                    Ok(Some(resp)) => {
                        if let Some(sent) = pending.pop_front() {
                            let ttl = if resp.ttl_ms > 0 {
                                Duration::from_millis(resp.ttl_ms)
                            } else {
                                self.ttl
                            };
                            self.lease.ack(sent, ttl);
                            {
                                let mut r = self.renewed.lock().unwrap_or_else(|p| p.into_inner());
                                *r = (*r).max(sent);
                            }
                            acked = true;
                            self.set(SessionState::Connected);
                        }
                    }
                    Ok(None) => return failed("keepalive stream ended".into(), acked),
                    Err(s) if status_is_expired(&s) => return Step::Exit(self.lose_expired(&s)),
                    Err(s) => return failed(describe(&s), acked),
                },
                _ = sleep_until_opt(stall_at) => {
                    return failed(format!("keepalive not answered within {stall:?}"), acked);
                }
                _ = tokio::time::sleep_until(next_send) => {
                    if tx.try_send(req).is_err() {
                        return failed("keepalive stream is not draining".into(), acked);
                    }
                    let now = Instant::now();
                    pending.push_back(now);
                    next_send = now + interval;
                }
            }
        }
    }
}

fn stopped(r: Result<(), oneshot::error::RecvError>) -> Exit {
    match r {
        Ok(()) => Exit::Stopped,
        Err(_) => Exit::Dropped,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
