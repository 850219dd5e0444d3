//! Warm-up: copying entries from a lower layer into the layers above it.

use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;

use futures_core::Stream;

use super::MultiLayer;
use crate::config::min_ttl;
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::stats::Counter;

/// Options of [`MultiLayer::warm_up`].
///
/// Defaults: every key, no limit, into every writable layer above the source, no
/// progress callback.
///
/// # Examples
///
/// On start, copy up to 10,000 `user:` entries from the disk layer into L1 only, and report
/// progress:
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor::memory::MokaLayer;
/// use capacitor::sled::SledLayer;
/// use capacitor::{LayerConfig, MultiLayer, WarmUp};
/// # let dir = tempfile::tempdir().unwrap();
///
/// let cache = MultiLayer::<String, u32>::builder()
///     .layer(LayerConfig::new("l1", MokaLayer::builder().build()?))
///     .layer(LayerConfig::new("disk", SledLayer::builder().path(dir.path().join("db")).build()?))
///     .build()?;
/// let options = WarmUp::new()
///     .prefix("user:")
///     .limit(10_000)
///     .into_layers(["l1"])
///     .progress(|copied| eprintln!("{copied} entries warmed"));
/// let report = cache.warm_up("disk", options).await?;
/// assert_eq!(report.copied, 0); // a new, empty disk
/// # Ok::<(), capacitor::Error>(()) }).unwrap();
/// ```
#[must_use]
#[derive(Clone, Default)]
pub struct WarmUp {
    prefix: Vec<u8>,
    limit: Option<u64>,
    into: Option<Vec<String>>,
    progress: Option<Arc<dyn Fn(u64) + Send + Sync>>,
}

impl fmt::Debug for WarmUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WarmUp")
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .field("limit", &self.limit)
            .field("into", &self.into)
            .finish_non_exhaustive()
    }
}

impl WarmUp {
    /// Every key, no limit, every writable layer above the source.
    pub fn new() -> Self {
        Self::default()
    }
    /// Only keys whose encoded form starts with `prefix`.
    pub fn prefix(mut self, prefix: impl Into<Vec<u8>>) -> Self {
        self.prefix = prefix.into();
        self
    }
    /// Copy at most `entries` entries.
    pub fn limit(mut self, entries: u64) -> Self {
        self.limit = Some(entries);
        self
    }
    /// Copy into these layers only (by name; each must be above the source).
    pub fn into_layers<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.into = Some(names.into_iter().map(Into::into).collect());
        self
    }
    /// Called with the number of entries copied so far, every 1,000 entries and at the end.
    pub fn progress(mut self, callback: impl Fn(u64) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(callback));
        self
    }
}

/// What [`MultiLayer::warm_up`] did.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmUpReport {
    /// Entries copied.
    pub copied: u64,
    /// Entries skipped: expired, or written concurrently (the newer value wins).
    pub skipped: u64,
    /// Entries a target layer refused (counted as errors in its stats).
    pub failed: u64,
}

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Copies entries of layer `from` (by prefix, up to a limit) into the writable layers
    /// above it, keeping each entry's remaining TTL (capped by the target layer's TTL).
    /// Writes that race the copy win, as with promotion.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] for an unknown layer name or a target not above the
    /// source; [`ErrorKind::Unsupported`] when `from` cannot scan; a scan error of `from`.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor::memory::DashMapLayer;
    /// use capacitor::sled::SledLayer;
    /// use capacitor::{Layer, LayerConfig, MultiLayer, WarmUp};
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::sync::Arc;
    ///
    /// let disk = Arc::new(SledLayer::builder().path(dir.path().join("db")).build::<String, u32>()?);
    /// disk.set(&"user:1".to_string(), &1, None).await?;
    /// let cache = MultiLayer::builder()
    ///     .layer(LayerConfig::new("l1", DashMapLayer::new()))
    ///     .layer(LayerConfig::shared("disk", disk))
    ///     .build()?;
    /// let report = cache.warm_up("disk", WarmUp::new().prefix("user:").limit(10_000)).await?;
    /// assert_eq!(report.copied, 1);
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub async fn warm_up(&self, from: &str, options: WarmUp) -> Result<WarmUpReport> {
        self.check_open(Operation::Scan)?;
        let inner = &*self.inner;
        let invalid = |msg: String| Error::new(ErrorKind::InvalidInput, Operation::Scan, msg);
        let source = inner
            .slots
            .iter()
            .position(|s| s.name == from)
            .ok_or_else(|| invalid(format!("no layer named `{from}`")))?;
        let mut targets = Vec::new();
        for (i, slot) in inner.slots[..source].iter().enumerate() {
            let wanted = options
                .into
                .as_ref()
                .is_none_or(|names| names.contains(&slot.name));
            if wanted && !slot.read_only {
                targets.push(i);
            }
        }
        if let Some(names) = &options.into {
            if let Some(bad) = names
                .iter()
                .find(|n| !targets.iter().any(|&i| inner.slots[i].name == **n))
            {
                return Err(invalid(format!("`{bad}` is not a writable layer above `{from}`")));
            }
        }
        let slot = &inner.slots[source];
        let mut stream = slot
            .layer
            .scan(&options.prefix)
            .map_err(|e| e.with_layer(slot.name.clone()))?;
        let mut report = WarmUpReport::default();
        let report_progress = |copied: u64| {
            if let Some(progress) = &options.progress {
                progress(copied);
            }
        };
        // Before the scan reads anything: an entry of a stripe no write touched since is
        // the store's current value.
        let before = inner.guard.snapshot();
        while options.limit.is_none_or(|limit| report.copied < limit) {
            let Some(item) = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await else {
                break;
            };
            let (key, entry) = item.map_err(|e| e.with_layer(slot.name.clone()))?;
            let stripe = inner.guard.stripe_of(&key);
            let mut ticket = inner.guard.ticket_as_of(&before, stripe);
            let mut entry = entry;
            if !inner.guard.still_valid(ticket) {
                // A write of the key may have landed after the scan read it: read it again
                // under a fresh ticket, as a promotion does.
                ticket = inner.guard.ticket(stripe);
                match slot.get(&key).await {
                    Ok(Some(fresh)) => entry = fresh,
                    Ok(None) => {
                        report.skipped += 1;
                        continue;
                    }
                    Err(e) => return Err(slot.error(e)),
                }
            }
            let Some(remaining) = self.promotion_ttl(&entry) else {
                report.skipped += 1;
                continue;
            };
            let mut copied = false;
            let _copy = inner.guard.begin_copy(ticket);
            for &i in targets.iter().rev() {
                let target = &inner.slots[i];
                if !self.may_promote(target, &key, ticket) {
                    continue;
                }
                let result = target
                    .set(&key, &entry.value, min_ttl(target.ttl, remaining))
                    .await;
                let failed = result.is_err();
                if self.promotion_voided(target, ticket, result) && target.delete(&key).await.is_err() {
                    target.counters.incr(Counter::Error);
                }
                report.failed += u64::from(failed);
                copied |= !failed && inner.guard.still_valid(ticket);
            }
            if copied {
                report.copied += 1;
                if report.copied % 1_000 == 0 {
                    report_progress(report.copied);
                }
            } else {
                report.skipped += 1;
            }
        }
        report_progress(report.copied);
        Ok(report)
    }
}
