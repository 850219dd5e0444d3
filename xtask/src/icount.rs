//! The `icount` suite: instruction counts (and callgrind's estimated cycles) of the
//! in-memory paths, through gungraun. Finds or installs its tools (valgrind, and the
//! `gungraun-runner` binary of the library's exact version) and reads the summaries
//! gungraun writes.

use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use crate::report::{Count, Icounts};
use crate::Result;

/// The suite's name (`benches/benches/icount.rs`).
pub(crate) const SUITE: &str = "icount";

/// Rows measured only by the icount suite (no criterion group of that name), by the
/// name the report gives them.
const ICOUNT_ONLY: &[&str] = &["delete/dashmap/2_layers"];

/// The first line of `program --version`, when it runs.
fn version_of(program: &str) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned()
    })
}

/// The gungraun version in Cargo.lock (`gungraun-runner` must be the same).
pub(crate) fn gungraun_version(root: &Path) -> Result<String> {
    let lock = std::fs::read_to_string(root.join("Cargo.lock"))?;
    lock_version(&lock, "gungraun").ok_or_else(|| "Cargo.lock has no gungraun package".into())
}

fn lock_version(lock: &str, package: &str) -> Option<String> {
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{package}\"") {
            let next = lines.next()?;
            return next
                .trim()
                .strip_prefix("version = \"")?
                .strip_suffix('"')
                .map(str::to_owned);
        }
    }
    None
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Valgrind's version (`valgrind-3.19.0`), installing it with apt-get when missing and
/// running as root; an error saying why when it cannot be had.
pub(crate) fn ensure_valgrind() -> Result<String> {
    if let Some(v) = version_of("valgrind") {
        eprintln!("icount: using {v}");
        return Ok(v);
    }
    if !is_root() {
        return Err("valgrind is not installed and this is not root: install it \
                    (`sudo apt-get install -y valgrind`) to run the icount suite"
            .into());
    }
    eprintln!("icount: valgrind not found; installing it: apt-get install -y valgrind");
    let status = Command::new("apt-get")
        .args(["install", "-y", "valgrind"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    match (status, version_of("valgrind")) {
        (Ok(s), Some(v)) if s.success() => {
            eprintln!("icount: installed {v}");
            Ok(v)
        }
        (Ok(s), _) => Err(format!("`apt-get install -y valgrind` failed ({s}): no valgrind").into()),
        (Err(e), _) => Err(format!("cannot run apt-get to install valgrind: {e}").into()),
    }
}

/// Makes sure `gungraun-runner` is the library's `version`, installing that version with
/// `cargo install --locked` when it is missing or another.
pub(crate) fn ensure_runner(version: &str) -> Result {
    let found = version_of("gungraun-runner");
    if found.as_deref() == Some(&format!("gungraun-runner {version}")) {
        eprintln!("icount: using gungraun-runner {version}");
        return Ok(());
    }
    eprintln!(
        "icount: gungraun-runner {version} needed, {}; installing it: \
         cargo install --locked gungraun-runner --version {version}",
        found.map_or_else(|| "none found".to_owned(), |f| format!("found {f}"))
    );
    crate::cargo(&["install", "--locked", "gungraun-runner", "--version", version])
}

/// The report's name of an icount benchmark function: the criterion group it maps onto
/// (`l1_hit_dashmap_1_layer_raw` → `l1_hit/dashmap/1_layer`, side `raw`), found among
/// `groups` (or [`ICOUNT_ONLY`]) by replacing `/` with `_`; else the function's stem.
pub(crate) fn row_of<'a>(
    function: &str,
    groups: impl IntoIterator<Item = &'a String>,
) -> Option<(String, &'static str)> {
    let (stem, side) = if let Some(s) = function.strip_suffix("_capacitor") {
        (s, "capacitor")
    } else {
        (function.strip_suffix("_raw")?, "raw")
    };
    let slug = |g: &str| g.replace('/', "_");
    let group = groups
        .into_iter()
        .map(String::as_str)
        .chain(ICOUNT_ONLY.iter().copied())
        .find(|g| slug(g) == stem)
        .map_or_else(|| stem.to_owned(), str::to_owned);
    Some((group, side))
}

/// One summary.json: the benchmark function's name and callgrind's counts.
pub(crate) fn parse_summary(json: &serde_json::Value) -> Option<(String, Count)> {
    let function = json["function_name"].as_str()?.to_owned();
    let profile = json["profiles"].as_array()?.iter().find(|p| {
        p["tool"]
            .as_str()
            .is_none_or(|t| t.eq_ignore_ascii_case("callgrind"))
    })?;
    let metrics = &profile["data"]["total"]["metrics"];
    let value = |k: &str| metrics[k]["values"]["new"].as_u64();
    Some((
        function,
        Count {
            ir: value("Ir")?,
            cycles: value("EstimatedCycles"),
        },
    ))
}

/// The counts in every summary.json under `dir` written since `since`, by row (see
/// [`row_of`], resolved against `groups`) then side.
pub(crate) fn read(dir: &Path, since: SystemTime, groups: &[String]) -> Result<Icounts> {
    let mut out = Icounts::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "summary.json")
                && std::fs::metadata(&path)?.modified()? >= since
            {
                let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
                let Some((function, count)) = parse_summary(&json) else {
                    eprintln!("icount: no callgrind counts in {}", path.display());
                    continue;
                };
                match row_of(&function, groups) {
                    Some((group, side)) => {
                        out.entry(group).or_default().insert(side.to_owned(), count);
                    }
                    None => eprintln!("icount: {function} is neither a `_capacitor` nor a `_raw` function"),
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_map_onto_criterion_rows() {
        let groups = [
            "l1_hit/dashmap/1_layer".to_owned(),
            "miss/dashmap/2_layers".to_owned(),
        ];
        assert_eq!(
            row_of("l1_hit_dashmap_1_layer_raw", &groups),
            Some(("l1_hit/dashmap/1_layer".to_owned(), "raw"))
        );
        assert_eq!(
            row_of("miss_dashmap_2_layers_capacitor", &groups),
            Some(("miss/dashmap/2_layers".to_owned(), "capacitor"))
        );
        assert_eq!(
            row_of("delete_dashmap_2_layers_raw", &groups),
            Some(("delete/dashmap/2_layers".to_owned(), "raw"))
        );
        assert_eq!(
            row_of("unknown_capacitor", &groups),
            Some(("unknown".to_owned(), "capacitor"))
        );
        assert_eq!(row_of("helper", &groups), None);
    }

    #[test]
    fn reads_gungraun_summaries() {
        let json: serde_json::Value = serde_json::from_str(
            r#"{"function_name": "l1_hit_dashmap_1_layer_capacitor", "id": "run",
                "profiles": [{"tool": "Callgrind", "data": {"total": {"metrics": {
                    "Ir": {"values": {"new": 355}},
                    "EstimatedCycles": {"values": {"new": 1109}}}}}}]}"#,
        )
        .unwrap();
        assert_eq!(
            parse_summary(&json),
            Some((
                "l1_hit_dashmap_1_layer_capacitor".to_owned(),
                Count {
                    ir: 355,
                    cycles: Some(1109)
                }
            ))
        );
        let no_cache_sim: serde_json::Value = serde_json::from_str(
            r#"{"function_name": "f_raw", "profiles": [{"tool": "Callgrind",
                "data": {"total": {"metrics": {"Ir": {"values": {"new": 12}}}}}}]}"#,
        )
        .unwrap();
        assert_eq!(
            parse_summary(&no_cache_sim).map(|(_, c)| c),
            Some(Count { ir: 12, cycles: None })
        );
        assert_eq!(parse_summary(&serde_json::json!({"profiles": []})), None);
    }

    #[test]
    fn finds_versions_in_the_lock_file() {
        let lock = "[[package]]\nname = \"gungraun\"\nversion = \"0.20.0\"\nsource = \"x\"\n";
        assert_eq!(lock_version(lock, "gungraun").as_deref(), Some("0.20.0"));
        assert_eq!(lock_version(lock, "criterion"), None);
    }
}
