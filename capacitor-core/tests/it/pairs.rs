//! Every pair of composer operations on one key, forced: operation A is held at the
//! store (before the store sees it, or after it answered and before A returns) while
//! operation B runs to completion; then A goes on. After both return (and a refresh
//! started by either has finished, and a write-back buffer is flushed):
//!
//! - L1 holds nothing for the key, or what the store holds;
//! - once the store fails, a read answers with what the store held (its fail-safe copy)
//!   or fails, never with another value.
//!
//! The operations: set, delete, set_many, delete_many, a transaction's commit, a read
//! that copies up (promotion, and the fail-safe record of what it read), a load
//! (`get_or_load` on a missing key), a refresh-ahead of a copy near its expiry, and under
//! write-back the drain. Pairs of two reads are left out (neither changes the key). Each
//! case is named in the failure message; all failures are reported at once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use capacitor_core::testkit::{within, Faults, FaultyLayer, Gate, GateLayer, GateOp, Gates, Hold, MapLayer};
use capacitor_core::{
    FailSafe, Layer, LayerConfig, ManualClock, MultiLayer, SetOptions, WriteBack, WritePolicy,
};
use tokio::sync::Notify;

const LIMIT: Duration = Duration::from_secs(10);
const KEY: &str = "k";
const OTHER: &str = "other";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Set,
    Delete,
    SetMany,
    DeleteMany,
    Commit,
    /// A read that misses L1 and copies the store's value up (and records it for
    /// fail-safe).
    Promote,
    /// `get_or_load` of a key nobody holds: the loader's value is filled in.
    Load,
    /// A hit on a copy near its expiry: a background read renews it from the store.
    Refresh,
    /// Under write-back: the buffer's write of the key into the store.
    Drain,
}

impl Op {
    fn writes(self) -> bool {
        !matches!(self, Op::Promote | Op::Load | Op::Refresh)
    }
}

#[derive(Clone, Copy)]
struct Case {
    held: Op,
    hold: Hold,
    then: Op,
    promotion: bool,
    write_back: bool,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} held {:?} the store, {:?} overtakes it (promotion {}, {})",
            self.held,
            self.hold,
            self.then,
            if self.promotion { "on" } else { "off" },
            if self.write_back {
                "write-back"
            } else {
                "write-through"
            },
        )
    }
}

type Cache = MultiLayer<String, u32>;

struct Rig {
    cache: Cache,
    l1: Arc<MapLayer<String, u32>>,
    store: Arc<MapLayer<String, u32>>,
    gates: Arc<Gates>,
    faults: Arc<Faults>,
    clock: ManualClock,
}

/// L1 (a map, 10 s TTL; with promotion on, refresh in its last 3 s) over a gated,
/// faulty store, with fail-safe; the key holds 1 everywhere to begin with.
async fn rig(case: Case) -> Rig {
    let clock = ManualClock::new(1_000_000);
    let l1 = Arc::new(MapLayer::with_clock(clock.clone()));
    let store = Arc::new(MapLayer::with_clock(clock.clone()));
    let faulty = FaultyLayer::shared(store.clone() as Arc<dyn Layer<String, u32>>);
    let faults = faulty.faults();
    let gated = GateLayer::new(faulty);
    let gates = gated.gates();
    let mut builder = MultiLayer::builder()
        .clock(clock.clone())
        .layer(
            LayerConfig::shared("l1", l1.clone() as Arc<dyn Layer<String, u32>>).ttl(Duration::from_secs(10)),
        )
        .layer(LayerConfig::new("store", gated))
        .promotion(case.promotion)
        .fail_safe(FailSafe::new(Duration::from_secs(600)));
    // Refresh-ahead renews by promotion: only with promotion on.
    if case.promotion {
        builder = builder.refresh_ahead(Duration::from_secs(3));
    }
    if case.write_back {
        builder = builder.write_policy(WritePolicy::Back(
            WriteBack::new().max_delay(Duration::from_secs(3600)),
        ));
    }
    let cache = builder.build().expect("valid composer");
    let rig = Rig {
        cache,
        l1,
        store,
        gates,
        faults,
        clock,
    };
    rig.cache.set(KEY.into(), 1).await.unwrap();
    rig.cache.flush().await.unwrap();
    rig
}

