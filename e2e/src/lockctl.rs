//! Running the real `lockctl` binary from tests: to completion ([`run_with`],
//! [`run_on`]) or in the background ([`Background`]), always with bounded
//! retries and time limits so a wrong answer shows up as a failure, not a
//! hang.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::lockctl_bin;

/// Bound of one foreground lockctl run (its own retry budget is shorter).
pub const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Bound of waiting for one line or the exit of a background lockctl.
pub const WAIT: Duration = Duration::from_secs(20);

/// What one lockctl run produced.
#[derive(Debug)]
pub struct Out {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Out {
    /// Asserts a zero exit and returns self.
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "lockctl failed: {self:?}");
        self
    }

    /// Standard output parsed as JSON (panics with the output if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not valid JSON ({e}): {self:?}"))
    }

    /// Non-empty lines of standard error.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// How to run lockctl.
#[derive(Default)]
pub struct Run<'a> {
    /// `--endpoints` value; `None` passes no flag.
    pub endpoints: Option<String>,
    /// `LOCKD_ENDPOINTS` for the child (always removed from it otherwise).
    pub env_endpoints: Option<String>,
    /// Fed to standard input, then closed.
    pub stdin: Option<&'a str>,
    /// `--timeout` and `--retry-budget` in seconds (default 10 and 20).
    pub timeouts: Option<(&'a str, &'a str)>,
}

fn command(r: &Run<'_>, args: &[&str]) -> Command {
    let mut cmd = Command::new(lockctl_bin());
    cmd.env_remove("LOCKD_ENDPOINTS");
    if let Some(e) = &r.env_endpoints {
        cmd.env("LOCKD_ENDPOINTS", e);
    }
    if let Some(e) = &r.endpoints {
        cmd.arg(format!("--endpoints={e}"));
    }
    let (t, b) = r.timeouts.unwrap_or(("10", "20"));
    cmd.args(["--timeout", t, "--retry-budget", b]);
    cmd.args(args)
        .stdin(if r.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs lockctl to completion.
pub async fn run_with(r: Run<'_>, args: &[&str]) -> Out {
    let mut child = command(&r, args)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", lockctl_bin().display()));
    if let Some(input) = r.stdin {
        let mut si = child.stdin.take().expect("piped stdin");
        si.write_all(input.as_bytes()).await.expect("write stdin");
        drop(si);
    }
    let out = match tokio::time::timeout(RUN_LIMIT, child.wait_with_output()).await {
        Ok(o) => o.expect("wait for lockctl"),
        Err(_) => panic!("lockctl {args:?} did not finish within {RUN_LIMIT:?}"),
    };
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs lockctl to completion against `endpoints` (comma-separated).
pub async fn run_on(endpoints: &str, args: &[&str]) -> Out {
    run_with(
        Run {
            endpoints: Some(endpoints.to_string()),
            ..Run::default()
        },
        args,
    )
    .await
}

/// A lockctl left running in the background, and its standard output.
pub struct Background {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Background {
    /// Starts `lockctl --endpoints=ENDPOINTS args...`.
    pub fn spawn(endpoints: &str, args: &[&str]) -> Background {
        let r = Run {
            endpoints: Some(endpoints.to_string()),
            timeouts: Some(("5", "20")),
            ..Run::default()
        };
        let mut child = command(&r, args).spawn().expect("spawn lockctl");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Background { child, lines }
    }

    /// The next line of output (panics with stderr if none comes in time).
    pub async fn line(&mut self) -> String {
        match tokio::time::timeout(WAIT, self.lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            other => {
                let _ = self.child.start_kill();
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err).await;
                }
                panic!("no line from lockctl: {other:?}; stderr: {err}")
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        let pid = self.child.id().expect("running");
        i32::try_from(pid).expect("pid fits in pid_t")
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits for the exit; returns the exit code and stderr.
    pub async fn exit(mut self) -> (i32, String) {
        let st = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("lockctl exits")
            .expect("wait");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err).await;
        }
        (st.code().unwrap_or(-1), err)
    }
}
