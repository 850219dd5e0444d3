//! Staleness checks for tests that run several processes over one cache and bus.
//!
//! The children (the test binary run again, see [`Children::spawn`]) print, through
//! [`Out`], each write and each read with its start and end time ([`now_us`]: one
//! machine, one clock). Every key has one writer, so a key's writes, in the order its
//! writer printed them, are the store's order. [`check`] then classifies every read: it
//! is stale when the value it returned had already been overwritten by a write
//! acknowledged before the read began, its window running from that write's
//! acknowledgement to the end of the read. A failed write's value is only "maybe"
//! written: a read may return it, and it supersedes nothing. A value no write carried
//! is unknown.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::ops::Deref;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::MultiLayer;

/// Microseconds since the epoch: comparable across the processes of one machine.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A line a child printed (without its tag), parsed.
///
/// ```
/// use capacitor_core::testkit::staleness::Line;
///
/// let read = Line::parse("R k1 - 5 9");
/// assert_eq!(read, Line::Read { key: "k1".into(), value: None, begun: 5, ended: 9 });
/// assert_eq!(Line::parse("status 1 ok"), Line::Other("status 1 ok".into()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `ready`: the child is up.
    Ready,
    /// `W key value begun ack [rest]`: an acknowledged write.
    Write {
        /// The key written.
        key: String,
        /// The value written.
        value: String,
        /// When the write began (µs).
        begun: u64,
        /// When it was acknowledged (µs).
        ack: u64,
        /// What the test printed after the times.
        rest: String,
    },
    /// `WE key value begun ended message`: a failed write, maybe applied.
    WriteError {
        /// The key written.
        key: String,
        /// The value written.
        value: String,
        /// When the write began (µs).
        begun: u64,
        /// When it failed (µs).
        ended: u64,
        /// The error.
        message: String,
    },
    /// `R key value begun ended` (`-` for no value): a read.
    Read {
        /// The key read.
        key: String,
        /// The value served, if any.
        value: Option<String>,
        /// When the read began (µs).
        begun: u64,
        /// When it returned (µs).
        ended: u64,
    },
    /// `RE key begun ended message`: a failed read.
    ReadError {
        /// The key read.
        key: String,
        /// When the read began (µs).
        begun: u64,
        /// When it failed (µs).
        ended: u64,
        /// The error.
        message: String,
    },
    /// `stats text`: the child's final counters.
    Stats(String),
    /// `done`: the child is about to exit.
    Done,
    /// Any other line, whole: a test's own kinds (`status`, …).
    Other(String),
}

impl Line {
    /// Parses one line.
    ///
    /// # Panics
    ///
    /// When a line of a known kind lacks a field or has a time that is not a number.
    pub fn parse(line: &str) -> Line {
        let f: Vec<&str> = line.split(' ').collect();
        let s = |i: usize| -> String {
            (*f.get(i)
                .unwrap_or_else(|| panic!("field {i} missing in `{line}`")))
            .to_owned()
        };
        let n = |i: usize| -> u64 {
            s(i).parse()
                .unwrap_or_else(|_| panic!("field {i} of `{line}` is not a number"))
        };
        let from = |i: usize| f.get(i..).map_or(String::new(), |r| r.join(" "));
        match f[0] {
            "ready" => Line::Ready,
            "W" => Line::Write {
                key: s(1),
                value: s(2),
                begun: n(3),
                ack: n(4),
                rest: from(5),
            },
            "WE" => Line::WriteError {
                key: s(1),
                value: s(2),
                begun: n(3),
                ended: n(4),
                message: from(5),
            },
            "R" => Line::Read {
                key: s(1),
                value: (f.get(2) != Some(&"-")).then(|| s(2)),
                begun: n(3),
                ended: n(4),
            },
            "RE" => Line::ReadError {
                key: s(1),
                begun: n(2),
                ended: n(3),
                message: from(4),
            },
            "stats" => Line::Stats(from(1)),
            "done" => Line::Done,
            _ => Line::Other(line.to_owned()),
        }
    }
}

/// The child's side: prints lines starting with the tag the parent looks for (the test
/// harness prints too).
#[derive(Debug, Clone, Copy)]
pub struct Out {
    /// The tag, a word and a space.
    pub tag: &'static str,
}

