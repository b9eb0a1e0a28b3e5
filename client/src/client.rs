//! [`Client`], [`ClientOptions`] and the admin handle [`Cluster`].

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockd_proto::v1 as proto;
use proto::cluster_client::ClusterClient;
use proto::kv_client::KvClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::retry::{classify, describe, Backoff, Kind, Verdict};

/// How long establishing a TCP connection to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Minimum timeout for `AddLearner` with `wait = true` (catch-up may be slow).
const ADD_LEARNER_WAIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Tuning knobs for a [`Client`].
///
/// ```no_run
/// # fn demo() -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// use lockd_client::{Client, ClientOptions};
///
/// let opts = ClientOptions {
///     request_timeout: Duration::from_secs(2),
///     ..ClientOptions::default()
/// };
/// let client = Client::connect_with(["127.0.0.1:7001", "127.0.0.1:7002"], opts)?;
/// assert_eq!(client.options().request_timeout, Duration::from_secs(2));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Timeout of a single attempt of a request (default 10s). A write that
    /// times out is reported as [`Error::Ambiguous`].
    pub request_timeout: Duration,
    /// Total time spent retrying a request on other endpoints before giving
    /// up with [`Error::Unavailable`] (default 15s).
    pub retry_budget: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            retry_budget: Duration::from_secs(15),
        }
    }
}

struct Inner {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    /// Index of the endpoint that answered last.
    current: AtomicUsize,
    opts: ClientOptions,
}

/// A handle to a lockd cluster.
///
/// Holds one lazily connected gRPC channel per endpoint. Cloning is cheap and
/// clones share the channels and the "last endpoint that answered" cursor.
///
/// Failover: a request goes to the endpoint that answered last. Reads are
/// retried on the next endpoint (exponential backoff with jitter, 50ms up to
/// 1s) after any transport failure, `UNAVAILABLE` or timeout. Writes are
/// retried only when the failure proves the write was not applied (the
/// connection could not be established, or the server answered
/// `UNAVAILABLE`); other transport failures and timeouts of writes surface as
/// [`Error::Ambiguous`]. Retrying stops when [`ClientOptions::retry_budget`]
/// is spent.
///
/// ```no_run
/// # async fn demo() -> Result<(), lockd_client::Error> {
/// use lockd_client::{Client, Error};
///
/// let client = Client::connect(["10.0.0.1:7001", "10.0.0.2:7001", "10.0.0.3:7001"])?;
/// match client.create("/jobs/42", "queued").await {
///     Ok(r) => println!("created: {:?}", r.node.map(|n| n.create_revision)),
///     Err(Error::AlreadyExists(_)) => println!("already queued"),
///     // The write may or may not have been applied: read it back.
///     Err(Error::Ambiguous(_)) => println!("now: {:?}", client.get("/jobs/42").await?.node),
///     Err(e) => return Err(e),
/// }
/// let jobs = client.list("/jobs").await?.children;
/// println!("{} jobs", jobs.len());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.inner.endpoints)
            .field("opts", &self.inner.opts)
            .finish()
    }
}

/// Normalizes `host:port` or `http://host:port` to `(name, uri)`.
pub(crate) fn parse_endpoint(raw: &str) -> Result<(String, String), Error> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(Error::InvalidEndpoint("empty endpoint".into()));
    }
    if raw.starts_with("https://") {
        return Err(Error::InvalidEndpoint(format!(
            "{raw}: TLS (https) is not supported"
        )));
    }
    let name = raw
        .strip_prefix("http://")
        .unwrap_or(raw)
        .trim_end_matches('/');
    if name.is_empty() || name.contains("://") || name.contains('/') {
        return Err(Error::InvalidEndpoint(format!("{raw}: expected host:port")));
    }
    let Some((host, port)) = name.rsplit_once(':') else {
        return Err(Error::InvalidEndpoint(format!(
            "{raw}: expected host:port (missing port)"
        )));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(Error::InvalidEndpoint(format!("{raw}: expected host:port")));
    }
    Ok((name.to_string(), format!("http://{name}")))
}

