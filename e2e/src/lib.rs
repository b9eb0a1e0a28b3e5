//! Process-level test harness for lockd: real `lockd` processes on 127.0.0.1
//! with ephemeral ports, each member's data dir and log inside one temp dir.
//!
//! * Every child process is SIGKILLed and the temp dir removed when the
//!   [`Cluster`] is dropped (set `LOCKD_E2E_KEEP=1` to keep the dir).
//! * When the cluster is dropped while the thread panics (a failed test), the
//!   tail of every member's log is printed to stderr; [`Cluster::dump_logs`]
//!   does it on demand.
//! * Waiting is done by polling a condition against a deadline
//!   ([`wait_until`], [`wait_for`]), never by sleeping a fixed time.
//! * Clients are the generated tonic clients of `lockd_proto::v1`, created with
//!   `connect_lazy`, so they must be created inside a Tokio runtime.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub mod k8s;
pub mod local_operator;
pub mod lockctl;
pub mod proxy;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

pub use lockd_proto::v1;
use v1::cluster_client::ClusterClient;
use v1::kv_client::KvClient;
use v1::{Role, StatusRequest, StatusResponse};

/// How often conditions are re-evaluated by the wait helpers.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

const BUILD_HINT: &str =
    "build the binaries first: cargo build --workspace --bins, which scripts/test does";

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// Path of the `lockd` server binary: `$LOCKD_BIN`, else next to the test
/// executable's target dir (`target/<profile>/lockd`).
pub fn lockd_bin() -> PathBuf {
    find_bin("LOCKD_BIN", "lockd")
}

/// Path of the operator binary: `$LOCKD_OPERATOR_BIN`, else
/// `target/<profile>/lockd-operator`.
pub fn operator_bin() -> PathBuf {
    find_bin("LOCKD_OPERATOR_BIN", "lockd-operator")
}

/// Path of the `lockctl` CLI binary: `$LOCKCTL_BIN`, else `target/<profile>/lockctl`.
pub fn lockctl_bin() -> PathBuf {
    find_bin("LOCKCTL_BIN", "lockctl")
}

/// `lockctl --endpoints=ENDPOINTS` ready for more arguments: no
/// `LOCKD_ENDPOINTS` from the environment, stdin null, stdout and stderr
/// piped, killed when dropped. Add the arguments with `.args(...)`; set
/// stderr again to discard it.
pub fn lockctl_command(endpoints: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(lockctl_bin());
    cmd.env_remove("LOCKD_ENDPOINTS")
        .arg(format!("--endpoints={endpoints}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Sends signal `sig` to process `pid` (a child the test started); panics
/// if kill(2) fails.
pub fn signal(pid: u32, sig: i32) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits in pid_t");
    // SAFETY: plain kill(2) on a process the test started.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

fn find_bin(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            panic!("{env}={} does not exist or is not a file", p.display());
        }
        return p;
    }
    let exe = std::env::current_exe().expect("std::env::current_exe failed");
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        // Tests live in target/<profile>/deps/, binaries in target/<profile>/.
        if dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(profile_dir) = dir.parent() {
                candidates.push(profile_dir.join(&file));
            }
        }
        candidates.push(dir.join(&file));
    }
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "`{name}` binary not found (looked at {:?}, or set {env}): {BUILD_HINT}",
        candidates
    );
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Polls `cond` every [`POLL_INTERVAL`] until it returns true or `timeout`
/// passes (an evaluation still running at the deadline is abandoned).
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(true) = tokio::time::timeout_at(deadline, cond()).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `f` until it returns `Ok(value)` or `timeout` passes; the error of
/// the last attempt is part of the timeout error.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt finished");
    loop {
        match tokio::time::timeout_at(deadline, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => last = format!("{e:#}"),
            Err(_) => last = format!("{last} (an attempt was still running at the deadline)"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Runs `fut` with an overall time bound, panicking with `what` when it
/// passes. Use it for a test body while the [`Cluster`] lives outside the
/// future, so that the cluster's logs are dumped on a timeout.
pub async fn bounded<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {limit:?}"),
    }
}

// ---------------------------------------------------------------------------
// Plain HTTP
// ---------------------------------------------------------------------------

/// `GET http://{addr}{path}` with HTTP/1.1 and `Connection: close`;
/// returns the status code and the body.
pub async fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status_line = text.lines().next().unwrap_or_default();
        let code = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("bad HTTP status line {status_line:?} from {addr}{path}"))?;
        let body = match text.find("\r\n\r\n") {
            Some(i) => text[i + 4..].to_string(),
            None => String::new(),
        };
        Ok::<_, anyhow::Error>((code, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("GET {addr}{path} timed out after {timeout:?}"))?
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A lazily connecting channel to `endpoint` ("http://host:port") with a
/// per-request timeout. Must be called inside a Tokio runtime.
pub fn channel(endpoint: &str, rpc_timeout: Duration) -> Channel {
    Endpoint::from_shared(endpoint.to_string())
        .unwrap_or_else(|e| panic!("invalid endpoint {endpoint:?}: {e}"))
        .connect_timeout(Duration::from_secs(2))
        .timeout(rpc_timeout)
        .connect_lazy()
}

/// KV client for `endpoint` with a per-request timeout.
pub fn kv_client(endpoint: &str, rpc_timeout: Duration) -> KvClient<Channel> {
    KvClient::new(channel(endpoint, rpc_timeout))
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20)
}

