//! [`RedisTrackingBus`]: Redis client-side caching (`CLIENT TRACKING … BCAST`) as an
//! [`InvalidationBus`].

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capacitor_core::{
    async_trait, BusMessage, Change, Error, ErrorKind, Invalidation, InvalidationBus, InvalidationSink,
    Operation, Result, StorageKey,
};
use fred::clients::Client;
use fred::interfaces::TrackingInterface;
use fred::prelude::{ClientLike, EventInterface, Options};
use fred::types::config::ServerConfig;
use fred::types::{ConnectHandle, RespVersion};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use crate::builder::{connection_setters, Reconnect, RedisConnection};
use crate::core::{lock, Health, Watched};
use crate::error::redis_error;

/// Invalidations fred buffers for the task before it reports a lag (then the in-process
/// layers are cleared).
const INVALIDATION_BUFFER: usize = 4_096;

/// Redis client-side caching as an [`InvalidationBus`]: a dedicated RESP3 connection runs
/// `CLIENT TRACKING ON BCAST PREFIX <prefix>`, and Redis itself sends it the keys under the
/// prefix that any client modifies (a write, a delete, an expiry, an eviction), which the
/// composer drops from its in-process layers. Nothing is published: Redis sees every
/// change to the keys it holds, so [`publish`](InvalidationBus::publish) does nothing.
///
/// Use the prefix of the [`RedisLayer`](crate::RedisLayer) the composer writes through.
/// The composer writes or removes a key in that layer for every change (a change whose
/// write to Redis failed is removed there when Redis answers again), so every change
/// reaches the other instances. What it costs and what it does not do, against
/// [`RedisBus`](crate::RedisBus):
///
/// - any modification of a key under the prefix invalidates it everywhere, a promotion or
///   a loader's fill into Redis included (a `RedisBus` announces only changes), and this
///   instance's own writes evict its own L1 copy a moment after the write (one extra
///   miss);
/// - a read racing an invalidation is handled by the composer as Redis's "caching in
///   progress" guard asks: a copy read before the invalidation was applied is not put in
///   the in-process layers after it;
/// - after a reconnect (invalidations sent meanwhile are lost) tracking is turned on
///   again and the in-process layers are cleared, as after the first `CLIENT TRACKING`;
/// - `FLUSHALL` / `FLUSHDB` are not reported (fred 10 drops Redis's null invalidation);
/// - on a Redis Cluster, fred 10 sends `CLIENT TRACKING … BCAST` to one node only, so
///   the builder refuses cluster URLs: use `RedisBus` there;
/// - the default (non-BCAST) mode is not offered: Redis then reports only the keys a
///   connection read, never a copy the composer cached from its own write or a loader's
///   fill, which would stay stale in L1 (the crate's guide shows it on the server).
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), capacitor::Error> {
/// use std::sync::Arc;
/// use capacitor::memory::MokaLayer;
/// use capacitor::redis::{RedisLayer, RedisTrackingBus};
/// use capacitor::{LayerConfig, MultiLayer};
///
/// # let url = std::env::var("CAPACITOR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
/// let redis = RedisLayer::builder()
/// #   .url(&url)
///     .prefix("doc:tracking:")
///     .build()?;
/// let bus = RedisTrackingBus::builder()
/// #   .url(&url)
///     .prefix("doc:tracking:")
///     .build()?;
/// bus.connect().await?;
/// let cache = MultiLayer::<String, u64>::builder()
///     .layer(LayerConfig::new("l1", MokaLayer::builder().max_capacity(1_000).build()?))
///     .layer(LayerConfig::new("redis", redis))
///     .invalidation_bus(Arc::new(bus))
///     .build()?;
/// cache.close().await?;
/// # Ok(()) }
/// ```
pub struct RedisTrackingBus {
    client: Client,
    prefix: Vec<u8>,
    /// Sender id of the messages this bus delivers (Redis's invalidations carry none).
    id: u64,
    seq: Arc<AtomicU64>,
    connect_timeout: Duration,
    command_timeout: Duration,
    health: Health,
    /// Tracking is on (since the last connection).
    tracking: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    connection: Mutex<Option<ConnectHandle>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Builds a [`RedisTrackingBus`]: the connection options of
/// [`RedisConnection`] and the key prefix to track.
#[must_use]
pub struct RedisTrackingBusBuilder {
    connection: RedisConnection,
    prefix: Option<Vec<u8>>,
}

impl fmt::Debug for RedisTrackingBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTrackingBusBuilder")
            .field("connection", &self.connection)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RedisTrackingBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTrackingBus")
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .finish_non_exhaustive()
    }
}

