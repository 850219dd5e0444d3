//! The composer: [`MultiLayer`] and its builder.
//!
//! A composer puts several layers behind one typed key-value API. The first layer is L1;
//! the bottom-most writable layer is the authoritative one, the source of truth for
//! writes; the layers above it are cache layers.
//!
//! # Reads and promotion
//!
//! A read asks the layers in order and returns the first hit. An error of a cache layer
//! counts as a miss and the read goes on downward; an error of the last layer is the
//! caller's error; a value that does not decode is a miss anywhere. In-process layers
//! (synchronous operations, no timeout, no breaker) answer without a future, so an L1
//! hit costs one virtual call and one counter; the read continues in a boxed future only
//! from the first layer that must be awaited, or for a promotion that must be. A remote
//! cache layer is passed by for keys it may hold an outdated copy of (a write could
//! neither reach it nor remove its copy, or may still land there).
//!
//! With promotion on, a hit below L1 is copied into the writable layers above it, nearest
//! first, with `ttl = min(layer TTL, remaining life)`; layers whose read failed during
//! this read are left out. Before it reads below L1, the read takes a ticket of the key's
//! stripe (see `crate::guard`): the ticket is void if a write of the key was in flight
//! then, a copy upward is written only while no write of the key has begun since, and it
//! is checked again after the copy, which is removed if one has (a later miss is
//! harmless, a stale hit is not). Keys whose last write to the authoritative layer had an
//! unknown outcome get no copy above it until their pin ends.
//!
//! # Writes
//!
//! Every write form (set, delete, their batch forms, the write-back drain, a transaction's
//! commit, a write-back `set` into L1) goes through one write path (`write::fan_out`).
//! The key's stripes are entered first (readers' tickets are void from there). The
//! authoritative layer is written first; if it fails, the caches above it are left as
//! they were, unless the outcome is unknown (a timeout: the store may hold the new value),
//! in which case they are invalidated and the key is pinned. Then each cache layer above
//! is written, nearest the store first; a cache layer that fails is invalidated (or,
//! failing that, its copy is suspect and reads pass it by), and its error fails the write
//! only with [`fail_on_cache_error`](crate::MultiLayerBuilder::fail_on_cache_error).
//!
//! Concurrent writers of one key: if another write of the key ran at the same time, the
//! layers may have applied the two in different orders, so the writer that sees the
//! overlap removes the key from every cache layer (a later read copies the store's value
//! up). A writer does not return while a copy upward of its keys is between its two
//! checks. A write dropped half-way (the caller's future was dropped) removes the key
//! from the in-process layers and pins it in the remote cache layers. With an
//! invalidation bus, each written key is published after the write (under write-back,
//! once the drain has written it below), and keys other instances publish are dropped
//! from this instance's in-process layers.
//!
//! # Write-back
//!
//! Under [`WritePolicy::Back`] a write is queued in the pending-writes buffer (the latest
//! write of a key wins) and applied to L1; reads below L1 see the buffer first
//! (read-your-writes). A drain task writes due batches through the same write path to the
//! layers below L1, retrying a batch that failed for the moment with exponential backoff;
//! remaining TTLs are rounded down to 100 ms so that batches group. A `set` is checked by
//! every layer before it is acknowledged ([`Layer::check_write`]); a write the store
//! refuses anyway is set aside ([`refused_writes`](MultiLayer::refused_writes)) while
//! the rest is written. [`close`](MultiLayer::close) drains what is queued, and
//! [`unwritten_keys`](MultiLayer::unwritten_keys) reports what could not be written.
//!
//! # Fail-safe
//!
//! With [`fail_safe`](crate::MultiLayerBuilder::fail_safe), the composer keeps the last
//! value written through it, or read below L1 (under the read's ticket, as a promotion),
//! for each key, and serves it when a read fails because the layers that could answer
//! are down, time out or are skipped by their breakers (not when the composer is closed
//! or the call is invalid or unsupported). Deletes, transactions and invalidation-bus
//! messages remove copies.
//!
//! # Loads
//!
//! [`get_or_load`](MultiLayer::get_or_load) and its forms run one loader per key at a
//! time (single flight), on a tokio task of its own, so that callers that time out or are
//! cancelled do not stop it; each caller waits with its own soft and hard timeouts
//! ([`LoadOptions`](crate::LoadOptions)), answered with the fail-safe copy where one
//! exists. A write of the key that began since the flight did keeps the loaded value from
//! being written (the waiters still get it), a completion in the background and an eager
//! refresh included, and a caller that arrives after such a write starts a flight of its
//! own instead of joining (the flight's own fill does not count). The flight's ticket is
//! taken before its first read. Negative caching and TTL jitter are options of the
//! builder.
//!
//! # Files
//!
//! `builder` validates and constructs; `slot` is one configured layer (breaker, timeouts,
//! counters, suspect keys, read batcher); `future` and `read` are the read cascade, `promote` its
//! copies upward; `write` is the write path and its public methods, `write_back` the
//! drain task, `transaction` atomic commits; `fail_safe`, `invalidation`, `loader` (and `load_many`, its batches),
//! `refresh`, `warmup`, `scan` and `metrics` one concern each; `layer_impl` makes a
//! composer a [`Layer`]; `lifecycle` is `flush` and `close`.

