//! The tag index of a layer built with `tags(true)`: its two tables, their encoding, and
//! the operations that keep them in step with the data table, inside the write
//! transaction of the value.
//!
//! - tags table: `tag_len (u16 BE) ++ tag ++ key` → empty. The keys carrying a tag are
//!   one prefix range.
//! - key-tags table: `key` → the tags of the key's last write, each `len (u16 BE) ++ tag`.
//!   The source of truth: an entry of the tags table counts only while the key's key-tags
//!   value names the tag (an entry it does not name is stale, and is dropped when seen).

use std::ops::Bound;

use capacitor_core::{Error, ErrorKind, Operation, Result, MAX_TAGS, MAX_TAG_BYTES};
use redb::ReadableTable;

use crate::core::{open_tables, table, Names, Store, Tables, TagNames, TagTables};
use crate::error::redb_error;

/// The suffixes of the tag tables' names, after the data table's name.
pub(crate) const TAGS_TABLE_SUFFIX: &str = "\0tags";
pub(crate) const KEY_TAGS_TABLE_SUFFIX: &str = "\0key-tags";

/// Tag entries one `remove_by_tag` transaction handles at most; a tag on more keys is
/// removed in several transactions.
pub(crate) const REMOVE_BATCH: usize = 1_000;

/// The names of the tag tables of the data table `data`.
pub(crate) fn names(data: &str) -> TagNames {
    TagNames {
        tags: format!("{data}{TAGS_TABLE_SUFFIX}"),
        key_tags: format!("{data}{KEY_TAGS_TABLE_SUFFIX}"),
    }
}

/// The validated, deduplicated tags of one write, and their key-tags encoding.
pub(crate) struct TagSet {
    tags: Vec<String>,
    encoded: Vec<u8>,
}

impl TagSet {
    /// Checks `tags` as the composer does: at most [`MAX_TAGS`], each 1 to
    /// [`MAX_TAG_BYTES`] bytes; repeats count once.
    pub(crate) fn new(tags: &[String], op: Operation) -> Result<Self> {
        let mut unique: Vec<String> = Vec::with_capacity(tags.len());
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
            if !unique.contains(tag) {
                unique.push(tag.clone());
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
            encoded,
        })
    }
}

/// Appends `len (u16 BE) ++ bytes`; `bytes` is at most [`MAX_TAG_BYTES`] long.
fn push_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

/// The prefix of `tag`'s entries in the tags table.
pub(crate) fn tag_prefix(tag: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tag.len() + 2);
    push_prefixed(&mut out, tag);
    out
}

/// The tags table's entry for `key` carrying `tag`.
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

impl TagTables<'_> {
    /// Drops every tag of `key`: one lookup when it has none.
    pub(crate) fn untag(&mut self, key: &[u8], op: Operation) -> Result<()> {
        let old = self
            .key_tags
            .remove(key)
            .map_err(|e| redb_error(op, e))?
            .map(|g| g.value().to_vec());
        if let Some(old) = old {
            for tag in decode_tags(&old) {
                self.tags
                    .remove(tag_entry(tag, key).as_slice())
                    .map_err(|e| redb_error(op, e))?;
            }
        }
        Ok(())
    }

    /// Gives `key` exactly the tags of `set`.
    pub(crate) fn retag(&mut self, key: &[u8], set: &TagSet, op: Operation) -> Result<()> {
        self.untag(key, op)?;
        if set.tags.is_empty() {
            return Ok(());
        }
        for tag in &set.tags {
            self.tags
                .insert(tag_entry(tag.as_bytes(), key).as_slice(), &[][..])
                .map_err(|e| redb_error(op, e))?;
        }
        self.key_tags
            .insert(key, set.encoded.as_slice())
            .map_err(|e| redb_error(op, e))?;
        Ok(())
    }
}

