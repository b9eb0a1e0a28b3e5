//! The workloads of `lockbench compare`, written once against [`Conn`] and
//! [`System`], and the side-by-side table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use super::{connect, ConnectOptions, Kind, System};
use crate::procstat::{clk_tck, cpu_ticks, rss_kib};
use crate::workload::new_histogram;

/// Whether smaller or larger is better for a metric.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Latencies, gaps, CPU, memory.
    Lower,
    /// Throughputs.
    Higher,
}

/// One measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    /// Stable key, e.g. `write.1.p50_ms`.
    pub key: String,
    /// Human label for the table.
    pub label: String,
    /// Unit for the table ("ms", "ops/s", "%", "MiB").
    pub unit: String,
    /// The value (NaN when not measured).
    pub value: f64,
    /// Direction.
    pub better: Better,
    /// Notes (errors seen, anomalies).
    pub notes: Vec<String>,
}

/// Everything measured for one system.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SystemResult {
    /// The system's settings, as it reported them.
    pub settings: String,
    /// Figures in workload order.
    pub metrics: Vec<Metric>,
    /// Workloads that failed outright, with the reason.
    pub failures: Vec<String>,
}

impl SystemResult {
    fn push(&mut self, key: &str, label: &str, unit: &str, value: f64, better: Better) {
        self.metrics.push(Metric {
            key: key.into(),
            label: label.into(),
            unit: unit.into(),
            value,
            better,
            notes: Vec::new(),
        });
    }

    fn note(&mut self, note: String) {
        if let Some(m) = self.metrics.last_mut() {
            m.notes.push(note);
        }
    }
}

/// How long each part runs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Plan {
    /// Measured window of the closed-loop workloads.
    pub duration: Duration,
    /// Warm-up before it.
    pub warmup: Duration,
    /// Concurrent clients of the throughput workloads.
    pub clients: usize,
    /// Contenders on one lock.
    pub lock_contenders: usize,
    /// Uncontended lock rounds.
    pub lock_rounds: usize,
    /// Failover repetitions.
    pub failovers: usize,
    /// Watcher counts.
    pub watchers: [usize; 2],
    /// Puts per watch measurement.
    pub watch_puts: usize,
    /// Sessions held for the sessions workload.
    pub sessions: usize,
    /// Session (lease) TTL for every system.
    pub session_ttl: Duration,
    /// Value size of writes.
    pub value_size: usize,
}

impl Plan {
    /// The full run (several minutes per system).
    pub fn full() -> Plan {
        Plan {
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            clients: 64,
            lock_contenders: 16,
            lock_rounds: 200,
            failovers: 3,
            watchers: [100, 1000],
            watch_puts: 200,
            sessions: 10_000,
            session_ttl: Duration::from_secs(10),
            value_size: 100,
        }
    }

    /// `--smoke`: a few seconds per workload, small counts (CI runs it
    /// against lockd alone to keep the tool working).
    pub fn smoke() -> Plan {
        Plan {
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(100),
            clients: 8,
            lock_contenders: 4,
            lock_rounds: 10,
            failovers: 1,
            watchers: [10, 20],
            watch_puts: 10,
            sessions: 100,
            session_ttl: Duration::from_secs(3),
            value_size: 100,
        }
    }

