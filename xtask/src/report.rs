//! `target/capacitor-report/`: REPORT.md (capacitor beside raw and the peers, targets,
//! derived figures) and bench.svg, from the medians criterion wrote during the run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::Result;

/// Medians (ns) by group, then function.
pub(crate) type Medians = BTreeMap<String, BTreeMap<String, f64>>;

/// What callgrind counted for one execution of one side of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Count {
    /// Instructions executed.
    pub(crate) ir: u64,
    /// Callgrind's estimated cycles (from its cache simulation), when it ran.
    pub(crate) cycles: Option<u64>,
}

/// Instruction counts (the `icount` suite) by row, named as the criterion group they
/// sit beside, then side (`capacitor`, `raw`).
pub(crate) type Icounts = BTreeMap<String, BTreeMap<String, Count>>;

/// The icount columns of the results table, in order.
const ICOUNT_COLUMNS: &[&str] = &[
    "instr capacitor",
    "instr raw",
    "instr ratio",
    "est. cycles capacitor",
    "est. cycles raw",
    "est. cycles ratio",
];

/// The rows with both sides counted.
pub(crate) fn icount_rows(icounts: &Icounts) -> Vec<(&String, Count, Count)> {
    icounts
        .iter()
        .filter_map(|(g, s)| Some((g, *s.get("capacitor")?, *s.get("raw")?)))
        .collect()
}

/// The functions of a group that are peers (shown as extra columns), in column order.
pub(crate) const PEERS: &[(&str, &str)] = &[
    ("hand_written", "hand-written (moka + fred [+ tokio-postgres])"),
    ("foyer", "foyer in-memory"),
    // The batching suite's composer with read batching off.
    ("unbatched", "capacitor, batching off"),
];

/// The performance targets, by group prefix: the highest acceptable capacitor / raw ratio
/// (the report's `target` column).
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
    ("tier3_l2_hit/", 1.1),
    ("tier3_l3_hit/", 1.1),
    // The metrics + tracing features on an L1 hit (issue 8): <= 10% over the plain build.
    ("observe_l1_hit/", 1.1),
    // A stalled Redis costs a read its timeout (+ the PostgreSQL read), or nothing once
    // the breaker is open: within 10% of that floor.
    ("redis_stalled_read/", 1.1),
    // 64 concurrent cold reads sent as one batch: no slower than one request per key.
    ("redis_cold_reads/", 1.0),
    ("postgres_cold_reads/", 1.0),
    // Drain throughput >= 5x sequential raw writes.
    ("write_back_drain/postgres", 0.2),
    ("write_back_drain/redis", 0.2),
];

/// The order rows appear in (by group prefix): in memory first, then down the layers.
const ORDER: &[&str] = &[
    "l1_hit/",
    "l1_hit_threads/",
    "miss/",
    "l2_hit_",
    "l3_hit_",
    "write_through/",
    "write_back_set/",
    "delete/",
    "sled_",
    "write_back_drain/sled",
    "embedded_",
    "redis_",
    "write_back_drain/redis",
    "postgres_",
    "write_back_drain/postgres",
    "tier3_l1",
    "tier3_l2",
    "tier3_l3",
    "tier3_miss",
    "tier3_write",
    "get_or_load",
    "observe_",
];

pub(crate) fn rank(group: &str) -> usize {
    ORDER
        .iter()
        .position(|p| group.starts_with(p))
        .unwrap_or(ORDER.len())
}

/// The groups with both a `capacitor` and a `raw` median, in report order.
pub(crate) fn rows(medians: &Medians) -> Vec<(&String, &BTreeMap<String, f64>)> {
    let mut rows: Vec<_> = medians
        .iter()
        .filter(|(_, f)| f.contains_key("capacitor") && f.contains_key("raw"))
        .collect();
    rows.sort_by(|a, b| (rank(a.0), a.0).cmp(&(rank(b.0), b.0)));
    rows
}

/// Where cargo puts build output: `$CARGO_TARGET_DIR` (relative to the workspace root,
/// as cargo reads it when xtask runs it there), else `<root>/target`.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    target_dir_from(root, std::env::var_os("CARGO_TARGET_DIR"))
}

