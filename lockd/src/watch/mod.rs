//! Watch streams (etcd style): the in-memory history of recent events and
//! the fan-out of applied events to subscribers.
//!
//! Owns: a bounded ring of recent revisions' events ([`WatchHub`]), the
//! "oldest available revision" (older ones are compacted), and one bounded
//! queue per subscriber.
//! Must never: block or do slow work inside apply (the hub runs with the
//! state machine's write lock held), deliver a revision twice or skip one,
//! or buffer without bound for a subscriber that does not keep up (it is
//! cancelled with the revision to resume from instead).
//!
//! Cost inside apply: for each revision with events, one linear scan over
//! the subscribers, each checking its filter against that revision's events
//! (string comparisons, no copies); a match costs one `Arc` clone and a
//! `try_send`. Filtering the events themselves (and stripping `prev` when
//! not asked for) happens on the subscriber's side, outside the lock.
//! Subscribing copies `Arc`s of the retained revisions from the start
//! revision under the lock (no event is cloned there). An index of
//! subscribers by path would make apply independent of the number of
//! watchers; a linear scan is enough for thousands of watchers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, watch as tokio_watch};

use crate::raft::sm::ApplyHook;
use crate::store::{Applied, Command, Event, EventKind, NodeView, State};

#[cfg(test)]
mod tests;

/// Limits of the hub.
#[derive(Debug, Clone, Copy)]
pub struct WatchConfig {
    /// Revisions of history kept (older ones are compacted).
    pub max_revisions: u64,
    /// Approximate bytes of history kept.
    pub max_bytes: usize,
    /// Revisions (with matching events) queued per subscriber before it is
    /// cancelled as too slow.
    pub buffer: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            max_revisions: 100_000,
            max_bytes: 64 << 20,
            buffer: 1024,
        }
    }
}

/// What a watch matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only the node at the path.
    Key,
    /// The path and every node below it.
    Subtree,
    /// Every path that starts with the string.
    Prefix,
}

/// Which events a subscription wants.
#[derive(Debug, Clone)]
pub struct Filter {
    /// The key, subtree root or prefix.
    pub path: String,
    /// How `path` matches.
    pub scope: Scope,
    /// Drop put events.
    pub no_put: bool,
    /// Drop delete events.
    pub no_delete: bool,
    /// Keep each event's previous node.
    pub prev_node: bool,
}

impl Filter {
    /// A filter for every event under `path` with `scope`.
    pub fn new(path: impl Into<String>, scope: Scope) -> Filter {
        Filter {
            path: path.into(),
            scope,
            no_put: false,
            no_delete: false,
            prev_node: false,
        }
    }

    fn path_matches(&self, p: &str) -> bool {
        match self.scope {
            Scope::Key => p == self.path,
            Scope::Prefix => p.starts_with(self.path.as_str()),
            Scope::Subtree => {
                if self.path == "/" {
                    return true;
                }
                match p.strip_prefix(self.path.as_str()) {
                    Some(rest) => rest.is_empty() || rest.starts_with('/'),
                    None => false,
                }
            }
        }
    }

    /// True when the filter keeps `e`.
    pub fn matches(&self, e: &Event) -> bool {
        let kind_ok = match e.kind {
            EventKind::Put => !self.no_put,
            EventKind::Delete => !self.no_delete,
        };
        kind_ok && self.path_matches(&e.node.path)
    }
}

/// The events of one revision.
#[derive(Debug)]
pub struct Batch {
    /// The revision.
    pub revision: u64,
    /// Its events, in order.
    pub events: Vec<Event>,
    bytes: usize,
}

fn view_bytes(v: &NodeView) -> usize {
    v.path.len() + v.data.len() + 64
}

impl Batch {
    fn new(revision: u64, events: Vec<Event>) -> Batch {
        let bytes = events
            .iter()
            .map(|e| view_bytes(&e.node) + e.prev.as_ref().map_or(0, view_bytes))
            .sum::<usize>()
            + 32;
        Batch {
            revision,
            events,
            bytes,
        }
    }
}

