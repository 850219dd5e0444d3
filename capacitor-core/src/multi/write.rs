//! The one write path: every write form (set, delete, their batch forms, the write-back
//! drain, a transaction's commit, a write-back `set` into L1) goes through
//! [`MultiLayer::fan_out`] inside a [`WriteScope`].
//!
//! Order of a write: the key's stripes are entered (readers' tickets are void from here);
//! the authoritative layer is written first; if it fails, the caches above it are left as
//! they were, unless the outcome is unknown (a timeout: the store may hold the new value),
//! in which case they are invalidated. Then each cache layer above is written, nearest
//! the store first; a cache layer that fails is invalidated (or, failing that, its copy
//! is suspect and reads pass it by). Last, the scope checks for overlap: if another write
//! of the key ran at the same time, the layers may have applied the two in different
//! orders, so the key is removed from every cache layer (a later read copies the store's
//! value up). A scope dropped half-way (the caller's future was dropped) removes the key
//! from the in-process layers and pins it in the remote cache layers.
//!
//! The public write methods (`set`, `set_with`, `delete`, `set_many`, `delete_many`) are
//! here too, with the write-through and write-back entries into the write path.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::{Inner, MultiLayer, Slot};
use rustc_hash::FxBuildHasher;

use crate::config::{jitter, min_ttl, SetOptions};
use crate::entry::Timestamp;
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::guard::{Ticket, WriteGuard};
use crate::layer::WriteOp;
use crate::observe::traced;
use crate::stats::Counter;
use crate::writeback::{Pending, Queue};

// Named by the doc comments only.
#[cfg(doc)]
use super::MultiLayerBuilder;

/// How often a writer checks for copies between their checks before it yields.
const SETTLE_SPINS: u32 = 10_000;

/// Waits on this thread, a bounded while, until no copy upward of the stripes `writing`
/// holds is between its checks: for writers that cannot await (an invalidation bus's
/// message handler). Returns whether they all finished.
pub(super) fn wait_for_copies(writing: &[WriteGuard<'_>]) -> bool {
    let running = || writing.iter().any(WriteGuard::copies_running);
    for spin in 0..SETTLE_SPINS {
        if !running() {
            return true;
        }
        if spin < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    !running()
}

/// What one call of the write path writes.
pub(super) enum Writes<'a, K, V> {
    Set {
        key: &'a K,
        value: &'a V,
        ttl: Option<Duration>,
        /// A loader's fill: written only if it is the first write of the key since the
        /// flight's ticket.
        fill: Option<&'a Fill>,
        /// The write's tags, kept by the authoritative layer (empty: none).
        tags: &'a [String],
    },
    Delete {
        key: &'a K,
    },
    SetMany {
        entries: &'a [(K, V)],
        ttl: Option<Duration>,
    },
    DeleteMany {
        keys: &'a [K],
    },
    /// A write-back batch: sets grouped by remaining TTL, then deletes.
    Drained {
        sets: &'a BTreeMap<Option<Duration>, Vec<(K, V)>>,
        deletes: &'a [K],
    },
    /// A transaction: atomic in the authoritative layer, invalidated in the layers above.
    Atomic {
        ops: &'a [WriteOp<K, V>],
    },
}

impl<K, V> Writes<'_, K, V> {
    pub(super) fn for_each_key(&self, mut f: impl FnMut(&K)) {
        match self {
            Writes::Set { key, .. } | Writes::Delete { key } => f(key),
            Writes::SetMany { entries, .. } => entries.iter().for_each(|(k, _)| f(k)),
            Writes::DeleteMany { keys } => keys.iter().for_each(f),
            Writes::Drained { sets, deletes } => {
                sets.values().flatten().for_each(|(k, _)| f(k));
                deletes.iter().for_each(f);
            }
            Writes::Atomic { ops } => ops.iter().for_each(|op| f(op.key())),
        }
    }

    /// Whether this write is a change the other instances are told of: everything but
    /// a loader's fill (a copy of what the store holds, like a promotion).
    #[inline]
    fn announced(&self) -> bool {
        !matches!(self, Writes::Set { fill: Some(_), .. })
    }

    pub(super) fn keys(&self) -> Vec<&K> {
        let mut out: Vec<&K> = Vec::new();
        match self {
            Writes::Set { key, .. } | Writes::Delete { key } => out.push(key),
            Writes::SetMany { entries, .. } => out.extend(entries.iter().map(|(k, _)| k)),
            Writes::DeleteMany { keys } => out.extend(keys.iter()),
            Writes::Drained { sets, deletes } => {
                out.extend(sets.values().flatten().map(|(k, _)| k));
                out.extend(deletes.iter());
            }
            Writes::Atomic { ops } => out.extend(ops.iter().map(WriteOp::key)),
        }
        out
    }

    /// Counts what a layer applied: sets as sets, deletes as deletes.
    #[inline(always)]
    fn count(&self, slot: &Slot<K, V>) {
        match self {
            // The single forms, on every write: one counter, no loop.
            Writes::Set { .. } => slot.counters.incr(Counter::Set),
            Writes::Delete { .. } => slot.counters.incr(Counter::Delete),
            _ => self.count_many(slot),
        }
    }

    #[inline(never)]
    fn count_many(&self, slot: &Slot<K, V>) {
        let (sets, deletes) = match self {
            Writes::Set { .. } => (1, 0),
            Writes::Delete { .. } => (0, 1),
            Writes::SetMany { entries, .. } => (entries.len(), 0),
            Writes::DeleteMany { keys } => (0, keys.len()),
            Writes::Drained { sets, deletes } => (sets.values().map(Vec::len).sum(), deletes.len()),
            Writes::Atomic { ops } => {
                let sets = ops.iter().filter(|op| matches!(op, WriteOp::Set { .. })).count();
                (sets, ops.len() - sets)
            }
        };
        (0..sets).for_each(|_| slot.counters.incr(Counter::Set));
        (0..deletes).for_each(|_| slot.counters.incr(Counter::Delete));
    }
}

