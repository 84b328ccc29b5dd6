//! Ages and dead held sockets on real programs: what `scan` says of a socket's time in
//! CLOSE_WAIT, checked against the true time the test measured itself; keepalive probes
//! and heartbeats resetting the last-ACK lower bound (the hazard), and the daemon's
//! published first sight curing it; the sockets a keepalive probe's RST leaves dead in an
//! fd table; and every kind of socket that is no leak left unreported.
//!
//! True ages are taken with `Instant` around the client's close() (the server's socket
//! enters CLOSE_WAIT in between, plus the loopback's delivery) and around each `scan` (it
//! reads tcp_info in between). tcp_info's ages are whole milliseconds of jiffies:
//! [`SLACK_MS`] allows for that rounding, nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::runtimes::{self, PYTHON};
use crate::support::*;

/// Rounding of tcp_info's millisecond ages (jiffies) around the test's own clock reads.
const SLACK_MS: i64 = 50;

/// Guard of every wait in this file: only against hangs. The longest wait, for a
/// keepalive probe to meet the peer's RST, ends some 30 s after the clients closed.
const GUARD: Duration = Duration::from_secs(75);

/// Go's default TCP keepalive on accepted connections (idle time and probe interval).
const GO_KEEPALIVE_MS: i64 = 15_000;

// ---------------------------------------------------------------------------------------
// Running cwreap and reading its rows.

/// `cwreap ARGS` reading the daemon's published ages from `run_dir` (an empty directory:
/// none).
fn cwreap_with(run_dir: &Path, args: &[&str]) -> Output {
    without_pins(Command::new(cwreap_bin()).args(args))
        .env("CWREAP_RUN_DIR", run_dir)
        .output()
        .expect("run cwreap")
}

/// The `--json` rows of `cwreap ARGS`, which must exit 0.
fn rows_with(run_dir: &Path, args: &[&str]) -> Vec<Value> {
    json_of_success(&cwreap_with(run_dir, args), args)
}

fn fd_of(row: &Value) -> i32 {
    i32::try_from(field_i64(row, "fd")).expect("fd fits i32")
}

fn inode_of(row: &Value) -> u64 {
    u64::try_from(field_i64(row, "inode")).expect("inode is positive")
}

/// `age_max_ms`, which is null when the kernel gave no upper bound.
fn age_max(row: &Value) -> Option<i64> {
    row["age_max_ms"].as_i64()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).expect("milliseconds fit i64")
}

/// The rows of `pid`, by fd.
fn by_fd(rows: &[Value], pid: i32) -> BTreeMap<i32, Value> {
    rows.iter()
        .filter(|r| r["pid"].as_i64() == Some(i64::from(pid)))
        .map(|r| (fd_of(r), r.clone()))
        .collect()
}

/// One measurement line for the test's log (stderr directly: libtest captures
/// `eprintln!`).
fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

// ---------------------------------------------------------------------------------------
// The kernel's own view, independent of cwreap.

/// The inodes `pid`'s fds refer to that are sockets.
fn socket_inodes(pid: i32) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the server's fd table")
        .filter_map(|e| {
            let fd: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            fd_inode(pid, fd)
        })
        .collect()
}

/// Run `ss ARGS` inside network namespace `ns` (the host's when None); its stdout.
fn ss_in(ns: Option<&str>, args: &[&str]) -> String {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "ss"]);
            c
        }
        None => Command::new("ss"),
    };
    cmd.args(args);
    stdout(&run_ok(&mut cmd))
}

