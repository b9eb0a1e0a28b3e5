//! The operator's planner driving real lockd processes
//! ([`lockd_e2e::local_operator`]): bootstrap from nothing, scale 1 -> 3 ->
//! 5 -> 3, a rolling upgrade, and the replacement of a member whose volume
//! was lost, all under a write load and a contended lock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockd_client::recipes::Mutex;
use lockd_client::{proto, Client, ClientOptions, Error};
use lockd_e2e::local_operator::{
    LocalOperator, LocalOperatorOptions, ProgressMonitor, Restart, Steady,
};
use lockd_e2e::{
    bounded, kv_client, role_of, verify_acked, wait_for, wait_until, ClusterOptions, Writer,
};
use lockd_operator::plan::{Action, Desired, NodeId};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bound of one reconcile phase.
const PHASE: Duration = Duration::from_secs(120);
/// Bound of waits for load progress and convergence checks.
const WAIT: Duration = Duration::from_secs(60);

const LOCK: &str = "/oplocal/lock";
const COUNTER: &str = "/oplocal/counter";
/// One child per applied increment: `<n>-t<token>-<task>-<attempt>`.
const LOG: &str = "/oplocal/log";

fn desired(replicas: u32, version: &str) -> Desired {
    Desired {
        replicas,
        version: version.to_string(),
        caught_up_lag: 100,
        delete_volume_on_scale_down: true,
    }
}

fn options() -> LocalOperatorOptions {
    LocalOperatorOptions {
        cluster_id: "oplocal".to_string(),
        cluster: ClusterOptions {
            // Generous for 2 shared cores: no elections from CPU starvation.
            election_timeout_ms: 1000,
            ..ClusterOptions::default()
        },
        ..LocalOperatorOptions::default()
    }
}

// ---------------------------------------------------------------------------
// Load: a writer plus lock contenders
// ---------------------------------------------------------------------------

/// One acquisition of the lock by a contender.
#[derive(Clone, Debug)]
struct Hold {
    task: usize,
    token: u64,
    acquired: Instant,
    /// When the last successful guarded write was sent.
    last_ok_sent: Option<Instant>,
    writes: u32,
}

#[derive(Debug, Default)]
struct LockerReport {
    holds: Vec<Hold>,
    /// Guarded writes that failed without an answer: may have applied.
    uncertain: u64,
    /// Guarded writes rejected because the lock moved on.
    fenced: u64,
    errors: Vec<String>,
}

fn put_op(path: String, data: impl Into<Vec<u8>>) -> proto::Op {
    proto::Op {
        op: Some(proto::op::Op::Put(proto::PutRequest {
            path,
            data: data.into(),
            expected_version: None,
            parents: true,
        })),
    }
}

