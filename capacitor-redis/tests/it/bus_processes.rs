//! The invalidation bus between two processes: the parent writes through its own
//! MultiLayer (moka L1 + Redis), a child process (this test binary run again with
//! `--exact bus_processes::bus_child_reader --ignored`) reads the same key through its own MultiLayer in
//! a loop and prints each new value it serves. Without the bus the child would serve its
//! L1 copy for the L1 TTL (5 minutes); with it, each write reaches it within a bounded,
//! measured delay. The child is killed by PID when the test ends.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use capacitor_core::testkit::staleness::{Children, Line};

use capacitor_core::{LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_redis::{RedisBus, RedisLayer};

const PREFIX_ENV: &str = "CAPACITOR_REDIS_BUS_CHILD_PREFIX";
const SEEN: &str = "capacitor-seen ";
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
const WRITES: usize = 30;

async fn composer(prefix: &str) -> (MultiLayer<String, String>, Arc<RedisBus>) {
    let redis = RedisLayer::builder()
        .url(common::url())
        .prefix(prefix)
        .build()
        .unwrap();
    redis
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to Redis at {} (is it running?): {e}", common::url()));
    let bus = Arc::new(
        RedisBus::builder()
            .url(common::url())
            .channel(format!("{prefix}invalidate"))
            .build()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bus.is_connected() {
        assert!(Instant::now() < deadline, "the bus did not connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cache = MultiLayer::<String, String>::builder()
        .layer(
            LayerConfig::new("l1", MokaLayer::builder().max_capacity(100).build().unwrap())
                .ttl(Duration::from_secs(300)),
        )
        .layer(LayerConfig::new("redis", redis))
        .invalidation_bus(bus.clone())
        .build()
        .unwrap();
    (cache, bus)
}

#[test]
#[ignore = "the reader child of `two_processes_stay_coherent_through_the_bus`; does nothing alone"]
fn bus_child_reader() {
    let Ok(prefix) = std::env::var(PREFIX_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (cache, _bus) = composer(&prefix).await;
        println!("\n{SEEN}ready");
        let key = "shared".to_string();
        let mut last: Option<String> = None;
        let started = Instant::now();
        while started.elapsed() < CHILD_LIFETIME {
            if let Ok(v) = cache.get(&key).await {
                if v != last {
                    if let Some(v) = &v {
                        println!("\n{SEEN}{v}");
                    }
                    last = v;
                }
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    });
}

/// Collects the child's lines until it served `what` (or printed `ready`), at most
/// `timeout`.
fn wait_for(child: &mut Children, what: &str, timeout: Duration) {
    child.until(timeout, &format!("the child to serve `{what}`"), |events| {
        events.iter().any(|(_, e)| match e {
            Line::Ready => what == "ready",
            Line::Other(seen) => seen == what,
            _ => false,
        })
    });
}

#[test]
fn two_processes_stay_coherent_through_the_bus() {
    let prefix = common::unique_prefix("bus2p");
    let mut child = Children::spawn(1, "bus_processes::bus_child_reader", SEEN, |_| {
        vec![(PREFIX_ENV.into(), prefix.clone())]
    });
    wait_for(&mut child, "ready", Duration::from_secs(30));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (cache, bus) = composer(&prefix).await;
        // Let the child's subscription settle: the first value may come from Redis.
        cache.set("shared".into(), "warm-up".into()).await.unwrap();
        wait_for(&mut child, "warm-up", Duration::from_secs(10));
        let mut delays = Vec::new();
        for i in 0..WRITES {
            let v = format!("v{i}");
            let written = Instant::now();
            cache.set("shared".into(), v.clone()).await.unwrap();
            wait_for(&mut child, &v, Duration::from_secs(5));
            delays.push(written.elapsed());
        }
        delays.sort();
        println!(
            "two-process invalidation delay over {WRITES} writes (set returned → the other process serves it, incl. its 0.5 ms poll and a pipe): median {:?}, max {:?}",
            delays[WRITES / 2],
            delays[WRITES - 1]
        );
        cache.close().await.unwrap();
        bus.close().await.unwrap();
        drop(child);
        common::delete_prefix(&common::raw().await, &prefix).await;
    });
}
