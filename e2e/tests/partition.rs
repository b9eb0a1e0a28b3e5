//! A member cut off from the cluster must not disrupt a healthy leader when
//! it comes back (pre-vote): it rejoins the current term under the current
//! leader instead of forcing an election with a higher term.

use std::time::Duration;

use lockd_e2e::{bounded, get, put, Cluster, ClusterOptions};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_member_does_not_depose_the_leader() {
    let opts = ClusterOptions::default();
    let election = Duration::from_millis(opts.election_timeout_ms);
    let c = Cluster::start(3, opts).await.expect("start 3 members");
    bounded(Duration::from_secs(120), "partition", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        let term = c.status(leader).await.expect("status").term;
        let cut = c.followers(leader)[0];

        // Freeze the follower: it hears nothing and its election timer runs
        // out. The pause is the length of the simulated partition (several
        // election timeouts), not a wait for an event.
        c.signal(cut, libc::SIGSTOP);
        for i in 0..10 {
            put(&mut c.kv(leader), &format!("/p/{i}"), "during")
                .await
                .expect("the majority keeps serving writes");
        }
        tokio::time::sleep(election * 4).await;
        c.signal(cut, libc::SIGCONT);

        // It catches up under the same leader...
        c.wait_caught_up(cut, WAIT)
            .await
            .expect("returning member catches up");
        put(&mut c.kv(cut), "/p/after", "x")
            .await
            .expect("write through the returning member");
        get(&mut c.kv(cut), "/p/9", false)
            .await
            .expect("linearizable read through the returning member");

        // ...and nobody's term moved: no election was forced.
        for id in c.ids() {
            let s = c.status(id).await.expect("status");
            assert_eq!(s.leader_id, leader, "member {id} follows the same leader");
            assert_eq!(
                s.term, term,
                "member {id}: term moved from {term} to {}",
                s.term
            );
        }
    })
    .await;
}
