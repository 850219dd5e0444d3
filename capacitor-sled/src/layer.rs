//! [`SledLayer`] and its [`Layer`] implementation.

use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use capacitor_core::{
    async_trait, envelope, expiry_for, BincodeCodec, Capabilities, Codec, Entry, EntryStream, Error,
    ErrorKind, Layer, Operation, Result, StorageKey, Timestamp, WriteOp,
};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::IVec;

use crate::core::{decode_value, flush_tree, FlushPolicy, Shared, Stored};
use crate::error::sled_error;
use crate::scan::ScanStream;

/// Whether stored bytes hold a live entry: bytes that are not an envelope count as present
/// (something is there and it is not known to have expired).
fn is_live(bytes: &[u8], now: Timestamp) -> bool {
    match envelope::unwrap(bytes) {
        Ok((Some(at), _)) => at > now,
        Ok((None, _)) | Err(_) => true,
    }
}

/// Removes `key` if it still holds `bytes`: an entry found expired or undecodable is
/// removed without clobbering a write that replaced it meanwhile. Best effort: the read
/// that found it reports what it found (a miss, a decode error), not a failed cleanup;
/// the next read or the sweeper tries again.
fn remove_if_unchanged(tree: &sled::Tree, key: &[u8], bytes: &IVec) {
    // The inner result is a lost race (the key changed): nothing to remove then.
    let _ = tree.compare_and_swap(key, Some(bytes), None::<&[u8]>);
}

/// A persistent, transactional layer on [sled](https://docs.rs/sled), an embedded
/// key-value store: the database lives in a local directory and survives restarts.
///
/// Values are stored as [`envelope`]`(expiry, codec(value))`, keys as
/// [`StorageKey::encode_key`] (a `String` key is its UTF-8 bytes). Expired entries are
/// removed when read, and by the optional sweeper. Bytes that are not capacitor's (another
/// writer, a changed value type) are removed when read and reported as
/// [`ErrorKind::Decode`], which a [`MultiLayer`](capacitor_core::MultiLayer) counts as a
/// miss. Durability follows the [`FlushPolicy`].
///
/// Capabilities: scan (lazy, over sled's ordered iterator), transactions (sled
/// transactions), persistence (unless built [`temporary`](crate::SledLayerBuilder::temporary)).
/// Reads go through [`get`](Layer::get): [`get_sync`](Layer::get_sync) answers `None`,
/// because a sled read may go to disk and the composer's synchronous path is meant for
/// in-memory layers.
///
/// Operations call sled directly on the calling task: sled's reads and writes are
/// synchronous, usually in-memory and short, and may block on disk I/O for a cold page.
/// Flushes (and the sweeper's passes) run off the runtime's worker threads.
///
/// Cheap to clone; clones share the database, and closing one closes all.
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor::Layer;
/// use capacitor::sled::SledLayer;
/// use std::time::Duration;
///
/// let dir = tempfile::tempdir()?;
/// let layer = SledLayer::builder().path(dir.path().join("cache")).build::<String, String>()?;
/// layer.set(&"user:42".to_string(), &"Ada".to_string(), Some(Duration::from_secs(60))).await?;
/// let entry = layer.get(&"user:42".to_string()).await?.expect("present");
/// assert_eq!(entry.value, "Ada");
/// assert!(entry.expires_at.is_some());
/// layer.close().await?; // flushes, releases the directory
///
/// // The data survives: open the directory again.
/// let layer = SledLayer::builder().path(dir.path().join("cache")).build::<String, String>()?;
/// assert!(layer.exists(&"user:42".to_string()).await?);
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
pub struct SledLayer<K, V, C = BincodeCodec> {
    pub(crate) shared: Arc<Shared<C>>,
    pub(crate) _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V, C> Clone for SledLayer<K, V, C> {
    fn clone(&self) -> Self {
        SledLayer {
            shared: Arc::clone(&self.shared),
            _types: PhantomData,
        }
    }
}

impl<K, V, C: fmt::Debug> fmt::Debug for SledLayer<K, V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledLayer")
            .field("closed", &self.shared.is_closed())
            .field("flush_policy", &self.shared.flush_policy)
            .field("codec", &self.shared.codec)
            .field("max_value_bytes", &self.shared.max_value_bytes)
            .finish_non_exhaustive()
    }
}

