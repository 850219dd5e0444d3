//! `flush`, `clear` and `close`.

use std::hash::Hash;
use std::sync::atomic::Ordering;

use super::invalidation::BUS_FLUSH_LIMIT;
use super::MultiLayer;
use crate::error::{Error, ErrorKind, Operation, Result};

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Flushes every layer (persistent layers make acknowledged writes durable), and
    /// waits, up to 5 s, until the invalidation bus sent every announcement made so far.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] after close; the first layer error (all layers are flushed);
    /// [`ErrorKind::Unavailable`] when announcements still wait for the bus.
    pub async fn flush(&self) -> Result<()> {
        self.check_open(Operation::Flush)?;
        if let Some(queue) = &self.inner.queue {
            queue.flush().await?;
        }
        let mut first = None;
        for slot in self.inner.slots.iter() {
            if let Err(e) = slot.flush().await {
                first.get_or_insert(slot.error(e));
            }
        }
        if let Some(bus) = &self.inner.bus {
            if let Err(e) = bus.outbox.flush(BUS_FLUSH_LIMIT, Operation::Flush).await {
                first.get_or_insert(e.with_layer(self.inner.name.clone()));
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Removes every entry from every writable layer, the authoritative one first, and
    /// tells the other instances, through the invalidation bus, to clear their
    /// in-process layers. Under write-back the pending writes are drained first (a
    /// write acknowledged before the clear does not reappear after it). Writes racing
    /// the clear may or may not survive it; reads racing it copy nothing older upward.
    ///
    /// A shared layer clears what it holds under its own prefix or table; a layer that
    /// can only scan removes its keys one batch at a time ([`Layer::clear`](crate::Layer::clear)). A cache
    /// layer that fails is cleared by the recovery task once it answers (reads in this
    /// instance pass it by meanwhile).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] after close; the authoritative layer's error (the layers
    /// above are cleared regardless: they hold nothing the store does not); a cache
    /// layer's error only with
    /// [`fail_on_cache_error`](super::MultiLayerBuilder::fail_on_cache_error).
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor::memory::DashMapLayer;
    /// use capacitor::{LayerConfig, MultiLayer};
    ///
    /// let cache = MultiLayer::<String, u32>::builder()
    ///     .layer(LayerConfig::new("l1", DashMapLayer::new()))
    ///     .layer(LayerConfig::new("store", DashMapLayer::new()))
    ///     .build()?;
    /// cache.set("a".into(), 1).await?;
    /// cache.clear().await?;
    /// assert_eq!(cache.get(&"a".into()).await?, None);
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub async fn clear(&self) -> Result<()> {
        self.check_open(Operation::Clear)?;
        let inner = &*self.inner;
        if let Some(queue) = &inner.queue {
            queue.flush().await?;
        }
        // As a write of every key: promotions in flight copy nothing read before it.
        let writing = inner.guard.begin_write_all();
        let mut store_error = None;
        let mut cache_error = None;
        for (i, slot) in inner.slots.iter().enumerate().rev() {
            if slot.read_only || i > inner.authoritative {
                continue;
            }
            if let Err(e) = slot.clear().await {
                let e = slot.error(e);
                if i == inner.authoritative {
                    store_error = Some(e);
                    continue;
                }
                if let Some(replay) = &slot.replay {
                    replay.record_clear();
                    inner.recover();
                }
                if let Some(suspects) = &slot.suspects {
                    suspects.skip_all(inner.clock.now());
                }
                cache_error.get_or_insert(e);
            }
        }
        if let Some(fail_safe) = &inner.fail_safe {
            fail_safe.clear();
        }
        if let Some(negative) = &inner.negative {
            negative.clear();
        }
        // Copies upward that passed their check before the clear undo themselves at their
        // second; wait for them without holding the thread.
        while writing.iter().any(crate::guard::WriteGuard::copies_running) {
            tokio::task::yield_now().await;
        }
        drop(writing);
        if let Some(bus) = &inner.bus {
            let ticket = bus.outbox.announce_clear();
            if let Some(limit) = bus.wait {
                let _ = bus.outbox.wait_sent(ticket, limit).await;
            }
        }
        if let Some(e) = store_error {
            return Err(e);
        }
        match cache_error {
            Some(e) if inner.fail_on_cache_error => Err(e),
            _ => Ok(()),
        }
    }

    /// Closes every layer, top first. Idempotent: a second call returns `Ok(())`.
    /// Afterwards every operation fails with [`ErrorKind::Closed`]. Layers shared with
    /// another composer are closed for it too.
    ///
    /// # Errors
    ///
    /// The first layer error (every layer is closed regardless).
    pub async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut first = None;
        if let Some(queue) = &self.inner.queue {
            // New writes are refused from here (closed flag); drain what is queued.
            let flushed = queue.flush().await;
            queue.close();
            let unwritten = queue.unwritten_keys().len();
            if unwritten > 0 {
                let cause = flushed.err().map(|e| e.to_string()).unwrap_or_default();
                first = Some(
                    Error::new(
                        ErrorKind::Unavailable,
                        Operation::Close,
                        format!(
                            "{unwritten} pending writes could not be written ({cause}); see unwritten_keys()"
                        ),
                    )
                    .with_layer(self.inner.name.clone()),
                );
            }
        }
        // Keys whose invalidation of a shared cache layer failed get one last attempt
        // (other instances would read their old copies there), bounded like the outbox.
        if self
            .inner
            .slots
            .iter()
            .any(|s| s.replay.as_ref().is_some_and(|r| r.len() > 0))
        {
            let _ = tokio::time::timeout(BUS_FLUSH_LIMIT, self.inner.replay_once()).await;
        }
        if let Some(bus) = &self.inner.bus {
            // Announcements made before the close are sent, waiting a bounded while.
            if let Err(e) = bus.outbox.flush(BUS_FLUSH_LIMIT, Operation::Close).await {
                first.get_or_insert(e.with_layer(self.inner.name.clone()));
            }
            bus.outbox.close();
        }
        for slot in self.inner.slots.iter() {
            if let Err(e) = slot.layer.close().await {
                first.get_or_insert(slot.error(e));
            }
        }
        first.map_or(Ok(()), Err)
    }
}
