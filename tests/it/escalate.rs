//! The daemon's escalations on real leaky servers (Python, run as root): raise the soft fd
//! limit once, never at or below 1024; send one signal through the pidfd at the last
//! threshold, never to a process that reused the pid. Nothing here closes an fd inside a
//! target.

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::support::runtimes::{self, PYTHON};
use crate::support::*;
use cwreap_linux::kernel::{Effects, Linux};
use serde_json::Value;

const HANG_GUARD: Duration = Duration::from_secs(60);

/// A `leaky.py --mode thread` server started under `prlimit --nofile=SOFT:HARD`, holding
/// `fill` extra fds and `leaks` CLOSE_WAIT sockets.
struct Leaky {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    _clients: Vec<TcpStream>,
}

impl Leaky {
    fn start(
        test: &str,
        soft: u64,
        hard: u64,
        fill: usize,
        leaks: usize,
        extra: &[&str],
    ) -> Option<Leaky> {
        if !runtimes::have_python(test) {
            return None;
        }
        let mut child = Command::new("prlimit")
            .arg(format!("--nofile={soft}:{hard}"))
            .args([PYTHON, "-u"])
            .arg(runtimes::source("leaky.py"))
            .args(["--mode", "thread", "--fill"])
            .arg(fill.to_string())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start prlimit leaky.py");
        let lines = lines_of(child.stdout.take().expect("stdout"));
        let mut l = Leaky {
            child,
            lines,
            seen: Vec::new(),
            _clients: Vec::new(),
        };
        let addr: SocketAddr = l.wait_line("listen ").parse().expect("listen address");
        l.wait_line("ready");
        for _ in 0..leaks {
            let c = TcpStream::connect(addr).expect("connect");
            c.shutdown(Shutdown::Write).expect("half-close");
            l.wait_line("eof ");
            l._clients.push(c);
        }
        Some(l)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The rest of the first line starting with `prefix`.
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("leaky.py never said {prefix:?}: {:?}", self.seen));
            self.seen.push(line.clone());
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
    }

    /// Every line printed so far (without waiting).
    fn drain(&mut self) -> &[String] {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }
}

impl Drop for Leaky {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (soft, hard) from /proc/PID/limits.
fn nofile(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let l = cwreap_linux::procfs::parse_nofile(&text).expect("Max open files line");
    (l.soft.expect("finite soft"), l.hard.expect("finite hard"))
}

/// A `cwreap run` child with an audit log, counting its cycles through NOTIFY_SOCKET.
struct Run {
    // Declared first, dropped first: the daemon is killed before its directory goes.
    daemon: Running,
    dir: Scratch,
    notify: UnixDatagram,
    cycles: usize,
}

impl Run {
    fn start(tag: &str, targets: &str) -> Run {
        let dir = Scratch::new(&format!("esc-{tag}"), 0o700);
        let audit = dir.path("audit.jsonl");
        let cfg = dir.path("cwreap.yaml");
        write_policy(
            &cfg,
            &format!(
                "interval: 200ms\ndry_run: false\naudit_log: {}\nmetrics: {{listen: off}}\ntargets:\n{targets}",
                audit.display()
            ),
        );
        let sock = dir.path("notify");
        let notify = UnixDatagram::bind(&sock).expect("notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let daemon = Running::spawn(&cfg, &[], &[("NOTIFY_SOCKET", sock.into_os_string())]);
        Run {
            daemon,
            dir,
            notify,
            cycles: 0,
        }
    }

    /// Count the STATUS= messages (one per cycle) that arrived.
    fn pump(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("STATUS=") {
                self.cycles += 1;
            }
        }
        if let Ok(Some(st)) = self.daemon.child.try_wait() {
            self.daemon.join_reader();
            panic!("cwreap run exited: {st}\n{}", self.daemon.log());
        }
    }

