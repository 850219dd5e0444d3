//! The tag index of a layer built with `tags(true)`: its two trees, their encoding, and
//! the transactions that keep them in step with the data tree.
//!
//! - tags tree: `tag_len (u16 BE) ++ tag ++ key` → empty. The keys carrying a tag are one
//!   prefix scan.
//! - key-tags tree: `key` → the tags of the key's last write, each `len (u16 BE) ++ tag`.
//!   The source of truth: an entry of the tags tree counts only while the key's key-tags
//!   value names the tag (an entry it does not name is stale, and is dropped when seen).
//!
//! Every write updates the data tree and both tag trees in one sled transaction.

use std::convert::Infallible;

use capacitor_core::{Error, ErrorKind, Operation, Result, MAX_TAGS, MAX_TAG_BYTES};
use sled::transaction::{
    ConflictableTransactionResult, Transactional, TransactionalTree, UnabortableTransactionError,
};
use sled::IVec;

use crate::core::{TagTrees, Trees};
use crate::error::{sled_error, transaction_error};

/// The suffixes of the tag trees' names, after the data tree's name.
pub(crate) const TAGS_TREE_SUFFIX: &[u8] = b"\0tags";
pub(crate) const KEY_TAGS_TREE_SUFFIX: &[u8] = b"\0key-tags";

/// Tag entries one `remove_by_tag` transaction handles at most; a tag on more keys is
/// removed in several transactions.
pub(crate) const REMOVE_BATCH: usize = 1_000;
/// Keys one `clear` transaction removes at most.
const CLEAR_BATCH: usize = 256;

/// What a transaction body returns.
pub(crate) type TxResult<R> = ConflictableTransactionResult<R, Infallible>;

/// The validated, deduplicated tags of one write, and their key-tags encoding.
pub(crate) struct TagSet<'a> {
    tags: Vec<&'a str>,
    encoded: IVec,
}

impl<'a> TagSet<'a> {
    /// Checks `tags` as the composer does: at most [`MAX_TAGS`], each 1 to
    /// [`MAX_TAG_BYTES`] bytes; repeats count once.
    pub(crate) fn new(tags: &'a [String], op: Operation) -> Result<Self> {
        let mut unique: Vec<&str> = Vec::with_capacity(tags.len());
        for tag in tags {
            if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    op,
                    format!(
                        "a tag must be 1 to {MAX_TAG_BYTES} bytes long (got {})",
                        tag.len()
                    ),
                ));
            }
            if !unique.contains(&tag.as_str()) {
                unique.push(tag);
            }
        }
        if unique.len() > MAX_TAGS {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                op,
                format!("at most {MAX_TAGS} tags per write (got {})", unique.len()),
            ));
        }
        let mut encoded = Vec::with_capacity(unique.iter().map(|t| t.len() + 2).sum());
        for tag in &unique {
            push_prefixed(&mut encoded, tag.as_bytes());
        }
        Ok(TagSet {
            tags: unique,
            encoded: IVec::from(encoded),
        })
    }
}

/// Appends `len (u16 BE) ++ bytes`; `bytes` is at most [`MAX_TAG_BYTES`] long.
fn push_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

/// The prefix of `tag`'s entries in the tags tree.
pub(crate) fn tag_prefix(tag: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tag.len() + 2);
    push_prefixed(&mut out, tag);
    out
}

/// The tags tree's entry for `key` carrying `tag`.
fn tag_entry(tag: &[u8], key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tag.len() + 2 + key.len());
    push_prefixed(&mut out, tag);
    out.extend_from_slice(key);
    out
}

/// The tags in a key-tags value. Lenient: stops at bytes that are not a whole
/// length-prefixed tag (a damaged value), so what precedes them is still untagged.
fn decode_tags(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (len, rest) = bytes.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_be_bytes(*len));
        if rest.len() < len {
            return None;
        }
        let (tag, rest) = rest.split_at(len);
        bytes = rest;
        Some(tag)
    })
}

