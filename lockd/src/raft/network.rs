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

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockd_proto::v1::raft_client::RaftClient;
use lockd_proto::v1::{PeerEnvelope, SnapshotChunk};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
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
        }
    }
}

/// A connection to one peer.
pub struct PeerConn {
    peers: Peers,
    target: u64,
    addr: String,
}

fn unreachable(e: PeerError) -> RPCError<TypeConfig> {
    match e {
        PeerError::Codec(_) => RPCError::Network(NetworkError::new(&e)),
        _ => RPCError::Unreachable(Unreachable::new(&e)),
    }
}

impl PeerConn {
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
            .map_err(|status| {
                if status.code() == tonic::Code::PermissionDenied
                    && status.message().contains(REFUSED_MARK)
                {
                    self.peers.set_fatal(status.message().to_string());
                }
                PeerError::Status {
                    addr: self.addr.clone(),
                    status,
                }
            })?;
        decode(&reply.into_inner().payload)
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
