//! [`RedisLayer`] and its [`Layer`] implementation.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capacitor_core::{
    async_trait, envelope, expiry_for, BincodeCodec, Capabilities, Codec, Entry, EntryStream, Error,
    ErrorKind, Layer, Operation, Result, SharedClock, StorageKey, Timestamp, WriteOp,
};
use fred::clients::{Client, Pool};
use fred::error::Error as FredError;
use fred::prelude::{ClientLike, Key, KeysInterface, LuaInterface, Options, Value};

use capacitor_core::fence::{deadline_after, too_late};

use crate::config::RedisLayerBuilder;
use crate::error::{redis_error, timeout_error, unavailable};
use crate::scan::scan_stream;

/// Deletes `KEYS[1]` when it holds a non-string type, or (with `ARGV[1]`) when it still
/// holds exactly the bytes that failed to decode, so that a write racing the read stays.
const EVICT_SCRIPT: &str = r"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return 0 end
if t ~= 'string' then return redis.call('DEL', KEYS[1]) end
if ARGV[1] ~= nil and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Every write: sets the first `ARGV[2]` keys (value `ARGV[1+2i]`, `PX` `ARGV[2+2i]` or none
/// when empty) and deletes the remaining keys, all or nothing (a script runs atomically),
/// but only if the server's clock is before the deadline `ARGV[1]` (ms since the epoch).
/// Returns -1 when late, else how many keys it deleted. The deadline fence (see
/// `capacitor_core::fence`) is what keeps a write that timed out, or that fred resends
/// after a reconnection, from landing after a later acknowledged write of the key.
const WRITE_SCRIPT: &str = r"
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) >= tonumber(ARGV[1]) then
  return -1
end
local n = tonumber(ARGV[2])
for i = 1, n do
  local px = ARGV[2 + 2 * i]
  if px == '' then
    redis.call('SET', KEYS[i], ARGV[1 + 2 * i])
  else
    redis.call('SET', KEYS[i], ARGV[1 + 2 * i], 'PX', px)
  end
end
local deleted = 0
for i = n + 1, #KEYS do
  deleted = deleted + redis.call('DEL', KEYS[i])
end
return deleted
";

/// `exists` as `get` sees it: nil for no key, -1 for a key of another Redis type, else
/// the first bytes of the string (the envelope's header, checked by the caller).
const EXISTS_SCRIPT: &str = r"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return false end
if t ~= 'string' then return -1 end
return redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
";

/// The SHA-1 of [`WRITE_SCRIPT`]: writes send `EVALSHA` (Redis does not hash and look up
/// the script's text on every call, about 8 µs per write on loopback), and `EVAL` only
/// when the server does not know the script yet (`NOSCRIPT`: a new or restarted server).
static WRITE_SHA: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| sha1_smol::Sha1::from(WRITE_SCRIPT).digest().to_string());

/// Runs [`WRITE_SCRIPT`] by its hash, loading it with `EVAL` when the server lacks it.
/// (A `NOSCRIPT` reply means nothing ran: sending the script again is safe.)
async fn run_write_script(
    c: Client,
    keys: Vec<Key>,
    args: Vec<Value>,
) -> std::result::Result<i64, FredError> {
    match c
        .evalsha::<i64, _, _, _>(WRITE_SHA.as_str(), keys.clone(), args.clone())
        .await
    {
        Err(e) if e.details().starts_with("NOSCRIPT") => {
            c.eval::<i64, _, _, _>(WRITE_SCRIPT, keys, args).await
        }
        result => result,
    }
}

/// One set for [`WRITE_SCRIPT`]: the key, the stored bytes, the `PX` in ms.
type SetArgs = (Key, Value, Option<u64>);

/// The longest `PX` sent: about 31 700 years. Longer TTLs (up to `Duration::MAX`) are cut
/// to this, which Redis accepts (it refuses expiries that overflow its clock).
const MAX_PX_MILLIS: u64 = 1_000_000_000_000_000;

/// What the layer and its scan streams share.
pub(crate) struct Shared<C> {
    pub(crate) pool: Pool,
    pub(crate) clustered: bool,
    pub(crate) prefix: Vec<u8>,
    pub(crate) codec: C,
    pub(crate) clock: SharedClock,
    pub(crate) max_value_bytes: usize,
    pub(crate) command_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) scan_count: u32,
    pub(crate) closed: AtomicBool,
    /// Each operation holds a read guard while it runs; `flush` and `close` take the write
    /// guard, which waits for every operation in flight.
    pub(crate) in_flight: tokio::sync::RwLock<()>,
    /// fred's connection tasks, one per pooled client: they reconnect for as long as they
    /// run, so `close` (or dropping the layer) aborts them.
    pub(crate) connections: std::sync::Mutex<Vec<fred::types::ConnectHandle>>,
    /// Keys whose last write may still be applied (see `WRITE_SCRIPT`).
    pub(crate) fence: capacitor_core::fence::WriteFence,
}

