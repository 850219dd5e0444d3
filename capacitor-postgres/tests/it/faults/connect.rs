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
