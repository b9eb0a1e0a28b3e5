//! `LockClusterStatus`: what the operator observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the operator last observed of the cluster. Written by the operator
/// only (status subresource).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LockClusterStatus {
    /// Lifecycle phase, a one-word summary for humans; conditions carry the
    /// details. Pending: accepted, no member created yet. Bootstrapping:
    /// creating the initial members and forming the Raft cluster. Running:
    /// all members ready at the requested count and version. Scaling: adding
    /// or removing members towards spec.replicas. Upgrading: replacing
    /// members one at a time to run spec.version. Degraded: serving with a
    /// quorum, but some member is missing, not ready or lagging. Failed:
    /// quorum lost or the cluster cannot be reconciled; needs a human (see
    /// conditions). Default: Pending.
    #[serde(default)]
    pub phase: LockClusterPhase,

    /// metadata.generation of the spec this status describes (default:
    /// unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Members (Pods) that exist, ready or not; the scale subresource's
    /// status replicas (default: 0).
    #[serde(default)]
    pub replicas: i32,

    /// Members that are ready: serving and caught up with the leader
    /// (default: 0).
    #[serde(default)]
    pub ready_replicas: i32,

    /// Label selector of the member Pods in string form, e.g.
    /// "app.kubernetes.io/instance=demo,app.kubernetes.io/name=lockd"; the
    /// scale subresource's label selector (default: unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Pod name of the current Raft leader (default: unset while there is
    /// none or it is unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,

    /// Raft node id of the current leader (default: unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_id: Option<u64>,

    /// Current Raft term (default: unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,

    /// Leader's commit index (default: unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_index: Option<u64>,

    /// One entry per member Pod, by Raft node id (default: empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["nodeId".into()]))]
    pub members: Vec<MemberStatus>,

    /// lockd version every member runs; unset while they differ (default:
    /// unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,

    /// lockd version an upgrade in progress moves to (default: unset when no
    /// upgrade is in progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,

    /// The operator's Raft node id allocator: the id the next new member
    /// gets. Ids are never reused, not even for a member whose volume was
    /// lost (default: unset until the first member is created; ids start at
    /// 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_member_id: Option<u64>,

    /// lockd cluster id (--cluster-id) of the Raft cluster this resource
    /// owns, recorded when the cluster is bootstrapped; members reporting
    /// another id are not adopted (default: unset before bootstrap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,

    /// True once the cluster has been initialized. From then on the
    /// operator never initializes it again, even if no member answers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bootstrapped: bool,

    /// Standard Kubernetes conditions, one per type: Available, Progressing,
    /// Degraded, QuorumAtRisk, ClusterIDMismatch (default: empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

impl LockClusterStatus {
    /// Insert or update a condition following Kubernetes conventions; see
    /// [`crate::conditions::upsert`]. Returns whether anything changed.
    pub fn set_condition(&mut self, condition: Condition) -> bool {
        crate::conditions::upsert(&mut self.conditions, condition)
    }

    /// The condition of the given type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        crate::conditions::find(&self.conditions, type_)
    }
}

/// Lifecycle phase of a LockCluster.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum LockClusterPhase {
    /// Accepted; no member has been created yet.
    #[default]
    Pending,
    /// Creating the initial members and forming the Raft cluster.
    Bootstrapping,
    /// All members ready at the requested count and version.
    Running,
    /// Adding or removing members to reach spec.replicas.
    Scaling,
    /// Replacing members one at a time to run spec.version.
    Upgrading,
    /// Serving with a quorum, but some members are missing, not ready or
    /// lagging.
    Degraded,
    /// Needs a human: quorum is lost or the cluster cannot be reconciled (see
    /// conditions).
    Failed,
}

/// One member as the operator last saw it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Name of the member's Pod ({cluster}-{nodeId}).
    pub pod: String,

    /// Raft node id of the member.
    pub node_id: u64,

    /// Raft role of the member (default: Unknown).
    #[serde(default)]
    pub role: MemberRole,

    /// lockd version the member runs (default: unset when unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,

    /// Whether the member is ready (default: false).
    #[serde(default)]
    pub ready: bool,

    /// Log entries the member is behind the leader's last log index (default:
    /// unset when unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,

    /// Random id of the member's data directory, recorded when the member
    /// first joined. A member that later reports another one has lost its
    /// volume and is replaced under a new node id, never readmitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,

    /// Since when the member has been continuously not ready or not caught
    /// up, as first seen by the operator (default: unset while healthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_since: Option<Time>,
}

