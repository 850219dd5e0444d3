//! memory + Redis beside raw fred and raw moka, and beside the hand-written peer, in the
//! same criterion groups.
//!
//! The raw side is the floor: the same backend calls inlined in the benchmark (one fred
//! client, postcard, a moka cache). `hand_written` (in the hit and write groups) is the
//! cache-aside code a user writes today with moka + fred ([`HandWritten`]), on a client of
//! its own. capacitor's layer and the raw side each use one connection, on the same tokio
//! runtime (`b.to_async(&rt)`), against the same server, so the executor and the server
//! cost the same on every side. The layer stores capacitor's envelope; the others plain
//! postcard.
//!
//! Needs a server at `CAPACITOR_REDIS_URL` (default `redis://127.0.0.1:6379`); without one
//! the suite prints why and measures nothing. Keys live under `bench:<run id>:…` prefixes
//! unique to the run, and only those are deleted at the end.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use capacitor::memory::MokaLayer;
use capacitor::redis::fred::prelude::{ClientLike, KeysInterface, Value};
use capacitor::redis::RedisLayer;
use capacitor::{Layer, LayerConfig, MultiLayer, WriteBack, WritePolicy};
use capacitor_benches::peer::{delete_prefix, redis_client, redis_preload, HandWritten};
use capacitor_benches::{decode, encode, key, redis_url, run_id, size, value};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