/// What an operation needs in place before it starts (done before any hold is armed).
async fn prepare(r: &Rig, op: Op) {
    match op {
        // The next read misses L1 and goes to the store.
        Op::Promote => drop(r.l1.delete(&KEY.into()).await.unwrap()),
        // Nobody holds the key.
        Op::Load => {
            r.cache.delete(&KEY.into()).await.unwrap();
            r.cache.flush().await.unwrap();
        }
        // L1's copy (written by `rig`, 10 s TTL) is in its last 3 s.
        Op::Refresh => {
            r.cache.set(KEY.into(), 1).await.unwrap();
            r.cache.flush().await.unwrap();
            r.clock.advance(Duration::from_secs(8));
        }
        _ => {}
    }
}

/// Arms the gate that holds `op` at the store.
fn arm(r: &Rig, op: Op, hold: Hold) -> Option<Gate> {
    let gate_op = match op {
        Op::Set => GateOp::Set,
        Op::Delete => GateOp::Delete,
        Op::SetMany => GateOp::SetMany,
        Op::DeleteMany => GateOp::DeleteMany,
        Op::Commit => GateOp::Atomic,
        Op::Promote | Op::Refresh => GateOp::Get,
        // The drain writes a set through set_many (a delete through delete_many).
        Op::Drain => GateOp::SetMany,
        // Held in the loader itself (see `run`).
        Op::Load => return None,
    };
    Some(r.gates.hold(gate_op, hold))
}

/// What `run` works on.
#[derive(Clone)]
struct On {
    cache: Cache,
    l1: Arc<MapLayer<String, u32>>,
    clock: ManualClock,
    /// Run as the overtaking operation: a read sets up its own miss or expiry.
    overtaking: bool,
}

/// Runs `op` with value `v`; a load waits for `loader` to be notified, when given.
async fn run(on: On, op: Op, v: u32, loader: Option<(Arc<Notify>, Arc<Notify>)>) {
    let key: String = KEY.into();
    let cache = on.cache;
    if on.overtaking {
        match op {
            // An eviction from L1 (not a composer write): the read goes to the store.
            Op::Promote => drop(on.l1.delete(&key).await.unwrap()),
            Op::Refresh => on.clock.advance(Duration::from_secs(8)),
            _ => {}
        }
    }
    match op {
        Op::Set => cache.set(key, v).await.unwrap(),
        Op::Delete => drop(cache.delete(&key).await.unwrap()),
        Op::SetMany => cache
            .set_many(&[(key, v), (OTHER.into(), v)], SetOptions::default())
            .await
            .unwrap(),
        Op::DeleteMany => drop(cache.delete_many(&[key, OTHER.into()]).await.unwrap()),
        Op::Commit => {
            let mut tx = cache.begin().unwrap();
            tx.set(key, v);
            tx.commit().await.unwrap();
        }
        Op::Promote | Op::Refresh => drop(cache.get(&key).await.unwrap()),
        Op::Load => {
            cache
                .get_or_load(&key, move || async move {
                    if let Some((started, finish)) = loader {
                        started.notify_one();
                        finish.notified().await;
                    }
                    v
                })
                .await
                .unwrap();
        }
        Op::Drain => {
            cache.set(key, v).await.unwrap();
            cache.flush().await.unwrap();
        }
    }
}

