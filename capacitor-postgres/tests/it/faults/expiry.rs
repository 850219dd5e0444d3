//! Expiry by the layer's clock and the sweeper.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_follows_the_layer_clock_and_the_column_is_authoritative() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("clock");
        let _guard = TableGuard(table.clone());
        let clock = ManualClock::new(START);
        let layer = builder(&table)
            .clock(clock.clone())
            .sweeper(false)
            .build::<String, String>()
            .await
            .expect("build");
        let admin = admin().await;
        layer.set(&s("t"), &s("v"), Some(Duration::from_secs(10))).await.expect("set");
        let entry = layer.get(&s("t")).await.expect("get").expect("live");
        assert_eq!(entry.expires_at, Some(Timestamp::from_millis(START + 10_000)));
        let stored: i64 = admin
            .query_one(
                &format!("SELECT (extract(epoch FROM expires_at) * 1000)::int8 FROM \"public\".\"{table}\" WHERE key = 't'"),
                &[],
            )
            .await
            .expect("expires_at")
            .get(0);
        assert_eq!(stored, i64::try_from(START + 10_000).expect("fits"));

        clock.advance(Duration::from_millis(9_999));
        assert!(layer.exists(&s("t")).await.expect("exists"));
        clock.advance(Duration::from_millis(1));
        assert_eq!(layer.get(&s("t")).await.expect("get"), None, "expired at exactly its expiry");
        assert!(!layer.exists(&s("t")).await.expect("exists"));
        assert_eq!(layer.get_many(&[s("t")]).await.expect("get_many"), vec![None]);
        let mut stream = layer.scan(b"").expect("scan");
        assert!(next(&mut stream).await.is_none(), "scan skips expired rows");
        assert!(!layer.delete(&s("t")).await.expect("delete"), "an expired row is not reported present");
        assert_eq!(raw_count(&admin, &table, "true").await, 0, "but it is deleted");

        // The column wins over the envelope: moving expires_at by hand moves the expiry.
        layer.set(&s("u"), &s("v"), Some(Duration::from_secs(1))).await.expect("set");
        admin
            .execute(&format!("UPDATE \"public\".\"{table}\" SET expires_at = NULL WHERE key = 'u'"), &[])
            .await
            .expect("update");
        clock.advance(Duration::from_secs(5));
        assert_eq!(layer.get(&s("u")).await.expect("get").map(|e| (e.value, e.expires_at)), Some((s("v"), None)));

        // A TTL too long for PostgreSQL is stored as the latest instant it takes.
        layer.set(&s("forever"), &s("v"), Some(Duration::MAX)).await.expect("huge ttl");
        let entry = layer.get(&s("forever")).await.expect("get").expect("live");
        assert_eq!(entry.expires_at, Some(Timestamp::from_millis(253_402_300_799_999)));
        layer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_deletes_expired_rows_in_batches_and_stops_on_close() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("sweep");
        let _guard = TableGuard(table.clone());
        let clock = ManualClock::new(START);
        let layer = builder(&table)
            .clock(clock.clone())
            .sweep_interval(Duration::from_millis(50))
            .sweep_batch(7)
            .build::<String, String>()
            .await
            .expect("build");
        let admin = admin().await;
        let short: Vec<(String, String)> = (0..40).map(|i| (format!("s{i}"), s("v"))).collect();
        layer.set_many(&short, Some(Duration::from_secs(1))).await.expect("set_many");
        layer.set(&s("keep"), &s("v"), None).await.expect("set");
        layer.set(&s("later"), &s("v"), Some(Duration::from_secs(3600))).await.expect("set");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(raw_count(&admin, &table, "true").await, 42, "nothing has expired yet");

        clock.advance(Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(10);
        while raw_count(&admin, &table, "true").await > 2 {
            assert!(Instant::now() < deadline, "the sweeper did not delete the expired rows");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(raw_count(&admin, &table, "key IN ('keep', 'later')").await, 2);

        // After close, expired rows stay.
        layer.close().await.expect("close");
        admin
            .execute(
                &format!("INSERT INTO \"public\".\"{table}\" (key, value, expires_at) VALUES ('old', '', now() - interval '1 day')"),
                &[],
            )
            .await
            .expect("insert expired row");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(raw_count(&admin, &table, "key = 'old'").await, 1, "the sweeper stopped on close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_layer_stops_the_sweeper_and_releases_the_pool() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("dropped");
        let _guard = TableGuard(table.clone());
        let admin = admin().await;
        let app = format!("capacitor_{table}");
        let layer = PostgresLayer::builder()
            .url(crate::common::url_with(&format!("application_name={app}")))
            .table(&table)
            .sweep_interval(Duration::from_millis(20))
            .build::<String, String>()
            .await
            .expect("build");
        layer.set(&s("k"), &s("v"), None).await.expect("set");
        assert!(connections(&admin, &app).await >= 1);
        drop(layer);
        let deadline = Instant::now() + Duration::from_secs(10);
        while connections(&admin, &app).await > 0 {
            assert!(
                Instant::now() < deadline,
                "the dropped layer's connections stay open"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}
