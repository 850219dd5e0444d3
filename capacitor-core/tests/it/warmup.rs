//! Warm-up copies a lower layer's entries into the layers above, keeping remaining TTLs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capacitor_core::testkit::MapLayer;
use capacitor_core::{ErrorKind, Layer, LayerConfig, ManualClock, MultiLayer, Timestamp, WarmUp};

#[tokio::test]
async fn warm_up_copies_by_prefix_up_to_a_limit_keeping_remaining_ttls() {
    let clock = ManualClock::new(1_000_000);
    let disk = Arc::new(MapLayer::<String, u32>::scannable(clock.clone()));
    for i in 0..2_500u32 {
        disk.set(&format!("user:{i:05}"), &i, None).await.unwrap();
    }
    disk.set(&"user:ttl".to_string(), &7, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    disk.set(&"order:1".to_string(), &1, None).await.unwrap();
    clock.advance(Duration::from_secs(10));
    let l1 = Arc::new(MapLayer::<String, u32>::with_clock(clock.clone()));
    let cache = MultiLayer::builder()
        .clock(clock.clone())
        .layer(LayerConfig::shared("l1", l1.clone()).ttl(Duration::from_secs(3600)))
        .layer(LayerConfig::shared("disk", disk.clone()))
        .build()
        .unwrap();

    let seen = Arc::new(AtomicU64::new(0));
    let progress = seen.clone();
    let report = cache
        .warm_up(
            "disk",
            WarmUp::new()
                .prefix("user:")
                .progress(move |n| progress.store(n, Ordering::SeqCst)),
        )
        .await
        .unwrap();
    assert_eq!(report.copied, 2_501);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2_501,
        "the progress callback ends at the total"
    );
    assert!(
        l1.raw_entry(&"order:1".to_string()).is_none(),
        "other prefixes untouched"
    );
    assert_eq!(
        l1.raw_entry(&"user:ttl".to_string()).and_then(|e| e.expires_at),
        Some(Timestamp::from_millis(1_000_000 + 30_000)),
        "the copy expires with its source"
    );
    assert_eq!(
        l1.raw_entry(&"user:00001".to_string()).and_then(|e| e.expires_at),
        Some(Timestamp::from_millis(1_010_000 + 3_600_000)),
        "no source expiry: the layer's TTL"
    );

    let limited = MultiLayer::builder()
        .layer(LayerConfig::new("fresh", MapLayer::<String, u32>::new()))
        .layer(LayerConfig::shared("disk", disk.clone()))
        .build()
        .unwrap();
    assert_eq!(
        limited
            .warm_up("disk", WarmUp::new().limit(100))
            .await
            .unwrap()
            .copied,
        100
    );

    let err = cache
        .warm_up("nope", WarmUp::new())
        .await
        .expect_err("unknown layer");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = cache
        .warm_up("disk", WarmUp::new().into_layers(["disk"]))
        .await
        .expect_err("not above");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = cache
        .warm_up("l1", WarmUp::new())
        .await
        .expect_err("l1 cannot scan");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
}
