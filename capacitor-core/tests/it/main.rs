//! The composer's and the test kit's integration tests, one binary (the scan memory test,
//! which installs a counting global allocator, has its own).

mod batching;
mod bus;
mod composer;
mod conformance;
mod history;
mod interleave;
mod loader;
mod loading;
mod model;
mod pairs;
mod proxy;
mod refresh;
mod refusals;
mod resilience;
mod scan;
mod spans;
mod tags;
mod transaction;
mod warmup;
mod writeback;
