//! `cwreap explain --where` on real programs that leak the way the incident did: each reads
//! the EOF in one named function and never closes, and has a second path that reads the EOF
//! and closes, which must never appear. While `explain --where --for` records, the test
//! opens K leaking and K closing connections; at the end, every leaking socket must be
//! reported, at least 95 % of them with the program's own leaking function on top of its
//! EOF-read stack (and file:line where the binary has the debug info), the opening stack
//! shown, and the closing function nowhere.
//!
//! Programs (tests/runtimes/where_*): a C server built `gcc -O2 -g` without frame pointers
//! (CFI unwinding), the same with its debug info stripped (names, no lines), a Go server on
//! `net`, a Go net/http server whose handler hangs (the report must say the handler did not
//! return), a Rust std server built here with rustc, and Node with --perf-basic-prof (libuv
//! reads the EOF: the report must say the loop read it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

use crate::support::runtimes::{go_program, source};
use crate::support::{
    json_lines, listening_port, skip_or_fail, ss_count, target_tmpdir, wait_until,
};

/// Leaking (and, as many, closing) connections per program.
const K: usize = 40;

/// A server started for one test, killed when dropped.
struct Prog {
    child: Child,
    port: u16,
    _stdout: BufReader<ChildStdout>,
}

impl Drop for Prog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prog {
    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }
}

fn start(cmd: &mut Command) -> Prog {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let port = listening_port(&mut stdout, &format!("{cmd:?}"));
    Prog {
        child,
        port,
        _stdout: stdout,
    }
}

/// A tool on PATH, or skip (fail in CI).
fn tool(test: &str, name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        skip_or_fail(test, &format!("{name} is not installed"));
    }
    found
}

/// Where this test process builds its programs.
fn build_dir() -> PathBuf {
    let dir = target_tmpdir()
        .join("where")
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).expect("create the build directory");
    dir
}

fn build(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The 1-based line of `marker` in a tests/runtimes source.
fn line_of(file: &str, marker: &str) -> u32 {
    let text = std::fs::read_to_string(source(file)).expect("read the source");
    let at = text
        .lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} in {file}"));
    u32::try_from(at + 1).expect("line")
}

/// Run `explain --where --for 6s --pid PID --json`; once it records, `drive()`; then wait
/// until `leaking` sockets of the pid are in CLOSE_WAIT and the command ends. Its JSON line.
fn explain_where(pid: i32, leaking: usize, drive: impl FnOnce()) -> serde_json::Value {
    let mut cmd = Command::new(crate::support::cwreap_bin());
    cmd.args(["explain", "--where", "--for", "6s", "--json", "--pid"])
        .arg(pid.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start cwreap");
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut first = String::new();
    err.read_line(&mut first).expect("read cwreap's stderr");
    assert!(
        first.starts_with("recording"),
        "explain --where did not start recording: {first}"
    );
    drive();
    wait_until(
        "the leaking sockets in CLOSE_WAIT",
        || format!("{} in CLOSE_WAIT", ss_count(pid, "close-wait")),
        || (ss_count(pid, "close-wait") >= leaking).then_some(()),
    );
    let mut rest = String::new();
    err.read_to_string(&mut rest).expect("read cwreap's stderr");
    let out = child.wait_with_output().expect("wait for cwreap");
    assert_eq!(out.status.code(), Some(0), "{first}{rest}");
    let mut lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}\n{rest}");
    let line = lines.remove(0);
    assert_eq!(line["pid"].as_i64(), Some(i64::from(pid)), "{line}");
    line
}

/// K connections that send `leak` then close, and K that send `tidy` then close,
/// interleaved.
fn drive_bytes(port: u16, leak: &[u8], tidy: &[u8]) {
    for _ in 0..K {
        for msg in [leak, tidy] {
            let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            c.write_all(msg).expect("send");
        }
    }
}

/// The frames of a stack in a group.
fn frames<'a>(group: &'a serde_json::Value, stack: &str) -> &'a [serde_json::Value] {
    group[stack]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("no {stack} in {group}"))
}

/// Whether a frame is `function` (a Go or Rust path ending in it counts).
fn is(frame: &serde_json::Value, function: &str) -> bool {
    frame["function"].as_str().is_some_and(|f| {
        f == function
            || f.ends_with(&format!(".{function}"))
            || f.ends_with(&format!("::{function}"))
    })
}