    /// Until `done()` holds, pumping cycles; fails after the hang guard.
    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Run) -> bool) {
        let deadline = Instant::now() + HANG_GUARD;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {HANG_GUARD:?}; audit: {:?}",
                self.escalations()
            );
            self.pump();
        }
    }

    /// `n` more cycles.
    fn cycles(&mut self, n: usize) {
        let want = self.cycles + n;
        self.until("more cycles", |r| r.cycles >= want);
    }

    fn escalations(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("audit line is JSON"))
            .filter(|v| v["event"] == "escalation")
            .collect()
    }

    fn count(&self, kind: &str, outcome: &str) -> usize {
        self.escalations()
            .iter()
            .filter(|v| v["kind"] == kind && v["outcome"] == outcome)
            .count()
    }
}

fn target(pid: i32, escalate: &str) -> String {
    format!(
        "  - name: leaky\n    match: {{pid: {pid}}}\n    older_than: 1h\n    action: log\n    escalate: {escalate}\n"
    )
}

#[test]
fn raises_the_soft_fd_limit_once_to_the_hard_limit() {
    let test = "raises_the_soft_fd_limit_once_to_the_hard_limit";
    // 900 filler fds + a few: over 80 % of 1100.
    let Some(server) = Leaky::start(test, 1100, 8192, 900, 3, &[]) else {
        return;
    };
    let pid = server.pid();
    assert_eq!(nofile(pid), (1100, 8192));
    let mut run = Run::start("raise", &target(pid, "{raise_fd_limit_at: 80%}"));
    run.until("the soft limit raised", |_| nofile(pid) == (8192, 8192));
    let done = run.escalations();
    assert_eq!(done.len(), 1, "{done:?}");
    let e = &done[0];
    assert_eq!(
        (e["kind"].as_str(), e["outcome"].as_str()),
        (Some("raise_fd_limit"), Some("done")),
        "{e}"
    );
    assert_eq!(e["pid"], i64::from(pid));
    assert_eq!(e["before"]["soft"], 1100, "{e}");
    assert_eq!(e["after"]["soft"], 8192, "{e}");
    assert_eq!(e["after"]["hard"], 8192, "{e}");

    // Once per process: put the limit back down and let several cycles pass.
    run_ok(Command::new("prlimit").args(["--pid", &pid.to_string(), "--nofile=1100:8192"]));
    run.cycles(8);
    assert_eq!(nofile(pid), (1100, 8192), "raised a second time");
    assert_eq!(run.count("raise_fd_limit", "done"), 1);
}

#[test]
fn never_raises_a_soft_limit_of_1024_or_less() {
    let test = "never_raises_a_soft_limit_of_1024_or_less";
    let Some(server) = Leaky::start(test, 1000, 8192, 870, 3, &[]) else {
        return;
    };
    let pid = server.pid();
    let mut run = Run::start("low", &target(pid, "{raise_fd_limit_at: 80%}"));
    run.until("the decision not to raise", |r| {
        r.count("raise_fd_limit", "skipped") == 1
    });
    run.cycles(8);
    assert_eq!(nofile(pid), (1000, 8192), "the limit must stay");
    let all = run.escalations();
    assert_eq!(all.len(), 1, "said once: {all:?}");
    assert!(
        all[0]["why"].as_str().is_some_and(|w| w.contains("1024")),
        "{all:?}"
    );
}