impl Out {
    /// Prints `text` after the tag.
    pub fn line(&self, text: impl fmt::Display) {
        println!("{}{text}", self.tag);
    }

    /// Prints `ready`.
    pub fn ready(&self) {
        self.line(format_args!("ready {}", now_us()));
    }

    /// Prints a write of `value` to `key` begun at `begun` (µs) that ended now: `W`, with
    /// `rest` after the times, or `WE` with the error.
    pub fn write<E: fmt::Display>(
        &self,
        key: &str,
        value: &str,
        begun: u64,
        result: &Result<(), E>,
        rest: &str,
    ) {
        let ended = now_us();
        match result {
            Ok(()) if rest.is_empty() => self.line(format_args!("W {key} {value} {begun} {ended}")),
            Ok(()) => self.line(format_args!("W {key} {value} {begun} {ended} {rest}")),
            Err(e) => self.line(format_args!("WE {key} {value} {begun} {ended} {e}")),
        }
    }

    /// Reads every key of `keys` through `cache`, printing each read (`R` or `RE`).
    pub async fn read_all(&self, cache: &MultiLayer<String, String>, keys: &[String]) {
        for key in keys {
            let begun = now_us();
            match cache.get(key).await {
                Ok(v) => self.line(format_args!(
                    "R {key} {} {begun} {}",
                    v.as_deref().unwrap_or("-"),
                    now_us()
                )),
                Err(e) => self.line(format_args!("RE {key} {begun} {} {e}", now_us())),
            }
        }
    }

    /// Prints `done`.
    pub fn done(&self) {
        self.line("done");
    }
}

/// The child's side: the parent's commands, one a line of stdin, read on a thread.
pub fn commands() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The parent's side: the children, and every line they printed, in arrival order.
/// Dropping it kills the children.
#[derive(Debug)]
pub struct Children {
    children: Vec<(Child, Option<ChildStdin>)>,
    rx: mpsc::Receiver<(usize, String)>,
    /// Every line of every child (by index), in arrival order.
    pub events: Vec<(usize, Line)>,
    /// Every wait ends by then; the budget it closes, for the message.
    deadline: Option<(Instant, Duration)>,
}

