//! Tags in the sled layer, beyond the conformance suite's `tag_capability`: they survive a
//! reopen, every way an entry leaves (the sweeper, a read finding it expired, the plain
//! write forms, `clear`) drops its tags from both index trees, stale index entries are
//! dropped rather than followed, and a layer built without tags creates no index.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::time::{Duration, Instant};

use capacitor_core::testkit::within;
use capacitor_core::{ErrorKind, Layer, ManualClock, WriteOp, MAX_TAGS};
use capacitor_sled::SledLayer;

use crate::common::scratch_db;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const START: u64 = 1_700_000_000_000;
/// The tag trees of the database's default tree.
const TAGS_TREE: &[u8] = b"__sled__default\0tags";
const KEY_TAGS_TREE: &[u8] = b"__sled__default\0key-tags";

fn s(x: &str) -> String {
    x.to_owned()
}

fn tags(t: &[&str]) -> Vec<String> {
    t.iter().map(|t| (*t).to_owned()).collect()
}

fn tagged_layer(db: &sled::Db, clock: &ManualClock) -> SledLayer<String, String> {
    SledLayer::builder()
        .db(db.clone())
        .clock(clock.clone())
        .sweeper(false)
        .tags(true)
        .build()
        .expect("build")
}

/// How many entries the tags tree and the key-tags tree hold.
fn index_sizes(db: &sled::Db) -> (usize, usize) {
    (
        db.open_tree(TAGS_TREE).unwrap().len(),
        db.open_tree(KEY_TAGS_TREE).unwrap().len(),
    )
}

