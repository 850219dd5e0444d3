//! How keys become the text of the `key` column, and the key range a prefix scan reads.

use std::borrow::Cow;
use std::fmt::Write as _;

use capacitor_core::{Error, ErrorKind, Operation, Result};

/// How [`StorageKey`](capacitor_core::StorageKey) bytes are stored in the `key` column
/// (PostgreSQL `text`, which holds UTF-8 without NUL bytes).
///
/// The default follows the key type: [`KeyFormat::Text`] for `String` keys (so that
/// `SELECT value FROM capacitor_kv WHERE key = 'user:42'` finds them), [`KeyFormat::Hex`]
/// for every other key type (integers and byte vectors, whose bytes are usually not
/// UTF-8). Both keep byte order under the column's `COLLATE "C"`, which is what makes
/// prefix scans and their keyset pagination correct.
///
/// A table holds keys of one format: a layer reading a table written in the other format
/// sees no keys (nothing is mixed up: `"ab"` in text and `[0x61, 0x62]` in hex are
/// different rows, `ab` and `6162`).
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), capacitor::Error> {
/// use capacitor::postgres::{KeyFormat, PostgresLayer};
///
/// // Byte-vector keys that are known to be readable text.
/// let layer = PostgresLayer::builder()
///     .url("postgres://app@127.0.0.1/app")
///     .key_format(KeyFormat::Text)
///     .build::<Vec<u8>, String>()
///     .await?;
/// # Ok(()) }
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// The key bytes as they are: they must be UTF-8 without NUL bytes (PostgreSQL `text`
    /// cannot hold NUL); other keys fail with
    /// [`ErrorKind::InvalidInput`] before anything is sent.
    Text,
    /// The key bytes in lowercase hexadecimal (`7u64` is stored as `0000000000000007`).
    /// Any bytes can be stored; two characters per byte.
    Hex,
}

impl KeyFormat {
    /// The stored text of `bytes`.
    pub(crate) fn encode<'a>(self, bytes: &'a [u8], op: Operation) -> Result<Cow<'a, str>> {
        match self {
            KeyFormat::Text => {
                let text = std::str::from_utf8(bytes).map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidInput,
                        op,
                        "the key is not UTF-8, which the text key format needs (use KeyFormat::Hex)",
                    )
                    .with_source(e)
                })?;
                if text.contains('\0') {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        op,
                        "the key contains a NUL byte, which a PostgreSQL text column cannot hold \
                         (use KeyFormat::Hex for such keys)",
                    ));
                }
                Ok(Cow::Borrowed(text))
            }
            KeyFormat::Hex => Ok(Cow::Owned(hex(bytes))),
        }
    }

    /// The key bytes of stored text.
    pub(crate) fn decode(self, text: &str, op: Operation) -> Result<Cow<'_, [u8]>> {
        match self {
            KeyFormat::Text => Ok(Cow::Borrowed(text.as_bytes())),
            KeyFormat::Hex => unhex(text).map(Cow::Owned).ok_or_else(|| {
                Error::new(
                    ErrorKind::Decode,
                    op,
                    "a stored key is not lowercase hexadecimal, which the hex key format reads",
                )
            }),
        }
    }

    /// The rows a scan of `prefix` must read, or `None` when no stored key can start with
    /// `prefix` (a NUL byte or bytes that are not UTF-8 in the text format).
    pub(crate) fn scan_range(self, prefix: &[u8]) -> Option<ScanRange> {
        let (lower, exact) = match self {
            KeyFormat::Hex => (hex(prefix), true),
            KeyFormat::Text => {
                if prefix.contains(&0) {
                    return None;
                }
                match std::str::from_utf8(prefix) {
                    Ok(text) => (text.to_owned(), true),
                    // A prefix cut inside a character can still start keys: read the range
                    // of its valid part and filter the rest by bytes.
                    Err(e) if e.error_len().is_none() => {
                        let valid = std::str::from_utf8(&prefix[..e.valid_up_to()]).ok()?;
                        (valid.to_owned(), false)
                    }
                    // Bytes that are not UTF-8 anywhere: no text key starts with them.
                    Err(_) => return None,
                }
            }
        };
        let upper = successor(&lower);
        Some(ScanRange { lower, upper, exact })
    }
}

