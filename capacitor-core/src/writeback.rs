//! The pending-writes buffer of [`WritePolicy::Back`](crate::WritePolicy::Back).
//!
//! One map holds the latest pending write of every key (coalescing: last write wins) and
//! serves read-your-writes; a FIFO of keys gives the drain order. A key is in the FIFO at
//! most once while it waits, and once more while an older write of it is in flight, so
//! the FIFO stays within twice the map's bound however hot a key is. Entries leave the
//! map only once written, so memory is bounded by `queue_bound` and a failed batch is
//! never lost. The std mutex is never held across an await.

use std::collections::VecDeque;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use tokio::sync::Notify;

use crate::config::WriteBack;
use crate::entry::Timestamp;
use crate::error::{Error, ErrorKind, Operation, Result};

/// A write waiting for the lower layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pending<V> {
    Set { value: V, expires_at: Option<Timestamp> },
    Delete,
}

struct Slot<V> {
    op: Pending<V>,
    seq: u64,
    /// When the oldest unwritten write of this key was queued.
    since: Instant,
    /// The key waits in the FIFO (not yet taken by the drainer).
    queued: bool,
    /// Sequence number of the oldest write of this key not yet written: writes below it
    /// are on the lower layers (or were superseded by one that is).
    unwritten_from: u64,
    /// The store refused this write (not a temporary failure): it is set aside, out of
    /// the FIFO, until it is rewritten, retried or cleared. Reads still see it.
    refused: Option<Refusal>,
}

/// Why the store refused a write-back write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) kind: ErrorKind,
    pub(crate) reason: String,
    pub(crate) at: Instant,
}

struct State<K, V> {
    /// Fx rather than SipHash: this map is on every write-back `set`.
    map: FxHashMap<K, Slot<V>>,
    fifo: VecDeque<K>,
    next_seq: u64,
    closed: bool,
    /// Slots set aside (refused by the store): kept beyond `queue_bound`, which bounds
    /// the writes still to drain.
    refused: usize,
}

impl<K, V> State<K, V> {
    /// Writes still to drain (set-aside ones left out).
    fn pending(&self) -> usize {
        self.map.len() - self.refused
    }
}

/// A snapshot of the buffer for [`Stats`](crate::Stats).
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBackStats {
    /// Keys waiting to be written (in flight included).
    pub queue_depth: u64,
    /// Age of the oldest unwritten write.
    pub oldest_pending: Option<Duration>,
    /// Writes handed to the lower layers successfully (after coalescing).
    pub written: u64,
    /// Writes absorbed by a later write of the same key before they were written.
    pub coalesced: u64,
    /// Batches retried after a lower-layer failure.
    pub retries: u64,
    /// Reads answered from the buffer (read-your-writes after L1 eviction).
    pub buffer_hits: u64,
    /// Writes the store refused (not a temporary failure), set aside until they are
    /// rewritten, retried or cleared (see `MultiLayer::refused_writes`).
    pub refused: u64,
}

pub(crate) struct Queue<K, V> {
    pub(crate) config: WriteBack,
    state: Mutex<State<K, V>>,
    /// Wakes the drainer.
    pub(crate) queued: Notify,
    /// Wakes flushers and writers waiting for room, after each batch.
    progress: Notify,
    flushers: AtomicUsize,
    written: AtomicU64,
    coalesced: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) buffer_hits: AtomicU64,
}

impl<K: Hash + Eq + Clone, V: Clone> Queue<K, V> {
    pub(crate) fn new(config: WriteBack) -> Self {
        Queue {
            config,
            state: Mutex::new(State {
                map: FxHashMap::default(),
                fifo: VecDeque::new(),
                next_seq: 1,
                closed: false,
                refused: 0,
            }),
            queued: Notify::new(),
            progress: Notify::new(),
            flushers: AtomicUsize::new(0),
            written: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            buffer_hits: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<K, V>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `op` for `key`, waiting for room up to the enqueue timeout.
    pub(crate) async fn push(&self, key: &K, op: Pending<V>, what: Operation) -> Result<()> {
        // The fast path takes the lock once and wakes nobody unless the drainer has work
        // it does not know of: waking a task on another thread costs microseconds, more
        // than the whole write.
        let mut op = match self.try_push(key, op, what)? {
            None => return Ok(()),
            Some(op) => op,
        };
        // A timeout too long to express is no timeout: wait as long as it takes.
        let deadline = tokio::time::Instant::now().checked_add(self.config.enqueue_timeout);
        // A full queue is drained now, whatever its delay.
        self.queued.notify_one();
        loop {
            let mut progress = std::pin::pin!(self.progress.notified());
            progress.as_mut().enable();
            op = match self.try_push(key, op, what)? {
                None => return Ok(()),
                Some(op) => op,
            };
            let waited = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, progress).await.is_ok(),
                None => {
                    progress.await;
                    true
                }
            };
            if !waited {
                return Err(Error::new(
                    ErrorKind::QueueFull,
                    what,
                    format!(
                        "write-back queue full ({} keys) for {:?}",
                        self.config.queue_bound, self.config.enqueue_timeout
                    ),
                ));
            }
        }
    }

