//! Behaviour specific to the redb layer: opening errors, configuration errors, bad bytes,
//! the value size limit, lazy expiry, the sweeper, scans, persistence and atomicity.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capacitor_core::testkit::within;
use capacitor_core::{
    envelope, Codec, CodecId, EntryStream, Error, ErrorKind, Layer, LayerConfig, ManualClock, MultiLayer,
    Operation, Result, Timestamp, WriteOp,
};
use capacitor_memory::DashMapLayer;
use capacitor_redb::{Durability, RedbLayer};
use futures_core::Stream;

use crate::common::{raw_get, raw_insert, raw_len, scratch_db, DATA};

/// Every test body runs under this bound.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const START: u64 = 1_700_000_000_000;

fn s(x: &str) -> String {
    x.to_owned()
}

fn string_layer(db: &Arc<redb::Database>, clock: &ManualClock) -> RedbLayer<String, String> {
    RedbLayer::builder()
        .db(db.clone())
        .clock(clock.clone())
        .build()
        .expect("build")
}

async fn next<K, V>(stream: &mut EntryStream<K, V>) -> Option<Result<(K, capacitor_core::Entry<V>)>> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

fn kind<T: std::fmt::Debug>(r: Result<T>) -> ErrorKind {
    r.expect_err("expected an error").kind()
}

// ---- opening -------------------------------------------------------------------------

#[test]
fn path_under_a_regular_file_is_a_typed_error() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let path = file.path().join("db.redb");
    let err = RedbLayer::builder()
        .path(&path)
        .sweeper(false)
        .build::<String, String>()
        .expect_err("cannot open");
    assert_eq!(err.kind(), ErrorKind::Backend);
    assert_eq!(err.operation(), Operation::Build);
    assert!(
        err.message().contains(&path.display().to_string()),
        "the message names the path: {err}"
    );
    let source = std::error::Error::source(&err).expect("redb's error is kept");
    let redb_err = source
        .downcast_ref::<redb::DatabaseError>()
        .expect("a redb::DatabaseError");
    assert!(
        matches!(redb_err, redb::DatabaseError::Storage(redb::StorageError::Io(io)) if io.kind() == std::io::ErrorKind::NotADirectory),
        "{redb_err:?}"
    );
    assert!(
        err.to_string().contains("Not a directory"),
        "the message shows the cause: {err}"
    );
}

#[test]
fn a_file_that_is_not_a_redb_database_is_a_typed_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, bytes) in [
        (
            "text",
            b"not a database, just some text that is long enough".repeat(200),
        ),
        ("zeros-and-magic", {
            let mut b = vec![0u8; 8192];
            b[..9].copy_from_slice(b"redb\x1a\x0a\xa9\x0d\x0a");
            b
        }),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).expect("write");
        let err = RedbLayer::builder()
            .path(&path)
            .sweeper(false)
            .build::<String, String>()
            .expect_err("not a database");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Backend, Operation::Build),
            "{err}"
        );
        assert!(err.message().contains(&path.display().to_string()), "{err}");
        assert!(std::error::Error::source(&err).is_some());
        assert_eq!(
            std::fs::read(&path).expect("read"),
            bytes,
            "the file is left as it was"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_file_is_a_typed_error_and_close_releases_it() {
    within(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        let first = RedbLayer::builder()
            .path(&path)
            .build::<String, String>()
            .expect("first open");
        first.set(&s("k"), &s("v"), None).await.expect("set");

        // redb locks the file: a second open, in this process or another, is refused once
        // the lock wait is over.
        let started = Instant::now();
        let err = RedbLayer::builder()
            .path(&path)
            .lock_wait(Duration::from_millis(200))
            .build::<String, String>()
            .expect_err("locked");
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert_eq!(err.operation(), Operation::Build);
        assert!(err.message().contains("locked"), "{err}");
        assert!(err.message().contains(&path.display().to_string()), "{err}");
        assert!(err.is_temporary());
        let source = std::error::Error::source(&err).expect("redb's error is kept");
        assert!(matches!(
            source.downcast_ref::<redb::DatabaseError>(),
            Some(redb::DatabaseError::DatabaseAlreadyOpen)
        ));

        // A build waits (`lock_wait`) for a lock released meanwhile: here the holder closes
        // 300 ms into the wait.
        let closer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            first.close().await.expect("close");
        });
        let reopen = path.clone();
        let again = tokio::task::spawn_blocking(move || {
            RedbLayer::builder()
                .path(&reopen)
                .lock_wait(Duration::from_secs(10))
                .build::<String, String>()
        })
        .await
        .expect("task")
        .expect("close released the lock within the wait");
        closer.await.expect("closer");
        assert_eq!(
            again.get(&s("k")).await.expect("get").map(|e| e.value),
            Some(s("v"))
        );
        again.close().await.expect("close");

        // Under every policy, close releases the lock at once: a reopen needs no wait.
        for policy in [
            Durability::Immediate,
            Durability::EveryMillis(20),
            Durability::Manual,
        ] {
            let layer = RedbLayer::builder()
                .path(&path)
                .durability(policy)
                .lock_wait(Duration::ZERO)
                .build::<String, String>()
                .expect("open");
            layer
                .set(&s("p"), &format!("{policy:?}"), None)
                .await
                .expect("set");
            layer.close().await.expect("close");
            let reopened = RedbLayer::builder()
                .path(&path)
                .lock_wait(Duration::ZERO)
                .build::<String, String>()
                .unwrap_or_else(|e| panic!("{policy:?}: the lock was not released: {e}"));
            assert_eq!(
                reopened.get(&s("p")).await.expect("get").map(|e| e.value),
                Some(format!("{policy:?}"))
            );
            reopened.close().await.expect("close");
        }
    })
    .await;
}

