//! `lockbench locks`: what the `Mutex` recipe costs on a 3-member cluster.
//!
//! Starts a local cluster with the e2e harness (heartbeat 100 ms, election
//! timeout 1000 ms, like `local`), then:
//!
//! 1. uncontended: one client, one session (TTL 10 s), R rounds (200; 50
//!    with `--quick`) of `lock()` then `unlock()` on `/locks/bench-solo`;
//!    acquire (until `lock()` returns), release (until `unlock()` returns)
//!    and their sum per round;
//! 2. contended: 16 clients, each its own `Client` (its endpoint list
//!    rotated so they start on the members round-robin) and its own session,
//!    loop lock -> increment a local counter -> unlock on `/locks/bench-hot`
//!    for D seconds (10; 3 with `--quick`). Handovers/s = acquisitions that
//!    completed within the window / D; acquire latency from calling `lock()`
//!    to its return. Exclusivity: an atomic "holders" counter is incremented
//!    after `lock()` returns and decremented before `unlock()` is called; it
//!    must never exceed 1. Fencing tokens must strictly increase in the
//!    order the holders observe them (checked under a local mutex while
//!    holding);
//! 3. lock failover: a `lockctl lock /locks/bench-failover --ttl 2s` process
//!    holds the lock; a client of this process waits for it (its node is
//!    queued behind the holder's); the holder is killed with SIGKILL (no
//!    release, no session close) and the time from the kill to the waiter's
//!    `lock()` returning is measured, 3 repetitions. Expected about the
//!    holder's session TTL: the server expires the session, deletes its
//!    ephemeral node, and the waiter's watch on it fires.
//!
//! 4. election failover: per repetition (3, each on its own election
//!    directory), a `lockctl -o json elect /elections/bench-N cand-a --ttl 2s`
//!    process is started and waits until it reports `started_leading`, then
//!    `cand-b` is started the same way and waits until its candidate node is
//!    queued; `cand-a` is killed with SIGKILL and the time from the kill to
//!    `cand-b` printing `started_leading` is measured (it includes the
//!    output pipe, a few µs).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use lockd_client::recipes::Mutex;
use lockd_client::Client;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use crate::report::{ms, row, Row};
use crate::workload::{new_histogram, Latency};

const SESSION_TTL: Duration = Duration::from_secs(10);
const CONTENDERS: usize = 16;
const FAILOVER_TTL: &str = "2s";
const FAILOVER_REPS: usize = 3;
const SOLO_LOCK: &str = "/locks/bench-solo";
const HOT_LOCK: &str = "/locks/bench-hot";
const FAILOVER_LOCK: &str = "/locks/bench-failover";
const ELECTION_PREFIX: &str = "/elections/bench-";
/// How long the contenders may take to finish after the window.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for one failover acquisition (TTL plus plenty).
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_SAMPLES: usize = 5;

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct Options {
    pub quick: bool,
}

impl Options {
    fn rounds(&self) -> usize {
        if self.quick {
            50
        } else {
            200
        }
    }
    fn window(&self) -> Duration {
        Duration::from_secs(if self.quick { 3 } else { 10 })
    }
}

/// Uncontended lock/unlock.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Solo {
    pub rounds: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub acquire: Latency,
    pub release: Latency,
    /// acquire + release per round.
    pub total: Latency,
}

/// Contended lock/unlock.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Contended {
    pub clients: usize,
    pub seconds: f64,
    /// Acquisitions completed within the window.
    pub handovers: u64,
    pub handovers_per_sec: f64,
    /// Acquisitions per client (the local counters).
    pub per_client: Vec<u64>,
    /// From calling `lock()` to its return, within the window.
    pub acquire: Latency,
    /// Times the holders counter was above 1.
    pub violations: u64,
    /// Fencing tokens not above the previous holder's.
    pub token_regressions: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
}

/// One lock failover.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Failover {
    pub holder_token: u64,
    pub waiter_token: u64,
    /// SIGKILL of the holder to the waiter's `lock()` returning.
    pub ms: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LocksResult {
    pub options: Options,
    pub leader: u64,
    pub solo: Solo,
    pub contended: Contended,
    /// Holder session TTL granted to `lockctl lock`, in ms.
    pub failover_ttl_ms: u64,
    pub failovers: Vec<Failover>,
    pub failover_errors: Vec<String>,
    /// Election failovers (`lockctl elect`, TTL 2 s).
    pub elections: Vec<Failover>,
    pub election_errors: Vec<String>,
    pub notes: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options { quick: true }
    }
}

