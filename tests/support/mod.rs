//! Shared helpers for the integration tests: the leaky server fixture, clients, `ss`, and
//! the root/CI gate.
#![allow(dead_code)]

mod fold;
mod running;

#[allow(unused_imports)]
pub use fold::{fold, fold_log};
#[allow(unused_imports)]
pub use running::Running;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub const CWREAP: &str = env!("CARGO_BIN_EXE_cwreap");
pub const FIXTURE: &str = env!("CARGO_BIN_EXE_cwreap-fixture");

/// Tests that act on other processes need root (CAP_SYS_PTRACE). In CI they must run, so
/// a missing privilege fails there; elsewhere they skip with a printed reason.
pub fn require_root(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    skip_or_fail(test, "needs root (CAP_SYS_PTRACE); run the suite as root");
    false
}

/// A test cannot run here (no root, a missing tool): in CI (`CI=true`) that fails the test;
/// elsewhere it prints a visible `SKIP test: why` line. Written to stderr directly, because
/// libtest captures `eprintln!`.
pub fn skip_or_fail(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {why}, and CI=true forbids skipping");
    }
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

/// Lines a child prints on `reader`, delivered by a background thread.
pub fn lines_of(reader: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running `cwreap-fixture server`, killed on drop.
pub struct Fixture {
    pub child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    pub listen: Vec<SocketAddr>,
    /// Every line read from the fixture so far, in order.
    pub history: Vec<String>,
}

impl Fixture {
    pub fn start(listen: &[&str], extra: &[&str]) -> Fixture {
        Self::start_in(None, listen, extra)
    }

    /// Start the server inside network namespace `netns` (`ip netns exec` keeps the pid).
    pub fn start_in(netns: Option<&str>, listen: &[&str], extra: &[&str]) -> Fixture {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, FIXTURE]);
                c
            }
            None => Command::new(FIXTURE),
        };
        cmd.arg("server");
        for l in listen {
            cmd.args(["--listen", l]);
        }
        cmd.args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn cwreap-fixture");
        let stdin = child.stdin.take().expect("fixture stdin");
        let stdout = child.stdout.take().expect("fixture stdout");
        let rx = lines_of(stdout);
        let mut f = Fixture {
            child,
            stdin,
            lines: rx,
            listen: Vec::new(),
            history: Vec::new(),
        };
        loop {
            let line = f.next_line();
            if let Some(addr) = line.strip_prefix("listen ") {
                f.listen.push(addr.parse().expect("listen address"));
            } else if line == "ready" {
                break;
            }
        }
        f
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn next_line(&mut self) -> String {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("fixture said nothing for 10 s");
        self.history.push(line.clone());
        line
    }

    /// Wait for a line starting with `prefix` (skipping others) and return the rest.
    pub fn expect_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let line = self.next_line();
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim().to_string();
            }
            assert!(!line.starts_with("error"), "fixture: {line}");
        }
        panic!("fixture never said {prefix}");
    }

    /// Wait for a line starting with `prefix` for up to `wait`; None if it did not come.
    pub fn maybe_line(&mut self, prefix: &str, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            self.history.push(line.clone());
            if let Some(rest) = line.strip_prefix(prefix) {
                return Some(rest.trim().to_string());
            }
        }
    }

    pub fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("write to fixture");
        self.stdin.flush().expect("flush fixture stdin");
    }

    /// Connect to listener `idx`; returns the client and the server-side fd.
    pub fn connect(&mut self, idx: usize) -> (TcpStream, i32) {
        let client = TcpStream::connect(self.listen[idx]).expect("connect to fixture");
        let local = client.local_addr().expect("client addr");
        loop {
            let rest = self.expect_line("accepted ");
            let mut w = rest.split_whitespace();
            let fd: i32 = w.next().and_then(|v| v.parse().ok()).expect("fd");
            let _server_local = w.next();
            let remote: SocketAddr = w.next().and_then(|v| v.parse().ok()).expect("remote");
            if remote == local {
                return (client, fd);
            }
        }
    }

    /// A client that half-closes: the server side goes to CLOSE_WAIT (the fixture never
    /// closes). Returns the client (still open for reading) and the server fd.
    pub fn close_wait(&mut self, idx: usize) -> (TcpStream, i32) {
        let (client, fd) = self.connect(idx);
        client.shutdown(Shutdown::Write).expect("half-close");
        let eof_fd: i32 = self.expect_line("eof ").parse().expect("eof fd");
        assert_eq!(eof_fd, fd, "EOF on an unexpected fd");
        (client, fd)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Read until the connection ends or `wait` passes without data: Ok on EOF, else the
/// error that ended the read (WouldBlock/TimedOut on the timeout, ConnectionReset on RST).
fn read_to_end_within(client: &mut TcpStream, wait: Duration) -> std::io::Result<()> {
    client
        .set_read_timeout(Some(wait))
        .expect("set read timeout");
    let mut buf = [0u8; 64];
    loop {
        match client.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether the peer sees EOF within `wait` (the socket was shut down on the other end).
/// A reset is also the end of the connection.
pub fn reads_eof(client: &mut TcpStream, wait: Duration) -> bool {
    match read_to_end_within(client, wait) {
        Ok(()) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Whether an ESTABLISHED connection to the echoing fixture still works both ways.
pub fn echoes(client: &mut TcpStream) -> bool {
    let msg = b"ping";
    if client.write_all(msg).is_err() {
        return false;
    }
    let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).is_ok() && &buf == msg
}

/// One line of `ss -tanpH state close-wait` held by `pid`: (fd, local, peer).
pub fn ss_close_wait(pid: i32) -> BTreeSet<(i32, SocketAddr, SocketAddr)> {
    let out = Command::new("ss")
        .args(["-tanpH", "state", "close-wait"])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss failed: {:?}", out);
    parse_ss(&String::from_utf8_lossy(&out.stdout), pid)
}

/// Count of sockets of `pid` in `state` according to ss (e.g. "established", "listening").
pub fn ss_count(pid: i32, state: &str) -> usize {
    let out = Command::new("ss")
        .args(["-tanpH", "state", state])
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .count()
}

pub fn parse_ss(text: &str, pid: i32) -> BTreeSet<(i32, SocketAddr, SocketAddr)> {
    let mut set = BTreeSet::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 5 {
            continue;
        }
        let (Ok(local), Ok(peer)) = (cols[2].parse::<SocketAddr>(), cols[3].parse::<SocketAddr>())
        else {
            continue;
        };
        let users = cols[4..].join(" ");
        for part in users.split("),(") {
            let field = |key: &str| -> Option<i32> {
                let start = part.find(key)? + key.len();
                let digits: String = part[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                digits.parse().ok()
            };
            if let (Some(p), Some(fd)) = (field("pid="), field("fd="))
                && p == pid
            {
                set.insert((fd, local, peer));
            }
        }
    }
    set
}

pub fn cwreap(args: &[&str]) -> Output {
    Command::new(CWREAP)
        .args(args)
        .output()
        .expect("run cwreap")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Parse `--json` output: one object per line.
pub fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

pub fn field_i64(v: &serde_json::Value, key: &str) -> i64 {
    v[key]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer {key} in {v}"))
}

pub fn field_str<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key} in {v}"))
}

/// A network namespace of our own (`ip netns add`), deleted on drop even when a test fails.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(tag: &str) -> Netns {
        let name = format!("cwreap-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        let out = Command::new("ip")
            .args(["-n", &ns.name, "link", "set", "lo", "up"])
            .output()
            .expect("run ip link");
        assert!(
            out.status.success(),
            "lo up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns
    }

    /// `ss -tanpH state close-wait` inside the namespace, for `pid`.
    pub fn ss_close_wait(&self, pid: i32) -> BTreeSet<(i32, SocketAddr, SocketAddr)> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "ss",
                "-tanpH",
                "state",
                "close-wait",
            ])
            .output()
            .expect("run ss in netns");
        assert!(out.status.success(), "ss in netns failed: {out:?}");
        parse_ss(&String::from_utf8_lossy(&out.stdout), pid)
    }

    /// Half-closing clients inside the namespace: a `cwreap-fixture client` process.
    pub fn clients(&self, addr: SocketAddr, count: usize) -> Clients {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, FIXTURE, "client"])
            .arg(addr.to_string())
            .arg(count.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn client in netns");
        let stdout = child.stdout.take().expect("client stdout");
        let rx = lines_of(stdout);
        let c = Clients { child, lines: rx };
        let first = c
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("client started");
        assert!(first.starts_with("half-closed"), "client: {first}");
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A `cwreap-fixture client` process; killed on drop.
pub struct Clients {
    child: Child,
    lines: Receiver<String>,
}

impl Clients {
    /// Collect `eof N` / `reset N` lines for up to `wait`, until `n` arrived.
    pub fn ends(&self, n: usize, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match self.lines.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Inode of the network namespace of `pid` ("self" for us).
pub fn netns_of(pid: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .expect("ns/net")
        .ino()
}

/// Whether the peer sees a reset (SOCK_DESTROY sends an RST) within `wait`.
pub fn reads_reset(client: &mut TcpStream, wait: Duration) -> bool {
    read_to_end_within(client, wait).is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
}

/// A `cwreap run` child with its policy in a private temp dir; killed on drop.
pub struct Daemon {
    pub child: Child,
    pub dir: std::path::PathBuf,
}

impl Daemon {
    pub fn start(name: &str, yaml: &str) -> Daemon {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cwreap-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let cfg = dir.join("cwreap.yaml");
        std::fs::write(&cfg, yaml).expect("write config");
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let child = Command::new(CWREAP)
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cwreap run");
        Daemon { child, dir }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Upper bound of the waits of [`wait_until`]: only a guard against hangs, never what a
/// test decides by.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// Poll `f` until it gives a value; on [`HANG_GUARD`], panic with `what` and `context()`.
pub fn wait_until<T>(
    what: &str,
    context: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what} after {HANG_GUARD:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CLOSE_WAIT sockets whose local port is `port`, whoever holds them (`ss` finds owners
/// through /proc/PID/fd, which is empty for a process whose main thread has exited).
pub fn ss_close_wait_on_port(port: u16) -> usize {
    let out = Command::new("ss")
        .args(["-tanH", "state", "close-wait", &format!("sport = :{port}")])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// A `cwreap run` child with its policy in a private temp dir, its stderr kept for failure
/// messages (folded, see [`fold_log`]); killed on drop.
pub struct LoggedDaemon {
    pub daemon: Running,
    pub dir: std::path::PathBuf,
}

impl LoggedDaemon {
    /// Start `cwreap run` on `yaml`; `{dir}` in it is replaced by the private directory.
    pub fn start(name: &str, yaml: &str) -> LoggedDaemon {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cwreap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let cfg = dir.join("cwreap.yaml");
        std::fs::write(&cfg, yaml.replace("{dir}", &dir.to_string_lossy())).expect("write config");
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let daemon = Running::spawn(&cfg, &[], &[]);
        LoggedDaemon { daemon, dir }
    }

    pub fn pid(&self) -> i32 {
        self.daemon.child.id() as i32
    }

    /// Replace the policy (`{dir}` as in [`LoggedDaemon::start`]) and SIGHUP the daemon.
    pub fn reload(&self, yaml: &str) {
        std::fs::write(
            self.dir.join("cwreap.yaml"),
            yaml.replace("{dir}", &self.dir.to_string_lossy()),
        )
        .expect("rewrite policy");
        let pid = rustix::process::Pid::from_raw(self.pid()).expect("daemon pid");
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP");
    }

    pub fn lines(&self) -> Vec<String> {
        self.daemon.lines()
    }

    /// The log for a failure message: folded and cut.
    pub fn log(&self) -> String {
        format!("--- cwreap run log:\n{}", fold_log(&self.lines()))
    }

    /// The audit log (`audit_log: {dir}/audit.jsonl`), one JSON object per line.
    pub fn audit(&self) -> Vec<serde_json::Value> {
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

/// A private directory for one test (policy, audit log, sockets) under the temp dir, with
/// mode `mode`; removed on drop.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(test: &str, mode: u32) -> Scratch {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cwreap-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .expect("chmod scratch");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Write a policy the way root must keep it: owned by us (root), mode 0600.
pub fn write_policy(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("open policy");
    f.write_all(text.as_bytes()).expect("write policy");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600 policy");
}

/// Let this process (and the children it starts) use its hard fd limit.
pub fn raise_nofile() {
    use rustix::process::{Resource, Rlimit};
    let hard = rustix::process::getrlimit(Resource::Nofile).maximum;
    rustix::process::setrlimit(
        Resource::Nofile,
        Rlimit {
            current: hard,
            maximum: hard,
        },
    )
    .expect("raise RLIMIT_NOFILE to the hard limit");
}
