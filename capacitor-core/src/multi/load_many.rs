//! `get_many_or_load`: one loader call for every key that missed every layer, single
//! flight per key (keys another load has in flight are joined, not loaded again).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;

use super::loader::{bump, loader_error, Handoff, Landing, Role, Sender, Waited, Waiting};
use super::slot::LayerSet;
use super::write::Fill;
use super::MultiLayer;
use crate::error::{BoxError, Error, ErrorKind, Operation, Result};
use crate::load::{LoadEvent, LoadOptions, Loaded, Plan, StaleReason};

/// A batch loader, its output converted.
type BatchLoad<K, V> = Pin<Box<dyn Future<Output = Result<Vec<(K, Loaded<V>)>>> + Send>>;

/// A key this call loads: its flight's sender and fill.
struct Led<K: Hash + Eq + Clone + Send + Sync + 'static, V: Clone + Send + Sync + 'static> {
    key: K,
    tx: Sender<V>,
    fill: Arc<Fill>,
    landing: Landing<K, V>,
}

impl<K, V> MultiLayer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The values under `keys`, in order: from the layers (one batch read per layer, as
    /// [`get_many`](MultiLayer::get_many)), and for the keys that missed every layer from
    /// one call of `loader` with those keys, whose values are then written as
    /// [`get_or_load`](MultiLayer::get_or_load) writes its value. A key the loader does
    /// not return does not exist (`None`, remembered with
    /// [`cache_misses_for`](crate::MultiLayerBuilder::cache_misses_for)).
    ///
    /// Single flight per key: a key another load has in flight is joined, not passed to
    /// the loader, and concurrent loads of these keys join this one. The loader runs on a
    /// task of its own, with the builder's load options (timeouts per key, fail-safe).
    ///
    /// # Errors
    ///
    /// As [`get_many`](MultiLayer::get_many); the loader's error (or a key's hard
    /// timeout) when a key it concerns has no fail-safe copy to answer with; the error of
    /// writing a loaded value.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use capacitor::{LayerConfig, MultiLayer};
    /// use capacitor::memory::DashMapLayer;
    ///
    /// let cache = MultiLayer::<u64, String>::builder().layer(LayerConfig::new("l1", DashMapLayer::new())).build()?;
    /// cache.set(1, "cached".into()).await?;
    /// let values = cache
    ///     .get_many_or_load(&[1, 2, 3], |missing| async move {
    ///         // One query for keys 2 and 3; key 3 does not exist.
    ///         assert_eq!(missing, vec![2, 3]);
    ///         Ok::<_, std::io::Error>(vec![(2, "loaded".to_string())])
    ///     })
    ///     .await?;
    /// assert_eq!(values, vec![Some("cached".into()), Some("loaded".into()), None]);
    /// # Ok::<(), capacitor::Error>(()) }).unwrap();
    /// ```
    pub async fn get_many_or_load<F, Fut, I, E>(&self, keys: &[K], loader: F) -> Result<Vec<Option<V>>>
    where
        F: FnOnce(Vec<K>) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<I, E>> + Send + 'static,
        I: IntoIterator<Item = (K, V)>,
        E: Into<BoxError> + 'static,
    {
        let plan = Arc::clone(&self.inner.load_plan);
        let load = move |missing: Vec<K>| {
            let fut = loader(missing);
            Box::pin(async move {
                match fut.await {
                    Ok(found) => Ok(found.into_iter().map(|(k, v)| (k, Loaded::value(v))).collect()),
                    Err(e) => Err(loader_error(e)),
                }
            }) as BatchLoad<K, V>
        };
        self.load_many(keys, plan, load).await
    }

    /// [`get_many_or_load`](MultiLayer::get_many_or_load) with options for this call and
    /// a loader that says how to cache each value ([`Loaded`]); see
    /// [`get_or_load_with`](MultiLayer::get_or_load_with). Eager refresh does not apply
    /// to batches, and a batch loader always runs to completion
    /// ([`complete_in_background`](LoadOptions::complete_in_background) is not applied;
    /// the timeouts bound how long the callers wait).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidInput`] for invalid options; otherwise as
    /// [`get_many_or_load`](MultiLayer::get_many_or_load).
    pub async fn get_many_or_load_with<F, Fut, I, E>(
        &self,
        keys: &[K],
        options: &LoadOptions,
        loader: F,
    ) -> Result<Vec<Option<V>>>
    where
        F: FnOnce(Vec<K>) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<I, E>> + Send + 'static,
        I: IntoIterator<Item = (K, Loaded<V>)>,
        E: Into<BoxError> + 'static,
    {
        let plan = Arc::new(self.resolve(options, ErrorKind::InvalidInput)?);
        let load = move |missing: Vec<K>| {
            let fut = loader(missing);
            Box::pin(async move {
                match fut.await {
                    Ok(found) => Ok(found.into_iter().collect()),
                    Err(e) => Err(loader_error(e)),
                }
            }) as BatchLoad<K, V>
        };
        self.load_many(keys, plan, load).await
    }

    async fn load_many(
        &self,
        keys: &[K],
        plan: Arc<Plan>,
        loader: impl FnOnce(Vec<K>) -> BatchLoad<K, V> + Send + 'static,
    ) -> Result<Vec<Option<V>>> {
        let inner = &*self.inner;
        let counters = &inner.flights.counters;
        let layer_set = |indices: &[usize]| {
            let mut set = LayerSet::NONE;
            indices.iter().for_each(|&i| set.add(i));
            set
        };
        let (skip_read, skip_write) = (layer_set(&plan.skip_read), layer_set(&plan.skip_write));
        let found = self.get_many_skipping(keys, skip_read, skip_write).await?;
        let mut out: Vec<Option<V>> = Vec::with_capacity(keys.len());
        // Distinct missing keys, and the positions each answers.
        let mut missing: Vec<(K, Vec<usize>)> = Vec::new();
        let mut seen: HashMap<&K, usize> = HashMap::new();
        let now = inner.clock.now();
        for (p, (key, entry)) in keys.iter().zip(found).enumerate() {
            match entry {
                Some(entry) => {
                    counters.reads.incr(crate::stats::Counter::Hit);
                    self.event(LoadEvent::Hit { key });
                    out.push(Some(entry.value));
                }
                None => {
                    out.push(None);
                    if let Some(&m) = seen.get(key) {
                        missing[m].1.push(p);
                        continue;
                    }
                    counters.reads.incr(crate::stats::Counter::Miss);
                    self.event(LoadEvent::Miss { key });
                    if inner.negative.as_ref().is_some_and(|n| n.contains(key, now)) {
                        continue;
                    }
                    if plan.fail_safe {
                        if let Some(copy) = inner.fail_safe.as_ref().and_then(|f| f.throttled(key, now)) {
                            out[p] = Some(self.stale_hit(key, copy, StaleReason::Throttled));
                            continue;
                        }
                    }
                    seen.insert(key, missing.len());
                    missing.push((key.clone(), vec![p]));
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let since = tokio::time::Instant::now();
        let mut waits = Vec::with_capacity(missing.len());
        let mut led = Vec::new();
        for (key, _) in &missing {
            match self.role(key, &plan) {
                Role::Lead {
                    tx,
                    rx,
                    id,
                    fill,
                    waiters,
                } => {
                    led.push(Led {
                        key: key.clone(),
                        tx,
                        fill,
                        landing: Landing {
                            cache: self.clone(),
                            key: key.clone(),
                            id,
                        },
                    });
                    waits.push((rx, id, waiters));
                }
                Role::Follow { rx, id, waiters } => {
                    bump(&counters.joined);
                    waits.push((rx, id, waiters));
                }
            }
        }
        let waiting: Vec<Waiting<'_, K, V>> = missing
            .iter()
            .zip(&waits)
            .map(|((key, _), (_, id, waiters))| Waiting {
                flights: &inner.flights,
                key,
                id: *id,
                waiters: Arc::clone(waiters),
            })
            .collect();
        let mut handoff = None;
        if !led.is_empty() {
            let (cache, plan) = (self.clone(), Arc::clone(&plan));
            let all = waits.iter().map(|(_, _, w)| Arc::clone(w)).collect();
            handoff = Some(Handoff::new(
                Box::pin(async move { cache.fly_many(led, &plan, loader).await }),
                all,
            ));
        }
        // Each `Waiting` ends with its key's wait (or with the loop on an early return),
        // before the hand-off is dropped: it sees whether any caller still waits.
        for (((key, positions), (rx, _, _)), _waiting) in missing.iter().zip(waits).zip(waiting) {
            let wait = self.wait(key, &rx, &plan, since);
            let waited = match &mut handoff {
                Some(handoff) => handoff.drive(wait).await,
                None => wait.await,
            };
            let value = match waited {
                Waited::Done(result) => result?,
                Waited::Gone => {
                    return Err(Error::new(
                        ErrorKind::Backend,
                        Operation::GetMany,
                        "the load was stopped",
                    ));
                }
            };
            for &p in positions {
                out[p].clone_from(&value);
            }
        }
        Ok(out)
    }

    /// The flights of `led`: read again (a flight just before may have written some),
    /// one loader call for the rest, the fills; each key's outcome to its waiters.
    async fn fly_many(
        &self,
        led: Vec<Led<K, V>>,
        plan: &Plan,
        loader: impl FnOnce(Vec<K>) -> BatchLoad<K, V>,
    ) {
        let inner = &*self.inner;
        let keys: Vec<K> = led.iter().map(|l| l.key.clone()).collect();
        let found = match self.get_many_entries(&keys).await {
            Ok(found) => found,
            Err(e) => {
                let e = Arc::new(e);
                led.iter().for_each(|l| l.tx.send(Some(Err(Arc::clone(&e)))));
                return;
            }
        };
        let mut rest = Vec::new();
        for (l, entry) in led.into_iter().zip(found) {
            match entry {
                Some(entry) => l.tx.send(Some(Ok(Some(entry.value)))),
                None => rest.push(l),
            }
        }
        let Some(first) = rest.first() else {
            return;
        };
        bump(&inner.flights.counters.loads);
        self.event(LoadEvent::LoadStarted {
            key: &first.key,
            refresh: false,
        });
        let started = std::time::Instant::now();
        let wanted: Vec<K> = rest.iter().map(|l| l.key.clone()).collect();
        match loader(wanted).await {
            Ok(values) => {
                self.event(LoadEvent::LoadSucceeded {
                    key: &first.key,
                    elapsed: started.elapsed(),
                });
                let mut values: HashMap<K, Loaded<V>> = values.into_iter().collect();
                for l in rest {
                    let loaded = values.remove(&l.key).unwrap_or_else(Loaded::missing);
                    let outcome = self.keep(&l.key, &l.fill, plan, loaded).await;
                    l.tx.send(Some(outcome));
                    drop(l.landing);
                }
            }
            Err(e) => {
                bump(&inner.flights.counters.failures);
                self.event(LoadEvent::LoadFailed {
                    key: &first.key,
                    error: &e,
                });
                let e = Arc::new(e);
                rest.iter().for_each(|l| l.tx.send(Some(Err(Arc::clone(&e)))));
            }
        }
    }
}
