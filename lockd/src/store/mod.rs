//! The deterministic state machine: an in-memory tree of nodes (as in
//! ZooKeeper), sessions and their ephemeral nodes, the cluster revision, the
//! table of recent request ids, and the table binding node ids to data-dir
//! instances.
//!
//! It owns: applying committed commands, all-or-nothing transactions, the
//! revision counter, sequence counters, container cleanup, and the events
//! each apply produces.
//! It must never: read a clock, a random number, the local member's identity
//! or configuration. Every member applies the same commands in the same order
//! and must reach the same state, so everything a command needs travels in it
//! (the only outside input is the log index, which names new sessions).

pub mod path;
mod session;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use session::{Session, MAX_REQUESTS_PER_SESSION, MAX_REQUESTS_WITHOUT_SESSION};

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
    /// Open a session; its id is the log index of this command.
    OpenSession {
        /// Granted time to live (already clamped by the leader).
        ttl_ms: u64,
    },
    /// Close a session and delete its ephemeral nodes.
    CloseSession {
        /// The session.
        session_id: u64,
    },
    /// Expire sessions (decided by the leader's clock) and delete their
    /// ephemeral nodes, all at one revision.
    ExpireSessions {
        /// The sessions.
        session_ids: Vec<u64>,
    },
    /// Record each session's remaining time to live, so a new leader does
    /// not restart dead sessions' clocks from their full TTL.
    CheckpointSessions {
        /// (session id, remaining milliseconds).
        remaining: Vec<(u64, u64)>,
    },
}

/// Names a request so a retry returns the first attempt's result instead of
/// applying twice (Curator's protected mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestId {
    /// Session that scopes the id (0: no session, a bounded global table).
    pub session_id: u64,
    /// Client-chosen id, unique per session.
    pub id: String,
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
    /// Deduplicates retries of this transaction.
    pub request: Option<RequestId>,
}

/// What kind of node a create makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateMode {
    /// Owner session of an ephemeral node (0: persistent).
    pub session_id: u64,
    /// Append a 10-digit counter, unique and increasing under the parent.
    pub sequential: bool,
    /// A container: deleted by the server once its last child is gone.
    pub container: bool,
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create a node; fails if it exists.
    Create {
        /// Absolute path (the prefix, for a sequential node).
        path: String,
        /// Node data.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// Create missing parents as empty nodes.
        parents: bool,
        /// Ephemeral, sequential, container.
        mode: CreateMode,
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
    /// Owner session of an ephemeral node (0: persistent).
    pub ephemeral_owner: u64,
    /// Deleted by the server once its last child is gone.
    pub container: bool,
    /// Number of children ever created (a container with none is kept).
    pub cversion: u64,
    /// Next sequence number for a sequential child.
    pub seq: u64,
}

impl Node {
    fn new(data: Vec<u8>, revision: u64, mode: CreateMode) -> Node {
        Node {
            data,
            version: 1,
            create_revision: revision,
            mod_revision: revision,
            children: BTreeSet::new(),
            ephemeral_owner: mode.session_id,
            container: mode.container,
            cversion: 0,
            seq: 0,
        }
    }
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
    /// See [`Node::ephemeral_owner`].
    pub ephemeral_owner: u64,
    /// See [`Node::container`].
    pub container: bool,
}

/// The result of one op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// The created node (its path includes the sequence number).
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
    /// The session does not exist (closed, expired or never opened).
    SessionExpired,
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

/// Put or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// Created or changed.
    Put,
    /// Deleted.
    Delete,
}

/// What happened to a node in a committed write; feeds watches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The node after the change; for a delete, its path with
    /// `mod_revision` set to the deleting revision and no data.
    pub node: NodeView,
    /// The node before the change, if it existed.
    pub prev: Option<NodeView>,
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
    /// A session was opened.
    SessionOpened {
        /// Its id.
        session_id: u64,
        /// Its time to live.
        ttl_ms: u64,
    },
    /// Sessions were closed or expired.
    SessionsEnded {
        /// Sessions that existed and ended.
        sessions: u64,
        /// Ephemeral (and emptied container) nodes deleted.
        deleted: u64,
    },
    /// Remaining TTLs were recorded.
    Checkpointed,
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
    Counters {
        path: String,
        seq: u64,
        cversion: u64,
    },
}

/// The replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    nodes: BTreeMap<String, Node>,
    revision: u64,
    instances: BTreeMap<u64, String>,
    sessions: BTreeMap<u64, Session>,
    /// Results of recent requests without a session, oldest first.
    global_requests: session::RequestTable,
}

