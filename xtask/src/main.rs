//! `cargo xtask`: the project's automation, in Rust rather than shell.
//!
//! - `cargo xtask test`: every test of the workspace (all features), doctests included.
//! - `cargo xtask bench [--quick] [SUITE…]`: criterion suites, then a table of
//!   capacitor / raw ratios in `target/capacitor-report/REPORT.md`.
//! - `cargo xtask ci`: fmt check, clippy `-D warnings`, feature-combination builds,
//!   `test`, docs with `-D warnings`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Instant, SystemTime};

mod services;

type Result<T = (), E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

const USAGE: &str = "usage: cargo xtask <test | bench [--quick] [SUITE...] | ci>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        Some("ci") => ci(),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs `cargo` with `args` in the workspace root, echoing the command.
fn cargo(args: &[&str]) -> Result {
    cargo_env(args, &[])
}

fn cargo_env(args: &[&str], env: &[(&str, &str)]) -> Result {
    let started = Instant::now();
    eprintln!("\n==> cargo {}", args.join(" "));
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status()?;
    eprintln!(
        "<== cargo {} ({:.1?}): {status}",
        args.first().unwrap_or(&""),
        started.elapsed()
    );
    if !status.success() {
        return Err(format!("`cargo {}` failed: {status}", args.join(" ")).into());
    }
    Ok(())
}

fn has_nextest() -> bool {
    Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Every test, with every feature: unit, integration, conformance, property tests, then
/// doctests (nextest does not run those).
fn test() -> Result {
    let started = Instant::now();
    // Before anything runs: the PostgreSQL tests fail (never skip) without a server. Sets
    // CAPACITOR_POSTGRES_URL for the cargo processes below.
    let postgres = services::ensure_postgres()?;
    let redis = services::ensure_redis()?;
    let runner = if has_nextest() {
        cargo(&[
            "nextest",
            "run",
            "--workspace",
            "--all-features",
            "--no-fail-fast",
        ])?;
        "cargo nextest"
    } else {
        cargo(&[
            "test",
            "--workspace",
            "--all-features",
            "--no-fail-fast",
            "--lib",
            "--bins",
            "--tests",
        ])?;
        "cargo test"
    };
    cargo(&["test", "--workspace", "--all-features", "--doc"])?;
    eprintln!(
        "\nxtask test: all tests passed ({runner} + doctests) in {:.0?}. Backends exercised: \
         memory (moka, dashmap), sled (temporary directories) and the test kit's layers in \
         process; PostgreSQL at {} ({}), and a private PostgreSQL cluster (initdb) for the \
         restart test; Redis at {} ({}), and private redis-server processes (killed, \
         restarted, a 3-master cluster, a sentinel) on free loopback ports.",
        started.elapsed(),
        postgres.redacted_url(),
        postgres.how,
        redis.redacted_url(),
        redis.how,
    );
    Ok(())
}

fn ci() -> Result {
    let started = Instant::now();
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["build", "-p", "capacitor", "--no-default-features"])?;
    for feature in [
        "memory",
        "sled",
        "redis",
        "redis-tls",
        "postgres",
        "postgres-tls",
        "full",
    ] {
        cargo(&[
            "build",
            "-p",
            "capacitor",
            "--no-default-features",
            "--features",
            feature,
        ])?;
    }
    test()?;
    cargo_env(
        &["doc", "--workspace", "--all-features", "--no-deps"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    eprintln!("\nxtask ci: green in {:.0?}", started.elapsed());
    Ok(())
}

/// DESIGN.md §4 targets, by group prefix: the highest acceptable capacitor / raw ratio.
const TARGETS: &[(&str, f64)] = &[
    ("l1_hit/", 1.2),
    ("l2_hit_promotion/", 1.1),
    ("sled_hit/", 1.1),
    ("sled_write_through/", 1.1),
    ("postgres_hit/", 1.1),
    ("postgres_write_through/", 1.1),
    ("write_back_set/", 1.5),
    ("redis_hit/", 1.1),
    ("redis_write_through/", 1.1),
    // Drain throughput >= 5x sequential raw writes.
    ("write_back_drain/postgres", 0.2),
    ("write_back_drain/redis", 0.2),
];

fn bench(args: &[String]) -> Result {
    let quick = args.iter().any(|a| a == "--quick");
    let mut suites: Vec<String> = args.iter().filter(|a| !a.starts_with("--")).cloned().collect();
    if suites.is_empty() {
        suites = bench_suites()?;
    }
    let started = SystemTime::now();
    for (i, suite) in suites.iter().enumerate() {
        eprintln!(
            "\n[{}/{}] bench suite `{suite}`{}",
            i + 1,
            suites.len(),
            if quick { " (quick)" } else { "" }
        );
        let mut cmd = vec![
            "bench",
            "-p",
            "capacitor-benches",
            "--bench",
            suite.as_str(),
            "--",
            "--noplot",
        ];
        if quick {
            cmd.extend([
                "--warm-up-time",
                "0.5",
                "--measurement-time",
                "1",
                "--sample-size",
                "20",
            ]);
        }
        cargo(&cmd)?;
    }
    let report = report(started)?;
    println!("{report}");
    Ok(())
}

fn bench_suites() -> Result<Vec<String>> {
    let mut suites = Vec::new();
    for entry in std::fs::read_dir(root().join("benches/benches"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                suites.push(stem.to_owned());
            }
        }
    }
    suites.sort();
    Ok(suites)
}

/// Median estimate (ns) of every benchmark criterion wrote since `since`, keyed by group
/// then function.
fn read_medians(dir: &Path, since: SystemTime, out: &mut BTreeMap<String, BTreeMap<String, f64>>) -> Result {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        let (bench, estimates) = (path.join("new/benchmark.json"), path.join("new/estimates.json"));
        if bench.is_file() && estimates.is_file() {
            if std::fs::metadata(&estimates)?.modified()? < since {
                continue;
            }
            let b: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&bench)?)?;
            let e: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&estimates)?)?;
            let group = b["group_id"].as_str().unwrap_or_default().to_owned();
            let function = b["function_id"].as_str().unwrap_or_default().to_owned();
            if let Some(median) = e["median"]["point_estimate"].as_f64() {
                out.entry(group).or_default().insert(function, median);
            }
        } else {
            read_medians(&path, since, out)?;
        }
    }
    Ok(())
}

