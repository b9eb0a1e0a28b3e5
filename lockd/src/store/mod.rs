//! The deterministic state machine: an in-memory tree of nodes (as in
//! ZooKeeper), the cluster revision and the table binding node ids to data-dir
//! instances.
//!
//! It owns: applying committed commands, all-or-nothing transactions, the
//! revision counter, and the events each apply produces.
//! It must never: read a clock, a random number, the local member's identity
//! or configuration. Every member applies the same commands in the same order
//! and must reach the same state, so everything a command needs travels in it.

pub mod path;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A command proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A transaction: compares, then the success or the failure ops.
    Txn(Txn),
    /// Bind a node id to the data-dir instance that first used it. Ids are
    /// never reused: a later bind of the same id by another instance fails.
    BindInstance {
        /// Raft node id.
        node_id: u64,
        /// Random id fixed when the member's data dir was created.
        instance: String,
    },
}

/// A transaction (ZooKeeper `multi`, etcd `Txn`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    /// Conditions; all must hold for `success` to run.
    pub compares: Vec<Compare>,
    /// Ops run when every compare holds.
    pub success: Vec<Op>,
    /// Ops run otherwise.
    pub failure: Vec<Op>,
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create a node; fails if it exists.
    Create {
        /// Absolute path.
        path: String,
        /// Node data.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// Create missing parents as empty nodes.
        parents: bool,
    },
    /// Create or replace a node's data.
    Put {
        /// Absolute path.
        path: String,
        /// Node data.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// Require this version (0: must not exist).
        expected_version: Option<u64>,
        /// Create missing parents as empty nodes.
        parents: bool,
    },
    /// Delete a node.
    Delete {
        /// Absolute path.
        path: String,
        /// Require this version.
        expected_version: Option<u64>,
        /// Delete the whole subtree.
        recursive: bool,
    },
    /// Read a node inside the transaction.
    Get {
        /// Absolute path.
        path: String,
    },
}

/// Comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmpOp {
    /// `=`
    Equal,
    /// `!=`
    NotEqual,
    /// `<`
    Less,
    /// `>`
    Greater,
}

/// What a compare looks at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// Whether the node exists.
    Exists(bool),
    /// The node's version (0 if absent).
    Version(u64),
    /// The node's create revision (0 if absent).
    CreateRevision(u64),
    /// The node's mod revision (0 if absent).
    ModRevision(u64),
    /// The node's data (a compare on an absent node is false).
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A transaction condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// Absolute path.
    pub path: String,
    /// Operator.
    pub op: CmpOp,
    /// Field and operand.
    pub target: Target,
}

/// A node as stored in the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Node data.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Number of data changes since creation (1 on create).
    pub version: u64,
    /// Revision that created the node.
    pub create_revision: u64,
    /// Revision that last changed the data.
    pub mod_revision: u64,
    /// Names of the children.
    pub children: BTreeSet<String>,
}

/// A node as returned to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Absolute path.
    pub path: String,
    /// Data (empty when a listing omits it).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// See [`Node::version`].
    pub version: u64,
    /// See [`Node::create_revision`].
    pub create_revision: u64,
    /// See [`Node::mod_revision`].
    pub mod_revision: u64,
    /// Number of children.
    pub num_children: u32,
}

/// The result of one op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// The created node.
    Create(NodeView),
    /// The node after the put.
    Put {
        /// The node after the put.
        node: NodeView,
        /// Whether the put created it.
        created: bool,
    },
    /// How many nodes were deleted.
    Delete {
        /// Count of deleted nodes.
        deleted: u64,
    },
    /// The node, if present.
    Get(Option<NodeView>),
}

/// The result of a transaction that was applied (compares evaluated, one
/// branch run to completion).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnOutcome {
    /// Whether the compares held.
    pub succeeded: bool,
    /// One result per op of the branch that ran.
    pub results: Vec<OpResult>,
}

/// Error classes, mapped to gRPC codes by the API layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The node does not exist.
    NotFound,
    /// The node exists already.
    AlreadyExists,
    /// A version condition or the tree's shape forbids the op.
    FailedPrecondition,
    /// The request is malformed.
    InvalidArgument,
}

/// Why a transaction (or a bind) was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApplyError {
    /// Error class.
    pub kind: ErrorKind,
    /// Human-readable reason, naming the op and path.
    pub message: String,
}

