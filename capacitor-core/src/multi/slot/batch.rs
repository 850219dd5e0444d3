//! Read batching ([`ReadBatching`]): the single-key reads of one layer that arrive within
//! a window go to it as one round trip.
//!
//! The first key opens a batch and starts a timer task (a short window is slept on a
//! blocking-pool thread, see [`PRECISE_BELOW`]). The batch is closed when the window ends
//! (the timer task sends it) or when it holds `max_keys` distinct keys (the
//! read that filled it spawns a task to send it); a read arriving after that opens the
//! next batch. Each read waits on a channel for its key's answer, so a caller that gives
//! up drops only its own wait: the round trip is on a task of its own.
//!
//! Coherence: a read joins only the open batch, one not sent yet, and a batch is sent
//! once it is closed, after every read in it was queued. So each read's round trip starts
//! after the read itself began, after the ticket the read path took for it (the promotion
//! guard's), and it can only see the state of the layer at some point since: never a
//! value that a write acknowledged before the read began had replaced. Answering a read
//! with the result of a batch already in flight when it arrived would break this (that
//! batch may have read the layer before the write), which is why there is no such path.

use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::sync::oneshot;

use super::super::Inner;
use super::Slot;
use crate::config::ReadBatching;
use crate::entry::Entry;
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::stats::Counter;

/// What one read gets.
type Answer<V> = Result<Option<Entry<V>>>;

/// The batcher of one layer.
pub(in crate::multi) struct Batcher<K, V> {
    config: ReadBatching,
    /// The composer and the layer's index in it, for the tasks (see [`attach`]).
    owner: Weak<Inner<K, V>>,
    index: usize,
    state: Mutex<State<K, V>>,
}

struct State<K, V> {
    /// The batch reads join, not sent yet.
    open: Option<Batch<K, V>>,
    next_id: u64,
}

struct Batch<K, V> {
    id: u64,
    /// Distinct keys, in the order they arrived.
    keys: Vec<K>,
    positions: FxHashMap<K, usize>,
    /// Each read's key (its position in `keys`) and where its answer goes.
    waiters: Vec<(usize, oneshot::Sender<Answer<V>>)>,
}

/// How a read that queued its key gets a batch on its way.
enum Dispatch<K, V> {
    /// Nothing to do: the batch was open already.
    Nothing,
    /// It opened the batch with this id: start its timer.
    Timer(u64),
    /// It filled the batch: send it now.
    Now(Batch<K, V>),
}

/// Gives each batcher of `slots` its composer and index, for the tasks it spawns.
pub(in crate::multi) fn attach<K, V>(
    mut slots: Box<[Slot<K, V>]>,
    me: &Weak<Inner<K, V>>,
) -> Box<[Slot<K, V>]> {
    for (i, slot) in slots.iter_mut().enumerate() {
        if let Some(batcher) = &mut slot.batcher {
            batcher.owner = me.clone();
            batcher.index = i;
        }
    }
    slots
}

