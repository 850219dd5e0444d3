//! Write-back (`WritePolicy::Back`) on test-kit layers: buffering, coalescing,
//! read-your-writes, backpressure, retries, flush and close.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::Arc;
use std::time::Duration;

use capacitor_core::testkit::{within, Faults, FaultyLayer, MapLayer};
use capacitor_core::{
    ErrorKind, Layer, LayerConfig, ManualClock, MultiLayer, SetOptions, WriteBack, WritePolicy,
};

type Map = Arc<MapLayer<String, u64>>;

struct Stack {
    cache: MultiLayer<String, u64>,
    l1: Map,
    l2: Map,
    l2_faults: Arc<Faults>,
    clock: ManualClock,
}

fn stack(config: WriteBack) -> Stack {
    let clock = ManualClock::new(1_000_000);
    let l1: Map = Arc::new(MapLayer::with_clock(clock.clone()));
    let l2: Map = Arc::new(MapLayer::with_clock(clock.clone()));
    let faulty = FaultyLayer::shared(l2.clone());
    let l2_faults = faulty.faults();
    let cache = MultiLayer::builder()
        .clock(clock.clone())
        .write_policy(WritePolicy::Back(config))
        .layer(LayerConfig::shared("l1", l1.clone()))
        .layer(LayerConfig::new("l2", faulty))
        .build()
        .expect("config");
    Stack {
        cache,
        l1,
        l2,
        l2_faults,
        clock,
    }
}

