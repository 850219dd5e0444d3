//! The composer: [`MultiLayer`] and its builder.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{min_ttl, BreakerSetting, LayerConfig, SetOptions, WritePolicy};
use crate::failsafe::{FailSafe, Store as FailSafeStore};
use crate::health::{
    is_failure, Admit, Breaker, BreakerState, CircuitBreaker, DirtyKeys, HealthEvent, HealthListener,
};

mod loader;
#[cfg(feature = "metrics")]
mod metrics;
mod refresh;
mod transaction;
mod warmup;
mod write;

#[cfg(feature = "metrics")]
pub use self::metrics::MetricsReporter;

pub use transaction::Transaction;
pub use warmup::{WarmUp, WarmUpReport};

use crate::bus::{Invalidation, InvalidationBus};
use crate::entry::{system_clock, Clock, Entry, SharedClock, Timestamp};
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::guard::{Generations, Ticket};
use crate::layer::{Capabilities, Layer};
use crate::observe::traced;
use crate::scan::Scan;
use crate::stats::{BusStats, Counter, LayerCounters, Stats};
use crate::writeback::{Pending, Queue};
use loader::{jitter, Flights, NegativeCache};
pub use refresh::RefreshStats;
use refresh::Refresher;
use write::{Writes, Written};

struct Slot<K, V> {
    name: String,
    layer: Arc<dyn Layer<K, V>>,
    ttl: Option<Duration>,
    read_only: bool,
    /// The layer answers synchronously and has no timeout or breaker to apply.
    sync_ops: bool,
    /// Every writable layer above this one has synchronous operations: a promotion from
    /// here completes without awaiting.
    sync_above: bool,
    counters: LayerCounters,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    breaker: Option<Breaker>,
    /// Cache layers reached over the network: keys they may hold outdated copies of.
    suspects: Option<DirtyKeys<K>>,
    on_health: Option<HealthListener>,
    cache: Arc<str>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

impl<K, V> Slot<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// Runs one operation on this layer under its breaker and timeout.
    async fn call<T>(
        &self,
        op: Operation,
        access: Access,
        operation: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let admit = match &self.breaker {
            None => Admit::Call,
            Some(breaker) => {
                let (admit, change) = breaker.admit();
                if let Some(change) = change {
                    self.transition(change);
                }
                admit
            }
        };
        if admit == Admit::Skip {
            self.counters.incr(Counter::Skipped);
            return Err(Error::circuit_open(op, self.name.clone()));
        }
        let timeout = match access {
            Access::Read => self.read_timeout,
            Access::Write => self.write_timeout,
        };
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        let result = match timeout {
            None => operation.await,
            Some(limit) => match tokio::time::timeout(limit, operation).await {
                Ok(result) => result,
                Err(_) => {
                    self.counters.incr(Counter::Timeout);
                    Err(Error::new(
                        ErrorKind::Timeout,
                        op,
                        format!("no answer within the layer's {limit:?} timeout"),
                    ))
                }
            },
        };
        #[cfg(feature = "metrics")]
        crate::observe::record_latency(&self.cache, &self.name, op, &result, started.elapsed());
        if let Some(breaker) = &self.breaker {
            let failed = matches!(&result, Err(e) if is_failure(e));
            if let Some(change) = breaker.report(admit, failed) {
                self.transition(change);
            }
        }
        result
    }

    fn transition(&self, (from, to): (BreakerState, BreakerState)) {
        crate::observe::breaker_changed(&self.cache, &self.name, from, to);
        if let Some(listener) = &self.on_health {
            listener(&HealthEvent {
                layer: self.name.clone(),
                from,
                to,
            });
        }
    }

    fn breaker_state(&self) -> BreakerState {
        self.breaker.as_ref().map_or(BreakerState::Closed, Breaker::state)
    }

    /// Whether a read of `key` must pass this layer by (it may hold an outdated copy).
    #[inline]
    fn suspect(&self, key: &K, clock: &SharedClock) -> bool {
        self.suspects.as_ref().is_some_and(|s| s.skip(key, clock.now()))
    }

    /// Counts the failure of an invalidation (a skip by the open breaker is counted
    /// apart) and marks `keys` suspect here.
    fn invalidation_failed<'a>(&self, err: &Error, keys: impl IntoIterator<Item = &'a K>, now: Timestamp) {
        if !err.is_circuit_open() {
            self.counters.incr(Counter::Error);
        }
        self.suspected(keys, now);
    }

    /// This layer now holds the current state of `keys`.
    fn cleaned<'a>(&self, keys: impl IntoIterator<Item = &'a K>, now: Timestamp) {
        if let Some(s) = &self.suspects {
            s.clean(keys, now);
        }
    }

    /// A write of `keys` could neither reach this layer nor remove its copies.
    fn suspected<'a>(&self, keys: impl IntoIterator<Item = &'a K>, now: Timestamp) {
        if let Some(s) = &self.suspects {
            s.mark(keys, now);
        }
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        match self.sync_ops.then(|| self.layer.get_sync(key)).flatten() {
            Some(result) => result,
            None => self.call(Operation::Get, Access::Read, self.layer.get(key)).await,
        }
    }

    async fn exists(&self, key: &K) -> Result<bool> {
        match self.sync_ops.then(|| self.layer.get_sync(key)).flatten() {
            Some(result) => result.map(|e| e.is_some()),
            None => {
                self.call(Operation::Exists, Access::Read, self.layer.exists(key))
                    .await
            }
        }
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        self.call(Operation::GetMany, Access::Read, self.layer.get_many(keys))
            .await
    }

    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        match self
            .sync_ops
            .then(|| self.layer.set_sync(key, value, ttl))
            .flatten()
        {
            Some(result) => result,
            None => {
                self.call(Operation::Set, Access::Write, self.layer.set(key, value, ttl))
                    .await
            }
        }
    }

    async fn delete(&self, key: &K) -> Result<bool> {
        match self.sync_ops.then(|| self.layer.delete_sync(key)).flatten() {
            Some(result) => result,
            None => {
                self.call(Operation::Delete, Access::Write, self.layer.delete(key))
                    .await
            }
        }
    }

    async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        self.call(
            Operation::SetMany,
            Access::Write,
            self.layer.set_many(entries, ttl),
        )
        .await
    }

    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        self.call(Operation::DeleteMany, Access::Write, self.layer.delete_many(keys))
            .await
    }

    async fn apply_atomic(&self, ops: &[crate::layer::WriteOp<K, V>]) -> Result<()> {
        self.call(
            Operation::Transaction,
            Access::Write,
            self.layer.apply_atomic(ops),
        )
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.call(Operation::Flush, Access::Write, self.layer.flush())
            .await
    }
}

impl<K, V> Slot<K, V> {
    fn error(&self, err: Error) -> Error {
        if !err.is_circuit_open() {
            self.counters.incr(Counter::Error);
        }
        err.with_layer(self.name.clone())
    }
}

/// A set of layer indices (the first 64 layers; later ones are never members).
#[derive(Clone, Copy)]
struct Layers(u64);

impl Layers {
    const NONE: Layers = Layers(0);

    fn add(&mut self, i: usize) {
        self.0 |= 1u64.checked_shl(i as u32).unwrap_or(0);
    }

    fn contains(self, i: usize) -> bool {
        self.0 & 1u64.checked_shl(i as u32).unwrap_or(0) != 0
    }
}

/// Keys a cache layer tracks as possibly outdated before it is skipped altogether.
const SUSPECT_KEYS: usize = 100_000;

