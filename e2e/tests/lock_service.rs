//! The server-side `lockd.v1.Lock` and `lockd.v1.Election` services (for
//! clients in other languages), called here through the generated gRPC
//! stubs as any gRPC client would, against lockd-client's Rust recipes on
//! the same names: one layout, so each blocks the other. Also gRPC health
//! and server reflection, which generic tools (grpcurl) rely on.

use std::sync::Arc;
use std::time::Duration;

use lockd_client::recipes::{observe, ElectionConfig, ElectionEvent, LeaderElection, Mutex};
use lockd_client::{Client, Error};
use lockd_e2e::{bounded, channel, wait_until, Cluster, ClusterOptions};
use lockd_proto::v1 as pb;
use lockd_proto::v1::election_client::ElectionClient;
use lockd_proto::v1::lock_client::LockClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);
const RPC: Duration = Duration::from_secs(30);

async fn start() -> Cluster {
    let c = Cluster::start(3, ClusterOptions::default())
        .await
        .expect("start 3 members");
    c.wait_for_leader(WAIT).await.expect("a leader");
    c
}

fn lock_client(c: &Cluster, id: u64) -> LockClient<Channel> {
    LockClient::new(channel(&c.endpoint(id), RPC))
}

fn election_client(c: &Cluster, id: u64) -> ElectionClient<Channel> {
    ElectionClient::new(channel(&c.endpoint(id), RPC))
}

fn lock_req(name: &str, session_id: u64, wait_ms: Option<u64>) -> pb::LockRequest {
    pb::LockRequest {
        name: name.into(),
        session_id,
        wait_ms,
        request_id: String::new(),
    }
}

/// The paths of the contender nodes under `dir` (none if it is gone).
async fn children(client: &Client, dir: &str) -> Vec<String> {
    match client.list(dir).await {
        Ok(l) => l.children.into_iter().map(|c| c.path).collect(),
        Err(Error::NotFound(_)) => Vec::new(),
        Err(e) => panic!("list {dir}: {e}"),
    }
}

