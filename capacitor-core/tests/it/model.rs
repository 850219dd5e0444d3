//! Model-based property test: random operation sequences on a three-layer composer (with a
//! manual clock and layers that fail on demand), checked step by step against a plain
//! map of what the authoritative store should hold.
//!
//! It catches, among others, a promotion that ignores the entry's remaining life (an L1
//! copy outliving its source), a write order that touches caches before the
//! authoritative layer (a cache serving a write the bottom refused), and, through `Race`
//! steps, two writes of one key whose layers applied them in different orders (the
//! first write is held at the store, before or after the store took it, while the
//! second runs to completion; the store's order is the model's).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use capacitor_core::testkit::{Faults, FaultyLayer, GateLayer, GateOp, Gates, Hold, MapLayer};
use capacitor_core::{LayerConfig, ManualClock, MultiLayer, SetOptions};
use proptest::prelude::*;

const LAYER_TTLS: [Option<u64>; 3] = [Some(5_000), Some(20_000), None];

#[derive(Debug, Clone)]
enum Op {
    Set {
        key: u8,
        value: u8,
        ttl_ms: Option<u64>,
    },
    Delete {
        key: u8,
    },
    Get {
        key: u8,
    },
    Exists {
        key: u8,
    },
    Advance {
        ms: u64,
    },
    FailReads {
        layer: usize,
        on: bool,
    },
    FailWrites {
        layer: usize,
        on: bool,
    },
    /// `first` is held at the store (`before` it takes the write, or after) while
    /// `second` runs; then `first` goes on.
    Race {
        key: u8,
        first: Write,
        second: Write,
        before: bool,
    },
}

/// A write form a `Race` step can use, with its value (`None`: a delete).
#[derive(Debug, Clone, Copy)]
enum Write {
    Set(u8),
    Delete,
    SetMany(u8),
    DeleteMany,
    Commit(Option<u8>),
}

impl Write {
    fn gate(self) -> GateOp {
        match self {
            Write::Set(_) => GateOp::Set,
            Write::Delete => GateOp::Delete,
            Write::SetMany(_) => GateOp::SetMany,
            Write::DeleteMany => GateOp::DeleteMany,
            Write::Commit(_) => GateOp::Atomic,
        }
    }

    /// What the key holds once this write is applied.
    fn value(self) -> Option<u8> {
        match self {
            Write::Set(v) | Write::SetMany(v) | Write::Commit(Some(v)) => Some(v),
            Write::Delete | Write::DeleteMany | Write::Commit(None) => None,
        }
    }

    async fn run(self, cache: MultiLayer<String, u8>, key: u8) -> capacitor_core::Result<()> {
        let k = key.to_string();
        match self {
            Write::Set(v) => cache.set(k, v).await,
            Write::Delete => cache.delete(&k).await.map(drop),
            Write::SetMany(v) => cache.set_many(&[(k, v)], SetOptions::new()).await,
            Write::DeleteMany => cache.delete_many(&[k]).await.map(drop),
            Write::Commit(v) => {
                let mut tx = cache.begin()?;
                match v {
                    Some(v) => tx.set(k, v),
                    None => tx.delete(k),
                }
                tx.commit().await
            }
        }
    }
}

