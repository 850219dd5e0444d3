//! Crash safety under each `Durability` policy: a child process writes through a memory +
//! redb `MultiLayer` and prints every acknowledged key; the parent kills it with SIGKILL
//! mid-stream, reopens the file (redb repairs it) and counts the acknowledged keys that
//! are missing. Every round checks what the policy promises:
//!
//! - `Immediate`: no acknowledged write is missing.
//! - `EveryMillis(500)`: only writes acknowledged in the last window before the kill (500
//!   ms, plus slack for a loaded machine) may be missing.
//! - `Manual`: the child flushes once, after ack 1,000; every write acknowledged before
//!   the flush survives, the later ones may not.
//!
//! In every case what survives is a prefix of the acknowledged writes (redb's commits are
//! ordered and the child writes one key at a time), each with its value. The counts are
//! printed (`--nocapture`): the crate guide's table comes from them.
//!
//! The child is this test binary run again with `--exact crash::crash_child_writer
//! --ignored`, the database file in `CHILD_FILE_ENV` and the policy in `CHILD_POLICY_ENV`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capacitor_core::{Layer, LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_redb::{Durability, RedbLayer};

const CHILD_FILE_ENV: &str = "CAPACITOR_REDB_CRASH_CHILD_FILE";
const CHILD_POLICY_ENV: &str = "CAPACITOR_REDB_CRASH_CHILD_POLICY";
/// The child's test name as libtest matches it with `--exact`: its path in the binary.
const CHILD_TEST: &str = "crash::crash_child_writer";
/// Marks an acknowledgement in the child's stdout, which libtest shares: its
/// `test crash::crash_child_writer ... ` has no newline, so the first ack shares its line.
const ACK: &str = "capacitor-ack ";
/// Marks the end of the child's flush (`Manual`): every ack before it is durable.
const FLUSHED: &str = "capacitor-flushed ";
/// The ack after which the `Manual` child flushes.
const FLUSH_AFTER: u64 = 1_000;
/// The kill comes after this many acks and this long after the first one.
const ACKS_BEFORE_KILL: usize = 2_000;
const RUN_BEFORE_KILL: Duration = Duration::from_millis(2_000);
/// `EveryMillis`'s window in these tests, and the slack allowed on top of it.
const WINDOW_MS: u64 = 500;
const SLACK: Duration = Duration::from_millis(1_500);
/// Rounds per policy; `CAPACITOR_REDB_CRASH_ROUNDS` overrides it.
const ROUNDS: usize = 3;
/// How long the child writes at most if nobody kills it (a parent that died).
const CHILD_LIFETIME: Duration = Duration::from_secs(120);
const PARENT_DEADLINE: Duration = Duration::from_secs(120);

fn key(i: u64) -> String {
    format!("key:{i:08}")
}

fn value(i: u64) -> String {
    format!("value of {i}: {}", "x".repeat((i % 97) as usize))
}

fn policy_named(name: &str) -> Durability {
    match name {
        "immediate" => Durability::Immediate,
        "every-millis" => Durability::EveryMillis(WINDOW_MS),
        "manual" => Durability::Manual,
        other => panic!("unknown policy {other}"),
    }
}

#[test]
#[ignore = "the writer child of the crash tests; does nothing alone"]
fn crash_child_writer() {
    let Some(file) = std::env::var_os(CHILD_FILE_ENV).map(PathBuf::from) else {
        return;
    };
    let policy = policy_named(&std::env::var(CHILD_POLICY_ENV).expect("policy"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let disk = RedbLayer::builder()
            .path(&file)
            .durability(policy)
            .build::<String, String>()
            .expect("open redb");
        let l1 = MokaLayer::builder().max_capacity(1_000).build().expect("moka");
        let cache = MultiLayer::<String, String>::builder()
            .layer(LayerConfig::new("memory", l1))
            .layer(LayerConfig::new("redb", disk.clone()))
            .build()
            .expect("multi");
        let started = Instant::now();
        let stdout = std::io::stdout();
        let mut i = 0u64;
        while started.elapsed() < CHILD_LIFETIME {
            cache.set(key(i), value(i)).await.expect("set");
            // Printed only after `set` returned: every line is an acknowledged write.
            let mut out = stdout.lock();
            writeln!(out, "{ACK}{i}").expect("stdout");
            out.flush().expect("flush stdout");
            drop(out);
            if policy == Durability::Manual && i == FLUSH_AFTER {
                disk.flush().await.expect("flush");
                let mut out = stdout.lock();
                writeln!(out, "{FLUSHED}{i}").expect("stdout");
                out.flush().expect("flush stdout");
            }
            i += 1;
        }
    });
}

/// What the child said, and when the parent heard it.
enum Line {
    Ack(u64, Instant),
    Flushed(u64),
}

/// One round's outcome.
struct Round {
    acked: usize,
    missing: usize,
    /// How long before the kill the first missing ack was received.
    oldest_missing_before_kill: Option<Duration>,
}

