//! A test kubelet: plays node, scheduler and container runtime for the e2e
//! tier, which runs a real kube-apiserver and kube-controller-manager but no
//! kubelet, no scheduler and no container runtime.
//!
//! Each Pod's first container runs as a local process (as root: the Pod's
//! `securityContext` is ignored), in its own mount namespace where the
//! kubelet's hosts file, the Pod's volumes and its service-account token are
//! bind-mounted. Towards the API server it behaves like a real kubelet: it
//! registers a Node and renews its Lease, binds pending Pods to itself,
//! reports Pod status, runs HTTP probes, restarts containers with backoff and
//! finalizes graceful deletions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;

/// Namespace of the node heartbeat Leases.
const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// How often the node Lease is renewed (a real kubelet's default).
const LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(10);
/// How often the Node's Ready condition heartbeat is re-posted.
const NODE_STATUS_INTERVAL: Duration = Duration::from_secs(60);
/// Field manager for the kubelet's server-side-apply writes.
const FIELD_MANAGER: &str = "test-kubelet";
/// The only address of the "node" (and thus every Pod's hostIP).
const HOST_IP: &str = "127.0.0.1";

/// Configuration of a [`TestKubelet`].
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// Name of the Node object, e.g. "e2e-node".
    pub node_name: String,
    /// Kubelet state directory (exists, writable): holds `pods/`,
    /// `volumes/`, `logs/` and the `hosts` file.
    pub root: PathBuf,
    /// Pods get addresses `127.{p0}.{p1}.N`, N = 2..=254, then
    /// `127.{p0}.{p1+1}.N` and so on; an address is never reused.
    pub ip_prefix: [u8; 2],
    /// Executable name -> host path of the binary that "image" runs.
    pub binaries: BTreeMap<String, PathBuf>,
    /// Exported to containers as `KUBERNETES_SERVICE_HOST`.
    pub api_host: String,
    /// Exported to containers as `KUBERNETES_SERVICE_PORT`.
    pub api_port: u16,
    /// API server CA, written as `ca.crt` into service-account token mounts.
    pub ca_pem: String,
}

/// State shared between the kubelet's tasks and the [`TestKubelet`] handle.
struct Shared {
    cfg: KubeletConfig,
    client: kube::Client,
    /// Index of the next pod address (see [`pod_ip`]); addresses are never
    /// reused so that a late packet to a dead pod cannot reach a new one.
    next_ip: Mutex<u32>,
    /// Hosts file entries by "namespace/pod". Entries of deleted pods stay
    /// until the name gets a new address, so the file never shrinks under
    /// readers.
    hosts: Mutex<BTreeMap<String, (Ipv4Addr, Vec<String>)>>,
    /// Per-pod actors by Pod uid.
    pods: Mutex<PodTable>,
    /// Running container processes: Pod uid -> pid, for `shutdown`.
    children: Mutex<HashMap<String, i32>>,
    /// Topmost directories the kubelet created on the host as mount points,
    /// removed by `shutdown`.
    created_dirs: Mutex<Vec<PathBuf>>,
    /// Uids of Pods a binding was attempted for: each Pod is bound once,
    /// however many watch events arrive before the binding shows.
    binding: Mutex<HashSet<String>>,
    /// Set by `shutdown`: no process may be (re)started afterwards.
    shutting_down: AtomicBool,
}

/// The per-pod actors: each gets the latest Pod object through a watch
/// channel (`None` once the Pod is gone from the API).
#[derive(Default)]
struct PodTable {
    actors: HashMap<String, tokio::sync::watch::Sender<Option<Pod>>>,
    /// Uids whose actor has finished: later watch events for them (the
    /// final Delete, a stale Apply) must not start the Pod again.
    finished: HashSet<String>,
}

/// Locks `m`, recovering from poisoning: every critical section leaves its
/// data consistent, and the kubelet must keep going (and `shutdown` must
/// work) even if some task panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The current time as a Kubernetes `Time`.
fn now() -> Time {
    Time(Timestamp::now())
}

/// Whether `e` is an API error with HTTP status `code`.
fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Handle to a running test kubelet. Its loops run as tokio tasks on the
/// runtime `start` was called on.
pub struct TestKubelet {
    shared: Arc<Shared>,
}

impl TestKubelet {
    /// Registers the Node and starts all loops as tokio tasks on the
    /// current runtime (the caller guarantees this runtime lives until
    /// process exit).
    pub async fn start(client: kube::Client, cfg: KubeletConfig) -> Result<TestKubelet> {
        for sub in ["pods", "volumes", "logs"] {
            let dir = cfg.root.join(sub);
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let shared = Arc::new(Shared {
            cfg,
            client,
            next_ip: Mutex::new(0),
            hosts: Mutex::new(BTreeMap::new()),
            pods: Mutex::new(PodTable::default()),
            children: Mutex::new(HashMap::new()),
            created_dirs: Mutex::new(Vec::new()),
            binding: Mutex::new(HashSet::new()),
            shutting_down: AtomicBool::new(false),
        });
        // The hosts file must exist before the first process bind-mounts it.
        shared.write_hosts()?;
        let transition = now();
        register_node(&shared, &transition).await?;
        tokio::spawn(node_heartbeat_loop(shared.clone(), transition));
        tokio::spawn(pvc_watch_loop(shared.clone()));
        tokio::spawn(pod_watch_loop(shared.clone()));
        Ok(TestKubelet { shared })
    }

    /// Log (stdout+stderr) of a pod's container process, all restarts
    /// concatenated, "" if none.
    pub fn pod_log(&self, namespace: &str, pod: &str) -> String {
        std::fs::read(self.shared.log_path(namespace, pod))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Prints every pod's log tail (last ~60 lines each) to stderr with
    /// headers (for test failures).
    pub fn dump_logs(&self) {
        let dir = self.shared.cfg.root.join("logs");
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => {
                eprintln!("test-kubelet: reading {}: {e}", dir.display());
                return;
            }
        };
        files.sort();
        for path in files {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = std::fs::read(&path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            eprintln!("===== test-kubelet: pod {name} (last 60 lines) =====");
            eprintln!("{}", tail_lines(&text, 60, usize::MAX));
        }
    }

    /// Kills every process (SIGKILL) and removes the host mount-point
    /// directories the kubelet created. Idempotent and synchronous: it runs
    /// from an atexit hook, where the runtime may be gone.
    pub fn shutdown(&self) {
        let shared = &self.shared;
        // Taken under the children lock so that no actor can register a new
        // process after the drain below (see `spawn_container`).
        {
            let mut children = lock(&shared.children);
            shared.shutting_down.store(true, Ordering::SeqCst);
            for (_, pid) in children.drain() {
                // SAFETY: plain syscall; the pid is one of our unreaped
                // children, so it cannot have been recycled.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        // The mount points are empty on the host: the bind mounts exist only
        // in the children's mount namespaces.
        // Only empty directories go, bottom up: whatever another process
        // put there (another test kubelet, say) stays.
        for dir in lock(&shared.created_dirs).drain(..) {
            if let Err(e) = remove_empty_tree(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("test-kubelet: removing {}: {e}", dir.display());
                }
            }
        }
    }
}

impl Drop for TestKubelet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---------------------------------------------------------------------------
// Hosts file
// ---------------------------------------------------------------------------

impl Shared {
    fn hosts_path(&self) -> PathBuf {
        self.cfg.root.join("hosts")
    }

    /// Records `names` at `ip` for `namespace/pod` and rewrites the hosts
    /// file.
    fn set_host(&self, namespace: &str, pod: &str, ip: Ipv4Addr, names: Vec<String>) {
        lock(&self.hosts).insert(format!("{namespace}/{pod}"), (ip, names));
        if let Err(e) = self.write_hosts() {
            eprintln!("test-kubelet: writing hosts file: {e:#}");
        }
    }

    /// Rewrites the hosts file IN PLACE: it is bind-mounted onto
    /// `/etc/hosts` of running processes, and replacing it (rename) would
    /// leave them with the old inode. The map lock is held while writing so
    /// concurrent rewrites cannot interleave.
    fn write_hosts(&self) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let hosts = lock(&self.hosts);
        let content = render_hosts(hosts.values().map(|(ip, names)| (ip, names)));
        let path = self.hosts_path();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        file.write_all_at(content.as_bytes(), 0)
            .with_context(|| format!("write {}", path.display()))?;
        file.set_len(content.len() as u64)
            .with_context(|| format!("truncate {}", path.display()))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Node registration and heartbeats
// ---------------------------------------------------------------------------

/// First line of a small host file, "" if unreadable (plausible node info
/// is all that is needed).
/// Removes `dir` and the directories below it, as long as they hold
/// nothing but (empty) directories; stops at the first other entry.
fn remove_empty_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_empty_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

fn read_host_file(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.lines().next().unwrap_or_default().trim().to_string())
        .unwrap_or_default()
}

/// The Node's status: always Ready, with every pressure condition False.
/// `transition` is the fixed lastTransitionTime; the heartbeat is now.
fn node_status(cfg: &KubeletConfig, transition: &Time) -> k8s_openapi::api::core::v1::NodeStatus {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let heartbeat = now();
    let cond = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_heartbeat_time: Some(heartbeat.clone()),
        last_transition_time: Some(transition.clone()),
    };
    let resources = BTreeMap::from([
        ("cpu".to_string(), Quantity("2".to_string())),
        ("memory".to_string(), Quantity("24Gi".to_string())),
        ("pods".to_string(), Quantity("110".to_string())),
    ]);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let machine_id = read_host_file("/etc/machine-id");
    NodeStatus {
        conditions: Some(vec![
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            cond(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
            ),
            cond(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
            cond(
                "Ready",
                "True",
                "KubeletReady",
                "test kubelet is posting ready status",
            ),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".to_string(),
                address: HOST_IP.to_string(),
            },
            NodeAddress {
                type_: "Hostname".to_string(),
                address: cfg.node_name.clone(),
            },
        ]),
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        node_info: Some(NodeSystemInfo {
            architecture: arch.to_string(),
            boot_id: read_host_file("/proc/sys/kernel/random/boot_id"),
            container_runtime_version: "test-kubelet://0.1.0".to_string(),
            kernel_version: read_host_file("/proc/sys/kernel/osrelease"),
            kube_proxy_version: String::new(),
            kubelet_version: "v1.36.3".to_string(),
            machine_id: machine_id.clone(),
            operating_system: "linux".to_string(),
            os_image: "lockd e2e test kubelet (host processes)".to_string(),
            system_uuid: machine_id,
            swap: None,
        }),
        ..NodeStatus::default()
    }
}

/// Creates the Node (an existing one is reused) and posts its status.
async fn register_node(shared: &Shared, transition: &Time) -> Result<()> {
    let cfg = &shared.cfg;
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(cfg.node_name.clone()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/hostname".to_string(), cfg.node_name.clone()),
                ("kubernetes.io/os".to_string(), "linux".to_string()),
                (
                    "kubernetes.io/arch".to_string(),
                    std::env::consts::ARCH
                        .replace("x86_64", "amd64")
                        .replace("aarch64", "arm64"),
                ),
            ])),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(e) if is_status(&e, 409) => {}
        Err(e) => return Err(e).with_context(|| format!("create Node {}", cfg.node_name)),
    }
    post_node_status(shared, transition).await
}

