//! `lockd`: run one member, or `lockd dev` for a local cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use lockd::metrics::Metrics;
use lockd::node::Config;
use lockd::server::{self, ServeError};
use lockd::store::path::Limits;

/// lockd: a Raft-backed lock and coordination service.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    member: MemberArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a local cluster in the foreground with a built-in configuration.
    Dev(DevArgs),
}

#[derive(Args, Debug)]
struct DevArgs {
    /// Number of members.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Where the members keep their data (one dir per member).
    #[arg(long, default_value = "./lockd-data")]
    data_dir: PathBuf,
    /// gRPC port of member 1; member N listens on base-port + N - 1.
    #[arg(long, default_value_t = 7001)]
    base_port: u16,
    /// HTTP port of member 1 (/healthz, /readyz, /metrics).
    #[arg(long, default_value_t = 8001)]
    base_http_port: u16,
}

#[derive(Args, Debug)]
struct MemberArgs {
    /// Raft node id of this member (1 or more; never reused for an empty data dir).
    #[arg(long)]
    id: Option<u64>,
    /// Data directory (Raft log, snapshots, identity).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC address for clients and peers, e.g. 127.0.0.1:7001.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address others reach this member at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// HTTP address for /healthz, /readyz and /metrics.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Initial voters, ID=HOST:PORT,... Starting every listed member forms the cluster.
    #[arg(long)]
    initial_members: Option<String>,
    /// Cluster id; recorded in the data dir and checked on every peer message.
    #[arg(long, default_value = "lockd")]
    cluster_id: String,
    /// Leader heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// Election timeout in milliseconds: a follower that hears nothing from
    /// the leader for this long (up to 1.2x, randomized) campaigns. At least
    /// 2.5x --heartbeat-ms.
    #[arg(long, default_value_t = 1000)]
    election_timeout_ms: u64,
    /// Log entries between snapshots; the log is purged behind each snapshot.
    #[arg(long, default_value_t = 10_000)]
    snapshot_threshold: u64,
    /// Longest key (path) in bytes.
    #[arg(long, default_value_t = 4096)]
    max_key_bytes: usize,
    /// Largest value in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_value_bytes: usize,
    /// Upper bound on one client request, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Shortest session TTL granted, in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    session_min_ttl_ms: u64,
    /// Longest session TTL granted, in milliseconds.
    #[arg(long, default_value_t = 300_000)]
    session_max_ttl_ms: u64,
    /// How often the leader checkpoints sessions' remaining TTLs, in
    /// milliseconds (bounds how much a leader change can extend a dead
    /// session).
    #[arg(long, default_value_t = 1_000)]
    session_checkpoint_ms: u64,
    /// Revisions of watch history kept in memory; watches may start from any
    /// of them (older ones are compacted).
    #[arg(long, default_value_t = 100_000)]
    watch_history_revisions: u64,
    /// Approximate bytes of watch history kept in memory.
    #[arg(long, default_value_t = 64 << 20)]
    watch_history_bytes: usize,
    /// Revisions queued per watch before a watcher that does not keep up is
    /// cancelled (it resumes from the revision named in the reason).
    #[arg(long, default_value_t = 1024)]
    watch_buffer: usize,
    /// Progress notices go to watches idle this long, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    watch_progress_interval_ms: u64,
}

fn parse_members(s: &str) -> anyhow::Result<Vec<(u64, String)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("--initial-members: {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .parse()
            .with_context(|| format!("--initial-members: {id:?} is not a node id"))?;
        if id == 0 {
            bail!("--initial-members: node id 0 is reserved; use ids from 1");
        }
        if addr.is_empty() || !addr.contains(':') {
            bail!("--initial-members: address {addr:?} of node {id} is not HOST:PORT");
        }
        if out.iter().any(|(i, _)| *i == id) {
            bail!("--initial-members: node id {id} is listed twice");
        }
        out.push((id, addr.to_string()));
    }
    if out.is_empty() {
        bail!("--initial-members is empty");
    }
    Ok(out)
}

