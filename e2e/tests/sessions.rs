//! Sessions (leases) against real clusters: ephemerals end with their session
//! (close or expiry), live sessions survive leader kills and full restarts, a
//! dead session's life stays bounded across elections, and sessions travel in
//! snapshots.
//!
//! Keepalives are sent by [`KeepAlive`], a raw `Session/KeepAlive` stream fed
//! every TTL/3 that fails over to the next endpoint on any error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockd_e2e::v1::{
    AddLearnerRequest, CloseSessionRequest, CreateRequest, GetRequest, KeepAliveRequest,
    KeepAliveResponse, ListRequest, Node, OpenSessionRequest, PromoteRequest, Role,
    SessionInfoRequest, SessionInfoResponse, SnapshotRequest, TransferLeaderRequest,
};
use lockd_e2e::{
    bounded, put, revision, role_of, session_client, wait_for, wait_until, Cluster, ClusterOptions,
    POLL_INTERVAL,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use lockd_e2e::v1::kv_client::KvClient;

const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Opens a session through member `via`; returns (id, granted TTL in ms).
async fn open(c: &Cluster, via: u64, ttl_ms: u64) -> (u64, u64) {
    let r = c
        .session(via)
        .open(OpenSessionRequest { ttl_ms })
        .await
        .unwrap_or_else(|e| panic!("open session via {via}: {e}"))
        .into_inner();
    assert!(r.session_id > 0, "session id must be set: {r:?}");
    (r.session_id, r.ttl_ms)
}

async fn close(c: &Cluster, via: u64, session_id: u64) -> (u64, u64) {
    let r = c
        .session(via)
        .close(CloseSessionRequest { session_id })
        .await
        .unwrap_or_else(|e| panic!("close session {session_id} via {via}: {e}"))
        .into_inner();
    (r.deleted, revision(&r.header))
}

async fn info(c: &Cluster, via: u64, session_id: u64) -> Result<SessionInfoResponse, Status> {
    c.session(via)
        .info(SessionInfoRequest { session_id })
        .await
        .map(|r| r.into_inner())
}

fn create_req(path: &str, session_id: u64) -> CreateRequest {
    CreateRequest {
        path: path.to_string(),
        data: b"e".to_vec(),
        parents: true,
        session_id,
        sequential: false,
        container: false,
        request_id: String::new(),
    }
}

/// Creates an ephemeral node of `session_id` (parents created as needed).
async fn create_ephemeral(kv: &mut KvClient<Channel>, path: &str, session_id: u64) -> Node {
    let node = kv
        .create(create_req(path, session_id))
        .await
        .unwrap_or_else(|e| panic!("create ephemeral {path}: {e}"))
        .into_inner()
        .node
        .expect("create returns the node");
    assert_eq!(node.ephemeral_owner, session_id, "{node:?}");
    node
}

/// The node at `path`, None on NOT_FOUND.
async fn lookup(
    kv: &mut KvClient<Channel>,
    path: &str,
    serializable: bool,
) -> Result<Option<Node>, Status> {
    match kv
        .get(GetRequest {
            path: path.to_string(),
            serializable,
            min_revision: 0,
        })
        .await
    {
        Ok(r) => Ok(r.into_inner().node),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(s),
    }
}

fn assert_session_expired(what: &str, st: &Status) {
    assert_eq!(st.code(), Code::NotFound, "{what}: {st:?}");
    assert!(
        st.message().starts_with("session expired"),
        "{what}: message should start with \"session expired\": {st:?}"
    );
}

/// One keepalive on a fresh stream through `endpoint`.
async fn keepalive_once(endpoint: &str, session_id: u64) -> Result<KeepAliveResponse, Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(KeepAliveRequest { session_id })
        .await
        .expect("queue keepalive");
    let mut client = session_client(endpoint, Duration::from_secs(10));
    let mut stream = client
        .keep_alive(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no keepalive answer within 10s"))??;
    msg.ok_or_else(|| Status::unknown("keepalive stream ended without an answer"))
}

/// A client keeping one session alive: a KeepAlive stream fed every TTL/3,
/// moving to the next endpoint (new stream) on any error or a reply that
/// takes longer than TTL/2. Stops for good when told the session expired.
struct KeepAlive {
    stop: watch::Sender<bool>,
    shared: Arc<KaShared>,
    handle: JoinHandle<()>,
}

#[derive(Default)]
struct KaShared {
    oks: AtomicU64,
    expired: Mutex<Option<Status>>,
    errors: Mutex<Vec<String>>,
}

impl KeepAlive {
    fn start(endpoints: Vec<String>, session_id: u64, ttl_ms: u64) -> KeepAlive {
        assert!(!endpoints.is_empty());
        let (stop, mut stopped) = watch::channel(false);
        let shared = Arc::new(KaShared::default());
        let sh = shared.clone();
        let interval = Duration::from_millis(ttl_ms / 3);
        let answer_within = Duration::from_millis(ttl_ms / 2);
        let handle = tokio::spawn(async move {
            let req = KeepAliveRequest { session_id };
            let mut next = 0usize;
            'connect: loop {
                if *stopped.borrow() {
                    return;
                }
                let ep = endpoints[next % endpoints.len()].clone();
                next += 1;
                let fail = |e: String| {
                    let mut errs = sh.errors.lock().unwrap();
                    errs.push(format!("{ep}: {e}"));
                    let n = errs.len();
                    if n > 50 {
                        errs.drain(..n - 50);
                    }
                };
                // A long call timeout: the stream lives as long as it works;
                // each answer is bounded below.
                let mut client = session_client(&ep, Duration::from_secs(3600));
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let _ = tx.send(req).await;
                let call =
                    tokio::time::timeout(answer_within, client.keep_alive(ReceiverStream::new(rx)))
                        .await;
                let mut stream = match call {
                    Ok(Ok(r)) => r.into_inner(),
                    Ok(Err(st)) => {
                        fail(format!("{st:?}"));
                        tokio::time::sleep(POLL_INTERVAL).await;
                        continue 'connect;
                    }
                    Err(_) => {
                        fail("keepalive call did not start in time".into());
                        continue 'connect;
                    }
                };
                loop {
                    match tokio::time::timeout(answer_within, stream.message()).await {
                        Ok(Ok(Some(_))) => {
                            sh.oks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Ok(None)) => {
                            fail("stream ended".into());
                            tokio::time::sleep(POLL_INTERVAL).await;
                            continue 'connect;
                        }
                        Ok(Err(st))
                            if st.code() == Code::NotFound
                                && st.message().starts_with("session expired") =>
                        {
                            *sh.expired.lock().unwrap() = Some(st);
                            return;
                        }
                        Ok(Err(st)) => {
                            fail(format!("{st:?}"));
                            tokio::time::sleep(POLL_INTERVAL).await;
                            continue 'connect;
                        }
                        Err(_) => {
                            fail("no answer in time".into());
                            continue 'connect;
                        }
                    }
                    // The keepalive period (a client's cadence, not a wait
                    // for an event).
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = stopped.changed() => return,
                    }
                    if tx.send(req).await.is_err() {
                        continue 'connect;
                    }
                }
            }
        });
        KeepAlive {
            stop,
            shared,
            handle,
        }
    }

    fn oks(&self) -> u64 {
        self.shared.oks.load(Ordering::SeqCst)
    }

    fn expired(&self) -> Option<Status> {
        self.shared.expired.lock().unwrap().clone()
    }

    fn recent_errors(&self) -> Vec<String> {
        self.shared.errors.lock().unwrap().clone()
    }

    /// Waits until `n` keepalives in total were answered.
    async fn wait_oks(&self, n: u64, timeout: Duration) {
        let res = wait_until(timeout, &format!("{n} keepalive answers"), || async {
            self.oks() >= n || self.expired().is_some()
        })
        .await;
        if let Err(e) = res {
            panic!(
                "{e:#}; {} answered; recent errors: {:?}",
                self.oks(),
                self.recent_errors()
            );
        }
        if let Some(st) = self.expired() {
            panic!(
                "session expired while kept alive: {st:?}; recent errors: {:?}",
                self.recent_errors()
            );
        }
    }

    /// Stops sending keepalives; returns once no more will be sent.
    async fn stop(self) -> Arc<KaShared> {
        let _ = self.stop.send(true);
        self.handle.await.expect("keepalive task");
        self.shared
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Close deletes every ephemeral of the session, on every member, in one
/// revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_deletes_ephemerals_at_one_revision() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(Duration::from_secs(90), "close_deletes_ephemerals", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        let (sid, _) = open(&c, leader, 60_000).await;
        let mut kv = c.kv(leader);
        let a = create_ephemeral(&mut kv, "/close/a", sid).await;
        let b = create_ephemeral(&mut kv, "/close/b", sid).await;
        assert!(b.create_revision > a.create_revision);

        // Visible from every member (linearizable reads).
        for id in c.ids() {
            let mut kv = c.kv(id);
            for p in ["/close/a", "/close/b"] {
                let n = lookup(&mut kv, p, false)
                    .await
                    .unwrap_or_else(|e| panic!("get {p} via {id}: {e}"))
                    .unwrap_or_else(|| panic!("{p} missing on member {id}"));
                assert_eq!(n.ephemeral_owner, sid, "{p} via {id}");
            }
        }
        let i = info(&c, c.followers(leader)[0], sid)
            .await
            .expect("session info");
        assert_eq!(i.ephemerals, vec!["/close/a", "/close/b"]);

        let before = kv
            .list(ListRequest {
                path: "/close".into(),
                serializable: false,
                min_revision: 0,
            })
            .await
            .expect("list before close")
            .into_inner();
        assert_eq!(before.children.len(), 2, "{before:?}");
        let rev_before = revision(&before.header);

        let (deleted, rev_close) = close(&c, c.followers(leader)[1], sid).await;
        assert_eq!(deleted, 2, "close deletes both ephemerals");
        assert_eq!(
            rev_close,
            rev_before + 1,
            "both ephemerals go in one revision (nothing else wrote in between)"
        );

        for id in c.ids() {
            let mut kv = c.kv(id);
            let l = kv
                .list(ListRequest {
                    path: "/close".into(),
                    serializable: false,
                    min_revision: 0,
                })
                .await
                .unwrap_or_else(|e| panic!("list via {id}: {e}"))
                .into_inner();
            assert!(revision(&l.header) >= rev_close, "{l:?}");
            assert!(l.children.is_empty(), "member {id}: {:?}", l.children);
            for p in ["/close/a", "/close/b"] {
                assert_eq!(lookup(&mut kv, p, false).await.expect("get"), None);
            }
        }
        let st = info(&c, leader, sid).await.expect_err("info after close");
        assert_session_expired("info after close", &st);
        let st = kv
            .create(create_req("/close/c", sid))
            .await
            .expect_err("create with a closed session");
        assert_session_expired("create with a closed session", &st);
        let st = c
            .session(leader)
            .close(CloseSessionRequest { session_id: sid })
            .await
            .expect_err("second close");
        assert_session_expired("second close", &st);
    })
    .await;
}

