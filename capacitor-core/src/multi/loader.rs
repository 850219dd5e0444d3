//! `get_or_load`: single-flight loaders, negative caching and TTL jitter.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use super::write::Fill;
use super::MultiLayer;
use crate::entry::Timestamp;
use crate::error::{BoxError, Error, ErrorKind, Nested, Operation, Result};
use crate::guard::Ticket;

enum Role<V> {
    Lead(watch::Sender<Outcome<V>>, u64, Arc<Fill>),
    Follow(watch::Receiver<Outcome<V>>),
}

/// What a flight's leader hands its followers.
type Outcome<V> = Option<std::result::Result<Option<V>, Arc<Error>>>;

/// One load in progress.
struct Flight<V> {
    id: u64,
    /// Taken when the flight began, before its leader's first read: a write of the key
    /// that began since (or was in flight then) voids the flight for callers arriving
    /// after it, and keeps the leader from caching what it loaded.
    ticket: Ticket,
    /// The leader's fill write, once it began: the only write since the ticket.
    fill: Arc<Fill>,
    outcome: watch::Receiver<Outcome<V>>,
}

/// The loads in progress, one per key.
pub(super) struct Flights<K, V> {
    map: Mutex<HashMap<K, Flight<V>>>,
    next_id: AtomicU64,
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }
}

impl<K, V> Flights<K, V> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Flight<V>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a leader's flight when it ends, also by panic or cancellation, so that the key
/// is never wedged: followers see the sender dropped and one of them leads a new flight.
/// A flight that a later one replaced is not touched.
struct Landing<'a, K: Hash + Eq, V> {
    flights: &'a Flights<K, V>,
    key: &'a K,
    id: u64,
}

impl<K: Hash + Eq, V> Drop for Landing<'_, K, V> {
    fn drop(&mut self) {
        let mut flights = self.flights.lock();
        if flights.get(self.key).is_some_and(|f| f.id == self.id) {
            flights.remove(self.key);
        }
    }
}

/// Keys a loader said do not exist, until their expiry (`cache_misses_for`).
pub(super) struct NegativeCache<K> {
    ttl: Duration,
    map: Mutex<HashMap<K, Timestamp>>,
}

/// At most this many keys are remembered as missing; beyond it misses are not cached.
const NEGATIVE_BOUND: usize = 100_000;

impl<K: Hash + Eq + Clone> NegativeCache<K> {
    pub(super) fn new(ttl: Duration) -> Self {
        NegativeCache {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Timestamp>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn contains(&self, key: &K, now: Timestamp) -> bool {
        let mut map = self.lock();
        match map.get(key) {
            Some(at) if *at > now => true,
            Some(_) => {
                map.remove(key);
                false
            }
            None => false,
        }
    }

    fn remember(&self, key: &K, now: Timestamp) {
        let mut map = self.lock();
        if map.len() >= NEGATIVE_BOUND {
            map.retain(|_, at| *at > now);
        }
        if map.len() < NEGATIVE_BOUND {
            map.insert(key.clone(), now.saturating_add(self.ttl));
        }
    }

    pub(super) fn forget(&self, key: &K) {
        self.lock().remove(key);
    }

    pub(super) fn clear(&self) {
        self.lock().clear();
    }
}

fn shared_error(err: &Arc<Error>) -> Error {
    Error::new(err.kind(), Operation::Get, "the loader failed").with_source(Nested(Arc::clone(err)))
}

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The value under `key`, or on a full miss the value `loader` produces, which is then
    /// written like a [`set`](MultiLayer::set).
    ///
    /// Concurrent calls for one key run one loader (single flight) and all get its value.
    /// A `set` or `delete` of the key that completes while the loader runs wins: the
    /// loaded value is returned to the waiters but not written. A loader that panics or
    /// whose caller is cancelled does not wedge the key: a waiting caller runs its own.
    ///
    /// # Errors
    ///
    /// As [`get`](MultiLayer::get), and the error of writing the loaded value.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor::{LayerConfig, MultiLayer};
    /// use capacitor::memory::DashMapLayer;
    ///
    /// let cache = MultiLayer::<u64, String>::builder().layer(LayerConfig::new("l1", DashMapLayer::new())).build()?;
    /// let name = cache.get_or_load(&42, || async { "loaded from the database".to_string() }).await?;
    /// assert_eq!(cache.get(&42).await?, Some(name));
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub async fn get_or_load<F, Fut>(&self, key: &K, loader: F) -> Result<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let loaded = self
            .load(key, false, || async {
                Ok::<_, std::convert::Infallible>(Some(loader().await))
            })
            .await?;
        loaded.ok_or_else(|| Error::new(ErrorKind::Backend, Operation::Get, "the loader produced no value"))
    }

