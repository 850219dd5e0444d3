//! The sled layer for capacitor: [`SledLayer`], a persistent, transactional key-value
//! layer on [sled](https://docs.rs/sled), an embedded database in a local directory.
//!
//! Use it as the authoritative (bottom) layer of a
//! [`MultiLayer`](capacitor_core::MultiLayer) when the data should survive a restart but
//! need not be shared between machines, or as a large local cache under an in-memory L1.
//!
//! - Values are stored in capacitor's [`envelope`](capacitor_core::envelope) (expiry,
//!   then the [`Codec`](capacitor_core::Codec)'s bytes); keys as
//!   [`StorageKey`](capacitor_core::StorageKey) bytes, so `String` keys are readable.
//! - Expired entries are removed when read, and by an optional background sweeper.
//! - Durability follows the [`FlushPolicy`]: every write, every N milliseconds, or only
//!   on [`flush`](capacitor_core::Layer::flush).
//! - Capabilities: lazy [`scan`](capacitor_core::Layer::scan) by key prefix,
//!   [`apply_atomic`](capacitor_core::Layer::apply_atomic) through sled transactions,
//!   persistence.
//!
//! sled 0.34 is the stable line (1.0 is still alpha), and pulls in crates RustSec lists as
//! unmaintained; it stays inside this crate.
//!
//! # Examples
//!
//! An in-memory L1 over sled:
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use capacitor_core::{LayerConfig, MultiLayer};
//! use capacitor_memory::MokaLayer;
//! use capacitor_sled::{FlushPolicy, SledLayer};
//! use std::time::Duration;
//!
//! let dir = tempfile::tempdir()?;
//! let disk = SledLayer::builder()
//!     .path(dir.path().join("cache"))
//!     .flush_policy(FlushPolicy::EveryWrite)
//!     .build::<String, String>()?;
//! let cache = MultiLayer::<String, String>::builder()
//!     .layer(LayerConfig::new("l1", MokaLayer::builder().max_capacity(10_000).build()?)
//!         .ttl(Duration::from_secs(60)))
//!     .layer(LayerConfig::new("disk", disk))
//!     .build()?;
//!
//! cache.set("user:42".into(), "Ada".into()).await?;
//! assert_eq!(cache.get(&"user:42".into()).await?, Some("Ada".to_string()));
//! cache.close().await?;
//! # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
//! ```
#![forbid(unsafe_code)]

mod builder;
mod core;
mod error;
mod layer;
mod scan;
mod sweep;

pub use builder::SledLayerBuilder;
pub use core::FlushPolicy;
pub use layer::SledLayer;
