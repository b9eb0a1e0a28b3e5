//! `lockd.v1.Raft`: the receiving side of member-to-member traffic.
//!
//! Every message is checked before openraft sees it: the cluster id, the
//! target node id, the data-dir instance the sender believes this member
//! has, and the sender's own instance against the cluster's binding.
//! A member that learns its node id belongs to another data dir stops.

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use futures::stream::BoxStream;
use futures::StreamExt;
use lockd_proto::v1 as pb;
use lockd_proto::v1::raft_server::Raft as RaftRpc;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use tonic::{Request, Response, Status, Streaming};

use super::{observe, NodeRef};
use crate::node::LockdNode;
use crate::raft::network::{decode, encode, REFUSED_MARK};
use crate::raft::types::{Request as RaftRequest, Snapshot, SnapshotMeta, TypeConfig, Vote};

/// The Raft peer service.
pub struct PeerService {
    node: NodeRef,
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl PeerService {
    /// Serves peer traffic on `node`; replication streams end when
    /// `stopping` turns true (graceful shutdown waits for open streams).
    pub fn new(node: NodeRef, stopping: tokio::sync::watch::Receiver<bool>) -> PeerService {
        PeerService { node, stopping }
    }

    fn check(&self, env: &pb::PeerEnvelope) -> Result<(), Status> {
        check(&self.node, env)
    }
}

/// Checks a peer message's addressing and identity before openraft sees it.
fn check(node: &LockdNode, env: &pb::PeerEnvelope) -> Result<(), Status> {
    let me = &node.identity;
    if env.cluster_id != me.cluster_id {
        return Err(Status::failed_precondition(format!(
            "cluster id mismatch: message for cluster {:?} reached a member of cluster {:?}",
            env.cluster_id, me.cluster_id
        )));
    }
    if env.to_id != me.node_id {
        return Err(Status::failed_precondition(format!(
            "message for node {} reached node {}",
            env.to_id, me.node_id
        )));
    }
    if !env.to_instance.is_empty() && env.to_instance != me.instance {
        let reason = format!(
                "node id {} was {REFUSED_MARK} by this cluster with another data dir (instance {}), but this \
                 member's data dir is instance {}: its disk was wiped or replaced. A member with an empty data \
                 dir must join as a new member with a new id",
                me.node_id, env.to_instance, me.instance
            );
        node.set_fatal(reason.clone());
        // Not PERMISSION_DENIED: that code tells the *sender* it is the
        // stale one, and here the stale one is this member.
        return Err(Status::failed_precondition(reason));
    }
    let bound = node
        .sm
        .read()
        .state
        .instance_of(env.from_id)
        .map(str::to_string);
    if let Some(b) = bound {
        if !env.from_instance.is_empty() && b != env.from_instance {
            return Err(Status::permission_denied(format!(
                    "node id {} was {REFUSED_MARK} by this cluster with another data dir (instance {b}); \
                     the sender (instance {}) must join as a new member with a new id",
                    env.from_id, env.from_instance
                )));
        }
    }
    Ok(())
}

fn codec(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable peer message: {e}"))
}

fn reply<T: serde::Serialize>(v: &T) -> Result<Response<pb::PeerReply>, Status> {
    Ok(Response::new(pb::PeerReply {
        payload: encode(v).map_err(|e| Status::internal(e.to_string()))?,
    }))
}

fn raft_unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(e.to_string())
}