/// Runs a child under `policy`, kills it, reopens and checks the policy's promise.
fn crash_round(policy_name: &str) -> Round {
    let policy = policy_named(policy_name);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("db.redb");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            CHILD_TEST,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_FILE_ENV, &file)
        .env(CHILD_POLICY_ENV, policy_name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the writer child");

    // Lines are read on a thread so that every wait below can be bounded.
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<Line>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let parse = |marker: &str| {
                line.find(marker)
                    .and_then(|at| line[at + marker.len()..].trim().parse::<u64>().ok())
            };
            let msg = if let Some(n) = parse(ACK) {
                Line::Ack(n, Instant::now())
            } else if let Some(n) = parse(FLUSHED) {
                Line::Flushed(n)
            } else {
                continue;
            };
            if tx.send(msg).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + PARENT_DEADLINE;
    let mut acked: Vec<(u64, Instant)> = Vec::new();
    let mut flushed: Option<u64> = None;
    let mut record = |line: Line, acked: &mut Vec<(u64, Instant)>| match line {
        Line::Ack(n, at) => acked.push((n, at)),
        Line::Flushed(n) => flushed = Some(n),
    };
    while acked.len() < ACKS_BEFORE_KILL || acked[0].1.elapsed() < RUN_BEFORE_KILL {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => record(line, &mut acked),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child gave {} acks before {e:?}", acked.len());
            }
        }
    }
    // The child holds redb's lock on the file: another process's open is a typed error.
    let err = RedbLayer::builder()
        .path(&file)
        .sweeper(false)
        .lock_wait(Duration::ZERO)
        .build::<String, String>()
        .expect_err("the child has the file open");
    assert_eq!(err.kind(), capacitor_core::ErrorKind::Unavailable, "{err}");
    // SIGKILL on unix: no destructor, no flush-on-drop, no chance to finish a write.
    child.kill().expect("kill the child");
    let killed_at = Instant::now();
    let status = child.wait().expect("wait for the child");
    assert!(
        !status.success(),
        "the child must have died of the signal: {status:?}"
    );
    // Acks already in the pipe were acknowledged too: drain until the pipe closes.
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => record(line, &mut acked),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the child's stdout never closed"),
        }
    }
    reader.join().expect("reader thread");
    if let Some((at, &(n, _))) = acked.iter().enumerate().find(|&(at, &(n, _))| n != at as u64) {
        panic!("ack #{at} is {n}: the acks must be 0, 1, 2, ... (a line was lost or misread)");
    }

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let missing: Vec<(u64, Instant)> = rt.block_on(async {
        let layer = RedbLayer::builder()
            .path(&file)
            .build::<String, String>()
            .expect("reopen after the crash");
        let mut missing = Vec::new();
        for &(i, at) in &acked {
            match layer.get(&key(i)).await.expect("get") {
                Some(entry) => {
                    assert!(
                        missing.is_empty(),
                        "{policy:?}: key {i} survived but {} acknowledged before it did not: \
                         what survives must be a prefix",
                        missing.len()
                    );
                    assert_eq!(entry.value, value(i), "key {i}");
                }
                None => missing.push((i, at)),
            }
        }
        layer.close().await.expect("close");
        missing
    });

    let oldest_missing_before_kill = missing
        .first()
        .map(|&(_, at)| killed_at.saturating_duration_since(at));
    match policy {
        Durability::Immediate => assert!(
            missing.is_empty(),
            "Immediate: {} of {} acknowledged writes lost, first {:?}",
            missing.len(),
            acked.len(),
            missing.first().map(|m| m.0)
        ),
        Durability::EveryMillis(ms) => {
            if let Some(age) = oldest_missing_before_kill {
                assert!(
                    age <= Duration::from_millis(ms) + SLACK,
                    "EveryMillis({ms}): a write acknowledged {age:?} before the kill was lost \
                     ({} lost of {})",
                    missing.len(),
                    acked.len()
                );
            }
        }
        Durability::Manual => {
            let flushed = flushed.expect("the child flushed after ack FLUSH_AFTER");
            assert_eq!(flushed, FLUSH_AFTER);
            if let Some(&(first, _)) = missing.first() {
                assert!(
                    first > flushed,
                    "Manual: key {first}, acknowledged before the flush of {flushed}, was lost"
                );
            }
        }
        _ => unreachable!("a policy of this test"),
    }
    Round {
        acked: acked.len(),
        missing: missing.len(),
        oldest_missing_before_kill,
    }
}

fn rounds() -> usize {
    std::env::var("CAPACITOR_REDB_CRASH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(ROUNDS)
}

/// Runs the rounds of `policy` and prints their counts.
fn crash_rounds(policy: &str) {
    for round in 1..=rounds() {
        let r = crash_round(policy);
        println!(
            "crash {policy} round {round}: {} acknowledged, {} missing after SIGKILL{}",
            r.acked,
            r.missing,
            r.oldest_missing_before_kill
                .map(|age| format!(" (the oldest acknowledged {age:.0?} before the kill)"))
                .unwrap_or_default()
        );
    }
}

#[test]
fn immediate_loses_no_acknowledged_write() {
    crash_rounds("immediate");
}

#[test]
fn every_millis_loses_at_most_the_last_window() {
    crash_rounds("every-millis");
}

#[test]
fn manual_keeps_what_was_flushed() {
    crash_rounds("manual");
}
