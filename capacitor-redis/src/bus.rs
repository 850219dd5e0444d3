//! [`RedisBus`]: an [`InvalidationBus`] on Redis pub/sub.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use capacitor_core::{
    async_trait, Error, ErrorKind, Invalidation, InvalidationBus, InvalidationSink, Operation, Result,
    StorageKey,
};
use fred::clients::{Client, SubscriberClient};
use fred::prelude::{ClientLike, EventInterface, PubsubInterface, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use crate::config::{fred_builder, Reconnect, DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_URL};
use crate::error::{redact_url, redis_error, timeout_error, unavailable};

/// The channel used when none is configured.
pub const DEFAULT_CHANNEL: &str = "capacitor:invalidate";

/// Length of the instance id at the start of every message.
const ID_LEN: usize = 8;

/// Builds a [`RedisBus`].
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), capacitor_core::Error> {
/// let bus = capacitor_redis::RedisBus::builder()
///     .url("redis://127.0.0.1:6379")
///     .channel("myapp:invalidate")
///     .build()?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct RedisBusBuilder {
    url: String,
    channel: String,
    command_timeout: Duration,
    connect_timeout: Duration,
    reconnect: Reconnect,
}

impl fmt::Debug for RedisBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBusBuilder")
            .field("url", &redact_url(&self.url))
            .field("channel", &self.channel)
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect", &self.reconnect)
            .finish()
    }
}

impl Default for RedisBusBuilder {
    fn default() -> Self {
        RedisBusBuilder {
            url: DEFAULT_URL.to_owned(),
            channel: DEFAULT_CHANNEL.to_owned(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reconnect: Reconnect::default(),
        }
    }
}

impl RedisBusBuilder {
    /// The server (default [`DEFAULT_URL`]), as for [`RedisLayerBuilder::url`](crate::RedisLayerBuilder::url).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// The pub/sub channel (default [`DEFAULT_CHANNEL`]); every instance sharing a cache
    /// must use the same one.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// How long a `PUBLISH` may take (default 2 s).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// How long one connection attempt may take (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How to reconnect (default: exponential from 50 ms to 2 s, forever).
    pub fn reconnect(mut self, policy: Reconnect) -> Self {
        self.reconnect = policy;
        self
    }

    /// Validates the options and starts connecting (a publishing and a subscribing
    /// connection) in the background.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`]: an empty channel, a bad URL, a zero timeout, or no tokio
    /// runtime.
    pub fn build(self) -> Result<RedisBus> {
        if self.channel.is_empty() {
            return Err(Error::config("channel", "must not be empty"));
        }
        let builder = fred_builder(
            &self.url,
            self.command_timeout,
            self.connect_timeout,
            self.reconnect,
        )?;
        let publisher = builder.build().map_err(|e| redis_error(Operation::Build, e))?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| redis_error(Operation::Build, e))?;
        // The connection tasks run detached (dropping a handle does not stop them) and
        // keep reconnecting under the policy until `close`.
        drop(publisher.connect());
        drop(subscriber.connect());
        Ok(RedisBus {
            publisher,
            subscriber,
            channel: self.channel,
            instance_id: instance_id(),
            command_timeout: self.command_timeout,
            tasks: Mutex::new(Vec::new()),
        })
    }
}

/// A random id for this bus instance (not cryptographic: it only tells instances apart).
fn instance_id() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// An [`InvalidationBus`] on Redis pub/sub: [`publish`](InvalidationBus::publish) sends the
/// instance's id and the key's bytes on the channel; a dedicated subscriber connection
/// delivers the other instances' keys as [`Invalidation::Key`] (its own are ignored), and
/// [`Invalidation::All`] after every re-subscription following a reconnect (messages may
/// have been lost meanwhile: pub/sub does not queue).
///
/// Delivery is at most once and fast (one server hop); staleness after a lost message is
/// bounded by the `All` on reconnect and by the L1 TTL.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), capacitor_core::Error> {
/// use std::sync::Arc;
/// use capacitor_core::{LayerConfig, MultiLayer};
/// use capacitor_memory::MokaLayer;
/// use capacitor_redis::{RedisBus, RedisLayer};
///
/// let cache = MultiLayer::<String, u64>::builder()
///     .layer(LayerConfig::new("l1", MokaLayer::builder().max_capacity(1_000).build()?))
///     .layer(LayerConfig::new("redis", RedisLayer::builder().prefix("app:").build()?))
///     .invalidation_bus(Arc::new(RedisBus::builder().build()?))
///     .build()?;
/// # Ok(()) }
/// ```
pub struct RedisBus {
    publisher: Client,
    subscriber: SubscriberClient,
    channel: String,
    instance_id: u64,
    command_timeout: Duration,
    tasks: Mutex<Vec<JoinHandle<()>>>,
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
    /// A builder with every option at its default.
    pub fn builder() -> RedisBusBuilder {
        RedisBusBuilder::default()
    }

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

    /// Stops delivering and disconnects both connections.
    ///
    /// # Errors
    ///
    /// None in practice; disconnect errors are ignored.
    pub async fn close(&self) -> Result<()> {
        if let Ok(mut tasks) = self.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        let quit = async {
            let _ = self.subscriber.quit().await;
            let _ = self.publisher.quit().await;
        };
        let _ = tokio::time::timeout(self.command_timeout, quit).await;
        Ok(())
    }
}

impl Drop for RedisBus {
    /// Stops delivering and, when a runtime is there, disconnects in the background (so
    /// that a bus dropped without `close` does not reconnect forever).
    fn drop(&mut self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (publisher, subscriber) = (self.publisher.clone(), self.subscriber.clone());
            handle.spawn(async move {
                let _ = subscriber.quit().await;
                let _ = publisher.quit().await;
            });
        }
    }
}

#[async_trait]
impl<K> InvalidationBus<K> for RedisBus
where
    K: StorageKey + Clone,
{
    async fn publish(&self, key: &K) -> Result<()> {
        let op = Operation::Set;
        if !self.publisher.is_connected() {
            return Err(unavailable(op));
        }
        let key = key.encode_key();
        let mut msg = Vec::with_capacity(ID_LEN + key.len());
        msg.extend_from_slice(&self.instance_id.to_le_bytes());
        msg.extend_from_slice(&key);
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
        let sub = self.subscriber.clone();
        let channel = self.channel.clone();
        let own = self.instance_id;
        // Receivers made before subscribing, so that nothing sent after is missed.
        let mut messages = sub.message_rx();
        let mut reconnects = sub.reconnect_rx();
        let task = tokio::spawn(async move {
            while sub.subscribe(channel.as_str()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Connections made before the first subscription lost nothing.
            while reconnects.try_recv().is_ok() {}
            loop {
                tokio::select! {
                    msg = messages.recv() => match msg {
                        Ok(msg) => {
                            let Some(bytes) = msg.value.as_bytes() else { continue };
                            if bytes.len() < ID_LEN || bytes[..ID_LEN] == own.to_le_bytes() {
                                continue;
                            }
                            if let Ok(key) = K::decode_key(&bytes[ID_LEN..]) {
                                sink(Invalidation::Key(key));
                            }
                        }
                        Err(RecvError::Lagged(_)) => sink(Invalidation::All),
                        Err(RecvError::Closed) => break,
                    },
                    ev = reconnects.recv() => match ev {
                        Ok(_) | Err(RecvError::Lagged(_)) => {
                            while sub.resubscribe_all().await.is_err() {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            sink(Invalidation::All);
                        }
                        Err(RecvError::Closed) => break,
                    },
                }
            }
        });
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.push(task);
        }
        Ok(())
    }
}
