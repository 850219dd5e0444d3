//! Three tiers, moka → Redis → PostgreSQL, as most services that cache deploy them: the
//! composer beside the same calls inlined (`raw`, the floor) and beside the hand-written
//! cache-aside code a user writes today with moka + fred + tokio-postgres
//! (`hand_written`, [`HandWritten`]), in the same criterion groups.
//!
//! - `tier3_l1_hit/moka`: the key is in moka.
//! - `tier3_l2_hit/redis`: the key is in Redis and PostgreSQL (setup drops it from moka);
//!   the read backfills moka.
//! - `tier3_l3_hit/postgres`: the key is only in PostgreSQL (setup, not measured, drops it
//!   from moka and Redis); the read backfills Redis and moka.
//! - `tier3_miss/3_tiers`: a key in no tier.
//! - `tier3_write_through/3_tiers`: a write to PostgreSQL, Redis and moka.
//!
//! Each side has its own Redis connection and its own PostgreSQL connection(s), on one
//! current-thread tokio runtime, against the same servers. Needs both
//! `CAPACITOR_REDIS_URL` and `CAPACITOR_POSTGRES_URL` (or the local defaults); without
//! either the suite prints why and measures nothing. Redis keys and tables are named after
//! the run and removed at the end.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use capacitor::memory::MokaLayer;
use capacitor::postgres::PostgresLayer;
use capacitor::redis::fred::prelude::{ClientLike, KeysInterface, Value};
use capacitor::redis::RedisLayer;
use capacitor::{Layer, LayerConfig, MultiLayer};
use capacitor_benches::peer::{delete_prefix, postgres_client, redis_client, redis_preload, HandWritten};
use capacitor_benches::{decode, encode, key, postgres_url, redis_url, run_id, size, value};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

