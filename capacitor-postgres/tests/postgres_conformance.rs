//! PostgresLayer passes the core conformance suite against a real server
//! (`CAPACITOR_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`): with the
//! defaults, and on an unlogged table with small scan pages (so that scans cross page
//! boundaries) and a fast sweeper. Each test uses its own table, dropped at the end.

mod common;

mod logged {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        let layer = capacitor_postgres::PostgresLayer::builder()
            .url(super::common::url())
            .table(&ctx.id)
            .build()
            .await
            .unwrap_or_else(|e| panic!("build PostgresLayer (is PostgreSQL running?): {e}"));
        super::common::DropOnClose { inner: layer }
    });
}

mod unlogged_small_pages_fast_sweeper {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        let layer = capacitor_postgres::PostgresLayer::builder()
            .url(super::common::url())
            .table(&ctx.id)
            .unlogged(true)
            .scan_page_size(4)
            .sweep_interval(std::time::Duration::from_millis(100))
            .sweep_batch(3)
            .pool_size(4)
            .build()
            .await
            .unwrap_or_else(|e| panic!("build PostgresLayer (is PostgreSQL running?): {e}"));
        super::common::DropOnClose { inner: layer }
    });
}

/// The composer's behaviours (write-back, transactions, scan, warm-up, loaders) over
/// PostgreSQL.
mod composer {
    capacitor_core::composer_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        let layer = capacitor_postgres::PostgresLayer::builder()
            .url(super::common::url())
            .table(&ctx.id)
            .build()
            .await
            .unwrap_or_else(|e| panic!("build PostgresLayer (is PostgreSQL running?): {e}"));
        super::common::DropOnClose { inner: layer }
    });
}