/// Raft role of a member.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum MemberRole {
    /// The Raft leader.
    Leader,
    /// A voter following the leader.
    Follower,
    /// A non-voting member catching up before it is promoted to voter.
    Learner,
    /// Not known (member unreachable or not yet reporting).
    #[default]
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions;
    use crate::{LockCluster, LockClusterSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    #[test]
    fn empty_status_deserializes_with_defaults() {
        let s: LockClusterStatus = serde_json::from_value(json!({})).expect("status");
        assert_eq!(s, LockClusterStatus::default());
        assert_eq!(s.phase, LockClusterPhase::Pending);
        assert_eq!(s.replicas, 0);
        assert!(s.members.is_empty() && s.conditions.is_empty());
        assert_eq!(
            serde_json::to_value(&s).expect("serialize"),
            json!({"phase": "Pending", "replicas": 0, "readyReplicas": 0})
        );
    }

    #[test]
    fn resource_round_trip_with_status() {
        let mut lc = LockCluster::new("demo", LockClusterSpec::new(3, "0.1.0"));
        lc.metadata.namespace = Some("ns".into());
        let now = Time(Timestamp::from_second(1_700_000_000).expect("timestamp"));
        let mut status = LockClusterStatus {
            phase: LockClusterPhase::Running,
            observed_generation: Some(4),
            replicas: 3,
            ready_replicas: 3,
            selector: Some(crate::names::selector_string("demo")),
            leader: Some("demo-2".into()),
            leader_id: Some(2),
            term: Some(7),
            commit_index: Some(12_345),
            members: vec![
                MemberStatus {
                    pod: "demo-1".into(),
                    node_id: 1,
                    role: MemberRole::Follower,
                    version: Some("0.1.0".into()),
                    ready: true,
                    lag: Some(0),
                    instance_id: Some("a1".into()),
                    unhealthy_since: None,
                },
                MemberStatus {
                    pod: "demo-2".into(),
                    node_id: 2,
                    role: MemberRole::Leader,
                    version: Some("0.1.0".into()),
                    ready: true,
                    lag: None,
                    instance_id: None,
                    unhealthy_since: Some(Time(Timestamp::from_second(1_700_000_000).expect("t"))),
                },
            ],
            current_version: Some("0.1.0".into()),
            target_version: None,
            next_member_id: Some(4),
            cluster_id: Some("ns-demo-7f3a".into()),
            bootstrapped: true,
            conditions: Vec::new(),
        };
        assert!(status.set_condition(conditions::new(
            conditions::AVAILABLE,
            true,
            "QuorumReady",
            "3/3 members ready",
            Some(4),
            now.clone(),
        )));
        assert!(status.condition(conditions::AVAILABLE).is_some());
        lc.status = Some(status);

        let v = serde_json::to_value(&lc).expect("serialize");
        assert_eq!(v["apiVersion"], "lockd.dev/v1alpha1");
        assert_eq!(v["kind"], "LockCluster");
        assert_eq!(v["status"]["phase"], "Running");
        assert_eq!(v["status"]["leaderId"], 2);
        assert_eq!(v["status"]["nextMemberId"], 4);
        assert_eq!(v["status"]["members"][1]["role"], "Leader");
        assert_eq!(v["status"]["members"][0]["nodeId"], 1);
        assert_eq!(v["status"]["conditions"][0]["type"], "Available");
        assert_eq!(
            v["status"]["conditions"][0]["lastTransitionTime"],
            "2023-11-14T22:13:20Z"
        );
        assert!(v["status"].get("targetVersion").is_none());
        let back: LockCluster = serde_json::from_value(v).expect("deserialize");
        assert_eq!(back, lc);
    }

    #[test]
    fn member_defaults() {
        let m: MemberStatus =
            serde_json::from_value(json!({"pod": "demo-9", "nodeId": 9})).expect("member");
        assert_eq!(m.role, MemberRole::Unknown);
        assert!(!m.ready);
        assert_eq!(m.version, None);
        assert_eq!(m.lag, None);
    }
}
