//! The composer's own scan, merged with pending write-back writes.

use std::hash::Hash;
use std::sync::Arc;

use super::MultiLayer;
use crate::error::{Operation, Result};
use crate::scan::Scan;

// Named by the doc comments only.
#[cfg(doc)]
use crate::error::ErrorKind;

impl<K, V> MultiLayer<K, V>
where
    K: crate::codec::StorageKey + Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Streams the live `(key, value)` pairs whose encoded key starts with `prefix`, from
    /// the authoritative layer, merged with pending write-back writes (a pending write
    /// replaces the stored value, a pending delete hides the key; pending writes are
    /// those queued when the scan starts). Memory stays bounded: the layer pages (range
    /// iterators, keyset pagination, SCAN) and the pending writes are bounded by the
    /// write-back queue.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unsupported`] when the authoritative layer cannot scan;
    /// [`ErrorKind::Closed`] after close. Layer errors arrive as stream items.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor::sled::SledLayer;
    /// use capacitor::{LayerConfig, MultiLayer};
    /// use futures::StreamExt;
    ///
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = SledLayer::builder().path(dir.path().join("db")).build()?;
    /// let cache = MultiLayer::<String, u32>::builder()
    ///     .layer(LayerConfig::new("store", store))
    ///     .build()?;
    /// cache.set("user:1".into(), 1).await?;
    /// cache.set("order:1".into(), 2).await?;
    /// let users: Vec<_> = cache.scan(b"user:")?.collect().await;
    /// assert_eq!(users.len(), 1);
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub fn scan(&self, prefix: &[u8]) -> Result<Scan<K, V>> {
        self.check_open(Operation::Scan)?;
        let inner = &*self.inner;
        let bottom = &inner.slots[inner.authoritative];
        let stream = bottom
            .layer
            .scan(prefix)
            .map_err(|e| e.with_layer(bottom.name.clone()))?;
        let pending = inner
            .queue
            .as_ref()
            .map(|q| q.matching(|k| k.encode_key().starts_with(prefix)))
            .unwrap_or_default();
        Ok(Scan::new(stream, pending, Arc::clone(&inner.clock)))
    }
}
