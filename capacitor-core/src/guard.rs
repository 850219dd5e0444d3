//! Per-key write order: overlap detection for writers, tickets for readers.
//!
//! Keys hash onto striped pairs of counters (`in_flight`, `version`):
//!
//! - a **writer** increments both before touching any layer ([`Generations::begin_write`])
//!   and, after its last layer write, asks [`WriteGuard::finish`] whether another write of
//!   the stripe overlapped it: one was in flight when it began, or one began since. Layers
//!   may then have applied the two writes in different orders (the store A then B, L1 B
//!   then A), so the writer that sees an overlap removes the key from every cache layer
//!   once its own writes are done. The last of a group of overlapping writers always sees
//!   the overlap (it began while another was in flight, or another began after it), so
//!   after the group the caches hold nothing or, later, what a read copies from the store.
//!   A guard dropped without `finish` (the write's future was dropped half-way) leaves
//!   `in_flight` raised until the composer has invalidated the key (see `WriteScope`).
//! - a **reader** takes a [`Ticket`] before it reads below the top layer. The ticket is
//!   void if a writer was in flight then (that writer may have written the upper layer
//!   already while the lower one still held the old value); the reader copies what it
//!   read upward (promotion, fail-safe record, loader fill) only while the version is
//!   unchanged, and checks once more after its write, undoing it if a writer began
//!   meanwhile (a later miss is harmless, a stale hit is not).
//!
//! Stripes only ever cause false positives (a skipped promotion, an extra invalidation),
//! never a missed race. Nothing here is touched by an L1 hit.

use std::hash::{BuildHasher, Hash};

use rustc_hash::FxBuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

const STRIPES: usize = 1024;

#[derive(Default)]
struct Stripe {
    version: AtomicU64,
    in_flight: AtomicU64,
    /// Copies upward (promotions, fail-safe records) between their first check and their
    /// last: a writer does not return while one runs, so a copy that passed its check
    /// before the writer began, and lands after the writer's own write, is undone by its
    /// second check before the writer is acknowledged.
    copying: AtomicU64,
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

/// Held by a writer while it writes; [`finish`](WriteGuard::finish) ends the write.
pub(crate) struct WriteGuard<'a> {
    stripe: &'a Stripe,
    /// Another write of the stripe was in flight when this one began.
    joined: bool,
    /// The stripe's version this write set.
    version: u64,
}

impl WriteGuard<'_> {
    /// Whether another write of the stripe overlapped this one (checked before this write
    /// leaves, so that a writer beginning after the check still sees this one in flight).
    #[inline]
    pub(crate) fn overlapped(&self) -> bool {
        self.joined || self.stripe.version.load(Ordering::SeqCst) != self.version
    }
}

impl WriteGuard<'_> {
    /// Whether this write is the first of its stripe since `ticket` was taken, with no
    /// other write in flight: a loader's fill may then go ahead under that ticket.
    #[inline]
    pub(crate) fn first_since(&self, ticket: Ticket) -> bool {
        ticket.valid && !self.joined && self.version == ticket.version.wrapping_add(1)
    }

    /// The stripe's version this write set.
    #[inline]
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// Whether a copy upward of the stripe is between its checks.
    #[inline]
    pub(crate) fn copies_running(&self) -> bool {
        self.stripe.copying.load(Ordering::SeqCst) > 0
    }
}

/// Held by a reader from before its first check of a [`Ticket`] to after its last (see
/// [`Generations::begin_copy`]).
pub(crate) struct CopyGuard<'a> {
    /// `None` for a copy whose ticket was void already: it will not copy, and must not
    /// keep writers waiting (readers arriving during a write would starve it).
    stripe: Option<&'a Stripe>,
}

impl Drop for CopyGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(stripe) = self.stripe {
            stripe.copying.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for WriteGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.stripe.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Which stripes saw a write since a [`Snapshot`] was taken, for readers that cannot take
/// a ticket per key before reading (a scan reads keys it does not know in advance).
pub(crate) struct Snapshot {
    versions: Box<[u64]>,
}

impl Generations {
    pub(crate) fn new() -> Self {
        Generations {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            hasher: FxBuildHasher,
        }
    }

