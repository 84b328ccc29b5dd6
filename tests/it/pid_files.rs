//! Pid files an attacker controls, against the daemon and the command line: a pid file in
//! a directory another user owns, a FIFO at the pid-file path, a symlink to a huge file.
//! Each was an attack on an earlier cwreap (root's sockets shut down on nobody's word, a
//! cycle blocked for good, 316 MB read per cycle); each is refused now, naming why, and
//! never blocks.

use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

const NOBODY: u32 = 65534;
const V4: &str = "127.0.0.1:0";

/// A directory owned by nobody (mode 0755), below a root-owned scratch directory.
fn nobodys_dir(scratch: &Scratch) -> std::path::PathBuf {
    let d = scratch.path("nobody");
    std::fs::create_dir_all(&d).expect("mkdir");
    chown(&d, Some(NOBODY), Some(NOBODY)).expect("chown nobody");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// Write `text` at `path` as nobody would (the file is nobody's).
fn write_as_nobody(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write pid file");
    chown(path, Some(NOBODY), Some(NOBODY)).expect("chown nobody");
}

fn policy(pid_file: &Path) -> String {
    format!(
        "interval: 300ms\ndry_run: false\nlog_format: json\nmetrics: {{listen: off}}\n\
         targets:\n  - name: by-pid-file\n    match: {{pid_file: {}}}\n    older_than: 1ms\n    action: shutdown\n",
        pid_file.display()
    )
}

#[test]
#[ignore = "needs root: the server's sockets are root's, and the pid file must be another user's"]
fn a_pid_file_another_user_writes_never_chooses_a_process_root_reaps() {
    let scratch = Scratch::new("pidfile-nobody-files", 0o755);
    let dir = nobodys_dir(&scratch);
    let pid_file = dir.join("app.pid");
    let mut fx = Fixture::start(&[V4], &[]);
    let mut clients: Vec<_> = (0..3).map(|_| fx.close_wait(0)).collect();
    // nobody names root's server in a pid file of its own.
    write_as_nobody(&pid_file, &format!("{}\n", fx.pid()));

    // The command line refuses it, exit 2, naming the owner and the fix.
    let pf = pid_file.to_string_lossy().into_owned();
    let out = Command::new(cwreap_bin())
        .args(["reap", "--pid-file", &pf, "--older-than", "1ms"])
        .output()
        .expect("reap");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("refused") && err.contains("uid 65534") && err.contains("fix:"),
        "{err}"
    );
    let out = Command::new(cwreap_bin())
        .args(["scan", "--pid-file", &pf])
        .output()
        .expect("scan");
    assert_eq!(out.status.code(), Some(2), "scan refuses it too");

    // The daemon logs it once and acts on nothing, cycle after cycle.
    let mut d = LoggedDaemon::start("pidfile-nobody", &policy(&pid_file));
    d.wait_for("the refusal logged", |d| {
        d.lines()
            .iter()
            .any(|l| l.contains("pid file not trusted"))
            .then_some(())
    });
    // Several cycles more (interval 300 ms): still nothing acted on, still logged once.
    std::thread::sleep(Duration::from_millis(1500));
    let lines = d.lines();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("pid file not trusted"))
            .count(),
        1,
        "logged once: {}",
        d.log()
    );
    assert!(
        !lines.iter().any(|l| l.contains("close_wait action")),
        "acted on nobody's word: {}",
        d.log()
    );
    for (c, _) in clients.iter_mut() {
        assert!(
            !reads_eof(c, Duration::from_millis(50)),
            "a socket was shut down"
        );
    }
    assert_eq!(ss_close_wait(fx.pid()).len(), 3);
}

#[test]
#[ignore = "needs root: makes a FIFO and a huge file at root-trusted pid-file paths and runs the daemon on them"]
fn a_fifo_or_a_huge_file_at_the_pid_file_path_never_blocks_and_costs_nothing() {
    let scratch = Scratch::new("pidfile-fifo-files", 0o755);
    let fifo = scratch.path("fifo.pid");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .expect("mkfifo");
    let huge = scratch.path("huge");
    std::fs::write(&huge, vec![b'7'; 50 << 20]).expect("50 MB file");
    let link = scratch.path("link.pid");
    std::os::unix::fs::symlink(&huge, &link).expect("symlink");

    // The command line answers at once, exit 2, for both.
    for p in [&fifo, &link] {
        let started = Instant::now();
        let out = Command::new(cwreap_bin())
            .args(["scan", "--pid-file", &p.to_string_lossy()])
            .output()
            .expect("scan");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "scan blocked on {}",
            p.display()
        );
    }

    // The daemon keeps cycling (its cycle count moves) with a FIFO as a target's pid file,
    // and a symlink to 50 MB as another's, and its memory stays small.
    let addr = crate::support::metrics::free_addr();
    let yaml = format!(
        "interval: 200ms\ndry_run: true\nlog_format: json\nmetrics: {{listen: {addr}}}\n\
         targets:\n  - name: fifo\n    match: {{pid_file: {}}}\n    older_than: 1s\n  - name: huge\n    match: {{pid_file: {}}}\n    older_than: 1s\n",
        fifo.display(),
        link.display()
    );
    let mut d = LoggedDaemon::start("pidfile-fifo", &yaml);
    let pid = d.pid();
    d.wait_for("two refusals logged", |d| {
        (d.lines()
            .iter()
            .filter(|l| l.contains("pid file not trusted"))
            .count()
            >= 2)
            .then_some(())
    });
    // Cycles go on: their count in the metrics keeps moving.
    let cycles = || {
        crate::support::metrics::scrape(addr)
            .and_then(|t| {
                crate::support::metrics::sample(&t, "cwreap_cycle_duration_seconds_count")
            })
            .unwrap_or(0.0)
    };
    let before = cycles();
    let deadline = Instant::now() + HANG_GUARD;
    while cycles() < before + 5.0 {
        assert!(Instant::now() < deadline, "cycles stopped: {}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let kib = rss_kib(pid);
    assert!(
        kib > 0 && kib < 40 * 1024,
        "RSS {kib} KiB with a 50 MB pid file"
    );
}
