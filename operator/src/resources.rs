//! Pure builders of every Kubernetes object the operator owns for a
//! `LockCluster`: member Pods and their PersistentVolumeClaims, the peer and
//! client Services, the ConfigMap for client applications and the
//! PodDisruptionBudget.
//!
//! Every builder is a pure function of the `LockCluster` (plus, where needed,
//! a node id or a number the planner computed): no client, no clock, no
//! randomness, so the same input always gives the same object and the same
//! fingerprint. The controller sends the objects with server-side apply;
//! k8s-openapi's typed objects always serialize `apiVersion` and `kind` (they
//! come from the type, not from a field), which `Patch::Apply` requires.
//!
//! # Why Pods and not a StatefulSet
//!
//! Each member is one Raft node id, and the id is part of the member's
//! command line (`--id`). Ids are never reused: a member whose volume is lost
//! comes back under a *new* id, and so under a new Pod and PVC name
//! (`{cluster}-{id}`, `data-{cluster}-{id}`). A StatefulSet numbers its Pods
//! 0..n and recreates a lost ordinal under the same name and claim, which is
//! exactly what a Raft member must not do; so the operator creates and deletes
//! member Pods itself, one at a time, as the planner decides.
//!
//! # Ownership
//!
//! Every object carries [`names::common_labels`] (member Pods and PVCs
//! [`names::member_labels`]) and a controller owner reference to the
//! `LockCluster` (`blockOwnerDeletion: true`), so deleting the `LockCluster`
//! garbage-collects them. The one exception is a member PVC under
//! `storage.retention.whenDeleted: Retain` (the default): it has no owner
//! reference, so the data outlives the `LockCluster` (see [`member_pvc`]).
//!
//! # Fingerprints
//!
//! Every built object carries [`SPEC_HASH_ANNOTATION`], the [`spec_hash`] of
//! the object without that annotation. The controller compares it with the
//! annotation of the stored object and skips the write when they are equal,
//! so a cluster in a steady state costs no API writes at all.
//!
//! Separately, [`template_hash`] fingerprints the parts of the spec whose
//! change needs a member restart; it is the planner's `Desired::version` and
//! each member Pod carries it in [`TEMPLATE_HASH_ANNOTATION`]. Pod specs are
//! mostly immutable, so a changed template is rolled out by the planner
//! (delete the Pod, create it again), never by re-applying a running Pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodAffinityTerm, PodAntiAffinity, PodSecurityContext,
    PodSpec, Probe, ResourceRequirements, SeccompProfile, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use lockd_crds::names;
use lockd_crds::{LockCluster, LockClusterSpec, LockdSettings, PodOverrides, RetentionAction};
use serde::Serialize;
use serde_json::Value;

/// Annotation holding the [`spec_hash`] of the object it is on (computed
/// without this annotation). Equal hashes mean the stored object already is
/// what the operator would apply.
pub const SPEC_HASH_ANNOTATION: &str = "lockd.dev/spec-hash";

/// Annotation on member Pods holding the [`template_hash`] of the spec the Pod
/// was built from: the planner's notion of the member's version.
pub const TEMPLATE_HASH_ANNOTATION: &str = "lockd.dev/template-hash";

/// Label on member Pods carrying `spec.version`, for humans and
/// `kubectl get -l` (the planner uses [`TEMPLATE_HASH_ANNOTATION`]).
pub const LABEL_VERSION: &str = "app.kubernetes.io/version";

/// Revision of the member Pod layout built by [`member_pod`], mixed into
/// [`template_hash`]. Bump it when a change to [`member_pod`] must reach
/// running members (new flags, probes, mounts): after an operator upgrade the
/// planner then sees every member as outdated and rolls them one at a time.
pub const POD_TEMPLATE_REVISION: u32 = 1;

/// Port of lockd's gRPC API, for clients and for Raft traffic between
/// members (`--listen`, `--advertise`).
pub const GRPC_PORT: i32 = 7001;
/// Port of lockd's HTTP endpoints `/healthz`, `/readyz` and `/metrics`
/// (`--http-listen`).
pub const HTTP_PORT: i32 = 8080;
/// Name of [`GRPC_PORT`] on the container and the Services.
pub const GRPC_PORT_NAME: &str = "grpc";
/// Name of [`HTTP_PORT`] on the container and the client Service.
pub const HTTP_PORT_NAME: &str = "http";

/// Uid and gid lockd runs as in its image (Dockerfile.lockd).
pub const LOCKD_UID: i64 = 65532;

/// Name of the lockd container in a member Pod.
pub const CONTAINER_NAME: &str = "lockd";
/// Name of the member Pod's data volume (backed by its PVC).
pub const DATA_VOLUME_NAME: &str = "data";
/// Where the data volume is mounted in the container.
pub const DATA_MOUNT_PATH: &str = "/var/lib/lockd";
/// lockd's `--data-dir`: a directory *inside* the volume, not its root, so
/// that whatever the file system keeps at the root of a fresh volume (such as
/// ext4's `lost+found`) never makes the data dir look used.
pub const DATA_DIR: &str = "/var/lib/lockd/data";

/// Seconds a member gets between SIGTERM and SIGKILL: lockd hands leadership
/// over on SIGTERM, which takes a few election timeouts at most.
pub const TERMINATION_GRACE_PERIOD_SECONDS: i64 = 30;

/// Key of the client endpoints in the ConfigMap, the variable lockctl and the
/// client library read.
pub const CONFIG_ENDPOINTS_KEY: &str = "LOCKD_ENDPOINTS";
/// Key of the cluster id in the ConfigMap.
pub const CONFIG_CLUSTER_ID_KEY: &str = "LOCKD_CLUSTER_ID";

/// Node label the default pod anti-affinity spreads members over.
const HOSTNAME_TOPOLOGY_KEY: &str = "kubernetes.io/hostname";

/// Why an object could not be built. Objects read from the API server always
/// have a name, a namespace and a uid; a `LockCluster` made in code may not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The `LockCluster` lacks `metadata.{field}` (or it is empty): owner
    /// references need the name and uid, namespaced objects the namespace.
    #[error("LockCluster has no metadata.{0}: objects can only be built for a LockCluster read from the API server")]
    MissingMetadata(&'static str),
    /// Node id 0 is reserved by lockd; ids start at 1.
    #[error("node id {0} is invalid: lockd node ids start at 1")]
    InvalidNodeId(u64),
}

