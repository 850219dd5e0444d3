//! [`PostgresBus`]: an [`InvalidationBus`] on PostgreSQL `LISTEN`/`NOTIFY`, and its
//! builder.
//!
//! Two dedicated connections (not from a pool, so that a busy pool never delays an
//! invalidation and a `LISTEN` never lands on a pooled connection): the subscriber runs
//! `LISTEN "<channel>"` and reads notifications as the driver's
//! [`AsyncMessage::Notification`]s; the publisher runs `SELECT pg_notify($1, $2)`. A task
//! per connection connects, and reconnects with a backoff when the connection is lost,
//! until the bus is closed.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use capacitor_core::{
    async_trait, BusMessage, Error, ErrorKind, Invalidation, InvalidationBus, InvalidationSink, Operation,
    Result, StorageKey,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::config::Host;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification, Socket, Statement};

use crate::builder::Source;
use crate::error::{pg_error, pg_error_in};

/// The default channel, a PostgreSQL identifier.
const DEFAULT_CHANNEL: &str = "capacitor_invalidate";
/// PostgreSQL truncates identifiers to 63 bytes (`NAMEDATALEN - 1`).
const MAX_CHANNEL_BYTES: usize = 63;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);
const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(1);
/// `application_name` of both connections unless the URL sets one.
const APPLICATION_NAME: &str = "capacitor-bus";
/// How long `close` lets each connection end cleanly (a `Terminate` message) before
/// aborting it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Length of the instance id at the start of every payload (before base64).
const ID_LEN: usize = 8;
/// A `NOTIFY` payload must be shorter than 8000 bytes (in the default build).
const MAX_PAYLOAD: usize = 7999;
/// The largest [`BusMessage::encode`] length whose payload fits in [`MAX_PAYLOAD`]: base64
/// turns each 3 bytes (the last group padded) into 4 characters.
const MAX_MESSAGE: usize = MAX_PAYLOAD / 4 * 3 - ID_LEN;

/// Base64 (RFC 4648, standard alphabet, padded): `NOTIFY` payloads are text.
mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub(super) fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn value(c: u8) -> Option<u32> {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        Some(u32::from(v))
    }

    /// The bytes [`encode`] wrote, or `None` for text it cannot have written.
    pub(super) fn decode(text: &str) -> Option<Vec<u8>> {
        let text = text.as_bytes();
        if !text.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(text.len() / 4 * 3);
        let groups = text.len() / 4;
        for (g, quad) in text.chunks(4).enumerate() {
            let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && g + 1 != groups) {
                return None;
            }
            let mut n = 0u32;
            for &c in &quad[..4 - pad] {
                n = n << 6 | value(c)?;
            }
            n <<= 6 * pad as u32;
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pad]);
        }
        Some(out)
    }
}

/// The future that drives a connection until it ends, forwarding notifications; its
/// output is the error that ended it (`None` for a clean end).
type Driver = Pin<Box<dyn Future<Output = Option<tokio_postgres::Error>> + Send>>;
type Connecting =
    Pin<Box<dyn Future<Output = std::result::Result<(Client, Driver), tokio_postgres::Error>> + Send>>;
/// Opens a connection with the TLS connector the user chose.
type Connector = Arc<dyn Fn(&tokio_postgres::Config, Option<Notes>) -> Connecting + Send + Sync>;
type Notes = mpsc::UnboundedSender<Notification>;

/// A [`Connector`] for `tls`.
fn connector<T>(tls: T) -> Connector
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    Arc::new(move |config, notes| {
        let config = config.clone();
        let tls = tls.clone();
        Box::pin(async move {
            let (client, mut connection) = config.connect(tls).await?;
            let driver: Driver = Box::pin(async move {
                loop {
                    match poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(note))) => {
                            if let Some(notes) = &notes {
                                let _ = notes.send(note);
                            }
                        }
                        // Notices and future message kinds.
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Some(e),
                        None => return None,
                    }
                }
            });
            Ok((client, driver))
        })
    })
}

/// What a registered sink is handed: the bus is not generic, each sink decodes its `K`.
enum Raw<'a> {
    All,
    Message(&'a [u8]),
}