/// A session whose client stops keeping it alive ends within TTL (plus slack)
/// and takes its ephemerals with it; keepalives on it then fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_deleted_on_expiry() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(
        Duration::from_secs(90),
        "ephemeral_deleted_on_expiry",
        async {
            let leader = c.wait_for_leader(WAIT).await.expect("a leader");
            let (sid, ttl) = open(&c, leader, 2_000).await;
            assert_eq!(ttl, 2_000, "granted TTL");
            let ka = KeepAlive::start(c.endpoints(), sid, ttl);
            create_ephemeral(&mut c.kv(leader), "/exp/e", sid).await;
            ka.wait_oks(3, WAIT).await;

            let shared = ka.stop().await;
            assert!(shared.expired.lock().unwrap().is_none());
            let stopped = Instant::now();
            // Promised: gone within TTL + one keepalive interval + slack.
            let bound = Duration::from_millis(ttl) + Duration::from_secs(3);
            let follower = c.followers(leader)[0];
            let kv = c.kv(follower);
            let left = (stopped + bound).saturating_duration_since(Instant::now());
            wait_until(left, "the ephemeral of the silent session to go", || {
                let mut kv = kv.clone();
                async move { matches!(lookup(&mut kv, "/exp/e", false).await, Ok(None)) }
            })
            .await
            .unwrap_or_else(|e| panic!("{e:#} (bound {bound:?} after the last keepalive)"));
            eprintln!(
                "ephemeral gone {:?} after the last keepalive (TTL {ttl} ms)",
                stopped.elapsed()
            );

            for id in c.ids() {
                let st = keepalive_once(&c.endpoint(id), sid)
                    .await
                    .expect_err("keepalive on an expired session");
                assert_session_expired(&format!("keepalive via {id}"), &st);
            }
            let st = info(&c, follower, sid).await.expect_err("info");
            assert_session_expired("info after expiry", &st);
        },
    )
    .await;
}

