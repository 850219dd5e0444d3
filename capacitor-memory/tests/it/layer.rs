//! Behaviour specific to the memory layers: bounds, sweeping, configuration errors.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::time::Duration;

use capacitor_core::{ErrorKind, Layer, LayerConfig, ManualClock, MultiLayer};
use capacitor_memory::{DashMapLayer, MokaLayer};

#[tokio::test]
async fn moka_entry_bound_evicts() {
    let layer = MokaLayer::builder()
        .max_capacity(100)
        .build::<u64, u64>()
        .expect("config");
    for i in 0..5_000 {
        layer.set(&i, &i, None).await.expect("set");
    }
    let count = layer.entry_count();
    assert!(count <= 100, "{count} entries held with a bound of 100");
}

#[tokio::test]
async fn moka_byte_bound_evicts_by_weight() {
    let layer = MokaLayer::builder()
        .max_bytes(1024 * 1024, |_: &u64, v: &Vec<u8>| {
            u32::try_from(v.len()).unwrap_or(u32::MAX)
        })
        .build::<u64, Vec<u8>>()
        .expect("config");
    for i in 0..100 {
        layer.set(&i, &vec![0u8; 64 * 1024], None).await.expect("set");
    }
    let bytes = layer.weighted_size();
    assert!(bytes <= 1024 * 1024, "{bytes} bytes held with a bound of 1 MiB");
    assert!(bytes >= 64 * 1024, "the cache kept nothing");
}

#[test]
fn moka_builder_rejects_bad_bounds() {
    let err = MokaLayer::builder()
        .max_capacity(0)
        .build::<u8, u8>()
        .expect_err("zero");
    assert_eq!(err.kind(), ErrorKind::Config);
    let err = MokaLayer::builder()
        .max_capacity(5)
        .max_bytes(5, |_: &u8, _: &u8| 1)
        .build::<u8, u8>()
        .expect_err("both");
    assert!(err.to_string().contains("max_capacity"));
    let err = MokaLayer::builder()
        .max_bytes(0, |_: &u8, _: &u8| 1)
        .build::<u8, u8>()
        .expect_err("zero bytes");
    assert!(err.to_string().contains("max_bytes"));
    // A weigher written for other types than the layer is built for: a typed error.
    let err = MokaLayer::builder()
        .max_bytes(64, |k: &String, _: &u8| k.len() as u32)
        .build::<u8, u8>()
        .expect_err("other types");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("weigher"), "{err}");
}