fn k(i: u64) -> String {
    format!("k{i}")
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn set_returns_before_the_lower_layer_is_written_and_flush_writes_it() {
    let s = stack(
        WriteBack::new()
            .max_delay(Duration::from_secs(3600))
            .batch_size(1_000),
    );
    for i in 0..100 {
        s.cache.set(k(i), i).await.unwrap();
    }
    assert_eq!(
        s.l2.raw_len(),
        0,
        "nothing written below L1 before the batch is due"
    );
    assert_eq!(s.l1.raw_entry(&k(7)).map(|e| e.value), Some(7));
    assert_eq!(s.cache.stats().write_back.map(|w| w.queue_depth), Some(100));
    within(WAIT, s.cache.flush()).await.unwrap();
    for i in 0..100 {
        assert_eq!(s.l2.raw_entry(&k(i)).map(|e| e.value), Some(i));
    }
    assert_eq!(
        s.cache.stats().write_back.map(|w| (w.queue_depth, w.written)),
        Some((0, 100))
    );
}

#[tokio::test]
async fn repeated_writes_coalesce_and_the_last_one_wins() {
    let s = stack(WriteBack::new().max_delay(Duration::from_secs(3600)));
    for v in 0..1_000 {
        s.cache.set(k(1), v).await.unwrap();
    }
    s.cache.delete(&k(2)).await.unwrap();
    s.cache.set(k(2), 5).await.unwrap();
    within(WAIT, s.cache.flush()).await.unwrap();
    assert_eq!(s.l2.raw_entry(&k(1)).map(|e| e.value), Some(999));
    assert_eq!(s.l2.raw_entry(&k(2)).map(|e| e.value), Some(5));
    let w = s.cache.stats().write_back.unwrap();
    assert_eq!(
        w.written, 2,
        "1,001 writes of two keys reach L2 as two writes: {w:?}"
    );
    assert!(w.coalesced >= 999);
}

#[tokio::test]
async fn deletes_are_tombstones_that_hide_the_key_before_and_after_draining() {
    let s = stack(WriteBack::new().max_delay(Duration::from_secs(3600)));
    s.l2.set(&k(1), &1, None).await.unwrap();
    assert!(s.cache.delete(&k(1)).await.is_ok());
    assert_eq!(
        s.cache.get(&k(1)).await.unwrap(),
        None,
        "pending delete hides the L2 value"
    );
    assert!(!s.cache.exists(&k(1)).await.unwrap());
    within(WAIT, s.cache.flush()).await.unwrap();
    assert!(s.l2.raw_entry(&k(1)).is_none());
}

#[tokio::test]
async fn reads_see_pending_writes_after_l1_lost_them() {
    let s = stack(WriteBack::new().max_delay(Duration::from_secs(3600)));
    s.l2.set(&k(1), &1, None).await.unwrap();
    s.cache.set(k(1), 2).await.unwrap();
    s.l1.delete(&k(1)).await.unwrap(); // as an eviction would
    assert_eq!(
        s.cache.get(&k(1)).await.unwrap(),
        Some(2),
        "pending write, not the older L2 value"
    );
    assert_eq!(
        s.cache.get_many(&[k(1), k(9)]).await.unwrap(),
        vec![Some(2), None]
    );
    assert!(s.stats_buffer_hits() >= 2);
}

impl Stack {
    fn stats_buffer_hits(&self) -> u64 {
        self.cache.stats().write_back.map_or(0, |w| w.buffer_hits)
    }
}

#[tokio::test]
async fn a_failing_lower_layer_is_retried_in_order_and_nothing_is_dropped() {
    let s = stack(
        WriteBack::new()
            .max_delay(Duration::from_millis(5))
            .batch_size(16)
            .retry_backoff(Duration::from_millis(5), Duration::from_millis(20)),
    );
    s.l2_faults.fail_writes(true);
    for round in 0..3u64 {
        for i in 0..50 {
            s.cache.set(k(i), round * 100 + i).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let w = s.cache.stats().write_back.unwrap();
    assert!(w.retries > 0, "{w:?}");
    assert_eq!(w.queue_depth, 50);
    assert!(
        w.oldest_pending
            .is_some_and(|age| age >= Duration::from_millis(50)),
        "{w:?}"
    );
    assert_eq!(s.l2.raw_len(), 0);
    s.l2_faults.fail_writes(false);
    within(WAIT, s.cache.flush()).await.unwrap();
    for i in 0..50 {
        assert_eq!(
            s.l2.raw_entry(&k(i)).map(|e| e.value),
            Some(200 + i),
            "last write of k{i} wins"
        );
    }
}

#[tokio::test]
async fn a_full_queue_pushes_back_then_fails_typed() {
    let s = stack(
        WriteBack::new()
            .queue_bound(10)
            .enqueue_timeout(Duration::from_millis(100))
            .max_delay(Duration::from_millis(1))
            .retry_backoff(Duration::from_millis(5), Duration::from_millis(5)),
    );
    s.l2_faults.fail_writes(true);
    for i in 0..10 {
        s.cache.set(k(i), i).await.unwrap();
    }
    // Rewriting a queued key takes no room.
    s.cache.set(k(3), 33).await.unwrap();
    let started = std::time::Instant::now();
    let err = s.cache.set(k(10), 10).await.expect_err("queue full");
    assert_eq!(err.kind(), ErrorKind::QueueFull);
    assert!(
        started.elapsed() >= Duration::from_millis(90),
        "the writer waited for room first"
    );
    s.l2_faults.fail_writes(false);
    within(WAIT, s.cache.flush()).await.unwrap();
    assert_eq!(s.l2.raw_entry(&k(3)).map(|e| e.value), Some(33));
    assert!(
        s.l2.raw_entry(&k(10)).is_none(),
        "the refused write was not queued"
    );

    // Room appears as soon as the lower layer accepts writes again: a waiting writer gets
    // in. Its enqueue timeout is long, so that however late the drain runs on a loaded
    // machine, the writer is still waiting when room appears.
    let s = stack(
        WriteBack::new()
            .queue_bound(10)
            .enqueue_timeout(Duration::from_secs(10))
            .max_delay(Duration::from_millis(1))
            .retry_backoff(Duration::from_millis(5), Duration::from_millis(5)),
    );
    s.l2_faults.fail_writes(true);
    for i in 0..10 {
        s.cache.set(k(i), i).await.unwrap();
    }
    let writer = s.cache.set(k(11), 11);
    tokio::pin!(writer);
    // Polled once (the test's runtime has one thread: the drain task runs only when this
    // test awaits): the queue is full, so the writer waits.
    assert!(
        futures::poll!(writer.as_mut()).is_pending(),
        "a writer waits while the queue is full"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        futures::poll!(writer.as_mut()).is_pending(),
        "the writer still waits while the lower layer refuses writes"
    );
    s.l2_faults.fail_writes(false);
    within(WAIT, writer)
        .await
        .expect("a waiting writer gets in once the queue drains");
    within(WAIT, s.cache.flush()).await.unwrap();
    assert_eq!(s.l2.raw_entry(&k(11)).map(|e| e.value), Some(11));
}

#[tokio::test]
async fn close_reports_exactly_the_writes_that_could_not_be_written() {
    let s = stack(
        WriteBack::new()
            .max_delay(Duration::from_millis(1))
            .flush_timeout(Duration::from_secs(2))
            .retry_backoff(Duration::from_millis(5), Duration::from_millis(10)),
    );
    s.cache.set(k(1), 1).await.unwrap();
    within(WAIT, s.cache.flush()).await.unwrap();
    s.l2_faults.fail_writes(true);
    s.cache.set(k(2), 2).await.unwrap();
    s.cache.set(k(3), 3).await.unwrap();
    let err = within(WAIT, s.cache.close())
        .await
        .expect_err("unwritable writes are reported");
    assert!(err.to_string().contains("2 pending writes"), "{err}");
    let mut unwritten = s.cache.unwritten_keys();
    unwritten.sort();
    assert_eq!(unwritten, vec![k(2), k(3)]);
    assert_eq!(
        s.cache.set(k(4), 4).await.map_err(|e| e.kind()).err(),
        Some(ErrorKind::Closed)
    );
}

#[tokio::test]
async fn an_entry_that_expires_while_pending_removes_the_older_value_below() {
    let s = stack(WriteBack::new().max_delay(Duration::from_secs(3600)));
    s.l2.set(&k(1), &1, None).await.unwrap();
    s.cache
        .set_with(k(1), 2, SetOptions::new().ttl(Duration::from_secs(5)))
        .await
        .unwrap();
    s.clock.advance(Duration::from_secs(6));
    assert_eq!(s.cache.get(&k(1)).await.unwrap(), None);
    within(WAIT, s.cache.flush()).await.unwrap();
    assert!(
        s.l2.raw_entry(&k(1)).is_none(),
        "the expired write must not resurrect the older value"
    );
    assert_eq!(s.cache.get(&k(1)).await.unwrap(), None);
}

#[tokio::test]
async fn dropping_every_handle_still_drains_the_queue() {
    let s = stack(WriteBack::new().max_delay(Duration::from_millis(20)));
    for i in 0..10 {
        s.cache.set(k(i), i).await.unwrap();
    }
    let l2 = s.l2.clone();
    drop(s);
    within(WAIT, async {
        while l2.raw_len() < 10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[test]
fn build_rejects_write_back_without_a_layer_below_or_outside_a_runtime() {
    let one = MultiLayer::<String, u64>::builder()
        .write_policy(WritePolicy::Back(WriteBack::new()))
        .layer(LayerConfig::new("only", MapLayer::new()))
        .build()
        .expect_err("nothing below L1");
    assert!(one.to_string().contains("write_policy"), "{one}");
    let no_rt = MultiLayer::<String, u64>::builder()
        .write_policy(WritePolicy::Back(WriteBack::new()))
        .layer(LayerConfig::new("l1", MapLayer::new()))
        .layer(LayerConfig::new("l2", MapLayer::new()))
        .build()
        .expect_err("no runtime");
    assert_eq!(no_rt.kind(), ErrorKind::Config);
    let zero = MultiLayer::<String, u64>::builder()
        .write_policy(WritePolicy::Back(WriteBack::new().batch_size(0)))
        .layer(LayerConfig::new("l1", MapLayer::new()))
        .layer(LayerConfig::new("l2", MapLayer::new()))
        .build()
        .expect_err("zero batch");
    assert!(zero.to_string().contains("batch_size"), "{zero}");
}
