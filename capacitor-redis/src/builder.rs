//! The builders and their validation: [`RedisConnection`] (how to reach Redis, shared by
//! both builders), [`RedisLayerBuilder`] and [`RedisBusBuilder`].

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capacitor_core::{
    system_clock, Clock, Codec, DefaultCodec, Error, Operation, Result, SharedClock, StorageKey,
};
use fred::prelude::{Builder, ClientLike, Config, ReconnectPolicy};

use crate::bus::{BusState, RedisBus};
use crate::core::{Health, Shared, Watched};
use crate::error::{redact_url, redis_error};
use crate::layer::RedisLayer;

/// The server used when no URL is given.
const DEFAULT_URL: &str = "redis://127.0.0.1:6379";
/// Connections in the layer's pool by default.
const DEFAULT_POOL_SIZE: usize = 4;
/// How long one operation may take by default before it fails with `Timeout`.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connection attempt may take by default.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The first delay between reconnection attempts by default (doubling up to the maximum).
const DEFAULT_RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
/// The longest delay between reconnection attempts by default.
const DEFAULT_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
/// The largest encoded value accepted by default (Redis' own limit is 512 MiB).
const DEFAULT_MAX_VALUE_BYTES: usize = 64 * 1024 * 1024;
/// The `COUNT` hint of each `SCAN` page by default.
const DEFAULT_SCAN_COUNT: u32 = 256;
/// The bus's pub/sub channel by default.
const DEFAULT_CHANNEL: &str = "capacitor:invalidate";

/// The largest [`RedisLayerBuilder::pool_size`]: each pooled client is a connection and a
/// task, opened at build.
pub const MAX_POOL_SIZE: usize = 1024;

/// How long past a timed-out write's deadline its keys stay in doubt: the most the
/// application's and Redis's clocks may differ (a script's `TIME` check to its effect
/// takes no time: scripts run atomically).
const FENCE_MARGIN: Duration = Duration::from_millis(250);

/// The URL schemes fred connects with (its `valkey` spellings included).
const SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "redis-cluster",
    "rediss-cluster",
    "redis-sentinel",
    "rediss-sentinel",
    "valkey",
    "valkeys",
    "valkey-cluster",
    "valkeys-cluster",
    "valkey-sentinel",
    "valkeys-sentinel",
];

/// The accepted URL forms, for the error of a URL that is not one.
const URL_FORMS: &str = "redis://[user:password@]host[:port][/db], \
    rediss://… (TLS), \
    redis-cluster://host:port[?node=host2:port2…], \
    redis-sentinel://host:port[/db]?sentinelServiceName=name[&node=host2:port2…] \
    (also rediss-cluster:// and rediss-sentinel:// for TLS, and valkey in place of redis)";

/// How the clients reconnect after a lost (or never made) connection.
///
/// Default: [`Exponential`](Reconnect::Exponential) from 50 ms to 2 s, forever.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use capacitor::redis::Reconnect;
///
/// let r = Reconnect::Exponential { min: Duration::from_millis(10), max: Duration::from_secs(1) };
/// assert_ne!(r, Reconnect::Never);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Retry forever, waiting `min`, then twice as long each time, up to `max` (each
    /// delay plus up to 100 ms of random jitter).
    Exponential {
        /// The first delay.
        min: Duration,
        /// The longest delay.
        max: Duration,
    },
    /// Retry forever with a constant delay (plus up to 100 ms of random jitter).
    Constant(Duration),
    /// One connection attempt, never a reconnection: once it failed or the connection is
    /// lost, every operation fails with `Unavailable`.
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

/// Where the server is: a URL, or a fred configuration.
#[derive(Clone)]
enum Server {
    Url(String),
    Fred(Box<Config>),
}

