//! The PostgreSQL layer's integration tests, in one binary, against a real server
//! (`CAPACITOR_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`; `restart`
//! and `pg_bus_processes` run private clusters of their own). Each test has tables of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

mod batching;
mod codecs;
mod common;
mod composer;
mod conformance;
mod faults;
mod pg_bus;
mod pg_bus_processes;
mod proxy;
mod redaction;
mod refusals;
mod restart;
mod tags;
