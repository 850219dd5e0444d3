//! Order of writes of one key over the real Redis: overlapping writers through a moka L1,
//! a write delayed past its timeout (through `testkit::FaultProxy`), and a private Redis
//! killed with SIGKILL mid-write. After everything settles, Redis and every layer hold
//! the last acknowledged value.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{delete_prefix, raw, unique_prefix, url, RedisServer};
use capacitor_core::testkit::FaultProxy;
use capacitor_core::{ErrorKind, Layer, LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_redis::{Reconnect, RedisLayer};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

fn s(x: &str) -> String {
    x.to_owned()
}

fn redis_at(url: &str, prefix: &str, command_timeout: Duration) -> RedisLayer<String, String> {
    RedisLayer::builder()
        .url(url)
        .prefix(prefix)
        .pool_size(4)
        .command_timeout(command_timeout)
        .connect_timeout(Duration::from_secs(2))
        .reconnect(Reconnect::Constant(Duration::from_millis(50)))
        .build::<String, String>()
        .expect("build")
}

/// The first report: two tasks set one key at the same moment through moka over
/// Redis; after both return, L1 held the loser in about a third of the rounds.
#[test]
fn concurrent_sets_through_moka_leave_l1_and_redis_agreeing() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("race");
        let redis = Arc::new(redis_at(&url(), &prefix, Duration::from_secs(2)));
        redis.connect().await.expect("connect");
        let l1 = Arc::new(
            MokaLayer::builder()
                .max_capacity(10_000)
                .build::<String, String>()
                .unwrap(),
        );
        let cache = MultiLayer::builder()
            .layer(
                LayerConfig::shared("l1", l1.clone() as Arc<dyn Layer<String, String>>)
                    .ttl(Duration::from_secs(60)),
            )
            .layer(LayerConfig::shared(
                "redis",
                redis.clone() as Arc<dyn Layer<String, String>>,
            ))
            .build()
            .unwrap();
        let rounds = 500;
        let mut disagreed = 0;
        for round in 0..rounds {
            let key = format!("k{}", round % 4);
            let (a, b) = (cache.clone(), cache.clone());
            let (ka, kb) = (key.clone(), key.clone());
            let ta = tokio::spawn(async move { a.set(ka, format!("a{round}")).await });
            let tb = tokio::spawn(async move { b.set(kb, format!("b{round}")).await });
            ta.await.unwrap().unwrap();
            tb.await.unwrap().unwrap();
            let in_redis = redis.get(&key).await.unwrap().map(|e| e.value);
            let in_l1 = l1.get(&key).await.unwrap().map(|e| e.value);
            if in_l1.is_some() && in_l1 != in_redis {
                disagreed += 1;
            }
            assert_eq!(
                cache.get(&key).await.unwrap(),
                in_redis,
                "round {round}: served a replaced value"
            );
        }
        assert_eq!(
            disagreed, 0,
            "L1 disagreed with Redis in {disagreed} of {rounds} rounds"
        );
        cache.close().await.unwrap();
        delete_prefix(&raw().await, &prefix).await;
    });
}