/// The keys `lower <= key < upper` (no upper bound when `None`) in byte order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScanRange {
    pub(crate) lower: String,
    pub(crate) upper: Option<String>,
    /// Every key in the range starts with the prefix; otherwise each decoded key must be
    /// checked against the prefix bytes.
    pub(crate) exact: bool,
}

/// The least string greater than every string starting with `s`, in byte (= code point)
/// order: `s` with its last incrementable character incremented and what follows it
/// dropped. `None` when there is none (`s` is empty or all `char::MAX`).
pub(crate) fn successor(s: &str) -> Option<String> {
    let mut chars: Vec<char> = s.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match u32::from(last) + 1 {
            0xD800 => Some('\u{E000}'),
            n => char::from_u32(n),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_keeps_byte_order() {
        let keys: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0, 0xff], vec![1], vec![0x7f, 3], vec![0xff]];
        let texts: Vec<String> = keys.iter().map(|k| hex(k)).collect();
        let mut sorted = texts.clone();
        sorted.sort();
        assert_eq!(texts, sorted);
        for (k, t) in keys.iter().zip(&texts) {
            assert_eq!(unhex(t).as_ref(), Some(k));
        }
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("0G"), None);
        assert_eq!(unhex("AB"), None, "upper case is not what we write");
    }

    #[test]
    fn text_refuses_nul_and_non_utf8() {
        let op = Operation::Set;
        assert_eq!(
            KeyFormat::Text.encode(b"user:42", op).ok().as_deref(),
            Some("user:42")
        );
        let kind = |r: Result<Cow<'_, str>>| r.err().map(|e| e.kind());
        assert_eq!(
            kind(KeyFormat::Text.encode(b"a\0b", op)),
            Some(ErrorKind::InvalidInput)
        );
        assert_eq!(
            kind(KeyFormat::Text.encode(&[0xff], op)),
            Some(ErrorKind::InvalidInput)
        );
        assert_eq!(
            KeyFormat::Hex.encode(&7u64.to_be_bytes(), op).ok().as_deref(),
            Some("0000000000000007")
        );
    }

    #[test]
    fn successor_bounds_every_string_with_the_prefix() {
        assert_eq!(successor(""), None);
        assert_eq!(successor("scan:").as_deref(), Some("scan;"));
        assert_eq!(successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(successor("\u{10FFFF}"), None);
        assert_eq!(successor("x\u{D7FF}").as_deref(), Some("x\u{E000}"));
        let upper = successor("ab").unwrap_or_default();
        for s in ["ab", "ab\u{10FFFF}\u{10FFFF}", "abzzzz"] {
            assert!(s >= "ab" && s < upper.as_str(), "{s:?}");
        }
        assert!("ac" >= upper.as_str());
    }

    #[test]
    fn scan_ranges() {
        let r = KeyFormat::Text
            .scan_range(b"scan:")
            .unwrap_or_else(|| panic!("a range"));
        assert_eq!(
            (r.lower.as_str(), r.upper.as_deref(), r.exact),
            ("scan:", Some("scan;"), true)
        );
        let r = KeyFormat::Text
            .scan_range(b"")
            .unwrap_or_else(|| panic!("a range"));
        assert_eq!((r.lower.as_str(), r.upper, r.exact), ("", None, true));
        // "é" is C3 A9: a prefix cut after C3 reads the range of "" … and filters.
        let r = KeyFormat::Text
            .scan_range(b"x\xC3")
            .unwrap_or_else(|| panic!("a range"));
        assert_eq!((r.lower.as_str(), r.exact), ("x", false));
        assert_eq!(KeyFormat::Text.scan_range(b"\xff"), None);
        assert_eq!(KeyFormat::Text.scan_range(b"a\0"), None);
        let r = KeyFormat::Hex
            .scan_range(&[0x00, 0xff])
            .unwrap_or_else(|| panic!("a range"));
        assert_eq!((r.lower.as_str(), r.upper.as_deref()), ("00ff", Some("00fg")));
    }
}
