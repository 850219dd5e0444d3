//! Randomised concurrent histories over moka + the real Redis + the real PostgreSQL, with
//! and without write-back and fail-safe: every read is checked against the writes
//! acknowledged before it began, and after quiescence every layer is read directly and
//! must agree with PostgreSQL.

#![cfg(all(feature = "memory", feature = "redis", feature = "postgres"))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use capacitor::memory::MokaLayer;
use capacitor::postgres::tokio_postgres;
use capacitor::postgres::PostgresLayer;
use capacitor::redis::RedisLayer;
use capacitor::{FailSafe, Layer, LayerConfig, MultiLayer, WriteBack, WritePolicy};
use capacitor_core::testkit::{run_history, HistoryOptions};

use crate::common::{postgres_url, redis_url};

fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("hist_{what}_{}_{nanos}", std::process::id())
}

async fn drop_table(table: &str) {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS \"public\".\"{table}\""))
        .await
        .unwrap();
    drop(client);
    let _ = task.await;
}

async fn round(what: &str, write_back: bool, fail_safe: bool, seed: u64) -> (usize, Vec<String>) {
    let name = unique(what);
    let moka = Arc::new(
        MokaLayer::builder()
            .max_capacity(1_000)
            .build::<String, u64>()
            .unwrap(),
    );
    let redis = Arc::new(
        RedisLayer::builder()
            .url(redis_url())
            .prefix(format!("{name}:"))
            .pool_size(4)
            .command_timeout(Duration::from_secs(5))
            .build::<String, u64>()
            .unwrap(),
    );
    redis
        .connect()
        .await
        .expect("Redis (is it up? `cargo xtask test` starts it)");
    let postgres = Arc::new(
        PostgresLayer::builder()
            .url(postgres_url())
            .table(&name)
            .pool_size(8)
            .statement_timeout(Duration::from_secs(5))
            .sweeper(false)
            .build::<String, u64>()
            .await
            .expect("PostgreSQL (is it up? `cargo xtask test` starts it)"),
    );
    let mut builder = MultiLayer::builder()
        .layer(
            LayerConfig::shared("moka", moka.clone() as Arc<dyn Layer<String, u64>>)
                .ttl(Duration::from_secs(60)),
        )
        .layer(
            LayerConfig::shared("redis", redis.clone() as Arc<dyn Layer<String, u64>>)
                .ttl(Duration::from_secs(120)),
        )
        .layer(LayerConfig::shared(
            "postgres",
            postgres.clone() as Arc<dyn Layer<String, u64>>,
        ));
    if write_back {
        builder = builder.write_policy(WritePolicy::Back(WriteBack::default()));
    }
    if fail_safe {
        builder = builder.fail_safe(FailSafe::new(Duration::from_secs(600)));
    }
    let cache = builder.build().unwrap();
    let options = HistoryOptions::seeded(seed)
        .with_transactions(true)
        .with_size(8, 60)
        .with_prefix("h:");
    let history = run_history(&cache, &options).await;
    cache.flush().await.expect("flush after quiescence");
    let mut problems = Vec::new();
    let mut finals = HashMap::new();
    for key in options.key_names() {
        let stored = postgres.get(&key).await.unwrap().map(|e| e.value);
        for (layer, copy) in [
            ("moka", moka.get(&key).await.unwrap().map(|e| e.value)),
            ("redis", redis.get(&key).await.unwrap().map(|e| e.value)),
        ] {
            if copy.is_some() && copy != stored {
                problems.push(format!("{layer} holds {copy:?} for {key}, PostgreSQL {stored:?}"));
            }
        }
        let served = cache.get(&key).await.unwrap();
        if served != stored {
            problems.push(format!("{key}: served {served:?}, PostgreSQL holds {stored:?}"));
        }
        finals.insert(key, stored);
    }
    problems.extend(history.check(&finals).into_iter().map(|v| v.to_string()));
    cache.close().await.unwrap();
    drop_table(&name).await;
    (history.len(), problems)
}

async fn rounds(what: &str, write_back: bool, fail_safe: bool, n: u64) {
    let mut events = 0;
    for seed in 1..=n {
        let (len, problems) = round(what, write_back, fail_safe, seed).await;
        events += len;
        assert!(
            problems.is_empty(),
            "seed {seed}: {} violations, first: {:#?}",
            problems.len(),
            &problems[..problems.len().min(5)]
        );
    }
    println!("{what}: {n} rounds, {events} recorded reads and writes, 0 violations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_histories_over_moka_redis_postgres_are_coherent() {
    rounds("wt", false, false, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_histories_with_fail_safe_are_coherent() {
    rounds("wtfs", false, true, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_histories_over_moka_redis_postgres_are_coherent() {
    rounds("wb", true, true, 20).await;
}