impl Default for State {
    fn default() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "/".to_string(),
            Node::new(Vec::new(), 0, CreateMode::default()),
        );
        if let Some(root) = nodes.get_mut("/") {
            root.version = 0;
        }
        State {
            nodes,
            revision: 0,
            instances: BTreeMap::new(),
            sessions: BTreeMap::new(),
            global_requests: session::RequestTable::default(),
        }
    }
}

/// Scratch state of one write: its revision, undo log, events and the
/// containers that may have become empty.
struct Batch {
    revision: u64,
    undo: Vec<Undo>,
    events: Vec<Event>,
    emptied: BTreeSet<String>,
}

impl Batch {
    fn new(revision: u64) -> Batch {
        Batch {
            revision,
            undo: Vec::new(),
            events: Vec::new(),
            emptied: BTreeSet::new(),
        }
    }
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

    /// Applies a command committed at log `index`. On error nothing changes
    /// and the revision stays.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> (Applied, Vec<Event>) {
        let (result, events) = match cmd {
            Command::Txn(txn) => self.apply_txn(txn),
            Command::BindInstance { node_id, instance } => {
                (self.bind(*node_id, instance), Vec::new())
            }
            Command::OpenSession { ttl_ms } => (Ok(self.open_session(index, *ttl_ms)), Vec::new()),
            Command::CloseSession { session_id } => {
                if !self.sessions.contains_key(session_id) {
                    (Err(session::expired(*session_id)), Vec::new())
                } else {
                    self.end_sessions(&[*session_id])
                }
            }
            Command::ExpireSessions { session_ids } => self.end_sessions(session_ids),
            Command::CheckpointSessions { remaining } => {
                self.checkpoint(remaining);
                (Ok(AppliedResult::Checkpointed), Vec::new())
            }
        };
        (
            Applied {
                revision: self.revision,
                result,
            },
            events,
        )
    }

    fn bind(&mut self, node_id: u64, instance: &str) -> Result<AppliedResult, ApplyError> {
        match self.instances.get(&node_id) {
            None => {
                self.instances.insert(node_id, instance.to_string());
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
        }
    }

    fn apply_txn(&mut self, txn: &Txn) -> (Result<AppliedResult, ApplyError>, Vec<Event>) {
        if let Some(req) = &txn.request {
            match self.recent(req) {
                Err(e) => return (Err(e), Vec::new()),
                Ok(Some((_revision, outcome))) => {
                    // A retry: the first attempt's result, nothing applied.
                    return (Ok(AppliedResult::Txn(outcome)), Vec::new());
                }
                Ok(None) => {}
            }
        }
        let mut batch = Batch::new(self.revision + 1);
        let run = self.run_txn(txn, &mut batch);
        if run.is_ok() {
            self.remove_empty_containers(&mut batch);
        }
        match run {
            Ok(outcome) => {
                if !batch.undo.is_empty() {
                    self.revision = batch.revision;
                }
                if let Some(req) = &txn.request {
                    self.remember(req, self.revision, &outcome);
                }
                (Ok(AppliedResult::Txn(outcome)), batch.events)
            }
            Err(e) => {
                self.rollback(batch.undo);
                (Err(e), Vec::new())
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
                mode,
            } => {
                shape(path, "create")?;
                if path == "/" {
                    return Err(ApplyError::new(
                        ErrorKind::AlreadyExists,
                        "create /: the root always exists",
                    ));
                }
                if mode.session_id != 0 && !self.sessions.contains_key(&mode.session_id) {
                    return Err(session::expired(mode.session_id));
                }
                if mode.session_id != 0 && mode.container {
                    return Err(ApplyError::new(
                        ErrorKind::InvalidArgument,
                        format!("create {path}: a node cannot be both ephemeral and a container"),
                    ));
                }
                self.ensure_parent(path, *parents, "create", batch)?;
                let path = if mode.sequential {
                    self.next_sequential(path, batch)
                } else {
                    path.clone()
                };
                if self.nodes.contains_key(&path) {
                    return Err(ApplyError::new(
                        ErrorKind::AlreadyExists,
                        format!("create {path}: node already exists"),
                    ));
                }
                let node = self.insert(&path, data.clone(), *mode, batch);
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
                    let node = self.insert(path, data.clone(), CreateMode::default(), batch);
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
        if let Some(p) = self.nodes.get(parent) {
            if p.ephemeral_owner != 0 {
                return Err(ApplyError::new(
                    ErrorKind::FailedPrecondition,
                    format!("{what} {path}: parent {parent} is ephemeral and cannot have children"),
                ));
            }
            return Ok(());
        }
        if !parents {
            return Err(ApplyError::new(
                ErrorKind::NotFound,
                format!("{what} {path}: parent {parent} does not exist (create it first, or request parents: lockctl --parents)"),
            ));
        }
        self.ensure_parent(parent, true, what, batch)?;
        self.insert(parent, Vec::new(), CreateMode::default(), batch);
        Ok(())
    }

    /// The path of the next sequential child for `prefix`, advancing the
    /// parent's counter.
    fn next_sequential(&mut self, prefix: &str, batch: &mut Batch) -> String {
        let parent = path::parent(prefix).unwrap_or("/");
        let Some(p) = self.nodes.get_mut(parent) else {
            return prefix.to_string();
        };
        batch.undo.push(Undo::Counters {
            path: parent.to_string(),
            seq: p.seq,
            cversion: p.cversion,
        });
        let n = p.seq;
        p.seq += 1;
        format!("{prefix}{n:010}")
    }

    fn insert(
        &mut self,
        path: &str,
        data: Vec<u8>,
        mode: CreateMode,
        batch: &mut Batch,
    ) -> NodeView {
        let node = Node::new(data, batch.revision, mode);
        let v = view(path, &node, true);
        self.nodes.insert(path.to_string(), node);
        if let Some(parent) = path::parent(path) {
            if let Some(p) = self.nodes.get_mut(parent) {
                batch.undo.push(Undo::Counters {
                    path: parent.to_string(),
                    seq: p.seq,
                    cversion: p.cversion,
                });
                p.children.insert(path::name(path).to_string());
                p.cversion += 1;
            }
        }
        if mode.session_id != 0 {
            if let Some(s) = self.sessions.get_mut(&mode.session_id) {
                s.ephemerals.insert(path.to_string());
            }
        }
        batch.undo.push(Undo::Created(path.to_string()));
        batch.events.push(Event {
            kind: EventKind::Put,
            node: v.clone(),
            prev: None,
        });
        v
    }

    fn modify(&mut self, path: &str, data: Vec<u8>, batch: &mut Batch) -> NodeView {
        let Some(node) = self.nodes.get_mut(path) else {
            return view(
                path,
                &Node::new(Vec::new(), 0, CreateMode::default()),
                false,
            );
        };
        let prev = view(path, node, true);
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
        batch.events.push(Event {
            kind: EventKind::Put,
            node: v.clone(),
            prev: Some(prev),
        });
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
        if self.remove_node(path, batch) {
            deleted += 1;
        }
        deleted
    }

    /// Removes one childless node; records undo and the event.
    fn remove_node(&mut self, path: &str, batch: &mut Batch) -> bool {
        let Some(node) = self.nodes.remove(path) else {
            return false;
        };
        if let Some(parent) = path::parent(path) {
            if let Some(p) = self.nodes.get_mut(parent) {
                p.children.remove(path::name(path));
                if p.container && p.children.is_empty() {
                    batch.emptied.insert(parent.to_string());
                }
            }
        }
        if node.ephemeral_owner != 0 {
            if let Some(s) = self.sessions.get_mut(&node.ephemeral_owner) {
                s.ephemerals.remove(path);
            }
        }
        let prev = view(path, &node, true);
        batch.events.push(Event {
            kind: EventKind::Delete,
            node: NodeView {
                path: path.to_string(),
                data: Vec::new(),
                version: 0,
                create_revision: node.create_revision,
                mod_revision: batch.revision,
                num_children: 0,
                ephemeral_owner: node.ephemeral_owner,
                container: node.container,
            },
            prev: Some(prev),
        });
        batch.undo.push(Undo::Deleted(path.to_string(), node));
        true
    }

    /// Deletes containers left without children (after having had one),
    /// deepest first, cascading up. Returns how many went.
    fn remove_empty_containers(&mut self, batch: &mut Batch) -> u64 {
        let mut removed = 0;
        while let Some(path) = batch.emptied.pop_last() {
            let gone = match self.nodes.get(&path) {
                Some(n) => path != "/" && n.container && n.children.is_empty() && n.cversion > 0,
                None => false,
            };
            if gone && self.remove_node(&path, batch) {
                removed += 1;
            }
        }
        removed
    }

    fn rollback(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            match u {
                Undo::Created(path) => {
                    if let Some(node) = self.nodes.remove(&path) {
                        if node.ephemeral_owner != 0 {
                            if let Some(s) = self.sessions.get_mut(&node.ephemeral_owner) {
                                s.ephemerals.remove(&path);
                            }
                        }
                    }
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
                    if node.ephemeral_owner != 0 {
                        if let Some(s) = self.sessions.get_mut(&node.ephemeral_owner) {
                            s.ephemerals.insert(path.clone());
                        }
                    }
                    self.nodes.insert(path, node);
                }
                Undo::Counters {
                    path,
                    seq,
                    cversion,
                } => {
                    if let Some(n) = self.nodes.get_mut(&path) {
                        n.seq = seq;
                        n.cversion = cversion;
                    }
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
        ephemeral_owner: n.ephemeral_owner,
        container: n.container,
    }
}

#[cfg(test)]
mod tests;