struct Inner<K, V> {
    name: String,
    slots: Box<[Slot<K, V>]>,
    /// Index of the bottom-most writable layer: the source of truth for writes.
    authoritative: usize,
    promotion: bool,
    fail_on_cache_error: bool,
    policy: WritePolicy,
    guard: Generations,
    clock: SharedClock,
    closed: AtomicBool,
    /// The pending-writes buffer under [`WritePolicy::Back`].
    queue: Option<Queue<K, V>>,
    flights: Flights<K, V>,
    negative: Option<NegativeCache<K>>,
    /// Writes shorten layer TTLs by a random fraction below this.
    ttl_jitter: f64,
    bus: Option<Arc<dyn InvalidationBus<K>>>,
    bus_counters: BusCounters,
    fail_safe: Option<FailSafeStore<K, V>>,
    refresh: Option<Refresher<K>>,
    /// Keys whose last write to the store had an unknown outcome.
    in_doubt: write::InDoubt<K>,
}

#[derive(Default)]
struct BusCounters {
    published: AtomicU64,
    publish_errors: AtomicU64,
    received: AtomicU64,
    clears: AtomicU64,
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Applies a message of the invalidation bus to the in-process layers.
    fn invalidate_local(&self, message: Invalidation<K>) {
        self.bus_counters.received.fetch_add(1, Ordering::Relaxed);
        let local = self.slots.iter().filter(|s| s.sync_ops && !s.read_only);
        match message {
            Invalidation::Key(key) => {
                // As a local write does: promotions racing the message are discarded.
                let _writing = self.guard.begin_write(self.guard.stripe_of(&key));
                if let Some(fail_safe) = &self.fail_safe {
                    fail_safe.forget(&key);
                }
                for slot in local {
                    if !matches!(slot.layer.delete_sync(&key), Some(Ok(_))) {
                        slot.counters.incr(Counter::Error);
                    }
                }
            }
            Invalidation::All => {
                self.bus_counters.clears.fetch_add(1, Ordering::Relaxed);
                let _writing = self.guard.begin_write_all();
                if let Some(fail_safe) = &self.fail_safe {
                    fail_safe.clear();
                }
                for slot in local {
                    if !matches!(slot.layer.clear_sync(), Some(Ok(()))) {
                        slot.counters.incr(Counter::Error);
                    }
                }
            }
        }
    }

    /// Tells the other instances that `key` changed (errors counted, never returned).
    async fn publish(&self, key: &K) {
        if let Some(bus) = &self.bus {
            let counter = match bus.publish(key).await {
                Ok(()) => &self.bus_counters.published,
                Err(_) => &self.bus_counters.publish_errors,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    /// Fail-safe: `value` is the current value of `key`, expiring at `expires_at`.
    fn remember(&self, key: &K, value: &V, expires_at: Option<Timestamp>) {
        if let Some(fail_safe) = &self.fail_safe {
            fail_safe.record(key, value, expires_at, self.clock.now());
        }
    }

    /// Fail-safe: `value`, just read below the top layer under `ticket`, is the current
    /// value of `key`, unless a write of the key began since the ticket (checked before
    /// and after the record, as a promotion is: the writer's record must not be
    /// overwritten by the older value this read found).
    fn remember_read(&self, key: &K, entry: &Entry<V>, ticket: Ticket) {
        if let Some(fail_safe) = &self.fail_safe {
            let _copy = self.guard.begin_copy(ticket);
            if !self.guard.still_valid(ticket) {
                return;
            }
            fail_safe.record(key, &entry.value, entry.expires_at, self.clock.now());
            if !self.guard.still_valid(ticket) {
                fail_safe.forget(key);
            }
        }
    }

    /// Fail-safe: `key` no longer has a value to fall back on.
    fn forget(&self, key: &K) {
        if let Some(fail_safe) = &self.fail_safe {
            fail_safe.forget(key);
        }
    }

    /// A batch read of `keys[p]` for every `p` in `failed` failed with `err`: `out` with
    /// their fail-safe copies, or the error when one of them has none.
    fn stale_many(
        &self,
        keys: &[K],
        failed: &[usize],
        mut out: Vec<Option<Entry<V>>>,
        err: Error,
    ) -> Result<Vec<Option<Entry<V>>>> {
        let Some(fail_safe) = &self.fail_safe else {
            return Err(err);
        };
        let now = self.clock.now();
        for &p in failed {
            match fail_safe.peek(&keys[p], now) {
                Some(entry) => out[p] = Some(entry),
                None => {
                    fail_safe.counted(false, 1);
                    return Err(err);
                }
            }
        }
        fail_safe.counted(true, failed.len());
        Ok(out)
    }

    /// A read of `key` failed with `err`: the fail-safe copy, or the error.
    fn stale_or(&self, key: &K, err: Error) -> Result<Option<Entry<V>>> {
        let servable = !matches!(
            err.kind(),
            ErrorKind::Closed | ErrorKind::InvalidInput | ErrorKind::Unsupported
        );
        match &self.fail_safe {
            Some(fail_safe) if servable => match fail_safe.stale(key, self.clock.now()) {
                Some(entry) => {
                    crate::observe::stale_hit(&self.name);
                    crate::observe::read_outcome(None, false, "stale");
                    Ok(Some(entry))
                }
                None => {
                    crate::observe::read_outcome(None, false, "error");
                    Err(err)
                }
            },
            _ => {
                crate::observe::read_outcome(None, false, "error");
                Err(err)
            }
        }
    }
}

impl<K, V> Inner<K, V> {
    /// The TTL a write gives `slot`: the shorter of the layer's and the write's, jittered.
    fn write_ttl(&self, slot: &Slot<K, V>, ttl: Option<Duration>) -> Option<Duration> {
        jitter(min_ttl(slot.ttl, ttl), self.ttl_jitter)
    }
}

/// Several layers behind one typed key-value API.
///
/// Reads ask the layers in order and return the first hit; with promotion on, the value
/// is copied into the writable layers above with `ttl = min(layer TTL, remaining life)`.
/// Writes go through every writable layer, the authoritative (bottom) one first. See
/// `DESIGN.md` §3 for the full semantics. Cheap to clone (an `Arc` inside); clones share
/// layers and stats.
///
/// A `MultiLayer` is itself a [`Layer`], so it can be a layer of another.
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor_core::{testkit::MapLayer, LayerConfig, MultiLayer};
/// use std::time::Duration;
///
/// let cache = MultiLayer::<String, String>::builder()
///     .layer(LayerConfig::new("l1", MapLayer::new()).ttl(Duration::from_secs(60)))
///     .layer(LayerConfig::new("db", MapLayer::new()))
///     .build()?;
///
/// cache.set("user:42".into(), "Ada".into()).await?;
/// assert_eq!(cache.get(&"user:42".into()).await?, Some("Ada".to_string()));
/// assert!(cache.delete(&"user:42".into()).await?);
/// assert_eq!(cache.get(&"user:42".into()).await?, None);
/// cache.close().await?;
/// # Ok::<(), capacitor_core::Error>(()) }).unwrap();
/// ```
pub struct MultiLayer<K, V> {
    inner: Arc<Inner<K, V>>,
}

type BoxedRead<'a, V> = Pin<Box<dyn Future<Output = Result<Option<Entry<V>>>> + Send + 'a>>;

enum Step<'a, V> {
    Done(Result<Option<Entry<V>>>),
    Await(BoxedRead<'a, V>),
}

enum GetState<'a, K, V> {
    Start { cache: &'a MultiLayer<K, V>, key: &'a K },
    Await(BoxedRead<'a, V>),
    Finished,
}

/// The future of [`MultiLayer::get_entry`].
///
/// Written by hand rather than as an `async fn` so that an L1 hit is answered on the
/// first poll without any nested state machine: the future is three words, and only a
/// read that must wait (an async layer, a promotion) allocates its continuation.
#[must_use = "futures do nothing unless awaited"]
pub struct GetEntry<'a, K, V> {
    state: GetState<'a, K, V>,
}

impl<K, V> fmt::Debug for GetEntry<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetEntry").finish_non_exhaustive()
    }
}

