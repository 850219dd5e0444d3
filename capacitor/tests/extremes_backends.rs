//! Extreme values for every size and duration option of the Redis, PostgreSQL and sled
//! builders, one option at a time (0, 1, the type's maximum): a typed error at build
//! (or connect), or a layer that works, never a panic or a hang. Against the real
//! servers; PostgreSQL cases each use their own table and drop it.

#![cfg(all(feature = "redis", feature = "postgres", feature = "sled"))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::time::Duration;

use capacitor::postgres::{PostgresLayer, PostgresLayerBuilder};
use capacitor::redis::{RedisBus, RedisLayer, RedisLayerBuilder};
use capacitor::sled::{SledLayer, SledLayerBuilder};
use capacitor::{Error, ErrorKind, Layer};

/// Panics anywhere in the process, background tasks included (tokio keeps a task's panic
/// to itself): counted by a hook installed on first use.
fn panics() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Once;
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            COUNT.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
    COUNT.load(Ordering::SeqCst)
}

const DURATIONS: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_nanos(1),
    Duration::from_secs(u64::MAX / 2),
    Duration::MAX,
];
const SIZES: [usize; 4] = [0, 1, 1 << 40, usize::MAX];
const LIMIT: Duration = Duration::from_secs(30);

#[path = "it/common.rs"]
mod common;
use common::{postgres_url, redis_url};

fn unique(what: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "ext_{what}_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A typed error is fine; what matters is that nothing panicked or hung.
fn typed(what: &str, e: &Error) {
    assert!(
        matches!(
            e.kind(),
            ErrorKind::Config
                | ErrorKind::InvalidInput
                | ErrorKind::ValueTooLarge
                | ErrorKind::Timeout
                | ErrorKind::Unavailable
        ),
        "{what}: unexpected error kind {:?}: {e}",
        e.kind()
    );
}

/// set, get, delete, close on a layer that built.
async fn exercise(what: &str, layer: &dyn Layer<String, String>) {
    let key = unique("key");
    let ops = async {
        layer
            .set(&key, &"v".to_string(), Some(Duration::from_secs(60)))
            .await?;
        layer.get(&key).await?;
        layer.delete(&key).await?;
        Ok::<(), Error>(())
    };
    match tokio::time::timeout(LIMIT, ops).await {
        Err(_) => panic!("{what}: operations hung"),
        Ok(Err(e)) => typed(what, &e),
        Ok(Ok(())) => {}
    }
    let _ = tokio::time::timeout(LIMIT, layer.close()).await;
}

async fn redis_case(what: &str, tweak: impl FnOnce(RedisLayerBuilder) -> RedisLayerBuilder) {
    let builder = tweak(
        RedisLayer::builder()
            .url(redis_url())
            .prefix(format!("{}:", unique("r"))),
    );
    match builder.build::<String, String>() {
        Err(e) => typed(what, &e),
        Ok(layer) => {
            match tokio::time::timeout(LIMIT, layer.connect()).await {
                Err(_) => panic!("{what}: connect hung"),
                Ok(Err(e)) => typed(what, &e),
                Ok(Ok(())) => {}
            }
            exercise(what, &layer).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_builders_take_extreme_values() {
    let before = panics();
    for d in DURATIONS {
        redis_case(&format!("command_timeout({d:?})"), |b| b.command_timeout(d)).await;
        redis_case(&format!("connect_timeout({d:?})"), |b| b.connect_timeout(d)).await;
        let bus = RedisBus::builder()
            .url(redis_url())
            .command_timeout(d)
            .connect_timeout(d)
            .build();
        if let Err(e) = &bus {
            typed(&format!("bus timeouts {d:?}"), e);
        }
    }
    for n in SIZES {
        redis_case(&format!("pool_size({n})"), |b| b.pool_size(n)).await;
        redis_case(&format!("max_value_bytes({n})"), |b| b.max_value_bytes(n)).await;
    }
    for n in [0, 1, u32::MAX] {
        redis_case(&format!("scan_count({n})"), |b| b.scan_count(n)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // background tasks tick
    assert_eq!(panics(), before, "a panic (see above)");
}

async fn postgres_case(what: &str, tweak: impl FnOnce(PostgresLayerBuilder) -> PostgresLayerBuilder) {
    let table = unique("p");
    let builder = tweak(PostgresLayer::builder().url(postgres_url()).table(&table));
    match tokio::time::timeout(LIMIT, builder.build::<String, String>()).await {
        Err(_) => panic!("{what}: build hung"),
        Ok(Err(e)) => typed(what, &e),
        Ok(Ok(layer)) => {
            exercise(what, &layer).await;
            let cleanup = PostgresLayer::builder()
                .url(postgres_url())
                .table(&table)
                .build::<String, String>();
            if let Ok(Ok(cleanup)) = tokio::time::timeout(LIMIT, cleanup).await {
                if let Ok(client) = cleanup.pool().get().await {
                    let _ = client
                        .batch_execute(&format!("DROP TABLE IF EXISTS {}", cleanup.table()))
                        .await;
                }
                let _ = cleanup.close().await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_builders_take_extreme_values() {
    let before = panics();
    for d in DURATIONS {
        postgres_case(&format!("wait_timeout({d:?})"), |b| b.wait_timeout(d)).await;
        postgres_case(&format!("create_timeout({d:?})"), |b| b.create_timeout(d)).await;
        postgres_case(&format!("recycle_timeout({d:?})"), |b| b.recycle_timeout(d)).await;
        postgres_case(&format!("statement_timeout({d:?})"), |b| b.statement_timeout(d)).await;
        postgres_case(&format!("operation_timeout({d:?})"), |b| b.operation_timeout(d)).await;
        postgres_case(&format!("fence_margin({d:?})"), |b| b.fence_margin(d)).await;
        postgres_case(&format!("sweep_interval({d:?})"), |b| b.sweep_interval(d)).await;
    }
    for n in SIZES {
        postgres_case(&format!("pool_size({n})"), |b| b.pool_size(n)).await;
        postgres_case(&format!("max_value_bytes({n})"), |b| b.max_value_bytes(n)).await;
        postgres_case(&format!("sweep_batch({n})"), |b| b.sweep_batch(n)).await;
        postgres_case(&format!("scan_page_size({n})"), |b| b.scan_page_size(n)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // background tasks tick
    assert_eq!(panics(), before, "a panic (see above)");
}

async fn sled_case(what: &str, tweak: impl FnOnce(SledLayerBuilder) -> SledLayerBuilder) {
    let dir = tempfile::tempdir().unwrap();
    let builder = tweak(SledLayer::builder().path(dir.path().join("db")));
    match builder.build::<String, String>() {
        Err(e) => typed(what, &e),
        Ok(layer) => exercise(what, &layer).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_builders_take_extreme_values() {
    let before = panics();
    for d in DURATIONS {
        sled_case(&format!("sweep_interval({d:?})"), |b| b.sweep_interval(d)).await;
        sled_case(&format!("lock_wait({d:?})"), |b| b.lock_wait(d)).await;
    }
    for n in SIZES {
        sled_case(&format!("max_value_bytes({n})"), |b| b.max_value_bytes(n)).await;
        sled_case(&format!("sweep_batch({n})"), |b| b.sweep_batch(n)).await;
    }
    for n in [0, 1, u64::MAX] {
        sled_case(&format!("cache_capacity({n})"), |b| b.cache_capacity(n)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // background tasks tick
    assert_eq!(panics(), before, "a panic (see above)");
}
