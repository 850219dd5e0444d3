//! What the layer, its scan streams and its background tasks share: the open database
//! and tree, the [`FlushPolicy`], and the helpers they all use (flushing, decoding a
//! stored value).

use std::sync::{PoisonError, RwLock};

use capacitor_core::background::Stop;
use capacitor_core::{Error, ErrorKind, Operation, Result, SharedClock};

use crate::error::sled_error;

/// The default [`FlushPolicy`]: [`FlushPolicy::EveryMillis`]`(500)`, sled's own default.
const DEFAULT_FLUSH_POLICY: FlushPolicy = FlushPolicy::EveryMillis(500);

/// When the layer makes writes durable (fsync), and so what a crash can lose. Default:
/// [`FlushPolicy::EveryMillis`]`(500)`, sled's own default.
///
/// "Crash" here means the process dies (a panic with `abort`, `SIGKILL`, the OOM killer)
/// or the machine loses power. A write that only reached sled's in-memory buffers is lost
/// by either; a write sled has flushed survives both. [`Layer::flush`] and
/// [`Layer::close`] flush under every policy.
///
/// [`Layer::flush`]: capacitor_core::Layer::flush
/// [`Layer::close`]: capacitor_core::Layer::close
///
/// # Examples
///
/// ```
/// use capacitor::sled::{FlushPolicy, SledLayer};
///
/// let dir = tempfile::tempdir()?;
/// let layer = SledLayer::builder()
///     .path(dir.path().join("cache"))
///     .flush_policy(FlushPolicy::EveryWrite)
///     .sweeper(false) // built outside a tokio runtime
///     .build::<String, String>()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// Every write (`set`, `delete`, the batch forms, `apply_atomic`) returns only after
    /// sled has flushed it to disk. A crash loses **no acknowledged write**: a write that
    /// returned `Ok` is on disk. The slowest policy: one fsync per write (concurrent
    /// writers share fsyncs).
    EveryWrite,
    /// sled flushes in the background every this many milliseconds. A crash loses **the
    /// writes acknowledged in the last window** (up to this many milliseconds of writes,
    /// plus the flush in progress). With [`path`](crate::SledLayerBuilder::path) this is
    /// sled's own flusher thread; with [`db`](crate::SledLayerBuilder::db) the layer runs a
    /// tokio task that flushes at this interval, in addition to whatever the database was
    /// opened with.
    EveryMillis(u64),
    /// Nothing is flushed until [`Layer::flush`](capacitor_core::Layer::flush) or
    /// [`Layer::close`](capacitor_core::Layer::close). A crash can lose **every write since
    /// the last flush** (sled may write some of them out earlier when its buffers fill,
    /// but nothing is promised). With [`db`](crate::SledLayerBuilder::db), a database
    /// opened with a background flusher (sled's default: every 500 ms) keeps flushing on
    /// its own.
    Manual,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        DEFAULT_FLUSH_POLICY
    }
}

/// The open database and the tree entries live in. Dropped on close, which releases
/// sled's directory lock once no scan stream or sweep pass holds a clone.
pub(crate) struct Handles {
    /// Kept so that the database (and, with `path`, its lock and flusher thread) lives as
    /// long as the layer, also when `tree` is a named tree.
    pub(crate) _db: sled::Db,
    pub(crate) tree: sled::Tree,
    /// The tag index, when the layer was built with `tags(true)`.
    pub(crate) tag_trees: Option<TagTrees>,
}

/// The two trees of the tag index (see `crate::tags` for their layout).
#[derive(Clone)]
pub(crate) struct TagTrees {
    /// `tag_len (u16 BE) ++ tag ++ key` → empty: the keys carrying a tag, by prefix.
    pub(crate) tags: sled::Tree,
    /// `key` → the key's tags, each `len (u16 BE) ++ tag`: the source of truth.
    pub(crate) key_tags: sled::Tree,
}

/// Handles on the data tree and, with tags on, the tag index.
#[derive(Clone)]
pub(crate) struct Trees {
    pub(crate) data: sled::Tree,
    pub(crate) tags: Option<TagTrees>,
}

/// What the layer, its scan streams and its background tasks share.
pub(crate) struct Shared<C> {
    /// `None` once closed.
    pub(crate) handles: RwLock<Option<Handles>>,
    pub(crate) codec: C,
    pub(crate) clock: SharedClock,
    pub(crate) flush_policy: FlushPolicy,
    pub(crate) max_value_bytes: usize,
    pub(crate) persistent: bool,
    /// Built with `tags(true)`: the handles hold the tag index.
    pub(crate) tags: bool,
    /// Pulled on close; dropped with the layer: either ends the background tasks.
    pub(crate) stop: Stop,
}

impl<C> Shared<C> {
    /// A handle on the tree, or [`ErrorKind::Closed`]. The lock is held only to clone an
    /// `Arc`, so a panic can never poison it; the poison is ignored all the same.
    pub(crate) fn tree(&self, op: Operation) -> Result<sled::Tree> {
        let handles = self.handles.read().unwrap_or_else(PoisonError::into_inner);
        match &*handles {
            Some(h) => Ok(h.tree.clone()),
            None => Err(Error::closed(op)),
        }
    }

    /// Handles on the data tree and the tag index, or [`ErrorKind::Closed`].
    pub(crate) fn trees(&self, op: Operation) -> Result<Trees> {
        let handles = self.handles.read().unwrap_or_else(PoisonError::into_inner);
        match &*handles {
            Some(h) => Ok(Trees {
                data: h.tree.clone(),
                tags: h.tag_trees.clone(),
            }),
            None => Err(Error::closed(op)),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.handles
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }
}

/// Flushes sled's buffers and fsyncs, off the async worker threads.
///
/// Never `Tree::flush_async`: in sled 0.34 it runs the flush on sled's own I/O pool, whose
/// idle-thread count underflows so that the pool never grows past its 7 initial threads;
/// 7 concurrent flushes then wait forever for a buffer write queued behind them on the
/// same pool (spacejam/sled#1241, #1357; fixed on sled's master, not released). A
/// synchronous `flush` on tokio's blocking pool leaves sled's pool free to write.
pub(crate) async fn flush_tree(tree: &sled::Tree, op: Operation) -> Result<()> {
    let result = match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            let tree = tree.clone();
            runtime
                .spawn_blocking(move || tree.flush())
                .await
                .map_err(|e| Error::new(ErrorKind::Backend, op, "the flush task failed").with_source(e))?
        }
        // Not on tokio: flush on the caller's thread.
        Err(_) => tree.flush(),
    };
    result.map(drop).map_err(|e| sled_error(op, e))
}

/// Runs `work` on tokio's blocking pool (on the caller's thread when not on tokio), for
/// the operations that walk a whole tree or tag.
pub(crate) async fn blocking<R: Send + 'static>(
    op: Operation,
    work: impl FnOnce() -> Result<R> + Send + 'static,
) -> Result<R> {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime
            .spawn_blocking(work)
            .await
            .map_err(|e| Error::new(ErrorKind::Backend, op, "the blocking task failed").with_source(e))?,
        Err(_) => work(),
    }
}
