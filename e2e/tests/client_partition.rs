//! A lock holder or election leader that stays alive but is cut off from the
//! cluster (a client-side network partition, made with
//! [`lockd_e2e::proxy::Proxy`]) must stop acting as holder/leader before
//! anyone else takes over, and its late guarded write must be rejected once
//! the partition heals.
//!
//! The cut-off client and the one taking over live in this test process, so
//! the instants they report are on the same (Tokio) clock and can be
//! compared directly.

use std::time::Duration;

use lockd_client::proto;
use lockd_client::recipes::{
    holds_lock_compare, ElectionConfig, ElectionEvent, LeaderElection, Mutex,
};
use lockd_client::{Client, ClientOptions};
use lockd_e2e::proxy::Proxy;
use lockd_e2e::{bounded, wait_for, wait_until, Cluster, ClusterOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};

const WAIT: Duration = Duration::from_secs(20);
/// Session TTL of the client that gets cut off.
const TTL: Duration = Duration::from_secs(2);
/// Scheduling slack allowed past the TTL for the cut-off client to notice.
const SLACK: Duration = Duration::from_millis(500);

async fn start() -> Cluster {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    c.wait_for_leader(WAIT).await.expect("a leader");
    c
}

/// A client that reaches each member only through its own proxy, and the
/// proxies. Short request timeouts, so that calls stuck behind the cut give
/// up quickly.
async fn cut_off_client(c: &Cluster) -> (Vec<Proxy>, Client) {
    let mut proxies = Vec::new();
    for id in c.ids() {
        proxies.push(Proxy::start(&c.addr(id)).await.expect("start a proxy"));
    }
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(2),
        retry_budget: Duration::from_secs(6),
    };
    let client = Client::connect_with(proxies.iter().map(Proxy::endpoint), opts)
        .expect("client through the proxies");
    (proxies, client)
}

async fn cut_all(proxies: &[Proxy]) {
    for p in proxies {
        p.cut().await;
    }
}

fn heal_all(proxies: &[Proxy]) {
    for p in proxies {
        p.heal();
    }
}

fn put_txn(path: &str, data: &str) -> proto::TxnRequest {
    proto::TxnRequest {
        success: vec![proto::Op {
            op: Some(proto::op::Op::Put(proto::PutRequest {
                path: path.into(),
                data: data.into(),
                expected_version: None,
                parents: true,
            })),
        }],
        ..Default::default()
    }
}

fn guarded_put(path: &str, data: &str, node: &str, token: u64) -> proto::TxnRequest {
    proto::TxnRequest {
        compare: vec![holds_lock_compare(node, token)],
        ..put_txn(path, data)
    }
}

async fn read(client: &Client, path: &str) -> String {
    let node = client
        .get(path)
        .await
        .unwrap_or_else(|e| panic!("get {path}: {e}"))
        .node
        .unwrap_or_else(|| panic!("get {path}: no node"));
    String::from_utf8_lossy(&node.data).into_owned()
}

/// Sends `txn` (a stale guarded write) until the cluster answers it, i.e.
/// until the healed link carries it; returns the answer. Errors (the
/// client's connections still recovering from the cut) are retried.
async fn late_write<F, Fut>(what: &str, mut txn: F) -> proto::TxnResponse
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<proto::TxnResponse, lockd_client::Error>>,
{
    wait_for(WAIT, what, || {
        let fut = txn();
        async move { fut.await.map_err(anyhow::Error::from) }
    })
    .await
    .unwrap_or_else(|e| panic!("{what}: no answer after the heal: {e:#}"))
}

