//! The one error type every layer and the composer return.

use std::borrow::Cow;
use std::fmt;

/// A boxed error source kept inside [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used across capacitor.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, as a caller can branch on it.
///
/// New kinds may be added in minor releases, so match with a wildcard arm.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A builder or configuration value is invalid (names the field in the message).
    Config,
    /// An argument to an operation is invalid (for example a zero TTL).
    InvalidInput,
    /// The layer does not offer this capability (scan, transactions, ...).
    Unsupported,
    /// The layer or composer was closed; no further operations are accepted.
    Closed,
    /// A value could not be encoded before it was sent to a layer.
    Encode,
    /// Stored bytes could not be decoded (another writer, a changed type). The composer
    /// treats this as a miss and counts it.
    Decode,
    /// A value is larger than the layer's configured maximum.
    ValueTooLarge,
    /// The operation did not finish within its timeout.
    Timeout,
    /// The backend cannot be reached right now (connection refused, not yet connected).
    Unavailable,
    /// A bounded queue is full and the wait for room expired.
    QueueFull,
    /// A transaction could not be committed (conflict, aborted by the backend).
    Conflict,
    /// Any other backend failure; see the source.
    Backend,
}

impl ErrorKind {
    /// A short lowercase name, stable for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Closed => "closed",
            ErrorKind::Encode => "encode",
            ErrorKind::Decode => "decode",
            ErrorKind::ValueTooLarge => "value_too_large",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Backend => "backend",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operation an error happened in.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Building a layer or a composer.
    Build,
    /// `get`.
    Get,
    /// `set` / `set_with`.
    Set,
    /// `delete`.
    Delete,
    /// `exists`.
    Exists,
    /// `get_many`.
    GetMany,
    /// `set_many`.
    SetMany,
    /// `delete_many`.
    DeleteMany,
    /// `scan`.
    Scan,
    /// Applying a batch atomically (transactions).
    Transaction,
    /// `flush`.
    Flush,
    /// `close`.
    Close,
    /// Connecting / health checking.
    Connect,
    /// `clear`: removing every entry.
    Clear,
    /// Sending an invalidation-bus message.
    Publish,
    /// Receiving invalidation-bus messages.
    Subscribe,
}

impl Operation {
    /// A short lowercase name, stable for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Build => "build",
            Operation::Get => "get",
            Operation::Set => "set",
            Operation::Delete => "delete",
            Operation::Exists => "exists",
            Operation::GetMany => "get_many",
            Operation::SetMany => "set_many",
            Operation::DeleteMany => "delete_many",
            Operation::Scan => "scan",
            Operation::Transaction => "transaction",
            Operation::Flush => "flush",
            Operation::Close => "close",
            Operation::Connect => "connect",
            Operation::Clear => "clear",
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error from a layer or from the composer.
///
/// It names the layer (when known) and the operation, carries a message and keeps the
/// underlying error as its [`source`](std::error::Error::source).
///
/// # Examples
///
/// ```
/// use capacitor::{Error, ErrorKind, Operation};
///
/// let err = Error::new(ErrorKind::Timeout, Operation::Get, "no answer in 50ms").with_layer("redis");
/// assert_eq!(err.kind(), ErrorKind::Timeout);
/// assert_eq!(err.layer(), Some("redis"));
/// assert!(err.is_temporary());
/// assert_eq!(err.to_string(), "timeout in get on layer `redis`: no answer in 50ms");
/// ```
///
/// One pointer wide (the details are boxed), so that `Result<Option<V>>` stays small on the
/// hit path, where errors are rare.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(Box<Details>);

#[derive(Debug, thiserror::Error)]
#[error("{kind} in {op}{}: {message}{}", DisplayLayer(.layer), DisplayCause(.source, .message, *.described))]
struct Details {
    kind: ErrorKind,
    op: Operation,
    layer: Option<Cow<'static, str>>,
    message: Cow<'static, str>,
    #[source]
    source: Option<BoxError>,
    /// The message already says what the source is (see `with_described_source`).
    described: bool,
    circuit_open: bool,
}

struct DisplayLayer<'a>(&'a Option<Cow<'static, str>>);

impl fmt::Display for DisplayLayer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(name) => write!(f, " on layer `{name}`"),
            None => Ok(()),
        }
    }
}

