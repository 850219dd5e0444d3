//! Behaviour specific to the sled layer: opening errors, configuration errors, bad bytes,
//! the value size limit, lazy expiry, the sweeper, scans, persistence and atomicity.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::future::poll_fn;
use std::pin::Pin;
use std::time::{Duration, Instant};

use capacitor_core::testkit::within;
use capacitor_core::{
    envelope, Codec, CodecId, EntryStream, Error, ErrorKind, Layer, LayerConfig, ManualClock, MultiLayer,
    Operation, Result, Timestamp, WriteOp,
};
use capacitor_memory::DashMapLayer;
use capacitor_sled::{FlushPolicy, SledLayer};
use futures_core::Stream;

use crate::common::scratch_db;

/// Every test body runs under this bound.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const START: u64 = 1_700_000_000_000;

fn s(x: &str) -> String {
    x.to_owned()
}

fn string_layer(db: &sled::Db, clock: &ManualClock) -> SledLayer<String, String> {
    SledLayer::builder()
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
    let path = file.path().join("db");
    let err = SledLayer::builder()
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
    let source = std::error::Error::source(&err).expect("sled's error is kept");
    let sled_err = source.downcast_ref::<sled::Error>().expect("a sled::Error");
    assert!(matches!(sled_err, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::NotADirectory));
    assert!(
        err.to_string().contains("Not a directory"),
        "the message shows the cause: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_directory_is_a_typed_error_and_close_releases_it() {
    within(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let first = SledLayer::builder()
            .path(&path)
            .build::<String, String>()
            .expect("first open");
        first.set(&s("k"), &s("v"), None).await.expect("set");

        // sled locks the directory with flock: a second open, in this process or another,
        // is refused once the lock wait is over.
        let started = Instant::now();
        let err = SledLayer::builder()
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
        assert!(std::error::Error::source(&err).is_some());

        // A build waits (`lock_wait`) for a lock released meanwhile: here the holder closes
        // 300 ms into the wait, and sled lets go of its lock lazily after that.
        let closer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            first.close().await.expect("close");
        });
        let again = tokio::task::spawn_blocking(move || {
            // Long enough for a close on a loaded machine; the default is 1 s.
            SledLayer::builder()
                .path(&path)
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
    })
    .await;
}

#[test]
fn configuration_errors_name_the_field() {
    let db = scratch_db();
    let cases: Vec<(&str, Error)> = vec![
        (
            "path",
            SledLayer::builder().build::<String, String>().unwrap_err(),
        ),
        (
            "path",
            SledLayer::builder()
                .path("/nonexistent/x")
                .db(db.clone())
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "temporary",
            SledLayer::builder()
                .db(db.clone())
                .temporary(true)
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "cache_capacity",
            SledLayer::builder()
                .db(db.clone())
                .cache_capacity(1 << 20)
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "max_value_bytes",
            SledLayer::builder()
                .db(db.clone())
                .max_value_bytes(0)
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "sweep_interval",
            SledLayer::builder()
                .db(db.clone())
                .sweep_interval(Duration::ZERO)
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "sweep_batch",
            SledLayer::builder()
                .db(db.clone())
                .sweep_batch(0)
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "flush_policy",
            SledLayer::builder()
                .db(db.clone())
                .flush_policy(FlushPolicy::EveryMillis(0))
                .build::<String, String>()
                .unwrap_err(),
        ),
        // No tokio runtime here: background tasks cannot start.
        (
            "sweeper",
            SledLayer::builder()
                .db(db.clone())
                .build::<String, String>()
                .unwrap_err(),
        ),
        (
            "flush_policy",
            SledLayer::builder()
                .db(db.clone())
                .sweeper(false)
                .flush_policy(FlushPolicy::EveryMillis(100))
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
    // Without a background task, no runtime is needed; with `path`, sled flushes itself.
    SledLayer::builder()
        .db(db.clone())
        .sweeper(false)
        .flush_policy(FlushPolicy::Manual)
        .build::<String, String>()
        .expect("no runtime needed");
    let dir = tempfile::tempdir().expect("tempdir");
    SledLayer::builder()
        .path(dir.path().join("db"))
        .sweeper(false)
        .flush_policy(FlushPolicy::EveryMillis(100))
        .build::<String, String>()
        .expect("sled's own flusher thread needs no runtime");
}

#[test]
fn the_default_sweeper_needs_a_runtime_and_the_error_says_how_to_do_without() {
    let builder = SledLayer::builder();
    let shown = format!("{builder:?}");
    assert!(shown.contains("sweeper: true"), "on by default: {shown}");
    assert!(shown.contains("sweep_interval: 60s"), "every minute: {shown}");
    assert!(shown.contains("sweep_batch: 1000"), "1,000 per batch: {shown}");

    let dir = tempfile::tempdir().expect("tempdir");
    let err = builder
        .path(dir.path().join("db"))
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
    SledLayer::builder()
        .path(dir.path().join("db"))
        .sweeper(false)
        .build::<String, String>()
        .expect("no background task, no runtime needed");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let layer = SledLayer::builder()
            .path(dir.path().join("other"))
            .build::<String, String>()
            .expect("inside a runtime");
        layer.close().await.expect("close");
    });
}

