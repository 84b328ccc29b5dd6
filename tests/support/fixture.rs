//! `cwreap-fixture`: a deliberately leaky TCP server for cwreap's tests and benchmarks.
//!
//! `cwreap-fixture server --listen ADDR [--listen ADDR]... [--on-hup close|ignore] [--no-accept]`
//! accepts connections and echoes what it reads. When a peer half-closes, it never calls
//! close(): the socket stays in CLOSE_WAIT, the bug cwreap exists for. With `--on-hup close`
//! it behaves like an app that at least reacts to POLLHUP, closing the fd once the socket is
//! shut down (from outside, by cwreap). With `--no-accept` it never accepts: connections
//! the peer closes wait in the accept queue in CLOSE_WAIT, with no fd at all.
//!
//! stdout (one event per line): `listen ADDR`, `ready`, `accepted FD LOCAL REMOTE`,
//! `eof FD`, `released FD`, `closed FD`, `child PID`, `fds N`, `error TEXT`.
//! stdin commands: `close FD`, `share FD` (spawn a child that inherits FD, so the socket is
//! held by two processes), `count` (number of open fds).
//!
//! `cwreap-fixture client ADDR [COUNT]` opens COUNT (default 1) connections, half-closes
//! each (so the server side goes to CLOSE_WAIT if the server leaks), then waits and prints
//! `eof N` as each one is shut down from the server side (`reset N` for an RST).
//!
//! `cwreap-fixture hold` sleeps until its parent dies (the child of `share`).
//!
//! `cwreap-fixture server --threaded [--main sleep|read]` is the same leaky echo server
//! built from blocking threads, like many real ones: one thread per listener blocked in
//! accept(), one per connection blocked in read() (on EOF it leaks the socket and ends),
//! and a thread blocked in nanosleep() that prints `slept MS` after each 1.5 s sleep (or
//! `error sleep interrupted` if the kernel ever returns EINTR to it). The main thread is
//! the sleeper (`--main sleep`, the default) or the stdin reader (`--main read`), which
//! reads raw chunks and prints `error read interrupted` on EINTR. stdin takes `close FD`,
//! `count`, and `ping` (answered by `pong`).

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, poll};
use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};

#[derive(PartialEq)]
enum ConnState {
    /// Reading and echoing.
    Open,
    /// Peer half-closed; we leak the fd (CLOSE_WAIT).
    Leaked,
}

struct Server {
    listeners: Vec<TcpListener>,
    conns: BTreeMap<i32, (TcpStream, ConnState)>,
    close_on_hup: bool,
    /// Never call accept(): connections pile up in the accept queue.
    no_accept: bool,
    children: Vec<Child>,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("server") => server(&args[1..]),
        Some("hold") => hold(),
        Some("client") => client(&args[1..]),
        _ => {
            eprintln!(
                "usage: cwreap-fixture server [--listen ADDR]... [--on-hup close|ignore] [--no-accept] [--threaded [--main sleep|read]] | client ADDR [COUNT] | hold"
            );
            std::process::exit(2);
        }
    }
}

fn hold() {
    // Die with the parent, so a killed fixture leaves no orphan holding sockets.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn client(args: &[String]) {
    let Some(addr) = args.first().and_then(|a| a.parse::<SocketAddr>().ok()) else {
        fail("client needs an address like 127.0.0.1:7000");
    };
    let count: usize = match args.get(1).map(|c| c.parse()) {
        None => 1,
        Some(Ok(n)) => n,
        Some(Err(_)) => fail("COUNT must be a number"),
    };
    let mut handles = Vec::new();
    for i in 0..count {
        let stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => fail(&format!("connect {addr}: {e}")),
        };
        let _ = stream.shutdown(std::net::Shutdown::Write);
        handles.push(std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        say(&format!("eof {i}"));
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        say(&format!("reset {i}"));
                        break;
                    }
                    Err(e) => {
                        say(&format!("error {i} {e}"));
                        break;
                    }
                }
            }
        }));
    }
    say(&format!(
        "half-closed {count} connection(s) to {addr}; waiting for EOF (Ctrl-C to stop)"
    ));
    for h in handles {
        let _ = h.join();
    }
}