impl Tables<'_> {
    /// Drops `key`'s tags, when tags are on.
    pub(crate) fn untag(&mut self, key: &[u8], op: Operation) -> Result<()> {
        match &mut self.tags {
            Some(tags) => tags.untag(key, op),
            None => Ok(()),
        }
    }

    /// Writes `key` → `bytes`, dropping the key's tags.
    pub(crate) fn put(&mut self, key: &[u8], bytes: &[u8], op: Operation) -> Result<()> {
        self.untag(key, op)?;
        self.data.insert(key, bytes).map_err(|e| redb_error(op, e))?;
        Ok(())
    }

    /// Removes `key` and its tags; the bytes it held.
    pub(crate) fn take(&mut self, key: &[u8], op: Operation) -> Result<Option<Vec<u8>>> {
        self.untag(key, op)?;
        let old = self
            .data
            .remove(key)
            .map_err(|e| redb_error(op, e))?
            .map(|g| g.value().to_vec());
        Ok(old)
    }

    /// Removes `key` (and its tags) if it still holds `bytes`; `true` when removed.
    pub(crate) fn remove_if_unchanged(&mut self, key: &[u8], bytes: &[u8], op: Operation) -> Result<bool> {
        let same = self
            .data
            .get(key)
            .map_err(|e| redb_error(op, e))?
            .is_some_and(|g| g.value() == bytes);
        if same {
            self.take(key, op)?;
        }
        Ok(same)
    }
}

/// Removes `key` if it still holds `bytes` (an entry found expired or undecodable),
/// untagging it in the same transaction when tags are on; a write that replaced it
/// meanwhile stays. The commit is not made durable by itself (redb's `None` level): an
/// entry a crash brings back is found expired or undecodable again.
pub(crate) fn remove_if_unchanged(store: &Store, key: &[u8], bytes: &[u8], op: Operation) -> Result<bool> {
    store.write_at(op, redb::Durability::None, |t| {
        t.remove_if_unchanged(key, bytes, op)
    })
}

/// Removes up to [`REMOVE_BATCH`] of the entries carrying `tag`, with all their tags, in
/// one transaction: the keys removed, `None` when the tag has no entries left.
pub(crate) fn remove_tag_batch(store: &Store, tag: &[u8], op: Operation) -> Result<Option<Vec<Vec<u8>>>> {
    let prefix = tag_prefix(tag);
    store.write(op, |t| {
        let Some(tags) = &mut t.tags else {
            return Ok(None);
        };
        let mut entries = Vec::new();
        {
            let range = tags
                .tags
                .range::<&[u8]>((Bound::Included(prefix.as_slice()), Bound::Unbounded))
                .map_err(|e| redb_error(op, e))?;
            for item in range {
                let (entry, _) = item.map_err(|e| redb_error(op, e))?;
                let entry = entry.value();
                if !entry.starts_with(&prefix) || entries.len() >= REMOVE_BATCH {
                    break;
                }
                entries.push(entry.to_vec());
            }
        }
        if entries.is_empty() {
            return Ok(None);
        }
        let mut removed = Vec::with_capacity(entries.len());
        for entry in &entries {
            let key = &entry[prefix.len()..];
            let names_tag = tags
                .key_tags
                .get(key)
                .map_err(|e| redb_error(op, e))?
                .is_some_and(|g| decode_tags(g.value()).any(|t| t == tag));
            if names_tag {
                t.data.remove(key).map_err(|e| redb_error(op, e))?;
                tags.untag(key, op)?;
                removed.push(key.to_vec());
            } else {
                // Stale: the key's last write did not carry the tag.
                tags.tags
                    .remove(entry.as_slice())
                    .map_err(|e| redb_error(op, e))?;
            }
        }
        Ok(Some(removed))
    })
}

/// Removes every entry of the layer's tables (its tag index included, bytes that are not
/// capacitor's included) in one transaction: each table is deleted and created again
/// empty. A write racing the clear is either before it (and removed) or after it (and
/// kept), whole.
pub(crate) fn clear(store: &Store, names: &Names, op: Operation) -> Result<()> {
    let level = store.durability.commit_level();
    store.write_txn(op, level, |txn| {
        let mut all = vec![names.data.as_str()];
        if let Some(t) = &names.tags {
            all.extend([t.tags.as_str(), t.key_tags.as_str()]);
        }
        for name in all {
            txn.delete_table(table(name)).map_err(|e| redb_error(op, e))?;
        }
        open_tables(txn, names, op).map(drop)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn entry_key(entry: &[u8]) -> Option<&[u8]> {
        let (len, rest) = entry.split_first_chunk::<2>()?;
        rest.get(usize::from(u16::from_be_bytes(*len))..)
    }

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

    #[test]
    fn tag_tables_are_named_after_the_data_table() {
        let n = names("sessions");
        assert_eq!(n.tags, "sessions\0tags");
        assert_eq!(n.key_tags, "sessions\0key-tags");
    }
}