impl Children {
    /// Runs `n` copies of this test binary, each running the ignored test `test` alone
    /// (`--exact test --ignored --nocapture --test-threads 1`) with the environment
    /// `env(i)`, and collects their lines that hold `tag` (from after it).
    ///
    /// # Panics
    ///
    /// When the binary cannot be run again.
    pub fn spawn(
        n: usize,
        test: &str,
        tag: &'static str,
        env: impl Fn(usize) -> Vec<(String, String)>,
    ) -> Children {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("the test binary: {e}"));
        let (tx, rx) = mpsc::channel();
        let children = (0..n)
            .map(|i| {
                let mut child = Command::new(&exe)
                    .args(["--exact", test, "--ignored", "--nocapture", "--test-threads", "1"])
                    .envs(env(i))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .unwrap_or_else(|e| panic!("re-run the test binary as a child: {e}"));
                let stdout = child.stdout.take();
                let stdin = child.stdin.take();
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in stdout
                        .into_iter()
                        .flat_map(|s| BufReader::new(s).lines().map_while(Result::ok))
                    {
                        if let Some(at) = line.find(tag) {
                            if tx.send((i, line[at + tag.len()..].to_owned())).is_err() {
                                break;
                            }
                        }
                    }
                });
                (child, stdin)
            })
            .collect();
        Children {
            children,
            rx,
            events: Vec::new(),
            deadline: None,
        }
    }

    /// Ends every wait by `at`, the end of a test's `budget`.
    pub fn deadline(mut self, at: Instant, budget: Duration) -> Self {
        self.deadline = Some((at, budget));
        self
    }

    /// Sends `command` (a line) to child `i`.
    pub fn send(&mut self, i: usize, command: &str) {
        if let Some((_, Some(stdin))) = self.children.get_mut(i) {
            let _ = writeln!(stdin, "{command}");
            let _ = stdin.flush();
        }
    }

    /// Sends `command` to every child.
    pub fn send_all(&mut self, command: &str) {
        for i in 0..self.children.len() {
            self.send(i, command);
        }
    }

    /// Takes the lines that arrived, waiting at most `wait` for the first one; the index
    /// of the first new event.
    fn drain(&mut self, wait: Duration) -> usize {
        let first = self.events.len();
        if let Ok((i, line)) = self.rx.recv_timeout(wait) {
            self.events.push((i, Line::parse(&line)));
            while let Ok((i, line)) = self.rx.try_recv() {
                self.events.push((i, Line::parse(&line)));
            }
        }
        first
    }

    /// Collects for `d`.
    pub fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.drain(end.saturating_duration_since(Instant::now()));
        }
    }

    /// Collects until `done` holds for the new events (each call sees only the events
    /// that arrived since the previous one), at most `timeout` (and never past the
    /// deadline).
    ///
    /// # Panics
    ///
    /// When the time runs out.
    pub fn until(&mut self, timeout: Duration, what: &str, mut done: impl FnMut(&[(usize, Line)]) -> bool) {
        let mut end = Instant::now() + timeout;
        if let Some((deadline, _)) = self.deadline {
            end = end.min(deadline);
        }
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                match self.deadline {
                    Some((_, budget)) => panic!(
                        "timed out waiting for {what} (at most {timeout:?}, within the test's {budget:?})"
                    ),
                    None => panic!("timed out after {timeout:?} waiting for {what}"),
                }
            }
            let first = self.drain(left.min(Duration::from_millis(100)));
            if done(&self.events[first..]) {
                return;
            }
        }
    }

    /// Collects until every child printed a line `is` accepts (`ready`, `done`), at most
    /// `timeout`.
    pub fn until_each(&mut self, timeout: Duration, what: &str, is: impl Fn(&Line) -> bool) {
        let n = self.children.len();
        let mut seen = 0;
        self.until(timeout, what, |events| {
            seen += events.iter().filter(|(_, e)| is(e)).count();
            seen == n
        });
    }

    /// Sends `status <round>` to every child until all of them answer, in one round,
    /// that they recovered: `answer(line, round)` reads a child's answer to `round`
    /// (`None` for other lines). Waits at most `per_round` for the answers of a round;
    /// returns the moment they all recovered (µs).
    ///
    /// # Panics
    ///
    /// When recovery takes longer than `timeout`.
    pub fn wait_recovered(
        &mut self,
        timeout: Duration,
        per_round: Duration,
        answer: impl Fn(&Line, u64) -> Option<bool>,
    ) -> u64 {
        let end = Instant::now() + timeout;
        let n = self.children.len();
        let mut round = 0u64;
        loop {
            round += 1;
            assert!(
                Instant::now() < end,
                "recovery did not complete within {timeout:?}"
            );
            self.send_all(&format!("status {round}"));
            let mut answers: HashMap<usize, bool> = HashMap::new();
            self.until(per_round, "status answers", |events| {
                for (i, e) in events {
                    if let Some(ok) = answer(e, round) {
                        answers.insert(*i, ok);
                    }
                }
                answers.len() == n
            });
            if answers.values().all(|ok| *ok) {
                return now_us();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the children; every line they printed.
    pub fn finish(mut self) -> Vec<(usize, Line)> {
        self.kill();
        std::mem::take(&mut self.events)
    }

    fn kill(&mut self) {
        for (child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One phase of a test: from its start to the next one's.
#[derive(Debug, Clone)]
pub struct Phase {
    /// Its name, as the table prints it.
    pub name: &'static str,
    /// When it began (µs).
    pub start: u64,
    /// Whether no read may be stale beyond the bound in it.
    pub checked: bool,
}

/// A test's phases, in order.
#[derive(Debug, Clone, Default)]
pub struct Phases(Vec<Phase>);

impl Phases {
    /// Begins a phase now.
    pub fn begin(&mut self, name: &'static str, checked: bool) {
        self.0.push(Phase {
            name,
            start: now_us(),
            checked,
        });
    }

    /// The index of the phase that holds `t` (µs).
    pub fn of(&self, t: u64) -> usize {
        self.0.iter().rposition(|p| p.start <= t).unwrap_or(0)
    }
}

impl Deref for Phases {
    type Target = [Phase];

    fn deref(&self) -> &[Phase] {
        &self.0
    }
}

/// What [`check`] counted in one phase.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Reads begun in the phase (failed ones too).
    pub reads: u64,
    /// Stale reads.
    pub stale: u64,
    /// Reads stale beyond the bound.
    pub beyond: u64,
    /// When the last read stale beyond the bound began (µs; 0 for none).
    pub last_beyond: u64,
    /// Failed reads.
    pub read_errors: u64,
    /// Reads that returned a failed write's value.
    pub maybe: u64,
    /// Writes begun in the phase (failed ones too).
    pub writes: u64,
    /// Failed writes.
    pub write_errors: u64,
    /// The stale reads' windows (µs), sorted.
    pub windows: Vec<u64>,
}

/// A stale read, for the report.
#[derive(Debug, Clone)]
pub struct Stale {
    /// The reading child.
    pub instance: usize,
    /// The phase it began in.
    pub phase: usize,
    /// The phase's name.
    pub phase_name: &'static str,
    /// The key read.
    pub key: String,
    /// The value served, if any.
    pub served: Option<String>,
    /// When the read began (µs).
    pub begun: u64,
    /// When it returned (µs).
    pub ended: u64,
    /// The first acknowledged write the served value misses.
    pub superseded_by: String,
    /// When that write was acknowledged (µs).
    pub superseded_ack: u64,
    /// The last write acknowledged before the read began.
    pub latest: String,
    /// From that acknowledgement to the end of the read (µs).
    pub window: u64,
}

impl fmt::Display for Stale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "phase {} instance {} key {} served {} (read {}..{} µs) superseded by {} acked at {} \
             ({} µs before the read began); latest acked before the read: {}",
            self.phase_name,
            self.instance,
            self.key,
            self.served.as_deref().unwrap_or("nothing"),
            self.begun,
            self.ended,
            self.superseded_by,
            self.superseded_ack,
            self.begun.saturating_sub(self.superseded_ack),
            self.latest
        )
    }
}

/// The outcome of [`check`].
#[derive(Debug, Clone, Default)]
pub struct Checked {
    /// Per phase.
    pub rows: Vec<Row>,
    /// Every stale read, in arrival order.
    pub stale: Vec<Stale>,
    /// Every read of a value no write carried, described.
    pub unknown: Vec<String>,
}

/// Classifies every read in `events` begun by `end` (µs), per phase of its start:
/// stale, stale beyond `bound` (µs), of a failed write's value, of an unknown value;
/// and counts the writes.
///
/// # Examples
///
/// ```
/// use capacitor_core::testkit::staleness::{check, Line, Phases};
///
/// let mut phases = Phases::default();
/// phases.begin("1 steady", true);
/// let t = phases[0].start;
/// let line = |s: String| (0, Line::parse(&s));
/// let events = [
///     line(format!("W k 0:1 {t} {}", t + 10)),
///     line(format!("W k 0:2 {} {}", t + 20, t + 30)),
///     // Began after 0:2 was acknowledged, served 0:1: stale for 60 µs.
///     line(format!("R k 0:1 {} {}", t + 80, t + 90)),
/// ];
/// let checked = check(&events, &phases, u64::MAX, 1_000);
/// assert_eq!((checked.rows[0].stale, checked.rows[0].beyond), (1, 0));
/// assert_eq!(checked.rows[0].windows, [60]);
/// ```
pub fn check(events: &[(usize, Line)], phases: &Phases, end: u64, bound: u64) -> Checked {
    let mut rows: Vec<Row> = phases.iter().map(|_| Row::default()).collect();
    // Per key, its writer's attempts in order: (value, acknowledgement if any).
    let mut attempts: HashMap<&str, Vec<(&str, Option<u64>)>> = HashMap::new();
    for (_, e) in events {
        match e {
            Line::Write {
                key,
                value,
                begun,
                ack,
                ..
            } => {
                rows[phases.of(*begun)].writes += 1;
                attempts.entry(key).or_default().push((value, Some(*ack)));
            }
            Line::WriteError {
                key, value, begun, ..
            } => {
                let row = &mut rows[phases.of(*begun)];
                row.writes += 1;
                row.write_errors += 1;
                attempts.entry(key).or_default().push((value, None));
            }
            _ => {}
        }
    }
    let position: HashMap<(&str, &str), usize> = attempts
        .iter()
        .flat_map(|(k, ws)| ws.iter().enumerate().map(move |(i, (v, _))| ((*k, *v), i)))
        .collect();
    // Per key, the acknowledged attempts' positions and times (in both orders at once).
    let acked: HashMap<&str, Vec<(usize, u64)>> = attempts
        .iter()
        .map(|(k, ws)| {
            let acks = ws
                .iter()
                .enumerate()
                .filter_map(|(i, (_, ack))| ack.map(|ack| (i, ack)))
                .collect();
            (*k, acks)
        })
        .collect();
    let mut stale = Vec::new();
    let mut unknown = Vec::new();
    for (instance, e) in events {
        match e {
            Line::Read {
                key,
                value,
                begun,
                ended,
            } if *begun <= end => {
                let p = phases.of(*begun);
                rows[p].reads += 1;
                let served = match value {
                    None => None,
                    Some(v) => match position.get(&(key.as_str(), v.as_str())) {
                        Some(&i) => {
                            if attempts[key.as_str()][i].1.is_none() {
                                rows[p].maybe += 1;
                            }
                            Some(i)
                        }
                        None => {
                            unknown.push(format!(
                                "phase {} instance {instance} key {key} served {v} (read {begun}..{ended} µs)",
                                phases[p].name
                            ));
                            continue;
                        }
                    },
                };
                let acks = acked.get(key.as_str()).map_or(&[][..], Vec::as_slice);
                let before = acks.partition_point(|(_, ack)| *ack < *begun);
                // The first acknowledged write after the served value's (after none, for
                // no value): a maybe value supersedes nothing.
                let first_newer = served.map_or(0, |i| acks.partition_point(|(pos, _)| *pos <= i));
                if first_newer < before {
                    let (sup_pos, sup_ack) = acks[first_newer];
                    let window = ended.saturating_sub(sup_ack);
                    let row = &mut rows[p];
                    row.stale += 1;
                    row.windows.push(window);
                    if window > bound {
                        row.beyond += 1;
                        row.last_beyond = row.last_beyond.max(*begun);
                    }
                    let ws = &attempts[key.as_str()];
                    stale.push(Stale {
                        instance: *instance,
                        phase: p,
                        phase_name: phases[p].name,
                        key: key.clone(),
                        served: value.clone(),
                        begun: *begun,
                        ended: *ended,
                        superseded_by: ws[sup_pos].0.to_owned(),
                        superseded_ack: sup_ack,
                        latest: ws[acks[before - 1].0].0.to_owned(),
                        window,
                    });
                }
            }
            Line::ReadError { begun, .. } if *begun <= end => {
                let row = &mut rows[phases.of(*begun)];
                row.reads += 1;
                row.read_errors += 1;
            }
            _ => {}
        }
    }
    for row in &mut rows {
        row.windows.sort_unstable();
    }
    Checked { rows, stale, unknown }
}

/// A column of [`print_table`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// [`Row::reads`].
    Reads,
    /// [`Row::stale`].
    Stale,
    /// [`Row::beyond`], headed by the bound.
    Beyond,
    /// [`Row::read_errors`].
    ReadErrors,
    /// [`Row::maybe`].
    Maybe,
    /// The median window (ms).
    P50,
    /// The 99th percentile window (ms).
    P99,
    /// The longest window (ms).
    Max,
    /// [`Row::writes`].
    Writes,
    /// [`Row::write_errors`].
    WriteErrors,
}

