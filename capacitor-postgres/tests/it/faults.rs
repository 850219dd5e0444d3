//! Behaviour specific to the PostgreSQL layer, against a real server
//! (`CAPACITOR_POSTGRES_URL`): configuration and table-shape errors, rows that do not
//! decode, the value size limit, key formats, expiry by the layer's clock, the sweeper,
//! an unreachable server, an exhausted pool, statement timeouts, atomicity, TLS.
//!
//! Every test uses tables of its own (dropped by a guard, also on failure) and runs under
//! a timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

mod common;

use std::future::poll_fn;
use std::pin::Pin;
use std::time::{Duration, Instant};

use capacitor_core::testkit::within;
use capacitor_core::{
    envelope, Codec, Entry, EntryStream, ErrorKind, Layer, LayerConfig, ManualClock, MultiLayer, Operation,
    Result, Timestamp, WriteOp,
};
use capacitor_memory::DashMapLayer;
use capacitor_postgres::{KeyFormat, PostgresLayer, PostgresLayerBuilder};
use common::{admin, unique_table, url, TableGuard};
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

// ---- configuration -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_are_not_plain_identifiers_are_config_errors() {
    within(TEST_TIMEOUT, async {
        let long = "t".repeat(64);
        for bad in [
            "x; drop table y",
            "\"quoted\"",
            long.as_str(),
            "",
            "1st",
            "a.b",
            "täble",
        ] {
            let err = builder(bad).build::<String, String>().await.expect_err(bad);
            assert_eq!(
                (err.kind(), err.operation()),
                (ErrorKind::Config, Operation::Build),
                "{bad}: {err}"
            );
            assert!(err.message().starts_with("`table`"), "{bad}: {err}");
            let err = PostgresLayer::builder()
                .url(url())
                .schema(bad)
                .build::<String, String>()
                .await
                .expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::Config, "{bad}");
            assert!(err.message().starts_with("`schema`"), "{bad}: {err}");
        }
        // Nothing was created, and `y` (if it exists) is untouched: the names never reached
        // the server.
        let admin = admin().await;
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_class WHERE relname LIKE 'x;%' OR relname LIKE '%quoted%'",
                &[],
            )
            .await
            .expect("query")
            .get(0);
        assert_eq!(n, 0);
        // 63 characters is the limit, and allowed.
        let at_limit = format!("pt_{}", "l".repeat(60));
        let _guard = TableGuard(at_limit.clone());
        let layer = builder(&at_limit)
            .build::<String, String>()
            .await
            .expect("63 chars");
        layer.set(&s("k"), &s("v"), None).await.expect("set");
        layer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_name_the_field() {
    within(TEST_TIMEOUT, async {
        let cases: Vec<(&str, PostgresLayerBuilder)> = vec![
            ("url", PostgresLayer::builder()),
            ("url", PostgresLayer::builder().url("postgres://u@h:notaport/db")),
            ("url", PostgresLayer::builder().url("dbname=x")),
            ("pool_size", builder("t").pool_size(0)),
            ("max_value_bytes", builder("t").max_value_bytes(0)),
            ("max_value_bytes", builder("t").max_value_bytes(1 << 30)),
            ("sweep_interval", builder("t").sweep_interval(Duration::ZERO)),
            ("sweep_batch", builder("t").sweep_batch(0)),
            ("scan_page_size", builder("t").scan_page_size(0)),
        ];
        for (field, b) in cases {
            let err = b.build::<String, String>().await.expect_err(field);
            assert_eq!(err.kind(), ErrorKind::Config, "{field}: {err}");
            assert!(err.message().starts_with(&format!("`{field}`")), "{field}: {err}");
        }
        // The sweeper off: a zero interval is not looked at.
        let table = unique_table("nosweep");
        let _guard = TableGuard(table.clone());
        let layer = builder(&table)
            .sweeper(false)
            .sweep_interval(Duration::ZERO)
            .build::<String, String>()
            .await
            .expect("no sweeper");
        layer.close().await.expect("close");

        // A missing table with create_table(false).
        let missing = unique_table("missing");
        let err = builder(&missing)
            .create_table(false)
            .build::<String, String>()
            .await
            .expect_err("missing table");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.message().contains("does not exist"), "{err}");
        assert!(err.message().contains(&missing), "{err}");
    })
    .await;
}

