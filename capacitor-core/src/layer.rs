//! The [`Layer`] trait every backend and the composer implement.

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures_core::Stream;

use crate::entry::Entry;
use crate::error::{Error, ErrorKind, Operation, Result};

/// Keys [`Layer::clear`]'s default deletes per call.
const CLEAR_BATCH: usize = 256;

/// A stream of entries produced by [`Layer::scan`].
pub type EntryStream<K, V> = Pin<Box<dyn Stream<Item = Result<(K, Entry<V>)>> + Send + 'static>>;

/// What a layer can do beyond the required operations. The composer and the conformance
/// suite read it; a layer reports it from [`Layer::capabilities`].
///
/// # Examples
///
/// ```
/// use capacitor::Capabilities;
///
/// let caps = Capabilities::new().with_native_ttl().with_persistence();
/// assert!(caps.native_ttl && caps.persistent && !caps.scan);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// [`Layer::scan`] works.
    pub scan: bool,
    /// [`Layer::apply_atomic`] works (native transactions).
    pub transactions: bool,
    /// The backend expires entries itself (Redis `PX`, moka's expiry); otherwise expiry is
    /// checked lazily on read.
    pub native_ttl: bool,
    /// Data survives a process restart.
    pub persistent: bool,
    /// [`Layer::get_sync`], [`Layer::set_sync`] and [`Layer::delete_sync`] answer without
    /// awaiting (in-memory layers).
    pub sync_ops: bool,
    /// [`Layer::set_tagged`] and [`Layer::remove_by_tag`] work: the layer keeps, for each
    /// key, the tags of its last write.
    pub tags: bool,
}

impl Capabilities {
    /// No optional capability.
    pub const fn new() -> Self {
        Capabilities {
            scan: false,
            transactions: false,
            native_ttl: false,
            persistent: false,
            sync_ops: false,
            tags: false,
        }
    }
    /// Declares [`Capabilities::tags`].
    #[must_use]
    pub const fn with_tags(mut self) -> Self {
        self.tags = true;
        self
    }
    /// Declares [`Capabilities::scan`].
    #[must_use]
    pub const fn with_scan(mut self) -> Self {
        self.scan = true;
        self
    }
    /// Declares [`Capabilities::transactions`].
    #[must_use]
    pub const fn with_transactions(mut self) -> Self {
        self.transactions = true;
        self
    }
    /// Declares [`Capabilities::native_ttl`].
    #[must_use]
    pub const fn with_native_ttl(mut self) -> Self {
        self.native_ttl = true;
        self
    }
    /// Declares [`Capabilities::persistent`].
    #[must_use]
    pub const fn with_persistence(mut self) -> Self {
        self.persistent = true;
        self
    }
    /// Declares [`Capabilities::sync_ops`].
    #[must_use]
    pub const fn with_sync_ops(mut self) -> Self {
        self.sync_ops = true;
        self
    }
}

/// One write inside an atomic batch ([`Layer::apply_atomic`]).
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use capacitor::sled::SledLayer;
/// use capacitor::{Layer, WriteOp};
/// # let dir = tempfile::tempdir().unwrap();
///
/// let layer = SledLayer::builder().path(dir.path().join("db")).build::<String, u32>()?;
/// layer
///     .apply_atomic(&[
///         WriteOp::Set { key: "a".into(), value: 1, ttl: None },
///         WriteOp::Set { key: "b".into(), value: 2, ttl: Some(Duration::from_secs(60)) },
///         WriteOp::Delete { key: "c".into() },
///     ])
///     .await?;
/// assert_eq!(layer.get(&"b".into()).await?.map(|e| e.value), Some(2));
/// # Ok::<(), capacitor::Error>(()) }).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp<K, V> {
    /// Store `value` under `key`, expiring after `ttl` when given.
    Set {
        /// The key.
        key: K,
        /// The value.
        value: V,
        /// Time to live; `None` keeps it until deleted.
        ttl: Option<Duration>,
    },
    /// Remove `key`.
    Delete {
        /// The key.
        key: K,
    },
}

