//! Read batching ([`ReadBatching`]): concurrent single-key reads of a layer sent as one
//! round trip, on test-kit layers. Most tests run on one thread under tokio's paused
//! clock, where every task spawned before an await runs before the window ends, so that
//! which reads share a batch is certain; the forced interleavings hold a batch at a gate.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use capacitor_core::testkit::{within, GateLayer, GateOp, Gates, Hold, MapLayer};
use capacitor_core::{
    Entry, Error, ErrorKind, FailSafe, Layer, LayerConfig, MultiLayer, MultiLayerBuilder, Operation,
    ReadBatching, Result,
};

const LIMIT: Duration = Duration::from_secs(10);
const WINDOW: Duration = Duration::from_millis(10);

type Cache = MultiLayer<String, u32>;

/// A store that records its reads and fails them as told.
#[derive(Default)]
struct Probe {
    map: MapLayer<String, u32>,
    /// Keys of each `get`, then of each `get_many`.
    gets: Mutex<Vec<String>>,
    batches: Mutex<Vec<Vec<String>>>,
    /// Every read fails with this kind.
    fail: Mutex<Option<ErrorKind>>,
    /// Keys whose stored bytes do not decode.
    bad: Mutex<HashSet<String>>,
    /// `get_many` answers one result too few.
    short: AtomicBool,
    /// Every read takes this long.
    delay: Mutex<Duration>,
}

impl Probe {
    async fn before(&self, op: Operation) -> Result<()> {
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match *self.fail.lock().unwrap() {
            Some(kind) => Err(Error::new(kind, op, "told to fail")),
            None => Ok(()),
        }
    }

    fn is_bad(&self, key: &str) -> bool {
        self.bad.lock().unwrap().contains(key)
    }

    fn batches(&self) -> Vec<Vec<String>> {
        self.batches.lock().unwrap().clone()
    }

    fn gets(&self) -> Vec<String> {
        self.gets.lock().unwrap().clone()
    }
}

