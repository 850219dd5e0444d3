//! Auto-recovery of shared cache layers: keys whose invalidation failed on a cache layer
//! reached over the network (it was down, timed out or skipped by its breaker) are kept
//! and removed there once the layer answers again, by a background task, in the order
//! they failed; then they are announced again on the invalidation bus, so that another
//! instance that copied the old value from that layer into its L1 meanwhile drops it.
//!
//! This instance's reads pass the layer by for those keys meanwhile (its suspect marks);
//! other instances read the layer as it is until the replay, which is why it runs as soon
//! as the layer answers. Bounded: past the bound, the keys are replaced by one clear of
//! the whole layer (and of every instance's in-process layers through the bus).

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use rustc_hash::FxBuildHasher;
use tokio::sync::Notify;

use super::Inner;

/// Keys per replayed delete.
const REPLAY_BATCH: usize = 256;
/// The wait between attempts while the layer fails, doubling up to the maximum: short,
/// since other instances may read the old values until the replay.
const RETRY_MIN: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_millis(200);
/// How often an idle task checks that its composer still exists.
const IDLE_CHECK: Duration = Duration::from_millis(250);

/// One layer's keys to remove once it answers.
pub(super) struct Replay<K> {
    bound: usize,
    state: Mutex<ReplayState<K>>,
    len: AtomicUsize,
    /// The last attempt failed (the layer is still down).
    failing: AtomicBool,
    pub(super) replayed: AtomicU64,
    pub(super) overflows: AtomicU64,
}

struct ReplayState<K> {
    keys: VecDeque<K>,
    queued: HashSet<K, FxBuildHasher>,
    /// The whole layer is to be cleared (the bound was passed, or a clear failed).
    clear: bool,
    /// Keys (or a clear) taken by the task and not yet replayed and announced.
    in_flight: usize,
    /// The keys among them.
    in_flight_keys: Vec<K>,
}

/// What one attempt replays.
pub(super) enum Work<K> {
    Clear,
    Keys(Vec<K>),
}

impl<K: Hash + Eq + Clone> Replay<K> {
    pub(super) fn new(bound: usize) -> Self {
        Replay {
            bound,
            state: Mutex::new(ReplayState {
                keys: VecDeque::new(),
                queued: HashSet::default(),
                clear: false,
                in_flight: 0,
                in_flight_keys: Vec::new(),
            }),
            len: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            replayed: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ReplayState<K>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keys (or a clear) waiting or being replayed.
    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    fn update_len(&self, state: &ReplayState<K>) {
        self.len.store(
            state.keys.len() + usize::from(state.clear) + state.in_flight,
            Ordering::Relaxed,
        );
    }

    /// `keys` could not be invalidated in the layer.
    pub(super) fn record<'a>(&self, keys: impl IntoIterator<Item = &'a K>)
    where
        K: 'a,
    {
        let mut state = self.lock();
        if !state.clear {
            for key in keys {
                if state.queued.contains(key) {
                    continue;
                }
                if state.keys.len() >= self.bound {
                    self.overflows.fetch_add(1, Ordering::Relaxed);
                    state.keys.clear();
                    state.queued.clear();
                    state.clear = true;
                    break;
                }
                state.queued.insert(key.clone());
                state.keys.push_back(key.clone());
            }
        }
        self.update_len(&state);
    }

    /// The whole layer must be cleared once it answers.
    pub(super) fn record_clear(&self) {
        let mut state = self.lock();
        state.keys.clear();
        state.queued.clear();
        state.clear = true;
        self.update_len(&state);
    }

    /// Calls `clean` for each of `keys` not recorded again since it was taken, under the
    /// lock [`record`](Self::record) takes (a failure records before it marks the key
    /// suspect, so a mark made after this call stays).
    fn clean_unless_recorded<'a>(&self, keys: impl IntoIterator<Item = &'a K>, mut clean: impl FnMut(&K))
    where
        K: 'a,
    {
        let state = self.lock();
        if state.clear {
            return;
        }
        for key in keys {
            if !state.queued.contains(key) {
                clean(key);
            }
        }
    }

    fn take(&self) -> Option<Work<K>> {
        let mut state = self.lock();
        let work = if state.clear {
            state.clear = false;
            Work::Clear
        } else {
            let n = state.keys.len().min(REPLAY_BATCH);
            if n == 0 {
                return None;
            }
            let keys: Vec<K> = state.keys.drain(..n).collect();
            for key in &keys {
                state.queued.remove(key);
            }
            Work::Keys(keys)
        };
        state.in_flight = match &work {
            Work::Clear => 1,
            Work::Keys(keys) => {
                state.in_flight_keys.clone_from(keys);
                keys.len()
            }
        };
        self.update_len(&state);
        Some(work)
    }

    /// What [`take`](Self::take) gave out was replayed and announced.
    fn finish(&self) {
        let mut state = self.lock();
        state.in_flight = 0;
        state.in_flight_keys.clear();
        self.failing.store(false, Ordering::Release);
        self.update_len(&state);
    }

