//! Forced interleavings of two composer operations on one key: a gate holds one
//! operation's write (or read) at a chosen point while the other runs to completion, then
//! lets it go on. After both return, every layer must hold what the authoritative layer
//! holds, or not hold the key.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::Arc;
use std::time::Duration;

use capacitor_core::testkit::{within, FaultyLayer, GateLayer, GateOp, Gates, Hold, MapLayer};
use capacitor_core::{FailSafe, Layer, LayerConfig, MultiLayer, MultiLayerBuilder, WriteBack, WritePolicy};
use tokio::sync::oneshot;

const LIMIT: Duration = Duration::from_secs(10);

type Cache = MultiLayer<String, u32>;

struct Rig {
    cache: Cache,
    l1: Arc<MapLayer<String, u32>>,
    store: Arc<MapLayer<String, u32>>,
    gates: Arc<Gates>,
}

/// L1 (a map) over a gated store.
fn rig(tweak: impl FnOnce(MultiLayerBuilder<String, u32>) -> MultiLayerBuilder<String, u32>) -> Rig {
    let l1 = Arc::new(MapLayer::new());
    let store = Arc::new(MapLayer::new());
    let gated = GateLayer::shared(store.clone() as Arc<dyn Layer<String, u32>>);
    let gates = gated.gates();
    let builder = MultiLayer::builder()
        .layer(LayerConfig::shared(
            "l1",
            l1.clone() as Arc<dyn Layer<String, u32>>,
        ))
        .layer(LayerConfig::new("store", gated));
    let cache = tweak(builder).build().expect("valid composer");
    Rig {
        cache,
        l1,
        store,
        gates,
    }
}

impl Rig {
    /// L1 holds nothing for `key`, or what the store holds.
    fn assert_coherent(&self, key: &str) {
        let key = key.to_string();
        let store = self.store.raw_entry(&key).map(|e| e.value);
        if let Some(l1) = self.l1.raw_entry(&key).map(|e| e.value) {
            assert_eq!(Some(l1), store, "L1 holds {l1} for {key}, the store {store:?}");
        }
    }
}