fn sorted(mut keys: Vec<String>) -> Vec<String> {
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_survive_a_reopen() {
    within(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            SledLayer::builder()
                .path(dir.path().join("db"))
                .tags(true)
                .build::<String, String>()
                .unwrap()
        };
        let layer = open();
        layer
            .set_tagged(&s("a"), &s("1"), None, &tags(&["red"]))
            .await
            .unwrap();
        layer
            .set_tagged(
                &s("b"),
                &s("2"),
                Some(Duration::from_secs(3600)),
                &tags(&["red", "big"]),
            )
            .await
            .unwrap();
        layer.set(&s("c"), &s("3"), None).await.unwrap();
        layer.close().await.unwrap();

        let layer = open();
        assert!(layer.capabilities().tags);
        assert_eq!(
            sorted(layer.remove_by_tag("red").await.unwrap()),
            vec![s("a"), s("b")]
        );
        assert_eq!(layer.get(&s("a")).await.unwrap(), None);
        assert_eq!(layer.get(&s("c")).await.unwrap().map(|e| e.value), Some(s("3")));
        assert_eq!(layer.remove_by_tag("big").await.unwrap(), Vec::<String>::new());
        layer.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_untags_expired_keys() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let clock = ManualClock::new(START);
        let layer = SledLayer::builder()
            .db(db.clone())
            .clock(clock.clone())
            .sweep_interval(Duration::from_millis(20))
            .tags(true)
            .build::<String, String>()
            .unwrap();
        layer
            .set_tagged(
                &s("short"),
                &s("1"),
                Some(Duration::from_secs(1)),
                &tags(&["red", "big"]),
            )
            .await
            .unwrap();
        layer
            .set_tagged(&s("long"), &s("2"), None, &tags(&["red"]))
            .await
            .unwrap();
        assert_eq!(index_sizes(&db), (3, 2));
        clock.advance(Duration::from_secs(2));

        let started = Instant::now();
        while db.contains_key("short").unwrap() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the sweeper never ran"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Swept with its tags: only `long`'s entry is left in either tree.
        assert_eq!(index_sizes(&db), (1, 1));
        let key_tags = db.open_tree(KEY_TAGS_TREE).unwrap();
        assert!(key_tags.contains_key("long").unwrap());
        assert_eq!(layer.remove_by_tag("big").await.unwrap(), Vec::<String>::new());
        assert_eq!(layer.remove_by_tag("red").await.unwrap(), vec![s("long")]);
        assert_eq!(index_sizes(&db), (0, 0));
        layer.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_entries_keep_their_tags_until_removed_and_a_read_removes_both() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let clock = ManualClock::new(START);
        let layer = tagged_layer(&db, &clock);
        for key in ["x", "y"] {
            layer
                .set_tagged(&s(key), &s("v"), Some(Duration::from_secs(1)), &tags(&["red"]))
                .await
                .unwrap();
        }
        clock.advance(Duration::from_secs(2));
        // A read finds `x` expired and removes it with its tags.
        assert_eq!(layer.get(&s("x")).await.unwrap(), None);
        assert!(!db.contains_key("x").unwrap());
        assert_eq!(index_sizes(&db), (1, 1));
        // `y` expired but is still stored: remove_by_tag names it.
        assert_eq!(layer.remove_by_tag("red").await.unwrap(), vec![s("y")]);
        assert_eq!(index_sizes(&db), (0, 0));
        assert!(db.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_plain_write_form_untags() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let layer = tagged_layer(&db, &ManualClock::new(START));
        for key in ["k1", "k2", "k3", "k4", "k5"] {
            layer
                .set_tagged(&s(key), &s("v"), None, &tags(&["red", "blue"]))
                .await
                .unwrap();
        }
        assert_eq!(index_sizes(&db), (10, 5));
        layer.set_many(&[(s("k1"), s("v1"))], None).await.unwrap();
        assert_eq!(layer.delete_many(&[s("k2")]).await.unwrap(), 1);
        layer
            .apply_atomic(&[
                WriteOp::Set {
                    key: s("k3"),
                    value: s("v3"),
                    ttl: None,
                },
                WriteOp::Delete { key: s("k4") },
            ])
            .await
            .unwrap();
        assert_eq!(index_sizes(&db), (2, 1), "only k5 is still tagged");
        // An empty tag list is a plain write too.
        layer.set_tagged(&s("k6"), &s("v6"), None, &[]).await.unwrap();
        assert_eq!(index_sizes(&db), (2, 1));

        assert_eq!(layer.remove_by_tag("red").await.unwrap(), vec![s("k5")]);
        assert_eq!(layer.remove_by_tag("blue").await.unwrap(), Vec::<String>::new());
        assert_eq!(index_sizes(&db), (0, 0));
        for (key, value) in [("k1", "v1"), ("k3", "v3"), ("k6", "v6")] {
            assert_eq!(layer.get(&s(key)).await.unwrap().map(|e| e.value), Some(s(value)));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_removes_values_tags_and_foreign_bytes() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let layer = tagged_layer(&db, &ManualClock::new(START));
        for i in 0..600 {
            layer
                .set_tagged(&format!("t:{i}"), &s("v"), None, &tags(&["red"]))
                .await
                .unwrap();
        }
        for i in 0..100 {
            layer.set(&format!("p:{i}"), &s("v"), None).await.unwrap();
        }
        db.insert("foreign", &b"not an envelope"[..]).unwrap();
        layer.clear().await.unwrap();
        assert!(db.is_empty(), "{} entries left", db.len());
        assert_eq!(index_sizes(&db), (0, 0));
        assert_eq!(layer.remove_by_tag("red").await.unwrap(), Vec::<String>::new());

        // Without tags: sled's Tree::clear, foreign bytes included.
        let plain_db = scratch_db();
        let plain = SledLayer::builder()
            .db(plain_db.clone())
            .sweeper(false)
            .build::<String, String>()
            .unwrap();
        plain.set(&s("a"), &s("v"), None).await.unwrap();
        plain_db.insert("foreign", &b"x"[..]).unwrap();
        plain.clear().await.unwrap();
        assert!(plain_db.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tags_there_is_no_index_and_tagging_is_refused() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let layer = SledLayer::builder()
            .db(db.clone())
            .sweeper(false)
            .build::<String, String>()
            .unwrap();
        assert!(!layer.capabilities().tags);
        layer.set(&s("a"), &s("v"), None).await.unwrap();
        let err = layer
            .set_tagged(&s("b"), &s("v"), None, &tags(&["red"]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.message().contains("tags(true)"), "{err}");
        assert_eq!(
            layer.remove_by_tag("red").await.unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        let names = db.tree_names();
        assert!(
            !names.iter().any(|n| n.ends_with(b"tags")),
            "no tag tree: {names:?}"
        );
        assert!(format!("{layer:?}").contains("tags: false"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_tree_gets_tag_trees_of_its_own() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let layer = |tree: &str| {
            SledLayer::builder()
                .db(db.clone())
                .tree(tree)
                .sweeper(false)
                .tags(true)
                .build::<String, String>()
                .unwrap()
        };
        let (one, two) = (layer("one"), layer("two"));
        one.set_tagged(&s("k"), &s("1"), None, &tags(&["red"]))
            .await
            .unwrap();
        two.set_tagged(&s("k"), &s("2"), None, &tags(&["red"]))
            .await
            .unwrap();
        assert_eq!(db.open_tree(b"one\0tags").unwrap().len(), 1);
        assert_eq!(db.open_tree(b"two\0key-tags").unwrap().len(), 1);
        assert_eq!(one.remove_by_tag("red").await.unwrap(), vec![s("k")]);
        assert_eq!(two.get(&s("k")).await.unwrap().map(|e| e.value), Some(s("2")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_index_entries_are_dropped_not_followed() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let layer = tagged_layer(&db, &ManualClock::new(START));
        layer.set(&s("k"), &s("v"), None).await.unwrap();
        // An index entry the key-tags tree does not confirm (a damaged index).
        let mut entry = 3u16.to_be_bytes().to_vec();
        entry.extend_from_slice(b"redk");
        db.open_tree(TAGS_TREE).unwrap().insert(entry, &[][..]).unwrap();
        assert_eq!(layer.remove_by_tag("red").await.unwrap(), Vec::<String>::new());
        assert_eq!(layer.get(&s("k")).await.unwrap().map(|e| e.value), Some(s("v")));
        assert_eq!(index_sizes(&db), (0, 0));

        // A damaged key-tags value: the write still replaces it.
        layer
            .set_tagged(&s("k"), &s("v"), None, &tags(&["red"]))
            .await
            .unwrap();
        db.open_tree(KEY_TAGS_TREE)
            .unwrap()
            .insert("k", &[0xff][..])
            .unwrap();
        layer.set(&s("k"), &s("v2"), None).await.unwrap();
        assert_eq!(index_sizes(&db).1, 0);
        assert_eq!(layer.remove_by_tag("red").await.unwrap(), Vec::<String>::new());
        assert_eq!(layer.get(&s("k")).await.unwrap().map(|e| e.value), Some(s("v2")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tags_and_a_closed_layer_are_refused() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let layer = tagged_layer(&db, &ManualClock::new(START));
        let err = layer
            .set_tagged(&s("k"), &s("v"), None, &tags(&[""]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| i.to_string()).collect();
        let err = layer.set_tagged(&s("k"), &s("v"), None, &many).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert_eq!(layer.get(&s("k")).await.unwrap(), None, "nothing stored");
        assert_eq!(index_sizes(&db), (0, 0));
        assert_eq!(
            layer.remove_by_tag("").await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );

        layer.close().await.unwrap();
        let err = layer
            .set_tagged(&s("k"), &s("v"), None, &tags(&["red"]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Closed);
        assert_eq!(
            layer.remove_by_tag("red").await.unwrap_err().kind(),
            ErrorKind::Closed
        );
        assert_eq!(layer.clear().await.unwrap_err().kind(), ErrorKind::Closed);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_on_many_keys_is_removed_in_several_transactions() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let layer = tagged_layer(&db, &ManualClock::new(START));
        for i in 0..2_500 {
            layer
                .set_tagged(&format!("k:{i:05}"), &s("v"), None, &tags(&["bulk", "other"]))
                .await
                .unwrap();
        }
        let removed = layer.remove_by_tag("bulk").await.unwrap();
        assert_eq!(removed.len(), 2_500);
        let mut unique = removed.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 2_500);
        assert!(db.is_empty());
        assert_eq!(index_sizes(&db), (0, 0), "the keys' other tag went too");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_with_tags_is_refused_without_tags() {
    within(TEST_TIMEOUT, async {
        let db = scratch_db();
        let clock = ManualClock::new(0);
        let layer = tagged_layer(&db, &clock);
        layer
            .set_tagged(&s("a"), &s("1"), None, &tags(&["red"]))
            .await
            .unwrap();
        // Writes of `a` without tags would leave `red` on it, and a later
        // remove_by_tag("red") would remove a value written without that tag.
        let err = SledLayer::builder()
            .db(db.clone())
            .sweeper(false)
            .build::<String, String>()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.message().contains("`.tags(true)`"), "{err}");
        // Once no key carries a tag any more, the tree opens without tags.
        layer.delete(&s("a")).await.unwrap();
        let plain: SledLayer<String, String> = SledLayer::builder()
            .db(db.clone())
            .sweeper(false)
            .build()
            .unwrap();
        plain.set(&s("b"), &s("2"), None).await.unwrap();
    })
    .await;
}
