//! Value codecs, the versioned envelope remote layers store, and key encodings.
//!
//! Remote and persistent layers store `envelope(expiry, codec id, codec(value))`. The
//! envelope names the codec that wrote each value, so a deployment can switch codecs and
//! keep reading what is already stored (the serde codecs read each other's values, when
//! compiled in), and a value no codec here can read is a counted miss that is left in
//! place, never decoded as garbage.
//!
//! | codec | feature | id | why |
//! |---|---|---|---|
//! | [`PostcardCodec`] | always | 1 | the default ([`DefaultCodec`]): compact, a documented stable wire format, maintained |
//! | [`JsonCodec`] | `json` | 2 | human readable in `redis-cli` and `psql` |
//! | `BincodeCodec` | `bincode` | 0 | what earlier versions wrote; RustSec lists bincode as unmaintained (RUSTSEC-2025-0141) |
//!
//! A codec of your own implements [`Codec`] with an id from [`CodecId::custom`].

use std::borrow::Cow;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::entry::{Entry, SharedClock, Timestamp};
use crate::error::{Error, ErrorKind, Operation, Result};

/// The id the envelope records for the codec that wrote a value (7 bits: 0 to 127).
///
/// Ids 0 to 63 are capacitor's ([`BINCODE`](Self::BINCODE), [`POSTCARD`](Self::POSTCARD),
/// [`JSON`](Self::JSON)); 64 to 127 are for codecs of your own ([`custom`](Self::custom)).
///
/// # Examples
///
/// ```
/// use capacitor::CodecId;
///
/// assert_eq!(CodecId::POSTCARD.get(), 1);
/// assert_eq!(CodecId::custom(3).get(), 67);
/// assert_eq!(CodecId::JSON.to_string(), "json");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CodecId(u8);

impl CodecId {
    /// bincode 2, standard configuration: what capacitor wrote before the envelope named
    /// codecs (such values carry no id and read as this one).
    pub const BINCODE: CodecId = CodecId(0);
    /// postcard 1.
    pub const POSTCARD: CodecId = CodecId(1);
    /// JSON (serde_json).
    pub const JSON: CodecId = CodecId(2);
    /// The highest id the envelope can record.
    pub const MAX: u8 = 127;

    /// The id of the `n`-th codec of your own: `64 + n % 64`.
    pub const fn custom(n: u8) -> CodecId {
        CodecId(64 + n % 64)
    }

    /// The id as the envelope stores it.
    pub const fn get(self) -> u8 {
        self.0
    }
}

impl fmt::Display for CodecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CodecId::BINCODE => f.write_str("bincode"),
            CodecId::POSTCARD => f.write_str("postcard"),
            CodecId::JSON => f.write_str("json"),
            CodecId(id) if id >= 64 => write!(f, "custom codec {}", id - 64),
            CodecId(id) => write!(f, "codec {id}"),
        }
    }
}

/// Turns values into bytes and back, under an id the envelope records.
///
/// The envelope tells layers which codec wrote a value; layers call
/// [`decode_from`](Codec::decode_from) with that id, and leave a value in place when
/// [`reads`](Codec::reads) says the codec cannot read its id. So `reads(id)` must be true
/// exactly for the ids `decode_from` decodes: a value the codec claims to read but fails
/// on is removed as corrupt.
///
/// Values written before the envelope named codecs carry no id and read as
/// [`CodecId::BINCODE`]. A codec of your own that wrote values then must read them as its
/// own: return true from `reads` for `CodecId::BINCODE` too and decode them in
/// `decode_from`.
///
/// # Examples
///
/// ```
/// use capacitor::{Codec, CodecId, PostcardCodec};
///
/// let bytes = Codec::<(u32, String)>::encode(&PostcardCodec, &(7, "seven".into()))?;
/// let back: (u32, String) = PostcardCodec.decode(&bytes)?;
/// assert_eq!(back, (7, "seven".to_string()));
/// assert_eq!(Codec::<(u32, String)>::id(&PostcardCodec), CodecId::POSTCARD);
/// # Ok::<(), capacitor::Error>(())
/// ```
pub trait Codec<V>: Send + Sync + fmt::Debug + 'static {
    /// The id stored with every value this codec encodes.
    fn id(&self) -> CodecId;

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

    /// Whether this codec can decode values the codec `id` wrote. The default: its own id
    /// only. The serde codecs read each other's values (those compiled in).
    fn reads(&self, id: CodecId) -> bool {
        id == self.id()
    }

    /// Decodes a payload the envelope says codec `id` wrote. The default decodes its own
    /// id and refuses the others.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`] for another codec's value, or bytes that do not decode.
    fn decode_from(&self, id: CodecId, bytes: &[u8]) -> Result<V> {
        if id == self.id() {
            self.decode(bytes)
        } else {
            Err(foreign_codec(id, self.id()))
        }
    }
}

