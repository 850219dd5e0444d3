//! [`PostgresLayerBuilder`]: the user's options, their validation, and connecting.

use std::any::TypeId;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use capacitor_core::background::Stop;
use capacitor_core::{
    envelope, system_clock, Clock, Codec, DefaultCodec, Error, Operation, Result, SharedClock, StorageKey,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{NoTls, Socket};

use crate::core::Shared;
use crate::error::pool_error;
use crate::key::KeyFormat;
use crate::layer::PostgresLayer;
use crate::schema::{self, Table};
use crate::sql::Statements;
use crate::sweep;

/// The largest [`PostgresLayerBuilder::pool_size`], beyond any server's
/// `max_connections` (the pool reserves room for this many at build).
pub const MAX_POOL_SIZE: usize = 10_000;

// The defaults, listed on `PostgresLayerBuilder` and on each setter.
const DEFAULT_SCHEMA: &str = "public";
const DEFAULT_TABLE: &str = "capacitor_kv";
const DEFAULT_POOL_SIZE: usize = 16;
/// The pool's wait, create and recycle timeouts, each.
const DEFAULT_POOL_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_FENCE_MARGIN: Duration = Duration::from_millis(250);
const DEFAULT_MAX_VALUE_BYTES: usize = 64 * 1024 * 1024;
const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_SWEEP_BATCH: usize = 1_000;
const DEFAULT_SCAN_PAGE_SIZE: usize = 256;

/// The largest `bytea` PostgreSQL stores is 1 GB, envelope included.
const MAX_BYTEA: usize = (1 << 30) - 1;

/// Where the connection settings come from.
pub(crate) enum Source {
    None,
    /// Kept as given until [`PostgresLayerBuilder::build`] parses it; never printed.
    Url(String),
    Config(Box<tokio_postgres::Config>),
}

impl Source {
    /// The driver's configuration: the URL parsed (its problems named without quoting
    /// it), or the given `Config`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](capacitor_core::ErrorKind::Config) for no source, a URL that
    /// does not parse, or one that names no host.
    pub(crate) fn resolve(self) -> Result<tokio_postgres::Config> {
        let pg = match self {
            Source::None => return Err(Error::config("url", "one of `url` or `config` is required")),
            // No source: the driver's error may quote the string (see `parse_problem`).
            Source::Url(url) => url.parse::<tokio_postgres::Config>().map_err(|e| {
                Error::config(
                    "url",
                    format!(
                        "is not a valid PostgreSQL connection URL or key-value string: {}",
                        parse_problem(&e)
                    ),
                )
            })?,
            Source::Config(config) => *config,
        };
        if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
            return Err(Error::config("url", "names no host"));
        }
        Ok(pg)
    }

    /// How `Debug` shows it: never the URL.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Source::None => "none",
            Source::Url(_) => "url (redacted)",
            Source::Config(_) => "tokio_postgres::Config",
        }
    }
}

/// What is wrong with a connection string tokio-postgres did not parse, without quoting
/// the string. The driver's own messages may quote part of it (an unknown option's name,
/// an unexpected character), which may be a password: only those known to quote nothing
/// are passed on, and the driver's error is not kept as the source (its `Debug` shows
/// them).
fn parse_problem(err: &tokio_postgres::Error) -> &'static str {
    let cause = std::error::Error::source(err)
        .map(ToString::to_string)
        .unwrap_or_default();
    const KEPT: &[&str] = &[
        "unexpected EOF",
        "unterminated quoted connection parameter value",
        "unterminated parameter",
    ];
    if let Some(kept) = KEPT.iter().find(|k| **k == cause) {
        return kept;
    }
    // `invalid value for option `port`` names one of the driver's own options.
    if let Some(option) = cause
        .strip_prefix("invalid value for option `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        return match option {
            "sslmode" => "invalid value for option `sslmode`",
            "sslnegotiation" => "invalid value for option `sslnegotiation`",
            "hostaddr" => "invalid value for option `hostaddr`",
            "host" => "invalid value for option `host`",
            "port" => "invalid value for option `port`",
            "connect_timeout" => "invalid value for option `connect_timeout`",
            "tcp_user_timeout" => "invalid value for option `tcp_user_timeout`",
            "keepalives" => "invalid value for option `keepalives`",
            "keepalives_idle" => "invalid value for option `keepalives_idle`",
            "keepalives_interval" => "invalid value for option `keepalives_interval`",
            "keepalives_retries" => "invalid value for option `keepalives_retries`",
            "target_session_attrs" => "invalid value for option `target_session_attrs`",
            "channel_binding" => "invalid value for option `channel_binding`",
            "load_balance_hosts" => "invalid value for option `load_balance_hosts`",
            _ => "an invalid option value",
        };
    }
    if cause.starts_with("unknown option") {
        return "an unknown option (its name is not shown)";
    }
    if cause.starts_with("invalid utf-8") || cause.starts_with("incomplete utf-8") {
        return "invalid percent-encoded UTF-8";
    }
    "malformed (the details are not shown: they may quote the string)"
}

