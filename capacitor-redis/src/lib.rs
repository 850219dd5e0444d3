//! The Redis layer for capacitor: [`RedisLayer`], a shared remote cache layer on
//! [fred](https://docs.rs/fred), and [`RedisBus`], an invalidation bus on Redis pub/sub.
//!
//! # Storage
//!
//! - Keys: `prefix + key bytes` ([`StorageKey`](capacitor_core::StorageKey)), so a
//!   `String` key reads naturally: `redis-cli GET app:user:42`.
//! - Values: capacitor's [`envelope`](capacitor_core::envelope) (marker, version, absolute
//!   expiry) around the [`Codec`](capacitor_core::Codec)'s bytes (bincode by default).
//! - TTLs are native (`SET … PX`); a hit reports the remaining life from the envelope's
//!   absolute expiry.
//! - A value that is not capacitor's, does not decode, or a key of another Redis type is a
//!   miss reported as [`ErrorKind::Decode`](capacitor_core::ErrorKind::Decode) (the
//!   composer counts it and reads on below). With a non-empty prefix the layer owns its
//!   namespace and deletes such keys; without one it never deletes foreign data.
//!
//! # Failures
//!
//! [`RedisLayerBuilder::build`] never waits for Redis: it connects in the background and
//! keeps reconnecting under the [`Reconnect`] policy. While no connection is up every
//! operation fails at once with `Unavailable`; each operation is bounded by the command
//! timeout (`Timeout`). [`RedisLayer::connect`] waits for the connection and reports a
//! failure, for applications that want to fail at start-up.
//!
//! # Deployments and TLS
//!
//! The URL chooses the deployment, as fred parses it: `redis://`, `rediss://` (TLS),
//! `redis-cluster://host:port?node=host2:port2`, `redis-sentinel://…`. TLS needs one of
//! this crate's Cargo features: `tls-rustls` (fred's `enable-rustls-ring`) or `tls-native`
//! (fred's `enable-native-tls`, OpenSSL on Linux). fred is re-exported as [`fred`] for
//! configuration this crate does not wrap.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> Result<(), capacitor_core::Error> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use capacitor_core::{LayerConfig, MultiLayer};
//! use capacitor_memory::MokaLayer;
//! use capacitor_redis::{RedisBus, RedisLayer};
//!
//! let redis = RedisLayer::builder().url("redis://127.0.0.1:6379").prefix("app:").build()?;
//! let bus = RedisBus::builder().url("redis://127.0.0.1:6379").build()?;
//! let cache = MultiLayer::<String, String>::builder()
//!     .layer(LayerConfig::new("l1", MokaLayer::builder().max_capacity(10_000).build()?)
//!         .ttl(Duration::from_secs(60)))
//!     .layer(LayerConfig::new("redis", redis))
//!     .invalidation_bus(Arc::new(bus))
//!     .build()?;
//! cache.set("user:42".into(), "Ada".into()).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod bus;
mod config;
mod error;
mod layer;
mod scan;

pub use bus::{RedisBus, RedisBusBuilder, DEFAULT_CHANNEL};
pub use config::{
    Reconnect, RedisLayerBuilder, DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_POOL_SIZE, DEFAULT_RECONNECT_MAX_DELAY, DEFAULT_RECONNECT_MIN_DELAY, DEFAULT_SCAN_COUNT,
    DEFAULT_URL, MAX_POOL_SIZE,
};
pub use layer::RedisLayer;

/// The Redis client, re-exported for configuration this crate does not wrap (and to use
/// the same version).
pub use fred;