fn target_dir_from(root: &Path, var: Option<std::ffi::OsString>) -> PathBuf {
    match var {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// Median estimate (ns) of every benchmark criterion wrote since `since`, keyed by group
/// then function.
pub(crate) fn read_medians(dir: &Path, since: SystemTime, out: &mut Medians) -> Result {
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

pub(crate) fn fmt_ns(ns: f64) -> String {
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

fn target_for(group: &str) -> Option<f64> {
    TARGETS
        .iter()
        .find(|(p, _)| group.starts_with(p))
        .map(|(_, t)| *t)
}

/// What the run was: shown at the top of the report.
#[derive(Debug, Default)]
pub(crate) struct RunInfo {
    pub(crate) date: String,
    pub(crate) machine: String,
    pub(crate) mode: String,
    /// One line per backend: what the suites ran against, or why they were skipped.
    pub(crate) services: Vec<String>,
    /// Suites not run, each with why.
    pub(crate) skipped: Vec<String>,
}

/// The main table: one row per group.
pub(crate) fn table(medians: &Medians, icounts: &Icounts) -> Result<String> {
    table_dated(medians, icounts, None)
}

/// The main table, with a `date` column when `dates` is given (docs/benchmarks.md): the
/// criterion rows, with the instruction counts of the same name beside them, then the
/// rows only the icount suite measures.
fn table_dated(
    medians: &Medians,
    icounts: &Icounts,
    dates: Option<&BTreeMap<String, String>>,
) -> Result<String> {
    let empty = BTreeMap::new();
    let mut rows = rows(medians);
    let counted = icount_rows(icounts);
    for (group, _, _) in &counted {
        if !rows.iter().any(|(g, _)| g == group) {
            rows.push((group, &empty));
        }
    }
    rows.sort_by(|a, b| (rank(a.0), a.0).cmp(&(rank(b.0), b.0)));
    let with_icounts = !counted.is_empty();
    let peers: Vec<(&str, &str)> = PEERS
        .iter()
        .copied()
        .filter(|(p, _)| rows.iter().any(|(_, f)| f.contains_key(*p)))
        .collect();
    let mut md = String::new();
    write!(md, "| operation | capacitor | raw | ratio |")?;
    if with_icounts {
        for c in ICOUNT_COLUMNS {
            write!(md, " {c} |")?;
        }
    }
    for (_, title) in &peers {
        write!(md, " {title} (capacitor ÷ it) |")?;
    }
    write!(md, " target | met? |")?;
    writeln!(md, "{}", if dates.is_some() { " date |" } else { "" })?;
    write!(md, "|---|---:|---:|---:|")?;
    if with_icounts {
        for _ in ICOUNT_COLUMNS {
            write!(md, "---:|")?;
        }
    }
    for _ in &peers {
        write!(md, "---:|")?;
    }
    writeln!(md, "---:|:---:|{}", if dates.is_some() { "---|" } else { "" })?;
    for (group, functions) in rows {
        let timed = functions.get("capacitor").zip(functions.get("raw"));
        let (target_s, met) = match (target_for(group), timed) {
            (Some(t), Some((ours, raw))) => {
                (format!("≤ {t:.1}×"), if ours / raw <= t { "yes" } else { "no" })
            }
            _ => ("—".to_owned(), ""),
        };
        match timed {
            Some((ours, raw)) => write!(
                md,
                "| `{group}` | {} | {} | {:.2}× |",
                fmt_ns(*ours),
                fmt_ns(*raw),
                ours / raw
            )?,
            None => write!(md, "| `{group}` | — | — | — |")?,
        }
        if with_icounts {
            match counted.iter().find(|(g, _, _)| *g == group) {
                Some((_, ours, raw)) => {
                    write!(
                        md,
                        " {} | {} | {:.2}× |",
                        ours.ir,
                        raw.ir,
                        ours.ir as f64 / raw.ir as f64
                    )?;
                    match ours.cycles.zip(raw.cycles) {
                        Some((a, b)) => write!(md, " {a} | {b} | {:.2}× |", a as f64 / b as f64)?,
                        None => write!(md, " | | |")?,
                    }
                }
                None => write!(md, " | | | | | |")?,
            }
        }
        for (peer, _) in &peers {
            match (functions.get(*peer), timed) {
                (Some(p), Some((ours, _))) => write!(md, " {} ({:.2}×) |", fmt_ns(*p), ours / p)?,
                _ => write!(md, " |")?,
            }
        }
        write!(md, " {target_s} | {met} |")?;
        match dates {
            Some(dates) => writeln!(md, " {} |", dates.get(group.as_str()).map_or("", String::as_str))?,
            None => writeln!(md)?,
        }
    }
    Ok(md)
}

fn median(m: &Medians, group: &str, function: &str) -> Option<f64> {
    m.get(group).and_then(|f| f.get(function)).copied()
}

/// A derived figure: what, value, target, met.
type Derived = (String, String, String, String);

/// Figures computed from several groups: the cost of each extra layer on a miss, write-
/// through against an L1-only write, promotion on against off, single against multi-layer
/// hits, and thread scaling.
pub(crate) fn derived(m: &Medians) -> Vec<Derived> {
    let mut out: Vec<Derived> = Vec::new();
    let none = || ("—".to_owned(), String::new());
    // Each extra layer on a miss path: capacitor's growth beyond the raw side's growth.
    for n in 3..=4 {
        let (a, b) = (
            format!("miss/dashmap/{}_layers", n - 1),
            format!("miss/dashmap/{n}_layers"),
        );
        if let (Some(ca), Some(cb), Some(ra), Some(rb)) = (
            median(m, &a, "capacitor"),
            median(m, &b, "capacitor"),
            median(m, &a, "raw"),
            median(m, &b, "raw"),
        ) {
            let extra = (cb - ca) - (rb - ra);
            out.push((
                format!(
                    "miss, layer {} → {n}: capacitor's extra cost beyond the layer's own",
                    n - 1
                ),
                format!(
                    "{} (capacitor +{}, raw +{})",
                    fmt_ns(extra),
                    fmt_ns(cb - ca),
                    fmt_ns(rb - ra)
                ),
                "≤ 5.0 ns".to_owned(),
                if extra <= 5.0 { "yes" } else { "no" }.to_owned(),
            ));
        }
    }
    // Write-through against an L1-only write (the raw single-map insert).
    if let Some(l1_only) = median(m, "write_through/dashmap/1_layers", "raw") {
        for n in 1..=4 {
            if let Some(c) = median(m, &format!("write_through/dashmap/{n}_layers"), "capacitor") {
                let (t, met) = none();
                out.push((
                    format!("write-through, {n} layer(s), ÷ a raw L1-only insert"),
                    format!("{:.2}× ({} vs {})", c / l1_only, fmt_ns(c), fmt_ns(l1_only)),
                    t,
                    met,
                ));
            }
        }
    }
    // Promotion on against off.
    for (on, off, what) in [
        (
            "l2_hit_promotion/dashmap",
            "l2_hit_no_promotion/dashmap",
            "L2 hit (dashmap)",
        ),
        (
            "l3_hit_promotion/dashmap",
            "l3_hit_no_promotion/dashmap",
            "L3 hit (dashmap)",
        ),
        (
            "sled_hit/moka_over_sled",
            "sled_hit_no_promotion/moka_over_sled",
            "sled hit under moka",
        ),
    ] {
        if let (Some(a), Some(b)) = (median(m, on, "capacitor"), median(m, off, "capacitor")) {
            let (t, met) = none();
            out.push((
                format!("{what}: promotion on ÷ off (capacitor)"),
                format!("{:.2}× ({} vs {})", a / b, fmt_ns(a), fmt_ns(b)),
                t,
                met,
            ));
        }
    }
    // Single against multi-layer on an L1 hit.
    for backend in ["dashmap", "moka"] {
        if let (Some(one), Some(two)) = (
            median(m, &format!("l1_hit/{backend}/1_layer"), "capacitor"),
            median(m, &format!("l1_hit/{backend}/2_layers"), "capacitor"),
        ) {
            let (t, met) = none();
            out.push((
                format!("L1 hit ({backend}): 2 layers ÷ 1 layer (capacitor)"),
                format!("{:.2}× ({} vs {})", two / one, fmt_ns(two), fmt_ns(one)),
                t,
                met,
            ));
        }
    }
    // Thread scaling: throughput on n threads ÷ on one = n · t(1) / t(n).
    for backend in ["dashmap", "moka"] {
        for function in ["capacitor", "raw", "foyer"] {
            let one = median(m, &format!("l1_hit_threads/{backend}/1_threads"), function);
            for n in [2u32, 4] {
                let many = median(m, &format!("l1_hit_threads/{backend}/{n}_threads"), function);
                if let (Some(one), Some(many)) = (one, many) {
                    let scaling = f64::from(n) * one / many;
                    let (t, met) = if function == "capacitor" && n == 2 {
                        (
                            "≥ 1.7×".to_owned(),
                            if scaling >= 1.7 { "yes" } else { "no" }.to_owned(),
                        )
                    } else {
                        none()
                    };
                    out.push((
                        format!("L1-hit throughput ({backend}, {function}): {n} threads ÷ 1"),
                        format!("{scaling:.2}×"),
                        t,
                        met,
                    ));
                }
            }
        }
    }
    out
}

/// The whole REPORT.md.
pub(crate) fn markdown(
    medians: &Medians,
    icounts: &Icounts,
    info: &RunInfo,
    chart: Option<&str>,
) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "# capacitor benchmark report\n")?;
    writeln!(md, "- date: {}", info.date)?;
    writeln!(md, "- machine: {}", info.machine)?;
    writeln!(md, "- run: {}", info.mode)?;
    for line in &info.services {
        writeln!(md, "- {line}")?;
    }
    for line in &info.skipped {
        writeln!(md, "- skipped: {line}")?;
    }
    writeln!(
        md,
        "\nMedians from criterion; every side measured in the same run. *ratio* = capacitor ÷ \
         raw, where raw is the same backend calls inlined in the benchmark (the floor); a peer \
         column shows the peer's median and capacitor ÷ peer. Below 1× capacitor is faster. \
         The *instr* and *est. cycles* columns, where present, are callgrind's counts for one \
         execution of the same operation (the `icount` suite, through gungraun).\n"
    )?;
    md.push_str(&table(medians, icounts)?);
    md.push_str(&derived_md(medians)?);
    if let Some(chart) = chart {
        writeln!(md, "\n## Chart\n\n![median latency per operation]({chart})")?;
    }
    Ok(md)
}

/// The derived figures as a section, empty when there are none.
fn derived_md(medians: &Medians) -> Result<String> {
    let mut md = String::new();
    let derived = derived(medians);
    if !derived.is_empty() {
        writeln!(md, "\n## Derived figures\n")?;
        writeln!(md, "| figure | value | target | met? |")?;
        writeln!(md, "|---|---:|---:|:---:|")?;
        for (what, value, target, met) in derived {
            writeln!(md, "| {what} | {value} | {target} | {met} |")?;
        }
    }
    Ok(md)
}

/// What docs/benchmarks.md holds: the latest median of every group, the run each row
/// comes from, and those runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Published {
    pub(crate) medians: Medians,
    /// The run label (see [`run_label`]) of each group's row.
    pub(crate) dates: BTreeMap<String, String>,
    /// One row of the runs table each: label, command, machine, servers.
    pub(crate) runs: Vec<[String; 4]>,
    /// The latest instruction counts, by row.
    pub(crate) icounts: Icounts,
    /// The run label of the instruction counts (the icount suite runs whole).
    pub(crate) icount_run: Option<String>,
}

/// The line under the results table naming the run the instruction counts come from.
const ICOUNT_RUN: &str = "Instruction counts from the run of ";

/// How rows measured by this run are dated: `YYYY-MM-DD`, with `, quick` for a quick run.
pub(crate) fn run_label(info: &RunInfo) -> String {
    if info.mode.contains("--quick") {
        format!("{}, quick", info.date)
    } else {
        info.date.clone()
    }
}

/// The cells of a markdown table row, trimmed; `None` for a line that is not a row.
fn cells(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(|c| c.trim().to_owned()).collect())
}

