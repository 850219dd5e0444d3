//! The external services the Redis and PostgreSQL suites need (tests and benchmarks),
//! made sure of before xtask runs them.
//!
//! For each backend, in this order:
//! 1. `CAPACITOR_REDIS_URL` / `CAPACITOR_POSTGRES_URL`, else the local default, when it
//!    answers;
//! 2. when that URL is local and down: the machine's own server, started as a system
//!    service would be (`pg_ctlcluster`, `redis-server --daemonize` on that port), left
//!    running;
//! 3. when that fails too and the server binaries are installed: a throwaway server of
//!    xtask's own on a free loopback port in a temporary directory (`redis-server` without
//!    persistence; `initdb` + `pg_ctl` with trust auth and a database `test`), stopped by
//!    its PID when xtask is done ([`Throwaway`]'s `Drop`, so also on failure);
//! 4. else the backend is missing: [`Services::require`] makes that a failure under
//!    `CI=true`, elsewhere a loud skip.
//!
//! The URLs in use are handed to the cargo processes xtask starts ([`Services::env`]).

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::Result;

/// The server the PostgreSQL suites use when `CAPACITOR_POSTGRES_URL` is not set.
pub(crate) const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The server the Redis suites use when `CAPACITOR_REDIS_URL` is not set.
pub(crate) const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// How long a local server may take to accept connections after we start it.
const START_WAIT: Duration = Duration::from_secs(30);

/// A backend the suites talk to over the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Postgres,
    Redis,
}

impl Backend {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "PostgreSQL",
            Backend::Redis => "Redis",
        }
    }

    /// The variable that carries its URL to the suites.
    pub(crate) fn env_var(self) -> &'static str {
        match self {
            Backend::Postgres => "CAPACITOR_POSTGRES_URL",
            Backend::Redis => "CAPACITOR_REDIS_URL",
        }
    }

    /// The workspace package whose tests need it.
    pub(crate) fn package(self) -> &'static str {
        match self {
            Backend::Postgres => "capacitor-postgres",
            Backend::Redis => "capacitor-redis",
        }
    }

    /// Tests outside [`package`](Backend::package) that need this backend too, as
    /// (package, nextest filter within it): left out with it when it is missing.
    pub(crate) fn other_tests(self) -> &'static [(&'static str, &'static str)] {
        // The facade's tests that use the servers: modules of its `it` binary, and the
        // extremes test of every backend's builder.
        match self {
            Backend::Postgres => &[
                ("capacitor", "binary(it) & test(/^(resilience|history)::/)"),
                ("capacitor", "binary(extremes_backends)"),
            ],
            Backend::Redis => &[
                (
                    "capacitor",
                    "binary(it) & test(/^(resilience|history|refresh)::/)",
                ),
                ("capacitor", "binary(extremes_backends)"),
            ],
        }
    }

    fn default_url(self) -> &'static str {
        match self {
            Backend::Postgres => DEFAULT_POSTGRES_URL,
            Backend::Redis => DEFAULT_REDIS_URL,
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Backend::Postgres => 5432,
            Backend::Redis => 6379,
        }
    }
}

/// What the services are for: the tests also need the server binaries (the Redis fault,
/// cluster and sentinel tests and the PostgreSQL restart test start servers of their own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    Test,
    Bench,
}

/// A server that answers, and how we know.
#[derive(Debug)]
pub(crate) struct Service {
    /// The URL the suites get.
    pub(crate) url: String,
    /// "already running", "started by xtask (…)" or "throwaway …".
    pub(crate) how: String,
}

impl Service {
    /// `url` with any password replaced by `***`, for printing.
    pub(crate) fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

/// The backends as found (or started), and the throwaway servers to stop at the end.
#[derive(Debug)]
pub(crate) struct Services {
    pub(crate) postgres: std::result::Result<Service, String>,
    pub(crate) redis: std::result::Result<Service, String>,
    /// Stopped (by PID) when this is dropped: held only for its `Drop`.
    #[allow(dead_code)]
    throwaway: Vec<Throwaway>,
}

impl Services {
    /// Finds or starts both backends.
    pub(crate) fn prepare(purpose: Purpose) -> Services {
        let mut throwaway = Vec::new();
        let postgres = find_or_start(Backend::Postgres, purpose, &mut throwaway);
        let redis = find_or_start(Backend::Redis, purpose, &mut throwaway);
        Services {
            postgres,
            redis,
            throwaway,
        }
    }

    pub(crate) fn get(&self, backend: Backend) -> std::result::Result<&Service, &str> {
        let found = match backend {
            Backend::Postgres => &self.postgres,
            Backend::Redis => &self.redis,
        };
        found.as_ref().map_err(String::as_str)
    }

