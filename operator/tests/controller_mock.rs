//! Controller passes against a scripted Kubernetes API and a scripted lockd.
//!
//! The Kubernetes side is kube's tower-test pattern: `kube::Client::new` over
//! a `tower_test::mock` service, and a server task that answers each expected
//! request of a [`Script`] in order (method and path must match exactly; the
//! step's reply may assert query and body). A request after the end of the
//! script, or a missing one, fails the test. The lockd side is [`FakeLockd`]:
//! a map endpoint -> `Cluster/Status` answer and a log of membership calls.
//! Pod IPs are only keys into that map; nothing touches the network.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Recorder, Reporter};
use kube::Resource;
use lockd_crds::{LockCluster, LockClusterPhase, LockClusterSpec, LockClusterStatus, MemberRole};
use lockd_operator::controller::{
    self, build_status, reconcile, Context, Error, Lockd, Observation, Targets, REQUEUE_ACTIVE,
    REQUEUE_IDLE,
};
use lockd_operator::metrics::Metrics;
use lockd_operator::plan::{self, Action};
use lockd_operator::resources;
use lockd_proto::v1::{Member, Replication, Role, StatusResponse, VoterSet};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

const NS: &str = "ns";
const NAME: &str = "demo";
const UID: &str = "6f1c2a34-uid";
/// Generous bound on one pass and on the server task: a hang is a failure,
/// not a stuck test run.
const LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The scripted API server.

/// One request as the server received it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    /// The JSON body; Null when empty.
    body: Value,
}

impl Seen {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

type Reply = Box<dyn FnOnce(&Seen) -> (StatusCode, Value) + Send>;

struct Step {
    method: Method,
    path: String,
    reply: Reply,
}

/// Expected requests, in order, with their answers.
#[derive(Default)]
struct Script {
    steps: Vec<Step>,
}

fn ns_path(group_version: &str, plural: &str) -> String {
    if group_version == "v1" {
        format!("/api/v1/namespaces/{NS}/{plural}")
    } else {
        format!("/apis/{group_version}/namespaces/{NS}/{plural}")
    }
}

fn pods_path() -> String {
    ns_path("v1", "pods")
}

fn pvcs_path() -> String {
    ns_path("v1", "persistentvolumeclaims")
}

fn pod_path(id: u64) -> String {
    format!("{}/{NAME}-{id}", pods_path())
}

fn pvc_path(id: u64) -> String {
    format!("{}/data-{NAME}-{id}", pvcs_path())
}

fn status_path() -> String {
    format!(
        "{}/{NAME}/status",
        ns_path("lockd.dev/v1alpha1", "lockclusters")
    )
}

fn events_path() -> String {
    ns_path("events.k8s.io/v1", "events")
}

/// The four singletons, in the order the controller applies them.
fn singleton_paths() -> [String; 4] {
    [
        format!("{}/{NAME}-peers", ns_path("v1", "services")),
        format!("{}/{NAME}", ns_path("v1", "services")),
        format!("{}/{NAME}-config", ns_path("v1", "configmaps")),
        format!("{}/{NAME}", ns_path("policy/v1", "poddisruptionbudgets")),
    ]
}

fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("serializable")
}

/// A `metav1.Status` failure body, as the API server sends it.
fn api_status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// Server-side apply parameters of every write the controller makes.
fn assert_apply(seen: &Seen) {
    assert_eq!(
        seen.query.get("fieldManager").map(String::as_str),
        Some(controller::FIELD_MANAGER),
        "{}: field manager",
        seen.line()
    );
    assert_eq!(
        seen.query.get("force").map(String::as_str),
        Some("true"),
        "{}: force",
        seen.line()
    );
    assert_eq!(
        seen.content_type.as_deref(),
        Some("application/apply-patch+yaml"),
        "{}: content type",
        seen.line()
    );
}

impl Script {
    fn step(
        mut self,
        method: Method,
        path: String,
        reply: impl FnOnce(&Seen) -> (StatusCode, Value) + Send + 'static,
    ) -> Self {
        self.steps.push(Step {
            method,
            path,
            reply: Box::new(reply),
        });
        self
    }

    /// A labelled list of the cluster's objects, answered with `items`.
    fn list(self, path: String, kind: &str, items: Vec<Value>) -> Self {
        let kind = format!("{kind}List");
        self.step(Method::GET, path, move |seen| {
            assert_eq!(
                seen.query.get("labelSelector").map(String::as_str),
                Some("app.kubernetes.io/instance=demo,app.kubernetes.io/name=lockd"),
                "{}: label selector",
                seen.line()
            );
            let list = json!({
                "apiVersion": "v1",
                "kind": kind,
                "metadata": {"resourceVersion": "1"},
                "items": items,
            });
            (StatusCode::OK, list)
        })
    }

    /// The two lists of `observe`.
    fn observe(self, pods: &[Pod], pvcs: &[PersistentVolumeClaim]) -> Self {
        self.list(pods_path(), "Pod", pods.iter().map(to_json).collect())
            .list(
                pvcs_path(),
                "PersistentVolumeClaim",
                pvcs.iter().map(to_json).collect(),
            )
    }

    /// A GET answered with `obj`.
    fn get(self, path: String, obj: Value) -> Self {
        self.step(Method::GET, path, move |_| (StatusCode::OK, obj))
    }

    /// A GET answered with 404 NotFound.
    fn get_missing(self, path: String) -> Self {
        self.step(Method::GET, path, |seen| {
            let message = format!("{} not found", seen.path);
            (StatusCode::NOT_FOUND, api_status(404, "NotFound", &message))
        })
    }

    /// A server-side apply, answered with the applied object.
    fn apply(self, path: String) -> Self {
        self.step(Method::PATCH, path, |seen| {
            assert_apply(seen);
            (StatusCode::OK, seen.body.clone())
        })
    }