impl<K, V> Future for GetEntry<'_, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    type Output = Result<Option<Entry<V>>>;

    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match std::mem::replace(&mut self.state, GetState::Finished) {
                GetState::Start { cache, key } => {
                    // With `tracing`, one relaxed load decides; the traced read is out of
                    // line so the untraced hit stays as small as without the feature.
                    #[cfg(feature = "tracing")]
                    if tracing::level_enabled!(tracing::Level::DEBUG) {
                        match cache.read_traced(key) {
                            Step::Done(result) => return Poll::Ready(result),
                            Step::Await(fut) => {
                                self.state = GetState::Await(fut);
                                continue;
                            }
                        }
                    }
                    match cache.read_sync_prefix(key) {
                        Step::Done(result) => return Poll::Ready(result),
                        Step::Await(fut) => self.state = GetState::Await(fut),
                    }
                }
                GetState::Await(mut fut) => {
                    return match fut.as_mut().poll(cx) {
                        Poll::Ready(result) => Poll::Ready(result),
                        Poll::Pending => {
                            self.state = GetState::Await(fut);
                            Poll::Pending
                        }
                    }
                }
                GetState::Finished => {
                    return Poll::Ready(Err(Error::new(
                        ErrorKind::InvalidInput,
                        Operation::Get,
                        "read future polled after it completed",
                    )))
                }
            }
        }
    }
}

/// The future of [`MultiLayer::get`]: [`GetEntry`] without the expiry.
#[must_use = "futures do nothing unless awaited"]
#[derive(Debug)]
pub struct Get<'a, K, V>(GetEntry<'a, K, V>);

impl<K, V> Future for Get<'_, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    type Output = Result<Option<V>>;

    // Always inlined, with `GetEntry::poll` and the synchronous prefix: an L1 hit then
    // compiles into the caller with no result moved through the stack (measured: 10-20 ns
    // of a 25 ns hit when the compiler chose not to inline, as it did with `tracing` on).
    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map(|e| e.map(|e| e.value)))
    }
}

impl<K, V> Clone for MultiLayer<K, V> {
    fn clone(&self) -> Self {
        MultiLayer {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K, V> fmt::Debug for MultiLayer<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.inner.slots.iter().map(|s| s.name.as_str()).collect();
        f.debug_struct("MultiLayer")
            .field("name", &self.inner.name)
            .field("layers", &names)
            .field("policy", &self.inner.policy)
            .field("promotion", &self.inner.promotion)
            .finish_non_exhaustive()
    }
}

/// Builds a [`MultiLayer`]; [`build`](MultiLayerBuilder::build) validates everything.
///
/// Defaults: name `"multi"`, promotion on, [`WritePolicy::Through`], cache-layer write
/// failures do not fail the write, the system clock.
#[must_use]
pub struct MultiLayerBuilder<K, V> {
    name: String,
    layers: Vec<LayerConfig<K, V>>,
    promotion: bool,
    fail_on_cache_error: bool,
    policy: WritePolicy,
    clock: SharedClock,
    cache_misses_for: Option<Duration>,
    ttl_jitter: f64,
    bus: Option<Arc<dyn InvalidationBus<K>>>,
    fail_safe: Option<FailSafe>,
    on_health: Option<HealthListener>,
    refresh_ahead: Option<Duration>,
}

impl<K, V> fmt::Debug for MultiLayerBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiLayerBuilder")
            .field("name", &self.name)
            .field("layers", &self.layers)
            .field("promotion", &self.promotion)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<K, V> MultiLayerBuilder<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The composer's own name (its [`Layer::name`] when nested in another composer).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Appends a layer below those added before (the first is L1, the last the
    /// authoritative store).
    pub fn layer(mut self, layer: LayerConfig<K, V>) -> Self {
        self.layers.push(layer);
        self
    }

    /// Whether a hit in a lower layer is copied into the writable layers above it.
    pub fn promotion(mut self, on: bool) -> Self {
        self.promotion = on;
        self
    }

    /// How writes reach the layers.
    pub fn write_policy(mut self, policy: WritePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// When a cache layer (not the authoritative one) fails during `set`/`delete`: `false`
    /// (default) counts the error, invalidates the key there and succeeds; `true` returns
    /// the error (the authoritative layer has been written by then).
    pub fn fail_on_cache_error(mut self, fail: bool) -> Self {
        self.fail_on_cache_error = fail;
        self
    }

    /// The clock used to compute remaining TTLs on promotion (tests move a
    /// [`ManualClock`](crate::ManualClock) by hand).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Remember for `ttl` the keys a [`try_get_or_load`](MultiLayer::try_get_or_load)
    /// loader reported missing (negative caching; at most 100,000 keys). Off by default.
    pub fn cache_misses_for(mut self, ttl: Duration) -> Self {
        self.cache_misses_for = Some(ttl);
        self
    }

    /// Shorten each write's layer TTLs by a random fraction in `[0, fraction)`, so that
    /// entries written together do not all expire together. `0.0` (default) turns it off;
    /// `build()` accepts `0.0..=0.5`.
    pub fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.ttl_jitter = fraction;
        self
    }

