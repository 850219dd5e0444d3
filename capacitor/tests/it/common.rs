//! What the tests of the facade that use the real servers share: where the servers are.
// Each URL is used only by the tests of the features that need its server.
#![allow(dead_code)]

/// `CAPACITOR_REDIS_URL`, else the local server.
pub(crate) fn redis_url() -> String {
    std::env::var("CAPACITOR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `CAPACITOR_POSTGRES_URL`, else the local server's `test` database.
pub(crate) fn postgres_url() -> String {
    std::env::var("CAPACITOR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}
