//! Event-driven discovery on real programs: the Go net/http server whose handler hangs
//! (default 15 s TCP keepalive), in a network namespace of the test's own, with the daemon
//! in `discovery: events` and the command line reading its pinned entry times.
//!
//! True ages are taken with `Instant` around each client's close() (the server's socket
//! enters CLOSE_WAIT in between, plus the loopback's delivery) and around each `scan`.
//! An `event` age must lie within [`EXACT_MS`] of that true age; any other source is a
//! range, which must hold it. Every daemon gets a private BPF filesystem from the testkit
//! ([`PrivateBpf`]); the command lines that read its pins get the same `CWREAP_BPF_DIR`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::metrics::{free_addr, sample, scrape};
use crate::support::runtimes;
use crate::support::*;

/// The bound on an exact age: within a second of the true close.
const EXACT_MS: i64 = 1_000;
/// Rounding of tcp_info's millisecond ages (jiffies) in the ranges of the other sources.
const SLACK_MS: i64 = 50;
/// Guard of every wait: only against hangs.
const GUARD: Duration = Duration::from_secs(60);
/// Go's default TCP keepalive on accepted connections (idle time and probe interval).
const GO_KEEPALIVE_MS: i64 = 15_000;

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).expect("milliseconds fit i64")
}

fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Whether this kernel cannot run the BPF programs at all (too old for socket cookies in
/// BTF tracepoints, or no BTF): then the test says so and ends, also under CI, where a
/// missing kernel feature is a stated reason to skip, not a failure.
fn kernel_lacks_bpf(test: &str) -> bool {
    use cwreap_linux::bpf::{KERNEL_BTF, MIN_KERNEL, parse_release};
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let why = match parse_release(&release) {
        Some(v) if v < MIN_KERNEL => Some(format!(
            "kernel {} predates Linux {}.{}, which BPF socket events need",
            release.trim(),
            MIN_KERNEL.0,
            MIN_KERNEL.1
        )),
        _ if !Path::new(KERNEL_BTF).exists() => Some(format!(
            "no kernel BTF at {KERNEL_BTF} (CONFIG_DEBUG_INFO_BTF)"
        )),
        _ => None,
    };
    match why {
        Some(why) => {
            note(&format!("SKIP {test}: {why}"));
            true
        }
        None => false,
    }
}

// ---------------------------------------------------------------------------------------
// The Go server and its leaks.

/// hang_http.go in a network namespace of its own.
struct GoServer {
    srv: LineChild,
    addr: SocketAddr,
    ns: Netns,
}

/// One connection the server leaked, and when its client closed (or half-closed).
struct Leak {
    fd: i32,
    inode: u64,
    /// The client, kept open when it only half-closed (to read EOF later).
    client: Option<TcpStream>,
    closing: Instant,
    closed: Instant,
}

impl Leak {
    /// The true age at a read made between `before` and `after`: (at least, at most), ms.
    fn true_age(&self, before: Instant, after: Instant) -> (i64, i64) {
        (
            ms(before.saturating_duration_since(self.closed)),
            ms(after.saturating_duration_since(self.closing)),
        )
    }
}

impl GoServer {
    fn start(test: &str, tag: &str) -> Option<GoServer> {
        if kernel_lacks_bpf(test) {
            return None;
        }
        let exe = runtimes::go_program(test, "hang_http.go")?;
        let ns = Netns::create(tag);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name]).arg(&exe);
        let mut srv = LineChild::spawn("hang-http", &mut cmd).expect("start hang-http");
        let addr: SocketAddr = srv
            .expect("listen ", GUARD)
            .unwrap_or_else(|e| panic!("{e}"))
            .parse()
            .expect("listen address");
        srv.expect("ready", GUARD).unwrap_or_else(|e| panic!("{e}"));
        Some(GoServer { srv, addr, ns })
    }

    fn pid(&self) -> i32 {
        self.srv.pid()
    }

    /// A client sends a request (the handler hangs on it), then closes for good, or only
    /// half-closes (`keep`): the server's socket enters CLOSE_WAIT.
    fn leak(&mut self, i: usize, keep: bool) -> Leak {
        let addr = self.addr;
        let mut c = self
            .ns
            .run(move || TcpStream::connect_timeout(&addr, GUARD).expect("connect to the server"));
        let me = c.local_addr().expect("client address");
        c.write_all(format!("GET /hang/{i} HTTP/1.1\r\nHost: cwreap\r\n\r\n").as_bytes())
            .expect("send the request");
        let fd = loop {
            let rest = self
                .srv
                .expect("request ", GUARD)
                .unwrap_or_else(|e| panic!("{e}"));
            let w: Vec<&str> = rest.split_whitespace().collect();
            if w.get(2).and_then(|r| r.parse::<SocketAddr>().ok()) == Some(me) {
                break w[0].parse::<i32>().expect("fd of the request");
            }
        };
        let inode = fd_inode(self.pid(), fd).expect("the server's fd is a socket");
        let closing = Instant::now();
        let client = if keep {
            c.shutdown(Shutdown::Write).expect("half-close");
            Some(c)
        } else {
            drop(c);
            None
        };
        let closed = Instant::now();
        Leak {
            fd,
            inode,
            client,
            closing,
            closed,
        }
    }

    /// The server's CLOSE_WAIT fds by `ss` in its namespace.
    fn ss_close_wait(&self) -> BTreeSet<i32> {
        self.ns
            .ss_close_wait(self.pid())
            .into_iter()
            .map(|(fd, _, _)| fd)
            .collect()
    }

    /// Wait until `ss` lists exactly `fds` in CLOSE_WAIT.
    fn wait_close_wait(&self, fds: &BTreeSet<i32>) {
        wait_until(
            "the leaked sockets in CLOSE_WAIT (ss)",
            || self.srv.transcript(),
            || (self.ss_close_wait() == *fds).then_some(()),
        );
    }
}

