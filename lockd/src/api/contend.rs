//! The server side of the recipes' node layout (`lockd_proto::layout`,
//! docs/design.md "Recipes: the lock layout"): what the `Lock` and
//! `Election` services share.
//!
//! A contender is an ephemeral-sequential child `DIR/PREFIX<seq>` of a
//! container directory, owned by the caller's session; the lowest holds.
//! This is the algorithm of lockd-client's `Mutex`, run inside the member:
//! one Raft round creates the directory (if missing) and the contender, the
//! member's applied state is listed once it includes that create, and a
//! waiter watches only its immediate predecessor (and its own node, to
//! notice its session ending) through the member's watch hub.

use std::time::Duration;

use lockd_proto::layout;
use tokio::time::Instant;
use tonic::Status;

use super::{apply_status, node_status, NodeRef};
use crate::node::{LockdNode, NodeError};
use crate::store::path::validate_key;
use crate::store::{
    AppliedResult, CmpOp, Compare, CreateMode, NodeView, Op, OpResult, RequestId, Target, Txn,
};
use crate::watch::{Filter, Item, Scope};

/// How many times a create whose outcome was ambiguous (leader change) is
/// retried under its request id before the ambiguity is reported.
const AMBIGUOUS_RETRIES: u32 = 3;

/// A contender that holds (the lowest of its directory).
#[derive(Debug, Clone)]
pub struct Held {
    /// The contender node's path.
    pub key: String,
    /// Its create revision: the fencing token.
    pub token: u64,
    /// Its data.
    pub data: Vec<u8>,
    /// The revision at which it was seen holding.
    pub revision: u64,
}

/// Validates a lock or election name and trims trailing slashes.
pub fn dir_name(name: &str, node: &LockdNode) -> Result<String, Status> {
    let dir = layout::trim_dir(name);
    if dir == "/" {
        return Err(Status::invalid_argument(
            "name: the root cannot be a lock or election directory; use a path such as /locks/build",
        ));
    }
    validate_key(dir, &node.config.limits)
        .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
    Ok(dir.to_string())
}

/// Checks that `key` is a contender node of `prefix` (any directory).
pub fn contender_key(key: &str, prefix: &str, node: &LockdNode) -> Result<(), Status> {
    validate_key(key, &node.config.limits)
        .map_err(|e| Status::invalid_argument(format!("key: {e}")))?;
    let (dir, _) = key.rsplit_once('/').unwrap_or(("", key));
    let dir = if dir.is_empty() { "/" } else { dir };
    if layout::seq_of(&layout::child_prefix(dir, prefix), key).is_none() {
        return Err(Status::invalid_argument(format!(
            "key {key} is not a {prefix}<sequence> node; pass the key returned when it was acquired"
        )));
    }
    Ok(())
}

/// A request id for the contender's create: the caller's, or a random one.
fn request_id(session_id: u64, given: String) -> Result<RequestId, Status> {
    if given.len() > 256 {
        return Err(Status::invalid_argument(format!(
            "request_id is {} bytes, over the limit of 256",
            given.len()
        )));
    }
    let id = if given.is_empty() {
        let mut raw = [0u8; 12];
        getrandom::fill(&mut raw).map_err(|e| Status::internal(format!("random id: {e}")))?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        format!("contend-{hex}")
    } else {
        given
    };
    Ok(RequestId { session_id, id })
}

/// Proposes `txn`; an ambiguous outcome is retried when that is safe:
/// the txn carries a request id (a retry returns the first attempt's
/// result) or `idempotent` says applying it twice does no harm.
async fn run(
    node: &LockdNode,
    txn: Txn,
    idempotent: bool,
) -> Result<(Vec<OpResult>, bool, u64), Status> {
    let retry_safe = idempotent || txn.request.is_some();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match node.propose(crate::store::Command::Txn(txn.clone())).await {
            Ok(applied) => {
                return match applied.result.map_err(apply_status)? {
                    AppliedResult::Txn(o) => Ok((o.results, o.succeeded, applied.revision)),
                    other => Err(Status::internal(format!(
                        "unexpected apply result {other:?}"
                    ))),
                }
            }
            Err(NodeError::Ambiguous(_)) if retry_safe && attempt < AMBIGUOUS_RETRIES => {}
            Err(e) => return Err(node_status(e)),
        }
    }
}

