//! Randomised concurrent histories against a composer, and a checker that compares every
//! read with the writes acknowledged before it began.
//!
//! [`run_history`] has `tasks` tasks run random operations (get, get_many, set, delete,
//! set_many, delete_many, get_or_load, and transactions when the store has them) on a few
//! keys, so that they collide, and records each operation's interval on one logical clock.
//! Every value written is unique, so a read names the write it saw. [`History::check`]
//! then holds each read to this rule: the write it saw (or a delete, or the initial
//! absence, for a miss) began before the read ended, and no write of the key that was
//! acknowledged before the read began had begun after that write ended. Writes that
//! failed count as possibly applied, never as superseding.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::SetOptions;
use crate::multi::MultiLayer;

/// What one recorded operation did to one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// Read `None` or the value.
    Read(Option<u64>),
    /// Wrote `Some(value)` or deleted (`None`).
    Write(Option<u64>),
}

#[derive(Debug, Clone)]
struct Event {
    op: &'static str,
    key: String,
    effect: Effect,
    start: u64,
    end: u64,
    acknowledged: bool,
}

/// A violation found by [`History::check`].
#[derive(Debug, Clone)]
pub struct Violation(String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The recorded operations of one run.
#[derive(Debug, Default)]
pub struct History {
    clock: AtomicU64,
    events: Mutex<Vec<Event>>,
}

impl History {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn record(&self, events: impl IntoIterator<Item = Event>) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(events);
    }

    /// How many reads and writes were recorded.
    pub fn len(&self) -> usize {
        self.events.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A hash of every recorded operation in order (what it did, to which key, when): two
    /// runs with equal fingerprints interleaved their operations the same way.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same history gives the same fingerprint in every
        // process.
        #[allow(deprecated)]
        let mut hasher = std::hash::SipHasher::new();
        for e in self.events.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            (e.op, &e.key, e.start, e.end, e.acknowledged).hash(&mut hasher);
            match e.effect {
                Effect::Read(v) => (0u8, v).hash(&mut hasher),
                Effect::Write(v) => (1u8, v).hash(&mut hasher),
            }
        }
        hasher.finish()
    }

    /// Every read that returned something a write acknowledged before the read began had
    /// replaced, and, given `finals` (what the authoritative layer holds per key after
    /// quiescence), every key whose final value is not the outcome of the history.
    pub fn check(&self, finals: &HashMap<String, Option<u64>>) -> Vec<Violation> {
        let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        let mut by_key: HashMap<&str, Vec<&Event>> = HashMap::new();
        for e in events.iter() {
            by_key.entry(e.key.as_str()).or_default().push(e);
        }
        let mut violations = Vec::new();
        let end_of_time = u64::MAX;
        for (key, evs) in &by_key {
            let writes: Vec<&Event> = evs
                .iter()
                .copied()
                .filter(|e| matches!(e.effect, Effect::Write(_)))
                .collect();
            let admissible = |seen: Option<u64>, start: u64, end: u64| -> bool {
                // The initial absence is a delete that ended before everything.
                let initial = (seen.is_none()).then_some((0u64, 0u64));
                let sources = writes
                    .iter()
                    .filter(|w| w.effect == Effect::Write(seen))
                    .map(|w| (w.start, w.end))
                    .chain(initial);
                sources.into_iter().any(|(ws, we)| {
                    ws < end
                        && !writes
                            .iter()
                            .any(|o| o.acknowledged && o.start > we && o.end < start)
                })
            };
            for e in evs {
                if let Effect::Read(seen) = e.effect {
                    if !admissible(seen, e.start, e.end) {
                        let source = writes.iter().find(|w| w.effect == Effect::Write(seen));
                        let newer: Vec<String> = writes
                            .iter()
                            .filter(|o| {
                                o.acknowledged && source.is_some_and(|s| o.start > s.end) && o.end < e.start
                            })
                            .take(3)
                            .map(|o| format!("{} {:?} in [{}, {}]", o.op, o.effect, o.start, o.end))
                            .collect();
                        if std::env::var_os("CAPACITOR_HISTORY_DUMP").is_some() {
                            for o in evs
                                .iter()
                                .filter(|o| o.end + 40 >= e.start && o.start <= e.end + 5)
                            {
                                eprintln!(
                                    "  {} {:?} [{}, {}] ack={}",
                                    o.op, o.effect, o.start, o.end, o.acknowledged
                                );
                            }
                        }
                        violations.push(Violation(format!(
                            "{} of {key} in [{}, {}] returned {seen:?} (written by {}), replaced by {newer:?}",
                            e.op,
                            e.start,
                            e.end,
                            source.map_or("nothing".to_string(), |s| format!("{} in [{}, {}]", s.op, s.start, s.end)),
                        )));
                    }
                }
            }
            let last = finals.get(*key).copied().flatten();
            if !admissible(last, end_of_time - 1, end_of_time) {
                violations.push(Violation(format!(
                    "the store holds {last:?} for {key} after quiescence, which an acknowledged write replaced"
                )));
            }
        }
        violations
    }
}

