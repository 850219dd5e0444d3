//! Write-back, its drain, and single-flight loaders, each beside what a user writes by
//! hand, in the same criterion groups (`capacitor` vs `raw`).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capacitor::memory::{DashMapLayer, MokaLayer};
use capacitor::sled::{FlushPolicy, SledLayer};
use capacitor::{FailSafe, LayerConfig, LoadOptions, Loaded, MultiLayer, SetOptions, WriteBack, WritePolicy};
use capacitor_benches::size;
use capacitor_core::testkit::poll_once;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use dashmap::DashMap;

/// A write-back `set` (L1 write + buffer insert) beside a raw L1 insert. The drain runs
/// on a background runtime meanwhile, as in production.
fn write_back_set(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let cache = MultiLayer::<u64, u64>::builder()
        .write_policy(WritePolicy::Back(
            WriteBack::new().queue_bound(100_000).batch_size(1_000),
        ))
        .layer(LayerConfig::new("l1", DashMapLayer::new()))
        .layer(LayerConfig::new("l2", DashMapLayer::new()))
        .build()
        .unwrap();
    let raw: DashMap<u64, u64> = DashMap::new();
    let next = AtomicU64::new(0);
    let key = || next.fetch_add(1, Ordering::Relaxed) % 10_000;
    let mut g = c.benchmark_group("write_back_set/dashmap");
    g.bench_function("capacitor", |b| {
        b.iter(|| poll_once(cache.set(key(), black_box(7))).unwrap())
    });
    g.bench_function("raw", |b| b.iter(|| raw.insert(key(), black_box(7))));
    g.finish();
    rt.block_on(cache.close()).unwrap();

    // The usual L1: moka.
    let cache = MultiLayer::<u64, u64>::builder()
        .write_policy(WritePolicy::Back(
            WriteBack::new().queue_bound(100_000).batch_size(1_000),
        ))
        .layer(LayerConfig::new(
            "l1",
            MokaLayer::builder().max_capacity(100_000).build().unwrap(),
        ))
        .layer(LayerConfig::new("l2", DashMapLayer::new()))
        .build()
        .unwrap();
    let raw: moka::sync::Cache<u64, u64> = moka::sync::Cache::new(100_000);
    let mut g = c.benchmark_group("write_back_set/moka");
    g.bench_function("capacitor", |b| {
        b.iter(|| poll_once(cache.set(key(), black_box(7))).unwrap())
    });
    g.bench_function("raw", |b| b.iter(|| raw.insert(key(), black_box(7))));
    g.finish();
    rt.block_on(cache.close()).unwrap();
}

/// Writing 10,000 keys (2,000 in a quick run) to sled: through write-back (set all, then
/// flush: the drain writes sled batches) beside as many sequential raw sled inserts.
fn write_back_drain(c: &mut Criterion) {
    let n = size(10_000, 2_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("drain")).unwrap();
    let cache = rt.block_on(async {
        MultiLayer::<String, Vec<u8>>::builder()
            .write_policy(WritePolicy::Back(
                WriteBack::new().queue_bound(2 * n as usize).batch_size(1_000),
            ))
            .layer(LayerConfig::new("l1", DashMapLayer::new()))
            .layer(LayerConfig::new(
                "sled",
                SledLayer::builder()
                    .db(db.clone())
                    .tree("capacitor")
                    .flush_policy(FlushPolicy::Manual)
                    .sweeper(false) // no sweep pass mid-measurement
                    .build()
                    .unwrap(),
            ))
            .build()
            .unwrap()
    });
    let raw = db.open_tree("raw").unwrap();
    let value = vec![7u8; 100];
    let mut g = c.benchmark_group(format!("write_back_drain/sled/{n}_keys"));
    g.sample_size(10);
    g.bench_function("capacitor", |b| {
        b.to_async(&rt).iter(|| async {
            for i in 0..n {
                cache.set(format!("k{i}"), value.clone()).await.unwrap();
            }
            cache.flush().await.unwrap();
        })
    });
    g.bench_function("raw", |b| {
        b.iter(|| {
            for i in 0..n {
                raw.insert(format!("k{i}").as_bytes(), value.as_slice()).unwrap();
            }
        })
    });
    g.finish();
    rt.block_on(cache.close()).unwrap();
}

/// A stand-in for a database behind a pool of 4 connections: each query holds one for
/// 1 ms.
#[derive(Clone)]
struct Database(Arc<tokio::sync::Semaphore>, Arc<AtomicU64>);

impl Database {
    async fn query(&self, key: u64) -> u64 {
        let _conn = self.0.acquire().await.unwrap();
        self.1.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1)).await;
        key
    }
}

