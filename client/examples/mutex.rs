//! Take a distributed lock, do some work, release it.
//!
//! `LOCKD_ENDPOINTS=127.0.0.1:7001,127.0.0.1:7002 cargo run -p lockd-client --example mutex`

use std::time::Duration;

use lockd_client::recipes::Mutex;
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

#[tokio::main]
async fn main() -> Result<(), lockd_client::Error> {
    let client = Client::connect(endpoints())?;
    let session = client.open_session(Duration::from_secs(10)).await?;
    let mutex = Mutex::new(client.clone(), "/locks/example", &session);

    let guard = mutex.lock().await?;
    println!(
        "holding {} (fencing token {})",
        guard.path(),
        guard.fencing_token()
    );
    tokio::time::sleep(Duration::from_secs(1)).await; // the critical section
    guard.unlock().await?;
    println!("released");

    session.close().await
}
