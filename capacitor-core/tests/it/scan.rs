//! The composer's scan: authoritative stream merged with pending write-back writes, in
//! bounded memory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::time::Duration;

use capacitor_core::testkit::MapLayer;
use capacitor_core::{ErrorKind, Layer, LayerConfig, ManualClock, MultiLayer, WriteBack, WritePolicy};
use futures::StreamExt;

#[tokio::test]
async fn scan_merges_pending_writes_and_hides_pending_deletes() {
    let clock = ManualClock::new(1_000);
    let store = std::sync::Arc::new(MapLayer::<String, u32>::scannable(clock.clone()));
    for (k, v) in [("u:1", 1), ("u:2", 2), ("u:3", 3), ("x:9", 9)] {
        store.set(&k.to_string(), &v, None).await.unwrap();
    }
    let cache = MultiLayer::builder()
        .clock(clock.clone())
        .write_policy(WritePolicy::Back(
            WriteBack::new().max_delay(Duration::from_secs(3600)),
        ))
        .layer(LayerConfig::new("l1", MapLayer::with_clock(clock.clone())))
        .layer(LayerConfig::shared("store", store.clone()))
        .build()
        .unwrap();
    cache.set("u:2".into(), 20).await.unwrap(); // pending overwrite
    cache.delete(&"u:3".into()).await.unwrap(); // pending delete
    cache.set("u:4".into(), 4).await.unwrap(); // pending new key
    cache.set("x:5".into(), 5).await.unwrap(); // pending, other prefix
    let mut got: Vec<(String, u32)> = cache.scan(b"u:").unwrap().map(|r| r.unwrap()).collect().await;
    got.sort();
    assert_eq!(
        got,
        vec![("u:1".into(), 1), ("u:2".into(), 20), ("u:4".into(), 4)]
    );

    cache.flush().await.unwrap();
    let mut after: Vec<(String, u32)> = cache.scan(b"u:").unwrap().map(|r| r.unwrap()).collect().await;
    after.sort();
    assert_eq!(after, got, "the same view once the writes are drained");
    // Through the Layer trait a write-back composer refuses to scan rather than miss
    // pending writes.
    assert_eq!(
        Layer::scan(&cache, b"u:").err().map(|e| e.kind()),
        Some(ErrorKind::Unsupported)
    );
}

#[tokio::test]
async fn scan_without_the_capability_is_a_typed_error() {
    let cache = MultiLayer::<String, u32>::builder()
        .layer(LayerConfig::new("l", MapLayer::new()))
        .build()
        .unwrap();
    assert_eq!(
        cache.scan(b"").err().map(|e| e.kind()),
        Some(ErrorKind::Unsupported)
    );
}
