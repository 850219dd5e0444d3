//! The bounded L1 on quick_cache beside the raw cache and foyer, and the memory each
//! in-memory layer takes per entry.
//!
//! - `l1_hit/quick_cache`: a hit of a hot key. `capacitor` is the composer over a
//!   `QuickCacheLayer` L1 and a `DashMapLayer` L2 (as `l1_hit/moka/2_layers`), `raw` a
//!   quick_cache `get` inlined, `foyer` foyer's in-memory cache doing the same hit (a peer).
//!   Futures are polled once with a no-op waker, as in the `composer` suite.
//! - The memory row, printed before the groups: live heap bytes per entry after writing
//!   1,000,000 entries (100,000 with `CAPACITOR_BENCH_QUICK`) of a `u64` key and a
//!   16-byte value into each in-memory layer, raw quick_cache and foyer, counted by the
//!   global allocator below. Bounded caches get 25% headroom over the entry count (their
//!   shards fill unevenly) and are divided by the entries they hold.
//!
//! `unsafe` here only: a `GlobalAlloc` impl cannot be written without it.
#![allow(missing_docs, unsafe_code, clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicI64, Ordering};

use capacitor::memory::{DashMapLayer, MokaLayer, QuickCacheLayer};
use capacitor::{Layer, LayerConfig, MultiLayer};
use capacitor_benches::size;
use capacitor_core::testkit::poll_once;
use criterion::Criterion;

/// Live heap bytes: allocations minus deallocations, on every thread.
static LIVE: AtomicI64 = AtomicI64::new(0);

struct Counting;

fn signed(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(signed(layout.size()), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(signed(layout.size()), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(signed(layout.size()), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(signed(new_size) - signed(layout.size()), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type Value = [u8; 16];

fn value(k: u64) -> Value {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&k.to_le_bytes());
    v
}

/// Heap bytes per held entry of the cache `fill` builds and fills, and the entries held.
fn per_entry<C>(fill: impl FnOnce() -> C, held: impl FnOnce(&C) -> u64) -> (f64, u64) {
    let before = LIVE.load(Ordering::SeqCst);
    let cache = fill();
    let bytes = LIVE.load(Ordering::SeqCst) - before;
    let n = held(&cache);
    drop(cache);
    (bytes as f64 / n.max(1) as f64, n)
}

fn memory_row() {
    let n = size(1_000_000, 100_000);
    let bound = n + n / 4;
    println!("memory/per_entry: {n} entries of u64 -> [u8; 16], live heap bytes per held entry");
    let rows: Vec<(&str, (f64, u64))> = vec![
        (
            "moka (MokaLayer)",
            per_entry(
                || {
                    let l = MokaLayer::builder()
                        .max_capacity(bound)
                        .build::<u64, Value>()
                        .unwrap();
                    for k in 0..n {
                        l.set_sync(&k, &value(k), None).unwrap().unwrap();
                    }
                    l.entry_count();
                    l
                },
                MokaLayer::entry_count,
            ),
        ),
        (
            "dashmap (DashMapLayer)",
            per_entry(
                || {
                    let l = DashMapLayer::<u64, Value>::new();
                    for k in 0..n {
                        l.set_sync(&k, &value(k), None).unwrap().unwrap();
                    }
                    l
                },
                |l| l.len() as u64,
            ),
        ),
        (
            "quick_cache (QuickCacheLayer)",
            per_entry(
                || {
                    let l = QuickCacheLayer::builder()
                        .max_capacity(bound)
                        .sweeper(false)
                        .build::<u64, Value>()
                        .unwrap();
                    for k in 0..n {
                        l.set_sync(&k, &value(k), None).unwrap().unwrap();
                    }
                    l
                },
                QuickCacheLayer::entry_count,
            ),
        ),
        (
            "quick_cache raw (no expiry field)",
            per_entry(
                || {
                    let c = quick_cache::sync::Cache::<u64, Value>::new(bound as usize);
                    for k in 0..n {
                        c.insert(k, value(k));
                    }
                    c
                },
                |c| c.len() as u64,
            ),
        ),
        (
            "foyer",
            per_entry(
                || {
                    let c: foyer::Cache<u64, Value> = foyer::CacheBuilder::new(bound as usize).build();
                    for k in 0..n {
                        c.insert(k, value(k));
                    }
                    c
                },
                |c| c.usage() as u64,
            ),
        ),
    ];
    for (name, (bytes, held)) in rows {
        println!("memory/per_entry/{name}: {bytes:.1} bytes ({held} held)");
    }
}

fn l1_hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("l1_hit/quick_cache");
    let cache = MultiLayer::<u64, u64>::builder()
        .layer(LayerConfig::new(
            "l1",
            QuickCacheLayer::builder()
                .max_capacity(10_000)
                .sweeper(false)
                .build()
                .unwrap(),
        ))
        .layer(LayerConfig::new("l2", DashMapLayer::new()))
        .build()
        .unwrap();
    poll_once(cache.set(42, 7)).unwrap();
    let raw: quick_cache::sync::Cache<u64, u64> = quick_cache::sync::Cache::new(10_000);
    raw.insert(42, 7);
    let foyer: foyer::Cache<u64, u64> = foyer::CacheBuilder::new(10_000).build();
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

fn main() {
    memory_row();
    let mut c = Criterion::default().configure_from_args();
    l1_hit(&mut c);
    c.final_summary();
}
