//! [`MokaLayer`]: a bounded in-memory layer on moka.

use std::any::Any;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capacitor_core::{
    async_trait, expiry_for, Capabilities, Clock, Entry, Error, Layer, Operation, Result, SystemClock,
    Timestamp,
};
use moka::sync::Cache;
use moka::Expiry;

/// What moka stores: the value, its absolute expiry (reported to the composer) and the
/// TTL it was written with (handed to moka's expiry policy).
#[derive(Clone)]
struct Stored<V> {
    value: V,
    expires_at: Option<Timestamp>,
    ttl: Option<Duration>,
}

struct PerEntryTtl;

impl<K, V> Expiry<K, Stored<V>> for PerEntryTtl {
    fn expire_after_create(&self, _: &K, stored: &Stored<V>, _: Instant) -> Option<Duration> {
        stored.ttl
    }

    // An overwrite replaces the expiry, as in Redis: the new write's TTL (or none) applies.
    fn expire_after_update(
        &self,
        _: &K,
        stored: &Stored<V>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        stored.ttl
    }
}

type Weigher<K, V> = Arc<dyn Fn(&K, &V) -> u32 + Send + Sync + 'static>;

/// Builds a [`MokaLayer`]; the key and value types are given to
/// [`build`](MokaLayerBuilder::build), as for every layer.
///
/// Defaults: bounded to 10,000 entries.
///
/// # Examples
///
/// ```
/// use capacitor::memory::MokaLayer;
///
/// let by_count = MokaLayer::builder().max_capacity(50_000).build::<String, String>()?;
/// let by_bytes = MokaLayer::builder()
///     .max_bytes(64 * 1024 * 1024, |k: &String, v: &String| (k.len() + v.len()) as u32)
///     .build::<String, String>()?;
/// # let _ = (by_count, by_bytes);
/// # Ok::<(), capacitor::Error>(())
/// ```
#[must_use]
#[derive(Default)]
pub struct MokaLayerBuilder {
    max_capacity: Option<u64>,
    /// The byte bound and its weigher, a `Weigher<K, V>` behind `Any` until `build::<K, V>`
    /// names the types.
    max_bytes: Option<(u64, Box<dyn Any + Send + Sync>)>,
}

impl fmt::Debug for MokaLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MokaLayerBuilder")
            .field("max_capacity", &self.max_capacity)
            .field("max_bytes", &self.max_bytes.as_ref().map(|(b, _)| b))
            .finish()
    }
}

impl MokaLayerBuilder {
    /// Bound the cache to `entries` entries (least recently / frequently used evicted).
    /// Default: 10,000.
    pub fn max_capacity(mut self, entries: u64) -> Self {
        self.max_capacity = Some(entries);
        self
    }

    /// Bound the cache to `bytes` in total, each entry weighing what `weigher` says (in
    /// bytes, saturating at `u32::MAX`), instead of a number of entries.
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::memory::MokaLayer;
    /// use capacitor::{LayerConfig, MultiLayer};
    ///
    /// let layer = MokaLayer::builder()
    ///     .max_bytes(100 * 1024 * 1024, |k: &String, v: &Vec<u8>| (k.len() + v.len()).try_into().unwrap_or(u32::MAX))
    ///     .build::<String, Vec<u8>>()?;
    /// let cache = MultiLayer::builder().layer(LayerConfig::new("l1", layer)).build()?;
    /// # Ok::<(), capacitor::Error>(())
    /// ```
    pub fn max_bytes<K, V>(
        mut self,
        bytes: u64,
        weigher: impl Fn(&K, &V) -> u32 + Send + Sync + 'static,
    ) -> Self
    where
        K: 'static,
        V: 'static,
    {
        let weigher: Weigher<K, V> = Arc::new(weigher);
        self.max_bytes = Some((bytes, Box::new(weigher)));
        self
    }

    /// Validates and builds the layer for keys `K` and values `V`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](capacitor_core::ErrorKind::Config) when both bounds are set,
    /// a bound is zero, or the weigher was written for other key or value types.
    pub fn build<K, V>(self) -> Result<MokaLayer<K, V>>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        let builder = Cache::builder().expire_after(PerEntryTtl);
        let cache = match (self.max_capacity, self.max_bytes) {
            (Some(_), Some(_)) => {
                return Err(Error::config(
                    "max_capacity",
                    "set either max_capacity or max_bytes, not both",
                ))
            }
            (Some(0), None) => return Err(Error::config("max_capacity", "must be greater than zero")),
            (None, Some((0, _))) => return Err(Error::config("max_bytes", "must be greater than zero")),
            (None, Some((bytes, weigher))) => {
                let Ok(weigher) = weigher.downcast::<Weigher<K, V>>() else {
                    return Err(Error::config(
                        "max_bytes",
                        "the weigher takes other key or value types than the layer is built for",
                    ));
                };
                builder
                    .max_capacity(bytes)
                    .weigher(move |k: &K, s: &Stored<V>| weigher(k, &s.value))
                    .build()
            }
            (entries, None) => builder.max_capacity(entries.unwrap_or(10_000)).build(),
        };
        Ok(MokaLayer {
            cache,
            closed: AtomicBool::new(false),
        })
    }
}

