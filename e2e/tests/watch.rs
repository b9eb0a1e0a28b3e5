//! Watch streams against real 3-member clusters: ordering across members,
//! failover with resume, compaction, progress notices, slow watchers and
//! subtree (getChildren-style) watches.

use std::collections::BTreeSet;
use std::time::Duration;

use lockd_client::{Client, Error, WatchEvent, WatchEventKind, WatchOptions, Watcher};
use lockd_e2e::{bounded, put, revision, v1, Cluster, ClusterOptions, Writer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use v1::watch_client::WatchClient;

const WAIT: Duration = Duration::from_secs(20);

fn addr(c: &Cluster, id: u64) -> String {
    c.addr(id)
}

/// Reads events until one is a put of `done_path`; returns all before it.
async fn until_done(w: &mut Watcher, done_path: &str) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    loop {
        let e = tokio::time::timeout(WAIT, w.next())
            .await
            .expect("an event within the wait")
            .expect("watch event");
        if e.node.path == done_path {
            return out;
        }
        out.push(e);
    }
}

fn key(e: &WatchEvent) -> (u64, String, WatchEventKind) {
    (e.revision, e.node.path.clone(), e.kind)
}

/// Revisions never go back, and no (revision, path) is delivered twice (a
/// revision may carry several events: a put with `parents` creates them).
fn assert_in_order_without_duplicates(events: &[WatchEvent]) {
    for p in events.windows(2) {
        assert!(
            p[1].revision >= p[0].revision,
            "revisions must not go back: {:?} then {:?}",
            key(&p[0]),
            key(&p[1])
        );
    }
    let distinct: BTreeSet<(u64, String)> = events
        .iter()
        .map(|e| (e.revision, e.node.path.clone()))
        .collect();
    assert_eq!(distinct.len(), events.len(), "duplicate events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_and_follower_watchers_see_identical_sequences() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start");
    bounded(Duration::from_secs(120), "identical sequences", async {
        let leader = c.wait_for_leader(WAIT).await.expect("leader");
        let follower = c.followers(leader)[0];
        let mut kv = c.kv(leader);
        let r0 = revision(&put(&mut kv, "/w/start", "x").await.expect("put").header);
        let on = |id: u64| {
            Client::connect([addr(&c, id)])
                .expect("client")
                .watch(WatchOptions::subtree("/w").from_revision(r0 + 1))
        };
        let (wl, wf) = (on(leader), on(follower));
        let writers: Vec<Writer> = ["/w/a", "/w/b", "/w/c"]
            .iter()
            .map(|p| Writer::spawn(c.endpoints(), p, Duration::from_secs(5)))
            .collect();
        let reader =
            |mut w: Watcher| tokio::spawn(async move { until_done(&mut w, "/w/done").await });
        let (hl, hf) = (reader(wl), reader(wf));
        for w in &writers {
            w.wait_acked(100, WAIT).await.expect("writes");
        }
        let mut acked = Vec::new();
        for w in writers {
            let report = w.stop().await;
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            acked.extend(report.acked);
        }
        put(&mut kv, "/w/done", "x").await.expect("done");
        let (el, ef) = (
            hl.await.expect("leader reader"),
            hf.await.expect("follower reader"),
        );
        let (kl, kf): (Vec<_>, Vec<_>) =
            (el.iter().map(key).collect(), ef.iter().map(key).collect());
        assert_eq!(kl, kf, "leader and follower watchers differ");
        assert_in_order_without_duplicates(&el);
        let seen: BTreeSet<(u64, String)> = el
            .iter()
            .map(|e| (e.revision, e.node.path.clone()))
            .collect();
        for a in &acked {
            assert!(
                seen.contains(&(a.revision, a.key.clone())),
                "acked write {a:?} not watched"
            );
        }
        assert!(el.len() >= acked.len());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watcher_resumes_after_leader_kill() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start");
    bounded(
        Duration::from_secs(150),
        "resume after leader kill",
        async {
            let leader = c.wait_for_leader(WAIT).await.expect("leader");
            let mut eps = vec![addr(&c, leader)];
            eps.extend(
                c.ids()
                    .into_iter()
                    .filter(|&i| i != leader)
                    .map(|i| addr(&c, i)),
            );
            let client = Client::connect(eps).expect("client");
            let mut kv = c.kv(leader);
            let r0 = revision(&put(&mut kv, "/k/start", "x").await.expect("put").header);
            let mut w = client.watch(WatchOptions::subtree("/k").from_revision(r0 + 1));
            let writer = Writer::spawn(c.endpoints(), "/k/w", Duration::from_secs(5));
            let mut events = Vec::new();
            while events.len() < 30 {
                events.push(
                    tokio::time::timeout(WAIT, w.next())
                        .await
                        .expect("event")
                        .expect("ok"),
                );
            }
            c.kill(leader);
            let at_kill = writer.acked();
            writer
                .wait_acked(at_kill + 50, Duration::from_secs(40))
                .await
                .expect("writes resume");
            let report = writer.stop().await;
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            let new_leader = c.wait_for_leader(WAIT).await.expect("new leader");
            put(&mut c.kv(new_leader), "/k/done", "x")
                .await
                .expect("done");
            events.extend(until_done(&mut w, "/k/done").await);
            assert!(w.reconnects() >= 1, "the watcher must have reconnected");
            assert_in_order_without_duplicates(&events);
            let seen: BTreeSet<(u64, String)> = events
                .iter()
                .map(|e| (e.revision, e.node.path.clone()))
                .collect();
            for a in &report.acked {
                assert!(
                    seen.contains(&(a.revision, a.key.clone())),
                    "acked write {a:?} lost across failover"
                );
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_names_oldest_and_oldest_is_complete() {
    let c = Cluster::start(
        3,
        ClusterOptions::default()
            .arg("--watch-history-revisions")
            .arg("50"),
    )
    .await
    .expect("start");
    bounded(Duration::from_secs(120), "compaction", async {
        let leader = c.wait_for_leader(WAIT).await.expect("leader");
        let mut kv = c.kv(leader);
        for i in 0..80 {
            put(&mut kv, &format!("/c/{i}"), "v").await.expect("put");
        }
        // A delete, then exactly 49 more writes: the delete's revision is
        // then the oldest retained (50 revisions).
        let d = revision(
            &kv.delete(v1::DeleteRequest {
                path: "/c/0".into(),
                expected_version: None,
                recursive: false,
            })
            .await
            .expect("delete")
            .into_inner()
            .header,
        );
        let mut last = d;
        for i in 0..49 {
            last = revision(
                &put(&mut kv, &format!("/c/x{i}"), "v")
                    .await
                    .expect("put")
                    .header,
            );
        }
        assert_eq!(last, d + 49, "no other revision expected meanwhile");
        let client = Client::connect([addr(&c, leader)]).expect("client");
        let err = client
            .watch(WatchOptions::subtree("/c").from_revision(d - 1))
            .next()
            .await
            .expect_err("compacted");
        match &err {
            Error::Compacted { oldest, message } => {
                assert_eq!(*oldest, d, "{message}");
                assert!(
                    message.contains(&format!("oldest available revision is {d}")),
                    "{message}"
                );
            }
            other => panic!("expected Compacted, got {other}"),
        }
        // Starting exactly at the oldest gets every event from it, the delete first.
        for id in c.ids() {
            let client = Client::connect([addr(&c, id)]).expect("client");
            let mut w = client.watch(WatchOptions::subtree("/c").from_revision(d));
            let first = tokio::time::timeout(WAIT, w.next())
                .await
                .expect("event")
                .expect("ok");
            assert_eq!(
                (first.revision, first.kind, first.node.path.as_str()),
                (d, WatchEventKind::Delete, "/c/0")
            );
            for i in 0..49u64 {
                let e = tokio::time::timeout(WAIT, w.next())
                    .await
                    .expect("event")
                    .expect("ok");
                assert_eq!(e.revision, d + 1 + i, "member {id}");
            }
        }
    })
    .await;
}

async fn raw_watch(
    endpoint: &str,
    window: Option<u32>,
) -> (
    mpsc::Sender<v1::WatchRequest>,
    tonic::Streaming<v1::WatchResponse>,
) {
    let mut ep = Endpoint::from_shared(endpoint.to_string()).expect("endpoint");
    if let Some(w) = window {
        ep = ep
            .initial_stream_window_size(Some(w))
            .initial_connection_window_size(Some(w));
    }
    let (tx, rx) = mpsc::channel(8);
    let stream = WatchClient::new(ep.connect_lazy())
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch stream")
        .into_inner();
    (tx, stream)
}

fn create(path: &str, scope: v1::watch_create::Scope, start: u64) -> v1::WatchRequest {
    v1::WatchRequest {
        request: Some(v1::watch_request::Request::Create(v1::WatchCreate {
            path: path.into(),
            scope: scope as i32,
            start_revision: start,
            ..Default::default()
        })),
    }
}

async fn recv(s: &mut tonic::Streaming<v1::WatchResponse>) -> v1::WatchResponse {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("a response within the wait")
        .expect("stream ok")
        .expect("stream open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notices_on_idle_watch() {
    let c = Cluster::start(
        3,
        ClusterOptions::default()
            .arg("--watch-progress-interval-ms")
            .arg("200"),
    )
    .await
    .expect("start");
    bounded(Duration::from_secs(60), "progress", async {
        let leader = c.wait_for_leader(WAIT).await.expect("leader");
        let follower = c.followers(leader)[0];
        let rev = revision(
            &put(&mut c.kv(leader), "/p/other", "x")
                .await
                .expect("put")
                .header,
        );
        let (tx, mut s) = raw_watch(&c.endpoint(follower), None).await;
        tx.send(create("/idle", v1::watch_create::Scope::Key, 0))
            .await
            .expect("send");
        let created = recv(&mut s).await;
        assert!(created.created, "{created:?}");
        // Periodic notices, eventually at (or past) the last write.
        loop {
            let r = recv(&mut s).await;
            assert!(r.progress && r.events.is_empty(), "{r:?}");
            if revision(&r.header) >= rev {
                break;
            }
        }
        // An explicit request is answered too.
        tx.send(v1::WatchRequest {
            request: Some(v1::watch_request::Request::Progress(v1::WatchProgress {})),
        })
        .await
        .expect("send");
        let r = recv(&mut s).await;
        assert!(r.progress && revision(&r.header) >= rev, "{r:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_watcher_is_cancelled_and_resumes_from_named_revision() {
    let c = Cluster::start(3, ClusterOptions::default().arg("--watch-buffer").arg("4"))
        .await
        .expect("start");
    bounded(Duration::from_secs(120), "slow watcher", async {
        let leader = c.wait_for_leader(WAIT).await.expect("leader");
        let r0 = revision(
            &put(&mut c.kv(leader), "/s/start", "x")
                .await
                .expect("put")
                .header,
        );
        // A tiny flow-control window: the member cannot push much before the
        // client reads.
        let (tx, mut s) = raw_watch(&c.endpoint(leader), Some(1024)).await;
        tx.send(create("/s", v1::watch_create::Scope::Subtree, r0 + 1))
            .await
            .expect("send");
        assert!(recv(&mut s).await.created);
        // Do not read while writing.
        let mut handles = Vec::new();
        for t in 0..4 {
            let mut kv = c.kv(leader);
            handles.push(tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..50 {
                    let h = put(&mut kv, &format!("/s/{t}-{i}"), vec![b'x'; 2048])
                        .await
                        .expect("put")
                        .header;
                    revs.push(revision(&h));
                }
                revs
            }));
        }
        let mut written = BTreeSet::new();
        for h in handles {
            written.extend(h.await.expect("writer"));
        }
        let mut got = Vec::new();
        let resume = loop {
            let r = recv(&mut s).await;
            if r.canceled {
                let reason = r.cancel_reason.clone();
                let n: u64 = reason
                    .strip_prefix("watcher fell behind; resume from revision ")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("reason {reason:?}"));
                break n;
            }
            got.push(revision(&r.header));
        };
        assert!(
            resume <= *written.iter().max().expect("writes"),
            "cancelled before the end"
        );
        assert_eq!(
            got.last().map_or(r0 + 1, |l| l + 1),
            resume,
            "resume right after the last delivered"
        );
        let (tx2, mut s2) = raw_watch(&c.endpoint(leader), None).await;
        tx2.send(create("/s", v1::watch_create::Scope::Subtree, resume))
            .await
            .expect("send");
        assert!(recv(&mut s2).await.created);
        let max = *written.iter().max().expect("writes");
        while got.last().copied().unwrap_or(0) < max {
            let r = recv(&mut s2).await;
            assert!(!r.canceled, "{r:?}");
            if !r.progress {
                got.push(revision(&r.header));
            }
        }
        let all: BTreeSet<u64> = got.iter().copied().collect();
        assert_eq!(all.len(), got.len(), "no duplicates");
        assert_eq!(all, written, "every write exactly once across the resume");
        drop(tx);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subtree_watch_sees_children_created_and_deleted() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start");
    bounded(Duration::from_secs(60), "subtree", async {
        let leader = c.wait_for_leader(WAIT).await.expect("leader");
        let follower = c.followers(leader)[0];
        let mut kv = c.kv(leader);
        let r0 = revision(&put(&mut kv, "/dir", "").await.expect("put").header);
        let client = Client::connect([addr(&c, follower)]).expect("client");
        let mut sub = client.watch(WatchOptions::subtree("/dir").from_revision(r0 + 1));
        let mut only_dir = client.watch(WatchOptions::key("/dir").from_revision(r0 + 1));
        put(&mut kv, "/dir/a", "1").await.expect("a");
        put(&mut kv, "/dir/b", "2").await.expect("b");
        put(&mut kv, "/dirx", "not a child").await.expect("dirx");
        kv.delete(v1::DeleteRequest {
            path: "/dir/a".into(),
            expected_version: None,
            recursive: false,
        })
        .await
        .expect("delete a");
        put(&mut kv, "/dir", "changed").await.expect("dir");
        let mut seen = Vec::new();
        for _ in 0..4 {
            let e = tokio::time::timeout(WAIT, sub.next())
                .await
                .expect("event")
                .expect("ok");
            seen.push((e.kind, e.node.path));
        }
        assert_eq!(
            seen,
            vec![
                (WatchEventKind::Put, "/dir/a".to_string()),
                (WatchEventKind::Put, "/dir/b".to_string()),
                (WatchEventKind::Delete, "/dir/a".to_string()),
                (WatchEventKind::Put, "/dir".to_string()),
            ]
        );
        let e = tokio::time::timeout(WAIT, only_dir.next())
            .await
            .expect("event")
            .expect("ok");
        assert_eq!(
            (e.kind, e.node.path.as_str()),
            (WatchEventKind::Put, "/dir"),
            "a key watch ignores children"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_watch_prints_events_and_exits_0_on_sigint() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start");
    bounded(Duration::from_secs(60), "lockctl watch", async {
        let leader = c.wait_for_leader(WAIT).await.expect("leader");
        let mut kv = c.kv(leader);
        let r0 = revision(&put(&mut kv, "/l", "").await.expect("put").header);
        let mut child = tokio::process::Command::new(lockd_e2e::lockctl_bin())
            .args([
                "--endpoints",
                &c.endpoints().join(","),
                "watch",
                "/l",
                "--subtree",
            ])
            .args(["--from-rev", &(r0 + 1).to_string()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn lockctl");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let r1 = revision(&put(&mut kv, "/l/a", "1").await.expect("put").header);
        let r2 = revision(
            &kv.delete(v1::DeleteRequest {
                path: "/l/a".into(),
                expected_version: None,
                recursive: false,
            })
            .await
            .expect("delete")
            .into_inner()
            .header,
        );
        for want in [
            format!("PUT /l/a 1 rev={r1}"),
            format!("DELETE /l/a rev={r2}"),
        ] {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("a line")
                .expect("read")
                .expect("open");
            assert_eq!(line, want);
        }
        let pid = child.id().expect("pid") as i32;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let st = tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("exit")
            .expect("wait");
        assert!(st.success(), "lockctl watch exited with {st}");
    })
    .await;
}

/// A watch that asks to wait until its member has caught up starts only
/// once that member has applied everything committed before it was created,
/// even on a member that was cut off a moment ago.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_caught_up_starts_after_everything_committed() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(Duration::from_secs(90), "wait_caught_up", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        let lagging = c.followers(leader)[0];
        c.signal(lagging, libc::SIGSTOP);
        let mut last = 0;
        for i in 0..50 {
            let r = put(&mut c.kv(leader), &format!("/cu/{i}"), "x")
                .await
                .expect("majority writes");
            last = revision(&r.header);
        }
        c.signal(lagging, libc::SIGCONT);
        let (tx, mut stream) = raw_watch(&c.endpoint(lagging), None).await;
        tx.send(v1::WatchRequest {
            request: Some(v1::watch_request::Request::Create(v1::WatchCreate {
                path: "/cu".into(),
                scope: v1::watch_create::Scope::Subtree as i32,
                wait_caught_up: true,
                ..Default::default()
            })),
        })
        .await
        .expect("send create");
        let created = recv(&mut stream).await;
        assert!(created.created, "{created:?}");
        assert!(
            revision(&created.header) >= last,
            "the watch started at revision {} before the member caught up with {last}",
            revision(&created.header)
        );
    })
    .await;
}
