//! The invalidation bus: applying other instances' messages to the in-process layers,
//! publishing this instance's writes, and the bus counters.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Inner;
use crate::bus::{BusMessage, Change, Invalidation};
use crate::stats::Counter;

#[derive(Default)]
pub(super) struct BusCounters {
    pub(super) published: AtomicU64,
    pub(super) publish_errors: AtomicU64,
    pub(super) received: AtomicU64,
    pub(super) clears: AtomicU64,
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Applies a message of the invalidation bus to the in-process layers.
    pub(super) fn invalidate_local(&self, message: Invalidation<K>) {
        self.bus_counters.received.fetch_add(1, Ordering::Relaxed);
        let local = || self.slots.iter().filter(|s| s.sync_ops && !s.read_only);
        match message {
            Invalidation::Message(BusMessage {
                change: Change::Keys(keys),
                ..
            }) => {
                for key in keys {
                    // As a local write does: promotions racing the message are discarded.
                    let writing = self.guard.begin_write(self.guard.stripe_of(&key));
                    if let Some(fail_safe) = &self.fail_safe {
                        fail_safe.forget(&key);
                    }
                    for slot in local() {
                        if !matches!(slot.layer.delete_sync(&key), Some(Ok(_))) {
                            slot.counters.incr(Counter::Error);
                        }
                    }
                    // A copy that passed its check before the eviction and landed after it
                    // undoes itself at its second check; wait for that here (copies into
                    // in-process layers take nanoseconds), so that once the message is
                    // applied no copy read before it is served.
                    super::write::wait_for_copies(std::slice::from_ref(&writing));
                }
            }
            _ => {
                self.bus_counters.clears.fetch_add(1, Ordering::Relaxed);
                let writing = self.guard.begin_write_all();
                if let Some(fail_safe) = &self.fail_safe {
                    fail_safe.clear();
                }
                for slot in local() {
                    if !matches!(slot.layer.clear_sync(), Some(Ok(()))) {
                        slot.counters.incr(Counter::Error);
                    }
                }
                super::write::wait_for_copies(&writing);
            }
        }
    }

    /// Tells the other instances that `key` changed (errors counted, never returned).
    pub(super) async fn publish(&self, key: &K) {
        if let Some(bus) = &self.bus {
            let message = BusMessage::new(0, 0, Change::Keys(vec![key.clone()]));
            let counter = match bus.publish(&message).await {
                Ok(()) => &self.bus_counters.published,
                Err(_) => &self.bus_counters.publish_errors,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}