#[async_trait]
impl Layer<String, u32> for Probe {
    fn name(&self) -> &str {
        "probe"
    }
    async fn get(&self, key: &String) -> Result<Option<Entry<u32>>> {
        self.gets.lock().unwrap().push(key.clone());
        self.before(Operation::Get).await?;
        if self.is_bad(key) {
            return Err(Error::new(ErrorKind::Decode, Operation::Get, "bad bytes"));
        }
        self.map.get(key).await
    }
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Entry<u32>>>> {
        self.batches.lock().unwrap().push(keys.to_vec());
        self.before(Operation::GetMany).await?;
        if keys.iter().any(|k| self.is_bad(k)) {
            return Err(Error::new(
                ErrorKind::Decode,
                Operation::GetMany,
                "a value did not decode",
            ));
        }
        let mut found = self.map.get_many(keys).await?;
        if self.short.load(Ordering::Relaxed) {
            found.pop();
        }
        Ok(found)
    }
    async fn set(&self, key: &String, value: &u32, ttl: Option<Duration>) -> Result<()> {
        self.map.set(key, value, ttl).await
    }
    async fn delete(&self, key: &String) -> Result<bool> {
        self.map.delete(key).await
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

struct Rig {
    cache: Cache,
    l1: Arc<MapLayer<String, u32>>,
    store: Arc<Probe>,
}

/// L1 (a map) over a probe store whose reads are batched (`WINDOW`, 64 keys unless
/// `tweak_store` says otherwise).
fn rig(
    tweak_store: impl FnOnce(LayerConfig<String, u32>) -> LayerConfig<String, u32>,
    tweak: impl FnOnce(MultiLayerBuilder<String, u32>) -> MultiLayerBuilder<String, u32>,
) -> Rig {
    let l1 = Arc::new(MapLayer::new());
    let store = Arc::new(Probe::default());
    let builder = MultiLayer::builder()
        .layer(LayerConfig::shared(
            "l1",
            l1.clone() as Arc<dyn Layer<String, u32>>,
        ))
        .layer(tweak_store(
            LayerConfig::shared("store", store.clone() as Arc<dyn Layer<String, u32>>)
                .batch_reads(ReadBatching::new(WINDOW)),
        ));
    Rig {
        cache: tweak(builder).build().expect("valid composer"),
        l1,
        store,
    }
}

fn key(i: usize) -> String {
    format!("k{i}")
}

impl Rig {
    /// Stores `key(i) = i` for `i < n` in the store only.
    async fn fill(&self, n: usize) {
        for i in 0..n {
            self.store.map.set(&key(i), &(i as u32), None).await.unwrap();
        }
    }

    /// `get` of each key, all at once, each on a task of its own.
    async fn get_all(&self, keys: &[String]) -> Vec<Result<Option<u32>>> {
        let tasks: Vec<_> = keys
            .iter()
            .map(|k| {
                let (cache, k) = (self.cache.clone(), k.clone());
                tokio::spawn(async move { cache.get(&k).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(within(LIMIT, t).await.unwrap());
        }
        out
    }

    fn store_stats(&self) -> capacitor_core::LayerStats {
        self.cache.stats().layer("store").cloned().unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_gets_of_distinct_keys_make_one_get_many() {
    let r = rig(|s| s, |b| b);
    r.fill(16).await;
    let keys: Vec<String> = (0..16).map(key).collect();
    let got = r.get_all(&keys).await;
    for (i, g) in got.into_iter().enumerate() {
        assert_eq!(g.unwrap(), Some(i as u32), "key {i}");
    }
    assert_eq!(r.store.batches(), vec![keys.clone()]);
    assert!(
        r.store.gets().is_empty(),
        "no read went alone: {:?}",
        r.store.gets()
    );
    let stats = r.store_stats();
    assert_eq!((stats.batched_reads, stats.read_batches, stats.hits), (16, 1, 16));
    // Promoted, as an unbatched read is.
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(r.l1.raw_entry(k).map(|e| e.value), Some(i as u32));
    }
    let text = r.cache.stats().to_string();
    assert!(
        text.contains("read batching on store: 16 reads in 1 round trips (16.0 per batch)"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lone_read_waits_the_window_and_goes_as_one_get() {
    let r = rig(|s| s, |b| b);
    r.fill(1).await;
    let started = tokio::time::Instant::now();
    assert_eq!(r.cache.get(&key(0)).await.unwrap(), Some(0));
    assert!(
        started.elapsed() >= WINDOW,
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(r.store.gets(), vec![key(0)]);
    assert!(r.store.batches().is_empty());
    assert_eq!(r.store_stats().read_batches, 1);
    // An L1 hit does not wait.
    let started = tokio::time::Instant::now();
    assert_eq!(r.cache.get(&key(0)).await.unwrap(), Some(0));
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(r.store.gets().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn max_keys_splits_batches() {
    let r = rig(|s| s.batch_reads(ReadBatching::new(WINDOW).max_keys(4)), |b| b);
    r.fill(10).await;
    let keys: Vec<String> = (0..10).map(key).collect();
    let started = tokio::time::Instant::now();
    let got = r.get_all(&keys[..8]).await;
    // Two full batches, sent without waiting for the window.
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, g)| g.as_ref().unwrap() == &Some(i as u32)));
    let got = r.get_all(&keys[8..]).await;
    assert_eq!(
        got.into_iter().map(|g| g.unwrap()).collect::<Vec<_>>(),
        vec![Some(8), Some(9)]
    );
    assert_eq!(
        r.store.batches(),
        vec![keys[0..4].to_vec(), keys[4..8].to_vec(), keys[8..10].to_vec()]
    );
    let stats = r.store_stats();
    assert_eq!((stats.batched_reads, stats.read_batches), (10, 3));
}

#[tokio::test(start_paused = true)]
async fn a_key_read_twice_in_a_batch_is_asked_once() {
    let r = rig(|s| s.batch_reads(ReadBatching::new(WINDOW).max_keys(2)), |b| b);
    r.fill(3).await;
    // Repeats do not count towards max_keys: k0, k0, k0, k1 share one batch.
    let got = r.get_all(&[key(0), key(0), key(0), key(1), key(2)]).await;
    let got: Vec<Option<u32>> = got.into_iter().map(|g| g.unwrap()).collect();
    assert_eq!(got, vec![Some(0), Some(0), Some(0), Some(1), Some(2)]);
    assert_eq!(r.store.batches(), vec![vec![key(0), key(1)]]);
    assert_eq!(r.store.gets(), vec![key(2)]);
    // One key read by many: one `get`.
    r.l1.delete(&key(0)).await.unwrap();
    r.get_all(&[key(0), key(0), key(0)]).await;
    assert_eq!(r.store.gets(), vec![key(2), key(0)]);
    assert_eq!(r.store_stats().read_batches, 3);
}

#[tokio::test(start_paused = true)]
async fn get_or_load_misses_are_batched_and_loaded() {
    let r = rig(|s| s, |b| b);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let cache = r.cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_load(&key(i), move || async move { 100 + i as u32 })
                    .await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), 100 + i as u32);
    }
    // The read before the flights, then each leader's read before its loader: two
    // batches of the eight keys.
    let batches = r.store.batches();
    assert_eq!(
        batches.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![8, 8],
        "{batches:?}"
    );
    assert!(r.store.gets().is_empty());
    assert_eq!(r.store.map.raw_entry(&key(3)).map(|e| e.value), Some(103));
}

#[tokio::test(start_paused = true)]
async fn a_failing_batch_fails_every_read_with_its_kind() {
    let r = rig(|s| s, |b| b);
    r.fill(4).await;
    *r.store.fail.lock().unwrap() = Some(ErrorKind::Unavailable);
    let got = r.get_all(&[key(0), key(1), key(1), key(3)]).await;
    for g in got {
        let e = g.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert_eq!(e.layer(), Some("store"));
        assert_eq!(e.operation(), Operation::Get);
        assert_eq!(e.to_string(), "unavailable in get on layer `store`: told to fail");
    }
    let stats = r.store_stats();
    assert_eq!((stats.read_batches, stats.batched_reads, stats.errors), (1, 4, 4));
}

#[tokio::test(start_paused = true)]
async fn a_failing_batch_is_answered_by_the_fail_safe_copies() {
    let r = rig(|s| s, |b| b.fail_safe(FailSafe::new(Duration::from_secs(600))));
    for i in 0..3 {
        r.cache.set(key(i), i as u32).await.unwrap();
    }
    for i in 0..3 {
        r.l1.delete(&key(i)).await.unwrap();
    }
    *r.store.fail.lock().unwrap() = Some(ErrorKind::Timeout);
    let got = r.get_all(&[key(0), key(1), key(2), key(7)]).await;
    assert_eq!(got[0].as_ref().unwrap(), &Some(0));
    assert_eq!(got[1].as_ref().unwrap(), &Some(1));
    assert_eq!(got[2].as_ref().unwrap(), &Some(2));
    // No copy of k7: the batch's error.
    assert_eq!(got[3].as_ref().unwrap_err().kind(), ErrorKind::Timeout);
    assert_eq!(r.store.batches().len(), 1);
    assert_eq!(r.cache.stats().fail_safe.unwrap().stale_hits, 3);
}

#[tokio::test(start_paused = true)]
async fn a_value_that_does_not_decode_costs_only_its_key() {
    let r = rig(|s| s, |b| b);
    r.fill(5).await;
    r.store.bad.lock().unwrap().insert(key(2));
    let keys: Vec<String> = (0..5).map(key).collect();
    let got = r.get_all(&keys).await;
    let got: Vec<Option<u32>> = got.into_iter().map(|g| g.unwrap()).collect();
    assert_eq!(got, vec![Some(0), Some(1), None, Some(3), Some(4)]);
    // One batch, then each key alone.
    assert_eq!(r.store.batches(), vec![keys.clone()]);
    assert_eq!(r.store.gets(), keys);
    let stats = r.store_stats();
    // The batch's failure, then k2's own.
    assert_eq!((stats.decode_errors, stats.errors, stats.read_batches), (2, 0, 1));
    assert_eq!((stats.hits, stats.misses), (4, 1));
}

#[tokio::test(start_paused = true)]
async fn a_batch_past_the_read_timeout_times_out_for_every_read() {
    let r = rig(|s| s.read_timeout(Duration::from_millis(50)), |b| b);
    r.fill(3).await;
    *r.store.delay.lock().unwrap() = Duration::from_secs(5);
    let started = tokio::time::Instant::now();
    let got = r.get_all(&[key(0), key(1), key(2)]).await;
    // The window, then the timeout.
    let took = started.elapsed();
    assert!(
        took >= WINDOW + Duration::from_millis(50) && took < Duration::from_millis(100),
        "{took:?}"
    );
    for g in got {
        assert_eq!(g.unwrap_err().kind(), ErrorKind::Timeout);
    }
    let stats = r.store_stats();
    // One operation timed out; three reads failed.
    assert_eq!((stats.timeouts, stats.errors, stats.read_batches), (1, 3, 1));
}

#[tokio::test(start_paused = true)]
async fn a_layer_answering_too_few_results_fails_the_batch() {
    let r = rig(|s| s, |b| b);
    r.fill(3).await;
    r.store.short.store(true, Ordering::Relaxed);
    for g in r.get_all(&[key(0), key(1), key(2)]).await {
        let e = g.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(e.message().contains("2 results for 3 keys"), "{e}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_read_does_not_disturb_the_others() {
    let r = rig(|s| s, |b| b);
    r.fill(4).await;
    // The read that opens the batch gives up before it is sent; one more gives up while
    // it is in flight.
    *r.store.delay.lock().unwrap() = Duration::from_millis(20);
    let opener = {
        let cache = r.cache.clone();
        tokio::spawn(async move { tokio::time::timeout(WINDOW / 2, cache.get(&key(0))).await })
    };
    let in_flight = {
        let cache = r.cache.clone();
        tokio::spawn(async move { tokio::time::timeout(WINDOW * 2, cache.get(&key(1))).await })
    };
    let rest = r.get_all(&[key(2), key(3)]).await;
    assert!(opener.await.unwrap().is_err(), "the opener was cancelled");
    assert!(
        in_flight.await.unwrap().is_err(),
        "the in-flight read was cancelled"
    );
    assert_eq!(
        rest.into_iter().map(|g| g.unwrap()).collect::<Vec<_>>(),
        vec![Some(2), Some(3)]
    );
    assert_eq!(r.store.batches(), vec![vec![key(0), key(1), key(2), key(3)]]);
    // Two reads were answered; the store was read once.
    let stats = r.store_stats();
    assert_eq!((stats.batched_reads, stats.read_batches), (2, 1));
    // The cancelled readers' keys are read afresh.
    assert_eq!(r.cache.get(&key(0)).await.unwrap(), Some(0));
}

#[test]
fn without_a_runtime_reads_go_one_by_one() {
    let r = rig(|s| s, |b| b);
    futures::executor::block_on(async {
        r.store.map.set(&key(0), &0, None).await.unwrap();
        assert_eq!(r.cache.get(&key(0)).await.unwrap(), Some(0));
        assert_eq!(r.cache.get(&key(1)).await.unwrap(), None);
    });
    assert_eq!(r.store.gets(), vec![key(0), key(1)]);
    assert_eq!(r.store_stats().read_batches, 0);
}

#[test]
fn bad_batching_options_are_config_errors() {
    let build = |batching: ReadBatching, in_process: bool| {
        let store: LayerConfig<String, u32> = if in_process {
            LayerConfig::new("store", capacitor::memory::DashMapLayer::new())
        } else {
            LayerConfig::new("store", MapLayer::new())
        };
        MultiLayer::builder()
            .layer(LayerConfig::new("l1", MapLayer::new()))
            .layer(store.batch_reads(batching))
            .build()
            .map(|_| ())
    };
    let ok = ReadBatching::new(Duration::from_micros(200));
    assert!(build(ok, false).is_ok());
    for (batching, in_process, field) in [
        (
            ReadBatching::new(Duration::ZERO),
            false,
            "`layers[1].batch_reads.window`",
        ),
        (ok.max_keys(0), false, "`layers[1].batch_reads.max_keys`"),
        (ok, true, "`layers[1].batch_reads`"),
    ] {
        let e = build(batching, in_process).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(e.to_string().contains(field), "{e}");
    }
}

/// L1 (a map) over a gated store with batched reads.
struct Gated {
    cache: Cache,
    l1: Arc<MapLayer<String, u32>>,
    store: Arc<MapLayer<String, u32>>,
    gates: Arc<Gates>,
}

fn gated(batching: ReadBatching) -> Gated {
    let l1 = Arc::new(MapLayer::new());
    let store = Arc::new(MapLayer::new());
    let gated = GateLayer::shared(store.clone() as Arc<dyn Layer<String, u32>>);
    let gates = gated.gates();
    let cache = MultiLayer::builder()
        .layer(LayerConfig::shared(
            "l1",
            l1.clone() as Arc<dyn Layer<String, u32>>,
        ))
        .layer(LayerConfig::new("store", gated).batch_reads(batching))
        .build()
        .expect("valid composer");
    Gated {
        cache,
        l1,
        store,
        gates,
    }
}

fn assert_coherent(l1: &MapLayer<String, u32>, store: &MapLayer<String, u32>, key: &str) {
    let key = key.to_string();
    let below = store.raw_entry(&key).map(|e| e.value);
    if let Some(copy) = l1.raw_entry(&key).map(|e| e.value) {
        assert_eq!(
            Some(copy),
            below,
            "L1 holds {copy} for {key}, the store {below:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_acknowledged_while_a_batched_read_is_held_is_not_undone() {
    let Gated {
        cache,
        l1,
        store,
        gates,
    } = gated(ReadBatching::new(Duration::from_millis(1)));
    store.set(&key(0), &1, None).await.unwrap();
    // The batch has read 1 and is held before it answers.
    let held = gates.hold(GateOp::Get, Hold::After);
    let reader = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(&key(0)).await }
    });
    held.reached().await;
    within(LIMIT, cache.set(key(0), 2)).await.unwrap();
    held.release();
    // Concurrent with the set: either value is a fair answer.
    let seen = within(LIMIT, reader).await.unwrap().unwrap();
    assert!(matches!(seen, Some(1 | 2)), "{seen:?}");
    // Not promoted over the acknowledged write.
    assert_coherent(&l1, &store, "k0");
    assert_eq!(cache.get(&key(0)).await.unwrap(), Some(2));
    l1.delete(&key(0)).await.unwrap();
    assert_eq!(cache.get(&key(0)).await.unwrap(), Some(2));
    let l1_stats = cache.stats().layer("l1").cloned().unwrap();
    assert_eq!(l1_stats.promotions_skipped, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_begins_after_a_write_does_not_join_a_batch_in_flight() {
    // Two keys fill a batch; the window is long enough that both reads are in it.
    let Gated {
        cache,
        l1,
        store,
        gates,
    } = gated(ReadBatching::new(Duration::from_millis(200)).max_keys(2));
    store.set(&key(0), &1, None).await.unwrap();
    store.set(&key(1), &10, None).await.unwrap();
    // A batch of k0 and k1 has read the store and is held; then k0 is deleted.
    let held = gates.hold(GateOp::GetMany, Hold::After);
    let first = [key(0), key(1)].map(|k| {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get(&k).await })
    });
    held.reached().await;
    assert!(within(LIMIT, cache.delete(&key(0))).await.unwrap());
    // A read of k0 that begins now must read the store itself: it reaches a gate of its own
    // (one that joined the held batch would not, and would answer 1).
    let own = gates.hold(GateOp::Get, Hold::Before);
    let later = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(&key(0)).await }
    });
    own.reached().await;
    own.release();
    assert_eq!(within(LIMIT, later).await.unwrap().unwrap(), None);
    held.release();
    let [a, b] = first;
    let a = within(LIMIT, a).await.unwrap().unwrap();
    assert!(matches!(a, Some(1) | None), "{a:?}");
    assert_eq!(within(LIMIT, b).await.unwrap().unwrap(), Some(10));
    assert_coherent(&l1, &store, "k0");
    assert_eq!(cache.get(&key(0)).await.unwrap(), None);
    assert_eq!(cache.get(&key(1)).await.unwrap(), Some(10));
}

/// Counts the round trips of 64 concurrent cold reads on two worker threads, real time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_cold_reads_on_two_threads_share_few_round_trips() {
    let r = rig(
        |s| s.batch_reads(ReadBatching::new(Duration::from_millis(2))),
        |b| b,
    );
    r.fill(64).await;
    let keys: Vec<String> = (0..64).map(key).collect();
    let got = r.get_all(&keys).await;
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, g)| g.as_ref().unwrap() == &Some(i as u32)));
    let stats = r.store_stats();
    assert_eq!(stats.batched_reads, 64);
    assert!(stats.read_batches < 16, "{} round trips", stats.read_batches);
    let asked: usize = r.store.batches().iter().map(Vec::len).sum::<usize>() + r.store.gets().len();
    assert_eq!(asked, 64);
}

