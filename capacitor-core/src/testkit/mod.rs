//! The conformance suite every layer runs, and test doubles for the composer's tests.
//!
//! # Running the suite for your layer
//!
//! Add `capacitor-core = { version = "…", features = ["testkit"] }` to your
//! `[dev-dependencies]`, then in `tests/conformance.rs`:
//!
//! ```
//! use capacitor::memory::DashMapLayer;
//! use capacitor_core::testkit::TestContext;
//!
//! capacitor_core::conformance_tests!(|_ctx: TestContext| async move {
//!     // A remote layer uses `ctx.id`, unique per test, as its key prefix or table name.
//!     DashMapLayer::<String, Vec<u8>>::new()
//! });
//! ```
//!
//! This generates one `#[test]` per behaviour (get/set/overwrite/delete/exists, TTL
//! expiry and remaining TTL, batch forms, close, concurrency, large and empty values,
//! unusual keys, clear, and the capabilities the layer declares: scan, transactions,
//! tags), each with a fresh layer from the
//! factory and bounded by a timeout. The layer must implement `Layer<String, Vec<u8>>`.

mod cases;
mod composer;
mod doubles;
mod gate;
mod history;
mod proxy;
pub mod staleness;
mod wrap;

pub use cases::CASES;
pub use composer::COMPOSER_CASES;
pub use doubles::{Faults, FaultyLayer, LoopbackBus, MapLayer};
pub use gate::{Gate, GateLayer, Gates, Hold};
pub use history::{run_history, History, HistoryOptions, Violation};
pub use proxy::FaultProxy;
pub use wrap::{Around, GateOp, Wrapped};

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::layer::Layer;

/// The layer type the suite exercises.
pub type TestLayer = Arc<dyn Layer<String, Vec<u8>>>;

/// A boxed future returned by a case.
pub type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// One behaviour of the suite.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// The case's name (also the generated test's name).
    pub name: &'static str,
    /// Runs the case against a fresh layer.
    pub run: fn(TestLayer, TestContext) -> CaseFuture,
}

/// Given to the layer factory: a unique id per test, usable as a key prefix or table name
/// (lowercase ASCII letters, digits and `_`, starting with a letter).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TestContext {
    /// A unique identifier for this test run.
    pub id: String,
    /// The case being run.
    pub case: &'static str,
}

impl TestContext {
    /// A context for `case` with a fresh unique id.
    pub fn new(case: &'static str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // Short enough for a PostgreSQL identifier (63 bytes): the case name is cut.
        let id = format!(
            "ct_{}_{}_{}_{}",
            &case[..case.len().min(20)],
            std::process::id(),
            nanos,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        TestContext { id, case }
    }
}

/// Awaits `f`, failing the test if it takes longer than `limit`: a test that hangs then
/// fails with this message instead of running until the harness kills it.
///
/// # Panics
///
/// When `limit` passes first.
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use capacitor_core::testkit::within;
///
/// assert_eq!(within(Duration::from_secs(5), async { 42 }).await, 42);
/// # });
/// ```
pub async fn within<F: Future>(limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(output) => output,
        Err(_) => panic!("did not finish within {limit:?}"),
    }
}

/// Polls `f` once with a no-op waker and returns its output: for operations that must
/// complete without waiting (in-memory layers), in tests and benchmarks that want no
/// executor in the way. Inlined, as an `.await` inlines a poll into its caller.
///
/// # Panics
///
/// If `f` is not ready on its first poll.
#[inline(always)]
pub fn poll_once<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("expected an operation that completes on the first poll"),
    }
}

/// How long one case may take before it fails.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the case named `name` against a layer made by `factory`, on a fresh tokio runtime,
/// then closes the layer.
///
/// # Panics
///
/// When the case fails (this is a test helper), when `name` is not a case, or when the
/// case exceeds [`CASE_TIMEOUT`].
#[allow(clippy::expect_used)]
pub fn run_case<F, Fut, L>(name: &str, factory: F)
where
    F: Fn(TestContext) -> Fut,
    Fut: Future<Output = L>,
    L: Layer<String, Vec<u8>>,
{
    let case = CASES
        .iter()
        .chain(COMPOSER_CASES)
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no conformance case named `{name}`"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let ctx = TestContext::new(case.name);
        let layer: TestLayer = Arc::new(factory(ctx.clone()).await);
        let outcome = tokio::time::timeout(CASE_TIMEOUT, tokio::spawn((case.run)(layer.clone(), ctx))).await;
        let _ = layer.close().await;
        match outcome {
            Err(_) => panic!(
                "conformance case `{}` timed out after {:?}",
                case.name, CASE_TIMEOUT
            ),
            Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
            Ok(Ok(())) => {}
        }
    });
}

/// Generates one `#[test]` per composer case (write-back, transactions, scan, warm-up,
/// loaders) over the layer made by `$factory` as the bottom of a two-layer
/// `MultiLayer`: the behaviours of `MultiLayer` that depend on a real backend.
/// Capabilities the layer does not declare are checked to fail as `Unsupported`.
#[macro_export]
macro_rules! composer_tests {
    ($factory:expr) => {
        $crate::composer_tests!(@cases $factory;
            write_back_drains_to_the_bottom_and_scan_merges_pending_writes,
            transactions_commit_atomically_and_invalidate_the_caches,
            warm_up_copies_from_the_bottom_and_loaders_run_once);
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::testkit::run_case(stringify!($case), $factory);
            }
        )*

        #[test]
        fn composer_suite_is_complete() {
            let generated: &[&str] = &[$(stringify!($case)),*];
            let all: Vec<&str> = $crate::testkit::COMPOSER_CASES.iter().map(|c| c.name).collect();
            assert_eq!(generated, &all[..], "the macro and testkit::COMPOSER_CASES disagree");
        }
    };
}

/// Generates one `#[test]` per conformance case for the layer made by `$factory`
/// (`Fn(TestContext) -> impl Future<Output = impl Layer<String, Vec<u8>>>`).
///
/// See the [module docs](crate::testkit) for an example.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@cases $factory;
            get_missing_is_none, set_then_get, overwrite_replaces_value_and_expiry,
            delete_reports_presence, exists_follows_writes, ttl_expires_entries,
            remaining_ttl_is_reported, no_ttl_means_no_expiry, get_many_keeps_order,
            set_many_and_delete_many, set_many_with_ttl_expires, empty_and_large_values,
            unusual_keys_round_trip, close_is_idempotent_and_final, concurrent_writers_and_readers,
            scan_capability, transaction_capability, flush_succeeds, tag_capability,
            clear_removes_every_entry);
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::testkit::run_case(stringify!($case), $factory);
            }
        )*

        #[test]
        fn conformance_suite_is_complete() {
            let generated: &[&str] = &[$(stringify!($case)),*];
            let all: Vec<&str> = $crate::testkit::CASES.iter().map(|c| c.name).collect();
            assert_eq!(generated, &all[..], "the macro and testkit::CASES disagree");
        }
    };
}