/// Every socket inode the kernel's sock_diag dumps list in `ns`, as `ss` shows them: TCP
/// in every state and UDP (`ino:N`, from `-e`), and unix (the local "port" column).
fn dumped_inodes(ns: Option<&str>) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for args in [["-tanHe"], ["-uanHe"]] {
        for line in ss_in(ns, &args).lines() {
            set.extend(
                line.split_whitespace()
                    .filter_map(|w| w.strip_prefix("ino:")?.parse::<u64>().ok())
                    .filter(|&i| i != 0),
            );
        }
    }
    // `u_str ESTAB 0 0 LOCAL INODE PEER PEER_INODE`
    for line in ss_in(ns, &["-xaH"]).lines() {
        if let Some(ino) = line
            .split_whitespace()
            .nth(5)
            .and_then(|w| w.parse::<u64>().ok())
        {
            set.insert(ino);
        }
    }
    set
}

// ---------------------------------------------------------------------------------------
// 1. Go net/http, default keepalive, a handler that hangs.

/// One connection the Go server leaked, and when its client closed.
struct Leak {
    fd: i32,
    inode: u64,
    client: SocketAddr,
    /// Just before the client's close(): the server's socket entered CLOSE_WAIT after.
    closing: Instant,
    /// Just after it: the FIN was sent by then.
    closed: Instant,
}

impl Leak {
    /// The true time in CLOSE_WAIT at a tcp_info read made between `before` and `after`:
    /// (at least, at most) in ms.
    fn true_age(&self, before: Instant, after: Instant) -> (i64, i64) {
        (
            ms(before.saturating_duration_since(self.closed)),
            ms(after.saturating_duration_since(self.closing)),
        )
    }

    /// What scan row `r`, read between `before` and `after`, says of this CLOSE_WAIT
    /// socket; it must be this socket, and its range must hold the true age.
    fn sample(&self, r: &Value, before: Instant, after: Instant) -> Sample {
        let fd = self.fd;
        assert_eq!(inode_of(r), self.inode, "{r}");
        assert_eq!(field_str(r, "remote"), self.client.to_string(), "{r}");
        assert_eq!(r["keepalive"], Value::Bool(true), "Go's keepalive: {r}");
        let (true_min, true_max) = self.true_age(before, after);
        let s = Sample {
            true_min,
            true_max,
            age_ms: field_i64(r, "age_ms"),
            age_max_ms: age_max(r),
            source: field_str(r, "age_source").to_owned(),
        };
        assert_eq!(s.source, "last_ack", "no daemon publishes here: {r}");
        assert!(
            s.age_ms <= true_max + SLACK_MS,
            "fd {fd}: the lower bound is above the true age: {s:?}"
        );
        let upper = s
            .age_max_ms
            .unwrap_or_else(|| panic!("fd {fd}: no upper bound: {r}"));
        assert!(
            upper >= true_min - SLACK_MS,
            "fd {fd}: the upper bound is below the true age: {s:?}"
        );
        s
    }
}

const FIN_TIMEOUT: &str = "/proc/sys/net/ipv4/tcp_fin_timeout";

/// A sample of one leaked socket at one scan: the true age and what scan said.
#[derive(Debug)]
struct Sample {
    true_min: i64,
    true_max: i64,
    age_ms: i64,
    age_max_ms: Option<i64>,
    source: String,
}