type RawSink = Box<dyn Fn(Raw<'_>) + Send + Sync>;

/// The publisher's current connection.
#[derive(Clone)]
struct Publisher {
    /// Counts the publisher's connections, so that `publish` waits for a new one after
    /// the one it used was lost.
    generation: u64,
    client: Arc<Client>,
    statement: Statement,
}

/// A failure the background tasks saw.
#[derive(Clone)]
struct Saved {
    error: Arc<Error>,
    /// A failed connection attempt (refused, unknown database, bad password), rather than
    /// a lost connection.
    attempt: bool,
}

/// What the tasks report and `connect`, `publish` and `close` wait on.
#[derive(Clone, Default)]
struct Status {
    closed: bool,
    publisher: Option<Publisher>,
    listening: bool,
    /// Failed connection attempts so far, both connections.
    failed_attempts: u64,
    last_error: Option<Saved>,
}

impl Status {
    fn is_up(&self) -> bool {
        !self.closed && self.publisher.is_some() && self.listening
    }
}

/// What the bus shares with its two tasks.
struct Shared {
    config: tokio_postgres::Config,
    connect: Connector,
    channel: String,
    /// `LISTEN "<channel>"`.
    listen: String,
    instance_id: u64,
    connect_timeout: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    /// Where the connections go, for messages: `host:port`, never credentials.
    target: String,
    status: watch::Sender<Status>,
}

impl Shared {
    fn is_closed(&self) -> bool {
        self.status.borrow().closed
    }

    /// Records a failed attempt (`attempt`) or a lost connection.
    fn failed(&self, error: Error, attempt: bool) {
        self.status.send_modify(|s| {
            if attempt {
                s.failed_attempts += 1;
            }
            s.last_error = Some(Saved {
                error: Arc::new(error),
                attempt,
            });
        });
    }

    /// Connects, bounded by the connect timeout.
    async fn open(&self, notes: Option<Notes>) -> std::result::Result<(Client, Driver), Error> {
        let op = Operation::Connect;
        match tokio::time::timeout(self.connect_timeout, (self.connect)(&self.config, notes)).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) => Err(pg_error_in(op, "cannot connect: ", e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                op,
                format!(
                    "connecting to PostgreSQL at {} took longer than the {:?} connect timeout",
                    self.target, self.connect_timeout
                ),
            )),
        }
    }

    /// Waits until the bus is closed.
    async fn closed(&self) {
        let mut rx = self.status.subscribe();
        let _ = rx.wait_for(|s| s.closed).await;
    }

    /// Awaits `request`, the first on a fresh connection, while driving the connection
    /// and watching for the bus closing: bounded by the connect timeout, its failure
    /// described as `what` failing; `None` when the bus closed first.
    async fn first_request<T>(
        &self,
        op: Operation,
        what: &str,
        driver: &mut Driver,
        request: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Option<Result<T>> {
        tokio::select! {
            r = tokio::time::timeout(self.connect_timeout, request) => Some(match r {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(e)) => Err(pg_error_in(op, &format!("{what} failed: "), e)),
                Err(_) => Err(Error::new(
                    ErrorKind::Timeout,
                    op,
                    format!("{what} got no answer within the {:?} connect timeout", self.connect_timeout),
                )),
            }),
            end = &mut *driver => Some(Err(lost(op, end))),
            () = self.closed() => None,
        }
    }

    /// Sleeps `delay`, or less if the bus closes meanwhile; `false` once closed.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => !self.is_closed(),
            () = self.closed() => false,
        }
    }

    fn next_delay(&self, delay: Duration) -> Duration {
        delay.saturating_mul(2).min(self.reconnect_max)
    }

    /// `err` with the last saved failure as its source, when there is one.
    fn with_cause(&self, err: Error) -> Error {
        match self.status.borrow().last_error.clone() {
            Some(saved) => err.with_source(Cause(saved.error)),
            None => err,
        }
    }
}

/// A saved [`Error`] as the source of another.
#[derive(Debug)]
struct Cause(Arc<Error>);

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

/// How a lost connection ended, as an error.
fn lost(op: Operation, end: Option<tokio_postgres::Error>) -> Error {
    match end {
        Some(e) => pg_error_in(op, "the connection was lost: ", e),
        None => Error::new(ErrorKind::Unavailable, op, "the server closed the connection"),
    }
}