/// A session kept alive by its client survives kill -9 of the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_session_survives_leader_kill() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(
        Duration::from_secs(120),
        "live_session_survives_leader_kill",
        async {
            let leader = c.wait_for_leader(WAIT).await.expect("a leader");
            let (sid, ttl) = open(&c, leader, 3_000).await;
            // The leader first, so the kill breaks the stream in use.
            let mut eps = vec![c.endpoint(leader)];
            eps.extend(c.followers(leader).into_iter().map(|id| c.endpoint(id)));
            let ka = KeepAlive::start(eps, sid, ttl);
            create_ephemeral(&mut c.kv(leader), "/ha/e", sid).await;
            ka.wait_oks(2, WAIT).await;

            c.kill(leader);
            let new_leader = c.wait_for_leader(WAIT).await.expect("a new leader");
            assert_ne!(new_leader, leader);
            let n = ka.oks();
            ka.wait_oks(n + 2, WAIT).await;

            // The test's input: the client keeps the session alive for longer
            // than its TTL under the new leader.
            tokio::time::sleep(Duration::from_millis(ttl + 1_000)).await;

            assert!(ka.expired().is_none(), "{:?}", ka.expired());
            let node = lookup(&mut c.kv(new_leader), "/ha/e", false)
                .await
                .expect("get")
                .expect("the ephemeral of a live session survives the leader kill");
            assert_eq!(node.ephemeral_owner, sid);
            let i = info(&c, new_leader, sid).await.expect("info");
            assert!(i.remaining_ms <= ttl && i.remaining_ms > 0, "{i:?}");

            ka.stop().await;
            let (deleted, _) = close(&c, new_leader, sid).await;
            assert_eq!(deleted, 1);
            assert_eq!(
                lookup(&mut c.kv(new_leader), "/ha/e", false)
                    .await
                    .expect("get"),
                None
            );
        },
    )
    .await;
}