    /// Keep the in-process layers of several application instances coherent: publish
    /// every written or deleted key on `bus` (under write-back, once the drain has written
    /// it below), and drop keys other instances publish from this instance's in-process
    /// layers (those declaring [`Capabilities::sync_ops`]). See [`InvalidationBus`].
    pub fn invalidation_bus(mut self, bus: Arc<dyn InvalidationBus<K>>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Serve the last known value of a key when a read fails because the layers that
    /// could answer are down, time out or are skipped by their breakers (see
    /// [`FailSafe`]). Off by default.
    pub fn fail_safe(mut self, fail_safe: FailSafe) -> Self {
        self.fail_safe = Some(fail_safe);
        self
    }

    /// Refresh-ahead: when the top layer answers a read (`get`, `get_entry`,
    /// `get_or_load`) with an entry that expires within `window`, a background task
    /// re-reads the key from the layers below and promotes it, which renews the top copy
    /// before it expires. One refresh per key runs at a time, at most 10,000 keys are
    /// tracked, and a copy that a refresh could not renew (the key is gone below, or
    /// expires there as soon) does not start another; the reader never waits for it. Hot keys then stay in the top layer instead of missing
    /// it at every expiry (and sending a burst of reads below). Give the top layer a TTL
    /// shorter than the layers below, or the copy found there expires as soon. Off by
    /// default; counted in [`Stats::refresh`](crate::Stats::refresh).
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use capacitor_core::{testkit::MapLayer, LayerConfig, MultiLayer};
    ///
    /// let cache = MultiLayer::<String, u32>::builder()
    ///     .layer(LayerConfig::new("l1", MapLayer::new()).ttl(Duration::from_secs(30)))
    ///     .layer(LayerConfig::new("l2", MapLayer::new()))
    ///     .refresh_ahead(Duration::from_secs(5)) // renew in the last 5 s of the 30
    ///     .build()?;
    /// # Ok::<(), capacitor_core::Error>(()) }).unwrap();
    /// ```
    pub fn refresh_ahead(mut self, window: Duration) -> Self {
        self.refresh_ahead = Some(window);
        self
    }

    /// Call `listener` on every change of a layer's circuit breaker (opened, probing,
    /// closed). It runs on the task of the operation that caused the change: keep it short.
    pub fn on_health_change(mut self, listener: impl Fn(&HealthEvent) + Send + Sync + 'static) -> Self {
        self.on_health = Some(Arc::new(listener));
        self
    }

    /// Validates the configuration and builds the composer.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] naming the field: no layers, an empty or duplicate layer
    /// name, a zero TTL or timeout, invalid breaker or fail-safe options, every layer
    /// read-only.
    pub fn build(self) -> Result<MultiLayer<K, V>> {
        if self.layers.is_empty() {
            return Err(Error::config("layers", "at least one layer is required"));
        }
        for (i, l) in self.layers.iter().enumerate() {
            if l.name.trim().is_empty() {
                return Err(Error::config(&format!("layers[{i}].name"), "must not be empty"));
            }
            if let Some(j) = self.layers[..i].iter().position(|o| o.name == l.name) {
                return Err(Error::config(
                    &format!("layers[{i}].name"),
                    format_args!("duplicate layer name `{}` (also layers[{j}])", l.name),
                ));
            }
            if l.ttl == Some(Duration::ZERO) {
                return Err(Error::config(
                    &format!("layers[{i}].ttl"),
                    format_args!("TTL of layer `{}` must be greater than zero", l.name),
                ));
            }
            for (field, timeout) in [
                ("read_timeout", l.read_timeout),
                ("write_timeout", l.write_timeout),
            ] {
                if timeout == Some(Duration::ZERO) {
                    return Err(Error::config(
                        &format!("layers[{i}].{field}"),
                        format_args!("timeout of layer `{}` must be greater than zero", l.name),
                    ));
                }
            }
            if let BreakerSetting::On(breaker) = &l.breaker {
                breaker.validate(&format!("layers[{i}].circuit_breaker"))?;
            }
        }
        if let Some(fail_safe) = &self.fail_safe {
            fail_safe.validate()?;
        }
        if !(0.0..=0.5).contains(&self.ttl_jitter) {
            return Err(Error::config("ttl_jitter", "must be within 0.0..=0.5"));
        }
        if self.cache_misses_for == Some(Duration::ZERO) {
            return Err(Error::config("cache_misses_for", "must be greater than zero"));
        }
        if let Some(window) = self.refresh_ahead {
            if window.is_zero() {
                return Err(Error::config("refresh_ahead", "must be greater than zero"));
            }
            if self.layers.len() < 2 || !self.promotion || self.layers[0].read_only {
                return Err(Error::config(
                    "refresh_ahead",
                    "renews the top layer by promotion from a layer below: it needs two layers, \
                     a writable top layer and promotion on",
                ));
            }
            if self.layers[0].ttl.is_some_and(|ttl| ttl <= window) {
                return Err(Error::config(
                    "refresh_ahead",
                    "must be shorter than the top layer's TTL (or every copy would be due at once)",
                ));
            }
        }
        let Some(authoritative) = self.layers.iter().rposition(|l| !l.read_only) else {
            return Err(Error::config(
                "layers",
                "every layer is read-only: nothing could be written",
            ));
        };
        let queue = match &self.policy {
            WritePolicy::Through => None,
            WritePolicy::Back(config) => {
                config.validate()?;
                if authoritative == 0 || self.layers[0].read_only {
                    return Err(Error::config(
                        "write_policy",
                        "write-back needs a writable L1 and a writable layer below it",
                    ));
                }
                Some(Queue::new(config.clone()))
            }
        };
        let runtime = match queue {
            Some(_) => Some(tokio::runtime::Handle::try_current().map_err(|e| {
                Error::config(
                    "write_policy",
                    "write-back drains on a tokio task; build inside a runtime",
                )
                .with_source(e)
            })?),
            None => None,
        };
        let mut all_sync = true;
        let cache: Arc<str> = Arc::from(self.name.as_str());
        let slots = self
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let in_process = l.layer.capabilities().sync_ops;
                let breaker = match l.breaker {
                    // By default only on remote cache layers, where skipping turns errors
                    // the read path ignores anyway into instant misses. On the
                    // authoritative layer an open breaker fails operations without trying
                    // them, which callers opt into.
                    BreakerSetting::Auto if !in_process && i != authoritative && !l.read_only => {
                        Some(CircuitBreaker::default())
                    }
                    BreakerSetting::On(config) => Some(config),
                    _ => None,
                };
                // Timeouts and breakers apply to awaited operations: a layer with either
                // is always awaited.
                let sync_ops =
                    in_process && breaker.is_none() && l.read_timeout.is_none() && l.write_timeout.is_none();
                let slot = Slot {
                    sync_ops,
                    sync_above: all_sync,
                    suspects: (!sync_ops && !l.read_only && i != authoritative)
                        .then(|| DirtyKeys::new(SUSPECT_KEYS, l.ttl)),
                    breaker: breaker.map(|config| Breaker::new(config, Arc::clone(&self.clock))),
                    name: l.name,
                    layer: l.layer,
                    ttl: l.ttl,
                    read_only: l.read_only,
                    counters: LayerCounters::default(),
                    read_timeout: l.read_timeout,
                    write_timeout: l.write_timeout,
                    on_health: self.on_health.clone(),
                    cache: Arc::clone(&cache),
                };
                all_sync &= sync_ops || slot.read_only;
                slot
            })
            .collect();
        Ok(MultiLayer {
            inner: Arc::new(Inner {
                name: self.name,
                slots,
                authoritative,
                promotion: self.promotion,
                fail_on_cache_error: self.fail_on_cache_error,
                policy: self.policy,
                guard: Generations::new(),
                clock: self.clock,
                closed: AtomicBool::new(false),
                queue,
                flights: Flights::default(),
                negative: self.cache_misses_for.map(NegativeCache::new),
                ttl_jitter: self.ttl_jitter,
                bus: self.bus,
                bus_counters: BusCounters::default(),
                fail_safe: self.fail_safe.map(FailSafeStore::new),
                refresh: self.refresh_ahead.map(Refresher::new),
                in_doubt: write::InDoubt::default(),
            }),
        })
        .inspect(|cache| {
            if let Some(runtime) = runtime {
                runtime.spawn(drain(Arc::clone(&cache.inner)));
            }
        })
        .and_then(|cache| {
            if let Some(bus) = &cache.inner.bus {
                // Weak: the subscription must not keep a dropped composer alive.
                let weak = Arc::downgrade(&cache.inner);
                bus.subscribe(Arc::new(move |message| {
                    if let Some(inner) = weak.upgrade() {
                        inner.invalidate_local(message);
                    }
                }))?;
            }
            Ok(cache)
        })
    }
}

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A builder with the defaults listed on [`MultiLayerBuilder`].
    pub fn builder() -> MultiLayerBuilder<K, V> {
        MultiLayerBuilder {
            name: "multi".to_owned(),
            layers: Vec::new(),
            promotion: true,
            fail_on_cache_error: false,
            policy: WritePolicy::Through,
            clock: system_clock(),
            cache_misses_for: None,
            ttl_jitter: 0.0,
            bus: None,
            fail_safe: None,
            on_health: None,
            refresh_ahead: None,
        }
    }

    fn check_open(&self, op: Operation) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::closed(op).with_layer(self.inner.name.clone()));
        }
        Ok(())
    }

    /// The value under `key` from the first layer that has it.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] after close; an error of the last layer (errors of the layers
    /// above it count as misses and the read goes on downward).
    pub fn get<'a>(&'a self, key: &'a K) -> Get<'a, K, V> {
        Get(self.get_entry(key))
    }

    /// Like [`get`](MultiLayer::get), with the absolute expiry of the copy that answered.
    /// With a cache-layer TTL, that copy can expire before the authoritative entry does.
    ///
    /// # Errors
    ///
    /// As [`get`](MultiLayer::get).
    pub fn get_entry<'a>(&'a self, key: &'a K) -> GetEntry<'a, K, V> {
        GetEntry {
            state: GetState::Start { cache: self, key },
        }
    }

    /// [`read_sync_prefix`](Self::read_sync_prefix) inside a `capacitor.get` span.
    #[cfg(feature = "tracing")]
    #[inline(never)]
    fn read_traced<'a>(&'a self, key: &'a K) -> Step<'a, V> {
        let span = crate::observe::op_span!("capacitor.get", self.inner.name);
        let entered = span.enter();
        match self.read_sync_prefix(key) {
            Step::Await(fut) => {
                drop(entered);
                Step::Await(Box::pin(tracing::Instrument::instrument(fut, span.clone())))
            }
            done => done,
        }
    }

    /// The synchronous prefix of a read: in-memory layers answer without a future, so an
    /// L1 hit costs one virtual call and one counter, and a miss through memory layers
    /// allocates nothing. What needs awaiting (an async layer, a promotion) comes back
    /// boxed.
    #[inline(always)]
    fn read_sync_prefix<'a>(&'a self, key: &'a K) -> Step<'a, V> {
        if let Err(e) = self.check_open(Operation::Get) {
            return Step::Done(Err(e));
        }
        let inner = &*self.inner;
        let mut ticket = None;
        for (i, slot) in inner.slots.iter().enumerate() {
            if i == 1 {
                // Before reading below L1: the promotion race guard's snapshot.
                ticket = Some(inner.guard.ticket(inner.guard.stripe_of(key)));
                if let Some(found) = self.buffered(key) {
                    return Step::Done(Ok(found));
                }
            }
            let sync = if slot.sync_ops {
                slot.layer.get_sync(key)
            } else {
                None
            };
            let Some(result) = sync else {
                let ticket = ticket.unwrap_or_else(|| inner.guard.ticket(inner.guard.stripe_of(key)));
                return Step::Await(Box::pin(self.read_async(key, i, ticket)));
            };
            match result {
                Ok(Some(entry)) => {
                    slot.counters.incr(Counter::Hit);
                    if ticket.is_none() && inner.refresh.is_some() {
                        self.refresh_if_due(key, &entry);
                    }
                    if let Some(ticket) = ticket.filter(|_| inner.fail_safe.is_some()) {
                        inner.remember_read(key, &entry, ticket);
                    }
                    crate::observe::read_outcome(
                        Some(&slot.name),
                        ticket.is_some() && inner.promotion,
                        "hit",
                    );
                    return match (ticket, inner.promotion) {
                        (Some(ticket), true) if slot.sync_above => {
                            self.promote_sync(key, &entry, i, ticket);
                            Step::Done(Ok(Some(entry)))
                        }
                        (Some(ticket), true) => Step::Await(Box::pin(async move {
                            self.promote(key, &entry, i, ticket, Layers::NONE).await;
                            Ok(Some(entry))
                        })),
                        _ => Step::Done(Ok(Some(entry))),
                    };
                }
                Ok(None) => slot.counters.incr(Counter::Miss),
                Err(e) => {
                    if let Err(e) = self.read_failed(i, e) {
                        return Step::Done(inner.stale_or(key, e));
                    }
                }
            }
        }
        crate::observe::read_outcome(None, false, "miss");
        Step::Done(Ok(None))
    }

    /// Read-your-writes under write-back: the pending write of `key`, if any (`Some(None)`
    /// for a pending delete or an expired pending set).
    fn buffered(&self, key: &K) -> Option<Option<Entry<V>>> {
        let queue = self.inner.queue.as_ref()?;
        let found = match queue.lookup(key)? {
            Pending::Set { value, expires_at } => {
                let entry = Entry::new(value, expires_at);
                (!entry.is_expired(self.inner.clock.now())).then_some(entry)
            }
            Pending::Delete => None,
        };
        queue.buffer_hits.fetch_add(1, Ordering::Relaxed);
        Some(found)
    }

    /// Counts a failed read at layer `i`. A decode error is a miss anywhere; another error
    /// is a miss in a cache layer and the caller's error in the last layer.
    fn read_failed(&self, i: usize, err: Error) -> Result<()> {
        let slot = &self.inner.slots[i];
        if err.kind() == ErrorKind::Decode {
            slot.counters.incr(Counter::DecodeError);
            slot.counters.incr(Counter::Miss);
            return Ok(());
        }
        let err = slot.error(err);
        if i + 1 == self.inner.slots.len() {
            return Err(err);
        }
        Ok(())
    }

    /// Reads layers `start..` (the first of them asynchronous), promoting a hit.
    async fn read_async(&self, key: &K, start: usize, ticket: Ticket) -> Result<Option<Entry<V>>> {
        let inner = &*self.inner;
        // Layers whose read failed here are not promoted into: a layer that just timed
        // out would make the read wait for its write timeout too.
        let mut failed = Layers::NONE;
        for i in start..inner.slots.len() {
            if i == 1 {
                if let Some(found) = self.buffered(key) {
                    return Ok(found);
                }
            }
            let slot = &inner.slots[i];
            if slot.suspect(key, &inner.clock) {
                // It may hold a value older than the layers below: pass it by.
                slot.counters.incr(Counter::Skipped);
                continue;
            }
            match slot.get(key).await {
                Ok(Some(entry)) => {
                    slot.counters.incr(Counter::Hit);
                    if i == 0 && inner.refresh.is_some() {
                        self.refresh_if_due(key, &entry);
                    }
                    if i > 0 {
                        inner.remember_read(key, &entry, ticket);
                        if inner.promotion {
                            self.promote(key, &entry, i, ticket, failed).await;
                        }
                    }
                    crate::observe::read_outcome(Some(&slot.name), i > 0 && inner.promotion, "hit");
                    return Ok(Some(entry));
                }
                Ok(None) => slot.counters.incr(Counter::Miss),
                Err(e) => {
                    // A value that did not decode is a miss (the layer works): promote.
                    if e.kind() != ErrorKind::Decode {
                        failed.add(i);
                    }
                    if let Err(e) = self.read_failed(i, e) {
                        return inner.stale_or(key, e);
                    }
                }
            }
        }
        crate::observe::read_outcome(None, false, "miss");
        Ok(None)
    }

    /// The remaining life to give promoted copies; `None` when the entry has none left.
    fn promotion_ttl(&self, entry: &Entry<V>) -> Option<Option<Duration>> {
        match entry.remaining(self.inner.clock.now()) {
            Some(Duration::ZERO) => None,
            remaining => Some(remaining),
        }
    }

    /// Whether to write a promoted copy into `slot` (counted when skipped).
    fn may_promote(&self, slot: &Slot<K, V>, key: &K, ticket: Ticket) -> bool {
        let valid =
            self.inner.guard.still_valid(ticket) && !self.inner.in_doubt.pinned(key, self.inner.clock.now());
        if !valid {
            slot.counters.incr(Counter::PromotionSkipped);
        }
        valid
    }

    /// Counts a promotion write; `true` when a write of the key started meanwhile, so
    /// that the copy must be removed again: it may be older than what the writer put
    /// there first (a later miss is harmless, a stale hit is not).
    fn promoted(&self, slot: &Slot<K, V>, ticket: Ticket, result: Result<()>) -> bool {
        match result {
            Ok(()) if self.inner.guard.still_valid(ticket) => {
                slot.counters.incr(Counter::Promotion);
                false
            }
            Ok(()) => {
                slot.counters.incr(Counter::PromotionSkipped);
                true
            }
            Err(_) => {
                slot.counters.incr(Counter::Error);
                false
            }
        }
    }

    /// Copies `entry`, found at layer `found`, into the writable layers above it, nearest
    /// first, unless a write of the key started since `ticket` was taken. Layers in
    /// `failed` (their read failed just now) are left out.
    async fn promote(&self, key: &K, entry: &Entry<V>, found: usize, ticket: Ticket, failed: Layers) {
        let Some(remaining) = self.promotion_ttl(entry) else {
            return;
        };
        let _copy = self.inner.guard.begin_copy(ticket);
        let above = self.inner.slots[..found].iter().enumerate().rev();
        for (_, slot) in above.filter(|(i, s)| !s.read_only && !failed.contains(*i)) {
            if !self.may_promote(slot, key, ticket) {
                continue;
            }
            let result = slot.set(key, &entry.value, min_ttl(slot.ttl, remaining)).await;
            if let (Err(e), Some(suspects)) = (&result, &slot.suspects) {
                if write::outcome_unknown(e) {
                    // The copy may still land, after a later write too.
                    suspects.pin([key], self.inner.clock.now());
                }
            }
            let written = result.is_ok();
            if self.promoted(slot, ticket, result) {
                if let Err(e) = slot.delete(key).await {
                    slot.invalidation_failed(&e, [key], self.inner.clock.now());
                }
            } else if written {
                slot.cleaned([key], self.inner.clock.now());
            }
        }
    }

    /// [`promote`](Self::promote) for layers that all have synchronous operations.
    fn promote_sync(&self, key: &K, entry: &Entry<V>, found: usize, ticket: Ticket) {
        let Some(remaining) = self.promotion_ttl(entry) else {
            return;
        };
        let _copy = self.inner.guard.begin_copy(ticket);
        for slot in self.inner.slots[..found].iter().rev().filter(|s| !s.read_only) {
            if !self.may_promote(slot, key, ticket) {
                continue;
            }
            let result = slot
                .layer
                .set_sync(key, &entry.value, min_ttl(slot.ttl, remaining));
            let result = result.unwrap_or_else(|| Err(not_sync(Operation::Set)));
            if self.promoted(slot, ticket, result) && !matches!(slot.layer.delete_sync(key), Some(Ok(_))) {
                slot.counters.incr(Counter::Error);
            }
        }
    }

    /// Stores `value` under `key` in every writable layer, each with its own TTL.
    ///
    /// # Errors
    ///
    /// As [`set_with`](MultiLayer::set_with).
    pub async fn set(&self, key: K, value: V) -> Result<()> {
        traced!("capacitor.set", self.inner.name, self.write(&key, &value, None))
    }

    /// Stores `value` under `key` with per-write options (a TTL: each layer keeps the
    /// entry for `min(options.ttl, layer TTL)`).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] for a zero TTL; [`ErrorKind::Closed`] after close; the
    /// authoritative layer's error (nothing above it was changed); a cache layer's error
    /// only with [`fail_on_cache_error`](MultiLayerBuilder::fail_on_cache_error).
    pub async fn set_with(&self, key: K, value: V, options: SetOptions) -> Result<()> {
        traced!(
            "capacitor.set",
            self.inner.name,
            self.write(&key, &value, options.ttl)
        )
    }

    fn check_ttl(ttl: Option<Duration>, op: Operation) -> Result<()> {
        if ttl == Some(Duration::ZERO) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                op,
                "TTL must be greater than zero",
            ));
        }
        Ok(())
    }

    async fn write(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.write_or_fill(key, value, ttl, None).await
    }

    /// [`write`](Self::write), or a loader's fill when `fill` is given (skipped when a
    /// write of the key began since the flight's ticket).
    async fn write_or_fill(
        &self,
        key: &K,
        value: &V,
        ttl: Option<Duration>,
        fill: Option<&write::Fill>,
    ) -> Result<()> {
        self.check_open(Operation::Set)?;
        Self::check_ttl(ttl, Operation::Set)?;
        let inner = &*self.inner;
        let writes = Writes::Set {
            key,
            value,
            ttl,
            fill,
        };
        if let Some(queue) = &inner.queue {
            let expires_at = ttl.and_then(|ttl| crate::entry::expiry_for(inner.clock.now(), Some(ttl)));
            let pending = Pending::Set {
                value: value.clone(),
                expires_at,
            };
            return self
                .write_back(&writes, pending, queue, Operation::Set)
                .await
                .map(drop);
        }
        let written = self.write_through(&writes).await?;
        self.cache_result(written).map(drop)
    }

    /// Under write-back: queues the write, then applies it to L1 through the write path
    /// (an L1 failure leaves the key out of L1; the buffer serves it meanwhile).
    async fn write_back(
        &self,
        writes: &Writes<'_, K, V>,
        pending: Pending<V>,
        queue: &Queue<K, V>,
        op: Operation,
    ) -> Result<Written> {
        let inner = &*self.inner;
        let key = match writes {
            Writes::Set { key, .. } | Writes::Delete { key } => *key,
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    op,
                    "write-back queues single writes",
                ))
            }
        };
        // Entered before the push: the buffer and L1 then see overlapping writes of the
        // key in one order, or L1 loses the key (see `fan_out`).
        let scope = write::WriteScope::enter(inner, writes, 0..=0);

        match &pending {
            Pending::Set { value, expires_at } => {
                queue.push(key, pending.clone(), op).await?;
                inner.remember(key, value, *expires_at);
            }
            Pending::Delete => {
                inner.forget(key);
                queue.push(key, Pending::Delete, op).await?;
            }
        }
        write::fan_out(scope, None).await
    }

    /// A write's result from what the write path reported: a cache layer's error only
    /// with [`fail_on_cache_error`](MultiLayerBuilder::fail_on_cache_error).
    fn cache_result(&self, written: Written) -> Result<u64> {
        match written.cache_error {
            Some(err) if self.inner.fail_on_cache_error => Err(err),
            _ => Ok(written.found),
        }
    }

    /// Removes `key` from every writable layer, bottom-up. Returns whether the
    /// authoritative layer held it.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] after close; the authoritative layer's error (nothing above
    /// it was changed); a cache layer's error only with
    /// [`fail_on_cache_error`](MultiLayerBuilder::fail_on_cache_error). A cache layer that
    /// fails to delete may serve the old value until its TTL ends; the error is counted.
    pub async fn delete(&self, key: &K) -> Result<bool> {
        traced!("capacitor.delete", self.inner.name, self.remove(key))
    }

    async fn remove(&self, key: &K) -> Result<bool> {
        self.check_open(Operation::Delete)?;
        let inner = &*self.inner;
        let writes = Writes::Delete { key };
        if let Some(queue) = &inner.queue {
            let pending = self.buffered(key);
            let written = self
                .write_back(&writes, Pending::Delete, queue, Operation::Delete)
                .await?;
            return Ok(written.found > 0 || matches!(pending, Some(Some(_))));
        }
        let written = self.write_through(&writes).await?;
        self.cache_result(written).map(|found| found > 0)
    }

    /// Whether some layer holds a live entry under `key`. Does not promote and does not
    /// count hits or misses.
    ///
    /// # Errors
    ///
    /// As [`get`](MultiLayer::get).
    pub async fn exists(&self, key: &K) -> Result<bool> {
        self.check_open(Operation::Exists)?;
        let inner = &*self.inner;
        for (i, slot) in inner.slots.iter().enumerate() {
            if i == 1 {
                if let Some(found) = self.buffered(key) {
                    return Ok(found.is_some());
                }
            }
            if slot.suspect(key, &inner.clock) {
                continue;
            }
            match slot.exists(key).await {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(e) => {
                    if let Err(e) = self.read_failed(i, e) {
                        return inner.stale_or(key, e).map(|found| found.is_some());
                    }
                }
            }
        }
        Ok(false)
    }

    /// The values under `keys`, in order, each from the first layer that has it; every
    /// layer is asked once for all keys still missing (its batch form).
    ///
    /// # Errors
    ///
    /// As [`get`](MultiLayer::get).
    pub async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<V>>> {
        Ok(
            traced!("capacitor.get_many", self.inner.name, self.get_many_entries(keys))?
                .into_iter()
                .map(|e| e.map(|e| e.value))
                .collect(),
        )
    }

    async fn get_many_entries(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        self.check_open(Operation::GetMany)?;
        let inner = &*self.inner;
        let tickets: Vec<Ticket> = keys
            .iter()
            .map(|k| inner.guard.ticket(inner.guard.stripe_of(k)))
            .collect();
        let mut out: Vec<Option<Entry<V>>> = keys.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        let mut failed = Layers::NONE;
        for (i, slot) in inner.slots.iter().enumerate() {
            if i == 1 && inner.queue.is_some() {
                // Read-your-writes: the buffer answers for keys L1 did not have.
                pending.retain(|&p| match self.buffered(&keys[p]) {
                    Some(found) => {
                        out[p] = found;
                        false
                    }
                    None => true,
                });
            }
            if pending.is_empty() {
                break;
            }
            // Keys this layer may hold outdated copies of are not asked here.
            let (asked, passed): (Vec<usize>, Vec<usize>) = pending
                .iter()
                .partition(|&&p| !slot.suspect(&keys[p], &inner.clock));
            passed.iter().for_each(|_| slot.counters.incr(Counter::Skipped));
            if asked.is_empty() {
                continue;
            }
            let wanted: Vec<K> = asked.iter().map(|&p| keys[p].clone()).collect();
            let found = match slot.get_many(&wanted).await {
                Ok(found) if found.len() == wanted.len() => found,
                Ok(found) => {
                    failed.add(i);
                    let msg = format!("layer returned {} results for {} keys", found.len(), wanted.len());
                    self.read_failed(i, Error::new(ErrorKind::Backend, Operation::GetMany, msg))?;
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Decode => {
                    // A batch cannot say which key held bad bytes: ask key by key, so that
                    // one bad value costs a miss for that key only. (The layer may have
                    // evicted the bad entries already: count the batch's failure once.)
                    slot.counters.incr(Counter::DecodeError);
                    let mut found = Vec::with_capacity(wanted.len());
                    for key in &wanted {
                        found.push(match slot.get(key).await {
                            Ok(entry) => entry,
                            Err(e) if e.kind() == ErrorKind::Decode => {
                                slot.counters.incr(Counter::DecodeError);
                                None
                            }
                            Err(e) => {
                                failed.add(i);
                                self.read_failed(i, e)?;
                                None
                            }
                        });
                    }
                    found
                }
                Err(e) => {
                    failed.add(i);
                    if let Err(e) = self.read_failed(i, e) {
                        return inner.stale_many(keys, &asked, out, e);
                    }
                    continue;
                }
            };
            let mut still = passed;
            for (p, entry) in asked.into_iter().zip(found) {
                match entry {
                    Some(entry) => {
                        slot.counters.incr(Counter::Hit);
                        if i > 0 {
                            inner.remember_read(&keys[p], &entry, tickets[p]);
                            if inner.promotion {
                                self.promote(&keys[p], &entry, i, tickets[p], failed).await;
                            }
                        }
                        out[p] = Some(entry);
                    }
                    None => {
                        slot.counters.incr(Counter::Miss);
                        still.push(p);
                    }
                }
            }
            pending = still;
        }
        Ok(out)
    }

    /// Stores every `(key, value)` in every writable layer through the layers' batch
    /// forms, bottom first, with the same failure rules as [`set`](MultiLayer::set).
    ///
    /// # Errors
    ///
    /// As [`set_with`](MultiLayer::set_with). If the authoritative layer fails part-way,
    /// whether earlier entries of the batch were stored depends on that layer (atomic for
    /// layers with batch transactions, a prefix of the batch for the default loop).
    pub async fn set_many(&self, entries: &[(K, V)], options: SetOptions) -> Result<()> {
        self.check_open(Operation::SetMany)?;
        Self::check_ttl(options.ttl, Operation::SetMany)?;
        if self.inner.queue.is_some() {
            for (key, value) in entries {
                self.write(key, value, options.ttl).await?;
            }
            return Ok(());
        }
        let writes = Writes::SetMany {
            entries,
            ttl: options.ttl,
        };
        let written = self.write_through(&writes).await?;
        self.cache_result(written).map(drop)
    }

    /// Removes every key from every writable layer, bottom-up; returns how many the
    /// authoritative layer held.
    ///
    /// # Errors
    ///
    /// As [`delete`](MultiLayer::delete).
    pub async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        self.check_open(Operation::DeleteMany)?;
        if self.inner.queue.is_some() {
            let mut removed = 0;
            for key in keys {
                removed += u64::from(MultiLayer::delete(self, key).await?);
            }
            return Ok(removed);
        }
        let written = self.write_through(&Writes::DeleteMany { keys }).await?;
        self.cache_result(written)
    }

    /// Writes every writable layer, the authoritative one first (see `write`).
    async fn write_through(&self, writes: &Writes<'_, K, V>) -> Result<Written> {
        let inner = &*self.inner;
        let scope = write::WriteScope::enter(inner, writes, 0..=inner.authoritative);
        write::fan_out(scope, Some(inner.authoritative)).await
    }

    /// Flushes every layer (persistent layers make acknowledged writes durable).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] after close; the first layer error (all layers are flushed).
    pub async fn flush(&self) -> Result<()> {
        self.check_open(Operation::Flush)?;
        if let Some(queue) = &self.inner.queue {
            queue.flush().await?;
        }
        let mut first = None;
        for slot in self.inner.slots.iter() {
            if let Err(e) = slot.flush().await {
                first.get_or_insert(slot.error(e));
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Closes every layer, top first. Idempotent: a second call returns `Ok(())`.
    /// Afterwards every operation fails with [`ErrorKind::Closed`]. Layers shared with
    /// another composer are closed for it too.
    ///
    /// # Errors
    ///
    /// The first layer error (every layer is closed regardless).
    pub async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut first = None;
        if let Some(queue) = &self.inner.queue {
            // New writes are refused from here (closed flag); drain what is queued.
            let flushed = queue.flush().await;
            queue.close();
            let unwritten = queue.unwritten_keys().len();
            if unwritten > 0 {
                let cause = flushed.err().map(|e| e.to_string()).unwrap_or_default();
                first = Some(
                    Error::new(
                        ErrorKind::Unavailable,
                        Operation::Close,
                        format!(
                            "{unwritten} pending writes could not be written ({cause}); see unwritten_keys()"
                        ),
                    )
                    .with_layer(self.inner.name.clone()),
                );
            }
        }
        for slot in self.inner.slots.iter() {
            if let Err(e) = slot.layer.close().await {
                first.get_or_insert(slot.error(e));
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// A snapshot of the per-layer counters (and of the write-back buffer).
    pub fn stats(&self) -> Stats {
        Stats {
            layers: self
                .inner
                .slots
                .iter()
                .map(|s| {
                    let mut stats = s.counters.snapshot(&s.name);
                    stats.breaker = s.breaker_state();
                    stats.breaker_opens = s.breaker.as_ref().map_or(0, |b| b.opened.load(Ordering::Relaxed));
                    stats.suspect_keys = s.suspects.as_ref().map_or(0, |d| d.len() as u64);
                    stats.suspects_overflowed = s.suspects.as_ref().is_some_and(DirtyKeys::overflowed);
                    stats
                })
                .collect(),
            fail_safe: self.inner.fail_safe.as_ref().map(FailSafeStore::stats),
            refresh: self.inner.refresh.as_ref().map(Refresher::stats),
            write_back: self.inner.queue.as_ref().map(Queue::stats),
            bus: self.inner.bus.as_ref().map(|_| {
                let c = &self.inner.bus_counters;
                BusStats {
                    published: c.published.load(Ordering::Relaxed),
                    publish_errors: c.publish_errors.load(Ordering::Relaxed),
                    received: c.received.load(Ordering::Relaxed),
                    clears: c.clears.load(Ordering::Relaxed),
                }
            }),
        }
    }

    /// Under [`WritePolicy::Back`], the keys whose latest write has not reached the lower
    /// layers yet; after [`close`](MultiLayer::close), exactly the writes that could not
    /// be written. Empty under write-through.
    pub fn unwritten_keys(&self) -> Vec<K> {
        self.inner
            .queue
            .as_ref()
            .map(Queue::unwritten_keys)
            .unwrap_or_default()
    }

    /// The configured layer names, top first.
    pub fn layer_names(&self) -> impl Iterator<Item = &str> {
        self.inner.slots.iter().map(|s| s.name.as_str())
    }
}

impl<K, V> MultiLayer<K, V>
where
    K: crate::codec::StorageKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Streams the live `(key, value)` pairs whose encoded key starts with `prefix`, from
    /// the authoritative layer, merged with pending write-back writes (a pending write
    /// replaces the stored value, a pending delete hides the key; pending writes are
    /// those queued when the scan starts). Memory stays bounded: the layer pages (range
    /// iterators, keyset pagination, SCAN) and the pending writes are bounded by the
    /// write-back queue.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unsupported`] when the authoritative layer cannot scan;
    /// [`ErrorKind::Closed`] after close. Layer errors arrive as stream items.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor_core::{testkit::MapLayer, LayerConfig, MultiLayer, SystemClock};
    /// use futures::StreamExt;
    ///
    /// let cache = MultiLayer::<String, u32>::builder()
    ///     .layer(LayerConfig::new("store", MapLayer::scannable(SystemClock)))
    ///     .build()?;
    /// cache.set("user:1".into(), 1).await?;
    /// cache.set("order:1".into(), 2).await?;
    /// let users: Vec<_> = cache.scan(b"user:")?.collect().await;
    /// assert_eq!(users.len(), 1);
    /// # Ok::<(), capacitor_core::Error>(()) }).unwrap();
    /// ```
    pub fn scan(&self, prefix: &[u8]) -> Result<Scan<K, V>> {
        self.check_open(Operation::Scan)?;
        let inner = &*self.inner;
        let bottom = &inner.slots[inner.authoritative];
        let stream = bottom
            .layer
            .scan(prefix)
            .map_err(|e| e.with_layer(bottom.name.clone()))?;
        let pending = inner
            .queue
            .as_ref()
            .map(|q| q.matching(|k| k.encode_key().starts_with(prefix)))
            .unwrap_or_default();
        Ok(Scan::new(stream, pending, Arc::clone(&inner.clock)))
    }
}

#[async_trait]
impl<K, V> Layer<K, V> for MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn capabilities(&self) -> Capabilities {
        let bottom = self.inner.slots[self.inner.authoritative].layer.capabilities();
        let mut caps = Capabilities::new();
        caps.persistent = bottom.persistent;
        // Through the trait, keys cannot be matched against pending writes (that needs
        // `StorageKey`; see the inherent `MultiLayer::scan`): scan only without write-back.
        caps.scan = bottom.scan && self.inner.queue.is_none();
        caps.sync_ops = self.inner.slots[0].sync_ops;
        caps
    }

    /// Answers only an L1 hit synchronously; anything else needs the async path.
    fn get_sync(&self, key: &K) -> Option<Result<Option<Entry<V>>>> {
        let first = &self.inner.slots[0];
        if self.inner.closed.load(Ordering::Acquire) || !first.sync_ops {
            return None;
        }
        match first.layer.get_sync(key) {
            Some(Ok(Some(entry))) => {
                first.counters.incr(Counter::Hit);
                Some(Ok(Some(entry)))
            }
            _ => None,
        }
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        self.get_entry(key).await
    }

    fn scan(&self, prefix: &[u8]) -> Result<crate::layer::EntryStream<K, V>> {
        self.check_open(Operation::Scan)?;
        if self.inner.queue.is_some() {
            return Err(Error::unsupported(
                Operation::Scan,
                "a write-back composer scans through MultiLayer::scan, which merges pending writes",
            ));
        }
        let bottom = &self.inner.slots[self.inner.authoritative];
        bottom
            .layer
            .scan(prefix)
            .map_err(|e| e.with_layer(bottom.name.clone()))
    }

    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.write(key, value, ttl).await
    }

    async fn delete(&self, key: &K) -> Result<bool> {
        MultiLayer::delete(self, key).await
    }

    async fn exists(&self, key: &K) -> Result<bool> {
        MultiLayer::exists(self, key).await
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        traced!("capacitor.get_many", self.inner.name, self.get_many_entries(keys))
    }

    async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        MultiLayer::set_many(self, entries, SetOptions { ttl }).await
    }

    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        MultiLayer::delete_many(self, keys).await
    }

    async fn flush(&self) -> Result<()> {
        MultiLayer::flush(self).await
    }

    async fn close(&self) -> Result<()> {
        MultiLayer::close(self).await
    }
}

