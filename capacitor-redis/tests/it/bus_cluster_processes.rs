//! Coherence of three processes through the loss of one master of a Redis Cluster: the
//! same three children as `bus_recovery` (this test binary run again with `--exact
//! bus_cluster_processes::bus_cluster_processes_child --ignored`), each a `MultiLayer` of
//! a moka L1 (TTL 5 minutes: only the bus can cure staleness), a `RedisLayer` cache and a
//! `RedisLayer` store, but the cache layer and the bus are on a private 3-master cluster
//! (see [`Cluster`]), reached by its `redis-cluster://` URL. The store stays on the
//! shared test server, under a prefix of its own. The parent SIGKILLs the master holding
//! the most bus subscriptions for about 3 s (less than the cluster's node timeout: no
//! failover, the other masters keep `cluster_state:ok`), then restarts it (its data lost).
//!
//! Every key has one writer (key `i` is written by instance `i % 3`) and every instance
//! reads all keys in a loop, printing each write (and whether the cache layer took it)
//! and each read with its start and end time (µs since the epoch: one machine, one
//! clock). The parent checks every read as `bus_recovery` does: it is stale when the
//! value it returned had already been overwritten by a write acknowledged before the
//! read began, its window running from that write's acknowledgement to the end of the
//! read. A failed write's value is only "maybe" written: reading it is no error, and it
//! supersedes nothing. With every server up no read may be stale beyond
//! [`BUS_DELAY_BOUND`], and no read may return a value no one tried to write.
//!
//! While the master is down the cache layer's writes fail, on the live masters' keys too
//! (the layer treats the cluster as disconnected while one master is down); the store's
//! succeed, so `set` does (cache-layer errors are not returned by default). The table
//! reports those failures per phase and per master; they are not asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::cluster::Cluster;
use crate::common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capacitor_core::testkit::staleness::{
    self, check, now_us, print_table, Checked, Children, Column, Line, Out, Phases,
};
use capacitor_core::{Layer, LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_redis::{Reconnect, RedisBus, RedisConnection, RedisLayer};

const INSTANCES: usize = 3;
const KEYS: usize = 12;
/// A child ends by itself after this long, whatever the parent does.
const CHILD_LIFETIME: Duration = Duration::from_secs(90);
/// Every child line the parent reads starts with this (the test harness prints too).
const TAG: &str = "busclu ";
const OUT: Out = Out { tag: TAG };

const ENV_INSTANCE: &str = "CAPACITOR_BUSCLU_INSTANCE";
const ENV_CACHE_URL: &str = "CAPACITOR_BUSCLU_CACHE_URL";
const ENV_PREFIX: &str = "CAPACITOR_BUSCLU_PREFIX";

fn key_name(i: usize) -> String {
    format!("k{i}")
}

fn channel(prefix: &str) -> String {
    format!("{prefix}invalidate")
}

fn cache_prefix(prefix: &str) -> String {
    format!("{prefix}cache:")
}

struct Instance {
    cache: MultiLayer<String, String>,
    cache_layer: Arc<RedisLayer<String, String>>,
    bus: Arc<RedisBus>,
}

async fn instance(cluster_url: &str, prefix: &str) -> Instance {
    // Short timeouts and reconnect delays: the outage lasts seconds, and a read waiting
    // on the cache layer only delays its fall-through to the store.
    let private = RedisConnection::new()
        .url(cluster_url)
        .command_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_secs(10))
        .reconnect(Reconnect::Exponential {
            min: Duration::from_millis(50),
            max: Duration::from_millis(500),
        });
    let bus = RedisBus::builder()
        .connection(private.clone())
        .channel(channel(prefix))
        .build()
        .unwrap();
    bus.connect().await.expect("the bus connects on the cluster URL");
    let bus = Arc::new(bus);
    let cache_layer = RedisLayer::builder()
        .connection(private)
        .prefix(cache_prefix(prefix))
        .build()
        .unwrap();
    cache_layer
        .connect()
        .await
        .expect("the cache layer connects to the cluster");
    assert!(cache_layer.is_clustered());
    let cache_layer = Arc::new(cache_layer);
    let store = RedisLayer::builder()
        .connection(
            RedisConnection::new()
                .url(common::url())
                .command_timeout(Duration::from_secs(5))
                .connect_timeout(Duration::from_secs(10)),
        )
        .prefix(format!("{prefix}store:"))
        .build()
        .unwrap();
    store.connect().await.expect("the store connects");
    let cache = MultiLayer::<String, String>::builder()
        .layer(
            LayerConfig::new("l1", MokaLayer::builder().max_capacity(100).build().unwrap())
                .ttl(Duration::from_secs(300)),
        )
        .layer(LayerConfig::shared("cache", cache_layer.clone()))
        .layer(LayerConfig::new("store", store))
        .invalidation_bus(bus.clone())
        .build()
        .unwrap();
    Instance {
        cache,
        cache_layer,
        bus,
    }
}

