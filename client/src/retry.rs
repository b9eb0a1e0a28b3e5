//! Retry classification and backoff. Pure functions, no I/O.

use std::error::Error as StdError;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::{Code, Status};

use crate::error::{code_name, Error};

/// First backoff delay.
pub(crate) const BACKOFF_START: Duration = Duration::from_millis(50);
/// Largest backoff delay.
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(1);

/// Whether a call may be repeated without changing its effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Reads (get, list, status): always safe to repeat.
    Read,
    /// Writes: repeat only when the failure proves the write was not applied.
    Write,
}

/// What to do with a failed attempt.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Try again (on the next endpoint); carries a description of the failure.
    Retry(String),
    /// Give up with this error.
    Fail(Error),
}

/// Renders a status as `code: message` for error texts.
/// The innermost cause (e.g. "Connection refused") is appended when the
/// status was produced locally and its message does not already say it.
pub(crate) fn describe(status: &Status) -> String {
    format!(
        "{}: {}",
        code_name(status.code()),
        message_with_cause(status)
    )
}

/// The status message plus its innermost local cause, if any.
pub(crate) fn message_with_cause(status: &Status) -> String {
    let mut msg = status.message().to_string();
    let mut cur: Option<&(dyn StdError + 'static)> = status.source();
    let mut last = None;
    while let Some(e) = cur {
        last = Some(e);
        cur = e.source();
    }
    if let Some(e) = last {
        let cause = e.to_string();
        if !cause.is_empty() && !msg.contains(&cause) {
            msg = format!("{msg}: {cause}");
        }
    }
    msg
}

/// Description used when retries run out: the code is implied for
/// `UNAVAILABLE`, which becomes [`Error::Unavailable`].
fn describe_retry(status: &Status) -> String {
    if status.code() == Code::Unavailable {
        message_with_cause(status)
    } else {
        describe(status)
    }
}

fn chain_has<F: Fn(&(dyn StdError + 'static)) -> bool>(status: &Status, pred: F) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = status.source();
    while let Some(e) = cur {
        if pred(e) {
            return true;
        }
        cur = e.source();
    }
    false
}

/// True when the status was produced by the client's transport (it carries a
/// source error) rather than decoded from a server response.
fn is_local(status: &Status) -> bool {
    status.source().is_some()
}

/// True when the failure happened while establishing the connection, i.e. the
/// request never reached a server.
pub(crate) fn is_connect_failure(status: &Status) -> bool {
    if chain_has(status, |e| {
        e.downcast_ref::<tonic::ConnectError>().is_some()
    }) {
        return true;
    }
    // Only codes a transport failure can carry: a definite answer from a
    // handler (e.g. FAILED_PRECONDITION "cannot reach the new member at ...:
    // tcp connect error") merely quotes someone else's connect error.
    if !matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Internal
    ) {
        return false;
    }
    let m = status.message().to_ascii_lowercase();
    [
        "tcp connect error",
        "error trying to connect",
        "connection refused",
        "connect error",
        "dns error",
        "refused stream",
    ]
    .iter()
    .any(|k| m.contains(k))
}

/// True when the status looks like a transport failure rather than an answer
/// from the server's handler.
pub(crate) fn is_transport_failure(status: &Status) -> bool {
    if is_local(status) || is_connect_failure(status) {
        return true;
    }
    let m = status.message().to_ascii_lowercase();
    [
        "transport error",
        "h2 protocol error",
        "connection",
        "broken pipe",
    ]
    .iter()
    .any(|k| m.contains(k))
}

/// True when a failed write is proven not to have been applied.
pub(crate) fn write_not_applied(status: &Status) -> bool {
    if is_connect_failure(status) {
        return true;
    }
    // UNAVAILABLE from the server itself means it did not propose the write.
    // A locally generated UNAVAILABLE (e.g. keep-alive timeout on an open
    // connection) proves nothing.
    status.code() == Code::Unavailable && !is_local(status)
}

/// Decides whether an attempt that failed with `status` is retried.
pub(crate) fn classify(kind: Kind, status: Status) -> Verdict {
    match kind {
        Kind::Read => {
            let retry = match status.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => true,
                Code::Unknown | Code::Internal => is_transport_failure(&status),
                _ => false,
            };
            if retry {
                Verdict::Retry(describe_retry(&status))
            } else {
                Verdict::Fail(status.into())
            }
        }
        Kind::Write => {
            if write_not_applied(&status) {
                return Verdict::Retry(describe_retry(&status));
            }
            let ambiguous = match status.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                    true
                }
                Code::Internal | Code::Aborted => is_transport_failure(&status),
                _ => false,
            };
            if ambiguous {
                Verdict::Fail(Error::Ambiguous(describe(&status)))
            } else {
                Verdict::Fail(status.into())
            }
        }
    }
}

/// Exponential backoff with jitter: each delay is drawn from
/// `[base/2, base]`, `base` doubling from [`BACKOFF_START`] up to
/// [`BACKOFF_CAP`].
#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    rng: u64,
}

