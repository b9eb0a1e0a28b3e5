//! The environment the Kubernetes scenarios share within one test binary:
//! one control plane, one test kubelet, the CRD and manifests/ installed with
//! kubectl exactly as the README says, and the operator Deployment running.
//! With `LOCKD_E2E_KUBECONFIG` set, an existing cluster (kind, or a real
//! one) takes the place of the control plane and test kubelet; the README
//! says what it needs.
//!
//! It is started once, on a runtime of its own that lives as long as the
//! process (child processes are tied to the threads that spawned them), and
//! torn down by an `atexit` hook: the processes are killed and the temp dirs
//! removed (`LOCKD_E2E_KEEP=1` keeps the dirs for a post-mortem). Scenarios
//! run one at a time ([`K8sEnv::serial`]): two lockd clusters, the control
//! plane and load generators at once would be too much for a 2-core machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use tokio::sync::{Mutex, MutexGuard, OnceCell};

use super::control_plane::{config_from, kubectl_command, ControlPlane};
use super::kubelet::{KubeletConfig, TestKubelet};

/// Namespace of the operator (manifests/namespace.yaml).
pub const OPERATOR_NAMESPACE: &str = "lockd-system";
/// The operator's ServiceAccount as the API server names the user.
pub const OPERATOR_USER: &str = "system:serviceaccount:lockd-system:lockd-operator";
/// Name of the test kubelet's Node.
pub const NODE_NAME: &str = "e2e-node";

/// Names the kubeconfig of an existing cluster (kind, or a real one) to run
/// the scenarios against instead of the local control plane and test
/// kubelet (see the README).
pub const KUBECONFIG_ENV: &str = "LOCKD_E2E_KUBECONFIG";

/// Everything a scenario talks to.
pub struct K8sEnv {
    /// The local control plane and test kubelet; None against an existing
    /// cluster.
    local: Option<Local>,
    /// kubectl and the kubeconfig it uses, against an existing cluster.
    external: Option<(PathBuf, PathBuf)>,
    serial: Mutex<()>,
}

/// The control plane and test kubelet this process runs.
struct Local {
    cp: ControlPlane,
    kubelet: TestKubelet,
    root: PathBuf,
    etcd_dir: PathBuf,
}

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
static ENV: OnceCell<Result<K8sEnv, String>> = OnceCell::const_new();

fn runtime() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("k8s-env")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot build the k8s-env runtime: {e}"))
    })
}

/// The shared environment, started on first use. Panics (failing the
/// calling test) when it cannot start; every later caller gets the same
/// error without trying again.
pub async fn shared() -> &'static K8sEnv {
    let env = ENV
        .get_or_init(|| async {
            match runtime().spawn(K8sEnv::start()).await {
                Ok(Ok(env)) => Ok(env),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(e) => Err(format!("start task failed: {e}")),
            }
        })
        .await;
    match env {
        Ok(env) => env,
        Err(e) => panic!("the Kubernetes e2e environment did not start: {e}"),
    }
}

extern "C" fn teardown() {
    if let Some(Ok(K8sEnv {
        local: Some(env), ..
    })) = ENV.get()
    {
        env.kubelet.shutdown();
        env.cp.shutdown();
        if std::env::var_os("LOCKD_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&env.root);
            let _ = std::fs::remove_dir_all(&env.etcd_dir);
        } else {
            eprintln!("lockd-e2e: kept {}", env.root.display());
        }
    }
}

impl K8sEnv {
    async fn start() -> Result<K8sEnv> {
        if let Some(kubeconfig) = std::env::var_os(KUBECONFIG_ENV) {
            return Self::start_external(PathBuf::from(kubeconfig)).await;
        }
        Self::start_local().await
    }

    /// Against an existing cluster: installs the CRD and manifests there
    /// with kubectl (`LOCKD_E2E_KUBECTL`, default `kubectl` on the PATH).
    async fn start_external(kubeconfig: PathBuf) -> Result<K8sEnv> {
        let kubectl = std::env::var_os("LOCKD_E2E_KUBECTL")
            .map_or_else(|| PathBuf::from("kubectl"), PathBuf::from);
        let env = K8sEnv {
            local: None,
            external: Some((kubectl, kubeconfig)),
            serial: Mutex::new(()),
        };
        env.install().await?;
        Ok(env)
    }

