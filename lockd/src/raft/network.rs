//! Raft messages between members, over the same gRPC port that serves
//! clients (service `lockd.v1.Raft`).
//!
//! Owns: the pool of peer channels, the envelope that carries identity with
//! every message, and the client side of each Raft RPC. Payloads are
//! openraft's own messages encoded with postcard.
//!
//! Must never: send to a peer without naming the data-dir instance it
//! believes the peer has, so a member whose disk was wiped cannot take part
//! under its old id.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};

use lockd_proto::v1::raft_client::RaftClient;
use lockd_proto::v1::{PeerEnvelope, SnapshotChunk};
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{stream_append_sequential, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tonic::transport::{Channel, Endpoint};

use super::sm::StateMachineStore;
use super::types::{Snapshot, SnapshotData, TypeConfig, Vote};
use crate::identity::Identity;

/// Marks a refusal that means "your node id belongs to another data dir"
/// (sent with PERMISSION_DENIED to the stale sender only).
pub const REFUSED_MARK: &str = "already used";

/// HTTP/2 flow-control window for peer traffic: large enough that a batch
/// of big entries is not throttled by window updates on loopback or LAN.
pub const WINDOW: u32 = 8 * 1024 * 1024;

/// Time allowed for an AppendEntries that carries entries.
const ENTRIES_TIMEOUT: Duration = Duration::from_secs(5);

/// Time allowed to open a replication stream.
const STREAM_SETUP_TIMEOUT: Duration = Duration::from_secs(1);

/// Size of one snapshot chunk on the wire.
const SNAPSHOT_CHUNK: usize = 1024 * 1024;

/// Errors of the member-to-member transport.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer address is not a valid URI.
    #[error("invalid peer address {0:?}: {1}")]
    Address(String, String),
    /// The RPC failed.
    #[error("peer {addr}: {status}")]
    Status {
        /// Peer address.
        addr: String,
        /// gRPC status.
        status: tonic::Status,
    },
    /// A payload could not be encoded or decoded.
    #[error("peer message codec: {0}")]
    Codec(String),
    /// The RPC did not finish in time.
    #[error("peer {0}: timed out")]
    Timeout(String),
}

/// Encodes a peer payload.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, PeerError> {
    postcard::to_stdvec(v).map_err(|e| PeerError::Codec(e.to_string()))
}

/// Decodes a peer payload.
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, PeerError> {
    postcard::from_bytes(b).map_err(|e| PeerError::Codec(e.to_string()))
}

/// Lazily connected channels to peers, by address, plus what is needed to
/// address them.
#[derive(Clone)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    identity: Arc<Identity>,
    sm: StateMachineStore,
    fatal: Arc<watch::Sender<Option<String>>>,
    /// Upper bound on a single peer RPC (forwarding, read index).
    pub rpc_timeout: Duration,
}

impl Peers {
    /// Creates an empty pool.
    pub fn new(identity: Arc<Identity>, sm: StateMachineStore, rpc_timeout: Duration) -> Peers {
        Peers {
            channels: Arc::new(Mutex::new(HashMap::new())),
            identity,
            sm,
            fatal: Arc::new(watch::channel(None).0),
            rpc_timeout,
        }
    }

    /// This member's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// A gRPC client for `addr` (host:port), sharing one HTTP/2 connection.
    pub fn client(&self, addr: &str) -> Result<RaftClient<Channel>, PeerError> {
        self.channel(addr).map(raft_client)
    }

