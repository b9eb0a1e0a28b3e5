//! `LockClusterSpec` and its parts: what the user asks for.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::LockClusterStatus;

/// Fewest members a cluster may have.
pub const MIN_REPLICAS: i32 = 1;
/// Most members a cluster may have.
pub const MAX_REPLICAS: i32 = 9;
/// Longest `metadata.name` a `LockCluster` may have. The name is the prefix
/// of its Services, Pods (`{name}-{id}`, also the member's DNS host name) and
/// PVCs, which must stay within the 63-character DNS label limit.
pub const MAX_CLUSTER_NAME_LEN: usize = 40;
/// Image repository used when `spec.image` is not set; the tag is `spec.version`.
pub const DEFAULT_IMAGE_REPOSITORY: &str = "ghcr.io/lockd/lockd";
/// Default size of each member's data volume.
pub const DEFAULT_STORAGE_SIZE: &str = "1Gi";
/// Default `--election-timeout-ms` (lockd's own default).
pub const DEFAULT_ELECTION_TIMEOUT_MS: u64 = 1_000;
/// Default `--heartbeat-ms` (lockd's own default).
pub const DEFAULT_HEARTBEAT_MS: u64 = 100;
/// Default `--session-min-ttl-ms` (lockd's own default).
pub const DEFAULT_SESSION_MIN_TTL_MS: u64 = 1_000;
/// Default `--session-max-ttl-ms` (lockd's own default).
pub const DEFAULT_SESSION_MAX_TTL_MS: u64 = 300_000;
/// Default `--snapshot-threshold` (lockd's own default).
pub const DEFAULT_SNAPSHOT_THRESHOLD: u64 = 10_000;
/// Default `spec.progressDeadlineSeconds`.
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: u64 = 600;

/// Desired state of a LockCluster. Only replicas and version are required;
/// every other field has a default.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "lockd.dev",
    version = "v1alpha1",
    kind = "LockCluster",
    plural = "lockclusters",
    shortname = "lc",
    category = "lockd",
    category = "all",
    namespaced,
    status = "LockClusterStatus",
    derive = "PartialEq",
    doc = "A lockd cluster: an odd number of lockd members forming one Raft group, each a Pod with its own PersistentVolumeClaim, managed by the lockd operator.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired number of members"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Members that are ready"
    ),
    printcolumn(
        name = "Leader",
        type_ = "string",
        json_path = ".status.leader",
        description = "Pod of the current Raft leader"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.currentVersion",
        description = "lockd version all members run"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Lifecycle phase"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(
        "self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    )
    .message(
        "metadata.name must be a DNS-1035 label of at most 40 characters (lowercase letters, digits and '-', starting with a letter): it prefixes the cluster's Service, Pod and PVC names"
    )
)]
#[x_kube(validation = Rule::new("self.replicas % 2 == 1")
    .message("replicas must be odd (1, 3, 5, 7 or 9): an even member count adds no fault tolerance over the odd count below it")
    .field_path(".replicas"))]
#[serde(rename_all = "camelCase")]
pub struct LockClusterSpec {
    /// Number of members (Raft voters): odd, from 1 to 9. A cluster of n
    /// members stays available while a majority (n/2 + 1) of them is up.
    /// Changing it adds or removes one member at a time through Raft
    /// membership changes; also settable through the scale subresource
    /// (kubectl scale).
    #[schemars(range(min = MIN_REPLICAS, max = MAX_REPLICAS))]
    pub replicas: i32,

    /// lockd version to run, e.g. "0.1.0". Unless image is set, the image is
    /// ghcr.io/lockd/lockd:{version}. Changing it rolls the members one at a
    /// time, followers first and the leader last.
    #[schemars(length(min = 1))]
    pub version: String,

    /// Container image to run instead of the one derived from version
    /// (default: ghcr.io/lockd/lockd:{version}). version must still name the
    /// lockd version this image contains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Compute resources of the lockd container (default: none set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Each member's data volume (default: 1Gi from the default StorageClass,
    /// deleted when scaled away, retained when the LockCluster is deleted).
    #[serde(default)]
    pub storage: StorageSpec,

    /// lockd settings, passed to every member as flags (default: lockd's own
    /// defaults).
    #[serde(default)]
    pub lockd: LockdSettings,

