//! The facade's integration tests, one binary. Three keep binaries of their own: the
//! metrics test installs the process's global recorder, and the two extremes tests count
//! every panic in the process through a panic hook.

mod common;
mod cooperative;
mod history;
mod refresh;
mod resilience;