/// Makes the pool's manager with the TLS connector the user chose.
type MakeManager = Box<dyn FnOnce(tokio_postgres::Config, ManagerConfig) -> Manager + Send + Sync>;

/// Builds a [`PostgresLayer`]; [`build`](PostgresLayerBuilder::build) validates every
/// option, connects, creates the table when asked to, checks its shape and starts the
/// sweeper.
///
/// Required: [`url`](Self::url) or [`config`](Self::config).
///
/// Defaults:
///
/// - [`schema`](Self::schema) `public`, [`table`](Self::table) `capacitor_kv`;
///   [`create_table`](Self::create_table) `true`, [`unlogged`](Self::unlogged) `false`
/// - [`pool_size`](Self::pool_size) 16 connections; [`wait_timeout`](Self::wait_timeout),
///   [`create_timeout`](Self::create_timeout) and [`recycle_timeout`](Self::recycle_timeout)
///   5 s each
/// - [`statement_timeout`](Self::statement_timeout) 30 s;
///   [`operation_timeout`](Self::operation_timeout) the statement timeout plus 500 ms;
///   [`fence_margin`](Self::fence_margin) 250 ms
/// - [`sweeper`](Self::sweeper) on, [`sweep_interval`](Self::sweep_interval) 60 s,
///   [`sweep_batch`](Self::sweep_batch) 1,000 rows
/// - [`max_value_bytes`](Self::max_value_bytes) 64 MiB;
///   [`scan_page_size`](Self::scan_page_size) 256 rows
/// - [`key_format`](Self::key_format) [`KeyFormat::Text`] for `String` keys,
///   [`KeyFormat::Hex`] otherwise
/// - no TLS; [`codec`](Self::codec) [`DefaultCodec`]; [`clock`](Self::clock) the system
///   clock; `application_name=capacitor` unless the URL sets one
///
/// The `Debug` output never shows the URL or the password.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), capacitor::Error> {
/// use std::time::Duration;
/// use capacitor::postgres::PostgresLayer;
///
/// let layer = PostgresLayer::builder()
///     .url("postgres://app:secret@db.internal:5432/app")
///     .schema("cache")
///     .table("sessions")
///     .pool_size(32)
///     .wait_timeout(Duration::from_millis(500))
///     .statement_timeout(Duration::from_secs(2))
///     .unlogged(true) // faster writes; emptied by a server crash
///     .sweep_interval(Duration::from_secs(30))
///     .build::<String, Vec<u8>>()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct PostgresLayerBuilder<C = DefaultCodec> {
    source: Source,
    schema: String,
    table: String,
    pool: PoolConfig,
    statement_timeout: Duration,
    operation_timeout: Option<Duration>,
    fence_margin: Duration,
    max_value_bytes: usize,
    create_table: bool,
    unlogged: bool,
    tags: bool,
    sweeper: bool,
    sweep_interval: Duration,
    sweep_batch: usize,
    scan_page_size: usize,
    key_format: Option<KeyFormat>,
    tls: Option<MakeManager>,
    codec: C,
    clock: SharedClock,
}

