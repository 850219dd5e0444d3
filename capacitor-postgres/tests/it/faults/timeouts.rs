//! Statement and operation timeouts: typed errors, nothing half-written, abandoned
//! statements cancelled.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_over_the_timeout_is_a_timeout_and_a_batch_leaves_nothing() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("stmt");
        let _guard = TableGuard(table.clone());
        // 1 s: short beside the 4 s bound below, long enough that an unblocked insert on a
        // loaded CI machine is not cancelled.
        let layer = builder(&table)
            .statement_timeout(Duration::from_secs(1))
            .build::<String, String>()
            .await
            .expect("build");
        layer.set(&s("locked"), &s("v0"), None).await.expect("set");
        let mut admin = admin().await;
        let tx = lock_row(&mut admin, &table, "locked").await;

        let started = Instant::now();
        let err = layer
            .set(&s("locked"), &s("v1"), None)
            .await
            .expect_err("cancelled");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Timeout, Operation::Set),
            "{err}"
        );
        assert!(err.message().contains("57014"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "took {:?}",
            started.elapsed()
        );
        let source = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
            .expect("the driver's error is the source");
        assert_eq!(
            source.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
        );

        // A transaction that touches the locked row is cancelled whole.
        let ops = vec![
            WriteOp::Set {
                key: s("a-free-key"),
                value: s("x"),
                ttl: None,
            },
            WriteOp::Set {
                key: s("locked"),
                value: s("y"),
                ttl: None,
            },
        ];
        assert_eq!(kind(layer.apply_atomic(&ops).await), ErrorKind::Timeout);
        tx.rollback().await.expect("release");
        assert_eq!(
            layer.get(&s("a-free-key")).await.expect("get"),
            None,
            "nothing of the failed batch"
        );
        assert_eq!(
            layer.get(&s("locked")).await.expect("get").map(|e| e.value),
            Some(s("v0"))
        );
        // The layer goes on working (the connection was not left inside a transaction).
        layer
            .apply_atomic(&ops)
            .await
            .expect("apply_atomic once unlocked");
        assert_eq!(
            layer.get(&s("locked")).await.expect("get").map(|e| e.value),
            Some(s("y"))
        );
        layer.close().await.expect("close");
    })
    .await;
}

/// An operation that does not complete (the client-side operation timeout, here shorter
/// than the statement timeout as when a link stalls; or its caller dropping it) gives up
/// its connection: the statement is cancelled on the server, and the next operation gets
/// a fresh connection instead of queueing behind the reply still owed on the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_operation_is_cancelled_and_does_not_hold_up_the_next_one() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("abandon");
        let _guard = TableGuard(table.clone());
        let layer = named_builder(&table)
            .pool_size(1)
            .statement_timeout(Duration::from_secs(60))
            .operation_timeout(Duration::from_secs(2))
            .build::<String, String>()
            .await
            .expect("build");
        layer.set(&s("locked"), &s("v0"), None).await.expect("set");
        let mut admin = admin().await;
        let tx = lock_row(&mut admin, &table, "locked").await;

        let err = layer
            .set(&s("locked"), &s("v1"), None)
            .await
            .expect_err("the update waits on the row lock past the operation timeout");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Timeout, Operation::Set),
            "{err}"
        );
        // Cancelled on the server: no session of the layer waits on the lock any more.
        no_lock_waiters(&tx, &table).await;
        let reads_answer = |round: &'static str| {
            let layer = layer.clone();
            async move {
                // Reads do not wait on row locks: a fresh connection answers at once.
                for key in ["free", "locked"] {
                    let found = layer.get(&s(key)).await.unwrap_or_else(|e| {
                        panic!("{round}: a read must not queue behind the abandoned update: {e}")
                    });
                    assert_eq!(
                        found.map(|e| e.value),
                        (key == "locked").then(|| s("v0")),
                        "{round}: {key}"
                    );
                }
            }
        };
        reads_answer("after the operation timeout").await;

        // The caller gives up first (its own timeout, as a composer's layer timeout does).
        tokio::time::timeout(
            Duration::from_millis(300),
            layer.set(&s("locked"), &s("v2"), None),
        )
        .await
        .expect_err("the update waits on the row lock");
        no_lock_waiters(&tx, &table).await;
        reads_answer("after the caller gave up").await;

        // Neither abandoned update is applied once the lock is released: both were
        // cancelled while they waited for it.
        tx.rollback().await.expect("release");
        assert_eq!(
            layer.get(&s("locked")).await.expect("get").map(|e| e.value),
            Some(s("v0"))
        );
        layer.set(&s("after"), &s("x"), None).await.expect("set");
        assert_eq!(
            layer.get(&s("after")).await.expect("get").map(|e| e.value),
            Some(s("x"))
        );
        layer.close().await.expect("close");
    })
    .await;
}