impl LocksResult {
    pub fn clean(&self) -> bool {
        self.solo.errors == 0
            && self.solo.rounds > 0
            && self.contended.errors == 0
            && self.contended.handovers > 0
            && self.contended.violations == 0
            && self.contended.token_regressions == 0
            && self.failover_errors.is_empty()
            && self.failovers.len() == FAILOVER_REPS
            && self.election_errors.is_empty()
            && self.elections.len() == FAILOVER_REPS
    }
}

fn sample(samples: &mut Vec<String>, e: impl std::fmt::Display) {
    let s = e.to_string();
    if samples.len() < MAX_SAMPLES && !samples.contains(&s) {
        samples.push(s);
    }
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// The endpoints rotated by `i`, so that client `i` starts on member `i % n`.
fn rotated(all: &[String], i: usize) -> Vec<String> {
    let mut v = all.to_vec();
    if !v.is_empty() {
        let k = i % v.len();
        v.rotate_left(k);
    }
    v
}

async fn solo(all: &[String], rounds: usize) -> Result<Solo> {
    let client = Client::connect(rotated(all, 0))?;
    let session = client
        .open_session(SESSION_TTL)
        .await
        .context("open the session")?;
    let mutex = Mutex::new(client.clone(), SOLO_LOCK, &session);
    // Unmeasured: creates the container and warms the connection.
    mutex.lock().await?.unlock().await?;
    let (mut ha, mut hr, mut ht) = (new_histogram(), new_histogram(), new_histogram());
    let mut out = Solo::default();
    for _ in 0..rounds {
        let t0 = Instant::now();
        let g = match mutex.lock().await {
            Ok(g) => g,
            Err(e) => {
                out.errors += 1;
                sample(&mut out.error_samples, e);
                continue;
            }
        };
        let t1 = Instant::now();
        if let Err(e) = g.unlock().await {
            out.errors += 1;
            sample(&mut out.error_samples, e);
            continue;
        }
        let t2 = Instant::now();
        ha.saturating_record(us(t1 - t0));
        hr.saturating_record(us(t2 - t1));
        ht.saturating_record(us(t2 - t0));
        out.rounds += 1;
    }
    out.acquire = Latency::of(&ha);
    out.release = Latency::of(&hr);
    out.total = Latency::of(&ht);
    let _ = session.close().await;
    Ok(out)
}

struct Shared {
    holders: AtomicUsize,
    violations: AtomicU64,
    last_token: std::sync::Mutex<u64>,
    regressions: AtomicU64,
    stop: AtomicBool,
}

async fn contended(all: &[String], window: Duration) -> Result<Contended> {
    let shared = Arc::new(Shared {
        holders: AtomicUsize::new(0),
        violations: AtomicU64::new(0),
        last_token: std::sync::Mutex::new(0),
        regressions: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    // Clients and sessions first, so that opening is not measured.
    let mut contenders = Vec::new();
    for i in 0..CONTENDERS {
        let client = Client::connect(rotated(all, i))?;
        let session = client
            .open_session(SESSION_TTL)
            .await
            .with_context(|| format!("open session {i}"))?;
        contenders.push((client, session));
    }
    // Create the container once.
    {
        let (c, s) = &contenders[0];
        Mutex::new(c.clone(), HOT_LOCK, s)
            .lock()
            .await?
            .unlock()
            .await?;
    }
    let start = Instant::now();
    let end = start + window;
    let mut tasks = Vec::new();
    for (client, session) in contenders {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mutex = Mutex::new(client, HOT_LOCK, &session);
            let mut h = new_histogram();
            let mut counter = 0u64;
            let mut errors = 0u64;
            let mut samples = Vec::new();
            while !shared.stop.load(Ordering::Relaxed) && Instant::now() < end {
                let t0 = Instant::now();
                let g = match mutex.lock().await {
                    Ok(g) => g,
                    Err(e) => {
                        errors += 1;
                        sample(&mut samples, e);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let t1 = Instant::now();
                if shared.holders.fetch_add(1, Ordering::SeqCst) >= 1 {
                    shared.violations.fetch_add(1, Ordering::SeqCst);
                }
                {
                    let mut last = shared.last_token.lock().unwrap_or_else(|p| p.into_inner());
                    if g.fencing_token() <= *last {
                        shared.regressions.fetch_add(1, Ordering::SeqCst);
                    }
                    *last = g.fencing_token();
                }
                if t1 <= end {
                    counter += 1;
                    h.saturating_record(us(t1 - t0));
                }
                shared.holders.fetch_sub(1, Ordering::SeqCst);
                if let Err(e) = g.unlock().await {
                    errors += 1;
                    sample(&mut samples, e);
                }
            }
            let _ = session.close().await;
            (counter, h, errors, samples)
        }));
    }
    tokio::time::sleep_until(end).await;
    let seconds = start.elapsed().as_secs_f64();
    let mut out = Contended {
        clients: CONTENDERS,
        seconds,
        ..Default::default()
    };
    shared.stop.store(true, Ordering::Relaxed);
    let mut all_h = new_histogram();
    let drain = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let mut res = Vec::new();
        for t in tasks {
            res.push(t.await);
        }
        res
    })
    .await;
    let results =
        drain.map_err(|_| anyhow!("contenders did not finish within {DRAIN_TIMEOUT:?}"))?;
    for r in results {
        let (counter, h, errors, samples) = r.context("contender task")?;
        out.per_client.push(counter);
        out.handovers += counter;
        all_h
            .add(&h)
            .map_err(|e| anyhow!("merge histograms: {e}"))?;
        out.errors += errors;
        for s in samples {
            sample(&mut out.error_samples, s);
        }
    }
    out.handovers_per_sec = out.handovers as f64 / window.as_secs_f64();
    out.acquire = Latency::of(&all_h);
    out.violations = shared.violations.load(Ordering::SeqCst);
    out.token_regressions = shared.regressions.load(Ordering::SeqCst);
    Ok(out)
}

