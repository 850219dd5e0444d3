//! The Redis layer's and bus's integration tests, in one binary: against the shared
//! server (`CAPACITOR_REDIS_URL`, default `redis://127.0.0.1:6379`), each under its own
//! key prefix, and against private `redis-server` processes, clusters and sentinels on
//! free loopback ports.

mod common;

mod batching;
mod bus;
mod bus_cluster_processes;
mod bus_processes;
mod bus_recovery;
mod cluster;
mod cluster_bus;
mod codecs;
mod conformance;
mod errors;
mod faults;
mod fence;
mod layer;
mod proxy;
mod redaction;
mod sentinel;
mod tracking;