fn foreign_codec(written: CodecId, reader: CodecId) -> Error {
    Error::new(
        ErrorKind::Decode,
        Operation::Get,
        format!("value was written by {written}, which this layer's codec ({reader}) does not read"),
    )
}

/// The codec layers use unless told otherwise: [`PostcardCodec`].
pub type DefaultCodec = PostcardCodec;

/// Which serde codecs this build has (their features).
fn serde_reads(id: CodecId) -> bool {
    match id {
        CodecId::POSTCARD => true,
        #[cfg(feature = "json")]
        CodecId::JSON => true,
        #[cfg(feature = "bincode")]
        CodecId::BINCODE => true,
        _ => false,
    }
}

/// Decodes `bytes` with the serde codec `id`, if this build has it.
fn serde_decode<V: DeserializeOwned>(id: CodecId, reader: CodecId, bytes: &[u8]) -> Result<V> {
    match id {
        CodecId::POSTCARD => PostcardCodec::decode_bytes(bytes),
        #[cfg(feature = "json")]
        CodecId::JSON => JsonCodec::decode_bytes(bytes),
        #[cfg(feature = "bincode")]
        CodecId::BINCODE => BincodeCodec::decode_bytes(bytes),
        #[cfg(not(feature = "json"))]
        CodecId::JSON => Err(not_built(id, "json", reader)),
        #[cfg(not(feature = "bincode"))]
        CodecId::BINCODE => Err(not_built(id, "bincode", reader)),
        other => Err(foreign_codec(other, reader)),
    }
}

#[cfg(not(all(feature = "json", feature = "bincode")))]
fn not_built(id: CodecId, feature: &str, reader: CodecId) -> Error {
    Error::new(
        ErrorKind::Decode,
        Operation::Get,
        format!(
            "value was written by {id}, which this build does not read (enable capacitor's \
             `{feature}` feature to read it; this layer writes {reader})"
        ),
    )
}

/// Implements [`Codec`] for a serde codec: its own encoding, and decoding of every serde
/// codec compiled in.
macro_rules! serde_codec {
    ($codec:ty, $id:expr) => {
        impl<V> Codec<V> for $codec
        where
            V: Serialize + DeserializeOwned + 'static,
        {
            fn id(&self) -> CodecId {
                $id
            }

            fn encode(&self, value: &V) -> Result<Vec<u8>> {
                let mut out = Vec::new();
                Self::encode_bytes(value, &mut out)?;
                Ok(out)
            }

            fn encode_into(&self, value: &V, out: &mut Vec<u8>) -> Result<()> {
                Self::encode_bytes(value, out)
            }

            fn decode(&self, bytes: &[u8]) -> Result<V> {
                Self::decode_bytes(bytes)
            }

            fn reads(&self, id: CodecId) -> bool {
                serde_reads(id)
            }

            fn decode_from(&self, id: CodecId, bytes: &[u8]) -> Result<V> {
                serde_decode(id, $id, bytes)
            }
        }
    };
}

fn encode_error(codec: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::Encode,
        Operation::Set,
        format!("{codec} encode failed"),
    )
    .with_source(e)
}

fn decode_error(codec: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::Decode,
        Operation::Get,
        format!("{codec} decode failed"),
    )
    .with_source(e)
}

fn trailing_error(codec: &str, left: usize) -> Error {
    Error::new(
        ErrorKind::Decode,
        Operation::Get,
        format!("{codec} decode left {left} trailing bytes"),
    )
}

