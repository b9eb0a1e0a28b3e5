//! The LockCluster controller: observe -> plan -> act, once per pass.
//!
//! - **Observe**: the members' pods and volumes (by label), and each running
//!   member's `lockd.v1.Cluster/Status` at its pod IP. The leader's status
//!   gives the Raft membership and replication lag.
//! - **Plan**: [`crate::plan::plan`], a pure function.
//! - **Act**: first the owned singletons (services, config map and the
//!   quorum-aware PodDisruptionBudget, so the budget is tightened *before*
//!   any member is restarted), then the plan's actions in order: pod and
//!   volume calls to Kubernetes, membership calls to lockd. Every action is
//!   recorded as an Event on the LockCluster; the status and conditions are
//!   written every pass (only when they changed).
//!
//! Writes are skipped when nothing changed: an owned object is applied only
//! when its `lockd.dev/spec-hash` annotation differs from the desired one,
//! and the status only when it differs from the stored one. A cluster at
//! rest therefore costs reads only.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use lockd_crds::names;
use lockd_crds::{
    conditions, LockCluster, LockClusterPhase, LockClusterStatus, MemberRole, MemberStatus,
    RetentionAction,
};
use lockd_proto::v1::StatusResponse;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use crate::plan::{self, Action, Desired, Observed, ObservedMember, PodState};
use crate::resources;

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "lockd-operator";
/// Log entries a member may trail the leader by and still count as caught
/// up (promotion, and the health check before each restart).
pub const CAUGHT_UP_LAG: u64 = 100;
/// Next pass while the plan is acting (each step is observed before the next).
pub const REQUEUE_ACTIVE: Duration = Duration::from_secs(2);
/// Next pass at rest: catches lockd-side changes that no watch reports.
pub const REQUEUE_IDLE: Duration = Duration::from_secs(30);
/// Label on a volume kept after its member was removed (retention Retain).
pub const RETIRED_LABEL: &str = "lockd.dev/retired";
/// Timeout of one member status probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An owned object could not be built from the spec.
    #[error("building objects: {0}")]
    Build(#[from] resources::BuildError),
    /// A lockd admin call failed.
    #[error("lockd: {0}")]
    Lockd(String),
    /// The LockCluster lacks something every stored object has.
    #[error("LockCluster has no {0}")]
    Incomplete(&'static str),
}

/// Where each member is reached: its admin endpoint (pod IP) and the
/// address peers know it by (headless-service DNS name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    /// Node id -> `host:port` the operator dials (the pod IP).
    pub endpoints: BTreeMap<u64, String>,
    /// Node id -> `host:port` the member advertises to its peers.
    pub advertise: BTreeMap<u64, String>,
}

/// The lockd side of observe and act, behind a trait so controller tests
/// can script members without processes.
#[tonic::async_trait]
pub trait Lockd: Send + Sync + 'static {
    /// `Cluster/Status` of the member at `endpoint`; None if unreachable.
    async fn status(&self, endpoint: &str) -> Option<StatusResponse>;
    /// Runs one membership action (Initialize, AddLearner, ChangeVoters,
    /// RemoveMember, TransferLeader).
    async fn act(&self, action: &Action, targets: &Targets) -> Result<(), String>;
}

/// [`Lockd`] over gRPC: `Cluster/Status` probes and membership calls
/// through [`crate::lockd_admin`].
#[derive(Debug, Clone)]
pub struct GrpcLockd {
    probe_timeout: Duration,
    /// Bound on one membership call (a change waits for its commit, a
    /// transfer for the new leader).
    call_timeout: Duration,
}

impl GrpcLockd {
    /// Probes time out after `probe_timeout`; membership calls after 30 s.
    pub fn new(probe_timeout: Duration) -> GrpcLockd {
        GrpcLockd {
            probe_timeout,
            call_timeout: Duration::from_secs(30),
        }
    }
}

#[tonic::async_trait]
impl Lockd for GrpcLockd {
    async fn status(&self, endpoint: &str) -> Option<StatusResponse> {
        crate::lockd_admin::probe(endpoint, self.probe_timeout).await
    }

