//! SledLayer passes the core conformance suite: opened by path (default flush policy and
//! `FlushPolicy::EveryWrite`), and on a caller's database in a named tree with the
//! sweeper and the layer's own periodic flusher running; all of them without tags
//! (`tag_capability` checks the refusals), and two more with tags on.

mod by_path {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        capacitor_sled::SledLayer::builder()
            .path(crate::common::scratch_dir(&ctx.id))
            .temporary(true)
            .build()
            .expect("open sled")
    });
}

mod every_write {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        capacitor_sled::SledLayer::builder()
            .path(crate::common::scratch_dir(&ctx.id))
            .temporary(true)
            .flush_policy(capacitor_sled::FlushPolicy::EveryWrite)
            .build()
            .expect("open sled")
    });
}

mod db_tree_sweeper_flusher {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        let db = sled::Config::new()
            .path(crate::common::scratch_dir(&ctx.id))
            .temporary(true)
            .open()
            .expect("open sled");
        capacitor_sled::SledLayer::builder()
            .db(db)
            .tree("conformance")
            .flush_policy(capacitor_sled::FlushPolicy::EveryMillis(50))
            .sweep_interval(std::time::Duration::from_millis(100))
            .build()
            .expect("build layer")
    });
}

/// Tags on, by path.
mod tags_by_path {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        capacitor_sled::SledLayer::builder()
            .path(crate::common::scratch_dir(&ctx.id))
            .temporary(true)
            .tags(true)
            .build()
            .expect("open sled")
    });
}

/// Tags on, in a named tree of a caller's database, flushing every write, with the
/// sweeper running.
mod tags_db_tree_every_write {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        let db = sled::Config::new()
            .path(crate::common::scratch_dir(&ctx.id))
            .temporary(true)
            .open()
            .expect("open sled");
        capacitor_sled::SledLayer::builder()
            .db(db)
            .tree("conformance")
            .flush_policy(capacitor_sled::FlushPolicy::EveryWrite)
            .sweep_interval(std::time::Duration::from_millis(100))
            .tags(true)
            .build()
            .expect("build layer")
    });
}

/// The composer's behaviours (write-back, transactions, scan, warm-up, loaders) over sled.
mod composer {
    capacitor_core::composer_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        capacitor_sled::SledLayer::builder()
            .path(crate::common::scratch_dir(&ctx.id))
            .temporary(true)
            .build()
            .expect("open sled")
    });
}
