//! [`RedbLayer`] and its [`Layer`] implementation.

use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use capacitor_core::{
    async_trait, envelope, expiry_for, Capabilities, Codec, DefaultCodec, Entry, EntryStream, Error,
    ErrorKind, Layer, Operation, Result, StorageKey, Timestamp, WriteOp,
};

use crate::core::{blocking, Shared, Store};
use crate::error::redb_error;
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
fn remove_if_unchanged(store: &Store, key: &[u8], bytes: &[u8], op: Operation) {
    let _ = tags::remove_if_unchanged(store, key, bytes, op);
}

/// A persistent, transactional layer on [redb](https://docs.rs/redb), an embedded
/// key-value store: the database lives in one local file and survives restarts.
///
/// Values are stored as [`envelope`]`(expiry, codec(value))`, keys as
/// [`StorageKey::encode_key`] (a `String` key is its UTF-8 bytes), in a redb table of raw
/// bytes. Expired entries are removed when read, and by the optional sweeper. Bytes that
/// are not capacitor's (another writer, a changed value type) are removed when read and
/// reported as [`ErrorKind::Decode`], which a [`MultiLayer`](capacitor_core::MultiLayer)
/// counts as a miss. Durability follows the [`Durability`](crate::Durability) policy.
///
/// Capabilities: scan (lazy, in pages of redb read transactions), transactions (one redb
/// write transaction), persistence (unless built
/// [`temporary`](crate::RedbLayerBuilder::temporary)), tags (when built with
/// [`tags(true)`](crate::RedbLayerBuilder::tags): see the crate guide, "Tags").
/// Reads go through [`get`](Layer::get): [`get_sync`](Layer::get_sync) answers `None`,
/// because a redb read may go to disk and the composer's synchronous path is meant for
/// in-memory layers.
///
/// Reads, and writes that do not fsync, call redb directly on the calling task: they are
/// synchronous, usually in memory and short, and may block on disk I/O for a cold page or
/// wait for another write transaction (redb runs one at a time). Writes under
/// [`Durability::Immediate`](crate::Durability::Immediate), flushes, `clear`,
/// `remove_by_tag` and the sweeper's passes run on tokio's blocking pool.
///
/// Cheap to clone; clones share the database, and closing one closes all.
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor::Layer;
/// use capacitor::redb::RedbLayer;
/// use std::time::Duration;
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("cache.redb");
/// let layer = RedbLayer::builder().path(&path).build::<String, String>()?;
/// layer.set(&"user:42".to_string(), &"Ada".to_string(), Some(Duration::from_secs(60))).await?;
/// let entry = layer.get(&"user:42".to_string()).await?.expect("present");
/// assert_eq!(entry.value, "Ada");
/// assert!(entry.expires_at.is_some());
/// layer.close().await?; // makes every write durable, releases the file
///
/// // The data survives: open the file again.
/// let layer = RedbLayer::builder().path(&path).build::<String, String>()?;
/// assert!(layer.exists(&"user:42".to_string()).await?);
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
pub struct RedbLayer<K, V, C = DefaultCodec> {
    pub(crate) shared: Arc<Shared<C>>,
    pub(crate) _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V, C> Clone for RedbLayer<K, V, C> {
    fn clone(&self) -> Self {
        RedbLayer {
            shared: Arc::clone(&self.shared),
            _types: PhantomData,
        }
    }
}

impl<K, V, C: fmt::Debug> fmt::Debug for RedbLayer<K, V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbLayer")
            .field("closed", &self.shared.is_closed())
            .field("durability", &self.shared.durability)
            .field("codec", &self.shared.codec)
            .field("max_value_bytes", &self.shared.max_value_bytes)
            .field("tags", &self.shared.tags)
            .finish_non_exhaustive()
    }
}

