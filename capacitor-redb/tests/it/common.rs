//! Shared by the redb tests: scratch databases that remove themselves, and raw access to
//! the tables behind a layer's back.

use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};

/// The layer's default table.
pub(crate) const DATA: &str = "capacitor";

/// A fresh database file per test, removed when the layer is dropped (with
/// `temporary(true)`).
pub(crate) fn scratch_path(id: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("capacitor-redb-{id}.redb"))
}

/// A database a test opened itself, in a directory removed with it.
pub(crate) struct Scratch {
    pub(crate) db: Arc<redb::Database>,
    _dir: tempfile::TempDir,
}

/// A database in a fresh temporary directory.
pub(crate) fn scratch_db() -> Scratch {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = redb::Database::create(dir.path().join("db.redb")).expect("create redb");
    Scratch {
        db: Arc::new(db),
        _dir: dir,
    }
}

fn def(table: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(table)
}

/// Writes `key` → `value` into `table`, as another writer would.
pub(crate) fn raw_insert(db: &redb::Database, table: &str, key: &[u8], value: &[u8]) {
    let txn = db.begin_write().expect("begin_write");
    txn.open_table(def(table))
        .expect("open_table")
        .insert(key, value)
        .expect("insert");
    txn.commit().expect("commit");
}

/// What `table` holds for `key`.
pub(crate) fn raw_get(db: &redb::Database, table: &str, key: &[u8]) -> Option<Vec<u8>> {
    let txn = db.begin_read().expect("begin_read");
    let table = match txn.open_table(def(table)) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return None,
        Err(e) => panic!("open_table: {e}"),
    };
    table.get(key).expect("get").map(|g| g.value().to_vec())
}

/// How many entries `table` holds (0 when it does not exist).
pub(crate) fn raw_len(db: &redb::Database, table: &str) -> u64 {
    let txn = db.begin_read().expect("begin_read");
    match txn.open_table(def(table)) {
        Ok(t) => t.len().expect("len"),
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => panic!("open_table: {e}"),
    }
}

/// The names of the database's tables.
pub(crate) fn table_names(db: &redb::Database) -> Vec<String> {
    use redb::TableHandle;
    let txn = db.begin_read().expect("begin_read");
    txn.list_tables()
        .expect("list_tables")
        .map(|t| t.name().to_owned())
        .collect()
}
