//! Value codecs, the versioned envelope remote layers store, and key encodings.
//!
//! Remote and persistent layers store `envelope(expiry, codec(value))`. The codec is
//! pluggable: [`BincodeCodec`] is the default (bincode 2 through serde). bincode is listed
//! as unmaintained by RustSec (RUSTSEC-2025-0141), which is one more reason to keep
//! [`Codec`] a trait a user can replace (JSON, postcard, protobuf) without touching layers.

use std::borrow::Cow;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::entry::Timestamp;
use crate::error::{Error, ErrorKind, Operation, Result};

/// Turns values into bytes and back.
///
/// # Examples
///
/// ```
/// use capacitor::{BincodeCodec, Codec};
///
/// let bytes = Codec::<(u32, String)>::encode(&BincodeCodec, &(7, "seven".into()))?;
/// let back: (u32, String) = BincodeCodec.decode(&bytes)?;
/// assert_eq!(back, (7, "seven".to_string()));
/// # Ok::<(), capacitor::Error>(())
/// ```
pub trait Codec<V>: Send + Sync + fmt::Debug + 'static {
    /// Encodes `value`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Encode`] when the value cannot be represented.
    fn encode(&self, value: &V) -> Result<Vec<u8>>;

    /// Appends the encoding of `value` to `out` (what [`envelope::seal`] uses, to encode
    /// straight behind the envelope header). The default encodes, then copies.
    ///
    /// # Errors
    ///
    /// As [`encode`](Codec::encode).
    fn encode_into(&self, value: &V, out: &mut Vec<u8>) -> Result<()> {
        out.extend_from_slice(&self.encode(value)?);
        Ok(())
    }

    /// Decodes bytes written by [`encode`](Codec::encode).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`] for bytes that are not a valid encoding of `V`.
    fn decode(&self, bytes: &[u8]) -> Result<V>;
}

/// The default codec: bincode 2 (standard configuration) over serde.
///
/// # Examples
///
/// ```
/// use capacitor::{BincodeCodec, Codec};
///
/// let bytes = Codec::<(u32, String)>::encode(&BincodeCodec, &(7, "seven".to_string()))?;
/// let back: (u32, String) = BincodeCodec.decode(&bytes)?;
/// assert_eq!(back, (7, "seven".to_string()));
/// # Ok::<(), capacitor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct BincodeCodec;

impl<V> Codec<V> for BincodeCodec
where
    V: Serialize + DeserializeOwned + 'static,
{
    fn encode(&self, value: &V) -> Result<Vec<u8>> {
        bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| {
            Error::new(ErrorKind::Encode, Operation::Set, "bincode encode failed").with_source(e)
        })
    }

    fn encode_into(&self, value: &V, out: &mut Vec<u8>) -> Result<()> {
        bincode::serde::encode_into_std_write(value, out, bincode::config::standard())
            .map(drop)
            .map_err(|e| {
                Error::new(ErrorKind::Encode, Operation::Set, "bincode encode failed").with_source(e)
            })
    }

    fn decode(&self, bytes: &[u8]) -> Result<V> {
        let (value, read) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map_err(|e| {
                Error::new(ErrorKind::Decode, Operation::Get, "bincode decode failed").with_source(e)
            })?;
        if read != bytes.len() {
            return Err(Error::new(
                ErrorKind::Decode,
                Operation::Get,
                format!("bincode decode left {} trailing bytes", bytes.len() - read),
            ));
        }
        Ok(value)
    }
}

/// The envelope remote layers wrap encoded values in: a marker, a format version, the
/// absolute expiry, then the payload.
///
/// Layout (13-byte header): `b"CPC"`, version `1u8`, flags `u8` (bit 0: has expiry),
/// expiry as unix milliseconds `u64` little-endian (0 when none), payload.
///
/// # Examples
///
/// ```
/// use capacitor::{envelope, Timestamp};
///
/// let bytes = envelope::wrap(Some(Timestamp::from_millis(42)), b"payload");
/// let (expiry, payload) = envelope::unwrap(&bytes)?;
/// assert_eq!((expiry, payload), (Some(Timestamp::from_millis(42)), &b"payload"[..]));
/// assert!(envelope::unwrap(b"not ours").is_err());
/// # Ok::<(), capacitor::Error>(())
/// ```
pub mod envelope {
    use super::*;

    /// Marks bytes written by capacitor.
    pub const MAGIC: &[u8; 3] = b"CPC";
    /// The current envelope format.
    pub const VERSION: u8 = 1;
    /// Header length in bytes.
    pub const HEADER_LEN: usize = 13;

