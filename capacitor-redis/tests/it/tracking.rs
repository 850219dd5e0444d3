//! Redis client-side caching as the invalidation bus (`RedisTrackingBus`, `CLIENT TRACKING
//! ON BCAST PREFIX`): two composers in one process, each with its own moka L1 and its own
//! tracking connection over one shared RedisLayer, stay coherent within a bounded,
//! measured delay; a write by any other Redis client invalidates them too; a restart of
//! the server turns tracking on again and clears the L1s. The last test shows on the server
//! why the default (non-BCAST) mode is not offered.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{unique_prefix, url, RedisServer};
use capacitor_core::{ErrorKind, LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_redis::fred::prelude::KeysInterface;
use capacitor_redis::{Reconnect, RedisLayer, RedisTrackingBus};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

type Cache = MultiLayer<String, String>;

fn composer(redis: Arc<RedisLayer<String, String>>, bus: Arc<RedisTrackingBus>) -> Cache {
    MultiLayer::<String, String>::builder()
        .layer(
            LayerConfig::new("l1", MokaLayer::builder().max_capacity(1_000).build().unwrap())
                .ttl(Duration::from_secs(300)),
        )
        .layer(LayerConfig::shared("redis", redis))
        .invalidation_bus(bus)
        .build()
        .unwrap()
}

/// Waits (≤ 5 s) until `cache` serves `want` for `key`; how long it took.
async fn served_within(cache: &Cache, key: &str, want: Option<&str>) -> Duration {
    let started = Instant::now();
    loop {
        if cache.get(&key.to_string()).await.unwrap().as_deref() == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{key} still not {want:?} after 5 s"
        );
        tokio::task::yield_now().await;
    }
}

/// Waits until tracking is on.
async fn tracking(bus: &RedisTrackingBus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bus.is_connected() {
        assert!(Instant::now() < deadline, "tracking did not start within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn client_tracking_keeps_two_instances_coherent_even_for_writes_by_other_clients() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("tracking");
        let redis = Arc::new(RedisLayer::builder().url(url()).prefix(&prefix).build().unwrap());
        redis.connect().await.unwrap();
        let bus = || {
            Arc::new(
                RedisTrackingBus::builder()
                    .url(url())
                    .prefix(prefix.as_str())
                    .build()
                    .unwrap(),
            )
        };
        let (bus_a, bus_b) = (bus(), bus());
        bus_a.connect().await.unwrap();
        bus_b.connect().await.unwrap();
        let a = composer(redis.clone(), bus_a.clone());
        let b = composer(redis.clone(), bus_b.clone());
        tracking(&bus_a).await;
        tracking(&bus_b).await;
        assert!(b.stats().bus.unwrap().clears >= 1, "tracking on clears the L1");

        let key = "user:1".to_string();
        let mut delays = Vec::new();
        for i in 0..100 {
            let (old, new) = (format!("old {i}"), format!("new {i}"));
            a.set(key.clone(), old.clone()).await.unwrap();
            served_within(&b, &key, Some(&old)).await; // now in B's L1
            let written = Instant::now();
            a.set(key.clone(), new.clone()).await.unwrap();
            served_within(&b, &key, Some(&new)).await;
            delays.push(written.elapsed());
        }
        delays.sort();
        let (median, p99, max) = (delays[50], delays[98], delays[99]);
        println!(
            "client tracking: A's set returned → B serves the new value, 100 writes: median {median:?}, p99 {p99:?}, max {max:?}"
        );
        assert!(max < Duration::from_secs(2), "max delay {max:?}");
        assert_eq!(b.stats().bus.unwrap().published, 0, "tracking publishes nothing");

        // A client that knows nothing of capacitor writes the key: both L1s drop it.
        served_within(&b, &key, Some("new 99")).await;
        let raw = common::raw().await;
        let () = raw.del(format!("{prefix}{key}")).await.unwrap();
        served_within(&b, &key, None).await;
        served_within(&a, &key, None).await;

        a.close().await.unwrap();
        b.close().await.unwrap();
        bus_a.close().await.unwrap();
        bus_b.close().await.unwrap();
        common::delete_prefix(&raw, &prefix).await;
    });
}

