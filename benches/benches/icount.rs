//! Instruction counts of the in-memory paths, each beside its raw counterpart: callgrind
//! through gungraun, one execution of each operation, counted from the entry to the exit
//! of the benchmark function (setup, the warm-up call and drops are outside it).
//!
//! Each criterion group of the `composer` and `writeback` suites measured here has two
//! functions named after it, `/` replaced by `_`, ending in `_capacitor` or `_raw`:
//! `l1_hit/dashmap/1_layer` is `l1_hit_dashmap_1_layer_capacitor` and
//! `l1_hit_dashmap_1_layer_raw`; `cargo xtask bench` puts the counts in those rows. The one
//! row without a criterion group, `delete/dashmap/2_layers`, is reported under that name.
//!
//! The composer's futures are polled once with a no-op waker (`poll_once`), as in the
//! criterion suites: every path here completes on the first poll. The write-back cache is
//! built inside a current-thread tokio runtime that is entered but never driven, so its
//! drain task does not run during the count.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use capacitor::memory::{DashMapLayer, MokaLayer};
use capacitor::{Layer, LayerConfig, MultiLayer, WriteBack, WritePolicy};
use capacitor_core::testkit::poll_once;
use dashmap::DashMap;
use gungraun::{library_benchmark, library_benchmark_group, main, Callgrind, LibraryBenchmarkConfig};

type Cache = MultiLayer<u64, u64>;
type Dash = Arc<DashMapLayer<u64, u64>>;

/// Keys every map holds besides 42, on both sides: each of dashmap's shards then has a
/// table with room to spare, so that no insert measured here allocates or grows one
/// (with a few keys, whether 42's shard had a table yet would depend on the random hash
/// seed, and the count with it).
const BACKGROUND: std::ops::Range<u64> = 1_000..2_000;

fn leak<T>(v: T) -> &'static T {
    Box::leak(Box::new(v))
}

fn dash_stack(n: usize) -> (Cache, Vec<Dash>) {
    let layers: Vec<Dash> = (0..n).map(|_| Arc::new(DashMapLayer::new())).collect();
    let mut b = MultiLayer::builder().promotion(true);
    for (i, l) in layers.iter().enumerate() {
        b = b.layer(LayerConfig::shared(format!("l{i}"), l.clone()));
        for k in BACKGROUND {
            poll_once(l.set(&k, &k, None)).unwrap();
        }
    }
    (b.build().expect("config"), layers)
}

fn moka_stack(n: usize) -> Cache {
    let mut b = MultiLayer::<u64, u64>::builder().layer(LayerConfig::new(
        "l1",
        MokaLayer::builder().max_capacity(10_000).build().unwrap(),
    ));
    for i in 1..n {
        b = b.layer(LayerConfig::new(format!("l{}", i + 1), DashMapLayer::new()));
    }
    let cache = b.build().unwrap();
    for k in BACKGROUND {
        poll_once(cache.set(k, k)).unwrap();
    }
    cache
}

fn raw_map() -> DashMap<u64, u64> {
    BACKGROUND.map(|k| (k, k)).collect()
}

fn raw_maps(n: usize) -> Vec<DashMap<u64, u64>> {
    (0..n).map(|_| raw_map()).collect()
}

// Setups: each returns what the measured function uses, with key 42 in place (a write
// overwrites it, as in the criterion suites after their first iteration) and a warm-up
// call made, so that lazy initialisation is not counted.

fn dash_hit(n: usize) -> &'static Cache {
    let (cache, _) = dash_stack(n);
    poll_once(cache.set(42, 7)).unwrap();
    poll_once(cache.get(&42)).unwrap();
    leak(cache)
}

fn raw_dash_hit() -> &'static DashMap<u64, u64> {
    let raw = raw_map();
    raw.insert(42, 7);
    black_box(raw.get(&42).map(|v| *v));
    leak(raw)
}

fn moka_hit(n: usize) -> &'static Cache {
    let cache = moka_stack(n);
    poll_once(cache.set(42, 7)).unwrap();
    poll_once(cache.get(&42)).unwrap();
    leak(cache)
}

