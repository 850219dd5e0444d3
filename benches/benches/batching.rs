//! Read batching: 64 concurrent tasks each reading a distinct cold key (in no L1) over the
//! real Redis and the real PostgreSQL, in one criterion group per backend:
//!
//! - `capacitor`: moka over the backend, its reads batched
//!   (`ReadBatching::new(200 µs)`, 64 keys): one `MGET`, one `key = ANY($1)` query;
//! - `unbatched`: the same composer without batching, one `GET` / query per key;
//! - `raw`: the code written by hand, inlined: moka + one fred `GET` per key, moka + one
//!   prepared tokio-postgres query per key, on one connection each;
//! - `hand_written` (Redis): the peer of the other suites, moka + fred on its own client.
//!
//! An iteration is one round of 64 reads. After each group a line gives, per function,
//! the throughput (keys/s over the rounds' wall time) and the p99 of one read (from its
//! task's spawn to its answer), warm-up rounds included. Everything runs on one thread,
//! the connections' tasks too, as in the `redis` and `postgres` suites.
//!
//! Needs the servers at `CAPACITOR_REDIS_URL` and `CAPACITOR_POSTGRES_URL` (defaults on
//! 127.0.0.1); a backend that does not answer is skipped with a line saying why. Keys live
//! under `bench:<run id>:batch…` prefixes and tables are named `bench_<run id>_batch…`;
//! only those are removed at the end.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capacitor::memory::MokaLayer;
use capacitor::postgres::PostgresLayer;
use capacitor::redis::RedisLayer;
use capacitor::{Layer, LayerConfig, MultiLayer, ReadBatching};
use capacitor_benches::peer::{delete_prefix, postgres_client, redis_client, redis_preload, HandWritten};
use capacitor_benches::{decode, encode, key, postgres_url, redis_url, run_id, size, value};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const TASKS: u64 = 64;

type Cache = MultiLayer<String, String>;

/// One function's read of a key.
type Read = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Option<String>> + Send>> + Send + Sync>;

fn read_with<F, Fut>(f: F) -> Read
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<String>> + Send + 'static,
{
    Arc::new(move |k| Box::pin(f(k)))
}

/// What the reads of one function took.
#[derive(Default)]
struct Record {
    reads: Mutex<Vec<Duration>>,
    keys: AtomicU64,
    wall_ns: AtomicU64,
}