    async fn act(&self, action: &Action, targets: &Targets) -> Result<(), String> {
        let admin = crate::lockd_admin::Admin::new(targets.endpoints.clone(), self.call_timeout);
        admin
            .execute(action, |id| targets.advertise.get(&id).cloned())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Shared state of the controller's passes.
pub struct Context {
    /// Kubernetes client.
    pub client: kube::Client,
    /// lockd access.
    pub lockd: Arc<dyn Lockd>,
    /// Event recorder (None: events are not published).
    pub recorder: Option<Recorder>,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Retry delays after failed passes.
    pub backoff: Backoff,
}

/// What one pass observed.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Member pods by node id.
    pub pods: BTreeMap<u64, Pod>,
    /// Member volumes by node id.
    pub pvcs: BTreeMap<u64, PersistentVolumeClaim>,
    /// Answers to `Cluster/Status` by node id.
    pub statuses: BTreeMap<u64, StatusResponse>,
}

/// One reconcile pass for `lc`.
pub async fn reconcile(lc: Arc<LockCluster>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let span = tracing::info_span!(
        "reconcile",
        cluster = %lc.name_any(),
        namespace = %lc.namespace().unwrap_or_default()
    );
    let (metrics, key) = (ctx.metrics.clone(), backoff_key(&lc));
    let r = reconcile_pass(lc, ctx.clone()).instrument(span).await;
    metrics.reconciled(r.is_ok());
    if r.is_ok() {
        ctx.backoff.succeeded(&key);
    }
    r
}

async fn reconcile_pass(lc: Arc<LockCluster>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let ns = lc.namespace().ok_or(Error::Incomplete("namespace"))?;
    let client = ctx.client.clone();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);

    // Observe.
    let obs = observe(&lc, &pods, &pvcs, ctx.lockd.as_ref()).await?;
    let cluster_id = resources::cluster_id(&lc)?;
    let observed = to_observed(&lc, &obs, &cluster_id);
    let desired = desired(&lc);
    let p = plan::plan(&desired, &observed);
    tracing::debug!(actions = ?p.actions, phase = ?p.phase, "planned");

    // Act: singletons first (the budget must be tight before a restart).
    let mut failure: Option<Error> = None;
    if let Err(e) = apply_singletons(&lc, &ns, &client, p.pdb_min_available).await {
        failure = Some(e);
    } else if let Err(e) = sync_volume_owners(&lc, &pvcs, &obs).await {
        failure = Some(e);
    }
    let targets = targets(&lc, &ns, &obs);
    if failure.is_none() {
        for action in &p.actions {
            let done = execute(&lc, action, &pods, &pvcs, &targets, ctx.lockd.as_ref()).await;
            match done {
                Ok(()) => {
                    tracing::info!(%action, "done");
                    ctx.metrics.acted(action_reason(action));
                    publish(
                        &ctx,
                        &lc,
                        EventType::Normal,
                        action_reason(action),
                        action,
                        action.to_string(),
                    )
                    .await;
                }
                Err(e) => {
                    tracing::warn!(%action, error = %e, "failed");
                    publish(
                        &ctx,
                        &lc,
                        EventType::Warning,
                        "ActionFailed",
                        action,
                        format!("{action}: {e}"),
                    )
                    .await;
                    failure = Some(e);
                    break;
                }
            }
        }
    }

    // Status, every pass (written only when it changed).
    let status = build_status(&lc, &obs, &observed, &p, failure.as_ref());
    let written = write_status(&lc, &ns, &client, status).await;
    match failure {
        Some(e) => {
            // The action's error is the one to report and back off on.
            if let Err(w) = written {
                tracing::warn!(error = %w, "status not written");
            }
            Err(e)
        }
        None if written.is_err() => written.map(|_| Requeue::requeue(REQUEUE_ACTIVE)),
        None if p.actions.is_empty() => Ok(Requeue::requeue(REQUEUE_IDLE)),
        None => Ok(Requeue::requeue(REQUEUE_ACTIVE)),
    }
}

