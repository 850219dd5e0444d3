//! The invalidation bus: this instance's outbox (changes to announce, sent in order by a
//! background task that keeps what the bus could not take and sends it when it answers
//! again), and applying other instances' messages to the in-process layers.
//!
//! Order: announcements leave in the order the writes finished; the task sends one
//! message at a time and numbers them (sender id, sequence), so a receiver applies each
//! sender's messages once and in order. A key already waiting in the outbox is not queued
//! twice (the waiting message is sent after the new write too). Past the outbox's bound
//! the waiting keys are replaced by one [`Change::Clear`]: every other instance clears
//! its in-process layers when it arrives.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use rustc_hash::FxBuildHasher;
use tokio::sync::{watch, Notify};

use super::Inner;
use crate::bus::{BusMessage, Change, Invalidation, InvalidationBus};
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::stats::{BusStats, Counter};

/// Keys per message at most.
const KEYS_PER_MESSAGE: usize = 64;
/// The sender's wait between attempts while the bus fails, doubling up to the maximum.
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_millis(250);
/// The longest the sender waits for one `publish` (the transports have their own, shorter
/// timeouts; this bounds one that has none).
const PUBLISH_DEADLINE: Duration = Duration::from_secs(10);
/// How often an idle sender checks that its composer still exists.
const IDLE_CHECK: Duration = Duration::from_millis(250);
/// Senders whose last sequence number a receiver remembers; past it, it forgets them all
/// (a repeated message is then applied twice, which is harmless).
const SENDERS_BOUND: usize = 4_096;

/// Sequence numbers below a sender's highest that a receiver still tells apart.
const WINDOW: u64 = 128;

/// The sequence numbers applied from one sender: the highest, and which of the
/// [`WINDOW`] below it (bit `i`: `high - i`).
struct Seen {
    high: u64,
    window: u128,
}

impl Seen {
    /// Whether `seq` is to be applied; remembers it.
    fn admit(&mut self, seq: u64) -> bool {
        if seq > self.high {
            let shift = seq - self.high;
            self.window = if shift >= WINDOW { 0 } else { self.window << shift };
            self.window |= 1;
            self.high = seq;
            return true;
        }
        let offset = self.high - seq;
        if offset >= WINDOW {
            return false;
        }
        let bit = 1u128 << offset;
        let new = self.window & bit == 0;
        self.window |= bit;
        new
    }
}

/// How a composer uses its bus (see
/// [`MultiLayerBuilder::invalidation_bus`](super::MultiLayerBuilder::invalidation_bus)).
pub(super) struct BusConfig {
    /// Keys waiting to be announced at most.
    pub(super) queue_bound: usize,
    /// A write waits this long for its announcement to be sent (`None`: it does not wait).
    pub(super) wait: Option<Duration>,
}

/// A composer's side of the bus.
pub(super) struct Bus<K> {
    pub(super) transport: Arc<dyn InvalidationBus<K>>,
    pub(super) outbox: Arc<Outbox<K>>,
    pub(super) wait: Option<Duration>,
    /// Sender -> the sequence numbers applied from it lately.
    seen: Mutex<HashMap<u64, Seen, FxBuildHasher>>,
    received: AtomicU64,
    ignored: AtomicU64,
    clears: AtomicU64,
}

/// What waits to be announced, shared with the sending task.
pub(super) struct Outbox<K> {
    /// This composer's id, random per composer.
    id: u64,
    bound: usize,
    state: Mutex<OutboxState<K>>,
    wake: Notify,
    /// Every announcement with a ticket up to this one was sent.
    sent: watch::Sender<u64>,
    /// `close` began: the task ends once the outbox is empty or given up on.
    closing: AtomicBool,
    /// The last attempt to send failed (writes do not wait for a bus that is down).
    failing: AtomicBool,
    published: AtomicU64,
    publish_errors: AtomicU64,
    overflows: AtomicU64,
    too_large: AtomicU64,
}

