//! `lockctl lock NAME [-- CMD ARGS...]`: hold a [`Mutex`] for a command.

use std::time::Duration;

use clap::Args;
use lockd_client::recipes::{Mutex, MutexGuard};
use lockd_client::{Client, Session};
use serde_json::json;

use super::session::{closing_failed, parse_duration, Signals};
use super::{Fail, Output};

/// Arguments of `lockctl lock`.
#[derive(Args, Debug)]
pub(crate) struct LockArgs {
    /// Lock directory, e.g. /locks/build (created as a container).
    name: String,
    /// TTL of the session that owns the lock, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    ttl: Duration,
    /// Give up acquiring after this long (exit 1). (--timeout is the global
    /// per-request timeout.)
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    acquire_timeout: Option<Duration>,
    /// When the lock is lost while CMD runs: time between SIGTERM and
    /// SIGKILL.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    kill_grace: Duration,
    /// Command to run while holding the lock (after `--`), with
    /// LOCKD_LOCK_NAME, LOCKD_LOCK_PATH, LOCKD_FENCING_TOKEN and
    /// LOCKD_SESSION_ID in its environment. Without one: print the token
    /// and hold until Ctrl-C or SIGTERM.
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

async fn close(session: Session) -> Result<(), Fail> {
    let id = session.id();
    session.close().await.map_err(|e| closing_failed(id, e))
}

/// Releases the lock and closes the session; the first error wins.
async fn release(guard: MutexGuard, session: Session) -> Result<(), Fail> {
    let name = guard.name().to_string();
    let unlocked = guard
        .unlock()
        .await
        .map_err(|e| Fail::runtime(format!("releasing lock {name}: {e}")));
    let closed = close(session).await;
    unlocked.and(closed)
}

/// The exit code a shell would report for `st`.
pub(crate) fn exit_code(st: std::process::ExitStatus) -> u8 {
    if let Some(c) = st.code() {
        return u8::try_from(c).unwrap_or(1);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = st.signal() {
            return u8::try_from(128 + sig).unwrap_or(1);
        }
    }
    1
}

/// SIGTERM, then SIGKILL after `grace`; returns the exit status.
pub(crate) async fn terminate(
    child: &mut tokio::process::Child,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    #[cfg(unix)]
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        if let Ok(st) = tokio::time::timeout(grace, child.wait()).await {
            return st;
        }
    }
    let _ = child.start_kill();
    child.wait().await
}

/// `lockctl lock`.
pub(crate) async fn lock(client: &Client, out: Output, a: LockArgs) -> Result<(), Fail> {
    let mut signals = Signals::new()?;
    let session = client.open_session(a.ttl).await?;
    let mutex = Mutex::new(client.clone(), a.name.clone(), &session);
    let acquire = async {
        match a.acquire_timeout {
            Some(d) => mutex.lock_timeout(d).await,
            None => mutex.lock().await.map(Some),
        }
    };
    let acquired = tokio::select! {
        r = acquire => r,
        _ = signals.recv() => {
            // Dropping the acquisition deletes our node; closing the
            // session does in any case.
            let _ = session.close().await;
            return Err(Fail::runtime(format!(
                "interrupted while waiting for lock {}",
                a.name
            )));
        }
    };
    let guard = match acquired {
        Ok(Some(g)) => g,
        Ok(None) => {
            let _ = session.close().await;
            return Err(Fail::runtime(format!(
                "timed out after {:?} waiting for lock {}",
                a.acquire_timeout.unwrap_or_default(),
                a.name
            )));
        }
        Err(e) => {
            let _ = session.close().await;
            return Err(Fail::runtime(format!("acquiring lock {}: {e}", a.name)));
        }
    };
    let token = guard.fencing_token();
    let lost = guard.lost();
    tokio::pin!(lost);

    let Some((prog, args)) = a.cmd.split_first() else {
        if out == Output::Json {
            println!(
                "{}",
                json!({"name": a.name, "path": guard.path(), "fencing_token": token,
                       "session_id": session.id(), "ttl_ms": session.ttl().as_millis() as u64})
            );
        } else {
            println!("{token}");
        }
        tokio::select! {
            _ = signals.recv() => return release(guard, session).await,
            why = &mut lost => {
                drop(guard);
                let _ = session.close().await;
                return Err(Fail::runtime(format!("lock {} lost: {why}", a.name)));
            }
        }
    };

    let mut child = match tokio::process::Command::new(prog)
        .args(args)
        .env("LOCKD_LOCK_NAME", &a.name)
        .env("LOCKD_LOCK_PATH", guard.path())
        .env("LOCKD_FENCING_TOKEN", token.to_string())
        .env("LOCKD_SESSION_ID", session.id().to_string())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let r = release(guard, session).await;
            r?;
            return Err(Fail::runtime(format!("cannot run {prog}: {e}")));
        }
    };
    tokio::select! {
        st = child.wait() => {
            let code = match st {
                Ok(st) => exit_code(st),
                Err(e) => {
                    let _ = release(guard, session).await;
                    return Err(Fail::runtime(format!("waiting for {prog}: {e}")));
                }
            };
            release(guard, session).await?;
            if code == 0 {
                Ok(())
            } else {
                Err(Fail { code, msg: None })
            }
        }
        why = &mut lost => {
            eprintln!(
                "Error: lock {} lost while {prog} was running ({why}); terminating {prog}",
                a.name
            );
            let _ = terminate(&mut child, a.kill_grace).await;
            drop(guard);
            let _ = session.close().await;
            Err(Fail::runtime(format!(
                "lock {} lost: {prog} was terminated",
                a.name
            )))
        }
        _ = signals.recv() => {
            let st = terminate(&mut child, a.kill_grace).await;
            release(guard, session).await?;
            match st {
                Ok(st) => Err(Fail { code: exit_code(st).max(1), msg: None }),
                Err(e) => Err(Fail::runtime(format!("waiting for {prog}: {e}"))),
            }
        }
    }
}
