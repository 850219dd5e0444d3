//! What the layer and its scan streams share: the pool, the connection health, the
//! scripts every write and eviction runs, and helpers to read Redis replies.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use capacitor_core::{envelope, Codec, Entry, Error, ErrorKind, Operation, Result, SharedClock};
use fred::clients::{Client, Pool};
use fred::error::Error as FredError;
use fred::prelude::{ClientLike, Key, KeysInterface, LuaInterface, Value};
use tokio::sync::broadcast::error::TryRecvError;
use tokio::sync::broadcast::Receiver;

use crate::error::{redis_error, timeout_error, Cause};

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
pub(crate) const EXISTS_SCRIPT: &str = r"
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
pub(crate) async fn run_write_script(
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
pub(crate) type SetArgs = (Key, Value, Option<u64>);

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
    pub(crate) connections: Mutex<Vec<fred::types::ConnectHandle>>,
    /// Keys whose last write may still be applied (see `WRITE_SCRIPT`).
    pub(crate) fence: capacitor_core::fence::WriteFence,
    /// What the connections last reported, named in the errors while none is up.
    pub(crate) health: Health,
}

impl<C> Shared<C> {
    /// Aborts the connection tasks (and their reconnection loops).
    pub(crate) fn stop_connections(&self) {
        let tasks = std::mem::take(&mut *lock(&self.connections));
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
            return Err(self.health.not_connected(op));
        }
        Ok(client.clone())
    }

    /// Whether at least one pooled client is connected.
    pub(crate) fn any_connected(&self) -> bool {
        self.pool.next_connected().is_connected()
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

/// `PX` for `ttl`, at least 1 ms (Redis refuses 0) and at most [`MAX_PX_MILLIS`].
pub(crate) fn px_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_PX_MILLIS)
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

/// A poisoned lock's data (every critical section here leaves it consistent).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One client's error channel: each error with the server it came from, when known.
pub(crate) type ErrorReceiver = Receiver<(FredError, Option<fred::types::config::Server>)>;

/// What a set of fred clients last reported about their connections: the cause named in
/// the errors of operations made while none is up, and what `connect` reports at once
/// instead of waiting for its timeout.
///
/// fred reports every failed connection attempt (refused, unknown host, a `SELECT` or
/// `AUTH` the server refused) on each client's error channel, then retries under the
/// reconnect policy; the receivers are made before the clients connect, so the first
/// failure is kept, and read without a task of their own when an error needs it.
pub(crate) struct Health {
    /// Where the clients connect, for messages: `host:port`, never credentials.
    target: String,
    receivers: Mutex<Vec<ErrorReceiver>>,
    last: Mutex<Option<FredError>>,
}

impl Health {
    /// Watches the clients whose error channels are `receivers`, connecting to `target`.
    pub(crate) fn new(target: String, receivers: Vec<ErrorReceiver>) -> Self {
        Health {
            target,
            receivers: Mutex::new(receivers),
            last: Mutex::new(None),
        }
    }

    /// The latest connection error reported (a closed client's cancellations aside).
    pub(crate) fn cause(&self) -> Option<FredError> {
        let mut last = lock(&self.last);
        for rx in lock(&self.receivers).iter_mut() {
            loop {
                match rx.try_recv() {
                    Ok((err, _)) if !err.is_canceled() => *last = Some(err),
                    Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
        }
        last.clone()
    }

    /// The error of an operation issued while no connection is up, naming the last
    /// connection failure when there was one.
    pub(crate) fn not_connected(&self, op: Operation) -> Error {
        let err = Error::new(
            ErrorKind::Unavailable,
            op,
            format!(
                "not connected to Redis at {}; reconnecting in the background",
                self.target
            ),
        );
        match self.cause() {
            Some(cause) => err.with_source(Cause(cause)),
            None => err,
        }
    }

    /// Waits until `connected()` (at most `timeout`), failing at once when a connection
    /// attempt has failed (with its error as the source), or when `closed()`.
    pub(crate) async fn wait_connected(
        &self,
        op: Operation,
        timeout: Duration,
        connected: impl Fn() -> bool,
        closed: impl Fn() -> bool,
    ) -> Result<()> {
        let started = tokio::time::Instant::now();
        loop {
            if closed() {
                return Err(Error::closed(op));
            }
            if connected() {
                return Ok(());
            }
            if let Some(cause) = self.cause() {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    op,
                    format!("could not connect to Redis at {}", self.target),
                )
                .with_source(Cause(cause)));
            }
            if started.elapsed() >= timeout {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    op,
                    format!("could not connect to Redis at {} within {timeout:?}", self.target),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
