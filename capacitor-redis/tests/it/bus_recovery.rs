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

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

const ENV_INSTANCE: &str = "CAPACITOR_BUSREC_INSTANCE";
const ENV_CACHE_URL: &str = "CAPACITOR_BUSREC_CACHE_URL";
const ENV_BUS_URL: &str = "CAPACITOR_BUSREC_BUS_URL";
const ENV_PREFIX: &str = "CAPACITOR_BUSREC_PREFIX";

/// Microseconds since the epoch: comparable across the processes of one machine.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

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
        let Instance { cache, bus, proxies } = instance(index, &cache_url, &bus_url, &prefix).await;
        println!("{TAG}ready {}", now_us());
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
                        println!("{TAG}cut {}", now_us());
                    }
                    "restore" => {
                        assert!(!proxies.is_empty(), "only the proxied instance is cut");
                        for proxy in &proxies {
                            proxy.refuse(false);
                        }
                        println!("{TAG}restored {}", now_us());
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
                            println!(
                                "{TAG}status {round} {} {} {} {} {}",
                                if flushed.is_ok() { "ok" } else { "err" },
                                layer.replay_pending,
                                bus.pending,
                                if transport.is_connected() { "up" } else { "down" },
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
            let begun = now_us();
            match cache.set(key.clone(), value.clone()).await {
                Ok(()) => println!("{TAG}W {key} {value} {begun} {}", now_us()),
                Err(e) => println!("{TAG}WE {key} {value} {begun} {} {e}", now_us()),
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
            "{TAG}stats cache_errors={} replayed={} replay_pending={} bus_published={} \
             bus_publish_errors={} bus_pending={} bus_received={} bus_clears={}",
            layer.errors,
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
        ack: u64,
    },
    WriteError {
        key: String,
        value: String,
    },
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
            ack: n(4),
        },
        "WE" => Event::WriteError {
            key: f[1].into(),
            value: f[2].into(),
        },
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
            bus_connected: f[5] == "up",
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

/// Sends `status` to every child until all of them answer that their outbox flushed (and
/// holds nothing more), their cache layer has nothing left to replay and both
/// connections of their bus are up; the moment they all did (µs).
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

/// The longest staleness the bus's own delay explains, on a loaded 2-core machine (the
/// steady phases measure p99 ≈ 3 ms, max ≈ 7 ms).
const BUS_DELAY_BOUND: u64 = 250_000;

struct Phase {
    name: &'static str,
    start: u64,
    /// Every server is up and every instance recovered: no read may be stale beyond
    /// [`BUS_DELAY_BOUND`].
    steady: bool,
}

impl Phase {
    /// A phase that starts now.
    fn now(name: &'static str, steady: bool) -> Self {
        Phase {
            name,
            start: now_us(),
            steady,
        }
    }
}

#[derive(Default)]
struct Row {
    reads: u64,
    stale: u64,
    /// Stale beyond [`BUS_DELAY_BOUND`].
    beyond: u64,
    read_errors: u64,
    windows: Vec<u64>,
}

fn pct(sorted: &[u64], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    format!("{:.1}", sorted[i] as f64 / 1000.0)
}

#[test]
fn bus_recovery_three_processes_through_an_outage() {
    let prefix = common::unique_prefix("busrec");
    let mut server = common::RedisServer::start();
    let mut bus_server = common::RedisServer::start();
    let exe = std::env::current_exe().unwrap();
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut phases: Vec<Phase> = vec![Phase::now("1 start-up", true)];
    let mut children: Vec<ChildGuard> = (0..INSTANCES)
        .map(|i| {
            let mut child = Command::new(&exe)
                .args([
                    "--exact",
                    "bus_recovery::bus_recovery_child",
                    "--ignored",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(ENV_INSTANCE, i.to_string())
                .env(ENV_CACHE_URL, server.url())
                .env(ENV_BUS_URL, bus_server.url())
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
    collector.run_for(Duration::from_secs(2));

    phases.push(Phase::now("2 steady", true));
    collector.run_for(Duration::from_secs(3));

    phases.push(Phase::now("3 redis down", false));
    server.kill();
    bus_server.kill();
    collector.run_for(Duration::from_secs(3));

    phases.push(Phase::now("4 recovery", false));
    server.restart();
    bus_server.restart();
    let recovered = wait_recovered(&mut children, &mut collector, Duration::from_secs(30));
    collector.run_for(Duration::from_millis(500));
    let recovery_ms = (recovered - phases.last().unwrap().start) / 1000;

    phases.push(Phase::now("5 recovered", true));
    collector.run_for(Duration::from_secs(4));

    phases.push(Phase::now("6 link cut", false));
    children[PROXIED].send("cut");
    collector.run_for(Duration::from_secs(3));

    phases.push(Phase::now("7 link back", false));
    children[PROXIED].send("restore");
    let relinked = wait_recovered(&mut children, &mut collector, Duration::from_secs(30));
    collector.run_for(Duration::from_millis(500));
    let relink_ms = (relinked - phases.last().unwrap().start) / 1000;

    phases.push(Phase::now("8 re-linked", true));
    collector.run_for(Duration::from_secs(3));

    // The bus alone: the cache layer stays up, so writes succeed and every instance keeps
    // filling its L1, which nothing invalidates until the bus is back.
    phases.push(Phase::now("9 bus down", false));
    bus_server.kill();
    collector.run_for(Duration::from_secs(3));

    phases.push(Phase::now("10 bus back", false));
    bus_server.restart();
    let rebused = wait_recovered(&mut children, &mut collector, Duration::from_secs(30));
    collector.run_for(Duration::from_millis(500));
    let rebus_ms = (rebused - phases.last().unwrap().start) / 1000;

    phases.push(Phase::now("11 re-bused", true));
    collector.run_for(Duration::from_secs(3));
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
    // key, so acknowledgement order is the store's order).
    let mut writes: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    let mut write_errors = 0;
    let mut failed_values: Vec<(String, String)> = Vec::new();
    for (_, e) in &collector.events {
        match e {
            Event::Write { key, value, ack } => {
                writes.entry(key.clone()).or_default().push((value.clone(), *ack))
            }
            Event::WriteError { key, value } => {
                write_errors += 1;
                failed_values.push((key.clone(), value.clone()));
            }
            _ => {}
        }
    }
    let position: HashMap<(&str, &str), usize> = writes
        .iter()
        .flat_map(|(k, ws)| {
            ws.iter()
                .enumerate()
                .map(move |(i, (v, _))| ((k.as_str(), v.as_str()), i))
        })
        .collect();
    let phase_of = |t: u64| phases.iter().rposition(|p| p.start <= t).unwrap_or(0);
    let mut rows: Vec<Row> = phases.iter().map(|_| Row::default()).collect();
    let mut unknown = 0;
    let mut stale_reads: Vec<String> = Vec::new();
    let mut samples: Vec<usize> = vec![0; phases.len()];
    let mut error_samples: Vec<String> = Vec::new();
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
                let ws = writes.get(key).map_or(&[][..], Vec::as_slice);
                // Writes acknowledged before the read began.
                let before = ws.partition_point(|(_, ack)| *ack < *begun);
                if before == 0 {
                    continue;
                }
                let served = match value {
                    None => None,
                    Some(v) => match position.get(&(key.as_str(), v.as_str())) {
                        Some(i) => Some(*i),
                        None => {
                            unknown += 1;
                            continue;
                        }
                    },
                };
                // Stale: the served value's write is older than the last write acknowledged
                // before the read began (no value at all: older than every write).
                let superseded_by = served.map_or(0, |i| i + 1);
                if superseded_by < before {
                    let (sup_value, sup_ack) = &ws[superseded_by];
                    rows[p].stale += 1;
                    let window = ended.saturating_sub(*sup_ack);
                    rows[p].windows.push(window);
                    rows[p].beyond += u64::from(window > BUS_DELAY_BOUND);
                    // A few samples per phase, and in the steady phases every read stale
                    // beyond the bound (up to 40): the ones that fail the test.
                    let beyond = phases[p].steady && window > BUS_DELAY_BOUND;
                    if samples[p] < 3 || (beyond && samples[p] < 43) {
                        samples[p] += 1;
                        stale_reads.push(format!(
                            "phase {} instance {instance} key {key} served {} (read {begun}..{ended} µs) \
                             superseded by {sup_value} acked at {sup_ack} ({} µs before the read began); \
                             latest acked before the read: {}",
                            phases[p].name,
                            value.as_deref().unwrap_or("nothing"),
                            begun - sup_ack,
                            ws[before - 1].0,
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

    println!("\nbus_recovery: {INSTANCES} processes, {KEYS} keys (one writer each), recovery after restart {recovery_ms} ms, after re-link {relink_ms} ms, after the bus restart {rebus_ms} ms");
    println!(
        "{:<14} {:>8} {:>7} {:>8} {:>7} {:>12} {:>12} {:>12}",
        "phase", "reads", "stale", ">250ms", "errors", "win p50 ms", "win p99 ms", "win max ms"
    );
    for (phase, row) in phases.iter().zip(&mut rows) {
        row.windows.sort_unstable();
        println!(
            "{:<14} {:>8} {:>7} {:>8} {:>7} {:>12} {:>12} {:>12}",
            phase.name,
            row.reads,
            row.stale,
            row.beyond,
            row.read_errors,
            pct(&row.windows, 0.5),
            pct(&row.windows, 0.99),
            row.windows
                .last()
                .map_or("-".into(), |w| format!("{:.1}", *w as f64 / 1000.0)),
        );
    }
    println!("write errors: {write_errors}; reads of a value never acknowledged: {unknown}");
    for (i, e) in &collector.events {
        if let Event::Stats(s) = e {
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
    assert_eq!(write_errors, 0, "writes failed: {failed_values:?}");
    for (phase, row) in phases.iter().zip(&rows) {
        if phase.steady {
            assert_eq!(
                row.beyond, 0,
                "phase {}: reads stale beyond the bus delay with every server up (see the `stale:` lines above)",
                phase.name
            );
        }
    }
}
