//! A TCP fault-injection proxy: put it between a client and one lockd member
//! to cut that client off from the member (a client-side network partition)
//! while both processes stay alive.
//!
//! ```no_run
//! # async fn demo(c: &lockd_e2e::Cluster) -> anyhow::Result<()> {
//! use lockd_e2e::proxy::Proxy;
//!
//! let p = Proxy::start(&c.addr(1)).await?;
//! // Point the client at p.endpoint() instead of c.endpoint(1).
//! p.cut().await; // live connections dropped, new ones hang
//! p.heal(); // traffic flows again
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Forwards every connection accepted on an ephemeral port of 127.0.0.1 to a
/// fixed target, until told to [`cut`](Proxy::cut) the link.
///
/// * **Forwarding**: each accepted connection gets its own task that
///   connects to the target and copies bytes both ways. If the target
///   cannot be reached, the client's connection is closed (as a refused
///   connection would look through a proxy).
/// * **Cut** ([`Proxy::cut`]): every live forwarded connection is aborted
///   (both of its sockets are closed, so the client sees its streams fail),
///   and connections accepted from then on are *held*: accepted but never
///   read from nor forwarded. Clients therefore see connects that succeed
///   and requests that never get an answer, i.e. timeouts, like a real
///   partition, rather than a quick "connection refused".
/// * **Heal** ([`Proxy::heal`]): new connections are forwarded again, and
///   the connections held during the cut are forwarded now, with whatever
///   the client had sent meanwhile (as retransmitted packets get through
///   once a partition heals). A client that gave up on such a connection
///   has closed it; its forwarding then just ends.
///
/// Dropping the proxy stops accepting and closes every connection, held or
/// forwarded. Must be created inside a Tokio runtime.
pub struct Proxy {
    addr: SocketAddr,
    target: String,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    target: String,
    state: Mutex<State>,
    accepted: AtomicU64,
}

#[derive(Default)]
struct State {
    cut: bool,
    next_id: u64,
    /// Forwarding tasks of live connections, by connection id. A task
    /// removes itself when its connection ends.
    live: HashMap<u64, JoinHandle<()>>,
    /// Connections accepted while cut, not forwarded.
    held: Vec<TcpStream>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns the forwarding task of `client` (with `st` locked, so that the
    /// task cannot deregister itself before it is registered).
    fn forward(self: &Arc<Self>, st: &mut State, client: TcpStream) {
        let id = st.next_id;
        st.next_id += 1;
        let shared = self.clone();
        let task = tokio::spawn(async move {
            pump(&shared.target, client).await;
            shared.state().live.remove(&id);
        });
        st.live.insert(id, task);
    }
}

/// Copies between `client` and a new connection to `target` until either
/// side closes or fails.
async fn pump(target: &str, mut client: TcpStream) {
    let mut upstream = match TcpStream::connect(target).await {
        Ok(s) => s,
        // Closing the client's connection is how an unreachable target
        // looks through a proxy.
        Err(_) => return,
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Errors (resets) just end the connection, like its normal end.
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `target` ("127.0.0.1:PORT",
    /// e.g. [`Cluster::addr`](crate::Cluster::addr)). Not cut initially.
    pub async fn start(target: &str) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("proxy: bind 127.0.0.1:0")?;
        let addr = listener.local_addr().context("proxy: local address")?;
        let shared = Arc::new(Shared {
            target: target.to_string(),
            state: Mutex::new(State::default()),
            accepted: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let client = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: back off a
                        // little instead of spinning (a retry delay, not a
                        // wait for an event).
                        eprintln!("lockd-e2e proxy {addr}: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                sh.accepted.fetch_add(1, Ordering::SeqCst);
                let mut st = sh.state();
                if st.cut {
                    st.held.push(client);
                } else {
                    sh.forward(&mut st, client);
                }
            }
        });
        Ok(Proxy {
            addr,
            target: target.to_string(),
            shared,
            accept,
        })
    }

    /// The proxy's address, "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The proxy's gRPC endpoint, "http://127.0.0.1:PORT".
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address traffic is forwarded to.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Cuts the link: aborts every live forwarded connection and holds
    /// (never forwards) the connections accepted from now on, until
    /// [`Proxy::heal`]. When it returns, every connection that was being
    /// forwarded is closed on both sides. Cutting twice is harmless.
    pub async fn cut(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut st = self.shared.state();
            st.cut = true;
            st.live.drain().map(|(_, t)| t).collect()
        };
        for t in &tasks {
            t.abort();
        }
        // An aborted task drops its sockets when it ends: wait for that.
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Heals the link: forwards new connections again, and starts
    /// forwarding the connections held since [`Proxy::cut`]. Healing a link
    /// that is not cut does nothing.
    pub fn heal(&self) {
        let mut st = self.shared.state();
        st.cut = false;
        let held = std::mem::take(&mut st.held);
        for client in held {
            self.shared.forward(&mut st, client);
        }
    }

    /// True while cut.
    pub fn is_cut(&self) -> bool {
        self.shared.state().cut
    }

    /// Connections accepted so far (forwarded or held).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections being forwarded now.
    pub fn live(&self) -> usize {
        self.shared.state().live.len()
    }

    /// Connections held (accepted during the cut, not forwarded) now.
    pub fn held(&self) -> usize {
        self.shared.state().held.len()
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.state();
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("cut", &st.cut)
            .field("live", &st.live.len())
            .field("held", &st.held.len())
            .finish()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        let mut st = self.shared.state();
        for (_, t) in st.live.drain() {
            t.abort();
        }
        st.held.clear();
    }
}
