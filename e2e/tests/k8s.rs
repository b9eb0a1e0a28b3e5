//! The operator on a real Kubernetes control plane: kube-apiserver and
//! kube-controller-manager built from their Go modules, etcd from Debian, a
//! test kubelet running Pods as lockd processes, and the CRD and manifests/
//! installed with kubectl as the README says ([`lockd_e2e::k8s`]).
//!
//! The scenarios share one control plane and run one at a time, each in a
//! namespace of its own. After each step that changes a LockCluster they
//! check that the operator comes to rest: a reconcile of the unchanged
//! cluster writes nothing (counted in the API server's audit log).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::load::{check_lock, check_writes, Load};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{EvictParams, ListParams};
use kube::{Api, Client, ResourceExt};
use lockd_client::ClientOptions;
use lockd_crds::{conditions, names, LockCluster, LockClusterPhase, MemberRole};
use lockd_e2e::k8s::env::{shared, K8sEnv, NODE_NAME, OPERATOR_NAMESPACE, OPERATOR_USER};
use lockd_e2e::{bounded, cluster_client, wait_for};
use lockd_proto::v1::StatusRequest;
use tokio::task::JoinHandle;

/// Bound of one convergence (create, scale, upgrade step, replacement).
const PHASE: Duration = Duration::from_secs(180);
/// Bound of a whole scenario.
const SCENARIO: Duration = Duration::from_secs(900);
/// lockd's gRPC port in the member Pods.
const GRPC_PORT: u16 = 7001;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn lockcluster_yaml(ns: &str, name: &str, replicas: u32, version: &str, extra: &str) -> String {
    format!(
        "apiVersion: lockd.dev/v1alpha1
kind: LockCluster
metadata:
  name: {name}
  namespace: {ns}
spec:
  replicas: {replicas}
  version: \"{version}\"
  storage:
    size: 64Mi
{extra}"
    )
}

async fn lc(client: &Client, ns: &str, name: &str) -> LockCluster {
    let api: Api<LockCluster> = Api::namespaced(client.clone(), ns);
    match api.get(name).await {
        Ok(lc) => lc,
        Err(e) => panic!("get lc/{name}: {e}"),
    }
}

/// Waits until the LockCluster is Running at `replicas` members on
/// `version`, every member ready and the status naming a leader; returns it.
async fn wait_running(
    env: &K8sEnv,
    ns: &str,
    name: &str,
    replicas: usize,
    version: &str,
) -> LockCluster {
    let client = env.client().await;
    let api: Api<LockCluster> = Api::namespaced(client.clone(), ns);
    let res = wait_for(
        PHASE,
        &format!("lc/{name} Running with {replicas} ready members on {version}"),
        || async {
            let lc = api.get(name).await?;
            let st = lc.status.clone().unwrap_or_default();
            let ready = st.members.iter().filter(|m| m.ready).count();
            anyhow::ensure!(
                st.phase == LockClusterPhase::Running
                    && st.observed_generation == lc.metadata.generation
                    && st.ready_replicas as usize == replicas
                    && st.members.len() == replicas
                    && ready == replicas
                    && st.leader.is_some()
                    && st.current_version.as_deref() == Some(version),
                "phase {:?}, ready {}/{}, members {:?}, leader {:?}, version {:?}, conditions {:?}",
                st.phase,
                st.ready_replicas,
                replicas,
                st.members
                    .iter()
                    .map(|m| (m.node_id, m.role, m.ready))
                    .collect::<Vec<_>>(),
                st.leader,
                st.current_version,
                st.conditions
                    .iter()
                    .map(|c| format!("{}={} {}", c.type_, c.status, c.message))
                    .collect::<Vec<_>>()
            );
            Ok(lc)
        },
    )
    .await;
    match res {
        Ok(lc) => lc,
        Err(e) => {
            env.dump_logs();
            panic!("{e:#}");
        }
    }
}

/// The member Pods of a LockCluster by node id.
async fn member_pods(client: &Client, ns: &str, name: &str) -> BTreeMap<u64, Pod> {
    match try_member_pods(client, ns, name).await {
        Ok(pods) => pods,
        Err(e) => panic!("list pods: {e}"),
    }
}

/// [`member_pods`] for background tasks, which skip a failed round.
async fn try_member_pods(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<BTreeMap<u64, Pod>, kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&names::selector_string(name));
    Ok(pods
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter_map(|p| Some((names::node_id_from_pod_name(name, &p.name_any())?, p)))
        .collect())
}

fn pod_endpoint(p: &Pod) -> Option<String> {
    if p.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ip = p.status.as_ref()?.pod_ip.as_ref()?;
    Some(format!("http://{ip}:{GRPC_PORT}"))
}