    /// Queues `op` if there is room; gives it back when the queue is full.
    fn try_push(&self, key: &K, op: Pending<V>, what: Operation) -> Result<Option<Pending<V>>> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.closed {
            return Err(Error::closed(what));
        }
        let seq = st.next_seq;
        let was_idle = st.fifo.is_empty();
        if let Some(slot) = st.map.get_mut(key) {
            slot.op = op;
            slot.seq = seq;
            if slot.refused.take().is_some() {
                // A new write replaces one the store refused: it is drained as usual.
                slot.since = Instant::now();
                st.refused -= 1;
            }
            let requeue = !slot.queued;
            slot.queued = true;
            if requeue {
                st.fifo.push_back(key.clone());
            } else {
                self.coalesced.fetch_add(1, Ordering::Relaxed);
            }
        } else if st.pending() < self.config.queue_bound {
            st.map.insert(
                key.clone(),
                Slot {
                    op,
                    seq,
                    since: Instant::now(),
                    queued: true,
                    unwritten_from: seq,
                    refused: None,
                },
            );
            st.fifo.push_back(key.clone());
        } else {
            return Ok(Some(op));
        }
        st.next_seq += 1;
        // The drainer sleeps until the oldest write is due: it needs waking only when the
        // queue stops being idle or a batch fills up.
        let wake = was_idle || st.fifo.len() == self.config.batch_size;
        drop(guard);
        if wake {
            self.queued.notify_one();
        }
        Ok(None)
    }

    /// The latest pending write of `key`.
    pub(crate) fn lookup(&self, key: &K) -> Option<Pending<V>> {
        self.lock().map.get(key).map(|s| s.op.clone())
    }

    /// The pending writes whose key satisfies `filter` (for scans).
    pub(crate) fn matching(&self, filter: impl Fn(&K) -> bool) -> Vec<(K, Pending<V>)> {
        self.lock()
            .map
            .iter()
            .filter(|(k, _)| filter(k))
            .map(|(k, s)| (k.clone(), s.op.clone()))
            .collect()
    }

    /// How long the drainer should wait before taking a batch: `None` when nothing is
    /// queued, zero when a batch is due.
    pub(crate) fn due_in(&self) -> Option<Duration> {
        let st = self.lock();
        let oldest = st.fifo.front().and_then(|k| st.map.get(k)).map(|s| s.since)?;
        if st.fifo.len() >= self.config.batch_size
            || st.pending() >= self.config.queue_bound
            || st.closed
            || self.flushers.load(Ordering::Acquire) > 0
        {
            return Some(Duration::ZERO);
        }
        Some(self.config.max_delay.saturating_sub(oldest.elapsed()))
    }

    /// Takes up to `batch_size` keys off the FIFO and marks them in flight.
    pub(crate) fn take_batch(&self) -> Vec<(K, Pending<V>, u64)> {
        let mut st = self.lock();
        let mut batch = Vec::new();
        while batch.len() < self.config.batch_size {
            let Some(key) = st.fifo.pop_front() else { break };
            if let Some(slot) = st.map.get_mut(&key) {
                slot.queued = false;
                batch.push((key, slot.op.clone(), slot.seq));
            }
        }
        batch
    }

    /// Marks a batch written: entries not rewritten meanwhile leave the buffer.
    pub(crate) fn complete(&self, batch: &[(K, Pending<V>, u64)]) {
        let mut st = self.lock();
        for (key, _, seq) in batch {
            let done = match st.map.get_mut(key) {
                Some(slot) if slot.seq == *seq => true,
                Some(slot) => {
                    // A newer write arrived while this one was in flight: it waits in
                    // the FIFO; its age starts now.
                    slot.unwritten_from = seq + 1;
                    slot.since = Instant::now();
                    false
                }
                None => false,
            };
            if done {
                st.map.remove(key);
            }
        }
        drop(st);
        self.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.progress.notify_waiters();
    }

    /// The store refused the write of `key` with sequence `seq` (not a temporary
    /// failure): it is set aside, unless a newer write of the key replaced it meanwhile
    /// (that one is drained as usual). Returns whether it was set aside.
    pub(crate) fn refuse(&self, key: &K, seq: u64, refusal: Refusal) -> bool {
        let mut guard = self.lock();
        let st = &mut *guard;
        let set_aside = match st.map.get_mut(key) {
            Some(slot) if slot.seq == seq => {
                if slot.refused.replace(refusal).is_none() {
                    st.refused += 1;
                }
                true
            }
            Some(slot) => {
                slot.unwritten_from = seq + 1;
                false
            }
            None => false,
        };
        drop(guard);
        self.progress.notify_waiters();
        set_aside
    }

    /// The writes set aside, oldest first.
    pub(crate) fn refused(&self) -> Vec<(K, Refusal)> {
        let st = self.lock();
        let mut out: Vec<(K, Refusal)> = st
            .map
            .iter()
            .filter_map(|(k, s)| s.refused.clone().map(|r| (k.clone(), r)))
            .collect();
        out.sort_by_key(|(_, r)| r.at);
        out
    }

    /// Queues the writes set aside again; how many.
    pub(crate) fn retry_refused(&self) -> usize {
        let mut st = self.lock();
        let st = &mut *st;
        let mut n = 0;
        for (key, slot) in st.map.iter_mut() {
            if slot.refused.take().is_some() {
                st.refused -= 1;
                slot.queued = true;
                slot.since = Instant::now();
                st.fifo.push_back(key.clone());
                n += 1;
            }
        }
        if n > 0 {
            self.queued.notify_one();
        }
        n
    }

    /// Drops the writes set aside from the buffer; their keys.
    pub(crate) fn clear_refused(&self) -> Vec<K> {
        let mut st = self.lock();
        let keys: Vec<K> = st
            .map
            .iter()
            .filter(|(_, s)| s.refused.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for key in &keys {
            st.map.remove(key);
        }
        st.refused = 0;
        drop(st);
        self.progress.notify_waiters();
        keys
    }

    /// Waits until every write queued before the call has been written, or set aside
    /// because the store refused it (then an error names how many).
    pub(crate) async fn flush(&self) -> Result<()> {
        let target = self.lock().next_seq;
        self.flushers.fetch_add(1, Ordering::AcqRel);
        self.queued.notify_one();
        let outcome = tokio::time::timeout(self.config.flush_timeout, async {
            loop {
                let mut progress = std::pin::pin!(self.progress.notified());
                progress.as_mut().enable();
                if !self
                    .lock()
                    .map
                    .values()
                    .any(|s| s.unwritten_from < target && s.refused.is_none())
                {
                    return;
                }
                progress.await;
            }
        })
        .await;
        self.flushers.fetch_sub(1, Ordering::AcqRel);
        if outcome.is_ok() {
            let refused = self
                .lock()
                .map
                .values()
                .filter(|s| s.unwritten_from < target && s.refused.is_some())
                .count();
            if refused > 0 {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    Operation::Flush,
                    format!(
                        "{refused} writes were refused by the store and set aside; \
                         see MultiLayer::refused_writes"
                    ),
                ));
            }
        }
        outcome.map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                Operation::Flush,
                format!(
                    "write-back flush did not finish within {:?}; {} keys still pending",
                    self.config.flush_timeout,
                    self.lock().map.len()
                ),
            )
        })
    }

    /// Stops accepting writes.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.queued.notify_one();
        self.progress.notify_waiters();
    }

    /// Closed, with nothing left to drain (writes set aside stay for `unwritten_keys`).
    pub(crate) fn is_closed_and_empty(&self) -> bool {
        let st = self.lock();
        st.closed && st.pending() == 0
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.lock().closed
    }

    /// Nothing left to drain (writes set aside do not count: no drain can write them).
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().pending() == 0
    }

    /// The keys whose latest write is not written yet.
    pub(crate) fn unwritten_keys(&self) -> Vec<K> {
        self.lock().map.keys().cloned().collect()
    }

    pub(crate) fn stats(&self) -> WriteBackStats {
        let st = self.lock();
        WriteBackStats {
            queue_depth: st.map.len() as u64,
            oldest_pending: st.map.values().map(|s| s.since.elapsed()).max(),
            written: self.written.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            buffer_hits: self.buffer_hits.load(Ordering::Relaxed),
            refused: st.refused as u64,
        }
    }
}
