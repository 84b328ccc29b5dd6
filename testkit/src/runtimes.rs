//! Leaky TCP echo servers written in other runtimes (Python, Node, Java, Go, C; sources in
//! tests/runtimes/): build them once per test process, start one as a child process (killed
//! on drop), and speak its stdout protocol (the same as `cwreap-fixture server`): `listen
//! ADDR`, `ready`, `accepted FD LOCAL REMOTE`, `eof FD`, `released FD`, `error TEXT`.
//!
//! A runtime missing on the machine skips the test (a `SKIP test: reason` line on stderr),
//! except under `CI=true`, where it fails it (see [`crate::skip_or_fail`]). Every wait is
//! bounded by [`HANG_GUARD`]; a wait that runs out fails with the server's output, folded
//! and cut to about 50 lines.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::fold::fold;
use crate::gate::skip_or_fail as missing;
use crate::programs::{repo, target_tmpdir};

/// Upper bound of every wait: only a guard against hangs, never a pass/fail criterion.
pub const HANG_GUARD: Duration = Duration::from_secs(45);

/// Debian's python3 (the one CI installs, with urllib3), reachable by `nobody` (pyenv
/// shims are not).
pub const PYTHON: &str = "/usr/bin/python3";

/// A program of tests/runtimes/.
pub fn source(name: &str) -> PathBuf {
    repo().join("tests/runtimes").join(name)
}

/// Whether [`PYTHON`] is installed; if not, the test skips (or fails under `CI=true`).
pub fn have_python(test: &str) -> bool {
    let there = Path::new(PYTHON).is_file();
    if !there {
        missing(test, &format!("{PYTHON} is not installed"));
    }
    there
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// leaky.py --mode abandon: never reads a connection whose client left before sending
    /// anything (CLOSE_WAIT with recv_q 1).
    PythonAbandon,
    /// leaky.py --mode selectors: an epoll loop that keeps sockets at EOF registered.
    PythonSelectors,
    /// leaky.py --mode thread: a thread per connection that returns at EOF without close.
    PythonThread,
    /// leaky.js: `allowHalfOpen: true`, never ends a half-closed socket.
    Node,
    /// Leaky.java: a thread per connection, leaks the Socket at EOF (kept in a list).
    Java,
    /// Leaky.java --mode drop: the same, but drops the Socket at EOF (no reference left):
    /// the socket's Cleaner closes it after a collection finds it unreachable.
    JavaDrop,
    /// Leaky.java --mode hold: keeps each accepted Socket in a list, never reads it (the
    /// FIN stays unread, recv_q 1), never closes it; no `eof` line.
    JavaHold,
    /// leaky.go: a goroutine per connection, leaks the net.Conn at EOF.
    Go,
    /// leaky.c: a level-triggered epoll loop, keeps the fd registered at EOF.
    C,
    /// leaky.c --drop: the same loop, but at read()==0 it deletes the fd from its epoll set
    /// and forgets the connection without close().
    CDrop,
    /// http_paused.js: a Node http server whose handler never responds nor reads the body;
    /// Node pauses a connection whose request body fills its buffer (`paused FD`).
    NodeHttpPaused,
    /// leaky.c --dead-leader: the same loop on a thread of its own, after the main thread
    /// ended with pthread_exit() (a zombie thread-group leader, an empty /proc/PID/fd).
    CDeadLeader,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::PythonAbandon => "python-abandon",
            Runtime::PythonSelectors => "python-selectors",
            Runtime::PythonThread => "python-thread",
            Runtime::Node => "node",
            Runtime::Java => "java",
            Runtime::JavaDrop => "java-drop",
            Runtime::JavaHold => "java-hold",
            Runtime::Go => "go",
            Runtime::C => "c",
            Runtime::CDrop => "c-drop",
            Runtime::NodeHttpPaused => "node-http-paused",
            Runtime::CDeadLeader => "c-dead-leader",
        }
    }

    /// Whether the server closes a leaked fd once the socket is shut down from outside
    /// (it watches for EPOLLHUP and says `released FD`). The others keep holding it.
    pub fn releases_after_shutdown(self) -> bool {
        matches!(
            self,
            Runtime::PythonSelectors | Runtime::C | Runtime::CDeadLeader
        )
    }

    /// Whether the server reads the EOF of a half-closed connection (recv_q 0 afterwards).
    /// The abandoning server only peeks, so the FIN stays unread (recv_q 1), and the
    /// holding and paused servers never read it.
    pub fn reads_eof(self) -> bool {
        !matches!(
            self,
            Runtime::PythonAbandon | Runtime::JavaHold | Runtime::NodeHttpPaused
        )
    }
}

