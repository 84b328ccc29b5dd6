//! End-to-end tests of `cwreap scan` and `cwreap reap` on real leaky servers over loopback,
//! checked against `ss` and against what each client observes.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;

const V4: &str = "127.0.0.1:0";
const V6: &str = "[::1]:0";

fn json_set(rows: &[serde_json::Value]) -> BTreeSet<(i32, SocketAddr, SocketAddr)> {
    rows.iter()
        .map(|r| {
            (
                field_i64(r, "fd") as i32,
                field_str(r, "local").parse().expect("local"),
                field_str(r, "remote").parse().expect("remote"),
            )
        })
        .collect()
}

#[test]
fn scan_matches_ss_for_ipv4_and_ipv6() {
    let mut fx = Fixture::start(&[V4, V6], &[]);
    let mut keep = Vec::new();
    for _ in 0..3 {
        keep.push(fx.close_wait(0));
        keep.push(fx.close_wait(1));
    }
    let established = [fx.connect(0), fx.connect(1)];

    let pid = fx.pid().to_string();
    let rows = cwreap_json(&["scan", "--pid", &pid, "--json"]);
    let ss = ss_close_wait(fx.pid());
    assert_eq!(ss.len(), 6, "ss should see 6 CLOSE_WAIT sockets: {ss:?}");
    assert_eq!(json_set(&rows), ss, "scan and ss disagree");
    let v6 = rows
        .iter()
        .filter(|r| field_str(r, "local").starts_with("[::1]"))
        .count();
    assert_eq!(v6, 3, "three IPv6 sockets, printed as [ip]:port");
    for r in &rows {
        assert_eq!(field_i64(r, "pid"), i64::from(fx.pid()));
        assert_eq!(field_str(r, "comm"), "cwreap-fixture");
        assert!(field_i64(r, "inode") > 0);
        assert!(
            r["age_ms"].is_u64() && r["recv_q"].is_u64() && r["send_q"].is_u64(),
            "{r}"
        );
    }
    // Not one ESTABLISHED socket is listed.
    let fds: BTreeSet<i32> = rows.iter().map(|r| field_i64(r, "fd") as i32).collect();
    for (_, fd) in &established {
        assert!(
            !fds.contains(fd),
            "ESTABLISHED fd {fd} listed as CLOSE_WAIT"
        );
    }

    // The table: header, one line per socket, and the per-process summary.
    let out = cwreap(&["scan", "--pid", &pid]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(
        text.lines()
            .next()
            .is_some_and(|h| h.contains("PID") && h.contains("REMOTE") && h.contains("RECV-Q")),
        "{text}"
    );
    let socket_lines = text
        .lines()
        .filter(|l| l.contains("cwreap-fixture") && l.contains(':'))
        .count();
    assert_eq!(socket_lines, 6, "{text}");
    let summary = text
        .lines()
        .find(|l| l.trim_start().starts_with(&pid) && l.contains("/"))
        .expect("summary line");
    assert!(
        summary.contains(" 6 "),
        "summary counts 6 CLOSE_WAIT: {summary}"
    );
    drop(keep);
}

#[test]
fn scan_filters_by_port_and_age_and_says_when_empty() {
    let mut a = Fixture::start(&[V4], &[]);
    let _k = a.close_wait(0);
    let port = a.listen[0].port().to_string();
    let out = cwreap(&["scan", "--port", &port, "--json"]);
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 1, "{}", stdout(&out));
    assert_eq!(field_i64(&rows[0], "pid"), i64::from(a.pid()));

    // Too young for --older-than 1h: nothing, said plainly.
    let pid = a.pid().to_string();
    let out = cwreap(&["scan", "--pid", &pid, "--older-than", "1h"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("No CLOSE_WAIT sockets match"),
        "{}",
        stdout(&out)
    );
    let out = cwreap(&["scan", "--pid", &pid, "--older-than", "1h", "--json"]);
    assert!(stdout(&out).is_empty());

    // --comm selects by process name.
    let out = cwreap(&[
        "scan",
        "--comm",
        "^cwreap-fixtur",
        "--port",
        &port,
        "--json",
    ]);
    assert_eq!(json_lines(&out).len(), 1);
    let out = cwreap(&["scan", "--comm", "^nomatch$", "--port", &port, "--json"]);
    assert_eq!(json_lines(&out).len(), 0);
}

#[test]
#[ignore = "needs root: cwreap duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn reap_shuts_down_close_wait_only() {
    let mut fx = Fixture::start(&[V4, V6], &[]);
    let mut waiting = Vec::new();
    for _ in 0..4 {
        waiting.push(fx.close_wait(0));
        waiting.push(fx.close_wait(1));
    }
    let mut established = [fx.connect(0), fx.connect(1)];
    let pid = fx.pid().to_string();
    let before_estab = ss_count(fx.pid(), "established");
    let before_listen = ss_count(fx.pid(), "listening");
    assert_eq!(before_listen, 2);
    assert_eq!(ss_close_wait(fx.pid()).len(), 8);

    let out = cwreap(&["reap", "--pid", &pid, "--older-than", "0s", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 8);
    for r in &rows {
        assert_eq!(field_str(r, "action"), "shutdown");
        assert_eq!(field_str(r, "outcome"), "reaped", "{r}");
        assert!(r["error"].is_null());
    }
    assert!(
        stderr(&out).contains("8 reaped"),
        "summary on stderr: {}",
        stderr(&out)
    );

    for (client, fd) in waiting.iter_mut() {
        assert!(
            reads_eof(client, Duration::from_secs(5)),
            "client of fd {fd} got no EOF"
        );
    }
    assert!(
        ss_close_wait(fx.pid()).is_empty(),
        "ss still shows CLOSE_WAIT"
    );
    assert_eq!(ss_count(fx.pid(), "established"), before_estab);
    assert_eq!(ss_count(fx.pid(), "listening"), before_listen);
    for (client, fd) in established.iter_mut() {
        assert!(echoes(client), "ESTABLISHED fd {fd} stopped working");
    }
    // The listeners still accept and serve.
    let (mut fresh, _) = fx.connect(0);
    assert!(echoes(&mut fresh));
    let (mut fresh6, _) = fx.connect(1);
    assert!(echoes(&mut fresh6));
}

#[test]
#[ignore = "needs root: cwreap duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn reap_table_output_and_nothing_to_do() {
    let mut fx = Fixture::start(&[V4], &[]);
    let (mut client, fd) = fx.close_wait(0);
    let pid = fx.pid().to_string();
    let out = cwreap(&["reap", "--pid", &pid, "--older-than", "0s"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(
        text.lines()
            .next()
            .is_some_and(|h| h.contains("ACTION") && h.contains("OUTCOME")),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("reaped") && l.contains("shutdown"))
        .unwrap_or_else(|| panic!("no reaped line: {text}"));
    assert!(line.contains(&format!(" {fd} ")), "{line}");
    assert!(text.contains("1 matched, 1 reaped"), "{text}");
    assert!(reads_eof(&mut client, Duration::from_secs(5)));

    let out = cwreap(&["reap", "--pid", &pid, "--older-than", "0s"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("Nothing to reap"), "{}", stdout(&out));
}

#[test]
#[ignore = "needs root: a dry run still proves permission: pidfd_getfd on the fixture's sockets (CAP_SYS_PTRACE)"]
fn dry_run_changes_nothing() {
    let mut fx = Fixture::start(&[V4, V6], &[]);
    let mut waiting = [fx.close_wait(0), fx.close_wait(1), fx.close_wait(0)];
    let before = ss_close_wait(fx.pid());
    let pid = fx.pid().to_string();
    let rows = cwreap_json(&[
        "reap",
        "--pid",
        &pid,
        "--older-than",
        "0s",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter().all(|r| field_str(r, "outcome") == "dry_run"),
        "{rows:?}"
    );
    assert_eq!(
        ss_close_wait(fx.pid()),
        before,
        "dry run changed the sockets"
    );
    for (client, fd) in waiting.iter_mut() {
        assert!(
            !reads_eof(client, Duration::from_millis(300)),
            "dry run shut down fd {fd}"
        );
    }
}

#[test]
#[ignore = "needs root: cwreap duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn older_than_spares_young_sockets() {
    let mut fx = Fixture::start(&[V4], &[]);
    let mut old = [fx.close_wait(0), fx.close_wait(0)];
    std::thread::sleep(Duration::from_millis(2500));
    let mut young = [fx.close_wait(0), fx.close_wait(0)];
    let pid = fx.pid().to_string();

    let out = cwreap(&["scan", "--pid", &pid, "--json"]);
    let ages: Vec<(i64, i64)> = json_lines(&out)
        .iter()
        .map(|r| (field_i64(r, "fd"), field_i64(r, "age_ms")))
        .collect();
    for (_, fd) in &old {
        let age = ages
            .iter()
            .find(|(f, _)| *f == i64::from(*fd))
            .expect("old socket listed")
            .1;
        assert!(age >= 2400, "old socket fd {fd} is {age} ms old");
    }
    // Oldest first.
    assert!(ages.windows(2).all(|w| w[0].1 >= w[1].1), "{ages:?}");

    let out = cwreap(&["reap", "--pid", &pid, "--older-than", "1500ms", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let reaped: BTreeSet<i64> = json_lines(&out)
        .iter()
        .filter(|r| field_str(r, "outcome") == "reaped")
        .map(|r| field_i64(r, "fd"))
        .collect();
    let old_fds: BTreeSet<i64> = old.iter().map(|(_, fd)| i64::from(*fd)).collect();
    assert_eq!(reaped, old_fds);
    for (c, _) in old.iter_mut() {
        assert!(reads_eof(c, Duration::from_secs(5)));
    }
    for (c, fd) in young.iter_mut() {
        assert!(
            !reads_eof(c, Duration::from_millis(300)),
            "young fd {fd} was reaped"
        );
    }
    let left: BTreeSet<i32> = ss_close_wait(fx.pid())
        .iter()
        .map(|(fd, _, _)| *fd)
        .collect();
    let young_fds: BTreeSet<i32> = young.iter().map(|(_, fd)| *fd).collect();
    assert_eq!(left, young_fds);
}

#[test]
#[ignore = "needs root: cwreap duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn max_caps_the_number_of_reaps_oldest_first() {
    let mut fx = Fixture::start(&[V4], &[]);
    let (mut oldest, oldest_fd) = fx.close_wait(0);
    std::thread::sleep(Duration::from_millis(1100));
    let mut rest = [fx.close_wait(0), fx.close_wait(0)];
    let pid = fx.pid().to_string();
    let out = cwreap(&[
        "reap",
        "--pid",
        &pid,
        "--older-than",
        "0s",
        "--max",
        "1",
        "--json",
    ]);
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 1);
    assert_eq!(field_i64(&rows[0], "fd"), i64::from(oldest_fd));
    assert!(reads_eof(&mut oldest, Duration::from_secs(5)));
    for (c, _) in rest.iter_mut() {
        assert!(!reads_eof(c, Duration::from_millis(200)));
    }
    assert_eq!(ss_close_wait(fx.pid()).len(), 2);
}

#[test]
#[ignore = "needs root: cwreap duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn socket_shared_by_two_processes_is_shut_down_once() {
    let mut fx = Fixture::start(&[V4], &[]);
    let (mut client, fd) = fx.close_wait(0);
    fx.send(&format!("share {fd}"));
    let child: i32 = fx.expect_line("child ").parse().expect("child pid");
    // Wait until the child really holds the socket.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ss_close_wait(child).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "child never held the socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (pid, cpid) = (fx.pid().to_string(), child.to_string());
    let rows = cwreap_json(&[
        "reap",
        "--pid",
        &pid,
        "--pid",
        &cpid,
        "--older-than",
        "0s",
        "--json",
    ]);
    assert_eq!(rows.len(), 1, "one socket, one action: {rows:?}");
    assert_eq!(field_str(&rows[0], "outcome"), "reaped");
    assert_eq!(
        rows[0]["holders"].as_array().map(Vec::len),
        Some(2),
        "{}",
        rows[0]
    );
    assert!(reads_eof(&mut client, Duration::from_secs(5)));
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(child).expect("pid"),
        rustix::process::Signal::KILL,
    );
}

#[test]
fn usage_errors_exit_2_and_name_the_problem() {
    let cases: &[(&[&str], &str)] = &[
        (&["scan", "--comm", "("], "--comm"),
        (&["scan", "--port", "0"], "--port"),
        (&["scan", "--port", "http"], "--port"),
        (&["scan", "--port", "70000"], "--port"),
        (&["scan", "--older-than", "soon"], "--older-than"),
        (&["scan", "--pid", "abc"], "--pid"),
        (&["reap", "--pid", "1"], "--older-than"),
        (&["reap", "--older-than", "1m"], "selector"),
        (
            &["reap", "--pid", "1", "--older-than", "1m", "--max", "0"],
            "--max",
        ),
        (&["frobnicate"], "frobnicate"),
        (&["reap"], "selector"),
        (&["reap"], "--older-than"),
        (
            &["reap", "--close", "--older-than", "1m", "--port", "80"],
            "--pid",
        ),
    ];
    for (args, needle) in cases {
        let out = cwreap(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(needle),
            "{args:?} should mention {needle}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn scan_of_a_missing_pid_is_a_usage_error() {
    // pid_max is at most 2^22; this pid cannot exist.
    let out = cwreap(&["scan", "--pid", "2147483000"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no such process"), "{}", stderr(&out));
}

/// Who runs the copy of cwreap in the privilege tests.
#[derive(Debug, Clone, Copy)]
enum Who {
    /// uid/gid 65534, no capabilities.
    Nobody,
    /// uid/gid 65534 with CAP_SYS_PTRACE alone (ambient), through setpriv.
    PtraceOnly,
}

/// Run `bin` with `args` as `who`; retries exec on ETXTBSY (another test's fork may still
/// hold the fresh copy open for writing).
fn run_as(who: Who, bin: &std::path::Path, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut tries = 0;
    loop {
        let mut cmd = match who {
            Who::Nobody => {
                let mut c = std::process::Command::new(bin);
                c.uid(65534).gid(65534);
                c
            }
            Who::PtraceOnly => {
                let mut c = std::process::Command::new("setpriv");
                c.args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "--inh-caps=+sys_ptrace",
                    "--ambient-caps=+sys_ptrace",
                    "--",
                ])
                .arg(bin);
                c
            }
        };
        let out = cmd.args(args).output();
        let busy = match &out {
            Err(e) => e.raw_os_error() == Some(libc::ETXTBSY),
            Ok(o) => String::from_utf8_lossy(&o.stderr).contains("Text file busy"),
        };
        if busy && tries < 50 {
            tries += 1;
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        }
        return out.expect("run the copy of cwreap");
    }
}

#[test]
#[ignore = "needs root: runs cwreap as nobody and with CAP_SYS_PTRACE alone against root's fixture (setpriv)"]
fn unprivileged_user_gets_the_capability_message() {
    use std::os::unix::fs::PermissionsExt;
    let mut fx = Fixture::start(&[V4], &[]);
    let _k = fx.close_wait(0);
    // A copy nobody can execute, wherever the checkout lives.
    let dir = std::env::temp_dir().join(format!("cwreap-unpriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let bin = dir.join("cwreap");
    std::fs::copy(cwreap_bin(), &bin).expect("copy binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod bin");
    let pid = fx.pid().to_string();
    let port = fx.listen[0].port().to_string();
    // What each user lacks for each command: the message must name it.
    let cases: &[(Who, &[&str], &str)] = &[
        (Who::Nobody, &["scan", "--pid", &pid], "CAP_SYS_PTRACE"),
        (
            Who::Nobody,
            &["reap", "--pid", &pid, "--older-than", "1ms"],
            "CAP_SYS_PTRACE",
        ),
        (
            Who::Nobody,
            &["reap", "--port", &port, "--older-than", "1ms"],
            "CAP_SYS_PTRACE",
        ),
        (
            Who::Nobody,
            &[
                "reap",
                "--comm",
                "^cwreap-fixture$",
                "--older-than",
                "1ms",
                "--dry-run",
            ],
            "CAP_SYS_PTRACE",
        ),
        (
            Who::Nobody,
            &[
                "reap",
                "--port",
                &port,
                "--older-than",
                "1ms",
                "--destroy",
                "--dry-run",
            ],
            "CAP_NET_ADMIN",
        ),
        (
            Who::PtraceOnly,
            &["reap", "--port", &port, "--older-than", "1ms"],
            "CAP_DAC_READ_SEARCH",
        ),
        (
            Who::PtraceOnly,
            &[
                "reap",
                "--comm",
                "^cwreap-fixture$",
                "--older-than",
                "1ms",
                "--dry-run",
            ],
            "CAP_DAC_READ_SEARCH",
        ),
        (
            Who::PtraceOnly,
            &[
                "reap",
                "--port",
                &port,
                "--older-than",
                "1ms",
                "--destroy",
                "--dry-run",
            ],
            "CAP_NET_ADMIN",
        ),
    ];
    for (who, args, cap) in cases {
        let out = run_as(*who, &bin, args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{who:?} {args:?}: {err}");
        assert!(
            err.contains(cap),
            "{who:?} {args:?} should name {cap}: {err}"
        );
        assert!(
            err.contains("setcap"),
            "{who:?} {args:?}: says how to grant it: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        if matches!(who, Who::PtraceOnly) && *cap != "CAP_NET_ADMIN" {
            assert!(
                !err.contains("missing CAP_SYS_PTRACE") && !err.contains("and CAP_SYS_PTRACE"),
                "CAP_SYS_PTRACE is held, only CAP_DAC_READ_SEARCH is missing: {err}"
            );
        }
    }
    // A host-wide scan stays exit 0, with its note.
    let out = run_as(Who::Nobody, &bin, &["scan"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(ss_close_wait(fx.pid()).len(), 1, "nothing was touched");
    let _ = std::fs::remove_dir_all(&dir);
}
