//! `lockd.v1.Session`: open, keep alive, close and inspect sessions.
//! Opening and closing are writes through Raft; keepalives go to the leader,
//! which keeps the session clocks (see `crate::sessions`).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use lockd_proto::v1 as pb;
use lockd_proto::v1::session_server::Session;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{apply_status, header, node_status, observe, NodeRef};
use crate::store::{AppliedResult, Command};

/// The Session service.
pub struct SessionService {
    node: NodeRef,
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl SessionService {
    /// Serves sessions on `node`; keepalive streams end when `stopping`
    /// turns true (graceful shutdown waits for open streams).
    pub fn new(node: NodeRef, stopping: tokio::sync::watch::Receiver<bool>) -> SessionService {
        SessionService { node, stopping }
    }

    async fn propose(&self, cmd: Command) -> Result<(AppliedResult, u64), Status> {
        let applied = self.node.propose(cmd).await.map_err(node_status)?;
        let rev = applied.revision;
        Ok((applied.result.map_err(apply_status)?, rev))
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<pb::KeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Session for SessionService {
    async fn open(
        &self,
        req: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        observe(&self.node, "Session/Open", async {
            let ttl_ms = self.node.sessions.config().clamp(req.into_inner().ttl_ms);
            match self.propose(Command::OpenSession { ttl_ms }).await? {
                (AppliedResult::SessionOpened { session_id, ttl_ms }, rev) => {
                    Ok(Response::new(pb::OpenSessionResponse {
                        header: header(&self.node, rev),
                        session_id,
                        ttl_ms,
                    }))
                }
                (other, _) => Err(Status::internal(format!(
                    "unexpected apply result {other:?}"
                ))),
            }
        })
        .await
    }

    type KeepAliveStream = KeepAliveStream;

    async fn keep_alive(
        &self,
        req: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let node = self.node.clone();
        let input = req.into_inner();
        let mut stopping = self.stopping.clone();
        let span =
            tracing::info_span!("rpc", method = "Session/KeepAlive", member = node.config.id);
        let out = async_stream(move |tx| {
            async move {
                // Renewals on one stream are served concurrently (responses
                // name their session), so one slow forwarded renewal does not
                // hold up the sessions queued behind it.
                let mut replies = input
                    .map(|msg| {
                        let node = node.clone();
                        async move {
                            match msg {
                                Ok(m) => Some(renew(&node, m.session_id).await),
                                Err(_) => None,
                            }
                        }
                    })
                    .buffer_unordered(KEEPALIVES_IN_FLIGHT);
                loop {
                    let item = tokio::select! {
                        r = replies.next() => match r {
                            Some(Some(item)) => item,
                            _ => return,
                        },
                        _ = stopped(&mut stopping) => {
                            let _ = tx.send(Err(Status::unavailable("member shutting down"))).await;
                            return;
                        }
                    };
                    let end = item.is_err();
                    if tx.send(item).await.is_err() || end {
                        return;
                    }
                }
            }
            .instrument(span)
        });
        Ok(Response::new(out))
    }

    async fn close(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        observe(&self.node, "Session/Close", async {
            let session_id = req.into_inner().session_id;
            match self.propose(Command::CloseSession { session_id }).await? {
                (AppliedResult::SessionsEnded { deleted, .. }, rev) => {
                    Ok(Response::new(pb::CloseSessionResponse {
                        header: header(&self.node, rev),
                        deleted,
                    }))
                }
                (other, _) => Err(Status::internal(format!(
                    "unexpected apply result {other:?}"
                ))),
            }
        })
        .await
    }

    async fn info(
        &self,
        req: Request<pb::SessionInfoRequest>,
    ) -> Result<Response<pb::SessionInfoResponse>, Status> {
        observe(&self.node, "Session/Info", async {
            let session_id = req.into_inner().session_id;
            self.node.read_barrier().await.map_err(node_status)?;
            let (session, rev) = {
                let data = self.node.sm.read();
                (
                    data.state.session(session_id).cloned(),
                    data.state.revision(),
                )
            };
            let Some(s) = session else {
                return Err(Status::not_found(format!(
                    "session expired: session {session_id} expired or does not exist"
                )));
            };
            let remaining_ms = match self.node.sessions.remaining(session_id) {
                Some(d) => d.as_millis() as u64,
                None => s.remaining_ms,
            };
            Ok(Response::new(pb::SessionInfoResponse {
                header: header(&self.node, rev),
                session_id,
                ttl_ms: s.ttl_ms,
                remaining_ms,
                ephemerals: s.ephemerals.iter().cloned().collect(),
            }))
        })
        .await
    }
}

/// Renewals served at once on one keepalive stream.
const KEEPALIVES_IN_FLIGHT: usize = 64;

/// Renews one session and records the request.
async fn renew(node: &NodeRef, session_id: u64) -> Result<pb::KeepAliveResponse, Status> {
    let started = std::time::Instant::now();
    let r = node.keepalive(session_id).await;
    let code = r
        .as_ref()
        .map_or_else(node_status_code, |_| tonic::Code::Ok);
    node.metrics
        .observe_request("Session/KeepAlive", code, started.elapsed());
    match r {
        Ok(ttl_ms) => {
            let rev = node.sm.read().state.revision();
            Ok(pb::KeepAliveResponse {
                header: header(node, rev),
                session_id,
                ttl_ms,
            })
        }
        Err(e) => Err(node_status(e)),
    }
}

fn node_status_code(e: &crate::node::NodeError) -> tonic::Code {
    match e {
        crate::node::NodeError::SessionExpired(_) => tonic::Code::NotFound,
        crate::node::NodeError::Unavailable(_) => tonic::Code::Unavailable,
        _ => tonic::Code::Unknown,
    }
}

/// Resolves once `rx` reads true (never, if its sender is gone).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A response stream fed by a task through a bounded channel.
fn async_stream<F, Fut>(f: F) -> KeepAliveStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::KeepAliveResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
