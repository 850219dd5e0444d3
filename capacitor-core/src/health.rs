//! Per-layer health: the circuit breaker, and the keys a cache layer may hold stale.
//!
//! A breaker is all atomics (no lock on the read path): `admit` is one relaxed load while
//! the layer is healthy.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::entry::{SharedClock, Timestamp};
use crate::error::{Error, ErrorKind};

/// Options of a layer's circuit breaker ([`LayerConfig::circuit_breaker`]).
///
/// The breaker opens after [`failures`](CircuitBreaker::failures) consecutive failed
/// operations, or when at least [`error_rate`](CircuitBreaker::error_rate) of the
/// operations in a [`window`](CircuitBreaker::window) failed (once that window saw
/// `min_calls`). While open, reads skip the layer and writes treat it as failed (the
/// write policy's failure rules apply). After [`cool_down`](CircuitBreaker::cool_down) one
/// operation is let through as a probe (half-open): success closes the breaker, failure
/// opens it for another cool-down.
///
/// Failures are timeouts, [`ErrorKind::Unavailable`] and [`ErrorKind::Backend`] errors;
/// answers such as undecodable bytes or a value too large say the layer is up.
///
/// Defaults: 5 consecutive failures, or 50% of at least 20 calls in 10 s; 5 s cool-down.
///
/// [`LayerConfig::circuit_breaker`]: crate::LayerConfig::circuit_breaker
///
/// # Examples
///
/// ```
/// use capacitor::CircuitBreaker;
/// use std::time::Duration;
///
/// let breaker = CircuitBreaker::new().failures(3).cool_down(Duration::from_secs(1));
/// assert_eq!(breaker.failures, 3);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct CircuitBreaker {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// Failed fraction of a window's calls that opens the breaker (`None`: off).
    pub error_rate: Option<f64>,
    /// Calls a window must see before its error rate counts.
    pub min_calls: u32,
    /// Length of an error-rate window.
    pub window: Duration,
    /// How long the breaker stays open before a probe.
    pub cool_down: Duration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            failures: 5,
            error_rate: Some(0.5),
            min_calls: 20,
            window: Duration::from_secs(10),
            cool_down: Duration::from_secs(5),
        }
    }
}