impl ApplyError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApplyError {
            kind,
            message: message.into(),
        }
    }
}

/// What happened to a node in a committed write; feeds watches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// Created or changed.
    Put(NodeView),
    /// Deleted.
    Delete {
        /// Path of the deleted node.
        path: String,
        /// Revision of the deletion.
        mod_revision: u64,
    },
}

/// The outcome of applying one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The cluster revision after the command.
    pub revision: u64,
    /// Transaction outcome, bind outcome, or the reason nothing changed.
    pub result: Result<AppliedResult, ApplyError>,
}

/// The successful part of [`Applied`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppliedResult {
    /// A transaction ran.
    Txn(TxnOutcome),
    /// An instance was bound (or already was).
    Bound,
    /// Nothing to report (blank and membership entries).
    None,
}

enum Undo {
    Created(String),
    Modified {
        path: String,
        data: Vec<u8>,
        version: u64,
        mod_revision: u64,
    },
    Deleted(String, Node),
}

/// The replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    nodes: BTreeMap<String, Node>,
    revision: u64,
    instances: BTreeMap<u64, String>,
}

impl Default for State {
    fn default() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "/".to_string(),
            Node {
                data: Vec::new(),
                version: 0,
                create_revision: 0,
                mod_revision: 0,
                children: BTreeSet::new(),
            },
        );
        State {
            nodes,
            revision: 0,
            instances: BTreeMap::new(),
        }
    }
}

/// Scratch state of one transaction: its revision, undo log and events.
struct Batch {
    revision: u64,
    undo: Vec<Undo>,
    events: Vec<Event>,
}

impl State {
    /// The current cluster revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of nodes, the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: the root always exists.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The data-dir instance bound to a node id, if any.
    pub fn instance_of(&self, node_id: u64) -> Option<&str> {
        self.instances.get(&node_id).map(String::as_str)
    }

    /// Every node id ever bound, with its instance.
    pub fn instances(&self) -> &BTreeMap<u64, String> {
        &self.instances
    }

    /// Reads one node.
    pub fn get(&self, path: &str) -> Option<NodeView> {
        self.nodes.get(path).map(|n| view(path, n, true))
    }

    /// A node and its children (children without data), or None.
    pub fn list(&self, path: &str) -> Option<(NodeView, Vec<NodeView>)> {
        let node = self.nodes.get(path)?;
        let children = node
            .children
            .iter()
            .filter_map(|name| {
                let p = path::join(path, name);
                self.nodes.get(&p).map(|c| view(&p, c, false))
            })
            .collect();
        Some((view(path, node, true), children))
    }

    /// Applies a command. On error nothing changes and the revision stays.
    pub fn apply(&mut self, cmd: &Command) -> (Applied, Vec<Event>) {
        match cmd {
            Command::Txn(txn) => {
                let mut batch = Batch {
                    revision: self.revision + 1,
                    undo: Vec::new(),
                    events: Vec::new(),
                };
                match self.run_txn(txn, &mut batch) {
                    Ok(outcome) => {
                        if !batch.undo.is_empty() {
                            self.revision = batch.revision;
                        }
                        let applied = Applied {
                            revision: self.revision,
                            result: Ok(AppliedResult::Txn(outcome)),
                        };
                        (applied, batch.events)
                    }
                    Err(e) => {
                        self.rollback(batch.undo);
                        let applied = Applied {
                            revision: self.revision,
                            result: Err(e),
                        };
                        (applied, Vec::new())
                    }
                }
            }
            Command::BindInstance { node_id, instance } => {
                let result = match self.instances.get(node_id) {
                    None => {
                        self.instances.insert(*node_id, instance.clone());
                        Ok(AppliedResult::Bound)
                    }
                    Some(bound) if bound == instance => Ok(AppliedResult::Bound),
                    Some(bound) => Err(ApplyError::new(
                        ErrorKind::FailedPrecondition,
                        format!(
                            "node id {node_id} was already used by this cluster (data dir instance {bound}); \
                             a member with an empty data dir must join as a new member with a new id"
                        ),
                    )),
                };
                (
                    Applied {
                        revision: self.revision,
                        result,
                    },
                    Vec::new(),
                )
            }
        }
    }

