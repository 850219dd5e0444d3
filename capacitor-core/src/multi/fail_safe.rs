//! Fail-safe: recording the last known value of a key, and serving it when a read fails.

use std::hash::Hash;

use super::Inner;
use crate::entry::{Entry, Timestamp};
use crate::error::{Error, ErrorKind, Result};
use crate::guard::Ticket;

impl<K, V> Inner<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    /// Fail-safe: `value` is the current value of `key`, expiring at `expires_at`.
    pub(super) fn remember(&self, key: &K, value: &V, expires_at: Option<Timestamp>) {
        if let Some(fail_safe) = &self.fail_safe {
            fail_safe.record(key, value, expires_at, self.clock.now());
        }
    }

    /// Fail-safe: `value`, just read below the top layer under `ticket`, is the current
    /// value of `key`, unless a write of the key began since the ticket (checked before
    /// and after the record, as a promotion is: the writer's record must not be
    /// overwritten by the older value this read found).
    #[inline(never)]
    pub(super) fn remember_read(&self, key: &K, entry: &Entry<V>, ticket: Ticket) {
        if let Some(fail_safe) = &self.fail_safe {
            let _copy = self.guard.begin_copy(ticket);
            if !self.guard.still_valid(ticket) {
                return;
            }
            fail_safe.record(key, &entry.value, entry.expires_at, self.clock.now());
            if !self.guard.still_valid(ticket) {
                fail_safe.forget(key);
            }
        }
    }

    /// Fail-safe: `key` no longer has a value to fall back on.
    pub(super) fn forget(&self, key: &K) {
        if let Some(fail_safe) = &self.fail_safe {
            fail_safe.forget(key);
        }
    }

    /// A batch read of `keys[p]` for every `p` in `failed` failed with `err`: `out` with
    /// their fail-safe copies, or the error when one of them has none.
    pub(super) fn stale_many(
        &self,
        keys: &[K],
        failed: &[usize],
        mut out: Vec<Option<Entry<V>>>,
        err: Error,
    ) -> Result<Vec<Option<Entry<V>>>> {
        let Some(fail_safe) = &self.fail_safe else {
            return Err(err);
        };
        let now = self.clock.now();
        for &p in failed {
            match fail_safe.peek(&keys[p], now) {
                Some(entry) => out[p] = Some(entry),
                None => {
                    fail_safe.counted(false, 1);
                    return Err(err);
                }
            }
        }
        fail_safe.counted(true, failed.len());
        Ok(out)
    }

    /// A read of `key` failed with `err`: the fail-safe copy, or the error.
    #[inline(never)]
    pub(super) fn stale_or(&self, key: &K, err: Error) -> Result<Option<Entry<V>>> {
        let servable = !matches!(
            err.kind(),
            ErrorKind::Closed | ErrorKind::InvalidInput | ErrorKind::Unsupported
        );
        match &self.fail_safe {
            Some(fail_safe) if servable => match fail_safe.stale(key, self.clock.now()) {
                Some(entry) => {
                    crate::observe::stale_hit(&self.name);
                    crate::observe::read_outcome(None, false, "stale");
                    Ok(Some(entry))
                }
                None => {
                    crate::observe::read_outcome(None, false, "error");
                    Err(err)
                }
            },
            _ => {
                crate::observe::read_outcome(None, false, "error");
                Err(err)
            }
        }
    }
}
