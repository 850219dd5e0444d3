//! A layer that holds chosen operations at a gate until the test releases them, so that a
//! race between two composer operations is forced rather than hoped for.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_core::future::BoxFuture;
use tokio::sync::Semaphore;

use super::wrap::{Around, GateOp, Wrapped};
use crate::error::Result;
use crate::layer::Layer;

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

/// Wraps a layer and holds chosen operations (see [`Gates`]): a [`Wrapped`] layer whose
/// [`Around`] is its gates. Always answers asynchronously, so the composer awaits it like
/// a remote layer.
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
pub type GateLayer<K, V> = Wrapped<K, V, Gates>;

impl<K: Send + Sync + 'static, V: Send + Sync + 'static> Wrapped<K, V, Gates> {
    /// Wraps `inner` with nothing armed.
    pub fn new(inner: impl Layer<K, V>) -> Self {
        Self::shared(Arc::new(inner))
    }

    /// Wraps a shared layer (so the test can also read it directly).
    pub fn shared(inner: Arc<dyn Layer<K, V>>) -> Self {
        Wrapped::with_shared(inner, Arc::default())
    }

    /// The arms, to hold operations with.
    pub fn gates(&self) -> Arc<Gates> {
        self.around()
    }
}

impl Around for Gates {
    fn around<'a, T: Send + 'a>(
        &'a self,
        op: GateOp,
        call: BoxFuture<'a, Result<T>>,
    ) -> BoxFuture<'a, Result<T>> {
        Box::pin(async move {
            match self.take(op) {
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
        })
    }
}
