//! The promotion race guard.
//!
//! A reader that fetched a value from a lower layer must not copy it into an upper layer
//! after a concurrent `set`/`delete` of the same key has written there: that would
//! resurrect stale data for a whole TTL. Keys hash onto striped pairs of counters:
//!
//! - a writer increments `in_flight` and `version` before touching any layer, and
//!   decrements `in_flight` when done (also when its future is dropped);
//! - a reader takes a [`Ticket`] before reading the lower layers. The ticket is void if a
//!   writer was in flight then (that writer may have written the upper layer already
//!   while the lower one still holds the old value).
//! - the reader promotes only if the version still matches, and checks once more after
//!   its write; if a writer started meanwhile it removes what it wrote (a later miss is
//!   harmless, a stale hit is not).
//!
//! Stripes only ever cause false positives (a skipped promotion), never a missed race.

use std::hash::{BuildHasher, Hash};

use rustc_hash::FxBuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

const STRIPES: usize = 1024;

#[derive(Default)]
struct Stripe {
    version: AtomicU64,
    in_flight: AtomicU64,
}

pub(crate) struct Generations {
    stripes: Box<[Stripe]>,
    /// Fx, not SipHash: this hash sits on every miss and write, and a crafted collision
    /// only makes promotions of colliding keys skip more often (never a stale read).
    hasher: FxBuildHasher,
}

impl std::fmt::Debug for Generations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generations")
            .field("stripes", &self.stripes.len())
            .finish()
    }
}

/// Taken by a reader before it reads lower layers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    stripe: usize,
    version: u64,
    valid: bool,
}

/// Held by a writer while it writes; dropping it ends the write.
pub(crate) struct WriteGuard<'a> {
    stripe: &'a Stripe,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.stripe.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Generations {
    pub(crate) fn new() -> Self {
        Generations {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            hasher: FxBuildHasher,
        }
    }

    pub(crate) fn stripe_of<K: Hash>(&self, key: &K) -> usize {
        (self.hasher.hash_one(key) as usize) % STRIPES
    }

    pub(crate) fn begin_write(&self, stripe: usize) -> WriteGuard<'_> {
        let s = &self.stripes[stripe];
        s.in_flight.fetch_add(1, Ordering::SeqCst);
        s.version.fetch_add(1, Ordering::SeqCst);
        WriteGuard { stripe: s }
    }

    /// A write of every key at once (a cleared cache): every promotion in flight is void.
    pub(crate) fn begin_write_all(&self) -> Vec<WriteGuard<'_>> {
        (0..self.stripes.len()).map(|i| self.begin_write(i)).collect()
    }

    pub(crate) fn ticket(&self, stripe: usize) -> Ticket {
        let s = &self.stripes[stripe];
        let version = s.version.load(Ordering::SeqCst);
        let valid = s.in_flight.load(Ordering::SeqCst) == 0;
        Ticket {
            stripe,
            version,
            valid,
        }
    }

    /// Whether no write of the stripe started since the ticket was taken.
    pub(crate) fn still_valid(&self, ticket: Ticket) -> bool {
        ticket.valid && self.stripes[ticket.stripe].version.load(Ordering::SeqCst) == ticket.version
    }
}
