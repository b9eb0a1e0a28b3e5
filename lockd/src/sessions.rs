//! Session clocks, kept by the leader.
//!
//! Owns: each live session's deadline on this member's monotonic clock while
//! it leads, keepalives, deciding expiry (proposed through Raft as
//! `ExpireSessions`, so every member deletes the same ephemerals at the same
//! revision) and checkpointing remaining TTLs (`CheckpointSessions`).
//! Must never: expire a session anywhere but through Raft, or give a session
//! more than its full TTL after a leader change.
//!
//! Deadlines live in a `BTreeMap<(Instant, id)>`, so finding what expired
//! costs O(log n) per expired session, whatever the number of live ones.
//!
//! The bound on a dead session's life: a new leader starts each session's
//! clock from its last checkpointed remaining TTL. For a session whose
//! client is silent, checkpoints follow the remaining TTL down in steps of
//! `min(checkpoint_interval, TTL/4)`, taken every `checkpoint_interval`; so
//! when a leader fails, the checkpoint overstates the truth by at most two
//! intervals plus the time to commit it, and the new leader starts the clock
//! one election later. Each election during a dead session's TTL can
//! therefore add at most `2 x checkpoint_interval + commit + election time`,
//! and a dead session ends by
//! `TTL + elections x (2 x checkpoint_interval + election time + commit)`.
//! A live client renews every TTL/3 and reaches the new leader in time as
//! long as a failover takes less than about TTL/3.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::node::{LockdNode, NodeError};
use crate::raft::sm::ApplyHook;
use crate::store::{Applied, AppliedResult, Command, Event, Session, State};

/// Session settings (from flags).
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Shortest TTL granted.
    pub min_ttl: Duration,
    /// Longest TTL granted.
    pub max_ttl: Duration,
    /// How often the leader checkpoints remaining TTLs.
    pub checkpoint_interval: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            checkpoint_interval: Duration::from_secs(1),
        }
    }
}

impl SessionConfig {
    /// Clamps a requested TTL to the bounds (0 asks for the minimum).
    pub fn clamp(&self, requested_ms: u64) -> u64 {
        let min = self.min_ttl.as_millis() as u64;
        let max = self.max_ttl.as_millis() as u64;
        requested_ms.clamp(min, max.max(min))
    }
}

/// What the state machine tells the tracker (sent from apply).
#[derive(Debug)]
pub enum Signal {
    /// A session was opened.
    Opened(u64, u64),
    /// Sessions ended (closed or expired).
    Ended(Vec<u64>),
}

#[derive(Default)]
struct Clocks {
    /// Term in which these clocks were started; None when not leading.
    term: Option<u64>,
    deadlines: BTreeMap<(Instant, u64), ()>,
    by_id: HashMap<u64, (Instant, u64)>,
    /// Remaining TTL last checkpointed, per session.
    checkpointed: HashMap<u64, u64>,
    /// Popped as expired, expiry proposed, not yet applied.
    expiring: HashSet<u64>,
}

impl Clocks {
    fn set(&mut self, id: u64, deadline: Instant, ttl_ms: u64) {
        if let Some((old, _)) = self.by_id.insert(id, (deadline, ttl_ms)) {
            self.deadlines.remove(&(old, id));
        }
        self.deadlines.insert((deadline, id), ());
    }

    fn remove(&mut self, id: u64) {
        if let Some((d, _)) = self.by_id.remove(&id) {
            self.deadlines.remove(&(d, id));
        }
        self.checkpointed.remove(&id);
        self.expiring.remove(&id);
    }

    fn pop_expired(&mut self, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some((&(d, id), _)) = self.deadlines.first_key_value() {
            if d > now {
                break;
            }
            self.deadlines.remove(&(d, id));
            self.by_id.remove(&id);
            self.expiring.insert(id);
            out.push(id);
        }
        out
    }
}

/// The leader's session clocks, and the apply hook that feeds them.
pub struct Tracker {
    config: SessionConfig,
    clocks: Mutex<Clocks>,
    wake: Notify,
    signals: mpsc::UnboundedSender<Signal>,
}

