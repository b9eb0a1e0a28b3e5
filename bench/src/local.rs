//! `lockbench local`: starts a 3-member lockd cluster with the e2e harness
//! and runs the standard suite against it.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use lockd_e2e::{Cluster, ClusterOptions};
use serde::Serialize;

use crate::fsync::{self, FsyncOutcome};
use crate::report::{ms, ops, row, Row};
use crate::target::Target;
use crate::workload::{self, Kind, Outcome, Spec};

/// How long the suite runs.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Full,
    Quick,
    Smoke,
}

impl Mode {
    fn duration(self) -> Duration {
        match self {
            Mode::Full => Duration::from_secs(10),
            Mode::Quick => Duration::from_secs(3),
            Mode::Smoke => Duration::from_secs(1),
        }
    }
    fn warmup(self) -> Duration {
        match self {
            Mode::Full => Duration::from_secs(1),
            Mode::Quick => Duration::from_millis(500),
            Mode::Smoke => Duration::from_millis(200),
        }
    }
    fn fsync_iterations(self) -> usize {
        match self {
            Mode::Full => 200,
            Mode::Quick => 100,
            Mode::Smoke => 20,
        }
    }
}

/// Sum and count of a Prometheus histogram, per member.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HistDelta {
    pub sum: f64,
    pub count: f64,
}

impl HistDelta {
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }
}

/// Group-commit evidence from the members' /metrics around the 64-client run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GroupCommit {
    pub leader: u64,
    /// `lockd_log_fsync_batch_requests` delta per member id.
    pub batch: BTreeMap<u64, HistDelta>,
    /// `lockd_log_fsync_seconds` delta per member id.
    pub fsync_seconds: BTreeMap<u64, HistDelta>,
    /// `lockd_raft_last_log_index` delta per member id (log entries appended).
    pub log_entries: BTreeMap<u64, f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SuiteResult {
    pub mode: Mode,
    pub leader: u64,
    pub fsync: FsyncOutcome,
    pub workloads: Vec<Outcome>,
    pub group_commit: Option<GroupCommit>,
    /// Problems that did not stop the suite (e.g. a failed metrics scrape).
    pub notes: Vec<String>,
}

impl SuiteResult {
    /// Every workload completed at least one op without errors.
    pub fn clean(&self) -> bool {
        !self.workloads.is_empty() && self.workloads.iter().all(Outcome::clean)
    }
}

fn hist_from_metrics(text: &str, name: &str) -> Option<HistDelta> {
    let find = |suffix: &str| -> Option<f64> {
        let want = format!("{name}_{suffix}");
        text.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            let metric = it.next()?;
            if metric == want || metric.starts_with(&format!("{want}{{")) {
                it.next()?.parse::<f64>().ok()
            } else {
                None
            }
        })
    };
    Some(HistDelta {
        sum: find("sum")?,
        count: find("count")?,
    })
}

pub(crate) fn gauge_from_metrics(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == name).then(|| it.next()?.parse::<f64>().ok())?
    })
}

type Scrape = BTreeMap<u64, (HistDelta, HistDelta, f64)>;

async fn scrape(cluster: &Cluster) -> Result<Scrape> {
    let mut out = BTreeMap::new();
    for id in cluster.ids() {
        let (code, body) =
            lockd_e2e::http_get(&cluster.http_addr(id), "/metrics", Duration::from_secs(5))
                .await
                .with_context(|| format!("scrape member {id}"))?;
        if code != 200 {
            return Err(anyhow!("member {id} /metrics answered {code}"));
        }
        let batch = hist_from_metrics(&body, "lockd_log_fsync_batch_requests")
            .ok_or_else(|| anyhow!("member {id}: no lockd_log_fsync_batch_requests"))?;
        let secs = hist_from_metrics(&body, "lockd_log_fsync_seconds")
            .ok_or_else(|| anyhow!("member {id}: no lockd_log_fsync_seconds"))?;
        let last = gauge_from_metrics(&body, "lockd_raft_last_log_index")
            .ok_or_else(|| anyhow!("member {id}: no lockd_raft_last_log_index"))?;
        out.insert(id, (batch, secs, last));
    }
    Ok(out)
}

fn delta(before: &Scrape, after: &Scrape, leader: u64) -> GroupCommit {
    let mut gc = GroupCommit {
        leader,
        ..Default::default()
    };
    for (id, (b1, s1, l1)) in after {
        let (b0, s0, l0) = before.get(id).cloned().unwrap_or_default();
        gc.log_entries.insert(*id, l1 - l0);
        gc.batch.insert(
            *id,
            HistDelta {
                sum: b1.sum - b0.sum,
                count: b1.count - b0.count,
            },
        );
        gc.fsync_seconds.insert(
            *id,
            HistDelta {
                sum: s1.sum - s0.sum,
                count: s1.count - s0.count,
            },
        );
    }
    gc
}

/// Starts a 3-member cluster with production-like timeouts (heartbeat
/// 100 ms, election timeout 1 s) and waits for its leader.
pub(crate) async fn start_cluster() -> Result<(Cluster, u64)> {
    let opts = ClusterOptions {
        heartbeat_ms: 100,
        election_timeout_ms: 1000,
        ..ClusterOptions::default()
    };
    eprintln!("lockbench: starting a 3-member lockd cluster");
    let cluster = Cluster::start(3, opts)
        .await
        .context("start the lockd cluster")?;
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .context("wait for a leader")?;
    eprintln!("lockbench: leader is member {leader}");
    Ok((cluster, leader))
}

