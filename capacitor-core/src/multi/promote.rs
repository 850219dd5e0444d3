//! Promotion: copying a hit found below the top layer into the writable layers above it.

use std::hash::Hash;
use std::time::Duration;

use super::slot::{not_sync, LayerSet, Slot};
use super::{write, MultiLayer};
use crate::config::min_ttl;
use crate::entry::Entry;
use crate::error::{Operation, Result};
use crate::guard::Ticket;
use crate::stats::Counter;

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The remaining life to give promoted copies; `None` when the entry has none left.
    pub(super) fn promotion_ttl(&self, entry: &Entry<V>) -> Option<Option<Duration>> {
        match entry.remaining(self.inner.clock.now()) {
            Some(Duration::ZERO) => None,
            remaining => Some(remaining),
        }
    }

    /// Whether to write a promoted copy into `slot` (counted when skipped).
    pub(super) fn may_promote(&self, slot: &Slot<K, V>, key: &K, ticket: Ticket) -> bool {
        let valid = self.inner.guard.still_valid(ticket)
            && (self.inner.in_doubt.len() == 0 || !self.inner.in_doubt.pinned(key, self.inner.clock.now()));
        if !valid {
            slot.counters.incr(Counter::PromotionSkipped);
        }
        valid
    }

    /// Counts a promotion write; `true` when a write of the key started meanwhile, so
    /// that the copy must be removed again: it may be older than what the writer put
    /// there first (a later miss is harmless, a stale hit is not).
    pub(super) fn promotion_voided(&self, slot: &Slot<K, V>, ticket: Ticket, result: Result<()>) -> bool {
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
    pub(super) async fn promote(
        &self,
        key: &K,
        entry: &Entry<V>,
        found: usize,
        ticket: Ticket,
        failed: LayerSet,
    ) {
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
            if self.promotion_voided(slot, ticket, result) {
                if let Err(e) = slot.delete(key).await {
                    slot.invalidation_failed(&e, &[key], self.inner.clock.now());
                    self.inner.recover();
                }
            } else if written {
                slot.cleaned([key], self.inner.clock.now());
            }
        }
    }

    /// [`promote`](Self::promote) for layers that all have synchronous operations.
    #[inline(never)]
    pub(super) fn promote_sync(&self, key: &K, entry: &Entry<V>, found: usize, ticket: Ticket) {
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
            if self.promotion_voided(slot, ticket, result)
                && !matches!(slot.layer.delete_sync(key), Some(Ok(_)))
            {
                slot.counters.incr(Counter::Error);
            }
        }
    }
}
