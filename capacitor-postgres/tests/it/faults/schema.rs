//! The table: an existing table of the wrong shape, the documented DDL, processes
//! creating it together, DDL waiting on a creator.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_table_of_the_wrong_shape_is_a_config_error_naming_the_column() {
    within(TEST_TIMEOUT, async {
        let admin = admin().await;
        let cases: &[(&str, &str, &str)] = &[
            (
                "no_expiry",
                "key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()",
                "column `expires_at` is missing",
            ),
            (
                "text_value",
                "key text COLLATE \"C\" PRIMARY KEY, value text NOT NULL, expires_at timestamptz, updated_at timestamptz DEFAULT now()",
                "column `value` has type text",
            ),
            (
                "naive_time",
                "key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL, expires_at timestamp, updated_at timestamptz DEFAULT now()",
                "column `expires_at` has type timestamp without time zone",
            ),
            (
                "int_key",
                "key bigint PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz, updated_at timestamptz DEFAULT now()",
                "column `key` has type bigint",
            ),
            (
                "not_null_expiry",
                "key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz NOT NULL, updated_at timestamptz DEFAULT now()",
                "column `expires_at` is NOT NULL",
            ),
            (
                "no_pk",
                "key text COLLATE \"C\", value bytea NOT NULL, expires_at timestamptz, updated_at timestamptz DEFAULT now()",
                "column `key` has no PRIMARY KEY or UNIQUE",
            ),
            (
                "collation",
                "key text COLLATE \"{collation}\" PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz, updated_at timestamptz DEFAULT now()",
                "column `key` has collation {collation}",
            ),
            (
                "extra_col",
                "key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz, updated_at timestamptz DEFAULT now(), owner text NOT NULL",
                "column `owner` is NOT NULL without a default",
            ),
        ];
        // Any collation that does not compare bytes (servers have different ones).
        let collation: String = admin
            .query_one(
                "SELECT collname FROM pg_collation WHERE collname NOT IN ('C', 'POSIX', 'ucs_basic', 'default') \
                 AND collencoding IN (-1, (SELECT encoding FROM pg_database WHERE datname = current_database())) \
                 ORDER BY collprovider DESC, collname LIMIT 1",
                &[],
            )
            .await
            .expect("a collation other than C")
            .get(0);
        let mut guards = Vec::new();
        for (what, columns, expected) in cases {
            let (columns, expected) = (columns.replace("{collation}", &collation), expected.replace("{collation}", &collation));
            let table = unique_table(what);
            guards.push(TableGuard(table.clone()));
            admin
                .batch_execute(&format!("CREATE TABLE \"public\".\"{table}\" ({columns})"))
                .await
                .expect("create");
            let err = builder(&table)
                .build::<String, String>()
                .await
                .expect_err(what);
            assert_eq!(err.kind(), ErrorKind::Config, "{what}: {err}");
            assert!(err.message().contains(&expected), "{what}: {err}");
            assert!(err.message().contains(&table), "{what}: the message names the table: {err}");
        }
        // Extra columns that are nullable or have defaults are fine.
        let table = unique_table("extra_ok");
        guards.push(TableGuard(table.clone()));
        admin
            .batch_execute(&format!(
                "CREATE TABLE \"public\".\"{table}\" (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL, \
                 expires_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now(), note text, \
                 version int NOT NULL DEFAULT 1)"
            ))
            .await
            .expect("create");
        let layer = builder(&table)
            .create_table(false)
            .build::<String, String>()
            .await
            .expect("compatible");
        layer.set(&s("k"), &s("v"), None).await.expect("set");
        layer.close().await.expect("close");

        // A logged table and unlogged(true), and the reverse.
        let table = unique_table("logged");
        guards.push(TableGuard(table.clone()));
        builder(&table).build::<String, String>().await.expect("create logged");
        let err = builder(&table)
            .unlogged(true)
            .build::<String, String>()
            .await
            .expect_err("logged vs unlogged");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.message().starts_with("`unlogged`"), "{err}");
        let table = unique_table("unlogged");
        guards.push(TableGuard(table.clone()));
        builder(&table)
            .unlogged(true)
            .build::<String, String>()
            .await
            .expect("create unlogged");
        let persistence: String = admin
            .query_one(
                "SELECT relpersistence::text FROM pg_class WHERE relname = $1",
                &[&table],
            )
            .await
            .expect("query")
            .get(0);
        assert_eq!(persistence, "u");
        assert_eq!(kind(builder(&table).build::<String, String>().await), ErrorKind::Config);

        // A view of the right name is not a table.
        let view = unique_table("view");
        guards.push(TableGuard(view.clone()));
        admin
            .batch_execute(&format!("CREATE VIEW \"public\".\"{view}\" AS SELECT 1 AS x"))
            .await
            .expect("view");
        let err = builder(&view).build::<String, String>().await.expect_err("a view");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.message().contains("not a table"), "{err}");
        admin
            .batch_execute(&format!("DROP VIEW \"public\".\"{view}\""))
            .await
            .expect("drop view");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_schema_and_table_are_created_with_the_documented_ddl() {
    within(TEST_TIMEOUT, async {
        let schema = unique_table("schema");
        let admin = admin().await;
        let layer = PostgresLayer::builder()
            .url(url())
            .schema(&schema)
            .table("Sessions")
            .build::<String, String>()
            .await
            .expect("build");
        assert_eq!(layer.table(), format!("\"{schema}\".\"Sessions\""));
        layer.set(&s("user:42"), &s("Ada"), None).await.expect("set");
        // The key is readable, the case of the table name kept.
        let row = admin
            .query_one(
                &format!("SELECT value, expires_at IS NULL FROM \"{schema}\".\"Sessions\" WHERE key = 'user:42'"),
                &[],
            )
            .await
            .expect("readable key");
        let value: Vec<u8> = row.get(0);
        let (expiry, payload) = envelope::unwrap(&value).expect("envelope");
        assert_eq!(expiry, None);
        let decoded: String = Codec::<String>::decode(&capacitor_core::DefaultCodec::default(), payload).expect("postcard");
        assert_eq!(decoded, "Ada");
        assert!(row.get::<_, bool>(1));
        let index: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND indexname = 'Sessions_expires_at_idx'",
                &[&schema],
            )
            .await
            .expect("index")
            .get(0);
        assert_eq!(index, 1, "the sweeper's index exists");
        layer.close().await.expect("close");
        admin
            .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .await
            .expect("drop schema");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_starting_together_create_the_table_once() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("race");
        let _guard = TableGuard(table.clone());
        let builds = (0..6).map(|_| {
            let table = table.clone();
            tokio::spawn(async move { builder(&table).pool_size(1).build::<String, String>().await })
        });
        for build in futures::future::join_all(builds).await {
            let layer = build.expect("task").expect("every concurrent build succeeds");
            layer.close().await.expect("close");
        }
    })
    .await;
}