impl<K, V, C> RedbLayer<K, V, C>
where
    K: StorageKey + Clone + Send + Sync + 'static,
    V: Send + Sync + Clone + 'static,
    C: Codec<V>,
{
    /// Encodes `value` into its stored bytes, checking the size limit first.
    fn encode(&self, value: &V, expires_at: Option<Timestamp>, op: Operation) -> Result<Vec<u8>> {
        envelope::seal(
            &self.shared.codec,
            value,
            expires_at,
            self.shared.max_value_bytes,
            op,
        )
    }

    /// Decodes bytes read for `key`, removing the entry when expired or undecodable.
    fn judge(
        &self,
        store: &Store,
        key: &[u8],
        bytes: Option<Vec<u8>>,
        op: Operation,
    ) -> Result<Option<Entry<V>>> {
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        match envelope::open_entry(&self.shared.codec, &bytes, &self.shared.clock, op) {
            Ok(Some(entry)) => Ok(Some(entry)),
            Ok(None) => {
                remove_if_unchanged(store, key, &bytes, op);
                Ok(None)
            }
            Err(err) => {
                // Bad bytes would fail every read until overwritten: drop them, so that the
                // next read is a plain miss (and a composer can refill from below). A
                // value of a codec this layer does not read stays: it is another
                // deployment's, not garbage.
                if !envelope::is_foreign(&self.shared.codec, &bytes) {
                    remove_if_unchanged(store, key, &bytes, op);
                }
                Err(err)
            }
        }
    }
}

/// The stored bytes of `keys`, in one read transaction.
fn read_bytes(store: &Store, keys: &[Vec<u8>], op: Operation) -> Result<Vec<Option<Vec<u8>>>> {
    store.read(op, |table| {
        let Some(table) = table else {
            return Ok(vec![None; keys.len()]);
        };
        keys.iter()
            .map(|key| {
                table
                    .get(key.as_slice())
                    .map(|g| g.map(|g| g.value().to_vec()))
                    .map_err(|e| redb_error(op, e))
            })
            .collect()
    })
}