/// The rows (header first, separator left out) of the table under the `## {heading}`
/// section of `md`.
fn section_rows(md: &str, heading: &str) -> Vec<Vec<String>> {
    let mut inside = false;
    let mut rows = Vec::new();
    for line in md.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            inside = h.trim() == heading;
            continue;
        }
        if !inside {
            continue;
        }
        if let Some(row) = cells(line) {
            if !row.iter().all(|c| c.chars().all(|ch| matches!(ch, '-' | ':'))) {
                rows.push(row);
            }
        }
    }
    rows
}

/// A duration as [`fmt_ns`] writes it (`12.3 ns`, `1.23 µs`, `2.50 ms`, optionally
/// followed by ` (…)`), in nanoseconds.
pub(crate) fn parse_ns(cell: &str) -> Option<f64> {
    let cell = cell.split(" (").next()?.trim();
    let (number, unit) = cell.split_once(' ')?;
    let (negative, number) = match number.strip_prefix('−') {
        Some(n) => (true, n),
        None => (false, number),
    };
    let scale = match unit {
        "ns" => 1.0,
        "µs" => 1_000.0,
        "ms" => 1_000_000.0,
        "s" => 1_000_000_000.0,
        _ => return None,
    };
    let v = number.parse::<f64>().ok()? * scale;
    Some(if negative { -v } else { v })
}