/// Requeue policy after a failed pass: exponential backoff per
/// LockCluster (1 s, 2 s, 4 s, ... up to [`Backoff::MAX`]), reset by the
/// next successful pass.
pub fn error_policy(lc: Arc<LockCluster>, error: &Error, ctx: Arc<Context>) -> Requeue {
    let delay = ctx.backoff.failed(&backoff_key(&lc));
    tracing::warn!(cluster = %lc.name_any(), %error, retry_in = ?delay, "reconcile failed");
    Requeue::requeue(delay)
}

fn backoff_key(lc: &LockCluster) -> String {
    format!("{}/{}", lc.namespace().unwrap_or_default(), lc.name_any())
}

/// Consecutive failed passes per LockCluster.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: std::sync::Mutex<BTreeMap<String, u32>>,
}

impl Backoff {
    /// First retry delay.
    pub const MIN: Duration = Duration::from_secs(1);
    /// Longest retry delay.
    pub const MAX: Duration = Duration::from_secs(300);

    /// Records a failure of `key`; returns how long to wait before retrying.
    pub fn failed(&self, key: &str) -> Duration {
        let mut f = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = f.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let factor = 1u32 << (*n - 1).min(16);
        (Backoff::MIN * factor).min(Backoff::MAX)
    }

    /// Records a success of `key`: the next failure starts over.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }
}

fn node_id_of<K: Resource>(cluster: &str, obj: &K) -> Option<u64> {
    obj.meta()
        .labels
        .as_ref()
        .and_then(|l| l.get(names::LABEL_NODE_ID))
        .and_then(|v| v.parse().ok())
        .or_else(|| {
            obj.meta()
                .name
                .as_deref()
                .and_then(|n| names::node_id_from_pod_name(cluster, n.trim_start_matches("data-")))
        })
}

/// Lists the members' pods and volumes and probes every pod with an IP.
pub async fn observe(
    lc: &LockCluster,
    pods: &Api<Pod>,
    pvcs: &Api<PersistentVolumeClaim>,
    lockd: &dyn Lockd,
) -> Result<Observation, Error> {
    let name = lc.name_any();
    let lp = ListParams::default().labels(&names::selector_string(&name));
    let mut obs = Observation::default();
    for pod in pods.list(&lp).await? {
        if let Some(id) = node_id_of(&name, &pod) {
            obs.pods.insert(id, pod);
        }
    }
    for pvc in pvcs.list(&lp).await? {
        // A volume being deleted is as good as gone: its member must not
        // be restarted on it. A retired volume belongs to no member.
        if pvc.metadata.deletion_timestamp.is_some() || pvc.labels().contains_key(RETIRED_LABEL) {
            continue;
        }
        if let Some(id) = node_id_of(&name, &pvc) {
            obs.pvcs.insert(id, pvc);
        }
    }
    let probes = obs.pods.iter().filter_map(|(id, pod)| {
        let ip = pod.status.as_ref()?.pod_ip.clone()?;
        pod.metadata.deletion_timestamp.is_none().then_some(())?;
        let endpoint = format!("{ip}:{}", resources::GRPC_PORT);
        Some(async move { (*id, lockd.status(&endpoint).await) })
    });
    for (id, status) in join_all(probes).await {
        if let Some(s) = status {
            obs.statuses.insert(id, s);
        }
    }
    Ok(obs)
}

/// The planner's view of the spec.
pub fn desired(lc: &LockCluster) -> Desired {
    Desired {
        replicas: u32::try_from(lc.spec.replicas).unwrap_or(0),
        version: resources::template_hash(&lc.spec),
        caught_up_lag: CAUGHT_UP_LAG,
        delete_volume_on_scale_down: lc.spec.storage.retention.when_scaled
            == RetentionAction::Delete,
        progress_deadline: lc.spec.progress_deadline(),
    }
}