/// The default codec: [postcard](https://docs.rs/postcard) 1 over serde, a compact
/// varint encoding with a documented wire format that postcard 1.x keeps stable.
///
/// It reads the values of the other serde codecs compiled in (JSON, bincode) too, so a
/// deployment moves to it without losing what is stored.
///
/// # Examples
///
/// ```
/// use capacitor::{Codec, PostcardCodec};
///
/// let bytes = Codec::<(u32, String)>::encode(&PostcardCodec, &(7, "seven".to_string()))?;
/// assert_eq!(bytes, [7, 5, b's', b'e', b'v', b'e', b'n']);
/// let back: (u32, String) = PostcardCodec.decode(&bytes)?;
/// assert_eq!(back, (7, "seven".to_string()));
/// # Ok::<(), capacitor::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct PostcardCodec;

impl PostcardCodec {
    fn encode_bytes<V: Serialize>(value: &V, out: &mut Vec<u8>) -> Result<()> {
        let encoded =
            postcard::to_extend(value, std::mem::take(out)).map_err(|e| encode_error("postcard", e))?;
        *out = encoded;
        Ok(())
    }

    fn decode_bytes<V: DeserializeOwned>(bytes: &[u8]) -> Result<V> {
        let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| decode_error("postcard", e))?;
        if !rest.is_empty() {
            return Err(trailing_error("postcard", rest.len()));
        }
        Ok(value)
    }
}

serde_codec!(PostcardCodec, CodecId::POSTCARD);

/// JSON through serde_json: values read as text in `redis-cli GET` and `psql` (after the
/// envelope's 13-byte header), at the cost of size and speed. Feature `json`.
///
/// # Examples
///
/// ```
/// use capacitor::{Codec, JsonCodec};
///
/// let bytes = Codec::<(u32, String)>::encode(&JsonCodec, &(7, "seven".to_string()))?;
/// assert_eq!(bytes, br#"[7,"seven"]"#);
/// # Ok::<(), capacitor::Error>(())
/// ```
#[cfg(feature = "json")]
#[cfg_attr(docsrs, doc(cfg(feature = "json")))]
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

#[cfg(feature = "json")]
impl JsonCodec {
    fn encode_bytes<V: Serialize>(value: &V, out: &mut Vec<u8>) -> Result<()> {
        serde_json::to_writer(out, value).map_err(|e| encode_error("json", e))
    }

    fn decode_bytes<V: DeserializeOwned>(bytes: &[u8]) -> Result<V> {
        serde_json::from_slice(bytes).map_err(|e| decode_error("json", e))
    }
}

#[cfg(feature = "json")]
serde_codec!(JsonCodec, CodecId::JSON);

/// bincode 2 (standard configuration) over serde: what capacitor wrote before postcard
/// became the default. Feature `bincode`: enable it to keep reading (or writing) such
/// values. RustSec lists bincode as unmaintained (RUSTSEC-2025-0141).
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
#[cfg(feature = "bincode")]
#[cfg_attr(docsrs, doc(cfg(feature = "bincode")))]
#[derive(Debug, Clone, Copy, Default)]
pub struct BincodeCodec;

#[cfg(feature = "bincode")]
impl BincodeCodec {
    fn encode_bytes<V: Serialize>(value: &V, out: &mut Vec<u8>) -> Result<()> {
        bincode::serde::encode_into_std_write(value, out, bincode::config::standard())
            .map(drop)
            .map_err(|e| encode_error("bincode", e))
    }

    fn decode_bytes<V: DeserializeOwned>(bytes: &[u8]) -> Result<V> {
        let (value, read) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
            .map_err(|e| decode_error("bincode", e))?;
        if read != bytes.len() {
            return Err(trailing_error("bincode", bytes.len() - read));
        }
        Ok(value)
    }
}

#[cfg(feature = "bincode")]
serde_codec!(BincodeCodec, CodecId::BINCODE);

