//! Conversions between `lockd.v1` messages and the state machine's types,
//! with validation against the member's limits.

use lockd_proto::v1 as pb;
use tonic::Status;

use crate::store::path::{validate_key, validate_value, Limits};
use crate::store::{CmpOp, Compare, CreateMode, NodeView, Op, OpResult, RequestId, Target, Txn};

fn key(path: &str, limits: &Limits) -> Result<(), Status> {
    validate_key(path, limits).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn value(data: &[u8], limits: &Limits) -> Result<(), Status> {
    validate_value(data, limits).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A node view as a protobuf node.
pub fn node(v: NodeView) -> pb::Node {
    pb::Node {
        path: v.path,
        data: v.data,
        version: v.version,
        create_revision: v.create_revision,
        mod_revision: v.mod_revision,
        num_children: v.num_children,
        ephemeral_owner: v.ephemeral_owner,
        container: v.container,
    }
}

fn request_id(session_id: u64, id: String) -> Result<Option<RequestId>, Status> {
    if id.is_empty() {
        return Ok(None);
    }
    if id.len() > 256 {
        return Err(Status::invalid_argument(format!(
            "request id is {} bytes, over the limit of 256",
            id.len()
        )));
    }
    Ok(Some(RequestId { session_id, id }))
}

/// The request id of a create, if it has one.
pub fn create_request_id(r: &pb::CreateRequest) -> Result<Option<RequestId>, Status> {
    request_id(r.session_id, r.request_id.clone())
}

/// Validates and converts a create request.
pub fn create(r: pb::CreateRequest, limits: &Limits) -> Result<Op, Status> {
    key(&r.path, limits)?;
    value(&r.data, limits)?;
    if r.session_id != 0 && r.container {
        return Err(Status::invalid_argument(format!(
            "create {}: a node cannot be both ephemeral and a container",
            r.path
        )));
    }
    Ok(Op::Create {
        path: r.path,
        data: r.data,
        parents: r.parents,
        mode: CreateMode {
            session_id: r.session_id,
            sequential: r.sequential,
            container: r.container,
        },
    })
}

/// Validates and converts a put request.
pub fn put(r: pb::PutRequest, limits: &Limits) -> Result<Op, Status> {
    key(&r.path, limits)?;
    value(&r.data, limits)?;
    Ok(Op::Put {
        path: r.path,
        data: r.data,
        expected_version: r.expected_version,
        parents: r.parents,
    })
}

/// Validates and converts a delete request.
pub fn delete(r: pb::DeleteRequest, limits: &Limits) -> Result<Op, Status> {
    key(&r.path, limits)?;
    Ok(Op::Delete {
        path: r.path,
        expected_version: r.expected_version,
        recursive: r.recursive,
    })
}

/// Validates a path for a read.
pub fn read_path(path: &str, limits: &Limits) -> Result<(), Status> {
    key(path, limits)
}

fn op(o: pb::Op, limits: &Limits) -> Result<Op, Status> {
    match o.op {
        Some(pb::op::Op::Create(r)) => create(r, limits),
        Some(pb::op::Op::Put(r)) => put(r, limits),
        Some(pb::op::Op::Delete(r)) => delete(r, limits),
        Some(pb::op::Op::Get(r)) => {
            key(&r.path, limits)?;
            if r.min_revision > 0 {
                return Err(Status::invalid_argument(
                    "min_revision is not allowed on a get inside a txn (the txn reads the state it applies to)",
                ));
            }
            Ok(Op::Get { path: r.path })
        }
        None => Err(Status::invalid_argument("txn op has no operation set")),
    }
}

fn compare(c: pb::Compare, limits: &Limits) -> Result<Compare, Status> {
    key(&c.path, limits)?;
    let op = match pb::compare::Op::try_from(c.op) {
        Ok(pb::compare::Op::Equal) => CmpOp::Equal,
        Ok(pb::compare::Op::NotEqual) => CmpOp::NotEqual,
        Ok(pb::compare::Op::Less) => CmpOp::Less,
        Ok(pb::compare::Op::Greater) => CmpOp::Greater,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "compare on {}: unknown operator {}",
                c.path, c.op
            )))
        }
    };
    let target = match c.target {
        Some(pb::compare::Target::Exists(b)) => Target::Exists(b),
        Some(pb::compare::Target::Version(v)) => Target::Version(v),
        Some(pb::compare::Target::CreateRevision(v)) => Target::CreateRevision(v),
        Some(pb::compare::Target::ModRevision(v)) => Target::ModRevision(v),
        Some(pb::compare::Target::Value(v)) => {
            value(&v, limits)?;
            Target::Value(v)
        }
        None => {
            return Err(Status::invalid_argument(format!(
                "compare on {}: no target set",
                c.path
            )))
        }
    };
    if matches!(target, Target::Exists(_)) && matches!(op, CmpOp::Less | CmpOp::Greater) {
        return Err(Status::invalid_argument(format!(
            "compare on {}: exists takes = or !=",
            c.path
        )));
    }
    Ok(Compare {
        path: c.path,
        op,
        target,
    })
}

/// Validates and converts a transaction.
pub fn txn(r: pb::TxnRequest, limits: &Limits) -> Result<Txn, Status> {
    let request = request_id(r.request_session_id, r.request_id)?;
    Ok(Txn {
        request,
        compares: r
            .compare
            .into_iter()
            .map(|c| compare(c, limits))
            .collect::<Result<_, _>>()?,
        success: r
            .success
            .into_iter()
            .map(|o| op(o, limits))
            .collect::<Result<_, _>>()?,
        failure: r
            .failure
            .into_iter()
            .map(|o| op(o, limits))
            .collect::<Result<_, _>>()?,
    })
}

/// Converts one op result; `header` is the transaction's header.
pub fn op_result(r: OpResult, header: Option<pb::ResponseHeader>) -> pb::OpResult {
    use pb::op_result::Result as R;
    let result = match r {
        OpResult::Create(n) => R::Create(pb::CreateResponse {
            header,
            node: Some(node(n)),
        }),
        OpResult::Put { node: n, created } => R::Put(pb::PutResponse {
            header,
            node: Some(node(n)),
            created,
        }),
        OpResult::Delete { deleted } => R::Delete(pb::DeleteResponse { header, deleted }),
        OpResult::Get(n) => R::Get(pb::GetResponse {
            header,
            node: n.map(node),
        }),
    };
    pb::OpResult {
        result: Some(result),
    }
}
