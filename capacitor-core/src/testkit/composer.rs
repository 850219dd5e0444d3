//! The composer's behaviours over a real bottom layer: write-back, transactions, scan,
//! warm-up and loaders. Run by every persistent backend with `composer_tests!`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;

use super::{Case, CaseFuture, MapLayer, TestContext, TestLayer};
use crate::error::ErrorKind;
use crate::{LayerConfig, MultiLayer, WarmUp, WriteBack, WritePolicy};

fn over(bottom: &TestLayer, policy: WritePolicy) -> MultiLayer<String, Vec<u8>> {
    MultiLayer::builder()
        .write_policy(policy)
        .layer(LayerConfig::new("l1", MapLayer::new()))
        .layer(LayerConfig::shared("bottom", Arc::clone(bottom)))
        .build()
        .expect("composer")
}

async fn count<S: Stream + Unpin>(mut stream: S) -> usize {
    let mut n = 0;
    while poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await.is_some() {
        n += 1;
    }
    n
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

/// Every composer case, in the order the `composer_tests!` macro lists them.
pub static COMPOSER_CASES: &[Case] = &[
    case!(
        write_back_drains_to_the_bottom_and_scan_merges_pending_writes,
        |bottom, ctx| {
            let cache = over(
                &bottom,
                WritePolicy::Back(
                    WriteBack::new()
                        .batch_size(500)
                        .max_delay(Duration::from_millis(20)),
                ),
            );
            for i in 0..2_000u32 {
                cache
                    .set(format!("k:{i:05}"), i.to_be_bytes().to_vec())
                    .await
                    .expect("set");
            }
            cache.delete(&"k:00003".to_string()).await.expect("delete");
            if bottom.capabilities().scan {
                let merged = count(cache.scan(b"k:").expect("scan")).await;
                assert_eq!(merged, 1_999, "pending writes merged, the pending delete hidden");
            }
            tokio::time::timeout(Duration::from_secs(30), cache.flush())
                .await
                .expect("bounded")
                .expect("flush");
            assert_eq!(
                bottom
                    .get(&"k:01999".to_string())
                    .await
                    .expect("get")
                    .map(|e| e.value),
                Some(1_999u32.to_be_bytes().to_vec())
            );
            assert_eq!(bottom.get(&"k:00003".to_string()).await.expect("get"), None);
            if bottom.capabilities().scan {
                assert_eq!(
                    count(bottom.scan(b"k:").expect("scan")).await,
                    1_999,
                    "all drained"
                );
            }
            assert_eq!(cache.stats().write_back.map(|w| w.queue_depth), Some(0));
            assert!(cache.unwritten_keys().is_empty());
        }
    ),
    case!(
        transactions_commit_atomically_and_invalidate_the_caches,
        |bottom, ctx| {
            let cache = over(&bottom, WritePolicy::Through);
            if !bottom.capabilities().transactions {
                assert_eq!(
                    cache.begin().err().map(|e| e.kind()),
                    Some(ErrorKind::Unsupported)
                );
                return;
            }
            cache.set("alice".into(), b"100".to_vec()).await.expect("set");
            assert_eq!(
                cache.get(&"alice".into()).await.expect("get"),
                Some(b"100".to_vec())
            );
            let mut tx = cache.begin().expect("begin");
            tx.set("alice".into(), b"70".to_vec());
            tx.set("bob".into(), b"30".to_vec());
            tx.delete("carol".into());
            assert_eq!(
                tx.get(&"alice".into()).await.expect("own write"),
                Some(b"70".to_vec())
            );
            tx.commit().await.expect("commit");
            assert_eq!(
                cache.get(&"alice".into()).await.expect("get"),
                Some(b"70".to_vec()),
                "no stale cached copy"
            );
            assert_eq!(
                bottom.get(&"bob".into()).await.expect("get").map(|e| e.value),
                Some(b"30".to_vec())
            );
            let mut tx = cache.begin().expect("begin");
            tx.set("dave".into(), b"1".to_vec());
            tx.rollback();
            assert_eq!(
                bottom.get(&"dave".into()).await.expect("get"),
                None,
                "rollback leaves nothing"
            );
        }
    ),
    case!(
        warm_up_copies_from_the_bottom_and_loaders_run_once,
        |bottom, ctx| {
            let entries: Vec<(String, Vec<u8>)> = (0..1_500u32)
                .map(|i| (format!("user:{i:04}"), i.to_be_bytes().to_vec()))
                .collect();
            bottom
                .set_many(&entries, Some(Duration::from_secs(600)))
                .await
                .expect("set_many");
            let cache = over(&bottom, WritePolicy::Through);
            if bottom.capabilities().scan {
                let report = cache
                    .warm_up("bottom", WarmUp::new().prefix("user:").limit(1_000))
                    .await
                    .expect("warm_up");
                assert_eq!(report.copied, 1_000);
                // Which 1,000 depends on the layer's scan order; exactly 1,000 must be L1 hits.
                let before = cache
                    .stats()
                    .layer("l1")
                    .map(|l| (l.hits, l.misses))
                    .unwrap_or_default();
                for (key, _) in &entries {
                    cache.get(key).await.expect("get");
                }
                let after = cache
                    .stats()
                    .layer("l1")
                    .map(|l| (l.hits, l.misses))
                    .unwrap_or_default();
                assert_eq!(
                    (after.0 - before.0, after.1 - before.1),
                    (1_000, 500),
                    "warmed keys are L1 hits"
                );
            }
            let calls = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..100)
                .map(|_| {
                    let (cache, calls) = (cache.clone(), calls.clone());
                    tokio::spawn(async move {
                        cache
                            .get_or_load(&"cold".to_string(), || async move {
                                calls.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                b"from the source".to_vec()
                            })
                            .await
                    })
                })
                .collect();
            for t in tasks {
                assert_eq!(t.await.expect("join").expect("load"), b"from the source");
            }
            assert_eq!(calls.load(Ordering::SeqCst), 1, "single flight");
            assert_eq!(
                bottom.get(&"cold".into()).await.expect("get").map(|e| e.value),
                Some(b"from the source".to_vec())
            );
        }
    ),
];
