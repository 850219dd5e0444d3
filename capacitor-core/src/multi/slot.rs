//! A configured layer ([`Slot`]): its breaker, timeouts, counters, suspect keys and read
//! batcher (`batch`), and the calls the composer makes on it.

use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use crate::entry::{Entry, SharedClock, Timestamp};
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::health::{is_failure, Admit, Breaker, BreakerState, DirtyKeys, HealthEvent, HealthListener};
use crate::layer::Layer;
use crate::stats::{Counter, LayerCounters};

mod batch;

pub(super) use batch::{attach as attach_batchers, Batcher};

/// How long one replay attempt may take on a layer without a write timeout.
const REPLAY_DEADLINE: Duration = Duration::from_secs(5);

pub(super) struct Slot<K, V> {
    pub(super) name: String,
    pub(super) layer: Arc<dyn Layer<K, V>>,
    pub(super) ttl: Option<Duration>,
    pub(super) read_only: bool,
    /// The layer answers synchronously and has no timeout or breaker to apply.
    pub(super) sync_ops: bool,
    /// Every writable layer above this one has synchronous operations: a promotion from
    /// here completes without awaiting.
    pub(super) sync_above: bool,
    pub(super) counters: LayerCounters,
    pub(super) read_timeout: Option<Duration>,
    pub(super) write_timeout: Option<Duration>,
    pub(super) breaker: Option<Breaker>,
    /// Cache layers reached over the network: keys they may hold outdated copies of.
    pub(super) suspects: Option<DirtyKeys<K>>,
    /// The same layers: keys to remove there once the layer answers again.
    pub(super) replay: Option<super::recovery::Replay<K>>,
    pub(super) on_health: Option<HealthListener>,
    pub(super) cache: Arc<str>,
    /// Sends concurrent `get`s as one round trip ([`ReadBatching`](crate::ReadBatching)).
    pub(super) batcher: Option<Box<Batcher<K, V>>>,
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

    pub(super) fn breaker_state(&self) -> BreakerState {
        self.breaker.as_ref().map_or(BreakerState::Closed, Breaker::state)
    }

    /// Whether a read of `key` must pass this layer by (it may hold an outdated copy).
    #[inline]
    pub(super) fn suspect(&self, key: &K, clock: &SharedClock) -> bool {
        self.suspects.as_ref().is_some_and(|s| s.skip(key, clock.now()))
    }

    /// Counts the failure of an invalidation (a skip by the open breaker is counted
    /// apart), keeps `keys` to remove once the layer answers (see `recovery`) and marks
    /// them suspect here, in that order. The caller wakes the recovery task.
    pub(super) fn invalidation_failed(&self, err: &Error, keys: &[&K], now: Timestamp) {
        if !err.is_circuit_open() {
            self.counters.incr(Counter::Error);
        }
        if let Some(replay) = &self.replay {
            replay.record(keys.iter().copied());
        }
        self.suspected(keys.iter().copied(), now);
    }

