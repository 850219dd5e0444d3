//! Read latency with Redis stalled behind the test kit's fault proxy, beside the floor it
//! should cost: the configured timeout plus a PostgreSQL read (breaker off), or the
//! PostgreSQL read alone (breaker open).
//!
//! Stack: Redis (through a `FaultProxy`, stalled for the whole suite) → PostgreSQL, no L1
//! and no promotion, so that every read asks Redis. `raw` is the floor measured in the
//! same group: `tokio::time::sleep(timeout)` then a read of the same PostgreSQL layer
//! (breaker off), or just that read (breaker open).
//!
//! Needs Redis (`CAPACITOR_REDIS_URL`) and PostgreSQL (`CAPACITOR_POSTGRES_URL`); without
//! them the suite prints why and measures nothing.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use capacitor::postgres::PostgresLayer;
use capacitor::redis::RedisLayer;
use capacitor::{CircuitBreaker, Layer, LayerConfig, MultiLayer};
use capacitor_benches::{key, postgres_url, redis_url, run_id, value};
use capacitor_core::testkit::FaultProxy;
use criterion::{criterion_group, criterion_main, Criterion};

const TIMEOUT: Duration = Duration::from_millis(20);

fn stalled_redis(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let run = run_id();
    let table = format!("bench_{run}_stall");
    let setup = rt.block_on(async {
        let (proxy, via) = FaultProxy::in_front_of(&redis_url(), 6379)
            .await
            .map_err(|e| format!("cannot put a proxy in front of Redis ({e})"))?;
        let pg = Arc::new(
            PostgresLayer::builder()
                .url(postgres_url())
                .table(&table)
                .build::<String, String>()
                .await
                .map_err(|e| format!("PostgreSQL is not reachable ({e})"))?,
        );
        let redis = || {
            RedisLayer::builder()
                .url(&via)
                .prefix(format!("bench:{run}:stall:"))
                .build::<String, String>()
        };
        let (plain, breaker) = (
            redis().map_err(|e| e.to_string())?,
            redis().map_err(|e| e.to_string())?,
        );
        plain
            .connect()
            .await
            .map_err(|e| format!("Redis is not reachable ({e})"))?;
        breaker
            .connect()
            .await
            .map_err(|e| format!("Redis is not reachable ({e})"))?;
        pg.set(&key(1), &value(1), None)
            .await
            .map_err(|e| e.to_string())?;
        let compose = |redis: RedisLayer<String, String>, on: bool| {
            let mut cfg = LayerConfig::new("redis", redis).timeout(TIMEOUT);
            cfg = if on {
                cfg.circuit_breaker(
                    CircuitBreaker::new()
                        .failures(1)
                        .cool_down(Duration::from_secs(3_600)),
                )
            } else {
                cfg.no_circuit_breaker()
            };
            MultiLayer::<String, String>::builder()
                .promotion(false)
                .layer(cfg)
                .layer(LayerConfig::shared("postgres", pg.clone()))
                .build()
                .unwrap()
        };
        Ok::<_, String>((proxy, pg.clone(), compose(plain, false), compose(breaker, true)))
    });
    let (proxy, pg, no_breaker, with_breaker) = match setup {
        Ok(parts) => parts,
        Err(why) => {
            eprintln!("resilience benches skipped: {why}");
            return;
        }
    };
    proxy.stall();
    let k = key(1);
    let mut g = c.benchmark_group(format!("redis_stalled_read/timeout_{}ms", TIMEOUT.as_millis()));
    g.sample_size(10);
    g.bench_function("capacitor", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(no_breaker.get(&k).await.unwrap()) })
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt).iter(|| async {
            tokio::time::sleep(TIMEOUT).await;
            black_box(pg.get(&k).await.unwrap())
        })
    });
    g.finish();
    // The breaker opens on the first timeout; from then on Redis is skipped.
    rt.block_on(with_breaker.get(&k)).unwrap();
    let mut g = c.benchmark_group("redis_stalled_read/breaker_open");
    g.bench_function("capacitor", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(with_breaker.get(&k).await.unwrap()) })
    });
    g.bench_function("raw", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(pg.get(&k).await.unwrap()) })
    });
    g.finish();
    proxy.resume();
    rt.block_on(async {
        let stats = no_breaker.stats();
        eprintln!("{stats}");
        let _ = no_breaker.close().await;
        let _ = with_breaker.close().await;
        let (client, conn) = capacitor::postgres::tokio_postgres::connect(
            &postgres_url(),
            capacitor::postgres::tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        let task = tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
            .await;
        drop(client);
        let _ = task.await;
    });
    proxy.stop();
}

criterion_group!(benches, stalled_redis);
criterion_main!(benches);
