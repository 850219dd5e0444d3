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

use capacitor_core::testkit::{Around, GateOp, Wrapped};
use capacitor_core::Result;
use capacitor_postgres::deadpool_postgres::Pool;
use capacitor_postgres::PostgresLayer;
use futures::future::BoxFuture;

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

/// Drops a layer's table (through the layer's own pool) before the layer closes, so that
/// the conformance suite, which closes every layer it made, leaves no tables behind.
#[derive(Debug)]
pub struct DropTable {
    pool: Pool,
    table: String,
    /// The tag table, dropped first (its foreign key references the table).
    tags: Option<String>,
}

impl Around for DropTable {
    fn around<'a, T: Send + 'a>(
        &'a self,
        _: GateOp,
        call: BoxFuture<'a, Result<T>>,
    ) -> BoxFuture<'a, Result<T>> {
        call
    }

    fn before_close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.pool.is_closed() {
                return;
            }
            if let Ok(client) = self.pool.get().await {
                if let Some(tags) = &self.tags {
                    let _ = client
                        .batch_execute(&format!("DROP TABLE IF EXISTS {tags}"))
                        .await;
                }
                let _ = client
                    .batch_execute(&format!("DROP TABLE IF EXISTS {}", self.table))
                    .await;
            }
        })
    }
}

/// `layer`, dropping its table when closed.
pub fn drop_on_close<V>(layer: PostgresLayer<String, V>) -> Wrapped<String, V, DropTable>
where
    V: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    let around = DropTable {
        pool: layer.pool().clone(),
        table: layer.table().to_owned(),
        tags: layer.tags_table(),
    };
    Wrapped::with(layer, around)
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

/// Drops the table named `.0` (in `public`), and its tag table `.0_tags`, when dropped,
/// also when the test panics: on a thread of its own, since `Drop` cannot await.
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
                        client.batch_execute(&format!(
                            "DROP TABLE IF EXISTS \"public\".\"{table}_tags\"; \
                             DROP TABLE IF EXISTS \"public\".\"{table}\" CASCADE"
                        )),
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
