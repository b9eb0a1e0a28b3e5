//! `lockd.v1.Election`: leader election for clients in any language, on the
//! same layout as lockd-client's `LeaderElection` (see [`super::contend`]).

use std::pin::Pin;

use lockd_proto::layout::{self, CANDIDATE_PREFIX};
use lockd_proto::v1 as pb;
use lockd_proto::v1::election_server::Election;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::contend::{self, Contend};
use super::{apply_status, convert, header, node_status, observe, NodeRef};
use crate::store::{AppliedResult, CmpOp, Command, Compare, NodeView, Op, Target, Txn};
use crate::watch::{Filter, Item, Scope};

/// The Election service.
pub struct ElectionService {
    node: NodeRef,
}

impl ElectionService {
    /// Serves Election on `node`.
    pub fn new(node: NodeRef) -> ElectionService {
        ElectionService { node }
    }

    fn leader_key(&self, k: Option<pb::LeaderKey>) -> Result<pb::LeaderKey, Status> {
        let k = k.ok_or_else(|| {
            Status::invalid_argument("leader is required: pass the LeaderKey Campaign returned")
        })?;
        contend::contender_key(&k.key, CANDIDATE_PREFIX, &self.node)?;
        if k.fencing_token == 0 {
            return Err(Status::invalid_argument(
                "leader.fencing_token is required: pass the LeaderKey Campaign returned",
            ));
        }
        Ok(k)
    }
}

/// The leader of `dir` (the lowest candidate) and the revision read.
fn current(node: &NodeRef, dir: &str) -> (Option<NodeView>, u64) {
    let (list, rev) = contend::contenders(node, dir, CANDIDATE_PREFIX);
    (list.into_iter().next(), rev)
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<pb::LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        req: Request<pb::CampaignRequest>,
    ) -> Result<Response<pb::CampaignResponse>, Status> {
        observe(&self.node, "Election/Campaign", async {
            let req = req.into_inner();
            let dir = contend::dir_name(&req.name, &self.node)?;
            crate::store::path::validate_value(&req.value, &self.node.config.limits)
                .map_err(|e| Status::invalid_argument(format!("value: {e}")))?;
            let held = contend::contend(
                &self.node,
                Contend {
                    dir: &dir,
                    prefix: CANDIDATE_PREFIX,
                    session_id: req.session_id,
                    data: req.value,
                    request_id: req.request_id,
                    deadline: contend::deadline_of(req.wait_ms),
                },
            )
            .await?;
            tracing::debug!(key = %held.key, token = held.token, "leading");
            Ok(Response::new(pb::CampaignResponse {
                header: header(&self.node, held.revision),
                leader: Some(pb::LeaderKey {
                    name: dir,
                    key: held.key,
                    fencing_token: held.token,
                    session_id: req.session_id,
                }),
            }))
        })
        .await
    }

    async fn proclaim(
        &self,
        req: Request<pb::ProclaimRequest>,
    ) -> Result<Response<pb::ProclaimResponse>, Status> {
        observe(&self.node, "Election/Proclaim", async {
            let req = req.into_inner();
            let k = self.leader_key(req.leader)?;
            crate::store::path::validate_value(&req.value, &self.node.config.limits)
                .map_err(|e| Status::invalid_argument(format!("value: {e}")))?;
            // A candidate node returned by Campaign leads for as long as it
            // exists: a lower sequence number can never appear beside it.
            let txn = Txn {
                compares: vec![Compare {
                    path: k.key.clone(),
                    op: CmpOp::Equal,
                    target: Target::CreateRevision(k.fencing_token),
                }],
                success: vec![Op::Put {
                    path: k.key.clone(),
                    data: req.value,
                    expected_version: None,
                    parents: false,
                }],
                failure: vec![],
                request: None,
            };
            let applied = self
                .node
                .propose(Command::Txn(txn))
                .await
                .map_err(node_status)?;
            match applied.result.map_err(apply_status)? {
                AppliedResult::Txn(o) if o.succeeded => Ok(Response::new(pb::ProclaimResponse {
                    header: header(&self.node, applied.revision),
                })),
                AppliedResult::Txn(_) => Err(Status::failed_precondition(format!(
                    "{} (token {}) no longer leads: it resigned or its session ended",
                    k.key, k.fencing_token
                ))),
                other => Err(Status::internal(format!(
                    "unexpected apply result {other:?}"
                ))),
            }
        })
        .await
    }

    async fn leader(
        &self,
        req: Request<pb::LeaderRequest>,
    ) -> Result<Response<pb::LeaderResponse>, Status> {
        observe(&self.node, "Election/Leader", async {
            let dir = contend::dir_name(&req.into_inner().name, &self.node)?;
            self.node.read_barrier().await.map_err(node_status)?;
            match current(&self.node, &dir) {
                (Some(v), rev) => Ok(Response::new(pb::LeaderResponse {
                    header: header(&self.node, rev),
                    kv: Some(convert::node(v)),
                })),
                (None, _) => Err(Status::not_found(format!("{dir}: nobody leads"))),
            }
        })
        .await
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        req: Request<pb::LeaderRequest>,
    ) -> Result<Response<ObserveStream>, Status> {
        observe(&self.node, "Election/Observe", async {
            let dir = contend::dir_name(&req.into_inner().name, &self.node)?;
            self.node.read_barrier().await.map_err(node_status)?;
            let (tx, rx) = mpsc::channel(16);
            let node = self.node.clone();
            tokio::spawn(async move {
                if let Err(s) = follow(&node, &dir, &tx).await {
                    let _ = tx.send(Err(s)).await;
                }
            });
            Ok(Response::new(
                Box::pin(ReceiverStream::new(rx)) as ObserveStream
            ))
        })
        .await
    }

    async fn resign(
        &self,
        req: Request<pb::ResignRequest>,
    ) -> Result<Response<pb::ResignResponse>, Status> {
        observe(&self.node, "Election/Resign", async {
            let k = self.leader_key(req.into_inner().leader)?;
            let (resigned, rev) =
                contend::delete_if_token(&self.node, &k.key, k.fencing_token).await?;
            Ok(Response::new(pb::ResignResponse {
                header: header(&self.node, rev),
                resigned,
            }))
        })
        .await
    }
}

