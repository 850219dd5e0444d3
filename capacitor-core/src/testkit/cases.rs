//! The behaviours of the conformance suite. Assertions panic: this is test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;

use super::{Case, CaseFuture, TestContext, TestLayer};
use crate::entry::{Clock, SystemClock};
use crate::error::ErrorKind;
use crate::layer::{EntryStream, WriteOp};

fn k(s: &str) -> String {
    s.to_owned()
}

/// A TTL short enough to keep the suite quick. A loaded machine (a logged or fsyncing
/// backend under a busy CI runner) may take longer than this between a write and the read
/// that follows it: presence before expiry is asserted only when the write and the read
/// took less than this ([`within_short_ttl`]), absence after [`PAST_SHORT_TTL`] always.
const SHORT_TTL: Duration = Duration::from_secs(1);
/// Waited after the last write with [`SHORT_TTL`] returned: every such entry has expired.
const PAST_SHORT_TTL: Duration = Duration::from_millis(1_700);

/// Whether less than [`SHORT_TTL`] passed since `since` (taken before a write with that
/// TTL): an entry written then must still be live. Says so on stderr when not.
fn within_short_ttl(since: std::time::Instant, what: &str) -> bool {
    let elapsed = since.elapsed();
    let within = elapsed < SHORT_TTL;
    if !within {
        eprintln!(
            "{what}: the write and the read took {elapsed:?}, not under the {SHORT_TTL:?} TTL: \
             presence before expiry not checked this run"
        );
    }
    within
}

macro_rules! case {
    ($name:ident, |$layer:ident, $ctx:ident| $body:block) => {
        Case {
            name: stringify!($name),
            run: |$layer: TestLayer, $ctx: TestContext| -> CaseFuture {
                let _ = &$ctx;
                Box::pin(async move { $body })
            },
        }
    };
}

async fn value(layer: &TestLayer, key: &str) -> Option<Vec<u8>> {
    layer.get(&k(key)).await.expect("get").map(|e| e.value)
}

