//! The lazy stream [`PostgresLayer::scan`](crate::PostgresLayer) returns.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use capacitor_core::{Codec, Entry, Error, Operation, Result, StorageKey};
use futures_core::Stream;
use tokio_postgres::Row;

use crate::core::{decode_entry, prepare, Shared};
use crate::error::pg_error;
use crate::key::ScanRange;

type PageFuture = Pin<Box<dyn Future<Output = Result<Vec<Row>>> + Send>>;

/// Reads the key range of a prefix one page at a time (keyset pagination: each page starts
/// after the last key of the previous one), so memory is bounded by one page whatever the
/// number of keys, and no connection or transaction is held between pages.
pub(crate) struct ScanStream<K, V, C> {
    shared: Arc<Shared<C>>,
    /// `None` when no key can start with the prefix.
    range: Option<ScanRange>,
    prefix: Vec<u8>,
    /// The last key text read: the next page starts after it.
    last: Option<String>,
    page: VecDeque<Row>,
    fetch: Option<PageFuture>,
    /// The last page was short: no more to read once `page` is drained.
    exhausted: bool,
    done: bool,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V, C> ScanStream<K, V, C> {
    pub(crate) fn new(shared: Arc<Shared<C>>, prefix: &[u8]) -> Self {
        let range = shared.key_format.scan_range(prefix);
        ScanStream {
            shared,
            range,
            prefix: prefix.to_vec(),
            last: None,
            page: VecDeque::new(),
            fetch: None,
            exhausted: false,
            done: false,
            _types: PhantomData,
        }
    }
}

impl<K, V, C: Send + Sync + 'static> ScanStream<K, V, C> {
    fn next_page(&self, range: &ScanRange) -> PageFuture {
        let shared = Arc::clone(&self.shared);
        let range = range.clone();
        let last = self.last.clone();
        Box::pin(async move {
            let op = Operation::Scan;
            let page = |abandon| async {
                let op = Operation::Scan;
                let client = shared.client(op, abandon).await?;
                let sql = &shared.sql;
                let (statement, start) = match (&last, range.upper.is_some()) {
                    (None, true) => (&sql.scan_first, &range.lower),
                    (Some(last), true) => (&sql.scan_next, last),
                    (None, false) => (&sql.scan_first_open, &range.lower),
                    (Some(last), false) => (&sql.scan_next_open, last),
                };
                let stmt = prepare(&client, statement, op).await?;
                let now = shared.now();
                let limit = shared.scan_page_size;
                let result = match &range.upper {
                    Some(upper) => client.query(&stmt, &[start, upper, &now, &limit]).await,
                    None => client.query(&stmt, &[start, &now, &limit]).await,
                };
                result.map_err(|e| pg_error(op, e))
            };
            shared.bounded(op, page).await
        })
    }
}

impl<K, V, C> ScanStream<K, V, C>
where
    K: StorageKey,
    C: Codec<V>,
{
    /// The item of one row, or `None` for a row outside the prefix (only when the range
    /// is wider than the prefix: a text prefix cut inside a character).
    fn decode(&self, row: &Row) -> Option<Result<(K, Entry<V>)>> {
        let op = Operation::Scan;
        let item = (|| {
            let text: &str = row.try_get(0).map_err(|e| pg_error(op, e))?;
            let key_bytes = self.shared.key_format.decode(text, op)?;
            if !key_bytes.starts_with(&self.prefix) {
                return Ok(None);
            }
            let value: &[u8] = row.try_get(1).map_err(|e| pg_error(op, e))?;
            let expires_at: Option<SystemTime> = row.try_get(2).map_err(|e| pg_error(op, e))?;
            let entry = decode_entry(&self.shared.codec, value, expires_at, op)?;
            let key = K::decode_key(&key_bytes).map_err(|e| e.with_operation(op))?;
            Ok(Some((key, entry)))
        })();
        item.transpose()
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
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if this.shared.is_closed() {
                this.done = true;
                return Poll::Ready(Some(Err(Error::closed(Operation::Scan))));
            }
            if let Some(row) = this.page.pop_front() {
                match this.decode(&row) {
                    Some(item) => return Poll::Ready(Some(item)),
                    None => continue,
                }
            }
            let Some(range) = &this.range else {
                this.done = true;
                return Poll::Ready(None);
            };
            if this.exhausted {
                this.done = true;
                return Poll::Ready(None);
            }
            if this.fetch.is_none() {
                this.fetch = Some(this.next_page(range));
            }
            let Some(fetch) = this.fetch.as_mut() else {
                continue;
            };
            let rows = match fetch.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(rows) => rows,
            };
            this.fetch = None;
            match rows {
                Err(err) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(err)));
                }
                Ok(rows) => {
                    this.exhausted =
                        i64::try_from(rows.len()).unwrap_or(i64::MAX) < this.shared.scan_page_size;
                    if let Some(last) = rows.last() {
                        match last.try_get::<_, String>(0) {
                            Ok(key) => this.last = Some(key),
                            Err(e) => {
                                this.done = true;
                                return Poll::Ready(Some(Err(pg_error(Operation::Scan, e))));
                            }
                        }
                    }
                    this.page = rows.into();
                }
            }
        }
    }
}
