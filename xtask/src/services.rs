//! The external services the test suites need, made sure of before `cargo xtask test`
//! runs them: a missing service is a loud failure, never a skipped test.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Result;

/// The server the PostgreSQL tests use when `CAPACITOR_POSTGRES_URL` is not set.
pub(crate) const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// How long a local server may take to accept connections after we start it.
const START_WAIT: Duration = Duration::from_secs(30);

/// A server that answers, and how we know.
pub(crate) struct Service {
    /// The URL the tests get as `CAPACITOR_POSTGRES_URL`.
    pub(crate) url: String,
    /// "already running" or "started by xtask (…)".
    pub(crate) how: String,
}

impl Service {
    /// `url` with any password replaced by `***`, for printing.
    pub(crate) fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_owned(),
    }
}

/// Host and port of a `postgres://` URL or a `host=… port=…` key-value string.
fn host_port(url: &str) -> Option<(String, u16)> {
    host_port_or(url, 5432)
}

/// Host and port of a `scheme://` URL (or key-value string), `default_port` when absent.
fn host_port_or(url: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some((_, rest)) = url.split_once("://") {
        let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            match after.strip_prefix(':') {
                Some(p) => (host, p.parse().ok()?),
                None => (host, default_port),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().ok()?),
                None => (hostport, default_port),
            }
        };
        let host = if host.is_empty() { "127.0.0.1" } else { host };
        return Some((host.to_owned(), port));
    }
    let mut host = "127.0.0.1".to_owned();
    let mut port = default_port;
    for pair in url.split_whitespace() {
        match pair.split_once('=') {
            Some(("host", h)) => host = h.to_owned(),
            Some(("port", p)) => port = p.parse().ok()?,
            _ => {}
        }
    }
    Some((host, port))
}

fn answers(host: &str, port: u16) -> bool {
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
}

fn is_local(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost" | "::1")
}

/// Starts the machine's own cluster(s) with `pg_ctlcluster` (Debian's postgresql-common):
/// one per version under `/etc/postgresql`.
fn start_local_clusters() -> Result<String> {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .map_err(|e| format!("no PostgreSQL clusters under /etc/postgresql ({e})"))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|v| Path::new("/etc/postgresql").join(v).join("main").is_dir())
        .collect();
    versions.sort();
    if versions.is_empty() {
        return Err("no `main` cluster under /etc/postgresql".into());
    }
    let mut started = Vec::new();
    for version in &versions {
        let args = ["--skip-systemctl-redirect", version.as_str(), "main", "start"];
        eprintln!("xtask: starting PostgreSQL: pg_ctlcluster {}", args.join(" "));
        let status = Command::new("pg_ctlcluster").args(args).status();
        match status {
            Ok(s) if s.success() => started.push(version.clone()),
            // Already running is a non-zero exit too; the TCP check below decides.
            Ok(s) => eprintln!("xtask: pg_ctlcluster {version} main start: {s}"),
            Err(e) => return Err(format!("cannot run pg_ctlcluster: {e}").into()),
        }
    }
    Ok(format!("pg_ctlcluster {} main start", versions.join(",")))
}