/// `name` on PATH, if any.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// What a build produced: a ready command prefix, a missing tool, or a failure.
#[derive(Clone, Debug)]
enum Built {
    Ready(Vec<String>),
    Missing(String),
    Failed(String),
}

/// This process's build directory, under the target's tmp directory, named by our pid (two
/// test processes may build at once). Directories of processes that are gone are removed.
fn build_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = target_tmpdir().join("runtimes");
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = root.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).expect("create the runtimes build directory");
        dir
    })
}

/// Run a compiler; Failed with its folded output when it does not succeed.
fn compile(what: &str, cmd: &mut Command) -> Result<(), Built> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Built::Failed(format!("{what}: cannot run: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Built::Failed(format!(
        "{what} failed ({}):\n{}{}",
        out.status,
        fold(&String::from_utf8_lossy(&out.stdout)),
        fold(&String::from_utf8_lossy(&out.stderr))
    )))
}

fn build_c() -> Built {
    let Some(gcc) = which("gcc") else {
        return Built::Missing("gcc is not installed".into());
    };
    let out = build_dir().join("leaky-c");
    let r = compile(
        "gcc leaky.c",
        Command::new(gcc)
            .args([
                "-std=c11", "-O2", "-pthread", "-Wall", "-Wextra", "-Werror", "-o",
            ])
            .arg(&out)
            .arg(source("leaky.c")),
    );
    match r {
        Ok(()) => Built::Ready(vec![out.to_string_lossy().into_owned()]),
        Err(b) => b,
    }
}

fn build_go() -> Built {
    let out = build_dir().join("leaky-go");
    match go_build("leaky.go", &out) {
        Ok(()) => Built::Ready(vec![out.to_string_lossy().into_owned()]),
        Err(b) => b,
    }
}

/// Build `source`, a Go program of tests/runtimes/, into `out`.
fn go_build(source: &str, out: &Path) -> Result<(), Built> {
    let Some(go) = which("go") else {
        return Err(Built::Missing("go is not installed".into()));
    };
    let dir = build_dir();
    // The Go build cache is shared between runs (it is safe for concurrent use); the rest
    // stays in our directory. Standard library only, and no network: GOPROXY=off.
    let shared = dir.parent().unwrap_or(dir);
    compile(
        &format!("go build {source}"),
        Command::new(go)
            .current_dir(dir)
            .env("GOCACHE", shared.join("gocache"))
            .env("GOPATH", dir.join("gopath"))
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0")
            .env_remove("GOFLAGS")
            .args(["build", "-o"])
            .arg(out)
            .arg(self::source(source)),
    )
}

fn build_java() -> Built {
    let (Some(javac), Some(java)) = (which("javac"), which("java")) else {
        return Built::Missing("javac or java is not installed (JDK 17)".into());
    };
    let classes = build_dir().join("java");
    let r = compile(
        "javac Leaky.java",
        Command::new(javac)
            .args(["-Xlint:all", "-Werror", "-d"])
            .arg(&classes)
            .arg(source("Leaky.java")),
    );
    match r {
        Ok(()) => Built::Ready(vec![
            java.to_string_lossy().into_owned(),
            // Leaky reads the fd number out of the socket's FileDescriptor by reflection.
            "--add-opens".into(),
            "java.base/java.net=ALL-UNNAMED".into(),
            "--add-opens".into(),
            "java.base/java.io=ALL-UNNAMED".into(),
            // Fewer JVM threads and a quicker start on small machines.
            "-XX:+UseSerialGC".into(),
            "-XX:TieredStopAtLevel=1".into(),
            "-Xmx128m".into(),
            "-cp".into(),
            classes.to_string_lossy().into_owned(),
            "Leaky".into(),
        ]),
        Err(b) => b,
    }
}

