//! The benchmark's fixture: N CLOSE_WAIT and M ESTABLISHED loopback connections, with the
//! server ends held by several `cwreap-fixture bulk-server` processes and the client ends
//! by as many `bulk-client` processes (a process may hold at most 20000 fds here, and we
//! cannot raise that). Server `i` listens on `127.88.0.<i+1>`; client `i` connects to server
//! `i` only, so every destination stays far below the ephemeral port range. Only
//! connections cwreap reaped leave a TIME-WAIT entry on the client side (the server's FIN
//! arrives first), for 60 s.
//!
//! On request the servers also hold unix socketpairs and dead TCP sockets (state CLOSE, in
//! no sock_diag table, still held by an fd), spread over them: [`Fleet::set_extras`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Error, Result, anyhow, bail};

use crate::fixture::PER_PROCESS;
pub use crate::fixture::{BULK_CLIENT_COMM, BULK_SERVER_COMM};
use crate::lines::LineChild;
use crate::programs::fixture_bin;
use crate::ss::Ss;

/// `cwreap-fixture ROLE ARGS...`.
fn spawn(name: String, role: &str, args: &[String]) -> Result<LineChild> {
    let mut cmd = Command::new(fixture_bin());
    cmd.arg(role).args(args);
    LineChild::spawn(name, &mut cmd).with_context(|| format!("spawning {cmd:?}"))
}

fn send(peer: &mut LineChild, line: &str) -> Result<()> {
    peer.send(line)
        .with_context(|| format!("{}: sending `{line}`", peer.name))
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
    servers: Vec<LineChild>,
    clients: Vec<LineChild>,
    shares: Vec<Share>,
    /// Connections each server has accepted so far (fresh batches add up).
    accepted: Vec<usize>,
    /// Unix sockets (both ends of each socketpair) the servers hold in all.
    unix: usize,
    /// Dead TCP sockets the servers hold in all.
    dead: usize,
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
            unix: 0,
            dead: 0,
        };
        for i in 0..shares.len() {
            let args = [
                "--parent".to_owned(),
                parent.clone(),
                "--listen".to_owned(),
                format!("127.88.0.{}:0", i + 1),
            ];
            let mut s = spawn(format!("server {i}"), "bulk-server", &args)?;
            let addr = s
                .expect("listen ", Duration::from_secs(10))
                .map_err(Error::msg)?;
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
                .push(spawn(format!("client {i}"), "bulk-client", &args)?);
        }
        for c in &mut fleet.clients {
            c.expect("ready ", Duration::from_secs(300))
                .map_err(Error::msg)?;
        }
        fleet.await_accepted()?;
        fleet.verify()?;
        Ok(fleet)
    }

    fn await_accepted(&mut self) -> Result<()> {
        for (s, want) in self.servers.iter_mut().zip(&self.accepted) {
            send(s, &format!("wait {want}"))?;
        }
        for s in &mut self.servers {
            s.expect("accepted ", Duration::from_secs(150))
                .map_err(Error::msg)?;
        }
        Ok(())
    }

    /// Make the servers hold `unix` unix sockets in all (rounded up to whole socketpairs)
    /// and `dead` dead TCP sockets in all, each spread evenly over them; 0 and 0 drops them.
    pub fn set_extras(&mut self, unix: usize, dead: usize) -> Result<()> {
        let k = self.servers.len();
        let pairs = unix.div_ceil(2);
        let share = |total: usize, i: usize| total / k + usize::from(i < total % k);
        for (i, s) in self.servers.iter_mut().enumerate() {
            send(s, &format!("unix {}", share(pairs, i)))?;
            send(s, &format!("dead {}", share(dead, i)))?;
        }
        for (i, s) in self.servers.iter_mut().enumerate() {
            for (what, want) in [("unix", share(pairs, i)), ("dead", share(dead, i))] {
                let got = s
                    .expect(&format!("{what} "), Duration::from_secs(60))
                    .map_err(Error::msg)?;
                if got != want.to_string() {
                    bail!("{}: holds {got} {what}, expected {want}", s.name);
                }
            }
        }
        self.unix = pairs * 2;
        self.dead = dead;
        Ok(())
    }

    /// Unix sockets the servers hold in all ([`Fleet::set_extras`]).
    pub fn unix_sockets(&self) -> usize {
        self.unix
    }

    /// Dead TCP sockets the servers hold in all ([`Fleet::set_extras`]).
    pub fn dead(&self) -> usize {
        self.dead
    }

    pub fn server_pids(&self) -> Vec<i32> {
        self.servers.iter().map(LineChild::pid).collect()
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

    /// Count the fixture's sockets with `ss -tanH`.
    pub fn counts(&self) -> Result<Counts> {
        let ours: HashSet<SocketAddr> = self.listen.iter().copied().collect();
        let mut c = Counts::default();
        for s in Ss::new().without_processes().run() {
            let local_ours = ours.contains(&s.local);
            let peer_ours = s.peer.is_some_and(|a| ours.contains(&a));
            match s.state.as_str() {
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
            send(s, "sweep")?;
        }
        for (s, share) in self.servers.iter_mut().zip(&self.shares) {
            let swept = s
                .expect("swept ", Duration::from_secs(30))
                .map_err(Error::msg)?;
            if swept != share.close_wait.to_string() {
                bail!(
                    "{}: closed {swept} shut-down connections, expected {}",
                    s.name,
                    share.close_wait
                );
            }
        }
        for c in &mut self.clients {
            send(c, "again")?;
        }
        for c in &mut self.clients {
            c.expect("ready ", Duration::from_secs(300))
                .map_err(Error::msg)?;
        }
        for (a, share) in self.accepted.iter_mut().zip(&self.shares) {
            *a += share.close_wait;
        }
        self.await_accepted()?;
        self.verify()?;
        Ok(())
    }
}
