//! ZooKeeper 3.8 for `lockbench compare`: a 3-member ensemble of Debian's
//! `zookeeper` package (QuorumPeerMain on java) started in a temp dir on
//! 127.0.0.1, driven with the `zookeeper-client` crate.
//!
//! Recipes, written out here rather than taken from a library:
//! - put: `setData`, falling back to a persistent `create` the first time;
//! - get: `getData`, preceded by `sync` when linearizable;
//! - lock: the ZooKeeper lock recipe (ephemeral-sequential `name/lock-N`,
//!   the lowest holds, each waiter watches its immediate predecessor);
//! - watch: a persistent watch plus a `getData` per event, since a
//!   ZooKeeper watch event carries no data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Mutex as AsyncMutex, Semaphore};
use tokio::time::{timeout, Instant};
use zookeeper_client::{
    Acls, AddWatchMode, Client, CreateMode, Error as ZkError, EventType, SessionState,
};

use super::procs::{find_program, Member};
use super::{BoxFut, Conn, ConnectOptions, Kind, Sessions, System};

/// ZooKeeper's tick: the unit of its timeouts (`tickTime`).
const TICK: Duration = Duration::from_millis(2000);
/// `initLimit` (ticks a follower may take to connect and sync to a leader).
const INIT_LIMIT: u32 = 10;
/// `syncLimit` (ticks a follower may lag behind, or stay silent, before the
/// leader drops it, and before it gives up on a silent leader).
const SYNC_LIMIT: u32 = 5;
/// Members.
const MEMBERS: usize = 3;
/// How long an ensemble (or one restarted member) may take to serve: three
/// JVMs starting at once on two cores, then an election.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Sessions [`System::open_sessions`] opens at once.
const OPEN_CONCURRENCY: usize = 64;

const JAR: &str = "/usr/share/java/zookeeper.jar";
const SLF4J_SIMPLE: &str = "/usr/share/java/slf4j-simple.jar";

fn anyone_all() -> Acls<'static> {
    Acls::anyone_all()
}

/// Connects one session to `endpoints` (a connect string in the given
/// order). Note: `zookeeper-client`, like the Java client, shuffles the
/// host list, so the order is not a preference.
async fn connect_client(endpoints: &[String], session_ttl: Duration) -> Result<Client> {
    if endpoints.is_empty() {
        bail!("no ZooKeeper endpoints");
    }
    let connect = endpoints.join(",");
    Client::connector()
        .with_session_timeout(session_ttl)
        .connect(&connect)
        .await
        .with_context(|| format!("ZooKeeper connect to {connect}"))
}

async fn with_timeout<T>(
    what: &str,
    d: Duration,
    f: impl std::future::Future<Output = std::result::Result<T, ZkError>>,
) -> Result<T> {
    match timeout(d, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!(e).context(what.to_string())),
        Err(_) => bail!("{what}: timed out after {d:?}"),
    }
}

/// Opens one connection (one ZooKeeper session).
pub async fn connect(opts: &ConnectOptions) -> Result<Box<dyn Conn>> {
    let client = connect_client(&opts.endpoints, opts.session_ttl).await?;
    let (alive, _) = watch::channel(());
    Ok(Box::new(ZkConn {
        client,
        rpc_timeout: opts.rpc_timeout,
        alive,
    }))
}

/// One ZooKeeper session.
struct ZkConn {
    client: Client,
    rpc_timeout: Duration,
    /// Dropped with the connection: ends its watch tasks.
    alive: watch::Sender<()>,
}

/// The sequence number of a `lock-0000000042` child (any prefix before
/// the last `-`), for ordering.
fn sequence_of(child: &str) -> Option<i64> {
    child.rsplit_once('-')?.1.parse().ok()
}

impl ZkConn {
    async fn put_inner(&self, key: &str, value: &[u8]) -> Result<()> {
        match self.client.set_data(key, value, None).await {
            Ok(_) => return Ok(()),
            Err(ZkError::NoNode) => {}
            Err(e) => return Err(anyhow!(e).context(format!("setData {key}"))),
        }
        let opts = CreateMode::Persistent.with_acls(anyone_all());
        let mut created = self.client.create(key, value, &opts).await;
        if let Err(ZkError::NoNode) = created {
            // A parent is missing (`lockbench run` against a bare
            // ensemble): create the ancestors, then the node.
            let mut path = String::new();
            let parts: Vec<&str> = key.split('/').filter(|p| !p.is_empty()).collect();
            for part in &parts[..parts.len().saturating_sub(1)] {
                path.push('/');
                path.push_str(part);
                match self.client.create(&path, &[], &opts).await {
                    Ok(_) | Err(ZkError::NodeExists) => {}
                    Err(e) => return Err(anyhow!(e).context(format!("create {path}"))),
                }
            }
            created = self.client.create(key, value, &opts).await;
        }
        match created {
            Ok(_) => Ok(()),
            // Another writer created it in between: replace its value.
            Err(ZkError::NodeExists) => {
                self.client
                    .set_data(key, value, None)
                    .await
                    .with_context(|| format!("setData {key}"))?;
                Ok(())
            }
            Err(e) => Err(anyhow!(e).context(format!("create {key}"))),
        }
    }

