//! The one delegating test layer: [`Wrapped`] forwards every call to the layer it wraps,
//! through an [`Around`] that may fail the call, or hold it before or after the inner layer
//! answers. [`FaultyLayer`](super::FaultyLayer) and [`GateLayer`](super::GateLayer) are
//! `Wrapped` with the test kit's two `Around`s; a test can write its own.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_core::future::BoxFuture;

use crate::entry::Entry;
use crate::error::Result;
use crate::layer::{Capabilities, EntryStream, Layer, WriteOp};

/// The operations a [`Wrapped`] layer passes through its [`Around`] (and a
/// [`GateLayer`](super::GateLayer) can hold).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateOp {
    /// `get`.
    Get,
    /// `get_many`.
    GetMany,
    /// `exists`.
    Exists,
    /// `set`.
    Set,
    /// `set_many`.
    SetMany,
    /// `delete`.
    Delete,
    /// `delete_many`.
    DeleteMany,
    /// `apply_atomic` (a transaction's commit).
    Atomic,
}

/// What a [`Wrapped`] layer does around each call it forwards.
///
/// # Examples
///
/// ```
/// use capacitor_core::testkit::{Around, GateOp, MapLayer, Wrapped};
/// use capacitor_core::{Error, ErrorKind, Layer, Operation, Result};
/// use futures_core::future::BoxFuture;
///
/// /// Refuses every write.
/// #[derive(Debug)]
/// struct ReadOnly;
///
/// impl Around for ReadOnly {
///     fn around<'a, T: Send + 'a>(&'a self, op: GateOp, call: BoxFuture<'a, Result<T>>) -> BoxFuture<'a, Result<T>> {
///         Box::pin(async move {
///             if op == GateOp::Set {
///                 return Err(Error::new(ErrorKind::Unavailable, Operation::Set, "read only"));
///             }
///             call.await
///         })
///     }
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let layer = Wrapped::with(MapLayer::<u8, u8>::new(), ReadOnly);
/// assert!(layer.set(&1, &1, None).await.is_err());
/// assert_eq!(layer.get(&1).await?, None);
/// # Ok::<(), Error>(()) }).unwrap();
/// ```
pub trait Around: fmt::Debug + Send + Sync + 'static {
    /// Runs `call`, the inner layer's answer to `op`: may return an error instead, or wait
    /// before or after awaiting it.
    fn around<'a, T: Send + 'a>(
        &'a self,
        op: GateOp,
        call: BoxFuture<'a, Result<T>>,
    ) -> BoxFuture<'a, Result<T>>;

    /// Runs before every `close` reaches the inner layer: clean-up a test wants done with
    /// the layer still open (drop its table, delete its keys). Default: nothing.
    fn before_close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A layer that forwards every call to another through an [`Around`]. Always answers
/// asynchronously, so the composer awaits it like a remote layer.
pub struct Wrapped<K, V, A> {
    inner: Arc<dyn Layer<K, V>>,
    around: Arc<A>,
}

impl<K, V, A: fmt::Debug> fmt::Debug for Wrapped<K, V, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wrapped")
            .field("around", &self.around)
            .finish_non_exhaustive()
    }
}

impl<K, V, A> Wrapped<K, V, A>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
    A: Around,
{
    /// Wraps `inner` with `around`.
    pub fn with(inner: impl Layer<K, V>, around: A) -> Self {
        Self::with_shared(Arc::new(inner), Arc::new(around))
    }

    /// Wraps a shared layer (so the test can also read it directly) with a shared `around`.
    pub fn with_shared(inner: Arc<dyn Layer<K, V>>, around: Arc<A>) -> Self {
        Wrapped { inner, around }
    }

    /// The `around`, shared with the test.
    pub fn around(&self) -> Arc<A> {
        Arc::clone(&self.around)
    }
}

#[async_trait]
impl<K, V, A> Layer<K, V> for Wrapped<K, V, A>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
    A: Around,
{
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        caps.sync_ops = false;
        caps
    }

    fn check_write(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.inner.check_write(key, value, ttl)
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        self.around.around(GateOp::Get, self.inner.get(key)).await
    }

    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.around
            .around(GateOp::Set, self.inner.set(key, value, ttl))
            .await
    }

    async fn delete(&self, key: &K) -> Result<bool> {
        self.around.around(GateOp::Delete, self.inner.delete(key)).await
    }

    async fn exists(&self, key: &K) -> Result<bool> {
        self.around.around(GateOp::Exists, self.inner.exists(key)).await
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        self.around
            .around(GateOp::GetMany, self.inner.get_many(keys))
            .await
    }

    async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        self.around
            .around(GateOp::SetMany, self.inner.set_many(entries, ttl))
            .await
    }

    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        self.around
            .around(GateOp::DeleteMany, self.inner.delete_many(keys))
            .await
    }

    async fn apply_atomic(&self, ops: &[WriteOp<K, V>]) -> Result<()> {
        self.around
            .around(GateOp::Atomic, self.inner.apply_atomic(ops))
            .await
    }

    async fn set_tagged(&self, key: &K, value: &V, ttl: Option<Duration>, tags: &[String]) -> Result<()> {
        self.around
            .around(GateOp::Set, self.inner.set_tagged(key, value, ttl, tags))
            .await
    }

    async fn remove_by_tag(&self, tag: &str) -> Result<Vec<K>> {
        self.around
            .around(GateOp::DeleteMany, self.inner.remove_by_tag(tag))
            .await
    }

    async fn clear(&self) -> Result<()> {
        self.around.around(GateOp::DeleteMany, self.inner.clear()).await
    }

    fn scan(&self, prefix: &[u8]) -> Result<EntryStream<K, V>> {
        self.inner.scan(prefix)
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn close(&self) -> Result<()> {
        self.around.before_close().await;
        self.inner.close().await
    }
}
