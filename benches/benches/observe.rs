//! What the `metrics` and `tracing` features cost on an L1 hit (the target: ≤ 10%).
//!
//! Features are chosen at compile time, so `cargo xtask bench` builds this suite twice:
//! without the benches crate's `observe` feature (its measurement is named `raw`) and
//! with it (named `capacitor`: capacitor's `metrics` and `tracing` features on, a
//! Prometheus recorder installed globally with a reporter task exporting every second,
//! and a `tracing` subscriber at INFO, the usual production level, so capacitor's DEBUG
//! spans are created disabled). The report pairs the two runs by group name.
//!
//! The `observe` build also measures, in `observe_debug_spans/…`, an L1 hit with capacitor's
//! DEBUG spans enabled (`capacitor`) beside the INFO subscriber (`raw`): the price of
//! turning span collection on.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
#[cfg(feature = "observe")]
use std::time::Duration;

use capacitor::memory::{DashMapLayer, MokaLayer};
use capacitor::{LayerConfig, MultiLayer};
use criterion::{criterion_group, criterion_main, Criterion};

const NAME: &str = if cfg!(feature = "observe") {
    "capacitor"
} else {
    "raw"
};

fn stack(l1: LayerConfig<u64, u64>) -> MultiLayer<u64, u64> {
    MultiLayer::builder()
        .layer(l1)
        .layer(LayerConfig::new("l2", DashMapLayer::new()))
        .build()
        .unwrap()
}

fn l1_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    #[cfg(feature = "observe")]
    rt.block_on(async { install() });
    let dash = stack(LayerConfig::new("l1", DashMapLayer::new()));
    let moka = stack(LayerConfig::new(
        "l1",
        MokaLayer::builder().max_capacity(10_000).build().unwrap(),
    ));
    #[cfg(feature = "observe")]
    let _reporters = rt.block_on(async {
        (
            dash.spawn_metrics_reporter(Duration::from_secs(1)).unwrap(),
            moka.spawn_metrics_reporter(Duration::from_secs(1)).unwrap(),
        )
    });
    for (name, cache) in [("dashmap", &dash), ("moka", &moka)] {
        rt.block_on(cache.set(42, 42)).unwrap();
        let mut g = c.benchmark_group(format!("observe_l1_hit/{name}"));
        g.bench_function(NAME, |b| b.iter(|| poll(cache.get(black_box(&42)))));
        g.finish();
    }
    #[cfg(feature = "observe")]
    {
        use tracing_subscriber::layer::SubscriberExt;
        let debug = tracing_subscriber::registry().with(tracing_subscriber::filter::LevelFilter::DEBUG);
        let info = tracing_subscriber::registry().with(tracing_subscriber::filter::LevelFilter::INFO);
        let mut g = c.benchmark_group("observe_debug_spans/dashmap");
        tracing::subscriber::with_default(debug, || {
            g.bench_function("capacitor", |b| b.iter(|| poll(dash.get(black_box(&42)))));
        });
        tracing::subscriber::with_default(info, || {
            g.bench_function("raw", |b| b.iter(|| poll(dash.get(black_box(&42)))));
        });
        g.finish();
    }
}

/// Polls a future that an L1 hit answers on its first poll.
fn poll<F: std::future::Future>(f: F) -> F::Output {
    capacitor_core::testkit::poll_once(f)
}

/// A global Prometheus recorder (no listener: rendering is the scraper's cost, not the
/// hit's) and a global INFO subscriber writing to nowhere.
#[cfg(feature = "observe")]
fn install() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    metrics::set_global_recorder(recorder).unwrap();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();
}

criterion_group!(benches, l1_hit);
criterion_main!(benches);