fn cache_sets(cache: &MultiLayer<String, String>) -> u64 {
    cache
        .stats()
        .layers
        .iter()
        .find(|l| l.name == "cache")
        .unwrap()
        .sets
}

/// One child: writes its keys, reads all keys, obeys the parent's commands on stdin
/// (`status`, `stop`) and prints everything on stdout.
#[test]
#[ignore = "an instance of `bus_three_processes_through_a_cluster_master_restart`; does nothing alone"]
fn bus_cluster_processes_child() {
    let Ok(index) = std::env::var(ENV_INSTANCE) else {
        return;
    };
    let index: usize = index.parse().unwrap();
    let cluster_url = std::env::var(ENV_CACHE_URL).unwrap();
    let prefix = std::env::var(ENV_PREFIX).unwrap();
    let commands = staleness::commands();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let Instance {
            cache,
            cache_layer,
            bus,
        } = instance(&cluster_url, &prefix).await;
        OUT.ready();
        let own: Vec<usize> = (0..KEYS).filter(|k| k % INSTANCES == index).collect();
        let keys: Vec<String> = (0..KEYS).map(key_name).collect();
        let mut counter = 0u64;
        // Whether the cause of the cache layer's failing writes was printed since it last
        // took one.
        let mut cause_shown = false;
        let started = Instant::now();
        while started.elapsed() < CHILD_LIFETIME {
            let mut stop = false;
            while let Ok(command) = commands.try_recv() {
                let (command, arg) = command.split_once(' ').unwrap_or((command.as_str(), ""));
                match command {
                    "status" => {
                        let round = arg.to_owned();
                        let cache = cache.clone();
                        let bus = bus.clone();
                        let cache_layer = cache_layer.clone();
                        tokio::spawn(async move {
                            let flushed = cache.flush().await;
                            let stats = cache.stats();
                            let layer = stats.layers.iter().find(|l| l.name == "cache").unwrap();
                            let b = stats.bus.unwrap_or_default();
                            OUT.line(format_args!(
                                "status {round} {} {} {} {} {} {}",
                                if flushed.is_ok() { "ok" } else { "err" },
                                layer.replay_pending,
                                b.pending,
                                bus.is_connected(),
                                cache_layer.is_connected(),
                                now_us()
                            ));
                        });
                    }
                    "stop" => stop = true,
                    other => panic!("unknown command {other}"),
                }
            }
            if stop {
                break;
            }
            // One write of one of this instance's keys, then a read of every key.
            counter += 1;
            let key = key_name(own[(counter as usize) % own.len()]);
            let value = format!("{index}:{counter}");
            let sets_before = cache_sets(&cache);
            let begun = now_us();
            let result = cache.set(key.clone(), value.clone()).await;
            // The cache layer took the write when its count of sets moved (only this
            // loop writes).
            let cached = cache_sets(&cache) > sets_before;
            OUT.write(&key, &value, begun, &result, if cached { "1" } else { "0" });
            if cached {
                cause_shown = false;
            } else if !cause_shown {
                cause_shown = true;
                // The layer's own answer for the key, for the report (a read: it changes
                // nothing).
                let probe = cache_layer.exists(&key).await;
                OUT.line(format_args!(
                    "CE {key} {} connected={} probe: {}",
                    now_us(),
                    cache_layer.is_connected(),
                    match probe {
                        Ok(b) => format!("ok {b}"),
                        Err(e) => format!("{:?}: {e}", e.kind()),
                    }
                ));
            }
            OUT.read_all(&cache, &keys).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let stats = cache.stats();
        let layer = stats.layers.iter().find(|l| l.name == "cache").unwrap();
        let b = stats.bus.clone().unwrap_or_default();
        OUT.line(format_args!(
            "stats cache_sets={} cache_errors={} cache_timeouts={} suspect_keys={} replayed={} \
             replay_pending={} bus_published={} bus_publish_errors={} bus_pending={} \
             bus_received={} bus_clears={}",
            layer.sets,
            layer.errors,
            layer.timeouts,
            layer.suspect_keys,
            layer.replayed,
            layer.replay_pending,
            b.published,
            b.publish_errors,
            b.pending,
            b.received,
            b.clears
        ));
        let _ = cache.close().await;
        let _ = bus.close().await;
        OUT.done();
    });
}

