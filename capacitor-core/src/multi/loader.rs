//! Loads from the origin: single-flight loaders that outlive their callers, soft and hard
//! timeouts, fail-safe answers and their throttle, eager refresh through the loader,
//! per-call options and adaptive TTLs, negative caching.
//!
//! A load runs on a tokio task of its own (the flight), so that a caller that times out
//! or is cancelled does not take the load with it: the others and the cache get its
//! result. Callers wait on the flight's outcome with their own timeouts. The flight's
//! ticket is taken before its first read: a write of the key that begins since keeps the
//! loaded value from being written (the waiters still get it), and a caller arriving after
//! such a write starts a flight of its own instead of joining (the flight's own fill does
//! not count).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::slot::LayerSet;
use super::write::Fill;
use super::MultiLayer;
use crate::entry::{Entry, Timestamp};
use crate::error::{BoxError, Error, ErrorKind, Nested, Operation, Result};
use crate::guard::Ticket;
use crate::load::{LoadEvent, LoadOptions, LoadStats, Loaded, Plan, StaleReason};

/// What a flight hands its callers: `None` until it ends.
pub(super) type Outcome<V> = Option<std::result::Result<Option<V>, Arc<Error>>>;

/// A flight's outcome, set once, and its waiters. (Not tokio's watch channel: it wakes its
/// waiters in a random order, and a seeded history must be a function of its seed.)
pub(super) struct OutcomeCell<V> {
    /// The outcome, and whether the flight ended without one.
    state: Mutex<(Outcome<V>, bool)>,
    notify: Notify,
}

/// The receiving end: the cell.
pub(super) type Receiver<V> = Arc<OutcomeCell<V>>;

/// The sending end; dropped without sending, it tells the waiters the flight is gone.
pub(super) struct Sender<V>(Arc<OutcomeCell<V>>);

fn outcome_channel<V>() -> (Sender<V>, Receiver<V>) {
    let cell = Arc::new(OutcomeCell {
        state: Mutex::new((None, false)),
        notify: Notify::new(),
    });
    (Sender(Arc::clone(&cell)), cell)
}

impl<V> OutcomeCell<V> {
    fn lock(&self) -> MutexGuard<'_, (Outcome<V>, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<V: Clone> OutcomeCell<V> {
    /// The outcome once there is one; `None` when the flight ended without one.
    async fn wait(&self) -> Outcome<V> {
        loop {
            let mut notified = std::pin::pin!(self.notify.notified());
            notified.as_mut().enable();
            {
                let state = self.lock();
                if state.0.is_some() || state.1 {
                    return state.0.clone();
                }
            }
            notified.await;
        }
    }
}

impl<V> Sender<V> {
    /// Hands every waiter (and every later one) `outcome`.
    pub(super) fn send(&self, outcome: Outcome<V>) {
        self.0.lock().0 = outcome;
        self.0.notify.notify_waiters();
    }
}

impl<V> Drop for Sender<V> {
    fn drop(&mut self) {
        self.0.lock().1 = true;
        self.0.notify.notify_waiters();
    }
}

/// What [`MultiLayerBuilder::on_load_event`](crate::MultiLayerBuilder::on_load_event) calls.
pub(super) type LoadListener<K> = Arc<dyn Fn(&LoadEvent<'_, K>) + Send + Sync>;

/// At most this many keys are remembered as having asked for an eager refresh (of one
/// copy each); past it, due copies are not refreshed early.
const MAX_REFRESHED: usize = 10_000;

/// The callers waiting on a flight, and how to stop it when none is left.
pub(super) struct Waiters {
    pub(super) count: AtomicUsize,
    pub(super) abort: Mutex<Option<AbortHandle>>,
    cancel_with_callers: bool,
}

/// One load in progress.
pub(super) struct Flight<V> {
    id: u64,
    /// Taken when the flight began, before its first read: a write of the key that
    /// began since (or was in flight then) voids the flight for callers arriving after
    /// it, and keeps the flight from caching what it loaded.
    ticket: Ticket,
    /// The flight's fill write, once it began: the only write since the ticket.
    fill: Arc<Fill>,
    outcome: Receiver<V>,
    waiters: Arc<Waiters>,
}

/// The loads in progress (one per key) and the loading reads' counters.
pub(super) struct Flights<K, V> {
    map: Mutex<HashMap<K, Flight<V>>>,
    next_id: AtomicU64,
    /// Keys whose copy (by its expiry) started an eager refresh: one per copy.
    refreshed: Mutex<HashMap<K, Timestamp>>,
    pub(super) counters: LoadCounters,
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            refreshed: Mutex::new(HashMap::new()),
            counters: LoadCounters::default(),
        }
    }
}