#[test]
fn configuration_errors_name_the_field() {
    let scratch = scratch_db();
    let db = &scratch.db;
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: Vec<(&str, Error)> = vec![
        (
            "path",
            RedbLayer::builder().build::<String, String>().unwrap_err(),
        ),
        (
            "path",
            RedbLayer::builder()
                .path("/nonexistent/x")
                .db(db.clone())
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "temporary",
            RedbLayer::builder()
                .db(db.clone())
                .temporary(true)
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "cache_capacity",
            RedbLayer::builder()
                .db(db.clone())
                .cache_capacity(1 << 20)
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "cache_capacity",
            RedbLayer::builder()
                .path(dir.path().join("zero-cache"))
                .cache_capacity(0)
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "table",
            RedbLayer::builder()
                .db(db.clone())
                .table("")
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "max_value_bytes",
            RedbLayer::builder()
                .db(db.clone())
                .max_value_bytes(0)
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "sweep_interval",
            RedbLayer::builder()
                .db(db.clone())
                .sweep_interval(Duration::ZERO)
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "sweep_batch",
            RedbLayer::builder()
                .db(db.clone())
                .sweep_batch(0)
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "durability",
            RedbLayer::builder()
                .db(db.clone())
                .durability(Durability::EveryMillis(0))
                .build::<String, String>()
                .unwrap_err(),
        ),
        // No tokio runtime here: the sweeper cannot start.
        (
            "sweeper",
            RedbLayer::builder()
                .db(db.clone())
                .build::<String, String>()
                .unwrap_err(),
        ),
    ];
    for (field, err) in cases {
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert_eq!(err.operation(), Operation::Build);
        assert!(
            err.message().contains(&format!("`{field}`")),
            "expected `{field}` in: {err}"
        );
    }
    assert!(
        !dir.path().join("zero-cache").exists(),
        "a refused build creates no file"
    );
    // Without the sweeper, no runtime is needed, under every policy: the durable commits
    // of EveryMillis run on a thread of the layer's own.
    for policy in [
        Durability::Manual,
        Durability::Immediate,
        Durability::EveryMillis(100),
    ] {
        RedbLayer::builder()
            .db(db.clone())
            .sweeper(false)
            .durability(policy)
            .build::<String, String>()
            .unwrap_or_else(|e| panic!("{policy:?} needs no runtime: {e}"));
    }
    RedbLayer::builder()
        .path(dir.path().join("db.redb"))
        .sweeper(false)
        .durability(Durability::EveryMillis(100))
        .build::<String, String>()
        .expect("no runtime needed");
}

#[test]
fn a_database_shared_between_processes_refuses_the_non_durable_policies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = redb::Builder::new()
        .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
        .create(dir.path().join("shared.redb"))
        .expect("create");
    let db = Arc::new(db);
    for policy in [Durability::EveryMillis(100), Durability::Manual] {
        let err = RedbLayer::builder()
            .db(db.clone())
            .sweeper(false)
            .durability(policy)
            .build::<String, String>()
            .expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.message().contains("`durability`"), "{err}");
        assert!(err.message().contains("Durability::Immediate"), "{err}");
    }
    RedbLayer::builder()
        .db(db)
        .sweeper(false)
        .durability(Durability::Immediate)
        .build::<String, String>()
        .expect("Immediate is accepted");
}

