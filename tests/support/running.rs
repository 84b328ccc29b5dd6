//! A `cwreap run` child started on a given policy file, its stderr collected line by line
//! by a thread; killed on drop. For the daemon tests that drive it by signals, its log and
//! its exit.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use serde_json::Value;

use super::{CWREAP, fold_log};

/// A running `cwreap run`, its stderr collected line by line; killed on drop.
pub struct Running {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Running {
    /// Spawn without waiting for anything (for start-up failures), with `env` added to the
    /// environment [`Running::prepare`] leaves.
    pub fn spawn(config: &Path, args: &[&str], env: &[(&str, OsString)]) -> Running {
        let mut cmd = Command::new(CWREAP);
        cmd.arg("run").arg("--config").arg(config).args(args);
        Running::prepare(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Running::attach(cmd.spawn().expect("spawn cwreap run"))
    }

    /// Make `cmd` (`cwreap run`, perhaps behind another program) run as every daemon test
    /// runs it: without the service manager's variables or RUST_LOG of the test's own
    /// environment, stdin and stdout null, stderr piped for the log.
    pub fn prepare(cmd: &mut Command) -> &mut Command {
        for var in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "JOURNAL_STREAM",
            "RUST_LOG",
        ] {
            cmd.env_remove(var);
        }
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
        }
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
