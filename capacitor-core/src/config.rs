//! Configuration of the composer: [`LayerConfig`], [`ReadBatching`], [`WritePolicy`],
//! [`SetOptions`].

use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use crate::health::CircuitBreaker;
use crate::layer::Layer;

/// How `set` and `delete` reach the layers.
///
/// More policies may be added; match with a wildcard arm.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use capacitor::{WriteBack, WritePolicy};
///
/// // The default: every layer is written before `set` returns.
/// assert_eq!(WritePolicy::default(), WritePolicy::Through);
/// // `set` returns once the top layers have the value; a task drains it below.
/// let back = WritePolicy::Back(WriteBack::new().queue_bound(100_000).max_delay(Duration::from_millis(5)));
/// # let _ = back;
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum WritePolicy {
    /// Write every writable layer before returning, the authoritative (bottom) layer
    /// first. If it fails nothing above is touched and the error is returned; if a cache
    /// layer fails afterwards the key is invalidated there (best effort), the error is
    /// counted, and the write succeeds unless
    /// [`fail_on_cache_error`](crate::MultiLayerBuilder::fail_on_cache_error) is set.
    #[default]
    Through,
    /// Write-behind: `set`/`delete` return once L1 and the pending-writes buffer are
    /// updated; a background task drains the buffer to the layers below in batches.
    ///
    /// - Coalescing: repeated writes of one key are written once (last write wins; a
    ///   delete is a tombstone). Per key, writes reach the lower layers in order.
    /// - Bounded: at most [`WriteBack::queue_bound`] keys wait; beyond that a writer
    ///   waits for room up to [`WriteBack::enqueue_timeout`], then gets
    ///   [`ErrorKind::QueueFull`](crate::ErrorKind::QueueFull).
    /// - Read-your-writes: a `get` sees a pending write even after L1 evicted it.
    /// - Failures: a batch the authoritative layer refuses is retried with exponential
    ///   backoff, forever while the composer is open: nothing is dropped.
    /// - [`flush`](crate::MultiLayer::flush) returns when everything queued before it is
    ///   written; [`close`](crate::MultiLayer::close) flushes, and names what could not be
    ///   written in [`unwritten_keys`](crate::MultiLayer::unwritten_keys).
    ///
    /// **What a crash can lose**: every write still pending when the process dies (at
    /// most `queue_bound` keys, typically the last `max_delay` of writes while the lower
    /// layers keep up). Dropping every handle without `close()` does not lose them: the
    /// drain task finishes the queue first, but nobody learns of a failure.
    Back(WriteBack),
}

/// Options of [`WritePolicy::Back`].
///
/// Defaults: 10,000 pending keys, batches of 256, 50 ms max delay, 1 s enqueue timeout,
/// retries from 50 ms doubling to 5 s, 30 s flush timeout.
///
/// # Examples
///
/// ```
/// use capacitor::{WriteBack, WritePolicy};
/// use std::time::Duration;
///
/// let policy = WritePolicy::Back(WriteBack::new().queue_bound(50_000).max_delay(Duration::from_millis(10)));
/// # let _ = policy;
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct WriteBack {
    /// Most keys waiting to be written (in flight included).
    pub queue_bound: usize,
    /// Most keys written per batch.
    pub batch_size: usize,
    /// Longest a write waits for a batch to fill.
    pub max_delay: Duration,
    /// Longest a writer waits for room in a full queue.
    pub enqueue_timeout: Duration,
    /// First retry delay after a failed batch; doubles each time.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Longest `flush`/`close` wait for the queue to drain.
    pub flush_timeout: Duration,
}

impl Default for WriteBack {
    fn default() -> Self {
        WriteBack {
            queue_bound: 10_000,
            batch_size: 256,
            max_delay: Duration::from_millis(50),
            enqueue_timeout: Duration::from_secs(1),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            flush_timeout: Duration::from_secs(30),
        }
    }
}

