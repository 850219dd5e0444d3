//! Timeouts, circuit breakers, suspect keys and fail-safe on test-kit layers with a manual
//! clock (the same behaviours against real Redis and PostgreSQL behind a fault-injecting
//! proxy are in the facade's `tests/resilience.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capacitor_core::testkit::{Faults, FaultyLayer, MapLayer};
use capacitor_core::{
    BreakerState, CircuitBreaker, ErrorKind, FailSafe, HealthEvent, Layer, LayerConfig, ManualClock,
    MultiLayer, MultiLayerBuilder, SetOptions,
};

type Map = Arc<MapLayer<String, String>>;
type Builder = MultiLayerBuilder<String, String>;

struct Stack {
    cache: MultiLayer<String, String>,
    maps: Vec<Map>,
    faults: Vec<Arc<Faults>>,
    clock: ManualClock,
}

/// l1 (in-process map), l2 (remote-like: no sync ops, fault injector), l3 (authoritative,
/// fault injector); each LayerConfig passed through `configure_layer`.
fn stack(
    configure_layer: impl Fn(usize, LayerConfig<String, String>) -> LayerConfig<String, String>,
    configure: impl FnOnce(Builder) -> Builder,
) -> Stack {
    let clock = ManualClock::new(1_000_000);
    let mut builder = MultiLayer::builder().clock(clock.clone());
    let (mut maps, mut faults) = (Vec::new(), Vec::new());
    for i in 0..3 {
        let map: Map = Arc::new(MapLayer::with_clock(clock.clone()));
        maps.push(map.clone());
        let cfg = if i == 0 {
            LayerConfig::shared("l1", map)
        } else {
            let faulty = FaultyLayer::shared(map);
            faults.push(faulty.faults());
            LayerConfig::new(format!("l{}", i + 1), faulty)
        };
        builder = builder.layer(configure_layer(i, cfg));
    }
    Stack {
        cache: configure(builder).build().expect("valid config"),
        maps,
        faults,
        clock,
    }
}

fn k(s: &str) -> String {
    s.to_owned()
}

#[tokio::test]
async fn a_hanging_cache_layer_costs_a_read_no_more_than_its_timeout() {
    let s = stack(
        |i, c| {
            if i == 1 {
                c.read_timeout(Duration::from_millis(100))
            } else {
                c
            }
        },
        |b| b,
    );
    s.cache.set(k("a"), k("v1")).await.unwrap();
    s.maps[0].delete(&k("a")).await.unwrap(); // L1 cold
    s.faults[0].pause_next_read(); // l2 hangs on the next read
    let started = Instant::now();
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")), "served by l3");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(100), "{took:?}");
    // The paused read would hang until `resume` (never, here): the bound proves it was cut
    // short and leaves a loaded machine room beyond the 100 ms timeout.
    assert!(
        took < Duration::from_secs(5),
        "a hang must cost the timeout only: {took:?}"
    );
    let l2 = s.cache.stats().layer("l2").cloned().unwrap();
    assert_eq!((l2.timeouts, l2.errors), (1, 1));
    s.faults[0].resume();
}

#[tokio::test]
async fn a_read_does_not_promote_into_the_layer_that_just_failed_it() {
    let s = stack(
        |i, c| {
            if i == 1 {
                c.read_timeout(Duration::from_millis(50))
            } else {
                c
            }
        },
        |b| b,
    );
    s.cache.set(k("a"), k("v1")).await.unwrap();
    s.maps[0].delete(&k("a")).await.unwrap();
    s.maps[1].delete(&k("a")).await.unwrap(); // only l3 has it
    s.faults[0].pause_next_read(); // l2 hangs on the read (its writes would work)
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
    // Promoted into l1; not into l2, whose write would have cost the read its write
    // timeout too when l2 hangs altogether.
    assert_eq!(s.maps[0].raw_entry(&k("a")).map(|e| e.value), Some(k("v1")));
    assert!(s.maps[1].raw_entry(&k("a")).is_none());
    let stats = s.cache.stats();
    assert_eq!(stats.layer("l1").unwrap().promotions, 1);
    assert_eq!(stats.layer("l2").unwrap().promotions, 0);
    s.faults[0].resume();

    // A later read that reaches l2 without failing promotes into it again.
    s.maps[0].delete(&k("a")).await.unwrap();
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
    assert_eq!(s.maps[1].raw_entry(&k("a")).map(|e| e.value), Some(k("v1")));
}

