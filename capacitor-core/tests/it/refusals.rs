//! Write-back with a store that refuses some writes outright (as a constraint only the
//! server knows would): the refused writes are set aside without holding up the rest,
//! without taking the room of writes still to drain, and without keeping the drain task
//! (and the layers) alive after close.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use capacitor_core::testkit::{within, MapLayer};
use capacitor_core::{
    Entry, Error, ErrorKind, Layer, LayerConfig, MultiLayer, Operation, Result, WriteBack, WritePolicy,
};

const LIMIT: Duration = Duration::from_secs(10);

/// A map that refuses, with `InvalidInput`, every write of a key starting with `poison`.
struct Refusing(MapLayer<String, u32>);

fn refused(key: &str) -> bool {
    key.starts_with("poison")
}

#[async_trait]
impl Layer<String, u32> for Refusing {
    fn name(&self) -> &str {
        "refusing"
    }
    async fn get(&self, key: &String) -> Result<Option<Entry<u32>>> {
        self.0.get(key).await
    }
    async fn set(&self, key: &String, value: &u32, ttl: Option<Duration>) -> Result<()> {
        if refused(key) {
            return Err(Error::new(ErrorKind::InvalidInput, Operation::Set, "refused"));
        }
        self.0.set(key, value, ttl).await
    }
    async fn set_many(&self, entries: &[(String, u32)], ttl: Option<Duration>) -> Result<()> {
        // All or nothing, as one statement would be.
        if entries.iter().any(|(k, _)| refused(k)) {
            return Err(Error::new(ErrorKind::InvalidInput, Operation::SetMany, "refused"));
        }
        self.0.set_many(entries, ttl).await
    }
    async fn delete(&self, key: &String) -> Result<bool> {
        self.0.delete(key).await
    }
    async fn close(&self) -> Result<()> {
        self.0.close().await
    }
}

fn cache(store: Arc<Refusing>, queue_bound: usize) -> MultiLayer<String, u32> {
    MultiLayer::builder()
        .layer(LayerConfig::new("l1", MapLayer::new()))
        .layer(LayerConfig::shared("store", store as Arc<dyn Layer<String, u32>>))
        .write_policy(WritePolicy::Back(
            WriteBack::new()
                .queue_bound(queue_bound)
                .batch_size(8)
                .max_delay(Duration::from_millis(5))
                .enqueue_timeout(Duration::from_millis(500)),
        ))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_set_aside_take_no_room_from_the_writes_still_to_drain() {
    let store = Arc::new(Refusing(MapLayer::new()));
    let cache = cache(store.clone(), 4);
    for i in 0..6 {
        cache.set(format!("poison:{i}"), i).await.unwrap();
        let _ = within(LIMIT, cache.flush()).await;
    }
    assert_eq!(cache.refused_writes().len(), 6, "more set aside than queue_bound");
    for i in 0..20 {
        within(LIMIT, cache.set(format!("good:{i}"), i))
            .await
            .expect("a writer is not held up by writes set aside");
    }
    within(LIMIT, cache.flush())
        .await
        .expect_err("six still set aside");
    for i in 0..20 {
        assert_eq!(store.0.raw_entry(&format!("good:{i}")).map(|e| e.value), Some(i));
    }
    assert_eq!(cache.stats().write_back.unwrap().refused, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_composer_with_writes_set_aside_is_freed() {
    let store = Arc::new(Refusing(MapLayer::new()));
    let cache = cache(store.clone(), 100);
    cache.set("good".into(), 1).await.unwrap();
    cache.set("poison".into(), 2).await.unwrap();
    let _ = within(LIMIT, cache.flush()).await;
    assert_eq!(cache.refused_writes().len(), 1);
    within(LIMIT, cache.close())
        .await
        .expect_err("one write was not written");
    assert_eq!(cache.unwritten_keys(), vec!["poison".to_string()]);
    drop(cache);
    // The drain task ends, dropping the composer and with it its share of the store.
    for _ in 0..200 {
        if Arc::strong_count(&store) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the drain task still holds the composer after close");
}
