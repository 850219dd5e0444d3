//! RedisLayer passes the core conformance suite against a real server
//! (`CAPACITOR_REDIS_URL`, default `redis://127.0.0.1:6379`): with the defaults, and with
//! tiny SCAN pages and a one-connection pool. Each test uses its own key prefix (the
//! test's id), deleted at the end.

mod common;

mod defaults {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        let url = super::common::url();
        let prefix = format!("{}:", ctx.id);
        let layer = capacitor_redis::RedisLayer::builder()
            .url(&url)
            .prefix(&prefix)
            .build()
            .unwrap_or_else(|e| panic!("build RedisLayer: {e}"));
        layer
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to Redis at {url} (is it running?): {e}"));
        super::common::DeleteOnClose {
            inner: layer,
            prefix,
            url,
        }
    });
}

mod small_scan_pages_one_connection {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        let url = super::common::url();
        let prefix = format!("{}:", ctx.id);
        let layer = capacitor_redis::RedisLayer::builder()
            .url(&url)
            .prefix(&prefix)
            .scan_count(2)
            .pool_size(1)
            .build()
            .unwrap_or_else(|e| panic!("build RedisLayer: {e}"));
        layer
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to Redis at {url} (is it running?): {e}"));
        super::common::DeleteOnClose {
            inner: layer,
            prefix,
            url,
        }
    });
}

/// The composer's behaviours (write-back, transactions, scan, warm-up, loaders) over Redis.
mod composer {
    capacitor_core::composer_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        let url = super::common::url();
        let prefix = format!("{}:", ctx.id);
        let layer = capacitor_redis::RedisLayer::builder()
            .url(&url)
            .prefix(&prefix)
            .build()
            .unwrap_or_else(|e| panic!("build RedisLayer: {e}"));
        layer
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to Redis at {url} (is it running?): {e}"));
        super::common::DeleteOnClose {
            inner: layer,
            prefix,
            url,
        }
    });
}