/// Posts the Node status (the Ready heartbeat).
async fn post_node_status(shared: &Shared, transition: &Time) -> Result<()> {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let patch = serde_json::json!({ "status": node_status(&shared.cfg, transition) });
    nodes
        .patch_status(
            &shared.cfg.node_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .with_context(|| format!("patch status of Node {}", shared.cfg.node_name))?;
    Ok(())
}

/// Renews the node Lease (server-side apply creates it on first use).
async fn renew_lease(shared: &Shared) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(shared.client.clone(), NODE_LEASE_NAMESPACE);
    let name = &shared.cfg.node_name;
    let lease = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": name, "namespace": NODE_LEASE_NAMESPACE },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": 40,
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    leases
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
        .with_context(|| format!("renew Lease {NODE_LEASE_NAMESPACE}/{name}"))?;
    Ok(())
}

/// Keeps the node alive for the node-lifecycle controller: renews the
/// Lease every 10 s (retrying sooner while `kube-node-lease` does not exist
/// yet) and re-posts the Ready heartbeat every 60 s.
async fn node_heartbeat_loop(shared: Arc<Shared>, transition: Time) {
    let mut lease_tick = tokio::time::interval(LEASE_RENEW_INTERVAL);
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status_tick = tokio::time::interval(NODE_STATUS_INTERVAL);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick of an interval is immediate; the status was just posted.
    status_tick.tick().await;
    loop {
        tokio::select! {
            _ = lease_tick.tick() => {
                // A failed renewal (e.g. the namespace is not created yet)
                // is retried every second until it succeeds.
                while let Err(e) = renew_lease(&shared).await {
                    if shared.shutting_down.load(Ordering::SeqCst) {
                        return;
                    }
                    eprintln!("test-kubelet: {e:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            _ = status_tick.tick() => {
                if let Err(e) = post_node_status(&shared, &transition).await {
                    eprintln!("test-kubelet: {e:#}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Watching Pods: scheduling and dispatch
// ---------------------------------------------------------------------------

/// Watches all Pods: binds unscheduled ones to this node and hands every
/// Pod bound here to its actor (one per uid, so a Pod recreated under the
/// same name is a new Pod).
async fn pod_watch_loop(shared: Arc<Shared>) {
    use kube::runtime::watcher::{self, Event};
    use kube::runtime::WatchStreamExt;
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let mut stream =
        std::pin::pin!(watcher::watcher(pods, watcher::Config::default()).default_backoff());
    // Uids seen during a (re)list: actors of Pods missing from it were
    // deleted while the watch was down.
    let mut listing: Option<HashSet<String>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => listing = Some(HashSet::new()),
            Ok(Event::InitApply(pod)) => {
                if let (Some(seen), Some(uid)) = (listing.as_mut(), pod.metadata.uid.as_ref()) {
                    seen.insert(uid.clone());
                }
                handle_pod(&shared, pod);
            }
            Ok(Event::Apply(pod)) => handle_pod(&shared, pod),
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    shared.pod_gone(uid);
                }
            }
            Ok(Event::InitDone) => {
                if let Some(seen) = listing.take() {
                    let gone: Vec<String> = lock(&shared.pods)
                        .actors
                        .keys()
                        .filter(|uid| !seen.contains(*uid))
                        .cloned()
                        .collect();
                    for uid in gone {
                        shared.pod_gone(&uid);
                    }
                }
            }
            Err(e) => eprintln!("test-kubelet: pod watch: {e}"),
        }
    }
}

/// Reacts to the latest state of one Pod.
fn handle_pod(shared: &Arc<Shared>, pod: Pod) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or_default();
    if node.is_empty() {
        if pod.metadata.deletion_timestamp.is_none() && lock(&shared.binding).insert(uid.clone()) {
            tokio::spawn(bind_pod(shared.clone(), pod));
        }
        return;
    }
    if node != shared.cfg.node_name {
        return;
    }
    let mut table = lock(&shared.pods);
    if table.finished.contains(&uid) {
        return;
    }
    if let Some(tx) = table.actors.get(&uid) {
        tx.send_replace(Some(pod));
        return;
    }
    let (tx, rx) = tokio::sync::watch::channel(Some(pod.clone()));
    table.actors.insert(uid.clone(), tx);
    drop(table);
    tokio::spawn(run_pod(shared.clone(), uid, pod, rx));
}

impl Shared {
    /// The Pod with `uid` is gone from the API (deleted, possibly forced).
    fn pod_gone(&self, uid: &str) {
        if let Some(tx) = lock(&self.pods).actors.get(uid) {
            tx.send_replace(None);
        }
    }

    /// Called by a Pod's actor when it is done: later events for the uid
    /// are ignored.
    fn pod_finished(&self, uid: &str) {
        let mut table = lock(&self.pods);
        table.actors.remove(uid);
        table.finished.insert(uid.to_string());
    }
}

/// Binds `pod` to this node through the `pods/binding` subresource (what
/// the scheduler does), retrying transient errors. A conflict means it is
/// already bound (or was replaced), a 404 that it is gone: both end the
/// attempt. The uid stays in `binding` so a stale event cannot bind twice.
async fn bind_pod(shared: Arc<Shared>, pod: Pod) {
    let (Some(ns), Some(name)) = (pod.metadata.namespace.clone(), pod.metadata.name.clone()) else {
        return;
    };
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            // The binding is refused if the Pod was replaced meanwhile.
            uid: pod.metadata.uid.clone(),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            api_version: Some("v1".to_string()),
            kind: Some("Node".to_string()),
            name: Some(shared.cfg.node_name.clone()),
            ..ObjectReference::default()
        },
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        let res: kube::Result<serde_json::Value> = api
            .create_subresource("binding", &name, &PostParams::default(), &binding)
            .await;
        match res {
            Ok(_) => return,
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => return,
            Err(e) => eprintln!("test-kubelet: binding pod {ns}/{name}: {e}"),
        }
        if shared.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------------------
// PersistentVolumeClaims
// ---------------------------------------------------------------------------

impl Shared {
    /// Host directory backing a claim: keyed by uid too, so that a claim
    /// recreated under the same name starts empty.
    fn pvc_dir(&self, namespace: &str, claim: &str, uid: &str) -> PathBuf {
        self.cfg
            .root
            .join("volumes")
            .join(namespace)
            .join(format!("{claim}-{uid}"))
    }

    fn remove_pvc_dir(&self, namespace: &str, claim: &str, uid: &str) {
        let dir = self.pvc_dir(namespace, claim, uid);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("test-kubelet: removing {}: {e}", dir.display());
            }
            _ => {}
        }
    }
}

/// Watches all PVCs and wipes a claim's directory once the claim is
/// deleted (the pvc-protection finalizer keeps it until no Pod uses it).
async fn pvc_watch_loop(shared: Arc<Shared>) {
    use kube::runtime::watcher::{self, Event};
    use kube::runtime::WatchStreamExt;
    let api: Api<PersistentVolumeClaim> = Api::all(shared.client.clone());
    let mut stream =
        std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
    // Claims seen so far (uid -> namespace, name), to detect deletions
    // missed while the watch was down.
    let mut known: HashMap<String, (String, String)> = HashMap::new();
    let mut listing: Option<HashSet<String>> = None;
    let key = |pvc: &PersistentVolumeClaim| {
        Some((
            pvc.metadata.uid.clone()?,
            pvc.metadata.namespace.clone()?,
            pvc.metadata.name.clone()?,
        ))
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => listing = Some(HashSet::new()),
            Ok(Event::Apply(pvc)) | Ok(Event::InitApply(pvc)) => {
                if let Some((uid, ns, name)) = key(&pvc) {
                    if let Some(seen) = listing.as_mut() {
                        seen.insert(uid.clone());
                    }
                    known.insert(uid, (ns, name));
                }
            }
            Ok(Event::Delete(pvc)) => {
                if let Some((uid, ns, name)) = key(&pvc) {
                    known.remove(&uid);
                    shared.remove_pvc_dir(&ns, &name, &uid);
                }
            }
            Ok(Event::InitDone) => {
                if let Some(seen) = listing.take() {
                    known.retain(|uid, (ns, name)| {
                        let keep = seen.contains(uid);
                        if !keep {
                            shared.remove_pvc_dir(ns, name, uid);
                        }
                        keep
                    });
                }
            }
            Err(e) => eprintln!("test-kubelet: PVC watch: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A bind mount into a container's mount namespace.
#[derive(Clone, Debug)]
struct MountSpec {
    /// Host directory mounted.
    source: PathBuf,
    /// Where it appears (a resolved host path that exists as a directory).
    target: PathBuf,
    read_only: bool,
}

/// Everything needed to start (and restart) a Pod's container.
#[derive(Clone, Debug)]
struct Prepared {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    mounts: Vec<MountSpec>,
    /// The projected service-account token to (re)fetch before each start.
    token: Option<TokenSpec>,
    workdir: PathBuf,
}

/// A projected `serviceAccountToken` source.
#[derive(Clone, Debug)]
struct TokenSpec {
    /// Token file in the (bind-mounted) projected-volume directory.
    file: PathBuf,
    service_account: String,
    audience: Option<String>,
    expiration_seconds: i64,
}

fn cstring(path: &Path) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))
}

/// `errno` as an `io::Error`, for use inside `pre_exec` (no allocation).
fn last_os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Shared {
    fn log_path(&self, namespace: &str, pod: &str) -> PathBuf {
        self.cfg
            .root
            .join("logs")
            .join(format!("{namespace}_{pod}.log"))
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.cfg.root.join("pods").join(uid)
    }

    /// Starts a container process in its own mount namespace, with the
    /// hosts file and the volumes bind-mounted, and registers it for
    /// `shutdown`. Returns the child and the log offset where its output
    /// starts.
    ///
    /// Must run on a runtime worker thread (never in `spawn_blocking`): the
    /// child's PDEATHSIG fires when the spawning THREAD exits.
    fn spawn_container(
        &self,
        uid: &str,
        namespace: &str,
        pod: &str,
        p: &Prepared,
    ) -> Result<(tokio::process::Child, u64)> {
        use std::io::Write;
        // Everything the child needs is allocated here, before the fork:
        // between fork and exec only async-signal-safe calls are allowed.
        let hosts_src = cstring(&self.hosts_path())?;
        let mounts = p
            .mounts
            .iter()
            .map(|m| Ok((cstring(&m.source)?, cstring(&m.target)?, m.read_only)))
            .collect::<Result<Vec<_>>>()?;
        let log_path = self.log_path(namespace, pod);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        writeln!(
            log,
            "===== test-kubelet: {} starting {} {:?} =====",
            Timestamp::now(),
            p.program.display(),
            p.args
        )
        .with_context(|| format!("write {}", log_path.display()))?;
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let stderr = log.try_clone().context("dup log file")?;

        let mut cmd = tokio::process::Command::new(&p.program);
        cmd.args(&p.args)
            .env_clear()
            .envs(p.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&p.workdir)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .kill_on_drop(true);
        // SAFETY: the closure only makes raw syscalls on memory prepared
        // before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                let null = std::ptr::null();
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(last_os_error());
                }
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(last_os_error());
                }
                // Keep our mounts from propagating back to the host.
                if libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(last_os_error());
                }
                if libc::mount(
                    hosts_src.as_ptr(),
                    c"/etc/hosts".as_ptr(),
                    null,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(last_os_error());
                }
                for (src, dst, read_only) in &mounts {
                    if libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        null,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(last_os_error());
                    }
                    if *read_only
                        && libc::mount(
                            null,
                            dst.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                            std::ptr::null(),
                        ) != 0
                    {
                        return Err(last_os_error());
                    }
                }
                Ok(())
            });
        }
        // Holding the lock across the spawn closes the race with
        // `shutdown`: either it sees this child or we see its flag.
        let mut children = lock(&self.children);
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(anyhow!("test kubelet is shutting down"));
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", p.program.display()))?;
        if let Some(pid) = child.id() {
            children.insert(uid.to_string(), pid as i32);
        }
        Ok((child, offset))
    }

    /// The container of `uid` has been reaped: forget its pid.
    fn child_exited(&self, uid: &str) {
        lock(&self.children).remove(uid);
    }

    /// Resolves a volumeMount's `mountPath` to a host directory that exists:
    /// the longest existing prefix is canonicalized (`/var/run` is a
    /// symlink to `/run` on Debian) and missing directories are created.
    /// The topmost created directory is remembered for `shutdown`; it is
    /// empty on the host, as the bind mounts live only in the children's
    /// mount namespaces.
    fn mount_target(&self, mount_path: &str) -> Result<PathBuf> {
        use std::path::Component;
        let path = Path::new(mount_path);
        if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(anyhow!(
                "mountPath {mount_path:?} must be absolute without `..`"
            ));
        }
        let mut existing = path;
        let mut missing = Vec::new();
        while !existing.exists() {
            let (Some(name), Some(parent)) = (existing.file_name(), existing.parent()) else {
                break;
            };
            missing.push(name.to_os_string());
            existing = parent;
        }
        let mut target = std::fs::canonicalize(existing)
            .with_context(|| format!("canonicalize {}", existing.display()))?;
        // Serializes concurrent creations so exactly one pod records a
        // directory as created.
        let mut created = lock(&self.created_dirs);
        let mut topmost = None;
        for name in missing.iter().rev() {
            target.push(name);
            match std::fs::create_dir(&target) {
                Ok(()) => {
                    if topmost.is_none() {
                        topmost = Some(target.clone());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    if let Some(t) = topmost {
                        created.push(t);
                    }
                    return Err(e)
                        .with_context(|| format!("create mount point {}", target.display()));
                }
            }
        }
        if let Some(t) = topmost {
            created.push(t);
        }
        if !target.is_dir() {
            return Err(anyhow!(
                "mount point {} is not a directory",
                target.display()
            ));
        }
        Ok(target)
    }
}

