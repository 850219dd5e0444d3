//! Rows that do not decode, the value size limit, key formats, a key written twice in
//! one batch.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_do_not_decode_are_a_decode_error_and_removed() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("decode");
        let _guard = TableGuard(table.clone());
        let layer = string_layer(&table, &ManualClock::new(START)).await;
        let admin = admin().await;

        // Not capacitor's envelope at all.
        raw_insert(&admin, &table, "foreign", b"written by someone else").await;
        let err = layer.get(&s("foreign")).await.expect_err("decode error");
        assert_eq!((err.kind(), err.operation()), (ErrorKind::Decode, Operation::Get));
        assert_eq!(
            raw_count(&admin, &table, "key = 'foreign'").await,
            0,
            "the bad row is removed"
        );
        assert_eq!(layer.get(&s("foreign")).await.expect("then a plain miss"), None);

        // Our envelope, but a payload that is not a postcard String.
        raw_insert(
            &admin,
            &table,
            "garbled",
            &envelope::wrap(CodecId::POSTCARD, None, &[0xff; 5]),
        )
        .await;
        assert_eq!(kind(layer.get(&s("garbled")).await), ErrorKind::Decode);
        assert_eq!(raw_count(&admin, &table, "key = 'garbled'").await, 0);

        // exists looks at the row, not the bytes.
        raw_insert(&admin, &table, "foreign2", b"xx").await;
        assert!(layer.exists(&s("foreign2")).await.expect("exists"));

        // get_many fails as a whole, removes every bad row, and a retry reads the rest.
        layer.set(&s("good"), &s("value"), None).await.expect("set");
        raw_insert(&admin, &table, "bad1", b"x").await;
        raw_insert(&admin, &table, "bad2", b"y").await;
        let keys = [s("good"), s("bad1"), s("bad2")];
        let err = layer.get_many(&keys).await.expect_err("decode error");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Decode, Operation::GetMany)
        );
        assert!(err.message().starts_with("2 stored values"), "{err}");
        assert_eq!(raw_count(&admin, &table, "key IN ('bad1', 'bad2')").await, 0);
        let values: Vec<Option<String>> = layer
            .get_many(&keys)
            .await
            .expect("retry")
            .into_iter()
            .map(|e| e.map(|e| e.value))
            .collect();
        assert_eq!(values, vec![Some(s("value")), None, None]);

        // A scan reports a bad row as an item and goes on; it does not write.
        raw_insert(&admin, &table, "scan:b", b"bad").await;
        layer.set(&s("scan:a"), &s("a"), None).await.expect("set");
        layer.set(&s("scan:c"), &s("c"), None).await.expect("set");
        let mut stream = layer.scan(b"scan:").expect("scan");
        let mut items = Vec::new();
        while let Some(item) = next(&mut stream).await {
            items.push(item.map(|(k, e)| (k, e.value)).map_err(|e| e.kind()));
        }
        assert_eq!(
            items,
            vec![
                Ok((s("scan:a"), s("a"))),
                Err(ErrorKind::Decode),
                Ok((s("scan:c"), s("c")))
            ]
        );
        assert_eq!(raw_count(&admin, &table, "key = 'scan:b'").await, 1);
        layer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_under_a_multilayer_is_a_counted_miss() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("multi");
        let _guard = TableGuard(table.clone());
        let pg = string_layer(&table, &ManualClock::new(START)).await;
        let cache = MultiLayer::<String, String>::builder()
            .layer(LayerConfig::new("memory", DashMapLayer::new()))
            .layer(LayerConfig::new("postgres", pg))
            .build()
            .expect("multi");
        let admin = admin().await;
        raw_insert(&admin, &table, "k", b"\x00\x01 not an envelope").await;

        assert_eq!(cache.get(&s("k")).await.expect("a miss, not an error"), None);
        let stats = cache.stats();
        let row = stats.layer("postgres").expect("postgres row");
        assert_eq!(row.decode_errors, 1);
        assert_eq!(row.misses, 1);
        assert_eq!(row.errors, 0);
        assert_eq!(
            raw_count(&admin, &table, "key = 'k'").await,
            0,
            "the bad row is evicted"
        );

        cache.set(s("k"), s("fresh")).await.expect("set");
        assert_eq!(cache.get(&s("k")).await.expect("get"), Some(s("fresh")));
        assert_eq!(cache.stats().layer("postgres").expect("row").decode_errors, 1);
        cache.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_the_limit_are_refused_before_anything_is_written() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("toolarge");
        let _guard = TableGuard(table.clone());
        let layer = builder(&table)
            .max_value_bytes(100)
            .build::<String, Vec<u8>>()
            .await
            .expect("build");
        let admin = admin().await;
        let big = vec![7u8; 200];
        let err = layer.set(&s("big"), &big, None).await.expect_err("too large");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::ValueTooLarge, Operation::Set)
        );
        let entries = vec![(s("ok"), vec![1u8; 10]), (s("big"), big.clone())];
        assert_eq!(
            kind(layer.set_many(&entries, None).await),
            ErrorKind::ValueTooLarge
        );
        let ops = vec![
            WriteOp::Set {
                key: s("ok"),
                value: vec![1u8; 10],
                ttl: None,
            },
            WriteOp::Set {
                key: s("big"),
                value: big,
                ttl: None,
            },
        ];
        assert_eq!(kind(layer.apply_atomic(&ops).await), ErrorKind::ValueTooLarge);
        assert_eq!(raw_count(&admin, &table, "true").await, 0, "nothing was written");
        // At the limit: postcard's length prefix (1 byte) + 99 bytes = 100.
        layer
            .set(&s("edge"), &vec![1u8; 99], None)
            .await
            .expect("at the limit");
        layer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_formats_nul_bytes_and_non_string_keys() {
    within(TEST_TIMEOUT, async {
        let admin = admin().await;
        let table = unique_table("keys");
        let _guard = TableGuard(table.clone());
        let layer = string_layer(&table, &ManualClock::new(START)).await;
        assert_eq!(layer.key_format(), KeyFormat::Text);
        let err = layer.set(&s("a\0b"), &s("v"), None).await.expect_err("NUL");
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::InvalidInput, Operation::Set)
        );
        assert!(err.message().contains("NUL"), "{err}");
        assert_eq!(kind(layer.get(&s("a\0b")).await), ErrorKind::InvalidInput);
        assert_eq!(
            kind(
                layer
                    .set_many(&[(s("ok"), s("v")), (s("\0"), s("v"))], None)
                    .await
            ),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            raw_count(&admin, &table, "true").await,
            0,
            "a refused batch writes nothing"
        );
        // A scan of a prefix with NUL is empty (no key can hold one), not an error.
        layer.set(&s("a"), &s("v"), None).await.expect("set");
        let mut stream = layer.scan(b"a\0").expect("scan");
        assert!(next(&mut stream).await.is_none());
        // A prefix cut inside a character finds the keys it starts.
        layer.set(&s("xé1"), &s("1"), None).await.expect("set");
        layer.set(&s("xè2"), &s("2"), None).await.expect("set");
        layer.set(&s("y"), &s("3"), None).await.expect("set");
        let mut stream = layer
            .scan("xé".as_bytes().split_last().expect("bytes").1)
            .expect("scan");
        let mut keys = Vec::new();
        while let Some(item) = next(&mut stream).await {
            keys.push(item.expect("item").0);
        }
        assert_eq!(
            keys,
            vec![s("xè2"), s("xé1")],
            "both start with x and the byte C3"
        );
        layer.close().await.expect("close");

        // u64 keys: hex, in numeric order, scannable by byte prefix.
        let table = unique_table("u64");
        let _guard = TableGuard(table.clone());
        let layer = builder(&table).build::<u64, String>().await.expect("build");
        assert_eq!(layer.key_format(), KeyFormat::Hex);
        for k in [7u64, 0x0100, 0x01ff, 0x0200, u64::MAX] {
            layer.set(&k, &format!("v{k}"), None).await.expect("set");
        }
        let stored: Vec<String> = admin
            .query(
                &format!("SELECT key FROM \"public\".\"{table}\" ORDER BY key"),
                &[],
            )
            .await
            .expect("keys")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            stored,
            vec![
                "0000000000000007",
                "0000000000000100",
                "00000000000001ff",
                "0000000000000200",
                "ffffffffffffffff"
            ]
        );
        assert_eq!(
            layer.get(&0x01ff).await.expect("get").map(|e| e.value),
            Some(s("v511"))
        );
        let mut stream = layer.scan(&[0, 0, 0, 0, 0, 0, 1]).expect("scan");
        let mut keys = Vec::new();
        while let Some(item) = next(&mut stream).await {
            keys.push(item.expect("item").0);
        }
        assert_eq!(keys, vec![0x0100, 0x01ff]);
        layer.close().await.expect("close");

        // Byte-vector keys stored as text when asked.
        let table = unique_table("bytes");
        let _guard = TableGuard(table.clone());
        let layer = builder(&table)
            .key_format(KeyFormat::Text)
            .build::<Vec<u8>, String>()
            .await
            .expect("build");
        layer.set(&b"user:1".to_vec(), &s("v"), None).await.expect("set");
        assert_eq!(raw_count(&admin, &table, "key = 'user:1'").await, 1);
        assert_eq!(
            kind(layer.set(&vec![0xff], &s("v"), None).await),
            ErrorKind::InvalidInput
        );
        layer.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_written_twice_in_one_batch_keeps_its_last_write() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("dupes");
        let _guard = TableGuard(table.clone());
        let layer = string_layer(&table, &ManualClock::new(START)).await;
        let entries = vec![(s("a"), s("1")), (s("b"), s("2")), (s("a"), s("3"))];
        layer
            .set_many(&entries, None)
            .await
            .expect("set_many with a duplicate key");
        assert_eq!(
            layer.get(&s("a")).await.expect("get").map(|e| e.value),
            Some(s("3"))
        );
        let ops = vec![
            WriteOp::Set {
                key: s("c"),
                value: s("x"),
                ttl: None,
            },
            WriteOp::Delete { key: s("c") },
            WriteOp::Delete { key: s("b") },
            WriteOp::Set {
                key: s("b"),
                value: s("y"),
                ttl: None,
            },
            WriteOp::Set {
                key: s("a"),
                value: s("4"),
                ttl: None,
            },
            WriteOp::Set {
                key: s("a"),
                value: s("5"),
                ttl: None,
            },
        ];
        layer.apply_atomic(&ops).await.expect("apply_atomic");
        let got: Vec<Option<String>> = layer
            .get_many(&[s("a"), s("b"), s("c")])
            .await
            .expect("get_many")
            .into_iter()
            .map(|e| e.map(|e| e.value))
            .collect();
        assert_eq!(got, vec![Some(s("5")), Some(s("y")), None]);
        assert_eq!(
            layer
                .delete_many(&[s("a"), s("a"), s("b"), s("zz")])
                .await
                .expect("delete_many"),
            2
        );
        layer.close().await.expect("close");
    })
    .await;
}