    /// A server-side apply of member 1's pod refused: 403 Forbidden (RBAC).
    fn apply_forbidden(self, path: String) -> Self {
        self.step(Method::PATCH, path, |seen| {
            assert_apply(seen);
            let message = format!(
                "pods \"{NAME}-1\" is forbidden: User \"system:serviceaccount:{NS}:lockd-operator\" cannot patch resource \"pods\" in the namespace \"{NS}\""
            );
            (
                StatusCode::FORBIDDEN,
                api_status(403, "Forbidden", &message),
            )
        })
    }

    /// Every singleton created: GET 404, then apply.
    fn singletons_created(self) -> Self {
        singleton_paths()
            .into_iter()
            .fold(self, |s, path| s.get_missing(path.clone()).apply(path))
    }

    /// Every singleton stored as `stored` (in [`singleton_paths`] order);
    /// those marked in `applied` are applied after their GET.
    fn singletons(self, stored: [Value; 4], applied: [bool; 4]) -> Self {
        singleton_paths().into_iter().zip(stored).zip(applied).fold(
            self,
            |s, ((path, obj), apply)| {
                let s = s.get(path.clone(), obj);
                if apply {
                    s.apply(path)
                } else {
                    s
                }
            },
        )
    }

    /// The member's PVC and pod applied (CreateMember).
    fn create_member(self, id: u64) -> Self {
        self.apply(pvc_path(id)).apply(pod_path(id))
    }

    /// The status subresource applied; answered with `lc` carrying it.
    fn status_patch(self, lc: &LockCluster) -> Self {
        let obj = to_json(lc);
        self.step(Method::PATCH, status_path(), move |seen| {
            assert_apply(seen);
            let mut obj = obj;
            obj["status"] = seen.body["status"].clone();
            (StatusCode::OK, obj)
        })
    }

    /// An Event created (POST), answered with itself.
    fn event_created(self) -> Self {
        self.step(Method::POST, events_path(), |seen| {
            (StatusCode::CREATED, seen.body.clone())
        })
    }

    /// A DELETE answered with the object being deleted.
    fn delete(self, path: String, obj: Value) -> Self {
        self.step(Method::DELETE, path, move |_| (StatusCode::OK, obj))
    }
}

/// `%XX` and `+` decoding of one query component.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("ascii");
                out.push(u8::from_str_radix(hex, 16).expect("percent escape"));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).expect("utf-8 query")
}

async fn read(req: Request<Body>) -> Seen {
    let (parts, body) = req.into_parts();
    let query = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    let bytes = body.collect_bytes().await.expect("request body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON request body")
    };
    Seen {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query,
        content_type: parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body,
    }
}

/// A client whose requests go to a task that plays `script`. The task
/// returns every request it answered; it panics on a request that differs
/// from the script, on a missing one (the client went away first) and on
/// any request after the script (it waits until every client clone is
/// dropped, so nothing can arrive later).
fn serve(script: Script) -> (kube::Client, JoinHandle<Vec<Seen>>) {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut log: Vec<Seen> = Vec::new();
        let so_far = |log: &[Seen]| log.iter().map(Seen::line).collect::<Vec<_>>().join("\n  ");
        for (i, step) in script.steps.into_iter().enumerate() {
            let Some((req, send)) = handle.next_request().await else {
                panic!(
                    "request {i} never came: expected {} {}; got:\n  {}",
                    step.method,
                    step.path,
                    so_far(&log)
                );
            };
            let seen = read(req).await;
            assert_eq!(
                (&seen.method, &seen.path),
                (&step.method, &step.path),
                "request {i} differs from the script; earlier requests:\n  {}",
                so_far(&log)
            );
            let (code, body) = (step.reply)(&seen);
            let response = Response::builder()
                .status(code)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&body).expect("JSON")))
                .expect("response");
            send.send_response(response);
            log.push(seen);
        }
        if let Some((req, _)) = handle.next_request().await {
            let extra = read(req).await;
            panic!(
                "unexpected request after the script: {} {:?} body {}; script:\n  {}",
                extra.line(),
                extra.query,
                extra.body,
                so_far(&log)
            );
        }
        log
    });
    (kube::Client::new(mock, "default"), server)
}

/// One reconcile pass of `lc` against `script` and `lockd`, optionally with
/// an event recorder. Returns the pass's result and the requests seen.
async fn run(
    lc: &LockCluster,
    script: Script,
    lockd: Arc<FakeLockd>,
    events: bool,
) -> (Result<Requeue, Error>, Vec<Seen>) {
    let (client, server) = serve(script);
    let recorder = events.then(|| {
        Recorder::new(
            client.clone(),
            Reporter {
                controller: "lockd-operator".to_string(),
                instance: Some("lockd-operator-0".to_string()),
            },
        )
    });
    let ctx = Arc::new(Context {
        client,
        lockd,
        recorder,
        metrics: Arc::new(Metrics::default()),
        backoff: Default::default(),
    });
    let result = tokio::time::timeout(LIMIT, reconcile(Arc::new(lc.clone()), ctx))
        .await
        .expect("reconcile finishes");
    // `ctx` (and every client clone) is gone: the server sees the end.
    let log = match tokio::time::timeout(LIMIT, server)
        .await
        .expect("server finishes")
    {
        Ok(log) => log,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    (result, log)
}

fn writes(log: &[Seen]) -> Vec<String> {
    log.iter()
        .filter(|s| s.method != Method::GET)
        .map(Seen::line)
        .collect()
}

fn find<'a>(log: &'a [Seen], method: Method, path: &str) -> &'a Seen {
    log.iter()
        .find(|s| s.method == method && s.path == path)
        .unwrap_or_else(|| panic!("no {method} {path} in {:?}", writes(log)))
}

fn written_status(log: &[Seen]) -> LockClusterStatus {
    let seen = find(log, Method::PATCH, &status_path());
    assert_eq!(seen.body["apiVersion"], "lockd.dev/v1alpha1");
    assert_eq!(seen.body["kind"], "LockCluster");
    serde_json::from_value(seen.body["status"].clone()).expect("status body")
}

fn condition<'a>(
    status: &'a LockClusterStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status
        .condition(type_)
        .unwrap_or_else(|| panic!("no condition {type_} in {:?}", status.conditions))
}

