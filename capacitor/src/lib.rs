//! capacitor: several storage layers (in-memory, Redis, PostgreSQL, sled) behind one typed
//! async key-value API, with promotion on hit, write-through, per-layer TTL and per-layer
//! statistics.
//!
//! This facade re-exports [`capacitor_core`] (the [`Layer`] trait, [`MultiLayer`],
//! [`Stats`], [`Error`]) and, as modules, the backends enabled by Cargo features:
//!
//! | feature | module | default |
//! |---|---|---|
//! | `memory` | [`memory`]: `MokaLayer`, `DashMapLayer` | yes |
//! | `sled` | `sled`: `SledLayer`, embedded persistent store | yes |
//! | `redis` | `redis`: `RedisLayer`, `RedisBus` on fred | no |
//! | `redis-tls` | TLS for `rediss://` (rustls) | no |
//! | `postgres` | `postgres`: `PostgresLayer` on deadpool-postgres | no |
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
#[doc(inline)]
pub use capacitor_memory as memory;

#[cfg(feature = "sled")]
#[cfg_attr(docsrs, doc(cfg(feature = "sled")))]
#[doc(inline)]
pub use capacitor_sled as sled;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[doc(inline)]
pub use capacitor_redis as redis;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[doc(inline)]
pub use capacitor_postgres as postgres;

/// The README's examples, compiled and run as doctests.
#[cfg(all(
    doctest,
    feature = "memory",
    feature = "sled",
    feature = "postgres",
    feature = "redis"
))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
