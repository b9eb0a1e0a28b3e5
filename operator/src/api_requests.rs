//! Counts the operator's requests to the Kubernetes API by Kubernetes verb
//! and resource (`lockd_operator_api_requests_total`): a tower layer on the
//! client, so every request is counted, whichever code path makes it. A
//! reconcile that keeps writing at rest shows here as a growing count of
//! `patch` or `create` on the cluster's resources.

use std::task::{Context, Poll};

use http::{Method, Request, Uri};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tower::{Layer, Service};

/// Request counts by `verb` and `resource` labels.
pub type RequestCounts = Family<Vec<(String, String)>, Counter>;

/// The layer: wraps a client stack in [`Counted`].
#[derive(Clone)]
pub struct CountRequests {
    counts: RequestCounts,
}

impl CountRequests {
    /// Counts into `counts`.
    pub fn new(counts: RequestCounts) -> Self {
        CountRequests { counts }
    }
}

impl<S> Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            counts: self.counts.clone(),
        }
    }
}

/// A client stack whose requests are counted as they are sent.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    counts: RequestCounts,
}

impl<S, B> Service<Request<B>> for Counted<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> S::Future {
        let (verb, resource) = classify(req.method(), req.uri());
        self.counts
            .get_or_create(&vec![
                ("verb".to_string(), verb.to_string()),
                ("resource".to_string(), resource),
            ])
            .inc();
        self.inner.call(req)
    }
}

/// The Kubernetes verb (`get`, `list`, `watch`, `create`, `update`,
/// `patch`, `delete`, `deletecollection`) and resource (with its
/// subresource: `pods/eviction`, `lockclusters/status`) of an API request.
pub fn classify(method: &Method, uri: &Uri) -> (&'static str, String) {
    let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/... or /apis/{group}/{version}/...
    let rest: &[&str] = match segs.as_slice() {
        ["api", _, rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => &[],
    };
    let (resource, name, sub) = match rest {
        ["namespaces", _, resource, tail @ ..] => (Some(*resource), tail.first(), tail.get(1)),
        [resource, tail @ ..] => (Some(*resource), tail.first(), tail.get(1)),
        [] => (None, None, None),
    };
    let resource = match (resource, sub) {
        (Some(r), Some(s)) => format!("{r}/{s}"),
        (Some(r), None) => r.to_string(),
        (None, _) => "other".to_string(),
    };
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        Method::GET if watch => "watch",
        Method::GET if name.is_some() => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if name.is_some() => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    };
    (verb, resource)
}

/// Whether `verb` changes something.
pub fn is_write(verb: &str) -> bool {
    matches!(
        verb,
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(method: Method, uri: &str) -> (&'static str, String) {
        classify(&method, &uri.parse().expect("uri"))
    }

    #[test]
    fn verbs_and_resources_as_kubernetes_names_them() {
        let cases = [
            (Method::GET, "/api/v1/namespaces/ns/pods", ("list", "pods")),
            (
                Method::GET,
                "/api/v1/namespaces/ns/pods?labelSelector=a%3Db&watch=true&resourceVersion=5",
                ("watch", "pods"),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/ns/pods/demo-1",
                ("get", "pods"),
            ),
            (
                Method::POST,
                "/api/v1/namespaces/ns/pods/demo-1/eviction",
                ("create", "pods/eviction"),
            ),
            (
                Method::PATCH,
                "/apis/lockd.dev/v1alpha1/namespaces/ns/lockclusters/demo/status?fieldManager=x",
                ("patch", "lockclusters/status"),
            ),
            (
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/lockd-system/leases/lockd-operator",
                ("update", "leases"),
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/ns/persistentvolumeclaims/data-demo-4",
                ("delete", "persistentvolumeclaims"),
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/ns/pods",
                ("deletecollection", "pods"),
            ),
            (
                Method::GET,
                "/apis/lockd.dev/v1alpha1/lockclusters?watch=1",
                ("watch", "lockclusters"),
            ),
            (Method::GET, "/api/v1/namespaces/ns", ("get", "namespaces")),
            (Method::GET, "/version", ("list", "other")),
        ];
        for (method, uri, (verb, resource)) in cases {
            assert_eq!(c(method, uri), (verb, resource.to_string()), "{uri}");
        }
        assert!(is_write("patch") && is_write("create") && !is_write("watch"));
    }
}
