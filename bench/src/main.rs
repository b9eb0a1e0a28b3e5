//! lockbench: benchmarks lockd, and lockd against etcd and ZooKeeper.
//!
//! * `lockbench run ...` drives an existing cluster.
//! * `lockbench local [--quick|--smoke]` starts a 3-member lockd cluster with
//!   the e2e harness and runs the standard suite (see docs/bench.md).
//! * `lockbench sessions [--sessions N] [--ttl 30s] [--quick]` starts the same
//!   cluster and measures what N live sessions cost (keepalives, leader CPU
//!   and RSS, writes with and without them).
//! * `lockbench watch [--watchers 1,100,1000] [--quick]` starts the same
//!   cluster and measures how long a put takes to reach N watchers of its
//!   key.
//! * `lockbench locks [--quick]` starts the same cluster and measures the
//!   `Mutex` recipe: uncontended lock/unlock latency, handovers/s with 16
//!   contenders, and lock and election failover after SIGKILL of a
//!   `lockctl lock` holder or `lockctl elect` leader.

mod compare;
mod fsync;
mod local;
mod locks;
mod procstat;
mod report;
mod sessions;
mod target;
mod watches;
mod workload;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::report::{Machine, Row};
use crate::workload::{Kind, Spec};

#[derive(Parser, Debug)]
#[command(
    name = "lockbench",
    version,
    about = "Benchmarks lockd, and lockd against etcd and ZooKeeper"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one workload against an existing cluster.
    Run(RunArgs),
    /// Start a local 3-member lockd cluster and run the standard suite.
    Local(LocalArgs),
    /// Start a local 3-member lockd cluster and measure what N live sessions
    /// cost (keepalive latency, leader CPU and RSS, writes with and without).
    Sessions(SessionsArgs),
    /// Start a local 3-member lockd cluster and measure how long a put takes
    /// to reach N watchers of its key (watch latency, no gaps).
    Watch(WatchArgs),
    /// Start a local 3-member lockd cluster and measure the Mutex recipe
    /// (uncontended latency, contended handovers/s) and lock and election
    /// failover after SIGKILL.
    Locks(LocksArgs),
    /// Start 3-member clusters of lockd, etcd and ZooKeeper in turn, run the
    /// same workloads against each, and print one side-by-side table.
    Compare(compare::cli::CompareArgs),
    /// Take a lock and hold it until killed (the holder process of the
    /// holder-crash workload).
    #[command(hide = true)]
    Hold(compare::cli::HoldArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// System under test.
    #[arg(long, default_value = "lockd")]
    target: String,
    /// Comma-separated HOST:PORT (or http://HOST:PORT) endpoints; clients are
    /// spread over them round-robin, one connection per client.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    #[arg(long, value_enum, default_value = "write")]
    workload: Kind,
    /// Concurrent clients (closed loop: one request in flight each).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Measured duration, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up before the measured window.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Number of keys written before a read workload and read at random.
    #[arg(long, default_value_t = 1000)]
    read_keys: usize,
    /// Serializable (local, possibly stale) reads instead of linearizable.
    #[arg(long)]
    serializable: bool,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    rpc_timeout: Duration,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(clap::Args, Debug)]
struct LocalArgs {
    /// 3 s per workload and 100 fsync rounds instead of 10 s and 200.
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// ~1 s per workload; exit non-zero unless every workload completed at
    /// least one op without errors (for CI).
    #[arg(long)]
    smoke: bool,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(clap::Args, Debug)]