/// Build `source`, a C program of tests/runtimes/ other than the leaky server (e.g.
/// `rseq_spin.c`), with gcc into this process's build directory, once per test process.
/// None when gcc is missing and the test may skip (see [`missing`]); a failed build fails
/// the test.
pub fn c_program(test: &str, source: &str) -> Option<PathBuf> {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().expect("build lock");
    if let Some((_, path)) = built.iter().find(|(s, _)| s == source) {
        return Some(path.clone());
    }
    let Some(gcc) = which("gcc") else {
        missing(test, "gcc is not installed");
        return None;
    };
    let out = build_dir().join(source.trim_end_matches(".c"));
    let r = compile(
        &format!("gcc {source}"),
        Command::new(gcc)
            .args(["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&out)
            .arg(self::source(source)),
    );
    match r {
        Ok(()) => {
            built.push((source.to_string(), out.clone()));
            Some(out)
        }
        Err(Built::Failed(text) | Built::Missing(text)) => panic!("{test}: {text}"),
        Err(Built::Ready(_)) => panic!("{test}: building {source} said nothing"),
    }
}

/// Build `source`, a Go program of tests/runtimes/ other than the leaky server (e.g.
/// `hang_http.go`), into this process's build directory, once per test process. None when
/// go is missing and the test may skip (see [`missing`]); a failed build fails the test.
pub fn go_program(test: &str, source: &str) -> Option<PathBuf> {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().expect("build lock");
    if let Some((_, path)) = built.iter().find(|(s, _)| s == source) {
        return Some(path.clone());
    }
    let out = build_dir().join(source.trim_end_matches(".go"));
    match go_build(source, &out) {
        Ok(()) => {
            built.push((source.to_string(), out.clone()));
            Some(out)
        }
        Err(Built::Missing(why)) => {
            missing(test, &why);
            None
        }
        Err(Built::Failed(text)) => panic!("{test}: {text}"),
        Err(Built::Ready(_)) => panic!("{test}: building {source} said nothing"),
    }
}

/// `built` with `args` added to its command line.
fn with_args(built: &Built, args: &[&str]) -> Built {
    match built.clone() {
        Built::Ready(mut argv) => {
            argv.extend(args.iter().map(|a| a.to_string()));
            Built::Ready(argv)
        }
        other => other,
    }
}

/// Ask a JVM for a full collection (`jcmd PID GC.run`, what an operator would type), and
/// wait for jcmd to report it done. False when jcmd is missing and the test may skip (see
/// [`missing`]); a jcmd that fails fails the test.
pub fn jcmd_gc(test: &str, pid: i32) -> bool {
    let Some(jcmd) = which("jcmd") else {
        missing(test, "jcmd is not installed (it comes with the JDK)");
        return false;
    };
    let out = Command::new(jcmd)
        .args([&pid.to_string(), "GC.run"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{test}: cannot run jcmd: {e}"));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("Command executed successfully"),
        "{test}: jcmd {pid} GC.run failed ({}):\n{}{}",
        out.status,
        fold(&said),
        fold(&String::from_utf8_lossy(&out.stderr))
    );
    true
}

/// The command line that starts `rt` (building it on first use, once per test process).
fn command_for(rt: Runtime) -> Built {
    static C: OnceLock<Built> = OnceLock::new();
    static GO: OnceLock<Built> = OnceLock::new();
    static JAVA: OnceLock<Built> = OnceLock::new();
    let python = |mode: &str| {
        if Path::new(PYTHON).is_file() {
            Built::Ready(vec![
                PYTHON.into(),
                "-u".into(),
                source("leaky.py").to_string_lossy().into_owned(),
                "--mode".into(),
                mode.into(),
            ])
        } else {
            Built::Missing(format!("{PYTHON} is not installed"))
        }
    };
    match rt {
        Runtime::PythonAbandon => python("abandon"),
        Runtime::PythonSelectors => python("selectors"),
        Runtime::PythonThread => python("thread"),
        Runtime::Node => match which("node") {
            Some(node) => Built::Ready(vec![
                node.to_string_lossy().into_owned(),
                source("leaky.js").to_string_lossy().into_owned(),
            ]),
            None => Built::Missing("node is not installed".into()),
        },
        Runtime::NodeHttpPaused => match which("node") {
            Some(node) => Built::Ready(vec![
                node.to_string_lossy().into_owned(),
                source("http_paused.js").to_string_lossy().into_owned(),
            ]),
            None => Built::Missing("node is not installed".into()),
        },
        Runtime::Java => JAVA.get_or_init(build_java).clone(),
        Runtime::JavaDrop => with_args(JAVA.get_or_init(build_java), &["--mode", "drop"]),
        Runtime::JavaHold => with_args(JAVA.get_or_init(build_java), &["--mode", "hold"]),
        Runtime::Go => GO.get_or_init(build_go).clone(),
        Runtime::C => C.get_or_init(build_c).clone(),
        Runtime::CDrop => with_args(C.get_or_init(build_c), &["--drop"]),
        Runtime::CDeadLeader => with_args(C.get_or_init(build_c), &["--dead-leader"]),
    }
}

/// Lines of one output stream of the server, filled by a background reader thread.
#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    grew: Condvar,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// The stream reached EOF (the server exited or closed it).
    ended: bool,
}

impl Log {
    fn follow(reader: impl Read + Send + 'static) -> Arc<Log> {
        let log = Arc::new(Log::default());
        let l = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                let mut s = l.state.lock().expect("log lock");
                s.lines.push(line);
                l.grew.notify_all();
            }
            let mut s = l.state.lock().expect("log lock");
            s.ended = true;
            l.grew.notify_all();
        });
        log
    }

    fn lines(&self) -> Vec<String> {
        self.state.lock().expect("log lock").lines.clone()
    }

    fn len(&self) -> usize {
        self.state.lock().expect("log lock").lines.len()
    }
}

