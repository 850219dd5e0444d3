//! [`RedisLayerBuilder`]: the layer's options, validated by [`build`](RedisLayerBuilder::build).

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use capacitor_core::{system_clock, BincodeCodec, Clock, Codec, Error, Result, SharedClock, StorageKey};
use fred::prelude::{Builder, ClientLike, Config, ReconnectPolicy};

use crate::error::{redact_url, redis_error};
use crate::layer::{RedisLayer, Shared};

/// The server used when no URL is given.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";
/// Connections in the pool by default.
pub const DEFAULT_POOL_SIZE: usize = 4;

/// The largest [`RedisLayerBuilder::pool_size`]: each pooled client is a connection and a
/// task, opened at build.
pub const MAX_POOL_SIZE: usize = 1024;
/// How long one operation may take by default before it fails with `Timeout`.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connection attempt may take by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The first delay between reconnection attempts by default (doubling up to the maximum).
pub const DEFAULT_RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
/// The longest delay between reconnection attempts by default.
pub const DEFAULT_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
/// The largest encoded value accepted by default (Redis' own limit is 512 MiB).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 64 * 1024 * 1024;
/// The `COUNT` hint of each `SCAN` page by default.
pub const DEFAULT_SCAN_COUNT: u32 = 256;

/// How the layer reconnects after a lost (or never made) connection.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use capacitor_redis::Reconnect;
///
/// let r = Reconnect::Exponential { min: Duration::from_millis(10), max: Duration::from_secs(1) };
/// assert_ne!(r, Reconnect::Never);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Retry forever, waiting `min`, then twice as long each time, up to `max`.
    Exponential {
        /// The first delay.
        min: Duration,
        /// The longest delay.
        max: Duration,
    },
    /// Retry forever with a constant delay.
    Constant(Duration),
    /// Never reconnect: once the connection is lost every operation fails with
    /// `Unavailable`.
    Never,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect::Exponential {
            min: DEFAULT_RECONNECT_MIN_DELAY,
            max: DEFAULT_RECONNECT_MAX_DELAY,
        }
    }
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
}

/// Builds a [`RedisLayer`]. Every option has a documented default; [`build`](Self::build)
/// validates them and starts connecting in the background.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), capacitor_core::Error> {
/// use std::time::Duration;
/// use capacitor_redis::RedisLayer;
///
/// let layer = RedisLayer::builder()
///     .url("redis://127.0.0.1:6379")
///     .prefix("app:")
///     .pool_size(8)
///     .command_timeout(Duration::from_millis(200))
///     .build::<String, String>()?;
/// layer.connect().await?; // optional: fail at start-up when Redis is down
/// # Ok(()) }
/// ```
#[must_use]
pub struct RedisLayerBuilder<C = BincodeCodec> {
    url: String,
    pool_size: usize,
    prefix: Vec<u8>,
    command_timeout: Duration,
    connect_timeout: Duration,
    reconnect: Reconnect,
    max_value_bytes: usize,
    scan_count: u32,
    codec: C,
    clock: SharedClock,
}

impl<C: fmt::Debug> fmt::Debug for RedisLayerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLayerBuilder")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect", &self.reconnect)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("scan_count", &self.scan_count)
            .field("codec", &self.codec)
            .finish_non_exhaustive()
    }
}

impl Default for RedisLayerBuilder<BincodeCodec> {
    fn default() -> Self {
        RedisLayerBuilder {
            url: DEFAULT_URL.to_owned(),
            pool_size: DEFAULT_POOL_SIZE,
            prefix: Vec::new(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reconnect: Reconnect::default(),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            scan_count: DEFAULT_SCAN_COUNT,
            codec: BincodeCodec,
            clock: system_clock(),
        }
    }
}

impl<C> RedisLayerBuilder<C> {
    /// The server, as fred parses it (default [`DEFAULT_URL`]): `redis://[user:pass@]host:port[/db]`,
    /// `rediss://…` (TLS, needs the `tls-rustls` or `tls-native` feature),
    /// `redis-cluster://host:port?node=host2:port2`, `redis-sentinel://host:port/db?sentinelServiceName=…`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Connections in the pool (default [`DEFAULT_POOL_SIZE`], at most [`MAX_POOL_SIZE`]);
    /// operations go round-robin over the connected ones.
    pub fn pool_size(mut self, connections: usize) -> Self {
        self.pool_size = connections;
        self
    }

    /// The namespace every key is stored under (default none): with `"app:"` the `String`
    /// key `user:42` is the Redis key `app:user:42`. With a prefix, the layer owns that
    /// namespace: values there that are not capacitor's are deleted when read.
    pub fn prefix(mut self, prefix: impl AsRef<[u8]>) -> Self {
        self.prefix = prefix.as_ref().to_vec();
        self
    }

    /// How long one operation may take, including a pipeline or transaction (default
    /// [`DEFAULT_COMMAND_TIMEOUT`]); then it fails with `Timeout`.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// How long one connection attempt may take (default [`DEFAULT_CONNECT_TIMEOUT`]); also
    /// how long [`RedisLayer::connect`] waits.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How to reconnect (default: exponential from 50 ms to 2 s, forever).
    pub fn reconnect(mut self, policy: Reconnect) -> Self {
        self.reconnect = policy;
        self
    }

