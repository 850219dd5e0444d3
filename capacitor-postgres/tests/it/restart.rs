//! The layer across a PostgreSQL restart: a private cluster (initdb into a temporary
//! directory, a free loopback port) is stopped under the layer, operations fail fast with
//! typed errors while it is down, and after it starts again the same layer (no rebuild)
//! serves every acknowledged write.
//!
//! Needs PostgreSQL's server binaries (`pg_config --bindir`, or
//! `/usr/lib/postgresql/*/bin`). As root, the cluster runs as the `postgres` user through
//! `runuser` (initdb refuses root). The cluster is stopped by a guard, also when the test
//! fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use capacitor_core::{ErrorKind, Layer, WriteOp};
use capacitor_postgres::PostgresLayer;

const TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// A PostgreSQL cluster of this test's own.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

fn bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("pg_ctl").is_file() {
            return dir;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("pg_ctl").is_file())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("PostgreSQL's server binaries (initdb, pg_ctl) are needed: install postgresql")
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs a server binary (as `postgres` when we are root), bounded by `timeout` seconds
    /// of `timeout(1)`.
    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args).current_dir(self.dir.path());
        cmd.output().unwrap_or_else(|e| panic!("cannot run {tool}: {e}"))
    }

    fn init() -> Cluster {
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("capacitor-pg-restart-")
            .tempdir()
            .expect("tempdir");
        if as_postgres {
            let status = Command::new("chown")
                .args(["postgres:", &dir.path().display().to_string()])
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster directory to postgres");
        }
        let cluster = Cluster {
            dir,
            bin: bindir(),
            port: free_port(),
            as_postgres,
        };
        let data = cluster.data().display().to_string();
        let out = cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.start();
        cluster
    }

    fn start(&self) {
        let data = self.data().display().to_string();
        let log = self.dir.path().join("server.log").display().to_string();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let out = self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-o", &options, "-w", "-t", "30", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// `mode`: `fast` (a clean shutdown) or `immediate` (like a crash: no checkpoint,
    /// WAL replay on the next start).
    fn stop(&self, mode: &str) {
        let data = self.data().display().to_string();
        let out = self.run("pg_ctl", &["-D", &data, "-m", mode, "-w", "-t", "30", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let pid_file = data.join("postmaster.pid");
        if !pid_file.exists() {
            return;
        }
        let d = data.display().to_string();
        let stopped = self
            .run("pg_ctl", &["-D", &d, "-m", "immediate", "-w", "-t", "10", "stop"])
            .status
            .success();
        if !stopped {
            kill_postmaster(&pid_file);
        }
    }
}

/// The fallback when pg_ctl cannot stop the server: SIGKILL the postmaster by its PID.
fn kill_postmaster(pid_file: &Path) {
    if let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
    {
        let _ = Command::new("kill").args(["-9", pid.trim()]).status();
    }
}

fn key(i: usize) -> String {
    format!("user:{i:04}")
}

/// Every acknowledged key is there with its value.
async fn assert_all_present(layer: &PostgresLayer<String, String>, acknowledged: &[(String, String)]) {
    for chunk in acknowledged.chunks(100) {
        let keys: Vec<String> = chunk.iter().map(|(k, _)| k.clone()).collect();
        let got = layer.get_many(&keys).await.expect("get_many after restart");
        for ((k, v), entry) in chunk.iter().zip(got) {
            assert_eq!(
                entry.map(|e| e.value).as_ref(),
                Some(v),
                "acknowledged write {k} lost"
            );
        }
    }
}

/// Retries `get` until the server answers again (bounded).
async fn wait_until_served(layer: &PostgresLayer<String, String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match layer.get(&key(0)).await {
            Ok(_) => return,
            Err(e) => {
                assert!(e.is_temporary(), "a non-temporary error while reconnecting: {e}");
                assert!(Instant::now() < deadline, "the layer did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_survives_server_restarts_without_a_rebuild() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let cluster = tokio::task::spawn_blocking(Cluster::init).await.expect("init");
        let layer = PostgresLayer::builder()
            .url(cluster.url())
            .table("kv")
            .pool_size(4)
            .create_timeout(Duration::from_secs(2))
            .wait_timeout(Duration::from_secs(2))
            .statement_timeout(Duration::from_secs(5))
            .build::<String, String>()
            .await
            .expect("build against the private cluster");
        let unlogged = PostgresLayer::builder()
            .url(cluster.url())
            .table("kv_unlogged")
            .unlogged(true)
            .pool_size(1)
            .build::<String, String>()
            .await
            .expect("build unlogged");

        // Acknowledged writes through every write path.
        let mut acknowledged = Vec::new();
        for i in 0..100 {
            layer.set(&key(i), &format!("v{i}"), None).await.expect("set");
            acknowledged.push((key(i), format!("v{i}")));
        }
        let batch: Vec<(String, String)> = (100..200).map(|i| (key(i), format!("v{i}"))).collect();
        layer
            .set_many(&batch, Some(Duration::from_secs(3600)))
            .await
            .expect("set_many");
        acknowledged.extend(batch);
        let ops: Vec<WriteOp<String, String>> = (200..220)
            .map(|i| WriteOp::Set {
                key: key(i),
                value: format!("v{i}"),
                ttl: None,
            })
            .collect();
        layer.apply_atomic(&ops).await.expect("apply_atomic");
        acknowledged.extend((200..220).map(|i| (key(i), format!("v{i}"))));
        unlogged
            .set(&key(0), &"gone after a crash".to_owned(), None)
            .await
            .expect("set unlogged");

        for (round, mode) in ["immediate", "fast"].into_iter().enumerate() {
            let c = &cluster;
            tokio::task::block_in_place(|| c.stop(mode));

            // Down: every operation fails at once with a typed, temporary error.
            for attempt in 0..3 {
                let started = Instant::now();
                let results = [
                    layer.get(&key(1)).await.map(drop),
                    layer.set(&key(9_000 + attempt), &"x".to_owned(), None).await,
                    layer.get_many(&[key(1), key(2)]).await.map(drop),
                    layer.delete(&key(9_999)).await.map(drop),
                ];
                for result in results {
                    let err = result.expect_err("the server is down");
                    assert_eq!(
                        err.kind(),
                        ErrorKind::Unavailable,
                        "round {round} ({mode}): {err}"
                    );
                    assert!(err.is_temporary());
                }
                assert!(
                    started.elapsed() < Duration::from_secs(3),
                    "failing took {:?}",
                    started.elapsed()
                );
            }
            let mut stream = layer.scan(b"user:").expect("a scan starts");
            let first = futures::StreamExt::next(&mut stream).await.expect("an item");
            assert_eq!(first.map(drop).map_err(|e| e.kind()), Err(ErrorKind::Unavailable));

            // Up again: the same layer serves, with every acknowledged write.
            tokio::task::block_in_place(|| c.start());
            wait_until_served(&layer).await;
            assert_all_present(&layer, &acknowledged).await;
            let extra = format!("after-restart-{round}");
            layer
                .set(&extra, &"ok".to_owned(), None)
                .await
                .expect("write after restart");
            acknowledged.push((extra, "ok".to_owned()));
            let mut stream = layer.scan(b"user:").expect("scan");
            let mut n = 0;
            while let Some(item) = futures::StreamExt::next(&mut stream).await {
                item.expect("scan item");
                n += 1;
            }
            assert_eq!(n, 220, "a scan after the restart sees every key");

            if mode == "immediate" {
                // An unlogged table is emptied by crash recovery: what `unlogged` documents.
                wait_until_served(&layer).await;
                let deadline = Instant::now() + Duration::from_secs(30);
                let after = loop {
                    match unlogged.get(&key(0)).await {
                        Ok(v) => break v,
                        Err(e) => {
                            assert!(Instant::now() < deadline, "unlogged layer did not recover: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                };
                assert_eq!(after, None, "an unlogged table does not survive a crash");
            }
        }
        layer.close().await.expect("close");
        unlogged.close().await.expect("close");
        tokio::task::block_in_place(|| cluster.stop("fast"));
    })
    .await
    .expect("test timed out");
}