/// Open, keep alive (past the TTL), create, inspect and close, all through
/// one follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_through_a_follower() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(
        Duration::from_secs(90),
        "session_through_a_follower",
        async {
            let leader = c.wait_for_leader(WAIT).await.expect("a leader");
            let f = c.followers(leader)[0];
            let r = c
                .session(f)
                .open(OpenSessionRequest { ttl_ms: 2_000 })
                .await
                .expect("open via follower")
                .into_inner();
            assert_eq!(r.header.as_ref().map(|h| h.member_id), Some(f));
            let (sid, ttl) = (r.session_id, r.ttl_ms);
            let ka = KeepAlive::start(vec![c.endpoint(f)], sid, ttl);
            let mut kv = c.kv(f);
            create_ephemeral(&mut kv, "/fol/e", sid).await;
            ka.wait_oks(2, WAIT).await;

            let once = keepalive_once(&c.endpoint(f), sid)
                .await
                .expect("keepalive via follower");
            assert_eq!((once.session_id, once.ttl_ms), (sid, ttl));
            let i = info(&c, f, sid).await.expect("info via follower");
            assert_eq!(i.ttl_ms, ttl);
            assert_eq!(i.ephemerals, vec!["/fol/e"]);

            // The test's input: keepalives forwarded by the follower must really
            // renew the session, so hold it past its TTL.
            tokio::time::sleep(Duration::from_millis(ttl + 1_000)).await;
            assert!(ka.expired().is_none(), "{:?}", ka.expired());
            let node = lookup(&mut c.kv(leader), "/fol/e", false)
                .await
                .expect("get via leader")
                .expect("ephemeral alive");
            assert_eq!(node.ephemeral_owner, sid);

            ka.stop().await;
            let r = c
                .session(f)
                .close(CloseSessionRequest { session_id: sid })
                .await
                .expect("close via follower")
                .into_inner();
            assert_eq!(r.deleted, 1);
            assert_eq!(r.header.as_ref().map(|h| h.member_id), Some(f));
            for id in c.ids() {
                assert_eq!(
                    lookup(&mut c.kv(id), "/fol/e", false).await.expect("get"),
                    None,
                    "member {id}"
                );
            }
            let st = info(&c, f, sid).await.expect_err("info after close");
            assert_session_expired("info via follower after close", &st);
        },
    )
    .await;
}

