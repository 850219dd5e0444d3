//! [`QuickCacheLayer`]: a bounded in-memory layer on quick_cache (S3-FIFO), with lazy
//! expiry and a sweeper.

use std::any::Any;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use capacitor_core::background::{Stop, Ticker};
use capacitor_core::{
    async_trait, expiry_for, system_clock, Capabilities, Clock, Entry, Error, Layer, Operation, Result,
    SharedClock, Timestamp,
};
use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};

/// `Stored::expires` for an entry that does not expire.
const NEVER: u64 = u64::MAX;

/// What quick_cache stores: the value and its absolute expiry in milliseconds since the
/// epoch, [`NEVER`] for none. A bare `u64` rather than `Option<Timestamp>` (16 bytes): the
/// expiry costs each entry 8 bytes. An expiry that saturates at `u64::MAX` (a TTL of some
/// 584 million years) is reported as none, which it is in practice.
#[derive(Clone)]
struct Stored<V> {
    value: V,
    expires: u64,
}

impl<V> Stored<V> {
    fn new(value: V, expires_at: Option<Timestamp>) -> Self {
        Stored {
            value,
            expires: expires_at.map_or(NEVER, Timestamp::as_millis),
        }
    }

    fn expires_at(&self) -> Option<Timestamp> {
        (self.expires != NEVER).then(|| Timestamp::from_millis(self.expires))
    }

    fn is_expired(&self, now: Timestamp) -> bool {
        self.expires != NEVER && self.expires <= now.as_millis()
    }
}

type WeighFn<K, V> = Arc<dyn Fn(&K, &V) -> u32 + Send + Sync + 'static>;

/// Each entry's weight for quick_cache: 1 without a weigher (an entry-count bound), the
/// weigher's figure otherwise, at least 1 (quick_cache never evicts an entry of weight 0).
struct LayerWeighter<K, V>(Option<WeighFn<K, V>>);

impl<K, V> Clone for LayerWeighter<K, V> {
    fn clone(&self) -> Self {
        LayerWeighter(self.0.clone())
    }
}

impl<K, V> Weighter<K, Stored<V>> for LayerWeighter<K, V> {
    #[inline]
    fn weight(&self, key: &K, stored: &Stored<V>) -> u64 {
        self.0
            .as_ref()
            .map_or(1, |w| u64::from(w(key, &stored.value).max(1)))
    }
}

type QuickCache<K, V> =
    Cache<K, Stored<V>, LayerWeighter<K, V>, DefaultHashBuilder, DefaultLifecycle<K, Stored<V>>>;

struct Shared<K, V> {
    cache: QuickCache<K, V>,
    clock: SharedClock,
    closed: AtomicBool,
    /// Ends the sweeper when pulled (`close`) or dropped (the layer dropped).
    stop: Stop,
}

impl<K, V> Shared<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    fn sweep(&self) -> usize {
        let now = self.clock.now();
        let before = self.cache.len();
        self.cache.retain(|_, s| !s.is_expired(now));
        before.saturating_sub(self.cache.len())
    }
}

/// How often the sweeper runs unless [`QuickCacheLayerBuilder::sweep_interval`] says.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The entry bound when none is set.
const DEFAULT_CAPACITY: u64 = 10_000;

/// Builds a [`QuickCacheLayer`]; the key and value types are given to
/// [`build`](QuickCacheLayerBuilder::build), as for every layer.
///
/// Defaults: bounded to 10,000 entries; the system clock; the sweeper on, every 60 s
/// (expired entries are also removed when read or evicted).
///
/// # Examples
///
/// ```
/// use capacitor::memory::QuickCacheLayer;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let by_count = QuickCacheLayer::builder().max_capacity(50_000).build::<String, String>()?;
/// let by_bytes = QuickCacheLayer::builder()
///     .max_bytes(64 * 1024 * 1024, |k: &String, v: &String| (k.len() + v.len()) as u32)
///     .build::<String, String>()?;
/// let no_runtime_needed = QuickCacheLayer::builder().sweeper(false).build::<u64, u64>()?;
/// # let _ = (by_count, by_bytes, no_runtime_needed);
/// # Ok::<(), capacitor::Error>(()) }).unwrap();
/// ```
#[must_use]
pub struct QuickCacheLayerBuilder {
    max_capacity: Option<u64>,
    /// The byte bound and its weigher, a `WeighFn<K, V>` behind `Any` until `build::<K, V>`
    /// names the types.
    max_bytes: Option<(u64, Box<dyn Any + Send + Sync>)>,
    shards: Option<usize>,
    clock: SharedClock,
    sweeper: bool,
    sweep_interval: Duration,
}

