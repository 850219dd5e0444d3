//! Options and results of loads from the origin: [`LoadOptions`], [`Loaded`],
//! [`LoadEvent`] and [`LoadStats`].

use std::time::Duration;

use crate::error::{Error, ErrorKind, Operation, Result};

/// How [`MultiLayer::get_or_load_with`](crate::MultiLayer::get_or_load_with) (and the other
/// loading reads) run the loader and cache what it returns.
///
/// The builder's [`load_options`](crate::MultiLayerBuilder::load_options) are the
/// defaults of every load; [`MultiLayer::load_options`](crate::MultiLayer::load_options)
/// returns them, to change for one call. The options of the caller that starts a load
/// (its TTLs, skipped layers, background completion, cancellation) govern that load; each
/// caller that joins it waits by its own timeouts.
///
/// Defaults: no timeouts, the load completes in the background when its callers time out
/// or are cancelled, no eager refresh, the layers' TTLs, every layer read and written,
/// fail-safe used when the composer has it.
///
/// # Examples
///
/// ```
/// use capacitor::LoadOptions;
/// use std::time::Duration;
///
/// let options = LoadOptions::new()
///     .soft_timeout(Duration::from_millis(50)) // then the fail-safe copy, if any
///     .hard_timeout(Duration::from_secs(2)) // then a Timeout error (or the copy)
///     .eager_refresh(0.8) // reload in the background after 80% of the TTL
///     .layer_ttl("l1", Duration::from_secs(10))
///     .skip_write("redis");
/// assert_eq!(options.soft_timeout, Some(Duration::from_millis(50)));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct LoadOptions {
    /// After this long, a caller is answered with the fail-safe copy when there is one
    /// (a counted stale hit); the load goes on. Without a copy the caller waits on.
    pub soft_timeout: Option<Duration>,
    /// After this long, a caller is answered with the fail-safe copy when there is one,
    /// else with an [`ErrorKind::Timeout`] error.
    pub hard_timeout: Option<Duration>,
    /// Whether a load whose callers timed out runs on and writes its result (`true`), or
    /// is stopped at the starting caller's timeout (`false`).
    pub complete_in_background: bool,
    /// Whether a load stops when every caller waiting on it is gone (cancelled or timed
    /// out). Off by default: the load completes for the cache and for later callers.
    pub cancel_with_callers: bool,
    /// Reload in the background, through the loader, once a copy has lived this fraction
    /// of its TTL (in `(0, 1)`); the caller is answered at once with the copy.
    pub eager_refresh: Option<f64>,
    /// The TTL of the loaded entry (each layer keeps it for the shorter of this and its
    /// own TTL). A TTL the loader returns ([`Loaded::ttl`]) takes its place.
    pub ttl: Option<Duration>,
    /// Whether a failing or timed-out load may be answered with the fail-safe copy (when
    /// the composer has [`fail_safe`](crate::MultiLayerBuilder::fail_safe)).
    pub fail_safe: bool,
    pub(crate) layer_ttls: Vec<(String, Duration)>,
    pub(crate) skip_read: Vec<String>,
    pub(crate) skip_write: Vec<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            soft_timeout: None,
            hard_timeout: None,
            complete_in_background: true,
            cancel_with_callers: false,
            eager_refresh: None,
            ttl: None,
            fail_safe: true,
            layer_ttls: Vec::new(),
            skip_read: Vec::new(),
            skip_write: Vec::new(),
        }
    }
}

