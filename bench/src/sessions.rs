//! `lockbench sessions`: what N live sessions cost a 3-member lockd cluster.
//!
//! Starts a local cluster with the e2e harness (heartbeat 100 ms, election
//! timeout 1000 ms, like `local`), then:
//!
//! 1. baseline: the leader's idle CPU for D seconds, then the 64-client write
//!    workload with the leader's CPU and RSS;
//! 2. opens N sessions (64 at a time, spread over all members) and keeps
//!    them alive every TTL/3 over a few `KeepAlive` streams spread over the
//!    members (one keeper task per stream, its ids paced evenly); waits one
//!    keepalive period plus a second so the leader's checkpoints settle;
//! 3. with the sessions alive: idle leader CPU for D seconds, then the same
//!    64-client write run;
//! 4. stops the keepers and closes every session.
//!
//! Around the phases it scrapes the leader's `lockd_raft_last_log_index`
//! (entries appended: checkpoints, opens, closes) and every member's
//! `lockd_grpc_requests_total{method="Session/KeepAlive"}`.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use lockd_e2e::Cluster;
use lockd_proto::v1::session_client::SessionClient;
use lockd_proto::v1::{CloseSessionRequest, KeepAliveRequest, OpenSessionRequest};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::local::gauge_from_metrics;
use crate::procstat::{clk_tck, rss_kib, CpuWindow, Probe};
use crate::report::{ms, ops, row, Row};
use crate::target::{http_uri, Target};
use crate::workload::{self, new_histogram, Kind, Latency, Outcome, Spec};

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct Options {
    pub sessions: usize,
    #[serde(serialize_with = "ser_ms")]
    pub ttl: Duration,
    pub quick: bool,
    /// Concurrent Open (and Close) calls.
    pub open_concurrency: usize,
    /// KeepAlive streams.
    pub streams: usize,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl Options {
    fn window(&self) -> Duration {
        Duration::from_secs(if self.quick { 3 } else { 10 })
    }
    fn warmup(&self) -> Duration {
        if self.quick {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(1)
        }
    }
}

/// Open or Close of every session.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Bulk {
    pub ok: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub seconds: f64,
    pub per_sec: f64,
    pub latency: Latency,
}

/// The keepers' view of the keepalives.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KeepAliveStats {
    pub streams: usize,
    pub interval_ms: u64,
    pub sent: u64,
    pub ok: u64,
    /// Failed keepalives (includes `expired`) plus requests left unanswered
    /// when a stream broke.
    pub errors: u64,
    /// Answers "session expired".
    pub expired: u64,
    /// Streams re-opened after an error.
    pub reconnects: u64,
    /// Answers for another session than the oldest outstanding request.
    pub out_of_order: u64,
    pub error_samples: Vec<String>,
    pub seconds: f64,
    pub per_sec: f64,
    /// Every answered keepalive.
    pub latency: Latency,
    /// While the leader was otherwise idle.
    pub latency_idle: Latency,
    /// During the 64-client write run.
    pub latency_writes: Latency,
    /// Idle and during writes, by the member the stream went to.
    pub latency_idle_by_member: BTreeMap<u64, Latency>,
    pub latency_writes_by_member: BTreeMap<u64, Latency>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SessionsResult {
    pub options: Options,
    pub leader: u64,
    pub granted_ttl_ms: u64,
    pub clk_tck: u64,
    pub baseline_idle: CpuWindow,
    pub baseline_write: Outcome,
    pub baseline_write_cpu: CpuWindow,
    pub open: Bulk,
    pub settle_s: f64,
    pub keepalive: KeepAliveStats,
    pub sessions_idle: CpuWindow,
    pub sessions_write: Outcome,
    pub sessions_write_cpu: CpuWindow,
    pub close: Bulk,
    /// Leader RSS (KiB) after the sessions were closed.
    pub leader_rss_after_close_kib: Option<u64>,
    /// Leader `lockd_raft_last_log_index` delta per phase.
    pub log_entries: BTreeMap<String, f64>,
    /// `lockd_grpc_requests_total{method="Session/KeepAlive"}` delta per
    /// member id and code, from before the opens to after the keepers stop.
    pub keepalive_requests: BTreeMap<u64, BTreeMap<String, f64>>,
    pub notes: Vec<String>,
}

