//! Per-layer counters and the [`Stats`] snapshot.
//!
//! Counters are sharded per thread, and each shard has one owner: a thread takes a free
//! shard index on its first increment and gives it back when it exits. The owner updates
//! its shard with a plain relaxed load and store (no `lock`-prefixed read-modify-write,
//! which costs several nanoseconds per hit), and no two cores ever write the same cache
//! line, so concurrent readers never contend. Threads beyond `OWNED_SHARDS` share one
//! overflow shard updated with atomic `fetch_add`. A snapshot sums the shards.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Threads that get a shard of their own; the rest share the overflow shard.
const OWNED_SHARDS: usize = 64;
const OVERFLOW: usize = OWNED_SHARDS;

/// Indexes into [`Shard::counts`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Hit = 0,
    Miss = 1,
    Error = 2,
    DecodeError = 3,
    Set = 4,
    Delete = 5,
    Promotion = 6,
    PromotionSkipped = 7,
    Timeout = 8,
    Skipped = 9,
    BatchedRead = 10,
    ReadBatch = 11,
}

const COUNTERS: usize = 12;

/// One thread's counters for one layer (96 bytes), aligned to 128 to keep adjacent-line
/// prefetching from pairing two shards.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    counts: [AtomicU64; COUNTERS],
}

/// Sharded counters for one layer.
pub(crate) struct LayerCounters {
    shards: Box<[Shard]>,
}

