//! [`RedisLayer`] and its [`Layer`] implementation.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use capacitor_core::fence::{deadline_after, too_late};
use capacitor_core::{
    async_trait, envelope, expiry_for, Capabilities, Codec, DefaultCodec, Entry, EntryStream, Error,
    ErrorKind, Layer, Operation, Result, StorageKey, Timestamp, WriteOp,
};
use fred::prelude::{ClientLike, Key, KeysInterface, Options, Value};

use crate::core::{fetch_values, px_millis, value_bytes, SetArgs, Shared, EXISTS_SCRIPT, WRITE_SCRIPT};
use crate::error::redis_error;
use crate::scan::scan_stream;

/// A remote cache layer on Redis (through [fred](https://docs.rs/fred)): a shared L2 for
/// every app instance, with native TTLs, batches in one round trip (on a single server),
/// `SCAN` and all-or-nothing batches.
///
/// Built by [`RedisLayer::builder`]. Cheap to share behind an `Arc`; every clone of the
/// pool is closed by [`close`](Layer::close).
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), capacitor::Error> {
/// use std::time::Duration;
/// use capacitor::redis::RedisLayer;
/// use capacitor::Layer;
///
/// # let url = std::env::var("CAPACITOR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
/// // The default URL, redis://127.0.0.1:6379.
/// let redis = RedisLayer::builder()
/// #   .url(&url)
///     .prefix("doc:redislayer:")
///     .build::<String, u64>()?;
/// redis.connect().await?;
/// // The write script's SET doc:redislayer:user:42 … PX 60000
/// redis.set(&"user:42".to_string(), &7, Some(Duration::from_secs(60))).await?;
/// assert_eq!(redis.get(&"user:42".to_string()).await?.map(|e| e.value), Some(7));
/// redis.delete(&"user:42".to_string()).await?;
/// redis.close().await?;
/// # Ok(()) }
/// ```
pub struct RedisLayer<K, V, C = DefaultCodec> {
    pub(crate) shared: Arc<Shared<C>>,
    pub(crate) _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V, C> fmt::Debug for RedisLayer<K, V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLayer")
            .field("prefix", &String::from_utf8_lossy(&self.shared.prefix))
            .field("clustered", &self.shared.clustered)
            .field("pool_size", &self.shared.pool.size())
            .field("closed", &self.shared.is_closed())
            .finish_non_exhaustive()
    }
}

impl<K, V, C> RedisLayer<K, V, C> {
    /// Waits until a connection is up, then checks it with `PING`. Use it to fail at
    /// start-up when Redis is down; without it the layer connects in the background.
    ///
    /// It fails as soon as a connection attempt made while it waits fails (a refused
    /// connection, an unknown host, credentials or a database index the server refuses),
    /// naming that cause; at once when no attempt is coming (`Reconnect::Never` after its
    /// one attempt); else after the connect timeout. An older error (one a restarted
    /// server left behind) or a lost connection does not fail it: the clients may be
    /// about to reconnect. Either way they keep reconnecting in the background (unless
    /// `Reconnect::Never`), so it can be called again.
    ///
    /// # Errors
    ///
    /// `Unavailable` when no connection is up (the failed attempt's error is its source),
    /// the `PING`'s error otherwise, `Closed` after close.
    pub async fn connect(&self) -> Result<()> {
        let shared = &self.shared;
        shared
            .health
            .wait_connected(
                Operation::Connect,
                shared.connect_timeout,
                || shared.any_connected(),
                || shared.is_closed(),
                || shared.connections_ended(),
            )
            .await
            .map_err(|e| e.with_layer("redis"))?;
        self.health_check().await.map_err(|e| e.with_layer("redis"))
    }

    /// One `PING` now, failing fast when no connection is up.
    ///
    /// # Errors
    ///
    /// `Unavailable` when not connected, `Timeout`, `Closed` after close.
    pub async fn health_check(&self) -> Result<()> {
        self.shared
            .run(Operation::Connect, |c| async move { c.ping::<Value>(None).await })
            .await
            .map(|_| ())
    }

