//! [`DashMapLayer`]: an unbounded concurrent map with lazy expiry.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use capacitor_core::background::{Stop, Ticker};
use capacitor_core::{
    async_trait, expiry_for, system_clock, Capabilities, Clock, Entry, Error, Layer, Operation, Result,
    SharedClock,
};
use dashmap::DashMap;

struct Shared<K, V> {
    map: DashMap<K, Entry<V>>,
    /// With [`DashMapLayerBuilder::tags`]: the tags of each key's last write. Every write
    /// holds this lock while it changes `map`, so the two never disagree.
    tags: Option<Mutex<Tags<K>>>,
    clock: SharedClock,
    closed: AtomicBool,
    /// Ends the sweeper when pulled (`close`) or dropped (the layer dropped).
    stop: Stop,
}

/// Tag -> keys, and key -> tags.
struct Tags<K> {
    by_tag: HashMap<String, HashSet<K>>,
    by_key: HashMap<K, Vec<String>>,
}

impl<K: Hash + Eq + Clone> Tags<K> {
    fn new() -> Self {
        Tags {
            by_tag: HashMap::new(),
            by_key: HashMap::new(),
        }
    }

    fn untag(&mut self, key: &K) {
        if let Some(tags) = self.by_key.remove(key) {
            for tag in tags {
                if let Some(keys) = self.by_tag.get_mut(&tag) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.by_tag.remove(&tag);
                    }
                }
            }
        }
    }

    fn tag(&mut self, key: &K, tags: &[String]) {
        self.untag(key);
        if tags.is_empty() {
            return;
        }
        for tag in tags {
            self.by_tag.entry(tag.clone()).or_default().insert(key.clone());
        }
        self.by_key.insert(key.clone(), tags.to_vec());
    }
}

impl<K: Hash + Eq + Clone, V> Shared<K, V> {
    fn tags(&self) -> Option<MutexGuard<'_, Tags<K>>> {
        self.tags
            .as_ref()
            .map(|t| t.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn sweep(&self) -> usize {
        let now = self.clock.now();
        let before = self.map.len();
        match self.tags() {
            None => self.map.retain(|_, e| !e.is_expired(now)),
            Some(mut tags) => self.map.retain(|k, e| {
                let live = !e.is_expired(now);
                if !live {
                    tags.untag(k);
                }
                live
            }),
        }
        before.saturating_sub(self.map.len())
    }
}

/// How often the sweeper runs unless [`DashMapLayerBuilder::sweep_interval`] says.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Builds a [`DashMapLayer`]; the key and value types are given to
/// [`build`](DashMapLayerBuilder::build).
///
/// Defaults: the system clock; the sweeper on, every 60 s (expired entries are also
/// removed when read), as in every capacitor layer that sweeps.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use capacitor::memory::DashMapLayer;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let swept = DashMapLayer::builder().sweep_interval(Duration::from_secs(10)).build::<u64, String>()?;
/// let lazy = DashMapLayer::builder().sweeper(false).build::<u64, String>()?; // expired entries go when read
/// # let _ = (swept, lazy);
/// # Ok::<(), capacitor::Error>(()) }).unwrap();
/// ```
#[must_use]
pub struct DashMapLayerBuilder {
    clock: SharedClock,
    sweeper: bool,
    sweep_interval: Duration,
    tags: bool,
}

impl fmt::Debug for DashMapLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DashMapLayerBuilder")
            .field("sweeper", &self.sweeper)
            .field("sweep_interval", &self.sweep_interval)
            .finish()
    }
}

impl DashMapLayerBuilder {
    /// The clock expiries are computed and checked against.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Whether a tokio task removes expired entries every
    /// [`sweep_interval`](Self::sweep_interval) (without it, expired entries that are never
    /// read again stay in memory). The task stops when the layer is closed or dropped.
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

    /// Keep the tags of each key's last write, for
    /// [`Layer::set_tagged`] and [`Layer::remove_by_tag`] (the composer's
    /// `set_with(.., SetOptions::tags(..))` and `remove_by_tag` when this layer is the
    /// authoritative one). Costs every write one lock shared by the whole layer, and the
    /// index's memory (each tag, and each key once per tag). Default: off.
    pub fn tags(mut self, on: bool) -> Self {
        self.tags = on;
        self
    }

    /// Validates and builds the layer.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](capacitor_core::ErrorKind::Config) for a zero sweep interval,
    /// or the sweeper on outside a tokio runtime (build inside one, or turn it off with
    /// [`sweeper(false)`](Self::sweeper)).
    pub fn build<K, V>(self) -> Result<DashMapLayer<K, V>>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        if self.sweep_interval.is_zero() {
            return Err(Error::config("sweep_interval", "must be greater than zero"));
        }
        let shared = Arc::new(Shared {
            map: DashMap::new(),
            tags: self.tags.then(|| Mutex::new(Tags::new())),
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
        Ok(DashMapLayer { shared })
    }
}

async fn sweeper<K: Hash + Eq + Clone, V>(shared: Weak<Shared<K, V>>, mut ticker: Ticker) {
    while ticker.tick().await {
        let Some(shared) = shared.upgrade() else { return };
        shared.sweep();
    }
}

/// An unbounded in-memory layer on dashmap, with lazy expiry (an expired entry is removed
/// when read) and an optional sweeper. Reads are answered synchronously.
///
/// Unbounded: use it for data sets known to fit in memory, or under a bounded
/// [`MokaLayer`](crate::MokaLayer).
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor::Layer;
/// use capacitor::memory::DashMapLayer;
/// use std::time::Duration;
///
/// let layer = DashMapLayer::builder().sweep_interval(Duration::from_secs(30)).build::<u64, String>()?;
/// layer.set(&7, &"seven".to_string(), None).await?;
/// assert_eq!(layer.get(&7).await?.map(|e| e.value), Some("seven".to_string()));
/// # Ok::<(), capacitor::Error>(()) }).unwrap();
/// ```
pub struct DashMapLayer<K, V> {
    shared: Arc<Shared<K, V>>,
}

impl<K, V> fmt::Debug for DashMapLayer<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DashMapLayer")
            .field("closed", &self.shared.closed)
            .finish_non_exhaustive()
    }
}

