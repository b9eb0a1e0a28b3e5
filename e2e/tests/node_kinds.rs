//! Node kinds against real clusters: sequential counters under concurrent
//! creators on different members, containers, the ephemeral-has-no-children
//! rule, request-id deduplication of retried writes, and ephemeral+sequential
//! creates inside transactions.

use std::collections::BTreeSet;
use std::time::Duration;

use lockd_e2e::v1::kv_client::KvClient;
use lockd_e2e::v1::{
    compare, op, op_result, CloseSessionRequest, Compare, CreateRequest, DeleteRequest, GetRequest,
    ListRequest, Node, Op, OpenSessionRequest, PutRequest, TxnRequest, TxnResponse,
};
use lockd_e2e::{bounded, put, revision, Cluster, ClusterOptions};
use tonic::transport::Channel;
use tonic::{Code, Status};

const WAIT: Duration = Duration::from_secs(20);

/// Opens a session (long TTL: these tests end well within it).
async fn open(c: &Cluster, via: u64) -> u64 {
    c.session(via)
        .open(OpenSessionRequest { ttl_ms: 120_000 })
        .await
        .expect("open session")
        .into_inner()
        .session_id
}

async fn close(c: &Cluster, via: u64, session_id: u64) -> u64 {
    c.session(via)
        .close(CloseSessionRequest { session_id })
        .await
        .expect("close session")
        .into_inner()
        .deleted
}

fn req(path: &str) -> CreateRequest {
    CreateRequest {
        path: path.to_string(),
        data: Vec::new(),
        parents: false,
        session_id: 0,
        sequential: false,
        container: false,
        request_id: String::new(),
    }
}

async fn create(kv: &mut KvClient<Channel>, r: CreateRequest) -> Result<Node, Status> {
    let what = r.path.clone();
    kv.create(r).await.map(|r| {
        r.into_inner()
            .node
            .unwrap_or_else(|| panic!("create {what}: no node"))
    })
}

/// The node at `path` (linearizable), None on NOT_FOUND.
async fn lookup(kv: &mut KvClient<Channel>, path: &str) -> Option<Node> {
    match kv
        .get(GetRequest {
            path: path.to_string(),
            serializable: false,
            min_revision: 0,
        })
        .await
    {
        Ok(r) => r.into_inner().node,
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => panic!("get {path}: {s}"),
    }
}

async fn children(kv: &mut KvClient<Channel>, path: &str) -> Vec<String> {
    kv.list(ListRequest {
        path: path.to_string(),
        serializable: false,
        min_revision: 0,
    })
    .await
    .unwrap_or_else(|e| panic!("list {path}: {e}"))
    .into_inner()
    .children
    .into_iter()
    .map(|n| n.path)
    .collect()
}

/// The 10-digit counter of a sequential node's name.
fn seq_of(path: &str, prefix: &str) -> u64 {
    let digits = path
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{path} does not start with {prefix}"));
    assert!(
        digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()),
        "{path}: the counter must be 10 zero-padded digits"
    );
    digits.parse().expect("digits")
}

fn create_op(r: CreateRequest) -> Op {
    Op {
        op: Some(op::Op::Create(r)),
    }
}

fn created_path(resp: &TxnResponse, i: usize) -> String {
    match resp.results.get(i).and_then(|r| r.result.as_ref()) {
        Some(op_result::Result::Create(c)) => c.node.as_ref().expect("created node").path.clone(),
        other => panic!("result {i} is not a create: {other:?}"),
    }
}

/// The nodes of a transaction's results (headers differ by answering member).
fn result_nodes(resp: &TxnResponse) -> Vec<Option<Node>> {
    resp.results
        .iter()
        .map(|r| match r.result.as_ref() {
            Some(op_result::Result::Create(c)) => c.node.clone(),
            Some(op_result::Result::Put(p)) => p.node.clone(),
            Some(op_result::Result::Get(g)) => g.node.clone(),
            Some(op_result::Result::Delete(_)) | None => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------

/// 12 creators (4 per member) each create 25 sequential children of one
/// parent: 300 distinct names, increasing per creator, with 10-digit counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_unique_under_concurrent_creators() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(Duration::from_secs(120), "sequential_concurrent", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        put(&mut c.kv(leader), "/q", "").await.expect("put /q");
        let mut tasks = Vec::new();
        for member in c.ids() {
            for t in 0..4 {
                let mut kv = c.kv(member);
                tasks.push(tokio::spawn(async move {
                    let mut names = Vec::new();
                    for i in 0..25 {
                        let mut r = req("/q/item-");
                        r.sequential = true;
                        r.data = format!("{member}-{t}-{i}").into_bytes();
                        let n = create(&mut kv, r)
                            .await
                            .unwrap_or_else(|e| panic!("create via {member}: {e}"));
                        names.push(n.path);
                    }
                    ((member, t), names)
                }));
            }
        }
        let mut all = BTreeSet::new();
        let mut total = 0;
        for task in tasks {
            let (creator, names) = task.await.expect("creator task");
            let seqs: Vec<u64> = names.iter().map(|p| seq_of(p, "/q/item-")).collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "creator {creator:?}: counters must increase: {seqs:?}"
            );
            total += names.len();
            all.extend(seqs);
        }
        assert_eq!(total, 300);
        assert_eq!(all.len(), 300, "every sequential name is unique");
        assert_eq!(
            all,
            (0..300).collect::<BTreeSet<u64>>(),
            "no failed create, so the counters are 0..300 without gaps"
        );
        for id in c.ids() {
            assert_eq!(
                children(&mut c.kv(id), "/q").await.len(),
                300,
                "member {id}"
            );
        }
    })
    .await;
}

