//! The benchmark's fixture: N CLOSE_WAIT and M ESTABLISHED loopback connections, with the
//! server ends held by several leaky server processes and the client ends by as many client
//! processes (a process may hold at most 20000 fds here, and we cannot raise that).
//!
//! The children are this very executable run again with a role argument
//! ([`SERVER_ROLE`], [`CLIENT_ROLE`]). Each raises its soft RLIMIT_NOFILE to the hard limit,
//! asks for SIGKILL when its parent dies, and names itself (`cwbench-srv`, `cwbench-cli`)
//! so that selectors can tell servers from clients.
//!
//! Server `i` listens on `127.88.0.<i+1>` (a port the kernel picks) and accepts forever,
//! never reading and never closing. Like an event-loop server whose reader stalled, it
//! registers every connection in an epoll instance it never waits on, so `cwreap explain`
//! reads a full epoll set per server (its sockets show as `not_read`).
//! Client `i` opens `cw_i + est_i` connections to server `i` and half-closes the first
//! `cw_i`: their server ends go CLOSE_WAIT. One destination per client keeps every
//! destination far below the ephemeral port range.
//! Every socket has SO_LINGER 0, so killing the clients resets every connection at once:
//! teardown leaves no orphaned FIN_WAIT2 behind. Only connections cwreap reaped leave a
//! TIME-WAIT entry on the client side (the server's FIN arrives first), for 60 s.
//!
//! Protocol (one line each way): server prints `listen ADDR`; on stdin `wait K` it answers
//! `accepted K` once it has accepted K connections in all; `sweep` closes the connections
//! cwreap shut down (POLLHUP), like an application that reacts to EPOLLHUP, and answers
//! `swept X`. Client prints `ready C H`; on stdin `again` it closes its half-closed batch,
//! opens and half-closes a fresh one, and prints `ready C H` again. Errors are `error TEXT`.

use std::collections::{BTreeMap, HashSet};
use std::ffi::CStr;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rustix::event::{PollFd, PollFlags, Timespec, epoll, poll};
use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
use rustix::process::{Resource, Rlimit, Signal};

pub const SERVER_ROLE: &str = "__cwbench-server";
pub const CLIENT_ROLE: &str = "__cwbench-client";
/// /proc/PID/comm of the fixture's processes (at most 15 bytes).
pub const SERVER_COMM: &CStr = c"cwbench-srv";
const CLIENT_COMM: &CStr = c"cwbench-cli";
/// Sockets per server process (and per client process): well below the 20000 fd limit.
pub const PER_PROCESS: usize = 8000;
/// somaxconn caps it anyway; a full accept queue drops SYNs and costs 1 s retries.
const BACKLOG: i32 = 4096;

// ---------------------------------------------------------------------------------------
// The children.

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn die(msg: &str) -> ! {
    say(&format!("error {msg}"));
    eprintln!("cwbench fixture: {msg}");
    std::process::exit(1);
}

/// Options given to a child: `--key value` pairs.
fn options(args: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let Some(key) = k.strip_prefix("--") else {
            die(&format!("unexpected argument {k}"));
        };
        let Some(v) = it.next() else {
            die(&format!("--{key} needs a value"));
        };
        out.insert(key.to_owned(), v.clone());
    }
    out
}

fn option<T: std::str::FromStr>(opts: &BTreeMap<String, String>, key: &str) -> T {
    match opts.get(key).map(|v| v.parse::<T>()) {
        Some(Ok(v)) => v,
        Some(Err(_)) => die(&format!("--{key}: bad value")),
        None => die(&format!("--{key} is required")),
    }
}

/// Die with the parent, hold many fds, and carry a recognisable name.
fn child_setup(comm: &CStr, parent: u32) {
    if let Err(e) = rustix::process::set_parent_process_death_signal(Some(Signal::KILL)) {
        die(&format!("PR_SET_PDEATHSIG: {e}"));
    }
    // The parent may have died before the line above, and then nobody would kill us.
    let ppid = rustix::process::getppid().map(|p| p.as_raw_nonzero().get());
    if ppid != i32::try_from(parent).ok() {
        std::process::exit(1);
    }
    let lim = rustix::process::getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: lim.maximum,
        maximum: lim.maximum,
    };
    if let Err(e) = rustix::process::setrlimit(Resource::Nofile, raised) {
        die(&format!("raising RLIMIT_NOFILE to {:?}: {e}", lim.maximum));
    }
    // The main thread's name is the process's comm.
    if let Err(e) = rustix::thread::set_name(comm) {
        die(&format!("PR_SET_NAME: {e}"));
    }
}

