//! Errors that name their cause: a URL that is not Redis' is refused at build with the
//! accepted forms; a refused connection, an unknown host and a database index the server
//! refuses are reported by `connect` (the layer's and the bus's) at once, well within the
//! connect timeout, as `Unavailable` with the underlying error as the source and in the
//! message. An error older than the call (a restarted server's) does not fail `connect`,
//! nor does it outlive the next connection.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::time::{Duration, Instant};

use std::sync::Arc;

use capacitor_core::{Error, ErrorKind, InvalidationBus, Layer, Operation};
use capacitor_redis::{Reconnect, RedisBus, RedisLayer};

use crate::common::{self, free_port, unique_prefix, RedisServer};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Long, so that failing at once is failing well within it, which a loaded machine
/// cannot fake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// What "at once" may take on a loaded machine: the first attempt waits for the
/// reconnect policy's first delay (50 ms plus up to 100 ms of jitter).
const AT_ONCE: Duration = Duration::from_secs(2);

/// `host:port` of the shared test server.
fn server_host_port() -> String {
    let url = common::url();
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..].find(['/', '?']).map_or(url.len(), |i| start + i);
    let host_port = &url[start..end];
    host_port.rsplit('@').next().unwrap_or(host_port).to_owned()
}

fn layer_at(url: &str) -> RedisLayer<String, String> {
    RedisLayer::builder()
        .url(url)
        .prefix(unique_prefix("errors"))
        .connect_timeout(CONNECT_TIMEOUT)
        .command_timeout(CONNECT_TIMEOUT)
        .build()
        .expect("build does not connect")
}

fn bus_at(url: &str) -> RedisBus {
    RedisBus::builder()
        .url(url)
        .channel(unique_prefix("errors-bus"))
        .connect_timeout(CONNECT_TIMEOUT)
        .command_timeout(CONNECT_TIMEOUT)
        .build()
        .expect("build does not connect")
}

/// `err` is `Unavailable` in `connect`, with a source, and its message names `what`
/// (case-insensitively).
fn names_the_cause(err: &Error, what: &[&str]) {
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert_eq!(err.operation(), Operation::Connect, "{err}");
    assert!(
        std::error::Error::source(err).is_some(),
        "the cause is attached: {err:?}"
    );
    let shown = err.to_string().to_lowercase();
    for w in what {
        assert!(shown.contains(&w.to_lowercase()), "`{w}` is named: {err}");
    }
}

/// Awaits `connect` (a layer's or a bus's), which must fail within `at_once` with an
/// error that [`names_the_cause`]; the error and how long it took.
async fn fails_within(
    connect: impl std::future::Future<Output = Result<(), Error>>,
    at_once: Duration,
    what: &[&str],
) -> (Error, Duration) {
    let started = Instant::now();
    let err = connect.await.expect_err("cannot connect");
    let took = started.elapsed();
    assert!(
        took < at_once,
        "at once, not after {CONNECT_TIMEOUT:?}: {took:?}: {err}"
    );
    names_the_cause(&err, what);
    (err, took)
}

/// Runs `connect` of a layer and of a bus at `url`, checking that each fails at once and
/// names `what`; returns how long the layer's took.
async fn both_fail_at_once(url: &str, what: &[&str]) -> Duration {
    both_fail_within(url, what, AT_ONCE).await
}

/// [`both_fail_at_once`], where "at once" is `at_once`.
async fn both_fail_within(url: &str, what: &[&str], at_once: Duration) -> Duration {
    let layer = layer_at(url);
    let (err, took) = fails_within(layer.connect(), at_once, what).await;
    println!("layer connect to {url}: {took:?}: {err}");
    assert_eq!(err.layer(), Some("redis"), "{err}");
    // An operation now fails at once too, naming the same cause.
    let started = Instant::now();
    let err = layer.get(&"k".to_owned()).await.expect_err("not connected");
    assert!(started.elapsed() < at_once, "{:?}", started.elapsed());
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(std::error::Error::source(&err).is_some(), "{err:?}");
    let shown = err.to_string().to_lowercase();
    assert!(what.iter().all(|w| shown.contains(&w.to_lowercase())), "{err}");
    layer.close().await.expect("close");

    let bus = bus_at(url);
    let (err, bus_took) = fails_within(bus.connect(), at_once, what).await;
    println!("bus connect to {url}: {bus_took:?}: {err}");
    bus.close().await.expect("close");
    took
}

#[test]
fn a_refused_connection_is_reported_at_once_with_its_cause() {
    common::run(TEST_TIMEOUT, async {
        let port = free_port();
        let url = format!("redis://127.0.0.1:{port}");
        both_fail_at_once(&url, &[&format!("127.0.0.1:{port}"), "connection refused"]).await;
    });
}

#[test]
fn a_refused_connection_without_reconnection_is_reported_at_once() {
    common::run(TEST_TIMEOUT, async {
        let port = free_port();
        let layer = RedisLayer::builder()
            .url(format!("redis://127.0.0.1:{port}"))
            .connect_timeout(CONNECT_TIMEOUT)
            .reconnect(Reconnect::Never)
            .build::<String, String>()
            .expect("build does not connect");
        fails_within(layer.connect(), AT_ONCE, &["connection refused"]).await;
        layer.close().await.expect("close");
    });
}

