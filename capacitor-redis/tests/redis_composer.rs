//! The composer's part two against the real Redis: write-back drains in pipelines, scan
//! merged with pending writes, transactions as MULTI/EXEC, warm-up from Redis,
//! single-flight loads. Each test has its own key prefix and deletes it afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capacitor_core::{Layer, LayerConfig, MultiLayer, WarmUp, WriteBack, WritePolicy};
use capacitor_memory::MokaLayer;
use capacitor_redis::RedisLayer;
use common::{delete_prefix, keys_under, raw, unique_prefix, url};
use futures::StreamExt;

fn redis(prefix: &str) -> RedisLayer<String, String> {
    RedisLayer::builder()
        .url(url())
        .prefix(prefix)
        .build()
        .expect("redis layer")
}

fn moka() -> MokaLayer<String, String> {
    MokaLayer::builder().max_capacity(100_000).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_drains_to_redis_and_scan_merges_pending_writes() {
    let prefix = unique_prefix("cwb");
    let layer = Arc::new(redis(&prefix));
    layer.connect().await.unwrap();
    let cache = MultiLayer::builder()
        .write_policy(WritePolicy::Back(
            WriteBack::new()
                .batch_size(500)
                .max_delay(Duration::from_millis(20)),
        ))
        .layer(LayerConfig::new("moka", moka()))
        .layer(LayerConfig::shared("redis", layer.clone()))
        .build()
        .unwrap();
    for i in 0..2_000 {
        cache.set(format!("k:{i:05}"), format!("v{i}")).await.unwrap();
    }
    cache.delete(&"k:00003".to_string()).await.unwrap();
    let scanned: Vec<_> = cache.scan(b"k:").unwrap().map(|r| r.unwrap()).collect().await;
    assert_eq!(
        scanned.len(),
        1_999,
        "pending writes merged, the pending delete hidden"
    );
    tokio::time::timeout(Duration::from_secs(30), cache.flush())
        .await
        .unwrap()
        .unwrap();
    let client = raw().await;
    assert_eq!(keys_under(&client, &prefix).await.len(), 1_999);
    assert_eq!(
        layer.get(&"k:01999".to_string()).await.unwrap().map(|e| e.value),
        Some("v1999".into())
    );
    cache.close().await.unwrap();
    assert!(cache.unwritten_keys().is_empty());
    delete_prefix(&client, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_through_multi_exec_and_invalidate_l1() {
    let prefix = unique_prefix("ctx");
    let layer = Arc::new(redis(&prefix));
    layer.connect().await.unwrap();
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new("moka", moka()))
        .layer(LayerConfig::shared("redis", layer.clone()))
        .build()
        .unwrap();
    cache.set("alice".into(), "100".into()).await.unwrap();
    assert_eq!(cache.get(&"alice".into()).await.unwrap(), Some("100".into()));
    let mut tx = cache.begin().unwrap();
    tx.set("alice".into(), "70".into());
    tx.set("bob".into(), "30".into());
    tx.delete("carol".into());
    tx.commit().await.unwrap();
    assert_eq!(
        cache.get(&"alice".into()).await.unwrap(),
        Some("70".into()),
        "no stale L1 copy"
    );
    assert_eq!(
        layer.get(&"bob".into()).await.unwrap().map(|e| e.value),
        Some("30".into())
    );
    cache.close().await.unwrap();
    delete_prefix(&raw().await, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_and_single_flight_loads_over_redis() {
    let prefix = unique_prefix("cwu");
    let layer = Arc::new(redis(&prefix));
    layer.connect().await.unwrap();
    let entries: Vec<(String, String)> = (0..1_500)
        .map(|i| (format!("user:{i:04}"), format!("u{i}")))
        .collect();
    layer
        .set_many(&entries, Some(Duration::from_secs(600)))
        .await
        .unwrap();
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new("moka", moka()))
        .layer(LayerConfig::shared("redis", layer.clone()))
        .build()
        .unwrap();
    let report = cache
        .warm_up("redis", WarmUp::new().prefix("user:").limit(1_000))
        .await
        .unwrap();
    assert_eq!(report.copied, 1_000);
    let warmed: Vec<(String, String)> = entries
        .into_iter()
        .filter(|(k, _)| cache.inner_l1_has(k))
        .collect();
    assert_eq!(warmed.len(), 1_000, "exactly the copied entries are in L1");

    let calls = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (cache, calls) = (cache.clone(), calls.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(&"cold".to_string(), || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        "from the source".to_string()
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "from the source");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        layer.get(&"cold".into()).await.unwrap().map(|e| e.value),
        Some("from the source".into())
    );
    cache.close().await.unwrap();
    delete_prefix(&raw().await, &prefix).await;
}

trait L1Probe {
    fn inner_l1_has(&self, key: &str) -> bool;
}

impl L1Probe for MultiLayer<String, String> {
    /// Whether L1 answers `key` synchronously (an L1 hit), without touching the layers
    /// below.
    fn inner_l1_has(&self, key: &str) -> bool {
        matches!(Layer::get_sync(self, &key.to_string()), Some(Ok(Some(_))))
    }
}