impl Default for LayerCounters {
    fn default() -> Self {
        LayerCounters {
            shards: (0..=OWNED_SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

impl fmt::Debug for LayerCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerCounters").finish_non_exhaustive()
    }
}

/// Shard indices given back by exited threads. The mutex also orders an exited owner's
/// last stores before the next owner's first load.
static FREE_SHARDS: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

struct ShardOwner(usize);

impl ShardOwner {
    fn acquire() -> Self {
        let free = FREE_SHARDS.lock().ok().and_then(|mut f| f.pop());
        ShardOwner(free.unwrap_or_else(|| NEXT_SHARD.fetch_add(1, Ordering::Relaxed).min(OVERFLOW)))
    }
}

impl Drop for ShardOwner {
    fn drop(&mut self) {
        if self.0 < OVERFLOW {
            if let Ok(mut free) = FREE_SHARDS.lock() {
                free.push(self.0);
            }
        }
    }
}

thread_local! {
    static SHARD: ShardOwner = ShardOwner::acquire();
}

/// This thread's shard; the overflow shard while thread-locals are being torn down.
#[inline]
fn shard_index() -> usize {
    SHARD.try_with(|s| s.0).unwrap_or(OVERFLOW)
}

impl LayerCounters {
    #[inline]
    pub(crate) fn incr(&self, counter: Counter) {
        let i = shard_index();
        let cell = &self.shards[i].counts[counter as usize];
        if i < OVERFLOW {
            // Only this thread writes this shard: a plain load and store cannot lose counts.
            cell.store(cell.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        } else {
            cell.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sum(&self, counter: Counter) -> u64 {
        self.shards
            .iter()
            .map(|s| s.counts[counter as usize].load(Ordering::Relaxed))
            .sum()
    }

    pub(crate) fn snapshot(&self, name: &str) -> LayerStats {
        LayerStats {
            name: name.to_owned(),
            hits: self.sum(Counter::Hit),
            misses: self.sum(Counter::Miss),
            errors: self.sum(Counter::Error),
            decode_errors: self.sum(Counter::DecodeError),
            sets: self.sum(Counter::Set),
            deletes: self.sum(Counter::Delete),
            promotions: self.sum(Counter::Promotion),
            promotions_skipped: self.sum(Counter::PromotionSkipped),
            timeouts: self.sum(Counter::Timeout),
            skipped: self.sum(Counter::Skipped),
            batched_reads: self.sum(Counter::BatchedRead),
            read_batches: self.sum(Counter::ReadBatch),
            ..LayerStats::default()
        }
    }
}

/// Counters of one layer at the moment of the snapshot.
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// The layer's configured name.
    pub name: String,
    /// Reads answered by this layer.
    pub hits: u64,
    /// Reads that reached this layer and did not find the key (decode errors included).
    pub misses: u64,
    /// Failed operations on this layer (reads, writes, promotions, invalidations).
    pub errors: u64,
    /// Stored values that did not decode; counted as misses too.
    pub decode_errors: u64,
    /// Successful writes by `set` (promotions are counted apart).
    pub sets: u64,
    /// Successful deletes (present or not).
    pub deletes: u64,
    /// Values copied into this layer from a layer below on a read.
    pub promotions: u64,
    /// Promotions into this layer skipped because a concurrent write of the key raced
    /// the read (the guard that keeps stale values out of upper layers).
    pub promotions_skipped: u64,
    /// Operations that ran past the layer's timeout (counted in `errors` too).
    pub timeouts: u64,
    /// Operations that did not reach the layer because its circuit breaker was open.
    pub skipped: u64,
    /// Reads answered through a batch, with
    /// [`batch_reads`](crate::LayerConfig::batch_reads) (errors included).
    pub batched_reads: u64,
    /// Round trips that answered those reads: `batched_reads / read_batches` is the mean
    /// batch size.
    pub read_batches: u64,
    /// The circuit breaker's state (`Closed` for a layer without a breaker).
    pub breaker: crate::BreakerState,
    /// Times the circuit breaker opened.
    pub breaker_opens: u64,
    /// Keys this cache layer may hold an outdated copy of (a write could not reach or
    /// invalidate it); reads skip the layer for them until it is written again.
    pub suspect_keys: u64,
    /// More keys than the tracker holds (100,000) became suspect at some point: reads then
    /// skipped this layer altogether for its TTL (for good without one).
    pub suspects_overflowed: bool,
    /// Keys of this cache layer whose invalidation failed, waiting to be removed once
    /// the layer answers again (a whole-layer clear counts as one).
    pub replay_pending: u64,
    /// Keys (and clears) removed from this layer by recovery after it answered again.
    pub replayed: u64,
    /// Times more keys waited than recovery holds (100,000): they were replaced by a
    /// clear of the whole layer.
    pub replay_overflows: u64,
}

impl LayerStats {
    /// `hits / (hits + misses)` for this layer, 0 when it was never read.
    pub fn hit_ratio(&self) -> f64 {
        ratio(self.hits, self.hits + self.misses)
    }
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// A snapshot of a composer's counters, one row per layer, top first.
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor::{LayerConfig, MultiLayer};
/// use capacitor::memory::DashMapLayer;
///
/// let cache = MultiLayer::<String, u32>::builder()
///     .layer(LayerConfig::new("l1", DashMapLayer::new()))
///     .layer(LayerConfig::new("l2", DashMapLayer::new()))
///     .build()?;
/// cache.set("a".to_string(), 1).await?;
/// cache.get(&"a".to_string()).await?;
/// cache.get(&"b".to_string()).await?;
/// let stats = cache.stats();
/// assert_eq!((stats.hits(), stats.misses()), (1, 1));
/// assert_eq!(stats.hit_ratio(), 0.5);
/// println!("{stats}");
/// # Ok::<(), capacitor::Error>(()) }).unwrap();
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Per-layer counters, in lookup order.
    pub layers: Vec<LayerStats>,
    /// The write-back buffer, under [`WritePolicy::Back`](crate::WritePolicy::Back).
    pub write_back: Option<crate::WriteBackStats>,
    /// The invalidation bus, when one is configured.
    pub bus: Option<BusStats>,
    /// The fail-safe store, when fail-safe is on.
    pub fail_safe: Option<crate::FailSafeStats>,
    /// Refresh-ahead, when it is on.
    pub refresh: Option<crate::RefreshStats>,
    /// The loading reads (`get_or_load` and its forms).
    pub loads: crate::LoadStats,
}

/// Counters of a composer's [`InvalidationBus`](crate::InvalidationBus).
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Messages sent to the other instances (each announces one or more changes).
    pub published: u64,
    /// Attempts to send that failed (the writes had succeeded; the message is kept and
    /// sent again).
    pub publish_errors: u64,
    /// Announcements waiting to be sent (keys, or a clear).
    pub pending: u64,
    /// Times the waiting announcements passed the bound and were replaced by one clear.
    pub overflows: u64,
    /// Messages the transport refused as too large (split, or a clear for a single key).
    pub too_large: u64,
    /// Messages received from the other instances.
    pub received: u64,
    /// Received messages dropped as already applied (a repeat, or older than the last
    /// one applied from their sender).
    pub ignored: u64,
    /// Times the in-process layers were cleared: the subscription (re)started, or another
    /// instance sent a clear.
    pub clears: u64,
}

impl Stats {
    /// Reads answered by some layer, the write-back buffer or the fail-safe store. Each
    /// read hits at most one of them, so this is a sum (no extra counter on the hit path).
    pub fn hits(&self) -> u64 {
        let buffered = self.write_back.as_ref().map_or(0, |w| w.buffer_hits);
        let stale = self.fail_safe.as_ref().map_or(0, |f| f.stale_hits);
        self.layers.iter().map(|l| l.hits).sum::<u64>() + buffered + stale
    }

    /// Reads that no layer answered: the misses of the last layer.
    pub fn misses(&self) -> u64 {
        self.layers.last().map_or(0, |l| l.misses)
    }

    /// `hits / (hits + misses)` over the whole composer; 0 before the first read.
    pub fn hit_ratio(&self) -> f64 {
        let hits = self.hits();
        ratio(hits, hits + self.misses())
    }

    /// The row of the layer named `name`.
    pub fn layer(&self, name: &str) -> Option<&LayerStats> {
        self.layers.iter().find(|l| l.name == name)
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.layers.iter().map(|l| l.name.len()).max().unwrap_or(5).max(5);
        writeln!(
            f,
            "{:<width$} {:>10} {:>10} {:>7} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9}",
            "layer",
            "hits",
            "misses",
            "hit%",
            "sets",
            "deletes",
            "promoted",
            "errors",
            "timeouts",
            "skipped",
            "decode",
            "breaker"
        )?;
        for l in &self.layers {
            writeln!(
                f,
                "{:<width$} {:>10} {:>10} {:>6.1}% {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9}",
                l.name,
                l.hits,
                l.misses,
                l.hit_ratio() * 100.0,
                l.sets,
                l.deletes,
                l.promotions,
                l.errors,
                l.timeouts,
                l.skipped,
                l.decode_errors,
                l.breaker.as_str()
            )?;
        }
        for l in self.layers.iter().filter(|l| l.read_batches > 0) {
            writeln!(
                f,
                "read batching on {}: {} reads in {} round trips ({:.1} per batch)",
                l.name,
                l.batched_reads,
                l.read_batches,
                ratio(l.batched_reads, l.read_batches)
            )?;
        }
        if let Some(w) = &self.write_back {
            writeln!(
                f,
                "write-back: {} pending (oldest {:.1?}), {} written, {} coalesced, {} retries, {} reads from the buffer",
                w.queue_depth,
                w.oldest_pending.unwrap_or_default(),
                w.written,
                w.coalesced,
                w.retries,
                w.buffer_hits
            )?;
        }
        if let Some(b) = &self.bus {
            writeln!(
                f,
                "invalidation bus: {} published ({} failed, {} pending, {} overflows), {} received ({} ignored), {} clears",
                b.published, b.publish_errors, b.pending, b.overflows, b.received, b.ignored, b.clears
            )?;
        }
        if let Some(s) = &self.fail_safe {
            writeln!(
                f,
                "fail-safe: {} copies, {} stale hits, {} failed reads without a copy",
                s.entries, s.stale_hits, s.stale_misses
            )?;
        }
        if let Some(r) = &self.refresh {
            writeln!(
                f,
                "refresh-ahead: {} started, {} found below, {} running, {} dropped",
                r.started, r.renewed, r.in_flight, r.dropped
            )?;
        }
        let l = &self.loads;
        if l.hits + l.misses > 0 {
            writeln!(
                f,
                "loads: {} hits, {} misses, {} loader calls ({} failed), {} stale hits, {} soft and {} hard timeouts, {} joined, {} eager refreshes, {} not cached",
                l.hits, l.misses, l.loads, l.failures, l.stale_hits, l.soft_timeouts, l.hard_timeouts, l.joined, l.refreshes, l.not_cached
            )?;
        }
        write!(
            f,
            "overall: {} hits, {} misses, hit ratio {:.1}%",
            self.hits(),
            self.misses(),
            self.hit_ratio() * 100.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_sum_across_threads() {
        let c = std::sync::Arc::new(LayerCounters::default());
        // Three waves of 100 concurrent threads: more threads than owned shards (the
        // overflow shard), and shard indices given back by one wave and reused by the next.
        for _wave in 0..3 {
            let threads: Vec<_> = (0..100)
                .map(|_| {
                    let c = c.clone();
                    std::thread::spawn(move || (0..10_000).for_each(|_| c.incr(Counter::Hit)))
                })
                .collect();
            for t in threads {
                t.join().unwrap_or_default();
            }
        }
        c.incr(Counter::Miss);
        let s = c.snapshot("l1");
        assert_eq!((s.hits, s.misses), (3_000_000, 1));
    }

    #[test]
    fn display_is_a_table_with_overall_ratio() {
        let stats = Stats {
            write_back: None,
            bus: None,
            fail_safe: None,
            refresh: None,
            loads: crate::LoadStats::default(),
            layers: vec![
                LayerStats {
                    name: "l1".into(),
                    hits: 3,
                    misses: 1,
                    ..Default::default()
                },
                LayerStats {
                    name: "l2".into(),
                    hits: 0,
                    misses: 1,
                    ..Default::default()
                },
            ],
        };
        let text = stats.to_string();
        assert!(text
            .lines()
            .next()
            .is_some_and(|h| h.contains("hits") && h.contains("promoted")));
        assert!(
            text.contains("overall: 3 hits, 1 misses, hit ratio 75.0%"),
            "{text}"
        );
        assert_eq!(stats.layer("l1").map(|l| l.hit_ratio()), Some(0.75));
    }
}
