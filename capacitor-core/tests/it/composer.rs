//! The composer's semantics (docs/semantics.md) on test-kit layers with a manual clock.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::Arc;
use std::time::Duration;

use capacitor_core::testkit::{Faults, FaultyLayer, MapLayer};
use capacitor_core::{
    Entry, Error, ErrorKind, Layer, LayerConfig, ManualClock, MultiLayer, Operation, Result, SetOptions,
    Timestamp,
};

type Map = Arc<MapLayer<String, String>>;

fn key(s: &str) -> String {
    s.to_owned()
}

struct Stack {
    cache: MultiLayer<String, String>,
    maps: Vec<Map>,
    faults: Vec<Arc<Faults>>,
    clock: ManualClock,
}

/// A composer over `ttls.len()` map layers, each wrapped in a fault injector.
fn stack(ttls: &[Option<u64>]) -> Stack {
    stack_with(ttls, |b| b)
}

fn stack_with(
    ttls: &[Option<u64>],
    configure: impl FnOnce(
        capacitor_core::MultiLayerBuilder<String, String>,
    ) -> capacitor_core::MultiLayerBuilder<String, String>,
) -> Stack {
    let clock = ManualClock::new(1_000_000);
    let mut builder = MultiLayer::builder().clock(clock.clone());
    let mut maps = Vec::new();
    let mut faults = Vec::new();
    for (i, ttl) in ttls.iter().enumerate() {
        let map: Map = Arc::new(MapLayer::with_clock(clock.clone()));
        let faulty = FaultyLayer::shared(map.clone());
        faults.push(faulty.faults());
        maps.push(map);
        let mut cfg = LayerConfig::new(format!("l{}", i + 1), faulty);
        if let Some(ms) = ttl {
            cfg = cfg.ttl(Duration::from_millis(*ms));
        }
        builder = builder.layer(cfg);
    }
    Stack {
        cache: configure(builder).build().expect("valid config"),
        maps,
        faults,
        clock,
    }
}

fn raw(map: &Map, k: &str) -> Option<Entry<String>> {
    map.raw_entry(&key(k))
}

#[test]
fn build_rejects_invalid_configurations_with_the_field_named() {
    let kind_and_msg = |r: Result<MultiLayer<String, String>>| {
        let e = r.expect_err("must be rejected");
        assert_eq!(e.kind(), ErrorKind::Config);
        assert_eq!(e.operation(), Operation::Build);
        e.to_string()
    };
    let msg = kind_and_msg(MultiLayer::builder().build());
    assert!(msg.contains("`layers`"), "{msg}");

    let msg = kind_and_msg(
        MultiLayer::builder()
            .layer(LayerConfig::new("a", MapLayer::new()))
            .layer(LayerConfig::new("a", MapLayer::new()))
            .build(),
    );
    assert!(
        msg.contains("layers[1].name") && msg.contains("duplicate"),
        "{msg}"
    );

    let msg = kind_and_msg(
        MultiLayer::builder()
            .layer(LayerConfig::new(" ", MapLayer::new()))
            .build(),
    );
    assert!(msg.contains("layers[0].name"), "{msg}");

    let msg = kind_and_msg(
        MultiLayer::builder()
            .layer(LayerConfig::new("a", MapLayer::new()))
            .layer(LayerConfig::new("b", MapLayer::new()).ttl(Duration::ZERO))
            .build(),
    );
    assert!(msg.contains("layers[1].ttl"), "{msg}");

    let msg = kind_and_msg(
        MultiLayer::builder()
            .layer(LayerConfig::new("a", MapLayer::new()).read_only(true))
            .build(),
    );
    assert!(msg.contains("read-only"), "{msg}");
}

