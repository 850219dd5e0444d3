//! Test doubles: a plain map layer with a controllable clock, and a wrapper that fails or
//! pauses on demand.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use futures_core::future::BoxFuture;

use super::wrap::{Around, GateOp, Wrapped};
use crate::entry::{expiry_for, system_clock, Clock, Entry, SharedClock};
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::layer::{Capabilities, EntryStream, Layer, WriteOp};

/// A simple `Mutex<HashMap>` layer with lazy expiry against a [`Clock`]. Async only (no
/// synchronous fast path), supports [`Layer::apply_atomic`] and tags. Meant for tests and
/// examples.
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor_core::{testkit::MapLayer, Layer, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new(0);
/// let layer = MapLayer::with_clock(clock.clone());
/// layer.set(&"k", &1, Some(Duration::from_secs(1))).await?;
/// clock.advance(Duration::from_secs(1));
/// assert_eq!(layer.get(&"k").await?, None);
/// # Ok::<(), capacitor_core::Error>(()) }).unwrap();
/// ```
pub struct MapLayer<K, V> {
    map: Mutex<HashMap<K, Entry<V>>>,
    /// Key -> the tags of its last write (locked after `map`).
    tags: Mutex<HashMap<K, Vec<String>>>,
    clock: SharedClock,
    closed: AtomicBool,
    /// Set by [`MapLayer::scannable`]: how to match keys against a scan prefix.
    key_bytes: Option<fn(&K) -> Vec<u8>>,
}

impl<K, V> fmt::Debug for MapLayer<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapLayer").finish_non_exhaustive()
    }
}

impl<K, V> Default for MapLayer<K, V> {
    fn default() -> Self {
        MapLayer {
            map: Mutex::new(HashMap::new()),
            tags: Mutex::new(HashMap::new()),
            clock: system_clock(),
            closed: AtomicBool::new(false),
            key_bytes: None,
        }
    }
}

impl<K, V> MapLayer<K, V> {
    /// An empty layer on the system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty layer on `clock`.
    pub fn with_clock(clock: impl Clock) -> Self {
        MapLayer {
            clock: Arc::new(clock),
            ..Self::default()
        }
    }

    fn open(&self, op: Operation) -> Result<MutexGuard<'_, HashMap<K, Entry<V>>>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(op));
        }
        Ok(self.map.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Number of stored entries, expired ones included (for assertions).
    pub fn raw_len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl<K: crate::StorageKey, V> MapLayer<K, V> {
    /// An empty layer that also answers [`Layer::scan`] (from a sorted snapshot of the
    /// matching entries: fine for tests, not bounded-memory).
    pub fn scannable(clock: impl Clock) -> Self {
        MapLayer {
            key_bytes: Some(|k: &K| k.encode_key().into_owned()),
            ..Self::with_clock(clock)
        }
    }
}

impl<K: Hash + Eq, V: Clone> MapLayer<K, V> {
    /// Forgets the tags of `keys` (a write without tags).
    fn untag<'a>(&self, keys: impl IntoIterator<Item = &'a K>)
    where
        K: 'a,
    {
        let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        if !tags.is_empty() {
            keys.into_iter().for_each(|k| {
                tags.remove(k);
            });
        }
    }

    /// The stored entry, expired or not, bypassing every check (for assertions).
    pub fn raw_entry(&self, key: &K) -> Option<Entry<V>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }
}

