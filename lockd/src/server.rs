//! Serving a member: the gRPC port (the lockd.v1 services, the peer Raft
//! service, grpc.health.v1 and server reflection)
//! and the HTTP port (/healthz, /readyz, /metrics), with graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::StreamExt;
use lockd_proto::v1::cluster_server::ClusterServer;
use lockd_proto::v1::election_server::ElectionServer;
use lockd_proto::v1::kv_server::KvServer;
use lockd_proto::v1::lock_server::LockServer;
use lockd_proto::v1::raft_server::RaftServer;
use lockd_proto::v1::session_server::SessionServer;
use lockd_proto::v1::watch_server::WatchServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api::cluster::ClusterService;
use crate::api::election::ElectionService;
use crate::api::kv::KvService;
use crate::api::lock::LockService;
use crate::api::peer::PeerService;
use crate::api::session::SessionService;
use crate::api::watch::WatchService;
use crate::node::{Config, LockdNode, StartError};

/// Why a member stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Startup failed.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The reflection service could not be built from the descriptors.
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The cluster refused this member's identity.
    #[error("{0}")]
    Refused(String),
}

/// Starts a member and serves it until `shutdown` resolves (Ok) or the
/// member is refused by its cluster (Err).
pub async fn run(
    config: Config,
    metrics: crate::metrics::Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Bind first, so a port conflict is reported before anything is written.
    let grpc = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let http = match config.http_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?,
        ),
        None => None,
    };
    let node = LockdNode::start(config, metrics).await?;
    tracing::info!(
        id = node.config.id,
        cluster = %node.identity.cluster_id,
        listen = %node.config.listen,
        advertise = %node.config.advertise,
        "member started"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut fatal = node.fatal();
    let watcher = {
        let stop_tx = stop_tx.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let graceful = tokio::select! {
                _ = shutdown => true,
                _ = fatal.wait_for(|f| f.is_some()) => false,
            };
            if graceful && node.config.hand_over_on_shutdown {
                // Still serving: in-flight writes finish and the new leader
                // can be reached while leadership moves.
                let within = node.config.election_timeout * 2;
                if let Some(to) = node.hand_over_leadership(within).await {
                    tracing::info!(new_leader = to, "leadership handed over");
                }
            }
            let _ = stop_tx.send(true);
        })
    };
    let http_task = http.map(|listener| {
        let app = axum::Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_handler))
            .with_state(node.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "http server failed");
            }
        })
    });
    let max_msg = node
        .config
        .limits
        .max_value_bytes
        .saturating_mul(2)
        .max(4 << 20)
        + (64 << 10);
    // tonic applies its TCP options only to listeners it binds itself; with
    // our own listener every accepted socket needs TCP_NODELAY set here, or
    // small responses wait for the peer's delayed ACK (~40 ms).
    let incoming = TcpListenerStream::new(grpc).map(|conn| {
        let conn = conn?;
        if let Err(e) = conn.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on an accepted connection");
        }
        Ok::<_, std::io::Error>(conn)
    });
    let mut stop = stop_rx.clone();
    let hub = node.watch.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(report_health(node.clone(), health));
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(lockd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let served = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(crate::raft::network::WINDOW))
        .initial_connection_window_size(Some(crate::raft::network::WINDOW * 2))
        .add_service(
            KvServer::new(KvService::new(node.clone()))
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            ClusterServer::new(ClusterService::new(node.clone()))
                .max_decoding_message_size(max_msg),
        )
        .add_service(SessionServer::new(SessionService::new(
            node.clone(),
            stop_rx.clone(),
        )))
        .add_service(WatchServer::new(WatchService::new(node.clone())))
        .add_service(LockServer::new(LockService::new(node.clone())))
        .add_service(ElectionServer::new(ElectionService::new(node.clone())))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            RaftServer::new(PeerService::new(node.clone(), stop_rx.clone()))
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
            // Graceful shutdown waits for open streams: end the watches.
            hub.close("member shutting down");
        })
        .await;
    watcher.abort();
    health_task.abort();
    if let Err(e) = node.raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    if let Some(t) = http_task {
        let _ = t.await;
    }
    served?;
    let reason = node.fatal().borrow().clone();
    match reason {
        Some(r) => Err(ServeError::Refused(r)),
        None => {
            tracing::info!(id = node.config.id, "member stopped");
            Ok(())
        }
    }
}

/// Keeps grpc.health.v1 in step with /readyz: the overall status ("") and
/// every lockd.v1 service are SERVING while the member is ready.
async fn report_health(node: Arc<LockdNode>, health: tonic_health::server::HealthReporter) {
    use openraft::async_runtime::WatchReceiver;
    const SERVICES: [&str; 7] = [
        "",
        "lockd.v1.KV",
        "lockd.v1.Cluster",
        "lockd.v1.Session",
        "lockd.v1.Watch",
        "lockd.v1.Lock",
        "lockd.v1.Election",
    ];
    let mut metrics = node.raft.metrics();
    let mut last = None;
    loop {
        let ready = node.is_ready();
        if last != Some(ready) {
            let status = if ready {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for s in SERVICES {
                health.set_service_status(s, status).await;
            }
            last = Some(ready);
        }
        // Metrics change on every applied entry: look at most ten times a
        // second.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

async fn readyz(State(node): State<Arc<LockdNode>>) -> (StatusCode, String) {
    if node.is_ready() {
        (StatusCode::OK, "ready\n".into())
    } else {
        let m = node.raft_metrics();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: state={:?} leader={:?} committed={:?} applied={:?}\n",
                m.state,
                m.current_leader,
                m.local_committed.map(|l| l.index),
                m.last_applied.map(|l| l.index)
            ),
        )
    }
}

async fn metrics_handler(State(node): State<Arc<LockdNode>>) -> String {
    let m = node.raft_metrics();
    let (revision, nodes) = {
        let data = node.sm.read();
        (data.state.revision(), data.state.len() as u64)
    };
    node.metrics.set_raft(
        m.current_term,
        m.local_committed.map(|l| l.index).unwrap_or(0),
        m.last_applied.map(|l| l.index).unwrap_or(0),
        m.last_log_index.unwrap_or(0),
        m.state == openraft::ServerState::Leader,
        m.current_leader.unwrap_or(0),
        revision,
        nodes,
    );
    node.metrics.render()
}