#[tokio::test]
async fn dashmap_expires_lazily_and_the_sweeper_removes_unread_entries() {
    let clock = ManualClock::new(0);
    let layer = DashMapLayer::builder()
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
    assert_eq!(layer.len(), 101);
    clock.advance(Duration::from_secs(1));
    assert_eq!(layer.get(&5).await.expect("get"), None, "expired on read");
    // Nobody reads the other 99: the sweeper must drop them.
    tokio::time::timeout(Duration::from_secs(5), async {
        while layer.len() > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("sweeper removed the expired entries");
    assert_eq!(layer.get(&1_000).await.expect("get").map(|e| e.value), Some(0));
}

#[tokio::test(start_paused = true)]
async fn dashmap_sweeps_every_minute_by_default_and_stops_on_close() {
    let clock = ManualClock::new(0);
    let layer = DashMapLayer::builder()
        .clock(clock.clone())
        .build::<u32, u32>()
        .expect("config");
    layer
        .set(&1, &1, Some(Duration::from_secs(1)))
        .await
        .expect("set");
    clock.advance(Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(layer.len(), 1, "no sweep before the first minute");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(layer.len(), 0, "swept after a minute");
    // The sweeper is this runtime's one task: it ends when the layer is closed, and a
    // dropped layer's ends too.
    let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    assert_eq!(tasks(), 1, "the sweeper runs");
    layer.close().await.expect("close");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(tasks(), 0, "close ends the sweeper");
    let dropped = DashMapLayer::builder().build::<u32, u32>().expect("config");
    assert_eq!(tasks(), 1);
    drop(dropped);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(tasks(), 0, "dropping the layer ends the sweeper");
    let off = DashMapLayer::builder()
        .clock(clock.clone())
        .sweeper(false)
        .build::<u32, u32>()
        .expect("config");
    off.set(&1, &1, Some(Duration::from_secs(1))).await.expect("set");
    clock.advance(Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(off.len(), 1, "sweeper(false) leaves expired entries to reads");
}

#[test]
fn dashmap_sweeper_outside_a_runtime_is_a_config_error() {
    let err = DashMapLayer::builder().build::<u8, u8>().expect_err("no runtime");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("sweeper(false)"), "{err}");
    DashMapLayer::builder()
        .sweeper(false)
        .build::<u8, u8>()
        .expect("no sweeper, no runtime needed");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let err = DashMapLayer::builder()
        .sweep_interval(Duration::ZERO)
        .build::<u8, u8>()
        .expect_err("zero");
    assert!(err.to_string().contains("sweep_interval"));
}

#[tokio::test]
async fn moka_over_dashmap_promotes_and_reports_per_layer_stats() {
    let cache = MultiLayer::<String, u64>::builder()
        .layer(LayerConfig::new(
            "moka",
            MokaLayer::builder().max_capacity(1_000).build().expect("config"),
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
        stats.layer("moka").map(|l| (l.hits, l.misses, l.sets)),
        Some((9, 1, 1))
    );
    assert_eq!(stats.layer("dashmap").map(|l| (l.hits, l.misses)), Some((0, 1)));
    assert!((stats.hit_ratio() - 0.9).abs() < 1e-9);
    let table = stats.to_string();
    assert!(
        table.contains("moka") && table.contains("dashmap") && table.contains("90.0%"),
        "{table}"
    );
}

#[tokio::test]
async fn write_back_reads_its_own_writes_with_an_l1_of_ten_entries() {
    use capacitor_core::testkit::FaultyLayer;
    use capacitor_core::{WriteBack, WritePolicy};
    use std::sync::Arc;

    let store = Arc::new(DashMapLayer::<u64, u64>::new());
    let faulty = FaultyLayer::shared(store.clone());
    let faults = faulty.faults();
    let l1 = MokaLayer::builder().max_capacity(10).build().expect("config");
    let cache = MultiLayer::builder()
        .write_policy(WritePolicy::Back(
            WriteBack::new()
                .queue_bound(20_000)
                .max_delay(Duration::from_millis(5)),
        ))
        .layer(LayerConfig::new("moka", l1))
        .layer(LayerConfig::new("store", faulty))
        .build()
        .expect("config");
    // The store refuses writes: everything stays pending while L1 keeps only ~10 entries.
    faults.fail_writes(true);
    for i in 0..10_000 {
        cache.set(i, i * 2).await.expect("set");
    }
    for i in 0..10_000 {
        assert_eq!(cache.get(&i).await.expect("get"), Some(i * 2), "key {i}");
    }
    let stats = cache.stats();
    let buffered = stats.write_back.as_ref().map_or(0, |w| w.buffer_hits);
    assert!(
        buffered >= 9_900,
        "L1 held ~10 entries, the rest came from the buffer: {stats}"
    );
    faults.fail_writes(false);
    tokio::time::timeout(Duration::from_secs(30), cache.flush())
        .await
        .expect("bounded")
        .expect("flush");
    assert_eq!(store.len(), 10_000);
    assert_eq!(store.get(&1234).await.expect("get").map(|e| e.value), Some(2468));
}

#[tokio::test]
async fn an_invalidation_bus_keeps_two_instances_l1_coherent() {
    use capacitor_core::testkit::{LoopbackBus, MapLayer};
    use std::sync::Arc;

    // Two app instances: each its own in-process L1, one shared store below.
    let shared: Arc<MapLayer<String, String>> = Arc::new(MapLayer::new());
    let hub = LoopbackBus::new();
    let instance = || {
        MultiLayer::builder()
            .invalidation_bus(hub.endpoint())
            // Each write returns once its message was sent (the loopback delivers it then).
            .publish_wait(std::time::Duration::from_secs(5))
            .layer(LayerConfig::new(
                "l1",
                MokaLayer::builder().max_capacity(100).build().expect("config"),
            ))
            .layer(LayerConfig::shared("shared", shared.clone()))
            .build()
            .expect("config")
    };
    let (a, b) = (instance(), instance());
    a.set("k".into(), "v1".into()).await.expect("set");
    assert_eq!(b.get(&"k".into()).await.expect("get"), Some("v1".into())); // now in B's L1
    a.set("k".into(), "v2".into()).await.expect("set");
    assert_eq!(
        b.get(&"k".into()).await.expect("get"),
        Some("v2".into()),
        "B's L1 copy was invalidated"
    );
    a.delete(&"k".into()).await.expect("delete");
    assert_eq!(b.get(&"k".into()).await.expect("get"), None);
    let (sa, sb) = (a.stats().bus.expect("bus"), b.stats().bus.expect("bus"));
    assert_eq!((sa.published, sb.received), (3, 3));
    assert_eq!(sa.received, 0, "an instance ignores its own messages");

    // After a reconnect (messages may be lost) every L1 is cleared.
    b.set("x".into(), "1".into()).await.expect("set");
    hub.reconnect_all();
    // One clear when B subscribed, one now.
    assert_eq!(b.stats().bus.map(|s| s.clears), Some(2));
    let before = b.stats().layer("l1").map_or(0, |l| l.misses);
    b.get(&"x".into()).await.expect("get");
    assert_eq!(
        b.stats().layer("l1").map(|l| l.misses),
        Some(before + 1),
        "L1 was cleared"
    );
}
