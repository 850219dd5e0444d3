//! `cargo xtask ci`'s supply-chain step: `cargo deny check` against `deny.toml` at the
//! repository root, for licences, duplicate versions (bans) and sources, then known
//! advisories.
//!
//! - cargo-deny is installed (`cargo install --locked`) when it is missing or of another
//!   minor version than [`VERSION`]: CI starts on a fresh machine, and `deny.toml` is
//!   written for that version's fields.
//! - The advisories check needs the RustSec advisory database, a git repository
//!   ([`DB_URL`], as `deny.toml` names it) that cargo-deny fetches with the git command.
//!   With `CAPACITOR_ADVISORY_DB` set to a git URL or a directory holding a copy of that
//!   repository, git is told to fetch from the copy instead (a `url.<copy>.insteadOf`
//!   rewrite in its environment); `deny.toml` and cargo-deny stay as they are.
//! - When the fetch fails, the copy cargo-deny fetched on an earlier run is used, with a
//!   warning that names the date of its newest commit (cargo-deny refuses a copy last
//!   fetched over 90 days ago). With no such copy, the advisories check fails and says
//!   why: it never passes without a database.

use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{cargo, cargo_env, Result};

/// The cargo-deny release `deny.toml` is written for: a requirement for `cargo install`.
const VERSION: &str = "~0.20";
/// How `cargo deny --version` starts for a release that meets [`VERSION`].
const VERSION_PREFIX: &str = "cargo-deny 0.20.";
/// The advisory database, exactly as `deny.toml`'s `db-urls` names it (git rewrites
/// URLs that start with it).
pub(crate) const DB_URL: &str = "https://github.com/rustsec/advisory-db";
/// Where to fetch the advisory database from instead of [`DB_URL`]: a git URL or a path.
const DB_COPY_ENV: &str = "CAPACITOR_ADVISORY_DB";
/// A database whose newest commit is older than this many days is reported as old.
const OLD_DAYS: u64 = 30;

/// Every check of `deny.toml`: the ones that need no database first, so that they report
/// even when the database cannot be had.
pub(crate) fn check() -> Result {
    install()?;
    cargo(&["deny", "check", "bans", "licenses", "sources"])?;
    advisories()?;
    default_features()
}

/// What a service that adds `capacitor` with its default features gets must have no
/// advisory at all. Inside the workspace Cargo resolves every member's features together
/// (the backends' dev-dependencies turn most of the facade's features on), so the check
/// runs on a scratch crate outside it that depends on the facade by path, as a user's
/// service would, against a policy without `deny.toml`'s exceptions (those are for
/// features that are off by default, the benches and the tools).
const DEFAULT_FEATURES_POLICY: &str = "\
[advisories]
unmaintained = \"all\"
unsound = \"all\"
yanked = \"deny\"
ignore = []
";

/// The advisories check of a fresh service on the facade's default features, on the
/// database the workspace check just used (offline), with no exception.
fn default_features() -> Result {
    let root = crate::root();
    let dir = root.join("target").join("fresh-service");
    std::fs::create_dir_all(dir.join("src"))?;
    let facade = root.join("capacitor");
    let manifest = format!(
        "[package]\nname = \"fresh-service\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
         [dependencies]\ncapacitor = {{ path = {:?} }}\n\n[workspace]\n",
        facade.to_string_lossy()
    );
    std::fs::write(dir.join("Cargo.toml"), manifest)?;
    std::fs::write(dir.join("src").join("lib.rs"), "")?;
    let policy = dir.join("deny.toml");
    std::fs::write(&policy, DEFAULT_FEATURES_POLICY)?;
    // The versions a new service would get today: a fresh resolution, not the lock of an
    // earlier run (cargo-deny's `--offline` keeps whatever lock it finds).
    let lock = dir.join("Cargo.lock");
    if lock.exists() {
        std::fs::remove_file(&lock)?;
    }
    let manifest_path = dir.join("Cargo.toml");
    if let Err(e) = cargo(&[
        "generate-lockfile",
        "--manifest-path",
        &manifest_path.to_string_lossy(),
    ]) {
        eprintln!(
            "\nxtask: WARNING: could not resolve the fresh service's dependencies online ({e}); \
             checking the versions in the local registry cache instead"
        );
    }
    eprintln!(
        "\nxtask: advisories of a fresh service on `capacitor`'s default features ({}), no exceptions",
        dir.display()
    );
    cargo(&[
        "deny",
        "--offline",
        "--manifest-path",
        &dir.join("Cargo.toml").to_string_lossy(),
        "--config",
        &policy.to_string_lossy(),
        "check",
        "advisories",
    ])
}