/// How to reach Redis, shared by [`RedisLayerBuilder`], [`RedisBusBuilder`] and
/// [`RedisTrackingBusBuilder`](crate::RedisTrackingBusBuilder): the server (a URL), the
/// command and connect timeouts and the reconnect policy. The builders take it whole
/// ([`RedisLayerBuilder::connection`], [`RedisBusBuilder::connection`]) or one setter at
/// a time (their `url`, `command_timeout`, … setters set the same options).
///
/// Defaults: URL `redis://127.0.0.1:6379`, command timeout 2 s, connect timeout 2 s,
/// reconnect exponential from 50 ms to 2 s, forever ([`Reconnect::default`]).
///
/// TLS: a `rediss://` URL (with the facade's `redis-tls` feature, or this crate's
/// `tls-rustls` or `tls-native`). For certificates of your own there is the fred escape
/// hatch, [`fred_config`](Self::fred_config), the one setter tied to the Redis client.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), capacitor::Error> {
/// use std::time::Duration;
/// use capacitor::redis::{RedisBus, RedisConnection, RedisLayer};
///
/// let url = "redis://127.0.0.1:6379";
/// # let from_env = std::env::var("CAPACITOR_REDIS_URL").unwrap_or_else(|_| url.to_owned()); let url = from_env.as_str();
/// let redis = RedisConnection::new()
///     .url(url)
///     .command_timeout(Duration::from_millis(500));
/// let layer = RedisLayer::builder()
///     .connection(redis.clone())
///     .prefix("doc:connection:")
///     .build::<String, String>()?;
/// let bus = RedisBus::builder().connection(redis).build()?;
/// layer.connect().await?;
/// bus.connect().await?;
/// bus.close().await?;
/// # Ok(()) }
/// ```
#[must_use]
#[derive(Clone)]
pub struct RedisConnection {
    server: Server,
    pub(crate) command_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect: Reconnect,
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RedisConnection");
        match &self.server {
            Server::Url(url) => d.field("url", &redact_url(url)),
            // fred's `Debug` of a `Config` shows the password: only the nodes here.
            Server::Fred(config) => d.field("fred_config", &describe_server(config)),
        };
        d.field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect", &self.reconnect)
            .finish()
    }
}

impl Default for RedisConnection {
    fn default() -> Self {
        RedisConnection {
            server: Server::Url(DEFAULT_URL.to_owned()),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reconnect: Reconnect::default(),
        }
    }
}

