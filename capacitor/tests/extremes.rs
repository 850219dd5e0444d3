//! Extreme values (0, 1, the type's maximum, NaN and infinities for fractions) for every
//! builder option of the composer and the in-memory layers, and for per-call options:
//! each gives a typed error at build or a composer that works, never a panic or a hang.

#![cfg(feature = "memory")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::time::Duration;

use capacitor::memory::{DashMapLayer, MokaLayer};
use capacitor::{
    CircuitBreaker, ErrorKind, FailSafe, LayerConfig, MultiLayer, SetOptions, WriteBack, WritePolicy,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

/// Panics anywhere in the process, background tasks included (tokio keeps a task's panic
/// to itself): counted by a hook installed on first use.
fn panics() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Once;
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            COUNT.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
    COUNT.load(Ordering::SeqCst)
}

fn duration() -> impl Strategy<Value = Duration> {
    // Mostly ordinary values, so that the extreme one in a case is reached past the
    // builder's checks of the others.
    prop_oneof![
        1 => Just(Duration::ZERO),
        1 => Just(Duration::from_nanos(1)),
        1 => Just(Duration::from_millis(1)),
        2 => Just(Duration::MAX),
        1 => Just(Duration::from_secs(u64::MAX / 2)),
        12 => (1u64..2_000).prop_map(Duration::from_millis),
    ]
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0), 2 => Just(1), 2 => Just(usize::MAX), 10 => 2usize..500]
}

fn count() -> impl Strategy<Value = u32> {
    prop_oneof![1 => Just(0), 2 => Just(1), 2 => Just(u32::MAX), 10 => 2u32..50]
}

fn fraction() -> impl Strategy<Value = f64> {
    prop_oneof![
        2 => Just(0.0),
        1 => Just(1.0),
        1 => Just(-1.0),
        1 => Just(2.0),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(f64::MIN_POSITIVE),
        24 => 0.0f64..0.5,
    ]
}

#[derive(Debug, Clone)]
struct Options {
    write_back: Option<(usize, usize, Duration, Duration, Duration, Duration, Duration)>,
    l1_ttl: Option<Duration>,
    l2_timeouts: Option<(Duration, Duration)>,
    breaker: Option<(u32, f64, u32, Duration, Duration)>,
    fail_safe: Option<(Duration, usize)>,
    cache_misses_for: Option<Duration>,
    ttl_jitter: f64,
    refresh_ahead: Option<Duration>,
    sweep_interval: Option<Duration>,
    moka_capacity: u64,
    set_ttl: Option<Duration>,
}

fn options() -> impl Strategy<Value = Options> {
    (
        proptest::option::of((
            size(),
            size(),
            duration(),
            duration(),
            duration(),
            duration(),
            duration(),
        )),
        proptest::option::of(duration()),
        proptest::option::of((duration(), duration())),
        proptest::option::of((count(), fraction(), count(), duration(), duration())),
        proptest::option::of((duration(), size())),
        proptest::option::of(duration()),
        fraction(),
        proptest::option::of(duration()),
        proptest::option::of(duration()),
        prop_oneof![1 => Just(0u64), 1 => Just(1), 1 => Just(u64::MAX), 12 => 2u64..1000],
        proptest::option::of(duration()),
    )
        .prop_map(
            |(
                write_back,
                l1_ttl,
                l2_timeouts,
                breaker,
                fail_safe,
                cache_misses_for,
                ttl_jitter,
                refresh_ahead,
                sweep_interval,
                moka_capacity,
                set_ttl,
            )| Options {
                write_back,
                l1_ttl,
                l2_timeouts,
                breaker,
                fail_safe,
                cache_misses_for,
                ttl_jitter,
                refresh_ahead,
                sweep_interval,
                moka_capacity,
                set_ttl,
            },
        )
}

