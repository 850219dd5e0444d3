//! memory + PostgreSQL beside raw tokio-postgres and raw moka, in the same criterion groups.
//!
//! The raw side is what a user writes by hand: one tokio-postgres connection with prepared
//! statements, bincode, and a moka cache. Both sides run on the same tokio runtime
//! (`b.to_async(&rt)`), against the same server, on tables of the same shape (the layer's
//! DDL), so the executor and the server cost the same on both sides.
//!
//! Needs a server at `CAPACITOR_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); without one the suite prints why and
//! measures nothing.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capacitor::memory::MokaLayer;
use capacitor::postgres::tokio_postgres::{self, Client, NoTls};
use capacitor::postgres::PostgresLayer;
use capacitor::{Layer, LayerConfig, MultiLayer, WriteBack, WritePolicy};
use capacitor_benches::{decode, encode, key, value};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const KEYS: u64 = 10_000;
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const CAPACITOR_TABLE: &str = "bench_capacitor_kv";
const UNLOGGED_TABLE: &str = "bench_capacitor_kv_unlogged";
const RAW_TABLE: &str = "bench_raw_kv";

/// The raw side's connection, or why there is none.
async fn raw_client(url: &str) -> Result<Client, String> {
    let connect = tokio_postgres::connect(url, NoTls);
    match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
        Ok(Err(e)) => Err(match std::error::Error::source(&e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        }),
        Err(_) => Err("no answer within 3 s".to_owned()),
    }
}

async fn layer(url: &str, table: &str, unlogged: bool) -> PostgresLayer<String, String> {
    PostgresLayer::builder()
        .url(url)
        .table(table)
        .unlogged(unlogged)
        .pool_size(4)
        .sweeper(false)
        .build()
        .await
        .unwrap()
}

