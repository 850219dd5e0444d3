#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod builder;
mod core;
mod error;
mod layer;
mod scan;
mod sweep;
mod tags;

pub use builder::RedbLayerBuilder;
pub use core::Durability;
pub use layer::RedbLayer;
