//! The hand-written read futures: [`GetEntry`] and [`Get`].

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::MultiLayer;
use crate::entry::Entry;
use crate::error::{Error, ErrorKind, Operation, Result};

pub(super) type BoxedRead<'a, V> = Pin<Box<dyn Future<Output = Result<Option<Entry<V>>>> + Send + 'a>>;

pub(super) enum Step<'a, V> {
    Done(Result<Option<Entry<V>>>),
    Await(BoxedRead<'a, V>),
}

pub(super) enum GetState<'a, K, V> {
    Start { cache: &'a MultiLayer<K, V>, key: &'a K },
    Await(BoxedRead<'a, V>),
    Finished,
}

/// The future of [`MultiLayer::get_entry`].
///
/// Written by hand rather than as an `async fn` so that an L1 hit is answered on the
/// first poll without any nested state machine: the future is three words, and only a
/// read that must wait (an async layer, a promotion) allocates its continuation.
#[must_use = "futures do nothing unless awaited"]
pub struct GetEntry<'a, K, V> {
    pub(super) state: GetState<'a, K, V>,
}

impl<K, V> fmt::Debug for GetEntry<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetEntry").finish_non_exhaustive()
    }
}

impl<K, V> Future for GetEntry<'_, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    type Output = Result<Option<Entry<V>>>;

    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match std::mem::replace(&mut self.state, GetState::Finished) {
                GetState::Start { cache, key } => {
                    // Cooperative: a hit spends one unit of the task's tokio budget, and
                    // once the budget is spent the read yields first (see
                    // `MultiLayerBuilder::cooperative`).
                    if cache.inner.cooperative && spend_budget(cx).is_pending() {
                        self.state = GetState::Start { cache, key };
                        return Poll::Pending;
                    }
                    // With `tracing`, one relaxed load decides; the traced read is out of
                    // line so the untraced hit stays as small as without the feature.
                    #[cfg(feature = "tracing")]
                    if tracing::level_enabled!(tracing::Level::DEBUG) {
                        match cache.read_traced(key) {
                            Step::Done(result) => return Poll::Ready(result),
                            Step::Await(fut) => {
                                self.state = GetState::Await(fut);
                                continue;
                            }
                        }
                    }
                    match cache.read_sync_prefix(key) {
                        Step::Done(result) => return Poll::Ready(result),
                        Step::Await(fut) => self.state = GetState::Await(fut),
                    }
                }
                GetState::Await(mut fut) => {
                    return match fut.as_mut().poll(cx) {
                        Poll::Ready(result) => Poll::Ready(result),
                        Poll::Pending => {
                            self.state = GetState::Await(fut);
                            Poll::Pending
                        }
                    }
                }
                GetState::Finished => {
                    return Poll::Ready(Err(Error::new(
                        ErrorKind::InvalidInput,
                        Operation::Get,
                        "read future polled after it completed",
                    )))
                }
            }
        }
    }
}

/// Spends one unit of the task's tokio budget; `Pending` (the task is woken at once)
/// when it is spent. Out of line: off by default, it must not weigh on the hit.
#[cold]
#[inline(never)]
fn spend_budget(cx: &mut Context<'_>) -> Poll<()> {
    tokio::task::coop::poll_proceed(cx).map(|budget| budget.made_progress())
}

/// The future of [`MultiLayer::get`]: [`GetEntry`] without the expiry.
#[must_use = "futures do nothing unless awaited"]
#[derive(Debug)]
pub struct Get<'a, K, V>(pub(super) GetEntry<'a, K, V>);

impl<K, V> Future for Get<'_, K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    type Output = Result<Option<V>>;

    // Always inlined, with `GetEntry::poll` and the synchronous prefix: an L1 hit then
    // compiles into the caller with no result moved through the stack (measured: 10-20 ns
    // of a 25 ns hit when the compiler chose not to inline, as it did with `tracing` on).
    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map(|e| e.map(|e| e.value)))
    }
}
