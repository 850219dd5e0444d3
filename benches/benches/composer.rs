//! The composer beside the raw in-memory backends, in the same criterion groups.
//!
//! Group names follow `operation/backend/variant`; inside a group, `capacitor` is the
//! composer and `raw` the hand-written equivalent on the same maps. `cargo xtask bench`
//! turns the medians into ratios (capacitor / raw).
//!
//! Futures are polled once with a no-op waker, inlined into the measured closure as an
//! `.await` inlines the poll into its caller: every path measured here completes without
//! waiting, and this keeps an executor's own cost out of both sides.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use capacitor::memory::{DashMapLayer, MokaLayer};
use capacitor::{Layer, LayerConfig, MultiLayer};
use capacitor_core::testkit::poll_once;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use dashmap::DashMap;

type Dash = Arc<DashMapLayer<u64, u64>>;

fn dash_stack(n: usize) -> (MultiLayer<u64, u64>, Vec<Dash>) {
    let layers: Vec<Dash> = (0..n).map(|_| Arc::new(DashMapLayer::new())).collect();
    let mut b = MultiLayer::builder();
    for (i, l) in layers.iter().enumerate() {
        b = b.layer(LayerConfig::shared(format!("l{i}"), l.clone()));
    }
    (b.build().expect("config"), layers)
}

fn l1_hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("l1_hit/dashmap");
    let (cache, _) = dash_stack(2);
    poll_once(cache.set(42, 7)).unwrap();
    let raw: DashMap<u64, u64> = DashMap::new();
    raw.insert(42, 7);
    g.bench_function("capacitor", |b| {
        b.iter(|| poll_once(cache.get(black_box(&42))).unwrap())
    });
    g.bench_function("raw", |b| b.iter(|| raw.get(black_box(&42)).map(|v| *v)));
    g.finish();

    let mut g = c.benchmark_group("l1_hit/moka");
    let cache = MultiLayer::<u64, u64>::builder()
        .layer(LayerConfig::new(
            "l1",
            MokaLayer::builder().max_capacity(10_000).build().unwrap(),
        ))
        .layer(LayerConfig::new("l2", DashMapLayer::new()))
        .build()
        .unwrap();
    poll_once(cache.set(42, 7)).unwrap();
    let raw: moka::sync::Cache<u64, u64> = moka::sync::Cache::new(10_000);
    raw.insert(42, 7);
    g.bench_function("capacitor", |b| {
        b.iter(|| poll_once(cache.get(black_box(&42))).unwrap())
    });
    g.bench_function("raw", |b| b.iter(|| raw.get(black_box(&42))));
    g.finish();
}

fn miss(c: &mut Criterion) {
    for n in [2usize, 3, 4] {
        let mut g = c.benchmark_group(format!("miss/dashmap/{n}_layers"));
        let (cache, _) = dash_stack(n);
        let raw: Vec<DashMap<u64, u64>> = (0..n).map(|_| DashMap::new()).collect();
        g.bench_function("capacitor", |b| {
            b.iter(|| poll_once(cache.get(black_box(&42))).unwrap())
        });
        g.bench_function("raw", |b| {
            b.iter(|| {
                for m in &raw {
                    if let Some(v) = m.get(black_box(&42)) {
                        return Some(*v);
                    }
                }
                None
            })
        });
        g.finish();
    }
}

/// An L2 hit that promotes into L1. Each iteration reads a key that setup (not measured)
/// removed from L1 beforehand, on both sides.
fn l2_hit_promotion(c: &mut Criterion) {
    const KEYS: u64 = 200_000;
    let mut g = c.benchmark_group("l2_hit_promotion/dashmap");
    let (cache, layers) = dash_stack(2);
    let raw_l1: DashMap<u64, u64> = DashMap::new();
    let raw_l2: DashMap<u64, u64> = DashMap::new();
    for k in 0..KEYS {
        poll_once(layers[1].set(&k, &k, None)).unwrap();
        raw_l2.insert(k, k);
    }
    let next = AtomicU64::new(0);
    let take = || next.fetch_add(1, Ordering::Relaxed) % KEYS;
    g.bench_function("capacitor", |b| {
        b.iter_batched(
            || {
                let k = take();
                poll_once(layers[0].delete(&k)).unwrap();
                k
            },
            |k| poll_once(cache.get(&k)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("raw", |b| {
        b.iter_batched(
            || {
                let k = take();
                raw_l1.remove(&k);
                k
            },
            |k| {
                if let Some(v) = raw_l1.get(&k).map(|v| *v) {
                    return Some(v);
                }
                let v = raw_l2.get(&k).map(|v| *v)?;
                raw_l1.insert(k, v);
                Some(v)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn write_through(c: &mut Criterion) {
    for n in [1usize, 2, 3, 4] {
        let mut g = c.benchmark_group(format!("write_through/dashmap/{n}_layers"));
        let (cache, _) = dash_stack(n);
        let raw: Vec<DashMap<u64, u64>> = (0..n).map(|_| DashMap::new()).collect();
        g.bench_function("capacitor", |b| {
            b.iter(|| poll_once(cache.set(black_box(42), black_box(7))).unwrap())
        });
        g.bench_function("raw", |b| {
            b.iter(|| {
                for m in raw.iter().rev() {
                    m.insert(black_box(42), black_box(7));
                }
            })
        });
        g.finish();
    }
}

criterion_group!(benches, l1_hit, miss, l2_hit_promotion, write_through);
criterion_main!(benches);