    /// Creates our ephemeral-sequential node under `name` (creating `name`
    /// if missing); returns the child's name (`lock-0000000042`).
    ///
    /// On a connection loss the create may or may not have happened; the
    /// session survives, so an orphan node of ours would block every other
    /// waiter until the session ends. As Curator's "protected" mode does,
    /// look for a child owned by our session before creating again.
    async fn create_lock_node(&self, name: &str) -> Result<String> {
        let prefix = format!("{name}/lock-");
        let opts = CreateMode::EphemeralSequential.with_acls(anyone_all());
        let mut lost = false;
        loop {
            if lost {
                if let Some(child) = self.find_own_child(name).await? {
                    return Ok(child);
                }
            }
            match self.client.create(&prefix, &[], &opts).await {
                Ok((_, seq)) => return Ok(format!("lock-{seq}")),
                Err(ZkError::NoNode) => {
                    let parent = CreateMode::Persistent.with_acls(anyone_all());
                    match self.client.create(name, &[], &parent).await {
                        Ok(_) | Err(ZkError::NodeExists) => {}
                        Err(ZkError::ConnectionLoss) => {}
                        Err(e) => return Err(anyhow!(e).context(format!("create {name}"))),
                    }
                }
                Err(ZkError::ConnectionLoss) => lost = true,
                Err(e) => return Err(anyhow!(e).context(format!("create {prefix}"))),
            }
        }
    }

    /// The child of `name` whose ephemeral owner is this session, if any.
    async fn find_own_child(&self, name: &str) -> Result<Option<String>> {
        let me = self.client.session_id().0;
        loop {
            let children = match self.client.list_children(name).await {
                Ok(c) => c,
                Err(ZkError::ConnectionLoss) => continue,
                Err(ZkError::NoNode) => return Ok(None),
                Err(e) => return Err(anyhow!(e).context(format!("getChildren {name}"))),
            };
            let mut lost = false;
            for c in children {
                match self.client.check_stat(&format!("{name}/{c}")).await {
                    Ok(Some(st)) if st.ephemeral_owner == me => return Ok(Some(c)),
                    Ok(_) => {}
                    Err(ZkError::ConnectionLoss) => {
                        lost = true;
                        break;
                    }
                    Err(e) => return Err(anyhow!(e).context(format!("exists {name}/{c}"))),
                }
            }
            if !lost {
                return Ok(None);
            }
        }
    }

    /// Waits until `mine` (a child of `name`) is the lowest.
    async fn wait_lowest(&self, name: &str, mine: &str) -> Result<()> {
        let my_seq = sequence_of(mine).ok_or_else(|| anyhow!("bad lock node {mine}"))?;
        loop {
            let children = match self.client.list_children(name).await {
                Ok(c) => c,
                Err(ZkError::ConnectionLoss) => continue,
                Err(e) => return Err(anyhow!(e).context(format!("getChildren {name}"))),
            };
            let mut seqs: Vec<(i64, String)> = children
                .into_iter()
                .filter_map(|c| Some((sequence_of(&c)?, c)))
                .collect();
            seqs.sort();
            let Some(idx) = seqs.iter().position(|(s, _)| *s == my_seq) else {
                bail!("lock node {name}/{mine} is gone (session expired?)");
            };
            if idx == 0 {
                return Ok(());
            }
            // Watch only the immediate predecessor: one waiter woken per
            // release, no herd.
            let pred = format!("{name}/{}", seqs[idx - 1].1);
            match self.client.check_and_watch_stat(&pred).await {
                Ok((None, _)) => {} // already gone: look again
                Ok((Some(_), watcher)) => {
                    let ev = watcher.changed().await;
                    if ev.event_type == EventType::Session && ev.session_state.is_terminated() {
                        bail!(
                            "session ended while waiting for {pred}: {:?}",
                            ev.session_state
                        );
                    }
                }
                Err(ZkError::ConnectionLoss) => {}
                Err(e) => return Err(anyhow!(e).context(format!("exists+watch {pred}"))),
            }
        }
    }