impl Tracker {
    /// A tracker and the receiving end of its apply signals.
    pub fn new(config: SessionConfig) -> (Arc<Tracker>, mpsc::UnboundedReceiver<Signal>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Tracker {
                config,
                clocks: Mutex::new(Clocks::default()),
                wake: Notify::new(),
                signals: tx,
            }),
            rx,
        )
    }

    /// Session settings.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    fn clocks(&self) -> std::sync::MutexGuard<'_, Clocks> {
        self.clocks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the clocks for a new term of leadership from the checkpointed
    /// remaining TTLs (never more than the full TTL).
    fn lead(&self, term: u64, sessions: &BTreeMap<u64, Session>) {
        let now = Instant::now();
        let mut c = self.clocks();
        *c = Clocks {
            term: Some(term),
            ..Clocks::default()
        };
        for (id, s) in sessions {
            let remaining = s.remaining_ms.min(s.ttl_ms);
            c.set(*id, now + Duration::from_millis(remaining), s.ttl_ms);
            c.checkpointed.insert(*id, remaining);
        }
        drop(c);
        self.wake.notify_one();
    }

    fn stop_leading(&self) {
        *self.clocks() = Clocks::default();
    }

    /// Renews a session on the leader; returns its TTL, or None if the
    /// session is unknown, ended, or already past its deadline.
    pub fn keepalive(&self, id: u64, state_ttl: Option<u64>) -> Option<u64> {
        let ttl = state_ttl?;
        let mut c = self.clocks();
        if c.term.is_none() || c.expiring.contains(&id) {
            return None;
        }
        let now = Instant::now();
        if let Some((d, _)) = c.by_id.get(&id) {
            if *d <= now {
                return None;
            }
        }
        c.set(id, now + Duration::from_millis(ttl), ttl);
        Some(ttl)
    }

    /// Whether the clocks run (this member leads and has started them).
    pub fn is_leading(&self) -> bool {
        self.clocks().term.is_some()
    }

    /// Remaining TTL as this leader sees it.
    pub fn remaining(&self, id: u64) -> Option<Duration> {
        let c = self.clocks();
        c.term?;
        c.by_id
            .get(&id)
            .map(|(d, _)| d.saturating_duration_since(Instant::now()))
    }

    fn apply_signal(&self, s: Signal) {
        let mut c = self.clocks();
        if c.term.is_none() {
            return;
        }
        match s {
            Signal::Opened(id, ttl) => {
                if !c.by_id.contains_key(&id) {
                    c.set(id, Instant::now() + Duration::from_millis(ttl), ttl);
                    c.checkpointed.insert(id, ttl);
                }
            }
            Signal::Ended(ids) => {
                for id in ids {
                    c.remove(id);
                }
            }
        }
        drop(c);
        self.wake.notify_one();
    }

    /// Puts sessions whose expiry was not applied back on the clock, due
    /// at once, if this member still leads in the same term.
    fn retry_expiry(&self, term: Option<u64>, ids: &[u64]) {
        let mut c = self.clocks();
        if c.term.is_none() || c.term != term {
            return;
        }
        let now = Instant::now();
        for id in ids {
            if c.expiring.remove(id) {
                let ttl = c.checkpointed.get(id).copied().unwrap_or(0);
                c.set(*id, now, ttl);
            }
        }
        drop(c);
        self.wake.notify_one();
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.clocks()
            .deadlines
            .first_key_value()
            .map(|(&(d, _), _)| d)
    }

    /// Sessions due a checkpoint: those whose remaining TTL fell by more
    /// than a step since the last one (a silent client: the checkpoint must
    /// follow it down, or a leader change would revive it), and those whose
    /// last checkpoint is below half the TTL while they are alive again (so a
    /// leader change does not expire a live session). A live client renewing
    /// every TTL/3 settles after a few checkpoints and costs nothing after.
    fn due_checkpoints(&self) -> Vec<(u64, u64)> {
        let now = Instant::now();
        let interval = self.config.checkpoint_interval.as_millis() as u64;
        let mut c = self.clocks();
        let mut out = Vec::new();
        let entries: Vec<(u64, Instant, u64)> = c
            .by_id
            .iter()
            .map(|(id, (d, ttl))| (*id, *d, *ttl))
            .collect();
        for (id, d, ttl) in entries {
            let step = interval.min(ttl / 4).max(1);
            let remaining = d.saturating_duration_since(now).as_millis() as u64;
            let last = c.checkpointed.get(&id).copied().unwrap_or(ttl);
            let fell = remaining + step < last;
            let revived = remaining > last + step && last < ttl / 2;
            if fell || revived {
                out.push((id, remaining));
                c.checkpointed.insert(id, remaining);
            }
        }
        out.sort_unstable();
        out
    }
}

