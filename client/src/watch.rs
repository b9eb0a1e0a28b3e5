//! Watches: [`Client::watch`] returns a [`Watcher`] that delivers every
//! change under a key, subtree or prefix in revision order, and survives
//! member failures by resuming elsewhere from the last revision it saw.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use lockd_proto::v1 as proto;
use proto::watch_client::WatchClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::client::Client;
use crate::error::Error;
use crate::retry::{describe, Backoff};

/// What a watch matches.
///
/// ```
/// use lockd_client::{WatchOptions, WatchScope};
///
/// assert_eq!(WatchOptions::key("/a").scope, WatchScope::Key); // only /a
/// assert_eq!(WatchOptions::subtree("/a").scope, WatchScope::Subtree); // /a, /a/b
/// assert_eq!(WatchOptions::prefix("/a").scope, WatchScope::Prefix); // /a, /ab, /a/b
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WatchScope {
    /// Only the node at the path.
    #[default]
    Key,
    /// The path and every node below it (`/a` matches `/a` and `/a/b`, not `/ab`).
    Subtree,
    /// Every path starting with the string (`/a` matches `/ab`).
    Prefix,
}

/// What to watch and from where; see [`Client::watch`].
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use lockd_client::WatchOptions;
///
/// // Read, then follow every later change, with no gap in between.
/// let got = client.get("/config").await?;
/// let rev = got.header.map_or(0, |h| h.revision);
/// let mut w = client.watch(WatchOptions {
///     no_delete: true,
///     ..WatchOptions::subtree("/config").from_revision(rev + 1).with_prev()
/// });
/// let ev = w.next().await?;
/// println!("{} changed at {}", ev.node.path, ev.revision);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct WatchOptions {
    /// The key, subtree root or prefix.
    pub path: String,
    /// How `path` matches.
    pub scope: WatchScope,
    /// First revision to deliver; 0 delivers changes from now on.
    pub start_revision: u64,
    /// Include each event's previous node.
    pub prev_node: bool,
    /// Skip put events.
    pub no_put: bool,
    /// Skip delete events.
    pub no_delete: bool,
    /// With `start_revision` 0: let the member catch up with the leader
    /// first, so "now" is not stale on a lagging member.
    pub wait_caught_up: bool,
}

impl WatchOptions {
    /// Watches the single node at `path`.
    pub fn key(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            ..Self::default()
        }
    }

    /// Watches `path` and every node below it.
    pub fn subtree(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            scope: WatchScope::Subtree,
            ..Self::default()
        }
    }

    /// Watches every path that starts with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self {
            path: prefix.into(),
            scope: WatchScope::Prefix,
            ..Self::default()
        }
    }

    /// Starts at `revision` (which must still be retained by the cluster).
    pub fn from_revision(mut self, revision: u64) -> Self {
        self.start_revision = revision;
        self
    }

    /// Includes previous nodes in events.
    pub fn with_prev(mut self) -> Self {
        self.prev_node = true;
        self
    }
}

/// Put or delete.
///
/// ```no_run
/// # async fn demo(mut w: lockd_client::Watcher) -> Result<(), lockd_client::Error> {
/// use lockd_client::WatchEventKind;
///
/// if w.next().await?.kind == WatchEventKind::Delete {
///     println!("deleted");
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchEventKind {
    /// Created or changed.
    Put,
    /// Deleted.
    Delete,
}

/// One change.
///
/// ```no_run
/// # async fn demo(mut w: lockd_client::Watcher) -> Result<(), lockd_client::Error> {
/// let ev = w.next().await?;
/// let before = ev.prev_node.as_ref().map(|n| n.data.clone());
/// println!(
///     "{:?} {} at revision {}: {before:?} -> {:?}",
///     ev.kind, ev.node.path, ev.revision, ev.node.data
/// );
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: WatchEventKind,
    /// The revision of the change (several events may share one: a
    /// transaction).
    pub revision: u64,
    /// The node after the change (for a delete: its path and revisions).
    pub node: proto::Node,
    /// The node before the change, when asked for and it existed.
    pub prev_node: Option<proto::Node>,
}

