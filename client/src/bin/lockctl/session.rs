//! `lockctl session ...` and `lockctl create` (ephemeral, sequential and
//! container nodes).

use std::time::Duration;

use clap::{Args, Subcommand};
use lockd_client::proto;
use lockd_client::{Client, Error, Session, SessionState};
use serde_json::json;

use super::{opt_node_json, print_json, revision, Fail, Output};

/// Default TTL of the session `create --ephemeral` opens.
const DEFAULT_EPHEMERAL_TTL: Duration = Duration::from_secs(10);

#[derive(Subcommand, Debug)]
pub(crate) enum SessionCmd {
    /// Open a session, print `ID ttl=TTL` and keep it alive until Ctrl-C or
    /// SIGTERM, then close it (exit 0). Exits 1 if the session is lost.
    Open {
        /// Requested time to live (the server clamps it), e.g. 10s, 500ms, 1m.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Close session ID, deleting its ephemeral nodes.
    Close {
        /// Session id.
        id: u64,
    },
    /// Show the TTL, remaining time and ephemeral nodes of session ID.
    Info {
        /// Session id.
        id: u64,
    },
}

/// Arguments of `lockctl create`.
#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// Absolute path; with --sequential, the prefix of the name
    /// (/q/job- creates /q/job-0000000007).
    key: String,
    /// Value (taken as UTF-8 bytes).
    #[arg(allow_hyphen_values = true)]
    value: String,
    /// Create missing parent nodes (as persistent nodes).
    #[arg(long)]
    parents: bool,
    /// Make the node ephemeral, owned by a session opened for this command:
    /// it is deleted when the command ends (or with --hold, when it is
    /// interrupted).
    #[arg(long)]
    ephemeral: bool,
    /// Append a 10-digit counter, unique and increasing under the parent;
    /// prints the created path.
    #[arg(long)]
    sequential: bool,
    /// Make a container node (deleted once its last child is gone).
    #[arg(long, conflicts_with = "ephemeral")]
    container: bool,
    /// TTL of the --ephemeral session [default: 10s].
    #[arg(long, requires = "ephemeral", value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Keep the --ephemeral node (and its session) until Ctrl-C or SIGTERM,
    /// then close the session (exit 0). Exits 1 if the session is lost.
    #[arg(long, requires = "ephemeral")]
    hold: bool,
}

/// Parses `500ms`, `10s`, `1.5s`, `1m`, `1h`; a bare number is seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("invalid duration '{s}': expected e.g. 500ms, 10s, 1m");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= Duration::from_secs(1_000_000_000))
        .ok_or_else(bad)
}

/// `10s`, `1500ms`.
fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// NOT_FOUND as the server's message alone ("session expired: ...").
fn session_err(e: Error) -> Fail {
    match e {
        Error::NotFound(m) if !m.is_empty() => Fail::runtime(m),
        e => e.into(),
    }
}

pub(crate) fn closing_failed(id: u64, e: Error) -> Fail {
    let text = match e {
        Error::NotFound(m) if !m.is_empty() => m,
        e => e.to_string(),
    };
    Fail::runtime(format!("closing session {id}: {text}"))
}

