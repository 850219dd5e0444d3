#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod builder;
mod bus;
mod core;
mod error;
mod layer;
mod scan;
mod tracking;

pub use builder::{Reconnect, RedisBusBuilder, RedisConnection, RedisLayerBuilder, MAX_POOL_SIZE};
pub use bus::RedisBus;
pub use layer::RedisLayer;
pub use tracking::{RedisTrackingBus, RedisTrackingBusBuilder};

/// The Redis client, fred 10, re-exported: for the fred escape hatch,
/// [`RedisConnection::fred_config`], and to use the same version for clients of your
/// own. The two are the only parts of this crate's API tied to fred (see
/// [Another Redis client](crate#another-redis-client)).
#[doc(no_inline)]
pub use fred;
