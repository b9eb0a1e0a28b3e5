//! Session tests against an in-process fake `Session` (and `KV`) service.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockd_proto::v1 as pb;
use pb::kv_server::{Kv, KvServer};
use pb::session_server::{Session as SessionSvc, SessionServer};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::ClientOptions;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Answer every keepalive.
    Ack,
    /// Answer keepalives with NOT_FOUND "session expired".
    Expire,
    /// Read keepalives, never answer.
    Silent,
}

#[derive(Default)]
struct Shared {
    mode: Mutex<Option<Mode>>,
    keepalives: AtomicUsize,
    closed: Mutex<Vec<u64>>,
    creates: Mutex<Vec<pb::CreateRequest>>,
}

impl Shared {
    fn mode(&self) -> Mode {
        self.mode.lock().unwrap().unwrap_or(Mode::Ack)
    }
    fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = Some(m);
    }
    fn closed(&self) -> Vec<u64> {
        self.closed.lock().unwrap().clone()
    }
}

#[derive(Clone)]
struct Fake(Arc<Shared>);

type KaStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::KeepAliveResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl SessionSvc for Fake {
    async fn open(
        &self,
        req: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        Ok(Response::new(pb::OpenSessionResponse {
            header: None,
            session_id: 42,
            ttl_ms: req.into_inner().ttl_ms,
        }))
    }

    type KeepAliveStream = KaStream;

    async fn keep_alive(
        &self,
        req: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<KaStream>, Status> {
        let shared = self.0.clone();
        let mut input = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(Ok(m)) = input.next().await {
                shared.keepalives.fetch_add(1, Ordering::SeqCst);
                let item = match shared.mode() {
                    Mode::Ack => Ok(pb::KeepAliveResponse {
                        header: None,
                        session_id: m.session_id,
                        ttl_ms: 0,
                    }),
                    Mode::Expire => Err(Status::not_found(format!(
                        "session expired: session {} expired or does not exist",
                        m.session_id
                    ))),
                    Mode::Silent => continue,
                };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn close(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        self.0
            .closed
            .lock()
            .unwrap()
            .push(req.into_inner().session_id);
        Ok(Response::new(pb::CloseSessionResponse::default()))
    }

    async fn info(
        &self,
        _req: Request<pb::SessionInfoRequest>,
    ) -> Result<Response<pb::SessionInfoResponse>, Status> {
        Err(Status::unimplemented("info"))
    }
}

#[tonic::async_trait]
impl Kv for Fake {
    /// The first attempt hangs past the client's timeout (an ambiguous
    /// outcome); later ones answer.
    async fn create(
        &self,
        req: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::CreateResponse>, Status> {
        let req = req.into_inner();
        let first = {
            let mut c = self.0.creates.lock().unwrap();
            c.push(req.clone());
            c.len() == 1
        };
        if first {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(Response::new(pb::CreateResponse {
            header: None,
            node: Some(pb::Node {
                path: format!("{}0000000001", req.path),
                ephemeral_owner: req.session_id,
                ..Default::default()
            }),
        }))
    }
    async fn put(&self, _: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        Err(Status::unimplemented("put"))
    }
    async fn get(&self, _: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        Err(Status::unimplemented("get"))
    }
    async fn delete(
        &self,
        _: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        Err(Status::unimplemented("delete"))
    }
    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        Err(Status::unimplemented("list"))
    }
    async fn txn(&self, _: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        Err(Status::unimplemented("txn"))
    }
}

/// Starts a fake member; returns its address and shared state.
async fn fake() -> (String, Arc<Shared>) {
    let shared = Arc::new(Shared::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let f = Fake(shared.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SessionServer::new(f.clone()))
            .add_service(KvServer::new(f))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (addr, shared)
}

fn client(eps: &[&str]) -> Client {
    Client::connect_with(
        eps.iter().map(|s| s.to_string()),
        ClientOptions {
            request_timeout: Duration::from_millis(500),
            retry_budget: Duration::from_secs(3),
        },
    )
    .unwrap()
}

/// Waits (bounded) until the state is `want`; returns the states seen.
async fn wait_state(s: &Session, want: SessionState, limit: Duration) -> Vec<SessionState> {
    let mut rx = s.state();
    let mut seen = vec![*rx.borrow_and_update()];
    tokio::time::timeout(limit, async {
        while *seen.last().unwrap() != want {
            if rx.changed().await.is_err() {
                break;
            }
            seen.push(*rx.borrow_and_update());
        }
    })
    .await
    .unwrap_or_else(|_| panic!("state {want:?} not reached within {limit:?}; seen {seen:?}"));
    seen
}

async fn eventually(limit: Duration, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn lease_deadline_counts_from_send_time_and_never_shrinks() {
    let t0 = Instant::now();
    let ttl = Duration::from_secs(3);
    let mut l = Lease::new(t0, ttl);
    assert!(!l.expired(t0 + Duration::from_millis(2999)));
    assert!(l.expired(t0 + ttl));
    // An ack extends from the keepalive's send time, not its receipt.
    l.ack(t0 + Duration::from_secs(1), ttl);
    assert_eq!(l.deadline, t0 + Duration::from_secs(4));
    // A late ack of an older keepalive does not move it back.
    l.ack(t0 + Duration::from_millis(500), ttl);
    assert_eq!(l.deadline, t0 + Duration::from_secs(4));
    // A shorter granted TTL counts from its own send time.
    l.ack(t0 + Duration::from_secs(2), Duration::from_secs(1));
    assert_eq!(l.deadline, t0 + Duration::from_secs(4));
}

#[test]
fn keepalive_timing() {
    assert_eq!(interval_for(Duration::from_secs(9)), Duration::from_secs(3));
    assert_eq!(
        stall_limit(Duration::from_secs(300), Duration::from_secs(10)),
        Duration::from_secs(10)
    );
    assert_eq!(
        stall_limit(Duration::from_secs(3), Duration::from_secs(10)),
        Duration::from_secs(1)
    );
}

#[test]
fn request_ids_are_16_hex_and_distinct() {
    let a = new_request_id();
    let b = new_request_id();
    assert_eq!(a.len(), 16, "{a}");
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    assert_ne!(a, b);
}

#[tokio::test]
async fn keeps_alive_past_the_ttl_then_closes() {
    let (addr, shared) = fake().await;
    let c = client(&[&addr]);
    let s = c.open_session(Duration::from_millis(600)).await.unwrap();
    assert_eq!((s.id(), s.ttl()), (42, Duration::from_millis(600)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!s.is_lost(), "{:?}", s.lost_reason());
    assert!(shared.keepalives.load(Ordering::SeqCst) >= 3);
    wait_state(&s, SessionState::Connected, Duration::from_secs(2)).await;
    s.close().await.unwrap();
    assert_eq!(shared.closed(), [42]);
    let n = shared.keepalives.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(shared.keepalives.load(Ordering::SeqCst), n, "stopped");
}

#[tokio::test]
async fn server_expiry_is_lost_at_once() {
    let (addr, shared) = fake().await;
    let c = client(&[&addr]);
    let s = c.open_session(Duration::from_millis(600)).await.unwrap();
    wait_state(&s, SessionState::Connected, Duration::from_secs(1)).await;
    shared.set_mode(Mode::Expire);
    wait_state(&s, SessionState::Lost, Duration::from_secs(2)).await;
    // The server's answer, not the client's deadline.
    let why = s.lost().await;
    assert!(why.contains("session expired"), "{why}");
    assert!(s.is_lost());
    // The server ended it: nothing to close.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(shared.closed().is_empty());
}

#[tokio::test]
async fn unanswered_keepalives_suspend_then_lose_by_the_deadline() {
    let (addr, shared) = fake().await;
    let c = client(&[&addr]);
    let s = c.open_session(Duration::from_millis(600)).await.unwrap();
    wait_state(&s, SessionState::Connected, Duration::from_secs(1)).await;
    shared.set_mode(Mode::Silent);
    let seen = wait_state(&s, SessionState::Lost, Duration::from_secs(3)).await;
    assert!(seen.contains(&SessionState::Suspended), "{seen:?}");
    assert!(s.lost().await.contains("within the TTL"));
    // Lost by the client's clock: it tries to close on the server.
    eventually(Duration::from_secs(2), "close after loss", || {
        shared.closed() == [42]
    })
    .await;
}

#[tokio::test]
async fn fails_over_from_an_unreachable_endpoint() {
    let (addr, shared) = fake().await;
    let c = client(&["127.0.0.1:1", &addr]);
    let s = c.open_session(Duration::from_millis(600)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!s.is_lost(), "{:?}", s.lost_reason());
    assert!(shared.keepalives.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn keepalives_resume_after_a_failure() {
    let (addr, shared) = fake().await;
    let c = client(&[&addr]);
    let s = c.open_session(Duration::from_secs(3)).await.unwrap();
    wait_state(&s, SessionState::Connected, Duration::from_secs(1)).await;
    shared.set_mode(Mode::Silent);
    wait_state(&s, SessionState::Suspended, Duration::from_secs(3)).await;
    shared.set_mode(Mode::Ack);
    wait_state(&s, SessionState::Connected, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn drop_closes_in_the_background() {
    let (addr, shared) = fake().await;
    let c = client(&[&addr]);
    let s = c.open_session(Duration::from_secs(10)).await.unwrap();
    drop(s);
    eventually(Duration::from_secs(2), "close after drop", || {
        shared.closed() == [42]
    })
    .await;
}

#[tokio::test]
async fn protected_create_retries_with_the_same_request_id() {
    let (addr, shared) = fake().await;
    let c = client(&[&addr]);
    let r = c
        .create_protected(pb::CreateRequest {
            path: "/locks/l-".into(),
            sequential: true,
            session_id: 7,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.node.unwrap().path, "/locks/l-0000000001");
    let creates = shared.creates.lock().unwrap().clone();
    assert_eq!(creates.len(), 2, "one ambiguous attempt, one retry");
    assert_eq!(creates[0].request_id.len(), 16);
    assert_eq!(creates[0].request_id, creates[1].request_id);
    // A caller's own id is kept.
    let (addr, shared) = fake().await;
    let c = client(&[&addr]);
    c.create_protected(pb::CreateRequest {
        path: "/a".into(),
        request_id: "mine".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let creates = shared.creates.lock().unwrap().clone();
    assert!(creates.iter().all(|r| r.request_id == "mine"));
}

#[tokio::test]
async fn a_shorter_keepalive_cadence_keeps_renewed_at_recent() {
    let (addr, shared) = fake().await;
    let c = client(&[&addr]);
    let opened = Instant::now();
    // TTL 3 s: the default cadence would send one keepalive a second.
    let s = c
        .open_session_every(Duration::from_secs(3), Some(Duration::from_millis(50)))
        .await
        .unwrap();
    let h = s.handle();
    assert!(h.renewed_at() <= opened + Duration::from_millis(500));
    let before = h.renewed_at();
    eventually(Duration::from_secs(2), "6 keepalives", || {
        shared.keepalives.load(Ordering::SeqCst) >= 6
    })
    .await;
    // The default cadence (1 s) would need 5 s for 6.
    assert!(
        opened.elapsed() < Duration::from_millis(2500),
        "{:?}",
        opened.elapsed()
    );
    eventually(Duration::from_secs(1), "renewed_at moves on", || {
        h.renewed_at() > before
    })
    .await;
    // While keepalives go unanswered it stays put.
    shared.set_mode(Mode::Silent);
    wait_state(&s, SessionState::Suspended, Duration::from_secs(3)).await;
    let stuck = h.renewed_at();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.renewed_at(), stuck);
    assert!(stuck.elapsed() >= Duration::from_millis(200));
    s.close().await.unwrap();
}

#[tokio::test]
async fn a_longer_keepalive_cadence_is_capped_at_a_third_of_the_ttl() {
    let (addr, shared) = fake().await;
    let c = client(&[&addr]);
    let s = c
        .open_session_every(Duration::from_millis(600), Some(Duration::from_secs(60)))
        .await
        .unwrap();
    eventually(Duration::from_secs(2), "keepalives every TTL/3", || {
        shared.keepalives.load(Ordering::SeqCst) >= 4
    })
    .await;
    assert!(!s.is_lost(), "{:?}", s.lost_reason());
    s.close().await.unwrap();
}