fn write() -> impl Strategy<Value = Write> {
    prop_oneof![
        any::<u8>().prop_map(Write::Set),
        Just(Write::Delete),
        any::<u8>().prop_map(Write::SetMany),
        Just(Write::DeleteMany),
        proptest::option::of(any::<u8>()).prop_map(Write::Commit),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0u8..4;
    prop_oneof![
        4 => (key.clone(), any::<u8>(), proptest::option::of(1u64..30_000))
            .prop_map(|(key, value, ttl_ms)| Op::Set { key, value, ttl_ms }),
        2 => key.clone().prop_map(|key| Op::Delete { key }),
        5 => key.clone().prop_map(|key| Op::Get { key }),
        1 => key.clone().prop_map(|key| Op::Exists { key }),
        3 => (0u64..12_000).prop_map(|ms| Op::Advance { ms }),
        1 => (0usize..3, any::<bool>()).prop_map(|(layer, on)| Op::FailReads { layer, on }),
        1 => (0usize..3, any::<bool>()).prop_map(|(layer, on)| Op::FailWrites { layer, on }),
        2 => (key, write(), write(), any::<bool>())
            .prop_map(|(key, first, second, before)| Op::Race { key, first, second, before }),
    ]
}

/// What the authoritative layer should hold: value and absolute expiry (ms).
#[derive(Default)]
struct Model {
    now: u64,
    map: HashMap<u8, (u8, Option<u64>)>,
}

impl Model {
    fn live(&self, key: u8) -> Option<u8> {
        match self.map.get(&key) {
            Some((v, Some(at))) if *at > self.now => Some(*v),
            Some((v, None)) => Some(*v),
            _ => None,
        }
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TestCaseError::fail(format!("runtime: {e}")))?;
    rt.block_on(async move {
        let start = 1_000_000;
        let clock = ManualClock::new(start);
        let mut faults: Vec<Arc<Faults>> = Vec::new();
        let mut gates: Option<Arc<Gates>> = None;
        let mut builder = MultiLayer::builder().clock(clock.clone());
        for (i, ttl) in LAYER_TTLS.iter().enumerate() {
            let layer = FaultyLayer::new(MapLayer::<String, u8>::with_clock(clock.clone()));
            faults.push(layer.faults());
            let mut cfg = if i + 1 == LAYER_TTLS.len() {
                // The store: races are held here.
                let gated = GateLayer::new(layer);
                gates = Some(gated.gates());
                LayerConfig::new(format!("l{i}"), gated)
            } else {
                LayerConfig::new(format!("l{i}"), layer)
            };
            if let Some(ms) = ttl {
                cfg = cfg.ttl(Duration::from_millis(*ms));
            }
            builder = builder.layer(cfg);
        }
        let cache = builder.build().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut model = Model {
            now: start,
            ..Model::default()
        };
        let (mut bottom_reads_fail, mut bottom_writes_fail) = (false, false);
        let gates = gates.ok_or_else(|| TestCaseError::fail("no store layer"))?;

        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Set { key, value, ttl_ms } => {
                    let opts = match ttl_ms {
                        Some(ms) => SetOptions::new().ttl(Duration::from_millis(ms)),
                        None => SetOptions::new(),
                    };
                    let r = cache.set_with(key.to_string(), value, opts).await;
                    if bottom_writes_fail {
                        prop_assert!(
                            r.is_err(),
                            "step {step}: set must fail when the bottom refuses it"
                        );
                    } else {
                        prop_assert!(r.is_ok(), "step {step}: set failed: {r:?}");
                        model.map.insert(key, (value, ttl_ms.map(|ms| model.now + ms)));
                    }
                }
                Op::Delete { key } => {
                    let r = cache.delete(&key.to_string()).await;
                    prop_assert_eq!(r.ok(), Some(model.live(key).is_some()), "step {}: delete", step);
                    model.map.remove(&key);
                }
                Op::Get { key } => {
                    let r = cache.get(&key.to_string()).await;
                    let expected = model.live(key);
                    match r {
                        Ok(got) if !bottom_reads_fail => {
                            prop_assert_eq!(got, expected, "step {}: get {}", step, key)
                        }
                        // With the bottom failing, a cache may still answer: with the
                        // right value only.
                        Ok(got) => prop_assert!(
                            got.is_some() && got == expected,
                            "step {step}: get {key} = {got:?} while the bottom fails, model {expected:?}"
                        ),
                        Err(e) => prop_assert!(bottom_reads_fail, "step {step}: get {key} failed: {e}"),
                    }
                }
                Op::Exists { key } => {
                    let r = cache.exists(&key.to_string()).await;
                    if !bottom_reads_fail {
                        prop_assert_eq!(r.ok(), Some(model.live(key).is_some()), "step {}: exists", step);
                    }
                }
                Op::Advance { ms } => {
                    clock.advance(Duration::from_millis(ms));
                    model.now += ms;
                }
                Op::FailReads { layer, on } => {
                    faults[layer].fail_reads(on);
                    if layer == 2 {
                        bottom_reads_fail = on;
                    }
                }
                Op::FailWrites { layer, on } => {
                    faults[layer].fail_writes(on);
                    if layer == 2 {
                        bottom_writes_fail = on;
                    }
                }
                Op::Race {
                    key,
                    first,
                    second,
                    before,
                } => {
                    if bottom_writes_fail || bottom_reads_fail {
                        continue;
                    }
                    let gate = gates.hold(first.gate(), if before { Hold::Before } else { Hold::After });
                    let held = tokio::spawn(first.run(cache.clone(), key));
                    gate.reached().await;
                    let r = second.run(cache.clone(), key).await;
                    prop_assert!(r.is_ok(), "step {step}: the overtaking write failed: {r:?}");
                    gate.release();
                    let r = held.await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(r.is_ok(), "step {step}: the held write failed: {r:?}");
                    // The store's order: held before it, the held write lands last.
                    let last = if before { first } else { second };
                    match last.value() {
                        Some(v) => model.map.insert(key, (v, None)),
                        None => model.map.remove(&key),
                    };
                }
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn composer_matches_the_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
