//! `lockd.v1.Watch`: watch streams served by whichever member the client
//! connects to, from its own [`WatchHub`](crate::watch::WatchHub).
//!
//! One task drives a stream (reads requests, starts and cancels watches);
//! each watch runs in its own task that forwards its subscription's items
//! into the stream's bounded response queue. A client that stops reading
//! fills that queue, then the subscription's queue, and the hub cancels the
//! watch with the revision to resume from: nothing grows without bound.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::Stream;
use lockd_proto::v1 as pb;
use lockd_proto::v1::watch_server::Watch;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use super::{convert, header, NodeRef};
use crate::store::path::validate_key;
use crate::store::{Event, EventKind};
use crate::watch::{Filter, Item, Scope, Subscription};

/// Responses queued per stream before the watches of the stream wait.
const STREAM_QUEUE: usize = 16;

type Out = mpsc::Sender<Result<pb::WatchResponse, Status>>;

/// The Watch service.
pub struct WatchService {
    node: NodeRef,
}

impl WatchService {
    /// Serves watches on `node`.
    pub fn new(node: NodeRef) -> WatchService {
        WatchService { node }
    }
}

enum Ctl {
    Progress,
    Cancel,
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let node = self.node.clone();
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let span = tracing::info_span!("rpc", method = "Watch/Watch", member = node.config.id);
        tokio::spawn(
            async move {
                let started = Instant::now();
                let code = drive(node.clone(), inbound, tx).await;
                node.metrics
                    .observe_request("Watch/Watch", code, started.elapsed());
                tracing::debug!(?code, elapsed = ?started.elapsed(), "watch stream ended");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Handle {
    ctl: mpsc::UnboundedSender<Ctl>,
}

/// Runs one stream until the client goes away, or has half-closed and every
/// watch ended, or the member shuts down.
async fn drive(node: NodeRef, mut inbound: Streaming<pb::WatchRequest>, out: Out) -> Code {
    let mut watches: HashMap<i64, Handle> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<i64>();
    let mut next_id: i64 = 1;
    let mut inbound_done = false;
    let mut closed = node.watch.closed();
    let mut closing = *closed.borrow_and_update();
    let mut code = Code::Ok;
    loop {
        if (inbound_done || closing) && watches.is_empty() {
            break;
        }
        tokio::select! {
            msg = inbound.message(), if !inbound_done && !closing => match msg {
                Ok(Some(req)) => match req.request {
                    Some(pb::watch_request::Request::Create(c)) => {
                        let id = if c.watch_id != 0 {
                            c.watch_id
                        } else {
                            while watches.contains_key(&next_id) {
                                next_id += 1;
                            }
                            next_id
                        };
                        if watches.contains_key(&id) {
                            let r = canceled(&node, id, format!("invalid argument: watch id {id} is already in use on this stream"));
                            if out.send(Ok(r)).await.is_err() {
                                break;
                            }
                            continue;
                        }
                        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
                        watches.insert(id, Handle { ctl: ctl_tx });
                        let task = run_watch(node.clone(), id, c, out.clone(), ctl_rx, done_tx.clone());
                        tokio::spawn(task.instrument(tracing::debug_span!("watch", id)));
                    }
                    Some(pb::watch_request::Request::Cancel(c)) => {
                        if let Some(h) = watches.remove(&c.watch_id) {
                            let _ = h.ctl.send(Ctl::Cancel);
                        }
                    }
                    Some(pb::watch_request::Request::Progress(_)) => {
                        for h in watches.values() {
                            let _ = h.ctl.send(Ctl::Progress);
                        }
                    }
                    None => {}
                },
                Ok(None) => inbound_done = true,
                Err(s) => {
                    code = s.code();
                    break;
                }
            },
            Some(id) = done_rx.recv() => {
                watches.remove(&id);
            }
            r = closed.changed(), if !closing => {
                closing = r.is_err() || *closed.borrow_and_update();
            }
            _ = out.closed() => {
                code = Code::Cancelled;
                break;
            }
        }
    }
    code
}

fn canceled(node: &NodeRef, id: i64, reason: String) -> pb::WatchResponse {
    pb::WatchResponse {
        header: header(node, node.watch.revision()),
        watch_id: id,
        canceled: true,
        cancel_reason: reason,
        ..Default::default()
    }
}

fn event(e: Event) -> pb::Event {
    let t = match e.kind {
        EventKind::Put => pb::event::Type::Put,
        EventKind::Delete => pb::event::Type::Delete,
    };
    pb::Event {
        r#type: t as i32,
        node: Some(convert::node(e.node)),
        prev_node: e.prev.map(convert::node),
    }
}

fn filter_of(node: &NodeRef, c: &pb::WatchCreate) -> Result<Filter, String> {
    let scope = match pb::watch_create::Scope::try_from(c.scope) {
        Ok(pb::watch_create::Scope::Key) => Scope::Key,
        Ok(pb::watch_create::Scope::Subtree) => Scope::Subtree,
        Ok(pb::watch_create::Scope::Prefix) => Scope::Prefix,
        Err(_) => return Err(format!("invalid argument: unknown scope {}", c.scope)),
    };
    if scope == Scope::Prefix {
        // Any string prefix of an absolute path.
        if !c.path.starts_with('/') {
            return Err(format!(
                "invalid argument: prefix {:?} must start with '/'",
                c.path
            ));
        }
        if c.path.len() > node.config.limits.max_key_bytes {
            return Err(format!(
                "invalid argument: prefix is {} bytes, over --max-key-bytes {}",
                c.path.len(),
                node.config.limits.max_key_bytes
            ));
        }
    } else {
        validate_key(&c.path, &node.config.limits).map_err(|e| format!("invalid argument: {e}"))?;
    }
    Ok(Filter {
        path: c.path.clone(),
        scope,
        no_put: c.no_put,
        no_delete: c.no_delete,
        prev_node: c.prev_node,
    })
}

/// Sends an item; `Ok(true)` when the watch ended (cancelled).
async fn send_item(
    node: &NodeRef,
    id: i64,
    item: Item,
    out: &Out,
    last: &mut u64,
) -> Result<bool, ()> {
    let (r, ended) = match item {
        Item::Events { revision, events } => {
            *last = revision;
            (
                pb::WatchResponse {
                    header: header(node, revision),
                    watch_id: id,
                    events: events.into_iter().map(event).collect(),
                    ..Default::default()
                },
                false,
            )
        }
        Item::Cancelled(c) => (canceled(node, id, c.reason), true),
    };
    out.send(Ok(r)).await.map_err(|_| ())?;
    Ok(ended)
}

/// Delivers everything queued up to the hub's revision, then a progress
/// notice at that revision. `Ok(true)` when the watch ended meanwhile.
async fn progress(
    node: &NodeRef,
    id: i64,
    sub: &mut Subscription,
    out: &Out,
    last: &mut u64,
) -> Result<bool, ()> {
    // Every event up to `rev` is already in the subscription's queue (the
    // hub queues under the same lock that moves its revision).
    let rev = node.watch.revision();
    while let Some(item) = sub.try_next() {
        if send_item(node, id, item, out, last).await? {
            return Ok(true);
        }
    }
    let r = pb::WatchResponse {
        header: header(node, rev.max(*last)),
        watch_id: id,
        progress: true,
        ..Default::default()
    };
    out.send(Ok(r)).await.map_err(|_| ())?;
    Ok(false)
}

async fn run_watch(
    node: NodeRef,
    id: i64,
    create: pb::WatchCreate,
    out: Out,
    mut ctl: mpsc::UnboundedReceiver<Ctl>,
    done: mpsc::UnboundedSender<i64>,
) {
    let _ = watch_loop(&node, id, create, &out, &mut ctl).await;
    let _ = done.send(id);
}

async fn watch_loop(
    node: &NodeRef,
    id: i64,
    create: pb::WatchCreate,
    out: &Out,
    ctl: &mut mpsc::UnboundedReceiver<Ctl>,
) -> Result<(), ()> {
    let filter = match filter_of(node, &create) {
        Ok(f) => f,
        Err(reason) => {
            out.send(Ok(canceled(node, id, reason)))
                .await
                .map_err(|_| ())?;
            return Ok(());
        }
    };
    if create.wait_caught_up {
        if let Err(e) = node.read_barrier().await {
            let reason = format!("unavailable: this member could not catch up: {e}");
            out.send(Ok(canceled(node, id, reason)))
                .await
                .map_err(|_| ())?;
            return Ok(());
        }
    }
    let mut sub = match node.watch.subscribe(filter, create.start_revision) {
        Ok(s) => s,
        Err(c) => {
            let mut r = canceled(node, id, c.to_string());
            r.compact_revision = c.oldest;
            out.send(Ok(r)).await.map_err(|_| ())?;
            return Ok(());
        }
    };
    tracing::debug!(path = %create.path, start = sub.start_revision(), "watch created");
    // The created ack's revision is the one before the first the watch
    // delivers, so a client knows where it stands before any event.
    out.send(Ok(pb::WatchResponse {
        header: header(node, sub.start_revision() - 1),
        watch_id: id,
        created: true,
        ..Default::default()
    }))
    .await
    .map_err(|_| ())?;
    let mut last = 0u64;
    let every = node.config.watch_progress_interval;
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut last_sent = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            c = ctl.recv() => match c {
                Some(Ctl::Progress) => {
                    if progress(node, id, &mut sub, out, &mut last).await? {
                        return Ok(());
                    }
                    last_sent = tokio::time::Instant::now();
                }
                Some(Ctl::Cancel) => {
                    out.send(Ok(canceled(node, id, "canceled by the client".into())))
                        .await
                        .map_err(|_| ())?;
                    return Ok(());
                }
                None => return Ok(()),
            },
            item = sub.next() => match item {
                Some(item) => {
                    if send_item(node, id, item, out, &mut last).await? {
                        return Ok(());
                    }
                    last_sent = tokio::time::Instant::now();
                }
                None => return Ok(()),
            },
            _ = ticker.tick() => {
                if last_sent.elapsed() >= every {
                    if progress(node, id, &mut sub, out, &mut last).await? {
                        return Ok(());
                    }
                    last_sent = tokio::time::Instant::now();
                }
            }
        }
    }
}
