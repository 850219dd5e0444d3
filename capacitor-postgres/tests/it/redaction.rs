//! Passwords in connection settings never show: not in the `Debug` of the builder, the
//! layer and its pool, nor in the `Display`/`Debug` (source chain included) of the errors
//! of a failed connection, of credentials the server refuses, or of a URL that does not
//! parse.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::time::Duration;

use crate::common::{unique_table, url, TableGuard};
use capacitor_core::testkit::within;
use capacitor_core::{Error, ErrorKind, Layer, Operation};
use capacitor_postgres::PostgresLayer;
use tokio_postgres::config::Host;

const SECRET: &str = "s3cret-pw";
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

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

/// A loopback port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// The test server's TCP host and port.
fn server() -> (String, u16) {
    let parsed: tokio_postgres::Config = url().parse().expect("CAPACITOR_POSTGRES_URL parses");
    let host = match parsed.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        other => panic!("these tests need a TCP host in CAPACITOR_POSTGRES_URL, not {other:?}"),
    };
    (host, parsed.get_ports().first().copied().unwrap_or(5432))
}

/// Every way of giving a password: URL userinfo (with characters that would end it when
/// not percent-encoded), URL parameter, key-value string.
fn sources_with_passwords(port: u16) -> Vec<String> {
    vec![
        format!("postgres://user:{SECRET}@127.0.0.1:{port}/db"),
        format!("postgresql://user:{SECRET}@127.0.0.1:{port}/db?sslmode=disable"),
        format!("postgres://user@127.0.0.1:{port}/db?password={SECRET}"),
        format!("host=127.0.0.1 port={port} user=user password={SECRET} dbname=db"),
        format!("host=127.0.0.1 port={port} user=user password='{SECRET} quoted' dbname=db"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_debug_output_hides_the_password() {
    within(TEST_TIMEOUT, async {
        for source in sources_with_passwords(closed_port()) {
            let builder = PostgresLayer::builder().url(&source).table("t");
            assert_secret(&format!("{builder:?} {builder:#?}"));
            let config: tokio_postgres::Config = source.parse().expect("parses");
            let builder = PostgresLayer::builder().config(config).table("t");
            assert_secret(&format!("{builder:?} {builder:#?}"));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_of_a_failed_connection_hide_the_password() {
    within(TEST_TIMEOUT, async {
        for source in sources_with_passwords(closed_port()) {
            let err = PostgresLayer::builder()
                .url(&source)
                .table("t")
                .create_timeout(Duration::from_secs(2))
                .build::<String, String>()
                .await
                .expect_err("nothing listens");
            assert_eq!(
                (err.kind(), err.operation()),
                (ErrorKind::Unavailable, Operation::Build),
                "{err}"
            );
            assert!(
                std::error::Error::source(&err).is_some(),
                "the driver's error is kept"
            );
            assert_secret(&everything_shown(&err));

            let config: tokio_postgres::Config = source.parse().expect("parses");
            let err = PostgresLayer::builder()
                .config(config)
                .table("t")
                .build::<String, String>()
                .await
                .expect_err("nothing listens");
            assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
            assert_secret(&everything_shown(&err));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_of_credentials_the_server_refuses_hide_the_password() {
    within(TEST_TIMEOUT, async {
        let (host, port) = server();
        // No such role, no such database: the server itself refuses the connection.
        let refused = [
            format!("postgres://capacitor_nobody:{SECRET}@{host}:{port}/test"),
            format!("postgres://postgres:{SECRET}@{host}:{port}/capacitor_no_such_db"),
        ];
        for source in refused {
            let err = PostgresLayer::builder()
                .url(&source)
                .table("t")
                .build::<String, String>()
                .await
                .expect_err("the server refuses");
            assert_eq!(
                (err.kind(), err.operation()),
                (ErrorKind::Config, Operation::Build),
                "{err}"
            );
            assert_secret(&everything_shown(&err));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_built_with_a_password_does_not_show_it() {
    within(TEST_TIMEOUT, async {
        // The test server may ignore the password (trust auth) or need its own: use the
        // configured one when there is one, else a made-up one the server ignores.
        let (host, port) = server();
        let parsed: tokio_postgres::Config = url().parse().expect("parses");
        let user = parsed.get_user().unwrap_or("postgres").to_owned();
        if parsed.get_password().is_some() {
            eprintln!("the test server needs a password: the built layer is checked with it");
        }
        let mut config = parsed.clone();
        if parsed.get_password().is_none() {
            config.password(SECRET);
        }
        let table = unique_table("redact");
        let _guard = TableGuard(table.clone());
        let layer = PostgresLayer::builder()
            .config(config)
            .table(&table)
            .sweeper(false)
            .build::<String, String>()
            .await
            .unwrap_or_else(|e| panic!("build as {user} on {host}:{port}: {e}"));
        layer
            .set(&"k".to_owned(), &"v".to_owned(), None)
            .await
            .expect("set");
        let shown = format!(
            "{layer:?} {layer:#?} {:?} {:?}",
            layer.pool(),
            layer.pool().manager()
        );
        assert_secret(&shown);
        if let Some(password) = parsed.get_password() {
            let password = String::from_utf8_lossy(password);
            assert!(!shown.contains(password.as_ref()), "the password leaked: {shown}");
        }
        layer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_that_does_not_parse_is_a_config_error_without_the_password() {
    within(TEST_TIMEOUT, async {
        // Should one parse after all, nothing listens on its port.
        let port = closed_port();
        let bad = [
            format!("postgres://user:{SECRET}@[bad"),
            format!("postgres://user:{SECRET}@127.0.0.1:notaport/db"),
            format!("postgres://user:{SECRET}@127.0.0.1:{port}/db?sslmode={SECRET}"),
            format!("postgres://user:{SECRET}@127.0.0.1:{port}/db?{SECRET}=1"),
            format!("postgres://user%ff:{SECRET}@127.0.0.1:{port}/db"),
            format!("host=127.0.0.1 password={SECRET} port=notaport"),
            format!("host=127.0.0.1 password='{SECRET}"),
            format!("host=127.0.0.1 {SECRET}"),
            format!("host=127.0.0.1 password={SECRET} {SECRET}={SECRET}"),
            format!("nonsense user:{SECRET}"),
        ];
        for source in bad {
            let err = PostgresLayer::builder()
                .url(&source)
                .table("t")
                .build::<String, String>()
                .await
                .expect_err(&format!("`{source}` does not parse"));
            assert_eq!(
                (err.kind(), err.operation()),
                (ErrorKind::Config, Operation::Build),
                "{err}"
            );
            assert!(err.message().contains("url"), "the field is named: {err}");
            assert_secret(&everything_shown(&err));
        }
        // What is safe to say is still said.
        let err = PostgresLayer::builder()
            .url(format!("postgres://user:{SECRET}@127.0.0.1:notaport/db"))
            .build::<String, String>()
            .await
            .expect_err("a bad port");
        assert!(err.message().contains("invalid value for option `port`"), "{err}");
        let err = PostgresLayer::builder()
            .url(format!("host=127.0.0.1 password={SECRET} {SECRET}=1"))
            .build::<String, String>()
            .await
            .expect_err("an unknown option");
        assert!(err.message().contains("unknown option"), "{err}");
    })
    .await;
}