    /// The lock recipe. If this future is dropped while waiting, its node
    /// stays queued until the session ends (as with any ZooKeeper client).
    async fn lock_inner(&self, name: &str) -> Result<String> {
        let mine = self.create_lock_node(name).await?;
        let path = format!("{name}/{mine}");
        match self.wait_lowest(name, &mine).await {
            Ok(()) => Ok(path),
            Err(e) => {
                // Leave the queue so we block nobody (best effort).
                let _ = timeout(self.rpc_timeout, self.client.delete(&path, None)).await;
                Err(e)
            }
        }
    }

    async fn unlock_inner(&self, key: &str) -> Result<()> {
        let mut retried = false;
        loop {
            match self.client.delete(key, None).await {
                Ok(()) => return Ok(()),
                // A delete cut off by a connection loss may have happened.
                Err(ZkError::NoNode) if retried => return Ok(()),
                Err(ZkError::ConnectionLoss) => retried = true,
                Err(e) => return Err(anyhow!(e).context(format!("delete {key}"))),
            }
        }
    }
}

impl Conn for ZkConn {
    fn put<'a>(&'a mut self, key: &'a str, value: &'a [u8]) -> BoxFut<'a, Result<()>> {
        Box::pin(async move {
            timeout(self.rpc_timeout, self.put_inner(key, value))
                .await
                .map_err(|_| anyhow!("put {key}: timed out after {:?}", self.rpc_timeout))?
        })
    }

    fn get<'a>(&'a mut self, key: &'a str, linearizable: bool) -> BoxFut<'a, Result<()>> {
        Box::pin(async move {
            if linearizable {
                // Both requests go out back to back (the client sends in call
                // order); the server answers a session's requests in order,
                // so the read is served after the member caught up with the
                // leader's state at the time of the sync. No extra client
                // round trip, one member-to-leader round trip.
                let sync = self.client.sync(key);
                let read = self.client.get_data(key);
                with_timeout(&format!("sync {key}"), self.rpc_timeout, sync).await?;
                with_timeout(&format!("getData {key}"), self.rpc_timeout, read).await?;
            } else {
                let read = self.client.get_data(key);
                with_timeout(&format!("getData {key}"), self.rpc_timeout, read).await?;
            }
            Ok(())
        })
    }

    fn lock<'a>(&'a mut self, name: &'a str) -> BoxFut<'a, Result<String>> {
        Box::pin(self.lock_inner(name))
    }

    fn unlock(&mut self, key: String) -> BoxFut<'_, Result<()>> {
        Box::pin(async move {
            timeout(self.rpc_timeout, self.unlock_inner(&key))
                .await
                .map_err(|_| anyhow!("unlock {key}: timed out after {:?}", self.rpc_timeout))?
        })
    }

    fn watch<'a>(&'a mut self, key: &'a str) -> BoxFut<'a, Result<mpsc::Receiver<Vec<u8>>>> {
        Box::pin(async move {
            let mut watcher = with_timeout(
                &format!("addWatch {key}"),
                self.rpc_timeout,
                self.client.watch(key, AddWatchMode::Persistent),
            )
            .await?;
            let (tx, rx) = mpsc::channel(1024);
            let client = self.client.clone();
            let mut alive = self.alive.subscribe();
            let key = key.to_string();
            tokio::spawn(async move {
                // Only values newer than the last one sent (by mzxid): a
                // read after an event returns the current value, which may
                // already be that of a later put (whose own event then
                // reads it again).
                let mut last_mzxid = i64::MIN;
                loop {
                    let ev = tokio::select! {
                        ev = watcher.changed() => ev,
                        _ = tx.closed() => return,
                        _ = alive.changed() => return, // the Conn was dropped
                    };
                    match ev.event_type {
                        EventType::NodeDataChanged | EventType::NodeCreated => {}
                        EventType::Session => {
                            if ev.session_state.is_terminated() {
                                return; // changed() would panic from now on
                            }
                            // Events during a reconnection can be lost
                            // (ZOOKEEPER-4698): catch up with a read.
                            if ev.session_state != SessionState::SyncConnected {
                                continue;
                            }
                        }
                        _ => continue,
                    }
                    // A ZooKeeper watch event does not carry the data: this
                    // read is part of ZooKeeper's delivery cost.
                    let (data, stat) = match client.get_data(&key).await {
                        Ok(v) => v,
                        Err(ZkError::NoNode) | Err(ZkError::ConnectionLoss) => continue,
                        Err(_) => return,
                    };
                    if stat.mzxid <= last_mzxid {
                        continue;
                    }
                    last_mzxid = stat.mzxid;
                    if tx.send(data).await.is_err() {
                        return;
                    }
                }
            });
            Ok(rx)
        })
    }
}