/// Drops `client` (the driver then sends `Terminate` and ends) and drives the connection
/// to its end, for at most [`CLOSE_GRACE`].
async fn hang_up(client: Client, driver: Driver) {
    drop(client);
    let _ = tokio::time::timeout(CLOSE_GRACE, driver).await;
}

/// The subscriber task: connects, `LISTEN`s, delivers, and starts over when the
/// connection is lost, until the bus closes.
async fn subscriber(shared: Arc<Shared>, mut new_sinks: mpsc::UnboundedReceiver<RawSink>) {
    let op = Operation::Subscribe;
    let mut sinks: Vec<RawSink> = Vec::new();
    let mut delay = shared.reconnect_min;
    loop {
        if shared.is_closed() {
            return;
        }
        let (tx, mut notes) = mpsc::unbounded_channel();
        let opened = tokio::select! {
            opened = shared.open(Some(tx)) => opened,
            () = shared.closed() => return,
        };
        let (client, driver) = match opened {
            Ok(pair) => pair,
            Err(e) => {
                shared.failed(e, true);
                if !shared.pause(delay).await {
                    return;
                }
                delay = shared.next_delay(delay);
                continue;
            }
        };
        let mut driver = driver;
        let listen = client.batch_execute(&shared.listen);
        let Some(listened) = shared.first_request(op, "LISTEN", &mut driver, listen).await else {
            hang_up(client, driver).await;
            return;
        };
        if let Err(e) = listened {
            shared.failed(e, true);
            if !shared.pause(delay).await {
                return;
            }
            delay = shared.next_delay(delay);
            continue;
        }
        delay = shared.reconnect_min;
        while let Ok(sink) = new_sinks.try_recv() {
            sinks.push(sink);
        }
        shared.status.send_modify(|s| s.listening = true);
        // Anything cached before may have changed while no one listened.
        for sink in &sinks {
            sink(Raw::All);
        }
        let end = loop {
            tokio::select! {
                biased;
                () = shared.closed() => {
                    hang_up(client, driver).await;
                    return;
                }
                Some(sink) = new_sinks.recv() => {
                    sink(Raw::All);
                    sinks.push(sink);
                }
                Some(note) = notes.recv() => deliver(&shared, &sinks, &note),
                end = &mut driver => break end,
            }
        };
        shared.status.send_modify(|s| s.listening = false);
        // What arrived before the connection was lost.
        while let Ok(note) = notes.try_recv() {
            deliver(&shared, &sinks, &note);
        }
        shared.failed(lost(op, end), false);
        if !shared.pause(delay).await {
            return;
        }
    }
}

/// Hands `note` to every sink, unless it is this bus's own or not a bus payload.
fn deliver(shared: &Shared, sinks: &[RawSink], note: &Notification) {
    if note.channel() != shared.channel {
        return;
    }
    let Some(bytes) = base64::decode(note.payload()) else {
        return;
    };
    if bytes.len() < ID_LEN || bytes[..ID_LEN] == shared.instance_id.to_le_bytes() {
        return;
    }
    for sink in sinks {
        sink(Raw::Message(&bytes[ID_LEN..]));
    }
}

/// The publisher task: connects, prepares `pg_notify`, offers the connection to
/// `publish`, and starts over when it is lost, until the bus closes.
async fn publisher(shared: Arc<Shared>) {
    let op = Operation::Connect;
    let mut delay = shared.reconnect_min;
    let mut generation = 0;
    loop {
        if shared.is_closed() {
            return;
        }
        let opened = tokio::select! {
            opened = shared.open(None) => opened,
            () = shared.closed() => return,
        };
        let (client, mut driver) = match opened {
            Ok(pair) => pair,
            Err(e) => {
                shared.failed(e, true);
                if !shared.pause(delay).await {
                    return;
                }
                delay = shared.next_delay(delay);
                continue;
            }
        };
        let prepare = client.prepare("SELECT pg_notify($1, $2)");
        let Some(prepared) = shared
            .first_request(op, "preparing pg_notify", &mut driver, prepare)
            .await
        else {
            hang_up(client, driver).await;
            return;
        };
        let statement = match prepared {
            Ok(statement) => statement,
            Err(e) => {
                shared.failed(e, true);
                if !shared.pause(delay).await {
                    return;
                }
                delay = shared.next_delay(delay);
                continue;
            }
        };
        delay = shared.reconnect_min;
        generation += 1;
        let client = Arc::new(client);
        shared.status.send_modify(|s| {
            s.publisher = Some(Publisher {
                generation,
                client: Arc::clone(&client),
                statement,
            });
        });
        let end = tokio::select! {
            end = &mut driver => Some(end),
            () = shared.closed() => None,
        };
        shared.status.send_modify(|s| s.publisher = None);
        match end {
            Some(end) => shared.failed(lost(Operation::Publish, end), false),
            None => {
                // A `publish` in flight may hold a clone for a moment.
                drop(client);
                let _ = tokio::time::timeout(CLOSE_GRACE, driver).await;
                return;
            }
        }
        if !shared.pause(delay).await {
            return;
        }
    }
}