#[async_trait]
impl<K, V> Layer<K, V> for MapLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        "map"
    }

    fn capabilities(&self) -> Capabilities {
        let caps = Capabilities::new().with_transactions().with_tags();
        if self.key_bytes.is_some() {
            caps.with_scan()
        } else {
            caps
        }
    }

    fn scan(&self, prefix: &[u8]) -> Result<EntryStream<K, V>> {
        let Some(key_bytes) = self.key_bytes else {
            return Err(Error::unsupported(
                Operation::Scan,
                "MapLayer::new() cannot scan; use MapLayer::scannable",
            ));
        };
        let now = self.clock.now();
        let mut hits: Vec<(Vec<u8>, K, Entry<V>)> = self
            .open(Operation::Scan)?
            .iter()
            .filter(|(_, e)| !e.is_expired(now))
            .map(|(k, e)| (key_bytes(k), k.clone(), e.clone()))
            .filter(|(b, _, _)| b.starts_with(prefix))
            .collect();
        hits.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Box::pin(VecStream(
            hits.into_iter()
                .map(|(_, k, e)| (k, e))
                .collect::<Vec<_>>()
                .into_iter(),
        )))
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        let now = self.clock.now();
        let mut map = self.open(Operation::Get)?;
        match map.get(key) {
            Some(e) if e.is_expired(now) => {
                map.remove(key);
                Ok(None)
            }
            other => Ok(other.cloned()),
        }
    }

    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        let entry = Entry::new(value.clone(), expiry_for(self.clock.now(), ttl));
        let mut map = self.open(Operation::Set)?;
        map.insert(key.clone(), entry);
        self.untag([key]);
        Ok(())
    }

    async fn set_tagged(&self, key: &K, value: &V, ttl: Option<Duration>, tags: &[String]) -> Result<()> {
        let entry = Entry::new(value.clone(), expiry_for(self.clock.now(), ttl));
        let mut map = self.open(Operation::Set)?;
        map.insert(key.clone(), entry);
        let mut all = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        if tags.is_empty() {
            all.remove(key);
        } else {
            all.insert(key.clone(), tags.to_vec());
        }
        Ok(())
    }

    async fn remove_by_tag(&self, tag: &str) -> Result<Vec<K>> {
        let mut map = self.open(Operation::DeleteMany)?;
        let mut all = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<K> = all
            .iter()
            .filter(|(_, tags)| tags.iter().any(|t| t == tag))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &keys {
            map.remove(key);
            all.remove(key);
        }
        Ok(keys)
    }

    async fn delete(&self, key: &K) -> Result<bool> {
        let now = self.clock.now();
        let mut map = self.open(Operation::Delete)?;
        let removed = map.remove(key);
        self.untag([key]);
        Ok(removed.is_some_and(|e| !e.is_expired(now)))
    }

    async fn apply_atomic(&self, ops: &[WriteOp<K, V>]) -> Result<()> {
        let now = self.clock.now();
        let mut map = self.open(Operation::Transaction)?;
        self.untag(ops.iter().map(WriteOp::key));
        for op in ops {
            match op {
                WriteOp::Set { key, value, ttl } => {
                    map.insert(key.clone(), Entry::new(value.clone(), expiry_for(now, *ttl)));
                }
                WriteOp::Delete { key } => {
                    map.remove(key);
                }
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

struct VecStream<T>(std::vec::IntoIter<T>);

// No field is structurally pinned.
impl<T> Unpin for VecStream<T> {}

impl<T> futures_core::Stream for VecStream<T> {
    type Item = Result<T>;
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Ready(self.get_mut().0.next().map(Ok))
    }
}

/// Switches shared between a test and a [`FaultyLayer`].
#[derive(Debug)]
pub struct Faults {
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    fail_deletes: AtomicBool,
    pause_armed: AtomicBool,
    paused: Semaphore,
    release: Semaphore,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            fail_deletes: AtomicBool::new(false),
            pause_armed: AtomicBool::new(false),
            paused: Semaphore::new(0),
            release: Semaphore::new(0),
        }
    }
}