/// The envelope remote layers wrap encoded values in: a marker, a format version, flags
/// with the codec's id, the absolute expiry, then the payload.
///
/// Layout (13-byte header): `b"CPC"`, version `u8`, flags `u8` (bit 0: has expiry; bits 1
/// to 7: the [`CodecId`]), expiry as unix milliseconds `u64` little-endian (0 when none),
/// payload. Version 1 is bincode's (codec bits 0), byte for byte what earlier versions
/// wrote; version 2 every other codec, so that a build that predates codec ids refuses
/// those values as an unknown version instead of decoding them as bincode.
///
/// # Examples
///
/// ```
/// use capacitor::{envelope, CodecId, Timestamp};
///
/// let bytes = envelope::wrap(CodecId::POSTCARD, Some(Timestamp::from_millis(42)), b"payload");
/// let (expiry, payload) = envelope::unwrap(&bytes)?;
/// assert_eq!((expiry, payload), (Some(Timestamp::from_millis(42)), &b"payload"[..]));
/// assert_eq!(envelope::open(&bytes)?.codec, CodecId::POSTCARD);
/// assert!(envelope::unwrap(b"not ours").is_err());
/// # Ok::<(), capacitor::Error>(())
/// ```
pub mod envelope {
    use super::*;

    /// Marks bytes written by capacitor.
    pub const MAGIC: &[u8; 3] = b"CPC";
    /// The envelope of bincode values (no codec id; what earlier versions wrote).
    pub const VERSION: u8 = 1;
    /// The envelope that records a codec id in its flags.
    pub const VERSION_CODEC: u8 = 2;
    /// Header length in bytes.
    pub const HEADER_LEN: usize = 13;

