//! Shared by the PostgreSQL tests: the server's URL, a direct admin connection, and a
//! wrapper that drops a test's table when its layer is closed.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::time::Duration;

use capacitor_core::{async_trait, Capabilities, Entry, EntryStream, Layer, Result, WriteOp};
use capacitor_postgres::PostgresLayer;

/// The server every test uses: `CAPACITOR_POSTGRES_URL`, else the local default.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn url() -> String {
    std::env::var("CAPACITOR_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A plain tokio-postgres connection for arranging and inspecting rows behind the
/// layer's back. Fails the test (never skips) when the server does not answer.
pub async fn admin() -> tokio_postgres::Client {
    let url = url();
    let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
    let (client, connection) = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => panic!(
            "PostgreSQL is not reachable ({e}). These tests need a server: set \
             CAPACITOR_POSTGRES_URL (default {DEFAULT_URL}) or run `cargo xtask test`, which \
             starts the local one"
        ),
        Err(_) => panic!("PostgreSQL did not answer within 10 s (CAPACITOR_POSTGRES_URL)"),
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Drops `table` (in `public`).
pub async fn drop_table(table: &str) {
    admin()
        .await
        .batch_execute(&format!("DROP TABLE IF EXISTS \"public\".\"{table}\""))
        .await
        .expect("drop table");
}

/// A layer that drops its table (through its own pool) when first closed, so that the
/// conformance suite, which closes every layer it made, leaves no tables behind.
pub struct DropOnClose<L> {
    pub inner: L,
}

#[async_trait]
impl<V> Layer<String, V> for DropOnClose<PostgresLayer<String, V>>
where
    V: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn get(&self, key: &String) -> Result<Option<Entry<V>>> {
        self.inner.get(key).await
    }
    async fn set(&self, key: &String, value: &V, ttl: Option<Duration>) -> Result<()> {
        self.inner.set(key, value, ttl).await
    }
    async fn delete(&self, key: &String) -> Result<bool> {
        self.inner.delete(key).await
    }
    async fn exists(&self, key: &String) -> Result<bool> {
        self.inner.exists(key).await
    }
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Entry<V>>>> {
        self.inner.get_many(keys).await
    }
    async fn set_many(&self, entries: &[(String, V)], ttl: Option<Duration>) -> Result<()> {
        self.inner.set_many(entries, ttl).await
    }
    async fn delete_many(&self, keys: &[String]) -> Result<u64> {
        self.inner.delete_many(keys).await
    }
    fn scan(&self, prefix: &[u8]) -> Result<EntryStream<String, V>> {
        self.inner.scan(prefix)
    }
    async fn apply_atomic(&self, ops: &[WriteOp<String, V>]) -> Result<()> {
        self.inner.apply_atomic(ops).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn close(&self) -> Result<()> {
        if !self.inner.pool().is_closed() {
            if let Ok(client) = self.inner.pool().get().await {
                let _ = client
                    .batch_execute(&format!("DROP TABLE IF EXISTS {}", self.inner.table()))
                    .await;
            }
        }
        self.inner.close().await
    }
}

/// A table name unique to this process and call: `pt_<what>_<pid>_<n>`.
pub fn unique_table(what: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "pt_{what}_{}_{nanos}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Drops the table named `.0` (in `public`) when dropped, also when the test panics: on a
/// thread of its own, since `Drop` cannot await.
pub struct TableGuard(pub String);

impl Drop for TableGuard {
    fn drop(&mut self) {
        let table = self.0.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            let url = url();
            rt.block_on(async {
                let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
                if let Ok(Ok((client, connection))) =
                    tokio::time::timeout(Duration::from_secs(10), connect).await
                {
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        client.batch_execute(&format!("DROP TABLE IF EXISTS \"public\".\"{table}\" CASCADE")),
                    )
                    .await;
                }
            });
        })
        .join();
    }
}

/// [`url`] with one more query parameter (`name=value`).
pub fn url_with(param: &str) -> String {
    let url = url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}
