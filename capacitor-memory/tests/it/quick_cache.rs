//! Behaviour specific to `QuickCacheLayer`: bounds, expiry on read, the sweeper,
//! configuration errors.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::time::Duration;

use capacitor_core::{ErrorKind, Layer, LayerConfig, ManualClock, MultiLayer, Timestamp};
use capacitor_memory::{DashMapLayer, QuickCacheLayer};

#[tokio::test]
async fn entry_bound_evicts() {
    let layer = QuickCacheLayer::builder()
        .max_capacity(100)
        .build::<u64, u64>()
        .expect("config");
    for i in 0..5_000 {
        layer.set(&i, &i, None).await.expect("set");
    }
    let count = layer.entry_count();
    assert!(count <= 100, "{count} entries held with a bound of 100");
    assert!(count >= 50, "the cache kept only {count} of 100");
    assert_eq!(layer.weighted_size(), count, "one unit per entry");
    // The most recent write is held.
    assert_eq!(
        layer.get(&4_999).await.expect("get").map(|e| e.value),
        Some(4_999)
    );
}

#[tokio::test]
async fn byte_bound_evicts_by_weight() {
    let layer = QuickCacheLayer::builder()
        .max_bytes(1024 * 1024, |_: &u64, v: &Vec<u8>| {
            u32::try_from(v.len()).unwrap_or(u32::MAX)
        })
        .shards(8) // 128 KiB each, whatever the number of cores
        .build::<u64, Vec<u8>>()
        .expect("config");
    for i in 0..100 {
        layer.set(&i, &vec![0u8; 64 * 1024], None).await.expect("set");
    }
    let bytes = layer.weighted_size();
    assert!(bytes <= 1024 * 1024, "{bytes} bytes held with a bound of 1 MiB");
    assert!(bytes >= 64 * 1024, "the cache kept nothing");
    assert_eq!(bytes, layer.entry_count() * 64 * 1024);
}

#[tokio::test]
async fn one_shard_admits_an_entry_of_nearly_the_whole_bound() {
    let layer = QuickCacheLayer::builder()
        .sweeper(false)
        .max_bytes(1024 * 1024, |_: &u64, v: &Vec<u8>| {
            u32::try_from(v.len()).unwrap_or(u32::MAX)
        })
        .shards(1)
        .build::<u64, Vec<u8>>()
        .expect("config");
    layer.set(&1, &vec![0u8; 900 * 1024], None).await.expect("set");
    assert_eq!(
        layer.get(&1).await.expect("get").map(|e| e.value.len()),
        Some(900 * 1024)
    );
}

#[tokio::test]
async fn a_zero_weight_still_counts_so_the_bound_holds() {
    let layer = QuickCacheLayer::builder()
        .sweeper(false)
        .max_bytes(50, |_: &u64, _: &u64| 0)
        .build::<u64, u64>()
        .expect("config");
    for i in 0..1_000 {
        layer.set(&i, &i, None).await.expect("set");
    }
    let count = layer.entry_count();
    assert!(count <= 50, "{count} weightless entries held with a bound of 50");
}

#[tokio::test]
async fn an_entry_heavier_than_the_bound_is_not_kept_nor_is_its_old_value() {
    let layer = QuickCacheLayer::builder()
        .sweeper(false)
        .max_bytes(1024, |_: &u64, v: &Vec<u8>| {
            u32::try_from(v.len()).unwrap_or(u32::MAX)
        })
        .build::<u64, Vec<u8>>()
        .expect("config");
    layer.set(&1, &vec![1u8; 16], None).await.expect("set");
    assert!(layer.get(&1).await.expect("get").is_some());
    layer
        .set(&1, &vec![2u8; 4096], None)
        .await
        .expect("an overweight set succeeds");
    assert_eq!(layer.get(&1).await.expect("get"), None, "neither value is served");
}