    /// Like [`get_or_load`](MultiLayer::get_or_load) with a fallible loader that may say the
    /// key does not exist (`Ok(None)`). With
    /// [`cache_misses_for`](crate::MultiLayerBuilder::cache_misses_for), such keys are
    /// remembered as missing for that long (a `set` of the key forgets it).
    ///
    /// # Errors
    ///
    /// A loader error reaches every waiter of the flight (kind
    /// [`ErrorKind::Backend`] unless the loader returned a capacitor [`Error`], whose kind
    /// is kept), and nothing is cached.
    pub async fn try_get_or_load<F, Fut, E>(&self, key: &K, loader: F) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        self.load(key, true, loader).await
    }

    async fn load<F, Fut, E>(&self, key: &K, negative: bool, loader: F) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let inner = &*self.inner;
        if let Some(v) = self.get(key).await? {
            return Ok(Some(v));
        }
        let negatives = inner.negative.as_ref().filter(|_| negative);
        if negatives.is_some_and(|n| n.contains(key, inner.clock.now())) {
            return Ok(None);
        }
        let mut loader = Some(loader);
        loop {
            // The lock is released at the end of this block, before any await.
            let role = {
                let mut flights = inner.flights.lock();
                match flights.get(key) {
                    // A flight that began before a write of the key (or during one) may
                    // hand out the value from before it: a caller arriving after the
                    // write must not get that, so it starts a flight of its own. (The
                    // leader's own fill is a write too, but it writes the flight's value.)
                    Some(flight)
                        if inner.guard.still_valid(flight.ticket)
                            || flight.fill.only_write_since(&inner.guard) =>
                    {
                        Role::Follow(flight.outcome.clone())
                    }
                    _ => {
                        let (tx, rx) = watch::channel(None);
                        let id = inner.flights.next_id.fetch_add(1, Ordering::Relaxed);
                        let ticket = inner.guard.ticket(inner.guard.stripe_of(key));
                        let fill = Arc::new(Fill::new(ticket));
                        flights.insert(
                            key.clone(),
                            Flight {
                                id,
                                ticket,
                                fill: Arc::clone(&fill),
                                outcome: rx,
                            },
                        );
                        Role::Lead(tx, id, fill)
                    }
                }
            };
            match role {
                Role::Lead(tx, id, fill) => {
                    let Some(loader) = loader.take() else { continue };
                    let landing = Landing {
                        flights: &inner.flights,
                        key,
                        id,
                    };
                    return self
                        .lead(key, tx, &fill, landing, negatives.is_some(), loader)
                        .await;
                }
                Role::Follow(mut rx) => match rx.wait_for(Option::is_some).await {
                    Ok(outcome) => match &*outcome {
                        Some(Ok(v)) => return Ok(v.clone()),
                        Some(Err(e)) => return Err(shared_error(e)),
                        None => continue,
                    },
                    // The leader panicked or was cancelled: try again, maybe as leader.
                    Err(_) => continue,
                },
            }
        }
    }

    async fn lead<F, Fut, E>(
        &self,
        key: &K,
        tx: watch::Sender<Outcome<V>>,
        fill: &Fill,
        _landing: Landing<'_, K, V>,
        negative: bool,
        loader: F,
    ) -> Result<Option<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let inner = &*self.inner;
        // The flight before ours may have just written the value. (The flight's ticket
        // was taken before this read: a write that completes from here on voids the fill.)
        if let Some(v) = self.get(key).await? {
            let _ = tx.send(Some(Ok(Some(v.clone()))));
            return Ok(Some(v));
        }
        let loaded = loader().await.map_err(|e| {
            let source: BoxError = e.into();
            let kind = source
                .downcast_ref::<Error>()
                .map_or(ErrorKind::Backend, Error::kind);
            Error::new(kind, Operation::Get, "the loader failed").with_source(source)
        });
        let outcome = match loaded {
            Ok(value) => {
                if inner.guard.still_valid(fill.ticket) {
                    match &value {
                        // Written only if no write of the key begins before the fill does.
                        Some(v) => self.write_or_fill(key, v, None, Some(fill)).await?,
                        None if negative => {
                            if let Some(n) = &inner.negative {
                                n.remember(key, inner.clock.now());
                            }
                        }
                        None => {}
                    }
                }
                Ok(value)
            }
            Err(e) => Err(Arc::new(e)),
        };
        let _ = tx.send(Some(outcome.clone()));
        outcome.map_err(|e| shared_error(&e))
    }
}
