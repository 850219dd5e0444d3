//! The Redis layer behind `testkit::FaultProxy` (on loopback, in front of the test server
//! `CAPACITOR_REDIS_URL`): a stalled network is a typed error within the command timeout,
//! and the layer recovers after a stall, after its connections are closed or reset, and
//! after the server turned connections away for a while.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common;

use std::future::Future;
use std::time::{Duration, Instant};

use crate::common::{delete_prefix, raw, unique_prefix, url};
use capacitor_core::testkit::FaultProxy;
use capacitor_core::{ErrorKind, Layer};
use capacitor_redis::fred::prelude::ClientLike;
use capacitor_redis::{Reconnect, RedisLayer};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Long enough that the operations that must succeed (connect, the writes and reads
/// around a fault) do on a loaded machine.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// What an operation may take beyond the command timeout.
const MARGIN: Duration = Duration::from_secs(2);
/// How long the layer has to work again after a fault ends (a few command timeouts).
const RECOVERY: Duration = Duration::from_secs(10);

fn s(x: &str) -> String {
    x.to_owned()
}

struct Fixture {
    proxy: FaultProxy,
    layer: RedisLayer<String, String>,
    prefix: String,
}

impl Fixture {
    async fn new(what: &str) -> Fixture {
        let (proxy, via) = FaultProxy::in_front_of(&url(), 6379)
            .await
            .expect("start the proxy in front of the Redis server");
        let prefix = unique_prefix(what);
        let layer = RedisLayer::builder()
            .url(&via)
            .prefix(&prefix)
            .pool_size(2)
            .command_timeout(COMMAND_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .reconnect(Reconnect::Constant(Duration::from_millis(50)))
            .build::<String, String>()
            .expect("build");
        layer
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to Redis through the proxy (is it running?): {e}"));
        Fixture { proxy, layer, prefix }
    }

    /// Retries `get(key)` until it returns `expected` (every error on the way being a
    /// temporary one), failing the test after [`RECOVERY`].
    async fn recovers(&self, key: &str, expected: &str) -> Duration {
        let started = Instant::now();
        loop {
            match self.layer.get(&s(key)).await {
                Ok(found) => {
                    assert_eq!(found.map(|e| e.value), Some(s(expected)), "a wrong reply");
                    return started.elapsed();
                }
                Err(e) => {
                    assert!(
                        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
                        "an untyped error while recovering: {e}"
                    );
                    assert!(
                        started.elapsed() < RECOVERY,
                        "the layer did not recover within {RECOVERY:?}: {e}"
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Distinct writes and reads all match: no reply goes to the wrong command.
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
        let raw = raw().await;
        delete_prefix(&raw, &self.prefix).await;
        let _ = raw.quit().await;
    }
}

/// Runs `op`, asserting it fails with `Timeout` or `Unavailable` within the command
/// timeout and the margin.
async fn fails_in_time<T: std::fmt::Debug>(what: &str, op: impl Future<Output = capacitor_core::Result<T>>) {
    let started = Instant::now();
    let outcome = tokio::time::timeout(COMMAND_TIMEOUT + MARGIN, op).await;
    let took = started.elapsed();
    let result = outcome.unwrap_or_else(|_| panic!("{what} hung past {:?}", COMMAND_TIMEOUT + MARGIN));
    let err = result.expect_err("an operation over a stalled network fails");
    assert!(
        matches!(err.kind(), ErrorKind::Timeout | ErrorKind::Unavailable),
        "{what}: {err}"
    );
    assert!(took <= COMMAND_TIMEOUT + MARGIN, "{what} took {took:?}");
}

#[test]
fn a_stalled_network_is_a_timeout_within_the_command_timeout_then_the_layer_recovers() {
    common::run(TEST_TIMEOUT, async {
        let f = Fixture::new("pstall").await;
        f.layer.set(&s("k"), &s("v"), None).await.expect("set");
        assert_eq!(
            f.layer.get(&s("k")).await.expect("get").map(|e| e.value),
            Some(s("v"))
        );

        f.proxy.stall();
        fails_in_time("get", f.layer.get(&s("k"))).await;
        fails_in_time("set", f.layer.set(&s("k"), &s("w"), None)).await;
        fails_in_time("get", f.layer.get(&s("k"))).await;

        f.proxy.resume();
        // The stalled `set` may or may not have reached the server after the resume.
        let took = {
            let started = Instant::now();
            loop {
                match f.layer.get(&s("k")).await {
                    Ok(Some(e)) => {
                        assert!(e.value == "v" || e.value == "w", "a wrong reply: {e:?}");
                        break started.elapsed();
                    }
                    Ok(None) => panic!("the key vanished"),
                    Err(e) => {
                        assert!(
                            matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
                            "{e}"
                        );
                        assert!(started.elapsed() < RECOVERY, "no recovery after resume: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        };
        eprintln!("recovered {took:?} after the resume");
        f.consistent(0).await;
        f.close().await;
    });
}

#[test]
fn closed_and_reset_connections_are_replaced() {
    common::run(TEST_TIMEOUT, async {
        let f = Fixture::new("preset").await;
        f.layer.set(&s("k"), &s("v"), None).await.expect("set");
        // `connect` waits for one connection; the pool's other one comes up meanwhile.
        let deadline = Instant::now() + Duration::from_secs(5);
        while f.proxy.connections() < 2 {
            assert!(
                Instant::now() < deadline,
                "the pool's 2 connections go through the proxy"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

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
    });
}

#[test]
fn a_server_turning_connections_away_is_unavailable_then_the_layer_rejoins() {
    common::run(TEST_TIMEOUT, async {
        let f = Fixture::new("pdown").await;
        f.layer.set(&s("k"), &s("v"), None).await.expect("set");

        f.proxy.refuse(true);
        f.proxy.reset_connections();
        // Down: every operation fails in time with a typed error (some right away, as
        // not connected; those already on a connection as soon as it is reset).
        let down = Instant::now() + Duration::from_secs(1);
        while Instant::now() < down {
            fails_in_time("get while down", f.layer.get(&s("k"))).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!f.layer.is_connected());

        f.proxy.refuse(false);
        let took = f.recovers("k", "v").await;
        eprintln!("rejoined {took:?} after the server came back");
        f.consistent(0).await;
        f.close().await;
    });
}

/// `close()` returns at once, also while pooled connections are down (or still coming up),
/// and ends their reconnection loops: nothing connects once Redis is reachable again.
#[test]
fn close_is_prompt_with_connections_down_and_stops_reconnecting() {
    common::run(TEST_TIMEOUT, async {
        let (proxy, via) = FaultProxy::in_front_of(&url(), 6379)
            .await
            .expect("start the proxy in front of the Redis server");
        let layer = RedisLayer::builder()
            .url(&via)
            .prefix(unique_prefix("close"))
            .pool_size(4)
            .command_timeout(Duration::from_secs(10))
            .reconnect(Reconnect::Constant(Duration::from_millis(50)))
            .build::<String, String>()
            .expect("build");
        layer.connect().await.expect("connect");
        layer.set(&s("k"), &s("v"), None).await.expect("set");

        proxy.refuse(true);
        proxy.reset_connections();
        tokio::time::sleep(Duration::from_millis(200)).await; // reconnecting, refused
        let started = Instant::now();
        layer.close().await.expect("close");
        let took = started.elapsed();
        // Before, a QUIT on a connection that was down waited out the 10 s command timeout.
        assert!(took < Duration::from_secs(2), "close took {took:?}");

        proxy.refuse(false);
        let accepted = proxy.accepted();
        tokio::time::sleep(Duration::from_millis(500)).await; // 10 reconnect periods
        assert_eq!(proxy.accepted(), accepted, "a closed layer reconnected");
        assert_eq!(proxy.connections(), 0);
        proxy.stop();
    });
}