    /// The shared channel to `addr`, created (lazily connected) on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, PeerError> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| PeerError::Address(addr.to_string(), e.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .initial_stream_window_size(Some(WINDOW))
            .initial_connection_window_size(Some(WINDOW * 2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let ch = ep.connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// Resolves when the member must stop, with the reason.
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }

    /// Stops the member: its identity was refused by the cluster.
    pub fn set_fatal(&self, reason: String) {
        tracing::error!(%reason, "stopping");
        self.fatal.send_replace(Some(reason));
    }

    /// The envelope for a message to `to` carrying `payload`.
    pub fn envelope(&self, to: u64, payload: Vec<u8>) -> PeerEnvelope {
        let to_instance = self
            .sm
            .read()
            .state
            .instance_of(to)
            .map(str::to_string)
            .unwrap_or_default();
        PeerEnvelope {
            cluster_id: self.identity.cluster_id.clone(),
            from_id: self.identity.node_id,
            to_instance,
            from_instance: self.identity.instance.clone(),
            to_id: to,
            payload,
        }
    }
}

fn raft_client(ch: Channel) -> RaftClient<Channel> {
    RaftClient::new(ch)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// openraft's network factory.
pub struct Network {
    peers: Peers,
}

impl Network {
    /// Wraps a peer pool.
    pub fn new(peers: Peers) -> Network {
        Network { peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConn;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerConn {
        PeerConn {
            peers: self.peers.clone(),
            target,
            addr: node.addr.clone(),
            serves_streams: false,
        }
    }
}

/// A connection to one peer.
pub struct PeerConn {
    peers: Peers,
    target: u64,
    addr: String,
    /// Set once the peer has served `StreamAppend`; cleared by a transport
    /// error, since the peer may have been restarted on another version. A
    /// peer that answers UNIMPLEMENTED (an earlier version) is asked again
    /// at the next replication session, so it gets streams once upgraded.
    serves_streams: bool,
}

fn unreachable(e: PeerError) -> RPCError<TypeConfig> {
    match e {
        PeerError::Codec(_) => RPCError::Network(NetworkError::new(&e)),
        _ => RPCError::Unreachable(Unreachable::new(&e)),
    }
}

/// Requests sent on a replication stream and not answered yet, oldest first.
#[derive(Default)]
struct InFlight {
    sent: Mutex<VecDeque<Instant>>,
    more: Notify,
}

impl InFlight {
    fn push(&self) {
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(Instant::now());
        self.more.notify_one();
    }

    fn pop(&self) {
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
    }

    fn oldest(&self) -> Option<Instant> {
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .front()
            .copied()
    }
}

type AppendResults<'s> =
    BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>;

impl PeerConn {
    /// Whether the peer serves `StreamAppend`: an empty stream is answered
    /// with an empty stream by members that do, UNIMPLEMENTED by older ones.
    async fn probe_streaming(&mut self) -> Result<bool, PeerError> {
        if self.serves_streams {
            return Ok(true);
        }
        let mut client = self.peers.client(&self.addr)?;
        let call = client.stream_append(futures::stream::empty::<PeerEnvelope>());
        let status = match tokio::time::timeout(STREAM_SETUP_TIMEOUT, call).await {
            Err(_) => return Err(PeerError::Timeout(self.addr.clone())),
            Ok(Ok(mut replies)) => replies.get_mut().message().await.err(),
            Ok(Err(status)) => Some(status),
        };
        let streaming = match status {
            None => true,
            Some(s) if s.code() == tonic::Code::Unimplemented => false,
            Some(status) => {
                return Err(PeerError::Status {
                    addr: self.addr.clone(),
                    status,
                })
            }
        };
        self.serves_streams = streaming;
        Ok(streaming)
    }

    /// Opens a replication stream whose first request is `first` and the
    /// rest come from `input`, and returns the replies in order.
    async fn open_stream<S>(
        &mut self,
        first: AppendEntriesRequest<TypeConfig>,
        input: S,
    ) -> Result<AppendResults<'static>, PeerError>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        let in_flight = Arc::new(InFlight::default());
        // The requests end when openraft drops the replies (it has moved on
        // to another session), so this stream never sends on its behalf.
        let (replies_alive, replies_dropped) = tokio::sync::oneshot::channel::<()>();
        let (peers, target, sending) = (self.peers.clone(), self.target, in_flight.clone());
        // A request that cannot be encoded ends the stream: openraft then
        // starts a new one from what was acknowledged.
        let requests = futures::stream::once(futures::future::ready(first))
            .chain(input)
            .take_until(replies_dropped)
            .scan((), move |_, req| {
                let env = match encode(&req) {
                    Ok(payload) => {
                        sending.push();
                        Some(peers.envelope(target, payload))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "replication stream: cannot encode a request");
                        None
                    }
                };
                futures::future::ready(env)
            });
        let mut client = self.peers.client(&self.addr)?;
        let replies = tokio::time::timeout(STREAM_SETUP_TIMEOUT, client.stream_append(requests))
            .await
            .map_err(|_| PeerError::Timeout(self.addr.clone()))?
            .map_err(|status| self.status_error(status))?
            .into_inner();
        let (peers, addr) = (self.peers.clone(), self.addr.clone());
        let replies = futures::stream::unfold(Some((replies, replies_alive)), move |state| {
            let (in_flight, peers, addr) = (in_flight.clone(), peers.clone(), addr.clone());
            async move {
                let (mut replies, alive) = state?;
                loop {
                    // A reply is due ENTRIES_TIMEOUT after its request was
                    // sent; while nothing is outstanding, wait for requests.
                    let due = in_flight.oldest().map(|sent| sent + ENTRIES_TIMEOUT);
                    let next = tokio::select! {
                        next = replies.next() => next,
                        _ = in_flight.more.notified(), if due.is_none() => continue,
                        _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {
                            return Some((Err(unreachable(PeerError::Timeout(addr))), None));
                        }
                    };
                    return match next {
                        None => None,
                        Some(Ok(reply)) => {
                            in_flight.pop();
                            match decode::<StreamAppendResult<TypeConfig>>(&reply.payload) {
                                Ok(result) => Some((Ok(result), Some((replies, alive)))),
                                Err(e) => Some((Err(unreachable(e)), None)),
                            }
                        }
                        Some(Err(status)) => {
                            let e = status_error(&peers, &addr, status);
                            Some((Err(unreachable(e)), None))
                        }
                    };
                }
            }
        });
        Ok(Box::pin(replies))
    }

    fn status_error(&self, status: tonic::Status) -> PeerError {
        status_error(&self.peers, &self.addr, status)
    }

    async fn call<Req, Resp, F, Fut>(
        &self,
        req: &Req,
        ttl: Duration,
        f: F,
    ) -> Result<Resp, PeerError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, PeerEnvelope) -> Fut,
        Fut: Future<Output = Result<tonic::Response<lockd_proto::v1::PeerReply>, tonic::Status>>,
    {
        let client = self.peers.client(&self.addr)?;
        let env = self.peers.envelope(self.target, encode(req)?);
        let reply = tokio::time::timeout(ttl, f(client, env))
            .await
            .map_err(|_| PeerError::Timeout(self.addr.clone()))?
            .map_err(|status| self.status_error(status))?;
        decode(&reply.into_inner().payload)
    }
}

/// The error for a failed peer RPC; a refusal of this member's identity
/// stops the member.
fn status_error(peers: &Peers, addr: &str, status: tonic::Status) -> PeerError {
    if status.code() == tonic::Code::PermissionDenied && status.message().contains(REFUSED_MARK) {
        peers.set_fatal(status.message().to_string());
    }
    PeerError::Status {
        addr: addr.to_string(),
        status,
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConn {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // openraft's budget is one heartbeat interval, right for heartbeats;
        // entries also need an fsync on the follower and may be large.
        let ttl = if rpc.entries.is_empty() {
            option.hard_ttl()
        } else {
            option.hard_ttl().max(ENTRIES_TIMEOUT)
        };
        self.call(&rpc, ttl, |mut c, env| async move {
            c.append_entries(env).await
        })
        .await
        .map_err(unreachable)
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<AppendResults<'s>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        Box::pin(async move {
            let mut input = input;
            let Some(first) = input.next().await else {
                return Ok(Box::pin(futures::stream::empty()) as AppendResults<'s>);
            };
            // A one-off request (heartbeats come as a one-item stream) is a
            // plain call; so is everything to a peer without StreamAppend.
            let one_off = input.size_hint().1 == Some(0);
            let streaming = !one_off
                && self
                    .probe_streaming()
                    .await
                    .inspect_err(|_| self.serves_streams = false)
                    .map_err(unreachable)?;
            if !streaming {
                let rest =
                    Box::pin(futures::stream::once(futures::future::ready(first)).chain(input));
                return stream_append_sequential(self, rest, option).await;
            }
            match self.open_stream(first, input).await {
                Ok(replies) => Ok(replies),
                Err(e) => {
                    self.serves_streams = false;
                    Err(unreachable(e))
                }
            }
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&(false, rpc), option.hard_ttl(), |mut c, env| async move {
            c.vote(env).await
        })
        .await
        .map_err(unreachable)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&(true, rpc), option.hard_ttl(), |mut c, env| async move {
            c.vote(env).await
        })
        .await
        .map_err(unreachable)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&req, option.hard_ttl(), |mut c, env| async move {
            c.transfer_leader(env).await
        })
        .await
        .map_err(unreachable)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let to_stream = |e: PeerError| StreamingError::Unreachable(Unreachable::new(&e));
        let mut client = self.peers.client(&self.addr).map_err(to_stream)?;
        let head = encode(&(vote, snapshot.meta.clone())).map_err(to_stream)?;
        let envelope = self.peers.envelope(self.target, head);
        let data = snapshot.snapshot.into_inner();
        let mut chunks: Vec<SnapshotChunk> = data
            .chunks(SNAPSHOT_CHUNK)
            .map(|c| SnapshotChunk {
                envelope: None,
                data: c.to_vec(),
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(SnapshotChunk {
                envelope: None,
                data: Vec::new(),
            });
        }
        chunks[0].envelope = Some(envelope);
        let addr = self.addr.clone();
        let send = async move {
            client
                .install_snapshot(futures::stream::iter(chunks))
                .await
                .map_err(|status| PeerError::Status { addr, status })
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = send => {
                let reply = r.map_err(to_stream)?;
                decode(&reply.into_inner().payload).map_err(to_stream)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use lockd_proto::v1::raft_server::{Raft, RaftServer};
    use lockd_proto::v1::PeerReply;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    /// A member of a version before `StreamAppend`: it answers appends one
    /// call at a time.
    struct EarlierMember {
        appends: Arc<AtomicUsize>,
    }

    fn not_served<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not served by this version"))
    }

    #[tonic::async_trait]
    impl Raft for EarlierMember {
        async fn append_entries(
            &self,
            req: Request<PeerEnvelope>,
        ) -> Result<Response<PeerReply>, Status> {
            let _: AppendEntriesRequest<TypeConfig> = decode(&req.into_inner().payload)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            self.appends.fetch_add(1, Ordering::SeqCst);
            let payload = encode(&AppendEntriesResponse::<TypeConfig>::Success)
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(Response::new(PeerReply { payload }))
        }
        type StreamAppendStream = futures::stream::BoxStream<'static, Result<PeerReply, Status>>;
        async fn stream_append(
            &self,
            _: Request<Streaming<PeerEnvelope>>,
        ) -> Result<Response<Self::StreamAppendStream>, Status> {
            not_served()
        }
        async fn vote(&self, _: Request<PeerEnvelope>) -> Result<Response<PeerReply>, Status> {
            not_served()
        }
        async fn transfer_leader(
            &self,
            _: Request<PeerEnvelope>,
        ) -> Result<Response<PeerReply>, Status> {
            not_served()
        }
        async fn install_snapshot(
            &self,
            _: Request<Streaming<SnapshotChunk>>,
        ) -> Result<Response<PeerReply>, Status> {
            not_served()
        }
        async fn propose(&self, _: Request<PeerEnvelope>) -> Result<Response<PeerReply>, Status> {
            not_served()
        }
        async fn read_index(
            &self,
            _: Request<PeerEnvelope>,
        ) -> Result<Response<PeerReply>, Status> {
            not_served()
        }
        async fn keep_alive(
            &self,
            _: Request<PeerEnvelope>,
        ) -> Result<Response<PeerReply>, Status> {
            not_served()
        }
    }

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: vec![],
        }
    }

    #[tokio::test]
    async fn replicates_to_a_member_without_stream_append_one_call_at_a_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let appends = Arc::new(AtomicUsize::new(0));
        let server = tonic::transport::Server::builder()
            .add_service(RaftServer::new(EarlierMember {
                appends: appends.clone(),
            }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);

        let dir = tempfile::tempdir().expect("tmp");
        let sm = StateMachineStore::open(dir.path().to_path_buf()).expect("sm");
        let identity = Arc::new(Identity {
            cluster_id: "c".into(),
            node_id: 1,
            instance: "i".into(),
        });
        let peers = Peers::new(identity, sm, Duration::from_secs(1));
        let mut conn = Network::new(peers).new_client(2, &BasicNode { addr }).await;

        // Three requests on a stream that could carry more: the peer refuses
        // StreamAppend, so each goes as its own AppendEntries call.
        let input = Box::pin(futures::stream::iter(vec![
            heartbeat(),
            heartbeat(),
            heartbeat(),
        ]));
        let results: Vec<_> = conn
            .stream_append(input, RPCOption::new(Duration::from_secs(1)))
            .await
            .expect("stream opens")
            .collect()
            .await;
        assert_eq!(results.len(), 3, "{results:?}");
        assert!(
            results.iter().all(|r| matches!(r, Ok(Ok(_)))),
            "{results:?}"
        );
        assert_eq!(appends.load(Ordering::SeqCst), 3);
        // Not remembered: the peer may be upgraded before the next session.
        assert!(!conn.serves_streams);
        server.abort();
    }
}