impl Faults {
    /// Make `get`/`exists`/`get_many` fail with [`ErrorKind::Unavailable`].
    pub fn fail_reads(&self, on: bool) {
        self.fail_reads.store(on, Ordering::SeqCst);
    }
    /// Make `set`/`set_many`/`apply_atomic` fail with [`ErrorKind::Unavailable`].
    pub fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }
    /// Make `delete`/`delete_many` fail with [`ErrorKind::Unavailable`].
    pub fn fail_deletes(&self, on: bool) {
        self.fail_deletes.store(on, Ordering::SeqCst);
    }
    /// The next `get` reads the inner layer, then waits for [`Faults::resume`] before
    /// returning what it read.
    pub fn pause_next_read(&self) {
        self.pause_armed.store(true, Ordering::SeqCst);
    }
    /// Waits until a paused `get` has read its value.
    pub async fn read_paused(&self) {
        if let Ok(p) = self.paused.acquire().await {
            p.forget();
        }
    }
    /// Lets the paused `get` return.
    pub fn resume(&self) {
        self.release.add_permits(1);
    }

    fn check(&self, flag: &AtomicBool, op: Operation) -> Result<()> {
        if flag.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Unavailable, op, "injected fault"));
        }
        Ok(())
    }
}

/// Wraps a layer and fails or pauses on demand through its [`Faults`]: a [`Wrapped`] layer
/// whose [`Around`] is its switches.
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor_core::{testkit::{FaultyLayer, MapLayer}, ErrorKind, Layer};
///
/// let layer = FaultyLayer::new(MapLayer::<u8, u8>::new());
/// let faults = layer.faults();
/// faults.fail_writes(true);
/// let err = layer.set(&1, &1, None).await.unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Unavailable);
/// # });
/// ```
pub type FaultyLayer<K, V> = Wrapped<K, V, Faults>;

impl<K, V> Wrapped<K, V, Faults>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// Wraps `inner` with every fault off.
    pub fn new(inner: impl Layer<K, V>) -> Self {
        Self::shared(Arc::new(inner))
    }

    /// Wraps a shared layer (so the test can also read it directly).
    pub fn shared(inner: Arc<dyn Layer<K, V>>) -> Self {
        Wrapped::with_shared(inner, Arc::default())
    }

    /// The switches.
    pub fn faults(&self) -> Arc<Faults> {
        self.around()
    }
}

impl Around for Faults {
    fn around<'a, T: Send + 'a>(
        &'a self,
        op: GateOp,
        call: BoxFuture<'a, Result<T>>,
    ) -> BoxFuture<'a, Result<T>> {
        Box::pin(async move {
            let (flag, operation) = match op {
                GateOp::Get => (&self.fail_reads, Operation::Get),
                GateOp::Exists => (&self.fail_reads, Operation::Exists),
                GateOp::GetMany => (&self.fail_reads, Operation::GetMany),
                GateOp::Set => (&self.fail_writes, Operation::Set),
                GateOp::SetMany => (&self.fail_writes, Operation::SetMany),
                GateOp::Atomic => (&self.fail_writes, Operation::Transaction),
                GateOp::Delete => (&self.fail_deletes, Operation::Delete),
                GateOp::DeleteMany => (&self.fail_deletes, Operation::DeleteMany),
            };
            self.check(flag, operation)?;
            let got = call.await;
            if op == GateOp::Get && self.pause_armed.swap(false, Ordering::SeqCst) {
                self.paused.add_permits(1);
                if let Ok(p) = self.release.acquire().await {
                    p.forget();
                }
            }
            got
        })
    }
}

/// The endpoints of a [`LoopbackBus`], by id.
type Sinks<K> = Arc<Mutex<Vec<(usize, crate::InvalidationSink<K>)>>>;

/// What a [`LoopbackBus`]'s endpoints share.
struct Hub<K> {
    sinks: Sinks<K>,
    /// Subscriptions not yet up (see [`LoopbackBus::hold_subscriptions`]).
    held: Mutex<Vec<(usize, crate::InvalidationSink<K>)>>,
    holding: std::sync::atomic::AtomicBool,
    down: std::sync::atomic::AtomicBool,
    delivered: std::sync::atomic::AtomicU64,
}

/// An in-process [`InvalidationBus`](crate::InvalidationBus) hub for tests: each
/// [`endpoint`](LoopbackBus::endpoint) delivers what it publishes to every other endpoint,
/// at once, inside `publish`. It can be taken down ([`set_down`](LoopbackBus::set_down))
/// and its subscriptions held back ([`hold_subscriptions`](LoopbackBus::hold_subscriptions))
/// to test start-up and outages.
///
/// # Examples
///
/// ```
/// use capacitor_core::testkit::LoopbackBus;
///
/// let hub = LoopbackBus::<String>::new();
/// let (a, b) = (hub.endpoint(), hub.endpoint());
/// # let _ = (a, b);
/// ```
pub struct LoopbackBus<K> {
    hub: Arc<Hub<K>>,
    next: std::sync::atomic::AtomicUsize,
}

