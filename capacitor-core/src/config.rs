//! Configuration of the composer: [`LayerConfig`], [`WritePolicy`], [`SetOptions`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::layer::Layer;

/// How `set` and `delete` reach the layers.
///
/// More policies (write-back) will be added; match with a wildcard arm.
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
}

/// One layer of a [`MultiLayer`](crate::MultiLayer): the layer itself, its name and its
/// options.
///
/// Defaults: no TTL (entries live as long as the `set` asks), writable.
///
/// # Examples
///
/// ```
/// use capacitor_core::{testkit::MapLayer, LayerConfig};
/// use std::time::Duration;
///
/// let l1 = LayerConfig::<String, u64>::new("l1", MapLayer::new()).ttl(Duration::from_secs(30));
/// let archive = LayerConfig::<String, u64>::new("archive", MapLayer::new()).read_only(true);
/// # let _ = (l1, archive);
/// ```
#[must_use]
pub struct LayerConfig<K, V> {
    pub(crate) name: String,
    pub(crate) layer: Arc<dyn Layer<K, V>>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) read_only: bool,
}

impl<K, V> fmt::Debug for LayerConfig<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerConfig")
            .field("name", &self.name)
            .field("ttl", &self.ttl)
            .field("read_only", &self.read_only)
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
        }
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
}

/// Options of one write ([`MultiLayer::set_with`](crate::MultiLayer::set_with)).
///
/// # Examples
///
/// ```
/// use capacitor_core::SetOptions;
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
}

impl SetOptions {
    /// Default options: no TTL override.
    pub fn new() -> Self {
        SetOptions::default()
    }

    /// Sets the entry's time to live.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// `min` of two optional TTLs, `None` meaning unbounded.
pub(crate) fn min_ttl(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}