/// A loader flight's claim on its fill write (see [`Writes::Set`]'s `fill`), with the
/// load's per-layer options.
pub(super) struct Fill {
    pub(super) ticket: Ticket,
    /// The stripe version the fill write set; 0 until it began.
    pub(super) version: AtomicU64,
    /// Per layer index, a TTL replacing the layer's own; `None` when no layer has one.
    layer_ttl: Option<Box<[Option<Duration>]>>,
    /// Cache layers that get no copy: theirs is removed instead.
    skip: super::slot::LayerSet,
    /// Whether `layer_ttl` or `skip` say anything.
    layered: bool,
}

impl Fill {
    /// The fill of a load run with `plan`.
    pub(super) fn for_load(ticket: Ticket, plan: &crate::load::Plan) -> Self {
        let mut skip = super::slot::LayerSet::NONE;
        plan.skip_write.iter().for_each(|&i| skip.add(i));
        Fill {
            ticket,
            version: AtomicU64::new(0),
            layered: plan.layer_ttl.is_some() || !plan.skip_write.is_empty(),
            layer_ttl: plan.layer_ttl.clone(),
            skip,
        }
    }

    /// Whether the fill write began (no write of the key overtook it).
    pub(super) fn began(&self) -> bool {
        self.version.load(Ordering::SeqCst) != 0
    }

    /// Whether the only write of the stripe since the ticket is this fill (so that the
    /// flight's value is still current for a caller arriving now).
    pub(super) fn only_write_since(&self, guard: &crate::guard::Generations) -> bool {
        let v = self.version.load(Ordering::SeqCst);
        v != 0 && guard.latest_is(self.ticket, v)
    }
}

/// The index of `slot` among the composer's layers.
fn index_of<K, V>(inner: &Inner<K, V>, slot: &Slot<K, V>) -> usize {
    inner
        .slots
        .iter()
        .position(|s| std::ptr::eq(s, slot))
        .unwrap_or(inner.authoritative)
}

/// Whether `fill` leaves `slot` out (its copy is removed instead).
#[inline(always)]
fn skipped<K, V>(inner: &Inner<K, V>, slot: &Slot<K, V>, fill: Option<&Fill>) -> bool {
    match fill {
        Some(f) if f.layered => f.skip.contains(index_of(inner, slot)),
        _ => false,
    }
}

/// Whether a failed write may still have been applied (or land later): the layer did not
/// answer in time. Other errors mean the layer refused it.
pub(super) fn outcome_unknown(err: &Error) -> bool {
    err.kind() == ErrorKind::Timeout
}

/// Keys whose write to the authoritative layer had an unknown outcome (it timed out, or
/// its future was dropped half-way): the store may still apply it at any moment, after
/// later writes too. Until the pin ends, no cache layer above the store gets a copy of
/// such a key (writes and promotions skip them, their copies are removed), so every read
/// is answered by the store, whatever it ends up holding.
pub(super) struct InDoubt<K> {
    /// Key -> end of its pin.
    keys: Mutex<HashMap<K, Timestamp, FxBuildHasher>>,
    len: AtomicUsize,
}

/// How long a key stays pinned after a write of unknown outcome to the store: far beyond
/// any layer's timeouts, within which an abandoned command lands or is lost.
pub(super) const IN_DOUBT_FOR: Duration = Duration::from_secs(60);

/// Keys pinned at once at most; past it the oldest pins are dropped first.
const IN_DOUBT_BOUND: usize = 100_000;

impl<K: Hash + Eq + Clone> Default for InDoubt<K> {
    fn default() -> Self {
        InDoubt {
            keys: Mutex::new(HashMap::default()),
            len: AtomicUsize::new(0),
        }
    }
}

impl<K: Hash + Eq + Clone> InDoubt<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Timestamp, FxBuildHasher>> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn pin<'a>(&self, keys: impl IntoIterator<Item = &'a K>, now: Timestamp)
    where
        K: 'a,
    {
        let mut map = self.lock();
        let until = now.saturating_add(IN_DOUBT_FOR);
        for key in keys {
            if map.len() >= IN_DOUBT_BOUND {
                map.retain(|_, until| *until > now);
            }
            map.insert(key.clone(), until);
        }
        self.len.store(map.len(), Ordering::Relaxed);
    }

    /// Whether `key` must not be copied above the store now.
    #[inline]
    pub(super) fn pinned(&self, key: &K, now: Timestamp) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut map = self.lock();
        match map.get(key) {
            Some(until) if *until > now => true,
            Some(_) => {
                map.remove(key);
                self.len.store(map.len(), Ordering::Relaxed);
                false
            }
            None => false,
        }
    }

    /// Keys pinned now (expired pins included until next looked at).
    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
}

/// The span of one write: its keys' stripes are entered until the write is finished or
/// dropped. Dropped half-way, it invalidates the key where that can be done at once.
pub(super) struct WriteScope<
    'a,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
> {
    inner: &'a Inner<K, V>,
    writes: &'a Writes<'a, K, V>,
    layers: RangeInclusive<usize>,
    guards: Guards<'a>,
    done: bool,
    /// A fill that a write of its key overtook: nothing is written.
    pub(super) refused: bool,
}

