//! Composer behaviours specific to sled, beyond the shared composer suite (run from
//! `conformance.rs`): drained writes survive a reopen, a commit sled refuses leaves
//! nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use capacitor_core::{Layer, LayerConfig, MultiLayer, WriteBack, WritePolicy};
use capacitor_memory::MokaLayer;
use capacitor_sled::{FlushPolicy, SledLayer};
use futures::StreamExt;

fn disk(dir: &std::path::Path) -> SledLayer<String, String> {
    SledLayer::builder()
        .path(dir.join("db"))
        .flush_policy(FlushPolicy::Manual)
        .build()
        .unwrap()
}

fn l1() -> MokaLayer<String, String> {
    MokaLayer::builder().max_capacity(1_000).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_over_sled_drains_reads_its_writes_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let sled = disk(dir.path());
    let cache = MultiLayer::builder()
        .write_policy(WritePolicy::Back(WriteBack::new().batch_size(500)))
        .layer(LayerConfig::new("moka", l1()))
        .layer(LayerConfig::new("sled", sled.clone()))
        .build()
        .unwrap();
    for i in 0..5_000 {
        cache.set(format!("k:{i:05}"), format!("v{i}")).await.unwrap();
    }
    cache.delete(&"k:00007".to_string()).await.unwrap();
    // Scan before the drain finished: pending writes merged in.
    let scanned: Vec<_> = cache.scan(b"k:").unwrap().map(|r| r.unwrap()).collect().await;
    assert_eq!(scanned.len(), 4_999);
    cache.close().await.unwrap();
    assert!(cache.unwritten_keys().is_empty());

    let reopened = disk(dir.path());
    assert_eq!(
        reopened
            .get(&"k:04999".to_string())
            .await
            .unwrap()
            .map(|e| e.value),
        Some("v4999".into())
    );
    assert_eq!(reopened.get(&"k:00007".to_string()).await.unwrap(), None);
    reopened.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_through_sled_and_invalidate_the_l1() {
    let dir = tempfile::tempdir().unwrap();
    let sled = disk(dir.path());
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new("moka", l1()))
        .layer(LayerConfig::new("sled", sled.clone()))
        .build()
        .unwrap();
    cache.set("a".into(), "1".into()).await.unwrap();
    let mut tx = cache.begin().unwrap();
    tx.set("a".into(), "2".into());
    tx.set("b".into(), "3".into());
    tx.commit().await.unwrap();
    assert_eq!(cache.get(&"a".into()).await.unwrap(), Some("2".into()));
    assert_eq!(
        sled.get(&"b".into()).await.unwrap().map(|e| e.value),
        Some("3".into())
    );

    // A commit that sled refuses (a value over its limit) leaves nothing behind.
    let small = SledLayer::builder()
        .path(dir.path().join("small"))
        .max_value_bytes(64)
        .build::<String, String>()
        .unwrap();
    let strict = MultiLayer::builder()
        .layer(LayerConfig::new("moka", l1()))
        .layer(LayerConfig::new("sled", small.clone()))
        .build()
        .unwrap();
    let mut tx = strict.begin().unwrap();
    tx.set("ok".into(), "fine".into());
    tx.set("big".into(), "x".repeat(1_000));
    assert!(tx.commit().await.is_err());
    assert_eq!(small.get(&"ok".into()).await.unwrap(), None, "all or nothing");
}
