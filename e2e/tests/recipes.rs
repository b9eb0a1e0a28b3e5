//! `lockd_client::recipes` beyond the Mutex (`RwLock`, `Semaphore`,
//! `Barrier`, `DoubleBarrier`) against real 3-member clusters.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockd_client::recipes::{Barrier, DoubleBarrier, RwLock, RwLockMode, Semaphore};
use lockd_client::{Client, Session};
use lockd_e2e::{bounded, wait_until, Cluster};

const WAIT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_millis(800);

/// A client whose first endpoint is member `i % 3 + 1` (spreads load).
fn client_for(c: &Cluster, i: usize) -> Client {
    Client::connect(c.endpoints_from(i)).expect("client")
}

async fn session(client: &Client) -> Session {
    client
        .open_session(Duration::from_secs(10))
        .await
        .expect("session")
}

/// Number of children of `dir` whose name starts with `prefix`.
async fn count_children(client: &Client, dir: &str, prefix: &str) -> usize {
    match client.list(dir).await {
        Ok(l) => l
            .children
            .iter()
            .filter(|n| {
                n.path
                    .rsplit('/')
                    .next()
                    .is_some_and(|name| name.starts_with(prefix))
            })
            .count(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rwlock_readers_share() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(60), "readers share", async {
        let mut guards = Vec::new();
        let mut sessions = Vec::new();
        for i in 0..3 {
            let client = client_for(&c, i);
            let s = session(&client).await;
            let lock = RwLock::new(client, "/locks/rw-share", &s);
            let g = lock
                .read_timeout(WAIT)
                .await
                .expect("read")
                .expect("readers do not exclude each other");
            assert_eq!(g.mode(), RwLockMode::Read);
            guards.push(g);
            sessions.push(s);
        }
        let tokens: Vec<u64> = guards.iter().map(|g| g.fencing_token()).collect();
        assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
        for g in guards {
            g.unlock().await.expect("unlock");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rwlock_writer_excludes_readers_and_writers() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(60), "writer excludes", async {
        let clients: Vec<Client> = (0..3).map(|i| client_for(&c, i)).collect();
        let mut sessions = Vec::new();
        for cl in &clients {
            sessions.push(session(cl).await);
        }
        let locks: Vec<RwLock> = clients
            .iter()
            .zip(&sessions)
            .map(|(cl, s)| RwLock::new(cl.clone(), "/locks/rw-excl", s))
            .collect();

        let w = locks[0].write().await.expect("write");
        assert_eq!(w.mode(), RwLockMode::Write);
        assert!(locks[1].read_timeout(SHORT).await.expect("read").is_none());
        assert!(locks[2]
            .write_timeout(SHORT)
            .await
            .expect("write")
            .is_none());
        let w_token = w.fencing_token();
        w.unlock().await.expect("unlock");

        // Readers now; a writer is excluded while any reader holds.
        let r1 = locks[1].read().await.expect("read");
        assert!(r1.fencing_token() > w_token);
        assert!(locks[2]
            .write_timeout(SHORT)
            .await
            .expect("write")
            .is_none());
        r1.unlock().await.expect("unlock");
        let w2 = locks[2].write_timeout(WAIT).await.expect("write");
        let w2 = w2.expect("free once the reader left");
        assert!(w2.fencing_token() > w_token);
        w2.unlock().await.expect("unlock");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rwlock_queued_writer_is_not_starved_by_later_readers() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(60), "writer not starved", async {
        let dir = "/locks/rw-fair";
        let clients: Vec<Client> = (0..3).map(|i| client_for(&c, i)).collect();
        let mut sessions = Vec::new();
        for cl in &clients {
            sessions.push(session(cl).await);
        }
        let lock = |i: usize| RwLock::new(clients[i].clone(), dir, &sessions[i]);

        let r1 = lock(0).read().await.expect("first reader");
        let writer = lock(1);
        let got_write = Arc::new(AtomicUsize::new(0));
        let flag = got_write.clone();
        let w_task = tokio::spawn(async move {
            let g = writer.write().await.expect("write");
            flag.store(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            g.unlock().await.expect("unlock");
        });
        wait_until(WAIT, "the writer queued", || async {
            count_children(&clients[0], dir, "write-").await == 1
        })
        .await
        .expect("writer node");
        assert_eq!(
            got_write.load(Ordering::SeqCst),
            0,
            "writer waits for reader"
        );

        // A reader arriving now queues behind the waiting writer.
        let later = lock(2);
        assert!(
            later.read_timeout(SHORT).await.expect("read").is_none(),
            "a later reader must not overtake the waiting writer"
        );
        let r2 = tokio::spawn(async move {
            let g = later.read().await.expect("later reader");
            let t = g.fencing_token();
            g.unlock().await.expect("unlock");
            t
        });
        tokio::time::sleep(SHORT).await;
        assert!(!r2.is_finished(), "later reader still behind the writer");
        r1.unlock().await.expect("unlock");
        w_task.await.expect("writer task");
        assert_eq!(got_write.load(Ordering::SeqCst), 1);
        r2.await.expect("later reader gets in after the writer");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn semaphore_bounds_concurrent_holders() {
    const TASKS: usize = 10;
    const LEASES: usize = 3;
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "semaphore", async {
        // (holders now, tasks finished), shared so holders can await each other.
        let (state, _) = tokio::sync::watch::channel((0usize, 0usize));
        let state = Arc::new(state);
        let max = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..TASKS {
            let client = client_for(&c, i);
            let (state, max, done) = (state.clone(), max.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let s = session(&client).await;
                let sem = Semaphore::new(client, "/semaphores/pool", LEASES, &s);
                let lease = sem.acquire().await.expect("acquire");
                let mut now = 0;
                state.send_modify(|(h, _)| {
                    *h += 1;
                    now = *h;
                });
                max.fetch_max(now, Ordering::SeqCst);
                // Hold until every lease is taken (or too few tasks are left
                // to take them): a semaphore that let fewer in at once would
                // leave this waiting, and the bound below would catch it.
                let mut rx = state.subscribe();
                let all_in = rx.wait_for(|(h, d)| *h == LEASES || h + d == TASKS);
                let _ = tokio::time::timeout(Duration::from_secs(10), all_in).await;
                state.send_modify(|(h, d)| {
                    *h -= 1;
                    *d += 1;
                });
                lease.release().await.expect("release");
                done.fetch_add(1, Ordering::SeqCst);
                s.close().await.ok();
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let max = max.load(Ordering::SeqCst);
        assert_eq!(max, LEASES, "exactly {LEASES} holders at once, never more");
        assert_eq!(done.load(Ordering::SeqCst), TASKS);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn semaphore_timeout_and_session_release() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(60), "semaphore timeout", async {
        let a = client_for(&c, 0);
        let b = client_for(&c, 1);
        let sa = session(&a).await;
        let sb = session(&b).await;
        let sem_a = Semaphore::new(a, "/semaphores/one", 1, &sa);
        let sem_b = Semaphore::new(b, "/semaphores/one", 1, &sb);
        let held = sem_a.acquire().await.expect("acquire");
        assert!(sem_b.acquire_timeout(SHORT).await.expect("b").is_none());
        // Closing the holder's session frees the lease.
        std::mem::forget(held);
        sa.close().await.expect("close");
        let got = sem_b.acquire_timeout(WAIT).await.expect("b");
        got.expect("lease after the holder's session closed")
            .release()
            .await
            .expect("release");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn barrier_blocks_until_removed() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(60), "barrier", async {
        let coord = Barrier::new(client_for(&c, 0), "/barriers/deploy");
        // Not set: waiting returns at once.
        assert!(coord.wait_on_barrier_timeout(SHORT).await.expect("wait"));
        coord.set_barrier().await.expect("set");
        coord.set_barrier().await.expect("set twice is fine");
        assert!(coord.is_set().await.expect("is_set"));
        let released = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        for i in 1..4 {
            let b = Barrier::new(client_for(&c, i), "/barriers/deploy");
            let released = released.clone();
            waiters.push(tokio::spawn(async move {
                b.wait_on_barrier().await.expect("wait");
                released.fetch_add(1, Ordering::SeqCst);
            }));
        }
        let b = Barrier::new(client_for(&c, 1), "/barriers/deploy");
        assert!(!b.wait_on_barrier_timeout(SHORT).await.expect("wait"));
        assert_eq!(released.load(Ordering::SeqCst), 0, "blocked while set");
        coord.remove_barrier().await.expect("remove");
        for w in waiters {
            w.await.expect("waiter released");
        }
        assert_eq!(released.load(Ordering::SeqCst), 3);
        coord.remove_barrier().await.expect("remove twice is fine");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn double_barrier_enter_and_leave_together() {
    const N: usize = 4;
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "double barrier", async {
        // Counted *before* calling enter / leave: when a call returns, all
        // members of the round must have made the same call.
        let arrived = Arc::new(AtomicUsize::new(0));
        let leaving = Arc::new(AtomicUsize::new(0));
        // Counted after leave returned.
        let finished = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..N {
            let client = client_for(&c, i);
            let (arrived, leaving) = (arrived.clone(), leaving.clone());
            let finished = finished.clone();
            tasks.push(tokio::spawn(async move {
                let s = session(&client).await;
                let mut b = DoubleBarrier::new(client, "/barriers/job", N, &s);
                for round in 0..2 {
                    // Stagger arrivals: nobody may pass before the last one.
                    tokio::time::sleep(Duration::from_millis(100 * i as u64)).await;
                    arrived.fetch_add(1, Ordering::SeqCst);
                    b.enter().await.expect("enter");
                    let n = arrived.load(Ordering::SeqCst);
                    assert_eq!(n, N * (round + 1), "entered before all arrived");
                    // Nobody finishes this round before we leave it.
                    assert_eq!(finished.load(Ordering::SeqCst), N * round);
                    tokio::time::sleep(Duration::from_millis(100 * (N - i) as u64)).await;
                    leaving.fetch_add(1, Ordering::SeqCst);
                    b.leave().await.expect("leave");
                    let n = leaving.load(Ordering::SeqCst);
                    assert_eq!(n, N * (round + 1), "left before all were leaving");
                    finished.fetch_add(1, Ordering::SeqCst);
                }
                s.close().await.ok();
            }));
        }
        for t in tasks {
            t.await.expect("member");
        }
        assert_eq!(arrived.load(Ordering::SeqCst), 2 * N);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn double_barrier_enter_times_out_short_of_members() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(60), "double barrier timeout", async {
        let client = client_for(&c, 0);
        let s = session(&client).await;
        let mut b = DoubleBarrier::new(client.clone(), "/barriers/short", 2, &s);
        assert!(!b.enter_timeout(SHORT).await.expect("enter"));
        assert!(b.node().is_none());
        wait_until(WAIT, "member node removed", || async {
            count_children(&client, "/barriers/short", "member-").await == 0
        })
        .await
        .expect("cleanup");
    })
    .await;
}

/// Waits until one of `latches` holds leadership; returns its index.
async fn first_leader(latches: &[lockd_client::recipes::LeaderLatch]) -> usize {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let waiters: Vec<_> = latches
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut leading = l.leadership();
            let tx = tx.clone();
            tokio::spawn(async move {
                if leading.wait_for(|l| *l).await.is_ok() {
                    let _ = tx.send(i);
                }
            })
        })
        .collect();
    let first = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a leader")
        .expect("waiters running");
    waiters.iter().for_each(|w| w.abort());
    first
}

/// `LeaderLatch` on a real cluster: of two started latches exactly one
/// leads (the other is queued behind it and an observer agrees); closing
/// the leader hands leadership over at once, with a higher fencing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_latch_one_leader_and_close_hands_over() {
    use lockd_client::recipes::{observe, LeaderLatch};

    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(60), "leader latch", async {
        let dir = "/elections/latch";
        let latches: Vec<LeaderLatch> = (0..2)
            .map(|i| {
                LeaderLatch::new(
                    client_for(&c, i),
                    dir,
                    format!("latch-{i}"),
                    Duration::from_secs(5),
                )
                .expect("latch")
            })
            .collect();
        for l in &latches {
            assert!(!l.has_leadership(), "not started");
            l.start().expect("start");
        }
        let leader = first_leader(&latches).await;
        let other = 1 - leader;
        let token = latches[leader].fencing_token().expect("leader's token");
        let path = latches[leader].path().expect("leader's node");
        assert!(path.starts_with("/elections/latch/candidate-"), "{path}");

        // Exactly one leader: the other is queued behind it, and stays so.
        let client = client_for(&c, 2);
        wait_until(WAIT, "both candidates queued", || async {
            count_children(&client, dir, "candidate-").await == 2
        })
        .await
        .expect("two candidates");
        assert!(
            !latches[other]
                .await_leadership_timeout(SHORT)
                .await
                .expect("await"),
            "two latches lead at once"
        );
        assert!(latches[leader].has_leadership());
        assert_eq!(latches[other].fencing_token(), None);
        let seen = tokio::time::timeout(WAIT, observe(client.clone(), dir).next())
            .await
            .expect("observer answers")
            .expect("stream")
            .expect("a leader");
        assert_eq!(seen.identity, format!("latch-{leader}"));
        assert_eq!(seen.fencing_token, token);

        // Closing the leader resigns: the other takes over at once.
        let closed = std::time::Instant::now();
        latches[leader].close().await;
        assert!(!latches[leader].has_leadership());
        assert_eq!(latches[leader].fencing_token(), None);
        assert!(
            latches[other]
                .await_leadership_timeout(WAIT)
                .await
                .expect("await"),
            "no handover"
        );
        eprintln!("handover {:?} after close", closed.elapsed());
        let next = latches[other].fencing_token().expect("new token");
        assert!(next > token, "tokens {token} then {next}");
        assert!(
            latches[leader].start().is_err(),
            "a closed latch stays closed"
        );
        assert!(latches[leader].await_leadership().await.is_err());

        latches[other].close().await;
        wait_until(WAIT, "election empty", || async {
            count_children(&client, dir, "candidate-").await == 0
        })
        .await
        .expect("nodes deleted on close");
    })
    .await;
}

/// Dropping a leading `LeaderLatch` resigns too (in the background), and
/// its `leadership()` receiver follows every change of the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_latch_drop_resigns() {
    use lockd_client::recipes::LeaderLatch;

    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(60), "leader latch drop", async {
        let mut latches: Vec<LeaderLatch> = (0..3)
            .map(|i| {
                LeaderLatch::new(
                    client_for(&c, i),
                    "/elections/latch-drop",
                    format!("latch-{i}"),
                    Duration::from_secs(5),
                )
                .expect("latch")
            })
            .collect();
        for l in &latches {
            l.start().expect("start");
        }
        let mut tokens = Vec::new();
        while latches.len() > 1 {
            let leader = first_leader(&latches).await;
            assert_eq!(
                latches.iter().filter(|l| l.has_leadership()).count(),
                1,
                "one leader"
            );
            tokens.push(latches[leader].fencing_token().expect("token"));
            drop(latches.remove(leader));
        }
        let last = first_leader(&latches).await;
        tokens.push(latches[last].fencing_token().expect("token"));
        assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
        latches[last].close().await;
    })
    .await;
}