fn pod_state(pod: Option<&Pod>) -> PodState {
    let Some(pod) = pod else {
        return PodState::Absent;
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Terminating;
    }
    let status = pod.status.as_ref();
    match status.and_then(|s| s.phase.as_deref()) {
        Some("Running") => PodState::Running {
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        },
        // A pod that ended (restartPolicy Always makes this rare) is deleted
        // and recreated: report it as going away.
        Some("Failed") | Some("Succeeded") => PodState::Terminating,
        _ => PodState::Pending,
    }
}

fn recorded_instances(lc: &LockCluster) -> BTreeMap<u64, String> {
    lc.status
        .iter()
        .flat_map(|s| s.members.iter())
        .filter_map(|m| Some((m.node_id, m.instance_id.clone()?)))
        .collect()
}

/// Maps an observation to the planner's input.
pub fn to_observed(lc: &LockCluster, obs: &Observation, cluster_id: &str) -> Observed {
    let status = lc.status.clone().unwrap_or_default();
    let leader = crate::lockd_admin::pick_leader_status(obs.statuses.values());
    let raft = leader.and_then(crate::lockd_admin::raft_view);
    let recorded = recorded_instances(lc);
    let mut ids: BTreeSet<u64> = obs.pods.keys().chain(obs.pvcs.keys()).copied().collect();
    if let Some(r) = &raft {
        ids.extend(r.voters.iter().chain(r.learners.iter()));
    }
    let members = ids
        .iter()
        .map(|&id| {
            let pod = obs.pods.get(&id);
            let st = obs.statuses.get(&id);
            let volume = crate::lockd_admin::volume_state(
                obs.pvcs.contains_key(&id),
                recorded.get(&id).map(String::as_str),
                st,
            );
            ObservedMember {
                id,
                pod: pod_state(pod),
                volume,
                version: pod
                    .and_then(|p| p.annotations().get(resources::TEMPLATE_HASH_ANNOTATION))
                    .cloned(),
                status: st
                    .map(crate::lockd_admin::member_status)
                    .or_else(|| pod.and_then(refused_foreign_data)),
            }
        })
        .collect();
    let max_seen = ids.iter().max().copied().unwrap_or(0);
    let now = Timestamp::now();
    let unhealthy_for = status
        .members
        .iter()
        .filter_map(|m| {
            let since = m.unhealthy_since.as_ref()?.0;
            let secs = now.duration_since(since).as_secs().max(0);
            Some((m.node_id, Duration::from_secs(secs.unsigned_abs())))
        })
        .collect();
    Observed {
        cluster_id: cluster_id.to_string(),
        next_id: status.next_member_id.unwrap_or(1).max(max_seen + 1).max(1),
        bootstrapped: status.bootstrapped || raft.is_some(),
        members,
        raft,
        unhealthy_for,
    }
}

/// A member whose data dir belongs to another cluster does not start: lockd
/// exits with "data dir ... belongs to cluster \"X\" ...", which Kubernetes
/// keeps as the container's termination message. Seen that way, the member
/// is reported as belonging to cluster X, so the planner flags it
/// (ClusterIDMismatch) and never admits or deletes it.
pub fn refused_foreign_data(pod: &Pod) -> Option<plan::MemberStatus> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|c| {
        let terminated = c
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .or_else(|| c.state.as_ref().and_then(|s| s.terminated.as_ref()))?;
        let message = terminated.message.as_deref()?;
        let rest = &message[message.find("belongs to cluster \"")? + 20..];
        let recorded = &rest[..rest.find('"')?];
        Some(plan::MemberStatus {
            cluster_id: recorded.to_string(),
            initialized: true,
            role: plan::Role::Uninitialized,
            term: 0,
            leader_id: None,
            applied_index: 0,
        })
    })
}

