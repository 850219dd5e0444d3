//! A composer is itself a [`Layer`], so it can be a layer of another.

use std::hash::Hash;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;

use super::MultiLayer;
use crate::config::SetOptions;
use crate::entry::Entry;
use crate::error::{Error, Operation, Result};
use crate::layer::{Capabilities, Layer};
use crate::observe::traced;
use crate::stats::Counter;

#[async_trait]
impl<K, V> Layer<K, V> for MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn capabilities(&self) -> Capabilities {
        let bottom = self.inner.slots[self.inner.authoritative].layer.capabilities();
        let mut caps = Capabilities::new();
        caps.persistent = bottom.persistent;
        // Through the trait, keys cannot be matched against pending writes (that needs
        // `StorageKey`; see the inherent `MultiLayer::scan`): scan only without write-back.
        caps.scan = bottom.scan && self.inner.queue.is_none();
        caps.sync_ops = self.inner.slots[0].sync_ops;
        caps.tags = bottom.tags && self.inner.queue.is_none();
        caps
    }

    /// Answers only an L1 hit synchronously; anything else needs the async path.
    fn get_sync(&self, key: &K) -> Option<Result<Option<Entry<V>>>> {
        let first = &self.inner.slots[0];
        if self.inner.closed.load(Ordering::Acquire) || !first.sync_ops {
            return None;
        }
        match first.layer.get_sync(key) {
            Some(Ok(Some(entry))) => {
                first.counters.incr(Counter::Hit);
                Some(Ok(Some(entry)))
            }
            _ => None,
        }
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        self.get_entry(key).await
    }

    fn scan(&self, prefix: &[u8]) -> Result<crate::layer::EntryStream<K, V>> {
        self.check_open(Operation::Scan)?;
        if self.inner.queue.is_some() {
            return Err(Error::unsupported(
                Operation::Scan,
                "a write-back composer scans through MultiLayer::scan, which merges pending writes",
            ));
        }
        let bottom = &self.inner.slots[self.inner.authoritative];
        bottom
            .layer
            .scan(prefix)
            .map_err(|e| e.with_layer(bottom.name.clone()))
    }

    fn check_write(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.check_write_everywhere(key, value, ttl)
    }

    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.write(key, value, ttl).await
    }

    async fn delete(&self, key: &K) -> Result<bool> {
        MultiLayer::delete(self, key).await
    }

    async fn exists(&self, key: &K) -> Result<bool> {
        MultiLayer::exists(self, key).await
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        traced!("capacitor.get_many", self.inner.name, self.get_many_entries(keys))
    }

    async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        let options = match ttl {
            Some(ttl) => SetOptions::new().ttl(ttl),
            None => SetOptions::new(),
        };
        MultiLayer::set_many(self, entries, options).await
    }

    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        MultiLayer::delete_many(self, keys).await
    }

    async fn clear(&self) -> Result<()> {
        MultiLayer::clear(self).await
    }

    async fn set_tagged(&self, key: &K, value: &V, ttl: Option<Duration>, tags: &[String]) -> Result<()> {
        let mut options = SetOptions::new().tags(tags.iter().cloned());
        options.ttl = ttl;
        MultiLayer::set_with(self, key.clone(), value.clone(), options).await
    }

    async fn remove_by_tag(&self, tag: &str) -> Result<Vec<K>> {
        MultiLayer::remove_by_tag(self, tag).await
    }

    async fn flush(&self) -> Result<()> {
        MultiLayer::flush(self).await
    }

    async fn close(&self) -> Result<()> {
        MultiLayer::close(self).await
    }
}