impl<C> Shared<C> {
    /// Aborts the connection tasks (and their reconnection loops).
    pub(crate) fn stop_connections(&self) {
        let tasks = std::mem::take(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for task in tasks {
            task.abort();
        }
    }
}

impl<C> Shared<C> {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// A connected client, or `Unavailable` at once (never waits for a reconnection).
    pub(crate) fn client(&self, op: Operation) -> Result<Client> {
        if self.is_closed() {
            return Err(Error::closed(op));
        }
        let client = self.pool.next_connected();
        if !client.is_connected() {
            return Err(unavailable(op));
        }
        Ok(client.clone())
    }

    /// Runs `f` on a connected client within the command timeout.
    pub(crate) async fn run<T, F, Fut>(&self, op: Operation, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, FredError>>,
    {
        let client = self.client(op)?;
        match tokio::time::timeout(self.command_timeout, f(client)).await {
            Ok(result) => result.map_err(|e| redis_error(op, e)),
            Err(_) => Err(timeout_error(op, self.command_timeout)),
        }
    }

    /// The Redis key of `key`: the prefix, then the key's bytes.
    pub(crate) fn redis_key(&self, key: &[u8]) -> Key {
        let mut bytes = Vec::with_capacity(self.prefix.len() + key.len());
        bytes.extend_from_slice(&self.prefix);
        bytes.extend_from_slice(key);
        Key::from(bytes.into_boxed_slice())
    }

    /// Decodes stored bytes; `Ok(None)` when the envelope says the entry has expired.
    pub(crate) fn decode<V>(&self, bytes: &[u8], op: Operation) -> Result<Option<Entry<V>>>
    where
        C: Codec<V>,
    {
        let (expires_at, payload) = envelope::unwrap(bytes).map_err(|e| e.with_operation(op))?;
        let entry = Entry::new((), expires_at);
        if entry.is_expired(self.clock.now()) {
            return Ok(None);
        }
        let value = self.codec.decode(payload).map_err(|e| e.with_operation(op))?;
        Ok(Some(Entry::new(value, expires_at)))
    }

    /// Deletes a key that did not decode, when the layer owns its namespace (a non-empty
    /// prefix): a non-string key, or a string key still holding `bytes`. Best effort: the
    /// read reports what it found, not a failed cleanup.
    pub(crate) async fn evict(&self, key: Key, bytes: Option<Vec<u8>>) {
        if self.prefix.is_empty() {
            return;
        }
        let args: Vec<Value> = bytes
            .map(|b| Value::from(b.into_boxed_slice()))
            .into_iter()
            .collect();
        let _ = self
            .run(Operation::Delete, |c| async move {
                c.eval::<Value, _, _, _>(EVICT_SCRIPT, key, args).await
            })
            .await;
    }
}

impl<C> Drop for Shared<C> {
    /// A layer dropped without `close` would leave fred's connection tasks reconnecting
    /// forever: aborting them drops their sockets, which closes the connections.
    fn drop(&mut self) {
        self.stop_connections();
    }
}

/// A value as Redis returned it: `None` for nil.
pub(crate) fn value_bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::Null => None,
        other => other.as_bytes(),
    }
}