    /// An envelope's parts.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Opened<'a> {
        /// When the value expires, if it does.
        pub expires_at: Option<Timestamp>,
        /// The codec that wrote the payload.
        pub codec: CodecId,
        /// The encoded value.
        pub payload: &'a [u8],
    }

    /// Wraps `payload`, written by `codec`, with its expiry.
    pub fn wrap(codec: CodecId, expires_at: Option<Timestamp>, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        header(&mut out, codec, expires_at);
        out.extend_from_slice(payload);
        out
    }

    fn header(out: &mut Vec<u8>, codec: CodecId, expires_at: Option<Timestamp>) {
        out.extend_from_slice(MAGIC);
        out.push(if codec == CodecId::BINCODE {
            VERSION
        } else {
            VERSION_CODEC
        });
        out.push(u8::from(expires_at.is_some()) | (codec.get() << 1));
        out.extend_from_slice(&expires_at.map_or(0, Timestamp::as_millis).to_le_bytes());
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
    /// use capacitor::{envelope, DefaultCodec, ErrorKind, Operation};
    ///
    /// let bytes = envelope::seal(&DefaultCodec::default(), &"hi".to_string(), None, 1024, Operation::Set)?;
    /// assert_eq!(envelope::unwrap(&bytes)?.0, None);
    /// let big = envelope::seal(&DefaultCodec::default(), &"x".repeat(100), None, 10, Operation::Set);
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
        let mut out = Vec::with_capacity(HEADER_LEN + 32);
        header(&mut out, codec.id(), expires_at);
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

    /// Splits an envelope into its expiry, codec and payload.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`] for bytes without the marker, a version this build does not
    /// read, or a truncated header.
    pub fn open(bytes: &[u8]) -> Result<Opened<'_>> {
        let decode_err = |msg: &'static str| Error::new(ErrorKind::Decode, Operation::Get, msg);
        if bytes.len() < HEADER_LEN || !is_ours(bytes) {
            return Err(decode_err(
                "value was not written by capacitor (no envelope marker)",
            ));
        }
        let flags = bytes[4];
        let codec = match bytes[3] {
            VERSION => CodecId::BINCODE,
            VERSION_CODEC => CodecId(flags >> 1),
            _ => return Err(decode_err("unknown envelope version")),
        };
        let mut ms = [0u8; 8];
        ms.copy_from_slice(&bytes[5..HEADER_LEN]);
        let expires_at = match flags & 1 {
            1 => Some(Timestamp::from_millis(u64::from_le_bytes(ms))),
            _ => None,
        };
        Ok(Opened {
            expires_at,
            codec,
            payload: &bytes[HEADER_LEN..],
        })
    }

    /// Splits an envelope into its expiry and payload.
    ///
    /// # Errors
    ///
    /// As [`open`].
    pub fn unwrap(bytes: &[u8]) -> Result<(Option<Timestamp>, &[u8])> {
        open(bytes).map(|o| (o.expires_at, o.payload))
    }

    /// Decodes an opened envelope's payload with `codec`, whichever codec it reads the
    /// envelope names.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`] naming `op`: a codec `codec` does not read, or bytes that do
    /// not decode.
    pub fn decode<V, C: Codec<V> + ?Sized>(codec: &C, opened: &Opened<'_>, op: Operation) -> Result<V> {
        codec
            .decode_from(opened.codec, opened.payload)
            .map_err(|e| e.with_operation(op))
    }

    /// Decodes stored bytes into an entry: `Ok(None)` when the envelope says it expired by
    /// `clock` (read only for entries with an expiry). What a layer that keeps its values
    /// in envelopes returns from a read.
    ///
    /// # Errors
    ///
    /// As [`open`] and [`decode`], naming `op`.
    pub fn open_entry<V, C: Codec<V> + ?Sized>(
        codec: &C,
        bytes: &[u8],
        clock: &SharedClock,
        op: Operation,
    ) -> Result<Option<Entry<V>>> {
        let opened = open(bytes).map_err(|e| e.with_operation(op))?;
        if opened.expires_at.is_some_and(|at| at <= clock.now()) {
            return Ok(None);
        }
        let value = decode(codec, &opened, op)?;
        Ok(Some(Entry::new(value, opened.expires_at)))
    }

    /// Opens an envelope whose codec `codec` reads, without decoding it (what `exists`
    /// needs).
    ///
    /// # Errors
    ///
    /// As [`open`], and [`ErrorKind::Decode`] for a codec `codec` does not read.
    pub fn open_readable<'a, V, C: Codec<V> + ?Sized>(codec: &C, bytes: &'a [u8]) -> Result<Opened<'a>> {
        let opened = open(bytes)?;
        if codec.reads(opened.codec) {
            Ok(opened)
        } else {
            Err(foreign_codec(opened.codec, codec.id()))
        }
    }

    /// Whether `bytes` are capacitor's value that this build cannot read but another may: an
    /// envelope of a codec that `codec` does not read, or a whole header of a later
    /// envelope version. A layer leaves such a value in place (another deployment wrote
    /// it, perhaps a newer one during a rolling upgrade), where it removes bytes that are
    /// not an envelope, are truncated, or do not decode with a codec that reads them.
    pub fn is_foreign<V, C: Codec<V> + ?Sized>(codec: &C, bytes: &[u8]) -> bool {
        match open(bytes) {
            Ok(opened) => !codec.reads(opened.codec),
            Err(_) => bytes.len() >= HEADER_LEN && is_ours(bytes) && bytes[3] > VERSION_CODEC,
        }
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
        let mut v = envelope::wrap(CodecId::POSTCARD, None, b"x");
        v[3] = 9;
        assert!(envelope::unwrap(&v).is_err());
        let ok = envelope::wrap(CodecId::POSTCARD, None, b"");
        assert_eq!(envelope::unwrap(&ok).ok(), Some((None, &b""[..])));
    }

    #[test]
    fn the_envelope_records_the_codec_and_bincode_keeps_the_old_bytes() {
        // What earlier versions wrote for `"hi"` with bincode and an expiry of 42 ms.
        let old = b"CPC\x01\x01\x2a\x00\x00\x00\x00\x00\x00\x00\x02hi";
        let opened = envelope::open(old).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(opened.codec, CodecId::BINCODE);
        assert_eq!(opened.expires_at, Some(Timestamp::from_millis(42)));
        assert_eq!(
            envelope::wrap(CodecId::BINCODE, Some(Timestamp::from_millis(42)), b"\x02hi"),
            old
        );
        for id in [CodecId::POSTCARD, CodecId::JSON, CodecId::custom(63)] {
            let bytes = envelope::wrap(id, None, b"p");
            assert_eq!(bytes[3], envelope::VERSION_CODEC);
            let opened = envelope::open(&bytes).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                (opened.codec, opened.expires_at, opened.payload),
                (id, None, &b"p"[..])
            );
        }
    }

    #[test]
    fn postcard_rejects_garbage_and_trailing_bytes() {
        let r: Result<String> = PostcardCodec.decode(&[0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(r.map_err(|e| e.kind()).err(), Some(ErrorKind::Decode));
        let mut bytes = Codec::<u32>::encode(&PostcardCodec, &5).unwrap_or_default();
        bytes.push(0);
        let r: Result<u32> = PostcardCodec.decode(&bytes);
        assert!(r.is_err());
    }

    #[test]
    fn a_value_of_a_codec_not_read_here_is_a_decode_error_and_foreign() {
        #[derive(Debug)]
        struct Mine;
        impl Codec<u32> for Mine {
            fn id(&self) -> CodecId {
                CodecId::custom(0)
            }
            fn encode(&self, v: &u32) -> Result<Vec<u8>> {
                Ok(v.to_le_bytes().to_vec())
            }
            fn decode(&self, b: &[u8]) -> Result<u32> {
                b.try_into()
                    .map(u32::from_le_bytes)
                    .map_err(|_| Error::new(ErrorKind::Decode, Operation::Get, "not 4 bytes"))
            }
        }
        let mine = envelope::seal(&Mine, &7, None, 64, Operation::Set).unwrap_or_default();
        let opened = envelope::open(&mine).unwrap_or_else(|e| panic!("{e}"));
        let r: Result<u32> = envelope::decode(&PostcardCodec, &opened, Operation::Get);
        let err = r.err().unwrap_or_else(|| panic!("decoded another codec's value"));
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(err.to_string().contains("custom codec 0"), "{err}");
        assert!(envelope::is_foreign::<u32, _>(&PostcardCodec, &mine));
        let ours = envelope::seal(&PostcardCodec, &7u32, None, 64, Operation::Set).unwrap_or_default();
        assert!(envelope::is_foreign(&Mine, &ours));
        assert!(!envelope::is_foreign::<u32, _>(&PostcardCodec, &ours));
        assert!(!envelope::is_foreign::<u32, _>(&PostcardCodec, b"garbage"));
        let mut later = ours.clone();
        later[3] = envelope::VERSION_CODEC + 1;
        assert!(
            envelope::is_foreign::<u32, _>(&PostcardCodec, &later),
            "a later version is kept"
        );
        assert!(!envelope::is_foreign::<u32, _>(
            &PostcardCodec,
            &later[..envelope::HEADER_LEN - 1]
        ));
        assert_eq!(
            envelope::decode(
                &Mine,
                &envelope::open(&mine).unwrap_or_else(|e| panic!("{e}")),
                Operation::Get
            )
            .ok(),
            Some(7)
        );
    }

    // Run by `cargo xtask ci` without features (the rest of CI builds every feature).
    #[cfg(not(feature = "bincode"))]
    #[test]
    fn without_the_bincode_feature_old_values_are_kept_and_the_error_names_it() {
        // What earlier versions wrote for `"hi"`: bincode in envelope version 1.
        let old = b"CPC\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02hi";
        let opened = envelope::open(old).unwrap_or_else(|e| panic!("{e}"));
        let r: Result<String> = envelope::decode(&PostcardCodec, &opened, Operation::Get);
        let err = r
            .err()
            .unwrap_or_else(|| panic!("decoded bincode without the feature"));
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(err.to_string().contains("`bincode` feature"), "{err}");
        assert!(
            envelope::is_foreign::<String, _>(&PostcardCodec, old),
            "kept, not removed"
        );
    }

    #[cfg(all(feature = "json", feature = "bincode"))]
    #[test]
    fn the_serde_codecs_read_each_others_values() {
        let value = (7u32, "seven".to_string(), vec![1u8, 2]);
        let codecs: [&dyn Codec<(u32, String, Vec<u8>)>; 3] = [&PostcardCodec, &JsonCodec, &BincodeCodec];
        for writer in codecs {
            let bytes = envelope::seal(writer, &value, None, 1024, Operation::Set).unwrap_or_default();
            for reader in codecs {
                let opened = envelope::open(&bytes).unwrap_or_else(|e| panic!("{e}"));
                let back =
                    envelope::decode(reader, &opened, Operation::Get).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(back, value, "{writer:?} read by {reader:?}");
            }
        }
    }
}