impl SessionsResult {
    pub fn clean(&self) -> bool {
        self.baseline_write.clean()
            && self.sessions_write.clean()
            && self.open.errors == 0
            && self.open.ok > 0
            && self.keepalive.errors == 0
            && self.keepalive.ok > 0
            && self.close.errors == 0
    }
}

// ---------------------------------------------------------------- metrics

async fn metrics_text(cluster: &Cluster, id: u64) -> Result<String> {
    let (code, body) =
        lockd_e2e::http_get(&cluster.http_addr(id), "/metrics", Duration::from_secs(5))
            .await
            .with_context(|| format!("scrape member {id}"))?;
    if code != 200 {
        bail!("member {id} /metrics answered {code}");
    }
    Ok(body)
}

async fn last_log_index(cluster: &Cluster, id: u64) -> Result<f64> {
    let body = metrics_text(cluster, id).await?;
    gauge_from_metrics(&body, "lockd_raft_last_log_index")
        .ok_or_else(|| anyhow!("member {id}: no lockd_raft_last_log_index"))
}

/// `lockd_grpc_requests_total` samples of `method`, by code.
fn requests_by_code(text: &str, method: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("lockd_grpc_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let mut m = None;
        let mut code = String::new();
        for kv in labels.split(',') {
            if let Some((k, val)) = kv.split_once('=') {
                let val = val.trim_matches('"');
                match k.trim() {
                    "method" => m = Some(val.to_string()),
                    "code" => code = val.to_string(),
                    _ => {}
                }
            }
        }
        if m.as_deref() == Some(method) {
            *out.entry(code).or_insert(0.0) += v;
        }
    }
    out
}

async fn keepalive_counts(cluster: &Cluster) -> Result<BTreeMap<u64, BTreeMap<String, f64>>> {
    let mut out = BTreeMap::new();
    for id in cluster.ids() {
        let body = metrics_text(cluster, id).await?;
        out.insert(id, requests_by_code(&body, "Session/KeepAlive"));
    }
    Ok(out)
}

// ---------------------------------------------------------------- clients

fn channel(ep: &str, timeout: Option<Duration>) -> Result<Channel> {
    let mut e = Endpoint::from_shared(http_uri(ep))
        .with_context(|| format!("invalid endpoint {ep:?}"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true);
    if let Some(t) = timeout {
        e = e.timeout(t);
    }
    Ok(e.connect_lazy())
}

const MAX_SAMPLES: usize = 5;

fn push_sample(samples: &mut Vec<String>, s: String) {
    if samples.len() < MAX_SAMPLES && !samples.contains(&s) {
        samples.push(s);
    }
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
}

/// Opens `n` sessions, `conc` calls at a time over `endpoints`; returns the
/// ids, the granted TTL and the outcome.
pub(crate) async fn open_all(
    endpoints: &[String],
    n: usize,
    ttl_ms: u64,
    conc: usize,
) -> Result<(Vec<u64>, u64, Bulk)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conc.clamp(1, n.max(1)) {
        let ch = channel(
            &endpoints[w % endpoints.len()],
            Some(Duration::from_secs(10)),
        )?;
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = SessionClient::new(ch);
            let (mut ids, mut granted) = (Vec::new(), 0u64);
            let (mut hist, mut errors, mut samples) = (new_histogram(), 0u64, Vec::new());
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t0 = Instant::now();
                match c.open(OpenSessionRequest { ttl_ms }).await {
                    Ok(r) => {
                        record(&mut hist, t0.elapsed());
                        let r = r.into_inner();
                        ids.push(r.session_id);
                        granted = r.ttl_ms;
                    }
                    Err(s) => {
                        errors += 1;
                        push_sample(&mut samples, format!("open: {}: {}", s.code(), s.message()));
                    }
                }
            }
            (ids, granted, hist, errors, samples)
        }));
    }
    let (mut ids, mut granted, mut hist, mut bulk) =
        (Vec::new(), 0, new_histogram(), Bulk::default());
    for t in tasks {
        let (i, g, h, e, s) = t.await?;
        ids.extend(i);
        granted = granted.max(g);
        hist.add(&h)?;
        bulk.errors += e;
        for s in s {
            push_sample(&mut bulk.error_samples, s);
        }
    }
    finish_bulk(&mut bulk, ids.len() as u64, started, &hist);
    Ok((ids, granted, bulk))
}