// ---- bad bytes -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_do_not_decode_are_a_decode_error_and_removed() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let layer = string_layer(&db, &ManualClock::new(START));

        // Not capacitor's envelope at all.
        db.insert("foreign", &b"written by someone else"[..])
            .expect("raw insert");
        let err = layer.get(&s("foreign")).await.expect_err("decode error");
        assert_eq!((err.kind(), err.operation()), (ErrorKind::Decode, Operation::Get));
        assert_eq!(
            db.get("foreign").expect("raw get"),
            None,
            "the bad entry is removed"
        );
        assert_eq!(layer.get(&s("foreign")).await.expect("then a plain miss"), None);

        // Our envelope, but a payload that is not a postcard String.
        db.insert(
            "garbled",
            envelope::wrap(CodecId::POSTCARD, None, &[0xff, 0xff, 0xff, 0xff, 0xff]),
        )
        .expect("raw insert");
        assert_eq!(kind(layer.get(&s("garbled")).await), ErrorKind::Decode);
        assert_eq!(db.get("garbled").expect("raw get"), None);

        // An envelope of a later version (a newer build's, during a rolling upgrade), and a
        // value of a codec this layer does not read: a Decode error, and kept for the
        // instances that can read them, by get, get_many and exists.
        let mut future = envelope::wrap(CodecId::POSTCARD, None, b"\x01x");
        future[3] = envelope::VERSION_CODEC + 1;
        db.insert("future", future.clone()).expect("raw insert");
        let theirs = envelope::wrap(CodecId::custom(7), None, b"\x01x");
        db.insert("theirs", theirs.clone()).expect("raw insert");
        for key in ["future", "theirs"] {
            assert_eq!(kind(layer.get(&s(key)).await), ErrorKind::Decode);
            assert_eq!(kind(layer.get_many(&[s(key)]).await), ErrorKind::Decode);
            assert_eq!(kind(layer.exists(&s(key)).await), ErrorKind::Decode);
        }
        assert_eq!(db.get("future").expect("raw get").as_deref(), Some(&future[..]));
        assert_eq!(db.get("theirs").expect("raw get").as_deref(), Some(&theirs[..]));
        db.remove("future").expect("raw remove");
        db.remove("theirs").expect("raw remove");

        // exists checks the envelope.
        db.insert("foreign2", &b"xx"[..]).expect("raw insert");
        assert_eq!(kind(layer.exists(&s("foreign2")).await), ErrorKind::Decode);
        assert_eq!(db.get("foreign2").expect("raw get"), None);

        // get_many fails as a whole, removes every bad entry, and a retry reads the rest.
        layer.set(&s("good"), &s("value"), None).await.expect("set");
        db.insert("bad1", &b"x"[..]).expect("raw insert");
        db.insert("bad2", &b"y"[..]).expect("raw insert");
        let keys = [s("good"), s("bad1"), s("bad2")];
        let err = layer.get_many(&keys).await.expect_err("decode error");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Decode, Operation::GetMany)
        );
        assert_eq!(db.get("bad1").expect("raw"), None);
        assert_eq!(db.get("bad2").expect("raw"), None);
        let values: Vec<Option<String>> = layer
            .get_many(&keys)
            .await
            .expect("retry")
            .into_iter()
            .map(|e| e.map(|e| e.value))
            .collect();
        assert_eq!(values, vec![Some(s("value")), None, None]);

        // A scan reports a bad entry as an item and goes on; it does not write.
        db.insert("scan:b", &b"bad"[..]).expect("raw insert");
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
        assert!(db.get("scan:b").expect("raw").is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bytes_under_a_multilayer_are_a_counted_miss() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let sled_layer = string_layer(&db, &ManualClock::new(START));
        let cache = MultiLayer::<String, String>::builder()
            .layer(LayerConfig::new("memory", DashMapLayer::new()))
            .layer(LayerConfig::new("sled", sled_layer))
            .build()
            .expect("multi");
        db.insert("k", &b"\x00\x01 not an envelope"[..])
            .expect("raw insert");

        assert_eq!(cache.get(&s("k")).await.expect("a miss, not an error"), None);
        let stats = cache.stats();
        let row = stats.layer("sled").expect("sled row");
        assert_eq!(row.decode_errors, 1);
        assert_eq!(row.misses, 1);
        assert_eq!(row.errors, 0);
        assert_eq!(db.get("k").expect("raw get"), None, "the bad entry is evicted");

        cache.set(s("k"), s("fresh")).await.expect("set");
        assert_eq!(cache.get(&s("k")).await.expect("get"), Some(s("fresh")));
        assert_eq!(cache.stats().layer("sled").expect("row").decode_errors, 1);
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
        let db = scratch_db();
        // The codec writes a string as its bytes: encoded size = length.
        let layer: SledLayer<String, String, PickyCodec> = SledLayer::builder()
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
        assert_eq!(db.get("new").expect("raw"), None, "nothing written");

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
        assert_eq!(db.get("m1").expect("raw"), None);
        assert_eq!(db.get("m3").expect("raw"), None);

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
            assert_eq!(db.get("t1").expect("raw"), None);
            assert!(db.get("k").expect("raw").is_some(), "the delete was not applied");
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
        let db = scratch_db();
        let clock = ManualClock::new(START);
        let layer = string_layer(&db, &clock);
        let ttl = Some(Duration::from_secs(1));
        for key in ["a", "b", "c", "d"] {
            layer.set(&s(key), &s(key), ttl).await.expect("set");
        }
        layer.set(&s("live"), &s("live"), None).await.expect("set");
        let entry = layer.get(&s("a")).await.expect("get").expect("live yet");
        assert_eq!(entry.expires_at, Some(Timestamp::from_millis(START + 1_000)));

        clock.advance(Duration::from_millis(1_000)); // expiring exactly now is expired
        assert_eq!(db.len(), 5, "nothing removed before it is read");
        assert_eq!(layer.get(&s("a")).await.expect("get"), None);
        assert_eq!(db.get("a").expect("raw"), None, "get removed it");
        assert!(!layer.exists(&s("b")).await.expect("exists"));
        assert_eq!(db.get("b").expect("raw"), None, "exists removed it");
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
        assert_eq!(db.len(), 0);
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
        let db = scratch_db();
        let clock = ManualClock::new(START);
        let interval = Duration::from_millis(20);
        let layer: SledLayer<String, String> = SledLayer::builder()
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
        db.insert("foreign", &b"not ours"[..]).expect("raw insert");

        tokio::time::sleep(interval * 5).await;
        assert_eq!(db.len(), 2_512, "nothing has expired yet");
        clock.advance(Duration::from_secs(2));
        wait_until("the sweeper removed the expired entries", || db.len() == 12).await;
        for (key, _) in &keep {
            assert!(layer.exists(key).await.expect("exists"));
        }
        assert!(layer.exists(&s("later")).await.expect("exists"));
        assert!(
            db.get("foreign").expect("raw").is_some(),
            "foreign bytes are left to get"
        );

        // Stops after close: an expired entry written afterwards stays.
        let expired = envelope::wrap(CodecId::POSTCARD, Some(Timestamp::from_millis(1)), b"\x01x");
        layer.close().await.expect("close");
        db.insert("after-close", expired.clone()).expect("raw insert");
        tokio::time::sleep(interval * 15).await;
        assert!(
            db.get("after-close").expect("raw").is_some(),
            "the sweeper ran after close"
        );

        // Stops after drop: first show this one runs, then drop it.
        let second: SledLayer<String, String> = SledLayer::builder()
            .db(db.clone())
            .clock(clock.clone())
            .sweep_interval(interval)
            .build()
            .expect("build");
        wait_until("the second sweeper ran", || {
            db.get("after-close").expect("raw").is_none()
        })
        .await;
        drop(second);
        db.insert("after-drop", expired).expect("raw insert");
        tokio::time::sleep(interval * 15).await;
        assert!(
            db.get("after-drop").expect("raw").is_some(),
            "the sweeper ran after drop"
        );
    })
    .await;
}

