//! `flush` and `close`.

use std::hash::Hash;
use std::sync::atomic::Ordering;

use super::MultiLayer;
use crate::error::{Error, ErrorKind, Operation, Result};

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Flushes every layer (persistent layers make acknowledged writes durable).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] after close; the first layer error (all layers are flushed).
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
        first.map_or(Ok(()), Err)
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
        for slot in self.inner.slots.iter() {
            if let Err(e) = slot.layer.close().await {
                first.get_or_insert(slot.error(e));
            }
        }
        first.map_or(Ok(()), Err)
    }
}