#[tonic::async_trait]
impl RaftRpc for PeerService {
    async fn append_entries(
        &self,
        req: Request<pb::PeerEnvelope>,
    ) -> Result<Response<pb::PeerReply>, Status> {
        let env = req.into_inner();
        self.check(&env)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&env.payload).map_err(codec)?;
        let resp = self
            .node
            .raft
            .append_entries(rpc)
            .await
            .map_err(raft_unavailable)?;
        reply(&resp)
    }

    type StreamAppendStream = BoxStream<'static, Result<pb::PeerReply, Status>>;

    async fn stream_append(
        &self,
        req: Request<Streaming<pb::PeerEnvelope>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let node = self.node.clone();
        // The first message that fails its check or does not decode ends the
        // input; openraft answers what came before it, then the stream ends
        // with that message's status.
        let refused: Arc<Mutex<Option<Status>>> = Arc::default();
        let refusal = refused.clone();
        // On shutdown both directions end: the reply stream, and the request
        // stream, which openraft would otherwise hold open (graceful shutdown
        // waits for every open stream).
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let input = req.into_inner().take_until(stopped(self.stopping.clone()));
        let input = input.scan((), move |_, msg| {
            let rpc = msg.and_then(|env| {
                check(&node, &env)?;
                decode::<AppendEntriesRequest<TypeConfig>>(&env.payload).map_err(codec)
            });
            futures::future::ready(match rpc {
                Ok(rpc) => Some(rpc),
                Err(status) => {
                    *refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                    None
                }
            })
        });
        let replies = self.node.raft.stream_append(input).map(|r| match r {
            Ok(result) => encode(&result)
                .map(|payload| pb::PeerReply { payload })
                .map_err(|e| Status::internal(e.to_string())),
            Err(fatal) => Err(raft_unavailable(fatal)),
        });
        let end = futures::stream::once(async move {
            refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .map(Err)
        })
        .filter_map(futures::future::ready);
        let replies = replies
            .chain(end)
            .take_until(stopped(self.stopping.clone()));
        Ok(Response::new(Box::pin(replies)))
    }

    async fn vote(
        &self,
        req: Request<pb::PeerEnvelope>,
    ) -> Result<Response<pb::PeerReply>, Status> {
        let env = req.into_inner();
        self.check(&env)?;
        let (pre, rpc): (bool, VoteRequest<TypeConfig>) = decode(&env.payload).map_err(codec)?;
        let resp = if pre {
            self.node.raft.pre_vote(rpc).await
        } else {
            self.node.raft.vote(rpc).await
        }
        .map_err(raft_unavailable)?;
        reply(&resp)
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::PeerEnvelope>,
    ) -> Result<Response<pb::PeerReply>, Status> {
        let env = req.into_inner();
        self.check(&env)?;
        let rpc: TransferLeaderRequest<TypeConfig> = decode(&env.payload).map_err(codec)?;
        let resp = self
            .node
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(raft_unavailable)?;
        reply(&resp)
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::PeerReply>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let env = first
            .envelope
            .ok_or_else(|| Status::invalid_argument("snapshot stream without envelope"))?;
        self.check(&env)?;
        let (vote, meta): (Vote, SnapshotMeta) = decode(&env.payload).map_err(codec)?;
        let mut data = first.data;
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?.data);
        }
        tracing::info!(bytes = data.len(), last_log_id = ?meta.last_log_id, "received snapshot");
        let snapshot = Snapshot {
            meta,
            snapshot: Cursor::new(data),
        };
        let resp = self
            .node
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(raft_unavailable)?;
        reply(&resp)
    }

    async fn propose(
        &self,
        req: Request<pb::PeerEnvelope>,
    ) -> Result<Response<pb::PeerReply>, Status> {
        observe(&self.node, "Raft/Propose", async {
            let env = req.into_inner();
            self.check(&env)?;
            let r: RaftRequest = decode(&env.payload).map_err(codec)?;
            reply(&self.node.propose_local(r.command).await)
        })
        .await
    }

    async fn keep_alive(
        &self,
        req: Request<pb::PeerEnvelope>,
    ) -> Result<Response<pb::PeerReply>, Status> {
        let env = req.into_inner();
        self.check(&env)?;
        let session_id: u64 = decode(&env.payload).map_err(codec)?;
        reply(&self.node.keepalive_local(session_id))
    }

    async fn read_index(
        &self,
        req: Request<pb::PeerEnvelope>,
    ) -> Result<Response<pb::PeerReply>, Status> {
        observe(&self.node, "Raft/ReadIndex", async {
            let env = req.into_inner();
            self.check(&env)?;
            reply(&self.node.read_index_local().await)
        })
        .await
    }
}