use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::WritePolicy;
use crate::entry::SharedClock;
use crate::error::{Error, Operation, Result};
use crate::failsafe::Store as FailSafeStore;
use crate::guard::Generations;
use crate::health::DirtyKeys;
use crate::stats::Stats;
use crate::writeback::Queue;

// Named by the doc comments only.
#[cfg(doc)]
use crate::layer::Layer;

mod builder;
mod fail_safe;
mod future;
mod invalidation;
mod layer_impl;
mod lifecycle;
mod load_many;
mod loader;
#[cfg(feature = "metrics")]
mod metrics;
mod promote;
mod read;
mod recovery;
mod refresh;
mod scan;
mod slot;
mod transaction;
mod warmup;
mod write;
mod write_back;

#[cfg(feature = "metrics")]
pub use self::metrics::MetricsReporter;

pub use builder::MultiLayerBuilder;
pub use future::{Get, GetEntry};
pub use transaction::Transaction;
pub use warmup::{WarmUp, WarmUpReport};

use loader::{Flights, NegativeCache};
pub use refresh::RefreshStats;
use refresh::Refresher;
use slot::Slot;

struct Inner<K, V> {
    /// This composer, for the background tasks it starts on demand.
    me: std::sync::Weak<Inner<K, V>>,
    recovery: recovery::Recovery,
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
    /// Loaded values being written: writes of their keys wait for them.
    filling: loader::Filling<K>,
    negative: Option<NegativeCache<K>>,
    /// Writes shorten layer TTLs by a random fraction below this.
    ttl_jitter: f64,
    bus: Option<invalidation::Bus<K>>,
    fail_safe: Option<FailSafeStore<K, V>>,
    refresh: Option<Refresher<K>>,
    /// Keys whose last write to the store had an unknown outcome.
    in_doubt: write::InDoubt<K>,
    /// Told of every drained write the store refused.
    on_refused: Option<RefusedListener<K>>,
    /// Reads take part in tokio's cooperative budget.
    cooperative: bool,
    /// The builder's load options, and the same checked against the layers.
    load_options: crate::load::LoadOptions,
    load_plan: Arc<crate::load::Plan>,
    on_load: Option<loader::LoadListener<K>>,
}

/// A write-back write the store refused, set aside (see
/// [`MultiLayer::refused_writes`]).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedWrite<K> {
    /// The key.
    pub key: K,
    /// The kind of the store's error.
    pub kind: crate::ErrorKind,
    /// The store's error, as text.
    pub reason: String,
    /// How long ago the store refused it.
    pub age: std::time::Duration,
}

/// What [`MultiLayerBuilder::on_refused_write`] calls.
pub(super) type RefusedListener<K> = Arc<dyn Fn(&K, &Error) + Send + Sync>;