struct SessionsArgs {
    /// Sessions to open and keep alive.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Requested session TTL; each session is renewed every TTL/3.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    ttl: Duration,
    /// 3 s idle and write windows instead of 10 s.
    #[arg(long)]
    quick: bool,
    /// Concurrent Open (and Close) calls, spread over the members.
    #[arg(long, default_value_t = 64)]
    open_concurrency: usize,
    /// KeepAlive streams, spread over the members.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(clap::Args, Debug)]
struct WatchArgs {
    /// Comma-separated watcher counts, one round each.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    watchers: Vec<usize>,
    /// 50 measured puts per round instead of 200.
    #[arg(long)]
    quick: bool,
    /// Most Watch streams per member; the watches on a member share them.
    #[arg(long, default_value_t = 32)]
    streams_per_member: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(clap::Args, Debug)]
struct LocksArgs {
    /// 50 uncontended rounds and a 3 s contended window instead of 200 and
    /// 10 s.
    #[arg(long)]
    quick: bool,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 10s, 500ms, 1m)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s or m)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Serialize)]
struct JsonReport<'a, T: Serialize> {
    command: String,
    machine: Machine,
    rows: &'a [Row],
    result: &'a T,
}

fn emit<T: Serialize>(output: Output, title: &str, rows: &[Row], result: &T) -> Result<()> {
    let machine = Machine::detect();
    let command = report::command_line();
    match output {
        Output::Table => print!("{}", report::markdown(title, &machine, &command, rows)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&JsonReport {
                command,
                machine,
                rows,
                result,
            })?
        ),
    }
    Ok(())
}

async fn cmd_run(a: RunArgs) -> Result<bool> {
    let target = target::by_name(&a.target, a.rpc_timeout)?;
    let name = match (a.workload, a.serializable) {
        (Kind::Write, _) => format!("write, {} clients", a.clients),
        (Kind::Read, false) => format!("linearizable read, {} clients", a.clients),
        (Kind::Read, true) => format!("serializable read, {} clients", a.clients),
    };
    let spec = Spec {
        name,
        kind: a.workload,
        serializable: a.serializable,
        clients: a.clients,
        duration: a.duration,
        warmup: a.warmup,
        value_size: a.value_size,
        read_keys: a.read_keys,
        endpoints: a.endpoints,
    };
    let out = workload::run(target.as_ref(), &spec).await?;
    let rows = local::workload_rows(&out, true);
    for s in &out.error_samples {
        eprintln!("lockbench: error sample: {s}");
    }
    emit(
        a.output,
        &format!("lockbench run: {}", target.name()),
        &rows,
        &out,
    )?;
    Ok(out.clean())
}

async fn cmd_local(a: LocalArgs) -> Result<bool> {
    let mode = if a.smoke {
        local::Mode::Smoke
    } else if a.quick {
        local::Mode::Quick
    } else {
        local::Mode::Full
    };
    let target = target::Lockd {
        rpc_timeout: Duration::from_secs(10),
    };
    let res = local::run_suite(&target, mode).await?;
    for o in &res.workloads {
        for s in &o.error_samples {
            eprintln!("lockbench: {}: error sample: {s}", o.spec.name);
        }
    }
    for n in &res.notes {
        eprintln!("lockbench: note: {n}");
    }
    let rows = local::rows(&res);
    emit(
        a.output,
        "lockbench local: 3-member lockd cluster",
        &rows,
        &res,
    )?;
    Ok(res.clean())
}

async fn cmd_sessions(a: SessionsArgs) -> Result<bool> {
    let target = target::Lockd {
        rpc_timeout: Duration::from_secs(10),
    };
    let opts = sessions::Options {
        sessions: a.sessions,
        ttl: a.ttl,
        quick: a.quick,
        open_concurrency: a.open_concurrency.max(1),
        streams: a.streams.max(1),
    };
    let res = sessions::run(&target, opts).await?;
    for o in [&res.baseline_write, &res.sessions_write] {
        for s in &o.error_samples {
            eprintln!("lockbench: {}: error sample: {s}", o.spec.name);
        }
    }
    for s in res
        .open
        .error_samples
        .iter()
        .chain(&res.keepalive.error_samples)
        .chain(&res.close.error_samples)
    {
        eprintln!("lockbench: error sample: {s}");
    }
    for n in &res.notes {
        eprintln!("lockbench: note: {n}");
    }
    let rows = sessions::rows(&res);
    emit(
        a.output,
        &format!(
            "lockbench sessions: {} sessions on a 3-member lockd cluster",
            res.open.ok
        ),
        &rows,
        &res,
    )?;
    Ok(res.clean())
}

