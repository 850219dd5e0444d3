//! RedisLayer specifics beyond the conformance suite: readable keys and native TTLs on
//! the server, SCAN with glob characters and binary keys, decode errors in a scan, and
//! redaction of passwords. Needs the shared server (`CAPACITOR_REDIS_URL`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common;

use std::time::{Duration, SystemTime};

use crate::common::{raw, unique_prefix, url};
use capacitor_core::{ErrorKind, Layer, Timestamp};
use capacitor_redis::fred::prelude::{KeysInterface, LuaInterface};
use capacitor_redis::RedisLayer;
use futures::StreamExt;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

async fn layer<K: capacitor_core::StorageKey>(prefix: &str) -> RedisLayer<K, String> {
    let layer = RedisLayer::builder().url(url()).prefix(prefix).build().unwrap();
    layer
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to Redis at {} (is it running?): {e}", url()));
    layer
}

#[test]
fn string_keys_are_readable_and_ttls_are_native() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("readable");
        let raw = raw().await;
        let layer = layer::<String>(&prefix).await;
        layer
            .set(
                &"user:42".to_string(),
                &"Ada".to_string(),
                Some(Duration::from_secs(60)),
            )
            .await
            .unwrap();
        let stored: Option<Vec<u8>> = raw.get(format!("{prefix}user:42").as_str()).await.unwrap();
        let stored = stored.expect("stored under prefix + key");
        let (expiry, _) = capacitor_core::envelope::unwrap(&stored).unwrap();
        let pttl: i64 = raw.pttl(format!("{prefix}user:42").as_str()).await.unwrap();
        assert!(pttl > 55_000 && pttl <= 60_000, "PX set natively: {pttl}");
        let entry = layer.get(&"user:42".to_string()).await.unwrap().unwrap();
        assert_eq!(entry.value, "Ada");
        assert_eq!(entry.expires_at, expiry);
        let remaining = entry
            .remaining(Timestamp::from_system_time(SystemTime::now()))
            .unwrap();
        assert!(remaining > Duration::from_secs(55) && remaining <= Duration::from_secs(60));
        layer
            .set(&"forever".to_string(), &"x".to_string(), None)
            .await
            .unwrap();
        let pttl: i64 = raw.pttl(format!("{prefix}forever").as_str()).await.unwrap();
        assert_eq!(pttl, -1, "no expiry");
        common::delete_prefix(&raw, &prefix).await;
        layer.close().await.unwrap();
    });
}

#[test]
fn scan_escapes_glob_characters() {
    common::run(TEST_TIMEOUT, async {
        let base = unique_prefix("glob");
        let raw = raw().await;
        let tricky = layer::<String>(&format!("{base}a*[b]?\\:")).await;
        let plain = layer::<String>(&format!("{base}aXbY\\:")).await;
        plain
            .set(&"k".to_string(), &"other namespace".to_string(), None)
            .await
            .unwrap();
        for k in ["x*1", "x?2", "xy", "[x]"] {
            tricky.set(&k.to_string(), &k.to_string(), None).await.unwrap();
        }
        let all: Vec<String> = tricky.scan(b"").unwrap().map(|r| r.unwrap().0).collect().await;
        let mut all = all;
        all.sort();
        assert_eq!(all, vec!["[x]", "x*1", "x?2", "xy"]);
        let star: Vec<String> = tricky.scan(b"x*").unwrap().map(|r| r.unwrap().0).collect().await;
        assert_eq!(star, vec!["x*1"]);
        let bracket: Vec<String> = tricky.scan(b"[").unwrap().map(|r| r.unwrap().0).collect().await;
        assert_eq!(bracket, vec!["[x]"]);
        common::delete_prefix(&raw, &base).await;
        tricky.close().await.unwrap();
        plain.close().await.unwrap();
    });
}

#[test]
fn binary_keys_scan_by_byte_prefix() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("binary");
        let raw = raw().await;
        let layer = layer::<u64>(&prefix).await;
        let entries: Vec<(u64, String)> = (0..300u64).map(|i| (i, format!("v{i}"))).collect();
        layer.set_many(&entries, None).await.unwrap();
        let mut all: Vec<u64> = layer.scan(b"").unwrap().map(|r| r.unwrap().0).collect().await;
        all.sort_unstable();
        assert_eq!(all, (0..300).collect::<Vec<_>>());
        // Keys 0..=255 share their first seven (big-endian) bytes.
        let low: Vec<u64> = layer
            .scan(&[0u8; 7])
            .unwrap()
            .map(|r| r.unwrap().0)
            .collect()
            .await;
        assert_eq!(low.len(), 256);
        assert!(low.iter().all(|k| *k < 256));
        assert_eq!(
            layer.delete_many(&(0..300).collect::<Vec<_>>()).await.unwrap(),
            300
        );
        common::delete_prefix(&raw, &prefix).await;
        layer.close().await.unwrap();
    });
}

#[test]
fn a_scan_reports_foreign_values_and_goes_on() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("scan_foreign");
        let raw = raw().await;
        let layer = layer::<String>(&prefix).await;
        layer.set(&"a".to_string(), &"1".to_string(), None).await.unwrap();
        layer.set(&"c".to_string(), &"3".to_string(), None).await.unwrap();
        let _: () = raw
            .set(format!("{prefix}b").as_str(), "foreign", None, None, false)
            .await
            .unwrap();
        common::make_list(&raw, &format!("{prefix}list")).await;
        let items: Vec<_> = layer.scan(b"").unwrap().collect().await;
        let mut ok: Vec<String> = items
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|(k, _)| k.clone()))
            .collect();
        ok.sort();
        assert_eq!(ok, vec!["a", "c"]);
        let errors: Vec<ErrorKind> = items
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.kind()))
            .collect();
        assert_eq!(
            errors,
            vec![ErrorKind::Decode, ErrorKind::Decode],
            "the foreign string and the list, each a Decode item"
        );
        common::delete_prefix(&raw, &prefix).await;
        layer.close().await.unwrap();
    });
}

