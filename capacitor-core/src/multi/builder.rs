//! [`MultiLayerBuilder`]: the composer's options, their validation, and construction.

use std::fmt;
use std::hash::Hash;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use super::invalidation::{Bus, BusConfig};
use super::loader::{Flights, LoadListener, NegativeCache};
use super::recovery::{Recovery, Replay};
use super::refresh::Refresher;
use super::slot::{attach_batchers, Batcher, Slot};
use super::write_back::drain;
use super::{write, Inner, MultiLayer};
use crate::bus::InvalidationBus;
use crate::config::{BreakerSetting, LayerConfig, WritePolicy};
use crate::entry::{system_clock, Clock, SharedClock};
use crate::error::{Error, Result};
use crate::failsafe::{FailSafe, Store as FailSafeStore};
use crate::guard::Generations;
use crate::health::{Breaker, CircuitBreaker, DirtyKeys, HealthEvent, HealthListener};
use crate::load::{LoadEvent, LoadOptions};
use crate::stats::LayerCounters;
use crate::writeback::Queue;

// Named by the doc comments only.
#[cfg(doc)]
use crate::error::ErrorKind;
#[cfg(doc)]
use crate::layer::{Capabilities, Layer};

/// Keys a cache layer tracks as possibly outdated before it is skipped altogether.
const SUSPECT_KEYS: usize = 100_000;
/// [`MultiLayerBuilder::bus_queue_bound`]'s default.
const DEFAULT_BUS_QUEUE_BOUND: usize = 10_000;

/// Builds a [`MultiLayer`]; [`build`](MultiLayerBuilder::build) validates everything.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use capacitor::memory::{DashMapLayer, MokaLayer};
/// use capacitor::{FailSafe, LayerConfig, MultiLayer};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let cache = MultiLayer::<String, String>::builder()
///     .name("users")
///     .layer(LayerConfig::new("l1", MokaLayer::builder().max_capacity(10_000).build()?).ttl(Duration::from_secs(30)))
///     .layer(LayerConfig::new("store", DashMapLayer::new()))
///     .cache_misses_for(Duration::from_secs(5))
///     .fail_safe(FailSafe::new(Duration::from_secs(3600)))
///     .build()?;
/// # let _ = cache;
/// # Ok::<(), capacitor::Error>(()) }).unwrap();
/// ```
///
/// Defaults: named after its layers (`"l1+redis+postgres"`), promotion on, [`WritePolicy::Through`], cache-layer write
/// failures do not fail the write, the system clock.
#[must_use]
pub struct MultiLayerBuilder<K, V> {
    name: Option<String>,
    layers: Vec<LayerConfig<K, V>>,
    promotion: bool,
    fail_on_cache_error: bool,
    policy: WritePolicy,
    clock: SharedClock,
    cache_misses_for: Option<Duration>,
    ttl_jitter: f64,
    bus: Option<Arc<dyn InvalidationBus<K>>>,
    bus_config: BusConfig,
    fail_safe: Option<FailSafe>,
    on_health: Option<HealthListener>,
    refresh_ahead: Option<Duration>,
    on_refused: Option<super::RefusedListener<K>>,
    cooperative: bool,
    load_options: LoadOptions,
    on_load: Option<LoadListener<K>>,
}

