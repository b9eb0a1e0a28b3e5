//! `lockbench compare`: lockd, etcd and ZooKeeper side by side.
//!
//! Every workload is written once, against [`Conn`] (one client connection
//! with its session) and [`System`] (a running 3-member cluster that
//! lockbench started itself, so it can kill -9 the leader). Each system
//! implements them with its native client and its standard recipes:
//! lockd with lockd-client, etcd with its gRPC API (leases, v3lock,
//! watch), ZooKeeper with `zookeeper-client` and the ephemeral-sequential
//! lock recipe.

pub mod cli;
pub mod etcd;
pub mod lockd;
pub mod procs;
pub mod run;
pub mod zookeeper;

use std::time::Duration;

use anyhow::Result;
use tokio::sync::mpsc;

pub use crate::target::BoxFut;

/// The systems lockbench can compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// lockd (this project).
    Lockd,
    /// etcd 3.4 (Debian's `etcd-server`).
    Etcd,
    /// ZooKeeper 3.8 (Debian's `zookeeper`).
    Zookeeper,
}

impl Kind {
    /// Report name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Lockd => "lockd",
            Kind::Etcd => "etcd",
            Kind::Zookeeper => "zookeeper",
        }
    }
}

/// How clients connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Every member's client endpoint (`127.0.0.1:PORT`), rotated so that
    /// connection `i` prefers member `i % n`; a client that can fail over
    /// may use all of them.
    pub endpoints: Vec<String>,
    /// TTL of the connection's session (lockd session, etcd lease,
    /// ZooKeeper session timeout). The same for every system in a run.
    pub session_ttl: Duration,
    /// Per-request timeout.
    pub rpc_timeout: Duration,
}

impl ConnectOptions {
    /// The same defaults for every system: session TTL 10 s, request
    /// timeout 5 s (etcdctl's default command timeout).
    pub fn new(endpoints: Vec<String>) -> ConnectOptions {
        ConnectOptions {
            endpoints,
            session_ttl: Duration::from_secs(10),
            rpc_timeout: Duration::from_secs(5),
        }
    }

    /// `endpoints` rotated left by `i`.
    pub fn rotated(&self, i: usize) -> ConnectOptions {
        let mut o = self.clone();
        if !o.endpoints.is_empty() {
            let k = i % o.endpoints.len();
            o.endpoints.rotate_left(k);
        }
        o
    }
}

/// One client connection and (created on first use, kept alive in the
/// background until the `Conn` is dropped) its session.
pub trait Conn: Send {
    /// Creates or replaces `key` (a path such as `/lockbench/w/17`; parents
    /// exist, see [`System::prepare`]) with `value`; returns once committed.
    fn put<'a>(&'a mut self, key: &'a str, value: &'a [u8]) -> BoxFut<'a, Result<()>>;
    /// Reads `key`: linearizable (ZooKeeper: sync + read) or serializable
    /// (the member's local state). Fails if the key does not exist.
    fn get<'a>(&'a mut self, key: &'a str, linearizable: bool) -> BoxFut<'a, Result<()>>;
    /// Acquires the lock `name` (a path such as `/lockbench/locks/a`) with
    /// the system's standard recipe, owned by this connection's session;
    /// waits as long as it takes. Returns the held key, for
    /// [`Conn::unlock`].
    fn lock<'a>(&'a mut self, name: &'a str) -> BoxFut<'a, Result<String>>;
    /// Releases a lock taken with [`Conn::lock`]; returns once the release
    /// is committed.
    fn unlock(&mut self, key: String) -> BoxFut<'_, Result<()>>;
    /// Watches `key` from now on: the value of every later put of `key`
    /// arrives on the receiver, in order. The watch lives as long as the
    /// receiver and this connection.
    fn watch<'a>(&'a mut self, key: &'a str) -> BoxFut<'a, Result<mpsc::Receiver<Vec<u8>>>>;
}

/// `n` extra sessions (leases) kept alive with keepalives by the system's
/// client until dropped.
pub trait Sessions: Send {
    /// How many are live.
    fn len(&self) -> usize;
}

/// A running 3-member cluster that lockbench started (data on disk, fsync
/// on: each system's default durability).
pub trait System: Send + Sync {
    /// Which system.
    fn kind(&self) -> Kind;
    /// The settings that matter for the comparison (durability, election
    /// and session timeouts), for the report.
    fn settings(&self) -> String;
    /// How clients connect (every member's endpoint).
    fn connect_options(&self) -> ConnectOptions;
    /// Creates whatever the workloads' keys need beforehand (ZooKeeper:
    /// the parent nodes `/lockbench/w`, `/lockbench/r`, `/lockbench/locks`;
    /// others: nothing).
    fn prepare(&self) -> BoxFut<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    /// The current leader's member index (0-based); waits for one.
    fn leader(&self) -> BoxFut<'_, Result<usize>>;
    /// Process id of member `i`, if running.
    fn pid(&self, i: usize) -> Option<u32>;
    /// kill -9 member `i`.
    fn kill(&self, i: usize) -> Result<()>;
    /// Starts a killed member again on its data; returns once it serves.
    fn restart(&self, i: usize) -> BoxFut<'_, Result<()>>;
    /// Opens `n` sessions with TTL `ttl`, kept alive until dropped.
    fn open_sessions(&self, n: usize, ttl: Duration) -> BoxFut<'_, Result<Box<dyn Sessions>>>;
    /// Stops every member (data dirs are removed with the System).
    fn stop(&mut self) -> BoxFut<'_, Result<()>>;
}

/// Opens connection `i` to a running `kind` cluster.
pub async fn connect(kind: Kind, opts: &ConnectOptions, i: usize) -> Result<Box<dyn Conn>> {
    let opts = opts.rotated(i);
    match kind {
        Kind::Lockd => lockd::connect(&opts).await,
        Kind::Etcd => etcd::connect(&opts).await,
        Kind::Zookeeper => zookeeper::connect(&opts).await,
    }
}

/// Starts a 3-member cluster of `kind` in a temp dir on 127.0.0.1.
pub async fn start(kind: Kind) -> Result<Box<dyn System>> {
    match kind {
        Kind::Lockd => lockd::start().await,
        Kind::Etcd => etcd::start().await,
        Kind::Zookeeper => zookeeper::start().await,
    }
}