#[test]
fn exists_agrees_with_get_for_foreign_data() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("exists_foreign");
        let raw = raw().await;
        let layer = layer::<String>(&prefix).await;
        // Two copies of each: get and exists both remove foreign data they find, so each
        // looks at its own copy.
        for copy in ["1", "2"] {
            layer
                .set(&format!("ours{copy}"), &"1".to_string(), None)
                .await
                .unwrap();
            let _: () = raw
                .set(
                    format!("{prefix}string{copy}").as_str(),
                    "foreign",
                    None,
                    None,
                    false,
                )
                .await
                .unwrap();
            common::make_list(&raw, &format!("{prefix}list{copy}")).await;
        }
        for key in ["ours", "string", "list", "absent"] {
            let got = layer
                .get(&format!("{key}1"))
                .await
                .map(|e| e.is_some())
                .map_err(|e| e.kind());
            let exists = layer.exists(&format!("{key}2")).await.map_err(|e| e.kind());
            assert_eq!(exists, got, "{key}: exists and get disagree");
        }
        assert!(layer.exists(&"ours1".to_string()).await.unwrap());
        assert!(!layer.exists(&"absent".to_string()).await.unwrap());
        common::delete_prefix(&raw, &prefix).await;
        layer.close().await.unwrap();
    });
}

#[test]
fn operations_after_close_fail_and_flush_waits() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("close");
        let layer = std::sync::Arc::new(layer::<String>(&prefix).await);
        let writers: Vec<_> = (0..20)
            .map(|i| {
                let layer = layer.clone();
                tokio::spawn(async move { layer.set(&format!("k{i}"), &"v".to_string(), None).await })
            })
            .collect();
        layer.flush().await.unwrap();
        for w in writers {
            w.await.unwrap().unwrap();
        }
        layer
            .delete_many(&(0..20).map(|i| format!("k{i}")).collect::<Vec<_>>())
            .await
            .unwrap();
        layer.close().await.unwrap();
        layer.close().await.unwrap();
        let e = layer.get(&"k".to_string()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed);
        assert_eq!(layer.flush().await.unwrap_err().kind(), ErrorKind::Closed);
        assert_eq!(layer.connect().await.unwrap_err().kind(), ErrorKind::Closed);
    });
}

#[test]
fn passwords_never_appear_in_debug_or_errors() {
    common::run(TEST_TIMEOUT, async {
        let builder = RedisLayer::builder().url("redis://user:hunter2@127.0.0.1:1/0");
        assert!(!format!("{builder:?}").contains("hunter2"));
        let err = RedisLayer::builder()
            .url("redis://user:hunter2@127.0.0.1:notaport")
            .build::<String, String>()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = RedisLayer::builder()
            .pool_size(0)
            .build::<String, String>()
            .unwrap_err();
        assert!(err.to_string().contains("pool_size"), "{err}");
    });
}

#[test]
fn build_outside_a_runtime_is_a_config_error() {
    let err = RedisLayer::builder().build::<String, String>().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[test]
fn writes_go_on_when_the_server_forgets_the_write_script() {
    common::run(TEST_TIMEOUT, async {
        // A private server: SCRIPT FLUSH empties the script cache of the whole server.
        let server = common::RedisServer::start();
        let layer: RedisLayer<String, String> = RedisLayer::builder()
            .url(server.url())
            .prefix("flush:")
            .build()
            .unwrap();
        layer.connect().await.unwrap();
        let raw = common::raw_at(&server.url()).await;
        let k = "k".to_string();
        layer.set(&k, &"v1".to_string(), None).await.unwrap();
        let _: () = raw.script_flush(false).await.unwrap();
        layer.set(&k, &"v2".to_string(), None).await.unwrap();
        assert_eq!(
            layer.get(&k).await.unwrap().map(|e| e.value),
            Some("v2".to_string())
        );
        assert!(layer.delete(&k).await.unwrap());
        let _: () = raw.script_flush(false).await.unwrap();
        layer
            .set_many(&[(k.clone(), "v3".to_string())], None)
            .await
            .unwrap();
        assert_eq!(
            layer.get(&k).await.unwrap().map(|e| e.value),
            Some("v3".to_string())
        );
    });
}

#[test]
fn a_value_too_large_is_refused_before_a_write_back_acknowledges_it() {
    common::run(TEST_TIMEOUT, async {
        let prefix = unique_prefix("check");
        let layer: RedisLayer<String, String> = RedisLayer::builder()
            .url(url())
            .prefix(&prefix)
            .max_value_bytes(64)
            .build()
            .unwrap();
        layer.connect().await.unwrap();
        let big = "x".repeat(1_000);
        let err = layer.check_write(&"k".into(), &big, None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueTooLarge);
        assert!(layer.check_write(&"k".into(), &"small".into(), None).is_ok());
        let cache = capacitor_core::MultiLayer::builder()
            .layer(capacitor_core::LayerConfig::new(
                "l1",
                capacitor_memory::DashMapLayer::<String, String>::new(),
            ))
            .layer(capacitor_core::LayerConfig::new("redis", layer))
            .write_policy(capacitor_core::WritePolicy::Back(capacitor_core::WriteBack::new()))
            .build()
            .unwrap();
        let err = cache.set("k".into(), big).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueTooLarge);
        assert_eq!(err.layer(), Some("redis"));
        assert!(cache.unwritten_keys().is_empty());
        cache.close().await.unwrap();
        common::delete_prefix(&raw().await, &prefix).await;
    });
}