#[tokio::test]
async fn read_returns_the_first_hit_and_promotes_with_the_remaining_life() {
    let s = stack(&[Some(10_000), Some(60_000), None]);
    // Put the value only in L3, with 5 s of life left.
    s.maps[2]
        .set(&key("k"), &key("v"), Some(Duration::from_secs(5)))
        .await
        .expect("seed");
    s.clock.advance(Duration::from_secs(1));

    assert_eq!(s.cache.get(&key("k")).await.expect("get"), Some(key("v")));
    let now = 1_000_000 + 1_000;
    // L2's TTL is 60 s but only 4 s remain: the copy must expire with its source.
    assert_eq!(
        raw(&s.maps[1], "k").and_then(|e| e.expires_at),
        Some(Timestamp::from_millis(now + 4_000))
    );
    assert_eq!(
        raw(&s.maps[0], "k").and_then(|e| e.expires_at),
        Some(Timestamp::from_millis(now + 4_000))
    );

    // A source without expiry: each layer keeps it for its own TTL.
    s.maps[2].set(&key("p"), &key("v"), None).await.expect("seed");
    s.cache.get(&key("p")).await.expect("get");
    assert_eq!(
        raw(&s.maps[0], "p").and_then(|e| e.expires_at),
        Some(Timestamp::from_millis(now + 10_000))
    );
    assert_eq!(
        raw(&s.maps[1], "p").and_then(|e| e.expires_at),
        Some(Timestamp::from_millis(now + 60_000))
    );

    let stats = s.cache.stats();
    assert_eq!(stats.layer("l3").map(|l| l.hits), Some(2));
    assert_eq!(stats.layer("l1").map(|l| (l.misses, l.promotions)), Some((2, 2)));
    assert_eq!(stats.layer("l2").map(|l| l.promotions), Some(2));

    // The next read is an L1 hit.
    s.cache.get(&key("k")).await.expect("get");
    assert_eq!(s.cache.stats().layer("l1").map(|l| l.hits), Some(1));

    // Past the source's expiry every copy is gone.
    s.clock.advance(Duration::from_secs(4));
    assert_eq!(s.cache.get(&key("k")).await.expect("get"), None);
}

#[tokio::test]
async fn promotion_off_leaves_upper_layers_untouched() {
    let s = stack_with(&[None, None], |b| b.promotion(false));
    s.maps[1].set(&key("k"), &key("v"), None).await.expect("seed");
    assert_eq!(s.cache.get(&key("k")).await.expect("get"), Some(key("v")));
    assert!(raw(&s.maps[0], "k").is_none());
}

#[tokio::test]
async fn write_through_uses_each_layer_ttl_capped_by_the_write_ttl() {
    let s = stack(&[Some(10_000), None]);
    s.cache.set(key("a"), key("1")).await.expect("set");
    assert_eq!(
        raw(&s.maps[0], "a").and_then(|e| e.expires_at),
        Some(Timestamp::from_millis(1_010_000))
    );
    assert_eq!(raw(&s.maps[1], "a").and_then(|e| e.expires_at), None);

    s.cache
        .set_with(key("b"), key("2"), SetOptions::new().ttl(Duration::from_secs(3)))
        .await
        .expect("set");
    assert_eq!(
        raw(&s.maps[0], "b").and_then(|e| e.expires_at),
        Some(Timestamp::from_millis(1_003_000))
    );
    assert_eq!(
        raw(&s.maps[1], "b").and_then(|e| e.expires_at),
        Some(Timestamp::from_millis(1_003_000))
    );

    let err = s
        .cache
        .set_with(key("c"), key("3"), SetOptions::new().ttl(Duration::ZERO))
        .await;
    assert_eq!(err.map_err(|e| e.kind()).err(), Some(ErrorKind::InvalidInput));
    assert!(raw(&s.maps[1], "c").is_none());
}

#[tokio::test]
async fn authoritative_failure_changes_nothing_above_and_is_returned() {
    let s = stack(&[None, None]);
    s.cache.set(key("k"), key("old")).await.expect("set");
    s.faults[1].fail_writes(true);
    let err = s
        .cache
        .set(key("k"), key("new"))
        .await
        .expect_err("bottom failure must fail the set");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(err.layer(), Some("l2"));
    assert_eq!(
        raw(&s.maps[0], "k").map(|e| e.value),
        Some(key("old")),
        "L1 must not see the failed write"
    );
    assert_eq!(s.cache.get(&key("k")).await.expect("get"), Some(key("old")));
    assert_eq!(s.cache.stats().layer("l2").map(|l| l.errors), Some(1));
}