#[test]
fn building_outside_a_runtime_is_a_config_error() {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
    // A runtime to poll the future on, entered nowhere: `Handle::try_current` fails.
    let fut = builder("t").build::<String, String>();
    let err = futures::executor::block_on(fut).expect_err("no runtime");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().starts_with("`runtime`"), "{err}");
    drop(rt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_table_of_the_wrong_shape_is_a_config_error_naming_the_column() {
    within(TEST_TIMEOUT, async {
        let admin = admin().await;
        let cases: &[(&str, &str, &str)] = &[
            (
                "no_expiry",
                "key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()",
                "column `expires_at` is missing",
            ),
            (
                "text_value",
                "key text COLLATE \"C\" PRIMARY KEY, value text NOT NULL, expires_at timestamptz, updated_at timestamptz DEFAULT now()",
                "column `value` has type text",
            ),
            (
                "naive_time",
                "key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL, expires_at timestamp, updated_at timestamptz DEFAULT now()",
                "column `expires_at` has type timestamp without time zone",
            ),
            (
                "int_key",
                "key bigint PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz, updated_at timestamptz DEFAULT now()",
                "column `key` has type bigint",
            ),
            (
                "not_null_expiry",
                "key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz NOT NULL, updated_at timestamptz DEFAULT now()",
                "column `expires_at` is NOT NULL",
            ),
            (
                "no_pk",
                "key text COLLATE \"C\", value bytea NOT NULL, expires_at timestamptz, updated_at timestamptz DEFAULT now()",
                "column `key` has no PRIMARY KEY or UNIQUE",
            ),
            (
                "collation",
                "key text COLLATE \"{collation}\" PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz, updated_at timestamptz DEFAULT now()",
                "column `key` has collation {collation}",
            ),
            (
                "extra_col",
                "key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz, updated_at timestamptz DEFAULT now(), owner text NOT NULL",
                "column `owner` is NOT NULL without a default",
            ),
        ];
        // Any collation that does not compare bytes (servers have different ones).
        let collation: String = admin
            .query_one(
                "SELECT collname FROM pg_collation WHERE collname NOT IN ('C', 'POSIX', 'ucs_basic', 'default') \
                 AND collencoding IN (-1, (SELECT encoding FROM pg_database WHERE datname = current_database())) \
                 ORDER BY collprovider DESC, collname LIMIT 1",
                &[],
            )
            .await
            .expect("a collation other than C")
            .get(0);
        let mut guards = Vec::new();
        for (what, columns, expected) in cases {
            let (columns, expected) = (columns.replace("{collation}", &collation), expected.replace("{collation}", &collation));
            let table = unique_table(what);
            guards.push(TableGuard(table.clone()));
            admin
                .batch_execute(&format!("CREATE TABLE \"public\".\"{table}\" ({columns})"))
                .await
                .expect("create");
            let err = builder(&table)
                .build::<String, String>()
                .await
                .expect_err(what);
            assert_eq!(err.kind(), ErrorKind::Config, "{what}: {err}");
            assert!(err.message().contains(&expected), "{what}: {err}");
            assert!(err.message().contains(&table), "{what}: the message names the table: {err}");
        }
        // Extra columns that are nullable or have defaults are fine.
        let table = unique_table("extra_ok");
        guards.push(TableGuard(table.clone()));
        admin
            .batch_execute(&format!(
                "CREATE TABLE \"public\".\"{table}\" (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL, \
                 expires_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now(), note text, \
                 version int NOT NULL DEFAULT 1)"
            ))
            .await
            .expect("create");
        let layer = builder(&table)
            .create_table(false)
            .build::<String, String>()
            .await
            .expect("compatible");
        layer.set(&s("k"), &s("v"), None).await.expect("set");
        layer.close().await.expect("close");

        // A logged table and unlogged(true), and the reverse.
        let table = unique_table("logged");
        guards.push(TableGuard(table.clone()));
        builder(&table).build::<String, String>().await.expect("create logged");
        let err = builder(&table)
            .unlogged(true)
            .build::<String, String>()
            .await
            .expect_err("logged vs unlogged");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.message().starts_with("`unlogged`"), "{err}");
        let table = unique_table("unlogged");
        guards.push(TableGuard(table.clone()));
        builder(&table)
            .unlogged(true)
            .build::<String, String>()
            .await
            .expect("create unlogged");
        let persistence: String = admin
            .query_one(
                "SELECT relpersistence::text FROM pg_class WHERE relname = $1",
                &[&table],
            )
            .await
            .expect("query")
            .get(0);
        assert_eq!(persistence, "u");
        assert_eq!(kind(builder(&table).build::<String, String>().await), ErrorKind::Config);

        // A view of the right name is not a table.
        let view = unique_table("view");
        guards.push(TableGuard(view.clone()));
        admin
            .batch_execute(&format!("CREATE VIEW \"public\".\"{view}\" AS SELECT 1 AS x"))
            .await
            .expect("view");
        let err = builder(&view).build::<String, String>().await.expect_err("a view");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.message().contains("not a table"), "{err}");
        admin
            .batch_execute(&format!("DROP VIEW \"public\".\"{view}\""))
            .await
            .expect("drop view");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_schema_and_table_are_created_with_the_documented_ddl() {
    within(TEST_TIMEOUT, async {
        let schema = unique_table("schema");
        let admin = admin().await;
        let layer = PostgresLayer::builder()
            .url(url())
            .schema(&schema)
            .table("Sessions")
            .build::<String, String>()
            .await
            .expect("build");
        assert_eq!(layer.table(), format!("\"{schema}\".\"Sessions\""));
        layer.set(&s("user:42"), &s("Ada"), None).await.expect("set");
        // The key is readable, the case of the table name kept.
        let row = admin
            .query_one(
                &format!("SELECT value, expires_at IS NULL FROM \"{schema}\".\"Sessions\" WHERE key = 'user:42'"),
                &[],
            )
            .await
            .expect("readable key");
        let value: Vec<u8> = row.get(0);
        let (expiry, payload) = envelope::unwrap(&value).expect("envelope");
        assert_eq!(expiry, None);
        let decoded: String = Codec::<String>::decode(&capacitor_core::BincodeCodec, payload).expect("bincode");
        assert_eq!(decoded, "Ada");
        assert!(row.get::<_, bool>(1));
        let index: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND indexname = 'Sessions_expires_at_idx'",
                &[&schema],
            )
            .await
            .expect("index")
            .get(0);
        assert_eq!(index, 1, "the sweeper's index exists");
        layer.close().await.expect("close");
        admin
            .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .await
            .expect("drop schema");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_starting_together_create_the_table_once() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("race");
        let _guard = TableGuard(table.clone());
        let builds = (0..6).map(|_| {
            let table = table.clone();
            tokio::spawn(async move { builder(&table).pool_size(1).build::<String, String>().await })
        });
        for build in futures::future::join_all(builds).await {
            let layer = build.expect("task").expect("every concurrent build succeeds");
            layer.close().await.expect("close");
        }
    })
    .await;
}

/// A statement timeout meant for reads and writes does not cancel the build's DDL while it
/// waits: here another session holds the creation lock longer than the timeout (as a
/// process creating the same table, or a busy catalog, would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_statement_timeout_does_not_cancel_the_build_waiting_on_a_creator() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("slowddl");
        let _guard = TableGuard(table.clone());
        let mut admin = admin().await;
        let tx = admin.transaction().await.expect("begin");
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("capacitor-postgres:\"public\".\"{table}\"")],
        )
        .await
        .expect("take the creation lock");
        let build = tokio::spawn({
            let table = table.clone();
            async move {
                named_builder(&table)
                    .statement_timeout(Duration::from_millis(50))
                    .build::<String, String>()
                    .await
            }
        });
        lock_waiters(&tx, &table, "advisory").await;
        // Well past the 50 ms timeout, with the build waiting on the lock all along.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!build.is_finished(), "the build waits for the lock");
        tx.rollback().await.expect("release");
        let layer = build
            .await
            .expect("task")
            .expect("the build outlasts its statement timeout");
        layer.close().await.expect("close");
        // The table it created works (checked with default timeouts: 50 ms is too short
        // for a write on a loaded machine, and not what this test is about).
        let check = builder(&table).build::<String, String>().await.expect("build");
        check.set(&s("k"), &s("v"), None).await.expect("set");
        assert_eq!(
            check.get(&s("k")).await.expect("get").map(|e| e.value),
            Some(s("v"))
        );
        check.close().await.expect("close");
    })
    .await;
}

