//! `cwreap run` as a child: [`Running`] collects its log line by line and drives it by
//! signals; [`LoggedDaemon`] adds a private directory for its policy; [`Notify`] is the
//! socket its sd_notify messages go to. Killed on drop, every one.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use serde_json::Value;

use crate::HANG_GUARD;
use crate::bpffs::PrivateBpf;
use crate::fold::fold_log;
use crate::programs::cwreap_bin;
use crate::scratch::write_policy;

/// A running `cwreap run`, its stderr collected line by line; killed on drop.
pub struct Running {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    /// Its private BPF filesystem ([`Running::prepare`]); unmounted after the daemon died.
    bpf: Option<PrivateBpf>,
}

thread_local! {
    /// The private BPF filesystem [`Running::prepare`] made, until [`Running::attach`]
    /// takes it for the child started from that command.
    static PREPARED_BPF: std::cell::RefCell<Option<PrivateBpf>> =
        const { std::cell::RefCell::new(None) };
}

impl Running {
    /// Spawn without waiting for anything (for start-up failures), with `env` added to the
    /// environment [`Running::prepare`] leaves.
    pub fn spawn(config: &Path, args: &[&str], env: &[(&str, OsString)]) -> Running {
        let mut cmd = Command::new(cwreap_bin());
        cmd.arg("run").arg("--config").arg(config).args(args);
        Running::prepare(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Running::attach(cmd.spawn().expect("spawn cwreap run"))
    }

    /// Make `cmd` (`cwreap run`, perhaps behind another program) run as every daemon test
    /// runs it: without the service manager's variables or RUST_LOG of the test's own
    /// environment, its pins in a private BPF filesystem ([`PrivateBpf`], never the host's
    /// /sys/fs/bpf), stdin and stdout null, stderr piped for the log. Call
    /// [`Running::attach`] on the child, on the same thread.
    pub fn prepare(cmd: &mut Command) -> &mut Command {
        for var in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "JOURNAL_STREAM",
            "INVOCATION_ID",
            "RUST_LOG",
        ] {
            cmd.env_remove(var);
        }
        // Its first sights go to a directory of its own, not to the host's /run/cwreap,
        // where the command line of other tests (and of people) would read them.
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        cmd.env(
            "CWREAP_RUN_DIR",
            std::env::temp_dir().join(format!("cwreap-run-{}-{n}", std::process::id())),
        );
        let bpf = PrivateBpf::new();
        bpf.apply(cmd);
        PREPARED_BPF.with(|p| *p.borrow_mut() = Some(bpf));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
    }

