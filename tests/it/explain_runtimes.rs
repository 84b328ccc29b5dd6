//! `cwreap explain` names the runtime and gives that runtime's fix, on real programs: a
//! urllib3 pool's idle connections the server closed (`pool_idle`, python), a Node http
//! server paused by backpressure under a handler that never responds (`not_read`, node,
//! although libuv took the fd out of its epoll set), a C server that forgets the fd at
//! read()==0 (`eof_unwatched`, other, no Node advice), and two Java servers: one that keeps
//! its Sockets in a list, one that drops them. The GC hint is shown exactly where a
//! collection can close the socket: for the dropped Sockets (and a full GC then closes
//! them), and not for the listed ones once a full collection has shown they are still
//! referenced.
//!
//! Tests decide by counts and by what ss, /proc and the programs say; clocks only guard
//! against hangs. Like tests/it/explain.rs, they read only their own child processes.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{Shutdown, TcpStream};

use crate::explain::{GC_HINT, assert_patterns, explain_one, explain_text, sockets};
use crate::support::pool::PoolPair;
use crate::support::runtimes::{Runtime, Server, jcmd_gc};
use crate::support::ss::Ss;
use crate::support::{fd_inode, fold, wait_until};

/// Connections per test.
const K: usize = 6;

/// (fd, recv_q) of every CLOSE_WAIT socket `pid` holds, according to ss.
fn ss_close_wait_queues(pid: i32) -> BTreeSet<(i32, u64)> {
    Ss::new()
        .state("close-wait")
        .run()
        .iter()
        .filter_map(|s| Some((s.fd_of(pid)?, s.recv_q)))
        .collect()
}

/// The `runtime` of a report line.
fn runtime(line: &serde_json::Value) -> &str {
    line["runtime"]
        .as_str()
        .unwrap_or_else(|| panic!("no runtime in {line}"))
}

/// The `gc_may_close` of every socket of a report line.
fn gc_may_close(line: &serde_json::Value) -> Vec<bool> {
    line["sockets"]
        .as_array()
        .unwrap_or_else(|| panic!("no sockets in {line}"))
        .iter()
        .map(|s| {
            s["gc_may_close"]
                .as_bool()
                .unwrap_or_else(|| panic!("no gc_may_close in {s}"))
        })
        .collect()
}

/// Fail unless `text` contains each of `words` and none of `not`.
fn assert_words(what: &str, text: &str, words: &[&str], not: &[&str]) {
    for w in words {
        assert!(text.contains(w), "{what}: no {w:?} in\n{}", fold(text));
    }
    for w in not {
        assert!(!text.contains(w), "{what}: {w:?} in\n{}", fold(text));
    }
}

fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[test]
fn urllib3_idle_pooled_connections_are_pool_idle() {
    let test = "urllib3_idle_pooled_connections_are_pool_idle";
    let Some(mut p) = PoolPair::start(test, K) else {
        return;
    };
    p.send(&format!("fill {K}"));
    let said = p.expect("filled");
    assert_eq!(said.len(), 1, "fill failed: {said:?}");
    let pid = p.pid();
    // The server closes each after a second idle; the pool has not checked any out since,
    // so nothing read the FIN: recv_q 1 each.
    let ends = wait_until(
        "the pool's ends in CLOSE_WAIT",
        || format!("{:?}", ss_close_wait_queues(pid)),
        || {
            let e = ss_close_wait_queues(pid);
            (e.len() == K && e.iter().all(|(_, q)| *q == 1)).then_some(e)
        },
    );
    let line = explain_one(pid, &[]);
    assert_patterns(&line, &[("pool_idle", K)]);
    assert_eq!(runtime(&line), "python", "{line}");
    let fds: BTreeSet<i64> = ends.iter().map(|(fd, _)| i64::from(*fd)).collect();
    let socks = sockets(&line);
    assert_eq!(
        socks.iter().filter_map(|s| s.0).collect::<BTreeSet<_>>(),
        fds
    );
    for (s, raw) in socks
        .iter()
        .zip(line["sockets"].as_array().into_iter().flatten())
    {
        assert_eq!((s.1, s.2, s.3.as_str()), (1, false, "pool_idle"), "{raw}");
        assert_eq!(raw["direction"], "out", "{raw}");
    }
    assert_eq!(gc_may_close(&line), vec![false; K], "{line}");
    let text = explain_text(pid);
    assert_words(
        "urllib3 pool",
        &text,
        &[
            &format!("{K:>5}  pool_idle ("),
            "runtime: python (",
            "next checkout",
            "safe to reap",
        ],
        &[GC_HINT, "abandoned", "dropped without close()"],
    );
    say(&format!(
        "{test}: {K} idle pooled connections, all pool_idle"
    ));
}