fn not_sync(op: Operation) -> Error {
    Error::new(
        ErrorKind::Backend,
        op,
        "layer declared sync_ops but did not answer synchronously",
    )
}

/// Write-back's drain task: takes due batches off the buffer and writes them to the layers
/// below L1, retrying a refused batch with exponential backoff. It ends once the composer
/// is closed, or once every handle is dropped and the buffer is empty.
async fn drain<K, V>(inner: Arc<Inner<K, V>>)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let Some(queue) = inner.queue.as_ref() else { return };
    // How often an idle drainer looks for an abandoned composer.
    const IDLE_CHECK: Duration = Duration::from_millis(250);
    loop {
        match queue.due_in() {
            None => {
                if queue.is_closed_and_empty() || (Arc::strong_count(&inner) == 1 && queue.is_empty()) {
                    return;
                }
                let _ = tokio::time::timeout(IDLE_CHECK, queue.queued.notified()).await;
            }
            Some(wait) if !wait.is_zero() => {
                let _ = tokio::time::timeout(wait, queue.queued.notified()).await;
            }
            Some(_) => {
                let batch = queue.take_batch();
                let mut backoff = queue.config.retry_initial;
                loop {
                    match write_below(&inner, &batch).await {
                        Ok(()) => {
                            queue.complete(&batch);
                            break;
                        }
                        Err(_) if inner.closed.load(Ordering::Acquire) && queue.is_closing() => {
                            // Closed and still refused: leave the batch in the buffer, where
                            // `unwritten_keys` reports it.
                            return;
                        }
                        Err(e) => {
                            crate::observe::drain_retry(&inner.name, &e);
                            queue.retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(queue.config.retry_max);
                        }
                    }
                }
            }
        }
    }
}