impl<K> fmt::Debug for LoopbackBus<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopbackBus").finish_non_exhaustive()
    }
}

impl<K: Clone + Send + Sync + 'static> Default for LoopbackBus<K> {
    fn default() -> Self {
        LoopbackBus {
            hub: Arc::new(Hub {
                sinks: Arc::default(),
                held: Mutex::default(),
                holding: std::sync::atomic::AtomicBool::new(false),
                down: std::sync::atomic::AtomicBool::new(false),
                delivered: std::sync::atomic::AtomicU64::new(0),
            }),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<K: Clone + Send + Sync + 'static> LoopbackBus<K> {
    /// A hub with no endpoint.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new endpoint (one per composer).
    pub fn endpoint(&self) -> Arc<dyn crate::InvalidationBus<K>> {
        Arc::new(LoopbackEndpoint {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            hub: Arc::clone(&self.hub),
        })
    }

    /// Tells every endpoint that messages may have been missed.
    pub fn reconnect_all(&self) {
        let sinks: Vec<_> = locked(&self.hub.sinks).clone();
        for (_, sink) in sinks {
            sink(crate::Invalidation::All);
        }
    }

    /// Takes the publishing side down (`publish` fails with `Unavailable`) or brings it
    /// back; subscriptions stay up ([`reconnect_all`](Self::reconnect_all) to tell them
    /// they missed messages).
    pub fn set_down(&self, down: bool) {
        self.hub.down.store(down, Ordering::SeqCst);
    }

    /// While on, `subscribe` calls wait (their subscriptions are not up: nothing is
    /// delivered to them); turning it off brings them up, each told
    /// [`Invalidation::All`](crate::Invalidation::All).
    pub fn hold_subscriptions(&self, hold: bool) {
        self.hub.holding.store(hold, Ordering::SeqCst);
        if !hold {
            let held = std::mem::take(&mut *locked(&self.hub.held));
            for (id, sink) in held {
                locked(&self.hub.sinks).push((id, Arc::clone(&sink)));
                sink(crate::Invalidation::All);
            }
        }
    }

    /// Messages delivered so far, counted once per message (not per receiver).
    pub fn delivered(&self) -> u64 {
        self.hub.delivered.load(Ordering::SeqCst)
    }
}

struct LoopbackEndpoint<K> {
    id: usize,
    hub: Arc<Hub<K>>,
}

#[async_trait]
impl<K: Clone + Send + Sync + 'static> crate::InvalidationBus<K> for LoopbackEndpoint<K> {
    async fn connect(&self) -> Result<()> {
        Ok(())
    }

    async fn publish(&self, message: &crate::BusMessage<K>) -> Result<()> {
        if self.hub.down.load(Ordering::SeqCst) {
            return Err(Error::new(
                crate::ErrorKind::Unavailable,
                crate::Operation::Publish,
                "the loopback bus is down",
            ));
        }
        self.hub.delivered.fetch_add(1, Ordering::SeqCst);
        let sinks: Vec<_> = locked(&self.hub.sinks).clone();
        for (id, sink) in sinks {
            if id != self.id {
                sink(crate::Invalidation::Message(message.clone()));
            }
        }
        Ok(())
    }

    fn subscribe(&self, sink: crate::InvalidationSink<K>) -> Result<()> {
        if self.hub.holding.load(Ordering::SeqCst) {
            locked(&self.hub.held).push((self.id, sink));
            return Ok(());
        }
        locked(&self.hub.sinks).push((self.id, Arc::clone(&sink)));
        // Subscribed: what was cached before may have changed unseen.
        sink(crate::Invalidation::All);
        Ok(())
    }
}
