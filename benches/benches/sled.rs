//! memory + sled beside raw sled and raw moka, in the same criterion groups.
//!
//! The raw side is what a user writes by hand: `tree.get`, postcard-decode, `moka.insert`
//! for a hit with backfill; postcard-encode, `tree.insert`, `moka.insert` for a write.
//! Both sides use the same sled database (different trees) and the same flush behaviour
//! (sled's background flusher; the layer itself adds none: `FlushPolicy::Manual`).
//!
//! `sled_hit/moka_over_sled` promotes the hit into moka; `sled_hit_no_promotion/…` is the
//! same read through a composer built with `promotion(false)` (raw: no moka insert).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use capacitor::memory::MokaLayer;
use capacitor::sled::{FlushPolicy, SledLayer};
use capacitor::{Layer, LayerConfig, MultiLayer};
use capacitor_benches::{decode, encode, key, size, value};
use capacitor_core::testkit::poll_once;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

fn sled_benches(c: &mut Criterion) {
    let keys = size(50_000, 5_000);
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("bench")).unwrap();
    let layer = std::sync::Arc::new(
        SledLayer::builder()
            .db(db.clone())
            .tree("capacitor")
            .flush_policy(FlushPolicy::Manual)
            .sweeper(false) // no sweep pass mid-measurement
            .build::<String, String>()
            .unwrap(),
    );
    let l1 = std::sync::Arc::new(
        MokaLayer::builder()
            .max_capacity(1_000_000)
            .build::<String, String>()
            .unwrap(),
    );
    let cache = MultiLayer::builder()
        .layer(LayerConfig::shared("moka", l1.clone()))
        .layer(LayerConfig::shared("sled", layer.clone()))
        .build()
        .unwrap();
    let raw_tree = db.open_tree("raw").unwrap();
    let raw_moka: moka::sync::Cache<String, String> = moka::sync::Cache::new(1_000_000);
    for i in 0..keys {
        poll_once(layer.set(&key(i), &value(i), None)).unwrap();
        raw_tree.insert(key(i).as_bytes(), encode(&value(i))).unwrap();
    }

    // A sled hit promoted into moka: setup (not measured) removes the key from L1.
    let mut g = c.benchmark_group("sled_hit/moka_over_sled");
    let next = AtomicU64::new(0);
    let take = || next.fetch_add(1, Ordering::Relaxed) % keys;
    g.bench_function("capacitor", |b| {
        b.iter_batched(
            || {
                let k = key(take());
                poll_once(l1.delete(&k)).unwrap();
                k
            },
            |k| poll_once(cache.get(&k)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("raw", |b| {
        b.iter_batched(
            || {
                let k = key(take());
                raw_moka.invalidate(&k);
                k
            },
            |k| {
                if let Some(v) = raw_moka.get(&k) {
                    return Some(v);
                }
                let v = decode(&raw_tree.get(k.as_bytes()).unwrap()?);
                raw_moka.insert(k, v.clone());
                Some(v)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // The same sled hit, promotion off: nothing is copied into moka (which stays empty).
    let no_promotion = MultiLayer::builder()
        .promotion(false)
        .layer(LayerConfig::new(
            "moka",
            MokaLayer::builder()
                .max_capacity(1_000_000)
                .build::<String, String>()
                .unwrap(),
        ))
        .layer(LayerConfig::shared("sled", layer.clone()))
        .build()
        .unwrap();
    let mut g = c.benchmark_group("sled_hit_no_promotion/moka_over_sled");
    g.bench_function("capacitor", |b| {
        b.iter_batched(
            || key(take()),
            |k| poll_once(no_promotion.get(&k)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    let empty_moka: moka::sync::Cache<String, String> = moka::sync::Cache::new(1_000_000);
    g.bench_function("raw", |b| {
        b.iter_batched(
            || key(take()),
            |k| {
                if let Some(v) = empty_moka.get(&k) {
                    return Some(v);
                }
                Some(decode(&raw_tree.get(k.as_bytes()).unwrap()?))
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("sled_write_through/moka_over_sled");
    g.bench_function("capacitor", |b| {
        b.iter_batched(
            || (key(take()), value(7)),
            |(k, v)| poll_once(cache.set(k, v)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("raw", |b| {
        b.iter_batched(
            || (key(take()), value(7)),
            |(k, v)| {
                raw_tree.insert(k.as_bytes(), encode(&v)).unwrap();
                raw_moka.insert(k, black_box(v));
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
    poll_once(cache.close()).unwrap();
}

criterion_group!(benches, sled_benches);
criterion_main!(benches);