// ---- bad rows, size limit, keys ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_do_not_decode_are_a_decode_error_and_removed() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("decode");
        let _guard = TableGuard(table.clone());
        let layer = string_layer(&table, &ManualClock::new(START)).await;
        let admin = admin().await;

        // Not capacitor's envelope at all.
        raw_insert(&admin, &table, "foreign", b"written by someone else").await;
        let err = layer.get(&s("foreign")).await.expect_err("decode error");
        assert_eq!((err.kind(), err.operation()), (ErrorKind::Decode, Operation::Get));
        assert_eq!(
            raw_count(&admin, &table, "key = 'foreign'").await,
            0,
            "the bad row is removed"
        );
        assert_eq!(layer.get(&s("foreign")).await.expect("then a plain miss"), None);

        // Our envelope, but a payload that is not a bincode String.
        raw_insert(&admin, &table, "garbled", &envelope::wrap(None, &[0xff; 5])).await;
        assert_eq!(kind(layer.get(&s("garbled")).await), ErrorKind::Decode);
        assert_eq!(raw_count(&admin, &table, "key = 'garbled'").await, 0);

        // exists looks at the row, not the bytes.
        raw_insert(&admin, &table, "foreign2", b"xx").await;
        assert!(layer.exists(&s("foreign2")).await.expect("exists"));

        // get_many fails as a whole, removes every bad row, and a retry reads the rest.
        layer.set(&s("good"), &s("value"), None).await.expect("set");
        raw_insert(&admin, &table, "bad1", b"x").await;
        raw_insert(&admin, &table, "bad2", b"y").await;
        let keys = [s("good"), s("bad1"), s("bad2")];
        let err = layer.get_many(&keys).await.expect_err("decode error");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Decode, Operation::GetMany)
        );
        assert!(err.message().starts_with("2 stored values"), "{err}");
        assert_eq!(raw_count(&admin, &table, "key IN ('bad1', 'bad2')").await, 0);
        let values: Vec<Option<String>> = layer
            .get_many(&keys)
            .await
            .expect("retry")
            .into_iter()
            .map(|e| e.map(|e| e.value))
            .collect();
        assert_eq!(values, vec![Some(s("value")), None, None]);

        // A scan reports a bad row as an item and goes on; it does not write.
        raw_insert(&admin, &table, "scan:b", b"bad").await;
        layer.set(&s("scan:a"), &s("a"), None).await.expect("set");
        layer.set(&s("scan:c"), &s("c"), None).await.expect("set");
        let mut stream = layer.scan(b"scan:").expect("scan");
        let mut items = Vec::new();
        while let Some(item) = next(&mut stream).await {
            items.push(item.map(|(k, e)| (k, e.value)).map_err(|e| e.kind()));
        }
        assert_eq!(
            items,
            vec![
                Ok((s("scan:a"), s("a"))),
                Err(ErrorKind::Decode),
                Ok((s("scan:c"), s("c")))
            ]
        );
        assert_eq!(raw_count(&admin, &table, "key = 'scan:b'").await, 1);
        layer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_under_a_multilayer_is_a_counted_miss() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("multi");
        let _guard = TableGuard(table.clone());
        let pg = string_layer(&table, &ManualClock::new(START)).await;
        let cache = MultiLayer::<String, String>::builder()
            .layer(LayerConfig::new("memory", DashMapLayer::new()))
            .layer(LayerConfig::new("postgres", pg))
            .build()
            .expect("multi");
        let admin = admin().await;
        raw_insert(&admin, &table, "k", b"\x00\x01 not an envelope").await;

        assert_eq!(cache.get(&s("k")).await.expect("a miss, not an error"), None);
        let stats = cache.stats();
        let row = stats.layer("postgres").expect("postgres row");
        assert_eq!(row.decode_errors, 1);
        assert_eq!(row.misses, 1);
        assert_eq!(row.errors, 0);
        assert_eq!(
            raw_count(&admin, &table, "key = 'k'").await,
            0,
            "the bad row is evicted"
        );

        cache.set(s("k"), s("fresh")).await.expect("set");
        assert_eq!(cache.get(&s("k")).await.expect("get"), Some(s("fresh")));
        assert_eq!(cache.stats().layer("postgres").expect("row").decode_errors, 1);
        cache.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_the_limit_are_refused_before_anything_is_written() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("toolarge");
        let _guard = TableGuard(table.clone());
        let layer = builder(&table)
            .max_value_bytes(100)
            .build::<String, Vec<u8>>()
            .await
            .expect("build");
        let admin = admin().await;
        let big = vec![7u8; 200];
        let err = layer.set(&s("big"), &big, None).await.expect_err("too large");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::ValueTooLarge, Operation::Set)
        );
        let entries = vec![(s("ok"), vec![1u8; 10]), (s("big"), big.clone())];
        assert_eq!(
            kind(layer.set_many(&entries, None).await),
            ErrorKind::ValueTooLarge
        );
        let ops = vec![
            WriteOp::Set {
                key: s("ok"),
                value: vec![1u8; 10],
                ttl: None,
            },
            WriteOp::Set {
                key: s("big"),
                value: big,
                ttl: None,
            },
        ];
        assert_eq!(kind(layer.apply_atomic(&ops).await), ErrorKind::ValueTooLarge);
        assert_eq!(raw_count(&admin, &table, "true").await, 0, "nothing was written");
        // At the limit: bincode's length prefix (1 byte) + 99 bytes = 100.
        layer
            .set(&s("edge"), &vec![1u8; 99], None)
            .await
            .expect("at the limit");
        layer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_formats_nul_bytes_and_non_string_keys() {
    within(TEST_TIMEOUT, async {
        let admin = admin().await;
        let table = unique_table("keys");
        let _guard = TableGuard(table.clone());
        let layer = string_layer(&table, &ManualClock::new(START)).await;
        assert_eq!(layer.key_format(), KeyFormat::Text);
        let err = layer.set(&s("a\0b"), &s("v"), None).await.expect_err("NUL");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::InvalidInput, Operation::Set)
        );
        assert!(err.message().contains("NUL"), "{err}");
        assert_eq!(kind(layer.get(&s("a\0b")).await), ErrorKind::InvalidInput);
        assert_eq!(
            kind(
                layer
                    .set_many(&[(s("ok"), s("v")), (s("\0"), s("v"))], None)
                    .await
            ),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            raw_count(&admin, &table, "true").await,
            0,
            "a refused batch writes nothing"
        );
        // A scan of a prefix with NUL is empty (no key can hold one), not an error.
        layer.set(&s("a"), &s("v"), None).await.expect("set");
        let mut stream = layer.scan(b"a\0").expect("scan");
        assert!(next(&mut stream).await.is_none());
        // A prefix cut inside a character finds the keys it starts.
        layer.set(&s("xé1"), &s("1"), None).await.expect("set");
        layer.set(&s("xè2"), &s("2"), None).await.expect("set");
        layer.set(&s("y"), &s("3"), None).await.expect("set");
        let mut stream = layer
            .scan("xé".as_bytes().split_last().expect("bytes").1)
            .expect("scan");
        let mut keys = Vec::new();
        while let Some(item) = next(&mut stream).await {
            keys.push(item.expect("item").0);
        }
        assert_eq!(
            keys,
            vec![s("xè2"), s("xé1")],
            "both start with x and the byte C3"
        );
        layer.close().await.expect("close");

        // u64 keys: hex, in numeric order, scannable by byte prefix.
        let table = unique_table("u64");
        let _guard = TableGuard(table.clone());
        let layer = builder(&table).build::<u64, String>().await.expect("build");
        assert_eq!(layer.key_format(), KeyFormat::Hex);
        for k in [7u64, 0x0100, 0x01ff, 0x0200, u64::MAX] {
            layer.set(&k, &format!("v{k}"), None).await.expect("set");
        }
        let stored: Vec<String> = admin
            .query(
                &format!("SELECT key FROM \"public\".\"{table}\" ORDER BY key"),
                &[],
            )
            .await
            .expect("keys")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            stored,
            vec![
                "0000000000000007",
                "0000000000000100",
                "00000000000001ff",
                "0000000000000200",
                "ffffffffffffffff"
            ]
        );
        assert_eq!(
            layer.get(&0x01ff).await.expect("get").map(|e| e.value),
            Some(s("v511"))
        );
        let mut stream = layer.scan(&[0, 0, 0, 0, 0, 0, 1]).expect("scan");
        let mut keys = Vec::new();
        while let Some(item) = next(&mut stream).await {
            keys.push(item.expect("item").0);
        }
        assert_eq!(keys, vec![0x0100, 0x01ff]);
        layer.close().await.expect("close");

        // Byte-vector keys stored as text when asked.
        let table = unique_table("bytes");
        let _guard = TableGuard(table.clone());
        let layer = builder(&table)
            .key_format(KeyFormat::Text)
            .build::<Vec<u8>, String>()
            .await
            .expect("build");
        layer.set(&b"user:1".to_vec(), &s("v"), None).await.expect("set");
        assert_eq!(raw_count(&admin, &table, "key = 'user:1'").await, 1);
        assert_eq!(
            kind(layer.set(&vec![0xff], &s("v"), None).await),
            ErrorKind::InvalidInput
        );
        layer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_written_twice_in_one_batch_keeps_its_last_write() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("dupes");
        let _guard = TableGuard(table.clone());
        let layer = string_layer(&table, &ManualClock::new(START)).await;
        let entries = vec![(s("a"), s("1")), (s("b"), s("2")), (s("a"), s("3"))];
        layer
            .set_many(&entries, None)
            .await
            .expect("set_many with a duplicate key");
        assert_eq!(
            layer.get(&s("a")).await.expect("get").map(|e| e.value),
            Some(s("3"))
        );
        let ops = vec![
            WriteOp::Set {
                key: s("c"),
                value: s("x"),
                ttl: None,
            },
            WriteOp::Delete { key: s("c") },
            WriteOp::Delete { key: s("b") },
            WriteOp::Set {
                key: s("b"),
                value: s("y"),
                ttl: None,
            },
            WriteOp::Set {
                key: s("a"),
                value: s("4"),
                ttl: None,
            },
            WriteOp::Set {
                key: s("a"),
                value: s("5"),
                ttl: None,
            },
        ];
        layer.apply_atomic(&ops).await.expect("apply_atomic");
        let got: Vec<Option<String>> = layer
            .get_many(&[s("a"), s("b"), s("c")])
            .await
            .expect("get_many")
            .into_iter()
            .map(|e| e.map(|e| e.value))
            .collect();
        assert_eq!(got, vec![Some(s("5")), Some(s("y")), None]);
        assert_eq!(
            layer
                .delete_many(&[s("a"), s("a"), s("b"), s("zz")])
                .await
                .expect("delete_many"),
            2
        );
        layer.close().await.expect("close");
    })
    .await;
}

