//! The composer beside the raw in-memory backends, in the same criterion groups.
//!
//! Group names follow `operation/backend/variant`; inside a group, `capacitor` is the
//! composer and `raw` the hand-written equivalent on the same maps; `foyer` (in the moka
//! groups) is foyer's in-memory cache doing the same hit, a peer. `cargo xtask bench`
//! turns the medians into ratios (capacitor / raw, capacitor / peer).
//!
//! - `l1_hit/{dashmap,moka}/{1_layer,2_layers}`: single vs multi-layer composer on a hit;
//!   `l1_hit/dashmap/cooperative`: the one-layer hit with `cooperative(true)`.
//! - `miss/dashmap/{2,3,4}_layers`: a miss through every layer.
//! - `l{2,3}_hit_{promotion,no_promotion}/dashmap`: a hit in L2 / L3, promotion on / off.
//! - `write_through/dashmap/{1,2,3,4}_layers`: a set written to every layer.
//! - `l1_hit_threads/{dashmap,moka}/{1,2,4}_threads`: L1 hits on that many threads at
//!   once; the time is per round (one hit on every thread), so throughput is threads /
//!   time.
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
use capacitor_benches::{parallel, size};
use capacitor_core::testkit::poll_once;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use dashmap::DashMap;

type Dash = Arc<DashMapLayer<u64, u64>>;

fn dash_stack(n: usize, promotion: bool) -> (MultiLayer<u64, u64>, Vec<Dash>) {
    let layers: Vec<Dash> = (0..n).map(|_| Arc::new(DashMapLayer::new())).collect();
    let mut b = MultiLayer::builder().promotion(promotion);
    for (i, l) in layers.iter().enumerate() {
        b = b.layer(LayerConfig::shared(format!("l{i}"), l.clone()));
    }
    (b.build().expect("config"), layers)
}

fn moka_stack(n: usize) -> MultiLayer<u64, u64> {
    let mut b = MultiLayer::<u64, u64>::builder().layer(LayerConfig::new(
        "l1",
        MokaLayer::builder().max_capacity(10_000).build().unwrap(),
    ));
    for i in 1..n {
        b = b.layer(LayerConfig::new(format!("l{}", i + 1), DashMapLayer::new()));
    }
    b.build().unwrap()
}

fn layers_name(n: usize) -> String {
    if n == 1 {
        "1_layer".to_owned()
    } else {
        format!("{n}_layers")
    }
}

fn foyer_cache() -> foyer::Cache<u64, u64> {
    foyer::CacheBuilder::new(10_000).build()
}

/// One group: a hit of a hot key through `cache`, beside a raw dashmap get.
fn dash_hit_group(c: &mut Criterion, name: &str, cache: &MultiLayer<u64, u64>) {
    let mut g = c.benchmark_group(name);
    poll_once(cache.set(42, 7)).unwrap();
    let raw: DashMap<u64, u64> = DashMap::new();
    raw.insert(42, 7);
    g.bench_function("capacitor", |b| {
        b.iter(|| poll_once(cache.get(black_box(&42))).unwrap())
    });
    g.bench_function("raw", |b| b.iter(|| raw.get(black_box(&42)).map(|v| *v)));
    g.finish();
}

/// An L1 hit of a hot key, through a composer of one layer and of two.
fn l1_hit(c: &mut Criterion) {
    for n in [1usize, 2] {
        let (cache, _) = dash_stack(n, true);
        dash_hit_group(c, &format!("l1_hit/dashmap/{}", layers_name(n)), &cache);
    }
    // The same hit with `cooperative(true)`: each read spends tokio budget (here, outside
    // a task, the thread-local lookup that finds none).
    let cooperative: MultiLayer<u64, u64> = MultiLayer::builder()
        .layer(LayerConfig::new("l0", DashMapLayer::new()))
        .cooperative(true)
        .build()
        .expect("config");
    dash_hit_group(c, "l1_hit/dashmap/cooperative", &cooperative);

    for n in [1usize, 2] {
        let mut g = c.benchmark_group(format!("l1_hit/moka/{}", layers_name(n)));
        let cache = moka_stack(n);
        poll_once(cache.set(42, 7)).unwrap();
        let raw: moka::sync::Cache<u64, u64> = moka::sync::Cache::new(10_000);
        raw.insert(42, 7);
        let foyer = foyer_cache();
        foyer.insert(42, 7);
        g.bench_function("capacitor", |b| {
            b.iter(|| poll_once(cache.get(black_box(&42))).unwrap())
        });
        g.bench_function("raw", |b| b.iter(|| raw.get(black_box(&42))));
        g.bench_function("foyer", |b| {
            b.iter(|| foyer.get(black_box(&42)).map(|e| *e.value()))
        });
        g.finish();
    }
}