fn tier_benches(c: &mut Criterion) {
    let (redis_url, pg_url) = (redis_url(), postgres_url());
    let keys = size(10_000, 2_000);
    let run = run_id();
    let capacitor_prefix = format!("bench:{run}:t3capacitor:");
    let raw_prefix = format!("bench:{run}:t3raw:");
    let hand_prefix = format!("bench:{run}:t3hand:");
    let (capacitor_table, raw_table, hand_table) = (
        format!("bench_{run}_t3capacitor"),
        format!("bench_{run}_t3raw"),
        format!("bench_{run}_t3hand"),
    );
    let raw_key = |k: &str| format!("{raw_prefix}{k}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (raw_redis, raw_pg) = match rt.block_on(async {
        let redis = redis_client(&redis_url)
            .await
            .map_err(|e| format!("Redis is not reachable ({e}); set CAPACITOR_REDIS_URL"))?;
        let pg = postgres_client(&pg_url)
            .await
            .map_err(|e| format!("PostgreSQL is not reachable ({e}); set CAPACITOR_POSTGRES_URL"))?;
        Ok::<_, String>((redis, pg))
    }) {
        Ok(clients) => clients,
        Err(why) => {
            eprintln!("tiers benches skipped: {why}");
            return;
        }
    };

    let (l1, redis, pg, cache, hand) = rt.block_on(async {
        let l1 = Arc::new(
            MokaLayer::builder()
                .max_capacity(1_000_000)
                .build::<String, String>()
                .unwrap(),
        );
        let redis = Arc::new(
            RedisLayer::builder()
                .url(&redis_url)
                .prefix(&capacitor_prefix)
                .pool_size(1)
                .build::<String, String>()
                .unwrap(),
        );
        redis.connect().await.unwrap();
        let pg = Arc::new(
            PostgresLayer::builder()
                .url(&pg_url)
                .table(&capacitor_table)
                .pool_size(2)
                .sweeper(false)
                .build::<String, String>()
                .await
                .unwrap(),
        );
        let cache = MultiLayer::builder()
            .layer(LayerConfig::shared("moka", l1.clone()))
            .layer(LayerConfig::shared("redis", redis.clone()))
            .layer(LayerConfig::shared("postgres", pg.clone()))
            .build()
            .unwrap();
        let hand = HandWritten::connect(&redis_url, hand_prefix.clone(), Some((&pg_url, &hand_table)))
            .await
            .unwrap();
        (l1, redis, pg, cache, hand)
    });

    // Every key in PostgreSQL and in Redis on every side; moka starts empty.
    let raw_get = rt.block_on(async {
        let entries: Vec<(String, String)> = (0..keys).map(|i| (key(i), value(i))).collect();
        for chunk in entries.chunks(1_000) {
            pg.set_many(chunk, None).await.unwrap();
            redis.set_many(chunk, None).await.unwrap();
        }
        hand.preload(&entries, true).await.unwrap();
        raw_pg
            .batch_execute(&format!(
                "CREATE TABLE \"{raw_table}\" (key text PRIMARY KEY, value bytea NOT NULL)"
            ))
            .await
            .unwrap();
        for chunk in entries.chunks(1_000) {
            let (ks, vs): (Vec<String>, Vec<Vec<u8>>) =
                chunk.iter().map(|(k, v)| (k.clone(), encode(v))).unzip();
            raw_pg
                .execute(
                    &format!("INSERT INTO \"{raw_table}\" (key, value) SELECT * FROM unnest($1::text[], $2::bytea[])"),
                    &[&ks, &vs],
                )
                .await
                .unwrap();
        }
        let encoded: Vec<(String, Vec<u8>)> =
            entries.iter().map(|(k, v)| (raw_key(k), encode(v))).collect();
        redis_preload(&raw_redis, &encoded).await.unwrap();
        raw_pg
            .prepare(&format!("SELECT value FROM \"{raw_table}\" WHERE key = $1"))
            .await
            .unwrap()
    });
    let raw_upsert = rt
        .block_on(raw_pg.prepare(&format!(
            "INSERT INTO \"{raw_table}\" (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
        )))
        .unwrap();
    let raw_moka: moka::sync::Cache<String, String> = moka::sync::Cache::new(1_000_000);
    let next = AtomicU64::new(0);
    let take = || next.fetch_add(1, Ordering::Relaxed) % keys;

    // The inlined floor of a read through the three tiers.
    let raw_read = |k: String| {
        let (raw_redis, raw_pg, raw_get, raw_moka) = (&raw_redis, &raw_pg, &raw_get, &raw_moka);
        async move {
            if let Some(v) = raw_moka.get(&k) {
                return Some(v);
            }
            let rk = raw_key(&k);
            let bytes: Option<Vec<u8>> = raw_redis.get(&rk).await.unwrap();
            if let Some(bytes) = bytes {
                let v = decode(&bytes);
                raw_moka.insert(k, v.clone());
                return Some(v);
            }
            let row = raw_pg.query_opt(raw_get, &[&k]).await.unwrap()?;
            let bytes: &[u8] = row.get(0);
            let v = decode(bytes);
            let _: () = raw_redis
                .set(
                    rk,
                    Value::from(bytes.to_vec().into_boxed_slice()),
                    None,
                    None,
                    false,
                )
                .await
                .unwrap();
            raw_moka.insert(k, v.clone());
            Some(v)
        }
    };

    // L1 hit: a hot key, in moka on every side.
    rt.block_on(async {
        cache.get(&key(0)).await.unwrap();
        hand.get(&key(0)).await.unwrap();
        raw_read(key(0)).await;
    });
    let hot = key(0);
    let mut g = c.benchmark_group("tier3_l1_hit/moka");
    g.bench_function("capacitor", |b| {
        b.to_async(&rt)
            .iter(|| async { cache.get(black_box(&hot)).await.unwrap() })
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter(|| async { raw_moka.get(black_box(&hot)) })
    });
    g.bench_function("hand_written", |b| {
        b.to_async(&rt)
            .iter(|| async { hand.get(black_box(&hot)).await.unwrap() })
    });
    g.finish();

    // L2 hit: setup drops the key from moka.
    let mut g = c.benchmark_group("tier3_l2_hit/redis");
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
                let k = key(take());
                raw_moka.invalidate(&k);
                k
            },
            raw_read,
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

    // L3 hit: setup (not measured, but a Redis round trip of wall time) drops the key from
    // moka and Redis.
    let mut g = c.benchmark_group("tier3_l3_hit/postgres");
    g.bench_function("capacitor", |b| {
        b.iter_batched(
            || {
                let k = key(take());
                l1.delete_sync(&k);
                rt.block_on(redis.delete(&k)).unwrap();
                k
            },
            |k| rt.block_on(cache.get(&k)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("raw", |b| {
        b.iter_batched(
            || {
                let k = key(take());
                raw_moka.invalidate(&k);
                let _: i64 = rt.block_on(raw_redis.del(raw_key(&k))).unwrap();
                k
            },
            |k| rt.block_on(raw_read(k)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("hand_written", |b| {
        b.iter_batched(
            || {
                let k = key(take());
                rt.block_on(hand.forget_cached(&k)).unwrap();
                k
            },
            |k| rt.block_on(hand.get(&k)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // A miss in every tier.
    let absent = format!("absent:{run}");
    let mut g = c.benchmark_group("tier3_miss/3_tiers");
    g.bench_function("capacitor", |b| {
        b.to_async(&rt)
            .iter(|| async { cache.get(black_box(&absent)).await.unwrap() })
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter(|| raw_read(black_box(absent.clone())))
    });
    g.bench_function("hand_written", |b| {
        b.to_async(&rt)
            .iter(|| async { hand.get(black_box(&absent)).await.unwrap() })
    });
    g.finish();

    // Write-through: PostgreSQL (committed), Redis, moka.
    let mut g = c.benchmark_group("tier3_write_through/3_tiers");
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
            || (key(take()), value(7)),
            |(k, v)| {
                let (raw_redis, raw_pg, raw_upsert, raw_moka) = (&raw_redis, &raw_pg, &raw_upsert, &raw_moka);
                let rk = raw_key(&k);
                async move {
                    let bytes = encode(&v);
                    raw_pg.execute(raw_upsert, &[&k, &bytes]).await.unwrap();
                    let _: () = raw_redis
                        .set(rk, Value::from(bytes.into_boxed_slice()), None, None, false)
                        .await
                        .unwrap();
                    raw_moka.insert(k, black_box(v));
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

    rt.block_on(async {
        cache.close().await.unwrap();
        hand.cleanup().await.unwrap();
        delete_prefix(&raw_redis, &capacitor_prefix).await.unwrap();
        delete_prefix(&raw_redis, &raw_prefix).await.unwrap();
        for table in [&capacitor_table, &raw_table] {
            raw_pg
                .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
                .await
                .unwrap();
        }
        let _ = raw_redis.quit().await;
    });
}

criterion_group!(benches, tier_benches);
criterion_main!(benches);