#[async_trait]
impl<K, V, C> Layer<K, V> for RedbLayer<K, V, C>
where
    K: StorageKey + Clone + Send + Sync + 'static,
    V: Send + Sync + Clone + 'static,
    C: Codec<V>,
{
    fn name(&self) -> &str {
        "redb"
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
        let op = Operation::Get;
        let store = self.shared.store(op)?;
        let key = key.encode_key().as_ref().to_vec();
        let mut bytes = read_bytes(&store, std::slice::from_ref(&key), op)?;
        self.judge(&store, &key, bytes.pop().flatten(), op)
    }

    /// One write transaction; with tags on, it also drops the key's tags.
    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        let op = Operation::Set;
        let bytes = self.encode(value, expiry_for(self.shared.clock.now(), ttl), op)?;
        let key = key.encode_key().as_ref().to_vec();
        self.shared.write(op, move |t| t.put(&key, &bytes, op)).await
    }

    /// One write transaction: the value, and the key's tags replaced by `tags`. The tags
    /// are checked as the composer checks them (at most
    /// [`MAX_TAGS`](capacitor_core::MAX_TAGS), each 1 to
    /// [`MAX_TAG_BYTES`](capacitor_core::MAX_TAG_BYTES) bytes; repeats count once), and the
    /// value encoded, before anything is written.
    async fn set_tagged(&self, key: &K, value: &V, ttl: Option<Duration>, tags: &[String]) -> Result<()> {
        let op = Operation::Set;
        self.shared.store(op)?;
        if !self.shared.tags {
            return Err(Error::unsupported(
                op,
                "this redb layer keeps no tags: build it with `.tags(true)`",
            ));
        }
        let set = TagSet::new(tags, op)?;
        let bytes = self.encode(value, expiry_for(self.shared.clock.now(), ttl), op)?;
        let key = key.encode_key().as_ref().to_vec();
        self.shared
            .write(op, move |t| {
                if let Some(tags) = &mut t.tags {
                    tags.retag(&key, &set, op)?;
                }
                t.data
                    .insert(key.as_slice(), bytes.as_slice())
                    .map_err(|e| redb_error(op, e))?;
                Ok(())
            })
            .await
    }

    /// Removes the entries carrying `tag` with all their tags, in write transactions of up
    /// to 1,000 keys on tokio's blocking pool: a tag on more keys is removed in several
    /// transactions, and a failure part-way leaves the later ones in place (with their
    /// tags, so a retry finds them). Includes expired entries not yet swept.
    async fn remove_by_tag(&self, tag: &str) -> Result<Vec<K>> {
        let op = Operation::DeleteMany;
        let store = self.shared.store(op)?;
        if !self.shared.tags {
            return Err(Error::unsupported(
                op,
                "this redb layer keeps no tags: build it with `.tags(true)`",
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
        let removed = blocking(op, move || {
            let mut removed = Vec::new();
            while let Some(batch) = tags::remove_tag_batch(&store, &tag, op)? {
                removed.extend(batch);
            }
            Ok(removed)
        })
        .await?;
        // Keys are capacitor's own encodings; one that does not decode cannot be named,
        // but it is removed all the same.
        Ok(removed.iter().filter_map(|k| K::decode_key(k).ok()).collect())
    }

    /// Removes every entry, including bytes that are not capacitor's (which the default,
    /// a decoding scan, cannot name), and every tag, in one write transaction on tokio's
    /// blocking pool: the layer's tables are deleted and created again, empty, so no
    /// value is decoded. A write racing the clear lands before it (and is removed) or
    /// after it (and stays), whole.
    async fn clear(&self) -> Result<()> {
        let op = Operation::Clear;
        let store = self.shared.store(op)?;
        blocking(op, move || {
            let names = Arc::clone(&store.names);
            tags::clear(&store, &names, op)
        })
        .await
    }

    /// `true` when a live entry was removed; bytes that are not capacitor's count as
    /// present (something was there, not known to have expired).
    async fn delete(&self, key: &K) -> Result<bool> {
        let op = Operation::Delete;
        let key = key.encode_key().as_ref().to_vec();
        let now = self.shared.clock.now();
        let old = self.shared.write(op, move |t| t.take(&key, op)).await?;
        Ok(old.is_some_and(|bytes| is_live(&bytes, now)))
    }

    /// Checks the envelope and the expiry, not whether the payload decodes (bytes without
    /// an envelope are removed and reported as [`ErrorKind::Decode`], as by `get`).
    async fn exists(&self, key: &K) -> Result<bool> {
        let op = Operation::Exists;
        let store = self.shared.store(op)?;
        let key = key.encode_key().as_ref().to_vec();
        let Some(bytes) = read_bytes(&store, std::slice::from_ref(&key), op)?
            .pop()
            .flatten()
        else {
            return Ok(false);
        };
        match envelope::open_readable(&self.shared.codec, &bytes) {
            Ok(opened) if opened.expires_at.is_some_and(|at| at <= self.shared.clock.now()) => {
                remove_if_unchanged(&store, &key, &bytes, op);
                Ok(false)
            }
            Ok(_) => Ok(true),
            Err(err) => {
                // A value of a codec this layer does not read (or of a later envelope
                // version) stays: it is another deployment's, not garbage.
                if !envelope::is_foreign(&self.shared.codec, &bytes) {
                    remove_if_unchanged(&store, &key, &bytes, op);
                }
                Err(err.with_operation(op))
            }
        }
    }

    /// Reads every key in one read transaction; when some hold bytes that do not decode,
    /// all of those are removed (values of a codec this layer does not read are kept) and
    /// the call fails with [`ErrorKind::Decode`].
    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        let op = Operation::GetMany;
        let store = self.shared.store(op)?;
        let encoded: Vec<Vec<u8>> = keys.iter().map(|k| k.encode_key().as_ref().to_vec()).collect();
        let found = read_bytes(&store, &encoded, op)?;
        let mut out = Vec::with_capacity(keys.len());
        let mut first_error = None;
        let mut bad = 0usize;
        for (key, bytes) in encoded.iter().zip(found) {
            match self.judge(&store, key, bytes, op) {
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
                Err(Error::new(ErrorKind::Decode, op, message).with_source(err))
            }
        }
    }

    /// One write transaction (with tags on, it also drops the keys' tags): every entry is
    /// written, or (on an encode or size error, checked before anything is written) none.
    async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        let op = Operation::SetMany;
        self.shared.store(op)?;
        if entries.is_empty() {
            return Ok(());
        }
        let expires_at = expiry_for(self.shared.clock.now(), ttl);
        let mut writes: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            writes.push((
                key.encode_key().as_ref().to_vec(),
                self.encode(value, expires_at, op)?,
            ));
        }
        self.shared
            .write(op, move |t| {
                for (key, bytes) in &writes {
                    t.put(key, bytes, op)?;
                }
                Ok(())
            })
            .await
    }

    /// One write transaction (with the keys' tags, when tags are on), so the count of live
    /// entries removed is exact under concurrent writers.
    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        let op = Operation::DeleteMany;
        self.shared.store(op)?;
        if keys.is_empty() {
            return Ok(0);
        }
        let encoded: Vec<Vec<u8>> = keys.iter().map(|k| k.encode_key().as_ref().to_vec()).collect();
        let now = self.shared.clock.now();
        self.shared
            .write(op, move |t| {
                let mut live = 0u64;
                for key in &encoded {
                    if let Some(old) = t.take(key, op)? {
                        live += u64::from(is_live(&old, now));
                    }
                }
                Ok(live)
            })
            .await
    }

    /// Lazy: reads the table in key order as the stream is polled, a page (256 entries or
    /// 1 MiB) per redb read transaction, skipping expired entries: memory is bounded by a
    /// page. A value or key that does not decode is yielded as an [`ErrorKind::Decode`]
    /// item and the stream goes on (it is not removed: a scan does not write). After the
    /// layer is closed the stream yields one [`ErrorKind::Closed`] item and ends.
    fn scan(&self, prefix: &[u8]) -> Result<EntryStream<K, V>> {
        self.shared.store(Operation::Scan)?;
        Ok(Box::pin(ScanStream::<K, V, C>::new(
            prefix,
            Arc::clone(&self.shared),
        )))
    }

    /// One redb write transaction: all of `ops` or none. Values are encoded and checked
    /// against `max_value_bytes` before the transaction starts. The TTLs are taken from one
    /// reading of the clock. With tags on, the same transaction drops the tags of every key
    /// it writes.
    async fn apply_atomic(&self, ops: &[WriteOp<K, V>]) -> Result<()> {
        let op = Operation::Transaction;
        self.shared.store(op)?;
        if ops.is_empty() {
            return Ok(());
        }
        let now = self.shared.clock.now();
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::with_capacity(ops.len());
        for write in ops {
            let key = write.key().encode_key().as_ref().to_vec();
            let value = match write {
                WriteOp::Set { value, ttl, .. } => Some(self.encode(value, expiry_for(now, *ttl), op)?),
                WriteOp::Delete { .. } => None,
            };
            writes.push((key, value));
        }
        self.shared
            .write(op, move |t| {
                for (key, value) in &writes {
                    match value {
                        Some(bytes) => t.put(key, bytes, op)?,
                        None => {
                            t.take(key, op)?;
                        }
                    }
                }
                Ok(())
            })
            .await
    }

    /// Makes every write acknowledged before the call durable (an empty `Immediate` redb
    /// commit, when some commit since the last one was not), on tokio's blocking pool.
    async fn flush(&self) -> Result<()> {
        let op = Operation::Flush;
        let store = self.shared.store(op)?;
        blocking(op, move || store.make_durable(op)).await
    }

    /// Stops the background work, makes every write durable, and closes the database when
    /// the layer opened it (which releases the file lock; a sweep batch or scan page in
    /// progress delays that until it ends). Idempotent.
    async fn close(&self) -> Result<()> {
        let op = Operation::Close;
        let store = self
            .shared
            .store
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(store) = store else {
            return Ok(());
        };
        self.shared.stop.stop();
        let flusher = self
            .shared
            .flusher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        blocking(op, move || {
            if let Some(flusher) = flusher {
                drop(flusher.stop);
                let _ = flusher.thread.join();
            }
            let durable = store.make_durable(op);
            // The last handle closes the database (a caller's `db` keeps its own).
            if let Ok(db) = Arc::try_unwrap(store.db) {
                db.close().map_err(|e| redb_error(op, redb::Error::from(e)))?;
            }
            durable
        })
        .await
    }
}
