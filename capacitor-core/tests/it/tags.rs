//! Tags through the composer: `set_with(.., SetOptions::tags(..))` and `remove_by_tag`
//! over an in-process L1, a shared cache and a store that keeps the tags, across two
//! instances; the refusals; and a read racing the removal.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::Arc;
use std::time::Duration;

use capacitor::memory::DashMapLayer;
use capacitor_core::testkit::{within, GateLayer, GateOp, Hold, LoopbackBus, MapLayer};
use capacitor_core::{
    ErrorKind, Layer, LayerConfig, MultiLayer, SetOptions, WriteBack, WritePolicy, MAX_TAGS,
};

const LIMIT: Duration = Duration::from_secs(10);

type Cache = MultiLayer<String, u32>;
type Map = Arc<MapLayer<String, u32>>;

fn k(i: u32) -> String {
    format!("k{i}")
}

fn tagged(tags: &[&str]) -> SetOptions {
    SetOptions::new().tags(tags.iter().copied())
}

/// Two instances (own dashmap L1 each) over one shared cache and one store, on a bus.
fn pair() -> (Cache, Cache, Map, Map) {
    let hub = LoopbackBus::new();
    let shared = Arc::new(MapLayer::new());
    let store = Arc::new(MapLayer::new());
    let instance = || {
        MultiLayer::builder()
            .layer(LayerConfig::new("l1", DashMapLayer::new()))
            .layer(LayerConfig::shared(
                "shared",
                shared.clone() as Arc<dyn Layer<String, u32>>,
            ))
            .layer(LayerConfig::shared(
                "store",
                store.clone() as Arc<dyn Layer<String, u32>>,
            ))
            .invalidation_bus(hub.endpoint())
            .publish_wait(LIMIT)
            .build()
            .unwrap()
    };
    (instance(), instance(), shared, store)
}

#[tokio::test]
async fn remove_by_tag_removes_the_tagged_keys_from_every_layer_and_instance() {
    let (a, b, shared, store) = pair();
    a.set_with(k(1), 1, tagged(&["user:42"])).await.unwrap();
    a.set_with(k(2), 2, tagged(&["user:42", "team:7"])).await.unwrap();
    a.set_with(k(3), 3, tagged(&["team:7"])).await.unwrap();
    a.set(k(4), 4).await.unwrap();
    // Tagged, then written again without the tag: no longer under it.
    a.set_with(k(5), 5, tagged(&["user:42"])).await.unwrap();
    b.set(k(5), 55).await.unwrap();
    for i in 1..=5 {
        assert!(b.get(&k(i)).await.unwrap().is_some()); // in B's L1
    }
    let mut removed = a.remove_by_tag("user:42").await.unwrap();
    removed.sort();
    assert_eq!(removed, vec![k(1), k(2)]);
    for i in [1, 2] {
        assert_eq!(a.get(&k(i)).await.unwrap(), None);
        assert_eq!(b.get(&k(i)).await.unwrap(), None, "B's L1 dropped {}", k(i));
        assert!(shared.raw_entry(&k(i)).is_none() && store.raw_entry(&k(i)).is_none());
    }
    assert_eq!(b.get(&k(3)).await.unwrap(), Some(3));
    assert_eq!(b.get(&k(4)).await.unwrap(), Some(4));
    assert_eq!(b.get(&k(5)).await.unwrap(), Some(55));
    // k2's other tag no longer names it; k3 still carries team:7.
    assert_eq!(b.remove_by_tag("team:7").await.unwrap(), vec![k(3)]);
    assert_eq!(a.get(&k(3)).await.unwrap(), None, "A's L1 dropped k3");
    assert!(a.remove_by_tag("user:42").await.unwrap().is_empty());
}

#[tokio::test]
async fn tags_that_cannot_be_kept_are_refused_before_anything_is_written() {
    // A store that keeps no tags.
    let store = Arc::new(DashMapLayer::new());
    let plain = MultiLayer::<String, u32>::builder()
        .layer(LayerConfig::new("l1", DashMapLayer::new()))
        .layer(LayerConfig::shared(
            "store",
            store.clone() as Arc<dyn Layer<String, u32>>,
        ))
        .build()
        .unwrap();
    let err = plain.set_with(k(1), 1, tagged(&["t"])).await.unwrap_err();
    assert_eq!((err.kind(), err.layer()), (ErrorKind::Unsupported, Some("store")));
    assert_eq!(store.len(), 0, "nothing written");
    assert_eq!(
        plain.remove_by_tag("t").await.unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    plain.set_with(k(1), 1, SetOptions::new()).await.unwrap(); // no tags: fine

    let (a, _b, _, _) = pair();
    for bad in [tagged(&[""]), tagged(&[&"x".repeat(1025)])] {
        assert_eq!(
            a.set_with(k(1), 1, bad).await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
    let many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
    let err = a
        .set_with(k(1), 1, SetOptions::new().tags(many))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(a.get(&k(1)).await.unwrap(), None, "nothing written");
    assert_eq!(
        a.remove_by_tag("").await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );

    // Under write-back the buffer keeps no tags.
    let back = MultiLayer::<String, u32>::builder()
        .layer(LayerConfig::new("l1", DashMapLayer::new()))
        .layer(LayerConfig::new("store", MapLayer::new()))
        .write_policy(WritePolicy::Back(WriteBack::default()))
        .build()
        .unwrap();
    assert_eq!(
        back.set_with(k(1), 1, tagged(&["t"])).await.unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    assert!(back.remove_by_tag("t").await.unwrap().is_empty());
    back.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_racing_remove_by_tag_leaves_no_old_copy_above() {
    // The read takes the tagged value from the store and is held there while the removal
    // runs to completion; released, it answers the value it read, but copies nothing up.
    let l1 = Arc::new(DashMapLayer::new());
    let store = Arc::new(MapLayer::new());
    let gated = GateLayer::shared(store.clone() as Arc<dyn Layer<String, u32>>);
    let gates = gated.gates();
    let cache = MultiLayer::<String, u32>::builder()
        .layer(LayerConfig::shared(
            "l1",
            l1.clone() as Arc<dyn Layer<String, u32>>,
        ))
        .layer(LayerConfig::new("store", gated))
        .build()
        .unwrap();
    cache.set_with(k(1), 1, tagged(&["t"])).await.unwrap();
    l1.delete(&k(1)).await.unwrap(); // the next read goes to the store
    let gate = gates.hold(GateOp::Get, Hold::After);
    let read = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(&k(1)).await }
    });
    gate.reached().await;
    assert_eq!(within(LIMIT, cache.remove_by_tag("t")).await.unwrap(), vec![k(1)]);
    gate.release();
    assert_eq!(within(LIMIT, read).await.unwrap().unwrap(), Some(1));
    assert_eq!(l1.len(), 0, "the old copy was not put in L1");
    assert_eq!(cache.get(&k(1)).await.unwrap(), None);
}
