//! What the layer and its scan streams share: the pool, the connection health, the
//! scripts every write and eviction runs, and helpers to read Redis replies.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, TryLockError};
use std::time::Duration;

use capacitor_core::{envelope, Codec, Entry, Error, ErrorKind, Operation, Result, SharedClock};
use fred::clients::{Client, Pool};
use fred::error::Error as FredError;
use fred::prelude::{ClientLike, EventInterface, FromValue, Key, KeysInterface, LuaInterface, Value};
use tokio::sync::broadcast::error::TryRecvError;
use tokio::sync::broadcast::Receiver;

use crate::error::{redis_error, timeout_error, Cause};

/// Deletes `KEYS[1]` when it holds a non-string type, or (with `ARGV[1]`) when it still
/// holds exactly the bytes that failed to decode, so that a write racing the read stays.
static EVICT_SCRIPT: Script = Script::new(
    r"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return 0 end
if t ~= 'string' then return redis.call('DEL', KEYS[1]) end
if ARGV[1] ~= nil and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
);

/// Every write: sets the first `ARGV[2]` keys (value `ARGV[1+2i]`, `PX` `ARGV[2+2i]` or none
/// when empty) and deletes the remaining keys, all or nothing (a script runs atomically),
/// but only if the server's clock is before the deadline `ARGV[1]` (ms since the epoch).
/// Returns -1 when late, else how many keys it deleted. The deadline fence (see
/// `capacitor_core::fence`) is what keeps a write that timed out, or that fred resends
/// after a reconnection, from landing after a later acknowledged write of the key.
pub(crate) static WRITE_SCRIPT: Script = Script::new(
    r"
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
",
);

/// `exists` as `get` sees it: nil for no key, -1 for a key of another Redis type, else
/// the first bytes of the string (the envelope's header, checked by the caller).
pub(crate) static EXISTS_SCRIPT: Script = Script::new(
    r"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return false end
if t ~= 'string' then return -1 end
return redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
",
);

/// A Lua script, sent by its SHA-1 (`EVALSHA`: Redis does not hash and look up the
/// script's text on every call, about 8 µs per write on loopback), and in full (`EVAL`)
/// only when the server does not know it yet (`NOSCRIPT`: a new or restarted server).
pub(crate) struct Script {
    text: &'static str,
    sha: OnceLock<String>,
}

impl Script {
    const fn new(text: &'static str) -> Self {
        Script {
            text,
            sha: OnceLock::new(),
        }
    }

    fn sha(&self) -> &str {
        self.sha
            .get_or_init(|| sha1_smol::Sha1::from(self.text).digest().to_string())
    }

    /// Runs the script on `c`. (A `NOSCRIPT` reply means nothing ran: sending the script
    /// again is safe.)
    pub(crate) async fn run<R: FromValue>(
        &self,
        c: &Client,
        keys: Vec<Key>,
        args: Vec<Value>,
    ) -> std::result::Result<R, FredError> {
        match c
            .evalsha::<R, _, _, _>(self.sha(), keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                c.eval::<R, _, _, _>(self.text, keys, args).await
            }
            result => result,
        }
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
    /// Whether no connection task runs any more (each ended, as after the one attempt
    /// of `Reconnect::Never`, or `close` aborted them): no connection is coming.
    pub(crate) fn connections_ended(&self) -> bool {
        lock(&self.connections)
            .iter()
            .all(fred::types::ConnectHandle::is_finished)
    }

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
        envelope::open_entry(&self.codec, bytes, &self.clock, op)
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
                EVICT_SCRIPT.run::<Value>(&c, vec![key], args).await
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
type ErrorReceiver = Receiver<(FredError, Option<fred::types::config::Server>)>;

/// A connection error as [`Health`] keeps it.
#[derive(Clone)]
struct Saved {
    /// Its number: errors are numbered as they are read, across the clients.
    seq: u64,
    /// Whether it is a failed connection attempt (refused, unknown host, `SELECT` or
    /// `AUTH` refused) rather than a lost connection or a protocol error (fred names the
    /// server of the latter, never of the former).
    attempt: bool,
    error: Arc<FredError>,
}

/// One client as [`Health`] watches it: its error and connection channels (made before it
/// connects, so that the first attempt is seen) and its latest error since it last
/// connected.
pub(crate) struct Watched {
    is_connected: Box<dyn Fn() -> bool + Send + Sync>,
    errors: ErrorReceiver,
    /// fred sends on it on every successful connection, the first included.
    connects: Receiver<fred::types::config::Server>,
    /// The latest error since this client last connected.
    last: Option<Saved>,
}

impl Watched {
    /// Watches `client`; call it before the client connects.
    pub(crate) fn new<T>(client: &T) -> Self
    where
        T: ClientLike + EventInterface + Clone + Send + Sync + 'static,
    {
        let watched = client.clone();
        Watched {
            is_connected: Box::new(move || watched.is_connected()),
            errors: client.error_rx(),
            connects: client.reconnect_rx(),
            last: None,
        }
    }