#[test]
fn client_tracking_is_turned_on_again_after_a_restart() {
    common::run(TEST_TIMEOUT, async {
        let mut server = RedisServer::start();
        let prefix = unique_prefix("tracking-restart");
        let reconnect = Reconnect::Constant(Duration::from_millis(50));
        let redis = Arc::new(
            RedisLayer::builder()
                .url(server.url())
                .prefix(&prefix)
                .reconnect(reconnect)
                .build()
                .unwrap(),
        );
        redis.connect().await.unwrap();
        let bus = |server: &RedisServer| {
            Arc::new(
                RedisTrackingBus::builder()
                    .url(server.url())
                    .prefix(prefix.as_str())
                    .reconnect(reconnect)
                    .build()
                    .unwrap(),
            )
        };
        let (bus_a, bus_b) = (bus(&server), bus(&server));
        let a = composer(redis.clone(), bus_a.clone());
        let b = composer(redis.clone(), bus_b.clone());
        tracking(&bus_a).await;
        tracking(&bus_b).await;
        let clears = b.stats().bus.unwrap().clears;

        server.restart();
        redis.connect().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while b.stats().bus.unwrap().clears == clears || !bus_b.is_connected() {
            assert!(
                Instant::now() < deadline,
                "tracking not on again after the restart"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Tracking works on the new connection.
        let key = "k".to_string();
        a.set(key.clone(), "1".into()).await.unwrap();
        served_within(&b, &key, Some("1")).await;
        a.set(key.clone(), "2".into()).await.unwrap();
        served_within(&b, &key, Some("2")).await;

        a.close().await.unwrap();
        b.close().await.unwrap();
        bus_a.close().await.unwrap();
        bus_b.close().await.unwrap();
    });
}

#[test]
fn client_tracking_refuses_what_it_cannot_do() {
    common::run(TEST_TIMEOUT, async {
        let no_prefix = RedisTrackingBus::builder().url(url()).build().unwrap_err();
        assert_eq!(no_prefix.kind(), ErrorKind::Config);
        let cluster = RedisTrackingBus::builder()
            .url("redis-cluster://127.0.0.1:7000")
            .prefix("x:")
            .build()
            .unwrap_err();
        assert_eq!(cluster.kind(), ErrorKind::Config);
        assert!(cluster.to_string().contains("Cluster"), "{cluster}");
        let bus = RedisTrackingBus::builder()
            .url(url())
            .prefix("x:")
            .build()
            .unwrap();
        bus.close().await.unwrap();
        assert_eq!(bus.connect().await.unwrap_err().kind(), ErrorKind::Closed);
    });
}

/// Why the default (non-BCAST) mode is not offered, shown on the server: in that mode Redis
/// reports only the keys a connection *read*. A copy the composer put in its L1 from a
/// write (write-through, a loader's fill), written by a plain `SET` or by a script that only
/// writes, as the layer's write script does, is never reported when another client changes
/// it: that L1 would serve the replaced value for its whole TTL. BCAST reports every key
/// under the prefix, whoever read or wrote it.
#[test]
fn default_tracking_mode_reports_keys_read_not_keys_written() {
    use capacitor_redis::fred::interfaces::TrackingInterface;
    use capacitor_redis::fred::prelude::{Builder, ClientLike, Config, LuaInterface};
    use capacitor_redis::fred::types::RespVersion;
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("cct_default");
        let (read, set, scripted) = (
            format!("{prefix}read"),
            format!("{prefix}set"),
            format!("{prefix}scripted"),
        );
        let mut config = Config::from_url(&url()).unwrap();
        config.version = RespVersion::RESP3;
        let tracked = Builder::from_config(config).build().unwrap();
        tracked.init().await.unwrap();
        let mut invalidations = tracked.invalidation_rx();
        tracked
            .start_tracking(Vec::<String>::new(), false, false, false, false)
            .await
            .unwrap();
        let other = Builder::from_config(Config::from_url(&url()).unwrap())
            .build()
            .unwrap();
        other.init().await.unwrap();

        // On the tracked connection: one key read (a miss served from Redis), one written
        // by SET and one by a script that only writes (a write-through).
        let _: () = other.set(&read, "v1", None, None, false).await.unwrap();
        let _: Option<String> = tracked.get(&read).await.unwrap();
        let _: () = tracked.set(&set, "v1", None, None, false).await.unwrap();
        let _: () = tracked
            .eval(
                "redis.call('SET', KEYS[1], ARGV[1])",
                vec![scripted.clone()],
                vec!["v1"],
            )
            .await
            .unwrap();
        // Another client changes all three.
        for key in [&read, &set, &scripted] {
            let _: () = other.set(key, "v2", None, None, false).await.unwrap();
        }

        let mut reported = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Ok(inv)) = tokio::time::timeout_at(deadline, invalidations.recv()).await {
            for key in inv.keys {
                if let Some(key) = key.as_str() {
                    reported.push(key.to_owned());
                }
            }
        }
        assert!(
            reported.contains(&read),
            "the key read was not reported: {reported:?}"
        );
        assert!(
            !reported.contains(&set),
            "a key only written was reported: {reported:?}"
        );
        assert!(
            !reported.contains(&scripted),
            "a key only written was reported: {reported:?}"
        );

        let _: i64 = other.del(vec![read, set, scripted]).await.unwrap();
        tracked.quit().await.unwrap();
        other.quit().await.unwrap();
    });
}