async fn next(
    stream: &mut EntryStream<String, Vec<u8>>,
) -> Option<crate::Result<(String, crate::Entry<Vec<u8>>)>> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// Every case, in the order the `conformance_tests!` macro lists them.
pub static CASES: &[Case] = &[
    case!(get_missing_is_none, |layer, ctx| {
        assert_eq!(layer.get(&k("never-written")).await.expect("get"), None);
    }),
    case!(set_then_get, |layer, ctx| {
        layer.set(&k("a"), &b"alpha".to_vec(), None).await.expect("set");
        assert_eq!(value(&layer, "a").await.as_deref(), Some(&b"alpha"[..]));
    }),
    case!(overwrite_replaces_value_and_expiry, |layer, ctx| {
        layer
            .set(&k("a"), &b"one".to_vec(), Some(Duration::from_secs(60)))
            .await
            .expect("set");
        layer
            .set(&k("a"), &b"two".to_vec(), None)
            .await
            .expect("overwrite");
        let entry = layer.get(&k("a")).await.expect("get").expect("present");
        assert_eq!(entry.value, b"two");
        assert_eq!(
            entry.expires_at, None,
            "a later set without TTL must clear the expiry"
        );
        layer
            .set(&k("a"), &b"three".to_vec(), Some(SHORT_TTL))
            .await
            .expect("overwrite with ttl");
        tokio::time::sleep(PAST_SHORT_TTL).await;
        assert_eq!(value(&layer, "a").await, None, "the new TTL must apply");
    }),
    case!(delete_reports_presence, |layer, ctx| {
        assert!(!layer.delete(&k("d")).await.expect("delete missing"));
        layer.set(&k("d"), &b"x".to_vec(), None).await.expect("set");
        assert!(layer.delete(&k("d")).await.expect("delete present"));
        assert_eq!(value(&layer, "d").await, None);
        assert!(!layer.delete(&k("d")).await.expect("delete again"));
    }),
    case!(exists_follows_writes, |layer, ctx| {
        assert!(!layer.exists(&k("e")).await.expect("exists"));
        layer.set(&k("e"), &b"x".to_vec(), None).await.expect("set");
        assert!(layer.exists(&k("e")).await.expect("exists"));
        layer.delete(&k("e")).await.expect("delete");
        assert!(!layer.exists(&k("e")).await.expect("exists"));
    }),
    case!(ttl_expires_entries, |layer, ctx| {
        layer
            .set(&k("keep"), &b"long".to_vec(), Some(Duration::from_secs(600)))
            .await
            .expect("set");
        let written = std::time::Instant::now();
        layer
            .set(&k("t"), &b"short".to_vec(), Some(SHORT_TTL))
            .await
            .expect("set");
        let before_expiry = value(&layer, "t").await;
        if within_short_ttl(written, "ttl_expires_entries") {
            assert_eq!(before_expiry.as_deref(), Some(&b"short"[..]));
        }
        tokio::time::sleep(PAST_SHORT_TTL).await;
        assert_eq!(value(&layer, "t").await, None, "expired entry returned");
        assert!(
            !layer.exists(&k("t")).await.expect("exists"),
            "expired entry exists"
        );
        assert!(
            !layer.delete(&k("t")).await.expect("delete"),
            "delete of an expired entry reported it present"
        );
        assert_eq!(value(&layer, "keep").await.as_deref(), Some(&b"long"[..]));
    }),
    case!(remaining_ttl_is_reported, |layer, ctx| {
        let ttl = Duration::from_secs(60);
        let before = SystemClock.now();
        layer.set(&k("r"), &b"x".to_vec(), Some(ttl)).await.expect("set");
        let entry = layer.get(&k("r")).await.expect("get").expect("present");
        let after = SystemClock.now();
        let at = entry
            .expires_at
            .expect("an entry set with a TTL reports its expiry");
        // One second of slack for backends that store whole seconds.
        assert!(
            at >= before.saturating_add(ttl - Duration::from_secs(1)),
            "expiry too early: {at:?} < {before:?}+{ttl:?}"
        );
        assert!(
            at <= after.saturating_add(ttl + Duration::from_secs(1)),
            "expiry too late: {at:?} > {after:?}+{ttl:?}"
        );
    }),
    case!(no_ttl_means_no_expiry, |layer, ctx| {
        layer.set(&k("p"), &b"x".to_vec(), None).await.expect("set");
        let entry = layer.get(&k("p")).await.expect("get").expect("present");
        assert_eq!(entry.expires_at, None);
    }),
    case!(get_many_keeps_order, |layer, ctx| {
        layer.set(&k("m1"), &b"1".to_vec(), None).await.expect("set");
        layer.set(&k("m3"), &b"3".to_vec(), None).await.expect("set");
        let got = layer
            .get_many(&[k("m3"), k("m2"), k("m1"), k("m3")])
            .await
            .expect("get_many");
        let values: Vec<Option<Vec<u8>>> = got.into_iter().map(|e| e.map(|e| e.value)).collect();
        assert_eq!(
            values,
            vec![
                Some(b"3".to_vec()),
                None,
                Some(b"1".to_vec()),
                Some(b"3".to_vec())
            ]
        );
        assert!(layer.get_many(&[]).await.expect("empty get_many").is_empty());
    }),
    case!(set_many_and_delete_many, |layer, ctx| {
        let entries: Vec<(String, Vec<u8>)> = (0..50).map(|i| (format!("b{i}"), vec![i as u8; 3])).collect();
        layer.set_many(&entries, None).await.expect("set_many");
        for (key, v) in &entries {
            assert_eq!(value(&layer, key).await.as_ref(), Some(v));
        }
        let keys: Vec<String> = vec![k("b0"), k("b1"), k("absent"), k("b2")];
        assert_eq!(layer.delete_many(&keys).await.expect("delete_many"), 3);
        assert_eq!(value(&layer, "b1").await, None);
        assert_eq!(value(&layer, "b3").await, Some(vec![3; 3]));
        layer.set_many(&[], None).await.expect("empty set_many");
        assert_eq!(layer.delete_many(&[]).await.expect("empty delete_many"), 0);
    }),
    case!(set_many_with_ttl_expires, |layer, ctx| {
        let entries = vec![(k("x1"), b"1".to_vec()), (k("x2"), b"2".to_vec())];
        let written = std::time::Instant::now();
        layer.set_many(&entries, Some(SHORT_TTL)).await.expect("set_many");
        let before_expiry = layer.get(&k("x1")).await.expect("get");
        if within_short_ttl(written, "set_many_with_ttl_expires") {
            assert!(
                before_expiry.and_then(|e| e.expires_at).is_some(),
                "an entry set with a TTL is live and reports its expiry"
            );
        }
        tokio::time::sleep(PAST_SHORT_TTL).await;
        assert_eq!(value(&layer, "x1").await, None);
        assert_eq!(value(&layer, "x2").await, None);
    }),
    case!(empty_and_large_values, |layer, ctx| {
        layer
            .set(&k("empty"), &Vec::new(), None)
            .await
            .expect("set empty");
        assert_eq!(
            value(&layer, "empty").await,
            Some(Vec::new()),
            "an empty value is a value, not a miss"
        );
        let large: Vec<u8> = (0..2 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        layer.set(&k("large"), &large, None).await.expect("set 2 MiB");
        assert!(
            value(&layer, "large").await.as_ref() == Some(&large),
            "2 MiB value did not round-trip"
        );
    }),
    case!(unusual_keys_round_trip, |layer, ctx| {
        let keys = [
            String::new(),
            k(" "),
            k("spaces in the key"),
            k("ключ-ünïcødé-🔑"),
            k("new\nline\tand tab"),
            k("glob*?[chars]"),
            k("colons:a:b:c"),
            k("slash/and\\back"),
            k("quotes'\"`"),
            k("percent%_like"),
            "x".repeat(1_000),
        ];
        for (i, key) in keys.iter().enumerate() {
            layer
                .set(key, &vec![i as u8], None)
                .await
                .unwrap_or_else(|e| panic!("set {key:?}: {e}"));
        }
        for (i, key) in keys.iter().enumerate() {
            let got = layer
                .get(key)
                .await
                .unwrap_or_else(|e| panic!("get {key:?}: {e}"))
                .map(|e| e.value);
            assert_eq!(got, Some(vec![i as u8]), "key {key:?}");
        }
        for key in &keys {
            assert!(layer.delete(key).await.expect("delete"), "key {key:?}");
        }
    }),
    case!(close_is_idempotent_and_final, |layer, ctx| {
        layer.set(&k("c"), &b"x".to_vec(), None).await.expect("set");
        layer.close().await.expect("close");
        layer.close().await.expect("second close is a no-op");
        let kind = |r: crate::Result<()>| r.err().map(|e| e.kind());
        assert_eq!(kind(layer.get(&k("c")).await.map(drop)), Some(ErrorKind::Closed));
        assert_eq!(
            kind(layer.set(&k("c"), &b"y".to_vec(), None).await),
            Some(ErrorKind::Closed)
        );
        assert_eq!(
            kind(layer.delete(&k("c")).await.map(drop)),
            Some(ErrorKind::Closed)
        );
        assert_eq!(
            kind(layer.exists(&k("c")).await.map(drop)),
            Some(ErrorKind::Closed)
        );
    }),
    case!(concurrent_writers_and_readers, |layer, ctx| {
        let mut tasks = Vec::new();
        for t in 0..8u8 {
            let layer = Arc::clone(&layer);
            tasks.push(tokio::spawn(async move {
                for i in 0..100u8 {
                    layer
                        .set(&format!("own:{t}:{i}"), &vec![t, i], None)
                        .await
                        .expect("set own");
                    if i % 2 == 0 {
                        layer.set(&k("shared"), &vec![t], None).await.expect("set shared");
                    } else if let Some(e) = layer.get(&k("shared")).await.expect("get shared") {
                        assert!(
                            e.value.len() == 1 && e.value[0] < 8,
                            "torn or foreign value {:?}",
                            e.value
                        );
                    }
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        for t in 0..8u8 {
            for i in 0..100u8 {
                assert_eq!(value(&layer, &format!("own:{t}:{i}")).await, Some(vec![t, i]));
            }
        }
    }),
    case!(scan_capability, |layer, ctx| {
        if !layer.capabilities().scan {
            let err = layer
                .scan(b"any")
                .err()
                .expect("scan without the capability must fail");
            assert_eq!(err.kind(), ErrorKind::Unsupported);
            return;
        }
        for i in 0..25 {
            layer
                .set(&format!("scan:{i:02}"), &vec![i], None)
                .await
                .expect("set");
        }
        layer
            .set(&k("scan:gone"), &b"x".to_vec(), Some(SHORT_TTL))
            .await
            .expect("set");
        layer
            .set(&k("scam:other"), &b"x".to_vec(), None)
            .await
            .expect("set");
        layer.set(&k("other"), &b"x".to_vec(), None).await.expect("set");
        tokio::time::sleep(PAST_SHORT_TTL).await;
        let mut stream = layer.scan(b"scan:").expect("scan");
        let mut seen = Vec::new();
        while let Some(item) = next(&mut stream).await {
            let (key, entry) = item.expect("scan item");
            seen.push((key, entry.value));
        }
        seen.sort();
        let expected: Vec<(String, Vec<u8>)> = (0..25).map(|i| (format!("scan:{i:02}"), vec![i])).collect();
        assert_eq!(
            seen, expected,
            "scan must return exactly the live keys under the prefix"
        );
    }),
    case!(transaction_capability, |layer, ctx| {
        let ops = vec![
            WriteOp::Set {
                key: k("tx:a"),
                value: b"a".to_vec(),
                ttl: None,
            },
            WriteOp::Set {
                key: k("tx:b"),
                value: b"b".to_vec(),
                ttl: Some(Duration::from_secs(60)),
            },
            WriteOp::Delete { key: k("tx:c") },
        ];
        if !layer.capabilities().transactions {
            let err = layer
                .apply_atomic(&ops)
                .await
                .expect_err("apply_atomic without the capability must fail");
            assert_eq!(err.kind(), ErrorKind::Unsupported);
            assert_eq!(
                value(&layer, "tx:a").await,
                None,
                "an unsupported batch must leave nothing behind"
            );
            return;
        }
        layer.set(&k("tx:c"), &b"c".to_vec(), None).await.expect("set");
        layer.apply_atomic(&ops).await.expect("apply_atomic");
        assert_eq!(value(&layer, "tx:a").await, Some(b"a".to_vec()));
        assert_eq!(value(&layer, "tx:b").await, Some(b"b".to_vec()));
        assert_eq!(value(&layer, "tx:c").await, None);
    }),
    case!(flush_succeeds, |layer, ctx| {
        layer.set(&k("f"), &b"x".to_vec(), None).await.expect("set");
        layer.flush().await.expect("flush");
        assert_eq!(value(&layer, "f").await, Some(b"x".to_vec()));
    }),
    case!(tag_capability, |layer, ctx| {
        let tags = |t: &[&str]| t.iter().map(|t| (*t).to_owned()).collect::<Vec<String>>();
        if !layer.capabilities().tags {
            let err = layer
                .set_tagged(&k("t:a"), &b"a".to_vec(), None, &tags(&["red"]))
                .await
                .expect_err("set_tagged without the capability must fail");
            assert_eq!(err.kind(), ErrorKind::Unsupported);
            assert_eq!(value(&layer, "t:a").await, None, "nothing stored");
            let err = layer
                .remove_by_tag("red")
                .await
                .expect_err("remove_by_tag without the capability");
            assert_eq!(err.kind(), ErrorKind::Unsupported);
            return;
        }
        layer
            .set_tagged(&k("t:a"), &b"a".to_vec(), None, &tags(&["red", "big"]))
            .await
            .expect("set_tagged");
        layer
            .set_tagged(
                &k("t:b"),
                &b"b".to_vec(),
                Some(Duration::from_secs(60)),
                &tags(&["red"]),
            )
            .await
            .expect("set_tagged");
        layer
            .set_tagged(&k("t:c"), &b"c".to_vec(), None, &tags(&["blue"]))
            .await
            .expect("set_tagged");
        // A later write without the tag: t:d no longer carries it.
        layer
            .set_tagged(&k("t:d"), &b"d".to_vec(), None, &tags(&["red"]))
            .await
            .expect("set_tagged");
        layer.set(&k("t:d"), &b"d2".to_vec(), None).await.expect("set");
        // Retagged: t:e carries only its last write's tags.
        layer
            .set_tagged(&k("t:e"), &b"e".to_vec(), None, &tags(&["red"]))
            .await
            .expect("set_tagged");
        layer
            .set_tagged(&k("t:e"), &b"e2".to_vec(), None, &tags(&["blue"]))
            .await
            .expect("set_tagged");
        // Deleted, then written again without tags.
        layer
            .set_tagged(&k("t:f"), &b"f".to_vec(), None, &tags(&["red"]))
            .await
            .expect("set_tagged");
        layer.delete(&k("t:f")).await.expect("delete");
        layer.set(&k("t:f"), &b"f2".to_vec(), None).await.expect("set");
        let mut removed = layer.remove_by_tag("red").await.expect("remove_by_tag");
        removed.sort();
        assert_eq!(removed, vec![k("t:a"), k("t:b")]);
        assert_eq!(value(&layer, "t:a").await, None);
        assert_eq!(value(&layer, "t:b").await, None);
        assert_eq!(value(&layer, "t:c").await, Some(b"c".to_vec()));
        assert_eq!(
            value(&layer, "t:d").await,
            Some(b"d2".to_vec()),
            "untagged by a plain set"
        );
        assert_eq!(value(&layer, "t:e").await, Some(b"e2".to_vec()), "retagged");
        assert_eq!(
            value(&layer, "t:f").await,
            Some(b"f2".to_vec()),
            "untagged by a delete"
        );
        // The tag is gone, and t:a's other tag no longer names it.
        assert_eq!(
            layer.remove_by_tag("red").await.expect("again"),
            Vec::<String>::new()
        );
        assert_eq!(
            layer.remove_by_tag("big").await.expect("big"),
            Vec::<String>::new()
        );
        assert_eq!(layer.remove_by_tag("blue").await.expect("blue").len(), 2);
        assert_eq!(
            layer.remove_by_tag("never").await.expect("unknown tag"),
            Vec::<String>::new()
        );
    }),
    case!(clear_removes_every_entry, |layer, ctx| {
        for i in 0..300 {
            layer.set(&format!("c:{i}"), &vec![1], None).await.expect("set");
        }
        match layer.clear().await {
            Ok(()) => {
                for i in [0, 150, 299] {
                    assert_eq!(value(&layer, &format!("c:{i}")).await, None, "c:{i}");
                }
            }
            // A layer that can neither clear nor scan says so.
            Err(e) => assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}"),
        }
    }),
];