#[test]
fn builder_rejects_bad_config() {
    let err = QuickCacheLayer::builder()
        .sweeper(false)
        .max_capacity(0)
        .build::<u8, u8>()
        .expect_err("zero");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("max_capacity"), "{err}");
    let err = QuickCacheLayer::builder()
        .sweeper(false)
        .max_capacity(5)
        .max_bytes(5, |_: &u8, _: &u8| 1)
        .build::<u8, u8>()
        .expect_err("both");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("max_capacity"), "{err}");
    let err = QuickCacheLayer::builder()
        .sweeper(false)
        .max_bytes(0, |_: &u8, _: &u8| 1)
        .build::<u8, u8>()
        .expect_err("zero bytes");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("max_bytes"), "{err}");
    // A weigher written for other types than the layer is built for: a typed error.
    let err = QuickCacheLayer::builder()
        .sweeper(false)
        .max_bytes(64, |k: &String, _: &u8| k.len() as u32)
        .build::<u8, u8>()
        .expect_err("other types");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("weigher"), "{err}");
    let err = QuickCacheLayer::builder()
        .sweeper(false)
        .shards(0)
        .build::<u8, u8>()
        .expect_err("zero shards");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("shards"), "{err}");
    let err = QuickCacheLayer::builder()
        .sweeper(false)
        .sweep_interval(Duration::ZERO)
        .build::<u8, u8>()
        .expect_err("zero interval");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("sweep_interval"), "{err}");
}

#[test]
fn the_sweeper_outside_a_runtime_is_a_config_error() {
    let err = QuickCacheLayer::builder()
        .build::<u8, u8>()
        .expect_err("no runtime");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("sweeper(false)"), "{err}");
    QuickCacheLayer::builder()
        .sweeper(false)
        .build::<u8, u8>()
        .expect("no sweeper, no runtime needed");
}

#[tokio::test]
async fn an_expired_entry_is_a_miss_and_is_removed_when_read() {
    let clock = ManualClock::new(1_000);
    let layer = QuickCacheLayer::builder()
        .sweeper(false)
        .clock(clock.clone())
        .build::<u32, u32>()
        .expect("config");
    layer
        .set(&1, &10, Some(Duration::from_secs(2)))
        .await
        .expect("set");
    layer.set(&2, &20, None).await.expect("set");
    let entry = layer.get(&1).await.expect("get").expect("live");
    assert_eq!(entry.expires_at, Some(Timestamp::from_millis(3_000)));
    assert_eq!(
        layer.get(&2).await.expect("get").map(|e| e.expires_at),
        Some(None)
    );
    clock.advance(Duration::from_millis(1_999));
    assert!(layer.get(&1).await.expect("get").is_some(), "1 ms left");
    clock.advance(Duration::from_millis(1));
    assert_eq!(layer.entry_count(), 2);
    assert_eq!(layer.get(&1).await.expect("get"), None, "expired at its expiry");
    assert_eq!(layer.entry_count(), 1, "the read removed it");
    assert!(!layer.delete(&1).await.expect("delete"));
    // An overwrite without TTL clears the expiry.
    layer
        .set(&3, &30, Some(Duration::from_secs(1)))
        .await
        .expect("set");
    layer.set(&3, &31, None).await.expect("set");
    clock.advance(Duration::from_secs(10));
    assert_eq!(
        layer.get(&3).await.expect("get").map(|e| (e.value, e.expires_at)),
        Some((31, None))
    );
    // An expired entry deleted before any read: not reported present.
    layer
        .set(&4, &40, Some(Duration::from_secs(1)))
        .await
        .expect("set");
    clock.advance(Duration::from_secs(1));
    assert!(!layer.delete(&4).await.expect("delete"));
}