    async fn start_local() -> Result<K8sEnv> {
        // The test kubelet gives each Pod its own mount namespace.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "the Kubernetes tier needs root: its test kubelet runs each Pod in a mount namespace of its own"
            );
        }
        // Resolved before anything is created: a missing binary panics.
        let binaries = BTreeMap::from([
            ("lockd".to_string(), crate::lockd_bin()),
            ("lockd-operator".to_string(), crate::operator_bin()),
        ]);
        let root = tempfile::Builder::new()
            .prefix("lockd-k8s-e2e-")
            .tempdir()
            .context("temp dir")?
            .keep();
        // etcd is the control plane's store, not lockd's: on tmpfs when there
        // is one, so its fsyncs do not compete with the members' on the disk.
        let shm = Path::new("/dev/shm");
        let etcd_parent = if shm.is_dir() { shm } else { root.as_path() };
        let etcd_dir = tempfile::Builder::new()
            .prefix("lockd-k8s-e2e-etcd-")
            .tempdir_in(etcd_parent)
            .context("etcd temp dir")?
            .keep();
        // SAFETY: registering a plain extern "C" fn.
        unsafe {
            libc::atexit(teardown);
        }
        let started = Self::start_in(&root, &etcd_dir, binaries).await;
        if started.is_err() && std::env::var_os("LOCKD_E2E_KEEP").is_none() {
            // The components are gone with their owners (dropped); so must
            // their dirs be, since no teardown hook will know of them.
            let _ = std::fs::remove_dir_all(&root);
            let _ = std::fs::remove_dir_all(&etcd_dir);
        }
        started
    }

    async fn start_in(
        root: &Path,
        etcd_dir: &Path,
        binaries: BTreeMap<String, PathBuf>,
    ) -> Result<K8sEnv> {
        let (root, etcd_dir) = (root.to_path_buf(), etcd_dir.to_path_buf());
        let cp_dir = root.join("control-plane");
        std::fs::create_dir_all(&cp_dir)?;
        let cp = ControlPlane::start(&cp_dir, &etcd_dir).await?;
        let kubelet_dir = root.join("kubelet");
        std::fs::create_dir_all(&kubelet_dir)?;
        let pid = std::process::id();
        let kubelet = TestKubelet::start(
            cp.client().await?,
            KubeletConfig {
                node_name: NODE_NAME.to_string(),
                root: kubelet_dir,
                // A /16 of loopback addresses per test process, so that
                // concurrent test binaries never share a pod address.
                ip_prefix: [10 + (pid % 200) as u8, (pid / 200 % 250) as u8],
                binaries,
                api_host: "127.0.0.1".to_string(),
                api_port: cp.api_port,
                ca_pem: cp.ca_pem.clone(),
            },
        )
        .await?;
        let env = K8sEnv {
            local: Some(Local {
                cp,
                kubelet,
                root,
                etcd_dir,
            }),
            external: None,
            serial: Mutex::new(()),
        };
        if let Err(e) = env.install().await {
            env.dump_logs();
            return Err(e);
        }
        Ok(env)
    }

    /// The README's install: the CRD, then the manifests with kustomize,
    /// then waits for the CRD to be served and the operator to be available.
    async fn install(&self) -> Result<()> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        self.kubectl_ok(&["apply", "-f", &repo.join("crds").display().to_string()])
            .await?;
        // `kubectl wait` fails outright while the CRD has no conditions yet.
        crate::wait_for(Duration::from_secs(60), "the CRD to be established", || {
            self.kubectl_ok(&[
                "wait",
                "--for=condition=Established",
                "--timeout=30s",
                "crd/lockclusters.lockd.dev",
            ])
        })
        .await?;
        self.kubectl_ok(&["apply", "-k", &repo.join("manifests").display().to_string()])
            .await?;
        self.kubectl_ok(&[
            "-n",
            OPERATOR_NAMESPACE,
            "rollout",
            "status",
            "deployment/lockd-operator",
            "--timeout=180s",
        ])
        .await?;
        Ok(())
    }

    /// Holds the environment for one scenario at a time.
    pub async fn serial(&self) -> MutexGuard<'_, ()> {
        self.serial.lock().await
    }

    /// The kubeconfig and kubectl of the local control plane (None against
    /// an existing cluster): what another process needs to run the
    /// scenarios against this one as an existing cluster.
    pub fn local_access(&self) -> Option<(PathBuf, PathBuf)> {
        let local = self.local.as_ref()?;
        Some((local.cp.kubeconfig.clone(), local.cp.kubectl_path()))
    }

    /// Whether the scenarios run on this process's own control plane and
    /// test kubelet (which also means an audit log of every write).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    async fn config(&self) -> Result<kube::Config> {
        match (&self.local, &self.external) {
            (Some(l), _) => l.cp.config().await,
            (None, Some((_, kubeconfig))) => config_from(kubeconfig).await,
            (None, None) => bail!("no cluster"),
        }
    }

    /// An admin client.
    pub async fn client(&self) -> Client {
        let client = self.config().await.and_then(|c| Ok(Client::try_from(c)?));
        match client {
            Ok(c) => c,
            Err(e) => panic!("admin client: {e:#}"),
        }
    }

    /// An admin client that does not retry 429 and 5xx answers by itself
    /// (kube's default does): for calls whose refusal is the point, such
    /// as an eviction against a PodDisruptionBudget.
    pub async fn client_without_retries(&self) -> Client {
        let client = self.config().await.and_then(|mut c| {
            c.default_retry = false;
            Ok(Client::try_from(c)?)
        });
        match client {
            Ok(c) => c,
            Err(e) => panic!("admin client: {e:#}"),
        }
    }

    /// Runs kubectl with the admin kubeconfig; returns (success, stdout, stderr).
    pub async fn kubectl(&self, args: &[&str]) -> Result<(bool, String, String)> {
        self.kubectl_stdin(args, None).await
    }

    /// Like [`K8sEnv::kubectl`], with `stdin` piped in (for `-f -`).
    pub async fn kubectl_stdin(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<(bool, String, String)> {
        use tokio::io::AsyncWriteExt;
        let mut cmd = match (&self.local, &self.external) {
            (Some(l), _) => l.cp.kubectl(),
            (None, Some((kubectl, kubeconfig))) => kubectl_command(kubectl, kubeconfig),
            (None, None) => bail!("no cluster"),
        };
        cmd.args(args);
        if stdin.is_some() {
            cmd.stdin(std::process::Stdio::piped());
        }
        let mut child = cmd.spawn().context("spawn kubectl")?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).await?;
            drop(pipe);
        }
        let out = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
            .await
            .with_context(|| format!("kubectl {args:?} timed out"))??;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// kubectl that must succeed; returns its stdout.
    pub async fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let (ok, out, err) = self.kubectl(args).await?;
        if !ok {
            bail!("kubectl {} failed: {err}{out}", args.join(" "));
        }
        Ok(out)
    }

    /// Creates a fresh namespace `{prefix}-{n}` for one scenario.
    pub async fn namespace(&self, prefix: &str) -> String {
        let nss: Api<Namespace> = Api::all(self.client().await);
        let name = format!("{prefix}-{}", std::process::id());
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        if let Err(e) = nss.create(&PostParams::default(), &ns).await {
            panic!("create namespace {name}: {e}");
        }
        name
    }

    /// Deletes a scenario's namespace (without waiting for it to go).
    pub async fn drop_namespace(&self, name: &str) {
        let nss: Api<Namespace> = Api::all(self.client().await);
        let _ = nss.delete(name, &DeleteParams::default()).await;
    }

    /// A mark in the audit log: [`K8sEnv::writes_by`] counts from here.
    /// None against an existing cluster, whose audit log is not ours.
    pub fn audit_mark(&self) -> Option<usize> {
        let local = self.local.as_ref()?;
        match local.cp.audit_events() {
            Ok(e) => Some(e.len()),
            Err(e) => panic!("read the audit log: {e:#}"),
        }
    }

    /// The audit events (one per completed write) by `user` in `namespace`
    /// after `mark` (from [`K8sEnv::audit_mark`]).
    pub fn writes_by(&self, user: &str, namespace: &str, mark: usize) -> Vec<serde_json::Value> {
        let Some(local) = &self.local else {
            panic!("no audit log against an existing cluster");
        };
        let events = match local.cp.audit_events() {
            Ok(e) => e,
            Err(e) => panic!("read the audit log: {e:#}"),
        };
        events
            .into_iter()
            .skip(mark)
            .filter(|e| e["user"]["username"] == user && e["objectRef"]["namespace"] == namespace)
            .collect()
    }

    /// Prints the control plane's and every pod's logs (on failure).
    pub fn dump_logs(&self) {
        if let Some(local) = &self.local {
            local.cp.dump_logs();
            local.kubelet.dump_logs();
        }
    }
}
