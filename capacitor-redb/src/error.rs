//! How redb's errors become capacitor [`Error`]s.

use std::path::Path;

use capacitor_core::{Error, ErrorKind, Operation};

/// A redb error in `op`, kept as the source. Every redb error type (`StorageError`,
/// `TransactionError`, `TableError`, `CommitError`, ...) converts into `redb::Error`.
pub(crate) fn redb_error(op: Operation, err: impl Into<redb::Error>) -> Error {
    let err: redb::Error = err.into();
    let (kind, message) = match &err {
        redb::Error::Io(_) => (ErrorKind::Backend, "redb I/O error"),
        redb::Error::Corrupted(_) => (ErrorKind::Backend, "redb detected corruption in its file"),
        redb::Error::DatabaseClosed => (ErrorKind::Closed, "the redb database is closed"),
        redb::Error::ValueTooLarge(_) => (ErrorKind::ValueTooLarge, "the value is larger than redb stores"),
        redb::Error::TableTypeMismatch { .. } | redb::Error::TypeDefinitionChanged { .. } => (
            ErrorKind::Config,
            "the redb table holds types other than capacitor's bytes",
        ),
        redb::Error::TableIsMultimap(_) => (ErrorKind::Config, "the redb table is a multimap table"),
        redb::Error::PreviousIo => (
            ErrorKind::Backend,
            "an earlier redb I/O error left the database unusable until it is reopened",
        ),
        _ => (ErrorKind::Backend, "redb failed"),
    };
    Error::new(kind, op, message).with_source(err)
}

/// Whether `err` is redb's "the file is locked" error: another process, or another open
/// handle in this process, has the file open (redb locks it with `flock`).
pub(crate) fn is_lock_error(err: &redb::DatabaseError) -> bool {
    matches!(err, redb::DatabaseError::DatabaseAlreadyOpen)
}

/// An error opening the database at `path`, naming the path.
pub(crate) fn open_error(path: &Path, err: redb::DatabaseError) -> Error {
    let path = path.display();
    let (kind, message) = match &err {
        redb::DatabaseError::DatabaseAlreadyOpen => (
            ErrorKind::Unavailable,
            format!("the redb database at `{path}` is locked: another process (or another open handle in this process) has it open"),
        ),
        redb::DatabaseError::LockProtocolMismatch => (
            ErrorKind::Unavailable,
            format!("the redb database at `{path}` is open in another process with an incompatible version of redb"),
        ),
        redb::DatabaseError::UpgradeRequired(_) => (
            ErrorKind::Config,
            format!("the redb database at `{path}` is in an older file format that must be upgraded first"),
        ),
        redb::DatabaseError::RepairAborted => (
            ErrorKind::Backend,
            format!("the redb database at `{path}` needs a repair, which was aborted"),
        ),
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => (
            ErrorKind::Backend,
            format!("the redb database at `{path}` is corrupt"),
        ),
        redb::DatabaseError::Storage(redb::StorageError::Io(_)) => (
            ErrorKind::Backend,
            format!("cannot create or open the redb database at `{path}`"),
        ),
        _ => (
            ErrorKind::Backend,
            format!("cannot open the redb database at `{path}`"),
        ),
    };
    Error::new(kind, Operation::Build, message).with_source(err)
}

/// An I/O error preparing `path` (its parent directories), naming the path.
pub(crate) fn path_error(path: &Path, err: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Backend,
        Operation::Build,
        format!("cannot create or open the redb database at `{}`", path.display()),
    )
    .with_source(err)
}
