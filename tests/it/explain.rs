//! `cwreap explain` against real leaky servers: each bug class is named with exact counts
//! (Python abandon → `abandoned`, Python selectors → `eof_ignored`, Node allowHalfOpen →
//! `eof_unwatched`, Go → `eof_ignored`, a server that never accepts → `unaccepted`), with
//! the runtime named, and with `--for` the leak rate and the EMFILE forecast match what `ss`
//! and /proc count over the same window. Runtime-specific advice and the GC hint are in
//! explain_runtimes.rs.
//!
//! Tests decide by counts; clocks only guard against hangs. Needs root (like scan, explain
//! reads other processes' /proc/PID/fd and fdinfo) and the runtimes (tests/runtimes/).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::runtimes::{HANG_GUARD, Runtime, Server};
use crate::support::ss::Ss;
use crate::support::{Fixture, cwreap, fd_count, field_i64, fold, json_lines, ss_close_wait};

/// Half-closed connections per pattern test.
const K: usize = 12;

pub(crate) const PATTERNS: [&str; 6] = [
    "eof_ignored",
    "not_read",
    "eof_unwatched",
    "abandoned",
    "pool_idle",
    "unaccepted",
];

/// What explain says where a collection can close a socket the program dropped.
pub(crate) const GC_HINT: &str = "GC may close";

pub(crate) fn output_text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}stderr:\n{}",
        o.status.code(),
        fold(&String::from_utf8_lossy(&o.stdout)),
        fold(&String::from_utf8_lossy(&o.stderr))
    )
}

/// `cwreap explain ARGS --json` for one pid: exit 0 and exactly one line, for that pid.
pub(crate) fn explain_one(pid: i32, extra: &[&str]) -> serde_json::Value {
    let pid_s = pid.to_string();
    let mut args = vec!["explain", "--pid", &pid_s, "--json"];
    args.extend_from_slice(extra);
    let out = cwreap(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}\n{}",
        output_text(&out)
    );
    let mut lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{args:?}\n{}", output_text(&out));
    let line = lines.remove(0);
    assert_eq!(field_i64(&line, "pid"), i64::from(pid), "{line}");
    line
}

/// Fail unless the pattern counts are exactly `want` (every other pattern 0).
pub(crate) fn assert_patterns(line: &serde_json::Value, want: &[(&str, usize)]) {
    for p in PATTERNS {
        let expected = want.iter().find(|(n, _)| *n == p).map_or(0, |(_, c)| *c);
        let got = line["patterns"][p].as_u64();
        assert_eq!(
            got,
            Some(expected as u64),
            "pattern {p}: {}",
            fold(&line.to_string())
        );
    }
}

