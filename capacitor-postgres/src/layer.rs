//! [`PostgresLayer`] and its [`Layer`] implementation.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use capacitor_core::fence::{deadline_after, too_late, InFlight};
use capacitor_core::{
    async_trait, envelope, expiry_for, Capabilities, Codec, DefaultCodec, Entry, EntryStream, Error,
    ErrorKind, Layer, Operation, Result, StorageKey, Timestamp, WriteOp,
};
use deadpool_postgres::{Object, Pool};
use tokio_postgres::Statement;

use crate::core::{decode_entry, prepare, sql_time, Abandon, Conn, Shared};
use crate::error::pg_error;
use crate::key::KeyFormat;
use crate::scan::ScanStream;

/// The longest stored key text (bytes) a write accepts: below the B-tree's limit of about
/// 2,700 bytes per index row, with room for the row's overhead.
pub const MAX_KEY_BYTES: usize = 2_048;

/// A persistent, shared, transactional layer on PostgreSQL, through a
/// [deadpool-postgres](https://docs.rs/deadpool-postgres) connection pool.
///
/// One row per key in a table of the shape given in the [crate docs](crate) (created on
/// first use unless [`create_table(false)`](crate::PostgresLayerBuilder::create_table)):
/// `key text COLLATE "C" PRIMARY KEY` (a `String` key as its text, so
/// `SELECT value FROM capacitor_kv WHERE key = 'user:42'` finds it; other key types as
/// hex, see [`KeyFormat`]), `value bytea` ([`envelope`]`(expiry, codec(value))`),
/// `expires_at timestamptz` (authoritative; `NULL` for no expiry) and `updated_at`.
///
/// - Reads never return expired rows: they filter on `expires_at > now`, where `now` is
///   the layer's [clock](crate::PostgresLayerBuilder::clock), the clock expiries are computed
///   with. Expired rows are deleted by the background sweeper (on by default, every
///   minute, in batches).
/// - Writes are upserts (`INSERT … ON CONFLICT (key) DO UPDATE`), durable when they
///   return (on an [`unlogged`](crate::PostgresLayerBuilder::unlogged) table: until a server
///   crash, which empties the table).
/// - Batch forms take one round trip each: `get_many` (`key = ANY($1)`), `set_many` (one
///   `INSERT … SELECT FROM unnest(…)`; a key given twice keeps its last value),
///   `delete_many`.
/// - [`scan`](Layer::scan) pages through the key range by keyset pagination
///   (`key > $last ORDER BY key LIMIT n`), lazily, holding one page at a time.
/// - [`apply_atomic`](Layer::apply_atomic) is one PostgreSQL transaction.
/// - A row whose value does not decode is deleted and reported as
///   [`ErrorKind::Decode`], which a [`MultiLayer`](capacitor_core::MultiLayer) counts as
///   a miss.
///
/// Statements are prepared once per pooled connection and cached there. Cheap to clone;
/// clones share the pool, and closing one closes all.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), capacitor::Error> {
/// use std::time::Duration;
/// use capacitor::Layer;
/// use capacitor::postgres::PostgresLayer;
///
/// let layer = PostgresLayer::builder()
///     .url("postgres://app@127.0.0.1:5432/app")
///     .table("sessions")
///     .statement_timeout(Duration::from_secs(2))
///     .build::<String, String>()
///     .await?;
/// layer.set(&"user:42".to_string(), &"Ada".to_string(), Some(Duration::from_secs(3600))).await?;
/// let entry = layer.get(&"user:42".to_string()).await?.expect("present");
/// assert_eq!(entry.value, "Ada");
/// layer.close().await?;
/// # Ok(()) }
/// ```
pub struct PostgresLayer<K, V, C = DefaultCodec> {
    pub(crate) shared: Arc<Shared<C>>,
    pub(crate) _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V, C> Clone for PostgresLayer<K, V, C> {
    fn clone(&self) -> Self {
        PostgresLayer {
            shared: Arc::clone(&self.shared),
            _types: PhantomData,
        }
    }
}

impl<K, V, C: fmt::Debug> fmt::Debug for PostgresLayer<K, V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLayer")
            .field("table", &self.shared.table.qualified)
            .field("closed", &self.shared.is_closed())
            .field("unlogged", &self.shared.unlogged)
            .field("key_format", &self.shared.key_format)
            .field("codec", &self.shared.codec)
            .field("max_value_bytes", &self.shared.max_value_bytes)
            .field("pool", &self.shared.pool.status())
            .finish_non_exhaustive()
    }
}