    /// Whether a replay that may still succeed soon holds any of `keys`: something
    /// waits, and the last attempt did not fail.
    pub(super) fn holds_any<'a>(&self, mut keys: impl Iterator<Item = &'a K>) -> bool
    where
        K: 'a,
    {
        if self.len() == 0 || self.failing.load(Ordering::Acquire) {
            return false;
        }
        let state = self.lock();
        state.clear || keys.any(|k| state.queued.contains(k) || state.in_flight_keys.contains(k))
    }

    fn put_back(&self, work: Work<K>) {
        let mut state = self.lock();
        state.in_flight = 0;
        state.in_flight_keys.clear();
        self.failing.store(true, Ordering::Release);
        match work {
            Work::Clear => {
                state.keys.clear();
                state.queued.clear();
                state.clear = true;
            }
            // Covered by a clear recorded meanwhile.
            Work::Keys(_) if state.clear => {}
            Work::Keys(keys) => {
                for key in keys.into_iter().rev() {
                    if state.queued.insert(key.clone()) {
                        state.keys.push_front(key);
                    }
                }
            }
        }
        self.update_len(&state);
    }
}

/// The composer's recovery task, started at the first failed invalidation.
#[derive(Default)]
pub(super) struct Recovery {
    started: AtomicBool,
    pub(super) wake: Notify,
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Wakes the recovery task (starting it the first time), which replays what
    /// [`Replay::record`] kept.
    pub(super) fn recover(&self) {
        if !self.recovery.started.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(replay(self.me.clone()));
                }
                // Outside a runtime (a drop): the next failure starts it.
                Err(_) => self.recovery.started.store(false, Ordering::Release),
            }
        }
        self.recovery.wake.notify_one();
    }

    /// One attempt per layer with something to replay; whether any attempt failed and
    /// whether anything waits.
    pub(super) async fn replay_once(&self) -> (bool, bool) {
        let mut failed = false;
        for slot in self.slots.iter() {
            let Some(replay) = &slot.replay else { continue };
            while let Some(work) = replay.take() {
                let result = match &work {
                    Work::Clear => slot.replay_clear().await,
                    Work::Keys(keys) => slot.replay_delete_many(keys).await.map(drop),
                };
                if result.is_err() {
                    replay.put_back(work);
                    failed = true;
                    break;
                }
                let now = self.clock.now();
                match work {
                    Work::Clear => {
                        replay.replayed.fetch_add(1, Ordering::Relaxed);
                        if let Some(suspects) = &slot.suspects {
                            // Under the lock `record` takes: keys whose invalidation
                            // failed while the clear ran stay marked.
                            let state = replay.lock();
                            suspects.cleared(now);
                            suspects.mark(state.queued.iter(), now);
                        }
                        if let Some(bus) = &self.bus {
                            bus.outbox.announce_clear();
                        }
                    }
                    Work::Keys(keys) => {
                        replay.replayed.fetch_add(keys.len() as u64, Ordering::Relaxed);
                        replay.clean_unless_recorded(&keys, |k| slot.cleaned([k], now));
                        // Another instance may have copied the old value from this layer
                        // before the replay: it hears of the key again.
                        self.announce(keys.iter());
                    }
                }
                replay.finish();
            }
        }
        let waiting = self
            .slots
            .iter()
            .any(|s| s.replay.as_ref().is_some_and(|r| r.len() > 0));
        (failed, waiting)
    }

    /// Under [`publish_wait`](super::MultiLayerBuilder::publish_wait): waits, up to
    /// `limit`, until no replay that may succeed soon holds one of `keys` (a cache layer
    /// that skipped the write, its breaker still open though the layer answers again, is
    /// cleaned by the replay a moment later), then until its announcements were sent.
    pub(super) async fn wait_replayed(&self, keys: &[&K], limit: Duration) {
        if limit.is_zero() {
            return;
        }
        let started = tokio::time::Instant::now();
        let holding = || {
            self.slots.iter().any(|s| {
                s.replay
                    .as_ref()
                    .is_some_and(|r| r.holds_any(keys.iter().copied()))
            })
        };
        if !holding() {
            return;
        }
        while holding() {
            if started.elapsed() >= limit {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if let Some(bus) = &self.bus {
            let _ = bus
                .outbox
                .wait_sent(bus.outbox.last_ticket(), limit.saturating_sub(started.elapsed()))
                .await;
        }
    }
}

/// The recovery task: replays as soon as a layer answers again, retrying every few
/// milliseconds (doubling up to [`RETRY_MAX`]) while it fails.
async fn replay<K, V>(inner: Weak<Inner<K, V>>)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let mut retry = RETRY_MIN;
    loop {
        let Some(strong) = inner.upgrade() else { return };
        // `close` makes one last pass itself.
        if strong.closed.load(Ordering::Acquire) {
            return;
        }
        let (failed, waiting) = strong.replay_once().await;
        if failed {
            drop(strong);
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
        } else if !waiting {
            retry = RETRY_MIN;
            let strong: Arc<Inner<K, V>> = strong;
            let _ = tokio::time::timeout(IDLE_CHECK, strong.recovery.wake.notified()).await;
        }
    }
}