/// Deletes `key` if it is still the node created at `token`. Returns
/// whether it was deleted and the revision.
pub async fn delete_if_token(
    node: &LockdNode,
    key: &str,
    token: u64,
) -> Result<(bool, u64), Status> {
    let txn = Txn {
        compares: vec![Compare {
            path: key.to_string(),
            op: CmpOp::Equal,
            target: Target::CreateRevision(token),
        }],
        success: vec![Op::Delete {
            path: key.to_string(),
            expected_version: None,
            recursive: false,
        }],
        failure: vec![],
        request: None,
    };
    // A delete conditional on the token is idempotent: retrying an
    // ambiguous one is safe (a retry after an applied first attempt finds
    // no node and reports false).
    let (_, deleted, rev) = run(node, txn, true).await?;
    Ok((deleted, rev))
}

/// Deletes the contender when dropped unless disarmed: a waiter whose call
/// is cancelled, times out or fails leaves nothing behind.
struct Withdraw {
    node: NodeRef,
    key: Option<(String, u64)>,
}

impl Withdraw {
    fn disarm(&mut self) {
        self.key = None;
    }

    async fn now(&mut self) {
        if let Some((key, token)) = self.key.take() {
            if let Err(e) = delete_if_token(&self.node, &key, token).await {
                tracing::debug!(%key, error = %e, "withdrawing a contender failed");
            }
        }
    }
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if let Some((key, token)) = self.key.take() {
            let node = self.node.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = delete_if_token(&node, &key, token).await {
                        tracing::debug!(%key, error = %e, "withdrawing a contender failed");
                    }
                });
            }
        }
    }
}

/// Waits until this member's state machine has applied `revision`.
pub async fn applied(node: &LockdNode, revision: u64) -> Result<(), Status> {
    let mut rx = node.watch.revisions();
    let wait = async move { rx.wait_for(|r| *r >= revision).await.map(|_| ()) };
    match tokio::time::timeout(node.config.request_timeout, wait).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Status::unavailable("member shutting down")),
        Err(_) => Err(Status::unavailable(format!(
            "this member did not apply revision {revision} within {:?}",
            node.config.request_timeout
        ))),
    }
}

/// The contenders of `dir` with `prefix`, lowest first, and the revision
/// of the state they were read from. Data is included.
pub fn contenders(node: &LockdNode, dir: &str, prefix: &str) -> (Vec<NodeView>, u64) {
    let data = node.sm.read();
    let state = &data.state;
    let listed = state
        .list(dir)
        .map(|(_, children)| children)
        .unwrap_or_default();
    let sorted = layout::contenders(&layout::child_prefix(dir, prefix), listed, |v| &v.path);
    let views = sorted
        .into_iter()
        .map(|(_, v)| state.get(&v.path).unwrap_or(v))
        .collect();
    (views, state.revision())
}

/// Why our contender vanished.
fn gone(node: &LockdNode, key: &str, session_id: u64, reused_request: bool) -> Status {
    let alive = node.sm.read().state.session(session_id).is_some();
    if !alive {
        Status::not_found(format!(
            "session expired: session {session_id} has ended; {key} was released with it"
        ))
    } else if reused_request {
        Status::failed_precondition(format!(
            "the contender {key} created under this request_id is gone (withdrawn or deleted); retry with a new request_id"
        ))
    } else {
        Status::failed_precondition(format!("the contender {key} was deleted while waiting"))
    }
}

/// What to contend for.
pub struct Contend<'a> {
    /// Directory (validated with [`dir_name`]).
    pub dir: &'a str,
    /// Child prefix (`lock-`, `candidate-`).
    pub prefix: &'a str,
    /// Owner session (non-zero).
    pub session_id: u64,
    /// Contender data.
    pub data: Vec<u8>,
    /// Caller's request id ("" for a random one).
    pub request_id: String,
    /// Give up at this instant.
    pub deadline: Option<Instant>,
}

