//! KV behaviour seen through real members: replication, forwarding,
//! revisions and input validation.

use std::time::Duration;

use lockd_e2e::v1::{
    op, CreateRequest, DeleteRequest, GetRequest, ListRequest, Op, PutRequest, TxnRequest,
};
use lockd_e2e::{bounded, get, put, revision, Cluster, ClusterOptions};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_and_forwarding() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(
        Duration::from_secs(90),
        "replication_and_forwarding",
        async {
            let leader = c.wait_for_leader(WAIT).await.expect("a leader");
            let f = c.followers(leader);
            let (f1, f2) = (f[0], f[1]);

            // Write through a follower: forwarded to the leader.
            let r = put(&mut c.kv(f1), "/app/config", "hello")
                .await
                .expect("put via follower");
            assert!(r.created, "first put must create the node");
            let rev1 = revision(&r.header);
            assert!(rev1 > 0, "put response header must carry a revision");
            let node = r.node.expect("put returns the node");
            assert_eq!(node.version, 1);
            assert_eq!(node.create_revision, rev1);
            assert_eq!(node.mod_revision, rev1);

            // A linearizable get through the other follower sees it at once.
            let g = get(&mut c.kv(f2), "/app/config", false)
                .await
                .expect("linearizable get via other follower");
            assert_eq!(g.node.as_ref().expect("node").data, b"hello");
            let h = g.header.expect("get header");
            assert!(
                h.revision >= rev1,
                "get revision {} < put revision {rev1}",
                h.revision
            );
            assert_eq!(h.member_id, f2, "header names the answering member");
            assert_eq!(h.cluster_id, "lockd", "default cluster id");

            // A serializable get on f1 after it applied what the leader committed.
            let ls = c.status(leader).await.expect("leader status");
            c.wait_applied(f1, ls.commit_index, WAIT)
                .await
                .expect("follower applies");
            let g = get(&mut c.kv(f1), "/app/config", true)
                .await
                .expect("serializable get");
            assert_eq!(g.node.expect("node").data, b"hello");
            assert!(revision(&g.header) >= rev1);

            // Every write bumps the revision by exactly one, whichever member takes it.
            let ids = c.ids();
            let mut prev = rev1;
            for i in 0..12u64 {
                let via = ids[i as usize % ids.len()];
                let r = put(&mut c.kv(via), "/app/seq", format!("{i}"))
                    .await
                    .expect("put /app/seq");
                let rev = revision(&r.header);
                assert_eq!(
                    rev,
                    prev + 1,
                    "write {i} via member {via}: revision must grow by exactly one"
                );
                let n = r.node.expect("node");
                assert_eq!(n.version, i + 1);
                assert_eq!(n.mod_revision, rev);
                prev = rev;
            }
            // Reads do not change the revision and every member reports it.
            for &id in &ids {
                let g = get(&mut c.kv(id), "/app/seq", false)
                    .await
                    .expect("linearizable get");
                assert_eq!(revision(&g.header), prev, "member {id} reports revision");
                assert_eq!(g.node.expect("node").data, b"11");
            }

            // Read-your-writes without a leader round trip: a serializable
            // read with min_revision answers from a state that includes the
            // write, on whichever member it reaches right after the ack.
            for (i, &id) in ids.iter().cycle().take(9).enumerate() {
                let r = put(&mut c.kv(leader), "/app/ryw", format!("{i}"))
                    .await
                    .expect("put /app/ryw");
                let rev = revision(&r.header);
                let g = c
                    .kv(id)
                    .get(GetRequest {
                        path: "/app/ryw".into(),
                        serializable: true,
                        min_revision: rev,
                    })
                    .await
                    .expect("serializable get at min_revision")
                    .into_inner();
                assert!(
                    revision(&g.header) >= rev,
                    "member {id} answered below {rev}"
                );
                assert_eq!(g.node.expect("node").data, format!("{i}").as_bytes());
                let l = c
                    .kv(id)
                    .list(ListRequest {
                        path: "/app".into(),
                        serializable: true,
                        min_revision: rev,
                    })
                    .await
                    .expect("serializable list at min_revision")
                    .into_inner();
                assert!(revision(&l.header) >= rev);
                assert!(l.children.iter().any(|n| n.path == "/app/ryw"));
            }
        },
    )
    .await;
}

