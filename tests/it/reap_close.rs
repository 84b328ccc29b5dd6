//! `cwreap reap --pid P --close`, the manual last resort, and its guards: it closes only
//! CLOSE_WAIT sockets and sockets of connections that ended, never a socket that was never
//! connected, is only bound, is listening or was refused; every filter applies; it needs
//! `--pid` and a confirmation; the daemon never closes fds inside a target.

use std::collections::BTreeMap;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::runtimes::{self, PYTHON};
use crate::support::*;

const HANG_GUARD: Duration = Duration::from_secs(30);

/// `reap --pid PID --older-than 1ms --close --yes --json`, which must exit 0; its output
/// and rows.
fn close_all_older_than_1ms(pid: i32) -> (std::process::Output, Vec<serde_json::Value>) {
    let out = cwreap(&[
        "reap",
        "--pid",
        &pid.to_string(),
        "--older-than",
        "1ms",
        "--close",
        "--yes",
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let rows = json_lines(&out);
    (out, rows)
}

/// `tests/runtimes/holder.py`: one socket of each kind, and one CLOSE_WAIT.
struct Holder {
    io: LineChild,
    fds: BTreeMap<String, i32>,
    /// The client end of the CLOSE_WAIT connection (half-closed, still reading).
    peer: TcpStream,
}

impl Holder {
    fn start(test: &str) -> Option<Holder> {
        if !runtimes::have_python(test) {
            return None;
        }
        let mut cmd = Command::new(PYTHON);
        cmd.arg("-u").arg(runtimes::source("holder.py"));
        let mut io = LineChild::spawn("holder.py", &mut cmd).expect("start holder.py");
        let mut fds = BTreeMap::new();
        let mut peer = None;
        loop {
            let line = io.next_line(HANG_GUARD).expect("holder.py said nothing");
            assert!(!line.starts_with("error"), "holder.py: {line}");
            if let Some(rest) = line.strip_prefix("fd ") {
                let (kind, fd) = rest.split_once(' ').expect("fd KIND N");
                fds.insert(kind.to_owned(), fd.parse().expect("fd number"));
            } else if let Some(addr) = line.strip_prefix("listen ") {
                let addr: SocketAddr = addr.parse().expect("listen address");
                let c = TcpStream::connect(addr).expect("connect to holder");
                c.shutdown(Shutdown::Write).expect("half-close");
                peer = Some(c);
            } else if line == "ready" {
                break;
            }
        }
        Some(Holder {
            io,
            fds,
            peer: peer.expect("holder.py announced its listener"),
        })
    }

    fn pid(&self) -> i32 {
        self.io.pid()
    }

    fn fd(&self, kind: &str) -> i32 {
        self.fds[kind]
    }

    /// Use the four sockets that must survive; the holder's answer.
    fn use_them(&mut self) -> String {
        self.io.send("use").expect("write to holder");
        let rest = self
            .io
            .expect("used ", HANG_GUARD)
            .unwrap_or_else(|e| panic!("holder.py answered `use`: {e}"));
        format!("used {rest}")
    }
}

/// Until `pid` holds `n` CLOSE_WAIT sockets according to ss (the FIN has to arrive).
fn wait_close_wait(pid: i32, n: usize) {
    let deadline = Instant::now() + HANG_GUARD;
    while ss_close_wait(pid).len() != n {
        assert!(
            Instant::now() < deadline,
            "pid {pid} never had {n} CLOSE_WAIT sockets"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs root: `reap --close` stops the target with ptrace to close fds inside it (CAP_SYS_PTRACE)"]
fn close_takes_only_the_close_wait_socket_and_leaves_the_others_usable() {
    let test = "close_takes_only_the_close_wait_socket_and_leaves_the_others_usable";
    let Some(mut h) = Holder::start(test) else {
        return;
    };
    let pid = h.pid();
    wait_close_wait(pid, 1);
    let kinds = ["never", "bound", "listening", "refused"];
    let before: BTreeMap<&str, Option<u64>> =
        kinds.iter().map(|k| (*k, fd_inode(pid, h.fd(k)))).collect();
    assert!(before.values().all(Option::is_some), "{before:?}");
    let cw = h.fd("closewait");
    let fds_before = fd_count(pid);

    let (out, rows) = close_all_older_than_1ms(pid);
    assert_eq!(
        rows.len(),
        1,
        "only the CLOSE_WAIT socket is a candidate: {rows:?}"
    );
    assert_eq!(field_i64(&rows[0], "fd"), i64::from(cw));
    assert_eq!(field_str(&rows[0], "state"), "CLOSE_WAIT");
    assert_eq!(field_str(&rows[0], "outcome"), "reaped");
    assert!(
        stderr(&out).contains("1 matched, 1 closed"),
        "{}",
        stderr(&out)
    );

    // Only the CLOSE_WAIT fd is gone; the peer sees the end of the connection.
    assert_eq!(fd_inode(pid, cw), None, "the CLOSE_WAIT fd was closed");
    assert_eq!(fd_count(pid), fds_before - 1);
    assert!(ss_close_wait(pid).is_empty());
    assert!(reads_eof(&mut h.peer, Duration::from_secs(10)));
    for k in kinds {
        assert_eq!(fd_inode(pid, h.fd(k)), before[k], "{k} socket changed");
    }
    // And the holder still uses each of the other four.
    assert_eq!(h.use_them(), "used ok");
}

#[test]
#[ignore = "needs root: `reap --close` stops the target with ptrace to close fds inside it (CAP_SYS_PTRACE)"]
fn close_obeys_older_than_port_and_max_and_needs_pid_and_consent() {
    let mut fx = Fixture::start(&["127.0.0.1:0", "127.0.0.1:0"], &["--threaded"]);
    let mut keep = Vec::new();
    for _ in 0..3 {
        keep.push(fx.close_wait(0));
    }
    for _ in 0..2 {
        keep.push(fx.close_wait(1));
    }
    let pid = fx.pid();
    let p = pid.to_string();
    wait_close_wait(pid, 5);
    let port_b = fx.listen[1].port().to_string();
    let close = |extra: &[&str]| {
        let mut args = vec!["reap", "--pid", &p, "--close", "--json"];
        args.extend_from_slice(extra);
        cwreap(&args)
    };

    // No --pid: refused before anything is looked at.
    let fds = fd_count(pid);
    let out = cwreap(&[
        "reap",
        "--port",
        &port_b,
        "--older-than",
        "1ms",
        "--close",
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--close needs --pid"),
        "{}",
        stderr(&out)
    );
    // No --yes and no terminal: exit 2, nothing closed.
    let out = close(&["--older-than", "1ms"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("misdeliver"),
        "the hazard is said: {}",
        stderr(&out)
    );
    assert_eq!(fd_count(pid), fds);
    assert_eq!(ss_close_wait(pid).len(), 5);

    // --older-than: nothing is an hour old.
    let out = close(&["--older-than", "1h", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(json_lines(&out).is_empty());
    assert_eq!(fd_count(pid), fds);

    // --port: only the second listener's two.
    let out = close(&["--older-than", "1ms", "--port", &port_b, "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(field_str(r, "outcome"), "reaped", "{r}");
        assert!(
            field_str(r, "local").ends_with(&format!(":{port_b}")),
            "{r}"
        );
    }
    assert_eq!(fd_count(pid), fds - 2);
    assert_eq!(ss_close_wait(pid).len(), 3);

    // --max: exactly one of the remaining three.
    let out = close(&["--older-than", "1ms", "--max", "1", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json_lines(&out).len(), 1);
    assert_eq!(fd_count(pid), fds - 3);
    assert_eq!(ss_close_wait(pid).len(), 2);

    // The server still serves.
    let (mut fresh, _) = fx.connect(0);
    assert!(echoes(&mut fresh));
}

#[test]
#[ignore = "needs root: `reap --close` stops the target with ptrace to close fds inside it (CAP_SYS_PTRACE)"]
fn close_frees_sockets_of_ended_connections_still_held() {
    // The threaded server keeps no table keyed by fd number.
    let mut fx = Fixture::start(&["127.0.0.1:0"], &["--threaded"]);
    let mut waiting = [fx.close_wait(0), fx.close_wait(0), fx.close_wait(0)];
    let mut est = fx.connect(0);
    let pid = fx.pid();
    let p = pid.to_string();
    wait_close_wait(pid, 3);
    let before = fd_count(pid);

    // Dry run: verified, nothing closed, no confirmation needed.
    let rows = cwreap_json(&[
        "reap",
        "--pid",
        &p,
        "--older-than",
        "1ms",
        "--close",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| field_str(r, "outcome") == "dry_run"));
    assert_eq!(fd_count(pid), before);

    // Two of them the classic way: shut down, still held by the app (it ignores HUP).
    let out = cwreap(&["reap", "--pid", &p, "--older-than", "1ms", "--max", "2"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(fd_count(pid), before, "shutdown alone frees no fd slot");

    // --close: the remaining CLOSE_WAIT one and the two ended (CLOSE) ones.
    let (out, rows) = close_all_older_than_1ms(pid);
    let states: Vec<&str> = rows.iter().map(|r| field_str(r, "state")).collect();
    assert_eq!(
        states.iter().filter(|s| **s == "CLOSE").count(),
        2,
        "{rows:?}"
    );
    assert_eq!(
        states.iter().filter(|s| **s == "CLOSE_WAIT").count(),
        1,
        "{rows:?}"
    );
    assert!(
        rows.iter().all(|r| field_str(r, "outcome") == "reaped"),
        "{rows:?}"
    );
    for (_, fd) in &waiting {
        assert!(
            rows.iter().any(|r| field_i64(r, "fd") == i64::from(*fd)),
            "fd {fd} not closed: {rows:?}"
        );
    }
    assert!(
        stderr(&out).contains("3 matched, 3 closed"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("paused"), "{}", stderr(&out));
    assert_eq!(
        fd_count(pid),
        before - 3,
        "exactly the three fds were freed"
    );
    for (c, fd) in waiting.iter_mut() {
        assert!(reads_eof(c, Duration::from_secs(5)), "client of fd {fd}");
    }
    // The ESTABLISHED connection was never a candidate, and the server still works.
    assert!(echoes(&mut est.0));
    let (mut fresh, _) = fx.connect(0);
    assert!(echoes(&mut fresh));
}

#[test]
fn the_daemon_never_closes_fds_inside_a_target() {
    // The policy key that did is refused, by `check` and by `run`, with the reason and the
    // escalations that replace it. No root needed: nothing runs.
    let dir = std::env::temp_dir().join(format!("cwreap-noclose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let cfg = dir.join("cwreap.yaml");
    std::fs::write(
        &cfg,
        "targets:\n  - name: t\n    match: {comm: leaky}\n    older_than: 1m\n    action: shutdown\n    escalate: {close_after: 10m}\n",
    )
    .expect("write policy");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let path = cfg.to_str().expect("utf-8 path");
    for cmd in ["check", "run"] {
        let out = cwreap(&[cmd, "--config", path]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{cmd}: one line: {err}");
        assert!(err.contains("close_after` is gone"), "{cmd}: {err}");
        assert!(
            err.contains("raise_fd_limit_at") && err.contains("signal_at"),
            "{cmd}: names the escalations: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
