//! Serves a composer's metrics in the Prometheus text format on a loopback port.
//!
//! ```text
//! cargo run -p capacitor --example prometheus --features metrics -- [SECONDS]
//! curl -s http://127.0.0.1:9184/metrics | grep capacitor_
//! ```
//!
//! Runs a small read/write workload over moka + dashmap for SECONDS (default 30),
//! exporting every second.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use capacitor::memory::{DashMapLayer, MokaLayer};
use capacitor::{LayerConfig, MultiLayer};
use metrics_exporter_prometheus::PrometheusBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(30);
    let addr: SocketAddr = ([127, 0, 0, 1], 9184).into();
    PrometheusBuilder::new().with_http_listener(addr).install()?;

    let cache = MultiLayer::<u64, String>::builder()
        .name("example")
        .layer(
            LayerConfig::new("l1", MokaLayer::builder().max_capacity(1_000).build()?)
                .ttl(Duration::from_secs(5)),
        )
        .layer(LayerConfig::new("store", DashMapLayer::new()))
        .build()?;
    let _reporter = cache.spawn_metrics_reporter(Duration::from_secs(1))?;
    println!("metrics on http://{addr}/metrics for {seconds} s");

    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let key = i % 5_000;
        if cache.get(&key).await?.is_none() {
            cache.set(key, format!("value {key}")).await?;
        }
        i += 1;
        if i.is_multiple_of(10_000) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    cache.report_metrics();
    println!("{}", cache.stats());
    Ok(())
}