/// The start revision is older than the retained history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("revision {requested} has been compacted; the oldest available revision is {oldest}")]
pub struct Compacted {
    /// The revision asked for.
    pub requested: u64,
    /// The oldest revision still available.
    pub oldest: u64,
}

/// Why a subscription ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancelled {
    /// Human-readable reason (names the revision to resume from).
    pub reason: String,
    /// The first revision the subscriber did not receive.
    pub resume_revision: u64,
}

/// One item of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// The matching events of one revision (never empty).
    Events {
        /// The revision.
        revision: u64,
        /// The events, filtered as asked.
        events: Vec<Event>,
    },
    /// The subscription ended; nothing more will come.
    Cancelled(Cancelled),
}

struct Sub {
    id: u64,
    filter: Filter,
    /// Deliver only revisions from here on.
    start: u64,
    /// The next revision the hub has not yet looked at for this subscriber.
    next: u64,
    tx: mpsc::Sender<Arc<Batch>>,
    cancel: Arc<Mutex<Option<Cancelled>>>,
}

struct Inner {
    /// The revision of the last applied command.
    current: u64,
    /// Every revision >= oldest is in `history` (if it had events).
    oldest: u64,
    history: VecDeque<Arc<Batch>>,
    bytes: usize,
    subs: Vec<Sub>,
    next_id: u64,
    closed: Option<String>,
}

/// The history of recent events and the live subscribers; registered as a
/// state machine [`ApplyHook`] so it sees every applied revision.
pub struct WatchHub {
    config: WatchConfig,
    inner: Mutex<Inner>,
    revision_tx: tokio_watch::Sender<u64>,
    closed_tx: tokio_watch::Sender<bool>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_cancel(cell: &Mutex<Option<Cancelled>>, c: Cancelled) {
    let mut g = cell.lock().unwrap_or_else(|p| p.into_inner());
    if g.is_none() {
        *g = Some(c);
    }
}

impl WatchHub {
    /// An empty hub at revision 0.
    pub fn new(config: WatchConfig) -> Arc<WatchHub> {
        let (revision_tx, _) = tokio_watch::channel(0);
        let (closed_tx, _) = tokio_watch::channel(false);
        Arc::new(WatchHub {
            config: WatchConfig {
                max_revisions: config.max_revisions.max(1),
                buffer: config.buffer.max(1),
                ..config
            },
            inner: Mutex::new(Inner {
                current: 0,
                oldest: 1,
                history: VecDeque::new(),
                bytes: 0,
                subs: Vec::new(),
                next_id: 1,
                closed: None,
            }),
            revision_tx,
            closed_tx,
        })
    }

    /// The hub's limits.
    pub fn config(&self) -> WatchConfig {
        self.config
    }

    /// The revision of the last applied command this hub has seen. Every
    /// event up to it has been queued to (or filtered out for) every
    /// subscriber.
    pub fn revision(&self) -> u64 {
        lock(&self.inner).current
    }

    /// The oldest revision still available to a new subscription.
    pub fn oldest(&self) -> u64 {
        lock(&self.inner).oldest
    }

    /// Changes whenever the hub's revision does.
    pub fn revisions(&self) -> tokio_watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    /// Becomes true once the hub is closed ([`WatchHub::close`]).
    pub fn closed(&self) -> tokio_watch::Receiver<bool> {
        self.closed_tx.subscribe()
    }

    /// Number of live subscriptions.
    pub fn subscribers(&self) -> usize {
        lock(&self.inner).subs.len()
    }

