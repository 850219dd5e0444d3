//! RedbLayer passes the core conformance suite: opened by path (the default durability and
//! `Durability::Immediate`), and on a caller's database in a named table with the sweeper
//! running under `Durability::Manual`; all of them without tags (`tag_capability` checks
//! the refusals), and two more with tags on.

mod by_path {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        capacitor_redb::RedbLayer::builder()
            .path(crate::common::scratch_path(&ctx.id))
            .temporary(true)
            .build()
            .expect("open redb")
    });
}

mod immediate {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        capacitor_redb::RedbLayer::builder()
            .path(crate::common::scratch_path(&ctx.id))
            .temporary(true)
            .durability(capacitor_redb::Durability::Immediate)
            .build()
            .expect("open redb")
    });
}

mod db_table_sweeper_manual {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        // A caller's database, its file unlinked at once: the open handle keeps it
        // working, and nothing is left behind.
        let path = crate::common::scratch_path(&ctx.id);
        let db = std::sync::Arc::new(redb::Database::create(&path).expect("create redb"));
        std::fs::remove_file(&path).expect("unlink");
        capacitor_redb::RedbLayer::builder()
            .db(db)
            .table("conformance")
            .durability(capacitor_redb::Durability::Manual)
            .sweep_interval(std::time::Duration::from_millis(100))
            .build()
            .expect("build layer")
    });
}

/// Tags on, by path.
mod tags_by_path {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        capacitor_redb::RedbLayer::builder()
            .path(crate::common::scratch_path(&ctx.id))
            .temporary(true)
            .tags(true)
            .build()
            .expect("open redb")
    });
}

/// Tags on, in a named table, committing every write durably, with the sweeper running.
mod tags_table_immediate {
    capacitor_core::conformance_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        capacitor_redb::RedbLayer::builder()
            .path(crate::common::scratch_path(&ctx.id))
            .temporary(true)
            .table("conformance")
            .durability(capacitor_redb::Durability::Immediate)
            .sweep_interval(std::time::Duration::from_millis(100))
            .tags(true)
            .build()
            .expect("open redb")
    });
}

/// The composer's behaviours (write-back, transactions, scan, warm-up, loaders) over redb.
mod composer {
    capacitor_core::composer_tests!(|ctx: capacitor_core::testkit::TestContext| async move {
        capacitor_redb::RedbLayer::builder()
            .path(crate::common::scratch_path(&ctx.id))
            .temporary(true)
            .build()
            .expect("open redb")
    });
}