/// A session whose client died is gone within TTL + elections x (checkpoint
/// interval + election time) + slack, even when the leader is killed three
/// times during its TTL (the bound in lockd/src/sessions.rs).
///
/// Each leader holds the dead session for `HOLD` before it is killed, so a
/// new leader that restarted the session's clock from the full TTL instead
/// of the checkpointed remaining TTL would keep it for about
/// `3 x HOLD + elections + TTL`, over the bound by `3 x (HOLD - checkpoint) -
/// slack`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_session_bounded_across_leader_kills() {
    const CHECKPOINT_MS: u64 = 200;
    const HEARTBEAT_MS: u64 = 50;
    const ELECTION_MS: u64 = 300;
    const TTL_MS: u64 = 5_000;
    const HOLD: Duration = Duration::from_millis(1_300);
    let opts = ClusterOptions {
        heartbeat_ms: HEARTBEAT_MS,
        election_timeout_ms: ELECTION_MS,
        ..ClusterOptions::default()
    }
    .arg("--session-checkpoint-ms")
    .arg(CHECKPOINT_MS.to_string());
    // Five members, so that elections do not wait for a restarted member.
    let c = Cluster::start(5, opts).await.expect("start 5 members");
    bounded(Duration::from_secs(150), "dead_session_bounded", async {
        let all = c.ids();
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        let term0 = c.status(leader).await.expect("status").term;
        let (sid, ttl) = open(&c, leader, TTL_MS).await;
        let opened = Instant::now();
        assert_eq!(ttl, TTL_MS);
        create_ephemeral(&mut c.kv(leader), "/dead/e", sid).await;
        // The client dies now: no keepalive is ever sent.

        let mut outages = Vec::new();
        for round in 1..=3 {
            // The test's input: the current leader runs the dead session's
            // clock for a while before it is killed.
            tokio::time::sleep(HOLD).await;
            // Every running member agrees (so the member restarted in the
            // previous round is back, and a quorum remains after the kill).
            let l = c.wait_for_leader(WAIT).await.expect("leader before kill");
            c.kill(l);
            let killed = Instant::now();
            let nl = c
                .wait_for_leader(WAIT)
                .await
                .expect("new leader after kill");
            // An upper bound of this election's time (kill to new leader).
            outages.push(killed.elapsed());
            eprintln!(
                "round {round}: killed leader {l}, member {nl} leads after {:?} ({:?} since open)",
                killed.elapsed(),
                opened.elapsed()
            );
            c.restart(l).expect("restart killed leader");
        }
        let alive_after_kills = lookup(&mut c.kv(all[0]), "/dead/e", false).await;
        eprintln!(
            "after 3 kills ({:?} since open) the ephemeral is there: {:?}",
            opened.elapsed(),
            alive_after_kills.as_ref().map(|n| n.is_some())
        );

        // Poll any running member (the restarted one may still be starting).
        let gone = wait_for(Duration::from_secs(60), "the dead session's ephemeral to go", || async {
            let mut last = String::new();
            for id in c.running_ids() {
                match lookup(&mut c.kv_with_timeout(id, Duration::from_secs(2)), "/dead/e", false).await {
                    Ok(None) => return Ok(Instant::now()),
                    Ok(Some(_)) => anyhow::bail!("still there"),
                    Err(e) => last = format!("member {id}: {e}"),
                }
            }
            anyhow::bail!("no member answered: {last}")
        })
        .await
        .expect("dead session ends");
        let life = gone.duration_since(opened);

        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        let term1 = c.status(leader).await.expect("status").term;
        let elections = term1 - term0;
        assert!(elections >= 3, "three leader kills, terms {term0} -> {term1}");
        let checkpoint = Duration::from_millis(CHECKPOINT_MS);
        // Elections the test did not cause (none expected) are charged the
        // longest an election may take: two rounds of the maximum timeout.
        let unobserved = Duration::from_millis(CHECKPOINT_MS + 4 * ELECTION_MS + 2 * HEARTBEAT_MS);
        let slack = Duration::from_secs(2);
        let bound = Duration::from_millis(ttl)
            + outages.iter().map(|o| *o + checkpoint).sum::<Duration>()
            + unobserved * (elections - 3) as u32
            + slack;
        eprintln!(
            "dead session lived {life:?} (TTL {ttl} ms, {elections} elections taking {outages:?}, bound {bound:?})"
        );
        assert!(
            life <= bound,
            "a dead session lived {life:?}, more than TTL + elections x (checkpoint + election) + slack = {bound:?} \
             (elections {outages:?}, {} unobserved)",
            elections - 3
        );
        let st = keepalive_once(&c.endpoint(leader), sid)
            .await
            .expect_err("keepalive on the dead session");
        assert_session_expired("keepalive after expiry", &st);
    })
    .await;
}

