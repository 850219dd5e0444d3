#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod builder;
mod bus;
mod core;
mod error;
mod key;
mod layer;
mod scan;
mod schema;
mod sql;
mod sweep;

pub use builder::{PostgresLayerBuilder, MAX_POOL_SIZE};
pub use bus::{PostgresBus, PostgresBusBuilder};
pub use key::KeyFormat;
pub use layer::{PostgresLayer, MAX_KEY_AND_TAG_BYTES, MAX_KEY_BYTES};

/// The pool crate, re-exported so that [`PostgresLayer::pool`] and
/// [`PostgresLayerBuilder::pool_config`] are used with the same version.
#[doc(no_inline)]
pub use deadpool_postgres;
/// The driver, re-exported so that [`PostgresLayerBuilder::config`] and
/// [`PostgresLayerBuilder::tls`] are used with the same version.
#[doc(no_inline)]
pub use tokio_postgres;

/// native-tls, re-exported for [`PostgresLayerBuilder::native_tls`].
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
#[doc(no_inline)]
pub use native_tls;
