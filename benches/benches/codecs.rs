//! One value through each codec, as a layer stores and reads it (capacitor:
//! `envelope::seal`, which encodes behind the header, then `envelope::open` and
//! `envelope::decode`), beside the codec's own encode and decode (raw), one group per
//! codec. The value is a small record (three integers, a 22-byte name, eight small
//! integers). Prints each codec's stored size.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use capacitor::{envelope, BincodeCodec, Codec, JsonCodec, Operation, PostcardCodec};
use criterion::{criterion_group, criterion_main, Criterion};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    id: u64,
    version: u32,
    score: i64,
    name: String,
    tags: Vec<u16>,
}

fn record() -> Record {
    Record {
        id: 1_234_567,
        version: 42,
        score: -17,
        name: "Ada Lovelace, Countess".into(),
        tags: vec![1, 2, 3, 300, 4000, 5, 6, 70],
    }
}

fn roundtrip<C: Codec<Record>>(codec: &C, value: &Record) -> Record {
    let bytes = envelope::seal(codec, value, None, 1 << 20, Operation::Set).unwrap();
    let opened = envelope::open(&bytes).unwrap();
    envelope::decode(codec, &opened, Operation::Get).unwrap()
}

fn codecs(c: &mut Criterion) {
    let value = record();
    macro_rules! codec {
        ($name:literal, $codec:expr) => {{
            let codec = $codec;
            let stored = envelope::seal(&codec, &value, None, 1 << 20, Operation::Set).unwrap();
            eprintln!(
                "codec {}: {} bytes stored (13 of them the envelope)",
                $name,
                stored.len()
            );
            assert_eq!(roundtrip(&codec, &value), value);
            let mut group = c.benchmark_group(concat!("codec_roundtrip/", $name));
            group.bench_function("capacitor", |b| b.iter(|| roundtrip(&codec, black_box(&value))));
            group.bench_function("raw", |b| {
                b.iter(|| {
                    let bytes = codec.encode(black_box(&value)).unwrap();
                    let back: Record = codec.decode(&bytes).unwrap();
                    back
                })
            });
            group.finish();
        }};
    }
    codec!("postcard", PostcardCodec);
    codec!("json", JsonCodec);
    codec!("bincode", BincodeCodec);
}

criterion_group!(benches, codecs);
criterion_main!(benches);
