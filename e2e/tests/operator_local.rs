//! The operator's planner driving real lockd processes
//! ([`lockd_e2e::local_operator`]): bootstrap from nothing, scale 1 -> 3 ->
//! 5 -> 3, a rolling upgrade, and the replacement of a member whose volume
//! was lost, all under a write load and a contended lock.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::load::{self, check_lock, Load, LockerReport};
use lockd_client::Client;
use lockd_e2e::local_operator::{
    LocalOperator, LocalOperatorOptions, ProgressMonitor, Restart, Steady,
};
use lockd_e2e::{bounded, role_of, wait_for, ClusterOptions, WriterReport};
use lockd_operator::plan::{Action, Desired, NodeId};
use tokio::time::Instant;

/// Bound of one reconcile phase.
const PHASE: Duration = Duration::from_secs(120);
/// Bound of convergence checks (load progress waits as long, in
/// [`common::load`]).
const WAIT: Duration = Duration::from_secs(60);

/// Prefix of every key the load uses: `/oplocal/lock`, `/oplocal/counter`,
/// `/oplocal/log`, `/oplocal/w`.
const LOAD_PREFIX: &str = "/oplocal";

fn desired(replicas: u32, version: &str) -> Desired {
    Desired {
        replicas,
        version: version.to_string(),
        caught_up_lag: 100,
        delete_volume_on_scale_down: true,
        progress_deadline: Duration::from_secs(600),
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
// Load: a writer plus lock contenders ([`common::load`]), wired to the operator
// ---------------------------------------------------------------------------

/// Starts the load under [`LOAD_PREFIX`], following the endpoints the
/// operator publishes; the operator's progress monitor follows the writer.
fn start_load(op: &mut LocalOperator, with_lock: bool) -> Load {
    let load = Load::start(LOAD_PREFIX, with_lock);
    let w = load.writer().clone();
    op.set_progress(ProgressMonitor::spawn(
        move || w.acked(),
        Duration::from_millis(5),
    ));
    op.on_endpoints(load.endpoint_sink());
    load
}

/// Detaches the operator's sink and monitor, then stops the load.
async fn stop_load(load: Load, op: &mut LocalOperator) -> (WriterReport, Vec<LockerReport>) {
    op.clear_endpoint_sink();
    if let Some(m) = op.take_progress() {
        m.stop().await;
    }
    load.stop().await
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

/// Reads every acknowledged write back from the leader.
async fn check_writes(op: &LocalOperator, report: &WriterReport) {
    let leader = op.last_view().expect("a view").leader;
    load::check_writes(&op.cluster().endpoint(leader), report).await;
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
        let load = start_load(&mut op, true);
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

        let (writes, lockers) = stop_load(load, &mut op).await;
        check_writes(&op, &writes).await;
        let client = Client::connect(op.member_endpoints()).expect("client");
        check_lock(&client, LOAD_PREFIX, &lockers).await;

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
            let load = start_load(&mut op, false);
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

            let (writes, _) = stop_load(load, &mut op).await;
            check_writes(&op, &writes).await;
            eprintln!("total {:.1}s", began.elapsed().as_secs_f64());
        },
    )
    .await;
}