/// Reads back what [`published_markdown`] wrote; what it cannot read is left out.
pub(crate) fn parse_published(md: &str) -> Published {
    let mut out = Published::default();
    let mut results = section_rows(md, "Results").into_iter();
    if let Some(header) = results.next() {
        let columns: Vec<Option<&str>> = header
            .iter()
            .map(|h| match h.as_str() {
                "operation" => Some("operation"),
                "capacitor" => Some("capacitor"),
                "raw" => Some("raw"),
                "date" => Some("date"),
                "instr capacitor" => Some("instr capacitor"),
                "instr raw" => Some("instr raw"),
                "est. cycles capacitor" => Some("est. cycles capacitor"),
                "est. cycles raw" => Some("est. cycles raw"),
                _ => PEERS
                    .iter()
                    .find(|(_, title)| *h == format!("{title} (capacitor ÷ it)"))
                    .map(|(id, _)| *id),
            })
            .collect();
        for row in results {
            let mut group = None;
            let mut date = None;
            let mut functions = BTreeMap::new();
            let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
            for (column, cell) in columns.iter().zip(&row) {
                match column {
                    Some("operation") => group = Some(cell.trim_matches('`').to_owned()),
                    Some("date") if !cell.is_empty() => date = Some(cell.clone()),
                    Some(c) if c.starts_with("instr ") || c.starts_with("est. cycles ") => {
                        if let Ok(n) = cell.parse::<u64>() {
                            counts.insert(c, n);
                        }
                    }
                    Some(function) => {
                        if let Some(ns) = parse_ns(cell) {
                            functions.insert((*function).to_owned(), ns);
                        }
                    }
                    None => {}
                }
            }
            if let Some(group) = group.filter(|g| !g.is_empty()) {
                for side in ["capacitor", "raw"] {
                    if let Some(ir) = counts.get(format!("instr {side}").as_str()) {
                        let cycles = counts.get(format!("est. cycles {side}").as_str()).copied();
                        out.icounts
                            .entry(group.clone())
                            .or_default()
                            .insert(side.to_owned(), Count { ir: *ir, cycles });
                    }
                }
                if functions.contains_key("capacitor") && functions.contains_key("raw") {
                    if let Some(date) = date {
                        out.dates.insert(group.clone(), date);
                    }
                    out.medians.insert(group, functions);
                }
            }
        }
    }
    out.icount_run = md
        .lines()
        .find_map(|l| l.strip_prefix(ICOUNT_RUN))
        .map(|l| l.trim_end_matches('.').to_owned());
    for row in section_rows(md, "Runs").into_iter().skip(1) {
        if let [label, command, machine, servers] = &row[..] {
            out.runs
                .push([label.clone(), command.clone(), machine.clone(), servers.clone()]);
        }
    }
    out
}

/// `published` with the groups this run measured (`medians`) replaced or added, dated by
/// the run; the other rows are kept with their dates. The runs table keeps the runs some
/// row still comes from, this run first.
pub(crate) fn merge(
    mut published: Published,
    medians: &Medians,
    icounts: &Icounts,
    info: &RunInfo,
) -> Published {
    let measured: Vec<_> = rows(medians);
    let counted = icount_rows(icounts);
    if measured.is_empty() && counted.is_empty() {
        return published;
    }
    let label = run_label(info);
    if !counted.is_empty() {
        published.icounts = counted
            .into_iter()
            .map(|(g, c, r)| {
                let sides = [("capacitor".to_owned(), c), ("raw".to_owned(), r)];
                (g.clone(), sides.into_iter().collect())
            })
            .collect();
        published.icount_run = Some(label.clone());
    }
    for (group, functions) in measured {
        published.medians.insert(group.clone(), functions.clone());
        published.dates.insert(group.clone(), label.clone());
    }
    let mut servers = info.services.clone();
    servers.extend(info.skipped.iter().map(|s| format!("skipped: {s}")));
    let this = [
        label.clone(),
        info.mode.clone(),
        info.machine.clone(),
        servers.join("; "),
    ]
    .map(|c| c.replace('|', "/"));
    let used: Vec<&String> = published
        .dates
        .values()
        .chain(published.icount_run.as_ref())
        .collect();
    let mut runs = vec![this];
    runs.extend(
        published
            .runs
            .into_iter()
            .filter(|r| r[0] != label && used.contains(&&r[0])),
    );
    published.runs = runs;
    published
}

