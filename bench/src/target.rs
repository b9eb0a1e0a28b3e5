//! Systems under test. Each [`Target`] hands out independent client
//! connections; the workload runner gives every client task its own one, so
//! concurrency is spread over several HTTP/2 (or TCP) connections.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use lockd_proto::v1::kv_client::KvClient;
use lockd_proto::v1::{GetRequest, PutRequest};
use tonic::transport::{Channel, Endpoint};

/// A boxed, sendable future (keeps the traits dyn-compatible).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A system that can be benchmarked by `run` (lockd natively; etcd and
/// ZooKeeper through the `compare` clients).
pub trait Target: Send + Sync {
    /// Short name used in reports ("lockd").
    fn name(&self) -> &'static str;
    /// Opens a new connection for client number `index` to one of `endpoints`
    /// (round-robin by index).
    fn connect(&self, endpoints: &[String], index: usize) -> Result<Box<dyn TargetClient>>;
}

/// One client connection of a [`Target`].
pub trait TargetClient: Send {
    /// Writes `value` under `key` (creating parents as needed) and waits for
    /// the write to be committed.
    fn put<'a>(&'a mut self, key: &'a str, value: &'a [u8]) -> BoxFut<'a, Result<()>>;
    /// Linearizable read of `key`.
    fn get_linearizable<'a>(&'a mut self, key: &'a str) -> BoxFut<'a, Result<()>>;
    /// Serializable (possibly stale, local) read of `key`.
    fn get_serializable<'a>(&'a mut self, key: &'a str) -> BoxFut<'a, Result<()>>;
}

/// Picks a target by name.
pub fn by_name(name: &str, rpc_timeout: Duration) -> Result<Box<dyn Target>> {
    match name {
        "lockd" => Ok(Box::new(Lockd { rpc_timeout })),
        "etcd" => Ok(Box::new(Peer {
            kind: crate::compare::Kind::Etcd,
            rpc_timeout,
        })),
        "zookeeper" => Ok(Box::new(Peer {
            kind: crate::compare::Kind::Zookeeper,
            rpc_timeout,
        })),
        other => bail!("unknown target {other:?} (known: lockd, etcd, zookeeper)"),
    }
}

/// lockd via the raw generated tonic `KvClient`, one channel (one HTTP/2
/// connection) per client.
pub struct Lockd {
    /// Per-request timeout.
    pub rpc_timeout: Duration,
}

pub(crate) fn http_uri(ep: &str) -> String {
    if ep.starts_with("http://") || ep.starts_with("https://") {
        ep.to_string()
    } else {
        format!("http://{ep}")
    }
}

impl Target for Lockd {
    fn name(&self) -> &'static str {
        "lockd"
    }

    fn connect(&self, endpoints: &[String], index: usize) -> Result<Box<dyn TargetClient>> {
        if endpoints.is_empty() {
            bail!("no endpoints");
        }
        let ep = &endpoints[index % endpoints.len()];
        let channel = Endpoint::from_shared(http_uri(ep))
            .with_context(|| format!("invalid endpoint {ep:?}"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(self.rpc_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        let kv = KvClient::new(channel)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20);
        Ok(Box::new(LockdClient {
            kv,
            endpoint: ep.clone(),
        }))
    }
}

struct LockdClient {
    kv: KvClient<Channel>,
    endpoint: String,
}

impl LockdClient {
    async fn get(&mut self, key: &str, serializable: bool) -> Result<()> {
        let resp = self
            .kv
            .get(GetRequest {
                path: key.to_string(),
                serializable,
                min_revision: 0,
            })
            .await
            .map_err(|s| anyhow!("get via {}: {}: {}", self.endpoint, s.code(), s.message()))?;
        if resp.into_inner().node.is_none() {
            bail!("get {key} via {}: no node in the answer", self.endpoint);
        }
        Ok(())
    }
}

impl TargetClient for LockdClient {
    fn put<'a>(&'a mut self, key: &'a str, value: &'a [u8]) -> BoxFut<'a, Result<()>> {
        Box::pin(async move {
            self.kv
                .put(PutRequest {
                    path: key.to_string(),
                    data: value.to_vec(),
                    expected_version: None,
                    parents: true,
                })
                .await
                .map_err(|s| anyhow!("put via {}: {}: {}", self.endpoint, s.code(), s.message()))?;
            Ok(())
        })
    }

    fn get_linearizable<'a>(&'a mut self, key: &'a str) -> BoxFut<'a, Result<()>> {
        Box::pin(self.get(key, false))
    }

    fn get_serializable<'a>(&'a mut self, key: &'a str) -> BoxFut<'a, Result<()>> {
        Box::pin(self.get(key, true))
    }
}

/// etcd or ZooKeeper through `lockbench compare`'s clients (one connection,
/// opened on first use, per client).
pub struct Peer {
    kind: crate::compare::Kind,
    rpc_timeout: Duration,
}

impl Target for Peer {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn connect(&self, endpoints: &[String], index: usize) -> Result<Box<dyn TargetClient>> {
        if endpoints.is_empty() {
            bail!("no endpoints");
        }
        let mut opts = crate::compare::ConnectOptions::new(endpoints.to_vec());
        opts.rpc_timeout = self.rpc_timeout;
        Ok(Box::new(PeerClient {
            kind: self.kind,
            opts,
            index,
            conn: None,
        }))
    }
}

struct PeerClient {
    kind: crate::compare::Kind,
    opts: crate::compare::ConnectOptions,
    index: usize,
    conn: Option<Box<dyn crate::compare::Conn>>,
}

impl PeerClient {
    async fn conn(&mut self) -> Result<&mut Box<dyn crate::compare::Conn>> {
        if self.conn.is_none() {
            self.conn = Some(crate::compare::connect(self.kind, &self.opts, self.index).await?);
        }
        self.conn.as_mut().ok_or_else(|| anyhow!("not connected"))
    }
}

impl TargetClient for PeerClient {
    fn put<'a>(&'a mut self, key: &'a str, value: &'a [u8]) -> BoxFut<'a, Result<()>> {
        Box::pin(async move { self.conn().await?.put(key, value).await })
    }

    fn get_linearizable<'a>(&'a mut self, key: &'a str) -> BoxFut<'a, Result<()>> {
        Box::pin(async move { self.conn().await?.get(key, true).await })
    }

    fn get_serializable<'a>(&'a mut self, key: &'a str) -> BoxFut<'a, Result<()>> {
        Box::pin(async move { self.conn().await?.get(key, false).await })
    }
}
