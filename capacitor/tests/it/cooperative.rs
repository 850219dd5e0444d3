//! `MultiLayerBuilder::cooperative`: a task looping over L1 hits lets the other tasks on
//! its worker run when it is on, and (the trade it exists for) does not when it is off.

#![cfg(feature = "memory")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use capacitor::memory::DashMapLayer;
use capacitor::{LayerConfig, MultiLayer};

/// On one thread: a task does `hits` L1 hits without awaiting anything else, another
/// task sets a flag. Returns how many hits were done when the flag task first ran.
fn hits_before_the_other_task_ran(cooperative: bool, hits: u64) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cache = MultiLayer::<u64, u64>::builder()
            .layer(LayerConfig::new("l1", DashMapLayer::new()))
            .cooperative(cooperative)
            .build()
            .unwrap();
        cache.set(1, 1).await.unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(AtomicU64::new(u64::MAX));
        let started = Arc::new(AtomicBool::new(false));
        let looping = tokio::spawn({
            let (done, started) = (Arc::clone(&done), Arc::clone(&started));
            async move {
                started.store(true, Ordering::SeqCst);
                for i in 0..hits {
                    assert_eq!(cache.get(&1).await.unwrap(), Some(1));
                    done.store(i + 1, Ordering::SeqCst);
                }
            }
        });
        let other = tokio::spawn({
            let (done, seen) = (Arc::clone(&done), Arc::clone(&seen));
            async move { seen.store(done.load(Ordering::SeqCst), Ordering::SeqCst) }
        });
        looping.await.unwrap();
        other.await.unwrap();
        assert!(started.load(Ordering::SeqCst));
        seen.load(Ordering::SeqCst)
    })
}

#[test]
fn a_loop_of_hits_yields_to_other_tasks_when_cooperative() {
    let hits = 100_000;
    let seen = hits_before_the_other_task_ran(true, hits);
    assert!(seen < hits, "the other task ran only after all {hits} hits");
    // tokio's budget is 128 units per turn.
    assert!(seen <= 1_000, "the other task ran after {seen} hits");
}

#[test]
fn without_it_a_loop_of_hits_keeps_its_thread() {
    let hits = 10_000;
    assert_eq!(hits_before_the_other_task_ran(false, hits), hits);
}
