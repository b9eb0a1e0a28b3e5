//! Membership changes, snapshots, leadership transfer and identity checks.

use std::path::Path;
use std::time::Duration;

use lockd_e2e::v1::{
    AddLearnerRequest, ChangeVotersRequest, Role, SnapshotRequest, TransferLeaderRequest,
};
use lockd_e2e::{
    bounded, get, put, role_of, verify_acked, wait_for, wait_until, Cluster, ClusterOptions,
    MemberConfig, Writer,
};

const WAIT: Duration = Duration::from_secs(20);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

/// (id, addr, voter), sorted by id.
fn full_members(members: &[lockd_e2e::v1::Member]) -> Vec<(u64, String, bool)> {
    let mut v: Vec<_> = members
        .iter()
        .map(|m| (m.id, m.addr.clone(), m.voter))
        .collect();
    v.sort();
    v
}

fn expected(c: &Cluster, voters: &[u64], learners: &[u64]) -> Vec<(u64, String, bool)> {
    let mut v: Vec<_> = voters
        .iter()
        .map(|&id| (id, c.addr(id), true))
        .chain(learners.iter().map(|&id| (id, c.addr(id), false)))
        .collect();
    v.sort();
    v
}

/// Waits until each of `on` reports exactly `want` as members, not joint.
async fn wait_members(c: &Cluster, on: &[u64], want: &[(u64, String, bool)]) {
    for &id in on {
        wait_for(
            WAIT,
            &format!("member {id} to report members {want:?}"),
            || async {
                let s = c
                    .status(id)
                    .await
                    .map_err(|e| anyhow::anyhow!("status: {e}"))?;
                let got = full_members(&s.members);
                if got == want && !s.joint {
                    Ok(())
                } else {
                    anyhow::bail!("got {got:?} joint={}", s.joint)
                }
            },
        )
        .await
        .expect("membership converges");
    }
}

async fn add_learner(c: &Cluster, via: u64, id: u64) {
    let addr = c.start_new_member(id).expect("start new member");
    c.wait_healthy(id, WAIT).await.expect("new member up");
    let resp = c
        .cluster_client_with_timeout(via, ADMIN_TIMEOUT)
        .add_learner(AddLearnerRequest {
            id,
            addr: addr.clone(),
            wait: true,
        })
        .await
        .unwrap_or_else(|e| panic!("AddLearner {id}: {e}"))
        .into_inner();
    assert!(
        resp.members
            .iter()
            .any(|m| m.id == id && !m.voter && m.addr == addr),
        "AddLearner response lists {id} as learner: {:?}",
        resp.members
    );
}

