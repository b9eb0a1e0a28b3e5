//! Failover and retry behaviour against in-process mock KV servers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockd_client::proto::{self, kv_server};
use lockd_client::{Client, ClientOptions, Error};
use tonic::{Request, Response, Status};

#[derive(Clone, Copy)]
enum Behavior {
    Ok,
    NoLeader,
    Hang,
}

struct Mock {
    behavior: Behavior,
    calls: Arc<AtomicUsize>,
}

impl Mock {
    async fn act(&self) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.behavior {
            Behavior::Ok => Ok(()),
            Behavior::NoLeader => Err(Status::unavailable("no leader")),
            Behavior::Hang => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(())
            }
        }
    }
}

#[tonic::async_trait]
impl kv_server::Kv for Mock {
    async fn create(
        &self,
        _: Request<proto::CreateRequest>,
    ) -> Result<Response<proto::CreateResponse>, Status> {
        Err(Status::unimplemented("create"))
    }
    async fn put(
        &self,
        r: Request<proto::PutRequest>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        self.act().await?;
        let r = r.into_inner();
        Ok(Response::new(proto::PutResponse {
            header: None,
            node: Some(proto::Node {
                path: r.path,
                data: r.data,
                version: 1,
                ..Default::default()
            }),
            created: true,
        }))
    }
    async fn get(
        &self,
        r: Request<proto::GetRequest>,
    ) -> Result<Response<proto::GetResponse>, Status> {
        self.act().await?;
        Err(Status::not_found(format!(
            "{}: not found",
            r.into_inner().path
        )))
    }
    async fn delete(
        &self,
        _: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        Err(Status::unimplemented("delete"))
    }
    async fn list(
        &self,
        _: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, Status> {
        Err(Status::unimplemented("list"))
    }
    async fn txn(
        &self,
        _: Request<proto::TxnRequest>,
    ) -> Result<Response<proto::TxnResponse>, Status> {
        Err(Status::unimplemented("txn"))
    }
}

async fn spawn(behavior: Behavior) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = kv_server::KvServer::new(Mock {
        behavior,
        calls: calls.clone(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, calls)
}

fn opts(timeout_ms: u64, budget_ms: u64) -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_millis(timeout_ms),
        retry_budget: Duration::from_millis(budget_ms),
    }
}

#[tokio::test]
async fn write_fails_over_past_refused_endpoint() {
    let (addr, calls) = spawn(Behavior::Ok).await;
    let c = Client::connect_with(["127.0.0.1:1".to_string(), addr], opts(2000, 5000)).unwrap();
    let r = c.put("/a", "v").await.unwrap();
    assert_eq!(r.node.unwrap().data, b"v");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The answering endpoint is remembered: no new attempt on the dead one.
    c.put("/a", "w").await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn write_retried_after_server_unavailable() {
    let (a, a_calls) = spawn(Behavior::NoLeader).await;
    let (b, b_calls) = spawn(Behavior::Ok).await;
    let c = Client::connect_with([a, b], opts(2000, 5000)).unwrap();
    c.put("/a", "v").await.unwrap();
    assert_eq!(a_calls.load(Ordering::SeqCst), 1);
    assert_eq!(b_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn all_unavailable_gives_unavailable() {
    let (a, _) = spawn(Behavior::NoLeader).await;
    let c = Client::connect_with([a], opts(2000, 300)).unwrap();
    let e = c.put("/a", "v").await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(e.to_string().contains("no leader"), "{e}");
}

#[tokio::test]
async fn timed_out_write_is_ambiguous_and_not_retried() {
    let (a, a_calls) = spawn(Behavior::Hang).await;
    let (b, b_calls) = spawn(Behavior::Ok).await;
    let c = Client::connect_with([a, b], opts(300, 5000)).unwrap();
    let e = c.put("/a", "v").await.unwrap_err();
    assert!(e.is_ambiguous(), "{e}");
    assert_eq!(a_calls.load(Ordering::SeqCst), 1);
    assert_eq!(b_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn timed_out_read_fails_over() {
    let (a, _) = spawn(Behavior::Hang).await;
    let (b, b_calls) = spawn(Behavior::Ok).await;
    let c = Client::connect_with([a, b], opts(300, 5000)).unwrap();
    let e = c.get("/missing").await.unwrap_err();
    match e {
        Error::NotFound(m) => assert_eq!(m, "/missing: not found"),
        e => panic!("unexpected {e}"),
    }
    assert_eq!(b_calls.load(Ordering::SeqCst), 1);
}
