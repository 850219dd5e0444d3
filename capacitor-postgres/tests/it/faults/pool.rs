//! An exhausted pool.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_is_a_timeout() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("pool");
        let _guard = TableGuard(table.clone());
        let layer = named_builder(&table)
            .pool_size(1)
            .wait_timeout(Duration::from_millis(200))
            .statement_timeout(Duration::from_secs(20))
            .build::<String, String>()
            .await
            .expect("build");
        layer.set(&s("locked"), &s("v0"), None).await.expect("set");

        // Another session locks the row; the layer's only connection then waits on it.
        let mut admin = admin().await;
        let tx = lock_row(&mut admin, &table, "locked").await;
        let blocked = {
            let layer = layer.clone();
            tokio::spawn(async move { layer.set(&s("locked"), &s("v1"), None).await })
        };
        lock_waiters(&tx, &table, "transactionid").await;
        assert!(!blocked.is_finished(), "the set waits for the row lock");

        let started = Instant::now();
        let err = layer.get(&s("other")).await.expect_err("no free connection");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Timeout, Operation::Get),
            "{err}"
        );
        assert!(err.message().contains("wait timeout"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );

        tx.rollback().await.expect("release the lock");
        blocked.await.expect("task").expect("the blocked set completes");
        assert_eq!(
            layer.get(&s("locked")).await.expect("get").map(|e| e.value),
            Some(s("v1"))
        );
        layer.close().await.expect("close");
    })
    .await;
}