/// A small deterministic generator (xorshift64*): histories reproduce from their seed's
/// choices (not their timing).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The shape of a [`run_history`] run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HistoryOptions {
    /// Concurrent tasks (default 8).
    pub tasks: usize,
    /// Operations per task (default 200).
    pub ops_per_task: usize,
    /// Keys, all prefixed with `prefix` (default 4).
    pub keys: usize,
    /// Key prefix (default `"h:"`).
    pub prefix: String,
    /// Include transactions (the store must have them).
    pub transactions: bool,
    /// Seed of the operation choices.
    pub seed: u64,
    /// Bound on each operation (a hung operation fails the run).
    pub op_timeout: Duration,
}

impl Default for HistoryOptions {
    fn default() -> Self {
        HistoryOptions {
            tasks: 8,
            ops_per_task: 200,
            keys: 4,
            prefix: "h:".to_string(),
            transactions: false,
            seed: 1,
            op_timeout: Duration::from_secs(20),
        }
    }
}

impl HistoryOptions {
    /// The defaults with the given seed.
    pub fn seeded(seed: u64) -> Self {
        HistoryOptions {
            seed,
            ..HistoryOptions::default()
        }
    }

    /// Sets [`HistoryOptions::transactions`].
    #[must_use]
    pub fn with_transactions(mut self, on: bool) -> Self {
        self.transactions = on;
        self
    }

    /// Sets [`HistoryOptions::prefix`].
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets [`HistoryOptions::tasks`] and [`HistoryOptions::ops_per_task`].
    #[must_use]
    pub fn with_size(mut self, tasks: usize, ops_per_task: usize) -> Self {
        self.tasks = tasks;
        self.ops_per_task = ops_per_task;
        self
    }

    /// The keys of the run.
    pub fn key_names(&self) -> Vec<String> {
        (0..self.keys).map(|i| format!("{}{i}", self.prefix)).collect()
    }
}