/// What `cargo deny --version` prints, if cargo-deny runs.
fn installed_version() -> Option<String> {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["deny", "--version"])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Installs cargo-deny unless a release meeting [`VERSION`] is there.
fn install() -> Result {
    match installed_version() {
        Some(version) if version.starts_with(VERSION_PREFIX) => {
            eprintln!("\nxtask: {version}");
            return Ok(());
        }
        Some(version) => eprintln!(
            "\nxtask: {version} is installed, deny.toml is written for cargo-deny {VERSION}: \
             installing that (cargo install --locked cargo-deny)"
        ),
        None => eprintln!(
            "\nxtask: cargo-deny is not installed: installing cargo-deny {VERSION} \
             (cargo install --locked cargo-deny; it compiles for a few minutes)"
        ),
    }
    cargo(&["install", "--locked", "cargo-deny", "--version", VERSION]).map_err(|e| {
        format!("installing cargo-deny failed ({e}): the advisories, licences, bans and sources checks cannot run")
    })?;
    match installed_version() {
        Some(version) if version.starts_with(VERSION_PREFIX) => {
            eprintln!("xtask: installed {version}");
            Ok(())
        }
        other => Err(format!(
            "cargo-deny {VERSION} was installed, but `cargo deny --version` gives {other:?}: \
             is another cargo-deny earlier in PATH?"
        )
        .into()),
    }
}

/// The copy named by `CAPACITOR_ADVISORY_DB`, as git takes it: a URL as it is, a path
/// made absolute (git runs in another directory). `None` when it is not set.
fn db_copy() -> Result<Option<String>> {
    let Some(value) = std::env::var_os(DB_COPY_ENV) else {
        return Ok(None);
    };
    let value = value
        .into_string()
        .map_err(|v| format!("{DB_COPY_ENV}={v:?} is not UTF-8"))?;
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    if value.contains("://") {
        return Ok(Some(value.to_owned()));
    }
    let path =
        std::path::absolute(value).map_err(|e| format!("{DB_COPY_ENV}={value}: not a usable path: {e}"))?;
    if !path.is_dir() {
        return Err(format!(
            "{DB_COPY_ENV}={value}: no such directory (a git URL, or the path of a copy of {DB_URL})"
        )
        .into());
    }
    Ok(Some(path.to_string_lossy().into_owned()))
}

/// The environment that makes git fetch [`DB_URL`] from `copy`, after any git
/// configuration the environment already gives (`GIT_CONFIG_COUNT` and its pairs).
fn redirect(copy: &str) -> Vec<(String, String)> {
    let given: usize = std::env::var("GIT_CONFIG_COUNT")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    vec![
        ("GIT_CONFIG_COUNT".to_owned(), (given + 1).to_string()),
        (format!("GIT_CONFIG_KEY_{given}"), format!("url.{copy}.insteadOf")),
        (format!("GIT_CONFIG_VALUE_{given}"), DB_URL.to_owned()),
    ]
}

