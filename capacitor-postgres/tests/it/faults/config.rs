//! Builder options refused with typed errors naming the field.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_are_not_plain_identifiers_are_config_errors() {
    within(TEST_TIMEOUT, async {
        let long = "t".repeat(64);
        for bad in [
            "x; drop table y",
            "\"quoted\"",
            long.as_str(),
            "",
            "1st",
            "a.b",
            "täble",
        ] {
            let err = builder(bad).build::<String, String>().await.expect_err(bad);
            assert_eq!(
                (err.kind(), err.operation()),
                (ErrorKind::Config, Operation::Build),
                "{bad}: {err}"
            );
            assert!(err.message().starts_with("`table`"), "{bad}: {err}");
            let err = PostgresLayer::builder()
                .url(url())
                .schema(bad)
                .build::<String, String>()
                .await
                .expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::Config, "{bad}");
            assert!(err.message().starts_with("`schema`"), "{bad}: {err}");
        }
        // Nothing was created, and `y` (if it exists) is untouched: the names never reached
        // the server.
        let admin = admin().await;
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_class WHERE relname LIKE 'x;%' OR relname LIKE '%quoted%'",
                &[],
            )
            .await
            .expect("query")
            .get(0);
        assert_eq!(n, 0);
        // 63 characters is the limit, and allowed.
        let at_limit = format!("pt_{}", "l".repeat(60));
        let _guard = TableGuard(at_limit.clone());
        let layer = builder(&at_limit)
            .build::<String, String>()
            .await
            .expect("63 chars");
        layer.set(&s("k"), &s("v"), None).await.expect("set");
        layer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_name_the_field() {
    within(TEST_TIMEOUT, async {
        let cases: Vec<(&str, PostgresLayerBuilder)> = vec![
            ("url", PostgresLayer::builder()),
            ("url", PostgresLayer::builder().url("postgres://u@h:notaport/db")),
            ("url", PostgresLayer::builder().url("dbname=x")),
            ("pool_size", builder("t").pool_size(0)),
            ("max_value_bytes", builder("t").max_value_bytes(0)),
            ("max_value_bytes", builder("t").max_value_bytes(1 << 30)),
            ("sweep_interval", builder("t").sweep_interval(Duration::ZERO)),
            ("sweep_batch", builder("t").sweep_batch(0)),
            ("scan_page_size", builder("t").scan_page_size(0)),
        ];
        for (field, b) in cases {
            let err = b.build::<String, String>().await.expect_err(field);
            assert_eq!(err.kind(), ErrorKind::Config, "{field}: {err}");
            assert!(err.message().starts_with(&format!("`{field}`")), "{field}: {err}");
        }
        // The sweeper off: a zero interval is not looked at.
        let table = unique_table("nosweep");
        let _guard = TableGuard(table.clone());
        let layer = builder(&table)
            .sweeper(false)
            .sweep_interval(Duration::ZERO)
            .build::<String, String>()
            .await
            .expect("no sweeper");
        layer.close().await.expect("close");

        // A missing table with create_table(false).
        let missing = unique_table("missing");
        let err = builder(&missing)
            .create_table(false)
            .build::<String, String>()
            .await
            .expect_err("missing table");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.message().contains("does not exist"), "{err}");
        assert!(err.message().contains(&missing), "{err}");
    })
    .await;
}

#[test]
fn building_outside_a_runtime_is_a_config_error() {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
    // A runtime to poll the future on, entered nowhere: `Handle::try_current` fails.
    let fut = builder("t").build::<String, String>();
    let err = futures::executor::block_on(fut).expect_err("no runtime");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().starts_with("`runtime`"), "{err}");
    drop(rt);
}
