//! A process whose main thread has exited (`pthread_exit` in main) while other threads hold
//! CLOSE_WAIT sockets: its thread-group leader is a zombie, /proc/PID/fd is empty, and
//! pidfd_getfd through the process's pidfd fails with ESRCH. `cwreap scan`, `cwreap reap`
//! and the daemon must still find and reap those sockets, through a live thread.
//!
//! The server is leaky.c --dead-leader (tests/runtimes/), built with gcc at test time.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};

use crate::support::runtimes::{Runtime, Server};
use crate::support::*;

/// Start the dead-leader server and wait until its leader is a zombie; None when gcc is
/// missing outside CI.
fn dead_leader_server(test: &str) -> Option<Server> {
    let server = Server::start(test, Runtime::CDeadLeader, &["127.0.0.1:0"])?;
    let pid = server.pid();
    wait_until(
        "the main thread to exit",
        || server.transcript(),
        || (thread_state(pid, pid)? == 'Z').then_some(()),
    );
    // The hazard: the leader's fd table shows nothing, while a live thread's shows all.
    let leader_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leader_fds, 0, "{}", server.transcript());
    Some(server)
}

/// `n` half-closed clients: the server holds each in CLOSE_WAIT. Returns them with the
/// server's fd for each.
fn leak(server: &mut Server, n: usize) -> Vec<(TcpStream, i32)> {
    (0..n).map(|_| server.close_wait(0)).collect()
}

fn fds_of(rows: &[serde_json::Value], pid: i32) -> BTreeSet<i32> {
    rows.iter()
        .filter(|r| r["pid"].as_i64() == Some(i64::from(pid)))
        .map(|r| field_i64(r, "fd") as i32)
        .collect()
}

#[test]
#[ignore = "needs root: cwreap duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn scan_and_reap_find_the_sockets_of_a_process_whose_main_thread_exited() {
    let test = "scan_and_reap_find_the_sockets_of_a_process_whose_main_thread_exited";
    let Some(mut server) = dead_leader_server(test) else {
        return;
    };
    let pid = server.pid();
    let listen: SocketAddr = server.listen[0];
    let mut clients = leak(&mut server, 3);
    let fds: BTreeSet<i32> = clients.iter().map(|(_, fd)| *fd).collect();
    assert_eq!(ss_close_wait_on_port(listen.port()), 3);

    let out = cwreap(&["scan", "--pid", &pid.to_string(), "--json"]);
    assert!(out.status.success(), "scan: {}", stderr(&out));
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 3, "{}", stdout(&out));
    assert_eq!(fds_of(&rows, pid), fds, "scan attributed other fds");
    for r in &rows {
        assert_eq!(field_str(r, "local"), listen.to_string());
        assert_eq!(field_str(r, "comm"), "leaky-c");
    }

    let mark = server.mark();
    let out = cwreap(&[
        "reap",
        "--pid",
        &pid.to_string(),
        "--older-than",
        "0s",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "reap: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 3, "{}", stdout(&out));
    assert!(
        rows.iter().all(|r| field_str(r, "outcome") == "reaped"),
        "{}",
        stdout(&out)
    );
    assert_eq!(fds_of(&rows, pid), fds);
    for (client, fd) in &mut clients {
        assert!(
            reads_eof(client, HANG_GUARD),
            "the peer of fd {fd} read no EOF\n{}",
            server.transcript()
        );
    }
    // The server handles EPOLLHUP: it closes what cwreap shut down.
    server.wait_released(mark, &fds);
    assert_eq!(ss_close_wait_on_port(listen.port()), 0);
    assert!(server.alive(), "{}", server.transcript());
    assert!(server.errors().is_empty(), "{}", server.transcript());
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn the_daemon_reaps_the_sockets_of_a_process_whose_main_thread_exited() {
    let test = "the_daemon_reaps_the_sockets_of_a_process_whose_main_thread_exited";
    let Some(mut server) = dead_leader_server(test) else {
        return;
    };
    let pid = server.pid();
    let listen = server.listen[0];
    let mut clients = leak(&mut server, 3);
    let fds: BTreeSet<i32> = clients.iter().map(|(_, fd)| *fd).collect();
    let mark = server.mark();
    // Matched by comm and cmdline too: the leader's cmdline is empty once it has exited,
    // so the daemon must read them through a live thread.
    let mut d = LoggedDaemon::start(
        "dead-leader",
        &format!(
            "interval: 200ms\ndry_run: false\nlog_format: json\nmetrics: off\n\
             audit_log: {{dir}}/audit.jsonl\ntargets:\n  - name: dead\n    match: \
             {{pid: {pid}, comm: \"^leaky-c$\", cmdline: \"--dead-leader\"}}\n    \
             older_than: 1s\n    action: shutdown\n"
        ),
    );
    let reaped = d.wait_for("three reaps in the audit log", |d| {
        let got: BTreeSet<i32> = d
            .audit()
            .iter()
            .filter(|a| a["event"] == "action" && a["outcome"] == "reaped")
            .filter(|a| a["pid"].as_i64() == Some(i64::from(pid)))
            .filter_map(|a| a["fd"].as_i64().map(|f| f as i32))
            .collect();
        (got.len() >= 3).then_some(got)
    });
    assert_eq!(reaped, fds, "{}", d.log());
    for (client, fd) in &mut clients {
        assert!(
            reads_eof(client, HANG_GUARD),
            "the peer of fd {fd} read no EOF\n{}",
            d.log()
        );
    }
    server.wait_released(mark, &fds);
    assert_eq!(ss_close_wait_on_port(listen.port()), 0, "{}", d.log());
    let errors: Vec<String> = d
        .audit()
        .iter()
        .filter(|a| a["outcome"] == "error")
        .map(|a| a.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}\n{}", d.log());
    // The release watch saw the owner let go (read through the live thread).
    let released = d.wait_for("three fd_release events", |d| {
        let n = d
            .audit()
            .iter()
            .filter(|a| a["event"] == "fd_release" && a["result"] == "released")
            .count();
        (n >= 3).then_some(n)
    });
    assert_eq!(released, 3, "{}", d.log());
}