// ---------------------------------------------------------------------------
// The scripted lockd.

/// lockd as the controller sees it: `Cluster/Status` answers by endpoint
/// and a log of membership calls (all succeed).
#[derive(Default)]
struct FakeLockd {
    statuses: Mutex<BTreeMap<String, StatusResponse>>,
    acts: Mutex<Vec<(Action, Targets)>>,
}

impl FakeLockd {
    fn answer(self, id: u64, status: StatusResponse) -> Self {
        self.statuses
            .lock()
            .expect("lock")
            .insert(endpoint(id), status);
        self
    }

    /// A cluster of `voters` led by `leader`, every member caught up.
    fn healthy(cid: &str, leader: u64, voters: &[u64]) -> Self {
        voters.iter().fold(FakeLockd::default(), |f, &id| {
            f.answer(id, raft_status(cid, id, leader, voters))
        })
    }

    fn status_of(&self, id: u64) -> Option<StatusResponse> {
        self.statuses
            .lock()
            .expect("lock")
            .get(&endpoint(id))
            .cloned()
    }

    fn acts(&self) -> Vec<(Action, Targets)> {
        self.acts.lock().expect("lock").clone()
    }
}

#[tonic::async_trait]
impl Lockd for FakeLockd {
    async fn status(&self, endpoint: &str) -> Option<StatusResponse> {
        self.statuses.lock().expect("lock").get(endpoint).cloned()
    }

    async fn act(&self, action: &Action, targets: &Targets) -> Result<(), String> {
        self.acts
            .lock()
            .expect("lock")
            .push((action.clone(), targets.clone()));
        Ok(())
    }
}

fn ip(id: u64) -> String {
    format!("10.0.0.{id}")
}

fn endpoint(id: u64) -> String {
    format!("{}:{}", ip(id), resources::GRPC_PORT)
}

fn advertise(id: u64) -> String {
    format!("{NAME}-{id}.{NAME}-peers.{NS}.svc:{}", resources::GRPC_PORT)
}

/// Member `id`'s answer in a cluster of `voters` led by `leader`; the
/// leader reports every follower at lag 0.
fn raft_status(cid: &str, id: u64, leader: u64, voters: &[u64]) -> StatusResponse {
    let role = if id == leader {
        Role::Leader
    } else {
        Role::Follower
    };
    let replication = if id == leader {
        voters
            .iter()
            .filter(|v| **v != leader)
            .map(|&v| Replication {
                id: v,
                matched_index: 120,
                lag: 0,
            })
            .collect()
    } else {
        Vec::new()
    };
    StatusResponse {
        id,
        cluster_id: cid.to_string(),
        role: role as i32,
        term: 3,
        leader_id: leader,
        last_log_index: 120,
        commit_index: 120,
        applied_index: 120,
        members: voters
            .iter()
            .map(|&v| Member {
                id: v,
                addr: advertise(v),
                voter: true,
            })
            .collect(),
        replication,
        instance_id: format!("instance-{id}"),
        advertise_addr: advertise(id),
        ..StatusResponse::default()
    }
}

/// A member that runs but was never initialized nor added.
fn fresh_status(cid: &str, id: u64) -> StatusResponse {
    StatusResponse {
        id,
        cluster_id: cid.to_string(),
        role: Role::Uninitialized as i32,
        instance_id: format!("instance-{id}"),
        advertise_addr: advertise(id),
        ..StatusResponse::default()
    }
}

// ---------------------------------------------------------------------------
// Fixtures.

/// A LockCluster as read from the API server, without status.
fn cluster(replicas: i32, version: &str) -> LockCluster {
    let mut lc = LockCluster::new(NAME, LockClusterSpec::new(replicas, version));
    lc.metadata.namespace = Some(NS.to_string());
    lc.metadata.uid = Some(UID.to_string());
    lc.metadata.generation = Some(1);
    lc.metadata.resource_version = Some("41".to_string());
    lc
}

fn cid(lc: &LockCluster) -> String {
    resources::cluster_id(lc).expect("cluster id")
}

/// Member `id`'s pod as built from `lc`, running at [`ip`]`(id)`.
fn running_pod(lc: &LockCluster, id: u64, ready: bool) -> Pod {
    let mut pod = resources::member_pod(lc, id).expect("pod");
    pod.metadata.uid = Some(format!("pod-uid-{id}"));
    pod.status = Some(PodStatus {
        phase: Some("Running".to_string()),
        pod_ip: Some(ip(id)),
        conditions: Some(vec![PodCondition {
            type_: "Ready".to_string(),
            status: if ready { "True" } else { "False" }.to_string(),
            ..PodCondition::default()
        }]),
        ..PodStatus::default()
    });
    pod
}

fn pvc(lc: &LockCluster, id: u64) -> PersistentVolumeClaim {
    resources::member_pvc(lc, id).expect("pvc")
}

/// The stored singletons as the controller builds them for `lc` (so their
/// spec hashes match), the budget with `min_available`.
fn stored_singletons(lc: &LockCluster, min_available: u32) -> [Value; 4] {
    [
        to_json(&resources::peer_service(lc).expect("peer service")),
        to_json(&resources::client_service(lc).expect("client service")),
        to_json(&resources::config_map(lc).expect("config map")),
        to_json(&resources::pdb(lc, min_available).expect("pdb")),
    ]
}