// ---------------------------------------------------------------------------------------
// The daemon and the command line beside it.

/// A policy on the server's pid; `extra` adds top-level keys (discovery, dry_run, ...).
fn policy(pid: i32, metrics: SocketAddr, extra: &str, older_than: &str) -> String {
    format!(
        "interval: 500ms\nlog_format: json\nmetrics: {{listen: \"{metrics}\"}}\n{extra}\
         targets:\n  - name: go\n    match: {{pid: {pid}}}\n    older_than: {older_than}\n    \
         action: shutdown\n"
    )
}

/// `cwreap run` on `yaml`, its published first sights in `{dir}/run`, its pins in the
/// testkit's private BPF filesystem.
fn daemon(name: &str, yaml: &str) -> LoggedDaemon {
    LoggedDaemon::start_with(name, yaml, |dir, cmd| {
        cmd.env("CWREAP_RUN_DIR", dir.join("run"));
    })
}

/// The pin directory the daemon was given.
fn pins_of(d: &LoggedDaemon) -> std::path::PathBuf {
    let bpf = d
        .daemon
        .bpf()
        .expect("the testkit gave the daemon a private bpffs");
    assert!(
        bpf.mounted(),
        "the private bpffs is not mounted (not root?)"
    );
    bpf.pins()
}

/// The daemon's JSON line saying which discovery runs (the first one).
fn discovery_line(d: &mut LoggedDaemon) -> Value {
    d.wait_for("the discovery line", |d| {
        d.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| {
                v["fields"]["message"]
                    .as_str()
                    .or(v["message"].as_str())
                    .is_some_and(|m| m.starts_with("discovery:"))
            })
    })
}

/// A field of a JSON log line, flattened or under "fields".
fn log_field<'a>(v: &'a Value, key: &str) -> &'a Value {
    if v[key].is_null() {
        &v["fields"][key]
    } else {
        &v[key]
    }
}

/// Wait until the daemon finished `n` cycles (its metrics say so).
fn wait_cycles(d: &mut LoggedDaemon, addr: SocketAddr, n: f64) -> String {
    d.wait_for("cycles in the metrics", |_| {
        let text = scrape(addr)?;
        (sample(&text, "cwreap_cycle_duration_seconds_count")? >= n).then_some(text)
    })
}

/// `cwreap ARGS` with the daemon's pins (`pins`) and published first sights (`run`).
fn cli(pins: &Path, run: &Path, args: &[&str]) -> Output {
    Command::new(cwreap_bin())
        .args(args)
        .env("CWREAP_BPF_DIR", pins)
        .env("CWREAP_RUN_DIR", run)
        .output()
        .expect("run cwreap")
}

/// The `--json` rows of `pid` by fd; the command must exit 0.
fn rows(pins: &Path, run: &Path, args: &[&str], pid: i32) -> (BTreeMap<i32, Value>, String) {
    let out = cli(pins, run, args);
    let by_fd = json_of_success(&out, args)
        .into_iter()
        .filter(|r| r["pid"].as_i64() == Some(i64::from(pid)))
        .map(|r| (i32::try_from(field_i64(&r, "fd")).expect("fd"), r))
        .collect();
    (by_fd, stderr(&out))
}

/// What one scan said of one leaked socket, beside its true age.
#[derive(Debug, Clone)]
struct Sample {
    true_min: i64,
    true_max: i64,
    age_ms: i64,
    age_max_ms: Option<i64>,
    source: String,
}

impl Sample {
    fn of(l: &Leak, r: &Value, before: Instant, after: Instant) -> Sample {
        assert_eq!(
            u64::try_from(field_i64(r, "inode")).ok(),
            Some(l.inode),
            "{r}"
        );
        let (true_min, true_max) = l.true_age(before, after);
        Sample {
            true_min,
            true_max,
            age_ms: field_i64(r, "age_ms"),
            age_max_ms: r["age_max_ms"].as_i64(),
            source: field_str(r, "age_source").to_owned(),
        }
    }

    /// An `event` age within [`EXACT_MS`] of the true one.
    fn assert_exact(&self, fd: i32) {
        assert_eq!(self.source, "event", "fd {fd}: {self:?}");
        assert!(
            self.age_ms >= self.true_min - EXACT_MS && self.age_ms <= self.true_max + EXACT_MS,
            "fd {fd}: the exact age is more than {EXACT_MS} ms off the true close: {self:?}"
        );
    }

    /// A range that holds the true age, from a source other than `event`.
    fn assert_honest(&self, fd: i32) {
        assert!(
            matches!(self.source.as_str(), "first_seen" | "last_ack"),
            "fd {fd}: a socket that entered CLOSE_WAIT unseen has no exact age: {self:?}"
        );
        assert!(
            self.age_ms <= self.true_max + SLACK_MS,
            "fd {fd}: the lower bound is above the true age: {self:?}"
        );
        if let Some(max) = self.age_max_ms {
            assert!(
                max >= self.true_min - SLACK_MS,
                "fd {fd}: the upper bound is below the true age: {self:?}"
            );
        }
    }

    /// How far the reported age is from the middle of the true one, ms.
    fn off_by(&self) -> i64 {
        self.age_ms - (self.true_min + self.true_max) / 2
    }
}

/// Scan `pid` (reading the pins) and sample every leak; every leak must be listed.
fn scan_leaks(
    pins: &Path,
    run: &Path,
    pid: i32,
    leaks: &[Leak],
    extra: &[&str],
) -> (BTreeMap<i32, Sample>, BTreeMap<i32, Value>, String) {
    let pid_s = pid.to_string();
    let mut args = vec!["scan", "--pid", &pid_s, "--json"];
    args.extend_from_slice(extra);
    let before = Instant::now();
    let (rows, err) = rows(pins, run, &args, pid);
    let after = Instant::now();
    let samples = leaks
        .iter()
        .map(|l| {
            let r = rows
                .get(&l.fd)
                .unwrap_or_else(|| panic!("scan lost fd {}: {rows:?}\n{err}", l.fd));
            (l.fd, Sample::of(l, r, before, after))
        })
        .collect();
    (samples, rows, err)
}