impl<C: fmt::Debug> fmt::Debug for PostgresLayerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = self.source.describe();
        f.debug_struct("PostgresLayerBuilder")
            .field("source", &source)
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("pool", &self.pool)
            .field("statement_timeout", &self.statement_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("create_table", &self.create_table)
            .field("unlogged", &self.unlogged)
            .field("tags", &self.tags)
            .field("sweeper", &self.sweeper)
            .field("sweep_interval", &self.sweep_interval)
            .field("sweep_batch", &self.sweep_batch)
            .field("scan_page_size", &self.scan_page_size)
            .field("key_format", &self.key_format)
            .field("tls", &self.tls.as_ref().map(|_| "custom connector"))
            .field("codec", &self.codec)
            .finish_non_exhaustive()
    }
}

impl PostgresLayer<(), (), DefaultCodec> {
    /// A builder with the defaults listed on [`PostgresLayerBuilder`].
    pub fn builder() -> PostgresLayerBuilder {
        PostgresLayerBuilder::new()
    }
}

impl PostgresLayerBuilder<DefaultCodec> {
    fn new() -> Self {
        PostgresLayerBuilder {
            source: Source::None,
            schema: DEFAULT_SCHEMA.to_owned(),
            table: DEFAULT_TABLE.to_owned(),
            pool: PoolConfig {
                max_size: DEFAULT_POOL_SIZE,
                timeouts: Timeouts {
                    wait: Some(DEFAULT_POOL_TIMEOUT),
                    create: Some(DEFAULT_POOL_TIMEOUT),
                    recycle: Some(DEFAULT_POOL_TIMEOUT),
                },
                ..PoolConfig::default()
            },
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            operation_timeout: None,
            fence_margin: DEFAULT_FENCE_MARGIN,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            create_table: true,
            unlogged: false,
            tags: false,
            sweeper: true,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            sweep_batch: DEFAULT_SWEEP_BATCH,
            scan_page_size: DEFAULT_SCAN_PAGE_SIZE,
            key_format: None,
            tls: None,
            codec: DefaultCodec::default(),
            clock: system_clock(),
        }
    }
}

