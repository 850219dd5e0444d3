//! The composer's scan: the authoritative layer's stream merged with pending write-back
//! writes.

use std::collections::HashMap;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;

use crate::entry::{Entry, SharedClock};
use crate::error::Result;
use crate::layer::EntryStream;
use crate::writeback::Pending;

/// The stream of [`MultiLayer::scan`](crate::MultiLayer::scan): `(key, value)` pairs in the
/// authoritative layer's order, then pending writes of keys it did not hold.
///
/// Memory: the authoritative layer's page (bounded by the layer) plus the pending writes
/// under the prefix at the start of the scan (bounded by the write-back queue), never the
/// whole key space.
#[must_use = "streams do nothing unless polled"]
pub struct Scan<K, V> {
    inner: EntryStream<K, V>,
    /// Pending writes under the prefix, taken when the scan started; each is consumed when
    /// the authoritative stream reaches its key, the rest are yielded at the end.
    pending: HashMap<K, Pending<V>>,
    leftovers: Option<std::vec::IntoIter<(K, Pending<V>)>>,
    clock: SharedClock,
}

impl<K, V> std::fmt::Debug for Scan<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scan")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq, V> Scan<K, V> {
    pub(crate) fn new(inner: EntryStream<K, V>, pending: Vec<(K, Pending<V>)>, clock: SharedClock) -> Self {
        Scan {
            inner,
            pending: pending.into_iter().collect(),
            leftovers: None,
            clock,
        }
    }

    fn live(&self, op: Pending<V>) -> Option<V> {
        match op {
            Pending::Set { value, expires_at } => {
                (!Entry::new((), expires_at).is_expired(self.clock.now())).then_some(value)
            }
            Pending::Delete => None,
        }
    }
}

// No field is structurally pinned (the inner stream is boxed).
impl<K, V> Unpin for Scan<K, V> {}

impl<K: Hash + Eq, V> Stream for Scan<K, V> {
    type Item = Result<(K, V)>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(rest) = this.leftovers.as_mut() {
                let Some((key, op)) = rest.next() else {
                    return Poll::Ready(None);
                };
                if let Some(value) = this.live(op) {
                    return Poll::Ready(Some(Ok((key, value))));
                }
                continue;
            }
            match this.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok((key, entry)))) => match this.pending.remove(&key) {
                    None => return Poll::Ready(Some(Ok((key, entry.value)))),
                    // The pending write is newer than what the layer holds.
                    Some(op) => {
                        if let Some(value) = this.live(op) {
                            return Poll::Ready(Some(Ok((key, value))));
                        }
                    }
                },
                Poll::Ready(None) => {
                    let rest: Vec<_> = this.pending.drain().collect();
                    this.leftovers = Some(rest.into_iter());
                }
            }
        }
    }
}