impl<K, V, C> PostgresLayer<K, V, C> {
    /// The connection pool, to run other SQL on the same connections (sized and
    /// configured by the builder). Closing the layer closes it.
    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    /// The table, schema-qualified and quoted as it appears in the layer's SQL
    /// (`"public"."capacitor_kv"`).
    pub fn table(&self) -> &str {
        &self.shared.table.qualified
    }

    /// How keys are stored in the `key` column.
    pub fn key_format(&self) -> KeyFormat {
        self.shared.key_format
    }

    /// The tag table, schema-qualified and quoted (`"public"."capacitor_kv_tags"`), when
    /// the layer keeps [`tags`](crate::PostgresLayerBuilder::tags).
    pub fn tags_table(&self) -> Option<String> {
        self.shared
            .sql
            .tags
            .is_some()
            .then(|| self.shared.table.tags_qualified())
    }
}

/// The longest stored key text plus tag (bytes) a tagged write accepts: each `(key, tag)`
/// is one row of the tag table's primary-key index, which holds about 2.7 KB per row.
pub const MAX_KEY_AND_TAG_BYTES: usize = 2_560;

/// Refuses, before anything is sent, tags the tag table cannot hold: an empty tag, one
/// longer than [`MAX_TAG_BYTES`](capacitor_core::MAX_TAG_BYTES), one with a NUL byte
/// (PostgreSQL `text` cannot hold it), or one that with the key passes
/// [`MAX_KEY_AND_TAG_BYTES`].
fn check_tags(key_text: &str, tags: &[String], op: Operation) -> Result<()> {
    for tag in tags {
        let problem = if tag.is_empty() || tag.len() > capacitor_core::MAX_TAG_BYTES {
            format!(
                "a tag must be 1 to {} bytes long (got {})",
                capacitor_core::MAX_TAG_BYTES,
                tag.len()
            )
        } else if tag.contains('\0') {
            "a tag contains a NUL byte, which a PostgreSQL text column cannot hold".to_owned()
        } else if key_text.len() + tag.len() > MAX_KEY_AND_TAG_BYTES {
            format!(
                "the key ({} bytes as stored) and a tag ({} bytes) pass the {MAX_KEY_AND_TAG_BYTES} \
                 bytes one row of the tag table's index holds",
                key_text.len(),
                tag.len()
            )
        } else {
            continue;
        };
        return Err(Error::new(ErrorKind::InvalidInput, op, problem));
    }
    Ok(())
}

/// One `(key text, stored bytes)` pair ready for the database.
type Row = (String, Vec<u8>);

/// A batch of writes by key text, in key order: `Some((stored bytes, expiry))` to store,
/// `None` to delete.
type Batch = BTreeMap<String, Option<(Vec<u8>, Option<SystemTime>)>>;