#[test]
#[ignore = "needs root: creates a network namespace (ip netns add), sets its tcp_fin_timeout, and duplicates the server's socket fds (CAP_SYS_PTRACE) to tell dead ones"]
fn go_keepalive_resets_last_ack_then_its_rst_leaves_dead_held_fds() {
    let test = "go_keepalive_resets_last_ack_then_its_rst_leaves_dead_held_fds";
    const LEAKS: usize = 4;
    let Some(exe) = runtimes::go_program(test, "hang_http.go") else {
        return;
    };
    let empty = Scratch::new("ages-go-no-daemon", 0o755);
    let ns = Netns::create("ages-go");
    // The clients' orphaned FIN_WAIT2 sockets expire after 20 s instead of 60: the probe
    // after that meets a RST. The sysctl is per network namespace.
    let host_fin = std::fs::read_to_string(FIN_TIMEOUT).expect("the host's tcp_fin_timeout");
    let inside = ns.run(|| {
        std::fs::write(FIN_TIMEOUT, "20").expect("set tcp_fin_timeout in the namespace");
        std::fs::read_to_string(FIN_TIMEOUT).expect("read it back")
    });
    assert_eq!(inside.trim(), "20", "tcp_fin_timeout inside the namespace");
    assert_eq!(
        std::fs::read_to_string(FIN_TIMEOUT).expect("the host's tcp_fin_timeout"),
        host_fin,
        "the host's tcp_fin_timeout must not change"
    );

    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]).arg(&exe);
    let mut srv = LineChild::spawn("hang-http", &mut cmd).expect("start hang-http");
    let addr: SocketAddr = srv
        .expect("listen ", GUARD)
        .unwrap_or_else(|e| panic!("{e}"))
        .parse()
        .expect("listen address");
    srv.expect("ready", GUARD).unwrap_or_else(|e| panic!("{e}"));
    let pid = srv.pid();
    let pid_s = pid.to_string();

    // Each client sends a request (the handler hangs on it), then closes for good; a few
    // hundred ms apart, so that each socket has an age of its own.
    let mut leaks: Vec<Leak> = Vec::new();
    let conns: Vec<TcpStream> = ns.run(move || {
        (0..LEAKS)
            .map(|_| TcpStream::connect_timeout(&addr, GUARD).expect("connect to the server"))
            .collect()
    });
    for (i, mut c) in conns.into_iter().enumerate() {
        let me = c.local_addr().expect("client address");
        c.write_all(format!("GET /hang/{i} HTTP/1.1\r\nHost: cwreap\r\n\r\n").as_bytes())
            .expect("send the request");
        let fd = loop {
            let rest = srv
                .expect("request ", GUARD)
                .unwrap_or_else(|e| panic!("{e}"));
            let w: Vec<&str> = rest.split_whitespace().collect();
            if w.get(2).and_then(|r| r.parse::<SocketAddr>().ok()) == Some(me) {
                break w[0].parse::<i32>().expect("fd of the request");
            }
        };
        let inode = fd_inode(pid, fd).expect("the server's fd is a socket");
        let closing = Instant::now();
        drop(c);
        let closed = Instant::now();
        leaks.push(Leak {
            fd,
            inode,
            client: me,
            closing,
            closed,
        });
        std::thread::sleep(Duration::from_millis(300));
    }

    // Before the RST: every scan brackets the true age, [age_ms, age_max_ms]; scan until
    // each socket shows a lower bound reset by an answered probe.
    let mut samples: BTreeMap<i32, Vec<Sample>> = BTreeMap::new();
    let mut reset: BTreeMap<i32, Sample> = BTreeMap::new();
    let deadline = Instant::now() + GUARD;
    while reset.len() < LEAKS {
        assert!(
            Instant::now() < deadline,
            "no probe reset the lower bound of every socket within {GUARD:?}: {samples:?}"
        );
        let before = Instant::now();
        let rows = by_fd(
            &rows_with(&empty.0, &["scan", "--pid", &pid_s, "--json"]),
            pid,
        );
        let after = Instant::now();
        for l in &leaks {
            let r = rows
                .get(&l.fd)
                .unwrap_or_else(|| panic!("scan lost fd {} before any RST: {rows:?}", l.fd));
            assert_eq!(
                field_str(r, "state"),
                "CLOSE_WAIT",
                "fd {} left CLOSE_WAIT before its lower bound was seen reset (the probe \
                 before the RST came unseen): {samples:?}\n{r}",
                l.fd
            );
            let s = l.sample(r, before, after);
            // No probe before 15 s of silence: until then the peer's FIN is its last ACK.
            if s.true_max < GO_KEEPALIVE_MS - 500 {
                assert!(
                    s.age_ms >= s.true_min - SLACK_MS,
                    "fd {}: before any probe, last_ack is the FIN's time: {s:?}",
                    l.fd
                );
            }
            // The hazard: a probe answered by the orphaned FIN_WAIT2 peer reset last_ack.
            if s.true_min > GO_KEEPALIVE_MS && s.age_ms + 5_000 < s.true_min {
                reset.entry(l.fd).or_insert(s);
            } else {
                samples.entry(l.fd).or_default().push(s);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let early: Vec<(i32, &Sample)> = samples
        .iter()
        .filter_map(|(fd, v)| Some((*fd, v.first()?)))
        .filter(|(_, s)| s.true_max < GO_KEEPALIVE_MS - 500)
        .collect();
    assert_eq!(
        early.len(),
        LEAKS,
        "every socket was scanned before its first probe: {samples:?}"
    );
    for (fd, s) in &early {
        note(&format!("{test}: fd {fd} before the probe: {s:?}"));
    }
    for (fd, s) in &reset {
        note(&format!("{test}: fd {fd} after an answered probe: {s:?}"));
    }

    // After the RST: every leaked fd is a dead held socket, and no dump lists it.
    let leaked: BTreeSet<i32> = leaks.iter().map(|l| l.fd).collect();
    // Until then, the ranges still hold the true age; the last of them is noted.
    let mut last: BTreeMap<i32, Sample> = BTreeMap::new();
    let dead = wait_until(
        "every leaked fd in state CLOSE",
        || srv.transcript(),
        || {
            let before = Instant::now();
            let rows = by_fd(
                &rows_with(&empty.0, &["scan", "--pid", &pid_s, "--json"]),
                pid,
            );
            let after = Instant::now();
            for l in &leaks {
                if let Some(r) = rows.get(&l.fd).filter(|r| r["state"] == "CLOSE_WAIT") {
                    last.insert(l.fd, l.sample(r, before, after));
                }
            }
            let closed: BTreeMap<i32, Value> = rows
                .into_iter()
                .filter(|(_, r)| r["state"] == "CLOSE")
                .collect();
            if leaked.iter().all(|fd| closed.contains_key(fd)) {
                return Some(closed);
            }
            std::thread::sleep(Duration::from_millis(250));
            None
        },
    );
    for (fd, s) in &last {
        note(&format!("{test}: fd {fd} last seen in CLOSE_WAIT: {s:?}"));
    }
    let since_close: Vec<i64> = leaks.iter().map(|l| ms(l.closed.elapsed())).collect();
    note(&format!(
        "{test}: all {LEAKS} dead at {since_close:?} ms after their clients closed"
    ));
    for l in &leaks {
        let r = &dead[&l.fd];
        assert_eq!(inode_of(r), l.inode, "fd {}: {r}", l.fd);
        assert!(r["remote"].is_null(), "a CLOSE socket has no peer: {r}");
        assert_eq!(field_i64(r, "pid"), i64::from(pid), "{r}");
    }
    // Independently: the server's socket fds that no sock_diag dump of its namespace lists.
    let held = socket_inodes(pid);
    let dumped = dumped_inodes(Some(&ns.name));
    let unlisted: BTreeSet<u64> = held.difference(&dumped).copied().collect();
    let dead_inodes: BTreeSet<u64> = dead.values().map(inode_of).collect();
    let leaked_inodes: BTreeSet<u64> = leaks.iter().map(|l| l.inode).collect();
    assert_eq!(
        dead.len(),
        unlisted.len(),
        "CLOSE rows vs socket fds in no dump: rows {dead_inodes:?}, unlisted {unlisted:?}"
    );
    assert_eq!(dead_inodes, unlisted, "the CLOSE rows are the unlisted fds");
    assert_eq!(
        unlisted, leaked_inodes,
        "the unlisted fds are the leaked ones"
    );
    assert!(
        held.iter().any(|i| dumped.contains(i)),
        "the listener at least is in the dumps: held {held:?}, dumped {dumped:?}"
    );
    // And ss shows no connection of those clients in any state.
    let clients: BTreeSet<SocketAddr> = leaks.iter().map(|l| l.client).collect();
    let shown: Vec<_> = ns
        .ss()
        .without_processes()
        .run()
        .into_iter()
        .filter(|s| s.peer.is_some_and(|p| clients.contains(&p)) || clients.contains(&s.local))
        .collect();
    assert!(shown.is_empty(), "ss still shows {shown:?}");
    let fds_now: BTreeSet<i32> = leaks
        .iter()
        .filter(|l| fd_inode(pid, l.fd) == Some(l.inode))
        .map(|l| l.fd)
        .collect();
    assert_eq!(fds_now, leaked, "the server still holds every leaked fd");
}

// ---------------------------------------------------------------------------------------
// 2. A heartbeat server: the daemon's first sight against the CLI's ages.

#[test]
#[ignore = "needs root: the daemon's dry run proves permission with pidfd_getfd on the server's sockets (CAP_SYS_PTRACE)"]
fn heartbeat_daemon_and_checks_scan_line_select_the_same_sockets() {
    let test = "heartbeat_daemon_and_checks_scan_line_select_the_same_sockets";
    const OLD: usize = 4;
    const YOUNG: usize = 2;
    if !runtimes::have_python(test) {
        return;
    }
    let mut cmd = Command::new(PYTHON);
    cmd.arg("-u").arg(runtimes::source("heartbeat.py"));
    let mut srv = LineChild::spawn("heartbeat.py", &mut cmd).expect("start heartbeat.py");
    let addr: SocketAddr = srv
        .expect("listen ", GUARD)
        .unwrap_or_else(|e| panic!("{e}"))
        .parse()
        .expect("listen address");
    srv.expect("ready", GUARD).unwrap_or_else(|e| panic!("{e}"));
    let pid = srv.pid();
    let pid_s = pid.to_string();

    // Each client says hello and half-closes, and stays to ACK every heartbeat.
    // (client, server fd, (just before the half-close, just after)).
    type Session = (TcpStream, i32, (Instant, Instant));
    let session = |srv: &mut LineChild| -> Session {
        let mut c = TcpStream::connect_timeout(&addr, GUARD).expect("connect");
        let me = c.local_addr().expect("client address");
        let fd = loop {
            let rest = srv
                .expect("accepted ", GUARD)
                .unwrap_or_else(|e| panic!("{e}"));
            let w: Vec<&str> = rest.split_whitespace().collect();
            if w.get(2).and_then(|r| r.parse::<SocketAddr>().ok()) == Some(me) {
                break w[0].parse::<i32>().expect("fd");
            }
        };
        c.write_all(b"hello\n").expect("say hello");
        let closing = Instant::now();
        c.shutdown(Shutdown::Write).expect("half-close");
        (c, fd, (closing, Instant::now()))
    };
    let old: Vec<Session> = (0..OLD).map(|_| session(&mut srv)).collect();
    wait_until(
        "the old sessions in CLOSE_WAIT",
        || srv.transcript(),
        || (ss_close_wait(pid).len() == OLD).then_some(()),
    );

    let run_dir = Scratch::new("ages-hb-run", 0o755);
    let empty = Scratch::new("ages-hb-empty", 0o755);
    let scratch = Scratch::new("ages-hb", 0o700);
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &format!(
            "interval: 1s\ndry_run: true\nlog_format: json\nmetrics: {{listen: off}}\n\
             targets:\n  - name: heartbeat\n    match: {{pid: {pid}}}\n    older_than: 8s\n    \
             action: shutdown\n"
        ),
    );
    let mut notify = Notify::bind(scratch.path("notify"));
    // The daemon's first sight of any socket is after this.
    let daemon_start = Instant::now();
    let mut d = Running::start(
        &cfg,
        &[],
        &[
            notify.env(),
            ("CWREAP_RUN_DIR", run_dir.0.clone().into_os_string()),
        ],
    );

    // The scan line `check` prints for the target.
    let out = run_ok(
        Command::new(cwreap_bin())
            .args(["check", "--config"])
            .arg(&cfg),
    );
    let text = stdout(&out);
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("# the same sockets: "))
        .unwrap_or_else(|| panic!("no scan line in check's output:\n{text}"))
        .to_owned();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[..2], ["cwreap", "scan"], "{line}");
    let mut scan_args: Vec<&str> = words[1..].to_vec();
    scan_args.push("--json");
    note(&format!("{test}: check's scan line: {line}"));

    // The daemon's dry-run audits: the old sessions, once each, after 8 s of first sight.
    let dry = |events: &[Value]| -> BTreeMap<i32, Value> {
        events
            .iter()
            .filter(|v| {
                v["message"] == "close_wait action"
                    && v["pid"].as_i64() == Some(i64::from(pid))
                    && v["outcome"] == "dry_run"
            })
            .map(|v| (fd_of(v), v.clone()))
            .collect()
    };
    let audits = d.wait_events("a dry run on every old session", GUARD, |ev| {
        let got = dry(ev);
        (got.len() >= OLD).then_some(got)
    });
    let old_fds: BTreeSet<i32> = old.iter().map(|o| o.1).collect();
    assert_eq!(
        audits.keys().copied().collect::<BTreeSet<_>>(),
        old_fds,
        "the daemon's dry runs:\n{}",
        d.log()
    );
    for a in audits.values() {
        assert_eq!(field_str(a, "age_source"), "first_seen", "{a}");
        assert!(field_i64(a, "age_ms") >= 8_000, "{a}");
    }

    // Younger sessions, which neither may select; once the daemon published them too.
    let young: Vec<Session> = (0..YOUNG).map(|_| session(&mut srv)).collect();
    wait_until(
        "every session in CLOSE_WAIT",
        || srv.transcript(),
        || (ss_close_wait(pid).len() == OLD + YOUNG).then_some(()),
    );
    notify.cycles(2);

    // The CLI's selection, between two looks at the daemon's, with a whole cycle after
    // the scan: no socket may cross the threshold meanwhile.
    let s_d = dry(&d.events());
    let before = Instant::now();
    let cli = by_fd(&rows_with(&run_dir.0, &scan_args), pid);
    let after = Instant::now();
    // What tcp_info alone says right after, for a failure message.
    let tcp_info_alone = by_fd(
        &rows_with(&empty.0, &["scan", "--pid", &pid_s, "--json"]),
        pid,
    );
    notify.cycles(2);
    let s_d_after = dry(&d.events());
    assert_eq!(
        s_d.keys().collect::<Vec<_>>(),
        s_d_after.keys().collect::<Vec<_>>(),
        "the daemon selected more around the scan:\n{}",
        d.log()
    );
    let s_cli: BTreeSet<i32> = cli.keys().copied().collect();
    let s_daemon: BTreeSet<i32> = s_d.keys().copied().collect();
    assert!(!s_cli.is_empty(), "the scan line selected nothing");
    assert_eq!(s_cli, s_daemon, "scan line vs daemon");
    for (_, fd, _) in &young {
        assert!(!s_cli.contains(fd), "young fd {fd} selected");
    }
    let closes: BTreeMap<i32, (Instant, Instant)> = old.iter().map(|o| (o.1, o.2)).collect();
    for (fd, r) in &cli {
        let a = &s_d[fd];
        assert_eq!(inode_of(r), inode_of(a), "fd {fd}: {r} vs {a}");
        assert_eq!(field_str(r, "age_source"), "first_seen", "{r}");
        let (cli_min, daemon) = (field_i64(r, "age_ms"), field_i64(a, "age_ms"));
        let cli_max = age_max(r).unwrap_or_else(|| {
            panic!(
                "fd {fd}: no upper bound: {r}\nthe same socket without the daemon's ages \
                 a moment later: {:?}\nss: {}",
                tcp_info_alone.get(fd),
                ss_in(None, &["-tniH", "state", "close-wait"])
            )
        });
        // Both ages count from the same first sight, after `daemon_start`; the daemon
        // read its own before the scan: it may be younger by the time between the two
        // reads, at most `after - (daemon_start + daemon)`, and never older.
        let between = ms(after.saturating_duration_since(daemon_start)) - daemon;
        assert!(
            daemon <= cli_max
                && daemon <= cli_min + SLACK_MS
                && daemon + between + SLACK_MS >= cli_min,
            "fd {fd}: the daemon's age {daemon} ms outside the CLI's [{cli_min}, {cli_max}] \
             (reads at most {between} ms apart)"
        );
        // And the CLI's range holds the true age (the half-close came before the daemon).
        let (closing, closed) = closes[fd];
        let true_min = ms(before.saturating_duration_since(closed));
        let true_max = ms(after.saturating_duration_since(closing));
        assert!(
            cli_min <= true_max + SLACK_MS && cli_max >= true_min - SLACK_MS,
            "fd {fd}: CLI [{cli_min}, {cli_max}] ms vs true age [{true_min}, {true_max}] ms"
        );
        note(&format!(
            "{test}: fd {fd}: daemon age_ms {daemon}; CLI [{cli_min}, {cli_max}] ms \
             (first_seen), {} ms after the daemon's read; true age [{true_min}, {true_max}] ms; \
             the daemon started {} ms after this close, and first saw it at most {} ms later",
            cli_min - daemon,
            ms(daemon_start.saturating_duration_since(closed)),
            ms(after.saturating_duration_since(daemon_start)) - cli_min
        ));
    }

    // The hazard, without the daemon's ages: the same line selects nothing, and every
    // socket looks about a heartbeat old.
    let none = rows_with(&empty.0, &scan_args);
    assert!(
        none.is_empty(),
        "without published ages, the scan line selected {none:?}"
    );
    let bare = by_fd(
        &rows_with(&empty.0, &["scan", "--pid", &pid_s, "--json"]),
        pid,
    );
    assert_eq!(bare.len(), OLD + YOUNG, "{bare:?}");
    for (fd, r) in &bare {
        assert_eq!(field_str(r, "age_source"), "last_ack", "{r}");
        assert!(
            field_i64(r, "age_ms") < 2_000,
            "fd {fd}: the heartbeat's ACKs keep last_ack small: {r}"
        );
    }
    for (_, fd, (_, closed)) in &old {
        let r = &bare[fd];
        let true_age = ms(closed.elapsed());
        assert!(true_age > 8_000, "fd {fd}: truly older than older_than");
        note(&format!(
            "{test}: without published ages fd {fd}: age_ms {} (last_ack), age_max_ms {:?}, \
             true age at least {true_age} ms",
            field_i64(r, "age_ms"),
            age_max(r)
        ));
    }
    d.stop();
    drop(young);
    drop(old);
}

