//! What the layer, its scan streams and its background tasks share: the open database and
//! the names of its tables, the [`Durability`] policy, and the helpers they all use
//! (transactions, decoding a stored value).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use capacitor_core::background::Stop;
use capacitor_core::{Error, ErrorKind, Operation, Result, SharedClock};
use redb::{ReadableDatabase, TableDefinition};

use crate::error::redb_error;

/// The default [`Durability`]: [`Durability::EveryMillis`]`(500)`, the window of the sled
/// layer's default, so that moving from one to the other keeps what a crash can lose.
const DEFAULT_DURABILITY: Durability = Durability::EveryMillis(500);

/// When the layer makes writes durable (fsync), and so what a crash can lose. Default:
/// [`Durability::EveryMillis`]`(500)`.
///
/// redb offers two commit levels: `Immediate` (the commit is on disk when it returns) and
/// `None` (the commit is visible at once, and reaches the disk with the next `Immediate`
/// commit). The policies combine them. "Crash" here means the process dies (a panic with
/// `abort`, `SIGKILL`, the OOM killer) or the machine loses power: a commit that was not
/// made durable is lost by either (redb reopens the file at its last durable commit), one
/// that was survives both. [`Layer::flush`] and [`Layer::close`] make every earlier write
/// durable under every policy.
///
/// [`Layer::flush`]: capacitor_core::Layer::flush
/// [`Layer::close`]: capacitor_core::Layer::close
///
/// # Examples
///
/// ```
/// use capacitor::redb::{Durability, RedbLayer};
///
/// let dir = tempfile::tempdir()?;
/// let layer = RedbLayer::builder()
///     .path(dir.path().join("cache.redb"))
///     .durability(Durability::Immediate)
///     .sweeper(false) // built outside a tokio runtime
///     .build::<String, String>()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every write (`set`, `delete`, the batch forms, `apply_atomic`) is a redb commit with
    /// `Durability::Immediate`: it returns once redb has fsynced it. A crash loses **no
    /// acknowledged write**. The slowest policy: one fsync per write; these writes run on
    /// tokio's blocking pool, off the async worker threads.
    Immediate,
    /// Writes commit with redb's `Durability::None` (visible at once, not yet durable), and
    /// a background thread of the layer makes them durable every this many milliseconds
    /// with an empty `Immediate` commit (only when something was written since the last
    /// one). A crash loses **the writes acknowledged in the last window** (up to this many
    /// milliseconds of writes, plus the commit in progress). Needs no tokio runtime.
    EveryMillis(u64),
    /// Writes commit with redb's `Durability::None`; nothing makes them durable until
    /// [`Layer::flush`](capacitor_core::Layer::flush) or
    /// [`Layer::close`](capacitor_core::Layer::close). A crash loses **every write since
    /// the last flush**: redb never writes a `None` commit's state as the durable one
    /// on its own (but for its clean close, when the layer's last handle is dropped). The file grows until the next flush, as redb frees the pages of
    /// non-durable commits only once a durable commit follows them.
    Manual,
}

impl Default for Durability {
    fn default() -> Self {
        DEFAULT_DURABILITY
    }
}

impl Durability {
    /// The redb commit level of a write under this policy.
    pub(crate) fn commit_level(self) -> redb::Durability {
        match self {
            Durability::Immediate => redb::Durability::Immediate,
            Durability::EveryMillis(_) | Durability::Manual => redb::Durability::None,
        }
    }
}

