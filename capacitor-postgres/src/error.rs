//! How tokio-postgres and deadpool errors become capacitor [`Error`]s.
//!
//! | cause | kind |
//! |---|---|
//! | connection refused / reset / closed, server shutting down or starting (`57P01`-`57P03`), class `08`, too many connections (`53300`) | [`ErrorKind::Unavailable`] |
//! | pool wait, create or recycle timeout; `statement_timeout` (`57014`); `lock_timeout` (`55P03`); connect timeout | [`ErrorKind::Timeout`] |
//! | serialization failure (`40001`), deadlock (`40P01`) | [`ErrorKind::Conflict`] |
//! | authentication (class `28`), unknown database (`3D000`) | [`ErrorKind::Config`] |
//! | the pool was closed | [`ErrorKind::Closed`] |
//! | out of resources (class `53`: disk full, out of memory) | [`ErrorKind::Unavailable`] |
//! | the data refused: data exception (class `22`), program limit exceeded (class `54`, an index row too large), integrity violation (class `23`) | [`ErrorKind::InvalidInput`] |
//! | anything else | [`ErrorKind::Backend`] |
//!
//! The original error is kept as the source. Messages never contain the connection URL
//! (nor its password): they name the operation and quote the server's message, or the
//! driver's error and its cause ("error connecting to server: Connection refused").

use capacitor_core::{Error, ErrorKind, Operation};
use deadpool_postgres::{PoolError, TimeoutType};

/// What kind of failure `err` is, and a short description of it.
fn classify(err: &tokio_postgres::Error) -> (ErrorKind, &'static str) {
    if let Some(code) = err.code() {
        let code = code.code();
        return match code {
            "57014" => (
                ErrorKind::Timeout,
                "the statement was cancelled (statement_timeout expired)",
            ),
            "55P03" => (ErrorKind::Timeout, "a lock was not available in time"),
            "40001" => (ErrorKind::Conflict, "serialization failure"),
            "40P01" => (ErrorKind::Conflict, "deadlock detected"),
            "57P01" | "57P02" => (ErrorKind::Unavailable, "the server is shutting down"),
            "57P03" => (
                ErrorKind::Unavailable,
                "the server is starting up or not accepting connections",
            ),
            "53300" => (ErrorKind::Unavailable, "the server has too many connections"),
            "3D000" => (ErrorKind::Config, "the database does not exist"),
            _ if code.starts_with("08") => (ErrorKind::Unavailable, "connection failure"),
            // Disk full, out of memory: the server may recover; the write is retried.
            _ if code.starts_with("53") => (ErrorKind::Unavailable, "the server is out of resources"),
            // The data itself is refused (a value out of range, a row too large for an
            // index, a violated constraint): retrying it cannot succeed.
            _ if code.starts_with("22") => (ErrorKind::InvalidInput, "PostgreSQL refused the data"),
            _ if code.starts_with("54") => (ErrorKind::InvalidInput, "the row exceeds a PostgreSQL limit"),
            _ if code.starts_with("23") => (ErrorKind::InvalidInput, "the row violates a constraint"),
            _ if code.starts_with("28") => (ErrorKind::Config, "authentication failed"),
            _ => (ErrorKind::Backend, "PostgreSQL error"),
        };
    }
    if err.is_closed() {
        return (ErrorKind::Unavailable, "the connection to PostgreSQL is closed");
    }
    let io = std::error::Error::source(err).and_then(|s| s.downcast_ref::<std::io::Error>());
    if let Some(io) = io {
        return match io.kind() {
            std::io::ErrorKind::TimedOut => (ErrorKind::Timeout, "timed out talking to PostgreSQL"),
            _ => (ErrorKind::Unavailable, "cannot reach PostgreSQL"),
        };
    }
    // tokio-postgres does not expose its error kinds; its connect timeout is told apart by
    // its (stable) text.
    if err.to_string() == "timeout waiting for server" {
        return (ErrorKind::Timeout, "connecting to PostgreSQL timed out");
    }
    (ErrorKind::Backend, "PostgreSQL client error")
}

/// A tokio-postgres error in `op`, kept as the source. The message quotes the server's
/// own message when there is one.
pub(crate) fn pg_error(op: Operation, err: tokio_postgres::Error) -> Error {
    pg_error_in(op, "", err)
}

/// As [`pg_error`], the message starting with `context`.
pub(crate) fn pg_error_in(op: Operation, context: &str, err: tokio_postgres::Error) -> Error {
    let (kind, what) = classify(&err);
    let message = match err.as_db_error() {
        Some(db) => format!(
            "{context}{what}: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        ),
        None => {
            // The driver's own text is often only its kind ("error connecting to server");
            // the cause (an I/O error such as "Connection refused") is its source.
            let shown = err.to_string();
            let cause = std::error::Error::source(&err)
                .map(|cause| cause.to_string())
                .and_then(|cause| cause.lines().next().map(str::to_owned))
                .filter(|cause| !cause.is_empty() && !shown.contains(cause.as_str()));
            match cause {
                Some(cause) => format!("{context}{what}: {shown}: {cause}"),
                None => format!("{context}{what}: {shown}"),
            }
        }
    };
    // The message quotes the server's message or the driver's cause: the source stays in
    // the chain without being said twice.
    Error::new(kind, op, message).with_described_source(err)
}

/// An error getting a connection from the pool in `op`.
pub(crate) fn pool_error(op: Operation, err: PoolError) -> Error {
    match err {
        PoolError::Timeout(TimeoutType::Wait) => Error::new(
            ErrorKind::Timeout,
            op,
            "no pooled connection became free within the pool's wait timeout",
        )
        .with_source(err),
        PoolError::Timeout(TimeoutType::Create) => Error::new(
            ErrorKind::Timeout,
            op,
            "connecting to PostgreSQL took longer than the pool's create timeout",
        )
        .with_source(err),
        PoolError::Timeout(TimeoutType::Recycle) => Error::new(
            ErrorKind::Timeout,
            op,
            "checking a pooled connection took longer than the pool's recycle timeout",
        )
        .with_source(err),
        PoolError::Closed => Error::closed(op),
        PoolError::Backend(e) => pg_error_in(op, "cannot open a connection: ", e),
        other => Error::new(ErrorKind::Backend, op, "the connection pool failed").with_source(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_errors_keep_their_meaning() {
        let kind = |e: PoolError| pool_error(Operation::Get, e).kind();
        assert_eq!(kind(PoolError::Timeout(TimeoutType::Wait)), ErrorKind::Timeout);
        assert_eq!(kind(PoolError::Timeout(TimeoutType::Create)), ErrorKind::Timeout);
        assert_eq!(kind(PoolError::Timeout(TimeoutType::Recycle)), ErrorKind::Timeout);
        assert_eq!(kind(PoolError::Closed), ErrorKind::Closed);
        assert_eq!(kind(PoolError::NoRuntimeSpecified), ErrorKind::Backend);
        let err = pool_error(Operation::Set, PoolError::Timeout(TimeoutType::Wait));
        assert_eq!(err.operation(), Operation::Set);
        assert!(err.is_temporary());
        assert!(
            std::error::Error::source(&err).is_some(),
            "deadpool's error is kept"
        );
    }
}
