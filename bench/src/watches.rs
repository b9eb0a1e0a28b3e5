//! `lockbench watch`: how long a put takes to reach N watchers of its key.
//!
//! Starts a local cluster with the e2e harness (heartbeat 100 ms, election
//! timeout 1000 ms, like `local`), writes the key once, then for each
//! watcher count N:
//!
//! 1. opens N watches (scope KEY, from the next change) on the key, spread
//!    round-robin over the members; on each member the watches share up to
//!    `--streams-per-member` `Watch` streams (one HTTP/2 connection per
//!    member, as a real client multiplexes), and waits for every `created`
//!    acknowledgement;
//! 2. one writer puts to the key through the leader, a few unmeasured puts
//!    first, then P measured ones (200; 50 with `--quick`), one after
//!    another: the next put starts once every watcher has received the
//!    previous one's event, so the figures are latency, not queueing;
//! 3. for every put and watcher records the time from the writer receiving
//!    the put's response to the watcher's stream task receiving the event
//!    with that revision (0 when the event came first; counted);
//! 4. checks that every watcher saw every measured revision exactly once and
//!    in order, and samples the members' CPU over the measured puts.
//!
//! Every timestamp is taken in this process, so the figures include the
//! client's own scheduling (N watchers' responses are decoded here, on the
//! same cores as the cluster).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use lockd_e2e::Cluster;
use lockd_proto::v1::watch_client::WatchClient;
use lockd_proto::v1::watch_create::Scope;
use lockd_proto::v1::watch_request::Request;
use lockd_proto::v1::{PutRequest, WatchCreate, WatchRequest};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::procstat::{clk_tck, CpuWindow, Probe};
use crate::report::{ms, row, Row};
use crate::target::http_uri;
use crate::workload::{new_histogram, Latency};

/// The watched key.
pub const KEY: &str = "/bench/watch/key";
/// Unmeasured puts before the measured ones, per watcher count.
const WARMUP_PUTS: usize = 5;
/// How long one put's events may take to reach every watcher.
const PUT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the watches may take to be acknowledged.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_SAMPLES: usize = 5;

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct Options {
    /// Watcher counts, one round each.
    pub watchers: Vec<usize>,
    pub quick: bool,
    /// Most `Watch` streams per member.
    pub streams_per_member: usize,
    pub value_size: usize,
}

impl Options {
    fn puts(&self) -> usize {
        if self.quick {
            50
        } else {
            200
        }
    }
}

/// One watcher count.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Round {
    pub watchers: usize,
    /// `Watch` streams, per member id.
    pub streams_by_member: BTreeMap<u64, usize>,
    /// Watches acknowledged, by the member id in the `created` header.
    pub watchers_by_member: BTreeMap<u64, usize>,
    /// Time to open the streams and get every `created`.
    pub create_s: f64,
    /// Measured puts acknowledged.
    pub puts: u64,
    pub put_errors: u64,
    /// Puts whose events had not reached every watcher within the timeout.
    pub put_timeouts: u64,
    /// Measured puts x watchers.
    pub events_expected: u64,
    /// Distinct (watcher, measured revision) events received.
    pub events_received: u64,
    /// Events received before the writer had the put's response (recorded
    /// as 0 µs).
    pub before_ack: u64,
    /// Events at or below a revision the watcher had already seen.
    pub out_of_order: u64,
    /// Events for revisions that are not this run's puts.
    pub foreign: u64,
    /// Watches cancelled by the server, and broken streams.
    pub canceled: u64,
    pub stream_errors: u64,
    pub error_samples: Vec<String>,
    /// Put response to each watcher's event, every (put, watcher).
    pub latency: Latency,
    /// The same, by the member serving the watcher.
    pub latency_by_member: BTreeMap<u64, Latency>,
    /// Put response to the last watcher's event, per put.
    pub last_watcher: Latency,
    /// The writer's put round trip (to the leader).
    pub put_latency: Latency,
    /// Measured puts, wall time.
    pub seconds: f64,
    /// CPU over the measured puts, per member id; id 0 is this process.
    pub cpu: Option<CpuWindow>,
}

