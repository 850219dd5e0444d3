//! memory + PostgreSQL beside raw tokio-postgres and raw moka, in the same criterion groups.
//!
//! The raw side is what a user writes by hand: one tokio-postgres connection with prepared
//! statements, postcard, and a moka cache. Both sides run on the same tokio runtime
//! (`b.to_async(&rt)`), against the same server, on tables of the same shape (the layer's
//! DDL), so the executor and the server cost the same on both sides.
//!
//! Needs a server at `CAPACITOR_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); without one the suite prints why and
//! measures nothing. Its tables are named after the run (`bench_<run id>_…`), made by the
//! suite and dropped at the end: nothing else on the server is touched.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use capacitor::memory::MokaLayer;
use capacitor::postgres::PostgresLayer;
use capacitor::{Layer, LayerConfig, MultiLayer, WriteBack, WritePolicy};
use capacitor_benches::peer::postgres_client;
use capacitor_benches::{decode, encode, key, postgres_url, run_id, size, value};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

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
    let url = postgres_url();
    let keys = size(10_000, 2_000);
    let run = run_id();
    let capacitor_table = format!("bench_{run}_capacitor");
    let unlogged_table = format!("bench_{run}_unlogged");
    let raw_table = format!("bench_{run}_raw");
    // One thread: the connections' tasks and the benchmark share it, on both sides.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let raw = match rt.block_on(postgres_client(&url)) {
        Ok(client) => Arc::new(client),
        Err(why) => {
            eprintln!(
                "postgres benches skipped: PostgreSQL is not reachable ({why}); set CAPACITOR_POSTGRES_URL"
            );
            return;
        }
    };
    let (pg, unlogged, l1, cache) = rt.block_on(async {
        let pg = Arc::new(layer(&url, &capacitor_table, false).await);
        let unlogged = Arc::new(layer(&url, &unlogged_table, true).await);
        // The raw table: the same shape, made by the same DDL; the raw side stores plain
        // postcard (no envelope), as code written by hand would.
        layer(&url, &raw_table, false).await.close().await.unwrap();
        let l1 = Arc::new(
            MokaLayer::builder()
                .max_capacity(1_000_000)
                .build::<String, String>()
                .unwrap(),
        );
        let cache = MultiLayer::builder()
            .layer(LayerConfig::shared("moka", l1.clone()))
            .layer(LayerConfig::shared("postgres", pg.clone()))
            .build()
            .unwrap();
        let keys: Vec<(String, String)> = (0..keys).map(|i| (key(i), value(i))).collect();
        for chunk in keys.chunks(1_000) {
            pg.set_many(chunk, None).await.unwrap();
            let (ks, vs): (Vec<String>, Vec<Vec<u8>>) =
                chunk.iter().map(|(k, v)| (k.clone(), encode(v))).unzip();
            raw.execute(
                &format!(
                    "INSERT INTO \"{raw_table}\" (key, value) SELECT * FROM unnest($1::text[], $2::bytea[])"
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
            "SELECT value FROM \"{raw_table}\" WHERE key = $1 AND (expires_at IS NULL OR expires_at > now())"
        )))
        .unwrap();
    let upsert = |table: &str| {
        format!(
            "INSERT INTO \"{table}\" (key, value, expires_at, updated_at) VALUES ($1, $2, NULL, now()) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at, \
             updated_at = EXCLUDED.updated_at"
        )
    };
    let raw_set = rt.block_on(raw.prepare(&upsert(&raw_table))).unwrap();
    let raw_moka: moka::sync::Cache<String, String> = moka::sync::Cache::new(1_000_000);
    let next = AtomicU64::new(0);
    let take = || next.fetch_add(1, Ordering::Relaxed) % keys;

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
            .map(|i| key(i % keys))
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

    // Write-back drain: 2,000 writes (500 in a quick run) through a write-back composer
    // (the drain sends them in `unnest` batches), `flush` included, beside as many
    // sequential raw upserts (+ moka inserts). Target: the drain at least
    // 5x faster, a ratio <= 0.2.
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
            .layer(LayerConfig::shared("postgres", pg.clone()))
            .build()
            .unwrap()
    });
    let mut g = c.benchmark_group(format!("write_back_drain/postgres/{drain}_keys"));
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
            let (raw, raw_set, raw_moka) = (&raw, &raw_set, &raw_moka);
            async move {
                for i in 0..drain {
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
        for table in [&capacitor_table, &unlogged_table, &raw_table] {
            raw.batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
                .await
                .unwrap();
        }
    });
}

criterion_group!(benches, postgres_benches);
criterion_main!(benches);