/// The key of a tags-tree entry (`None` for bytes that are not one).
fn entry_key(entry: &[u8]) -> Option<&[u8]> {
    let (len, rest) = entry.split_first_chunk::<2>()?;
    rest.get(usize::from(u16::from_be_bytes(*len))..)
}

/// The tag trees inside a transaction.
pub(crate) struct TagTx<'a> {
    tags: &'a TransactionalTree,
    key_tags: &'a TransactionalTree,
}

impl TagTx<'_> {
    /// Drops every tag of `key`: one read when it has none.
    pub(crate) fn untag(&self, key: &[u8]) -> Result<(), UnabortableTransactionError> {
        if let Some(old) = self.key_tags.get(key)? {
            self.untag_known(key, &old)?;
        }
        Ok(())
    }

    /// Drops `key`'s tags, `old` being its key-tags value.
    fn untag_known(&self, key: &[u8], old: &[u8]) -> Result<(), UnabortableTransactionError> {
        self.key_tags.remove(key)?;
        for tag in decode_tags(old) {
            self.tags.remove(tag_entry(tag, key))?;
        }
        Ok(())
    }

    /// Gives `key` exactly the tags of `set`.
    pub(crate) fn retag(&self, key: &[u8], set: &TagSet<'_>) -> Result<(), UnabortableTransactionError> {
        self.untag(key)?;
        if set.tags.is_empty() {
            return Ok(());
        }
        for tag in &set.tags {
            self.tags
                .insert(tag_entry(tag.as_bytes(), key), IVec::default())?;
        }
        self.key_tags.insert(key, set.encoded.clone())?;
        Ok(())
    }
}

