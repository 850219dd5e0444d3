//! Composer behaviours specific to redb, beyond the shared composer suite (run from
//! `conformance.rs`): drained writes survive a reopen, a commit redb's layer refuses
//! leaves nothing, tags kept by redb remove entries from redb and the L1 (with the
//! figures the crate guide quotes).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::time::{Duration, Instant};

use capacitor_core::{Layer, LayerConfig, MultiLayer, SetOptions, WriteBack, WritePolicy};
use capacitor_memory::MokaLayer;
use capacitor_redb::{Durability, RedbLayer};
use futures::StreamExt;

fn disk(dir: &std::path::Path) -> RedbLayer<String, String> {
    RedbLayer::builder()
        .path(dir.join("db.redb"))
        .durability(Durability::Manual)
        .build()
        .unwrap()
}

fn l1() -> MokaLayer<String, String> {
    l1_of(1_000)
}

fn l1_of(capacity: u64) -> MokaLayer<String, String> {
    MokaLayer::builder().max_capacity(capacity).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_over_redb_drains_reads_its_writes_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let redb = disk(dir.path());
    let cache = MultiLayer::builder()
        .write_policy(WritePolicy::Back(WriteBack::new().batch_size(500)))
        .layer(LayerConfig::new("moka", l1()))
        .layer(LayerConfig::new("redb", redb.clone()))
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
async fn transactions_commit_through_redb_and_invalidate_the_l1() {
    let dir = tempfile::tempdir().unwrap();
    let redb = disk(dir.path());
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new("moka", l1()))
        .layer(LayerConfig::new("redb", redb.clone()))
        .build()
        .unwrap();
    cache.set("a".into(), "1".into()).await.unwrap();
    let mut tx = cache.begin().unwrap();
    tx.set("a".into(), "2".into());
    tx.set("b".into(), "3".into());
    tx.commit().await.unwrap();
    assert_eq!(cache.get(&"a".into()).await.unwrap(), Some("2".into()));
    assert_eq!(
        redb.get(&"b".into()).await.unwrap().map(|e| e.value),
        Some("3".into())
    );

    // A commit that the redb layer refuses (a value over its limit) leaves nothing behind.
    let small = RedbLayer::builder()
        .path(dir.path().join("small.redb"))
        .max_value_bytes(64)
        .build::<String, String>()
        .unwrap();
    let strict = MultiLayer::builder()
        .layer(LayerConfig::new("moka", l1()))
        .layer(LayerConfig::new("redb", small.clone()))
        .build()
        .unwrap();
    let mut tx = strict.begin().unwrap();
    tx.set("ok".into(), "fine".into());
    tx.set("big".into(), "x".repeat(1_000));
    assert!(tx.commit().await.is_err());
    assert_eq!(small.get(&"ok".into()).await.unwrap(), None, "all or nothing");
}

/// The median of `samples`.
fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// The median latency of 1,000 plain `set`s of fresh keys on a redb layer.
async fn median_plain_set(dir: &std::path::Path, tags: bool) -> Duration {
    let layer = RedbLayer::builder()
        .path(dir.join(if tags { "sets-tags.redb" } else { "sets-plain.redb" }))
        .tags(tags)
        .build::<String, String>()
        .unwrap();
    let value = "v".repeat(100);
    let mut samples = Vec::with_capacity(1_000);
    for i in 0..1_000 {
        let key = format!("plain:{i:05}");
        let started = Instant::now();
        layer.set(&key, &value, None).await.unwrap();
        samples.push(started.elapsed());
    }
    layer.close().await.unwrap();
    median(samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_kept_by_redb_remove_entries_from_redb_and_the_l1() {
    const TAGGED: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbLayer::builder()
        .path(dir.path().join("db.redb"))
        .tags(true)
        .build::<String, String>()
        .unwrap();
    let moka = std::sync::Arc::new(l1_of(20_000));
    let cache = MultiLayer::builder()
        .layer(LayerConfig::shared("moka", moka.clone()))
        .layer(LayerConfig::new("redb", redb.clone()))
        .build()
        .unwrap();
    for i in 0..TAGGED {
        let options = SetOptions::new().tags(["user:42", &format!("page:{}", i % 10)]);
        cache
            .set_with(format!("t:{i:05}"), format!("v{i}"), options)
            .await
            .unwrap();
    }
    for i in 0..100 {
        cache.set(format!("u:{i:03}"), format!("u{i}")).await.unwrap();
    }
    // A key tagged, then rewritten without tags, is no longer the tag's.
    cache
        .set_with("t:retag".into(), "1".into(), SetOptions::new().tags(["user:42"]))
        .await
        .unwrap();
    cache.set("t:retag".into(), "2".into()).await.unwrap();
    for key in ["t:00000", "t:09999", "u:000"] {
        assert!(cache.get(&key.to_string()).await.unwrap().is_some(), "{key}");
        assert!(
            moka.get(&key.to_string()).await.unwrap().is_some(),
            "{key} in the L1"
        );
    }

    let started = Instant::now();
    let removed = cache.remove_by_tag("user:42").await.unwrap();
    let took = started.elapsed();
    assert_eq!(removed.len(), TAGGED);
    for key in ["t:00000", "t:05000", "t:09999"] {
        let key = key.to_string();
        assert_eq!(cache.get(&key).await.unwrap(), None, "{key}");
        assert_eq!(moka.get(&key).await.unwrap(), None, "{key} gone from the L1");
        assert_eq!(redb.get(&key).await.unwrap(), None, "{key} gone from redb");
    }
    for key in ["u:000", "u:099", "t:retag"] {
        let key = key.to_string();
        assert!(moka.get(&key).await.unwrap().is_some(), "{key} stays in the L1");
        assert!(redb.get(&key).await.unwrap().is_some(), "{key} stays in redb");
    }
    // The keys' other tags went with them.
    assert_eq!(cache.remove_by_tag("page:3").await.unwrap(), Vec::<String>::new());
    // The same on the redb layer alone, for the share of the composer (the L1's deletes).
    for i in 0..TAGGED {
        let tags = ["direct".to_owned(), format!("page:{}", i % 10)];
        redb.set_tagged(&format!("d:{i:05}"), &format!("v{i}"), None, &tags)
            .await
            .unwrap();
    }
    let started = Instant::now();
    assert_eq!(redb.remove_by_tag("direct").await.unwrap().len(), TAGGED);
    let took_layer = started.elapsed();
    cache.close().await.unwrap();

    let plain = median_plain_set(dir.path(), false).await;
    let tagged = median_plain_set(dir.path(), true).await;
    println!(
        "remove_by_tag of {TAGGED} keys: {took:?} (MultiLayer, redb + moka L1), \
         {took_layer:?} (RedbLayer alone); median plain set over 1000: tags off {plain:?}, tags on {tagged:?}"
    );
}