impl WriteBack {
    /// The defaults listed above.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets [`WriteBack::queue_bound`].
    pub fn queue_bound(mut self, keys: usize) -> Self {
        self.queue_bound = keys;
        self
    }
    /// Sets [`WriteBack::batch_size`].
    pub fn batch_size(mut self, keys: usize) -> Self {
        self.batch_size = keys;
        self
    }
    /// Sets [`WriteBack::max_delay`].
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }
    /// Sets [`WriteBack::enqueue_timeout`].
    pub fn enqueue_timeout(mut self, timeout: Duration) -> Self {
        self.enqueue_timeout = timeout;
        self
    }
    /// Sets [`WriteBack::retry_initial`] and [`WriteBack::retry_max`].
    pub fn retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.retry_initial = initial;
        self.retry_max = max;
        self
    }
    /// Sets [`WriteBack::flush_timeout`].
    pub fn flush_timeout(mut self, timeout: Duration) -> Self {
        self.flush_timeout = timeout;
        self
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        let zero = |field: &str| Err(crate::Error::config(field, "must be greater than zero"));
        if self.queue_bound == 0 {
            return zero("write_policy.queue_bound");
        }
        if self.batch_size == 0 {
            return zero("write_policy.batch_size");
        }
        if self.retry_initial.is_zero() {
            return zero("write_policy.retry_initial");
        }
        if self.retry_max < self.retry_initial {
            return Err(crate::Error::config(
                "write_policy.retry_max",
                "must not be below retry_initial",
            ));
        }
        Ok(())
    }
}

/// Automatic batching of single-key reads on one awaited layer (see
/// [`LayerConfig::batch_reads`]): reads of the layer that arrive within `window` of each
/// other are sent to it as one [`Layer::get_many`] round trip.
///
/// Default: up to 64 distinct keys per batch.
///
/// # Examples
///
/// ```
/// use capacitor::ReadBatching;
/// use std::time::Duration;
///
/// let batching = ReadBatching::new(Duration::from_micros(200)).max_keys(128);
/// assert_eq!((batching.window, batching.max_keys), (Duration::from_micros(200), 128));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct ReadBatching {
    /// How long the first read of a batch waits for others to join it: the latency a lone
    /// read pays for batching. Zero is rejected by `build()`.
    pub window: Duration,
    /// Most distinct keys in one batch: a batch that has them is sent at once, before its
    /// window ends. Zero is rejected by `build()`.
    pub max_keys: usize,
}

impl ReadBatching {
    /// Batches of reads that arrive within `window` of the first, 64 keys at most.
    pub fn new(window: Duration) -> Self {
        ReadBatching { window, max_keys: 64 }
    }

    /// Sets [`ReadBatching::max_keys`].
    pub fn max_keys(mut self, keys: usize) -> Self {
        self.max_keys = keys;
        self
    }

    pub(crate) fn validate(&self, field: &str) -> crate::Result<()> {
        if self.window.is_zero() {
            return Err(crate::Error::config(
                &format!("{field}.window"),
                "must be greater than zero",
            ));
        }
        if self.max_keys == 0 {
            return Err(crate::Error::config(
                &format!("{field}.max_keys"),
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// One layer of a [`MultiLayer`](crate::MultiLayer): the layer itself, its name and its
/// options.
///
/// Defaults: no TTL (entries live as long as the `set` asks), writable, no timeout, and a
/// default [`CircuitBreaker`] on writable cache layers that are not in process (those
/// without [`sync_ops`](crate::Capabilities::sync_ops), above the authoritative layer):
/// there an open breaker only turns failing reads into instant misses. The authoritative
/// layer gets a breaker when configured with
/// [`circuit_breaker`](LayerConfig::circuit_breaker); while it is open, reads and writes
/// fail at once with [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable) (see
/// [`Error::is_circuit_open`](crate::Error::is_circuit_open)), or reads are answered by
/// the [fail-safe](crate::FailSafe).
///
/// # Examples
///
/// ```
/// use capacitor::{CircuitBreaker, LayerConfig};
/// use capacitor::memory::DashMapLayer;
/// use std::time::Duration;
///
/// let l1 = LayerConfig::<String, u64>::new("l1", DashMapLayer::new()).ttl(Duration::from_secs(30));
/// let archive = LayerConfig::<String, u64>::new("archive", DashMapLayer::new()).read_only(true);
/// let remote = LayerConfig::<String, u64>::new("remote", DashMapLayer::new())
///     .read_timeout(Duration::from_millis(50))
///     .write_timeout(Duration::from_millis(200))
///     .circuit_breaker(CircuitBreaker::new().failures(3));
/// # let _ = (l1, archive, remote);
/// ```
#[must_use]
pub struct LayerConfig<K, V> {
    pub(crate) name: String,
    pub(crate) layer: Arc<dyn Layer<K, V>>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) read_only: bool,
    pub(crate) read_timeout: Option<Duration>,
    pub(crate) write_timeout: Option<Duration>,
    pub(crate) breaker: BreakerSetting,
    pub(crate) batch_reads: Option<ReadBatching>,
}

/// A layer's breaker: the default one where it applies, a configured one, or none.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum BreakerSetting {
    #[default]
    Auto,
    On(CircuitBreaker),
    Off,
}

impl<K, V> fmt::Debug for LayerConfig<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerConfig")
            .field("name", &self.name)
            .field("ttl", &self.ttl)
            .field("read_only", &self.read_only)
            .field("read_timeout", &self.read_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("breaker", &self.breaker)
            .field("batch_reads", &self.batch_reads)
            .finish_non_exhaustive()
    }
}

impl<K, V> LayerConfig<K, V>
where
    K: Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// A layer under `name` (unique within the composer; used in stats and errors).
    pub fn new(name: impl Into<String>, layer: impl Layer<K, V>) -> Self {
        Self::shared(name, Arc::new(layer))
    }

    /// A layer already behind an `Arc` (for example one shared by two composers).
    pub fn shared(name: impl Into<String>, layer: Arc<dyn Layer<K, V>>) -> Self {
        LayerConfig {
            name: name.into(),
            layer,
            ttl: None,
            read_only: false,
            read_timeout: None,
            write_timeout: None,
            breaker: BreakerSetting::Auto,
            batch_reads: None,
        }
    }

    /// The longest any operation on this layer may take (reads and writes alike); past it
    /// the operation fails with [`ErrorKind::Timeout`](crate::ErrorKind::Timeout), which
    /// the read path treats as a miss in a cache layer. Applies to operations that await
    /// (not to the synchronous fast path of in-process layers). Needs a tokio runtime with
    /// its time driver. Zero is rejected by `build()`.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.read_timeout(timeout).write_timeout(timeout)
    }