/// Check a report: every leaking socket reported, ≥ 95 % with `leak_fn` first of its
/// EOF-read stack (with `line` when given), `tidy_fn` nowhere, an opening stack shown.
/// Prints and returns (matching sockets, reported sockets).
fn assert_accuracy(
    what: &str,
    line: &serde_json::Value,
    leak_fn: &str,
    tidy_fn: &str,
    at_line: Option<u32>,
) -> (u64, u64) {
    let groups = line["where"].as_array().unwrap_or_else(|| panic!("{line}"));
    let reported: u64 = groups.iter().filter_map(|g| g["count"].as_u64()).sum();
    let mut right = 0;
    for g in groups {
        let eof = frames(g, "eof_read");
        assert!(
            !eof.iter().any(|f| is(f, tidy_fn)),
            "{what}: the closing path {tidy_fn} is reported: {g}"
        );
        let first = eof
            .first()
            .unwrap_or_else(|| panic!("{what}: empty stack {g}"));
        if is(first, leak_fn)
            && at_line.is_none_or(|l| first["line"].as_u64() == Some(u64::from(l)))
        {
            right += g["count"].as_u64().unwrap_or(0);
            assert!(
                !frames(g, "opened").is_empty(),
                "{what}: no opening stack: {g}"
            );
        }
    }
    eprintln!("{what}: {right} of {reported} leaking sockets named {leak_fn} (K = {K})");
    assert_eq!(
        reported as usize, K,
        "{what}: every leaking socket is reported: {line}"
    );
    assert!(
        right * 100 >= 95 * reported,
        "{what}: {right} of {reported}: {line}"
    );
    (right, reported)
}