async fn wait_children(client: &Client, dir: &str, n: usize) {
    wait_until(WAIT, &format!("{n} contenders under {dir}"), || async {
        children(client, dir).await.len() == n
    })
    .await
    .expect("contenders");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_lock_and_rust_mutex_exclude_each_other() {
    let c = start().await;
    bounded(Duration::from_secs(90), "grpc/rust lock interop", async {
        let client = Client::connect(c.endpoints()).expect("client");
        let s1 = client
            .open_session(Duration::from_secs(10))
            .await
            .expect("session");
        let s2 = client
            .open_session(Duration::from_secs(10))
            .await
            .expect("session");
        let mut lock = lock_client(&c, 2);
        let dir = "/locks/interop";

        // Held through gRPC: the Rust mutex cannot take it.
        let held = lock
            .lock(lock_req(dir, s1.id(), None))
            .await
            .expect("grpc lock")
            .into_inner();
        assert!(held.key.starts_with("/locks/interop/lock-"), "{}", held.key);
        assert!(held.fencing_token > 0);
        let mutex = Mutex::new(client.clone(), dir, &s2);
        assert!(
            mutex.try_lock().await.expect("try_lock").is_none(),
            "a Rust mutex took a lock held through the Lock service"
        );
        assert_eq!(children(&client, dir).await, vec![held.key.clone()]);

        // A waiting Rust mutex gets it once the gRPC holder unlocks.
        let waiter = {
            let m = mutex.clone();
            tokio::spawn(async move { m.lock().await })
        };
        wait_children(&client, dir, 2).await;
        let r = lock
            .unlock(pb::UnlockRequest {
                key: held.key.clone(),
                fencing_token: held.fencing_token,
            })
            .await
            .expect("unlock")
            .into_inner();
        assert!(r.released);
        let guard = waiter.await.expect("join").expect("rust lock");
        assert!(guard.fencing_token() > held.fencing_token);

        // Held in Rust: a gRPC try fails with DEADLINE_EXCEEDED and leaves
        // nothing behind.
        let e = lock
            .lock(lock_req(dir, s1.id(), Some(0)))
            .await
            .expect_err("the lock is held");
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
        assert_eq!(children(&client, dir).await, vec![guard.path().to_string()]);

        // A blocking gRPC Lock acquires after the Rust unlock.
        let grpc_waiter = {
            let mut l = lock_client(&c, 3);
            let req = lock_req(dir, s1.id(), None);
            tokio::spawn(async move { l.lock(req).await })
        };
        wait_children(&client, dir, 2).await;
        let rust_token = guard.fencing_token();
        guard.unlock().await.expect("rust unlock");
        let next = grpc_waiter
            .await
            .expect("join")
            .expect("grpc lock after rust unlock")
            .into_inner();
        assert!(next.fencing_token > rust_token);

        // A stale unlock (first holder's token) releases nothing.
        let stale = lock
            .unlock(pb::UnlockRequest {
                key: held.key.clone(),
                fencing_token: held.fencing_token,
            })
            .await
            .expect("stale unlock")
            .into_inner();
        assert!(!stale.released);
        assert_eq!(children(&client, dir).await, vec![next.key.clone()]);
    })
    .await;
}

/// Mutual exclusion across both kinds of client: a non-atomic
/// read-then-write of a counter under the lock loses no increment, and the
/// fencing tokens of successive holders strictly increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_clients_count_exactly() {
    const PER_TASK: u64 = 12;
    const GRPC_TASKS: u64 = 3;
    const RUST_TASKS: u64 = 3;
    let c = start().await;
    let dir = "/locks/mixed";
    let counter = "/mixed-counter";
    let tokens = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    bounded(Duration::from_secs(240), "mixed mutual exclusion", async {
        let mut tasks = Vec::new();
        for i in 0..GRPC_TASKS + RUST_TASKS {
            let client = Client::connect(c.endpoints_from(i as usize)).expect("client");
            let mut lock = lock_client(&c, i % 3 + 1);
            let tokens = tokens.clone();
            tasks.push(tokio::spawn(async move {
                let session = client
                    .open_session(Duration::from_secs(10))
                    .await
                    .expect("session");
                let mutex = Mutex::new(client.clone(), dir, &session);
                for _ in 0..PER_TASK {
                    // Acquire through gRPC or the Rust recipe.
                    let (release, token): (Option<pb::UnlockRequest>, _) = if i < GRPC_TASKS {
                        let r = lock
                            .lock(lock_req(dir, session.id(), None))
                            .await
                            .expect("grpc lock")
                            .into_inner();
                        let token = r.fencing_token;
                        (
                            Some(pb::UnlockRequest {
                                key: r.key,
                                fencing_token: token,
                            }),
                            (token, None),
                        )
                    } else {
                        let g = mutex.lock().await.expect("rust lock");
                        (None, (g.fencing_token(), Some(g)))
                    };
                    tokens.lock().expect("tokens").push(token.0);
                    let n: u64 = match client.get(counter).await {
                        Ok(r) => String::from_utf8_lossy(&r.node.expect("node").data)
                            .parse()
                            .expect("a number"),
                        Err(Error::NotFound(_)) => 0,
                        Err(e) => panic!("get: {e}"),
                    };
                    client.put(counter, (n + 1).to_string()).await.expect("put");
                    match (release, token.1) {
                        (Some(u), _) => {
                            assert!(lock.unlock(u).await.expect("unlock").into_inner().released)
                        }
                        (None, Some(g)) => g.unlock().await.expect("rust unlock"),
                        (None, None) => unreachable!("every acquisition has a release"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let client = Client::connect(c.endpoints()).expect("client");
        let r = client.get(counter).await.expect("counter");
        let total: u64 = String::from_utf8_lossy(&r.node.expect("node").data)
            .parse()
            .expect("a number");
        assert_eq!(total, PER_TASK * (GRPC_TASKS + RUST_TASKS));
        let tokens = tokens.lock().expect("tokens").clone();
        assert_eq!(tokens.len() as u64, total);
        assert!(
            tokens.windows(2).all(|w| w[0] < w[1]),
            "fencing tokens of successive holders must strictly increase: {tokens:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_waiters_and_ended_sessions_leave_nothing() {
    let c = start().await;
    bounded(Duration::from_secs(90), "withdrawal", async {
        let client = Client::connect(c.endpoints()).expect("client");
        let holder = client
            .open_session(Duration::from_secs(10))
            .await
            .expect("session");
        let other = client
            .open_session(Duration::from_secs(10))
            .await
            .expect("session");
        let dir = "/locks/withdraw";
        let mut lock = lock_client(&c, 1);
        let held = lock
            .lock(lock_req(dir, holder.id(), None))
            .await
            .expect("lock")
            .into_inner();

        // A waiter whose call is cancelled (here: dropped by a client-side
        // timeout, as a gRPC deadline would) withdraws its contender.
        let mut l2 = lock_client(&c, 2);
        let req = lock_req(dir, other.id(), None);
        let waiting = tokio::spawn(async move { l2.lock(req).await });
        wait_children(&client, dir, 2).await;
        waiting.abort();
        wait_children(&client, dir, 1).await;
        assert_eq!(children(&client, dir).await, vec![held.key.clone()]);

        // The holder's session ending releases the lock to a waiter.
        let mut l3 = lock_client(&c, 3);
        let req = lock_req(dir, other.id(), None);
        let waiter = tokio::spawn(async move { l3.lock(req).await });
        wait_children(&client, dir, 2).await;
        let holder_id = holder.id();
        holder.close().await.expect("close the holder's session");
        let next = waiter
            .await
            .expect("join")
            .expect("lock after session end")
            .into_inner();
        assert!(next.fencing_token > held.fencing_token);

        // Bad input is refused with a clear status.
        let bad = [
            (
                lock_req(dir, 0, None),
                Code::InvalidArgument,
                "session_id is required",
            ),
            (
                lock_req("/", other.id(), None),
                Code::InvalidArgument,
                "root",
            ),
            (
                lock_req("locks/x", other.id(), None),
                Code::InvalidArgument,
                "name",
            ),
            (
                lock_req(dir, holder_id, None),
                Code::NotFound,
                "session expired",
            ),
        ];
        for (req, code, text) in bad {
            let e = lock.lock(req.clone()).await.expect_err("refused");
            assert_eq!(e.code(), code, "{req:?}: {e}");
            assert!(e.message().contains(text), "{req:?}: {}", e.message());
        }
        let e = lock
            .unlock(pb::UnlockRequest {
                key: format!("{dir}/notalock"),
                fencing_token: 5,
            })
            .await
            .expect_err("not a contender key");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        let e = lock
            .unlock(pb::UnlockRequest {
                key: next.key.clone(),
                fencing_token: 0,
            })
            .await
            .expect_err("token required");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        // Nothing was lost: the holder is still the holder.
        assert_eq!(children(&client, dir).await, vec![next.key.clone()]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_election_and_rust_election_share_one_leader() {
    let c = start().await;
    bounded(Duration::from_secs(90), "election interop", async {
        let client = Client::connect(c.endpoints()).expect("client");
        let s1 = client
            .open_session(Duration::from_secs(10))
            .await
            .expect("session");
        let dir = "/elections/interop";
        let mut el = election_client(&c, 2);

        let lead = el
            .campaign(pb::CampaignRequest {
                name: dir.into(),
                session_id: s1.id(),
                value: b"grpc-a".to_vec(),
                wait_ms: None,
                request_id: String::new(),
            })
            .await
            .expect("campaign")
            .into_inner()
            .leader
            .expect("leader key");
        assert!(lead.key.starts_with("/elections/interop/candidate-"));

        // Observers of both kinds see the gRPC leader's value.
        let mut rust_obs = observe(client.clone(), dir);
        let first = rust_obs.next().await.flatten().expect("a leader");
        assert_eq!(first.identity, "grpc-a");
        assert_eq!(first.fencing_token, lead.fencing_token);
        let mut grpc_obs = election_client(&c, 3)
            .observe(pb::LeaderRequest { name: dir.into() })
            .await
            .expect("observe")
            .into_inner();
        let seen = grpc_obs.next().await.expect("item").expect("ok");
        assert_eq!(seen.kv.expect("leader").data, b"grpc-a");

        // A Rust candidate waits behind the gRPC leader.
        let rust = LeaderElection::new(
            client.clone(),
            dir,
            ElectionConfig::new("rust-b", Duration::from_secs(10)),
        )
        .expect("election config");
        let mut campaign = rust.campaign();
        loop {
            match campaign.next().await.expect("event") {
                ElectionEvent::NewLeader { identity, .. } if identity == "grpc-a" => break,
                ElectionEvent::StartedLeading { .. } => panic!("two leaders"),
                _ => {}
            }
        }

        // Proclaim changes the value while leading; observers see it.
        el.proclaim(pb::ProclaimRequest {
            leader: Some(lead.clone()),
            value: b"grpc-a2".to_vec(),
        })
        .await
        .expect("proclaim");
        let seen = grpc_obs.next().await.expect("item").expect("ok");
        assert_eq!(seen.kv.expect("leader").data, b"grpc-a2");
        let now = rust_obs.next().await.flatten().expect("a leader");
        assert_eq!(now.identity, "grpc-a2");

        // Resigning hands leadership to the Rust candidate.
        let r = el
            .resign(pb::ResignRequest {
                leader: Some(lead.clone()),
            })
            .await
            .expect("resign")
            .into_inner();
        assert!(r.resigned);
        let token = loop {
            match campaign.next().await.expect("event") {
                ElectionEvent::StartedLeading { fencing_token, .. } => break fencing_token,
                _ => continue,
            }
        };
        assert!(token > lead.fencing_token);
        let seen = loop {
            let r = grpc_obs.next().await.expect("item").expect("ok");
            if let Some(kv) = r.kv {
                break kv;
            }
        };
        assert_eq!(seen.data, b"rust-b");
        let current = el
            .leader(pb::LeaderRequest { name: dir.into() })
            .await
            .expect("leader")
            .into_inner()
            .kv
            .expect("leader node");
        assert_eq!(current.data, b"rust-b");
        assert_eq!(current.create_revision, token);

        // The old term can no longer proclaim; a gRPC try while Rust leads
        // fails and leaves nothing behind.
        let e = el
            .proclaim(pb::ProclaimRequest {
                leader: Some(lead.clone()),
                value: b"stale".to_vec(),
            })
            .await
            .expect_err("old term");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        let e = el
            .campaign(pb::CampaignRequest {
                name: dir.into(),
                session_id: s1.id(),
                value: b"grpc-c".to_vec(),
                wait_ms: Some(0),
                request_id: String::new(),
            })
            .await
            .expect_err("the Rust candidate leads");
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
        assert_eq!(children(&client, dir).await.len(), 1);
        campaign.cancel().await;
    })
    .await;
}

/// A Lock call retried with the same request id continues with its first
/// contender instead of queueing a second one behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_lock_with_request_id_reuses_its_contender() {
    let c = start().await;
    bounded(Duration::from_secs(60), "request id", async {
        let client = Client::connect(c.endpoints()).expect("client");
        let s = client
            .open_session(Duration::from_secs(10))
            .await
            .expect("session");
        let dir = "/locks/retry";
        let mut lock = lock_client(&c, 1);
        let req = pb::LockRequest {
            request_id: "build-42".into(),
            ..lock_req(dir, s.id(), None)
        };
        let a = lock.lock(req.clone()).await.expect("lock").into_inner();
        // The reply "was lost": the retry gets the same key and token.
        let b = lock_client(&c, 3)
            .lock(req)
            .await
            .expect("retry")
            .into_inner();
        assert_eq!((a.key.clone(), a.fencing_token), (b.key, b.fencing_token));
        assert_eq!(children(&client, dir).await, vec![a.key]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let c = start().await;
    bounded(Duration::from_secs(60), "health and reflection", async {
        for id in c.ids() {
            c.wait_ready(id, WAIT).await.expect("ready");
            let mut health = HealthClient::new(channel(&c.endpoint(id), RPC));
            for service in ["", "lockd.v1.KV", "lockd.v1.Lock", "lockd.v1.Election"] {
                wait_until(WAIT, &format!("{service:?} SERVING on {id}"), || {
                    let mut h = health.clone();
                    async move {
                        let r = h
                            .check(HealthCheckRequest {
                                service: service.into(),
                            })
                            .await;
                        matches!(r, Ok(r) if r.get_ref().status == ServingStatus::Serving as i32)
                    }
                })
                .await
                .expect("serving");
            }
            let e = health
                .check(HealthCheckRequest {
                    service: "no.such.Service".into(),
                })
                .await
                .expect_err("unknown service");
            assert_eq!(e.code(), Code::NotFound);
        }

        let mut refl = ServerReflectionClient::new(channel(&c.endpoint(1), RPC));
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = refl
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .expect("reflection")
            .into_inner();
        let msg = resp.next().await.expect("a response").expect("ok");
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("unexpected reflection response {msg:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in [
            "lockd.v1.KV",
            "lockd.v1.Lock",
            "lockd.v1.Election",
            "lockd.v1.Session",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
    })
    .await;
}