/// Runs `body` in one sled transaction over the data tree and both tag trees. `body` may
/// run more than once (sled retries on conflict).
pub(crate) fn transaction<R>(
    data: &sled::Tree,
    tag_trees: &TagTrees,
    op: Operation,
    body: impl Fn(&TransactionalTree, &TagTx<'_>) -> TxResult<R>,
) -> Result<R> {
    (data, &tag_trees.tags, &tag_trees.key_tags)
        .transaction(|(d, tags, key_tags)| body(d, &TagTx { tags, key_tags }))
        .map_err(|e| transaction_error(op, e))
}

/// Removes `key` if it still holds `bytes` (an entry found expired or undecodable),
/// untagging it in the same transaction when tags are on; a write that replaced it
/// meanwhile stays. `true` when removed.
pub(crate) fn remove_if_unchanged(trees: &Trees, key: &[u8], bytes: &IVec, op: Operation) -> Result<bool> {
    match &trees.tags {
        None => trees
            .data
            .compare_and_swap(key, Some(bytes), None::<&[u8]>)
            .map(|swapped| swapped.is_ok())
            .map_err(|e| sled_error(op, e)),
        Some(tag_trees) => transaction(&trees.data, tag_trees, op, |d, tx| {
            if d.get(key)?.as_ref() != Some(bytes) {
                return Ok(false);
            }
            d.remove(key)?;
            tx.untag(key)?;
            Ok(true)
        }),
    }
}

/// Removes up to [`REMOVE_BATCH`] of the entries carrying `tag`, with all their tags, in
/// one transaction: the keys removed, `None` when the tag has no entries left.
pub(crate) fn remove_tag_batch(
    data: &sled::Tree,
    tag_trees: &TagTrees,
    tag: &[u8],
    op: Operation,
) -> Result<Option<Vec<IVec>>> {
    let prefix = tag_prefix(tag);
    let entries = tag_trees
        .tags
        .scan_prefix(&prefix)
        .keys()
        .take(REMOVE_BATCH)
        .collect::<std::result::Result<Vec<IVec>, _>>()
        .map_err(|e| sled_error(op, e))?;
    if entries.is_empty() {
        return Ok(None);
    }
    let removed = transaction(data, tag_trees, op, |d, tx| {
        let mut removed = Vec::with_capacity(entries.len());
        for entry in &entries {
            let key = &entry[prefix.len()..];
            match tx.key_tags.get(key)? {
                Some(tags) if decode_tags(&tags).any(|t| t == tag) => {
                    d.remove(key)?;
                    tx.untag_known(key, &tags)?;
                    removed.push(IVec::from(key));
                }
                // Stale: the key's last write did not carry the tag.
                _ => {
                    tx.tags.remove(entry)?;
                }
            }
        }
        Ok(removed)
    })?;
    Ok(Some(removed))
}

/// Removes every entry and every tag, in transactions of [`CLEAR_BATCH`] keys: the data
/// tree's keys, then the keys left in the key-tags tree, then what is left in the tags
/// tree. Each transaction removes a key's value and its tags together, so a write racing
/// the clear either survives whole or goes whole.
pub(crate) fn clear(trees: &Trees, tag_trees: &TagTrees, op: Operation) -> Result<()> {
    let first_keys = |tree: &sled::Tree| {
        tree.iter()
            .keys()
            .take(CLEAR_BATCH)
            .collect::<std::result::Result<Vec<IVec>, _>>()
            .map_err(|e| sled_error(op, e))
    };
    for source in [&trees.data, &tag_trees.key_tags] {
        loop {
            let keys = first_keys(source)?;
            if keys.is_empty() {
                break;
            }
            transaction(&trees.data, tag_trees, op, |d, tx| {
                for key in &keys {
                    d.remove(key)?;
                    tx.untag(key)?;
                    // A key-tags value that names nothing would otherwise stay.
                    tx.key_tags.remove(key)?;
                }
                Ok(())
            })?;
        }
    }
    loop {
        let entries = first_keys(&tag_trees.tags)?;
        if entries.is_empty() {
            return Ok(());
        }
        transaction(&trees.data, tag_trees, op, |d, tx| {
            for entry in &entries {
                if let Some(key) = entry_key(entry) {
                    d.remove(key)?;
                    tx.untag(key)?;
                }
                tx.tags.remove(entry)?;
            }
            Ok(())
        })?;
    }
}

/// The name of a tag tree of the data tree `data_name`.
pub(crate) fn tree_name(data_name: &[u8], suffix: &[u8]) -> Vec<u8> {
    [data_name, suffix].concat()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn encodings_round_trip_and_damage_is_tolerated() {
        let tags = vec!["red".to_owned(), "big".to_owned(), "red".to_owned()];
        let set = TagSet::new(&tags, Operation::Set).unwrap();
        let decoded: Vec<&[u8]> = decode_tags(&set.encoded).collect();
        assert_eq!(decoded, vec![&b"red"[..], &b"big"[..]]);
        let truncated = &set.encoded[..set.encoded.len() - 1];
        assert_eq!(decode_tags(truncated).count(), 1);
        assert_eq!(decode_tags(&[0xff]).count(), 0);
        let entry = tag_entry(b"red", b"k:1");
        assert!(entry.starts_with(&tag_prefix(b"red")));
        assert_eq!(entry_key(&entry), Some(&b"k:1"[..]));
        assert_eq!(entry_key(&[0, 9, 1]), None);
        // "re" is not a prefix of "red"'s entries: the length comes first.
        assert!(!entry.starts_with(&tag_prefix(b"re")));
    }

    #[test]
    fn invalid_tags_are_refused() {
        let empty = vec![String::new()];
        assert_eq!(
            TagSet::new(&empty, Operation::Set).err().map(|e| e.kind()),
            Some(ErrorKind::InvalidInput)
        );
        let long = vec!["x".repeat(MAX_TAG_BYTES + 1)];
        assert!(TagSet::new(&long, Operation::Set).is_err());
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| i.to_string()).collect();
        assert!(TagSet::new(&many, Operation::Set).is_err());
    }
}