    #[inline]
    pub(crate) fn stripe_of<K: Hash>(&self, key: &K) -> usize {
        (self.hasher.hash_one(key) as usize) % STRIPES
    }

    #[inline]
    pub(crate) fn begin_write(&self, stripe: usize) -> WriteGuard<'_> {
        let s = &self.stripes[stripe];
        let joined = s.in_flight.fetch_add(1, Ordering::SeqCst) > 0;
        let version = s.version.fetch_add(1, Ordering::SeqCst) + 1;
        WriteGuard {
            stripe: s,
            joined,
            version,
        }
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

    /// Announces a copy upward under `ticket` (taken before its checks, dropped after):
    /// either the copy's check sees a writer's version, or the writer sees the copy.
    #[inline]
    pub(crate) fn begin_copy(&self, ticket: Ticket) -> CopyGuard<'_> {
        if !self.still_valid(ticket) {
            return CopyGuard { stripe: None };
        }
        // Announced, then checked again by the copy (SeqCst both): a writer that bumped
        // the version after this load either sees the announcement or is seen by the check.
        let stripe = &self.stripes[ticket.stripe];
        stripe.copying.fetch_add(1, Ordering::SeqCst);
        CopyGuard { stripe: Some(stripe) }
    }

    /// Whether no write of the stripe started since the ticket was taken.
    #[inline]
    pub(crate) fn still_valid(&self, ticket: Ticket) -> bool {
        ticket.valid && self.stripes[ticket.stripe].version.load(Ordering::SeqCst) == ticket.version
    }

    /// Whether the latest write begun on `ticket`'s stripe set `version` (no write began
    /// after it).
    #[inline]
    pub(crate) fn latest_is(&self, ticket: Ticket, version: u64) -> bool {
        self.stripes[ticket.stripe].version.load(Ordering::SeqCst) == version
    }

    /// The version of every stripe, a stripe with a write in flight marked void.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            versions: self
                .stripes
                .iter()
                .map(|s| {
                    let version = s.version.load(Ordering::SeqCst);
                    if s.in_flight.load(Ordering::SeqCst) == 0 {
                        version
                    } else {
                        u64::MAX
                    }
                })
                .collect(),
        }
    }

    /// A ticket for `stripe` as of `snapshot`: valid when no write of the stripe was in
    /// flight then or began since.
    pub(crate) fn ticket_as_of(&self, snapshot: &Snapshot, stripe: usize) -> Ticket {
        let version = snapshot.versions[stripe];
        Ticket {
            stripe,
            version,
            valid: version != u64::MAX && self.ticket(stripe).valid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_sees_every_overlap_and_tickets_see_every_write() {
        let g = Generations::new();
        let alone = g.begin_write(7);
        assert!(!alone.overlapped());
        drop(alone);

        // B begins while A is in flight; A finishes first, then B.
        let a = g.begin_write(7);
        let b = g.begin_write(7);
        assert!(a.overlapped(), "a later writer began");
        drop(a);
        assert!(b.overlapped(), "began while another was in flight");
        drop(b);

        let t = g.ticket(7);
        assert!(g.still_valid(t));
        let w = g.begin_write(7);
        assert!(!g.still_valid(t));
        assert!(
            !g.still_valid(g.ticket(7)),
            "a writer in flight voids new tickets"
        );
        drop(w);

        let snap = g.snapshot();
        assert!(g.still_valid(g.ticket_as_of(&snap, 3)));
        drop(g.begin_write(3));
        assert!(
            !g.still_valid(g.ticket_as_of(&snap, 3)),
            "a write after the snapshot"
        );
        let held = g.begin_write(4);
        let snap = g.snapshot();
        drop(held);
        assert!(
            !g.still_valid(g.ticket_as_of(&snap, 4)),
            "in flight at the snapshot"
        );
    }
}
