//! `lockd.v1.Lock`: mutexes for clients in any language, on the same layout
//! as lockd-client's `Mutex` (see [`super::contend`]).

use lockd_proto::layout::LOCK_PREFIX;
use lockd_proto::v1 as pb;
use lockd_proto::v1::lock_server::Lock;
use tonic::{Request, Response, Status};

use super::contend::{self, Contend};
use super::{header, observe, NodeRef};

/// The Lock service.
pub struct LockService {
    node: NodeRef,
}

impl LockService {
    /// Serves Lock on `node`.
    pub fn new(node: NodeRef) -> LockService {
        LockService { node }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(
        &self,
        req: Request<pb::LockRequest>,
    ) -> Result<Response<pb::LockResponse>, Status> {
        observe(&self.node, "Lock/Lock", async {
            let req = req.into_inner();
            let dir = contend::dir_name(&req.name, &self.node)?;
            let held = contend::contend(
                &self.node,
                Contend {
                    dir: &dir,
                    prefix: LOCK_PREFIX,
                    session_id: req.session_id,
                    data: Vec::new(),
                    request_id: req.request_id,
                    deadline: contend::deadline_of(req.wait_ms),
                },
            )
            .await?;
            tracing::debug!(key = %held.key, token = held.token, "lock held");
            Ok(Response::new(pb::LockResponse {
                header: header(&self.node, held.revision),
                key: held.key,
                fencing_token: held.token,
            }))
        })
        .await
    }

    async fn unlock(
        &self,
        req: Request<pb::UnlockRequest>,
    ) -> Result<Response<pb::UnlockResponse>, Status> {
        observe(&self.node, "Lock/Unlock", async {
            let req = req.into_inner();
            contend::contender_key(&req.key, LOCK_PREFIX, &self.node)?;
            if req.fencing_token == 0 {
                return Err(Status::invalid_argument(
                    "fencing_token is required: pass the token Lock returned with the key",
                ));
            }
            let (released, rev) =
                contend::delete_if_token(&self.node, &req.key, req.fencing_token).await?;
            Ok(Response::new(pb::UnlockResponse {
                header: header(&self.node, rev),
                released,
            }))
        })
        .await
    }
}
