//! The invalidation bus on Redis pub/sub: two composers in one process (own moka L1 each,
//! one shared RedisLayer below) stay coherent within a bounded, measured delay; own
//! messages are ignored; a reconnect delivers `Invalidation::All`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{unique_prefix, url, RedisServer};
use capacitor_core::{BusMessage, Change, Invalidation, InvalidationBus, LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_redis::{Reconnect, RedisBus, RedisLayer};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

async fn wait_connected(bus: &RedisBus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bus.is_connected() {
        assert!(
            Instant::now() < deadline,
            "the bus did not connect within 10 s (is Redis running at {}?)",
            url()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn composer(redis: Arc<RedisLayer<String, String>>, bus: Arc<RedisBus>) -> MultiLayer<String, String> {
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

#[test]
fn a_write_in_one_instance_stops_being_stale_in_the_other_within_a_bounded_delay() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("bus");
        let channel = format!("{prefix}invalidate");
        let redis = Arc::new(RedisLayer::builder().url(url()).prefix(&prefix).build().unwrap());
        redis.connect().await.unwrap();
        let bus_a = Arc::new(RedisBus::builder().url(url()).channel(&channel).build().unwrap());
        let bus_b = Arc::new(RedisBus::builder().url(url()).channel(&channel).build().unwrap());
        wait_connected(&bus_a).await;
        wait_connected(&bus_b).await;
        let a = composer(redis.clone(), bus_a.clone());
        let b = composer(redis.clone(), bus_b.clone());
        // Let both subscriptions settle: a probe from A must reach B.
        let key = "user:1".to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            a.set(key.clone(), "probe".into()).await.unwrap();
            b.get(&key).await.unwrap();
            a.set(key.clone(), "probe2".into()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            if b.get(&key).await.unwrap().as_deref() == Some("probe2") {
                break;
            }
            assert!(Instant::now() < deadline, "B never saw A's writes");
        }

        let mut delays = Vec::new();
        for i in 0..100 {
            let old = format!("old {i}");
            let new = format!("new {i}");
            a.set(key.clone(), old.clone()).await.unwrap();
            // B caches the old value in its L1 (from Redis, or already there).
            let until = Instant::now() + Duration::from_secs(5);
            while b.get(&key).await.unwrap().as_deref() != Some(old.as_str()) {
                assert!(Instant::now() < until, "B never saw {old}");
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let written = Instant::now();
            a.set(key.clone(), new.clone()).await.unwrap();
            loop {
                if b.get(&key).await.unwrap().as_deref() == Some(new.as_str()) {
                    break;
                }
                assert!(
                    written.elapsed() < Duration::from_secs(2),
                    "B still stale after 2 s"
                );
                // Not a sleep: the timer's 1 ms granularity would dominate the figure.
                tokio::task::yield_now().await;
            }
            delays.push(written.elapsed());
        }
        delays.sort();
        let median = delays[delays.len() / 2];
        let p99 = delays[delays.len() * 99 / 100 - 1];
        let max = delays[delays.len() - 1];
        println!(
            "invalidation delay over {} writes (A's set returned → B serves the new value): median {median:?}, p99 {p99:?}, max {max:?}",
            delays.len()
        );
        // The bound each write is held to above (a loaded machine may take a while to run
        // the subscriber's task; the median and p99 printed above show the typical delay).
        assert!(max < Duration::from_secs(2), "max delay {max:?}");
        assert!(b.stats().bus.map_or(0, |s| s.received) >= 100, "{}", b.stats());

        a.close().await.unwrap();
        b.close().await.unwrap();
        bus_a.close().await.unwrap();
        bus_b.close().await.unwrap();
        common::delete_prefix(&common::raw().await, &prefix).await;
    });
}

#[test]
fn own_messages_are_ignored_and_others_delivered() {
    common::run(TEST_TIMEOUT, async {
        let channel = format!("{}invalidate", unique_prefix("bus_own"));
        let a = RedisBus::builder().url(url()).channel(&channel).build().unwrap();
        let b = RedisBus::builder().url(url()).channel(&channel).build().unwrap();
        assert_ne!(a.instance_id(), b.instance_id());
        wait_connected(&a).await;
        wait_connected(&b).await;
        let got_a: Arc<Mutex<Vec<Invalidation<u64>>>> = Arc::default();
        let got_b: Arc<Mutex<Vec<Invalidation<u64>>>> = Arc::default();
        let (ga, gb) = (got_a.clone(), got_b.clone());
        InvalidationBus::<u64>::subscribe(&a, Arc::new(move |m| ga.lock().unwrap().push(m))).unwrap();
        InvalidationBus::<u64>::subscribe(&b, Arc::new(move |m| gb.lock().unwrap().push(m))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let message = |n: u64| BusMessage::new(7, n, Change::Keys(vec![n]));
        let mut n = 0u64;
        while !got_b.lock().unwrap().contains(&Invalidation::Message(message(n))) {
            n += 1;
            InvalidationBus::<u64>::publish(&a, &message(n)).await.unwrap();
            assert!(Instant::now() < deadline, "B received nothing");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // B heard once, first, that its subscription was up.
        let first_all = got_b.lock().unwrap().iter().position(|m| *m == Invalidation::All);
        let alls = got_b
            .lock()
            .unwrap()
            .iter()
            .filter(|m| **m == Invalidation::All)
            .count();
        assert_eq!((first_all, alls), (Some(0), 1));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !got_a
                .lock()
                .unwrap()
                .iter()
                .any(|m| matches!(m, Invalidation::Message(_))),
            "A ignores its own messages"
        );
        a.close().await.unwrap();
        b.close().await.unwrap();
    });
}

#[test]
fn a_reconnect_delivers_invalidation_all() {
    common::run(TEST_TIMEOUT, async {
        let mut server = RedisServer::start();
        let bus = RedisBus::builder()
            .url(server.url())
            .reconnect(Reconnect::Constant(Duration::from_millis(50)))
            .build()
            .unwrap();
        let sender = RedisBus::builder()
            .url(server.url())
            .reconnect(Reconnect::Constant(Duration::from_millis(50)))
            .build()
            .unwrap();
        wait_connected(&bus).await;
        wait_connected(&sender).await;
        let got: Arc<Mutex<Vec<Invalidation<String>>>> = Arc::default();
        let g = got.clone();
        InvalidationBus::<String>::subscribe(&bus, Arc::new(move |m| g.lock().unwrap().push(m))).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        got.lock().unwrap().clear();

        server.restart();
        let deadline = Instant::now() + Duration::from_secs(15);
        while !got.lock().unwrap().contains(&Invalidation::All) {
            assert!(
                Instant::now() < deadline,
                "no Invalidation::All after the reconnect"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // And it is subscribed again.
        let deadline = Instant::now() + Duration::from_secs(15);
        let message = BusMessage::new(7, 1, Change::Keys(vec!["k".to_string()]));
        loop {
            let _ = InvalidationBus::<String>::publish(&sender, &message).await;
            if got
                .lock()
                .unwrap()
                .contains(&Invalidation::Message(message.clone()))
            {
                break;
            }
            assert!(Instant::now() < deadline, "not re-subscribed after the reconnect");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bus.close().await.unwrap();
        sender.close().await.unwrap();
    });
}