/// Sessions survive kill -9 of every member: at boot their clocks restart
/// instead of expiring them, and the client keeps them alive afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_full_restart() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(
        Duration::from_secs(120),
        "sessions_survive_full_restart",
        async {
            let leader = c.wait_for_leader(WAIT).await.expect("a leader");
            let (sid, ttl) = open(&c, leader, 6_000).await;
            let ka = KeepAlive::start(c.endpoints(), sid, ttl);
            create_ephemeral(&mut c.kv(leader), "/fr/e", sid).await;
            ka.wait_oks(2, WAIT).await;

            for id in c.ids() {
                c.kill(id);
            }
            // The test's input: the whole cluster stays down for longer than the
            // TTL (while the client keeps trying); expiry must not be decided
            // from time that passed while no member ran.
            tokio::time::sleep(Duration::from_millis(ttl + 1_000)).await;
            for id in c.ids() {
                c.restart(id).expect("restart");
            }
            let leader = c
                .wait_for_leader(WAIT)
                .await
                .expect("a leader after restart");
            let n = ka.oks();
            ka.wait_oks(n + 1, WAIT).await;
            // The test's input: keep the session alive past another TTL.
            tokio::time::sleep(Duration::from_millis(ttl + 1_000)).await;

            assert!(ka.expired().is_none(), "{:?}", ka.expired());
            let node = lookup(&mut c.kv(leader), "/fr/e", false)
                .await
                .expect("get")
                .expect("ephemeral survives a full restart");
            assert_eq!(node.ephemeral_owner, sid);
            let i = info(&c, c.followers(leader)[0], sid)
                .await
                .expect("info after restart");
            assert_eq!(i.ttl_ms, ttl);
            assert!(i.remaining_ms > 0 && i.remaining_ms <= ttl, "{i:?}");
            assert_eq!(i.ephemerals, vec!["/fr/e"]);

            ka.stop().await;
            let (deleted, _) = close(&c, leader, sid).await;
            assert_eq!(deleted, 1);
        },
    )
    .await;
}