#[tokio::test]
async fn cache_failure_invalidates_the_key_there_and_the_write_succeeds() {
    let s = stack(&[None, None]);
    s.cache.set(key("k"), key("old")).await.expect("set");
    s.faults[0].fail_writes(true);
    s.cache
        .set(key("k"), key("new"))
        .await
        .expect("a cache failure does not fail the write by default");
    assert!(
        raw(&s.maps[0], "k").is_none(),
        "the stale L1 copy must be invalidated"
    );
    assert_eq!(raw(&s.maps[1], "k").map(|e| e.value), Some(key("new")));
    assert_eq!(s.cache.stats().layer("l1").map(|l| l.errors), Some(1));
    s.faults[0].fail_writes(false);
    assert_eq!(s.cache.get(&key("k")).await.expect("get"), Some(key("new")));

    let strict = stack_with(&[None, None], |b| b.fail_on_cache_error(true));
    strict.faults[0].fail_writes(true);
    let err = strict
        .cache
        .set(key("k"), key("v"))
        .await
        .expect_err("strict mode reports the cache failure");
    assert_eq!(err.layer(), Some("l1"));
    assert_eq!(
        raw(&strict.maps[1], "k").map(|e| e.value),
        Some(key("v")),
        "authoritative write stays"
    );
}

#[tokio::test]
async fn cache_read_errors_are_misses_but_the_last_layer_error_is_returned() {
    let s = stack(&[None, None]);
    s.cache.set(key("k"), key("v")).await.expect("set");
    s.faults[0].fail_reads(true);
    assert_eq!(
        s.cache.get(&key("k")).await.expect("served from L2"),
        Some(key("v"))
    );
    assert!(s.cache.exists(&key("k")).await.expect("exists from L2"));
    s.faults[1].fail_reads(true);
    let err = s.cache.get(&key("k")).await.expect_err("last layer error");
    assert_eq!((err.kind(), err.layer()), (ErrorKind::Unavailable, Some("l2")));
    let l1 = s.cache.stats().layer("l1").cloned().unwrap_or_default();
    assert!(l1.errors >= 2, "{l1:?}");
}

/// A layer whose stored bytes never decode.
struct Undecodable;

