//! A layer that holds chosen operations at a gate until the test releases them, so that a
//! race between two composer operations is forced rather than hoped for.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use crate::entry::Entry;
use crate::error::Result;
use crate::layer::{Capabilities, EntryStream, Layer, WriteOp};

/// The operations a [`GateLayer`] can hold.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateOp {
    /// `get`.
    Get,
    /// `get_many`.
    GetMany,
    /// `exists`.
    Exists,
    /// `set`.
    Set,
    /// `set_many`.
    SetMany,
    /// `delete`.
    Delete,
    /// `delete_many`.
    DeleteMany,
    /// `apply_atomic` (a transaction's commit).
    Atomic,
}

/// Where an operation waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Before the inner layer sees it (the write has not happened yet).
    Before,
    /// After the inner layer answered (the write happened, or the read has its value), before
    /// the answer is returned.
    After,
}

struct Arm {
    op: GateOp,
    skip: usize,
    hold: Hold,
    gate: Arc<GateState>,
}

struct GateState {
    reached: Semaphore,
    released: Semaphore,
}

/// One armed hold: wait until an operation reaches it, then release it.
#[derive(Clone)]
pub struct Gate(Arc<GateState>);

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

impl Gate {
    /// Waits until the held operation has reached the gate; panics after `limit` (a test
    /// that arms a gate nothing reaches is wrong, and must not hang).
    pub async fn reached_within(&self, limit: Duration) {
        match tokio::time::timeout(limit, self.0.reached.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            _ => panic!("no operation reached the gate within {limit:?}"),
        }
    }

    /// Waits (up to 10 s) until the held operation has reached the gate.
    pub async fn reached(&self) {
        self.reached_within(Duration::from_secs(10)).await;
    }

    /// Lets the held operation go on.
    pub fn release(&self) {
        self.0.released.add_permits(1);
    }
}

/// The arms of a [`GateLayer`], shared with the test.
#[derive(Default)]
pub struct Gates {
    arms: Mutex<VecDeque<Arm>>,
}

impl fmt::Debug for Gates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gates")
            .field("armed", &self.lock().len())
            .finish()
    }
}

impl Gates {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Arm>> {
        self.arms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds the next `op` at `hold`.
    pub fn hold(&self, op: GateOp, hold: Hold) -> Gate {
        self.hold_nth(op, 0, hold)
    }

    /// Lets `skip` calls of `op` pass, then holds the next one at `hold`.
    pub fn hold_nth(&self, op: GateOp, skip: usize, hold: Hold) -> Gate {
        let state = Arc::new(GateState {
            reached: Semaphore::new(0),
            released: Semaphore::new(0),
        });
        self.lock().push_back(Arm {
            op,
            skip,
            hold,
            gate: Arc::clone(&state),
        });
        Gate(state)
    }

    /// The gate this call of `op` must wait at, if one is armed for it.
    fn take(&self, op: GateOp) -> Option<(Hold, Arc<GateState>)> {
        let mut arms = self.lock();
        let i = arms.iter().position(|a| a.op == op)?;
        if arms[i].skip > 0 {
            arms[i].skip -= 1;
            return None;
        }
        arms.remove(i).map(|a| (a.hold, a.gate))
    }
}

async fn wait(gate: &GateState) {
    gate.reached.add_permits(1);
    if let Ok(permit) = gate.released.acquire().await {
        permit.forget();
    }
}

/// Wraps a layer and holds chosen operations (see [`Gates`]). Always answers
/// asynchronously, so the composer awaits it like a remote layer.
///
/// # Examples
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use capacitor_core::testkit::{GateLayer, GateOp, Hold, MapLayer};
/// use capacitor_core::Layer;
/// use std::sync::Arc;
///
/// let layer = Arc::new(GateLayer::new(MapLayer::<u8, u8>::new()));
/// let gate = layer.gates().hold(GateOp::Set, Hold::After);
/// let writer = tokio::spawn({
///     let layer = Arc::clone(&layer);
///     async move { layer.set(&1, &1, None).await }
/// });
/// gate.reached().await; // written, not yet acknowledged
/// assert_eq!(layer.get(&1).await?.map(|e| e.value), Some(1));
/// gate.release();
/// writer.await.unwrap()?;
/// # Ok::<(), capacitor_core::Error>(()) }).unwrap();
/// ```
pub struct GateLayer<K, V> {
    inner: Arc<dyn Layer<K, V>>,
    gates: Arc<Gates>,
}

impl<K, V> fmt::Debug for GateLayer<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GateLayer")
            .field("gates", &self.gates)
            .finish_non_exhaustive()
    }
}

impl<K: Send + Sync + 'static, V: Send + Sync + 'static> GateLayer<K, V> {
    /// Wraps `inner` with nothing armed.
    pub fn new(inner: impl Layer<K, V>) -> Self {
        Self::shared(Arc::new(inner))
    }

    /// Wraps a shared layer (so the test can also read it directly).
    pub fn shared(inner: Arc<dyn Layer<K, V>>) -> Self {
        GateLayer {
            inner,
            gates: Arc::default(),
        }
    }

    /// The arms, to hold operations with.
    pub fn gates(&self) -> Arc<Gates> {
        Arc::clone(&self.gates)
    }

    async fn run<T>(&self, op: GateOp, call: impl std::future::Future<Output = T>) -> T {
        match self.gates.take(op) {
            None => call.await,
            Some((Hold::Before, gate)) => {
                wait(&gate).await;
                call.await
            }
            Some((Hold::After, gate)) => {
                let out = call.await;
                wait(&gate).await;
                out
            }
        }
    }
}

#[async_trait]
impl<K: Send + Sync + 'static, V: Send + Sync + 'static> Layer<K, V> for GateLayer<K, V> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        caps.sync_ops = false;
        caps
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        self.run(GateOp::Get, self.inner.get(key)).await
    }

    async fn set(&self, key: &K, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.run(GateOp::Set, self.inner.set(key, value, ttl)).await
    }

    async fn delete(&self, key: &K) -> Result<bool> {
        self.run(GateOp::Delete, self.inner.delete(key)).await
    }

    async fn exists(&self, key: &K) -> Result<bool> {
        self.run(GateOp::Exists, self.inner.exists(key)).await
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        self.run(GateOp::GetMany, self.inner.get_many(keys)).await
    }

    async fn set_many(&self, entries: &[(K, V)], ttl: Option<Duration>) -> Result<()> {
        self.run(GateOp::SetMany, self.inner.set_many(entries, ttl)).await
    }

    async fn delete_many(&self, keys: &[K]) -> Result<u64> {
        self.run(GateOp::DeleteMany, self.inner.delete_many(keys)).await
    }

    async fn apply_atomic(&self, ops: &[WriteOp<K, V>]) -> Result<()> {
        self.run(GateOp::Atomic, self.inner.apply_atomic(ops)).await
    }

    fn scan(&self, prefix: &[u8]) -> Result<EntryStream<K, V>> {
        self.inner.scan(prefix)
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
