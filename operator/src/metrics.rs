//! Prometheus metrics of the operator.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters and gauges the controller updates.
pub struct Metrics {
    registry: Registry,
    /// Reconcile passes by result ("ok" or "error").
    pub reconciles: Family<Vec<(String, String)>, Counter>,
    /// Executed plan actions by kind (CreateMember, ChangeVoters, ...).
    pub actions: Family<Vec<(String, String)>, Counter>,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    /// Requests to the Kubernetes API by verb and resource (see
    /// [`crate::api_requests`]).
    pub api_requests: crate::api_requests::RequestCounts,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lockd_operator");
        let reconciles = Family::default();
        let actions = Family::default();
        let leader = Gauge::default();
        let api_requests = crate::api_requests::RequestCounts::default();
        registry.register(
            "reconciles",
            "Reconcile passes by result",
            reconciles.clone(),
        );
        registry.register("actions", "Executed plan actions by kind", actions.clone());
        registry.register("leader", "1 while this replica leads", leader.clone());
        registry.register(
            "api_requests",
            "Requests to the Kubernetes API by verb and resource",
            api_requests.clone(),
        );
        Metrics {
            registry,
            reconciles,
            actions,
            leader,
            api_requests,
        }
    }
}

impl Metrics {
    /// Counts one pass.
    pub fn reconciled(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .inc();
    }

    /// Counts one executed action.
    pub fn acted(&self, kind: &str) {
        self.actions
            .get_or_create(&vec![("action".to_string(), kind.to_string())])
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