/// Sessions opened by [`System::open_sessions`]: dropping the clients
/// closes the sessions.
struct ZkSessions {
    clients: Vec<Client>,
}

impl Sessions for ZkSessions {
    fn len(&self) -> usize {
        self.clients
            .iter()
            .filter(|c| !c.state().is_terminated())
            .count()
    }
}

/// One ensemble member's addresses.
#[derive(Clone, Debug)]
struct Node {
    client_port: u16,
    peer_port: u16,
    election_port: u16,
}

impl Node {
    fn client_addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
}

/// A running 3-member ZooKeeper ensemble.
pub struct ZooKeeper {
    members: Vec<Member>,
    nodes: Vec<Node>,
    version: String,
    // Last: removed after the members are stopped.
    dir: tempfile::TempDir,
}

/// Sends a four-letter-word command and reads the answer until EOF.
async fn four_letter(addr: &str, cmd: &str) -> Result<String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(cmd.as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    timeout(Duration::from_secs(3), io)
        .await
        .map_err(|_| anyhow!("{cmd} to {addr}: timed out"))?
        .with_context(|| format!("{cmd} to {addr}"))
}

/// The `Mode:` line of a `srvr` answer (`leader`, `follower`; absent while
/// the member does not serve).
fn srvr_mode(srvr: &str) -> Option<&str> {
    srvr.lines()
        .find_map(|l| l.strip_prefix("Mode:"))
        .map(str::trim)
}

fn srvr_version(srvr: &str) -> Option<&str> {
    srvr.lines()
        .find_map(|l| l.strip_prefix("Zookeeper version:"))
        .map(|v| v.trim().split([',', '-']).next().unwrap_or("").trim())
}

fn java() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("java"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!("java not found on PATH (ZooKeeper needs it); run ./scripts/install-peers")
        })
}

fn zoo_cfg(data_dir: &Path, me: &Node, nodes: &[Node]) -> String {
    let mut cfg = format!(
        "tickTime={}\n\
         initLimit={INIT_LIMIT}\n\
         syncLimit={SYNC_LIMIT}\n\
         dataDir={}\n\
         clientPortAddress=127.0.0.1\n\
         clientPort={}\n\
         maxClientCnxns=0\n\
         admin.enableServer=false\n\
         4lw.commands.whitelist=srvr,stat,ruok,mntr\n\
         forceSync=yes\n",
        TICK.as_millis(),
        data_dir.display(),
        me.client_port,
    );
    for (i, n) in nodes.iter().enumerate() {
        cfg.push_str(&format!(
            "server.{}=127.0.0.1:{}:{}\n",
            i + 1,
            n.peer_port,
            n.election_port
        ));
    }
    cfg
}

/// Starts a 3-member ensemble.
pub async fn start() -> Result<Box<dyn System>> {
    let jar = find_program(&[JAR], "ZooKeeper (zookeeper.jar)")?;
    let java = java()?;
    let mut cp = jar.display().to_string();
    if Path::new(SLF4J_SIMPLE).exists() {
        cp.push(':');
        cp.push_str(SLF4J_SIMPLE);
    }
    let dir = tempfile::Builder::new()
        .prefix("lockbench-zk-")
        .tempdir()
        .context("create temp dir")?;
    let ports = lockd_e2e::free_ports(3 * MEMBERS)?;
    let nodes: Vec<Node> = (0..MEMBERS)
        .map(|i| Node {
            client_port: ports[3 * i],
            peer_port: ports[3 * i + 1],
            election_port: ports[3 * i + 2],
        })
        .collect();
    let mut members = Vec::with_capacity(MEMBERS);
    for (i, node) in nodes.iter().enumerate() {
        let id = i + 1;
        let home = dir.path().join(format!("zk-{id}"));
        let data = home.join("data");
        std::fs::create_dir_all(&data).with_context(|| format!("mkdir {}", data.display()))?;
        std::fs::write(data.join("myid"), format!("{id}\n"))?;
        let cfg_path = home.join("zoo.cfg");
        std::fs::write(&cfg_path, zoo_cfg(&data, node, &nodes))
            .with_context(|| format!("write {}", cfg_path.display()))?;
        let args = vec![
            "-Xms64m".to_string(),
            "-Xmx1g".to_string(),
            "-cp".to_string(),
            cp.clone(),
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn".to_string(),
            "org.apache.zookeeper.server.quorum.QuorumPeerMain".to_string(),
            cfg_path.display().to_string(),
        ];
        members.push(Member::new(
            format!("zookeeper-{id}"),
            &java,
            args,
            home.join("zookeeper.log"),
        ));
    }
    let mut zk = ZooKeeper {
        members,
        nodes,
        version: String::new(),
        dir,
    };
    for m in &zk.members {
        m.spawn()?;
    }
    // Kills the members if waiting fails (Member's Drop).
    zk.wait_serving(&[0, 1, 2], READY_TIMEOUT).await?;
    let srvr = four_letter(&zk.nodes[0].client_addr(), "srvr").await?;
    zk.version = srvr_version(&srvr).unwrap_or("3.8").to_string();
    Ok(Box::new(zk))
}

