//! The invalidation bus: how several application instances, each with its own in-process
//! L1, keep those L1s coherent over a shared Redis / PostgreSQL.
//!
//! A composer built with an [`InvalidationBus`] sends a [`BusMessage`] for every change it
//! made (a write, a delete, a commit, a drained batch, a clear), never for a fill or a
//! promotion, from a background queue (see
//! [`MultiLayerBuilder::invalidation_bus`](crate::MultiLayerBuilder::invalidation_bus)).
//! Each message names its sender and a sequence number that grows in send order, so that
//! a receiver drops a message it has already applied or one older than what it knows.

use std::sync::Arc;

use async_trait::async_trait;

use crate::codec::StorageKey;
use crate::error::{Error, ErrorKind, Operation, Result};

/// A random id telling instances apart (not cryptographic): composers and bus
/// transports stamp their messages with one, to recognise and skip their own. Never zero.
///
/// ```
/// assert_ne!(capacitor_core::bus_instance_id(), 0);
/// ```
pub fn bus_instance_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish().max(1)
}

/// What a [`BusMessage`] says changed.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<K> {
    /// These keys were written or deleted: drop them from in-process layers.
    Keys(Vec<K>),
    /// Everything may have changed (a `clear`, or the sender lost track of what it could
    /// not send): clear in-process layers.
    Clear,
}

/// One message between instances: who sent it, its place in the sender's order, and what
/// changed.
///
/// # Examples
///
/// ```
/// use capacitor::{BusMessage, Change};
///
/// let message = BusMessage::new(7, 1, Change::Keys(vec!["user:1".to_string()]));
/// let bytes = message.encode();
/// assert_eq!(BusMessage::<String>::decode(&bytes)?, message);
/// # Ok::<(), capacitor::Error>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusMessage<K> {
    /// The sending composer's id (random per composer, so per process start).
    pub sender: u64,
    /// The sender's sequence number: 1 for its first message, +1 for each next one sent.
    pub seq: u64,
    /// What changed.
    pub change: Change<K>,
}

/// First byte of an encoded [`BusMessage`]: the format's version.
const FORMAT: u8 = 1;
const KIND_KEYS: u8 = 0;
const KIND_CLEAR: u8 = 1;

fn malformed(what: &'static str) -> Error {
    Error::new(ErrorKind::Decode, Operation::Subscribe, what)
}

impl<K> BusMessage<K> {
    /// A message from `sender`, `seq`-th in its order.
    pub fn new(sender: u64, seq: u64, change: Change<K>) -> Self {
        BusMessage { sender, seq, change }
    }
}

impl<K: StorageKey> BusMessage<K> {
    /// The bytes a transport sends: a format byte, sender and sequence number
    /// (little-endian `u64`s), the kind, then each key as a `u32` length and its bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        out.push(FORMAT);
        out.extend_from_slice(&self.sender.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        match &self.change {
            Change::Keys(keys) => {
                out.push(KIND_KEYS);
                for key in keys {
                    let bytes = key.encode_key();
                    // Keys longer than 4 GiB cannot be stored by any layer either.
                    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(&bytes[..len as usize]);
                }
            }
            Change::Clear => out.push(KIND_CLEAR),
        }
        out
    }

    /// The message [`encode`](Self::encode) wrote.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Decode`] for bytes that are not such a message (another format, a
    /// truncated message, a key that is not a `K`).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let u64_at = |at: usize| -> Result<u64> {
            bytes
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| malformed("truncated bus message"))
        };
        match bytes.first() {
            Some(&FORMAT) => {}
            _ => return Err(malformed("not a capacitor bus message (unknown format)")),
        }
        let sender = u64_at(1)?;
        let seq = u64_at(9)?;
        let change = match bytes.get(17) {
            Some(&KIND_KEYS) => {
                let mut keys = Vec::new();
                let mut at = 18;
                while at < bytes.len() {
                    let len = bytes
                        .get(at..at + 4)
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_le_bytes)
                        .ok_or_else(|| malformed("truncated bus message"))?
                        as usize;
                    let end = (at + 4)
                        .checked_add(len)
                        .ok_or_else(|| malformed("truncated bus message"))?;
                    let key = bytes
                        .get(at + 4..end)
                        .ok_or_else(|| malformed("truncated bus message"))?;
                    keys.push(K::decode_key(key)?);
                    at = end;
                }
                Change::Keys(keys)
            }
            Some(&KIND_CLEAR) if bytes.len() == 18 => Change::Clear,
            _ => return Err(malformed("bus message of an unknown kind")),
        };
        Ok(BusMessage { sender, seq, change })
    }
}