struct OutboxState<K> {
    /// Keys in announcement order, each with its ticket (ascending).
    queue: VecDeque<(u64, K)>,
    /// Key -> (entries of it in `queue`, its latest ticket).
    queued: HashMap<K, (u32, u64), FxBuildHasher>,
    /// A clear to send before the queued keys, with its ticket.
    clear: Option<u64>,
    /// The last ticket given out.
    ticket: u64,
    /// The last sequence number sent.
    seq: u64,
    /// Taken by the task and not yet sent or put back.
    in_flight: usize,
}

/// What the task took out of the outbox to send.
struct Batch<K> {
    clear: Option<u64>,
    keys: Vec<(u64, K)>,
}

impl<K> Batch<K> {
    fn last_ticket(&self) -> u64 {
        self.keys.last().map(|(t, _)| *t).or(self.clear).unwrap_or(0)
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Bus<K> {
    pub(super) fn new(transport: Arc<dyn InvalidationBus<K>>, config: &BusConfig) -> Self {
        Bus {
            transport,
            outbox: Arc::new(Outbox {
                id: crate::bus_instance_id(),
                bound: config.queue_bound,
                state: Mutex::new(OutboxState {
                    queue: VecDeque::new(),
                    queued: HashMap::default(),
                    clear: None,
                    ticket: 0,
                    seq: 0,
                    in_flight: 0,
                }),
                wake: Notify::new(),
                sent: watch::channel(0).0,
                closing: AtomicBool::new(false),
                failing: AtomicBool::new(false),
                published: AtomicU64::new(0),
                publish_errors: AtomicU64::new(0),
                overflows: AtomicU64::new(0),
                too_large: AtomicU64::new(0),
            }),
            wait: config.wait,
            seen: Mutex::new(HashMap::default()),
            received: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
            clears: AtomicU64::new(0),
        }
    }

    /// Starts the task that sends the outbox; it ends once the composer is dropped or
    /// closed.
    pub(super) fn spawn_sender(&self, runtime: &tokio::runtime::Handle) {
        runtime.spawn(send(Arc::downgrade(&self.outbox), Arc::clone(&self.transport)));
    }

    /// Whether a message from `sender` numbered `seq` is new here (and remembers it): not
    /// one already applied, nor older than the last [`WINDOW`] numbers seen from that
    /// sender. Within the window a message that arrives late is still applied (an
    /// eviction applied late costs a miss; one dropped could leave a stale copy).
    fn fresh(&self, sender: u64, seq: u64) -> bool {
        if sender == self.outbox.id {
            return false;
        }
        let mut seen = lock(&self.seen);
        match seen.get_mut(&sender) {
            Some(s) => s.admit(seq),
            None => {
                if seen.len() >= SENDERS_BOUND {
                    seen.clear();
                }
                seen.insert(sender, Seen { high: seq, window: 1 });
                true
            }
        }
    }

    pub(super) fn stats(&self) -> BusStats {
        let o = &self.outbox;
        let pending = {
            let state = o.lock();
            (state.queue.len() + state.in_flight + usize::from(state.clear.is_some())) as u64
        };
        BusStats {
            published: o.published.load(Ordering::Relaxed),
            publish_errors: o.publish_errors.load(Ordering::Relaxed),
            pending,
            overflows: o.overflows.load(Ordering::Relaxed),
            too_large: o.too_large.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            ignored: self.ignored.load(Ordering::Relaxed),
            clears: self.clears.load(Ordering::Relaxed),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<K: Hash + Eq + Clone> Outbox<K> {
    fn lock(&self) -> MutexGuard<'_, OutboxState<K>> {
        lock(&self.state)
    }

    /// Queues `keys` for announcement; the ticket to wait for.
    pub(super) fn announce<'a>(&self, keys: impl IntoIterator<Item = &'a K>) -> u64
    where
        K: 'a,
    {
        let mut state = self.lock();
        let mut wait_for = 0;
        for key in keys {
            if let Some((_, ticket)) = state.queued.get(key) {
                // Still waiting: it is sent after this write finished.
                wait_for = wait_for.max(*ticket);
                continue;
            }
            if state.queue.len() >= self.bound {
                wait_for = self.overflow(&mut state);
                // The clear covers every key announced before it.
                break;
            }
            state.ticket += 1;
            let ticket = state.ticket;
            state.queue.push_back((ticket, key.clone()));
            state.queued.insert(key.clone(), (1, ticket));
            wait_for = ticket;
        }
        drop(state);
        self.wake.notify_one();
        wait_for
    }

    /// Queues a clear of every instance's in-process layers; the ticket to wait for.
    pub(super) fn announce_clear(&self) -> u64 {
        let mut state = self.lock();
        let ticket = Self::replace_by_clear(&mut state);
        drop(state);
        self.wake.notify_one();
        ticket
    }

    fn overflow(&self, state: &mut OutboxState<K>) -> u64 {
        self.overflows.fetch_add(1, Ordering::Relaxed);
        Self::replace_by_clear(state)
    }

    /// Drops the waiting keys for one clear after everything announced so far.
    fn replace_by_clear(state: &mut OutboxState<K>) -> u64 {
        state.queue.clear();
        state.queued.clear();
        state.ticket += 1;
        state.clear = Some(state.ticket);
        state.ticket
    }

    /// The next message's contents: the clear if one waits, else the oldest keys.
    fn take(&self) -> Option<Batch<K>> {
        let mut state = self.lock();
        if let Some(ticket) = state.clear.take() {
            state.in_flight += 1;
            return Some(Batch {
                clear: Some(ticket),
                keys: Vec::new(),
            });
        }
        let n = state.queue.len().min(KEYS_PER_MESSAGE);
        if n == 0 {
            return None;
        }
        let keys: Vec<(u64, K)> = state.queue.drain(..n).collect();
        for (_, key) in &keys {
            if let Some((count, _)) = state.queued.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    state.queued.remove(key);
                }
            }
        }
        state.in_flight += keys.len();
        Some(Batch { clear: None, keys })
    }

    fn next_seq(&self) -> u64 {
        let mut state = self.lock();
        state.seq += 1;
        state.seq
    }

    /// `batch` was sent.
    fn sent(&self, batch: &Batch<K>) {
        self.published.fetch_add(1, Ordering::Relaxed);
        self.failing.store(false, Ordering::Release);
        let last = batch.last_ticket();
        {
            let mut state = self.lock();
            state.in_flight -= batch.keys.len() + usize::from(batch.clear.is_some());
        }
        self.sent.send_if_modified(|sent| {
            let newer = last > *sent;
            *sent = (*sent).max(last);
            newer
        });
    }

    /// `batch` could not be sent: it goes back in front, to be sent first.
    fn put_back(&self, batch: Batch<K>) {
        let mut state = self.lock();
        state.in_flight -= batch.keys.len() + usize::from(batch.clear.is_some());
        if let Some(ticket) = batch.clear {
            // A newer clear waiting covers this one.
            if state.clear.is_none() {
                state.clear = Some(ticket);
            }
            return;
        }
        // Keys announced before a waiting clear are covered by it.
        let covered = state.clear.unwrap_or(0);
        for (ticket, key) in batch.keys.into_iter().rev() {
            if ticket <= covered {
                continue;
            }
            let entry = state.queued.entry(key.clone()).or_insert((0, ticket));
            entry.0 += 1;
            entry.1 = entry.1.max(ticket);
            state.queue.push_front((ticket, key));
        }
        if state.queue.len() > self.bound {
            self.overflow(&mut state);
        }
    }

    /// The last ticket given out.
    pub(super) fn last_ticket(&self) -> u64 {
        self.lock().ticket
    }

    /// Waits until the announcement with `ticket` was sent, at most `limit`; whether it
    /// was. While the bus fails it does not wait at all: the announcement is sent when
    /// the bus answers again.
    pub(super) async fn wait_sent(&self, ticket: u64, limit: Duration) -> bool {
        if *self.sent.borrow() >= ticket {
            return true;
        }
        self.wait_for(ticket, limit, true).await
    }

    /// Waits until `ticket` was sent, at most `limit`; with `unless_failing`, only until
    /// an attempt to send fails.
    async fn wait_for(&self, ticket: u64, limit: Duration, unless_failing: bool) -> bool {
        let mut sent = self.sent.subscribe();
        let done = async {
            loop {
                if *sent.borrow_and_update() >= ticket {
                    return true;
                }
                if unless_failing && self.failing.load(Ordering::Acquire) {
                    return false;
                }
                if sent.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(limit, done).await.unwrap_or(false)
    }

    async fn wait_until_sent(&self, ticket: u64, limit: Duration) -> bool {
        self.wait_for(ticket, limit, false).await
    }

    /// Waits, at most `limit`, until everything announced so far was sent.
    ///
    /// # Errors
    ///
    /// `Unavailable` naming how many announcements still wait.
    pub(super) async fn flush(&self, limit: Duration, op: Operation) -> Result<()> {
        let ticket = self.last_ticket();
        if ticket == 0 || self.wait_until_sent(ticket, limit).await {
            return Ok(());
        }
        let pending = {
            let state = self.lock();
            state.queue.len() + state.in_flight + usize::from(state.clear.is_some())
        };
        Err(Error::new(
            ErrorKind::Unavailable,
            op,
            format!(
                "the invalidation bus did not take {pending} waiting announcements within {limit:?}; \
                 they are sent when it answers again"
            ),
        ))
    }

    /// Ends the sending task once the outbox is empty (or at once when the bus fails).
    pub(super) fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// The sending task: one message at a time, in order; what fails goes back in front and
/// is tried again (waiting a little longer each time, up to [`RETRY_MAX`]).
async fn send<K>(outbox: Weak<Outbox<K>>, transport: Arc<dyn InvalidationBus<K>>)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    let mut retry = RETRY_MIN;
    loop {
        let Some(out) = outbox.upgrade() else { return };
        let Some(batch) = out.take() else {
            if out.closing.load(Ordering::Acquire) {
                return;
            }
            let _ = tokio::time::timeout(IDLE_CHECK, out.wake.notified()).await;
            continue;
        };
        match publish(&out, &*transport, batch).await {
            Ok(()) => retry = RETRY_MIN,
            Err(()) => {
                if out.closing.load(Ordering::Acquire) {
                    return;
                }
                drop(out);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Sends `batch`: `Err` when the bus failed (the batch is back in the outbox). A message
/// the transport finds too large is split; a single key too large to announce becomes a
/// clear.
async fn publish<K>(
    out: &Outbox<K>,
    transport: &dyn InvalidationBus<K>,
    batch: Batch<K>,
) -> std::result::Result<(), ()>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    let change = match batch.clear {
        Some(_) => Change::Clear,
        None => Change::Keys(batch.keys.iter().map(|(_, k)| k.clone()).collect()),
    };
    let message = BusMessage::new(out.id, out.next_seq(), change);
    // A transport that neither answers nor fails must not hold the outbox forever.
    let sent = tokio::time::timeout(PUBLISH_DEADLINE, transport.publish(&message))
        .await
        .unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                Operation::Publish,
                format!("the bus did not answer within {PUBLISH_DEADLINE:?}"),
            ))
        });
    match sent {
        Ok(()) => {
            out.sent(&batch);
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::InvalidInput && batch.clear.is_none() => {
            out.too_large.fetch_add(1, Ordering::Relaxed);
            let mut keys = batch.keys;
            if keys.len() == 1 {
                // Nothing smaller can say this key changed: every instance clears.
                let mut state = out.lock();
                state.in_flight -= 1;
                if state.clear.is_none() {
                    Outbox::replace_by_clear(&mut state);
                }
                drop(state);
                out.wake.notify_one();
                return Ok(());
            }
            let back = keys.split_off(keys.len() / 2);
            // The halves go back in order, the first one in front.
            out.put_back(Batch {
                clear: None,
                keys: back,
            });
            out.put_back(Batch { clear: None, keys });
            Ok(())
        }
        Err(_) => {
            out.publish_errors.fetch_add(1, Ordering::Relaxed);
            out.failing.store(true, Ordering::Release);
            // Writes waiting for their announcement stop waiting.
            out.sent.send_modify(|_| {});
            out.put_back(batch);
            Err(())
        }
    }
}

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Applies a message of the invalidation bus to the in-process layers.
    pub(super) fn invalidate_local(&self, message: Invalidation<K>) {
        let Some(bus) = &self.bus else { return };
        match message {
            Invalidation::Message(message) => {
                bus.received.fetch_add(1, Ordering::Relaxed);
                if !bus.fresh(message.sender, message.seq) {
                    bus.ignored.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                match message.change {
                    Change::Keys(keys) => keys.iter().for_each(|key| self.evict_local(key)),
                    _ => {
                        bus.clears.fetch_add(1, Ordering::Relaxed);
                        self.clear_local();
                    }
                }
            }
            _ => {
                bus.clears.fetch_add(1, Ordering::Relaxed);
                self.clear_local();
            }
        }
    }

    /// Removes `key` from the in-process layers, as a local write does: promotions racing
    /// the eviction are discarded.
    fn evict_local(&self, key: &K) {
        let writing = self.guard.begin_write(self.guard.stripe_of(key));
        if let Some(fail_safe) = &self.fail_safe {
            fail_safe.forget(key);
        }
        if let Some(negative) = &self.negative {
            negative.forget(key);
        }
        for slot in self.local_layers() {
            if !matches!(slot.layer.delete_sync(key), Some(Ok(_))) {
                slot.counters.incr(Counter::Error);
            }
        }
        // A copy that passed its check before the eviction and landed after it undoes
        // itself at its second check; wait for that here (copies into in-process layers
        // take nanoseconds), so that once the message is applied no copy read before it
        // is served.
        super::write::wait_for_copies(std::slice::from_ref(&writing));
    }

    /// Empties the in-process layers (and what fail-safe remembers).
    pub(super) fn clear_local(&self) {
        let writing = self.guard.begin_write_all();
        if let Some(fail_safe) = &self.fail_safe {
            fail_safe.clear();
        }
        for slot in self.local_layers() {
            if !matches!(slot.layer.clear_sync(), Some(Ok(()))) {
                slot.counters.incr(Counter::Error);
            }
        }
        super::write::wait_for_copies(&writing);
    }

    fn local_layers(&self) -> impl Iterator<Item = &super::Slot<K, V>> {
        self.slots.iter().filter(|s| s.sync_ops && !s.read_only)
    }

    /// Queues the announcement of `keys`; the ticket to wait for when writes wait for
    /// their announcement.
    #[inline]
    pub(super) fn announce<'a>(&self, keys: impl IntoIterator<Item = &'a K>) -> Option<(u64, Duration)>
    where
        K: 'a,
    {
        let bus = self.bus.as_ref()?;
        let ticket = bus.outbox.announce(keys);
        bus.wait.map(|limit| (ticket, limit))
    }

    /// Waits (up to the configured wait) until announcement `ticket` was sent; a write
    /// does not fail because the bus is slow or down.
    pub(super) async fn wait_announced(&self, wait: Option<(u64, Duration)>, keys: &[&K]) {
        if let (Some(bus), Some((ticket, limit))) = (&self.bus, wait) {
            // One budget for both waits.
            let started = tokio::time::Instant::now();
            let _ = bus.outbox.wait_sent(ticket, limit).await;
            self.wait_replayed(keys, limit.saturating_sub(started.elapsed()))
                .await;
        }
    }
}

/// How long `flush` and `close` wait for the outbox at most.
pub(super) const BUS_FLUSH_LIMIT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::{Seen, WINDOW};

    #[test]
    fn a_sender_window_applies_late_messages_once_and_drops_repeats() {
        let mut seen = Seen { high: 5, window: 1 };
        assert!(!seen.admit(5), "a repeat");
        assert!(seen.admit(7));
        assert!(seen.admit(6), "late, never applied: applied");
        assert!(!seen.admit(6), "then a repeat");
        assert!(seen.admit(4), "older than the highest, never applied");
        assert!(seen.admit(7 + WINDOW + 1));
        assert!(!seen.admit(7), "older than the window: dropped");
    }
}
