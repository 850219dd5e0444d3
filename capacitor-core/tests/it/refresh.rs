//! Refresh-ahead (`MultiLayerBuilder::refresh_ahead`) on test-kit layers with a manual
//! clock: a top-layer hit close to expiry renews the copy from below in the background,
//! once per key, never failing or delaying the read, never writing over a newer value.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::Arc;
use std::time::Duration;

use capacitor_core::testkit::{Faults, FaultyLayer, MapLayer};
use capacitor_core::{ErrorKind, LayerConfig, ManualClock, MultiLayer, RefreshStats};

type Map = Arc<MapLayer<String, String>>;

struct Stack {
    cache: MultiLayer<String, String>,
    l1: Map,
    l2: Map,
    faults: Arc<Faults>,
    clock: ManualClock,
}

/// l1: an in-process map with a 10 s TTL; l2: a map behind a fault injector (awaited, as
/// a remote layer is), no TTL. Refresh in the last 3 s of the l1 copy's life.
fn stack() -> Stack {
    let clock = ManualClock::new(1_000_000);
    let l1: Map = Arc::new(MapLayer::with_clock(clock.clone()));
    let l2: Map = Arc::new(MapLayer::with_clock(clock.clone()));
    let faulty = FaultyLayer::shared(l2.clone());
    let faults = faulty.faults();
    let cache = MultiLayer::builder()
        .clock(clock.clone())
        .layer(LayerConfig::shared("l1", l1.clone()).ttl(Duration::from_secs(10)))
        .layer(LayerConfig::new("l2", faulty))
        .refresh_ahead(Duration::from_secs(3))
        .build()
        .expect("valid config");
    Stack {
        cache,
        l1,
        l2,
        faults,
        clock,
    }
}

fn k(s: &str) -> String {
    s.to_owned()
}

fn refresh(cache: &MultiLayer<String, String>) -> RefreshStats {
    cache.stats().refresh.expect("refresh-ahead is on")
}

/// Waits (bounded) until no refresh runs.
async fn settled(cache: &MultiLayer<String, String>) -> RefreshStats {
    for _ in 0..5_000 {
        let stats = refresh(cache);
        if stats.in_flight == 0 {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("a refresh is still running after 5 s: {:?}", refresh(cache));
}

#[tokio::test]
async fn a_hot_key_is_renewed_in_the_top_layer_before_it_expires() {
    let s = stack();
    s.cache.set(k("a"), k("v1")).await.unwrap();
    let first_expiry = s.l1.raw_entry(&k("a")).unwrap().expires_at.unwrap();

    // 5 s left: outside the window, a plain hit.
    s.clock.advance(Duration::from_secs(5));
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
    assert_eq!(settled(&s.cache).await.started, 0);

    // 2 s left: the hit is served from l1 and starts one refresh.
    s.clock.advance(Duration::from_secs(3));
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
    let stats = settled(&s.cache).await;
    assert_eq!((stats.started, stats.renewed, stats.dropped), (1, 1, 0));
    let renewed = s.l1.raw_entry(&k("a")).unwrap().expires_at.unwrap();
    assert_eq!(
        renewed.as_millis() - first_expiry.as_millis(),
        8_000,
        "the copy lives 10 s from the refresh"
    );
    let layers = s.cache.stats();
    assert_eq!(layers.layer("l2").unwrap().hits, 1, "one read below");
    assert_eq!(layers.layer("l1").unwrap().promotions, 1);

    // Past the first expiry the key is still an l1 hit: no read went below.
    s.clock.advance(Duration::from_secs(4));
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
    let layers = s.cache.stats();
    assert_eq!(layers.layer("l1").unwrap().misses, 0);
    assert_eq!(layers.layer("l2").unwrap().hits, 1);
}

#[tokio::test]
async fn concurrent_hits_in_the_window_start_one_refresh_and_never_wait_for_it() {
    let s = stack();
    s.cache.set(k("a"), k("v1")).await.unwrap();
    s.clock.advance(Duration::from_secs(8));
    s.faults.pause_next_read(); // the refresh's read of l2 hangs until resumed
    for _ in 0..100 {
        assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
    }
    s.faults.read_paused().await;
    let stats = refresh(&s.cache);
    assert_eq!((stats.started, stats.in_flight), (1, 1), "{stats:?}");
    s.faults.resume();
    let stats = settled(&s.cache).await;
    assert_eq!((stats.started, stats.renewed), (1, 1));
    assert_eq!(s.cache.stats().layer("l2").unwrap().hits, 1);
}

#[tokio::test]
async fn a_write_during_a_refresh_is_not_overwritten_by_it() {
    let s = stack();
    s.cache.set(k("a"), k("v1")).await.unwrap();
    s.clock.advance(Duration::from_secs(8));
    s.faults.pause_next_read();
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
    s.faults.read_paused().await; // the refresh has read v1 from l2
    s.cache.set(k("a"), k("v2")).await.unwrap();
    s.faults.resume();
    settled(&s.cache).await;
    assert_eq!(s.l1.raw_entry(&k("a")).unwrap().value, "v2");
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v2")));
    assert_eq!(s.cache.stats().layer("l1").unwrap().promotions_skipped, 1);
}

#[tokio::test]
async fn a_failing_layer_below_neither_fails_nor_delays_the_read() {
    let s = stack();
    s.cache.set(k("a"), k("v1")).await.unwrap();
    s.clock.advance(Duration::from_secs(8));
    s.faults.fail_reads(true);
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
    let stats = settled(&s.cache).await;
    assert_eq!((stats.started, stats.renewed), (1, 0));
    assert!(s.cache.stats().layer("l2").unwrap().errors >= 1);
    // The same copy does not ask again (no read below on every hit of the window).
    s.clock.advance(Duration::from_secs(1));
    for _ in 0..10 {
        assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
        settled(&s.cache).await; // any refresh it started has ended
    }
    assert_eq!(settled(&s.cache).await.started, 1);
    // Not renewed: the l1 copy expires as it would have; l2 answers once it is back.
    s.clock.advance(Duration::from_secs(3));
    s.faults.fail_reads(false);
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
    assert_eq!(s.cache.stats().layer("l1").unwrap().misses, 1);
}

#[tokio::test]
async fn a_key_gone_below_is_left_to_expire() {
    let s = stack();
    s.cache.set(k("a"), k("v1")).await.unwrap();
    capacitor_core::Layer::delete(&*s.l2, &k("a")).await.unwrap();
    s.clock.advance(Duration::from_secs(8));
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
    let stats = settled(&s.cache).await;
    assert_eq!((stats.started, stats.renewed), (1, 0));
    for _ in 0..10 {
        assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
        settled(&s.cache).await; // any refresh it started has ended
    }
    let stats = settled(&s.cache).await;
    assert_eq!(stats.started, 1, "one refresh per copy, not one per hit");
    assert_eq!(s.cache.stats().layer("l2").unwrap().misses, 1);
    s.clock.advance(Duration::from_secs(3));
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), None);
}