fn finish_bulk(b: &mut Bulk, ok: u64, started: Instant, hist: &Histogram<u64>) {
    b.ok = ok;
    b.seconds = started.elapsed().as_secs_f64();
    b.per_sec = if b.seconds > 0.0 {
        ok as f64 / b.seconds
    } else {
        0.0
    };
    b.latency = Latency::of(hist);
}

/// Closes `ids`, `conc` calls at a time over `endpoints`.
async fn close_all(endpoints: &[String], ids: Vec<u64>, conc: usize) -> Result<Bulk> {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conc.clamp(1, ids.len().max(1)) {
        let ch = channel(
            &endpoints[w % endpoints.len()],
            Some(Duration::from_secs(10)),
        )?;
        let (ids, next) = (ids.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = SessionClient::new(ch);
            let (mut ok, mut hist, mut errors, mut samples) =
                (0u64, new_histogram(), 0u64, Vec::new());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&session_id) = ids.get(i) else { break };
                let t0 = Instant::now();
                match c.close(CloseSessionRequest { session_id }).await {
                    Ok(_) => {
                        record(&mut hist, t0.elapsed());
                        ok += 1;
                    }
                    Err(s) => {
                        errors += 1;
                        push_sample(
                            &mut samples,
                            format!("close: {}: {}", s.code(), s.message()),
                        );
                    }
                }
            }
            (ok, hist, errors, samples)
        }));
    }
    let (mut ok, mut hist, mut bulk) = (0, new_histogram(), Bulk::default());
    for t in tasks {
        let (o, h, e, s) = t.await?;
        ok += o;
        hist.add(&h)?;
        bulk.errors += e;
        for s in s {
            push_sample(&mut bulk.error_samples, s);
        }
    }
    finish_bulk(&mut bulk, ok, started, &hist);
    Ok(bulk)
}

/// Keepalive phases, for the per-phase latency histograms.
const SETTLE: usize = 0;
const IDLE: usize = 1;
const WRITES: usize = 2;

struct KeeperResult {
    hist: [Histogram<u64>; 3],
    sent: u64,
    ok: u64,
    errors: u64,
    expired: u64,
    reconnects: u64,
    out_of_order: u64,
    samples: Vec<String>,
}

