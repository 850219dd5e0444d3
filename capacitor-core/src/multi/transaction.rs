//! Transactions: buffered writes applied atomically in the authoritative layer.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::time::Duration;

use super::write::{fan_out, WriteScope, Writes};
use super::MultiLayer;
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::layer::WriteOp;

/// A transaction from [`MultiLayer::begin`]: it buffers `set`s and `delete`s, reads its
/// own writes, and applies them on [`commit`](Transaction::commit) as one native
/// transaction of the authoritative layer.
///
/// Isolation: **read committed**. A read inside the transaction sees the transaction's
/// own writes, otherwise what the composer serves at that moment; no read locks, no
/// conflict detection (two transactions writing one key: the later commit wins).
/// Atomicity: all or nothing in the authoritative layer (readers of that layer never see
/// half a transaction). Caches: the written keys are invalidated in every layer above
/// after the commit, and promotions racing the commit are discarded, so once `commit`
/// returns no layer serves a pre-commit value. Dropping the transaction (or
/// [`rollback`](Transaction::rollback)) discards it.
///
/// # Examples
///
/// A transfer that either happens whole or not at all, and a transaction given up:
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use capacitor::memory::MokaLayer;
/// use capacitor::sled::SledLayer;
/// use capacitor::{LayerConfig, MultiLayer};
/// # let dir = tempfile::tempdir().unwrap();
///
/// let cache = MultiLayer::<String, i64>::builder()
///     .layer(LayerConfig::new("l1", MokaLayer::builder().build()?))
///     .layer(LayerConfig::new("db", SledLayer::builder().path(dir.path().join("db")).build()?))
///     .build()?;
/// cache.set("alice".into(), 100).await?;
///
/// let mut tx = cache.begin()?;
/// tx.set("alice".into(), 70);
/// tx.set_with_ttl("bob".into(), 30, Duration::from_secs(3600));
/// tx.delete("carol".into());
/// tx.commit().await?;
/// assert_eq!(cache.get(&"bob".into()).await?, Some(30));
///
/// let mut abandoned = cache.begin()?;
/// abandoned.set("alice".into(), 0);
/// abandoned.rollback(); // or drop it: nothing is written
/// assert_eq!(cache.get(&"alice".into()).await?, Some(70));
/// # Ok::<(), capacitor::Error>(()) }).unwrap();
/// ```
#[must_use = "a transaction does nothing until committed"]
pub struct Transaction<'a, K, V> {
    cache: &'a MultiLayer<K, V>,
    ops: Vec<WriteOp<K, V>>,
    /// Position in `ops` of each key's latest write.
    latest: HashMap<K, usize>,
}

