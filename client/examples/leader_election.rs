//! A worker that works only while it is the leader of an election.
//!
//! ```text
//! cargo run -p lockd-client --example leader_election -- /elections/worker my-id 127.0.0.1:7001
//! ```
//!
//! Every tick it writes `/worker/state`, guarded so the write applies only
//! while its term still holds (and tagged with the term's fencing token).
//! It pauses while the session is Suspended and stops on Lost.

use std::time::Duration;

use lockd_client::proto;
use lockd_client::recipes::{holds_lock_compare, ElectionConfig, ElectionEvent, LeaderElection};
use lockd_client::{Client, SessionState};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "/elections/worker".into());
    let identity = args
        .next()
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    let endpoints: Vec<String> = args.collect();
    let endpoints = if endpoints.is_empty() {
        vec!["127.0.0.1:7001".to_string()]
    } else {
        endpoints
    };
    let client = Client::connect(endpoints)?;
    let election = LeaderElection::new(
        client.clone(),
        name,
        ElectionConfig::new(identity.clone(), Duration::from_secs(10)),
    )?;
    let mut campaign = election.campaign();
    let state = campaign.session_state();
    // The current term: (node path, fencing token).
    let mut term: Option<(String, u64)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ev = campaign.next() => match ev {
                Some(ElectionEvent::StartedLeading { fencing_token, path }) => {
                    println!("{identity}: leading with token {fencing_token}");
                    term = Some((path, fencing_token));
                }
                Some(ElectionEvent::StoppedLeading { reason }) => {
                    println!("{identity}: stopped leading ({reason})");
                    term = None;
                }
                Some(ElectionEvent::NewLeader { identity: l, .. }) => println!("leader is {l}"),
                None => break,
            },
            _ = tick.tick() => {
                let Some((path, token)) = &term else { continue };
                if *state.borrow() != SessionState::Connected {
                    // Suspended: our node may be gone; do not act.
                    continue;
                }
                let req = proto::TxnRequest {
                    compare: vec![holds_lock_compare(path.clone(), *token)],
                    success: vec![proto::Op {
                        op: Some(proto::op::Op::Put(proto::PutRequest {
                            path: "/worker/state".into(),
                            data: format!("{identity} token={token}").into_bytes(),
                            expected_version: None,
                            parents: true,
                        })),
                    }],
                    ..Default::default()
                };
                match client.txn(req).await {
                    Ok(r) if r.succeeded => println!("{identity}: worked (token {token})"),
                    Ok(_) => println!("{identity}: fenced off: no longer leader"),
                    Err(e) => println!("{identity}: write failed: {e}"),
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    campaign.cancel().await;
    Ok(())
}