/// The text of docs/benchmarks.md before its tables: how to run, what the suites measure,
/// how to read the figures.
const PUBLISHED_INTRO: &str = "\
# Benchmarks

Written by `cargo xtask bench`. A run replaces the rows of the groups it measured and keeps
the others; the `date` column says which run each row comes from (see Runs). The README's
short table is picked from this one.

## How to run

```sh
cargo xtask bench                 # every suite, criterion's defaults
cargo xtask bench --quick         # 0.2 s warm-up, 0.5 s measurement, 10 samples, small setups
cargo xtask bench redis tiers     # only these suites
cargo xtask bench composer icount # the in-memory medians and their instruction counts
```

The suites are in `benches/benches/`. The Redis, PostgreSQL, three-tier, resilience and
batching suites use `CAPACITOR_REDIS_URL` / `CAPACITOR_POSTGRES_URL`, else the local
servers (xtask starts the local one, or a throwaway one on a free loopback port, when it
can); a suite whose server cannot be had is skipped and the run says why. Each run uses
Redis key prefixes and tables named after it and removes only those. A run also writes the
report of that run alone, `REPORT.md` and `bench.svg`, to `target/capacitor-report/`
(under `$CARGO_TARGET_DIR` when that is set), and rewrites this file and `docs/bench.svg`.
The in-memory peer is [foyer](https://crates.io/crates/foyer) 0.22, a dev-dependency of
the unpublished `benches` crate only (it needs Rust 1.91). The `icount` suite needs
valgrind and `gungraun-runner` of the same version as the `gungraun` library in Cargo.lock:
xtask installs the runner (`cargo install --locked gungraun-runner --version …`) when it
is missing or another version, and valgrind (`apt-get install -y valgrind`) when it is
missing and xtask runs as root; otherwise it skips the suite and says why.

## What each suite measures

- `composer`: the composer over in-memory layers: an L1 hit with one and two layers
  (`l1_hit`, also `cooperative(true)`), a miss through 2-4 layers (`miss`), a hit in L2 or
  L3 with promotion on and off, write-through to 1-4 layers, L1 hits on 1, 2 and 4 threads
  at once (`l1_hit_threads`, timed per round: one hit on every thread); foyer's hit as a
  peer in the moka groups.
- `sled`: moka over sled: a hit that promotes, a hit without promotion, a write-through.
- `embedded`: redb and sled side by side, each beside its raw backend: moka over each for
  a hit that promotes and a write-through, and the write-back drain of 10,000 keys into
  each (raw: one redb write transaction, or one sled insert, per key); no fsync in the
  measured path but the drain's closing flush.
- `redis`: moka over Redis: a hit, a write-through, `get_many` of 100 keys, the write-back
  drain of 2,000 keys; the hand-written moka + fred code as a peer.
- `postgres`: moka over PostgreSQL: a hit, a write-through, `get_many` of 100 keys, a write
  to an `UNLOGGED` table, the write-back drain of 2,000 keys.
- `tiers`: moka over Redis over PostgreSQL: a hit in each tier, a miss, a write-through; the
  hand-written moka + fred + tokio-postgres code as a peer.
- `writeback`: a write-back `set` over dashmap and moka, the drain of 10,000 keys into sled,
  and 64 concurrent `get_or_load` callers of one cold key (raw: the hand-written check,
  load, backfill, which runs 64 loads); `get_or_load` alone on a hit, on a miss whose
  loader answers at once, and answered with the fail-safe copy at a 1 ms soft timeout
  over a 20 ms origin (raw: `get`, else load and insert; `tokio::time::timeout` around
  the origin with a map of last known values).
- `resilience`: a read with Redis stalled behind the test kit's fault proxy, over
  PostgreSQL, with a 20 ms read timeout (raw: a 20 ms sleep plus the PostgreSQL read) and
  with the breaker open (raw: the PostgreSQL read).
- `batching`: 64 concurrent tasks each reading a distinct cold key through moka over
  Redis and over PostgreSQL, with read batching on (capacitor: one `MGET`, one
  `= ANY($1)` query), with it off (*unbatched*), and the hand-written moka + one request
  per key (raw; over Redis also the hand-written peer); it prints keys/s and the p99 of one
  read per function.
- `codecs`: one small record stored and read back through each codec (`postcard`, the
  default; `json`; `bincode`): the envelope's seal, open and decode (capacitor) beside
  the codec's plain encode and decode (raw); it prints each codec's stored size.
- `icount`: instruction counts of the in-memory paths of `composer` and `writeback`, each
  beside its raw counterpart: an L1 hit over dashmap and moka (1 and 2 layers), a miss
  through 2-4 dashmap layers, an L2 hit with promotion, write-through to 1-4 layers, a
  write-back `set` over dashmap, and a delete through 2 layers (this one has no criterion
  group: its row has counts only).
- `l1`: an L1 hit through the composer over `QuickCacheLayer` (quick_cache's S3-FIFO)
  over a dashmap L2, beside quick_cache's own `get` (raw) and foyer's in-memory hit
  (*foyer*); it prints the heap bytes per entry of 1,000,000 small entries (u64 key,
  16-byte value) in each memory layer and in foyer, counted by a global allocator.
- `observe`: an L1 hit built with the `metrics` and `tracing` features (a Prometheus
  recorder and an INFO subscriber installed) beside the same hit built without them (raw);
  `observe_debug_spans`: DEBUG spans collected beside INFO.

## How to read the table

Each row is one criterion group whose functions ran one after another in the same process
on the same data; the figures are medians. *capacitor* is the composer. *raw* is the same
backend calls inlined in the benchmark, the floor the targets are measured against (for a
hit: raw get, decode, raw L1 insert; for a write: raw write, raw L1 insert). *ratio* is
capacitor ÷ raw: below 1× capacitor is faster (batching, single flight). A peer column is
code you could run instead, with its median and capacitor ÷ it: *hand-written* is the
cache-aside code a user writes today (`benches/src/peer.rs`: check moka, then Redis, then
PostgreSQL, backfill the tiers above; its own connections, plain postcard), *foyer* is
foyer's in-memory cache doing the same hit, *capacitor, batching off* the batching suite's
composer without read batching. *target* is the highest acceptable ratio. For
`l1_hit_threads`, throughput on n threads ÷ on one is n·t(1)/t(n) (in the derived figures).
The chart draws the same medians on a log scale, grouped by the layer measured.

## Instruction counts

On a shared machine the nanosecond rows move by up to 2× from run to run; instruction
counts do not. The `icount` suite (`benches/benches/icount.rs`) runs each operation once
under valgrind's callgrind, through [gungraun](https://crates.io/crates/gungraun) (the
successor of iai-callgrind), counting from the entry to the exit of the benchmark
function only: the setup, a warm-up call made by the setup, and the drops are outside it.
The composer's future is polled once with a no-op waker, as in the criterion suites.
Every map holds 1,000 other keys besides the one measured, so that no measured insert
allocates a table. The counts repeat closely but not exactly: dashmap and moka hash with
std's `RandomState`, seeded anew in every process, so which shard and probe a key gets
changes between runs. In two consecutive runs on this machine 19 of the 28 counts were
equal, 7 moved by less than 3%, and two raw sides by 12-13% (80-85 instructions: the L2
hit with promotion and write-through to 3 layers); compare rows at that precision.
Callgrind's cache simulation is on, so gungraun also reports *estimated cycles*
(L1 hits + 5 × last-level hits + 35 × RAM hits, over instruction fetches and data
accesses): a rough figure from a simulated cache, not a measurement of this CPU. As each
operation runs once, the code inlined into the benchmark function is fetched for the
first time and misses the simulated caches (the setup's warm-up call ran the same
operation from other code); those misses weigh on the estimated cycles, more than on a
hot path, but not on the instruction counts. Each benchmark function is named after
the criterion group it sits beside, `/` replaced by `_`, with `_capacitor` or `_raw`
(`l1_hit/dashmap/1_layer` → `l1_hit_dashmap_1_layer_capacitor`); its counts are the
*instr capacitor*, *instr raw* and *instr ratio* (capacitor ÷ raw) columns of that row,
and the *est. cycles* columns likewise. The line under the table names the run they come
from, and the runs table the valgrind and gungraun versions. In the chart a red
`◆ instr …×` marker at the right of a group gives the same ratios.
";

/// The whole docs/benchmarks.md.
pub(crate) fn published_markdown(published: &Published, chart: Option<&str>) -> Result<String> {
    let mut md = String::from(PUBLISHED_INTRO);
    writeln!(md, "\n## Runs\n")?;
    writeln!(md, "| date | command | machine | servers and tools |")?;
    writeln!(md, "|---|---|---|---|")?;
    for run in &published.runs {
        writeln!(md, "| {} |", run.join(" | "))?;
    }
    writeln!(md, "\n## Results\n")?;
    md.push_str(&table_dated(
        &published.medians,
        &published.icounts,
        Some(&published.dates),
    )?);
    if let Some(run) = &published.icount_run {
        writeln!(md, "\n{ICOUNT_RUN}{run}.")?;
    }
    md.push_str(&derived_md(&published.medians)?);
    if let Some(chart) = chart {
        writeln!(
            md,
            "\n## Chart\n\n![median latency per operation, capacitor vs raw vs peers, log scale]({chart})"
        )?;
    }
    Ok(md)
}

/// Today's date (UTC) as `YYYY-MM-DD`.
pub(crate) fn today() -> String {
    let days = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or_default();
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// "N cores, CPU model, memory, OS" from /proc and /etc/os-release.
pub(crate) fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or_else(String::new, |kb| format!(", {:.0} GiB", kb / 1_048_576.0));
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| std::env::consts::OS.to_owned());
    format!("{cores} cores ({cpu}){mem_gib}, {os}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn medians(entries: &[(&str, &str, f64)]) -> Medians {
        let mut m = Medians::new();
        for (g, f, v) in entries {
            m.entry((*g).to_owned()).or_default().insert((*f).to_owned(), *v);
        }
        m
    }

    #[test]
    fn formats_durations() {
        assert_eq!(fmt_ns(12.34), "12.3 ns");
        assert_eq!(fmt_ns(1_234.0), "1.23 µs");
        assert_eq!(fmt_ns(2_500_000.0), "2.50 ms");
        assert_eq!(fmt_ns(-3.0), "−3.0 ns");
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn table_has_peer_columns_and_targets() {
        let m = medians(&[
            ("redis_hit/moka_over_redis", "capacitor", 110.0),
            ("redis_hit/moka_over_redis", "raw", 100.0),
            ("redis_hit/moka_over_redis", "hand_written", 100.0),
            ("l1_hit/moka/1_layer", "capacitor", 130.0),
            ("l1_hit/moka/1_layer", "raw", 100.0),
            ("only_raw/x", "raw", 1.0),
        ]);
        let t = table(&m, &Icounts::new()).unwrap();
        assert!(t.contains("hand-written"));
        assert!(!t.contains("foyer"), "no group has a foyer median");
        assert!(!t.contains("only_raw"));
        // In memory before Redis.
        assert!(t.find("l1_hit/moka").unwrap() < t.find("redis_hit").unwrap());
        assert!(t.contains("| 1.30× | | ≤ 1.2× | no |"), "{t}");
        assert!(t.contains("| 1.10× | 100.0 ns (1.10×) | ≤ 1.1× | yes |"), "{t}");
    }

    #[test]
    fn derives_layer_costs_and_scaling() {
        let m = medians(&[
            ("miss/dashmap/2_layers", "capacitor", 40.0),
            ("miss/dashmap/2_layers", "raw", 20.0),
            ("miss/dashmap/3_layers", "capacitor", 55.0),
            ("miss/dashmap/3_layers", "raw", 31.0),
            ("l1_hit_threads/moka/1_threads", "capacitor", 100.0),
            ("l1_hit_threads/moka/2_threads", "capacitor", 110.0),
        ]);
        let d = derived(&m);
        let extra = d.iter().find(|r| r.0.contains("layer 2 → 3")).unwrap();
        assert!(extra.1.starts_with("4.0 ns"), "{extra:?}");
        assert_eq!(extra.3, "yes");
        let threads = d
            .iter()
            .find(|r| r.0.contains("moka, capacitor): 2 threads"))
            .unwrap();
        assert_eq!(threads.1, "1.82×");
        assert_eq!(threads.3, "yes");
    }

    fn run(date: &str, mode: &str) -> RunInfo {
        RunInfo {
            date: date.to_owned(),
            machine: "2 cores".to_owned(),
            mode: mode.to_owned(),
            services: vec!["Redis: redis://127.0.0.1:6379 (found running)".to_owned()],
            skipped: Vec::new(),
        }
    }

    #[test]
    fn parses_what_fmt_ns_writes() {
        for ns in [12.3, 1_230.0, 2_500_000.0, -3.0, 107_800.0] {
            assert_eq!(parse_ns(&fmt_ns(ns)), Some(ns), "{}", fmt_ns(ns));
        }
        assert_eq!(parse_ns("100.96 µs (0.99×)"), Some(100_960.0));
        assert_eq!(parse_ns(""), None);
        assert_eq!(parse_ns("—"), None);
    }

    #[test]
    fn a_partial_run_keeps_the_other_rows_and_their_runs() {
        let first = medians(&[
            ("redis_hit/moka_over_redis", "capacitor", 110_000.0),
            ("redis_hit/moka_over_redis", "raw", 100_000.0),
            ("redis_hit/moka_over_redis", "hand_written", 100_000.0),
            ("sled_hit/moka_over_sled", "capacitor", 4_650.0),
            ("sled_hit/moka_over_sled", "raw", 4_950.0),
        ]);
        let full = merge(
            Published::default(),
            &first,
            &Icounts::new(),
            &run("2026-11-25", "`cargo xtask bench`"),
        );
        let text = published_markdown(&full, Some("bench.svg")).unwrap();
        let read = parse_published(&text);
        assert_eq!(read, full, "{text}");

        // A quick run of the Redis suite alone: its row is replaced, sled's kept.
        let redis = medians(&[
            ("redis_hit/moka_over_redis", "capacitor", 99_000.0),
            ("redis_hit/moka_over_redis", "raw", 90_000.0),
            ("only_raw/x", "raw", 1.0),
        ]);
        let merged = merge(
            read,
            &redis,
            &Icounts::new(),
            &run("2026-12-02", "`cargo xtask bench --quick redis`"),
        );
        assert_eq!(merged.medians["redis_hit/moka_over_redis"]["capacitor"], 99_000.0);
        assert!(!merged.medians["redis_hit/moka_over_redis"].contains_key("hand_written"));
        assert_eq!(merged.medians["sled_hit/moka_over_sled"]["raw"], 4_950.0);
        assert!(!merged.medians.contains_key("only_raw/x"));
        assert_eq!(merged.dates["redis_hit/moka_over_redis"], "2026-12-02, quick");
        assert_eq!(merged.dates["sled_hit/moka_over_sled"], "2026-11-25");
        let labels: Vec<&str> = merged.runs.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(labels, ["2026-12-02, quick", "2026-11-25"]);
        let text = published_markdown(&merged, None).unwrap();
        assert!(
            text.contains("| `sled_hit/moka_over_sled` | 4.65 µs | 4.95 µs | 0.94× |"),
            "{text}"
        );
        assert!(text.contains("| ≤ 1.1× | yes | 2026-11-25 |"), "{text}");
        assert_eq!(parse_published(&text), merged);

        // Once every row is newer, the older run leaves the runs table.
        let sled = medians(&[
            ("sled_hit/moka_over_sled", "capacitor", 4_000.0),
            ("sled_hit/moka_over_sled", "raw", 4_100.0),
        ]);
        let last = merge(
            merged.clone(),
            &sled,
            &Icounts::new(),
            &run("2026-12-03", "`cargo xtask bench sled`"),
        );
        let labels: Vec<&str> = last.runs.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(labels, ["2026-12-03", "2026-12-02, quick"]);

        // A run that measured nothing changes nothing.
        assert_eq!(
            merge(
                merged.clone(),
                &Medians::new(),
                &Icounts::new(),
                &run("2026-12-04", "x")
            ),
            merged
        );
    }

    fn counts(entries: &[(&str, u64, u64, u64, u64)]) -> Icounts {
        let mut out = Icounts::new();
        for (g, c, cc, r, rc) in entries {
            let row = out.entry((*g).to_owned()).or_default();
            row.insert(
                "capacitor".to_owned(),
                Count {
                    ir: *c,
                    cycles: Some(*cc),
                },
            );
            row.insert(
                "raw".to_owned(),
                Count {
                    ir: *r,
                    cycles: Some(*rc),
                },
            );
        }
        out
    }

    #[test]
    fn instruction_counts_sit_beside_the_medians_and_read_back() {
        let m = medians(&[
            ("l1_hit/dashmap/1_layer", "capacitor", 25.0),
            ("l1_hit/dashmap/1_layer", "raw", 20.0),
            ("sled_hit/moka_over_sled", "capacitor", 4_650.0),
            ("sled_hit/moka_over_sled", "raw", 4_950.0),
        ]);
        let c = counts(&[
            ("l1_hit/dashmap/1_layer", 355, 1_109, 250, 900),
            ("delete/dashmap/2_layers", 1_048, 3_733, 519, 1_248),
        ]);
        let t = table(&m, &c).unwrap();
        assert!(t.contains("| instr capacitor | instr raw | instr ratio |"), "{t}");
        assert!(
            t.contains("| `l1_hit/dashmap/1_layer` | 25.0 ns | 20.0 ns | 1.25× | 355 | 250 | 1.42× | 1109 | 900 | 1.23× |"),
            "{t}"
        );
        // A row without counts has empty count cells; one without a criterion group has
        // no times.
        assert!(t.contains("| 0.94× | | | | | | |"), "{t}");
        assert!(
            t.contains("| `delete/dashmap/2_layers` | — | — | — | 1048 | 519 | 2.02× |"),
            "{t}"
        );
        assert!(!table(&m, &Icounts::new()).unwrap().contains("instr"));

        let first = merge(
            Published::default(),
            &m,
            &c,
            &run("2026-12-04", "`cargo xtask bench`"),
        );
        assert_eq!(first.icount_run.as_deref(), Some("2026-12-04"));
        let text = published_markdown(&first, None).unwrap();
        assert!(
            text.contains("Instruction counts from the run of 2026-12-04."),
            "{text}"
        );
        let read = parse_published(&text);
        assert_eq!(read, first, "{text}");
        assert!(!read.medians.contains_key("delete/dashmap/2_layers"));

        // A criterion-only run keeps the counts and the run they come from; an icount-only
        // run replaces them and keeps the medians.
        let later = merge(
            read,
            &medians(&[
                ("sled_hit/moka_over_sled", "capacitor", 4_000.0),
                ("sled_hit/moka_over_sled", "raw", 4_100.0),
            ]),
            &Icounts::new(),
            &run("2026-12-05", "`cargo xtask bench sled`"),
        );
        assert_eq!(later.icounts, c);
        let labels: Vec<&str> = later.runs.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(labels, ["2026-12-05", "2026-12-04"]);
        let c2 = counts(&[("l1_hit/dashmap/1_layer", 300, 1_000, 250, 900)]);
        let last = merge(
            later,
            &Medians::new(),
            &c2,
            &run("2026-12-06", "`cargo xtask bench icount`"),
        );
        assert_eq!(last.icounts, c2);
        assert_eq!(last.medians["l1_hit/dashmap/1_layer"]["capacitor"], 25.0);
        assert_eq!(last.icount_run.as_deref(), Some("2026-12-06"));
        let labels: Vec<&str> = last.runs.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(labels, ["2026-12-06", "2026-12-05", "2026-12-04"]);
        assert_eq!(parse_published(&published_markdown(&last, None).unwrap()), last);
    }

    #[test]
    fn the_published_file_reads_back() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let published = parse_published(&text);
        assert!(!published.medians.is_empty());
        assert_eq!(published.medians.len(), published.dates.len());
        assert!(published
            .dates
            .values()
            .all(|d| published.runs.iter().any(|r| &r[0] == d)));
        let again = published_markdown(&published, Some("bench.svg")).unwrap();
        assert_eq!(parse_published(&again), published);
    }

    #[test]
    fn target_dir_follows_cargo() {
        let root = Path::new("/ws");
        assert_eq!(target_dir_from(root, None), PathBuf::from("/ws/target"));
        assert_eq!(
            target_dir_from(root, Some("".into())),
            PathBuf::from("/ws/target")
        );
        assert_eq!(target_dir_from(root, Some("/t/b".into())), PathBuf::from("/t/b"));
        assert_eq!(
            target_dir_from(root, Some("out".into())),
            PathBuf::from("/ws/out")
        );
    }
}
