//! `cwreap reap --close`: fd slots freed inside a real leaky server, which keeps serving.

mod support;

use std::time::Duration;

use support::*;

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

#[test]
fn close_frees_close_wait_and_already_shut_down_fds() {
    if !require_root("close_frees_close_wait_and_already_shut_down_fds") {
        return;
    }
    // The threaded server keeps no table keyed by fd number, so it cannot trip over the
    // documented hazard (closing a number that was reused after the injected close).
    let mut fx = Fixture::start(&["127.0.0.1:0"], &["--threaded"]);
    let mut waiting = [fx.close_wait(0), fx.close_wait(0), fx.close_wait(0)];
    let mut est = fx.connect(0);
    let pid = fx.pid().to_string();
    let before = open_fds(fx.pid());

    // Dry run: verified, nothing closed.
    let out = cwreap(&[
        "reap",
        "--pid",
        &pid,
        "--older-than",
        "0s",
        "--close",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        json_lines(&out)
            .iter()
            .all(|r| field_str(r, "outcome") == "dry_run")
    );
    assert_eq!(open_fds(fx.pid()), before);

    // Two of them the classic way: shut down, still held by the app (it ignores HUP).
    let (first, second) = (waiting[0].1, waiting[1].1);
    let out = cwreap(&["reap", "--pid", &pid, "--older-than", "0s", "--max", "2"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        open_fds(fx.pid()),
        before,
        "shutdown alone frees no fd slot"
    );

    // --close: the remaining CLOSE_WAIT one and the two shut-down-but-held ones.
    let out = cwreap(&[
        "reap",
        "--pid",
        &pid,
        "--older-than",
        "0s",
        "--close",
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
    let closed: Vec<i64> = rows
        .iter()
        .filter(|r| field_str(r, "outcome") == "reaped" && field_str(r, "action") == "close")
        .map(|r| field_i64(r, "fd"))
        .collect();
    assert_eq!(closed.len(), 3, "{rows:?}");
    for fd in [first, second, waiting[2].1] {
        assert!(
            closed.contains(&i64::from(fd)),
            "fd {fd} not closed: {rows:?}"
        );
    }
    assert!(
        stderr(&out).contains("paused"),
        "pause reported: {}",
        stderr(&out)
    );
    assert_eq!(
        open_fds(fx.pid()),
        before - 3,
        "exactly the three fds were freed"
    );
    for (c, fd) in waiting.iter_mut() {
        assert!(reads_eof(c, Duration::from_secs(5)), "client of fd {fd}");
    }
    // The server still works: the old connection and a new one.
    assert!(echoes(&mut est.0));
    let (mut fresh, _) = fx.connect(0);
    assert!(echoes(&mut fresh));
}

#[test]
fn daemon_escalates_to_close_for_fds_still_held_after_shutdown() {
    if !require_root("daemon_escalates_to_close_for_fds_still_held_after_shutdown") {
        return;
    }
    let mut fx = Fixture::start(&["127.0.0.1:0"], &["--threaded"]);
    let mut waiting = [fx.close_wait(0), fx.close_wait(0)];
    let before = open_fds(fx.pid());
    let audit = std::env::temp_dir().join(format!(
        "cwreap-escalate-audit-{}.jsonl",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&audit);
    let _d = Daemon::start(
        "escalate",
        &format!(
            "interval: 300ms\ndry_run: false\naudit_log: {}\nmetrics: {{listen: off}}\ntargets:\n  - name: t\n    match: {{pid: {}}}\n    older_than: 1s\n    action: shutdown\n    escalate: {{close_after: 2s}}\n",
            audit.display(),
            fx.pid()
        ),
    );
    // Shut down first (peers get EOF), still held, then closed inside the owner.
    for (c, fd) in waiting.iter_mut() {
        assert!(reads_eof(c, Duration::from_secs(10)), "fd {fd}: no EOF");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while open_fds(fx.pid()) > before - 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(open_fds(fx.pid()), before - 2, "the two fds were freed");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let of = |action: &str, outcome: &str| {
        lines
            .iter()
            .filter(|l| l["action"] == action && l["outcome"] == outcome)
            .count()
    };
    assert_eq!(of("shutdown", "reaped"), 2, "{lines:?}");
    assert_eq!(of("close", "reaped"), 2, "{lines:?}");
    let still = lines.iter().filter(|l| l["result"] == "still_held").count();
    assert_eq!(still, 2, "close only after still_held: {lines:?}");
    let (mut fresh, _) = fx.connect(0);
    assert!(echoes(&mut fresh), "the server still serves");
    let _ = std::fs::remove_file(&audit);
}