fn raw_moka_hit() -> &'static moka::sync::Cache<u64, u64> {
    let raw = moka::sync::Cache::new(10_000);
    for k in BACKGROUND {
        raw.insert(k, k);
    }
    raw.insert(42, 7);
    black_box(raw.get(&42));
    leak(raw)
}

fn dash_empty(n: usize) -> &'static Cache {
    let (cache, _) = dash_stack(n);
    poll_once(cache.get(&42)).unwrap();
    leak(cache)
}

fn raw_empty(n: usize) -> &'static [DashMap<u64, u64>] {
    let raw = raw_maps(n);
    for m in &raw {
        black_box(m.get(&42).map(|v| *v));
    }
    Box::leak(raw.into_boxed_slice())
}

/// Two layers, key 42 in L2 only: the get hits L2 and promotes into L1.
fn dash_l2_only() -> &'static Cache {
    let (cache, layers) = dash_stack(2);
    poll_once(layers[1].set(&41, &41, None)).unwrap();
    poll_once(cache.get(&41)).unwrap();
    poll_once(layers[1].set(&42, &7, None)).unwrap();
    leak(cache)
}

fn raw_l2_only() -> &'static [DashMap<u64, u64>] {
    let raw = raw_maps(2);
    raw[1].insert(41, 41);
    raw[0].insert(41, 41);
    raw[1].insert(42, 7);
    Box::leak(raw.into_boxed_slice())
}

fn dash_written(n: usize) -> &'static Cache {
    let (cache, _) = dash_stack(n);
    poll_once(cache.set(42, 7)).unwrap();
    leak(cache)
}

fn raw_written(n: usize) -> &'static [DashMap<u64, u64>] {
    let raw = raw_maps(n);
    for m in raw.iter().rev() {
        m.insert(42, 7);
    }
    Box::leak(raw.into_boxed_slice())
}

/// A write-back cache (dashmap over dashmap) built in an entered current-thread runtime
/// that is never driven: the drain task is spawned but does not run.
fn write_back() -> &'static Cache {
    let rt = leak(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
    std::mem::forget(rt.enter());
    let cache = MultiLayer::<u64, u64>::builder()
        .write_policy(WritePolicy::Back(
            WriteBack::new().queue_bound(100_000).batch_size(1_000),
        ))
        .layer(LayerConfig::new("l1", DashMapLayer::new()))
        .layer(LayerConfig::new("l2", DashMapLayer::new()))
        .build()
        .unwrap();
    for k in BACKGROUND {
        poll_once(cache.set(k, k)).unwrap();
    }
    poll_once(cache.set(42, 7)).unwrap();
    leak(cache)
}

fn raw_one() -> &'static DashMap<u64, u64> {
    let raw = raw_map();
    raw.insert(42, 7);
    leak(raw)
}

// The measured functions.

#[library_benchmark]
#[bench::run(args = (1), setup = dash_hit)]
fn l1_hit_dashmap_1_layer_capacitor(cache: &'static Cache) -> Option<u64> {
    poll_once(cache.get(black_box(&42))).unwrap()
}

#[library_benchmark]
#[bench::run(setup = raw_dash_hit)]
fn l1_hit_dashmap_1_layer_raw(raw: &'static DashMap<u64, u64>) -> Option<u64> {
    raw.get(black_box(&42)).map(|v| *v)
}

#[library_benchmark]
#[bench::run(args = (2), setup = dash_hit)]
fn l1_hit_dashmap_2_layers_capacitor(cache: &'static Cache) -> Option<u64> {
    poll_once(cache.get(black_box(&42))).unwrap()
}

#[library_benchmark]
#[bench::run(setup = raw_dash_hit)]
fn l1_hit_dashmap_2_layers_raw(raw: &'static DashMap<u64, u64>) -> Option<u64> {
    raw.get(black_box(&42)).map(|v| *v)
}

#[library_benchmark]
#[bench::run(args = (1), setup = moka_hit)]
fn l1_hit_moka_1_layer_capacitor(cache: &'static Cache) -> Option<u64> {
    poll_once(cache.get(black_box(&42))).unwrap()
}