/// An [`InvalidationBus`] on PostgreSQL `LISTEN`/`NOTIFY`:
/// [`publish`](InvalidationBus::publish) runs `SELECT pg_notify(channel, payload)` on a
/// dedicated connection, the payload being base64 of the instance's id and the
/// [`BusMessage::encode`]d message; a second dedicated connection `LISTEN`s on the
/// channel and delivers the other instances' messages as [`Invalidation::Message`] (its
/// own are skipped, undecodable payloads ignored), and [`Invalidation::All`] after the
/// first `LISTEN` and after each one following a lost connection (notifications sent
/// while no connection listened are not queued for it).
///
/// Delivery is at most once and fast (one server hop); staleness after a lost message is
/// bounded by the `All` on reconnect and by the L1 TTL. A message is at most
/// [`max_message_bytes`](InvalidationBus::max_message_bytes) long (5,989 bytes encoded:
/// PostgreSQL takes payloads under 8000 bytes). `NOTIFY` is transactional and runs on the
/// primary: point the URL at the primary (a standby refuses it), and note that a
/// notification is delivered when its (here: single-statement) transaction commits.
///
/// Built with [`PostgresBus::builder`], which connects in the background: the bus is
/// usable at once and [`connect`](PostgresBus::connect) waits for it. Both connections
/// reconnect, with a backoff, until [`close`](PostgresBus::close) or drop.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), capacitor::Error> {
/// use std::sync::Arc;
/// use capacitor::memory::MokaLayer;
/// use capacitor::postgres::{PostgresBus, PostgresLayer};
/// use capacitor::{LayerConfig, MultiLayer};
///
/// let url = "postgres://postgres@127.0.0.1:5432/test";
/// # let from_env = std::env::var("CAPACITOR_POSTGRES_URL").unwrap_or_else(|_| url.to_owned()); let url = from_env.as_str();
/// let bus = PostgresBus::builder()
///     .url(url)
///     .channel("doc_pgbus_invalidate")
///     .build()?;
/// bus.connect().await?; // optional: fail at start-up when PostgreSQL is down
/// let bus = Arc::new(bus);
/// let postgres = PostgresLayer::builder()
///     .url(url)
///     .table("doc_pgbus")
///     .build::<String, u64>()
///     .await?;
/// let cache = MultiLayer::<String, u64>::builder()
///     .layer(LayerConfig::new("l1", MokaLayer::builder().max_capacity(1_000).build()?))
///     .layer(LayerConfig::new("postgres", postgres))
///     .invalidation_bus(bus.clone())
///     .build()?;
/// cache.set("visits".into(), 1).await?; // the other instances drop "visits" from their L1
/// cache.close().await?;
/// bus.close().await?;
/// # Ok(()) }
/// ```
pub struct PostgresBus {
    shared: Arc<Shared>,
    publish_timeout: Duration,
    /// Where `subscribe` hands sinks to the subscriber task.
    sinks: mpsc::UnboundedSender<RawSink>,
    /// The subscriber and publisher tasks; empty once closed.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for PostgresBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBus")
            .field("target", &self.shared.target)
            .field("channel", &self.shared.channel)
            .field("instance_id", &self.shared.instance_id)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl PostgresBus {
    /// A builder with the defaults listed on [`PostgresBusBuilder`].
    pub fn builder() -> PostgresBusBuilder {
        PostgresBusBuilder::new()
    }

    /// This instance's id, sent with every message it publishes (random per bus).
    pub fn instance_id(&self) -> u64 {
        self.shared.instance_id
    }

    /// The channel.
    pub fn channel(&self) -> &str {
        &self.shared.channel
    }

    /// Whether both connections are up and the `LISTEN` succeeded (so messages flow both
    /// ways).
    pub fn is_connected(&self) -> bool {
        self.shared.status.borrow().is_up()
    }

    /// Waits until both connections are up and the subscriber's `LISTEN` succeeded. Use
    /// it to fail at start-up when PostgreSQL is down or refuses the connection; without
    /// it the bus connects in the background.
    ///
    /// It fails as soon as a connection attempt made while it waits fails (a refused
    /// connection, an unknown host), naming that cause; at once when the last attempt
    /// was refused by the server (an unknown database, failed authentication); else
    /// after the connect timeout. A lost connection does not fail it: the tasks are
    /// about to reconnect. Either way they keep reconnecting in the background, so it can
    /// be called again.
    ///
    /// # Errors
    ///
    /// The failed attempt's kind, its error as the source: `Unavailable` (refused,
    /// unreachable), `Config` (unknown database, authentication), `Timeout` (no answer
    /// within the connect timeout); `Unavailable` when the connect timeout passes with
    /// the connections still down; `Closed` after close.
    pub async fn connect(&self) -> Result<()> {
        let op = Operation::Connect;
        let shared = &self.shared;
        let mut rx = shared.status.subscribe();
        let (since, refused) = {
            let s = rx.borrow_and_update();
            // The server refused the last attempt (an unknown database, authentication):
            // retrying will not change that soon.
            let refused = s
                .last_error
                .as_ref()
                .filter(|saved| !s.is_up() && saved.attempt && saved.error.kind() == ErrorKind::Config)
                .cloned();
            (s.failed_attempts, refused)
        };
        if let Some(saved) = refused {
            return Err(Error::new(
                saved.error.kind(),
                op,
                format!("could not connect to PostgreSQL at {}", shared.target),
            )
            .with_source(Cause(saved.error)));
        }
        let waited = tokio::time::timeout(
            shared.connect_timeout,
            rx.wait_for(|s| s.closed || s.is_up() || s.failed_attempts > since),
        )
        .await;
        let status = match waited {
            Ok(Ok(status)) => status.clone(),
            Ok(Err(_)) => return Err(Error::closed(op)),
            Err(_) => {
                let status = shared.status.borrow().clone();
                if status.is_up() {
                    return Ok(());
                }
                let err = Error::new(
                    ErrorKind::Unavailable,
                    op,
                    format!(
                        "could not connect to PostgreSQL at {} within {:?}",
                        shared.target, shared.connect_timeout
                    ),
                );
                return Err(shared.with_cause(err));
            }
        };
        if status.closed {
            return Err(Error::closed(op));
        }
        if status.is_up() {
            return Ok(());
        }
        let saved = status.last_error.filter(|s| s.attempt);
        let kind = saved.as_ref().map_or(ErrorKind::Unavailable, |s| s.error.kind());
        let err = Error::new(
            kind,
            op,
            format!("could not connect to PostgreSQL at {}", shared.target),
        );
        Err(match saved {
            Some(saved) => err.with_source(Cause(saved.error)),
            None => err,
        })
    }

    /// Refuses new `publish`, `subscribe` and `connect` calls, stops delivering, and
    /// closes both connections (each given up to a second to end cleanly, then aborted).
    /// A `publish` in flight completes or fails. Idempotent.
    ///
    /// # Errors
    ///
    /// None in practice.
    pub async fn close(&self) -> Result<()> {
        self.shared.status.send_modify(|s| {
            s.closed = true;
            s.publisher = None;
            s.listening = false;
        });
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for mut task in tasks {
            if tokio::time::timeout(CLOSE_GRACE * 2, &mut task).await.is_err() {
                task.abort();
            }
        }
        Ok(())
    }

    /// Aborts the tasks, which drops (so closes) their connections.
    fn stop_tasks(&self) {
        for task in std::mem::take(&mut *lock(&self.tasks)) {
            task.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Drop for PostgresBus {
    /// Stops delivering and aborts both tasks, which closes the connections (so that a
    /// bus dropped without `close` does not reconnect forever).
    fn drop(&mut self) {
        self.shared.status.send_modify(|s| s.closed = true);
        self.stop_tasks();
    }
}

#[async_trait]
impl<K> InvalidationBus<K> for PostgresBus
where
    K: StorageKey + Send + Sync + 'static,
{
    async fn connect(&self) -> Result<()> {
        PostgresBus::connect(self).await
    }

    /// 5,989 bytes: the base64 of the 8-byte instance id and the message must stay under
    /// PostgreSQL's 8000-byte payload limit.
    fn max_message_bytes(&self) -> usize {
        MAX_MESSAGE
    }

    /// Runs `SELECT pg_notify(channel, payload)`. While the publisher is (re)connecting
    /// it waits for it, up to the publish timeout, the call included; a call that failed
    /// because the connection was lost is made again on the next connection within that
    /// time (a duplicate is harmless: receivers drop what they have applied).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a message over [`max_message_bytes`](Self::max_message_bytes)
    /// (nothing is sent); `Unavailable` when no connection came up within the publish
    /// timeout (the last connection error as the source); `Timeout` when the server did
    /// not answer within it; `Closed` after close; the server's error otherwise.
    async fn publish(&self, message: &BusMessage<K>) -> Result<()> {
        let op = Operation::Publish;
        let shared = &self.shared;
        if shared.is_closed() {
            return Err(Error::closed(op));
        }
        let body = message.encode();
        if body.len() > MAX_MESSAGE {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                op,
                format!(
                    "a {}-byte bus message exceeds the {MAX_MESSAGE} bytes a PostgreSQL NOTIFY carries",
                    body.len()
                ),
            ));
        }
        let mut raw = Vec::with_capacity(ID_LEN + body.len());
        raw.extend_from_slice(&shared.instance_id.to_le_bytes());
        raw.extend_from_slice(&body);
        let payload = base64::encode(&raw);
        let deadline = Instant::now() + self.publish_timeout;
        let mut rx = shared.status.subscribe();
        let mut lost_generation = None;
        // The error of a call made on a connection that was then lost, returned if no
        // new connection comes in time.
        let mut failed_call = None;
        loop {
            let waited = tokio::time::timeout_at(
                deadline,
                rx.wait_for(|s| {
                    s.closed
                        || s.publisher
                            .as_ref()
                            .is_some_and(|p| Some(p.generation) != lost_generation)
                }),
            )
            .await
            .map(|status| status.ok().and_then(|s| (!s.closed).then(|| s.publisher.clone())));
            let publisher = match waited {
                Ok(Some(publisher)) => publisher,
                Ok(None) => return Err(Error::closed(op)),
                Err(_) => {
                    if let Some(err) = failed_call {
                        return Err(err);
                    }
                    let err = Error::new(
                        ErrorKind::Unavailable,
                        op,
                        format!(
                            "not connected to PostgreSQL at {} within the {:?} publish timeout; \
                             reconnecting in the background",
                            shared.target, self.publish_timeout
                        ),
                    );
                    return Err(shared.with_cause(err));
                }
            };
            let Some(publisher) = publisher else { continue };
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&shared.channel, &payload];
            let call = publisher.client.execute(&publisher.statement, &params);
            match tokio::time::timeout_at(deadline, call).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => {
                    let err = pg_error(op, e);
                    if err.kind() != ErrorKind::Unavailable || Instant::now() >= deadline {
                        return Err(err);
                    }
                    // The connection is failing (lost, the server shutting down): try
                    // again on the next one.
                    lost_generation = Some(publisher.generation);
                    failed_call = Some(err);
                }
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        op,
                        format!(
                            "no answer from PostgreSQL within the {:?} publish timeout",
                            self.publish_timeout
                        ),
                    ))
                }
            }
        }
    }

    fn subscribe(&self, sink: InvalidationSink<K>) -> Result<()> {
        let op = Operation::Subscribe;
        if self.shared.is_closed() {
            return Err(Error::closed(op));
        }
        let raw: RawSink = Box::new(move |raw| match raw {
            Raw::All => sink(Invalidation::All),
            // Undecodable payloads (another format, another key type) are ignored.
            Raw::Message(bytes) => {
                if let Ok(message) = BusMessage::<K>::decode(bytes) {
                    sink(Invalidation::Message(message));
                }
            }
        });
        self.sinks.send(raw).map_err(|_| Error::closed(op))
    }
}