#[test]
fn signals_exactly_once_at_the_last_threshold_and_the_process_exits() {
    let test = "signals_exactly_once_at_the_last_threshold_and_the_process_exits";
    // soft = hard: nothing to raise; 1050 + a few of 1100 is over 95 %.
    let Some(mut counting) = Leaky::start(test, 1100, 1100, 1050, 3, &["--on-term", "count"])
    else {
        return;
    };
    let Some(mut plain) = Leaky::start(test, 1100, 1100, 1050, 3, &[]) else {
        return;
    };
    let (a, b) = (counting.pid(), plain.pid());
    let esc = "{raise_fd_limit_at: 80%, signal_at: 95%}";
    let targets = format!(
        "{}  - name: plain\n    match: {{pid: {b}}}\n    older_than: 1h\n    action: log\n    escalate: {esc}\n",
        target(a, esc)
    );
    let mut run = Run::start("signal", &targets);
    run.until("both signalled", |r| r.count("signal", "done") == 2);
    // The plain server dies of it.
    let deadline = Instant::now() + HANG_GUARD;
    let status = loop {
        if let Some(st) = plain.child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the signalled process did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
    // The one that survives SIGTERM gets it exactly once, whatever the cycles after.
    run.cycles(10);
    let got = counting
        .drain()
        .iter()
        .filter(|l| l.as_str() == "signal 15")
        .count();
    assert_eq!(got, 1, "{:?}", counting.seen);
    assert_eq!(run.count("signal", "done"), 2, "{:?}", run.escalations());
    // Raising was settled as impossible (soft = hard) before signalling.
    assert_eq!(
        run.count("raise_fd_limit", "skipped"),
        2,
        "{:?}",
        run.escalations()
    );
}

/// The safety the daemon's signal rests on, against the hazard itself: a process pinned
/// with a pidfd dies, a newcomer gets its pid, and a signal through the pin fails (ESRCH)
/// instead of reaching the newcomer. The daemon's side (it signals only through the pin,
/// and a reused pid starts afresh) is a unit test on a recording kernel.
#[test]
#[ignore = "needs root: makes the kernel reuse a pid by writing /proc/sys/kernel/ns_last_pid"]
fn a_reused_pid_never_gets_a_signal_sent_through_the_pin() {
    let test = "a_reused_pid_never_gets_a_signal_sent_through_the_pin";
    let Some(mut old) = Leaky::start(test, 1100, 1100, 0, 0, &[]) else {
        return;
    };
    let pid = old.pid();
    let kernel = Linux::default();
    let pin = kernel.open_process(pid).expect("pidfd_open");
    let _ = old.child.kill();
    let _ = old.child.wait();
    drop(old);
    let Some(child) = spawn_as(pid, || {
        let mut c = Command::new(PYTHON);
        c.arg("-u")
            .arg(runtimes::source("leaky.py"))
            .args(["--mode", "thread", "--on-term", "count"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        c
    }) else {
        panic!("the test could not make the kernel reuse pid {pid}");
    };
    let mut child = child;
    let lines = lines_of(child.stdout.take().expect("stdout"));
    let mut newcomer = Leaky {
        child,
        lines,
        seen: Vec::new(),
        _clients: Vec::new(),
    };
    newcomer.wait_line("ready");
    assert_eq!(newcomer.pid(), pid, "the newcomer has the old pid");
    assert!(
        !kernel.alive(&pin),
        "the pin names the dead process, not the pid"
    );
    let sent = kernel.signal(&pin, libc::SIGTERM);
    assert_eq!(
        sent.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::ESRCH)),
        "{sent:?}"
    );
    // A marker signal after: a SIGTERM that got through would be printed first.
    let out = Command::new("kill")
        .args(["-WINCH", &pid.to_string()])
        .output()
        .expect("kill");
    assert!(out.status.success());
    newcomer.wait_line("signal 28");
    assert!(
        !newcomer.seen.iter().any(|l| l == "signal 15"),
        "the newcomer was signalled: {:?}",
        newcomer.seen
    );
    assert!(
        newcomer.child.try_wait().expect("wait").is_none(),
        "the newcomer died"
    );
}

/// Spawn `cmd` as pid `want` by setting the kernel's last allocated pid just below it,
/// retrying when another fork takes it first. None if it never worked.
fn spawn_as(want: i32, mut cmd: impl FnMut() -> Command) -> Option<Child> {
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (want - 1).to_string()).ok()?;
        let mut child = cmd().spawn().ok()?;
        if child.id() as i32 == want {
            return Some(child);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    None
}