    /// The timeout of `get`, `exists` and `get_many` on this layer (see
    /// [`timeout`](LayerConfig::timeout)).
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = Some(timeout);
        self
    }

    /// The timeout of writes, deletes, batches, transactions and flushes on this layer
    /// (see [`timeout`](LayerConfig::timeout)).
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = Some(timeout);
        self
    }

    /// This layer's circuit breaker (instead of the default one, or on an in-process
    /// layer, which has none by default).
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.breaker = BreakerSetting::On(breaker);
        self
    }

    /// No circuit breaker: every operation reaches the layer, however often it fails.
    pub fn no_circuit_breaker(mut self) -> Self {
        self.breaker = BreakerSetting::Off;
        self
    }

    /// The longest an entry lives in this layer: writes use `min(ttl, the write's TTL)`,
    /// promotions `min(ttl, the entry's remaining life)`. Zero is rejected by `build()`.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// A read-only layer is read (and never written, promoted into or deleted from).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Send this layer's single-key reads (those of `get` and `get_entry`, and through
    /// them `get_or_load`; not `exists`) that arrive within `batching.window` of each
    /// other as one [`Layer::get_many`] round trip (a batch of one key as one
    /// [`Layer::get`]). Off by default.
    ///
    /// A read waits up to the window for others to join its batch: batching trades that
    /// much latency of a lone read for fewer round trips under concurrency. Reads answered
    /// above this layer never wait. The round trip runs under the layer's breaker and read
    /// timeout, on a tokio task of its own, so a caller that gives up does not cancel the
    /// others. A key asked twice in a batch is asked once; each caller gets its own key's
    /// answer; an error of the batch is the error of each of its callers, of the same
    /// kind, and a value that does not decode costs only its key (the batch is asked again
    /// key by key). A read joins only a batch that has not been sent yet, so it never sees
    /// a value older than what was acknowledged before it began. Outside a tokio runtime,
    /// reads go to the layer one by one; inside one, batching needs its time driver. A
    /// window under 5 ms is timed on a thread of tokio's blocking pool (tokio's timer
    /// ticks in milliseconds, and would end a 200 µs window 1 to 2 ms late); a longer one
    /// by tokio's timer, which may end it up to a millisecond late.
    ///
    /// `build()` refuses it on an in-process layer (one declaring
    /// [`sync_ops`](crate::Capabilities::sync_ops)): it answers without a round trip to
    /// save.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor::memory::DashMapLayer;
    /// use capacitor::sled::SledLayer;
    /// use capacitor::{ErrorKind, Layer, LayerConfig, MultiLayer, ReadBatching};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    ///
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = Arc::new(SledLayer::builder().path(dir.path()).build()?);
    /// store.set(&"a".to_string(), &1, None).await?;
    /// store.set(&"b".to_string(), &2, None).await?;
    /// // (A long window, so that a loaded machine cannot split the two reads below.)
    /// let batching = ReadBatching::new(Duration::from_millis(20)).max_keys(64);
    /// let cache = MultiLayer::<String, u64>::builder()
    ///     .layer(LayerConfig::new("l1", DashMapLayer::new()))
    ///     .layer(LayerConfig::shared("store", store).batch_reads(batching))
    ///     .build()?;
    /// // Two reads that miss L1 at the same time: one round trip to the store.
    /// let (a, b) = ("a".to_string(), "b".to_string());
    /// let (a, b) = tokio::join!(cache.get(&a), cache.get(&b));
    /// assert_eq!((a?, b?), (Some(1), Some(2)));
    /// let stats = cache.stats();
    /// let store_stats = stats.layer("store").unwrap();
    /// assert_eq!((store_stats.batched_reads, store_stats.read_batches), (2, 1));
    ///
    /// // An in-process layer has no round trip to save.
    /// let refused = MultiLayer::<String, u64>::builder()
    ///     .layer(LayerConfig::new("l1", DashMapLayer::new()).batch_reads(batching))
    ///     .build();
    /// assert_eq!(refused.map(|_| ()).map_err(|e| e.kind()), Err(ErrorKind::Config));
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub fn batch_reads(mut self, batching: ReadBatching) -> Self {
        self.batch_reads = Some(batching);
        self
    }
}