impl<K, V, C> PostgresLayer<K, V, C>
where
    K: StorageKey + Clone + Send + Sync + 'static,
    V: Send + Sync + Clone + 'static,
    C: Codec<V>,
{
    fn key_text<'k>(&self, key: &'k Cow<'k, [u8]>, op: Operation) -> Result<Cow<'k, str>> {
        self.shared.key_format.encode(key, op)
    }

    /// The stored text of a key about to be written: [`key_text`](Self::key_text), no
    /// longer than [`MAX_KEY_BYTES`] (the `key` column's index holds at most about 2.7 KB
    /// per row; a longer key would be refused by the server).
    fn write_key_text<'k>(&self, key: &'k Cow<'k, [u8]>, op: Operation) -> Result<Cow<'k, str>> {
        let text = self.key_text(key, op)?;
        if text.len() > MAX_KEY_BYTES {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                op,
                format!(
                    "the key is {} bytes as stored; the PostgreSQL layer stores keys of up to {MAX_KEY_BYTES}",
                    text.len()
                ),
            ));
        }
        Ok(text)
    }

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

    /// Encodes every write before anything is sent; a key written twice keeps its last
    /// write (`None`: a delete). Sorted by key text, the order rows are locked in.
    fn encode_batch<'a>(
        &self,
        ops: impl Iterator<Item = (&'a K, Option<(&'a V, Option<Duration>)>)>,
        op: Operation,
    ) -> Result<Batch> {
        let now = self.shared.clock.now();
        let mut batch = BTreeMap::new();
        for (key, write) in ops {
            let bytes = key.encode_key();
            let text = match write {
                Some(_) => self.write_key_text(&bytes, op)?.into_owned(),
                None => self.key_text(&bytes, op)?.into_owned(),
            };
            let write = match write {
                Some((value, ttl)) => {
                    let expires_at = expiry_for(now, ttl);
                    Some((self.encode(value, expires_at, op)?, expires_at.map(sql_time)))
                }
                None => None,
            };
            batch.insert(text, write);
        }
        Ok(batch)
    }

    /// Deletes rows that were found not to decode, if they still hold the bytes read: a
    /// write that replaced them meanwhile stays. Best effort: the read that found them
    /// reports what it found, not a failed cleanup.
    async fn remove_if_unchanged(&self, client: &Object, bad: &[Row], op: Operation) {
        let Ok(stmt) = prepare(client, &self.shared.sql.remove_if_unchanged, op).await else {
            return;
        };
        for (key, bytes) in bad {
            let _ = client.execute(&stmt, &[key, bytes]).await;
        }
    }
}