/// A child's answer to `status round`: whether its outbox flushed (nothing pending on
/// the bus), its bus is connected and its cache layer has nothing left to replay.
fn recovered(line: &Line, round: u64) -> Option<bool> {
    let Line::Other(line) = line else {
        return None;
    };
    let f: Vec<&str> = line.split(' ').collect();
    (f[0] == "status" && f[1].parse() == Ok(round))
        .then(|| f[2] == "ok" && f[3] == "0" && f[4] == "0" && f[5] == "true")
}

/// The longest staleness the bus's own delay explains, on a loaded 2-core machine (as in
/// `bus_recovery`).
const BUS_DELAY_BOUND: u64 = 250_000;

#[test]
fn bus_three_processes_through_a_cluster_master_restart() {
    let prefix = common::unique_prefix("busclu");
    let mut cluster = Cluster::start();
    let cluster_url = cluster.url();
    // Checked phases (every server up): no read may be stale beyond the bound.
    let mut phases = Phases::default();
    phases.begin("1 start-up", true);
    let mut children = Children::spawn(
        INSTANCES,
        "bus_cluster_processes::bus_cluster_processes_child",
        TAG,
        |i| {
            vec![
                (ENV_INSTANCE.into(), i.to_string()),
                (ENV_CACHE_URL.into(), cluster_url.clone()),
                (ENV_PREFIX.into(), prefix.clone()),
            ]
        },
    );
    children.until_each(Duration::from_secs(40), "the children to start", |e| {
        matches!(e, Line::Ready)
    });
    // Where the keys and the subscriptions are, with every master up.
    let key_node: HashMap<String, usize> = (0..KEYS)
        .map(|i| {
            let key = key_name(i);
            let node = cluster.node_of(0, &format!("{}{key}", cache_prefix(&prefix)));
            (key, node)
        })
        .collect();
    let subscriptions = cluster.numsub(&channel(&prefix));
    // The master holding the most subscriptions (ties: the first), so that the bus loses
    // subscribers too.
    let victim = (0..cluster.ports.len())
        .max_by_key(|&n| (subscriptions[n], std::cmp::Reverse(n)))
        .unwrap();
    children.run_for(Duration::from_secs(2));

    phases.begin("2 steady", true);
    children.run_for(Duration::from_secs(3));

    phases.begin("3 master down", false);
    cluster.kill_node(victim);
    children.run_for(Duration::from_secs(3));

    phases.begin("4 recovery", false);
    let restarted = now_us();
    cluster.start_node(victim);
    cluster.wait_ok(Duration::from_secs(30));
    let cluster_ok = now_us();
    let recovered = children.wait_recovered(Duration::from_secs(30), Duration::from_secs(15), recovered);
    children.run_for(Duration::from_millis(500));
    let cluster_ok_ms = (cluster_ok - restarted) / 1000;
    let recovery_ms = (recovered - restarted) / 1000;

    phases.begin("5 recovered", true);
    children.run_for(Duration::from_secs(4));
    let end = now_us();

    children.send_all("stop");
    children.until_each(Duration::from_secs(20), "the children to stop", |e| {
        matches!(e, Line::Done)
    });
    let events = children.finish();

    let Checked { rows, stale, unknown } = check(&events, &phases, end, BUS_DELAY_BOUND);
    // Per phase and master: the writes of its keys, and how many of them the cache layer
    // missed.
    let nodes = cluster.ports.len();
    let mut cache_writes = vec![vec![(0u64, 0u64); nodes]; phases.len()];
    let mut failed_writes: Vec<String> = Vec::new();
    let mut cache_causes: Vec<String> = Vec::new();
    let mut error_samples: Vec<String> = Vec::new();
    for (instance, e) in &events {
        match e {
            Line::Write { key, begun, rest, .. } => {
                let node = &mut cache_writes[phases.of(*begun)][key_node[key]];
                node.0 += 1;
                node.1 += u64::from(rest != "1");
            }
            Line::WriteError {
                key,
                value,
                begun,
                message,
                ..
            } if failed_writes.len() < 10 => failed_writes.push(format!(
                "instance {instance} phase {}: {key} = {value}: {message}",
                phases[phases.of(*begun)].name
            )),
            Line::ReadError { begun, message, .. } if *begun <= end && error_samples.len() < 5 => {
                error_samples.push(format!(
                    "instance {instance} phase {}: {message}",
                    phases[phases.of(*begun)].name
                ))
            }
            Line::Other(s) => {
                if let Some(cause) = s.strip_prefix("CE ") {
                    cache_causes.push(format!("instance {instance}: {cause}"));
                }
            }
            _ => {}
        }
    }
    let mut shown = 0;
    let stale_reads: Vec<String> = stale
        .iter()
        .filter(|s| {
            let keep = (s.window > BUS_DELAY_BOUND && phases[s.phase].checked && shown < 60) || shown < 10;
            shown += usize::from(keep);
            keep
        })
        .map(|s| format!("{s} (key on master {})", key_node[&s.key]))
        .collect();

    let mut per_node = vec![0usize; nodes];
    for n in key_node.values() {
        per_node[*n] += 1;
    }
    println!(
        "\nbus_cluster_processes: {INSTANCES} processes, {KEYS} keys (one writer each); masters (ports {:?}) \
         hold {per_node:?} keys and {subscriptions:?} bus subscriptions; master {victim} killed for 3 s; after \
         its restart cluster_state ok at {cluster_ok_ms} ms, recovery complete at {recovery_ms} ms",
        cluster.ports
    );
    let missed = |p: usize| {
        let cells: Vec<String> = cache_writes[p]
            .iter()
            .map(|(total, missed)| format!("{missed}/{total}"))
            .collect();
        cells.join(" ")
    };
    print_table(
        &phases,
        &rows,
        BUS_DELAY_BOUND,
        &[
            Column::Reads,
            Column::Stale,
            Column::Beyond,
            Column::ReadErrors,
            Column::Maybe,
            Column::P50,
            Column::P99,
            Column::Max,
            Column::Writes,
            Column::WriteErrors,
        ],
        Some(("cache-layer writes missed per master", &missed)),
    );
    for (phase, row) in phases.iter().zip(&rows) {
        if row.beyond > 0 {
            println!(
                "phase {}: the last read stale beyond {} ms began {} ms into the phase",
                phase.name,
                BUS_DELAY_BOUND / 1000,
                (row.last_beyond - phase.start) / 1000
            );
        }
    }
    println!("reads of a value never written: {}", unknown.len());
    for (i, e) in &events {
        if let Line::Stats(s) = e {
            println!("instance {i}: {s}");
        }
    }
    for s in &cache_causes {
        println!("cache layer missed a write: {s}");
    }
    for s in &failed_writes {
        println!("write error: {s}");
    }
    for s in &error_samples {
        println!("read error: {s}");
    }
    for s in &stale_reads {
        println!("stale: {s}");
    }
    for s in unknown.iter().take(20) {
        println!("never written: {s}");
    }

    common::run(Duration::from_secs(30), async {
        common::delete_prefix(&common::raw().await, &prefix).await;
    });

    let total: u64 = rows.iter().map(|r| r.reads).sum();
    assert!(total > 0, "no reads were recorded");
    assert!(rows[4].reads > 0, "no reads after recovery");
    assert!(
        unknown.is_empty(),
        "{} reads returned a value no write carried (see the `never written:` lines above)",
        unknown.len()
    );
    for (phase, row) in phases.iter().zip(&rows) {
        if phase.checked {
            assert_eq!(
                row.beyond, 0,
                "phase {}: reads stale beyond the bus delay with every server up (see the `stale:` lines above)",
                phase.name
            );
        }
    }
}
