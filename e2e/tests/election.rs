//! `lockd_client::recipes::LeaderElection`, `observe` and `lockctl elect`
//! against real 3-member clusters: one leader among candidates, observers
//! agreeing, resignation handing over at once, killed leaders replaced
//! within their TTL, and terms that never overlap.

use std::process::Stdio;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use lockd_client::recipes::{observe, ElectionConfig, ElectionEvent, LeaderElection};
use lockd_client::Client;
use lockd_e2e::{bounded, lockctl_command, signal, Cluster, POLL_INTERVAL};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

fn client_for(c: &Cluster, i: usize) -> Client {
    Client::connect(c.endpoints_from(i)).expect("client")
}

/// Polls `f` until it returns `Some`; `Err` after `timeout`.
async fn wait_some<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

type Log = Arc<StdMutex<Vec<(Instant, usize, ElectionEvent)>>>;

/// An in-process candidate whose events go to a shared log.
struct Candidate {
    resign: mpsc::UnboundedSender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn candidate(c: &Cluster, i: usize, name: &str, log: &Log) -> Candidate {
    let election = LeaderElection::new(
        client_for(c, i),
        name,
        ElectionConfig::new(format!("cand-{i}"), Duration::from_secs(5)),
    )
    .expect("valid election config");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let log = log.clone();
    let task = tokio::spawn(async move {
        let mut campaign = election.campaign();
        loop {
            tokio::select! {
                ev = campaign.next() => match ev {
                    Some(ev) => log.lock().unwrap().push((Instant::now(), i, ev)),
                    None => break,
                },
                r = rx.recv() => match r {
                    Some(()) => campaign.resign(),
                    None => break,
                },
            }
        }
        for ev in campaign.cancel().await {
            log.lock().unwrap().push((Instant::now(), i, ev));
        }
    });
    Candidate { resign: tx, task }
}

/// Who leads according to the log (started and not stopped since), with
/// the term's token.
fn leaders(log: &Log) -> Vec<(usize, u64)> {
    let mut cur: Vec<Option<u64>> = vec![None; 16];
    for (_, i, ev) in log.lock().unwrap().iter() {
        match ev {
            ElectionEvent::StartedLeading { fencing_token, .. } => cur[*i] = Some(*fencing_token),
            ElectionEvent::StoppedLeading { .. } => cur[*i] = None,
            ElectionEvent::NewLeader { .. } => {}
        }
    }
    cur.iter()
        .enumerate()
        .filter_map(|(i, t)| Some((i, (*t)?)))
        .collect()
}

// One leader among three candidates; observers (other clients) and every
// candidate's own NewLeader view agree on it, identity and token. The
// candidates' observers start before the election's directory exists, so
// this also covers an observer that first finds nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_leader_and_observers_agree() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "3 candidates", async {
        let log: Log = Arc::default();
        let cands: Vec<Candidate> = (0..3).map(|i| candidate(&c, i, "/e/a", &log)).collect();
        let (leader, token) = wait_some(WAIT, "a leader", || {
            let log = log.clone();
            async move { leaders(&log).first().copied() }
        })
        .await
        .expect("a leader");
        // Settle: nobody else starts leading.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(leaders(&log), vec![(leader, token)], "exactly one leader");
        // Observers (different clients) agree, including token.
        for i in 0..3 {
            let mut obs = observe(client_for(&c, i), "/e/a/");
            let l = tokio::time::timeout(WAIT, obs.next())
                .await
                .expect("observer answers")
                .expect("stream")
                .expect("a leader");
            assert_eq!(l.identity, format!("cand-{leader}"));
            assert_eq!(l.fencing_token, token);
        }
        // Every candidate's NewLeader view ends at the leader.
        let log2 = log.clone();
        wait_some(WAIT, "candidates see the leader", move || {
            let log = log2.clone();
            async move {
                let seen: Vec<Option<String>> = (0..3)
                    .map(|i| {
                        log.lock()
                            .unwrap()
                            .iter()
                            .rev()
                            .find_map(|(_, j, ev)| match ev {
                                ElectionEvent::NewLeader { identity, .. } if *j == i => {
                                    Some(identity.clone())
                                }
                                _ => None,
                            })
                    })
                    .collect();
                seen.iter()
                    .all(|s| s.as_deref() == Some(format!("cand-{leader}").as_str()))
                    .then_some(())
            }
        })
        .await
        .expect("NewLeader agrees");
        for cand in cands {
            drop(cand.resign);
            cand.task.await.unwrap();
        }
        assert!(leaders(&log).is_empty(), "cancelled campaigns stop leading");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resign_hands_over_at_once() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "resignations", async {
        let log: Log = Arc::default();
        let cands: Vec<Candidate> = (0..3).map(|i| candidate(&c, i, "/e/b", &log)).collect();
        let mut tokens = Vec::new();
        let (mut leader, token) = wait_some(WAIT, "a leader", || {
            let log = log.clone();
            async move { leaders(&log).first().copied() }
        })
        .await
        .expect("a leader");
        tokens.push(token);
        for round in 0..4 {
            let t0 = Instant::now();
            cands[leader].resign.send(()).unwrap();
            let next = wait_some(Duration::from_secs(1), "the next leader", || {
                let log = log.clone();
                async move {
                    let l = leaders(&log);
                    (l.len() == 1 && l[0].0 != leader).then(|| l[0])
                }
            })
            .await
            .unwrap_or_else(|e| panic!("round {round}: no new leader within 1 s: {e}"));
            eprintln!(
                "round {round}: {leader} -> {} in {:?}",
                next.0,
                t0.elapsed()
            );
            leader = next.0;
            tokens.push(next.1);
        }
        assert!(
            tokens.windows(2).all(|w| w[0] < w[1]),
            "tokens not strictly increasing: {tokens:?}"
        );
        for cand in cands {
            drop(cand.resign);
            cand.task.await.unwrap();
        }
    })
    .await;
}

