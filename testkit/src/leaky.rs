//! Driving `cwreap-fixture server` (see [`crate::fixture`]) and its clients from a test:
//! start it, connect, leave connections in CLOSE_WAIT, and ask the peer's side what it saw
//! (EOF, reset, an echo).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::lines::LineChild;
use crate::programs::fixture_bin;
use crate::ss::ss_close_wait;

/// How long the fixture may stay silent when a line is due: a hang guard only.
const SILENCE: Duration = Duration::from_secs(10);

/// A running `cwreap-fixture server`, killed on drop. Derefs to its [`LineChild`] (`child`,
/// `history`, `pid()`, `kill()`).
pub struct Fixture {
    io: LineChild,
    pub listen: Vec<SocketAddr>,
}

impl Deref for Fixture {
    type Target = LineChild;
    fn deref(&self) -> &LineChild {
        &self.io
    }
}

impl DerefMut for Fixture {
    fn deref_mut(&mut self) -> &mut LineChild {
        &mut self.io
    }
}

impl Fixture {
    /// `cwreap-fixture server --listen L... EXTRA...`, once it is ready.
    pub fn start(listen: &[&str], extra: &[&str]) -> Fixture {
        Self::start_in(None, listen, extra)
    }

    /// Start the server inside network namespace `netns` (`ip netns exec` keeps the pid).
    pub fn start_in(netns: Option<&str>, listen: &[&str], extra: &[&str]) -> Fixture {
        let cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(fixture_bin());
                c
            }
            None => Command::new(fixture_bin()),
        };
        Self::start_cmd(cmd, listen, extra)
    }

    /// Start the server through `cmd`, the fixture binary or a program that runs it (`ip
    /// netns exec`, `setpriv`, ...), with `server --listen L... EXTRA...` added.
    pub fn start_cmd(mut cmd: Command, listen: &[&str], extra: &[&str]) -> Fixture {
        cmd.arg("server");
        for l in listen {
            cmd.args(["--listen", l]);
        }
        cmd.args(extra);
        let io = LineChild::spawn("cwreap-fixture server", &mut cmd)
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let mut f = Fixture {
            io,
            listen: Vec::new(),
        };
        loop {
            let line = f.next_line();
            if let Some(addr) = line.strip_prefix("listen ") {
                f.listen.push(addr.parse().expect("listen address"));
            } else if line == "ready" {
                break;
            }
            assert!(!line.starts_with("error"), "fixture: {line}");
        }
        f
    }

    pub fn pid(&self) -> i32 {
        self.io.pid()
    }

    pub fn next_line(&mut self) -> String {
        self.io
            .next_line(SILENCE)
            .unwrap_or_else(|e| panic!("fixture said nothing for {SILENCE:?} ({e})"))
    }

    /// Wait for a line starting with `prefix` (skipping others) and return the rest.
    pub fn expect_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + SILENCE;
        while Instant::now() < deadline {
            let line = self.next_line();
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim().to_string();
            }
            assert!(!line.starts_with("error"), "fixture: {line}");
        }
        panic!("fixture never said {prefix}");
    }

    pub fn send(&mut self, cmd: &str) {
        self.io.send(cmd).expect("write to fixture");
    }

    /// Connect to listener `idx`; returns the client and the server-side fd.
    pub fn connect(&mut self, idx: usize) -> (TcpStream, i32) {
        let client = TcpStream::connect(self.listen[idx]).expect("connect to fixture");
        let fd = self.accepted(client.local_addr().expect("client addr"));
        (client, fd)
    }

    /// The server-side fd of the connection from `client`, once the fixture accepted it.
    pub fn accepted(&mut self, client: SocketAddr) -> i32 {
        loop {
            let rest = self.expect_line("accepted ");
            let mut w = rest.split_whitespace();
            let fd: i32 = w.next().and_then(|v| v.parse().ok()).expect("fd");
            let _server_local = w.next();
            let remote: SocketAddr = w.next().and_then(|v| v.parse().ok()).expect("remote");
            if remote == client {
                return fd;
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

    /// `count` connections to listener 0, made in chunks the fixture accepts before the next
    /// (its backlog is finite). Clients have SO_LINGER 0, so dropping them resets at once.
    pub fn connect_many(&mut self, count: usize) -> Vec<TcpStream> {
        const CHUNK: usize = 100;
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let n = CHUNK.min(count - out.len());
            for _ in 0..n {
                let c = TcpStream::connect(self.listen[0]).expect("connect");
                rustix::net::sockopt::set_socket_linger(&c, Some(Duration::ZERO)).expect("linger");
                out.push(c);
            }
            for _ in 0..n {
                self.expect_line("accepted ");
            }
        }
        out
    }
}

/// `count` connections to `fx` ([`Fixture::connect_many`]), half-closed: once `ss` shows the
/// server ends in CLOSE_WAIT, the clients.
pub fn close_waits(fx: &mut Fixture, count: usize) -> Vec<TcpStream> {
    let out = fx.connect_many(count);
    for c in &out {
        c.shutdown(Shutdown::Write).expect("half-close");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ss_close_wait(fx.pid()).len() < count {
        assert!(
            Instant::now() < deadline,
            "the fixture never held {count} CLOSE_WAIT sockets"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

/// A `cwreap-fixture client` process (half-closed connections waiting for their end);
/// killed on drop.
pub struct Clients(LineChild);

impl Clients {
    /// `cwreap-fixture client ADDR COUNT` run by `cmd` (the fixture binary or a program that
    /// runs it), once its connections are half-closed.
    pub fn start(mut cmd: Command, addr: SocketAddr, count: usize) -> Clients {
        cmd.arg("client")
            .arg(addr.to_string())
            .arg(count.to_string());
        let mut c = Clients(
            LineChild::spawn("cwreap-fixture client", &mut cmd)
                .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
        );
        let first = c.0.next_line(SILENCE).expect("client started");
        assert!(first.starts_with("half-closed"), "client: {first}");
        c
    }

    /// Collect `eof N` / `reset N` lines for up to `wait`, until `n` arrived.
    pub fn ends(&mut self, n: usize, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match self.0.next_line(left) {
                Ok(l) => out.push(l),
                Err(_) => break,
            }
        }
        out
    }
}

/// Read until the connection ends or `wait` passes without data: Ok on EOF, else the
/// error that ended the read (WouldBlock/TimedOut on the timeout, ConnectionReset on RST).
/// A read interrupted by a signal (EINTR: a read with a timeout is never restarted) is no
/// end of the connection: it reads again for the time left.
fn read_to_end_within(client: &mut TcpStream, wait: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 64];
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))?;
        client
            .set_read_timeout(Some(left))
            .expect("set read timeout");
        match client.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
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

/// Whether the peer sees a reset (SOCK_DESTROY sends an RST) within `wait`.
pub fn reads_reset(client: &mut TcpStream, wait: Duration) -> bool {
    read_to_end_within(client, wait).is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
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