impl Round {
    fn clean(&self) -> bool {
        self.puts > 0
            && self.events_expected == self.events_received
            && self.put_errors == 0
            && self.put_timeouts == 0
            && self.out_of_order == 0
            && self.canceled == 0
            && self.stream_errors == 0
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct WatchResult {
    pub options: Options,
    pub key: String,
    pub leader: u64,
    pub clk_tck: u64,
    pub rounds: Vec<Round>,
    pub notes: Vec<String>,
}

impl WatchResult {
    pub fn clean(&self) -> bool {
        !self.rounds.is_empty() && self.rounds.iter().all(Round::clean)
    }
}

fn push_sample(samples: &mut Vec<String>, s: String) {
    if samples.len() < MAX_SAMPLES && !samples.contains(&s) {
        samples.push(s);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------- streams

/// What the stream tasks report, timestamped where it was received.
enum Msg {
    Created {
        watcher: usize,
        member: u64,
    },
    Event {
        watcher: usize,
        revision: u64,
        at: Instant,
    },
    Canceled {
        watcher: usize,
        reason: String,
    },
    StreamError(String),
}

/// One `Watch` stream carrying the watches of `watchers` (global watcher
/// numbers; watch id k+1 is `watchers[k]`) until `stop` changes.
async fn stream_task(
    ch: Channel,
    watchers: Vec<usize>,
    tx: mpsc::UnboundedSender<Msg>,
    mut stop: watch::Receiver<bool>,
) {
    let (req_tx, req_rx) = mpsc::channel::<WatchRequest>(watchers.len() + 1);
    for k in 0..watchers.len() {
        let create = WatchCreate {
            path: KEY.to_string(),
            scope: Scope::Key as i32,
            watch_id: k as i64 + 1,
            ..Default::default()
        };
        // Capacity is watchers.len() + 1: never full.
        let _ = req_tx.try_send(WatchRequest {
            request: Some(Request::Create(create)),
        });
    }
    let mut client = WatchClient::new(ch);
    let mut stream = match client.watch(ReceiverStream::new(req_rx)).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            let _ = tx.send(Msg::StreamError(format!(
                "open stream: {}: {}",
                s.code(),
                s.message()
            )));
            return;
        }
    };
    loop {
        tokio::select! {
            m = stream.message() => match m {
                Ok(Some(r)) => {
                    let at = Instant::now();
                    let Some(&watcher) = usize::try_from(r.watch_id - 1)
                        .ok()
                        .and_then(|k| watchers.get(k))
                    else {
                        let _ = tx.send(Msg::StreamError(format!("unknown watch id {}", r.watch_id)));
                        continue;
                    };
                    let hdr_rev = r.header.as_ref().map_or(0, |h| h.revision);
                    if r.created {
                        let member = r.header.as_ref().map_or(0, |h| h.member_id);
                        let _ = tx.send(Msg::Created { watcher, member });
                    } else if r.canceled {
                        let _ = tx.send(Msg::Canceled { watcher, reason: r.cancel_reason });
                    } else {
                        // Progress notices carry no events.
                        for e in r.events {
                            let revision = e.node.as_ref().map_or(hdr_rev, |n| n.mod_revision);
                            let _ = tx.send(Msg::Event { watcher, revision, at });
                        }
                    }
                }
                Ok(None) => {
                    let _ = tx.send(Msg::StreamError("stream ended by the server".into()));
                    break;
                }
                Err(s) => {
                    let _ = tx.send(Msg::StreamError(format!("stream: {}: {}", s.code(), s.message())));
                    break;
                }
            },
            _ = stop.changed() => break,
        }
    }
    drop(req_tx);
}

// ---------------------------------------------------------------- a round

/// Per measured revision: when the writer had the response, how many
/// watchers have it, and the slowest so far (µs).
struct Put {
    acked: Instant,
    got: usize,
    slowest: u64,
}

struct Tally {
    n: usize,
    /// Last revision seen, per watcher.
    last: Vec<u64>,
    /// Serving member, per watcher (from the `created` header).
    member_of: Vec<u64>,
    /// Revisions of the warm-up puts (ignored).
    warmup: std::collections::HashSet<u64>,
    puts: HashMap<u64, Put>,
    all: Histogram<u64>,
    by_member: BTreeMap<u64, Histogram<u64>>,
    last_watcher: Histogram<u64>,
    r: Round,
}

impl Tally {
    fn take(&mut self, m: Msg) {
        match m {
            Msg::Created { .. } => {}
            Msg::Canceled { watcher, reason } => {
                self.r.canceled += 1;
                push_sample(
                    &mut self.r.error_samples,
                    format!("watcher {watcher} canceled: {reason}"),
                );
            }
            Msg::StreamError(e) => {
                self.r.stream_errors += 1;
                push_sample(&mut self.r.error_samples, e);
            }
            Msg::Event {
                watcher,
                revision,
                at,
            } => {
                if revision <= self.last[watcher] {
                    self.r.out_of_order += 1;
                    return;
                }
                self.last[watcher] = revision;
                if self.warmup.contains(&revision) {
                    return;
                }
                let Some(p) = self.puts.get_mut(&revision) else {
                    self.r.foreign += 1;
                    return;
                };
                let us = match at.checked_duration_since(p.acked) {
                    Some(d) => micros(d),
                    None => {
                        self.r.before_ack += 1;
                        0
                    }
                };
                p.got += 1;
                p.slowest = p.slowest.max(us);
                self.r.events_received += 1;
                self.all.saturating_record(us);
                self.by_member
                    .entry(self.member_of[watcher])
                    .or_insert_with(new_histogram)
                    .saturating_record(us);
                if p.got == self.n {
                    self.last_watcher.saturating_record(p.slowest);
                }
            }
        }
    }
}

async fn round(
    cluster: &Cluster,
    leader: u64,
    probe: &Probe,
    o: &Options,
    n: usize,
    notes: &mut Vec<String>,
) -> Result<Round> {
    let members = cluster.running_ids();
    if members.is_empty() {
        bail!("no member is running");
    }
    // Watcher i goes to member i % M; on its member to stream
    // (i / M) % streams.
    let mut per_member: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        per_member
            .entry(members[i % members.len()])
            .or_default()
            .push(i);
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut r = Round {
        watchers: n,
        ..Default::default()
    };
    let started = Instant::now();
    for (member, ws) in &per_member {
        let ep = cluster.endpoint(*member);
        let ch = Endpoint::from_shared(http_uri(&ep))
            .with_context(|| format!("invalid endpoint {ep:?}"))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .connect_lazy();
        let streams = o.streams_per_member.clamp(1, ws.len());
        r.streams_by_member.insert(*member, streams);
        for s in 0..streams {
            let mine: Vec<usize> = ws.iter().skip(s).step_by(streams).copied().collect();
            tasks.push(tokio::spawn(stream_task(
                ch.clone(),
                mine,
                tx.clone(),
                stop_rx.clone(),
            )));
        }
    }
    drop(tx);
    let mut t = Tally {
        n,
        last: vec![0; n],
        member_of: vec![0; n],
        warmup: Default::default(),
        puts: HashMap::new(),
        all: new_histogram(),
        by_member: BTreeMap::new(),
        last_watcher: new_histogram(),
        r,
    };

    // 1. Every `created`.
    let mut created = 0usize;
    let deadline = started + CREATE_TIMEOUT;
    while created < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Msg::Created { watcher, member })) => {
                t.member_of[watcher] = member;
                *t.r.watchers_by_member.entry(member).or_insert(0) += 1;
                created += 1;
            }
            Ok(Some(m)) => {
                t.take(m);
                if t.r.canceled + t.r.stream_errors > 0 {
                    bail!(
                        "{n} watchers: creating the watches failed: {:?}",
                        t.r.error_samples
                    );
                }
            }
            Ok(None) => bail!("{n} watchers: every stream ended before the watches were created"),
            Err(_) => bail!("{n} watchers: only {created} watches created in {CREATE_TIMEOUT:?}"),
        }
    }
    t.r.create_s = started.elapsed().as_secs_f64();
    eprintln!(
        "lockbench:   {n} watches created in {:.2} s over {} streams",
        t.r.create_s,
        t.r.streams_by_member.values().sum::<usize>()
    );

    // 2. Puts, each once every watcher has the previous one.
    let mut kv = lockd_e2e::kv_client(&cluster.endpoint(leader), Duration::from_secs(10));
    let value = vec![b'w'; o.value_size];
    let mut put_hist = new_histogram();
    let total = WARMUP_PUTS + o.puts();
    let mut cpu_start = None;
    let mut measured_start = Instant::now();
    for k in 0..total {
        let measured = k >= WARMUP_PUTS;
        if k == WARMUP_PUTS {
            cpu_start = probe.sample().ok();
            measured_start = Instant::now();
        }
        let t0 = Instant::now();
        let res = kv
            .put(PutRequest {
                path: KEY.to_string(),
                data: value.clone(),
                expected_version: None,
                parents: true,
            })
            .await;
        let acked = Instant::now();
        let revision = match res {
            Ok(resp) => {
                let resp = resp.into_inner();
                resp.node
                    .map(|n| n.mod_revision)
                    .or(resp.header.map(|h| h.revision))
                    .ok_or_else(|| anyhow!("put answered without a revision"))?
            }
            Err(s) => {
                if measured {
                    t.r.put_errors += 1;
                }
                push_sample(
                    &mut t.r.error_samples,
                    format!("put: {}: {}", s.code(), s.message()),
                );
                continue;
            }
        };
        if !measured {
            t.warmup.insert(revision);
            // Wait for the warm-up events too, but without measuring.
            let until = acked + PUT_TIMEOUT;
            while t.last.iter().any(|&l| l < revision) {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(m)) => t.take(m),
                    _ => break,
                }
            }
            continue;
        }
        t.r.puts += 1;
        put_hist.saturating_record(micros(acked.duration_since(t0)));
        t.puts.insert(
            revision,
            Put {
                acked,
                got: 0,
                slowest: 0,
            },
        );
        let until = acked + PUT_TIMEOUT;
        let mut timed_out = false;
        while t.puts[&revision].got < n {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(m)) => t.take(m),
                Ok(None) => bail!("{n} watchers: every stream ended during the puts"),
                Err(_) => {
                    timed_out = true;
                    break;
                }
            }
        }
        if timed_out {
            t.r.put_timeouts += 1;
            let got = t.puts[&revision].got;
            push_sample(
                &mut t.r.error_samples,
                format!("revision {revision}: {got} of {n} watchers after {PUT_TIMEOUT:?}"),
            );
        }
    }
    t.r.seconds = measured_start.elapsed().as_secs_f64();
    if let Some(a) = cpu_start {
        match probe.sample().and_then(|b| probe.window(&a, &b)) {
            Ok(w) => t.r.cpu = Some(w),
            Err(e) => notes.push(format!("{n} watchers: CPU sample: {e:#}")),
        }
    }
    // Late events of timed-out puts, and anything unexpected.
    let grace = Instant::now() + Duration::from_millis(500);
    while let Ok(Some(m)) = tokio::time::timeout_at(grace, rx.recv()).await {
        t.take(m);
    }
    let _ = stop.send(true);
    for h in tasks {
        h.await.context("watch stream task")?;
    }
    while let Ok(m) = rx.try_recv() {
        t.take(m);
    }

    let mut r = t.r;
    r.events_expected = r.puts * n as u64;
    r.latency = Latency::of(&t.all);
    r.last_watcher = Latency::of(&t.last_watcher);
    r.put_latency = Latency::of(&put_hist);
    for (m, h) in &t.by_member {
        r.latency_by_member.insert(*m, Latency::of(h));
    }
    Ok(r)
}