/// A statement timeout meant for reads and writes does not cancel the build's DDL while it
/// waits: here another session holds the creation lock longer than the timeout (as a
/// process creating the same table, or a busy catalog, would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_statement_timeout_does_not_cancel_the_build_waiting_on_a_creator() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("slowddl");
        let _guard = TableGuard(table.clone());
        let mut admin = admin().await;
        let tx = admin.transaction().await.expect("begin");
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("capacitor-postgres:\"public\".\"{table}\"")],
        )
        .await
        .expect("take the creation lock");
        let build = tokio::spawn({
            let table = table.clone();
            async move {
                named_builder(&table)
                    .statement_timeout(Duration::from_millis(50))
                    .build::<String, String>()
                    .await
            }
        });
        lock_waiters(&tx, &table, "advisory").await;
        // Well past the 50 ms timeout, with the build waiting on the lock all along.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!build.is_finished(), "the build waits for the lock");
        tx.rollback().await.expect("release");
        let layer = build
            .await
            .expect("task")
            .expect("the build outlasts its statement timeout");
        layer.close().await.expect("close");
        // The table it created works (checked with default timeouts: 50 ms is too short
        // for a write on a loaded machine, and not what this test is about).
        let check = builder(&table).build::<String, String>().await.expect("build");
        check.set(&s("k"), &s("v"), None).await.expect("set");
        assert_eq!(
            check.get(&s("k")).await.expect("get").map(|e| e.value),
            Some(s("v"))
        );
        check.close().await.expect("close");
    })
    .await;
}