/// Keeps `ids` alive over one KeepAlive stream: one request every
/// `interval / ids.len()`, starting at `first`, until `stop` reads true.
async fn keeper(
    ch: Channel,
    ids: Vec<u64>,
    interval: Duration,
    first: Instant,
    phase: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> KeeperResult {
    let mut r = KeeperResult {
        hist: [new_histogram(), new_histogram(), new_histogram()],
        sent: 0,
        ok: 0,
        errors: 0,
        expired: 0,
        reconnects: 0,
        out_of_order: 0,
        samples: Vec::new(),
    };
    if ids.is_empty() {
        return r;
    }
    let gap = interval / ids.len() as u32;
    let mut ticker = tokio::time::interval_at(first, gap.max(Duration::from_micros(1)));
    let mut dead: HashSet<u64> = HashSet::new();
    let mut next = 0usize;
    'outer: loop {
        if *stop.borrow() {
            break;
        }
        let (tx, rx) = mpsc::channel::<KeepAliveRequest>(4096);
        let mut client = SessionClient::new(ch.clone());
        let mut stream = match client.keep_alive(ReceiverStream::new(rx)).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                r.errors += 1;
                r.reconnects += 1;
                push_sample(
                    &mut r.samples,
                    format!("keepalive stream: {}: {}", s.code(), s.message()),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // (session id, sent at, phase) of the unanswered requests, in order.
        let mut inflight: VecDeque<(u64, Instant, usize)> = VecDeque::new();
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if dead.len() == ids.len() {
                        continue;
                    }
                    let mut id = ids[next % ids.len()];
                    while dead.contains(&id) {
                        next += 1;
                        id = ids[next % ids.len()];
                    }
                    next += 1;
                    inflight.push_back((id, Instant::now(), phase.load(Ordering::Relaxed)));
                    r.sent += 1;
                    if tx.send(KeepAliveRequest { session_id: id }).await.is_err() {
                        // The stream is gone; its error arrives on `stream`.
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        let now = Instant::now();
                        match inflight.pop_front() {
                            Some((id, t0, ph)) => {
                                if id != resp.session_id {
                                    r.out_of_order += 1;
                                }
                                record(&mut r.hist[ph], now.duration_since(t0));
                                r.ok += 1;
                            }
                            None => r.out_of_order += 1,
                        }
                    }
                    other => {
                        let front = inflight.pop_front();
                        match other {
                            Err(s) => {
                                r.errors += 1;
                                if s.message().starts_with("session expired") {
                                    r.expired += 1;
                                    if let Some((id, _, _)) = front {
                                        dead.insert(id);
                                    }
                                }
                                push_sample(&mut r.samples, format!("keepalive: {}: {}", s.code(), s.message()));
                            }
                            _ => {
                                if front.is_some() {
                                    r.errors += 1;
                                }
                                push_sample(&mut r.samples, "keepalive stream ended by the server".into());
                            }
                        }
                        // Requests behind the failed one were never answered.
                        r.errors += inflight.len() as u64;
                        r.reconnects += 1;
                        continue 'outer;
                    }
                },
                _ = stop.changed() => break 'outer,
            }
        }
    }
    r
}

/// Runs the keepers, waits for the answers still in flight and sums up.
pub(crate) struct Keepers {
    stop: watch::Sender<bool>,
    /// (member id the stream goes to, task).
    tasks: Vec<(u64, tokio::task::JoinHandle<KeeperResult>)>,
    started: Instant,
    phase: Arc<AtomicUsize>,
    interval: Duration,
}

impl Keepers {
    pub(crate) fn start(
        members: &[(u64, String)],
        ids: &[u64],
        streams: usize,
        interval: Duration,
    ) -> Result<Self> {
        let streams = streams.clamp(1, ids.len().max(1));
        let (stop, stop_rx) = watch::channel(false);
        let phase = Arc::new(AtomicUsize::new(SETTLE));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for k in 0..streams {
            let mine: Vec<u64> = ids.iter().skip(k).step_by(streams).copied().collect();
            let (member, ep) = &members[k % members.len()];
            let ch = channel(ep, None)?;
            // Stagger the streams over one gap.
            let gap = interval / mine.len().max(1) as u32;
            let first = started + gap * k as u32 / streams as u32;
            tasks.push((
                *member,
                tokio::spawn(keeper(
                    ch,
                    mine,
                    interval,
                    first,
                    phase.clone(),
                    stop_rx.clone(),
                )),
            ));
        }
        Ok(Keepers {
            stop,
            tasks,
            started,
            phase,
            interval,
        })
    }

    fn set_phase(&self, p: usize) {
        self.phase.store(p, Ordering::Relaxed);
    }