/// What a pass over `pods`/`pvcs`/`lockd` reports for `lc`, computed with
/// the controller's public pure functions (no API calls).
fn status_after_pass(
    lc: &LockCluster,
    pods: &[Pod],
    pvcs: &[PersistentVolumeClaim],
    lockd: &FakeLockd,
) -> LockClusterStatus {
    let id_of = |name: &str| -> u64 {
        name.rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("member name")
    };
    let obs = Observation {
        pods: pods
            .iter()
            .map(|p| {
                (
                    id_of(p.metadata.name.as_deref().unwrap_or_default()),
                    p.clone(),
                )
            })
            .collect(),
        pvcs: pvcs
            .iter()
            .map(|p| {
                (
                    id_of(p.metadata.name.as_deref().unwrap_or_default()),
                    p.clone(),
                )
            })
            .collect(),
        statuses: pods
            .iter()
            .filter_map(|p| {
                let id = id_of(p.metadata.name.as_deref().unwrap_or_default());
                Some((id, lockd.status_of(id)?))
            })
            .collect(),
    };
    let observed = controller::to_observed(lc, &obs, &cid(lc));
    let p = plan::plan(&controller::desired(lc), &observed);
    build_status(lc, &obs, &observed, &p, None)
}

/// A settled 3-member cluster of `version` (leader 1): the LockCluster with
/// the status a pass stores for it, its pods and PVCs, and lockd.
fn settled_three(version: &str) -> (LockCluster, Vec<Pod>, Vec<PersistentVolumeClaim>, FakeLockd) {
    let mut lc = cluster(3, version);
    let pods: Vec<Pod> = (1..=3).map(|id| running_pod(&lc, id, true)).collect();
    let pvcs: Vec<PersistentVolumeClaim> = (1..=3).map(|id| pvc(&lc, id)).collect();
    let lockd = FakeLockd::healthy(&cid(&lc), 1, &[1, 2, 3]);
    let status = status_after_pass(&lc, &pods, &pvcs, &lockd);
    assert_eq!(
        status.phase,
        LockClusterPhase::Running,
        "fixture is settled"
    );
    lc.status = Some(status);
    (lc, pods, pvcs, lockd)
}

/// `lc` after a spec edit: the next generation.
fn edited(lc: &LockCluster, edit: impl FnOnce(&mut LockClusterSpec)) -> LockCluster {
    let mut lc = lc.clone();
    edit(&mut lc.spec);
    lc.metadata.generation = Some(2);
    lc
}

// ---------------------------------------------------------------------------
// 1. Create.

#[tokio::test]
async fn create_applies_singletons_then_the_first_member_then_status() {
    let lc = cluster(3, "0.1.0");
    let lockd = Arc::new(FakeLockd::default());
    let script = Script::default()
        .observe(&[], &[])
        .singletons_created()
        .create_member(1)
        .status_patch(&lc);

    let (result, log) = run(&lc, script, lockd.clone(), false).await;

    assert_eq!(
        result.expect("pass succeeds"),
        Requeue::requeue(REQUEUE_ACTIVE)
    );
    assert!(
        lockd.acts().is_empty(),
        "no lockd calls: {:?}",
        lockd.acts()
    );

    // The applied objects are the builders' objects, hash annotation included.
    let [peers, client, cm, pdb] = singleton_paths();
    let expect_body = |path: &str, want: Value| {
        assert_eq!(find(&log, Method::PATCH, path).body, want, "body of {path}");
    };
    expect_body(&peers, to_json(&resources::peer_service(&lc).expect("svc")));
    expect_body(
        &client,
        to_json(&resources::client_service(&lc).expect("svc")),
    );
    expect_body(&cm, to_json(&resources::config_map(&lc).expect("cm")));
    // No member pod exists yet: nothing to protect.
    expect_body(&pdb, to_json(&resources::pdb(&lc, 0).expect("pdb")));
    expect_body(&pvc_path(1), to_json(&pvc(&lc, 1)));
    expect_body(
        &pod_path(1),
        to_json(&resources::member_pod(&lc, 1).expect("pod")),
    );

    let status = written_status(&log);
    // The phase describes what the pass observed (no member yet); see the
    // planner's Phase docs. The next pass reports Bootstrapping.
    assert_eq!(status.phase, LockClusterPhase::Pending);
    assert_eq!(status.next_member_id, Some(2));
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.cluster_id.as_deref(), Some(cid(&lc).as_str()));
    assert!(!status.bootstrapped);
    assert!(status.members.is_empty());
    assert_eq!(status.replicas, 0);
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=demo,app.kubernetes.io/name=lockd")
    );
    let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(
        types,
        [
            "Available",
            "Progressing",
            "Degraded",
            "QuorumAtRisk",
            "ClusterIDMismatch",
            "InvalidSpec"
        ]
    );
    let progressing = condition(&status, "Progressing");
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("True", "CreatingMembers")
    );
    assert_eq!(progressing.message, "create member 1");
    assert_eq!(condition(&status, "Available").reason, "NotBootstrapped");
    assert_eq!(condition(&status, "Degraded").status, "False");
}

/// The second pass of a bootstrap: member 1 runs and answers fresh, so it is
/// initialized through lockd; no Kubernetes write but the budget and status.
#[tokio::test]
async fn bootstrap_initializes_the_first_fresh_member() {
    let mut lc = cluster(3, "0.1.0");
    lc.status = Some(LockClusterStatus {
        next_member_id: Some(2),
        ..LockClusterStatus::default()
    });
    let pods = [running_pod(&lc, 1, false)];
    let pvcs = [pvc(&lc, 1)];
    let lockd = Arc::new(FakeLockd::default().answer(1, fresh_status(&cid(&lc), 1)));
    let script = Script::default()
        .observe(&pods, &pvcs)
        // The budget built in pass 1 allowed everything (no pod then).
        .singletons(stored_singletons(&lc, 0), [false, false, false, true])
        .status_patch(&lc);

    let (result, log) = run(&lc, script, lockd.clone(), false).await;

    assert_eq!(
        result.expect("pass succeeds"),
        Requeue::requeue(REQUEUE_ACTIVE)
    );
    let acts = lockd.acts();
    assert_eq!(
        acts.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>(),
        [Action::Initialize { id: 1 }]
    );
    assert_eq!(acts[0].1.endpoints, BTreeMap::from([(1, endpoint(1))]));
    assert_eq!(acts[0].1.advertise, BTreeMap::from([(1, advertise(1))]));
    let pdb = &find(&log, Method::PATCH, &singleton_paths()[3]).body;
    assert_eq!(
        pdb["spec"]["minAvailable"], 1,
        "no eviction while bootstrapping"
    );
    let status = written_status(&log);
    assert_eq!(status.phase, LockClusterPhase::Bootstrapping);
    assert_eq!(status.next_member_id, Some(2));
    assert_eq!(condition(&status, "Progressing").reason, "Initializing");
}