// ---------------------------------------------------------------------------
// Per-pod actor
// ---------------------------------------------------------------------------

/// Why a Pod could not be prepared for its first start.
enum PrepareError {
    /// Transient (PVC not created yet, API error): retried every second
    /// while the container waits in "ContainerCreating".
    Retry(String),
    /// No binary for the image: the container waits in "ErrImagePull".
    ImagePull(String),
    /// Unsupported Pod: it fails with this message.
    Fatal(String),
}

/// What the kubelet last decided about a Pod's status; rendered into a
/// `pods/status` merge patch by [`PodActor::report`].
struct PodState {
    phase: &'static str,
    /// Pod-level reason and message (for a failed, unsupported Pod).
    reason: Option<String>,
    message: Option<String>,
    ip: Option<Ipv4Addr>,
    start_time: Option<Time>,
    /// Condition type -> (status, lastTransitionTime).
    conditions: BTreeMap<&'static str, (bool, Time)>,
    container_name: String,
    image: String,
    container_id: Option<String>,
    state: k8s_openapi::api::core::v1::ContainerState,
    last_state: Option<k8s_openapi::api::core::v1::ContainerState>,
    ready: bool,
    started: bool,
    restart_count: i32,
    /// The `status` last accepted by the API server.
    sent: Option<serde_json::Value>,
    /// A report failed and must be retried.
    dirty: bool,
}

