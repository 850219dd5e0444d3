//! Fail-safe: last known values served when every layer that could answer fails.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rustc_hash::FxBuildHasher;

use crate::entry::{Entry, Timestamp};
use crate::error::Error;

/// Options of the composer's fail-safe ([`MultiLayerBuilder::fail_safe`]).
///
/// With fail-safe on, the composer keeps in memory the last value it wrote or read from a
/// layer below L1 for each key, and serves it when a read would otherwise fail because
/// the layers that could answer are failing, timing out or skipped by their breakers. Such
/// a read is a *stale hit*, counted in [`Stats::fail_safe`](crate::Stats::fail_safe). A copy
/// is usable for [`grace`](FailSafe::grace) past its expiry (for entries without one:
/// past the last time the composer read or wrote it), never longer. Deletes, transactions
/// and invalidation-bus messages remove copies; a successful read or write refreshes them.
///
/// L1 hits do not refresh copies (they stay as cheap as without fail-safe), so choose a
/// grace longer than the L1 TTL.
///
/// A loader that fails while a copy is usable ([`get_or_load`]) is answered with the copy,
/// and for [`throttle`](FailSafe::throttle) the loads of that key are answered with it
/// without calling the loader again, so that a failing origin is not hammered.
///
/// Defaults: at most 100,000 copies (when full, a write replaces an arbitrary copy of the
/// same shard); a throttle of 30 s.
///
/// [`get_or_load`]: crate::MultiLayer::get_or_load
///
/// [`MultiLayerBuilder::fail_safe`]: crate::MultiLayerBuilder::fail_safe
///
/// # Examples
///
/// ```
/// use capacitor::FailSafe;
/// use std::time::Duration;
///
/// let fail_safe = FailSafe::new(Duration::from_secs(600))
///     .max_entries(10_000)
///     .throttle(Duration::from_secs(5));
/// assert_eq!(fail_safe.grace, Duration::from_secs(600));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct FailSafe {
    /// How long past its expiry a copy may be served.
    pub grace: Duration,
    /// Most copies kept.
    pub max_entries: usize,
    /// After a loader failed and its copy answered, how long loads of the key are
    /// answered with the copy without calling the loader (zero: call it every time).
    pub throttle: Duration,
}

impl FailSafe {
    /// Fail-safe with the given grace period and the default bound.
    pub fn new(grace: Duration) -> Self {
        FailSafe {
            grace,
            max_entries: 100_000,
            throttle: Duration::from_secs(30),
        }
    }

    /// Sets [`FailSafe::throttle`].
    pub fn throttle(mut self, throttle: Duration) -> Self {
        self.throttle = throttle;
        self
    }