/// A `lockctl -o json elect NAME ID --ttl TTL` process whose events are
/// timestamped on arrival into a shared log.
struct Proc {
    child: Child,
    idx: usize,
}

type PLog = Arc<StdMutex<Vec<(Instant, usize, Value)>>>;

fn spawn_proc(c: &Cluster, name: &str, idx: usize, ttl: &str, log: &PLog) -> Proc {
    let mut child = lockctl_command(&c.endpoints().join(","))
        .args([
            "-o",
            "json",
            "elect",
            name,
            &format!("p{idx}"),
            "--ttl",
            ttl,
        ])
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lockctl");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let log = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).expect("JSON line");
            log.lock().unwrap().push((Instant::now(), idx, v));
        }
    });
    Proc { child, idx }
}

/// Current leader process per the log: (idx, token, since).
fn proc_leader(log: &PLog, dead: &[usize]) -> Vec<(usize, u64, Instant)> {
    let mut cur: std::collections::BTreeMap<usize, (u64, Instant)> = Default::default();
    for (t, i, v) in log.lock().unwrap().iter() {
        match v["event"].as_str() {
            Some("started_leading") => {
                cur.insert(*i, (v["fencing_token"].as_u64().unwrap(), *t));
            }
            Some("stopped_leading") => {
                cur.remove(i);
            }
            _ => {}
        }
    }
    cur.into_iter()
        .filter(|(i, _)| !dead.contains(i))
        .map(|(i, (tok, t))| (i, tok, t))
        .collect()
}

impl Proc {
    fn signal(&self, sig: i32) {
        signal(self.child.id().expect("running"), sig);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_leader_is_replaced_within_ttl() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "leader kill -9", async {
        let log: PLog = Arc::default();
        let mut procs: Vec<Proc> = (0..3)
            .map(|i| spawn_proc(&c, "/e/c", i, "2s", &log))
            .collect();
        let (leader, token, _) = wait_some(WAIT, "a leader", || {
            let log = log.clone();
            async move { proc_leader(&log, &[]).first().copied() }
        })
        .await
        .expect("a leader");
        let p = procs.iter_mut().find(|p| p.idx == leader).unwrap();
        p.signal(libc::SIGKILL);
        let killed = Instant::now();
        let _ = p.child.wait().await;
        let (next, next_token, at) = wait_some(Duration::from_secs(2 + 3), "a new leader", || {
            let log = log.clone();
            async move { proc_leader(&log, &[leader]).first().copied() }
        })
        .await
        .expect("a new leader within TTL + 3 s");
        eprintln!("p{leader} -> p{next} {:?} after the kill", at - killed);
        assert_ne!(next, leader);
        assert!(next_token > token);
    })
    .await;
}