// ---------------------------------------------------------------------------------------
// 1. Daemon first, then the leaks: exact ages, through the keepalive probes.

#[test]
#[ignore = "needs root: creates a network namespace, loads BPF programs (CAP_BPF, CAP_PERFMON), mounts a private bpffs, and duplicates the server's sockets (CAP_SYS_PTRACE)"]
fn events_give_exact_ages_through_keepalive_and_reap_selects_on_them() {
    let test = "events_give_exact_ages_through_keepalive_and_reap_selects_on_them";
    const LEAKS: usize = 4;
    let Some(mut go) = GoServer::start(test, "ev-exact") else {
        return;
    };
    let pid = go.pid();
    let addr = free_addr();
    let mut d = daemon(
        "ev-exact",
        &policy(pid, addr, "dry_run: true\ndiscovery: events\n", "1h"),
    );
    let line = discovery_line(&mut d);
    assert_eq!(log_field(&line, "mode"), "events", "{line}\n{}", d.log());
    let pins = pins_of(&d);
    assert_eq!(
        log_field(&line, "pins").as_str(),
        pins.to_str(),
        "the daemon pins where the test said: {line}"
    );
    wait_cycles(&mut d, addr, 1.0);
    let run = d.dir.join("run");
    let empty = Scratch::new("ev-exact-empty", 0o755);

    // Two seconds apart, so that a threshold between two of them is a second from each.
    let mut leaks = Vec::new();
    for i in 0..LEAKS {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(2));
        }
        leaks.push(go.leak(i, false));
    }
    let fds: BTreeSet<i32> = leaks.iter().map(|l| l.fd).collect();
    go.wait_close_wait(&fds);

    let (first, rows_now, _) = scan_leaks(&pins, &run, pid, &leaks, &[]);
    assert_eq!(
        rows_now.keys().copied().collect::<BTreeSet<_>>(),
        go.ss_close_wait(),
        "scan and ss list the same CLOSE_WAIT sockets"
    );
    for (fd, s) in &first {
        s.assert_exact(*fd);
        note(&format!(
            "{test}: fd {fd} at once: {s:?} (off by {} ms)",
            s.off_by()
        ));
    }

    // The hazard: once a keepalive probe is answered (the client's orphaned FIN_WAIT2
    // end ACKs it), last_ack says the socket is fresh. The event age stays exact.
    let deadline = Instant::now() + GUARD;
    let (after_probe, last_ack) = loop {
        assert!(
            Instant::now() < deadline,
            "no keepalive probe reset last_ack within {GUARD:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
        let (bare, _, _) = scan_leaks(&empty.0, &empty.0, pid, &leaks, &["--no-bpf"]);
        let reset = bare.values().all(|s| {
            s.source == "last_ack" && s.true_min > GO_KEEPALIVE_MS && s.age_ms + 5_000 < s.true_min
        });
        let (exact, _, _) = scan_leaks(&pins, &run, pid, &leaks, &[]);
        for (fd, s) in &exact {
            s.assert_exact(*fd);
        }
        if reset {
            break (exact, bare);
        }
    };
    for (fd, s) in &after_probe {
        note(&format!(
            "{test}: fd {fd} after the first probe: {s:?} (off by {} ms); last_ack alone: {:?}",
            s.off_by(),
            last_ack[fd]
        ));
    }

    // reap --older-than between the second and the third oldest: exactly the two older.
    let mut by_age: Vec<(i64, i32)> = after_probe.iter().map(|(fd, s)| (s.age_ms, *fd)).collect();
    by_age.sort_unstable_by(|a, b| b.cmp(a));
    let scanned = Instant::now();
    let cut = (by_age[1].0 + by_age[2].0) / 2;
    let want: BTreeSet<i32> = by_age[..2].iter().map(|(_, fd)| *fd).collect();
    let threshold = format!("{}ms", cut + ms(scanned.elapsed()));
    let pid_s = pid.to_string();
    let (reaped, err) = rows(
        &pins,
        &run,
        &[
            "reap",
            "--pid",
            &pid_s,
            "--older-than",
            &threshold,
            "--dry-run",
            "--json",
        ],
        pid,
    );
    note(&format!(
        "{test}: reap --older-than {threshold} --dry-run: fds {:?} of ages {by_age:?}",
        reaped.keys().collect::<Vec<_>>()
    ));
    assert_eq!(
        reaped.keys().copied().collect::<BTreeSet<_>>(),
        want,
        "reap --older-than {threshold} on ages {by_age:?}:\n{reaped:?}\n{err}"
    );
    for r in reaped.values() {
        assert_eq!(field_str(r, "outcome"), "dry_run", "{r}");
    }
    assert_eq!(go.ss_close_wait(), fds, "a dry run leaves every socket");
    d.daemon.stop();
}

// ---------------------------------------------------------------------------------------
// 2. The leak first, then the daemon: honest ranges for what it did not see.