/// The first line of the underlying error, after the message (unless the message already
/// says it), so that a log line that prints only `Display` still names the cause. A source
/// that is itself a capacitor [`Error`] (a batch's first failure, a shared loader error)
/// contributes its own cause, not its whole text, which the message already carries.
struct DisplayCause<'a>(&'a Option<BoxError>, &'a Cow<'static, str>, bool);

impl fmt::Display for DisplayCause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.2 {
            return Ok(());
        }
        let Some(first) = self.0.as_deref().and_then(cause_line) else {
            return Ok(());
        };
        if self.1.contains(first.as_str()) {
            return Ok(());
        }
        write!(f, " ({first})")
    }
}

/// The first non-empty line of `source`, looking through capacitor's own errors to theirs.
fn cause_line(source: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<String> {
    if let Some(inner) = source.downcast_ref::<Error>() {
        return inner.0.source.as_deref().and_then(cause_line);
    }
    if let Some(nested) = source.downcast_ref::<Nested>() {
        return nested.0 .0.source.as_deref().and_then(cause_line);
    }
    let text = source.to_string();
    let first = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(first.to_owned())
}

/// An [`Error`] shared by several callers (one loader's failure handed to all its
/// waiters), as the source of each caller's own error: displays and chains as the shared
/// one does.
#[derive(Debug, Clone)]
pub(crate) struct Nested(pub(crate) std::sync::Arc<Error>);

impl fmt::Display for Nested {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Nested {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

impl Error {
    /// A new error of `kind` in `op` with a human-readable message.
    pub fn new(kind: ErrorKind, op: Operation, message: impl Into<Cow<'static, str>>) -> Self {
        Error(Box::new(Details {
            kind,
            op,
            layer: None,
            message: message.into(),
            source: None,
            described: false,
            circuit_open: false,
        }))
    }

    /// The error of an operation that skipped a layer because its circuit breaker is open
    /// (kind [`ErrorKind::Unavailable`]; see [`Error::is_circuit_open`]).
    pub fn circuit_open(op: Operation, layer: impl Into<Cow<'static, str>>) -> Self {
        let mut err = Error::new(
            ErrorKind::Unavailable,
            op,
            "circuit breaker open: the layer is skipped until its cool-down ends",
        )
        .with_layer(layer);
        err.0.circuit_open = true;
        err
    }

    /// One caller's copy of `shared`, an error several callers share (a read batch's):
    /// its kind, layer, message and circuit-open flag, in `op`, with `shared` as the
    /// source.
    pub(crate) fn copy_for(shared: &std::sync::Arc<Error>, op: Operation) -> Self {
        let d = &shared.0;
        Error(Box::new(Details {
            kind: d.kind,
            op,
            layer: d.layer.clone(),
            message: d.message.clone(),
            source: Some(Box::new(Nested(std::sync::Arc::clone(shared)))),
            described: false,
            circuit_open: d.circuit_open,
        }))
    }

    /// Whether the layer was not asked at all because its circuit breaker is open.
    pub fn is_circuit_open(&self) -> bool {
        self.0.circuit_open
    }

    /// Shorthand for an [`ErrorKind::Unsupported`] error.
    pub fn unsupported(op: Operation, what: &'static str) -> Self {
        Error::new(ErrorKind::Unsupported, op, what)
    }

    /// Shorthand for an [`ErrorKind::Closed`] error.
    pub fn closed(op: Operation) -> Self {
        Error::new(ErrorKind::Closed, op, "the layer is closed")
    }

    /// Shorthand for an [`ErrorKind::Config`] error naming the offending field.
    pub fn config(field: &str, problem: impl fmt::Display) -> Self {
        Error::new(
            ErrorKind::Config,
            Operation::Build,
            format!("`{field}`: {problem}"),
        )
    }

    /// Attach the underlying error; the first line of its text is shown after the
    /// message (unless the message already contains it).
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.0.source = Some(source.into());
        self
    }

    /// Attach the underlying error that the message already describes in its own words:
    /// kept as the [`source`](std::error::Error::source), not repeated in `Display`.
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::{Error, ErrorKind, Operation};
    ///
    /// let io = std::io::Error::other("connection reset by peer");
    /// let err = Error::new(ErrorKind::Unavailable, Operation::Get, "the server hung up")
    ///     .with_described_source(io);
    /// assert_eq!(err.to_string(), "unavailable in get: the server hung up");
    /// assert!(std::error::Error::source(&err).is_some());
    /// ```
    #[must_use]
    pub fn with_described_source(mut self, source: impl Into<BoxError>) -> Self {
        self.0.source = Some(source.into());
        self.0.described = true;
        self
    }

    /// Name the layer the error happened in (replaces any earlier name).
    #[must_use]
    pub fn with_layer(mut self, layer: impl Into<Cow<'static, str>>) -> Self {
        self.0.layer = Some(layer.into());
        self
    }

    /// Replace the operation (used by the composer when a batch call fails inside a loop).
    #[must_use]
    pub fn with_operation(mut self, op: Operation) -> Self {
        self.0.op = op;
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The operation that failed.
    pub fn operation(&self) -> Operation {
        self.0.op
    }

    /// The layer that failed, when known.
    pub fn layer(&self) -> Option<&str> {
        self.0.layer.as_deref()
    }

    /// The message, without kind, operation and layer.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// Whether retrying the same operation later may succeed (timeouts, an unreachable
    /// backend, a full queue, a transaction conflict).
    pub fn is_temporary(&self) -> bool {
        matches!(
            self.0.kind,
            ErrorKind::Timeout | ErrorKind::Unavailable | ErrorKind::QueueFull | ErrorKind::Conflict
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_kind_operation_layer_and_keeps_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::new(ErrorKind::Unavailable, Operation::Set, "cannot connect")
            .with_layer("redis")
            .with_source(io);
        assert_eq!(
            err.to_string(),
            "unavailable in set on layer `redis`: cannot connect (refused)"
        );
        let source = std::error::Error::source(&err).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("refused"));
        assert!(err.is_temporary());
        assert!(!Error::closed(Operation::Get).is_temporary());
    }

    #[test]
    fn display_names_only_the_first_line_of_a_cause_once() {
        let two_lines = std::io::Error::other("connection refused\nat 127.0.0.1:1");
        let err = Error::new(ErrorKind::Unavailable, Operation::Get, "no Redis").with_source(two_lines);
        assert_eq!(
            err.to_string(),
            "unavailable in get: no Redis (connection refused)"
        );
        let said = std::io::Error::other("refused");
        let err = Error::new(ErrorKind::Unavailable, Operation::Get, "refused").with_source(said);
        assert_eq!(err.to_string(), "unavailable in get: refused");
        // A capacitor error as the source: its cause, once, not its whole text again.
        let inner = Error::new(ErrorKind::Backend, Operation::Get, "the loader failed")
            .with_source(std::io::Error::other("boom"));
        let outer = Error::new(ErrorKind::Backend, Operation::Get, "the loader failed")
            .with_source(Nested(std::sync::Arc::new(inner)));
        assert_eq!(outer.to_string(), "backend in get: the loader failed (boom)");
        let first = Error::new(ErrorKind::Decode, Operation::Get, "bad bytes")
            .with_source(std::io::Error::other("\n  truncated"));
        let batch = Error::new(
            ErrorKind::Decode,
            Operation::GetMany,
            format!("2 values did not decode; first: {first}"),
        )
        .with_source(first);
        assert_eq!(
            batch.to_string(),
            "decode in get_many: 2 values did not decode; first: decode in get: bad bytes (truncated)"
        );
    }

    #[test]
    fn config_error_names_the_field() {
        let err = Error::config("layers[1].ttl", "must be greater than zero");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("`layers[1].ttl`"));
    }
}
