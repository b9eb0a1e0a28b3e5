//! lockd for `lockbench compare`: a 3-member cluster from the e2e harness
//! (heartbeat 100 ms, election timeout 1 s) and lockd-client with its
//! `Mutex` recipe.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use lockd_client::proto;
use lockd_client::recipes::{Mutex, MutexGuard};
use lockd_client::{Client, ClientOptions, Error, Session, WatchEventKind, WatchOptions};
use lockd_e2e::Cluster;
use tokio::sync::mpsc;

use super::{BoxFut, Conn, ConnectOptions, Kind, Sessions, System};
use crate::sessions::{open_all, Keepers};
use crate::target::http_uri;

/// Opens one connection.
pub async fn connect(opts: &ConnectOptions) -> Result<Box<dyn Conn>> {
    let client = Client::connect_with(
        opts.endpoints.iter().cloned(),
        ClientOptions {
            request_timeout: opts.rpc_timeout,
            ..ClientOptions::default()
        },
    )
    .map_err(|e| anyhow!("lockd client: {e}"))?;
    Ok(Box::new(LockdConn {
        client,
        ttl: opts.session_ttl,
        session: None,
        held: HashMap::new(),
    }))
}

struct LockdConn {
    client: Client,
    ttl: Duration,
    session: Option<Session>,
    held: HashMap<String, MutexGuard>,
}

fn err(what: &str, e: Error) -> anyhow::Error {
    anyhow!("lockd {what}: {e}")
}

impl Conn for LockdConn {
    fn put<'a>(&'a mut self, key: &'a str, value: &'a [u8]) -> BoxFut<'a, Result<()>> {
        Box::pin(async move {
            self.client
                .put_with(proto::PutRequest {
                    path: key.to_string(),
                    data: value.to_vec(),
                    expected_version: None,
                    parents: true,
                })
                .await
                .map_err(|e| err("put", e))?;
            Ok(())
        })
    }

    fn get<'a>(&'a mut self, key: &'a str, linearizable: bool) -> BoxFut<'a, Result<()>> {
        Box::pin(async move {
            self.client
                .get_with(proto::GetRequest {
                    path: key.to_string(),
                    serializable: !linearizable,
                    min_revision: 0,
                })
                .await
                .map_err(|e| err("get", e))?;
            Ok(())
        })
    }

    fn lock<'a>(&'a mut self, name: &'a str) -> BoxFut<'a, Result<String>> {
        Box::pin(async move {
            if self.session.as_ref().is_none_or(|s| s.is_lost()) {
                let s = self
                    .client
                    .open_session(self.ttl)
                    .await
                    .map_err(|e| err("open session", e))?;
                self.session = Some(s);
            }
            let session = self.session.as_ref().ok_or_else(|| anyhow!("no session"))?;
            let guard = Mutex::new(self.client.clone(), name, session)
                .lock()
                .await
                .map_err(|e| err("lock", e))?;
            let key = guard.path().to_string();
            self.held.insert(key.clone(), guard);
            Ok(key)
        })
    }

    fn unlock(&mut self, key: String) -> BoxFut<'_, Result<()>> {
        Box::pin(async move {
            let guard = self
                .held
                .remove(&key)
                .ok_or_else(|| anyhow!("unlock {key}: not held by this connection"))?;
            guard.unlock().await.map_err(|e| err("unlock", e))
        })
    }

    fn watch<'a>(&'a mut self, key: &'a str) -> BoxFut<'a, Result<mpsc::Receiver<Vec<u8>>>> {
        Box::pin(async move {
            // From the revision after the current one: no put after this
            // call returns is missed.
            let rev = self
                .client
                .get_with(proto::GetRequest {
                    path: key.to_string(),
                    serializable: false,
                    min_revision: 0,
                })
                .await
                .map_err(|e| err("get before watch", e))?
                .header
                .map_or(0, |h| h.revision);
            let mut w = self
                .client
                .watch(WatchOptions::key(key).from_revision(rev + 1));
            let (tx, rx) = mpsc::channel(1024);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        ev = w.next() => match ev {
                            Ok(ev) if ev.kind == WatchEventKind::Put => {
                                if tx.send(ev.node.data).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        },
                        _ = tx.closed() => return,
                    }
                }
            });
            Ok(rx)
        })
    }
}

/// Starts a 3-member cluster.
pub async fn start() -> Result<Box<dyn System>> {
    let (cluster, _) = crate::local::start_cluster().await?;
    Ok(Box::new(LockdSystem { cluster }))
}

struct LockdSystem {
    cluster: Cluster,
}

struct LockdSessions {
    n: usize,
    _keepers: Keepers,
}

impl Sessions for LockdSessions {
    fn len(&self) -> usize {
        self.n
    }
}

impl System for LockdSystem {
    fn kind(&self) -> Kind {
        Kind::Lockd
    }

    fn settings(&self) -> String {
        "lockd (this build): every acknowledged write fsynced on a majority \
         (group commit), heartbeat 100 ms, election timeout 1 s, pre-vote on"
            .into()
    }

    fn connect_options(&self) -> ConnectOptions {
        ConnectOptions::new(self.cluster.endpoints())
    }

    fn leader(&self) -> BoxFut<'_, Result<usize>> {
        Box::pin(async move {
            let id = self
                .cluster
                .wait_for_leader(Duration::from_secs(30))
                .await
                .context("lockd leader")?;
            Ok(id as usize - 1)
        })
    }

    fn pid(&self, i: usize) -> Option<u32> {
        self.cluster.pid(i as u64 + 1)
    }

    fn kill(&self, i: usize) -> Result<()> {
        self.cluster.kill(i as u64 + 1);
        Ok(())
    }

    fn restart(&self, i: usize) -> BoxFut<'_, Result<()>> {
        Box::pin(async move {
            let id = i as u64 + 1;
            self.cluster.restart(id)?;
            self.cluster
                .wait_ready(id, Duration::from_secs(60))
                .await
                .context("restarted member ready")?;
            Ok(())
        })
    }

    fn open_sessions(&self, n: usize, ttl: Duration) -> BoxFut<'_, Result<Box<dyn Sessions>>> {
        Box::pin(async move {
            let endpoints: Vec<String> = self.cluster.endpoints();
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            let (ids, _, bulk) = open_all(&endpoints, n, ttl_ms, 64).await?;
            if ids.len() < n {
                return Err(anyhow!(
                    "opened {} of {n} sessions ({} errors)",
                    ids.len(),
                    bulk.errors
                ));
            }
            let members: Vec<(u64, String)> = self
                .cluster
                .ids()
                .into_iter()
                .map(|id| (id, http_uri(&self.cluster.endpoint(id))))
                .collect();
            let keepers = Keepers::start(&members, &ids, 8, ttl / 3)?;
            Ok(Box::new(LockdSessions {
                n: ids.len(),
                _keepers: keepers,
            }) as Box<dyn Sessions>)
        })
    }

    fn stop(&mut self) -> BoxFut<'_, Result<()>> {
        Box::pin(async move {
            for id in self.cluster.ids() {
                self.cluster.kill(id);
            }
            Ok(())
        })
    }
}
