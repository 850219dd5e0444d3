//! Codecs over the real server: values written by bincode, JSON and postcard read back
//! through a layer of any of them (the envelope names each value's codec), JSON values
//! read as text in `psql`, and a value of a codec the layer does not read is a counted
//! miss that stays in the table for the deployment that wrote it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common::{admin, unique_table, url, TableGuard};
use capacitor_core::{
    envelope, BincodeCodec, Codec, CodecId, Error, ErrorKind, JsonCodec, Layer, LayerConfig, MultiLayer,
    Operation, PostcardCodec, Result,
};
use capacitor_memory::DashMapLayer;
use capacitor_postgres::PostgresLayer;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

fn ada() -> User {
    User {
        id: 42,
        name: "Ada".into(),
    }
}

async fn layer<C: Codec<User>>(table: &str, codec: C) -> PostgresLayer<String, User, C> {
    PostgresLayer::builder()
        .url(url())
        .table(table)
        .codec(codec)
        .build()
        .await
        .expect("PostgreSQL layer")
}

/// A codec of one's own, which none of the built-in codecs read.
#[derive(Debug)]
struct Tagged;

impl Codec<User> for Tagged {
    fn id(&self) -> CodecId {
        CodecId::custom(5)
    }
    fn encode(&self, value: &User) -> Result<Vec<u8>> {
        Ok(format!("{}|{}", value.id, value.name).into_bytes())
    }
    fn decode(&self, bytes: &[u8]) -> Result<User> {
        let bad = || Error::new(ErrorKind::Decode, Operation::Get, "not id|name");
        let text = std::str::from_utf8(bytes).map_err(|_| bad())?;
        let (id, name) = text.split_once('|').ok_or_else(bad)?;
        Ok(User {
            id: id.parse().map_err(|_| bad())?,
            name: name.to_owned(),
        })
    }
}

#[tokio::test]
async fn a_deployment_that_switches_codecs_keeps_reading_what_is_stored() {
    let table = unique_table("codec_switch");
    let _guard = TableGuard(table.clone());
    let old = layer(&table, BincodeCodec).await;
    let json = layer(&table, JsonCodec).await;
    let new = layer(&table, PostcardCodec).await;
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
    // In psql: the JSON after the envelope's 13-byte header.
    let row = admin()
        .await
        .query_one(
            &format!(
                "SELECT convert_from(substring(value from {}), 'UTF8') FROM \"{table}\" WHERE key = 'by-json'",
                envelope::HEADER_LEN + 1
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), r#"{"id":42,"name":"Ada"}"#);
    new.close().await.unwrap();
}

#[tokio::test]
async fn a_value_of_a_codec_not_read_here_is_a_counted_miss_left_in_place() {
    let table = unique_table("codec_foreign");
    let _guard = TableGuard(table.clone());
    let theirs = layer(&table, Tagged).await;
    theirs.set(&"k".into(), &ada(), None).await.unwrap();
    theirs.set(&"k2".into(), &ada(), None).await.unwrap();
    let ours = layer(&table, PostcardCodec).await;
    let err = ours.get(&"k".into()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
    assert!(err.to_string().contains("custom codec 5"), "{err}");
    let err = ours.get_many(&["k".into(), "k2".into()]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);

    // The store of a composer: a counted miss, and the rows stay for their writer.
    let cache = MultiLayer::<String, User>::builder()
        .layer(LayerConfig::new("l1", DashMapLayer::new()))
        .layer(LayerConfig::new("store", ours))
        .build()
        .unwrap();
    assert_eq!(cache.get(&"k".into()).await.unwrap(), None);
    let stats = cache.stats();
    assert_eq!(stats.layers[1].decode_errors, 1, "{stats}");
    let rows = admin()
        .await
        .query_one(&format!("SELECT count(*) FROM \"{table}\""), &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(rows, 2, "values of another codec are not removed");
    assert_eq!(
        theirs.get(&"k".into()).await.unwrap().map(|e| e.value),
        Some(ada())
    );
    cache.close().await.unwrap();
}