    /// Collect the log of a child started from a [`Running::prepare`]d command.
    pub fn attach(mut child: Child) -> Running {
        let stderr = child.stderr.take().expect("daemon stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("log lock").push(line);
            }
        });
        Running {
            child,
            lines,
            reader: Some(reader),
            bpf: PREPARED_BPF.with(|p| p.borrow_mut().take()),
        }
    }

    /// The private BPF filesystem its pins go to (`CWREAP_BPF_DIR`), unless the test
    /// started it some other way.
    pub fn bpf(&self) -> Option<&PrivateBpf> {
        self.bpf.as_ref()
    }

    /// Spawn and wait until the signal handlers are in place ("cwreap started").
    pub fn start(config: &Path, args: &[&str], env: &[(&str, OsString)]) -> Running {
        Running::spawn(config, args, env).started()
    }

    /// Wait until the signal handlers are in place ("cwreap started").
    pub fn started(mut self) -> Running {
        self.wait_line("the start-up line", Duration::from_secs(10), |l| {
            l.contains("cwreap started")
        });
        self
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32).expect("daemon pid")
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("log lock").clone()
    }

    /// The log for a failure message (folded, at most 50 lines).
    pub fn log(&self) -> String {
        fold_log(&self.lines())
    }

    /// The JSON log (`log_format: json`): one object per line.
    pub fn events(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// Poll the log until `f` finds what it wants; panic with the log on timeout or exit.
    pub fn wait_lines<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&[String]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = f(&self.lines()) {
                return t;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.join_reader();
                if let Some(t) = f(&self.lines()) {
                    return t;
                }
                panic!(
                    "daemon exited ({status}) before {what}; its log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; daemon log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first line `pred` accepts, once there is one (see [`Running::wait_lines`]).
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        self.wait_lines(what, timeout, |lines| {
            lines.iter().find(|l| pred(l)).cloned()
        })
    }

    /// Like [`Running::wait_lines`], on the JSON events.
    pub fn wait_events<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&[Value]) -> Option<T>,
    ) -> T {
        self.wait_lines(what, timeout, |lines| {
            let events: Vec<Value> = lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .collect();
            f(&events)
        })
    }

    /// Poll `ready` on the daemon until it holds; panic with the log when the daemon exits
    /// or `guard` passes first.
    pub fn wait_until(
        &mut self,
        what: &str,
        guard: Duration,
        mut ready: impl FnMut(&Running) -> bool,
    ) {
        let deadline = Instant::now() + guard;
        loop {
            if ready(self) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.join_reader();
                panic!(
                    "daemon exited ({status}) before {what}; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {guard:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn signal(&self, sig: Signal) {
        rustix::process::kill_process(self.pid(), sig).expect("signal the daemon");
    }

    /// Wait for the reader thread: every line the daemon wrote is collected.
    pub fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    /// Wait up to `timeout` for the daemon to exit; the whole log is collected on return.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.join_reader();
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, and insist on a clean exit.
    pub fn stop(&mut self) {
        self.signal(Signal::TERM);
        let status = self
            .wait_exit(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("daemon ignored SIGTERM; log:\n{}", self.log()));
        assert!(
            status.success(),
            "daemon exited {status}; log:\n{}",
            self.log()
        );
    }

    /// SIGKILL, and collect the rest of the log.
    pub fn kill(&mut self) {
        self.signal(Signal::KILL);
        let _ = self.child.wait();
        self.join_reader();
    }

    /// SIGTERM; the exit status and how long the daemon took. Panics after `guard`.
    pub fn terminate(&mut self, guard: Duration) -> (ExitStatus, Duration) {
        let sent = Instant::now();
        self.signal(Signal::TERM);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let took = sent.elapsed();
                self.join_reader();
                return (status, took);
            }
            assert!(
                sent.elapsed() < guard,
                "still running {guard:?} after SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `cwreap run` child with its policy in a private directory (mode 0700) under the temp
/// dir, its log kept for failure messages (see [`Running`]); killed on drop and its
/// directory removed.
pub struct LoggedDaemon {
    pub daemon: Running,
    pub dir: PathBuf,
}

impl LoggedDaemon {
    /// Start `cwreap run` on `yaml`; `{dir}` in it is replaced by the private directory.
    pub fn start(name: &str, yaml: &str) -> LoggedDaemon {
        Self::start_with(name, yaml, |_, _| {})
    }

    /// Like [`LoggedDaemon::start`]; `adjust` may change the command (an environment
    /// variable, a parent-death signal) and use the directory before the daemon runs.
    pub fn start_with(
        name: &str,
        yaml: &str,
        adjust: impl FnOnce(&Path, &mut Command),
    ) -> LoggedDaemon {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cwreap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let cfg = dir.join("cwreap.yaml");
        write_policy(&cfg, &yaml.replace("{dir}", &dir.to_string_lossy()));
        let mut cmd = Command::new(cwreap_bin());
        cmd.arg("run").arg("--config").arg(&cfg);
        Running::prepare(&mut cmd);
        adjust(&dir, &mut cmd);
        let daemon = Running::attach(cmd.spawn().expect("spawn cwreap run"));
        LoggedDaemon { daemon, dir }
    }

    pub fn pid(&self) -> i32 {
        self.daemon.child.id() as i32
    }

    /// Replace the policy (`{dir}` as in [`LoggedDaemon::start`]) and SIGHUP the daemon.
    pub fn reload(&self, yaml: &str) {
        write_policy(
            &self.dir.join("cwreap.yaml"),
            &yaml.replace("{dir}", &self.dir.to_string_lossy()),
        );
        self.daemon.signal(Signal::HUP);
    }

    pub fn lines(&self) -> Vec<String> {
        self.daemon.lines()
    }

    /// The log for a failure message: folded and cut.
    pub fn log(&self) -> String {
        format!("--- cwreap run log:\n{}", fold_log(&self.lines()))
    }

    /// The audit log (`audit_log: {dir}/audit.jsonl`), one JSON object per line.
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait for `f` to hold on the daemon (polled); fails with the log on the hang guard
    /// or when the daemon exits.
    pub fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&LoggedDaemon) -> Option<T>) -> T {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if let Ok(Some(status)) = self.daemon.child.try_wait() {
                self.daemon.join_reader(); // the rest of its log
                panic!("cwreap run exited ({status}) before {what}\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "gave up waiting for {what} after {HANG_GUARD:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LoggedDaemon {
    fn drop(&mut self) {
        let _ = self.daemon.child.kill();
        let _ = self.daemon.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The receiving end of NOTIFY_SOCKET. A thread reads every datagram as it comes: the
/// socket queue is short (net.unix.max_dgram_qlen, 10 here) and a full one blocks the
/// daemon's send.
pub struct Notify {
    path: PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
    /// How many of `got` the test has looked at.
    seen: usize,
    done: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Notify {
    pub fn bind(path: impl Into<PathBuf>) -> Notify {
        let path = path.into();
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("notify timeout");
        let got = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let (sink, stop) = (got.clone(), done.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.lock()
                        .expect("notify lock")
                        .push((Instant::now(), msg));
                }
            }
        });
        Notify {
            path,
            got,
            seen: 0,
            done,
            reader: Some(reader),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The variable that sends a daemon's messages here.
    pub fn env(&self) -> (&'static str, OsString) {
        ("NOTIFY_SOCKET", self.path.clone().into_os_string())
    }

    /// Every datagram so far, with the time it arrived.
    pub fn all(&self) -> Vec<(Instant, String)> {
        self.got.lock().expect("notify lock").clone()
    }

    /// The next datagram not looked at yet, if one comes before `deadline`.
    pub fn next(&mut self, deadline: Instant) -> Option<String> {
        loop {
            if let Some((_, m)) = self.got.lock().expect("notify lock").get(self.seen) {
                self.seen += 1;
                return Some(m.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Skip what came already, so later waits only see what comes next.
    pub fn skip(&mut self) {
        self.seen = self.got.lock().expect("notify lock").len();
    }

    /// Wait for `n` STATUS= messages (one per finished cycle) sent from now on, and return
    /// them. The last one comes from a cycle that started after the first one was sent.
    pub fn cycles(&mut self, n: usize) -> Vec<String> {
        self.skip();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n {
            let msg = self
                .next(deadline)
                .unwrap_or_else(|| panic!("only {} of {n} STATUS messages came", out.len()));
            if let Some(s) = status_of(&msg) {
                out.push(s.to_owned());
            }
        }
        out
    }

    /// Every STATUS= text received so far (one per finished cycle).
    pub fn statuses(&self) -> Vec<String> {
        self.all()
            .iter()
            .filter_map(|(_, m)| status_of(m).map(str::to_owned))
            .collect()
    }

    /// When READY=1 arrived, if it did.
    pub fn ready_at(&self) -> Option<Instant> {
        self.all()
            .into_iter()
            .find_map(|(t, m)| m.lines().any(|l| l == "READY=1").then_some(t))
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// The STATUS= text of an sd_notify message, if it has one.
pub fn status_of(msg: &str) -> Option<&str> {
    msg.lines().find_map(|l| l.strip_prefix("STATUS="))
}