#[test]
fn node_http_paused_by_backpressure_is_not_read() {
    let test = "node_http_paused_by_backpressure_is_not_read";
    let Some(mut srv) = Server::start(test, Runtime::NodeHttpPaused, &["127.0.0.1:0"]) else {
        return;
    };
    let pid = srv.pid();
    const HEAD: &[u8] = b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 1048576\r\n\r\n";
    // More than the request's buffer (16 KiB), less than what the socket takes unread.
    const FIRST: usize = 32 * 1024;
    const TAIL: usize = 8 * 1024;
    let mut clients: Vec<TcpStream> = Vec::new();
    let mut fds = BTreeSet::new();
    for _ in 0..K {
        let (mut c, fd, at) = srv.connect_at(0);
        c.write_all(HEAD)
            .and_then(|()| c.write_all(&[b'x'; FIRST]))
            .unwrap_or_else(|e| srv.fail(&format!("send the request: {e}")));
        let want = format!("paused {fd}");
        srv.wait_line(at + 1, &want, |l| (l == want).then_some(()));
        // Sent after the pause: never read, in front of the FIN.
        c.write_all(&[b'y'; TAIL])
            .and_then(|()| c.shutdown(Shutdown::Write))
            .unwrap_or_else(|e| srv.fail(&format!("send the tail: {e}")));
        clients.push(c);
        fds.insert(fd);
    }
    // Each in CLOSE_WAIT with the tail and the FIN unread, and out of every epoll set of
    // Node's (libuv removes a stopped fd at its next event, which the tail brings).
    let want: BTreeSet<(i32, u64)> = fds.iter().map(|&fd| (fd, TAIL as u64 + 1)).collect();
    let proc = cwreap_linux::procfs::ProcFs::default();
    let inodes: Vec<u64> = fds
        .iter()
        .map(|&fd| fd_inode(pid, fd).unwrap_or_else(|| srv.fail(&format!("no fd {fd}"))))
        .collect();
    wait_until(
        "the paused sockets in CLOSE_WAIT and out of Node's epoll sets",
        || format!("ss: {:?}\n{}", ss_close_wait_queues(pid), srv.transcript()),
        || {
            let table = proc.fd_table(pid).ok()?;
            let watched = proc.epoll_watched(pid, &table.epoll).ok()?;
            (ss_close_wait_queues(pid) == want && !inodes.iter().any(|i| watched.contains(i)))
                .then_some(())
        },
    );
    let line = explain_one(pid, &[]);
    assert_patterns(&line, &[("not_read", K)]);
    assert_eq!(runtime(&line), "node", "{line}");
    for s in sockets(&line) {
        assert_eq!(
            (s.1, s.2, s.3.as_str()),
            (TAIL as i64 + 1, false, "not_read"),
            "fd {:?}",
            s.0
        );
    }
    assert_eq!(gc_may_close(&line), vec![false; K], "{line}");
    let text = explain_text(pid);
    assert_words(
        "node http",
        &text,
        &[
            &format!("{K:>5}  not_read ("),
            "runtime: node (",
            "paused",
            "backpressure",
            "request body",
        ],
        &[GC_HINT, "abandoned"],
    );
    if !srv.alive() {
        srv.fail("the server exited");
    }
    say(&format!("{test}: {K} paused sockets, all not_read"));
}

#[test]
fn c_server_dropping_the_fd_at_eof_gets_c_advice() {
    let test = "c_server_dropping_the_fd_at_eof_gets_c_advice";
    let Some(mut srv) = Server::start(test, Runtime::CDrop, &["127.0.0.1:0"]) else {
        return;
    };
    let pid = srv.pid();
    // `eof FD` comes after the loop deleted the fd from its epoll set.
    let clients: Vec<(TcpStream, i32)> = (0..K).map(|_| srv.close_wait(0)).collect();
    let want: BTreeSet<(i32, u64)> = clients.iter().map(|(_, fd)| (*fd, 0)).collect();
    assert_eq!(ss_close_wait_queues(pid), want);
    let line = explain_one(pid, &[]);
    assert_patterns(&line, &[("eof_unwatched", K)]);
    assert_eq!(runtime(&line), "other", "{line}");
    for s in sockets(&line) {
        assert_eq!((s.1, s.2, s.3.as_str()), (0, false, "eof_unwatched"));
    }
    assert_eq!(gc_may_close(&line), vec![false; K], "{line}");
    let text = explain_text(pid);
    assert_words(
        "C server",
        &text,
        &[
            &format!("{K:>5}  eof_unwatched ("),
            "runtime: other (",
            "read() returned 0",
            "close(",
        ],
        &[GC_HINT, "allowHalfOpen", "Node", "Java", "Python"],
    );
    say(&format!(
        "{test}: {K} dropped fds, eof_unwatched with C advice"
    ));
}