    /// Extra scheduling and metadata for the member Pods (default: none).
    #[serde(default)]
    pub pod: PodOverrides,

    /// The client Service (default: type ClusterIP).
    #[serde(default)]
    pub service: ServiceSpec,

    /// Seconds a member may stay not ready or not caught up before the
    /// operator reports it stuck: condition Degraded with reason
    /// MembersStuck, and Progressing with reason ProgressDeadlineExceeded
    /// while a step waits on it. The operator still never acts against
    /// quorum; the report is for a human. Like a Deployment's field of the
    /// same name (default: 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: Option<i32>,
}

impl LockClusterSpec {
    /// A spec with the given member count and lockd version and every other
    /// field at its default.
    pub fn new(replicas: i32, version: impl Into<String>) -> Self {
        Self {
            replicas,
            version: version.into(),
            image: None,
            resources: None,
            storage: StorageSpec::default(),
            lockd: LockdSettings::default(),
            pod: PodOverrides::default(),
            service: ServiceSpec::default(),
            progress_deadline_seconds: None,
        }
    }

    /// How long a member may stay unhealthy before it is reported stuck.
    pub fn progress_deadline(&self) -> std::time::Duration {
        let secs = self
            .progress_deadline_seconds
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .unwrap_or(DEFAULT_PROGRESS_DEADLINE_SECONDS);
        std::time::Duration::from_secs(secs)
    }

    /// The container image to run: `spec.image` if set, otherwise
    /// `{DEFAULT_IMAGE_REPOSITORY}:{version}`.
    pub fn image(&self) -> String {
        match &self.image {
            Some(image) => image.clone(),
            None => format!("{DEFAULT_IMAGE_REPOSITORY}:{}", self.version),
        }
    }

    /// Members needed for a majority (`replicas / 2 + 1`): writes and
    /// elections need this many members up.
    pub fn quorum(&self) -> i32 {
        self.replicas.max(0) / 2 + 1
    }
}

/// Each member's data volume (a PersistentVolumeClaim named data-{cluster}-{id}).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Requested size of each member's volume (default: 1Gi; null also
    /// means the default).
    #[serde(
        default = "default_storage_size",
        deserialize_with = "deserialize_storage_size"
    )]
    pub size: Quantity,

    /// StorageClass of the volumes (default: the cluster's default
    /// StorageClass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// What happens to member volumes when members go away (default:
    /// whenScaled Delete, whenDeleted Retain).
    #[serde(default)]
    pub retention: RetentionPolicy,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
            retention: RetentionPolicy::default(),
        }
    }
}

fn default_storage_size() -> Quantity {
    Quantity(DEFAULT_STORAGE_SIZE.to_string())
}

/// kube marks every optional int-or-string property `nullable`, so the API
/// server keeps an explicit `size: null` instead of defaulting it: read that
/// as the default.
fn deserialize_storage_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Quantity, D::Error> {
    Ok(Option::<Quantity>::deserialize(d)?.unwrap_or_else(default_storage_size))
}

/// What happens to member volumes when members go away, modelled on a
/// StatefulSet's persistentVolumeClaimRetentionPolicy. Node ids are never
/// reused, so a retained volume is never attached to a member again: Retain
/// keeps the data for inspection or manual recovery only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicy {
    /// Volume of a member removed by scaling down or replaced (default:
    /// Delete).
    #[serde(default = "RetentionAction::delete")]
    pub when_scaled: RetentionAction,

    /// Volumes of all members when the LockCluster is deleted (default:
    /// Retain).
    #[serde(default = "RetentionAction::retain")]
    pub when_deleted: RetentionAction,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            when_scaled: RetentionAction::Delete,
            when_deleted: RetentionAction::Retain,
        }
    }
}

/// Keep or delete a volume.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RetentionAction {
    /// Keep the PersistentVolumeClaim (and so its data).
    Retain,
    /// Delete the PersistentVolumeClaim.
    Delete,
}

impl RetentionAction {
    fn retain() -> Self {
        Self::Retain
    }

    fn delete() -> Self {
        Self::Delete
    }
}