/// The identity every builder needs, checked once.
struct Owner<'a> {
    name: &'a str,
    namespace: &'a str,
    uid: &'a str,
    owner_ref: OwnerReference,
}

impl<'a> Owner<'a> {
    fn of(lc: &'a LockCluster) -> Result<Self, BuildError> {
        let meta = &lc.metadata;
        let name = non_empty(&meta.name).ok_or(BuildError::MissingMetadata("name"))?;
        let namespace =
            non_empty(&meta.namespace).ok_or(BuildError::MissingMetadata("namespace"))?;
        let uid = non_empty(&meta.uid).ok_or(BuildError::MissingMetadata("uid"))?;
        let owner_ref = lc
            .controller_owner_ref(&())
            .ok_or(BuildError::MissingMetadata("uid"))?;
        Ok(Self {
            name,
            namespace,
            uid,
            owner_ref: OwnerReference {
                block_owner_deletion: Some(true),
                ..owner_ref
            },
        })
    }

    /// Metadata of an object named `name` with `labels`, owned by the
    /// `LockCluster` when `owned`.
    fn meta(&self, name: String, labels: BTreeMap<String, String>, owned: bool) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_string()),
            labels: Some(labels),
            owner_references: owned.then(|| vec![self.owner_ref.clone()]),
            ..ObjectMeta::default()
        }
    }
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// The cluster id every member is started with (`--cluster-id`):
/// `{name}-{uid}`.
///
/// It is stable for the life of the `LockCluster` object, and different for
/// every object ever created: lockd records it in its data dir and refuses a
/// data dir recorded with another id. So a volume retained from an earlier
/// `LockCluster` of the same name is refused instead of silently mixing two
/// clusters' Raft logs.
pub fn cluster_id(lc: &LockCluster) -> Result<String, BuildError> {
    let owner = Owner::of(lc)?;
    Ok(format!("{}-{}", owner.name, owner.uid))
}

/// The parts of the spec baked into a member Pod: everything whose change
/// needs the member to restart.
#[derive(Serialize)]
struct TemplateInput<'a> {
    revision: u32,
    image: String,
    version: &'a str,
    resources: &'a Option<ResourceRequirements>,
    lockd: &'a LockdSettings,
    pod: &'a PodOverrides,
}

/// Fingerprint of everything in `spec` that requires a member restart when
/// changed: the image, the version, the container resources, the lockd
/// settings and the Pod overrides (affinity, tolerations, node selector,
/// priority class, labels, annotations), plus [`POD_TEMPLATE_REVISION`].
///
/// Replicas, storage and the service type are left out on purpose: scaling,
/// volume retention and the client Service never need a running member
/// restarted, and including them would roll the whole cluster for nothing.
///
/// This is the planner's `Desired::version`; each member Pod carries the value
/// it was built with in [`TEMPLATE_HASH_ANNOTATION`]. A 16-digit lowercase
/// hex string.
pub fn template_hash(spec: &LockClusterSpec) -> String {
    spec_hash(&TemplateInput {
        revision: POD_TEMPLATE_REVISION,
        image: spec.image(),
        version: &spec.version,
        resources: &spec.resources,
        lockd: &spec.lockd,
        pod: &spec.pod,
    })
}

/// A stable fingerprint of `obj`: the 64-bit FNV-1a hash, as 16 lowercase hex
/// digits, of its canonical JSON (object keys sorted at every level, no
/// whitespace).
///
/// Sorting the keys makes the hash independent of struct field order and of
/// serde_json's map implementation, so it only changes when the content does.
/// A [`SPEC_HASH_ANNOTATION`] in `metadata.annotations` is left out (and an
/// annotation map left empty by that is dropped), so hashing an object
/// already stamped by a builder gives the same value as its annotation.
///
/// Objects that cannot be represented as JSON (maps with non-string keys;
/// none of the builders' types) all hash to the hash of the serialization
/// error's message; the API server would refuse them anyway.
pub fn spec_hash<T: Serialize>(obj: &T) -> String {
    let text = match serde_json::to_value(obj) {
        Ok(mut value) => {
            strip_spec_hash(&mut value);
            let mut out = String::new();
            write_canonical(&value, &mut out);
            out
        }
        Err(e) => format!("unserializable: {e}"),
    };
    format!("{:016x}", fnv1a64(text.as_bytes()))
}

/// Removes `metadata.annotations[SPEC_HASH_ANNOTATION]`, and the annotations
/// map if that leaves it empty.
fn strip_spec_hash(value: &mut Value) {
    let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let now_empty = match meta.get_mut("annotations").and_then(Value::as_object_mut) {
        Some(annotations) => {
            if annotations.remove(SPEC_HASH_ANNOTATION).is_none() {
                return;
            }
            annotations.is_empty()
        }
        None => false,
    };
    if now_empty {
        meta.remove("annotations");
    }
}

/// Compact JSON with object keys sorted.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        // Scalars have exactly one compact form.
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// 64-bit FNV-1a.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(PRIME)
    })
}

/// Adds [`SPEC_HASH_ANNOTATION`] = [`spec_hash`] of the object as built.
fn stamp<K: Resource + Serialize>(mut obj: K) -> K {
    let hash = spec_hash(&obj);
    obj.meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(SPEC_HASH_ANNOTATION.to_string(), hash);
    obj
}

/// Whether `s` is a valid label value: at most 63 characters of
/// `[A-Za-z0-9._-]`, starting and ending with an alphanumeric (or empty).
fn is_label_value(s: &str) -> bool {
    let bytes = s.as_bytes();
    if bytes.is_empty() {
        return true;
    }
    bytes.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_string(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32, initial_delay: Option<i32>) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(HTTP_PORT_NAME.to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        initial_delay_seconds: initial_delay,
        ..Probe::default()
    }
}

