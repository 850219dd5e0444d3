//! Export of a composer's [`Stats`](crate::Stats) through the `metrics` facade.

use std::hash::Hash;
use std::time::Duration;

use super::MultiLayer;

/// A background task that exports a composer's stats every interval; stops when dropped
/// (or when the composer is closed). Made by
/// [`MultiLayer::spawn_metrics_reporter`].
#[derive(Debug)]
#[must_use = "the reporter stops when dropped"]
pub struct MetricsReporter {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsReporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Writes the current stats to the installed `metrics` recorder, labelled with
    /// `cache` (the composer's name) and `layer`:
    ///
    /// - counters `capacitor_layer_{hits,misses,errors,timeouts,skipped,sets,deletes,promotions,decode_errors,breaker_opens}_total`,
    ///   and `capacitor_layer_{batched_reads,read_batches}_total` (read batching)
    /// - gauges `capacitor_layer_breaker_state` (0 closed, 1 half-open, 2 open) and
    ///   `capacitor_layer_suspect_keys`
    /// - `capacitor_write_back_queue_depth`, `capacitor_write_back_oldest_pending_seconds`,
    ///   `capacitor_write_back_{written,retries,coalesced}_total` under write-back
    /// - `capacitor_fail_safe_{stale_hits,stale_misses}_total`, `capacitor_fail_safe_entries`
    /// - `capacitor_load_{hits,misses,loads,failures,stale_hits,soft_timeouts,hard_timeouts,joined,refreshes,not_cached}_total`
    ///   once a loading read ran
    /// - `capacitor_refresh_{started,renewed,dropped}_total`, `capacitor_refresh_in_flight`
    ///   with refresh-ahead
    ///
    /// The counters are set to the composer's totals (`Counter::absolute`), so calling this
    /// often is cheap and idempotent. Latencies of awaited layer operations are recorded
    /// as they happen in the histogram `capacitor_layer_operation_duration_seconds`
    /// (labels `cache`, `layer`, `op`, `outcome`: `ok` or the error kind); in-process
    /// layers' synchronous hits are not timed, so that an L1 hit costs the same with the
    /// feature on.
    pub fn report_metrics(&self) {
        let stats = self.stats();
        let cache = self.inner.name.clone();
        for layer in &stats.layers {
            let labels = [("cache", cache.clone()), ("layer", layer.name.clone())];
            let counters = [
                ("capacitor_layer_hits_total", layer.hits),
                ("capacitor_layer_misses_total", layer.misses),
                ("capacitor_layer_errors_total", layer.errors),
                ("capacitor_layer_timeouts_total", layer.timeouts),
                ("capacitor_layer_skipped_total", layer.skipped),
                ("capacitor_layer_sets_total", layer.sets),
                ("capacitor_layer_deletes_total", layer.deletes),
                ("capacitor_layer_promotions_total", layer.promotions),
                ("capacitor_layer_decode_errors_total", layer.decode_errors),
                ("capacitor_layer_breaker_opens_total", layer.breaker_opens),
                ("capacitor_layer_batched_reads_total", layer.batched_reads),
                ("capacitor_layer_read_batches_total", layer.read_batches),
            ];
            for (name, value) in counters {
                metrics::counter!(name, &labels).absolute(value);
            }
            metrics::gauge!("capacitor_layer_breaker_state", &labels).set(layer.breaker.as_gauge());
            metrics::gauge!("capacitor_layer_suspect_keys", &labels).set(layer.suspect_keys as f64);
        }
        let labels = [("cache", cache)];
        if let Some(w) = &stats.write_back {
            metrics::gauge!("capacitor_write_back_queue_depth", &labels).set(w.queue_depth as f64);
            metrics::gauge!("capacitor_write_back_oldest_pending_seconds", &labels)
                .set(w.oldest_pending.unwrap_or_default().as_secs_f64());
            metrics::counter!("capacitor_write_back_written_total", &labels).absolute(w.written);
            metrics::counter!("capacitor_write_back_retries_total", &labels).absolute(w.retries);
            metrics::counter!("capacitor_write_back_coalesced_total", &labels).absolute(w.coalesced);
        }
        let l = &stats.loads;
        if l.hits + l.misses > 0 {
            for (name, value) in [
                ("capacitor_load_hits_total", l.hits),
                ("capacitor_load_misses_total", l.misses),
                ("capacitor_load_loads_total", l.loads),
                ("capacitor_load_failures_total", l.failures),
                ("capacitor_load_stale_hits_total", l.stale_hits),
                ("capacitor_load_soft_timeouts_total", l.soft_timeouts),
                ("capacitor_load_hard_timeouts_total", l.hard_timeouts),
                ("capacitor_load_joined_total", l.joined),
                ("capacitor_load_refreshes_total", l.refreshes),
                ("capacitor_load_not_cached_total", l.not_cached),
            ] {
                metrics::counter!(name, &labels).absolute(value);
            }
        }
        if let Some(f) = &stats.fail_safe {
            metrics::counter!("capacitor_fail_safe_stale_hits_total", &labels).absolute(f.stale_hits);
            metrics::counter!("capacitor_fail_safe_stale_misses_total", &labels).absolute(f.stale_misses);
            metrics::gauge!("capacitor_fail_safe_entries", &labels).set(f.entries as f64);
        }
        if let Some(r) = &stats.refresh {
            metrics::counter!("capacitor_refresh_started_total", &labels).absolute(r.started);
            metrics::counter!("capacitor_refresh_renewed_total", &labels).absolute(r.renewed);
            metrics::counter!("capacitor_refresh_dropped_total", &labels).absolute(r.dropped);
            metrics::gauge!("capacitor_refresh_in_flight", &labels).set(r.in_flight as f64);
        }
    }

    /// Calls [`report_metrics`](MultiLayer::report_metrics) every `interval` on a tokio
    /// task until the returned reporter is dropped or the composer is closed.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) outside a tokio runtime or for a
    /// zero interval.
    pub fn spawn_metrics_reporter(&self, interval: Duration) -> crate::Result<MetricsReporter> {
        if interval.is_zero() {
            return Err(crate::Error::config(
                "metrics interval",
                "must be greater than zero",
            ));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| crate::Error::config("metrics reporter", "needs a tokio runtime").with_source(e))?;
        // Weak: the reporter must not keep a dropped composer alive.
        let weak = std::sync::Arc::downgrade(&self.inner);
        let task = runtime.spawn(async move {
            loop {
                match weak.upgrade() {
                    Some(inner) if !inner.closed.load(std::sync::atomic::Ordering::Acquire) => {
                        MultiLayer { inner }.report_metrics();
                    }
                    _ => return,
                }
                tokio::time::sleep(interval).await;
            }
        });
        Ok(MetricsReporter { task })
    }
}