impl Backoff {
    /// A fresh backoff seeded from the clock.
    pub(crate) fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Self::with_seed(nanos)
    }

    /// A backoff with a fixed seed (for tests).
    pub(crate) fn with_seed(seed: u64) -> Self {
        Self {
            base: BACKOFF_START,
            rng: seed | 1,
        }
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// The next delay to sleep before retrying.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.base;
        self.base = (base * 2).min(BACKOFF_CAP);
        let half = base.as_millis() as u64 / 2;
        let jitter = self.next_rand() % (half + 1);
        Duration::from_millis(half + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_error() -> Status {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err: Box<dyn StdError + Send + Sync> = Box::new(tonic::ConnectError(Box::new(io)));
        Status::from_error(err)
    }

    fn local_unavailable() -> Status {
        // Like hyper's keep-alive timeout: UNAVAILABLE generated locally.
        #[derive(Debug)]
        struct KeepAlive;
        impl std::fmt::Display for KeepAlive {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("keep-alive timed out")
            }
        }
        impl StdError for KeepAlive {}
        let inner: Box<dyn StdError + Send + Sync> = Box::new(KeepAlive);
        let mut s = Status::unavailable("keep-alive timed out");
        s.set_source(std::sync::Arc::from(inner));
        s
    }

    fn retries(kind: Kind, s: Status) -> bool {
        matches!(classify(kind, s), Verdict::Retry(_))
    }

    #[test]
    fn connect_error_is_unavailable_and_detected() {
        let s = connect_error();
        assert_eq!(s.code(), Code::Unavailable);
        assert!(is_connect_failure(&s));
        assert!(retries(Kind::Write, s));
        assert!(retries(Kind::Read, connect_error()));
    }

    #[test]
    fn server_unavailable_retried_for_both() {
        assert!(retries(Kind::Write, Status::unavailable("no leader")));
        assert!(retries(Kind::Read, Status::unavailable("no leader")));
    }

    #[test]
    fn local_unavailable_is_ambiguous_for_writes() {
        assert!(retries(Kind::Read, local_unavailable()));
        match classify(Kind::Write, local_unavailable()) {
            Verdict::Fail(Error::Ambiguous(m)) => assert!(m.contains("keep-alive")),
            v => panic!("unexpected {v:?}"),
        }
    }

    #[test]
    fn deadline_and_unknown_are_ambiguous_for_writes() {
        for s in [
            Status::deadline_exceeded("timeout"),
            Status::unknown("transport error"),
            Status::cancelled("Timeout expired"),
        ] {
            match classify(Kind::Write, s) {
                Verdict::Fail(Error::Ambiguous(_)) => {}
                v => panic!("unexpected {v:?}"),
            }
        }
    }

    #[test]
    fn reads_retry_timeouts_and_transport_unknown() {
        assert!(retries(Kind::Read, Status::deadline_exceeded("t")));
        assert!(retries(Kind::Read, Status::cancelled("Timeout expired")));
        assert!(retries(Kind::Read, Status::unknown("transport error")));
        assert!(retries(
            Kind::Read,
            Status::internal("h2 protocol error: stream reset")
        ));
        // An UNKNOWN decoded from a server handler is not retried.
        assert!(!retries(Kind::Read, Status::unknown("handler failed")));
    }

    #[test]
    fn definite_errors_are_not_retried() {
        for kind in [Kind::Read, Kind::Write] {
            match classify(kind, Status::not_found("/x")) {
                Verdict::Fail(Error::NotFound(m)) => assert_eq!(m, "/x"),
                v => panic!("unexpected {v:?}"),
            }
            assert!(matches!(
                classify(kind, Status::already_exists("/x")),
                Verdict::Fail(Error::AlreadyExists(_))
            ));
            assert!(matches!(
                classify(kind, Status::failed_precondition("v")),
                Verdict::Fail(Error::FailedPrecondition(_))
            ));
            assert!(matches!(
                classify(kind, Status::invalid_argument("p")),
                Verdict::Fail(Error::InvalidArgument(_))
            ));
            assert!(matches!(
                classify(kind, Status::internal("state machine")),
                Verdict::Fail(Error::Rpc(_))
            ));
        }
    }

    #[test]
    fn quoted_connect_error_in_a_definite_answer_is_not_retried() {
        // AddLearner's answer when the new member is unreachable.
        let s = || {
            Status::failed_precondition(
                "cannot reach the new member at 127.0.0.1:1: tcp connect error",
            )
        };
        assert!(!is_connect_failure(&s()));
        for kind in [Kind::Read, Kind::Write] {
            assert!(matches!(
                classify(kind, s()),
                Verdict::Fail(Error::FailedPrecondition(_))
            ));
        }
        // A forwarding member that cannot connect to the leader: retried.
        assert!(retries(
            Kind::Write,
            Status::unavailable("forward to leader: tcp connect error")
        ));
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::with_seed(42);
        let mut base = BACKOFF_START;
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= base / 2 && d <= base,
                "{d:?} not in [{:?}, {base:?}]",
                base / 2
            );
            base = (base * 2).min(BACKOFF_CAP);
        }
        assert!(b.next_delay() <= BACKOFF_CAP);
    }
}