pub async fn run(o: Options) -> Result<WatchResult> {
    if o.watchers.is_empty() || o.watchers.contains(&0) {
        bail!("--watchers must be one or more counts of at least 1");
    }
    let (cluster, leader) = crate::local::start_cluster().await?;
    let tck = clk_tck();
    let mut probe = Probe::members(&cluster, tck)?;
    // This process too (id 0): it decodes every watcher's events.
    probe.pids.insert(0, std::process::id());
    // Create the key, then let the start-up die down.
    let mut kv = lockd_e2e::kv_client(&cluster.endpoint(leader), Duration::from_secs(10));
    kv.put(PutRequest {
        path: KEY.to_string(),
        data: vec![b'w'; o.value_size],
        expected_version: None,
        parents: true,
    })
    .await
    .context("create the watched key")?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut notes = Vec::new();
    let mut rounds = Vec::new();
    for &n in &o.watchers {
        eprintln!(
            "lockbench: {n} watchers on {KEY}, {} puts (+{WARMUP_PUTS} warm-up)",
            o.puts()
        );
        let r = round(&cluster, leader, &probe, &o, n, &mut notes).await?;
        eprintln!(
            "lockbench:   {} of {} events, p50 {} p99 {} max {}, {} before the ack",
            r.events_received,
            r.events_expected,
            ms(r.latency.p50_us),
            ms(r.latency.p99_us),
            ms(r.latency.max_us),
            r.before_ack
        );
        rounds.push(r);
    }

    notes.extend(crate::local::cluster_notes(&cluster, leader, "the run").await);
    Ok(WatchResult {
        options: o,
        key: KEY.to_string(),
        leader,
        clk_tck: tck,
        rounds,
        notes,
    })
}