    /// This layer now holds the current state of `keys`.
    pub(super) fn cleaned<'a>(&self, keys: impl IntoIterator<Item = &'a K>, now: Timestamp) {
        if let Some(s) = &self.suspects {
            s.clean(keys, now);
        }
    }

    /// A write of `keys` could neither reach this layer nor remove its copies.
    pub(super) fn suspected<'a>(&self, keys: impl IntoIterator<Item = &'a K>, now: Timestamp) {
        if let Some(s) = &self.suspects {
            s.mark(keys, now);
        }
    }

    pub(super) async fn exists(&self, key: &K) -> Result<bool> {
        match self.sync_ops.then(|| self.layer.get_sync(key)).flatten() {
            Some(result) => result.map(|e| e.is_some()),
            None => {
                self.call(Operation::Exists, Access::Read, self.layer.exists(key))
                    .await
            }
        }
    }

    pub(super) async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        self.call(Operation::GetMany, Access::Read, self.layer.get_many(keys))
            .await
    }

    pub(super) async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
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

    pub(super) async fn delete(&self, key: &K) -> Result<bool> {
        match self.sync_ops.then(|| self.layer.delete_sync(key)).flatten() {
            Some(result) => result,
            None => {
                self.call(Operation::Delete, Access::Write, self.layer.delete(key))
                    .await
            }
        }
    }

    pub(super) async fn set_tagged(
        &self,
        key: &K,
        value: &V,
        ttl: Option<Duration>,
        tags: &[String],
    ) -> Result<()> {
        self.call(
            Operation::Set,
            Access::Write,
            self.layer.set_tagged(key, value, ttl, tags),
        )
        .await
    }

    pub(super) async fn remove_by_tag(&self, tag: &str) -> Result<Vec<K>> {
        self.call(
            Operation::DeleteMany,
            Access::Write,
            self.layer.remove_by_tag(tag),
        )
        .await
    }

    pub(super) async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        self.call(
            Operation::SetMany,
            Access::Write,
            self.layer.set_many(entries, ttl),
        )
        .await
    }

    pub(super) async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        self.call(Operation::DeleteMany, Access::Write, self.layer.delete_many(keys))
            .await
    }

    pub(super) async fn apply_atomic(&self, ops: &[crate::layer::WriteOp<K, V>]) -> Result<()> {
        self.call(
            Operation::Transaction,
            Access::Write,
            self.layer.apply_atomic(ops),
        )
        .await
    }

    /// Recovery's delete: under the layer's write timeout (5 s without one) but not its
    /// breaker, which
    /// would hold the replay back for its cool-down after the layer answers again (the
    /// replay retries on its own, and a layer that is down fails it at once).
    pub(super) async fn replay_delete_many(&self, keys: &[K]) -> Result<u64> {
        self.timed(Operation::DeleteMany, self.layer.delete_many(keys))
            .await
    }

    /// Recovery's clear (see [`replay_delete_many`](Self::replay_delete_many)).
    pub(super) async fn replay_clear(&self) -> Result<()> {
        self.timed(Operation::Clear, self.layer.clear()).await
    }

    async fn timed<T>(&self, op: Operation, operation: impl Future<Output = Result<T>>) -> Result<T> {
        // Without a write timeout, a bound of its own: a hung layer must not hold the
        // recovery of every layer.
        let limit = self.write_timeout.unwrap_or(REPLAY_DEADLINE);
        tokio::time::timeout(limit, operation).await.unwrap_or_else(|_| {
            self.counters.incr(Counter::Timeout);
            Err(Error::new(
                ErrorKind::Timeout,
                op,
                format!("no answer within {limit:?} (replay)"),
            ))
        })
    }

    pub(super) async fn clear(&self) -> Result<()> {
        match self.sync_ops.then(|| self.layer.clear_sync()).flatten() {
            Some(result) => result,
            None => {
                self.call(Operation::Clear, Access::Write, self.layer.clear())
                    .await
            }
        }
    }

    pub(super) async fn flush(&self) -> Result<()> {
        self.call(Operation::Flush, Access::Write, self.layer.flush())
            .await
    }
}

impl<K, V> Slot<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A read of `key`: in process, through the batcher when reads are batched, or alone.
    pub(super) async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        match self.sync_ops.then(|| self.layer.get_sync(key)).flatten() {
            Some(result) => result,
            None => match &self.batcher {
                // Boxed: an unbatched read's future stays the size it was.
                Some(batcher) => Box::pin(batcher.get(self, key)).await,
                None => self.get_direct(key).await,
            },
        }
    }

    /// One awaited `get` of `key`, never batched.
    pub(super) async fn get_direct(&self, key: &K) -> Result<Option<Entry<V>>> {
        self.call(Operation::Get, Access::Read, self.layer.get(key)).await
    }
}

impl<K, V> Slot<K, V> {
    pub(super) fn error(&self, err: Error) -> Error {
        if !err.is_circuit_open() {
            self.counters.incr(Counter::Error);
        }
        err.with_layer(self.name.clone())
    }
}

/// A set of layer indices (the first 64 layers; later ones are never members).
#[derive(Clone, Copy)]
pub(super) struct LayerSet(u64);

impl LayerSet {
    pub(super) const NONE: LayerSet = LayerSet(0);

    pub(super) fn add(&mut self, i: usize) {
        self.0 |= 1u64.checked_shl(i as u32).unwrap_or(0);
    }

    pub(super) fn contains(self, i: usize) -> bool {
        self.0 & 1u64.checked_shl(i as u32).unwrap_or(0) != 0
    }
}

pub(super) fn not_sync(op: Operation) -> Error {
    Error::new(
        ErrorKind::Backend,
        op,
        "layer declared sync_ops but did not answer synchronously",
    )
}