/// Feeds the load the members' current endpoints (Pod IPs) until aborted.
fn follow_endpoints(client: Client, ns: String, name: String, load: Arc<Load>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = Vec::new();
        loop {
            let eps: Vec<String> = match try_member_pods(&client, &ns, &name).await {
                Ok(pods) => pods.values().filter_map(pod_endpoint).collect(),
                Err(_) => last.clone(),
            };
            if eps != last && !eps.is_empty() {
                load.set_endpoints(eps.clone());
                last = eps;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

/// Each member's own view: voters and learners as `(id, voter)`, asked of
/// every member directly, must agree with the given voter set and name the
/// same leader.
async fn check_members_agree(client: &Client, ns: &str, name: &str, voters: &BTreeSet<u64>) {
    let pods = member_pods(client, ns, name).await;
    assert_eq!(
        pods.keys().copied().collect::<BTreeSet<_>>(),
        *voters,
        "one Pod per voter"
    );
    // All members asked in one round, retried as a whole: an election
    // between two answers is not a disagreement.
    wait_for(
        PHASE,
        "every member to report the voters and one leader",
        || async {
            let mut leaders = BTreeSet::new();
            for (id, pod) in &pods {
                let ep = pod_endpoint(pod)
                    .ok_or_else(|| anyhow::anyhow!("member {id} has no address"))?;
                let mut c = cluster_client(&ep, Duration::from_secs(2));
                let st = c.status(StatusRequest {}).await?.into_inner();
                let got: BTreeSet<u64> = st
                    .members
                    .iter()
                    .filter(|m| m.voter)
                    .map(|m| m.id)
                    .collect();
                anyhow::ensure!(
                    &got == voters
                        && st.members.len() == voters.len()
                        && !st.joint
                        && st.leader_id != 0,
                    "member {id}: members {:?}, joint {}, leader {}",
                    st.members
                        .iter()
                        .map(|m| (m.id, m.voter))
                        .collect::<Vec<_>>(),
                    st.joint,
                    st.leader_id
                );
                leaders.insert(st.leader_id);
            }
            anyhow::ensure!(
                leaders.len() == 1,
                "members name different leaders: {leaders:?}"
            );
            Ok(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

/// What the operator replicas' /metrics say, per replica (by Pod uid);
/// replicas whose metrics cannot be read are left out.
#[derive(Debug, Default)]
struct OperatorCounts {
    /// Successful reconcile passes.
    reconciles: BTreeMap<String, u64>,
    /// Writes to the API (`lockd_operator_api_requests_total` with a write
    /// verb), except the leader-election Lease and Events.
    writes: BTreeMap<String, u64>,
}

/// The value of a metric line `name{labels} value` when `keep` accepts its
/// labels.
fn metric_sum(body: &str, name: &str, keep: impl Fn(&str) -> bool) -> u64 {
    body.lines()
        .filter_map(|l| {
            let labels = l.strip_prefix(name)?.strip_prefix('{')?.split('}').next()?;
            keep(labels).then_some(())?;
            l.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .map(|v| v as u64)
        .sum()
}

async fn operator_counts(client: &Client) -> OperatorCounts {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let lp = ListParams::default().labels("app.kubernetes.io/name=lockd-operator");
    let mut counts = OperatorCounts::default();
    for p in pods.list(&lp).await.map(|l| l.items).unwrap_or_default() {
        let uid = p.uid().unwrap_or_default();
        let Some(ip) = p.status.and_then(|s| s.pod_ip) else {
            continue;
        };
        let Ok((200, body)) =
            lockd_e2e::http_get(&format!("{ip}:8080"), "/metrics", Duration::from_secs(2)).await
        else {
            continue;
        };
        let ok = metric_sum(&body, "lockd_operator_reconciles_total", |l| {
            l.contains("result=\"ok\"")
        });
        let writes = metric_sum(&body, "lockd_operator_api_requests_total", |l| {
            let write = ["create", "update", "patch", "delete", "deletecollection"]
                .iter()
                .any(|v| l.contains(&format!("verb=\"{v}\"")));
            write && !l.contains("resource=\"leases\"") && !l.contains("resource=\"events\"")
        });
        counts.reconciles.insert(uid.clone(), ok);
        counts.writes.insert(uid, writes);
    }
    counts
}

/// Whether some replica reconciled since `before`: its counter grew, or a
/// replica not seen before (a new leader) has reconciled at all.
fn reconciled_since(before: &BTreeMap<String, u64>, now: &BTreeMap<String, u64>) -> bool {
    now.iter()
        .any(|(uid, n)| before.get(uid).map_or(*n > 0, |b| n > b))
}

/// The operator is at rest for this LockCluster: twice in a row, a
/// reconcile pass that the test triggers (by annotating the LockCluster)
/// completes without a single write by the operator in the namespace.
async fn assert_at_rest(env: &K8sEnv, ns: &str, name: &str) {
    let client = env.client().await;
    let mut quiet = 0;
    let mut nudges = 0;
    let mut last_writes = Vec::new();
    let deadline = tokio::time::Instant::now() + PHASE;
    while quiet < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the operator keeps writing to lc/{name} at rest; last pass wrote: {last_writes:#?}"
        );
        let mark = env.audit_mark();
        let before = operator_counts(&client).await;
        nudges += 1;
        env.kubectl_ok(&[
            "-n",
            ns,
            "annotate",
            "--overwrite",
            &format!("lc/{name}"),
            &format!("e2e.lockd.dev/nudge={nudges}"),
        ])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        let after = wait_for(PHASE, "the operator to reconcile after a nudge", || async {
            let now = operator_counts(&client).await;
            anyhow::ensure!(
                reconciled_since(&before.reconciles, &now.reconciles),
                "reconciles {:?}, before the nudge {:?}",
                now.reconciles,
                before.reconciles
            );
            Ok(now)
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        // Two witnesses: the API server's audit log, and the operator's
        // own request counter (the one to watch on a real cluster).
        let counted = after
            .writes
            .iter()
            .filter(|(uid, n)| before.writes.get(*uid).is_some_and(|b| *n > b))
            .count();
        let writes = mark
            .map(|m| env.writes_by(OPERATOR_USER, ns, m))
            .unwrap_or_default();
        if counted > 0 {
            quiet = 0;
            last_writes = vec![format!(
                "lockd_operator_api_requests_total writes grew: {:?} -> {:?}",
                before.writes, after.writes
            )];
        } else if writes.is_empty() {
            quiet += 1;
        } else {
            quiet = 0;
            last_writes = writes
                .iter()
                .map(|w| {
                    format!(
                        "{} {}/{} {}",
                        w["verb"],
                        w["objectRef"]["resource"],
                        w["objectRef"]["subresource"],
                        w["objectRef"]["name"]
                    )
                })
                .collect();
        }
    }
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// The CRD installs without warnings and the real API server enforces its
/// rules: an even `replicas` is rejected with the CEL rule's message, at
/// create and through `kubectl scale`, and so is an election timeout that
/// is not above 2.5 heartbeats.
/// Not a scenario: keeps a local control plane and test kubelet up until
/// Ctrl-C, and prints how to run the scenarios against it as an existing
/// cluster (`LOCKD_E2E_KUBECONFIG`), which exercises that mode here.
#[ignore = "a tool: runs until Ctrl-C"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_a_local_cluster_for_external_runs() {
    let env = shared().await;
    let Some((kubeconfig, kubectl)) = env.local_access() else {
        panic!("already running against an existing cluster");
    };
    println!(
        "LOCKD_E2E_KUBECONFIG={} LOCKD_E2E_KUBECTL={}",
        kubeconfig.display(),
        kubectl.display()
    );
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_rejects_even_sizes_and_bad_timing() {
    let env = shared().await;
    let _serial = env.serial().await;
    bounded(SCENARIO, "admission scenario", async {
        let ns = env.namespace("admission").await;

        let (ok, _, err) = env
            .kubectl_stdin(
                &["apply", "-f", "-"],
                Some(&lockcluster_yaml(&ns, "even", 4, "0.1.0", "")),
            )
            .await
            .expect("kubectl");
        assert!(!ok, "replicas 4 was accepted");
        assert!(
            err.contains("spec.replicas") && err.contains("replicas must be odd"),
            "kubectl's message names the rule: {err}"
        );

        let timing = "  lockd:\n    heartbeatMs: 400\n    electionTimeoutMs: 1000\n";
        let (ok, _, err) = env
            .kubectl_stdin(
                &["apply", "-f", "-"],
                Some(&lockcluster_yaml(&ns, "timing", 1, "0.1.0", timing)),
            )
            .await
            .expect("kubectl");
        assert!(!ok, "an election timeout of 2.5 heartbeats was accepted");
        assert!(
            err.contains("electionTimeoutMs"),
            "the message names the field: {err}"
        );

        // A valid one, then `kubectl scale` through the scale subresource.
        env.kubectl_stdin(
            &["apply", "-f", "-"],
            Some(&lockcluster_yaml(&ns, "one", 1, "0.1.0", "")),
        )
        .await
        .expect("kubectl");
        let (ok, out, err) = env
            .kubectl(&["-n", &ns, "scale", "lc/one", "--replicas=4"])
            .await
            .expect("kubectl");
        assert!(!ok, "kubectl scale to 4 was accepted: {out}");
        assert!(
            err.contains("replicas must be odd"),
            "kubectl scale's message: {err}"
        );
        let client = env.client().await;
        assert_eq!(
            lc(&client, &ns, "one").await.spec.replicas,
            1,
            "rejected scale changed nothing"
        );
        wait_running(env, &ns, "one", 1, "0.1.0").await;
        assert_at_rest(env, &ns, "one").await;
        let (ok, _, err) = env
            .kubectl(&["-n", &ns, "scale", "lc/one", "--replicas=0"])
            .await
            .expect("kubectl");
        assert!(!ok, "replicas 0 accepted: {err}");

        env.kubectl_ok(&[
            "-n",
            &ns,
            "delete",
            "lc/one",
            "--wait=true",
            "--timeout=120s",
        ])
        .await
        .expect("delete lc/one");
        env.drop_namespace(&ns).await;
    })
    .await;
}

/// The operator Deployment from manifests/ runs (two replicas, as processes
/// of the test kubelet) and talks to the API server with its own
/// ServiceAccount token, so RBAC is the real one: one replica holds the
/// Lease and its writes are audited as the ServiceAccount; the real
/// authorizer grants what the operator needs and nothing it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_runs_with_its_service_account() {
    let env = shared().await;
    let _serial = env.serial().await;
    bounded(SCENARIO, "service account scenario", async {
        let client = env.client().await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
        let lp = ListParams::default().labels("app.kubernetes.io/name=lockd-operator");
        let list = wait_for(PHASE, "two ready operator replicas", || async {
            let list = pods.list(&lp).await?;
            let ready = list.items.iter().filter(|p| is_ready(p)).count();
            anyhow::ensure!(
                list.items.len() == 2 && ready == 2,
                "{ready} of {} ready",
                list.items.len()
            );
            Ok(list)
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        let names: BTreeSet<String> = list.items.iter().map(|p| p.name_any()).collect();
        for p in &list.items {
            let spec = p.spec.as_ref().expect("spec");
            assert_eq!(spec.service_account_name.as_deref(), Some("lockd-operator"));
            if env.is_local() {
                assert_eq!(spec.node_name.as_deref(), Some(NODE_NAME));
            }
        }

        let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
        let holder = wait_for(PHASE, "an operator replica to hold the Lease", || async {
            let l = leases.get("lockd-operator").await?;
            l.spec
                .and_then(|s| s.holder_identity)
                .filter(|h| names.contains(h))
                .ok_or_else(|| anyhow::anyhow!("no holder among {names:?}"))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!("operator leader: {holder}");

        if env.is_local() {
            let lease_writes = env.writes_by(OPERATOR_USER, OPERATOR_NAMESPACE, 0);
            assert!(
                lease_writes
                    .iter()
                    .any(|w| w["objectRef"]["resource"] == "leases"),
                "the operator's Lease writes are audited as {OPERATOR_USER}"
            );
        }

        let sa = format!("--as={OPERATOR_USER}");
        // (verb, resource, subresource, allowed)
        for (verb, resource, sub, allowed) in [
            ("watch", "lockclusters.lockd.dev", "", true),
            ("patch", "lockclusters.lockd.dev", "status", true),
            ("create", "pods", "", true),
            ("delete", "pods", "", true),
            ("create", "persistentvolumeclaims", "", true),
            ("patch", "poddisruptionbudgets.policy", "", true),
            ("create", "events", "", true),
            ("get", "secrets", "", false),
            ("create", "pods", "exec", false),
            ("delete", "lockclusters.lockd.dev", "", false),
            ("update", "nodes", "", false),
        ] {
            let mut args = vec!["auth", "can-i", verb, resource, "-n", "default", &sa];
            let sub_flag = format!("--subresource={sub}");
            if !sub.is_empty() {
                args.push(&sub_flag);
            }
            let (ok, out, err) = env.kubectl(&args).await.expect("kubectl auth can-i");
            let resource = format!("{resource} {sub}");
            let answer = out.trim();
            assert_eq!(
                answer == "yes",
                allowed,
                "can the operator {verb} {resource}? {answer} {err} (exit ok: {ok})"
            );
        }
    })
    .await;
}

/// A LockCluster's whole life under a client that writes and holds a lock
/// throughout: create 3 members, scale to 5 and back to 3, a rolling
/// upgrade, then deletion and garbage collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_create_scale_upgrade_delete() {
    let env = shared().await;
    let _serial = env.serial().await;
    let ns = env.namespace("life").await;
    bounded(SCENARIO, "lifecycle scenario", lifecycle(env, &ns)).await;
    env.drop_namespace(&ns).await;
}

async fn lifecycle(env: &K8sEnv, ns: &str) {
    let name = "life";
    let client = env.client().await;
    // whenDeleted starts at Retain and becomes Delete before the deletion:
    // the volumes' ownership must follow.
    let retention = "    retention:\n      whenScaled: Delete\n      whenDeleted: Retain\n";
    env.kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&lockcluster_yaml(ns, name, 3, "0.1.0", retention)),
    )
    .await
    .expect("kubectl apply");

    // --- create ----------------------------------------------------------
    let lc3 = wait_running(env, ns, name, 3, "0.1.0").await;
    let st = lc3.status.clone().expect("status");
    let ids: BTreeSet<u64> = st.members.iter().map(|m| m.node_id).collect();
    check_members_agree(&client, ns, name, &ids).await;
    assert_eq!(
        st.members
            .iter()
            .filter(|m| m.role == MemberRole::Leader)
            .count(),
        1,
        "one leader among {:?}",
        st.members
    );
    assert!(
        conditions::is_true(&st.conditions, conditions::AVAILABLE),
        "{:?}",
        st.conditions
    );
    assert!(
        !conditions::is_true(&st.conditions, conditions::DEGRADED),
        "{:?}",
        st.conditions
    );
    check_owned_objects(&client, ns, name, &lc3, false).await;
    check_printer_columns(env, ns, name).await;
    assert_at_rest(env, ns, name).await;

    // --- scale 3 -> 5 -> 3 under load --------------------------------------
    let load = Arc::new(Load::start("/k8s", true));
    let follower = follow_endpoints(
        client.clone(),
        ns.to_string(),
        name.to_string(),
        load.clone(),
    );
    load.progressed("before scaling").await;

    let (ok, _, err) = env
        .kubectl(&["-n", ns, "scale", &format!("lc/{name}"), "--replicas=4"])
        .await
        .expect("kubectl");
    assert!(
        !ok && err.contains("replicas must be odd"),
        "scale to 4: {err}"
    );
    env.kubectl_ok(&["-n", ns, "scale", &format!("lc/{name}"), "--replicas=5"])
        .await
        .expect("scale to 5");
    let lc5 = wait_running(env, ns, name, 5, "0.1.0").await;
    let ids5: BTreeSet<u64> = lc5
        .status
        .as_ref()
        .expect("status")
        .members
        .iter()
        .map(|m| m.node_id)
        .collect();
    assert!(
        ids5.is_superset(&ids),
        "scale-up keeps the members {ids:?}: {ids5:?}"
    );
    check_members_agree(&client, ns, name, &ids5).await;
    load.progressed("at 5 members").await;

    env.kubectl_ok(&["-n", ns, "scale", &format!("lc/{name}"), "--replicas=3"])
        .await
        .expect("scale to 3");
    let lc3b = wait_running(env, ns, name, 3, "0.1.0").await;
    let ids3: BTreeSet<u64> = lc3b
        .status
        .as_ref()
        .expect("status")
        .members
        .iter()
        .map(|m| m.node_id)
        .collect();
    check_members_agree(&client, ns, name, &ids3).await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    for gone in ids5.difference(&ids3) {
        wait_for(
            PHASE,
            &format!("the volume of removed member {gone} to go"),
            || async {
                let p = pvcs.get_opt(&names::pvc_name(name, *gone)).await?;
                anyhow::ensure!(p.is_none(), "still there");
                Ok(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#} (whenScaled: Delete)"));
    }
    load.progressed("back at 3 members").await;
    stop_and_check(env, ns, name, "/k8s", load, follower).await;
    assert_at_rest(env, ns, name).await;

    // --- rolling upgrade under load --------------------------------------
    let before = member_pods(&client, ns, name).await;
    let leader_before = lc(&client, ns, name)
        .await
        .status
        .and_then(|s| s.leader_id)
        .expect("a leader");
    let load = Arc::new(Load::start("/k8s-upgrade", true));
    let follower = follow_endpoints(
        client.clone(),
        ns.to_string(),
        name.to_string(),
        load.clone(),
    );
    load.progressed("before the upgrade").await;
    let mark = env.audit_mark();
    let probe = Arc::new(std::sync::Mutex::new((0u32, Vec::<u64>::new())));
    let evictions = spawn_eviction_probe(
        env.client_without_retries().await,
        ns.to_string(),
        name.to_string(),
        probe.clone(),
    );
    env.kubectl_ok(&[
        "-n",
        ns,
        "patch",
        &format!("lc/{name}"),
        "--type=merge",
        "-p",
        r#"{"spec":{"version":"0.2.0"}}"#,
    ])
    .await
    .expect("patch version");
    wait_running(env, ns, name, 3, "0.2.0").await;
    load.progressed("after the upgrade").await;
    let after = member_pods(&client, ns, name).await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "an upgrade keeps the node ids"
    );
    for (id, pod) in &after {
        assert_ne!(pod.uid(), before[id].uid(), "member {id} was restarted");
        let image = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.clone());
        assert_eq!(
            image.as_deref(),
            Some("ghcr.io/lockd/lockd:0.2.0"),
            "member {id}"
        );
    }
    // The members came back one at a time (each waits for the one before it
    // to be ready and caught up), the leader's last.
    // (Creation times have whole seconds: a tie with the leader passes.)
    let created: BTreeMap<u64, _> = after
        .iter()
        .filter_map(|(id, p)| Some((*id, p.metadata.creation_timestamp.clone()?.0)))
        .collect();
    let leader_created = created.get(&leader_before).copied();
    assert!(
        leader_created.is_some_and(|l| created.values().all(|t| *t <= l)),
        "the leader restarts last: {created:?}, leader {leader_before}"
    );
    // Every member's Pod was deleted once, by the operator, the leader's
    // last (from the audit log, when it is ours).
    if let Some(mark) = mark {
        let deletes: Vec<String> = env
            .writes_by(OPERATOR_USER, ns, mark)
            .iter()
            .filter(|w| {
                w["verb"] == "delete"
                    && w["objectRef"]["resource"] == "pods"
                    && w["responseStatus"]["code"]
                        .as_u64()
                        .is_some_and(|c| c < 300)
            })
            .filter_map(|w| w["objectRef"]["name"].as_str().map(str::to_string))
            .collect();
        let expected: BTreeSet<String> =
            before.keys().map(|id| names::pod_name(name, *id)).collect();
        assert_eq!(deletes.len(), 3, "one restart per member: {deletes:?}");
        assert_eq!(
            deletes.iter().cloned().collect::<BTreeSet<_>>(),
            expected,
            "{deletes:?}"
        );
        assert_eq!(
            deletes.last(),
            Some(&names::pod_name(name, leader_before)),
            "the leader restarts last: {deletes:?}"
        );
    }
    stop_and_check(env, ns, name, "/k8s-upgrade", load, follower).await;
    check_members_agree(&client, ns, name, &ids3).await;
    evictions.abort();
    let _ = evictions.await;
    let (refused, evicted) = probe.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        evicted.is_empty(),
        "members evicted while another was restarting: {evicted:?}"
    );
    assert!(
        refused >= 1,
        "no eviction was tried while a member was down"
    );
    eprintln!("evictions refused while a member restarted: {refused}");
    assert_at_rest(env, ns, name).await;

    // --- deletion and garbage collection ---------------------------------
    env.kubectl_ok(&[
        "-n",
        ns,
        "patch",
        &format!("lc/{name}"),
        "--type=merge",
        "-p",
        r#"{"spec":{"storage":{"retention":{"whenDeleted":"Delete"}}}}"#,
    ])
    .await
    .expect("patch whenDeleted");
    let lc_now = lc(&client, ns, name).await;
    wait_for(
        PHASE,
        "the volumes to be owned by the LockCluster",
        || async {
            let uid = lc_now.uid().unwrap_or_default();
            for id in &ids3 {
                let pvc = pvcs.get(&names::pvc_name(name, *id)).await?;
                anyhow::ensure!(
                    pvc.owner_references().iter().any(|r| r.uid == uid),
                    "volume of member {id} not owned yet"
                );
            }
            Ok(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        member_pods(&client, ns, name)
            .await
            .values()
            .map(|p| p.uid())
            .collect::<Vec<_>>(),
        after.values().map(|p| p.uid()).collect::<Vec<_>>(),
        "a retention change restarts no member"
    );
    assert_at_rest(env, ns, name).await;
    env.kubectl_ok(&["-n", ns, "delete", &format!("lc/{name}"), "--wait=false"])
        .await
        .expect("delete lc");
    wait_for(
        PHASE,
        "the garbage collector to remove every owned object",
        || async {
            let sel = ListParams::default().labels(&names::selector_string(name));
            let pods = Api::<Pod>::namespaced(client.clone(), ns)
                .list(&ListParams::default())
                .await?
                .items
                .len();
            let pvcs = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
                .list(&ListParams::default())
                .await?
                .items
                .len();
            let svcs = Api::<Service>::namespaced(client.clone(), ns)
                .list(&sel)
                .await?
                .items
                .len();
            let cms = Api::<ConfigMap>::namespaced(client.clone(), ns)
                .list(&sel)
                .await?
                .items
                .len();
            let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
                .list(&ListParams::default())
                .await?
                .items
                .len();
            anyhow::ensure!(
                pods + pvcs + svcs + cms + pdbs == 0,
                "left: {pods} pods, {pvcs} pvcs, {svcs} services, {cms} configmaps, {pdbs} pdbs"
            );
            Ok(())
        },
    )
    .await
    .unwrap_or_else(|e| {
        env.dump_logs();
        panic!("{e:#}")
    });
}

/// Stops the load and checks it: every acknowledged write is there and the
/// lock was never held by two contenders at once.
async fn stop_and_check(
    env: &K8sEnv,
    ns: &str,
    name: &str,
    prefix: &str,
    load: Arc<Load>,
    follower: JoinHandle<()>,
) {
    follower.abort();
    let _ = follower.await;
    let load = Arc::try_unwrap(load).unwrap_or_else(|_| panic!("the load is still shared"));
    let (writes, locks) = load.stop().await;
    let client = env.client().await;
    let eps: Vec<String> = member_pods(&client, ns, name)
        .await
        .values()
        .filter_map(pod_endpoint)
        .collect();
    check_writes(&eps[0], &writes).await;
    let lockd = lockd_client::Client::connect_with(
        eps,
        ClientOptions {
            request_timeout: Duration::from_secs(5),
            retry_budget: Duration::from_secs(20),
        },
    )
    .expect("connect");
    check_lock(&lockd, prefix, &locks).await;
}

/// Whenever the operator has just taken a member down (its Pod is
/// terminating), tries, as a node drain would, to evict another, ready
/// member: the quorum-aware PodDisruptionBudget must refuse (429). Counts
/// refusals and records members that were evicted anyway in `seen`.
fn spawn_eviction_probe(
    client: Client,
    ns: String,
    name: String,
    seen: Arc<std::sync::Mutex<(u32, Vec<u64>)>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let mut probed = BTreeSet::new();
        loop {
            let Ok(members) = try_member_pods(&client, &ns, &name).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            // A member is down from its Pod's deletion until its new Pod is
            // ready: terminating, then starting (the longer part).
            let terminating = members
                .values()
                .find(|p| {
                    (p.metadata.deletion_timestamp.is_some() || !is_ready(p))
                        && !probed.contains(&p.uid())
                })
                .map(|p| p.uid());
            let victim = members
                .iter()
                .find(|(_, p)| p.metadata.deletion_timestamp.is_none() && is_ready(p));
            if let (Some(uid), Some((id, victim))) = (terminating, victim) {
                probed.insert(uid);
                let res = pods
                    .evict(&victim.name_any(), &EvictParams::default())
                    .await;
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                match res {
                    Err(kube::Error::Api(s)) if s.code == 429 => seen.0 += 1,
                    Ok(_) => seen.1.push(*id),
                    Err(e) => eprintln!("eviction of member {id}: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The Services, ConfigMap, PDB and PVCs exist and are owned by the
/// LockCluster (so the garbage collector can remove them).
async fn check_owned_objects(
    client: &Client,
    ns: &str,
    name: &str,
    lc: &LockCluster,
    volumes_owned: bool,
) {
    let uid = lc.uid().expect("uid");
    let owned = |refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]| {
        refs.iter()
            .any(|r| r.uid == uid && r.controller == Some(true))
    };
    let svc: Api<Service> = Api::namespaced(client.clone(), ns);
    for s in [
        names::client_service_name(name),
        names::peer_service_name(name),
    ] {
        let s = svc
            .get(&s)
            .await
            .unwrap_or_else(|e| panic!("service {s}: {e}"));
        assert!(
            owned(s.owner_references()),
            "service {} owned",
            s.name_any()
        );
    }
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let c = cm
        .get(&names::config_map_name(name))
        .await
        .expect("configmap");
    assert!(owned(c.owner_references()));
    let pdb: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    let p = pdb.get(&names::pdb_name(name)).await.expect("pdb");
    assert!(owned(p.owner_references()));
    // Three voters tolerate one voluntary disruption at rest.
    let allowed = wait_for(
        PHASE,
        "the disruption controller to count the PDB",
        || async {
            let p = pdb.get(&names::pdb_name(name)).await?;
            let st = p.status.ok_or_else(|| anyhow::anyhow!("no status yet"))?;
            // The disruption controller may first count before every Pod
            // is known to it; 1 is where it must settle.
            anyhow::ensure!(
                st.observed_generation == p.metadata.generation
                    && st.disruptions_allowed == Some(1),
                "generation {:?} observed {:?}, allowed {:?}",
                p.metadata.generation,
                st.observed_generation,
                st.disruptions_allowed
            );
            Ok(st.disruptions_allowed)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        allowed,
        Some(1),
        "a 3-voter cluster at rest allows one disruption"
    );
    for (id, pod) in member_pods(client, ns, name).await {
        assert!(owned(pod.owner_references()), "pod of member {id} owned");
        let claim = names::pvc_name(name, id);
        let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
            .get(&claim)
            .await
            .unwrap_or_else(|e| panic!("pvc {claim}: {e}"));
        assert_eq!(
            owned(pvc.owner_references()),
            volumes_owned,
            "{claim} is owned exactly when whenDeleted is Delete"
        );
    }
}

/// `kubectl get lc` prints the printer columns with the status's values.
async fn check_printer_columns(env: &K8sEnv, ns: &str, name: &str) {
    let client = env.client().await;
    // Retried as a whole: the status (a leader change) may move between
    // the read and kubectl's.
    wait_for(PHASE, "kubectl get lc to print the status", || async {
        let lc = lc(&client, ns, name).await;
        let out = env.kubectl_ok(&["-n", ns, "get", "lc", name]).await?;
        let mut lines = out.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let row: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let st = lc.status.clone().unwrap_or_default();
        let want = [
            name.to_string(),
            lc.spec.replicas.to_string(),
            st.ready_replicas.to_string(),
            st.leader.clone().unwrap_or_default(),
            lc.spec.version.clone(),
            "Running".to_string(),
        ];
        anyhow::ensure!(
            header == ["NAME", "REPLICAS", "READY", "LEADER", "VERSION", "PHASE", "AGE"]
                && row.len() == 7
                && row[..6] == want,
            "printed {out:?}, status says {want:?}"
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

/// A member whose Pod and volume are both deleted is replaced under a new
/// node id; the old id leaves the Raft membership. Deleting the LockCluster
/// afterwards keeps the volumes (whenDeleted: Retain, the default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_member_is_replaced_under_a_new_id() {
    let env = shared().await;
    let _serial = env.serial().await;
    let ns = env.namespace("replace").await;
    bounded(SCENARIO, "replacement scenario", replacement(env, &ns)).await;
    env.drop_namespace(&ns).await;
}

async fn replacement(env: &K8sEnv, ns: &str) {
    let name = "repl";
    let client = env.client().await;
    env.kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&lockcluster_yaml(ns, name, 3, "0.1.0", "")),
    )
    .await
    .expect("kubectl apply");
    let lc0 = wait_running(env, ns, name, 3, "0.1.0").await;
    let st = lc0.status.expect("status");
    let ids: BTreeSet<u64> = st.members.iter().map(|m| m.node_id).collect();
    let victim = st
        .members
        .iter()
        .find(|m| m.role == MemberRole::Follower)
        .map(|m| m.node_id)
        .expect("a follower");
    let load = Arc::new(Load::start("/k8s-replace", false));
    let follower = follow_endpoints(
        client.clone(),
        ns.to_string(),
        name.to_string(),
        load.clone(),
    );
    load.progressed("before the loss").await;

    env.kubectl_ok(&[
        "-n",
        ns,
        "delete",
        "pvc",
        &names::pvc_name(name, victim),
        "--wait=false",
    ])
    .await
    .expect("delete pvc");
    env.kubectl_ok(&[
        "-n",
        ns,
        "delete",
        "pod",
        &names::pod_name(name, victim),
        "--wait=false",
    ])
    .await
    .expect("delete pod");

    let replaced = wait_for(PHASE, "a replacement member under a new id", || async {
        let lc = Api::<LockCluster>::namespaced(client.clone(), ns)
            .get(name)
            .await?;
        let st = lc.status.unwrap_or_default();
        let now: BTreeSet<u64> = st
            .members
            .iter()
            .filter(|m| m.ready)
            .map(|m| m.node_id)
            .collect();
        anyhow::ensure!(
            st.phase == LockClusterPhase::Running && now.len() == 3 && !now.contains(&victim),
            "phase {:?}, ready members {now:?}",
            st.phase
        );
        Ok(now)
    })
    .await
    .unwrap_or_else(|e| {
        env.dump_logs();
        panic!("{e:#}")
    });
    let new: Vec<&u64> = replaced.difference(&ids).collect();
    assert_eq!(new.len(), 1, "one new member: {replaced:?} (was {ids:?})");
    assert!(
        *new[0] > *ids.iter().max().expect("ids"),
        "the new id is fresh: {new:?}"
    );
    check_members_agree(&client, ns, name, &replaced).await;
    load.progressed("after the replacement").await;
    follower.abort();
    let _ = follower.await;
    let load = Arc::try_unwrap(load).unwrap_or_else(|_| panic!("the load is still shared"));
    let (writes, _) = load.stop().await;
    let eps: Vec<String> = member_pods(&client, ns, name)
        .await
        .values()
        .filter_map(pod_endpoint)
        .collect();
    check_writes(&eps[0], &writes).await;
    assert_at_rest(env, ns, name).await;

    // Deleting the cluster keeps the volumes (the default whenDeleted: Retain).
    env.kubectl_ok(&["-n", ns, "delete", &format!("lc/{name}"), "--wait=false"])
        .await
        .expect("delete lc");
    wait_for(
        PHASE,
        "the members' Pods to be garbage-collected",
        || async {
            let left = Api::<Pod>::namespaced(client.clone(), ns)
                .list(&ListParams::default())
                .await?
                .items
                .len();
            anyhow::ensure!(left == 0, "{left} pods left");
            Ok(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let pvcs: BTreeSet<String> = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list pvcs")
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    let kept: BTreeSet<String> = replaced
        .iter()
        .map(|id| names::pvc_name(name, *id))
        .collect();
    assert!(pvcs.is_superset(&kept), "volumes kept: {pvcs:?}");
}
