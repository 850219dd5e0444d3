//! Quickstart: a bounded moka L1 over an unbounded in-memory store, a realistic workload,
//! and the per-layer stats table.
//!
//! Run with `cargo run --example quickstart`.

use std::time::{Duration, Instant};

use capacitor::memory::{DashMapLayer, MokaLayer};
use capacitor::{LayerConfig, MultiLayer};

const KEYS: u64 = 100_000;
const READS: u64 = 1_000_000;

/// xorshift64*: enough randomness for a demo without a dependency.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A Zipf-like key: rank r is drawn with probability roughly proportional to 1/r.
    fn zipf_key(&mut self) -> u64 {
        ((KEYS as f64).powf(self.next_f64()) as u64)
            .saturating_sub(1)
            .min(KEYS - 1)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), capacitor::Error> {
    let cache = MultiLayer::<String, String>::builder()
        .layer(
            LayerConfig::new("l1-moka", MokaLayer::builder().max_capacity(10_000).build()?)
                .ttl(Duration::from_secs(300)),
        )
        .layer(LayerConfig::new("store-dashmap", DashMapLayer::new()))
        .build()?;

    let started = Instant::now();
    for i in 0..KEYS {
        cache
            .set(format!("user:{i}"), format!("profile of user {i}"))
            .await?;
    }
    println!("wrote {KEYS} keys in {:.2?}", started.elapsed());

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    let mut found = 0u64;
    for _ in 0..READS {
        let key = format!("user:{}", rng.zipf_key());
        found += u64::from(cache.get(&key).await?.is_some());
    }
    let elapsed = started.elapsed();
    println!(
        "read {READS} Zipf-distributed keys in {elapsed:.2?} ({:.0} reads/s), {found} found\n",
        READS as f64 / elapsed.as_secs_f64()
    );

    println!("{}", cache.stats());
    cache.close().await
}
