//! Codecs over the real server: a deployment that switches codecs keeps reading what is
//! stored (the envelope names the codec of every value), JSON values read as text in
//! `redis-cli`, and a value of a codec the layer does not read is a counted miss that is
//! left in place for the deployment that wrote it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common;

use std::time::Duration;

use crate::common::{raw, unique_prefix, url};
use capacitor_core::{
    envelope, BincodeCodec, Codec, CodecId, Error, ErrorKind, JsonCodec, Layer, LayerConfig, MultiLayer,
    Operation, PostcardCodec, Result,
};
use capacitor_memory::DashMapLayer;
use capacitor_redis::fred::prelude::KeysInterface;
use capacitor_redis::RedisLayer;
use serde::{Deserialize, Serialize};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

async fn layer<C: Codec<User>>(prefix: &str, codec: C) -> RedisLayer<String, User, C> {
    let layer = RedisLayer::builder()
        .url(url())
        .prefix(prefix)
        .codec(codec)
        .build()
        .unwrap();
    layer.connect().await.unwrap();
    layer
}

/// A codec of one's own, which none of the built-in codecs read.
#[derive(Debug)]
struct Reversed;

impl Codec<User> for Reversed {
    fn id(&self) -> CodecId {
        CodecId::custom(9)
    }
    fn encode(&self, value: &User) -> Result<Vec<u8>> {
        Ok(format!("{}:{}", value.id, value.name).bytes().rev().collect())
    }
    fn decode(&self, bytes: &[u8]) -> Result<User> {
        let text: String = bytes.iter().rev().map(|&b| b as char).collect();
        let (id, name) = text
            .split_once(':')
            .ok_or_else(|| Error::new(ErrorKind::Decode, Operation::Get, "no ':'"))?;
        let id = id
            .parse()
            .map_err(|_| Error::new(ErrorKind::Decode, Operation::Get, "bad id"))?;
        Ok(User {
            id,
            name: name.to_owned(),
        })
    }
}

fn ada() -> User {
    User {
        id: 42,
        name: "Ada".into(),
    }
}

#[test]
fn a_deployment_that_switches_codecs_keeps_reading_what_is_stored() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("codec_switch");
        let raw = raw().await;
        let old = layer(&prefix, BincodeCodec).await;
        let json = layer(&prefix, JsonCodec).await;
        let new = layer(&prefix, PostcardCodec).await;
        old.set(&"by-bincode".into(), &ada(), None).await.unwrap();
        json.set(&"by-json".into(), &ada(), None).await.unwrap();
        new.set(&"by-postcard".into(), &ada(), None).await.unwrap();
        for key in ["by-bincode", "by-json", "by-postcard"] {
            for (reader, got) in [
                ("bincode", old.get(&key.into()).await),
                ("json", json.get(&key.into()).await),
                ("postcard", new.get(&key.into()).await),
            ] {
                let got = got.unwrap_or_else(|e| panic!("{reader} reading {key}: {e}"));
                assert_eq!(got.map(|e| e.value), Some(ada()), "{reader} reading {key}");
            }
        }
        // What each wrote, as the server holds it: the envelope names the codec, and JSON
        // reads as text after the 13-byte header (`redis-cli GETRANGE key 13 -1`).
        for (key, codec) in [
            ("by-bincode", CodecId::BINCODE),
            ("by-json", CodecId::JSON),
            ("by-postcard", CodecId::POSTCARD),
        ] {
            let stored: Vec<u8> = raw.get(format!("{prefix}{key}")).await.unwrap();
            assert_eq!(envelope::open(&stored).unwrap().codec, codec, "{key}");
        }
        let text: String = raw
            .getrange(format!("{prefix}by-json"), envelope::HEADER_LEN, 4096)
            .await
            .unwrap();
        assert_eq!(text, r#"{"id":42,"name":"Ada"}"#);
        common::delete_prefix(&raw, &prefix).await;
    });
}

#[test]
fn a_value_of_a_codec_not_read_here_is_a_counted_miss_left_in_place() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("codec_foreign");
        let raw = raw().await;
        let theirs = layer(&prefix, Reversed).await;
        theirs.set(&"k".into(), &ada(), None).await.unwrap();

        let ours = layer(&prefix, PostcardCodec).await;
        let err = ours.get(&"k".into()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(err.to_string().contains("custom codec 9"), "{err}");
        let err = ours.get_many(&["k".into()]).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        let err = ours.exists(&"k".into()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode, "exists agrees with get");
        // Through a composer: a miss, counted, and the value is still there for its writer.
        let cache = MultiLayer::<String, User>::builder()
            .layer(LayerConfig::new("l1", DashMapLayer::new()))
            .layer(LayerConfig::new("redis", ours))
            .build()
            .unwrap();
        assert_eq!(cache.get(&"k".into()).await.unwrap(), None);
        let stats = cache.stats();
        assert_eq!(stats.layers[1].decode_errors, 1, "{stats}");
        let exists: i64 = raw.exists(format!("{prefix}k")).await.unwrap();
        assert_eq!(exists, 1, "a value of another codec is not removed");
        assert_eq!(
            theirs.get(&"k".into()).await.unwrap().map(|e| e.value),
            Some(ada())
        );

        // Bytes that are not a value at all are still removed, as before.
        let _: () = raw
            .set(format!("{prefix}junk"), "not an envelope", None, None, false)
            .await
            .unwrap();
        assert_eq!(cache.get(&"junk".into()).await.unwrap(), None);
        let exists: i64 = raw.exists(format!("{prefix}junk")).await.unwrap();
        assert_eq!(exists, 0);
        cache.close().await.unwrap();
        common::delete_prefix(&raw, &prefix).await;
    });
}
