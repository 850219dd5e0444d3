//! Transactions: commit visibility across layers, rollback, failed commits, atomicity for
//! concurrent readers, write-back interplay.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capacitor_core::testkit::{Faults, FaultyLayer, MapLayer};
use capacitor_core::{
    async_trait, Entry, ErrorKind, Layer, LayerConfig, MultiLayer, Result, WriteBack, WritePolicy,
};

type Map = Arc<MapLayer<String, i64>>;

fn k(s: &str) -> String {
    s.to_owned()
}

fn stack() -> (MultiLayer<String, i64>, Map, Map, Arc<Faults>) {
    let l1: Map = Arc::new(MapLayer::new());
    let l2: Map = Arc::new(MapLayer::new());
    let faulty = FaultyLayer::shared(l2.clone());
    let faults = faulty.faults();
    let cache = MultiLayer::builder()
        .layer(LayerConfig::shared("l1", l1.clone()))
        .layer(LayerConfig::new("l2", faulty))
        .build()
        .unwrap();
    (cache, l1, l2, faults)
}

#[tokio::test]
async fn a_commit_is_visible_in_every_layer_and_reads_see_own_writes() {
    let (cache, l1, l2, _) = stack();
    cache.set(k("a"), 1).await.unwrap();
    cache.set(k("c"), 9).await.unwrap();
    assert_eq!(
        l1.raw_entry(&k("a")).map(|e| e.value),
        Some(1),
        "L1 caches the old value"
    );

    let mut tx = cache.begin().unwrap();
    tx.set(k("a"), 2);
    tx.set(k("b"), 3);
    tx.delete(k("c"));
    assert_eq!(tx.get(&k("a")).await.unwrap(), Some(2), "own write");
    assert_eq!(tx.get(&k("c")).await.unwrap(), None, "own delete");
    assert_eq!(
        cache.get(&k("a")).await.unwrap(),
        Some(1),
        "not visible before commit"
    );
    tx.commit().await.unwrap();

    assert!(l1.raw_entry(&k("a")).is_none(), "the pre-commit L1 copy is gone");
    assert_eq!(cache.get(&k("a")).await.unwrap(), Some(2));
    assert_eq!(cache.get(&k("b")).await.unwrap(), Some(3));
    assert_eq!(cache.get(&k("c")).await.unwrap(), None);
    assert_eq!(l2.raw_entry(&k("b")).map(|e| e.value), Some(3));
}

#[tokio::test]
async fn rollback_and_drop_leave_nothing() {
    let (cache, _, l2, _) = stack();
    let mut tx = cache.begin().unwrap();
    tx.set(k("x"), 1);
    tx.rollback();
    {
        let mut tx = cache.begin().unwrap();
        tx.set(k("y"), 1);
    }
    assert_eq!(cache.get(&k("x")).await.unwrap(), None);
    assert_eq!(cache.get(&k("y")).await.unwrap(), None);
    assert_eq!(l2.raw_len(), 0);
}

#[tokio::test]
async fn a_failed_commit_leaves_nothing_anywhere() {
    let (cache, l1, l2, faults) = stack();
    cache.set(k("a"), 1).await.unwrap();
    faults.fail_writes(true);
    let mut tx = cache.begin().unwrap();
    tx.set(k("a"), 2);
    tx.set(k("new"), 5);
    let err = tx.commit().await.expect_err("the bottom refused");
    assert_eq!((err.kind(), err.layer()), (ErrorKind::Unavailable, Some("l2")));
    assert_eq!(l1.raw_entry(&k("a")).map(|e| e.value), Some(1));
    assert_eq!(l2.raw_entry(&k("a")).map(|e| e.value), Some(1));
    assert!(l2.raw_entry(&k("new")).is_none());
    faults.fail_writes(false);
    assert_eq!(cache.get(&k("a")).await.unwrap(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_the_authoritative_layer_never_see_half_a_transaction() {
    let (cache, _, l2, _) = stack();
    cache.set(k("x"), 0).await.unwrap();
    cache.set(k("y"), 0).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (l2, stop, reads) = (l2.clone(), stop.clone(), reads.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // Each commit writes x then y: reading x first, y must not be behind it.
                let x = l2.get(&k("x")).await.unwrap().map(|e| e.value).unwrap();
                let y = l2.get(&k("y")).await.unwrap().map(|e| e.value).unwrap();
                assert!(y >= x, "half-applied transaction seen: x={x}, y={y}");
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // The reader spins on its own worker thread: wait until it has read before committing.
    tokio::time::timeout(Duration::from_secs(20), async {
        while reads.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the reader started reading");
    for i in 1..=5_000 {
        let mut tx = cache.begin().unwrap();
        tx.set(k("x"), i);
        tx.set(k("y"), i);
        tx.commit().await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .unwrap()
        .unwrap();
    assert!(reads.load(Ordering::Relaxed) > 0);
}

/// A bottom layer without native transactions.
struct NoTransactions(MapLayer<String, i64>);

#[async_trait]
impl Layer<String, i64> for NoTransactions {
    fn name(&self) -> &str {
        "plain"
    }
    async fn get(&self, key: &String) -> Result<Option<Entry<i64>>> {
        self.0.get(key).await
    }
    async fn set(&self, key: &String, value: &i64, ttl: Option<Duration>) -> Result<()> {
        self.0.set(key, value, ttl).await
    }
    async fn delete(&self, key: &String) -> Result<bool> {
        self.0.delete(key).await
    }
    async fn close(&self) -> Result<()> {
        self.0.close().await
    }
}

#[tokio::test]
async fn begin_says_so_when_the_bottom_has_no_transactions() {
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new("l1", MapLayer::new()))
        .layer(LayerConfig::new("plain", NoTransactions(MapLayer::new())))
        .build()
        .unwrap();
    let err = cache.begin().expect_err("no native transactions");
    assert_eq!((err.kind(), err.layer()), (ErrorKind::Unsupported, Some("plain")));
}

#[tokio::test]
async fn under_write_back_older_pending_writes_cannot_overwrite_a_commit() {
    let l2: Map = Arc::new(MapLayer::new());
    let cache = MultiLayer::builder()
        .write_policy(WritePolicy::Back(
            WriteBack::new().max_delay(Duration::from_secs(3600)),
        ))
        .layer(LayerConfig::new("l1", MapLayer::new()))
        .layer(LayerConfig::shared("l2", l2.clone()))
        .build()
        .unwrap();
    cache.set(k("a"), 1).await.unwrap(); // pending
    let mut tx = cache.begin().unwrap();
    tx.set(k("a"), 2);
    tx.commit().await.unwrap();
    cache.flush().await.unwrap();
    assert_eq!(l2.raw_entry(&k("a")).map(|e| e.value), Some(2));
    assert_eq!(cache.get(&k("a")).await.unwrap(), Some(2));
}
