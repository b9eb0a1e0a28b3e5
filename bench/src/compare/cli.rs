//! `lockbench compare` and `lockbench hold`: the commands, the fsync probe
//! and the side-by-side markdown table.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use super::run::{run_all, Better, Plan, SystemResult, WORKLOADS};
use super::{connect, ConnectOptions, Kind};
use crate::fsync::{self, FsyncOutcome};
use crate::report::{command_line, Machine};

/// Arguments of `lockbench compare`.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// A shorter run (well under a minute per system).
    #[arg(long)]
    pub quick: bool,
    /// A smoke run: seconds per system, small counts (for CI).
    #[arg(long, conflicts_with = "quick")]
    pub smoke: bool,
    /// Systems to run, in order (each alone: the others are stopped).
    #[arg(long, value_delimiter = ',', default_value = "lockd,etcd,zookeeper")]
    pub targets: Vec<Kind>,
    /// Only these workloads (write (and read), lock, watch, holder-crash,
    /// sessions, failover); default all.
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Do not install missing peers with ./scripts/install-peers.
    #[arg(long)]
    pub no_install: bool,
}

/// Arguments of `lockbench hold` (the holder process of the holder-crash
/// workload).
#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    /// System.
    #[arg(long)]
    pub target: Kind,
    /// Comma-separated client endpoints.
    #[arg(long, value_delimiter = ',', required = true)]
    pub endpoints: Vec<String>,
    /// Session TTL.
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    pub ttl: Duration,
    /// Lock name.
    pub name: String,
}

/// Takes the lock, prints `held KEY`, and holds until killed.
pub async fn hold(a: HoldArgs) -> Result<bool> {
    let opts = ConnectOptions {
        endpoints: a.endpoints,
        session_ttl: a.ttl,
        rpc_timeout: Duration::from_secs(5),
    };
    let mut c = connect(a.target, &opts, 0).await?;
    let key = c.lock(&a.name).await?;
    println!("held {key}");
    std::future::pending::<()>().await;
    Ok(true)
}

#[derive(Serialize)]
struct CompareReport {
    machine: Machine,
    command: String,
    plan: Plan,
    fsync: Option<FsyncOutcome>,
    results: BTreeMap<&'static str, SystemResult>,
}

fn fmt_value(v: f64, unit: &str) -> String {
    if v.is_nan() {
        return "n/a".into();
    }
    match unit {
        "ms" if v < 10.0 => format!("{v:.2} ms"),
        "ms" => format!("{v:.0} ms"),
        "ops/s" => format!("{v:.0}/s"),
        "%" => format!("{v:.0}%"),
        "MiB" => format!("{v:.0} MiB"),
        _ => format!("{v:.2} {unit}"),
    }
}

/// lockd's value over the peer's, written so that > 1 always means "lockd
/// is better".
fn advantage(lockd: f64, peer: f64, better: Better) -> String {
    if lockd.is_nan() || peer.is_nan() || lockd <= 0.0 || peer <= 0.0 {
        return "".into();
    }
    let r = match better {
        Better::Higher => lockd / peer,
        Better::Lower => peer / lockd,
    };
    format!("{r:.2}x")
}