impl fmt::Debug for QuickCacheLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuickCacheLayerBuilder")
            .field("max_capacity", &self.max_capacity)
            .field("max_bytes", &self.max_bytes.as_ref().map(|(b, _)| b))
            .field("shards", &self.shards)
            .field("sweeper", &self.sweeper)
            .field("sweep_interval", &self.sweep_interval)
            .finish()
    }
}

impl QuickCacheLayerBuilder {
    /// Bound the cache to `entries` entries (evicted by S3-FIFO). Default: 10,000.
    pub fn max_capacity(mut self, entries: u64) -> Self {
        self.max_capacity = Some(entries);
        self
    }

    /// Bound the cache to `bytes` in total, each entry weighing what `weigher` says (in
    /// bytes, saturating at `u32::MAX`; a weight of 0 counts as 1), instead of a number of
    /// entries.
    ///
    /// The bound is split evenly across quick_cache's shards (see
    /// [`shards`](Self::shards)): an entry heavier than 97% of a shard's share is not kept
    /// (the write succeeds, and the key's previous value is dropped).
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::memory::QuickCacheLayer;
    /// use capacitor::{LayerConfig, MultiLayer};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let layer = QuickCacheLayer::builder()
    ///     .max_bytes(100 * 1024 * 1024, |k: &String, v: &Vec<u8>| (k.len() + v.len()).try_into().unwrap_or(u32::MAX))
    ///     .build::<String, Vec<u8>>()?;
    /// let cache = MultiLayer::builder().layer(LayerConfig::new("l1", layer)).build()?;
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
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
        let weigher: WeighFn<K, V> = Arc::new(weigher);
        self.max_bytes = Some((bytes, Box::new(weigher)));
        self
    }

    /// At most `shards` independently locked shards, each holding an even share of the
    /// bound (quick_cache rounds it to a power of two and lowers it to keep at least 32
    /// entries per shard). Fewer shards admit heavier entries under
    /// [`max_bytes`](Self::max_bytes) and contend more under many writing threads.
    /// Default: four per core.
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::memory::QuickCacheLayer;
    ///
    /// // Values of up to 7.7 MiB (97% of a shard's 8 MiB) are kept, on any number of cores.
    /// let layer = QuickCacheLayer::builder()
    ///     .max_bytes(64 * 1024 * 1024, |_: &u64, v: &Vec<u8>| v.len().try_into().unwrap_or(u32::MAX))
    ///     .shards(8)
    ///     .sweeper(false)
    ///     .build::<u64, Vec<u8>>()?;
    /// # let _ = layer;
    /// # Ok::<(), capacitor::Error>(())
    /// ```
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// The clock expiries are computed and checked against.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Whether a tokio task removes expired entries every
    /// [`sweep_interval`](Self::sweep_interval) (without it, expired entries that are never
    /// read again stay until evicted). The task stops when the layer is closed or dropped.
    /// Default: on.
    pub fn sweeper(mut self, on: bool) -> Self {
        self.sweeper = on;
        self
    }

    /// How often the sweeper runs. Default: 60 s.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Validates and builds the layer for keys `K` and values `V`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](capacitor_core::ErrorKind::Config) when both bounds are set, a
    /// bound is zero or does not fit this platform's `usize`, the weigher was written for
    /// other key or value types, the shard count or the sweep interval is zero, or the
    /// sweeper is on outside a
    /// tokio runtime (build inside one, or turn it off with
    /// [`sweeper(false)`](Self::sweeper)).
    pub fn build<K, V>(self) -> Result<QuickCacheLayer<K, V>>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        let (weight_capacity, estimated_entries, weigher) = match (self.max_capacity, self.max_bytes) {
            (Some(_), Some(_)) => {
                return Err(Error::config(
                    "max_capacity",
                    "set either max_capacity or max_bytes, not both",
                ))
            }
            (Some(0), None) => return Err(Error::config("max_capacity", "must be greater than zero")),
            (None, Some((0, _))) => return Err(Error::config("max_bytes", "must be greater than zero")),
            (None, Some((bytes, weigher))) => {
                let Ok(weigher) = weigher.downcast::<WeighFn<K, V>>() else {
                    return Err(Error::config(
                        "max_bytes",
                        "the weigher takes other key or value types than the layer is built for",
                    ));
                };
                // quick_cache sizes its shards and its ghost list by an estimate of the entry
                // count: one entry per KiB.
                (bytes, (bytes / 1024).max(1), Some(*weigher))
            }
            (entries, None) => {
                let entries = entries.unwrap_or(DEFAULT_CAPACITY);
                (entries, entries, None)
            }
        };
        let estimated_entries = usize::try_from(estimated_entries).map_err(|_| {
            Error::config(
                if weigher.is_some() {
                    "max_bytes"
                } else {
                    "max_capacity"
                },
                "too large for this platform",
            )
        })?;
        if self.sweep_interval.is_zero() {
            return Err(Error::config("sweep_interval", "must be greater than zero"));
        }
        let mut options = OptionsBuilder::new();
        options
            .estimated_items_capacity(estimated_entries)
            .weight_capacity(weight_capacity);
        match self.shards {
            Some(0) => return Err(Error::config("shards", "must be greater than zero")),
            Some(shards) => {
                options.shards(shards);
            }
            None => {}
        }
        let options = options
            .build()
            .map_err(|e| Error::config("max_capacity", "quick_cache refused the options").with_source(e))?;
        let cache = Cache::with_options(
            options,
            LayerWeighter(weigher),
            DefaultHashBuilder::default(),
            DefaultLifecycle::default(),
        );
        let shared = Arc::new(Shared {
            cache,
            clock: self.clock,
            closed: AtomicBool::new(false),
            stop: Stop::new(),
        });
        if self.sweeper {
            let handle = tokio::runtime::Handle::try_current().map_err(|e| {
                Error::config(
                    "sweeper",
                    "the sweeper needs a tokio runtime: build inside one, or call .sweeper(false)",
                )
                .with_source(e)
            })?;
            let ticker = shared.stop.ticker(self.sweep_interval);
            handle.spawn(sweeper(Arc::downgrade(&shared), ticker));
        }
        Ok(QuickCacheLayer { shared })
    }
}

