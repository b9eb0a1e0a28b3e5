//! etcd, kube-apiserver and kube-controller-manager as local processes on
//! 127.0.0.1, with a throwaway CA, a static admin token and RBAC on.
//!
//! The Kubernetes binaries come from `scripts/k8s-control-plane`, which builds
//! them from `e2e/k8s/go.mod` into a cache dir and prints it; `LOCKD_K8S_BIN`
//! names that dir directly. etcd is Debian's `etcd-server`.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tokio::process::{Child, Command};

use crate::{free_ports, POLL_INTERVAL};

/// The service-account issuer the API server signs tokens as.
const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Static bearer token of the test's cluster admin (group system:masters).
const ADMIN_USER: &str = "e2e-admin";
/// How long the API server may take to report /readyz after it started.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the Kubernetes binaries are: `$LOCKD_K8S_BIN`, else whatever
/// `scripts/k8s-control-plane` prints (it builds them on first use).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LOCKD_K8S_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/k8s-control-plane");
    let out = std::process::Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let dir = String::from_utf8(out.stdout).context("bin dir is not UTF-8")?;
    Ok(PathBuf::from(dir.trim()))
}

/// A running control plane. Its processes die with the test process (they
/// are spawned with PR_SET_PDEATHSIG) or on [`ControlPlane::shutdown`].
pub struct ControlPlane {
    dir: PathBuf,
    bin: PathBuf,
    /// Port of the API server on 127.0.0.1.
    pub api_port: u16,
    /// The CA that signed the API server's serving certificate (PEM).
    pub ca_pem: String,
    /// Admin kubeconfig (cluster admin through a static token).
    pub kubeconfig: PathBuf,
    /// The API server's audit log: one JSON event per line for every write.
    pub audit_log: PathBuf,
    procs: Mutex<Vec<(String, Child)>>,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager with state
    /// under `dir` (which must exist) and waits until the API server is
    /// ready and the controller manager is working (it has created the
    /// `default` ServiceAccount).
    pub async fn start(dir: &Path, etcd_dir: &Path) -> Result<ControlPlane> {
        let bin = bin_dir()?;
        for b in ["kube-apiserver", "kube-controller-manager", "kubectl"] {
            if !bin.join(b).is_file() {
                bail!(
                    "{} is missing: run scripts/k8s-control-plane",
                    bin.join(b).display()
                );
            }
        }
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki)?;
        let ca_pem = write_pki(&pki)?;
        let token = random_token()?;
        std::fs::write(
            pki.join("tokens.csv"),
            format!("{token},{ADMIN_USER},{ADMIN_USER},system:masters\n"),
        )?;
        let audit_policy = dir.join("audit-policy.yaml");
        std::fs::write(&audit_policy, AUDIT_POLICY)?;

        let ports = free_ports(3)?;
        let (etcd_port, etcd_peer, api_port) = (ports[0], ports[1], ports[2]);
        let kubeconfig = dir.join("admin.kubeconfig");
        std::fs::write(
            &kubeconfig,
            admin_kubeconfig(api_port, &pki.join("ca.crt"), &token),
        )?;
        let audit_log = dir.join("audit.log");