impl<K, V> WriteOp<K, V> {
    /// The key this write touches.
    pub fn key(&self) -> &K {
        match self {
            WriteOp::Set { key, .. } | WriteOp::Delete { key } => key,
        }
    }
}

/// A storage layer: an in-memory cache, a remote cache, a database, or a whole
/// [`MultiLayer`](crate::MultiLayer).
///
/// Required: [`get`](Layer::get), [`set`](Layer::set), [`delete`](Layer::delete),
/// [`close`](Layer::close). Everything else has a default: batch forms loop over the single
/// forms (override them with pipelines or multi-row statements), optional capabilities
/// answer [`ErrorKind::Unsupported`].
///
/// Contract (checked by the conformance suite in `capacitor::testkit`):
/// - `get` never returns an expired entry, and returns the entry's absolute expiry;
/// - `set` with `ttl = None` stores without expiry; a later `set` replaces value and expiry;
/// - `delete` returns whether the key was present;
/// - after `close` every operation fails with [`ErrorKind::Closed`]; `close` is idempotent;
/// - bytes that do not decode are reported as [`ErrorKind::Decode`] (the composer counts
///   them and treats them as a miss), never a panic.
///
/// # Examples
///
/// A custom layer over a `Mutex<HashMap>`:
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use capacitor::{expiry_for, Clock, Entry, Error, Layer, Operation, Result, SystemClock};
///
/// #[derive(Default)]
/// struct HashMapLayer(Mutex<Option<HashMap<String, Entry<u64>>>>);
///
/// #[async_trait]
/// impl Layer<String, u64> for HashMapLayer {
///     fn name(&self) -> &str { "map" }
///     async fn get(&self, key: &String) -> Result<Option<Entry<u64>>> {
///         let now = SystemClock.now();
///         let guard = self.0.lock().unwrap();
///         let map = guard.as_ref().ok_or(Error::closed(Operation::Get))?;
///         Ok(map.get(key).filter(|e| !e.is_expired(now)).cloned())
///     }
///     async fn set(&self, key: &String, value: &u64, ttl: Option<Duration>) -> Result<()> {
///         let entry = Entry::new(*value, expiry_for(SystemClock.now(), ttl));
///         let mut guard = self.0.lock().unwrap();
///         guard.as_mut().ok_or(Error::closed(Operation::Set))?.insert(key.clone(), entry);
///         Ok(())
///     }
///     async fn delete(&self, key: &String) -> Result<bool> {
///         let mut guard = self.0.lock().unwrap();
///         Ok(guard.as_mut().ok_or(Error::closed(Operation::Delete))?.remove(key).is_some())
///     }
///     async fn close(&self) -> Result<()> {
///         self.0.lock().unwrap().take();
///         Ok(())
///     }
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let layer = HashMapLayer(Mutex::new(Some(HashMap::new())));
/// layer.set(&"a".to_string(), &1, None).await?;
/// assert_eq!(layer.get(&"a".to_string()).await?.map(|e| e.value), Some(1));
/// # Ok::<(), capacitor::Error>(()) }).unwrap();
/// ```
#[async_trait]
pub trait Layer<K, V>: Send + Sync + 'static
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// A short name of the backend (`"moka"`, `"redis"`), used when the layer is not named
    /// by its [`LayerConfig`](crate::LayerConfig).
    fn name(&self) -> &str;

    /// What this layer can do beyond the required operations.
    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
    }

    /// Whether this layer would refuse `set(key, value, ttl)`, checked without writing
    /// anything: its size limits, the keys it can store, the TTLs it can express. The
    /// composer asks every layer before it acknowledges a write-back `set`, so that what
    /// the store would refuse later is refused to the caller now, with the error
    /// `set` gives. The default accepts everything.
    ///
    /// # Errors
    ///
    /// The error [`set`](Layer::set) would return for this write
    /// ([`ErrorKind::InvalidInput`], [`ErrorKind::ValueTooLarge`],
    /// [`ErrorKind::Encode`]); never one about the backend's state.
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::{Layer};
    /// use capacitor::memory::DashMapLayer;
    ///
    /// let layer = DashMapLayer::<String, String>::new();
    /// assert!(layer.check_write(&"k".into(), &"v".into(), None).is_ok());
    /// ```
    fn check_write(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        let _ = (key, value, ttl);
        Ok(())
    }

    /// A synchronous read for in-memory layers, tried by the composer before
    /// [`get`](Layer::get) so that an L1 hit does not pay for a boxed future.
    ///
    /// `None` means "cannot answer without awaiting; call `get`". `Some(result)` must be
    /// exactly what `get` would have returned.
    fn get_sync(&self, key: &K) -> Option<Result<Option<Entry<V>>>> {
        let _ = key;
        None
    }

    /// A synchronous write for in-memory layers (see [`get_sync`](Layer::get_sync)):
    /// `None` means "call `set`", `Some(result)` is what `set` would have returned. The
    /// composer uses it for write-through and promotion, where a boxed future per layer
    /// would cost more than the write itself.
    fn set_sync(&self, key: &K, value: &V, ttl: Option<Duration>) -> Option<Result<()>> {
        let _ = (key, value, ttl);
        None
    }

    /// A synchronous delete for in-memory layers: `None` means "call `delete`".
    fn delete_sync(&self, key: &K) -> Option<Result<bool>> {
        let _ = key;
        None
    }

    /// Drops every entry, synchronously, for in-memory layers (`None`: not supported).
    /// The composer uses it when an [`InvalidationBus`](crate::InvalidationBus) reports that
    /// messages may have been missed.
    fn clear_sync(&self) -> Option<Result<()>> {
        None
    }

    /// The live entry under `key`, with its absolute expiry.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] after close, [`ErrorKind::Decode`] for bytes that do not decode,
    /// backend errors otherwise.
    async fn get(&self, key: &K) -> Result<Option<Entry<V>>>;

    /// Stores `value` under `key`, expiring after `ttl` (`None`: no expiry).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] after close, [`ErrorKind::ValueTooLarge`] or
    /// [`ErrorKind::Encode`] before anything is stored, backend errors otherwise.
    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()>;

    /// Removes `key`; `true` if it was present (and live).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] after close, backend errors otherwise.
    async fn delete(&self, key: &K) -> Result<bool>;

    /// Whether a live entry exists under `key`.
    ///
    /// # Errors
    ///
    /// As [`get`](Layer::get).
    async fn exists(&self, key: &K) -> Result<bool> {
        Ok(self.get(key).await?.is_some())
    }

    /// The entries under `keys`, in the same order (`None` for a miss).
    ///
    /// # Errors
    ///
    /// As [`get`](Layer::get); a backend that reads in one round trip fails as a whole.
    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get(key).await?);
        }
        Ok(out)
    }

    /// Stores every `(key, value)` with the same `ttl`.
    ///
    /// # Errors
    ///
    /// As [`set`](Layer::set). The default loop stops at the first failure; earlier writes
    /// stay.
    async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        for (key, value) in entries {
            self.set(key, value, ttl).await?;
        }
        Ok(())
    }

    /// Removes every key; returns how many were present.
    ///
    /// # Errors
    ///
    /// As [`delete`](Layer::delete).
    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        let mut n = 0;
        for key in keys {
            n += u64::from(self.delete(key).await?);
        }
        Ok(n)
    }

    /// The live entries whose encoded key starts with `prefix`, in bounded memory.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unsupported`] unless [`Capabilities::scan`] is declared.
    fn scan(&self, prefix: &[u8]) -> Result<EntryStream<K, V>> {
        let _ = prefix;
        Err(Error::unsupported(Operation::Scan, "this layer cannot scan"))
    }

    /// Stores `value` under `key` as [`set`](Layer::set) does, and records that the key
    /// carries exactly `tags` (replacing the tags of its earlier writes), atomically where
    /// the backend can.
    ///
    /// A layer declaring [`Capabilities::tags`] keeps each key's tags until its next write:
    /// every other write form ([`set`](Layer::set), the batch forms, deletes,
    /// [`apply_atomic`](Layer::apply_atomic), the synchronous forms, [`clear`](Layer::clear))
    /// leaves the key without tags.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unsupported`] unless [`Capabilities::tags`] is declared; as
    /// [`set`](Layer::set) otherwise.
    async fn set_tagged(&self, key: &K, value: &V, ttl: Option<Duration>, tags: &[String]) -> Result<()> {
        let _ = (key, value, ttl, tags);
        Err(Error::unsupported(
            Operation::Set,
            "this layer does not keep tags",
        ))
    }

    /// Removes every entry whose last write carried `tag`, and the tag; returns their
    /// keys (entries that expired meanwhile included).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unsupported`] unless [`Capabilities::tags`] is declared; as
    /// [`delete_many`](Layer::delete_many) otherwise.
    async fn remove_by_tag(&self, tag: &str) -> Result<Vec<K>> {
        let _ = tag;
        Err(Error::unsupported(
            Operation::DeleteMany,
            "this layer does not keep tags",
        ))
    }

    /// Removes every entry this layer holds (under its prefix or table, for shared
    /// stores).
    ///
    /// The default uses [`clear_sync`](Layer::clear_sync) when the layer answers it, else
    /// [`scan`](Layer::scan)s every key and deletes them in batches of 256: one pass, in
    /// bounded memory; entries written during the pass may survive it.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unsupported`] for a layer that can neither clear nor scan; as
    /// [`delete_many`](Layer::delete_many) otherwise.
    async fn clear(&self) -> Result<()> {
        if let Some(result) = self.clear_sync() {
            return result;
        }
        let mut entries = self.scan(b"").map_err(|e| {
            Error::new(
                ErrorKind::Unsupported,
                Operation::Clear,
                "this layer can neither clear nor scan",
            )
            .with_source(e)
        })?;
        let mut batch = Vec::with_capacity(CLEAR_BATCH);
        loop {
            let next = std::future::poll_fn(|cx| entries.as_mut().poll_next(cx)).await;
            match next {
                Some(Ok((key, _))) => batch.push(key),
                // An entry that does not decode is still there: its key is not known,
                // so the layer cannot remove it this way.
                Some(Err(e)) if e.kind() == ErrorKind::Decode => {}
                Some(Err(e)) => return Err(e),
                None => break,
            }
            if batch.len() == CLEAR_BATCH {
                self.delete_many(&batch).await?;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            self.delete_many(&batch).await?;
        }
        Ok(())
    }

    /// Applies every write in `ops` atomically: all or nothing.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unsupported`] unless [`Capabilities::transactions`] is declared;
    /// [`ErrorKind::Conflict`] or a backend error when the batch was not applied.
    async fn apply_atomic(&self, ops: &[WriteOp<K, V>]) -> Result<()> {
        let _ = ops;
        Err(Error::new(
            ErrorKind::Unsupported,
            Operation::Transaction,
            "this layer has no native transactions",
        ))
    }

    /// Makes every acknowledged write durable (persistent layers) or drains pending work.
    ///
    /// # Errors
    ///
    /// Backend errors; [`ErrorKind::Closed`] after close.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Releases resources. Idempotent; afterwards operations fail with
    /// [`ErrorKind::Closed`].
    ///
    /// # Errors
    ///
    /// A backend error while flushing or disconnecting (the layer is closed regardless).
    async fn close(&self) -> Result<()>;
}
