//! The composer's part two against the real PostgreSQL at the bottom: write-back drains in
//! batches, transactions as PostgreSQL transactions, scan merged with pending writes,
//! warm-up from the table, single-flight loaders. Each test has its own table.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capacitor_core::{Layer, LayerConfig, MultiLayer, WarmUp, WriteBack, WritePolicy};
use capacitor_memory::MokaLayer;
use capacitor_postgres::PostgresLayer;
use common::{unique_table, url, TableGuard};
use futures::StreamExt;

async fn postgres(table: &str) -> PostgresLayer<String, String> {
    PostgresLayer::builder()
        .url(url())
        .table(table)
        .build()
        .await
        .expect("PostgreSQL layer")
}

fn moka() -> MokaLayer<String, String> {
    MokaLayer::builder().max_capacity(100_000).build().unwrap()
}

async fn rows(table: &str) -> i64 {
    let client = common::admin().await;
    client
        .query_one(&format!("SELECT count(*) FROM \"public\".\"{table}\""), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_drains_to_postgres_in_batches_and_scan_merges_pending_writes() {
    let table = unique_table("wb");
    let _guard = TableGuard(table.clone());
    let pg = postgres(&table).await;
    let cache = MultiLayer::builder()
        .write_policy(WritePolicy::Back(
            WriteBack::new()
                .batch_size(500)
                .max_delay(Duration::from_millis(20)),
        ))
        .layer(LayerConfig::new("moka", moka()))
        .layer(LayerConfig::new("postgres", pg.clone()))
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
    assert_eq!(rows(&table).await, 1_999);
    assert_eq!(
        pg.get(&"k:01999".to_string()).await.unwrap().map(|e| e.value),
        Some("v1999".into())
    );
    let w = cache.stats().write_back.unwrap();
    assert_eq!(w.queue_depth, 0);
    cache.close().await.unwrap();
    assert!(cache.unwritten_keys().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_as_one_postgres_transaction_or_not_at_all() {
    let table = unique_table("tx");
    let _guard = TableGuard(table.clone());
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new("moka", moka()))
        .layer(LayerConfig::new("postgres", postgres(&table).await))
        .build()
        .unwrap();
    cache.set("alice".into(), "100".into()).await.unwrap();
    assert_eq!(cache.get(&"alice".into()).await.unwrap(), Some("100".into())); // cached in L1
    let mut tx = cache.begin().unwrap();
    tx.set("alice".into(), "70".into());
    tx.set("bob".into(), "30".into());
    tx.commit().await.unwrap();
    assert_eq!(cache.get(&"alice".into()).await.unwrap(), Some("70".into()));
    assert_eq!(cache.get(&"bob".into()).await.unwrap(), Some("30".into()));

    let small_table = unique_table("txs");
    let _small_guard = TableGuard(small_table.clone());
    let small = PostgresLayer::builder()
        .url(url())
        .table(&small_table)
        .max_value_bytes(64)
        .build::<String, String>()
        .await
        .unwrap();
    let strict = MultiLayer::builder()
        .layer(LayerConfig::new("moka", moka()))
        .layer(LayerConfig::new("postgres", small))
        .build()
        .unwrap();
    let mut tx = strict.begin().unwrap();
    tx.set("ok".into(), "fine".into());
    tx.set("big".into(), "x".repeat(1_000));
    assert!(tx.commit().await.is_err());
    assert_eq!(rows(&small_table).await, 0, "a failed commit leaves nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_and_single_flight_loads_over_postgres() {
    let table = unique_table("wu");
    let _guard = TableGuard(table.clone());
    let pg = postgres(&table).await;
    let entries: Vec<(String, String)> = (0..1_500)
        .map(|i| (format!("user:{i:04}"), format!("u{i}")))
        .collect();
    pg.set_many(&entries, Some(Duration::from_secs(600)))
        .await
        .unwrap();
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new("moka", moka()))
        .layer(LayerConfig::new("postgres", pg))
        .build()
        .unwrap();
    let report = cache
        .warm_up("postgres", WarmUp::new().prefix("user:").limit(1_000))
        .await
        .unwrap();
    assert_eq!(report.copied, 1_000);
    for i in 0..1_000 {
        assert!(cache.get(&format!("user:{i:04}")).await.unwrap().is_some());
    }
    assert_eq!(
        cache.stats().layer("moka").map(|l| (l.hits, l.misses)),
        Some((1_000, 0))
    );

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
        rows(&table).await,
        1_501,
        "the loaded value was written through to PostgreSQL"
    );
}