/// lockd settings shared by every member, each rendered as the lockd flag of
/// the same name (see `lockd --help`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("self.electionTimeoutMs * 2 / 5 > self.heartbeatMs")
        .message("electionTimeoutMs must be more than 2.5 x heartbeatMs (lockd requires electionTimeoutMs * 2 / 5 > heartbeatMs in integer milliseconds)")
        .field_path(".electionTimeoutMs"),
    validation = Rule::new("self.sessionMinTtlMs <= self.sessionMaxTtlMs")
        .message("sessionMinTtlMs must be at most sessionMaxTtlMs")
        .field_path(".sessionMinTtlMs"),
)]
#[serde(rename_all = "camelCase")]
pub struct LockdSettings {
    /// --election-timeout-ms: a follower that hears nothing from the leader
    /// for this long (up to 1.2x, randomized) campaigns. More than 2.5 x
    /// heartbeatMs (default: 1000).
    #[serde(default = "default_election_timeout_ms")]
    #[schemars(range(min = 1))]
    pub election_timeout_ms: u64,

    /// --heartbeat-ms: leader heartbeat interval in milliseconds (default:
    /// 100).
    #[serde(default = "default_heartbeat_ms")]
    #[schemars(range(min = 1))]
    pub heartbeat_ms: u64,

    /// --session-min-ttl-ms: shortest session TTL granted, in milliseconds
    /// (default: 1000).
    #[serde(default = "default_session_min_ttl_ms")]
    #[schemars(range(min = 1))]
    pub session_min_ttl_ms: u64,

    /// --session-max-ttl-ms: longest session TTL granted, in milliseconds; at
    /// least sessionMinTtlMs (default: 300000).
    #[serde(default = "default_session_max_ttl_ms")]
    #[schemars(range(min = 1))]
    pub session_max_ttl_ms: u64,

    /// --snapshot-threshold: log entries between snapshots; the log is purged
    /// behind each snapshot (default: 10000).
    #[serde(default = "default_snapshot_threshold")]
    #[schemars(range(min = 1))]
    pub snapshot_threshold: u64,
}

impl Default for LockdSettings {
    fn default() -> Self {
        Self {
            election_timeout_ms: DEFAULT_ELECTION_TIMEOUT_MS,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            session_min_ttl_ms: DEFAULT_SESSION_MIN_TTL_MS,
            session_max_ttl_ms: DEFAULT_SESSION_MAX_TTL_MS,
            snapshot_threshold: DEFAULT_SNAPSHOT_THRESHOLD,
        }
    }
}

fn default_election_timeout_ms() -> u64 {
    DEFAULT_ELECTION_TIMEOUT_MS
}

fn default_heartbeat_ms() -> u64 {
    DEFAULT_HEARTBEAT_MS
}

fn default_session_min_ttl_ms() -> u64 {
    DEFAULT_SESSION_MIN_TTL_MS
}

fn default_session_max_ttl_ms() -> u64 {
    DEFAULT_SESSION_MAX_TTL_MS
}

fn default_snapshot_threshold() -> u64 {
    DEFAULT_SNAPSHOT_THRESHOLD
}

impl LockdSettings {
    /// The settings as lockd command-line flags, one `--flag=value` string
    /// each, in a fixed order:
    /// `--election-timeout-ms`, `--heartbeat-ms`, `--session-min-ttl-ms`,
    /// `--session-max-ttl-ms`, `--snapshot-threshold`.
    pub fn args(&self) -> Vec<String> {
        vec![
            format!("--election-timeout-ms={}", self.election_timeout_ms),
            format!("--heartbeat-ms={}", self.heartbeat_ms),
            format!("--session-min-ttl-ms={}", self.session_min_ttl_ms),
            format!("--session-max-ttl-ms={}", self.session_max_ttl_ms),
            format!("--snapshot-threshold={}", self.snapshot_threshold),
        ]
    }

    /// Why lockd would refuse these settings at start, if it would: the same
    /// checks as the CRD's rules and lockd's flag validation, for objects
    /// that did not pass through an API server (tests, dry runs).
    pub fn check(&self) -> Result<(), String> {
        if self.heartbeat_ms == 0
            || self.election_timeout_ms.saturating_mul(2) / 5 <= self.heartbeat_ms
        {
            return Err(format!(
                "electionTimeoutMs ({}) must be more than 2.5 x heartbeatMs ({}), and heartbeatMs > 0",
                self.election_timeout_ms, self.heartbeat_ms
            ));
        }
        if self.session_min_ttl_ms == 0 || self.session_max_ttl_ms < self.session_min_ttl_ms {
            return Err(format!(
                "sessionMinTtlMs ({}) must be > 0 and at most sessionMaxTtlMs ({})",
                self.session_min_ttl_ms, self.session_max_ttl_ms
            ));
        }
        if self.snapshot_threshold == 0 {
            return Err("snapshotThreshold must be at least 1".to_string());
        }
        Ok(())
    }
}

