//! The sweeper: a background task that deletes expired rows in bounded batches.
//!
//! It holds a `Weak` on the layer's state, so that it never keeps a dropped layer's pool
//! open, and a [`Ticker`] of the layer's [`Stop`](capacitor_core::background::Stop), so
//! that it ends when the layer is closed (the switch pulled) or dropped (the switch with
//! it).

use std::sync::Weak;
use std::time::Duration;

use capacitor_core::background::Ticker;
use capacitor_core::{Operation, Result};
use deadpool_postgres::Pool;

use crate::core::{bounded, checkout, prepare, Shared};
use crate::error::pg_error;

/// At every tick, deletes expired rows, `batch` rows per statement, until a batch deletes
/// fewer than `batch`.
pub(crate) async fn sweeper<C: Send + Sync + 'static>(
    shared: Weak<Shared<C>>,
    mut ticker: Ticker,
    batch: i64,
) {
    while ticker.tick().await {
        loop {
            // Upgrade per batch, and never hold the layer across an await: a dropped layer
            // stops the sweeper.
            let (pool, sql, now, timeout) = {
                let Some(shared) = shared.upgrade() else { return };
                if shared.is_closed() {
                    return;
                }
                (
                    shared.pool.clone(),
                    shared.sql.sweep.clone(),
                    shared.now(),
                    shared.operation_timeout,
                )
            };
            match sweep_batch(&pool, &sql, now, batch, timeout).await {
                Ok(deleted) if deleted >= u64::try_from(batch).unwrap_or(u64::MAX) => {}
                // The expired rows are gone, or the database failed (retried on the next
                // tick): the sweeper has no caller to report to, and a failed pass loses
                // nothing.
                Ok(_) | Err(_) => break,
            }
            if ticker.stopped() {
                return;
            }
        }
    }
}

/// Deletes up to `batch` rows that expired at or before `now`, within the layer's
/// operation timeout (over a stalled link a pass would otherwise hold a pooled connection
/// until the kernel gives up); how many it deleted.
pub(crate) async fn sweep_batch(
    pool: &Pool,
    sql: &str,
    now: std::time::SystemTime,
    batch: i64,
    timeout: Duration,
) -> Result<u64> {
    let op = Operation::Delete;
    bounded(timeout, op, |abandon| async move {
        let client = checkout(pool, op, abandon).await?;
        let stmt = prepare(&client, sql, op).await?;
        client
            .execute(&stmt, &[&now, &batch])
            .await
            .map_err(|e| pg_error(op, e))
    })
    .await
}
