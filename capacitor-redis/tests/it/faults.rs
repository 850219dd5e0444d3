//! Faults: foreign data in the namespace, oversized values, Redis down at start-up, and
//! Redis killed mid-workload (a private `redis-server`, killed by PID, then restarted).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common;

use std::time::{Duration, Instant};

use crate::common::{free_port, raw, unique_prefix, url, RedisServer};
use capacitor_core::testkit::MapLayer;
use capacitor_core::{ErrorKind, Layer, LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_redis::fred::prelude::KeysInterface;
use capacitor_redis::{Reconnect, RedisLayer};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

async fn layer_at(url: &str, prefix: &str) -> RedisLayer<String, String> {
    let layer = RedisLayer::builder().url(url).prefix(prefix).build().unwrap();
    layer
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to Redis at {url} (is it running?): {e}"));
    layer
}

#[test]
fn wrongtype_and_foreign_bytes_are_decode_misses_evicted_under_the_prefix() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("foreign");
        let raw = raw().await;
        let layer = layer_at(&url(), &prefix).await;
        let list = format!("{prefix}list");
        let foreign = format!("{prefix}foreign");
        common::make_list(&raw, &list).await;
        let _: () = raw
            .set(foreign.as_str(), "hello", None, None, false)
            .await
            .unwrap();

        let err = layer.get(&"list".to_string()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
        let err = layer.get(&"foreign".to_string()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
        let left: i64 = raw.exists(vec![list.as_str(), foreign.as_str()]).await.unwrap();
        assert_eq!(left, 0, "both keys are under our prefix and evicted");
        assert_eq!(layer.get(&"foreign".to_string()).await.unwrap(), None);

        // get_many: a foreign value fails the call as Decode, the good one is readable after.
        let _: () = raw
            .set(foreign.as_str(), "hello", None, None, false)
            .await
            .unwrap();
        layer
            .set(&"good".to_string(), &"v".to_string(), None)
            .await
            .unwrap();
        let err = layer
            .get_many(&["good".to_string(), "foreign".to_string()])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        let got = layer
            .get_many(&["good".to_string(), "foreign".to_string()])
            .await
            .unwrap();
        assert_eq!(got[0].as_ref().map(|e| e.value.as_str()), Some("v"));
        assert_eq!(got[1], None);

        common::delete_prefix(&raw, &prefix).await;
        layer.close().await.unwrap();
    });
}

#[test]
fn without_a_prefix_foreign_keys_are_reported_but_never_deleted() {
    common::run(TEST_TIMEOUT, async {
        let name = unique_prefix("noprefix");
        let raw = raw().await;
        let layer = layer_at(&url(), "").await;
        common::make_list(&raw, &name).await;
        let err = layer.get(&name).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        let left: i64 = raw.exists(name.as_str()).await.unwrap();
        assert_eq!(left, 1, "not our namespace: left alone");
        let _: i64 = raw.del(name.as_str()).await.unwrap();
        layer.close().await.unwrap();
    });
}

#[test]
fn a_foreign_value_through_a_multilayer_is_a_counted_miss_that_reads_on_below() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("multi_decode");
        let raw = raw().await;
        let redis = layer_at(&url(), &prefix).await;
        let bottom = MapLayer::<String, String>::new();
        bottom
            .set(&"k".to_string(), &"from bottom".to_string(), None)
            .await
            .unwrap();
        let _: () = raw
            .set(format!("{prefix}k").as_str(), "not ours", None, None, false)
            .await
            .unwrap();
        let cache = MultiLayer::<String, String>::builder()
            .layer(LayerConfig::new(
                "l1",
                MokaLayer::builder().max_capacity(100).build().unwrap(),
            ))
            .layer(LayerConfig::new("redis", redis))
            .layer(LayerConfig::new("bottom", bottom))
            .build()
            .unwrap();
        assert_eq!(
            cache.get(&"k".to_string()).await.unwrap(),
            Some("from bottom".to_string())
        );
        let stats = cache.stats();
        let redis_stats = stats.layer("redis").unwrap();
        assert_eq!(redis_stats.decode_errors, 1, "{stats}");
        // Promoted into Redis after the bad value was evicted.
        let stored: Option<Vec<u8>> = raw.get(format!("{prefix}k").as_str()).await.unwrap();
        assert!(
            stored.is_some_and(|b| capacitor_core::envelope::is_ours(&b)),
            "the foreign value was replaced by the promoted entry"
        );
        cache.close().await.unwrap();
        common::delete_prefix(&raw, &prefix).await;
    });
}

#[test]
fn a_value_over_the_maximum_is_refused_before_anything_is_sent() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("too_large");
        let raw = raw().await;
        let layer = RedisLayer::builder()
            .url(url())
            .prefix(&prefix)
            .max_value_bytes(64)
            .build::<String, String>()
            .unwrap();
        layer.connect().await.unwrap();
        let big = "x".repeat(1_000);
        let err = layer.set(&"big".to_string(), &big, None).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueTooLarge, "{err}");
        let err = layer
            .set_many(
                &[("small".to_string(), "s".to_string()), ("big".to_string(), big)],
                None,
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueTooLarge);
        assert!(
            common::keys_under(&raw, &prefix).await.is_empty(),
            "nothing was sent"
        );
        layer.close().await.unwrap();
    });
}