/// Extra scheduling and metadata for the member Pods. The operator's own
/// labels (app.kubernetes.io/name, app.kubernetes.io/instance,
/// app.kubernetes.io/managed-by, lockd.dev/node-id) take precedence over
/// labels given here.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Affinity of the member Pods (default: none; consider a pod
    /// anti-affinity on app.kubernetes.io/instance so that members land on
    /// different nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Tolerations of the member Pods (default: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Node selector of the member Pods (default: none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// PriorityClass of the member Pods (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// Extra labels on the member Pods (default: none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,

    /// Extra annotations on the member Pods (default: none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The client Service, named after the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ServiceSpec {
    /// Service type: ClusterIP, NodePort or LoadBalancer (default: ClusterIP).
    #[serde(rename = "type", default)]
    pub type_: ServiceType,
}

/// Type of the client Service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the Kubernetes cluster only.
    #[default]
    #[serde(rename = "ClusterIP")]
    ClusterIp,
    /// Also reachable on a port of every node.
    NodePort,
    /// Also reachable through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The value of a Service's `spec.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn minimal_spec_deserializes_with_defaults() {
        let spec: LockClusterSpec =
            serde_json::from_value(json!({"replicas": 3, "version": "0.1.0"}))
                .expect("minimal spec");
        assert_eq!(spec, LockClusterSpec::new(3, "0.1.0"));
        assert_eq!(spec.storage.size, Quantity("1Gi".into()));
        assert_eq!(spec.storage.storage_class_name, None);
        assert_eq!(spec.storage.retention.when_scaled, RetentionAction::Delete);
        assert_eq!(spec.storage.retention.when_deleted, RetentionAction::Retain);
        assert_eq!(spec.lockd, LockdSettings::default());
        assert_eq!(spec.lockd.election_timeout_ms, 1000);
        assert_eq!(spec.lockd.heartbeat_ms, 100);
        assert_eq!(spec.lockd.session_min_ttl_ms, 1000);
        assert_eq!(spec.lockd.session_max_ttl_ms, 300_000);
        assert_eq!(spec.lockd.snapshot_threshold, 10_000);
        assert_eq!(spec.pod, PodOverrides::default());
        assert_eq!(spec.service.type_, ServiceType::ClusterIp);
        assert_eq!(spec.image(), "ghcr.io/lockd/lockd:0.1.0");
        assert_eq!(spec.quorum(), 2);
        assert!(spec.lockd.check().is_ok());
    }

    #[test]
    fn partial_nested_objects_take_field_defaults() {
        let spec: LockClusterSpec = serde_json::from_value(json!({
            "replicas": 5,
            "version": "0.2.0",
            "image": "registry.example/lockd:dev",
            "storage": {"storageClassName": "fast", "size": null, "retention": {"whenDeleted": "Delete"}},
            "lockd": {"heartbeatMs": 50},
            "service": {"type": "LoadBalancer"}
        }))
        .expect("spec");
        assert_eq!(spec.image(), "registry.example/lockd:dev");
        assert_eq!(spec.storage.size, Quantity("1Gi".into()));
        assert_eq!(spec.storage.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(spec.storage.retention.when_scaled, RetentionAction::Delete);
        assert_eq!(spec.storage.retention.when_deleted, RetentionAction::Delete);
        assert_eq!(spec.lockd.heartbeat_ms, 50);
        assert_eq!(spec.lockd.election_timeout_ms, 1000);
        assert_eq!(spec.service.type_.as_str(), "LoadBalancer");
        assert_eq!(spec.quorum(), 3);

        // int-or-string: the API server accepts a plain integer size.
        let spec: LockClusterSpec = serde_json::from_value(json!({
            "replicas": 1, "version": "0.1.0", "storage": {"size": 1073741824_u64}
        }))
        .expect("integer size");
        assert_eq!(spec.storage.size, Quantity("1073741824".into()));
    }

    #[test]
    fn settings_render_as_lockd_flags() {
        assert_eq!(
            LockdSettings::default().args(),
            [
                "--election-timeout-ms=1000",
                "--heartbeat-ms=100",
                "--session-min-ttl-ms=1000",
                "--session-max-ttl-ms=300000",
                "--snapshot-threshold=10000",
            ]
        );
        let s = LockdSettings {
            election_timeout_ms: 3000,
            heartbeat_ms: 250,
            session_min_ttl_ms: 500,
            session_max_ttl_ms: 60_000,
            snapshot_threshold: 1,
        };
        assert_eq!(
            s.args(),
            [
                "--election-timeout-ms=3000",
                "--heartbeat-ms=250",
                "--session-min-ttl-ms=500",
                "--session-max-ttl-ms=60000",
                "--snapshot-threshold=1",
            ]
        );
    }

    #[test]
    fn settings_check_matches_lockd() {
        let with = |e, h| LockdSettings {
            election_timeout_ms: e,
            heartbeat_ms: h,
            ..LockdSettings::default()
        };
        // lockd: E * 2 / 5 must exceed H, in integers.
        assert!(with(1000, 100).check().is_ok());
        assert!(with(253, 100).check().is_ok());
        assert!(with(252, 100).check().is_err());
        assert!(with(251, 100).check().is_err());
        assert!(with(250, 100).check().is_err());
        assert!(with(400, 500).check().is_err());
        assert!(with(1000, 0).check().is_err());
        let ttl = |min, max| LockdSettings {
            session_min_ttl_ms: min,
            session_max_ttl_ms: max,
            ..LockdSettings::default()
        };
        assert!(ttl(1000, 1000).check().is_ok());
        assert!(ttl(1001, 1000).check().is_err());
        assert!(ttl(0, 1000).check().is_err());
        let snap = LockdSettings {
            snapshot_threshold: 0,
            ..LockdSettings::default()
        };
        assert!(snap.check().is_err());
    }

    #[test]
    fn serde_round_trip() {
        let mut spec = LockClusterSpec::new(7, "0.3.1");
        spec.image = Some("example/lockd:0.3.1".into());
        spec.resources = Some(ResourceRequirements {
            requests: Some(BTreeMap::from([("cpu".into(), Quantity("250m".into()))])),
            ..Default::default()
        });
        spec.storage.size = Quantity("10Gi".into());
        spec.storage.storage_class_name = Some("ssd".into());
        spec.storage.retention.when_scaled = RetentionAction::Retain;
        spec.lockd.snapshot_threshold = 50_000;
        spec.pod.node_selector.insert("disk".into(), "ssd".into());
        spec.pod.tolerations.push(Toleration {
            key: Some("dedicated".into()),
            operator: Some("Exists".into()),
            ..Default::default()
        });
        spec.pod.priority_class_name = Some("system-cluster-critical".into());
        spec.pod.labels.insert("team".into(), "infra".into());
        spec.pod.annotations.insert("note".into(), "x".into());
        spec.service.type_ = ServiceType::NodePort;

        let v = serde_json::to_value(&spec).expect("serialize");
        assert_eq!(v["storage"]["storageClassName"], "ssd");
        assert_eq!(v["storage"]["retention"]["whenScaled"], "Retain");
        assert_eq!(v["lockd"]["snapshotThreshold"], 50_000);
        assert_eq!(v["pod"]["priorityClassName"], "system-cluster-critical");
        assert_eq!(v["service"]["type"], "NodePort");
        let back: LockClusterSpec = serde_json::from_value(v).expect("deserialize");
        assert_eq!(back, spec);

        // The minimal spec serializes without the unset optional fields.
        let v = serde_json::to_value(LockClusterSpec::new(3, "0.1.0")).expect("serialize");
        assert!(v.get("image").is_none() && v.get("resources").is_none());
        assert_eq!(v["pod"], json!({}));
        assert_eq!(v["service"], json!({"type": "ClusterIP"}));
    }

    #[test]
    fn unknown_enum_values_are_rejected() {
        let r = serde_json::from_value::<LockClusterSpec>(json!({
            "replicas": 3, "version": "0.1.0", "service": {"type": "ExternalName"}
        }));
        assert!(r.is_err());
    }
}
