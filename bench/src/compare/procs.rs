//! Member processes of the peer systems (etcd, ZooKeeper): spawn with a log
//! file, kill -9, restart with the same command, wait for a port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::time::Instant;

/// One member: how to start it, and its process while running.
pub struct Member {
    /// Display name (`etcd-1`).
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Member {
    /// A member started with `program args` (not yet running); its output
    /// goes to `log`.
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        args: Vec<String>,
        log: PathBuf,
    ) -> Member {
        Member {
            name: name.into(),
            program: program.into(),
            args,
            envs: Vec::new(),
            log,
            child: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the process (appending to its log).
    pub fn spawn(&self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let err = log.try_clone()?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {} ({})", self.name, self.program.display()))?;
        *self.lock() = Some(child);
        Ok(())
    }

    /// Process id, if running.
    pub fn pid(&self) -> Option<u32> {
        let mut g = self.lock();
        let c = g.as_mut()?;
        match c.try_wait() {
            Ok(None) => Some(c.id()),
            _ => None,
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&self) {
        if let Some(mut c) = self.lock().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The last `n` lines of the log (for error messages).
    pub fn log_tail(&self, n: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the log says a port was taken ("address already in use"):
    /// worth a retry with new ports.
    pub fn log_says_addr_in_use(&self) -> bool {
        let l = std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .to_ascii_lowercase();
        l.contains("address already in use")
            || l.contains("addrinuse")
            || l.contains("address in use")
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check_running(&self) -> Result<()> {
        let mut g = self.lock();
        if let Some(c) = g.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                drop(g);
                bail!(
                    "{} exited ({status}); log tail:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
        }
        Ok(())
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `addr` accepts TCP connections (or `member` exits).
pub async fn wait_port(addr: &str, member: &Member, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        member.check_running()?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not listen on {addr} within {timeout:?}; log tail:\n{}",
                member.name,
                member.log_tail(20)
            );
        }
        // Polling a port: there is no event to await from another process.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first of `candidates` that exists, else an error naming the
/// install script.
pub fn find_program(candidates: &[&str], what: &str) -> Result<PathBuf> {
    for c in candidates {
        let p = Path::new(c);
        if p.exists() {
            return Ok(p.to_path_buf());
        }
    }
    bail!(
        "{what} not found (looked for {}); run ./scripts/install-peers (apt: etcd-server etcd-client zookeeper)",
        candidates.join(", ")
    )
}