/// Builds a [`PostgresBus`]. [`build`](Self::build) validates the options and starts
/// connecting (a publishing and a listening connection) in the background; it does not
/// fail when the server is down.
///
/// Required: [`url`](Self::url) or [`config`](Self::config).
///
/// Defaults:
///
/// | option | default |
/// |---|---|
/// | [`channel`](Self::channel) | `capacitor_invalidate` |
/// | [`connect_timeout`](Self::connect_timeout) | 5 s |
/// | [`publish_timeout`](Self::publish_timeout) | 2 s |
/// | [`reconnect_delay`](Self::reconnect_delay) | from 100 ms, doubling, up to 1 s |
/// | TLS | none |
/// | `application_name` | `capacitor-bus` unless the URL sets one |
///
/// The `Debug` output never shows the URL or the password.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), capacitor::Error> {
/// use std::time::Duration;
/// use capacitor::postgres::PostgresBus;
///
/// let url = "postgres://postgres@127.0.0.1:5432/test";
/// # let from_env = std::env::var("CAPACITOR_POSTGRES_URL").unwrap_or_else(|_| url.to_owned()); let url = from_env.as_str();
/// let bus = PostgresBus::builder()
///     .url(url)
///     .channel("doc_bus_invalidate")
///     .publish_timeout(Duration::from_millis(500))
///     .build()?;
/// bus.connect().await?;
/// assert!(bus.is_connected());
/// bus.close().await?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct PostgresBusBuilder {
    source: Source,
    channel: String,
    connect_timeout: Duration,
    publish_timeout: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    tls: Option<Connector>,
}