/// Makes sure PostgreSQL answers at `CAPACITOR_POSTGRES_URL` (or the default): if it does
/// not and the URL is the local server, starts it and waits up to 30 s. Then exports
/// `CAPACITOR_POSTGRES_URL` to the processes xtask starts.
///
/// # Errors
///
/// When the server does not answer and cannot be started: the PostgreSQL tests would
/// fail, and under CI a missing service must fail the run rather than skip tests.
pub(crate) fn ensure_postgres() -> Result<Service> {
    let url = std::env::var("CAPACITOR_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
    let postgres = answering_postgres(url)?;
    // xtask is single-threaded: nothing reads the environment concurrently.
    std::env::set_var("CAPACITOR_POSTGRES_URL", &postgres.url);
    Ok(postgres)
}

fn answering_postgres(url: String) -> Result<Service> {
    let (host, port) = host_port(&url).ok_or_else(|| {
        format!(
            "cannot read host and port from CAPACITOR_POSTGRES_URL={}",
            redact(&url)
        )
    })?;
    if answers(&host, port) {
        return Ok(Service {
            url,
            how: "already running".to_owned(),
        });
    }
    let failure = |why: String| -> Box<dyn std::error::Error> {
        format!(
            "\n\n    !!! PostgreSQL does not answer at {host}:{port} ({}).\n    !!! {why}\n    \
             !!! The capacitor-postgres tests need it: start it, or set CAPACITOR_POSTGRES_URL.\n",
            redact(&url)
        )
        .into()
    };
    if !is_local(&host) {
        return Err(failure(
            "It is not a local server, so xtask does not start it.".to_owned(),
        ));
    }
    let how = start_local_clusters().map_err(|e| failure(format!("Starting it failed: {e}")))?;
    let started = Instant::now();
    while started.elapsed() < START_WAIT {
        if answers(&host, port) {
            return Ok(Service {
                url,
                how: format!(
                    "started by xtask ({how}, answered after {:.1?})",
                    started.elapsed()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(failure(format!(
        "`{how}` ran, but the server still did not answer after {START_WAIT:?}."
    )))
}

/// The server the Redis tests use when `CAPACITOR_REDIS_URL` is not set.
pub(crate) const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Makes sure Redis answers at `CAPACITOR_REDIS_URL` (or the default): if it does not and
/// the URL is local, starts `redis-server` (no persistence) on that port and waits up to
/// 30 s. Also checks that `redis-server` and `redis-cli` are installed: the fault, cluster
/// and sentinel tests start servers of their own. Exports `CAPACITOR_REDIS_URL`.
///
/// # Errors
///
/// When Redis does not answer and cannot be started, or the binaries are missing.
pub(crate) fn ensure_redis() -> Result<Service> {
    for binary in ["redis-server", "redis-cli"] {
        let found = Command::new(binary)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Err(format!(
                "\n\n    !!! `{binary}` is not installed; the capacitor-redis tests start servers with it.\n"
            )
            .into());
        }
    }
    let url = std::env::var("CAPACITOR_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned());
    let (host, port) = host_port_or(&url, 6379).ok_or_else(|| {
        format!(
            "cannot read host and port from CAPACITOR_REDIS_URL={}",
            redact(&url)
        )
    })?;
    let service = if answers(&host, port) {
        Service {
            url,
            how: "already running".to_owned(),
        }
    } else if !is_local(&host) {
        return Err(format!(
            "\n\n    !!! Redis does not answer at {host}:{port} ({}), a remote server.\n",
            redact(&url)
        )
        .into());
    } else {
        let dir = if Path::new("/var/lib/redis").is_dir() {
            std::path::PathBuf::from("/var/lib/redis")
        } else {
            std::env::temp_dir()
        };
        let port_s = port.to_string();
        let args = [
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            &port_s,
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        eprintln!(
            "xtask: starting Redis: redis-server {} --dir {}",
            args.join(" "),
            dir.display()
        );
        let status = Command::new("redis-server")
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .status()?;
        if !status.success() {
            return Err(
                format!("\n\n    !!! redis-server failed to start ({status}) on port {port}.\n").into(),
            );
        }
        let started = Instant::now();
        loop {
            if answers(&host, port) {
                break Service {
                    url,
                    how: format!(
                        "started by xtask (redis-server --daemonize, answered after {:.1?})",
                        started.elapsed()
                    ),
                };
            }
            if started.elapsed() > START_WAIT {
                return Err(format!(
                    "\n\n    !!! Redis started but did not answer on port {port} within {START_WAIT:?}.\n"
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // xtask is single-threaded: nothing reads the environment concurrently.
    std::env::set_var("CAPACITOR_REDIS_URL", &service.url);
    Ok(service)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_redis_host_and_port() {
        assert_eq!(
            host_port_or(DEFAULT_REDIS_URL, 6379),
            Some(("127.0.0.1".into(), 6379))
        );
        assert_eq!(
            host_port_or("redis://:secret@cache:7000/0", 6379),
            Some(("cache".into(), 7000))
        );
        assert_eq!(
            host_port_or("redis://localhost", 6379),
            Some(("localhost".into(), 6379))
        );
    }

    #[test]
    fn reads_host_and_port() {
        assert_eq!(host_port(DEFAULT_POSTGRES_URL), Some(("127.0.0.1".into(), 5432)));
        assert_eq!(
            host_port("postgresql://u:p@db.example:6543/x?sslmode=require"),
            Some(("db.example".into(), 6543))
        );
        assert_eq!(
            host_port("postgres://localhost/x"),
            Some(("localhost".into(), 5432))
        );
        assert_eq!(host_port("postgres://[::1]:5433/x"), Some(("::1".into(), 5433)));
        assert_eq!(host_port("postgres://[::1]/x"), Some(("::1".into(), 5432)));
        assert_eq!(
            host_port("host=10.0.0.1 port=5999 user=x"),
            Some(("10.0.0.1".into(), 5999))
        );
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://app:s3cret@h:5432/db"),
            "postgres://app:***@h:5432/db"
        );
        assert_eq!(redact(DEFAULT_POSTGRES_URL), DEFAULT_POSTGRES_URL);
    }
}
