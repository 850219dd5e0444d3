//! The promotion race guard on the synchronous path (in-memory layers promote within one
//! poll): threads read a key that only L2 holds while another thread overwrites it. Once
//! the writer is done, L1 must never hold the old value.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use capacitor_core::testkit::poll_once;
use capacitor_core::{Layer, LayerConfig, MultiLayer};
use capacitor_memory::DashMapLayer;

#[test]
fn concurrent_promotions_never_leave_a_stale_l1() {
    let l1 = Arc::new(DashMapLayer::<u64, u64>::new());
    let l2 = Arc::new(DashMapLayer::<u64, u64>::new());
    let cache = MultiLayer::builder()
        .layer(LayerConfig::shared("l1", l1.clone()))
        .layer(LayerConfig::shared("l2", l2.clone()))
        .build()
        .expect("config");
    const ROUNDS: u64 = 3_000;
    const READERS: usize = 3;
    let mut stale = 0;
    for round in 0..ROUNDS {
        let key = round;
        let old = round * 2;
        let new = round * 2 + 1;
        poll_once(l2.set(&key, &old, None)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let start = Arc::new(Barrier::new(READERS + 1));
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let (cache, l1, stop, start) = (cache.clone(), l1.clone(), stop.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    // Drop the L1 copy, then read (and promote) again; a reader's last
                    // act is a read, so a stale promotion is left in place to be seen.
                    while !stop.load(Ordering::SeqCst) {
                        poll_once(l1.delete(&key)).unwrap();
                        let got = poll_once(cache.get(&key)).unwrap();
                        assert!(got == Some(old) || got == Some(new), "read {got:?}");
                    }
                })
            })
            .collect();
        start.wait();
        // Awaited, not polled once: a write waits for a promotion caught between its two
        // checks (a reader thread preempted there) before it returns.
        futures::executor::block_on(cache.set(key, new)).unwrap();
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            r.join().unwrap();
        }
        if let Some(e) = poll_once(l1.get(&key)).unwrap() {
            if e.value != new {
                stale += 1;
            }
        }
        assert_eq!(
            poll_once(cache.get(&key)).unwrap(),
            Some(new),
            "round {round}: stale read after the write"
        );
    }
    assert_eq!(stale, 0, "{stale} of {ROUNDS} rounds left the old value in L1");
}