impl DashMapLayer<(), ()> {
    /// A builder with the defaults listed on [`DashMapLayerBuilder`].
    pub fn builder() -> DashMapLayerBuilder {
        DashMapLayerBuilder {
            clock: system_clock(),
            sweeper: true,
            sweep_interval: SWEEP_INTERVAL,
            tags: false,
        }
    }
}

impl<K, V> Default for DashMapLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V> DashMapLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// An empty layer on the system clock, without sweeper (it needs no runtime; the
    /// [`builder`](DashMapLayer::builder) has one by default).
    pub fn new() -> Self {
        DashMapLayer {
            shared: Arc::new(Shared {
                map: DashMap::new(),
                tags: None,
                clock: system_clock(),
                closed: AtomicBool::new(false),
                stop: Stop::new(),
            }),
        }
    }

    fn check_open(&self, op: Operation) -> Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Error::closed(op));
        }
        Ok(())
    }

    fn read(&self, key: &K) -> Result<Option<Entry<V>>> {
        self.check_open(Operation::Get)?;
        let Some(entry) = self.shared.map.get(key) else {
            return Ok(None);
        };
        // Entries without expiry (the common L1 case) never read the clock.
        if let Some(at) = entry.expires_at {
            let now = self.shared.clock.now();
            if at <= now {
                drop(entry); // release the shard's read lock before taking its write lock
                self.shared.map.remove_if(key, |_, e| e.is_expired(now));
                return Ok(None);
            }
        }
        Ok(Some(entry.clone()))
    }

    fn write(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.check_open(Operation::Set)?;
        // Entries without TTL (the common L1 case) never read the clock.
        let expires_at = ttl.and_then(|ttl| expiry_for(self.shared.clock.now(), Some(ttl)));
        let entry = Entry::new(value.clone(), expires_at);
        match self.shared.tags() {
            None => {
                self.shared.map.insert(key.clone(), entry);
            }
            Some(mut tags) => {
                self.shared.map.insert(key.clone(), entry);
                tags.untag(key);
            }
        }
        Ok(())
    }

    fn remove(&self, key: &K) -> bool {
        let removed = match self.shared.tags() {
            None => self.shared.map.remove(key),
            Some(mut tags) => {
                tags.untag(key);
                self.shared.map.remove(key)
            }
        };
        removed.is_some_and(|(_, e)| e.expires_at.is_none_or(|at| at > self.shared.clock.now()))
    }

    /// Entries held, expired ones not yet removed included.
    pub fn len(&self) -> usize {
        self.shared.map.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.shared.map.is_empty()
    }

    /// Removes every expired entry now; returns how many were removed.
    pub fn sweep(&self) -> usize {
        self.shared.sweep()
    }
}

#[async_trait]
impl<K, V> Layer<K, V> for DashMapLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        "dashmap"
    }

    fn capabilities(&self) -> Capabilities {
        let caps = Capabilities::new().with_sync_ops();
        if self.shared.tags.is_some() {
            caps.with_tags()
        } else {
            caps
        }
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
                .map(|()| match self.shared.tags() {
                    None => self.shared.map.clear(),
                    Some(mut tags) => {
                        self.shared.map.clear();
                        *tags = Tags::new();
                    }
                }),
        )
    }

    async fn set_tagged(&self, key: &K, value: &V, ttl: Option<Duration>, tags: &[String]) -> Result<()> {
        self.check_open(Operation::Set)?;
        let Some(mut index) = self.shared.tags() else {
            return Err(Error::unsupported(
                Operation::Set,
                "this DashMapLayer keeps no tags (DashMapLayerBuilder::tags)",
            ));
        };
        let expires_at = ttl.and_then(|ttl| expiry_for(self.shared.clock.now(), Some(ttl)));
        self.shared
            .map
            .insert(key.clone(), Entry::new(value.clone(), expires_at));
        index.tag(key, tags);
        Ok(())
    }

    async fn remove_by_tag(&self, tag: &str) -> Result<Vec<K>> {
        self.check_open(Operation::DeleteMany)?;
        let Some(mut index) = self.shared.tags() else {
            return Err(Error::unsupported(
                Operation::DeleteMany,
                "this DashMapLayer keeps no tags (DashMapLayerBuilder::tags)",
            ));
        };
        let keys: Vec<K> = index
            .by_tag
            .get(tag)
            .map(|k| k.iter().cloned().collect())
            .unwrap_or_default();
        for key in &keys {
            index.untag(key);
            self.shared.map.remove(key);
        }
        Ok(keys)
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
            self.shared.map.clear();
        }
        Ok(())
    }
}