/// Several layers behind one typed key-value API.
///
/// Reads ask the layers in order and return the first hit; with promotion on, the value
/// is copied into the writable layers above with `ttl = min(layer TTL, remaining life)`.
/// Writes go through every writable layer, the authoritative (bottom) one first. The
/// module docs and the project's `docs/semantics.md` give the full semantics, concurrent
/// writers included. Cheap to clone (an `Arc` inside); clones share
/// layers and stats.
///
/// A `MultiLayer` is itself a [`Layer`], so it can be a layer of another.
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor::{LayerConfig, MultiLayer};
/// use capacitor::memory::DashMapLayer;
/// use std::time::Duration;
///
/// let cache = MultiLayer::<String, String>::builder()
///     .layer(LayerConfig::new("l1", DashMapLayer::new()).ttl(Duration::from_secs(60)))
///     .layer(LayerConfig::new("db", DashMapLayer::new()))
///     .build()?;
///
/// cache.set("user:42".into(), "Ada".into()).await?;
/// assert_eq!(cache.get(&"user:42".into()).await?, Some("Ada".to_string()));
/// assert!(cache.delete(&"user:42".into()).await?);
/// assert_eq!(cache.get(&"user:42".into()).await?, None);
/// cache.close().await?;
/// # Ok::<(), capacitor::Error>(()) }).unwrap();
/// ```
pub struct MultiLayer<K, V> {
    inner: Arc<Inner<K, V>>,
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

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn check_open(&self, op: Operation) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::closed(op).with_layer(self.inner.name.clone()));
        }
        Ok(())
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
                    if let Some(replay) = &s.replay {
                        stats.replay_pending = replay.len() as u64;
                        stats.replayed = replay.replayed.load(Ordering::Relaxed);
                        stats.replay_overflows = replay.overflows.load(Ordering::Relaxed);
                    }
                    stats
                })
                .collect(),
            fail_safe: self.inner.fail_safe.as_ref().map(FailSafeStore::stats),
            refresh: self.inner.refresh.as_ref().map(Refresher::stats),
            write_back: self.inner.queue.as_ref().map(Queue::stats),
            bus: self.inner.bus.as_ref().map(invalidation::Bus::stats),
            loads: self.inner.flights.counters.snapshot(),
        }
    }

    /// Under [`WritePolicy::Back`], the drained writes the store refused (a value or key
    /// it cannot store: [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput),
    /// [`ValueTooLarge`](crate::ErrorKind::ValueTooLarge),
    /// [`Encode`](crate::ErrorKind::Encode)), oldest first. Each is set aside: not
    /// retried, blocking no other write (kept beyond `queue_bound`, which bounds the
    /// writes still to drain), still served to reads (it was acknowledged),
    /// and listed in [`unwritten_keys`](MultiLayer::unwritten_keys), until a new write
    /// of its key replaces it, [`retry_refused_writes`](MultiLayer::retry_refused_writes)
    /// queues it again or [`clear_refused_writes`](MultiLayer::clear_refused_writes)
    /// drops it. Empty under write-through, where `set` returns the refusal.
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
    ///     .build()?;
    /// cache.set("k".into(), "v".into()).await?;
    /// cache.flush().await?;
    /// assert!(cache.refused_writes().is_empty());
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub fn refused_writes(&self) -> Vec<RefusedWrite<K>> {
        let Some(queue) = &self.inner.queue else {
            return Vec::new();
        };
        queue
            .refused()
            .into_iter()
            .map(|(key, r)| RefusedWrite {
                key,
                kind: r.kind,
                reason: r.reason,
                age: r.at.elapsed(),
            })
            .collect()
    }

    /// Queues every write the store refused again (after the cause was fixed: a raised
    /// size limit, a widened column); returns how many.
    pub fn retry_refused_writes(&self) -> usize {
        self.inner.queue.as_ref().map_or(0, Queue::retry_refused)
    }

    /// Gives up the writes the store refused: they leave the buffer, and L1 drops its
    /// copies, so that reads answer what the store holds. Returns their keys.
    ///
    /// # Errors
    ///
    /// L1's error when it cannot drop a copy (the key is then read past L1, as after any
    /// failed invalidation). The writes are dropped from the buffer regardless.
    pub async fn clear_refused_writes(&self) -> Result<Vec<K>> {
        let Some(queue) = &self.inner.queue else {
            return Ok(Vec::new());
        };
        let keys = queue.clear_refused();
        let l1 = &self.inner.slots[0];
        let mut first = None;
        for key in &keys {
            // As a write of the key: reads in flight do not copy an older value up.
            let _writing = self.inner.guard.begin_write(self.inner.guard.stripe_of(key));
            self.inner.forget(key);
            if let Err(e) = l1.delete(key).await {
                l1.invalidation_failed(&e, &[key], self.inner.clock.now());
                self.inner.recover();
                first.get_or_insert(e.with_layer(l1.name.clone()));
            }
        }
        first.map_or(Ok(keys), Err)
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
