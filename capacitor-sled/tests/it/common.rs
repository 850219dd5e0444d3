//! Shared by the sled tests: scratch databases that remove themselves.

/// A fresh database directory per test, removed when the layer is dropped (with
/// `temporary(true)`).
pub(crate) fn scratch_dir(id: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("capacitor-sled-{id}"))
}

/// A database in a fresh directory, removed when the last handle is dropped.
pub(crate) fn scratch_db() -> sled::Db {
    sled::Config::new()
        .temporary(true)
        .open()
        .expect("open temporary sled")
}