/// A set delayed 1.5 s on the way, past the composer's 200 ms write timeout (shorter than
/// the layer's 2 s command timeout, as in the README's example), then a later set
/// acknowledged: when the delayed bytes arrive, Redis must keep the later value.
#[test]
fn a_write_abandoned_by_the_composer_never_lands_after_a_later_acknowledged_one() {
    common::run(TEST_TIMEOUT, async {
        let (proxy, via) = FaultProxy::in_front_of(&url(), 6379).await.expect("proxy");
        let prefix = unique_prefix("fence");
        let redis = Arc::new(redis_at(&via, &prefix, Duration::from_secs(2)));
        redis.connect().await.expect("connect");
        let l1 = Arc::new(
            MokaLayer::builder()
                .max_capacity(100)
                .build::<String, String>()
                .unwrap(),
        );
        let cache = MultiLayer::builder()
            .layer(LayerConfig::shared(
                "l1",
                l1.clone() as Arc<dyn Layer<String, String>>,
            ))
            .layer(
                LayerConfig::shared("redis", redis.clone() as Arc<dyn Layer<String, String>>)
                    .write_timeout(Duration::from_millis(200)),
            )
            .build()
            .unwrap();
        cache.set(s("k"), s("v1")).await.unwrap();
        proxy.set_latency(Duration::from_millis(1_500));
        let err = cache.set(s("k"), s("v2")).await.expect_err("v2 times out");
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        proxy.set_latency(Duration::ZERO);
        let started = Instant::now();
        loop {
            match cache.set(s("k"), s("v3")).await {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::Timeout && started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("set v3: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let direct = redis_at(&url(), &prefix, Duration::from_secs(2));
        direct.connect().await.unwrap();
        assert_eq!(direct.get(&s("k")).await.unwrap().map(|e| e.value), Some(s("v3")));
        assert_eq!(cache.get(&s("k")).await.unwrap(), Some(s("v3")));
        if let Some(copy) = l1.get(&s("k")).await.unwrap() {
            assert_eq!(copy.value, s("v3"), "L1 disagrees with Redis");
        }
        cache.close().await.unwrap();
        direct.close().await.unwrap();
        proxy.stop();
        delete_prefix(&raw().await, &prefix).await;
    });
}

/// A set abandoned by the composer (200 ms) while the network is stalled, its connection
/// then closed: fred resends it once it has reconnected. A later set acknowledged after
/// the reconnection must still be what Redis ends with.
#[test]
fn a_write_fred_resends_after_reconnecting_never_lands_after_a_later_one() {
    common::run(TEST_TIMEOUT, async {
        let (proxy, via) = FaultProxy::in_front_of(&url(), 6379).await.expect("proxy");
        let prefix = unique_prefix("resend");
        let redis = Arc::new(redis_at(&via, &prefix, Duration::from_secs(2)));
        redis.connect().await.expect("connect");
        let cache = MultiLayer::builder()
            .layer(LayerConfig::new(
                "l1",
                MokaLayer::builder()
                    .max_capacity(100)
                    .build::<String, String>()
                    .unwrap(),
            ))
            .layer(
                LayerConfig::shared("redis", redis.clone() as Arc<dyn Layer<String, String>>)
                    .write_timeout(Duration::from_millis(200)),
            )
            .build()
            .unwrap();
        cache.set(s("k"), s("v1")).await.unwrap();
        proxy.stall();
        let err = cache.set(s("k"), s("v2")).await.expect_err("v2 times out");
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        proxy.drop_connections();
        proxy.resume();
        let started = Instant::now();
        loop {
            match cache.set(s("k"), s("v3")).await {
                Ok(()) => break,
                Err(e) if started.elapsed() < Duration::from_secs(15) => {
                    assert!(
                        matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Unavailable),
                        "{e}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("set v3: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        let direct = redis_at(&url(), &prefix, Duration::from_secs(2));
        direct.connect().await.unwrap();
        assert_eq!(
            direct.get(&s("k")).await.unwrap().map(|e| e.value),
            Some(s("v3")),
            "the resent set overwrote the acknowledged one"
        );
        assert_eq!(cache.get(&s("k")).await.unwrap(), Some(s("v3")));
        cache.close().await.unwrap();
        direct.close().await.unwrap();
        proxy.stop();
        delete_prefix(&raw().await, &prefix).await;
    });
}

/// The same with the layer's own 400 ms command timeout: the delayed set reaches Redis
/// after its deadline and is refused there.
#[test]
fn a_write_that_timed_out_in_the_layer_is_refused_when_it_arrives_late() {
    common::run(TEST_TIMEOUT, async {
        let (proxy, via) = FaultProxy::in_front_of(&url(), 6379).await.expect("proxy");
        let prefix = unique_prefix("fence400");
        let redis = redis_at(&via, &prefix, Duration::from_millis(400));
        redis.connect().await.expect("connect");
        redis.set(&s("k"), &s("v1"), None).await.unwrap();
        proxy.set_latency(Duration::from_millis(1_500));
        let err = redis
            .set(&s("k"), &s("v2"), None)
            .await
            .expect_err("v2 times out");
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        proxy.set_latency(Duration::ZERO);
        let started = Instant::now();
        loop {
            match redis.set(&s("k"), &s("v3"), None).await {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::Timeout && started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("set v3: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let direct = redis_at(&url(), &prefix, Duration::from_secs(2));
        direct.connect().await.unwrap();
        assert_eq!(
            direct.get(&s("k")).await.unwrap().map(|e| e.value),
            Some(s("v3")),
            "the set that timed out overwrote the acknowledged one"
        );
        redis.close().await.unwrap();
        direct.close().await.unwrap();
        proxy.stop();
        delete_prefix(&raw().await, &prefix).await;
    });
}

/// One writer sets a key in a loop while its private Redis is killed (SIGKILL) and
/// restarted; fred resends commands that were in flight after it reconnects. Once the
/// loop ends on an acknowledged write and everything settles, Redis holds that write.
#[test]
fn after_a_sigkill_mid_write_redis_keeps_the_last_acknowledged_value() {
    common::run(TEST_TIMEOUT, async {
        let mut server = RedisServer::start();
        let layer = Arc::new(redis_at(&server.url(), "kill:", Duration::from_millis(500)));
        layer.connect().await.expect("connect");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = tokio::spawn({
            let (layer, stop) = (layer.clone(), stop.clone());
            async move {
                let mut i = 0u64;
                loop {
                    i += 1;
                    let ok = layer.set(&s("k"), &format!("v{i}"), None).await.is_ok();
                    // Ends on an acknowledged write.
                    if ok && stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return (Some(format!("v{i}")), i);
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.restart();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (last_ack, writes) = writer.await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let held = layer.get(&s("k")).await.unwrap().map(|e| e.value);
        assert_eq!(held, last_ack, "after {writes} writes");
        layer.close().await.unwrap();
    });
}
