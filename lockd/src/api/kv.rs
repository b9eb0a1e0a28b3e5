//! `lockd.v1.KV`: the tree. Writes go through Raft (forwarded to the leader
//! by whichever member receives them); reads are linearizable unless the
//! request asks for a serializable read from this member's applied state.

use lockd_proto::v1 as pb;
use lockd_proto::v1::kv_server::Kv;
use tonic::{Request, Response, Status};

use super::{apply_status, convert, header, node_status, observe, NodeRef};
use crate::store::{AppliedResult, Command, Op, OpResult, RequestId, Txn, TxnOutcome};

/// The KV service.
pub struct KvService {
    node: NodeRef,
}

impl KvService {
    /// Serves KV on `node`.
    pub fn new(node: NodeRef) -> KvService {
        KvService { node }
    }

    /// Proposes a transaction and returns its outcome and revision.
    async fn run(&self, txn: Txn) -> Result<(TxnOutcome, u64), Status> {
        let applied = self
            .node
            .propose(Command::Txn(txn))
            .await
            .map_err(node_status)?;
        match applied.result.map_err(apply_status)? {
            AppliedResult::Txn(o) => Ok((o, applied.revision)),
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    async fn single(&self, op: Op, request: Option<RequestId>) -> Result<(OpResult, u64), Status> {
        let (mut outcome, rev) = self
            .run(Txn {
                compares: vec![],
                success: vec![op],
                failure: vec![],
                request,
            })
            .await?;
        let r = outcome
            .results
            .pop()
            .ok_or_else(|| Status::internal("transaction returned no result"))?;
        Ok((r, rev))
    }

    /// Waits until this member may serve a read: it has applied
    /// `min_revision` (0: no bound), and, unless `serializable`, a
    /// linearizable read barrier has passed.
    async fn barrier(&self, serializable: bool, min_revision: u64) -> Result<(), Status> {
        if min_revision > 0 {
            super::contend::applied(&self.node, min_revision).await?;
        }
        if serializable {
            return Ok(());
        }
        self.node.read_barrier().await.map_err(node_status)
    }
}

fn unexpected(r: OpResult) -> Status {
    Status::internal(format!("unexpected op result {r:?}"))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn create(
        &self,
        req: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::CreateResponse>, Status> {
        observe(&self.node, "KV/Create", async {
            let req = req.into_inner();
            let request = convert::create_request_id(&req)?;
            let op = convert::create(req, &self.node.config.limits)?;
            match self.single(op, request).await? {
                (OpResult::Create(n), rev) => Ok(Response::new(pb::CreateResponse {
                    header: header(&self.node, rev),
                    node: Some(convert::node(n)),
                })),
                (r, _) => Err(unexpected(r)),
            }
        })
        .await
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        observe(&self.node, "KV/Put", async {
            let op = convert::put(req.into_inner(), &self.node.config.limits)?;
            match self.single(op, None).await? {
                (OpResult::Put { node, created }, rev) => Ok(Response::new(pb::PutResponse {
                    header: header(&self.node, rev),
                    node: Some(convert::node(node)),
                    created,
                })),
                (r, _) => Err(unexpected(r)),
            }
        })
        .await
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        observe(&self.node, "KV/Get", async {
            let req = req.into_inner();
            convert::read_path(&req.path, &self.node.config.limits)?;
            self.barrier(req.serializable, req.min_revision).await?;
            let (node, rev) = {
                let data = self.node.sm.read();
                (data.state.get(&req.path), data.state.revision())
            };
            match node {
                Some(n) => Ok(Response::new(pb::GetResponse {
                    header: header(&self.node, rev),
                    node: Some(convert::node(n)),
                })),
                None => Err(Status::not_found(format!("{}: not found", req.path))),
            }
        })
        .await
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        observe(&self.node, "KV/Delete", async {
            let op = convert::delete(req.into_inner(), &self.node.config.limits)?;
            match self.single(op, None).await? {
                (OpResult::Delete { deleted }, rev) => Ok(Response::new(pb::DeleteResponse {
                    header: header(&self.node, rev),
                    deleted,
                })),
                (r, _) => Err(unexpected(r)),
            }
        })
        .await
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        observe(&self.node, "KV/List", async {
            let req = req.into_inner();
            convert::read_path(&req.path, &self.node.config.limits)?;
            self.barrier(req.serializable, req.min_revision).await?;
            let (listed, rev) = {
                let data = self.node.sm.read();
                (data.state.list(&req.path), data.state.revision())
            };
            match listed {
                Some((node, children)) => Ok(Response::new(pb::ListResponse {
                    header: header(&self.node, rev),
                    node: Some(convert::node(node)),
                    children: children.into_iter().map(convert::node).collect(),
                })),
                None => Err(Status::not_found(format!("{}: not found", req.path))),
            }
        })
        .await
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        observe(&self.node, "KV/Txn", async {
            let txn = convert::txn(req.into_inner(), &self.node.config.limits)?;
            let (outcome, rev) = self.run(txn).await?;
            let h = header(&self.node, rev);
            Ok(Response::new(pb::TxnResponse {
                header: h.clone(),
                succeeded: outcome.succeeded,
                results: outcome
                    .results
                    .into_iter()
                    .map(|r| convert::op_result(r, h.clone()))
                    .collect(),
            }))
        })
        .await
    }
}
