//! `lockd_client::recipes::Mutex` and `lockctl lock` against real 3-member
//! clusters: mutual exclusion, fencing tokens, holders killed or paused past
//! their TTL, and one release waking one waiter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lockd_client::proto;
use lockd_client::recipes::{holds_lock_compare, Mutex, MutexGuard};
use lockd_client::{Client, Error};
use lockd_e2e::{bounded, lockctl_bin, lockctl_command, signal, wait_until, Cluster};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(20);

/// A client whose first endpoint is member `i % 3 + 1` (spreads load).
fn client_for(c: &Cluster, i: usize) -> Client {
    Client::connect(c.endpoints_from(i)).expect("client")
}

async fn read_u64(client: &Client, path: &str) -> u64 {
    match client.get(path).await {
        Ok(r) => String::from_utf8_lossy(&r.node.expect("node").data)
            .parse()
            .expect("a number"),
        Err(Error::NotFound(_)) => 0,
        Err(e) => panic!("get {path}: {e}"),
    }
}

fn put_op(path: &str, data: &str) -> proto::Op {
    proto::Op {
        op: Some(proto::op::Op::Put(proto::PutRequest {
            path: path.into(),
            data: data.into(),
            expected_version: None,
            parents: true,
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_exclusion_and_increasing_tokens() {
    const TASKS: usize = 16;
    const ROUNDS: u64 = 20;
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(240), "16 contenders", async {
        let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..TASKS {
            let client = client_for(&c, i);
            let tokens = tokens.clone();
            tasks.push(tokio::spawn(async move {
                let session = client
                    .open_session(Duration::from_secs(10))
                    .await
                    .expect("session");
                let mutex = Mutex::new(client.clone(), "/locks/counter", &session);
                for _ in 0..ROUNDS {
                    let guard = mutex.lock().await.expect("lock");
                    // Non-atomic read-modify-write: correct only under the lock.
                    let n = read_u64(&client, "/counter").await;
                    tokio::task::yield_now().await;
                    client
                        .put("/counter", (n + 1).to_string())
                        .await
                        .expect("put");
                    tokens.lock().unwrap().push(guard.fencing_token());
                    guard.unlock().await.expect("unlock");
                }
                session.close().await.expect("close");
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let client = client_for(&c, 0);
        assert_eq!(read_u64(&client, "/counter").await, TASKS as u64 * ROUNDS);
        let tokens = tokens.lock().unwrap().clone();
        assert_eq!(tokens.len(), TASKS * ROUNDS as usize);
        assert!(
            tokens.windows(2).all(|w| w[0] < w[1]),
            "fencing tokens not strictly increasing: {tokens:?}"
        );
        // Every contender node is gone, and so is the container.
        wait_until(WAIT, "/locks/counter removed", || {
            let client = client.clone();
            async move { client.get("/locks/counter").await.is_err() }
        })
        .await
        .expect("container removed");
    })
    .await;
}

/// `lockctl -o json lock NAME --ttl TTL` left running; its JSON line.
struct Holder {
    child: Child,
    path: String,
    token: u64,
}

impl Holder {
    async fn spawn(c: &Cluster, name: &str, ttl: &str) -> Holder {
        let mut child = lockctl_command(&c.endpoints().join(","))
            .args(["-o", "json", "lock", name, "--ttl", ttl])
            .spawn()
            .expect("spawn lockctl");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("lockctl prints its token")
            .expect("read")
            .expect("a line");
        let v: Value = serde_json::from_str(&line).expect("JSON line");
        Holder {
            child,
            path: v["path"].as_str().expect("path").to_string(),
            token: v["fencing_token"].as_u64().expect("token"),
        }
    }

    fn signal(&self, sig: i32) {
        signal(self.child.id().expect("running"), sig);
    }
}

/// Starts waiting for `name` in the background with a fresh session.
fn waiter(
    client: Client,
    name: &'static str,
) -> tokio::task::JoinHandle<(MutexGuard, lockd_client::Session, Instant)> {
    tokio::spawn(async move {
        let session = client
            .open_session(Duration::from_secs(10))
            .await
            .expect("session");
        let g = Mutex::new(client.clone(), name, &session)
            .lock()
            .await
            .expect("lock");
        (g, session, Instant::now())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_holder_releases_within_ttl() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "holder kill -9", async {
        let holder = Holder::spawn(&c, "/locks/b", "2s").await;
        let w = waiter(client_for(&c, 1), "/locks/b");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!w.is_finished(), "waiter acquired while held");
        holder.signal(libc::SIGKILL);
        let killed = Instant::now();
        let (g, _s, at) = tokio::time::timeout(Duration::from_secs(2) + WAIT, w)
            .await
            .expect("waiter acquires within TTL + slack")
            .expect("task");
        eprintln!("acquired {:?} after the kill", at - killed);
        assert!(g.fencing_token() > holder.token);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_holder_is_fenced() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "holder SIGSTOP", async {
        let mut holder = Holder::spawn(&c, "/locks/c", "2s").await;
        let client = client_for(&c, 2);
        // The holder's guarded write works while it holds the lock.
        let stale_write = |v: &str| proto::TxnRequest {
            compare: vec![holds_lock_compare(holder.path.clone(), holder.token)],
            success: vec![put_op("/c/data", v)],
            ..Default::default()
        };
        assert!(client.txn(stale_write("holder-1")).await.unwrap().succeeded);
        let w = waiter(client_for(&c, 1), "/locks/c");
        holder.signal(libc::SIGSTOP);
        let (g, _s, _) = tokio::time::timeout(Duration::from_secs(2) + WAIT, w)
            .await
            .expect("the lock moves on past the paused holder's TTL")
            .expect("task");
        assert!(g.fencing_token() > holder.token);
        // The paused holder wakes up and writes with its old token: rejected.
        let r = client.txn(stale_write("stale")).await.unwrap();
        assert!(!r.succeeded, "stale holder's write applied");
        let r = g
            .guarded_txn(proto::TxnRequest {
                success: vec![put_op("/c/data", "new-holder")],
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(r.succeeded);
        let got = client.get("/c/data").await.unwrap().node.unwrap().data;
        assert_eq!(got, b"new-holder");
        // The real holder process notices it lost the lock and exits 1.
        holder.signal(libc::SIGCONT);
        let st = tokio::time::timeout(WAIT, holder.child.wait())
            .await
            .expect("lockctl exits")
            .expect("wait");
        let mut err = String::new();
        let _ = holder
            .child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .await;
        assert_eq!(st.code(), Some(1), "stderr: {err}");
        assert!(err.contains("lost"), "stderr: {err}");
        g.unlock().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_lock_runs_commands_exclusively() {
    const PROCS: usize = 8;
    const ROUNDS: usize = 10;
    let c = Cluster::start_three().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("count");
    let tokens = dir.path().join("tokens");
    std::fs::write(&file, "0\n").unwrap();
    bounded(Duration::from_secs(300), "8 lockctl loops", async {
        // Read, pause, write: lost updates if two ran at once.
        let body = r#"n=$(cat "$F"); sleep 0.01; echo $((n + 1)) > "$F"; echo "$LOCKD_FENCING_TOKEN" >> "$T""#;
        let script = format!(
            r#"i=0; while [ $i -lt {ROUNDS} ]; do "$L" --endpoints="$E" lock /locks/file -- sh -c '{body}' || exit 1; i=$((i + 1)); done"#
        );
        let mut procs = Vec::new();
        for i in 0..PROCS {
            let eps = c.endpoints_from(i);
            procs.push(
                Command::new("sh")
                    .args(["-c", &script])
                    .env("L", lockctl_bin())
                    .env("E", eps.join(","))
                    .env("F", &file)
                    .env("T", &tokens)
                    .env_remove("LOCKD_ENDPOINTS")
                    .kill_on_drop(true)
                    .spawn()
                    .expect("spawn sh"),
            );
        }
        for mut p in procs {
            let st = p.wait().await.expect("wait");
            assert!(st.success(), "a lockctl loop failed: {st}");
        }
    })
    .await;
    let n: usize = std::fs::read_to_string(&file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(n, PROCS * ROUNDS);
    let toks: Vec<u64> = std::fs::read_to_string(&tokens)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(toks.len(), PROCS * ROUNDS);
    assert!(toks.windows(2).all(|w| w[0] < w[1]), "{toks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_release_wakes_one_waiter() {
    const WAITERS: usize = 5;
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "no herd", async {
        let client = client_for(&c, 0);
        let hs = client.open_session(Duration::from_secs(10)).await.unwrap();
        let mut held = Mutex::new(client.clone(), "/locks/e", &hs)
            .lock()
            .await
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut mutexes = Vec::new();
        let mut sessions = Vec::new();
        for i in 0..WAITERS {
            let cl = client_for(&c, i + 1);
            let s = cl.open_session(Duration::from_secs(10)).await.unwrap();
            let m = Mutex::new(cl, "/locks/e", &s);
            sessions.push(s);
            mutexes.push(m.clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                let g = m.lock().await.expect("lock");
                let _ = tx.send((i, g));
            });
            // Queue them in a known order.
            wait_until(WAIT, "waiter queued", || {
                let client = client.clone();
                async move {
                    client
                        .list("/locks/e")
                        .await
                        .is_ok_and(|l| l.children.len() == i + 2)
                }
            })
            .await
            .unwrap();
        }
        // Each waiter listed once and is now watching its predecessor.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let counts = |ms: &[Mutex]| ms.iter().map(Mutex::list_count).collect::<Vec<_>>();
        assert_eq!(counts(&mutexes), vec![1; WAITERS]);
        let mut prev_token = held.fencing_token();
        for round in 0..WAITERS {
            let before = counts(&mutexes);
            held.unlock().await.unwrap();
            let (i, g) = tokio::time::timeout(WAIT, rx.recv())
                .await
                .expect("a waiter acquires")
                .unwrap();
            assert_eq!(i, round, "waiters acquire in queue order");
            assert!(g.fencing_token() > prev_token);
            prev_token = g.fencing_token();
            // Give any other (wrongly) woken waiter time to re-list.
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(rx.try_recv().is_err(), "a second waiter acquired");
            let after = counts(&mutexes);
            let woken: Vec<usize> = (0..WAITERS).filter(|&j| after[j] != before[j]).collect();
            assert_eq!(woken, vec![round], "before {before:?} after {after:?}");
            assert_eq!(after[round], before[round] + 1);
            held = g;
        }
        held.unlock().await.unwrap();
        drop(sessions);
        drop(hs);
    })
    .await;
}

async fn lockctl_output(c: &Cluster, args: &[&str]) -> (i32, String, String) {
    let child = lockctl_command(&c.endpoints().join(","))
        .args(args)
        .spawn()
        .expect("spawn lockctl");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("lockctl finishes")
        .expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_lock_timeout_exit_codes_and_loss() {
    let c = Cluster::start_three().await;
    bounded(Duration::from_secs(120), "lockctl lock edges", async {
        let client = client_for(&c, 0);
        // CMD's exit code is passed through, with the env set.
        let (code, out, err) = lockctl_output(
            &c,
            &[
                "lock",
                "/locks/f",
                "--",
                "sh",
                "-c",
                r#"echo "$LOCKD_LOCK_NAME $LOCKD_FENCING_TOKEN"; exit 7"#,
            ],
        )
        .await;
        assert_eq!(code, 7, "stderr: {err}");
        let (name, tok) = out.trim().split_once(' ').expect("two words");
        assert_eq!(name, "/locks/f");
        assert!(tok.parse::<u64>().unwrap() > 0, "{out}");

        // --acquire-timeout while someone else holds it: exit 1, no node left.
        let s = client.open_session(Duration::from_secs(10)).await.unwrap();
        let g = Mutex::new(client.clone(), "/locks/f", &s)
            .lock()
            .await
            .unwrap();
        let started = Instant::now();
        let (code, _, err) =
            lockctl_output(&c, &["lock", "/locks/f", "--acquire-timeout", "1s"]).await;
        assert_eq!(code, 1, "stderr: {err}");
        assert!(err.contains("timed out"), "stderr: {err}");
        assert!(started.elapsed() < Duration::from_secs(15));
        let l = client.list("/locks/f").await.unwrap();
        assert_eq!(l.children.len(), 1, "{:?}", l.children);
        // try_lock fails too while held.
        let s2 = client.open_session(Duration::from_secs(10)).await.unwrap();
        let m2 = Mutex::new(client.clone(), "/locks/f", &s2);
        assert!(m2.try_lock().await.unwrap().is_none());
        g.unlock().await.unwrap();
        let g2 = m2.try_lock().await.unwrap().expect("free now");

        // The lock node is deleted under a running CMD: CMD gets SIGTERM and
        // lockctl exits 1 with a clear message.
        g2.unlock().await.unwrap();
        let run = tokio::spawn({
            let eps = c.endpoints().join(",");
            async move {
                let out = lockctl_command(&eps)
                    .args([
                        "lock",
                        "/locks/f",
                        "--kill-grace",
                        "1s",
                        "--",
                        "sleep",
                        "60",
                    ])
                    .output()
                    .await
                    .expect("run lockctl");
                (
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            }
        });
        let node = lockd_e2e::wait_for(WAIT, "lockctl holds /locks/f", || {
            let client = client.clone();
            async move {
                let l = client.list("/locks/f").await?;
                l.children
                    .first()
                    .map(|n| n.path.clone())
                    .ok_or_else(|| anyhow::anyhow!("no contender yet"))
            }
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.delete(node).await.unwrap();
        let (code, err) = tokio::time::timeout(WAIT, run)
            .await
            .expect("lockctl ends soon after the loss")
            .unwrap();
        assert_eq!(code, Some(1), "stderr: {err}");
        assert!(err.contains("lost"), "stderr: {err}");
        assert!(err.contains("terminat"), "stderr: {err}");
    })
    .await;
}

/// Retries `f` while it fails with an error a failover can cause, so the
/// test's own bookkeeping survives the leader kills. Safe only for
/// idempotent steps (a put of the same value, a token-conditional unlock).
async fn through_failover<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline && !matches!(e, Error::SessionLost(_)) => {
                eprintln!("{what}: retrying after {e}");
                // Retry pacing, not a wait for an event.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Kills the lockd leader (twice, the second time the new one) while 8
/// clients contend hard for one lock: never two holders at once (checked
/// with a non-atomic counter and with the hold intervals), and every
/// waiter finishes (the whole run is time-bounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kills_during_contention_never_make_two_holders() {
    const TASKS: usize = 8;
    const ROUNDS: u64 = 15;
    let c = Arc::new(Cluster::start_three().await);
    let (progress_tx, progress) = tokio::sync::watch::channel(0u64);
    let progress_tx = Arc::new(progress_tx);
    bounded(
        Duration::from_secs(240),
        "contention across leader kills",
        async {
            let intervals = Arc::new(std::sync::Mutex::new(Vec::<(Instant, Instant, u64)>::new()));
            let mut tasks = Vec::new();
            for i in 0..TASKS {
                let client = client_for(&c, i);
                let intervals = intervals.clone();
                let progress_tx = progress_tx.clone();
                tasks.push(tokio::spawn(async move {
                    let session = client
                        .open_session(Duration::from_secs(10))
                        .await
                        .expect("session");
                    let mutex = Mutex::new(client.clone(), "/locks/failover", &session);
                    for _ in 0..ROUNDS {
                        let guard = through_failover("lock", || mutex.lock()).await;
                        let held_at = Instant::now();
                        let n = through_failover("get", || async {
                            match client.get("/failover-counter").await {
                                Ok(r) => Ok(String::from_utf8_lossy(&r.node.expect("node").data)
                                    .parse::<u64>()
                                    .expect("a number")),
                                Err(Error::NotFound(_)) => Ok(0),
                                Err(e) => Err(e),
                            }
                        })
                        .await;
                        // The same value each retry: idempotent under the lock.
                        through_failover("put", || {
                            client.put("/failover-counter", (n + 1).to_string())
                        })
                        .await;
                        let token = guard.fencing_token();
                        let released_at = Instant::now();
                        intervals
                            .lock()
                            .unwrap()
                            .push((held_at, released_at, token));
                        progress_tx.send_modify(|p| *p += 1);
                        // Unlock is a token-conditional delete: safe to retry.
                        let (path, client2) = (guard.path().to_string(), client.clone());
                        drop(guard);
                        through_failover("unlock", || {
                            let req = proto::TxnRequest {
                                compare: vec![holds_lock_compare(path.clone(), token)],
                                success: vec![proto::Op {
                                    op: Some(proto::op::Op::Delete(proto::DeleteRequest {
                                        path: path.clone(),
                                        expected_version: None,
                                        recursive: false,
                                    })),
                                }],
                                ..Default::default()
                            };
                            let client2 = client2.clone();
                            async move { client2.txn(req).await }
                        })
                        .await;
                    }
                    session.close().await.ok();
                }));
            }

            // The killer: after a quarter of the acquisitions, kill -9 the
            // leader; after half, restart it and kill the new leader.
            let total = TASKS as u64 * ROUNDS;
            let mut p = progress.clone();
            p.wait_for(|n| *n >= total / 4).await.expect("progress");
            let first = c.wait_for_leader(WAIT).await.expect("leader");
            c.kill(first);
            let second = c
                .wait_for_leader_among(
                    &c.ids()
                        .into_iter()
                        .filter(|&i| i != first)
                        .collect::<Vec<_>>(),
                    WAIT,
                )
                .await
                .expect("a new leader");
            p.wait_for(|n| *n >= total / 2).await.expect("progress");
            c.restart(first).expect("restart");
            c.wait_ready(first, WAIT)
                .await
                .expect("restarted member ready");
            c.kill(second);

            for t in tasks {
                t.await.expect("task");
            }
            let client = client_for(&c, 0);
            assert_eq!(read_u64(&client, "/failover-counter").await, total);
            let mut iv = intervals.lock().unwrap().clone();
            assert_eq!(iv.len() as u64, total);
            iv.sort_by_key(|(start, _, _)| *start);
            for w in iv.windows(2) {
                assert!(
                    w[1].0 >= w[0].1,
                    "two holders at once: token {} held {:?}..{:?}, token {} from {:?}",
                    w[0].2,
                    w[0].0,
                    w[0].1,
                    w[1].2,
                    w[1].0
                );
                assert!(
                    w[1].2 > w[0].2,
                    "tokens out of order: {} then {}",
                    w[0].2,
                    w[1].2
                );
            }
        },
    )
    .await;
}