fn member_config(a: MemberArgs) -> anyhow::Result<Config> {
    let id =
        a.id.context("--id is required (or run `lockd dev` for a local cluster)")?;
    if id == 0 {
        bail!("--id 0 is reserved; use ids from 1");
    }
    let data_dir = a.data_dir.context("--data-dir is required")?;
    let listen = a
        .listen
        .context("--listen is required, e.g. --listen 127.0.0.1:7001")?;
    let mut c = Config::new(id, data_dir, listen);
    c.cluster_id = a.cluster_id;
    if c.cluster_id.is_empty() {
        bail!("--cluster-id cannot be empty");
    }
    c.advertise = a.advertise.unwrap_or_else(|| listen.to_string());
    c.http_listen = a.http_listen;
    if let Some(m) = a.initial_members {
        let members = parse_members(&m)?;
        match members.iter().find(|(i, _)| *i == id) {
            Some((_, addr)) if *addr == c.advertise => {}
            Some((_, addr)) => bail!(
                "--initial-members lists node {id} at {addr}, but this member advertises {}",
                c.advertise
            ),
            None => bail!("--initial-members does not list this member's id {id}"),
        }
        c.initial_members = members;
    }
    if a.heartbeat_ms == 0 || a.election_timeout_ms * 2 / 5 <= a.heartbeat_ms {
        bail!("--election-timeout-ms must be more than 2.5x --heartbeat-ms (> 0)");
    }
    c.heartbeat = Duration::from_millis(a.heartbeat_ms);
    c.election_timeout = Duration::from_millis(a.election_timeout_ms);
    if a.snapshot_threshold == 0 {
        bail!("--snapshot-threshold must be at least 1");
    }
    c.snapshot_threshold = a.snapshot_threshold;
    c.limits = Limits {
        max_key_bytes: a.max_key_bytes,
        max_value_bytes: a.max_value_bytes,
    };
    c.request_timeout = Duration::from_millis(a.request_timeout_ms.max(100));
    if a.session_min_ttl_ms == 0 || a.session_max_ttl_ms < a.session_min_ttl_ms {
        bail!("--session-min-ttl-ms must be > 0 and at most --session-max-ttl-ms");
    }
    if a.session_checkpoint_ms == 0 {
        bail!("--session-checkpoint-ms must be > 0");
    }
    c.sessions = lockd::sessions::SessionConfig {
        min_ttl: Duration::from_millis(a.session_min_ttl_ms),
        max_ttl: Duration::from_millis(a.session_max_ttl_ms),
        checkpoint_interval: Duration::from_millis(a.session_checkpoint_ms),
    };
    if a.watch_history_revisions == 0 || a.watch_buffer == 0 || a.watch_progress_interval_ms == 0 {
        bail!("--watch-history-revisions, --watch-buffer and --watch-progress-interval-ms must be > 0");
    }
    c.watch = lockd::watch::WatchConfig {
        max_revisions: a.watch_history_revisions,
        max_bytes: a.watch_history_bytes,
        buffer: a.watch_buffer,
    };
    c.watch_progress_interval = Duration::from_millis(a.watch_progress_interval_ms);
    Ok(c)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn run_member(args: MemberArgs) -> anyhow::Result<()> {
    let config = member_config(args)?;
    server::run(config, Metrics::new(), shutdown_signal())
        .await
        .map_err(anyhow::Error::from)
}

async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > 9 {
        bail!("--nodes must be between 1 and 9");
    }
    let members: Vec<(u64, String)> = (1..=args.nodes)
        .map(|i| {
            (
                i,
                format!("127.0.0.1:{}", u64::from(args.base_port) + i - 1),
            )
        })
        .collect();
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut tasks = Vec::new();
    for (id, addr) in &members {
        let listen: SocketAddr = addr.parse().context("dev address")?;
        let http: SocketAddr = format!("127.0.0.1:{}", u64::from(args.base_http_port) + id - 1)
            .parse()
            .context("dev http address")?;
        let mut c = Config::new(*id, args.data_dir.join(format!("node-{id}")), listen);
        c.http_listen = Some(http);
        c.initial_members = members.clone();
        // Every member stops at once: nobody to hand leadership to.
        c.hand_over_on_shutdown = false;
        let mut stop = stop_tx.subscribe();
        tasks.push(tokio::spawn(server::run(c, Metrics::new(), async move {
            let _ = stop.recv().await;
        })));
    }
    let endpoints: Vec<&str> = members.iter().map(|(_, a)| a.as_str()).collect();
    println!(
        "lockd dev: {} members, data in {}",
        args.nodes,
        args.data_dir.display()
    );
    for (id, addr) in &members {
        println!(
            "  member {id}: grpc {addr}, http http://127.0.0.1:{}/readyz",
            u64::from(args.base_http_port) + id - 1
        );
    }
    println!("try:");
    println!("  export LOCKD_ENDPOINTS={}", endpoints.join(","));
    println!("  lockctl put /hello world && lockctl get /hello && lockctl status");
    println!("Ctrl-C stops the cluster; the next `lockd dev` resumes its data.");
    shutdown_signal().await;
    let _ = stop_tx.send(());
    let mut failed = None;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(anyhow::Error::from(e)),
            Err(e) => failed = Some(anyhow::Error::from(e)),
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Caps glibc's malloc arenas at the number of cores (at least 2), unless
/// `MALLOC_ARENA_MAX` says otherwise. glibc's default (8 per core) let a
/// leader that had served a mixed load hold 138 MiB where 2 arenas hold
/// 101 MiB for the same work (docs/bench.md); lockd's threads are few (the
/// Tokio workers, the log writer), so more arenas buy little.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(2);
        // SAFETY: mallopt only sets an allocator tunable; called before any
        // thread is started.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOCKD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Some(Cmd::Dev(d)) => run_dev(d).await,
            None => run_member(cli.member).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let refused = e
                .downcast_ref::<ServeError>()
                .is_some_and(|s| matches!(s, ServeError::Refused(_)));
            eprintln!("Error: {e:#}");
            ExitCode::from(if refused { 3 } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_members_parse_and_reject_bad_input() {
        let m = parse_members("1=127.0.0.1:7001, 2=h:7002,3=h:7003").expect("valid");
        assert_eq!(m[1], (2, "h:7002".to_string()));
        for (bad, why) in [
            ("1=h:1,1=h:2", "listed twice"),
            ("0=h:1", "reserved"),
            ("x=h:1", "not a node id"),
            ("1", "not ID=HOST:PORT"),
            ("1=host", "not HOST:PORT"),
            ("", "empty"),
        ] {
            let e = parse_members(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    fn args(extra: &[&str]) -> MemberArgs {
        let mut argv = vec![
            "lockd",
            "--id",
            "2",
            "--data-dir",
            "/tmp/x",
            "--listen",
            "127.0.0.1:7002",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("parse").member
    }

    #[test]
    fn member_must_be_listed_at_its_advertised_address() {
        let e = member_config(args(&[
            "--initial-members",
            "1=127.0.0.1:7001,3=127.0.0.1:7003",
        ]))
        .expect_err("not listed")
        .to_string();
        assert!(e.contains("does not list this member's id 2"), "{e}");
        let e = member_config(args(&["--initial-members", "2=127.0.0.1:9999"]))
            .expect_err("wrong address")
            .to_string();
        assert!(e.contains("advertises 127.0.0.1:7002"), "{e}");
        let c = member_config(args(&["--initial-members", "2=127.0.0.1:7002"])).expect("ok");
        assert_eq!(c.initial_members.len(), 1);
        let e = member_config(args(&[
            "--heartbeat-ms",
            "500",
            "--election-timeout-ms",
            "400",
        ]))
        .expect_err("timeouts")
        .to_string();
        assert!(e.contains("--election-timeout-ms"), "{e}");
    }
}