/// A running leaky server of one runtime; killed on drop.
pub struct Server {
    pub runtime: Runtime,
    child: Child,
    out: Arc<Log>,
    err: Arc<Log>,
    /// The listeners, in the order of `--listen`.
    pub listen: Vec<SocketAddr>,
}

impl Server {
    /// Start `rt` listening on each of `listen` (`127.0.0.1:0`, `[::1]:0`, ...) and wait for
    /// `ready`. None when the runtime is missing and the test may skip (see [`missing`]).
    pub fn start(test: &str, rt: Runtime, listen: &[&str]) -> Option<Server> {
        let argv = match command_for(rt) {
            Built::Ready(argv) => argv,
            Built::Missing(reason) => {
                missing(test, &reason);
                return None;
            }
            Built::Failed(text) => panic!("{test}: building the {} server: {text}", rt.name()),
        };
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        for l in listen {
            cmd.args(["--listen", l]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{test}: cannot start {argv:?}: {e}"));
        let out = Log::follow(child.stdout.take().expect("server stdout"));
        let err = Log::follow(child.stderr.take().expect("server stderr"));
        let mut server = Server {
            runtime: rt,
            child,
            out,
            err,
            listen: Vec::new(),
        };
        let (_, ready_at) = server.wait_line(0, "ready", |l| (l == "ready").then_some(()));
        for line in &server.out.lines()[..ready_at] {
            if let Some(addr) = line.strip_prefix("listen ") {
                let addr = addr
                    .parse()
                    .unwrap_or_else(|e| server.fail(&format!("bad listen line {line:?}: {e}")));
                server.listen.push(addr);
            }
        }
        if server.listen.len() != listen.len() {
            server.fail(&format!(
                "{} listen lines for {} listeners",
                server.listen.len(),
                listen.len()
            ));
        }
        Some(server)
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    /// Whether the server process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the server printed on stdout so far.
    pub fn lines(&self) -> Vec<String> {
        self.out.lines()
    }

    /// Number of stdout lines so far: a mark to look for events after it.
    pub fn mark(&self) -> usize {
        self.out.len()
    }

    /// The fds of every `released FD` line at or after `from`.
    pub fn released_since(&self, from: usize) -> Vec<i32> {
        self.out.lines()[from.min(self.out.len())..]
            .iter()
            .filter_map(|l| l.strip_prefix("released ")?.trim().parse().ok())
            .collect()
    }

    /// Every `error ...` line so far.
    pub fn errors(&self) -> Vec<String> {
        self.out
            .lines()
            .into_iter()
            .filter(|l| l.starts_with("error"))
            .collect()
    }

    /// The server's output for a failure message, folded and cut.
    pub fn transcript(&self) -> String {
        let mut s = format!(
            "--- {} server (pid {}) stdout:\n{}",
            self.runtime.name(),
            self.child.id(),
            fold(&self.out.lines().join("\n"))
        );
        let err = self.err.lines();
        if !err.is_empty() {
            s.push_str(&format!("--- stderr:\n{}", fold(&err.join("\n"))));
        }
        s
    }

    /// Fail the test with `msg` and the server's output.
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{}: {msg}\n{}", self.runtime.name(), self.transcript())
    }

    /// Wait for the first stdout line at index `from` or later that `pick` accepts; returns
    /// what `pick` made of it and the line's index. Fails if the server exits or after
    /// [`HANG_GUARD`].
    pub fn wait_line<T>(
        &mut self,
        from: usize,
        what: &str,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> (T, usize) {
        let deadline = Instant::now() + HANG_GUARD;
        let mut next = from;
        let mut state = self.out.state.lock().expect("log lock");
        loop {
            while next < state.lines.len() {
                if let Some(v) = pick(&state.lines[next]) {
                    return (v, next);
                }
                next += 1;
            }
            let now = Instant::now();
            if state.ended || now >= deadline {
                let ended = state.ended;
                drop(state);
                let status = if ended {
                    self.wait_exit()
                        .map_or("ended its stdout".into(), |s| format!("exited ({s})"))
                } else {
                    format!("said nothing matching within {HANG_GUARD:?}")
                };
                self.fail(&format!("waiting for {what}: the server {status}"));
            }
            state = self
                .out
                .grew
                .wait_timeout(state, deadline - now)
                .expect("log lock")
                .0;
        }
    }

    /// The exit status if the process ends within a few seconds (for failure messages).
    fn wait_exit(&mut self) -> Option<ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Connect to listener `idx`; returns the client, the server-side fd, and the index of
    /// the server's `accepted` line.
    pub fn connect_at(&mut self, idx: usize) -> (TcpStream, i32, usize) {
        let mark = self.mark();
        let addr = self.listen[idx];
        let client = TcpStream::connect_timeout(&addr, HANG_GUARD)
            .unwrap_or_else(|e| self.fail(&format!("connect to {addr}: {e}")));
        let me = client.local_addr().expect("client local address");
        let (fd, at) = self.wait_line(mark, &format!("accepted ... {me}"), |l| {
            let rest = l.strip_prefix("accepted ")?;
            let mut w = rest.split_whitespace();
            let fd: i32 = w.next()?.parse().ok()?;
            let _local = w.next()?;
            let remote: SocketAddr = w.next()?.parse().ok()?;
            (remote == me).then_some(fd)
        });
        if fd < 0 {
            self.fail(&format!("the server could not tell the fd of {me}"));
        }
        (client, fd, at)
    }

    /// Connect to listener `idx`; returns the client and the server-side fd.
    pub fn connect(&mut self, idx: usize) -> (TcpStream, i32) {
        let (client, fd, _) = self.connect_at(idx);
        (client, fd)
    }

    /// A client that half-closes, and waits until the server has seen the EOF (`eof FD`):
    /// the server side is then in CLOSE_WAIT. Returns the client (still open for reading)
    /// and the server fd.
    pub fn close_wait(&mut self, idx: usize) -> (TcpStream, i32) {
        let (client, fd, at) = self.connect_at(idx);
        client
            .shutdown(Shutdown::Write)
            .unwrap_or_else(|e| self.fail(&format!("half-close of fd {fd}'s client: {e}")));
        let want = format!("eof {fd}");
        self.wait_line(at + 1, &want, |l| (l == want).then_some(()));
        (client, fd)
    }

    /// Wait until `released FD` lines after `from` name every fd of `fds`.
    pub fn wait_released(&mut self, from: usize, fds: &BTreeSet<i32>) {
        let mut seen = BTreeSet::new();
        self.wait_line(from, &format!("released for each of {fds:?}"), |l| {
            if let Some(fd) = l
                .strip_prefix("released ")
                .and_then(|v| v.trim().parse().ok())
            {
                seen.insert(fd);
            }
            seen.is_superset(fds).then_some(())
        });
    }

    /// User plus system CPU time of the whole process, in clock ticks (/proc/PID/stat).
    pub fn cpu_ticks(&self) -> u64 {
        crate::procfs::cpu_ticks(self.pid())
            .unwrap_or_else(|| self.fail("no /proc/PID/stat: the server is gone"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send `token` on `client` and read back exactly as many bytes: Ok when they are the same
/// bytes, else Err with what came back (or the read error).
pub fn echo_token(client: &mut TcpStream, token: &[u8]) -> Result<(), String> {
    client.write_all(token).map_err(|e| format!("write: {e}"))?;
    read_token(client, token)
}

/// Read `token.len()` bytes and compare them with `token`.
pub fn read_token(client: &mut TcpStream, token: &[u8]) -> Result<(), String> {
    client
        .set_read_timeout(Some(HANG_GUARD))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let mut got = vec![0u8; token.len()];
    client
        .read_exact(&mut got)
        .map_err(|e| format!("read: {e}"))?;
    if got == token {
        Ok(())
    } else {
        Err(format!(
            "read back {:?} instead of {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(token)
        ))
    }
}