fn postgres_benches(c: &mut Criterion) {
    let url = std::env::var("CAPACITOR_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    // One thread: the connections' tasks and the benchmark share it, on both sides.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let raw = match rt.block_on(raw_client(&url)) {
        Ok(client) => Arc::new(client),
        Err(why) => {
            eprintln!(
                "postgres benches skipped: PostgreSQL is not reachable ({why}); set CAPACITOR_POSTGRES_URL"
            );
            return;
        }
    };
    let (pg, unlogged, l1, cache) = rt.block_on(async {
        for table in [CAPACITOR_TABLE, UNLOGGED_TABLE, RAW_TABLE] {
            raw.batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
                .await
                .unwrap();
        }
        let pg = Arc::new(layer(&url, CAPACITOR_TABLE, false).await);
        let unlogged = Arc::new(layer(&url, UNLOGGED_TABLE, true).await);
        // The raw table: the same shape, made by the same DDL; the raw side stores plain
        // bincode (no envelope), as code written by hand would.
        layer(&url, RAW_TABLE, false).await.close().await.unwrap();
        let l1 = Arc::new(
            MokaLayer::<String, String>::builder()
                .max_capacity(1_000_000)
                .build()
                .unwrap(),
        );
        let cache = MultiLayer::builder()
            .layer(LayerConfig::shared("moka", l1.clone()))
            .layer(LayerConfig::shared("postgres", pg.clone()))
            .build()
            .unwrap();
        let keys: Vec<(String, String)> = (0..KEYS).map(|i| (key(i), value(i))).collect();
        for chunk in keys.chunks(1_000) {
            pg.set_many(chunk, None).await.unwrap();
            let (ks, vs): (Vec<String>, Vec<Vec<u8>>) =
                chunk.iter().map(|(k, v)| (k.clone(), encode(v))).unzip();
            raw.execute(
                &format!(
                    "INSERT INTO \"{RAW_TABLE}\" (key, value) SELECT * FROM unnest($1::text[], $2::bytea[])"
                ),
                &[&ks, &vs],
            )
            .await
            .unwrap();
        }
        (pg, unlogged, l1, cache)
    });
    let raw_get = rt
        .block_on(raw.prepare(&format!(
            "SELECT value FROM \"{RAW_TABLE}\" WHERE key = $1 AND (expires_at IS NULL OR expires_at > now())"
        )))
        .unwrap();
    let upsert = |table: &str| {
        format!(
            "INSERT INTO \"{table}\" (key, value, expires_at, updated_at) VALUES ($1, $2, NULL, now()) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at, \
             updated_at = EXCLUDED.updated_at"
        )
    };
    let raw_set = rt.block_on(raw.prepare(&upsert(RAW_TABLE))).unwrap();
    let raw_moka: moka::sync::Cache<String, String> = moka::sync::Cache::new(1_000_000);
    let next = AtomicU64::new(0);
    let take = || next.fetch_add(1, Ordering::Relaxed) % KEYS;

    // A PostgreSQL hit promoted into moka: setup (not measured) removes the key from L1.
    let mut g = c.benchmark_group("postgres_hit/moka_over_postgres");
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
            |k| {
                let (raw, raw_get, raw_moka) = (&raw, &raw_get, &raw_moka);
                async move {
                    if let Some(v) = raw_moka.get(&k) {
                        return Some(v);
                    }
                    let row = raw.query_opt(raw_get, &[&k]).await.unwrap()?;
                    let v = decode(row.get::<_, &[u8]>(0));
                    raw_moka.insert(k, v.clone());
                    Some(v)
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // Write-through: the upsert committed in PostgreSQL, then the L1 insert.
    let mut g = c.benchmark_group("postgres_write_through/moka_over_postgres");
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
                let (raw, raw_set, raw_moka) = (&raw, &raw_set, &raw_moka);
                async move {
                    raw.execute(raw_set, &[&k, &encode(&v)]).await.unwrap();
                    raw_moka.insert(k, black_box(v));
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // 100 keys: the layer's one `key = ANY($1)` round trip against 100 sequential
    // prepared SELECTs, each decoded.
    let mut g = c.benchmark_group("postgres_get_many/100_keys");
    let batch = || {
        let start = take();
        (start..start + 100)
            .map(|i| key(i % KEYS))
            .collect::<Vec<String>>()
    };
    g.bench_function("capacitor", |b| {
        b.to_async(&rt).iter_batched(
            batch,
            |keys| {
                let pg = &pg;
                async move { pg.get_many(&keys).await.unwrap() }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter_batched(
            batch,
            |keys| {
                let (raw, raw_get) = (&raw, &raw_get);
                async move {
                    let mut out = Vec::with_capacity(keys.len());
                    for k in &keys {
                        let row = raw.query_opt(raw_get, &[k]).await.unwrap();
                        out.push(row.map(|r| decode(r.get::<_, &[u8]>(0))));
                    }
                    out
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // Write-back drain: 2,000 writes through a write-back composer (the drain sends them in
    // `unnest` batches), `flush` included, beside 2,000 sequential raw upserts (+ moka
    // inserts). Target (DESIGN.md §4): the drain at least 5x faster, a ratio <= 0.2.
    const DRAIN: u64 = 2_000;
    let write_back = rt.block_on(async {
        MultiLayer::builder()
            .write_policy(WritePolicy::Back(
                WriteBack::new().batch_size(500).queue_bound(10_000),
            ))
            .layer(LayerConfig::new(
                "moka",
                MokaLayer::<String, String>::builder()
                    .max_capacity(100_000)
                    .build()
                    .unwrap(),
            ))
            .layer(LayerConfig::shared("postgres", pg.clone()))
            .build()
            .unwrap()
    });
    let mut g = c.benchmark_group("write_back_drain/postgres/2000_keys");
    g.sample_size(10);
    g.bench_function("capacitor", |b| {
        b.to_async(&rt).iter(|| {
            let write_back = &write_back;
            async move {
                for i in 0..DRAIN {
                    write_back.set(key(i), value(i)).await.unwrap();
                }
                write_back.flush().await.unwrap();
            }
        })
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter(|| {
            let (raw, raw_set, raw_moka) = (&raw, &raw_set, &raw_moka);
            async move {
                for i in 0..DRAIN {
                    raw.execute(raw_set, &[&key(i), &encode(&value(i))])
                        .await
                        .unwrap();
                    raw_moka.insert(key(i), value(i));
                }
            }
        })
    });
    g.finish();
    rt.block_on(write_back.close()).unwrap();

    // Not capacitor against raw here: "capacitor" is a set through the layer into an
    // UNLOGGED table, "raw" a raw prepared upsert into a logged one, so the ratio shows
    // what `unlogged(true)` buys (no WAL flush per commit) net of the layer's overhead.
    let mut g = c.benchmark_group("postgres_write/unlogged");
    g.bench_function("capacitor", |b| {
        b.to_async(&rt).iter_batched(
            || (key(take()), value(7)),
            |(k, v)| {
                let unlogged = &unlogged;
                async move { unlogged.set(&k, &v, None).await.unwrap() }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter_batched(
            || (key(take()), value(7)),
            |(k, v)| {
                let (raw, raw_set) = (&raw, &raw_set);
                async move { raw.execute(raw_set, &[&k, &encode(&v)]).await.unwrap() }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    rt.block_on(async {
        cache.close().await.unwrap();
        unlogged.close().await.unwrap();
        for table in [CAPACITOR_TABLE, UNLOGGED_TABLE, RAW_TABLE] {
            raw.batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
                .await
                .unwrap();
        }
    });
}

criterion_group!(benches, postgres_benches);
criterion_main!(benches);