    /// Subscribes to events matching `filter` from `start_revision` (0: from
    /// the next revision). Retained history from the start revision is
    /// replayed first, then live events follow, in revision order, with no
    /// gap and no duplicate.
    pub fn subscribe(
        self: &Arc<Self>,
        filter: Filter,
        start_revision: u64,
    ) -> Result<Subscription, Compacted> {
        let (tx, rx) = mpsc::channel(self.config.buffer);
        let cancel = Arc::new(Mutex::new(None));
        let mut g = lock(&self.inner);
        let start = if start_revision == 0 {
            g.current + 1
        } else {
            start_revision
        };
        if start < g.oldest {
            return Err(Compacted {
                requested: start,
                oldest: g.oldest,
            });
        }
        // Registering under the same lock as the copy of the history: every
        // revision up to `current` comes from the replay, every later one
        // from the live queue.
        let from = g.history.partition_point(|b| b.revision < start);
        let replay: VecDeque<Arc<Batch>> = g.history.range(from..).cloned().collect();
        let id = g.next_id;
        g.next_id += 1;
        if let Some(reason) = g.closed.clone() {
            set_cancel(
                &cancel,
                Cancelled {
                    reason,
                    resume_revision: start,
                },
            );
        } else {
            let next = g.current + 1;
            g.subs.push(Sub {
                id,
                filter: filter.clone(),
                start,
                next,
                tx,
                cancel: cancel.clone(),
            });
        }
        drop(g);
        Ok(Subscription {
            id,
            hub: Arc::downgrade(self),
            filter,
            start,
            replay,
            rx,
            cancel,
            last: start.saturating_sub(1),
            done: false,
        })
    }

    fn unsubscribe(&self, id: u64) {
        lock(&self.inner).subs.retain(|s| s.id != id);
    }

    /// Cancels every subscription with `reason` and refuses new ones
    /// (the member is shutting down).
    pub fn close(&self, reason: &str) {
        let mut g = lock(&self.inner);
        g.closed = Some(reason.to_string());
        for s in g.subs.drain(..) {
            set_cancel(
                &s.cancel,
                Cancelled {
                    reason: format!("{reason}; resume from revision {}", s.next.max(s.start)),
                    resume_revision: s.next.max(s.start),
                },
            );
        }
        drop(g);
        self.closed_tx.send_replace(true);
    }

    fn trim(&self, g: &mut Inner) {
        let floor = (g.current + 1).saturating_sub(self.config.max_revisions);
        g.oldest = g.oldest.max(floor).max(1);
        while let Some(front) = g.history.front() {
            if front.revision < g.oldest || g.bytes > self.config.max_bytes {
                g.bytes -= front.bytes;
                let rev = front.revision;
                g.history.pop_front();
                g.oldest = g.oldest.max(rev + 1);
            } else {
                break;
            }
        }
    }

    /// Records the events of `revision` and hands them to the subscribers.
    pub fn push(&self, revision: u64, events: &[Event]) {
        let mut g = lock(&self.inner);
        if revision <= g.current {
            // Nothing changed (a failed or read-only command).
            return;
        }
        g.current = revision;
        if !events.is_empty() {
            let batch = Arc::new(Batch::new(revision, events.to_vec()));
            g.bytes += batch.bytes;
            g.history.push_back(batch.clone());
            g.subs.retain_mut(|s| {
                let wanted =
                    revision >= s.start && batch.events.iter().any(|e| s.filter.matches(e));
                if wanted {
                    match s.tx.try_send(batch.clone()) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            set_cancel(
                                &s.cancel,
                                Cancelled {
                                    reason: format!(
                                        "watcher fell behind; resume from revision {revision}"
                                    ),
                                    resume_revision: revision,
                                },
                            );
                            return false;
                        }
                        // The subscription was dropped.
                        Err(mpsc::error::TrySendError::Closed(_)) => return false,
                    }
                }
                s.next = revision + 1;
                true
            });
        } else {
            for s in g.subs.iter_mut() {
                s.next = revision + 1;
            }
        }
        self.trim(&mut g);
        drop(g);
        self.revision_tx.send_replace(revision);
    }

    /// The state was replaced at `revision`: history before it is gone.
    /// Subscribers that still needed revisions up to it are cancelled
    /// (those revisions will never be seen here).
    pub fn reset_to(&self, revision: u64) {
        let mut g = lock(&self.inner);
        g.history.clear();
        g.bytes = 0;
        let old = g.current;
        g.current = revision;
        g.oldest = revision + 1;
        g.subs.retain_mut(|s| {
            let needed = s.next.max(s.start);
            if needed <= revision && revision != old {
                set_cancel(
                    &s.cancel,
                    Cancelled {
                        reason: format!(
                            "this member installed a snapshot at revision {revision}; \
                             resume from revision {needed} (on another member if compacted here)"
                        ),
                        resume_revision: needed,
                    },
                );
                false
            } else {
                s.next = s.next.max(revision + 1);
                true
            }
        });
        drop(g);
        self.revision_tx.send_replace(revision);
    }
}

