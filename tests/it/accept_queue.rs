//! A connection whose peer closed while it waited in its server's accept queue: no fd
//! exists, so `action: shutdown` skips it (`unaccepted`). Once the server accepts it, it is
//! an fd like any other, and the daemon must reap it then, in events mode (where accepting
//! changes no TCP state, so no event comes) as when polling. The server is
//! tests/runtimes/late_accept.py, which accepts only when told.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::runtimes::source;
use crate::support::*;

struct LateAccept {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    port: u16,
}

impl Drop for LateAccept {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LateAccept {
    fn start() -> LateAccept {
        let mut child = Command::new("python3")
            .arg(source("late_accept.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python3 late_accept.py");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let port = listening_port(&mut stdout, "late_accept.py");
        LateAccept {
            child,
            stdin,
            stdout,
            port,
        }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    /// Accept one connection; its fd.
    fn accept(&mut self) -> i64 {
        self.stdin
            .write_all(b"accept\n")
            .expect("tell it to accept");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read the accepted line");
        line.trim()
            .strip_prefix("accepted ")
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("late_accept.py said {line:?}"))
    }
}

/// A field of a JSON log line, flattened or under "fields".
fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    if v[key].is_null() {
        &v["fields"][key]
    } else {
        &v[key]
    }
}

/// The daemon's action lines on the connection from `remote`.
fn actions(d: &LoggedDaemon, remote: &str) -> Vec<Value> {
    d.lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| field(v, "message") == "close_wait action" && field(v, "remote") == remote)
        .collect()
}

#[test]
#[ignore = "needs root: the daemon duplicates the server's sockets with pidfd_getfd (CAP_SYS_PTRACE), and loads BPF programs in events mode"]
fn a_connection_skipped_in_the_accept_queue_is_reaped_once_accepted() {
    for discovery in ["events", "poll"] {
        let mut server = LateAccept::start();
        let pid = server.pid();
        let yaml = format!(
            "interval: 300ms\ndry_run: false\ndiscovery: {discovery}\nlog_format: json\n\
             metrics: {{listen: off}}\ntargets:\n  - name: late\n    match: {{pid: {pid}}}\n    \
             older_than: 1ms\n    action: shutdown\n"
        );
        let mut d =
            LoggedDaemon::start_with(&format!("accept-queue-{discovery}"), &yaml, |_, _| {});
        let mut client = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
        client.shutdown(Shutdown::Write).expect("half-close");
        let remote = client.local_addr().expect("local address").to_string();
        let skipped = d.wait_for("the queued connection skipped", |d| {
            actions(d, &remote).into_iter().next()
        });
        assert_eq!(
            field(&skipped, "outcome"),
            "skipped",
            "{discovery}: {skipped}"
        );
        assert_eq!(
            field(&skipped, "unaccepted"),
            true,
            "{discovery}: {skipped}"
        );
        let fd = server.accept();
        let reaped = d.wait_for("the accepted connection reaped", |d| {
            actions(d, &remote)
                .into_iter()
                .find(|v| field(v, "outcome") == "reaped")
        });
        assert_eq!(
            field(&reaped, "fd").as_i64(),
            Some(fd),
            "{discovery}: {reaped}"
        );
        assert_eq!(field(&reaped, "pid").as_i64(), Some(i64::from(pid)));
        assert!(
            reads_eof(&mut client, Duration::from_secs(10)),
            "{discovery}: the peer reads EOF once the server's end is shut down"
        );
        let all = actions(&d, &remote);
        assert_eq!(
            all.len(),
            2,
            "{discovery}: skipped once, reaped once: {all:?}"
        );
        d.daemon.stop();
    }
}
