//! The data and helpers the suites in `benches/` share, so that every backend is measured
//! on the same keys and values, encoded as hand-written code would (plain postcard), and the
//! hand-written peer ([`peer::HandWritten`]) the Redis and three-tier suites measure
//! capacitor against. Run the suites with `cargo xtask bench [--quick] [SUITE…]`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub mod peer;

/// The variable `cargo xtask bench --quick` sets: the suites then keep their expensive
/// setups small (fewer preloaded keys, shorter drains). Criterion's own timing options
/// come from xtask's command line.
pub const QUICK_ENV: &str = "CAPACITOR_BENCH_QUICK";

/// The Redis server the suites use when `CAPACITOR_REDIS_URL` is not set.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The PostgreSQL server the suites use when `CAPACITOR_POSTGRES_URL` is not set.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Whether this is a quick run ([`QUICK_ENV`] set to anything but empty or `0`).
pub fn quick() -> bool {
    std::env::var_os(QUICK_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// `full` in a normal run, `quick` in a quick one: for preloaded key counts and drain
/// sizes. Group names that carry a size use the value returned here.
pub fn size(full: u64, quick: u64) -> u64 {
    if self::quick() {
        quick
    } else {
        full
    }
}

/// `CAPACITOR_REDIS_URL`, else [`DEFAULT_REDIS_URL`].
pub fn redis_url() -> String {
    std::env::var("CAPACITOR_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// `CAPACITOR_POSTGRES_URL`, else [`DEFAULT_POSTGRES_URL`].
pub fn postgres_url() -> String {
    std::env::var("CAPACITOR_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned())
}

/// An identifier unique to this process run (lowercase letters and digits, so it fits a
/// Redis key prefix and an unquoted SQL identifier alike): suites name their Redis
/// prefixes and PostgreSQL tables with it, never assume an empty server, and remove only
/// what they made.
pub fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos();
    format!("r{:x}p{}", nanos % (1 << 40), std::process::id())
}

/// The `i`-th key of a suite.
pub fn key(i: u64) -> String {
    format!("user:{i}")
}

/// The `i`-th value of a suite: about 70 bytes, like a small profile.
pub fn value(i: u64) -> String {
    format!("profile of user {i}, with a few more bytes to look like a real value")
}

/// What the raw side stores: the value in plain postcard, capacitor's default codec (no
/// envelope).
///
/// # Panics
///
/// Never for a `String`; this is benchmark code.
#[allow(clippy::expect_used)]
pub fn encode(v: &String) -> Vec<u8> {
    postcard::to_stdvec(v).expect("a String encodes")
}

/// Decodes what [`encode`] wrote.
///
/// # Panics
///
/// On bytes [`encode`] did not write; this is benchmark code.
#[allow(clippy::expect_used)]
pub fn decode(bytes: &[u8]) -> String {
    postcard::from_bytes(bytes).expect("bytes written by encode")
}

/// Runs `op(thread, i)` for `i` in `0..iters` on each of `threads` threads at once and
/// returns the wall time from the common start until the last thread is done: for
/// criterion's `iter_custom`, one "iteration" is then one operation on every thread, and
/// the throughput is `threads / time per iteration`.
pub fn parallel<F>(threads: usize, iters: u64, op: F) -> Duration
where
    F: Fn(usize, u64) + Sync,
{
    let barrier = std::sync::Barrier::new(threads + 1);
    let op = &op;
    let barrier = &barrier;
    let mut started = std::time::Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                barrier.wait();
                for i in 0..iters {
                    op(t, i);
                }
            });
        }
        barrier.wait();
        started = std::time::Instant::now();
    });
    started.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_identifiers() {
        let id = run_id();
        assert!(id.starts_with('r'));
        assert!(id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert!(id.len() < 30);
    }

    #[test]
    fn values_round_trip() {
        assert_eq!(decode(&encode(&value(3))), value(3));
    }

    #[test]
    fn parallel_runs_every_operation() {
        let n = std::sync::atomic::AtomicU64::new(0);
        parallel(3, 10, |_, _| {
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(n.into_inner(), 30);
    }
}