impl ApplyHook for Tracker {
    fn applied(
        &self,
        _index: u64,
        _revision: u64,
        command: &Command,
        result: &Applied,
        _events: &[Event],
    ) {
        let signal = match (command, &result.result) {
            (_, Ok(AppliedResult::SessionOpened { session_id, ttl_ms })) => {
                Signal::Opened(*session_id, *ttl_ms)
            }
            (Command::CloseSession { session_id }, _) => Signal::Ended(vec![*session_id]),
            (Command::ExpireSessions { session_ids }, _) => Signal::Ended(session_ids.clone()),
            _ => return,
        };
        let _ = self.signals.send(signal);
    }

    fn reset(&self, _revision: u64, _state: &State) {}
}

/// Runs the leader's session duties for as long as the member runs: on
/// becoming leader, start clocks; while leading, propose expiries and
/// checkpoints.
pub async fn run(node: Arc<LockdNode>, mut signals: mpsc::UnboundedReceiver<Signal>) {
    let tracker = node.sessions.clone();
    let mut metrics = node.raft.metrics();
    let mut checkpoint = tokio::time::interval(tracker.config.checkpoint_interval);
    checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading: Option<u64> = None;
    loop {
        // A new leader's state machine may still be replaying entries of
        // earlier terms (after a restart it replays everything): its clocks
        // start only once it has applied an entry of its own term, so that
        // every session committed before is known. Until then keepalives are
        // told to retry, never "expired".
        let (is_leader, term) = {
            let m = metrics.borrow_and_update();
            let caught_up = m
                .last_applied
                .is_some_and(|l| l.leader_id.term == m.current_term);
            (m.state == ServerState::Leader && caught_up, m.current_term)
        };
        match (is_leader, leading) {
            (true, Some(t)) if t == term => {}
            (true, _) => {
                let count = {
                    let data = node.sm.read();
                    tracker.lead(term, data.state.sessions());
                    data.state.sessions().len()
                };
                leading = Some(term);
                tracing::info!(term, sessions = count, "session clocks started");
            }
            (false, Some(_)) => {
                tracker.stop_leading();
                leading = None;
            }
            (false, None) => {}
        }
        let sleep_until = tracker
            .next_deadline()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            s = signals.recv() => match s {
                Some(s) => tracker.apply_signal(s),
                None => return,
            },
            _ = tracker.wake.notified() => {}
            _ = tokio::time::sleep_until(sleep_until), if leading.is_some() => {
                let expired = tracker.clocks().pop_expired(Instant::now());
                if !expired.is_empty() {
                    let node = node.clone();
                    let term = leading;
                    tokio::spawn(async move {
                        let ids = expired.clone();
                        if !propose_logged(&node, Command::ExpireSessions { session_ids: expired }).await {
                            // Still leading: try again shortly rather than
                            // leave them neither alive nor expired.
                            node.sessions.retry_expiry(term, &ids);
                        }
                    });
                }
            }
            _ = checkpoint.tick(), if leading.is_some() => {
                let due = tracker.due_checkpoints();
                if !due.is_empty() {
                    let node = node.clone();
                    tokio::spawn(async move {
                        propose_logged(&node, Command::CheckpointSessions { remaining: due }).await;
                    });
                }
            }
        }
    }
}