async fn waited_for_queue(client: &Client, dir: &str, n: usize) {
    wait_until(WAIT, &format!("{n} contenders in {dir}"), || async {
        client.list(dir).await.is_ok_and(|l| l.children.len() == n)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

// ---------------------------------------------------------------------------
// The proxy itself
// ---------------------------------------------------------------------------

/// An echo server on an ephemeral port; its address.
async fn echo_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = l.local_addr().expect("echo address").to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn echo(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.expect("write");
    let mut buf = vec![0; msg.len()];
    timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("echo answers")
        .expect("read echo");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_cuts_and_heals() {
    bounded(Duration::from_secs(30), "proxy", async {
        let p = Proxy::start(&echo_server().await)
            .await
            .expect("start proxy");
        let mut s1 = TcpStream::connect(p.addr()).await.expect("connect");
        assert_eq!(echo(&mut s1, b"ping").await, b"ping");
        assert_eq!(p.live(), 1);

        p.cut().await;
        assert!(p.is_cut());
        assert_eq!(p.live(), 0);
        // The live connection is closed...
        let mut buf = [0u8; 16];
        match timeout(WAIT, s1.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            other => panic!("live connection not closed by the cut: {other:?}"),
        }
        // ...and a new one is accepted but never answered.
        let mut s2 = TcpStream::connect(p.addr())
            .await
            .expect("connect while cut");
        s2.write_all(b"held").await.expect("write while cut");
        wait_until(WAIT, "the proxy holds the new connection", || async {
            p.held() == 1
        })
        .await
        .expect("held");
        // This wait is the length of the observed fault, not a wait for an
        // event: nothing must come back during it.
        let r = timeout(Duration::from_millis(300), s2.read(&mut buf)).await;
        assert!(r.is_err(), "answer while cut: {r:?}");

        p.heal();
        assert!(!p.is_cut());
        assert_eq!(p.held(), 0);
        // The held connection delivers what was sent during the cut.
        let mut got = [0u8; 4];
        timeout(WAIT, s2.read_exact(&mut got))
            .await
            .expect("held connection forwarded after heal")
            .expect("read");
        assert_eq!(&got, b"held");
        assert_eq!(echo(&mut s2, b"more").await, b"more");
        let mut s3 = TcpStream::connect(p.addr()).await.expect("connect");
        assert_eq!(echo(&mut s3, b"new").await, b"new");
        assert_eq!(p.accepted(), 3);
    })
    .await;
}

// ---------------------------------------------------------------------------
// Mutex
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_holder_lets_go_before_the_waiter_acquires() {
    const LOCK: &str = "/locks/part";
    const DATA: &str = "/part/data";
    let c = start().await;
    bounded(Duration::from_secs(60), "mutex holder cut off", async {
        let (proxies, a) = cut_off_client(&c).await;
        let b = Client::connect(c.endpoints()).expect("client b");

        // A holds the lock (through the proxies) and writes under it.
        let sa = a.open_session(TTL).await.expect("session a");
        assert_eq!(sa.ttl(), TTL, "TTL granted as asked");
        let ga = Mutex::new(a.clone(), LOCK, &sa)
            .lock()
            .await
            .expect("a locks");
        let r = ga
            .guarded_txn(put_txn(DATA, "a"))
            .await
            .expect("a's guarded write");
        assert!(r.succeeded, "a's guarded write while holding");
        assert!(
            proxies.iter().map(Proxy::accepted).sum::<u64>() > 0,
            "a's traffic goes through the proxies"
        );

        // B waits for the lock (directly connected).
        let sb = b
            .open_session(Duration::from_secs(10))
            .await
            .expect("session b");
        let mb = Mutex::new(b.clone(), LOCK, &sb);
        let waiter = tokio::spawn(async move {
            let g = mb.lock().await;
            (Instant::now(), g)
        });
        waited_for_queue(&b, LOCK, 2).await;

        let a_lost = {
            let lost = ga.lost();
            tokio::spawn(async move {
                let why = lost.await;
                (Instant::now(), why)
            })
        };
        assert!(!a_lost.is_finished(), "a lost the lock before the cut");
        assert!(!waiter.is_finished(), "b acquired while a holds the lock");

        let cut_at = Instant::now();
        cut_all(&proxies).await;

        let (a_lost_at, why) = timeout(TTL + WAIT, a_lost)
            .await
            .expect("a notices the loss")
            .expect("a's lost task");
        let (b_at, gb) = timeout(TTL + WAIT, waiter)
            .await
            .expect("b acquires after a's session expires")
            .expect("b's lock task");
        let gb = gb.expect("b's lock()");
        eprintln!(
            "a lost {:?} after the cut ({why}); b acquired {:?} after the cut, {:?} after a's loss",
            a_lost_at - cut_at,
            b_at - cut_at,
            b_at.saturating_duration_since(a_lost_at),
        );
        assert!(
            a_lost_at < b_at,
            "b acquired {:?} before the cut-off holder noticed its loss",
            a_lost_at - b_at
        );
        assert!(
            a_lost_at <= cut_at + TTL + SLACK,
            "a noticed its loss {:?} after the cut (TTL {TTL:?})",
            a_lost_at - cut_at
        );
        assert!(sa.is_lost() && ga.is_lost(), "a's session is Lost");
        assert!(
            gb.fencing_token() > ga.fencing_token(),
            "tokens: a {} b {}",
            ga.fencing_token(),
            gb.fencing_token()
        );
        let r = gb
            .guarded_txn(put_txn(DATA, "b"))
            .await
            .expect("b's guarded write");
        assert!(r.succeeded, "b's guarded write while holding");

        // The partition heals; A, still believing nothing, writes late.
        heal_all(&proxies);
        let r = late_write("a's late guarded write", || {
            ga.guarded_txn(put_txn(DATA, "a-late"))
        })
        .await;
        assert!(!r.succeeded, "the cut-off holder's late write applied");
        assert_eq!(read(&b, DATA).await, "b");
        assert_eq!(read(&a, DATA).await, "b", "a's client works again");

        gb.unlock().await.expect("b unlocks");
        sb.close().await.expect("close b's session");
    })
    .await;
}

// ---------------------------------------------------------------------------
// LeaderElection
// ---------------------------------------------------------------------------

type Event = (Instant, &'static str, ElectionEvent);

/// Campaigns as `who` in the background, sending every event (stamped on
/// arrival) to `tx`, until the returned sender is used or dropped.
fn candidate(
    client: Client,
    dir: &str,
    who: &'static str,
    lease_ttl: Duration,
    tx: mpsc::UnboundedSender<Event>,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let election = LeaderElection::new(client, dir, ElectionConfig::new(who, lease_ttl))
        .expect("valid election config");
    let (stop_tx, mut stop) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut campaign = election.campaign();
        loop {
            tokio::select! {
                ev = campaign.next() => match ev {
                    Some(ev) => {
                        let _ = tx.send((Instant::now(), who, ev));
                    }
                    None => break,
                },
                _ = &mut stop => break,
            }
        }
        for ev in campaign.cancel().await {
            let _ = tx.send((Instant::now(), who, ev));
        }
    });
    (stop_tx, task)
}

/// Every event received so far, in order of arrival.
struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
    log: Vec<Event>,
}

impl Events {
    /// The first event at index `from` or later matching `pred`, waiting for
    /// it; its index and the event.
    async fn find(
        &mut self,
        from: usize,
        what: &str,
        pred: impl Fn(&str, &ElectionEvent) -> bool,
    ) -> (usize, Event) {
        let deadline = Instant::now() + WAIT;
        let mut i = from;
        loop {
            while i < self.log.len() {
                let (_, who, ev) = &self.log[i];
                if pred(who, ev) {
                    return (i, self.log[i].clone());
                }
                i += 1;
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.log.push(ev),
                Ok(None) => panic!("event stream ended waiting for {what}: {:?}", self.log),
                Err(_) => panic!("timed out waiting for {what}; events: {:?}", self.log),
            }
        }
    }

    /// Takes in what has arrived; the log's length.
    fn drain(&mut self) -> usize {
        while let Ok(ev) = self.rx.try_recv() {
            self.log.push(ev);
        }
        self.log.len()
    }
}

fn started(ev: &ElectionEvent) -> Option<(u64, String)> {
    match ev {
        ElectionEvent::StartedLeading {
            fencing_token,
            path,
        } => Some((*fencing_token, path.clone())),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_leader_stops_before_the_next_one_starts() {
    const DIR: &str = "/elections/part";
    const DATA: &str = "/part/leader-data";
    let c = start().await;
    bounded(Duration::from_secs(60), "election leader cut off", async {
        let (proxies, a) = cut_off_client(&c).await;
        let b = Client::connect(c.endpoints()).expect("client b");
        let (tx, rx) = mpsc::unbounded_channel();
        let mut events = Events {
            rx,
            log: Vec::new(),
        };

        // A leads (through the proxies) and writes under its term.
        let cand_a = candidate(a.clone(), DIR, "a", TTL, tx.clone());
        let (_, (_, _, ev)) = events
            .find(0, "a leads", |who, ev| who == "a" && started(ev).is_some())
            .await;
        let (token_a, path_a) = started(&ev).expect("StartedLeading");
        let r = a
            .txn(guarded_put(DATA, "a", &path_a, token_a))
            .await
            .expect("a's guarded write");
        assert!(r.succeeded, "a's guarded write while leading");

        // B campaigns too (directly connected) and queues behind A.
        let cand_b = candidate(b.clone(), DIR, "b", Duration::from_secs(10), tx);
        waited_for_queue(&b, DIR, 2).await;
        let before_cut = events.drain();
        assert!(
            !events.log.iter().any(|(_, who, ev)| (*who == "b" && started(ev).is_some())
                || (*who == "a" && matches!(ev, ElectionEvent::StoppedLeading { .. }))),
            "leadership moved before the cut: {:?}",
            events.log
        );

        let cut_at = Instant::now();
        cut_all(&proxies).await;

        let (_, (a_stopped_at, _, why)) = events
            .find(before_cut, "a stops leading", |who, ev| {
                who == "a" && matches!(ev, ElectionEvent::StoppedLeading { .. })
            })
            .await;
        let (b_idx, (b_started_at, _, ev)) = events
            .find(before_cut, "b leads", |who, ev| {
                who == "b" && started(ev).is_some()
            })
            .await;
        let (token_b, path_b) = started(&ev).expect("StartedLeading");
        eprintln!(
            "a stopped {:?} after the cut ({why:?}); b started {:?} after the cut, {:?} after a stopped",
            a_stopped_at - cut_at,
            b_started_at - cut_at,
            b_started_at.saturating_duration_since(a_stopped_at),
        );
        assert!(
            a_stopped_at < b_started_at,
            "b started leading {:?} before the cut-off leader stopped",
            a_stopped_at - b_started_at
        );
        // A steps down once its renew deadline has passed since its last
        // acknowledged keepalive (sent before the cut), before its TTL.
        let renew_deadline = ElectionConfig::new("a", TTL).renew_deadline;
        assert!(
            a_stopped_at <= cut_at + renew_deadline + SLACK,
            "a stopped leading {:?} after the cut (renew deadline {renew_deadline:?}, TTL {TTL:?})",
            a_stopped_at - cut_at
        );
        assert!(token_b > token_a, "tokens: a {token_a} b {token_b}");
        assert!(
            !events.log[before_cut..=b_idx]
                .iter()
                .any(|(_, who, ev)| *who == "a" && started(ev).is_some()),
            "a led again during the cut: {:?}",
            events.log
        );
        let r = b
            .txn(guarded_put(DATA, "b", &path_b, token_b))
            .await
            .expect("b's guarded write");
        assert!(r.succeeded, "b's guarded write while leading");

        // The partition heals; A's late write under its old term is
        // rejected, and A rejoins behind B.
        let healed = events.drain();
        heal_all(&proxies);
        let r = late_write("a's late guarded write", || {
            a.txn(guarded_put(DATA, "a-late", &path_a, token_a))
        })
        .await;
        assert!(!r.succeeded, "the cut-off leader's late write applied");
        assert_eq!(read(&b, DATA).await, "b");
        events
            .find(healed, "a sees b leading", |who, ev| {
                who == "a"
                    && matches!(ev, ElectionEvent::NewLeader { identity, fencing_token }
                        if identity == "b" && *fencing_token == token_b)
            })
            .await;
        waited_for_queue(&b, DIR, 2).await;
        events.drain();
        assert!(
            !events.log[before_cut..]
                .iter()
                .any(|(_, who, ev)| *who == "a" && started(ev).is_some()),
            "a led again while b leads: {:?}",
            events.log
        );

        for (stop, task) in [cand_a, cand_b] {
            let _ = stop.send(());
            timeout(WAIT, task)
                .await
                .expect("campaign ends")
                .expect("campaign task");
        }
    })
    .await;
}
