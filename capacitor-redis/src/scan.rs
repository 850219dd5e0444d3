//! The lazy `SCAN` stream behind [`RedisLayer::scan`](crate::RedisLayer).

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;

use capacitor_core::{Codec, Entry, EntryStream, Error, ErrorKind, Operation, Result, StorageKey};
use fred::prelude::{ClientLike, ClusterInterface, Key, Options, Server, Value};
use fred::types::{ClusterHash, CustomCommand};

use crate::core::{fetch_values, value_bytes, Shared};

/// `pattern` with the glob characters of Redis' `MATCH` escaped, then `*`.
pub(crate) fn match_pattern(prefix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() * 2 + 1);
    for &b in prefix {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'*');
    out
}

struct State<K, V, C> {
    shared: Arc<Shared<C>>,
    pattern: Vec<u8>,
    /// The nodes still to scan (`None`: the one server of a non-cluster deployment); the
    /// first is being scanned. Empty until the first page in a cluster.
    nodes: Option<VecDeque<Option<Server>>>,
    cursor: String,
    ready: VecDeque<Result<(K, Entry<V>)>>,
    done: bool,
    _types: PhantomData<fn() -> (K, V)>,
}

pub(crate) fn scan_stream<K, V, C>(shared: Arc<Shared<C>>, prefix: &[u8]) -> EntryStream<K, V>
where
    K: StorageKey,
    V: Send + Sync + 'static,
    C: Codec<V>,
{
    let mut full = shared.prefix.clone();
    full.extend_from_slice(prefix);
    let state = State::<K, V, C> {
        pattern: match_pattern(&full),
        shared,
        nodes: None,
        cursor: "0".to_owned(),
        ready: VecDeque::new(),
        done: false,
        _types: PhantomData,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(item) = st.ready.pop_front() {
                return Some((item, st));
            }
            if st.done {
                return None;
            }
            if let Err(err) = st.next_page().await {
                st.done = true;
                return Some((Err(err), st));
            }
        }
    }))
}

impl<K, V, C> State<K, V, C>
where
    K: StorageKey,
    V: Send + Sync + 'static,
    C: Codec<V>,
{
    async fn next_page(&mut self) -> Result<()> {
        let op = Operation::Scan;
        if self.shared.is_closed() {
            return Err(Error::closed(op));
        }
        let nodes = match self.nodes.as_mut() {
            Some(nodes) => nodes,
            None => {
                let nodes = if self.shared.clustered {
                    let client = self.shared.client(op)?;
                    let state = client.cached_cluster_state().ok_or_else(|| {
                        Error::new(
                            ErrorKind::Unavailable,
                            op,
                            "the cluster's slots are not known yet",
                        )
                    })?;
                    state.unique_primary_nodes().into_iter().map(Some).collect()
                } else {
                    VecDeque::from([None])
                };
                self.nodes.insert(nodes)
            }
        };
        let Some(node) = nodes.front().cloned() else {
            self.done = true;
            return Ok(());
        };
        let args: Vec<Value> = vec![
            Value::from(self.cursor.clone()),
            Value::from("MATCH"),
            Value::from(self.pattern.clone().into_boxed_slice()),
            Value::from("COUNT"),
            Value::from(i64::from(self.shared.scan_count)),
        ];
        let reply: Value = self
            .shared
            .run(op, |c| async move {
                let cmd = CustomCommand::new_static("SCAN", ClusterHash::Random, false);
                match node {
                    Some(server) => {
                        let options = Options {
                            cluster_node: Some(server),
                            ..Options::default()
                        };
                        c.with_options(&options).custom::<Value, Value>(cmd, args).await
                    }
                    None => c.custom::<Value, Value>(cmd, args).await,
                }
            })
            .await?;
        let (cursor, keys) = parse_scan_reply(reply)?;
        if cursor == "0" {
            nodes.pop_front();
            self.cursor = "0".to_owned();
            if nodes.is_empty() {
                self.done = true;
            }
        } else {
            self.cursor = cursor;
        }
        if keys.is_empty() {
            return Ok(());
        }
        let values = fetch_values(&self.shared, op, keys.clone()).await?;
        let now = self.shared.clock.now();
        for (rkey, reply) in keys.iter().zip(values.iter()) {
            let Some(bytes) = value_bytes(reply) else {
                // Deleted or expired since SCAN saw it (skipped), or a key of another
                // Redis type under the prefix (a Decode item, as for a foreign value).
                if let Some(kind) = foreign_type(&self.shared, op, rkey.clone()).await {
                    self.ready.push_back(Err(Error::new(
                        ErrorKind::Decode,
                        op,
                        format!(
                            "a key under the prefix holds a Redis {kind}, not a value written by capacitor"
                        ),
                    )));
                }
                continue;
            };
            let stored = rkey.as_bytes();
            let Some(key_bytes) = stored.strip_prefix(self.shared.prefix.as_slice()) else {
                continue;
            };
            let key = match K::decode_key(key_bytes) {
                Ok(k) => k,
                Err(e) => {
                    self.ready.push_back(Err(e.with_operation(op)));
                    continue;
                }
            };
            match self.shared.decode::<V>(bytes, op) {
                Ok(Some(entry)) if !entry.is_expired(now) => self.ready.push_back(Ok((key, entry))),
                Ok(_) => {}
                Err(e) => self.ready.push_back(Err(e)),
            }
        }
        Ok(())
    }
}

/// The Redis type of `key` when it holds something other than a string (`None` for a
/// string, a missing key, or when `TYPE` fails: the scan goes on).
async fn foreign_type<C>(shared: &Shared<C>, op: Operation, key: Key) -> Option<String> {
    let kind: Value = shared
        .run(op, |c| async move {
            let cmd = CustomCommand::new_static("TYPE", ClusterHash::FirstKey, false);
            c.custom::<Value, Value>(cmd, vec![Value::from(key)]).await
        })
        .await
        .ok()?;
    let kind = kind.as_str()?.into_owned();
    (kind != "none" && kind != "string").then_some(kind)
}

fn parse_scan_reply(reply: Value) -> Result<(String, Vec<Key>)> {
    let bad = || Error::new(ErrorKind::Backend, Operation::Scan, "unexpected SCAN reply");
    let Value::Array(mut parts) = reply else {
        return Err(bad());
    };
    if parts.len() != 2 {
        return Err(bad());
    }
    let keys = parts.pop().ok_or_else(bad)?;
    let cursor = parts.pop().ok_or_else(bad)?;
    let cursor = cursor
        .as_bytes()
        .and_then(|b| std::str::from_utf8(b).ok())
        .map(str::to_owned)
        .ok_or_else(bad)?;
    let keys = match keys {
        Value::Array(keys) => keys
            .into_iter()
            .filter_map(|k| value_bytes(&k).map(Key::from))
            .collect(),
        Value::Null => Vec::new(),
        _ => return Err(bad()),
    };
    Ok((cursor, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(match_pattern(b"a*b?[c]\\"), b"a\\*b\\?\\[c\\]\\\\*".to_vec());
        assert_eq!(match_pattern(b""), b"*".to_vec());
    }
}