/// Where each member is reached.
pub fn targets(lc: &LockCluster, ns: &str, obs: &Observation) -> Targets {
    let name = lc.name_any();
    let mut t = Targets::default();
    for (id, pod) in &obs.pods {
        if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_ref()) {
            t.endpoints
                .insert(*id, format!("{ip}:{}", resources::GRPC_PORT));
        }
    }
    let ids = obs.pods.keys().chain(obs.pvcs.keys());
    for id in ids {
        t.advertise.insert(
            *id,
            format!(
                "{}:{}",
                names::member_host(&name, ns, *id),
                resources::GRPC_PORT
            ),
        );
    }
    t
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let name = obj.meta().name.clone().ok_or(Error::Incomplete("name"))?;
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

/// Applies `obj` unless the stored object already carries its spec hash.
/// Returns whether it wrote.
pub async fn apply_if_changed<K>(api: &Api<K>, obj: &K) -> Result<bool, Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let name = obj.meta().name.clone().ok_or(Error::Incomplete("name"))?;
    let want = obj.annotations().get(resources::SPEC_HASH_ANNOTATION);
    if let Some(current) = api.get_opt(&name).await? {
        if want.is_some() && current.annotations().get(resources::SPEC_HASH_ANNOTATION) == want {
            return Ok(false);
        }
    }
    apply(api, obj).await?;
    Ok(true)
}

async fn apply_singletons(
    lc: &LockCluster,
    ns: &str,
    client: &kube::Client,
    pdb_min_available: u32,
) -> Result<(), Error> {
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    apply_if_changed(&services, &resources::peer_service(lc)?).await?;
    apply_if_changed(&services, &resources::client_service(lc)?).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    apply_if_changed(&cms, &resources::config_map(lc)?).await?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    apply_if_changed(&pdbs, &resources::pdb(lc, pdb_min_available)?).await?;
    Ok(())
}

/// Keeps the members' volumes' owner references in step with
/// `whenDeleted` (see [`resources::volume_owner_references`]): a merge
/// patch of the whole list, conditional on the resourceVersion observed.
async fn sync_volume_owners(
    lc: &LockCluster,
    pvcs: &Api<PersistentVolumeClaim>,
    obs: &Observation,
) -> Result<(), Error> {
    for pvc in obs.pvcs.values() {
        let Some(refs) = resources::volume_owner_references(lc, pvc)? else {
            continue;
        };
        let name = pvc.name_any();
        let mut meta = serde_json::json!({ "ownerReferences": refs });
        if let Some(rv) = &pvc.metadata.resource_version {
            meta["resourceVersion"] = serde_json::json!(rv);
        }
        let patch = serde_json::json!({ "metadata": meta });
        pvcs.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(pvc = %name, owners = refs.len(), "volume owner references updated");
    }
    Ok(())
}

async fn delete_ignoring_absent<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn execute(
    lc: &LockCluster,
    action: &Action,
    pods: &Api<Pod>,
    pvcs: &Api<PersistentVolumeClaim>,
    targets: &Targets,
    lockd: &dyn Lockd,
) -> Result<(), Error> {
    let name = lc.name_any();
    match action {
        Action::CreateMember { id } => {
            apply(pvcs, &resources::member_pvc(lc, *id)?).await?;
            apply(pods, &resources::member_pod(lc, *id)?).await
        }
        Action::CreatePod { id } => apply(pods, &resources::member_pod(lc, *id)?).await,
        Action::DeletePod { id } => {
            delete_ignoring_absent(pods, &names::pod_name(&name, *id)).await
        }
        Action::DeleteMember { id, delete_volume } => {
            delete_ignoring_absent(pods, &names::pod_name(&name, *id)).await?;
            let pvc = names::pvc_name(&name, *id);
            if *delete_volume {
                delete_ignoring_absent(pvcs, &pvc).await
            } else {
                retire_volume(pvcs, &pvc).await
            }
        }
        Action::Initialize { .. }
        | Action::AddLearner { .. }
        | Action::ChangeVoters { .. }
        | Action::RemoveMember { .. }
        | Action::TransferLeader { .. } => lockd.act(action, targets).await.map_err(Error::Lockd),
    }
}