// ---------------------------------------------------------------------------
// 2. Steady state.

#[tokio::test]
async fn steady_state_costs_reads_only() {
    let lc = cluster(3, "0.1.0");
    let pods: Vec<Pod> = (1..=3).map(|id| running_pod(&lc, id, true)).collect();
    let pvcs: Vec<PersistentVolumeClaim> = (1..=3).map(|id| pvc(&lc, id)).collect();
    let lockd = Arc::new(FakeLockd::healthy(&cid(&lc), 1, &[1, 2, 3]));
    // Healthy 3 voters: one voluntary eviction is allowed.
    let stored = stored_singletons(&lc, 2);

    // Pass 1: no status stored yet; it is the only write.
    let script = Script::default()
        .observe(&pods, &pvcs)
        .singletons(stored.clone(), [false; 4])
        .status_patch(&lc);
    let (result, log) = run(&lc, script, lockd.clone(), false).await;
    assert_eq!(result.expect("pass 1"), Requeue::requeue(REQUEUE_IDLE));
    assert_eq!(writes(&log), [format!("PATCH {}", status_path())]);
    let status = written_status(&log);
    assert_eq!(status.phase, LockClusterPhase::Running);
    assert!(status.bootstrapped);
    assert_eq!(status.leader.as_deref(), Some("demo-1"));
    assert_eq!((status.replicas, status.ready_replicas), (3, 3));
    assert_eq!(status.next_member_id, Some(4));
    assert_eq!(
        status.members.iter().map(|m| m.role).collect::<Vec<_>>(),
        [
            MemberRole::Leader,
            MemberRole::Follower,
            MemberRole::Follower
        ]
    );
    assert_eq!(
        status.members[1].instance_id.as_deref(),
        Some("instance-2"),
        "instance ids are recorded once members joined"
    );
    assert_eq!(condition(&status, "Available").status, "True");
    assert_eq!(condition(&status, "Progressing").status, "False");

    // Pass 2: the status as the API server stored it (a JSON round trip,
    // timestamps at second precision): nothing to write at all.
    let mut stored_lc = lc.clone();
    stored_lc.status = Some(status);
    let script = Script::default()
        .observe(&pods, &pvcs)
        .singletons(stored, [false; 4]);
    let (result, log) = run(&stored_lc, script, lockd.clone(), false).await;
    assert_eq!(result.expect("pass 2"), Requeue::requeue(REQUEUE_IDLE));
    assert!(writes(&log).is_empty(), "writes: {:?}", writes(&log));
    assert_eq!(log.len(), 6, "2 lists + 4 singleton GETs");
    assert!(lockd.acts().is_empty());

    // The pure status computation agrees with what the pass stored.
    let again = status_after_pass(&stored_lc, &pods, &pvcs, &lockd);
    assert_eq!(Some(&again), stored_lc.status.as_ref());
}

// ---------------------------------------------------------------------------
// 3. Scale up.

