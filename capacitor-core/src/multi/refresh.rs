//! Refresh-ahead: a read answered by the top layer with an entry close to its expiry
//! re-reads the layers below on a background task, whose promotion renews the top copy
//! before it expires. Hot keys then never miss the top layer on expiry, and the layers
//! below see one read per key and window instead of a burst of misses.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::MultiLayer;
use crate::entry::Entry;
use crate::error::Operation;

/// At most this many keys are refreshed at once; past it, due entries are left to expire
/// (and are read through on their next miss, as without refresh-ahead).
const MAX_IN_FLIGHT: usize = 10_000;

/// Counters of refresh-ahead (see
/// [`MultiLayerBuilder::refresh_ahead`](crate::MultiLayerBuilder::refresh_ahead)).
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshStats {
    /// Background refreshes started.
    pub started: u64,
    /// Refreshes that found the key below the top layer (and promoted it, unless a write
    /// of the key raced the read: see `LayerStats::promotions_skipped`).
    pub renewed: u64,
    /// Refreshes running now.
    pub in_flight: u64,
    /// Due entries not refreshed because 10,000 refreshes were running or no
    /// tokio runtime was there to run one.
    pub dropped: u64,
}

/// The refresh window and the keys being refreshed.
pub(super) struct Refresher<K> {
    window: Duration,
    running: Mutex<HashSet<K>>,
    started: AtomicU64,
    renewed: AtomicU64,
    dropped: AtomicU64,
}

impl<K: Hash + Eq> Refresher<K> {
    pub(super) fn new(window: Duration) -> Self {
        Refresher {
            window,
            running: Mutex::new(HashSet::new()),
            started: AtomicU64::new(0),
            renewed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// The set is only inserted into and removed from: a panic cannot leave it torn.
    fn running(&self) -> MutexGuard<'_, HashSet<K>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn stats(&self) -> RefreshStats {
        RefreshStats {
            started: self.started.load(Ordering::Relaxed),
            renewed: self.renewed.load(Ordering::Relaxed),
            in_flight: self.running().len() as u64,
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// Releases a claimed key when its refresh ends, also by panic or cancellation.
struct Claim<K: Hash + Eq + Clone + Send + Sync + 'static, V: Clone + Send + Sync + 'static> {
    cache: MultiLayer<K, V>,
    key: K,
}

impl<K, V> Drop for Claim<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if let Some(refresh) = &self.cache.inner.refresh {
            refresh.running().remove(&self.key);
        }
    }
}

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Starts a background refresh of `key` when `entry`, just served by the top layer,
    /// expires within the refresh window and no refresh of the key is running.
    #[inline(never)]
    pub(super) fn refresh_if_due(&self, key: &K, entry: &Entry<V>) {
        let Some(refresh) = &self.inner.refresh else {
            return;
        };
        match entry.remaining(self.inner.clock.now()) {
            Some(left) if !left.is_zero() && left <= refresh.window => {}
            _ => return,
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            refresh.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        {
            let mut running = refresh.running();
            if running.contains(key) {
                return;
            }
            if running.len() >= MAX_IN_FLIGHT {
                refresh.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            running.insert(key.clone());
        }
        refresh.started.fetch_add(1, Ordering::Relaxed);
        let claim = Claim {
            cache: self.clone(),
            key: key.clone(),
        };
        runtime.spawn(async move {
            let cache = &claim.cache;
            if cache.check_open(Operation::Get).is_err() {
                return;
            }
            let inner = &*cache.inner;
            // As any read below the top layer: a write of the key that starts meanwhile
            // voids the promotion.
            let ticket = inner.guard.ticket(inner.guard.stripe_of(&claim.key));
            if let Ok(Some(_)) = cache.read_async(&claim.key, 1, ticket).await {
                if let Some(refresh) = &inner.refresh {
                    refresh.renewed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}