/// Sends the leader of `dir`, then every change, until the receiver goes.
async fn follow(
    node: &NodeRef,
    dir: &str,
    tx: &mpsc::Sender<Result<pb::LeaderResponse, Status>>,
) -> Result<(), Status> {
    let (mut leader, mut rev) = current(node, dir);
    let mut sub = node
        .watch
        .subscribe(Filter::new(dir, Scope::Subtree), rev + 1)
        .map_err(|e| Status::unavailable(format!("watch: {e}")))?;
    let send = |leader: &Option<NodeView>, rev: u64| pb::LeaderResponse {
        header: header(node, rev),
        kv: leader.clone().map(convert::node),
    };
    if tx.send(Ok(send(&leader, rev))).await.is_err() {
        return Ok(());
    }
    let same = |a: &Option<NodeView>, b: &Option<NodeView>| match (a, b) {
        (Some(a), Some(b)) => {
            a.path == b.path
                && a.create_revision == b.create_revision
                && a.mod_revision == b.mod_revision
        }
        (None, None) => true,
        _ => false,
    };
    let prefix = layout::child_prefix(dir, CANDIDATE_PREFIX);
    loop {
        tokio::select! {
            item = sub.next() => match item {
                Some(Item::Events { revision, events }) => {
                    if !events.iter().any(|e| layout::seq_of(&prefix, &e.node.path).is_some()) {
                        continue;
                    }
                    contend::applied(node, revision).await?;
                    let (now, at) = current(node, dir);
                    if !same(&leader, &now) {
                        leader = now;
                        rev = at;
                        if tx.send(Ok(send(&leader, rev))).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                Some(Item::Cancelled(c)) => {
                    return Err(Status::unavailable(format!(
                        "observe stopped: {}; observe again to resume",
                        c.reason
                    )))
                }
                None => return Err(Status::unavailable("observe stopped: member shutting down")),
            },
            _ = tx.closed() => return Ok(()),
        }
    }
}