/// The advisories check, on a database fetched now, else on the copy fetched before.
fn advisories() -> Result {
    let copy = db_copy()?;
    let env = copy.as_deref().map(redirect).unwrap_or_default();
    let source = match &copy {
        Some(copy) => format!("{copy} ({DB_COPY_ENV}, in place of {DB_URL})"),
        None => DB_URL.to_owned(),
    };
    eprintln!("\nxtask: the RustSec advisory database, from {source}");
    match cargo_env(&["deny", "fetch", "db"], &env) {
        Ok(()) => {
            describe_db(false);
            cargo_env(&["deny", "check", "advisories"], &env)
        }
        Err(fetch_error) => {
            let Some(db) = local_db() else {
                return Err(format!(
                    "the advisories check cannot run: the RustSec advisory database could not \
                     be fetched from {source} ({fetch_error}), and cargo-deny has no earlier \
                     copy of it in {}. Set {DB_COPY_ENV} to a git URL or a directory holding a \
                     copy of {DB_URL} that this machine reaches.",
                    db_root().display()
                )
                .into());
            };
            eprintln!(
                "\nxtask: WARNING: the RustSec advisory database could not be fetched from \
                 {source}: checking against the copy fetched earlier, {}",
                db.display()
            );
            describe_db(true);
            cargo_env(&["deny", "--offline", "check", "advisories"], &env)
        }
    }
}

/// Where cargo-deny keeps its advisory databases by default: `$CARGO_HOME/advisory-dbs`.
fn db_root() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_default()
        .join("advisory-dbs")
}

/// The clone of [`DB_URL`] cargo-deny keeps (a directory `advisory-db-<hash>` whose
/// `origin` is that URL), if there is one.
fn local_db() -> Option<PathBuf> {
    std::fs::read_dir(db_root())
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("advisory-db-"))
        })
        .find(|path| {
            git(path, &["config", "--get", "remote.origin.url"])
                .is_some_and(|url| url.eq_ignore_ascii_case(DB_URL))
        })
}

/// `git -C dir args…`'s output, trimmed, when it succeeds.
fn git(dir: &std::path::Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Says how recent the database is: the date of its newest commit, and a warning when
/// that is over [`OLD_DAYS`] old or the copy is an earlier one.
fn describe_db(earlier_copy: bool) {
    let Some(db) = local_db() else {
        eprintln!(
            "xtask: WARNING: cannot find the advisory database cargo-deny fetched in {}",
            db_root().display()
        );
        return;
    };
    let Some(head) = git(&db, &["log", "-1", "--format=%ct %cs %h"]) else {
        eprintln!(
            "xtask: WARNING: cannot read the newest commit of {}",
            db.display()
        );
        return;
    };
    let mut fields = head.split(' ');
    let (Some(secs), Some(date), Some(commit)) = (fields.next(), fields.next(), fields.next()) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = secs
        .parse::<u64>()
        .map_or(0, |secs| now.saturating_sub(secs) / 86_400);
    let old = earlier_copy || days > OLD_DAYS;
    eprintln!(
        "xtask: {}advisory database at commit {commit} of {date} ({days} days ago)",
        if old { "WARNING: " } else { "" }
    );
    if days > OLD_DAYS {
        eprintln!(
            "xtask: WARNING: advisories published since {date} are not checked; update the copy \
             ({DB_COPY_ENV}) or reach {DB_URL}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_toml_names_the_database_that_is_redirected() {
        let config = std::fs::read_to_string(crate::root().join("deny.toml")).unwrap_or_default();
        assert!(
            config.contains(&format!("db-urls = [\"{DB_URL}\"]")),
            "deny.toml's db-urls must be exactly [\"{DB_URL}\"]: the URL git is told to rewrite"
        );
    }

    #[test]
    fn redirect_comes_after_the_given_git_configuration() {
        let env = redirect("/srv/advisory-db");
        let count = env
            .iter()
            .find(|(k, _)| k == "GIT_CONFIG_COUNT")
            .map(|(_, v)| v.clone());
        let given: usize = std::env::var("GIT_CONFIG_COUNT")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert_eq!(count, Some((given + 1).to_string()));
        assert!(env.contains(&(
            format!("GIT_CONFIG_KEY_{given}"),
            "url./srv/advisory-db.insteadOf".to_owned()
        )));
        assert!(env.contains(&(format!("GIT_CONFIG_VALUE_{given}"), DB_URL.to_owned())));
    }
}