/// Marks a volume kept after its member left (`whenScaled: Retain`) so it
/// is no longer observed as a member: otherwise a pod-less member with a
/// volume looks like one still starting, and its pod would be recreated on
/// the old data. The volume keeps its other labels, so it is easy to find.
async fn retire_volume(pvcs: &Api<PersistentVolumeClaim>, name: &str) -> Result<(), Error> {
    let patch = serde_json::json!({
        "metadata": { "labels": { RETIRED_LABEL: "true" } }
    });
    match pvcs
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn action_reason(action: &Action) -> &'static str {
    match action {
        Action::CreateMember { .. } => "CreateMember",
        Action::CreatePod { .. } => "CreatePod",
        Action::DeletePod { .. } => "RestartMember",
        Action::DeleteMember { .. } => "DeleteMember",
        Action::Initialize { .. } => "Initialize",
        Action::AddLearner { .. } => "AddLearner",
        Action::ChangeVoters { .. } => "ChangeVoters",
        Action::RemoveMember { .. } => "RemoveMember",
        Action::TransferLeader { .. } => "TransferLeader",
    }
}

async fn publish(
    ctx: &Context,
    lc: &LockCluster,
    type_: EventType,
    reason: &str,
    action: &Action,
    note: String,
) {
    let Some(recorder) = &ctx.recorder else {
        return;
    };
    // The recorder folds events with the same type, reason, action and
    // target into one series; the action text names the member, so two
    // steps of one pass (create member 4, create member 5) stay two events.
    // (The API caps `action` at 128 characters.)
    let ev = Event {
        type_,
        reason: reason.to_string(),
        action: action.to_string().chars().take(128).collect(),
        note: Some(note),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &lc.object_ref(&())).await {
        tracing::warn!(error = %e, "event not published");
    }
}

fn phase_of(p: plan::Phase) -> LockClusterPhase {
    match p {
        plan::Phase::Pending => LockClusterPhase::Pending,
        plan::Phase::Bootstrapping => LockClusterPhase::Bootstrapping,
        plan::Phase::Running => LockClusterPhase::Running,
        plan::Phase::Scaling => LockClusterPhase::Scaling,
        plan::Phase::Upgrading => LockClusterPhase::Upgrading,
        plan::Phase::Degraded => LockClusterPhase::Degraded,
        plan::Phase::Failed => LockClusterPhase::Failed,
    }
}