/// `gc.full_collections` of a JVM's report line: the full collections it has run.
fn full_gcs(line: &serde_json::Value) -> u64 {
    line["gc"]["full_collections"]
        .as_u64()
        .unwrap_or_else(|| panic!("no gc.full_collections in {line}"))
}

#[test]
fn java_sockets_kept_in_a_list_survive_a_full_gc_and_get_no_gc_hint() {
    let test = "java_sockets_kept_in_a_list_survive_a_full_gc_and_get_no_gc_hint";
    let Some(mut srv) = Server::start(test, Runtime::JavaHold, &["127.0.0.1:0"]) else {
        return;
    };
    let pid = srv.pid();
    // Each accepted Socket goes into a list, never read: the FIN stays unread.
    let clients: Vec<(TcpStream, i32)> = (0..K)
        .map(|_| {
            let (c, fd) = srv.connect(0);
            c.shutdown(Shutdown::Write)
                .unwrap_or_else(|e| srv.fail(&format!("half-close: {e}")));
            (c, fd)
        })
        .collect();
    let want: BTreeSet<(i32, u64)> = clients.iter().map(|(_, fd)| (*fd, 1)).collect();
    wait_until(
        "the listed sockets in CLOSE_WAIT",
        || format!("{:?}", ss_close_wait_queues(pid)),
        || (ss_close_wait_queues(pid) == want).then_some(()),
    );
    // No full collection yet: nobody can tell a listed Socket from a dropped one, and
    // explain says the GC may close them if they were dropped.
    let before = explain_one(pid, &[]);
    assert_patterns(&before, &[("abandoned", K)]);
    assert_eq!(runtime(&before), "jvm", "{before}");
    assert_eq!(full_gcs(&before), 0, "{before}");
    assert_eq!(gc_may_close(&before), vec![true; K], "{before}");

    if !jcmd_gc(test, pid) {
        return;
    }
    // The list keeps them: the collection closed none.
    assert_eq!(ss_close_wait_queues(pid), want, "after jcmd GC.run");
    // Once the collection is past the time its Cleaner needs, explain knows they were
    // still referenced when it ran.
    let after = wait_until(
        "explain to count a full collection since the sockets' FIN",
        String::new,
        || {
            let line = explain_one(pid, &[]);
            gc_may_close(&line).iter().all(|m| !m).then_some(line)
        },
    );
    assert_patterns(&after, &[("abandoned", K)]);
    assert!(full_gcs(&after) >= 1, "{after}");
    let text = explain_text(pid);
    assert_words(
        "Java list",
        &text,
        &[
            &format!("{K:>5}  abandoned ("),
            "runtime: jvm (",
            "survived a full collection",
            "still references",
        ],
        &[GC_HINT, "allowHalfOpen"],
    );
    assert_eq!(
        ss_close_wait_queues(pid),
        want,
        "the sockets are still there"
    );
    say(&format!(
        "{test}: {K} listed sockets survived a full GC; no GC hint"
    ));
}

#[test]
fn java_dropped_sockets_get_the_gc_hint_and_a_full_gc_closes_them() {
    let test = "java_dropped_sockets_get_the_gc_hint_and_a_full_gc_closes_them";
    let Some(mut srv) = Server::start(test, Runtime::JavaDrop, &["127.0.0.1:0"]) else {
        return;
    };
    let pid = srv.pid();
    // Each thread reads the EOF and returns without close(), dropping the Socket.
    let clients: Vec<(TcpStream, i32)> = (0..K).map(|_| srv.close_wait(0)).collect();
    let want: BTreeSet<(i32, u64)> = clients.iter().map(|(_, fd)| (*fd, 0)).collect();
    assert_eq!(ss_close_wait_queues(pid), want);
    let line = explain_one(pid, &[]);
    assert_patterns(&line, &[("eof_unwatched", K)]);
    assert_eq!(runtime(&line), "jvm", "{line}");
    assert_eq!(full_gcs(&line), 0, "{line}");
    assert_eq!(gc_may_close(&line), vec![true; K], "{line}");
    let text = explain_text(pid);
    assert_words(
        "Java drop",
        &text,
        &[
            &format!("{K:>5}  eof_unwatched ("),
            "runtime: jvm (",
            "try-with-resources",
            GC_HINT,
            "jcmd",
        ],
        &["allowHalfOpen", "still references"],
    );

    // The hint holds: a full collection finds the Sockets unreachable and their Cleaner
    // closes every one.
    if !jcmd_gc(test, pid) {
        return;
    }
    wait_until(
        "the Cleaner to close the dropped sockets",
        || format!("{:?}\n{}", ss_close_wait_queues(pid), srv.transcript()),
        || ss_close_wait_queues(pid).is_empty().then_some(()),
    );
    if !srv.alive() {
        srv.fail("the server exited");
    }
    say(&format!(
        "{test}: {K} dropped sockets had the GC hint; a full GC closed all {K}"
    ));
}