async fn sweeper<K, V>(shared: Weak<Shared<K, V>>, mut ticker: Ticker)
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    while ticker.tick().await {
        let Some(shared) = shared.upgrade() else { return };
        shared.sweep();
    }
}

/// A bounded in-memory layer on quick_cache's synchronous cache (S3-FIFO eviction).
///
/// Each entry keeps its absolute expiry beside the value: an expired entry is never
/// returned, and is removed when read, when evicted, or by the sweeper. Reads and writes
/// are answered synchronously (no future on an L1 hit). Values are cloned out on every hit:
/// use `Arc<T>` for large values.
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor::memory::QuickCacheLayer;
/// use capacitor::Layer;
/// use std::time::Duration;
///
/// let l1 = QuickCacheLayer::builder().max_capacity(1_000).build::<String, u64>()?;
/// l1.set(&"a".into(), &1, Some(Duration::from_secs(60))).await?;
/// let entry = l1.get(&"a".into()).await?.expect("hit");
/// assert_eq!(entry.value, 1);
/// assert!(entry.expires_at.is_some());
/// # Ok::<(), capacitor::Error>(()) }).unwrap();
/// ```
pub struct QuickCacheLayer<K, V> {
    shared: Arc<Shared<K, V>>,
}

impl QuickCacheLayer<(), ()> {
    /// A builder with the defaults listed on [`QuickCacheLayerBuilder`]; the types are
    /// given to its [`build`](QuickCacheLayerBuilder::build).
    pub fn builder() -> QuickCacheLayerBuilder {
        QuickCacheLayerBuilder {
            max_capacity: None,
            max_bytes: None,
            shards: None,
            clock: system_clock(),
            sweeper: true,
            sweep_interval: SWEEP_INTERVAL,
        }
    }
}

impl<K, V> fmt::Debug for QuickCacheLayer<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuickCacheLayer")
            .field("closed", &self.shared.closed)
            .finish_non_exhaustive()
    }
}