#[test]
fn an_unknown_host_names_the_failed_lookup() {
    common::run(TEST_TIMEOUT, async {
        // `.invalid` never resolves (RFC 6761). Each attempt asks the resolver, which may
        // be slow: "at once" is one lookup's time plus AT_ONCE, at most half the connect
        // timeout.
        let started = Instant::now();
        let lookup = tokio::net::lookup_host("no-such-host.invalid:6379").await;
        let lookup_took = started.elapsed();
        assert!(lookup.is_err(), "`.invalid` does not resolve");
        let at_once = (lookup_took + AT_ONCE).min(CONNECT_TIMEOUT / 2).max(AT_ONCE);
        println!("lookup took {lookup_took:?}; at once: within {at_once:?}");
        both_fail_within(
            "redis://no-such-host.invalid:6379",
            &["no-such-host.invalid:6379", "lookup"],
            at_once,
        )
        .await;
    });
}

#[test]
fn a_database_index_out_of_range_names_the_servers_error() {
    common::run(TEST_TIMEOUT, async {
        let url = format!("redis://{}/99", server_host_port());
        both_fail_at_once(&url, &["/99", "DB index is out of range"]).await;
    });
}

#[test]
fn a_layer_and_a_bus_that_connect_report_success() {
    common::run(TEST_TIMEOUT, async {
        let url = common::url();
        let layer = layer_at(&url);
        layer.connect().await.expect("the test server answers");
        layer.close().await.expect("close");
        let err = layer.connect().await.expect_err("closed");
        assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
        let bus = bus_at(&url);
        bus.connect().await.expect("the test server answers");
        bus.close().await.expect("close");
        let err = bus.connect().await.expect_err("closed");
        assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    });
}

/// A layer and a bus on `server`, connected, reconnecting every `delay` (plus jitter).
async fn connected_to(server: &RedisServer, delay: Duration) -> (RedisLayer<String, String>, RedisBus) {
    let layer = RedisLayer::builder()
        .url(server.url())
        .prefix(unique_prefix("errors-restart"))
        .connect_timeout(CONNECT_TIMEOUT)
        .command_timeout(CONNECT_TIMEOUT)
        .reconnect(Reconnect::Constant(delay))
        .build::<String, String>()
        .expect("build");
    let bus = RedisBus::builder()
        .url(server.url())
        .channel(unique_prefix("errors-restart-bus"))
        .connect_timeout(CONNECT_TIMEOUT)
        .command_timeout(CONNECT_TIMEOUT)
        .reconnect(Reconnect::Constant(delay))
        .build()
        .expect("build");
    layer.connect().await.expect("the private server answers");
    bus.connect().await.expect("the private server answers");
    (layer, bus)
}