/// Sessions, their ephemerals and sequence counters travel in a snapshot to
/// a new member, which can then lead and serve them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_snapshot_install() {
    let c = Cluster::start(3, ClusterOptions::default().snapshot_threshold(50))
        .await
        .expect("start 3 members");
    bounded(
        Duration::from_secs(180),
        "sessions_survive_snapshot_install",
        async {
            let leader = c.wait_for_leader(WAIT).await.expect("a leader");
            let (sid, ttl) = open(&c, leader, 60_000).await;
            let mut kv = c.kv(leader);
            let mut paths = Vec::new();
            for _ in 0..3 {
                let mut req = create_req("/snap/q/lock-", sid);
                req.sequential = true;
                let n = kv
                    .create(req)
                    .await
                    .expect("create")
                    .into_inner()
                    .node
                    .expect("node");
                paths.push(n.path);
            }
            assert_eq!(
                paths,
                (0..3)
                    .map(|i| format!("/snap/q/lock-{i:010}"))
                    .collect::<Vec<_>>()
            );
            for i in 0..120 {
                put(&mut kv, &format!("/snap/fill/{i}"), format!("v{i}"))
                    .await
                    .expect("put");
            }
            let snap = c
                .cluster_client_with_timeout(leader, Duration::from_secs(60))
                .snapshot(SnapshotRequest {})
                .await
                .expect("Snapshot")
                .into_inner();
            assert!(snap.snapshot_index > 0);
            let ls = wait_for(WAIT, "the leader to purge its log", || async {
                let s = c.status(leader).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                if s.purged_index > 0 {
                    Ok(s)
                } else {
                    anyhow::bail!("purged_index 0")
                }
            })
            .await
            .expect("log purged behind the snapshot");

            let addr = c.start_new_member(4).expect("start member 4");
            c.wait_healthy(4, WAIT).await.expect("member 4 up");
            c.cluster_client_with_timeout(leader, Duration::from_secs(60))
                .add_learner(AddLearnerRequest {
                    id: 4,
                    addr,
                    wait: true,
                })
                .await
                .expect("AddLearner 4");
            let s4 = c.wait_caught_up(4, WAIT).await.expect("learner caught up");
            assert_eq!(role_of(&s4), Role::Learner);
            assert!(
                s4.snapshot_index >= ls.purged_index,
                "the learner was caught up by snapshot: {s4:?} vs purged {}",
                ls.purged_index
            );

            let mut kv4 = c.kv(4);
            for p in &paths {
                let n = lookup(&mut kv4, p, true)
                    .await
                    .expect("serializable get on the learner")
                    .unwrap_or_else(|| panic!("{p} missing on the learner"));
                assert_eq!(n.ephemeral_owner, sid, "{p}");
            }

            // Member 4 leads: its session clocks and counters come from the
            // installed snapshot.
            c.cluster_client(leader)
                .promote(PromoteRequest { id: 4 })
                .await
                .expect("Promote 4");
            c.wait_caught_up(4, WAIT).await.expect("caught up");
            c.cluster_client(leader)
                .transfer_leader(TransferLeaderRequest { id: 4 })
                .await
                .expect("TransferLeader 4");
            wait_until(WAIT, "member 4 to lead", || async {
                matches!(c.status(4).await, Ok(s) if role_of(&s) == Role::Leader)
            })
            .await
            .expect("member 4 leads");

            let ka = keepalive_once(&c.endpoint(4), sid)
                .await
                .expect("keepalive on member 4");
            assert_eq!(ka.ttl_ms, ttl);
            let i = info(&c, 4, sid).await.expect("info on member 4");
            assert_eq!(i.ephemerals, paths);

            let mut req = create_req("/snap/q/lock-", sid);
            req.sequential = true;
            let n = kv4
                .create(req)
                .await
                .expect("create on 4")
                .into_inner()
                .node
                .expect("node");
            assert_eq!(
                n.path,
                format!("/snap/q/lock-{:010}", 3),
                "the counter continues"
            );

            let (deleted, _) = close(&c, 4, sid).await;
            assert_eq!(deleted, 4, "all four ephemerals go with the session");
            let l = kv4
                .list(ListRequest {
                    path: "/snap/q".into(),
                    serializable: false,
                    min_revision: 0,
                })
                .await
                .expect("list")
                .into_inner();
            assert!(l.children.is_empty(), "{:?}", l.children);
        },
    )
    .await;
}

