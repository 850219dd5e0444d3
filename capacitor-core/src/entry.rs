//! Entries with their absolute expiry, timestamps and clocks.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A wall-clock instant in milliseconds since the Unix epoch.
///
/// Wall-clock time (not [`std::time::Instant`]) because expiries are shared with other
/// processes through Redis, PostgreSQL and sled; millisecond resolution matches Redis `PX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The timestamp `millis` milliseconds after the Unix epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Timestamp(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// This timestamp moved `d` later (saturating at the far future).
    #[must_use]
    pub fn saturating_add(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms))
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// Converts to a [`SystemTime`].
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }

    /// Converts from a [`SystemTime`] (times before the epoch become the epoch).
    pub fn from_system_time(t: SystemTime) -> Self {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Timestamp(ms)
    }
}

/// A source of the current time. The composer and layers that expire lazily take one, so
/// that tests can move time by hand (see `ManualClock` in the `testkit` feature).
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The real wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

/// A clock that moves only when told to. Cheap to clone; clones share the same time.
///
/// # Examples
///
/// ```
/// use capacitor::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new(1_000);
/// clock.advance(Duration::from_millis(250));
/// assert_eq!(clock.now().as_millis(), 1_250);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock reading `start_millis` since the epoch.
    pub fn new(start_millis: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(start_millis)))
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// The shared clock handle layers and the composer hold.
pub type SharedClock = Arc<dyn Clock>;

/// The default clock: [`SystemClock`].
pub fn system_clock() -> SharedClock {
    Arc::new(SystemClock)
}

/// A value with its absolute expiry, as a layer returns it.
///
/// The expiry travels with the value so that a copy promoted into an upper layer never
/// outlives its source.
///
/// # Examples
///
/// ```
/// use capacitor::{Entry, Timestamp};
/// use std::time::Duration;
///
/// let e = Entry::new("v", Some(Timestamp::from_millis(10_000)));
/// assert_eq!(e.remaining(Timestamp::from_millis(9_000)), Some(Duration::from_secs(1)));
/// assert!(e.is_expired(Timestamp::from_millis(10_000)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<V> {
    /// The stored value.
    pub value: V,
    /// When the entry expires; `None` means it does not.
    pub expires_at: Option<Timestamp>,
}

impl<V> Entry<V> {
    /// An entry with the given value and expiry.
    pub fn new(value: V, expires_at: Option<Timestamp>) -> Self {
        Entry { value, expires_at }
    }

    /// An entry that does not expire.
    pub fn persistent(value: V) -> Self {
        Entry {
            value,
            expires_at: None,
        }
    }

    /// Whether the entry has expired at `now` (an entry expiring exactly at `now` has).
    pub fn is_expired(&self, now: Timestamp) -> bool {
        matches!(self.expires_at, Some(at) if at <= now)
    }

    /// The remaining life at `now`: `None` when the entry does not expire, zero when it
    /// has expired.
    pub fn remaining(&self, now: Timestamp) -> Option<Duration> {
        self.expires_at.map(|at| at.saturating_duration_since(now))
    }

    /// Maps the value, keeping the expiry.
    pub fn map<U>(self, f: impl FnOnce(V) -> U) -> Entry<U> {
        Entry {
            value: f(self.value),
            expires_at: self.expires_at,
        }
    }
}

/// The absolute expiry of a write made at `now` with `ttl`.
pub fn expiry_for(now: Timestamp, ttl: Option<Duration>) -> Option<Timestamp> {
    ttl.map(|d| now.saturating_add(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_and_expiry() {
        let now = Timestamp::from_millis(1_000);
        let e = Entry::new(1u8, expiry_for(now, Some(Duration::from_millis(500))));
        assert_eq!(e.remaining(now), Some(Duration::from_millis(500)));
        assert!(!e.is_expired(Timestamp::from_millis(1_499)));
        assert!(e.is_expired(Timestamp::from_millis(1_500)));
        assert_eq!(e.remaining(Timestamp::from_millis(9_000)), Some(Duration::ZERO));
        assert_eq!(Entry::persistent(1u8).remaining(now), None);
    }

    #[test]
    fn huge_ttl_saturates_instead_of_overflowing() {
        let at = expiry_for(Timestamp::from_millis(5), Some(Duration::MAX));
        assert_eq!(at, Some(Timestamp::from_millis(u64::MAX)));
    }

    #[test]
    fn system_time_round_trip() {
        let t = Timestamp::from_millis(1_700_000_000_123);
        assert_eq!(Timestamp::from_system_time(t.to_system_time()), t);
    }
}