/// The definition of a table of the layer: raw bytes to raw bytes.
pub(crate) fn table(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

/// The names of the layer's tables.
#[derive(Debug)]
pub(crate) struct Names {
    /// The data table: key → envelope.
    pub(crate) data: String,
    /// The tag index (`<data>\0tags`, `<data>\0key-tags`), with tags on.
    pub(crate) tags: Option<TagNames>,
}

/// The names of the two tables of the tag index (see `crate::tags` for their layout).
#[derive(Debug)]
pub(crate) struct TagNames {
    /// `tag_len (u16 BE) ++ tag ++ key` → empty: the keys carrying a tag, by prefix.
    pub(crate) tags: String,
    /// `key` → the key's tags, each `len (u16 BE) ++ tag`: the source of truth.
    pub(crate) key_tags: String,
}

/// The open tables of one write transaction.
pub(crate) struct Tables<'t> {
    pub(crate) data: redb::Table<'t, &'static [u8], &'static [u8]>,
    /// With tags on.
    pub(crate) tags: Option<TagTables<'t>>,
}

/// The tag index inside a write transaction.
pub(crate) struct TagTables<'t> {
    pub(crate) tags: redb::Table<'t, &'static [u8], &'static [u8]>,
    pub(crate) key_tags: redb::Table<'t, &'static [u8], &'static [u8]>,
}

/// A handle on the open database and the layer's tables, cloned per operation: what a
/// transaction needs.
#[derive(Clone)]
pub(crate) struct Store {
    pub(crate) db: Arc<redb::Database>,
    pub(crate) names: Arc<Names>,
    pub(crate) durability: Durability,
    /// Set after a commit that is not durable yet; cleared by the commit that makes it so.
    pub(crate) dirty: Arc<AtomicBool>,
    /// Held by [`make_durable`](Self::make_durable) from clearing `dirty` until its commit
    /// is done, so that a second caller waits for that commit instead of returning as if
    /// its writes were durable already.
    pub(crate) durable: Arc<std::sync::Mutex<()>>,
    /// True while a durable (fsyncing) commit holds redb's write lock: a write that does
    /// not fsync itself then waits for the lock on tokio's blocking pool, not on a worker.
    pub(crate) committing: Arc<AtomicBool>,
}

impl Store {
    /// Runs `body` on a read transaction's data table, `None` when the table does not
    /// exist (the layer creates it when built; a caller's code may have deleted it since).
    pub(crate) fn read<R>(
        &self,
        op: Operation,
        body: impl FnOnce(Option<&redb::ReadOnlyTable<&'static [u8], &'static [u8]>>) -> Result<R>,
    ) -> Result<R> {
        let txn = self.db.begin_read().map_err(|e| redb_error(op, e))?;
        match txn.open_table(table(&self.names.data)) {
            Ok(t) => body(Some(&t)),
            Err(redb::TableError::TableDoesNotExist(_)) => body(None),
            Err(e) => Err(redb_error(op, e)),
        }
    }

    /// Runs `body` in one write transaction at redb commit level `level`, and commits it
    /// when `body` succeeds (a failed `body` aborts it: nothing is written).
    pub(crate) fn write_txn<R>(
        &self,
        op: Operation,
        level: redb::Durability,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<R>,
    ) -> Result<R> {
        let mut txn = self.db.begin_write().map_err(|e| redb_error(op, e))?;
        txn.set_durability(level).map_err(|e| redb_error(op, e))?;
        let out = body(&txn)?;
        txn.commit().map_err(|e| redb_error(op, e))?;
        if matches!(level, redb::Durability::None) {
            self.dirty.store(true, Ordering::Release);
        }
        Ok(out)
    }

