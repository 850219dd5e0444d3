//! In-memory layers for capacitor.
//!
//! - [`MokaLayer`]: a bounded cache on [moka](https://docs.rs/moka) (by entry count or by
//!   bytes through a weigher), per-entry TTL through moka's expiry policy. The usual L1.
//! - [`DashMapLayer`]: an unbounded concurrent map on [dashmap](https://docs.rs/dashmap)
//!   with lazy expiry and an optional background sweeper.
//!
//! Both answer reads synchronously ([`Layer::get_sync`](capacitor_core::Layer::get_sync)), so an L1 hit
//! through a `MultiLayer` never allocates a future.
#![forbid(unsafe_code)]

mod dashmap_layer;
mod moka_layer;

pub use dashmap_layer::{DashMapLayer, DashMapLayerBuilder};
pub use moka_layer::{MokaLayer, MokaLayerBuilder};
