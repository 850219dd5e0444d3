//! The background work: the sweeper (a tokio task that deletes expired entries) and the
//! durable-commit thread of [`Durability::EveryMillis`](crate::Durability).
//!
//! The sweeper holds a `Weak` on the layer's state, so that it never keeps a dropped
//! layer's database open, and a [`Ticker`] of the layer's
//! [`Stop`](capacitor_core::background::Stop), so that it ends when the layer is closed
//! (the switch pulled) or dropped (the switch with it). The thread holds a `Weak` too, and
//! ends when its channel's sender, kept by the layer, is dropped.

use std::ops::Bound;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Weak;
use std::time::Duration;

use capacitor_core::background::Ticker;
use capacitor_core::{envelope, Operation, Result, Timestamp};

use crate::core::{Shared, Store};
use crate::error::redb_error;

/// Entries one sweep batch examines at most, so that a batch over a table of mostly live
/// entries still ends and yields.
const SCAN_PER_BATCH: usize = 10_000;

/// At every tick, walks the table and deletes expired entries, up to `batch` deletions per
/// write transaction, on the blocking pool.
pub(crate) async fn sweeper<C: Send + Sync + 'static>(
    shared: Weak<Shared<C>>,
    mut ticker: Ticker,
    batch: usize,
) {
    while ticker.tick().await {
        let mut cursor: Option<Vec<u8>> = None;
        loop {
            // Upgrade per batch, and never across an await: a dropped layer stops the pass.
            let (store, clock) = {
                let Some(shared) = shared.upgrade() else { return };
                let Ok(store) = shared.store(Operation::Delete) else {
                    return;
                };
                (store, shared.clock.clone())
            };
            let now = clock.now();
            let start = cursor.take();
            let pass = tokio::task::spawn_blocking(move || sweep_batch(&store, start, now, batch)).await;
            match pass {
                // More of the table to walk: go on from where the batch stopped.
                Ok(Ok(Some(next))) => cursor = Some(next),
                // The walk is done, or redb failed (retried on the next tick): the sweeper
                // has no caller to report to, and one failed pass loses nothing.
                Ok(Ok(None) | Err(_)) | Err(_) => break,
            }
            if ticker.stopped() {
                return;
            }
        }
    }
}

/// Deletes up to `max_deletes` expired entries after `start`, in one write transaction
/// (with their tags, when tags are on); the last key examined when the walk should go on,
/// `None` at the end of the table. The entries are found in a read transaction first, and
/// each is deleted only if it still holds the bytes found, so that a write that replaced
/// it meanwhile stays.
pub(crate) fn sweep_batch(
    store: &Store,
    start: Option<Vec<u8>>,
    now: Timestamp,
    max_deletes: usize,
) -> Result<Option<Vec<u8>>> {
    let op = Operation::Delete;
    let (expired, next) = store.read(op, |table| {
        let mut expired: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let Some(table) = table else {
            return Ok((expired, None));
        };
        let lower = match &start {
            Some(key) => Bound::Excluded(key.as_slice()),
            None => Bound::Unbounded,
        };
        let range = table
            .range::<&[u8]>((lower, Bound::Unbounded))
            .map_err(|e| redb_error(op, e))?;
        for (examined, item) in range.enumerate() {
            let (key, bytes) = item.map_err(|e| redb_error(op, e))?;
            let (key, bytes) = (key.value(), bytes.value());
            // Only capacitor's envelopes with a past expiry: foreign bytes are left to
            // `get`, which reports them.
            if let Ok((Some(at), _)) = envelope::unwrap(bytes) {
                if at <= now {
                    expired.push((key.to_vec(), bytes.to_vec()));
                }
            }
            if expired.len() >= max_deletes || examined + 1 >= SCAN_PER_BATCH {
                return Ok((expired, Some(key.to_vec())));
            }
        }
        Ok((expired, None))
    })?;
    if !expired.is_empty() {
        store.write(op, |t| {
            for (key, bytes) in &expired {
                t.remove_if_unchanged(key, bytes, op)?;
            }
            Ok(())
        })?;
    }
    Ok(next)
}

/// The thread of [`Durability::EveryMillis`](crate::Durability): every `interval`, makes
/// the commits since the last round durable (an empty `Immediate` commit, only when there
/// were some). Ends when the sender of `stop` is dropped, or the layer is.
pub(crate) fn durable_commits<C: Send + Sync + 'static>(
    shared: Weak<Shared<C>>,
    stop: Receiver<()>,
    interval: Duration,
) {
    loop {
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let store = {
            let Some(shared) = shared.upgrade() else { return };
            let Ok(store) = shared.store(Operation::Flush) else {
                return;
            };
            store
        };
        // A failed commit leaves the flag set, for the next round; there is no caller to
        // report to.
        let _ = store.make_durable(Operation::Flush);
    }
}