impl<K, V> Flights<K, V> {
    /// The map's entries are each written whole: a panic cannot leave it torn.
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<K, Flight<V>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The counters behind [`LoadStats`].
#[derive(Default)]
pub(super) struct LoadCounters {
    /// Hits and misses, per thread: the hit path writes no shared memory.
    pub(super) reads: crate::stats::LayerCounters,
    pub(super) loads: AtomicU64,
    pub(super) failures: AtomicU64,
    stale_hits: AtomicU64,
    soft_timeouts: AtomicU64,
    hard_timeouts: AtomicU64,
    pub(super) joined: AtomicU64,
    refreshes: AtomicU64,
    not_cached: AtomicU64,
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl LoadCounters {
    pub(super) fn snapshot(&self) -> LoadStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let reads = self.reads.snapshot("loads");
        LoadStats {
            hits: reads.hits,
            misses: reads.misses,
            loads: get(&self.loads),
            failures: get(&self.failures),
            stale_hits: get(&self.stale_hits),
            soft_timeouts: get(&self.soft_timeouts),
            hard_timeouts: get(&self.hard_timeouts),
            joined: get(&self.joined),
            refreshes: get(&self.refreshes),
            not_cached: get(&self.not_cached),
        }
    }
}

/// Removes a flight when it ends, also by panic, abort or cancellation, so that the key
/// is never wedged: waiters see the sender dropped and one of them leads a new flight.
/// A flight that a later one replaced is not touched.
pub(super) struct Landing<K: Hash + Eq + Clone + Send + Sync + 'static, V: Clone + Send + Sync + 'static> {
    pub(super) cache: MultiLayer<K, V>,
    pub(super) key: K,
    pub(super) id: u64,
}

impl<K, V> Drop for Landing<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        let mut flights = self.cache.inner.flights.lock();
        if flights.get(&self.key).is_some_and(|f| f.id == self.id) {
            flights.remove(&self.key);
        }
    }
}

/// A caller waiting on a flight; the last one to leave stops the flight when its
/// options say so.
pub(super) struct Waiting<'a, K: Hash + Eq, V> {
    pub(super) flights: &'a Flights<K, V>,
    pub(super) key: &'a K,
    pub(super) id: u64,
    pub(super) waiters: Arc<Waiters>,
}

impl<K: Hash + Eq, V> Drop for Waiting<'_, K, V> {
    fn drop(&mut self) {
        if self.waiters.count.fetch_sub(1, Ordering::AcqRel) != 1 || !self.waiters.cancel_with_callers {
            return;
        }
        // Joining happens under the map's lock: checked again under it, no caller can
        // join between the check and the abort.
        let flights = self.flights.lock();
        if self.waiters.count.load(Ordering::Acquire) == 0
            && flights.get(self.key).is_some_and(|f| f.id == self.id)
        {
            let abort = self
                .waiters
                .abort
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(abort) = abort {
                abort.abort();
            }
        }
    }
}

/// A flight's future, run in the caller that started it (no task to spawn, no thread
/// to cross: a miss whose loader answers at once completes in the caller's poll). When
/// that caller stops waiting (its timeout, its cancellation) before the flight ended,
/// the rest of the flight moves to a tokio task of its own, so that it completes for the
/// other callers and for the cache; unless every caller is gone and the options say to
/// stop with them (or no runtime is there to run it), in which case it is dropped.
pub(super) struct Handoff {
    flight: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    waiters: Vec<Arc<Waiters>>,
}

impl Handoff {
    pub(super) fn new(flight: Pin<Box<dyn Future<Output = ()> + Send>>, waiters: Vec<Arc<Waiters>>) -> Self {
        Handoff {
            flight: Some(flight),
            waiters,
        }
    }

    /// `wait`, polling the flight meanwhile.
    pub(super) async fn drive<T>(&mut self, wait: impl Future<Output = T>) -> T {
        let mut wait = std::pin::pin!(wait);
        std::future::poll_fn(|cx| {
            if let Some(flight) = &mut self.flight {
                if flight.as_mut().poll(cx).is_ready() {
                    self.flight = None;
                }
            }
            wait.as_mut().poll(cx)
        })
        .await
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        let Some(flight) = self.flight.take() else {
            return;
        };
        let abandoned = self
            .waiters
            .iter()
            .all(|w| w.cancel_with_callers && w.count.load(Ordering::Acquire) == 0);
        if abandoned {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let task = runtime.spawn(flight);
            for w in &self.waiters {
                *w.abort.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
            }
        }
    }
}

/// Keys whose loaded value is being written (a fill): a write of such a key that begins
/// meanwhile waits for the fill to end before it writes anything, so that a fill that
/// began first (and so was not refused) can never land in a layer after the write, which
/// would lose the write. A fill that has not begun yet sees the write and is refused.
pub(super) struct Filling<K> {
    running: AtomicUsize,
    keys: Mutex<HashMap<K, usize>>,
    ended: Notify,
}