/// Waits until `layer` (and `bus`) report the server gone: their `connect` fails.
async fn wait_until_down(layer: &RedisLayer<String, String>, bus: &RedisBus) {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while layer.is_connected() || bus.is_connected() {
        assert!(Instant::now() < deadline, "the kill was not noticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = layer.connect().await.expect_err("the server is down");
    names_the_cause(&err, &["connection refused"]);
    let err = bus.connect().await.expect_err("the server is down");
    names_the_cause(&err, &["connection refused"]);
}

#[test]
fn connect_after_a_server_restart_waits_for_the_reconnection_instead_of_the_old_error() {
    common::run(TEST_TIMEOUT, async {
        let mut server = RedisServer::start();
        let (layer, bus) = connected_to(&server, Duration::from_millis(50)).await;
        server.kill();
        // Down: the lost connection and the refused attempts are saved and named.
        wait_until_down(&layer, &bus).await;
        let err = layer.get(&"k".to_owned()).await.expect_err("down");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(std::error::Error::source(&err).is_some(), "{err:?}");

        // Back on the same port: connect waits for the reconnection (the saved errors
        // are older than the call), within the connect timeout.
        server.restart();
        let started = Instant::now();
        layer.connect().await.expect("reconnects after the restart");
        bus.connect().await.expect("reconnects after the restart");
        assert!(started.elapsed() < CONNECT_TIMEOUT, "{:?}", started.elapsed());
        layer
            .set(&"k".to_owned(), &"v".to_owned(), None)
            .await
            .expect("set");
        layer.close().await.expect("close");
        bus.close().await.expect("close");
    });
}

#[test]
fn connect_to_a_server_that_stays_down_fails_fast_naming_the_cause() {
    common::run(TEST_TIMEOUT, async {
        let mut server = RedisServer::start();
        let (layer, bus) = connected_to(&server, Duration::from_millis(50)).await;
        server.kill();
        wait_until_down(&layer, &bus).await;
        // Later calls, long after the first errors, still fail at once: the clients keep
        // trying every 50 ms, and each refused attempt fails the call that waits.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..3 {
            fails_within(layer.connect(), AT_ONCE, &["connection refused"]).await;
            fails_within(bus.connect(), AT_ONCE, &["connection refused"]).await;
        }
        layer.close().await.expect("close");
        bus.close().await.expect("close");
    });
}

#[test]
fn connect_without_reconnection_after_the_attempt_failed_fails_at_once() {
    common::run(TEST_TIMEOUT, async {
        let port = free_port();
        let layer = RedisLayer::builder()
            .url(format!("redis://127.0.0.1:{port}"))
            .connect_timeout(CONNECT_TIMEOUT)
            .reconnect(Reconnect::Never)
            .build::<String, String>()
            .expect("build does not connect");
        let bus = RedisBus::builder()
            .url(format!("redis://127.0.0.1:{port}"))
            .channel(unique_prefix("errors-never"))
            .connect_timeout(CONNECT_TIMEOUT)
            .reconnect(Reconnect::Never)
            .build()
            .expect("build does not connect");
        layer.connect().await.expect_err("nothing listens");
        bus.connect().await.expect_err("nothing listens");
        // No attempt is coming: a second call does not wait for one.
        fails_within(layer.connect(), AT_ONCE, &["connection refused"]).await;
        let err = layer.get(&"k".to_owned()).await.expect_err("not connected");
        assert!(err.to_string().contains("not reconnecting"), "{err}");
        fails_within(bus.connect(), AT_ONCE, &["connection refused"]).await;
        layer.close().await.expect("close");
        bus.close().await.expect("close");
    });
}

#[test]
fn subscribe_after_close_is_closed() {
    common::run(TEST_TIMEOUT, async {
        let bus = bus_at(&common::url());
        bus.connect().await.expect("the test server answers");
        bus.close().await.expect("close");
        let err = InvalidationBus::<String>::subscribe(&bus, Arc::new(|_| {})).expect_err("closed");
        assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    });
}

/// `url` is refused at build, by the layer's and the bus's builder, with a `Config` error
/// naming the field and showing each of `shown`.
fn refused(url: &str, shown: &[&str]) {
    let layer = RedisLayer::builder().url(url).build::<String, String>();
    let bus = RedisBus::builder().url(url).build();
    for err in [layer.expect_err(url), bus.expect_err(url)] {
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Config, Operation::Build),
            "{err}"
        );
        let message = err.message();
        assert!(message.contains("`url`"), "the field is named: {err}");
        for s in shown {
            assert!(message.contains(s), "`{s}` is shown: {err}");
        }
    }
}

/// What every refused URL's error lists.
const FORMS: [&str; 3] = ["redis://", "redis-cluster://", "redis-sentinel://"];

#[test]
fn a_url_whose_scheme_is_not_redis_is_refused_with_the_accepted_forms() {
    common::run(TEST_TIMEOUT, async {
        for url in [
            "http://127.0.0.1:6379",
            "HTTPS://127.0.0.1:6379",
            "redis+unix:///tmp/redis.sock",
            "tcp://h:1",
        ] {
            let scheme = url.split("://").next().unwrap().to_lowercase();
            refused(url, &[&format!("`{scheme}://`")]);
            refused(url, &FORMS);
        }
        // Leading spaces are not part of the scheme.
        refused(" \thttp://127.0.0.1:6379", &["`http://`"]);
        // No scheme at all.
        refused("127.0.0.1:6379", &FORMS);
        refused("", &FORMS);
        // Accepted schemes, in any case (building does not connect).
        for url in [
            "redis://127.0.0.1:1",
            "REDIS://127.0.0.1:1/2",
            "valkey://127.0.0.1:1",
            "redis-cluster://127.0.0.1:1",
            "redis-sentinel://127.0.0.1:1/0?sentinelServiceName=m",
            // Spaces and line ends around the URL, as a URL parser ignores them.
            " redis://127.0.0.1:1",
            "\tredis://127.0.0.1:1/2 \n",
        ] {
            let layer = RedisLayer::builder()
                .url(url)
                .build::<String, String>()
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            layer.close().await.expect("close");
        }
    });
}

#[test]
fn a_url_that_does_not_parse_is_refused_with_the_accepted_forms() {
    common::run(TEST_TIMEOUT, async {
        for url in [
            "redis://[bad",
            "redis://host:notaport",
            "redis://host:6379/300",
            "redis-sentinel://h:1/0",
        ] {
            refused(url, &FORMS);
        }
    });
}

#[cfg(any(feature = "tls-rustls", feature = "tls-native"))]
#[test]
fn a_tls_url_builds_with_a_tls_feature() {
    common::run(TEST_TIMEOUT, async {
        let layer = RedisLayer::builder()
            .url("rediss://127.0.0.1:1")
            .build::<String, String>()
            .expect("TLS is compiled in");
        layer.close().await.expect("close");
    });
}

#[cfg(not(any(feature = "tls-rustls", feature = "tls-native")))]
#[test]
fn a_tls_url_without_a_tls_feature_names_the_feature() {
    common::run(TEST_TIMEOUT, async {
        refused("rediss://127.0.0.1:1", &["redis-tls", "fred_config(..)"]);
    });
}