    /// `--quick`: under a minute per system.
    pub fn quick() -> Plan {
        Plan {
            duration: Duration::from_secs(2),
            warmup: Duration::from_millis(300),
            lock_rounds: 50,
            failovers: 1,
            watch_puts: 50,
            sessions: 2_000,
            ..Plan::full()
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn q_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        f64::NAN
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
}

/// What a closed-loop client does.
#[derive(Clone, Copy, Debug)]
enum Op {
    Put,
    Get { linearizable: bool },
}

struct Loop {
    hist: Histogram<u64>,
    ops: u64,
    errors: u64,
    sample: Option<String>,
}

/// `clients` connections each doing `op` one at a time for the plan's
/// duration after its warm-up; returns the latency histogram, ops/s and
/// errors.
async fn closed_loop(
    kind: Kind,
    opts: &ConnectOptions,
    plan: &Plan,
    clients: usize,
    op: Op,
    tag: &str,
) -> Result<(Histogram<u64>, f64, u64, Option<String>)> {
    let mut conns = Vec::with_capacity(clients);
    for i in 0..clients {
        conns.push(connect(kind, opts, i).await?);
    }
    // Reads need their keys first: one per client.
    if let Op::Get { .. } = op {
        let value = vec![b'r'; plan.value_size];
        for (i, c) in conns.iter_mut().enumerate() {
            c.put(&format!("/lockbench/r/{tag}-{i}"), &value)
                .await
                .context("write the keys to read")?;
        }
    }
    let start = Instant::now();
    let from = start + plan.warmup;
    let end = from + plan.duration;
    let value = Arc::new(vec![b'x'; plan.value_size]);
    let mut tasks = Vec::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        let value = value.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut l = Loop {
                hist: new_histogram(),
                ops: 0,
                errors: 0,
                sample: None,
            };
            let mut seq = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let r = match op {
                    Op::Put => {
                        seq += 1;
                        c.put(&format!("/lockbench/w/{tag}-{i}-{}", seq % 1000), &value)
                            .await
                    }
                    Op::Get { linearizable } => {
                        c.get(&format!("/lockbench/r/{tag}-{i}"), linearizable)
                            .await
                    }
                };
                match r {
                    Ok(()) if t0 >= from => {
                        record(&mut l.hist, t0.elapsed());
                        l.ops += 1;
                    }
                    Ok(()) => {}
                    // Warm-up errors do not count (e.g. a serializable read
                    // on a member that has not applied the key's write yet).
                    Err(_) if t0 < from => {}
                    Err(e) => {
                        l.errors += 1;
                        l.sample.get_or_insert_with(|| format!("{e:#}"));
                        // Do not spin on an error that comes back at once.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            l
        }));
    }
    let mut hist = new_histogram();
    let (mut ops, mut errors, mut sample) = (0, 0, None);
    for t in tasks {
        let l = t.await?;
        hist.add(&l.hist)?;
        ops += l.ops;
        errors += l.errors;
        if sample.is_none() {
            sample = l.sample;
        }
    }
    Ok((
        hist,
        ops as f64 / plan.duration.as_secs_f64(),
        errors,
        sample,
    ))
}

fn note_errors(r: &mut SystemResult, errors: u64, sample: Option<String>) {
    if errors > 0 {
        r.note(format!(
            "{errors} errors, e.g. {}",
            sample.unwrap_or_default()
        ));
    }
}

async fn write_read(
    kind: Kind,
    opts: &ConnectOptions,
    plan: &Plan,
    r: &mut SystemResult,
) -> Result<()> {
    let (h, _, e, s) = closed_loop(kind, opts, plan, 1, Op::Put, "w1").await?;
    r.push(
        "write.1.p50_ms",
        "write, 1 client: p50",
        "ms",
        q_ms(&h, 0.5),
        Better::Lower,
    );
    r.push(
        "write.1.p99_ms",
        "write, 1 client: p99",
        "ms",
        q_ms(&h, 0.99),
        Better::Lower,
    );
    r.push(
        "write.1.p999_ms",
        "write, 1 client: p99.9",
        "ms",
        q_ms(&h, 0.999),
        Better::Lower,
    );
    note_errors(r, e, s);
    let (h, tput, e, s) = closed_loop(kind, opts, plan, plan.clients, Op::Put, "wn").await?;
    let label = format!("write, {} clients: throughput", plan.clients);
    r.push("write.n.ops", &label, "ops/s", tput, Better::Higher);
    note_errors(r, e, s);
    let label = format!("write, {} clients: p99", plan.clients);
    r.push(
        "write.n.p99_ms",
        &label,
        "ms",
        q_ms(&h, 0.99),
        Better::Lower,
    );
    for (lin, name) in [(true, "linearizable"), (false, "serializable")] {
        let (h, tput, e, s) = closed_loop(
            kind,
            opts,
            plan,
            plan.clients,
            Op::Get { linearizable: lin },
            &format!("r{}", u8::from(lin)),
        )
        .await?;
        let label = format!("read {name}, {} clients: throughput", plan.clients);
        r.push(
            &format!("read.{name}.ops"),
            &label,
            "ops/s",
            tput,
            Better::Higher,
        );
        note_errors(r, e, s);
        let label = format!("read {name}, {} clients: p50", plan.clients);
        r.push(
            &format!("read.{name}.p50_ms"),
            &label,
            "ms",
            q_ms(&h, 0.5),
            Better::Lower,
        );
    }
    Ok(())
}