impl<K, V, C> SledLayer<K, V, C>
where
    K: StorageKey + Clone + Send + Sync + 'static,
    V: Send + Sync + Clone + 'static,
    C: Codec<V>,
{
    /// Encodes `value` into its stored bytes, checking the size limit first.
    fn encode(&self, value: &V, expires_at: Option<Timestamp>, op: Operation) -> Result<IVec> {
        let sealed = envelope::seal(
            &self.shared.codec,
            value,
            expires_at,
            self.shared.max_value_bytes,
            op,
        )?;
        Ok(IVec::from(sealed))
    }

    /// Makes a completed write durable when the policy says every write must be.
    async fn after_write(&self, tree: &sled::Tree, op: Operation) -> Result<()> {
        if self.shared.flush_policy == FlushPolicy::EveryWrite {
            flush_tree(tree, op).await.map_err(|e| {
                Error::new(
                    ErrorKind::Backend,
                    op,
                    "the write was applied but flushing it to disk failed; it may not survive a crash",
                )
                .with_source(e)
            })?;
        }
        Ok(())
    }

    /// Reads `key`, removing it when expired or undecodable.
    fn read(&self, tree: &sled::Tree, key: &K, op: Operation) -> Result<Option<Entry<V>>> {
        let key = key.encode_key();
        let Some(bytes) = tree.get(&key).map_err(|e| sled_error(op, e))? else {
            return Ok(None);
        };
        match decode_value(&self.shared.codec, &self.shared.clock, &bytes, op) {
            Ok(Stored::Live(entry)) => Ok(Some(entry)),
            Ok(Stored::Expired) => {
                remove_if_unchanged(tree, &key, &bytes);
                Ok(None)
            }
            Err(err) => {
                // Bad bytes would fail every read until overwritten: drop them, so that the
                // next read is a plain miss (and a composer can refill from below).
                remove_if_unchanged(tree, &key, &bytes);
                Err(err)
            }
        }
    }
}