enum Guards<'a> {
    One(WriteGuard<'a>),
    Many(Vec<WriteGuard<'a>>),
}

impl Guards<'_> {
    #[inline(always)]
    fn copies_running(&self) -> bool {
        match self {
            Guards::One(g) => g.copies_running(),
            Guards::Many(gs) => gs.iter().any(WriteGuard::copies_running),
        }
    }

    /// Whether no copy upward of these stripes is between its checks, waiting for one
    /// on this thread a while (an in-process copy takes nanoseconds, and a write over
    /// in-memory layers should complete on its first poll).
    #[inline(always)]
    fn settle_now(&self) -> bool {
        !self.copies_running() || self.spin_until_settled()
    }

    #[cold]
    #[inline(never)]
    fn spin_until_settled(&self) -> bool {
        match self {
            Guards::One(g) => wait_for_copies(std::slice::from_ref(g)),
            Guards::Many(gs) => wait_for_copies(gs),
        }
    }

    /// Waits until no copy upward of these stripes is between its checks (those copies
    /// undo themselves: they see this write's version). A copy into a remote layer may
    /// take its write timeout: past [`settle_now`](Self::settle_now), yield to the runtime.
    async fn settle(&self) {
        if self.settle_now() {
            return;
        }
        let timer = tokio::runtime::Handle::try_current().is_ok();
        while self.copies_running() {
            if timer {
                tokio::time::sleep(Duration::from_millis(1)).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
    }

    #[inline(always)]
    fn overlapped(&self) -> bool {
        match self {
            Guards::One(g) => g.overlapped(),
            Guards::Many(gs) => gs.iter().any(WriteGuard::overlapped),
        }
    }
}

impl<'a, K: Hash + Eq + Clone + Send + Sync + 'static, V: Clone + Send + Sync + 'static>
    WriteScope<'a, K, V>
{
    /// Enters the stripes of every key of `writes`, which will write `layers`.
    pub(super) fn enter(
        inner: &'a Inner<K, V>,
        writes: &'a Writes<'a, K, V>,
        layers: RangeInclusive<usize>,
    ) -> Self {
        let mut refused = false;
        let guards = match writes {
            Writes::Set { key, fill, .. } => {
                let guard = inner.guard.begin_write(inner.guard.stripe_of(*key));
                if let Some(fill) = fill {
                    if guard.first_since(fill.ticket) {
                        fill.version.store(guard.version(), Ordering::SeqCst);
                    } else {
                        refused = true;
                    }
                }
                Guards::One(guard)
            }
            Writes::Delete { key } => Guards::One(inner.guard.begin_write(inner.guard.stripe_of(*key))),
            _ => {
                let mut stripes = Vec::new();
                writes.for_each_key(|k| stripes.push(inner.guard.stripe_of(k)));
                stripes.sort_unstable();
                stripes.dedup();
                Guards::Many(stripes.into_iter().map(|s| inner.guard.begin_write(s)).collect())
            }
        };
        WriteScope {
            inner,
            writes,
            layers,
            guards,
            done: refused,
            refused,
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static, V: Clone + Send + Sync + 'static> Drop
    for WriteScope<'_, K, V>
{
    #[inline(always)]
    fn drop(&mut self) {
        if !self.done {
            self.abandoned();
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static, V: Clone + Send + Sync + 'static> WriteScope<'_, K, V> {
    #[cold]
    #[inline(never)]
    fn abandoned(&mut self) {
        // Dropped half-way: which layers hold what is unknown, and a remote command may
        // still land. In-process copies go now; remote cache layers pin the keys.
        let inner = self.inner;
        let now = inner.clock.now();
        let keys = self.writes.keys();
        for k in &keys {
            inner.forget(k);
        }
        if self.layers.contains(&inner.authoritative) {
            inner.in_doubt.pin(keys.iter().copied(), now);
            // The store may have taken the write: the other instances hear of it.
            if self.writes.announced() {
                inner.announce(keys.iter().copied());
            }
        }
        for i in self.layers.clone() {
            let slot = &inner.slots[i];
            if slot.read_only || i == inner.authoritative {
                continue;
            }
            if slot.sync_ops {
                for k in &keys {
                    if !matches!(slot.layer.delete_sync(k), Some(Ok(_))) {
                        slot.counters.incr(Counter::Error);
                    }
                }
            } else {
                // Its copies are removed by the recovery task (retried while the layer
                // fails); reads pass the layer by for these keys meanwhile, and for the
                // pin's length (the abandoned write may still land).
                if let Some(replay) = &slot.replay {
                    replay.record(keys.iter().copied());
                }
                if let Some(suspects) = &slot.suspects {
                    suspects.pin(keys.iter().copied(), now);
                }
                inner.recover();
            }
        }
    }
}

/// What the write path reports back: how many keys the authoritative layer held (for
/// deletes) and the first cache-layer error, if any.
pub(super) struct Written {
    pub(super) found: u64,
    pub(super) cache_error: Option<Error>,
}

/// How far a write has come through its layers: the synchronous prefix of the write
/// path hands it to the awaited rest where a layer must be awaited.
pub(super) struct Progress {
    /// Layers still to write; the next is the last (the nearest the store).
    todo: RangeInclusive<usize>,
    /// A layer taken from `todo` whose call is still to be made (`None`), or was made and
    /// whose result is still to be handled.
    current: Option<(usize, Option<Result<u64>>)>,
    /// A key of the write is in doubt: cache layers are invalidated, not written.
    pinned: bool,
    found: u64,
    cache_error: Option<Error>,
}

impl Progress {
    fn begin<K, V>(scope: &WriteScope<'_, K, V>) -> Self
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        let inner = scope.inner;
        let writes = scope.writes;
        if let Some(negative) = &inner.negative {
            writes.for_each_key(|k| negative.forget(k));
        }
        let pinned = inner.in_doubt.len() > 0 && {
            let now = inner.clock.now();
            let mut any = false;
            writes.for_each_key(|k| any |= inner.in_doubt.pinned(k, now));
            any
        };
        Progress {
            todo: scope.layers.clone(),
            current: None,
            pinned,
            found: 0,
            cache_error: None,
        }
    }

    /// The next writable layer to handle, with its result if it was called already.
    fn next<K, V>(&mut self, inner: &Inner<K, V>) -> Option<(usize, Option<Result<u64>>)> {
        if let Some(current) = self.current.take() {
            return Some(current);
        }
        loop {
            let i = self.todo.next_back()?;
            if !inner.slots[i].read_only {
                return Some((i, None));
            }
        }
    }

    fn written(&mut self) -> Written {
        Written {
            found: self.found,
            cache_error: self.cache_error.take(),
        }
    }
}

/// Applies the writes of `scope` to its writable layers, bottom first; `authority` is
/// the layer whose failure fails the write (`None` under write-back, where the buffer
/// took the write before; the count of keys found is then L1's).
///
/// In-process layers are written without awaiting (see [`fan_out_sync`]): a write over
/// them completes on its first poll and builds no future per layer.
pub(super) async fn fan_out<K, V>(
    mut scope: WriteScope<'_, K, V>,
    authority: Option<usize>,
) -> Result<Written>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    match start(&mut scope, authority) {
        Ok(done) => done,
        Err(progress) => fan_out_awaited(scope, authority, progress).await,
    }
}

/// The part of [`fan_out`] that needs no future: `Ok` with the write's result when it
/// is done, or `Err` with how far it came, for [`fan_out_awaited`] to go on from.
#[inline(always)]
pub(super) fn start<K, V>(
    scope: &mut WriteScope<'_, K, V>,
    authority: Option<usize>,
) -> std::result::Result<Result<Written>, Progress>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    if scope.refused {
        return Ok(Ok(Written {
            found: 0,
            cache_error: None,
        }));
    }
    let mut progress = Progress::begin(scope);
    match fan_out_sync(scope, authority, &mut progress) {
        Some(done) => Ok(done),
        None => Err(progress),
    }
}

/// The synchronous prefix of the write path: layers that answer at once are written
/// here, in the same order and with the same bookkeeping as in [`fan_out_awaited`]. At
/// the first layer that must be awaited, a failure, a key in doubt, an overlap or a
/// copy still running, it stops and returns `None`, leaving the rest to the awaited
/// path (a failure's result is handed over in `progress`, not handled twice).
#[inline]
fn fan_out_sync<K, V>(
    scope: &mut WriteScope<'_, K, V>,
    authority: Option<usize>,
    progress: &mut Progress,
) -> Option<Result<Written>>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let inner = scope.inner;
    let writes = scope.writes;
    if progress.pinned {
        return None;
    }
    while let Some(i) = progress.todo.next_back() {
        let slot = &inner.slots[i];
        if slot.read_only {
            continue;
        }
        let result = match slot.sync_ops.then(|| apply_sync(inner, slot, writes)).flatten() {
            Some(result) => result,
            None => {
                progress.current = Some((i, None));
                return None;
            }
        };
        match result {
            Ok(n) if Some(i) == authority => applied_authority(inner, slot, writes, n, progress),
            Ok(n) => applied_cache(inner, slot, writes, n, authority, progress),
            Err(e) => {
                progress.current = Some((i, Some(Err(e))));
                return None;
            }
        }
    }
    if !scope.guards.settle_now() || scope.guards.overlapped() {
        return None;
    }
    if authority.is_some() && inner.bus.is_some() && writes.announced() {
        if inner.bus.as_ref().is_some_and(|bus| bus.wait.is_some()) {
            // The write waits for its announcement: the awaited path does that.
            return None;
        }
        inner.announce(writes.keys());
    }
    scope.done = true;
    Some(Ok(progress.written()))
}

/// The write path from where [`fan_out_sync`] stopped.
pub(super) async fn fan_out_awaited<K, V>(
    mut scope: WriteScope<'_, K, V>,
    authority: Option<usize>,
    mut progress: Progress,
) -> Result<Written>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let inner = scope.inner;
    let writes = scope.writes;
    let layers = scope.layers.clone();
    while let Some((i, called)) = progress.next(inner) {
        let slot = &inner.slots[i];
        if Some(i) == authority {
            let result = match called {
                Some(result) => result,
                None => apply(inner, slot, writes).await,
            };
            match result {
                Ok(n) => applied_authority(inner, slot, writes, n, &mut progress),
                Err(e) => {
                    let err = slot.error(e);
                    if outcome_unknown(&err) {
                        // The store may apply the write now or later (after later writes
                        // too): until that is settled no cache keeps a copy of the keys,
                        // and the other instances hear of them as of a change.
                        inner.in_doubt.pin(writes.keys(), inner.clock.now());
                        invalidate_caches(inner, writes, 0..=i).await;
                        if writes.announced() {
                            inner.announce(writes.keys());
                        }
                    }
                    scope.done = true;
                    return Err(err);
                }
            }
            continue;
        }
        let applied = match writes {
            // A commit's values are in the store only, and so are keys in doubt: copies
            // above are removed.
            _ if progress.pinned => invalidate(inner, slot, writes).await,
            Writes::Atomic { .. } => invalidate(inner, slot, writes).await,
            _ => {
                let result = match called {
                    Some(result) => result,
                    None => apply(inner, slot, writes).await,
                };
                match result {
                    Ok(n) => {
                        applied_cache(inner, slot, writes, n, authority, &mut progress);
                        Ok(())
                    }
                    Err(e) => {
                        let err = slot.error(e);
                        if outcome_unknown(&err) {
                            if let Some(suspects) = &slot.suspects {
                                suspects.pin(writes.keys(), inner.clock.now());
                            }
                        }
                        // The layer may still hold the previous value: drop it there, or
                        // failing that, stop reading the key there until it is rewritten.
                        let _ = invalidate(inner, slot, writes).await;
                        Err(err)
                    }
                }
            }
        };
        if let Err(err) = applied {
            progress.cache_error.get_or_insert(err);
        }
    }
    scope.guards.settle().await;
    if scope.guards.overlapped() {
        // Another write of these keys ran meanwhile and the layers may have applied the
        // two in different orders: only the authoritative layer's order counts.
        invalidate_caches(inner, writes, layers).await;
        writes.for_each_key(|k| inner.forget(k));
    }
    scope.done = true;
    drop(scope);
    // (Keys are collected only for a bus: a write without one allocates nothing here.)
    if authority.is_some() && inner.bus.is_some() && writes.announced() {
        let keys = writes.keys();
        let wait = inner.announce(keys.iter().copied());
        inner.wait_announced(wait, &keys).await;
    }
    Ok(progress.written())
}

/// The authoritative layer took `writes`.
#[inline]
fn applied_authority<K, V>(
    inner: &Inner<K, V>,
    slot: &Slot<K, V>,
    writes: &Writes<'_, K, V>,
    found: u64,
    progress: &mut Progress,
) where
    K: Hash + Eq + Clone,
    V: Clone,
{
    progress.found = found;
    writes.count(slot);
    remember(inner, writes);
}

/// A cache layer took `writes`.
#[inline]
fn applied_cache<K, V>(
    inner: &Inner<K, V>,
    slot: &Slot<K, V>,
    writes: &Writes<'_, K, V>,
    found: u64,
    authority: Option<usize>,
    progress: &mut Progress,
) where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    if authority.is_none() {
        progress.found = found;
    }
    writes.count(slot);
    if slot.suspects.is_some() {
        let now = inner.clock.now();
        writes.for_each_key(|k| slot.cleaned([k], now));
    }
}

/// [`apply`] without a future, for a layer with synchronous operations: `None` where the
/// layer (or this form of write) must be awaited.
#[inline]
fn apply_sync<K, V>(inner: &Inner<K, V>, slot: &Slot<K, V>, writes: &Writes<'_, K, V>) -> Option<Result<u64>>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    match writes {
        // Tags are kept by the store, through its awaited `set_tagged`.
        Writes::Set { tags, .. } if !tags.is_empty() && is_store(inner, slot) => None,
        Writes::Set { key, fill, .. } if skipped(inner, slot, *fill) => {
            slot.layer.delete_sync(key).map(|r| r.map(|_| 0))
        }
        Writes::Set {
            key,
            value,
            ttl,
            fill,
            ..
        } => slot
            .layer
            .set_sync(key, value, inner.fill_ttl(slot, *ttl, *fill))
            .map(|r| r.map(|()| 0)),
        Writes::Delete { key } => slot.layer.delete_sync(key).map(|r| r.map(u64::from)),
        _ => None,
    }
}

/// Whether `slot` is the authoritative layer.
#[inline(always)]
fn is_store<K, V>(inner: &Inner<K, V>, slot: &Slot<K, V>) -> bool {
    std::ptr::eq(slot, &inner.slots[inner.authoritative])
}

/// Writes `writes` into one layer; the number of keys it held for deletes.
async fn apply<K, V>(inner: &Inner<K, V>, slot: &Slot<K, V>, writes: &Writes<'_, K, V>) -> Result<u64>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    match writes {
        Writes::Set {
            key,
            value,
            ttl,
            tags,
            ..
        } if !tags.is_empty() && is_store(inner, slot) => slot
            .set_tagged(key, value, inner.write_ttl(slot, *ttl), tags)
            .await
            .map(|()| 0),
        Writes::Set { key, fill, .. } if skipped(inner, slot, *fill) => slot.delete(key).await.map(|_| 0),
        Writes::Set {
            key,
            value,
            ttl,
            fill,
            ..
        } => slot
            .set(key, value, inner.fill_ttl(slot, *ttl, *fill))
            .await
            .map(|()| 0),
        Writes::Delete { key } => slot.delete(key).await.map(u64::from),
        Writes::SetMany { entries, ttl } => slot
            .set_many(entries, inner.write_ttl(slot, *ttl))
            .await
            .map(|()| 0),
        Writes::DeleteMany { keys } => slot.delete_many(keys).await,
        Writes::Drained { sets, deletes } => {
            for (ttl, entries) in sets.iter() {
                slot.set_many(entries, inner.write_ttl(slot, *ttl)).await?;
            }
            if deletes.is_empty() {
                return Ok(0);
            }
            slot.delete_many(deletes).await
        }
        Writes::Atomic { ops } => {
            let capped: Vec<WriteOp<K, V>> = ops
                .iter()
                .map(|op| match op {
                    WriteOp::Set { key, value, ttl } => WriteOp::Set {
                        key: key.clone(),
                        value: value.clone(),
                        ttl: inner.write_ttl(slot, *ttl),
                    },
                    WriteOp::Delete { key } => WriteOp::Delete { key: key.clone() },
                })
                .collect();
            slot.apply_atomic(&capped).await.map(|()| 0)
        }
    }
}

/// Fail-safe after the authoritative layer took `writes`: sets are the last known
/// values, deletes leave nothing to fall back on. (A drained batch was recorded when it
/// was queued.)
#[inline(always)]
fn remember<K, V>(inner: &Inner<K, V>, writes: &Writes<'_, K, V>)
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    if inner.fail_safe.is_some() {
        remember_written(inner, writes);
    }
}

#[inline(never)]
fn remember_written<K, V>(inner: &Inner<K, V>, writes: &Writes<'_, K, V>)
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    let expiry =
        |ttl: Option<Duration>| ttl.and_then(|ttl| crate::entry::expiry_for(inner.clock.now(), Some(ttl)));
    match writes {
        Writes::Set { key, value, ttl, .. } => inner.remember(key, value, expiry(*ttl)),
        Writes::SetMany { entries, ttl } => {
            let at = expiry(*ttl);
            entries.iter().for_each(|(k, v)| inner.remember(k, v, at));
        }
        Writes::Drained { .. } => {}
        Writes::Delete { .. } | Writes::DeleteMany { .. } | Writes::Atomic { .. } => {
            writes.for_each_key(|k| inner.forget(k));
        }
    }
}

/// Removes the keys of `writes` from one cache layer; when that fails, reads pass the
/// layer by for those keys until a write succeeds there.
async fn invalidate<K, V>(inner: &Inner<K, V>, slot: &Slot<K, V>, writes: &Writes<'_, K, V>) -> Result<()>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let result = match writes {
        Writes::Set { key, .. } | Writes::Delete { key } => slot.delete(key).await.map(drop),
        _ => {
            let keys: Vec<K> = writes.keys().into_iter().cloned().collect();
            slot.delete_many(&keys).await.map(drop)
        }
    };
    match result {
        Ok(()) => {
            if slot.suspects.is_some() {
                let now = inner.clock.now();
                writes.for_each_key(|k| slot.cleaned([k], now));
            }
            Ok(())
        }
        Err(e) => {
            slot.invalidation_failed(&e, &writes.keys(), inner.clock.now());
            inner.recover();
            Err(e.with_layer(slot.name.clone()))
        }
    }
}