async fn change_voters(
    c: &Cluster,
    via: u64,
    voters: &[u64],
    remove_dropped: bool,
) -> Vec<(u64, String, bool)> {
    let resp = c
        .cluster_client_with_timeout(via, ADMIN_TIMEOUT)
        .change_voters(ChangeVotersRequest {
            voters: voters.to_vec(),
            remove_dropped,
        })
        .await
        .unwrap_or_else(|e| panic!("ChangeVoters {voters:?}: {e}"))
        .into_inner();
    full_members(&resp.members)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_catch_up() {
    let c = Cluster::start(3, ClusterOptions::default().snapshot_threshold(50))
        .await
        .expect("start 3 members");
    bounded(Duration::from_secs(150), "snapshot_catch_up", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        let mut kv = c.kv(leader);
        for i in 0..300 {
            put(&mut kv, &format!("/s/{i}"), format!("s{i}"))
                .await
                .expect("put");
        }
        let snap = c
            .cluster_client_with_timeout(leader, ADMIN_TIMEOUT)
            .snapshot(SnapshotRequest {})
            .await
            .expect("Snapshot admin call")
            .into_inner();
        assert!(
            snap.snapshot_index > 0,
            "snapshot index {}",
            snap.snapshot_index
        );
        // The log behind the snapshot is purged, so a new member cannot be
        // caught up from the log: it must receive the snapshot.
        let ls = wait_for(
            WAIT,
            "leader to purge its log behind the snapshot",
            || async {
                let s = c
                    .status(leader)
                    .await
                    .map_err(|e| anyhow::anyhow!("status: {e}"))?;
                if s.snapshot_index > 0 && s.purged_index > 0 {
                    Ok(s)
                } else {
                    anyhow::bail!(
                        "snapshot_index {} purged_index {}",
                        s.snapshot_index,
                        s.purged_index
                    )
                }
            },
        )
        .await
        .expect("log purged behind snapshot");
        assert!(ls.purged_index <= ls.snapshot_index);

        add_learner(&c, leader, 4).await;
        let s4 = wait_for(WAIT, "member 4 to be a learner with a snapshot", || async {
            let s = c
                .status(4)
                .await
                .map_err(|e| anyhow::anyhow!("status: {e}"))?;
            // Its snapshot covers what the leader purged: it was installed
            // from the leader, not built from a log it never had.
            if role_of(&s) == Role::Learner && s.snapshot_index >= ls.purged_index {
                Ok(s)
            } else {
                anyhow::bail!("role {:?} snapshot_index {}", role_of(&s), s.snapshot_index)
            }
        })
        .await
        .expect("learner installed a snapshot");
        eprintln!(
            "member 4: snapshot_index {} applied {}",
            s4.snapshot_index, s4.applied_index
        );

        c.wait_caught_up(4, WAIT).await.expect("learner catches up");
        for i in [0, 1, 150, 299] {
            let g = get(&mut c.kv(4), &format!("/s/{i}"), true)
                .await
                .expect("serializable get on learner");
            assert_eq!(g.node.expect("node").data, format!("s{i}").into_bytes());
        }
        let ls = c.status(leader).await.expect("leader status");
        assert_eq!(full_members(&ls.members), expected(&c, &[1, 2, 3], &[4]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_1_3_5_3() {
    let c = Cluster::start(1, ClusterOptions::default())
        .await
        .expect("start 1 member");
    bounded(Duration::from_secs(180), "membership_1_3_5_3", async {
        assert_eq!(c.wait_for_leader(WAIT).await.expect("single leader"), 1);
        let w = Writer::spawn(vec![c.endpoint(1)], "/m", Duration::from_secs(5));
        w.wait_acked(10, WAIT)
            .await
            .expect("writes on the single member");

        // 1 -> 3
        for id in [2, 3] {
            add_learner(&c, 1, id).await;
        }
        wait_members(&c, &[1], &expected(&c, &[1], &[2, 3])).await;
        let got = change_voters(&c, 1, &[1, 2, 3], false).await;
        assert_eq!(got, expected(&c, &[1, 2, 3], &[]));
        wait_members(&c, &[1, 2, 3], &expected(&c, &[1, 2, 3], &[])).await;
        w.set_endpoints((1..=3).map(|id| c.endpoint(id)).collect());
        let n = w.acked();
        w.wait_acked(n + 20, WAIT)
            .await
            .expect("progress with 3 voters");

        // 3 -> 5
        let leader = c
            .wait_for_leader_among(&[1, 2, 3], WAIT)
            .await
            .expect("leader of 3");
        for id in [4, 5] {
            add_learner(&c, leader, id).await;
        }
        let got = change_voters(&c, leader, &[1, 2, 3, 4, 5], false).await;
        assert_eq!(got, expected(&c, &[1, 2, 3, 4, 5], &[]));
        wait_members(&c, &[1, 2, 3, 4, 5], &expected(&c, &[1, 2, 3, 4, 5], &[])).await;
        c.wait_for_leader_among(&[1, 2, 3, 4, 5], WAIT)
            .await
            .expect("leader of 5");
        w.set_endpoints((1..=5).map(|id| c.endpoint(id)).collect());
        let n = w.acked();
        w.wait_acked(n + 20, WAIT)
            .await
            .expect("progress with 5 voters");

        // 5 -> 3, removing 4 and 5
        w.set_endpoints((1..=3).map(|id| c.endpoint(id)).collect());
        let leader = c
            .wait_for_leader_among(&[1, 2, 3, 4, 5], WAIT)
            .await
            .expect("leader of 5");
        let got = change_voters(&c, leader, &[1, 2, 3], true).await;
        assert_eq!(got, expected(&c, &[1, 2, 3], &[]));
        wait_members(&c, &[1, 2, 3], &expected(&c, &[1, 2, 3], &[])).await;
        let leader = c
            .wait_for_leader_among(&[1, 2, 3], WAIT)
            .await
            .expect("leader of 3 after shrink");
        assert!(
            leader <= 3,
            "leader {leader} must be one of the remaining voters"
        );
        let n = w.acked();
        w.wait_acked(n + 20, WAIT)
            .await
            .expect("progress after shrinking to 3");

        let report = w.stop().await;
        assert!(
            report.errors.is_empty(),
            "unexpected write errors: {:?}",
            report.errors
        );
        verify_acked(&mut c.kv(leader), &report.acked)
            .await
            .expect("no acknowledged write lost");
        // Removed members no longer take part: stopping them keeps the cluster working.
        c.kill(4);
        c.kill(5);
        put(&mut c.kv(1), "/m/final", "f")
            .await
            .expect("write after removed members stopped");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_leader() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(Duration::from_secs(90), "transfer_leader", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        let term0 = c.status(leader).await.expect("status").term;
        let target = c.followers(leader)[0];
        c.wait_caught_up(target, WAIT)
            .await
            .expect("target caught up");

        c.cluster_client(leader)
            .transfer_leader(TransferLeaderRequest { id: target })
            .await
            .expect("TransferLeader");
        wait_until(
            WAIT,
            &format!("member {target} to become leader"),
            || async { matches!(c.status(target).await, Ok(s) if role_of(&s) == Role::Leader) },
        )
        .await
        .expect("transfer completes");
        assert_eq!(c.wait_for_leader(WAIT).await.expect("agreement"), target);
        let s = c.status(target).await.expect("status");
        assert!(s.term > term0, "term must grow: {} -> {}", term0, s.term);

        for id in c.ids() {
            put(&mut c.kv(id), &format!("/tl/{id}"), "x")
                .await
                .expect("write after transfer");
        }
        for id in c.ids() {
            get(&mut c.kv(target), &format!("/tl/{id}"), false)
                .await
                .expect("read after transfer");
        }
    })
    .await;
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), dest)?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_member_refused() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(Duration::from_secs(150), "wiped_member_refused", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        for i in 0..20 {
            put(&mut c.kv(leader), &format!("/r/{i}"), "x")
                .await
                .expect("put");
        }
        let f = c.followers(leader);
        let (victim, other) = (f[0], f[1]);
        c.wait_caught_up(victim, WAIT)
            .await
            .expect("victim caught up");

        // Same id, wiped data dir, same --initial-members: refused.
        let st = c
            .terminate(victim, Duration::from_secs(10))
            .await
            .expect("SIGTERM");
        assert_eq!(st.code(), Some(0));
        c.wipe(victim).expect("wipe");
        c.restart(victim).expect("start wiped member");
        let st = c
            .wait_exit(victim, Duration::from_secs(30))
            .await
            .expect("a wiped member reusing a used id must exit");
        assert!(!st.success(), "wiped member must exit non-zero, got {st}");
        let log = c.log_since_start(victim);
        assert!(
            log.contains("already used"),
            "stderr must say the id is already used:\n{log}"
        );
        put(&mut c.kv(leader), "/r/after-wipe", "y")
            .await
            .expect("cluster still serves writes");
        let s = c.status(leader).await.expect("leader status");
        assert!(
            s.members.iter().any(|m| m.id == victim),
            "membership unchanged by the refused start"
        );

        // A copy of `other`'s data dir started under another id is refused.
        c.terminate(other, Duration::from_secs(10))
            .await
            .expect("SIGTERM other");
        let copy = c.root().join("copy-of-other");
        copy_dir(&c.data_dir(other), &copy).expect("copy data dir");
        c.restart(other).expect("restart other");
        c.wait_for_leader(WAIT)
            .await
            .expect("leader with other back");
        c.start_member(
            5,
            MemberConfig {
                data_dir: Some(copy.clone()),
                ..Default::default()
            },
        )
        .expect("start id 5 on other's data");
        let st = c
            .wait_exit(5, Duration::from_secs(30))
            .await
            .expect("id mismatch must exit");
        assert!(!st.success(), "id mismatch must exit non-zero, got {st}");
        let log = c.log_since_start(5).to_lowercase();
        assert!(
            log.contains("id") && log.contains(&other.to_string()) && log.contains('5'),
            "stderr must name the ids ({other} recorded, 5 given):\n{log}"
        );

        // The same data under the right id but another cluster id is refused.
        c.terminate(other, Duration::from_secs(10))
            .await
            .expect("SIGTERM other");
        c.restart_with_args(other, &["--cluster-id", "not-lockd"])
            .expect("start with wrong cluster id");
        let st = c
            .wait_exit(other, Duration::from_secs(30))
            .await
            .expect("cluster id mismatch must exit");
        assert!(
            !st.success(),
            "cluster id mismatch must exit non-zero, got {st}"
        );
        let log = c.log_since_start(other).to_lowercase();
        assert!(
            log.contains("cluster"),
            "stderr must mention the cluster id:\n{log}"
        );

        // Its data is untouched: it rejoins normally.
        c.restart(other).expect("restart other");
        c.wait_for_leader(WAIT).await.expect("leader after rejoin");
        put(&mut c.kv(other), "/r/end", "z")
            .await
            .expect("write via rejoined member");
        let g = get(&mut c.kv(other), "/r/after-wipe", false)
            .await
            .expect("read");
        assert_eq!(g.node.expect("node").data, b"y");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialize_an_empty_member() {
    let c = Cluster::start(0, ClusterOptions::default())
        .await
        .expect("empty harness");
    bounded(Duration::from_secs(60), "initialize", async {
        c.start_new_member(1)
            .expect("start member without --initial-members");
        c.wait_healthy(1, WAIT).await.expect("member up");
        let s = c.status(1).await.expect("status");
        assert_eq!(role_of(&s), Role::Uninitialized);
        let e = put(
            &mut c.kv_with_timeout(1, Duration::from_secs(30)),
            "/i/x",
            "1",
        )
        .await
        .expect_err("an uninitialized member has no cluster to write to");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

        c.cluster_client(1)
            .initialize(lockd_e2e::v1::InitializeRequest { members: vec![] })
            .await
            .expect("Initialize");
        assert_eq!(c.wait_for_leader(WAIT).await.expect("leader"), 1);
        put(&mut c.kv(1), "/i/x", "1")
            .await
            .expect("write after initialize");
        c.wait_ready(1, WAIT).await.expect("ready after initialize");

        let again = c
            .cluster_client(1)
            .initialize(lockd_e2e::v1::InitializeRequest { members: vec![] })
            .await
            .expect_err("a second Initialize is refused");
        assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    })
    .await;
}