/// Commands from the parent, line by line, until EOF (the parent went away).
fn commands() -> impl Iterator<Item = String> {
    std::io::stdin().lock().lines().map_while(Result::ok)
}

fn linger_zero(s: &TcpStream) {
    // Best effort: without it teardown leaves TIME_WAIT behind, nothing worse.
    let _ = sockopt::set_socket_linger(s, Some(Duration::ZERO));
}

#[derive(Default)]
struct Accepted {
    conns: Vec<TcpStream>,
    total: usize,
    last_error: Option<String>,
}

pub fn server_main(args: &[String]) -> ! {
    let opts = options(args);
    child_setup(SERVER_COMM, option(&opts, "parent"));
    let addr: SocketAddr = option(&opts, "listen");
    let listener = match listen(addr) {
        Ok(l) => l,
        Err(e) => die(&format!("listen on {addr}: {e}")),
    };
    match listener.local_addr() {
        Ok(a) => say(&format!("listen {a}")),
        Err(e) => die(&format!("getsockname: {e}")),
    }
    let state = Arc::new((Mutex::new(Accepted::default()), Condvar::new()));
    let acceptor = Arc::clone(&state);
    let ep = match epoll::create(epoll::CreateFlags::CLOEXEC) {
        Ok(ep) => ep,
        Err(e) => die(&format!("epoll_create: {e}")),
    };
    std::thread::spawn(move || {
        loop {
            let res = listener.accept();
            let (lock, cv) = &*acceptor;
            let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
            match res {
                Ok((s, _)) => {
                    linger_zero(&s);
                    // Watched, never waited on; close() (sweep) unregisters it.
                    let data = epoll::EventData::new_u64(st.total as u64);
                    if let Err(e) = epoll::add(&ep, &s, data, epoll::EventFlags::RDHUP) {
                        st.last_error = Some(format!("epoll_ctl(ADD): {e}"));
                    }
                    st.conns.push(s);
                    st.total += 1;
                    cv.notify_all();
                }
                Err(e) => {
                    // EMFILE and friends: report it to whoever waits, then retry.
                    st.last_error = Some(e.to_string());
                    cv.notify_all();
                    drop(st);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    });
    let (lock, cv) = &*state;
    for line in commands() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next().map(str::parse::<usize>)) {
            (Some("wait"), Some(Ok(want))) => {
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
                while st.total < want && Instant::now() < deadline {
                    st = cv
                        .wait_timeout(st, Duration::from_millis(200))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                if st.total >= want {
                    say(&format!("accepted {}", st.total));
                } else {
                    let why = st.last_error.as_deref().unwrap_or("no accept error");
                    say(&format!(
                        "error accepted only {} of {want} connections in 120 s ({why})",
                        st.total
                    ));
                }
            }
            (Some("sweep"), None) => {
                let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
                match hung_up(&st.conns) {
                    Ok(hup) => {
                        let before = st.conns.len();
                        let mut i = 0;
                        st.conns.retain(|_| {
                            i += 1;
                            !hup[i - 1]
                        });
                        say(&format!("swept {}", before - st.conns.len()));
                    }
                    Err(e) => say(&format!("error poll: {e}")),
                }
            }
            _ => say(&format!("error unknown command {line}")),
        }
    }
    std::process::exit(0)
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, BACKLOG)?;
    Ok(TcpListener::from(fd))
}

/// Which connections were shut down (from outside, by cwreap): POLLHUP is set once both
/// directions are shut; a plain CLOSE_WAIT socket only has POLLIN|POLLRDHUP.
fn hung_up(conns: &[TcpStream]) -> std::io::Result<Vec<bool>> {
    let mut pfds: Vec<PollFd<'_>> = conns
        .iter()
        .map(|s| PollFd::new(s, PollFlags::empty()))
        .collect();
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut pfds, Some(&now))?;
    Ok(pfds
        .iter()
        .map(|p| p.revents().contains(PollFlags::HUP))
        .collect())
}