    /// The variables to hand to the processes xtask starts: the URL of every backend in
    /// use.
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        [Backend::Postgres, Backend::Redis]
            .into_iter()
            .filter_map(|b| self.get(b).ok().map(|s| (b.env_var().to_owned(), s.url.clone())))
            .collect()
    }

    /// The backends that are missing, each with why. Under CI a missing backend is an
    /// error; elsewhere it is printed loudly and returned, for the caller to skip.
    ///
    /// # Errors
    ///
    /// Under `CI=true`, when a backend is missing.
    pub(crate) fn require(&self, ci: bool) -> Result<Vec<(Backend, String)>> {
        let missing: Vec<(Backend, String)> = [Backend::Postgres, Backend::Redis]
            .into_iter()
            .filter_map(|b| self.get(b).err().map(|why| (b, why.to_owned())))
            .collect();
        for (backend, why) in &missing {
            let (what, then) = if ci {
                ("FAILS THE RUN (CI=true)", "need it")
            } else {
                ("SKIPPED", "do not run")
            };
            eprintln!(
                "\n    !!! {} {what}: {why}\n    !!! The suites of {} {then}. Set {} or install the \
                 server.\n",
                backend.name(),
                backend.package(),
                backend.env_var(),
            );
        }
        if ci && !missing.is_empty() {
            return Err(format!(
                "CI=true and {} missing: a missing service fails CI rather than skipping tests",
                missing
                    .iter()
                    .map(|(b, _)| b.name())
                    .collect::<Vec<_>>()
                    .join(" and ")
            )
            .into());
        }
        Ok(missing)
    }
}

/// `url` with any password replaced by `***` (userinfo, a `password=` query parameter or
/// key-value pair), for printing.
pub(crate) fn redact(url: &str) -> String {
    let url = redact_password_params(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return url;
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url,
    }
}

