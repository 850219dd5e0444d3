//! A server that cannot be reached.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_unavailable_at_once_and_the_password_stays_secret() {
    within(TEST_TIMEOUT, async {
        let port = closed_port();
        let url = format!("postgres://app:hunter2-secret@127.0.0.1:{port}/db");
        let b = PostgresLayer::builder().url(&url).table("t");
        assert!(!format!("{b:?}").contains("hunter2"), "{b:?}");
        let started = Instant::now();
        let err = b.build::<String, String>().await.expect_err("nothing listens");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Unavailable, Operation::Build),
            "{err}"
        );
        assert!(err.is_temporary());
        let mut chain = format!("{err} {err:?}");
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            chain.push_str(&format!(" {s} {s:?}"));
            source = s.source();
        }
        assert!(!chain.contains("hunter2"), "the password leaked: {chain}");
        assert!(
            std::error::Error::source(&err).is_some_and(|s| s.is::<tokio_postgres::Error>()),
            "the driver's error is the source"
        );
    })
    .await;
}

/// A refused connection (a loopback port nothing listens on) is reported at once, by the
/// build and by the first operation of a layer whose server went away, never after the
/// pool's timeouts; the message names the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_fails_at_once_with_the_cause_in_the_message() {
    within(TEST_TIMEOUT, async {
        // Timeouts far beyond the bound below: an error within it did not wait for them.
        let long = Duration::from_secs(30);
        let at_once = Duration::from_secs(2);
        let port = closed_port();
        let started = Instant::now();
        let err = PostgresLayer::builder()
            .url(format!("postgres://postgres@127.0.0.1:{port}/test"))
            .table("t")
            .wait_timeout(long)
            .create_timeout(long)
            .recycle_timeout(long)
            .build::<String, String>()
            .await
            .expect_err("nothing listens");
        assert!(started.elapsed() < at_once, "took {:?}: {err}", started.elapsed());
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Unavailable, Operation::Build),
            "{err}"
        );
        assert!(
            err.to_string().to_lowercase().contains("refused"),
            "the cause is named: {err}"
        );

        // A layer built through a proxy that then stops listening: the port refuses.
        let table = unique_table("refused");
        let _guard = TableGuard(table.clone());
        let (proxy, via) = FaultProxy::in_front_of(&url(), 5432).await.expect("proxy");
        let layer = PostgresLayer::builder()
            .url(via)
            .table(&table)
            .sweeper(false)
            .wait_timeout(long)
            .create_timeout(long)
            .recycle_timeout(long)
            .statement_timeout(long)
            .build::<String, String>()
            .await
            .expect("build through the proxy");
        layer.set(&s("k"), &s("v"), None).await.expect("set");
        proxy.stop();
        while tokio::net::TcpStream::connect(proxy.addr()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The pooled connection the proxy closed may fail first (closed, not refused); the
        // next one the pool opens is refused.
        let mut shown = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            let err = layer.get(&s("k")).await.expect_err("the server is gone");
            assert!(started.elapsed() < at_once, "took {:?}: {err}", started.elapsed());
            assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
            shown.push(err.to_string());
            if shown.last().is_some_and(|m| m.to_lowercase().contains("refused")) {
                break;
            }
        }
        assert!(
            shown.last().is_some_and(|m| m.to_lowercase().contains("refused")),
            "the cause is named: {shown:?}"
        );
        layer.close().await.expect("close");
    })
    .await;
}
