//! In-memory layers.