    /// Whether at least one pooled connection is up.
    pub fn is_connected(&self) -> bool {
        !self.shared.is_closed() && self.shared.any_connected()
    }

    /// The namespace prefix of every key.
    pub fn prefix(&self) -> &[u8] {
        &self.shared.prefix
    }

    /// Whether the layer talks to a Redis Cluster.
    pub fn is_clustered(&self) -> bool {
        self.shared.clustered
    }
}

impl<K, V, C> RedisLayer<K, V, C>
where
    K: StorageKey,
    V: Send + Sync + 'static,
    C: Codec<V>,
{
    /// `envelope(expiry, codec(value))`, checking the size limit first.
    fn encode(&self, value: &V, expires_at: Option<Timestamp>, op: Operation) -> Result<Value> {
        let sealed = envelope::seal(
            &self.shared.codec,
            value,
            expires_at,
            self.shared.max_value_bytes,
            op,
        )?;
        Ok(Value::from(sealed.into_boxed_slice()))
    }

    fn key(&self, key: &K) -> Key {
        self.shared.redis_key(&key.encode_key())
    }

    /// Encodes a write: the key, the stored value and its `PX`.
    fn encode_set(&self, key: &K, value: &V, ttl: Option<Duration>, op: Operation) -> Result<SetArgs> {
        let expires_at = expiry_for(self.shared.clock.now(), ttl);
        let stored = self.encode(value, expires_at, op)?;
        Ok((self.key(key), stored, ttl.map(px_millis)))
    }

    /// Runs [`WRITE_SCRIPT`] for `sets` and `deletes` (in a cluster, all their keys must
    /// share a slot), fenced by the command timeout's end; how many keys it deleted.
    async fn write_fenced(&self, op: Operation, sets: Vec<SetArgs>, deletes: Vec<Key>) -> Result<u64> {
        let mut batches = vec![(sets, deletes)];
        self.write_fenced_batches(op, &mut batches).await
    }

    /// [`write_fenced`](Self::write_fenced) for several independent scripts, sent one
    /// after another (in a cluster each to its slot's node): one fence for all of them.
    async fn write_fenced_batches(
        &self,
        op: Operation,
        batches: &mut Vec<(Vec<SetArgs>, Vec<Key>)>,
    ) -> Result<u64> {
        use std::time::UNIX_EPOCH;
        let deadline = deadline_after(self.shared.command_timeout);
        let deadline_ms = deadline
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut names = Vec::new();
        let mut calls = Vec::with_capacity(batches.len());
        for (sets, deletes) in batches.drain(..) {
            let mut keys: Vec<Key> = Vec::with_capacity(sets.len() + deletes.len());
            let mut args: Vec<Value> = Vec::with_capacity(2 + 2 * sets.len());
            args.push(Value::from(deadline_ms.to_string()));
            args.push(Value::from(sets.len().to_string()));
            for (k, v, px) in sets {
                keys.push(k);
                args.push(v);
                args.push(Value::from(px.map(|ms| ms.to_string()).unwrap_or_default()));
            }
            keys.extend(deletes);
            names.extend(
                keys.iter()
                    .map(|k| String::from_utf8_lossy(k.as_bytes()).into_owned()),
            );
            calls.push((keys, args));
        }
        self.shared
            .fence
            .clear(names.iter().map(String::as_str), deadline, op)
            .await?;
        let sent = self.shared.fence.in_flight(names, deadline);
        let replies = self
            .shared
            .run(op, |c| async move {
                if calls.len() == 1 {
                    let (keys, args) = calls.remove(0);
                    return Ok(vec![WRITE_SCRIPT.run::<i64>(&c, keys, args).await]);
                }
                // fred does not pipeline scripts: sent one after another on this client
                // (in a cluster each to its slot's node).
                let mut replies = Vec::with_capacity(calls.len());
                for (keys, args) in calls {
                    replies.push(WRITE_SCRIPT.run::<i64>(&c, keys, args).await);
                }
                Ok(replies)
            })
            .await;
        let replies = match replies {
            Ok(replies) => replies,
            Err(e) => {
                // A reply (an error Redis sent) settles it; a timeout or a lost connection
                // leaves the keys in doubt until the deadline has passed.
                if !matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Unavailable) {
                    sent.settled();
                }
                return Err(e);
            }
        };
        let mut deleted = 0u64;
        let mut late = false;
        let mut first_error = None;
        for reply in replies {
            match reply {
                Ok(n) if n < 0 => late = true,
                Ok(n) => deleted += u64::try_from(n).unwrap_or(0),
                Err(e) => {
                    first_error.get_or_insert(redis_error(op, e));
                }
            }
        }
        sent.settled();
        if let Some(err) = first_error {
            return Err(err);
        }
        if late {
            return Err(too_late(op));
        }
        Ok(deleted)
    }

    /// Decodes one `GET` reply, evicting what does not decode (a value of a codec this
    /// layer does not read is left in place: another deployment's).
    async fn decode_reply(&self, key: Key, reply: &Value, op: Operation) -> Result<Option<Entry<V>>> {
        let Some(bytes) = value_bytes(reply) else {
            return Ok(None);
        };
        match self.shared.decode(bytes, op) {
            Ok(entry) => Ok(entry),
            Err(err) => {
                if !envelope::is_foreign(&self.shared.codec, bytes) {
                    self.shared.evict(key, Some(bytes.to_vec())).await;
                }
                Err(err)
            }
        }
    }
}