impl RedisTrackingBus {
    /// A builder with every option at its default (the prefix must be set).
    pub fn builder() -> RedisTrackingBusBuilder {
        RedisTrackingBusBuilder {
            connection: RedisConnection::default(),
            prefix: None,
        }
    }

    /// Whether the connection is up and tracking is on.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected() && self.tracking.load(Ordering::Acquire)
    }

    /// Waits until the connection is up and tracking is on (it is turned on by
    /// [`subscribe`](InvalidationBus::subscribe), which the composer calls at `build`;
    /// before, only the connection is waited for).
    ///
    /// # Errors
    ///
    /// `Unavailable` naming why when Redis cannot be reached within the connect timeout;
    /// `Closed` after close.
    pub async fn connect(&self) -> Result<()> {
        self.health
            .wait_connected(
                Operation::Connect,
                self.connect_timeout,
                || self.client.is_connected(),
                || self.closed.load(Ordering::Acquire),
                || {
                    !self.client.is_connected()
                        && lock(&self.connection)
                            .as_ref()
                            .is_none_or(ConnectHandle::is_finished)
                },
            )
            .await
    }

    /// Stops delivering, sends `QUIT` (bounded by the command timeout) and ends the
    /// reconnection loop. Idempotent.
    ///
    /// # Errors
    ///
    /// None in practice; disconnect errors are ignored.
    pub async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.stop();
        let fail_fast = Options {
            fail_fast: true,
            ..Options::default()
        };
        let quit = async {
            if self.client.is_connected() {
                let _ = self.client.quit().await;
            } else {
                let _ = self.client.with_options(&fail_fast).quit().await;
            }
        };
        let _ = tokio::time::timeout(self.command_timeout, quit).await;
        if let Some(task) = lock(&self.connection).take() {
            task.abort();
        }
        Ok(())
    }

    fn stop(&self) {
        for task in std::mem::take(&mut *lock(&self.tasks)) {
            task.abort();
        }
    }
}

impl Drop for RedisTrackingBus {
    fn drop(&mut self) {
        self.stop();
        if let Some(task) = lock(&self.connection).take() {
            task.abort();
        }
    }
}

impl RedisTrackingBusBuilder {
    connection_setters!();

