//! The PostgreSQL layer behind `testkit::FaultProxy` (on loopback, in front of the test
//! server `CAPACITOR_POSTGRES_URL`): a stalled network is a typed error within the layer's
//! timeouts, and the layer recovers after a stall, after its connections are closed or
//! reset, and after the server turned connections away for a while.
//!
//! Every test uses a table of its own (dropped by a guard, also on failure, through a
//! direct connection) and runs under a timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::{unique_table, url, TableGuard};
use capacitor_core::testkit::{within, FaultProxy};
use capacitor_core::{ErrorKind, Layer};
use capacitor_postgres::PostgresLayer;
use tokio_postgres::config::Host;

const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// The layer's statement timeout and its pool's wait, create and recycle timeouts: long
/// beside a healthy operation even while the whole suite runs on two cores, short beside
/// the stall (which lasts until the test resumes it).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);
const POOL_TIMEOUT: Duration = Duration::from_secs(2);
/// What an operation may take beyond its timeout.
const MARGIN: Duration = Duration::from_secs(2);
/// How long the layer has to work again after a fault ends.
const RECOVERY: Duration = Duration::from_secs(15);

fn s(x: &str) -> String {
    x.to_owned()
}

/// The test server's address, and its connection settings with the host and port replaced
/// by `via` (the user, password, database and options kept).
async fn server() -> (SocketAddr, tokio_postgres::Config) {
    let parsed: tokio_postgres::Config = url().parse().expect("CAPACITOR_POSTGRES_URL parses");
    let host = match parsed.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        other => panic!("these tests need a TCP host in CAPACITOR_POSTGRES_URL, not {other:?}"),
    };
    let port = parsed.get_ports().first().copied().unwrap_or(5432);
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("resolve the PostgreSQL host")
        .next()
        .expect("an address for the PostgreSQL host");
    (addr, parsed)
}

fn through(parsed: &tokio_postgres::Config, via: SocketAddr) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    if let Some(user) = parsed.get_user() {
        config.user(user);
    }
    if let Some(password) = parsed.get_password() {
        config.password(password);
    }
    if let Some(db) = parsed.get_dbname() {
        config.dbname(db);
    }
    if let Some(options) = parsed.get_options() {
        config.options(options);
    }
    config.host(via.ip().to_string()).port(via.port());
    config
}

struct Fixture {
    proxy: FaultProxy,
    layer: PostgresLayer<String, String>,
    _guard: TableGuard,
}

impl Fixture {
    async fn new(what: &str) -> Fixture {
        let (server, parsed) = server().await;
        let proxy = FaultProxy::start(server).await.expect("start the proxy");
        let table = unique_table(what);
        let guard = TableGuard(table.clone());
        let layer = PostgresLayer::builder()
            .config(through(&parsed, proxy.addr()))
            .table(&table)
            .pool_size(2)
            .statement_timeout(STATEMENT_TIMEOUT)
            .wait_timeout(POOL_TIMEOUT)
            .create_timeout(POOL_TIMEOUT)
            .recycle_timeout(POOL_TIMEOUT)
            .sweeper(false)
            .build::<String, String>()
            .await
            .unwrap_or_else(|e| panic!("build through the proxy (is PostgreSQL running?): {e}"));
        Fixture {
            proxy,
            layer,
            _guard: guard,
        }
    }

