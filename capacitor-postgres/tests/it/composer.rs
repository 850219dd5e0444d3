//! The composer's part two against the real PostgreSQL at the bottom: write-back drains in
//! batches, transactions as PostgreSQL transactions, scan merged with pending writes,
//! warm-up from the table, single-flight loaders. Each test has its own table.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common::{unique_table, url, TableGuard};
use capacitor_core::{LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_postgres::PostgresLayer;

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
    let client = crate::common::admin().await;
    client
        .query_one(&format!("SELECT count(*) FROM \"public\".\"{table}\""), &[])
        .await
        .unwrap()
        .get(0)
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
