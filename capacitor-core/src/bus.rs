//! The invalidation bus: how several application instances, each with its own in-process
//! L1, keep those L1s coherent over a shared Redis / PostgreSQL.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;

/// A message delivered by an [`InvalidationBus`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation<K> {
    /// Another instance wrote or deleted this key: drop it from in-process layers.
    Key(K),
    /// Messages may have been missed (the subscription was re-established after a
    /// disconnect): drop everything from in-process layers.
    All,
}

/// Where an [`InvalidationBus`] delivers messages.
pub type InvalidationSink<K> = Arc<dyn Fn(Invalidation<K>) + Send + Sync>;

/// A channel between application instances (Redis pub/sub in `capacitor-redis`).
///
/// A [`MultiLayer`](crate::MultiLayer) built with
/// [`invalidation_bus`](crate::MultiLayerBuilder::invalidation_bus) publishes every key it
/// writes or deletes (after the write succeeded) and, on each message from another
/// instance, drops the key from its in-process layers (those declaring
/// [`Capabilities::sync_ops`](crate::Capabilities::sync_ops)), discarding promotions racing
/// the message.
#[async_trait]
pub trait InvalidationBus<K>: Send + Sync + 'static
where
    K: Send + Sync + 'static,
{
    /// Announces to the other instances that `key` changed.
    ///
    /// # Errors
    ///
    /// The transport's error. The composer counts it and does not fail the write (the
    /// other instances' L1 TTLs bound the staleness then).
    async fn publish(&self, key: &K) -> Result<()>;

    /// Starts delivering the other instances' messages (never this instance's own) to
    /// `sink`, and [`Invalidation::All`] whenever messages may have been missed.
    ///
    /// # Errors
    ///
    /// When the subscription cannot be set up at all.
    fn subscribe(&self, sink: InvalidationSink<K>) -> Result<()>;
}