/// The (fd, recv_q, watched, pattern) of each socket of a line.
pub(crate) fn sockets(line: &serde_json::Value) -> Vec<(Option<i64>, i64, bool, String)> {
    line["sockets"]
        .as_array()
        .unwrap_or_else(|| panic!("no sockets array in {line}"))
        .iter()
        .map(|s| {
            (
                s["fd"].as_i64(),
                field_i64(s, "recv_q"),
                s["watched"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("no watched in {s}")),
                s["pattern"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

/// The text report of `explain --pid PID`, which must exit 0.
pub(crate) fn explain_text(pid: i32) -> String {
    let out = cwreap(&["explain", "--pid", &pid.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the runtime and the GC are expected to be in a report.
struct Expect {
    /// The `runtime` explain names.
    runtime: &'static str,
    /// Whether the text says a collection may close the sockets; None: not checked (Go:
    /// whether a collection ever runs is not visible from outside, so the hint stays
    /// conditional whatever the program does).
    gc_hint: Option<bool>,
}

/// Start `rt`, leave K connections half-closed (server side in CLOSE_WAIT), and check
/// `explain` names them all `pattern`, with `recv_q` and `watched` as given, and names the
/// runtime.
fn one_pattern(test: &str, rt: Runtime, pattern: &str, recv_q: i64, watched: bool, expect: Expect) {
    let Some(mut srv) = Server::start(test, rt, &["127.0.0.1:0"]) else {
        return;
    };
    let pid = srv.pid();
    let clients: Vec<(TcpStream, i32)> = (0..K).map(|_| srv.close_wait(0)).collect();
    let fds: BTreeSet<i32> = clients.iter().map(|(_, fd)| *fd).collect();
    let ss: BTreeSet<i32> = ss_close_wait(pid).iter().map(|t| t.0).collect();
    if ss != fds {
        srv.fail(&format!(
            "ss shows CLOSE_WAIT fds {ss:?}, the clients {fds:?}"
        ));
    }

    let line = explain_one(pid, &[]);
    assert_patterns(&line, &[(pattern, K)]);
    let socks = sockets(&line);
    let got: BTreeSet<i32> = socks
        .iter()
        .filter_map(|s| s.0.and_then(|fd| i32::try_from(fd).ok()))
        .collect();
    assert_eq!(got, fds, "{}: explain lists other fds", rt.name());
    for s in &socks {
        assert_eq!(
            (s.1, s.2, s.3.as_str()),
            (recv_q, watched, pattern),
            "{}: socket fd {:?}",
            rt.name(),
            s.0
        );
    }
    assert_eq!(field_i64(&line, "close_wait"), K as i64);
    assert_eq!(line["top_remotes"][0]["addr"], "127.0.0.1", "{line}");
    assert_eq!(field_i64(&line["top_remotes"][0], "count"), K as i64);
    assert_eq!(
        field_i64(&line["top_local_ports"][0], "port"),
        i64::from(srv.listen[0].port())
    );
    // One sample: no rate, no forecast.
    assert!(line["leak_per_min"].is_null() && line["emfile_in_s"].is_null());
    assert!(field_i64(&line, "open_fds") >= K as i64);
    assert!(field_i64(&line, "fd_limit") > 0, "{line}");
    assert_eq!(
        line["runtime"],
        expect.runtime,
        "{}",
        fold(&line.to_string())
    );

    // The text report names the pattern and what it means, and the runtime.
    let text = explain_text(pid);
    assert!(
        text.contains(&format!("{K:>5}  {pattern} (")),
        "{}",
        fold(&text)
    );
    assert!(
        text.contains(&format!("  runtime: {} (", expect.runtime)),
        "{}",
        fold(&text)
    );
    if let Some(hint) = expect.gc_hint {
        assert_eq!(text.contains(GC_HINT), hint, "GC hint: {}", fold(&text));
    }
    if !srv.alive() {
        srv.fail("the server exited");
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: {K} sockets, all {pattern} (recv_q {recv_q}, watched {watched})"
    );
}

#[test]
fn python_abandon_is_abandoned() {
    // Thread per connection; a client that leaves before sending anything is dropped into a
    // list unread: no epoll anywhere, and the FIN stays in the queue.
    // CPython closes a socket object nothing references at once: these are in a list, and
    // no collection will close them.
    one_pattern(
        "python_abandon_is_abandoned",
        Runtime::PythonAbandon,
        "abandoned",
        1,
        false,
        Expect {
            runtime: "python",
            gc_hint: Some(false),
        },
    );
}

#[test]
fn python_selectors_is_eof_ignored() {
    // An epoll loop that read b'' and kept the socket registered.
    one_pattern(
        "python_selectors_is_eof_ignored",
        Runtime::PythonSelectors,
        "eof_ignored",
        0,
        true,
        Expect {
            runtime: "python",
            gc_hint: Some(false),
        },
    );
}

#[test]
fn node_half_open_is_eof_unwatched() {
    // allowHalfOpen: Node reads the EOF (recv_q 0), emits 'end' and stops reading, waiting
    // for end(). libuv's uv_read_stop only forgets the watcher; the epoll registration goes
    // at the next event on that fd, which the readable EOF delivers at once, so the socket
    // leaves the epoll set right away (checked on Node 20: the listener is the only socket
    // left in its epoll fdinfo).
    one_pattern(
        "node_half_open_is_eof_unwatched",
        Runtime::Node,
        "eof_unwatched",
        0,
        false,
        Expect {
            runtime: "node",
            gc_hint: Some(false),
        },
    );
}

#[test]
fn go_kept_conn_is_eof_ignored() {
    // Go's netpoll keeps a net.Conn's fd registered until Close(): watched, EOF read. The
    // runtime is named from the executable's .go.buildinfo section (a static binary maps
    // no library that would tell).
    one_pattern(
        "go_kept_conn_is_eof_ignored",
        Runtime::Go,
        "eof_ignored",
        0,
        true,
        Expect {
            runtime: "go",
            gc_hint: None,
        },
    );
}

/// CLOSE_WAIT sockets on `port` with no process (in an accept queue), according to ss.
fn ss_unaccepted(port: u16) -> usize {
    Ss::new()
        .state("close-wait")
        .sport(port)
        .run()
        .iter()
        .filter(|s| s.holders.is_empty())
        .count()
}

#[test]
fn never_accepted_is_unaccepted() {
    let test = "never_accepted_is_unaccepted";
    let fx = Fixture::start(&["127.0.0.1:0"], &["--no-accept"]);
    let port = fx.listen[0].port();
    let _clients: Vec<TcpStream> = (0..K)
        .map(|_| {
            let c = TcpStream::connect(fx.listen[0]).expect("connect");
            c.shutdown(Shutdown::Write).expect("half-close");
            c
        })
        .collect();
    // The FINs are processed asynchronously.
    let guard = Instant::now() + HANG_GUARD;
    while ss_unaccepted(port) < K {
        assert!(
            Instant::now() < guard,
            "ss shows {} of {K} unaccepted CLOSE_WAIT sockets",
            ss_unaccepted(port)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let line = explain_one(fx.pid(), &[]);
    assert_patterns(&line, &[("unaccepted", K)]);
    for s in sockets(&line) {
        assert_eq!(s.0, None, "an unaccepted socket has no fd");
        assert_eq!((s.2, s.3.as_str()), (false, "unaccepted"));
    }
    let _ = writeln!(std::io::stderr(), "{test}: {K} sockets, all unaccepted");
}

/// (local, remote) of every CLOSE_WAIT socket on `listen`'s address, accepted or not.
fn ss_close_wait_on(listen: SocketAddr) -> BTreeSet<(SocketAddr, SocketAddr)> {
    Ss::new()
        .without_processes()
        .state("close-wait")
        .sport(listen.port())
        .run()
        .into_iter()
        .filter_map(|s| (s.local == listen).then_some((s.local, s.peer?)))
        .collect()
}

/// Whether `got` is within ±25 % of `want`.
fn close_to(got: f64, want: f64) -> bool {
    (got - want).abs() <= 0.25 * want.abs()
}

#[test]
fn forecast_matches_ss_and_proc() {
    let test = "forecast_matches_ss_and_proc";
    let Some(mut srv) = Server::start(test, Runtime::PythonAbandon, &["127.0.0.1:0"]) else {
        return;
    };
    let pid = srv.pid();
    const LIMIT: usize = 1100;
    // The same as starting it under `prlimit --nofile=1100:1100`, before any leak.
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={LIMIT}:{LIMIT}"),
        ])
        .output()
        .expect("run prlimit");
    assert!(out.status.success(), "prlimit: {}", output_text(&out));
    // Some CLOSE_WAIT before the window, so the process is explained from the start.
    let _before: Vec<(TcpStream, i32)> = (0..3).map(|_| srv.close_wait(0)).collect();
    let listen = srv.listen[0];

    let ss_start = ss_close_wait_on(listen);
    let fds_start = fd_count(pid);
    let t0 = Instant::now();
    let pid_s = pid.to_string();
    let run =
        std::thread::spawn(move || cwreap(&["explain", "--pid", &pid_s, "--for", "5s", "--json"]));
    // One new CLOSE_WAIT every 500 ms until explain is done, half a period after its
    // samples (one a second from its start), so that no arrival races a sample. The
    // kernel puts a socket in CLOSE_WAIT at the client's FIN, accepted or not: the pace is
    // this loop's, even when the server is slow to run (ss and explain both count sockets
    // still in the accept queue).
    std::thread::sleep(Duration::from_millis(250));
    let guard = Instant::now() + HANG_GUARD;
    let mut clients = Vec::new();
    while !run.is_finished() {
        let c = TcpStream::connect_timeout(&listen, HANG_GUARD)
            .unwrap_or_else(|e| srv.fail(&format!("connect: {e}")));
        c.shutdown(Shutdown::Write)
            .unwrap_or_else(|e| srv.fail(&format!("half-close: {e}")));
        clients.push(c);
        std::thread::sleep(Duration::from_millis(500));
        if Instant::now() > guard {
            srv.fail("cwreap explain --for 5s did not finish");
        }
    }
    let out = run.join().expect("explain thread");
    let ss_end = ss_close_wait_on(listen);
    let fds_end = fd_count(pid);
    let window = t0.elapsed().as_secs_f64();

    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{}", output_text(&out));
    let line = &lines[0];
    let ss_new = ss_end.difference(&ss_start).count();
    let leak = line["leak_per_min"]
        .as_f64()
        .unwrap_or_else(|| panic!("no leak_per_min: {line}"));
    let explain_window = line["window_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("no window_s: {line}"));
    // Both sides as arrivals per minute: ss's count over the test's window (which holds
    // explain's, plus its start-up), explain's rate over its own samples.
    let ss_per_min = ss_new as f64 * 60.0 / window;
    let explain_new = leak * explain_window / 60.0;
    let growth = fds_end.saturating_sub(fds_start);
    let per_s = growth as f64 / window;
    let want_emfile = (LIMIT - fds_end) as f64 / per_s;
    let emfile = line["emfile_in_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("no emfile_in_s: {line}"));
    let summary = format!(
        "ss: {ss_new} new CLOSE_WAIT in {window:.2} s = {ss_per_min:.1}/min; explain: \
{leak}/min ({explain_new:.1} new in {explain_window} s); /proc: {fds_start} -> {fds_end} fds \
(+{growth}); EMFILE: explain {emfile} s, expected {want_emfile:.0} s; {}",
        fold(&line.to_string().chars().take(600).collect::<String>())
    );
    assert!(ss_new >= 5, "too few arrivals to measure: {summary}");
    assert!(close_to(leak, ss_per_min), "rate: {summary}");
    assert!(close_to(emfile, want_emfile), "forecast: {summary}");
    assert_eq!(field_i64(line, "fd_limit"), LIMIT as i64, "{summary}");
    // Every one has its FIN unread: abandoned, or unaccepted if the server had not got to
    // it yet at the last sample.
    let (abandoned, unaccepted) = (
        line["patterns"]["abandoned"].as_u64().unwrap_or(0),
        line["patterns"]["unaccepted"].as_u64().unwrap_or(0),
    );
    assert!(
        abandoned >= 3 && abandoned + unaccepted == field_i64(line, "close_wait") as u64,
        "patterns: {summary}"
    );
    // Once the server has accepted them all: exactly every one abandoned.
    let total = 3 + clients.len();
    let guard = Instant::now() + HANG_GUARD;
    while ss_close_wait(pid).len() < total {
        if Instant::now() > guard {
            srv.fail(&format!(
                "ss never showed {total} accepted CLOSE_WAIT sockets"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_patterns(&explain_one(pid, &[]), &[("abandoned", total)]);
    let _ = writeln!(std::io::stderr(), "{test}: {summary}");
}

#[test]
fn no_new_sockets_no_forecast() {
    let test = "no_new_sockets_no_forecast";
    let Some(mut srv) = Server::start(test, Runtime::PythonAbandon, &["127.0.0.1:0"]) else {
        return;
    };
    let _clients: Vec<(TcpStream, i32)> = (0..3).map(|_| srv.close_wait(0)).collect();
    let line = explain_one(srv.pid(), &["--for", "2s"]);
    assert_patterns(&line, &[("abandoned", 3)]);
    assert_eq!(line["leak_per_min"].as_f64(), Some(0.0), "{line}");
    assert!(line["emfile_in_s"].is_null(), "{line}");
    assert_eq!(field_i64(&line, "arrivals"), 0);
    assert!(field_i64(&line, "samples") >= 2, "{line}");
}

/// Read-only for real: under seccomp filters that kill cwreap on ptrace (stopping a
/// process), kill or pidfd_send_signal, explain still runs to the end and names the
/// pattern, host-wide and by pid, with and without `--for`. It duplicates no socket that a
/// sock_diag table lists: by pid (the server's sockets are all in a table), pidfd_getfd
/// kills it too. Host-wide it may meet a socket in no table (another process's dead held
/// one), the only kind it duplicates, to tell whether it is dead: there pidfd_getfd is
/// refused (EPERM, as a container's seccomp profile does) and it still ends.
#[cfg(target_arch = "x86_64")]
#[test]
fn never_duplicates_stops_or_signals() {
    let test = "never_duplicates_stops_or_signals";
    let Some(mut srv) = Server::start(test, Runtime::PythonSelectors, &["127.0.0.1:0"]) else {
        return;
    };
    let _clients: Vec<(TcpStream, i32)> = (0..3).map(|_| srv.close_wait(0)).collect();
    let pid = srv.pid();
    let pid_s = pid.to_string();
    // The hazard for the host-wide run: a dead held socket (reset by its peer, its fd
    // still held, in no table), held here by the test process.
    let _dead = dead_held_socket();
    let run = |args: &[&str], getfd: u32| {
        let mut cmd = Command::new(crate::support::cwreap_bin());
        cmd.args(args);
        cwreap_linux::testing::filter_syscall(&mut cmd, libc::SYS_pidfd_getfd, getfd);
        for nr in [
            libc::SYS_ptrace,
            libc::SYS_kill,
            libc::SYS_pidfd_send_signal,
        ] {
            cwreap_linux::testing::filter_syscall(&mut cmd, nr, libc::SECCOMP_RET_KILL_PROCESS);
        }
        cmd.output().expect("run cwreap")
    };
    let refused = libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32);
    for (args, getfd) in [
        (vec!["explain", "--json"], refused),
        (
            vec!["explain", "--pid", pid_s.as_str(), "--json"],
            libc::SECCOMP_RET_KILL_PROCESS,
        ),
        (
            vec!["explain", "--pid", pid_s.as_str(), "--for", "1s", "--json"],
            libc::SECCOMP_RET_KILL_PROCESS,
        ),
    ] {
        let out = run(&args, getfd);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}\n{}",
            output_text(&out)
        );
        let line = json_lines(&out)
            .into_iter()
            .find(|l| l["pid"].as_i64() == Some(i64::from(pid)))
            .unwrap_or_else(|| panic!("{args:?}: no line for {pid}\n{}", output_text(&out)));
        assert_patterns(&line, &[("eof_ignored", 3)]);
        if getfd == refused {
            // It met the dead socket, tried, and says what it could not tell.
            let err = crate::support::stderr(&out);
            assert!(
                err.contains("dead held sockets") && err.contains("are unknown"),
                "{args:?}\n{}",
                output_text(&out)
            );
        }
    }
    // The control: a dry-run reap duplicates, and the filters catch it.
    let out = run(
        &["reap", "--pid", &pid_s, "--older-than", "0s", "--dry-run"],
        libc::SECCOMP_RET_KILL_PROCESS,
    );
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGSYS),
        "{}",
        output_text(&out)
    );
    if !srv.alive() {
        srv.fail("the server exited");
    }
}

/// A connected socket whose peer reset it: in state CLOSE, in no sock_diag table, its fd
/// held by whoever keeps the returned stream.
fn dead_held_socket() -> TcpStream {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    rustix::net::sockopt::set_socket_linger(&server, Some(Duration::ZERO)).expect("SO_LINGER");
    drop(server);
    // The reset has landed once a read sees it.
    let mut c = client;
    let mut buf = [0u8; 1];
    let _ = std::io::Read::read(&mut c, &mut buf);
    c
}

#[test]
fn usage_errors_exit_2() {
    let out = cwreap(&["explain", "--for", "soon"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        crate::support::stderr(&out).contains("--for"),
        "{}",
        output_text(&out)
    );
    // A pid that does not exist (pid_max is at most 2^22).
    let out = cwreap(&["explain", "--pid", "99999999"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        crate::support::stderr(&out).contains("pid 99999999: no such process"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn within_a_quarter() {
    assert!(close_to(10.0, 10.0) && close_to(12.5, 10.0) && close_to(7.5, 10.0));
    assert!(!close_to(12.6, 10.0) && !close_to(7.4, 10.0));
}