fn server(args: &[String]) {
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let mut listen: Vec<SocketAddr> = Vec::new();
    let mut close_on_hup = false;
    let mut no_accept = false;
    let mut threaded = false;
    let mut main_reads = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threaded" => threaded = true,
            "--main" => match it.next().map(String::as_str) {
                Some("sleep") => main_reads = false,
                Some("read") => main_reads = true,
                _ => fail("--main takes sleep or read"),
            },
            "--listen" => match it.next().and_then(|v| v.parse().ok()) {
                Some(addr) => listen.push(addr),
                None => fail("--listen needs an address like 127.0.0.1:0"),
            },
            "--no-accept" => no_accept = true,
            "--on-hup" => match it.next().map(String::as_str) {
                Some("close") => close_on_hup = true,
                Some("ignore") => close_on_hup = false,
                _ => fail("--on-hup takes close or ignore"),
            },
            other => fail(&format!("unknown argument {other}")),
        }
    }
    if listen.is_empty() {
        listen.push(SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    let mut srv = Server {
        listeners: Vec::new(),
        conns: BTreeMap::new(),
        close_on_hup,
        no_accept,
        children: Vec::new(),
    };
    for addr in listen {
        match TcpListener::bind(addr) {
            Ok(l) => {
                let local = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                say(&format!("listen {local}"));
                srv.listeners.push(l);
            }
            Err(e) => fail(&format!("bind {addr}: {e}")),
        }
    }
    if threaded {
        threaded_server(srv.listeners, main_reads);
    }
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
        // stdin closed (e.g. started in the background): keep serving, take no commands.
    });
    say("ready");
    loop {
        while let Ok(cmd) = rx.try_recv() {
            srv.command(&cmd);
        }
        srv.step();
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("cwreap-fixture: {msg}");
    std::process::exit(2);
}

impl Server {
    fn command(&mut self, cmd: &str) {
        let mut words = cmd.split_whitespace();
        let verb = words.next().unwrap_or("");
        let fd: Option<i32> = words.next().and_then(|w| w.parse().ok());
        match (verb, fd) {
            ("close", Some(fd)) => {
                if self.conns.remove(&fd).is_some() {
                    say(&format!("closed {fd}"));
                } else {
                    say(&format!("error no connection on fd {fd}"));
                }
            }
            ("share", Some(fd)) => self.share(fd),
            ("count", _) => {
                let n = std::fs::read_dir("/proc/self/fd")
                    .map(|d| d.count())
                    .unwrap_or(0);
                // read_dir itself holds one fd while counting.
                say(&format!("fds {}", n.saturating_sub(1)));
            }
            _ => say(&format!("error unknown command {cmd}")),
        }
    }

    fn share(&mut self, fd: i32) {
        let Some((stream, _)) = self.conns.get(&fd) else {
            say(&format!("error no connection on fd {fd}"));
            return;
        };
        let inherit = fcntl_getfd(stream.as_fd())
            .and_then(|f| fcntl_setfd(stream.as_fd(), f - FdFlags::CLOEXEC));
        if let Err(e) = inherit {
            say(&format!("error fcntl {e}"));
            return;
        }
        let exe = std::env::current_exe().unwrap_or_else(|_| "cwreap-fixture".into());
        match Command::new(exe)
            .arg("hold")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
        {
            Ok(child) => {
                say(&format!("child {}", child.id()));
                self.children.push(child);
            }
            Err(e) => say(&format!("error spawn {e}")),
        }
        if let Some((stream, _)) = self.conns.get(&fd) {
            let _ = fcntl_getfd(stream.as_fd())
                .and_then(|f| fcntl_setfd(stream.as_fd(), f | FdFlags::CLOEXEC));
        }
    }

    fn step(&mut self) {
        let mut kinds: Vec<Option<i32>> = Vec::new();
        let mut pfds: Vec<PollFd<'_>> = Vec::new();
        if !self.no_accept {
            for l in &self.listeners {
                pfds.push(PollFd::new(l, PollFlags::IN));
                kinds.push(None);
            }
        }
        for (fd, (stream, state)) in &self.conns {
            match state {
                ConnState::Open => pfds.push(PollFd::new(stream, PollFlags::IN)),
                // Events empty: only POLLHUP/POLLERR, which come once the socket is shut down.
                ConnState::Leaked if self.close_on_hup => {
                    pfds.push(PollFd::new(stream, PollFlags::empty()))
                }
                ConnState::Leaked => continue,
            }
            kinds.push(Some(*fd));
        }
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        };
        if poll(&mut pfds, Some(&timeout)).is_err() {
            return;
        }
        let ready: Vec<(Option<i32>, PollFlags)> = pfds
            .iter()
            .zip(kinds.iter())
            .filter(|(p, _)| !p.revents().is_empty())
            .map(|(p, k)| (*k, p.revents()))
            .collect();
        drop(pfds);
        for (i, (kind, revents)) in ready.into_iter().enumerate() {
            match kind {
                None => self.accept(i),
                Some(fd) => self.serve(fd, revents),
            }
        }
    }

    fn accept(&mut self, _slot: usize) {
        let mut accepted = Vec::new();
        for l in &self.listeners {
            let _ = l.set_nonblocking(true);
            while let Ok((s, remote)) = l.accept() {
                accepted.push((s, remote));
            }
        }
        for (s, remote) in accepted {
            let _ = s.set_nonblocking(false);
            let fd = s.as_raw_fd();
            let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
            say(&format!("accepted {fd} {local} {remote}"));
            self.conns.insert(fd, (s, ConnState::Open));
        }
    }

    fn serve(&mut self, fd: i32, revents: PollFlags) {
        let Some((stream, state)) = self.conns.get_mut(&fd) else {
            return;
        };
        if *state == ConnState::Leaked {
            if revents.intersects(PollFlags::HUP | PollFlags::ERR) {
                self.conns.remove(&fd);
                say(&format!("released {fd}"));
            }
            return;
        }
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => {
                // The broken disconnect path: note the EOF, never close.
                *state = ConnState::Leaked;
                say(&format!("eof {fd}"));
            }
            Ok(n) => {
                let _ = stream.write_all(&buf[..n]);
            }
            Err(_) => {
                *state = ConnState::Leaked;
                say(&format!("eof {fd}"));
            }
        }
    }
}