// ---- expiry and the sweeper ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_follows_the_layer_clock_and_the_column_is_authoritative() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("clock");
        let _guard = TableGuard(table.clone());
        let clock = ManualClock::new(START);
        let layer = builder(&table)
            .clock(clock.clone())
            .sweeper(false)
            .build::<String, String>()
            .await
            .expect("build");
        let admin = admin().await;
        layer.set(&s("t"), &s("v"), Some(Duration::from_secs(10))).await.expect("set");
        let entry = layer.get(&s("t")).await.expect("get").expect("live");
        assert_eq!(entry.expires_at, Some(Timestamp::from_millis(START + 10_000)));
        let stored: i64 = admin
            .query_one(
                &format!("SELECT (extract(epoch FROM expires_at) * 1000)::int8 FROM \"public\".\"{table}\" WHERE key = 't'"),
                &[],
            )
            .await
            .expect("expires_at")
            .get(0);
        assert_eq!(stored, i64::try_from(START + 10_000).expect("fits"));

        clock.advance(Duration::from_millis(9_999));
        assert!(layer.exists(&s("t")).await.expect("exists"));
        clock.advance(Duration::from_millis(1));
        assert_eq!(layer.get(&s("t")).await.expect("get"), None, "expired at exactly its expiry");
        assert!(!layer.exists(&s("t")).await.expect("exists"));
        assert_eq!(layer.get_many(&[s("t")]).await.expect("get_many"), vec![None]);
        let mut stream = layer.scan(b"").expect("scan");
        assert!(next(&mut stream).await.is_none(), "scan skips expired rows");
        assert!(!layer.delete(&s("t")).await.expect("delete"), "an expired row is not reported present");
        assert_eq!(raw_count(&admin, &table, "true").await, 0, "but it is deleted");

        // The column wins over the envelope: moving expires_at by hand moves the expiry.
        layer.set(&s("u"), &s("v"), Some(Duration::from_secs(1))).await.expect("set");
        admin
            .execute(&format!("UPDATE \"public\".\"{table}\" SET expires_at = NULL WHERE key = 'u'"), &[])
            .await
            .expect("update");
        clock.advance(Duration::from_secs(5));
        assert_eq!(layer.get(&s("u")).await.expect("get").map(|e| (e.value, e.expires_at)), Some((s("v"), None)));

        // A TTL too long for PostgreSQL is stored as the latest instant it takes.
        layer.set(&s("forever"), &s("v"), Some(Duration::MAX)).await.expect("huge ttl");
        let entry = layer.get(&s("forever")).await.expect("get").expect("live");
        assert_eq!(entry.expires_at, Some(Timestamp::from_millis(253_402_300_799_999)));
        layer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_deletes_expired_rows_in_batches_and_stops_on_close() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("sweep");
        let _guard = TableGuard(table.clone());
        let clock = ManualClock::new(START);
        let layer = builder(&table)
            .clock(clock.clone())
            .sweep_interval(Duration::from_millis(50))
            .sweep_batch(7)
            .build::<String, String>()
            .await
            .expect("build");
        let admin = admin().await;
        let short: Vec<(String, String)> = (0..40).map(|i| (format!("s{i}"), s("v"))).collect();
        layer.set_many(&short, Some(Duration::from_secs(1))).await.expect("set_many");
        layer.set(&s("keep"), &s("v"), None).await.expect("set");
        layer.set(&s("later"), &s("v"), Some(Duration::from_secs(3600))).await.expect("set");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(raw_count(&admin, &table, "true").await, 42, "nothing has expired yet");

        clock.advance(Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(10);
        while raw_count(&admin, &table, "true").await > 2 {
            assert!(Instant::now() < deadline, "the sweeper did not delete the expired rows");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(raw_count(&admin, &table, "key IN ('keep', 'later')").await, 2);

        // After close, expired rows stay.
        layer.close().await.expect("close");
        admin
            .execute(
                &format!("INSERT INTO \"public\".\"{table}\" (key, value, expires_at) VALUES ('old', '', now() - interval '1 day')"),
                &[],
            )
            .await
            .expect("insert expired row");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(raw_count(&admin, &table, "key = 'old'").await, 1, "the sweeper stopped on close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_layer_stops_the_sweeper_and_releases_the_pool() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("dropped");
        let _guard = TableGuard(table.clone());
        let admin = admin().await;
        let app = format!("capacitor_{table}");
        let layer = PostgresLayer::builder()
            .url(common::url_with(&format!("application_name={app}")))
            .table(&table)
            .sweep_interval(Duration::from_millis(20))
            .build::<String, String>()
            .await
            .expect("build");
        layer.set(&s("k"), &s("v"), None).await.expect("set");
        assert!(connections(&admin, &app).await >= 1);
        drop(layer);
        let deadline = Instant::now() + Duration::from_secs(10);
        while connections(&admin, &app).await > 0 {
            assert!(
                Instant::now() < deadline,
                "the dropped layer's connections stay open"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
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

// ---- close ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_scans_and_every_operation() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("close");
        let _guard = TableGuard(table.clone());
        let layer = builder(&table)
            .scan_page_size(2)
            .build::<String, String>()
            .await
            .expect("build");
        for i in 0..6 {
            layer.set(&format!("k{i}"), &s("v"), None).await.expect("set");
        }
        let mut stream = layer.scan(b"k").expect("scan");
        assert!(next(&mut stream).await.expect("item").is_ok());
        layer.close().await.expect("close");
        assert!(layer.pool().is_closed());
        assert_eq!(
            next(&mut stream)
                .await
                .expect("an item")
                .map(drop)
                .map_err(|e| e.kind()),
            Err(ErrorKind::Closed)
        );
        assert!(next(&mut stream).await.is_none(), "then the stream ends");
        assert_eq!(kind(layer.scan(b"k").map(drop)), ErrorKind::Closed);
        assert_eq!(kind(layer.get_many(&[s("k1")]).await), ErrorKind::Closed);
        assert_eq!(kind(layer.get_many(&[]).await), ErrorKind::Closed);
        assert_eq!(kind(layer.set_many(&[], None).await), ErrorKind::Closed);
        assert_eq!(kind(layer.delete_many(&[s("k1")]).await), ErrorKind::Closed);
        assert_eq!(
            kind(layer.apply_atomic(&[WriteOp::Delete { key: s("k1") }]).await),
            ErrorKind::Closed
        );
        assert_eq!(kind(layer.flush().await), ErrorKind::Closed);
        layer.close().await.expect("idempotent");
    })
    .await;
}

// ---- the server misbehaving ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_unavailable_at_once_and_the_password_stays_secret() {
    within(TEST_TIMEOUT, async {
        let port = closed_port();
        let url = format!("postgres://app:hunter2-secret@127.0.0.1:{port}/db");
        let b = PostgresLayer::builder().url(&url).table("t");
        assert!(!format!("{b:?}").contains("hunter2"), "{b:?}");
        let started = Instant::now();
        let err = b.build::<String, String>().await.expect_err("nothing listens");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Unavailable, Operation::Build),
            "{err}"
        );
        assert!(err.is_temporary());
        let mut chain = format!("{err} {err:?}");
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            chain.push_str(&format!(" {s} {s:?}"));
            source = s.source();
        }
        assert!(!chain.contains("hunter2"), "the password leaked: {chain}");
        assert!(
            std::error::Error::source(&err).is_some_and(|s| s.is::<tokio_postgres::Error>()),
            "the driver's error is the source"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_is_a_timeout() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("pool");
        let _guard = TableGuard(table.clone());
        let layer = named_builder(&table)
            .pool_size(1)
            .wait_timeout(Duration::from_millis(200))
            .statement_timeout(Duration::from_secs(20))
            .build::<String, String>()
            .await
            .expect("build");
        layer.set(&s("locked"), &s("v0"), None).await.expect("set");

        // Another session locks the row; the layer's only connection then waits on it.
        let mut admin = admin().await;
        let tx = lock_row(&mut admin, &table, "locked").await;
        let blocked = {
            let layer = layer.clone();
            tokio::spawn(async move { layer.set(&s("locked"), &s("v1"), None).await })
        };
        lock_waiters(&tx, &table, "transactionid").await;
        assert!(!blocked.is_finished(), "the set waits for the row lock");

        let started = Instant::now();
        let err = layer.get(&s("other")).await.expect_err("no free connection");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Timeout, Operation::Get),
            "{err}"
        );
        assert!(err.message().contains("wait timeout"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );

        tx.rollback().await.expect("release the lock");
        blocked.await.expect("task").expect("the blocked set completes");
        assert_eq!(
            layer.get(&s("locked")).await.expect("get").map(|e| e.value),
            Some(s("v1"))
        );
        layer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_over_the_timeout_is_a_timeout_and_a_batch_leaves_nothing() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("stmt");
        let _guard = TableGuard(table.clone());
        // 1 s: short beside the 4 s bound below, long enough that an unblocked insert on a
        // loaded CI machine is not cancelled.
        let layer = builder(&table)
            .statement_timeout(Duration::from_secs(1))
            .build::<String, String>()
            .await
            .expect("build");
        layer.set(&s("locked"), &s("v0"), None).await.expect("set");
        let mut admin = admin().await;
        let tx = lock_row(&mut admin, &table, "locked").await;

        let started = Instant::now();
        let err = layer
            .set(&s("locked"), &s("v1"), None)
            .await
            .expect_err("cancelled");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Timeout, Operation::Set),
            "{err}"
        );
        assert!(err.message().contains("57014"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "took {:?}",
            started.elapsed()
        );
        let source = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
            .expect("the driver's error is the source");
        assert_eq!(
            source.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
        );

        // A transaction that touches the locked row is cancelled whole.
        let ops = vec![
            WriteOp::Set {
                key: s("a-free-key"),
                value: s("x"),
                ttl: None,
            },
            WriteOp::Set {
                key: s("locked"),
                value: s("y"),
                ttl: None,
            },
        ];
        assert_eq!(kind(layer.apply_atomic(&ops).await), ErrorKind::Timeout);
        tx.rollback().await.expect("release");
        assert_eq!(
            layer.get(&s("a-free-key")).await.expect("get"),
            None,
            "nothing of the failed batch"
        );
        assert_eq!(
            layer.get(&s("locked")).await.expect("get").map(|e| e.value),
            Some(s("v0"))
        );
        // The layer goes on working (the connection was not left inside a transaction).
        layer
            .apply_atomic(&ops)
            .await
            .expect("apply_atomic once unlocked");
        assert_eq!(
            layer.get(&s("locked")).await.expect("get").map(|e| e.value),
            Some(s("y"))
        );
        layer.close().await.expect("close");
    })
    .await;
}