/// The status a pass reports: what it saw, the plan's health and
/// conditions, and the failure of this pass if any (as Degraded).
pub fn build_status(
    lc: &LockCluster,
    obs: &Observation,
    observed: &Observed,
    p: &plan::Plan,
    failure: Option<&Error>,
) -> LockClusterStatus {
    let name = lc.name_any();
    let old = lc.status.clone().unwrap_or_default();
    let generation = lc.metadata.generation;
    let cluster_id = observed.cluster_id.as_str();
    let view = observed.raft.as_ref();
    let recorded = recorded_instances(lc);
    let ids: BTreeSet<u64> = obs.pods.keys().chain(obs.pvcs.keys()).copied().collect();
    let now = Time(Timestamp::now());
    let members = ids
        .iter()
        .map(|&id| {
            let pod = obs.pods.get(&id);
            // Kept from pass to pass while the member stays unhealthy.
            let unhealthy_since = p.health.unhealthy.contains(&id).then(|| {
                old.members
                    .iter()
                    .find(|m| m.node_id == id)
                    .and_then(|m| m.unhealthy_since.clone())
                    .unwrap_or_else(|| now.clone())
            });
            let role = match view {
                Some(v) if v.leader == id => MemberRole::Leader,
                Some(v) if v.voters.contains(&id) => MemberRole::Follower,
                Some(v) if v.learners.contains(&id) => MemberRole::Learner,
                _ => MemberRole::Unknown,
            };
            // Record the data dir's instance the first time the member
            // answers for our cluster; keep the first one ever recorded.
            let instance_id = recorded.get(&id).cloned().or_else(|| {
                obs.statuses
                    .get(&id)
                    .filter(|s| s.cluster_id == cluster_id)
                    .map(|s| s.instance_id.clone())
                    .filter(|i| !i.is_empty())
            });
            MemberStatus {
                pod: names::pod_name(&name, id),
                node_id: id,
                role,
                version: pod
                    .and_then(|p| p.labels().get("app.kubernetes.io/version"))
                    .cloned(),
                ready: matches!(pod_state(pod), PodState::Running { ready: true }),
                lag: view.and_then(|v| v.lag.get(&id).copied()),
                instance_id,
                unhealthy_since,
            }
        })
        .collect::<Vec<_>>();
    let versions: BTreeSet<&String> = members.iter().filter_map(|m| m.version.as_ref()).collect();
    let mut conds = old.conditions.clone();
    for c in &p.conditions {
        let (status, reason, message) = match (c.kind, failure) {
            (plan::ConditionKind::Degraded, Some(e)) => {
                (true, "ReconcileFailed".to_string(), e.to_string())
            }
            _ => (c.status, c.reason.to_string(), c.message.clone()),
        };
        conditions::upsert(
            &mut conds,
            conditions::new(
                c.kind.as_str(),
                status,
                &reason,
                message,
                generation,
                now.clone(),
            ),
        );
    }
    LockClusterStatus {
        phase: phase_of(p.phase),
        observed_generation: generation,
        replicas: i32::try_from(obs.pods.len()).unwrap_or(i32::MAX),
        ready_replicas: i32::try_from(members.iter().filter(|m| m.ready).count())
            .unwrap_or(i32::MAX),
        selector: Some(names::selector_string(&name)),
        leader: view.map(|v| names::pod_name(&name, v.leader)),
        leader_id: view.map(|v| v.leader),
        term: view.map(|v| v.term),
        commit_index: view.map(|v| v.commit_index),
        current_version: (versions.len() == 1)
            .then(|| versions.iter().next().map(|v| (*v).clone()))
            .flatten(),
        target_version: Some(lc.spec.version.clone()),
        members,
        next_member_id: Some(p.next_id.max(old.next_member_id.unwrap_or(1))),
        cluster_id: Some(cluster_id.to_string()),
        bootstrapped: old.bootstrapped || view.is_some(),
        conditions: conds,
    }
}

/// Writes `status` to the status subresource unless it is what is stored.
pub async fn write_status(
    lc: &LockCluster,
    ns: &str,
    client: &kube::Client,
    status: LockClusterStatus,
) -> Result<bool, Error> {
    if lc.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let api: Api<LockCluster> = Api::namespaced(client.clone(), ns);
    // Server-side apply of the whole status: a field this pass leaves out
    // (a leader that is gone) is removed, not left stale as a merge patch
    // would leave it.
    let patch = serde_json::json!({
        "apiVersion": LockCluster::api_version(&()),
        "kind": LockCluster::kind(&()),
        "status": status,
    });
    api.patch_status(
        &lc.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
    };

    fn pod_terminated_with(message: &str) -> Pod {
        Pod {
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: "lockd".into(),
                    last_state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: 1,
                            message: Some(message.into()),
                            ..ContainerStateTerminated::default()
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn failed_passes_back_off_exponentially_per_cluster_until_a_success() {
        let b = Backoff::default();
        let delays: Vec<u64> = (0..12).map(|_| b.failed("ns/a").as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(b.failed("ns/b"), Backoff::MIN, "per cluster");
        b.succeeded("ns/a");
        assert_eq!(b.failed("ns/a"), Backoff::MIN, "a success starts over");
    }

    #[test]
    fn a_refused_foreign_data_dir_reads_as_the_other_cluster() {
        let p = pod_terminated_with(
            "lockd: data dir /var/lib/lockd/data belongs to cluster \"demo-1111\", \
             but this member was started with --cluster-id \"demo-2222\"",
        );
        let s = refused_foreign_data(&p).expect("recognised");
        assert_eq!(s.cluster_id, "demo-1111");
        assert!(s.initialized);
        assert!(refused_foreign_data(&pod_terminated_with("out of memory")).is_none());
        assert!(refused_foreign_data(&Pod::default()).is_none());
    }
}
