//! PostgresLayer passes the core conformance suite against a real server
//! (`CAPACITOR_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`): with the
//! defaults, and on an unlogged table with small scan pages (so that scans cross page
//! boundaries) and a fast sweeper, each with tags off and on; and the shared composer
//! suite with PostgreSQL at the bottom. Each test uses its own table, dropped at the end.

use std::time::Duration;

use crate::common::{drop_on_close, DropTable};
use capacitor_core::testkit::TestContext;
use capacitor_core::testkit::Wrapped;
use capacitor_postgres::{PostgresLayer, PostgresLayerBuilder};

/// A layer on the test's own table, configured by `tweak`, that drops the table when
/// closed.
async fn open(
    ctx: TestContext,
    tweak: fn(PostgresLayerBuilder) -> PostgresLayerBuilder,
) -> Wrapped<String, Vec<u8>, DropTable> {
    let layer = tweak(PostgresLayer::builder().url(crate::common::url()).table(&ctx.id))
        .build()
        .await
        .unwrap_or_else(|e| panic!("build PostgresLayer (is PostgreSQL running?): {e}"));
    drop_on_close(layer)
}

mod logged {
    capacitor_core::conformance_tests!(|ctx| super::open(ctx, |b| b));
}

mod unlogged_small_pages_fast_sweeper {
    capacitor_core::conformance_tests!(|ctx| super::open(ctx, |b| {
        b.unlogged(true)
            .scan_page_size(4)
            .sweep_interval(super::Duration::from_millis(100))
            .sweep_batch(3)
            .pool_size(4)
    }));
}

/// Tags kept: `tag_capability` checks the contract instead of `Unsupported`, and every
/// other case runs with the untagging writes.
mod tags {
    capacitor_core::conformance_tests!(|ctx| super::open(ctx, |b| b.tags(true)));
}

/// Tags on an unlogged table, with a sweeper that removes expired rows (and, by the
/// foreign key, their tags) while the cases run.
mod tags_unlogged_fast_sweeper {
    capacitor_core::conformance_tests!(|ctx| super::open(ctx, |b| {
        b.tags(true)
            .unlogged(true)
            .scan_page_size(4)
            .sweep_interval(super::Duration::from_millis(100))
            .sweep_batch(3)
            .pool_size(4)
    }));
}

/// The composer's behaviours (write-back, transactions, scan, warm-up, loaders) over
/// PostgreSQL.
mod composer {
    capacitor_core::composer_tests!(|ctx| super::open(ctx, |b| b));
}