#[tokio::test]
async fn scale_up_creates_both_new_members_in_one_pass() {
    let (old, pods, pvcs, lockd) = settled_three("0.1.0");
    let lc = edited(&old, |s| s.replicas = 5);
    let lockd = Arc::new(lockd);
    // Services and config map are untouched by replicas; the budget is
    // tightened to "no eviction" (minAvailable = all 3 pods) while scaling.
    let script = Script::default()
        .observe(&pods, &pvcs)
        .singletons(stored_singletons(&old, 2), [false, false, false, true])
        .create_member(4)
        .create_member(5)
        .status_patch(&lc);

    let (result, log) = run(&lc, script, lockd.clone(), false).await;

    assert_eq!(
        result.expect("pass succeeds"),
        Requeue::requeue(REQUEUE_ACTIVE)
    );
    assert!(lockd.acts().is_empty());
    assert_eq!(
        find(&log, Method::PATCH, &singleton_paths()[3]).body,
        to_json(&resources::pdb(&lc, 3).expect("pdb"))
    );
    for id in [4, 5] {
        assert_eq!(
            find(&log, Method::PATCH, &pvc_path(id)).body,
            to_json(&pvc(&lc, id))
        );
        let pod = &find(&log, Method::PATCH, &pod_path(id)).body;
        assert_eq!(
            pod["metadata"]["labels"]["lockd.dev/node-id"],
            id.to_string()
        );
        assert!(pod["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .contains(&json!(format!("--id={id}"))));
    }
    let status = written_status(&log);
    assert_eq!(status.phase, LockClusterPhase::Scaling);
    assert_eq!(status.next_member_id, Some(6));
    assert_eq!(status.observed_generation, Some(2));
    let progressing = condition(&status, "Progressing");
    assert_eq!(progressing.reason, "CreatingMembers");
    assert_eq!(progressing.message, "create member 4; create member 5");
}

// ---------------------------------------------------------------------------
// 4. Upgrade step.

#[tokio::test]
async fn upgrade_tightens_the_budget_then_restarts_one_follower() {
    let (old, pods, pvcs, lockd) = settled_three("0.1.0");
    let lc = edited(&old, |s| s.version = "0.2.0".to_string());
    assert_ne!(
        resources::template_hash(&lc.spec),
        resources::template_hash(&old.spec)
    );
    let lockd = Arc::new(lockd);
    // Leader 1 is the lowest id: a restart by id alone would pick it.
    let script = Script::default()
        .observe(&pods, &pvcs)
        .singletons(stored_singletons(&old, 2), [false, false, false, true])
        .delete(pod_path(2), to_json(&pods[1]))
        .status_patch(&lc);

    let (result, log) = run(&lc, script, lockd.clone(), false).await;

    assert_eq!(
        result.expect("pass succeeds"),
        Requeue::requeue(REQUEUE_ACTIVE)
    );
    assert!(lockd.acts().is_empty());
    let pdb_at = log
        .iter()
        .position(|s| s.method == Method::PATCH && s.path == singleton_paths()[3])
        .expect("budget applied");
    let delete_at = log
        .iter()
        .position(|s| s.method == Method::DELETE)
        .expect("pod deleted");
    assert!(pdb_at < delete_at, "the budget is tight before the restart");
    assert_eq!(log[pdb_at].body["spec"]["minAvailable"], 3);
    assert_eq!(
        log.iter().filter(|s| s.method == Method::DELETE).count(),
        1,
        "exactly one restart"
    );
    let status = written_status(&log);
    assert_eq!(status.phase, LockClusterPhase::Upgrading);
    assert_eq!(status.target_version.as_deref(), Some("0.2.0"));
    assert_eq!(status.current_version.as_deref(), Some("0.1.0"));
    let progressing = condition(&status, "Progressing");
    assert_eq!(progressing.reason, "RestartingMember");
    assert_eq!(progressing.message, "restart member 2");
}

#[tokio::test]
async fn scale_down_with_retained_volumes_retires_them() {
    // Member 4 was removed from the membership (scale-down 5 -> 3 with
    // whenScaled: Retain); its pod and volume are left to clean up.
    let (settled, mut pods, mut pvcs, lockd) = settled_three("0.1.0");
    let lc = edited(&settled, |s| {
        s.storage.retention.when_scaled = lockd_crds::RetentionAction::Retain
    });
    pods.push(running_pod(&lc, 4, true));
    pvcs.push(pvc(&lc, 4));
    let mut removed = raft_status(&cid(&lc), 4, 1, &[1, 2, 3]);
    removed.role = Role::Follower as i32;
    let lockd = Arc::new(lockd.answer(4, removed));
    let retire = Method::PATCH;
    let stored_pvc = to_json(&pvcs[3]);
    let script = Script::default()
        .observe(&pods, &pvcs)
        .singletons(stored_singletons(&lc, 2), [false, false, false, true])
        .delete(pod_path(4), to_json(&pods[3]))
        .step(retire, pvc_path(4), move |seen| {
            assert_eq!(
                seen.content_type.as_deref(),
                Some("application/merge-patch+json")
            );
            assert_eq!(
                seen.body["metadata"]["labels"][controller::RETIRED_LABEL],
                "true"
            );
            (StatusCode::OK, stored_pvc)
        })
        .status_patch(&lc);
    let (result, log) = run(&lc, script, lockd.clone(), false).await;
    result.expect("pass succeeds");
    assert!(lockd.acts().is_empty());
    assert!(writes(&log).contains(&format!("DELETE {}", pod_path(4))));

    // Next pass: the retired volume is no member; the cluster is at rest.
    let mut retired = pvc(&lc, 4);
    retired
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(controller::RETIRED_LABEL.to_string(), "true".to_string());
    pvcs[3] = retired;
    pods.truncate(3);
    let script = Script::default()
        .observe(&pods, &pvcs)
        .singletons(stored_singletons(&lc, 2), [false, false, false, false])
        .status_patch(&lc);
    let (result, log) = run(&lc, script, lockd.clone(), false).await;
    assert_eq!(
        result.expect("pass succeeds"),
        Requeue::requeue(REQUEUE_IDLE)
    );
    assert_eq!(
        writes(&log),
        vec![format!("PATCH {}", status_path())],
        "nothing but the status: the retired volume is no member"
    );
}

/// `whenDeleted` changed after the volumes were created: the pass patches
/// each volume's owner references (conditional on its resourceVersion) and
/// restarts nothing.
#[tokio::test]
async fn when_deleted_change_updates_volume_owners_only() {
    let (settled, pods, mut pvcs, lockd) = settled_three("0.1.0");
    assert_eq!(
        settled.spec.storage.retention.when_deleted,
        lockd_crds::RetentionAction::Retain
    );
    for (i, p) in pvcs.iter_mut().enumerate() {
        assert!(
            p.metadata.owner_references.is_none(),
            "retained volumes are unowned"
        );
        p.metadata.resource_version = Some(format!("rv-{i}"));
    }
    let lc = edited(&settled, |s| {
        s.storage.retention.when_deleted = lockd_crds::RetentionAction::Delete
    });
    let lockd = Arc::new(lockd);
    let uid = lc.metadata.uid.clone().expect("uid");
    let mut script = Script::default()
        .observe(&pods, &pvcs)
        .singletons(stored_singletons(&lc, 2), [false; 4]);
    for (i, id) in (1..=3u64).enumerate() {
        let stored = to_json(&pvcs[i]);
        let uid = uid.clone();
        script = script.step(Method::PATCH, pvc_path(id), move |seen| {
            assert_eq!(
                seen.content_type.as_deref(),
                Some("application/merge-patch+json")
            );
            let meta = &seen.body["metadata"];
            assert_eq!(meta["resourceVersion"], format!("rv-{i}"));
            let refs = meta["ownerReferences"].as_array().expect("a list");
            assert_eq!(refs.len(), 1);
            assert_eq!(refs[0]["uid"], uid.as_str());
            assert_eq!(refs[0]["controller"], true);
            (StatusCode::OK, stored)
        });
    }
    let script = script.status_patch(&lc);
    let (result, log) = run(&lc, script, lockd.clone(), false).await;
    result.expect("pass succeeds");
    assert!(lockd.acts().is_empty(), "no membership change");
    assert_eq!(
        writes(&log),
        [
            format!("PATCH {}", pvc_path(1)),
            format!("PATCH {}", pvc_path(2)),
            format!("PATCH {}", pvc_path(3)),
            format!("PATCH {}", status_path()),
        ],
        "owner references and the status, no restart"
    );
}

// ---------------------------------------------------------------------------
// 5. Membership action through lockd.

#[tokio::test]
async fn fresh_members_are_added_as_learners_through_lockd() {
    let (old, mut pods, mut pvcs, lockd) = settled_three("0.1.0");
    let lc = edited(&old, |s| s.replicas = 5);
    let cid = cid(&lc);
    // Members 4 and 5 were created by an earlier pass: running, not ready
    // (lockd is ready only inside a cluster), answering uninitialized.
    for id in [4, 5] {
        pods.push(running_pod(&lc, id, false));
        pvcs.push(pvc(&lc, id));
    }
    let lockd = Arc::new(
        lockd
            .answer(4, fresh_status(&cid, 4))
            .answer(5, fresh_status(&cid, 5)),
    );
    let script = Script::default()
        .observe(&pods, &pvcs)
        .singletons(stored_singletons(&old, 2), [false, false, false, true])
        .status_patch(&lc);

    let (result, log) = run(&lc, script, lockd.clone(), false).await;

    assert_eq!(
        result.expect("pass succeeds"),
        Requeue::requeue(REQUEUE_ACTIVE)
    );
    let acts = lockd.acts();
    assert_eq!(
        acts.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>(),
        [Action::AddLearner { id: 4 }, Action::AddLearner { id: 5 }]
    );
    let all: Vec<u64> = (1..=5).collect();
    for (_, targets) in &acts {
        assert_eq!(
            targets.endpoints,
            all.iter()
                .map(|&id| (id, endpoint(id)))
                .collect::<BTreeMap<_, _>>()
        );
        assert_eq!(
            targets.advertise,
            all.iter()
                .map(|&id| (id, advertise(id)))
                .collect::<BTreeMap<_, _>>()
        );
    }
    // No pod or volume write; the budget protects all 5 pods while joining.
    assert_eq!(
        writes(&log),
        [
            format!("PATCH {}", singleton_paths()[3]),
            format!("PATCH {}", status_path())
        ]
    );
    assert_eq!(
        find(&log, Method::PATCH, &singleton_paths()[3]).body["spec"]["minAvailable"],
        5
    );
    let status = written_status(&log);
    assert_eq!(status.phase, LockClusterPhase::Scaling);
    assert_eq!(status.next_member_id, Some(6));
    assert_eq!(condition(&status, "Progressing").reason, "AddingLearners");
    let unknown: Vec<u64> = status
        .members
        .iter()
        .filter(|m| m.role == MemberRole::Unknown)
        .map(|m| m.node_id)
        .collect();
    assert_eq!(unknown, [4, 5], "not members yet");
}

#[tokio::test]
async fn a_joint_configuration_left_behind_is_finished_through_lockd() {
    let (lc, pods, pvcs, lockd) = settled_three("0.1.0");
    let cid = cid(&lc);
    // The leader of a change from {1} to {1, 2, 3} lost leadership between
    // its two steps: the new leader reports both voter sets.
    let mut leader = raft_status(&cid, 1, 1, &[1, 2, 3]);
    leader.joint = true;
    leader.voter_sets = vec![VoterSet { ids: vec![1] }, VoterSet { ids: vec![1, 2, 3] }];
    let lockd = Arc::new(lockd.answer(1, leader));
    let script = Script::default()
        .observe(&pods, &pvcs)
        .singletons(stored_singletons(&lc, 2), [false, false, false, true])
        .status_patch(&lc);

    let (result, log) = run(&lc, script, lockd.clone(), false).await;

    assert_eq!(
        result.expect("pass succeeds"),
        Requeue::requeue(REQUEUE_ACTIVE)
    );
    // No eviction while the membership changes.
    assert_eq!(
        find(&log, Method::PATCH, &singleton_paths()[3]).body["spec"]["minAvailable"],
        3
    );
    assert_eq!(
        lockd
            .acts()
            .iter()
            .map(|(a, _)| a.clone())
            .collect::<Vec<_>>(),
        [Action::ChangeVoters {
            voters: BTreeSet::from([1, 2, 3])
        }]
    );
    let status = written_status(&log);
    assert_eq!(status.phase, LockClusterPhase::Scaling);
    assert_eq!(condition(&status, "Progressing").reason, "ChangingVoters");
}

#[tokio::test]
async fn a_member_unhealthy_past_the_deadline_is_reported_stuck_from_its_recorded_start() {
    let (mut lc, mut pods, pvcs, lockd) = settled_three("0.1.0");
    // Member 3's pod stopped being ready an hour ago (recorded by an earlier
    // pass); member 2 carries a stale record from an earlier episode.
    pods[2] = running_pod(&lc, 3, false);
    // Whole seconds: the API stores times at second precision.
    let hour_ago = Timestamp::from_second(Timestamp::now().as_second() - 3_600).expect("time");
    let hour_ago = Time(hour_ago);
    let status = lc.status.as_mut().expect("settled status");
    status.members[2].unhealthy_since = Some(hour_ago.clone());
    status.members[1].unhealthy_since = Some(hour_ago.clone());
    let lockd = Arc::new(lockd);
    let script = Script::default()
        .observe(&pods, &pvcs)
        .singletons(stored_singletons(&lc, 2), [false, false, false, true])
        .status_patch(&lc);

    let (result, log) = run(&lc, script, lockd.clone(), false).await;

    result.expect("pass succeeds");
    assert!(lockd.acts().is_empty(), "a stuck member is only reported");
    let status = written_status(&log);
    let since: Vec<Option<&Time>> = status
        .members
        .iter()
        .map(|m| m.unhealthy_since.as_ref())
        .collect();
    assert_eq!(since, [None, None, Some(&hour_ago)]);
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "MembersStuck");
    assert!(
        degraded.message.contains("member 3"),
        "{}",
        degraded.message
    );

    // The deadline is the spec's: an hour is within a two-hour deadline.
    lc.spec.progress_deadline_seconds = Some(7_200);
    let script = Script::default()
        .observe(&pods, &pvcs)
        .singletons(stored_singletons(&lc, 2), [false, false, false, true])
        .status_patch(&lc);
    let (result, log) = run(&lc, script, lockd.clone(), false).await;
    result.expect("pass succeeds");
    let status = written_status(&log);
    assert_eq!(status.members[2].unhealthy_since.as_ref(), Some(&hour_ago));
    assert_ne!(condition(&status, "Degraded").reason, "MembersStuck");
}

// ---------------------------------------------------------------------------
// 6. API error surfaced as a condition.

#[tokio::test]
async fn forbidden_pod_apply_fails_the_pass_and_marks_degraded() {
    let lc = cluster(3, "0.1.0");
    let lockd = Arc::new(FakeLockd::default());
    let script = Script::default()
        .observe(&[], &[])
        .singletons_created()
        .apply(pvc_path(1))
        .apply_forbidden(pod_path(1))
        .status_patch(&lc);

    let (result, log) = run(&lc, script, lockd, false).await;

    match result {
        Err(Error::Kube(kube::Error::Api(s))) => {
            assert_eq!(s.code, 403);
            assert!(s.is_forbidden());
        }
        other => panic!("expected a 403 API error, got {other:?}"),
    }
    let status = written_status(&log);
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "ReconcileFailed");
    assert!(
        degraded.message.contains("kubernetes API") && degraded.message.contains("forbidden"),
        "message: {}",
        degraded.message
    );
    assert!(
        degraded.message.contains("demo-1"),
        "message: {}",
        degraded.message
    );
    assert_eq!(status.next_member_id, Some(2));
}

