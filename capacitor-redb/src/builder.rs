//! [`RedbLayerBuilder`]: the user's options, their validation, and opening the database.

use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use capacitor_core::background::Stop;
use capacitor_core::{
    system_clock, Clock, Codec, DefaultCodec, Error, ErrorKind, Operation, Result, SharedClock,
};

use crate::core::{open_tables, Durability, Flusher, Names, Shared, Store, TempFile};
use crate::error::{is_lock_error, open_error, path_error, redb_error};
use crate::layer::RedbLayer;
use crate::sweep;
use crate::tags;

// The defaults, listed on `RedbLayerBuilder` and on each setter.
const DEFAULT_TABLE: &str = "capacitor";
const DEFAULT_MAX_VALUE_BYTES: usize = 64 * 1024 * 1024;
const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_SWEEP_BATCH: usize = 1_000;
const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(1);

/// Builds a [`RedbLayer`]; [`build`](RedbLayerBuilder::build) validates every option and
/// opens the database.
///
/// Exactly one of [`path`](RedbLayerBuilder::path) (open or create a database file there)
/// or [`db`](RedbLayerBuilder::db) (use an already open database) is required.
///
/// Defaults:
///
/// - [`table`](Self::table): `capacitor`; [`temporary`](Self::temporary) `false`;
///   [`cache_capacity`](Self::cache_capacity) redb's 1 GiB (an upper bound, not an
///   allocation); [`lock_wait`](Self::lock_wait) 1 s
/// - [`durability`](Self::durability) [`Durability::EveryMillis`]`(500)`
/// - [`sweeper`](Self::sweeper) on, [`sweep_interval`](Self::sweep_interval) 60 s,
///   [`sweep_batch`](Self::sweep_batch) 1,000 entries
/// - [`max_value_bytes`](Self::max_value_bytes) 64 MiB
/// - [`codec`](Self::codec) [`DefaultCodec`]; [`clock`](Self::clock) the system clock
/// - [`tags`](Self::tags) off
///
/// The sweeper runs on a tokio task: build inside a tokio runtime, or turn it off with
/// [`sweeper(false)`](Self::sweeper) (expired entries are then removed when read).
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor::Layer;
/// use capacitor::redb::{Durability, RedbLayer};
/// use std::time::Duration;
///
/// let dir = tempfile::tempdir()?;
/// let layer = RedbLayer::builder()
///     .path(dir.path().join("cache.redb"))
///     .table("sessions")
///     .durability(Durability::EveryMillis(100))
///     .max_value_bytes(1024 * 1024)
///     .sweep_interval(Duration::from_secs(60))
///     .build::<String, Vec<u8>>()?;
/// layer.set(&"s:1".to_string(), &vec![1, 2, 3], Some(Duration::from_secs(3600))).await?;
/// layer.close().await?;
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
#[must_use]
pub struct RedbLayerBuilder<C = DefaultCodec> {
    path: Option<PathBuf>,
    db: Option<Arc<redb::Database>>,
    table: Option<String>,
    temporary: bool,
    cache_capacity: Option<usize>,
    durability: Durability,
    codec: C,
    max_value_bytes: usize,
    sweeper: bool,
    sweep_interval: Duration,
    sweep_batch: usize,
    lock_wait: Duration,
    clock: SharedClock,
    tags: bool,
}

impl<C: fmt::Debug> fmt::Debug for RedbLayerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbLayerBuilder")
            .field("path", &self.path)
            .field("db", &self.db.as_ref().map(|_| "redb::Database"))
            .field("table", &self.table)
            .field("temporary", &self.temporary)
            .field("cache_capacity", &self.cache_capacity)
            .field("durability", &self.durability)
            .field("codec", &self.codec)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("sweeper", &self.sweeper)
            .field("sweep_interval", &self.sweep_interval)
            .field("sweep_batch", &self.sweep_batch)
            .field("lock_wait", &self.lock_wait)
            .field("tags", &self.tags)
            .finish_non_exhaustive()
    }
}