    /// Runs `body` over the layer's tables in one write transaction at commit level
    /// `level`.
    pub(crate) fn write_at<R>(
        &self,
        op: Operation,
        level: redb::Durability,
        body: impl FnOnce(&mut Tables<'_>) -> Result<R>,
    ) -> Result<R> {
        self.write_txn(op, level, |txn| {
            let mut tables = open_tables(txn, &self.names, op)?;
            body(&mut tables)
        })
    }

    /// Runs `body` over the layer's tables in one write transaction, committed at the
    /// policy's level.
    pub(crate) fn write<R>(
        &self,
        op: Operation,
        body: impl FnOnce(&mut Tables<'_>) -> Result<R>,
    ) -> Result<R> {
        self.write_at(op, self.durability.commit_level(), body)
    }

    /// Makes every earlier commit durable: an empty `Immediate` commit, when a commit
    /// since the last one is not durable yet.
    pub(crate) fn make_durable(&self, op: Operation) -> Result<()> {
        // A poisoned lock only means another commit panicked: the flag is still right.
        let _one_at_a_time = self
            .durable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.committing.store(true, Ordering::Release);
        let done = self.write_txn(op, redb::Durability::Immediate, |_| Ok(()));
        self.committing.store(false, Ordering::Release);
        if done.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        done
    }
}

/// Opens (creating them if need be) the layer's tables in `txn`.
pub(crate) fn open_tables<'t>(
    txn: &'t redb::WriteTransaction,
    names: &Names,
    op: Operation,
) -> Result<Tables<'t>> {
    let open = |name: &str| txn.open_table(table(name)).map_err(|e| redb_error(op, e));
    let data = open(&names.data)?;
    let tags = match &names.tags {
        Some(t) => Some(TagTables {
            tags: open(&t.tags)?,
            key_tags: open(&t.key_tags)?,
        }),
        None => None,
    };
    Ok(Tables { data, tags })
}

/// Removes a file when dropped: the database of a layer built `temporary(true)`.
#[derive(Debug)]
pub(crate) struct TempFile(pub(crate) PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The background thread of [`Durability::EveryMillis`]: dropping the sender ends it.
pub(crate) struct Flusher {
    pub(crate) stop: std::sync::mpsc::Sender<()>,
    pub(crate) thread: std::thread::JoinHandle<()>,
}

/// What the layer, its scan streams and its background tasks share.
pub(crate) struct Shared<C> {
    /// `None` once closed.
    pub(crate) store: RwLock<Option<Store>>,
    pub(crate) codec: C,
    pub(crate) clock: SharedClock,
    pub(crate) durability: Durability,
    pub(crate) max_value_bytes: usize,
    pub(crate) persistent: bool,
    /// Built with `tags(true)`: the store names the tag index.
    pub(crate) tags: bool,
    /// Pulled on close; dropped with the layer: either ends the sweeper.
    pub(crate) stop: Stop,
    /// The periodic durable commit of `EveryMillis`; taken on close.
    pub(crate) flusher: Mutex<Option<Flusher>>,
    /// Declared last, so dropped after `store`: the file goes once the database is closed.
    pub(crate) _temporary: Option<TempFile>,
}

impl<C> Shared<C> {
    /// A handle on the database, or [`ErrorKind::Closed`]. The lock is held only to clone
    /// `Arc`s, so a panic can never poison it; the poison is ignored all the same.
    pub(crate) fn store(&self, op: Operation) -> Result<Store> {
        let store = self.store.read().unwrap_or_else(PoisonError::into_inner);
        match &*store {
            Some(s) => Ok(s.clone()),
            None => Err(Error::closed(op)),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    /// Runs `body` over the layer's tables in one write transaction at the policy's commit
    /// level: on tokio's blocking pool under [`Durability::Immediate`] (the commit
    /// fsyncs) and while another commit fsyncs (this one would wait for redb's write lock
    /// meanwhile), on the calling thread otherwise (a commit that does not fsync).
    pub(crate) async fn write<R: Send + 'static>(
        &self,
        op: Operation,
        body: impl FnOnce(&mut Tables<'_>) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let store = self.store(op)?;
        if self.durability == Durability::Immediate || store.committing.load(Ordering::Acquire) {
            blocking(op, move || store.write(op, body)).await
        } else {
            store.write(op, body)
        }
    }
}

/// Runs `work` on tokio's blocking pool (on the caller's thread when not on tokio).
pub(crate) async fn blocking<R: Send + 'static>(
    op: Operation,
    work: impl FnOnce() -> Result<R> + Send + 'static,
) -> Result<R> {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime
            .spawn_blocking(work)
            .await
            .map_err(|e| Error::new(ErrorKind::Backend, op, "the blocking task failed").with_source(e))?,
        Err(_) => work(),
    }
}