fn waiting(reason: &str, message: Option<String>) -> k8s_openapi::api::core::v1::ContainerState {
    k8s_openapi::api::core::v1::ContainerState {
        waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
            reason: Some(reason.to_string()),
            message,
        }),
        ..Default::default()
    }
}

impl PodState {
    fn new(pod: &Pod) -> PodState {
        let container = pod.spec.as_ref().and_then(|s| s.containers.first());
        // Keep the transition times the API server already has (PodScheduled
        // was set by the binding).
        let mut conditions = BTreeMap::new();
        for c in pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
        {
            let key = match c.type_.as_str() {
                "PodScheduled" => "PodScheduled",
                "PodReadyToStartContainers" => "PodReadyToStartContainers",
                "Initialized" => "Initialized",
                "ContainersReady" => "ContainersReady",
                "Ready" => "Ready",
                _ => continue,
            };
            if let Some(t) = c.last_transition_time.clone() {
                conditions.insert(key, (c.status == "True", t));
            }
        }
        PodState {
            phase: "Pending",
            reason: None,
            message: None,
            ip: None,
            start_time: None,
            conditions,
            container_name: container.map(|c| c.name.clone()).unwrap_or_default(),
            image: container.and_then(|c| c.image.clone()).unwrap_or_default(),
            container_id: None,
            state: waiting("ContainerCreating", None),
            last_state: None,
            ready: false,
            started: false,
            restart_count: 0,
            sent: None,
            dirty: false,
        }
    }

    /// Sets a condition, moving its lastTransitionTime only when its status
    /// changes.
    fn condition(&mut self, type_: &'static str, status: bool) -> (bool, Time) {
        let entry = self
            .conditions
            .entry(type_)
            .or_insert_with(|| (status, now()));
        if entry.0 != status {
            *entry = (status, now());
        }
        entry.clone()
    }

    /// The complete status (merge patches replace lists wholesale).
    fn render(&mut self) -> k8s_openapi::api::core::v1::PodStatus {
        use k8s_openapi::api::core::v1::{ContainerStatus, HostIP, PodCondition, PodIP, PodStatus};
        let terminal = matches!(self.phase, "Succeeded" | "Failed");
        let ready = self.ready && !terminal;
        let not_ready = if terminal {
            ("PodCompleted".to_string(), None)
        } else {
            (
                "ContainersNotReady".to_string(),
                Some(format!(
                    "containers with unready status: [{}]",
                    self.container_name
                )),
            )
        };
        let specs = [
            (
                "PodReadyToStartContainers",
                self.ip.is_some() && !terminal,
                None,
            ),
            ("Initialized", true, None),
            ("Ready", ready, (!ready).then(|| not_ready.clone())),
            (
                "ContainersReady",
                ready,
                (!ready).then(|| not_ready.clone()),
            ),
            ("PodScheduled", true, None),
        ];
        let conditions = specs
            .into_iter()
            .map(|(type_, status, why)| {
                let (_, since) = self.condition(type_, status);
                let (reason, message) = why.map_or((None, None), |(r, m)| (Some(r), m));
                PodCondition {
                    type_: type_.to_string(),
                    status: if status { "True" } else { "False" }.to_string(),
                    last_transition_time: Some(since),
                    reason,
                    message,
                    ..PodCondition::default()
                }
            })
            .collect();
        let container = ContainerStatus {
            name: self.container_name.clone(),
            image: self.image.clone(),
            image_id: format!("test-kubelet://{}", self.image),
            container_id: self.container_id.clone(),
            ready,
            started: Some(self.started && !terminal),
            restart_count: self.restart_count,
            state: Some(self.state.clone()),
            last_state: self.last_state.clone(),
            ..ContainerStatus::default()
        };
        PodStatus {
            phase: Some(self.phase.to_string()),
            reason: self.reason.clone(),
            message: self.message.clone(),
            host_ip: Some(HOST_IP.to_string()),
            host_ips: Some(vec![HostIP {
                ip: HOST_IP.to_string(),
            }]),
            pod_ip: self.ip.map(|ip| ip.to_string()),
            pod_ips: self.ip.map(|ip| vec![PodIP { ip: ip.to_string() }]),
            start_time: self.start_time.clone(),
            conditions: Some(conditions),
            container_statuses: Some(vec![container]),
            ..PodStatus::default()
        }
    }
}

/// The actor running one Pod (by uid).
struct PodActor {
    shared: Arc<Shared>,
    uid: String,
    namespace: String,
    name: String,
    api: Api<Pod>,
    /// The latest Pod object; `None` once it is gone from the API.
    pod: Option<Pod>,
    rx: tokio::sync::watch::Receiver<Option<Pod>>,
    st: PodState,
}

impl PodActor {
    /// Sends the status if it differs from what the API server last
    /// accepted. The patch carries `metadata.uid`, which the API server
    /// treats as a precondition: a Pod recreated under the same name is
    /// never touched. Failures are retried by the actor's loops.
    async fn report(&mut self) {
        let status = self.st.render();
        let value = match serde_json::to_value(&status) {
            Ok(v) => v,
            Err(e) => {
                eprintln!(
                    "test-kubelet: serializing status of {}/{}: {e}",
                    self.namespace, self.name
                );
                return;
            }
        };
        if self.st.sent.as_ref() == Some(&value) {
            self.st.dirty = false;
            return;
        }
        let patch = serde_json::json!({ "metadata": { "uid": self.uid }, "status": value });
        match self
            .api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.st.sent = Some(value);
                self.st.dirty = false;
            }
            // Gone or replaced: the watcher will tell the actor.
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => self.st.dirty = false,
            Err(e) => {
                eprintln!(
                    "test-kubelet: patching status of {}/{}: {e}",
                    self.namespace, self.name
                );
                self.st.dirty = true;
            }
        }
    }
}

impl Shared {
    /// The next never-used pod address.
    fn allocate_ip(&self) -> Option<Ipv4Addr> {
        let mut next = lock(&self.next_ip);
        let ip = pod_ip(self.cfg.ip_prefix, *next)?;
        *next += 1;
        Some(ip)
    }
}

/// Writes `content` to `path` atomically (temp file + rename in the same
/// directory: the directory, not the file, is what gets bind-mounted).
fn write_atomic(path: &Path, content: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// The value of a downward-API `fieldRef`, `None` if unsupported.
fn field_value(pod: &Pod, ip: Ipv4Addr, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let quoted = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))
            .map(str::to_string)
    };
    if let Some(key) = quoted("metadata.labels['") {
        return Some(
            meta.labels
                .as_ref()
                .and_then(|l| l.get(&key))
                .cloned()
                .unwrap_or_default(),
        );
    }
    if let Some(key) = quoted("metadata.annotations['") {
        return Some(
            meta.annotations
                .as_ref()
                .and_then(|l| l.get(&key))
                .cloned()
                .unwrap_or_default(),
        );
    }
    let value = match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" | "status.podIPs" => Some(ip.to_string()),
        "status.hostIP" | "status.hostIPs" => Some(HOST_IP.to_string()),
        _ => return None,
    };
    Some(value.unwrap_or_default())
}

impl PodActor {
    /// Checks that the Pod can run here and computes how to start it:
    /// program, arguments, environment, mounts (creating the host
    /// directories they need) and its address.
    async fn prepare(&mut self) -> Result<Prepared, PrepareError> {
        use PrepareError::{Fatal, ImagePull, Retry};
        let pod = self
            .pod
            .clone()
            .ok_or_else(|| Retry("pod is gone".to_string()))?;
        let spec = pod
            .spec
            .as_ref()
            .ok_or_else(|| Fatal("pod has no spec".to_string()))?;
        if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(Fatal(
                "the test kubelet does not support initContainers".to_string(),
            ));
        }
        let c = spec
            .containers
            .first()
            .ok_or_else(|| Fatal("pod has no containers".to_string()))?;
        if spec.containers.len() > 1 {
            eprintln!(
                "test-kubelet: pod {}/{}: only the first of {} containers runs",
                self.namespace,
                self.name,
                spec.containers.len()
            );
        }
        let exe = executable_name(c.command.as_deref(), c.image.as_deref())
            .ok_or_else(|| ImagePull("container has neither command nor image".to_string()))?;
        let first = c.command.as_ref().and_then(|c| c.first());
        let program = first
            .and_then(|f| self.shared.cfg.binaries.get(f))
            .or_else(|| self.shared.cfg.binaries.get(&exe))
            .cloned()
            .ok_or_else(|| ImagePull(format!("test kubelet has no binary for {exe}")))?;