/// Notes on what happened to the cluster during a measurement (`during`:
/// "the run", "the suite"): leadership moved away from `leader` (asked with
/// a 5 s bound), or a member exited.
pub(crate) async fn cluster_notes(cluster: &Cluster, leader: u64, during: &str) -> Vec<String> {
    let mut notes = Vec::new();
    if let Ok(now) = cluster.wait_for_leader(Duration::from_secs(5)).await {
        if now != leader {
            notes.push(format!(
                "leadership moved from member {leader} to {now} during {during}"
            ));
        }
    }
    for id in cluster.ids() {
        if let Some(st) = cluster.exit_status(id) {
            notes.push(format!("member {id} exited during {during}: {st}"));
        }
    }
    notes
}

/// Starts the cluster and runs the suite.
pub async fn run_suite(target: &dyn Target, mode: Mode) -> Result<SuiteResult> {
    let (cluster, leader) = crate::local::start_cluster().await?;
    let mut notes = Vec::new();

    let root = cluster.root().to_path_buf();
    let iterations = mode.fsync_iterations();
    eprintln!("lockbench: fsync latency ({iterations} x 4 KiB + sync_data)");
    let fsync = tokio::task::spawn_blocking(move || fsync::measure(&root, iterations))
        .await?
        .context("fsync measurement")?;

    let all = cluster.endpoints();
    let leader_ep = vec![cluster.endpoint(leader)];
    let base = |name: &str, kind: Kind, serializable: bool, clients: usize, eps: &[String]| Spec {
        name: name.to_string(),
        kind,
        serializable,
        clients,
        duration: mode.duration(),
        warmup: mode.warmup(),
        value_size: 100,
        read_keys: 1000,
        endpoints: eps.to_vec(),
    };
    let specs = [
        base("write, 1 client", Kind::Write, false, 1, &leader_ep),
        base("write, 64 clients", Kind::Write, false, 64, &leader_ep),
        base("linearizable read, 16 clients", Kind::Read, false, 16, &all),
        base("serializable read, 16 clients", Kind::Read, true, 16, &all),
    ];
    let mut workloads = Vec::new();
    let mut group_commit = None;
    for spec in &specs {
        eprintln!(
            "lockbench: {} for {:?} (+{:?} warm-up)",
            spec.name, spec.duration, spec.warmup
        );
        let is_64 = spec.kind == Kind::Write && spec.clients == 64;
        let before = if is_64 {
            match scrape(&cluster).await {
                Ok(s) => Some(s),
                Err(e) => {
                    notes.push(format!("metrics scrape before the 64-client run: {e:#}"));
                    None
                }
            }
        } else {
            None
        };
        let out = workload::run(target, spec)
            .await
            .with_context(|| format!("workload {:?}", spec.name))?;
        if let Some(before) = before {
            match scrape(&cluster).await {
                Ok(after) => group_commit = Some(delta(&before, &after, leader)),
                Err(e) => notes.push(format!("metrics scrape after the 64-client run: {e:#}")),
            }
        }
        eprintln!(
            "lockbench:   {} ops, {} errors, {:.0} ops/s",
            out.ops, out.errors, out.ops_per_sec
        );
        workloads.push(out);
    }
    notes.extend(cluster_notes(&cluster, leader, "the suite").await);
    Ok(SuiteResult {
        mode,
        leader,
        fsync,
        workloads,
        group_commit,
        notes,
    })
}

/// Rows of one workload outcome.
pub fn workload_rows(o: &Outcome, with_p999: bool) -> Vec<Row> {
    let n = &o.spec.name;
    let l = &o.latency;
    let mut rows = vec![
        row(format!("{n}: throughput"), ops(o.ops_per_sec)),
        row(
            format!("{n}: latency p50 / p99"),
            format!("{} / {}", ms(l.p50_us), ms(l.p99_us)),
        ),
    ];
    if with_p999 {
        rows.push(row(
            format!("{n}: latency p99.9 / max"),
            format!("{} / {}", ms(l.p999_us), ms(l.max_us)),
        ));
    }
    rows.push(row(
        format!("{n}: ops / errors"),
        format!("{} / {}", o.ops, o.errors + o.warmup_errors),
    ));
    rows
}

/// The suite's table rows.
pub fn rows(r: &SuiteResult) -> Vec<Row> {
    let mut rows = vec![row(
        format!(
            "disk: {} B write + fdatasync, p50 / p99 ({} rounds)",
            r.fsync.block_bytes, r.fsync.iterations
        ),
        format!(
            "{} / {}",
            ms(r.fsync.latency.p50_us),
            ms(r.fsync.latency.p99_us)
        ),
    )];
    if r.fsync.latency.p50_us > 0 {
        rows.push(row(
            "disk: 1 / fsync p50 (sequential fsyncs per second)",
            format!("{:.0} /s", 1e6 / r.fsync.latency.p50_us as f64),
        ));
    }
    for o in &r.workloads {
        rows.extend(workload_rows(o, o.spec.clients == 1));
    }
    if let Some(gc) = &r.group_commit {
        for (id, b) in &gc.batch {
            let role = if *id == gc.leader {
                "leader"
            } else {
                "follower"
            };
            let fs = gc.fsync_seconds.get(id).and_then(HistDelta::mean);
            let entries = gc.log_entries.get(id).copied().unwrap_or(0.0);
            rows.push(row(
                format!("64-client write, member {id} ({role}): append requests per fsync (avg) / fsyncs / log entries per fsync / server fsync avg"),
                format!(
                    "{} / {:.0} / {} / {}",
                    b.mean().map_or("n/a".into(), |m| format!("{m:.1}")),
                    b.count,
                    if b.count > 0.0 { format!("{:.1}", entries / b.count) } else { "n/a".into() },
                    fs.map_or("n/a".into(), |s| format!("{:.2} ms", s * 1000.0)),
                ),
            ));
        }
    }
    rows
}