/// Sockets the threaded server leaked (peer half-closed), kept open until `close FD`.
type Leaked = Arc<Mutex<BTreeMap<i32, TcpStream>>>;

const SLEEP: Duration = Duration::from_millis(1500);

fn threaded_server(listeners: Vec<TcpListener>, main_reads: bool) -> ! {
    let leaked: Leaked = Arc::default();
    for l in listeners {
        let leaked = leaked.clone();
        std::thread::spawn(move || accept_loop(l, leaked));
    }
    if main_reads {
        std::thread::spawn(|| sleep_loop());
        say("ready");
        stdin_loop(&leaked)
    } else {
        let leaked = leaked.clone();
        std::thread::spawn(move || stdin_loop(&leaked));
        say("ready");
        sleep_loop()
    }
}

fn accept_loop(listener: TcpListener, leaked: Leaked) {
    loop {
        match listener.accept() {
            Ok((stream, remote)) => {
                let fd = stream.as_raw_fd();
                let local = stream
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                say(&format!("accepted {fd} {local} {remote}"));
                let leaked = leaked.clone();
                std::thread::spawn(move || serve_blocking(stream, leaked));
            }
            Err(e) => {
                say(&format!("error accept {e}"));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve_blocking(mut stream: TcpStream, leaked: Leaked) {
    let fd = stream.as_raw_fd();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                say(&format!("error read interrupted on {fd}"));
            }
            Err(_) => break,
        }
    }
    // The broken disconnect path: keep the socket, end the thread.
    if let Ok(mut map) = leaked.lock()
        && let Some(stale) = map.insert(fd, stream)
    {
        // The same number again: the old fd was closed behind our back (`reap --close`)
        // and the kernel gave the number to this connection. Dropping the stale stream
        // would close the new socket, the hazard an app that keeps fds by number runs;
        // this fixture plays one that never touches a leaked fd again.
        std::mem::forget(stale);
    }
    say(&format!("eof {fd}"));
}

/// Sleep in one nanosleep(2) call at a time and say how long each took, so a test sees
/// whether a stop in the middle shortened it or made it fail.
fn sleep_loop() -> ! {
    let request = rustix::thread::Timespec {
        tv_sec: SLEEP.as_secs() as i64,
        tv_nsec: i64::from(SLEEP.subsec_nanos()),
    };
    loop {
        let t0 = std::time::Instant::now();
        match rustix::thread::nanosleep(&request) {
            rustix::thread::NanosleepRelativeResult::Ok => {
                say(&format!("slept {}", t0.elapsed().as_millis()))
            }
            rustix::thread::NanosleepRelativeResult::Interrupted(_) => {
                say("error sleep interrupted")
            }
            rustix::thread::NanosleepRelativeResult::Err(e) => say(&format!("error sleep {e}")),
        }
    }
}

/// Read stdin with plain read(2) calls (no retry on EINTR, so an interruption shows) and
/// run each complete line as a command.
fn stdin_loop(leaked: &Leaked) -> ! {
    let stdin = std::io::stdin();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match rustix::io::read(stdin.as_fd(), &mut buf) {
            Ok(0) => loop {
                // stdin closed: nothing more to read; keep serving.
                std::thread::sleep(Duration::from_secs(3600));
            },
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(rustix::io::Errno::INTR) => {
                say("error read interrupted");
                continue;
            }
            Err(e) => fail(&format!("read stdin: {e}")),
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            threaded_command(line.trim(), leaked);
        }
    }
}

fn threaded_command(cmd: &str, leaked: &Leaked) {
    let mut words = cmd.split_whitespace();
    match (
        words.next(),
        words.next().and_then(|w| w.parse::<i32>().ok()),
    ) {
        (Some("ping"), _) => say("pong"),
        (Some("count"), _) => say(&format!("fds {}", count_fds())),
        (Some("close"), Some(fd)) => {
            let removed = leaked.lock().ok().and_then(|mut m| m.remove(&fd));
            match removed {
                Some(_) => say(&format!("closed {fd}")),
                None => say(&format!("error no leaked connection on fd {fd}")),
            }
        }
        _ => say(&format!("error unknown command {cmd}")),
    }
}

fn count_fds() -> usize {
    let n = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    // read_dir itself holds one fd while counting.
    n.saturating_sub(1)
}
