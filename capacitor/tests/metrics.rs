//! The `metrics` feature: a Prometheus exporter on a loopback port, scraped over HTTP.
#![cfg(all(feature = "metrics", feature = "memory"))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use capacitor::memory::{DashMapLayer, MokaLayer};
use capacitor::{LayerConfig, MultiLayer};
use capacitor_core::testkit::{FaultyLayer, MapLayer};
use metrics_exporter_prometheus::PrometheusBuilder;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(addr: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(body) if body.starts_with("HTTP/1.1 200") => return body,
            other if Instant::now() > deadline => panic!("no scrape from {addr}: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The value of the sample `name{labels…}` whose label set contains every `label`.
fn sample(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_gauges_and_latencies_are_scraped_with_layer_labels() {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .unwrap();

    let remote = FaultyLayer::new(MapLayer::<String, String>::new());
    let faults = remote.faults();
    let cache = MultiLayer::<String, String>::builder()
        .name("scraped")
        .layer(LayerConfig::new(
            "l1",
            MokaLayer::builder().max_capacity(100).build().unwrap(),
        ))
        .layer(LayerConfig::new("remote", remote))
        .layer(LayerConfig::new("store", DashMapLayer::new()))
        .build()
        .unwrap();
    cache.set("a".into(), "1".into()).await.unwrap();
    cache.get(&"a".into()).await.unwrap(); // l1 hit
    cache.get(&"b".into()).await.unwrap(); // miss everywhere
    faults.fail_reads(true);
    for _ in 0..5 {
        // remote fails 5 times: its default breaker opens
        cache.get(&"c".into()).await.unwrap();
    }
    cache.get(&"c".into()).await.unwrap(); // skipped
    let _reporter = cache.spawn_metrics_reporter(Duration::from_millis(50)).unwrap();
    let l1 = ["cache=\"scraped\"", "layer=\"l1\""];
    let remote = ["cache=\"scraped\"", "layer=\"remote\""];
    let store = ["cache=\"scraped\"", "layer=\"store\""];
    // Scraped until the reporter's first pass is complete: a scrape may land while the pass
    // is still recording, and a loaded machine may delay it.
    let complete = |body: &str| {
        [&l1, &remote, &store].iter().all(|labels| {
            [
                "capacitor_layer_hits_total",
                "capacitor_layer_errors_total",
                "capacitor_layer_breaker_opens_total",
                "capacitor_layer_decode_errors_total",
                "capacitor_layer_breaker_state",
            ]
            .iter()
            .all(|name| sample(body, name, &labels[..]).is_some())
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = tokio::task::spawn_blocking(move || scrape(addr)).await.unwrap();
        if complete(&body) {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no report within 10 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        sample(&body, "capacitor_layer_hits_total", &l1),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "capacitor_layer_misses_total", &l1),
        Some(7.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "capacitor_layer_errors_total", &remote),
        Some(5.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "capacitor_layer_skipped_total", &remote),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "capacitor_layer_breaker_state", &remote),
        Some(2.0),
        "open: {body}"
    );
    assert_eq!(
        sample(&body, "capacitor_layer_breaker_opens_total", &remote),
        Some(1.0),
        "{body}"
    );
    // Latencies of the awaited layer's operations, by outcome (a summary by default).
    let unavailable = [remote[1], "op=\"get\"", "outcome=\"unavailable\""];
    assert_eq!(
        sample(
            &body,
            "capacitor_layer_operation_duration_seconds_count",
            &unavailable
        ),
        Some(5.0),
        "{body}"
    );
    assert!(
        !body.contains("layer=\"l1\",op="),
        "in-process hits are not timed: {body}"
    );
}