impl<K, V> QuickCacheLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn check_open(&self, op: Operation) -> Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Error::closed(op));
        }
        Ok(())
    }

    #[inline]
    fn read(&self, key: &K) -> Result<Option<Entry<V>>> {
        self.check_open(Operation::Get)?;
        let Some(stored) = self.shared.cache.get(key) else {
            return Ok(None);
        };
        // Entries without expiry (the common L1 case) never read the clock.
        if stored.expires != NEVER {
            let now = self.shared.clock.now();
            if stored.is_expired(now) {
                self.shared.cache.remove_if(key, |s| s.is_expired(now));
                return Ok(None);
            }
        }
        let expires_at = stored.expires_at();
        Ok(Some(Entry::new(stored.value, expires_at)))
    }

    fn write(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.check_open(Operation::Set)?;
        // Entries without TTL (the common L1 case) never read the clock.
        let expires_at = ttl.and_then(|ttl| expiry_for(self.shared.clock.now(), Some(ttl)));
        self.shared
            .cache
            .insert(key.clone(), Stored::new(value.clone(), expires_at));
        Ok(())
    }

    fn remove(&self, key: &K) -> bool {
        self.shared
            .cache
            .remove(key)
            .is_some_and(|(_, s)| s.expires == NEVER || !s.is_expired(self.shared.clock.now()))
    }

    /// Entries held, expired ones not yet removed included.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor::memory::QuickCacheLayer;
    /// use capacitor::Layer;
    ///
    /// let layer = QuickCacheLayer::builder().max_capacity(100).build::<u64, u64>()?;
    /// for i in 0..1_000 {
    ///     layer.set(&i, &i, None).await?;
    /// }
    /// assert!(layer.entry_count() <= 100);
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub fn entry_count(&self) -> u64 {
        self.shared.cache.len() as u64
    }

    /// Total weight held: bytes with [`QuickCacheLayerBuilder::max_bytes`], entries
    /// otherwise.
    pub fn weighted_size(&self) -> u64 {
        self.shared.cache.weight()
    }

    /// Removes every expired entry now; returns how many were removed.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor::memory::QuickCacheLayer;
    /// use capacitor::Layer;
    /// use std::time::Duration;
    ///
    /// let layer = QuickCacheLayer::builder().sweeper(false).build::<u64, u64>()?;
    /// layer.set(&1, &1, Some(Duration::from_millis(1))).await?;
    /// tokio::time::sleep(Duration::from_millis(5)).await;
    /// assert_eq!(layer.sweep(), 1);
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub fn sweep(&self) -> usize {
        self.shared.sweep()
    }
}

#[async_trait]
impl<K, V> Layer<K, V> for QuickCacheLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        "quick_cache"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_sync_ops()
    }

    #[inline]
    fn get_sync(&self, key: &K) -> Option<Result<Option<Entry<V>>>> {
        Some(self.read(key))
    }

    #[inline]
    fn set_sync(&self, key: &K, value: &V, ttl: Option<Duration>) -> Option<Result<()>> {
        Some(self.write(key, value, ttl))
    }

    #[inline]
    fn delete_sync(&self, key: &K) -> Option<Result<bool>> {
        Some(self.check_open(Operation::Delete).map(|()| self.remove(key)))
    }

    fn clear_sync(&self) -> Option<Result<()>> {
        Some(
            self.check_open(Operation::Clear)
                .map(|()| self.shared.cache.clear()),
        )
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        self.read(key)
    }

    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.write(key, value, ttl)
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
        let expires_at = ttl.and_then(|ttl| expiry_for(self.shared.clock.now(), Some(ttl)));
        for (k, v) in entries {
            self.shared
                .cache
                .insert(k.clone(), Stored::new(v.clone(), expires_at));
        }
        Ok(())
    }

    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        self.check_open(Operation::DeleteMany)?;
        Ok(keys.iter().map(|k| u64::from(self.remove(k))).sum())
    }

    async fn flush(&self) -> Result<()> {
        self.check_open(Operation::Flush)
    }

    async fn close(&self) -> Result<()> {
        if !self.shared.closed.swap(true, Ordering::AcqRel) {
            self.shared.stop.stop();
            self.shared.cache.clear();
        }
        Ok(())
    }
}