impl CircuitBreaker {
    /// The defaults listed above.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets [`CircuitBreaker::failures`].
    pub fn failures(mut self, n: u32) -> Self {
        self.failures = n;
        self
    }
    /// Sets [`CircuitBreaker::error_rate`] and [`CircuitBreaker::min_calls`].
    pub fn error_rate(mut self, rate: f64, min_calls: u32) -> Self {
        self.error_rate = Some(rate);
        self.min_calls = min_calls;
        self
    }
    /// Turns the error-rate condition off (consecutive failures only).
    pub fn no_error_rate(mut self) -> Self {
        self.error_rate = None;
        self
    }
    /// Sets [`CircuitBreaker::window`].
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }
    /// Sets [`CircuitBreaker::cool_down`].
    pub fn cool_down(mut self, cool_down: Duration) -> Self {
        self.cool_down = cool_down;
        self
    }

    pub(crate) fn validate(&self, field: &str) -> crate::Result<()> {
        if self.failures == 0 {
            return Err(Error::config(
                &format!("{field}.failures"),
                "must be greater than zero",
            ));
        }
        if let Some(rate) = self.error_rate {
            if !(rate > 0.0 && rate <= 1.0) {
                return Err(Error::config(
                    &format!("{field}.error_rate"),
                    "must be within (0, 1]",
                ));
            }
            if self.window.is_zero() {
                return Err(Error::config(
                    &format!("{field}.window"),
                    "must be greater than zero",
                ));
            }
        }
        if self.cool_down.is_zero() {
            return Err(Error::config(
                &format!("{field}.cool_down"),
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// The state of a layer's circuit breaker.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BreakerState {
    /// Healthy: every operation goes to the layer.
    #[default]
    Closed,
    /// Failing: the layer is skipped until the cool-down ends.
    Open,
    /// One probe operation is in flight; the others still skip the layer.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open` (stable, for logs and metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// 0 closed, 1 half-open, 2 open: the value of the `metrics` gauge.
    pub fn as_gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of a layer's breaker state, given to
/// [`MultiLayerBuilder::on_health_change`](crate::MultiLayerBuilder::on_health_change).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    /// The layer's configured name.
    pub layer: String,
    /// The state before.
    pub from: BreakerState,
    /// The state now.
    pub to: BreakerState,
}

/// Callback for breaker transitions.
pub(crate) type HealthListener = Arc<dyn Fn(&HealthEvent) + Send + Sync>;

/// What the breaker lets an operation do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    Call,
    Probe,
    Skip,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// A breaker's live state.
pub(crate) struct Breaker {
    config: CircuitBreaker,
    clock: SharedClock,
    state: AtomicU8,
    consecutive: AtomicU32,
    /// When the breaker last opened, or when the probe was let through (ms).
    since: AtomicU64,
    window_start: AtomicU64,
    window_calls: AtomicU32,
    window_failures: AtomicU32,
    pub(crate) opened: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(config: CircuitBreaker, clock: SharedClock) -> Self {
        let now = clock.now().as_millis();
        Breaker {
            config,
            clock,
            state: AtomicU8::new(CLOSED),
            consecutive: AtomicU32::new(0),
            since: AtomicU64::new(now),
            window_start: AtomicU64::new(now),
            window_calls: AtomicU32::new(0),
            window_failures: AtomicU32::new(0),
            opened: AtomicU64::new(0),
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Relaxed))
    }

    fn cooled_down(&self, now: u64) -> bool {
        let cool = u64::try_from(self.config.cool_down.as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(self.since.load(Ordering::Acquire)) >= cool
    }

    /// Whether an operation may reach the layer now. A half-open breaker whose probe has
    /// not reported within a cool-down lets another probe through (a probe cancelled by
    /// its caller reports nothing).
    #[inline]
    pub(crate) fn admit(&self) -> (Admit, Option<(BreakerState, BreakerState)>) {
        let state = self.state.load(Ordering::Relaxed);
        if state == CLOSED {
            return (Admit::Call, None);
        }
        let now = self.clock.now().as_millis();
        if !self.cooled_down(now) {
            return (Admit::Skip, None);
        }
        if self
            .state
            .compare_exchange(state, HALF_OPEN, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.since.store(now, Ordering::Release);
            let change = (state == OPEN).then_some((BreakerState::Open, BreakerState::HalfOpen));
            return (Admit::Probe, change);
        }
        (Admit::Skip, None)
    }

    /// Reports an operation's outcome; returns a state change, if any.
    pub(crate) fn report(&self, admit: Admit, failed: bool) -> Option<(BreakerState, BreakerState)> {
        let now = self.clock.now().as_millis();
        if admit == Admit::Probe {
            let to = if failed { OPEN } else { CLOSED };
            self.consecutive.store(0, Ordering::Relaxed);
            self.reset_window(now);
            self.since.store(now, Ordering::Release);
            if self
                .state
                .compare_exchange(HALF_OPEN, to, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                if failed {
                    self.opened.fetch_add(1, Ordering::Relaxed);
                }
                return Some((BreakerState::HalfOpen, BreakerState::from_u8(to)));
            }
            return None;
        }
        if self.state.load(Ordering::Relaxed) != CLOSED {
            // An operation admitted before the breaker opened: it changes nothing.
            return None;
        }
        let window = u64::try_from(self.config.window.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(self.window_start.load(Ordering::Relaxed)) >= window {
            self.reset_window(now);
        }
        let calls = self.window_calls.fetch_add(1, Ordering::Relaxed) + 1;
        if !failed {
            self.consecutive.store(0, Ordering::Relaxed);
            return None;
        }
        let consecutive = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let failures = self.window_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let rate_tripped = self.config.error_rate.is_some_and(|rate| {
            calls >= self.config.min_calls && f64::from(failures) >= rate * f64::from(calls)
        });
        if consecutive >= self.config.failures || rate_tripped {
            self.since.store(now, Ordering::Release);
            if self
                .state
                .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.opened.fetch_add(1, Ordering::Relaxed);
                self.consecutive.store(0, Ordering::Relaxed);
                return Some((BreakerState::Closed, BreakerState::Open));
            }
        }
        None
    }

    fn reset_window(&self, now: u64) {
        self.window_start.store(now, Ordering::Relaxed);
        self.window_calls.store(0, Ordering::Relaxed);
        self.window_failures.store(0, Ordering::Relaxed);
    }
}

/// Whether an error says the layer is unhealthy (as opposed to answering "no").
pub(crate) fn is_failure(err: &Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Timeout | ErrorKind::Unavailable | ErrorKind::Backend
    ) && !err.is_circuit_open()
}

/// Keys a cache layer may still hold an outdated value of: a write or delete reached the
/// layers below but neither reached this layer nor could remove its copy (the layer was
/// down, or skipped by its breaker). Reads skip this layer for those keys until a later
/// write, delete or promotion of the key succeeds there.
///
/// A key whose write to this layer had an unknown outcome (it timed out, or its future was
/// dropped half-way) is *pinned*: the abandoned command may still land here after later
/// writes, so reads skip the layer for that key until the pin ends (the layer's TTL, by
/// which any copy written then has expired, or [`IN_DOUBT_WITHOUT_TTL`]), whatever is
/// written meanwhile.
///
/// Bounded: past `limit` keys the tracker gives up on single keys and has reads skip the
/// layer altogether until the layer's TTL has passed since the last key that could not
/// be recorded (every older copy has expired by then), or for good when the layer has no
/// TTL ([`DirtyKeys::overflowed`], reported in `LayerStats::suspects_overflowed`;
/// configure a TTL on cache layers).
pub(crate) struct DirtyKeys<K> {
    /// Key -> end of its pin in ms (0: not pinned, cleaned by the next write).
    keys: Mutex<HashMap<K, u64, rustc_hash::FxBuildHasher>>,
    len: AtomicUsize,
    limit: usize,
    /// Reads skip the whole layer until this time (ms), `u64::MAX`: for good.
    skip_until: AtomicU64,
    ttl: Option<Duration>,
}

/// How long a key of a cache layer without a TTL stays pinned after a write of unknown
/// outcome (an abandoned command lands within its connection's timeouts, far below this).
pub(crate) const IN_DOUBT_WITHOUT_TTL: Duration = Duration::from_secs(60);

impl<K: Hash + Eq + Clone> DirtyKeys<K> {
    pub(crate) fn new(limit: usize, ttl: Option<Duration>) -> Self {
        DirtyKeys {
            keys: Mutex::new(HashMap::default()),
            len: AtomicUsize::new(0),
            limit,
            skip_until: AtomicU64::new(0),
            ttl,
        }
    }

    /// How many keys are tracked.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the bound was ever exceeded (reads then skipped the whole layer for a TTL).
    pub(crate) fn overflowed(&self) -> bool {
        self.skip_until.load(Ordering::Relaxed) != 0
    }

    /// Whether a read of `key` must skip this layer.
    #[inline]
    pub(crate) fn skip(&self, key: &K, now: Timestamp) -> bool {
        if self.skip_until.load(Ordering::Relaxed) > now.as_millis() {
            return true;
        }
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.keys
            .lock()
            .map(|k| {
                k.get(key)
                    .is_some_and(|&until| until == 0 || until > now.as_millis())
            })
            .unwrap_or(true)
    }

    /// Reads skip the whole layer for its TTL (or for good without one): it may hold
    /// anything (a clear failed there).
    pub(crate) fn skip_all(&self, now: Timestamp) {
        let until = match self.ttl {
            Some(ttl) => now.saturating_add(ttl).as_millis(),
            None => u64::MAX,
        };
        self.skip_until.fetch_max(until, Ordering::Relaxed);
    }

    /// The layer was cleared: it holds no outdated copy (pinned keys stay pinned: an
    /// abandoned write may still land).
    pub(crate) fn cleared(&self, now: Timestamp) {
        self.skip_until.store(0, Ordering::Relaxed);
        let Ok(mut map) = self.keys.lock() else { return };
        map.retain(|_, &mut pin| pin > now.as_millis());
        self.len.store(map.len(), Ordering::Relaxed);
    }

    /// Reads skip `keys` here until a write of them succeeds here.
    pub(crate) fn mark<'a>(&self, keys: impl IntoIterator<Item = &'a K>, now: Timestamp)
    where
        K: 'a,
    {
        self.insert(keys, now, 0);
    }

    /// Reads skip `keys` here for the layer's TTL, whatever is written meanwhile: a write
    /// of them may still land here.
    pub(crate) fn pin<'a>(&self, keys: impl IntoIterator<Item = &'a K>, now: Timestamp)
    where
        K: 'a,
    {
        let until = now
            .saturating_add(self.ttl.unwrap_or(IN_DOUBT_WITHOUT_TTL))
            .as_millis()
            .max(1);
        self.insert(keys, now, until);
    }

    fn insert<'a>(&self, keys: impl IntoIterator<Item = &'a K>, now: Timestamp, until: u64)
    where
        K: 'a,
    {
        let Ok(mut map) = self.keys.lock() else { return };
        for key in keys {
            if map.len() >= self.limit && !map.contains_key(key) {
                map.retain(|_, &mut pin| pin == 0 || pin > now.as_millis());
            }
            if map.len() >= self.limit && !map.contains_key(key) {
                let ttl = self.ttl.unwrap_or(IN_DOUBT_WITHOUT_TTL);
                let until = match (self.ttl, until) {
                    (None, 0) => u64::MAX,
                    _ => now.saturating_add(ttl).as_millis(),
                };
                self.skip_until.fetch_max(until, Ordering::Relaxed);
                break;
            }
            let pin = map.entry(key.clone()).or_insert(0);
            *pin = (*pin).max(until);
        }
        self.len.store(map.len(), Ordering::Relaxed);
    }

    /// The layer now holds the current value of these keys (or none); pinned keys stay
    /// until their pin ends.
    #[inline]
    pub(crate) fn clean<'a>(&self, keys: impl IntoIterator<Item = &'a K>, now: Timestamp)
    where
        K: 'a,
    {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Ok(mut map) = self.keys.lock() else { return };
        for key in keys {
            if map.get(key).is_some_and(|&pin| pin <= now.as_millis()) {
                map.remove(key);
            }
        }
        self.len.store(map.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::ManualClock;

    fn breaker(config: CircuitBreaker) -> (Breaker, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        (Breaker::new(config, clock.clone()), clock)
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_cool_down() {
        let (b, clock) = breaker(CircuitBreaker::new().failures(3).no_error_rate());
        assert_eq!(b.report(Admit::Call, true), None);
        assert_eq!(b.report(Admit::Call, true), None);
        // A success in between resets the run.
        assert_eq!(b.report(Admit::Call, false), None);
        assert_eq!(b.report(Admit::Call, true), None);
        assert_eq!(b.report(Admit::Call, true), None);
        assert_eq!(
            b.report(Admit::Call, true),
            Some((BreakerState::Closed, BreakerState::Open))
        );
        assert_eq!(b.admit().0, Admit::Skip);
        clock.advance(Duration::from_secs(5));
        let (admit, change) = b.admit();
        assert_eq!(admit, Admit::Probe);
        assert_eq!(change, Some((BreakerState::Open, BreakerState::HalfOpen)));
        // One probe at a time.
        assert_eq!(b.admit().0, Admit::Skip);
        assert_eq!(
            b.report(Admit::Probe, true),
            Some((BreakerState::HalfOpen, BreakerState::Open))
        );
        assert_eq!(b.admit().0, Admit::Skip);
        clock.advance(Duration::from_secs(5));
        assert_eq!(b.admit().0, Admit::Probe);
        assert_eq!(
            b.report(Admit::Probe, false),
            Some((BreakerState::HalfOpen, BreakerState::Closed))
        );
        assert_eq!(b.admit().0, Admit::Call);
        assert_eq!(b.opened.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn opens_on_error_rate_within_a_window() {
        let (b, clock) = breaker(CircuitBreaker::new().failures(100).error_rate(0.5, 10));
        // 4 failures in 9 calls, alternating: under min_calls, no consecutive run.
        for i in 0..9 {
            assert_eq!(b.report(Admit::Call, i % 2 == 1), None);
        }
        // A new window forgets them.
        clock.advance(Duration::from_secs(11));
        for i in 0..9 {
            assert_eq!(b.report(Admit::Call, i % 2 == 1), None);
        }
        assert_eq!(
            b.report(Admit::Call, true),
            Some((BreakerState::Closed, BreakerState::Open)),
            "5 of 10 calls failed"
        );
    }

    #[test]
    fn a_lost_probe_is_replaced_after_a_cool_down() {
        let (b, clock) = breaker(CircuitBreaker::new().failures(1));
        b.report(Admit::Call, true);
        clock.advance(Duration::from_secs(5));
        assert_eq!(b.admit().0, Admit::Probe);
        clock.advance(Duration::from_secs(1));
        assert_eq!(b.admit().0, Admit::Skip);
        clock.advance(Duration::from_secs(4));
        assert_eq!(b.admit().0, Admit::Probe);
    }

    #[test]
    fn invalid_options_are_config_errors() {
        for (bad, field) in [
            (CircuitBreaker::new().failures(0), "b.failures"),
            (CircuitBreaker::new().error_rate(1.5, 10), "b.error_rate"),
            (CircuitBreaker::new().window(Duration::ZERO), "b.window"),
            (CircuitBreaker::new().cool_down(Duration::ZERO), "b.cool_down"),
        ] {
            let err = bad.validate("b").err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn dirty_keys_skip_reads_until_cleaned_and_bound_themselves() {
        let now = Timestamp::from_millis(1_000);
        let d = DirtyKeys::new(2, Some(Duration::from_secs(10)));
        assert!(!d.skip(&1, now));
        d.mark([&1], now);
        assert!(d.skip(&1, now) && !d.skip(&2, now));
        d.clean([&1], now);
        assert!(!d.skip(&1, now));
        d.mark([&1, &2, &3], now);
        assert!(d.overflowed());
        assert!(d.skip(&4, now), "overflow: the whole layer is skipped");
        assert!(d.skip(&4, Timestamp::from_millis(10_999)));
        assert!(
            !d.skip(&4, Timestamp::from_millis(11_000)),
            "the layer TTL has passed"
        );
    }

    #[test]
    fn pinned_keys_outlive_later_writes_until_the_layer_ttl() {
        let now = Timestamp::from_millis(1_000);
        let d = DirtyKeys::new(10, Some(Duration::from_secs(10)));
        d.pin([&1], now);
        d.clean([&1], now);
        assert!(
            d.skip(&1, Timestamp::from_millis(10_999)),
            "a write does not end a pin"
        );
        assert!(!d.skip(&1, Timestamp::from_millis(11_000)), "the TTL ends it");
        d.clean([&1], Timestamp::from_millis(11_000));
        assert_eq!(d.len(), 0);
    }
}
