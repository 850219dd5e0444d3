//! criterion suites live in `benches/`; run them with `cargo xtask bench`.
