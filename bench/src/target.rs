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

/// A system that can be benchmarked (lockd now; etcd and ZooKeeper later).
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
        "etcd" | "zookeeper" => bail!("target {name:?} is not implemented yet"),
        other => bail!("unknown target {other:?} (known: lockd)"),
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
