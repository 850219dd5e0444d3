//! The two embedded layers side by side, each beside its raw backend, in one run: moka
//! over redb and moka over sled, for a hit (L1 miss, embedded hit, promoted into moka), a
//! write-through, and a write-back drain.
//!
//! The raw side is what a user writes by hand: for redb a read transaction's `get` and a
//! write transaction per write; for sled `tree.get` and `tree.insert`; postcard around the
//! value and a moka insert for the backfill or the write. Each backend keeps both sides in
//! one database (different tables or trees), and neither side fsyncs in the measured path:
//! the redb layer runs `Durability::Manual` and the raw redb writes commit at redb's
//! `Durability::None`; the sled layer runs `FlushPolicy::Manual` and sled's own
//! background flusher runs for both of its sides, as in the `sled` suite.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use capacitor::memory::{DashMapLayer, MokaLayer};
use capacitor::redb::{Durability, RedbLayer};
use capacitor::sled::{FlushPolicy, SledLayer};
use capacitor::{Layer, LayerConfig, MultiLayer, WriteBack, WritePolicy};
use capacitor_benches::{decode, encode, key, size, value};
use capacitor_core::testkit::poll_once;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use redb::ReadableDatabase;

const RAW: redb::TableDefinition<'static, &'static [u8], &'static [u8]> = redb::TableDefinition::new("raw");

/// One raw redb write: a write transaction at `Durability::None` (no fsync).
fn redb_insert(db: &redb::Database, k: &[u8], v: &[u8]) {
    let mut txn = db.begin_write().unwrap();
    txn.set_durability(redb::Durability::None).unwrap();
    txn.open_table(RAW).unwrap().insert(k, v).unwrap();
    txn.commit().unwrap();
}

/// One raw redb read: a read transaction's `get`.
fn redb_get(db: &redb::Database, k: &[u8]) -> Option<Vec<u8>> {
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(RAW).unwrap();
    let found = table.get(k).unwrap().map(|g| g.value().to_vec());
    found
}

/// A moka L1 for the composer, and one for the raw side.
fn l1() -> Arc<MokaLayer<String, String>> {
    Arc::new(
        MokaLayer::builder()
            .max_capacity(1_000_000)
            .build::<String, String>()
            .unwrap(),
    )
}