/// A container goes once its last child goes (by delete or by session end),
/// not before; a container that never had a child stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_go_with_their_last_child() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(Duration::from_secs(90), "containers", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        let mut kv = c.kv(c.followers(leader)[0]);
        let sid = open(&c, leader).await;
        for p in ["/ctr", "/never", "/ctr2"] {
            let mut r = req(p);
            r.container = true;
            let n = create(&mut kv, r).await.expect("create container");
            assert!(n.container, "{n:?}");
        }
        for p in ["/ctr/a", "/ctr/b"] {
            let mut r = req(p);
            r.session_id = sid;
            create(&mut kv, r).await.expect("create ephemeral child");
        }
        create(&mut kv, req("/ctr2/x"))
            .await
            .expect("persistent child");

        kv.delete(DeleteRequest {
            path: "/ctr/a".into(),
            expected_version: None,
            recursive: false,
        })
        .await
        .expect("delete /ctr/a");
        let ctr = lookup(&mut kv, "/ctr")
            .await
            .expect("container with a child stays");
        assert_eq!(ctr.num_children, 1);
        assert!(ctr.container);

        let deleted = close(&c, leader, sid).await;
        assert_eq!(
            deleted, 2,
            "the ephemeral /ctr/b and the emptied container /ctr"
        );
        kv.delete(DeleteRequest {
            path: "/ctr2/x".into(),
            expected_version: None,
            recursive: false,
        })
        .await
        .expect("delete /ctr2/x");

        for id in c.ids() {
            let mut kv = c.kv(id);
            assert_eq!(lookup(&mut kv, "/ctr").await, None, "member {id}: /ctr");
            assert_eq!(lookup(&mut kv, "/ctr2").await, None, "member {id}: /ctr2");
            let never = lookup(&mut kv, "/never")
                .await
                .unwrap_or_else(|| panic!("member {id}: a container never used stays"));
            assert!(never.container);
        }
    })
    .await;
}

/// An ephemeral node cannot have children.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_children_under_an_ephemeral() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(
        Duration::from_secs(90),
        "no_children_under_ephemeral",
        async {
            let leader = c.wait_for_leader(WAIT).await.expect("a leader");
            let sid = open(&c, leader).await;
            let mut kv = c.kv(c.followers(leader)[0]);
            let mut r = req("/eph");
            r.session_id = sid;
            create(&mut kv, r).await.expect("create ephemeral");

            let check = |what: &str, st: Status| {
                assert_eq!(st.code(), Code::FailedPrecondition, "{what}: {st:?}");
                assert!(st.message().contains("ephemeral"), "{what}: {st:?}");
            };
            let st = create(&mut kv, req("/eph/child")).await.expect_err("child");
            check("create child", st);
            let mut r = req("/eph/x/y");
            r.parents = true;
            check(
                "create with parents",
                create(&mut kv, r).await.expect_err("grandchild"),
            );
            let mut r = req("/eph/e");
            r.session_id = sid;
            check(
                "ephemeral child",
                create(&mut kv, r).await.expect_err("eph child"),
            );
            let st = kv
                .put(PutRequest {
                    path: "/eph/p".into(),
                    data: b"x".to_vec(),
                    expected_version: None,
                    parents: true,
                })
                .await
                .expect_err("put under an ephemeral");
            check("put", st);
            let st = kv
                .txn(TxnRequest {
                    success: vec![create_op(req("/eph/t"))],
                    ..Default::default()
                })
                .await
                .expect_err("txn create under an ephemeral");
            assert!(st.message().contains("ephemeral"), "txn: {st:?}");

            let eph = lookup(&mut kv, "/eph")
                .await
                .expect("ephemeral still there");
            assert_eq!(eph.num_children, 0);
            assert_eq!(close(&c, leader, sid).await, 1);
        },
    )
    .await;
}