/// What an [`InvalidationBus`] delivers.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation<K> {
    /// Another instance's message.
    Message(BusMessage<K>),
    /// The subscription (re)started, the first time included: anything cached before may
    /// have changed unseen, so in-process layers are cleared.
    All,
}

/// Where an [`InvalidationBus`] delivers messages.
pub type InvalidationSink<K> = Arc<dyn Fn(Invalidation<K>) + Send + Sync>;

/// A channel between application instances (Redis pub/sub in `capacitor-redis`,
/// PostgreSQL `LISTEN`/`NOTIFY` in `capacitor-postgres`).
///
/// A [`MultiLayer`](crate::MultiLayer) built with
/// [`invalidation_bus`](crate::MultiLayerBuilder::invalidation_bus) sends a message for
/// every change it made (after the change succeeded) from a background queue that keeps
/// what could not be sent and sends it when the bus answers again; on each message from
/// another instance it drops the keys from its in-process layers (those declaring
/// [`Capabilities::sync_ops`](crate::Capabilities::sync_ops)), discarding promotions
/// racing the message.
///
/// A transport must deliver one sender's messages in the order they were published (the
/// composer publishes one at a time): receivers drop a message whose sequence number is
/// not above the last one they applied from its sender.
#[async_trait]
pub trait InvalidationBus<K>: Send + Sync + 'static
where
    K: Send + Sync + 'static,
{
    /// Waits until the bus can both publish and deliver, or fails with a typed error.
    ///
    /// # Errors
    ///
    /// The transport's, typically `Unavailable` naming why, `Closed` after close.
    async fn connect(&self) -> Result<()>;

    /// The largest [`BusMessage::encode`]d message the transport carries (PostgreSQL's
    /// `NOTIFY` takes under 8000 bytes). [`publish`](Self::publish) refuses a larger one
    /// with `InvalidInput`; the composer then splits it, and sends [`Change::Clear`] for
    /// a key too long to announce. Default: no limit.
    fn max_message_bytes(&self) -> usize {
        usize::MAX
    }

    /// Sends `message` to the other instances. While the transport is (re)connecting it
    /// waits, up to its timeout, rather than failing at once.
    ///
    /// # Errors
    ///
    /// The transport's error. The composer counts it and keeps the message to send again.
    async fn publish(&self, message: &BusMessage<K>) -> Result<()>;

    /// Starts delivering the other instances' messages (never this instance's own) to
    /// `sink`: [`Invalidation::All`] as soon as the subscription is up, and again each
    /// time it is re-established (messages may have been missed meanwhile).
    ///
    /// # Errors
    ///
    /// When the subscription cannot be set up at all.
    fn subscribe(&self, sink: InvalidationSink<K>) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_bytes_are_decode_errors() {
        let keys = BusMessage::new(1, 2, Change::Keys(vec!["a".to_string(), String::new()]));
        assert_eq!(BusMessage::<String>::decode(&keys.encode()).ok(), Some(keys));
        let clear = BusMessage::<String>::new(u64::MAX, 9, Change::Clear);
        assert_eq!(BusMessage::<String>::decode(&clear.encode()).ok(), Some(clear));
        let good = BusMessage::new(3, 4, Change::Keys(vec!["key".to_string()])).encode();
        for bad in [&[][..], &[2, 0, 0], &good[..good.len() - 1], &good[..17]] {
            let err = BusMessage::<String>::decode(bad).err().map(|e| e.kind());
            assert_eq!(err, Some(ErrorKind::Decode), "{bad:?}");
        }
    }
}