fn fmt_ns(ns: f64) -> String {
    if ns < 0.0 {
        return format!("−{}", fmt_ns(-ns));
    }
    if ns >= 1_000_000.0 {
        format!("{:.2} ms", ns / 1_000_000.0)
    } else if ns >= 1_000.0 {
        format!("{:.2} µs", ns / 1_000.0)
    } else {
        format!("{ns:.1} ns")
    }
}

fn report(since: SystemTime) -> Result<String> {
    let mut medians = BTreeMap::new();
    read_medians(&root().join("target/criterion"), since, &mut medians)?;
    let mut md = String::new();
    writeln!(md, "# capacitor benchmark report\n")?;
    writeln!(
        md,
        "Medians from criterion, capacitor beside the raw backend call in the same run. \
         Ratio = capacitor / raw; overhead = capacitor − raw.\n"
    )?;
    writeln!(
        md,
        "| operation | capacitor | raw | ratio | overhead | target | met? |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|:---:|")?;
    for (group, functions) in &medians {
        let (Some(ours), Some(raw)) = (functions.get("capacitor"), functions.get("raw")) else {
            continue;
        };
        let ratio = ours / raw;
        let target = TARGETS
            .iter()
            .find(|(p, _)| group.starts_with(p))
            .map(|(_, t)| *t);
        let (target_s, met) = match target {
            Some(t) => (format!("≤ {t:.1}×"), if ratio <= t { "yes" } else { "no" }),
            None => ("—".to_owned(), "—"),
        };
        writeln!(
            md,
            "| `{group}` | {} | {} | {ratio:.2}× | {} | {target_s} | {met} |",
            fmt_ns(*ours),
            fmt_ns(*raw),
            fmt_ns(ours - raw)
        )?;
    }
    let dir = root().join("target/capacitor-report");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("REPORT.md"), &md)?;
    eprintln!("\nwrote {}", dir.join("REPORT.md").display());
    Ok(md)
}