impl<K> Default for Filling<K> {
    fn default() -> Self {
        Filling {
            running: AtomicUsize::new(0),
            keys: Mutex::new(HashMap::new()),
            ended: Notify::new(),
        }
    }
}

/// One fill in progress; ends it when dropped.
pub(super) struct FillGuard<'a, K: Hash + Eq> {
    filling: &'a Filling<K>,
    key: &'a K,
}

impl<K: Hash + Eq + Clone> Filling<K> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, usize>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a fill of `key` as running, before it enters the key's stripe.
    pub(super) fn begin<'a>(&'a self, key: &'a K) -> FillGuard<'a, K> {
        *self.lock().entry(key.clone()).or_insert(0) += 1;
        self.running.fetch_add(1, Ordering::SeqCst);
        FillGuard { filling: self, key }
    }

    /// Whether any fill runs (one atomic load: the write path's only cost).
    #[inline(always)]
    pub(super) fn any(&self) -> bool {
        self.running.load(Ordering::SeqCst) != 0
    }

    /// Waits until no fill of any of `keys` runs (called after the write entered its
    /// stripes).
    pub(super) async fn wait_for(&self, keys: &[&K]) {
        loop {
            let mut ended = std::pin::pin!(self.ended.notified());
            ended.as_mut().enable();
            if !keys.iter().any(|k| self.lock().contains_key(*k)) {
                return;
            }
            ended.await;
        }
    }
}

impl<K: Hash + Eq> Drop for FillGuard<'_, K> {
    fn drop(&mut self) {
        {
            let mut keys = self.filling.keys.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = keys.get_mut(self.key) {
                *n -= 1;
                if *n == 0 {
                    keys.remove(self.key);
                }
            }
        }
        self.filling.running.fetch_sub(1, Ordering::SeqCst);
        self.filling.ended.notify_waiters();
    }
}

/// What waiting on a flight came to.
pub(super) enum Waited<V> {
    Done(Result<Option<V>>),
    /// The flight ended without an outcome (its task panicked or was aborted).
    Gone,
}

/// What a caller does about a key it missed.
pub(super) enum Role<V> {
    Lead {
        tx: Sender<V>,
        rx: Receiver<V>,
        id: u64,
        fill: Arc<Fill>,
        waiters: Arc<Waiters>,
    },
    Follow {
        rx: Receiver<V>,
        id: u64,
        waiters: Arc<Waiters>,
    },
}

/// The loader of a flight, its output converted.
pub(super) type BoxLoad<V> = Pin<Box<dyn Future<Output = Result<Loaded<V>>> + Send>>;

/// Keys a loader said do not exist, until their expiry (`cache_misses_for`).
pub(super) struct NegativeCache<K> {
    ttl: Duration,
    map: Mutex<HashMap<K, Timestamp>>,
}

/// At most this many keys are remembered as missing; beyond it misses are not cached.
const NEGATIVE_BOUND: usize = 100_000;

