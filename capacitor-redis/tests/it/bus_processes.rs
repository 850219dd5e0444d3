//! The invalidation bus between two processes: the parent writes through its own
//! MultiLayer (moka L1 + Redis), a child process (this test binary run again with
//! `--exact bus_processes::bus_child_reader --ignored`) reads the same key through its own MultiLayer in
//! a loop and prints each new value it serves. Without the bus the child would serve its
//! L1 copy for the L1 TTL (5 minutes); with it, each write reaches it within a bounded,
//! measured delay. The child is killed by PID when the test ends.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use capacitor_core::{LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_redis::{RedisBus, RedisLayer};

const PREFIX_ENV: &str = "CAPACITOR_REDIS_BUS_CHILD_PREFIX";
const SEEN: &str = "capacitor-seen ";
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
const WRITES: usize = 30;

async fn composer(prefix: &str) -> (MultiLayer<String, String>, Arc<RedisBus>) {
    let redis = RedisLayer::builder()
        .url(common::url())
        .prefix(prefix)
        .build()
        .unwrap();
    redis
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to Redis at {} (is it running?): {e}", common::url()));
    let bus = Arc::new(
        RedisBus::builder()
            .url(common::url())
            .channel(format!("{prefix}invalidate"))
            .build()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bus.is_connected() {
        assert!(Instant::now() < deadline, "the bus did not connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cache = MultiLayer::<String, String>::builder()
        .layer(
            LayerConfig::new("l1", MokaLayer::builder().max_capacity(100).build().unwrap())
                .ttl(Duration::from_secs(300)),
        )
        .layer(LayerConfig::new("redis", redis))
        .invalidation_bus(bus.clone())
        .build()
        .unwrap();
    (cache, bus)
}

#[test]
#[ignore = "the reader child of `two_processes_stay_coherent_through_the_bus`; does nothing alone"]
fn bus_child_reader() {
    let Ok(prefix) = std::env::var(PREFIX_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (cache, _bus) = composer(&prefix).await;
        println!("\n{SEEN}ready");
        let key = "shared".to_string();
        let mut last: Option<String> = None;
        let started = Instant::now();
        while started.elapsed() < CHILD_LIFETIME {
            if let Ok(v) = cache.get(&key).await {
                if v != last {
                    if let Some(v) = &v {
                        println!("\n{SEEN}{v}");
                    }
                    last = v;
                }
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    });
}

/// Kills the child by PID when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_processes_stay_coherent_through_the_bus() {
    let prefix = common::unique_prefix("bus2p");
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "bus_processes::bus_child_reader",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(PREFIX_ENV, &prefix)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("re-run the test binary as the child");
    let stdout = child.stdout.take().unwrap();
    let guard = ChildGuard(child);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(at) = line.find(SEEN) {
                if tx.send(line[at + SEEN.len()..].to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    let wait_for = |what: &str, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(seen) if seen == what => return,
                Ok(_) => {}
                Err(_) => panic!("the child never served `{what}` within {timeout:?}"),
            }
        }
    };
    wait_for("ready", Duration::from_secs(30));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (cache, bus) = composer(&prefix).await;
        // Let the child's subscription settle: the first value may come from Redis.
        cache.set("shared".into(), "warm-up".into()).await.unwrap();
        wait_for("warm-up", Duration::from_secs(10));
        let mut delays = Vec::new();
        for i in 0..WRITES {
            let v = format!("v{i}");
            let written = Instant::now();
            cache.set("shared".into(), v.clone()).await.unwrap();
            wait_for(&v, Duration::from_secs(5));
            delays.push(written.elapsed());
        }
        delays.sort();
        println!(
            "two-process invalidation delay over {WRITES} writes (set returned → the other process serves it, incl. its 0.5 ms poll and a pipe): median {:?}, max {:?}",
            delays[WRITES / 2],
            delays[WRITES - 1]
        );
        cache.close().await.unwrap();
        bus.close().await.unwrap();
        drop(guard);
        common::delete_prefix(&common::raw().await, &prefix).await;
    });
}
