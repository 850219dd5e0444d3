//! How sled's errors become capacitor [`Error`]s.

use std::path::Path;

use capacitor_core::{Error, ErrorKind, Operation};

/// A sled error in `op`, kept as the source.
pub(crate) fn sled_error(op: Operation, err: sled::Error) -> Error {
    let message = match &err {
        sled::Error::Io(_) => "sled I/O error",
        sled::Error::Corruption { .. } => "sled detected corruption in its files",
        sled::Error::CollectionNotFound(_) => "the sled tree no longer exists",
        sled::Error::Unsupported(_) => "sled rejected the operation as unsupported",
        sled::Error::ReportableBug(_) => "sled reported an internal bug",
    };
    Error::new(ErrorKind::Backend, op, message).with_source(err)
}

/// Whether `err` is sled's "the directory is locked" error. sled 0.34 reports it as an
/// `io::ErrorKind::Other` whose message starts with "could not acquire lock" (it wraps
/// the `WouldBlock` of `flock`), the same for another process and for a second open in
/// this process; the message is the only thing that tells it apart.
pub(crate) fn is_lock_error(err: &sled::Error) -> bool {
    matches!(err, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// An error opening the database at `path`, naming the path.
pub(crate) fn open_error(path: &Path, err: sled::Error) -> Error {
    let path = path.display();
    let (kind, message) = if is_lock_error(&err) {
        (
            ErrorKind::Unavailable,
            format!("the sled database at `{path}` is locked: another process (or another open handle in this process) has it open"),
        )
    } else {
        match &err {
            sled::Error::Io(_) => (
                ErrorKind::Backend,
                format!("cannot create or open the sled database at `{path}`"),
            ),
            sled::Error::Unsupported(_) => (
                ErrorKind::Config,
                format!("sled refused the configuration for the database at `{path}`"),
            ),
            sled::Error::Corruption { .. } => (
                ErrorKind::Backend,
                format!("the sled database at `{path}` is corrupt"),
            ),
            _ => (
                ErrorKind::Backend,
                format!("cannot open the sled database at `{path}`"),
            ),
        }
    };
    Error::new(kind, Operation::Build, message).with_source(err)
}

/// A failed sled transaction in `op` (the bodies never abort, so it is sled's error).
pub(crate) fn transaction_error(
    op: Operation,
    err: sled::transaction::TransactionError<std::convert::Infallible>,
) -> Error {
    match err {
        sled::transaction::TransactionError::Storage(e) => sled_error(op, e),
        sled::transaction::TransactionError::Abort(never) => match never {},
    }
}