        let pod_dir = self.shared.pod_dir(&self.uid);
        let workdir = pod_dir.join("work");
        std::fs::create_dir_all(&workdir)
            .map_err(|e| Retry(format!("create {}: {e}", workdir.display())))?;
        let (mounts, token) = self.prepare_volumes(&pod, c, &pod_dir).await?;

        let ip = match self.st.ip {
            Some(ip) => ip,
            None => {
                let ip = self
                    .shared
                    .allocate_ip()
                    .ok_or_else(|| Fatal("test kubelet ran out of pod addresses".to_string()))?;
                self.st.ip = Some(ip);
                let names = host_names(
                    &self.namespace,
                    &self.name,
                    spec.hostname.as_deref(),
                    spec.subdomain.as_deref(),
                );
                self.shared.set_host(&self.namespace, &self.name, ip, names);
                ip
            }
        };

        let cfg = &self.shared.cfg;
        let mut env: Vec<(String, String)> = vec![
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("HOME".to_string(), "/tmp".to_string()),
            ("RUST_BACKTRACE".to_string(), "1".to_string()),
            ("KUBERNETES_SERVICE_HOST".to_string(), cfg.api_host.clone()),
            (
                "KUBERNETES_SERVICE_PORT".to_string(),
                cfg.api_port.to_string(),
            ),
        ];
        fn set(env: &mut Vec<(String, String)>, name: &str, value: String) {
            match env.iter_mut().find(|(k, _)| k == name) {
                Some(slot) => slot.1 = value,
                None => env.push((name.to_string(), value)),
            }
        }
        let lookup = |env: &[(String, String)], name: &str| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        };
        if c.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
            eprintln!(
                "test-kubelet: pod {}/{}: envFrom is not supported, ignored",
                self.namespace, self.name
            );
        }
        for var in c.env.iter().flatten() {
            let value = if let Some(v) = &var.value {
                expand_vars(v, |n| lookup(&env, n))
            } else if let Some(from) = &var.value_from {
                match from
                    .field_ref
                    .as_ref()
                    .and_then(|f| field_value(&pod, ip, &f.field_path))
                {
                    Some(v) => v,
                    None => {
                        eprintln!(
                            "test-kubelet: pod {}/{}: env {}: unsupported valueFrom, skipped",
                            self.namespace, self.name, var.name
                        );
                        continue;
                    }
                }
            } else {
                String::new()
            };
            set(&mut env, &var.name, value);
        }
        let args = c
            .command
            .iter()
            .flatten()
            .skip(1)
            .chain(c.args.iter().flatten())
            .map(|a| expand_vars(a, |n| lookup(&env, n)))
            .collect();
        Ok(Prepared {
            program,
            args,
            env,
            mounts,
            token,
            workdir,
        })
    }

    /// Resolves the container's volumeMounts to bind mounts.
    async fn prepare_volumes(
        &self,
        pod: &Pod,
        c: &k8s_openapi::api::core::v1::Container,
        pod_dir: &Path,
    ) -> Result<(Vec<MountSpec>, Option<TokenSpec>), PrepareError> {
        use PrepareError::{Fatal, Retry};
        let volumes: HashMap<&str, &k8s_openapi::api::core::v1::Volume> = pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .map(|v| (v.name.as_str(), v))
            .collect();
        let mkdir = |dir: &Path| {
            std::fs::create_dir_all(dir)
                .map_err(|e| Retry(format!("create {}: {e}", dir.display())))
        };
        let mut mounts = Vec::new();
        let mut token = None;
        for vm in c.volume_mounts.iter().flatten() {
            let vol = volumes
                .get(vm.name.as_str())
                .ok_or_else(|| Fatal(format!("volumeMount {} names no volume", vm.name)))?;
            let mut read_only = vm.read_only.unwrap_or(false);
            let mut source = if let Some(pvc) = &vol.persistent_volume_claim {
                read_only |= pvc.read_only.unwrap_or(false);
                let api: Api<PersistentVolumeClaim> =
                    Api::namespaced(self.shared.client.clone(), &self.namespace);
                let claim = match api.get_opt(&pvc.claim_name).await {
                    Ok(Some(claim)) => claim,
                    Ok(None) => {
                        return Err(Retry(format!(
                            "waiting for PersistentVolumeClaim {}",
                            pvc.claim_name
                        )));
                    }
                    Err(e) => {
                        return Err(Retry(format!(
                            "get PersistentVolumeClaim {}: {e}",
                            pvc.claim_name
                        )))
                    }
                };
                if claim.metadata.deletion_timestamp.is_some() {
                    return Err(Retry(format!(
                        "PersistentVolumeClaim {} is being deleted",
                        pvc.claim_name
                    )));
                }
                let uid = claim.metadata.uid.unwrap_or_default();
                self.shared.pvc_dir(&self.namespace, &pvc.claim_name, &uid)
            } else if vol.empty_dir.is_some() {
                pod_dir.join("volumes").join(&vol.name)
            } else if let Some(sa) = vol.projected.as_ref().and_then(|p| {
                p.sources
                    .iter()
                    .flatten()
                    .find_map(|s| s.service_account_token.as_ref())
            }) {
                // The ServiceAccount admission plugin's kube-api-access
                // volume: token, the cluster CA and the namespace.
                read_only = true;
                let dir = pod_dir.join("volumes").join(&vol.name);
                mkdir(&dir)?;
                for (file, content) in [
                    ("ca.crt", self.shared.cfg.ca_pem.as_str()),
                    ("namespace", self.namespace.as_str()),
                ] {
                    write_atomic(&dir.join(file), content.as_bytes())
                        .map_err(|e| Retry(format!("{e:#}")))?;
                }
                let service_account = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".to_string());
                token = Some(TokenSpec {
                    file: dir.join(if sa.path.is_empty() {
                        "token"
                    } else {
                        sa.path.as_str()
                    }),
                    service_account,
                    audience: sa.audience.clone().filter(|a| !a.is_empty()),
                    expiration_seconds: sa.expiration_seconds.unwrap_or(3600),
                });
                dir
            } else {
                return Err(Fatal(format!(
                    "volume {}: the test kubelet supports only persistentVolumeClaim, emptyDir and \
                     service-account projected volumes",
                    vol.name
                )));
            };
            if let Some(sub) = vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
                source = source.join(sub);
            }
            mkdir(&source)?;
            let target = self
                .shared
                .mount_target(&vm.mount_path)
                .map_err(|e| Fatal(format!("{e:#}")))?;
            mounts.push(MountSpec {
                source,
                target,
                read_only,
            });
        }
        Ok((mounts, token))
    }

    /// Fetches a token for the Pod's ServiceAccount with the TokenRequest
    /// API, bound to the Pod (as a real kubelet does), so that the process
    /// authenticates as that ServiceAccount and RBAC is exercised.
    async fn write_token(&self, spec: &TokenSpec) -> Result<()> {
        use k8s_openapi::api::authentication::v1::{
            BoundObjectReference, TokenRequest, TokenRequestSpec,
        };
        use k8s_openapi::api::core::v1::ServiceAccount;
        let api: Api<ServiceAccount> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: spec.audience.clone().map(|a| vec![a]),
                expiration_seconds: Some(spec.expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".to_string()),
                    kind: Some("Pod".to_string()),
                    name: Some(self.name.clone()),
                    uid: Some(self.uid.clone()),
                }),
            }),
            ..TokenRequest::default()
        };
        let response = api
            .create_token_request(&spec.service_account, &PostParams::default(), &request)
            .await
            .with_context(|| {
                format!(
                    "TokenRequest for ServiceAccount {}/{}",
                    self.namespace, spec.service_account
                )
            })?;
        let token = response
            .status
            .and_then(|s| s.token)
            .ok_or_else(|| anyhow!("TokenRequest returned no token"))?;
        write_atomic(&spec.file, token.as_bytes())
    }
}

// ---------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------

/// A probe result that matters to the actor.
#[derive(Debug)]
enum ProbeEvent {
    /// The readiness probe flipped.
    Ready(bool),
    /// The liveness probe failed `failureThreshold` times in a row.
    LivenessFailed(String),
}