#[test]
fn the_default_sweeper_needs_a_runtime_and_the_error_says_how_to_do_without() {
    let builder = RedbLayer::builder();
    let shown = format!("{builder:?}");
    assert!(shown.contains("sweeper: true"), "on by default: {shown}");
    assert!(shown.contains("sweep_interval: 60s"), "every minute: {shown}");
    assert!(shown.contains("sweep_batch: 1000"), "1,000 per batch: {shown}");
    assert!(shown.contains("durability: EveryMillis(500)"), "{shown}");

    let dir = tempfile::tempdir().expect("tempdir");
    let err = builder
        .path(dir.path().join("db.redb"))
        .build::<String, String>()
        .expect_err("no tokio runtime on this thread");
    assert_eq!(
        (err.kind(), err.operation()),
        (ErrorKind::Config, Operation::Build),
        "{err}"
    );
    let message = err.message();
    assert!(message.contains("`sweeper`"), "names the option: {err}");
    assert!(message.contains("tokio runtime"), "says what is missing: {err}");
    assert!(
        message.contains(".sweeper(false)"),
        "says how to do without: {err}"
    );

    // Off, the layer builds outside a runtime; inside one, the default builds.
    RedbLayer::builder()
        .path(dir.path().join("db.redb"))
        .sweeper(false)
        .build::<String, String>()
        .expect("no background task, no runtime needed");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let layer = RedbLayer::builder()
            .path(dir.path().join("other.redb"))
            .build::<String, String>()
            .expect("inside a runtime");
        layer.close().await.expect("close");
    });
}

