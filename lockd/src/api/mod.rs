//! gRPC services: `lockd.v1.KV`, `Cluster`, `Session`, `Watch`, `Lock`,
//! `Election` and the member-to-member `lockd.v1.Raft`; also gRPC health
//! (`grpc.health.v1`) and server reflection.
//!
//! Owns: request validation, conversion between protobuf and the state
//! machine's types, mapping errors to gRPC statuses with clear messages, and
//! one tracing span plus metrics per request.
//! Must never: pass a request to Raft before it is validated.

pub mod cluster;
pub mod contend;
pub mod convert;
pub mod election;
pub mod kv;
pub mod lock;
pub mod peer;
pub mod session;
pub mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use lockd_proto::v1::ResponseHeader;
use openraft::async_runtime::WatchReceiver;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::node::{LockdNode, NodeError};
use crate::store::{ApplyError, ErrorKind};

/// Runs one request inside a span, recording its latency and status code.
pub async fn observe<T, F>(node: &LockdNode, method: &'static str, f: F) -> Result<T, Status>
where
    F: Future<Output = Result<T, Status>>,
{
    let span = tracing::info_span!("rpc", method, member = node.config.id);
    let started = Instant::now();
    let result = f.instrument(span).await;
    let code = match &result {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    };
    node.metrics
        .observe_request(method, code, started.elapsed());
    if let Err(s) = &result {
        tracing::debug!(method, code = ?s.code(), message = s.message(), "request failed");
    }
    result
}

/// The header every response carries.
pub fn header(node: &LockdNode, revision: u64) -> Option<ResponseHeader> {
    let term = node.raft.metrics().borrow_watched().current_term;
    Some(ResponseHeader {
        cluster_id: node.identity.cluster_id.clone(),
        member_id: node.config.id,
        revision,
        raft_term: term,
    })
}

/// Maps a member error to a status.
pub fn node_status(e: NodeError) -> Status {
    match e {
        NodeError::Unavailable(m) => Status::unavailable(m),
        NodeError::Ambiguous(m) => Status::unknown(format!("ambiguous: {m}")),
        NodeError::FailedPrecondition(m) => Status::failed_precondition(m),
        NodeError::InvalidArgument(m) => Status::invalid_argument(m),
        NodeError::Internal(m) => Status::internal(m),
        NodeError::SessionExpired(m) => Status::not_found(format!("session expired: {m}")),
    }
}

/// Maps a state machine refusal to a status.
pub fn apply_status(e: ApplyError) -> Status {
    match e.kind {
        ErrorKind::NotFound => Status::not_found(e.message),
        ErrorKind::AlreadyExists => Status::already_exists(e.message),
        ErrorKind::FailedPrecondition => Status::failed_precondition(e.message),
        ErrorKind::InvalidArgument => Status::invalid_argument(e.message),
        ErrorKind::SessionExpired => Status::not_found(format!("session expired: {}", e.message)),
    }
}

/// Shared handle the services hold.
pub type NodeRef = Arc<LockdNode>;
