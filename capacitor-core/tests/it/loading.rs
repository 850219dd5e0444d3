//! Loads from slow and failing origins: soft and hard timeouts on tokio's paused clock,
//! flights that outlive their callers, fail-safe answers and their throttle, eager
//! refresh through the loader, adaptive TTLs, per-call options, batches, events.
//!
//! Entry expiry runs on a `ManualClock` (moved by hand); timeouts on tokio's paused clock
//! (it jumps to the next timer when every task waits).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capacitor_core::testkit::{within, MapLayer};
use capacitor_core::{
    Clock, ErrorKind, FailSafe, Layer, LayerConfig, LoadEvent, LoadOptions, Loaded, ManualClock, MultiLayer,
    MultiLayerBuilder, SetOptions,
};
use tokio::sync::Notify;
use tokio::time::Instant;

type Cache = MultiLayer<String, String>;

struct Rig {
    cache: Cache,
    clock: ManualClock,
    l1: Arc<MapLayer<String, String>>,
    l2: Arc<MapLayer<String, String>>,
}

const L1_TTL: Duration = Duration::from_secs(10);

fn rig_with(f: impl FnOnce(MultiLayerBuilder<String, String>) -> MultiLayerBuilder<String, String>) -> Rig {
    let clock = ManualClock::new(1_000_000);
    let l1 = Arc::new(MapLayer::with_clock(clock.clone()));
    let l2 = Arc::new(MapLayer::with_clock(clock.clone()));
    let builder = MultiLayer::builder()
        .clock(clock.clone())
        .layer(LayerConfig::shared("l1", l1.clone()).ttl(L1_TTL))
        .layer(LayerConfig::shared("l2", l2.clone()))
        .fail_safe(FailSafe::new(Duration::from_secs(60)).throttle(Duration::from_secs(5)));
    Rig {
        cache: f(builder).build().unwrap(),
        clock,
        l1,
        l2,
    }
}

fn rig() -> Rig {
    rig_with(|b| b)
}

fn k(s: &str) -> String {
    s.to_string()
}

/// Writes `v` with a 1 s TTL and lets it expire everywhere: the fail-safe copy remains.
async fn expired_copy(rig: &Rig, key: &str, v: &str) {
    rig.cache
        .set_with(k(key), k(v), SetOptions::new().ttl(Duration::from_secs(1)))
        .await
        .unwrap();
    rig.clock.advance(Duration::from_secs(2));
    assert_eq!(
        rig.cache.get(&k(key)).await.unwrap(),
        None,
        "expired in every layer"
    );
}

/// A loader that takes `d` (on tokio's clock) and counts its calls.
fn slow(
    calls: &Arc<AtomicUsize>,
    d: Duration,
    v: &str,
) -> impl FnOnce() -> futures::future::BoxFuture<'static, String> {
    let (calls, v) = (calls.clone(), v.to_string());
    move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(d).await;
            v
        })
    }
}