async fn cmd_watch(a: WatchArgs) -> Result<bool> {
    let opts = watches::Options {
        watchers: a.watchers,
        quick: a.quick,
        streams_per_member: a.streams_per_member.max(1),
        value_size: a.value_size,
    };
    let res = watches::run(opts).await?;
    for r in &res.rounds {
        for s in &r.error_samples {
            eprintln!("lockbench: {} watchers: error sample: {s}", r.watchers);
        }
    }
    for n in &res.notes {
        eprintln!("lockbench: note: {n}");
    }
    let rows = watches::rows(&res);
    emit(
        a.output,
        &format!(
            "lockbench watch: watchers of one key on a 3-member lockd cluster (leader m{})",
            res.leader
        ),
        &rows,
        &res,
    )?;
    Ok(res.clean())
}

async fn cmd_locks(a: LocksArgs) -> Result<bool> {
    let res = locks::run(locks::Options { quick: a.quick }).await?;
    for s in res
        .solo
        .error_samples
        .iter()
        .chain(&res.contended.error_samples)
        .chain(&res.failover_errors)
        .chain(&res.election_errors)
    {
        eprintln!("lockbench: error sample: {s}");
    }
    for n in &res.notes {
        eprintln!("lockbench: note: {n}");
    }
    let rows = locks::rows(&res);
    emit(
        a.output,
        &format!(
            "lockbench locks: Mutex recipe on a 3-member lockd cluster (leader m{})",
            res.leader
        ),
        &rows,
        &res,
    )?;
    Ok(res.clean())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("build the Tokio runtime")
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lockbench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let res = rt.block_on(async {
        match cli.cmd {
            Cmd::Run(a) => cmd_run(a).await,
            Cmd::Local(a) => cmd_local(a).await,
            Cmd::Sessions(a) => cmd_sessions(a).await,
            Cmd::Watch(a) => cmd_watch(a).await,
            Cmd::Locks(a) => cmd_locks(a).await,
            Cmd::Compare(a) => compare::cli::compare(a).await,
            Cmd::Hold(a) => compare::cli::hold(a).await,
        }
    });
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("lockbench: some workload completed no op or saw errors");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("lockbench: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn cli_parses() {
        Cli::try_parse_from([
            "lockbench",
            "run",
            "--target",
            "lockd",
            "--endpoints",
            "a:1,b:2",
            "--workload",
            "read",
            "--clients",
            "4",
            "--duration",
            "2s",
            "--serializable",
            "-o",
            "json",
        ])
        .map(|_| ())
        .unwrap_or_else(|e| panic!("{e}"));
        Cli::try_parse_from(["lockbench", "local", "--quick"])
            .map(|_| ())
            .unwrap_or_else(|e| panic!("{e}"));
        Cli::try_parse_from([
            "lockbench",
            "sessions",
            "--sessions",
            "100",
            "--ttl",
            "3s",
            "--quick",
        ])
        .map(|_| ())
        .unwrap_or_else(|e| panic!("{e}"));
        let c = Cli::try_parse_from([
            "lockbench",
            "watch",
            "--watchers",
            "1,10",
            "--quick",
            "-o",
            "json",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        match c.cmd {
            Cmd::Watch(a) => assert_eq!(a.watchers, vec![1, 10]),
            other => panic!("parsed as {other:?}"),
        }
        match Cli::try_parse_from(["lockbench", "locks", "--quick"])
            .unwrap_or_else(|e| panic!("{e}"))
            .cmd
        {
            Cmd::Locks(a) => assert!(a.quick),
            other => panic!("parsed as {other:?}"),
        }
    }
}
