//! [`SledLayerBuilder`]: the user's options, their validation, and opening the database.

use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// sled's page cache refuses (panics on) capacities below this.
const MIN_CACHE_CAPACITY: u64 = 256;

use capacitor_core::background::Stop;
use capacitor_core::{system_clock, Clock, Codec, DefaultCodec, Error, Result, SharedClock};

use crate::core::{FlushPolicy, Handles, Shared, TagTrees};
use crate::error::{is_lock_error, open_error, sled_error};
use crate::layer::SledLayer;
use crate::sweep;
use crate::tags;

// The defaults, listed on `SledLayerBuilder` and on each setter.
const DEFAULT_MAX_VALUE_BYTES: usize = 64 * 1024 * 1024;
const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_SWEEP_BATCH: usize = 1_000;
const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(1);

/// Builds a [`SledLayer`]; [`build`](SledLayerBuilder::build) validates every option
/// and opens the database.
///
/// Exactly one of [`path`](SledLayerBuilder::path) (open a database there) or
/// [`db`](SledLayerBuilder::db) (use an already open database) is required.
///
/// Defaults:
///
/// - [`tree`](Self::tree): the database's default tree; [`temporary`](Self::temporary)
///   `false`; [`cache_capacity`](Self::cache_capacity) sled's 1 GiB (an upper bound, not
///   an allocation); [`lock_wait`](Self::lock_wait) 1 s
/// - [`flush_policy`](Self::flush_policy) [`FlushPolicy::EveryMillis`]`(500)`
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
/// use capacitor::sled::{FlushPolicy, SledLayer};
/// use std::time::Duration;
///
/// let dir = tempfile::tempdir()?;
/// let layer = SledLayer::builder()
///     .path(dir.path().join("cache"))
///     .tree("sessions")
///     .flush_policy(FlushPolicy::EveryMillis(100))
///     .max_value_bytes(1024 * 1024)
///     .sweep_interval(Duration::from_secs(60))
///     .build::<String, Vec<u8>>()?;
/// layer.set(&"s:1".to_string(), &vec![1, 2, 3], Some(Duration::from_secs(3600))).await?;
/// layer.close().await?;
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
#[must_use]
pub struct SledLayerBuilder<C = DefaultCodec> {
    path: Option<PathBuf>,
    db: Option<sled::Db>,
    tree: Option<String>,
    temporary: bool,
    cache_capacity: Option<u64>,
    flush_policy: FlushPolicy,
    codec: C,
    max_value_bytes: usize,
    sweeper: bool,
    sweep_interval: Duration,
    sweep_batch: usize,
    lock_wait: Duration,
    clock: SharedClock,
    tags: bool,
}

impl<C: fmt::Debug> fmt::Debug for SledLayerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledLayerBuilder")
            .field("path", &self.path)
            .field("db", &self.db.as_ref().map(|_| "sled::Db"))
            .field("tree", &self.tree)
            .field("temporary", &self.temporary)
            .field("cache_capacity", &self.cache_capacity)
            .field("flush_policy", &self.flush_policy)
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

impl SledLayer<(), (), DefaultCodec> {
    /// A builder with the defaults listed on [`SledLayerBuilder`].
    pub fn builder() -> SledLayerBuilder {
        SledLayerBuilder::new()
    }
}