/// [`invalidate`] in every writable layer of `layers` other than the authoritative one,
/// nearest the store first.
async fn invalidate_caches<K, V>(
    inner: &Inner<K, V>,
    writes: &Writes<'_, K, V>,
    layers: RangeInclusive<usize>,
) where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    for i in layers.rev() {
        let slot = &inner.slots[i];
        if slot.read_only || i == inner.authoritative {
            continue;
        }
        let _ = invalidate(inner, slot, writes).await;
    }
}

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Stores `value` under `key` in every writable layer, each with its own TTL.
    ///
    /// # Errors
    ///
    /// As [`set_with`](MultiLayer::set_with).
    pub async fn set(&self, key: K, value: V) -> Result<()> {
        traced!(
            "capacitor.set",
            self.inner.name,
            self.write_or_fill(&key, &value, None, None)
        )
    }

    /// Stores `value` under `key` with per-write options: a TTL (each layer keeps the
    /// entry for `min(options.ttl, layer TTL)`) and tags (the authoritative layer keeps
    /// them, for [`remove_by_tag`](MultiLayer::remove_by_tag); a write without tags drops
    /// the key's earlier ones).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] for a zero TTL, an empty tag, one longer than
    /// [`MAX_TAG_BYTES`](crate::MAX_TAG_BYTES) or more than [`MAX_TAGS`](crate::MAX_TAGS)
    /// tags; [`ErrorKind::Unsupported`] for tags when the authoritative layer keeps none
    /// or under write-back (its buffer keeps no tags); [`ErrorKind::Closed`] after close;
    /// the authoritative layer's error (nothing above it was changed); a cache layer's
    /// error only with [`fail_on_cache_error`](MultiLayerBuilder::fail_on_cache_error).
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor::memory::DashMapLayer;
    /// use capacitor::{LayerConfig, MultiLayer, SetOptions};
    ///
    /// let cache = MultiLayer::<String, u32>::builder()
    ///     .layer(LayerConfig::new("l1", DashMapLayer::new()))
    ///     .layer(LayerConfig::new("store", DashMapLayer::builder().tags(true).build()?))
    ///     .build()?;
    /// cache.set_with("order:1".into(), 10, SetOptions::new().tags(["user:42"])).await?;
    /// cache.set_with("order:2".into(), 20, SetOptions::new().tags(["user:42"])).await?;
    /// cache.set("order:3".into(), 30).await?;
    /// let removed = cache.remove_by_tag("user:42").await?;
    /// assert_eq!(removed.len(), 2);
    /// assert_eq!(cache.get(&"order:1".into()).await?, None);
    /// assert_eq!(cache.get(&"order:3".into()).await?, Some(30));
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub async fn set_with(&self, key: K, value: V, options: SetOptions) -> Result<()> {
        traced!("capacitor.set", self.inner.name, async {
            if !options.tags.is_empty() {
                self.check_tags(&options.tags)?;
            }
            self.write_tagged(&key, &value, options.ttl, None, &options.tags)
                .await
        })
    }

    /// Refuses tags the composer cannot keep.
    fn check_tags(&self, tags: &[String]) -> Result<()> {
        let op = Operation::Set;
        if tags.len() > crate::MAX_TAGS {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                op,
                format!("at most {} tags per write (got {})", crate::MAX_TAGS, tags.len()),
            ));
        }
        for tag in tags {
            crate::config::check_tag(tag, op)?;
        }
        self.check_tag_support(op)
    }

    /// Whether tags can be kept: the authoritative layer keeps them, under write-through.
    pub(super) fn check_tag_support(&self, op: Operation) -> Result<()> {
        let inner = &*self.inner;
        let store = &inner.slots[inner.authoritative];
        if !store.layer.capabilities().tags {
            return Err(
                Error::unsupported(op, "the authoritative layer does not keep tags")
                    .with_layer(store.name.clone()),
            );
        }
        if inner.queue.is_some() && op == Operation::Set {
            return Err(Error::unsupported(
                op,
                "tags need write-through: the write-back buffer does not keep them",
            )
            .with_layer(inner.name.clone()));
        }
        Ok(())
    }

    fn check_ttl(ttl: Option<Duration>, op: Operation) -> Result<()> {
        if ttl == Some(Duration::ZERO) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                op,
                "TTL must be greater than zero",
            ));
        }
        Ok(())
    }

    pub(super) async fn write(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.write_or_fill(key, value, ttl, None).await
    }

    /// [`write`](Self::write), or a loader's fill when `fill` is given (skipped when a
    /// write of the key began since the flight's ticket).
    pub(super) async fn write_or_fill(
        &self,
        key: &K,
        value: &V,
        ttl: Option<Duration>,
        fill: Option<&Fill>,
    ) -> Result<()> {
        self.write_tagged(key, value, ttl, fill, &[]).await
    }

    /// [`write_or_fill`](Self::write_or_fill) with tags (checked by the caller).
    async fn write_tagged(
        &self,
        key: &K,
        value: &V,
        ttl: Option<Duration>,
        fill: Option<&Fill>,
        tags: &[String],
    ) -> Result<()> {
        self.check_open(Operation::Set)?;
        Self::check_ttl(ttl, Operation::Set)?;
        let inner = &*self.inner;
        let writes = Writes::Set {
            key,
            value,
            ttl,
            fill,
            tags,
        };
        if let Some(queue) = &inner.queue {
            // What a layer would refuse when the drain writes it is refused now, before
            // the write is acknowledged.
            self.check_write_everywhere(key, value, ttl)?;
            let expires_at = ttl.and_then(|ttl| crate::entry::expiry_for(inner.clock.now(), Some(ttl)));
            let pending = Pending::Set {
                value: value.clone(),
                expires_at,
            };
            return self
                .write_back(&writes, pending, queue, Operation::Set)
                .await
                .map(drop);
        }
        let written = self.write_through(&writes).await?;
        self.cache_result(written).map(drop)
    }

    /// [`Layer::check_write`](crate::Layer::check_write) in every writable layer, with the
    /// TTL each would be given; the first refusal, naming its layer.
    pub(super) fn check_write_everywhere(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        let inner = &*self.inner;
        for slot in inner.slots.iter().filter(|s| !s.read_only) {
            slot.layer
                .check_write(key, value, min_ttl(slot.ttl, ttl))
                .map_err(|e| e.with_layer(slot.name.clone()))?;
        }
        Ok(())
    }

    /// Under write-back: queues the write, then applies it to L1 through the write path
    /// (an L1 failure leaves the key out of L1; the buffer serves it meanwhile).
    async fn write_back(
        &self,
        writes: &Writes<'_, K, V>,
        pending: Pending<V>,
        queue: &Queue<K, V>,
        op: Operation,
    ) -> Result<Written> {
        let inner = &*self.inner;
        let key = match writes {
            Writes::Set { key, .. } | Writes::Delete { key } => *key,
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    op,
                    "write-back queues single writes",
                ))
            }
        };
        // Entered before the push: the buffer and L1 then see overlapping writes of the
        // key in one order, or L1 loses the key (see `fan_out`).
        let scope = WriteScope::enter(inner, writes, 0..=0);
        if scope.refused {
            return fan_out(scope, None).await;
        }
        if inner.filling.any() && writes.announced() {
            inner.filling.wait_for(&writes.keys()).await;
        }
        match &pending {
            Pending::Set { value, expires_at } => {
                queue.push(key, pending.clone(), op).await?;
                inner.remember(key, value, *expires_at);
            }
            Pending::Delete => {
                inner.forget(key);
                queue.push(key, Pending::Delete, op).await?;
            }
        }
        fan_out(scope, None).await
    }

    /// A write's result from what the write path reported: a cache layer's error only
    /// with [`fail_on_cache_error`](MultiLayerBuilder::fail_on_cache_error).
    pub(super) fn cache_result(&self, written: Written) -> Result<u64> {
        match written.cache_error {
            Some(err) if self.inner.fail_on_cache_error => Err(err),
            _ => Ok(written.found),
        }
    }

    /// Removes `key` from every writable layer, bottom-up. Returns whether the
    /// authoritative layer held it.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] after close; the authoritative layer's error (nothing above
    /// it was changed); a cache layer's error only with
    /// [`fail_on_cache_error`](MultiLayerBuilder::fail_on_cache_error). A cache layer that
    /// fails to delete may serve the old value until its TTL ends; the error is counted.
    pub async fn delete(&self, key: &K) -> Result<bool> {
        traced!("capacitor.delete", self.inner.name, self.remove(key))
    }

    async fn remove(&self, key: &K) -> Result<bool> {
        self.check_open(Operation::Delete)?;
        let inner = &*self.inner;
        let writes = Writes::Delete { key };
        if let Some(queue) = &inner.queue {
            let pending = self.buffered(key);
            let written = self
                .write_back(&writes, Pending::Delete, queue, Operation::Delete)
                .await?;
            return Ok(written.found > 0 || matches!(pending, Some(Some(_))));
        }
        let written = self.write_through(&writes).await?;
        self.cache_result(written).map(|found| found > 0)
    }

    /// Stores every `(key, value)` in every writable layer through the layers' batch
    /// forms, bottom first, with the same failure rules as [`set`](MultiLayer::set).
    ///
    /// # Errors
    ///
    /// As [`set_with`](MultiLayer::set_with). If the authoritative layer fails part-way,
    /// whether earlier entries of the batch were stored depends on that layer (atomic for
    /// layers with batch transactions, a prefix of the batch for the default loop).
    pub async fn set_many(&self, entries: &[(K, V)], options: SetOptions) -> Result<()> {
        self.check_open(Operation::SetMany)?;
        Self::check_ttl(options.ttl, Operation::SetMany)?;
        if self.inner.queue.is_some() {
            for (key, value) in entries {
                self.write(key, value, options.ttl).await?;
            }
            return Ok(());
        }
        let writes = Writes::SetMany {
            entries,
            ttl: options.ttl,
        };
        let written = self.write_through(&writes).await?;
        self.cache_result(written).map(drop)
    }

    /// Removes every key from every writable layer, bottom-up; returns how many the
    /// authoritative layer held.
    ///
    /// # Errors
    ///
    /// As [`delete`](MultiLayer::delete).
    pub async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        self.check_open(Operation::DeleteMany)?;
        if self.inner.queue.is_some() {
            let mut removed = 0;
            for key in keys {
                removed += u64::from(MultiLayer::delete(self, key).await?);
            }
            return Ok(removed);
        }
        let written = self.write_through(&Writes::DeleteMany { keys }).await?;
        self.cache_result(written)
    }

    /// Removes every key whose last write carried `tag` ([`SetOptions::tags`]) from every
    /// layer and, through the invalidation bus, from every instance's in-process layers;
    /// returns the keys (those that had expired included).
    ///
    /// The authoritative layer keeps the tags and removes the entries first (atomically
    /// where it can: one transaction in PostgreSQL and the embedded store); then the keys
    /// are removed from the cache layers above, as a delete does, and announced. A write
    /// of one of the keys racing the call survives it if the store took it after the
    /// removal. Under write-back the tags of keys written since are those of the
    /// drained writes (none).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] for an empty tag or one longer than
    /// [`MAX_TAG_BYTES`](crate::MAX_TAG_BYTES); [`ErrorKind::Unsupported`] when the
    /// authoritative layer keeps no tags; [`ErrorKind::Closed`] after close; the
    /// authoritative layer's error (nothing removed above it); a cache layer's error
    /// only with [`fail_on_cache_error`](MultiLayerBuilder::fail_on_cache_error) (the
    /// layer is cleaned when it answers again, see the semantics).
    pub async fn remove_by_tag(&self, tag: &str) -> Result<Vec<K>> {
        traced!("capacitor.remove_by_tag", self.inner.name, async {
            let op = Operation::DeleteMany;
            self.check_open(op)?;
            crate::config::check_tag(tag, op)?;
            self.check_tag_support(op)?;
            let inner = &*self.inner;
            let store = &inner.slots[inner.authoritative];
            let keys = store.remove_by_tag(tag).await.map_err(|e| store.error(e))?;
            if keys.is_empty() {
                return Ok(keys);
            }
            (0..keys.len()).for_each(|_| store.counters.incr(Counter::Delete));
            keys.iter().for_each(|k| inner.forget(k));
            let mut cache_error = None;
            if inner.authoritative > 0 {
                let writes = Writes::DeleteMany { keys: &keys };
                let scope = WriteScope::enter(inner, &writes, 0..=inner.authoritative - 1);
                cache_error = fan_out(scope, None).await?.cache_error;
            }
            let refs: Vec<&K> = keys.iter().collect();
            let wait = inner.announce(refs.iter().copied());
            inner.wait_announced(wait, &refs).await;
            match cache_error {
                Some(e) if inner.fail_on_cache_error => Err(e),
                _ => Ok(keys),
            }
        })
    }

    /// Writes every writable layer, the authoritative one first (see `write`).
    async fn write_through(&self, writes: &Writes<'_, K, V>) -> Result<Written> {
        let inner = &*self.inner;
        let mut scope = WriteScope::enter(inner, writes, 0..=inner.authoritative);
        if inner.filling.any() && writes.announced() {
            // A fill that began before this write: it ends before this write begins.
            inner.filling.wait_for(&writes.keys()).await;
        }
        let authority = Some(inner.authoritative);
        match start(&mut scope, authority) {
            Ok(done) => done,
            Err(progress) => fan_out_awaited(scope, authority, progress).await,
        }
    }
}