/// A remote cache layer on Redis (through [fred](https://docs.rs/fred)): a shared L2 for
/// every app instance, with native TTLs, pipelined batches, `SCAN` and `MULTI`/`EXEC`.
///
/// Built by [`RedisLayer::builder`]. Cheap to share behind an `Arc`; every clone of the
/// pool is closed by [`close`](Layer::close).
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), capacitor_core::Error> {
/// use std::time::Duration;
/// use capacitor_core::Layer;
/// use capacitor_redis::RedisLayer;
///
/// let redis = RedisLayer::builder().prefix("app:").build::<String, u64>()?;
/// redis.connect().await?;
/// redis.set(&"user:42".to_string(), &7, Some(Duration::from_secs(60))).await?; // SET app:user:42 … PX 60000
/// assert_eq!(redis.get(&"user:42".to_string()).await?.map(|e| e.value), Some(7));
/// redis.close().await?;
/// # Ok(()) }
/// ```
pub struct RedisLayer<K, V, C = BincodeCodec> {
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

impl RedisLayer<(), ()> {
    /// A builder with every option at its default.
    pub fn builder() -> RedisLayerBuilder {
        RedisLayerBuilder::default()
    }
}

impl<K, V, C> RedisLayer<K, V, C> {
    /// Waits until a connection is up (at most the connect timeout), then checks it with
    /// `PING`. Use it to fail at start-up when Redis is down; without it the layer
    /// connects in the background.
    ///
    /// # Errors
    ///
    /// `Unavailable` when no connection came up in time, the `PING`'s error otherwise,
    /// `Closed` after close.
    pub async fn connect(&self) -> Result<()> {
        let op = Operation::Connect;
        // A timeout too long to express waits as long as it takes.
        let deadline = tokio::time::Instant::now()
            .checked_add(self.shared.connect_timeout)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400 * 365 * 30));
        while !self.shared.pool.next_connected().is_connected() {
            if self.shared.is_closed() {
                return Err(Error::closed(op));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    op,
                    format!(
                        "could not connect to Redis within {:?}",
                        self.shared.connect_timeout
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.health_check().await
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
        !self.shared.is_closed() && self.shared.pool.next_connected().is_connected()
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

    /// [`write_fenced`](Self::write_fenced) for several independent scripts in one
    /// pipeline (a cluster routes each to its slot): one fence for all of them.
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
                    return Ok(vec![run_write_script(c, keys, args).await]);
                }
                // fred does not pipeline scripts: sent one after another on this client
                // (in a cluster each to its slot's node).
                let mut replies = Vec::with_capacity(calls.len());
                for (keys, args) in calls {
                    replies.push(run_write_script(c.clone(), keys, args).await);
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

    /// Decodes one `GET` reply, evicting what does not decode.
    async fn decode_reply(&self, key: Key, reply: &Value, op: Operation) -> Result<Option<Entry<V>>> {
        let Some(bytes) = value_bytes(reply) else {
            return Ok(None);
        };
        match self.shared.decode(bytes, op) {
            Ok(entry) => Ok(entry),
            Err(err) => {
                self.shared.evict(key, Some(bytes.to_vec())).await;
                Err(err)
            }
        }
    }
}

/// `PX` for `ttl`, at least 1 ms (Redis refuses 0) and at most [`MAX_PX_MILLIS`].
fn px_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_PX_MILLIS)
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
    /// as `get` removes it) or a string that is not capacitor's envelope, as `get` reports.
    async fn exists(&self, key: &K) -> Result<bool> {
        let op = Operation::Exists;
        let _guard = self.shared.in_flight.read().await;
        let rkey = self.key(key);
        let k = rkey.clone();
        let header = Value::from(capacitor_core::envelope::HEADER_LEN as i64);
        let reply: Value = self
            .shared
            .run(op, |c| async move {
                c.eval::<Value, _, _, _>(EXISTS_SCRIPT, k, vec![header]).await
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
            reply => match value_bytes(&reply).map(capacitor_core::envelope::unwrap) {
                Some(Ok(_)) => Ok(true),
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
                    "{bad} stored values did not decode (evicted); first: {}",
                    err.message()
                ),
            )
            .with_source(err)),
        }
    }

    /// One pipeline of `SET … PX` (one round trip; in a cluster fred routes each command
    /// to its slot's node). Not atomic: use [`apply_atomic`](Layer::apply_atomic) for
    /// all-or-nothing. Values are encoded and size-checked before anything is sent.
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

    /// One `DEL k1 k2 …` (in a cluster, a pipeline of `DEL`s).
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

    /// `MULTI` / `SET … PX` / `DEL` / `EXEC` on one connection: all or nothing. In a
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

/// The replies to `GET` of each key, in order: one `MGET`, or in a cluster one pipeline.
pub(crate) async fn fetch_values<C>(shared: &Shared<C>, op: Operation, keys: Vec<Key>) -> Result<Vec<Value>> {
    let n = keys.len();
    let values = if shared.clustered {
        let results = shared
            .run(op, |c| async move {
                let p = c.pipeline();
                for k in keys {
                    p.get::<(), _>(k).await?;
                }
                Ok(p.try_all::<Value>().await)
            })
            .await?;
        let mut values = Vec::with_capacity(n);
        for r in results {
            values.push(match r {
                Ok(v) => v,
                // A key of another type: a miss, as with MGET.
                Err(e) if crate::error::is_wrongtype(&e) => Value::Null,
                Err(e) => return Err(redis_error(op, e)),
            });
        }
        values
    } else {
        let reply: Value = shared
            .run(op, |c| async move { c.mget::<Value, _>(keys).await })
            .await?;
        match reply {
            Value::Array(values) => values,
            Value::Null => vec![Value::Null; n],
            other => vec![other],
        }
    };
    if values.len() != n {
        return Err(Error::new(
            ErrorKind::Backend,
            op,
            format!("Redis returned {} values for {n} keys", values.len()),
        ));
    }
    Ok(values)
}
