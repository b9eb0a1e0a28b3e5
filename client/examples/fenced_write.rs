//! Fencing: a write guarded by the lock holder's token is applied; the same
//! write from a holder whose lock has moved on (a stale token) is rejected.
//!
//! `LOCKD_ENDPOINTS=127.0.0.1:7001 cargo run -p lockd-client --example fenced_write`

use std::time::Duration;

use lockd_client::proto;
use lockd_client::recipes::{holds_lock_compare, Mutex};
use lockd_client::Client;

/// Endpoints from `LOCKD_ENDPOINTS` (comma-separated), else `127.0.0.1:7001`.
fn endpoints() -> Vec<String> {
    std::env::var("LOCKD_ENDPOINTS")
        .unwrap_or_else(|_| "127.0.0.1:7001".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A transaction that writes `data` to `/example/fenced`.
fn write(data: &str) -> proto::TxnRequest {
    proto::TxnRequest {
        success: vec![proto::Op {
            op: Some(proto::op::Op::Put(proto::PutRequest {
                path: "/example/fenced".into(),
                data: data.into(),
                expected_version: None,
                parents: true,
            })),
        }],
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> Result<(), lockd_client::Error> {
    let client = Client::connect(endpoints())?;
    let session = client.open_session(Duration::from_secs(10)).await?;
    let mutex = Mutex::new(client.clone(), "/locks/fenced-example", &session);

    // First holder: its guarded write applies.
    let first = mutex.lock().await?;
    let (old_path, old_token) = (first.path().to_string(), first.fencing_token());
    let r = first.guarded_txn(write("from holder 1")).await?;
    println!(
        "holder 1 (token {old_token}) write applied: {}",
        r.succeeded
    );
    first.unlock().await?;

    // The lock moves on to a second holder, with a higher token.
    let second = mutex.lock().await?;
    println!("holder 2 token {}", second.fencing_token());

    // Holder 1 (say, paused past its session) tries again with its old
    // token: the compare fails, nothing is written.
    let mut stale = write("stale write from holder 1");
    stale.compare.push(holds_lock_compare(old_path, old_token));
    let r = client.txn(stale).await?;
    println!("stale token {old_token} write applied: {}", r.succeeded);
    assert!(!r.succeeded);

    let r = second.guarded_txn(write("from holder 2")).await?;
    println!("holder 2 write applied: {}", r.succeeded);
    second.unlock().await?;
    session.close().await
}
