//! Passwords in connection URLs never show: not in the `Debug` of the builders and the
//! layer, nor in the `Display`/`Debug` (source chain included) of the errors of a failed
//! connection or of a URL that does not parse.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::time::Duration;

use crate::common::{free_port, url};
use capacitor_core::{Error, ErrorKind, Layer, Operation};
use capacitor_redis::{Reconnect, RedisBus, RedisLayer};

const SECRET: &str = "s3cret-pw";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `Display` and `Debug` of `err` and of every error in its source chain.
fn everything_shown(err: &Error) -> String {
    let mut shown = format!("{err}\n{err:?}\n{:#?}", err);
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        shown.push_str(&format!("\n{s}\n{s:?}"));
        source = s.source();
    }
    shown
}

fn assert_secret(shown: &str) {
    assert!(!shown.contains(SECRET), "the password leaked: {shown}");
    assert!(!shown.contains("s3cret"), "part of the password leaked: {shown}");
}

/// URLs with the password in every place a URL can hold one, including characters that
/// end the authority when not percent-encoded.
fn urls_with_passwords(port: u16) -> Vec<String> {
    vec![
        format!("redis://user:{SECRET}@127.0.0.1:{port}/0"),
        format!("redis://:{SECRET}@127.0.0.1:{port}"),
        format!("redis://{SECRET}@127.0.0.1:{port}"),
        format!("rediss://user:{SECRET}@127.0.0.1:{port}/1"),
        format!("redis://user:{SECRET}@with@127.0.0.1:{port}/0"),
        format!("redis://user:{SECRET}/slash@127.0.0.1:{port}/0"),
        format!("redis://user:{SECRET}?query#hash@127.0.0.1:{port}"),
        format!("redis-sentinel://127.0.0.1:{port}/0?sentinelServiceName=m&sentinelPassword={SECRET}"),
    ]
}

#[test]
fn builder_and_layer_debug_output_hides_the_password() {
    rt().block_on(async {
        let port = free_port();
        for url in urls_with_passwords(port) {
            let builder = RedisLayer::builder().url(&url);
            let shown = format!("{builder:?} {builder:#?}");
            assert_secret(&shown);
            assert!(shown.contains("127.0.0.1"), "the host is still shown: {shown}");

            let bus = RedisBus::builder().url(&url);
            assert_secret(&format!("{bus:?}"));
        }
        let layer = RedisLayer::builder()
            .url(format!("redis://user:{SECRET}@127.0.0.1:{port}/0"))
            .build::<String, String>()
            .expect("build does not connect");
        assert_secret(&format!("{layer:?} {layer:#?}"));
        layer.close().await.expect("close");
    });
}

#[test]
fn errors_of_a_failed_connection_hide_the_password() {
    rt().block_on(async {
        // Nothing listens on the port: every attempt is refused at once.
        let port = free_port();
        let layer = RedisLayer::builder()
            .url(format!("redis://user:{SECRET}@127.0.0.1:{port}/0"))
            .connect_timeout(Duration::from_millis(300))
            .command_timeout(Duration::from_millis(300))
            .reconnect(Reconnect::Constant(Duration::from_millis(20)))
            .build::<String, String>()
            .expect("build does not connect");
        let err = layer.connect().await.expect_err("nothing listens");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Unavailable, Operation::Connect),
            "{err}"
        );
        assert_secret(&everything_shown(&err));
        let err = layer.get(&"k".to_owned()).await.expect_err("not connected");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert_secret(&everything_shown(&err));
        let err = layer.health_check().await.expect_err("not connected");
        assert_secret(&everything_shown(&err));
        layer.close().await.expect("close");

        // Without reconnection the first failure is final.
        let layer = RedisLayer::builder()
            .url(format!("redis://user:{SECRET}@127.0.0.1:{port}/0"))
            .connect_timeout(Duration::from_millis(300))
            .reconnect(Reconnect::Never)
            .build::<String, String>()
            .expect("build does not connect");
        let err = layer.connect().await.expect_err("nothing listens");
        assert_secret(&everything_shown(&err));
        layer.close().await.expect("close");
    });
}

#[test]
fn errors_of_credentials_the_server_refuses_hide_the_password() {
    rt().block_on(async {
        // The test server knows no such user: it answers WRONGPASS.
        let real = url();
        let start = real.find("://").map_or(0, |i| i + 3);
        let end = real[start..].find(['/', '?']).map_or(real.len(), |i| start + i);
        let host_port = &real[start..end];
        let host_port = host_port.rsplit('@').next().unwrap_or(host_port);
        let bad = format!("redis://capacitor_nobody:{SECRET}@{host_port}/0");
        let layer = RedisLayer::builder()
            .url(&bad)
            .connect_timeout(Duration::from_millis(500))
            .command_timeout(Duration::from_millis(500))
            .reconnect(Reconnect::Constant(Duration::from_millis(50)))
            .build::<String, String>()
            .expect("build does not connect");
        let err = layer
            .connect()
            .await
            .expect_err("the server refuses the credentials");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert_secret(&everything_shown(&err));
        let err = layer
            .set(&"k".to_owned(), &"v".to_owned(), None)
            .await
            .expect_err("not connected");
        assert_secret(&everything_shown(&err));
        layer.close().await.expect("close");
    });
}

#[test]
fn a_url_that_does_not_parse_is_a_config_error_without_the_password() {
    rt().block_on(async {
        let bad = [
            format!("redis://user:{SECRET}@[bad"),
            format!("redis://user:{SECRET}@127.0.0.1:notaport/0"),
            format!("redis://user:{SECRET}/slash@127.0.0.1:6379/0"),
            format!("redis://user:{SECRET}@127.0.0.1:6379/notadb"),
            format!("redis-cluster://user:{SECRET}@127.0.0.1:6379?node=no-port"),
            format!("user:{SECRET}@127.0.0.1:6379"),
            format!("nonsense user:{SECRET}"),
        ];
        for url in bad {
            let err = RedisLayer::builder()
                .url(&url)
                .build::<String, String>()
                .expect_err(&format!("`{url}` is not a valid URL"));
            assert_eq!(
                (err.kind(), err.operation()),
                (ErrorKind::Config, Operation::Build),
                "{err}"
            );
            assert!(err.message().contains("url"), "the field is named: {err}");
            assert_secret(&everything_shown(&err));

            let err = RedisBus::builder()
                .url(&url)
                .build()
                .expect_err("not a valid URL");
            assert_eq!(err.kind(), ErrorKind::Config, "{err}");
            assert_secret(&everything_shown(&err));
        }
    });
}
