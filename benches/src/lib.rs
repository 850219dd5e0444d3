//! The data the backend suites in `benches/` share, so that every backend is measured on
//! the same keys and values, encoded as hand-written code would (plain bincode). Run the
//! suites with `cargo xtask bench`.

/// The `i`-th key of a suite.
pub fn key(i: u64) -> String {
    format!("user:{i}")
}

/// The `i`-th value of a suite: about 70 bytes, like a small profile.
pub fn value(i: u64) -> String {
    format!("profile of user {i}, with a few more bytes to look like a real value")
}

/// What the raw side stores: the value in plain bincode (no envelope).
///
/// # Panics
///
/// Never for a `String`; this is benchmark code.
#[allow(clippy::expect_used)]
pub fn encode(v: &String) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).expect("a String encodes")
}

/// Decodes what [`encode`] wrote.
///
/// # Panics
///
/// On bytes [`encode`] did not write; this is benchmark code.
#[allow(clippy::expect_used)]
pub fn decode(bytes: &[u8]) -> String {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .expect("bytes written by encode")
        .0
}