/// tokio's timer ticks in milliseconds: a 200 µs window timed by it would make a lone read
/// wait 1 to 2 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_window_is_not_rounded_up_to_the_timers_millisecond() {
    let r = rig(
        |s| s.batch_reads(ReadBatching::new(Duration::from_micros(200))),
        |b| b.promotion(false),
    );
    r.fill(1).await;
    let mut took: Vec<Duration> = Vec::new();
    for _ in 0..51 {
        let started = std::time::Instant::now();
        assert_eq!(r.cache.get(&key(0)).await.unwrap(), Some(0));
        took.push(started.elapsed());
    }
    took.sort();
    let median = took[took.len() / 2];
    assert!(median >= Duration::from_micros(200), "{median:?}");
    assert!(
        median < Duration::from_micros(900),
        "a lone read took {median:?} (median)"
    );
}

#[test]
fn on_a_runtime_without_its_time_driver_a_long_window_falls_back_to_reading_alone() {
    // A 10 ms window is timed by tokio's timer, which this runtime does not have: the
    // timer task fails, and the read must not wait for a batch nothing would send.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let r = rig(|s| s, |b| b);
    rt.block_on(async {
        r.fill(1).await;
        assert_eq!(r.cache.get(&key(0)).await.unwrap(), Some(0));
    });
    assert_eq!(r.store.gets(), vec![key(0)]);
    assert_eq!(r.store_stats().read_batches, 0);
    // A short window needs no timer: batched.
    let r = rig(
        |s| s.batch_reads(ReadBatching::new(Duration::from_micros(200))),
        |b| b,
    );
    rt.block_on(async {
        r.fill(1).await;
        assert_eq!(r.cache.get(&key(0)).await.unwrap(), Some(0));
    });
    assert_eq!(r.store_stats().read_batches, 1);
}
