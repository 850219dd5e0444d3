//! Deadline fences for remote layers: a write that timed out can never land after a later
//! write of its key.
//!
//! A remote layer sends every write with a deadline (the wall-clock time its timeout
//! ends), and the server applies it only if it starts before then (PostgreSQL:
//! `clock_timestamp() < deadline` in the statement; Redis: `TIME` in a script). A write
//! whose outcome the layer does not learn (its timeout passed, its future was dropped, its
//! connection broke) may still be applied until that deadline, never after. [`WriteFence`]
//! keeps its keys *in doubt* until the deadline plus a margin (for the two clocks to
//! differ and the commit to follow the check); a later write of such a key through the
//! same layer waits until then, or fails with [`ErrorKind::Timeout`] without being sent if
//! its own deadline comes first. So a failed write never overwrites an acknowledged one.
//!
//! # Examples
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//! use capacitor::fence::{deadline_after, WriteFence};
//! use capacitor::{ErrorKind, Operation};
//!
//! let fence = WriteFence::new(Duration::from_millis(50));
//! let deadline = deadline_after(Duration::from_millis(100));
//! fence.clear(["k"], deadline, Operation::Set).await?; // nothing in doubt: no wait
//! let sent = fence.in_flight(vec!["k".to_string()], deadline);
//! drop(sent); // no answer: "k" is in doubt until the deadline + 50 ms
//! let sooner = deadline_after(Duration::from_millis(10));
//! let err = fence.clear(["k"], sooner, Operation::Set).await.unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::Timeout);
//! # Ok::<(), capacitor::Error>(()) }).unwrap();
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use crate::error::{Error, ErrorKind, Operation, Result};

/// Keys whose last write may still be applied, with the deadline it carried (see the
/// [module docs](self)).
#[derive(Debug)]
pub struct WriteFence {
    in_doubt: Mutex<HashMap<String, SystemTime>>,
    len: AtomicUsize,
    margin: Duration,
}

/// Far enough to be "no deadline" and representable as a `timestamptz` parameter.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The deadline of an operation that starts now under `timeout`.
pub fn deadline_after(timeout: Duration) -> SystemTime {
    let now = SystemTime::now();
    now.checked_add(timeout.min(FAR)).unwrap_or(now)
}

impl WriteFence {
    /// A fence keeping keys in doubt for `margin` past their write's deadline.
    pub fn new(margin: Duration) -> Self {
        WriteFence {
            in_doubt: Mutex::new(HashMap::new()),
            len: AtomicUsize::new(0),
            margin,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, SystemTime>> {
        self.in_doubt.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many keys are in doubt now (expired doubts included until the next
    /// [`clear`](Self::clear)).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no key is in doubt.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until no earlier write of `keys` can still be applied; an error, without
    /// waiting, if that is after `deadline` (the caller's own).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Timeout`] when a key stays in doubt past `deadline`.
    pub async fn clear<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
        deadline: SystemTime,
        op: Operation,
    ) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let until = {
            let mut map = self.lock();
            let now = SystemTime::now();
            map.retain(|_, d| d.checked_add(self.margin).is_some_and(|end| end > now));
            self.len.store(map.len(), Ordering::Relaxed);
            keys.into_iter()
                .filter_map(|k| map.get(k).copied())
                .max()
                .and_then(|d| d.checked_add(self.margin))
        };
        let Some(until) = until else { return Ok(()) };
        if until > deadline {
            return Err(Error::new(
                ErrorKind::Timeout,
                op,
                "an earlier write of this key did not answer in time and could still be applied \
                 until its deadline; this write is not sent (retry later)",
            ));
        }
        if let Ok(wait) = until.duration_since(SystemTime::now()) {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    /// Arms a guard for a write of `keys` with `deadline`, about to be sent: unless
    /// [`settled`](InFlight::settled), its keys are in doubt when it drops.
    pub fn in_flight(&self, keys: Vec<String>, deadline: SystemTime) -> InFlight<'_> {
        InFlight {
            fence: self,
            keys,
            deadline,
            armed: true,
        }
    }

    fn doubt(&self, keys: &[String], deadline: SystemTime) {
        let mut map = self.lock();
        for key in keys {
            let d = map.entry(key.clone()).or_insert(deadline);
            *d = (*d).max(deadline);
        }
        self.len.store(map.len(), Ordering::Relaxed);
    }
}

/// A sent write whose outcome is not known yet.
#[derive(Debug)]
#[must_use = "dropped unsettled, the write's keys are in doubt"]
pub struct InFlight<'a> {
    fence: &'a WriteFence,
    keys: Vec<String>,
    deadline: SystemTime,
    armed: bool,
}

impl InFlight<'_> {
    /// The server answered: the write was applied, or refused.
    pub fn settled(mut self) {
        self.armed = false;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.fence.doubt(&self.keys, self.deadline);
        }
    }
}

/// The error for a write the server skipped because it started after its deadline.
pub fn too_late(op: Operation) -> Error {
    Error::new(
        ErrorKind::Timeout,
        op,
        "the server received the write after its deadline and did not apply it",
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code: a failed expectation is the test failing
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_in_doubt_holds_back_later_writes_of_its_key_until_its_deadline() {
        let fence = WriteFence::new(Duration::from_millis(20));
        let deadline = SystemTime::now() + Duration::from_millis(60);
        drop(fence.in_flight(vec!["k".into()], deadline));
        fence.in_flight(vec!["other".into()], deadline).settled();
        assert_eq!(fence.len(), 1, "only the unsettled write is in doubt");
        let short = SystemTime::now() + Duration::from_millis(10);
        let err = fence.clear(["k"], short, Operation::Set).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        fence.clear(["other"], short, Operation::Set).await.unwrap();
        let long = SystemTime::now() + Duration::from_secs(5);
        fence.clear(["k"], long, Operation::Set).await.unwrap();
        assert!(SystemTime::now() >= deadline + Duration::from_millis(20));
    }
}
