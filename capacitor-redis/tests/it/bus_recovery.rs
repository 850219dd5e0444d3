//! Coherence of three processes through outages of their Redis servers: three children
//! (this test binary run again with `--exact bus_recovery::bus_recovery_child
//! --ignored`), each a `MultiLayer` of a moka L1 (TTL 5 minutes: only the bus can cure
//! staleness), a `RedisLayer` cache and a `RedisLayer` store. The cache lives on one
//! private `redis-server`, the bus (`RedisBus`) on another, which the parent kills
//! (SIGKILL) and restarts; the store on the shared test server, under a prefix of its
//! own. Instance 2 reaches both private servers through fault proxies.
//!
//! The phases: 1 start-up, 2 steady; 3 both private servers down (writes go to the
//! store, the outbox keeps the announcements), 4 both back, until recovery completes,
//! 5 recovered; 6 instance 2's links cut at its proxies, 7 restored, until recovery
//! completes, 8 re-linked; 9 the bus server alone down (the cache layer stays up and
//! writes succeed, but nothing invalidates the other instances' L1s, which serve
//! replaced values: the table reports them), 10 it is back, until recovery completes
//! (the outboxes send what waited; each bus, re-subscribed, clears its instance's L1),
//! 11 re-bused.
//!
//! Every key has one writer (key `i` is written by instance `i % 3`) and every instance
//! reads all keys in a loop, printing each acknowledged write and each read with its
//! start and end time (µs since the epoch: one machine, one clock). The parent collects
//! the lines and checks every read: it is stale when the value it returned had already
//! been overwritten by a write acknowledged before the read began, and its staleness
//! window runs from that write's acknowledgement to the end of the read. The bus is
//! asynchronous (a write returns before other processes applied its message), so even
//! with every server up, reads within the bus delay of a write (milliseconds) are
//! stale; the table reports them per phase. Once recovery is complete (every instance
//! flushed its outbox, has nothing left to replay or to announce and both connections
//! of its bus up, plus a grace), no read may be stale beyond [`BUS_DELAY_BOUND`] (phases
//! 1, 2, 5, 8 and 11): an older value served longer would be a copy that recovery
//! failed to remove.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use capacitor_core::testkit::staleness::{
    self, check, now_us, print_table, Checked, Children, Column, Line, Out, Phases,
};
use capacitor_core::testkit::FaultProxy;
use capacitor_core::{LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_redis::{Reconnect, RedisBus, RedisConnection, RedisLayer};

const INSTANCES: usize = 3;
const KEYS: usize = 8;
/// The instance whose links to the private server go through a fault proxy.
const PROXIED: usize = 2;
/// A child ends by itself after this long, whatever the parent does.
const CHILD_LIFETIME: Duration = Duration::from_secs(90);
/// Every child line the parent reads starts with this (the test harness prints too).
const TAG: &str = "busrec ";
const OUT: Out = Out { tag: TAG };

const ENV_INSTANCE: &str = "CAPACITOR_BUSREC_INSTANCE";
const ENV_CACHE_URL: &str = "CAPACITOR_BUSREC_CACHE_URL";
const ENV_BUS_URL: &str = "CAPACITOR_BUSREC_BUS_URL";
const ENV_PREFIX: &str = "CAPACITOR_BUSREC_PREFIX";

fn key_name(i: usize) -> String {
    format!("k{i}")
}

struct Instance {
    cache: MultiLayer<String, String>,
    bus: Arc<RedisBus>,
    /// The proxied instance's proxies, in front of the cache server and the bus server.
    proxies: Vec<FaultProxy>,
}

/// A connection to one of the private servers: short timeouts and reconnect delays (the
/// outages last seconds, and a read waiting on the dead cache layer only delays its
/// fall-through to the store).
fn private(url: &str) -> RedisConnection {
    RedisConnection::new()
        .url(url)
        .command_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_secs(10))
        .reconnect(Reconnect::Exponential {
            min: Duration::from_millis(50),
            max: Duration::from_millis(500),
        })
}

async fn instance(index: usize, cache_url: &str, bus_url: &str, prefix: &str) -> Instance {
    let (proxies, cache_url, bus_url) = if index == PROXIED {
        let (cache_proxy, cache_via) = FaultProxy::in_front_of(cache_url, 6379).await.unwrap();
        let (bus_proxy, bus_via) = FaultProxy::in_front_of(bus_url, 6379).await.unwrap();
        (vec![cache_proxy, bus_proxy], cache_via, bus_via)
    } else {
        (Vec::new(), cache_url.to_owned(), bus_url.to_owned())
    };
    let bus = RedisBus::builder()
        .connection(private(&bus_url))
        .channel(format!("{prefix}invalidate"))
        .build()
        .unwrap();
    bus.connect().await.expect("the bus connects");
    let bus = Arc::new(bus);
    let cache_layer = RedisLayer::builder()
        .connection(private(&cache_url))
        .prefix(format!("{prefix}cache:"))
        .build()
        .unwrap();
    cache_layer.connect().await.expect("the cache layer connects");
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
        .layer(LayerConfig::new("cache", cache_layer))
        .layer(LayerConfig::new("store", store))
        .invalidation_bus(bus.clone())
        .build()
        .unwrap();
    Instance { cache, bus, proxies }
}

