//! `cwreap run --pid-file PATH`: the daemon writes its own pid file safely, a `kill -HUP
//! "$(cat PATH)"` reloads that daemon and no other, the reload line says the effective
//! dry run and the number of targets, and a clean exit removes the file.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};

use crate::support::*;

const POLICY: &str = "interval: 300ms\ndry_run: false\ndiscovery: poll\nmetrics: {listen: off}\n\
targets:\n  - {name: one, match: {comm: '^no-such-process$'}, older_than: 1m}\n";

const TWO_DRY: &str = "interval: 300ms\ndry_run: true\ndiscovery: poll\nmetrics: {listen: off}\n\
targets:\n  - {name: one, match: {comm: '^no-such-process$'}, older_than: 1m}\n  \
- {name: two, match: {comm: '^no-such-either$'}, older_than: 1m}\n";

#[test]
fn the_pid_file_reloads_this_daemon_and_goes_at_exit() {
    let mut d = LoggedDaemon::start_with("run-pid-file", POLICY, |dir, cmd| {
        cmd.arg("--pid-file").arg(dir.join("cwreap.pid"));
    });
    let pid_path = d.dir.join("cwreap.pid");
    d.wait_for("the start-up line", |d| {
        d.lines()
            .iter()
            .any(|l| l.contains("cwreap started"))
            .then_some(())
    });
    let text = std::fs::read_to_string(&pid_path).expect("the pid file");
    assert_eq!(text, format!("{}\n", d.pid()), "{}", d.log());
    let meta = std::fs::symlink_metadata(&pid_path).expect("stat");
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o7777, 0o644);
    let left: Vec<_> = std::fs::read_dir(&d.dir)
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");

    // The README's line, verbatim but for the path.
    write_policy(&d.dir.join("cwreap.yaml"), TWO_DRY);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -HUP \"$(cat {})\"", pid_path.display()))
        .output()
        .expect("sh");
    assert!(out.status.success(), "{out:?}");
    let line = d.wait_for("the reload line", |d| {
        d.lines()
            .into_iter()
            .find(|l| l.contains("config reloaded"))
    });
    assert!(line.contains("dry_run=true"), "{line}");
    assert!(line.contains("targets=2"), "{line}");

    let pid = Pid::from_raw(d.pid()).expect("pid");
    kill_process(pid, Signal::TERM).expect("SIGTERM");
    let status = d
        .daemon
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon exits on SIGTERM");
    assert!(status.success(), "{status}\n{}", d.log());
    assert!(!pid_path.exists(), "the pid file outlived the daemon");
}

#[test]
fn a_pid_file_in_a_directory_others_may_write_is_refused_naming_it() {
    let scratch = Scratch::new("run-pid-file-open", 0o700);
    let open = scratch.path("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let cfg = scratch.path("cwreap.yaml");
    write_policy(&cfg, POLICY);
    let pid_path = open.join("cwreap.pid");
    let out = Command::new(cwreap_bin())
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .arg("--pid-file")
        .arg(&pid_path)
        .env("CWREAP_RUN_DIR", scratch.path("run"))
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .expect("run cwreap");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&open.display().to_string()), "{err}");
    assert!(err.contains("writable by others"), "{err}");
    assert!(!pid_path.exists());
}