/// An operation that does not complete (the client-side operation timeout, here shorter
/// than the statement timeout as when a link stalls; or its caller dropping it) gives up
/// its connection: the statement is cancelled on the server, and the next operation gets
/// a fresh connection instead of queueing behind the reply still owed on the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_operation_is_cancelled_and_does_not_hold_up_the_next_one() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("abandon");
        let _guard = TableGuard(table.clone());
        let layer = named_builder(&table)
            .pool_size(1)
            .statement_timeout(Duration::from_secs(60))
            .operation_timeout(Duration::from_secs(2))
            .build::<String, String>()
            .await
            .expect("build");
        layer.set(&s("locked"), &s("v0"), None).await.expect("set");
        let mut admin = admin().await;
        let tx = lock_row(&mut admin, &table, "locked").await;

        let err = layer
            .set(&s("locked"), &s("v1"), None)
            .await
            .expect_err("the update waits on the row lock past the operation timeout");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Timeout, Operation::Set),
            "{err}"
        );
        // Cancelled on the server: no session of the layer waits on the lock any more.
        no_lock_waiters(&tx, &table).await;
        let reads_answer = |round: &'static str| {
            let layer = layer.clone();
            async move {
                // Reads do not wait on row locks: a fresh connection answers at once.
                for key in ["free", "locked"] {
                    let found = layer.get(&s(key)).await.unwrap_or_else(|e| {
                        panic!("{round}: a read must not queue behind the abandoned update: {e}")
                    });
                    assert_eq!(
                        found.map(|e| e.value),
                        (key == "locked").then(|| s("v0")),
                        "{round}: {key}"
                    );
                }
            }
        };
        reads_answer("after the operation timeout").await;

        // The caller gives up first (its own timeout, as a composer's layer timeout does).
        tokio::time::timeout(
            Duration::from_millis(300),
            layer.set(&s("locked"), &s("v2"), None),
        )
        .await
        .expect_err("the update waits on the row lock");
        no_lock_waiters(&tx, &table).await;
        reads_answer("after the caller gave up").await;

        // Neither abandoned update is applied once the lock is released: both were
        // cancelled while they waited for it.
        tx.rollback().await.expect("release");
        assert_eq!(
            layer.get(&s("locked")).await.expect("get").map(|e| e.value),
            Some(s("v0"))
        );
        layer.set(&s("after"), &s("x"), None).await.expect("set");
        assert_eq!(
            layer.get(&s("after")).await.expect("get").map(|e| e.value),
            Some(s("x"))
        );
        layer.close().await.expect("close");
    })
    .await;
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_through_native_tls() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("tls");
        let _guard = TableGuard(table.clone());
        // The local server's certificate is self-signed (Debian's snakeoil): accept it here.
        let connector = capacitor_postgres::native_tls::TlsConnector::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .expect("connector");
        let layer = PostgresLayer::builder()
            .url(common::url_with("sslmode=require"))
            .table(&table)
            .native_tls(connector)
            .build::<String, String>()
            .await
            .expect("build over TLS (the server needs ssl = on)");
        layer.set(&s("k"), &s("v"), None).await.expect("set");
        let client = layer.pool().get().await.expect("connection");
        let ssl: bool = client
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .expect("pg_stat_ssl")
            .get(0);
        assert!(ssl, "the connection is encrypted");
        drop(client);
        layer.close().await.expect("close");

        // Without a connector, sslmode=require cannot be met.
        let err = PostgresLayer::builder()
            .url(common::url_with("sslmode=require"))
            .table(&table)
            .build::<String, String>()
            .await
            .expect_err("no TLS connector");
        assert_ne!(err.kind(), ErrorKind::Closed, "{err}");
    })
    .await;
}
