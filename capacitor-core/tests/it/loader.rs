//! `get_or_load`: single flight, errors, panics and cancellation, the write-wins guard,
//! negative caching, TTL jitter.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capacitor_core::testkit::{within, MapLayer};
use capacitor_core::{ErrorKind, LayerConfig, ManualClock, MultiLayer, Timestamp};
use tokio::sync::Notify;

fn cache() -> MultiLayer<String, String> {
    MultiLayer::builder()
        .layer(LayerConfig::new("l1", MapLayer::new()))
        .layer(LayerConfig::new("l2", MapLayer::new()))
        .build()
        .unwrap()
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_callers_run_the_loader_once() {
    let cache = cache();
    let calls = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..1_000)
        .map(|_| {
            let (cache, calls) = (cache.clone(), calls.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(&"hot".to_string(), || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        "loaded".to_string()
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(within(WAIT, t).await.unwrap().unwrap(), "loaded");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        cache.get(&"hot".to_string()).await.unwrap(),
        Some("loaded".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_error_reaches_every_waiter_and_caches_nothing() {
    const TASKS: usize = 50;
    let cache = cache();
    let calls = Arc::new(AtomicUsize::new(0));
    // Tasks that have called `try_get_or_load`: a task that came after the flight ended
    // would rightly lead a second one, so the loader holds the flight open until every
    // task has called and then long enough for the last ones to join it (joining takes no
    // await: the reads of the in-memory layers complete at once).
    let entered = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (cache, calls, entered) = (cache.clone(), calls.clone(), entered.clone());
            tokio::spawn(async move {
                entered.fetch_add(1, Ordering::SeqCst);
                cache
                    .try_get_or_load(&"k".to_string(), || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        within(WAIT, async {
                            while entered.load(Ordering::SeqCst) < TASKS {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                        })
                        .await;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Err::<Option<String>, _>(std::io::Error::other("database down"))
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        let err = within(WAIT, t)
            .await
            .unwrap()
            .expect_err("every waiter sees the error");
        assert_eq!(err.kind(), ErrorKind::Backend);
        let chain = format!("{:?}", std::error::Error::source(&err));
        assert!(chain.contains("database down"), "{chain}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.get(&"k".to_string()).await.unwrap(), None, "nothing cached");
    // The next call loads again.
    let v = cache
        .get_or_load(&"k".to_string(), || async { "v".to_string() })
        .await
        .unwrap();
    assert_eq!(v, "v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_or_cancelled_loader_does_not_wedge_the_key() {
    let cache = cache();
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let panicking = {
        let (cache, started, release) = (cache.clone(), started.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&"p".to_string(), || async move {
                    started.notify_one();
                    release.notified().await;
                    panic!("loader bug");
                })
                .await
        })
    };
    // The spawned task leads the flight (its loader runs) ...
    within(WAIT, started.notified()).await;
    // ... and a follower joins it: its first poll reads the (empty, in-memory) layers at
    // once and then waits on the flight.
    let key = "p".to_string();
    let follower = cache.get_or_load(&key, || async { "recovered".to_string() });
    tokio::pin!(follower);
    assert!(
        futures::poll!(follower.as_mut()).is_pending(),
        "the follower waits on the flight"
    );
    // The leader panics: the follower takes over with its own loader.
    release.notify_one();
    assert_eq!(within(WAIT, follower).await.unwrap(), "recovered");
    assert!(
        within(WAIT, panicking).await.is_err(),
        "the panic reaches its own caller"
    );

    // Cancellation: the leader's future is dropped mid-load. The flight runs on: the
    // next caller joins it instead of starting the loader again, and the value is cached.
    let started = Arc::new(Notify::new());
    let gate = Arc::new(Notify::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let leader = {
        let (cache, started, gate, calls) = (cache.clone(), started.clone(), gate.clone(), calls.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&"c".to_string(), || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    started.notify_one();
                    gate.notified().await;
                    "first".to_string()
                })
                .await
        })
    };
    within(WAIT, started.notified()).await;
    leader.abort();
    let key = "c".to_string();
    let after = cache.get_or_load(&key, || async { "second".to_string() });
    tokio::pin!(after);
    assert!(
        futures::poll!(after.as_mut()).is_pending(),
        "joined the running flight"
    );
    gate.notify_one();
    assert_eq!(within(WAIT, after).await.unwrap(), "first");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the loader ran once");
    assert_eq!(cache.get(&key).await.unwrap(), Some("first".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cancel_with_callers_the_last_caller_leaving_stops_the_load() {
    let cache = cache();
    let options = cache.load_options().cancel_with_callers(true);
    let started = Arc::new(Notify::new());
    let dropped = Arc::new(AtomicUsize::new(0));
    struct Flag(Arc<AtomicUsize>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let leader = {
        let (cache, started, dropped, options) =
            (cache.clone(), started.clone(), dropped.clone(), options.clone());
        tokio::spawn(async move {
            cache
                .get_or_load_with(&"c".to_string(), &options, move || async move {
                    let _flag = Flag(dropped);
                    started.notify_one();
                    std::future::pending::<()>().await;
                    Ok::<_, std::io::Error>(capacitor_core::Loaded::value("never".to_string()))
                })
                .await
        })
    };
    within(WAIT, started.notified()).await;
    leader.abort();
    let _ = leader.await;
    // The loader's future is dropped with the flight, and the key is free again.
    within(WAIT, async {
        while dropped.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let key = "c".to_string();
    let after = cache.get_or_load(&key, || async { "fresh".to_string() });
    assert_eq!(within(WAIT, after).await.unwrap(), "fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_the_load_wins_and_the_loaded_value_is_not_cached() {
    let cache = cache();
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let loading = {
        let (cache, started, release) = (cache.clone(), started.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&"k".to_string(), || async move {
                    started.notify_one();
                    release.notified().await;
                    "old from the loader".to_string()
                })
                .await
        })
    };
    within(WAIT, started.notified()).await;
    cache.set("k".into(), "new from a set".into()).await.unwrap();
    release.notify_one();
    assert_eq!(
        within(WAIT, loading).await.unwrap().unwrap(),
        "old from the loader",
        "waiters get the loaded value"
    );
    assert_eq!(
        cache.get(&"k".to_string()).await.unwrap(),
        Some("new from a set".to_string()),
        "the set wins"
    );

    // Same with a delete.
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let loading = {
        let (cache, started, release) = (cache.clone(), started.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&"d".to_string(), || async move {
                    started.notify_one();
                    release.notified().await;
                    "loaded".to_string()
                })
                .await
        })
    };
    within(WAIT, started.notified()).await;
    cache.delete(&"d".to_string()).await.unwrap();
    release.notify_one();
    within(WAIT, loading).await.unwrap().unwrap();
    assert_eq!(
        cache.get(&"d".to_string()).await.unwrap(),
        None,
        "the delete wins"
    );
}

#[tokio::test]
async fn misses_are_remembered_when_asked_and_forgotten_on_set() {
    let clock = ManualClock::new(0);
    let cache = MultiLayer::<String, String>::builder()
        .clock(clock.clone())
        .cache_misses_for(Duration::from_secs(10))
        .layer(LayerConfig::new("l1", MapLayer::with_clock(clock.clone())))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let missing = || {
        let calls = Arc::clone(&calls);
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<Option<String>, std::io::Error>(None)
        }
    };
    assert_eq!(
        cache.try_get_or_load(&"ghost".into(), missing()).await.unwrap(),
        None
    );
    assert_eq!(
        cache.try_get_or_load(&"ghost".into(), missing()).await.unwrap(),
        None
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the miss was cached");
    clock.advance(Duration::from_secs(11));
    assert_eq!(
        cache.try_get_or_load(&"ghost".into(), missing()).await.unwrap(),
        None
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the negative entry expired");
    cache.set("ghost".into(), "real".into()).await.unwrap();
    assert_eq!(
        cache.try_get_or_load(&"ghost".into(), missing()).await.unwrap(),
        Some("real".into())
    );
    cache.delete(&"ghost".into()).await.unwrap();
    assert_eq!(
        cache.try_get_or_load(&"ghost".into(), missing()).await.unwrap(),
        None
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "a set forgets the remembered miss"
    );
}

#[tokio::test]
async fn ttl_jitter_spreads_expiries_within_its_bound() {
    let clock = ManualClock::new(0);
    let l1 = Arc::new(MapLayer::<u32, u32>::with_clock(clock.clone()));
    let cache = MultiLayer::builder()
        .clock(clock.clone())
        .ttl_jitter(0.2)
        .layer(LayerConfig::shared("l1", l1.clone()).ttl(Duration::from_secs(100)))
        .build()
        .unwrap();
    for i in 0..200 {
        cache.set(i, i).await.unwrap();
    }
    let expiries: Vec<u64> = (0..200)
        .map(|i| {
            l1.raw_entry(&i)
                .and_then(|e| e.expires_at)
                .map(Timestamp::as_millis)
                .unwrap()
        })
        .collect();
    assert!(
        expiries.iter().all(|&ms| (80_000..=100_000).contains(&ms)),
        "within 20% below the TTL"
    );
    let distinct: std::collections::HashSet<_> = expiries.iter().collect();
    assert!(
        distinct.len() > 100,
        "expiries are spread: {} distinct of 200",
        distinct.len()
    );

    let err = MultiLayer::<u32, u32>::builder()
        .ttl_jitter(0.9)
        .layer(LayerConfig::new("l1", MapLayer::new()))
        .build()
        .expect_err("out of range");
    assert!(err.to_string().contains("ttl_jitter"));
}