impl ApplyHook for WatchHub {
    fn applied(
        &self,
        _index: u64,
        revision: u64,
        _command: &Command,
        _result: &Applied,
        events: &[Event],
    ) {
        self.push(revision, events);
    }

    fn reset(&self, revision: u64, _state: &State) {
        self.reset_to(revision);
    }
}

/// A live subscription; dropping it unsubscribes.
pub struct Subscription {
    id: u64,
    hub: std::sync::Weak<WatchHub>,
    filter: Filter,
    start: u64,
    replay: VecDeque<Arc<Batch>>,
    rx: mpsc::Receiver<Arc<Batch>>,
    cancel: Arc<Mutex<Option<Cancelled>>>,
    /// The last revision handed out (start - 1 before any).
    last: u64,
    done: bool,
}

impl Subscription {
    /// The first revision this subscription delivers.
    pub fn start_revision(&self) -> u64 {
        self.start
    }

    /// The last revision handed out (`start - 1` before the first).
    pub fn last_revision(&self) -> u64 {
        self.last
    }

    fn filtered(&mut self, b: &Batch) -> Option<Item> {
        if b.revision < self.start || b.revision <= self.last {
            return None;
        }
        let events: Vec<Event> = b
            .events
            .iter()
            .filter(|e| self.filter.matches(e))
            .map(|e| {
                let mut e = e.clone();
                if !self.filter.prev_node {
                    e.prev = None;
                }
                e
            })
            .collect();
        if events.is_empty() {
            return None;
        }
        self.last = b.revision;
        Some(Item::Events {
            revision: b.revision,
            events,
        })
    }

    fn cancelled(&mut self) -> Option<Item> {
        let c = self
            .cancel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.done = true;
        Some(Item::Cancelled(c.unwrap_or_else(|| Cancelled {
            reason: "the watch hub stopped".into(),
            resume_revision: self.last + 1,
        })))
    }

    /// The next item, if one is ready now; `None` when nothing is queued.
    pub fn try_next(&mut self) -> Option<Item> {
        if self.done {
            return None;
        }
        while let Some(b) = self.replay.pop_front() {
            if let Some(i) = self.filtered(&b) {
                return Some(i);
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(b) => {
                    if let Some(i) = self.filtered(&b) {
                        return Some(i);
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => return self.cancelled(),
            }
        }
    }

    /// Waits for the next item; after [`Item::Cancelled`] it returns `None`
    /// for good.
    pub async fn next(&mut self) -> Option<Item> {
        if self.done {
            return None;
        }
        while let Some(b) = self.replay.pop_front() {
            if let Some(i) = self.filtered(&b) {
                return Some(i);
            }
        }
        loop {
            match self.rx.recv().await {
                Some(b) => {
                    if let Some(i) = self.filtered(&b) {
                        return Some(i);
                    }
                }
                None => return self.cancelled(),
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.unsubscribe(self.id);
        }
    }
}
