//! Prometheus metrics, served on `/metrics`.
//!
//! Owns the registry and the handles the rest of the crate records into.
//! Raft gauges (term, indexes, leader) are read from openraft's metrics at
//! scrape time rather than pushed on every change.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a gRPC request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Full method, e.g. `KV/Put`.
    pub method: String,
    /// gRPC status code name.
    pub code: String,
}

struct Inner {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<RequestLabels, Histogram>,
    fsync_seconds: Histogram,
    fsync_batch: Histogram,
    forwarded: Counter,
    pub(crate) term: Gauge,
    pub(crate) commit_index: Gauge,
    pub(crate) applied_index: Gauge,
    pub(crate) last_log_index: Gauge,
    pub(crate) is_leader: Gauge,
    pub(crate) leader_id: Gauge,
    pub(crate) revision: Gauge,
    pub(crate) nodes: Gauge,
}

/// Cheap-to-clone handle on the member's metrics.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("lockd");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        let fsync_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        let fsync_batch = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let forwarded = Counter::default();
        registry.register(
            "grpc_requests",
            "gRPC requests by method and code",
            requests.clone(),
        );
        registry.register(
            "grpc_request_seconds",
            "gRPC request latency",
            request_seconds.clone(),
        );
        registry.register(
            "log_fsync_seconds",
            "Raft log fsync latency",
            fsync_seconds.clone(),
        );
        registry.register(
            "log_fsync_batch_requests",
            "Append requests made durable by one fsync (group commit)",
            fsync_batch.clone(),
        );
        registry.register(
            "forwarded_writes",
            "Writes forwarded to the leader",
            forwarded.clone(),
        );
        let g = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let term = g(&mut registry, "raft_term", "Current Raft term");
        let commit_index = g(&mut registry, "raft_commit_index", "Committed log index");
        let applied_index = g(&mut registry, "raft_applied_index", "Applied log index");
        let last_log_index = g(&mut registry, "raft_last_log_index", "Last log index");
        let is_leader = g(&mut registry, "raft_is_leader", "1 if this member leads");
        let leader_id = g(
            &mut registry,
            "raft_leader_id",
            "Known leader id, 0 if none",
        );
        let revision = g(&mut registry, "revision", "Cluster revision applied here");
        let nodes = g(&mut registry, "tree_nodes", "Nodes in the tree");
        Metrics {
            inner: Arc::new(Inner {
                registry: Mutex::new(registry),
                requests,
                request_seconds,
                fsync_seconds,
                fsync_batch,
                forwarded,
                term,
                commit_index,
                applied_index,
                last_log_index,
                is_leader,
                leader_id,
                revision,
                nodes,
            }),
        }
    }

    /// Records one finished gRPC request.
    pub fn observe_request(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        let labels = RequestLabels {
            method: method.to_string(),
            code: format!("{code:?}"),
        };
        self.inner.requests.get_or_create(&labels).inc();
        self.inner
            .request_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Records one log fsync and how many append requests it covered.
    pub fn observe_fsync(&self, elapsed: Duration, batch: usize) {
        self.inner.fsync_seconds.observe(elapsed.as_secs_f64());
        self.inner.fsync_batch.observe(batch as f64);
    }

    /// Counts a write forwarded to the leader.
    pub fn forwarded(&self) {
        self.inner.forwarded.inc();
    }

    /// Sets the Raft gauges.
    #[allow(clippy::too_many_arguments)]
    pub fn set_raft(
        &self,
        term: u64,
        commit: u64,
        applied: u64,
        last_log: u64,
        leader: bool,
        leader_id: u64,
        revision: u64,
        nodes: u64,
    ) {
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.inner.term.set(i(term));
        self.inner.commit_index.set(i(commit));
        self.inner.applied_index.set(i(applied));
        self.inner.last_log_index.set(i(last_log));
        self.inner.is_leader.set(i64::from(leader));
        self.inner.leader_id.set(i(leader_id));
        self.inner.revision.set(i(revision));
        self.inner.nodes.set(i(nodes));
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self
            .inner
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}
