//! The read cascade: `get`, `get_entry`, `exists`, `get_many`, from the synchronous
//! prefix (in-process layers answered without a future) to the awaited layers below.

use std::hash::Hash;
use std::sync::atomic::Ordering;

use super::future::{Get, GetEntry, GetState, Step};
use super::slot::LayerSet;
use super::MultiLayer;
use crate::entry::Entry;
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::guard::Ticket;
use crate::observe::traced;
use crate::stats::Counter;
use crate::writeback::Pending;

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
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
    pub(super) fn read_traced<'a>(&'a self, key: &'a K) -> Step<'a, V> {
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
    pub(super) fn read_sync_prefix<'a>(&'a self, key: &'a K) -> Step<'a, V> {
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
                    if inner.fail_safe.is_some() {
                        if let Some(ticket) = ticket {
                            inner.remember_read(key, &entry, ticket);
                        }
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
                            self.promote(key, &entry, i, ticket, LayerSet::NONE).await;
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
    #[inline(always)]
    pub(super) fn buffered(&self, key: &K) -> Option<Option<Entry<V>>> {
        match &self.inner.queue {
            None => None,
            Some(_) => self.buffered_in_queue(key),
        }
    }

    #[inline(never)]
    fn buffered_in_queue(&self, key: &K) -> Option<Option<Entry<V>>> {
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
    #[inline(never)]
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
    pub(super) async fn read_async(&self, key: &K, start: usize, ticket: Ticket) -> Result<Option<Entry<V>>> {
        let found = self
            .read_from(key, start, ticket, LayerSet::NONE, LayerSet::NONE)
            .await?;
        Ok(found.map(|(entry, _)| entry))
    }

    /// Reads layers `start..` but those in `skip_read`, promoting a hit into the layers
    /// above it but those in `skip_write`; the entry and the index of the layer that had
    /// it.
    pub(super) async fn read_from(
        &self,
        key: &K,
        start: usize,
        ticket: Ticket,
        skip_read: LayerSet,
        skip_write: LayerSet,
    ) -> Result<Option<(Entry<V>, usize)>> {
        let inner = &*self.inner;
        // Layers whose read failed here are not promoted into: a layer that just timed
        // out would make the read wait for its write timeout too.
        let mut failed = skip_write;
        for i in start..inner.slots.len() {
            if i == 1 {
                if let Some(found) = self.buffered(key) {
                    return Ok(found.map(|entry| (entry, 1)));
                }
            }
            if skip_read.contains(i) {
                continue;
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
                    return Ok(Some((entry, i)));
                }
                Ok(None) => slot.counters.incr(Counter::Miss),
                Err(e) => {
                    // A value that did not decode is a miss (the layer works): promote.
                    if e.kind() != ErrorKind::Decode {
                        failed.add(i);
                    }
                    if let Err(e) = self.read_failed(i, e) {
                        return Ok(inner.stale_or(key, e)?.map(|entry| (entry, i)));
                    }
                }
            }
        }
        crate::observe::read_outcome(None, false, "miss");
        Ok(None)
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

    pub(super) async fn get_many_entries(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        self.get_many_skipping(keys, LayerSet::NONE, LayerSet::NONE).await
    }

    /// [`get_many_entries`](Self::get_many_entries) passing the layers in `skip_read` by
    /// and promoting into none of `skip_write`.
    pub(super) async fn get_many_skipping(
        &self,
        keys: &[K],
        skip_read: LayerSet,
        skip_write: LayerSet,
    ) -> Result<Vec<Option<Entry<V>>>> {
        self.check_open(Operation::GetMany)?;
        let inner = &*self.inner;
        let tickets: Vec<Ticket> = keys
            .iter()
            .map(|k| inner.guard.ticket(inner.guard.stripe_of(k)))
            .collect();
        let mut out: Vec<Option<Entry<V>>> = keys.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        let mut failed = skip_write;
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
            if skip_read.contains(i) {
                continue;
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
}
