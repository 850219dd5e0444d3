//! Behaviour specific to the PostgreSQL layer, against a real server
//! (`CAPACITOR_POSTGRES_URL`), by theme: configuration, the table's shape, bad rows and
//! limits, expiry and the sweeper, close, connecting, the pool, timeouts, TLS.
//!
//! Every test uses tables of its own (dropped by a guard, also on failure) and runs under
//! a timeout. The helpers below are shared by the themes.

mod close;
mod config;
mod connect;
mod data;
mod expiry;
mod pool;
mod schema;
mod timeouts;
#[cfg(feature = "tls")]
mod tls;

use std::future::poll_fn;
use std::pin::Pin;
use std::time::{Duration, Instant};

use crate::common::{admin, unique_table, url, TableGuard};
use capacitor_core::testkit::{within, FaultProxy};
use capacitor_core::{
    envelope, Codec, CodecId, Entry, EntryStream, ErrorKind, Layer, LayerConfig, ManualClock, MultiLayer,
    Operation, Result, Timestamp, WriteOp,
};
use capacitor_memory::DashMapLayer;
use capacitor_postgres::{KeyFormat, PostgresLayer, PostgresLayerBuilder};
use futures_core::Stream;

/// Every test body runs under this bound.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const START: u64 = 1_700_000_000_000;

fn s(x: &str) -> String {
    x.to_owned()
}

fn builder(table: &str) -> PostgresLayerBuilder {
    PostgresLayer::builder().url(url()).table(table)
}

async fn string_layer(table: &str, clock: &ManualClock) -> PostgresLayer<String, String> {
    builder(table)
        .clock(clock.clone())
        .build()
        .await
        .unwrap_or_else(|e| panic!("build (is PostgreSQL running?): {e}"))
}

async fn next<K, V>(stream: &mut EntryStream<K, V>) -> Option<Result<(K, Entry<V>)>> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

fn kind<T: std::fmt::Debug>(r: Result<T>) -> ErrorKind {
    r.expect_err("expected an error").kind()
}

async fn raw_insert(client: &tokio_postgres::Client, table: &str, key: &str, value: &[u8]) {
    client
        .execute(
            &format!("INSERT INTO \"public\".\"{table}\" (key, value) VALUES ($1, $2)"),
            &[&key, &value],
        )
        .await
        .expect("raw insert");
}

async fn raw_count(client: &tokio_postgres::Client, table: &str, filter: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM \"public\".\"{table}\" WHERE {filter}"),
            &[],
        )
        .await
        .expect("count")
        .get(0)
}

/// A loopback port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Begins a transaction on `admin` that holds the row lock of `key` in `table` until it
/// ends.
async fn lock_row<'a>(
    admin: &'a mut tokio_postgres::Client,
    table: &str,
    key: &str,
) -> tokio_postgres::Transaction<'a> {
    let tx = admin.transaction().await.expect("begin");
    tx.execute(
        &format!("SELECT 1 FROM \"public\".\"{table}\" WHERE key = $1 FOR UPDATE"),
        &[&key],
    )
    .await
    .expect("lock");
    tx
}

/// A builder for `table` whose connections carry `application_name = table`, so that
/// [`lock_waiters`] sees this test's sessions only.
fn named_builder(table: &str) -> PostgresLayerBuilder {
    let mut config: tokio_postgres::Config = url().parse().expect("CAPACITOR_POSTGRES_URL parses");
    config.application_name(table);
    PostgresLayer::builder().config(config).table(table)
}

/// Waits (up to 30 s) until a session named `app` waits on a lock of type `wait_event`
/// (`advisory`, `tuple`, `transactionid`, …).
async fn lock_waiters(admin: &impl tokio_postgres::GenericClient, app: &str, wait_event: &str) {
    waiting_until(admin, app, Some(wait_event), Duration::from_secs(30), |n| n >= 1).await;
}

/// Waits (up to 5 s, far less than the statement timeouts of the tests that use it)
/// until no session named `app` waits on any lock.
async fn no_lock_waiters(admin: &impl tokio_postgres::GenericClient, app: &str) {
    waiting_until(admin, app, None, Duration::from_secs(5), |n| n == 0).await;
}

async fn waiting_until(
    admin: &impl tokio_postgres::GenericClient,
    app: &str,
    wait_event: Option<&str>,
    within: Duration,
    done: impl Fn(i64) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        // Inside a transaction the activity view is a snapshot: take a fresh one.
        admin
            .execute("SELECT pg_stat_clear_snapshot()", &[])
            .await
            .expect("clear the stats snapshot");
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND ($1::text IS NULL OR wait_event = $1) AND application_name = $2",
                &[&wait_event, &app],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if done(waiting) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} session(s) of {app} wait on {wait_event:?} locks"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn connections(admin: &tokio_postgres::Client, app: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}
