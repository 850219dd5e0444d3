//! Write-back's drain task: writing the buffered writes to the layers below L1.

use std::hash::Hash;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::write::{self, Writes};
use super::Inner;
use crate::error::{Error, ErrorKind, Result};
use crate::writeback::{Pending, Queue, Refusal};

/// Write-back's drain task: takes due batches off the buffer and writes them to the layers
/// below L1, retrying a refused batch with exponential backoff. It ends once the composer
/// is closed, or once every handle is dropped and the buffer is empty.
pub(super) async fn drain<K, V>(inner: Arc<Inner<K, V>>)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let Some(queue) = inner.queue.as_ref() else { return };
    // How often an idle drainer looks for an abandoned composer.
    const IDLE_CHECK: Duration = Duration::from_millis(250);
    loop {
        match queue.due_in() {
            None => {
                if queue.is_closed_and_empty() || (Arc::strong_count(&inner) == 1 && queue.is_empty()) {
                    return;
                }
                let _ = tokio::time::timeout(IDLE_CHECK, queue.queued.notified()).await;
            }
            Some(wait) if !wait.is_zero() => {
                let _ = tokio::time::timeout(wait, queue.queued.notified()).await;
            }
            Some(_) => {
                let batch = queue.take_batch();
                if !drain_batch(&inner, queue, batch).await {
                    return;
                }
            }
        }
    }
}

/// Whether `err` is the store refusing the data itself (retrying cannot succeed), not a
/// failure of the moment.
fn is_refusal(err: &Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::InvalidInput | ErrorKind::ValueTooLarge | ErrorKind::Encode
    )
}

/// Writes one batch below L1. A temporary failure is retried with exponential backoff;
/// a refusal splits the batch in halves until the writes refused are found, which are
/// set aside while the rest is written. `false` when the composer closed meanwhile with
/// the batch still refused (it stays in the buffer, where `unwritten_keys` reports it).
async fn drain_batch<K, V>(inner: &Inner<K, V>, queue: &Queue<K, V>, batch: Vec<(K, Pending<V>, u64)>) -> bool
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let mut work = vec![batch];
    while let Some(batch) = work.pop() {
        let mut backoff = queue.config.retry_initial;
        loop {
            match write_below(inner, &batch).await {
                Ok(()) => {
                    queue.complete(&batch);
                    break;
                }
                Err(e) if is_refusal(&e) && batch.len() > 1 => {
                    let mut first = batch;
                    let second = first.split_off(first.len() / 2);
                    work.push(second);
                    work.push(first);
                    break;
                }
                Err(e) if is_refusal(&e) => {
                    if let Some((key, _, seq)) = batch.first() {
                        inner.write_refused(queue, key, *seq, &e);
                    }
                    break;
                }
                Err(_) if inner.closed.load(Ordering::Acquire) && queue.is_closing() => return false,
                Err(e) => {
                    crate::observe::drain_retry(&inner.name, &e);
                    queue.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(queue.config.retry_max);
                }
            }
        }
    }
    true
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The store refused the drained write of `key`: set it aside and tell the user.
    fn write_refused(&self, queue: &Queue<K, V>, key: &K, seq: u64, err: &Error) {
        let refusal = Refusal {
            kind: err.kind(),
            reason: err.to_string(),
            at: std::time::Instant::now(),
        };
        // Set aside, or (when a newer write of the key replaced it meanwhile) dropped for
        // that newer write, which is drained as usual: told either way.
        queue.refuse(key, seq, refusal);
        crate::observe::write_refused(&self.name, err);
        if let Some(listener) = &self.on_refused {
            listener(key, err);
        }
    }
}

/// Batches group sets by TTL; remaining TTLs are rounded down to this, so that writes
/// made moments apart with the same TTL share one batch call (they may expire up to this
/// much earlier in the lower layers).
const TTL_GRANULARITY_MS: u128 = 100;

/// Writes one drained batch to every writable layer below L1 through the write path: the
/// authoritative layer's error fails the batch (it will be retried); a cache layer's error
/// is counted and the batch's keys invalidated there.
async fn write_below<K, V>(inner: &Inner<K, V>, batch: &[(K, Pending<V>, u64)]) -> Result<()>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let now = inner.clock.now();
    let mut sets: std::collections::BTreeMap<Option<Duration>, Vec<(K, V)>> = Default::default();
    let mut deletes = Vec::new();
    for (key, op, _) in batch {
        match op {
            Pending::Set { value, expires_at } => {
                match expires_at.map(|at| at.saturating_duration_since(now)) {
                    // Expired while pending: the lower layers must not keep an older value.
                    Some(Duration::ZERO) => deletes.push(key.clone()),
                    Some(left) => {
                        let ms = left.as_millis();
                        let rounded = (ms - ms % TTL_GRANULARITY_MS).max(1);
                        let ttl = Duration::from_millis(u64::try_from(rounded).unwrap_or(u64::MAX));
                        sets.entry(Some(ttl))
                            .or_default()
                            .push((key.clone(), value.clone()));
                    }
                    None => sets.entry(None).or_default().push((key.clone(), value.clone())),
                }
            }
            Pending::Delete => deletes.push(key.clone()),
        }
    }
    let writes = Writes::Drained {
        sets: &sets,
        deletes: &deletes,
    };
    let scope = write::WriteScope::enter(inner, &writes, 1..=inner.authoritative);
    write::fan_out(scope, Some(inner.authoritative)).await?;
    Ok(())
}