/// What a probe checks.
#[derive(Clone, Debug)]
enum ProbeTarget {
    Http {
        addr: String,
        path: String,
    },
    Tcp {
        addr: String,
    },
    /// exec and gRPC probes are not supported: they always succeed.
    Unsupported(&'static str),
}

/// Probe tasks of one container run, aborted when it ends.
struct ProbeTasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for ProbeTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Resolves a probe's port (a number or a named container port).
fn probe_port(
    c: &k8s_openapi::api::core::v1::Container,
    port: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
) -> Option<i32> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .or_else(|| name.parse().ok()),
    }
}

fn probe_target(
    c: &k8s_openapi::api::core::v1::Container,
    probe: &k8s_openapi::api::core::v1::Probe,
    ip: Ipv4Addr,
) -> ProbeTarget {
    if let Some(h) = &probe.http_get {
        let host = h
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| ip.to_string());
        if h.scheme
            .as_deref()
            .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
        {
            return ProbeTarget::Unsupported("HTTPS httpGet probe");
        }
        return match probe_port(c, &h.port) {
            Some(port) => ProbeTarget::Http {
                addr: format!("{host}:{port}"),
                path: h
                    .path
                    .clone()
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| "/".to_string()),
            },
            None => ProbeTarget::Unsupported("httpGet probe with an unknown named port"),
        };
    }
    if let Some(t) = &probe.tcp_socket {
        let host = t
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| ip.to_string());
        return match probe_port(c, &t.port) {
            Some(port) => ProbeTarget::Tcp {
                addr: format!("{host}:{port}"),
            },
            None => ProbeTarget::Unsupported("tcpSocket probe with an unknown named port"),
        };
    }
    ProbeTarget::Unsupported("exec/grpc probe")
}

/// One probe attempt: `Err` carries the failure's description.
async fn run_probe(target: &ProbeTarget, timeout: Duration) -> Result<(), String> {
    match target {
        ProbeTarget::Http { addr, path } => match crate::http_get(addr, path, timeout).await {
            Ok((code, _)) if (200..400).contains(&code) => Ok(()),
            Ok((code, _)) => Err(format!("HTTP probe failed with statuscode: {code}")),
            Err(e) => Err(format!("Get \"http://{addr}{path}\": {e:#}")),
        },
        ProbeTarget::Tcp { addr } => {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr.as_str())).await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
                Err(_) => Err(format!("dial tcp {addr}: timeout")),
            }
        }
        ProbeTarget::Unsupported(_) => Ok(()),
    }
}

/// Runs a readiness (`readiness == true`) or liveness probe on its timer,
/// applying the thresholds, and reports flips to the actor.
async fn probe_loop(
    readiness: bool,
    probe: k8s_openapi::api::core::v1::Probe,
    target: ProbeTarget,
    tx: tokio::sync::mpsc::UnboundedSender<ProbeEvent>,
) {
    let secs =
        |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    let period = secs(probe.period_seconds, 10).max(Duration::from_secs(1));
    let timeout = secs(probe.timeout_seconds, 1).max(Duration::from_secs(1));
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
    tokio::time::sleep(secs(probe.initial_delay_seconds, 0)).await;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut successes, mut failures) = (0, 0);
    let mut ready = false;
    loop {
        tick.tick().await;
        let error = match run_probe(&target, timeout).await {
            Ok(()) => {
                successes += 1;
                failures = 0;
                None
            }
            Err(e) => {
                failures += 1;
                successes = 0;
                Some(e)
            }
        };
        let event = if readiness {
            if !ready && successes >= success_threshold {
                ready = true;
                Some(ProbeEvent::Ready(true))
            } else if ready && failures >= failure_threshold {
                ready = false;
                Some(ProbeEvent::Ready(false))
            } else {
                None
            }
        } else if failures >= failure_threshold {
            Some(ProbeEvent::LivenessFailed(error.unwrap_or_default()))
        } else {
            None
        };
        let last = matches!(event, Some(ProbeEvent::LivenessFailed(_)));
        if let Some(event) = event {
            if tx.send(event).is_err() || last {
                return;
            }
        }
    }
}

/// Starts the container's readiness and liveness probes.
fn start_probes(
    c: &k8s_openapi::api::core::v1::Container,
    ip: Ipv4Addr,
    tx: &tokio::sync::mpsc::UnboundedSender<ProbeEvent>,
) -> ProbeTasks {
    let mut tasks = Vec::new();
    for (readiness, probe) in [(true, &c.readiness_probe), (false, &c.liveness_probe)] {
        if let Some(probe) = probe {
            let target = probe_target(c, probe, ip);
            if let ProbeTarget::Unsupported(what) = target {
                eprintln!(
                    "test-kubelet: container {}: {what} is not supported, treated as passing",
                    c.name
                );
            }
            tasks.push(tokio::spawn(probe_loop(
                readiness,
                probe.clone(),
                target,
                tx.clone(),
            )));
        }
    }
    ProbeTasks(tasks)
}

/// Restart backoff: 1 s doubling to at most 10 s.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A run this long resets the restart backoff (as a kubelet does after a
/// container ran stably for twice the maximum backoff).
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(20);

/// Exit code of a reaped process, shell style (128 + signal if killed).
fn exit_code(status: &std::io::Result<std::process::ExitStatus>) -> (i32, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => (code, None),
            (None, Some(sig)) => (128 + sig, Some(sig)),
            (None, None) => (255, None),
        },
        Err(_) => (255, None),
    }
}

/// What ended the actor's wait for the Pod's next state.
enum Next {
    /// Keep going.
    Continue,
    /// The Pod is gone or was finalized: the actor is done.
    Done,
}

impl PodActor {
    fn deleting(&self) -> bool {
        self.pod
            .as_ref()
            .is_some_and(|p| p.metadata.deletion_timestamp.is_some())
    }

    /// Takes the latest Pod from the watch channel (a closed channel means
    /// the kubelet dropped the actor: treated as gone).
    fn update_pod(&mut self, changed: Result<(), tokio::sync::watch::error::RecvError>) {
        self.pod = match changed {
            Ok(()) => self.rx.borrow_and_update().clone(),
            Err(_) => None,
        };
    }

    /// Waits for a Pod update or `timeout`, retrying a failed status report
    /// every second meanwhile.
    async fn wait_change(&mut self, timeout: Option<Duration>) {
        let retry = self.st.dirty.then_some(Duration::from_secs(1));
        let wait = match (timeout, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            changed = self.rx.changed() => self.update_pod(changed),
            _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
        }
        if self.st.dirty {
            self.report().await;
        }
    }

    /// Handles deletion while no process runs: a Pod being deleted is
    /// finalized, a vanished one just ends the actor.
    async fn check_deleted(&mut self) -> Next {
        if self.pod.is_none() {
            return Next::Done;
        }
        if self.deleting() {
            self.finalize().await;
            return Next::Done;
        }
        Next::Continue
    }

    /// Sleeps `d` (a restart backoff) while reacting to deletion.
    async fn sleep_watching(&mut self, d: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if let Next::Done = self.check_deleted().await {
                return Next::Done;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Next::Continue;
            }
            self.wait_change(Some(left)).await;
        }
    }

    /// Waits until the Pod is deleted (for a Pod that will not run again),
    /// then finalizes it.
    async fn wait_for_deletion(&mut self) {
        while let Next::Continue = self.check_deleted().await {
            self.wait_change(None).await;
        }
    }

    /// The grace period of the Pod's deletion.
    fn grace(&self) -> Duration {
        let pod = self.pod.as_ref();
        let secs = pod
            .and_then(|p| p.metadata.deletion_grace_period_seconds)
            .or_else(|| {
                pod.and_then(|p| p.spec.as_ref())
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(secs.max(0) as u64)
    }

    /// Stops the process gracefully: SIGTERM, then SIGKILL once the grace
    /// period is over (a shortened grace period is honoured, a force
    /// deletion kills at once), and waits for it to exit.
    async fn terminate(&mut self, child: &mut tokio::process::Child) {
        if let Some(pid) = child.id() {
            // SAFETY: plain syscall on our own unreaped child.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        let start = tokio::time::Instant::now();
        let mut deadline = start + self.grace();
        loop {
            tokio::select! {
                _ = child.wait() => break,
                _ = tokio::time::sleep_until(deadline) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    break;
                }
                changed = self.rx.changed() => {
                    self.update_pod(changed);
                    if self.pod.is_none() {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        break;
                    }
                    deadline = deadline.min(start + self.grace());
                }
            }
        }
        self.shared.child_exited(&self.uid);
    }

    /// Completes a graceful deletion the way a real kubelet does: deletes
    /// the Pod with grace period 0 and a uid precondition. Without it the
    /// Pod would stay Terminating forever.
    async fn finalize(&mut self) {
        let dp = kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(kube::api::Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..kube::api::DeleteParams::default()
        };
        while self.pod.is_some() {
            match self.api.delete(&self.name, &dp).await {
                Ok(_) => return,
                Err(e) if is_status(&e, 404) || is_status(&e, 409) => return,
                Err(e) => {
                    eprintln!(
                        "test-kubelet: deleting pod {}/{}: {e}",
                        self.namespace, self.name
                    );
                    self.wait_change(Some(Duration::from_secs(1))).await;
                }
            }
        }
    }
}

/// Runs one Pod (by uid) from start to deletion.
async fn run_pod(
    shared: Arc<Shared>,
    uid: String,
    pod: Pod,
    rx: tokio::sync::watch::Receiver<Option<Pod>>,
) {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut actor = PodActor {
        api: Api::namespaced(shared.client.clone(), &namespace),
        shared: shared.clone(),
        uid: uid.clone(),
        namespace,
        name,
        st: PodState::new(&pod),
        pod: Some(pod),
        rx,
    };
    actor.lifecycle().await;
    shared.child_exited(&uid);
    shared.pod_finished(&uid);
    // Working directory, emptyDirs and token files; the logs stay.
    let dir = shared.pod_dir(&uid);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("test-kubelet: removing {}: {e}", dir.display());
        }
    }
}

