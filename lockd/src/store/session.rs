//! Sessions (leases) in the state machine: their TTLs as last checkpointed,
//! their ephemeral nodes, and the results of their recent requests.
//!
//! Time never enters here: the leader decides when a session expires and
//! proposes `ExpireSessions`; this module only applies that decision.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::{AppliedResult, ApplyError, Batch, ErrorKind, Event, RequestId, State, TxnOutcome};

/// Recent request ids remembered per session (oldest forgotten first).
pub const MAX_REQUESTS_PER_SESSION: usize = 1000;
/// Recent request ids remembered for requests made without a session.
pub const MAX_REQUESTS_WITHOUT_SESSION: usize = 10_000;

/// Results of recent requests, by request id, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RequestTable {
    order: VecDeque<String>,
    results: BTreeMap<String, (u64, TxnOutcome)>,
}

impl RequestTable {
    fn get(&self, id: &str) -> Option<(u64, TxnOutcome)> {
        self.results.get(id).cloned()
    }

    fn insert(&mut self, id: &str, revision: u64, outcome: &TxnOutcome, cap: usize) {
        if self
            .results
            .insert(id.to_string(), (revision, outcome.clone()))
            .is_none()
        {
            self.order.push_back(id.to_string());
        }
        while self.order.len() > cap {
            if let Some(old) = self.order.pop_front() {
                self.results.remove(&old);
            }
        }
    }
}

/// A live session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Granted time to live.
    pub ttl_ms: u64,
    /// Remaining time to live at the last checkpoint (at most `ttl_ms`).
    pub remaining_ms: u64,
    /// Paths of the session's ephemeral nodes.
    pub ephemerals: BTreeSet<String>,
    requests: RequestTable,
}

pub(super) fn expired(session_id: u64) -> ApplyError {
    ApplyError::new(
        ErrorKind::SessionExpired,
        format!("session {session_id} expired or does not exist"),
    )
}

impl State {
    /// A live session.
    pub fn session(&self, id: u64) -> Option<&Session> {
        self.sessions.get(&id)
    }

    /// Every live session.
    pub fn sessions(&self) -> &BTreeMap<u64, Session> {
        &self.sessions
    }

    pub(super) fn open_session(&mut self, index: u64, ttl_ms: u64) -> AppliedResult {
        self.sessions.insert(
            index,
            Session {
                ttl_ms,
                remaining_ms: ttl_ms,
                ephemerals: BTreeSet::new(),
                requests: RequestTable::default(),
            },
        );
        AppliedResult::SessionOpened {
            session_id: index,
            ttl_ms,
        }
    }

    /// Ends sessions (close or expiry): deletes their ephemeral nodes and
    /// any container they leave empty, all at one revision. Unknown ids are
    /// skipped (a session may have been closed while its expiry was in
    /// flight).
    pub(super) fn end_sessions(
        &mut self,
        ids: &[u64],
    ) -> (Result<AppliedResult, ApplyError>, Vec<Event>) {
        let mut batch = Batch::new(self.revision + 1);
        let mut sessions = 0;
        let mut deleted = 0;
        for id in ids {
            let Some(s) = self.sessions.get(id) else {
                continue;
            };
            sessions += 1;
            let paths: Vec<String> = s.ephemerals.iter().cloned().collect();
            for p in paths {
                if self.remove_node(&p, &mut batch) {
                    deleted += 1;
                }
            }
            self.sessions.remove(id);
        }
        deleted += self.remove_empty_containers(&mut batch);
        if !batch.undo.is_empty() {
            self.revision = batch.revision;
        }
        (
            Ok(AppliedResult::SessionsEnded { sessions, deleted }),
            batch.events,
        )
    }

    pub(super) fn checkpoint(&mut self, remaining: &[(u64, u64)]) {
        for (id, ms) in remaining {
            if let Some(s) = self.sessions.get_mut(id) {
                s.remaining_ms = (*ms).min(s.ttl_ms);
            }
        }
    }

    /// The stored result of an earlier attempt of `req`, if any.
    pub(super) fn recent(&self, req: &RequestId) -> Result<Option<(u64, TxnOutcome)>, ApplyError> {
        if req.session_id == 0 {
            return Ok(self.global_requests.get(&req.id));
        }
        match self.sessions.get(&req.session_id) {
            Some(s) => Ok(s.requests.get(&req.id)),
            None => Err(expired(req.session_id)),
        }
    }

    pub(super) fn remember(&mut self, req: &RequestId, revision: u64, outcome: &TxnOutcome) {
        if req.session_id == 0 {
            self.global_requests
                .insert(&req.id, revision, outcome, MAX_REQUESTS_WITHOUT_SESSION);
        } else if let Some(s) = self.sessions.get_mut(&req.session_id) {
            s.requests
                .insert(&req.id, revision, outcome, MAX_REQUESTS_PER_SESSION);
        }
    }
}
