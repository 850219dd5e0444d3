//! Periodic background work for layers: a stop switch and the ticker that ends with it.
//!
//! A layer that sweeps expired entries or flushes on a timer spawns one task per job. Each
//! task holds a [`Ticker`] and, by convention, a `Weak` on the layer's state, so that it
//! never keeps a dropped layer's connections open; it ends when the layer's [`Stop`] is
//! pulled (`close`) or dropped (the layer dropped).

use std::time::Duration;

use tokio::sync::watch;

/// The switch that ends every [`Ticker`] made from it, when pulled or dropped.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use capacitor::background::Stop;
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let stop = Stop::new();
/// let mut ticker = stop.ticker(Duration::from_millis(1));
/// assert!(ticker.tick().await);
/// stop.stop();
/// assert!(!ticker.tick().await);
/// # });
/// ```
#[derive(Debug)]
pub struct Stop(watch::Sender<bool>);

impl Default for Stop {
    fn default() -> Self {
        Self::new()
    }
}

impl Stop {
    /// A switch not yet pulled.
    pub fn new() -> Self {
        Stop(watch::channel(false).0)
    }

    /// A ticker that fires every `interval` until this switch is pulled or dropped.
    pub fn ticker(&self, interval: Duration) -> Ticker {
        Ticker {
            stop: self.0.subscribe(),
            interval,
        }
    }

    /// Pulls the switch: every ticker's next [`tick`](Ticker::tick) returns `false`, and
    /// one waiting returns at once.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// Waits out an interval at a time, until its [`Stop`] is pulled or dropped.
#[derive(Debug)]
pub struct Ticker {
    stop: watch::Receiver<bool>,
    interval: Duration,
}

impl Ticker {
    /// Waits one interval; `false` when the switch was pulled or dropped before or during
    /// the wait (the task should end).
    pub async fn tick(&mut self) -> bool {
        if self.stopped() {
            return false;
        }
        match tokio::time::timeout(self.interval, self.stop.changed()).await {
            // The interval passed with the switch untouched.
            Err(_elapsed) => !self.stopped(),
            // Either the flag changed (pulled) or the sender went away (dropped).
            Ok(_) => false,
        }
    }

    /// Whether the switch was pulled (checked between the batches of one pass).
    pub fn stopped(&self) -> bool {
        *self.stop.borrow()
    }
}
