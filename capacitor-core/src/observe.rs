//! Observability hooks: `tracing` events and spans, `metrics` export. Each hook compiles
//! to nothing without its feature.
//!
//! Nothing here ever records a key or a value: spans and events carry the composer's
//! name, layer names, operation names, outcomes and error kinds.

use crate::health::BreakerState;

/// A layer's breaker changed state.
#[allow(unused_variables)]
pub(crate) fn breaker_changed(cache: &str, layer: &str, from: BreakerState, to: BreakerState) {
    #[cfg(feature = "tracing")]
    match to {
        BreakerState::Open => tracing::warn!(
            target: "capacitor",
            cache,
            layer,
            from = from.as_str(),
            to = to.as_str(),
            "circuit breaker opened: the layer is skipped"
        ),
        _ => tracing::info!(
            target: "capacitor",
            cache,
            layer,
            from = from.as_str(),
            to = to.as_str(),
            "circuit breaker changed state"
        ),
    }
    #[cfg(feature = "metrics")]
    metrics::gauge!("capacitor_layer_breaker_state", "cache" => cache.to_owned(), "layer" => layer.to_owned())
        .set(to.as_gauge());
}

/// A read was answered from the fail-safe store.
#[allow(unused_variables)]
pub(crate) fn stale_hit(cache: &str) {
    #[cfg(feature = "tracing")]
    tracing::debug!(target: "capacitor", cache, "layers failing: served a fail-safe copy");
}

/// A loading read did something (see [`LoadEvent`](crate::LoadEvent)); never the key.
#[allow(unused_variables)]
pub(crate) fn load_event<K>(cache: &str, event: &crate::LoadEvent<'_, K>) {
    #[cfg(feature = "tracing")]
    match event {
        crate::LoadEvent::StaleHit { reason, .. } => {
            tracing::debug!(target: "capacitor", cache, reason = ?reason, "load answered with a fail-safe copy")
        }
        crate::LoadEvent::LoadStarted { refresh, .. } => {
            tracing::debug!(target: "capacitor", cache, refresh, "loader called")
        }
        crate::LoadEvent::LoadSucceeded { elapsed, .. } => {
            tracing::debug!(target: "capacitor", cache, elapsed_ms = elapsed.as_secs_f64() * 1e3, "loader answered")
        }
        crate::LoadEvent::LoadFailed { error, .. } => tracing::warn!(
            target: "capacitor",
            cache,
            kind = error.kind().as_str(),
            error = %error,
            "loader failed"
        ),
        crate::LoadEvent::TimedOut { hard, .. } => {
            tracing::info!(target: "capacitor", cache, hard, "load timed out for a caller")
        }
        _ => {}
    }
}

/// A write-back batch failed and will be retried.
#[allow(unused_variables)]
pub(crate) fn drain_retry(cache: &str, err: &crate::Error) {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        target: "capacitor",
        cache,
        layer = err.layer().unwrap_or_default(),
        kind = err.kind().as_str(),
        "write-back batch failed; retrying"
    );
}

/// A drained write the store refused, set aside (see `MultiLayer::refused_writes`).
#[allow(unused_variables)]
pub(crate) fn write_refused(cache: &str, err: &crate::Error) {
    #[cfg(feature = "tracing")]
    tracing::error!(
        target: "capacitor",
        cache,
        layer = err.layer().unwrap_or_default(),
        kind = err.kind().as_str(),
        error = %err,
        "write-back write refused by the store; set aside"
    );
}

/// Latency of one awaited layer operation, by outcome.
#[cfg(feature = "metrics")]
pub(crate) fn record_latency<T>(
    cache: &str,
    layer: &str,
    op: crate::Operation,
    result: &crate::Result<T>,
    elapsed: std::time::Duration,
) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(e) => e.kind().as_str(),
    };
    metrics::histogram!(
        "capacitor_layer_operation_duration_seconds",
        "cache" => cache.to_owned(),
        "layer" => layer.to_owned(),
        "op" => op.as_str(),
        "outcome" => outcome
    )
    .record(elapsed.as_secs_f64());
}

/// The span of one composer operation (`capacitor.get`, `capacitor.set`, ...), at DEBUG
/// level, with `layer` (the layer that answered a read), `promoted` and `outcome` filled
/// in as the operation learns them.
#[cfg(feature = "tracing")]
macro_rules! op_span {
    ($name:literal, $cache:expr) => {
        tracing::debug_span!(
            target: "capacitor",
            $name,
            cache = %$cache,
            layer = tracing::field::Empty,
            promoted = tracing::field::Empty,
            outcome = tracing::field::Empty,
        )
    };
}
#[cfg(feature = "tracing")]
pub(crate) use op_span;

/// Records how a read ended on the current span.
#[inline]
#[allow(unused_variables)]
pub(crate) fn read_outcome(layer: Option<&str>, promoted: bool, outcome: &'static str) {
    #[cfg(feature = "tracing")]
    if tracing::level_enabled!(tracing::Level::DEBUG) {
        // Only then: `Span::current()` asks the subscriber, which costs more than an L1 hit.
        let span = tracing::Span::current();
        if !span.is_disabled() {
            if let Some(layer) = layer {
                span.record("layer", layer);
            }
            span.record("promoted", promoted);
            span.record("outcome", outcome);
        }
    }
}

/// Awaits `$fut` inside the span of operation `$name` (just awaits it without `tracing`).
macro_rules! traced {
    ($name:literal, $cache:expr, $fut:expr) => {{
        #[cfg(feature = "tracing")]
        {
            tracing::Instrument::instrument($fut, $crate::observe::op_span!($name, $cache)).await
        }
        #[cfg(not(feature = "tracing"))]
        {
            $fut.await
        }
    }};
}
pub(crate) use traced;