/// Cluster (admin/status) client for `endpoint` with a per-request timeout.
pub fn cluster_client(endpoint: &str, rpc_timeout: Duration) -> ClusterClient<Channel> {
    ClusterClient::new(channel(endpoint, rpc_timeout))
}

/// The role of a status response as an enum (unknown values map to `Unknown`).
pub fn role_of(s: &StatusResponse) -> Role {
    Role::try_from(s.role).unwrap_or(Role::Unknown)
}

/// `(id, voter)` pairs of a member list, sorted by id.
pub fn member_set(members: &[v1::Member]) -> Vec<(u64, bool)> {
    let mut v: Vec<(u64, bool)> = members.iter().map(|m| (m.id, m.voter)).collect();
    v.sort_unstable();
    v
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// Options applied to every member of a [`Cluster`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `--cluster-id`; `None` leaves the server default ("lockd").
    pub cluster_id: Option<String>,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    /// `--snapshot-threshold`.
    pub snapshot_threshold: Option<u64>,
    /// Extra arguments appended to every member's command line.
    pub extra_args: Vec<String>,
    /// Per-request timeout of the clients made by [`Cluster::kv`] and friends.
    pub rpc_timeout: Duration,
    /// Bound for the members of [`Cluster::start`] to answer `/healthz`.
    pub start_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            cluster_id: None,
            heartbeat_ms: 50,
            election_timeout_ms: 500,
            snapshot_threshold: None,
            extra_args: Vec::new(),
            rpc_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(20),
        }
    }
}

impl ClusterOptions {
    pub fn snapshot_threshold(mut self, n: u64) -> Self {
        self.snapshot_threshold = Some(n);
        self
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra_args.push(a.into());
        self
    }
}

/// How one member is started.
#[derive(Clone, Debug, Default)]
pub struct MemberConfig {
    /// Data dir; `None` means `<tmp>/node-<id>`.
    pub data_dir: Option<PathBuf>,
    /// Pass the cluster's `--initial-members` list.
    pub initial_members: bool,
    /// Extra arguments for this member only.
    pub extra_args: Vec<String>,
}

struct Member {
    port: u16,
    http_port: u16,
    config: MemberConfig,
    child: Option<Child>,
    last_exit: Option<ExitStatus>,
    log_path: PathBuf,
    /// Byte offset of the current incarnation's output in `log_path`.
    log_offset: u64,
    starts: u32,
}

impl Member {
    /// Reaps the child if it exited; true while it runs.
    fn running(&mut self) -> bool {
        if let Some(child) = self.child.as_mut() {
            match child.try_wait() {
                Ok(None) => return true,
                Ok(Some(st)) => {
                    self.last_exit = Some(st);
                    self.child = None;
                }
                Err(_) => return true,
            }
        }
        false
    }
}

/// A set of lockd member processes sharing one temp dir.
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    opts: ClusterOptions,
    initial_members: String,
    members: Mutex<BTreeMap<u64, Member>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `n` distinct free ports on 127.0.0.1 (all listeners are held until every
/// port is known, then released).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut ls = Vec::with_capacity(n);
    for _ in 0..n {
        ls.push(std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?);
    }
    ls.iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect::<Result<Vec<_>>>()
}

fn looks_like_addr_in_use(log: &str) -> bool {
    let l = log.to_ascii_lowercase();
    l.contains("address already in use") || l.contains("addrinuse") || l.contains("address in use")
}