impl<C> PostgresLayerBuilder<C> {
    /// Connect with a URL (`postgres://user:password@host:5432/db?sslmode=require`) or a
    /// key-value string (`host=… user=… dbname=…`), as
    /// [`tokio_postgres::Config`] parses them. Parsed by [`build`](Self::build); the URL
    /// never appears in errors or `Debug` output.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.source = Source::Url(url.into());
        self
    }

    /// Connect with a [`tokio_postgres::Config`] built in code (replaces [`url`](Self::url)).
    pub fn config(mut self, config: tokio_postgres::Config) -> Self {
        self.source = Source::Config(Box::new(config));
        self
    }

    /// The schema of the table, created with the table when missing. A plain identifier:
    /// `[A-Za-z_][A-Za-z0-9_]{0,62}`, used quoted (case kept). Default: `public`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The table. A plain identifier: `[A-Za-z_][A-Za-z0-9_]{0,62}`, used quoted (case
    /// kept). Anything else is refused by [`build`](Self::build), never spliced into SQL.
    /// Default: `capacitor_kv`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The most connections the pool opens, at most [`MAX_POOL_SIZE`]. The sweeper and
    /// every scan page take one for the duration of one statement. Default: 16.
    pub fn pool_size(mut self, connections: usize) -> Self {
        self.pool.max_size = connections;
        self
    }

    /// How long an operation waits for a free pooled connection before failing with
    /// [`ErrorKind::Timeout`](capacitor_core::ErrorKind::Timeout). Default: 5 s.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.pool.timeouts.wait = Some(timeout);
        self
    }

    /// How long opening a new connection may take; also tokio-postgres's
    /// `connect_timeout` unless the URL sets one. Default: 5 s.
    pub fn create_timeout(mut self, timeout: Duration) -> Self {
        self.pool.timeouts.create = Some(timeout);
        self
    }

    /// How long checking a pooled connection before reuse may take. Default: 5 s.
    pub fn recycle_timeout(mut self, timeout: Duration) -> Self {
        self.pool.timeouts.recycle = Some(timeout);
        self
    }

    /// The whole deadpool configuration (size, timeouts — `None` waits forever — and
    /// queue mode), replacing [`pool_size`](Self::pool_size) and the three timeouts.
    /// Default: 16 connections, 5 s for each timeout, deadpool's FIFO queue.
    pub fn pool_config(mut self, config: PoolConfig) -> Self {
        self.pool = config;
        self
    }

    /// The longest a statement may run on the server before PostgreSQL cancels it and the
    /// operation fails with [`ErrorKind::Timeout`](capacitor_core::ErrorKind::Timeout)
    /// (SQLSTATE 57014). Zero disables it (PostgreSQL's meaning of `0`), so the server's
    /// own setting applies. Default: 30 s.
    ///
    /// Set per connection at connect time, as the startup parameter
    /// `options=-c statement_timeout=<ms>` (appended to any `options` the URL has), so it
    /// costs no round trip. Connection poolers that reject startup options (PgBouncer in
    /// transaction mode) need zero here and the timeout set on the role instead
    /// (`ALTER ROLE app SET statement_timeout = '2s'`).
    ///
    /// `build()` checks and creates the table in one transaction whose statement timeout is
    /// this one or 30 s, whichever is longer, so that a short timeout meant for reads and
    /// writes does not cancel DDL waiting on a busy catalog. With zero it sets none, so a
    /// role-level timeout applies to the DDL too.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// The longest any operation of the layer may take on the client side, waiting for a
    /// pooled connection included; past it the operation fails with
    /// [`ErrorKind::Timeout`](capacitor_core::ErrorKind::Timeout). The server enforces
    /// `statement_timeout` only on queries it received: over a stalled or partitioned
    /// network, this is what keeps a query from waiting minutes for the kernel to give up
    /// on the connection. Zero is rejected by `build()`. Default: the statement timeout
    /// (30 s when that is zero) plus 500 ms, so that a slow statement fails with the
    /// server's error first.
    ///
    /// A connection whose operation timed out on the client side is closed, not returned
    /// to the pool: later queries on it would wait behind the reply the server still
    /// owes. A write that timed out may still be applied, but only until this timeout's
    /// end (every write carries that deadline and PostgreSQL skips a write that starts
    /// later), and a later write of the same key through this layer is held back until
    /// the deadline plus the [`fence_margin`](Self::fence_margin) has passed: a write
    /// that failed never lands after one that was acknowledged.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = Some(timeout);
        self
    }

    /// How long past a timed-out write's deadline its keys stay in doubt: the most the
    /// application's and the server's clocks may differ, plus the time a commit may take
    /// after its deadline check. A later write of such a key waits until then (or fails
    /// with a timeout if its own deadline comes first). Default: 250 ms.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use capacitor::postgres::PostgresLayer;
    ///
    /// let builder = PostgresLayer::builder().fence_margin(Duration::from_millis(500));
    /// # let _ = builder;
    /// ```
    pub fn fence_margin(mut self, margin: Duration) -> Self {
        self.fence_margin = margin;
        self
    }

    /// The largest encoded value (the codec's output, before the 13-byte envelope) a write
    /// accepts; larger ones fail with
    /// [`ErrorKind::ValueTooLarge`](capacitor_core::ErrorKind::ValueTooLarge) before
    /// anything is sent. At most 1 GB minus the envelope (PostgreSQL's `bytea` limit).
    /// Default: 64 MiB.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// Create the table (and its schema and expiry index) when it does not exist. With
    /// `false` a missing table is a configuration error at build; create it yourself with
    /// [`ddl`](Self::ddl). Default: `true`.
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }

    /// Use an `UNLOGGED` table: writes skip PostgreSQL's write-ahead log, which makes them
    /// faster, and a server **crash** (not a clean restart) empties the table; it is not
    /// replicated to standbys either. Fits a cache whose data can be rebuilt. An existing
    /// table must match (checked at build). Default: `false`.
    pub fn unlogged(mut self, unlogged: bool) -> Self {
        self.unlogged = unlogged;
        self
    }

    /// Keep tags: [`set_tagged`](capacitor_core::Layer::set_tagged) and
    /// [`remove_by_tag`](capacitor_core::Layer::remove_by_tag) work (and
    /// [`Capabilities::tags`](capacitor_core::Capabilities::tags) is declared), so that the
    /// layer can be the authoritative layer of a `MultiLayer` whose writes carry tags.
    ///
    /// They live in a companion table, `<table>_tags (key, tag)` with an index on `tag`
    /// and a foreign key to the table that cascades deletes, created with the table
    /// (also next to an existing one) unless [`create_table(false)`](Self::create_table),
    /// and checked at build either way (see [`ddl`](Self::ddl)). With tags on, every
    /// plain write (`set`, `set_many`, `apply_atomic`) also deletes the tag rows of its
    /// keys, in the same statement; off, the layer never touches the tag table and its
    /// writes cost what they did. Default: `false`.
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::postgres::PostgresLayer;
    ///
    /// let ddl = PostgresLayer::builder().table("orders").tags(true).ddl()?;
    /// assert!(ddl.contains(r#"CREATE TABLE IF NOT EXISTS "public"."orders_tags""#));
    /// assert!(ddl.contains(r#"REFERENCES "public"."orders" (key) ON DELETE CASCADE"#));
    /// # Ok::<(), capacitor::Error>(())
    /// ```
    pub fn tags(mut self, on: bool) -> Self {
        self.tags = on;
        self
    }

    /// Whether to run the background sweeper, which deletes expired rows every
    /// [`sweep_interval`](Self::sweep_interval). Reads never return expired rows either
    /// way; the sweeper reclaims their space. Turn it off when another process (one of
    /// several app instances, a cron job) sweeps the table. Default: `true`.
    pub fn sweeper(mut self, on: bool) -> Self {
        self.sweeper = on;
        self
    }

    /// How often the sweeper runs a pass. Default: 60 s.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// How many expired rows one sweep statement deletes. A pass runs statements until one
    /// deletes fewer, each a short transaction that skips rows locked by writers.
    /// Default: 1,000.
    pub fn sweep_batch(mut self, rows: usize) -> Self {
        self.sweep_batch = rows;
        self
    }

    /// How many rows one scan page reads: the memory a scan holds is one page.
    /// Default: 256.
    pub fn scan_page_size(mut self, rows: usize) -> Self {
        self.scan_page_size = rows;
        self
    }

    /// How keys are stored in the `key` column. Default: [`KeyFormat::Text`] for `String`
    /// keys, [`KeyFormat::Hex`] for others.
    pub fn key_format(mut self, format: KeyFormat) -> Self {
        self.key_format = Some(format);
        self
    }

    /// Connect with TLS through `connector`, any tokio-postgres [`MakeTlsConnect`], such
    /// as `tokio_postgres_rustls::MakeRustlsConnect` (rustls) or
    /// `postgres_native_tls::MakeTlsConnector` (native-tls; the `tls` feature wraps it as
    /// [`native_tls`](Self::native_tls)). Whether TLS is required is the URL's `sslmode`:
    /// `prefer` by default, `require` to refuse plain connections. Default: no TLS.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), capacitor::Error> {
    /// use capacitor::postgres::{tokio_postgres, PostgresLayer};
    ///
    /// // In practice: tokio_postgres_rustls::MakeRustlsConnect::new(rustls_client_config).
    /// let connector = tokio_postgres::NoTls;
    /// let layer = PostgresLayer::builder()
    ///     .url("postgres://app@db.internal/app?sslmode=prefer")
    ///     .tls(connector)
    ///     .build::<String, String>()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn tls<T>(mut self, connector: T) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
        T::Stream: Sync + Send,
        T::TlsConnect: Sync + Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        self.tls = Some(Box::new(move |pg, manager| {
            Manager::from_config(pg, connector, manager)
        }));
        self
    }

    /// Connect with TLS through [native-tls](https://docs.rs/native-tls) (OpenSSL on
    /// Linux, the platform's TLS elsewhere). Needs the `tls` feature. Default: no TLS.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// // With the facade's `postgres-tls` feature.
    /// use capacitor::postgres::native_tls::TlsConnector;
    /// use capacitor::postgres::PostgresLayer;
    ///
    /// let connector = TlsConnector::builder().build()?;
    /// let layer = PostgresLayer::builder()
    ///     .url("postgres://app@db.internal/app?sslmode=require")
    ///     .native_tls(connector)
    ///     .build::<String, String>()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn native_tls(self, connector: native_tls::TlsConnector) -> Self {
        self.tls(postgres_native_tls::MakeTlsConnector::new(connector))
    }

    /// The codec values are stored with. Default: [`DefaultCodec`].
    pub fn codec<C2>(self, codec: C2) -> PostgresLayerBuilder<C2> {
        PostgresLayerBuilder {
            source: self.source,
            schema: self.schema,
            table: self.table,
            pool: self.pool,
            statement_timeout: self.statement_timeout,
            operation_timeout: self.operation_timeout,
            fence_margin: self.fence_margin,
            max_value_bytes: self.max_value_bytes,
            create_table: self.create_table,
            unlogged: self.unlogged,
            tags: self.tags,
            sweeper: self.sweeper,
            sweep_interval: self.sweep_interval,
            sweep_batch: self.sweep_batch,
            scan_page_size: self.scan_page_size,
            key_format: self.key_format,
            tls: self.tls,
            codec,
            clock: self.clock,
        }
    }

    /// The clock expiries are computed with and compared against (tests use
    /// [`ManualClock`](capacitor_core::ManualClock)). Reads compare `expires_at` with this
    /// clock's time, not the server's, so that an entry expires exactly when the TTL it
    /// was written with says; app instances sharing a table should have synchronised
    /// clocks (NTP), as for any shared expiry. Default: the system clock.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The SQL [`build`](Self::build) runs to create the table when it is missing, for the
    /// configured schema, table, `unlogged` and `tags` (one statement per line; the
    /// `CREATE SCHEMA` runs only when the schema is missing; with tags, the last two
    /// create the tag table and its index, also when the table exists).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](capacitor_core::ErrorKind::Config) for a schema or table name
    /// that is not a plain identifier.
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::postgres::PostgresLayer;
    ///
    /// let ddl = PostgresLayer::builder().table("sessions").ddl()?;
    /// assert!(ddl.contains(r#"CREATE TABLE IF NOT EXISTS "public"."sessions""#));
    /// assert!(ddl.contains(r#"key        text COLLATE "C" PRIMARY KEY"#));
    /// # Ok::<(), capacitor::Error>(())
    /// ```
    pub fn ddl(&self) -> Result<String> {
        let table = Table::new(&self.schema, &self.table)?;
        let mut statements = table.ddl(self.unlogged);
        if self.tags {
            statements.extend(table.tags_ddl(self.unlogged));
        }
        Ok(statements.iter().map(|s| format!("{s};\n")).collect())
    }

    /// Validates the options, connects (one pooled connection), creates the table when
    /// it is missing and [`create_table`](Self::create_table) is on, checks the table's
    /// shape, and starts the sweeper. Must run inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](capacitor_core::ErrorKind::Config), naming the field: no
    /// `url`/`config`, a URL that does not parse or names no host, a `schema` or `table`
    /// that is not a plain identifier, a zero `pool_size`, `max_value_bytes` (or one over
    /// 1 GB), `sweep_interval`, `sweep_batch` or `scan_page_size`; a missing table with
    /// `create_table(false)`; an existing table whose shape does not fit (a missing
    /// column, a wrong type, a `key` column without `COLLATE "C"` or without a unique
    /// constraint, a `NOT NULL` column the layer does not fill, the wrong `unlogged`);
    /// with [`tags`](Self::tags), a missing tag table with `create_table(false)` or one
    /// whose shape does not fit (see [`tags`](Self::tags));
    /// no tokio runtime; authentication failure or an unknown database.
    ///
    /// Connecting, with [`Operation::Build`](capacitor_core::Operation::Build):
    /// [`ErrorKind::Unavailable`](capacitor_core::ErrorKind::Unavailable) when the server
    /// cannot be reached (refused, reset, shutting down),
    /// [`ErrorKind::Timeout`](capacitor_core::ErrorKind::Timeout) when it does not answer
    /// within the create timeout, [`ErrorKind::Backend`](capacitor_core::ErrorKind::Backend)
    /// for other server errors (no privilege to create the table, …).
    pub async fn build<K, V>(self) -> Result<PostgresLayer<K, V, C>>
    where
        K: StorageKey,
        C: Codec<V>,
    {
        let table = Table::new(&self.schema, &self.table)?;
        if self.pool.max_size == 0 {
            return Err(Error::config("pool_size", "must be greater than zero"));
        }
        if self.pool.max_size > MAX_POOL_SIZE {
            return Err(Error::config(
                "pool_size",
                format!("must be at most {MAX_POOL_SIZE}"),
            ));
        }
        if self.max_value_bytes == 0 {
            return Err(Error::config("max_value_bytes", "must be greater than zero"));
        }
        if self.max_value_bytes > MAX_BYTEA - envelope::HEADER_LEN {
            return Err(Error::config(
                "max_value_bytes",
                "must leave room for the envelope in PostgreSQL's 1 GB bytea limit",
            ));
        }
        if self.operation_timeout == Some(Duration::ZERO) {
            return Err(Error::config("operation_timeout", "must be greater than zero"));
        }
        if self.sweeper && self.sweep_interval.is_zero() {
            return Err(Error::config("sweep_interval", "must be greater than zero"));
        }
        if self.sweep_batch == 0 {
            return Err(Error::config("sweep_batch", "must be greater than zero"));
        }
        if self.scan_page_size == 0 {
            return Err(Error::config("scan_page_size", "must be greater than zero"));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            Error::config(
                "runtime",
                "the layer's connections and sweeper need a tokio runtime; build inside one",
            )
            .with_source(e)
        })?;
        let mut pg = self.source.resolve()?;
        if !self.statement_timeout.is_zero() {
            let ms = self.statement_timeout.as_millis().max(1);
            let options = match pg.get_options() {
                Some(existing) if !existing.trim().is_empty() => {
                    format!("{existing} -c statement_timeout={ms}")
                }
                _ => format!("-c statement_timeout={ms}"),
            };
            pg.options(options);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("capacitor");
        }
        if let (None, Some(create)) = (pg.get_connect_timeout(), self.pool.timeouts.create) {
            pg.connect_timeout(create);
        }
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match self.tls {
            Some(make) => make(pg, manager_config),
            None => Manager::from_config(pg, NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .config(self.pool)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| {
                Error::config("pool_config", "deadpool refused the pool configuration").with_source(e)
            })?;

        {
            let mut client = pool.get().await.map_err(|e| pool_error(Operation::Build, e))?;
            // DDL may wait on a busy catalog: it gets at least the default statement timeout.
            let ddl_timeout = (!self.statement_timeout.is_zero())
                .then(|| self.statement_timeout.max(DEFAULT_STATEMENT_TIMEOUT));
            schema::prepare(
                &mut client,
                &table,
                self.create_table,
                self.unlogged,
                self.tags,
                ddl_timeout,
            )
            .await?;
        }

        let key_format = self
            .key_format
            .unwrap_or(if TypeId::of::<K>() == TypeId::of::<String>() {
                KeyFormat::Text
            } else {
                KeyFormat::Hex
            });
        let operation_timeout = self.operation_timeout.unwrap_or_else(|| {
            let statement = if self.statement_timeout.is_zero() {
                DEFAULT_STATEMENT_TIMEOUT
            } else {
                self.statement_timeout
            };
            statement + Duration::from_millis(500)
        });
        let shared = Arc::new(Shared {
            pool,
            sql: Statements::new(&table, self.tags),
            table,
            codec: self.codec,
            clock: self.clock,
            key_format,
            max_value_bytes: self.max_value_bytes,
            scan_page_size: i64::try_from(self.scan_page_size).unwrap_or(i64::MAX),
            unlogged: self.unlogged,
            closed: AtomicBool::new(false),
            operation_timeout,
            fence: capacitor_core::fence::WriteFence::new(self.fence_margin),
            stop: Stop::new(),
        });
        if self.sweeper {
            runtime.spawn(sweep::sweeper(
                Arc::downgrade(&shared),
                shared.stop.ticker(self.sweep_interval),
                i64::try_from(self.sweep_batch).unwrap_or(i64::MAX),
            ));
        }
        Ok(PostgresLayer {
            shared,
            _types: PhantomData,
        })
    }
}