/// Keepalives that reach the members the moment they come back from a full
/// restart must not be told "session expired" for a session that exists
/// (its open is committed; the new leader has just not replayed it yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_right_after_full_restart_is_not_expired() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(
        Duration::from_secs(120),
        "keepalive_after_full_restart",
        async {
            let leader = c.wait_for_leader(WAIT).await.expect("a leader");
            // Log entries before the open, so that a restarted member takes
            // a moment to replay up to it.
            let fillers: Vec<_> = (0..8)
                .map(|t| {
                    let mut kv = c.kv(leader);
                    tokio::spawn(async move {
                        for i in 0..250 {
                            put(&mut kv, &format!("/kr/fill/{t}/{i}"), "x")
                                .await
                                .expect("put");
                        }
                    })
                })
                .collect();
            for f in fillers {
                f.await.expect("filler");
            }
            let (sid, _) = open(&c, leader, 30_000).await;
            create_ephemeral(&mut c.kv(leader), "/kr/e", sid).await;
            for id in c.ids() {
                c.kill(id);
            }
            for id in c.ids() {
                c.restart(id).expect("restart");
            }
            // One prober per member, each retrying at once until it gets an
            // answer that is not UNAVAILABLE (member not up, no leader yet).
            let probes: Vec<_> = c
                .ids()
                .into_iter()
                .map(|id| {
                    let ep = c.endpoint(id);
                    tokio::spawn(async move {
                        loop {
                            match keepalive_once(&ep, sid).await {
                                Err(st) if st.code() == Code::Unavailable => {
                                    tokio::task::yield_now().await
                                }
                                other => return (id, other),
                            }
                        }
                    })
                })
                .collect();
            let mut answers = Vec::new();
            for p in probes {
                answers.push(p.await.expect("probe"));
            }
            let leader = c.wait_for_leader(WAIT).await.expect("a leader");
            // The session was never lost: it is still there afterwards.
            let i = info(&c, leader, sid).await.expect("info after restart");
            assert_eq!(i.ephemerals, vec!["/kr/e"]);
            for (id, r) in &answers {
                assert!(
                    r.is_ok(),
                    "first keepalive answer via member {id} after a full restart: {r:?}, \
                     yet the session still exists: {i:?}"
                );
            }
            let (deleted, _) = close(&c, leader, sid).await;
            assert_eq!(deleted, 1);
        },
    )
    .await;
}