fn lazy_channel(raw: &str) -> Result<(String, Channel), Error> {
    let (name, uri) = parse_endpoint(raw)?;
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::InvalidEndpoint(
            "lockd client must be created inside a Tokio runtime".into(),
        ));
    }
    let ep = Endpoint::from_shared(uri)
        .map_err(|e| Error::InvalidEndpoint(format!("{raw}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    Ok((name, ep.connect_lazy()))
}

pub(crate) fn request<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

impl Client {
    /// Creates a client for the given `host:port` endpoints with default
    /// [`ClientOptions`]. No connection is made until the first request.
    ///
    /// Must be called from within a Tokio runtime. Fails with
    /// [`Error::InvalidEndpoint`] if the list is empty or an endpoint is
    /// malformed.
    pub fn connect(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Client, Error> {
        Self::connect_with(endpoints, ClientOptions::default())
    }

    /// Like [`Client::connect`], with explicit options.
    pub fn connect_with(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        opts: ClientOptions,
    ) -> Result<Client, Error> {
        let mut names = Vec::new();
        let mut channels = Vec::new();
        for e in endpoints {
            let (name, ch) = lazy_channel(&e.into())?;
            names.push(name);
            channels.push(ch);
        }
        if channels.is_empty() {
            return Err(Error::InvalidEndpoint("no endpoints given".into()));
        }
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints: names,
                channels,
                current: AtomicUsize::new(0),
                opts,
            }),
        })
    }

    /// The endpoints (`host:port`) this client talks to, in the given order.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// The options this client was created with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    /// The endpoint to use first, and how many there are.
    pub(crate) fn current_endpoint(&self) -> (usize, usize) {
        let n = self.inner.channels.len();
        (self.inner.current.load(Ordering::Relaxed) % n, n)
    }

    /// The name and channel of endpoint `idx`.
    pub(crate) fn channel_at(&self, idx: usize) -> (&str, Channel) {
        let i = idx % self.inner.channels.len();
        (&self.inner.endpoints[i], self.inner.channels[i].clone())
    }

    /// The admin/membership API of the cluster.
    pub fn cluster(&self) -> Cluster {
        Cluster {
            client: self.clone(),
        }
    }

    /// Runs one call with failover and retries according to `kind`.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        kind: Kind,
        timeout: Duration,
        mut f: F,
    ) -> Result<T, Error>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let inner = &self.inner;
        let n = inner.channels.len();
        let start = Instant::now();
        let mut backoff = Backoff::new();
        let mut idx = inner.current.load(Ordering::Relaxed) % n;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let ep = &inner.endpoints[idx];
            let res = match tokio::time::timeout(timeout, f(inner.channels[idx].clone(), timeout))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within {timeout:?}"
                ))),
            };
            let status = match res {
                Ok(resp) => {
                    inner.current.store(idx, Ordering::Relaxed);
                    return Ok(resp.into_inner());
                }
                Err(s) => s,
            };
            tracing::debug!(endpoint = %ep, attempt = attempts, status = %describe(&status), "lockd request failed");
            match classify(kind, status) {
                Verdict::Fail(e) => {
                    return Err(match e {
                        Error::Ambiguous(m) => Error::Ambiguous(format!("{ep}: {m}")),
                        Error::Unavailable(m) => Error::Unavailable(format!("{ep}: {m}")),
                        e => e,
                    })
                }
                Verdict::Retry(msg) => {
                    idx = (idx + 1) % n;
                    inner.current.store(idx, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    if start.elapsed() + delay >= inner.opts.retry_budget {
                        return Err(Error::Unavailable(format!(
                            "{ep}: {msg} (gave up after {attempts} attempt{} in {:.1?})",
                            if attempts == 1 { "" } else { "s" },
                            start.elapsed()
                        )));
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.inner.opts.request_timeout
    }

    /// Creates `path` with `data`; fails with [`Error::AlreadyExists`] if it
    /// exists and [`Error::NotFound`] if the parent is missing.
    pub async fn create(
        &self,
        path: impl Into<String>,
        data: impl Into<Vec<u8>>,
    ) -> Result<proto::CreateResponse, Error> {
        self.create_with(proto::CreateRequest {
            path: path.into(),
            data: data.into(),
            parents: false,
            ..Default::default()
        })
        .await
    }

    /// Sends a full [`proto::CreateRequest`]: `parents`, an ephemeral node
    /// (`session_id`), `sequential` (the server appends a 10-digit counter to
    /// `path`; the response names the node), `container`, `request_id`.
    ///
    /// A plain write: an [`Error::Ambiguous`] create is not retried. For
    /// sequential or ephemeral nodes prefer [`Client::create_protected`]
    /// (or [`Client::create_ephemeral`]), which retries with a request id.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// use lockd_client::proto::CreateRequest;
    /// // A container for lock nodes: removed once its last child is gone.
    /// client
    ///     .create_with(CreateRequest {
    ///         path: "/locks/build".into(),
    ///         container: true,
    ///         parents: true,
    ///         ..Default::default()
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create_with(
        &self,
        req: proto::CreateRequest,
    ) -> Result<proto::CreateResponse, Error> {
        self.call(Kind::Write, self.timeout(), |ch, t| {
            let r = request(req.clone(), t);
            async move { KvClient::new(ch).create(r).await }
        })
        .await
    }

    /// Creates or overwrites `path` with `data`.
    pub async fn put(
        &self,
        path: impl Into<String>,
        data: impl Into<Vec<u8>>,
    ) -> Result<proto::PutResponse, Error> {
        self.put_with(proto::PutRequest {
            path: path.into(),
            data: data.into(),
            expected_version: None,
            parents: false,
        })
        .await
    }

    /// Sends a full [`proto::PutRequest`] (e.g. with `expected_version`).
    pub async fn put_with(&self, req: proto::PutRequest) -> Result<proto::PutResponse, Error> {
        self.call(Kind::Write, self.timeout(), |ch, t| {
            let r = request(req.clone(), t);
            async move { KvClient::new(ch).put(r).await }
        })
        .await
    }

    /// Reads `path` (linearizable); [`Error::NotFound`] when absent.
    pub async fn get(&self, path: impl Into<String>) -> Result<proto::GetResponse, Error> {
        self.get_with(proto::GetRequest {
            path: path.into(),
            serializable: false,
            min_revision: 0,
        })
        .await
    }

    /// Sends a full [`proto::GetRequest`] (e.g. `serializable`).
    pub async fn get_with(&self, req: proto::GetRequest) -> Result<proto::GetResponse, Error> {
        self.call(Kind::Read, self.timeout(), |ch, t| {
            let r = request(req.clone(), t);
            async move { KvClient::new(ch).get(r).await }
        })
        .await
    }

    /// Deletes `path` (not recursively).
    pub async fn delete(&self, path: impl Into<String>) -> Result<proto::DeleteResponse, Error> {
        self.delete_with(proto::DeleteRequest {
            path: path.into(),
            expected_version: None,
            recursive: false,
        })
        .await
    }

    /// Sends a full [`proto::DeleteRequest`] (e.g. `recursive`).
    pub async fn delete_with(
        &self,
        req: proto::DeleteRequest,
    ) -> Result<proto::DeleteResponse, Error> {
        self.call(Kind::Write, self.timeout(), |ch, t| {
            let r = request(req.clone(), t);
            async move { KvClient::new(ch).delete(r).await }
        })
        .await
    }

    /// Lists the children of `path` (linearizable).
    pub async fn list(&self, path: impl Into<String>) -> Result<proto::ListResponse, Error> {
        self.list_with(proto::ListRequest {
            path: path.into(),
            serializable: false,
            min_revision: 0,
        })
        .await
    }

    /// Sends a full [`proto::ListRequest`].
    pub async fn list_with(&self, req: proto::ListRequest) -> Result<proto::ListResponse, Error> {
        self.call(Kind::Read, self.timeout(), |ch, t| {
            let r = request(req.clone(), t);
            async move { KvClient::new(ch).list(r).await }
        })
        .await
    }

    /// Runs a transaction (always treated as a write).
    pub async fn txn(&self, req: proto::TxnRequest) -> Result<proto::TxnResponse, Error> {
        self.call(Kind::Write, self.timeout(), |ch, t| {
            let r = request(req.clone(), t);
            async move { KvClient::new(ch).txn(r).await }
        })
        .await
    }
}

/// Admin and membership API; obtained with [`Client::cluster`].
///
/// Membership changes are writes (retried only when provably not applied).
/// Members forward them to the leader.
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// let cluster = client.cluster();
/// let status = cluster.status().await?;
/// println!("leader {} in term {}", status.leader_id, status.term);
/// for m in &status.members {
///     println!("member {m:?}");
/// }
/// // One member in particular, without failover.
/// let two = cluster.status_of("127.0.0.1:7002").await?;
/// println!("member {} applied up to {}", two.id, two.applied_index);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Cluster {
    client: Client,
}

impl Cluster {
    /// The endpoints of the underlying client.
    pub fn endpoints(&self) -> &[String] {
        self.client.endpoints()
    }

    /// Status of whichever member answers (with failover).
    pub async fn status(&self) -> Result<proto::StatusResponse, Error> {
        let c = &self.client;
        c.call(Kind::Read, c.timeout(), |ch, t| {
            let r = request(proto::StatusRequest {}, t);
            async move { ClusterClient::new(ch).status(r).await }
        })
        .await
    }

    /// Status of one specific member, `host:port` (a configured endpoint or
    /// any other address). One attempt, no failover; an unreachable member
    /// fails with [`Error::Unavailable`].
    pub async fn status_of(&self, endpoint: &str) -> Result<proto::StatusResponse, Error> {
        let c = &self.client;
        let (name, _) = parse_endpoint(endpoint)?;
        let ch = match c.inner.endpoints.iter().position(|e| *e == name) {
            Some(i) => c.inner.channels[i].clone(),
            None => lazy_channel(endpoint)?.1,
        };
        let t = c.timeout();
        let mut cc = ClusterClient::new(ch);
        let fut = cc.status(request(proto::StatusRequest {}, t));
        match tokio::time::timeout(t, fut).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(s)) => Err(match classify(Kind::Read, s) {
                Verdict::Retry(m) => Error::Unavailable(format!("{name}: {m}")),
                Verdict::Fail(e) => e,
            }),
            Err(_) => Err(Error::Unavailable(format!(
                "{name}: no answer within {t:?}"
            ))),
        }
    }

    /// Initializes a new cluster with `members` as the initial voters (empty:
    /// the answering member alone).
    pub async fn initialize(
        &self,
        members: Vec<proto::Member>,
    ) -> Result<proto::InitializeResponse, Error> {
        let c = &self.client;
        let req = proto::InitializeRequest { members };
        c.call(Kind::Write, c.timeout(), |ch, t| {
            let r = request(req.clone(), t);
            async move { ClusterClient::new(ch).initialize(r).await }
        })
        .await
    }

    /// Adds member `id` at `addr` as a learner; with `wait`, returns once it
    /// has caught up (the timeout is then at least 120s).
    pub async fn add_learner(
        &self,
        id: u64,
        addr: impl Into<String>,
        wait: bool,
    ) -> Result<proto::AddLearnerResponse, Error> {
        let c = &self.client;
        let req = proto::AddLearnerRequest {
            id,
            addr: addr.into(),
            wait,
        };
        let timeout = if wait {
            c.timeout().max(ADD_LEARNER_WAIT_TIMEOUT)
        } else {
            c.timeout()
        };
        c.call(Kind::Write, timeout, |ch, t| {
            let r = request(req.clone(), t);
            async move { ClusterClient::new(ch).add_learner(r).await }
        })
        .await
    }

    /// Promotes learner `id` to voter.
    pub async fn promote(&self, id: u64) -> Result<proto::PromoteResponse, Error> {
        let c = &self.client;
        c.call(Kind::Write, c.timeout(), |ch, t| {
            let r = request(proto::PromoteRequest { id }, t);
            async move { ClusterClient::new(ch).promote(r).await }
        })
        .await
    }

    /// Replaces the voter set; dropped voters become learners unless
    /// `remove_dropped`.
    pub async fn change_voters(
        &self,
        voters: Vec<u64>,
        remove_dropped: bool,
    ) -> Result<proto::ChangeVotersResponse, Error> {
        let c = &self.client;
        let req = proto::ChangeVotersRequest {
            voters,
            remove_dropped,
        };
        c.call(Kind::Write, c.timeout(), |ch, t| {
            let r = request(req.clone(), t);
            async move { ClusterClient::new(ch).change_voters(r).await }
        })
        .await
    }

    /// Removes member `id` (voter or learner) from the cluster.
    pub async fn remove_member(&self, id: u64) -> Result<proto::RemoveMemberResponse, Error> {
        let c = &self.client;
        c.call(Kind::Write, c.timeout(), |ch, t| {
            let r = request(proto::RemoveMemberRequest { id }, t);
            async move { ClusterClient::new(ch).remove_member(r).await }
        })
        .await
    }

    /// Asks the leader to hand leadership to voter `id`.
    pub async fn transfer_leader(&self, id: u64) -> Result<proto::TransferLeaderResponse, Error> {
        let c = &self.client;
        c.call(Kind::Write, c.timeout(), |ch, t| {
            let r = request(proto::TransferLeaderRequest { id }, t);
            async move { ClusterClient::new(ch).transfer_leader(r).await }
        })
        .await
    }

    /// Makes the answering member take a snapshot of its state machine
    /// (safe to retry, so it fails over like a read).
    pub async fn snapshot(&self) -> Result<proto::SnapshotResponse, Error> {
        let c = &self.client;
        c.call(Kind::Read, c.timeout(), |ch, t| {
            let r = request(proto::SnapshotRequest {}, t);
            async move { ClusterClient::new(ch).snapshot(r).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parsing() {
        assert_eq!(
            parse_endpoint("127.0.0.1:7001").unwrap(),
            ("127.0.0.1:7001".into(), "http://127.0.0.1:7001".into())
        );
        assert_eq!(
            parse_endpoint(" http://localhost:7002/ ").unwrap().0,
            "localhost:7002"
        );
        assert_eq!(parse_endpoint("[::1]:7003").unwrap().0, "[::1]:7003");
        for bad in [
            "",
            "localhost",
            "host:",
            ":7001",
            "host:99999",
            "https://a:1",
            "a:1/x",
        ] {
            assert!(
                matches!(parse_endpoint(bad), Err(Error::InvalidEndpoint(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn connect_is_lazy_and_validates() {
        let c = Client::connect(["127.0.0.1:1", "127.0.0.1:2"]).unwrap();
        assert_eq!(c.endpoints(), ["127.0.0.1:1", "127.0.0.1:2"]);
        assert!(matches!(
            Client::connect(Vec::<String>::new()),
            Err(Error::InvalidEndpoint(_))
        ));
        assert!(matches!(
            Client::connect(["nope"]),
            Err(Error::InvalidEndpoint(_))
        ));
    }

    #[tokio::test]
    async fn unreachable_cluster_gives_unavailable_for_writes() {
        // Port 1 on localhost refuses connections: provably not applied, so
        // the write is retried until the budget is spent.
        let c = Client::connect_with(
            ["127.0.0.1:1", "127.0.0.1:2"],
            ClientOptions {
                request_timeout: Duration::from_secs(2),
                retry_budget: Duration::from_millis(300),
            },
        )
        .unwrap();
        let err = c.put("/a", "b").await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        let err = c.get("/a").await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        let err = c.cluster().status_of("127.0.0.1:1").await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }
}