/// Creates a contender and waits until it holds. On any error (and on
/// cancellation: the future dropped) the contender is withdrawn.
pub async fn contend(node: &NodeRef, mut c: Contend<'_>) -> Result<Held, Status> {
    if c.session_id == 0 {
        return Err(Status::invalid_argument(
            "session_id is required: open a session (lockd.v1.Session/Open) and keep it alive while holding",
        ));
    }
    let reused = !c.request_id.is_empty();
    let request = request_id(c.session_id, std::mem::take(&mut c.request_id))?;
    let child = Op::Create {
        path: layout::child_prefix(c.dir, c.prefix),
        data: std::mem::take(&mut c.data),
        parents: false,
        mode: CreateMode {
            session_id: c.session_id,
            sequential: true,
            container: false,
        },
    };
    let mk_dir = Op::Create {
        path: c.dir.to_string(),
        data: Vec::new(),
        parents: true,
        mode: CreateMode {
            session_id: 0,
            sequential: false,
            container: true,
        },
    };
    // One round: the contender, plus its directory when missing.
    let txn = Txn {
        compares: vec![Compare {
            path: c.dir.to_string(),
            op: CmpOp::Equal,
            target: Target::Exists(true),
        }],
        success: vec![child.clone()],
        failure: vec![mk_dir, child],
        request: Some(request),
    };
    let (mut results, _, mut revision) = run(node, txn, false).await?;
    let ours = match results.pop() {
        Some(OpResult::Create(v)) => v,
        other => {
            return Err(Status::internal(format!(
                "unexpected create result {other:?}"
            )))
        }
    };
    let (key, token) = (ours.path, ours.create_revision);
    let mut withdraw = Withdraw {
        node: node.clone(),
        key: Some((key.clone(), token)),
    };
    let result = wait_first(node, &c, &key, token, &mut revision, reused).await;
    match result {
        Ok(held) => {
            withdraw.disarm();
            Ok(held)
        }
        Err(e) => {
            withdraw.now().await;
            Err(e)
        }
    }
}

async fn wait_first(
    node: &NodeRef,
    c: &Contend<'_>,
    key: &str,
    token: u64,
    revision: &mut u64,
    reused: bool,
) -> Result<Held, Status> {
    loop {
        applied(node, *revision).await?;
        let (list, rev) = contenders(node, c.dir, c.prefix);
        let Some(pos) = list
            .iter()
            .position(|v| v.path == key && v.create_revision == token)
        else {
            return Err(gone(node, key, c.session_id, reused));
        };
        if pos == 0 {
            return Ok(Held {
                key: key.to_string(),
                token,
                data: list[0].data.clone(),
                revision: rev,
            });
        }
        if c.deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(not_within(c, &list[0].path));
        }
        let pred = list[pos - 1].path.clone();
        let deletes = |path: &str| Filter {
            no_put: true,
            ..Filter::new(path, Scope::Key)
        };
        let subscribe = |path: &str| {
            node.watch
                .subscribe(deletes(path), rev + 1)
                .map_err(|e| Status::unavailable(format!("watch: {e}")))
        };
        let mut pred_sub = subscribe(&pred)?;
        let mut own_sub = subscribe(key)?;
        tokio::select! {
            item = pred_sub.next() => match item {
                Some(Item::Events { revision: r, .. }) => *revision = r,
                Some(Item::Cancelled(c)) => {
                    return Err(Status::unavailable(format!("waiting stopped: {}", c.reason)))
                }
                None => return Err(Status::unavailable("waiting stopped: member shutting down")),
            },
            item = own_sub.next() => match item {
                Some(Item::Events { revision: r, .. }) => {
                    applied(node, r).await?;
                    return Err(gone(node, key, c.session_id, reused));
                }
                Some(Item::Cancelled(c)) => {
                    return Err(Status::unavailable(format!("waiting stopped: {}", c.reason)))
                }
                None => return Err(Status::unavailable("waiting stopped: member shutting down")),
            },
            _ = sleep_until_opt(c.deadline) => {
                return Err(not_within(c, &pred));
            }
        }
    }
}

fn not_within(c: &Contend<'_>, ahead: &str) -> Status {
    Status::deadline_exceeded(format!(
        "{} is held (next ahead: {ahead}); gave up waiting as asked",
        c.dir
    ))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A wait limit from an optional `wait_ms`.
pub fn deadline_of(wait_ms: Option<u64>) -> Option<Instant> {
    wait_ms.map(|ms| Instant::now() + Duration::from_millis(ms))
}