/// Options of one write ([`MultiLayer::set_with`](crate::MultiLayer::set_with)).
///
/// # Examples
///
/// ```
/// use capacitor::SetOptions;
/// use std::time::Duration;
///
/// let opts = SetOptions::new().ttl(Duration::from_secs(5));
/// assert_eq!(opts.ttl, Some(Duration::from_secs(5)));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct SetOptions {
    /// The entry's life; each layer keeps it for `min(this, the layer's TTL)`. `None`:
    /// only the layers' TTLs apply.
    pub ttl: Option<Duration>,
    /// The entry's tags, for [`MultiLayer::remove_by_tag`](crate::MultiLayer::remove_by_tag)
    /// (none: a write without tags, which also drops the tags of the key's earlier writes).
    pub tags: Vec<String>,
}

/// Tags one write may carry at most.
pub const MAX_TAGS: usize = 64;
/// The longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = 1024;

impl SetOptions {
    /// Default options: no TTL override, no tags.
    pub fn new() -> Self {
        SetOptions::default()
    }

    /// Sets the entry's time to live.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets the entry's tags (replacing any set before; repeats count once).
    ///
    /// ```
    /// use capacitor::SetOptions;
    ///
    /// let opts = SetOptions::new().tags(["user:42", "team:7"]);
    /// assert_eq!(opts.tags, vec!["user:42".to_string(), "team:7".to_string()]);
    /// ```
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.clear();
        for tag in tags {
            let tag = tag.into();
            if !self.tags.contains(&tag) {
                self.tags.push(tag);
            }
        }
        self
    }
}

/// Refuses a tag that is empty or longer than [`MAX_TAG_BYTES`].
pub(crate) fn check_tag(tag: &str, op: crate::Operation) -> crate::Result<()> {
    if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
        return Err(crate::Error::new(
            crate::ErrorKind::InvalidInput,
            op,
            format!(
                "a tag must be 1 to {MAX_TAG_BYTES} bytes long (got {})",
                tag.len()
            ),
        ));
    }
    Ok(())
}

/// `min` of two optional TTLs, `None` meaning unbounded.
pub(crate) fn min_ttl(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Shortens `ttl` by a random fraction in `[0, fraction)`.
pub(crate) fn jitter(ttl: Option<Duration>, fraction: f64) -> Option<Duration> {
    if fraction <= 0.0 {
        return ttl;
    }
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(0u8) | 1);
    }
    let r = STATE.with(|s| {
        // xorshift64*: a uniform fraction is all we need, not cryptographic randomness.
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    });
    // Through f64 seconds, checked: a TTL near `Duration::MAX` keeps its length.
    ttl.map(|d| {
        Duration::try_from_secs_f64(d.as_secs_f64() * (1.0 - r * fraction))
            .map_or(d, |shorter| shorter.min(d))
            .max(Duration::from_millis(1))
    })
}
