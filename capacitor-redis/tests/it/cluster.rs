//! RedisLayer on a real 3-master Redis Cluster of this test's own (three `redis-server`
//! child processes on free loopback ports, joined by `redis-cli --cluster create`,
//! stopped by PID when the test ends): every conformance case through fred's cluster
//! configuration (keys under a hash-tagged prefix, so that transactions are single-slot),
//! then batches, scans and transactions spread over all slots.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use capacitor_core::testkit::{run_case, TestContext, CASES};
use capacitor_core::{ErrorKind, Layer, WriteOp};
use capacitor_redis::RedisLayer;
use futures::StreamExt;

/// Three cluster-enabled servers, killed by PID when dropped.
pub(crate) struct Cluster {
    pub(crate) ports: Vec<u16>,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Cluster {
    pub(crate) fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3).map(|_| common::free_port()).collect();
        let mut cluster = Cluster {
            ports: ports.clone(),
            children: Vec::new(),
            dir,
        };
        for &port in &ports {
            let child = cluster.spawn_node(port);
            cluster.children.push(child);
        }
        for &port in &ports {
            common::wait_for_port(port, Duration::from_secs(10));
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("timeout")
            .arg("60")
            .arg("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .arg("--cluster-yes")
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok(Duration::from_secs(30));
        cluster
    }

    /// A cluster-enabled server on `port`, its node configuration (id, slots, peers)
    /// kept in the cluster's directory so that a restarted node rejoins as itself.
    fn spawn_node(&self, port: u16) -> Child {
        let extra = vec![
            "--cluster-enabled".to_owned(),
            "yes".to_owned(),
            "--cluster-config-file".to_owned(),
            self.dir
                .path()
                .join(format!("nodes-{port}.conf"))
                .display()
                .to_string(),
            "--cluster-node-timeout".to_owned(),
            "5000".to_owned(),
            "--daemonize".to_owned(),
            "no".to_owned(),
        ];
        common::spawn_redis(port, self.dir.path(), &extra)
    }

    /// SIGKILLs node `index` (by PID) and reaps it.
    pub(crate) fn kill_node(&mut self, index: usize) {
        let child = &mut self.children[index];
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts node `index` again on its port, with its node configuration (its data is
    /// lost: the nodes do not persist it), and waits until it accepts connections.
    pub(crate) fn start_node(&mut self, index: usize) {
        let port = self.ports[index];
        self.children[index] = self.spawn_node(port);
        common::wait_for_port(port, Duration::from_secs(10));
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub(crate) fn wait_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for &port in &self.ports {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli cluster info");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster_state never became ok on {port}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `redis-cli -p <port of node index> args…`, its standard output.
    pub(crate) fn cli(&self, index: usize, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .arg("10")
            .arg("redis-cli")
            .args(["-p", &self.ports[index].to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `PUBSUB NUMSUB channel` of every node (each counts its own subscribers only).
    pub(crate) fn numsub(&self, channel: &str) -> Vec<u64> {
        (0..self.ports.len())
            .map(|i| {
                let out = self.cli(i, &["pubsub", "numsub", channel]);
                out.lines()
                    .nth(1)
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// The node whose slots hold `key`, as node `ask` (a live one) sees the slot map.
    pub(crate) fn node_of(&self, ask: usize, key: &str) -> usize {
        let slot: u16 = self
            .cli(ask, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        for line in self.cli(ask, &["cluster", "nodes"]).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(port) = fields
                .get(1)
                .and_then(|a| a.split('@').next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            let owns = fields.iter().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if owns {
                return self.ports.iter().position(|&p| p == port).unwrap();
            }
        }
        panic!("no node owns slot {slot}");
    }

    pub(crate) fn url(&self) -> String {
        let nodes: Vec<String> = self.ports[1..]
            .iter()
            .map(|p| format!("node=127.0.0.1:{p}"))
            .collect();
        format!("redis-cluster://127.0.0.1:{}?{}", self.ports[0], nodes.join("&"))
    }
}

async fn cluster_layer(url: &str, prefix: &str) -> RedisLayer<String, Vec<u8>> {
    let layer = RedisLayer::builder().url(url).prefix(prefix).build().unwrap();
    layer
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to the cluster: {e}"));
    assert!(layer.is_clustered());
    layer
}

#[test]
fn conformance_and_batches_on_a_three_master_cluster() {
    let cluster = Cluster::start();
    let url = cluster.url();

    for case in CASES {
        let url = url.clone();
        run_case(case.name, move |ctx: TestContext| {
            let url = url.clone();
            async move { cluster_layer(&url, &format!("{{{}}}:", ctx.id)).await }
        });
    }

    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(120), async {
                // No hash tag: keys spread over every master.
                let layer = cluster_layer(&url, "spread:").await;
                let entries: Vec<(String, Vec<u8>)> =
                    (0..200).map(|i| (format!("k{i}"), vec![i as u8; 3])).collect();
                layer
                    .set_many(&entries, Some(Duration::from_secs(60)))
                    .await
                    .unwrap();
                let keys: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
                let got = layer.get_many(&keys).await.unwrap();
                for ((_, v), e) in entries.iter().zip(&got) {
                    assert_eq!(e.as_ref().map(|e| &e.value), Some(v));
                }
                let mut scanned: Vec<String> =
                    layer.scan(b"k").unwrap().map(|r| r.unwrap().0).collect().await;
                scanned.sort();
                let mut expected = keys.clone();
                expected.sort();
                assert_eq!(scanned, expected, "SCAN visits every master");
                // A transaction across slots is refused as a whole.
                let ops = vec![
                    WriteOp::Set {
                        key: "tx1".to_string(),
                        value: vec![1],
                        ttl: None,
                    },
                    WriteOp::Set {
                        key: "tx2-other-slot".to_string(),
                        value: vec![2],
                        ttl: None,
                    },
                ];
                let err = layer.apply_atomic(&ops).await.unwrap_err();
                assert_ne!(err.kind(), ErrorKind::Unsupported, "{err}");
                assert!(
                    !layer.exists(&"tx1".to_string()).await.unwrap(),
                    "nothing applied"
                );
                assert_eq!(layer.delete_many(&keys).await.unwrap(), 200);
                assert!(layer.scan(b"").unwrap().next().await.is_none());
                layer.close().await.unwrap();
            })
            .await
            .expect("the cluster batch test timed out");
        });
}
