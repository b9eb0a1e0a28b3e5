//! Five workers share a semaphore with two leases: at most two run at once.
//!
//! `LOCKD_ENDPOINTS=127.0.0.1:7001 cargo run -p lockd-client --example semaphore`

use std::time::Duration;

use lockd_client::recipes::Semaphore;
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
    let mut workers = Vec::new();
    for id in 0..5 {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            // One session per worker, as if each were its own process.
            let session = client.open_session(Duration::from_secs(10)).await?;
            let sem = Semaphore::new(client, "/semaphores/example", 2, &session);
            let lease = sem.acquire().await?;
            println!("worker {id}: got {}", lease.path());
            tokio::time::sleep(Duration::from_millis(500)).await;
            lease.release().await?;
            println!("worker {id}: released");
            session.close().await
        }));
    }
    for w in workers {
        w.await.expect("worker panicked")?;
    }
    Ok(())
}