impl ZooKeeper {
    /// Each member's `srvr` mode (None: not running or not serving).
    async fn modes(&self) -> Vec<Option<String>> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for (i, n) in self.nodes.iter().enumerate() {
            if self.members[i].pid().is_none() {
                out.push(None);
                continue;
            }
            let mode = match four_letter(&n.client_addr(), "srvr").await {
                Ok(s) => srvr_mode(&s).map(str::to_string),
                Err(_) => None,
            };
            out.push(mode);
        }
        out
    }

    /// Waits until each of `which` serves as leader or follower and the
    /// running members agree on exactly one leader.
    async fn wait_serving(&self, which: &[usize], limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            for &i in which {
                self.members[i].check_running()?;
            }
            let modes = self.modes().await;
            let serving = which
                .iter()
                .all(|&i| matches!(modes[i].as_deref(), Some("leader") | Some("follower")));
            let leaders = modes
                .iter()
                .filter(|m| m.as_deref() == Some("leader"))
                .count();
            if serving && leaders == 1 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tails: Vec<String> = which
                    .iter()
                    .map(|&i| {
                        format!(
                            "{} (mode {:?}):\n{}",
                            self.members[i].name,
                            modes[i],
                            self.members[i].log_tail(15)
                        )
                    })
                    .collect();
                bail!(
                    "ZooKeeper members {which:?} not serving with one leader within {limit:?}; \
                     log tails:\n{}",
                    tails.join("\n")
                );
            }
            // Polling other processes: there is no event to await.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(Node::client_addr).collect()
    }
}

impl System for ZooKeeper {
    fn kind(&self) -> Kind {
        Kind::Zookeeper
    }

    fn settings(&self) -> String {
        let tick = TICK.as_millis();
        format!(
            "ZooKeeper {} (Debian package, QuorumPeerMain on java, -Xmx1g), {MEMBERS} members on \
             127.0.0.1, data and txn log on disk in {}; durability: forceSync=yes (txn log \
             fsynced before a proposal is acked; a write commits on a quorum of acks); \
             tickTime={tick}ms, initLimit={INIT_LIMIT} ticks, syncLimit={SYNC_LIMIT} ticks \
             ({}s before a silent leader or follower is given up on; a killed process's \
             connections close at once); session timeout negotiated within [{}s, {}s] \
             (2x..20x tickTime: a shorter requested TTL gets {}s); client zookeeper-client \
             0.11 (pings after 3/20 of the session timeout idle, fails over after 2/5 of it; \
             shuffles the member list like the Java client, so connection i has no preferred \
             member); \
             linearizable read = sync + getData on the session (sync is not quorum-acked); \
             maxClientCnxns=0 (no per-IP limit)",
            self.version,
            self.dir.path().display(),
            tick * u128::from(SYNC_LIMIT) / 1000,
            tick * 2 / 1000,
            tick * 20 / 1000,
            tick * 2 / 1000,
        )
    }

    fn connect_options(&self) -> ConnectOptions {
        ConnectOptions::new(self.endpoints())
    }

