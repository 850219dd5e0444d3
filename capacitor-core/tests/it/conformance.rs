//! The conformance suite against the test kit's own map layer and against a composer of
//! two map layers (a `MultiLayer` is a `Layer` too).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

mod map_layer {
    capacitor_core::conformance_tests!(|_ctx| async { capacitor_core::testkit::MapLayer::new() });
}

mod multi_layer {
    use capacitor_core::testkit::MapLayer;
    use capacitor_core::{LayerConfig, MultiLayer};

    // No TTL on L1: with one, the composer reports the expiry of the L1 copy that
    // answered (documented on `MultiLayer::get_entry`), which the suite would flag.
    capacitor_core::conformance_tests!(|_ctx| async {
        MultiLayer::builder()
            .layer(LayerConfig::new("l1", MapLayer::new()))
            .layer(LayerConfig::new("l2", MapLayer::new()))
            .build()
            .expect("valid config")
    });
}

/// The composer suite itself, over the test kit's scannable map.
mod composer_over_map {
    capacitor_core::composer_tests!(|_ctx| async {
        capacitor_core::testkit::MapLayer::scannable(capacitor_core::SystemClock)
    });
}