/// The value at `p` (0 to 1) of the sorted `sorted`, in ms; `-` for none.
fn pct(sorted: &[u64], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    #[allow(clippy::cast_precision_loss)]
    let ms = sorted[i] as f64 / 1000.0;
    format!("{ms:.1}")
}

/// Prints one row per phase with `columns` (stale beyond `bound`, µs, for
/// [`Column::Beyond`]), then `extra` (a header, and a cell per phase index) if any.
pub fn print_table(
    phases: &Phases,
    rows: &[Row],
    bound: u64,
    columns: &[Column],
    extra: Option<(&str, &dyn Fn(usize) -> String)>,
) {
    let header = |c: Column| match c {
        Column::Reads => "reads".to_owned(),
        Column::Stale => "stale".to_owned(),
        Column::Beyond => format!(">{}ms", bound / 1000),
        Column::ReadErrors => "r.errs".to_owned(),
        Column::Maybe => "maybe".to_owned(),
        Column::P50 => "win p50 ms".to_owned(),
        Column::P99 => "win p99 ms".to_owned(),
        Column::Max => "win max ms".to_owned(),
        Column::Writes => "writes".to_owned(),
        Column::WriteErrors => "w.errs".to_owned(),
    };
    let width = phases.iter().map(|p| p.name.len()).max().unwrap_or(0).max(5);
    let mut line = format!("{:<width$}", "phase");
    for c in columns {
        line += &format!(" {:>7}", header(*c));
    }
    if let Some((head, _)) = extra {
        line += &format!("  {head}");
    }
    println!("{line}");
    for (p, (phase, row)) in phases.iter().zip(rows).enumerate() {
        let mut line = format!("{:<width$}", phase.name);
        for c in columns {
            let cell = match c {
                Column::Reads => row.reads.to_string(),
                Column::Stale => row.stale.to_string(),
                Column::Beyond => row.beyond.to_string(),
                Column::ReadErrors => row.read_errors.to_string(),
                Column::Maybe => row.maybe.to_string(),
                Column::P50 => pct(&row.windows, 0.5),
                Column::P99 => pct(&row.windows, 0.99),
                Column::Max => pct(&row.windows, 1.0),
                Column::Writes => row.writes.to_string(),
                Column::WriteErrors => row.write_errors.to_string(),
            };
            line += &format!(" {:>w$}", cell, w = header(*c).len().max(7));
        }
        if let Some((_, cell)) = extra {
            line += &format!("  {}", cell(p));
        }
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_classifies_stale_maybe_and_unknown_reads() {
        let phases = Phases(vec![Phase {
            name: "1 steady",
            start: 0,
            checked: true,
        }]);
        let events: Vec<(usize, Line)> = [
            "W k 0:1 0 100",
            "W k 0:2 150 200",
            "WE k 0:3 250 300 timed out",
            "W k 0:4 350 400",
            // 0:2 was acknowledged at 200: stale for 110 µs, beyond the bound of 50.
            "R k 0:1 300 310",
            // Stale for 20 µs: within the bound.
            "R k 0:1 210 220",
            // A failed write's value, read before 0:4 was acknowledged: not stale.
            "R k 0:3 350 360",
            // No write carried it.
            "R k x:9 360 370",
            "R k 0:4 500 510",
            "RE k 600 700 down",
        ]
        .iter()
        .map(|l| (1, Line::parse(l)))
        .collect();
        let checked = check(&events, &phases, u64::MAX, 50);
        let row = &checked.rows[0];
        assert_eq!(row.reads, 6);
        assert_eq!((row.stale, row.beyond, row.last_beyond), (2, 1, 300));
        assert_eq!(row.windows, [20, 110]);
        assert_eq!((row.maybe, row.read_errors), (1, 1));
        assert_eq!((row.writes, row.write_errors), (4, 1));
        assert_eq!(checked.unknown.len(), 1);
        let stale = &checked.stale[0];
        assert_eq!(
            (
                stale.superseded_by.as_str(),
                stale.superseded_ack,
                stale.latest.as_str()
            ),
            ("0:2", 200, "0:2")
        );
        assert_eq!(stale.window, 110);
    }

    #[test]
    fn reads_after_the_end_are_not_checked() {
        let phases = Phases(vec![Phase {
            name: "1",
            start: 0,
            checked: true,
        }]);
        let events = vec![(0, Line::parse("W k a 0 10")), (0, Line::parse("R k - 20 30"))];
        assert_eq!(check(&events, &phases, 30, 0).rows[0].stale, 1);
        assert_eq!(check(&events, &phases, 10, 0).rows[0].reads, 0);
    }
}