#[test]
fn redis_down_at_start_fails_fast_then_the_layer_joins_without_a_rebuild() {
    common::run(TEST_TIMEOUT, async {
        let port = free_port();
        let url = format!("redis://127.0.0.1:{port}");
        // Long timeouts: failing fast is failing well within them, which a loaded machine
        // cannot fake.
        let timeout = Duration::from_secs(5);
        let layer = RedisLayer::builder()
            .url(&url)
            .prefix("down:")
            .connect_timeout(timeout)
            .command_timeout(timeout)
            .reconnect(Reconnect::Constant(Duration::from_millis(50)))
            .build::<String, String>()
            .expect("build does not need the server");
        let started = Instant::now();
        let err = layer.get(&"k".to_string()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        let err = layer
            .set(&"k".to_string(), &"v".to_string(), None)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "fail fast, not after the {timeout:?} timeouts: {:?}",
            started.elapsed()
        );
        let err = layer.connect().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(layer.health_check().await.is_err());

        let _server = RedisServer::start_on(port, &[]);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match layer.set(&"k".to_string(), &"v".to_string(), None).await {
                Ok(()) => break,
                Err(e) => assert!(Instant::now() < deadline, "did not recover: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            layer.get(&"k".to_string()).await.unwrap().map(|e| e.value),
            Some("v".to_string())
        );
        layer.connect().await.unwrap();
        layer.close().await.unwrap();
    });
}

#[test]
fn redis_killed_mid_workload_typed_errors_within_the_timeout_and_recovery() {
    common::run(TEST_TIMEOUT, async {
        let mut server = RedisServer::start();
        let timeout = Duration::from_secs(1);
        // What an operation may take beyond the timeout on a loaded machine.
        let margin = Duration::from_secs(2);
        let redis = std::sync::Arc::new(
            RedisLayer::builder()
                .url(server.url())
                .prefix("kill:")
                .command_timeout(timeout)
                .connect_timeout(Duration::from_secs(5))
                .reconnect(Reconnect::Constant(Duration::from_millis(50)))
                .build::<String, String>()
                .unwrap(),
        );
        redis.connect().await.unwrap();
        let cache = MultiLayer::<String, String>::builder()
            .layer(
                LayerConfig::new("l1", MokaLayer::builder().max_capacity(50).build().unwrap())
                    .ttl(Duration::from_secs(60)),
            )
            .layer(LayerConfig::shared("redis", redis.clone()))
            .layer(LayerConfig::new("bottom", MapLayer::<String, String>::new()))
            .build()
            .unwrap();
        for i in 0..200 {
            cache.set(format!("k{i}"), format!("v{i}")).await.unwrap();
        }

        // Kill the server while a workload runs; the workload runs on for 2 s after the kill.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workload = {
            let (redis, stop) = (redis.clone(), stop.clone());
            tokio::spawn(async move {
                let mut worst = Duration::ZERO;
                let mut errors = 0;
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let t = Instant::now();
                    let r = redis.get(&format!("k{}", i % 200)).await;
                    worst = worst.max(t.elapsed());
                    if let Err(e) = r {
                        assert!(
                            matches!(
                                e.kind(),
                                ErrorKind::Unavailable | ErrorKind::Timeout | ErrorKind::Backend
                            ),
                            "typed error: {e}"
                        );
                        errors += 1;
                    }
                    i += 1;
                }
                (worst, errors)
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pid = server.pid().unwrap();
        server.kill();
        eprintln!("killed redis-server pid {pid}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (worst, errors) = workload.await.unwrap();
        assert!(errors > 0, "some operations saw the server die");
        assert!(
            worst <= timeout + margin,
            "every op returned within the timeout: worst {worst:?}"
        );

        // Down: each operation of every kind returns in time with a typed error.
        for _ in 0..5 {
            let t = Instant::now();
            let e = redis
                .set(&"x".to_string(), &"y".to_string(), None)
                .await
                .unwrap_err();
            assert!(
                matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
                "{e}"
            );
            let e = redis
                .get_many(&["a".to_string(), "b".to_string()])
                .await
                .unwrap_err();
            assert!(
                matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
                "{e}"
            );
            assert!(
                t.elapsed() <= 2 * timeout + margin,
                "two operations returned within their timeouts: {:?}",
                t.elapsed()
            );
        }
        // The composer keeps serving from L1 and the bottom layer.
        for i in 0..200 {
            assert_eq!(cache.get(&format!("k{i}")).await.unwrap(), Some(format!("v{i}")));
        }
        cache.set("new".to_string(), "value".to_string()).await.unwrap();
        assert_eq!(
            cache.get(&"new".to_string()).await.unwrap(),
            Some("value".to_string())
        );
        assert!(cache.stats().layer("redis").unwrap().errors > 0);

        // Back: the same layer recovers without a rebuild.
        server.restart();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match redis
                .set(&"after".to_string(), &"restart".to_string(), None)
                .await
            {
                Ok(()) => break,
                Err(e) => assert!(Instant::now() < deadline, "did not recover: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            redis.get(&"after".to_string()).await.unwrap().map(|e| e.value),
            Some("restart".to_string())
        );
        cache.close().await.unwrap();
    });
}