    /// Wraps `payload` with its expiry.
    pub fn wrap(expires_at: Option<Timestamp>, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(u8::from(expires_at.is_some()));
        out.extend_from_slice(&expires_at.map_or(0, Timestamp::as_millis).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Encodes `value` with `codec` straight into an envelope with its expiry, refusing it
    /// with [`ErrorKind::ValueTooLarge`] when the encoded value is over `max_value_bytes`
    /// (before anything is sent anywhere). What every remote or persistent layer stores.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Encode`] from the codec, [`ErrorKind::ValueTooLarge`]; both name `op`.
    ///
    /// # Examples
    ///
    /// ```
    /// use capacitor::{envelope, BincodeCodec, ErrorKind, Operation};
    ///
    /// let bytes = envelope::seal(&BincodeCodec, &"hi".to_string(), None, 1024, Operation::Set)?;
    /// assert_eq!(envelope::unwrap(&bytes)?.0, None);
    /// let big = envelope::seal(&BincodeCodec, &"x".repeat(100), None, 10, Operation::Set);
    /// assert_eq!(big.map_err(|e| e.kind()).err(), Some(ErrorKind::ValueTooLarge));
    /// # Ok::<(), capacitor::Error>(())
    /// ```
    pub fn seal<V, C: Codec<V> + ?Sized>(
        codec: &C,
        value: &V,
        expires_at: Option<Timestamp>,
        max_value_bytes: usize,
        op: Operation,
    ) -> Result<Vec<u8>> {
        let mut out = wrap(expires_at, &[]);
        codec
            .encode_into(value, &mut out)
            .map_err(|e| e.with_operation(op))?;
        let size = out.len() - HEADER_LEN;
        if size > max_value_bytes {
            return Err(Error::new(
                ErrorKind::ValueTooLarge,
                op,
                format!("encoded value is {size} bytes, more than max_value_bytes ({max_value_bytes})"),
            ));
        }
        Ok(out)
    }

    /// Whether `bytes` start with capacitor's marker (of any version).
    pub fn is_ours(bytes: &[u8]) -> bool {
        bytes.starts_with(MAGIC)
    }

    /// Splits an envelope into its expiry and payload.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`] for bytes without the marker, a version this build does not
    /// read, or a truncated header.
    pub fn unwrap(bytes: &[u8]) -> Result<(Option<Timestamp>, &[u8])> {
        let decode_err = |msg: &'static str| Error::new(ErrorKind::Decode, Operation::Get, msg);
        if bytes.len() < HEADER_LEN || !is_ours(bytes) {
            return Err(decode_err(
                "value was not written by capacitor (no envelope marker)",
            ));
        }
        if bytes[3] != VERSION {
            return Err(decode_err("unknown envelope version"));
        }
        let mut ms = [0u8; 8];
        ms.copy_from_slice(&bytes[5..HEADER_LEN]);
        let expiry = match bytes[4] & 1 {
            1 => Some(Timestamp::from_millis(u64::from_le_bytes(ms))),
            _ => None,
        };
        Ok((expiry, &bytes[HEADER_LEN..]))
    }
}

/// A key type that remote and persistent layers can store and give back (scan).
///
/// Strings are stored as their UTF-8 bytes, so they read naturally on the server
/// (`redis-cli GET app:user:42`); integers big-endian so that byte order is numeric order
/// for unsigned types.
///
/// # Examples
///
/// ```
/// use capacitor::StorageKey;
///
/// assert_eq!(&*"user:42".to_string().encode_key(), b"user:42");
/// assert_eq!(u64::decode_key(&7u64.encode_key())?, 7);
/// assert!(String::decode_key(&[0xff]).is_err());
/// # Ok::<(), capacitor::Error>(())
/// ```
pub trait StorageKey: Sized + Send + Sync + 'static {
    /// The stored bytes of the key.
    fn encode_key(&self) -> Cow<'_, [u8]>;

    /// The key from its stored bytes.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`] when the bytes are not a key of this type.
    fn decode_key(bytes: &[u8]) -> Result<Self>;
}

fn key_decode_error(what: &'static str) -> Error {
    Error::new(ErrorKind::Decode, Operation::Scan, what)
}

impl StorageKey for String {
    fn encode_key(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.as_bytes())
    }
    fn decode_key(bytes: &[u8]) -> Result<Self> {
        String::from_utf8(bytes.to_vec()).map_err(|_| key_decode_error("stored key is not UTF-8"))
    }
}

impl StorageKey for Vec<u8> {
    fn encode_key(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self)
    }
    fn decode_key(bytes: &[u8]) -> Result<Self> {
        Ok(bytes.to_vec())
    }
}

macro_rules! int_key {
    ($($t:ty),*) => {$(
        impl StorageKey for $t {
            fn encode_key(&self) -> Cow<'_, [u8]> {
                Cow::Owned(self.to_be_bytes().to_vec())
            }
            fn decode_key(bytes: &[u8]) -> Result<Self> {
                let arr = bytes
                    .try_into()
                    .map_err(|_| key_decode_error(concat!("stored key is not a ", stringify!($t))))?;
                Ok(<$t>::from_be_bytes(arr))
            }
        }
    )*};
}
int_key!(u32, u64, u128, i32, i64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_rejects_foreign_and_truncated_bytes() {
        assert_eq!(
            envelope::unwrap(b"").map_err(|e| e.kind()).err(),
            Some(ErrorKind::Decode)
        );
        assert!(envelope::unwrap(b"CPC\x01\x00short").is_err());
        let mut v = envelope::wrap(None, b"x");
        v[3] = 9;
        assert!(envelope::unwrap(&v).is_err());
        let ok = envelope::wrap(None, b"");
        assert_eq!(envelope::unwrap(&ok).ok(), Some((None, &b""[..])));
    }

    #[test]
    fn bincode_rejects_garbage_and_trailing_bytes() {
        let r: Result<String> = BincodeCodec.decode(&[0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(r.map_err(|e| e.kind()).err(), Some(ErrorKind::Decode));
        let mut bytes = Codec::<u32>::encode(&BincodeCodec, &5).unwrap_or_default();
        bytes.push(0);
        let r: Result<u32> = BincodeCodec.decode(&bytes);
        assert!(r.is_err());
    }
}