#[async_trait]
impl<K, V, C> Layer<K, V> for RedisLayer<K, V, C>
where
    K: StorageKey,
    V: Send + Sync + 'static,
    C: Codec<V>,
{
    fn name(&self) -> &str {
        "redis"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
            .with_scan()
            .with_transactions()
            .with_native_ttl()
    }

    /// `GET`. A value that is not capacitor's envelope, does not decode, or a key holding
    /// another Redis type (`WRONGTYPE`) fails with [`ErrorKind::Decode`]; with a prefix, the
    /// key is deleted (unless rewritten meanwhile).
    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        let op = Operation::Get;
        let _guard = self.shared.in_flight.read().await;
        let rkey = self.key(key);
        let k = rkey.clone();
        let reply = self
            .shared
            .run(op, |c| async move { c.get::<Value, _>(k).await })
            .await;
        match reply {
            Ok(reply) => self.decode_reply(rkey, &reply, op).await,
            Err(err) if err.kind() == ErrorKind::Decode => {
                self.shared.evict(rkey, None).await;
                Err(err)
            }
            Err(err) => Err(err),
        }
    }

    /// Refuses what [`set`](Layer::set) would refuse before sending anything: a value
    /// larger than `max_value_bytes` once encoded, or one the codec cannot encode.
    fn check_write(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.encode_set(key, value, ttl, Operation::Set).map(drop)
    }

    /// `SET key value [PX ttl]`, in the fenced write script.
    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        let op = Operation::Set;
        let write = self.encode_set(key, value, ttl, op)?;
        let _guard = self.shared.in_flight.read().await;
        self.write_fenced(op, vec![write], Vec::new()).await.map(drop)
    }

    /// `DEL key`, in the fenced write script.
    async fn delete(&self, key: &K) -> Result<bool> {
        let op = Operation::Delete;
        let _guard = self.shared.in_flight.read().await;
        let k = self.key(key);
        Ok(self.write_fenced(op, Vec::new(), vec![k]).await? > 0)
    }

    /// Whether `get` would find a value, in one script and without sending the value:
    /// `false` for no key; [`ErrorKind::Decode`] for a key of another Redis type (removed,
    /// as `get` removes it), a string that is not capacitor's envelope, or a value of a
    /// codec this layer does not read (kept), as `get` reports.
    async fn exists(&self, key: &K) -> Result<bool> {
        let op = Operation::Exists;
        let _guard = self.shared.in_flight.read().await;
        let rkey = self.key(key);
        let k = rkey.clone();
        let header = Value::from(capacitor_core::envelope::HEADER_LEN as i64);
        let reply: Value = self
            .shared
            .run(op, |c| async move {
                EXISTS_SCRIPT.run::<Value>(&c, vec![k], vec![header]).await
            })
            .await?;
        let foreign = |what: &str| Error::new(ErrorKind::Decode, op, format!("the key holds {what}"));
        match reply {
            Value::Null => Ok(false),
            Value::Integer(_) => {
                // As `get` does: a key of another type under the prefix is removed.
                self.shared.evict(rkey, None).await;
                Err(foreign("another Redis type, not a value written by capacitor"))
            }
            reply => match value_bytes(&reply) {
                Some(header) if envelope::is_ours(header) => {
                    // A value of a codec this layer does not read is no hit for `get`
                    // either: a Decode error, and the value stays, as `get` leaves it.
                    envelope::open_readable(&self.shared.codec, header)
                        .map(|_| true)
                        .map_err(|e| e.with_operation(op))
                }
                _ => Err(foreign("a value not written by capacitor")),
            },
        }
    }

    /// One `MGET` (in a cluster, one pipeline of `GET`s, routed per slot by fred). `MGET`
    /// answers nil for a key of another type, which is then a miss. When some values do
    /// not decode, those are evicted and the call fails with [`ErrorKind::Decode`].
    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        let op = Operation::GetMany;
        let _guard = self.shared.in_flight.read().await;
        if keys.is_empty() {
            return if self.shared.is_closed() {
                Err(Error::closed(op))
            } else {
                Ok(Vec::new())
            };
        }
        let rkeys: Vec<Key> = keys.iter().map(|k| self.key(k)).collect();
        let replies = fetch_values(&self.shared, op, rkeys.clone()).await?;
        let mut out = Vec::with_capacity(keys.len());
        let mut first_error: Option<Error> = None;
        let mut bad = 0usize;
        for (rkey, reply) in rkeys.into_iter().zip(replies.iter()) {
            match self.decode_reply(rkey, reply, op).await {
                Ok(entry) => out.push(entry),
                Err(err) => {
                    bad += 1;
                    first_error.get_or_insert(err);
                    out.push(None);
                }
            }
        }
        match first_error {
            None => Ok(out),
            Some(err) if bad == 1 => Err(err),
            Some(err) => Err(Error::new(
                ErrorKind::Decode,
                op,
                format!(
                    "{bad} stored values did not decode (evicted, unless another codec wrote them); first: {}",
                    err.message()
                ),
            )
            .with_source(err)),
        }
    }

    /// On a single server, one fenced write script setting every key (`SET … PX`, one
    /// round trip); in a cluster, one script per key, sent one after another, each to its
    /// slot's node. Not atomic (in a cluster some keys may be written when another
    /// fails): use [`apply_atomic`](Layer::apply_atomic) for all-or-nothing. Values are
    /// encoded and size-checked before anything is sent.
    async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        let op = Operation::SetMany;
        let mut writes = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            writes.push(self.encode_set(key, value, ttl, op)?);
        }
        let _guard = self.shared.in_flight.read().await;
        if writes.is_empty() {
            return if self.shared.is_closed() {
                Err(Error::closed(op))
            } else {
                Ok(())
            };
        }
        if !self.shared.clustered {
            return self.write_fenced(op, writes, Vec::new()).await.map(drop);
        }
        let mut batches = writes.into_iter().map(|w| (vec![w], Vec::new())).collect();
        self.write_fenced_batches(op, &mut batches).await.map(drop)
    }

    /// On a single server, one fenced write script deleting every key (one round trip);
    /// in a cluster, one script per key, sent one after another, each to its slot's node.
    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        let op = Operation::DeleteMany;
        let _guard = self.shared.in_flight.read().await;
        if keys.is_empty() {
            return if self.shared.is_closed() {
                Err(Error::closed(op))
            } else {
                Ok(0)
            };
        }
        let mut rkeys: Vec<Key> = keys.iter().map(|k| self.key(k)).collect();
        rkeys.dedup();
        if !self.shared.clustered {
            return self.write_fenced(op, Vec::new(), rkeys).await;
        }
        let mut batches = rkeys.into_iter().map(|k| (Vec::new(), vec![k])).collect();
        self.write_fenced_batches(op, &mut batches).await
    }

    /// `SCAN … MATCH <prefix>* COUNT n` (glob characters in the prefix escaped), lazily:
    /// one page of keys and its values (one `MGET`) in memory at a time; in a cluster,
    /// each primary in turn. Expired and vanished keys are skipped; a key or value that
    /// does not decode is yielded as an [`ErrorKind::Decode`] item and the scan goes on.
    /// Like `SCAN`, a key written during the scan may or may not be seen.
    fn scan(&self, prefix: &[u8]) -> Result<EntryStream<K, V>> {
        if self.shared.is_closed() {
            return Err(Error::closed(Operation::Scan));
        }
        Ok(scan_stream::<K, V, C>(Arc::clone(&self.shared), prefix))
    }

    /// One fenced script of `SET … PX` and `DEL` (scripts run atomically): all or nothing. In a
    /// cluster every key must hash to one slot (put a hash tag in the prefix, `app:{x}:`),
    /// else Redis refuses the batch (`CROSSSLOT`) and nothing is applied.
    async fn apply_atomic(&self, ops: &[WriteOp<K, V>]) -> Result<()> {
        let op = Operation::Transaction;
        // As in any transaction only the last write of a key counts (the script runs its
        // sets before its deletes, so each key must appear once).
        let mut last: std::collections::HashMap<Key, Option<SetArgs>> = std::collections::HashMap::new();
        let mut order = Vec::new();
        for w in ops {
            let k = self.key(w.key());
            let write = match w {
                WriteOp::Set { key, value, ttl } => Some(self.encode_set(key, value, *ttl, op)?),
                WriteOp::Delete { .. } => None,
            };
            if last.insert(k.clone(), write).is_none() {
                order.push(k);
            }
        }
        let mut sets: Vec<SetArgs> = Vec::new();
        let mut deletes: Vec<Key> = Vec::new();
        for k in order {
            match last.remove(&k).flatten() {
                Some(set) => sets.push(set),
                None => deletes.push(k),
            }
        }
        let _guard = self.shared.in_flight.read().await;
        if sets.is_empty() && deletes.is_empty() {
            return if self.shared.is_closed() {
                Err(Error::closed(op))
            } else {
                Ok(())
            };
        }
        self.write_fenced(op, sets, deletes).await.map(drop)
    }

    /// Waits for the operations in flight; Redis has nothing more to make durable here
    /// (persistence is the server's configuration).
    async fn flush(&self) -> Result<()> {
        let _all = self.shared.in_flight.write().await;
        if self.shared.is_closed() {
            return Err(Error::closed(Operation::Flush));
        }
        Ok(())
    }

    /// Refuses new operations, waits for those in flight, then disconnects (stopping the
    /// reconnection loop). Idempotent.
    async fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let _all = self.shared.in_flight.write().await;
        // A pooled client that is not connected (still connecting, or Redis is down) would
        // hold a plain QUIT until it connects or the command times out (fred queues
        // commands while `fail_fast` is off, which the layer needs to keep retrying at
        // start-up): it gets a fail-fast QUIT, which returns at once, and aborting the
        // connection tasks below ends its reconnection loop.
        let fail_fast = Options {
            fail_fast: true,
            ..Options::default()
        };
        let fail_fast = &fail_fast;
        let quits = self.shared.pool.clients().iter().map(|client| async move {
            if client.is_connected() {
                client.quit().await
            } else {
                let _ = client.with_options(fail_fast).quit().await;
                Ok(())
            }
        });
        let quit = tokio::time::timeout(self.shared.command_timeout, futures::future::join_all(quits)).await;
        // A connection that was down is still in its reconnection loop: end it.
        self.shared.stop_connections();
        match quit {
            Ok(results) => results
                .into_iter()
                .find_map(std::result::Result::err)
                .map_or(Ok(()), |e| Err(redis_error(Operation::Close, e))),
            Err(_) => Ok(()),
        }
    }
}