impl RedbLayer<(), (), DefaultCodec> {
    /// A builder with the defaults listed on [`RedbLayerBuilder`].
    pub fn builder() -> RedbLayerBuilder {
        RedbLayerBuilder::new()
    }
}

impl RedbLayerBuilder<DefaultCodec> {
    fn new() -> Self {
        RedbLayerBuilder {
            path: None,
            db: None,
            table: None,
            temporary: false,
            cache_capacity: None,
            durability: Durability::default(),
            codec: DefaultCodec::default(),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            sweeper: true,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            sweep_batch: DEFAULT_SWEEP_BATCH,
            lock_wait: DEFAULT_LOCK_WAIT,
            clock: system_clock(),
            tags: false,
        }
    }
}

impl<C> RedbLayerBuilder<C> {
    /// Open (or create) the database file `path`, creating its missing parent directories;
    /// [`build`](Self::build) opens it and holds redb's lock on it until the layer is
    /// closed or dropped. Required, unless [`db`](Self::db) is given.
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Use a database the caller has already opened (and may keep using). Closing the
    /// layer drops the layer's handle, not the caller's. Required, unless
    /// [`path`](Self::path) is given.
    pub fn db(mut self, db: Arc<redb::Database>) -> Self {
        self.db = Some(db);
        self
    }

