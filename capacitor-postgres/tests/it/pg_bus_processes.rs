//! Coherence of three processes through a crash of PostgreSQL: three children (this test
//! binary run again with `--exact pg_bus_processes::pg_bus_processes_child --ignored`),
//! each a `MultiLayer` of a moka L1 (TTL 5 minutes: only the bus can cure staleness) over
//! a `PostgresLayer` store, with a `PostgresBus`. Store and bus live on a private
//! PostgreSQL server (initdb into a temporary directory, a free loopback port) that the
//! parent runs as a child process, kills with its backends (SIGKILL to the postmaster and
//! each of its children, as in a crash) and starts again on the same port and data directory.
//!
//! Every key has one writer (key `i` is written by instance `i % 3`) and every instance
//! reads all keys in a loop, printing each write (acknowledged or failed) and each read
//! with its start and end time (µs since the epoch: one machine, one clock). The parent
//! collects the lines and checks every read: it is stale when the value it returned had
//! already been overwritten by a write acknowledged before the read began, and its
//! staleness window runs from that write's acknowledgement to the end of the read. A
//! write that failed (the server down, a timeout) may or may not have been applied: its
//! value is one a read may return, never one that supersedes another. The bus is
//! asynchronous, so even with the server up reads within the bus delay of a write are
//! stale; the table reports them per phase. While the server is down writes fail (the
//! store is down) and reads of keys not in L1 fail; those are counted, not asserted.
//! Before the outage, and once recovery is complete (every instance flushed its outbox,
//! has nothing pending and its bus connected again, plus a grace), no read may be stale beyond
//! [`BUS_DELAY_BOUND`]: an older value served longer would be a copy the bus's
//! re-subscription or messages failed to remove.
//!
//! Needs PostgreSQL's server binaries (`pg_config --bindir`). As root, `initdb` runs
//! through `runuser` and the server through `setpriv` (which execs, so the child's PID is
//! the postmaster's) as the `postgres` user: both refuse root.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capacitor_core::testkit::staleness::{
    self, check, now_us, print_table, Checked, Children, Column, Line, Out, Phases,
};
use capacitor_core::{LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_postgres::{PostgresBus, PostgresLayer};

const INSTANCES: usize = 3;
const KEYS: usize = 8;
/// A child ends by itself after this long, whatever the parent does.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
/// The whole test, server start-up included, stays under this.
const TEST_BUDGET: Duration = Duration::from_secs(58);
/// Every child line the parent reads starts with this (the test harness prints too).
const TAG: &str = "pgproc ";
const OUT: Out = Out { tag: TAG };
const TABLE: &str = "pgproc_kv";
const CHANNEL: &str = "pgproc_invalidate";

const ENV_INSTANCE: &str = "CAPACITOR_PGPROC_INSTANCE";
const ENV_URL: &str = "CAPACITOR_PGPROC_URL";

fn key_name(i: usize) -> String {
    format!("k{i}")
}

struct Instance {
    cache: MultiLayer<String, String>,
    bus: Arc<PostgresBus>,
}

async fn instance(url: &str) -> Instance {
    // Short timeouts and reconnect delays: the outage lasts seconds, and an operation
    // waiting on the dead server only delays its failure.
    let bus = PostgresBus::builder()
        .url(format!("{url}?application_name=pgproc_bus"))
        .channel(CHANNEL)
        .connect_timeout(Duration::from_secs(2))
        .publish_timeout(Duration::from_millis(500))
        .reconnect_delay(Duration::from_millis(50), Duration::from_millis(500))
        .build()
        .unwrap();
    bus.connect().await.expect("the bus connects");
    let bus = Arc::new(bus);
    let store = PostgresLayer::builder()
        .url(url)
        .table(TABLE)
        .pool_size(4)
        .create_timeout(Duration::from_secs(1))
        .wait_timeout(Duration::from_secs(1))
        .statement_timeout(Duration::from_secs(2))
        .build::<String, String>()
        .await
        .expect("the store connects");
    let cache = MultiLayer::<String, String>::builder()
        .layer(
            LayerConfig::new("l1", MokaLayer::builder().max_capacity(100).build().unwrap())
                .ttl(Duration::from_secs(300)),
        )
        .layer(LayerConfig::new("store", store))
        .invalidation_bus(bus.clone())
        .build()
        .unwrap();
    Instance { cache, bus }
}

/// One child: writes its keys, reads all keys, obeys the parent's commands on stdin
/// (`status`, `stop`) and prints everything on stdout.
#[test]
#[ignore = "an instance of `pg_bus_processes_three_processes_through_a_crash`; does nothing alone"]
fn pg_bus_processes_child() {
    let Ok(index) = std::env::var(ENV_INSTANCE) else {
        return;
    };
    let index: usize = index.parse().unwrap();
    let url = std::env::var(ENV_URL).unwrap();
    let commands = staleness::commands();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let Instance { cache, bus } = instance(&url).await;
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
                    "status" => {
                        let round = arg.to_owned();
                        let cache = cache.clone();
                        let bus = bus.clone();
                        tokio::spawn(async move {
                            let flushed = cache.flush().await;
                            let stats = cache.stats().bus.unwrap_or_default();
                            OUT.line(format_args!(
                                "status {round} {} {} {} {} {}",
                                if flushed.is_ok() { "ok" } else { "err" },
                                stats.pending,
                                u8::from(bus.is_connected()),
                                stats.clears,
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
        let store = stats.layers.iter().find(|l| l.name == "store").unwrap();
        let b = stats.bus.clone().unwrap_or_default();
        OUT.line(format_args!(
            "stats store_errors={} bus_published={} bus_publish_errors={} bus_pending={} \
             bus_received={} bus_ignored={} bus_clears={}",
            store.errors, b.published, b.publish_errors, b.pending, b.received, b.ignored, b.clears
        ));
        let _ = cache.close().await;
        let _ = bus.close().await;
        OUT.done();
    });
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A private PostgreSQL server, its postmaster a child process of the test.
struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    postmaster: Option<Child>,
}

impl PgServer {
    /// initdb (trust authentication, user `postgres`) and a first start.
    fn start() -> PgServer {
        let out = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("pg_config --bindir (PostgreSQL's server binaries are needed)");
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            bin.join("initdb").is_file() && bin.join("postgres").is_file(),
            "no initdb/postgres in `pg_config --bindir` ({})",
            bin.display()
        );
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("capacitor-pgproc-")
            .tempdir()
            .expect("tempdir");
        if as_postgres {
            let status = Command::new("chown")
                .arg("postgres:")
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the server's directory to postgres");
        }
        let mut server = PgServer {
            dir,
            bin,
            port: free_port(),
            as_postgres,
            postmaster: None,
        };
        let data = server.data();
        let mut initdb = if as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(server.bin.join("initdb"));
            c
        } else {
            Command::new(server.bin.join("initdb"))
        };
        let out = initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .current_dir(server.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        server.spawn();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the postmaster and waits (at most 30 s) until it accepts connections.
    fn spawn(&mut self) {
        let postgres = self.bin.join("postgres");
        let mut cmd = if self.as_postgres {
            // setpriv execs: the child's PID is the postmaster's.
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"])
                .arg(&postgres);
            c
        } else {
            Command::new(&postgres)
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("server log");
        cmd.arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.path().display()))
            // A process crash loses nothing the kernel already has.
            .args(["-c", "fsync=off"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.postmaster = Some(cmd.spawn().expect("start postgres"));
        let started = Instant::now();
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            if let Some(status) = self.postmaster.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("postgres exited ({status}): {}", self.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "postgres did not accept connections within 30 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// SIGKILL to the postmaster and its children at once, as in a crash, then reaps the
    /// postmaster. Each backend is a process group of its own (PostgreSQL calls `setsid`),
    /// so the postmaster is stopped first (it forks no more), its children listed, and
    /// then all of them killed.
    fn kill(&mut self) {
        if let Some(mut child) = self.postmaster.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-STOP", &pid]).status();
            let mut pids = children_of(child.id());
            pids.push(pid);
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(&pids)
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
            // Crash recovery refuses to start while a backend still holds the shared memory.
            let started = Instant::now();
            while pids.iter().any(|p| alive(p)) && started.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Starts again on the same port and data directory (crash recovery runs first).
    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// The PIDs of `parent`'s children, from `/proc/<pid>/stat` (the parent's PID is the
/// field after the command name, which is in parentheses and may hold spaces).
fn children_of(parent: u32) -> Vec<String> {
    let parent = parent.to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            name.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid = after.split_whitespace().nth(1)?;
            (ppid == parent).then_some(name)
        })
        .collect()
}

/// A child's `status` line: round, flushed, pending, bus connected, clears.
fn status(line: &Line) -> Option<(u64, bool, u64, bool, u64)> {
    let Line::Other(line) = line else {
        return None;
    };
    let f: Vec<&str> = line.split(' ').collect();
    (f[0] == "status").then(|| {
        let n = |i: usize| f[i].parse::<u64>().unwrap();
        (n(1), f[2] == "ok", n(3), f[4] == "1", n(5))
    })
}

/// Sends `status` to every child until all of them answer that their outbox flushed,
/// nothing is pending and their bus is connected; the moment they all did (µs). The
/// publisher and the subscriber reconnect independently: an empty outbox says the
/// publisher is back, not that the subscription is (until it restarts, and clears L1,
/// the instance misses every message and may keep serving copies from before the crash).
fn wait_recovered(children: &mut Children, timeout: Duration) -> u64 {
    children.wait_recovered(timeout, Duration::from_secs(10), |line, round| {
        let (r, ok, pending, connected, _) = status(line)?;
        (r == round).then_some(ok && pending == 0 && connected)
    })
}

/// The longest staleness the bus's own delay explains, on a loaded 2-core machine.
const BUS_DELAY_BOUND: u64 = 250_000;

#[test]
fn pg_bus_processes_three_processes_through_a_crash() {
    let budget = Instant::now() + TEST_BUDGET;
    let mut server = PgServer::start();
    let url = server.url();
    // Checked phases (the server up): no read may be stale beyond the bound.
    let mut phases = Phases::default();
    phases.begin("1 start-up", true);
    let mut children = Children::spawn(INSTANCES, "pg_bus_processes::pg_bus_processes_child", TAG, |i| {
        vec![
            (ENV_INSTANCE.into(), i.to_string()),
            (ENV_URL.into(), url.clone()),
        ]
    })
    .deadline(budget, TEST_BUDGET);
    children.until_each(Duration::from_secs(20), "the children to start", |e| {
        matches!(e, Line::Ready)
    });
    children.run_for(Duration::from_secs(2));

    phases.begin("2 steady", true);
    children.run_for(Duration::from_secs(3));

    phases.begin("3 pg down", false);
    server.kill();
    children.run_for(Duration::from_secs(3));

    phases.begin("4 recovery", false);
    server.restart();
    let restarted_ms = (now_us() - phases.last().unwrap().start) / 1000;
    let recovered = wait_recovered(&mut children, Duration::from_secs(20));
    children.run_for(Duration::from_millis(500));
    let recovery_ms = (recovered - phases.last().unwrap().start) / 1000;

    phases.begin("5 recovered", true);
    children.run_for(Duration::from_secs(4));
    let end = now_us();

    children.send_all("stop");
    children.until_each(Duration::from_secs(10), "the children to stop", |e| {
        matches!(e, Line::Done)
    });
    let events = children.finish();
    drop(server);

    // Per key, its writer's attempts in order (one writer per key, writes one at a time,
    // and a write that failed never lands after a later acknowledged one: the layer
    // fences it), so the position of a value is its place in the store's order.
    let Checked { rows, stale, unknown } = check(&events, &phases, end, BUS_DELAY_BOUND);
    let mut write_error_samples: Vec<String> = Vec::new();
    let mut read_error_samples: Vec<String> = Vec::new();
    // Errors of operations that began and ended inside a phase with the server up.
    let mut errors_while_up: Vec<String> = Vec::new();
    let ended_in = |p: usize, t: u64| phases.get(p + 1).is_none_or(|next| t < next.start);
    for (instance, e) in &events {
        let (p, ended, line, samples) = match e {
            Line::WriteError {
                key,
                value,
                begun,
                ended,
                message,
            } => {
                let p = phases.of(*begun);
                let line = format!(
                    "instance {instance} phase {} write {key}={value} ({begun}..{ended} µs): {message}",
                    phases[p].name
                );
                (p, *ended, line, &mut write_error_samples)
            }
            Line::ReadError {
                begun,
                ended,
                message,
                ..
            } if *begun <= end => {
                let p = phases.of(*begun);
                let line = format!(
                    "instance {instance} phase {} ({begun}..{ended} µs): {message}",
                    phases[p].name
                );
                (p, *ended, line, &mut read_error_samples)
            }
            _ => continue,
        };
        if phases[p].checked && ended_in(p, ended) {
            errors_while_up.push(line.clone());
        }
        if samples.len() < 3 {
            samples.push(line);
        }
    }
    // A few of each phase beyond the bound, and many with the server up.
    let mut shown = vec![0; phases.len()];
    let stale_reads: Vec<String> = stale
        .iter()
        .filter(|s| {
            let n = &mut shown[s.phase];
            let keep = s.window > BUS_DELAY_BOUND && (*n < 4 || (phases[s.phase].checked && *n < 40));
            *n += usize::from(keep);
            keep
        })
        .map(ToString::to_string)
        .collect();

    println!(
        "\npg_bus_processes: {INSTANCES} processes, {KEYS} keys (one writer each), server back {restarted_ms} ms \
         after the restart began, recovery complete after {recovery_ms} ms"
    );
    print_table(
        &phases,
        &rows,
        BUS_DELAY_BOUND,
        &[
            Column::Reads,
            Column::Stale,
            Column::Beyond,
            Column::ReadErrors,
            Column::Writes,
            Column::WriteErrors,
            Column::P50,
            Column::P99,
            Column::Max,
        ],
        None,
    );
    println!("reads of a value never written: {}", unknown.len());
    for (i, e) in &events {
        if let Line::Stats(s) = e {
            println!("instance {i}: {s}");
        } else if let Some((round, ok, pending, connected, clears)) = status(e) {
            println!(
                "instance {i}: status round {round}: flush {} pending {pending} bus connected {connected} clears {clears}",
                if ok { "ok" } else { "err" }
            );
        }
    }
    for s in &write_error_samples {
        println!("write error: {s}");
    }
    for s in &read_error_samples {
        println!("read error: {s}");
    }
    for s in &stale_reads {
        println!("stale: {s}");
    }
    for s in unknown.iter().take(10) {
        println!("unknown: {s}");
    }

    let total: u64 = rows.iter().map(|r| r.reads).sum();
    assert!(total > 0, "no reads were recorded");
    assert!(rows[1].reads > 0, "no reads before the crash");
    assert!(rows[4].reads > 0, "no reads after recovery");
    assert!(rows[4].writes > 0, "no writes after recovery");
    assert!(unknown.is_empty(), "reads of values never written: {unknown:?}");
    assert!(
        errors_while_up.is_empty(),
        "operations failed with the server up: {errors_while_up:?}"
    );
    for (phase, row) in phases.iter().zip(&rows) {
        if phase.checked {
            assert_eq!(
                row.beyond, 0,
                "phase {}: reads stale beyond the bus delay with the server up (see the `stale:` lines above)",
                phase.name
            );
        }
    }
    assert!(
        Instant::now() < budget,
        "the test took longer than its {TEST_BUDGET:?} budget"
    );
}
