//! RedisLayer passes the core conformance suite against a real server
//! (`CAPACITOR_REDIS_URL`, default `redis://127.0.0.1:6379`): with the defaults, and with
//! tiny SCAN pages and a one-connection pool; and the shared composer suite with Redis at
//! the bottom. Each test uses its own key prefix (the test's id), deleted at the end.

use crate::common;

use crate::common::DeleteKeys;
use capacitor_core::testkit::{TestContext, Wrapped};
use capacitor_redis::{RedisLayer, RedisLayerBuilder};

/// A connected layer under the test's own prefix, configured by `tweak`, that deletes its
/// keys when closed.
async fn open(
    ctx: TestContext,
    tweak: fn(RedisLayerBuilder) -> RedisLayerBuilder,
) -> Wrapped<String, Vec<u8>, DeleteKeys> {
    let url = common::url();
    let prefix = format!("{}:", ctx.id);
    let layer = tweak(RedisLayer::builder().url(&url).prefix(&prefix))
        .build()
        .unwrap_or_else(|e| panic!("build RedisLayer: {e}"));
    layer
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to Redis at {url} (is it running?): {e}"));
    Wrapped::with(layer, DeleteKeys { prefix, url })
}

mod defaults {
    capacitor_core::conformance_tests!(|ctx| super::open(ctx, |b| b));
}

mod small_scan_pages_one_connection {
    capacitor_core::conformance_tests!(|ctx| super::open(ctx, |b| b.scan_count(2).pool_size(1)));
}

/// The composer's behaviours (write-back, transactions, scan, warm-up, loaders) over Redis.
mod composer {
    capacitor_core::composer_tests!(|ctx| super::open(ctx, |b| b));
}
