//! Faults during a daemon cycle: each is counted and logged, and the next cycle runs.
//!
//! * What a cycle does when a target exits, closes or reuses an fd between attribution and
//!   action, vanishes from /proc during the walk, or a dump keeps being interrupted, is
//!   logic: the daemon's unit tests script each on a recording kernel (src/daemon/tests.rs),
//!   and the netlink unit tests show the interrupted dump retried and bounded.
//! * Permission faults (EPERM from pidfd_getfd, EACCES on /proc/PID/fd), an unprivileged
//!   `cwreap run`, the start-up self-test under a seccomp filter, and misbehaving metrics
//!   clients (garbage, huge headers, resets, floods) run the real `cwreap` binary.
//! * cwreap never acts on its own process, even when a policy names it, and `scan` never
//!   duplicates a socket (a seccomp filter kills it if it tries).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::metrics::{free_addr, sample, scrape};
use crate::support::ss::Ss;
use crate::support::*;
use cwreap::daemon::Daemon;
use cwreap::daemon::cycle_report::CycleReport;
use cwreap_linux::kernel::Linux;
use cwreap_linux::netlink::Diag;
use serde_json::Value;

const V4: &str = "127.0.0.1:0";
const ACTION: &str = "close_wait action";
const NOBODY: u32 = 65534;

// ---------------------------------------------------------------------------------------
// The daemon's cycle, in this process, with its log captured.

/// A tracing writer into a shared buffer.
#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// An enforcing policy with one `shutdown` target per (name, pid), due at once.
fn policy(targets: &[(&str, i32)]) -> String {
    let mut y = String::from(
        "interval: 1s\ndry_run: false\nlog_format: json\nmetrics: {listen: off}\n\
limits: {max_reaps_per_cycle: 1000, max_reaps_per_minute: 100000}\ntargets:\n",
    );
    for (name, pid) in targets {
        y.push_str(&format!(
            "  - name: {name}\n    match: {{pid: {pid}}}\n    older_than: 1ms\n    action: shutdown\n"
        ));
    }
    y
}

fn daemon(yaml: &str) -> Daemon<Linux> {
    let cfg = cwreap::shared::config::parse(yaml, "faults.yaml").expect("valid policy");
    Daemon::new(cfg, false).expect("daemon")
}

/// One cycle on this thread; returns its report and the JSON events it logged.
fn cycle(d: &mut Daemon<Linux>) -> (CycleReport, Vec<Value>) {
    // Sockets that went CLOSE_WAIT just now must be older than the policy's 1 ms, and
    // tcp_info's last_ack_recv ticks in jiffies (4 ms at HZ=250).
    std::thread::sleep(Duration::from_millis(20));
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sub = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_max_level(tracing::Level::INFO)
        .with_writer(Capture(buf.clone()))
        .finish();
    let stop = AtomicBool::new(false);
    let report = tracing::subscriber::with_default(sub, || d.cycle(&stop));
    let text = String::from_utf8_lossy(&buf.lock().expect("log lock")).into_owned();
    let events = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line not JSON ({e}): {l}")))
        .collect();
    (report, events)
}

/// The action events logged about `pid`.
fn actions(events: &[Value], pid: i32) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["message"] == ACTION && e["pid"].as_i64() == Some(i64::from(pid)))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Act-time faults, in the window between attribution and action.