fn table(report: &CompareReport) -> String {
    let mut s = String::new();
    s.push_str(&format!("- command: `{}`\n", report.command));
    s.push_str(&format!(
        "- machine: {} cores, {}, kernel {}\n",
        report.machine.cores, report.machine.cpu, report.machine.kernel
    ));
    if let Some(f) = &report.fsync {
        s.push_str(&format!(
            "- disk: fsync of a {} B write in {}: p50 {:.2} ms, p99 {:.2} ms\n",
            f.block_bytes,
            f.dir,
            f.latency.p50_us as f64 / 1000.0,
            f.latency.p99_us as f64 / 1000.0
        ));
    }
    for (name, r) in &report.results {
        s.push_str(&format!("- {name}: {}\n", r.settings));
    }
    s.push('\n');
    let names: Vec<&str> = report.results.keys().copied().collect();
    let ordered: Vec<&str> = ["lockd", "etcd", "zookeeper"]
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    s.push_str("| metric |");
    for n in &ordered {
        s.push_str(&format!(" {n} |"));
    }
    let has_lockd = ordered.contains(&"lockd");
    let peers: Vec<&str> = ordered.iter().copied().filter(|n| *n != "lockd").collect();
    if has_lockd {
        for p in &peers {
            s.push_str(&format!(" lockd vs {p} |"));
        }
    }
    s.push_str("\n|---|");
    for _ in &ordered {
        s.push_str("---|");
    }
    if has_lockd {
        for _ in &peers {
            s.push_str("---|");
        }
    }
    s.push('\n');
    // Rows in the order lockd (or the first system) reported them.
    let mut keys: Vec<(String, String, String, Better)> = Vec::new();
    for n in &ordered {
        for m in &report.results[n].metrics {
            if !keys.iter().any(|k| k.0 == m.key) {
                keys.push((m.key.clone(), m.label.clone(), m.unit.clone(), m.better));
            }
        }
    }
    let value = |n: &str, key: &str| -> f64 {
        report.results[n]
            .metrics
            .iter()
            .find(|m| m.key == key)
            .map_or(f64::NAN, |m| m.value)
    };
    for (key, label, unit, better) in &keys {
        s.push_str(&format!("| {label} |"));
        for n in &ordered {
            s.push_str(&format!(" {} |", fmt_value(value(n, key), unit)));
        }
        if has_lockd {
            for p in &peers {
                s.push_str(&format!(
                    " {} |",
                    advantage(value("lockd", key), value(p, key), *better)
                ));
            }
        }
        s.push('\n');
    }
    s.push_str("\n\"lockd vs X\" is X's value over lockd's for latencies, gaps, CPU and memory, and lockd's over X's for throughputs: above 1.00x lockd is ahead.\n");
    let mut notes = Vec::new();
    for n in &ordered {
        let r = &report.results[n];
        for m in &r.metrics {
            for note in &m.notes {
                notes.push(format!("- {n}, {}: {note}", m.label));
            }
        }
        for f in &r.failures {
            notes.push(format!("- {n} FAILED {f}"));
        }
    }
    if !notes.is_empty() {
        s.push_str("\nNotes:\n");
        s.push_str(&notes.join("\n"));
        s.push('\n');
    }
    s
}

fn install_peers() -> Result<()> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("install-peers");
    let status = std::process::Command::new(&script)
        .status()
        .with_context(|| format!("run {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}

/// `lockbench compare`.
pub async fn compare(a: CompareArgs) -> Result<bool> {
    if a.targets.is_empty() {
        bail!("--targets is empty");
    }
    if let Some(w) = a
        .workloads
        .iter()
        .find(|w| !WORKLOADS.contains(&w.as_str()))
    {
        bail!("unknown workload {w:?} (known: {})", WORKLOADS.join(", "));
    }
    let peers = a.targets.iter().any(|t| *t != Kind::Lockd);
    if peers && !a.no_install {
        install_peers()?;
    }
    let plan = if a.smoke {
        Plan::smoke()
    } else if a.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    let dir = tempfile::tempdir().context("temp dir for the fsync probe")?;
    let fsync = fsync::measure(dir.path(), if a.quick { 50 } else { 200 }).ok();
    let mut results = BTreeMap::new();
    let mut clean = true;
    for t in &a.targets {
        eprintln!("lockbench compare: running {}", t.name());
        match run_all(*t, &plan, &a.workloads).await {
            Ok(r) => {
                clean &= r.failures.is_empty();
                results.insert(t.name(), r);
            }
            Err(e) => {
                clean = false;
                results.insert(
                    t.name(),
                    SystemResult {
                        settings: "did not start".into(),
                        failures: vec![format!("{e:#}")],
                        ..Default::default()
                    },
                );
            }
        }
    }
    let report = CompareReport {
        machine: Machine::detect(),
        command: command_line(),
        plan,
        fsync,
        results,
    };
    println!("{}", table(&report));
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| anyhow!("json: {e}"))?;
        std::fs::write(path, json).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(clean)
}