impl<K, V, C> PostgresLayer<K, V, C>
where
    K: StorageKey + Clone + Send + Sync + 'static,
    V: Send + Sync + Clone + 'static,
    C: Codec<V>,
{
    /// Deletes the row and fails with [`ErrorKind::Decode`] when its value is not
    /// capacitor's envelope or does not decode.
    async fn get_unbounded(&self, key: &K, abandon: Abandon) -> Result<Option<Entry<V>>> {
        let op = Operation::Get;
        let bytes = key.encode_key();
        let text = self.key_text(&bytes, op)?;
        let client = self.shared.client(op, abandon).await?;
        let stmt = prepare(&client, &self.shared.sql.get, op).await?;
        let row = client
            .query_opt(&stmt, &[&text, &self.shared.now()])
            .await
            .map_err(|e| pg_error(op, e))?;
        let Some(row) = row else { return Ok(None) };
        let value: &[u8] = row.try_get(0).map_err(|e| pg_error(op, e))?;
        let expires_at: Option<SystemTime> = row.try_get(1).map_err(|e| pg_error(op, e))?;
        match decode_entry(&self.shared.codec, value, expires_at, op) {
            Ok(entry) => Ok(Some(entry)),
            Err(err) => {
                // A value of a codec this layer does not read stays: another deployment's.
                if !envelope::is_foreign(&self.shared.codec, value) {
                    let bad = [(text.into_owned(), value.to_vec())];
                    self.remove_if_unchanged(&client, &bad, op).await;
                }
                Err(err)
            }
        }
    }

    async fn set_unbounded(&self, key: &K, value: &V, ttl: Option<Duration>, abandon: Abandon) -> Result<()> {
        let op = Operation::Set;
        let bytes = key.encode_key();
        let text = self.write_key_text(&bytes, op)?;
        let expires_at = expiry_for(self.shared.clock.now(), ttl);
        let stored = self.encode(value, expires_at, op)?;
        let deadline = deadline_after(self.shared.operation_timeout);
        self.shared.fence.clear([text.as_ref()], deadline, op).await?;
        let client = self.shared.client(op, abandon).await?;
        let stmt = prepare(&client, &self.shared.sql.set, op).await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&text, &stored, &expires_at.map(sql_time), &deadline];
        let keys = vec![text.clone().into_owned()];
        run_fenced(&self.shared, &client, &stmt, &params, keys, deadline, op).await?;
        Ok(())
    }

    /// One statement (see `TagStatements::set_tagged`): the row and exactly `tags`, or
    /// nothing. Fenced as [`set`](Layer::set).
    async fn set_tagged_unbounded(
        &self,
        key: &K,
        value: &V,
        ttl: Option<Duration>,
        tags: &[String],
        abandon: Abandon,
    ) -> Result<()> {
        let op = Operation::Set;
        let Some(sql) = &self.shared.sql.tags else {
            self.shared.check_open(op)?;
            return Err(no_tags(op));
        };
        let bytes = key.encode_key();
        let text = self.write_key_text(&bytes, op)?;
        check_tags(&text, tags, op)?;
        let expires_at = expiry_for(self.shared.clock.now(), ttl);
        let stored = self.encode(value, expires_at, op)?;
        let deadline = deadline_after(self.shared.operation_timeout);
        self.shared.fence.clear([text.as_ref()], deadline, op).await?;
        let client = self.shared.client(op, abandon).await?;
        let stmt = prepare(&client, &sql.set_tagged, op).await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&text, &stored, &expires_at.map(sql_time), &deadline, &tags];
        let keys = vec![text.clone().into_owned()];
        run_fenced(&self.shared, &client, &stmt, &params, keys, deadline, op).await?;
        Ok(())
    }

    /// One statement (see `TagStatements::remove_by_tag`). Its keys are not known before
    /// it runs, so none is put in doubt when it does not answer: it deletes only the row
    /// versions it read, so a write acknowledged meanwhile is never undone by it.
    async fn remove_by_tag_unbounded(&self, tag: &str, abandon: Abandon) -> Result<Vec<K>> {
        let op = Operation::DeleteMany;
        let Some(sql) = &self.shared.sql.tags else {
            self.shared.check_open(op)?;
            return Err(no_tags(op));
        };
        if tag.contains('\0') {
            // No write can have carried it.
            self.shared.check_open(op)?;
            return Ok(Vec::new());
        }
        let deadline = deadline_after(self.shared.operation_timeout);
        let client = self.shared.client(op, abandon).await?;
        let stmt = prepare(&client, &sql.remove_by_tag, op).await?;
        let row = client
            .query_one(&stmt, &[&tag, &deadline])
            .await
            .map_err(|e| pg_error(op, e))?;
        fenced(&row, op)?;
        let texts: Vec<String> = row.try_get(1).map_err(|e| pg_error(op, e))?;
        // A stored key that is not one of `K` was not written by this layer: it is
        // removed, and cannot be named.
        Ok(texts
            .iter()
            .filter_map(|text| {
                let bytes = self.shared.key_format.decode(text, op).ok()?;
                K::decode_key(&bytes).ok()
            })
            .collect())
    }

    /// One `DELETE` of every row (and tag row), fenced by its deadline.
    async fn clear_unbounded(&self, abandon: Abandon) -> Result<()> {
        let op = Operation::Clear;
        let deadline = deadline_after(self.shared.operation_timeout);
        let client = self.shared.client(op, abandon).await?;
        let stmt = prepare(&client, &self.shared.sql.clear, op).await?;
        let row = client
            .query_one(&stmt, &[&deadline])
            .await
            .map_err(|e| pg_error(op, e))?;
        fenced(&row, op)
    }

    /// `true` when a live row was deleted (an expired one is deleted too, and reported
    /// absent).
    async fn delete_unbounded(&self, key: &K, abandon: Abandon) -> Result<bool> {
        let op = Operation::Delete;
        let bytes = key.encode_key();
        let text = self.key_text(&bytes, op)?;
        let deadline = deadline_after(self.shared.operation_timeout);
        self.shared.fence.clear([text.as_ref()], deadline, op).await?;
        let client = self.shared.client(op, abandon).await?;
        let stmt = prepare(&client, &self.shared.sql.delete, op).await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&text, &self.shared.now(), &deadline];
        let keys = vec![text.clone().into_owned()];
        let row = run_fenced(&self.shared, &client, &stmt, &params, keys, deadline, op).await?;
        row.try_get(1).map_err(|e| pg_error(op, e))
    }

    /// Whether a live row exists; its value is not decoded.
    async fn exists_unbounded(&self, key: &K, abandon: Abandon) -> Result<bool> {
        let op = Operation::Exists;
        let bytes = key.encode_key();
        let text = self.key_text(&bytes, op)?;
        let client = self.shared.client(op, abandon).await?;
        let stmt = prepare(&client, &self.shared.sql.exists, op).await?;
        client
            .query_one(&stmt, &[&text, &self.shared.now()])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| pg_error(op, e))
    }

    /// One `SELECT … WHERE key = ANY($1)`. When some rows do not decode, all of those are
    /// deleted and the call fails with [`ErrorKind::Decode`] (a retry then reads the
    /// others).
    async fn get_many_unbounded(&self, keys: &[K], abandon: Abandon) -> Result<Vec<Option<Entry<V>>>> {
        let op = Operation::GetMany;
        if keys.is_empty() {
            self.shared.check_open(op)?;
            return Ok(Vec::new());
        }
        let mut texts = Vec::with_capacity(keys.len());
        for key in keys {
            let bytes = key.encode_key();
            texts.push(self.key_text(&bytes, op)?.into_owned());
        }
        let client = self.shared.client(op, abandon).await?;
        let stmt = prepare(&client, &self.shared.sql.get_many, op).await?;
        let rows = client
            .query(&stmt, &[&texts, &self.shared.now()])
            .await
            .map_err(|e| pg_error(op, e))?;
        let mut found: HashMap<String, Entry<V>> = HashMap::with_capacity(rows.len());
        let mut bad: Vec<Row> = Vec::new();
        let mut foreign = 0usize;
        let mut first_error = None;
        for row in rows {
            let key: String = row.try_get(0).map_err(|e| pg_error(op, e))?;
            let value: &[u8] = row.try_get(1).map_err(|e| pg_error(op, e))?;
            let expires_at: Option<SystemTime> = row.try_get(2).map_err(|e| pg_error(op, e))?;
            match decode_entry(&self.shared.codec, value, expires_at, op) {
                Ok(entry) => {
                    found.insert(key, entry);
                }
                Err(err) => {
                    first_error.get_or_insert(err);
                    if envelope::is_foreign(&self.shared.codec, value) {
                        foreign += 1;
                    } else {
                        bad.push((key, value.to_vec()));
                    }
                }
            }
        }
        if let Some(err) = first_error {
            self.remove_if_unchanged(&client, &bad, op).await;
            if bad.len() + foreign == 1 {
                return Err(err);
            }
            let message = format!(
                "{} stored values did not decode ({} removed, {foreign} of another codec kept); first: {}",
                bad.len() + foreign,
                bad.len(),
                err.message()
            );
            return Err(Error::new(ErrorKind::Decode, op, message).with_source(err));
        }
        Ok(texts.iter().map(|t| found.get(t).cloned()).collect())
    }

    /// One `INSERT … SELECT FROM unnest(…) ON CONFLICT (key) DO UPDATE`: every entry is
    /// written, or none. A key given twice keeps its last value. Encoding and size errors
    /// are found before anything is sent.
    async fn set_many_unbounded(
        &self,
        entries: &[(K, V)],
        ttl: Option<Duration>,
        abandon: Abandon,
    ) -> Result<()> {
        let op = Operation::SetMany;
        if entries.is_empty() {
            self.shared.check_open(op)?;
            return Ok(());
        }
        let batch = self.encode_batch(entries.iter().map(|(k, v)| (k, Some((v, ttl)))), op)?;
        let (keys, values, expiries) = columns(batch);
        let deadline = deadline_after(self.shared.operation_timeout);
        self.shared
            .fence
            .clear(keys.iter().map(String::as_str), deadline, op)
            .await?;
        let client = self.shared.client(op, abandon).await?;
        let stmt = prepare(&client, &self.shared.sql.set_many, op).await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&keys, &values, &expiries, &deadline];
        run_fenced(&self.shared, &client, &stmt, &params, keys.clone(), deadline, op).await?;
        Ok(())
    }

    /// One `DELETE … WHERE key = ANY($1)`, counting the live rows it deleted.
    async fn delete_many_unbounded(&self, keys: &[K], abandon: Abandon) -> Result<u64> {
        let op = Operation::DeleteMany;
        if keys.is_empty() {
            self.shared.check_open(op)?;
            return Ok(0);
        }
        let mut texts = Vec::with_capacity(keys.len());
        for key in keys {
            let bytes = key.encode_key();
            texts.push(self.key_text(&bytes, op)?.into_owned());
        }
        let deadline = deadline_after(self.shared.operation_timeout);
        self.shared
            .fence
            .clear(texts.iter().map(String::as_str), deadline, op)
            .await?;
        let client = self.shared.client(op, abandon).await?;
        let stmt = prepare(&client, &self.shared.sql.delete_many, op).await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&texts, &self.shared.now(), &deadline];
        let row = run_fenced(&self.shared, &client, &stmt, &params, texts.clone(), deadline, op).await?;
        let count: i64 = row.try_get(1).map_err(|e| pg_error(op, e))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// One transaction: all of `ops` or none. Values are encoded and checked against
    /// `max_value_bytes` before the transaction starts, with TTLs from one reading of the
    /// clock. As within any transaction, only the last write to a key counts, so the ops
    /// are sent as one upsert and one delete, whatever their number. Isolation: PostgreSQL's
    /// default (read committed); concurrent batches lock rows in key order.
    async fn apply_atomic_unbounded(&self, ops: &[WriteOp<K, V>], abandon: Abandon) -> Result<()> {
        let op = Operation::Transaction;
        if ops.is_empty() {
            self.shared.check_open(op)?;
            return Ok(());
        }
        let batch = self.encode_batch(
            ops.iter().map(|w| match w {
                WriteOp::Set { key, value, ttl } => (key, Some((value, *ttl))),
                WriteOp::Delete { key } => (key, None),
            }),
            op,
        )?;
        let mut deletes = Vec::new();
        let mut upserts = BTreeMap::new();
        for (key, write) in batch {
            match write {
                Some(write) => {
                    upserts.insert(key, Some(write));
                }
                None => deletes.push(key),
            }
        }
        let (keys, values, expiries) = columns(upserts);
        let deadline = deadline_after(self.shared.operation_timeout);
        let all = keys.iter().chain(deletes.iter()).map(String::as_str);
        self.shared.fence.clear(all, deadline, op).await?;
        let client = self.shared.client(op, abandon).await?;
        let stmt = prepare(&client, &self.shared.sql.apply, op).await?;
        let touched: Vec<String> = keys.iter().chain(deletes.iter()).cloned().collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&keys, &values, &expiries, &deletes, &deadline];
        run_fenced(&self.shared, &client, &stmt, &params, touched, deadline, op).await?;
        Ok(())
    }
}