/// Runs a random concurrent history against `cache` and returns it for checking.
///
/// # Panics
///
/// When an operation does not finish within [`HistoryOptions::op_timeout`].
pub async fn run_history(cache: &MultiLayer<String, u64>, options: &HistoryOptions) -> Arc<History> {
    let history = Arc::new(History::default());
    let keys = Arc::new(options.key_names());
    let values = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for t in 0..options.tasks {
        let cache = cache.clone();
        let history = Arc::clone(&history);
        let keys = Arc::clone(&keys);
        let values = Arc::clone(&values);
        let options = options.clone();
        let mut rng = Rng(options.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (t as u64 + 1) | 1);
        tasks.push(tokio::spawn(async move {
            for _ in 0..options.ops_per_task {
                let step = one_op(&cache, &history, &keys, &values, &mut rng, options.transactions);
                if tokio::time::timeout(options.op_timeout, step).await.is_err() {
                    panic!("an operation took longer than {:?}", options.op_timeout);
                }
            }
        }));
    }
    for task in tasks {
        if let Err(e) = task.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    // Loads that outlived their callers (0-3 ms loaders) finish before the caller
    // compares the layers.
    tokio::time::sleep(Duration::from_millis(50)).await;
    history
}

async fn one_op(
    cache: &MultiLayer<String, u64>,
    history: &History,
    keys: &[String],
    values: &AtomicU64,
    rng: &mut Rng,
    transactions: bool,
) {
    let pick = |rng: &mut Rng| keys[rng.below(keys.len() as u64) as usize].clone();
    let fresh = || values.fetch_add(1, Ordering::SeqCst);
    let ev = |op, key: &String, effect, start, end, acknowledged| Event {
        op,
        key: key.clone(),
        effect,
        start,
        end,
        acknowledged,
    };
    let kinds = if transactions { 10 } else { 9 };
    match rng.below(kinds) {
        8 => {
            let (key, value) = (pick(rng), fresh());
            load_with_options(cache, history, rng, key, value).await;
        }
        0 | 1 => {
            let key = pick(rng);
            let start = history.tick();
            let got = cache.get(&key).await;
            let end = history.tick();
            if let Ok(seen) = got {
                history.record([ev("get", &key, Effect::Read(seen), start, end, true)]);
            }
        }
        2 => {
            let (a, b) = (pick(rng), pick(rng));
            let wanted = [a, b];
            let start = history.tick();
            let got = cache.get_many(&wanted).await;
            let end = history.tick();
            if let Ok(seen) = got {
                history.record(
                    wanted
                        .iter()
                        .zip(seen)
                        .map(|(k, v)| ev("get_many", k, Effect::Read(v), start, end, true)),
                );
            }
        }
        3 | 4 => {
            let (key, value) = (pick(rng), fresh());
            let start = history.tick();
            let ok = cache.set(key.clone(), value).await.is_ok();
            let end = history.tick();
            history.record([ev("set", &key, Effect::Write(Some(value)), start, end, ok)]);
        }
        5 => {
            let key = pick(rng);
            let start = history.tick();
            let ok = cache.delete(&key).await.is_ok();
            let end = history.tick();
            history.record([ev("delete", &key, Effect::Write(None), start, end, ok)]);
        }
        6 => {
            let (a, b) = (pick(rng), pick(rng));
            if rng.below(2) == 0 && a != b {
                let entries = [(a, fresh()), (b, fresh())];
                let start = history.tick();
                let ok = cache.set_many(&entries, SetOptions::default()).await.is_ok();
                let end = history.tick();
                history.record(
                    entries
                        .iter()
                        .map(|(k, v)| ev("set_many", k, Effect::Write(Some(*v)), start, end, ok)),
                );
            } else {
                let wanted = if a == b { vec![a] } else { vec![a, b] };
                let start = history.tick();
                let ok = cache.delete_many(&wanted).await.is_ok();
                let end = history.tick();
                history.record(
                    wanted
                        .iter()
                        .map(|k| ev("delete_many", k, Effect::Write(None), start, end, ok)),
                );
            }
        }
        7 => {
            let (key, value) = (pick(rng), fresh());
            let start = history.tick();
            let got = cache.get_or_load(&key, move || async move { value }).await;
            let end = history.tick();
            // The loaded value is a write that may be cached; the answer a read.
            let mut events = vec![ev(
                "get_or_load fill",
                &key,
                Effect::Write(Some(value)),
                start,
                end,
                false,
            )];
            if let Ok(seen) = got {
                events.push(ev(
                    "get_or_load",
                    &key,
                    Effect::Read(Some(seen)),
                    start,
                    end,
                    true,
                ));
            }
            history.record(events);
        }
        _ => {
            let (a, b) = (pick(rng), pick(rng));
            let value = fresh();
            let Ok(mut tx) = cache.begin() else { return };
            tx.set(a.clone(), value);
            if a != b {
                tx.delete(b.clone());
            }
            let start = history.tick();
            let ok = tx.commit().await.is_ok();
            let end = history.tick();
            let mut events = vec![ev("commit", &a, Effect::Write(Some(value)), start, end, ok)];
            if a != b {
                events.push(ev("commit", &b, Effect::Write(None), start, end, ok));
            }
            history.record(events);
        }
    }
}

/// `get_or_load_with` with a 2 ms hard timeout over a loader of 0-3 ms (its value is then
/// written in the background, after the caller returned), eager refresh of copies past
/// half of a 20 ms TTL in the top layer, and at times the second layer skipped for
/// writes. The loaded value is recorded as a write that may have been applied, ending
/// when the caller returned: one that lands later must not overtake a write that began
/// since the load did (the composer refuses it), and the checker holds it to that.
async fn load_with_options(
    cache: &MultiLayer<String, u64>,
    history: &History,
    rng: &mut Rng,
    key: String,
    value: u64,
) {
    let names: Vec<String> = cache.layer_names().map(str::to_owned).collect();
    let mut options = cache.load_options().hard_timeout(Duration::from_millis(2));
    if names.len() > 1 {
        options = options
            .eager_refresh(0.5)
            .layer_ttl(names[0].clone(), Duration::from_millis(20));
    }
    if names.len() > 2 && rng.below(2) == 0 {
        options = options.skip_write(names[1].clone());
    }
    let delay = Duration::from_millis(rng.below(4));
    let start = history.tick();
    let got = cache
        .get_or_load_with(&key, &options, move || async move {
            tokio::time::sleep(delay).await;
            Ok::<_, crate::Error>(crate::Loaded::value(value))
        })
        .await;
    let end = history.tick();
    let fill = Event {
        op: "get_or_load_with fill",
        key: key.clone(),
        effect: Effect::Write(Some(value)),
        start,
        end,
        acknowledged: false,
    };
    let mut events = vec![fill];
    if let Ok(seen) = got {
        events.push(Event {
            op: "get_or_load_with",
            key,
            effect: Effect::Read(seen),
            start,
            end,
            acknowledged: true,
        });
    }
    history.record(events);
}
