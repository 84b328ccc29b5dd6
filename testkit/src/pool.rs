//! A urllib3 keep-alive pool (tests/runtimes/pool.py) and the HTTP server it talks to,
//! which closes connections idle for a second (tests/runtimes/http_idle.py), both on
//! /usr/bin/python3: the pool's ends of the closed connections sit in CLOSE_WAIT until it
//! next uses them.

use std::net::SocketAddr;
use std::process::Command;

use crate::runtimes::{self, PYTHON};
use crate::{HANG_GUARD, LineChild, skip_or_fail};

/// http_idle.py and a urllib3 pool (pool.py) of up to 40 connections to it.
pub struct PoolPair {
    // Declared first, killed first.
    client: LineChild,
    _server: LineChild,
    /// The server's port: the pool's remote port.
    pub port: u16,
}

impl PoolPair {
    /// Start both; the server holds requests under /gather/ until `conns` have arrived.
    /// None when urllib3 cannot be imported and the test may skip (under `CI=true` that
    /// fails it, see [`skip_or_fail`]).
    pub fn start(test: &str, conns: usize) -> Option<PoolPair> {
        let probe = Command::new(PYTHON).args(["-c", "import urllib3"]).output();
        if !probe.is_ok_and(|o| o.status.success()) {
            skip_or_fail(
                test,
                "/usr/bin/python3 cannot import urllib3 (apt install python3-urllib3)",
            );
            return None;
        }
        let mut server = LineChild::spawn(
            "http_idle.py",
            Command::new(PYTHON)
                .arg(runtimes::source("http_idle.py"))
                .args(["--idle", "1", "--gather", &conns.to_string()]),
        )
        .expect("start http_idle.py");
        let line = server
            .next_line(HANG_GUARD)
            .expect("http_idle.py listen line");
        let addr: SocketAddr = line
            .strip_prefix("listen ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("http_idle.py said {line:?}"));
        let client = LineChild::spawn(
            "pool.py",
            Command::new(PYTHON)
                .arg(runtimes::source("pool.py"))
                .arg(addr.to_string())
                .args(["--size", "40"]),
        )
        .expect("start pool.py");
        let mut p = PoolPair {
            client,
            _server: server,
            port: addr.port(),
        };
        p.expect("ready");
        Some(p)
    }

    /// The pool's process.
    pub fn pid(&self) -> i32 {
        self.client.pid()
    }

    /// One command to pool.py (`fill N`, `request K`, `fds`).
    pub fn send(&mut self, cmd: &str) {
        self.client.send(cmd).expect("write to pool.py");
    }

    /// Lines up to and including the first that starts with `prefix`.
    pub fn expect(&mut self, prefix: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = self
                .client
                .next_line(HANG_GUARD)
                .unwrap_or_else(|_| panic!("pool.py: no `{prefix}`; said {seen:?}"));
            let done = line.starts_with(prefix);
            seen.push(line);
            if done {
                return seen;
            }
        }
    }
}