/// Batches group sets by TTL; remaining TTLs are rounded down to this, so that writes
/// made moments apart with the same TTL share one batch call (they may expire up to this
/// much earlier in the lower layers).
const TTL_GRANULARITY_MS: u128 = 100;

/// Writes one drained batch to every writable layer below L1 through the write path: the
/// authoritative layer's error fails the batch (it will be retried); a cache layer's error
/// is counted and the batch's keys invalidated there.
async fn write_below<K, V>(inner: &Inner<K, V>, batch: &[(K, Pending<V>, u64)]) -> Result<()>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let now = inner.clock.now();
    let mut sets: std::collections::BTreeMap<Option<Duration>, Vec<(K, V)>> = Default::default();
    let mut deletes = Vec::new();
    for (key, op, _) in batch {
        match op {
            Pending::Set { value, expires_at } => {
                match expires_at.map(|at| at.saturating_duration_since(now)) {
                    // Expired while pending: the lower layers must not keep an older value.
                    Some(Duration::ZERO) => deletes.push(key.clone()),
                    Some(left) => {
                        let ms = left.as_millis();
                        let rounded = (ms - ms % TTL_GRANULARITY_MS).max(1);
                        let ttl = Duration::from_millis(u64::try_from(rounded).unwrap_or(u64::MAX));
                        sets.entry(Some(ttl))
                            .or_default()
                            .push((key.clone(), value.clone()));
                    }
                    None => sets.entry(None).or_default().push((key.clone(), value.clone())),
                }
            }
            Pending::Delete => deletes.push(key.clone()),
        }
    }
    let writes = Writes::Drained {
        sets: &sets,
        deletes: &deletes,
    };
    let scope = write::WriteScope::enter(inner, &writes, 1..=inner.authoritative);
    write::fan_out(scope, Some(inner.authoritative)).await?;
    Ok(())
}