    /// Sets [`FailSafe::max_entries`].
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        if self.grace.is_zero() {
            return Err(Error::config("fail_safe.grace", "must be greater than zero"));
        }
        if self.max_entries == 0 {
            return Err(Error::config(
                "fail_safe.max_entries",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// Counters of the fail-safe store.
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailSafeStats {
    /// Copies held now.
    pub entries: u64,
    /// Reads answered with a copy because the layers failed.
    pub stale_hits: u64,
    /// Reads that failed and had no usable copy (the error went to the caller).
    pub stale_misses: u64,
}

const SHARDS: usize = 16;

type Shard<K, V> = Mutex<HashMap<K, Copy<V>, FxBuildHasher>>;

struct Copy<V> {
    value: V,
    expires_at: Option<Timestamp>,
    /// Served until then.
    usable_until: Timestamp,
    /// Loads are answered with it until then (a loader failed).
    throttled_until: Option<Timestamp>,
}

pub(crate) struct Store<K, V> {
    config: FailSafe,
    per_shard: usize,
    shards: Box<[Shard<K, V>]>,
    pub(crate) stale_hits: AtomicU64,
    pub(crate) stale_misses: AtomicU64,
}

impl<K: Hash + Eq + Clone, V: Clone> Store<K, V> {
    pub(crate) fn new(config: FailSafe) -> Self {
        let per_shard = config.max_entries.div_ceil(SHARDS).max(1);
        Store {
            config,
            per_shard,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            stale_hits: AtomicU64::new(0),
            stale_misses: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &K) -> &Shard<K, V> {
        let i = FxBuildHasher.hash_one(key) as usize % SHARDS;
        &self.shards[i]
    }

    /// Keeps `value` as the last known value of `key`, seen fresh at `now`.
    pub(crate) fn record(&self, key: &K, value: &V, expires_at: Option<Timestamp>, now: Timestamp) {
        let usable_until = expires_at.unwrap_or(now).saturating_add(self.config.grace);
        let Ok(mut shard) = self.shard(key).lock() else {
            return;
        };
        if shard.len() >= self.per_shard && !shard.contains_key(key) {
            // Full: drop expired copies first, else an arbitrary one.
            shard.retain(|_, c| c.usable_until > now);
            if shard.len() >= self.per_shard {
                if let Some(victim) = shard.keys().next().cloned() {
                    shard.remove(&victim);
                }
            }
        }
        shard.insert(
            key.clone(),
            Copy {
                value: value.clone(),
                expires_at,
                usable_until,
                throttled_until: None,
            },
        );
    }

    pub(crate) fn forget(&self, key: &K) {
        if let Ok(mut shard) = self.shard(key).lock() {
            shard.remove(key);
        }
    }

    pub(crate) fn clear(&self) {
        for shard in self.shards.iter() {
            if let Ok(mut shard) = shard.lock() {
                shard.clear();
            }
        }
    }

    /// A usable copy of `key`, counted as a stale hit (or a stale miss when none).
    pub(crate) fn stale(&self, key: &K, now: Timestamp) -> Option<Entry<V>> {
        let found = self.peek(key, now);
        self.counted(found.is_some(), 1);
        found
    }

    /// A usable copy of `key`, not counted.
    pub(crate) fn peek(&self, key: &K, now: Timestamp) -> Option<Entry<V>> {
        self.shard(key).lock().ok().and_then(|shard| {
            shard
                .get(key)
                .filter(|c| c.usable_until > now)
                .map(|c| Entry::new(c.value.clone(), c.expires_at))
        })
    }

    /// A loader of `key` failed at `now`: its copy answers loads for the throttle.
    pub(crate) fn throttle(&self, key: &K, now: Timestamp) {
        if self.config.throttle.is_zero() {
            return;
        }
        if let Ok(mut shard) = self.shard(key).lock() {
            if let Some(copy) = shard.get_mut(key) {
                copy.throttled_until = Some(now.saturating_add(self.config.throttle));
            }
        }
    }

    /// The usable copy of `key` while its loader is throttled, not counted.
    pub(crate) fn throttled(&self, key: &K, now: Timestamp) -> Option<Entry<V>> {
        self.shard(key).lock().ok().and_then(|shard| {
            shard
                .get(key)
                .filter(|c| c.usable_until > now && c.throttled_until.is_some_and(|t| t > now))
                .map(|c| Entry::new(c.value.clone(), c.expires_at))
        })
    }

    /// Counts `n` reads answered (`served`) or not by copies.
    pub(crate) fn counted(&self, served: bool, n: usize) {
        let counter = if served {
            &self.stale_hits
        } else {
            &self.stale_misses
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> FailSafeStats {
        FailSafeStats {
            entries: self
                .shards
                .iter()
                .map(|s| s.lock().map_or(0, |s| s.len() as u64))
                .sum(),
            stale_hits: self.stale_hits.load(Ordering::Relaxed),
            stale_misses: self.stale_misses.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_served_within_grace_and_bounded() {
        let store = Store::<u32, u32>::new(FailSafe::new(Duration::from_secs(10)).max_entries(16));
        let t = |ms| Timestamp::from_millis(ms);
        store.record(&1, &10, Some(t(5_000)), t(1_000));
        store.record(&2, &20, None, t(1_000));
        assert_eq!(store.stale(&1, t(14_999)).map(|e| e.value), Some(10));
        assert_eq!(
            store.stale(&1, t(15_000)).map(|e| e.value),
            None,
            "grace past expiry"
        );
        assert_eq!(store.stale(&2, t(10_999)).map(|e| e.value), Some(20));
        assert_eq!(
            store.stale(&2, t(11_000)).map(|e| e.value),
            None,
            "grace past last seen"
        );
        store.forget(&2);
        assert_eq!(store.stale(&2, t(1_000)).map(|e| e.value), None);
        for k in 0..1_000 {
            store.record(&k, &k, None, t(2_000));
        }
        assert!(store.stats().entries <= 16, "{:?}", store.stats());
        let s = store.stats();
        assert_eq!((s.stale_hits, s.stale_misses), (2, 3));
    }
}