#[test]
fn never_acts_on_its_own_process_even_when_the_policy_names_it() {
    // This process holds a CLOSE_WAIT socket, and the policy targets this very pid.
    let listener = TcpListener::bind(V4).expect("listen");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (ours, _) = listener.accept().expect("accept");
    client.shutdown(Shutdown::Write).expect("half-close");
    let me = std::process::id() as i32;
    let deadline = Instant::now() + Duration::from_secs(5);
    while cwreap_linux::sys::tcp_state(ours.as_fd()).expect("TCP_INFO") != 8 {
        assert!(
            Instant::now() < deadline,
            "our socket never reached CLOSE_WAIT"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !ss_close_wait(me).is_empty(),
        "ss sees our CLOSE_WAIT socket"
    );

    let mut d = daemon(&policy(&[("me", me)]));
    let (r, ev) = cycle(&mut d);
    assert_eq!(r.candidates, 0, "{r:?}");
    assert!(r.outcomes.is_empty(), "{:?}", r.outcomes);
    assert!(actions(&ev, me).is_empty(), "{ev:?}");
    assert_eq!(
        cwreap_linux::sys::tcp_state(ours.as_fd()).expect("TCP_INFO"),
        8
    );

    // scan/reap attribution skips us too, even when asked for our pid by name.
    let os = cwreap_linux::kernel::RealOs;
    let proc = cwreap_linux::procfs::ProcFs::default();
    let found = cwreap_linux::netns::Found {
        close_wait: Diag::new().expect("netlink").close_wait().expect("dump"),
        listeners: Vec::new(),
    };
    assert!(
        found
            .close_wait
            .iter()
            .any(|s| { cwreap_linux::sys::inode(ours.as_fd()).is_ok_and(|i| i == s.inode) }),
        "the dump lists our socket"
    );
    let snap = cwreap::shared::attribute::Attributor {
        proc: &proc,
        os: Some(&os),
        self_pid: me,
        host: None,
    }
    .attribute(
        found,
        &cwreap::shared::attribute::Scope {
            pids: Some(vec![me]),
            ..Default::default()
        },
    );
    assert!(snap.processes.is_empty());
    assert!(snap.sockets.iter().all(|s| s.holders.is_empty()));
    drop(client);
}

// ---------------------------------------------------------------------------------------
// The real binary: permissions and privileges.

/// Copies of our binaries that any user may execute, wherever the checkout lives.
struct Bins {
    dir: PathBuf,
}

impl Bins {
    fn new(tag: &str) -> Bins {
        let dir = std::env::temp_dir().join(format!("cwreap-faults-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for (src, name) in [(cwreap_bin(), "cwreap"), (fixture_bin(), "cwreap-fixture")] {
            let dst = dir.join(name);
            std::fs::copy(src, &dst).expect("copy binary");
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
                .expect("chmod binary");
        }
        Bins { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A policy file: root-owned, mode 0644 (readable by the unprivileged daemons here).
    fn policy(&self, text: &str) -> PathBuf {
        let p = self.dir.join("cwreap.yaml");
        std::fs::write(&p, text).expect("write policy");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        p
    }
}

impl Drop for Bins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Spawn `cmd`. A binary copied a moment ago may be briefly "busy" (ETXTBSY): a process
/// forked by a parallel test can still hold the copy's write fd until it execs.
fn spawn(cmd: &mut Command) -> Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
        }
    }
}

/// A leaky fixture server run by `cmd` (e.g. as another user), speaking the fixture's
/// stdout protocol; killed on drop.
struct Server {
    child: Child,
    _stdin: ChildStdin,
    lines: Receiver<String>,
    addr: SocketAddr,
}

impl Server {
    fn start(mut cmd: Command) -> Server {
        cmd.args(["server", "--listen", V4])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = spawn(&mut cmd);
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let lines = crate::support::lines_of(stdout);
        let mut addr = None;
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(10))
                .expect("fixture started");
            if let Some(a) = line.strip_prefix("listen ") {
                addr = a.parse().ok();
            } else if line == "ready" {
                break;
            }
        }
        Server {
            child,
            _stdin: stdin,
            lines,
            addr: addr.expect("listen address"),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A half-closed client: the server's end goes CLOSE_WAIT.
    fn close_wait(&mut self) -> TcpStream {
        let c = TcpStream::connect(self.addr).expect("connect");
        c.shutdown(Shutdown::Write).expect("half-close");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect("fixture never saw the EOF");
            let line = self.lines.recv_timeout(left).expect("fixture line");
            if line.starts_with("eof ") {
                return c;
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long to wait for a line in a daemon's log (a guard against hangs only).
const LOG_WAIT: Duration = Duration::from_secs(10);

/// Start `cmd` (`cwreap run`, perhaps behind another program) as every daemon test does,
/// and wait for its start-up line.
fn start(mut cmd: Command) -> Running {
    Running::attach(spawn(Running::prepare(&mut cmd))).started()
}

/// Scrape until `pred` holds; panic with `log` after 15 s.
fn scrape_until(
    addr: SocketAddr,
    what: &str,
    log: impl Fn() -> String,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(text) = scrape(addr)
            && pred(&text)
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last scrape:\n{}\nlog:\n{}",
            scrape(addr).unwrap_or_default(),
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What `ss` says of the connection whose one end is `at`, both ends, with owners.
fn ss_connection(at: SocketAddr) -> String {
    let port = at.port().to_string();
    let out = Command::new("ss")
        .args(["-tanpi", "sport", "=", &port, "or", "dport", "=", &port])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cycles(text: &str) -> f64 {
    sample(text, "cwreap_cycle_duration_seconds_count").unwrap_or(0.0)
}

fn run_policy(metrics: SocketAddr, targets: &[(&str, i32)]) -> String {
    let mut y = format!(
        "interval: 100ms\ndry_run: false\nlog_format: json\nmetrics: {{listen: \"{metrics}\"}}\ntargets:\n"
    );
    for (name, pid) in targets {
        y.push_str(&format!(
            "  - name: {name}\n    match: {{pid: {pid}}}\n    older_than: 1ms\n    action: shutdown\n"
        ));
    }
    y
}

#[test]
#[ignore = "needs root: runs the fixture as nobody, and cwreap with root's real uid and nobody's effective uid"]
fn eperm_from_pidfd_getfd_is_an_error_outcome_counted_and_logged() {
    let bins = Bins::new("eperm-act");
    // The target runs as nobody. cwreap runs with real uid 0 and effective uid nobody, so
    // it may read the target's /proc/PID/fd (checked with the fs uid) but pidfd_getfd
    // (ptrace attach, checked with the real uid) is refused without CAP_SYS_PTRACE.
    let mut target = Command::new(bins.path("cwreap-fixture"));
    target.uid(NOBODY).gid(NOBODY);
    let mut fx = Server::start(target);
    let mut c1 = fx.close_wait();
    let addr = free_addr();
    let cfg = bins.policy(&run_policy(addr, &[("nobody", fx.pid())]));
    let mut cmd = Command::new("setpriv");
    cmd.args(["--euid", "65534", "--egid", "65534", "--clear-groups"])
        .arg(bins.path("cwreap"))
        .arg("run")
        .arg("--config")
        .arg(&cfg);
    let mut d = start(cmd);
    let warned = d.wait_line("the capability warning", LOG_WAIT, |l| {
        l.contains("running without CAP_SYS_PTRACE")
    });
    assert!(warned.contains("\"WARN\""), "{warned}");

    let errors = "cwreap_reaped_total{target=\"nobody\",action=\"shutdown\",outcome=\"error\"}";
    let text = scrape_until(
        addr,
        "the failed action",
        || d.log(),
        |t| sample(t, errors) == Some(1.0),
    );
    assert!(
        sample(&text, "cwreap_cycle_errors_total{kind=\"act\"}") >= Some(1.0),
        "{text}"
    );
    let failed = d.wait_line("the failed action", LOG_WAIT, |l| {
        l.contains("action failed")
    });
    let v: Value = serde_json::from_str(&failed).expect("JSON log");
    assert_eq!(v["level"], "WARN", "{v}");
    assert_eq!(v["pid"], fx.pid(), "{v}");
    assert_eq!(v["outcome"], "error", "{v}");
    let why = v["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("Operation not permitted") && why.contains("CAP_SYS_PTRACE"),
        "{v}"
    );

    // Later cycles run: the failed socket is not hammered every cycle, a new one gets its
    // own attempt, and nothing was shut down.
    let c0 = cycles(&text);
    let mut c2 = fx.close_wait();
    let text = scrape_until(
        addr,
        "a second attempt",
        || d.log(),
        |t| sample(t, errors) == Some(2.0) && cycles(t) >= c0 + 3.0,
    );
    assert_eq!(sample(&text, errors), Some(2.0), "{text}");
    assert_eq!(ss_close_wait(fx.pid()).len(), 2, "a socket was touched");
    for (name, c) in [("c1", &mut c1), ("c2", &mut c2)] {
        let at = c.local_addr().expect("client address");
        assert!(
            !reads_eof(c, Duration::from_millis(100)),
            "{name} ({at}) saw its connection end; ss now:\n{}\nlog:\n{}",
            ss_connection(at),
            d.log()
        );
    }
    assert_eq!(
        d.terminate(Duration::from_secs(5)).0.code(),
        Some(0),
        "{}",
        d.log()
    );
    assert!(!d.lines().join("\n").contains("panicked"), "{}", d.log());
}

#[test]
#[ignore = "needs root: runs a fixture as nobody and cwreap as root with every capability dropped"]
fn eacces_on_a_target_fd_table_is_counted_each_cycle_and_others_are_still_reaped() {
    let bins = Bins::new("eacces");
    // cwreap as root with every capability dropped: another user's process is out of
    // reach (/proc/PID/fd is refused), a root process with no more capabilities is not.
    let mut other = Command::new(bins.path("cwreap-fixture"));
    other.uid(NOBODY).gid(NOBODY);
    let mut protected = Server::start(other);
    let mut pc = protected.close_wait();
    let mut plain = Command::new("setpriv");
    plain
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(bins.path("cwreap-fixture"));
    let mut reachable = Server::start(plain);
    let addr = free_addr();
    let cfg = bins.policy(&run_policy(
        addr,
        &[
            ("protected", protected.pid()),
            ("reachable", reachable.pid()),
        ],
    ));
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(bins.path("cwreap"))
        .arg("run")
        .arg("--config")
        .arg(&cfg);
    let mut d = start(cmd);
    d.wait_line("the capability warning", LOG_WAIT, |l| {
        l.contains("running without CAP_SYS_PTRACE")
    });

    let proc_errors = "cwreap_cycle_errors_total{kind=\"proc\"}";
    let text = scrape_until(
        addr,
        "permission errors",
        || d.log(),
        |t| sample(t, proc_errors) >= Some(3.0),
    );
    let denied = d.wait_line("the permission warning", LOG_WAIT, |l| {
        l.contains("cannot read the fd table of some target processes")
    });
    assert!(denied.contains("CAP_SYS_PTRACE"), "{denied}");
    // One error per cycle, every cycle: counted, and the cycles go on.
    let (e0, c0) = (sample(&text, proc_errors).unwrap_or(0.0), cycles(&text));
    let mut rc = reachable.close_wait();
    let reaped = "cwreap_reaped_total{target=\"reachable\",action=\"shutdown\",outcome=\"reaped\"}";
    let text = scrape_until(
        addr,
        "the reachable target reaped",
        || d.log(),
        |t| sample(t, reaped) == Some(1.0),
    );
    assert!(reads_eof(&mut rc, Duration::from_secs(5)));
    let (e1, c1) = (sample(&text, proc_errors).unwrap_or(0.0), cycles(&text));
    // Counted and observed together: one error per cycle, in every cycle.
    assert!(c1 > c0, "cycles {c0}->{c1}");
    assert_eq!(e1 - e0, c1 - c0, "errors {e0}->{e1}, cycles {c0}->{c1}");
    assert_eq!(
        ss_close_wait(protected.pid()).len(),
        1,
        "the protected socket was touched"
    );
    assert!(!reads_eof(&mut pc, Duration::from_millis(100)));
    assert_eq!(
        d.terminate(Duration::from_secs(5)).0.code(),
        Some(0),
        "{}",
        d.log()
    );
}

#[test]
#[ignore = "needs root: runs the daemon as nobody against a fixture that root owns"]
fn run_as_an_unprivileged_user_starts_with_a_clear_capability_warning() {
    let bins = Bins::new("unpriv-run");
    let mut fx = Fixture::start(&[V4], &[]);
    let mut client = fx.close_wait(0).0;
    let addr = free_addr();
    let cfg = bins.policy(&run_policy(addr, &[("root-owned", fx.pid())]));
    let mut cmd = Command::new(bins.path("cwreap"));
    cmd.arg("run")
        .arg("--config")
        .arg(&cfg)
        .uid(NOBODY)
        .gid(NOBODY);
    let mut d = start(cmd);
    let warned = d.wait_line("the capability warning", LOG_WAIT, |l| {
        l.contains("running without CAP_SYS_PTRACE")
    });
    let v: Value = serde_json::from_str(&warned).expect("JSON log");
    assert_eq!(v["level"], "WARN", "{v}");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("AmbientCapabilities=CAP_SYS_PTRACE") && msg.contains("setcap"),
        "the warning says how to fix it: {msg}"
    );
    // It runs, counts the target it may not inspect, and touches nothing.
    let text = scrape_until(
        addr,
        "permission errors",
        || d.log(),
        |t| sample(t, "cwreap_cycle_errors_total{kind=\"proc\"}") >= Some(2.0),
    );
    assert!(cycles(&text) >= 2.0);
    assert_eq!(ss_close_wait(fx.pid()).len(), 1);
    assert!(!reads_eof(&mut client, Duration::from_millis(100)));
    assert_eq!(
        d.terminate(Duration::from_secs(5)).0.code(),
        Some(0),
        "{}",
        d.log()
    );
    assert!(!d.lines().join("\n").contains("panicked"), "{}", d.log());
}

/// With CAP_DAC_READ_SEARCH but not CAP_SYS_PTRACE, /proc/PID/fd of another user can be
/// listed but its links not read. Each command used to take that for "every fd closed" and
/// say "No CLOSE_WAIT sockets match", exit 0; now each exits 2 naming CAP_SYS_PTRACE.
#[test]
#[ignore = "needs root: runs cwreap as nobody with one capability against root's fixture"]
fn partial_privilege_is_an_error_naming_the_missing_capability_never_nothing_found() {
    let bins = Bins::new("partial-priv");
    let mut fx = Fixture::start(&[V4], &[]);
    let (_client, _fd) = fx.close_wait(0);
    let pid = fx.pid().to_string();
    for args in [
        vec!["scan", "--pid", pid.as_str()],
        vec!["scan", "--pid", pid.as_str(), "--json"],
        vec![
            "reap",
            "--pid",
            pid.as_str(),
            "--older-than",
            "0s",
            "--dry-run",
        ],
        vec![
            "reap",
            "--pid",
            pid.as_str(),
            "--older-than",
            "0s",
            "--close",
            "--dry-run",
        ],
        vec!["explain", "--pid", pid.as_str()],
    ] {
        let out = Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "--inh-caps=-all,+dac_read_search",
                "--ambient-caps=-all,+dac_read_search",
            ])
            .arg(bins.path("cwreap"))
            .args(&args)
            .output()
            .expect("setpriv");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: stdout {} stderr {err}",
            stdout(&out)
        );
        assert!(err.contains("CAP_SYS_PTRACE"), "{args:?}: {err}");
        assert!(
            !stdout(&out).contains("No CLOSE_WAIT sockets"),
            "{args:?} said nothing was there"
        );
    }
}

/// Run `cmd` under a seccomp filter that answers pidfd_getfd with `verdict` (e.g. EPERM,
/// as a container runtime's or a unit's syscall filter would, or killing the process).
#[cfg(target_arch = "x86_64")]
fn filter_pidfd_getfd(cmd: &mut Command, verdict: u32) {
    cwreap_linux::testing::filter_syscall(cmd, libc::SYS_pidfd_getfd, verdict);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn start_up_self_test_fails_fast_naming_the_fix_when_pidfd_getfd_is_blocked() {
    let bins = Bins::new("selftest");
    let cfg = bins.policy(&run_policy(free_addr(), &[("t", 1)]));
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let notify_path = bins.path("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify.set_nonblocking(true).expect("nonblocking");
    let mut cmd = Command::new(cwreap_bin());
    cmd.arg("run")
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("RUST_LOG");
    filter_pidfd_getfd(&mut cmd, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
    let out = cmd.output().expect("run cwreap");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cwreap: self-test: pidfd_getfd failed (Operation not permitted")
            && err.contains("SystemCallFilter=pidfd_getfd")
            && err.contains("CAP_SYS_PTRACE"),
        "the message names the fix: {err}"
    );
    assert!(
        !err.contains("cwreap started") && !err.contains("panicked"),
        "{err}"
    );
    let mut buf = [0u8; 512];
    let mut said = String::new();
    while let Ok(n) = notify.recv(&mut buf) {
        said.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        !said.contains("READY=1"),
        "READY before the self-test passed: {said}"
    );

    // Without the filter, the same binary and policy start.
    let mut ok = Command::new(cwreap_bin());
    ok.arg("run").arg("--config").arg(&cfg);
    let mut d = start(ok);
    assert_eq!(
        d.terminate(Duration::from_secs(5)).0.code(),
        Some(0),
        "{}",
        d.log()
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn scan_never_duplicates_a_live_socket_only_reap_does() {
    use std::os::unix::process::ExitStatusExt;
    let mut fx = Fixture::start(&[V4], &[]);
    let (mut client, fd) = fx.close_wait(0);
    let pid = fx.pid().to_string();
    // Any pidfd_getfd kills the process on the spot (SIGSYS).
    let run = |args: &[&str]| {
        let mut cmd = Command::new(cwreap_bin());
        cmd.args(args);
        filter_pidfd_getfd(&mut cmd, libc::SECCOMP_RET_KILL_PROCESS);
        cmd.output().expect("run cwreap")
    };
    // The fixture holds a listener, a CLOSE_WAIT socket and live connections: every one
    // of them is in a sock_diag table, so scan has nothing to duplicate. (A socket in no
    // table, a dead held one, is the only kind scan duplicates: see the next test. On a
    // busy host a host-wide scan may meet some, so only the fixture is scanned here.)
    let args = ["scan", "--pid", pid.as_str(), "--json"];
    let out = run(&args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
    assert!(
        json_lines(&out)
            .iter()
            .any(|r| r["pid"].as_i64() == Some(i64::from(fx.pid()))
                && r["fd"].as_i64() == Some(i64::from(fd))),
        "{args:?} lists the socket: {}",
        stdout(&out)
    );
    // The control: reap, even a dry run, duplicates, and the filter catches it.
    let out = run(&["reap", "--pid", &pid, "--older-than", "0s", "--dry-run"]);
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
    assert!(!reads_eof(&mut client, Duration::from_millis(100)));
}

/// Scan duplicates a socket only to tell whether a socket in no sock_diag table is a dead
/// held one; refused (as a container's seccomp profile would), it says the dead sockets
/// are unknown, naming why, and never that there are none.
#[cfg(target_arch = "x86_64")]
#[test]
#[ignore = "needs root: the fixture's sockets belong to root, and the probe duplicates them"]
fn scan_duplicates_only_sockets_in_no_table_and_says_so_when_refused() {
    let listener = TcpListener::bind(V4).expect("listen");
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(format!(
            "import socket,struct,sys,time\n\
             l=socket.socket(); l.connect(('127.0.0.1',{port}))\n\
             print('ready',flush=True); time.sleep(60)",
            port = listener.local_addr().expect("addr").port()
        ))
        .stdout(Stdio::piped());
    let holder = Killed(cmd.spawn().expect("python3"));
    let (server, _) = listener.accept().expect("accept");
    // The holder's socket is reset by its peer: CLOSE, in no table, still held.
    rustix::net::sockopt::set_socket_linger(&server, Some(Duration::ZERO)).expect("SO_LINGER 0");
    drop(server);
    let hpid = holder.0.id().to_string();
    wait_until("the reset socket listed as dead held", String::new, || {
        let out = Command::new(cwreap_bin())
            .args(["scan", "--pid", &hpid, "--json"])
            .output()
            .expect("scan");
        let rows = json_lines(&out);
        (rows.len() == 1 && rows[0]["state"] == "CLOSE").then_some(())
    });
    let mut cmd = Command::new(cwreap_bin());
    cmd.args(["scan", "--pid", &hpid, "--json"]);
    filter_pidfd_getfd(&mut cmd, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
    let out = cmd.output().expect("scan");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        json_lines(&out).is_empty(),
        "nothing listed as dead: {}",
        stdout(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dead held sockets")
            && err.contains("are unknown")
            && err.contains("pidfd_getfd")
            && err.contains("seccomp"),
        "the refusal is said, naming what refuses it: {err}"
    );
    drop(holder);
}

// ---------------------------------------------------------------------------------------
// Misbehaving metrics clients.

/// Send `bytes` and read the answer's status line, if any comes before the connection ends.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> Option<String> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(6)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    text.lines()
        .next()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn metrics_endpoint_survives_garbage_huge_headers_resets_and_floods() {
    let bins = Bins::new("metrics-abuse");
    let mut fx = Fixture::start(&[V4], &[]);
    let addr = free_addr();
    let cfg = bins.policy(&run_policy(addr, &[("t", fx.pid())]));
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut cmd = Command::new(cwreap_bin());
    cmd.arg("run").arg("--config").arg(&cfg);
    let mut d = start(cmd);
    let first = scrape_until(addr, "the first scrape", || d.log(), |t| cycles(t) >= 1.0);
    let c0 = cycles(&first);
    let rss0 = rss_kib(d.pid().as_raw_nonzero().get());

    // Binary garbage with a header end: not a GET, so 405, and nothing else happens.
    let mut garbage: Vec<u8> = (0..2000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    garbage.extend_from_slice(b"\r\n\r\n");
    let status = exchange(addr, &garbage).expect("an answer to garbage");
    assert!(status.starts_with("HTTP/1.1 405"), "{status}");
    // Garbage that never ends a header, then EOF: the connection is just dropped.
    assert_eq!(exchange(addr, b"\x00\xff\xfe GET /metrics"), None);

    // A 16 MiB header: the endpoint reads at most a few KiB of it, answers, and hangs up.
    let mut big = TcpStream::connect(addr).expect("connect");
    big.write_all(b"GET /metrics HTTP/1.1\r\nX-Pad: ")
        .expect("start header");
    let pad = vec![b'a'; 64 * 1024];
    let mut sent = 0usize;
    let writer_gave_up = loop {
        match big.write(&pad) {
            Ok(n) => sent += n,
            Err(_) => break true,
        }
        if sent >= 16 << 20 {
            break false;
        }
    };
    assert!(
        writer_gave_up,
        "the endpoint kept reading a 16 MiB header instead of hanging up"
    );
    drop(big);

    // Clients that ask and reset before reading the answer.
    for i in 0..200 {
        let mut s = TcpStream::connect(addr).expect("connect");
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO)).expect("SO_LINGER 0");
        drop(s); // RST, maybe while the answer is being written
        if i % 64 == 63 {
            wait_accepted(addr);
        }
    }
    // A flood of connections that say nothing.
    let mut idle: Vec<TcpStream> = Vec::new();
    while idle.len() < 500 {
        for _ in 0..50 {
            idle.push(TcpStream::connect(addr).expect("connect"));
        }
        wait_accepted(addr);
    }

    // Still serving, still cycling, still reaping, memory bounded, no cycle errors.
    let (mut client, _) = fx.close_wait(0);
    let reaped = "cwreap_reaped_total{target=\"t\",action=\"shutdown\",outcome=\"reaped\"}";
    let text = scrape_until(
        addr,
        "a reap during the abuse",
        || d.log(),
        |t| sample(t, reaped) == Some(1.0) && cycles(t) >= c0 + 5.0,
    );
    assert!(reads_eof(&mut client, Duration::from_secs(5)));
    assert!(
        !text.contains("cwreap_cycle_errors_total{"),
        "metrics clients caused cycle errors:\n{text}"
    );
    let rss1 = rss_kib(d.pid().as_raw_nonzero().get());
    assert!(
        rss1 < rss0 + 8 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB under abusive clients"
    );
    drop(idle);
    assert_eq!(
        d.terminate(Duration::from_secs(5)).0.code(),
        Some(0),
        "{}",
        d.log()
    );
    assert!(!d.lines().join("\n").contains("panicked"), "{}", d.log());
}

/// `n` connections to `addr` that say nothing, paced: the listen backlog is finite, and a
/// dropped SYN costs a 1 s retry.
fn idle_flood(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut idle = Vec::with_capacity(n);
    while idle.len() < n {
        for _ in 0..64 {
            idle.push(TcpStream::connect(addr).expect("connect"));
        }
        wait_accepted(addr);
    }
    idle
}

/// Scrape the endpoint on `addr` until daemon `dpid` holds at most 2 fds and `kib` KiB of
/// anonymous memory more than `before` (fds, KiB), or a minute has passed: its fds and
/// RssAnon then.
fn given_back(addr: SocketAddr, dpid: i32, before: (usize, u64), kib: u64) -> (usize, u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let _ = scrape(addr);
        let (f, r) = (fd_count(dpid), anon_kib(dpid));
        if (f <= before.0 + 2 && r <= before.1 + kib) || Instant::now() > deadline {
            return (f, r);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Wait until the listener on `addr` has no connection waiting to be accepted.
fn wait_accepted(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listener = Ss::new()
            .without_processes()
            .state("listening")
            .sport(addr.port())
            .run();
        if listener.first().is_some_and(|l| l.recv_q == 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the endpoint stopped accepting: {listener:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn a_flood_of_metrics_connections_is_capped_and_leaves_nothing_behind() {
    const FLOOD: usize = 2000;
    let bins = Bins::new("metrics-flood");
    let mut fx = Fixture::start(&[V4], &[]);
    let addr = free_addr();
    let cfg = bins.policy(&run_policy(addr, &[("t", fx.pid())]));
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    // systemd's default soft limit; the hard one stays as it is. The flood is bigger.
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .expect("a finite hard fd limit");
    assert!(
        hard > FLOOD as u64 + 256,
        "hard fd limit {hard} too low for this test"
    );
    // Our side of the flood needs the fds too.
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    )
    .expect("raise our soft fd limit");
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile=1024:{hard}"))
        .arg(cwreap_bin())
        .arg("run")
        .arg("--config")
        .arg(&cfg);
    let mut d = start(cmd);
    let dpid = d.pid().as_raw_nonzero().get();
    // The baseline: a few cycles and scrapes in, and a flood before. The first flood
    // grows, once, what is sized to the most connections seen (the runtime's I/O
    // registrations, an allocator arena: 2.0-2.3 MiB of anonymous memory, which made a
    // baseline before any flood fail now and then); that growth is bounded below, and a
    // later flood must give back all it took.
    for _ in 0..5 {
        scrape_until(addr, "a scrape", || d.log(), |t| cycles(t) >= 2.0);
    }
    let (fds_start, rss_start) = (fd_count(dpid), anon_kib(dpid));
    drop(idle_flood(addr, FLOOD));
    scrape_until(
        addr,
        "a scrape after the first flood",
        || d.log(),
        |t| cycles(t) >= 2.0,
    );
    let (fds0, rss0) = given_back(addr, dpid, (fds_start, rss_start), 3072);
    eprintln!("first flood: fds {fds_start} -> {fds0}, anonymous rss {rss_start} -> {rss0} KiB");
    assert!(
        fds0 <= fds_start + 2,
        "fds {fds_start} before the first flood, {fds0} after"
    );
    assert!(
        rss0 <= rss_start + 3072,
        "RssAnon {rss_start} KiB before the first flood, {rss0} KiB after"
    );

    // Connections that say nothing, more than the daemon's soft fd limit.
    let mut idle = idle_flood(addr, FLOOD);
    let fds1 = fd_count(dpid);
    assert!(
        fds1 <= fds0 + cwreap::daemon::endpoint::MAX_CLIENTS + 8,
        "the daemon holds {fds1} fds during the flood, {fds0} before"
    );
    // Cycles still run and act while the flood is connected.
    let (mut client, _) = fx.close_wait(0);
    d.wait_line("a reap during the flood", LOG_WAIT, |l| {
        l.contains("close_wait action") && l.contains("\"outcome\":\"reaped\"")
    });
    assert!(reads_eof(&mut client, Duration::from_secs(5)));
    // Connections beyond the cap were closed at once: their clients read EOF.
    let mut closed = 0;
    for s in idle.iter_mut() {
        s.set_nonblocking(true).expect("nonblocking");
        if matches!(s.read(&mut [0u8; 1]), Ok(0)) {
            closed += 1;
        }
    }
    assert!(
        closed >= FLOOD - cwreap::daemon::endpoint::MAX_CLIENTS,
        "only {closed} of {FLOOD} connections were closed"
    );
    // A scrape answers (at the latest once the held clients' deadline has passed), and
    // says how many were refused.
    let text = scrape_until(
        addr,
        "a scrape after the flood",
        || d.log(),
        |t| {
            sample(t, "cwreap_metrics_refused_connections_total")
                .is_some_and(|n| n >= (FLOOD - cwreap::daemon::endpoint::MAX_CLIENTS) as f64)
        },
    );
    assert!(
        !text.contains("cwreap_cycle_errors_total{"),
        "cycle errors during the flood:\n{text}"
    );
    assert!(
        !d.lines().join("\n").contains("Too many open files"),
        "{}",
        d.log()
    );
    drop(idle);

    // Everything the flood cost is given back: fds, and resident memory.
    let (fds2, rss2) = given_back(addr, dpid, (fds0, rss0), 1024);
    eprintln!("flood: fds {fds0} -> {fds1} -> {fds2}, anonymous rss {rss0} -> {rss2} KiB");
    assert!(
        fds2 <= fds0 + 2,
        "fds {fds0} before the flood, {fds2} after"
    );
    assert!(
        rss2 <= rss0 + 1024,
        "RssAnon {rss0} KiB before the flood, {rss2} KiB after ({fds1} fds during)"
    );
    assert_eq!(
        d.terminate(Duration::from_secs(5)).0.code(),
        Some(0),
        "{}",
        d.log()
    );
}
