#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod dashmap_layer;
mod moka_layer;
mod quick_cache_layer;

pub use dashmap_layer::{DashMapLayer, DashMapLayerBuilder};
pub use moka_layer::{MokaLayer, MokaLayerBuilder};
pub use quick_cache_layer::{QuickCacheLayer, QuickCacheLayerBuilder};