#[library_benchmark]
#[bench::run(setup = raw_moka_hit)]
fn l1_hit_moka_1_layer_raw(raw: &'static moka::sync::Cache<u64, u64>) -> Option<u64> {
    raw.get(black_box(&42))
}

#[library_benchmark]
#[bench::run(args = (2), setup = moka_hit)]
fn l1_hit_moka_2_layers_capacitor(cache: &'static Cache) -> Option<u64> {
    poll_once(cache.get(black_box(&42))).unwrap()
}

#[library_benchmark]
#[bench::run(setup = raw_moka_hit)]
fn l1_hit_moka_2_layers_raw(raw: &'static moka::sync::Cache<u64, u64>) -> Option<u64> {
    raw.get(black_box(&42))
}

fn raw_miss(raw: &[DashMap<u64, u64>]) -> Option<u64> {
    for m in raw {
        if let Some(v) = m.get(black_box(&42)) {
            return Some(*v);
        }
    }
    None
}

#[library_benchmark]
#[bench::run(args = (2), setup = dash_empty)]
fn miss_dashmap_2_layers_capacitor(cache: &'static Cache) -> Option<u64> {
    poll_once(cache.get(black_box(&42))).unwrap()
}

#[library_benchmark]
#[bench::run(args = (2), setup = raw_empty)]
fn miss_dashmap_2_layers_raw(raw: &'static [DashMap<u64, u64>]) -> Option<u64> {
    raw_miss(raw)
}

#[library_benchmark]
#[bench::run(args = (3), setup = dash_empty)]
fn miss_dashmap_3_layers_capacitor(cache: &'static Cache) -> Option<u64> {
    poll_once(cache.get(black_box(&42))).unwrap()
}

#[library_benchmark]
#[bench::run(args = (3), setup = raw_empty)]
fn miss_dashmap_3_layers_raw(raw: &'static [DashMap<u64, u64>]) -> Option<u64> {
    raw_miss(raw)
}

#[library_benchmark]
#[bench::run(args = (4), setup = dash_empty)]
fn miss_dashmap_4_layers_capacitor(cache: &'static Cache) -> Option<u64> {
    poll_once(cache.get(black_box(&42))).unwrap()
}

#[library_benchmark]
#[bench::run(args = (4), setup = raw_empty)]
fn miss_dashmap_4_layers_raw(raw: &'static [DashMap<u64, u64>]) -> Option<u64> {
    raw_miss(raw)
}

#[library_benchmark]
#[bench::run(setup = dash_l2_only)]
fn l2_hit_promotion_dashmap_capacitor(cache: &'static Cache) -> Option<u64> {
    poll_once(cache.get(black_box(&42))).unwrap()
}

#[library_benchmark]
#[bench::run(setup = raw_l2_only)]
fn l2_hit_promotion_dashmap_raw(raw: &'static [DashMap<u64, u64>]) -> Option<u64> {
    let k = black_box(42);
    if let Some(v) = raw[0].get(&k).map(|v| *v) {
        return Some(v);
    }
    let v = raw[1].get(&k).map(|v| *v)?;
    raw[0].insert(k, v);
    Some(v)
}

fn raw_write(raw: &[DashMap<u64, u64>]) {
    for m in raw.iter().rev() {
        m.insert(black_box(42), black_box(7));
    }
}

#[library_benchmark]
#[bench::run(args = (1), setup = dash_written)]
fn write_through_dashmap_1_layers_capacitor(cache: &'static Cache) {
    poll_once(cache.set(black_box(42), black_box(7))).unwrap();
}

#[library_benchmark]
#[bench::run(args = (1), setup = raw_written)]
fn write_through_dashmap_1_layers_raw(raw: &'static [DashMap<u64, u64>]) {
    raw_write(raw);
}

#[library_benchmark]
#[bench::run(args = (2), setup = dash_written)]
fn write_through_dashmap_2_layers_capacitor(cache: &'static Cache) {
    poll_once(cache.set(black_box(42), black_box(7))).unwrap();
}