    /// Retries `get(key)` until it returns `expected` (every error on the way being a
    /// temporary one, and no attempt hanging), failing the test after [`RECOVERY`].
    async fn recovers(&self, key: &str, expected: &str) -> Duration {
        let started = Instant::now();
        loop {
            let attempt = tokio::time::timeout(STATEMENT_TIMEOUT + MARGIN, self.layer.get(&s(key))).await;
            match attempt {
                Ok(Ok(found)) => {
                    assert_eq!(found.map(|e| e.value), Some(s(expected)), "a wrong row");
                    return started.elapsed();
                }
                Ok(Err(e)) => {
                    assert!(
                        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
                        "an untyped error while recovering: {e}"
                    );
                    assert!(
                        started.elapsed() < RECOVERY,
                        "the layer did not recover within {RECOVERY:?}: {e}"
                    );
                }
                Err(_) => panic!(
                    "a get hung past {:?} while recovering",
                    STATEMENT_TIMEOUT + MARGIN
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Distinct writes and reads all match.
    async fn consistent(&self, round: usize) {
        for i in 0..20 {
            let (k, v) = (format!("c{i}"), format!("v{round}_{i}"));
            self.layer.set(&k, &v, None).await.expect("set after recovery");
        }
        for i in 0..20 {
            let got = self
                .layer
                .get(&format!("c{i}"))
                .await
                .expect("get after recovery");
            assert_eq!(got.map(|e| e.value), Some(format!("v{round}_{i}")));
        }
    }

    async fn close(self) {
        self.layer.close().await.expect("close");
        self.proxy.stop();
    }
}

/// Runs `op`, asserting it fails with `Timeout` or `Unavailable` within the statement
/// timeout and the margin (and does not hang).
async fn fails_in_time<T: std::fmt::Debug>(what: &str, op: impl Future<Output = capacitor_core::Result<T>>) {
    let started = Instant::now();
    let outcome = tokio::time::timeout(STATEMENT_TIMEOUT + MARGIN, op).await;
    let took = started.elapsed();
    let result = outcome.unwrap_or_else(|_| {
        panic!("{what} hung: no result within the statement timeout ({STATEMENT_TIMEOUT:?}) + {MARGIN:?}")
    });
    let err = result.expect_err("an operation over a stalled network fails");
    assert!(
        matches!(err.kind(), ErrorKind::Timeout | ErrorKind::Unavailable),
        "{what}: {err}"
    );
    assert!(took <= STATEMENT_TIMEOUT + MARGIN, "{what} took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_network_fails_in_time_then_the_layer_recovers() {
    within(TEST_TIMEOUT, async {
        let f = Fixture::new("pstall").await;
        f.layer.set(&s("k"), &s("v"), None).await.expect("set");
        assert_eq!(
            f.layer.get(&s("k")).await.expect("get").map(|e| e.value),
            Some(s("v"))
        );

        f.proxy.stall();
        fails_in_time("get", f.layer.get(&s("k"))).await;
        fails_in_time("set", f.layer.set(&s("k"), &s("v"), None)).await;

        f.proxy.resume();
        let took = f.recovers("k", "v").await;
        eprintln!("recovered {took:?} after the resume");
        f.consistent(0).await;
        f.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_and_reset_connections_are_replaced() {
    within(TEST_TIMEOUT, async {
        let f = Fixture::new("preset").await;
        f.layer.set(&s("k"), &s("v"), None).await.expect("set");

        for (round, reset) in [(1, true), (2, false), (3, true)] {
            let accepted = f.proxy.accepted();
            if reset {
                f.proxy.reset_connections();
            } else {
                f.proxy.drop_connections();
            }
            let took = f.recovers("k", "v").await;
            eprintln!(
                "recovered {took:?} after {}",
                if reset { "a reset" } else { "a close" }
            );
            assert!(f.proxy.accepted() > accepted, "the layer reconnected");
            f.consistent(round).await;
        }
        f.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_turning_connections_away_is_unavailable_then_the_layer_rejoins() {
    within(TEST_TIMEOUT, async {
        let f = Fixture::new("pdown").await;
        f.layer.set(&s("k"), &s("v"), None).await.expect("set");

        f.proxy.refuse(true);
        f.proxy.reset_connections();
        let down = Instant::now() + Duration::from_secs(1);
        while Instant::now() < down {
            fails_in_time("get while down", f.layer.get(&s("k"))).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        f.proxy.refuse(false);
        let took = f.recovers("k", "v").await;
        eprintln!("rejoined {took:?} after the server came back");
        f.consistent(0).await;
        f.close().await;
    })
    .await;
}

/// A layer through `proxy` on `table` whose operations give up after `timeout`.
async fn layer_with_timeout(
    proxy: &FaultProxy,
    table: &str,
    timeout: Duration,
) -> PostgresLayer<String, String> {
    let (_, parsed) = server().await;
    PostgresLayer::builder()
        .config(through(&parsed, proxy.addr()))
        .table(table)
        .pool_size(4)
        .statement_timeout(STATEMENT_TIMEOUT)
        .operation_timeout(timeout)
        .wait_timeout(POOL_TIMEOUT)
        .create_timeout(POOL_TIMEOUT)
        .recycle_timeout(POOL_TIMEOUT)
        .sweeper(false)
        .build::<String, String>()
        .await
        .expect("build through the proxy")
}

/// A write delayed past its timeout reaches the server after a later write of its key was
/// acknowledged: the server must keep the later one (the delayed statement carries a
/// deadline it arrives after), and the later write must not be sent before that deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_timed_out_never_lands_after_a_later_acknowledged_write() {
    within(TEST_TIMEOUT, async {
        let f = Fixture::new("pfence").await;
        let table = f._guard.0.clone();
        let layer = layer_with_timeout(&f.proxy, &table, Duration::from_millis(400)).await;
        layer.set(&s("k"), &s("v1"), None).await.expect("set v1");
        layer.delete(&s("gone")).await.expect("delete");

        // v2 (and a delete) spend 1.5 s on the way: their timeout ends long before.
        f.proxy.set_latency(Duration::from_millis(1_500));
        let err = layer
            .set(&s("k"), &s("v2"), None)
            .await
            .expect_err("v2 times out");
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        let err = layer.delete(&s("k2")).await.expect_err("the delete times out");
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        f.proxy.set_latency(Duration::ZERO);

        // v3 is acknowledged (after waiting out v2's deadline), then v2's bytes arrive.
        layer.set(&s("k2"), &s("kept"), None).await.expect("set k2");
        layer.set(&s("k"), &s("v3"), None).await.expect("set v3");
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(
            f.layer.get(&s("k")).await.expect("get").map(|e| e.value),
            Some(s("v3")),
            "the acknowledged write was overwritten by the one that timed out"
        );
        assert_eq!(
            f.layer.get(&s("k2")).await.expect("get").map(|e| e.value),
            Some(s("kept")),
            "a delete that timed out removed a later write"
        );
        layer.close().await.expect("close");
        f.close().await;
    })
    .await;
}

/// As above with the composer's write timeout (200 ms) shorter than the layer's (2 s):
/// the composer drops the layer's future, and the layer still fences what it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_abandoned_by_the_composer_never_lands_after_a_later_one() {
    use capacitor_core::testkit::MapLayer;
    use capacitor_core::{LayerConfig, MultiLayer};
    use std::sync::Arc;

    within(TEST_TIMEOUT, async {
        let f = Fixture::new("pfence2").await;
        let table = f._guard.0.clone();
        let store = layer_with_timeout(&f.proxy, &table, Duration::from_secs(2)).await;
        let l1 = Arc::new(MapLayer::<String, String>::new());
        let cache = MultiLayer::builder()
            .layer(LayerConfig::shared(
                "l1",
                l1.clone() as Arc<dyn Layer<String, String>>,
            ))
            .layer(LayerConfig::new("postgres", store).write_timeout(Duration::from_millis(200)))
            .build()
            .expect("composer");
        cache.set(s("k"), s("v1")).await.expect("set v1");

        f.proxy.set_latency(Duration::from_millis(1_500));
        let err = cache.set(s("k"), s("v2")).await.expect_err("v2 times out");
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        f.proxy.set_latency(Duration::ZERO);

        // The layer holds v3 back until v2's deadline (2 s) has passed: retry until then.
        let started = Instant::now();
        loop {
            match cache.set(s("k"), s("v3")).await {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::Timeout && started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("set v3: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(
            f.layer.get(&s("k")).await.expect("get").map(|e| e.value),
            Some(s("v3")),
            "the store holds the write that timed out"
        );
        assert_eq!(cache.get(&s("k")).await.expect("get"), Some(s("v3")));
        if let Some(copy) = l1.raw_entry(&s("k")) {
            assert_eq!(copy.value, s("v3"), "L1 disagrees with the store");
        }
        cache.close().await.expect("close");
        f.proxy.stop();
    })
    .await;
}