fn k() -> String {
    "k".to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_acknowledged_by_the_store_then_overtaken_by_another_set_leaves_l1_coherent() {
    let r = rig(|b| b);
    let gate = r.gates.hold(GateOp::Set, Hold::After);
    let first = tokio::spawn({
        let cache = r.cache.clone();
        async move { cache.set(k(), 1).await }
    });
    gate.reached().await; // the store holds 1; L1 not written yet
    within(LIMIT, r.cache.set(k(), 2)).await.unwrap();
    gate.release(); // the first writer now writes L1
    within(LIMIT, first).await.unwrap().unwrap();
    r.assert_coherent("k");
    assert_eq!(r.cache.get(&k()).await.unwrap(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_overtaking_a_set_is_not_undone_in_l1() {
    let r = rig(|b| b);
    let gate = r.gates.hold(GateOp::Set, Hold::After);
    let set = tokio::spawn({
        let cache = r.cache.clone();
        async move { cache.set(k(), 1).await }
    });
    gate.reached().await;
    assert!(within(LIMIT, r.cache.delete(&k())).await.unwrap());
    gate.release();
    within(LIMIT, set).await.unwrap().unwrap();
    r.assert_coherent("k");
    assert_eq!(r.cache.get(&k()).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_many_overtaken_by_a_set_leaves_l1_coherent() {
    let r = rig(|b| b);
    let gate = r.gates.hold(GateOp::SetMany, Hold::After);
    let batch = tokio::spawn({
        let cache = r.cache.clone();
        async move {
            cache
                .set_many(&[(k(), 1), ("other".into(), 9)], Default::default())
                .await
        }
    });
    gate.reached().await;
    within(LIMIT, r.cache.set(k(), 2)).await.unwrap();
    gate.release();
    within(LIMIT, batch).await.unwrap().unwrap();
    r.assert_coherent("k");
    r.assert_coherent("other");
    assert_eq!(r.cache.get(&k()).await.unwrap(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_many_overtaking_a_set_is_not_undone_in_l1() {
    let r = rig(|b| b);
    let gate = r.gates.hold(GateOp::Set, Hold::After);
    let set = tokio::spawn({
        let cache = r.cache.clone();
        async move { cache.set(k(), 1).await }
    });
    gate.reached().await;
    assert_eq!(within(LIMIT, r.cache.delete_many(&[k()])).await.unwrap(), 1);
    gate.release();
    within(LIMIT, set).await.unwrap().unwrap();
    r.assert_coherent("k");
    assert_eq!(r.cache.get(&k()).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_overtaking_a_set_is_not_undone_in_l1() {
    let r = rig(|b| b);
    let gate = r.gates.hold(GateOp::Set, Hold::After);
    let set = tokio::spawn({
        let cache = r.cache.clone();
        async move { cache.set(k(), 1).await }
    });
    gate.reached().await;
    let mut tx = r.cache.begin().unwrap();
    tx.set(k(), 2);
    within(LIMIT, tx.commit()).await.unwrap();
    gate.release();
    within(LIMIT, set).await.unwrap().unwrap();
    r.assert_coherent("k");
    assert_eq!(r.cache.get(&k()).await.unwrap(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_overtaking_a_commit_leaves_l1_coherent() {
    let r = rig(|b| b);
    let gate = r.gates.hold(GateOp::Atomic, Hold::After);
    let commit = tokio::spawn({
        let cache = r.cache.clone();
        async move {
            let mut tx = cache.begin()?;
            tx.set(k(), 1);
            tx.commit().await
        }
    });
    gate.reached().await;
    within(LIMIT, r.cache.set(k(), 2)).await.unwrap();
    gate.release();
    within(LIMIT, commit).await.unwrap().unwrap();
    r.assert_coherent("k");
    assert_eq!(r.cache.get(&k()).await.unwrap(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_racing_a_set_does_not_resurrect_the_old_value() {
    let r = rig(|b| b);
    r.cache.set(k(), 1).await.unwrap();
    r.l1.delete(&k()).await.unwrap(); // the next read goes to the store
    let gate = r.gates.hold(GateOp::Get, Hold::After);
    let read = tokio::spawn({
        let cache = r.cache.clone();
        async move { cache.get(&k()).await }
    });
    gate.reached().await; // the reader holds 1 from the store
    within(LIMIT, r.cache.set(k(), 2)).await.unwrap();
    gate.release();
    assert_eq!(
        within(LIMIT, read).await.unwrap().unwrap(),
        Some(1),
        "the read began first"
    );
    r.assert_coherent("k");
    assert_eq!(r.cache.get(&k()).await.unwrap(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_began_before_a_delete_does_not_leave_a_fail_safe_copy() {
    let l1 = Arc::new(MapLayer::new());
    let store = FaultyLayer::new(MapLayer::<String, u32>::new());
    let faults = store.faults();
    let gated = GateLayer::new(store);
    let gates = gated.gates();
    let cache = MultiLayer::builder()
        .layer(LayerConfig::shared(
            "l1",
            l1.clone() as Arc<dyn Layer<String, u32>>,
        ))
        .layer(LayerConfig::new("store", gated))
        .fail_safe(FailSafe::new(Duration::from_secs(600)))
        .build()
        .unwrap();
    cache.set(k(), 1).await.unwrap();
    l1.delete(&k()).await.unwrap();
    let gate = gates.hold(GateOp::Get, Hold::After);
    let read = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(&k()).await }
    });
    gate.reached().await;
    assert!(within(LIMIT, cache.delete(&k())).await.unwrap());
    gate.release();
    within(LIMIT, read).await.unwrap().unwrap();
    faults.fail_reads(true);
    let after = cache.get(&k()).await;
    assert!(
        !matches!(after, Ok(Some(_))),
        "a deleted key was served from fail-safe: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_during_the_leaders_recheck_is_not_overwritten_by_the_load() {
    let r = rig(|b| b);
    // The first store read is get_or_load's own miss; the second the leader's re-check.
    let gate = r.gates.hold_nth(GateOp::Get, 1, Hold::After);
    let load = tokio::spawn({
        let cache = r.cache.clone();
        async move { cache.get_or_load(&k(), || async { 100 }).await }
    });
    gate.reached().await;
    within(LIMIT, r.cache.set(k(), 2)).await.unwrap();
    gate.release();
    within(LIMIT, load).await.unwrap().unwrap();
    r.assert_coherent("k");
    assert_eq!(
        r.store.raw_entry(&k()).map(|e| e.value),
        Some(2),
        "the acknowledged set"
    );
    assert_eq!(r.cache.get(&k()).await.unwrap(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_starts_after_a_delete_does_not_join_the_flight_from_before_it() {
    let r = rig(|b| b);
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let first = tokio::spawn({
        let cache = r.cache.clone();
        async move {
            cache
                .get_or_load(&k(), || async move {
                    let _ = started_tx.send(());
                    let _ = finish_rx.await;
                    100 // read from the origin before the delete
                })
                .await
        }
    });
    within(LIMIT, started_rx).await.unwrap();
    within(LIMIT, r.cache.delete(&k())).await.unwrap();
    let second = tokio::spawn({
        let cache = r.cache.clone();
        async move { cache.get_or_load(&k(), || async { 200 }).await }
    });
    // Give a wrong implementation every chance to join the old flight.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = finish_tx.send(());
    assert_eq!(within(LIMIT, second).await.unwrap().unwrap(), 200);
    within(LIMIT, first).await.unwrap().unwrap();
    r.assert_coherent("k");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_dropped_after_the_store_took_it_leaves_no_old_copy_in_l1() {
    let r = rig(|b| b);
    r.cache.set(k(), 1).await.unwrap();
    let gate = r.gates.hold(GateOp::Set, Hold::After);
    let set = tokio::spawn({
        let cache = r.cache.clone();
        async move { cache.set(k(), 2).await }
    });
    gate.reached().await; // the store holds 2, L1 still 1
    set.abort();
    assert!(within(LIMIT, set).await.unwrap_err().is_cancelled());
    assert_eq!(
        r.cache.get(&k()).await.unwrap(),
        Some(2),
        "L1 is passed by at once"
    );
    // Its copy is removed in the background.
    within(LIMIT, async {
        while r.l1.raw_entry(&k()).is_some_and(|e| e.value != 2) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    r.assert_coherent("k");
    gate.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_write_that_timed_out_leaves_no_cache_serving_the_old_value() {
    let r = rig(|b| b);
    // A second composer over the same layers whose store has a 100 ms write timeout.
    let slow = GateLayer::shared(r.store.clone() as Arc<dyn Layer<String, u32>>);
    let gates = slow.gates();
    let cache: Cache = MultiLayer::builder()
        .layer(LayerConfig::shared(
            "l1",
            r.l1.clone() as Arc<dyn Layer<String, u32>>,
        ))
        .layer(LayerConfig::new("store", slow).write_timeout(Duration::from_millis(100)))
        .build()
        .unwrap();
    cache.set(k(), 1).await.unwrap();
    assert_eq!(r.l1.raw_entry(&k()).map(|e| e.value), Some(1));
    // The store applies 2, but its answer comes after the composer's timeout.
    let gate = gates.hold(GateOp::Set, Hold::After);
    let err = within(LIMIT, cache.set(k(), 2)).await.unwrap_err();
    assert_eq!(err.kind(), capacitor_core::ErrorKind::Timeout);
    r.assert_coherent("k");
    assert_eq!(cache.get(&k()).await.unwrap(), Some(2), "the store's value");
    // Later writes are acknowledged, and no copy above the store disagrees with it.
    within(LIMIT, cache.set(k(), 3)).await.unwrap();
    r.assert_coherent("k");
    assert_eq!(cache.get(&k()).await.unwrap(), Some(3));
    gate.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_write_back_the_buffer_and_l1_agree_on_overlapping_sets() {
    let l1 = Arc::new(MapLayer::<String, u32>::new());
    let gated = GateLayer::shared(l1.clone() as Arc<dyn Layer<String, u32>>);
    let gates = gated.gates();
    let store = Arc::new(MapLayer::<String, u32>::new());
    let cache: Cache = MultiLayer::builder()
        .layer(LayerConfig::new("l1", gated))
        .layer(LayerConfig::shared(
            "store",
            store.clone() as Arc<dyn Layer<String, u32>>,
        ))
        .write_policy(WritePolicy::Back(WriteBack::default()))
        .build()
        .unwrap();
    let gate = gates.hold(GateOp::Set, Hold::Before);
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { cache.set(k(), 1).await }
    });
    gate.reached().await; // queued 1, L1 not written yet
    within(LIMIT, cache.set(k(), 2)).await.unwrap(); // queued 2 after it, L1 = 2
    gate.release(); // L1 = 1 unless the overlap is seen
    within(LIMIT, first).await.unwrap().unwrap();
    assert_eq!(
        cache.get(&k()).await.unwrap(),
        Some(2),
        "the later write in the buffer"
    );
    within(LIMIT, cache.flush()).await.unwrap();
    assert_eq!(store.raw_entry(&k()).map(|e| e.value), Some(2));
    if let Some(l1) = l1.raw_entry(&k()) {
        assert_eq!(l1.value, 2, "L1 disagrees with the store");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_eviction_during_a_promotion_leaves_no_old_copy() {
    // Two instances over one store; B's read of the store is held after it answered
    // while A's set lands and its message evicts the key from B's L1.
    let bus = capacitor_core::testkit::LoopbackBus::new();
    let store = Arc::new(MapLayer::<String, u32>::new());
    let a = MultiLayer::builder()
        .layer(LayerConfig::new("l1", MapLayer::new()))
        .layer(LayerConfig::shared(
            "store",
            store.clone() as Arc<dyn Layer<String, u32>>,
        ))
        .invalidation_bus(bus.endpoint())
        .publish_wait(LIMIT)
        .build()
        .unwrap();
    let b_l1 = Arc::new(MapLayer::<String, u32>::new());
    let gated = GateLayer::shared(store.clone() as Arc<dyn Layer<String, u32>>);
    let gates = gated.gates();
    let b = MultiLayer::builder()
        .layer(LayerConfig::shared(
            "l1",
            b_l1.clone() as Arc<dyn Layer<String, u32>>,
        ))
        .layer(LayerConfig::new("store", gated))
        .invalidation_bus(bus.endpoint())
        .build()
        .unwrap();
    a.set(k(), 1).await.unwrap();
    let gate = gates.hold(GateOp::Get, Hold::After);
    let read = tokio::spawn({
        let b = b.clone();
        async move { b.get(&k()).await }
    });
    gate.reached().await; // B holds 1 from the store, not yet copied up
    let received = |c: &Cache| c.stats().bus.map_or(0, |s| s.received);
    let before = received(&b);
    within(LIMIT, a.set(k(), 2)).await.unwrap();
    assert_eq!(received(&b), before + 1, "A's message reached B");
    gate.release();
    assert_eq!(within(LIMIT, read).await.unwrap().unwrap(), Some(1));
    let held = b_l1.raw_entry(&k()).map(|e| e.value);
    assert!(
        held.is_none() || held == Some(2),
        "B's L1 holds {held:?} after the eviction"
    );
    assert_eq!(b.get(&k()).await.unwrap(), Some(2));
}

/// A load whose caller gave up (hard timeout) completes in the background; its fill has
/// reached the store (held there) when the caller writes the key. The write waits for the
/// fill to end, then writes: the store and L1 end with the caller's value, not the loaded
/// one. (Without the wait, the held fill lands after the write and the write is lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_a_timed_out_load_is_not_overwritten_by_its_fill() {
    let r = rig(|b| b);
    let fill_at_store = r.gates.hold(GateOp::Set, Hold::Before);
    let options = r.cache.load_options().hard_timeout(Duration::from_millis(50));
    let err = r
        .cache
        .get_or_load_with(&k(), &options, || async {
            Ok::<_, std::io::Error>(capacitor_core::Loaded::value(100))
        })
        .await
        .unwrap_err();
    // The loader answered at once; its fill waits at the store past the caller's timeout.
    assert_eq!(err.kind(), capacitor_core::ErrorKind::Timeout);
    fill_at_store.reached().await;
    let write = {
        let cache = r.cache.clone();
        tokio::spawn(async move { cache.set(k(), 200).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!write.is_finished(), "the write waits for the fill");
    fill_at_store.release();
    within(Duration::from_secs(10), write).await.unwrap().unwrap();
    assert_eq!(r.store.raw_entry(&k()).map(|e| e.value), Some(200));
    assert_eq!(r.cache.get(&k()).await.unwrap(), Some(200));
    r.assert_coherent("k");
}