#[async_trait]
impl<K, V, C> Layer<K, V> for PostgresLayer<K, V, C>
where
    K: StorageKey + Clone + Send + Sync + 'static,
    V: Send + Sync + Clone + 'static,
    C: Codec<V>,
{
    fn name(&self) -> &str {
        "postgres"
    }

    fn capabilities(&self) -> Capabilities {
        let caps = Capabilities::new()
            .with_scan()
            .with_transactions()
            .with_persistence();
        if self.shared.sql.tags.is_some() {
            caps.with_tags()
        } else {
            caps
        }
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        self.shared
            .bounded(Operation::Get, |abandon| self.get_unbounded(key, abandon))
            .await
    }

    /// Refuses what [`set`](Layer::set) would refuse before sending anything: a key that is
    /// not valid in the key format or longer than [`MAX_KEY_BYTES`], a value larger than
    /// [`max_value_bytes`](crate::PostgresLayerBuilder::max_value_bytes) once encoded, a value
    /// the codec cannot encode.
    fn check_write(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        let op = Operation::Set;
        let bytes = key.encode_key();
        self.write_key_text(&bytes, op)?;
        self.encode(value, expiry_for(self.shared.clock.now(), ttl), op)
            .map(drop)
    }

    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.shared
            .bounded(Operation::Set, |abandon| {
                self.set_unbounded(key, value, ttl, abandon)
            })
            .await
    }

    async fn delete(&self, key: &K) -> Result<bool> {
        self.shared
            .bounded(Operation::Delete, |abandon| self.delete_unbounded(key, abandon))
            .await
    }

    async fn exists(&self, key: &K) -> Result<bool> {
        self.shared
            .bounded(Operation::Exists, |abandon| self.exists_unbounded(key, abandon))
            .await
    }

    /// Lazy keyset pagination over the key range of `prefix`, in key (byte) order, one
    /// page of [`scan_page_size`](crate::PostgresLayerBuilder::scan_page_size) rows in memory at
    /// a time, each page a separate statement (so a long scan holds no transaction open
    /// and sees writes made while it runs, page by page). A value or key that does not
    /// decode is yielded as an [`ErrorKind::Decode`] item and the stream goes on (a scan
    /// does not write). A failed page ends the stream with that error. After the layer
    /// is closed the stream yields one [`ErrorKind::Closed`] item and ends.
    fn scan(&self, prefix: &[u8]) -> Result<EntryStream<K, V>> {
        self.shared.check_open(Operation::Scan)?;
        Ok(Box::pin(ScanStream::<K, V, C>::new(
            Arc::clone(&self.shared),
            prefix,
        )))
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        self.shared
            .bounded(Operation::GetMany, |abandon| {
                self.get_many_unbounded(keys, abandon)
            })
            .await
    }

    async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        self.shared
            .bounded(Operation::SetMany, |abandon| {
                self.set_many_unbounded(entries, ttl, abandon)
            })
            .await
    }

    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        self.shared
            .bounded(Operation::DeleteMany, |abandon| {
                self.delete_many_unbounded(keys, abandon)
            })
            .await
    }

    /// The row and its tags in one statement: `INSERT … ON CONFLICT (key) DO UPDATE` on
    /// the table, the key's other tag rows deleted and the new ones inserted in the tag
    /// table. [`ErrorKind::Unsupported`] unless built with
    /// [`tags(true)`](crate::PostgresLayerBuilder::tags); [`ErrorKind::InvalidInput`]
    /// before anything is sent for an empty tag, one longer than
    /// [`MAX_TAG_BYTES`](capacitor_core::MAX_TAG_BYTES), one with a NUL byte, or a key and
    /// tag longer together than [`MAX_KEY_AND_TAG_BYTES`].
    async fn set_tagged(&self, key: &K, value: &V, ttl: Option<Duration>, tags: &[String]) -> Result<()> {
        self.shared
            .bounded(Operation::Set, |abandon| {
                self.set_tagged_unbounded(key, value, ttl, tags, abandon)
            })
            .await
    }

    /// One statement: the rows of the keys carrying `tag` deleted (their tag rows with
    /// them, by the foreign key's cascade), those keys returned, expired ones included.
    /// [`ErrorKind::Unsupported`] unless built with
    /// [`tags(true)`](crate::PostgresLayerBuilder::tags).
    async fn remove_by_tag(&self, tag: &str) -> Result<Vec<K>> {
        self.shared
            .bounded(Operation::DeleteMany, |abandon| {
                self.remove_by_tag_unbounded(tag, abandon)
            })
            .await
    }

    /// One `DELETE FROM` the table (and the tag table): all rows or none, in one round
    /// trip, instead of the default's scan and batched deletes; bounded by the operation
    /// timeout like any statement, which a very large table may need raised. Row locks,
    /// not `TRUNCATE`'s table lock: readers and writers of other instances go on.
    async fn clear(&self) -> Result<()> {
        self.shared
            .bounded(Operation::Clear, |abandon| self.clear_unbounded(abandon))
            .await
    }

    async fn apply_atomic(&self, ops: &[WriteOp<K, V>]) -> Result<()> {
        self.shared
            .bounded(Operation::Transaction, |abandon| {
                self.apply_atomic_unbounded(ops, abandon)
            })
            .await
    }
    /// Nothing to do: every write is durable when it returns (committed). Fails with
    /// [`ErrorKind::Closed`] after close.
    async fn flush(&self) -> Result<()> {
        self.shared.check_open(Operation::Flush)
    }

    /// Stops the sweeper and closes the pool: idle connections are closed at once, those
    /// in use when their operation ends. Idempotent.
    async fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.shared.stop.stop();
        self.shared.pool.close();
        Ok(())
    }
}

