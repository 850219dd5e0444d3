//! `cargo xtask`: the project's automation, in Rust rather than shell.
//!
//! - `cargo xtask test`: every test of the workspace (all features), doctests included,
//!   against Redis and PostgreSQL (found, started, or throwaway servers: see `services`).
//! - `cargo xtask bench [--quick] [SUITE…]`: criterion suites and the `icount` suite
//!   (instruction counts with callgrind, through gungraun), then a report of capacitor /
//!   raw / peer medians and counts and an SVG chart in
//!   `$CARGO_TARGET_DIR/capacitor-report/` (else `target/capacitor-report/`).
//! - `cargo xtask imports`: no crate's modules import each other in a cycle.
//! - `cargo xtask deny`: `cargo deny check` against `deny.toml` (licences, duplicate
//!   versions, sources, advisories), installing cargo-deny when missing (see `deny`).
//! - `cargo xtask ci`: fmt check, `imports`, clippy `-D warnings`, feature-combination
//!   builds, `test`, docs with `-D warnings`, `deny`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Instant, SystemTime};

mod chart;
mod deny;
mod icount;
mod imports;
mod report;
mod services;

use services::{Backend, Purpose, Services};

type Result<T = (), E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

const USAGE: &str = "usage: cargo xtask <test | bench [--quick] [SUITE...] | imports [DIR] | deny | ci>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        Some("imports") => check_imports(args.get(1).map_or_else(root, PathBuf::from)),
        Some("deny") => deny::check(),
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

/// Whether this is a CI run (`CI=true`, as CI sets it).
fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Runs `cargo` with `args` in the workspace root, echoing the command.
fn cargo(args: &[&str]) -> Result {
    cargo_env::<&str, &str>(args, &[])
}