fn redis_benches(c: &mut Criterion) {
    let url = redis_url();
    let keys = size(10_000, 2_000);
    let run = run_id();
    let capacitor_prefix = format!("bench:{run}:capacitor:");
    let raw_prefix = format!("bench:{run}:raw:");
    let raw_key = |i: u64| format!("{raw_prefix}user:{i}");
    // One thread: the connections' tasks and the benchmark share it, on every side.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let raw = match rt.block_on(redis_client(&url)) {
        Ok(client) => client,
        Err(why) => {
            eprintln!("redis benches skipped: Redis is not reachable ({why}); set CAPACITOR_REDIS_URL");
            return;
        }
    };
    let (redis, l1, cache, hand) = rt.block_on(async {
        let redis = Arc::new(
            RedisLayer::builder()
                .url(&url)
                .prefix(&capacitor_prefix)
                .pool_size(1)
                .build::<String, String>()
                .unwrap(),
        );
        redis.connect().await.unwrap();
        let l1 = Arc::new(
            MokaLayer::builder()
                .max_capacity(1_000_000)
                .build::<String, String>()
                .unwrap(),
        );
        let cache = MultiLayer::builder()
            .layer(LayerConfig::shared("moka", l1.clone()))
            .layer(LayerConfig::shared("redis", redis.clone()))
            .build()
            .unwrap();
        let entries: Vec<(String, String)> = (0..keys).map(|i| (key(i), value(i))).collect();
        for chunk in entries.chunks(1_000) {
            redis.set_many(chunk, None).await.unwrap();
        }
        let encoded: Vec<(String, Vec<u8>)> = (0..keys).map(|i| (raw_key(i), encode(&value(i)))).collect();
        redis_preload(&raw, &encoded).await.unwrap();
        let hand = HandWritten::connect(&url, format!("bench:{run}:hand:"), None)
            .await
            .unwrap();
        hand.preload(&entries, true).await.unwrap();
        (redis, l1, cache, hand)
    });
    let raw_moka: moka::sync::Cache<String, String> = moka::sync::Cache::new(1_000_000);
    let next = AtomicU64::new(0);
    let take = || next.fetch_add(1, Ordering::Relaxed) % keys;

    // A Redis hit promoted into moka: setup (not measured) removes the key from L1.
    let mut g = c.benchmark_group("redis_hit/moka_over_redis");
    g.bench_function("capacitor", |b| {
        b.to_async(&rt).iter_batched(
            || {
                let k = key(take());
                l1.delete_sync(&k);
                k
            },
            |k| {
                let cache = &cache;
                async move { cache.get(&k).await.unwrap() }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter_batched(
            || {
                let i = take();
                raw_moka.invalidate(&key(i));
                i
            },
            |i| {
                let (raw, raw_moka) = (&raw, &raw_moka);
                async move {
                    let k = key(i);
                    if let Some(v) = raw_moka.get(&k) {
                        return Some(v);
                    }
                    let bytes: Option<Vec<u8>> = raw.get(raw_key(i)).await.unwrap();
                    let v = decode(&bytes?);
                    raw_moka.insert(k, v.clone());
                    Some(v)
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("hand_written", |b| {
        b.to_async(&rt).iter_batched(
            || {
                let k = key(take());
                hand.forget_local(&k);
                k
            },
            |k| {
                let hand = &hand;
                async move { hand.get(&k).await.unwrap() }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // Write-through: SET in Redis, then the L1 insert.
    let mut g = c.benchmark_group("redis_write_through/moka_over_redis");
    g.bench_function("capacitor", |b| {
        b.to_async(&rt).iter_batched(
            || (key(take()), value(7)),
            |(k, v)| {
                let cache = &cache;
                async move { cache.set(k, v).await.unwrap() }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter_batched(
            || (take(), value(7)),
            |(i, v)| {
                let (raw, raw_moka) = (&raw, &raw_moka);
                async move {
                    let _: () = raw
                        .set(
                            raw_key(i),
                            Value::from(encode(&v).into_boxed_slice()),
                            None,
                            None,
                            false,
                        )
                        .await
                        .unwrap();
                    raw_moka.insert(key(i), black_box(v));
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("hand_written", |b| {
        b.to_async(&rt).iter_batched(
            || (key(take()), value(7)),
            |(k, v)| {
                let hand = &hand;
                async move { hand.set(k, v).await.unwrap() }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // 100 keys: the layer's one MGET against 100 sequential GETs, each decoded.
    let mut g = c.benchmark_group("redis_get_many/100_keys");
    let batch = || {
        let start = take();
        (start..start + 100).map(|i| i % keys).collect::<Vec<u64>>()
    };
    g.bench_function("capacitor", |b| {
        b.to_async(&rt).iter_batched(
            || batch().into_iter().map(key).collect::<Vec<String>>(),
            |keys| {
                let redis = &redis;
                async move { redis.get_many(&keys).await.unwrap() }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter_batched(
            || batch().into_iter().map(raw_key).collect::<Vec<String>>(),
            |keys| {
                let raw = &raw;
                async move {
                    let mut out = Vec::with_capacity(keys.len());
                    for k in keys {
                        let bytes: Option<Vec<u8>> = raw.get(k).await.unwrap();
                        out.push(bytes.map(|b| decode(&b)));
                    }
                    out
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // Write-back drain: 2,000 writes (500 in a quick run) through a write-back composer
    // (the drain sends them as pipelines of 500), `flush` included, beside as many
    // sequential raw SETs (+ moka inserts). Target: the drain at least 5x
    // faster, a ratio <= 0.2.
    let drain = size(2_000, 500);
    let write_back = rt.block_on(async {
        MultiLayer::builder()
            .write_policy(WritePolicy::Back(
                WriteBack::new().batch_size(500).queue_bound(10_000),
            ))
            .layer(LayerConfig::new(
                "moka",
                MokaLayer::builder()
                    .max_capacity(100_000)
                    .build::<String, String>()
                    .unwrap(),
            ))
            .layer(LayerConfig::shared("redis", redis.clone()))
            .build()
            .unwrap()
    });
    let mut g = c.benchmark_group(format!("write_back_drain/redis/{drain}_keys"));
    g.sample_size(10);
    g.bench_function("capacitor", |b| {
        b.to_async(&rt).iter(|| {
            let write_back = &write_back;
            async move {
                for i in 0..drain {
                    write_back.set(key(i), value(i)).await.unwrap();
                }
                write_back.flush().await.unwrap();
            }
        })
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter(|| {
            let (raw, raw_moka) = (&raw, &raw_moka);
            async move {
                for i in 0..drain {
                    let _: () = raw
                        .set(
                            raw_key(i),
                            Value::from(encode(&value(i)).into_boxed_slice()),
                            None,
                            None,
                            false,
                        )
                        .await
                        .unwrap();
                    raw_moka.insert(key(i), value(i));
                }
            }
        })
    });
    g.finish();
    rt.block_on(write_back.close()).unwrap();

    rt.block_on(async {
        cache.close().await.unwrap();
        hand.cleanup().await.unwrap();
        delete_prefix(&raw, &capacitor_prefix).await.unwrap();
        delete_prefix(&raw, &raw_prefix).await.unwrap();
        let _ = raw.quit().await;
    });
}

criterion_group!(benches, redis_benches);
criterion_main!(benches);