/// Builds the composer `o` describes: `Err` must be a typed configuration error.
fn build(o: &Options) -> capacitor::Result<MultiLayer<String, String>> {
    let moka = MokaLayer::builder().max_capacity(o.moka_capacity).build()?;
    let mut l1 = LayerConfig::new("l1", moka);
    if let Some(ttl) = o.l1_ttl {
        l1 = l1.ttl(ttl);
    }
    let mut dash = DashMapLayer::builder();
    if let Some(every) = o.sweep_interval {
        dash = dash.sweep_interval(every);
    }
    let mut l2 = LayerConfig::new("l2", dash.build::<String, String>()?);
    if let Some((read, write)) = o.l2_timeouts {
        l2 = l2.read_timeout(read).write_timeout(write);
    }
    if let Some((failures, rate, min_calls, window, cool_down)) = o.breaker {
        l2 = l2.circuit_breaker(
            CircuitBreaker::new()
                .failures(failures)
                .error_rate(rate, min_calls)
                .window(window)
                .cool_down(cool_down),
        );
    }
    let mut b = MultiLayer::builder().layer(l1).layer(l2).ttl_jitter(o.ttl_jitter);
    if let Some((bound, batch, delay, enqueue, initial, max, flush)) = o.write_back {
        b = b.write_policy(WritePolicy::Back(
            WriteBack::new()
                .queue_bound(bound)
                .batch_size(batch)
                .max_delay(delay)
                .enqueue_timeout(enqueue)
                .retry_backoff(initial, max)
                .flush_timeout(flush),
        ));
    }
    if let Some((grace, entries)) = o.fail_safe {
        b = b.fail_safe(FailSafe::new(grace).max_entries(entries));
    }
    if let Some(ttl) = o.cache_misses_for {
        b = b.cache_misses_for(ttl);
    }
    if let Some(window) = o.refresh_ahead {
        b = b.refresh_ahead(window);
    }
    b.build()
}

/// Runs a few operations; each may fail with a typed error, none may panic or hang.
async fn exercise(cache: MultiLayer<String, String>, set_ttl: Option<Duration>) {
    let mut options = SetOptions::new();
    if let Some(ttl) = set_ttl {
        options = options.ttl(ttl);
    }
    // More writes than a small queue holds: writers wait for room.
    for i in 0..6 {
        let _ = cache.set_with(format!("k{i}"), "v".into(), options.clone()).await;
    }
    let _ = cache.set_many(&[("m".into(), "v".into())], options.clone()).await;
    let _ = cache.get(&"k0".into()).await;
    let _ = cache.get(&"absent".into()).await;
    let _ = cache
        .get_or_load(&"loaded".into(), || async { "v".to_string() })
        .await;
    let _ = cache.delete(&"k1".into()).await;
    let _ = cache.flush().await;
    let _ = cache.close().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn extreme_options_give_a_typed_error_or_a_working_cache(o in options()) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            match build(&o) {
                Err(e) => prop_assert_eq!(e.kind(), ErrorKind::Config, "{}", e),
                Ok(cache) => {
                    let before = panics();
                    let done = tokio::time::timeout(Duration::from_secs(20), exercise(cache, o.set_ttl)).await;
                    prop_assert!(done.is_ok(), "operations hung with {:?}", o);
                    prop_assert_eq!(panics(), before, "a background task panicked with {:?}", o);
                }
            }
            Ok(())
        })?;
    }
}

#[test]
fn most_extreme_cases_reach_the_operations() {
    // The generator, checked: extreme values must reach the operations, not only the
    // builder's checks (at least a quarter of the cases build).
    let mut runner = proptest::test_runner::TestRunner::default();
    let (mut built, mut total) = (0, 0);
    for _ in 0..300 {
        let o = options().new_tree(&mut runner).unwrap().current();
        total += 1;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        if rt.block_on(async { build(&o).is_ok() }) {
            built += 1;
        }
    }
    assert!(
        built * 4 >= total,
        "only {built} of {total} generated cases build"
    );
}