/// A bounded in-memory layer on moka's synchronous cache.
///
/// Per-entry TTLs are enforced by moka itself; reads are answered synchronously (no
/// future on an L1 hit). Values are cloned out on every hit: use `Arc<T>` for large values.
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor::memory::MokaLayer;
/// use capacitor::Layer;
/// use std::time::Duration;
///
/// let l1 = MokaLayer::builder().max_capacity(1_000).build::<String, u64>()?;
/// l1.set(&"a".into(), &1, Some(Duration::from_secs(60))).await?;
/// let entry = l1.get(&"a".into()).await?.expect("hit");
/// assert_eq!(entry.value, 1);
/// assert!(entry.expires_at.is_some());
/// # Ok::<(), capacitor::Error>(()) }).unwrap();
/// ```
pub struct MokaLayer<K, V> {
    cache: Cache<K, Stored<V>>,
    closed: AtomicBool,
}

impl MokaLayer<(), ()> {
    /// A builder with the defaults listed on [`MokaLayerBuilder`]; the types are given to
    /// its [`build`](MokaLayerBuilder::build).
    pub fn builder() -> MokaLayerBuilder {
        MokaLayerBuilder::default()
    }
}

impl<K, V> fmt::Debug for MokaLayer<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MokaLayer")
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl<K, V> MokaLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn read(&self, key: &K) -> Result<Option<Entry<V>>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(Operation::Get));
        }
        Ok(self.cache.get(key).map(|s| Entry::new(s.value, s.expires_at)))
    }

    fn check_open(&self, op: Operation) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(op));
        }
        Ok(())
    }

    fn insert(&self, key: &K, value: &V, ttl: Option<Duration>) {
        // Entries without TTL (the common L1 case) never read the clock.
        let expires_at = ttl.and_then(|ttl| expiry_for(SystemClock.now(), Some(ttl)));
        self.cache.insert(
            key.clone(),
            Stored {
                value: value.clone(),
                expires_at,
                ttl,
            },
        );
    }

    fn remove(&self, key: &K) -> bool {
        let now = SystemClock.now();
        // moka may hand back an entry that expired but was not evicted yet.
        self.cache
            .remove(key)
            .is_some_and(|s| !Entry::new((), s.expires_at).is_expired(now))
    }

    /// Approximate number of live entries (moka counts lazily; see
    /// [`moka::sync::Cache::entry_count`]).
    pub fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    /// Approximate total weight (bytes with [`MokaLayerBuilder::max_bytes`], entries
    /// otherwise).
    pub fn weighted_size(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.weighted_size()
    }
}

#[async_trait]
impl<K, V> Layer<K, V> for MokaLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        "moka"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_native_ttl().with_sync_ops()
    }

    #[inline]
    fn get_sync(&self, key: &K) -> Option<Result<Option<Entry<V>>>> {
        Some(self.read(key))
    }

    #[inline]
    fn set_sync(&self, key: &K, value: &V, ttl: Option<Duration>) -> Option<Result<()>> {
        Some(
            self.check_open(Operation::Set)
                .map(|()| self.insert(key, value, ttl)),
        )
    }

    #[inline]
    fn delete_sync(&self, key: &K) -> Option<Result<bool>> {
        Some(self.check_open(Operation::Delete).map(|()| self.remove(key)))
    }

    fn clear_sync(&self) -> Option<Result<()>> {
        Some(
            self.check_open(Operation::Delete)
                .map(|()| self.cache.invalidate_all()),
        )
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        self.read(key)
    }

    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.check_open(Operation::Set)?;
        self.insert(key, value, ttl);
        Ok(())
    }

    async fn delete(&self, key: &K) -> Result<bool> {
        self.check_open(Operation::Delete)?;
        Ok(self.remove(key))
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        keys.iter().map(|k| self.read(k)).collect()
    }

    async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        self.check_open(Operation::SetMany)?;
        entries.iter().for_each(|(k, v)| self.insert(k, v, ttl));
        Ok(())
    }

    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        self.check_open(Operation::DeleteMany)?;
        Ok(keys.iter().map(|k| u64::from(self.remove(k))).sum())
    }

    async fn flush(&self) -> Result<()> {
        self.check_open(Operation::Flush)?;
        self.cache.run_pending_tasks();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.cache.invalidate_all();
            self.cache.run_pending_tasks();
        }
        Ok(())
    }
}
