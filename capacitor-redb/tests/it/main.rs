//! The redb layer's integration tests, in one binary. Each test has a database of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

mod common;
mod composer;
mod conformance;
mod crash;
mod layer;
mod tags;
