//! [`RedisBus`]: an [`InvalidationBus`] on Redis pub/sub.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capacitor_core::{
    async_trait, BusMessage, Error, ErrorKind, Invalidation, InvalidationBus, InvalidationSink, Operation,
    Result, StorageKey,
};
use fred::clients::{Client, SubscriberClient};
use fred::prelude::{ClientLike, EventInterface, Options, PubsubInterface, Value};
use fred::types::ConnectHandle;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use crate::core::{lock, Health};
use crate::error::{redis_error, timeout_error};

/// Length of the instance id at the start of every message.
const ID_LEN: usize = 8;

/// An [`InvalidationBus`] on Redis pub/sub: [`publish`](InvalidationBus::publish) sends the
/// instance's id and the [`BusMessage`] on the channel; a dedicated subscriber connection
/// delivers the other instances' messages as [`Invalidation::Message`] (its own are
/// ignored), and [`Invalidation::All`] once the first subscription is up and after every
/// re-subscription following a reconnect (messages may have been lost meanwhile: pub/sub
/// does not queue), so that nothing an instance cached before can stay stale.
///
/// Delivery is at most once and fast (one server hop). One publisher connection sends
/// in order, which is the order receivers rely on. A `publish` while the publisher is
/// (re)connecting waits for it up to the command timeout; the composer keeps what could
/// not be sent and sends it when Redis answers again.
///
/// Start-up: call [`connect`](RedisBus::connect) before building the composer, so that
/// the service starts with a bus that is up (or learns at once why it is not).
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), capacitor::Error> {
/// use std::sync::Arc;
/// use capacitor::memory::MokaLayer;
/// use capacitor::redis::{RedisBus, RedisLayer};
/// use capacitor::{LayerConfig, MultiLayer};
///
/// # let url = std::env::var("CAPACITOR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
/// // The default URL, redis://127.0.0.1:6379, for both.
/// let bus = RedisBus::builder()
/// #   .url(&url)
///     .channel("doc:redisbus:invalidate")
///     .build()?;
/// bus.connect().await?;
/// let bus = Arc::new(bus);
/// let redis = RedisLayer::builder()
/// #   .url(&url)
///     .prefix("doc:redisbus:")
///     .build()?;
/// let cache = MultiLayer::<String, u64>::builder()
///     .layer(LayerConfig::new("l1", MokaLayer::builder().max_capacity(1_000).build()?))
///     .layer(LayerConfig::new("redis", redis))
///     .invalidation_bus(bus.clone())
///     .build()?;
/// cache.close().await?;
/// bus.close().await?;
/// # Ok(()) }
/// ```
pub struct RedisBus {
    pub(crate) publisher: Client,
    pub(crate) subscriber: SubscriberClient,
    pub(crate) channel: String,
    pub(crate) instance_id: u64,
    pub(crate) command_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    /// What the two connections last reported, named in errors while they are down.
    pub(crate) health: Health,
    /// What the subscription tasks share with the bus.
    pub(crate) state: Arc<BusState>,
    /// The subscription tasks, one per `subscribe`.
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// What a [`RedisBus`] shares with its subscription tasks, which stop retrying once the
/// bus is closed or the subscriber's connection task has ended.
pub(crate) struct BusState {
    pub(crate) closed: AtomicBool,
    /// fred's connection tasks: they reconnect for as long as they run, so `close` (or
    /// dropping the bus) aborts them. `None` once aborted.
    pub(crate) publisher_connection: Mutex<Option<ConnectHandle>>,
    pub(crate) subscriber_connection: Mutex<Option<ConnectHandle>>,
}

impl BusState {
    /// Connection tasks for `publisher` and `subscriber`.
    pub(crate) fn new(publisher: ConnectHandle, subscriber: ConnectHandle) -> Self {
        BusState {
            closed: AtomicBool::new(false),
            publisher_connection: Mutex::new(Some(publisher)),
            subscriber_connection: Mutex::new(Some(subscriber)),
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether the subscriber may still (re)connect: the bus is open and the subscriber's
    /// connection task runs (it ends after the one attempt of `Reconnect::Never`).
    fn subscriber_may_connect(&self) -> bool {
        !self.is_closed() && !ended(&self.subscriber_connection)
    }

    /// Aborts the connection tasks (and their reconnection loops).
    fn stop_connections(&self) {
        for task in [&self.publisher_connection, &self.subscriber_connection] {
            if let Some(task) = lock(task).take() {
                task.abort();
            }
        }
    }
}

/// Whether a connection task has ended (or was aborted).
fn ended(task: &Mutex<Option<ConnectHandle>>) -> bool {
    lock(task).as_ref().is_none_or(ConnectHandle::is_finished)
}

/// Retries `attempt` every 50 ms until it succeeds; `false` when the subscriber can no
/// longer connect (see [`BusState::subscriber_may_connect`]), so that a closed bus or a
/// connection that is not coming back does not queue commands forever.
async fn retry<F, Fut>(state: &BusState, mut attempt: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<(), fred::error::Error>>,
{
    loop {
        if !state.subscriber_may_connect() {
            return false;
        }
        if attempt().await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBus")
            .field("channel", &self.channel)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

impl RedisBus {
    /// This instance's id, sent with every message it publishes.
    pub fn instance_id(&self) -> u64 {
        self.instance_id
    }

    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Whether both connections are up (and so messages flow both ways).
    pub fn is_connected(&self) -> bool {
        self.publisher.is_connected() && self.subscriber.is_connected()
    }

    /// Waits until both connections are up. Use it to fail at start-up when Redis is
    /// down; without it the bus connects in the background.
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
    /// `Unavailable` when the connections are not up (the failed attempt's error is its
    /// source), `Closed` after close.
    pub async fn connect(&self) -> Result<()> {
        self.health
            .wait_connected(
                Operation::Connect,
                self.connect_timeout,
                || self.is_connected(),
                || self.state.is_closed(),
                || {
                    (!self.publisher.is_connected() && ended(&self.state.publisher_connection))
                        || (!self.subscriber.is_connected() && ended(&self.state.subscriber_connection))
                },
            )
            .await
    }

    /// Refuses new `publish` and `subscribe` calls, stops delivering at once (aborting the
    /// subscription tasks), sends `QUIT` on both connections (waiting at most the command
    /// timeout, and not at all for a connection that is down) and ends their reconnection
    /// loops. It does not wait for a `publish` in flight, which completes or fails.
    /// Idempotent.
    ///
    /// # Errors
    ///
    /// None in practice; disconnect errors are ignored.
    pub async fn close(&self) -> Result<()> {
        self.state.closed.store(true, Ordering::Release);
        self.stop_tasks();
        // A client that is not connected would hold a plain QUIT until it connects or the
        // command times out: it gets a fail-fast one, and its connection task is aborted.
        let fail_fast = Options {
            fail_fast: true,
            ..Options::default()
        };
        let quit = async {
            if self.subscriber.is_connected() {
                let _ = self.subscriber.quit().await;
            } else {
                let _ = self.subscriber.with_options(&fail_fast).quit().await;
            }
            if self.publisher.is_connected() {
                let _ = self.publisher.quit().await;
            } else {
                let _ = self.publisher.with_options(&fail_fast).quit().await;
            }
        };
        let _ = tokio::time::timeout(self.command_timeout, quit).await;
        self.state.stop_connections();
        Ok(())
    }

    /// Aborts the delivery tasks.
    fn stop_tasks(&self) {
        for task in std::mem::take(&mut *lock(&self.tasks)) {
            task.abort();
        }
    }
}

impl Drop for RedisBus {
    /// Stops delivering and aborts the connection tasks, which closes the connections (so
    /// that a bus dropped without `close` does not reconnect forever).
    fn drop(&mut self) {
        self.stop_tasks();
        self.state.stop_connections();
    }
}

#[async_trait]
impl<K> InvalidationBus<K> for RedisBus
where
    K: StorageKey + Clone,
{
    async fn connect(&self) -> Result<()> {
        RedisBus::connect(self).await
    }

    async fn publish(&self, message: &BusMessage<K>) -> Result<()> {
        let op = Operation::Publish;
        if self.state.is_closed() {
            return Err(Error::closed(op));
        }
        // While the connection comes up (at start-up, after an outage) the message waits
        // for it, up to the command timeout, rather than failing at once.
        let started = tokio::time::Instant::now();
        while !self.publisher.is_connected() {
            if self.state.is_closed() {
                return Err(Error::closed(op));
            }
            if started.elapsed() >= self.command_timeout || ended(&self.state.publisher_connection) {
                return Err(self.health.not_connected(op));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let body = message.encode();
        let mut msg = Vec::with_capacity(ID_LEN + body.len());
        msg.extend_from_slice(&self.instance_id.to_le_bytes());
        msg.extend_from_slice(&body);
        let publish = self
            .publisher
            .publish::<i64, _, _>(self.channel.as_str(), Value::from(msg.into_boxed_slice()));
        match tokio::time::timeout(self.command_timeout, publish).await {
            Ok(r) => r.map(|_| ()).map_err(|e| redis_error(op, e)),
            Err(_) => Err(timeout_error(op, self.command_timeout)),
        }
    }

    fn subscribe(&self, sink: InvalidationSink<K>) -> Result<()> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::new(
                ErrorKind::Config,
                Operation::Connect,
                "RedisBus::subscribe must be called inside a tokio runtime",
            ));
        }
        if self.state.is_closed() {
            return Err(Error::closed(Operation::Connect));
        }
        let state = Arc::clone(&self.state);
        let sub = self.subscriber.clone();
        let channel = self.channel.clone();
        let own = self.instance_id;
        // Receivers made before subscribing, so that nothing sent after is missed.
        let mut messages = sub.message_rx();
        let mut reconnects = sub.reconnect_rx();
        let task = tokio::spawn(async move {
            if !retry(&state, || sub.subscribe(channel.as_str())).await {
                return;
            }
            // Connections made before the first subscription lost nothing more than it
            // does: values cached before it was up are cleared now.
            while reconnects.try_recv().is_ok() {}
            sink(Invalidation::All);
            loop {
                tokio::select! {
                    msg = messages.recv() => match msg {
                        Ok(msg) => {
                            let Some(bytes) = msg.value.as_bytes() else { continue };
                            if bytes.len() < ID_LEN || bytes[..ID_LEN] == own.to_le_bytes() {
                                continue;
                            }
                            if let Ok(message) = BusMessage::decode(&bytes[ID_LEN..]) {
                                sink(Invalidation::Message(message));
                            }
                        }
                        Err(RecvError::Lagged(_)) => sink(Invalidation::All),
                        Err(RecvError::Closed) => break,
                    },
                    ev = reconnects.recv() => match ev {
                        Ok(_) | Err(RecvError::Lagged(_)) => {
                            if !retry(&state, || sub.resubscribe_all()).await {
                                break;
                            }
                            sink(Invalidation::All);
                        }
                        Err(RecvError::Closed) => break,
                    },
                }
            }
        });
        lock(&self.tasks).push(task);
        // A `close` racing this call may have stopped the tasks before this one was added.
        if self.state.is_closed() {
            self.stop_tasks();
            return Err(Error::closed(Operation::Connect));
        }
        Ok(())
    }
}