/// SIGINT and SIGTERM, registered when created (so a signal that arrives
/// before we wait for it is not lost, and does not kill the process).
pub(crate) struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> Result<Signals, Fail> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let err = |e: std::io::Error| Fail::runtime(format!("cannot handle signals: {e}"));
            Ok(Signals {
                int: signal(SignalKind::interrupt()).map_err(err)?,
                term: signal(SignalKind::terminate()).map_err(err)?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    pub(crate) async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Keeps `session` alive until a signal (then closes it: Ok) or until it is
/// lost (Err, exit 1). Reports suspensions on stderr.
async fn hold(session: Session, signals: &mut Signals) -> Result<(), Fail> {
    let id = session.id();
    let mut state = session.state();
    let watch_state = async {
        let mut last = *state.borrow_and_update();
        loop {
            if state.changed().await.is_err() {
                return;
            }
            let s = *state.borrow_and_update();
            match (last, s) {
                (_, SessionState::Suspended) => {
                    eprintln!("Warning: session {id}: keepalives failing, retrying");
                }
                (SessionState::Suspended, SessionState::Connected) => {
                    eprintln!("Warning: session {id}: keepalives acknowledged again");
                }
                (_, SessionState::Lost) => return,
                _ => {}
            }
            last = s;
        }
    };
    let lost = async {
        // Print transitions while waiting for the loss.
        let (why, ()) = tokio::join!(session.lost(), watch_state);
        why
    };
    tokio::select! {
        _ = signals.recv() => {}
        why = lost => return Err(Fail::runtime(format!("session lost: {why}"))),
    }
    session.close().await.map_err(|e| closing_failed(id, e))
}

/// `lockctl session ...`.
pub(crate) async fn session_cmd(client: &Client, out: Output, cmd: SessionCmd) -> Result<(), Fail> {
    match cmd {
        SessionCmd::Open { ttl } => {
            let mut signals = Signals::new()?;
            let session = client.open_session(ttl).await?;
            if out == Output::Json {
                println!(
                    "{}",
                    json!({"session_id": session.id(), "ttl_ms": ms(session.ttl())})
                );
            } else {
                println!("{} ttl={}", session.id(), fmt_duration(session.ttl()));
            }
            hold(session, &mut signals).await
        }
        SessionCmd::Close { id } => {
            let r = client.close_session(id).await.map_err(session_err)?;
            if out == Output::Json {
                print_json(&json!({"revision": revision(r.header.as_ref()), "deleted": r.deleted}));
            } else {
                println!("OK");
            }
            Ok(())
        }
        SessionCmd::Info { id } => {
            let r = client.session_info(id).await.map_err(session_err)?;
            if out == Output::Json {
                print_json(&json!({
                    "revision": revision(r.header.as_ref()),
                    "session_id": r.session_id,
                    "ttl_ms": r.ttl_ms,
                    "remaining_ms": r.remaining_ms,
                    "ephemerals": r.ephemerals,
                }));
            } else {
                println!("session:    {}", r.session_id);
                println!(
                    "ttl:        {}",
                    fmt_duration(Duration::from_millis(r.ttl_ms))
                );
                println!(
                    "remaining:  {}",
                    fmt_duration(Duration::from_millis(r.remaining_ms))
                );
                println!("ephemerals: {}", r.ephemerals.len());
                for p in &r.ephemerals {
                    println!("  {p}");
                }
            }
            Ok(())
        }
    }
}

/// `lockctl create`.
pub(crate) async fn create(client: &Client, out: Output, a: CreateArgs) -> Result<(), Fail> {
    let mut req = proto::CreateRequest {
        path: a.key,
        data: a.value.into_bytes(),
        parents: a.parents,
        sequential: a.sequential,
        container: a.container,
        ..Default::default()
    };
    // Plain creates keep printing OK; the others print the created path.
    let print_path = a.ephemeral || a.sequential || a.container;
    let print = |r: &proto::CreateResponse, session: Option<&Session>, one_line: bool| {
        let path = r.node.as_ref().map(|n| n.path.as_str()).unwrap_or("");
        if out == Output::Json {
            let mut v = json!({"revision": revision(r.header.as_ref()),
                "node": opt_node_json(r.node.as_ref())});
            if let Some(s) = session {
                v["session_id"] = json!(s.id());
                v["ttl_ms"] = json!(ms(s.ttl()));
            }
            if one_line {
                println!("{v}");
            } else {
                print_json(&v);
            }
        } else if print_path {
            println!("{path}");
        } else {
            println!("OK");
        }
    };
    if !a.ephemeral {
        // A sequential node's name is only known from the answer: retry a
        // lost answer with a request id rather than leave an orphan.
        let r = if a.sequential {
            client.create_protected(req).await?
        } else {
            client.create_with(req).await?
        };
        print(&r, None, false);
        return Ok(());
    }
    let mut signals = if a.hold { Some(Signals::new()?) } else { None };
    let session = client
        .open_session(a.ttl.unwrap_or(DEFAULT_EPHEMERAL_TTL))
        .await?;
    req.session_id = session.id();
    let r = match client.create_protected(req).await {
        Ok(r) => r,
        Err(e) => {
            let _ = session.close().await;
            return Err(e.into());
        }
    };
    print(&r, Some(&session), a.hold);
    match signals.as_mut() {
        Some(signals) => hold(session, signals).await,
        None => {
            let id = session.id();
            session.close().await.map_err(|e| closing_failed(id, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        for bad in ["", "s", "10x", "-1s", "1e3s", "ms10", "1 0s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(fmt_duration(Duration::from_secs(10)), "10s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500ms");
    }
}
