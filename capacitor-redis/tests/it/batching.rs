//! Read batching against the shared server: concurrent cold reads through a composer
//! (moka over Redis) sent as a few `MGET`s, each under its own key prefix.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::Arc;
use std::time::Duration;

use crate::common::{self, raw, unique_prefix, url};
use capacitor_core::{Layer, LayerConfig, LayerStats, MultiLayer, ReadBatching};
use capacitor_memory::MokaLayer;
use capacitor_redis::fred::prelude::KeysInterface;
use capacitor_redis::RedisLayer;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const TASKS: usize = 64;

async fn redis(prefix: &str) -> RedisLayer<String, String> {
    let layer = RedisLayer::builder().url(url()).prefix(prefix).build().unwrap();
    layer
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to Redis at {} (is it running?): {e}", url()));
    layer
}

/// Moka over Redis (under `prefix`), Redis's reads batched.
async fn composer(prefix: &str) -> (MultiLayer<String, String>, Arc<RedisLayer<String, String>>) {
    let store = Arc::new(redis(prefix).await);
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new(
            "moka",
            MokaLayer::builder().max_capacity(10_000).build().unwrap(),
        ))
        .layer(
            LayerConfig::shared("redis", store.clone() as Arc<dyn Layer<String, String>>)
                .read_timeout(Duration::from_secs(5))
                .batch_reads(ReadBatching::new(Duration::from_millis(2)).max_keys(64)),
        )
        .build()
        .unwrap();
    (cache, store)
}

/// `get` of every key at once, each on a task of its own.
async fn read_all(cache: &MultiLayer<String, String>, keys: &[String]) -> Vec<Option<String>> {
    let tasks: Vec<_> = keys
        .iter()
        .map(|k| {
            let (cache, k) = (cache.clone(), k.clone());
            tokio::spawn(async move { cache.get(&k).await.unwrap() })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn redis_stats(cache: &MultiLayer<String, String>) -> LayerStats {
    cache.stats().layer("redis").cloned().unwrap()
}

#[test]
fn sixty_four_concurrent_cold_reads_share_a_few_mgets() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("batch");
        let (cache, store) = composer(&prefix).await;
        let keys: Vec<String> = (0..TASKS).map(|i| format!("k{i}")).collect();
        for (i, k) in keys.iter().enumerate() {
            store.set(k, &format!("v{i}"), None).await.unwrap();
        }
        // Cold in moka: every read reaches Redis.
        let got = read_all(&cache, &keys).await;
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.as_deref(), Some(format!("v{i}").as_str()), "key {i}");
        }
        let stats = redis_stats(&cache);
        assert_eq!((stats.batched_reads, stats.hits), (64, 64));
        assert!(
            stats.read_batches <= 8,
            "{} round trips for 64 reads",
            stats.read_batches
        );
        println!("64 cold reads in {} round trips", stats.read_batches);
        // A key missing from Redis and a key read twice, in one batch.
        let mixed = [keys[0].clone(), "absent".to_string(), "absent".to_string()];
        for k in &keys[..1] {
            store.delete(k).await.unwrap();
        }
        cache.delete(&keys[0]).await.unwrap();
        assert_eq!(read_all(&cache, &mixed).await, vec![None, None, None]);
        cache.close().await.unwrap();
        common::delete_prefix(&raw().await, &prefix).await;
    });
}

#[test]
fn a_value_that_does_not_decode_costs_only_its_key_in_a_batch() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("batchbad");
        let (cache, store) = composer(&prefix).await;
        let keys: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
        for (i, k) in keys.iter().enumerate() {
            store.set(k, &format!("v{i}"), None).await.unwrap();
        }
        let raw = raw().await;
        let _: () = raw
            .set(
                format!("{prefix}k3").as_str(),
                "not an envelope",
                None,
                None,
                false,
            )
            .await
            .unwrap();
        let got = read_all(&cache, &keys).await;
        for (i, g) in got.iter().enumerate() {
            let want = (i != 3).then(|| format!("v{i}"));
            assert_eq!(g, &want, "key {i}");
        }
        let stats = redis_stats(&cache);
        assert!(stats.decode_errors >= 1, "{stats:?}");
        assert_eq!(stats.errors, 0, "{stats:?}");
        cache.close().await.unwrap();
        common::delete_prefix(&raw, &prefix).await;
    });
}