#[tokio::test]
async fn a_refresh_started_before_close_does_not_read_below_after_it() {
    let s = stack();
    s.cache.set(k("a"), k("v1")).await.unwrap();
    s.clock.advance(Duration::from_secs(8));
    // On this single-threaded runtime the refresh task runs only at the next yield, which
    // comes after the close.
    assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
    s.cache.close().await.unwrap();
    let stats = settled(&s.cache).await;
    assert_eq!((stats.started, stats.renewed), (1, 0));
    let l2 = s.cache.stats().layer("l2").cloned().unwrap();
    assert_eq!(
        (l2.hits, l2.misses, l2.errors),
        (0, 0, 0),
        "no read below after close"
    );
    assert_eq!(s.cache.get(&k("a")).await.unwrap_err().kind(), ErrorKind::Closed);
}

#[tokio::test]
async fn a_renewed_copy_is_refreshed_again_in_its_own_window() {
    let s = stack();
    s.cache.set(k("a"), k("v1")).await.unwrap();
    for round in 1..=3 {
        s.clock.advance(Duration::from_secs(8)); // 2 s left of the current copy
        assert_eq!(s.cache.get(&k("a")).await.unwrap(), Some(k("v1")));
        let stats = settled(&s.cache).await;
        assert_eq!((stats.started, stats.renewed), (round, round));
    }
    assert_eq!(s.cache.stats().layer("l1").unwrap().misses, 0);
}

#[test]
fn refresh_ahead_needs_a_window_two_layers_and_promotion() {
    let one = || LayerConfig::new("l1", MapLayer::<String, String>::new());
    let two = || LayerConfig::new("l2", MapLayer::<String, String>::new());
    let cases = [
        MultiLayer::builder()
            .layer(one())
            .layer(two())
            .refresh_ahead(Duration::ZERO)
            .build(),
        MultiLayer::builder()
            .layer(one())
            .refresh_ahead(Duration::from_secs(1))
            .build(),
        MultiLayer::builder()
            .layer(one())
            .layer(two())
            .promotion(false)
            .refresh_ahead(Duration::from_secs(1))
            .build(),
        MultiLayer::builder()
            .layer(one().read_only(true))
            .layer(two())
            .refresh_ahead(Duration::from_secs(1))
            .build(),
        MultiLayer::builder()
            .layer(one().ttl(Duration::from_secs(5)))
            .layer(two())
            .refresh_ahead(Duration::from_secs(5))
            .build(),
    ];
    for result in cases {
        let err = result.expect_err("invalid");
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.message().contains("refresh_ahead"), "{err}");
    }
    let off = MultiLayer::builder().layer(one()).layer(two()).build().unwrap();
    assert_eq!(off.stats().refresh, None);
}