impl<K, V> fmt::Debug for Transaction<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("writes", &self.ops.len())
            .finish_non_exhaustive()
    }
}

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Starts a transaction (see [`Transaction`] for what it guarantees).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unsupported`] when the authoritative layer has no native transactions
    /// (capacitor does not fake atomicity); [`ErrorKind::Closed`] after close.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor::memory::DashMapLayer;
    /// use capacitor::sled::SledLayer;
    /// use capacitor::{LayerConfig, MultiLayer};
    /// # let dir = tempfile::tempdir().unwrap();
    ///
    /// let cache = MultiLayer::<String, i64>::builder()
    ///     .layer(LayerConfig::new("l1", DashMapLayer::new()))
    ///     .layer(LayerConfig::new("db", SledLayer::builder().path(dir.path().join("db")).build()?))
    ///     .build()?;
    /// cache.set("alice".into(), 100).await?;
    /// let mut tx = cache.begin()?;
    /// let alice = tx.get(&"alice".into()).await?.unwrap_or(0);
    /// tx.set("alice".into(), alice - 30);
    /// tx.set("bob".into(), 30);
    /// tx.commit().await?;
    /// assert_eq!(cache.get(&"alice".into()).await?, Some(70));
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub fn begin(&self) -> Result<Transaction<'_, K, V>> {
        self.check_open(Operation::Transaction)?;
        let bottom = &self.inner.slots[self.inner.authoritative];
        if !bottom.layer.capabilities().transactions {
            return Err(Error::new(
                ErrorKind::Unsupported,
                Operation::Transaction,
                "the authoritative layer has no native transactions",
            )
            .with_layer(bottom.name.clone()));
        }
        Ok(Transaction {
            cache: self,
            ops: Vec::new(),
            latest: HashMap::new(),
        })
    }
}

impl<K, V> Transaction<'_, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn push(&mut self, op: WriteOp<K, V>) {
        self.latest.insert(op.key().clone(), self.ops.len());
        self.ops.push(op);
    }

    /// The transaction's own write of `key` if any, else what the composer serves.
    ///
    /// # Errors
    ///
    /// As [`MultiLayer::get`].
    pub async fn get(&self, key: &K) -> Result<Option<V>> {
        match self.latest.get(key).map(|&i| &self.ops[i]) {
            Some(WriteOp::Set { value, .. }) => Ok(Some(value.clone())),
            Some(WriteOp::Delete { .. }) => Ok(None),
            None => self.cache.get(key).await,
        }
    }

    /// Buffers a write of `value` under `key`.
    pub fn set(&mut self, key: K, value: V) {
        self.push(WriteOp::Set {
            key,
            value,
            ttl: None,
        });
    }

    /// Buffers a write of `value` under `key` that expires after `ttl`.
    pub fn set_with_ttl(&mut self, key: K, value: V, ttl: Duration) {
        self.push(WriteOp::Set {
            key,
            value,
            ttl: Some(ttl),
        });
    }

    /// Buffers a delete of `key`.
    pub fn delete(&mut self, key: K) {
        self.push(WriteOp::Delete { key });
    }

    /// Discards every buffered write (as dropping the transaction does).
    pub fn rollback(self) {}

    /// Applies the buffered writes atomically in the authoritative layer, then invalidates
    /// the written keys in every layer above it.
    ///
    /// Under write-back, writes queued before the commit are drained first, so that none
    /// of them can overwrite the transaction's values later.
    ///
    /// # Errors
    ///
    /// The authoritative layer's error (nothing was applied: no layer changed, unless it
    /// timed out, when the caches above are invalidated too); [`ErrorKind::InvalidInput`]
    /// for a zero TTL; a cache layer that could not be invalidated only with
    /// [`fail_on_cache_error`](crate::MultiLayerBuilder::fail_on_cache_error), as for
    /// `set` (the commit is applied; reads pass that layer by for the written keys until
    /// they are written there again).
    pub async fn commit(self) -> Result<()> {
        let cache = self.cache;
        cache.check_open(Operation::Transaction)?;
        if self.ops.is_empty() {
            return Ok(());
        }
        let inner = &*cache.inner;
        // Only the latest write of each key matters.
        let mut ops: Vec<WriteOp<K, V>> = Vec::with_capacity(self.latest.len());
        for (i, op) in self.ops.into_iter().enumerate() {
            if self.latest.get(op.key()) == Some(&i) {
                ops.push(op);
            }
        }
        for op in &ops {
            if let WriteOp::Set { ttl: Some(ttl), .. } = op {
                if ttl.is_zero() {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        Operation::Transaction,
                        "TTL must be greater than zero",
                    ));
                }
            }
        }
        if let Some(queue) = &inner.queue {
            queue.flush().await?;
        }
        let writes = Writes::Atomic { ops: &ops };
        let scope = WriteScope::enter(inner, &writes, 0..=inner.authoritative);
        if inner.filling.any() {
            inner.filling.wait_for(&writes.keys()).await;
        }
        let written = fan_out(scope, Some(inner.authoritative)).await?;
        cache.cache_result(written).map(drop)
    }
}