/// Proposes a session command; true when it was applied.
async fn propose_logged(node: &LockdNode, cmd: Command) -> bool {
    let what = crate::raft::types::Request {
        command: cmd.clone(),
    }
    .to_string();
    match node.propose(cmd).await {
        Ok(_) => {
            tracing::debug!(%what, "session command applied");
            true
        }
        Err(NodeError::Unavailable(m)) | Err(NodeError::Ambiguous(m)) => {
            tracing::info!(%what, reason = %m, "session command not applied");
            false
        }
        Err(e) => {
            tracing::warn!(%what, error = %e, "session command failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(ttl_ms: u64, remaining_ms: u64) -> Session {
        let mut s = State::default();
        s.apply(1, &Command::OpenSession { ttl_ms });
        s.apply(
            2,
            &Command::CheckpointSessions {
                remaining: vec![(1, remaining_ms)],
            },
        );
        s.session(1).cloned().expect("opened")
    }

    fn tracker() -> Arc<Tracker> {
        Tracker::new(SessionConfig {
            min_ttl: Duration::from_millis(100),
            max_ttl: Duration::from_secs(60),
            checkpoint_interval: Duration::from_millis(100),
        })
        .0
    }

    #[tokio::test(start_paused = true)]
    async fn clocks_start_from_checkpoints_and_expire_in_order() {
        let t = tracker();
        let sessions = BTreeMap::from([(1, session(1000, 1000)), (2, session(1000, 300))]);
        t.lead(7, &sessions);
        tokio::time::advance(Duration::from_millis(301)).await;
        assert_eq!(t.clocks().pop_expired(Instant::now()), vec![2]);
        assert_eq!(
            t.keepalive(2, Some(1000)),
            None,
            "expired sessions cannot be renewed"
        );
        assert_eq!(t.keepalive(1, Some(1000)), Some(1000));
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(
            t.clocks().pop_expired(Instant::now()).is_empty(),
            "renewed at 301 ms"
        );
        // Silent since: its checkpoint follows the clock down.
        assert_eq!(t.due_checkpoints(), vec![(1, 100)]);
        assert!(t.due_checkpoints().is_empty(), "nothing moved since");
        tokio::time::advance(Duration::from_millis(101)).await;
        assert_eq!(t.clocks().pop_expired(Instant::now()), vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_never_grants_more_than_the_ttl() {
        let t = tracker();
        let mut s = session(1000, 1000);
        s.remaining_ms = 5000; // impossible, but must be capped
        t.lead(1, &BTreeMap::from([(1, s)]));
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(t.clocks().pop_expired(Instant::now()), vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn live_sessions_stop_costing_checkpoints() {
        let t = tracker();
        t.lead(1, &BTreeMap::from([(1, session(3000, 3000))]));
        let mut total = 0;
        // A client renewing every TTL/3 for a while.
        for round in 0..30 {
            tokio::time::advance(Duration::from_millis(100)).await;
            total += t.due_checkpoints().len();
            if round % 10 == 9 {
                assert_eq!(t.keepalive(1, Some(3000)), Some(3000));
            }
        }
        let early = total;
        for round in 0..60 {
            tokio::time::advance(Duration::from_millis(100)).await;
            total += t.due_checkpoints().len();
            if round % 10 == 9 {
                assert_eq!(t.keepalive(1, Some(3000)), Some(3000));
            }
        }
        assert_eq!(total, early, "no checkpoints once settled");
        // The last checkpoint leaves a live client time to reach a new leader.
        let last = t
            .clocks()
            .checkpointed
            .get(&1)
            .copied()
            .expect("checkpointed");
        assert!(last >= 3000 / 2, "checkpoint {last} ms");
        // Not leading: nothing is renewed.
        t.stop_leading();
        assert_eq!(t.keepalive(1, Some(3000)), None);
    }
}