impl fmt::Debug for PostgresBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBusBuilder")
            .field("source", &self.source.describe())
            .field("channel", &self.channel)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("reconnect_delay", &(self.reconnect_min..=self.reconnect_max))
            .field("tls", &self.tls.as_ref().map(|_| "custom connector"))
            .finish()
    }
}

impl PostgresBusBuilder {
    fn new() -> Self {
        PostgresBusBuilder {
            source: Source::None,
            channel: DEFAULT_CHANNEL.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            reconnect_min: DEFAULT_RECONNECT_MIN,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            tls: None,
        }
    }

    /// Connect with a URL (`postgres://user:password@host:5432/db`) or a key-value string
    /// (`host=… user=… dbname=…`), as [`tokio_postgres::Config`] parses them. Parsed by
    /// [`build`](Self::build); the URL never appears in errors or `Debug` output. Use the
    /// primary: standbys refuse `NOTIFY`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.source = Source::Url(url.into());
        self
    }

    /// Connect with a [`tokio_postgres::Config`] built in code (replaces [`url`](Self::url)).
    pub fn config(mut self, config: tokio_postgres::Config) -> Self {
        self.source = Source::Config(Box::new(config));
        self
    }

    /// The `LISTEN`/`NOTIFY` channel; every instance sharing a cache must use the same
    /// one. A PostgreSQL identifier of 1 to 63 bytes of `[a-z0-9_]` (used quoted, so that
    /// `LISTEN` and `pg_notify` name the same channel). Default: `capacitor_invalidate`.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// How long one connection attempt (and the `LISTEN` or statement preparation after
    /// it) may take, and how long [`PostgresBus::connect`] waits; also tokio-postgres's
    /// `connect_timeout` unless the URL sets one. Default: 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a `publish` may take, waiting for a (re)connecting publisher included.
    /// Default: 2 s.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// The pause before reconnecting after a failed attempt or a lost connection: `min`
    /// first, doubling on each failed attempt up to `max`, back to `min` once connected.
    /// Default: 100 ms to 1 s.
    pub fn reconnect_delay(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// Connect with TLS through `connector`, any tokio-postgres [`MakeTlsConnect`] (as
    /// [`PostgresLayerBuilder::tls`](crate::PostgresLayerBuilder::tls)). Whether TLS is
    /// required is the URL's `sslmode`. Default: no TLS.
    pub fn tls<T>(mut self, connector_: T) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
        T::Stream: Sync + Send,
        T::TlsConnect: Sync + Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        self.tls = Some(connector(connector_));
        self
    }

    /// Connect with TLS through [native-tls](https://docs.rs/native-tls). Needs the `tls`
    /// feature. Default: no TLS.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn native_tls(self, connector: native_tls::TlsConnector) -> Self {
        self.tls(postgres_native_tls::MakeTlsConnector::new(connector))
    }

    /// Validates the options and starts connecting both connections in the background
    /// (it does not wait for them, nor fail when the server is down). Call
    /// [`PostgresBus::connect`] to wait for them. Must run inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](capacitor_core::ErrorKind::Config), naming the field: no
    /// `url`/`config`, a URL that does not parse or names no host, a channel that is not
    /// 1 to 63 bytes of `[a-z0-9_]`, a zero timeout, a zero or inverted reconnect delay;
    /// no tokio runtime.
    pub fn build(self) -> Result<PostgresBus> {
        validate_channel(&self.channel)?;
        if self.connect_timeout.is_zero() {
            return Err(Error::config("connect_timeout", "must be greater than zero"));
        }
        if self.publish_timeout.is_zero() {
            return Err(Error::config("publish_timeout", "must be greater than zero"));
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return Err(Error::config("reconnect_delay", "needs 0 < min <= max"));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            Error::config(
                "runtime",
                "the bus's connections need a tokio runtime; build inside one",
            )
            .with_source(e)
        })?;
        let mut config = self.source.resolve()?;
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.connect_timeout);
        }
        let target = target(&config);
        let (status, _) = watch::channel(Status::default());
        let shared = Arc::new(Shared {
            config,
            connect: self.tls.unwrap_or_else(|| connector(NoTls)),
            listen: format!("LISTEN \"{}\"", self.channel),
            channel: self.channel,
            instance_id: capacitor_core::bus_instance_id(),
            connect_timeout: self.connect_timeout,
            reconnect_min: self.reconnect_min,
            reconnect_max: self.reconnect_max,
            target,
            status,
        });
        let (sinks, new_sinks) = mpsc::unbounded_channel();
        let tasks = vec![
            runtime.spawn(subscriber(Arc::clone(&shared), new_sinks)),
            runtime.spawn(publisher(Arc::clone(&shared))),
        ];
        Ok(PostgresBus {
            shared,
            publish_timeout: self.publish_timeout,
            sinks,
            tasks: Mutex::new(tasks),
        })
    }
}

