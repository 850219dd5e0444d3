#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod background;
mod bus;
mod codec;
mod config;
mod entry;
mod error;
mod failsafe;
pub mod fence;
mod guard;
mod health;
mod layer;
mod load;
mod multi;
mod observe;
mod scan;
mod stats;
mod writeback;

#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

pub use async_trait::async_trait;
pub use bus::{bus_instance_id, BusMessage, Change, Invalidation, InvalidationBus, InvalidationSink};
#[cfg(feature = "bincode")]
#[cfg_attr(docsrs, doc(cfg(feature = "bincode")))]
pub use codec::BincodeCodec;
#[cfg(feature = "json")]
#[cfg_attr(docsrs, doc(cfg(feature = "json")))]
pub use codec::JsonCodec;
pub use codec::{envelope, Codec, CodecId, DefaultCodec, PostcardCodec, StorageKey};
pub use config::{LayerConfig, ReadBatching, SetOptions, WriteBack, WritePolicy, MAX_TAGS, MAX_TAG_BYTES};
pub use entry::{expiry_for, system_clock, Clock, Entry, ManualClock, SharedClock, SystemClock, Timestamp};
pub use error::{BoxError, Error, ErrorKind, Operation, Result};
pub use failsafe::{FailSafe, FailSafeStats};
pub use health::{BreakerState, CircuitBreaker, HealthEvent};
pub use layer::{Capabilities, EntryStream, Layer, WriteOp};
pub use load::{LoadEvent, LoadOptions, LoadStats, Loaded, StaleReason};
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub use multi::MetricsReporter;
pub use multi::{
    Get, GetEntry, MultiLayer, MultiLayerBuilder, RefreshStats, RefusedWrite, Transaction, WarmUp,
    WarmUpReport,
};
pub use scan::Scan;
pub use stats::{BusStats, LayerStats, Stats};
pub use writeback::WriteBackStats;