#[library_benchmark]
#[bench::run(args = (2), setup = raw_written)]
fn write_through_dashmap_2_layers_raw(raw: &'static [DashMap<u64, u64>]) {
    raw_write(raw);
}

#[library_benchmark]
#[bench::run(args = (3), setup = dash_written)]
fn write_through_dashmap_3_layers_capacitor(cache: &'static Cache) {
    poll_once(cache.set(black_box(42), black_box(7))).unwrap();
}

#[library_benchmark]
#[bench::run(args = (3), setup = raw_written)]
fn write_through_dashmap_3_layers_raw(raw: &'static [DashMap<u64, u64>]) {
    raw_write(raw);
}

#[library_benchmark]
#[bench::run(args = (4), setup = dash_written)]
fn write_through_dashmap_4_layers_capacitor(cache: &'static Cache) {
    poll_once(cache.set(black_box(42), black_box(7))).unwrap();
}

#[library_benchmark]
#[bench::run(args = (4), setup = raw_written)]
fn write_through_dashmap_4_layers_raw(raw: &'static [DashMap<u64, u64>]) {
    raw_write(raw);
}

#[library_benchmark]
#[bench::run(setup = write_back)]
fn write_back_set_dashmap_capacitor(cache: &'static Cache) {
    poll_once(cache.set(black_box(42), black_box(7))).unwrap();
}

#[library_benchmark]
#[bench::run(setup = raw_one)]
fn write_back_set_dashmap_raw(raw: &'static DashMap<u64, u64>) -> Option<u64> {
    raw.insert(black_box(42), black_box(7))
}

#[library_benchmark]
#[bench::run(args = (2), setup = dash_written)]
fn delete_dashmap_2_layers_capacitor(cache: &'static Cache) {
    poll_once(cache.delete(black_box(&42))).unwrap();
}

#[library_benchmark]
#[bench::run(args = (2), setup = raw_written)]
fn delete_dashmap_2_layers_raw(raw: &'static [DashMap<u64, u64>]) {
    for m in raw {
        black_box(m.remove(black_box(&42)));
    }
}

library_benchmark_group!(
    name = l1_hit,
    benchmarks = [
        l1_hit_dashmap_1_layer_capacitor,
        l1_hit_dashmap_1_layer_raw,
        l1_hit_dashmap_2_layers_capacitor,
        l1_hit_dashmap_2_layers_raw,
        l1_hit_moka_1_layer_capacitor,
        l1_hit_moka_1_layer_raw,
        l1_hit_moka_2_layers_capacitor,
        l1_hit_moka_2_layers_raw
    ]
);

library_benchmark_group!(
    name = lower,
    benchmarks = [
        miss_dashmap_2_layers_capacitor,
        miss_dashmap_2_layers_raw,
        miss_dashmap_3_layers_capacitor,
        miss_dashmap_3_layers_raw,
        miss_dashmap_4_layers_capacitor,
        miss_dashmap_4_layers_raw,
        l2_hit_promotion_dashmap_capacitor,
        l2_hit_promotion_dashmap_raw
    ]
);

library_benchmark_group!(
    name = writes,
    benchmarks = [
        write_through_dashmap_1_layers_capacitor,
        write_through_dashmap_1_layers_raw,
        write_through_dashmap_2_layers_capacitor,
        write_through_dashmap_2_layers_raw,
        write_through_dashmap_3_layers_capacitor,
        write_through_dashmap_3_layers_raw,
        write_through_dashmap_4_layers_capacitor,
        write_through_dashmap_4_layers_raw,
        write_back_set_dashmap_capacitor,
        write_back_set_dashmap_raw,
        delete_dashmap_2_layers_capacitor,
        delete_dashmap_2_layers_raw
    ]
);

main!(
    // Cache simulation on: callgrind then also reports L1/LL hits and misses, from which
    // gungraun estimates cycles.
    config = LibraryBenchmarkConfig::default().tool(Callgrind::with_args(["cache-sim=yes"]));
    library_benchmark_groups = l1_hit, lower, writes
);