struct Open {
    // Keeps the request side of the stream open.
    _requests: mpsc::Sender<proto::WatchRequest>,
    responses: Streaming<proto::WatchResponse>,
}

/// A running watch; get events with [`Watcher::next`].
///
/// Events come in revision order with no gaps and no duplicates. When the
/// member serving the watch fails, shuts down or cancels the watch because
/// the reader fell behind, the watcher reconnects (to the next endpoint on
/// failure) and resumes from the revision after the last one it received:
/// a revision's events always arrive together, so nothing is lost or
/// repeated. It gives up with [`Error::Unavailable`] after
/// [`ClientOptions::retry_budget`](crate::ClientOptions::retry_budget)
/// without any member accepting the watch.
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use lockd_client::{WatchEventKind, WatchOptions};
///
/// let mut w = client.watch(WatchOptions::prefix("/workers/"));
/// loop {
///     let ev = w.next().await?;
///     match ev.kind {
///         WatchEventKind::Put => println!("{} up (revision {})", ev.node.path, ev.revision),
///         WatchEventKind::Delete => println!("{} gone", ev.node.path),
///     }
/// }
/// # }
/// ```
pub struct Watcher {
    client: Client,
    opts: WatchOptions,
    /// Every event up to this revision has been received (0: unknown yet).
    received: u64,
    buffered: VecDeque<WatchEvent>,
    open: Option<Open>,
    idx: usize,
    reconnects: u64,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("opts", &self.opts)
            .field("received", &self.received)
            .field("reconnects", &self.reconnects)
            .finish()
    }
}

impl Client {
    /// Starts a watch. Nothing is sent until the first [`Watcher::next`].
    pub fn watch(&self, opts: WatchOptions) -> Watcher {
        let (idx, _) = self.current_endpoint();
        let received = opts.start_revision.saturating_sub(1);
        Watcher {
            client: self.clone(),
            opts,
            received,
            buffered: VecDeque::new(),
            open: None,
            idx,
            reconnects: 0,
        }
    }
}

fn event_of(e: proto::Event, revision: u64) -> WatchEvent {
    let kind = if e.r#type == proto::event::Type::Delete as i32 {
        WatchEventKind::Delete
    } else {
        WatchEventKind::Put
    };
    WatchEvent {
        kind,
        revision,
        node: e.node.unwrap_or_default(),
        prev_node: e.prev_node,
    }
}

const WATCH_ID: i64 = 1;

impl Watcher {
    /// The revision up to which every event has been received (including
    /// those not yet returned by [`Watcher::next`]); progress notices move it
    /// on while nothing changes. 0 before the watch has started.
    pub fn revision(&self) -> u64 {
        self.received
    }

