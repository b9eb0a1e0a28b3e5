//! Names and labels of the objects the operator creates for a `LockCluster`
//! named `{cluster}`:
//!
//! | object | name |
//! | --- | --- |
//! | member Pod, one per Raft node id | `{cluster}-{id}` |
//! | member data PersistentVolumeClaim | `data-{cluster}-{id}` |
//! | headless Service for peer traffic (Pod DNS names) | `{cluster}-peers` |
//! | client Service | `{cluster}` |
//! | ConfigMap | `{cluster}-config` |
//! | PodDisruptionBudget | `{cluster}` |
//!
//! Every object carries [`common_labels`]; member Pods and their PVCs also
//! carry [`LABEL_NODE_ID`]. Pods are selected by [`selector_labels`]
//! (in string form [`selector_string`], as in `status.selector`).

use std::collections::BTreeMap;

/// Label naming the application: always [`APP_NAME`].
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// Label naming the `LockCluster` an object belongs to.
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// Label naming the manager of an object: always [`MANAGED_BY`].
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label carrying a member's Raft node id (decimal), on its Pod and PVC.
pub const LABEL_NODE_ID: &str = "lockd.dev/node-id";
/// Value of [`LABEL_NAME`].
pub const APP_NAME: &str = "lockd";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "lockd-operator";

/// Labels that select a cluster's member Pods: name and instance.
pub fn selector_labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), APP_NAME.to_string()),
        (LABEL_INSTANCE.to_string(), cluster.to_string()),
    ])
}

/// [`selector_labels`] as a label selector string, keys sorted:
/// `app.kubernetes.io/instance={cluster},app.kubernetes.io/name=lockd`.
/// This is what the operator writes to `status.selector`.
pub fn selector_string(cluster: &str) -> String {
    selector_labels(cluster)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels on every object the operator creates for a cluster: the selector
/// labels plus managed-by.
pub fn common_labels(cluster: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(cluster);
    labels.insert(LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string());
    labels
}

/// Labels of member `node_id`'s Pod and PVC: [`common_labels`] plus the node id.
pub fn member_labels(cluster: &str, node_id: u64) -> BTreeMap<String, String> {
    let mut labels = common_labels(cluster);
    labels.insert(LABEL_NODE_ID.to_string(), node_id.to_string());
    labels
}

/// Name of the Pod of member `node_id`: `{cluster}-{id}`. Also its host name
/// under the peers Service.
pub fn pod_name(cluster: &str, node_id: u64) -> String {
    format!("{cluster}-{node_id}")
}

/// The node id in a member Pod name made by [`pod_name`], if `pod` is one for
/// `cluster`.
pub fn node_id_from_pod_name(cluster: &str, pod: &str) -> Option<u64> {
    let id = pod.strip_prefix(cluster)?.strip_prefix('-')?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) || id.starts_with('0') {
        return None;
    }
    id.parse().ok()
}

/// Name of the data PVC of member `node_id`: `data-{cluster}-{id}`.
pub fn pvc_name(cluster: &str, node_id: u64) -> String {
    format!("data-{cluster}-{node_id}")
}

/// Name of the headless Service that gives members their DNS names:
/// `{cluster}-peers`.
pub fn peer_service_name(cluster: &str) -> String {
    format!("{cluster}-peers")
}

/// Name of the client Service: `{cluster}`.
pub fn client_service_name(cluster: &str) -> String {
    cluster.to_string()
}

/// Name of the cluster's ConfigMap: `{cluster}-config`.
pub fn config_map_name(cluster: &str) -> String {
    format!("{cluster}-config")
}

/// Name of the cluster's PodDisruptionBudget: `{cluster}`.
pub fn pdb_name(cluster: &str) -> String {
    cluster.to_string()
}

/// DNS name of member `node_id` inside the Kubernetes cluster, through the
/// peers Service: `{cluster}-{id}.{cluster}-peers.{namespace}.svc`.
pub fn member_host(cluster: &str, namespace: &str, node_id: u64) -> String {
    format!(
        "{}.{}.{namespace}.svc",
        pod_name(cluster, node_id),
        peer_service_name(cluster)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(pod_name("demo", 4), "demo-4");
        assert_eq!(pvc_name("demo", 4), "data-demo-4");
        assert_eq!(peer_service_name("demo"), "demo-peers");
        assert_eq!(client_service_name("demo"), "demo");
        assert_eq!(config_map_name("demo"), "demo-config");
        assert_eq!(pdb_name("demo"), "demo");
        assert_eq!(member_host("demo", "ns", 2), "demo-2.demo-peers.ns.svc");
    }

    #[test]
    fn labels_and_selector() {
        assert_eq!(
            selector_string("demo"),
            "app.kubernetes.io/instance=demo,app.kubernetes.io/name=lockd"
        );
        let m = member_labels("demo", 7);
        assert_eq!(m.len(), 4);
        assert_eq!(m[LABEL_NODE_ID], "7");
        assert_eq!(m[LABEL_MANAGED_BY], "lockd-operator");
        assert!(selector_labels("demo").iter().all(|(k, v)| m[k] == *v));
    }

    #[test]
    fn node_id_parsing_inverts_pod_name() {
        assert_eq!(
            node_id_from_pod_name("demo", &pod_name("demo", 12)),
            Some(12)
        );
        assert_eq!(node_id_from_pod_name("demo", "demo-peers"), None);
        assert_eq!(node_id_from_pod_name("demo", "demo-"), None);
        assert_eq!(node_id_from_pod_name("demo", "demo-012"), None);
        assert_eq!(node_id_from_pod_name("demo", "demo2-1"), None);
        // A cluster whose name extends another's: "demo-1-3" is member 3 of
        // "demo-1", not a member of "demo".
        assert_eq!(node_id_from_pod_name("demo", "demo-1-3"), None);
        assert_eq!(node_id_from_pod_name("demo-1", "demo-1-3"), Some(3));
    }
}
