//! Crashes, restarts and loss of quorum.

use std::time::Duration;

use lockd_e2e::{bounded, get, put, revision, verify_acked, Cluster, ClusterOptions, Writer};
use tokio::time::Instant;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_no_acked_write_lost() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(
        Duration::from_secs(150),
        "leader_kill_no_acked_write_lost",
        async {
            let leader = c.wait_for_leader(WAIT).await.expect("a leader");
            let w = Writer::spawn(c.endpoints(), "/w", Duration::from_secs(5));
            w.wait_acked(30, WAIT)
                .await
                .expect("writes before the kill");

            c.kill(leader);
            let at_kill = w.acked();
            let new_leader = c
                .wait_for_leader(WAIT)
                .await
                .expect("a new leader after kill -9");
            assert_ne!(new_leader, leader, "killed member cannot be leader");
            w.wait_acked(at_kill + 30, Duration::from_secs(30))
                .await
                .expect("writes resume on the new leader");

            let report = w.stop().await;
            eprintln!(
                "writer: {} acked, {} ambiguous, {} unavailable",
                report.acked.len(),
                report.ambiguous,
                report.unavailable
            );
            assert!(
                report.errors.is_empty(),
                "unexpected write errors: {:?}",
                report.errors
            );
            for (i, a) in report.acked.iter().enumerate() {
                assert_eq!(a.key, format!("/w/{i}"));
            }
            for pair in report.acked.windows(2) {
                assert!(
                    pair[1].revision > pair[0].revision,
                    "acked revisions must increase: {pair:?}"
                );
            }
            verify_acked(&mut c.kv(new_leader), &report.acked)
                .await
                .expect("every acked write survives");
            let other = c
                .followers(leader)
                .into_iter()
                .find(|&i| i != new_leader)
                .expect("third member");
            verify_acked(&mut c.kv(other), &report.acked)
                .await
                .expect("acked writes readable via the follower");

            // The killed member comes back and catches up.
            c.restart(leader).expect("restart killed member");
            c.wait_caught_up(leader, WAIT)
                .await
                .expect("restarted member catches up");
            let last = report.acked.last().expect("some writes");
            let g = get(&mut c.kv(leader), &last.key, true)
                .await
                .expect("serializable get on restarted member");
            assert_eq!(g.node.expect("node").data, last.value);
            c.wait_for_leader(WAIT)
                .await
                .expect("all three agree on a leader");
            c.wait_ready(leader, WAIT)
                .await
                .expect("restarted member ready");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cluster_kill_restart() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(
        Duration::from_secs(120),
        "full_cluster_kill_restart",
        async {
            c.wait_for_leader(WAIT).await.expect("a leader");
            let ids = c.ids();
            let m = 40usize;
            let mut last_rev = 0;
            for i in 0..m {
                let via = ids[i % ids.len()];
                let r = put(&mut c.kv(via), &format!("/f/{i}"), format!("v{i}"))
                    .await
                    .expect("put in a healthy cluster");
                last_rev = revision(&r.header);
            }

            for &id in &ids {
                c.kill(id);
            }
            for &id in &ids {
                c.restart(id).expect("restart");
            }
            c.wait_for_leader(WAIT)
                .await
                .expect("a leader after full restart");

            for i in 0..m {
                let via = ids[i % ids.len()];
                let g = get(&mut c.kv(via), &format!("/f/{i}"), false)
                    .await
                    .unwrap_or_else(|e| panic!("acked /f/{i} lost after full restart: {e}"));
                assert_eq!(g.node.expect("node").data, format!("v{i}").into_bytes());
                assert_eq!(
                    revision(&g.header),
                    last_rev,
                    "revision preserved across restart"
                );
            }
            let r = put(&mut c.kv(ids[0]), "/f/after", "x")
                .await
                .expect("write after restart");
            assert_eq!(
                revision(&r.header),
                last_rev + 1,
                "revision continues from the persisted one"
            );
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_leader_unavailable() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(Duration::from_secs(90), "no_leader_unavailable", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        put(&mut c.kv(leader), "/n/before", "1")
            .await
            .expect("write with quorum");
        let f = c.followers(leader);
        let (survivor, other) = (f[0], f[1]);
        c.kill(leader);
        c.kill(other);

        // The client deadline is far above the server's bounded wait, so the
        // answer must come from the server.
        let mut kv = c.kv_with_timeout(survivor, Duration::from_secs(60));
        let started = Instant::now();
        let res = tokio::time::timeout(Duration::from_secs(15), put(&mut kv, "/n/x", "lost")).await;
        let elapsed = started.elapsed();
        let res = res.expect("a write without quorum must return, not hang (15 s)");
        match res {
            Ok(r) => panic!("write without quorum succeeded: {r:?}"),
            Err(s) => assert_eq!(
                s.code(),
                Code::Unavailable,
                "after {elapsed:?}: {:?}",
                s.message()
            ),
        }
        eprintln!("UNAVAILABLE after {elapsed:?}");

        // Quorum back: the cluster works and the refused write was not applied.
        c.restart(other).expect("restart a follower");
        c.wait_for_leader(WAIT).await.expect("leader with 2 of 3");
        put(&mut c.kv(survivor), "/n/after", "2")
            .await
            .expect("write after quorum is back");
        let r = get(&mut c.kv(survivor), "/n/x", false).await;
        match r {
            Err(s) if s.code() == Code::NotFound => {}
            other => panic!("a write answered UNAVAILABLE must not be applied: {other:?}"),
        }
        let g = get(&mut c.kv(other), "/n/before", false)
            .await
            .expect("old write");
        assert_eq!(g.node.expect("node").data, b"1");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_clean() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(Duration::from_secs(120), "sigterm_clean", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        put(&mut c.kv(leader), "/t/a", "a").await.expect("put");

        // A follower first.
        let follower = c.followers(leader)[0];
        let st = c
            .terminate(follower, Duration::from_secs(10))
            .await
            .expect("follower exits on SIGTERM");
        assert_eq!(st.code(), Some(0), "follower exit status {st}");
        c.restart(follower).expect("restart follower");
        c.wait_ready(follower, WAIT)
            .await
            .expect("follower ready after restart");

        // Then the leader.
        let st = c
            .terminate(leader, Duration::from_secs(10))
            .await
            .expect("leader exits on SIGTERM");
        assert_eq!(st.code(), Some(0), "leader exit status {st}");
        // It handed leadership over before it exited: the survivors already
        // follow a new leader (after a crash they would still name the old
        // one until their election timeout).
        let mut named = Vec::new();
        for id in c.followers(leader) {
            let s = c.status(id).await.expect("survivor status");
            named.push(s.leader_id);
        }
        assert!(
            named.iter().all(|l| *l != 0 && *l != leader) && named[0] == named[1],
            "survivors name leaders {named:?} right after leader {leader} exited"
        );
        let new_leader = c.wait_for_leader(WAIT).await.expect("new leader");
        assert_ne!(new_leader, leader);
        assert_eq!(new_leader, named[0]);
        put(&mut c.kv(follower), "/t/b", "b")
            .await
            .expect("write after the leader left");

        c.restart(leader).expect("restart old leader");
        c.wait_caught_up(leader, WAIT)
            .await
            .expect("old leader catches up");
        let g = get(&mut c.kv(leader), "/t/b", true)
            .await
            .expect("serializable get on restarted member");
        assert_eq!(g.node.expect("node").data, b"b");
        c.wait_ready(leader, WAIT).await.expect("old leader ready");
    })
    .await;
}