/// The affinity used when `spec.pod.affinity` is unset: *prefer* members of
/// one cluster on different nodes. Preferred, not required, so a cluster
/// still schedules on fewer nodes than members (a laptop, a test cluster).
fn default_affinity(cluster: &str) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(selector(cluster)),
                        topology_key: HOSTNAME_TOPOLOGY_KEY.to_string(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

fn selector(cluster: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(names::selector_labels(cluster)),
        ..LabelSelector::default()
    }
}

fn tcp_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }
}

/// The lockd command-line arguments of member `id` (after the `lockd`
/// command): identity, data dir, addresses, cluster id, then the settings of
/// `spec.lockd` as flags.
///
/// lockd listens on the Pod IP (`$(POD_IP)`, expanded by the kubelet from the
/// container's environment) rather than `0.0.0.0`: that is where the kubelet
/// probes and peers connect anyway, and it lets a test kubelet run several
/// member Pods on one host, each with its own loopback address, without port
/// clashes. Peers reach a member by its stable DNS name under the headless
/// peer Service (`--advertise`), which survives the Pod IP changing when the
/// Pod is recreated.
fn member_args(owner: &Owner<'_>, spec: &LockClusterSpec, id: u64) -> Vec<String> {
    let mut args = vec![
        format!("--id={id}"),
        format!("--data-dir={DATA_DIR}"),
        format!("--listen=$(POD_IP):{GRPC_PORT}"),
        format!("--http-listen=$(POD_IP):{HTTP_PORT}"),
        format!(
            "--advertise={}:{GRPC_PORT}",
            names::member_host(owner.name, owner.namespace, id)
        ),
        format!("--cluster-id={}-{}", owner.name, owner.uid),
    ];
    args.extend(spec.lockd.args());
    args
}