#[tokio::test]
async fn the_authoritative_layer_timing_out_is_a_typed_error() {
    let s = stack(
        |i, c| {
            if i == 2 {
                c.timeout(Duration::from_millis(50))
            } else {
                c
            }
        },
        |b| b,
    );
    s.faults[1].pause_next_read();
    let err = s.cache.get(&k("missing")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(err.layer(), Some("l3"));
    s.faults[1].resume();
}

#[tokio::test]
async fn a_failing_cache_layer_opens_its_breaker_is_skipped_then_probed_and_closed() {
    let events = Arc::new(Mutex::new(Vec::<HealthEvent>::new()));
    let seen = events.clone();
    let s = stack(
        |i, c| {
            if i == 1 {
                c.circuit_breaker(
                    CircuitBreaker::new()
                        .failures(3)
                        .no_error_rate()
                        .cool_down(Duration::from_secs(5)),
                )
            } else {
                c
            }
        },
        move |b| {
            b.promotion(false)
                .on_health_change(move |e| seen.lock().unwrap().push(e.clone()))
        },
    );
    s.cache.set(k("a"), k("v")).await.unwrap();
    s.maps[0].delete(&k("a")).await.unwrap();
    s.faults[0].fail_reads(true);
    for _ in 0..3 {
        assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v")), "l3 answers");
    }
    let l2 = s.cache.stats().layer("l2").cloned().unwrap();
    assert_eq!(
        (l2.errors, l2.breaker, l2.breaker_opens),
        (3, BreakerState::Open, 1)
    );
    // Open: l2 is not asked at all (its errors stay at 3), reads still succeed.
    for _ in 0..10 {
        assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v")));
    }
    let l2 = s.cache.stats().layer("l2").cloned().unwrap();
    assert_eq!((l2.errors, l2.skipped), (3, 10));
    // After the cool-down one probe goes through; still failing, the breaker reopens.
    s.clock.advance(Duration::from_secs(5));
    s.cache.get(&k("a")).await.unwrap();
    assert_eq!(s.cache.stats().layer("l2").unwrap().breaker, BreakerState::Open);
    // Recovered: the next probe closes it and l2 answers again.
    s.faults[0].fail_reads(false);
    s.clock.advance(Duration::from_secs(5));
    s.cache.get(&k("a")).await.unwrap();
    let l2 = s.cache.stats().layer("l2").cloned().unwrap();
    assert_eq!(
        (l2.breaker, l2.hits),
        (BreakerState::Closed, 1),
        "the probe was a hit: {l2:?}"
    );
    let transitions: Vec<(BreakerState, BreakerState)> =
        events.lock().unwrap().iter().map(|e| (e.from, e.to)).collect();
    use BreakerState::*;
    assert_eq!(
        transitions,
        [
            (Closed, Open),
            (Open, HalfOpen),
            (HalfOpen, Open),
            (Open, HalfOpen),
            (HalfOpen, Closed)
        ]
    );
    assert!(events.lock().unwrap().iter().all(|e| e.layer == "l2"));
}

#[tokio::test]
async fn a_cache_layer_that_missed_a_write_is_not_read_for_that_key_until_rewritten() {
    let s = stack(|_, c| c, |b| b);
    s.cache.set(k("a"), k("old")).await.unwrap();
    // l2 refuses the write and the delete: it still holds "old".
    s.faults[0].fail_writes(true);
    s.faults[0].fail_deletes(true);
    s.cache.set(k("a"), k("new")).await.unwrap();
    assert_eq!(s.maps[1].raw_entry(&k("a")).map(|e| e.value), Some(k("old")));
    assert_eq!(s.cache.stats().layer("l2").unwrap().suspect_keys, 1);
    s.faults[0].fail_writes(false);
    s.faults[0].fail_deletes(false);
    s.maps[0].delete(&k("a")).await.unwrap(); // L1 evicted
    assert_eq!(
        s.cache.get(&k("a")).await.unwrap(),
        Some(k("new")),
        "never the old value from l2"
    );
    // The read promoted "new" into l2: it is trusted again.
    assert_eq!(s.maps[1].raw_entry(&k("a")).map(|e| e.value), Some(k("new")));
    let l2 = s.cache.stats().layer("l2").cloned().unwrap();
    assert_eq!((l2.suspect_keys, l2.skipped), (0, 1));
    // get_many passes it by too.
    s.faults[0].fail_writes(true);
    s.faults[0].fail_deletes(true);
    s.cache.set(k("b"), k("b1")).await.unwrap();
    s.cache.set(k("b"), k("b2")).await.unwrap();
    s.maps[0].delete(&k("b")).await.unwrap();
    s.faults[0].fail_writes(false);
    s.faults[0].fail_deletes(false);
    assert_eq!(
        s.cache.get_many(&[k("a"), k("b")]).await.unwrap(),
        vec![Some(k("new")), Some(k("b2"))]
    );
}

#[tokio::test]
async fn fail_safe_serves_the_last_value_while_the_store_is_down_and_only_within_grace() {
    let s = stack(
        |i, c| if i == 0 { c.ttl(Duration::from_secs(10)) } else { c },
        |b| b.fail_safe(FailSafe::new(Duration::from_secs(60))),
    );
    s.cache
        .set_with(k("a"), k("v"), SetOptions::new().ttl(Duration::from_secs(30)))
        .await
        .unwrap();
    s.cache.set(k("gone"), k("x")).await.unwrap();
    s.cache.delete(&k("gone")).await.unwrap();
    // Everything below L1 fails; the L1 copy expires.
    s.faults[0].fail_reads(true);
    s.faults[1].fail_reads(true);
    s.clock.advance(Duration::from_secs(40)); // past the entry's own 30 s life
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v")), "stale hit");
    let err = s.cache.get(&k("gone")).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Unavailable,
        "a deleted key has no fail-safe copy"
    );
    assert_eq!(
        s.cache.get_many(&[k("a")]).await.unwrap(),
        vec![Some(k("v"))],
        "get_many falls back too"
    );
    let stats = s.cache.stats();
    let fs = stats.fail_safe.clone().unwrap();
    assert_eq!((fs.stale_hits, fs.stale_misses), (2, 1), "{stats}");
    assert!(stats.to_string().contains("2 stale hits"), "{stats}");
    // The grace ends 60 s after the expiry (30 s): at 90 s.
    s.clock.advance(Duration::from_secs(50));
    let err = s.cache.get(&k("a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
}

#[tokio::test]
async fn without_fail_safe_a_failing_store_is_a_typed_error_and_nothing_acknowledged_is_lost() {
    let s = stack(|_, c| c, |b| b);
    s.cache.set(k("a"), k("v")).await.unwrap();
    s.maps[0].delete(&k("a")).await.unwrap();
    s.faults[0].fail_reads(true);
    s.faults[1].fail_reads(true);
    s.faults[1].fail_writes(true);
    let err = s.cache.get(&k("a")).await.unwrap_err();
    assert_eq!((err.kind(), err.layer()), (ErrorKind::Unavailable, Some("l3")));
    let err = s.cache.set(k("a"), k("unacked")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    s.faults[0].fail_reads(false);
    s.faults[1].fail_reads(false);
    s.faults[1].fail_writes(false);
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v")));
}

#[tokio::test]
async fn an_opted_in_breaker_on_the_store_fails_fast_and_fail_safe_answers() {
    let s = stack(
        |i, c| {
            if i == 2 {
                c.circuit_breaker(CircuitBreaker::new().failures(2))
            } else {
                c
            }
        },
        |b| b.fail_safe(FailSafe::new(Duration::from_secs(60))),
    );
    s.cache.set(k("a"), k("v")).await.unwrap();
    s.maps[0].delete(&k("a")).await.unwrap();
    s.maps[1].delete(&k("a")).await.unwrap();
    s.faults[1].fail_reads(true);
    s.faults[1].fail_writes(true);
    for _ in 0..2 {
        s.cache.set(k("b"), k("x")).await.unwrap_err();
    }
    assert_eq!(s.cache.stats().layer("l3").unwrap().breaker, BreakerState::Open);
    let err = s.cache.set(k("b"), k("x")).await.unwrap_err();
    assert!(err.is_circuit_open(), "{err}");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(
        s.cache.get(&k("a")).await.unwrap(),
        Some(k("v")),
        "fail-safe copy"
    );
    let l3 = s.cache.stats().layer("l3").cloned().unwrap();
    assert_eq!((l3.errors, l3.skipped), (2, 2), "skips are not errors: {l3:?}");
}

#[test]
fn invalid_resilience_options_are_config_errors_naming_the_field() {
    let build = |cfg: LayerConfig<String, String>, fail_safe: Option<FailSafe>| {
        let mut b = MultiLayer::builder().layer(cfg);
        if let Some(f) = fail_safe {
            b = b.fail_safe(f);
        }
        b.build().unwrap_err().to_string()
    };
    let map = || MapLayer::<String, String>::new();
    let msg = build(LayerConfig::new("a", map()).read_timeout(Duration::ZERO), None);
    assert!(msg.contains("layers[0].read_timeout"), "{msg}");
    let msg = build(
        LayerConfig::new("a", map()).circuit_breaker(CircuitBreaker::new().failures(0)),
        None,
    );
    assert!(msg.contains("layers[0].circuit_breaker.failures"), "{msg}");
    let msg = build(LayerConfig::new("a", map()), Some(FailSafe::new(Duration::ZERO)));
    assert!(msg.contains("fail_safe.grace"), "{msg}");
}