    /// Evaluates one compare against the current (pre-transaction) state.
    pub fn compare_holds(&self, c: &Compare) -> bool {
        let node = self.nodes.get(&c.path);
        let ord = |a: u64, b: u64| cmp(c.op, a.cmp(&b));
        match &c.target {
            Target::Exists(want) => {
                let exists = node.is_some();
                match c.op {
                    CmpOp::Equal => exists == *want,
                    CmpOp::NotEqual => exists != *want,
                    CmpOp::Less | CmpOp::Greater => false,
                }
            }
            Target::Version(v) => ord(node.map_or(0, |n| n.version), *v),
            Target::CreateRevision(v) => ord(node.map_or(0, |n| n.create_revision), *v),
            Target::ModRevision(v) => ord(node.map_or(0, |n| n.mod_revision), *v),
            Target::Value(v) => match node {
                Some(n) => cmp(c.op, n.data.as_slice().cmp(v.as_slice())),
                None => false,
            },
        }
    }

    fn run_txn(&mut self, txn: &Txn, batch: &mut Batch) -> Result<TxnOutcome, ApplyError> {
        for c in &txn.compares {
            shape(&c.path, "compare")?;
        }
        let succeeded = txn.compares.iter().all(|c| self.compare_holds(c));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let mut results = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            let r = self.run_op(op, batch).map_err(|e| {
                if ops.len() > 1 {
                    ApplyError::new(e.kind, format!("op {i}: {}", e.message))
                } else {
                    e
                }
            })?;
            results.push(r);
        }
        Ok(TxnOutcome { succeeded, results })
    }

    fn run_op(&mut self, op: &Op, batch: &mut Batch) -> Result<OpResult, ApplyError> {
        match op {
            Op::Get { path } => {
                shape(path, "get")?;
                Ok(OpResult::Get(self.get(path)))
            }
            Op::Create {
                path,
                data,
                parents,
            } => {
                shape(path, "create")?;
                if self.nodes.contains_key(path) {
                    return Err(ApplyError::new(
                        ErrorKind::AlreadyExists,
                        format!("create {path}: node already exists"),
                    ));
                }
                self.ensure_parent(path, *parents, "create", batch)?;
                let node = self.insert(path, data.clone(), batch);
                Ok(OpResult::Create(node))
            }
            Op::Put {
                path,
                data,
                expected_version,
                parents,
            } => {
                shape(path, "put")?;
                let current = self.nodes.get(path).map(|n| n.version);
                if let Some(want) = expected_version {
                    let have = current.unwrap_or(0);
                    if have != *want {
                        return Err(ApplyError::new(
                            ErrorKind::FailedPrecondition,
                            format!("put {path}: expected version {want}, found {have}"),
                        ));
                    }
                }
                if current.is_some() {
                    let node = self.modify(path, data.clone(), batch);
                    Ok(OpResult::Put {
                        node,
                        created: false,
                    })
                } else {
                    self.ensure_parent(path, *parents, "put", batch)?;
                    let node = self.insert(path, data.clone(), batch);
                    Ok(OpResult::Put {
                        node,
                        created: true,
                    })
                }
            }
            Op::Delete {
                path,
                expected_version,
                recursive,
            } => {
                shape(path, "delete")?;
                if path == "/" {
                    return Err(ApplyError::new(
                        ErrorKind::InvalidArgument,
                        "delete /: the root cannot be deleted",
                    ));
                }
                let Some(node) = self.nodes.get(path) else {
                    return Err(ApplyError::new(
                        ErrorKind::NotFound,
                        format!("delete {path}: node does not exist"),
                    ));
                };
                if let Some(want) = expected_version {
                    if node.version != *want {
                        return Err(ApplyError::new(
                            ErrorKind::FailedPrecondition,
                            format!(
                                "delete {path}: expected version {want}, found {}",
                                node.version
                            ),
                        ));
                    }
                }
                if !node.children.is_empty() && !recursive {
                    return Err(ApplyError::new(
                        ErrorKind::FailedPrecondition,
                        format!(
                            "delete {path}: node has {} children (use recursive delete)",
                            node.children.len()
                        ),
                    ));
                }
                let deleted = self.remove_subtree(path, batch);
                Ok(OpResult::Delete { deleted })
            }
        }
    }

    fn ensure_parent(
        &mut self,
        path: &str,
        parents: bool,
        what: &str,
        batch: &mut Batch,
    ) -> Result<(), ApplyError> {
        let Some(parent) = path::parent(path) else {
            return Ok(());
        };
        if self.nodes.contains_key(parent) {
            return Ok(());
        }
        if !parents {
            return Err(ApplyError::new(
                ErrorKind::NotFound,
                format!("{what} {path}: parent {parent} does not exist (create it first, or request parents: lockctl --parents)"),
            ));
        }
        self.ensure_parent(parent, true, what, batch)?;
        self.insert(parent, Vec::new(), batch);
        Ok(())
    }

    fn insert(&mut self, path: &str, data: Vec<u8>, batch: &mut Batch) -> NodeView {
        let node = Node {
            data,
            version: 1,
            create_revision: batch.revision,
            mod_revision: batch.revision,
            children: BTreeSet::new(),
        };
        let v = view(path, &node, true);
        self.nodes.insert(path.to_string(), node);
        if let Some(parent) = path::parent(path) {
            if let Some(p) = self.nodes.get_mut(parent) {
                p.children.insert(path::name(path).to_string());
            }
        }
        batch.undo.push(Undo::Created(path.to_string()));
        batch.events.push(Event::Put(v.clone()));
        v
    }

    fn modify(&mut self, path: &str, data: Vec<u8>, batch: &mut Batch) -> NodeView {
        let Some(node) = self.nodes.get_mut(path) else {
            // Callers check existence first; an absent node is a no-op.
            return NodeView {
                path: path.to_string(),
                data: Vec::new(),
                version: 0,
                create_revision: 0,
                mod_revision: 0,
                num_children: 0,
            };
        };
        let old = std::mem::replace(&mut node.data, data);
        batch.undo.push(Undo::Modified {
            path: path.to_string(),
            data: old,
            version: node.version,
            mod_revision: node.mod_revision,
        });
        node.version += 1;
        node.mod_revision = batch.revision;
        let v = view(path, node, true);
        batch.events.push(Event::Put(v.clone()));
        v
    }

    fn remove_subtree(&mut self, path: &str, batch: &mut Batch) -> u64 {
        let children: Vec<String> = match self.nodes.get(path) {
            Some(n) => n.children.iter().cloned().collect(),
            None => return 0,
        };
        let mut deleted = 0;
        for c in children {
            deleted += self.remove_subtree(&path::join(path, &c), batch);
        }
        if let Some(node) = self.nodes.remove(path) {
            if let Some(parent) = path::parent(path) {
                if let Some(p) = self.nodes.get_mut(parent) {
                    p.children.remove(path::name(path));
                }
            }
            batch.undo.push(Undo::Deleted(path.to_string(), node));
            batch.events.push(Event::Delete {
                path: path.to_string(),
                mod_revision: batch.revision,
            });
            deleted += 1;
        }
        deleted
    }

    fn rollback(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            match u {
                Undo::Created(path) => {
                    self.nodes.remove(&path);
                    if let Some(parent) = path::parent(&path) {
                        if let Some(p) = self.nodes.get_mut(parent) {
                            p.children.remove(path::name(&path));
                        }
                    }
                }
                Undo::Modified {
                    path,
                    data,
                    version,
                    mod_revision,
                } => {
                    if let Some(n) = self.nodes.get_mut(&path) {
                        n.data = data;
                        n.version = version;
                        n.mod_revision = mod_revision;
                    }
                }
                Undo::Deleted(path, node) => {
                    if let Some(parent) = path::parent(&path) {
                        if let Some(p) = self.nodes.get_mut(parent) {
                            p.children.insert(path::name(&path).to_string());
                        }
                    }
                    self.nodes.insert(path, node);
                }
            }
        }
    }
}

fn cmp(op: CmpOp, ord: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match op {
        CmpOp::Equal => ord == Equal,
        CmpOp::NotEqual => ord != Equal,
        CmpOp::Less => ord == Less,
        CmpOp::Greater => ord == Greater,
    }
}

fn shape(p: &str, what: &str) -> Result<(), ApplyError> {
    path::validate_shape(p)
        .map_err(|e| ApplyError::new(ErrorKind::InvalidArgument, format!("{what}: {e}")))
}

fn view(path: &str, n: &Node, with_data: bool) -> NodeView {
    NodeView {
        path: path.to_string(),
        data: if with_data {
            n.data.clone()
        } else {
            Vec::new()
        },
        version: n.version,
        create_revision: n.create_revision,
        mod_revision: n.mod_revision,
        num_children: u32::try_from(n.children.len()).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
mod tests;