impl PodActor {
    /// Prepares the Pod, then runs (and restarts) its container until the
    /// Pod is deleted.
    async fn lifecycle(&mut self) {
        // The Pod is re-checked on every update (including the echo of our
        // own status patch): log a problem once, not on every attempt.
        let mut logged = String::new();
        let prepared = loop {
            if let Next::Done = self.check_deleted().await {
                return;
            }
            match self.prepare().await {
                Ok(p) => break p,
                Err(PrepareError::Retry(msg)) => {
                    self.st.state = waiting("ContainerCreating", Some(msg));
                    self.report().await;
                    self.wait_change(Some(Duration::from_secs(1))).await;
                }
                Err(PrepareError::ImagePull(msg)) => {
                    if logged != msg {
                        eprintln!("test-kubelet: pod {}/{}: {msg}", self.namespace, self.name);
                        logged.clone_from(&msg);
                    }
                    self.st.state = waiting("ErrImagePull", Some(msg));
                    self.report().await;
                    self.wait_change(None).await;
                }
                Err(PrepareError::Fatal(msg)) => {
                    eprintln!("test-kubelet: pod {}/{}: {msg}", self.namespace, self.name);
                    self.st.phase = "Failed";
                    self.st.reason = Some("UnsupportedByTestKubelet".to_string());
                    self.st.message = Some(msg.clone());
                    self.st.state = waiting("CreateContainerConfigError", Some(msg));
                    self.report().await;
                    self.wait_for_deletion().await;
                    return;
                }
            }
        };
        self.run(prepared).await;
    }