// ---- scan ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scanning_100k_keys_returns_exactly_them_lazily() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let clock = ManualClock::new(START);
        let layer: SledLayer<String, u64> = SledLayer::builder()
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
        // Written after the scan started, past its position: a lazy walk of the live tree
        // sees it (a scan that had collected everything up front would not).
        layer.set(&s("item:zzz"), &7, None).await.expect("set");
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
        assert_eq!(count, N);
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

// ---- persistence, keys, capabilities, close ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_close_and_reopen_under_every_policy() {
    within(TEST_TIMEOUT, async {
        for policy in [
            FlushPolicy::EveryWrite,
            FlushPolicy::EveryMillis(10),
            FlushPolicy::Manual,
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("db");
            let layer: SledLayer<u64, String> = SledLayer::builder()
                .path(&path)
                .tree("numbers")
                .flush_policy(policy)
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

            let layer: SledLayer<u64, String> = SledLayer::builder()
                .path(&path)
                .tree("numbers")
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

            // The default tree of the same database is another namespace.
            let other: SledLayer<u64, String> = SledLayer::builder().path(&path).build().expect("reopen");
            assert_eq!(other.get(&2).await.expect("get"), None);
            other.close().await.expect("close");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_stored_as_their_storage_key_bytes() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let strings = string_layer(&db, &ManualClock::new(START));
        strings.set(&s("user:42"), &s("Ada"), None).await.expect("set");
        let raw = db.get(b"user:42").expect("raw").expect("readable UTF-8 key");
        let (expiry, _) = envelope::unwrap(&raw).expect("an envelope");
        assert_eq!(expiry, None);

        let numbers: SledLayer<u64, u64> = SledLayer::builder()
            .db(db.clone())
            .tree("n")
            .build()
            .expect("build");
        numbers.set(&258, &1, None).await.expect("set");
        let tree = db.open_tree("n").expect("tree");
        assert!(
            tree.get(258u64.to_be_bytes()).expect("raw").is_some(),
            "big-endian key"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_sync_read_and_close() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let layer = string_layer(&db, &ManualClock::new(START));
        let caps = layer.capabilities();
        assert!(caps.scan && caps.transactions && caps.persistent);
        assert!(!caps.sync_ops && !caps.native_ttl);
        layer.set(&s("k"), &s("v"), None).await.expect("set");
        assert!(layer.get_sync(&s("k")).is_none(), "reads go through get");
        assert_eq!(layer.name(), "sled");

        let temp: SledLayer<String, String> = SledLayer::builder()
            .path(std::env::temp_dir().join(format!("capacitor-sled-caps-{}", std::process::id())))
            .temporary(true)
            .build()
            .expect("build");
        assert!(
            !temp.capabilities().persistent,
            "a temporary database is not persistent"
        );
        temp.close().await.expect("close");

        let clone = layer.clone();
        layer.close().await.expect("close");
        layer.close().await.expect("idempotent");
        let keys = [s("k")];
        assert_eq!(
            kind(clone.get(&s("k")).await),
            ErrorKind::Closed,
            "clones share the state"
        );
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
        assert_eq!(kind(layer.scan(b"").map(drop)), ErrorKind::Closed);
        // Closing the layer did not close the caller's database.
        assert!(db.get("k").expect("raw").is_some());
    })
    .await;
}

#[test]
fn an_empty_path_or_a_file_is_a_config_error() {
    let err = SledLayer::builder()
        .path("")
        .build::<String, String>()
        .unwrap_err();
    assert_eq!(err.kind(), capacitor_core::ErrorKind::Config, "{err}");
    assert!(err.message().contains("empty"), "{err}");
    let file = tempfile::NamedTempFile::new().unwrap();
    let err = SledLayer::builder()
        .path(file.path())
        .build::<String, String>()
        .unwrap_err();
    assert_eq!(err.kind(), capacitor_core::ErrorKind::Config, "{err}");
    let err = SledLayer::builder()
        .temporary(true)
        .path(tempfile::tempdir().unwrap().path().join("db"))
        .cache_capacity(10)
        .build::<String, String>()
        .unwrap_err();
    assert_eq!(err.kind(), capacitor_core::ErrorKind::Config, "{err}");
}
