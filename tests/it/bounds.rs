//! Values that used to be accepted and then crashed or stalled: an interval of 300000000000
//! years (accepted by `check`, then a panic in `run` and on SIGHUP), 40 patterns of
//! `\w{120}` (seconds of compiling, hundreds of MB), a 100 KB `--cmdline` literal (30 s a
//! scan), `scan --watch 1ns` (a core kept busy). Each is refused now, at once, naming the
//! bound.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

fn cwreap(args: &[&str]) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let out = Command::new(cwreap_bin())
        .args(args)
        .output()
        .expect("run cwreap");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

const POLICY: &str = "interval: 1s\ndry_run: true\nlog_format: json\nmetrics: {listen: off}\n\
targets:\n  - {name: t, match: {comm: '^no-such-process$'}, older_than: 1m}\n";

#[test]
fn check_refuses_an_interval_past_a_day_and_a_running_daemon_keeps_its_policy() {
    let scratch = Scratch::new("bounds-interval", 0o700);
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &POLICY.replace("interval: 1s", "interval: 300000000000y"),
    );
    let cfg_s = cfg.to_string_lossy().into_owned();
    let (code, err, _) = cwreap(&["check", "--config", &cfg_s]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("interval") && err.contains("longer than"),
        "{err}"
    );

    let mut d = LoggedDaemon::start("bounds-interval-run", POLICY);
    d.wait_for("started", |d| {
        d.lines()
            .iter()
            .any(|l| l.contains("cwreap started"))
            .then_some(())
    });
    d.reload(&POLICY.replace("interval: 1s", "interval: 300000000000y"));
    d.wait_for("the reload rejected", |d| {
        d.lines()
            .iter()
            .any(|l| l.contains("config reload rejected"))
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        d.daemon.child.try_wait().expect("wait").is_none(),
        "the daemon died on a policy check refuses: {}",
        d.log()
    );
    assert!(
        d.lines().iter().any(|l| l.contains("interval_ms\":1000")),
        "it started with the 1s interval: {}",
        d.log()
    );
}

#[test]
fn many_heavy_regexes_and_huge_literals_are_refused_at_once() {
    let scratch = Scratch::new("bounds-regex", 0o700);
    let cfg = scratch.path("cwreap.yaml");
    let mut y = String::from("metrics: {listen: off}\ntargets:\n");
    for i in 0..40 {
        y.push_str(&format!(
            "  - {{name: t{i}, match: {{cmdline: '\\w{{120}}'}}, older_than: 1m}}\n"
        ));
    }
    write_policy(&cfg, &y);
    let (code, err, took) = cwreap(&["check", "--config", &cfg.to_string_lossy()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("size limit"), "{err}");
    assert!(took < Duration::from_secs(2), "check took {took:?}");

    let literal = "x".repeat(100 * 1024);
    let (code, err, took) = cwreap(&["scan", "--cmdline", &literal]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("at most 1024"), "{err}");
    assert!(took < Duration::from_secs(2), "scan took {took:?}");

    let mut args = vec!["scan"];
    for _ in 0..8 {
        args.extend(["--cmdline", "\\w{12}"]);
    }
    let (code, err, took) = cwreap(&args);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("share"),
        "the command line has one budget too: {err}"
    );
    assert!(took < Duration::from_secs(2), "scan took {took:?}");
}

#[test]
fn watch_and_windows_have_floors_and_ceilings() {
    for (args, needle) in [
        (vec!["scan", "--watch", "1ns"], "below the floor of 100ms"),
        (vec!["scan", "--watch", "2d"], "once a day"),
        (vec!["explain", "--for", "2h"], "longer than 1h"),
        (vec!["scan", "--older-than", "400d"], "longer than"),
    ] {
        let (code, err, _) = cwreap(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