fn cargo_env<K: AsRef<str>, V: AsRef<str>>(args: &[&str], env: &[(K, V)]) -> Result {
    let started = Instant::now();
    eprintln!("\n==> cargo {}", args.join(" "));
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(root());
    for (k, v) in env {
        cmd.env(k.as_ref(), v.as_ref());
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
/// doctests (nextest does not run those). Redis and PostgreSQL come from `services`; a
/// missing one fails under CI and is skipped loudly elsewhere (its tests left out).
fn test() -> Result {
    let started = Instant::now();
    let ci = is_ci();
    // Holds any throwaway servers: they are stopped when this is dropped, also on failure.
    let services = Services::prepare(Purpose::Test);
    let missing: Vec<Backend> = services.require(ci)?.into_iter().map(|(b, _)| b).collect();
    let env = services.env();
    let result = run_tests(&env, &missing);
    eprintln!("\n{}", test_summary(&services, &missing, &result, started));
    result.map(|_| ())
}

/// Runs the tests, leaving out those of the `missing` backends; returns what ran them.
fn run_tests(env: &[(String, String)], missing: &[Backend]) -> Result<&'static str> {
    let runner = if has_nextest() {
        let mut args = vec![
            "nextest",
            "run",
            "--workspace",
            "--all-features",
            "--no-fail-fast",
        ];
        let filter = nextest_filter(missing);
        if let Some(filter) = &filter {
            args.extend(["-E", filter.as_str()]);
        }
        cargo_env(&args, env)?;
        "cargo nextest"
    } else {
        let mut args = vec![
            "test",
            "--workspace",
            "--all-features",
            "--no-fail-fast",
            "--lib",
            "--bins",
            "--tests",
        ];
        // Without nextest a single test binary cannot be left out: its whole package is.
        let excluded = fallback_exclusions(missing);
        for p in &excluded {
            args.extend(["--exclude", p]);
        }
        cargo_env(&args, env)?;
        "cargo test"
    };
    let mut doc = vec!["test", "--workspace", "--all-features", "--doc"];
    for b in missing {
        doc.extend(["--exclude", b.package()]);
    }
    cargo_env(&doc, env)?;
    Ok(runner)
}

/// The nextest filter expression that leaves out the tests of the `missing` backends.
fn nextest_filter(missing: &[Backend]) -> Option<String> {
    if missing.is_empty() {
        return None;
    }
    let mut sets: Vec<String> = Vec::new();
    for b in missing {
        sets.push(format!("package({})", b.package()));
        for (package, tests) in b.other_tests() {
            let set = format!("(package({package}) & {tests})");
            if !sets.contains(&set) {
                sets.push(set);
            }
        }
    }
    Some(format!("not ({})", sets.join(" | ")))
}

/// The packages `cargo test` leaves out for the `missing` backends (no nextest).
fn fallback_exclusions(missing: &[Backend]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for b in missing {
        for p in std::iter::once(b.package()).chain(b.other_tests().iter().map(|(p, _)| *p)) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// What ran against what.
fn test_summary(
    services: &Services,
    missing: &[Backend],
    result: &Result<&'static str>,
    started: Instant,
) -> String {
    let mut lines = vec![match result {
        Ok(runner) => format!(
            "xtask test: all tests passed ({runner} + doctests) in {:.0?}.",
            started.elapsed()
        ),
        Err(e) => format!("xtask test: FAILED after {:.0?}: {e}", started.elapsed()),
    }];
    lines.push(
        "  - memory (moka, dashmap), redb and sled (temporary files and directories), the test kit's layers: in process"
            .to_owned(),
    );
    for backend in [Backend::Postgres, Backend::Redis] {
        lines.push(match services.get(backend) {
            Ok(s) => format!(
                "  - {} ({}): against {} ({}){}",
                backend.name(),
                backend.package(),
                s.redacted_url(),
                s.how,
                match backend {
                    Backend::Postgres => "; the restart test also starts a private cluster (initdb)",
                    Backend::Redis => {
                        "; the fault, cluster and sentinel tests also start private redis-server \
                         processes on free loopback ports"
                    }
                }
            ),
            Err(why) => format!(
                "  - {}: SKIPPED, {} and {} left out: {why}",
                backend.name(),
                backend.package(),
                backend
                    .other_tests()
                    .iter()
                    .map(|(p, b)| format!("{p}'s `{b}` tests"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    if !missing.is_empty() {
        lines.push(format!(
            "  !!! Tests needing {} did not run: this is not a full test run.",
            missing.iter().map(|b| b.name()).collect::<Vec<_>>().join(" and ")
        ));
    }
    lines.join("\n")
}

/// Fails naming every cycle in the import graph of a crate's modules, in the workspace
/// at `root` (this one unless `cargo xtask imports DIR` names another checkout).
fn check_imports(root: PathBuf) -> Result {
    let mut found = Vec::new();
    for krate in imports::CRATES {
        let dir = root.join(krate);
        if !dir.join("src").is_dir() {
            return Err(format!("{} has no {krate}/src: not a capacitor checkout", root.display()).into());
        }
        for cycle in imports::cycles(&dir)? {
            found.push(format!("{krate}: {}", cycle.join(" <-> ")));
        }
    }
    if found.is_empty() {
        eprintln!(
            "xtask imports: no import cycle among the modules of {}",
            imports::CRATES.join(", ")
        );
        return Ok(());
    }
    Err(format!("modules that import each other:\n  {}", found.join("\n  ")).into())
}

fn ci() -> Result {
    let started = Instant::now();
    cargo(&["fmt", "--all", "--", "--check"])?;
    check_imports(root())?;
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
        "redb",
        "sled",
        "redis",
        "redis-tls",
        "postgres",
        "postgres-tls",
        "json",
        "bincode",
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
    // Core's unit tests once without features: the codec paths of a default build (CI's
    // other tests build every feature).
    cargo(&["test", "-p", "capacitor-core", "--lib"])?;
    test()?;
    cargo_env(
        &["doc", "--workspace", "--all-features", "--no-deps"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    deny::check()?;
    eprintln!("\nxtask ci: green in {:.0?}", started.elapsed());
    Ok(())
}

/// The backends a suite needs (it skips itself without them; xtask says so first).
fn suite_needs(suite: &str) -> &'static [Backend] {
    match suite {
        "redis" => &[Backend::Redis],
        "postgres" => &[Backend::Postgres],
        "tiers" | "resilience" | "batching" => &[Backend::Redis, Backend::Postgres],
        _ => &[],
    }
}

/// The builds a suite runs in, as extra cargo arguments. `observe` compares the same
/// code built without and with the benches crate's `observe` feature (capacitor's
/// `metrics` and `tracing`): its measurements are named `raw` and `capacitor` by build.
fn suite_builds(suite: &str) -> &'static [&'static [&'static str]] {
    match suite {
        "observe" => &[&[], &["--features", "observe"]],
        _ => &[&[]],
    }
}

/// Criterion's options for a quick run: short warm-up and measurement, criterion's minimum
/// of 10 samples, fewer bootstrap resamples. The suites also read `CAPACITOR_BENCH_QUICK`
/// and keep their expensive setups small.
const QUICK_CRITERION: &[&str] = &[
    "--warm-up-time",
    "0.2",
    "--measurement-time",
    "0.5",
    "--sample-size",
    "10",
    "--nresamples",
    "2000",
];

fn bench(args: &[String]) -> Result {
    let quick = args.iter().any(|a| a == "--quick");
    if let Some(unknown) = args.iter().find(|a| a.starts_with("--") && *a != "--quick") {
        return Err(format!("unknown option {unknown}; {USAGE}").into());
    }
    let all = bench_suites()?;
    let mut suites: Vec<String> = args.iter().filter(|a| !a.starts_with("--")).cloned().collect();
    if let Some(unknown) = suites.iter().find(|s| !all.contains(s)) {
        return Err(format!("no bench suite `{unknown}`; the suites are: {}", all.join(", ")).into());
    }
    if suites.is_empty() {
        suites = all;
    }
    let wall = Instant::now();
    let started = SystemTime::now();
    // Only the backends some chosen suite needs; any throwaway server lives until the end.
    let needed: Vec<Backend> = [Backend::Postgres, Backend::Redis]
        .into_iter()
        .filter(|b| suites.iter().any(|s| suite_needs(s).contains(b)))
        .collect();
    let services = (!needed.is_empty()).then(|| Services::prepare(Purpose::Bench));
    let mut env: Vec<(String, String)> = services.as_ref().map(Services::env).unwrap_or_default();
    if quick {
        env.push(("CAPACITOR_BENCH_QUICK".to_owned(), "1".to_owned()));
    }
    // The icount suite needs valgrind and the gungraun-runner of the library's version.
    let mut tools = Vec::new();
    let mut skipped = Vec::new();
    if suites.iter().any(|s| s == icount::SUITE) {
        let ready = icount::ensure_valgrind().and_then(|valgrind| {
            let version = icount::gungraun_version(&root())?;
            icount::ensure_runner(&version)?;
            Ok(format!(
                "icount: callgrind ({valgrind}) through gungraun {version}, cache simulation on"
            ))
        });
        match ready {
            Ok(line) => tools.push(line),
            Err(why) => {
                eprintln!("\nbench suite `icount`: SKIPPED ({why})");
                skipped.push(format!("`icount` ({why})"));
                suites.retain(|s| s != icount::SUITE);
            }
        }
    }
    // Build every chosen suite in one cargo run first (cargo compiles them in parallel);
    // then each run below only starts its binary.
    let mut build = vec!["bench", "-p", "capacitor-benches", "--no-run"];
    for suite in &suites {
        build.extend(["--bench", suite.as_str()]);
    }
    eprintln!("\n[build] {} bench suite(s)", suites.len());
    cargo_env(&build, &env)?;
    if suites.iter().any(|s| suite_builds(s).len() > 1) {
        cargo_env(
            &[
                "bench",
                "-p",
                "capacitor-benches",
                "--no-run",
                "--features",
                "observe",
                "--bench",
                "observe",
            ],
            &env,
        )?;
    }
    let mut ran = Vec::new();
    for (i, suite) in suites.iter().enumerate() {
        let missing: Vec<String> = suite_needs(suite)
            .iter()
            .filter_map(|b| {
                services
                    .as_ref()
                    .and_then(|s| s.get(*b).err())
                    .map(|why| format!("{}: {why}", b.name()))
            })
            .collect();
        if !missing.is_empty() {
            let why = missing.join("; ");
            eprintln!(
                "\n[{}/{}] bench suite `{suite}`: SKIPPED ({why})",
                i + 1,
                suites.len()
            );
            skipped.push(format!("`{suite}` ({why})"));
            continue;
        }
        eprintln!(
            "\n[{}/{}] bench suite `{suite}`{}",
            i + 1,
            suites.len(),
            if quick { " (quick)" } else { "" }
        );
        if suite == icount::SUITE {
            // gungraun's own options, not criterion's; one execution per benchmark, so
            // the same in a quick run. It writes summary.json files for the report.
            let mut icount_env = env.clone();
            icount_env.push(("GUNGRAUN_SAVE_SUMMARY".to_owned(), "json".to_owned()));
            cargo_env(
                &["bench", "-p", "capacitor-benches", "--bench", icount::SUITE],
                &icount_env,
            )?;
            ran.push(suite.clone());
            continue;
        }
        for extra in suite_builds(suite) {
            let mut cmd = vec!["bench", "-p", "capacitor-benches", "--bench", suite.as_str()];
            cmd.extend(extra.iter());
            cmd.extend(["--", "--noplot"]);
            if quick {
                cmd.extend(QUICK_CRITERION);
            }
            cargo_env(&cmd, &env)?;
        }
        ran.push(suite.clone());
    }
    let mut info = report::RunInfo {
        date: report::today(),
        machine: report::machine(),
        mode: format!(
            "`cargo xtask bench{}` ({}), suites: {}",
            if quick { " --quick" } else { "" },
            if quick {
                format!("criterion {}; small setups", QUICK_CRITERION.join(" "))
            } else {
                "criterion defaults".to_owned()
            },
            ran.join(", ")
        ),
        services: tools,
        skipped,
    };
    if let Some(services) = &services {
        for b in &needed {
            info.services.push(match services.get(*b) {
                Ok(s) => format!("{}: {} ({})", b.name(), s.redacted_url(), s.how),
                Err(why) => format!("{}: not available ({why})", b.name()),
            });
        }
    }
    let dir = write_report(started, &info)?;
    eprintln!(
        "\nxtask bench: {} suite(s) ran, {} skipped, in {:.0?}; report: {}",
        ran.len(),
        info.skipped.len(),
        wall.elapsed(),
        dir.join("REPORT.md").display()
    );
    for s in &info.skipped {
        eprintln!("  skipped: {s}");
    }
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

/// Writes REPORT.md and bench.svg from what criterion wrote since `since`, and merges the
/// groups measured into docs/benchmarks.md and docs/bench.svg (the other groups' rows are
/// kept, with their dates); returns the report's directory.
fn write_report(since: SystemTime, info: &report::RunInfo) -> Result<PathBuf> {
    let target = report::target_dir(&root());
    let criterion = target.join("criterion");
    let mut medians = report::Medians::new();
    report::read_medians(&criterion, since, &mut medians)?;
    let docs = root().join("docs");
    let published_path = docs.join("benchmarks.md");
    let old = match std::fs::read_to_string(&published_path) {
        Ok(text) => report::parse_published(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => report::Published::default(),
        Err(e) => return Err(format!("reading {}: {e}", published_path.display()).into()),
    };
    // The icount rows take the names of the criterion groups they map onto.
    let groups: Vec<String> = medians.keys().chain(old.medians.keys()).cloned().collect();
    let icounts = icount::read(
        &target.join("gungraun/capacitor-benches").join(icount::SUITE),
        since,
        &groups,
    )?;
    let dir = target.join("capacitor-report");
    std::fs::create_dir_all(&dir)?;
    let subtitle = format!("{}, {}", info.date, info.machine);
    let chart = match chart::svg(&medians, &icounts, &subtitle)? {
        Some(svg) => {
            std::fs::write(dir.join("bench.svg"), svg)?;
            eprintln!("wrote {}", dir.join("bench.svg").display());
            Some("bench.svg")
        }
        None => None,
    };
    let md = report::markdown(&medians, &icounts, info, chart)?;
    std::fs::write(dir.join("REPORT.md"), &md)?;
    println!("{md}");
    eprintln!(
        "wrote {} (medians read from {})",
        dir.join("REPORT.md").display(),
        criterion.display()
    );
    if report::rows(&medians).is_empty() && report::icount_rows(&icounts).is_empty() {
        eprintln!("{} left as it was: no group measured", published_path.display());
        return Ok(dir);
    }
    let published = report::merge(old, &medians, &icounts, info);
    std::fs::create_dir_all(&docs)?;
    let mut dates: Vec<&str> = published
        .dates
        .values()
        .map(|d| d.split(',').next().unwrap_or_default())
        .collect();
    dates.sort_unstable();
    let span = match (dates.first(), dates.last()) {
        (Some(first), Some(last)) if first != last => format!("{first} to {last}"),
        _ => info.date.clone(),
    };
    let chart = match chart::svg(
        &published.medians,
        &published.icounts,
        &format!("{span}, {}", info.machine),
    )? {
        Some(svg) => {
            std::fs::write(docs.join("bench.svg"), svg)?;
            eprintln!("wrote {}", docs.join("bench.svg").display());
            Some("bench.svg")
        }
        None => None,
    };
    std::fs::write(&published_path, report::published_markdown(&published, chart)?)?;
    eprintln!(
        "wrote {} ({} rows, {} from this run)",
        published_path.display(),
        published.medians.len(),
        report::rows(&medians).len()
    );
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nextest_filters_leave_out_a_missing_backends_tests() {
        assert_eq!(nextest_filter(&[]), None);
        assert_eq!(
            nextest_filter(&[Backend::Redis]).as_deref(),
            Some(
                "not (package(capacitor-redis) \
                 | (package(capacitor) & binary(it) & test(/^(resilience|history|refresh)::/)) \
                 | (package(capacitor) & binary(extremes_backends)))"
            )
        );
        assert_eq!(
            nextest_filter(&[Backend::Postgres, Backend::Redis]).as_deref(),
            Some(
                "not (package(capacitor-postgres) \
                 | (package(capacitor) & binary(it) & test(/^(resilience|history)::/)) \
                 | (package(capacitor) & binary(extremes_backends)) \
                 | package(capacitor-redis) \
                 | (package(capacitor) & binary(it) & test(/^(resilience|history|refresh)::/)))"
            )
        );
        assert_eq!(
            fallback_exclusions(&[Backend::Postgres, Backend::Redis]),
            ["capacitor-postgres", "capacitor", "capacitor-redis"]
        );
    }

    #[test]
    fn every_suite_is_known() {
        let suites = bench_suites().unwrap();
        for s in [
            "batching",
            "codecs",
            "composer",
            "embedded",
            "icount",
            "postgres",
            "redis",
            "sled",
            "tiers",
            "writeback",
        ] {
            assert!(suites.iter().any(|x| x == s), "{s}");
        }
        assert_eq!(suite_needs("tiers"), &[Backend::Redis, Backend::Postgres]);
        assert_eq!(suite_needs("batching"), &[Backend::Redis, Backend::Postgres]);
        assert!(suite_needs("composer").is_empty());
    }
}
