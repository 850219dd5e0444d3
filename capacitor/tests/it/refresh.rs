//! Refresh-ahead against the real Redis: moka (6 s TTL) → Redis, refreshed in the last
//! 4 s. A key read once inside the window is still a moka hit after its first expiry,
//! renewed by one background read of Redis.
//!
//! Needs Redis (`CAPACITOR_REDIS_URL`, default redis://127.0.0.1:6379); `cargo xtask
//! test` makes sure it answers. The margins are whole seconds: the sleeps may overshoot
//! on a loaded machine by that much without changing the outcome.
#![cfg(all(feature = "memory", feature = "redis"))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::time::{Duration, Instant};

use capacitor::memory::MokaLayer;
use capacitor::redis::RedisLayer;
use capacitor::{LayerConfig, MultiLayer};

use crate::common::redis_url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_read_in_the_window_stays_in_l1_past_its_first_expiry() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let redis = RedisLayer::builder()
        .url(redis_url())
        .prefix(format!("refresh_{}_{nanos}:", std::process::id()))
        .build::<String, String>()
        .unwrap();
    redis.connect().await.expect("Redis answers");
    let cache = MultiLayer::builder()
        .layer(
            LayerConfig::new("moka", MokaLayer::builder().max_capacity(1_000).build().unwrap())
                .ttl(Duration::from_secs(6)),
        )
        .layer(LayerConfig::new("redis", redis).ttl(Duration::from_secs(60)))
        .refresh_ahead(Duration::from_secs(4))
        .build()
        .unwrap();

    let written = Instant::now();
    cache.set("a".to_owned(), "v1".to_owned()).await.unwrap();
    // 3.5 s left of the moka copy: inside the window.
    tokio::time::sleep_until((written + Duration::from_millis(2_500)).into()).await;
    assert_eq!(cache.get(&"a".to_owned()).await.unwrap().as_deref(), Some("v1"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let refresh = loop {
        let r = cache.stats().refresh.unwrap();
        if r.in_flight == 0 {
            break r;
        }
        assert!(Instant::now() < deadline, "the refresh did not end: {r:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!((refresh.started, refresh.renewed), (1, 1), "{refresh:?}");
    assert!(
        written.elapsed() < Duration::from_secs(6),
        "the machine was too slow for this test's timing: {:?}",
        written.elapsed()
    );

    // Past the first copy's expiry (6 s), within the renewed copy's life (≥ 8.5 s).
    tokio::time::sleep_until((written + Duration::from_millis(7_000)).into()).await;
    assert_eq!(cache.get(&"a".to_owned()).await.unwrap().as_deref(), Some("v1"));
    let stats = cache.stats();
    let moka = stats.layer("moka").unwrap();
    assert_eq!((moka.hits, moka.misses, moka.promotions), (2, 0, 1), "{stats}");
    assert_eq!(stats.layer("redis").unwrap().hits, 1, "{stats}");
    cache.close().await.unwrap();
}