/// What is promised (see `LeaderElection`): a candidate reports
/// StoppedLeading no later than its session is Lost on the client, which is
/// never later than the server's expiry, and the next leader starts only
/// after the old node is deleted. So terms, as reported by the candidates,
/// never overlap. A killed process's term ends when it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terms_never_overlap_across_kills() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(180), "kills and interrupts", async {
        let log: PLog = Arc::default();
        let mut procs: Vec<Proc> = (0..3)
            .map(|i| spawn_proc(&c, "/e/d", i, "2s", &log))
            .collect();
        // Term ends of killed processes: idx -> kill time.
        let mut ended: Vec<(usize, Instant)> = Vec::new();
        for round in 0..4 {
            let dead: Vec<usize> = ended.iter().map(|(i, _)| *i).collect();
            let (leader, _, _) = wait_some(Duration::from_secs(10), "a leader", || {
                let log = log.clone();
                let dead = dead.clone();
                async move {
                    let l = proc_leader(&log, &dead);
                    assert!(l.len() <= 1, "two leaders at once: {l:?}");
                    l.first().copied()
                }
            })
            .await
            .expect("a leader");
            let pos = procs.iter().position(|p| p.idx == leader).unwrap();
            let mut p = procs.remove(pos);
            if round == 2 {
                // Ctrl-C: resigns, prints the end of its term, exits 0.
                p.signal(libc::SIGINT);
                let st = tokio::time::timeout(WAIT, p.child.wait())
                    .await
                    .expect("exits")
                    .unwrap();
                assert!(st.success(), "lockctl elect exit on SIGINT: {st:?}");
            } else {
                ended.push((p.idx, Instant::now()));
                p.signal(libc::SIGKILL);
                let _ = p.child.wait().await;
            }
            procs.push(spawn_proc(&c, "/e/d", 3 + round, "2s", &log));
        }
        let dead: Vec<usize> = ended.iter().map(|(i, _)| *i).collect();
        wait_some(Duration::from_secs(10), "a last leader", || {
            let log = log.clone();
            let dead = dead.clone();
            async move { proc_leader(&log, &dead).first().copied() }
        })
        .await
        .expect("a last leader");
        for p in &procs {
            p.signal(libc::SIGINT);
        }
        for p in &mut procs {
            let _ = tokio::time::timeout(WAIT, p.child.wait()).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Intervals [start, end) per term.
        let mut terms: Vec<(Instant, Instant, usize, u64)> = Vec::new();
        let mut open: std::collections::BTreeMap<usize, (Instant, u64)> = Default::default();
        let end_of_test = Instant::now();
        for (t, i, v) in log.lock().unwrap().iter() {
            match v["event"].as_str() {
                Some("started_leading") => {
                    open.insert(*i, (*t, v["fencing_token"].as_u64().unwrap()));
                }
                Some("stopped_leading") => {
                    if let Some((s, tok)) = open.remove(i) {
                        terms.push((s, *t, *i, tok));
                    }
                }
                _ => {}
            }
        }
        for (i, (s, tok)) in open {
            let end = ended
                .iter()
                .find(|(j, _)| *j == i)
                .map_or(end_of_test, |(_, t)| *t);
            terms.push((s, end, i, tok));
        }
        terms.sort_by_key(|t| t.0);
        assert!(terms.len() >= 5, "terms: {terms:?}");
        for w in terms.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "overlapping terms: p{} (token {}) and p{} (token {})",
                w[0].2,
                w[0].3,
                w[1].2,
                w[1].3
            );
            assert!(w[0].3 < w[1].3, "tokens not increasing: {terms:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn observe_prints_changes() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "lockctl elect --observe", async {
        let mut obs = lockctl_command(&c.endpoints().join(","))
            .args(["elect", "/e/e", "--observe"])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn observer");
        let mut lines = BufReader::new(obs.stdout.take().unwrap()).lines();
        macro_rules! next {
            () => {
                tokio::time::timeout(WAIT, lines.next_line())
                    .await
                    .expect("a line")
                    .unwrap()
                    .expect("not EOF")
            };
        }
        assert_eq!(next!(), "no leader");
        let log: Log = Arc::default();
        let a = candidate(&c, 0, "/e/e", &log);
        let l = next!();
        assert!(l.starts_with("leader: cand-0 (token "), "{l}");
        let b = candidate(&c, 1, "/e/e", &log);
        let lister = client_for(&c, 2);
        wait_some(WAIT, "b queued", || {
            let lister = lister.clone();
            async move {
                let l = lister.list("/e/e").await.ok()?;
                (l.children.len() == 2).then_some(())
            }
        })
        .await
        .unwrap();
        a.resign.send(()).unwrap();
        let l = next!();
        assert!(l.starts_with("leader: cand-1 (token "), "{l}");
        drop(a.resign);
        a.task.await.unwrap();
        drop(b.resign);
        b.task.await.unwrap();
        assert_eq!(next!(), "no leader");
        signal(obs.id().expect("running"), libc::SIGINT);
        let st = tokio::time::timeout(WAIT, obs.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(st.success());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn command_runs_only_while_leader() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "lockctl elect -- CMD", async {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("token");
        let script = format!(
            "echo $LOCKD_FENCING_TOKEN > {}; trap 'echo stopped >> {0}; exit 0' TERM; \
             while :; do sleep 0.1; done",
            out.display()
        );
        let mut p = lockctl_command(&c.endpoints().join(","))
            .args([
                "elect", "/e/f", "w1", "--ttl", "2s", "--", "sh", "-c", &script,
            ])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn lockctl");
        let mut lines = BufReader::new(p.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a line")
            .unwrap()
            .expect("not EOF");
        let token: u64 = first
            .strip_prefix("leader: w1 (token ")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("unexpected line {first:?}"))
            .parse()
            .unwrap();
        let got = wait_some(WAIT, "CMD writes its token", || {
            let out = out.clone();
            async move {
                std::fs::read_to_string(&out)
                    .ok()
                    .filter(|s| s.ends_with('\n'))
            }
        })
        .await
        .unwrap();
        assert_eq!(got.trim(), token.to_string());
        signal(p.id().expect("running"), libc::SIGINT);
        let st = tokio::time::timeout(WAIT, p.wait()).await.unwrap().unwrap();
        assert!(st.success(), "{st:?}");
        let next = lines.next_line().await.unwrap();
        assert_eq!(next.as_deref(), Some("not leader"));
        let got = std::fs::read_to_string(&out).unwrap();
        assert!(got.ends_with("stopped\n"), "CMD got SIGTERM: {got:?}");
        // Resigned: the election is empty again.
        let client = client_for(&c, 0);
        let mut obs = observe(client, "/e/f");
        let l = tokio::time::timeout(WAIT, obs.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l, None);
    })
    .await;
}