impl RedisConnection {
    /// The options at their defaults (see the type's docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// The server, as a URL. Default: `redis://127.0.0.1:6379`.
    ///
    /// Accepted forms: `redis://[user:password@]host[:port][/db]` (port 6379 when left
    /// out), `rediss://…` (TLS, needs the `redis-tls` facade feature),
    /// `redis-cluster://host:port[?node=host2:port2…]`,
    /// `redis-sentinel://host:port[/db]?sentinelServiceName=name[&node=host2:port2…]`,
    /// `rediss-cluster://` and `rediss-sentinel://` for TLS, and `valkey` in place of
    /// `redis` in each. Anything else is refused at build with a `Config` error.
    /// Replaces a [`fred_config`](Self::fred_config).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.server = Server::Url(url.into());
        self
    }

    /// The fred escape hatch: the server as a fred `Config`
    /// (`capacitor::redis::fred::types::config::Config`, through the re-export of fred),
    /// for what a URL cannot say, such as a CA or a client certificate of your own (its
    /// `tls` field, with fred's TLS features). Default: none (the URL). Its `fail_fast`
    /// is set by the [`reconnect`](Self::reconnect) policy, and the timeouts and the
    /// reconnect policy are this type's. Replaces a [`url`](Self::url).
    ///
    /// This is the only item of the crate, besides the `fred` re-export itself, whose
    /// signature names a fred type: it follows fred's releases, and a move to another
    /// Redis client would replace it (see
    /// [Another Redis client](crate#another-redis-client)), where the rest of the API
    /// would stay as it is.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use capacitor::redis::fred::types::config::Config;
    /// use capacitor::redis::{RedisConnection, RedisLayer};
    ///
    /// let url = "redis://127.0.0.1:6379";
    /// # let from_env = std::env::var("CAPACITOR_REDIS_URL").unwrap_or_else(|_| url.to_owned()); let url = from_env.as_str();
    /// let config = Config::from_url(url)?; // then set what the URL cannot say
    /// let layer = RedisLayer::builder()
    ///     .connection(RedisConnection::new().fred_config(config))
    ///     .prefix("doc:fred-config:")
    ///     .build::<String, String>()?;
    /// layer.connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn fred_config(mut self, config: Config) -> Self {
        self.server = Server::Fred(Box::new(config));
        self
    }

    /// How long one operation may take, a batch's scripts or pipeline included; then it
    /// fails with `Timeout`. Default: 2 s. Must be greater than zero.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// How long one connection attempt may take, and how long `connect` waits for a
    /// connection when attempts neither succeed nor fail. Default: 2 s. Must be greater
    /// than zero.
    ///
    /// `connect` returns as soon as a connection is up, or as soon as an attempt made
    /// while it waits fails (refused, unknown host, a database index or credentials the
    /// server refuses), naming the cause (with [`Reconnect::Never`], at once when its one
    /// attempt has failed), and otherwise fails after `connect_timeout`. Either way the clients keep reconnecting in the background (unless
    /// [`Reconnect::Never`]): a service that starts before Redis can skip `connect`, or
    /// call it again.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How to reconnect. Default: exponential from 50 ms to 2 s, forever.
    pub fn reconnect(mut self, policy: Reconnect) -> Self {
        self.reconnect = policy;
        self
    }

    /// A fred builder for these options, and where it connects (for messages). Checks
    /// that a tokio runtime is there to connect from.
    fn fred_builder(&self) -> Result<(Builder, String)> {
        self.fred_builder_with(|_| Ok(()))
    }

    /// [`fred_builder`](Self::fred_builder), with `tweak` applied to fred's configuration
    /// first (it may refuse the configuration).
    pub(crate) fn fred_builder_with(
        &self,
        tweak: impl FnOnce(&mut Config) -> Result<()>,
    ) -> Result<(Builder, String)> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::config(
                "build",
                "must be called inside a tokio runtime (it starts the connection tasks)",
            ));
        }
        if self.command_timeout.is_zero() {
            return Err(Error::config("command_timeout", "must be greater than zero"));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::config("connect_timeout", "must be greater than zero"));
        }
        let mut config = match &self.server {
            Server::Url(url) => parse_url(url)?,
            Server::Fred(config) => (**config).clone(),
        };
        tweak(&mut config)?;
        let target = describe_server(&config);
        // Keep retrying the first connection too (an application starts with Redis down),
        // unless the policy is to make one attempt only.
        config.fail_fast = self.reconnect == Reconnect::Never;
        let mut builder = Builder::from_config(config);
        let (command_timeout, connect_timeout) = (self.command_timeout, self.connect_timeout);
        builder
            .with_connection_config(|c| {
                c.connection_timeout = connect_timeout;
                c.internal_command_timeout = command_timeout;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = command_timeout;
            });
        match self.reconnect {
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
        Ok((builder, target))
    }
}

/// `url` as fred parses it, once its scheme is one fred connects with. Leading and
/// trailing spaces and control characters are ignored, as a URL parser ignores them.
fn parse_url(url: &str) -> Result<Config> {
    let url = url.trim_matches(|c: char| c <= ' ');
    let shown = redact_url(url);
    let Some((scheme, _)) = url.split_once("://") else {
        // Not shown: there is no telling where a password would be in it.
        return Err(Error::config(
            "url",
            format!("not a URL (no `scheme://`); accepted forms: {URL_FORMS}"),
        ));
    };
    let scheme = scheme.to_ascii_lowercase();
    if !SCHEMES.contains(&scheme.as_str()) {
        return Err(Error::config(
            "url",
            format!("`{shown}`: the scheme `{scheme}://` is not Redis'; accepted forms: {URL_FORMS}"),
        ));
    }
    if cfg!(not(any(feature = "tls-rustls", feature = "tls-native")))
        && (scheme.starts_with("rediss") || scheme.starts_with("valkeys"))
    {
        return Err(Error::config(
            "url",
            format!(
                "`{shown}` asks for TLS, which a URL gets only with a TLS feature of this \
                 crate: enable the facade's `redis-tls` feature (capacitor-redis' \
                 `tls-rustls` or `tls-native`), or, with fred's own TLS enabled, pass \
                 `RedisConnection::fred_config(..)` a fred `Config` whose `tls` field is set"
            ),
        ));
    }
    Config::from_url(url).map_err(|e| {
        Error::config(
            "url",
            format!(
                "`{shown}` is not a Redis URL: {}; accepted forms: {URL_FORMS}",
                e.details()
            ),
        )
    })
}