/// Starts `lockctl lock NAME --ttl 2s -o json`; waits until it holds the
/// lock. Returns the child, its token and granted TTL.
async fn spawn_holder(all: &[String]) -> Result<(tokio::process::Child, u64, u64)> {
    let mut child = tokio::process::Command::new(lockd_e2e::lockctl_bin())
        .arg("--endpoints")
        .arg(all.join(","))
        .args(["-o", "json", "lock", FAILOVER_LOCK, "--ttl", FAILOVER_TTL])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start lockctl lock")?;
    let stdout = child.stdout.take().context("lockctl stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| anyhow!("lockctl lock did not acquire within 30 s"))?
        .context("read lockctl output")?
        .ok_or_else(|| anyhow!("lockctl lock exited without output"))?;
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("lockctl output {line:?}"))?;
    let token = v["fencing_token"].as_u64().unwrap_or(0);
    let ttl = v["ttl_ms"].as_u64().unwrap_or(0);
    // Keep the pipe open (and drained) so the holder never blocks writing.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, token, ttl))
}

async fn one_failover(all: &[String], client: &Client) -> Result<(Failover, u64)> {
    let (mut holder, holder_token, ttl) = spawn_holder(all).await?;
    let session = client
        .open_session(SESSION_TTL)
        .await
        .context("open the waiter's session")?;
    let mutex = Mutex::new(client.clone(), FAILOVER_LOCK, &session);
    let waiter = tokio::spawn({
        let mutex = mutex.clone();
        async move {
            let g = mutex.lock().await;
            (Instant::now(), g)
        }
    });
    // Wait until the waiter's node is queued behind the holder's.
    lockd_e2e::wait_until(Duration::from_secs(10), "waiter queued", || {
        let c = client.clone();
        async move {
            c.list(FAILOVER_LOCK)
                .await
                .map(|l| l.children.len() >= 2)
                .unwrap_or(false)
        }
    })
    .await?;
    // Give the waiter time to list and set its watch.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if waiter.is_finished() {
        bail!("the waiter acquired the lock before the holder was killed");
    }
    holder.start_kill().context("SIGKILL lockctl")?;
    let killed = Instant::now();
    let _ = holder.wait().await;
    let (at, g) = tokio::time::timeout(FAILOVER_TIMEOUT, waiter)
        .await
        .map_err(|_| anyhow!("waiter did not acquire within {FAILOVER_TIMEOUT:?}"))?
        .context("waiter task")?;
    let g = g.context("waiter lock()")?;
    let f = Failover {
        holder_token,
        waiter_token: g.fencing_token(),
        ms: (at - killed).as_secs_f64() * 1000.0,
    };
    g.unlock().await?;
    let _ = session.close().await;
    Ok((f, ttl))
}