impl<K: Hash + Eq + Clone> NegativeCache<K> {
    pub(super) fn new(ttl: Duration) -> Self {
        NegativeCache {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Timestamp>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn contains(&self, key: &K, now: Timestamp) -> bool {
        let mut map = self.lock();
        match map.get(key) {
            Some(at) if *at > now => true,
            Some(_) => {
                map.remove(key);
                false
            }
            None => false,
        }
    }

    pub(super) fn remember(&self, key: &K, now: Timestamp) {
        let mut map = self.lock();
        if map.len() >= NEGATIVE_BOUND {
            map.retain(|_, at| *at > now);
        }
        if map.len() < NEGATIVE_BOUND {
            map.insert(key.clone(), now.saturating_add(self.ttl));
        }
    }

    pub(super) fn forget(&self, key: &K) {
        self.lock().remove(key);
    }

    pub(super) fn clear(&self) {
        self.lock().clear();
    }
}

pub(super) fn shared_error(err: &Arc<Error>) -> Error {
    Error::new(err.kind(), Operation::Get, "the loader failed").with_source(Nested(Arc::clone(err)))
}

/// A loader's error as a capacitor error: its kind is kept when it is one, else
/// [`ErrorKind::Backend`].
pub(super) fn loader_error(e: impl Into<BoxError>) -> Error {
    let source: BoxError = e.into();
    let kind = source
        .downcast_ref::<Error>()
        .map_or(ErrorKind::Backend, Error::kind);
    Error::new(kind, Operation::Get, "the loader failed").with_source(source)
}

fn timeout_error(limit: Duration, hard: bool) -> Error {
    let which = if hard { "hard" } else { "soft" };
    Error::new(
        ErrorKind::Timeout,
        Operation::Get,
        format!("the loader did not answer within its {which} timeout ({limit:?})"),
    )
}

/// Whether a failed load's error may be answered with a fail-safe copy.
fn servable(err: &Error) -> bool {
    !matches!(
        err.kind(),
        ErrorKind::Closed | ErrorKind::InvalidInput | ErrorKind::Unsupported | ErrorKind::Config
    )
}

/// Converts a user's loader into a flight's.
pub(super) fn boxed<V, F, Fut, E>(loader: F) -> impl FnOnce() -> BoxLoad<V> + Send + 'static
where
    V: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<Loaded<V>, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    move || {
        let fut = loader();
        Box::pin(async move { fut.await.map_err(loader_error) }) as BoxLoad<V>
    }
}

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The value under `key`, or on a full miss the value `loader` produces, which is then
    /// written like a [`set`](MultiLayer::set), with the builder's
    /// [`load_options`](crate::MultiLayerBuilder::load_options).
    ///
    /// Concurrent calls for one key run one loader (single flight) and all get its value.
    /// The loader runs on a tokio task of its own: a caller that is cancelled or times
    /// out does not stop it (unless the options say so), the others and the cache get
    /// its value. A `set` or `delete` of the key that completes while the loader runs
    /// wins: the loaded value is returned to the waiters but not written. A loader that
    /// panics does not wedge the key: the panic reaches the caller that started it, and
    /// a waiting caller runs its own loader.
    ///
    /// # Errors
    ///
    /// As [`get`](MultiLayer::get); the error of writing the loaded value;
    /// [`ErrorKind::Timeout`] after the hard timeout (when no fail-safe copy answers).
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor::{LayerConfig, MultiLayer};
    /// use capacitor::memory::DashMapLayer;
    ///
    /// let cache = MultiLayer::<u64, String>::builder().layer(LayerConfig::new("l1", DashMapLayer::new())).build()?;
    /// let name = cache.get_or_load(&42, || async { "loaded from the database".to_string() }).await?;
    /// assert_eq!(cache.get(&42).await?, Some(name));
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub async fn get_or_load<F, Fut>(&self, key: &K, loader: F) -> Result<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = V> + Send + 'static,
    {
        let load =
            boxed(move || async move { Ok::<_, std::convert::Infallible>(Loaded::value(loader().await)) });
        let loaded = self.load(key, &self.inner.load_plan, load).await?;
        loaded.ok_or_else(|| Error::new(ErrorKind::Backend, Operation::Get, "the loader produced no value"))
    }

