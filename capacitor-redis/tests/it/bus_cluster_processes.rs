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

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capacitor_core::{Layer, LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_redis::{Reconnect, RedisBus, RedisConnection, RedisLayer};

const INSTANCES: usize = 3;
const KEYS: usize = 12;
/// A child ends by itself after this long, whatever the parent does.
const CHILD_LIFETIME: Duration = Duration::from_secs(90);
/// Every child line the parent reads starts with this (the test harness prints too).
const TAG: &str = "busclu ";

const ENV_INSTANCE: &str = "CAPACITOR_BUSCLU_INSTANCE";
const ENV_CACHE_URL: &str = "CAPACITOR_BUSCLU_CACHE_URL";
const ENV_PREFIX: &str = "CAPACITOR_BUSCLU_PREFIX";

/// Microseconds since the epoch: comparable across the processes of one machine.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn key_name(i: usize) -> String {
    format!("k{i}")
}

fn channel(prefix: &str) -> String {
    format!("{prefix}invalidate")
}

fn cache_prefix(prefix: &str) -> String {
    format!("{prefix}cache:")
}

/// The writer's counter in a value `instance:counter`: one writer per key, so the
/// counter orders the key's writes.
fn counter_of(value: &str) -> Option<u64> {
    value.split_once(':')?.1.parse().ok()
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
    let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
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
        println!("{TAG}ready {}", now_us());
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
                            println!(
                                "{TAG}status {round} {} {} {} {} {} {}",
                                if flushed.is_ok() { "ok" } else { "err" },
                                layer.replay_pending,
                                b.pending,
                                bus.is_connected(),
                                cache_layer.is_connected(),
                                now_us()
                            );
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
            let ended = now_us();
            // The cache layer took the write when its count of sets moved (only this
            // loop writes).
            let cached = cache_sets(&cache) > sets_before;
            match result {
                Ok(()) => println!("{TAG}W {key} {value} {begun} {ended} {}", u8::from(cached)),
                Err(e) => println!("{TAG}WE {key} {value} {begun} {ended} {e}"),
            }
            if cached {
                cause_shown = false;
            } else if !cause_shown {
                cause_shown = true;
                // The layer's own answer for the key, for the report (a read: it changes
                // nothing).
                let probe = cache_layer.exists(&key).await;
                println!(
                    "{TAG}CE {key} {ended} connected={} probe: {}",
                    cache_layer.is_connected(),
                    match probe {
                        Ok(b) => format!("ok {b}"),
                        Err(e) => format!("{:?}: {e}", e.kind()),
                    }
                );
            }
            for key in &keys {
                let begun = now_us();
                match cache.get(key).await {
                    Ok(v) => println!(
                        "{TAG}R {key} {} {begun} {}",
                        v.as_deref().unwrap_or("-"),
                        now_us()
                    ),
                    Err(e) => println!("{TAG}RE {key} {begun} {} {e}", now_us()),
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let stats = cache.stats();
        let layer = stats.layers.iter().find(|l| l.name == "cache").unwrap();
        let b = stats.bus.clone().unwrap_or_default();
        println!(
            "{TAG}stats cache_sets={} cache_errors={} cache_timeouts={} suspect_keys={} replayed={} \
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
        );
        let _ = cache.close().await;
        let _ = bus.close().await;
        println!("{TAG}done");
    });
}

