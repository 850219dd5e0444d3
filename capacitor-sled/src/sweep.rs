//! The background tasks: the sweeper (deletes expired entries) and, for a database the
//! caller opened, the periodic flusher of [`FlushPolicy::EveryMillis`](crate::FlushPolicy).
//!
//! Both hold a `Weak` on the layer's state, so that they never keep a dropped layer's
//! database open, and a [`Ticker`] of the layer's [`Stop`](capacitor_core::background::Stop),
//! so that they end when the layer is closed (the switch pulled) or dropped (the switch
//! with it).

use std::ops::Bound;
use std::sync::Weak;

use capacitor_core::background::Ticker;
use capacitor_core::{envelope, Operation, Result, Timestamp};
use sled::IVec;

use crate::core::{flush_tree, Shared, Trees};
use crate::error::sled_error;
use crate::tags::remove_if_unchanged;

/// Entries one sweep batch examines at most, so that a batch over a tree of mostly live
/// entries still ends and yields.
const SCAN_PER_BATCH: usize = 10_000;

/// At every tick, walks the tree and deletes expired entries, `batch` deletions at a time
/// on the blocking pool.
pub(crate) async fn sweeper<C: Send + Sync + 'static>(
    shared: Weak<Shared<C>>,
    mut ticker: Ticker,
    batch: usize,
) {
    while ticker.tick().await {
        let mut cursor: Option<IVec> = None;
        loop {
            // Upgrade per batch, and never across an await: a dropped layer stops the pass.
            let (trees, clock) = {
                let Some(shared) = shared.upgrade() else { return };
                let Ok(trees) = shared.trees(Operation::Delete) else {
                    return;
                };
                (trees, shared.clock.clone())
            };
            let now = clock.now();
            let start = cursor.take();
            let pass = tokio::task::spawn_blocking(move || sweep_batch(&trees, start, now, batch)).await;
            match pass {
                // More of the tree to walk: go on from where the batch stopped.
                Ok(Ok(Some(next))) => cursor = Some(next),
                // The walk is done, or sled failed (retried on the next tick): the sweeper
                // has no caller to report to, and one failed pass loses nothing.
                Ok(Ok(None) | Err(_)) | Err(_) => break,
            }
            if ticker.stopped() {
                return;
            }
        }
    }
}

/// Deletes up to `max_deletes` expired entries after `start` (with their tags, in one
/// transaction per entry, when tags are on); the last key examined when the walk should
/// go on, `None` at the end of the tree.
pub(crate) fn sweep_batch(
    trees: &Trees,
    start: Option<IVec>,
    now: Timestamp,
    max_deletes: usize,
) -> Result<Option<IVec>> {
    let lower = match start {
        Some(key) => Bound::Excluded(key),
        None => Bound::Unbounded,
    };
    let mut deleted = 0;
    for (examined, item) in trees.data.range::<IVec, _>((lower, Bound::Unbounded)).enumerate() {
        let (key, bytes) = item.map_err(|e| sled_error(Operation::Delete, e))?;
        // Only capacitor's envelopes with a past expiry: foreign bytes are left to `get`,
        // which reports them.
        if let Ok((Some(at), _)) = envelope::unwrap(&bytes) {
            if at <= now {
                // Compare-and-swap: a write that replaced the entry since we read it stays.
                remove_if_unchanged(trees, &key, &bytes, Operation::Delete)?;
                deleted += 1;
            }
        }
        if deleted >= max_deletes || examined + 1 >= SCAN_PER_BATCH {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

/// Flushes at every tick ([`FlushPolicy::EveryMillis`](crate::FlushPolicy) on a database
/// the caller opened, whose own flusher the layer cannot configure).
pub(crate) async fn flusher<C: Send + Sync + 'static>(shared: Weak<Shared<C>>, mut ticker: Ticker) {
    while ticker.tick().await {
        let tree = {
            let Some(shared) = shared.upgrade() else { return };
            let Ok(tree) = shared.tree(Operation::Flush) else {
                return;
            };
            tree
        };
        // A failed flush is retried on the next tick; there is no caller to report to.
        let _ = flush_tree(&tree, Operation::Flush).await;
    }
}