/// Where `config` connects, for messages: `host:port[/db]`, or the nodes of a cluster or
/// of the sentinels (never credentials).
fn describe_server(config: &Config) -> String {
    let hosts: Vec<String> = config.server.hosts().iter().map(ToString::to_string).collect();
    let hosts = hosts.join(", ");
    if config.server.is_clustered() {
        format!("{hosts} (cluster)")
    } else if config.server.is_sentinel() {
        format!("{hosts} (sentinel)")
    } else {
        match config.database {
            Some(db) => format!("{hosts}/{db}"),
            None => hosts,
        }
    }
}

/// The connection setters of a builder holding a [`RedisConnection`] in its `connection`
/// field: each delegates to the [`RedisConnection`] setter of the same name. The fred
/// escape hatch, [`RedisConnection::fred_config`], is not among them: the builders'
/// own API names no fred type.
macro_rules! connection_setters {
    () => {
        /// How to reach Redis, all options at once (replacing any set before). Default:
        /// [`RedisConnection::new`].
        pub fn connection(mut self, connection: RedisConnection) -> Self {
            self.connection = connection;
            self
        }

        /// The server URL. Default: `redis://127.0.0.1:6379`. Forms and checks: see
        /// [`RedisConnection::url`].
        pub fn url(mut self, url: impl Into<String>) -> Self {
            self.connection = self.connection.url(url);
            self
        }

        /// How long one operation may take before it fails with `Timeout`. Default: 2 s.
        /// See [`RedisConnection::command_timeout`].
        pub fn command_timeout(mut self, timeout: Duration) -> Self {
            self.connection = self.connection.command_timeout(timeout);
            self
        }

        /// How long one connection attempt may take, and how long `connect` waits when
        /// attempts neither succeed nor fail (a failed attempt fails it at once).
        /// Default: 2 s. See [`RedisConnection::connect_timeout`].
        pub fn connect_timeout(mut self, timeout: Duration) -> Self {
            self.connection = self.connection.connect_timeout(timeout);
            self
        }

        /// How to reconnect. Default: exponential from 50 ms to 2 s, forever. See
        /// [`RedisConnection::reconnect`].
        pub fn reconnect(mut self, policy: Reconnect) -> Self {
            self.connection = self.connection.reconnect(policy);
            self
        }
    };
}
pub(crate) use connection_setters;