    /// Reads what arrived since the last call; `seq` numbers the errors.
    fn drain(&mut self, seq: &mut u64) {
        let mut connected = false;
        while let Ok(_) | Err(TryRecvError::Lagged(_)) = self.connects.try_recv() {
            connected = true;
        }
        let mut failed = false;
        loop {
            match self.errors.try_recv() {
                Ok((error, server)) if !error.is_canceled() => {
                    *seq += 1;
                    self.last = Some(Saved {
                        seq: *seq,
                        attempt: server.is_none(),
                        error: Arc::new(error),
                    });
                    failed = true;
                }
                Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        // The two channels do not say which came first: a connection with no error
        // since, or a client connected now, has left its saved error behind.
        if (connected && !failed) || (self.is_connected)() {
            self.last = None;
        }
    }
}

/// What a set of fred clients reported about their connections: the cause named in the
/// errors of operations made while none is up, and what `connect` reports at once
/// instead of waiting for its timeout.
///
/// fred reports every failed connection attempt (refused, unknown host, a `SELECT` or
/// `AUTH` the server refused) and every lost connection on each client's error channel,
/// then retries under the reconnect policy, and it reports every successful connection
/// on the client's reconnect channel. Each client's latest error is kept until it
/// connects again. The channels are read without a task of their own, when an error or
/// `connect` needs them; errors are numbered as they are read, so that `connect` tells
/// the attempts that failed while it waits from older errors.
pub(crate) struct Health {
    /// Where the clients connect, for messages: `host:port`, never credentials.
    target: String,
    /// Whether the clients reconnect (any policy but `Reconnect::Never`).
    reconnects: bool,
    /// The clients, and how many errors they reported.
    watched: Mutex<(Vec<Watched>, u64)>,
    /// The newest of the clients' saved errors, as of the last read of the channels:
    /// what operations name, read without waiting for `watched`.
    latest: RwLock<Option<Arc<FredError>>>,
}

impl Health {
    /// Watches `clients`, which connect to `target` and reconnect when `reconnects`.
    pub(crate) fn new(target: String, reconnects: bool, clients: Vec<Watched>) -> Self {
        Health {
            target,
            reconnects,
            watched: Mutex::new((clients, 0)),
            latest: RwLock::new(None),
        }
    }

    /// Reads the channels. Returns how many errors have been read so far, and the newest
    /// saved failed attempt numbered after `since`.
    fn refresh(&self, since: u64) -> (u64, Option<Arc<FredError>>) {
        self.refresh_locked(&mut lock(&self.watched), since)
    }

    fn refresh_locked(&self, watched: &mut (Vec<Watched>, u64), since: u64) -> (u64, Option<Arc<FredError>>) {
        let (clients, seq) = watched;
        for client in clients.iter_mut() {
            client.drain(seq);
        }
        let newest = |attempts_after: Option<u64>| {
            clients
                .iter()
                .filter_map(|c| c.last.as_ref())
                .filter(|saved| attempts_after.is_none_or(|since| saved.attempt && saved.seq > since))
                .max_by_key(|saved| saved.seq)
                .map(|saved| Arc::clone(&saved.error))
        };
        *self.latest.write().unwrap_or_else(PoisonError::into_inner) = newest(None);
        (*seq, newest(Some(since)))
    }

    /// The newest saved error. The channels are read first unless another caller is
    /// reading them (then its result, or the previous one, is used): this is on the path
    /// of every operation made while Redis is down, which must not queue.
    fn cause(&self) -> Option<Arc<FredError>> {
        match self.watched.try_lock() {
            Ok(mut watched) => {
                self.refresh_locked(&mut watched, u64::MAX);
            }
            Err(TryLockError::Poisoned(poisoned)) => {
                self.refresh_locked(&mut poisoned.into_inner(), u64::MAX);
            }
            Err(TryLockError::WouldBlock) => {}
        }
        self.saved()
    }

    /// The newest saved error as of the last read of the channels.
    fn saved(&self) -> Option<Arc<FredError>> {
        self.latest.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The error of an operation issued while no connection is up, naming the latest
    /// connection error when there is one.
    pub(crate) fn not_connected(&self, op: Operation) -> Error {
        with_cause(
            Error::new(
                ErrorKind::Unavailable,
                op,
                format!(
                    "not connected to Redis at {}; {}",
                    self.target,
                    if self.reconnects {
                        "reconnecting in the background"
                    } else {
                        "not reconnecting (Reconnect::Never)"
                    }
                ),
            ),
            self.cause(),
        )
    }

    /// Waits until `connected()` (at most `timeout`). Fails at once when `closed()`, when
    /// a connection attempt fails after the call started (with its error as the source:
    /// an older error, such as the one a restarted server left, does not count, nor does
    /// a lost connection, as the clients may be about to reconnect), or when `gave_up()`
    /// (no connection task runs any more, as after the one attempt of
    /// `Reconnect::Never`). After the timeout, the newest saved error is the source.
    pub(crate) async fn wait_connected(
        &self,
        op: Operation,
        timeout: Duration,
        connected: impl Fn() -> bool,
        closed: impl Fn() -> bool,
        gave_up: impl Fn() -> bool,
    ) -> Result<()> {
        let started = tokio::time::Instant::now();
        let (since, _) = self.refresh(u64::MAX);
        loop {
            if closed() {
                return Err(Error::closed(op));
            }
            if connected() {
                return Ok(());
            }
            let (_, failed) = self.refresh(since);
            let (message, cause) = match failed {
                Some(failed) => (
                    format!("could not connect to Redis at {}", self.target),
                    Some(failed),
                ),
                None if gave_up() => (
                    format!(
                        "could not connect to Redis at {} (not reconnecting: the connection tasks ended)",
                        self.target
                    ),
                    self.saved(),
                ),
                None if started.elapsed() >= timeout => (
                    format!("could not connect to Redis at {} within {timeout:?}", self.target),
                    self.saved(),
                ),
                None => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            };
            return Err(with_cause(Error::new(ErrorKind::Unavailable, op, message), cause));
        }
    }
}

/// `err` with the saved connection error as its source, when there is one.
fn with_cause(err: Error, cause: Option<Arc<FredError>>) -> Error {
    match cause {
        Some(cause) => err.with_source(Cause(cause)),
        None => err,
    }
}