impl LoadOptions {
    /// The default options (see the type's docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`LoadOptions::soft_timeout`].
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = Some(timeout);
        self
    }

    /// Sets [`LoadOptions::hard_timeout`].
    pub fn hard_timeout(mut self, timeout: Duration) -> Self {
        self.hard_timeout = Some(timeout);
        self
    }

    /// Sets [`LoadOptions::complete_in_background`].
    pub fn complete_in_background(mut self, on: bool) -> Self {
        self.complete_in_background = on;
        self
    }

    /// Sets [`LoadOptions::cancel_with_callers`].
    pub fn cancel_with_callers(mut self, on: bool) -> Self {
        self.cancel_with_callers = on;
        self
    }

    /// Sets [`LoadOptions::eager_refresh`].
    pub fn eager_refresh(mut self, fraction: f64) -> Self {
        self.eager_refresh = Some(fraction);
        self
    }

    /// Sets [`LoadOptions::ttl`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets [`LoadOptions::fail_safe`].
    pub fn fail_safe(mut self, on: bool) -> Self {
        self.fail_safe = on;
        self
    }

    /// The layer named `layer` keeps the loaded entry for `ttl` (bounded by the entry's
    /// TTL) instead of its configured TTL.
    pub fn layer_ttl(mut self, layer: impl Into<String>, ttl: Duration) -> Self {
        let layer = layer.into();
        self.layer_ttls.retain(|(name, _)| *name != layer);
        self.layer_ttls.push((layer, ttl));
        self
    }

    /// Reads of this call pass the cache layer named `layer` by.
    pub fn skip_read(mut self, layer: impl Into<String>) -> Self {
        self.skip_read.push(layer.into());
        self
    }

    /// The loaded value is not written into the cache layer named `layer` (its copy of
    /// the key, if any, is removed instead, so that it cannot differ from the store's),
    /// nor copied there by this call's promotions.
    pub fn skip_write(mut self, layer: impl Into<String>) -> Self {
        self.skip_write.push(layer.into());
        self
    }

    /// [`skip_read`](Self::skip_read) and [`skip_write`](Self::skip_write) of `layer`.
    pub fn skip(self, layer: impl Into<String>) -> Self {
        let layer = layer.into();
        self.skip_read(layer.clone()).skip_write(layer)
    }

    /// Checks the options against the composer's layers (`names`, top first; the
    /// authoritative one at `store`); `kind` is the kind of the error.
    pub(crate) fn resolve(&self, names: &[&str], store: usize, kind: ErrorKind) -> Result<Plan> {
        let bad = |msg: String| -> Result<Plan> { Err(Error::new(kind, Operation::Get, msg)) };
        let bad_index = |msg: String| -> Result<usize> { Err(Error::new(kind, Operation::Get, msg)) };
        for (what, value) in [
            ("soft_timeout", self.soft_timeout),
            ("hard_timeout", self.hard_timeout),
            ("ttl", self.ttl),
        ] {
            if value == Some(Duration::ZERO) {
                return bad(format!("load option {what} must be greater than zero"));
            }
        }
        if let (Some(soft), Some(hard)) = (self.soft_timeout, self.hard_timeout) {
            if soft >= hard {
                return bad(format!(
                    "load option soft_timeout ({soft:?}) must be shorter than hard_timeout ({hard:?})"
                ));
            }
        }
        if let Some(f) = self.eager_refresh {
            if !(f > 0.0 && f < 1.0) {
                return bad(format!("load option eager_refresh ({f}) must be between 0 and 1"));
            }
        }
        let index = |name: &str, what: &str| -> Result<usize> {
            match names.iter().position(|n| *n == name) {
                Some(i) => Ok(i),
                None => bad_index(format!("load option {what}: no layer is named `{name}`")),
            }
        };
        let mut layer_ttl = vec![None; names.len()];
        for (name, ttl) in &self.layer_ttls {
            if ttl.is_zero() {
                return bad(format!(
                    "load option layer_ttl of `{name}` must be greater than zero"
                ));
            }
            layer_ttl[index(name, "layer_ttl")?] = Some(*ttl);
        }
        let mut sets = [Vec::new(), Vec::new()];
        for (set, (names_, what)) in sets
            .iter_mut()
            .zip([(&self.skip_read, "skip_read"), (&self.skip_write, "skip_write")])
        {
            for name in names_ {
                let i = index(name, what)?;
                if i == store {
                    return bad(format!(
                        "load option {what}: `{name}` is the authoritative layer, which every load reads and writes"
                    ));
                }
                set.push(i);
            }
        }
        let [skip_read, skip_write] = sets;
        Ok(Plan {
            soft: self.soft_timeout,
            hard: self.hard_timeout,
            background: self.complete_in_background,
            cancel_with_callers: self.cancel_with_callers,
            eager: self.eager_refresh,
            ttl: self.ttl,
            fail_safe: self.fail_safe,
            layer_ttl: layer_ttl.iter().any(Option::is_some).then(|| layer_ttl.into()),
            skip_read,
            skip_write,
        })
    }
}

/// [`LoadOptions`] checked against a composer's layers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Plan {
    pub(crate) soft: Option<Duration>,
    pub(crate) hard: Option<Duration>,
    pub(crate) background: bool,
    pub(crate) cancel_with_callers: bool,
    pub(crate) eager: Option<f64>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) fail_safe: bool,
    /// Per layer index, a TTL replacing the layer's own; `None` when no layer has one.
    pub(crate) layer_ttl: Option<Box<[Option<Duration>]>>,
    pub(crate) skip_read: Vec<usize>,
    pub(crate) skip_write: Vec<usize>,
}