// ---------------------------------------------------------------------------
// 7. Events.

fn assert_event(seen: &Seen, lc: &LockCluster, type_: &str, reason: &str, note: &str) {
    let ev = &seen.body;
    assert_eq!(ev["apiVersion"], "events.k8s.io/v1");
    assert_eq!(ev["kind"], "Event");
    assert_eq!(ev["type"], type_);
    assert_eq!(ev["reason"], reason);
    assert_eq!(ev["note"], note);
    let action = ev["action"].as_str().expect("action");
    assert!(note.starts_with(action), "action {action:?}, note {note:?}");
    assert_eq!(ev["reportingController"], "lockd-operator");
    assert_eq!(ev["reportingInstance"], "lockd-operator-0");
    assert_eq!(ev["metadata"]["namespace"], NS);
    assert!(
        ev["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("demo.")),
        "event name {}",
        ev["metadata"]["name"]
    );
    assert!(ev["eventTime"].is_string());
    assert_eq!(ev["regarding"], to_json(&lc.object_ref(&())));
    assert_eq!(ev["regarding"]["kind"], "LockCluster");
    assert_eq!(ev["regarding"]["uid"], UID);
}

#[tokio::test]
async fn executed_action_publishes_a_normal_event() {
    let lc = cluster(3, "0.1.0");
    let lockd = Arc::new(FakeLockd::default());
    let script = Script::default()
        .observe(&[], &[])
        .singletons_created()
        .create_member(1)
        .event_created()
        .status_patch(&lc);

    let (result, log) = run(&lc, script, lockd, true).await;

    assert_eq!(
        result.expect("pass succeeds"),
        Requeue::requeue(REQUEUE_ACTIVE)
    );
    let ev = find(&log, Method::POST, &events_path());
    assert_eq!(ev.query.get("fieldManager"), None);
    assert_event(ev, &lc, "Normal", "CreateMember", "create member 1");
}

#[tokio::test]
async fn failed_action_publishes_a_warning_event() {
    let lc = cluster(3, "0.1.0");
    let lockd = Arc::new(FakeLockd::default());
    let script = Script::default()
        .observe(&[], &[])
        .singletons_created()
        .apply(pvc_path(1))
        .apply_forbidden(pod_path(1))
        .event_created()
        .status_patch(&lc);

    let (result, log) = run(&lc, script, lockd, true).await;

    assert!(result.is_err());
    let ev = find(&log, Method::POST, &events_path());
    let note = ev.body["note"].as_str().expect("note").to_string();
    assert!(
        note.starts_with("create member 1: kubernetes API: ") && note.contains("forbidden"),
        "note: {note}"
    );
    assert_event(ev, &lc, "Warning", "ActionFailed", &note);
}

/// kube's Recorder folds events by (type, reason, action, reporter,
/// regarding), not by note: two actions of the same kind in one pass
/// (CreateMember of members 4 and 5) must still be two events, each with
/// its own note.
#[tokio::test]
async fn each_action_of_a_pass_gets_its_own_event() {
    let (old, pods, pvcs, lockd) = settled_three("0.1.0");
    let lc = edited(&old, |s| s.replicas = 5);
    let script = Script::default()
        .observe(&pods, &pvcs)
        .singletons(stored_singletons(&old, 2), [false, false, false, true])
        .create_member(4)
        .event_created()
        .create_member(5)
        .event_created()
        .status_patch(&lc);

    let (result, log) = run(&lc, script, Arc::new(lockd), true).await;

    assert!(result.is_ok());
    let notes: Vec<&Value> = log
        .iter()
        .filter(|s| s.path.starts_with(&events_path()))
        .map(|s| &s.body["note"])
        .collect();
    assert_eq!(
        notes,
        [&json!("create member 4"), &json!("create member 5")]
    );
}

// ---------------------------------------------------------------------------
// The harness itself: a pass that does more or less than the script fails.

#[tokio::test]
#[should_panic(expected = "unexpected request after the script")]
async fn harness_rejects_a_request_beyond_the_script() {
    let lc = cluster(3, "0.1.0");
    // The status patch is left out of the script.
    let script = Script::default()
        .observe(&[], &[])
        .singletons_created()
        .create_member(1);
    let _ = run(&lc, script, Arc::new(FakeLockd::default()), false).await;
}

#[tokio::test]
#[should_panic(expected = "never came")]
async fn harness_rejects_a_missing_request() {
    let lc = cluster(3, "0.1.0");
    let script = Script::default()
        .observe(&[], &[])
        .singletons_created()
        .create_member(1)
        .status_patch(&lc)
        .create_member(2);
    let _ = run(&lc, script, Arc::new(FakeLockd::default()), false).await;
}
