//! Iterating 1,000,000 keys through `MultiLayer::scan` holds a bounded amount of memory:
//! a counting allocator tracks the peak of live heap bytes during the scan.
//!
//! `unsafe` here only: a `GlobalAlloc` impl cannot be written without it (test code; the
//! library crates forbid unsafe).
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::alloc::{GlobalAlloc, Layout, System};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use capacitor_core::{
    async_trait, Capabilities, Entry, EntryStream, Error, Layer, LayerConfig, MultiLayer, Operation, Result,
    WriteBack, WritePolicy,
};
use futures::StreamExt;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const KEYS: u64 = 1_000_000;

/// An authoritative layer of 1,000,000 generated keys (`key:0000000`…) that it streams
/// lazily, as a paging backend would.
struct Generated;

struct Keys(u64);

impl futures_core::Stream for Keys {
    type Item = Result<(String, Entry<Vec<u8>>)>;
    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.0 >= KEYS {
            return Poll::Ready(None);
        }
        this.0 += 1;
        Poll::Ready(Some(Ok((
            format!("key:{:07}", this.0 - 1),
            Entry::persistent(vec![7u8; 64]),
        ))))
    }
}

#[async_trait]
impl Layer<String, Vec<u8>> for Generated {
    fn name(&self) -> &str {
        "generated"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::new().with_scan()
    }
    fn scan(&self, _: &[u8]) -> Result<EntryStream<String, Vec<u8>>> {
        Ok(Box::pin(Keys(0)))
    }
    async fn get(&self, _: &String) -> Result<Option<Entry<Vec<u8>>>> {
        Ok(None)
    }
    async fn set(&self, _: &String, _: &Vec<u8>, _: Option<Duration>) -> Result<()> {
        Err(Error::new(
            capacitor_core::ErrorKind::Unavailable,
            Operation::Set,
            "read-mostly test layer",
        ))
    }
    async fn delete(&self, _: &String) -> Result<bool> {
        Ok(false)
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn scanning_a_million_keys_holds_bounded_memory() {
    let cache = MultiLayer::builder()
        .write_policy(WritePolicy::Back(
            WriteBack::new().max_delay(Duration::from_secs(3600)),
        ))
        .layer(LayerConfig::new("l1", capacitor_core::testkit::MapLayer::new()))
        .layer(LayerConfig::new("generated", Generated))
        .build()
        .unwrap();
    // A few pending writes to merge in.
    cache.set("key:0000005".into(), vec![1]).await.unwrap();
    cache.delete(&"key:0000006".into()).await.unwrap();

    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut stream = cache.scan(b"key:").unwrap();
    let (mut count, mut bytes) = (0u64, 0u64);
    while let Some(item) = stream.next().await {
        let (key, value) = item.unwrap();
        if key == "key:0000005" {
            assert_eq!(value, vec![1]);
        }
        count += 1;
        bytes += (key.len() + value.len()) as u64;
    }
    let peak = PEAK.load(Ordering::Relaxed) - base;
    println!("scanned {count} keys ({bytes} bytes of keys and values): peak live heap during the scan {peak} bytes");
    assert_eq!(count, KEYS - 1, "one key hidden by its pending delete");
    // Holding the keys alone would take > 70 MB; allow 1 MiB for the stream and buffers.
    assert!(
        peak < 1024 * 1024,
        "peak live heap {peak} bytes while scanning {count} keys"
    );
}