    /// The largest encoded value `set` accepts (default [`DEFAULT_MAX_VALUE_BYTES`]); larger
    /// ones fail with `ValueTooLarge` before anything is sent.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// The `COUNT` hint of each `SCAN` page (default [`DEFAULT_SCAN_COUNT`]).
    pub fn scan_count(mut self, count: u32) -> Self {
        self.scan_count = count;
        self
    }

    /// The clock used to compute expiries (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The value codec (default [`BincodeCodec`]).
    pub fn codec<C2>(self, codec: C2) -> RedisLayerBuilder<C2> {
        RedisLayerBuilder {
            url: self.url,
            pool_size: self.pool_size,
            prefix: self.prefix,
            command_timeout: self.command_timeout,
            connect_timeout: self.connect_timeout,
            reconnect: self.reconnect,
            max_value_bytes: self.max_value_bytes,
            scan_count: self.scan_count,
            codec,
            clock: self.clock,
        }
    }

    /// Validates the options and starts connecting in the background. It does not wait
    /// for the connection (nor fail when Redis is down): until it is up, operations fail
    /// fast with `Unavailable`. Call [`RedisLayer::connect`] to wait for it.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](capacitor_core::ErrorKind::Config) naming the field: a URL
    /// fred cannot parse (the password is not repeated), a zero pool size, timeout,
    /// `max_value_bytes` or `scan_count`, or no tokio runtime to connect from.
    pub fn build<K, V>(self) -> Result<RedisLayer<K, V, C>>
    where
        K: StorageKey,
        V: Send + Sync + 'static,
        C: Codec<V>,
    {
        let builder = fred_builder(
            &self.url,
            self.command_timeout,
            self.connect_timeout,
            self.reconnect,
        )?;
        if self.pool_size == 0 {
            return Err(Error::config("pool_size", "must be at least 1"));
        }
        if self.pool_size > MAX_POOL_SIZE {
            return Err(Error::config(
                "pool_size",
                format!("must be at most {MAX_POOL_SIZE}"),
            ));
        }
        if self.max_value_bytes == 0 {
            return Err(Error::config("max_value_bytes", "must be greater than zero"));
        }
        if self.scan_count == 0 {
            return Err(Error::config("scan_count", "must be greater than zero"));
        }
        let pool = builder
            .build_pool(self.pool_size)
            .map_err(|e| redis_error(capacitor_core::Operation::Build, e))?;
        let clustered = pool.is_clustered();
        // Connects in the background and keeps retrying under the reconnect policy.
        let connections = pool.connect_pool();
        Ok(RedisLayer {
            shared: Arc::new(Shared {
                pool,
                clustered,
                prefix: self.prefix,
                codec: self.codec,
                clock: self.clock,
                max_value_bytes: self.max_value_bytes,
                command_timeout: self.command_timeout,
                connect_timeout: self.connect_timeout,
                scan_count: self.scan_count,
                closed: AtomicBool::new(false),
                in_flight: tokio::sync::RwLock::new(()),
                connections: std::sync::Mutex::new(connections),
                fence: capacitor_core::fence::WriteFence::new(FENCE_MARGIN),
            }),
            _types: PhantomData,
        })
    }
}

/// How long past a timed-out write's deadline its keys stay in doubt: the most the
/// application's and Redis's clocks may differ (a script's `TIME` check to its effect
/// takes no time: scripts run atomically).
const FENCE_MARGIN: Duration = Duration::from_millis(250);

/// A fred builder for `url` with capacitor's timeouts and reconnect policy. Checks that a
/// tokio runtime is there to connect from.
pub(crate) fn fred_builder(
    url: &str,
    command_timeout: Duration,
    connect_timeout: Duration,
    reconnect: Reconnect,
) -> Result<Builder> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::config(
            "build",
            "must be called inside a tokio runtime (it starts the connection tasks)",
        ));
    }
    if command_timeout.is_zero() {
        return Err(Error::config("command_timeout", "must be greater than zero"));
    }
    if connect_timeout.is_zero() {
        return Err(Error::config("connect_timeout", "must be greater than zero"));
    }
    let mut config = Config::from_url(url).map_err(|e| {
        Error::config(
            "url",
            format!("`{}` is not a Redis URL: {}", redact_url(url), e.details()),
        )
    })?;
    // Keep retrying the first connection too: an application starts with Redis down.
    config.fail_fast = false;
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = connect_timeout;
            c.internal_command_timeout = command_timeout;
        })
        .with_performance_config(|p| {
            p.default_command_timeout = command_timeout;
        });
    match reconnect {
        Reconnect::Exponential { min, max } => {
            builder.set_policy(ReconnectPolicy::new_exponential(
                0,
                millis_u32(min),
                millis_u32(max),
                2,
            ));
        }
        Reconnect::Constant(delay) => {
            builder.set_policy(ReconnectPolicy::new_constant(0, millis_u32(delay)));
        }
        Reconnect::Never => {}
    }
    Ok(builder)
}