/// A `lockctl elect` candidate; `leading` receives (when, token) for every
/// `started_leading` it prints.
struct Candidate {
    child: tokio::process::Child,
    leading: tokio::sync::mpsc::UnboundedReceiver<(Instant, u64)>,
}

fn spawn_candidate(all: &[String], name: &str, identity: &str) -> Result<Candidate> {
    let mut child = tokio::process::Command::new(lockd_e2e::lockctl_bin())
        .arg("--endpoints")
        .arg(all.join(","))
        .args(["-o", "json", "elect", name, identity, "--ttl", FAILOVER_TTL])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start lockctl elect")?;
    let stdout = child.stdout.take().context("lockctl stdout")?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let at = Instant::now();
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["event"] == "started_leading" {
                let _ = tx.send((at, v["fencing_token"].as_u64().unwrap_or(0)));
            }
        }
    });
    Ok(Candidate { child, leading: rx })
}

async fn next_leading(c: &mut Candidate, what: &str) -> Result<(Instant, u64)> {
    tokio::time::timeout(FAILOVER_TIMEOUT, c.leading.recv())
        .await
        .map_err(|_| anyhow!("{what} did not lead within {FAILOVER_TIMEOUT:?}"))?
        .ok_or_else(|| anyhow!("{what} exited without leading"))
}

async fn one_election(all: &[String], client: &Client, rep: usize) -> Result<Failover> {
    let name = format!("{ELECTION_PREFIX}{rep}");
    let mut a = spawn_candidate(all, &name, "cand-a")?;
    let (_, a_token) = next_leading(&mut a, "cand-a").await?;
    let mut b = spawn_candidate(all, &name, "cand-b")?;
    lockd_e2e::wait_until(Duration::from_secs(10), "cand-b queued", || {
        let c = client.clone();
        let name = name.clone();
        async move {
            c.list(name)
                .await
                .map(|l| l.children.len() >= 2)
                .unwrap_or(false)
        }
    })
    .await?;
    // Give cand-b time to list and watch its predecessor.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Ok(ev) = b.leading.try_recv() {
        bail!("cand-b led (token {}) before cand-a was killed", ev.1);
    }
    a.child.start_kill().context("SIGKILL cand-a")?;
    let killed = Instant::now();
    let _ = a.child.wait().await;
    let (at, b_token) = next_leading(&mut b, "cand-b").await?;
    let _ = b.child.start_kill();
    let _ = b.child.wait().await;
    Ok(Failover {
        holder_token: a_token,
        waiter_token: b_token,
        ms: at.saturating_duration_since(killed).as_secs_f64() * 1000.0,
    })
}