/// The Pod of member `id`: `{cluster}-{id}`, running lockd with `--id={id}`
/// on the PVC `data-{cluster}-{id}`.
///
/// - Labels: [`names::member_labels`] and [`LABEL_VERSION`] over
///   `spec.pod.labels` (the operator's labels win, so a user label can never
///   move a Pod out of the selector or claim another node id). The version
///   label is left out when `spec.version` is not a valid label value (e.g.
///   `1.0.0+build`); it is informational only.
/// - Annotations: `spec.pod.annotations`, [`TEMPLATE_HASH_ANNOTATION`] and
///   [`SPEC_HASH_ANNOTATION`] (the operator's win).
/// - `hostname` `{cluster}-{id}` and `subdomain` `{cluster}-peers` make the
///   Pod resolvable as `{cluster}-{id}.{cluster}-peers.{ns}.svc`, the address
///   it advertises to its peers.
/// - Affinity from `spec.pod.affinity`, else a preferred anti-affinity that
///   spreads members over nodes; tolerations, node selector and priority
///   class from `spec.pod`.
/// - `enableServiceLinks: false` (lockd reads no service variables, and a
///   namespace with many Services would bloat the environment) and
///   `automountServiceAccountToken: false` (lockd never calls the Kubernetes
///   API).
/// - `terminationMessagePolicy: FallbackToLogsOnError`: a member that exits,
///   e.g. refusing a data dir recorded with another cluster id, shows why in
///   the Pod status without anyone reading its logs.
/// - Readiness `/readyz` every 2 s (lockd is ready once it is a member of an
///   initialized cluster); liveness `/healthz` every 10 s, 6 failures, after
///   10 s.
///
/// lockd listens on the Pod IP (`--listen=$(POD_IP):7001`, expanded by the
/// kubelet) rather than `0.0.0.0`, so a test kubelet can run several members
/// on one host, each with its own loopback address; peers use the stable DNS
/// name (`--advertise`), which survives the Pod being recreated with a new IP.
pub fn member_pod(lc: &LockCluster, id: u64) -> Result<Pod, BuildError> {
    let owner = Owner::of(lc)?;
    if id == 0 {
        return Err(BuildError::InvalidNodeId(id));
    }
    let spec = &lc.spec;
    let cluster = owner.name;

    let mut labels = spec.pod.labels.clone();
    labels.extend(names::member_labels(cluster, id));
    if is_label_value(&spec.version) {
        labels.insert(LABEL_VERSION.to_string(), spec.version.clone());
    } else {
        labels.remove(LABEL_VERSION);
    }

    let mut annotations = spec.pod.annotations.clone();
    annotations.remove(SPEC_HASH_ANNOTATION);
    annotations.insert(TEMPLATE_HASH_ANNOTATION.to_string(), template_hash(spec));

    let mut metadata = owner.meta(names::pod_name(cluster, id), labels, true);
    metadata.annotations = Some(annotations);

    let container = Container {
        name: CONTAINER_NAME.to_string(),
        image: Some(spec.image()),
        command: Some(vec!["lockd".to_string()]),
        args: Some(member_args(&owner, spec, id)),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_IP", "status.podIP"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some(GRPC_PORT_NAME.to_string()),
                container_port: GRPC_PORT,
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(HTTP_PORT_NAME.to_string()),
                container_port: HTTP_PORT,
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(http_probe("/readyz", 2, 3, None)),
        liveness_probe: Some(http_probe("/healthz", 10, 6, Some(10))),
        resources: spec.resources.clone(),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        volume_mounts: Some(vec![VolumeMount {
            name: DATA_VOLUME_NAME.to_string(),
            mount_path: DATA_MOUNT_PATH.to_string(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };

    let pod_spec = PodSpec {
        hostname: Some(names::pod_name(cluster, id)),
        subdomain: Some(names::peer_service_name(cluster)),
        restart_policy: Some("Always".to_string()),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_PERIOD_SECONDS),
        enable_service_links: Some(false),
        automount_service_account_token: Some(false),
        // The image runs lockd as uid 65532; a fresh volume's root belongs
        // to root, so the volume is handed to the pod's group.
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(LOCKD_UID),
            run_as_group: Some(LOCKD_UID),
            fs_group: Some(LOCKD_UID),
            fs_group_change_policy: Some("OnRootMismatch".to_string()),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        affinity: Some(
            spec.pod
                .affinity
                .clone()
                .unwrap_or_else(|| default_affinity(cluster)),
        ),
        tolerations: (!spec.pod.tolerations.is_empty()).then(|| spec.pod.tolerations.clone()),
        node_selector: (!spec.pod.node_selector.is_empty()).then(|| spec.pod.node_selector.clone()),
        priority_class_name: spec.pod.priority_class_name.clone(),
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: DATA_VOLUME_NAME.to_string(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: names::pvc_name(cluster, id),
                ..PersistentVolumeClaimVolumeSource::default()
            }),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    };

    Ok(stamp(Pod {
        metadata,
        spec: Some(pod_spec),
        ..Pod::default()
    }))
}

/// The data PVC of member `id`: `data-{cluster}-{id}`, ReadWriteOnce,
/// requesting `spec.storage.size` from `spec.storage.storageClassName` (the
/// default StorageClass when unset).
///
/// The PVC has an owner reference to the `LockCluster` **only** when
/// `spec.storage.retention.whenDeleted` is `Delete`: then Kubernetes'
/// garbage collector deletes it together with the `LockCluster`. Under
/// `Retain` it has no owner, so deleting the `LockCluster` leaves the volume
/// and its data behind (a new `LockCluster` of the same name gets a new
/// cluster id and does not reuse it; see [`cluster_id`]). Volumes of members
/// removed while the cluster lives are deleted by the operator itself,
/// following `whenScaled`.
///
/// Most of a PVC's spec is immutable once created (only a larger size may be
/// applied, where the StorageClass allows expansion).
pub fn member_pvc(lc: &LockCluster, id: u64) -> Result<PersistentVolumeClaim, BuildError> {
    let owner = Owner::of(lc)?;
    if id == 0 {
        return Err(BuildError::InvalidNodeId(id));
    }
    let storage = &lc.spec.storage;
    let owned = storage.retention.when_deleted == RetentionAction::Delete;
    Ok(stamp(PersistentVolumeClaim {
        metadata: owner.meta(
            names::pvc_name(owner.name, id),
            names::member_labels(owner.name, id),
            owned,
        ),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    storage.size.clone(),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            storage_class_name: storage.storage_class_name.clone(),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }))
}

/// The owner references member volume `pvc` should carry when they differ
/// from its current ones: its other owners unchanged, the LockCluster's
/// controller reference present exactly while `whenDeleted: Delete` (so the
/// garbage collector deletes the volume with the LockCluster) and absent
/// under `Retain`. `None` when the volume is already so. Volumes are owned
/// at creation; this keeps them in step when `whenDeleted` changes later.
pub fn volume_owner_references(
    lc: &LockCluster,
    pvc: &PersistentVolumeClaim,
) -> Result<Option<Vec<OwnerReference>>, BuildError> {
    let owner = Owner::of(lc)?;
    let current = pvc.metadata.owner_references.clone().unwrap_or_default();
    let ours = |r: &OwnerReference| r.uid == owner.owner_ref.uid;
    let want_owned = lc.spec.storage.retention.when_deleted == RetentionAction::Delete;
    if current.iter().any(ours) == want_owned {
        return Ok(None);
    }
    let mut refs: Vec<OwnerReference> = current.into_iter().filter(|r| !ours(r)).collect();
    if want_owned {
        refs.push(owner.owner_ref.clone());
    }
    Ok(Some(refs))
}

/// The headless Service `{cluster}-peers` that gives each member its DNS name
/// `{cluster}-{id}.{cluster}-peers.{ns}.svc` (through the Pods' `hostname`
/// and `subdomain`).
///
/// `clusterIP: None` because peers address members individually, never
/// through a load-balanced IP; `publishNotReadyAddresses: true` because a
/// member only turns ready once it belongs to an initialized cluster, and it
/// must be resolvable by its peers before that to join at all.
pub fn peer_service(lc: &LockCluster) -> Result<Service, BuildError> {
    let owner = Owner::of(lc)?;
    Ok(stamp(Service {
        metadata: owner.meta(
            names::peer_service_name(owner.name),
            names::common_labels(owner.name),
            true,
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some(names::selector_labels(owner.name)),
            ports: Some(vec![tcp_port(GRPC_PORT_NAME, GRPC_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }))
}

/// The client Service `{cluster}`, of type `spec.service.type`, over the
/// ready members only: gRPC on [`GRPC_PORT`] for clients (lockd forwards or
/// redirects to the leader as needed) and HTTP on [`HTTP_PORT`] for metrics
/// scraping.
pub fn client_service(lc: &LockCluster) -> Result<Service, BuildError> {
    let owner = Owner::of(lc)?;
    Ok(stamp(Service {
        metadata: owner.meta(
            names::client_service_name(owner.name),
            names::common_labels(owner.name),
            true,
        ),
        spec: Some(ServiceSpec {
            type_: Some(lc.spec.service.type_.as_str().to_string()),
            selector: Some(names::selector_labels(owner.name)),
            ports: Some(vec![
                tcp_port(GRPC_PORT_NAME, GRPC_PORT),
                tcp_port(HTTP_PORT_NAME, HTTP_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }))
}

/// The ConfigMap `{cluster}-config`, for client applications to `envFrom`:
/// [`CONFIG_ENDPOINTS_KEY`] = `{cluster}.{ns}.svc:7001` (the client Service,
/// in the form lockctl and the client library read) and
/// [`CONFIG_CLUSTER_ID_KEY`] = the [`cluster_id`].
pub fn config_map(lc: &LockCluster) -> Result<ConfigMap, BuildError> {
    let owner = Owner::of(lc)?;
    let endpoints = format!(
        "{}.{}.svc:{GRPC_PORT}",
        names::client_service_name(owner.name),
        owner.namespace
    );
    Ok(stamp(ConfigMap {
        metadata: owner.meta(
            names::config_map_name(owner.name),
            names::common_labels(owner.name),
            true,
        ),
        data: Some(BTreeMap::from([
            (CONFIG_ENDPOINTS_KEY.to_string(), endpoints),
            (
                CONFIG_CLUSTER_ID_KEY.to_string(),
                format!("{}-{}", owner.name, owner.uid),
            ),
        ])),
        ..ConfigMap::default()
    }))
}

/// The PodDisruptionBudget `{cluster}` (policy/v1) over every member Pod,
/// with `minAvailable` = `min_available`: the planner's
/// `Plan::pdb_min_available`, which only allows as many voluntary evictions
/// as the cluster tolerates failures right now (none while anything is
/// unsettled). Values beyond `i32::MAX` are clamped.
pub fn pdb(lc: &LockCluster, min_available: u32) -> Result<PodDisruptionBudget, BuildError> {
    let owner = Owner::of(lc)?;
    let min_available = i32::try_from(min_available).unwrap_or(i32::MAX);
    Ok(stamp(PodDisruptionBudget {
        metadata: owner.meta(
            names::pdb_name(owner.name),
            names::common_labels(owner.name),
            true,
        ),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(min_available)),
            selector: Some(selector(owner.name)),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAffinity, Toleration};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use lockd_crds::ServiceType;

    const UID: &str = "0b7e4a52-1f0c-4c55-9a3e-3f1c2d4e5f60";

    fn cluster(spec: LockClusterSpec) -> LockCluster {
        let mut lc = LockCluster::new("demo", spec);
        lc.metadata.namespace = Some("ns".to_string());
        lc.metadata.uid = Some(UID.to_string());
        lc
    }

    fn demo() -> LockCluster {
        cluster(LockClusterSpec::new(3, "0.1.0"))
    }

    fn container(pod: &Pod) -> &Container {
        &pod.spec.as_ref().expect("pod spec").containers[0]
    }

    fn args(pod: &Pod) -> Vec<String> {
        container(pod).args.clone().expect("args")
    }

    fn assert_owned(meta: &ObjectMeta) {
        let refs = meta.owner_references.as_ref().expect("owner references");
        assert_eq!(refs.len(), 1);
        let r = &refs[0];
        assert_eq!(r.api_version, "lockd.dev/v1alpha1");
        assert_eq!(r.kind, "LockCluster");
        assert_eq!(r.name, "demo");
        assert_eq!(r.uid, UID);
        assert_eq!(r.controller, Some(true));
        assert_eq!(r.block_owner_deletion, Some(true));
    }

    fn assert_stamped<K: Resource + Serialize>(obj: &K) {
        let annotations = obj.meta().annotations.as_ref().expect("annotations");
        assert_eq!(annotations[SPEC_HASH_ANNOTATION], spec_hash(obj));
    }

    #[test]
    fn cluster_id_is_name_and_uid() {
        assert_eq!(cluster_id(&demo()).expect("id"), format!("demo-{UID}"));
    }

    #[test]
    fn missing_metadata_is_an_error_not_a_panic() {
        let mut lc = demo();
        lc.metadata.uid = None;
        assert_eq!(cluster_id(&lc), Err(BuildError::MissingMetadata("uid")));
        assert_eq!(
            member_pod(&lc, 1).err(),
            Some(BuildError::MissingMetadata("uid"))
        );
        assert!(member_pvc(&lc, 1).is_err());
        assert!(peer_service(&lc).is_err());
        assert!(client_service(&lc).is_err());
        assert!(config_map(&lc).is_err());
        assert!(pdb(&lc, 2).is_err());

        let mut lc = demo();
        lc.metadata.namespace = None;
        assert_eq!(
            peer_service(&lc).err(),
            Some(BuildError::MissingMetadata("namespace"))
        );
        let mut lc = demo();
        lc.metadata.uid = Some(String::new());
        assert_eq!(
            config_map(&lc).err(),
            Some(BuildError::MissingMetadata("uid"))
        );
        let mut lc = demo();
        lc.metadata.name = None;
        let err = pdb(&lc, 2).expect_err("no name");
        assert_eq!(err, BuildError::MissingMetadata("name"));
        assert!(err.to_string().contains("metadata.name"));

        assert_eq!(
            member_pod(&demo(), 0).err(),
            Some(BuildError::InvalidNodeId(0))
        );
        assert!(member_pvc(&demo(), 0).is_err());
    }

    #[test]
    fn member_pod_names_labels_and_owner() {
        let pod = member_pod(&demo(), 4).expect("pod");
        let meta = &pod.metadata;
        assert_eq!(meta.name.as_deref(), Some("demo-4"));
        assert_eq!(meta.namespace.as_deref(), Some("ns"));
        let labels = meta.labels.as_ref().expect("labels");
        for (k, v) in names::member_labels("demo", 4) {
            assert_eq!(labels[&k], v);
        }
        assert_eq!(labels[LABEL_VERSION], "0.1.0");
        assert_owned(meta);
        assert_stamped(&pod);
        let annotations = meta.annotations.as_ref().expect("annotations");
        assert_eq!(
            annotations[TEMPLATE_HASH_ANNOTATION],
            template_hash(&demo().spec)
        );

        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.hostname.as_deref(), Some("demo-4"));
        assert_eq!(spec.subdomain.as_deref(), Some("demo-peers"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        assert_eq!(spec.termination_grace_period_seconds, Some(30));
        assert_eq!(spec.enable_service_links, Some(false));
        assert_eq!(spec.containers.len(), 1);
        let volumes = spec.volumes.as_ref().expect("volumes");
        assert_eq!(volumes.len(), 1);
        assert_eq!(volumes[0].name, DATA_VOLUME_NAME);
        assert_eq!(
            volumes[0]
                .persistent_volume_claim
                .as_ref()
                .expect("pvc source")
                .claim_name,
            "data-demo-4"
        );
        // Default affinity: prefer spreading this cluster's members over nodes.
        let anti = spec
            .affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .expect("default anti-affinity");
        assert_eq!(
            anti[0].pod_affinity_term.topology_key,
            "kubernetes.io/hostname"
        );
        assert_eq!(
            anti[0].pod_affinity_term.label_selector,
            Some(selector("demo"))
        );
    }

    #[test]
    fn member_container() {
        let pod = member_pod(&demo(), 4).expect("pod");
        let c = container(&pod);
        assert_eq!(c.name, "lockd");
        assert_eq!(c.image.as_deref(), Some("ghcr.io/lockd/lockd:0.1.0"));
        assert_eq!(c.command, Some(vec!["lockd".to_string()]));
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        let env = c.env.as_ref().expect("env");
        let field = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value_from.as_ref())
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.clone())
        };
        assert_eq!(field("POD_IP").as_deref(), Some("status.podIP"));
        assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));
        assert_eq!(
            field("POD_NAMESPACE").as_deref(),
            Some("metadata.namespace")
        );

        let ports = c.ports.as_ref().expect("ports");
        let port = |name: &str| {
            ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port)
        };
        assert_eq!(port("grpc"), Some(7001));
        assert_eq!(port("http"), Some(8080));

        let readiness = c.readiness_probe.as_ref().expect("readiness");
        let get = readiness.http_get.as_ref().expect("http get");
        assert_eq!(get.path.as_deref(), Some("/readyz"));
        assert_eq!(get.port, IntOrString::String("http".into()));
        assert_eq!(readiness.period_seconds, Some(2));
        assert_eq!(readiness.failure_threshold, Some(3));
        let liveness = c.liveness_probe.as_ref().expect("liveness");
        let get = liveness.http_get.as_ref().expect("http get");
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        assert_eq!(liveness.period_seconds, Some(10));
        assert_eq!(liveness.failure_threshold, Some(6));
        assert_eq!(liveness.initial_delay_seconds, Some(10));

        let mounts = c.volume_mounts.as_ref().expect("mounts");
        assert_eq!(mounts[0].name, "data");
        assert_eq!(mounts[0].mount_path, "/var/lib/lockd");
        assert!(DATA_DIR.starts_with(DATA_MOUNT_PATH));
        assert_eq!(c.resources, None);
    }

    #[test]
    fn member_args_carry_identity_addresses_and_settings() {
        let mut spec = LockClusterSpec::new(3, "0.1.0");
        spec.lockd.heartbeat_ms = 50;
        spec.lockd.snapshot_threshold = 77;
        let pod = member_pod(&cluster(spec.clone()), 4).expect("pod");
        let args = args(&pod);
        let mut expected = vec![
            "--id=4".to_string(),
            "--data-dir=/var/lib/lockd/data".to_string(),
            "--listen=$(POD_IP):7001".to_string(),
            "--http-listen=$(POD_IP):8080".to_string(),
            "--advertise=demo-4.demo-peers.ns.svc:7001".to_string(),
            format!("--cluster-id=demo-{UID}"),
        ];
        expected.extend(spec.lockd.args());
        assert_eq!(args, expected);
        assert!(args.contains(&"--heartbeat-ms=50".to_string()));
        assert!(args.contains(&"--snapshot-threshold=77".to_string()));
        // The cluster id flag and the ConfigMap agree with cluster_id().
        let id = cluster_id(&cluster(spec)).expect("id");
        assert!(args.contains(&format!("--cluster-id={id}")));
    }

    #[test]
    fn pod_overrides_apply_but_cannot_override_operator_labels() {
        let mut spec = LockClusterSpec::new(3, "0.1.0");
        spec.pod.labels = BTreeMap::from([
            ("team".to_string(), "infra".to_string()),
            (names::LABEL_INSTANCE.to_string(), "other".to_string()),
            (names::LABEL_NODE_ID.to_string(), "99".to_string()),
            (names::LABEL_MANAGED_BY.to_string(), "me".to_string()),
            (LABEL_VERSION.to_string(), "9.9.9".to_string()),
        ]);
        spec.pod.annotations = BTreeMap::from([
            ("note".to_string(), "x".to_string()),
            (TEMPLATE_HASH_ANNOTATION.to_string(), "forged".to_string()),
            (SPEC_HASH_ANNOTATION.to_string(), "forged".to_string()),
        ]);
        spec.pod.node_selector = BTreeMap::from([("disk".to_string(), "ssd".to_string())]);
        spec.pod.tolerations = vec![Toleration {
            key: Some("dedicated".to_string()),
            operator: Some("Exists".to_string()),
            ..Toleration::default()
        }];
        spec.pod.priority_class_name = Some("high".to_string());
        let affinity = Affinity {
            node_affinity: Some(NodeAffinity::default()),
            ..Affinity::default()
        };
        spec.pod.affinity = Some(affinity.clone());
        spec.resources = Some(ResourceRequirements {
            requests: Some(BTreeMap::from([(
                "cpu".to_string(),
                Quantity("250m".to_string()),
            )])),
            ..ResourceRequirements::default()
        });

        let lc = cluster(spec.clone());
        let pod = member_pod(&lc, 2).expect("pod");
        let labels = pod.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels["team"], "infra");
        assert_eq!(labels[names::LABEL_INSTANCE], "demo");
        assert_eq!(labels[names::LABEL_NODE_ID], "2");
        assert_eq!(labels[names::LABEL_MANAGED_BY], "lockd-operator");
        assert_eq!(labels[LABEL_VERSION], "0.1.0");
        let annotations = pod.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(annotations["note"], "x");
        assert_eq!(annotations[TEMPLATE_HASH_ANNOTATION], template_hash(&spec));
        assert_stamped(&pod);

        let ps = pod.spec.as_ref().expect("spec");
        assert_eq!(ps.affinity, Some(affinity));
        assert_eq!(ps.tolerations, Some(spec.pod.tolerations.clone()));
        assert_eq!(ps.node_selector, Some(spec.pod.node_selector.clone()));
        assert_eq!(ps.priority_class_name.as_deref(), Some("high"));
        assert_eq!(container(&pod).resources, spec.resources);
    }

    #[test]
    fn version_label_is_omitted_when_not_a_label_value() {
        let pod = member_pod(&cluster(LockClusterSpec::new(1, "1.0.0+build.5")), 1).expect("pod");
        let labels = pod.metadata.labels.as_ref().expect("labels");
        assert!(!labels.contains_key(LABEL_VERSION));
        assert!(is_label_value("v0.2.0-rc.1"));
        assert!(!is_label_value("-x"));
        assert!(!is_label_value(&"a".repeat(64)));
    }

    #[test]
    fn image_override() {
        let mut spec = LockClusterSpec::new(3, "0.1.0");
        spec.image = Some("registry.example/lockd:dev".to_string());
        let pod = member_pod(&cluster(spec), 1).expect("pod");
        assert_eq!(
            container(&pod).image.as_deref(),
            Some("registry.example/lockd:dev")
        );
    }

    #[test]
    fn template_hash_tracks_restart_relevant_fields_only() {
        let base = LockClusterSpec::new(3, "0.1.0");
        let h = template_hash(&base);
        assert_eq!(h.len(), 16);
        assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(h, template_hash(&base.clone()));

        let changed: Vec<(&str, LockClusterSpec)> = vec![
            ("version", LockClusterSpec::new(3, "0.2.0")),
            ("image", {
                let mut s = base.clone();
                s.image = Some("example/lockd:0.1.0".into());
                s
            }),
            ("resources", {
                let mut s = base.clone();
                s.resources = Some(ResourceRequirements {
                    limits: Some(BTreeMap::from([("memory".into(), Quantity("1Gi".into()))])),
                    ..ResourceRequirements::default()
                });
                s
            }),
            ("settings", {
                let mut s = base.clone();
                s.lockd.election_timeout_ms = 2000;
                s
            }),
            ("affinity", {
                let mut s = base.clone();
                s.pod.affinity = Some(Affinity::default());
                s
            }),
            ("tolerations", {
                let mut s = base.clone();
                s.pod.tolerations.push(Toleration::default());
                s
            }),
            ("nodeSelector", {
                let mut s = base.clone();
                s.pod.node_selector.insert("a".into(), "b".into());
                s
            }),
            ("priorityClassName", {
                let mut s = base.clone();
                s.pod.priority_class_name = Some("p".into());
                s
            }),
            ("labels", {
                let mut s = base.clone();
                s.pod.labels.insert("a".into(), "b".into());
                s
            }),
            ("annotations", {
                let mut s = base.clone();
                s.pod.annotations.insert("a".into(), "b".into());
                s
            }),
        ];
        for (what, spec) in &changed {
            assert_ne!(
                template_hash(spec),
                h,
                "{what} must change the template hash"
            );
        }

        let unchanged: Vec<(&str, LockClusterSpec)> = vec![
            ("replicas", LockClusterSpec::new(5, "0.1.0")),
            ("retention", {
                let mut s = base.clone();
                s.storage.retention.when_deleted = RetentionAction::Delete;
                s.storage.retention.when_scaled = RetentionAction::Retain;
                s
            }),
            ("storage size", {
                let mut s = base.clone();
                s.storage.size = Quantity("10Gi".into());
                s
            }),
            ("service type", {
                let mut s = base.clone();
                s.service.type_ = ServiceType::LoadBalancer;
                s
            }),
            ("image equal to the default", {
                let mut s = base.clone();
                s.image = Some(base.image());
                s
            }),
        ];
        for (what, spec) in &unchanged {
            assert_eq!(
                template_hash(spec),
                h,
                "{what} must not change the template hash"
            );
        }
    }

    #[test]
    fn spec_hash_is_stable_and_content_sensitive() {
        let a = member_pod(&demo(), 1).expect("pod");
        let b = member_pod(&demo(), 1).expect("pod");
        assert_eq!(spec_hash(&a), spec_hash(&b));
        assert_eq!(a, b);
        let c = member_pod(&demo(), 2).expect("pod");
        assert_ne!(spec_hash(&a), spec_hash(&c));

        // Key order does not matter; content does.
        let x = serde_json::json!({"a": 1, "b": {"c": [1, 2], "d": "e"}});
        let y: Value = serde_json::from_str(r#"{"b":{"d":"e","c":[1,2]},"a":1}"#).expect("json");
        assert_eq!(spec_hash(&x), spec_hash(&y));
        assert_ne!(spec_hash(&x), spec_hash(&serde_json::json!({"a": 2})));
        // Known FNV-1a 64 vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);

        // Hashing ignores the spec-hash annotation itself.
        let mut stamped = a.clone();
        stamped
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(SPEC_HASH_ANNOTATION.into(), "something else".into());
        assert_eq!(spec_hash(&stamped), spec_hash(&a));
        let cm = config_map(&demo()).expect("cm");
        let mut bare = cm.clone();
        bare.metadata.annotations = None;
        assert_eq!(spec_hash(&bare), spec_hash(&cm));
    }

    #[test]
    fn pvc_owner_ref_only_when_deleted_with_cluster() {
        let pvc = member_pvc(&demo(), 3).expect("pvc");
        assert_eq!(pvc.metadata.name.as_deref(), Some("data-demo-3"));
        assert_eq!(pvc.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(pvc.metadata.labels, Some(names::member_labels("demo", 3)));
        assert_eq!(pvc.metadata.owner_references, None, "Retain is the default");
        assert_stamped(&pvc);
        let spec = pvc.spec.as_ref().expect("spec");
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
        assert_eq!(spec.storage_class_name, None);
        let requests = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .expect("requests");
        assert_eq!(requests["storage"], Quantity("1Gi".into()));

        let mut s = LockClusterSpec::new(3, "0.1.0");
        s.storage.retention.when_deleted = RetentionAction::Delete;
        s.storage.storage_class_name = Some("fast".into());
        s.storage.size = Quantity("5Gi".into());
        let pvc = member_pvc(&cluster(s), 3).expect("pvc");
        assert_owned(&pvc.metadata);
        let spec = pvc.spec.as_ref().expect("spec");
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            spec.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .expect("requests")["storage"],
            Quantity("5Gi".into())
        );
    }

    #[test]
    fn volume_owner_references_follow_when_deleted() {
        let mut lc = demo();
        lc.spec.storage.retention.when_deleted = RetentionAction::Retain;
        let retained = member_pvc(&lc, 1).expect("pvc");
        assert_eq!(volume_owner_references(&lc, &retained).expect("refs"), None);

        // Retain -> Delete: the LockCluster becomes the controller owner,
        // beside an owner someone else added.
        let mut other = retained.clone();
        let foreign = OwnerReference {
            api_version: "example.com/v1".into(),
            kind: "Backup".into(),
            name: "nightly".into(),
            uid: "backup-uid".into(),
            ..OwnerReference::default()
        };
        other.metadata.owner_references = Some(vec![foreign.clone()]);
        lc.spec.storage.retention.when_deleted = RetentionAction::Delete;
        let refs = volume_owner_references(&lc, &other)
            .expect("refs")
            .expect("a change");
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0], foreign);
        assert_eq!(refs[1].uid, lc.metadata.uid.clone().expect("uid"));
        assert_eq!(refs[1].controller, Some(true));
        assert_eq!(refs[1].block_owner_deletion, Some(true));

        // Created under Delete: nothing to change; back to Retain: ours go.
        let owned = member_pvc(&lc, 1).expect("pvc");
        assert_eq!(volume_owner_references(&lc, &owned).expect("refs"), None);
        lc.spec.storage.retention.when_deleted = RetentionAction::Retain;
        assert_eq!(
            volume_owner_references(&lc, &owned).expect("refs"),
            Some(vec![])
        );
    }

    #[test]
    fn peer_service_is_headless_and_publishes_unready_members() {
        let svc = peer_service(&demo()).expect("svc");
        assert_eq!(svc.metadata.name.as_deref(), Some("demo-peers"));
        assert_eq!(svc.metadata.labels, Some(names::common_labels("demo")));
        assert_owned(&svc.metadata);
        assert_stamped(&svc);
        let spec = svc.spec.as_ref().expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector, Some(names::selector_labels("demo")));
        assert_eq!(spec.type_, None);
        let ports = spec.ports.as_ref().expect("ports");
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].name.as_deref(), Some("grpc"));
        assert_eq!(ports[0].port, 7001);
        assert_eq!(
            ports[0].target_port,
            Some(IntOrString::String("grpc".into()))
        );
    }

    #[test]
    fn client_service_type_and_ports() {
        let svc = client_service(&demo()).expect("svc");
        assert_eq!(svc.metadata.name.as_deref(), Some("demo"));
        assert_owned(&svc.metadata);
        assert_stamped(&svc);
        let spec = svc.spec.as_ref().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.cluster_ip, None);
        assert_eq!(spec.publish_not_ready_addresses, None);
        assert_eq!(spec.selector, Some(names::selector_labels("demo")));
        let ports: Vec<(Option<&str>, i32)> = spec
            .ports
            .as_ref()
            .expect("ports")
            .iter()
            .map(|p| (p.name.as_deref(), p.port))
            .collect();
        assert_eq!(ports, [(Some("grpc"), 7001), (Some("http"), 8080)]);

        let mut s = LockClusterSpec::new(3, "0.1.0");
        s.service.type_ = ServiceType::NodePort;
        let svc = client_service(&cluster(s)).expect("svc");
        assert_eq!(
            svc.spec.as_ref().and_then(|s| s.type_.as_deref()),
            Some("NodePort")
        );
    }

    #[test]
    fn config_map_for_clients() {
        let cm = config_map(&demo()).expect("cm");
        assert_eq!(cm.metadata.name.as_deref(), Some("demo-config"));
        assert_owned(&cm.metadata);
        assert_stamped(&cm);
        let data = cm.data.as_ref().expect("data");
        assert_eq!(data["LOCKD_ENDPOINTS"], "demo.ns.svc:7001");
        assert_eq!(data["LOCKD_CLUSTER_ID"], format!("demo-{UID}"));
        assert_eq!(data.len(), 2);
    }

    #[test]
    fn pdb_min_available_and_selector() {
        let p = pdb(&demo(), 2).expect("pdb");
        assert_eq!(p.metadata.name.as_deref(), Some("demo"));
        assert_owned(&p.metadata);
        assert_stamped(&p);
        let spec = p.spec.as_ref().expect("spec");
        assert_eq!(spec.min_available, Some(IntOrString::Int(2)));
        assert_eq!(spec.max_unavailable, None);
        assert_eq!(spec.selector, Some(selector("demo")));
        assert_ne!(spec_hash(&p), spec_hash(&pdb(&demo(), 3).expect("pdb")));
        let big = pdb(&demo(), u32::MAX).expect("pdb");
        assert_eq!(
            big.spec.and_then(|s| s.min_available),
            Some(IntOrString::Int(i32::MAX))
        );
    }

    #[test]
    fn serialized_objects_carry_api_version_and_kind() {
        let lc = demo();
        let cases: Vec<(Value, &str, &str)> = vec![
            (
                serde_json::to_value(member_pod(&lc, 1).expect("pod")).expect("json"),
                "v1",
                "Pod",
            ),
            (
                serde_json::to_value(member_pvc(&lc, 1).expect("pvc")).expect("json"),
                "v1",
                "PersistentVolumeClaim",
            ),
            (
                serde_json::to_value(peer_service(&lc).expect("svc")).expect("json"),
                "v1",
                "Service",
            ),
            (
                serde_json::to_value(client_service(&lc).expect("svc")).expect("json"),
                "v1",
                "Service",
            ),
            (
                serde_json::to_value(config_map(&lc).expect("cm")).expect("json"),
                "v1",
                "ConfigMap",
            ),
            (
                serde_json::to_value(pdb(&lc, 2).expect("pdb")).expect("json"),
                "policy/v1",
                "PodDisruptionBudget",
            ),
        ];
        for (json, api_version, kind) in cases {
            assert_eq!(json["apiVersion"], api_version, "{json}");
            assert_eq!(json["kind"], kind, "{json}");
            assert_eq!(json["metadata"]["namespace"], "ns");
            assert!(json.get("status").is_none(), "no status in an apply body");
        }

        // Spot-check the wire names of a few fields that matter.
        let pod = serde_json::to_value(member_pod(&lc, 1).expect("pod")).expect("json");
        assert_eq!(pod["spec"]["enableServiceLinks"], false);
        assert_eq!(pod["spec"]["subdomain"], "demo-peers");
        assert_eq!(
            pod["metadata"]["ownerReferences"][0]["blockOwnerDeletion"],
            true
        );
        let svc = serde_json::to_value(peer_service(&lc).expect("svc")).expect("json");
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(svc["spec"]["publishNotReadyAddresses"], true);
    }
}
