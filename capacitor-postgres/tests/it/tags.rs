//! Tags in PostgreSQL: the tag table's DDL and checks, the rows behind the contract, tags
//! through a `MultiLayer` with a moka L1, and what tags cost (printed: run with
//! `--nocapture` to read the figures). Each test has its own tables.

use std::time::{Duration, Instant};

use crate::common::{admin, unique_table, url, TableGuard};
use capacitor_core::{ErrorKind, Layer, LayerConfig, MultiLayer, SetOptions};
use capacitor_memory::MokaLayer;
use capacitor_postgres::PostgresLayer;

async fn tagged(table: &str) -> PostgresLayer<String, String> {
    PostgresLayer::builder()
        .url(url())
        .table(table)
        .tags(true)
        .build()
        .await
        .expect("PostgreSQL layer with tags")
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

fn tags(t: &[&str]) -> Vec<String> {
    t.iter().map(|t| (*t).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tag_table_is_in_the_ddl_and_checked_at_build() {
    let table = unique_table("tagddl");
    let _guard = TableGuard(table.clone());
    let ddl = PostgresLayer::builder().table(&table).tags(true).ddl().unwrap();
    assert!(
        ddl.contains(&format!("CREATE TABLE IF NOT EXISTS \"public\".\"{table}_tags\"")),
        "{ddl}"
    );
    assert!(ddl.contains("PRIMARY KEY (key, tag)"), "{ddl}");
    assert!(
        ddl.contains(&format!(
            "REFERENCES \"public\".\"{table}\" (key) ON DELETE CASCADE"
        )),
        "{ddl}"
    );
    assert!(
        ddl.contains(&format!("ON \"public\".\"{table}_tags\" (tag)")),
        "{ddl}"
    );
    let plain = PostgresLayer::builder().table(&table).ddl().unwrap();
    assert!(!plain.contains("_tags"), "no tag table without tags: {plain}");

    // The kv table exists, the tag table does not: create_table(false) refuses, naming it.
    let plain_layer = PostgresLayer::builder()
        .url(url())
        .table(&table)
        .build::<String, String>()
        .await
        .unwrap();
    plain_layer.close().await.unwrap();
    let err = PostgresLayer::builder()
        .url(url())
        .table(&table)
        .tags(true)
        .create_table(false)
        .build::<String, String>()
        .await
        .expect_err("no tag table");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.message().contains(&format!("\"{table}_tags\"")), "{err}");
    assert!(err.message().contains("does not exist"), "{err}");

    // The documented DDL makes it buildable with create_table(false).
    let admin = admin().await;
    admin.batch_execute(&ddl).await.expect("the DDL runs");
    let layer = PostgresLayer::builder()
        .url(url())
        .table(&table)
        .tags(true)
        .create_table(false)
        .build::<String, String>()
        .await
        .expect("built over the documented DDL");
    assert!(layer.capabilities().tags);
    assert_eq!(
        layer.tags_table().as_deref(),
        Some(format!("\"public\".\"{table}_tags\"").as_str())
    );
    layer.close().await.unwrap();

    // A tag table without the foreign key's cascade is refused.
    admin
        .batch_execute(&format!(
            "DROP TABLE \"public\".\"{table}_tags\"; \
             CREATE TABLE \"public\".\"{table}_tags\" (key text, tag text, PRIMARY KEY (key, tag)); \
             CREATE INDEX ON \"public\".\"{table}_tags\" (tag)"
        ))
        .await
        .unwrap();
    let err = PostgresLayer::builder()
        .url(url())
        .table(&table)
        .tags(true)
        .build::<String, String>()
        .await
        .expect_err("no foreign key");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.message().contains("ON DELETE CASCADE"), "{err}");
    assert!(err.message().contains(&format!("{table}_tags")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_rows_follow_the_last_write_of_each_key() {
    let table = unique_table("tagrows");
    let _guard = TableGuard(table.clone());
    let layer = tagged(&table).await;
    let admin = admin().await;
    let tag_rows = format!("SELECT count(*) FROM \"public\".\"{table}_tags\"");
    let s = |x: &str| x.to_owned();
    layer
        .set_tagged(&s("a"), &s("1"), None, &tags(&["x", "y", "x"]))
        .await
        .unwrap();
    assert_eq!(count(&admin, &tag_rows).await, 2, "a repeated tag counts once");
    layer.set(&s("a"), &s("2"), None).await.unwrap();
    assert_eq!(count(&admin, &tag_rows).await, 0, "untagged by set");
    layer
        .set_tagged(&s("a"), &s("3"), None, &tags(&["x"]))
        .await
        .unwrap();
    layer
        .set_many(&[(s("a"), s("4")), (s("b"), s("4"))], None)
        .await
        .unwrap();
    assert_eq!(count(&admin, &tag_rows).await, 0, "untagged by set_many");
    layer
        .set_tagged(&s("a"), &s("5"), None, &tags(&["x"]))
        .await
        .unwrap();
    layer.delete(&s("a")).await.unwrap();
    assert_eq!(count(&admin, &tag_rows).await, 0, "untagged by delete (cascade)");
    layer
        .set_tagged(&s("a"), &s("6"), None, &tags(&["x"]))
        .await
        .unwrap();
    layer
        .apply_atomic(&[capacitor_core::WriteOp::Set {
            key: s("a"),
            value: s("7"),
            ttl: None,
        }])
        .await
        .unwrap();
    assert_eq!(count(&admin, &tag_rows).await, 0, "untagged by apply_atomic");
    // An expired entry is still removed and named; its tag is forgotten.
    layer
        .set_tagged(&s("e"), &s("8"), Some(Duration::from_millis(50)), &tags(&["x"]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(layer.get(&s("e")).await.unwrap(), None);
    assert_eq!(layer.remove_by_tag("x").await.unwrap(), vec![s("e")]);
    assert_eq!(count(&admin, &tag_rows).await, 0);
    // Refused before anything is sent.
    let err = layer
        .set_tagged(&s("z"), &s("9"), None, &tags(&[""]))
        .await
        .expect_err("empty tag");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let err = layer
        .set_tagged(&s("z"), &s("9"), None, &tags(&["a\0b"]))
        .await
        .expect_err("NUL in a tag");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert_eq!(layer.get(&s("z")).await.unwrap(), None, "nothing stored");
    // clear takes the tag rows too.
    layer
        .set_tagged(&s("c"), &s("1"), None, &tags(&["x"]))
        .await
        .unwrap();
    layer.clear().await.unwrap();
    assert_eq!(count(&admin, &tag_rows).await, 0);
    layer.close().await.unwrap();
    let err = layer.remove_by_tag("x").await.expect_err("closed");
    assert_eq!(err.kind(), ErrorKind::Closed);
    let err = layer
        .set_tagged(&s("c"), &s("1"), None, &tags(&["x"]))
        .await
        .expect_err("closed");
    assert_eq!(err.kind(), ErrorKind::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_by_tag_through_a_moka_l1_and_what_tags_cost() {
    let table = unique_table("tagmulti");
    let _guard = TableGuard(table.clone());
    let admin = admin().await;
    let cache = MultiLayer::builder()
        .layer(LayerConfig::new(
            "moka",
            MokaLayer::builder()
                .max_capacity(100_000)
                .build::<String, String>()
                .unwrap(),
        ))
        .layer(LayerConfig::new("postgres", tagged(&table).await))
        .build()
        .unwrap();
    for i in 0..3 {
        cache
            .set_with(
                format!("order:{i}"),
                format!("v{i}"),
                SetOptions::new().tags(["user:42", "orders"]),
            )
            .await
            .unwrap();
    }
    cache.set("order:9".into(), "untagged".into()).await.unwrap();
    cache
        .set_with("other".into(), "v".into(), SetOptions::new().tags(["user:7"]))
        .await
        .unwrap();
    for i in 0..3 {
        // Read, so that the L1 holds them.
        assert_eq!(
            cache.get(&format!("order:{i}")).await.unwrap(),
            Some(format!("v{i}"))
        );
    }
    let mut removed = cache.remove_by_tag("user:42").await.unwrap();
    removed.sort();
    assert_eq!(removed, vec!["order:0", "order:1", "order:2"]);
    for i in 0..3 {
        assert_eq!(cache.get(&format!("order:{i}")).await.unwrap(), None, "order:{i}");
    }
    let rows = format!("SELECT count(*) FROM \"public\".\"{table}\"");
    assert_eq!(
        count(&admin, &rows).await,
        2,
        "order:9 and other stay in PostgreSQL"
    );
    assert_eq!(
        cache.get(&"order:9".into()).await.unwrap(),
        Some("untagged".into())
    );
    assert_eq!(cache.get(&"other".into()).await.unwrap(), Some("v".into()));
    assert_eq!(cache.remove_by_tag("orders").await.unwrap(), Vec::<String>::new());

    // A tag carried by 1,000 keys: one statement.
    let entries = 1_000;
    for i in 0..entries {
        cache
            .set_with(format!("bulk:{i}"), "x".into(), SetOptions::new().tags(["bulk"]))
            .await
            .unwrap();
    }
    let started = Instant::now();
    let removed = cache.remove_by_tag("bulk").await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(removed.len(), entries);
    assert_eq!(count(&admin, &rows).await, 2);
    println!("remove_by_tag of a tag on {entries} keys (MultiLayer, moka L1): {elapsed:?}");
    cache.close().await.unwrap();

    // The untag cost: plain sets with tags off vs on, same machine, alternated so that
    // both see the same load.
    let off_table = unique_table("tagcost_off");
    let on_table = unique_table("tagcost_on");
    let _guards = (TableGuard(off_table.clone()), TableGuard(on_table.clone()));
    let mut layers = Vec::new();
    for (table, on) in [(&off_table, false), (&on_table, true)] {
        let layer = PostgresLayer::builder()
            .url(url())
            .table(table)
            .tags(on)
            .build::<String, String>()
            .await
            .unwrap();
        for i in 0..50 {
            // Warm-up: statements prepared, pages in cache.
            layer.set(&format!("k{i}"), &"w".to_owned(), None).await.unwrap();
        }
        layers.push(layer);
    }
    let mut times = [Vec::with_capacity(200), Vec::with_capacity(200)];
    for i in 0..200 {
        for (layer, times) in layers.iter().zip(times.iter_mut()) {
            let started = Instant::now();
            layer.set(&format!("k{i}"), &"v".to_owned(), None).await.unwrap();
            times.push(started.elapsed());
        }
    }
    let [off, on] = times.map(|mut t| {
        t.sort();
        t[t.len() / 2]
    });
    println!("median of 200 plain sets: tags(false) {off:?}, tags(true) {on:?}");
    for layer in layers {
        layer.close().await.unwrap();
    }
}