#[tokio::test]
async fn the_sweeper_removes_unread_expired_entries() {
    let clock = ManualClock::new(0);
    let layer = QuickCacheLayer::builder()
        .clock(clock.clone())
        .sweep_interval(Duration::from_millis(20))
        .build::<u32, u32>()
        .expect("config");
    for i in 0..100 {
        layer
            .set(&i, &i, Some(Duration::from_secs(1)))
            .await
            .expect("set");
    }
    layer.set(&1_000, &0, None).await.expect("set");
    assert_eq!(layer.entry_count(), 101);
    clock.advance(Duration::from_secs(1));
    tokio::time::timeout(Duration::from_secs(5), async {
        while layer.entry_count() > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("sweeper removed the expired entries");
    assert_eq!(layer.get(&1_000).await.expect("get").map(|e| e.value), Some(0));
}

#[tokio::test(start_paused = true)]
async fn sweeps_every_minute_by_default_and_stops_on_close_or_drop() {
    let clock = ManualClock::new(0);
    let layer = QuickCacheLayer::builder()
        .clock(clock.clone())
        .build::<u32, u32>()
        .expect("config");
    layer
        .set(&1, &1, Some(Duration::from_secs(1)))
        .await
        .expect("set");
    clock.advance(Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(layer.entry_count(), 1, "no sweep before the first minute");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(layer.entry_count(), 0, "swept after a minute");
    let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    assert_eq!(tasks(), 1, "the sweeper runs");
    layer.close().await.expect("close");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(tasks(), 0, "close ends the sweeper");
    let dropped = QuickCacheLayer::builder().build::<u32, u32>().expect("config");
    assert_eq!(tasks(), 1);
    drop(dropped);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(tasks(), 0, "dropping the layer ends the sweeper");
    let off = QuickCacheLayer::builder()
        .clock(clock.clone())
        .sweeper(false)
        .build::<u32, u32>()
        .expect("config");
    off.set(&1, &1, Some(Duration::from_secs(1))).await.expect("set");
    clock.advance(Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        off.entry_count(),
        1,
        "sweeper(false) leaves expired entries to reads"
    );
    assert_eq!(off.sweep(), 1, "an explicit sweep removes it");
    assert_eq!(off.entry_count(), 0);
}

#[tokio::test]
async fn answers_synchronously_and_fails_after_close() {
    let layer = QuickCacheLayer::builder().build::<u64, u64>().expect("config");
    let caps = layer.capabilities();
    assert!(caps.sync_ops && !caps.persistent && !caps.scan && !caps.tags);
    assert!(matches!(layer.set_sync(&1, &2, None), Some(Ok(()))));
    assert_eq!(
        layer.get_sync(&1).map(|r| r.expect("get").map(|e| e.value)),
        Some(Some(2))
    );
    assert!(matches!(layer.delete_sync(&1), Some(Ok(true))));
    assert!(matches!(layer.delete_sync(&1), Some(Ok(false))));
    layer.set(&5, &5, None).await.expect("set");
    assert!(matches!(layer.clear_sync(), Some(Ok(()))));
    assert_eq!(layer.entry_count(), 0);
    layer.close().await.expect("close");
    layer.close().await.expect("idempotent");
    for err in [
        layer.get(&1).await.map(|_| ()).expect_err("closed"),
        layer.set(&1, &1, None).await.expect_err("closed"),
        layer.delete(&1).await.map(|_| ()).expect_err("closed"),
    ] {
        assert_eq!(err.kind(), ErrorKind::Closed);
    }
}

#[tokio::test]
async fn as_l1_over_dashmap_it_promotes_and_reports_per_layer_stats() {
    let cache = MultiLayer::<String, u64>::builder()
        .layer(LayerConfig::new(
            "quick",
            QuickCacheLayer::builder()
                .max_capacity(1_000)
                .build()
                .expect("config"),
        ))
        .layer(LayerConfig::new("dashmap", DashMapLayer::new()))
        .build()
        .expect("config");
    cache.set("a".into(), 1).await.expect("set");
    for _ in 0..9 {
        assert_eq!(cache.get(&"a".into()).await.expect("get"), Some(1));
    }
    assert_eq!(cache.get(&"zz".into()).await.expect("get"), None);
    let stats = cache.stats();
    assert_eq!(
        stats.layer("quick").map(|l| (l.hits, l.misses, l.sets)),
        Some((9, 1, 1))
    );
    assert_eq!(stats.layer("dashmap").map(|l| (l.hits, l.misses)), Some((0, 1)));
}