    /// The key prefix to track: the [`RedisLayerBuilder::prefix`](crate::RedisLayerBuilder::prefix)
    /// of the layer the composer writes through. Required, not empty.
    pub fn prefix(mut self, prefix: impl Into<Vec<u8>>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Validates the options and starts connecting (one RESP3 connection) in the
    /// background.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`]: no or an empty prefix, a Redis Cluster URL (see the type's
    /// docs), the connection options refused as
    /// [`RedisLayerBuilder::build`](crate::RedisLayerBuilder::build) refuses them.
    pub fn build(self) -> Result<RedisTrackingBus> {
        let prefix = match self.prefix {
            Some(p) if !p.is_empty() => p,
            _ => {
                return Err(Error::config(
                    "prefix",
                    "must be set and not empty: the keys to track",
                ))
            }
        };
        let (mut builder, target) = self.connection.fred_builder_with(|config| {
            if matches!(config.server, ServerConfig::Clustered { .. }) {
                return Err(Error::config(
                    "url",
                    "client tracking in BCAST mode is not supported on a Redis Cluster \
                     (fred 10 sends CLIENT TRACKING to one node only); use RedisBus",
                ));
            }
            config.version = RespVersion::RESP3;
            Ok(())
        })?;
        builder.with_performance_config(|p| p.broadcast_channel_capacity = INVALIDATION_BUFFER);
        let client = builder.build().map_err(|e| redis_error(Operation::Build, e))?;
        let health = Health::new(
            target,
            self.connection.reconnect != Reconnect::Never,
            vec![Watched::new(&client)],
        );
        let connection = client.connect();
        Ok(RedisTrackingBus {
            client,
            prefix,
            id: capacitor_core::bus_instance_id(),
            seq: Arc::new(AtomicU64::new(0)),
            connect_timeout: self.connection.connect_timeout,
            command_timeout: self.connection.command_timeout,
            health,
            tracking: Arc::new(AtomicBool::new(false)),
            closed: Arc::new(AtomicBool::new(false)),
            connection: Mutex::new(Some(connection)),
            tasks: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl<K> InvalidationBus<K> for RedisTrackingBus
where
    K: StorageKey + Clone,
{
    async fn connect(&self) -> Result<()> {
        RedisTrackingBus::connect(self).await
    }

    /// Nothing to send: Redis reports the change itself once the key is modified.
    async fn publish(&self, _message: &BusMessage<K>) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(Operation::Publish));
        }
        Ok(())
    }

    fn subscribe(&self, sink: InvalidationSink<K>) -> Result<()> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::new(
                ErrorKind::Config,
                Operation::Subscribe,
                "RedisTrackingBus::subscribe must be called inside a tokio runtime",
            ));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(Operation::Subscribe));
        }
        let client = self.client.clone();
        let prefix = self.prefix.clone();
        let (id, seq) = (self.id, Arc::clone(&self.seq));
        let tracking = Arc::clone(&self.tracking);
        let closed = Arc::clone(&self.closed);
        // Receivers made before tracking starts, so that nothing sent after is missed.
        let mut invalidations = client.invalidation_rx();
        let mut reconnects = client.reconnect_rx();
        let task = tokio::spawn(async move {
            'connection: loop {
                // (Re)start tracking on the current connection.
                tracking.store(false, Ordering::Release);
                loop {
                    if closed.load(Ordering::Acquire) {
                        return;
                    }
                    if client.is_connected()
                        && client
                            .start_tracking(prefix.as_slice(), true, false, false, false)
                            .await
                            .is_ok()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                while reconnects.try_recv().is_ok() {}
                tracking.store(true, Ordering::Release);
                // Anything cached before tracking was on may have changed unseen.
                sink(Invalidation::All);
                loop {
                    tokio::select! {
                        inv = invalidations.recv() => match inv {
                            Ok(inv) => {
                                let keys: Vec<K> = inv
                                    .keys
                                    .iter()
                                    .filter_map(|k| k.as_bytes().strip_prefix(prefix.as_slice()))
                                    .filter_map(|k| K::decode_key(k).ok())
                                    .collect();
                                if !keys.is_empty() {
                                    let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
                                    sink(Invalidation::Message(BusMessage::new(id, n, Change::Keys(keys))));
                                }
                            }
                            Err(RecvError::Lagged(_)) => sink(Invalidation::All),
                            Err(RecvError::Closed) => return,
                        },
                        ev = reconnects.recv() => match ev {
                            // A new connection does not track: turn it on again.
                            Ok(_) | Err(RecvError::Lagged(_)) => continue 'connection,
                            Err(RecvError::Closed) => return,
                        },
                    }
                }
            }
        });
        lock(&self.tasks).push(task);
        if self.closed.load(Ordering::Acquire) {
            self.stop();
            return Err(Error::closed(Operation::Subscribe));
        }
        Ok(())
    }
}