impl Cluster {
    /// Starts members `1..=n`, all with `--initial-members` listing each
    /// other, and waits until every one answers `/healthz`. Retries with new
    /// ports when a member exits because its port was taken meanwhile.
    /// Does not wait for a leader: use [`Cluster::wait_for_leader`].
    pub async fn start(n: u64, opts: ClusterOptions) -> Result<Cluster> {
        let attempts = 3;
        for attempt in 1..=attempts {
            let c = Cluster::spawn_initial(n, opts.clone())?;
            match c.wait_all_healthy(opts.start_timeout).await {
                Ok(()) => return Ok(c),
                Err(e) if attempt < attempts && c.any_log(looks_like_addr_in_use) => {
                    eprintln!("lockd-e2e: port collision on attempt {attempt}, retrying: {e:#}");
                    drop(c);
                }
                Err(e) => {
                    c.dump_logs();
                    return Err(e.context(format!("starting a {n}-member cluster")));
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// [`Cluster::start`] then [`Cluster::wait_for_leader`] with
    /// `leader_timeout`; panics (the logs are dumped) if either fails. For
    /// tests whose body needs a working cluster from the start.
    pub async fn start_ready(n: u64, opts: ClusterOptions, leader_timeout: Duration) -> Cluster {
        let c = Cluster::start(n, opts)
            .await
            .unwrap_or_else(|e| panic!("start {n} members: {e:?}"));
        c.wait_for_leader(leader_timeout).await.expect("a leader");
        c
    }

    /// [`Cluster::start_ready`] with 3 members, default options and 20 s
    /// to agree on a leader.
    pub async fn start_three() -> Cluster {
        Cluster::start_ready(3, ClusterOptions::default(), Duration::from_secs(20)).await
    }

    fn spawn_initial(n: u64, opts: ClusterOptions) -> Result<Cluster> {
        let bin = lockd_bin();
        let dir = tempfile::Builder::new()
            .prefix("lockd-e2e-")
            .tempdir()
            .context("create temp dir")?;
        let root = dir.path().to_path_buf();
        let ports = free_ports(2 * n as usize)?;
        let mut members = BTreeMap::new();
        let mut initial = Vec::new();
        for i in 0..n {
            let id = i + 1;
            let (port, http_port) = (ports[2 * i as usize], ports[2 * i as usize + 1]);
            initial.push(format!("{id}=127.0.0.1:{port}"));
            members.insert(
                id,
                Member {
                    port,
                    http_port,
                    config: MemberConfig {
                        initial_members: true,
                        ..Default::default()
                    },
                    child: None,
                    last_exit: None,
                    log_path: root.join(format!("node-{id}.log")),
                    log_offset: 0,
                    starts: 0,
                },
            );
        }
        let c = Cluster {
            dir: Some(dir),
            root,
            opts,
            initial_members: initial.join(","),
            members: Mutex::new(members),
        };
        for id in 1..=n {
            c.spawn(id, &bin, None)?;
        }
        Ok(c)
    }

    async fn wait_all_healthy(&self, timeout: Duration) -> Result<()> {
        let ids = self.ids();
        wait_for(timeout, "all members to answer /healthz", || async {
            for &id in &ids {
                if let Some(st) = self.exit_status(id) {
                    // Not retryable by waiting: stop right away.
                    return Ok(Err(anyhow!("member {id} exited at start with {st}")));
                }
                let (code, _) =
                    http_get(&self.http_addr(id), "/healthz", Duration::from_secs(1)).await?;
                if code != 200 {
                    bail!("member {id} /healthz answered {code}");
                }
            }
            Ok(Ok(()))
        })
        .await?
    }

    /// Spawns member `id` (must exist in the map and not run) with its stored
    /// config plus `extra` arguments for this incarnation only.
    fn spawn(&self, id: u64, bin: &Path, extra: Option<&[String]>) -> Result<()> {
        let mut members = lock(&self.members);
        let m = members
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no member {id}"))?;
        if m.running() {
            bail!("member {id} is already running");
        }
        let data_dir = m
            .config
            .data_dir
            .clone()
            .unwrap_or_else(|| self.root.join(format!("node-{id}")));
        let mut args: Vec<String> = vec![
            "--id".into(),
            id.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", m.port),
            "--http-listen".into(),
            format!("127.0.0.1:{}", m.http_port),
            "--heartbeat-ms".into(),
            self.opts.heartbeat_ms.to_string(),
            "--election-timeout-ms".into(),
            self.opts.election_timeout_ms.to_string(),
        ];
        if m.config.initial_members {
            args.push("--initial-members".into());
            args.push(self.initial_members.clone());
        }
        if let Some(cid) = &self.opts.cluster_id {
            args.push("--cluster-id".into());
            args.push(cid.clone());
        }
        if let Some(t) = self.opts.snapshot_threshold {
            args.push("--snapshot-threshold".into());
            args.push(t.to_string());
        }
        args.extend(self.opts.extra_args.iter().cloned());
        args.extend(m.config.extra_args.iter().cloned());
        if let Some(extra) = extra {
            args.extend(extra.iter().cloned());
        }

        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log_path)
            .with_context(|| format!("open {}", m.log_path.display()))?;
        m.starts += 1;
        writeln!(
            log,
            "===== lockd-e2e: start #{} of member {id}: {} {}",
            m.starts,
            bin.display(),
            args.join(" ")
        )?;
        log.flush()?;
        m.log_offset = log.metadata()?.len();
        let stderr = log.try_clone()?;

        let mut cmd = Command::new(bin);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // Do not leave members behind if the test process dies. Note that
            // this fires when the *spawning thread* exits: spawn members from
            // the test's own thread or a runtime worker, not a short-lived one.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {} for member {id}", bin.display()))?;
        m.child = Some(child);
        m.last_exit = None;
        Ok(())
    }

    // ----- addresses ------------------------------------------------------

    fn with_member<T>(&self, id: u64, f: impl FnOnce(&mut Member) -> T) -> T {
        let mut members = lock(&self.members);
        let m = members
            .get_mut(&id)
            .unwrap_or_else(|| panic!("lockd-e2e: no member {id} in this cluster"));
        f(m)
    }

    /// Root of the cluster's temp dir.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Ids of all members ever started (running or not).
    pub fn ids(&self) -> Vec<u64> {
        lock(&self.members).keys().copied().collect()
    }

    /// Ids of the members whose process is running.
    pub fn running_ids(&self) -> Vec<u64> {
        lock(&self.members)
            .iter_mut()
            .filter_map(|(id, m)| m.running().then_some(*id))
            .collect()
    }

    /// gRPC address "127.0.0.1:P" (what goes into member lists / AddLearner).
    pub fn addr(&self, id: u64) -> String {
        self.with_member(id, |m| format!("127.0.0.1:{}", m.port))
    }

    /// gRPC endpoint "http://127.0.0.1:P".
    pub fn endpoint(&self, id: u64) -> String {
        format!("http://{}", self.addr(id))
    }

    /// Endpoints of every running member.
    pub fn endpoints(&self) -> Vec<String> {
        self.running_ids()
            .into_iter()
            .map(|id| self.endpoint(id))
            .collect()
    }

    /// [`Cluster::endpoints`] rotated left by `i % n`, so that client `i`
    /// starts on the `i % n`-th running member (spreads clients over the
    /// members). Panics when no member runs.
    pub fn endpoints_from(&self, i: usize) -> Vec<String> {
        let mut eps = self.endpoints();
        let n = eps.len();
        eps.rotate_left(i % n);
        eps
    }

    /// Ids of all members but `leader` (running or not).
    pub fn followers(&self, leader: u64) -> Vec<u64> {
        self.ids().into_iter().filter(|&i| i != leader).collect()
    }

    /// HTTP address "127.0.0.1:H".
    pub fn http_addr(&self, id: u64) -> String {
        self.with_member(id, |m| format!("127.0.0.1:{}", m.http_port))
    }

    /// HTTP endpoint "http://127.0.0.1:H".
    pub fn http_endpoint(&self, id: u64) -> String {
        format!("http://{}", self.http_addr(id))
    }

    /// The `--initial-members` value of the cluster.
    pub fn initial_members(&self) -> String {
        self.initial_members.clone()
    }

    /// Data dir of member `id`.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        let root = self.root.clone();
        self.with_member(id, |m| {
            m.config
                .data_dir
                .clone()
                .unwrap_or_else(|| root.join(format!("node-{id}")))
        })
    }

    /// Pid of member `id` while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.with_member(id, |m| {
            if m.running() {
                m.child.as_ref().map(|c| c.id())
            } else {
                None
            }
        })
    }

    /// True while member `id`'s process runs.
    pub fn is_running(&self, id: u64) -> bool {
        self.with_member(id, |m| m.running())
    }

    /// Exit status of member `id` if its process has exited.
    pub fn exit_status(&self, id: u64) -> Option<ExitStatus> {
        self.with_member(id, |m| if m.running() { None } else { m.last_exit })
    }

    // ----- process control ------------------------------------------------

    /// Sends `sig` to member `id`'s process (e.g. SIGSTOP/SIGCONT to cut it
    /// off for a while); panics if it is not running or kill(2) fails.
    pub fn signal(&self, id: u64, sig: i32) {
        signal(self.pid(id).expect("member is running"), sig);
    }

    /// SIGKILL member `id` and reap it. No-op if it is not running.
    pub fn kill(&self, id: u64) {
        self.with_member(id, |m| {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                m.last_exit = c.wait().ok();
            }
        })
    }

    /// SIGTERM member `id` and wait up to `timeout` for it to exit; SIGKILLs
    /// it and fails if it does not. Returns the exit status.
    pub async fn terminate(&self, id: u64, timeout: Duration) -> Result<ExitStatus> {
        let pid = self
            .pid(id)
            .ok_or_else(|| anyhow!("member {id} is not running"))?;
        let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: plain syscall on our own, not yet reaped, child.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!(
                "kill(SIGTERM) member {id}: {}",
                std::io::Error::last_os_error()
            );
        }
        match self.wait_exit(id, timeout).await {
            Ok(st) => Ok(st),
            Err(e) => {
                self.kill(id);
                Err(e.context(format!("member {id} ignored SIGTERM, killed it")))
            }
        }
    }

    /// Waits up to `timeout` for member `id`'s process to exit.
    pub async fn wait_exit(&self, id: u64, timeout: Duration) -> Result<ExitStatus> {
        wait_for(timeout, &format!("member {id} to exit"), || async {
            self.exit_status(id).ok_or_else(|| anyhow!("still running"))
        })
        .await
    }

    /// Starts member `id` again with the same id, ports, data dir and flags.
    pub fn restart(&self, id: u64) -> Result<()> {
        self.spawn(id, &lockd_bin(), None)
    }

    /// Like [`Cluster::restart`] with extra arguments for this start only.
    pub fn restart_with_args(&self, id: u64, extra: &[&str]) -> Result<()> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        self.spawn(id, &lockd_bin(), Some(&extra))
    }

    /// Deletes member `id`'s data dir; the member must not be running.
    pub fn wipe(&self, id: u64) -> Result<()> {
        if self.is_running(id) {
            bail!("wipe: member {id} is running");
        }
        let dir = self.data_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("remove {}", dir.display())),
        }
    }

    /// Starts a member without `--initial-members` (waits to be initialized
    /// or added through the admin API). Returns its gRPC address.
    pub fn start_new_member(&self, id: u64) -> Result<String> {
        self.start_member(id, MemberConfig::default())
    }

    /// Starts member `id` with `config` (new ports for a new id, the same
    /// ports for a known one). Returns its gRPC address. Does not wait.
    pub fn start_member(&self, id: u64, config: MemberConfig) -> Result<String> {
        {
            let mut members = lock(&self.members);
            match members.get_mut(&id) {
                Some(m) => {
                    if m.running() {
                        bail!("member {id} is already running");
                    }
                    m.config = config;
                }
                None => {
                    let ports = free_ports(2)?;
                    members.insert(
                        id,
                        Member {
                            port: ports[0],
                            http_port: ports[1],
                            config,
                            child: None,
                            last_exit: None,
                            log_path: self.root.join(format!("node-{id}.log")),
                            log_offset: 0,
                            starts: 0,
                        },
                    );
                }
            }
        }
        self.spawn(id, &lockd_bin(), None)?;
        Ok(self.addr(id))
    }

    // ----- logs -----------------------------------------------------------

    /// Whole log (stdout+stderr, all incarnations) of member `id`.
    pub fn log(&self, id: u64) -> String {
        let path = self.with_member(id, |m| m.log_path.clone());
        fs::read(&path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Output of member `id`'s current (or last) incarnation only.
    pub fn log_since_start(&self, id: u64) -> String {
        let (path, off) = self.with_member(id, |m| (m.log_path.clone(), m.log_offset));
        match fs::read(&path) {
            Ok(b) => {
                String::from_utf8_lossy(b.get(off as usize..).unwrap_or_default()).into_owned()
            }
            Err(_) => String::new(),
        }
    }

    fn any_log(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.ids()
            .into_iter()
            .any(|id| pred(&self.log_since_start(id)))
    }

    /// Prints the last lines of every member's log to stderr.
    pub fn dump_logs(&self) {
        const TAIL: usize = 80;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "===== lockd-e2e: member logs (dir {}) =====",
            self.root.display()
        );
        for id in self.ids() {
            let state = match self.exit_status(id) {
                Some(st) => format!("exited: {st}"),
                None if self.is_running(id) => "running".to_string(),
                None => "not started".to_string(),
            };
            let log = self.log(id);
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(TAIL);
            let _ = writeln!(
                out,
                "----- member {id} ({state}), last {} of {} lines -----",
                lines.len() - from,
                lines.len()
            );
            for l in &lines[from..] {
                let _ = writeln!(out, "[{id}] {l}");
            }
        }
        let _ = writeln!(out, "===== end of member logs =====");
        eprint!("{out}");
    }

    // ----- clients --------------------------------------------------------

    /// KV client of member `id` (default per-request timeout).
    pub fn kv(&self, id: u64) -> KvClient<Channel> {
        kv_client(&self.endpoint(id), self.opts.rpc_timeout)
    }

    /// KV client of member `id` with the given per-request timeout.
    pub fn kv_with_timeout(&self, id: u64, t: Duration) -> KvClient<Channel> {
        kv_client(&self.endpoint(id), t)
    }

    /// Cluster (admin) client of member `id`.
    pub fn cluster_client(&self, id: u64) -> ClusterClient<Channel> {
        cluster_client(&self.endpoint(id), self.opts.rpc_timeout)
    }

    /// Cluster (admin) client of member `id` with the given per-request timeout.
    pub fn cluster_client_with_timeout(&self, id: u64, t: Duration) -> ClusterClient<Channel> {
        cluster_client(&self.endpoint(id), t)
    }

    /// Status of member `id` (2 s timeout).
    pub async fn status(&self, id: u64) -> Result<StatusResponse, tonic::Status> {
        let mut c = cluster_client(&self.endpoint(id), Duration::from_secs(2));
        c.status(StatusRequest {}).await.map(|r| r.into_inner())
    }

    /// `/readyz` status code of member `id`.
    pub async fn readyz(&self, id: u64) -> Result<u16> {
        Ok(
            http_get(&self.http_addr(id), "/readyz", Duration::from_secs(2))
                .await?
                .0,
        )
    }

    // ----- waits ----------------------------------------------------------

    /// Waits until every running member that belongs to the cluster (started
    /// with `--initial-members`, or reporting a role other than
    /// UNINITIALIZED) reports the same leader at the same term and that
    /// leader reports itself LEADER. Returns the leader id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64> {
        wait_for(
            timeout,
            "all running members to agree on a leader",
            || async {
                let ids = self.running_ids();
                let mut statuses = Vec::new();
                for id in ids {
                    let initial = self.with_member(id, |m| m.config.initial_members);
                    match self.status(id).await {
                        Ok(s) if !initial && role_of(&s) == Role::Uninitialized => {}
                        Ok(s) => statuses.push((id, s)),
                        Err(e) => bail!("status of member {id}: {e}"),
                    }
                }
                agree_on_leader(&statuses)
            },
        )
        .await
        .map_err(|e| e.context(self.exited_summary()))
    }

    /// Like [`Cluster::wait_for_leader`] but only over `ids` (all must run).
    pub async fn wait_for_leader_among(&self, ids: &[u64], timeout: Duration) -> Result<u64> {
        wait_for(
            timeout,
            &format!("members {ids:?} to agree on a leader"),
            || async {
                let mut statuses = Vec::new();
                for &id in ids {
                    let s = self
                        .status(id)
                        .await
                        .map_err(|e| anyhow!("status of member {id}: {e}"))?;
                    statuses.push((id, s));
                }
                agree_on_leader(&statuses)
            },
        )
        .await
        .map_err(|e| e.context(self.exited_summary()))
    }

    /// Status of the current leader (after waiting for agreement).
    pub async fn leader_status(&self, timeout: Duration) -> Result<StatusResponse> {
        let leader = self.wait_for_leader(timeout).await?;
        self.status(leader)
            .await
            .map_err(|e| anyhow!("status of leader {leader}: {e}"))
    }

    /// Waits until member `id`'s `/healthz` answers 200 (process up);
    /// fails at once if the process exits.
    pub async fn wait_healthy(&self, id: u64, timeout: Duration) -> Result<()> {
        wait_for(
            timeout,
            &format!("member {id} to answer /healthz"),
            || async {
                if let Some(st) = self.exit_status(id) {
                    return Ok(Err(anyhow!("member {id} exited with {st}")));
                }
                match http_get(&self.http_addr(id), "/healthz", Duration::from_secs(1))
                    .await?
                    .0
                {
                    200 => Ok(Ok(())),
                    c => bail!("/healthz answered {c}"),
                }
            },
        )
        .await?
    }

    /// Waits until member `id`'s `/readyz` answers 200.
    pub async fn wait_ready(&self, id: u64, timeout: Duration) -> Result<()> {
        wait_for(timeout, &format!("member {id} to be ready"), || async {
            if let Some(st) = self.exit_status(id) {
                return Ok(Err(anyhow!("member {id} exited with {st}")));
            }
            match self.readyz(id).await? {
                200 => Ok(Ok(())),
                c => bail!("/readyz answered {c}"),
            }
        })
        .await?
    }

    /// Waits until member `id` has applied at least `index`.
    pub async fn wait_applied(
        &self,
        id: u64,
        index: u64,
        timeout: Duration,
    ) -> Result<StatusResponse> {
        wait_for(
            timeout,
            &format!("member {id} to apply index {index}"),
            || async {
                let s = self.status(id).await.map_err(|e| anyhow!("status: {e}"))?;
                if s.applied_index >= index {
                    Ok(s)
                } else {
                    bail!("applied_index {} < {index}", s.applied_index)
                }
            },
        )
        .await
    }

    /// Waits until member `id` has applied everything the leader had
    /// committed when this was called.
    pub async fn wait_caught_up(&self, id: u64, timeout: Duration) -> Result<StatusResponse> {
        let deadline = Instant::now() + timeout;
        let leader = self.leader_status(timeout).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        self.wait_applied(id, leader.commit_index, left).await
    }

    fn exited_summary(&self) -> String {
        let mut s = String::new();
        for id in self.ids() {
            if let Some(st) = self.exit_status(id) {
                let _ = write!(s, "member {id} exited ({st}); ");
            }
        }
        if s.is_empty() {
            "no member has exited".into()
        } else {
            s
        }
    }
}