pub fn client_main(args: &[String]) -> ! {
    let opts = options(args);
    child_setup(CLIENT_COMM, option(&opts, "parent"));
    let addr: SocketAddr = option(&opts, "connect");
    let count: usize = option(&opts, "count");
    let half: usize = option(&opts, "half-close");
    if half > count {
        die("--half-close exceeds --count");
    }
    let mut conns = Vec::with_capacity(count);
    // The half-closed batch first, then the connections that stay ESTABLISHED.
    connect_batch(addr, half, true, &mut conns);
    connect_batch(addr, count - half, false, &mut conns);
    say(&format!("ready {count} {half}"));
    for line in commands() {
        if line.trim() == "again" {
            // The old batch was shut down from the server side: close it, then a fresh one.
            let established = conns.split_off(half);
            conns.clear();
            connect_batch(addr, half, true, &mut conns);
            conns.extend(established);
            say(&format!("ready {count} {half}"));
        } else {
            say(&format!("error unknown command {line}"));
        }
    }
    std::process::exit(0)
}

fn connect_batch(addr: SocketAddr, n: usize, half_close: bool, out: &mut Vec<TcpStream>) {
    for i in 0..n {
        let s = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => die(&format!("connect {addr} (connection {i} of {n}): {e}")),
        };
        linger_zero(&s);
        if half_close && let Err(e) = s.shutdown(Shutdown::Write) {
            die(&format!("shutdown(SHUT_WR): {e}"));
        }
        out.push(s);
    }
}

// ---------------------------------------------------------------------------------------
// The parent's side.

/// One child and its line protocol.
struct Peer {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Peer {
    fn spawn(name: String, role: &str, args: &[String]) -> Result<Peer> {
        let exe = std::env::current_exe().context("locating the benchmark executable")?;
        let mut child = Command::new(&exe)
            .arg(role)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {name} ({})", exe.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name}: no pipes to the child");
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Peer {
            name,
            child,
            stdin,
            lines: rx,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .with_context(|| format!("{}: sending `{line}`", self.name))
    }

    /// The next line starting with `prefix` (the rest of it); an `error` line fails.
    fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_owned());
                    }
                    if let Some(err) = line.strip_prefix("error ") {
                        bail!("{}: {err}", self.name);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("{}: no `{prefix}` within {timeout:?}", self.name)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    bail!("{}: exited before `{prefix}` ({status:?})", self.name)
                }
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// TCP sockets of the fixture, as `ss` counts them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub listen: usize,
    /// Server ends in CLOSE_WAIT.
    pub close_wait: usize,
    /// ESTABLISHED server ends (local address is a fixture listener).
    pub est_server: usize,
    /// ESTABLISHED client ends (peer address is a fixture listener).
    pub est_client: usize,
}

/// How many connections server/client pair `i` carries.
#[derive(Debug, Clone, Copy)]
struct Share {
    close_wait: usize,
    established: usize,
}

/// The running fixture. Dropping it kills every child (clients first: with SO_LINGER 0
/// their exit resets every connection).
pub struct Fleet {
    pub n: usize,
    pub m: usize,
    pub listen: Vec<SocketAddr>,
    servers: Vec<Peer>,
    clients: Vec<Peer>,
    shares: Vec<Share>,
    /// Connections each server has accepted so far (fresh batches add up).
    accepted: Vec<usize>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.clients {
            c.kill();
        }
        for s in &mut self.servers {
            s.kill();
        }
    }
}

fn shares(n: usize, m: usize) -> Vec<Share> {
    let k = (n + m).div_ceil(PER_PROCESS).max(1);
    (0..k)
        .map(|i| Share {
            close_wait: n / k + usize::from(i < n % k),
            established: m / k + usize::from(i < m % k),
        })
        .collect()
}

