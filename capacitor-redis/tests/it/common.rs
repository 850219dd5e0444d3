//! Shared by the Redis tests: the server's URL, a raw fred client for arranging keys
//! behind the layer's back, a wrapper that deletes a test's keys when its layer is closed,
//! and private `redis-server` processes (stopped by PID when dropped).
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capacitor_core::testkit::{Around, GateOp};
use capacitor_core::Result;
use capacitor_redis::fred::prelude::{Client, ClientLike, Config, KeysInterface, Value};
use futures::future::BoxFuture;

/// Runs a test body on a fresh two-worker runtime, failing it if it takes longer than
/// `limit`.
pub fn run<F: std::future::Future<Output = ()>>(limit: Duration, f: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(capacitor_core::testkit::within(limit, f));
}

pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// The server every test uses: `CAPACITOR_REDIS_URL`, else the local default.
pub fn url() -> String {
    std::env::var("CAPACITOR_REDIS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A raw fred client on `url`, connected. Fails the test (never skips) when the server
/// does not answer.
pub async fn raw_at(url: &str) -> Client {
    let client = Client::new(Config::from_url(url).expect("redis url"), None, None, None);
    drop(client.connect());
    match tokio::time::timeout(Duration::from_secs(10), client.wait_for_connect()).await {
        Ok(Ok(())) => client,
        Ok(Err(e)) => panic!(
            "Redis is not reachable at {url} ({e}). These tests need a server: set \
             CAPACITOR_REDIS_URL (default {DEFAULT_URL}) or start `redis-server`"
        ),
        Err(_) => panic!(
            "Redis did not answer within 10 s at {url}. These tests need a server: set \
             CAPACITOR_REDIS_URL (default {DEFAULT_URL}) or start `redis-server`"
        ),
    }
}

/// A raw client on the shared test server.
pub async fn raw() -> Client {
    raw_at(&url()).await
}

/// Deletes every key under `prefix` (SCAN + DEL).
pub async fn delete_prefix(client: &Client, prefix: &str) {
    let mut cursor = "0".to_owned();
    let pattern = format!("{}*", escape(prefix));
    loop {
        let (next, keys): (String, Vec<Value>) = client
            .scan_page(cursor.as_str(), pattern.as_str(), Some(500), None)
            .await
            .expect("scan");
        for k in keys {
            if let Some(b) = k.as_bytes() {
                let _: i64 = client.del(b).await.expect("del");
            }
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
}

fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Every key under `prefix` (for checks).
pub async fn keys_under(client: &Client, prefix: &str) -> Vec<String> {
    let mut cursor = "0".to_owned();
    let pattern = format!("{}*", escape(prefix));
    let mut out = Vec::new();
    loop {
        let (next, keys): (String, Vec<String>) = client
            .scan_page(cursor.as_str(), pattern.as_str(), Some(500), None)
            .await
            .expect("scan");
        out.extend(keys);
        if next == "0" {
            break;
        }
        cursor = next;
    }
    out
}

/// Deletes a layer's keys (by prefix, through a raw client) before the layer closes, so
/// that the conformance suite, which closes every layer it made, leaves nothing behind.
#[derive(Debug)]
pub struct DeleteKeys {
    pub prefix: String,
    pub url: String,
}

impl Around for DeleteKeys {
    fn around<'a, T: Send + 'a>(
        &'a self,
        _: GateOp,
        call: BoxFuture<'a, Result<T>>,
    ) -> BoxFuture<'a, Result<T>> {
        call
    }

    fn before_close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let client = raw_at(&self.url).await;
            delete_prefix(&client, &self.prefix).await;
            let _ = client.quit().await;
        })
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A `redis-server` process of this test's own, killed by PID when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port and waits (at most 10 s) until it answers.
    pub fn start() -> Self {
        Self::start_on(free_port(), &[])
    }

    /// Starts a server on `port` with `extra` arguments.
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = RedisServer {
            port,
            child: None,
            dir,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = spawn_redis(self.port, self.dir.path(), &self.extra);
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn spawn_redis(port: u16, dir: &Path, extra: &[String]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"))
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < timeout,
            "redis-server on port {port} did not start within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A prefix unique to this process and call: `rt_<what>_<pid>_<n>:`.
pub fn unique_prefix(what: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "rt_{what}_{}_{nanos}_{}:",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// `RPUSH key x`: a key of another type than string.
pub async fn make_list(client: &Client, key: &str) {
    use capacitor_redis::fred::types::{ClusterHash, CustomCommand};
    let cmd = CustomCommand::new_static("RPUSH", ClusterHash::FirstKey, false);
    let _: i64 = client.custom(cmd, vec![key, "x"]).await.expect("rpush");
}