#[tokio::test(start_paused = true)]
async fn the_soft_timeout_answers_with_the_copy_and_the_load_completes_in_the_background() {
    let rig = rig();
    expired_copy(&rig, "a", "old").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let options = rig
        .cache
        .load_options()
        .soft_timeout(Duration::from_millis(100))
        .hard_timeout(Duration::from_secs(1));
    let load = slow(&calls, Duration::from_millis(300), "new");
    let start = Instant::now();
    let got = rig
        .cache
        .get_or_load_with(&k("a"), &options, move || async move {
            Ok::<_, std::io::Error>(Loaded::value(load().await))
        })
        .await
        .unwrap();
    assert_eq!(
        got.as_deref(),
        Some("old"),
        "the copy answers at the soft timeout"
    );
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    // The loader finishes on its own task and writes its value.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(rig.cache.get(&k("a")).await.unwrap().as_deref(), Some("new"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let stats = rig.cache.stats().loads;
    assert_eq!(
        (stats.soft_timeouts, stats.hard_timeouts, stats.stale_hits),
        (1, 0, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_copy_the_soft_timeout_waits_on_and_the_hard_timeout_fails() {
    let rig = rig();
    let calls = Arc::new(AtomicUsize::new(0));
    let options = rig
        .cache
        .load_options()
        .soft_timeout(Duration::from_millis(100))
        .hard_timeout(Duration::from_millis(500));
    // 300 ms: past the soft timeout, within the hard one: the value, no copy needed.
    let load = slow(&calls, Duration::from_millis(300), "v1");
    let start = Instant::now();
    let got = rig
        .cache
        .get_or_load_with(&k("a"), &options, move || async move {
            Ok::<_, std::io::Error>(Loaded::value(load().await))
        })
        .await
        .unwrap();
    assert_eq!(
        (got.as_deref(), start.elapsed()),
        (Some("v1"), Duration::from_millis(300))
    );

    // 2 s: the hard timeout's Timeout error at 500 ms; the load still writes at 2 s.
    let load = slow(&calls, Duration::from_secs(2), "v2");
    let start = Instant::now();
    let err = rig
        .cache
        .get_or_load_with(&k("b"), &options, move || async move {
            Ok::<_, std::io::Error>(Loaded::value(load().await))
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind(), start.elapsed()),
        (ErrorKind::Timeout, Duration::from_millis(500))
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rig.cache.get(&k("b")).await.unwrap().as_deref(),
        Some("v2"),
        "completed in the background"
    );

    // Background completion off: the loader is stopped at the hard timeout, nothing written.
    let dropped = Arc::new(AtomicUsize::new(0));
    struct Flag(Arc<AtomicUsize>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let flag = Flag(dropped.clone());
    let stop = options.clone().complete_in_background(false);
    let err = rig
        .cache
        .get_or_load_with(&k("c"), &stop, move || async move {
            let _flag = flag;
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok::<_, std::io::Error>(Loaded::value(k("v3")))
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "the loader was dropped");
    assert_eq!(rig.cache.get(&k("c")).await.unwrap(), None);
}

/// FusionCache's scenario: 20 callers of one cold key, each under its own 100 ms timeout,
/// over a 300 ms loader. Every caller times out, yet the loader runs once and the value
/// is cached for the next caller.
#[tokio::test(start_paused = true)]
async fn callers_that_time_out_do_not_restart_the_loader() {
    let rig = rig();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (cache, load) = (
            rig.cache.clone(),
            slow(&calls, Duration::from_millis(300), "loaded"),
        );
        tasks.push(tokio::spawn(async move {
            // Staggered, as real requests are.
            tokio::time::sleep(Duration::from_millis(10 * i)).await;
            tokio::time::timeout(Duration::from_millis(100), cache.get_or_load(&k("cold"), load)).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().is_err(), "each caller's own timeout fired");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one load for all of them");
    assert_eq!(
        rig.cache.get(&k("cold")).await.unwrap().as_deref(),
        Some("loaded")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_callers_with_random_cancellation_run_one_loader() {
    let rig = rig();
    let calls = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    for _ in 0..1_000 {
        let (cache, calls, release, started) =
            (rig.cache.clone(), calls.clone(), release.clone(), started.clone());
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load(&k("hot"), move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    started.notify_one();
                    release.notified().await;
                    k("loaded")
                })
                .await
        }));
    }
    within(Duration::from_secs(20), started.notified()).await;
    // Cancel a random half of the callers (the leader among them, likely).
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut kept = Vec::new();
    for t in tasks {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        if seed.is_multiple_of(2) {
            t.abort();
        } else {
            kept.push(t);
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    release.notify_one();
    for t in kept {
        assert_eq!(
            within(Duration::from_secs(20), t).await.unwrap().unwrap(),
            "loaded"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failing_loader_is_answered_with_the_copy_and_throttled() {
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = events.clone();
    let rig = rig_with(|b| {
        b.on_load_event(move |e| {
            let name = match e {
                LoadEvent::Hit { .. } => "hit".to_string(),
                LoadEvent::Miss { .. } => "miss".to_string(),
                LoadEvent::StaleHit { reason, .. } => format!("stale:{reason:?}"),
                LoadEvent::LoadStarted { .. } => "started".to_string(),
                LoadEvent::LoadSucceeded { .. } => "succeeded".to_string(),
                LoadEvent::LoadFailed { .. } => "failed".to_string(),
                LoadEvent::TimedOut { hard, .. } => format!("timeout:{hard}"),
                _ => "other".to_string(),
            };
            seen.lock().unwrap().push(name);
        })
    });
    expired_copy(&rig, "a", "old").await;
    events.lock().unwrap().clear();
    let calls = Arc::new(AtomicUsize::new(0));
    let failing = |calls: &Arc<AtomicUsize>| {
        let calls = calls.clone();
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<Option<String>, _>(std::io::Error::other("origin down"))
        }
    };
    let got = rig.cache.try_get_or_load(&k("a"), failing(&calls)).await.unwrap();
    assert_eq!(got.as_deref(), Some("old"));
    assert_eq!(
        *events.lock().unwrap(),
        ["miss", "started", "failed", "stale:LoaderFailed"]
    );
    // Within the throttle the copy answers without calling the loader.
    rig.clock.advance(Duration::from_secs(4));
    let got = rig.cache.try_get_or_load(&k("a"), failing(&calls)).await.unwrap();
    assert_eq!((got.as_deref(), calls.load(Ordering::SeqCst)), (Some("old"), 1));
    assert_eq!(
        events.lock().unwrap().last().map(String::as_str),
        Some("stale:Throttled")
    );
    // Past it the loader is called again.
    rig.clock.advance(Duration::from_secs(2));
    let got = rig.cache.try_get_or_load(&k("a"), failing(&calls)).await.unwrap();
    assert_eq!((got.as_deref(), calls.load(Ordering::SeqCst)), (Some("old"), 2));
    // A write ends the throttle: its value is what the next load returns.
    rig.cache
        .set_with(
            k("a"),
            k("written"),
            SetOptions::new().ttl(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    assert_eq!(
        rig.cache
            .try_get_or_load(&k("a"), failing(&calls))
            .await
            .unwrap()
            .as_deref(),
        Some("written")
    );
    // A delete removes the copy: the failure reaches the caller.
    rig.cache.delete(&k("a")).await.unwrap();
    let err = rig
        .cache
        .try_get_or_load(&k("a"), failing(&calls))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend);
    // Options can turn fail-safe off for a call.
    expired_copy(&rig, "b", "old").await;
    let no_fail_safe = rig.cache.load_options().fail_safe(false);
    let err = rig
        .cache
        .get_or_load_with(&k("b"), &no_fail_safe, || async {
            Err::<Loaded<String>, _>(std::io::Error::other("origin down"))
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend);
    let stats = rig.cache.stats().loads;
    assert_eq!((stats.failures, stats.stale_hits), (4, 3));
}

#[tokio::test(start_paused = true)]
async fn the_hard_timeout_is_answered_with_the_copy_when_there_is_one() {
    let rig = rig();
    expired_copy(&rig, "a", "old").await;
    let options = rig.cache.load_options().hard_timeout(Duration::from_millis(200));
    let calls = Arc::new(AtomicUsize::new(0));
    let load = slow(&calls, Duration::from_secs(1), "new");
    let got = rig
        .cache
        .get_or_load_with(&k("a"), &options, move || async move {
            Ok::<_, std::io::Error>(Loaded::value(load().await))
        })
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("old"));
    assert_eq!(rig.cache.stats().loads.hard_timeouts, 1);
}

#[tokio::test(start_paused = true)]
async fn eager_refresh_reloads_once_per_copy_and_answers_at_once() {
    let rig = rig();
    let options = rig.cache.load_options().eager_refresh(0.5);
    let calls = Arc::new(AtomicUsize::new(0));
    let loader = |v: &str| {
        let (calls, v) = (calls.clone(), v.to_string());
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, std::io::Error>(Loaded::value(v))
        }
    };
    let got = rig
        .cache
        .get_or_load_with(&k("a"), &options, loader("v1"))
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("v1"));
    // Before half of L1's TTL: plain hits.
    rig.clock.advance(Duration::from_secs(4));
    rig.cache
        .get_or_load_with(&k("a"), &options, loader("v2"))
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Past it: answered at once with the copy, one background load for many hits.
    rig.clock.advance(Duration::from_secs(2));
    let start = Instant::now();
    for _ in 0..10 {
        let got = rig
            .cache
            .get_or_load_with(&k("a"), &options, loader("v2"))
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some("v1"));
    }
    assert_eq!(start.elapsed(), Duration::ZERO, "nobody waited for the refresh");
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let entry = rig.cache.get_entry(&k("a")).await.unwrap().unwrap();
    assert_eq!(entry.value, "v2");
    assert_eq!(rig.cache.stats().loads.refreshes, 1);
}

#[tokio::test(start_paused = true)]
async fn a_write_racing_an_eager_refresh_wins() {
    let rig = rig();
    let options = rig.cache.load_options().eager_refresh(0.5);
    rig.cache
        .get_or_load_with(&k("a"), &options, || async {
            Ok::<_, std::io::Error>(Loaded::value(k("v1")))
        })
        .await
        .unwrap();
    rig.clock.advance(Duration::from_secs(6));
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (s, r) = (started.clone(), release.clone());
    rig.cache
        .get_or_load_with(&k("a"), &options, move || async move {
            s.notify_one();
            r.notified().await;
            Ok::<_, std::io::Error>(Loaded::value(k("refreshed")))
        })
        .await
        .unwrap();
    started.notified().await;
    rig.cache.set(k("a"), k("written")).await.unwrap();
    release.notify_one();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(rig.cache.get(&k("a")).await.unwrap().as_deref(), Some("written"));
    assert_eq!(rig.l2.raw_entry(&k("a")).unwrap().value, "written");
    assert_eq!(rig.cache.stats().loads.not_cached, 1);
}

#[tokio::test(start_paused = true)]
async fn a_write_during_a_background_completion_wins() {
    let rig = rig();
    expired_copy(&rig, "a", "old").await;
    let options = rig.cache.load_options().soft_timeout(Duration::from_millis(100));
    let release = Arc::new(Notify::new());
    let r = release.clone();
    let got = rig
        .cache
        .get_or_load_with(&k("a"), &options, move || async move {
            r.notified().await;
            Ok::<_, std::io::Error>(Loaded::value(k("loaded")))
        })
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("old"));
    rig.cache.set(k("a"), k("written")).await.unwrap();
    release.notify_one();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(rig.cache.get(&k("a")).await.unwrap().as_deref(), Some("written"));
    assert_eq!(rig.l1.raw_entry(&k("a")).unwrap().value, "written");
    assert_eq!(rig.l2.raw_entry(&k("a")).unwrap().value, "written");
}

#[tokio::test(start_paused = true)]
async fn adaptive_and_per_layer_ttls_are_honoured_per_layer() {
    let rig = rig();
    let now = rig.clock.now().as_millis();
    let expiry = |layer: &MapLayer<String, String>, key: &str| {
        layer
            .raw_entry(&k(key))
            .and_then(|e| e.expires_at)
            .map(|t| t.as_millis() - now)
    };
    let load = |v: Loaded<String>| move || async move { Ok::<_, std::io::Error>(v) };
    let plain = rig.cache.load_options();
    // The loader's TTL: l1 keeps the shorter of it and its own 10 s.
    rig.cache
        .get_or_load_with(
            &k("short"),
            &plain,
            load(Loaded::value(k("v")).ttl(Duration::from_secs(3))),
        )
        .await
        .unwrap();
    assert_eq!(
        (expiry(&rig.l1, "short"), expiry(&rig.l2, "short")),
        (Some(3_000), Some(3_000))
    );
    rig.cache
        .get_or_load_with(
            &k("long"),
            &plain,
            load(Loaded::value(k("v")).ttl(Duration::from_secs(60))),
        )
        .await
        .unwrap();
    assert_eq!(
        (expiry(&rig.l1, "long"), expiry(&rig.l2, "long")),
        (Some(10_000), Some(60_000))
    );
    // A per-layer TTL replaces the layer's own, bounded by the entry's.
    let per_layer = plain
        .clone()
        .layer_ttl("l1", Duration::from_secs(2))
        .ttl(Duration::from_secs(30));
    rig.cache
        .get_or_load_with(&k("layered"), &per_layer, load(Loaded::value(k("v"))))
        .await
        .unwrap();
    assert_eq!(
        (expiry(&rig.l1, "layered"), expiry(&rig.l2, "layered")),
        (Some(2_000), Some(30_000))
    );
    // Not cached: returned, written nowhere, and the next load calls the loader again.
    let got = rig
        .cache
        .get_or_load_with(&k("once"), &plain, load(Loaded::value(k("v")).uncached()))
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("v"));
    assert!(rig.l1.raw_entry(&k("once")).is_none() && rig.l2.raw_entry(&k("once")).is_none());
    let got = rig
        .cache
        .get_or_load_with(
            &k("zero"),
            &plain,
            load(Loaded::value(k("v")).ttl(Duration::ZERO)),
        )
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("v"));
    assert!(rig.l2.raw_entry(&k("zero")).is_none(), "a zero TTL is not cached");
}

#[tokio::test(start_paused = true)]
async fn skipped_layers_are_neither_read_nor_written() {
    let rig = rig();
    let load = |v: &str| {
        let v = v.to_string();
        move || async move { Ok::<_, std::io::Error>(Loaded::value(v)) }
    };
    // skip_write: l1 gets no copy, neither from the fill nor from later promotions.
    let no_l1 = rig.cache.load_options().skip_write("l1");
    rig.cache
        .get_or_load_with(&k("a"), &no_l1, load("v"))
        .await
        .unwrap();
    assert!(rig.l1.raw_entry(&k("a")).is_none());
    assert_eq!(rig.l2.raw_entry(&k("a")).unwrap().value, "v");
    rig.cache
        .get_or_load_with(&k("a"), &no_l1, load("never"))
        .await
        .unwrap();
    assert!(
        rig.l1.raw_entry(&k("a")).is_none(),
        "the hit in l2 was not promoted"
    );
    // skip_read: l1 is passed by (it holds an entry l2 does not).
    rig.l1.set(&k("b"), &k("in l1"), None).await.unwrap();
    let past_l1 = rig.cache.load_options().skip_read("l1");
    let got = rig
        .cache
        .get_or_load_with(&k("b"), &past_l1, load("loaded"))
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("loaded"));
    // Invalid options are typed errors, at the call or at build.
    for bad in [
        rig.cache.load_options().skip_write("l2"),
        rig.cache.load_options().skip_read("nope"),
        rig.cache.load_options().layer_ttl("nope", Duration::from_secs(1)),
        rig.cache
            .load_options()
            .soft_timeout(Duration::from_secs(2))
            .hard_timeout(Duration::from_secs(1)),
        rig.cache.load_options().hard_timeout(Duration::ZERO),
        rig.cache.load_options().eager_refresh(1.0),
        rig.cache.load_options().eager_refresh(f64::NAN),
    ] {
        let err = rig
            .cache
            .get_or_load_with(&k("c"), &bad, load("v"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}: {err}");
    }
    let err = MultiLayer::<String, String>::builder()
        .layer(LayerConfig::new("l1", MapLayer::new()))
        .load_options(LoadOptions::new().eager_refresh(0.0))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[tokio::test(start_paused = true)]
async fn a_batch_loads_the_missing_keys_once_and_joins_keys_in_flight() {
    let rig = rig_with(|b| b.cache_misses_for(Duration::from_secs(30)));
    rig.cache.set(k("hit"), k("cached")).await.unwrap();
    // A single load of "flying" is in flight when the batch starts.
    let release = Arc::new(Notify::new());
    let r = release.clone();
    let single = {
        let cache = rig.cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load(&k("flying"), move || async move {
                    r.notified().await;
                    k("from the single load")
                })
                .await
        })
    };
    tokio::task::yield_now().await;
    let asked: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let a = asked.clone();
    let batch = {
        let cache = rig.cache.clone();
        tokio::spawn(async move {
            cache
                .get_many_or_load(
                    &[k("hit"), k("x"), k("flying"), k("x"), k("ghost")],
                    move |missing| async move {
                        a.lock().unwrap().push(missing.clone());
                        Ok::<_, std::io::Error>(vec![(k("x"), k("loaded x"))])
                    },
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    release.notify_one();
    let got = batch.await.unwrap().unwrap();
    assert_eq!(
        got,
        vec![
            Some(k("cached")),
            Some(k("loaded x")),
            Some(k("from the single load")),
            Some(k("loaded x")),
            None
        ]
    );
    assert_eq!(single.await.unwrap().unwrap(), "from the single load");
    assert_eq!(
        *asked.lock().unwrap(),
        vec![vec![k("x"), k("ghost")]],
        "one call, missing keys only"
    );
    assert_eq!(rig.l2.raw_entry(&k("x")).unwrap().value, "loaded x");
    // "ghost" is remembered as missing: the next batch does not ask for it.
    let a = asked.clone();
    let again = rig
        .cache
        .get_many_or_load(&[k("ghost"), k("x")], move |missing| async move {
            a.lock().unwrap().push(missing);
            Ok::<Vec<(String, String)>, std::io::Error>(Vec::new())
        })
        .await
        .unwrap();
    assert_eq!(asked.lock().unwrap().len(), 1, "nothing left to load");
    assert_eq!(again, vec![None, Some(k("loaded x"))]);
}

#[tokio::test(start_paused = true)]
async fn a_failing_batch_is_answered_with_copies_or_the_error() {
    let rig = rig();
    expired_copy(&rig, "a", "old a").await;
    let fail =
        |_missing: Vec<String>| async { Err::<Vec<(String, String)>, _>(std::io::Error::other("down")) };
    let got = rig.cache.get_many_or_load(&[k("a")], fail).await.unwrap();
    assert_eq!(got, vec![Some(k("old a"))]);
    let err = rig
        .cache
        .get_many_or_load(&[k("a"), k("b")], fail)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend, "b has no copy");
}
