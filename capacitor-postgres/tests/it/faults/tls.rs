//! TLS through native-tls.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_through_native_tls() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("tls");
        let _guard = TableGuard(table.clone());
        // The local server's certificate is self-signed (Debian's snakeoil): accept it here.
        let connector = capacitor_postgres::native_tls::TlsConnector::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .expect("connector");
        let layer = PostgresLayer::builder()
            .url(crate::common::url_with("sslmode=require"))
            .table(&table)
            .native_tls(connector)
            .build::<String, String>()
            .await
            .expect("build over TLS (the server needs ssl = on)");
        layer.set(&s("k"), &s("v"), None).await.expect("set");
        let client = layer.pool().get().await.expect("connection");
        let ssl: bool = client
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .expect("pg_stat_ssl")
            .get(0);
        assert!(ssl, "the connection is encrypted");
        drop(client);
        layer.close().await.expect("close");

        // Without a connector, sslmode=require cannot be met.
        let err = PostgresLayer::builder()
            .url(crate::common::url_with("sslmode=require"))
            .table(&table)
            .build::<String, String>()
            .await
            .expect_err("no TLS connector");
        assert_ne!(err.kind(), ErrorKind::Closed, "{err}");
    })
    .await;
}