// ---------------------------------------------------------------- report

fn role(id: u64, leader: u64) -> &'static str {
    if id == leader {
        " (leader)"
    } else {
        ""
    }
}

pub fn rows(res: &WatchResult) -> Vec<Row> {
    let l = res.leader;
    let mut out = Vec::new();
    for r in &res.rounds {
        let n = r.watchers;
        let served: Vec<String> = r
            .watchers_by_member
            .iter()
            .map(|(id, w)| {
                let s = r.streams_by_member.get(id).copied().unwrap_or(0);
                format!("m{id}{} {w} on {s} streams", role(*id, l))
            })
            .collect();
        out.push(row(
            format!("{n} watchers: served by (created acks)"),
            format!("{} (created in {:.2} s)", served.join(", "), r.create_s),
        ));
        out.push(row(
            format!("{n} watchers: put response -> event, p50 / p99 / max"),
            format!(
                "{} / {} / {}",
                ms(r.latency.p50_us),
                ms(r.latency.p99_us),
                ms(r.latency.max_us)
            ),
        ));
        out.push(row(
            format!("{n} watchers: p50 / p99 by serving member"),
            r.latency_by_member
                .iter()
                .map(|(id, h)| format!("m{id}{} {} / {}", role(*id, l), ms(h.p50_us), ms(h.p99_us)))
                .collect::<Vec<_>>()
                .join(", "),
        ));
        out.push(row(
            format!("{n} watchers: put response -> last watcher, p50 / p99"),
            format!(
                "{} / {}",
                ms(r.last_watcher.p50_us),
                ms(r.last_watcher.p99_us)
            ),
        ));
        out.push(row(
            format!("{n} watchers: events expected / received / before the put response"),
            format!(
                "{} / {} / {}",
                r.events_expected, r.events_received, r.before_ack
            ),
        ));
        out.push(row(
            format!(
                "{n} watchers: put round trip p50 / p99 ({} puts in {:.1} s)",
                r.puts, r.seconds
            ),
            format!(
                "{} / {}",
                ms(r.put_latency.p50_us),
                ms(r.put_latency.p99_us)
            ),
        ));
        if let Some(w) = &r.cpu {
            out.push(row(
                format!("{n} watchers: CPU during the puts (% of one core)"),
                w.cpu_percent
                    .iter()
                    .map(|(id, v)| match id {
                        0 => format!("lockbench {v:.1}%"),
                        _ => format!("m{id}{} {v:.1}%", role(*id, l)),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        out.push(row(
            format!("{n} watchers: errors: puts / timeouts / out of order / foreign / canceled / stream"),
            format!(
                "{} / {} / {} / {} / {} / {}",
                r.put_errors,
                r.put_timeouts,
                r.out_of_order,
                r.foreign,
                r.canceled,
                r.stream_errors
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_order_early_and_foreign() {
        let now = Instant::now();
        let mut t = Tally {
            n: 2,
            last: vec![0; 2],
            member_of: vec![1, 2],
            warmup: [3].into_iter().collect(),
            puts: HashMap::new(),
            all: new_histogram(),
            by_member: BTreeMap::new(),
            last_watcher: new_histogram(),
            r: Round::default(),
        };
        t.puts.insert(
            5,
            Put {
                acked: now,
                got: 0,
                slowest: 0,
            },
        );
        let ev = |watcher, revision, at| Msg::Event {
            watcher,
            revision,
            at,
        };
        t.take(ev(0, 3, now)); // warm-up: ignored
        t.take(ev(0, 5, now - Duration::from_millis(1))); // before the ack
        t.take(ev(0, 5, now + Duration::from_millis(2))); // duplicate
        t.take(ev(1, 4, now)); // not one of ours
        t.take(ev(1, 5, now + Duration::from_millis(3)));
        assert_eq!(t.r.events_received, 2);
        assert_eq!(t.r.before_ack, 1);
        assert_eq!(t.r.out_of_order, 1);
        assert_eq!(t.r.foreign, 1);
        assert_eq!(t.puts[&5].got, 2);
        assert_eq!(t.last_watcher.len(), 1);
        assert!(t.last_watcher.max() >= 2_990);
    }
}