// ---- bad bytes -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_do_not_decode_are_a_decode_error_and_removed() {
    within(TEST_TIMEOUT, async {
        let scratch = scratch_db();
        let db = &scratch.db;
        let layer = string_layer(db, &ManualClock::new(START));

        // Not capacitor's envelope at all.
        raw_insert(db, DATA, b"foreign", b"written by someone else");
        let err = layer.get(&s("foreign")).await.expect_err("decode error");
        assert_eq!((err.kind(), err.operation()), (ErrorKind::Decode, Operation::Get));
        assert_eq!(raw_get(db, DATA, b"foreign"), None, "the bad entry is removed");
        assert_eq!(layer.get(&s("foreign")).await.expect("then a plain miss"), None);

        // Our envelope, but a payload that is not a postcard String.
        raw_insert(
            db,
            DATA,
            b"garbled",
            &envelope::wrap(CodecId::POSTCARD, None, &[0xff, 0xff, 0xff, 0xff, 0xff]),
        );
        assert_eq!(kind(layer.get(&s("garbled")).await), ErrorKind::Decode);
        assert_eq!(raw_get(db, DATA, b"garbled"), None);

        // An envelope of a later version (a newer build's, during a rolling upgrade), and a
        // value of a codec this layer does not read: a Decode error, and kept for the
        // instances that can read them, by get, get_many and exists.
        let mut future = envelope::wrap(CodecId::POSTCARD, None, b"\x01x");
        future[3] = envelope::VERSION_CODEC + 1;
        raw_insert(db, DATA, b"future", &future);
        let theirs = envelope::wrap(CodecId::custom(7), None, b"\x01x");
        raw_insert(db, DATA, b"theirs", &theirs);
        for key in ["future", "theirs"] {
            assert_eq!(kind(layer.get(&s(key)).await), ErrorKind::Decode);
            assert_eq!(kind(layer.get_many(&[s(key)]).await), ErrorKind::Decode);
            assert_eq!(kind(layer.exists(&s(key)).await), ErrorKind::Decode);
        }
        assert_eq!(raw_get(db, DATA, b"future"), Some(future.clone()));
        assert_eq!(raw_get(db, DATA, b"theirs"), Some(theirs.clone()));
        assert!(layer.delete(&s("future")).await.expect("delete"));
        assert!(layer.delete(&s("theirs")).await.expect("delete"));

        // exists checks the envelope.
        raw_insert(db, DATA, b"foreign2", b"xx");
        assert_eq!(kind(layer.exists(&s("foreign2")).await), ErrorKind::Decode);
        assert_eq!(raw_get(db, DATA, b"foreign2"), None);

        // get_many fails as a whole, removes every bad entry, and a retry reads the rest.
        layer.set(&s("good"), &s("value"), None).await.expect("set");
        raw_insert(db, DATA, b"bad1", b"x");
        raw_insert(db, DATA, b"bad2", b"y");
        let keys = [s("good"), s("bad1"), s("bad2")];
        let err = layer.get_many(&keys).await.expect_err("decode error");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Decode, Operation::GetMany)
        );
        assert!(err.message().contains("2 stored values"), "{err}");
        assert_eq!(raw_get(db, DATA, b"bad1"), None);
        assert_eq!(raw_get(db, DATA, b"bad2"), None);
        let values: Vec<Option<String>> = layer
            .get_many(&keys)
            .await
            .expect("retry")
            .into_iter()
            .map(|e| e.map(|e| e.value))
            .collect();
        assert_eq!(values, vec![Some(s("value")), None, None]);

        // A scan reports a bad entry as an item and goes on; it does not write.
        raw_insert(db, DATA, b"scan:b", b"bad");
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
        assert!(raw_get(db, DATA, b"scan:b").is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bytes_under_a_multilayer_are_a_counted_miss() {
    within(TEST_TIMEOUT, async {
        let scratch = scratch_db();
        let db = &scratch.db;
        let redb_layer = string_layer(db, &ManualClock::new(START));
        let cache = MultiLayer::<String, String>::builder()
            .layer(LayerConfig::new("memory", DashMapLayer::new()))
            .layer(LayerConfig::new("redb", redb_layer))
            .build()
            .expect("multi");
        raw_insert(db, DATA, b"k", b"\x00\x01 not an envelope");

        assert_eq!(cache.get(&s("k")).await.expect("a miss, not an error"), None);
        let stats = cache.stats();
        let row = stats.layer("redb").expect("redb row");
        assert_eq!(row.decode_errors, 1);
        assert_eq!(row.misses, 1);
        assert_eq!(row.errors, 0);
        assert_eq!(raw_get(db, DATA, b"k"), None, "the bad entry is evicted");

        cache.set(s("k"), s("fresh")).await.expect("set");
        assert_eq!(cache.get(&s("k")).await.expect("get"), Some(s("fresh")));
        assert_eq!(cache.stats().layer("redb").expect("row").decode_errors, 1);
        cache.close().await.expect("close");
    })
    .await;
}

// ---- size limit and atomicity --------------------------------------------------------

/// A codec for `String` that refuses to encode `"poison"`.
#[derive(Debug)]
struct PickyCodec;

impl Codec<String> for PickyCodec {
    fn id(&self) -> CodecId {
        CodecId::custom(1)
    }

    fn encode(&self, value: &String) -> Result<Vec<u8>> {
        if value == "poison" {
            return Err(Error::new(ErrorKind::Encode, Operation::Set, "poison"));
        }
        Ok(value.as_bytes().to_vec())
    }
    fn decode(&self, bytes: &[u8]) -> Result<String> {
        String::from_utf8(bytes.to_vec())
            .map_err(|e| Error::new(ErrorKind::Decode, Operation::Get, "utf-8").with_source(e))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_the_limit_are_refused_before_anything_is_written() {
    within(TEST_TIMEOUT, async {
        let scratch = scratch_db();
        let db = &scratch.db;
        // The codec writes a string as its bytes: encoded size = length.
        let layer: RedbLayer<String, String, PickyCodec> = RedbLayer::builder()
            .db(db.clone())
            .codec(PickyCodec)
            .max_value_bytes(100)
            .build()
            .expect("build");
        let at_limit = "a".repeat(100);
        let over = "b".repeat(101);

        layer
            .set(&s("k"), &at_limit, None)
            .await
            .expect("exactly the limit is accepted");
        let err = layer.set(&s("k"), &over, None).await.expect_err("too large");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::ValueTooLarge, Operation::Set)
        );
        assert_eq!(
            layer.get(&s("k")).await.expect("get").map(|e| e.value),
            Some(at_limit.clone())
        );
        assert_eq!(
            kind(layer.set(&s("new"), &over, None).await),
            ErrorKind::ValueTooLarge
        );
        assert_eq!(raw_get(db, DATA, b"new"), None, "nothing written");

        // set_many: one value too large, none written.
        let entries = vec![
            (s("m1"), s("small")),
            (s("m2"), over.clone()),
            (s("m3"), s("small")),
        ];
        assert_eq!(
            kind(layer.set_many(&entries, None).await),
            ErrorKind::ValueTooLarge
        );
        assert_eq!(raw_get(db, DATA, b"m1"), None);
        assert_eq!(raw_get(db, DATA, b"m3"), None);

        // apply_atomic: a too large value or an encode failure leaves everything as it was.
        for bad in [over.clone(), s("poison")] {
            let ops = vec![
                WriteOp::Set {
                    key: s("t1"),
                    value: s("x"),
                    ttl: None,
                },
                WriteOp::Delete { key: s("k") },
                WriteOp::Set {
                    key: s("t2"),
                    value: bad,
                    ttl: None,
                },
            ];
            let err = layer.apply_atomic(&ops).await.expect_err("refused");
            assert!(
                matches!(err.kind(), ErrorKind::ValueTooLarge | ErrorKind::Encode),
                "{err}"
            );
            assert_eq!(err.operation(), Operation::Transaction);
            assert_eq!(raw_get(db, DATA, b"t1"), None);
            assert!(raw_get(db, DATA, b"k").is_some(), "the delete was not applied");
        }
        let ops = vec![
            WriteOp::Set {
                key: s("t1"),
                value: s("x"),
                ttl: Some(Duration::from_secs(60)),
            },
            WriteOp::Delete { key: s("k") },
        ];
        layer.apply_atomic(&ops).await.expect("apply");
        assert_eq!(
            layer.get(&s("t1")).await.expect("get").map(|e| e.value),
            Some(s("x"))
        );
        assert_eq!(layer.get(&s("k")).await.expect("get"), None);
    })
    .await;
}

// ---- expiry --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_entries_are_removed_when_read_and_not_counted() {
    within(TEST_TIMEOUT, async {
        let scratch = scratch_db();
        let db = &scratch.db;
        let clock = ManualClock::new(START);
        let layer = string_layer(db, &clock);
        let ttl = Some(Duration::from_secs(1));
        for key in ["a", "b", "c", "d"] {
            layer.set(&s(key), &s(key), ttl).await.expect("set");
        }
        layer.set(&s("live"), &s("live"), None).await.expect("set");
        let entry = layer.get(&s("a")).await.expect("get").expect("live yet");
        assert_eq!(entry.expires_at, Some(Timestamp::from_millis(START + 1_000)));

        clock.advance(Duration::from_millis(1_000)); // expiring exactly now is expired
        assert_eq!(raw_len(db, DATA), 5, "nothing removed before it is read");
        assert_eq!(layer.get(&s("a")).await.expect("get"), None);
        assert_eq!(raw_get(db, DATA, b"a"), None, "get removed it");
        assert!(!layer.exists(&s("b")).await.expect("exists"));
        assert_eq!(raw_get(db, DATA, b"b"), None, "exists removed it");
        assert!(
            !layer.delete(&s("c")).await.expect("delete"),
            "an expired entry is not present"
        );
        let keys = [s("d"), s("live"), s("absent")];
        assert_eq!(
            layer.delete_many(&keys).await.expect("delete_many"),
            1,
            "only `live` counts"
        );
        assert_eq!(raw_len(db, DATA), 0);
    })
    .await;
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_removes_unread_expired_entries_and_stops_on_close_and_drop() {
    within(TEST_TIMEOUT, async {
        let scratch = scratch_db();
        let db = &scratch.db;
        let clock = ManualClock::new(START);
        let interval = Duration::from_millis(20);
        let layer: RedbLayer<String, String> = RedbLayer::builder()
            .db(db.clone())
            .clock(clock.clone())
            .sweep_interval(interval)
            .sweep_batch(100) // 2,500 expired entries: many batches per pass
            .build()
            .expect("build");
        let short: Vec<(String, String)> = (0..2_500).map(|i| (format!("short:{i:05}"), s("x"))).collect();
        layer
            .set_many(&short, Some(Duration::from_secs(1)))
            .await
            .expect("set_many");
        let keep: Vec<(String, String)> = (0..10).map(|i| (format!("keep:{i}"), s("y"))).collect();
        layer.set_many(&keep, None).await.expect("set_many");
        layer
            .set(&s("later"), &s("z"), Some(Duration::from_secs(3600)))
            .await
            .expect("set");
        raw_insert(db, DATA, b"foreign", b"not ours");

        tokio::time::sleep(interval * 5).await;
        assert_eq!(raw_len(db, DATA), 2_512, "nothing has expired yet");
        clock.advance(Duration::from_secs(2));
        wait_until("the sweeper removed the expired entries", || {
            raw_len(db, DATA) == 12
        })
        .await;
        for (key, _) in &keep {
            assert!(layer.exists(key).await.expect("exists"));
        }
        assert!(layer.exists(&s("later")).await.expect("exists"));
        assert!(
            raw_get(db, DATA, b"foreign").is_some(),
            "foreign bytes are left to get"
        );

        // Stops after close: an expired entry written afterwards stays.
        let expired = envelope::wrap(CodecId::POSTCARD, Some(Timestamp::from_millis(1)), b"\x01x");
        layer.close().await.expect("close");
        raw_insert(db, DATA, b"after-close", &expired);
        tokio::time::sleep(interval * 15).await;
        assert!(
            raw_get(db, DATA, b"after-close").is_some(),
            "the sweeper ran after close"
        );

        // Stops after drop: first show this one runs, then drop it.
        let second: RedbLayer<String, String> = RedbLayer::builder()
            .db(db.clone())
            .clock(clock.clone())
            .sweep_interval(interval)
            .build()
            .expect("build");
        wait_until("the second sweeper ran", || {
            raw_get(db, DATA, b"after-close").is_none()
        })
        .await;
        drop(second);
        raw_insert(db, DATA, b"after-drop", &expired);
        tokio::time::sleep(interval * 15).await;
        assert!(
            raw_get(db, DATA, b"after-drop").is_some(),
            "the sweeper ran after drop"
        );
    })
    .await;
}

// ---- scan ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scanning_100k_keys_returns_exactly_them_lazily() {
    within(TEST_TIMEOUT, async {
        let scratch = scratch_db();
        let db = &scratch.db;
        let clock = ManualClock::new(START);
        let layer: RedbLayer<String, u64> = RedbLayer::builder()
            .db(db.clone())
            .clock(clock.clone())
            .build()
            .expect("build");
        const N: u64 = 100_000;
        for chunk in (0..N).collect::<Vec<_>>().chunks(10_000) {
            let entries: Vec<(String, u64)> = chunk.iter().map(|&i| (format!("item:{i:06}"), i)).collect();
            layer.set_many(&entries, None).await.expect("set_many");
        }
        // Neighbours that must not appear, and expired entries under the prefix.
        let neighbours: Vec<(String, u64)> =
            vec![(s("item"), 1), (s("itel:1"), 2), (s("iten"), 3), (s("other"), 4)];
        layer.set_many(&neighbours, None).await.expect("set_many");
        let expiring: Vec<(String, u64)> = (0..100).map(|i| (format!("item:{i:06}x"), i)).collect();
        layer
            .set_many(&expiring, Some(Duration::from_secs(1)))
            .await
            .expect("set_many");
        clock.advance(Duration::from_secs(2));

        let mut stream = layer.scan(b"item:").expect("scan");
        let first = next(&mut stream).await.expect("an item").expect("ok");
        assert_eq!((first.0.as_str(), first.1.value), ("item:000000", 0));
        // Written after the scan started, past its position: a scan that reads a page at
        // a time sees it (one that had collected everything up front would not).
        layer.set(&s("item:zzz"), &7, None).await.expect("set");
        // Removed past its position: not seen.
        assert!(layer.delete(&s("item:099999")).await.expect("delete"));
        let mut count = 1u64;
        let mut late = false;
        while let Some(item) = next(&mut stream).await {
            let (key, entry) = item.expect("scan item");
            if key == "item:zzz" {
                late = true;
                continue;
            }
            assert_eq!(
                key,
                format!("item:{count:06}"),
                "keys in order, none skipped or extra"
            );
            assert_eq!(entry.value, count);
            assert_eq!(entry.expires_at, None);
            count += 1;
        }
        assert_eq!(count, N - 1, "all but the one deleted during the scan");
        assert!(
            late,
            "the key written during the scan was not seen: the scan is not lazy"
        );

        // A scan of a closed layer: refused up front, or one Closed item mid-way.
        let mut stream = layer.scan(b"item:").expect("scan");
        assert!(next(&mut stream).await.expect("item").is_ok());
        layer.close().await.expect("close");
        assert_eq!(
            next(&mut stream)
                .await
                .expect("item")
                .map(drop)
                .map_err(|e| e.kind()),
            Err(ErrorKind::Closed)
        );
        assert!(next(&mut stream).await.is_none());
        assert_eq!(
            layer.scan(b"item:").map(drop).map_err(|e| e.kind()),
            Err(ErrorKind::Closed)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_reads_a_page_at_a_time_each_from_a_fresh_read_transaction() {
    within(TEST_TIMEOUT, async {
        let scratch = scratch_db();
        let db = &scratch.db;
        let layer: RedbLayer<String, Vec<u8>> = RedbLayer::builder()
            .db(db.clone())
            .sweeper(false)
            .build()
            .expect("build");
        // 2,000 values of 4 KiB (8 MiB) under the prefix. An entry is 4,120 bytes (a 9-byte
        // key, the 13-byte envelope, postcard's 2-byte length, the 4,096 bytes): a page
        // ends at 1 MiB, after 255 entries, before its count limit of 256.
        for chunk in (0..2_000u32).collect::<Vec<_>>().chunks(500) {
            let entries: Vec<(String, Vec<u8>)> = chunk
                .iter()
                .map(|i| (format!("big:{i:05}"), vec![7u8; 4096]))
                .collect();
            layer.set_many(&entries, None).await.expect("set_many");
        }
        let mut stream = layer.scan(b"big:").expect("scan");
        let mut seen = 0;
        while let Some(item) = next(&mut stream).await {
            let (key, entry) = item.expect("item");
            assert_eq!(key, format!("big:{seen:05}"));
            assert_eq!(entry.value.len(), 4096);
            seen += 1;
            if seen == 300 {
                // In the second page: clear everything. The rest of the page in hand is
                // yielded; the next page reads the table as it is now (empty). A scan that
                // held one read transaction (a snapshot) would go on to 2,000, and one
                // that read ahead would hold more than a page.
                layer.clear().await.expect("clear");
            }
        }
        assert_eq!(seen, 510, "two pages of 255");
        assert_eq!(raw_len(db, DATA), 0);
    })
    .await;
}

// ---- persistence, keys, capabilities, close ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_close_and_reopen_under_every_policy() {
    within(TEST_TIMEOUT, async {
        for policy in [
            Durability::Immediate,
            Durability::EveryMillis(10),
            Durability::Manual,
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("db.redb");
            let layer: RedbLayer<u64, String> = RedbLayer::builder()
                .path(&path)
                .table("numbers")
                .durability(policy)
                .build()
                .expect("open");
            layer.set(&1, &s("one"), None).await.expect("set");
            layer
                .set(&2, &s("two"), Some(Duration::from_secs(3600)))
                .await
                .expect("set");
            layer
                .apply_atomic(&[WriteOp::Delete { key: 1 }])
                .await
                .expect("tx");
            layer.set_many(&[(3, s("three"))], None).await.expect("set_many");
            layer.close().await.expect("close");

            let layer: RedbLayer<u64, String> = RedbLayer::builder()
                .path(&path)
                .table("numbers")
                .build()
                .expect("reopen");
            assert_eq!(layer.get(&1).await.expect("get"), None, "{policy:?}");
            let two = layer.get(&2).await.expect("get").expect("two survives");
            assert_eq!(two.value, "two");
            assert!(two.expires_at.is_some(), "the expiry survives too");
            assert_eq!(
                layer.get(&3).await.expect("get").map(|e| e.value),
                Some(s("three"))
            );
            layer.close().await.expect("close");

            // The default table of the same database is another namespace.
            let other: RedbLayer<u64, String> = RedbLayer::builder().path(&path).build().expect("reopen");
            assert_eq!(other.get(&2).await.expect("get"), None);
            other.close().await.expect("close");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_stored_as_their_storage_key_bytes() {
    within(TEST_TIMEOUT, async {
        let scratch = scratch_db();
        let db = &scratch.db;
        let strings = string_layer(db, &ManualClock::new(START));
        strings.set(&s("user:42"), &s("Ada"), None).await.expect("set");
        let raw = raw_get(db, DATA, b"user:42").expect("readable UTF-8 key");
        let (expiry, _) = envelope::unwrap(&raw).expect("an envelope");
        assert_eq!(expiry, None);

        let numbers: RedbLayer<u64, u64> = RedbLayer::builder()
            .db(db.clone())
            .table("n")
            .build()
            .expect("build");
        numbers.set(&258, &1, None).await.expect("set");
        assert!(
            raw_get(db, "n", &258u64.to_be_bytes()).is_some(),
            "big-endian key"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_sync_read_and_close() {
    within(TEST_TIMEOUT, async {
        let scratch = scratch_db();
        let db = &scratch.db;
        let layer = string_layer(db, &ManualClock::new(START));
        let caps = layer.capabilities();
        assert!(caps.scan && caps.transactions && caps.persistent);
        assert!(!caps.sync_ops && !caps.native_ttl);
        layer.set(&s("k"), &s("v"), None).await.expect("set");
        assert!(layer.get_sync(&s("k")).is_none(), "reads go through get");
        assert_eq!(layer.name(), "redb");

        let dir = tempfile::tempdir().expect("tempdir");
        let temp_path = dir.path().join("temp.redb");
        let temp: RedbLayer<String, String> = RedbLayer::builder()
            .path(&temp_path)
            .temporary(true)
            .build()
            .expect("build");
        assert!(
            !temp.capabilities().persistent,
            "a temporary database is not persistent"
        );
        temp.set(&s("k"), &s("v"), None).await.expect("set");
        temp.close().await.expect("close");
        assert!(temp_path.exists(), "the file stays while a handle does");
        drop(temp);
        assert!(!temp_path.exists(), "dropping the last handle removed the file");

        let clone = layer.clone();
        layer.close().await.expect("close");
        layer.close().await.expect("idempotent");
        let keys = [s("k")];
        assert_eq!(
            kind(clone.get(&s("k")).await),
            ErrorKind::Closed,
            "clones share the state"
        );
        assert_eq!(kind(layer.set(&s("k"), &s("v"), None).await), ErrorKind::Closed);
        assert_eq!(kind(layer.delete(&s("k")).await), ErrorKind::Closed);
        assert_eq!(kind(layer.exists(&s("k")).await), ErrorKind::Closed);
        assert_eq!(kind(layer.get_many(&keys).await), ErrorKind::Closed);
        assert_eq!(
            kind(layer.set_many(&[(s("k"), s("v"))], None).await),
            ErrorKind::Closed
        );
        assert_eq!(kind(layer.delete_many(&keys).await), ErrorKind::Closed);
        assert_eq!(
            kind(layer.apply_atomic(&[WriteOp::Delete { key: s("k") }]).await),
            ErrorKind::Closed
        );
        assert_eq!(kind(layer.flush().await), ErrorKind::Closed);
        assert_eq!(kind(layer.clear().await), ErrorKind::Closed);
        assert_eq!(kind(layer.scan(b"").map(drop)), ErrorKind::Closed);
        // Closing the layer did not close the caller's database.
        assert!(raw_get(db, DATA, b"k").is_some());
    })
    .await;
}

#[test]
fn an_empty_path_or_a_directory_is_a_config_error() {
    let err = RedbLayer::builder()
        .path("")
        .build::<String, String>()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.message().contains("empty"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = RedbLayer::builder()
        .path(dir.path())
        .build::<String, String>()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.message().contains("is a directory"), "{err}");
    let err = RedbLayer::builder()
        .temporary(true)
        .path(dir.path().join("db.redb"))
        .cache_capacity(0)
        .build::<String, String>()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_parent_directories_are_created() {
    within(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/b/c/db.redb");
        let layer: RedbLayer<String, String> = RedbLayer::builder().path(&path).build().expect("build");
        layer.set(&s("k"), &s("v"), None).await.expect("set");
        layer.close().await.expect("close");
        assert!(path.is_file());
    })
    .await;
}

/// Every size and duration option at its extremes (0, 1, the type's maximum), one at a
/// time: a typed error at build, or a layer that works; never a panic (background tasks
/// included: a hook counts them) or a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_option_values_are_typed_errors_or_working_layers() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    type Tweak = Box<dyn FnOnce(capacitor_redb::RedbLayerBuilder) -> capacitor_redb::RedbLayerBuilder>;
    let mut cases: Vec<(String, Tweak)> = Vec::new();
    for d in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
        cases.push((
            format!("sweep_interval({d:?})"),
            Box::new(move |b| b.sweep_interval(d)),
        ));
        cases.push((format!("lock_wait({d:?})"), Box::new(move |b| b.lock_wait(d))));
    }
    for n in [0, 1, usize::MAX] {
        cases.push((
            format!("max_value_bytes({n})"),
            Box::new(move |b| b.max_value_bytes(n)),
        ));
        cases.push((format!("sweep_batch({n})"), Box::new(move |b| b.sweep_batch(n))));
        cases.push((
            format!("cache_capacity({n})"),
            Box::new(move |b| b.cache_capacity(n)),
        ));
    }
    for ms in [0, 1, u64::MAX] {
        cases.push((
            format!("EveryMillis({ms})"),
            Box::new(move |b| b.durability(Durability::EveryMillis(ms))),
        ));
    }
    for (what, tweak) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let built = tweak(RedbLayer::builder().path(dir.path().join("db.redb"))).build::<String, String>();
        match built {
            Err(e) => assert_eq!(e.kind(), ErrorKind::Config, "{what}: {e}"),
            Ok(layer) => {
                let ops = async {
                    match layer.set(&s("k"), &s("v"), Some(Duration::from_secs(60))).await {
                        Ok(()) => {
                            assert_eq!(layer.get(&s("k")).await?.map(|e| e.value), Some(s("v")), "{what}");
                            assert!(layer.delete(&s("k")).await?, "{what}");
                        }
                        // A limit smaller than the value: refused, typed.
                        Err(e) if e.kind() == ErrorKind::ValueTooLarge => {
                            assert_eq!(layer.get(&s("k")).await?, None, "{what}: nothing written");
                        }
                        Err(e) => return Err(e),
                    }
                    layer.flush().await?;
                    layer.close().await
                };
                tokio::time::timeout(Duration::from_secs(30), ops)
                    .await
                    .unwrap_or_else(|_| panic!("{what}: hung"))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // background tasks tick
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic (see above)");
}

#[tokio::test]
async fn temporary_refuses_a_database_that_exists_instead_of_deleting_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kept.redb");
    let layer: RedbLayer<String, String> = RedbLayer::builder()
        .path(&path)
        .sweeper(false)
        .build()
        .expect("build");
    layer.set(&s("k"), &s("v"), None).await.expect("set");
    layer.close().await.expect("close");
    drop(layer);
    let err = RedbLayer::builder()
        .path(&path)
        .temporary(true)
        .sweeper(false)
        .build::<String, String>()
        .expect_err("an existing database is not made temporary");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("exists already"), "{err}");
    assert!(path.exists(), "the database is still there");
    let reopened: RedbLayer<String, String> = RedbLayer::builder()
        .path(&path)
        .sweeper(false)
        .build()
        .expect("reopen");
    assert_eq!(
        reopened.get(&s("k")).await.expect("get").map(|e| e.value),
        Some(s("v"))
    );
}