    async fn stop(self) -> Result<KeepAliveStats> {
        let streams = self.tasks.len();
        let _ = self.stop.send(true);
        let seconds = self.started.elapsed().as_secs_f64();
        let mut all = [new_histogram(), new_histogram(), new_histogram()];
        let mut s = KeepAliveStats {
            streams,
            interval_ms: self.interval.as_millis() as u64,
            seconds,
            ..Default::default()
        };
        let mut by_member: BTreeMap<u64, [Histogram<u64>; 3]> = BTreeMap::new();
        for (member, t) in self.tasks {
            let r = t.await?;
            let m = by_member
                .entry(member)
                .or_insert_with(|| [new_histogram(), new_histogram(), new_histogram()]);
            for (a, h) in m.iter_mut().zip(r.hist.iter()) {
                a.add(h)?;
            }
            for (a, h) in all.iter_mut().zip(r.hist.iter()) {
                a.add(h)?;
            }
            s.sent += r.sent;
            s.ok += r.ok;
            s.errors += r.errors;
            s.expired += r.expired;
            s.reconnects += r.reconnects;
            s.out_of_order += r.out_of_order;
            for m in r.samples {
                push_sample(&mut s.error_samples, m);
            }
        }
        // Requests still in flight at the stop are neither ok nor errors.
        let mut total = new_histogram();
        for h in &all {
            total.add(h)?;
        }
        s.per_sec = if seconds > 0.0 {
            s.ok as f64 / seconds
        } else {
            0.0
        };
        s.latency = Latency::of(&total);
        s.latency_idle = Latency::of(&all[IDLE]);
        s.latency_writes = Latency::of(&all[WRITES]);
        for (member, h) in &by_member {
            s.latency_idle_by_member
                .insert(*member, Latency::of(&h[IDLE]));
            s.latency_writes_by_member
                .insert(*member, Latency::of(&h[WRITES]));
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------- the run

async fn write_run(
    target: &dyn Target,
    probe: &Probe,
    leader_ep: &str,
    o: &Options,
    name: &str,
) -> Result<(Outcome, CpuWindow)> {
    let spec = Spec {
        name: name.to_string(),
        kind: Kind::Write,
        serializable: false,
        clients: 64,
        duration: o.window(),
        warmup: o.warmup(),
        value_size: 100,
        read_keys: 0,
        endpoints: vec![leader_ep.to_string()],
    };
    eprintln!(
        "lockbench: {name} for {:?} (+{:?} warm-up)",
        spec.duration, spec.warmup
    );
    let a = probe.sample()?;
    let out = workload::run(target, &spec)
        .await
        .with_context(|| format!("workload {name:?}"))?;
    let b = probe.sample()?;
    eprintln!(
        "lockbench:   {} ops, {} errors, {:.0} ops/s, p99 {}",
        out.ops,
        out.errors,
        out.ops_per_sec,
        ms(out.latency.p99_us)
    );
    Ok((out, probe.window(&a, &b)?))
}

async fn idle(probe: &Probe, d: Duration) -> Result<CpuWindow> {
    let a = probe.sample()?;
    tokio::time::sleep(d).await;
    let b = probe.sample()?;
    probe.window(&a, &b)
}

/// Leader log index now, or a note.
async fn log_index(cluster: &Cluster, leader: u64, notes: &mut Vec<String>) -> Option<f64> {
    match last_log_index(cluster, leader).await {
        Ok(v) => Some(v),
        Err(e) => {
            notes.push(format!("log index scrape: {e:#}"));
            None
        }
    }
}

fn put_delta(m: &mut BTreeMap<String, f64>, what: &str, a: Option<f64>, b: Option<f64>) {
    if let (Some(a), Some(b)) = (a, b) {
        m.insert(what.to_string(), b - a);
    }
}

pub async fn run(target: &dyn Target, o: Options) -> Result<SessionsResult> {
    if o.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    let interval = o.ttl / 3;
    if interval < Duration::from_millis(10) {
        bail!("--ttl too short");
    }
    let (cluster, leader) = crate::local::start_cluster().await?;
    let mut notes = Vec::new();
    let tck = clk_tck();
    let probe = Probe::members(&cluster, tck)?;
    let all = cluster.endpoints();
    let leader_ep = cluster.endpoint(leader);
    let mut log_entries = BTreeMap::new();
    // Let the start-up (elections, first entries) die down.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 1. Baseline.
    eprintln!("lockbench: baseline idle for {:?}", o.window());
    let l0 = log_index(&cluster, leader, &mut notes).await;
    let baseline_idle = idle(&probe, o.window()).await?;
    let l1 = log_index(&cluster, leader, &mut notes).await;
    put_delta(&mut log_entries, "baseline idle", l0, l1);
    let (baseline_write, baseline_write_cpu) = write_run(
        target,
        &probe,
        &leader_ep,
        &o,
        "write, 64 clients, no sessions",
    )
    .await?;

    // 2. Open and keep alive.
    let ka_before = match keepalive_counts(&cluster).await {
        Ok(c) => Some(c),
        Err(e) => {
            notes.push(format!("metrics scrape before the sessions: {e:#}"));
            None
        }
    };
    eprintln!(
        "lockbench: opening {} sessions (TTL {:?}, {} at a time over {} members)",
        o.sessions,
        o.ttl,
        o.open_concurrency,
        all.len()
    );
    let l2 = log_index(&cluster, leader, &mut notes).await;
    let (ids, granted, open) = open_all(
        &all,
        o.sessions,
        o.ttl.as_millis() as u64,
        o.open_concurrency,
    )
    .await?;
    let l3 = log_index(&cluster, leader, &mut notes).await;
    put_delta(&mut log_entries, "open", l2, l3);
    eprintln!(
        "lockbench:   {} opened ({:.0}/s), {} errors, granted TTL {} ms",
        open.ok, open.per_sec, open.errors, granted
    );
    if ids.is_empty() {
        bail!("no session opened: {:?}", open.error_samples);
    }
    if granted != o.ttl.as_millis() as u64 {
        notes.push(format!(
            "requested TTL {} ms, granted {granted} ms; keepalives still every requested TTL/3",
            o.ttl.as_millis()
        ));
    }
    let members: Vec<(u64, String)> = cluster
        .running_ids()
        .into_iter()
        .map(|id| (id, cluster.endpoint(id)))
        .collect();
    let keepers = Keepers::start(&members, &ids, o.streams, interval)?;
    // One keepalive round plus a second: the leader checkpoints the
    // remaining TTLs of sessions not yet renewed; after their first renewal
    // live sessions settle.
    let settle = interval + Duration::from_secs(1);
    eprintln!(
        "lockbench: keeping them alive every {interval:?} over {} streams; settling for {settle:?}",
        o.streams.min(ids.len())
    );
    tokio::time::sleep(settle).await;
    let l4 = log_index(&cluster, leader, &mut notes).await;
    put_delta(&mut log_entries, "open .. settled", l3, l4);

    // 3. With the sessions alive.
    eprintln!("lockbench: idle with sessions for {:?}", o.window());
    keepers.set_phase(IDLE);
    let sessions_idle = idle(&probe, o.window()).await?;
    let l5 = log_index(&cluster, leader, &mut notes).await;
    put_delta(&mut log_entries, "idle with sessions", l4, l5);
    keepers.set_phase(WRITES);
    let (sessions_write, sessions_write_cpu) = write_run(
        target,
        &probe,
        &leader_ep,
        &o,
        &format!("write, 64 clients, {} sessions", ids.len()),
    )
    .await?;
    let keepalive = keepers.stop().await?;
    eprintln!(
        "lockbench: keepalives: {} ok ({:.0}/s), {} errors, p50 {} p99 {}",
        keepalive.ok,
        keepalive.per_sec,
        keepalive.errors,
        ms(keepalive.latency.p50_us),
        ms(keepalive.latency.p99_us)
    );
    let mut keepalive_requests = BTreeMap::new();
    match (ka_before, keepalive_counts(&cluster).await) {
        (Some(before), Ok(after)) => {
            for (id, codes) in after {
                let b = before.get(&id).cloned().unwrap_or_default();
                let d: BTreeMap<String, f64> = codes
                    .iter()
                    .map(|(c, v)| (c.clone(), v - b.get(c).copied().unwrap_or(0.0)))
                    .collect();
                keepalive_requests.insert(id, d);
            }
        }
        (_, Err(e)) => notes.push(format!("metrics scrape after the keepalives: {e:#}")),
        _ => {}
    }

    // 4. Close.
    eprintln!("lockbench: closing {} sessions", ids.len());
    let l6 = log_index(&cluster, leader, &mut notes).await;
    let close = close_all(&all, ids, o.open_concurrency).await?;
    let l7 = log_index(&cluster, leader, &mut notes).await;
    put_delta(&mut log_entries, "close", l6, l7);
    eprintln!(
        "lockbench:   {} closed ({:.0}/s), {} errors",
        close.ok, close.per_sec, close.errors
    );
    let leader_rss_after_close_kib = cluster.pid(leader).and_then(|p| rss_kib(p).ok());

    notes.extend(crate::local::cluster_notes(&cluster, leader, "the run").await);
    Ok(SessionsResult {
        options: o,
        leader,
        granted_ttl_ms: granted,
        clk_tck: tck,
        baseline_idle,
        baseline_write,
        baseline_write_cpu,
        open,
        settle_s: settle.as_secs_f64(),
        keepalive,
        sessions_idle,
        sessions_write,
        sessions_write_cpu,
        close,
        leader_rss_after_close_kib,
        log_entries,
        keepalive_requests,
        notes,
    })
}

// ---------------------------------------------------------------- report

fn pct(w: &CpuWindow, id: u64) -> String {
    w.cpu_percent
        .get(&id)
        .map_or("n/a".into(), |v| format!("{v:.1}%"))
}

fn followers_pct(w: &CpuWindow, leader: u64) -> String {
    let v: Vec<String> = w
        .cpu_percent
        .iter()
        .filter(|(id, _)| **id != leader)
        .map(|(_, v)| format!("{v:.1}%"))
        .collect();
    v.join(" + ")
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn entries(r: &SessionsResult, what: &str) -> String {
    r.log_entries
        .get(what)
        .map_or("n/a".into(), |v| format!("{v:.0}"))
}

pub fn rows(r: &SessionsResult) -> Vec<Row> {
    let l = r.leader;
    let k = &r.keepalive;
    let n = r.open.ok;
    let (bw, sw) = (&r.baseline_write, &r.sessions_write);
    let ka_total: f64 = r.keepalive_requests.values().flat_map(|c| c.values()).sum();
    let ka_members: Vec<String> = r
        .keepalive_requests
        .iter()
        .map(|(id, c)| {
            let ok = c.get("Ok").copied().unwrap_or(0.0);
            let other: f64 = c
                .iter()
                .filter(|(k, _)| *k != "Ok")
                .map(|(_, v)| v)
                .fold(0.0, |a, b| a + b);
            let role = if *id == l { " (leader)" } else { "" };
            format!("m{id}{role} {ok:.0} ok / {other:.0} other")
        })
        .collect();
    vec![
        row(
            "sessions open / requested TTL / granted TTL",
            format!(
                "{n} / {} ms / {} ms",
                r.options.ttl.as_millis(),
                r.granted_ttl_ms
            ),
        ),
        row(
            format!(
                "open: rate ({} concurrent over 3 members) / latency p50 / p99",
                r.options.open_concurrency
            ),
            format!(
                "{:.0} /s / {} / {}",
                r.open.per_sec,
                ms(r.open.latency.p50_us),
                ms(r.open.latency.p99_us)
            ),
        ),
        row(
            format!(
                "keepalive: {} streams, each session every {} ms: keepalives/s",
                k.streams, k.interval_ms
            ),
            format!("{:.0} /s ({} in {:.1} s)", k.per_sec, k.ok, k.seconds),
        ),
        row(
            "keepalive round trip p50 / p99 / max (all)",
            format!(
                "{} / {} / {}",
                ms(k.latency.p50_us),
                ms(k.latency.p99_us),
                ms(k.latency.max_us)
            ),
        ),
        row(
            "keepalive round trip p50 / p99: leader idle / during 64-client writes",
            format!(
                "{} / {} ; {} / {}",
                ms(k.latency_idle.p50_us),
                ms(k.latency_idle.p99_us),
                ms(k.latency_writes.p50_us),
                ms(k.latency_writes.p99_us)
            ),
        ),
        row(
            "keepalive round trip p99, by the member the stream went to: leader idle / during writes",
            r.keepalive
                .latency_writes_by_member
                .iter()
                .map(|(id, w)| {
                    let i = k.latency_idle_by_member.get(id).cloned().unwrap_or_default();
                    let role = if *id == l { " (leader)" } else { "" };
                    format!("m{id}{role} {} / {}", ms(i.p99_us), ms(w.p99_us))
                })
                .collect::<Vec<_>>()
                .join(", "),
        ),
        row(
            "server Session/KeepAlive requests (lockd_grpc_requests_total delta)",
            format!("{ka_total:.0}: {}", ka_members.join(", ")),
        ),
        row(
            format!("leader (m{l}) CPU idle: baseline / with sessions"),
            format!("{} / {}", pct(&r.baseline_idle, l), pct(&r.sessions_idle, l)),
        ),
        row(
            "followers CPU idle: baseline / with sessions",
            format!(
                "{} / {}",
                followers_pct(&r.baseline_idle, l),
                followers_pct(&r.sessions_idle, l)
            ),
        ),
        row(
            "leader log entries appended: baseline idle / open / open..settled / idle with sessions / close",
            format!(
                "{} / {} / {} / {} / {}",
                entries(r, "baseline idle"),
                entries(r, "open"),
                entries(r, "open .. settled"),
                entries(r, "idle with sessions"),
                entries(r, "close")
            ),
        ),
        row(
            "write, 64 clients: throughput without / with sessions",
            format!("{} / {}", ops(bw.ops_per_sec), ops(sw.ops_per_sec)),
        ),
        row(
            "write, 64 clients: latency p50 / p99 without sessions",
            format!("{} / {}", ms(bw.latency.p50_us), ms(bw.latency.p99_us)),
        ),
        row(
            "write, 64 clients: latency p50 / p99 with sessions",
            format!("{} / {}", ms(sw.latency.p50_us), ms(sw.latency.p99_us)),
        ),
        row(
            "leader CPU during writes: without / with sessions",
            format!(
                "{} / {}",
                pct(&r.baseline_write_cpu, l),
                pct(&r.sessions_write_cpu, l)
            ),
        ),
        row(
            "leader RSS: after baseline writes / idle with sessions / after writes with sessions / after close",
            format!(
                "{} / {} / {} / {}",
                mib(r.baseline_write_cpu.rss_kib.get(&l).copied()),
                mib(r.sessions_idle.rss_kib.get(&l).copied()),
                mib(r.sessions_write_cpu.rss_kib.get(&l).copied()),
                mib(r.leader_rss_after_close_kib)
            ),
        ),
        row(
            "close: rate / latency p50 / p99",
            format!(
                "{:.0} /s / {} / {}",
                r.close.per_sec,
                ms(r.close.latency.p50_us),
                ms(r.close.latency.p99_us)
            ),
        ),
        row(
            "errors: open / keepalive (session expired) / close / writes without / with sessions",
            format!(
                "{} / {} ({}) / {} / {} / {}",
                r.open.errors,
                k.errors,
                k.expired,
                r.close.errors,
                bw.errors + bw.warmup_errors,
                sw.errors + sw.warmup_errors
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_counters() {
        let text = "\
# TYPE lockd_grpc_requests counter
lockd_grpc_requests_total{method=\"Session/KeepAlive\",code=\"Ok\"} 12
lockd_grpc_requests_total{method=\"Session/KeepAlive\",code=\"NotFound\"} 2
lockd_grpc_requests_total{method=\"KV/Put\",code=\"Ok\"} 7
";
        let m = requests_by_code(text, "Session/KeepAlive");
        assert_eq!(m.get("Ok"), Some(&12.0));
        assert_eq!(m.get("NotFound"), Some(&2.0));
        assert_eq!(m.len(), 2);
    }
}