/// The hit and the write-through over both backends.
fn hit_and_write_through(c: &mut Criterion) {
    let keys = size(50_000, 5_000);
    let dir = tempfile::tempdir().unwrap();
    let next = AtomicU64::new(0);
    let take = || next.fetch_add(1, Ordering::Relaxed) % keys;

    // redb: the layer in table `capacitor`, the raw side in table `raw`.
    let redb_db = Arc::new(redb::Database::create(dir.path().join("bench.redb")).unwrap());
    let redb_layer = Arc::new(
        RedbLayer::builder()
            .db(redb_db.clone())
            .durability(Durability::Manual)
            .sweeper(false) // no sweep pass mid-measurement
            .build::<String, String>()
            .unwrap(),
    );
    let redb_l1 = l1();
    let redb_cache = MultiLayer::builder()
        .layer(LayerConfig::shared("moka", redb_l1.clone()))
        .layer(LayerConfig::shared("redb", redb_layer.clone()))
        .build()
        .unwrap();

    // sled: the layer in tree `capacitor`, the raw side in tree `raw`.
    let sled_db = sled::open(dir.path().join("bench.sled")).unwrap();
    let sled_layer = Arc::new(
        SledLayer::builder()
            .db(sled_db.clone())
            .tree("capacitor")
            .flush_policy(FlushPolicy::Manual)
            .sweeper(false)
            .build::<String, String>()
            .unwrap(),
    );
    let sled_l1 = l1();
    let sled_cache = MultiLayer::builder()
        .layer(LayerConfig::shared("moka", sled_l1.clone()))
        .layer(LayerConfig::shared("sled", sled_layer.clone()))
        .build()
        .unwrap();
    let raw_tree = sled_db.open_tree("raw").unwrap();

    for chunk in (0..keys).collect::<Vec<_>>().chunks(5_000) {
        let entries: Vec<(String, String)> = chunk.iter().map(|&i| (key(i), value(i))).collect();
        poll_once(redb_layer.set_many(&entries, None)).unwrap();
        poll_once(sled_layer.set_many(&entries, None)).unwrap();
        let txn = redb_db.begin_write().unwrap();
        {
            let mut table = txn.open_table(RAW).unwrap();
            for (k, v) in &entries {
                table.insert(k.as_bytes(), encode(v).as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
        for (k, v) in &entries {
            raw_tree.insert(k.as_bytes(), encode(v)).unwrap();
        }
    }
    let raw_moka: moka::sync::Cache<String, String> = moka::sync::Cache::new(1_000_000);

    // An embedded hit promoted into moka: setup (not measured) removes the key from L1.
    for (name, cache, l1) in [("redb", &redb_cache, &redb_l1), ("sled", &sled_cache, &sled_l1)] {
        let mut g = c.benchmark_group(format!("embedded_hit/moka_over_{name}"));
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
                    let bytes = match name {
                        "redb" => redb_get(&redb_db, k.as_bytes())?,
                        _ => raw_tree.get(k.as_bytes()).unwrap()?.to_vec(),
                    };
                    let v = decode(&bytes);
                    raw_moka.insert(k, v.clone());
                    Some(v)
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }

    for (name, cache) in [("redb", &redb_cache), ("sled", &sled_cache)] {
        let mut g = c.benchmark_group(format!("embedded_write_through/moka_over_{name}"));
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
                    match name {
                        "redb" => redb_insert(&redb_db, k.as_bytes(), &encode(&v)),
                        _ => {
                            raw_tree.insert(k.as_bytes(), encode(&v)).unwrap();
                        }
                    }
                    raw_moka.insert(k, black_box(v));
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
    poll_once(redb_cache.close()).unwrap();
    poll_once(sled_cache.close()).unwrap();
}

/// Writing 10,000 keys (2,000 in a quick run) through write-back over dashmap (set all,
/// then flush: the drain writes batches, one transaction each) beside as many sequential
/// raw writes (redb: one write transaction per key; sled: one insert per key).
fn write_back_drain(c: &mut Criterion) {
    let n = size(10_000, 2_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let redb_db = Arc::new(redb::Database::create(dir.path().join("drain.redb")).unwrap());
    let sled_db = sled::open(dir.path().join("drain.sled")).unwrap();
    let write_back = || WritePolicy::Back(WriteBack::new().queue_bound(2 * n as usize).batch_size(1_000));
    let (redb_cache, sled_cache) = rt.block_on(async {
        let redb_cache = MultiLayer::<String, Vec<u8>>::builder()
            .write_policy(write_back())
            .layer(LayerConfig::new("l1", DashMapLayer::new()))
            .layer(LayerConfig::new(
                "redb",
                RedbLayer::builder()
                    .db(redb_db.clone())
                    .durability(Durability::Manual)
                    .sweeper(false)
                    .build()
                    .unwrap(),
            ))
            .build()
            .unwrap();
        let sled_cache = MultiLayer::<String, Vec<u8>>::builder()
            .write_policy(write_back())
            .layer(LayerConfig::new("l1", DashMapLayer::new()))
            .layer(LayerConfig::new(
                "sled",
                SledLayer::builder()
                    .db(sled_db.clone())
                    .tree("capacitor")
                    .flush_policy(FlushPolicy::Manual)
                    .sweeper(false)
                    .build()
                    .unwrap(),
            ))
            .build()
            .unwrap();
        (redb_cache, sled_cache)
    });
    let raw_tree = sled_db.open_tree("raw").unwrap();
    let value = vec![7u8; 100];
    for (name, cache) in [("redb", &redb_cache), ("sled", &sled_cache)] {
        let mut g = c.benchmark_group(format!("embedded_drain/{name}/{n}_keys"));
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
                    let k = format!("k{i}");
                    match name {
                        "redb" => redb_insert(&redb_db, k.as_bytes(), &value),
                        _ => {
                            raw_tree.insert(k.as_bytes(), value.as_slice()).unwrap();
                        }
                    }
                }
            })
        });
        g.finish();
    }
    rt.block_on(redb_cache.close()).unwrap();
    rt.block_on(sled_cache.close()).unwrap();
}

criterion_group!(benches, hit_and_write_through, write_back_drain);
criterion_main!(benches);