/// `ElectionConfig::renew_deadline` (client-go's RenewDeadline): a leader
/// cut off from every member (its keepalives fail while the cluster itself
/// is fine) stops leading once the renew deadline has passed since its last
/// renewal, while its session is still only Suspended, i.e. well before it
/// is Lost. The queued candidate leads only once the server has expired the
/// old session, so the terms do not overlap: the gap is about
/// `lease_ttl - renew_deadline`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_off_leader_steps_down_at_the_renew_deadline_before_lost() {
    use lockd_client::recipes::Campaign;
    use lockd_client::SessionState;
    use lockd_e2e::proxy::Proxy;

    const TTL: Duration = Duration::from_secs(6);
    const RENEW: Duration = Duration::from_secs(2);
    const RETRY: Duration = Duration::from_millis(250);

    /// The next StartedLeading or StoppedLeading (NewLeader skipped).
    async fn next_term_event(c: &mut Campaign, limit: Duration) -> ElectionEvent {
        tokio::time::timeout(limit, async {
            loop {
                match c.next().await.expect("campaign runs") {
                    ElectionEvent::NewLeader { .. } => {}
                    ev => return ev,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no term event within {limit:?}"))
    }

    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "renew deadline", async {
        let config = |id: &str| {
            ElectionConfig::new(id, TTL)
                .with_renew_deadline(RENEW)
                .with_retry_period(RETRY)
        };
        // A reaches the members only through proxies.
        let mut proxies = Vec::new();
        for id in c.ids() {
            proxies.push(Proxy::start(&c.addr(id)).await.expect("proxy"));
        }
        let a_client = Client::connect(proxies.iter().map(|p| p.endpoint())).expect("client");
        let a = LeaderElection::new(a_client, "/e/renew", config("a")).expect("config");
        let mut ca = a.campaign();
        let mut a_state = ca.session_state();
        let ElectionEvent::StartedLeading {
            fencing_token: token_a,
            ..
        } = next_term_event(&mut ca, WAIT).await
        else {
            panic!("a did not start leading first");
        };
        let lister = client_for(&c, 1);
        let b = LeaderElection::new(client_for(&c, 2), "/e/renew", config("b")).expect("config");
        let mut cb = b.campaign();
        wait_some(WAIT, "b queued behind a", || {
            let lister = lister.clone();
            async move {
                let l = lister.list("/e/renew").await.ok()?;
                (l.children.len() == 2).then_some(())
            }
        })
        .await
        .expect("b queued");

        for p in &proxies {
            p.cut().await;
        }
        let cut_at = Instant::now();
        let ev = next_term_event(&mut ca, TTL).await;
        let stopped_at = Instant::now();
        let state_then = *a_state.borrow_and_update();
        let ElectionEvent::StoppedLeading { reason } = ev else {
            panic!("expected StoppedLeading, got {ev:?}");
        };
        let after = stopped_at - cut_at;
        eprintln!("a stepped down {after:?} after the cut: {reason}");
        assert!(reason.contains("renew deadline passed"), "{reason}");
        assert_eq!(state_then, SessionState::Suspended, "not yet Lost");
        // The last renewal was at most a retry period (plus a round trip)
        // before the cut; the deadline counts from it, not from the cut.
        assert!(
            after >= RENEW - RETRY - Duration::from_millis(500),
            "stepped down too early: {after:?}"
        );
        assert!(after < TTL - Duration::from_secs(2), "too late: {after:?}");

        // Lost comes only about TTL - RENEW later.
        tokio::time::timeout(TTL, a_state.wait_for(|s| *s == SessionState::Lost))
            .await
            .expect("a's session lost within the TTL")
            .expect("state");
        let lost_after = stopped_at.elapsed();
        eprintln!("a's session Lost {lost_after:?} after it stepped down");
        assert!(
            lost_after >= TTL - RENEW - Duration::from_secs(1),
            "{lost_after:?}"
        );

        // b leads once the server expired a's session: after a stopped.
        let ev = next_term_event(&mut cb, TTL + WAIT).await;
        let b_started_at = Instant::now();
        let ElectionEvent::StartedLeading {
            fencing_token: token_b,
            ..
        } = ev
        else {
            panic!("expected b to start leading, got {ev:?}");
        };
        eprintln!(
            "b started leading {:?} after a stepped down",
            b_started_at - stopped_at
        );
        assert!(b_started_at > stopped_at);
        assert!(token_b > token_a);

        for p in &proxies {
            p.heal();
        }
        let rest = cb.cancel().await;
        assert!(
            rest.iter()
                .any(|e| matches!(e, ElectionEvent::StoppedLeading { .. })),
            "{rest:?}"
        );
        ca.cancel().await;
    })
    .await;
}
