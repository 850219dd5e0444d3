//! Resilience against the real servers, through the test kit's fault-injecting TCP proxy
//! (`FaultProxy`) on loopback: Redis stalls, Redis flaps, PostgreSQL goes down with and
//! without fail-safe. In every scenario, every acknowledged write is read back afterwards.
//!
//! Needs Redis (`CAPACITOR_REDIS_URL`, default redis://127.0.0.1:6379) and PostgreSQL
//! (`CAPACITOR_POSTGRES_URL`, default postgres://postgres@127.0.0.1:5432/test); `cargo
//! xtask test` makes sure both answer.
#![cfg(all(feature = "memory", feature = "redis", feature = "postgres"))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capacitor::memory::MokaLayer;
use capacitor::postgres::tokio_postgres;
use capacitor::postgres::PostgresLayer;
use capacitor::redis::RedisLayer;
use capacitor::{
    BreakerState, CircuitBreaker, ErrorKind, FailSafe, HealthEvent, Layer, LayerConfig, MultiLayer,
};
use capacitor_core::testkit::FaultProxy;

/// Redis's read timeout (the one a stall costs a read).
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// Redis's write timeout: the writes made while Redis is healthy must succeed, also while
/// the whole suite starts on two cores.
const REDIS_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// PostgreSQL's layer timeout where PostgreSQL is the layer that fails.
const POSTGRES_TIMEOUT: Duration = Duration::from_millis(500);
/// PostgreSQL's layer timeout where it is not the layer under test: long enough that a
/// first statement on a new connection, while the whole suite starts at once on two
/// cores, is not mistaken for an outage (CI once saw a 500 ms timeout expire there).
const POSTGRES_HEALTHY_TIMEOUT: Duration = Duration::from_secs(5);
/// What a read may take beyond the timeout that bounds it (a loaded 2-core machine).
/// Without the timeout the read would wait for as long as the fault lasts.
const MARGIN: Duration = Duration::from_millis(1_000);

use crate::common::{postgres_url, redis_url};

/// A proxy in front of the server of `url`, and `url` pointed at the proxy.
async fn proxied(url: &str, default_port: u16) -> (FaultProxy, String) {
    FaultProxy::in_front_of(url, default_port)
        .await
        .expect("start the proxy")
}

fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("res_{what}_{}_{nanos}", std::process::id())
}

async fn postgres(url: &str, table: &str) -> PostgresLayer<String, String> {
    PostgresLayer::builder()
        .url(url)
        .table(table)
        .pool_size(4)
        .create_timeout(Duration::from_secs(1))
        .wait_timeout(Duration::from_secs(1))
        .statement_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("PostgreSQL layer (is the server up? `cargo xtask test` starts it)")
}

/// Reads every `(key, value)` straight from the real server (no proxy), then drops the
/// table.
async fn assert_stored(table: &str, expected: &[(String, String)]) {
    let direct = postgres(&postgres_url(), table).await;
    for (k, v) in expected {
        let found = direct.get(k).await.unwrap().map(|e| e.value);
        assert_eq!(
            found.as_deref(),
            Some(v.as_str()),
            "acknowledged write of {k} lost"
        );
    }
    direct.close().await.unwrap();
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS \"public\".\"{table}\""))
        .await
        .unwrap();
    drop(client);
    let _ = task.await;
}

struct Stack {
    cache: MultiLayer<String, String>,
    l1: Arc<MokaLayer<String, String>>,
    events: Arc<Mutex<Vec<HealthEvent>>>,
}

impl Stack {
    /// moka → Redis (through `redis_url`, if any) → PostgreSQL.
    async fn new(
        redis_url: Option<&str>,
        pg: PostgresLayer<String, String>,
        pg_timeout: Duration,
        fail_safe: bool,
        l1_ttl: Duration,
    ) -> Stack {
        let l1 = Arc::new(MokaLayer::builder().max_capacity(10_000).build().unwrap());
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let mut builder = MultiLayer::builder()
            .name("resilience")
            .on_health_change(move |e| seen.lock().unwrap().push(e.clone()))
            .layer(LayerConfig::shared("l1", l1.clone()).ttl(l1_ttl));
        if let Some(url) = redis_url {
            let redis = RedisLayer::builder()
                .url(url)
                .prefix(format!("{}:", unique("redis")))
                .command_timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            redis.connect().await.expect("Redis answers through the proxy");
            builder = builder.layer(
                LayerConfig::new("redis", redis)
                    .read_timeout(REDIS_TIMEOUT)
                    .write_timeout(REDIS_WRITE_TIMEOUT)
                    .circuit_breaker(
                        CircuitBreaker::new()
                            .failures(3)
                            .cool_down(Duration::from_millis(500)),
                    ),
            );
        }
        builder = builder.layer(LayerConfig::new("postgres", pg).timeout(pg_timeout));
        if fail_safe {
            builder = builder.fail_safe(FailSafe::new(Duration::from_secs(60)));
        }
        Stack {
            cache: builder.build().unwrap(),
            l1,
            events,
        }
    }

