//! The invalidation bus on a private 3-master Redis Cluster (see [`Cluster`]): two
//! composers A and B in one process, each a moka L1 (TTL 5 minutes: only the bus can cure
//! staleness) over one shared `RedisLayer` on the cluster, each with its own `RedisBus`
//! on the cluster URL. fred sends a subscriber's `SUBSCRIBE` to the master owning the
//! hash slot of its client id, and the cluster forwards every `PUBLISH` to every node, so
//! the two buses' publishers and subscribers may sit on different masters. Writes of keys
//! spread over every slot must reach the other L1 within a bounded delay, on a healthy
//! cluster and after the master holding B's subscription was killed and restarted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::cluster::Cluster;
use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use capacitor_core::{LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_redis::{Reconnect, RedisBus, RedisConnection, RedisLayer};

const TEST_TIMEOUT: Duration = Duration::from_secs(180);
/// How long after a write returned the other instance may still serve the old value.
const BOUND: Duration = Duration::from_secs(2);

type Cache = MultiLayer<String, String>;

/// Short timeouts and reconnect delays: the restart test's outage lasts seconds.
fn connection(url: &str) -> RedisConnection {
    RedisConnection::new()
        .url(url)
        .command_timeout(Duration::from_millis(1_000))
        .connect_timeout(Duration::from_secs(10))
        .reconnect(Reconnect::Constant(Duration::from_millis(100)))
}

async fn bus(url: &str, channel: &str) -> Arc<RedisBus> {
    let bus = RedisBus::builder()
        .connection(connection(url))
        .channel(channel)
        .build()
        .unwrap();
    bus.connect()
        .await
        .unwrap_or_else(|e| panic!("the bus connects on a cluster URL: {e}"));
    Arc::new(bus)
}

fn composer(redis: Arc<RedisLayer<String, String>>, bus: Arc<RedisBus>) -> Cache {
    MultiLayer::<String, String>::builder()
        .layer(
            LayerConfig::new("l1", MokaLayer::builder().max_capacity(10_000).build().unwrap())
                .ttl(Duration::from_secs(300)),
        )
        .layer(LayerConfig::shared("redis", redis))
        .invalidation_bus(bus)
        .build()
        .unwrap()
}

/// The node holding the one subscription on `channel` there is so far.
async fn subscriber_node(cluster: &Cluster, channel: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counts = cluster.numsub(channel);
        if counts.iter().sum::<u64>() == 1 {
            return counts.iter().position(|&n| n == 1).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no subscription on {channel}: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Keys on each node (`DBSIZE`), to show that the keys spread over every master.
fn keys_per_node(cluster: &Cluster) -> Vec<u64> {
    (0..cluster.ports.len())
        .map(|i| cluster.cli(i, &["dbsize"]).trim().parse().unwrap_or(0))
        .collect()
}

/// Until a probe written by `writer` reaches `reader`'s L1 (both subscriptions are up and
/// every master answers). Errors (a master still down) are retried.
async fn settle(writer: &Cache, reader: &Cache, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut n = 0u32;
    loop {
        n += 1;
        let key = format!("probe{}", n % 64);
        let ok = async {
            writer.set(key.clone(), format!("old {n}")).await.ok()?;
            reader.get(&key).await.ok()?;
            writer.set(key.clone(), format!("new {n}")).await.ok()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            (reader.get(&key).await.ok()?? == format!("new {n}")).then_some(())
        }
        .await;
        if ok.is_some() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "B never saw A's writes within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `cache` serves `expected` for `key`, failing past [`BOUND`]; the delay.
async fn until_served(cache: &Cache, key: &String, expected: Option<&str>, since: Instant) -> Duration {
    loop {
        if cache.get(key).await.unwrap().as_deref() == expected {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < BOUND,
            "{key}: still not {expected:?} {BOUND:?} after the write returned"
        );
        // Not a sleep: the timer's 1 ms granularity would dominate the figure.
        tokio::task::yield_now().await;
    }
}

/// For each key: the writer sets an old value, the reader caches it in its L1, the writer
/// sets a new one; the delay until the reader serves it. Every fifth key is written by B
/// and read by A.
async fn measure_sets(a: &Cache, b: &Cache, keys: &[String], round: &str) -> Vec<Duration> {
    let mut delays = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let (writer, reader) = if i % 5 == 4 { (b, a) } else { (a, b) };
        let old = format!("{round} old {i}");
        let new = format!("{round} new {i}");
        writer.set(key.clone(), old.clone()).await.unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while reader.get(key).await.unwrap().as_deref() != Some(old.as_str()) {
            assert!(Instant::now() < until, "{key}: the reader never saw {old}");
            tokio::task::yield_now().await;
        }
        let written = Instant::now();
        writer.set(key.clone(), new.clone()).await.unwrap();
        delays.push(until_served(reader, key, Some(&new), written).await);
    }
    delays
}

/// For each key (cached by the reader): the writer deletes it; the delay until the reader
/// serves nothing.
async fn measure_deletes(a: &Cache, b: &Cache, keys: &[String]) -> Vec<Duration> {
    let mut delays = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let (writer, reader) = if i % 5 == 4 { (b, a) } else { (a, b) };
        assert!(reader.get(key).await.unwrap().is_some(), "{key} is cached");
        let written = Instant::now();
        assert!(writer.delete(key).await.unwrap(), "{key} existed");
        delays.push(until_served(reader, key, None, written).await);
    }
    delays
}

/// Median, p99 and max, printed; the max.
fn report(what: &str, mut delays: Vec<Duration>) -> Duration {
    delays.sort();
    let median = delays[delays.len() / 2];
    let p99 = delays[(delays.len() * 99).div_ceil(100) - 1];
    let max = delays[delays.len() - 1];
    println!(
        "cluster bus, {what} over {} keys (write returned → the other instance serves it): \
         median {median:?}, p99 {p99:?}, max {max:?}",
        delays.len()
    );
    max
}

struct Setup {
    cluster: Cluster,
    prefix: String,
    redis: Arc<RedisLayer<String, String>>,
    bus_a: Arc<RedisBus>,
    bus_b: Arc<RedisBus>,
    a: Cache,
    b: Cache,
    /// The node holding B's subscription.
    b_node: usize,
}

/// The cluster, the shared layer, B (bus and composer) first, so that its subscription
/// can be told from A's, then A.
async fn setup(cluster: Cluster, what: &str) -> Setup {
    let url = cluster.url();
    let prefix = common::unique_prefix(what);
    let channel = format!("{prefix}invalidate");
    let redis = RedisLayer::builder()
        .connection(connection(&url))
        .prefix(&prefix)
        .build()
        .unwrap();
    redis.connect().await.unwrap();
    assert!(redis.is_clustered());
    let redis = Arc::new(redis);
    let bus_b = bus(&url, &channel).await;
    assert!(bus_b.is_connected());
    let b = composer(redis.clone(), bus_b.clone());
    let b_node = subscriber_node(&cluster, &channel).await;
    let bus_a = bus(&url, &channel).await;
    let a = composer(redis.clone(), bus_a.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.numsub(&channel).iter().sum::<u64>() < 2 {
        assert!(Instant::now() < deadline, "A never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "cluster bus: subscriptions per node (ports {:?}): {:?}; B's on node {b_node}",
        cluster.ports,
        cluster.numsub(&channel)
    );
    Setup {
        cluster,
        prefix,
        redis,
        bus_a,
        bus_b,
        a,
        b,
        b_node,
    }
}

impl Setup {
    async fn close(self) {
        self.a.close().await.unwrap();
        self.b.close().await.unwrap();
        self.bus_a.close().await.unwrap();
        self.bus_b.close().await.unwrap();
        let _ = (self.redis, self.prefix);
        drop(self.cluster);
    }
}

fn keys(n: usize) -> Vec<String> {
    // No hash tag: the keys spread over every slot range, so over every master.
    (0..n).map(|i| format!("k{i}")).collect()
}

#[test]
fn bus_keeps_l1s_coherent_on_a_three_master_cluster() {
    common::run(TEST_TIMEOUT, async {
        let s = setup(Cluster::start(), "cbus").await;
        let (a, b) = (&s.a, &s.b);
        let settled = settle(a, b, Duration::from_secs(10)).await;
        println!("cluster bus: A's writes reach B after {settled:?} of start-up");

        let keys = keys(200);
        let sets = measure_sets(a, b, &keys, "r1").await;
        let spread = keys_per_node(&s.cluster);
        println!("cluster bus: keys per node {spread:?}");
        assert!(spread.iter().all(|&n| n > 0), "keys on every master: {spread:?}");
        assert!(report("sets", sets) < BOUND);
        assert!(report("deletes", measure_deletes(a, b, &keys).await) < BOUND);

        let (sa, sb) = (a.stats().bus.unwrap(), b.stats().bus.unwrap());
        println!("cluster bus: A {sa:?}");
        println!("cluster bus: B {sb:?}");
        assert!(sa.published > 0 && sa.received > 0, "{sa:?}");
        assert!(sb.published > 0 && sb.received > 0, "{sb:?}");
        assert_eq!((sa.publish_errors, sb.publish_errors), (0, 0));

        // Fills of cold keys in B: read-through, not a change, so nothing is announced.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (before_b, before_a) = (b.stats().bus.unwrap(), a.stats().bus.unwrap());
        for i in 0..100 {
            let key = format!("cold{i}");
            let v = b
                .get_or_load(&key, move || async move { format!("loaded {i}") })
                .await
                .unwrap();
            assert_eq!(v, format!("loaded {i}"));
            assert_eq!(b.get(&key).await.unwrap(), Some(v));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (after_b, after_a) = (b.stats().bus.unwrap(), a.stats().bus.unwrap());
        println!(
            "cluster bus: 100 fills in B: B published {} → {}, A received {} → {}",
            before_b.published, after_b.published, before_a.received, after_a.received
        );
        assert_eq!(after_b.published, before_b.published, "fills announce nothing");
        assert_eq!(after_b.pending, 0);
        assert_eq!(
            after_a.received, before_a.received,
            "A heard nothing of B's fills"
        );
        s.close().await;
    });
}

#[test]
fn bus_on_a_cluster_survives_a_master_restart() {
    common::run(TEST_TIMEOUT, async {
        let mut s = setup(Cluster::start(), "cbus_restart").await;
        settle(&s.a, &s.b, Duration::from_secs(10)).await;
        let keys = keys(60);
        assert!(
            report(
                "sets before the restart",
                measure_sets(&s.a, &s.b, &keys, "r1").await
            ) < BOUND
        );

        let clears_before = s.b.stats().bus.unwrap().clears;
        let node = s.b_node;
        let killed = Instant::now();
        s.cluster.kill_node(node);
        // Writes meanwhile: those of keys on the dead master must fail; the figures show
        // what happens to the others (recorded, not asserted).
        let live = (node + 1) % s.cluster.ports.len();
        let mut outcomes = Vec::new();
        for (i, key) in keys[..15].iter().enumerate() {
            let owner = s.cluster.node_of(live, &format!("{}{key}", s.prefix));
            let started = Instant::now();
            let result = s.a.set(key.clone(), format!("during {i}")).await;
            outcomes.push((owner, result.is_ok(), started.elapsed()));
            if let Err(e) = result {
                if owner != node {
                    println!("cluster bus: set of {key} (on live node {owner}) failed: {e}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.cluster.start_node(node);
        let restarted = Instant::now();
        let failed = |on_dead: bool| {
            outcomes
                .iter()
                .filter(|(owner, ok, _)| (*owner == node) == on_dead && !ok)
                .count()
        };
        let total = |on_dead: bool| {
            outcomes
                .iter()
                .filter(|(owner, _, _)| (*owner == node) == on_dead)
                .count()
        };
        println!(
            "cluster bus: node {node} (B's subscription) down for {:?}; sets meanwhile: keys on the dead \
             node {}/{} failed, keys on live nodes {}/{} failed; (node, ok, took) {outcomes:?}",
            restarted - killed,
            failed(true),
            total(true),
            failed(false),
            total(false),
        );
        assert_eq!(
            failed(true),
            total(true),
            "a set on the dead master cannot succeed"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.b.stats().bus.unwrap().clears <= clears_before {
            assert!(
                Instant::now() < deadline,
                "B's L1 never cleared after its subscription's master restarted: {:?}",
                s.b.stats().bus
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cleared = restarted.elapsed();
        s.cluster.wait_ok(Duration::from_secs(30));
        let ok = restarted.elapsed();
        let settled = settle(&s.a, &s.b, Duration::from_secs(30)).await;
        println!(
            "cluster bus: after the restart, B cleared its L1 at {cleared:?}, cluster_state ok at {ok:?}, \
             A's writes reach B again {settled:?} later; B {:?}",
            s.b.stats().bus.unwrap()
        );
        assert!(
            report(
                "sets after the restart",
                measure_sets(&s.a, &s.b, &keys, "r2").await
            ) < BOUND
        );
        assert!(
            report(
                "deletes after the restart",
                measure_deletes(&s.a, &s.b, &keys).await
            ) < BOUND
        );
        s.close().await;
    });
}