fn miss(c: &mut Criterion) {
    for n in [2usize, 3, 4] {
        let mut g = c.benchmark_group(format!("miss/dashmap/{n}_layers"));
        let (cache, _) = dash_stack(n, true);
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

/// A hit in the lowest of `depth` layers (L2 or L3), promotion on or off. Each iteration
/// reads a key that setup (not measured) removed from the layers above beforehand, on both
/// sides; with promotion on, the read copies it back into every layer above.
fn lower_hit(c: &mut Criterion, depth: usize, promotion: bool) {
    let keys = size(200_000, 20_000);
    let name = format!(
        "l{depth}_hit_{}/dashmap",
        if promotion { "promotion" } else { "no_promotion" }
    );
    let mut g = c.benchmark_group(name);
    let (cache, layers) = dash_stack(depth, promotion);
    let raw: Vec<DashMap<u64, u64>> = (0..depth).map(|_| DashMap::new()).collect();
    let (bottom, above) = (&layers[depth - 1], &layers[..depth - 1]);
    let (raw_bottom, raw_above) = (&raw[depth - 1], &raw[..depth - 1]);
    for k in 0..keys {
        poll_once(bottom.set(&k, &k, None)).unwrap();
        raw_bottom.insert(k, k);
    }
    let next = AtomicU64::new(0);
    let take = || next.fetch_add(1, Ordering::Relaxed) % keys;
    g.bench_function("capacitor", |b| {
        b.iter_batched(
            || {
                let k = take();
                for l in above {
                    poll_once(l.delete(&k)).unwrap();
                }
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
                for m in raw_above {
                    m.remove(&k);
                }
                k
            },
            |k| {
                for m in raw_above {
                    if let Some(v) = m.get(&k).map(|v| *v) {
                        return Some(v);
                    }
                }
                let v = raw_bottom.get(&k).map(|v| *v)?;
                if promotion {
                    for m in raw_above.iter().rev() {
                        m.insert(k, v);
                    }
                }
                Some(v)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn lower_hits(c: &mut Criterion) {
    for depth in [2, 3] {
        for promotion in [true, false] {
            lower_hit(c, depth, promotion);
        }
    }
}

fn write_through(c: &mut Criterion) {
    for n in [1usize, 2, 3, 4] {
        let mut g = c.benchmark_group(format!("write_through/dashmap/{n}_layers"));
        let (cache, _) = dash_stack(n, true);
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

/// L1-hit throughput on 1, 2 and 4 threads: every thread reads its own stride of 1,024
/// hot keys (so that no single key's cache line decides the result).
fn threads(c: &mut Criterion) {
    const HOT: u64 = 1_024;
    let k = |t: usize, i: u64| (i.wrapping_mul(7) + t as u64 * 131) % HOT;

    let (dash, _) = dash_stack(2, true);
    let raw_dash: DashMap<u64, u64> = DashMap::new();
    let moka = moka_stack(2);
    let raw_moka: moka::sync::Cache<u64, u64> = moka::sync::Cache::new(10_000);
    let foyer = foyer_cache();
    for key in 0..HOT {
        poll_once(dash.set(key, key)).unwrap();
        raw_dash.insert(key, key);
        poll_once(moka.set(key, key)).unwrap();
        raw_moka.insert(key, key);
        foyer.insert(key, key);
    }
    for n in [1usize, 2, 4] {
        let mut g = c.benchmark_group(format!("l1_hit_threads/dashmap/{n}_threads"));
        g.bench_function("capacitor", |b| {
            b.iter_custom(|iters| {
                parallel(n, iters, |t, i| {
                    black_box(poll_once(dash.get(&k(t, i))).unwrap());
                })
            })
        });
        g.bench_function("raw", |b| {
            b.iter_custom(|iters| {
                parallel(n, iters, |t, i| {
                    black_box(raw_dash.get(&k(t, i)).map(|v| *v));
                })
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("l1_hit_threads/moka/{n}_threads"));
        g.bench_function("capacitor", |b| {
            b.iter_custom(|iters| {
                parallel(n, iters, |t, i| {
                    black_box(poll_once(moka.get(&k(t, i))).unwrap());
                })
            })
        });
        g.bench_function("raw", |b| {
            b.iter_custom(|iters| {
                parallel(n, iters, |t, i| {
                    black_box(raw_moka.get(&k(t, i)));
                })
            })
        });
        g.bench_function("foyer", |b| {
            b.iter_custom(|iters| {
                parallel(n, iters, |t, i| {
                    black_box(foyer.get(&k(t, i)).map(|e| *e.value()));
                })
            })
        });
        g.finish();
    }
}

criterion_group!(benches, l1_hit, miss, lower_hits, write_through, threads);
criterion_main!(benches);