    async fn evict_l1(&self, keys: &[String]) {
        for k in keys {
            self.l1.delete(k).await.unwrap();
        }
    }

    fn breaker(&self, layer: &str) -> BreakerState {
        self.cache.stats().layer(layer).unwrap().breaker
    }

    /// Reads `key` (L1 evicted first) until `layer`'s breaker is `state`.
    async fn read_until(&self, key: &String, layer: &str, state: BreakerState, within: Duration) {
        let deadline = Instant::now() + within;
        while self.breaker(layer) != state {
            assert!(
                Instant::now() < deadline,
                "{layer}'s breaker not {state} within {within:?}: {}",
                self.cache.stats()
            );
            self.evict_l1(std::slice::from_ref(key)).await;
            let _ = self.cache.get(key).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("key:{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stalled_reads_finish_within_its_timeout_from_l1_and_postgres() {
    let (proxy, via) = proxied(&redis_url(), 6379).await;
    let table = unique("stall");
    let s = Stack::new(
        Some(&via),
        postgres(&postgres_url(), &table).await,
        POSTGRES_HEALTHY_TIMEOUT,
        false,
        Duration::from_secs(60),
    )
    .await;
    let keys = keys(20);
    for k in &keys {
        s.cache.set(k.clone(), "v1".into()).await.unwrap();
    }
    let redis = s.cache.stats().layer("redis").cloned().unwrap();
    assert_eq!(
        (redis.sets, redis.errors),
        (20, 0),
        "Redis works before the stall: {redis:?}"
    );
    s.evict_l1(&keys[10..]).await; // half in L1, half only below

    proxy.stall();
    let mut slowest = Duration::ZERO;
    for k in &keys {
        let started = Instant::now();
        assert_eq!(s.cache.get(k).await.unwrap().as_deref(), Some("v1"));
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < REDIS_TIMEOUT + MARGIN,
        "a stalled Redis cost a read {slowest:?} (timeout {REDIS_TIMEOUT:?})"
    );
    let redis = s.cache.stats().layer("redis").cloned().unwrap();
    assert!(redis.timeouts >= 3, "{redis:?}");
    assert_eq!(redis.breaker, BreakerState::Open, "3 timeouts open it: {redis:?}");
    assert!(redis.skipped >= 1, "later reads skip Redis: {redis:?}");

    // Writes while Redis is stalled are acknowledged by PostgreSQL; Redis keeps "v1".
    for k in &keys[..10] {
        s.cache.set(k.clone(), "v2".into()).await.unwrap();
    }
    proxy.resume();
    s.read_until(&keys[19], "redis", BreakerState::Closed, Duration::from_secs(10))
        .await;
    s.evict_l1(&keys).await;
    for (i, k) in keys.iter().enumerate() {
        let want = if i < 10 { "v2" } else { "v1" };
        assert_eq!(
            s.cache.get(k).await.unwrap().as_deref(),
            Some(want),
            "{k}: Redis's outdated copy must not be served"
        );
    }
    let expected: Vec<(String, String)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), if i < 10 { "v2" } else { "v1" }.to_owned()))
        .collect();
    s.cache.close().await.unwrap();
    proxy.stop();
    assert_stored(&table, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flapping_opens_the_breaker_which_closes_after_it_recovers() {
    let (proxy, via) = proxied(&redis_url(), 6379).await;
    let table = unique("flap");
    let s = Stack::new(
        Some(&via),
        postgres(&postgres_url(), &table).await,
        POSTGRES_HEALTHY_TIMEOUT,
        false,
        Duration::from_secs(60),
    )
    .await;
    let probe = "probe".to_string();
    s.cache.set(probe.clone(), "p".into()).await.unwrap();
    s.evict_l1(std::slice::from_ref(&probe)).await;
    s.cache.get(&probe).await.unwrap();
    let redis = s.cache.stats().layer("redis").cloned().unwrap();
    assert_eq!(
        (redis.sets, redis.hits, redis.errors),
        (1, 1, 0),
        "Redis works at first: {redis:?}"
    );
    let mut acked = Vec::new();
    for cycle in 0..3 {
        // Down: connections reset, new ones refused.
        proxy.refuse(true);
        proxy.reset_connections();
        s.read_until(&probe, "redis", BreakerState::Open, Duration::from_secs(10))
            .await;
        let k = format!("written-while-down:{cycle}");
        s.cache.set(k.clone(), format!("c{cycle}")).await.unwrap();
        acked.push((k, format!("c{cycle}")));
        // Up again.
        proxy.refuse(false);
        s.read_until(&probe, "redis", BreakerState::Closed, Duration::from_secs(15))
            .await;
        let k = format!("written-while-up:{cycle}");
        s.cache.set(k.clone(), format!("u{cycle}")).await.unwrap();
        acked.push((k, format!("u{cycle}")));
    }
    let events: Vec<(BreakerState, BreakerState)> =
        s.events.lock().unwrap().iter().map(|e| (e.from, e.to)).collect();
    let opened = events
        .iter()
        .filter(|t| t.1 == BreakerState::Open && t.0 == BreakerState::Closed)
        .count();
    let closed = events.iter().filter(|t| t.1 == BreakerState::Closed).count();
    assert_eq!(
        (opened, closed),
        (3, 3),
        "one open and one close per flap: {events:?}"
    );
    assert!(s.events.lock().unwrap().iter().all(|e| e.layer == "redis"));
    let redis = s.cache.stats().layer("redis").cloned().unwrap();
    assert_eq!(
        redis.breaker_opens as usize,
        events.iter().filter(|t| t.1 == BreakerState::Open).count()
    );
    s.evict_l1(&acked.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
        .await;
    for (k, v) in &acked {
        assert_eq!(s.cache.get(k).await.unwrap().as_ref(), Some(v), "{k}");
    }
    s.cache.close().await.unwrap();
    proxy.stop();
    assert_stored(&table, &acked).await;
}

/// moka (1 s TTL) → PostgreSQL through a proxy; 10 keys written and read, then the
/// proxy goes down (connections reset, new ones refused) and the L1 copies expire.
async fn postgres_goes_down(fail_safe: bool) -> (Stack, FaultProxy, String, Vec<(String, String)>) {
    let table = unique(if fail_safe { "fs_on" } else { "fs_off" });
    let (proxy, via) = proxied(&postgres_url(), 5432).await;
    let s = Stack::new(
        None,
        postgres(&via, &table).await,
        POSTGRES_TIMEOUT,
        fail_safe,
        Duration::from_secs(1),
    )
    .await;
    let written: Vec<(String, String)> = keys(10)
        .into_iter()
        .map(|k| (k.clone(), format!("value of {k}")))
        .collect();
    // Setup, not the subject: a write that timed out under the load of the whole suite
    // starting is retried (the same value: landing twice is harmless).
    for (k, v) in &written {
        let mut tries = 0;
        while let Err(e) = s.cache.set(k.clone(), v.clone()).await {
            tries += 1;
            assert!(
                e.kind() == ErrorKind::Timeout && tries < 5,
                "setup write of {k}: {e}"
            );
        }
    }
    proxy.refuse(true);
    proxy.reset_connections();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    (s, proxy, table, written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_with_fail_safe_serves_stale_hits_and_no_errors() {
    let (s, proxy, table, written) = postgres_goes_down(true).await;
    for (k, v) in &written {
        let started = Instant::now();
        assert_eq!(s.cache.get(k).await.unwrap().as_ref(), Some(v), "{k}");
        assert!(
            started.elapsed() < POSTGRES_TIMEOUT + MARGIN,
            "{:?}",
            started.elapsed()
        );
    }
    let stats = s.cache.stats();
    let fail_safe = stats.fail_safe.clone().unwrap();
    assert_eq!(fail_safe.stale_hits, 10, "{stats}");
    assert!(stats.layer("postgres").unwrap().errors >= 10, "{stats}");
    // A key never seen has no copy: a typed error.
    let err = s.cache.get(&"never-written".to_string()).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Timeout | ErrorKind::Unavailable),
        "{err}"
    );
    // A write while down is refused, not acknowledged.
    let err = s.cache.set("during".into(), "x".into()).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Timeout | ErrorKind::Unavailable),
        "{err}"
    );
    proxy.refuse(false);
    // Back: fresh reads again (eventually, as the pool reconnects).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        s.l1.delete(&written[0].0).await.unwrap();
        let before = s.cache.stats().fail_safe.unwrap().stale_hits;
        let value = s.cache.get(&written[0].0).await.unwrap();
        assert_eq!(value.as_ref(), Some(&written[0].1));
        if s.cache.stats().fail_safe.unwrap().stale_hits == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PostgreSQL did not come back: {}",
            s.cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.cache.close().await.unwrap();
    proxy.stop();
    assert_stored(&table, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_without_fail_safe_is_a_typed_error_within_the_timeout() {
    let (s, proxy, table, written) = postgres_goes_down(false).await;
    for (k, _) in &written {
        let started = Instant::now();
        let err = s.cache.get(k).await.unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::Timeout | ErrorKind::Unavailable),
            "{err}"
        );
        assert_eq!(err.layer(), Some("postgres"));
        assert!(
            started.elapsed() < POSTGRES_TIMEOUT + MARGIN,
            "{:?}",
            started.elapsed()
        );
    }
    assert!(s.cache.stats().fail_safe.is_none());
    proxy.refuse(false);
    let deadline = Instant::now() + Duration::from_secs(15);
    for (k, v) in &written {
        loop {
            match s.cache.get(k).await {
                Ok(found) => {
                    assert_eq!(found.as_ref(), Some(v), "{k}");
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("PostgreSQL did not come back: {e}"),
            }
        }
    }
    s.cache.close().await.unwrap();
    proxy.stop();
    assert_stored(&table, &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_starts_with_redis_down_and_redis_joins_when_it_comes_up() {
    let (proxy, via) = proxied(&redis_url(), 6379).await;
    proxy.refuse(true); // Redis "not up yet"
    let table = unique("late");
    let pg = postgres(&postgres_url(), &table).await;
    let redis = RedisLayer::builder()
        .url(&via)
        .prefix(format!("{}:", unique("late")))
        .build()
        .unwrap(); // no connect(): it connects in the background
    let cache = MultiLayer::<String, String>::builder()
        .layer(LayerConfig::new(
            "l1",
            MokaLayer::builder().max_capacity(100).build().unwrap(),
        ))
        .layer(
            LayerConfig::new("redis", redis)
                .timeout(REDIS_TIMEOUT)
                .circuit_breaker(
                    CircuitBreaker::new()
                        .failures(3)
                        .cool_down(Duration::from_millis(300)),
                ),
        )
        .layer(LayerConfig::new("postgres", pg))
        .build()
        .expect("builds with Redis down");
    let mut acked = Vec::new();
    for i in 0..5 {
        let (k, v) = (format!("early:{i}"), format!("e{i}"));
        cache.set(k.clone(), v.clone()).await.unwrap();
        assert_eq!(cache.get(&k).await.unwrap().as_ref(), Some(&v));
        acked.push((k, v));
    }
    assert_eq!(cache.stats().layer("redis").unwrap().sets, 0);
    proxy.refuse(false);
    // Redis joins: writes reach it again, without rebuilding anything.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut i = 0;
    while cache.stats().layer("redis").unwrap().sets == 0 {
        assert!(Instant::now() < deadline, "Redis never joined: {}", cache.stats());
        let (k, v) = (format!("late:{i}"), format!("l{i}"));
        cache.set(k.clone(), v.clone()).await.unwrap();
        acked.push((k, v));
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        cache.stats().layer("redis").unwrap().breaker,
        BreakerState::Closed
    );
    for (k, v) in &acked {
        assert_eq!(cache.get(k).await.unwrap().as_ref(), Some(v), "{k}");
    }
    cache.close().await.unwrap();
    proxy.stop();
    assert_stored(&table, &acked).await;
}