    fn prepare(&self) -> BoxFut<'_, Result<()>> {
        Box::pin(async move {
            let client = connect_client(&self.endpoints(), Duration::from_secs(10)).await?;
            let opts = CreateMode::Persistent.with_acls(anyone_all());
            for p in [
                "/lockbench",
                "/lockbench/w",
                "/lockbench/r",
                "/lockbench/locks",
                "/lockbench/watch",
            ] {
                match client.create(p, &[], &opts).await {
                    Ok(_) | Err(ZkError::NodeExists) => {}
                    Err(e) => return Err(anyhow!(e).context(format!("create {p}"))),
                }
            }
            Ok(())
        })
    }

    fn leader(&self) -> BoxFut<'_, Result<usize>> {
        Box::pin(async move {
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                let modes = self.modes().await;
                if let Some(i) = modes.iter().position(|m| m.as_deref() == Some("leader")) {
                    return Ok(i);
                }
                if Instant::now() >= deadline {
                    bail!("no ZooKeeper leader within {READY_TIMEOUT:?} (modes {modes:?})");
                }
                // Polling other processes: there is no event to await.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    fn pid(&self, i: usize) -> Option<u32> {
        self.members.get(i)?.pid()
    }

    fn kill(&self, i: usize) -> Result<()> {
        let m = self
            .members
            .get(i)
            .ok_or_else(|| anyhow!("no member {i}"))?;
        m.kill();
        Ok(())
    }

    fn restart(&self, i: usize) -> BoxFut<'_, Result<()>> {
        Box::pin(async move {
            let m = self
                .members
                .get(i)
                .ok_or_else(|| anyhow!("no member {i}"))?;
            if m.pid().is_some() {
                bail!("{} is running", m.name);
            }
            m.spawn()?;
            self.wait_serving(&[i], READY_TIMEOUT).await
        })
    }

    fn open_sessions(&self, n: usize, ttl: Duration) -> BoxFut<'_, Result<Box<dyn Sessions>>> {
        Box::pin(async move {
            let endpoints = Arc::new(self.endpoints());
            let sem = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
            let clients = Arc::new(AsyncMutex::new(Vec::with_capacity(n)));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..n {
                let (endpoints, sem, clients) = (endpoints.clone(), sem.clone(), clients.clone());
                tasks.spawn(async move {
                    let _permit = sem.acquire().await?;
                    let mut eps = (*endpoints).clone();
                    let len = eps.len().max(1);
                    eps.rotate_left(i % len);
                    let c = connect_client(&eps, ttl).await?;
                    clients.lock().await.push(c);
                    Ok::<_, anyhow::Error>(())
                });
            }
            let mut first_err = None;
            while let Some(r) = tasks.join_next().await {
                let r = r.map_err(anyhow::Error::from).and_then(|r| r);
                if let Err(e) = r {
                    if first_err.is_none() {
                        first_err = Some(e);
                        // The sessions opened so far close when dropped.
                        tasks.abort_all();
                    }
                }
            }
            let clients = std::mem::take(&mut *clients.lock().await);
            if let Some(e) = first_err {
                let opened = clients.len();
                drop(clients);
                return Err(e.context(format!("opened {opened} of {n} ZooKeeper sessions")));
            }
            Ok(Box::new(ZkSessions { clients }) as Box<dyn Sessions>)
        })
    }

    fn stop(&mut self) -> BoxFut<'_, Result<()>> {
        Box::pin(async move {
            for m in &self.members {
                m.kill();
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant as StdInstant;

    fn is_connected(s: SessionState) -> bool {
        matches!(s, SessionState::SyncConnected)
    }

    async fn retry_put(conn: &mut Box<dyn Conn>, key: &str, value: &[u8]) -> Result<()> {
        let deadline = StdInstant::now() + Duration::from_secs(60);
        loop {
            match conn.put(key, value).await {
                Ok(()) => return Ok(()),
                Err(e) if StdInstant::now() < deadline => {
                    eprintln!("put {key} during failover: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs ZooKeeper from ./scripts/install-peers"]
    async fn zookeeper_ensemble_recipes_failover_sessions() -> Result<()> {
        let t0 = StdInstant::now();
        let mut sys = start().await?;
        eprintln!("ensemble serving after {:?}", t0.elapsed());
        eprintln!("settings: {}", sys.settings());
        assert_eq!(sys.kind(), Kind::Zookeeper);
        for i in 0..MEMBERS {
            assert!(sys.pid(i).is_some());
        }
        sys.prepare().await?;
        sys.prepare().await?; // idempotent
        let opts = sys.connect_options();

        let mut a = super::super::connect(Kind::Zookeeper, &opts, 0).await?;
        let mut b = super::super::connect(Kind::Zookeeper, &opts, 1).await?;

        // put / get, both modes; missing keys fail.
        a.put("/lockbench/w/1", b"one").await?;
        a.put("/lockbench/w/1", b"two").await?;
        b.get("/lockbench/w/1", true).await?;
        b.get("/lockbench/w/1", false).await?;
        assert!(b.get("/lockbench/w/missing", true).await.is_err());
        assert!(b.get("/lockbench/w/missing", false).await.is_err());

        // Sanity latencies (one client, sequential).
        let n = 200;
        let t = StdInstant::now();
        for i in 0..n {
            a.put(&format!("/lockbench/r/{}", i % 10), b"v").await?;
        }
        let put = t.elapsed() / n;
        let t = StdInstant::now();
        for i in 0..n {
            a.get(&format!("/lockbench/r/{}", i % 10), false).await?;
        }
        let ser = t.elapsed() / n;
        let t = StdInstant::now();
        for i in 0..n {
            a.get(&format!("/lockbench/r/{}", i % 10), true).await?;
        }
        let lin = t.elapsed() / n;
        let direct = connect_client(&opts.endpoints, opts.session_ttl).await?;
        let t = StdInstant::now();
        for i in 0..n {
            let k = format!("/lockbench/r/{}", i % 10);
            direct.sync(&k).await?;
            direct.get_data(&k).await?;
        }
        let seq = t.elapsed() / n;
        drop(direct);
        eprintln!(
            "mean latency: put {put:?}, get serializable {ser:?}, get sync+read pipelined \
             {lin:?}, sync then read {seq:?}"
        );

        // Lock: A holds, B waits until A unlocks.
        let held_a = a.lock("/lockbench/locks/x").await?;
        assert!(held_a.starts_with("/lockbench/locks/x/lock-"), "{held_a}");
        let mut b_task = tokio::spawn(async move {
            let held = b.lock("/lockbench/locks/x").await;
            (b, held)
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(1500), &mut b_task)
                .await
                .is_err(),
            "B got the lock while A holds it"
        );
        let t = StdInstant::now();
        a.unlock(held_a).await?;
        let (mut b, held_b) = tokio::time::timeout(Duration::from_secs(10), b_task).await??;
        let held_b = held_b?;
        eprintln!("B acquired {:?} after A's unlock returned", t.elapsed());
        // A queues behind B now.
        let mut a_task = tokio::spawn(async move {
            let held = a.lock("/lockbench/locks/x").await;
            (a, held)
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut a_task)
                .await
                .is_err()
        );
        b.unlock(held_b).await?;
        let (mut a, held_a) = tokio::time::timeout(Duration::from_secs(10), a_task).await??;
        a.unlock(held_a?).await?;
        // A lock whose parent does not exist yet.
        let k = a.lock("/lockbench/locks/fresh").await?;
        a.unlock(k).await?;

        // Watch: the next puts' values, in order.
        let mut rx = b.watch("/lockbench/watch/k").await?;
        let t = StdInstant::now();
        a.put("/lockbench/watch/k", b"created").await?;
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await?;
        assert_eq!(got.as_deref(), Some(&b"created"[..]));
        eprintln!(
            "watch delivered a create {:?} after the put started",
            t.elapsed()
        );
        for i in 0..20u32 {
            a.put("/lockbench/watch/k", &i.to_be_bytes()).await?;
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await?;
            assert_eq!(got.as_deref(), Some(&i.to_be_bytes()[..]));
        }
        // A burst from 4 pipelined writers: values arrive in put order, the
        // last one always, intermediate ones may be coalesced.
        let burst = 200u32;
        let mut writers = Vec::new();
        for w in 0..4u32 {
            let mut c = super::super::connect(Kind::Zookeeper, &opts, w as usize).await?;
            writers.push(tokio::spawn(async move {
                for i in (w..burst).step_by(4) {
                    c.put("/lockbench/watch/burst", &i.to_be_bytes()).await?;
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        let mut brx = b.watch("/lockbench/watch/burst").await?;
        for h in writers {
            h.await??;
        }
        a.put("/lockbench/watch/burst", &burst.to_be_bytes())
            .await?;
        let mut seen = 0;
        loop {
            let v = tokio::time::timeout(Duration::from_secs(5), brx.recv())
                .await?
                .expect("watch open");
            seen += 1;
            if v == burst.to_be_bytes() {
                break;
            }
        }
        eprintln!("burst of {} puts: {seen} values delivered", burst + 1);
        drop(brx);

        // Kill the leader: a new one appears, writes go on.
        let old = sys.leader().await?;
        let pid = sys.pid(old).expect("leader runs");
        sys.kill(old)?;
        assert!(sys.pid(old).is_none());
        eprintln!("killed leader {old} (pid {pid})");
        let t = StdInstant::now();
        let new = sys.leader().await?;
        assert_ne!(new, old);
        eprintln!("new leader {new} (was {old}) seen after {:?}", t.elapsed());
        retry_put(&mut a, "/lockbench/w/after-kill", b"x").await?;
        retry_put(&mut b, "/lockbench/w/after-kill", b"y").await?;
        b.get("/lockbench/w/after-kill", true).await?;
        eprintln!(
            "writes through both connections ok {:?} after the kill",
            t.elapsed()
        );
        let t = StdInstant::now();
        sys.restart(old).await?;
        eprintln!("member {old} serving again after {:?}", t.elapsed());
        assert!(sys.pid(old).is_some());

        // Many sessions.
        let t = StdInstant::now();
        let sessions = sys.open_sessions(200, Duration::from_secs(6)).await?;
        eprintln!("200 sessions opened in {:?}", t.elapsed());
        assert_eq!(sessions.len(), 200);
        // They outlive their timeout (heartbeats).
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(sessions.len(), 200);
        let before = connections(sys.as_ref()).await;
        drop(sessions);
        let t = StdInstant::now();
        let mut after = connections(sys.as_ref()).await;
        while after + 150 > before && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            after = connections(sys.as_ref()).await;
        }
        eprintln!(
            "server connections: {before} with the sessions, {after} {:?} after the drop",
            t.elapsed()
        );
        assert!(after + 150 <= before);

        drop(rx);
        drop(a);
        drop(b);
        // Let the dropped clients close their sessions before the ensemble goes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        sys.stop().await?;
        for i in 0..MEMBERS {
            assert!(sys.pid(i).is_none());
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs ZooKeeper from ./scripts/install-peers"]
    async fn zookeeper_session_timeout_is_negotiated() -> Result<()> {
        let mut sys = start().await?;
        let eps = sys.connect_options().endpoints;
        let short = connect_client(&eps, Duration::from_secs(1)).await?;
        let long = connect_client(&eps, Duration::from_secs(100)).await?;
        eprintln!(
            "requested 1s -> {:?}, 100s -> {:?}",
            short.session_timeout(),
            long.session_timeout()
        );
        assert_eq!(short.session_timeout(), TICK * 2);
        assert_eq!(long.session_timeout(), TICK * 20);
        assert!(is_connected(short.state()));
        drop((short, long));
        sys.stop().await?;
        Ok(())
    }

    /// Client connections over all members (`srvr`'s `Connections:`).
    async fn connections(sys: &dyn System) -> usize {
        let mut total = 0;
        for ep in sys.connect_options().endpoints {
            if let Ok(s) = four_letter(&ep, "srvr").await {
                total += s
                    .lines()
                    .find_map(|l| l.strip_prefix("Connections:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
            }
        }
        total
    }

    /// CPU seconds (user + system) of process `pid` so far.
    fn cpu_secs(pid: u32) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // After the ')': state is field 0, utime 11, stime 12.
        (ticks(11) + ticks(12)) / 100.0
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs ZooKeeper from ./scripts/install-peers"]
    async fn zookeeper_idle_sessions_cost() -> Result<()> {
        let n = 2000;
        let mut sys = start().await?;
        let t = StdInstant::now();
        let sessions = sys.open_sessions(n, Duration::from_secs(6)).await?;
        eprintln!("{n} sessions (6 s) opened in {:?}", t.elapsed());
        let me = std::process::id();
        let pids: Vec<u32> = (0..MEMBERS).filter_map(|i| sys.pid(i)).collect();
        let c0: Vec<f64> = pids.iter().map(|&p| cpu_secs(p)).collect();
        let b0 = cpu_secs(me);
        let window = Duration::from_secs(10);
        tokio::time::sleep(window).await;
        let b1 = cpu_secs(me);
        let c1: Vec<f64> = pids.iter().map(|&p| cpu_secs(p)).collect();
        let members: Vec<String> = c0
            .iter()
            .zip(&c1)
            .map(|(a, b)| format!("{:.0}%", (b - a) / window.as_secs_f64() * 100.0))
            .collect();
        eprintln!(
            "idle {n} sessions: client process {:.0}% CPU, members {members:?}",
            (b1 - b0) / window.as_secs_f64() * 100.0
        );
        assert_eq!(sessions.len(), n);
        drop(sessions);
        tokio::time::sleep(Duration::from_secs(2)).await;
        sys.stop().await?;
        Ok(())
    }

    #[test]
    fn parses_srvr_and_sequences() {
        let s = "Zookeeper version: 3.8.0-debian--1, built on 2024-06-16 00:00 UTC\n\
                 Latency min/avg/max: 0/0.0/0\nMode: follower\nNode count: 5\n";
        assert_eq!(srvr_mode(s), Some("follower"));
        assert_eq!(srvr_version(s), Some("3.8.0"));
        assert_eq!(
            srvr_mode("This ZooKeeper instance is not currently serving requests\n"),
            None
        );
        assert_eq!(sequence_of("lock-0000000042"), Some(42));
        assert_eq!(sequence_of("_c_abc-lock-0000000007"), Some(7));
        assert_eq!(sequence_of("junk"), None);
    }
}