    /// Store entries in the redb table named `name`, so that several layers or other data
    /// can share one database. Default: `capacitor`.
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = Some(name.into());
        self
    }

    /// Delete the database file when the layer (its last handle) is dropped. For scratch
    /// caches and tests. Only with [`path`](Self::path) of a file that does not exist
    /// yet (an existing database is refused, not deleted). Such a layer does not report
    /// [`persistent`](capacitor_core::Capabilities::persistent). Default: `false`.
    pub fn temporary(mut self, temporary: bool) -> Self {
        self.temporary = temporary;
        self
    }

    /// The most memory redb's page cache may use, in bytes (more than zero). Only with
    /// [`path`](Self::path). Default: redb's, 1 GiB.
    pub fn cache_capacity(mut self, bytes: usize) -> Self {
        self.cache_capacity = Some(bytes);
        self
    }

    /// When writes are made durable; see [`Durability`] for what a crash can lose under
    /// each policy. Default: [`Durability::EveryMillis`]`(500)`.
    pub fn durability(mut self, policy: Durability) -> Self {
        self.durability = policy;
        self
    }

    /// The codec values are stored with. Default: [`DefaultCodec`].
    pub fn codec<C2>(self, codec: C2) -> RedbLayerBuilder<C2> {
        RedbLayerBuilder {
            path: self.path,
            db: self.db,
            table: self.table,
            temporary: self.temporary,
            cache_capacity: self.cache_capacity,
            durability: self.durability,
            codec,
            max_value_bytes: self.max_value_bytes,
            sweeper: self.sweeper,
            sweep_interval: self.sweep_interval,
            sweep_batch: self.sweep_batch,
            lock_wait: self.lock_wait,
            clock: self.clock,
            tags: self.tags,
        }
    }

    /// The largest encoded value (the codec's output, before the 13-byte envelope) a write
    /// accepts; larger ones fail with
    /// [`ErrorKind::ValueTooLarge`](capacitor_core::ErrorKind::ValueTooLarge) before
    /// anything is written. Default: 64 MiB.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// Whether to run the background sweeper, a tokio task that deletes expired entries
    /// every [`sweep_interval`](Self::sweep_interval) (without it, an expired entry that
    /// is never read again stays on disk). Each pass walks the whole table, deleting up to
    /// [`sweep_batch`](Self::sweep_batch) entries per write transaction on tokio's
    /// blocking pool; the task stops when the layer is closed or dropped. On,
    /// [`build`](Self::build) must run inside a tokio runtime. Default: `true`.
    pub fn sweeper(mut self, on: bool) -> Self {
        self.sweeper = on;
        self
    }

    /// How often the sweeper runs a pass. Default: 60 s.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// How many expired entries one sweep batch (one write transaction) deletes at most
    /// before it yields. Default: 1,000.
    pub fn sweep_batch(mut self, entries: usize) -> Self {
        self.sweep_batch = entries;
        self
    }

    /// How long [`build`](Self::build) keeps retrying when the file is locked, before it
    /// fails with [`ErrorKind::Unavailable`](capacitor_core::ErrorKind::Unavailable) (zero
    /// tries once). Only with [`path`](Self::path). Default: 1 s.
    ///
    /// redb releases its lock when the database is closed, which
    /// [`close`](capacitor_core::Layer::close) does once no sweep batch or scan page is in
    /// progress; the wait covers such a batch, and a restarted process starting while the
    /// old one exits. The wait is a sleep on the building thread (`build` is synchronous,
    /// like redb's open).
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// Whether the layer keeps tags ([`Layer::set_tagged`], [`Layer::remove_by_tag`]):
    /// two more redb tables next to the data table, `<table>\0tags` and
    /// `<table>\0key-tags`, written in the same write transaction as the data. Off, the
    /// layer declares no [`tags`](capacitor_core::Capabilities::tags) and its writes touch
    /// only the data table; on, every write also looks up the key's tags, to drop them (see
    /// the crate guide, "Tags"). A table whose keys still carry tags is refused with tags
    /// off ([`ErrorKind::Config`]): such writes would not drop those tags, and a later
    /// `remove_by_tag` would remove values written without them. Default: `false`.
    ///
    /// [`Layer::set_tagged`]: capacitor_core::Layer::set_tagged
    /// [`Layer::remove_by_tag`]: capacitor_core::Layer::remove_by_tag
    pub fn tags(mut self, on: bool) -> Self {
        self.tags = on;
        self
    }

    /// The clock expiries are computed and checked against (tests use
    /// [`ManualClock`](capacitor_core::ManualClock)). Default: the system clock.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Validates the options, opens the database (synchronously: redb's open reads the
    /// file's header, and after a crash repairs the file, which walks all of it), creates
    /// the layer's tables and starts the background work.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](capacitor_core::ErrorKind::Config), naming the field: neither
    /// or both of `path` and `db`, an empty `path` or one that is a directory, an empty
    /// `table`, a zero `cache_capacity`, `temporary` or `cache_capacity` with `db`,
    /// `temporary` on a path that exists already (it would be deleted on drop), a zero
    /// `max_value_bytes`, `sweep_interval` (with the sweeper on), `sweep_batch` or
    /// `EveryMillis` interval, a `durability` other than `Immediate` on a caller's
    /// database that redb shares between processes (it refuses non-durable commits
    /// there), or the `sweeper` (on by default) outside a tokio runtime (the message says
    /// to build inside a runtime or call `.sweeper(false)`).
    ///
    /// Opening, all with [`Operation::Build`](capacitor_core::Operation::Build), a message
    /// naming the path and redb's error as the source:
    /// [`ErrorKind::Unavailable`](capacitor_core::ErrorKind::Unavailable) when the file
    /// is locked by another process (or another open handle in this one);
    /// [`ErrorKind::Backend`](capacitor_core::ErrorKind::Backend) when it cannot be created
    /// or read, is not a redb database, or is corrupt;
    /// [`ErrorKind::Config`](capacitor_core::ErrorKind::Config) when its file format needs
    /// an upgrade, or the table holds other types than capacitor's bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::ErrorKind;
    /// use capacitor::redb::RedbLayer;
    ///
    /// let err = RedbLayer::builder().build::<String, String>().unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Config);
    ///
    /// let file = tempfile::NamedTempFile::new()?;
    /// let err = RedbLayer::builder()
    ///     .path(file.path().join("db.redb"))
    ///     .sweeper(false) // no tokio runtime here
    ///     .build::<String, String>()
    ///     .unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Backend);
    /// assert!(err.message().contains(&file.path().display().to_string()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn build<K, V>(self) -> Result<RedbLayer<K, V, C>>
    where
        C: Codec<V>,
    {
        self.validate()?;
        let runtime = if self.sweeper {
            Some(tokio::runtime::Handle::try_current().map_err(|e| {
                Error::config(
                    "sweeper",
                    "runs on a tokio task: build inside a tokio runtime, or call `.sweeper(false)`",
                )
                .with_source(e)
            })?)
        } else {
            None
        };

        let (db, persistent, temporary) = match (self.path, self.db) {
            (Some(path), None) => {
                if self.temporary && path.exists() {
                    // Deleting it on drop would destroy a database this layer did not create.
                    return Err(Error::config(
                        "temporary",
                        format!(
                            "{} exists already: a temporary layer creates its own file (and deletes it on drop)",
                            path.display()
                        ),
                    ));
                }
                let db = open(&path, self.cache_capacity, self.lock_wait)?;
                let temporary = self.temporary.then(|| TempFile(path));
                (Arc::new(db), temporary.is_none(), temporary)
            }
            (None, Some(db)) => (db, true, None),
            _ => return Err(Error::config("path", "give exactly one of `path` or `db`")),
        };
        let data = self.table.unwrap_or_else(|| DEFAULT_TABLE.to_owned());
        let data_name = data.clone();
        let names = Names {
            tags: self.tags.then(|| tags::names(&data)),
            data,
        };
        let store = Store {
            db,
            names: Arc::new(names),
            durability: self.durability,
            dirty: Arc::new(AtomicBool::new(false)),
            durable: Arc::new(std::sync::Mutex::new(())),
            committing: Arc::new(AtomicBool::new(false)),
        };
        check_commit_level(&store, self.durability)?;
        if !self.tags {
            refuse_kept_tags(&store, &data_name)?;
        }
        // Create the tables in a durable commit, so that readers and a reopen find them.
        store.write_txn(Operation::Build, redb::Durability::Immediate, |txn| {
            open_tables(txn, &store.names, Operation::Build).map(drop)
        })?;

        let shared = Arc::new(Shared {
            store: RwLock::new(Some(store)),
            codec: self.codec,
            clock: self.clock,
            durability: self.durability,
            max_value_bytes: self.max_value_bytes,
            persistent,
            tags: self.tags,
            stop: Stop::new(),
            flusher: Mutex::new(None),
            _temporary: temporary,
        });
        if let Durability::EveryMillis(ms) = self.durability {
            let (stop, receiver) = std::sync::mpsc::channel();
            let weak = Arc::downgrade(&shared);
            let thread = std::thread::Builder::new()
                .name("capacitor-redb-commit".to_owned())
                .spawn(move || sweep::durable_commits(weak, receiver, Duration::from_millis(ms)))
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Backend,
                        Operation::Build,
                        "cannot start the thread of `Durability::EveryMillis`",
                    )
                    .with_source(e)
                })?;
            *shared
                .flusher
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Flusher { stop, thread });
        }
        if let Some(runtime) = runtime {
            runtime.spawn(sweep::sweeper(
                Arc::downgrade(&shared),
                shared.stop.ticker(self.sweep_interval),
                self.sweep_batch,
            ));
        }
        Ok(RedbLayer {
            shared,
            _types: PhantomData,
        })
    }

    /// The checks that need no I/O.
    fn validate(&self) -> Result<()> {
        if self.max_value_bytes == 0 {
            return Err(Error::config("max_value_bytes", "must be greater than zero"));
        }
        if self.sweep_batch == 0 {
            return Err(Error::config("sweep_batch", "must be greater than zero"));
        }
        if self.sweeper && self.sweep_interval.is_zero() {
            return Err(Error::config("sweep_interval", "must be greater than zero"));
        }
        if self.durability == Durability::EveryMillis(0) {
            return Err(Error::config(
                "durability",
                "EveryMillis needs an interval greater than zero",
            ));
        }
        if self.cache_capacity == Some(0) {
            return Err(Error::config("cache_capacity", "must be greater than zero"));
        }
        if self.table.as_deref() == Some("") {
            return Err(Error::config("table", "is empty: name the redb table"));
        }
        if let Some(path) = &self.path {
            if path.as_os_str().is_empty() {
                return Err(Error::config("path", "is empty: name the database file"));
            }
            if path.is_dir() {
                return Err(Error::config(
                    "path",
                    format!(
                        "`{}` is a directory; redb keeps a database in one file: name a file in it",
                        path.display()
                    ),
                ));
            }
        }
        match (&self.path, &self.db) {
            (None, None) => Err(Error::config("path", "one of `path` or `db` is required")),
            (Some(_), Some(_)) => Err(Error::config("path", "give either `path` or `db`, not both")),
            (None, Some(_)) if self.temporary => Err(Error::config(
                "temporary",
                "only applies to a database opened with `path`",
            )),
            (None, Some(_)) if self.cache_capacity.is_some() => Err(Error::config(
                "cache_capacity",
                "only applies to a database opened with `path`",
            )),
            _ => Ok(()),
        }
    }
}

