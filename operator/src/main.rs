//! `lockd-operator`: runs the LockCluster controller.
//!
//! Replicas elect a leader on a Lease; only the leader reconciles. A leader
//! that loses its lease exits (its Deployment restarts it as a follower),
//! so two replicas never act on one cluster at once.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::State;
use axum::routing::get;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{watcher, Controller};
use kube::Client;
use lockd_crds::{names, LockCluster};
use lockd_operator::api_requests::CountRequests;
use lockd_operator::controller::GrpcLockd;
use lockd_operator::controller::{self, Context};
use lockd_operator::lease::{self, LeaseConfig};
use lockd_operator::metrics::Metrics;

/// Kubernetes operator for lockd clusters (LockCluster resources).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Watch LockClusters in this namespace only (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "lockd-system")]
    leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "lockd-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (default: the pod name, else the
    /// host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Reconcile without electing a leader (one replica only).
    #[arg(long)]
    no_leader_election: bool,
    /// HTTP address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http_listen: SocketAddr,
}

struct Http {
    metrics: Arc<Metrics>,
}

async fn serve_http(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|State(h): State<Arc<Http>>| async move { h.metrics.render() }),
        )
        .with_state(Arc::new(Http { metrics }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok(())
}

fn identity(args: &Args) -> String {
    args.identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("lockd-operator-{}", std::process::id()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let config = kube::Config::infer()
        .await
        .context("connecting to the Kubernetes API (kubeconfig or in-cluster config)")?;
    let client = kube::client::ClientBuilder::try_from(config)
        .context("building the Kubernetes client")?
        .with_layer(&CountRequests::new(metrics.api_requests.clone()))
        .build();
    serve_http(args.http_listen, metrics.clone()).await?;
    let me = identity(&args);

    // Leader election first: only the leader watches and acts.
    let (lead_tx, mut lead_rx) = tokio::sync::watch::channel(args.no_leader_election);
    if !args.no_leader_election {
        let leases: Api<Lease> = Api::namespaced(client.clone(), &args.leader_election_namespace);
        let config = LeaseConfig::new(args.lease_name.clone(), me.clone());
        tokio::spawn(lease::run(leases, config, lead_tx));
        tracing::info!(identity = %me, "waiting for the leader lease");
        lead_rx
            .wait_for(|l| *l)
            .await
            .context("leader election stopped")?;
    }
    metrics.leader.set(1);

    let api = |c: &Client| -> (Api<LockCluster>, Option<String>) {
        match &args.namespace {
            Some(ns) => (Api::namespaced(c.clone(), ns), Some(ns.clone())),
            None => (Api::all(c.clone()), None),
        }
    };
    let (clusters, ns) = api(&client);
    fn child<K>(c: &Client, ns: &Option<String>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(c.clone(), ns),
            None => Api::all(c.clone()),
        }
    }
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        names::LABEL_MANAGED_BY,
        names::MANAGED_BY
    ));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "lockd-operator".to_string(),
            instance: Some(me.clone()),
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        lockd: Arc::new(GrpcLockd::new(controller::PROBE_TIMEOUT)),
        recorder: Some(recorder),
        metrics: metrics.clone(),
        backoff: Default::default(),
    });
    let controller = Controller::new(clusters, watcher::Config::default())
        .owns(child::<Pod>(&client, &ns), owned.clone())
        .owns(child::<PersistentVolumeClaim>(&client, &ns), owned.clone())
        .owns(child::<Service>(&client, &ns), owned.clone())
        .owns(child::<ConfigMap>(&client, &ns), owned.clone())
        .owns(child::<PodDisruptionBudget>(&client, &ns), owned)
        .shutdown_on_signal()
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        });
    tracing::info!(identity = %me, "reconciling LockClusters");
    tokio::select! {
        _ = controller => Ok(()),
        _ = lead_rx.wait_for(|l| !*l), if !args.no_leader_election => {
            anyhow::bail!("lost the leader lease; exiting so that only the new leader acts")
        }
    }
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOCKD_OPERATOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lockd-operator: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockd-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