impl<K, V> Inner<K, V> {
    /// [`write_ttl`](Self::write_ttl), or for a load's fill the TTL its options give
    /// `slot`.
    #[inline(always)]
    fn fill_ttl(&self, slot: &Slot<K, V>, ttl: Option<Duration>, fill: Option<&Fill>) -> Option<Duration> {
        let own = match fill {
            Some(f) if f.layered => f
                .layer_ttl
                .as_ref()
                .and_then(|t| t.get(index_of(self, slot)).copied().flatten()),
            _ => None,
        };
        match own {
            None => self.write_ttl(slot, ttl),
            Some(own) => {
                let ttl = min_ttl(Some(own), ttl);
                if self.ttl_jitter > 0.0 {
                    jitter(ttl, self.ttl_jitter)
                } else {
                    ttl
                }
            }
        }
    }

    /// The TTL a write gives `slot`: the shorter of the layer's and the write's, jittered.
    #[inline(always)]
    fn write_ttl(&self, slot: &Slot<K, V>, ttl: Option<Duration>) -> Option<Duration> {
        let ttl = match (slot.ttl, ttl) {
            (None, None) => return None,
            (a, b) => min_ttl(a, b),
        };
        if self.ttl_jitter > 0.0 {
            jitter(ttl, self.ttl_jitter)
        } else {
            ttl
        }
    }
}