impl Fleet {
    /// Start the servers and clients and wait until `ss` sees exactly `n` CLOSE_WAIT and
    /// `m` ESTABLISHED connections of the fixture.
    pub fn start(n: usize, m: usize) -> Result<Fleet> {
        let shares = shares(n, m);
        if shares.len() > 254 {
            bail!(
                "{} server processes needed; at most 254 supported",
                shares.len()
            );
        }
        let parent = std::process::id().to_string();
        let mut fleet = Fleet {
            n,
            m,
            listen: Vec::new(),
            servers: Vec::new(),
            clients: Vec::new(),
            shares: shares.clone(),
            accepted: shares
                .iter()
                .map(|s| s.close_wait + s.established)
                .collect(),
        };
        for i in 0..shares.len() {
            let args = [
                "--parent".to_owned(),
                parent.clone(),
                "--listen".to_owned(),
                format!("127.88.0.{}:0", i + 1),
            ];
            let mut s = Peer::spawn(format!("server {i}"), SERVER_ROLE, &args)?;
            let addr = s.expect("listen ", Duration::from_secs(10))?;
            let addr: SocketAddr = addr
                .parse()
                .map_err(|e| anyhow!("server {i}: bad listen address {addr:?}: {e}"))?;
            fleet.listen.push(addr);
            fleet.servers.push(s);
        }
        for (i, share) in shares.iter().enumerate() {
            let args = [
                "--parent".to_owned(),
                parent.clone(),
                "--connect".to_owned(),
                fleet.listen[i].to_string(),
                "--count".to_owned(),
                (share.close_wait + share.established).to_string(),
                "--half-close".to_owned(),
                share.close_wait.to_string(),
            ];
            fleet
                .clients
                .push(Peer::spawn(format!("client {i}"), CLIENT_ROLE, &args)?);
        }
        for c in &mut fleet.clients {
            c.expect("ready ", Duration::from_secs(300))?;
        }
        fleet.await_accepted()?;
        fleet.verify()?;
        Ok(fleet)
    }

    fn await_accepted(&mut self) -> Result<()> {
        for (s, want) in self.servers.iter_mut().zip(&self.accepted) {
            s.send(&format!("wait {want}"))?;
        }
        for s in &mut self.servers {
            s.expect("accepted ", Duration::from_secs(150))?;
        }
        Ok(())
    }

    pub fn server_pids(&self) -> Vec<i32> {
        self.servers.iter().map(Peer::pid).collect()
    }

    pub fn processes(&self) -> usize {
        self.servers.len() + self.clients.len()
    }

    /// What a complete fixture looks like.
    pub fn expected(&self) -> Counts {
        Counts {
            listen: self.servers.len(),
            close_wait: self.n,
            est_server: self.m,
            est_client: self.m,
        }
    }

    /// Wait (up to 10 s) until `ss` agrees with [`Fleet::expected`].
    pub fn verify(&self) -> Result<Counts> {
        let want = self.expected();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.counts()?;
            if got == want {
                return Ok(got);
            }
            if Instant::now() > deadline {
                bail!("fixture incomplete: ss counts {got:?}, expected {want:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Count the fixture's sockets with `ss -Htan`.
    pub fn counts(&self) -> Result<Counts> {
        let out = Command::new("ss")
            .args(["-H", "-t", "-a", "-n"])
            .stderr(Stdio::inherit())
            .output()
            .context("running ss (iproute2)")?;
        if !out.status.success() {
            bail!("ss -Htan failed: {}", out.status);
        }
        let ours: HashSet<SocketAddr> = self.listen.iter().copied().collect();
        let mut c = Counts::default();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [state, _, _, local, peer, ..] = f[..] else {
                continue;
            };
            let local_ours = local.parse().is_ok_and(|a: SocketAddr| ours.contains(&a));
            let peer_ours = peer.parse().is_ok_and(|a: SocketAddr| ours.contains(&a));
            match state {
                "LISTEN" if local_ours => c.listen += 1,
                "CLOSE-WAIT" if local_ours => c.close_wait += 1,
                "ESTAB" if local_ours => c.est_server += 1,
                "ESTAB" if peer_ours => c.est_client += 1,
                _ => {}
            }
        }
        Ok(c)
    }

    /// After a reap: servers close what was shut down, clients open and half-close a fresh
    /// batch, and the fixture is complete again.
    pub fn renew_close_wait(&mut self) -> Result<()> {
        for s in &mut self.servers {
            s.send("sweep")?;
        }
        for (s, share) in self.servers.iter_mut().zip(&self.shares) {
            let swept = s.expect("swept ", Duration::from_secs(30))?;
            if swept != share.close_wait.to_string() {
                bail!(
                    "{}: closed {swept} shut-down connections, expected {}",
                    s.name,
                    share.close_wait
                );
            }
        }
        for c in &mut self.clients {
            c.send("again")?;
        }
        for c in &mut self.clients {
            c.expect("ready ", Duration::from_secs(300))?;
        }
        for (a, share) in self.accepted.iter_mut().zip(&self.shares) {
            *a += share.close_wait;
        }
        self.await_accepted()?;
        self.verify()?;
        Ok(())
    }
}