/// What a loader returns through
/// [`get_or_load_with`](crate::MultiLayer::get_or_load_with): the value (or that the key
/// does not exist) and how to cache it (adaptive TTL).
///
/// # Examples
///
/// ```
/// use capacitor::Loaded;
/// use std::time::Duration;
///
/// // A value that changes often is cached briefly; one that never changes, for long.
/// let hot: Loaded<String> = Loaded::value("price".into()).ttl(Duration::from_secs(5));
/// let frozen: Loaded<String> = Loaded::value("archived".into()).ttl(Duration::from_secs(86_400));
/// let fresh_only: Loaded<String> = Loaded::value("one-off".into()).uncached();
/// let gone: Loaded<String> = Loaded::missing();
/// assert_eq!(hot.ttl_given(), Some(Duration::from_secs(5)));
/// assert!(!fresh_only.is_cached());
/// assert!(gone.get().is_none() && frozen.get().is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Loaded<V> {
    value: Option<V>,
    ttl: Option<Duration>,
    cache: bool,
}

impl<V> Loaded<V> {
    /// The loaded value, cached with the load's TTLs.
    pub fn value(value: V) -> Self {
        Loaded {
            value: Some(value),
            ttl: None,
            cache: true,
        }
    }

    /// The key does not exist at the origin (remembered as missing with
    /// [`cache_misses_for`](crate::MultiLayerBuilder::cache_misses_for)).
    pub fn missing() -> Self {
        Loaded {
            value: None,
            ttl: None,
            cache: true,
        }
    }

    /// Caches the value for `ttl` (in each layer at most its own TTL, or the load's
    /// per-layer TTL), in place of the load's [`LoadOptions::ttl`]. A zero TTL means
    /// "already stale": the value is returned and not cached.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Returns the value to the callers without caching it (nor remembering a miss).
    pub fn uncached(mut self) -> Self {
        self.cache = false;
        self
    }

    /// The value, if the key exists.
    pub fn get(&self) -> Option<&V> {
        self.value.as_ref()
    }

    /// The TTL given with [`ttl`](Self::ttl).
    pub fn ttl_given(&self) -> Option<Duration> {
        self.ttl
    }

    /// Whether the value is cached.
    pub fn is_cached(&self) -> bool {
        self.cache && self.ttl != Some(Duration::ZERO)
    }

    pub(crate) fn into_parts(self) -> (Option<V>, Option<Duration>, bool) {
        let cache = self.is_cached();
        (self.value, self.ttl, cache)
    }
}

/// Why a load was answered with the fail-safe copy.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// The loader failed.
    LoaderFailed,
    /// The soft timeout passed.
    SoftTimeout,
    /// The hard timeout passed.
    HardTimeout,
    /// The loader failed a moment ago: the copy is served for the fail-safe throttle
    /// without calling it again.
    Throttled,
}

/// What a loading read did, told to the listener of
/// [`on_load_event`](crate::MultiLayerBuilder::on_load_event) (and, with the `tracing`
/// feature, logged as a `capacitor` event without the key).
#[non_exhaustive]
#[derive(Debug)]
pub enum LoadEvent<'a, K> {
    /// A layer had the key.
    Hit {
        /// The key.
        key: &'a K,
    },
    /// No layer had the key: the caller starts a load or joins one.
    Miss {
        /// The key.
        key: &'a K,
    },
    /// The caller was answered with the fail-safe copy.
    StaleHit {
        /// The key.
        key: &'a K,
        /// Why.
        reason: StaleReason,
    },
    /// The loader was called.
    LoadStarted {
        /// The key (the first of a batch's keys).
        key: &'a K,
        /// An eager refresh, not a caller's miss.
        refresh: bool,
    },
    /// The loader returned a value, or that the key does not exist.
    LoadSucceeded {
        /// The key (the first of a batch's keys).
        key: &'a K,
        /// How long the loader took.
        elapsed: Duration,
    },
    /// The loader failed (or panicked, or was stopped at its hard timeout).
    LoadFailed {
        /// The key (the first of a batch's keys).
        key: &'a K,
        /// The loader's error.
        error: &'a Error,
    },
    /// A caller's timeout passed while it waited on the load.
    TimedOut {
        /// The key.
        key: &'a K,
        /// The hard timeout (else the soft one).
        hard: bool,
    },
}

/// Counters of the loading reads (`get_or_load` and its forms).
#[non_exhaustive]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Loading reads a layer answered.
    pub hits: u64,
    /// Loading reads no layer answered.
    pub misses: u64,
    /// Loader calls (a batch counts once).
    pub loads: u64,
    /// Loader calls that failed (errors, panics, hard timeouts of loads that do not
    /// complete in the background).
    pub failures: u64,
    /// Callers answered with the fail-safe copy.
    pub stale_hits: u64,
    /// Callers whose soft timeout passed.
    pub soft_timeouts: u64,
    /// Callers whose hard timeout passed.
    pub hard_timeouts: u64,
    /// Callers that joined a load another caller started.
    pub joined: u64,
    /// Eager refreshes started.
    pub refreshes: u64,
    /// Loaded values not written: a write of the key overtook the load, or the loader
    /// said not to cache.
    pub not_cached: u64,
}
