//! The memory layers' integration tests, one binary (the allocation test, which installs a
//! counting global allocator, has its own).

mod conformance;
mod layer;
mod quick_cache;
mod race;