impl<K, V> Batcher<K, V> {
    /// A batcher with `config` (validated by the builder), attached later.
    pub(in crate::multi) fn boxed(config: ReadBatching) -> Box<Self> {
        Box::new(Batcher {
            config,
            owner: Weak::new(),
            index: 0,
            state: Mutex::new(State {
                open: None,
                next_id: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<K, V>> {
        // Every critical section leaves the state consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K, V> Batcher<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// `slot.get(key)` through a batch (`slot` is the layer this batcher belongs to).
    pub(in crate::multi) async fn get(&self, slot: &Slot<K, V>, key: &K) -> Answer<V> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No task to send a batch from: one read, one round trip.
            return slot.get_direct(key).await;
        };
        let (tx, rx) = oneshot::channel();
        match self.enqueue(key, tx) {
            Dispatch::Nothing => {}
            Dispatch::Timer(id) => {
                let window = self.config.window;
                // From now, not from when the task first runs.
                let due = (
                    std::time::Instant::now() + window,
                    tokio::time::Instant::now() + window,
                );
                let (owner, index) = (self.owner.clone(), self.index);
                runtime.spawn(async move {
                    let _unsent = Unsent {
                        owner: owner.clone(),
                        index,
                        id,
                    };
                    // A batch filled (and sent) before this task ran needs no timer.
                    let open = |owner: &Weak<Inner<K, V>>| {
                        owner.upgrade().is_some_and(|inner| {
                            inner.slots[index]
                                .batcher
                                .as_deref()
                                .is_some_and(|b| b.lock().open.as_ref().is_some_and(|o| o.id == id))
                        })
                    };
                    if !open(&owner) {
                        return;
                    }
                    wait_until(due, window).await;
                    let Some(inner) = owner.upgrade() else { return };
                    let slot = &inner.slots[index];
                    let Some(batcher) = slot.batcher.as_deref() else {
                        return;
                    };
                    let due = {
                        let mut state = batcher.lock();
                        match &state.open {
                            Some(open) if open.id == id => state.open.take(),
                            // Filled and sent before the window ended.
                            _ => None,
                        }
                    };
                    if let Some(batch) = due {
                        run(slot, batch).await;
                    }
                });
            }
            Dispatch::Now(batch) => {
                let (owner, index) = (self.owner.clone(), self.index);
                runtime.spawn(async move {
                    // Without its composer the batch is dropped, and its reads (if any
                    // are left) read on their own below.
                    if let Some(inner) = owner.upgrade() {
                        run(&inner.slots[index], batch).await;
                    }
                });
            }
        }
        match rx.await {
            Ok(answer) => answer,
            // The batch was dropped unsent (its task did not run: the runtime is shutting
            // down, or the batcher was never attached): read alone, a read that begins now.
            Err(_) => slot.get_direct(key).await,
        }
    }

    /// Queues `key` in the open batch (opening one if none is), with `tx` for its answer.
    fn enqueue(&self, key: &K, tx: oneshot::Sender<Answer<V>>) -> Dispatch<K, V> {
        let mut state = self.lock();
        let state = &mut *state;
        let mut dispatch = Dispatch::Nothing;
        let batch = match &mut state.open {
            Some(batch) => batch,
            none => {
                let id = state.next_id;
                state.next_id = id.wrapping_add(1);
                dispatch = Dispatch::Timer(id);
                none.insert(Batch {
                    id,
                    keys: Vec::new(),
                    positions: FxHashMap::default(),
                    waiters: Vec::new(),
                })
            }
        };
        let position = match batch.positions.get(key) {
            Some(&p) => p,
            None => {
                batch.keys.push(key.clone());
                batch.positions.insert(key.clone(), batch.keys.len() - 1);
                batch.keys.len() - 1
            }
        };
        batch.waiters.push((position, tx));
        if batch.keys.len() >= self.config.max_keys {
            // Full: sent now. (Its timer, if it has one, finds another batch or none.)
            if let Some(full) = state.open.take() {
                return Dispatch::Now(full);
            }
        }
        dispatch
    }
}

/// Drops batch `id` if it is still open when the timer task ends without sending it (the
/// task panicked, say on a runtime without its time driver, or was dropped at shutdown):
/// its reads then read alone instead of waiting for a batch nothing would send.
struct Unsent<K, V> {
    owner: Weak<Inner<K, V>>,
    index: usize,
    id: u64,
}

impl<K, V> Drop for Unsent<K, V> {
    fn drop(&mut self) {
        let Some(inner) = self.owner.upgrade() else { return };
        let Some(batcher) = inner.slots.get(self.index).and_then(|s| s.batcher.as_deref()) else {
            return;
        };
        let stale = {
            let mut state = batcher.lock();
            match &state.open {
                Some(open) if open.id == self.id => state.open.take(),
                _ => None,
            }
        };
        // Outside the lock: its waiters wake and read alone.
        drop(stale);
    }
}

/// Windows shorter than this are timed on a blocking-pool thread: tokio's timer ticks in
/// milliseconds, and would end a 200 µs window 1 to 2 ms after it began.
const PRECISE_BELOW: Duration = Duration::from_millis(5);

/// Waits until `due` (by the system clock, and by tokio's, which a test may pause).
async fn wait_until(due: (std::time::Instant, tokio::time::Instant), window: Duration) {
    if window < PRECISE_BELOW {
        let (due, _) = due;
        let slept = tokio::task::spawn_blocking(move || {
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        })
        .await;
        if slept.is_ok() {
            return;
        }
    }
    tokio::time::sleep_until(due.1).await;
}

/// Sends `batch` to `slot`'s layer and gives each read its answer.
async fn run<K, V>(slot: &Slot<K, V>, batch: Batch<K, V>)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    slot.counters.incr(Counter::ReadBatch);
    let answers = fetch(slot, &batch.keys).await;
    deliver(slot, answers, batch.waiters);
}

/// One round trip for `keys`: `get` for one key, `get_many` for more, under the layer's
/// breaker and read timeout. Either every key's answer, or the error of the batch.
async fn fetch<K, V>(slot: &Slot<K, V>, keys: &[K]) -> Result<Vec<Answer<V>>>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    if let [key] = keys {
        return Ok(vec![slot.get_direct(key).await]);
    }
    match slot.get_many(keys).await {
        Ok(found) if found.len() == keys.len() => Ok(found.into_iter().map(Ok).collect()),
        Ok(found) => Err(Error::new(
            ErrorKind::Backend,
            Operation::GetMany,
            format!("layer returned {} results for {} keys", found.len(), keys.len()),
        )),
        Err(e) if e.kind() == ErrorKind::Decode => {
            // A batch cannot say which key held bad bytes: ask key by key, so that one
            // bad value costs only its own read. (The layer may have evicted the bad
            // entries already: count the batch's failure once.)
            slot.counters.incr(Counter::DecodeError);
            let mut answers = Vec::with_capacity(keys.len());
            for key in keys {
                answers.push(slot.get_direct(key).await);
            }
            Ok(answers)
        }
        Err(e) => Err(e),
    }
}

/// An answer several reads of one key share.
enum Shared<V> {
    Found(Option<Entry<V>>),
    Failed(Arc<Error>),
}

impl<V: Clone> Shared<V> {
    /// The answer of one read; `last` when no other read of the key is left to answer.
    fn answer(&mut self, last: bool) -> Answer<V> {
        match self {
            Shared::Found(entry) if last => Ok(entry.take()),
            Shared::Found(entry) => Ok(entry.clone()),
            Shared::Failed(err) => Err(Error::copy_for(err, Operation::Get)),
        }
    }
}

/// Gives each waiting read its key's answer (or its copy of the batch's error).
fn deliver<K, V: Clone>(
    slot: &Slot<K, V>,
    answers: Result<Vec<Answer<V>>>,
    waiters: Vec<(usize, oneshot::Sender<Answer<V>>)>,
) {
    let mut answers: Vec<Shared<V>> = match answers {
        Ok(answers) => answers
            .into_iter()
            .map(|a| match a {
                Ok(entry) => Shared::Found(entry),
                Err(e) => Shared::Failed(Arc::new(e)),
            })
            .collect(),
        Err(e) => {
            let shared = Arc::new(e);
            for (_, tx) in waiters {
                if tx.send(Err(Error::copy_for(&shared, Operation::Get))).is_ok() {
                    slot.counters.incr(Counter::BatchedRead);
                }
            }
            return;
        }
    };
    let mut left = vec![0usize; answers.len()];
    for &(p, _) in &waiters {
        left[p] += 1;
    }
    for (p, tx) in waiters {
        left[p] -= 1;
        if tx.send(answers[p].answer(left[p] == 0)).is_ok() {
            slot.counters.incr(Counter::BatchedRead);
        }
    }
}