impl Record {
    fn summary(&self) -> String {
        let mut reads = self.reads.lock().unwrap().clone();
        reads.sort_unstable();
        let p99 = reads
            .get((reads.len() * 99 / 100).min(reads.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default();
        let wall = Duration::from_nanos(self.wall_ns.load(Ordering::Relaxed));
        let per_s = self.keys.load(Ordering::Relaxed) as f64 / wall.as_secs_f64().max(1e-9);
        format!("{:.0}k keys/s, p99 {p99:.1?}", per_s / 1_000.0)
    }
}

/// One round: `read` of each key on a task of its own, all at once.
async fn round(keys: Vec<String>, read: Read, record: Arc<Record>) {
    let started = Instant::now();
    let tasks: Vec<_> = keys
        .into_iter()
        .map(|k| {
            let (read, record) = (read.clone(), record.clone());
            let spawned = Instant::now();
            tokio::spawn(async move {
                let v = read(k).await;
                let took = spawned.elapsed();
                record.reads.lock().unwrap().push(took);
                assert!(v.is_some(), "a preloaded key");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    record.keys.fetch_add(TASKS, Ordering::Relaxed);
    record
        .wall_ns
        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// The next 64 keys, round robin over the `n` preloaded.
fn next_keys(next: &AtomicU64, n: u64) -> Vec<String> {
    let start = next.fetch_add(TASKS, Ordering::Relaxed);
    (start..start + TASKS).map(|i| key(i % n)).collect()
}

/// moka over `store`, its reads batched or not.
fn composer(
    store: Arc<dyn Layer<String, String>>,
    name: &str,
    batched: bool,
) -> (Cache, Arc<MokaLayer<String, String>>) {
    let l1 = Arc::new(
        MokaLayer::builder()
            .max_capacity(1_000_000)
            .build::<String, String>()
            .unwrap(),
    );
    let mut below = LayerConfig::shared(name, store);
    if batched {
        below = below.batch_reads(ReadBatching::new(Duration::from_micros(200)).max_keys(64));
    }
    let cache = MultiLayer::builder()
        .layer(LayerConfig::shared(
            "moka",
            l1.clone() as Arc<dyn Layer<String, String>>,
        ))
        .layer(below)
        .build()
        .unwrap();
    (cache, l1)
}

/// A composer's read, for [`round`].
fn cache_read(cache: &Cache) -> Read {
    let cache = cache.clone();
    read_with(move |k: String| {
        let cache = cache.clone();
        async move { cache.get(&k).await.unwrap() }
    })
}

/// The summary line of a group, and the keys per round trip of the batched composer.
fn report(group: &str, records: &[(&str, &Record)], batched: &Cache, layer: &str) {
    let stats = batched.stats();
    let per_batch = stats
        .layer(layer)
        .map_or(0.0, |l| l.batched_reads as f64 / l.read_batches.max(1) as f64);
    let rows: Vec<String> = records
        .iter()
        .map(|(name, r)| format!("{name} {}", r.summary()))
        .collect();
    println!("{group}: {} ({per_batch:.1} keys per batch)", rows.join("; "));
}

fn redis_cold_reads(c: &mut Criterion) {
    let url = redis_url();
    let n = size(10_000, 2_000);
    let run = run_id();
    let prefix = format!("bench:{run}:batch:");
    let raw_prefix = format!("bench:{run}:batchraw:");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let raw = match rt.block_on(redis_client(&url)) {
        Ok(client) => Arc::new(client),
        Err(why) => {
            eprintln!(
                "redis batching bench skipped: Redis is not reachable ({why}); set CAPACITOR_REDIS_URL"
            );
            return;
        }
    };
    let (redis, hand) = rt.block_on(async {
        let redis = Arc::new(
            RedisLayer::builder()
                .url(&url)
                .prefix(&prefix)
                .pool_size(1)
                .build::<String, String>()
                .unwrap(),
        );
        redis.connect().await.unwrap();
        let entries: Vec<(String, String)> = (0..n).map(|i| (key(i), value(i))).collect();
        for chunk in entries.chunks(1_000) {
            redis.set_many(chunk, None).await.unwrap();
        }
        let encoded: Vec<(String, Vec<u8>)> = entries
            .iter()
            .map(|(k, v)| (format!("{raw_prefix}{k}"), encode(v)))
            .collect();
        redis_preload(&raw, &encoded).await.unwrap();
        let hand = HandWritten::connect(&url, format!("bench:{run}:batchhand:"), None)
            .await
            .unwrap();
        hand.preload(&entries, true).await.unwrap();
        (redis, Arc::new(hand))
    });
    let store = redis.clone() as Arc<dyn Layer<String, String>>;
    let (batched, batched_l1) = composer(store.clone(), "redis", true);
    let (unbatched, unbatched_l1) = composer(store, "redis", false);
    let raw_moka: Arc<moka::sync::Cache<String, String>> = Arc::new(moka::sync::Cache::new(1_000_000));
    let records: [Arc<Record>; 4] = Default::default();
    let next = AtomicU64::new(0);

    let mut g = c.benchmark_group("redis_cold_reads/64_tasks");
    for (name, cache, l1, record) in [
        ("capacitor", &batched, &batched_l1, &records[0]),
        ("unbatched", &unbatched, &unbatched_l1, &records[1]),
    ] {
        let read = cache_read(cache);
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_batched(
                || {
                    let keys = next_keys(&next, n);
                    keys.iter().for_each(|k| drop(l1.delete_sync(k)));
                    keys
                },
                |keys| round(keys, read.clone(), record.clone()),
                BatchSize::SmallInput,
            )
        });
    }
    let raw_read = {
        let (raw, raw_moka, raw_prefix) = (raw.clone(), raw_moka.clone(), raw_prefix.clone());
        read_with(move |k: String| {
            let (raw, raw_moka, raw_key) = (raw.clone(), raw_moka.clone(), format!("{raw_prefix}{k}"));
            async move {
                use capacitor::redis::fred::prelude::KeysInterface;
                if let Some(v) = raw_moka.get(&k) {
                    return Some(v);
                }
                let bytes: Option<Vec<u8>> = raw.get(raw_key).await.unwrap();
                let v = decode(&bytes?);
                raw_moka.insert(k, v.clone());
                Some(v)
            }
        })
    };
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter_batched(
            || {
                let keys = next_keys(&next, n);
                keys.iter().for_each(|k| raw_moka.invalidate(k));
                keys
            },
            |keys| round(keys, raw_read.clone(), records[2].clone()),
            BatchSize::SmallInput,
        )
    });
    let hand_read = {
        let hand = hand.clone();
        read_with(move |k: String| {
            let hand = hand.clone();
            async move { hand.get(&k).await.unwrap() }
        })
    };
    g.bench_function("hand_written", |b| {
        b.to_async(&rt).iter_batched(
            || {
                let keys = next_keys(&next, n);
                keys.iter().for_each(|k| hand.forget_local(k));
                keys
            },
            |keys| round(keys, hand_read.clone(), records[3].clone()),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    report(
        "redis_cold_reads/64_tasks",
        &[
            ("capacitor (batched)", &records[0]),
            ("unbatched", &records[1]),
            ("raw", &records[2]),
            ("hand_written", &records[3]),
        ],
        &batched,
        "redis",
    );

    rt.block_on(async {
        batched.close().await.unwrap();
        unbatched.close().await.unwrap();
        drop(hand_read);
        if let Ok(hand) = Arc::try_unwrap(hand) {
            hand.cleanup().await.unwrap();
        }
        delete_prefix(&raw, &prefix).await.unwrap();
        delete_prefix(&raw, &raw_prefix).await.unwrap();
    });
}

fn postgres_cold_reads(c: &mut Criterion) {
    let url = postgres_url();
    let n = size(10_000, 2_000);
    let run = run_id();
    let table = format!("bench_{run}_batch");
    let raw_table = format!("bench_{run}_batchraw");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let raw = match rt.block_on(postgres_client(&url)) {
        Ok(client) => Arc::new(client),
        Err(why) => {
            eprintln!(
                "postgres batching bench skipped: PostgreSQL is not reachable ({why}); set CAPACITOR_POSTGRES_URL"
            );
            return;
        }
    };
    let layer = |table: String| {
        let url = url.clone();
        async move {
            PostgresLayer::builder()
                .url(&url)
                .table(&table)
                .pool_size(4)
                .sweeper(false)
                .build::<String, String>()
                .await
                .unwrap()
        }
    };
    let (pg, raw_get) = rt.block_on(async {
        let pg = Arc::new(layer(table.clone()).await);
        // The raw table: the layer's DDL; plain postcard values, as code written by hand.
        layer(raw_table.clone()).await.close().await.unwrap();
        let entries: Vec<(String, String)> = (0..n).map(|i| (key(i), value(i))).collect();
        for chunk in entries.chunks(1_000) {
            pg.set_many(chunk, None).await.unwrap();
            let (ks, vs): (Vec<String>, Vec<Vec<u8>>) = chunk.iter().map(|(k, v)| (k.clone(), encode(v))).unzip();
            raw.execute(
                &format!("INSERT INTO \"{raw_table}\" (key, value) SELECT * FROM unnest($1::text[], $2::bytea[])"),
                &[&ks, &vs],
            )
            .await
            .unwrap();
        }
        let raw_get = raw
            .prepare(&format!(
                "SELECT value FROM \"{raw_table}\" WHERE key = $1 AND (expires_at IS NULL OR expires_at > now())"
            ))
            .await
            .unwrap();
        (pg, raw_get)
    });
    let store = pg.clone() as Arc<dyn Layer<String, String>>;
    let (batched, batched_l1) = composer(store.clone(), "postgres", true);
    let (unbatched, unbatched_l1) = composer(store, "postgres", false);
    let raw_moka: Arc<moka::sync::Cache<String, String>> = Arc::new(moka::sync::Cache::new(1_000_000));
    let records: [Arc<Record>; 3] = Default::default();
    let next = AtomicU64::new(0);

    let mut g = c.benchmark_group("postgres_cold_reads/64_tasks");
    for (name, cache, l1, record) in [
        ("capacitor", &batched, &batched_l1, &records[0]),
        ("unbatched", &unbatched, &unbatched_l1, &records[1]),
    ] {
        let read = cache_read(cache);
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_batched(
                || {
                    let keys = next_keys(&next, n);
                    keys.iter().for_each(|k| drop(l1.delete_sync(k)));
                    keys
                },
                |keys| round(keys, read.clone(), record.clone()),
                BatchSize::SmallInput,
            )
        });
    }
    let raw_read = {
        let (raw, raw_moka) = (raw.clone(), raw_moka.clone());
        read_with(move |k: String| {
            let (raw, raw_moka, raw_get) = (raw.clone(), raw_moka.clone(), raw_get.clone());
            async move {
                if let Some(v) = raw_moka.get(&k) {
                    return Some(v);
                }
                let row = raw.query_opt(&raw_get, &[&k]).await.unwrap()?;
                let v = decode(row.get::<_, &[u8]>(0));
                raw_moka.insert(k, v.clone());
                Some(v)
            }
        })
    };
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter_batched(
            || {
                let keys = next_keys(&next, n);
                keys.iter().for_each(|k| raw_moka.invalidate(k));
                keys
            },
            |keys| round(keys, raw_read.clone(), records[2].clone()),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    report(
        "postgres_cold_reads/64_tasks",
        &[
            ("capacitor (batched)", &records[0]),
            ("unbatched", &records[1]),
            ("raw", &records[2]),
        ],
        &batched,
        "postgres",
    );

    rt.block_on(async {
        batched.close().await.unwrap();
        unbatched.close().await.unwrap();
        for t in [&table, &raw_table] {
            raw.batch_execute(&format!("DROP TABLE IF EXISTS \"{t}\""))
                .await
                .unwrap();
        }
    });
}

criterion_group!(benches, redis_cold_reads, postgres_cold_reads);
criterion_main!(benches);
