//! RedisLayer through Redis Sentinel: a private master and a private sentinel process
//! (`redis-server <conf> --sentinel`, free loopback ports, killed by PID when the test
//! ends), reached with a `redis-sentinel://…?sentinelServiceName=…` URL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::RedisServer;
use capacitor_core::{Layer, WriteOp};
use capacitor_redis::RedisLayer;

/// A sentinel process, killed by PID when dropped.
struct Sentinel(std::process::Child);

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_layer_works_through_sentinel() {
    let master = RedisServer::start();
    let port = common::free_port();
    let conf = master.dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor capacitor 127.0.0.1 {} 1\n",
            master.dir.path().display(),
            master.port
        ),
    )
    .unwrap();
    let sentinel = Sentinel(
        Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel"),
    );
    common::wait_for_port(port, Duration::from_secs(10));

    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(60), async {
                let url = format!("redis-sentinel://127.0.0.1:{port}/0?sentinelServiceName=capacitor");
                let layer = RedisLayer::builder()
                    .url(&url)
                    .prefix("sentinel:")
                    .build::<String, String>()
                    .unwrap();
                let deadline = Instant::now() + Duration::from_secs(20);
                while let Err(e) = layer.connect().await {
                    assert!(Instant::now() < deadline, "no connection through sentinel: {e}");
                }
                layer
                    .set(&"k".to_string(), &"v".to_string(), Some(Duration::from_secs(30)))
                    .await
                    .unwrap();
                assert_eq!(
                    layer.get(&"k".to_string()).await.unwrap().map(|e| e.value),
                    Some("v".to_string())
                );
                layer
                    .apply_atomic(&[
                        WriteOp::Set {
                            key: "a".to_string(),
                            value: "1".to_string(),
                            ttl: None,
                        },
                        WriteOp::Delete { key: "k".to_string() },
                    ])
                    .await
                    .unwrap();
                assert!(!layer.exists(&"k".to_string()).await.unwrap());
                // The write reached the master the sentinel monitors.
                let raw = common::raw_at(&master.url()).await;
                let keys = common::keys_under(&raw, "sentinel:").await;
                assert_eq!(keys, vec!["sentinel:a".to_string()]);
                layer.close().await.unwrap();
            })
            .await
            .expect("the sentinel test timed out");
        });
    drop(sentinel);
}