// ---------------------------------------------------------------------------------------
// 3. Sockets that are no leak, beside one CLOSE_WAIT and one dead socket.

#[test]
#[ignore = "needs root: telling dead held sockets duplicates the holder's socket fds with pidfd_getfd (CAP_SYS_PTRACE)"]
fn only_close_wait_and_dead_sockets_are_reported_among_bystanders() {
    let test = "only_close_wait_and_dead_sockets_are_reported_among_bystanders";
    if !runtimes::have_python(test) {
        return;
    }
    let empty = Scratch::new("ages-bystanders", 0o755);
    let mut cmd = Command::new(PYTHON);
    cmd.arg("-u").arg(runtimes::source("bystanders.py"));
    let mut h = LineChild::spawn("bystanders.py", &mut cmd).expect("start bystanders.py");
    let mut kinds: BTreeMap<String, i32> = BTreeMap::new();
    let acceptor: SocketAddr = loop {
        let line = h
            .next_line(GUARD)
            .unwrap_or_else(|e| panic!("bystanders.py said nothing ({e})"));
        assert!(!line.starts_with("error"), "bystanders.py: {line}");
        if let Some(rest) = line.strip_prefix("fd ") {
            let (kind, fd) = rest.split_once(' ').expect("fd KIND N");
            kinds.insert(kind.to_owned(), fd.parse().expect("fd number"));
        } else if let Some(addr) = line.strip_prefix("listen ") {
            break addr.parse().expect("acceptor address");
        }
    };
    h.expect("ready", GUARD).unwrap_or_else(|e| panic!("{e}"));
    let pid = h.pid();
    let pid_s = pid.to_string();
    for (kind, fd) in &kinds {
        assert!(
            fd_inode(pid, *fd).is_some(),
            "{kind} (fd {fd}) is not a socket"
        );
    }
    // Some of them are in no sock_diag dump at all: cwreap has to duplicate them to know.
    let dumped = dumped_inodes(None);
    let unlisted: BTreeSet<&str> = kinds
        .iter()
        .filter(|(_, fd)| fd_inode(pid, **fd).is_some_and(|i| !dumped.contains(&i)))
        .map(|(k, _)| k.as_str())
        .collect();
    note(&format!("{test}: sockets in no dump: {unlisted:?}"));
    assert!(
        unlisted.contains("never") && unlisted.contains("refused"),
        "never-connected and refused sockets are in no dump: {unlisted:?}"
    );

    let rows = rows_with(&empty.0, &["scan", "--pid", &pid_s, "--json"]);
    assert!(
        rows.is_empty(),
        "scan reported sockets that are no leak: {rows:?}\nkinds: {kinds:?}"
    );

    // One real CLOSE_WAIT (the peer half-closes) and one dead socket (the peer resets).
    let accept = |h: &mut LineChild| -> (TcpStream, i32) {
        let c = TcpStream::connect_timeout(&acceptor, GUARD).expect("connect");
        let me = c.local_addr().expect("client address");
        h.send("accept").expect("write to bystanders.py");
        let rest = h
            .expect("accepted ", GUARD)
            .unwrap_or_else(|e| panic!("{e}"));
        let w: Vec<&str> = rest.split_whitespace().collect();
        assert_eq!(
            w.get(2).and_then(|r| r.parse::<SocketAddr>().ok()),
            Some(me),
            "{rest}"
        );
        (c, w[0].parse().expect("accepted fd"))
    };
    let (half, cw_fd) = accept(&mut h);
    half.shutdown(Shutdown::Write).expect("half-close");
    let (reset, dead_fd) = accept(&mut h);
    rustix::net::sockopt::set_socket_linger(&reset, Some(Duration::ZERO)).expect("SO_LINGER 0");
    drop(reset);

    let want: BTreeMap<i32, &str> = [(cw_fd, "CLOSE_WAIT"), (dead_fd, "CLOSE")].into();
    let rows = wait_until(
        "one CLOSE_WAIT and one CLOSE row",
        || h.transcript(),
        || {
            let rows = by_fd(
                &rows_with(&empty.0, &["scan", "--pid", &pid_s, "--json"]),
                pid,
            );
            let states: BTreeMap<i32, &str> = rows
                .iter()
                .map(|(fd, r)| (*fd, field_str(r, "state")))
                .collect();
            (states == want).then_some(rows)
        },
    );
    let all = rows_with(&empty.0, &["scan", "--pid", &pid_s, "--json"]);
    assert_eq!(all.len(), 2, "exactly the two: {all:?}");
    let cw = &rows[&cw_fd];
    assert_eq!(
        field_str(cw, "remote"),
        half.local_addr().expect("client address").to_string(),
        "{cw}"
    );
    assert_eq!(Some(inode_of(cw)), fd_inode(pid, cw_fd), "{cw}");
    let dead = &rows[&dead_fd];
    assert!(dead["remote"].is_null(), "{dead}");
    assert_eq!(Some(inode_of(dead)), fd_inode(pid, dead_fd), "{dead}");
    note(&format!("{test}: {cw}\n{test}: {dead}"));
    drop(half);
}