    /// Runs the container, restarting it per restartPolicy.
    async fn run(&mut self, prepared: Prepared) {
        let Some(spec) = self.pod.as_ref().and_then(|p| p.spec.clone()) else {
            return;
        };
        let Some(container) = spec.containers.first().cloned() else {
            return;
        };
        let Some(ip) = self.st.ip else {
            return;
        };
        let policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".to_string());
        let fallback_to_logs =
            container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
        // Tokens are refreshed at 80% of their lifetime, as a kubelet does.
        let token_refresh = prepared
            .token
            .as_ref()
            .map(|t| Duration::from_secs((t.expiration_seconds.max(60) as u64) * 4 / 5));
        let mut backoff = BACKOFF_START;
        loop {
            if self.shared.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            if let Some(token) = &prepared.token {
                if let Err(e) = self.write_token(token).await {
                    eprintln!("test-kubelet: pod {}/{}: {e:#}", self.namespace, self.name);
                    self.st.state = waiting("ContainerCreating", Some(format!("{e:#}")));
                    self.report().await;
                    if let Next::Done = self.sleep_watching(Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            }
            let started_at = now();
            let spawned =
                self.shared
                    .spawn_container(&self.uid, &self.namespace, &self.name, &prepared);
            let (mut child, log_offset) = match spawned {
                Ok(c) => c,
                Err(e) => {
                    if self.shared.shutting_down.load(Ordering::SeqCst) {
                        return;
                    }
                    eprintln!("test-kubelet: pod {}/{}: {e:#}", self.namespace, self.name);
                    self.st.state = waiting("RunContainerError", Some(format!("{e:#}")));
                    self.st.ready = false;
                    self.report().await;
                    if let Next::Done = self.sleep_watching(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let run_start = tokio::time::Instant::now();
            let container_id = format!("test-kubelet://{}", child.id().unwrap_or(0));
            self.st.container_id = Some(container_id.clone());
            self.st.state = k8s_openapi::api::core::v1::ContainerState {
                running: Some(k8s_openapi::api::core::v1::ContainerStateRunning {
                    started_at: Some(started_at.clone()),
                }),
                ..Default::default()
            };
            self.st.phase = "Running";
            self.st.started = true;
            self.st.ready = container.readiness_probe.is_none();
            if self.st.start_time.is_none() {
                self.st.start_time = Some(started_at.clone());
            }
            self.report().await;

            let (probe_tx, mut probe_rx) = tokio::sync::mpsc::unbounded_channel();
            let probes = start_probes(&container, ip, &probe_tx);
            let mut refresh_at = token_refresh.map(|d| tokio::time::Instant::now() + d);
            let mut liveness_failure = None;
            let status = loop {
                let retry = self.st.dirty;
                tokio::select! {
                    status = child.wait() => break status,
                    changed = self.rx.changed() => {
                        self.update_pod(changed);
                        if self.pod.is_none() {
                            // Force-deleted: kill at once.
                            let _ = child.start_kill();
                            let _ = child.wait().await;
                            self.shared.child_exited(&self.uid);
                            return;
                        }
                        if self.deleting() {
                            drop(probes);
                            self.terminate(&mut child).await;
                            self.finalize().await;
                            return;
                        }
                    }
                    Some(event) = probe_rx.recv() => match event {
                        ProbeEvent::Ready(ready) => {
                            self.st.ready = ready;
                            self.report().await;
                        }
                        ProbeEvent::LivenessFailed(msg) => {
                            eprintln!(
                                "test-kubelet: pod {}/{}: liveness probe failed ({msg}), killing",
                                self.namespace, self.name
                            );
                            liveness_failure = Some(msg);
                            let _ = child.start_kill();
                            break child.wait().await;
                        }
                    },
                    _ = tokio::time::sleep(Duration::from_secs(1)), if retry => self.report().await,
                    _ = tokio::time::sleep_until(refresh_at.unwrap_or_else(tokio::time::Instant::now)), if refresh_at.is_some() => {
                        let retry_in = match prepared.token.as_ref() {
                            Some(token) => match self.write_token(token).await {
                                Ok(()) => token_refresh.unwrap_or(BACKOFF_MAX),
                                Err(e) => {
                                    eprintln!("test-kubelet: pod {}/{}: refreshing token: {e:#}", self.namespace, self.name);
                                    Duration::from_secs(5)
                                }
                            },
                            None => BACKOFF_MAX,
                        };
                        refresh_at = Some(tokio::time::Instant::now() + retry_in);
                    }
                }
            };
            drop(probes);
            self.shared.child_exited(&self.uid);
            if self.shared.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            let (code, signal) = exit_code(&status);
            let mut message = liveness_failure.map(|m| format!("liveness probe failed: {m}"));
            if fallback_to_logs && code != 0 {
                message = Some(self.log_tail_since(log_offset));
            }
            let terminated = k8s_openapi::api::core::v1::ContainerState {
                terminated: Some(k8s_openapi::api::core::v1::ContainerStateTerminated {
                    container_id: Some(container_id),
                    exit_code: code,
                    signal,
                    reason: Some(if code == 0 { "Completed" } else { "Error" }.to_string()),
                    message,
                    started_at: Some(started_at),
                    finished_at: Some(now()),
                }),
                ..Default::default()
            };
            self.st.ready = false;
            self.st.started = false;
            let restart = match policy.as_str() {
                "Never" => false,
                "OnFailure" => code != 0,
                _ => true,
            };
            if !restart {
                self.st.phase = if code == 0 { "Succeeded" } else { "Failed" };
                self.st.state = terminated;
                self.report().await;
                self.wait_for_deletion().await;
                return;
            }
            if run_start.elapsed() >= BACKOFF_RESET_AFTER {
                backoff = BACKOFF_START;
            }
            self.st.last_state = Some(terminated);
            self.st.state = waiting(
                "CrashLoopBackOff",
                Some(format!(
                    "back-off {}s restarting failed container={} pod={}_{}({})",
                    backoff.as_secs(),
                    container.name,
                    self.name,
                    self.namespace,
                    self.uid
                )),
            );
            self.report().await;
            if let Next::Done = self.sleep_watching(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            self.st.restart_count += 1;
        }
    }

    /// The termination message for FallbackToLogsOnError: the last 80 lines
    /// (at most 2048 bytes) the run logged.
    fn log_tail_since(&self, offset: u64) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.shared.log_path(&self.namespace, &self.name);
        let mut text = Vec::new();
        let read = std::fs::File::open(&path).and_then(|mut f| {
            f.seek(SeekFrom::Start(offset))?;
            f.read_to_end(&mut text)
        });
        if let Err(e) = read {
            eprintln!("test-kubelet: reading {}: {e}", path.display());
        }
        tail_lines(&String::from_utf8_lossy(&text), 80, 2048).to_string()
    }
}

// ---------------------------------------------------------------------------
// Pure helpers
// ---------------------------------------------------------------------------

/// Expands `$(VAR)` references in `input` the way Kubernetes does for
/// container `env`, `command` and `args` (a port of
/// `third_party/forked/golang/expansion`): `$$` is a literal `$`, a
/// reference to an undefined variable is left as is, and a `$` that does not
/// start a reference is copied unchanged.
pub fn expand_vars(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        match after.chars().next() {
            // A trailing `$` is copied as is.
            None => {
                out.push('$');
                rest = after;
            }
            Some('$') => {
                out.push('$');
                rest = &after[1..];
            }
            Some('(') => match after.find(')') {
                Some(close) => {
                    let name = &after[1..close];
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &after[close + 1..];
                }
                // An unterminated reference: `$(` is copied and scanning
                // continues after it.
                None => {
                    out.push_str("$(");
                    rest = &after[1..];
                }
            },
            Some(c) => {
                out.push('$');
                out.push(c);
                rest = &after[c.len_utf8()..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Name of the executable a container runs: the last path segment of
/// `command[0]` if a command is set, else the last path segment of the image
/// without tag or digest (`ghcr.io/lockd/lockd-operator:0.1.0` ->
/// `lockd-operator`). The test kubelet has no images, only a map from such
/// names to host binaries.
pub fn executable_name(command: Option<&[String]>, image: Option<&str>) -> Option<String> {
    if let Some(first) = command.and_then(|c| c.first()) {
        let base = first.rsplit('/').next().unwrap_or(first);
        return (!base.is_empty()).then(|| base.to_string());
    }
    let image = image?;
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let name = last.split(':').next().unwrap_or(last);
    (!name.is_empty()).then(|| name.to_string())
}

/// Address number `index` (0-based) of a kubelet with `prefix`:
/// `127.{p0}.{p1}.2..=254`, then `127.{p0}.{p1+1}.2..=254` and so on;
/// `None` once the third octet would overflow.
pub fn pod_ip(prefix: [u8; 2], index: u32) -> Option<std::net::Ipv4Addr> {
    let third = u32::from(prefix[1]) + index / 253;
    let fourth = 2 + index % 253;
    let third = u8::try_from(third).ok()?;
    let fourth = u8::try_from(fourth).ok()?;
    Some(std::net::Ipv4Addr::new(127, prefix[0], third, fourth))
}

/// The last `max_lines` lines of `text`, then cut to its last `max_bytes`
/// bytes (on a character boundary).
pub fn tail_lines(text: &str, max_lines: usize, max_bytes: usize) -> &str {
    let trimmed = text.trim_end_matches('\n');
    let mut start = 0;
    let mut count = 0;
    for (i, _) in trimmed.rmatch_indices('\n') {
        count += 1;
        if count == max_lines {
            start = i + 1;
            break;
        }
    }
    let mut tail = &trimmed[start..];
    if tail.len() > max_bytes {
        let mut cut = tail.len() - max_bytes;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = &tail[cut..];
    }
    tail
}

/// Names a Pod is known by in the hosts file: with `spec.hostname` and
/// `spec.subdomain` (StatefulSet members behind a headless Service) its
/// DNS names, else just its name.
pub fn host_names(
    namespace: &str,
    pod: &str,
    hostname: Option<&str>,
    subdomain: Option<&str>,
) -> Vec<String> {
    match (hostname, subdomain) {
        (Some(h), Some(s)) if !h.is_empty() && !s.is_empty() => vec![
            format!("{h}.{s}.{namespace}.svc.cluster.local"),
            format!("{h}.{s}.{namespace}.svc"),
            format!("{h}.{s}.{namespace}"),
        ],
        _ => vec![pod.to_string()],
    }
}

/// Renders the hosts file: `localhost` first, then one line per entry
/// (`entries` maps a key such as "ns/pod" to the address and names).
pub fn render_hosts<'a>(
    entries: impl IntoIterator<Item = (&'a std::net::Ipv4Addr, &'a Vec<String>)>,
) -> String {
    let mut out = String::from("127.0.0.1 localhost\n");
    for (ip, names) in entries {
        out.push_str(&format!("{ip} {}\n", names.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "POD_IP" => Some("127.1.2.3".into()),
            "A" => Some("x".into()),
            _ => None,
        }
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        assert_eq!(
            expand_vars("--listen=$(POD_IP):7001", vars),
            "--listen=127.1.2.3:7001"
        );
        assert_eq!(expand_vars("$(A)$(A)", vars), "xx");
        assert_eq!(expand_vars("$$(A)", vars), "$(A)");
        assert_eq!(expand_vars("$$$(A)", vars), "$x");
        assert_eq!(expand_vars("$(NOPE)", vars), "$(NOPE)");
        assert_eq!(expand_vars("a$b", vars), "a$b");
        assert_eq!(expand_vars("cost $", vars), "cost $");
        assert_eq!(expand_vars("$(A", vars), "$(A");
        // The name runs to the first `)`: "$(A" is undefined and kept.
        assert_eq!(expand_vars("$($(A))", vars), "$($(A))");
        assert_eq!(expand_vars("€$€", vars), "€$€");
        assert_eq!(expand_vars("", vars), "");
    }

    #[test]
    fn executable_from_command_or_image() {
        let cmd = vec!["/usr/local/bin/lockd".to_string(), "--x".to_string()];
        assert_eq!(
            executable_name(Some(&cmd), Some("img")).as_deref(),
            Some("lockd")
        );
        assert_eq!(
            executable_name(None, Some("ghcr.io/lockd/lockd-operator:0.1.0")).as_deref(),
            Some("lockd-operator")
        );
        assert_eq!(
            executable_name(Some(&[]), Some("lockd")).as_deref(),
            Some("lockd")
        );
        assert_eq!(
            executable_name(None, Some("localhost:5000/lockd@sha256:abc")).as_deref(),
            Some("lockd")
        );
        assert_eq!(executable_name(None, None), None);
    }

    #[test]
    fn ip_allocation_skips_network_and_broadcast() {
        let p = [20, 7];
        assert_eq!(pod_ip(p, 0), Some("127.20.7.2".parse().unwrap()));
        assert_eq!(pod_ip(p, 252), Some("127.20.7.254".parse().unwrap()));
        assert_eq!(pod_ip(p, 253), Some("127.20.8.2".parse().unwrap()));
        assert_eq!(
            pod_ip([1, 255], 252),
            Some("127.1.255.254".parse().unwrap())
        );
        assert_eq!(pod_ip([1, 255], 253), None);
    }

    #[test]
    fn tails() {
        assert_eq!(tail_lines("a\nb\nc\n", 2, 100), "b\nc");
        assert_eq!(tail_lines("a\nb\nc", 5, 100), "a\nb\nc");
        assert_eq!(tail_lines("abcdef", 5, 3), "def");
        assert_eq!(tail_lines("ééé", 5, 3), "é");
        assert_eq!(tail_lines("", 5, 3), "");
    }

    #[test]
    fn hosts_file_rendering() {
        let a: std::net::Ipv4Addr = "127.1.1.2".parse().unwrap();
        let b: std::net::Ipv4Addr = "127.1.1.3".parse().unwrap();
        let na = host_names("ns", "lockd-0", Some("lockd-0"), Some("lockd"));
        let nb = host_names("ns", "op-abc", None, Some("x"));
        assert_eq!(
            render_hosts([(&a, &na), (&b, &nb)]),
            "127.0.0.1 localhost\n\
             127.1.1.2 lockd-0.lockd.ns.svc.cluster.local lockd-0.lockd.ns.svc lockd-0.lockd.ns\n\
             127.1.1.3 op-abc\n"
        );
    }
}