fn agree_on_leader(statuses: &[(u64, StatusResponse)]) -> Result<u64> {
    let Some((_, first)) = statuses.first() else {
        bail!("no running member to ask");
    };
    let (leader, term) = (first.leader_id, first.term);
    if leader == 0 {
        bail!("member {} knows no leader", first.id);
    }
    for (id, s) in statuses {
        if s.leader_id != leader || s.term != term {
            bail!(
                "disagreement: member {} says leader {} term {}, member {id} says leader {} term {}",
                first.id, leader, term, s.leader_id, s.term
            );
        }
    }
    match statuses.iter().find(|(id, _)| *id == leader) {
        Some((_, s)) if role_of(s) == Role::Leader => Ok(leader),
        Some((_, s)) => bail!(
            "member {leader} is named leader but reports role {:?}",
            role_of(s)
        ),
        None => bail!("leader {leader} is not among the members asked"),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            self.dump_logs();
        }
        {
            let mut members = lock(&self.members);
            for m in members.values_mut() {
                if let Some(mut c) = m.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        if std::env::var_os("LOCKD_E2E_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("lockd-e2e: keeping {}", d.keep().display());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Background writer with failover
// ---------------------------------------------------------------------------

/// An acknowledged write of a [`Writer`].
#[derive(Clone, Debug)]
pub struct AckedWrite {
    pub key: String,
    pub value: Vec<u8>,
    pub revision: u64,
}

/// What a [`Writer`] saw.
#[derive(Debug, Default)]
pub struct WriterReport {
    /// Acknowledged writes in order (keys `<prefix>/0`, `<prefix>/1`, ...).
    pub acked: Vec<AckedWrite>,
    /// Failures after which the write may or may not have been applied
    /// (deadline, unknown, cancelled, ...). The key was retried.
    pub ambiguous: usize,
    /// UNAVAILABLE answers (not applied). The key was retried.
    pub unavailable: usize,
    /// Any other error (a bug: the writer sends only valid puts).
    pub errors: Vec<String>,
}

struct WriterShared {
    stop: AtomicBool,
    acked_count: AtomicUsize,
    report: Mutex<WriterReport>,
    endpoints: Mutex<Vec<String>>,
}

/// Writes `<prefix>/<i>` = `value-<i>` sequentially for i = 0, 1, ...,
/// retrying each key (same value) on the next endpoint until acknowledged.
pub struct Writer {
    shared: Arc<WriterShared>,
    handle: JoinHandle<()>,
}

impl Writer {
    /// The value the writer puts under key number `i`.
    pub fn value_for(i: usize) -> Vec<u8> {
        format!("value-{i}").into_bytes()
    }

    pub fn spawn(endpoints: Vec<String>, prefix: &str, rpc_timeout: Duration) -> Writer {
        let shared = Arc::new(WriterShared {
            stop: AtomicBool::new(false),
            acked_count: AtomicUsize::new(0),
            report: Mutex::new(WriterReport::default()),
            endpoints: Mutex::new(endpoints),
        });
        let prefix = prefix.trim_end_matches('/').to_string();
        let sh = shared.clone();
        let handle = tokio::spawn(async move {
            let mut clients: HashMap<String, KvClient<Channel>> = HashMap::new();
            let mut next_ep = 0usize;
            let mut failures_in_row = 0usize;
            let mut i = 0usize;
            while !sh.stop.load(Ordering::SeqCst) {
                let eps = lock(&sh.endpoints).clone();
                if eps.is_empty() {
                    tokio::time::sleep(POLL_INTERVAL).await;
                    continue;
                }
                let ep = eps[next_ep % eps.len()].clone();
                let client = clients
                    .entry(ep.clone())
                    .or_insert_with(|| kv_client(&ep, rpc_timeout));
                let key = format!("{prefix}/{i}");
                let value = Writer::value_for(i);
                let req = v1::PutRequest {
                    path: key.clone(),
                    data: value.clone(),
                    expected_version: None,
                    parents: true,
                };
                match client.put(req).await {
                    Ok(resp) => {
                        let revision = resp.into_inner().header.map(|h| h.revision).unwrap_or(0);
                        lock(&sh.report).acked.push(AckedWrite {
                            key,
                            value,
                            revision,
                        });
                        sh.acked_count.fetch_add(1, Ordering::SeqCst);
                        i += 1;
                        failures_in_row = 0;
                        continue;
                    }
                    Err(st) => {
                        let mut r = lock(&sh.report);
                        match st.code() {
                            Code::Unavailable => r.unavailable += 1,
                            Code::DeadlineExceeded
                            | Code::Unknown
                            | Code::Cancelled
                            | Code::Aborted
                            | Code::Internal => r.ambiguous += 1,
                            _ => r.errors.push(format!("put {key} via {ep}: {st}")),
                        }
                    }
                }
                next_ep += 1;
                failures_in_row += 1;
                if failures_in_row.is_multiple_of(eps.len()) {
                    // Every endpoint failed once in a row: back off a little.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Writer { shared, handle }
    }

    /// Number of acknowledged writes so far.
    pub fn acked(&self) -> usize {
        self.shared.acked_count.load(Ordering::SeqCst)
    }

    /// Replaces the endpoints the writer rotates through.
    pub fn set_endpoints(&self, eps: Vec<String>) {
        *lock(&self.shared.endpoints) = eps;
    }

    /// Waits until at least `n` writes are acknowledged.
    pub async fn wait_acked(&self, n: usize, timeout: Duration) -> Result<()> {
        let res = wait_until(timeout, &format!("{n} acknowledged writes"), || async {
            self.acked() >= n
        })
        .await;
        res.map_err(|e| {
            let r = lock(&self.shared.report);
            e.context(format!(
                "writer: {} acked, {} ambiguous, {} unavailable, errors {:?}",
                r.acked.len(),
                r.ambiguous,
                r.unavailable,
                r.errors.iter().rev().take(5).collect::<Vec<_>>()
            ))
        })
    }

    /// Stops the writer (the write in flight finishes or times out first).
    pub async fn stop(self) -> WriterReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.handle.await {
            panic!("writer task failed: {e}");
        }
        std::mem::take(&mut *lock(&self.shared.report))
    }
}

/// Reads every acknowledged write with a linearizable get through `kv` and
/// checks its value; returns the first mismatch or failure.
pub async fn verify_acked(kv: &mut KvClient<Channel>, acked: &[AckedWrite]) -> Result<()> {
    for w in acked {
        let resp = kv
            .get(v1::GetRequest {
                path: w.key.clone(),
                serializable: false,
                min_revision: 0,
            })
            .await
            .map_err(|e| {
                anyhow!(
                    "acknowledged key {} (revision {}) not readable: {e}",
                    w.key,
                    w.revision
                )
            })?
            .into_inner();
        let node = resp
            .node
            .ok_or_else(|| anyhow!("get {} returned no node", w.key))?;
        if node.data != w.value {
            bail!(
                "acknowledged key {} has {:?}, expected {:?}",
                w.key,
                String::from_utf8_lossy(&node.data),
                String::from_utf8_lossy(&w.value)
            );
        }
    }
    Ok(())
}

/// Put with `parents: true`; returns the response.
pub async fn put(
    kv: &mut KvClient<Channel>,
    path: &str,
    data: impl Into<Vec<u8>>,
) -> Result<v1::PutResponse, tonic::Status> {
    kv.put(v1::PutRequest {
        path: path.to_string(),
        data: data.into(),
        expected_version: None,
        parents: true,
    })
    .await
    .map(|r| r.into_inner())
}

/// Get (linearizable unless `serializable`); returns the response.
pub async fn get(
    kv: &mut KvClient<Channel>,
    path: &str,
    serializable: bool,
) -> Result<v1::GetResponse, tonic::Status> {
    kv.get(v1::GetRequest {
        path: path.to_string(),
        serializable,
        min_revision: 0,
    })
    .await
    .map(|r| r.into_inner())
}

/// Revision of a response header (0 when missing).
pub fn revision(h: &Option<v1::ResponseHeader>) -> u64 {
    h.as_ref().map(|h| h.revision).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------

/// Session client for `endpoint` with a per-request timeout (for the
/// streaming KeepAlive it bounds only the call's start, not the stream).
pub fn session_client(
    endpoint: &str,
    rpc_timeout: Duration,
) -> v1::session_client::SessionClient<Channel> {
    v1::session_client::SessionClient::new(channel(endpoint, rpc_timeout))
}

impl Cluster {
    /// Session client of member `id` (default per-request timeout).
    pub fn session(&self, id: u64) -> v1::session_client::SessionClient<Channel> {
        session_client(&self.endpoint(id), self.opts.rpc_timeout)
    }
}