/// Builds a [`RedisLayer`]. [`build`](Self::build) validates the options and starts
/// connecting in the background.
///
/// Defaults:
///
/// | option | default |
/// |---|---|
/// | [`url`](Self::url) | `redis://127.0.0.1:6379` |
/// | [`pool_size`](Self::pool_size) | 4 connections (at most [`MAX_POOL_SIZE`]) |
/// | [`prefix`](Self::prefix) | none |
/// | [`command_timeout`](Self::command_timeout) | 2 s |
/// | [`connect_timeout`](Self::connect_timeout) | 2 s |
/// | [`reconnect`](Self::reconnect) | exponential from 50 ms to 2 s, forever |
/// | [`max_value_bytes`](Self::max_value_bytes) | 64 MiB |
/// | [`scan_count`](Self::scan_count) | 256 |
/// | [`codec`](Self::codec) | [`DefaultCodec`] |
/// | [`clock`](Self::clock) | the system clock |
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), capacitor::Error> {
/// use std::time::Duration;
/// use capacitor::redis::RedisLayer;
///
/// let url = "redis://127.0.0.1:6379";
/// # let from_env = std::env::var("CAPACITOR_REDIS_URL").unwrap_or_else(|_| url.to_owned()); let url = from_env.as_str();
/// let layer = RedisLayer::builder()
///     .url(url)
///     .prefix("doc:builder:")
///     .pool_size(8)
///     .command_timeout(Duration::from_millis(200))
///     .build::<String, String>()?;
/// layer.connect().await?; // optional: fail at start-up when Redis is down
/// # Ok(()) }
/// ```
#[must_use]
pub struct RedisLayerBuilder<C = DefaultCodec> {
    connection: RedisConnection,
    pool_size: usize,
    prefix: Vec<u8>,
    max_value_bytes: usize,
    scan_count: u32,
    codec: C,
    clock: SharedClock,
}

impl<C: fmt::Debug> fmt::Debug for RedisLayerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLayerBuilder")
            .field("connection", &self.connection)
            .field("pool_size", &self.pool_size)
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .field("max_value_bytes", &self.max_value_bytes)
            .field("scan_count", &self.scan_count)
            .field("codec", &self.codec)
            .finish_non_exhaustive()
    }
}

impl Default for RedisLayerBuilder<DefaultCodec> {
    fn default() -> Self {
        RedisLayerBuilder {
            connection: RedisConnection::default(),
            pool_size: DEFAULT_POOL_SIZE,
            prefix: Vec::new(),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            scan_count: DEFAULT_SCAN_COUNT,
            codec: DefaultCodec::default(),
            clock: system_clock(),
        }
    }
}

impl RedisLayer<(), ()> {
    /// A builder with every option at its default.
    pub fn builder() -> RedisLayerBuilder {
        RedisLayerBuilder::default()
    }
}

impl<C> RedisLayerBuilder<C> {
    connection_setters!();

    /// Connections in the pool; operations go round-robin over the connected ones.
    /// Default: 4. At least 1, at most [`MAX_POOL_SIZE`].
    pub fn pool_size(mut self, connections: usize) -> Self {
        self.pool_size = connections;
        self
    }

    /// The namespace every key is stored under: with `"app:"` the `String` key `user:42`
    /// is the Redis key `app:user:42`. With a prefix, the layer owns that namespace:
    /// values there that are not capacitor's are deleted when read. Default: none.
    pub fn prefix(mut self, prefix: impl AsRef<[u8]>) -> Self {
        self.prefix = prefix.as_ref().to_vec();
        self
    }

    /// The largest encoded value `set` accepts; larger ones fail with `ValueTooLarge`
    /// before anything is sent. Default: 64 MiB (Redis' own limit is 512 MiB). Must be
    /// greater than zero.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// The `COUNT` hint of each `SCAN` page. Default: 256. Must be greater than zero.
    pub fn scan_count(mut self, count: u32) -> Self {
        self.scan_count = count;
        self
    }

    /// The clock used to compute expiries. Default: the system clock.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The value codec. Default: [`DefaultCodec`].
    pub fn codec<C2>(self, codec: C2) -> RedisLayerBuilder<C2> {
        RedisLayerBuilder {
            connection: self.connection,
            pool_size: self.pool_size,
            prefix: self.prefix,
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
    /// that does not parse or whose scheme is not Redis' (the error lists the accepted
    /// forms; the password is never repeated), a `rediss://` URL in a build without TLS,
    /// a pool size of 0 or over [`MAX_POOL_SIZE`], a zero timeout, `max_value_bytes` or
    /// `scan_count`, or no tokio runtime to connect from.
    pub fn build<K, V>(self) -> Result<RedisLayer<K, V, C>>
    where
        K: StorageKey,
        V: Send + Sync + 'static,
        C: Codec<V>,
    {
        let (builder, target) = self.connection.fred_builder()?;
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
            .map_err(|e| redis_error(Operation::Build, e))?;
        let clustered = pool.is_clustered();
        // Listening before connecting, so that the first failed attempt is seen.
        let health = Health::new(
            target,
            self.connection.reconnect != Reconnect::Never,
            pool.clients().iter().map(Watched::new).collect(),
        );
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
                command_timeout: self.connection.command_timeout,
                connect_timeout: self.connection.connect_timeout,
                scan_count: self.scan_count,
                closed: AtomicBool::new(false),
                in_flight: tokio::sync::RwLock::new(()),
                connections: Mutex::new(connections),
                fence: capacitor_core::fence::WriteFence::new(FENCE_MARGIN),
                health,
            }),
            _types: PhantomData,
        })
    }
}