pub async fn run(o: Options) -> Result<LocksResult> {
    let (cluster, leader) = crate::local::start_cluster().await?;
    let all = cluster.endpoints();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut res = LocksResult {
        options: o.clone(),
        leader,
        ..Default::default()
    };

    eprintln!("lockbench: uncontended lock/unlock, {} rounds", o.rounds());
    res.solo = solo(&all, o.rounds()).await?;
    eprintln!(
        "lockbench:   acquire+release p50 {} p99 {}, {} errors",
        ms(res.solo.total.p50_us),
        ms(res.solo.total.p99_us),
        res.solo.errors
    );

    eprintln!(
        "lockbench: {CONTENDERS} contenders on one lock for {:?}",
        o.window()
    );
    res.contended = contended(&all, o.window()).await?;
    eprintln!(
        "lockbench:   {} handovers ({:.0}/s), acquire p50 {} p99 {}, {} violations, {} errors",
        res.contended.handovers,
        res.contended.handovers_per_sec,
        ms(res.contended.acquire.p50_us),
        ms(res.contended.acquire.p99_us),
        res.contended.violations,
        res.contended.errors
    );

    eprintln!("lockbench: lock failover after SIGKILL of a `lockctl lock --ttl {FAILOVER_TTL}` holder, {FAILOVER_REPS} times");
    let client = Client::connect(rotated(&all, 1))?;
    for i in 0..FAILOVER_REPS {
        match one_failover(&all, &client).await {
            Ok((f, ttl)) => {
                eprintln!(
                    "lockbench:   #{}: acquired {:.0} ms after the kill (TTL {ttl} ms)",
                    i + 1,
                    f.ms
                );
                res.failover_ttl_ms = ttl;
                res.failovers.push(f);
            }
            Err(e) => {
                eprintln!("lockbench:   #{}: {e:#}", i + 1);
                res.failover_errors.push(format!("{e:#}"));
            }
        }
    }
    eprintln!("lockbench: election failover after SIGKILL of a `lockctl elect --ttl {FAILOVER_TTL}` leader, {FAILOVER_REPS} times");
    for i in 0..FAILOVER_REPS {
        match one_election(&all, &client, i + 1).await {
            Ok(f) => {
                eprintln!(
                    "lockbench:   #{}: cand-b leading {:.0} ms after the kill",
                    i + 1,
                    f.ms
                );
                res.elections.push(f);
            }
            Err(e) => {
                eprintln!("lockbench:   #{}: {e:#}", i + 1);
                res.election_errors.push(format!("{e:#}"));
            }
        }
    }
    for f in res.failovers.iter().chain(&res.elections) {
        if f.waiter_token <= f.holder_token {
            res.notes.push(format!(
                "failover: new holder's token {} not above the killed one's {}",
                f.waiter_token, f.holder_token
            ));
        }
    }

    res.notes
        .extend(crate::local::cluster_notes(&cluster, leader, "the run").await);
    Ok(res)
}

// ---------------------------------------------------------------- report

pub fn rows(r: &LocksResult) -> Vec<Row> {
    let s = &r.solo;
    let c = &r.contended;
    let min = c.per_client.iter().min().copied().unwrap_or(0);
    let max = c.per_client.iter().max().copied().unwrap_or(0);
    let fo: Vec<String> = r
        .failovers
        .iter()
        .map(|f| format!("{:.0} ms", f.ms))
        .collect();
    let el: Vec<String> = r
        .elections
        .iter()
        .map(|f| format!("{:.0} ms", f.ms))
        .collect();
    vec![
        row(
            format!("uncontended, 1 client: acquire + release p50 / p99 ({} rounds)", s.rounds),
            format!("{} / {}", ms(s.total.p50_us), ms(s.total.p99_us)),
        ),
        row(
            "uncontended: acquire p50 / p99; release p50 / p99",
            format!(
                "{} / {}; {} / {}",
                ms(s.acquire.p50_us),
                ms(s.acquire.p99_us),
                ms(s.release.p50_us),
                ms(s.release.p99_us)
            ),
        ),
        row(
            format!("contended, {} clients on one lock: handovers/s", c.clients),
            format!("{:.0} /s ({} in {:.1} s)", c.handovers_per_sec, c.handovers, c.seconds),
        ),
        row(
            "contended: acquire latency p50 / p99 / max",
            format!(
                "{} / {} / {}",
                ms(c.acquire.p50_us),
                ms(c.acquire.p99_us),
                ms(c.acquire.max_us)
            ),
        ),
        row(
            "contended: acquisitions per client min / max",
            format!("{min} / {max}"),
        ),
        row(
            "contended: exclusivity violations / fencing token regressions",
            format!("{} / {}", c.violations, c.token_regressions),
        ),
        row(
            format!(
                "lock failover: SIGKILL of `lockctl lock --ttl {FAILOVER_TTL}` holder (granted TTL {} ms) -> waiter acquires",
                r.failover_ttl_ms
            ),
            if fo.is_empty() { "n/a".into() } else { fo.join(", ") },
        ),
        row(
            format!(
                "election failover: SIGKILL of the `lockctl elect --ttl {FAILOVER_TTL}` leader -> next candidate leads"
            ),
            if el.is_empty() {
                "n/a".into()
            } else {
                el.join(", ")
            },
        ),
        row(
            "errors: uncontended / contended / lock failover / election failover",
            format!(
                "{} / {} / {} / {}",
                s.errors,
                c.errors,
                r.failover_errors.len(),
                r.election_errors.len()
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_endpoints() {
        let all: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(rotated(&all, 0), all);
        assert_eq!(rotated(&all, 1), vec!["b", "c", "a"]);
        assert_eq!(rotated(&all, 5), vec!["c", "a", "b"]);
    }
}
