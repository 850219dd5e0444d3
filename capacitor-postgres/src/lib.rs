//! The postgres layer for capacitor.
//!
//! **Not implemented yet**: this crate is a placeholder in the workspace so that the
//! facade's `postgres` feature has a home. It exports nothing usable.
#![forbid(unsafe_code)]
