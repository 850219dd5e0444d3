//! [`SledLayer`] and its [`Layer`] implementation.

use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use capacitor_core::{
    async_trait, envelope, expiry_for, Capabilities, Codec, DefaultCodec, Entry, EntryStream, Error,
    ErrorKind, Layer, Operation, Result, StorageKey, Timestamp, WriteOp,
};
use sled::transaction::ConflictableTransactionError;
use sled::IVec;

use crate::core::{blocking, flush_tree, FlushPolicy, Shared, Trees};
use crate::error::{sled_error, transaction_error};
use crate::scan::ScanStream;
use crate::tags::{self, TagSet};

/// Whether stored bytes hold a live entry: bytes that are not an envelope count as present
/// (something is there and it is not known to have expired).
fn is_live(bytes: &[u8], now: Timestamp) -> bool {
    match envelope::unwrap(bytes) {
        Ok((Some(at), _)) => at > now,
        Ok((None, _)) | Err(_) => true,
    }
}

/// Removes `key` (and its tags) if it still holds `bytes`: an entry found expired or
/// undecodable is removed without clobbering a write that replaced it meanwhile. Best
/// effort: the read that found it reports what it found (a miss, a decode error), not a
/// failed cleanup; the next read or the sweeper tries again.
fn remove_if_unchanged(trees: &Trees, key: &[u8], bytes: &IVec, op: Operation) {
    let _ = tags::remove_if_unchanged(trees, key, bytes, op);
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
/// transactions), persistence (unless built [`temporary`](crate::SledLayerBuilder::temporary)),
/// tags (when built with [`tags(true)`](crate::SledLayerBuilder::tags): see the crate
/// guide, "Tags").
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
pub struct SledLayer<K, V, C = DefaultCodec> {
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
            .field("tags", &self.shared.tags)
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
    fn read(&self, trees: &Trees, key: &K, op: Operation) -> Result<Option<Entry<V>>> {
        let key = key.encode_key();
        let Some(bytes) = trees.data.get(&key).map_err(|e| sled_error(op, e))? else {
            return Ok(None);
        };
        match envelope::open_entry(&self.shared.codec, &bytes, &self.shared.clock, op) {
            Ok(Some(entry)) => Ok(Some(entry)),
            Ok(None) => {
                remove_if_unchanged(trees, &key, &bytes, op);
                Ok(None)
            }
            Err(err) => {
                // Bad bytes would fail every read until overwritten: drop them, so that the
                // next read is a plain miss (and a composer can refill from below). A
                // value of a codec this layer does not read stays: it is another
                // deployment's, not garbage.
                if !envelope::is_foreign(&self.shared.codec, &bytes) {
                    remove_if_unchanged(trees, &key, &bytes, op);
                }
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
        let mut caps = Capabilities::new().with_scan().with_transactions();
        if self.shared.persistent {
            caps = caps.with_persistence();
        }
        if self.shared.tags {
            caps = caps.with_tags();
        }
        caps
    }

    /// Removes the entry and fails with [`ErrorKind::Decode`] when the stored bytes are not
    /// capacitor's envelope or do not decode.
    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        let trees = self.shared.trees(Operation::Get)?;
        self.read(&trees, key, Operation::Get)
    }

    /// With tags on, one transaction that also drops the key's tags.
    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        let op = Operation::Set;
        let trees = self.shared.trees(op)?;
        let bytes = self.encode(value, expiry_for(self.shared.clock.now(), ttl), op)?;
        match &trees.tags {
            None => {
                trees
                    .data
                    .insert(key.encode_key(), bytes)
                    .map_err(|e| sled_error(op, e))?;
            }
            Some(tag_trees) => {
                let key = key.encode_key();
                tags::transaction(&trees.data, tag_trees, op, |d, tx| {
                    tx.untag(&key)?;
                    d.insert(&*key, bytes.clone())?;
                    Ok(())
                })?;
            }
        }
        self.after_write(&trees.data, op).await
    }

    /// One transaction: the value, and the key's tags replaced by `tags`. The tags are
    /// checked as the composer checks them (at most [`MAX_TAGS`](capacitor_core::MAX_TAGS),
    /// each 1 to [`MAX_TAG_BYTES`](capacitor_core::MAX_TAG_BYTES) bytes; repeats count
    /// once), and the value encoded, before anything is written.
    async fn set_tagged(&self, key: &K, value: &V, ttl: Option<Duration>, tags: &[String]) -> Result<()> {
        let op = Operation::Set;
        let trees = self.shared.trees(op)?;
        let Some(tag_trees) = &trees.tags else {
            return Err(Error::unsupported(
                op,
                "this sled layer keeps no tags: build it with `.tags(true)`",
            ));
        };
        let set = TagSet::new(tags, op)?;
        let bytes = self.encode(value, expiry_for(self.shared.clock.now(), ttl), op)?;
        let key = key.encode_key();
        tags::transaction(&trees.data, tag_trees, op, |d, tx| {
            tx.retag(&key, &set)?;
            d.insert(&*key, bytes.clone())?;
            Ok(())
        })?;
        self.after_write(&trees.data, op).await
    }

    /// Removes the entries carrying `tag` with all their tags, in transactions of up to
    /// 1,000 keys on tokio's blocking pool: a tag on more keys is removed in several
    /// transactions, and a failure part-way leaves the later ones in place (with their
    /// tags, so a retry finds them). Includes expired entries not yet swept.
    async fn remove_by_tag(&self, tag: &str) -> Result<Vec<K>> {
        let op = Operation::DeleteMany;
        let trees = self.shared.trees(op)?;
        if trees.tags.is_none() {
            return Err(Error::unsupported(
                op,
                "this sled layer keeps no tags: build it with `.tags(true)`",
            ));
        }
        if tag.is_empty() || tag.len() > capacitor_core::MAX_TAG_BYTES {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                op,
                format!(
                    "a tag must be 1 to {} bytes long (got {})",
                    capacitor_core::MAX_TAG_BYTES,
                    tag.len()
                ),
            ));
        }
        let tag = tag.as_bytes().to_vec();
        let removed = {
            let trees = trees.clone();
            blocking(op, move || {
                let mut removed = Vec::new();
                if let Some(tag_trees) = &trees.tags {
                    while let Some(batch) = tags::remove_tag_batch(&trees.data, tag_trees, &tag, op)? {
                        removed.extend(batch);
                    }
                }
                Ok(removed)
            })
            .await?
        };
        if !removed.is_empty() {
            self.after_write(&trees.data, op).await?;
        }
        // Keys are capacitor's own encodings; one that does not decode cannot be named,
        // but it is removed all the same.
        Ok(removed.iter().filter_map(|k| K::decode_key(k).ok()).collect())
    }

    /// Removes every entry, including bytes that are not capacitor's (which the default,
    /// a decoding scan, cannot name), on tokio's blocking pool. Tags off: sled's
    /// `Tree::clear`, one removal per key, no value decoded (the default decodes every
    /// value). Tags on: transactions of 256 keys removing each key's value and tags
    /// together, over the data tree, then over what is left in the tag trees. Entries
    /// written during the clear may survive it, whole (value and tags).
    async fn clear(&self) -> Result<()> {
        let op = Operation::Clear;
        let trees = self.shared.trees(op)?;
        {
            let trees = trees.clone();
            blocking(op, move || match &trees.tags {
                None => trees.data.clear().map_err(|e| sled_error(op, e)),
                Some(tag_trees) => tags::clear(&trees, tag_trees, op),
            })
            .await?;
        }
        self.after_write(&trees.data, op).await
    }

    /// `true` when a live entry was removed; bytes that are not capacitor's count as
    /// present (something was there, not known to have expired).
    async fn delete(&self, key: &K) -> Result<bool> {
        let op = Operation::Delete;
        let trees = self.shared.trees(op)?;
        let old = match &trees.tags {
            None => trees
                .data
                .remove(key.encode_key())
                .map_err(|e| sled_error(op, e))?,
            Some(tag_trees) => {
                let key = key.encode_key();
                tags::transaction(&trees.data, tag_trees, op, |d, tx| {
                    tx.untag(&key)?;
                    Ok(d.remove(&*key)?)
                })?
            }
        };
        let live = old.is_some_and(|bytes| is_live(&bytes, self.shared.clock.now()));
        self.after_write(&trees.data, op).await?;
        Ok(live)
    }

    /// Checks the envelope and the expiry, not whether the payload decodes (bytes without
    /// an envelope are removed and reported as [`ErrorKind::Decode`], as by `get`).
    async fn exists(&self, key: &K) -> Result<bool> {
        let trees = self.shared.trees(Operation::Exists)?;
        let key = key.encode_key();
        let Some(bytes) = trees
            .data
            .get(&key)
            .map_err(|e| sled_error(Operation::Exists, e))?
        else {
            return Ok(false);
        };
        match envelope::open_readable(&self.shared.codec, &bytes) {
            Ok(opened) if opened.expires_at.is_some_and(|at| at <= self.shared.clock.now()) => {
                remove_if_unchanged(&trees, &key, &bytes, Operation::Exists);
                Ok(false)
            }
            Ok(_) => Ok(true),
            Err(err) => {
                if !envelope::is_foreign(&self.shared.codec, &bytes) {
                    remove_if_unchanged(&trees, &key, &bytes, Operation::Exists);
                }
                Err(err.with_operation(Operation::Exists))
            }
        }
    }

    /// Reads every key; when some hold bytes that do not decode, all of those are removed
    /// (values of a codec this layer does not read are kept) and the call fails with
    /// [`ErrorKind::Decode`].
    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        let trees = self.shared.trees(Operation::GetMany)?;
        let mut out = Vec::with_capacity(keys.len());
        let mut first_error = None;
        let mut bad = 0usize;
        for key in keys {
            match self.read(&trees, key, Operation::GetMany) {
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

    /// One sled batch (with tags on, one transaction that also drops the keys' tags):
    /// every entry is written, or (on an encode or size error, checked before anything is
    /// written) none.
    async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        let op = Operation::SetMany;
        let trees = self.shared.trees(op)?;
        if entries.is_empty() {
            return Ok(());
        }
        let expires_at = expiry_for(self.shared.clock.now(), ttl);
        match &trees.tags {
            None => {
                let mut batch = sled::Batch::default();
                for (key, value) in entries {
                    let bytes = self.encode(value, expires_at, op)?;
                    batch.insert(key.encode_key().as_ref(), bytes);
                }
                trees.data.apply_batch(batch).map_err(|e| sled_error(op, e))?;
            }
            Some(tag_trees) => {
                let mut writes: Vec<(IVec, IVec)> = Vec::with_capacity(entries.len());
                for (key, value) in entries {
                    let bytes = self.encode(value, expires_at, op)?;
                    writes.push((IVec::from(key.encode_key().as_ref()), bytes));
                }
                tags::transaction(&trees.data, tag_trees, op, |d, tx| {
                    for (key, bytes) in &writes {
                        tx.untag(key)?;
                        d.insert(key, bytes.clone())?;
                    }
                    Ok(())
                })?;
            }
        }
        self.after_write(&trees.data, op).await
    }

    /// One sled transaction (with the keys' tags, when tags are on), so the count of
    /// live entries removed is exact under concurrent writers.
    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        let op = Operation::DeleteMany;
        let trees = self.shared.trees(op)?;
        if keys.is_empty() {
            return Ok(0);
        }
        let encoded: Vec<IVec> = keys.iter().map(|k| IVec::from(k.encode_key().as_ref())).collect();
        let now = self.shared.clock.now();
        let removed = match &trees.tags {
            None => trees
                .data
                .transaction(|tx| {
                    let mut live = 0u64;
                    for key in &encoded {
                        if let Some(old) = tx.remove(key)? {
                            live += u64::from(is_live(&old, now));
                        }
                    }
                    Ok::<u64, ConflictableTransactionError<std::convert::Infallible>>(live)
                })
                .map_err(|e| transaction_error(op, e))?,
            Some(tag_trees) => tags::transaction(&trees.data, tag_trees, op, |d, tx| {
                let mut live = 0u64;
                for key in &encoded {
                    tx.untag(key)?;
                    if let Some(old) = d.remove(key)? {
                        live += u64::from(is_live(&old, now));
                    }
                }
                Ok(live)
            })?,
        };
        self.after_write(&trees.data, op).await?;
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
    /// With tags on, the same transaction drops the tags of every key it writes.
    async fn apply_atomic(&self, ops: &[WriteOp<K, V>]) -> Result<()> {
        let trees = self.shared.trees(Operation::Transaction)?;
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
        let apply = |tx: &sled::transaction::TransactionalTree| -> tags::TxResult<()> {
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
            Ok(())
        };
        match &trees.tags {
            None => trees
                .data
                .transaction(apply)
                .map_err(|e| transaction_error(Operation::Transaction, e))?,
            Some(tag_trees) => tags::transaction(&trees.data, tag_trees, Operation::Transaction, |d, tx| {
                for (key, _) in &writes {
                    tx.untag(key)?;
                }
                apply(d)
            })?,
        }
        self.after_write(&trees.data, Operation::Transaction).await
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