/// A child, killed by PID when dropped.
struct ChildGuard {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl ChildGuard {
    fn send(&mut self, command: &str) {
        if let Some(stdin) = &mut self.stdin {
            let _ = writeln!(stdin, "{command}");
            let _ = stdin.flush();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A line of a child, as the parent parsed it.
enum Event {
    Ready,
    Write {
        key: String,
        value: String,
        begun: u64,
        ack: u64,
        cached: bool,
    },
    WriteError {
        key: String,
        value: String,
        begun: u64,
        message: String,
    },
    CacheError(String),
    Read {
        key: String,
        value: Option<String>,
        begun: u64,
        ended: u64,
    },
    ReadError {
        begun: u64,
        message: String,
    },
    Status {
        round: u64,
        ok: bool,
        replay_pending: u64,
        bus_pending: u64,
        bus_connected: bool,
    },
    Stats(String),
    Done,
    Other,
}

fn parse(line: &str) -> Event {
    let f: Vec<&str> = line.split(' ').collect();
    let n = |i: usize| f[i].parse::<u64>().unwrap();
    match f[0] {
        "ready" => Event::Ready,
        "W" => Event::Write {
            key: f[1].into(),
            value: f[2].into(),
            begun: n(3),
            ack: n(4),
            cached: f[5] == "1",
        },
        "WE" => Event::WriteError {
            key: f[1].into(),
            value: f[2].into(),
            begun: n(3),
            message: f[5..].join(" "),
        },
        "CE" => Event::CacheError(f[1..].join(" ")),
        "R" => Event::Read {
            key: f[1].into(),
            value: (f[2] != "-").then(|| f[2].to_owned()),
            begun: n(3),
            ended: n(4),
        },
        "RE" => Event::ReadError {
            begun: n(2),
            message: f[4..].join(" "),
        },
        "status" => Event::Status {
            round: n(1),
            ok: f[2] == "ok",
            replay_pending: n(3),
            bus_pending: n(4),
            bus_connected: f[5] == "true",
        },
        "stats" => Event::Stats(f[1..].join(" ")),
        "done" => Event::Done,
        _ => Event::Other,
    }
}

/// The parent's view: every line of every child, in arrival order.
struct Collector {
    rx: mpsc::Receiver<(usize, String)>,
    events: Vec<(usize, Event)>,
}

impl Collector {
    /// Takes the lines that arrived, waiting at most `wait` for the first one; the index
    /// of the first new event.
    fn drain(&mut self, wait: Duration) -> usize {
        let first = self.events.len();
        if let Ok((i, line)) = self.rx.recv_timeout(wait) {
            self.events.push((i, parse(&line)));
            while let Ok((i, line)) = self.rx.try_recv() {
                self.events.push((i, parse(&line)));
            }
        }
        first
    }

    /// Collects for `d`.
    fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.drain(end.saturating_duration_since(Instant::now()));
        }
    }

    /// Collects until `done` holds for the new events (each call sees only the events
    /// that arrived since the previous one), at most `timeout`.
    fn until(&mut self, timeout: Duration, what: &str, mut done: impl FnMut(&[(usize, Event)]) -> bool) {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out after {timeout:?} waiting for {what}");
            let first = self.drain(left.min(Duration::from_millis(100)));
            if done(&self.events[first..]) {
                return;
            }
        }
    }
}

/// Sends `status` to every child until all of them answer that their outbox flushed
/// (nothing pending on the bus), their bus is connected and their cache layer has
/// nothing left to replay; the moment they all did (µs).
fn wait_recovered(children: &mut [ChildGuard], collector: &mut Collector, timeout: Duration) -> u64 {
    let end = Instant::now() + timeout;
    let n = children.len();
    for round in 1u64.. {
        assert!(
            Instant::now() < end,
            "recovery did not complete within {timeout:?}"
        );
        for c in children.iter_mut() {
            c.send(&format!("status {round}"));
        }
        let mut answers: HashMap<usize, bool> = HashMap::new();
        collector.until(Duration::from_secs(15), "status answers", |events| {
            for (i, e) in events {
                if let Event::Status {
                    round: r,
                    ok,
                    replay_pending,
                    bus_pending,
                    bus_connected,
                } = e
                {
                    if *r == round {
                        answers.insert(
                            *i,
                            *ok && *replay_pending == 0 && *bus_pending == 0 && *bus_connected,
                        );
                    }
                }
            }
            answers.len() == n
        });
        if answers.values().all(|ok| *ok) {
            return now_us();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unreachable!()
}

/// The longest staleness the bus's own delay explains, on a loaded 2-core machine (as in
/// `bus_recovery`).
const BUS_DELAY_BOUND: u64 = 250_000;

struct Phase {
    name: &'static str,
    start: u64,
}

#[derive(Default)]
struct Row {
    reads: u64,
    stale: u64,
    /// Stale beyond [`BUS_DELAY_BOUND`].
    beyond: u64,
    /// When the last read stale beyond the bound began (µs).
    last_beyond: u64,
    read_errors: u64,
    /// Reads that returned a failed write's value.
    maybe: u64,
    windows: Vec<u64>,
    writes: u64,
    write_errors: u64,
    /// Per master: the writes of its keys, and how many of them the cache layer missed.
    cache_writes: Vec<(u64, u64)>,
}

fn pct(sorted: &[u64], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    format!("{:.1}", sorted[i] as f64 / 1000.0)
}

/// One acknowledged write of a key.
struct Acked {
    counter: u64,
    value: String,
    ack: u64,
}

#[test]
fn bus_three_processes_through_a_cluster_master_restart() {
    let prefix = common::unique_prefix("busclu");
    let mut cluster = Cluster::start();
    let cluster_url = cluster.url();
    let exe = std::env::current_exe().unwrap();
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut phases: Vec<Phase> = vec![Phase {
        name: "1 start-up",
        start: now_us(),
    }];
    let mut children: Vec<ChildGuard> = (0..INSTANCES)
        .map(|i| {
            let mut child = Command::new(&exe)
                .args([
                    "--exact",
                    "bus_cluster_processes::bus_cluster_processes_child",
                    "--ignored",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(ENV_INSTANCE, i.to_string())
                .env(ENV_CACHE_URL, &cluster_url)
                .env(ENV_PREFIX, &prefix)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("re-run the test binary as a child");
            let stdout = child.stdout.take().unwrap();
            let stdin = child.stdin.take();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(at) = line.find(TAG) {
                        if tx.send((i, line[at + TAG.len()..].to_owned())).is_err() {
                            break;
                        }
                    }
                }
            });
            ChildGuard { child, stdin }
        })
        .collect();
    drop(tx);
    let mut collector = Collector {
        rx,
        events: Vec::new(),
    };
    let mut ready = 0;
    collector.until(Duration::from_secs(40), "the children to start", |events| {
        ready += events.iter().filter(|(_, e)| matches!(e, Event::Ready)).count();
        ready == INSTANCES
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
    collector.run_for(Duration::from_secs(2));

    phases.push(Phase {
        name: "2 steady",
        start: now_us(),
    });
    collector.run_for(Duration::from_secs(3));

    phases.push(Phase {
        name: "3 master down",
        start: now_us(),
    });
    cluster.kill_node(victim);
    collector.run_for(Duration::from_secs(3));

    phases.push(Phase {
        name: "4 recovery",
        start: now_us(),
    });
    let restarted = now_us();
    cluster.start_node(victim);
    cluster.wait_ok(Duration::from_secs(30));
    let cluster_ok = now_us();
    let recovered = wait_recovered(&mut children, &mut collector, Duration::from_secs(30));
    collector.run_for(Duration::from_millis(500));
    let cluster_ok_ms = (cluster_ok - restarted) / 1000;
    let recovery_ms = (recovered - restarted) / 1000;

    phases.push(Phase {
        name: "5 recovered",
        start: now_us(),
    });
    collector.run_for(Duration::from_secs(4));
    let end = now_us();

    for c in &mut children {
        c.send("stop");
    }
    let mut done = 0;
    collector.until(Duration::from_secs(20), "the children to stop", |events| {
        done += events.iter().filter(|(_, e)| matches!(e, Event::Done)).count();
        done == INSTANCES
    });
    drop(children);

    // The checker. Per key, its writer's acknowledged writes in order (one writer per
    // key, so acknowledgement order is the store's order, and the counter's).
    let phase_of = |t: u64| phases.iter().rposition(|p| p.start <= t).unwrap_or(0);
    let nodes = cluster.ports.len();
    let mut rows: Vec<Row> = phases
        .iter()
        .map(|_| Row {
            cache_writes: vec![(0, 0); nodes],
            ..Row::default()
        })
        .collect();
    let mut writes: HashMap<String, Vec<Acked>> = HashMap::new();
    let mut maybe: HashSet<(String, String)> = HashSet::new();
    let mut failed_writes: Vec<String> = Vec::new();
    let mut cache_causes: Vec<String> = Vec::new();
    for (instance, e) in &collector.events {
        match e {
            Event::Write {
                key,
                value,
                begun,
                ack,
                cached,
            } => {
                let row = &mut rows[phase_of(*begun)];
                row.writes += 1;
                let node = key_node[key];
                row.cache_writes[node].0 += 1;
                row.cache_writes[node].1 += u64::from(!cached);
                writes.entry(key.clone()).or_default().push(Acked {
                    counter: counter_of(value).unwrap(),
                    value: value.clone(),
                    ack: *ack,
                });
            }
            Event::WriteError {
                key,
                value,
                begun,
                message,
            } => {
                let p = phase_of(*begun);
                rows[p].writes += 1;
                rows[p].write_errors += 1;
                maybe.insert((key.clone(), value.clone()));
                if failed_writes.len() < 10 {
                    failed_writes.push(format!(
                        "instance {instance} phase {}: {key} = {value}: {message}",
                        phases[p].name
                    ));
                }
            }
            Event::CacheError(s) => cache_causes.push(format!("instance {instance}: {s}")),
            _ => {}
        }
    }
    let acked: HashSet<(&str, &str)> = writes
        .iter()
        .flat_map(|(k, ws)| ws.iter().map(move |w| (k.as_str(), w.value.as_str())))
        .collect();
    let mut unknown: Vec<String> = Vec::new();
    let mut stale_reads: Vec<String> = Vec::new();
    let mut error_samples: Vec<String> = Vec::new();
    let checked = |p: usize| ["1", "2", "5"].iter().any(|n| phases[p].name.starts_with(n));
    for (instance, e) in &collector.events {
        match e {
            Event::Read {
                key,
                value,
                begun,
                ended,
            } if *begun <= end => {
                let p = phase_of(*begun);
                rows[p].reads += 1;
                // The served value's place among the key's writes: the counter of its
                // write (acknowledged or maybe), none for no value.
                let served = match value {
                    None => None,
                    Some(v) => {
                        let k = (key.clone(), v.clone());
                        if maybe.contains(&k) {
                            rows[p].maybe += 1;
                        } else if !acked.contains(&(key.as_str(), v.as_str())) {
                            unknown.push(format!(
                                "phase {} instance {instance} key {key} served {v} (read {begun}..{ended} µs)",
                                phases[p].name
                            ));
                            continue;
                        }
                        counter_of(v)
                    }
                };
                let ws = writes.get(key).map_or(&[][..], Vec::as_slice);
                // Writes acknowledged before the read began.
                let before = ws.partition_point(|w| w.ack < *begun);
                // The first acknowledged write the served value does not include (a
                // maybe value supersedes nothing: the first acknowledged write after it).
                let superseded_by = served.map_or(0, |c| ws.partition_point(|w| w.counter <= c));
                if superseded_by < before {
                    let sup = &ws[superseded_by];
                    rows[p].stale += 1;
                    let window = ended.saturating_sub(sup.ack);
                    rows[p].windows.push(window);
                    let beyond = window > BUS_DELAY_BOUND;
                    rows[p].beyond += u64::from(beyond);
                    if beyond {
                        rows[p].last_beyond = rows[p].last_beyond.max(*begun);
                    }
                    if (beyond && checked(p) && stale_reads.len() < 60) || stale_reads.len() < 10 {
                        stale_reads.push(format!(
                            "phase {} instance {instance} key {key} (master {}) served {} \
                             (read {begun}..{ended} µs) superseded by {} acked at {} ({} µs before the \
                             read began); latest acked before the read: {}",
                            phases[p].name,
                            key_node[key],
                            value.as_deref().unwrap_or("nothing"),
                            sup.value,
                            sup.ack,
                            begun - sup.ack,
                            ws[before - 1].value,
                        ));
                    }
                }
            }
            Event::ReadError { begun, message } if *begun <= end => {
                let p = phase_of(*begun);
                rows[p].reads += 1;
                rows[p].read_errors += 1;
                if error_samples.len() < 5 {
                    error_samples.push(format!("instance {instance} phase {}: {message}", phases[p].name));
                }
            }
            _ => {}
        }
    }

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
    println!(
        "{:<14} {:>7} {:>6} {:>7} {:>7} {:>6} {:>11} {:>11} {:>11} {:>7} {:>7}  cache-layer writes missed per master",
        "phase",
        "reads",
        "stale",
        ">250ms",
        "errors",
        "maybe",
        "win p50 ms",
        "win p99 ms",
        "win max ms",
        "writes",
        "w.errs"
    );
    for (phase, row) in phases.iter().zip(&mut rows) {
        row.windows.sort_unstable();
        let missed: Vec<String> = row
            .cache_writes
            .iter()
            .map(|(total, missed)| format!("{missed}/{total}"))
            .collect();
        println!(
            "{:<14} {:>7} {:>6} {:>7} {:>7} {:>6} {:>11} {:>11} {:>11} {:>7} {:>7}  {}",
            phase.name,
            row.reads,
            row.stale,
            row.beyond,
            row.read_errors,
            row.maybe,
            pct(&row.windows, 0.5),
            pct(&row.windows, 0.99),
            row.windows
                .last()
                .map_or("-".into(), |w| format!("{:.1}", *w as f64 / 1000.0)),
            row.writes,
            row.write_errors,
            missed.join(" "),
        );
    }
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
    for (i, e) in &collector.events {
        if let Event::Stats(s) = e {
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
    for (p, (phase, row)) in phases.iter().zip(&rows).enumerate() {
        if checked(p) {
            assert_eq!(
                row.beyond, 0,
                "phase {}: reads stale beyond the bus delay with every server up (see the `stale:` lines above)",
                phase.name
            );
        }
    }
}