/// Runs one fenced write statement (first column: whether it started before `deadline`)
/// and returns its row: `keys` stay in doubt unless the server answered, and a statement
/// the server skipped as late is a [`too_late`] error.
async fn run_fenced<C>(
    shared: &Shared<C>,
    client: &Conn,
    stmt: &Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    keys: Vec<String>,
    deadline: SystemTime,
    op: Operation,
) -> Result<tokio_postgres::Row> {
    let sent = shared.fence.in_flight(keys, deadline);
    match client.query_one(stmt, params).await {
        Ok(row) => {
            sent.settled();
            fenced(&row, op)?;
            Ok(row)
        }
        Err(e) => {
            settle_if_answered(sent, &e);
            Err(pg_error(op, e))
        }
    }
}

/// The error of a tag operation on a layer built without tags.
fn no_tags(op: Operation) -> Error {
    Error::unsupported(
        op,
        "this PostgresLayer keeps no tags; build it with PostgresLayerBuilder::tags(true)",
    )
}

/// Settles `sent` on an answer from the server (a database error rolled the statement
/// back); leaves its keys in doubt on any other failure (the connection broke: the
/// statement may have run).
fn settle_if_answered(sent: InFlight<'_>, err: &tokio_postgres::Error) {
    if err.as_db_error().is_some() {
        sent.settled();
    }
}

/// Fails when a fenced statement (first column: whether it started before its deadline)
/// was skipped.
fn fenced(row: &tokio_postgres::Row, op: Operation) -> Result<()> {
    let in_time: bool = row.try_get(0).map_err(|e| pg_error(op, e))?;
    if in_time {
        Ok(())
    } else {
        Err(too_late(op))
    }
}

/// The three arrays of `unnest($1::text[], $2::bytea[], $3::timestamptz[])`.
type Columns = (Vec<String>, Vec<Vec<u8>>, Vec<Option<SystemTime>>);

fn columns(batch: Batch) -> Columns {
    let mut keys = Vec::with_capacity(batch.len());
    let mut values = Vec::with_capacity(batch.len());
    let mut expiries = Vec::with_capacity(batch.len());
    for (key, (value, expires_at)) in batch.into_iter().filter_map(|(k, w)| Some((k, w?))) {
        keys.push(key);
        values.push(value);
        expiries.push(expires_at);
    }
    (keys, values, expiries)
}