fn c_server(test: &str, strip: bool) -> Option<PathBuf> {
    let gcc = tool(test, "gcc")?;
    // A binary per test: tests run at once, and one must not run a binary another is
    // writing.
    let out = build_dir().join(format!(
        "where_c{}_{test}",
        if strip { "_stripped" } else { "" }
    ));
    build(
        Command::new(gcc)
            .args([
                "-std=gnu11",
                "-O2",
                "-g",
                "-fomit-frame-pointer",
                "-pthread",
                "-Wall",
                "-Werror",
                "-o",
            ])
            .arg(&out)
            .arg(source("where_server.c")),
    );
    if strip {
        build(Command::new(tool(test, "strip")?).arg("-g").arg(&out));
    }
    Some(out)
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn a_c_server_without_frame_pointers_is_named_with_its_line() {
    let Some(bin) = c_server(
        "a_c_server_without_frame_pointers_is_named_with_its_line",
        false,
    ) else {
        return;
    };
    let p = start(&mut Command::new(bin));
    let line = explain_where(p.pid(), K, || drive_bytes(p.port, b"L", b"C"));
    let want = line_of("where_server.c", "where: leak");
    assert_accuracy("C -O2 -g", &line, "leak_conn", "tidy_conn", Some(want));
    let g = &line["where"][0];
    let file = frames(g, "eof_read")[0]["file"].as_str().unwrap_or("");
    assert!(file.ends_with("where_server.c"), "{g}");
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn a_stripped_c_server_is_named_without_a_line() {
    let Some(bin) = c_server("a_stripped_c_server_is_named_without_a_line", true) else {
        return;
    };
    let p = start(&mut Command::new(bin));
    let line = explain_where(p.pid(), K, || drive_bytes(p.port, b"L", b"C"));
    assert_accuracy("C stripped", &line, "leak_conn", "tidy_conn", None);
    let first = &line["where"][0]["eof_read"][0];
    assert!(first["line"].is_null(), "no debug info, no line: {first}");
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn a_go_net_server_names_the_handler_and_its_line() {
    let Some(bin) = go_program(
        "a_go_net_server_names_the_handler_and_its_line",
        "where_net.go",
    ) else {
        return;
    };
    let p = start(&mut Command::new(bin));
    let line = explain_where(p.pid(), K, || drive_bytes(p.port, b"L", b"C"));
    let want = line_of("where_net.go", "where: leak");
    assert_accuracy("Go net", &line, "leakConn", "tidyConn", Some(want));
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn a_hanging_go_http_handler_is_said_not_to_return() {
    let Some(bin) = go_program(
        "a_hanging_go_http_handler_is_said_not_to_return",
        "where_http.go",
    ) else {
        return;
    };
    let p = start(&mut Command::new(bin));
    let hang = b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n";
    let ok = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n";
    let line = explain_where(p.pid(), K, || drive_bytes(p.port, hang, ok));
    let groups = line["where"].as_array().unwrap_or_else(|| panic!("{line}"));
    let said: u64 = groups
        .iter()
        .filter(|g| {
            g["advice"]
                .as_str()
                .is_some_and(|a| a.contains("the handler did not return: honour r.Context()"))
        })
        .filter_map(|g| g["count"].as_u64())
        .sum();
    let reported: u64 = groups.iter().filter_map(|g| g["count"].as_u64()).sum();
    eprintln!("Go net/http: {said} of {reported} leaking sockets said the handler did not return");
    assert_eq!(reported as usize, K, "{line}");
    assert!(said * 100 >= 95 * reported, "{line}");
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn a_rust_std_server_names_the_handler() {
    let test = "a_rust_std_server_names_the_handler";
    let Some(rustc) = tool(test, "rustc") else {
        return;
    };
    let out = build_dir().join("where_rust");
    build(
        Command::new(rustc)
            .args(["--edition", "2021", "-O", "-C", "debuginfo=2", "-o"])
            .arg(&out)
            .arg(source("where_server.rs")),
    );
    let p = start(&mut Command::new(&out));
    let line = explain_where(p.pid(), K, || drive_bytes(p.port, b"L", b"C"));
    let want = line_of("where_server.rs", "where: leak");
    assert_accuracy("Rust std", &line, "leak_conn", "tidy_conn", Some(want));
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn node_says_the_loop_read_the_eof() {
    let test = "node_says_the_loop_read_the_eof";
    let Some(node) = tool(test, "node") else {
        return;
    };
    // In the build directory: --perf-basic-prof leaves its isolate log in the cwd.
    let p = start(
        Command::new(node)
            .current_dir(build_dir())
            .arg("--perf-basic-prof")
            .arg(source("where_server.js")),
    );
    let line = explain_where(p.pid(), K, || drive_bytes(p.port, b"L", b"C"));
    let groups = line["where"].as_array().unwrap_or_else(|| panic!("{line}"));
    let reported: u64 = groups.iter().filter_map(|g| g["count"].as_u64()).sum();
    let said: u64 = groups
        .iter()
        .filter(|g| {
            g["advice"]
                .as_str()
                .is_some_and(|a| a.contains("libuv's loop read the EOF"))
        })
        .filter_map(|g| g["count"].as_u64())
        .sum();
    eprintln!("Node: {said} of {reported} leaking sockets said libuv's loop read the EOF");
    assert_eq!(reported as usize, K, "{line}");
    assert!(said * 100 >= 95 * reported, "{line}");
    let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", p.pid()));
}

/// Without the privilege, exit 2 naming what is missing.
#[test]
fn without_bpf_it_exits_2_naming_what_is_missing() {
    let mut cmd = if rustix::process::geteuid().is_root() {
        // Root without capabilities: every capability out of the bounding set.
        let Some(setpriv) = tool("without_bpf_it_exits_2_naming_what_is_missing", "setpriv") else {
            return;
        };
        let mut c = Command::new(setpriv);
        c.args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .arg(crate::support::cwreap_bin());
        c
    } else {
        Command::new(crate::support::cwreap_bin())
    };
    let out = cmd
        .args(["explain", "--where", "--for", "1s"])
        .output()
        .expect("run cwreap");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("CAP_BPF") && err.contains("CAP_PERFMON"),
        "{err}"
    );
    assert!(err.contains("Linux 6.3") && err.contains("BTF"), "{err}");
}

/// `explain --where` in the run directory `run` (no `--for`): exit code, JSON lines, stderr.
fn explain_kept(run: &std::path::Path, pid: i32) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let out = Command::new(crate::support::cwreap_bin())
        .args(["explain", "--where", "--json", "--pid"])
        .arg(pid.to_string())
        .env("CWREAP_RUN_DIR", run)
        .output()
        .expect("run cwreap");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines = if out.status.success() {
        json_lines(&out)
    } else {
        Vec::new()
    };
    (out.status.code(), lines, err)
}

/// `where: on`: the daemon records the targets' stacks while it runs, so `explain --where`
/// run after the leak, without `--for`, names the leaking function and line of every
/// socket whose EOF it read long before; the closing path never appears. Without the
/// daemon's file (a clean stop withdraws it), or with the file of a SIGKILLed daemon, the
/// command refuses to report from it and says what it needs.
#[test]
#[ignore = "needs root: loads BPF programs and reads the server's fds"]
fn a_daemon_with_where_on_names_the_code_of_leaks_older_than_the_command() {
    let test = "a_daemon_with_where_on_names_the_code_of_leaks_older_than_the_command";
    let Some(bin) = c_server(test, false) else {
        return;
    };
    let p = start(&mut Command::new(bin));
    let pid = p.pid();
    let yaml = format!(
        "interval: 500ms\ndry_run: true\nwhere: on\nlog_format: json\nmetrics: {{listen: off}}\n\
         targets:\n  - name: c\n    match: {{pid: {pid}}}\n    older_than: 1h\n    action: log\n"
    );
    let mut d = crate::support::LoggedDaemon::start_with("where-on", &yaml, |dir, cmd| {
        cmd.env("CWREAP_RUN_DIR", dir.join("run"));
    });
    let run = d.dir.join("run");
    d.wait_for("the daemon recording the server", |d| {
        d.lines()
            .iter()
            .any(|l| l.contains("where: recording the stacks") && l.contains(&pid.to_string()))
            .then_some(())
    });
    drive_bytes(p.port, b"L", b"C");
    wait_until(
        "the leaking sockets in CLOSE_WAIT",
        || format!("{} in CLOSE_WAIT", ss_count(pid, "close-wait")),
        || (ss_count(pid, "close-wait") >= K).then_some(()),
    );
    // The daemon publishes within a second or so; until then fewer sockets have stacks.
    let line = wait_until(
        "every leaking socket with its stack in the daemon's records",
        || format!("{:?}", explain_kept(&run, pid)),
        || {
            let (code, mut lines, _) = explain_kept(&run, pid);
            let stacked: u64 = lines
                .first()?
                .get("where")?
                .as_array()?
                .iter()
                .filter_map(|g| g["count"].as_u64())
                .sum();
            (code == Some(0) && lines.len() == 1 && stacked == K as u64).then(|| lines.remove(0))
        },
    );
    let want = line_of("where_server.c", "where: leak");
    assert_accuracy(
        "C, daemon where: on",
        &line,
        "leak_conn",
        "tidy_conn",
        Some(want),
    );
    let (_, _, err) = explain_kept(&run, pid);
    assert!(err.contains("recorded by the daemon"), "{err}");
    // With a window of its own after the leak, the command sees none of those EOF reads
    // itself; the daemon's records still name every socket.
    let out = Command::new(crate::support::cwreap_bin())
        .args(["explain", "--where", "--for", "1s", "--json", "--pid"])
        .arg(pid.to_string())
        .env("CWREAP_RUN_DIR", &run)
        .output()
        .expect("run cwreap");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let windowed = json_lines(&out);
    assert_eq!(windowed.len(), 1, "{windowed:?}");
    assert_accuracy(
        "C, daemon where: on, and a window after the leak",
        &windowed[0],
        "leak_conn",
        "tidy_conn",
        Some(want),
    );
    // A SIGKILLed daemon's file stays, and is not trusted.
    rustix::process::kill_process(d.daemon.pid(), rustix::process::Signal::KILL).expect("SIGKILL");
    wait_until("the daemon gone", String::new, || {
        d.daemon.child.try_wait().ok().flatten().map(|_| ())
    });
    assert!(
        run.join("where").exists(),
        "a killed daemon cannot withdraw"
    );
    let (code, lines, err) = explain_kept(&run, pid);
    assert_eq!(code, Some(2), "{lines:?} {err}");
    assert!(
        err.contains("--for") && err.contains("where: on") && err.contains("not running"),
        "{err}"
    );
}