#[test]
#[ignore = "needs root: creates a network namespace, loads BPF programs (CAP_BPF, CAP_PERFMON), mounts a private bpffs, and duplicates the server's sockets (CAP_SYS_PTRACE)"]
fn daemon_started_after_the_leak_gives_ranges_for_old_sockets_and_exact_ages_for_new() {
    let test = "daemon_started_after_the_leak_gives_ranges_for_old_sockets_and_exact_ages_for_new";
    let Some(mut go) = GoServer::start(test, "ev-after") else {
        return;
    };
    let pid = go.pid();
    let old: Vec<Leak> = (0..2).map(|i| go.leak(i, false)).collect();
    go.wait_close_wait(&old.iter().map(|l| l.fd).collect());
    std::thread::sleep(Duration::from_secs(1));

    let addr = free_addr();
    let mut d = daemon(
        "ev-after",
        &policy(pid, addr, "dry_run: true\ndiscovery: events\n", "1h"),
    );
    let line = discovery_line(&mut d);
    assert_eq!(log_field(&line, "mode"), "events", "{line}");
    let metrics = wait_cycles(&mut d, addr, 2.0);
    assert_eq!(
        sample(&metrics, "cwreap_discovery_mode{mode=\"events\"}"),
        Some(1.0),
        "{metrics}"
    );
    let pins = pins_of(&d);
    let run = d.dir.join("run");

    let new: Vec<Leak> = (2..4).map(|i| go.leak(i, false)).collect();
    let all: BTreeSet<i32> = old.iter().chain(&new).map(|l| l.fd).collect();
    go.wait_close_wait(&all);
    wait_cycles(&mut d, addr, 4.0);

    let (old_s, rows_now, err) = scan_leaks(&pins, &run, pid, &old, &[]);
    let (new_s, _, _) = scan_leaks(&pins, &run, pid, &new, &[]);
    assert_eq!(
        rows_now.keys().copied().collect::<BTreeSet<_>>(),
        go.ss_close_wait(),
        "scan and ss list the same CLOSE_WAIT sockets"
    );
    assert!(!err.contains("not used"), "the pins are read: {err}");
    for (fd, s) in &old_s {
        s.assert_honest(*fd);
        note(&format!("{test}: fd {fd} leaked before the daemon: {s:?}"));
    }
    for (fd, s) in &new_s {
        s.assert_exact(*fd);
        note(&format!(
            "{test}: fd {fd} leaked after it: {s:?} (off by {} ms)",
            s.off_by()
        ));
    }
    d.daemon.stop();
}

// ---------------------------------------------------------------------------------------
// 3. A SIGKILLed daemon: its pins stay, its ages are not read.