/// [`MultiLayerBuilder::cooperative`]'s default.
const COOPERATIVE_DEFAULT: bool = false;

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
    /// The composer's own name, in its errors, stats and metrics, and its [`Layer::name`]
    /// when nested in another composer (default: its layers' names joined by `+`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
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

    /// Keep the in-process layers of several application instances coherent through
    /// `bus`: every change this composer makes (set, delete, their batch forms, a commit,
    /// a drained write-back batch, [`clear`](MultiLayer::clear)) is announced once it
    /// succeeded, never a loader's fill or a promotion; each key other instances announce
    /// is dropped from this instance's in-process layers (those declaring
    /// [`Capabilities::sync_ops`]), and they are cleared whenever the subscription
    /// (re)starts, the first time included.
    ///
    /// Announcements leave from a background queue, in order, without the write waiting
    /// ([`publish_wait`](Self::publish_wait) to wait). What the bus cannot take is kept and
    /// sent when it answers again; past [`bus_queue_bound`](Self::bus_queue_bound) waiting
    /// keys, they are replaced by one clear of every instance's in-process layers. Needs a
    /// tokio runtime at `build`. Call the bus's `connect` before `build` to start with a
    /// bus that is up. See [`InvalidationBus`].
    pub fn invalidation_bus(mut self, bus: Arc<dyn InvalidationBus<K>>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Each write waits up to `limit` for its announcement on the invalidation bus to be
    /// sent (default: it does not wait). A write never fails because of the bus: past the
    /// limit it returns and the announcement stays queued; while the bus is failing
    /// (the last attempt to send failed) writes do not wait at all.
    pub fn publish_wait(mut self, limit: Duration) -> Self {
        self.bus_config.wait = Some(limit);
        self
    }

    /// Announcements waiting for the invalidation bus at most (default 10 000); past it
    /// they are replaced by one clear (counted in `BusStats::overflows`).
    pub fn bus_queue_bound(mut self, keys: usize) -> Self {
        self.bus_config.queue_bound = keys;
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
    /// use capacitor::{LayerConfig, MultiLayer};
    /// use capacitor::memory::DashMapLayer;
    ///
    /// let cache = MultiLayer::<String, u32>::builder()
    ///     .layer(LayerConfig::new("l1", DashMapLayer::new()).ttl(Duration::from_secs(30)))
    ///     .layer(LayerConfig::new("l2", DashMapLayer::new()))
    ///     .refresh_ahead(Duration::from_secs(5)) // renew in the last 5 s of the 30
    ///     .build()?;
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
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

    /// Under [`WritePolicy::Back`], call `listener` with the key and the error of every
    /// drained write the store refused (not a temporary failure: a value or key it
    /// cannot store). Such a write is set aside, reported by
    /// [`refused_writes`](MultiLayer::refused_writes) until it is rewritten, retried or
    /// cleared, and blocks nothing else. It runs on the drain task: keep it short.
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::{LayerConfig, MultiLayer, WriteBack, WritePolicy};
    /// use capacitor::memory::DashMapLayer;
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let cache = MultiLayer::<String, String>::builder()
    ///     .layer(LayerConfig::new("l1", DashMapLayer::new()))
    ///     .layer(LayerConfig::new("store", DashMapLayer::new()))
    ///     .write_policy(WritePolicy::Back(WriteBack::new()))
    ///     .on_refused_write(|key, err| eprintln!("the store refused {key}: {err}"))
    ///     .build()?;
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub fn on_refused_write(mut self, listener: impl Fn(&K, &Error) + Send + Sync + 'static) -> Self {
        self.on_refused = Some(Arc::new(listener));
        self
    }

    /// The options of every load (`get_or_load` and its forms) that names none: timeouts,
    /// eager refresh, TTLs, skipped layers (see [`LoadOptions`]). A call changes them with
    /// [`get_or_load_with`](MultiLayer::get_or_load_with).
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::{FailSafe, LayerConfig, LoadOptions, MultiLayer};
    /// use capacitor::memory::DashMapLayer;
    /// use std::time::Duration;
    ///
    /// let cache = MultiLayer::<String, String>::builder()
    ///     .layer(LayerConfig::new("l1", DashMapLayer::new()).ttl(Duration::from_secs(60)))
    ///     .layer(LayerConfig::new("store", DashMapLayer::new()))
    ///     .fail_safe(FailSafe::new(Duration::from_secs(3600)))
    ///     .load_options(
    ///         LoadOptions::new()
    ///             .soft_timeout(Duration::from_millis(100))
    ///             .hard_timeout(Duration::from_secs(2))
    ///             .eager_refresh(0.9),
    ///     )
    ///     .build()?;
    /// assert_eq!(cache.load_options().hard_timeout, Some(Duration::from_secs(2)));
    /// # Ok::<(), capacitor::Error>(())
    /// ```
    pub fn load_options(mut self, options: LoadOptions) -> Self {
        self.load_options = options;
        self
    }

    /// Call `listener` on what loading reads do: hits, misses, stale hits, loads started,
    /// succeeded or failed, timeouts (see [`LoadEvent`]). It runs on the task of the read
    /// or of the load: keep it short.
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::{LayerConfig, LoadEvent, MultiLayer};
    /// use capacitor::memory::DashMapLayer;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    ///
    /// let failures = Arc::new(AtomicU64::new(0));
    /// let seen = Arc::clone(&failures);
    /// let cache = MultiLayer::<String, String>::builder()
    ///     .layer(LayerConfig::new("l1", DashMapLayer::new()))
    ///     .on_load_event(move |event| {
    ///         if let LoadEvent::LoadFailed { .. } = event {
    ///             seen.fetch_add(1, Ordering::Relaxed);
    ///         }
    ///     })
    ///     .build()?;
    /// # Ok::<(), capacitor::Error>(())
    /// ```
    pub fn on_load_event(mut self, listener: impl Fn(&LoadEvent<'_, K>) + Send + Sync + 'static) -> Self {
        self.on_load = Some(Arc::new(listener));
        self
    }

    /// Whether reads take part in tokio's cooperative scheduling budget (default: off).
    ///
    /// An L1 hit is answered on its first poll, so a task looping over hits never gives
    /// its worker thread back, and other tasks on that worker wait. With this on, each
    /// read spends one unit of the task's budget (128 per scheduling turn), and a read
    /// on an empty budget yields to the runtime first, as tokio's own channels and
    /// sockets do. It costs the hit a thread-local lookup: about 30 instructions on a
    /// 340-instruction dashmap hit, which is why it is an option. Turn it on when a task
    /// may serve long runs of hits without awaiting anything else.
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::{LayerConfig, MultiLayer};
    /// use capacitor::memory::DashMapLayer;
    ///
    /// let cache = MultiLayer::<String, String>::builder()
    ///     .layer(LayerConfig::new("l1", DashMapLayer::new()))
    ///     .cooperative(true)
    ///     .build()?;
    /// # Ok::<(), capacitor::Error>(())
    /// ```
    pub fn cooperative(mut self, on: bool) -> Self {
        self.cooperative = on;
        self
    }

    /// Validates the configuration and builds the composer.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] naming the field: no layers, an empty or duplicate layer
    /// name, a zero TTL or timeout, invalid breaker, fail-safe or load options, every
    /// layer read-only, read batching with a zero window or `max_keys` or on an
    /// in-process layer.
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
            if let Some(batching) = &l.batch_reads {
                let field = format!("layers[{i}].batch_reads");
                batching.validate(&field)?;
                if l.layer.capabilities().sync_ops {
                    return Err(Error::config(
                        &field,
                        format_args!(
                            "layer `{}` answers in process: it has no round trip to batch",
                            l.name
                        ),
                    ));
                }
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
        let bus_runtime = match &self.bus {
            Some(_) => Some(tokio::runtime::Handle::try_current().map_err(|e| {
                Error::config(
                    "invalidation_bus",
                    "the bus sends from a tokio task; build inside a runtime",
                )
                .with_source(e)
            })?),
            None => None,
        };
        if self.bus.is_some() && self.bus_config.queue_bound == 0 {
            return Err(Error::config("bus_queue_bound", "must be greater than zero"));
        }
        if self.bus_config.wait == Some(Duration::ZERO) {
            return Err(Error::config("publish_wait", "must be greater than zero"));
        }
        let bus = self.bus;
        let mut all_sync = true;
        let name = self.name.unwrap_or_else(|| {
            let names: Vec<&str> = self.layers.iter().map(|l| l.name.as_str()).collect();
            names.join("+")
        });
        let cache: Arc<str> = Arc::from(name.as_str());
        let slots: Box<[Slot<K, V>]> = self
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
                    replay: (!sync_ops && !l.read_only && i != authoritative)
                        .then(|| Replay::new(SUSPECT_KEYS)),
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
                    batcher: l.batch_reads.map(Batcher::boxed),
                };
                all_sync &= sync_ops || slot.read_only;
                slot
            })
            .collect();
        let names: Vec<&str> = slots.iter().map(|s| s.name.as_str()).collect();
        let load_plan = Arc::new(self.load_options.resolve(
            &names,
            authoritative,
            crate::ErrorKind::Config,
        )?);
        drop(names);
        Ok(MultiLayer {
            inner: Arc::new_cyclic(|me| Inner {
                me: me.clone(),
                recovery: Recovery::default(),
                name,
                slots: attach_batchers(slots, me),
                authoritative,
                promotion: self.promotion,
                fail_on_cache_error: self.fail_on_cache_error,
                policy: self.policy,
                guard: Generations::new(),
                clock: self.clock,
                closed: AtomicBool::new(false),
                queue,
                flights: Flights::default(),
                filling: Default::default(),
                negative: self.cache_misses_for.map(NegativeCache::new),
                ttl_jitter: self.ttl_jitter,
                bus: bus.map(|bus| Bus::new(bus, &self.bus_config)),
                fail_safe: self.fail_safe.map(FailSafeStore::new),
                refresh: self.refresh_ahead.map(Refresher::new),
                in_doubt: write::InDoubt::default(),
                on_refused: self.on_refused,
                cooperative: self.cooperative,
                load_options: self.load_options,
                load_plan,
                on_load: self.on_load,
            }),
        })
        .inspect(|cache| {
            if let Some(runtime) = runtime {
                runtime.spawn(drain(Arc::clone(&cache.inner)));
            }
        })
        .and_then(|cache| {
            if let (Some(bus), Some(runtime)) = (&cache.inner.bus, &bus_runtime) {
                bus.spawn_sender(runtime);
                // Weak: the subscription must not keep a dropped composer alive.
                let weak = Arc::downgrade(&cache.inner);
                bus.transport.subscribe(Arc::new(move |message| {
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
            name: None,
            layers: Vec::new(),
            promotion: true,
            fail_on_cache_error: false,
            policy: WritePolicy::Through,
            clock: system_clock(),
            cache_misses_for: None,
            ttl_jitter: 0.0,
            bus: None,
            bus_config: BusConfig {
                queue_bound: DEFAULT_BUS_QUEUE_BOUND,
                wait: None,
            },
            fail_safe: None,
            on_health: None,
            refresh_ahead: None,
            on_refused: None,
            cooperative: COOPERATIVE_DEFAULT,
            load_options: LoadOptions::default(),
            on_load: None,
        }
    }
}
