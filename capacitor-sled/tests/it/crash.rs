//! Crash safety of `FlushPolicy::EveryWrite`: a child process writes through a memory +
//! sled `MultiLayer` and prints every acknowledged key; the parent kills it with SIGKILL
//! mid-stream, reopens the directory and finds every acknowledged key with its value.
//!
//! The child is this test binary run again with `--exact crash::crash_child_writer --ignored`
//! and the database directory in `CHILD_DIR_ENV`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capacitor_core::{Layer, LayerConfig, MultiLayer};
use capacitor_memory::MokaLayer;
use capacitor_sled::{FlushPolicy, SledLayer};

const CHILD_DIR_ENV: &str = "CAPACITOR_SLED_CRASH_CHILD_DIR";
/// The child's test name as libtest matches it with `--exact`: its path in the binary.
const CHILD_TEST: &str = "crash::crash_child_writer";
/// Marks an acknowledgement in the child's stdout, which libtest shares: its
/// `test crash::crash_child_writer ... ` has no newline, so the first ack shares its line.
const ACK: &str = "capacitor-ack ";
const ACKS_BEFORE_KILL: usize = 2_000;
/// How long the child writes at most if nobody kills it (a parent that died).
const CHILD_LIFETIME: Duration = Duration::from_secs(120);
const PARENT_DEADLINE: Duration = Duration::from_secs(120);

fn key(i: u64) -> String {
    format!("key:{i:08}")
}

fn value(i: u64) -> String {
    format!("value of {i}: {}", "x".repeat((i % 97) as usize))
}

#[test]
#[ignore = "the writer child of `acknowledged_writes_survive_sigkill`; does nothing alone"]
fn crash_child_writer() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV).map(PathBuf::from) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let disk = SledLayer::builder()
            .path(&dir)
            .flush_policy(FlushPolicy::EveryWrite)
            .build::<String, String>()
            .expect("open sled");
        let l1 = MokaLayer::builder().max_capacity(1_000).build().expect("moka");
        let cache = MultiLayer::<String, String>::builder()
            .layer(LayerConfig::new("memory", l1))
            .layer(LayerConfig::new("sled", disk))
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
            i += 1;
        }
    });
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_dir = dir.path().join("db");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            CHILD_TEST,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, &db_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the writer child");

    // Lines are read on a thread so that every wait below can be bounded.
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<u64>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let ack = line.find(ACK).map(|at| &line[at + ACK.len()..]);
            if let Some(n) = ack.and_then(|n| n.trim().parse().ok()) {
                if tx.send(n).is_err() {
                    break;
                }
            }
        }
    });

    let deadline = Instant::now() + PARENT_DEADLINE;
    let mut acked: Vec<u64> = Vec::new();
    while acked.len() < ACKS_BEFORE_KILL {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(n) => acked.push(n),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child gave {} acks before {e:?}", acked.len());
            }
        }
    }
    // SIGKILL on unix: no destructor, no flush-on-drop, no chance to finish a write.
    child.kill().expect("kill the child");
    let status = child.wait().expect("wait for the child");
    assert!(
        !status.success(),
        "the child must have died of the signal: {status:?}"
    );
    // Acks already in the pipe were acknowledged too: drain until the pipe closes.
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(n) => acked.push(n),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the child's stdout never closed"),
        }
    }
    reader.join().expect("reader thread");
    if let Some((at, &n)) = acked.iter().enumerate().find(|&(at, &n)| n != at as u64) {
        panic!("ack #{at} is {n}: the acks must be 0, 1, 2, ... (a line was lost or misread)");
    }

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let layer = SledLayer::builder()
            .path(&db_dir)
            .build::<String, String>()
            .expect("reopen after the crash");
        let mut missing = Vec::new();
        for &i in &acked {
            match layer.get(&key(i)).await.expect("get") {
                Some(entry) => assert_eq!(entry.value, value(i), "key {i}"),
                None => missing.push(i),
            }
        }
        assert!(
            missing.is_empty(),
            "{} of {} acknowledged writes lost, first {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(10)]
        );
        layer.close().await.expect("close");
    });
}
