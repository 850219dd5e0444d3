#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod builder;
mod core;
mod error;
mod layer;
mod scan;
mod sweep;
mod tags;

pub use builder::SledLayerBuilder;
pub use core::FlushPolicy;
pub use layer::SledLayer;