    /// How many times the watch was re-established.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    fn started(&self) -> bool {
        self.received > 0 || self.opts.start_revision > 0
    }

    fn create_request(&self) -> proto::WatchRequest {
        let scope = match self.opts.scope {
            WatchScope::Key => proto::watch_create::Scope::Key,
            WatchScope::Subtree => proto::watch_create::Scope::Subtree,
            WatchScope::Prefix => proto::watch_create::Scope::Prefix,
        };
        let start = if self.started() { self.received + 1 } else { 0 };
        proto::WatchRequest {
            request: Some(proto::watch_request::Request::Create(proto::WatchCreate {
                path: self.opts.path.clone(),
                scope: scope as i32,
                start_revision: start,
                prev_node: self.opts.prev_node,
                no_put: self.opts.no_put,
                no_delete: self.opts.no_delete,
                watch_id: WATCH_ID,
                wait_caught_up: self.opts.wait_caught_up && !self.started(),
            })),
        }
    }

    async fn connect(&mut self) -> Result<Open, Error> {
        let (_, n) = self.client.current_endpoint();
        let budget = self.client.options().retry_budget;
        let timeout = self.client.options().request_timeout;
        let start = Instant::now();
        let mut backoff = Backoff::new();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let (name, ch) = self.client.channel_at(self.idx);
            let name = name.to_string();
            let (tx, rx) = mpsc::channel(4);
            // Cannot fail: the receiver is alive.
            let _ = tx.try_send(self.create_request());
            let call = async {
                let mut s = WatchClient::new(ch)
                    .watch(ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                // Wait for the created ack (or the refusal).
                match s.message().await? {
                    Some(r) => Ok((s, r)),
                    None => Err(tonic::Status::unavailable(
                        "stream ended before the watch was created",
                    )),
                }
            };
            let failure = match tokio::time::timeout(timeout, call).await {
                Ok(Ok((s, first))) => {
                    if first.canceled {
                        self.refused(&name, &first)?;
                        format!("watch canceled: {}", first.cancel_reason)
                    } else {
                        if first.created && !self.started() {
                            self.received = first.header.as_ref().map_or(0, |h| h.revision);
                        }
                        if !first.created {
                            self.absorb(first);
                        }
                        return Ok(Open {
                            _requests: tx,
                            responses: s,
                        });
                    }
                }
                Ok(Err(status)) => describe(&status),
                Err(_) => format!("no answer within {timeout:?}"),
            };
            tracing::debug!(endpoint = %name, attempt = attempts, %failure, "watch not established");
            self.idx = (self.idx + 1) % n;
            let delay = backoff.next_delay();
            if start.elapsed() + delay >= budget {
                return Err(Error::Unavailable(format!(
                    "{name}: {failure} (gave up after {attempts} attempts in {:.1?})",
                    start.elapsed()
                )));
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// A cancel that must not be retried becomes an error.
    fn refused(&self, name: &str, r: &proto::WatchResponse) -> Result<(), Error> {
        if r.compact_revision > 0 {
            return Err(Error::Compacted {
                oldest: r.compact_revision,
                message: format!("{name}: {}", r.cancel_reason),
            });
        }
        if let Some(m) = r.cancel_reason.strip_prefix("invalid argument: ") {
            return Err(Error::InvalidArgument(m.to_string()));
        }
        Ok(())
    }

    /// Takes in the events or progress of one response.
    fn absorb(&mut self, r: proto::WatchResponse) {
        let rev = r.header.as_ref().map_or(0, |h| h.revision);
        if r.progress {
            self.received = self.received.max(rev);
            return;
        }
        if r.events.is_empty() || rev <= self.received {
            // Nothing new (a duplicate after a resume is dropped here).
            return;
        }
        self.received = rev;
        self.buffered
            .extend(r.events.into_iter().map(|e| event_of(e, rev)));
    }

    /// The next event. Errors are final: [`Error::Compacted`] when the
    /// revision to resume from is no longer retained anywhere it tried,
    /// [`Error::InvalidArgument`] for a bad path, [`Error::Unavailable`]
    /// when no member accepted the watch within the retry budget.
    pub async fn next(&mut self) -> Result<WatchEvent, Error> {
        loop {
            if let Some(e) = self.buffered.pop_front() {
                return Ok(e);
            }
            let open = match self.open.as_mut() {
                Some(o) => o,
                None => {
                    let o = self.connect().await?;
                    self.open.insert(o)
                }
            };
            let failed = match open.responses.message().await {
                Ok(Some(r)) if r.canceled => {
                    let name = self.client.channel_at(self.idx).0.to_string();
                    self.refused(&name, &r)?;
                    tracing::debug!(endpoint = %name, reason = %r.cancel_reason, "watch canceled by the member; resuming");
                    // A member shutting down or replaced by a snapshot is
                    // better left; a watcher that fell behind may stay.
                    !r.cancel_reason.contains("fell behind")
                }
                Ok(Some(r)) => {
                    self.absorb(r);
                    continue;
                }
                Ok(None) => true,
                Err(s) => {
                    tracing::debug!(status = %describe(&s), "watch stream failed; resuming");
                    true
                }
            };
            self.open = None;
            self.reconnects += 1;
            if failed {
                let (_, n) = self.client.current_endpoint();
                self.idx = (self.idx + 1) % n;
                // Give a failed member a moment before coming back to it.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
