//! The lazy stream [`RedbLayer::scan`](crate::RedbLayer) returns.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use capacitor_core::{envelope, Codec, Entry, Error, Operation, Result, StorageKey};
use futures_core::Stream;

use crate::core::{Shared, Store};
use crate::error::redb_error;

/// Entries one page holds at most.
pub(crate) const PAGE_ENTRIES: usize = 256;
/// Bytes (keys and values) after which a page ends, whatever its count: memory stays
/// bounded with large values too. A page holds at least one entry.
pub(crate) const PAGE_BYTES: usize = 1024 * 1024;
/// Entries one poll may skip (expired ones) before it yields to the runtime, so that a
/// prefix full of expired entries does not hold a worker thread for the whole walk.
const SKIP_BUDGET: usize = 128;

/// One page of a prefix scan: the entries after `after` (from the prefix's first key
/// when `None`), and whether the prefix may have more.
type Page = (VecDeque<(Vec<u8>, Vec<u8>)>, bool);

/// Reads the page of `prefix` after `after` in a read transaction of its own, dropped
/// before the page is returned: a long scan holds no read transaction between pages
/// (one would keep redb from reusing the pages that later writes free).
fn read_page(store: &Store, prefix: &[u8], after: Option<&[u8]>) -> Result<Page> {
    let op = Operation::Scan;
    store.read(op, |table| {
        let mut page = VecDeque::new();
        let Some(table) = table else {
            return Ok((page, false));
        };
        let lower = match after {
            Some(key) => Bound::Excluded(key),
            None => Bound::Included(prefix),
        };
        let range = table
            .range::<&[u8]>((lower, Bound::Unbounded))
            .map_err(|e| redb_error(op, e))?;
        let mut bytes = 0usize;
        for item in range {
            let (key, value) = item.map_err(|e| redb_error(op, e))?;
            let key = key.value();
            if !key.starts_with(prefix) {
                return Ok((page, false));
            }
            let value = value.value();
            bytes += key.len() + value.len();
            page.push_back((key.to_vec(), value.to_vec()));
            if page.len() >= PAGE_ENTRIES || bytes >= PAGE_BYTES {
                return Ok((page, true));
            }
        }
        Ok((page, false))
    })
}

/// Walks the keys under a prefix in key order, a page at a time: memory is bounded by one
/// page ([`PAGE_ENTRIES`] entries or [`PAGE_BYTES`] bytes), whatever the size of the
/// prefix. Each page is read from the database as it is at that moment, so a write made
/// during the scan past its position is seen.
pub(crate) struct ScanStream<K, V, C> {
    shared: Arc<Shared<C>>,
    prefix: Vec<u8>,
    page: VecDeque<(Vec<u8>, Vec<u8>)>,
    /// The last key read, where the next page starts (after it).
    last: Option<Vec<u8>>,
    /// Whether pages may follow the one in hand.
    more: bool,
    done: bool,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V, C> ScanStream<K, V, C> {
    pub(crate) fn new(prefix: &[u8], shared: Arc<Shared<C>>) -> Self {
        ScanStream {
            shared,
            prefix: prefix.to_vec(),
            page: VecDeque::new(),
            last: None,
            more: true,
            done: false,
            _types: PhantomData,
        }
    }

    /// The next stored pair, reading a page when the one in hand is used up.
    fn next_pair(&mut self) -> Option<Result<(Vec<u8>, Vec<u8>)>> {
        if self.page.is_empty() {
            if !self.more {
                return None;
            }
            let page = self
                .shared
                .store(Operation::Scan)
                .and_then(|store| read_page(&store, &self.prefix, self.last.as_deref()));
            match page {
                Ok((page, more)) => {
                    self.page = page;
                    self.more = more;
                }
                Err(e) => return Some(Err(e)),
            }
        }
        let pair = self.page.pop_front()?;
        self.last = Some(pair.0.clone());
        Some(Ok(pair))
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
            let (key, bytes) = match this.next_pair() {
                None => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
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
