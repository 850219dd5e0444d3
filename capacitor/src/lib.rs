//! capacitor: several storage layers (in-memory, Redis, PostgreSQL, redb, sled) behind one typed
//! async key-value API, with promotion on hit, write-through, per-layer TTL and per-layer
//! statistics.
//!
//! This facade re-exports [`capacitor_core`] (the [`Layer`] trait, [`MultiLayer`],
//! [`Stats`], [`Error`]) and, as modules, the backends enabled by Cargo features:
//!
//! | feature | module | default |
//! |---|---|---|
//! | `memory` | [`memory`]: `MokaLayer`, `QuickCacheLayer`, `DashMapLayer` | yes |
//! | `redb` | `redb`: `RedbLayer`, embedded persistent store | yes |
//! | `sled` | `sled`: `SledLayer`, the older embedded store (sled 0.34) | no |
//! | `redis` | `redis`: `RedisLayer`, `RedisBus`, `RedisTrackingBus` on fred | no |
//! | `redis-tls` | TLS for `rediss://` (rustls) | no |
//! | `postgres` | `postgres`: `PostgresLayer`, `PostgresBus` on deadpool-postgres | no |
//! | `postgres-tls` | `PostgresLayerBuilder::native_tls` | no |
//! | `metrics` | `MultiLayer::report_metrics`, `spawn_metrics_reporter` (`metrics` facade) | no |
//! | `tracing` | a DEBUG span per composer operation, breaker events (`tracing`) | no |
//! | `full` | all of the above but the TLS features | no |
//!
//! # Examples
//!
//! ```
//! # #[cfg(feature = "memory")]
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use capacitor::memory::{DashMapLayer, MokaLayer};
//! use capacitor::{LayerConfig, MultiLayer};
//! use std::time::Duration;
//!
//! let cache = MultiLayer::<String, u64>::builder()
//!     .layer(LayerConfig::new("l1", MokaLayer::builder().max_capacity(10_000).build()?).ttl(Duration::from_secs(30)))
//!     .layer(LayerConfig::new("l2", DashMapLayer::new()))
//!     .build()?;
//! cache.set("visits".into(), 1).await?;
//! assert_eq!(cache.get(&"visits".into()).await?, Some(1));
//! # Ok::<(), capacitor::Error>(()) }).unwrap();
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use capacitor_core::*;

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub mod memory {
    //! In-memory layers: `MokaLayer` and `QuickCacheLayer` (bounded), `DashMapLayer`
    //! (unbounded).
    //!
    //! The guide (configuration, defaults, limits, failures) is the crate's own
    //! documentation: [`capacitor_memory`].
    pub use capacitor_memory::{
        DashMapLayer, DashMapLayerBuilder, MokaLayer, MokaLayerBuilder, QuickCacheLayer,
        QuickCacheLayerBuilder,
    };
}

#[cfg(feature = "redb")]
#[cfg_attr(docsrs, doc(cfg(feature = "redb")))]
pub mod redb {
    //! The embedded, persistent layer on redb.
    //!
    //! The guide (configuration, defaults, limits, failures) is the crate's own
    //! documentation: [`capacitor_redb`].
    pub use capacitor_redb::{Durability, RedbLayer, RedbLayerBuilder};
}

#[cfg(feature = "sled")]
#[cfg_attr(docsrs, doc(cfg(feature = "sled")))]
pub mod sled {
    //! The older embedded, persistent layer on sled 0.34 (off by default: see the
    //! crate's caveats).
    //!
    //! The guide (configuration, defaults, limits, failures) is the crate's own
    //! documentation: [`capacitor_sled`].
    pub use capacitor_sled::{FlushPolicy, SledLayer, SledLayerBuilder};
}

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis {
    //! The Redis layer and the Redis invalidation buses (pub/sub, client tracking), on fred.
    //!
    //! The guide (configuration, defaults, limits, failures) is the crate's own
    //! documentation: [`capacitor_redis`]. `fred` is the Redis client, re-exported for
    //! the escape hatch [`RedisConnection::fred_config`]: the two are the only parts of
    //! this module tied to fred.
    #[doc(no_inline)]
    pub use capacitor_redis::fred;
    pub use capacitor_redis::{
        Reconnect, RedisBus, RedisBusBuilder, RedisConnection, RedisLayer, RedisLayerBuilder,
        RedisTrackingBus, RedisTrackingBusBuilder, MAX_POOL_SIZE,
    };
}

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres {
    //! The PostgreSQL layer and the `LISTEN`/`NOTIFY` invalidation bus, on deadpool-postgres and tokio-postgres.
    //!
    //! The guide (configuration, defaults, limits, failures) is the crate's own
    //! documentation: [`capacitor_postgres`].
    #[doc(no_inline)]
    pub use capacitor_postgres::deadpool_postgres;
    #[cfg(feature = "postgres-tls")]
    #[doc(no_inline)]
    pub use capacitor_postgres::native_tls;
    #[doc(no_inline)]
    pub use capacitor_postgres::tokio_postgres;
    pub use capacitor_postgres::{
        KeyFormat, PostgresBus, PostgresBusBuilder, PostgresLayer, PostgresLayerBuilder, MAX_KEY_BYTES,
        MAX_POOL_SIZE,
    };
}

/// The README's examples, compiled and run as doctests.
#[cfg(all(
    doctest,
    feature = "memory",
    feature = "redb",
    feature = "postgres",
    feature = "redis"
))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