async fn read_counter(client: &Client) -> Result<u64, Error> {
    match client.get(COUNTER).await {
        Ok(r) => {
            let data = r.node.map(|n| n.data).unwrap_or_default();
            String::from_utf8_lossy(&data)
                .parse()
                .map_err(|e| Error::InvalidArgument(format!("counter {data:?}: {e}")))
        }
        Err(Error::NotFound(_)) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Acquires the lock again and again: under it, reads the counter and
/// writes counter + 1 with a guarded transaction (which also creates a log
/// child naming the new value), three times, then releases. One session
/// (and client, on the endpoints current at that time) per few holds.
async fn locker(
    task: usize,
    mut endpoints: watch::Receiver<Vec<String>>,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> LockerReport {
    const HOLDS_PER_SESSION: usize = 5;
    const WRITES_PER_HOLD: usize = 3;
    let mut rep = LockerReport::default();
    let mut attempt = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let eps = match endpoints.wait_for(|e| !e.is_empty()).await {
            Ok(e) => e.clone(),
            Err(_) => break,
        };
        let opts = ClientOptions {
            request_timeout: Duration::from_secs(5),
            retry_budget: Duration::from_secs(20),
        };
        let client = match Client::connect_with(eps, opts) {
            Ok(c) => c,
            Err(e) => {
                rep.errors.push(format!("connect: {e}"));
                break;
            }
        };
        let session = match client.open_session(Duration::from_secs(10)).await {
            Ok(s) => s,
            Err(e) => {
                rep.errors.push(format!("open session: {e}"));
                // Retry pacing while the cluster is not reachable.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mutex = Mutex::new(client.clone(), LOCK, &session);
        for _ in 0..HOLDS_PER_SESSION {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let guard = match mutex.lock_timeout(Duration::from_secs(30)).await {
                Ok(Some(g)) => g,
                Ok(None) => {
                    rep.errors.push("lock: not acquired within 30s".into());
                    break;
                }
                Err(e) => {
                    rep.errors.push(format!("lock: {e}"));
                    break;
                }
            };
            let token = guard.fencing_token();
            let mut hold = Hold {
                task,
                token,
                acquired: Instant::now(),
                last_ok_sent: None,
                writes: 0,
            };
            for _ in 0..WRITES_PER_HOLD {
                let n = match read_counter(&client).await {
                    Ok(n) => n,
                    Err(e) => {
                        rep.errors.push(format!("read counter: {e}"));
                        break;
                    }
                };
                attempt += 1;
                let entry = format!("{LOG}/{:010}-t{token}-{task}-{attempt}", n + 1);
                let txn = proto::TxnRequest {
                    success: vec![
                        put_op(COUNTER.to_string(), (n + 1).to_string()),
                        put_op(entry, token.to_string()),
                    ],
                    ..Default::default()
                };
                let sent = Instant::now();
                match guard.guarded_txn(txn).await {
                    Ok(r) if r.succeeded => {
                        hold.last_ok_sent = Some(sent);
                        hold.writes += 1;
                        progress.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {
                        rep.fenced += 1;
                        break;
                    }
                    Err(e) => {
                        if !e.is_unavailable() {
                            rep.uncertain += 1;
                        }
                        rep.errors.push(format!("guarded txn: {e}"));
                        break;
                    }
                }
            }
            rep.holds.push(hold);
            if let Err(e) = guard.unlock().await {
                rep.errors.push(format!("unlock: {e}"));
                break;
            }
        }
        if let Err(e) = session.close().await {
            rep.errors.push(format!("close session: {e}"));
        }
    }
    rep
}

/// The background load: a [`Writer`] and two lock contenders, all following
/// the endpoints the operator publishes.
struct Load {
    writer: Arc<Writer>,
    lock_writes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    lockers: Vec<JoinHandle<LockerReport>>,
}

impl Load {
    fn start(op: &mut LocalOperator, with_lock: bool) -> Load {
        let writer = Arc::new(Writer::spawn(
            Vec::new(),
            "/oplocal/w",
            Duration::from_secs(5),
        ));
        let w = writer.clone();
        op.set_progress(ProgressMonitor::spawn(
            move || w.acked(),
            Duration::from_millis(5),
        ));
        let (tx, rx) = watch::channel(Vec::<String>::new());
        let w = writer.clone();
        op.on_endpoints(move |eps| {
            w.set_endpoints(eps.to_vec());
            tx.send_replace(eps.to_vec());
        });
        let stop = Arc::new(AtomicBool::new(false));
        let lock_writes = Arc::new(AtomicU64::new(0));
        let lockers = if with_lock {
            (0..2)
                .map(|task| {
                    tokio::spawn(locker(task, rx.clone(), stop.clone(), lock_writes.clone()))
                })
                .collect()
        } else {
            Vec::new()
        };
        Load {
            writer,
            lock_writes,
            stop,
            lockers,
        }
    }

    /// Waits until both the writer and (if any) the lock holders made
    /// progress.
    async fn progressed(&self, what: &str) {
        let n = self.writer.acked();
        self.writer
            .wait_acked(n + 20, WAIT)
            .await
            .unwrap_or_else(|e| panic!("writes progress {what}: {e:#}"));
        if !self.lockers.is_empty() {
            let l = self.lock_writes.load(Ordering::SeqCst);
            wait_until(WAIT, &format!("guarded writes progress {what}"), || async {
                self.lock_writes.load(Ordering::SeqCst) >= l + 3
            })
            .await
            .expect("guarded writes progress");
        }
    }

    /// Stops everything; the operator's sink and monitor are detached.
    async fn stop(self, op: &mut LocalOperator) -> (lockd_e2e::WriterReport, Vec<LockerReport>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut reports = Vec::new();
        for l in self.lockers {
            reports.push(l.await.expect("locker task"));
        }
        op.clear_endpoint_sink();
        if let Some(m) = op.take_progress() {
            m.stop().await;
        }
        let writer =
            Arc::try_unwrap(self.writer).unwrap_or_else(|_| panic!("the writer is still shared"));
        (writer.stop().await, reports)
    }
}

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

/// After a phase: exactly the desired voters, no learner, every member
/// healthy, on the desired version and agreeing on the leader and the
/// membership (asked directly, not through the operator); every other
/// member created so far is gone (process stopped, data dir deleted).
async fn check_phase(op: &LocalOperator, s: &Steady, d: &Desired) {
    let voters = s.voters();
    assert_eq!(
        voters.len(),
        d.replicas as usize,
        "voters {voters:?} after reconciling to {} replicas",
        d.replicas
    );
    let view = s.view().expect("a raft view");
    assert!(
        view.learners.is_empty(),
        "learners left: {:?}",
        view.learners
    );
    assert_eq!(
        s.report.plan.health.healthy_voters, voters,
        "every voter healthy"
    );
    let c = op.cluster();
    let ids: Vec<NodeId> = voters.iter().copied().collect();
    let leader = c
        .wait_for_leader_among(&ids, WAIT)
        .await
        .expect("the voters agree on a leader");
    assert!(voters.contains(&leader));
    for &id in &ids {
        assert_eq!(op.version_of(id), Some(d.version.as_str()), "member {id}");
        wait_for(
            WAIT,
            &format!("member {id} to report the membership"),
            || async {
                let st = c
                    .status(id)
                    .await
                    .map_err(|e| anyhow::anyhow!("status: {e}"))?;
                let got: BTreeSet<NodeId> = st
                    .members
                    .iter()
                    .filter(|m| m.voter)
                    .map(|m| m.id)
                    .collect();
                let learners = st.members.iter().filter(|m| !m.voter).count();
                anyhow::ensure!(
                    got == voters && learners == 0 && !st.joint && st.cluster_id == "oplocal",
                    "member {id}: voters {got:?}, {learners} learners, joint {}, role {:?}",
                    st.joint,
                    role_of(&st)
                );
                Ok(())
            },
        )
        .await
        .expect("membership as desired on every voter");
        c.wait_ready(id, WAIT).await.expect("every voter ready");
    }
    for &id in op.created_ids() {
        if !voters.contains(&id) {
            assert!(!c.is_running(id), "removed member {id} still runs");
            assert!(
                !c.data_dir(id).exists(),
                "removed member {id} still has its data dir"
            );
        }
    }
    assert_eq!(op.member_ids(), ids, "no member besides the voters");
}

/// Ids are allocated in increasing order, and an id that left the
/// membership never comes back.
fn check_ids_never_reused(op: &LocalOperator) {
    let created = op.created_ids();
    assert!(
        created.windows(2).all(|w| w[0] < w[1]),
        "ids created out of order or twice: {created:?}"
    );
    let mut ever = BTreeSet::new();
    let mut departed = BTreeSet::new();
    for m in op.membership_changes() {
        let now: BTreeSet<NodeId> = m.voters.union(&m.learners).copied().collect();
        let back: Vec<&NodeId> = now.intersection(&departed).collect();
        assert!(back.is_empty(), "ids {back:?} came back (pass {})", m.pass);
        ever.extend(now.iter().copied());
        departed.extend(ever.difference(&now).copied());
    }
}

fn print_restarts(restarts: &[Restart]) {
    for r in restarts {
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:.0}ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        eprintln!(
            "restart of member {} ({:?} -> {}){}: down {} , healthy again after {}, longest write gap {}",
            r.id,
            r.from_version.as_deref().unwrap_or("?"),
            r.to_version,
            if r.was_leader { " as LEADER" } else { "" },
            ms(r.started_at.map(|s| s - r.stopped_at)),
            ms(r.healthy_at.map(|h| h - r.stopped_at)),
            ms(r.write_gap),
        );
    }
}

/// The counter equals the number of applied increments, each value was
/// written exactly once (no two holders ever read the same value), and in
/// value order the fencing tokens never go back; the holds that wrote are
/// disjoint in time with strictly increasing tokens.
async fn check_lock(client: &Client, reports: &[LockerReport]) {
    let counter = read_counter(client).await.expect("read the counter");
    let list = client.list(LOG).await.expect("list the increment log");
    let mut entries: Vec<(u64, u64)> = list
        .children
        .iter()
        .map(|n| {
            let name = n.path.rsplit('/').next().unwrap_or_default();
            let mut parts = name.split('-');
            let value = parts.next().and_then(|v| v.parse().ok()).expect("value");
            let token = parts
                .next()
                .and_then(|t| t.strip_prefix('t'))
                .and_then(|t| t.parse().ok())
                .expect("token");
            (value, token)
        })
        .collect();
    entries.sort();
    let values: Vec<u64> = entries.iter().map(|e| e.0).collect();
    let expected: Vec<u64> = (1..=counter).collect();
    assert_eq!(
        values, expected,
        "every increment 1..={counter} applied exactly once (a duplicate means two holders at once)"
    );
    assert!(
        entries.windows(2).all(|w| w[0].1 <= w[1].1),
        "fencing tokens go back in increment order: {entries:?}"
    );

    let mut holds: Vec<&Hold> = reports
        .iter()
        .flat_map(|r| r.holds.iter())
        .filter(|h| h.writes > 0)
        .collect();
    holds.sort_by_key(|h| h.acquired);
    for w in holds.windows(2) {
        assert!(
            w[1].token > w[0].token,
            "tokens not strictly increasing: task {} token {} then task {} token {}",
            w[0].task,
            w[0].token,
            w[1].task,
            w[1].token
        );
        let end = w[0].last_ok_sent.expect("a hold that wrote");
        assert!(
            w[1].acquired >= end,
            "two holders at once: token {} wrote at {:?}, token {} held from {:?}",
            w[0].token,
            end,
            w[1].token,
            w[1].acquired
        );
    }
    let writes: u64 = holds.iter().map(|h| u64::from(h.writes)).sum();
    let uncertain: u64 = reports.iter().map(|r| r.uncertain).sum();
    assert!(
        writes <= counter && counter <= writes + uncertain,
        "counter {counter}, acknowledged guarded writes {writes}, uncertain {uncertain}"
    );
    for (task, r) in reports.iter().enumerate() {
        assert!(
            r.holds.iter().any(|h| h.writes > 0),
            "contender {task} never wrote under the lock: {:?}",
            r.errors
        );
    }
    eprintln!(
        "lock: counter {counter}, {} holds with writes, fenced {}, uncertain {uncertain}, errors {:?}",
        holds.len(),
        reports.iter().map(|r| r.fenced).sum::<u64>(),
        reports.iter().flat_map(|r| r.errors.iter()).take(10).collect::<Vec<_>>()
    );
}

/// Reads every acknowledged write back from the leader.
async fn check_writes(op: &LocalOperator, report: &lockd_e2e::WriterReport) {
    assert!(
        report.errors.is_empty(),
        "unexpected write errors: {:?}",
        report.errors
    );
    let leader = op.last_view().expect("a view").leader;
    let ep = op.cluster().endpoint(leader);
    verify_acked(&mut kv_client(&ep, Duration::from_secs(10)), &report.acked)
        .await
        .expect("no acknowledged write lost");
    eprintln!(
        "writes: {} acknowledged and read back, {} ambiguous, {} unavailable",
        report.acked.len(),
        report.ambiguous,
        report.unavailable
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_scale_and_rolling_upgrade() {
    let began = Instant::now();
    let mut op = LocalOperator::start(options())
        .await
        .expect("start the local operator");
    bounded(Duration::from_secs(300), "operator_local", async {
        let load = Load::start(&mut op, true);
        let mut phases = Vec::new();
        for replicas in [1, 3, 5, 3] {
            let d = desired(replicas, "v1");
            let s = op
                .reconcile_until_steady(&d, PHASE)
                .await
                .unwrap_or_else(|e| panic!("reconcile to {replicas} replicas: {e:#}"));
            check_phase(&op, &s, &d).await;
            load.progressed(&format!("with {replicas} replicas")).await;
            phases.push((format!("{replicas} replicas"), s.elapsed, s.passes));
        }
        assert_eq!(op.created_ids(), &[1, 2, 3, 4, 5]);

        // Rolling upgrade v1 -> v2.
        let before = op.last_view().expect("a view").clone();
        let mark = op.actions().len();
        let restarts_mark = op.restarts().len();
        let d = desired(3, "v2");
        let s = op
            .reconcile_until_steady(&d, PHASE)
            .await
            .unwrap_or_else(|e| panic!("rolling upgrade: {e:#}"));
        check_phase(&op, &s, &d).await;
        load.progressed("after the upgrade").await;
        phases.push(("upgrade v1 -> v2".to_string(), s.elapsed, s.passes));

        let upgrade: Vec<_> = op.actions()[mark..]
            .iter()
            .filter(|a| a.ok())
            .cloned()
            .collect();
        for a in &upgrade {
            eprintln!(
                "upgrade: pass {} (leader {:?}): {}",
                a.pass, a.leader, a.action
            );
            assert!(
                matches!(
                    a.action,
                    Action::DeletePod { .. }
                        | Action::CreatePod { .. }
                        | Action::TransferLeader { .. }
                ),
                "unexpected action during the upgrade: {}",
                a.action
            );
        }
        let deletes: Vec<(usize, NodeId)> = upgrade
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match a.action {
                Action::DeletePod { id } => Some((i, id)),
                _ => None,
            })
            .collect();
        let restarted: BTreeSet<NodeId> = deletes.iter().map(|d| d.1).collect();
        assert_eq!(deletes.len(), 3, "three restarts: {deletes:?}");
        assert_eq!(
            restarted, before.voters,
            "every member restarted exactly once"
        );
        for &(i, id) in &deletes {
            assert_ne!(
                upgrade[i].leader,
                Some(id),
                "member {id} was restarted while it led"
            );
            let recreated: Vec<usize> = upgrade
                .iter()
                .enumerate()
                .filter(|(_, a)| a.action == Action::CreatePod { id })
                .map(|(j, _)| j)
                .collect();
            assert_eq!(recreated.len(), 1, "member {id} started once on v2");
            assert!(recreated[0] > i, "member {id} started after it stopped");
        }
        // The leader last: the last member restarted led until a transfer
        // away from it, which came after every other member was back.
        let (last_i, last) = *deletes.last().expect("restarts");
        let transfer = upgrade[..last_i]
            .iter()
            .rposition(|a| matches!(a.action, Action::TransferLeader { to } if to != last))
            .expect("a TransferLeader before the last restart");
        assert_eq!(
            upgrade[transfer].leader,
            Some(last),
            "the transfer moved leadership away from member {last}"
        );
        for &(i, id) in &deletes[..deletes.len() - 1] {
            let back = upgrade
                .iter()
                .position(|a| a.action == Action::CreatePod { id })
                .expect("recreated");
            assert!(
                i < transfer && back < transfer,
                "follower {id} restarted before the leader's hand-over"
            );
        }
        if last != before.leader {
            eprintln!(
                "note: leadership moved from {} to {last} during the upgrade before the hand-over",
                before.leader
            );
        }
        let restarts: Vec<Restart> = op.restarts()[restarts_mark..].to_vec();
        print_restarts(&restarts);
        for r in &restarts {
            assert_eq!(r.from_version.as_deref(), Some("v1"));
            assert_eq!(r.to_version, "v2");
            assert!(r.healthy_at.is_some(), "member {} healthy again", r.id);
            assert!(
                r.write_gap.is_some(),
                "writes resumed after the restart of member {}",
                r.id
            );
        }
        let last_restart = restarts.last().expect("restarts");
        assert!(last_restart.transfer_at.is_some() && !last_restart.was_leader);

        check_ids_never_reused(&op);
        assert_eq!(
            op.created_ids(),
            &[1, 2, 3, 4, 5],
            "no member created by the upgrade"
        );

        let (writes, lockers) = load.stop(&mut op).await;
        check_writes(&op, &writes).await;
        let client = Client::connect(op.member_endpoints()).expect("client");
        check_lock(&client, &lockers).await;

        for (what, took, passes) in &phases {
            eprintln!("phase {what}: {:.1}s, {passes} passes", took.as_secs_f64());
        }
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for a in op.actions() {
            let kind = format!("{:?}", a.action);
            let kind = kind
                .split([' ', '{'])
                .next()
                .unwrap_or_default()
                .to_string();
            *counts.entry(kind).or_default() += 1;
        }
        eprintln!("actions executed: {counts:?}");
        eprintln!("total {:.1}s", began.elapsed().as_secs_f64());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaces_a_member_whose_volume_is_lost() {
    let began = Instant::now();
    let mut op = LocalOperator::start(options())
        .await
        .expect("start the local operator");
    bounded(
        Duration::from_secs(180),
        "operator_local replacement",
        async {
            let load = Load::start(&mut op, false);
            let d = desired(3, "v1");
            let s = op
                .reconcile_until_steady(&d, PHASE)
                .await
                .unwrap_or_else(|e| panic!("reconcile to 3 replicas: {e:#}"));
            check_phase(&op, &s, &d).await;
            load.progressed("with 3 replicas").await;
            let before = s.voters();
            let leader = s.view().expect("view").leader;
            let victim = *before.iter().find(|id| **id != leader).expect("a follower");

            // The volume is lost: stop the member and delete its data dir.
            let c = op.cluster();
            c.terminate(victim, Duration::from_secs(20))
                .await
                .expect("stop the victim");
            c.wipe(victim).expect("delete its data dir");
            let mark = op.actions().len();
            let s = op
                .reconcile_until_steady(&d, PHASE)
                .await
                .unwrap_or_else(|e| panic!("replace member {victim}: {e:#}"));
            check_phase(&op, &s, &d).await;
            load.progressed("after the replacement").await;

            let acts: Vec<Action> = op.actions()[mark..]
                .iter()
                .filter(|a| a.ok())
                .map(|a| a.action.clone())
                .collect();
            eprintln!("replacement actions: {acts:?}");
            let new = *before.iter().max().expect("ids") + 1;
            let pos = |a: &Action| acts.iter().position(|x| x == a);
            let created =
                pos(&Action::CreateMember { id: new }).expect("a new member under a new id");
            let added =
                pos(&Action::AddLearner { id: new }).expect("the new member added as a learner");
            let want: BTreeSet<NodeId> = before
                .iter()
                .copied()
                .filter(|id| *id != victim)
                .chain([new])
                .collect();
            let swapped = pos(&Action::ChangeVoters {
                voters: want.clone(),
            })
            .expect("one ChangeVoters: old out, new in");
            let deleted = pos(&Action::DeleteMember {
                id: victim,
                delete_volume: true,
            })
            .expect("the old member deleted");
            assert!(
                created < added && added < swapped && swapped < deleted,
                "{acts:?}"
            );
            assert!(
            !acts.iter().any(|a| matches!(
                a,
                Action::CreatePod { id } | Action::CreateMember { id } | Action::AddLearner { id }
                    if *id == victim
            )),
            "the lost member {victim} must not come back: {acts:?}"
        );
            assert_eq!(s.voters(), want);
            assert_eq!(op.created_ids(), &[1, 2, 3, new]);
            check_ids_never_reused(&op);
            let last = op.membership_changes().last().expect("membership seen");
            assert!(!last.voters.contains(&victim) && !last.learners.contains(&victim));
            assert!(!op.cluster().is_running(victim));

            let (writes, _) = load.stop(&mut op).await;
            check_writes(&op, &writes).await;
            eprintln!("total {:.1}s", began.elapsed().as_secs_f64());
        },
    )
    .await;
}