/// One child: writes its keys, reads all keys, obeys the parent's commands on stdin
/// (`cut`, `restore`, `status`, `stop`) and prints everything on stdout.
#[test]
#[ignore = "an instance of `bus_recovery_three_processes_through_an_outage`; does nothing alone"]
fn bus_recovery_child() {
    let Ok(index) = std::env::var(ENV_INSTANCE) else {
        return;
    };
    let index: usize = index.parse().unwrap();
    let cache_url = std::env::var(ENV_CACHE_URL).unwrap();
    let bus_url = std::env::var(ENV_BUS_URL).unwrap();
    let prefix = std::env::var(ENV_PREFIX).unwrap();
    let commands = staleness::commands();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let Instance { cache, bus, proxies } = instance(index, &cache_url, &bus_url, &prefix).await;
        OUT.ready();
        let own: Vec<usize> = (0..KEYS).filter(|k| k % INSTANCES == index).collect();
        let keys: Vec<String> = (0..KEYS).map(key_name).collect();
        let mut counter = 0u64;
        let started = Instant::now();
        while started.elapsed() < CHILD_LIFETIME {
            let mut stop = false;
            while let Ok(command) = commands.try_recv() {
                let (command, arg) = command.split_once(' ').unwrap_or((command.as_str(), ""));
                match command {
                    "cut" => {
                        assert!(!proxies.is_empty(), "only the proxied instance is cut");
                        for proxy in &proxies {
                            proxy.refuse(true);
                            proxy.reset_connections();
                        }
                        OUT.line(format_args!("cut {}", now_us()));
                    }
                    "restore" => {
                        assert!(!proxies.is_empty(), "only the proxied instance is cut");
                        for proxy in &proxies {
                            proxy.refuse(false);
                        }
                        OUT.line(format_args!("restored {}", now_us()));
                    }
                    "status" => {
                        let round = arg.to_owned();
                        let cache = cache.clone();
                        let transport = bus.clone();
                        tokio::spawn(async move {
                            let flushed = cache.flush().await;
                            let stats = cache.stats();
                            let layer = stats.layers.iter().find(|l| l.name == "cache").unwrap();
                            let bus = stats.bus.unwrap_or_default();
                            OUT.line(format_args!(
                                "status {round} {} {} {} {} {}",
                                if flushed.is_ok() { "ok" } else { "err" },
                                layer.replay_pending,
                                bus.pending,
                                if transport.is_connected() { "up" } else { "down" },
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
            let begun = now_us();
            let result = cache.set(key.clone(), value.clone()).await;
            OUT.write(&key, &value, begun, &result, "");
            OUT.read_all(&cache, &keys).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let stats = cache.stats();
        let layer = stats.layers.iter().find(|l| l.name == "cache").unwrap();
        let b = stats.bus.clone().unwrap_or_default();
        OUT.line(format_args!(
            "stats cache_errors={} replayed={} replay_pending={} bus_published={} \
             bus_publish_errors={} bus_pending={} bus_received={} bus_clears={}",
            layer.errors,
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

/// A child's answer to `status round`: whether its outbox flushed (and holds nothing
/// more), its cache layer has nothing left to replay and both connections of its bus
/// are up.
fn recovered(line: &Line, round: u64) -> Option<bool> {
    let Line::Other(line) = line else {
        return None;
    };
    let f: Vec<&str> = line.split(' ').collect();
    (f[0] == "status" && f[1].parse() == Ok(round))
        .then(|| f[2] == "ok" && f[3] == "0" && f[4] == "0" && f[5] == "up")
}

/// Sends `status` to every child until all of them answer they recovered (see
/// [`recovered`]); the moment they all did (µs).
fn wait_recovered(children: &mut Children, timeout: Duration) -> u64 {
    children.wait_recovered(timeout, Duration::from_secs(15), recovered)
}

/// The longest staleness the bus's own delay explains, on a loaded 2-core machine (the
/// steady phases measure p99 ≈ 3 ms, max ≈ 7 ms).
const BUS_DELAY_BOUND: u64 = 250_000;

#[test]
fn bus_recovery_three_processes_through_an_outage() {
    let prefix = common::unique_prefix("busrec");
    let mut server = common::RedisServer::start();
    let mut bus_server = common::RedisServer::start();
    // Steady phases: every server is up and every instance recovered, so no read may be
    // stale beyond [`BUS_DELAY_BOUND`].
    let mut phases = Phases::default();
    phases.begin("1 start-up", true);
    let mut children = Children::spawn(INSTANCES, "bus_recovery::bus_recovery_child", TAG, |i| {
        vec![
            (ENV_INSTANCE.into(), i.to_string()),
            (ENV_CACHE_URL.into(), server.url()),
            (ENV_BUS_URL.into(), bus_server.url()),
            (ENV_PREFIX.into(), prefix.clone()),
        ]
    });
    children.until_each(Duration::from_secs(40), "the children to start", |e| {
        matches!(e, Line::Ready)
    });
    children.run_for(Duration::from_secs(2));

    phases.begin("2 steady", true);
    children.run_for(Duration::from_secs(3));

    phases.begin("3 redis down", false);
    server.kill();
    bus_server.kill();
    children.run_for(Duration::from_secs(3));

    phases.begin("4 recovery", false);
    server.restart();
    bus_server.restart();
    let recovered = wait_recovered(&mut children, Duration::from_secs(30));
    children.run_for(Duration::from_millis(500));
    let recovery_ms = (recovered - phases.last().unwrap().start) / 1000;

    phases.begin("5 recovered", true);
    children.run_for(Duration::from_secs(4));

    phases.begin("6 link cut", false);
    children.send(PROXIED, "cut");
    children.run_for(Duration::from_secs(3));

    phases.begin("7 link back", false);
    children.send(PROXIED, "restore");
    let relinked = wait_recovered(&mut children, Duration::from_secs(30));
    children.run_for(Duration::from_millis(500));
    let relink_ms = (relinked - phases.last().unwrap().start) / 1000;

    phases.begin("8 re-linked", true);
    children.run_for(Duration::from_secs(3));

    // The bus alone: the cache layer stays up, so writes succeed and every instance keeps
    // filling its L1, which nothing invalidates until the bus is back.
    phases.begin("9 bus down", false);
    bus_server.kill();
    children.run_for(Duration::from_secs(3));

    phases.begin("10 bus back", false);
    bus_server.restart();
    let rebused = wait_recovered(&mut children, Duration::from_secs(30));
    children.run_for(Duration::from_millis(500));
    let rebus_ms = (rebused - phases.last().unwrap().start) / 1000;

    phases.begin("11 re-bused", true);
    children.run_for(Duration::from_secs(3));
    let end = now_us();

    children.send_all("stop");
    children.until_each(Duration::from_secs(20), "the children to stop", |e| {
        matches!(e, Line::Done)
    });
    let events = children.finish();

    let Checked { rows, stale, unknown } = check(&events, &phases, end, BUS_DELAY_BOUND);
    let failed_values: Vec<(&str, &str)> = events
        .iter()
        .filter_map(|(_, e)| match e {
            Line::WriteError { key, value, .. } => Some((key.as_str(), value.as_str())),
            _ => None,
        })
        .collect();
    // A few samples per phase, and in the steady phases every read stale beyond the bound
    // (up to 40): the ones that fail the test.
    let mut samples = vec![0; phases.len()];
    let stale_reads: Vec<String> = stale
        .iter()
        .filter(|s| {
            let beyond = phases[s.phase].checked && s.window > BUS_DELAY_BOUND;
            let shown = samples[s.phase] < 3 || (beyond && samples[s.phase] < 43);
            samples[s.phase] += usize::from(shown);
            shown
        })
        .map(ToString::to_string)
        .collect();
    let error_samples: Vec<String> = events
        .iter()
        .filter_map(|(instance, e)| match e {
            Line::ReadError { begun, message, .. } if *begun <= end => Some(format!(
                "instance {instance} phase {}: {message}",
                phases[phases.of(*begun)].name
            )),
            _ => None,
        })
        .take(5)
        .collect();

    println!("\nbus_recovery: {INSTANCES} processes, {KEYS} keys (one writer each), recovery after restart {recovery_ms} ms, after re-link {relink_ms} ms, after the bus restart {rebus_ms} ms");
    print_table(
        &phases,
        &rows,
        BUS_DELAY_BOUND,
        &[
            Column::Reads,
            Column::Stale,
            Column::Beyond,
            Column::ReadErrors,
            Column::P50,
            Column::P99,
            Column::Max,
        ],
        None,
    );
    println!(
        "write errors: {}; reads of a value never acknowledged: {}",
        failed_values.len(),
        unknown.len()
    );
    for (i, e) in &events {
        if let Line::Stats(s) = e {
            println!("instance {i}: {s}");
        }
    }
    for s in &error_samples {
        println!("read error: {s}");
    }
    for s in &stale_reads {
        println!("stale: {s}");
    }

    common::run(Duration::from_secs(30), async {
        common::delete_prefix(&common::raw().await, &prefix).await;
    });

    let total: u64 = rows.iter().map(|r| r.reads).sum();
    assert!(total > 0, "no reads were recorded");
    assert!(rows[4].reads > 0, "no reads after recovery");
    assert!(rows[10].reads > 0, "no reads after the bus came back");
    assert_eq!(
        rows[2].read_errors, 0,
        "reads failed while the cache Redis was down"
    );
    assert_eq!(
        rows[8].read_errors, 0,
        "reads failed while the bus alone was down"
    );
    assert!(failed_values.is_empty(), "writes failed: {failed_values:?}");
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