/// Refuses a policy whose commit level the database does not take: redb refuses
/// non-durable commits on a database it shares between processes.
fn check_commit_level(store: &Store, durability: Durability) -> Result<()> {
    let level = durability.commit_level();
    if matches!(level, redb::Durability::Immediate) {
        return Ok(());
    }
    let mut txn = store
        .db
        .begin_write()
        .map_err(|e| redb_error(Operation::Build, e))?;
    let refused = txn.set_durability(level);
    txn.abort().map_err(|e| redb_error(Operation::Build, e))?;
    refused.map_err(|e| {
        Error::config(
            "durability",
            "this database refuses non-durable commits (it is shared between processes): use `Durability::Immediate`",
        )
        .with_source(e)
    })
}

/// Opens (or creates) the database file at `path`, creating missing parent directories,
/// retrying while the file is locked for up to `wait` (see [`RedbLayerBuilder::lock_wait`]).
fn open(path: &Path, cache_capacity: Option<usize>, wait: Duration) -> Result<redb::Database> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::create_dir_all(parent).map_err(|e| path_error(path, e))?;
        }
    }
    let mut builder = redb::Builder::new();
    if let Some(bytes) = cache_capacity {
        builder.set_cache_size(bytes);
    }
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match builder.create(path) {
            Err(e) if is_lock_error(&e) && started.elapsed() < wait => {
                std::thread::sleep(pause.min(wait.saturating_sub(started.elapsed())));
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            result => return result.map_err(|e| open_error(path, e)),
        }
    }
}

/// Refuses to open without tags a table whose keys carry tags from a layer built with
/// them: its writes would not drop those tags, and a later `remove_by_tag` (with tags on
/// again) would remove values written since without the tag.
fn refuse_kept_tags(store: &Store, data: &str) -> Result<()> {
    use redb::{ReadableDatabase, ReadableTableMetadata};
    let op = Operation::Build;
    let names = tags::names(data);
    let txn = store.db.begin_read().map_err(|e| redb_error(op, e))?;
    let kept = match txn.open_table(crate::core::table(&names.key_tags)) {
        Ok(t) => t.len().map_err(|e| redb_error(op, e))?,
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => return Err(redb_error(op, e)),
    };
    if kept > 0 {
        return Err(Error::config(
            "tags",
            format!(
                "table `{data}` holds the tags of {kept} keys, written by a layer built with \
                 `.tags(true)`: build with `.tags(true)` (writes without it would leave those tags \
                 behind), or clear the table"
            ),
        ));
    }
    Ok(())
}
