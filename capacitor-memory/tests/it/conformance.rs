//! Every memory layer passes the core conformance suite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

mod moka {
    capacitor_core::conformance_tests!(|_ctx| async {
        capacitor_memory::MokaLayer::builder()
            .max_capacity(100_000)
            .build()
            .expect("valid config")
    });
}

mod moka_by_bytes {
    capacitor_core::conformance_tests!(|_ctx| async {
        capacitor_memory::MokaLayer::builder()
            .max_bytes(64 * 1024 * 1024, |k: &String, v: &Vec<u8>| {
                u32::try_from(k.len() + v.len()).unwrap_or(u32::MAX)
            })
            .build()
            .expect("valid config")
    });
}

mod dashmap {
    capacitor_core::conformance_tests!(|_ctx| async { capacitor_memory::DashMapLayer::new() });
}

mod dashmap_with_tags {
    capacitor_core::conformance_tests!(|_ctx| async {
        capacitor_memory::DashMapLayer::builder()
            .sweeper(false)
            .tags(true)
            .build()
            .expect("config")
    });
}

mod dashmap_with_sweeper {
    capacitor_core::conformance_tests!(|_ctx| async {
        capacitor_memory::DashMapLayer::builder()
            .sweep_interval(std::time::Duration::from_millis(100))
            .build()
            .expect("valid config")
    });
}

mod quick_cache {
    capacitor_core::conformance_tests!(|_ctx| async {
        capacitor_memory::QuickCacheLayer::builder()
            .max_capacity(100_000)
            .build()
            .expect("valid config")
    });
}

mod quick_cache_by_bytes {
    capacitor_core::conformance_tests!(|_ctx| async {
        capacitor_memory::QuickCacheLayer::builder()
            .max_bytes(64 * 1024 * 1024, |k: &String, v: &Vec<u8>| {
                u32::try_from(k.len() + v.len()).unwrap_or(u32::MAX)
            })
            .shards(8) // 8 MiB each: the suite's 2 MiB value fits on any machine
            .build()
            .expect("valid config")
    });
}

mod quick_cache_with_sweeper {
    capacitor_core::conformance_tests!(|_ctx| async {
        capacitor_memory::QuickCacheLayer::builder()
            .sweep_interval(std::time::Duration::from_millis(100))
            .build()
            .expect("valid config")
    });
}
