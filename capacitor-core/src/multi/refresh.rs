//! Refresh-ahead: a read answered by the top layer with an entry close to its expiry
//! re-reads the layers below on a background task, whose promotion renews the top copy
//! before it expires. Hot keys then never miss the top layer on expiry, and the layers
//! below see one read per key and window instead of a burst of misses.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::MultiLayer;
use crate::entry::{Entry, Timestamp};
use crate::error::Operation;

/// At most this many keys are tracked (being refreshed, or refreshed without renewing the
/// copy that asked); past it, due entries are left to expire (and are read through on
/// their next miss, as without refresh-ahead).
const MAX_TRACKED: usize = 10_000;

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
    /// Due entries not refreshed because 10,000 keys were being tracked or no tokio
    /// runtime was there to run one.
    pub dropped: u64,
}

/// A key's refresh: the expiry of the top-layer copy that asked for it, and whether it
/// still runs. Kept after it ends, so that a copy the refresh could not renew (the key
/// is gone below, or expires there as soon) does not ask again on every hit.
struct Record {
    copy_expires: Timestamp,
    running: bool,
}

/// The refresh window and the keys being (or recently) refreshed.
pub(super) struct Refresher<K> {
    window: Duration,
    tracked: Mutex<HashMap<K, Record>>,
    started: AtomicU64,
    renewed: AtomicU64,
    dropped: AtomicU64,
}

impl<K: Hash + Eq> Refresher<K> {
    pub(super) fn new(window: Duration) -> Self {
        Refresher {
            window,
            tracked: Mutex::new(HashMap::new()),
            started: AtomicU64::new(0),
            renewed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// The map's entries are each written whole: a panic cannot leave it torn.
    fn tracked(&self) -> MutexGuard<'_, HashMap<K, Record>> {
        self.tracked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn stats(&self) -> RefreshStats {
        RefreshStats {
            started: self.started.load(Ordering::Relaxed),
            renewed: self.renewed.load(Ordering::Relaxed),
            in_flight: self.tracked().values().filter(|r| r.running).count() as u64,
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
            if let Some(record) = refresh.tracked().get_mut(&self.key) {
                record.running = false;
            }
        }
    }
}

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Starts a background refresh of `key` when `entry`, just served by the top layer,
    /// expires within the refresh window, no refresh of the key is running, and no
    /// earlier refresh was asked for by this same copy.
    #[inline(never)]
    pub(super) fn refresh_if_due(&self, key: &K, entry: &Entry<V>) {
        let Some(refresh) = &self.inner.refresh else {
            return;
        };
        let Some(copy_expires) = entry.expires_at else {
            return;
        };
        let now = self.inner.clock.now();
        match entry.remaining(now) {
            Some(left) if !left.is_zero() && left <= refresh.window => {}
            _ => return,
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            refresh.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        {
            let mut tracked = refresh.tracked();
            if let Some(record) = tracked.get(key) {
                if record.running || record.copy_expires == copy_expires {
                    return;
                }
            } else if tracked.len() >= MAX_TRACKED {
                // Forget ended refreshes of copies that have expired since.
                tracked.retain(|_, r| r.running || r.copy_expires > now);
                if tracked.len() >= MAX_TRACKED {
                    refresh.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            tracked.insert(
                key.clone(),
                Record {
                    copy_expires,
                    running: true,
                },
            );
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