async fn locks(kind: Kind, opts: &ConnectOptions, plan: &Plan, r: &mut SystemResult) -> Result<()> {
    // Uncontended: one client, its own lock.
    let mut c = connect(kind, opts, 0).await?;
    let mut h = new_histogram();
    let name = "/lockbench/locks/solo";
    // The first acquisition also opens the session: not measured.
    let key = c.lock(name).await.context("first lock")?;
    c.unlock(key).await.context("first unlock")?;
    for _ in 0..plan.lock_rounds {
        let t0 = Instant::now();
        let key = c.lock(name).await.context("lock")?;
        c.unlock(key).await.context("unlock")?;
        record(&mut h, t0.elapsed());
    }
    r.push(
        "lock.solo.p50_ms",
        "lock+unlock, uncontended: p50",
        "ms",
        q_ms(&h, 0.5),
        Better::Lower,
    );
    r.push(
        "lock.solo.p99_ms",
        "lock+unlock, uncontended: p99",
        "ms",
        q_ms(&h, 0.99),
        Better::Lower,
    );
    drop(c);

    // Contended: N clients on one lock, holding it for no time at all.
    let name = "/lockbench/locks/shared";
    let handovers = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut conns = Vec::new();
    for i in 0..plan.lock_contenders {
        let mut c = connect(kind, opts, i).await?;
        // Open the session before the clock starts.
        let k = c.lock(&format!("/lockbench/locks/warm-{i}")).await?;
        c.unlock(k).await?;
        conns.push(c);
    }
    let holders = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for mut c in conns {
        let (handovers, measuring, stop, holders) = (
            handovers.clone(),
            measuring.clone(),
            stop.clone(),
            holders.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let key = c.lock(name).await?;
                if holders.fetch_add(1, Ordering::SeqCst) != 0 {
                    bail!("two holders of {name} at once");
                }
                if measuring.load(Ordering::Relaxed) {
                    handovers.fetch_add(1, Ordering::Relaxed);
                }
                holders.fetch_sub(1, Ordering::SeqCst);
                c.unlock(key).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    tokio::time::sleep(plan.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(plan.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let n = handovers.load(Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let label = format!("lock, {} contenders: handovers", plan.lock_contenders);
    r.push(
        "lock.contended.ops",
        &label,
        "ops/s",
        n as f64 / secs,
        Better::Higher,
    );
    Ok(())
}

/// One writer writes one key at a time; the leader is killed; the longest
/// time between two acknowledged writes around the kill is the gap.
async fn failover(
    sys: &dyn System,
    opts: &ConnectOptions,
    plan: &Plan,
    r: &mut SystemResult,
) -> Result<()> {
    let kind = sys.kind();
    let mut gaps = Vec::new();
    for round in 0..plan.failovers {
        let leader = sys.leader().await?;
        // The writer prefers a member that survives, as a client would
        // after its first failover; it must still find the new leader.
        let pref = (leader + 1) % opts.endpoints.len();
        let mut c = connect(kind, opts, pref).await?;
        c.put("/lockbench/w/failover", b"0")
            .await
            .context("first write")?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ack_tx, mut ack_rx) = tokio::sync::watch::channel(Instant::now());
        let writer = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut acks: Vec<Instant> = Vec::new();
                let mut errors = 0u64;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let sent = Instant::now();
                    match c
                        .put("/lockbench/w/failover", i.to_string().as_bytes())
                        .await
                    {
                        Ok(()) => {
                            acks.push(Instant::now());
                            ack_tx.send_replace(sent);
                        }
                        Err(_) => errors += 1,
                    }
                }
                (acks, errors)
            })
        };
        // Steady writes before the kill.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let killed_at = Instant::now();
        sys.kill(leader)?;
        // The outage is over once a write *sent* after the kill is
        // acknowledged (one in flight at the kill may be acknowledged just
        // after it, before the outage); then a second more of writes.
        let recovered = tokio::time::timeout(
            Duration::from_secs(30),
            ack_rx.wait_for(|sent| *sent > killed_at),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        let (acks, errors) = writer.await?;
        // The longest pause between consecutive acknowledgements from the
        // last one before the kill on (a write in flight at the kill may
        // still be acknowledged just after it; the outage follows).
        let first = acks.iter().rposition(|a| *a <= killed_at);
        let gap = first.and_then(|i| {
            acks[i..]
                .windows(2)
                .map(|w| w[1].duration_since(w[0]))
                .max()
        });
        match gap {
            Some(g) if recovered && acks.last().is_some_and(|a| *a > killed_at) => gaps.push(g),
            _ => bail!(
                "round {round}: writes did not resume within 30 s after the kill ({errors} errors)"
            ),
        }
        sys.restart(leader).await?;
        sys.leader().await?;
    }
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    let worst = gaps[gaps.len() - 1];
    r.push(
        "failover.gap_ms",
        "leader kill -9: write gap (median)",
        "ms",
        ms(median),
        Better::Lower,
    );
    r.note(format!(
        "gaps: {}",
        gaps.iter()
            .map(|g| format!("{:.0} ms", ms(*g)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    r.push(
        "failover.worst_ms",
        "leader kill -9: write gap (worst)",
        "ms",
        ms(worst),
        Better::Lower,
    );
    Ok(())
}

/// A holder process is killed; the time until a waiter holds the lock.
async fn holder_crash(kind: Kind, opts: &ConnectOptions, r: &mut SystemResult) -> Result<()> {
    let exe = std::env::current_exe().context("lockbench's own path")?;
    let name = "/lockbench/locks/crash";
    let mut child = tokio::process::Command::new(exe)
        .args([
            "hold",
            "--target",
            kind.name(),
            "--endpoints",
            &opts.endpoints.join(","),
            "--ttl",
            &format!("{}ms", opts.session_ttl.as_millis()),
            name,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the holder process")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("holder stdout"))?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the holder did not report holding within 30 s")??
        .ok_or_else(|| anyhow!("the holder exited before holding"))?;
    if !line.starts_with("held ") {
        bail!("holder said {line:?}");
    }
    let mut waiter = connect(kind, opts, 1).await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let wait = tokio::spawn(async move {
        let r = waiter.lock(name).await;
        let _ = tx.send(Instant::now());
        r.map(|k| (waiter, k))
    });
    // Give the waiter time to queue (it must be waiting when the holder dies).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = Instant::now();
    child.start_kill().context("kill the holder")?;
    let _ = child.wait().await;
    let limit = opts.session_ttl * 3 + Duration::from_secs(10);
    let got = tokio::time::timeout(limit, rx)
        .await
        .with_context(|| format!("no waiter held the lock within {limit:?} after the holder died"))?
        .map_err(|_| anyhow!("waiter failed"))?;
    let (mut w, key) = wait.await??;
    w.unlock(key).await?;
    r.push(
        "holder_crash.ms",
        &format!(
            "holder killed: next holder after (TTL {} s)",
            opts.session_ttl.as_secs()
        ),
        "ms",
        ms(got.duration_since(killed_at)),
        Better::Lower,
    );
    Ok(())
}

/// One writer, N watchers of its key: put sent -> event received at each
/// watcher.
async fn watch(kind: Kind, opts: &ConnectOptions, plan: &Plan, r: &mut SystemResult) -> Result<()> {
    for &n in &plan.watchers {
        let key = format!("/lockbench/watch/k{n}");
        let mut writer = connect(kind, opts, 0).await?;
        writer.put(&key, b"start").await?;
        // Watchers share connections, 10 per connection (etcd and lockd
        // multiplex; ZooKeeper needs a session per watch of one path).
        let per_conn = if kind == Kind::Zookeeper { 1 } else { 10 };
        let mut conns = Vec::new();
        let mut rxs = Vec::new();
        for i in 0..n {
            if i % per_conn == 0 {
                conns.push(connect(kind, opts, i / per_conn).await?);
            }
            let c = conns.last_mut().ok_or_else(|| anyhow!("no connection"))?;
            rxs.push(c.watch(&key).await?);
        }
        let acked: Arc<std::sync::Mutex<BTreeMap<u64, Instant>>> = Arc::default();
        let mut tasks = Vec::new();
        let puts = plan.watch_puts as u64;
        for mut rx in rxs {
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat: Vec<Duration> = Vec::new();
                let mut next = 1u64;
                while next <= puts {
                    let Some(v) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                        .await
                        .ok()
                        .flatten()
                    else {
                        bail!("watcher stopped receiving at put {next}");
                    };
                    let now = Instant::now();
                    let Ok(seq) = String::from_utf8_lossy(&v).parse::<u64>() else {
                        continue;
                    };
                    if seq < next {
                        continue;
                    }
                    next = seq + 1;
                    let at = acked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&seq)
                        .copied();
                    lat.push(at.map_or(Duration::ZERO, |a| now.saturating_duration_since(a)));
                }
                Ok(lat)
            }));
        }
        for seq in 1..=puts {
            // Timed from the send: on loopback most events reach the
            // watchers before the put's acknowledgement reaches the writer,
            // so "acknowledged -> event" would mostly read 0.
            acked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(seq, Instant::now());
            writer.put(&key, seq.to_string().as_bytes()).await?;
            // Paced: one put per 20 ms, so this measures delivery, not a
            // backlog.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut h = new_histogram();
        let mut missing = 0usize;
        for t in tasks {
            match t.await? {
                Ok(lat) => {
                    missing += puts as usize - lat.len().min(puts as usize);
                    for d in lat {
                        record(&mut h, d);
                    }
                }
                Err(_) => missing += 1,
            }
        }
        r.push(
            &format!("watch.{n}.p50_ms"),
            &format!("watch, {n} watchers, put sent -> event: p50"),
            "ms",
            q_ms(&h, 0.5),
            Better::Lower,
        );
        r.push(
            &format!("watch.{n}.p99_ms"),
            &format!("watch, {n} watchers, put sent -> event: p99"),
            "ms",
            q_ms(&h, 0.99),
            Better::Lower,
        );
        if missing > 0 {
            r.note(format!(
                "{missing} events not delivered (coalesced or lost)"
            ));
        }
    }
    Ok(())
}

/// N live sessions: the leader's CPU and RSS, and write throughput beside
/// them.
async fn sessions(
    sys: &dyn System,
    opts: &ConnectOptions,
    plan: &Plan,
    r: &mut SystemResult,
) -> Result<()> {
    let held = sys.open_sessions(plan.sessions, plan.session_ttl).await?;
    // One keepalive period so the steady state is measured.
    tokio::time::sleep(plan.session_ttl / 3 + Duration::from_secs(1)).await;
    let leader = sys.leader().await?;
    let pid = sys
        .pid(leader)
        .ok_or_else(|| anyhow!("leader not running"))?;
    let tck = clk_tck();
    let t0 = Instant::now();
    let c0 = cpu_ticks(pid)?;
    tokio::time::sleep(plan.duration.max(Duration::from_secs(2))).await;
    let cpu = (cpu_ticks(pid)? - c0) as f64 / tck as f64 / t0.elapsed().as_secs_f64() * 100.0;
    let rss = rss_kib(pid)? as f64 / 1024.0;
    let label = format!("{} sessions: leader CPU (idle cluster)", held.len());
    r.push("sessions.leader_cpu_pct", &label, "%", cpu, Better::Lower);
    let label = format!("{} sessions: leader RSS", held.len());
    r.push("sessions.leader_rss_mib", &label, "MiB", rss, Better::Lower);
    let (_, tput, e, s) = closed_loop(sys.kind(), opts, plan, plan.clients, Op::Put, "ws").await?;
    let label = format!(
        "{} sessions: write throughput, {} clients",
        held.len(),
        plan.clients
    );
    r.push("sessions.write.ops", &label, "ops/s", tput, Better::Higher);
    note_errors(r, e, s);
    drop(held);
    Ok(())
}

/// Runs every workload against a fresh cluster of `kind`.
/// The workloads, by the names `--workloads` takes.
pub const WORKLOADS: [&str; 6] = [
    "write",
    "lock",
    "watch",
    "holder-crash",
    "sessions",
    "failover",
];

/// Runs the `only` workloads (all when empty) against a fresh cluster of
/// `kind`.
pub async fn run_all(kind: Kind, plan: &Plan, only: &[String]) -> Result<SystemResult> {
    let mut sys = super::start(kind).await?;
    let mut r = SystemResult {
        settings: sys.settings(),
        ..Default::default()
    };
    sys.prepare().await?;
    let mut opts = sys.connect_options();
    opts.session_ttl = plan.session_ttl;
    macro_rules! step {
        ($name:expr, $e:expr) => {
            if only.is_empty() || only.iter().any(|w| w == $name) {
                eprintln!("lockbench compare: {} {}", kind.name(), $name);
                if let Err(e) = $e {
                    eprintln!("lockbench compare: {} {} failed: {e:#}", kind.name(), $name);
                    r.failures.push(format!("{}: {e:#}", $name));
                }
            }
        };
    }
    step!("write", write_read(kind, &opts, plan, &mut r).await);
    step!("lock", locks(kind, &opts, plan, &mut r).await);
    step!("watch", watch(kind, &opts, plan, &mut r).await);
    step!("holder-crash", holder_crash(kind, &opts, &mut r).await);
    step!(
        "sessions",
        sessions(sys.as_ref(), &opts, plan, &mut r).await
    );
    step!(
        "failover",
        failover(sys.as_ref(), &opts, plan, &mut r).await
    );
    sys.stop().await?;
    Ok(r)
}
