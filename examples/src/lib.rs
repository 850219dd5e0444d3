//! Runnable examples of capacitor: see `examples/`.
