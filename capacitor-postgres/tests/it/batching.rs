//! Read batching against the real PostgreSQL: concurrent cold reads through a composer
//! (dashmap over PostgreSQL) sent as a few `key = ANY($1)` queries. Its own table.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{unique_table, url, TableGuard};
use capacitor_core::{Layer, LayerConfig, LayerStats, MultiLayer, ReadBatching};
use capacitor_memory::DashMapLayer;
use capacitor_postgres::PostgresLayer;

const TASKS: usize = 64;

fn postgres_stats(cache: &MultiLayer<String, String>) -> LayerStats {
    cache.stats().layer("postgres").cloned().unwrap()
}

/// `get` of every key at once, each on a task of its own.
async fn read_all(cache: &MultiLayer<String, String>, keys: &[String]) -> Vec<Option<String>> {
    let tasks: Vec<_> = keys
        .iter()
        .map(|k| {
            let (cache, k) = (cache.clone(), k.clone());
            tokio::spawn(async move { cache.get(&k).await.unwrap() })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_cold_reads_share_a_few_queries() {
    let table = unique_table("batch");
    let _guard = TableGuard(table.clone());
    let store: Arc<PostgresLayer<String, String>> = Arc::new(
        PostgresLayer::builder()
            .url(url())
            .table(&table)
            .build()
            .await
            .expect("PostgreSQL layer"),
    );
    let keys: Vec<String> = (0..TASKS).map(|i| format!("k{i}")).collect();
    let entries: Vec<(String, String)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), format!("v{i}")))
        .collect();
    store.set_many(&entries, None).await.unwrap();
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new("dashmap", DashMapLayer::new()))
        .layer(
            LayerConfig::shared("postgres", store.clone() as Arc<dyn Layer<String, String>>)
                .read_timeout(Duration::from_secs(5))
                .batch_reads(ReadBatching::new(Duration::from_millis(2)).max_keys(64)),
        )
        .build()
        .unwrap();
    // Cold in the dashmap: every read reaches PostgreSQL.
    let got = read_all(&cache, &keys).await;
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.as_deref(), Some(format!("v{i}").as_str()), "key {i}");
    }
    let stats = postgres_stats(&cache);
    assert_eq!((stats.batched_reads, stats.hits), (64, 64));
    assert!(
        stats.read_batches <= 8,
        "{} round trips for 64 reads",
        stats.read_batches
    );
    println!("64 cold reads in {} round trips", stats.read_batches);
    // Promoted: read again, nothing reaches PostgreSQL.
    assert_eq!(read_all(&cache, &keys).await, got);
    assert_eq!(postgres_stats(&cache).read_batches, stats.read_batches);
    // A key missing from the table and a key read twice, in one batch.
    let mixed = [
        "absent".to_string(),
        "absent".to_string(),
        "also absent".to_string(),
    ];
    assert_eq!(read_all(&cache, &mixed).await, vec![None, None, None]);
    cache.close().await.unwrap();
}