/// `password=…` (a query parameter or a key-value pair) with its value replaced by `***`.
fn redact_password_params(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find("password=") {
        let before = &rest[..at];
        let starts_param = before.is_empty() || before.ends_with(['?', '&', ' ', '\t']);
        let value_start = at + "password=".len();
        out.push_str(&rest[..value_start]);
        rest = &rest[value_start..];
        if starts_param {
            let end = rest.find(['&', ' ', '\t', '#']).unwrap_or(rest.len());
            out.push_str("***");
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
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

/// The URL of a throwaway PostgreSQL server: trust auth as `postgres`, database `test`.
pub(crate) fn throwaway_postgres_url(port: u16) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/test")
}

/// The URL of a throwaway Redis server.
pub(crate) fn throwaway_redis_url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// A loopback port nothing listens on right now (the OS picks it; the listener is closed
/// before returning, so a server started next can bind it).
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

fn answers(host: &str, port: u16) -> bool {
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
}

fn wait_until_answers(host: &str, port: u16, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if answers(host, port) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn is_local(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost" | "::1")
}

fn runs(binary: &str) -> bool {
    Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The directory of PostgreSQL's server binaries (`initdb`, `pg_ctl`), if installed.
fn postgres_bindir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("pg_ctl").is_file() && dir.join("initdb").is_file() {
            return Some(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("pg_ctl").is_file() && p.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop()
}

/// Why the binaries the test suites start servers with are missing, if they are.
fn missing_binaries(backend: Backend) -> Option<String> {
    match backend {
        Backend::Redis => ["redis-server", "redis-cli"]
            .into_iter()
            .find(|b| !runs(b))
            .map(|b| format!("`{b}` is not installed (the capacitor-redis tests start servers with it)")),
        Backend::Postgres => postgres_bindir().is_none().then(|| {
            "PostgreSQL's server binaries (initdb, pg_ctl) are not installed (the restart test \
             starts a cluster with them)"
                .to_owned()
        }),
    }
}

fn find_or_start(
    backend: Backend,
    purpose: Purpose,
    throwaway: &mut Vec<Throwaway>,
) -> std::result::Result<Service, String> {
    let found = find_or_start_server(backend, throwaway)?;
    if purpose == Purpose::Test {
        if let Some(why) = missing_binaries(backend) {
            return Err(why);
        }
    }
    Ok(found)
}

fn find_or_start_server(
    backend: Backend,
    throwaway: &mut Vec<Throwaway>,
) -> std::result::Result<Service, String> {
    let url = std::env::var(backend.env_var()).unwrap_or_else(|_| backend.default_url().to_owned());
    let (host, port) = host_port_or(&url, backend.default_port()).ok_or_else(|| {
        format!(
            "cannot read host and port from {}={}",
            backend.env_var(),
            redact(&url)
        )
    })?;
    if answers(&host, port) {
        return Ok(Service {
            url,
            how: "already running".to_owned(),
        });
    }
    if !is_local(&host) {
        return Err(format!(
            "{} does not answer at {host}:{port} ({}), a remote server xtask does not start",
            backend.name(),
            redact(&url)
        ));
    }
    // The machine's own server first.
    let system = match backend {
        Backend::Postgres => start_local_clusters(),
        Backend::Redis => start_local_redis(port),
    };
    let system_failure = match system {
        Ok(how) => match wait_until_answers(&host, port, START_WAIT) {
            Some(after) => {
                return Ok(Service {
                    url,
                    how: format!("started by xtask ({how}, answered after {after:.1?})"),
                })
            }
            None => format!("`{how}` ran, but nothing answered on port {port} within {START_WAIT:?}"),
        },
        Err(e) => e.to_string(),
    };
    eprintln!(
        "xtask: {} at {} does not answer and the local server could not be started ({system_failure}); \
         trying a throwaway server",
        backend.name(),
        redact(&url)
    );
    let started = match backend {
        Backend::Postgres => Throwaway::postgres(),
        Backend::Redis => Throwaway::redis(),
    };
    match started {
        Ok(server) => {
            let service = Service {
                url: server.url.clone(),
                how: format!(
                    "throwaway server started by xtask in {} (PID {}), stopped at the end; {} did not answer",
                    server.dir.display(),
                    server.pid,
                    redact(&url)
                ),
            };
            throwaway.push(server);
            Ok(service)
        }
        Err(e) => Err(format!(
            "{} does not answer at {} ({system_failure}), and no throwaway server could be started ({e})",
            backend.name(),
            redact(&url)
        )),
    }
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
        match Command::new("pg_ctlcluster").args(args).status() {
            Ok(s) if s.success() => started.push(version.as_str()),
            // Already running is a non-zero exit too: that cluster is not on our port.
            Ok(s) => eprintln!("xtask: pg_ctlcluster {version} main start: {s}"),
            Err(e) => return Err(format!("cannot run pg_ctlcluster: {e}").into()),
        }
    }
    if started.is_empty() {
        return Err(format!(
            "pg_ctlcluster started no cluster (version(s) {}: already running elsewhere, or failed)",
            versions.join(",")
        )
        .into());
    }
    Ok(format!("pg_ctlcluster {} main start", started.join(",")))
}

/// Starts the machine's `redis-server` (daemonized, no persistence) on `port`, left
/// running like a system service.
fn start_local_redis(port: u16) -> Result<String> {
    if !runs("redis-server") {
        return Err("`redis-server` is not installed".into());
    }
    let dir = if Path::new("/var/lib/redis").is_dir() {
        PathBuf::from("/var/lib/redis")
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
        return Err(format!("redis-server failed to start ({status}) on port {port}").into());
    }
    Ok("redis-server --daemonize".to_owned())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A fresh, empty directory under the system's temporary directory.
fn temp_dir(prefix: &str) -> Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// A server of xtask's own: its process, its directory, its URL. Dropping it stops the
/// server by its PID (SIGTERM / SIGINT, then SIGKILL after 15 s) and removes the
/// directory.
#[derive(Debug)]
pub(crate) struct Throwaway {
    url: String,
    pid: u32,
    dir: PathBuf,
    /// Redis runs as our child; PostgreSQL's postmaster is pg_ctl's.
    child: Option<Child>,
}

impl Throwaway {
    fn redis() -> Result<Throwaway> {
        if !runs("redis-server") {
            return Err("`redis-server` is not installed".into());
        }
        let dir = temp_dir("capacitor-xtask-redis")?;
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let server = Throwaway {
            url: throwaway_redis_url(port),
            pid: child.id(),
            dir,
            child: Some(child),
        };
        eprintln!(
            "xtask: started a throwaway Redis (PID {}) at {} in {}",
            server.pid,
            server.url,
            server.dir.display()
        );
        if wait_until_answers("127.0.0.1", port, START_WAIT).is_none() {
            return Err(format!("the throwaway redis-server did not answer on port {port}").into());
        }
        Ok(server)
    }

    fn postgres() -> Result<Throwaway> {
        let bin =
            postgres_bindir().ok_or("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")?;
        let dir = temp_dir("capacitor-xtask-pg")?;
        // initdb refuses root: as root, the cluster belongs to and runs as `postgres`.
        let as_postgres = is_root();
        let run = |tool: &str, args: &[&str]| -> Result<()> {
            let mut cmd = if as_postgres {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
                c
            } else {
                Command::new(bin.join(tool))
            };
            let out = cmd.args(args).current_dir(&dir).stdin(Stdio::null()).output()?;
            if !out.status.success() {
                return Err(format!(
                    "{tool} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )
                .into());
            }
            Ok(())
        };
        if as_postgres {
            let status = Command::new("chown").arg("postgres:").arg(&dir).status()?;
            if !status.success() {
                return Err(format!("chown postgres: {} failed", dir.display()).into());
            }
        }
        let port = free_port()?;
        let data = dir.join("data").display().to_string();
        let log = dir.join("server.log").display().to_string();
        let options = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", dir.display());
        let started = run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        )
        .and_then(|()| {
            run(
                "pg_ctl",
                &["-D", &data, "-l", &log, "-o", &options, "-w", "-t", "30", "start"],
            )
        })
        .and_then(|()| {
            std::fs::read_to_string(dir.join("data/postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
                .ok_or_else(|| "pg_ctl started a server, but its postmaster.pid is unreadable".into())
        });
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let server = Throwaway {
            url: throwaway_postgres_url(port),
            pid,
            dir: dir.clone(),
            child: None,
        };
        eprintln!(
            "xtask: started a throwaway PostgreSQL (PID {}) at {} in {}",
            server.pid,
            server.url,
            server.dir.display()
        );
        let port_s = port.to_string();
        run(
            "createdb",
            &["-h", "127.0.0.1", "-p", &port_s, "-U", "postgres", "test"],
        )?;
        Ok(server)
    }

    fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => Path::new(&format!("/proc/{}", self.pid)).exists(),
        }
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        // PostgreSQL: SIGINT is the "fast" shutdown; Redis: SIGTERM.
        let signal = if self.child.is_some() { "-TERM" } else { "-INT" };
        let _ = Command::new("kill")
            .args([signal, &self.pid.to_string()])
            .stderr(Stdio::null())
            .status();
        let started = Instant::now();
        while self.alive() && started.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.alive() {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
        }
        if let Some(child) = &mut self.child {
            let _ = child.wait();
        }
        eprintln!(
            "xtask: stopped the throwaway server {} (PID {})",
            self.url, self.pid
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
        let host_port = |url| host_port_or(url, 5432);
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
        assert_eq!(host_port("postgres://h:notaport/x"), None);
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://app:s3cret@h:5432/db"),
            "postgres://app:***@h:5432/db"
        );
        assert_eq!(redact(DEFAULT_POSTGRES_URL), DEFAULT_POSTGRES_URL);
        assert_eq!(redact(DEFAULT_REDIS_URL), DEFAULT_REDIS_URL);
        assert_eq!(
            redact("redis://:secret@cache:7000/0"),
            "redis://:***@cache:7000/0"
        );
        assert_eq!(
            redact("redis://user:p@ss:w@rd@cache:7000"),
            "redis://user:***@cache:7000"
        );
        assert_eq!(
            redact("postgres://app@h/db?sslmode=require&password=s3cret"),
            "postgres://app@h/db?sslmode=require&password=***"
        );
        assert_eq!(
            redact("host=h user=app password=s3cret dbname=x"),
            "host=h user=app password=*** dbname=x"
        );
        // A key that merely ends in "password=" is not a password parameter.
        assert_eq!(redact("host=h mypassword=x"), "host=h mypassword=x");
    }

    #[test]
    fn builds_throwaway_urls() {
        assert_eq!(
            throwaway_postgres_url(54321),
            "postgres://postgres@127.0.0.1:54321/test"
        );
        assert_eq!(throwaway_redis_url(6390), "redis://127.0.0.1:6390");
        // What xtask builds, it can read back.
        assert_eq!(
            host_port_or(&throwaway_postgres_url(54321), 5432),
            Some(("127.0.0.1".into(), 54321))
        );
        assert_eq!(
            host_port_or(&throwaway_redis_url(6390), 6379),
            Some(("127.0.0.1".into(), 6390))
        );
    }

    /// Starts and stops real throwaway servers: needs redis-server and PostgreSQL's server
    /// binaries (`cargo test -p xtask -- --ignored`).
    #[test]
    #[ignore = "starts real servers"]
    fn throwaway_servers_start_answer_and_stop() {
        for server in [Throwaway::redis().unwrap(), Throwaway::postgres().unwrap()] {
            let (host, port) = host_port_or(&server.url, 1).unwrap();
            assert_eq!(host, "127.0.0.1");
            assert!(answers(&host, port), "{} answers", server.url);
            let (pid, dir) = (server.pid, server.dir.clone());
            assert!(dir.is_dir());
            drop(server);
            assert!(!answers(&host, port), "{} stopped", host);
            assert!(!Path::new(&format!("/proc/{pid}")).exists(), "PID {pid} gone");
            assert!(!dir.exists(), "{} removed", dir.display());
        }
    }

    #[test]
    fn free_ports_are_free_loopback_ports() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        // Nothing listens there, and a server can bind it.
        assert!(!answers("127.0.0.1", port));
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        assert_eq!(listener.local_addr().unwrap().port(), port);
        // Two picks in a row (the first still bound) differ.
        let other = free_port().unwrap();
        assert_ne!(other, port);
    }
}