/// Refuses a channel that is not 1 to 63 bytes of `[a-z0-9_]`.
fn validate_channel(channel: &str) -> Result<()> {
    if channel.is_empty() || channel.len() > MAX_CHANNEL_BYTES {
        return Err(Error::config(
            "channel",
            format!("must be 1 to {MAX_CHANNEL_BYTES} bytes long"),
        ));
    }
    if !channel
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(Error::config(
            "channel",
            "must contain only lowercase ASCII letters, digits and `_`",
        ));
    }
    Ok(())
}

/// `host:port` of the first host, for messages (never credentials).
fn target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => config
            .get_hostaddrs()
            .first()
            .map_or_else(|| "?".to_owned(), ToString::to_string),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_refuses_what_it_cannot_have_written() {
        for len in 0..20_usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 250) as u8).collect();
            let text = base64::encode(&bytes);
            assert_eq!(text.len(), len.div_ceil(3) * 4);
            assert_eq!(base64::decode(&text), Some(bytes));
        }
        assert_eq!(base64::encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64::encode(b"fo"), "Zm8=");
        for bad in ["Zm8", "Zm=8", "Z===", "Zm8=Zm8=", "Zm9v!mFy"] {
            assert_eq!(base64::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_largest_message_fits_a_notify_payload() {
        let payload = base64::encode(&vec![0; ID_LEN + MAX_MESSAGE]);
        assert!(payload.len() <= MAX_PAYLOAD);
        assert!(base64::encode(&vec![0; ID_LEN + MAX_MESSAGE + 1]).len() > MAX_PAYLOAD);
    }

    #[test]
    fn channels_are_plain_lowercase_identifiers() {
        for good in ["capacitor_invalidate", "a", "0", &"x".repeat(63)] {
            assert!(validate_channel(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Upper",
            "with space",
            "quo\"te",
            "dash-ed",
            &"x".repeat(64),
            "é",
        ] {
            let kind = validate_channel(bad).err().map(|e| e.kind());
            assert_eq!(kind, Some(ErrorKind::Config), "{bad}");
        }
    }
}