/// Builds a [`RedisBus`]. [`build`](Self::build) validates the options and starts
/// connecting (a publishing and a subscribing connection) in the background.
///
/// Defaults:
///
/// | option | default |
/// |---|---|
/// | [`url`](Self::url) | `redis://127.0.0.1:6379` |
/// | [`channel`](Self::channel) | `capacitor:invalidate` |
/// | [`command_timeout`](Self::command_timeout) | 2 s |
/// | [`connect_timeout`](Self::connect_timeout) | 2 s |
/// | [`reconnect`](Self::reconnect) | exponential from 50 ms to 2 s, forever |
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), capacitor::Error> {
/// use capacitor::redis::RedisBus;
///
/// let url = "redis://127.0.0.1:6379";
/// # let from_env = std::env::var("CAPACITOR_REDIS_URL").unwrap_or_else(|_| url.to_owned()); let url = from_env.as_str();
/// let bus = RedisBus::builder()
///     .url(url)
///     .channel("doc:bus:invalidate")
///     .build()?;
/// bus.connect().await?; // optional: fail at start-up when Redis is down
/// bus.close().await?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct RedisBusBuilder {
    connection: RedisConnection,
    channel: String,
}

impl fmt::Debug for RedisBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBusBuilder")
            .field("connection", &self.connection)
            .field("channel", &self.channel)
            .finish()
    }
}

impl Default for RedisBusBuilder {
    fn default() -> Self {
        RedisBusBuilder {
            connection: RedisConnection::default(),
            channel: DEFAULT_CHANNEL.to_owned(),
        }
    }
}

impl RedisBus {
    /// A builder with every option at its default.
    pub fn builder() -> RedisBusBuilder {
        RedisBusBuilder::default()
    }
}

impl RedisBusBuilder {
    connection_setters!();

    /// The pub/sub channel; every instance sharing a cache must use the same one.
    /// Default: `capacitor:invalidate`. Must not be empty.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }

    /// Validates the options and starts connecting (a publishing and a subscribing
    /// connection) in the background. Call [`RedisBus::connect`] to wait for them.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](capacitor_core::ErrorKind::Config): an empty channel, a URL
    /// refused as [`RedisLayerBuilder::build`] refuses it, a zero timeout, or no tokio
    /// runtime.
    pub fn build(self) -> Result<RedisBus> {
        if self.channel.is_empty() {
            return Err(Error::config("channel", "must not be empty"));
        }
        let (builder, target) = self.connection.fred_builder()?;
        let publisher = builder.build().map_err(|e| redis_error(Operation::Build, e))?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| redis_error(Operation::Build, e))?;
        // Listening before connecting, so that the first failed attempt is seen.
        let health = Health::new(
            target,
            self.connection.reconnect != Reconnect::Never,
            vec![Watched::new(&publisher), Watched::new(&subscriber)],
        );
        // The connection tasks keep reconnecting under the policy until `close`.
        let state = Arc::new(BusState::new(publisher.connect(), subscriber.connect()));
        Ok(RedisBus {
            publisher,
            subscriber,
            channel: self.channel,
            instance_id: capacitor_core::bus_instance_id(),
            command_timeout: self.connection.command_timeout,
            connect_timeout: self.connection.connect_timeout,
            health,
            state,
            tasks: Mutex::new(Vec::new()),
        })
    }
}