impl SledLayerBuilder<DefaultCodec> {
    fn new() -> Self {
        SledLayerBuilder {
            path: None,
            db: None,
            tree: None,
            temporary: false,
            cache_capacity: None,
            flush_policy: FlushPolicy::default(),
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

impl<C> SledLayerBuilder<C> {
    /// Open (or create) a database in the directory `path`; [`build`](Self::build) opens it
    /// and holds sled's lock on it until the layer is closed or dropped. Required, unless
    /// [`db`](Self::db) is given.
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Use a database the caller has already opened (and may keep using: `sled::Db` is a
    /// cheap handle). Closing the layer drops the layer's handle, not the caller's.
    /// Required, unless [`path`](Self::path) is given.
    pub fn db(mut self, db: sled::Db) -> Self {
        self.db = Some(db);
        self
    }

    /// Store entries in the tree (sled's namespace) named `name` instead of the database's
    /// default tree, so that several layers or other data can share one database.
    /// Default: the default tree.
    pub fn tree(mut self, name: impl Into<String>) -> Self {
        self.tree = Some(name.into());
        self
    }

    /// Delete the database directory when the layer (its last handle) is dropped: sled's
    /// `Config::temporary`. For scratch caches and tests. Only with
    /// [`path`](Self::path). Such a layer does not report
    /// [`persistent`](capacitor_core::Capabilities::persistent). Default: `false`.
    pub fn temporary(mut self, temporary: bool) -> Self {
        self.temporary = temporary;
        self
    }

    /// The most memory sled's page cache may use, in bytes (at least 256). Only with
    /// [`path`](Self::path). Default: sled's, 1 GiB.
    pub fn cache_capacity(mut self, bytes: u64) -> Self {
        self.cache_capacity = Some(bytes);
        self
    }

    /// When writes are made durable; see [`FlushPolicy`] for what a crash can lose under
    /// each. Default: [`FlushPolicy::EveryMillis`]`(500)`.
    pub fn flush_policy(mut self, policy: FlushPolicy) -> Self {
        self.flush_policy = policy;
        self
    }

    /// The codec values are stored with. Default: [`DefaultCodec`].
    pub fn codec<C2>(self, codec: C2) -> SledLayerBuilder<C2> {
        SledLayerBuilder {
            path: self.path,
            db: self.db,
            tree: self.tree,
            temporary: self.temporary,
            cache_capacity: self.cache_capacity,
            flush_policy: self.flush_policy,
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
    /// is never read again stays on disk). Each pass walks the whole tree in batches of
    /// [`sweep_batch`](Self::sweep_batch) deletions on tokio's blocking pool; the task
    /// stops when the layer is closed or dropped. On, [`build`](Self::build) must run
    /// inside a tokio runtime. Default: `true`.
    pub fn sweeper(mut self, on: bool) -> Self {
        self.sweeper = on;
        self
    }

    /// How often the sweeper runs a pass. Default: 60 s.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// How many expired entries one sweep batch deletes before it yields. Default: 1,000.
    pub fn sweep_batch(mut self, entries: usize) -> Self {
        self.sweep_batch = entries;
        self
    }

    /// How long [`build`](Self::build) keeps retrying when the directory is locked, before
    /// it fails with [`ErrorKind::Unavailable`](capacitor_core::ErrorKind::Unavailable)
    /// (zero tries once). Only with [`path`](Self::path). Default: 1 s.
    ///
    /// sled 0.34 releases its `flock` lazily: dropping the last handle (which
    /// [`close`](capacitor_core::Layer::close) does) signals its background threads, and
    /// the lock goes when the last of them exits, moments later (spacejam/sled#1234). A
    /// reopen right after a close, or a restarted process starting while the old one
    /// exits, would otherwise fail at random. The wait is a sleep on the building thread
    /// (`build` is synchronous, like sled's open).
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// Whether the layer keeps tags ([`Layer::set_tagged`], [`Layer::remove_by_tag`]):
    /// two more trees next to the data tree, `<tree>\0tags` and `<tree>\0key-tags`
    /// (`<tree>` being the [`tree`](Self::tree) name, or sled's `__sled__default`), written
    /// in the same sled transaction as the data. Off, the layer declares no
    /// [`tags`](capacitor_core::Capabilities::tags) and its writes touch only the data
    /// tree; on, every write also reads the key's tags, to drop them (see the crate guide,
    /// "Tags", for the cost). A tree whose keys still carry tags is refused with tags off
    /// ([`ErrorKind::Config`](capacitor_core::ErrorKind::Config)): such writes would not
    /// drop those tags, and a later `remove_by_tag` would remove values written without
    /// them. Default: `false`.
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

    /// Validates the options, opens the database (synchronously: sled's open reads its
    /// files and may take a moment on a large database) and starts the background tasks.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](capacitor_core::ErrorKind::Config), naming the field: neither
    /// or both of `path` and `db`, an empty `path` or one that is a file, a
    /// `cache_capacity` below 256 bytes, `temporary` or `cache_capacity` with `db`, a zero
    /// `max_value_bytes`, `sweep_interval`, `sweep_batch` or `EveryMillis` interval, or a
    /// background task requested outside a tokio runtime: the `sweeper` (on by default;
    /// the message says to build inside a runtime or call `.sweeper(false)`), or
    /// `flush_policy` `EveryMillis` with `db`.
    ///
    /// Opening, all with [`Operation::Build`](capacitor_core::Operation::Build), a message
    /// naming the path and sled's error as the source:
    /// [`ErrorKind::Unavailable`](capacitor_core::ErrorKind::Unavailable) when the
    /// directory is locked by another process (or another open handle in this one);
    /// [`ErrorKind::Backend`](capacitor_core::ErrorKind::Backend) when it cannot be created
    /// or read, or is corrupt; [`ErrorKind::Config`](capacitor_core::ErrorKind::Config)
    /// when sled refuses the configuration against what is on disk.
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::ErrorKind;
    /// use capacitor::sled::SledLayer;
    ///
    /// let err = SledLayer::builder().build::<String, String>().unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Config);
    ///
    /// let file = tempfile::NamedTempFile::new()?;
    /// let err = SledLayer::builder()
    ///     .path(file.path().join("db"))
    ///     .sweeper(false) // no tokio runtime here
    ///     .build::<String, String>()
    ///     .unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Backend);
    /// assert!(err.message().contains(&file.path().display().to_string()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn build<K, V>(self) -> Result<SledLayer<K, V, C>>
    where
        C: Codec<V>,
    {
        if self.max_value_bytes == 0 {
            return Err(Error::config("max_value_bytes", "must be greater than zero"));
        }
        if self.sweep_batch == 0 {
            return Err(Error::config("sweep_batch", "must be greater than zero"));
        }
        if self.sweeper && self.sweep_interval.is_zero() {
            return Err(Error::config("sweep_interval", "must be greater than zero"));
        }
        if self.flush_policy == FlushPolicy::EveryMillis(0) {
            return Err(Error::config(
                "flush_policy",
                "EveryMillis needs an interval greater than zero",
            ));
        }
        if self
            .cache_capacity
            .is_some_and(|bytes| bytes < MIN_CACHE_CAPACITY)
        {
            return Err(Error::config(
                "cache_capacity",
                format!("must be at least {MIN_CACHE_CAPACITY} bytes (sled's minimum)"),
            ));
        }
        if let Some(path) = &self.path {
            if path.as_os_str().is_empty() {
                return Err(Error::config(
                    "path",
                    "is empty (it would open a database in the current directory)",
                ));
            }
            if path.is_file() {
                return Err(Error::config(
                    "path",
                    format!("`{}` is a file; sled needs a directory", path.display()),
                ));
            }
        }
        match (&self.path, &self.db) {
            (None, None) => return Err(Error::config("path", "one of `path` or `db` is required")),
            (Some(_), Some(_)) => return Err(Error::config("path", "give either `path` or `db`, not both")),
            (None, Some(_)) if self.temporary => {
                return Err(Error::config(
                    "temporary",
                    "only applies to a database opened with `path`",
                ))
            }
            (None, Some(_)) if self.cache_capacity.is_some() => {
                return Err(Error::config(
                    "cache_capacity",
                    "only applies to a database opened with `path`",
                ))
            }
            _ => {}
        }
        // sled's own flusher thread serves `EveryMillis` on a database we open; on the
        // caller's database the layer runs a task of its own.
        let needs_flusher_task =
            self.db.is_some() && matches!(self.flush_policy, FlushPolicy::EveryMillis(_));
        let runtime = if self.sweeper || needs_flusher_task {
            let (field, problem) = if self.sweeper {
                (
                    "sweeper",
                    "runs on a tokio task: build inside a tokio runtime, or call `.sweeper(false)`",
                )
            } else {
                (
                    "flush_policy",
                    "EveryMillis on a caller's database flushes on a tokio task: build inside a tokio runtime",
                )
            };
            Some(
                tokio::runtime::Handle::try_current()
                    .map_err(|e| Error::config(field, problem).with_source(e))?,
            )
        } else {
            None
        };

        let (db, persistent) = match (self.path, self.db) {
            (Some(path), _) => {
                let flush_every_ms = match self.flush_policy {
                    FlushPolicy::EveryMillis(ms) => Some(ms),
                    // EveryWrite flushes itself; Manual promises nothing in between.
                    FlushPolicy::EveryWrite | FlushPolicy::Manual => None,
                };
                let mut config = sled::Config::new()
                    .path(&path)
                    .temporary(self.temporary)
                    .flush_every_ms(flush_every_ms);
                if let Some(bytes) = self.cache_capacity {
                    config = config.cache_capacity(bytes);
                }
                let db = open_waiting_for_lock(&config, self.lock_wait).map_err(|e| open_error(&path, e))?;
                (db, !self.temporary)
            }
            (None, Some(db)) => (db, true),
            (None, None) => return Err(Error::config("path", "one of `path` or `db` is required")),
        };
        let tree = match &self.tree {
            Some(name) => db
                .open_tree(name.as_bytes())
                .map_err(|e| sled_error(capacitor_core::Operation::Build, e))?,
            None => (*db).clone(),
        };
        let tag_trees = if self.tags {
            let open = |suffix: &[u8]| {
                db.open_tree(tags::tree_name(&tree.name(), suffix))
                    .map_err(|e| sled_error(capacitor_core::Operation::Build, e))
            };
            Some(TagTrees {
                tags: open(tags::TAGS_TREE_SUFFIX)?,
                key_tags: open(tags::KEY_TAGS_TREE_SUFFIX)?,
            })
        } else {
            // A tree whose keys still carry tags: writes without tags would not drop them,
            // and a later remove_by_tag (tags on again) would remove values written since.
            let key_tags = tags::tree_name(&tree.name(), tags::KEY_TAGS_TREE_SUFFIX);
            let exists = db
                .tree_names()
                .iter()
                .any(|name| name.as_ref() == key_tags.as_slice());
            if exists {
                let kept = db
                    .open_tree(&key_tags)
                    .map_err(|e| sled_error(capacitor_core::Operation::Build, e))?
                    .len();
                if kept > 0 {
                    return Err(Error::config(
                        "tags",
                        format!(
                            "the tree holds the tags of {kept} keys, written by a layer built with \
                             `.tags(true)`: build with `.tags(true)` (writes without it would leave \
                             those tags behind), or clear the tree"
                        ),
                    ));
                }
            }
            None
        };

        let shared = Arc::new(Shared {
            handles: std::sync::RwLock::new(Some(Handles {
                _db: db,
                tree,
                tag_trees,
            })),
            codec: self.codec,
            clock: self.clock,
            flush_policy: self.flush_policy,
            max_value_bytes: self.max_value_bytes,
            persistent,
            tags: self.tags,
            stop: Stop::new(),
        });
        if let Some(runtime) = runtime {
            if self.sweeper {
                runtime.spawn(sweep::sweeper(
                    Arc::downgrade(&shared),
                    shared.stop.ticker(self.sweep_interval),
                    self.sweep_batch,
                ));
            }
            if let (true, FlushPolicy::EveryMillis(ms)) = (needs_flusher_task, self.flush_policy) {
                runtime.spawn(sweep::flusher(
                    Arc::downgrade(&shared),
                    shared.stop.ticker(Duration::from_millis(ms)),
                ));
            }
        }
        Ok(SledLayer {
            shared,
            _types: PhantomData,
        })
    }
}

/// Opens `config`, retrying while the directory is locked for up to `wait` (see
/// [`SledLayerBuilder::lock_wait`]).
fn open_waiting_for_lock(
    config: &sled::Config,
    wait: Duration,
) -> std::result::Result<sled::Db, sled::Error> {
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match config.open() {
            Err(e) if is_lock_error(&e) && started.elapsed() < wait => {
                std::thread::sleep(pause.min(wait.saturating_sub(started.elapsed())));
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            result => return result,
        }
    }
}