#[test]
#[ignore = "needs root: creates a network namespace, loads BPF programs (CAP_BPF, CAP_PERFMON), mounts a private bpffs, and duplicates the server's sockets (CAP_SYS_PTRACE)"]
fn a_sigkilled_daemons_frozen_pins_never_pass_for_exact_ages() {
    let test = "a_sigkilled_daemons_frozen_pins_never_pass_for_exact_ages";
    let Some(mut go) = GoServer::start(test, "ev-killed") else {
        return;
    };
    let pid = go.pid();
    let addr = free_addr();
    let mut d = daemon(
        "ev-killed",
        &policy(pid, addr, "dry_run: true\ndiscovery: events\n", "1h"),
    );
    discovery_line(&mut d);
    wait_cycles(&mut d, addr, 1.0);
    let pins = pins_of(&d);
    let run = d.dir.join("run");
    let leaks: Vec<Leak> = (0..2).map(|i| go.leak(i, false)).collect();
    go.wait_close_wait(&leaks.iter().map(|l| l.fd).collect());
    let (alive, _, _) = scan_leaks(&pins, &run, pid, &leaks, &[]);
    for (fd, s) in &alive {
        s.assert_exact(*fd);
    }

    let dpid = d.pid();
    d.daemon.kill();
    for pin in ["daemon", "entered"] {
        assert!(
            pins.join(pin).exists(),
            "the pin {pin} outlives a SIGKILLed daemon"
        );
    }
    let (dead, rows_now, err) = scan_leaks(&pins, &run, pid, &leaks, &[]);
    assert_eq!(
        rows_now.keys().copied().collect::<BTreeSet<_>>(),
        go.ss_close_wait(),
        "every socket still found"
    );
    for (fd, s) in &dead {
        s.assert_honest(*fd);
        note(&format!("{test}: fd {fd} after the SIGKILL: {s:?}"));
    }
    assert!(
        err.contains(&format!("pid {dpid}")) && err.contains("not running"),
        "the command line says why it ignores the pins: {err}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Every feature forced into its fallback.

#[test]
#[ignore = "needs root: creates a network namespace, loads BPF programs (CAP_BPF, CAP_PERFMON), mounts a private bpffs, and duplicates the server's sockets (CAP_SYS_PTRACE)"]
fn discovery_poll_and_no_bpf_fall_back_and_still_find_every_socket() {
    let test = "discovery_poll_and_no_bpf_fall_back_and_still_find_every_socket";
    let Some(mut go) = GoServer::start(test, "ev-poll") else {
        return;
    };
    let pid = go.pid();

    // `discovery: poll`: no programs, no pins, the mode says so.
    let addr = free_addr();
    let mut d = daemon(
        "ev-poll",
        &policy(pid, addr, "dry_run: true\ndiscovery: poll\n", "1h"),
    );
    let line = discovery_line(&mut d);
    assert_eq!(log_field(&line, "mode"), "poll", "{line}");
    let leaks: Vec<Leak> = (0..2).map(|i| go.leak(i, false)).collect();
    let fds: BTreeSet<i32> = leaks.iter().map(|l| l.fd).collect();
    go.wait_close_wait(&fds);
    let metrics = wait_cycles(&mut d, addr, 3.0);
    assert_eq!(
        sample(&metrics, "cwreap_discovery_mode{mode=\"poll\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "cwreap_discovery_mode{mode=\"events\"}"),
        None,
        "{metrics}"
    );
    let pins = pins_of(&d);
    assert!(!pins.exists(), "a polling daemon pins nothing");
    let run = d.dir.join("run");
    let (polled, rows_now, _) = scan_leaks(&pins, &run, pid, &leaks, &[]);
    assert_eq!(rows_now.keys().copied().collect::<BTreeSet<_>>(), fds);
    for (fd, s) in &polled {
        s.assert_honest(*fd);
        note(&format!("{test}: fd {fd} with a polling daemon: {s:?}"));
    }
    d.daemon.stop();
    drop(d);

    // `--no-bpf` beside a daemon in events mode: the same sockets, no exact age.
    let addr = free_addr();
    let mut d = daemon(
        "ev-nobpf",
        &policy(pid, addr, "dry_run: true\ndiscovery: events\n", "1h"),
    );
    discovery_line(&mut d);
    wait_cycles(&mut d, addr, 1.0);
    let pins = pins_of(&d);
    let run = d.dir.join("run");
    let more: Vec<Leak> = (2..4).map(|i| go.leak(i, false)).collect();
    let all: BTreeSet<i32> = leaks.iter().chain(&more).map(|l| l.fd).collect();
    go.wait_close_wait(&all);
    let (exact, _, _) = scan_leaks(&pins, &run, pid, &more, &[]);
    for (fd, s) in &exact {
        s.assert_exact(*fd);
    }
    let every: Vec<Leak> = leaks.into_iter().chain(more).collect();
    let (without, rows_now, _) = scan_leaks(&pins, &run, pid, &every, &["--no-bpf"]);
    assert_eq!(
        rows_now.keys().copied().collect::<BTreeSet<_>>(),
        go.ss_close_wait(),
        "--no-bpf finds every socket ss lists"
    );
    assert_eq!(rows_now.len(), 4);
    for (fd, s) in &without {
        s.assert_honest(*fd);
        note(&format!("{test}: fd {fd} with --no-bpf: {s:?}"));
    }
    d.daemon.stop();
}

/// `cwreap run` on `yaml` behind `setpriv SETPRIV_ARGS`, with the environment the testkit
/// gave it (its private bpffs among it); `adjust` may change the wrapped command.
fn run_setpriv(
    name: &str,
    yaml: &str,
    setpriv_args: &[&str],
    adjust: impl FnOnce(&Path, &mut Command),
) -> LoggedDaemon {
    let setpriv_args: Vec<String> = setpriv_args.iter().map(|a| a.to_string()).collect();
    LoggedDaemon::start_with(name, yaml, move |dir, cmd| {
        let run = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let envs: Vec<_> = cmd
            .get_envs()
            .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
            .collect();
        let mut wrapped = Command::new("setpriv");
        wrapped
            .args(&setpriv_args)
            .arg(run)
            .args(args)
            .env("CWREAP_RUN_DIR", dir.join("run"));
        for (k, v) in envs {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        wrapped
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        adjust(dir, &mut wrapped);
        *cmd = wrapped;
    })
}

/// `cwreap run` without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (dropped from its bounding
/// set by setpriv), on `yaml`.
fn run_without_bpf_caps(name: &str, yaml: &str) -> LoggedDaemon {
    run_setpriv(
        name,
        yaml,
        &[
            "--bounding-set=-bpf,-perfmon,-sys_admin",
            "--inh-caps=-bpf,-perfmon,-sys_admin",
        ],
        |_, _| {},
    )
}

/// One line says why BPF is not used (its reason containing each of `why`), nothing
/// repeats it, no error: over `cycles` cycles.
fn said_once(d: &mut LoggedDaemon, addr: SocketAddr, cycles: f64, why: &[&str]) -> Value {
    let line = discovery_line(d);
    assert_eq!(log_field(&line, "mode"), "poll", "{line}");
    let reason = log_field(&line, "reason")
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        why.iter().all(|w| reason.contains(w)),
        "the fallback names its reason ({why:?}): {line}"
    );
    let metrics = wait_cycles(d, addr, cycles);
    assert_eq!(
        sample(&metrics, "cwreap_discovery_mode{mode=\"poll\"}"),
        Some(1.0),
        "{metrics}"
    );
    let lines = d.lines();
    let about_bpf: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("BPF") || l.contains("bpf"))
        .collect();
    assert_eq!(about_bpf.len(), 1, "{about_bpf:#?}");
    let errors: Vec<&String> = lines.iter().filter(|l| l.contains("\"ERROR\"")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    line
}

#[test]
#[ignore = "needs root: drops CAP_BPF and CAP_PERFMON from a root daemon with setpriv, and mounts a private bpffs"]
fn without_cap_bpf_events_refuses_to_start_and_auto_polls_saying_why_once() {
    let test = "without_cap_bpf_events_refuses_to_start_and_auto_polls_saying_why_once";
    if kernel_lacks_bpf(test) {
        return;
    }
    // A target of our own, in our namespace: nothing needs CAP_SYS_ADMIN.
    let pid = std::process::id();
    let addr = free_addr();
    let mut d = run_without_bpf_caps(
        "ev-nocap-events",
        &policy(pid as i32, addr, "dry_run: true\ndiscovery: events\n", "1h"),
    );
    let status = d
        .daemon
        .wait_exit(GUARD)
        .unwrap_or_else(|| panic!("`discovery: events` ran without CAP_BPF\n{}", d.log()));
    assert_eq!(status.code(), Some(2), "{}", d.log());
    let log = d.lines().join("\n");
    assert!(
        log.contains("`discovery: events`, but the BPF programs cannot be loaded")
            && log.contains("CAP_BPF")
            && log.contains("CAP_PERFMON"),
        "the refusal names the missing capabilities:\n{log}"
    );
    drop(d);

    let addr = free_addr();
    let mut d = run_without_bpf_caps(
        "ev-nocap-auto",
        &policy(pid as i32, addr, "dry_run: true\ndiscovery: auto\n", "1h"),
    );
    let line = said_once(&mut d, addr, 5.0, &["CAP_BPF", "CAP_PERFMON"]);
    note(&format!("{test}: {line}"));
    d.daemon.stop();
}

/// The default unit's privileges: a user of its own with CAP_SYS_PTRACE and
/// CAP_DAC_READ_SEARCH only (ambient), bpf() denied by a seccomp filter with EPERM (the
/// unit's `SystemCallFilter=~@privileged`, `SystemCallErrorNumber=EPERM`), started by the
/// service manager (INVOCATION_ID).
#[cfg(target_arch = "x86_64")]
#[test]
#[ignore = "needs root: runs the daemon as uid 4242 with two capabilities (setpriv) under a seccomp filter that denies bpf()"]
fn under_the_default_units_privileges_auto_polls_saying_why_once() {
    const UID: u32 = 4242;
    let test = "under_the_default_units_privileges_auto_polls_saying_why_once";
    if kernel_lacks_bpf(test) {
        return;
    }
    let addr = free_addr();
    let caps = "-all,+sys_ptrace,+dac_read_search";
    let mut d = run_setpriv(
        "ev-default-unit",
        &policy(
            std::process::id() as i32,
            addr,
            "dry_run: true\ndiscovery: auto\n",
            "1h",
        ),
        &[
            &format!("--reuid={UID}"),
            &format!("--regid={UID}"),
            "--clear-groups",
            &format!("--inh-caps={caps}"),
            &format!("--ambient-caps={caps}"),
            &format!("--bounding-set={caps}"),
        ],
        |dir, cmd| {
            // Its published first sights go to a directory it may write, as with any
            // working RuntimeDirectory; only BPF is missing.
            let run = dir.join("run");
            std::fs::create_dir_all(&run).expect("mkdir run");
            std::os::unix::fs::chown(&run, Some(UID), Some(UID)).expect("chown run");
            cmd.env("INVOCATION_ID", "0123456789abcdef0123456789abcdef");
            cwreap_linux::testing::filter_syscall(
                cmd,
                libc::SYS_bpf,
                libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            );
        },
    );
    let line = said_once(&mut d, addr, 5.0, &["CAP_BPF", "CAP_PERFMON"]);
    note(&format!("{test}: {line}"));
    d.daemon.stop();
}

/// Root, every capability, but bpf() denied by a seccomp filter (a container runtime's
/// default profile): the reason names the filter.
#[cfg(target_arch = "x86_64")]
#[test]
#[ignore = "needs root: loads BPF programs under a seccomp filter that denies bpf(), and mounts a private bpffs"]
fn a_seccomp_filter_on_bpf_is_the_reason_auto_polls() {
    let test = "a_seccomp_filter_on_bpf_is_the_reason_auto_polls";
    if kernel_lacks_bpf(test) {
        return;
    }
    let addr = free_addr();
    let mut d = LoggedDaemon::start_with(
        "ev-seccomp",
        &policy(
            std::process::id() as i32,
            addr,
            "dry_run: true\ndiscovery: auto\n",
            "1h",
        ),
        |dir, cmd| {
            cmd.env("CWREAP_RUN_DIR", dir.join("run"));
            cwreap_linux::testing::filter_syscall(
                cmd,
                libc::SYS_bpf,
                libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            );
        },
    );
    let line = said_once(&mut d, addr, 3.0, &["seccomp"]);
    note(&format!("{test}: {line}"));
    d.daemon.stop();
}

/// `cwreap run` (`discovery: events`, target `pid`) as uid [`DROP_IN_UID`] with the
/// capabilities of the unit with events.conf, started by the service manager; its pin
/// directory made for it first (`install -d`, as the drop-in's ExecStartPre) when
/// `pin_dir`.
fn as_drop_in_user(name: &str, pid: i32, addr: SocketAddr, pin_dir: bool) -> LoggedDaemon {
    const UID: u32 = DROP_IN_UID;
    let caps = "-all,+sys_ptrace,+dac_read_search,+bpf,+perfmon";
    run_setpriv(
        name,
        &policy(pid, addr, "dry_run: true\ndiscovery: events\n", "1h"),
        &[
            &format!("--reuid={UID}"),
            &format!("--regid={UID}"),
            "--clear-groups",
            &format!("--inh-caps={caps}"),
            &format!("--ambient-caps={caps}"),
            &format!("--bounding-set={caps}"),
        ],
        |dir, cmd| {
            let run = dir.join("run");
            std::fs::create_dir_all(&run).expect("mkdir run");
            std::os::unix::fs::chown(&run, Some(UID), Some(UID)).expect("chown run");
            let pins = cmd
                .get_envs()
                .find(|(k, _)| *k == "CWREAP_BPF_DIR")
                .and_then(|(_, v)| v)
                .map(std::path::PathBuf::from)
                .expect("the testkit's CWREAP_BPF_DIR");
            if pin_dir {
                let id = UID.to_string();
                run_ok(
                    Command::new("install")
                        .args(["-d", "-m", "0700", "-o", &id, "-g", &id])
                        .arg(&pins),
                );
            }
            cmd.env("INVOCATION_ID", "0123456789abcdef0123456789abcdef");
        },
    )
}

const DROP_IN_UID: u32 = 4242;

/// Without the directory (the drop-in's ExecStartPre failed): the events still run, and the
/// daemon says once why the command line will estimate.
#[test]
#[ignore = "needs root: runs the daemon as uid 4242 with four capabilities (setpriv), loads BPF programs, mounts a private bpffs"]
fn a_pin_directory_the_service_may_not_create_leaves_events_without_pins() {
    let test = "a_pin_directory_the_service_may_not_create_leaves_events_without_pins";
    if kernel_lacks_bpf(test) {
        return;
    }
    let addr = free_addr();
    let mut d = as_drop_in_user("ev-drop-in-nodir", std::process::id() as i32, addr, false);
    let line = discovery_line(&mut d);
    assert_eq!(log_field(&line, "mode"), "events", "{line}\n{}", d.log());
    assert_eq!(log_field(&line, "level"), "WARN", "{line}");
    let reason = log_field(&line, "reason").as_str().unwrap_or_default();
    assert!(
        reason.contains("ermission denied") || reason.contains("not permitted"),
        "{line}"
    );
    let metrics = wait_cycles(&mut d, addr, 3.0);
    assert_eq!(
        sample(&metrics, "cwreap_discovery_mode{mode=\"events\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert!(!pins_of(&d).exists(), "nothing pinned");
    let lines = d.lines();
    let about_bpf: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("BPF") || l.contains("bpf"))
        .collect();
    assert_eq!(about_bpf.len(), 1, "{about_bpf:#?}");
    note(&format!("{test}: {line}"));
    d.daemon.stop();
}

/// The privileges of the unit with events.conf: a user of its own with CAP_SYS_PTRACE,
/// CAP_DAC_READ_SEARCH, CAP_BPF and CAP_PERFMON (ambient), its pin directory made for it
/// as the drop-in's ExecStartPre does (`install -d -m 0700 -o USER`) in a root-only BPF
/// filesystem: the programs load, the entry times are pinned, and `scan` as root reads
/// them.
#[test]
#[ignore = "needs root: runs the daemon as uid 4242 with four capabilities (setpriv), loads BPF programs, mounts a private bpffs"]
fn with_the_events_drop_ins_privileges_a_user_of_its_own_loads_and_pins() {
    const UID: u32 = DROP_IN_UID;
    let test = "with_the_events_drop_ins_privileges_a_user_of_its_own_loads_and_pins";
    if kernel_lacks_bpf(test) {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("address").port();
    let me = std::process::id() as i32;
    let addr = free_addr();
    let mut d = as_drop_in_user("ev-drop-in", me, addr, true);
    let line = discovery_line(&mut d);
    assert_eq!(log_field(&line, "mode"), "events", "{line}\n{}", d.log());
    let pins = pins_of(&d);
    assert_eq!(log_field(&line, "pins").as_str(), pins.to_str(), "{line}");
    wait_cycles(&mut d, addr, 1.0);
    for pin in ["daemon", "entered"] {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(pins.join(pin)).expect("pinned");
        assert_eq!(meta.uid(), UID, "{pin} pinned by the service's user");
    }

    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let leak = Leak {
        fd: std::os::fd::AsRawFd::as_raw_fd(&server),
        inode: fd_inode(me, std::os::fd::AsRawFd::as_raw_fd(&server)).expect("a socket"),
        client: None,
        closing: Instant::now(),
        closed: {
            drop(client);
            Instant::now()
        },
    };
    wait_until(
        "the socket in CLOSE_WAIT (ss)",
        || d.log(),
        || (ss_close_wait_on_port(port) == 1).then_some(()),
    );
    let (samples, _, err) = scan_leaks(
        &pins,
        &d.dir.join("run"),
        me,
        std::slice::from_ref(&leak),
        &["--port", &port.to_string()],
    );
    let s = &samples[&leak.fd];
    s.assert_exact(leak.fd);
    assert!(!err.contains("not used"), "{err}");
    note(&format!("{test}: {line}\n{test}: {s:?}"));
    d.daemon.stop();
    drop(server);
}

// ---------------------------------------------------------------------------------------
// 5. Reaping in events mode, on exact ages.

#[test]
#[ignore = "needs root: creates a network namespace, loads BPF programs (CAP_BPF, CAP_PERFMON), mounts a private bpffs, and shuts the server's sockets down (CAP_SYS_PTRACE)"]
fn events_daemon_reaps_on_exact_age_and_the_peers_read_eof() {
    let test = "events_daemon_reaps_on_exact_age_and_the_peers_read_eof";
    const OLDER_THAN_MS: i64 = 3_000;
    let Some(mut go) = GoServer::start(test, "ev-reap") else {
        return;
    };
    let pid = go.pid();
    let addr = free_addr();
    let mut d = daemon(
        "ev-reap",
        &policy(
            pid,
            addr,
            "dry_run: false\ndiscovery: events\n",
            &format!("{OLDER_THAN_MS}ms"),
        ),
    );
    let line = discovery_line(&mut d);
    assert_eq!(log_field(&line, "mode"), "events", "{line}");
    wait_cycles(&mut d, addr, 1.0);

    // Half-closed clients, a second apart: each stays to read what the server sends.
    let mut leaks = Vec::new();
    for i in 0..2 {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        leaks.push(go.leak(i, true));
    }
    // Each peer reads EOF (the server's shutdown), never before its socket's exact age
    // reached older_than.
    let mut eof_after = BTreeMap::new();
    for l in &mut leaks {
        let c = l.client.as_mut().expect("a half-closed client");
        c.set_read_timeout(Some(GUARD)).expect("read timeout");
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).expect("the peer reads");
        let at = ms(l.closing.elapsed());
        assert_eq!(n, 0, "EOF, not data");
        assert!(
            at >= OLDER_THAN_MS,
            "fd {}: shut down {at} ms after its close, before older_than",
            l.fd
        );
        eof_after.insert(l.fd, at);
    }
    wait_until(
        "no CLOSE_WAIT socket left (ss)",
        || d.log(),
        || go.ss_close_wait().is_empty().then_some(()),
    );
    let actions: Vec<Value> = d.wait_for("an action record per socket", |d| {
        let got: Vec<Value> = d
            .lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| log_field(v, "message") == "close_wait action")
            .filter(|v| log_field(v, "outcome") == "reaped")
            .collect();
        (got.len() >= leaks.len()).then_some(got)
    });
    assert_eq!(actions.len(), leaks.len(), "{}", d.log());
    for a in &actions {
        assert_eq!(log_field(a, "age_source"), "event", "{a}");
        let age = log_field(a, "age_ms").as_i64().expect("age_ms");
        assert!(age >= OLDER_THAN_MS, "{a}");
        let fd = i32::try_from(log_field(a, "fd").as_i64().expect("fd")).expect("fd");
        note(&format!(
            "{test}: fd {fd} reaped at exact age {age} ms; its peer read EOF {} ms after closing",
            eof_after[&fd]
        ));
    }
    d.daemon.stop();
}

// ---------------------------------------------------------------------------------------
// 6. Test daemons keep off the host's BPF filesystem.

#[test]
#[ignore = "needs root: loads BPF programs as root outside systemd, where the daemon would mount bpffs on /sys/fs/bpf for its default pins"]
fn test_daemons_pin_in_a_private_bpffs_and_leave_the_host_alone() {
    // The daemon would mount bpffs on /sys/fs/bpf before it tries the programs, so this
    // holds on any kernel; where the programs load, it also pins, privately.
    let bpf = !kernel_lacks_bpf("test_daemons_pin_in_a_private_bpffs_and_leave_the_host_alone");
    let host_before = HostBpf::now();
    let run_cwreap = Path::new("/run/cwreap").exists();
    let addr = free_addr();
    let mut d = daemon(
        "ev-isolation",
        &policy(
            std::process::id() as i32,
            addr,
            "dry_run: true\ndiscovery: auto\n",
            "1h",
        ),
    );
    let line = discovery_line(&mut d);
    let pins = pins_of(&d);
    assert!(
        !pins.starts_with("/sys/fs/bpf"),
        "private pins: {}",
        pins.display()
    );
    if bpf {
        assert_eq!(log_field(&line, "mode"), "events", "{line}");
        assert_eq!(log_field(&line, "pins").as_str(), pins.to_str(), "{line}");
    }
    wait_cycles(&mut d, addr, 2.0);
    for pin in ["daemon", "entered"] {
        assert_eq!(
            pins.join(pin).exists(),
            bpf,
            "{pin} pinned in the private bpffs"
        );
    }
    assert!(
        !d.lines()
            .iter()
            .any(|l| l.contains("mounted a BPF filesystem")),
        "{}",
        d.log()
    );
    assert_eq!(HostBpf::now(), host_before, "/sys/fs/bpf changed");
    assert_eq!(Path::new("/run/cwreap").exists(), run_cwreap, "/run/cwreap");
    let mount = d
        .daemon
        .bpf()
        .map(|b| b.mount().to_owned())
        .expect("private bpffs");
    d.daemon.stop();
    drop(d);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(mount.to_str().expect("utf-8")),
        "the private bpffs is unmounted after the test: {mounts}"
    );
    assert!(!mount.exists(), "its mount point is removed");
}

// ---------------------------------------------------------------------------------------
// 7. Between cycles, the events are read as they come.

/// With events, a socket entering CLOSE_WAIT is known with its owner between cycles: under
/// an interval of an hour (one cycle at start, the next an hour later), the daemon logs
/// each new socket with the pid and fd that hold it, the inode is the one that fd links to,
/// the detection-latency histogram counts it, and no cycle ran for it.
#[test]
#[ignore = "needs root: loads BPF programs (CAP_BPF, CAP_PERFMON), mounts a private bpffs, and reads the fixture's fds"]
fn between_cycles_each_new_socket_is_known_with_its_owner_without_a_cycle() {
    let test = "between_cycles_each_new_socket_is_known_with_its_owner_without_a_cycle";
    if kernel_lacks_bpf(test) {
        return;
    }
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let pid = fx.pid();
    let addr = free_addr();
    let yaml = format!(
        "interval: 1h\ndry_run: true\ndiscovery: events\nlog_format: json\n\
         metrics: {{listen: \"{addr}\"}}\ntargets:\n  - name: fx\n    match: {{pid: {pid}}}\n    \
         older_than: 1ms\n    action: shutdown\n"
    );
    let mut d = LoggedDaemon::start_with("ev-between", &yaml, |dir, cmd| {
        cmd.env("CWREAP_RUN_DIR", dir.join("run"));
        cmd.env("RUST_LOG", "info,cwreap::daemon::engine::detect=debug");
    });
    wait_cycles(&mut d, addr, 1.0);
    let mut clients = Vec::new();
    for round in 1..=3u32 {
        let (client, fd) = fx.close_wait(0);
        clients.push(client);
        let seen = d.wait_for("the new socket known with its owner", |d| {
            d.lines()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| {
                    log_field(v, "message") == "socket entered CLOSE_WAIT"
                        && log_field(v, "fd").as_i64() == Some(i64::from(fd))
                })
        });
        assert_eq!(
            log_field(&seen, "pid").as_i64(),
            Some(i64::from(pid)),
            "{seen}"
        );
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("readlink");
        assert_eq!(
            link.to_string_lossy(),
            format!(
                "socket:[{}]",
                log_field(&seen, "inode").as_u64().expect("an inode")
            ),
            "{seen}"
        );
        let text = d.wait_for("the detection counted", |_| {
            let text = scrape(addr)?;
            (sample(&text, "cwreap_detection_latency_seconds_count")? >= f64::from(round))
                .then_some(text)
        });
        assert_eq!(
            sample(&text, "cwreap_detection_latency_seconds_count"),
            Some(f64::from(round)),
            "{text}"
        );
        assert_eq!(
            sample(&text, "cwreap_cycle_duration_seconds_count"),
            Some(1.0),
            "found between cycles, not by one: {text}"
        );
        let sum = sample(&text, "cwreap_detection_latency_seconds_sum").expect("a sum");
        note(&format!(
            "round {round}: detection latency so far, mean {:.2} ms over {round}",
            sum * 1000.0 / f64::from(round)
        ));
        assert!(
            !d.lines().iter().any(|l| l.contains("close_wait action")),
            "nothing decided between cycles"
        );
    }
    d.daemon.stop();
}
