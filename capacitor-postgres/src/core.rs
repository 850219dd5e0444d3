//! What the layer, its scan streams and its sweeper share: the pool, the statements, the
//! table, and the helpers every statement goes through (the operation bound, pooled
//! connections that are discarded when abandoned, prepared statements, decoding a row).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use capacitor_core::background::Stop;
use capacitor_core::{envelope, Codec, Entry, Error, ErrorKind, Operation, Result, SharedClock, Timestamp};
use deadpool_postgres::{Object, Pool};
use tokio_postgres::Statement;

use crate::error::{pg_error, pool_error};
use crate::key::KeyFormat;
use crate::schema::Table;
use crate::sql::Statements;

/// The latest expiry written to the `expires_at` column: 9999-12-31T23:59:59.999Z. Longer
/// TTLs (up to `Duration::MAX`) are stored as this instant, which PostgreSQL can represent
/// (and the client can encode without overflowing); an entry expiring then reports it
/// as its expiry.
pub(crate) const MAX_EXPIRY_MILLIS: u64 = 253_402_300_799_999;

/// `ts` as the value of a `timestamptz` parameter (clamped to [`MAX_EXPIRY_MILLIS`]).
pub(crate) fn sql_time(ts: Timestamp) -> SystemTime {
    Timestamp::from_millis(ts.as_millis().min(MAX_EXPIRY_MILLIS)).to_system_time()
}

/// What the layer, its scan streams and its sweeper share.
pub(crate) struct Shared<C> {
    pub(crate) pool: Pool,
    pub(crate) sql: Statements,
    pub(crate) table: Table,
    pub(crate) codec: C,
    pub(crate) clock: SharedClock,
    pub(crate) key_format: KeyFormat,
    pub(crate) max_value_bytes: usize,
    pub(crate) scan_page_size: i64,
    pub(crate) unlogged: bool,
    pub(crate) closed: AtomicBool,
    /// Bound on every operation, awaiting included (see [`Shared::bounded`]).
    pub(crate) operation_timeout: Duration,
    /// Keys whose last write may still be applied (see `fence`).
    pub(crate) fence: capacitor_core::fence::WriteFence,
    /// Pulled on close; dropped with the layer: either ends the sweeper.
    pub(crate) stop: Stop,
}

impl<C> Shared<C> {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// [`ErrorKind::Closed`] once closed.
    pub(crate) fn check_open(&self, op: Operation) -> Result<()> {
        if self.is_closed() {
            return Err(Error::closed(op));
        }
        Ok(())
    }

    /// The operation `start` builds, bounded by the layer's operation timeout (see
    /// [`bounded`]).
    pub(crate) async fn bounded<T, F, Fut>(&self, op: Operation, start: F) -> Result<T>
    where
        F: FnOnce(Abandon) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        bounded(self.operation_timeout, op, start).await
    }

    /// A pooled connection, or [`ErrorKind::Closed`] (see [`checkout`]).
    pub(crate) async fn client(&self, op: Operation, abandon: Abandon) -> Result<Conn> {
        self.check_open(op)?;
        checkout(&self.pool, op, abandon).await
    }

    /// The current time of the layer's clock, as a query parameter.
    pub(crate) fn now(&self) -> SystemTime {
        sql_time(self.clock.now())
    }
}

/// The operation `start` builds, bounded by `timeout`: past it, a typed
/// [`ErrorKind::Timeout`] instead of waiting for a server that may never answer (the
/// server enforces `statement_timeout` only on queries it received; a stalled or
/// partitioned network would leave the query waiting for the kernel to give up on the
/// connection, minutes later).
///
/// A connection the operation holds when it does not complete (it timed out here, or its
/// caller dropped it: a composer's layer timeout, a `select!`, a dropped scan) is closed
/// instead of going back to the pool, and its statement is cancelled on the server: its
/// reply is still owed, and every later query on it would wait behind that reply.
pub(crate) async fn bounded<T, F, Fut>(timeout: Duration, op: Operation, start: F) -> Result<T>
where
    F: FnOnce(Abandon) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let abandon = Abandon::default();
    let operation = std::pin::pin!(start(abandon.clone()));
    // Declared after `operation`, so dropped before it (also when this future is dropped
    // mid-await): the flag is set before the operation's connection is dropped.
    let mut unfinished = SetOnDrop(&abandon, true);
    let outcome = tokio::time::timeout(timeout, operation).await;
    unfinished.1 = outcome.is_err();
    outcome.unwrap_or_else(|_| {
        Err(Error::new(
            ErrorKind::Timeout,
            op,
            format!("no answer from PostgreSQL within the {timeout:?} operation timeout"),
        ))
    })
}

/// Sets the flag when dropped while armed.
struct SetOnDrop<'a>(&'a Abandon, bool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0 .0.store(true, Ordering::Release);
        }
    }
}

/// How long a cancel request for an abandoned statement may take (it opens a connection
/// of its own).
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection from `pool`, discarded rather than returned to the pool if `abandon` is
/// set when it drops (see [`bounded`]).
pub(crate) async fn checkout(pool: &Pool, op: Operation, abandon: Abandon) -> Result<Conn> {
    let object = pool.get().await.map_err(|e| pool_error(op, e))?;
    Ok(Conn {
        object: Some(object),
        abandon,
    })
}

/// Set by [`bounded`] when the operation it runs timed out.
#[derive(Clone, Default)]
pub(crate) struct Abandon(Arc<AtomicBool>);

/// A pooled connection that goes back to the pool when dropped, unless the operation
/// holding it was abandoned on a timeout: then it is detached from the pool and closed.
pub(crate) struct Conn {
    /// `Some` until `drop`.
    object: Option<Object>,
    abandon: Abandon,
}

impl std::ops::Deref for Conn {
    type Target = Object;

    fn deref(&self) -> &Object {
        // Taken only in `drop`: no input reaches the `expect`.
        #[allow(clippy::expect_used)]
        self.object.as_ref().expect("a connection until dropped")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Object {
        #[allow(clippy::expect_used)]
        self.object.as_mut().expect("a connection until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(object) = self.object.take() {
            if self.abandon.0.load(Ordering::Acquire) {
                // Detached from the pool. The driver closes the socket only once the owed
                // replies have come, and until then the server keeps running (or waiting
                // on a lock for) the statement: cancel it, as libpq's PQcancel does (a
                // plain-TCP cancel request carrying only the backend's key).
                let client = Object::take(object);
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let token = client.cancel_token();
                    runtime.spawn(async move {
                        let cancel = token.cancel_query(tokio_postgres::NoTls);
                        let _ = tokio::time::timeout(CANCEL_TIMEOUT, cancel).await;
                    });
                }
                drop(client);
            }
        }
    }
}

/// `sql`, prepared on `client` once and cached there.
pub(crate) async fn prepare(client: &Object, sql: &str, op: Operation) -> Result<Statement> {
    client.prepare_cached(sql).await.map_err(|e| pg_error(op, e))
}

/// Decodes a stored row: the envelope, then the payload. The expiry comes from the
/// `expires_at` column, which is authoritative (the copy in the envelope is informative).
pub(crate) fn decode_entry<V, C: Codec<V>>(
    codec: &C,
    bytes: &[u8],
    expires_at: Option<SystemTime>,
    op: Operation,
) -> Result<Entry<V>> {
    let opened = envelope::open(bytes).map_err(|e| e.with_operation(op))?;
    let value = envelope::decode(codec, &opened, op)?;
    Ok(Entry::new(value, expires_at.map(Timestamp::from_system_time)))
}
