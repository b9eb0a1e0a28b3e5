//! The error type returned by every [`Client`](crate::Client) call.

use tonic::{Code, Status};

/// Everything that can go wrong talking to a lockd cluster.
///
/// Server-side failures keep the server's message. Use the `is_*` helpers or
/// match on the variants (the enum is `#[non_exhaustive]`, so keep a
/// catch-all arm).
///
/// ```
/// use lockd_client::Error;
///
/// let e = Error::NotFound("/jobs/42: not found".into());
/// assert!(e.is_not_found());
/// assert_eq!(e.message(), "/jobs/42: not found");
/// assert_eq!(e.to_string(), "not found: /jobs/42: not found");
/// ```
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use lockd_client::Error;
///
/// match client.delete("/jobs/42").await {
///     Ok(_) => {}
///     Err(e) if e.is_not_found() => {} // already gone
///     Err(Error::Ambiguous(m)) => eprintln!("may or may not be deleted: {m}"),
///     Err(e) => {
///         eprintln!("{e} (gRPC code {:?})", e.code());
///         return Err(e);
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The node does not exist (gRPC `NOT_FOUND`).
    #[error("not found: {0}")]
    NotFound(String),
    /// The node already exists (gRPC `ALREADY_EXISTS`).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// A precondition such as an expected version did not hold, or the
    /// cluster is not in a state that allows the call (gRPC
    /// `FAILED_PRECONDITION`).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The request was malformed, e.g. a bad path (gRPC `INVALID_ARGUMENT`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No member could serve the request before the retry budget ran out.
    /// For writes this error means the write was **not** applied.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A write failed in a way that does not tell whether it was applied
    /// (timeout, connection lost after the request was sent, ...). It was not
    /// retried; read the affected nodes to find out.
    #[error("the write may or may not have been applied: {0}")]
    Ambiguous(String),
    /// A watch asked for a revision older than the retained history;
    /// `oldest` is the oldest revision still available.
    #[error("compacted: {message}")]
    Compacted {
        /// The oldest revision a watch can start from.
        oldest: u64,
        /// The server's message.
        message: String,
    },
    /// The session a recipe (lock, election) relies on is lost, or its node
    /// was deleted: whatever it held must be assumed gone.
    #[error("session lost: {0}")]
    SessionLost(String),
    /// An endpoint could not be parsed, or no endpoint was given.
    #[error("invalid endpoint: {0}")]
    InvalidEndpoint(String),
    /// Any other gRPC status (permission, internal error, ...).
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(Status),
}

impl Error {
    /// The gRPC status code this error corresponds to, when there is one.
    ///
    /// `Ambiguous` maps to `UNKNOWN` and `InvalidEndpoint` to `None`.
    pub fn code(&self) -> Option<Code> {
        Some(match self {
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Ambiguous(_) => Code::Unknown,
            Error::Compacted { .. } => Code::OutOfRange,
            Error::SessionLost(_) => Code::Aborted,
            Error::InvalidEndpoint(_) => return None,
            Error::Rpc(s) => s.code(),
        })
    }

    /// The message without the kind prefix (the server's message for
    /// server-side errors).
    pub fn message(&self) -> &str {
        match self {
            Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::FailedPrecondition(m)
            | Error::InvalidArgument(m)
            | Error::Unavailable(m)
            | Error::Ambiguous(m)
            | Error::InvalidEndpoint(m)
            | Error::SessionLost(m)
            | Error::Compacted { message: m, .. } => m,
            Error::Rpc(s) => s.message(),
        }
    }

    /// True for [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound(_))
    }

    /// True for [`Error::AlreadyExists`].
    pub fn is_already_exists(&self) -> bool {
        matches!(self, Error::AlreadyExists(_))
    }

    /// True for [`Error::FailedPrecondition`].
    pub fn is_failed_precondition(&self) -> bool {
        matches!(self, Error::FailedPrecondition(_))
    }

    /// True for [`Error::Unavailable`].
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }

    /// True for [`Error::SessionLost`].
    pub fn is_session_lost(&self) -> bool {
        matches!(self, Error::SessionLost(_))
    }

    /// True for [`Error::Ambiguous`]: a write whose outcome is unknown.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, Error::Ambiguous(_))
    }
}

impl From<Status> for Error {
    /// Maps a status by code only; the retry layer decides separately
    /// whether a failed write is [`Error::Ambiguous`].
    fn from(s: Status) -> Self {
        let msg = s.message().to_string();
        match s.code() {
            Code::NotFound => Error::NotFound(msg),
            Code::AlreadyExists => Error::AlreadyExists(msg),
            Code::FailedPrecondition => Error::FailedPrecondition(msg),
            Code::InvalidArgument => Error::InvalidArgument(msg),
            Code::Unavailable => Error::Unavailable(msg),
            _ => Error::Rpc(s),
        }
    }
}

/// Lower-case, human-readable name of a gRPC code.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_codes_and_keeps_message() {
        let e: Error = Status::not_found("/x: not found").into();
        assert!(matches!(&e, Error::NotFound(m) if m == "/x: not found"));
        assert_eq!(e.code(), Some(Code::NotFound));
        assert_eq!(e.message(), "/x: not found");
        assert!(e.is_not_found());

        assert!(Error::from(Status::already_exists("a")).is_already_exists());
        assert!(Error::from(Status::failed_precondition("v")).is_failed_precondition());
        assert!(matches!(
            Error::from(Status::invalid_argument("p")),
            Error::InvalidArgument(_)
        ));
        assert!(Error::from(Status::unavailable("no leader")).is_unavailable());
        let e = Error::from(Status::internal("boom"));
        assert!(matches!(&e, Error::Rpc(s) if s.code() == Code::Internal));
        assert_eq!(e.to_string(), "internal: boom");
        assert_eq!(e.code(), Some(Code::Internal));
    }

    #[test]
    fn display() {
        assert_eq!(
            Error::Ambiguous("timed out".into()).to_string(),
            "the write may or may not have been applied: timed out"
        );
        assert_eq!(Error::NotFound("/a".into()).to_string(), "not found: /a");
        assert_eq!(Error::InvalidEndpoint("x".into()).code(), None);
    }
}