/// Waits (bounded) until no refresh-ahead runs.
async fn refreshes_done(cache: &Cache) {
    for _ in 0..5_000 {
        if cache.stats().refresh.is_none_or(|s| s.in_flight == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("a refresh is still running after 5 s");
}

/// Plays one case; the violations it finds.
async fn play(case: Case) -> Vec<String> {
    let r = rig(case).await;
    prepare(&r, case.held).await;
    let gate = arm(&r, case.held, case.hold);
    let loader = (case.held == Op::Load).then(|| (Arc::new(Notify::new()), Arc::new(Notify::new())));
    let on = |overtaking| On {
        cache: r.cache.clone(),
        l1: r.l1.clone(),
        clock: r.clock.clone(),
        overtaking,
    };
    let held = tokio::spawn(run(on(false), case.held, 10, loader.clone()));
    match (&gate, &loader) {
        (Some(gate), _) => gate.reached().await,
        (None, Some((started, _))) => within(LIMIT, started.notified()).await,
        (None, None) => unreachable!("every held operation is held somewhere"),
    }
    within(LIMIT, run(on(true), case.then, 20, None)).await;
    if let Some(gate) = &gate {
        gate.release();
    }
    if let Some((_, finish)) = &loader {
        finish.notify_one();
    }
    within(LIMIT, held).await.unwrap();
    refreshes_done(&r.cache).await;
    within(LIMIT, r.cache.flush()).await.unwrap();

    let mut found = Vec::new();
    for key in [KEY, OTHER] {
        let key: String = key.into();
        let store = r.store.raw_entry(&key).map(|e| e.value);
        if let Some(l1) = r.l1.raw_entry(&key).map(|e| e.value) {
            if Some(l1) != store {
                found.push(format!("{case}: L1 holds {l1} for {key}, the store {store:?}"));
            }
        }
        match within(LIMIT, r.cache.get(&key)).await {
            Ok(got) if got != store => found.push(format!(
                "{case}: a read of {key} gave {got:?}, the store holds {store:?}"
            )),
            Ok(_) => {}
            Err(e) => found.push(format!("{case}: a read of {key} failed: {e}")),
        }
        // The fail-safe copy: with L1 emptied and the store failing, the read answers
        // with what the store held, or fails.
        r.l1.delete(&key).await.unwrap();
        r.faults.fail_reads(true);
        let stale = within(LIMIT, r.cache.get(&key)).await;
        r.faults.fail_reads(false);
        if let Ok(got) = stale {
            if got != store {
                found.push(format!(
                    "{case}: with the store failing, a read of {key} gave {got:?}; the store holds {store:?}"
                ));
            }
        }
    }
    found
}

fn cases() -> Vec<Case> {
    let through = [
        Op::Set,
        Op::Delete,
        Op::SetMany,
        Op::DeleteMany,
        Op::Commit,
        Op::Promote,
        Op::Load,
        Op::Refresh,
    ];
    let mut out = Vec::new();
    for promotion in [true, false] {
        let reads = |op: Op| promotion || op != Op::Refresh;
        for held in through.into_iter().filter(|op| reads(*op)) {
            for then in through.into_iter().filter(|op| reads(*op)) {
                if !held.writes() && !then.writes() {
                    continue;
                }
                // A load is held in its loader: one position.
                let holds: &[Hold] = if held == Op::Load {
                    &[Hold::Before]
                } else {
                    &[Hold::Before, Hold::After]
                };
                for &hold in holds {
                    out.push(Case {
                        held,
                        hold,
                        then,
                        promotion,
                        write_back: false,
                    });
                }
            }
        }
        // Under write-back: the drain held, every write form and read overtaking it.
        let overtaking = [
            Op::Set,
            Op::Delete,
            Op::SetMany,
            Op::DeleteMany,
            Op::Promote,
            Op::Load,
            Op::Refresh,
        ];
        for then in overtaking.into_iter().filter(|op| reads(*op)) {
            for hold in [Hold::Before, Hold::After] {
                out.push(Case {
                    held: Op::Drain,
                    hold,
                    then,
                    promotion,
                    write_back: true,
                });
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pair_of_operations_leaves_every_layer_coherent() {
    let cases = cases();
    let mut violations = Vec::new();
    for case in &cases {
        violations.extend(play(*case).await);
    }
    assert!(
        violations.is_empty(),
        "{} of {} cases broke coherence:\n{}",
        violations.len(),
        cases.len(),
        violations.join("\n")
    );
}
