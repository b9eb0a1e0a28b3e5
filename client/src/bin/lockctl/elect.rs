//! `lockctl elect NAME IDENTITY [-- CMD ARGS...]` and `lockctl elect NAME
//! --observe`: a [`LeaderElection`] campaign or observer.

use std::time::Duration;

use clap::Args;
use lockd_client::recipes::{observe, ElectionConfig, ElectionEvent, LeaderElection};
use lockd_client::Client;
use serde_json::json;

use super::lock::{exit_code, terminate};
use super::session::{parse_duration, Signals};
use super::{Fail, Output};

/// Arguments of `lockctl elect`.
#[derive(Args, Debug)]
pub(crate) struct ElectArgs {
    /// Election directory, e.g. /elections/scheduler (created as a container).
    name: String,
    /// This candidate's identity (required unless --observe).
    #[arg(required_unless_present = "observe")]
    identity: Option<String>,
    /// TTL of the session that owns the candidate node, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    ttl: Duration,
    /// Step down when the session has not been renewed for this long
    /// (client-go's renew deadline; default 2/3 of --ttl).
    #[arg(long, value_parser = parse_duration)]
    renew_deadline: Option<Duration>,
    /// Pause between retries after errors, and between keepalives
    /// (client-go's retry period; default --ttl/5, at most 2s).
    #[arg(long, value_parser = parse_duration)]
    retry_period: Option<Duration>,
    /// Do not campaign: print the current leader and every change.
    #[arg(long, conflicts_with = "identity")]
    observe: bool,
    /// When leadership is lost while CMD runs: time between SIGTERM and
    /// SIGKILL.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    kill_grace: Duration,
    /// Command to run while leader (after `--`), started on each term with
    /// LOCKD_ELECTION_NAME, LOCKD_LEADER_PATH and LOCKD_FENCING_TOKEN in its
    /// environment and sent SIGTERM when the term ends.
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

fn print_leader(out: Output, identity: Option<&str>, token: u64) {
    match (out, identity) {
        (Output::Json, Some(id)) => {
            println!("{}", json!({"leader": id, "fencing_token": token}))
        }
        (Output::Json, None) => println!("{}", json!({"leader": null})),
        (Output::Table, Some(id)) => println!("leader: {id} (token {token})"),
        (Output::Table, None) => println!("no leader"),
    }
}

/// `lockctl elect`.
pub(crate) async fn elect(client: &Client, out: Output, a: ElectArgs) -> Result<(), Fail> {
    let mut signals = Signals::new()?;
    if a.observe {
        let mut obs = observe(client.clone(), a.name.clone());
        loop {
            tokio::select! {
                l = obs.next() => match l {
                    Some(Some(l)) => print_leader(out, Some(&l.identity), l.fencing_token),
                    Some(None) => print_leader(out, None, 0),
                    None => return Ok(()),
                },
                _ = signals.recv() => return Ok(()),
            }
        }
    }
    let identity = a.identity.clone().unwrap_or_default();
    let mut config = ElectionConfig::new(identity.clone(), a.ttl);
    if let Some(d) = a.renew_deadline {
        config = config.with_renew_deadline(d);
    }
    if let Some(d) = a.retry_period {
        config = config.with_retry_period(d);
    }
    let election = LeaderElection::new(client.clone(), a.name.clone(), config)?;
    let mut campaign = election.campaign();
    let mut child: Option<tokio::process::Child> = None;
    let mut leading = false;
    loop {
        let child_exit = async {
            match child.as_mut() {
                Some(c) => c.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = campaign.next() => {
                let Some(ev) = ev else { break };
                match ev {
                    ElectionEvent::StartedLeading { fencing_token, path } => {
                        leading = true;
                        match out {
                            Output::Json => println!("{}", json!({"event": "started_leading",
                                "identity": identity, "fencing_token": fencing_token, "path": path})),
                            Output::Table => println!("leader: {identity} (token {fencing_token})"),
                        }
                        if let Some((prog, args)) = a.cmd.split_first() {
                            match tokio::process::Command::new(prog)
                                .args(args)
                                .env("LOCKD_ELECTION_NAME", &a.name)
                                .env("LOCKD_LEADER_PATH", &path)
                                .env("LOCKD_FENCING_TOKEN", fencing_token.to_string())
                                .spawn()
                            {
                                Ok(c) => child = Some(c),
                                Err(e) => eprintln!("Error: cannot run {prog}: {e}"),
                            }
                        }
                    }
                    ElectionEvent::StoppedLeading { reason } => {
                        leading = false;
                        if let Some(mut c) = child.take() {
                            let _ = terminate(&mut c, a.kill_grace).await;
                        }
                        match out {
                            Output::Json => println!("{}", json!({"event": "stopped_leading", "reason": reason})),
                            Output::Table => println!("not leader"),
                        }
                    }
                    ElectionEvent::NewLeader { identity: id, fencing_token } => {
                        if out == Output::Json {
                            println!("{}", json!({"event": "new_leader", "identity": id,
                                "fencing_token": fencing_token}));
                        } else if !leading || id != identity {
                            eprintln!("observed leader: {id} (token {fencing_token})");
                        }
                    }
                }
            }
            st = child_exit => {
                // CMD ended on its own while we lead: report it and give
                // the leadership to the next candidate.
                let code = st.map(exit_code).unwrap_or(1);
                eprintln!("command exited with status {code}; resigning");
                child = None;
                campaign.resign();
            }
            _ = signals.recv() => break,
        }
    }
    // Stop CMD and say so before our node goes (then the next leader).
    if let Some(mut c) = child.take() {
        let _ = terminate(&mut c, a.kill_grace).await;
    }
    if leading {
        match out {
            Output::Json => {
                println!(
                    "{}",
                    json!({"event": "stopped_leading", "reason": "interrupted"})
                )
            }
            Output::Table => println!("not leader"),
        }
    }
    for ev in campaign.cancel().await {
        if let (false, ElectionEvent::StoppedLeading { reason }) = (leading, ev) {
            match out {
                Output::Json => {
                    println!("{}", json!({"event": "stopped_leading", "reason": reason}))
                }
                Output::Table => println!("not leader"),
            }
        }
    }
    Ok(())
}