        let cp = ControlPlane {
            dir: dir.to_path_buf(),
            bin: bin.clone(),
            api_port,
            ca_pem,
            kubeconfig: kubeconfig.clone(),
            audit_log: audit_log.clone(),
            procs: Mutex::new(Vec::new()),
        };

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        cp.spawn(
            "etcd",
            Path::new("/usr/bin/etcd"),
            &[
                "--name=e2e".into(),
                format!("--data-dir={}", etcd_dir.display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=e2e={peer_url}"),
                "--log-level=warn".into(),
            ],
        )?;

        let p = |f: &str| pki.join(f).display().to_string();
        cp.spawn(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                "--endpoint-reconciler-type=none".into(),
                format!("--cert-dir={}", p("generated")),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                format!("--token-auth-file={}", p("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                format!("--service-account-issuer={SA_ISSUER}"),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                format!("--audit-policy-file={}", audit_policy.display()),
                format!("--audit-log-path={}", audit_log.display()),
                "--audit-log-mode=blocking".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ],
        )?;

        let admin = poll(START_TIMEOUT, "kube-apiserver /readyz", || async {
            if let Some(exit) = cp.exited() {
                return Err(anyhow!("{exit}"));
            }
            let Ok(client) = cp.client().await else {
                return Ok(None);
            };
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .context("readyz request")?;
            match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => Ok(Some(client)),
                _ => Ok(None),
            }
        })
        .await
        .inspect_err(|_| cp.dump_logs())?;

        cp.spawn(
            "kube-controller-manager",
            &bin.join("kube-controller-manager"),
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                "--leader-elect=false".into(),
                // No serving endpoint: nothing scrapes it here.
                "--secure-port=0".into(),
                format!("--root-ca-file={}", p("ca.crt")),
                format!("--service-account-private-key-file={}", p("sa.key")),
                "--cluster-name=lockd-e2e".into(),
                "--v=1".into(),
            ],
        )?;
        let sas: Api<ServiceAccount> = Api::namespaced(admin, "default");
        poll(
            START_TIMEOUT,
            "kube-controller-manager to create ServiceAccount default",
            || async {
                if let Some(exit) = cp.exited() {
                    return Err(anyhow!("{exit}"));
                }
                Ok(sas.get_opt("default").await.ok().flatten())
            },
        )
        .await
        .inspect_err(|_| cp.dump_logs())?;
        Ok(cp)
    }

    /// A client with the admin token.
    pub async fn client(&self) -> Result<Client> {
        Ok(Client::try_from(self.config().await?)?)
    }

    /// The admin client's configuration.
    pub async fn config(&self) -> Result<Config> {
        config_from(&self.kubeconfig).await
    }

    /// The kubectl binary built with the control plane.
    pub fn kubectl_path(&self) -> PathBuf {
        self.bin.join("kubectl")
    }

    /// `kubectl --kubeconfig=<admin>`, ready for arguments; output piped.
    pub fn kubectl(&self) -> Command {
        kubectl_command(&self.kubectl_path(), &self.kubeconfig)
    }

    /// Every audit event (one per completed write request) so far.
    pub fn audit_events(&self) -> Result<Vec<serde_json::Value>> {
        let text = match std::fs::read_to_string(&self.audit_log) {
            Ok(t) => t,
            // No write yet: no file yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).context("read the audit log"),
        };
        // The last line may be half written: skip what does not parse.
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Log of one component (`etcd`, `kube-apiserver`, ...).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Prints the last lines of each component's log to stderr.
    pub fn dump_logs(&self) {
        for name in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            let log = self.log(name);
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("===== {name} (last {} lines)", tail.len());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    /// Kills every component. Idempotent.
    pub fn shutdown(&self) {
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        // Controller manager first, etcd last, so nothing logs storage errors.
        while let Some((_, mut child)) = procs.pop() {
            let _ = child.start_kill();
        }
    }

    /// A component that has exited, described.
    fn exited(&self) -> Option<String> {
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        for (name, child) in procs.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(format!(
                    "{name} exited: {status}; see {}/{name}.log",
                    self.dir.display()
                ));
            }
        }
        None
    }

    fn spawn(&self, name: &str, bin: &Path, args: &[String]) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        self.procs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), child));
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Writes writes. Reads are not logged: the tests count writes only, and a
/// log of every watch and list would be most of the disk traffic.
const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted]
rules:
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
";

/// CA, API server serving certificate (127.0.0.1 and the in-cluster
/// names) and the service-account signing key, as PEM files in `pki`.
/// Returns the CA certificate's PEM.
fn write_pki(pki: &Path) -> Result<String> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "lockd-e2e-ca");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

    let mut server = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
    ])?;
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    for ip in [Ipv4Addr::LOCALHOST, Ipv4Addr::new(10, 96, 0, 1)] {
        server
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(ip)));
    }
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &ca)?;

    let sa = KeyPair::generate()?;
    std::fs::write(pki.join("ca.crt"), ca.pem())?;
    std::fs::write(pki.join("apiserver.crt"), server_cert.pem())?;
    std::fs::write(pki.join("apiserver.key"), server_key.serialize_pem())?;
    std::fs::write(pki.join("sa.key"), sa.serialize_pem())?;
    std::fs::write(pki.join("sa.pub"), sa.public_key_pem())?;
    Ok(ca.pem())
}

/// Polls `f` until it returns `Ok(Some(v))`; `Err` ends the wait at once
/// (a component died), `Ok(None)` means not yet.
async fn poll<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await.with_context(|| format!("waiting for {what}"))? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL * 4).await;
    }
}

/// 32 random bytes as hex: the admin's bearer token.
fn random_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn admin_kubeconfig(port: u16, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
  - name: e2e
    cluster:
      server: https://127.0.0.1:{port}
      certificate-authority: {ca}
users:
  - name: {ADMIN_USER}
    user:
      token: {token}
contexts:
  - name: e2e
    context:
      cluster: e2e
      user: {ADMIN_USER}
      namespace: default
current-context: e2e
",
        ca = ca.display()
    )
}

/// A client configuration from a kubeconfig file (its current context).
pub async fn config_from(kubeconfig: &Path) -> Result<Config> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    Ok(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
}

/// `kubectl --kubeconfig=<kubeconfig>` (never `$KUBECONFIG`), ready for
/// arguments; output piped.
pub fn kubectl_command(kubectl: &Path, kubeconfig: &Path) -> Command {
    let mut cmd = Command::new(kubectl);
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}
