//! Write-back over the real PostgreSQL with writes the store refuses: what the layer can
//! tell in advance is refused to the caller before it is acknowledged (the same error
//! write-through gives); what only the server refuses is found by the drain, set aside
//! and reported, and every other write still lands. Each test has its own table.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{unique_table, url, TableGuard};
use capacitor_core::{ErrorKind, LayerConfig, MultiLayer, WriteBack, WritePolicy};
use capacitor_memory::MokaLayer;
use capacitor_postgres::{PostgresLayer, MAX_KEY_BYTES};

async fn postgres(table: &str) -> PostgresLayer<String, String> {
    PostgresLayer::builder()
        .url(url())
        .table(table)
        .max_value_bytes(256)
        .build()
        .await
        .expect("PostgreSQL layer")
}

fn moka() -> MokaLayer<String, String> {
    MokaLayer::builder().max_capacity(100_000).build().unwrap()
}

fn write_back() -> WritePolicy {
    WritePolicy::Back(
        WriteBack::new()
            .max_delay(Duration::from_millis(20))
            .batch_size(16),
    )
}

async fn rows(table: &str) -> i64 {
    crate::common::admin()
        .await
        .query_one(&format!("SELECT count(*) FROM \"public\".\"{table}\""), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_store_would_refuse_is_refused_before_it_is_acknowledged() {
    let table = unique_table("refuse_early");
    let _guard = TableGuard(table.clone());
    let layer = Arc::new(postgres(&table).await);
    let through = MultiLayer::builder()
        .layer(LayerConfig::new("moka", moka()))
        .layer(LayerConfig::shared("postgres", layer.clone()))
        .build()
        .unwrap();
    let back = MultiLayer::builder()
        .layer(LayerConfig::new("moka", moka()))
        .layer(LayerConfig::shared("postgres", layer.clone()))
        .write_policy(write_back())
        .build()
        .unwrap();
    let too_big = "x".repeat(1_000);
    let long_key = "k".repeat(MAX_KEY_BYTES + 1);
    let bad: [(String, String, ErrorKind); 3] = [
        ("big".into(), too_big, ErrorKind::ValueTooLarge),
        ("nul\0key".into(), "v".into(), ErrorKind::InvalidInput),
        (long_key, "v".into(), ErrorKind::InvalidInput),
    ];
    for (key, value, kind) in bad {
        let early = back.set(key.clone(), value.clone()).await.unwrap_err();
        let direct = through.set(key.clone(), value).await.unwrap_err();
        assert_eq!(early.kind(), kind, "write-back: {early}");
        assert_eq!(direct.kind(), kind, "write-through: {direct}");
        assert_eq!(early.layer(), Some("postgres"), "names the layer: {early}");
        assert!(back.unwritten_keys().is_empty(), "nothing was queued");
        let read = back.get(&key).await;
        assert!(!matches!(read, Ok(Some(_))), "nothing was kept: {read:?}");
    }
    back.set("fine".into(), "v".into()).await.unwrap();
    back.flush().await.unwrap();
    assert!(back.unwritten_keys().is_empty());
    assert_eq!(rows(&table).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_server_refuses_is_set_aside_and_every_other_write_lands() {
    let table = unique_table("refuse_late");
    let _guard = TableGuard(table.clone());
    let layer = postgres(&table).await;
    // A rule only the server knows: no check before the write can see it.
    crate::common::admin()
        .await
        .batch_execute(&format!(
            "ALTER TABLE \"public\".\"{table}\" ADD CONSTRAINT no_poison CHECK (key <> 'poison')"
        ))
        .await
        .unwrap();
    let told: Arc<Mutex<Vec<(String, ErrorKind)>>> = Arc::default();
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new("moka", moka()))
        .layer(LayerConfig::new("postgres", layer))
        .write_policy(write_back())
        .on_refused_write({
            let told = Arc::clone(&told);
            move |key: &String, err| told.lock().unwrap().push((key.clone(), err.kind()))
        })
        .build()
        .unwrap();
    for i in 0..100 {
        if i == 50 {
            cache.set("poison".into(), "bad".into()).await.unwrap();
        }
        cache.set(format!("good:{i}"), format!("v{i}")).await.unwrap();
    }
    let flushed = tokio::time::timeout(Duration::from_secs(30), cache.flush())
        .await
        .expect("flush returns");
    let err = flushed.expect_err("flush reports the refused write");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert_eq!(rows(&table).await, 100, "every good write landed");
    let refused = cache.refused_writes();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].key, "poison");
    assert_eq!(refused[0].kind, ErrorKind::InvalidInput);
    assert_eq!(
        told.lock().unwrap().clone(),
        vec![("poison".to_string(), ErrorKind::InvalidInput)]
    );
    assert_eq!(cache.stats().write_back.unwrap().refused, 1);
    assert_eq!(cache.unwritten_keys(), vec!["poison".to_string()]);
    // Acknowledged: still served while it is set aside.
    assert_eq!(cache.get(&"poison".into()).await.unwrap(), Some("bad".into()));

    // Writes after it are not held up.
    cache.set("later".into(), "v".into()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), cache.flush())
        .await
        .expect("flush returns")
        .expect_err("the refused write is still set aside");
    assert_eq!(rows(&table).await, 101);

    // The cause fixed, a retry writes it.
    crate::common::admin()
        .await
        .batch_execute(&format!(
            "ALTER TABLE \"public\".\"{table}\" DROP CONSTRAINT no_poison"
        ))
        .await
        .unwrap();
    assert_eq!(cache.retry_refused_writes(), 1);
    cache.flush().await.unwrap();
    assert!(cache.refused_writes().is_empty());
    assert_eq!(rows(&table).await, 102);
    cache.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_is_named_by_close_and_can_be_given_up() {
    let table = unique_table("refuse_close");
    let _guard = TableGuard(table.clone());
    let layer = postgres(&table).await;
    crate::common::admin()
        .await
        .batch_execute(&format!(
            "ALTER TABLE \"public\".\"{table}\" ADD CONSTRAINT no_poison CHECK (key NOT LIKE 'poison%')"
        ))
        .await
        .unwrap();
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new("moka", moka()))
        .layer(LayerConfig::new("postgres", layer))
        .write_policy(write_back())
        .build()
        .unwrap();
    for i in 0..20 {
        cache.set(format!("good:{i}"), "v".into()).await.unwrap();
    }
    cache.set("poison:1".into(), "bad".into()).await.unwrap();
    cache.set("poison:2".into(), "bad".into()).await.unwrap();
    let _ = cache.flush().await;
    let mut refused: Vec<String> = cache.refused_writes().into_iter().map(|r| r.key).collect();
    refused.sort();
    assert_eq!(refused, ["poison:1", "poison:2"]);

    // Given up: reads answer what the store holds.
    let mut cleared = cache.clear_refused_writes().await.unwrap();
    cleared.sort();
    assert_eq!(cleared, ["poison:1", "poison:2"]);
    assert_eq!(cache.get(&"poison:1".into()).await.unwrap(), None);
    cache.flush().await.unwrap();

    // Refused again, and closed with it pending: close names exactly that key.
    cache.set("poison:3".into(), "bad".into()).await.unwrap();
    let closed = cache.close().await.expect_err("one write was not written");
    assert_eq!(cache.unwritten_keys(), vec!["poison:3".to_string()], "{closed}");
    assert_eq!(rows(&table).await, 20);
}