/// A retried create or txn with the same request id (a reply that was lost)
/// returns the first attempt's result and creates nothing more, whichever
/// member the retry goes to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_request_ids_apply_once() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(Duration::from_secs(90), "request_id_dedup", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        let f = c.followers(leader);
        let sid = open(&c, leader).await;
        put(&mut c.kv(leader), "/r", "").await.expect("put /r");

        // Sequential ephemeral create, scoped to the session.
        let mut r = req("/r/job-");
        r.sequential = true;
        r.session_id = sid;
        r.request_id = "r-1".into();
        let first = create(&mut c.kv(leader), r.clone()).await.expect("first");
        for id in [f[0], f[1], leader] {
            let again = create(&mut c.kv(id), r.clone())
                .await
                .unwrap_or_else(|e| panic!("retry via {id}: {e}"));
            assert_eq!(again.path, first.path, "retry via {id}");
            assert_eq!(again.create_revision, first.create_revision);
        }
        // Without a session: a plain create retried is not ALREADY_EXISTS.
        let mut p = req("/r/plain");
        p.request_id = "p-1".into();
        let first_plain = create(&mut c.kv(f[0]), p.clone()).await.expect("plain");
        let again = create(&mut c.kv(f[1]), p).await.expect("plain retry");
        assert_eq!(again.create_revision, first_plain.create_revision);

        // A transaction retried.
        let mut job = req("/r/txn-");
        job.sequential = true;
        job.session_id = sid;
        let t = TxnRequest {
            compare: vec![Compare {
                path: "/r".into(),
                op: compare::Op::Equal as i32,
                target: Some(compare::Target::Exists(true)),
            }],
            success: vec![
                create_op(job),
                Op {
                    op: Some(op::Op::Put(PutRequest {
                        path: "/r/counter".into(),
                        data: b"1".to_vec(),
                        expected_version: None,
                        parents: false,
                    })),
                },
            ],
            failure: vec![],
            request_id: "t-1".into(),
            request_session_id: sid,
        };
        let first_txn = c.kv(f[1]).txn(t.clone()).await.expect("txn").into_inner();
        assert!(first_txn.succeeded);
        let again = c.kv(f[0]).txn(t).await.expect("txn retry").into_inner();
        assert!(again.succeeded);
        assert_eq!(
            result_nodes(&again),
            result_nodes(&first_txn),
            "the first attempt's results"
        );
        assert_eq!(created_path(&again, 0), created_path(&first_txn, 0));

        let mut kv = c.kv(leader);
        let kids = children(&mut kv, "/r").await;
        assert_eq!(
            kids,
            vec![
                "/r/counter".to_string(),
                first.path.clone(),
                "/r/plain".to_string(),
                created_path(&first_txn, 0)
            ],
            "exactly one node per request id"
        );
        let counter = lookup(&mut kv, "/r/counter").await.expect("counter");
        assert_eq!(counter.version, 1, "the put ran once");
        assert_eq!(close(&c, leader, sid).await, 2);
    })
    .await;
}

/// An ephemeral sequential create inside a transaction returns the name it
/// generated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_sequential_in_txn_returns_name() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(Duration::from_secs(90), "ephemeral_sequential_txn", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        let sid = open(&c, leader).await;
        let mut kv = c.kv(c.followers(leader)[0]);
        let lock = |parents: bool| {
            let mut r = req("/tx/lock-");
            r.sequential = true;
            r.session_id = sid;
            r.parents = parents;
            create_op(r)
        };
        let resp = kv
            .txn(TxnRequest {
                success: vec![lock(true)],
                ..Default::default()
            })
            .await
            .expect("txn")
            .into_inner();
        assert!(resp.succeeded);
        let first = created_path(&resp, 0);
        assert_eq!(first, format!("/tx/lock-{:010}", 0));
        let resp2 = kv
            .txn(TxnRequest {
                success: vec![lock(false), lock(false)],
                ..Default::default()
            })
            .await
            .expect("txn with two creates")
            .into_inner();
        let (a, b) = (created_path(&resp2, 0), created_path(&resp2, 1));
        assert_eq!(seq_of(&a, "/tx/lock-"), 1);
        assert_eq!(seq_of(&b, "/tx/lock-"), 2);
        for p in [&first, &a, &b] {
            let n = lookup(&mut c.kv(leader), p).await.expect("created node");
            assert_eq!(n.ephemeral_owner, sid, "{p}");
            assert_eq!(n.create_revision, {
                if p == &first {
                    revision(&resp.header)
                } else {
                    revision(&resp2.header)
                }
            });
        }
        assert_eq!(close(&c, leader, sid).await, 3);
        assert!(children(&mut kv, "/tx").await.is_empty());
    })
    .await;
}
