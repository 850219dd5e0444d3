//! Quickstart: the embedded default. A bounded moka L1 over redb on disk (no server), a
//! realistic workload (100,000 keys written; the process "restarts" with a cold L1, which
//! is warmed up from disk; then 1,000,000 Zipf-distributed reads), progress bars, and the
//! per-layer stats table.
//!
//! ```sh
//! cargo run --release --example quickstart            # in a temporary directory
//! cargo run --release --example quickstart -- ./data  # in ./data (kept afterwards)
//! ```

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use capacitor::memory::MokaLayer;
use capacitor::redb::RedbLayer;
use capacitor::{LayerConfig, MultiLayer, WarmUp};
use indicatif::{HumanCount, ProgressBar, ProgressState, ProgressStyle};

const KEYS: u64 = 100_000;
const READS: u64 = 1_000_000;
const TICK: u64 = 1_000;

/// xorshift64*: enough randomness for a demo without a dependency.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A Zipf-like key: rank r is drawn with probability roughly proportional to 1/r, so a
    /// few keys are hot and most are cold, as in real traffic.
    fn zipf_key(&mut self) -> u64 {
        ((KEYS as f64).powf(self.next_f64()) as u64)
            .saturating_sub(1)
            .min(KEYS - 1)
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    // The rate as a whole number: since indicatif 0.18 a width on `{per_sec}` is its
    // count of decimals.
    let style = ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos:>9}/{len} {rate:>11} eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("rate", |state: &ProgressState, out: &mut dyn fmt::Write| {
            let _ = write!(out, "{}/s", HumanCount(state.per_sec() as u64));
        })
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (_tmp, dir): (Option<tempfile::TempDir>, PathBuf) = match std::env::args().nth(1) {
        Some(dir) => (None, PathBuf::from(dir)),
        None => {
            let tmp = tempfile::tempdir()?;
            let dir = tmp.path().to_path_buf();
            (Some(tmp), dir)
        }
    };
    println!(
        "capacitor quickstart: moka (L1, 10,000 entries) over redb at {}\n",
        dir.join("db.redb").display()
    );

    let open = || -> Result<MultiLayer<String, String>, capacitor::Error> {
        MultiLayer::builder()
            .layer(
                LayerConfig::new("l1-moka", MokaLayer::builder().max_capacity(10_000).build()?)
                    .ttl(Duration::from_secs(300)),
            )
            .layer(LayerConfig::new(
                "redb",
                RedbLayer::builder().path(dir.join("db.redb")).build()?,
            ))
            .build()
    };

    let cache = open()?;
    let writes = bar(KEYS, "write");
    let started = Instant::now();
    for i in 0..KEYS {
        cache
            .set(format!("user:{i}"), format!("profile of user {i}"))
            .await?;
        if i.is_multiple_of(TICK) {
            writes.inc(TICK.min(KEYS - i));
        }
    }
    writes.finish();
    let write_time = started.elapsed();
    cache.close().await?; // makes every write durable and releases redb's file lock

    // A restart: a cold L1 over the same file, warmed up from disk.
    let cache = open()?;
    let warm = bar(10_000, "warm-up");
    let progress = warm.clone();
    let report = cache
        .warm_up(
            "redb",
            WarmUp::new()
                .prefix("user:")
                .limit(10_000)
                .progress(move |n| progress.set_position(n)),
        )
        .await?;
    warm.finish();

    let reads = bar(READS, "read");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    let mut found = 0u64;
    for i in 0..READS {
        let key = format!("user:{}", rng.zipf_key());
        found += u64::from(cache.get(&key).await?.is_some());
        if i.is_multiple_of(TICK) {
            reads.inc(TICK);
        }
    }
    reads.finish();
    let read_time = started.elapsed();

    cache.flush().await?;
    println!(
        "\nwrote {KEYS} keys in {write_time:.2?} ({:.0}/s); warmed {} keys into L1 after the restart; \
         read {READS} keys in {read_time:.2?} ({:.0}/s), {found} found\n",
        KEYS as f64 / write_time.as_secs_f64(),
        report.copied,
        READS as f64 / read_time.as_secs_f64(),
    );
    println!("{}", cache.stats());
    cache.close().await?;
    Ok(())
}