    /// Like [`get_or_load`](MultiLayer::get_or_load) with a fallible loader that may say the
    /// key does not exist (`Ok(None)`). With
    /// [`cache_misses_for`](crate::MultiLayerBuilder::cache_misses_for), such keys are
    /// remembered as missing for that long (a `set` of the key forgets it).
    ///
    /// # Errors
    ///
    /// A loader error reaches every waiter of the flight (kind
    /// [`ErrorKind::Backend`] unless the loader returned a capacitor [`Error`], whose kind
    /// is kept), and nothing is cached; with fail-safe, a copy within its grace answers
    /// instead (see [`get_or_load_with`](MultiLayer::get_or_load_with)).
    pub async fn try_get_or_load<F, Fut, E>(&self, key: &K, loader: F) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let load = boxed(move || async move {
            loader()
                .await
                .map(|v| v.map_or_else(Loaded::missing, Loaded::value))
        });
        self.load(key, &self.inner.load_plan, load).await
    }

    /// [`try_get_or_load`](MultiLayer::try_get_or_load) with options for this call
    /// (timeouts, eager refresh, TTL per layer, skipped layers) and a loader that says
    /// how to cache its value ([`Loaded`]: adaptive TTL, "do not cache").
    ///
    /// - After the soft timeout a caller is answered with the fail-safe copy when there
    ///   is one; after the hard timeout with the copy or an [`ErrorKind::Timeout`]. The
    ///   load goes on and writes its value unless
    ///   [`complete_in_background`](LoadOptions::complete_in_background) is off. Timeouts
    ///   count from the miss, and need a tokio runtime.
    /// - A loader that fails (or is stopped at its hard timeout) while a fail-safe copy is
    ///   within its grace: the copy answers (a counted stale hit), and the next loads of
    ///   the key are answered with it for the fail-safe
    ///   [`throttle`](crate::FailSafe::throttle) without calling the loader. A write of
    ///   the key ends the throttle.
    /// - With [`eager_refresh`](LoadOptions::eager_refresh), a hit on a copy past that
    ///   fraction of its TTL (the TTL the load gives the layer that answered) starts one
    ///   background load of the key (one per copy; a write that races it wins) and is
    ///   answered at once.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] for invalid options (zero timeouts or TTLs, a soft
    /// timeout not shorter than the hard one, a fraction outside `(0, 1)`, an unknown
    /// layer, skipping the authoritative layer); otherwise as
    /// [`try_get_or_load`](MultiLayer::try_get_or_load).
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor::{LayerConfig, LoadOptions, Loaded, MultiLayer};
    /// use capacitor::memory::DashMapLayer;
    /// use std::time::Duration;
    ///
    /// let cache = MultiLayer::<u64, String>::builder()
    ///     .layer(LayerConfig::new("l1", DashMapLayer::new()).ttl(Duration::from_secs(60)))
    ///     .layer(LayerConfig::new("store", DashMapLayer::new()))
    ///     .build()?;
    /// let options = cache.load_options().hard_timeout(Duration::from_secs(1)).layer_ttl("l1", Duration::from_secs(5));
    /// let price = cache
    ///     .get_or_load_with(&7, &options, || async {
    ///         // The origin says how long its answer holds.
    ///         Ok::<_, std::io::Error>(Loaded::value("12.50".to_string()).ttl(Duration::from_secs(30)))
    ///     })
    ///     .await?;
    /// assert_eq!(price.as_deref(), Some("12.50"));
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub async fn get_or_load_with<F, Fut, E>(
        &self,
        key: &K,
        options: &LoadOptions,
        loader: F,
    ) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<V>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let plan = Arc::new(self.resolve(options, ErrorKind::InvalidInput)?);
        self.load(key, &plan, boxed(loader)).await
    }

    /// The builder's [`load_options`](crate::MultiLayerBuilder::load_options): the
    /// defaults of every load, to change for one call.
    pub fn load_options(&self) -> LoadOptions {
        self.inner.load_options.clone()
    }

    pub(super) fn resolve(&self, options: &LoadOptions, kind: ErrorKind) -> Result<Plan> {
        let names: Vec<&str> = self.inner.slots.iter().map(|s| s.name.as_str()).collect();
        options.resolve(&names, self.inner.authoritative, kind)
    }

    pub(super) fn event(&self, event: LoadEvent<'_, K>) {
        crate::observe::load_event(&self.inner.name, &event);
        if let Some(listener) = &self.inner.on_load {
            listener(&event);
        }
    }

    /// The first layer's answer for a load: the entry and the index of the layer that
    /// had it.
    pub(super) async fn read_for_load(&self, key: &K, plan: &Plan) -> Result<Option<(Entry<V>, usize)>> {
        if plan.eager.is_none() && plan.skip_read.is_empty() && plan.skip_write.is_empty() {
            return Ok(self.get_entry(key).await?.map(|e| (e, 0)));
        }
        self.check_open(Operation::Get)?;
        let inner = &*self.inner;
        let ticket = inner.guard.ticket(inner.guard.stripe_of(key));
        let (mut skip_read, mut skip_write) = (LayerSet::NONE, LayerSet::NONE);
        plan.skip_read.iter().for_each(|&i| skip_read.add(i));
        plan.skip_write.iter().for_each(|&i| skip_write.add(i));
        self.read_from(key, 0, ticket, skip_read, skip_write).await
    }

    /// The loading read of `key`: the layers, else a flight.
    pub(super) async fn load(
        &self,
        key: &K,
        plan: &Arc<Plan>,
        loader: impl FnOnce() -> BoxLoad<V> + Send + 'static,
    ) -> Result<Option<V>> {
        let inner = &*self.inner;
        let counters = &inner.flights.counters;
        if let Some((entry, layer)) = self.read_for_load(key, plan).await? {
            counters.reads.incr(crate::stats::Counter::Hit);
            self.event(LoadEvent::Hit { key });
            if self.refresh_due(&entry, layer, plan) {
                self.refresh_eagerly(key, &entry, plan, loader);
            }
            return Ok(Some(entry.value));
        }
        // Boxed: the hit path's future stays small (and cheap to poll).
        Box::pin(self.load_missed(key, plan, loader)).await
    }

    /// [`load`](Self::load) after no layer had the key.
    async fn load_missed(
        &self,
        key: &K,
        plan: &Arc<Plan>,
        loader: impl FnOnce() -> BoxLoad<V> + Send + 'static,
    ) -> Result<Option<V>> {
        let inner = &*self.inner;
        let counters = &inner.flights.counters;
        counters.reads.incr(crate::stats::Counter::Miss);
        self.event(LoadEvent::Miss { key });
        let now = inner.clock.now();
        if inner.negative.as_ref().is_some_and(|n| n.contains(key, now)) {
            return Ok(None);
        }
        if plan.fail_safe {
            if let Some(copy) = inner.fail_safe.as_ref().and_then(|f| f.throttled(key, now)) {
                return Ok(Some(self.stale_hit(key, copy, StaleReason::Throttled)));
            }
        }
        let mut loader = Some(loader);
        loop {
            match self.role(key, plan) {
                Role::Lead {
                    tx,
                    rx,
                    id,
                    fill,
                    waiters,
                } => {
                    let Some(loader) = loader.take() else {
                        // Only a follower leads after a flight ended without an outcome,
                        // and it still holds its loader.
                        return Err(Error::new(
                            ErrorKind::Backend,
                            Operation::Get,
                            "the load was lost",
                        ));
                    };
                    let landing = Landing {
                        cache: self.clone(),
                        key: key.clone(),
                        id,
                    };
                    let flight = {
                        let (cache, key, plan) = (self.clone(), key.clone(), Arc::clone(plan));
                        Box::pin(async move {
                            let outcome = cache.fly(&key, &fill, &plan, false, loader).await;
                            tx.send(Some(outcome));
                            drop(landing);
                        })
                    };
                    // Declared before `waiting`, so dropped after it: the hand-off sees
                    // whether any caller still waits.
                    let mut handoff = Handoff::new(flight, vec![Arc::clone(&waiters)]);
                    let _waiting = Waiting {
                        flights: &inner.flights,
                        key,
                        id,
                        waiters,
                    };
                    let waited = handoff
                        .drive(self.wait(key, &rx, plan, tokio::time::Instant::now()))
                        .await;
                    return match waited {
                        Waited::Done(result) => result,
                        // A flight this caller drives ends with an outcome or a panic
                        // (which has reached this caller already).
                        Waited::Gone => Err(Error::new(
                            ErrorKind::Backend,
                            Operation::Get,
                            "the load was stopped",
                        )),
                    };
                }
                Role::Follow { rx, id, waiters } => {
                    bump(&counters.joined);
                    let _waiting = Waiting {
                        flights: &inner.flights,
                        key,
                        id,
                        waiters,
                    };
                    match self.wait(key, &rx, plan, tokio::time::Instant::now()).await {
                        Waited::Done(result) => return result,
                        // The flight panicked or was stopped: try again, maybe as leader.
                        Waited::Gone => continue,
                    }
                }
            }
        }
    }

    /// Joins the flight of `key` when its value is still current, else starts one.
    pub(super) fn role(&self, key: &K, plan: &Plan) -> Role<V> {
        let inner = &*self.inner;
        let mut flights = inner.flights.lock();
        if let Some(flight) = flights.get(key) {
            // A flight that began before a write of the key (or during one) may hand out
            // the value from before it: a caller arriving after the write must not get
            // that, so it starts a flight of its own. (The flight's own fill is a write
            // too, but it writes the flight's value.)
            if inner.guard.still_valid(flight.ticket) || flight.fill.only_write_since(&inner.guard) {
                flight.waiters.count.fetch_add(1, Ordering::AcqRel);
                return Role::Follow {
                    rx: flight.outcome.clone(),
                    id: flight.id,
                    waiters: Arc::clone(&flight.waiters),
                };
            }
        }
        let (tx, rx, id, fill, waiters) = self.new_flight(&mut flights, key, plan, 1);
        Role::Lead {
            tx,
            rx,
            id,
            fill,
            waiters,
        }
    }

    /// Registers a new flight of `key` (replacing one a write voided).
    #[allow(clippy::type_complexity)]
    pub(super) fn new_flight(
        &self,
        flights: &mut HashMap<K, Flight<V>>,
        key: &K,
        plan: &Plan,
        waiting: usize,
    ) -> (Sender<V>, Receiver<V>, u64, Arc<Fill>, Arc<Waiters>) {
        let inner = &*self.inner;
        let (tx, rx) = outcome_channel();
        let id = inner.flights.next_id.fetch_add(1, Ordering::Relaxed);
        let ticket = inner.guard.ticket(inner.guard.stripe_of(key));
        let fill = Arc::new(Fill::for_load(ticket, plan));
        let waiters = Arc::new(Waiters {
            count: AtomicUsize::new(waiting),
            abort: Mutex::new(None),
            cancel_with_callers: plan.cancel_with_callers,
        });
        flights.insert(
            key.clone(),
            Flight {
                id,
                ticket,
                fill: Arc::clone(&fill),
                outcome: rx.clone(),
                waiters: Arc::clone(&waiters),
            },
        );
        (tx, rx, id, fill, waiters)
    }

    /// Waits for the flight's outcome, by this caller's timeouts.
    pub(super) async fn wait(
        &self,
        key: &K,
        rx: &Receiver<V>,
        plan: &Plan,
        since: tokio::time::Instant,
    ) -> Waited<V> {
        let timers = tokio::runtime::Handle::try_current().is_ok();
        let stale_possible = plan.fail_safe && self.inner.fail_safe.is_some();
        let mut soft = plan
            .soft
            .filter(|_| timers && stale_possible)
            .map(|d| Box::pin(tokio::time::sleep_until(since + d)));
        let mut hard = plan
            .hard
            .filter(|_| timers)
            .map(|d| (d, Box::pin(tokio::time::sleep_until(since + d))));
        let mut outcome = Box::pin(rx.wait());
        enum Woke<V> {
            Outcome(Outcome<V>),
            Soft,
            Hard(Duration),
        }
        loop {
            let woke = std::future::poll_fn(|cx| {
                if let Poll::Ready(o) = outcome.as_mut().poll(cx) {
                    return Poll::Ready(Woke::Outcome(o));
                }
                if let Some(sleep) = &mut soft {
                    if sleep.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woke::Soft);
                    }
                }
                if let Some((d, sleep)) = &mut hard {
                    if sleep.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woke::Hard(*d));
                    }
                }
                Poll::Pending
            })
            .await;
            let counters = &self.inner.flights.counters;
            match woke {
                Woke::Outcome(Some(Ok(v))) => return Waited::Done(Ok(v)),
                Woke::Outcome(Some(Err(e))) => return Waited::Done(self.load_failed(key, plan, &e)),
                Woke::Outcome(None) => return Waited::Gone,
                Woke::Soft => {
                    soft = None;
                    bump(&counters.soft_timeouts);
                    self.event(LoadEvent::TimedOut { key, hard: false });
                    if let Some(copy) = self.stale_copy(key) {
                        return Waited::Done(Ok(Some(self.stale_hit(key, copy, StaleReason::SoftTimeout))));
                    }
                }
                Woke::Hard(limit) => {
                    bump(&counters.hard_timeouts);
                    self.event(LoadEvent::TimedOut { key, hard: true });
                    if plan.fail_safe {
                        if let Some(copy) = self.stale_copy(key) {
                            return Waited::Done(Ok(Some(self.stale_hit(
                                key,
                                copy,
                                StaleReason::HardTimeout,
                            ))));
                        }
                    }
                    return Waited::Done(Err(timeout_error(limit, true)));
                }
            }
        }
    }

    /// The fail-safe copy of `key` within its grace, not counted.
    fn stale_copy(&self, key: &K) -> Option<Entry<V>> {
        let inner = &*self.inner;
        inner.fail_safe.as_ref()?.peek(key, inner.clock.now())
    }

    /// Counts and tells a load answered with a fail-safe copy.
    pub(super) fn stale_hit(&self, key: &K, copy: Entry<V>, reason: StaleReason) -> V {
        let inner = &*self.inner;
        bump(&inner.flights.counters.stale_hits);
        if let Some(fail_safe) = &inner.fail_safe {
            fail_safe.counted(true, 1);
        }
        crate::observe::stale_hit(&inner.name);
        self.event(LoadEvent::StaleHit { key, reason });
        copy.value
    }

    /// A load of `key` failed with `err`: the fail-safe copy (throttled from now on), or
    /// the error.
    pub(super) fn load_failed(&self, key: &K, plan: &Plan, err: &Arc<Error>) -> Result<Option<V>> {
        let inner = &*self.inner;
        if plan.fail_safe && servable(err) {
            if let Some(fail_safe) = &inner.fail_safe {
                let now = inner.clock.now();
                if let Some(copy) = fail_safe.peek(key, now) {
                    fail_safe.throttle(key, now);
                    return Ok(Some(self.stale_hit(key, copy, StaleReason::LoaderFailed)));
                }
                fail_safe.counted(false, 1);
            }
        }
        Err(shared_error(err))
    }

    /// A flight's work: the read again (a flight just before may have written the key),
    /// the loader, the fill.
    pub(super) async fn fly(
        &self,
        key: &K,
        fill: &Fill,
        plan: &Plan,
        refresh: bool,
        loader: impl FnOnce() -> BoxLoad<V>,
    ) -> std::result::Result<Option<V>, Arc<Error>> {
        let inner = &*self.inner;
        if !refresh {
            if let Some((entry, _)) = self.read_for_load(key, plan).await.map_err(Arc::new)? {
                return Ok(Some(entry.value));
            }
        }
        bump(&inner.flights.counters.loads);
        self.event(LoadEvent::LoadStarted { key, refresh });
        let started = Instant::now();
        let loaded = if plan.background {
            loader().await
        } else {
            self.bounded(key, plan, loader()).await
        };
        match loaded {
            Ok(loaded) => {
                self.event(LoadEvent::LoadSucceeded {
                    key,
                    elapsed: started.elapsed(),
                });
                self.keep(key, fill, plan, loaded).await
            }
            Err(e) => {
                bump(&inner.flights.counters.failures);
                self.event(LoadEvent::LoadFailed { key, error: &e });
                Err(Arc::new(e))
            }
        }
    }

    /// Caches what a loader returned, unless a write of the key overtook the load.
    pub(super) async fn keep(
        &self,
        key: &K,
        fill: &Fill,
        plan: &Plan,
        loaded: Loaded<V>,
    ) -> std::result::Result<Option<V>, Arc<Error>> {
        let inner = &*self.inner;
        let (value, ttl, cache) = loaded.into_parts();
        if !cache || !inner.guard.still_valid(fill.ticket) {
            bump(&inner.flights.counters.not_cached);
            return Ok(value);
        }
        match &value {
            // Written only if no write of the key begins before the fill does.
            Some(v) => {
                let _filling = inner.filling.begin(key);
                self.write_or_fill(key, v, ttl.or(plan.ttl), Some(fill))
                    .await
                    .map_err(Arc::new)?;
                if !fill.began() {
                    bump(&inner.flights.counters.not_cached);
                }
            }
            None => {
                if let Some(n) = &inner.negative {
                    n.remember(key, inner.clock.now());
                }
            }
        }
        Ok(value)
    }

    /// The loader, stopped at the hard timeout (or at the soft one when a fail-safe copy
    /// can answer then).
    async fn bounded(&self, key: &K, plan: &Plan, load: BoxLoad<V>) -> Result<Loaded<V>> {
        if tokio::runtime::Handle::try_current().is_err() {
            return load.await;
        }
        let stale_possible = plan.fail_safe && self.inner.fail_safe.is_some();
        let mut soft = plan
            .soft
            .filter(|_| stale_possible)
            .map(|d| (d, Box::pin(tokio::time::sleep(d))));
        let mut hard = plan.hard.map(|d| (d, Box::pin(tokio::time::sleep(d))));
        let mut load = load;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = load.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if let Some((d, sleep)) = &mut soft {
                if sleep.as_mut().poll(cx).is_ready() {
                    let limit = *d;
                    soft = None;
                    if self.stale_copy(key).is_some() {
                        return Poll::Ready(Err(timeout_error(limit, false)));
                    }
                }
            }
            if let Some((d, sleep)) = &mut hard {
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(timeout_error(*d, true)));
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Whether `entry`, answered by layer `layer`, has lived the eager-refresh fraction of
    /// the TTL this load gives that layer.
    fn refresh_due(&self, entry: &Entry<V>, layer: usize, plan: &Plan) -> bool {
        let Some(fraction) = plan.eager else {
            return false;
        };
        let Some(ttl) = self.inner.load_ttl(layer, plan, plan.ttl) else {
            return false;
        };
        let Some(left) = entry.remaining(self.inner.clock.now()) else {
            return false;
        };
        !left.is_zero() && left <= ttl.mul_f64(1.0 - fraction)
    }

    /// Starts one background load of `key` whose result replaces `entry` (unless a write
    /// of the key overtakes it), when none runs and this copy did not start one already.
    fn refresh_eagerly(
        &self,
        key: &K,
        entry: &Entry<V>,
        plan: &Arc<Plan>,
        loader: impl FnOnce() -> BoxLoad<V> + Send + 'static,
    ) {
        let inner = &*self.inner;
        let (Some(copy_expires), Ok(runtime)) = (entry.expires_at, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let mut flights = inner.flights.lock();
        if flights.contains_key(key) {
            return;
        }
        {
            let mut refreshed = inner.flights.refreshed.lock().unwrap_or_else(|p| p.into_inner());
            if refreshed.get(key) == Some(&copy_expires) {
                return;
            }
            if refreshed.len() >= MAX_REFRESHED && !refreshed.contains_key(key) {
                let now = inner.clock.now();
                refreshed.retain(|_, expires| *expires > now);
                if refreshed.len() >= MAX_REFRESHED {
                    return;
                }
            }
            refreshed.insert(key.clone(), copy_expires);
        }
        let (tx, _rx, id, fill, _waiters) = self.new_flight(&mut flights, key, plan, 0);
        drop(flights);
        bump(&inner.flights.counters.refreshes);
        let landing = Landing {
            cache: self.clone(),
            key: key.clone(),
            id,
        };
        let (cache, key, plan) = (self.clone(), key.clone(), Arc::clone(plan));
        runtime.spawn(async move {
            let outcome = cache.fly(&key, &fill, &plan, true, loader).await;
            tx.send(Some(outcome));
            drop(landing);
        });
    }
}

impl<K, V> super::Inner<K, V> {
    /// The TTL a load gives layer `layer` for an entry TTL of `ttl` (before jitter).
    pub(super) fn load_ttl(&self, layer: usize, plan: &Plan, ttl: Option<Duration>) -> Option<Duration> {
        let base = plan
            .layer_ttl
            .as_ref()
            .and_then(|t| t.get(layer).copied().flatten())
            .or(self.slots.get(layer).and_then(|s| s.ttl));
        crate::config::min_ttl(base, ttl)
    }
}