fn assert_code<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>, code: Code) -> String {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got success {v:?}"),
        Err(s) => {
            assert_eq!(
                s.code(),
                code,
                "{what}: wrong code, message {:?}",
                s.message()
            );
            s.message().to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input() {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    bounded(Duration::from_secs(90), "bad_input", async {
        let leader = c.wait_for_leader(WAIT).await.expect("a leader");
        let via = c.followers(leader)[0];
        let mut kv = c.kv(via);

        put(&mut kv, "/data/x", "keep").await.expect("put /data/x");
        let cr = kv
            .create(CreateRequest {
                path: "/data/dir/child".into(),
                data: b"c".to_vec(),
                parents: true,
                ..Default::default()
            })
            .await
            .expect("create /data/dir/child")
            .into_inner();
        let good_rev = revision(&cr.header);

        for p in ["", "a", "/a/", "/a//b"] {
            let r = kv
                .put(PutRequest {
                    path: p.into(),
                    data: b"v".to_vec(),
                    expected_version: None,
                    parents: true,
                })
                .await;
            assert_code(&format!("put {p:?}"), r, Code::InvalidArgument);
            let r = kv
                .create(CreateRequest {
                    path: p.into(),
                    data: vec![],
                    parents: true,
                    ..Default::default()
                })
                .await;
            assert_code(&format!("create {p:?}"), r, Code::InvalidArgument);
        }
        for p in ["a", "/a//b"] {
            let r = kv
                .get(GetRequest {
                    path: p.into(),
                    serializable: false,
                    min_revision: 0,
                })
                .await;
            assert_code(&format!("get {p:?}"), r, Code::InvalidArgument);
        }

        let big_key = format!("/{}", "k".repeat(4999));
        let msg = assert_code(
            "5000-byte key",
            put(&mut kv, &big_key, "v").await,
            Code::InvalidArgument,
        )
        .to_lowercase();
        assert!(
            msg.contains("key")
                && (msg.contains("limit") || msg.contains("max") || msg.contains("4096")),
            "key error should name the key limit: {msg:?}"
        );
        let big_value = vec![b'v'; (1 << 20) + 1];
        let msg = assert_code(
            "1 MiB + 1 value",
            put(&mut kv, "/data/big", big_value).await,
            Code::InvalidArgument,
        )
        .to_lowercase();
        assert!(
            msg.contains("value")
                && (msg.contains("limit") || msg.contains("max") || msg.contains("1048576")),
            "value error should name the value limit: {msg:?}"
        );

        let r = kv
            .delete(DeleteRequest {
                path: "/data/dir".into(),
                expected_version: None,
                recursive: false,
            })
            .await;
        assert_code(
            "delete non-empty without recursive",
            r,
            Code::FailedPrecondition,
        );
        let r = kv
            .create(CreateRequest {
                path: "/data/x".into(),
                data: b"other".to_vec(),
                parents: false,
                ..Default::default()
            })
            .await;
        assert_code("create existing", r, Code::AlreadyExists);
        assert_code(
            "get missing",
            get(&mut kv, "/data/missing", false).await,
            Code::NotFound,
        );
        let r = kv
            .put(PutRequest {
                path: "/data/x".into(),
                data: b"bad".to_vec(),
                expected_version: Some(7),
                parents: false,
            })
            .await;
        assert_code(
            "put with wrong expected_version",
            r,
            Code::FailedPrecondition,
        );
        let r = kv
            .put(PutRequest {
                path: "/data/x".into(),
                data: b"bad".to_vec(),
                expected_version: Some(0),
                parents: false,
            })
            .await;
        assert_code(
            "put must-not-exist on existing",
            r,
            Code::FailedPrecondition,
        );

        // Nothing of that took effect: data and revision intact.
        let g = get(&mut c.kv(leader), "/data/x", false)
            .await
            .expect("get /data/x");
        let n = g.node.expect("node");
        assert_eq!(n.data, b"keep");
        assert_eq!(n.version, 1);
        assert_eq!(
            revision(&g.header),
            good_rev,
            "failed writes must not bump the revision"
        );
        let g = get(&mut kv, "/data/dir/child", false)
            .await
            .expect("get child");
        assert_eq!(g.node.expect("node").data, b"c");
        let l = kv
            .list(ListRequest {
                path: "/data".into(),
                serializable: false,
                min_revision: 0,
            })
            .await
            .expect("list /data")
            .into_inner();
        assert_eq!(l.children.len(), 2, "children of /data: {:?}", l.children);
        let in_txn = kv
            .txn(TxnRequest {
                success: vec![Op {
                    op: Some(op::Op::Get(GetRequest {
                        path: "/data/x".into(),
                        serializable: false,
                        min_revision: good_rev,
                    })),
                }],
                ..Default::default()
            })
            .await;
        let msg = assert_code("txn get with min_revision", in_txn, Code::InvalidArgument);
        assert!(msg.contains("min_revision"), "{msg}");
        assert_code(
            "get oversized never stored",
            get(&mut kv, "/data/big", false).await,
            Code::NotFound,
        );

        // Exactly at the value limit is accepted.
        let max_value = vec![b'm'; 1 << 20];
        put(&mut kv, "/data/max", max_value.clone())
            .await
            .expect("1 MiB value is within the limit");
        let g = get(&mut c.kv(leader), "/data/max", false)
            .await
            .expect("get /data/max");
        assert_eq!(g.node.expect("node").data.len(), max_value.len());
    })
    .await;
}