#[capacitor_core::async_trait]
impl Layer<String, String> for Undecodable {
    fn name(&self) -> &str {
        "undecodable"
    }
    async fn get(&self, _: &String) -> Result<Option<Entry<String>>> {
        Err(Error::new(ErrorKind::Decode, Operation::Get, "garbage"))
    }
    async fn set(&self, _: &String, _: &String, _: Option<Duration>) -> Result<()> {
        Ok(())
    }
    async fn delete(&self, _: &String) -> Result<bool> {
        Ok(false)
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn decode_errors_are_counted_misses_even_in_the_last_layer() {
    let below = MultiLayer::builder()
        .layer(LayerConfig::new("bad", Undecodable))
        .layer(LayerConfig::new("good", MapLayer::new()))
        .build()
        .expect("config");
    below.set(key("k"), key("v")).await.expect("set");
    assert_eq!(
        below.get(&key("k")).await.expect("get"),
        Some(key("v")),
        "a decode error must not blind L2"
    );

    let only = MultiLayer::builder()
        .layer(LayerConfig::new("bad", Undecodable))
        .build()
        .expect("config");
    assert_eq!(
        only.get(&key("k"))
            .await
            .expect("decode error is a miss, not an error"),
        None
    );
    let stats = only.stats();
    assert_eq!(
        stats.layer("bad").map(|l| (l.decode_errors, l.misses, l.errors)),
        Some((1, 1, 0))
    );
    assert_eq!(stats.misses(), 1);
}

#[tokio::test]
async fn delete_goes_bottom_up_and_reports_the_authoritative_answer() {
    let s = stack(&[None, None]);
    s.cache.set(key("k"), key("v")).await.expect("set");
    assert!(s.cache.delete(&key("k")).await.expect("delete"));
    assert!(raw(&s.maps[0], "k").is_none() && raw(&s.maps[1], "k").is_none());
    assert!(!s.cache.delete(&key("k")).await.expect("delete"));

    s.cache.set(key("k"), key("v")).await.expect("set");
    s.faults[1].fail_deletes(true);
    assert!(s.cache.delete(&key("k")).await.is_err());
    assert_eq!(
        raw(&s.maps[0], "k").map(|e| e.value),
        Some(key("v")),
        "nothing above a failed bottom delete"
    );
}

#[tokio::test]
async fn read_only_layers_are_read_but_never_written() {
    let clock = ManualClock::new(0);
    let archive: Map = Arc::new(MapLayer::with_clock(clock.clone()));
    archive
        .set(&key("old"), &key("from-archive"), None)
        .await
        .expect("seed");
    let l1: Map = Arc::new(MapLayer::with_clock(clock.clone()));
    let cache = MultiLayer::builder()
        .clock(clock)
        .layer(LayerConfig::shared("l1", l1.clone()))
        .layer(LayerConfig::shared("archive", archive.clone()).read_only(true))
        .build()
        .expect("config");
    assert_eq!(
        cache.get(&key("old")).await.expect("get"),
        Some(key("from-archive"))
    );
    assert!(
        l1.raw_entry(&key("old")).is_some(),
        "promoted into the writable L1"
    );
    cache.set(key("new"), key("v")).await.expect("set");
    assert!(archive.raw_entry(&key("new")).is_none());
    cache.delete(&key("old")).await.expect("delete");
    assert!(
        archive.raw_entry(&key("old")).is_some(),
        "read-only layer untouched by delete"
    );
}

#[tokio::test]
async fn a_write_during_a_lower_read_keeps_the_stale_value_out_of_l1() {
    let s = stack(&[None, None]);
    s.maps[1].set(&key("k"), &key("old"), None).await.expect("seed");
    s.faults[1].pause_next_read();
    let reader = {
        let cache = s.cache.clone();
        tokio::spawn(async move { cache.get(&key("k")).await })
    };
    // The reader has fetched "old" from L2 and is about to promote it.
    tokio::time::timeout(Duration::from_secs(5), s.faults[1].read_paused())
        .await
        .expect("reader paused");
    s.cache.set(key("k"), key("new")).await.expect("concurrent set");
    s.faults[1].resume();
    let read = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("reader done")
        .expect("join");
    assert_eq!(
        read.expect("get"),
        Some(key("old")),
        "the reader returns what it read"
    );
    assert_eq!(
        raw(&s.maps[0], "k").map(|e| e.value),
        Some(key("new")),
        "L1 must not hold the stale value"
    );
    assert_eq!(s.cache.get(&key("k")).await.expect("get"), Some(key("new")));
    assert_eq!(s.cache.stats().layer("l1").map(|l| l.promotions_skipped), Some(1));

    // Same race with a delete: the stale value must not come back.
    s.maps[1].set(&key("d"), &key("old"), None).await.expect("seed");
    s.faults[1].pause_next_read();
    let reader = {
        let cache = s.cache.clone();
        tokio::spawn(async move { cache.get(&key("d")).await })
    };
    tokio::time::timeout(Duration::from_secs(5), s.faults[1].read_paused())
        .await
        .expect("reader paused");
    assert!(s.cache.delete(&key("d")).await.expect("delete"));
    s.faults[1].resume();
    tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("reader done")
        .expect("join")
        .expect("get");
    assert_eq!(
        s.cache.get(&key("d")).await.expect("get"),
        None,
        "a deleted key must not be resurrected"
    );
}

#[tokio::test]
async fn get_many_asks_each_layer_once_and_promotes_hits() {
    let s = stack(&[None, None]);
    s.cache.set(key("a"), key("1")).await.expect("set");
    s.maps[1]
        .set(&key("b"), &key("2"), None)
        .await
        .expect("seed l2 only");
    let got = s
        .cache
        .get_many(&[key("a"), key("b"), key("c")])
        .await
        .expect("get_many");
    assert_eq!(got, vec![Some(key("1")), Some(key("2")), None]);
    assert_eq!(
        raw(&s.maps[0], "b").map(|e| e.value),
        Some(key("2")),
        "L2 hit promoted"
    );
    let stats = s.cache.stats();
    assert_eq!(stats.layer("l1").map(|l| (l.hits, l.misses)), Some((1, 2)));
    assert_eq!(stats.layer("l2").map(|l| (l.hits, l.misses)), Some((1, 1)));

    s.cache
        .set_many(&[(key("x"), key("9")), (key("y"), key("8"))], SetOptions::new())
        .await
        .expect("set_many");
    assert_eq!(raw(&s.maps[0], "y").map(|e| e.value), Some(key("8")));
    assert_eq!(
        s.cache
            .delete_many(&[key("x"), key("y"), key("zz")])
            .await
            .expect("delete_many"),
        2
    );
    assert!(raw(&s.maps[1], "x").is_none());
}

#[tokio::test]
async fn close_is_idempotent_and_every_operation_after_it_fails_typed() {
    let s = stack(&[None, None]);
    s.cache.set(key("k"), key("v")).await.expect("set");
    s.cache.close().await.expect("close");
    s.cache.close().await.expect("close again");
    assert_eq!(
        s.cache.get(&key("k")).await.map_err(|e| e.kind()).err(),
        Some(ErrorKind::Closed)
    );
    assert_eq!(
        s.cache.set(key("k"), key("v")).await.map_err(|e| e.kind()).err(),
        Some(ErrorKind::Closed)
    );
    assert_eq!(
        s.cache.delete(&key("k")).await.map_err(|e| e.kind()).err(),
        Some(ErrorKind::Closed)
    );
    assert_eq!(
        s.cache.flush().await.map_err(|e| e.kind()).err(),
        Some(ErrorKind::Closed)
    );
    // The layers themselves were closed.
    assert_eq!(
        s.maps[1].get(&key("k")).await.map_err(|e| e.kind()).err(),
        Some(ErrorKind::Closed)
    );
}

#[tokio::test]
async fn a_multilayer_nests_inside_another() {
    let inner = MultiLayer::builder()
        .name("inner")
        .layer(LayerConfig::new("i1", MapLayer::new()))
        .layer(LayerConfig::new("i2", MapLayer::new()))
        .build()
        .expect("config");
    let outer = MultiLayer::builder()
        .layer(LayerConfig::new("o1", MapLayer::new()))
        .layer(LayerConfig::new("inner", inner.clone()))
        .build()
        .expect("config");
    outer.set(key("k"), key("v")).await.expect("set");
    assert_eq!(inner.get(&key("k")).await.expect("inner get"), Some(key("v")));
    assert_eq!(Layer::name(&inner), "inner");
    assert!(outer.delete(&key("k")).await.expect("delete"));
    assert_eq!(inner.get(&key("k")).await.expect("inner get"), None);
}

/// Fails every batch read with a decode error while single reads work (a backend whose
/// batch cannot say which key held bad bytes).
struct BatchDecodeFails(MapLayer<String, String>);

#[capacitor_core::async_trait]
impl Layer<String, String> for BatchDecodeFails {
    fn name(&self) -> &str {
        "batch-decode-fails"
    }
    async fn get(&self, key: &String) -> Result<Option<Entry<String>>> {
        if key == "bad" {
            return Err(Error::new(ErrorKind::Decode, Operation::Get, "garbage"));
        }
        self.0.get(key).await
    }
    async fn get_many(&self, _: &[String]) -> Result<Vec<Option<Entry<String>>>> {
        Err(Error::new(
            ErrorKind::Decode,
            Operation::GetMany,
            "garbage somewhere in the batch",
        ))
    }
    async fn set(&self, key: &String, value: &String, ttl: Option<Duration>) -> Result<()> {
        self.0.set(key, value, ttl).await
    }
    async fn delete(&self, key: &String) -> Result<bool> {
        self.0.delete(key).await
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn one_undecodable_value_in_a_batch_costs_only_its_own_key() {
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new("store", BatchDecodeFails(MapLayer::new())))
        .build()
        .expect("config");
    cache.set(key("a"), key("1")).await.expect("set");
    cache.set(key("b"), key("2")).await.expect("set");
    let got = cache
        .get_many(&[key("a"), key("bad"), key("b")])
        .await
        .expect("get_many");
    assert_eq!(got, vec![Some(key("1")), None, Some(key("2"))]);
    let stats = cache.stats();
    assert_eq!(
        stats.layer("store").map(|l| (l.hits, l.misses, l.errors)),
        Some((2, 1, 0))
    );
    assert!(stats.layer("store").is_some_and(|l| l.decode_errors >= 1));
}