/// 64 concurrent callers of one cold key: capacitor's single flight (one query) beside
/// the hand-written "check, load, backfill" that stampedes (64 queries through a pool of
/// 4 connections). The query counts are printed after the group.
fn get_or_load(c: &mut Criterion) {
    const CALLERS: usize = 64;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let db = Database(
        Arc::new(tokio::sync::Semaphore::new(4)),
        Arc::new(AtomicU64::new(0)),
    );
    let raw_db = Database(
        Arc::new(tokio::sync::Semaphore::new(4)),
        Arc::new(AtomicU64::new(0)),
    );
    let cache = MultiLayer::<u64, u64>::builder()
        .layer(LayerConfig::new("l1", DashMapLayer::new()))
        .build()
        .unwrap();
    let raw: Arc<DashMap<u64, u64>> = Arc::new(DashMap::new());
    let (mut ours, mut theirs) = (0u64, 0u64);
    let mut g = c.benchmark_group("get_or_load/64_callers");
    if capacitor_benches::quick() {
        // About 35 ms an iteration on the raw side: criterion's minimum of 10 samples.
        g.sample_size(10);
    }
    g.bench_function("capacitor", |b| {
        b.to_async(&rt).iter_batched(
            || next.fetch_add(1, Ordering::Relaxed),
            |key| {
                let (cache, db) = (cache.clone(), db.clone());
                ours += 1;
                async move {
                    let tasks: Vec<_> = (0..CALLERS)
                        .map(|_| {
                            let (cache, db) = (cache.clone(), db.clone());
                            tokio::spawn(async move {
                                cache
                                    .get_or_load(&key, move || async move { db.query(key).await })
                                    .await
                                    .unwrap()
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter_batched(
            || next.fetch_add(1, Ordering::Relaxed),
            |key| {
                let (raw, db) = (raw.clone(), raw_db.clone());
                theirs += 1;
                async move {
                    let tasks: Vec<_> = (0..CALLERS)
                        .map(|_| {
                            let (raw, db) = (raw.clone(), db.clone());
                            tokio::spawn(async move {
                                if let Some(v) = raw.get(&key).map(|v| *v) {
                                    return v;
                                }
                                let v = db.query(key).await;
                                raw.insert(key, v);
                                v
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
    println!(
        "get_or_load/64_callers: capacitor {:.2} queries per cold key, raw {:.2}",
        db.1.load(Ordering::Relaxed) as f64 / ours.max(1) as f64,
        raw_db.1.load(Ordering::Relaxed) as f64 / theirs.max(1) as f64
    );
}

/// `get_or_load` on its own: a hit (L1 dashmap), a miss whose loader answers at once (the
/// flight's task, the fill), and a stale answer at a 1 ms soft timeout over a 20 ms
/// origin; `raw` is the hand-written code: `get`, else load and insert, and for the
/// timeout `tokio::time::timeout` around the origin with a map of last known values.
fn get_or_load_paths(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let cache = MultiLayer::<u64, u64>::builder()
        .layer(LayerConfig::new("l1", DashMapLayer::new()))
        .build()
        .unwrap();
    let raw: Arc<DashMap<u64, u64>> = Arc::new(DashMap::new());
    for k in 0..1_000 {
        poll_once(cache.set(k, k)).unwrap();
        raw.insert(k, k);
    }
    let next = AtomicU64::new(0);
    let hot = || next.fetch_add(1, Ordering::Relaxed) % 1_000;
    let mut g = c.benchmark_group("get_or_load_hit/dashmap");
    g.bench_function("capacitor", |b| {
        b.iter(|| poll_once(cache.get_or_load(&black_box(hot()), || async { 0 })).unwrap())
    });
    g.bench_function("raw", |b| {
        b.iter(|| {
            let k = black_box(hot());
            match raw.get(&k).map(|v| *v) {
                Some(v) => v,
                None => *raw.entry(k).or_insert(0),
            }
        })
    });
    g.finish();

    let cold = AtomicU64::new(1_000_000);
    let mut g = c.benchmark_group("get_or_load_miss/dashmap");
    g.bench_function("capacitor", |b| {
        b.to_async(&rt).iter(|| async {
            let k = cold.fetch_add(1, Ordering::Relaxed);
            cache.get_or_load(&k, move || async move { k }).await.unwrap()
        })
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter(|| async {
            let k = cold.fetch_add(1, Ordering::Relaxed);
            if let Some(v) = raw.get(&k).map(|v| *v) {
                return v;
            }
            let v = async { k }.await;
            raw.insert(k, v);
            v
        })
    });
    g.finish();

    // A copy past its expiry: the fail-safe keeps it; the loader's answer is not cached,
    // so that every iteration times out.
    let stale = MultiLayer::<u64, u64>::builder()
        .layer(LayerConfig::new("l1", DashMapLayer::new()))
        .fail_safe(FailSafe::new(Duration::from_secs(3600)))
        .load_options(
            LoadOptions::new()
                .soft_timeout(Duration::from_millis(1))
                .hard_timeout(Duration::from_secs(1)),
        )
        .build()
        .unwrap();
    rt.block_on(stale.set_with(7, 7, SetOptions::new().ttl(Duration::from_millis(1))))
        .unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let options = stale.load_options();
    let last_known: Arc<DashMap<u64, u64>> = Arc::new(DashMap::new());
    last_known.insert(7, 7);
    let mut g = c.benchmark_group("get_or_load_stale_on_timeout/dashmap");
    g.bench_function("capacitor", |b| {
        b.to_async(&rt).iter(|| async {
            stale
                .get_or_load_with(&7, &options, || async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, std::io::Error>(Loaded::value(8).uncached())
                })
                .await
                .unwrap()
        })
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter(|| async {
            let origin = async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                8u64
            };
            match tokio::time::timeout(Duration::from_millis(1), origin).await {
                Ok(v) => v,
                Err(_) => last_known.get(&7).map(|v| *v).unwrap_or_default(),
            }
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    write_back_set,
    write_back_drain,
    get_or_load,
    get_or_load_paths
);
criterion_main!(benches);