#[async_trait]
impl<K, V, C> Layer<K, V> for SledLayer<K, V, C>
where
    K: StorageKey + Clone + Send + Sync + 'static,
    V: Send + Sync + Clone + 'static,
    C: Codec<V>,
{
    fn name(&self) -> &str {
        "sled"
    }

    fn capabilities(&self) -> Capabilities {
        let caps = Capabilities::new().with_scan().with_transactions();
        if self.shared.persistent {
            caps.with_persistence()
        } else {
            caps
        }
    }

    /// Removes the entry and fails with [`ErrorKind::Decode`] when the stored bytes are not
    /// capacitor's envelope or do not decode.
    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        let tree = self.shared.tree(Operation::Get)?;
        self.read(&tree, key, Operation::Get)
    }

    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        let tree = self.shared.tree(Operation::Set)?;
        let bytes = self.encode(value, expiry_for(self.shared.clock.now(), ttl), Operation::Set)?;
        tree.insert(key.encode_key(), bytes)
            .map_err(|e| sled_error(Operation::Set, e))?;
        self.after_write(&tree, Operation::Set).await
    }

    /// `true` when a live entry was removed; bytes that are not capacitor's count as
    /// present (something was there, not known to have expired).
    async fn delete(&self, key: &K) -> Result<bool> {
        let tree = self.shared.tree(Operation::Delete)?;
        let old = tree
            .remove(key.encode_key())
            .map_err(|e| sled_error(Operation::Delete, e))?;
        let live = old.is_some_and(|bytes| is_live(&bytes, self.shared.clock.now()));
        self.after_write(&tree, Operation::Delete).await?;
        Ok(live)
    }

    /// Checks the envelope and the expiry, not whether the payload decodes (bytes without
    /// an envelope are removed and reported as [`ErrorKind::Decode`], as by `get`).
    async fn exists(&self, key: &K) -> Result<bool> {
        let tree = self.shared.tree(Operation::Exists)?;
        let key = key.encode_key();
        let Some(bytes) = tree.get(&key).map_err(|e| sled_error(Operation::Exists, e))? else {
            return Ok(false);
        };
        match envelope::unwrap(&bytes) {
            Ok((Some(at), _)) if at <= self.shared.clock.now() => {
                remove_if_unchanged(&tree, &key, &bytes);
                Ok(false)
            }
            Ok(_) => Ok(true),
            Err(err) => {
                remove_if_unchanged(&tree, &key, &bytes);
                Err(err.with_operation(Operation::Exists))
            }
        }
    }

    /// Reads every key; when some hold bytes that do not decode, all of those are removed
    /// and the call fails with [`ErrorKind::Decode`] (a retry then reads the others).
    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        let tree = self.shared.tree(Operation::GetMany)?;
        let mut out = Vec::with_capacity(keys.len());
        let mut first_error = None;
        let mut bad = 0usize;
        for key in keys {
            match self.read(&tree, key, Operation::GetMany) {
                Ok(entry) => out.push(entry),
                Err(err) if err.kind() == ErrorKind::Decode => {
                    bad += 1;
                    first_error.get_or_insert(err);
                    out.push(None);
                }
                Err(err) => return Err(err),
            }
        }
        match first_error {
            None => Ok(out),
            Some(err) if bad == 1 => Err(err),
            Some(err) => {
                let message = format!(
                    "{bad} stored values did not decode (removed); first: {}",
                    err.message()
                );
                Err(Error::new(ErrorKind::Decode, Operation::GetMany, message).with_source(err))
            }
        }
    }

    /// One sled batch: every entry is written, or (on an encode or size error, checked
    /// before anything is written) none.
    async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        let tree = self.shared.tree(Operation::SetMany)?;
        if entries.is_empty() {
            return Ok(());
        }
        let expires_at = expiry_for(self.shared.clock.now(), ttl);
        let mut batch = sled::Batch::default();
        for (key, value) in entries {
            let bytes = self.encode(value, expires_at, Operation::SetMany)?;
            batch.insert(key.encode_key().as_ref(), bytes);
        }
        tree.apply_batch(batch)
            .map_err(|e| sled_error(Operation::SetMany, e))?;
        self.after_write(&tree, Operation::SetMany).await
    }

    /// One sled transaction, so the count of live entries removed is exact under
    /// concurrent writers.
    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        let tree = self.shared.tree(Operation::DeleteMany)?;
        if keys.is_empty() {
            return Ok(0);
        }
        let encoded: Vec<IVec> = keys.iter().map(|k| IVec::from(k.encode_key().as_ref())).collect();
        let now = self.shared.clock.now();
        let removed = tree
            .transaction(|tx| {
                let mut live = 0u64;
                for key in &encoded {
                    if let Some(old) = tx.remove(key)? {
                        live += u64::from(is_live(&old, now));
                    }
                }
                Ok::<u64, ConflictableTransactionError<std::convert::Infallible>>(live)
            })
            .map_err(|e| transaction_error(Operation::DeleteMany, e))?;
        self.after_write(&tree, Operation::DeleteMany).await?;
        Ok(removed)
    }

    /// Lazy: reads the tree in key order as the stream is polled, skipping expired
    /// entries, in memory bounded by one entry. A value or key that does not decode is
    /// yielded as an [`ErrorKind::Decode`] item and the stream goes on (it is not removed:
    /// a scan does not write). After the layer is closed the stream yields one
    /// [`ErrorKind::Closed`] item and ends.
    fn scan(&self, prefix: &[u8]) -> Result<EntryStream<K, V>> {
        let tree = self.shared.tree(Operation::Scan)?;
        Ok(Box::pin(ScanStream::<K, V, C>::new(
            tree.scan_prefix(prefix),
            Arc::clone(&self.shared),
        )))
    }

    /// A sled transaction: all of `ops` or none. Values are encoded and checked against
    /// `max_value_bytes` before the transaction starts. The TTLs are taken from one reading
    /// of the clock.
    async fn apply_atomic(&self, ops: &[WriteOp<K, V>]) -> Result<()> {
        let tree = self.shared.tree(Operation::Transaction)?;
        if ops.is_empty() {
            return Ok(());
        }
        let now = self.shared.clock.now();
        let mut writes: Vec<(IVec, Option<IVec>)> = Vec::with_capacity(ops.len());
        for op in ops {
            let key = IVec::from(op.key().encode_key().as_ref());
            let value = match op {
                WriteOp::Set { value, ttl, .. } => {
                    Some(self.encode(value, expiry_for(now, *ttl), Operation::Transaction)?)
                }
                WriteOp::Delete { .. } => None,
            };
            writes.push((key, value));
        }
        tree.transaction(|tx| {
            for (key, value) in &writes {
                match value {
                    Some(value) => {
                        tx.insert(key, value.clone())?;
                    }
                    None => {
                        tx.remove(key)?;
                    }
                }
            }
            Ok::<(), ConflictableTransactionError<std::convert::Infallible>>(())
        })
        .map_err(|e| transaction_error(Operation::Transaction, e))?;
        self.after_write(&tree, Operation::Transaction).await
    }

    /// Flushes sled's buffers and fsyncs: every write acknowledged before the call survives
    /// a crash once it returns.
    async fn flush(&self) -> Result<()> {
        let tree = self.shared.tree(Operation::Flush)?;
        flush_tree(&tree, Operation::Flush).await
    }

    /// Stops the background tasks, flushes, and drops the layer's database handle (which
    /// releases the directory lock once no scan stream still holds it). Idempotent.
    async fn close(&self) -> Result<()> {
        let handles = self
            .shared
            .handles
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(handles) = handles else {
            return Ok(());
        };
        self.shared.stop.stop();
        let flushed = flush_tree(&handles.tree, Operation::Close).await;
        // Dropping the last handle flushes again (a no-op now) and joins sled's flusher
        // thread: keep that off the runtime's worker threads when we can.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let _ = runtime.spawn_blocking(move || drop(handles)).await;
        } else {
            drop(handles);
        }
        flushed
    }
}

fn transaction_error(op: Operation, err: TransactionError<std::convert::Infallible>) -> Error {
    match err {
        TransactionError::Storage(e) => sled_error(op, e),
        TransactionError::Abort(never) => match never {},
    }
}
