//! The lazy stream [`SledLayer::scan`](crate::SledLayer) returns.

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use capacitor_core::{envelope, Codec, Entry, Error, Operation, Result, StorageKey};
use futures_core::Stream;

use crate::core::Shared;
use crate::error::sled_error;

/// Entries one poll may skip (expired ones) before it yields to the runtime, so that a
/// prefix full of expired entries does not hold a worker thread for the whole walk.
const SKIP_BUDGET: usize = 128;

/// Walks a sled iterator one entry per item: memory is bounded by the entry in hand and
/// the iterator's cached leaf node, whatever the size of the prefix.
pub(crate) struct ScanStream<K, V, C> {
    iter: sled::Iter,
    shared: Arc<Shared<C>>,
    done: bool,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V, C> ScanStream<K, V, C> {
    pub(crate) fn new(iter: sled::Iter, shared: Arc<Shared<C>>) -> Self {
        ScanStream {
            iter,
            shared,
            done: false,
            _types: PhantomData,
        }
    }
}

impl<K, V, C> Stream for ScanStream<K, V, C>
where
    K: StorageKey,
    C: Codec<V>,
{
    type Item = Result<(K, Entry<V>)>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.shared.is_closed() {
            this.done = true;
            return Poll::Ready(Some(Err(Error::closed(Operation::Scan))));
        }
        for _ in 0..SKIP_BUDGET {
            let (key, bytes) = match this.iter.next() {
                None => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(sled_error(Operation::Scan, e))));
                }
                Some(Ok(pair)) => pair,
            };
            match envelope::open_entry(&this.shared.codec, &bytes, &this.shared.clock, Operation::Scan) {
                Ok(None) => continue,
                Ok(Some(entry)) => {
                    let item = K::decode_key(&key)
                        .map(|k| (k, entry))
                        .map_err(|e| e.with_operation(Operation::Scan));
                    return Poll::Ready(Some(item));
                }
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
