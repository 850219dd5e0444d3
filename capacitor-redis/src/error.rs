//! How fred errors become capacitor [`Error`]s.
//!
//! | cause | kind |
//! |---|---|
//! | I/O (connection refused, reset), cancelled by a disconnect, backpressure | [`ErrorKind::Unavailable`] |
//! | fred's command timeout | [`ErrorKind::Timeout`] |
//! | bad URL or configuration, authentication | [`ErrorKind::Config`] |
//! | `WRONGTYPE` replies | [`ErrorKind::Decode`] |
//! | `EXECABORT` / aborted transactions | [`ErrorKind::Conflict`] |
//! | anything else | [`ErrorKind::Backend`] |
//!
//! The original error is kept as the source (its details follow the message in
//! `Display`). Messages never contain the URL's secrets.

use capacitor_core::{Error, ErrorKind, Operation};
use fred::error::{Error as FredError, ErrorKind as FredKind};

/// Whether a server reply says the key holds another type than a string.
pub(crate) fn is_wrongtype(err: &FredError) -> bool {
    err.details().starts_with("WRONGTYPE")
}

/// A fred error in `op`, kept as the source.
pub(crate) fn redis_error(op: Operation, err: FredError) -> Error {
    let (kind, what) = match err.kind() {
        FredKind::IO | FredKind::Canceled | FredKind::Backpressure => {
            (ErrorKind::Unavailable, "cannot reach Redis")
        }
        FredKind::Timeout => (ErrorKind::Timeout, "Redis did not answer in time"),
        FredKind::Config | FredKind::Url => (ErrorKind::Config, "invalid Redis configuration"),
        FredKind::Auth => (ErrorKind::Config, "Redis authentication failed"),
        _ if is_wrongtype(&err) => (ErrorKind::Decode, "the key holds a non-string Redis type"),
        _ if err.details().starts_with("EXECABORT") => (ErrorKind::Conflict, "the transaction was aborted"),
        _ => (ErrorKind::Backend, "Redis error"),
    };
    Error::new(kind, op, what).with_source(Cause(std::sync::Arc::new(err)))
}

/// A fred error as the source of a capacitor [`Error`]: shown as its details alone
/// (`Connection refused (os error 111)`, not `IO Error: Connection refused …`), with
/// fred's error as its own source, for callers that downcast.
#[derive(Debug)]
pub(crate) struct Cause(pub(crate) std::sync::Arc<FredError>);

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let details = self.0.details();
        if details.is_empty() {
            write!(f, "{}", self.0)
        } else {
            f.write_str(&readable_io_error(details))
        }
    }
}

/// fred keeps an I/O error as its `Debug` text (`Os { code: 111, kind:
/// ConnectionRefused, message: "Connection refused" }`, `Custom { kind: Uncategorized,
/// error: "failed to lookup address information: …" }`): its `Display` form
/// (`Connection refused (os error 111)`, `failed to lookup address information: …`).
/// Anything else is returned as it is.
fn readable_io_error(details: &str) -> std::borrow::Cow<'_, str> {
    /// The quoted string after `field: "` (escapes as `Debug` writes them, undone).
    fn quoted(text: &str, field: &str) -> Option<String> {
        let start = text.find(&format!("{field}: \""))? + field.len() + 3;
        let mut out = String::new();
        let mut chars = text[start..].chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Some(out),
                '\\' => out.push(chars.next()?),
                c => out.push(c),
            }
        }
        None
    }
    if details.starts_with("Os {") {
        let code = details
            .split_once("code: ")
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next());
        if let (Some(message), Some(code)) = (quoted(details, "message"), code) {
            return format!("{message} (os error {code})").into();
        }
    } else if details.starts_with("Custom {") {
        if let Some(error) = quoted(details, "error") {
            return error.into();
        }
    }
    details.into()
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The error of an operation that did not finish within the command timeout.
pub(crate) fn timeout_error(op: Operation, timeout: std::time::Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        op,
        format!("Redis did not answer within the command timeout ({timeout:?})"),
    )
}

/// `url` with any password replaced by `***`, for `Debug` output and error messages.
///
/// The userinfo runs to the *last* `@`: a password may hold `@`, `/`, `?` or `#` that were
/// not percent-encoded (the URL then does not parse as meant, but the secret is still
/// the user's). Query parameters named like a password (`sentinelPassword`) are redacted
/// too, and a string without `://` is not shown at all (there is no telling where a
/// secret would be in it).
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return "<not shown: not a URL>".to_owned();
    };
    let (scheme, rest) = url.split_at(scheme_end);
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    let tail = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None if userinfo.is_empty() => {}
                // `redis://secret@host` puts the password where the user would be.
                None => out.push_str("***"),
            }
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    match tail.split_once('?') {
        Some((before, query)) => {
            out.push_str(before);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((name, _)) if name.to_ascii_lowercase().contains("password") => {
                        format!("{name}=***")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(tail),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://user:hunter2@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("rediss://:hunter2@host"), "rediss://:***@host");
        assert_eq!(redact_url("redis://hunter2@host"), "redis://***@host");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact_url("redis://host:6379/0"), "redis://host:6379/0");
        // Unencoded `@`, `/`, `?`, `#` in the password.
        assert_eq!(redact_url("redis://u:p@ss@host/0"), "redis://u:***@host/0");
        assert_eq!(redact_url("redis://u:pa/ss@host:1/0"), "redis://u:***@host:1/0");
        assert_eq!(redact_url("redis://u:p?a#ss@host"), "redis://u:***@host");
        assert_eq!(
            redact_url("redis-sentinel://h:1/0?sentinelServiceName=m&sentinelPassword=hunter2"),
            "redis-sentinel://h:1/0?sentinelServiceName=m&sentinelPassword=***"
        );
        assert_eq!(redact_url("user:hunter2@host"), "<not shown: not a URL>");
    }

    #[test]
    fn io_errors_read_as_their_display() {
        let refused = std::io::Error::from_raw_os_error(111);
        let details = format!("{refused:?}");
        assert_eq!(readable_io_error(&details), refused.to_string());
        let dns = std::io::Error::other("failed to lookup address information: Name or service not known");
        assert_eq!(
            readable_io_error(&format!("{dns:?}")),
            "failed to lookup address information: Name or service not known"
        );
        let quoted = std::io::Error::other("a \"quoted\" word");
        assert_eq!(readable_io_error(&format!("{quoted:?}")), "a \"quoted\" word");
        assert_eq!(
            readable_io_error("ERR DB index is out of range"),
            "ERR DB index is out of range"
        );
        assert_eq!(readable_io_error("Os { broken"), "Os { broken");
    }

    #[test]
    fn kinds_are_mapped() {
        let k = |kind, msg: &str| redis_error(Operation::Get, FredError::new(kind, msg.to_owned())).kind();
        assert_eq!(k(FredKind::IO, "refused"), ErrorKind::Unavailable);
        assert_eq!(k(FredKind::Timeout, "t"), ErrorKind::Timeout);
        assert_eq!(
            k(FredKind::InvalidArgument, "WRONGTYPE Operation against a key"),
            ErrorKind::Decode
        );
        assert_eq!(k(FredKind::Unknown, "x"), ErrorKind::Backend);
    }
}
