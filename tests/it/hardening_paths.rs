//! Files planted where cwreap's paths lead, and directories others may write: attacks from
//! a security review, each shown by a test.
//!
//! * An audit log in a sticky directory (mode 1777): after rotation another user creates a
//!   file (or a FIFO) at the audit path. A reload still succeeds, the planted entry is
//!   moved aside under a name that says so, and records go to a new file cwreap created.
//!   A daemon that may not move it (not root, in root's sticky directory) writes to a fresh
//!   file beside it and says why.
//! * An audit file another user owns, planted below a directory only root may enter
//!   (created before the directory was locked down): refused, and nothing is written to it.
//! * A Kubernetes ConfigMap volume: a directory of mode 0777 with kubelet's symlink chain
//!   (`cwreap.yaml` → `..data/cwreap.yaml`, `..data` → a timestamped directory). Accepted
//!   on a read-only mount when every link and the file are root's; refused on a writable
//!   mount, and on the read-only one when a link or the file is another user's.

use std::collections::BTreeSet;
use std::fs::Permissions;
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::hardening::{
    HANG, NOBODY, audit_records, policy, refused, refused_by, run_guarded, simple_policy,
};
use crate::support::*;
use rustix::process::Signal;

const NOBODY_UID: u32 = 65534;

/// Run `argv` as user nobody (no groups), and require it to succeed.
fn as_nobody(argv: &[&str], path: &Path) {
    let ok = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
        ])
        .args(argv)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "as nobody: {argv:?} {}", path.display());
}

fn mkdir(path: &Path, mode: u32) {
    std::fs::create_dir(path).expect("mkdir");
    std::fs::set_permissions(path, Permissions::from_mode(mode)).expect("chmod");
}

/// The fds of the reaped sockets the audit log at `path` records.
fn reaped_fds(path: &Path) -> BTreeSet<i64> {
    if !path.exists() {
        return BTreeSet::new();
    }
    audit_records(path)
        .iter()
        .filter(|r| r["event"] == "action" && r["outcome"] == "reaped")
        .map(|r| field_i64(r, "fd"))
        .collect()
}

/// The entries of `dir` whose names start with `prefix`.
fn named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read the directory")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    found.sort();
    found
}

/// SIGHUP, then the outcome of that reload (the `nth` of the daemon's life): a failed or
/// rejected reload fails the test with the log.
fn reload(d: &mut Running, nth: usize) {
    let count = |r: &Running, what: &str| r.lines().iter().filter(|l| l.contains(what)).count();
    d.signal(Signal::HUP);
    d.wait_until("the reload's outcome", Duration::from_secs(10), |r| {
        count(r, "config reloaded") == nth
            || count(r, "config reload failed") > 0
            || count(r, "config reload rejected") > 0
    });
    assert_eq!(
        count(d, "config reloaded"),
        nth,
        "reload {nth} did not succeed; log:\n{}",
        d.log()
    );
}

#[test]
#[ignore = "needs root: user nobody plants files (setpriv) beside root's audit log; the daemon duplicates the fixture's sockets with pidfd_getfd"]
fn a_file_planted_at_the_audit_path_in_a_sticky_directory_never_blocks_a_reload() {
    let scratch = Scratch::new("sticky-audit", 0o755);
    let spool = scratch.path("spool");
    mkdir(&spool, 0o1777);
    let audit = spool.join("audit.jsonl");
    let cfg = scratch.path("cwreap.yaml");
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    write_policy(
        &cfg,
        &policy(
            &[fx.pid()],
            &format!("audit_log: {}\nmetrics: {{listen: off}}\n", audit.display()),
        ),
    );
    let batch = |fx: &mut Fixture| -> (Vec<(TcpStream, i32)>, BTreeSet<i64>) {
        let held: Vec<(TcpStream, i32)> = (0..5).map(|_| fx.close_wait(0)).collect();
        let fds = held.iter().map(|(_, fd)| i64::from(*fd)).collect();
        (held, fds)
    };
    let (_first, first_fds) = batch(&mut fx);
    let mut d = Running::spawn(&cfg, &[], &[]);
    d.wait_until(
        "the first five reaped in the audit log",
        Duration::from_secs(10),
        |_| reaped_fds(&audit) == first_fds,
    );

    // Rotation, then nobody creates the audit path before the daemon reopens it.
    let rotated = spool.join("audit.jsonl.1");
    std::fs::rename(&audit, &rotated).expect("mv audit.jsonl audit.jsonl.1");
    as_nobody(&["touch"], &audit);
    assert_eq!(
        std::fs::metadata(&audit).expect("planted").uid(),
        NOBODY_UID
    );
    reload(&mut d, 1);
    let (_second, second_fds) = batch(&mut fx);
    d.wait_until(
        "the next five reaped in a new audit.jsonl",
        Duration::from_secs(10),
        |_| reaped_fds(&audit).is_superset(&second_fds),
    );
    let aside = named(&spool, "audit.jsonl.foreign.");
    assert_eq!(aside.len(), 1, "one planted file moved aside: {aside:?}");
    let planted = std::fs::symlink_metadata(&aside[0]).expect("moved aside");
    assert_eq!((planted.uid(), planted.len()), (NOBODY_UID, 0));
    assert!(
        d.lines()
            .iter()
            .any(|l| l.contains("moved it aside") && l.contains("uid 65534")),
        "the move is logged, naming the owner; log:\n{}",
        d.log()
    );

    // Again with a FIFO: moved aside unopened, so nothing waits for a writer.
    let rotated2 = spool.join("audit.jsonl.2");
    std::fs::rename(&audit, &rotated2).expect("mv audit.jsonl audit.jsonl.2");
    as_nobody(&["mkfifo"], &audit);
    // `check` says what `run` would do: a planted entry here is no reason to refuse.
    let (code, out, err, _) = run_guarded(
        Command::new(cwreap_bin())
            .arg("check")
            .arg("--config")
            .arg(&cfg),
    );
    assert_eq!(code, Some(0), "check:\n{out}\n{err}");
    reload(&mut d, 2);
    let (_third, third_fds) = batch(&mut fx);
    d.wait_until(
        "the third five reaped in a new audit.jsonl",
        Duration::from_secs(10),
        |_| reaped_fds(&audit).is_superset(&third_fds),
    );
    let aside = named(&spool, "audit.jsonl.foreign.");
    assert_eq!(
        aside.len(),
        2,
        "both planted entries moved aside: {aside:?}"
    );
    let (status, _) = d.terminate(HANG);
    assert!(status.success(), "{status}; log:\n{}", d.log());

    assert_eq!(reaped_fds(&rotated), first_fds);
    assert_eq!(reaped_fds(&rotated2), second_fds);
    assert_eq!(reaped_fds(&audit), third_fds);
    let meta = std::fs::metadata(&audit).expect("the new audit log");
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o600));
    println!(
        "sticky directory: two planted entries moved aside ({}), every reload succeeded, each batch in its own file",
        aside
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

#[test]
#[ignore = "needs root: user nobody plants a file in root's sticky directory, and the daemon runs as another user (setpriv)"]
fn a_daemon_that_may_not_move_a_planted_file_aside_writes_beside_it() {
    const DAEMON: u32 = 4242;
    let scratch = Scratch::new("sticky-audit-user", 0o755);
    let spool = scratch.path("spool");
    mkdir(&spool, 0o1777);
    let audit = spool.join("audit.jsonl");
    as_nobody(&["touch"], &audit);
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &simple_policy(&format!("audit_log: {}\n", audit.display())),
    );
    std::os::unix::fs::chown(&cfg, Some(DAEMON), Some(DAEMON)).expect("chown the policy");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={DAEMON}"),
        &format!("--regid={DAEMON}"),
        "--clear-groups",
    ])
    .arg(cwreap_bin())
    .arg("run")
    .arg("--config")
    .arg(&cfg);
    Running::prepare(&mut cmd);
    let mut d = Running::attach(cmd.spawn().expect("spawn cwreap run as uid 4242")).started();
    let fresh = named(&spool, "audit.jsonl.fresh.");
    assert_eq!(
        fresh.len(),
        1,
        "one fresh audit log: {fresh:?}; log:\n{}",
        d.log()
    );
    let meta = std::fs::symlink_metadata(&fresh[0]).expect("fresh");
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (DAEMON, 0o600));
    assert!(
        d.lines()
            .iter()
            .any(|l| l.contains("may not move it aside")
                && l.contains(&fresh[0].display().to_string())),
        "the refusal and the file used instead are logged; log:\n{}",
        d.log()
    );
    assert_eq!(
        std::fs::metadata(&audit).expect("planted").uid(),
        NOBODY_UID,
        "the planted file stays where it is"
    );
    let (status, _) = d.terminate(HANG);
    assert!(status.success(), "{status}; log:\n{}", d.log());
}

#[test]
#[ignore = "needs root: user nobody plants the audit file (setpriv) before root locks the directory"]
fn an_audit_file_another_user_owns_is_refused_below_a_root_only_directory() {
    let scratch = Scratch::new("sealed-audit", 0o755);
    let locked = scratch.path("locked");
    // Open at first, so nobody can create the file; then root locks the directory down.
    mkdir(&locked, 0o777);
    let audit = locked.join("audit.jsonl");
    as_nobody(&["touch"], &audit);
    std::fs::write(&audit, b"planted\n").expect("write the planted file");
    std::fs::set_permissions(&locked, Permissions::from_mode(0o700)).expect("chmod 700");
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &simple_policy(&format!("audit_log: {}\n", audit.display())),
    );
    refused(
        "an audit file nobody owns below a root-only directory",
        &cfg,
        &[
            "audit_log",
            &audit.display().to_string(),
            "owned by uid 65534, not root",
            "fix:",
        ],
    );
    assert_eq!(
        std::fs::read(&audit).expect("the planted file"),
        b"planted\n",
        "nothing was written to it or cut from it"
    );
    assert_eq!(
        std::fs::metadata(&audit).expect("planted").uid(),
        NOBODY_UID
    );
}

/// `cwreap SUB --config CFG` in a mount namespace of its own, where `dir` is bind-mounted
/// read-only onto itself.
fn on_read_only_mount(dir: &Path, sub: &str, cfg: &Path) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@""#,
        "sh",
    ])
    .arg(dir)
    .arg(cwreap_bin())
    .arg(sub)
    .arg("--config")
    .arg(cfg);
    cmd
}

#[test]
#[ignore = "needs root: bind-mounts the volume read-only in a mount namespace of its own (unshare, mount), and chowns links to nobody"]
fn a_configmap_volume_is_accepted_read_only_with_every_link_roots() {
    for tool in ["unshare", "mount"] {
        if Command::new(tool).arg("--version").output().is_err() {
            skip_or_fail(
                "a_configmap_volume_is_accepted_read_only_with_every_link_roots",
                &format!("{tool} is missing (apt-get install util-linux mount)"),
            );
            return;
        }
    }
    // kubelet's layout: the volume directory (mode 0777 on several kubelets), the data in
    // a timestamped directory, `..data` naming the current one, each key a symlink
    // through `..data`.
    let scratch = Scratch::new("configmap", 0o755);
    let volume = scratch.path("cm");
    mkdir(&volume, 0o777);
    let stamp = "..2026_12_04_10_00_00.123";
    mkdir(&volume.join(stamp), 0o755);
    let data = volume.join(stamp).join("cwreap.yaml");
    write_policy(&data, &simple_policy(""));
    symlink(stamp, volume.join("..data")).expect("..data");
    symlink("..data/cwreap.yaml", volume.join("cwreap.yaml")).expect("the key's symlink");
    let key = volume.join("cwreap.yaml");

    // The mount is what it seems: read-only, even for root.
    let mut probe = Command::new("unshare");
    probe
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && touch "$1/probe""#,
            "sh",
        ])
        .arg(&volume);
    let (code, _, err, _) = run_guarded(&mut probe);
    assert!(
        code != Some(0) && err.contains("Read-only file system"),
        "the bind mount is not read-only: exit {code:?}: {err}"
    );

    // Read-only, all root's: accepted by `check` and by `run`.
    let (code, out, err, _) = run_guarded(&mut on_read_only_mount(&volume, "check", &key));
    assert_eq!(code, Some(0), "check on the read-only mount:\n{out}\n{err}");
    assert!(out.contains(": OK"), "{out}");
    let mut cmd = on_read_only_mount(&volume, "run", &key);
    Running::prepare(&mut cmd);
    let mut d = Running::attach(cmd.spawn().expect("spawn cwreap run")).started();
    let (status, _) = d.terminate(HANG);
    assert!(status.success(), "{status}; log:\n{}", d.log());

    // The same layout on a writable mount: anyone may swap the entries.
    refused(
        "a ConfigMap volume on a writable mount",
        &key,
        &[
            &format!(
                "directory {} is writable by others (mode 0777) and not sticky",
                volume.display()
            ),
            "read-only",
        ],
    );

    // Read-only, but a link or the file is nobody's: refused, naming it.
    let ro = |sub: &str, cfg: &Path| on_read_only_mount(&volume, sub, cfg);
    for (entry, needle) in [
        (
            volume.join("..data"),
            format!(
                "symlink {}/..data is owned by uid 65534, not root",
                volume.display()
            ),
        ),
        (
            key.clone(),
            format!("symlink {} is owned by uid 65534, not root", key.display()),
        ),
        (data.clone(), "is owned by uid 65534, not root".to_owned()),
    ] {
        lchown(&entry, Some(NOBODY_UID), Some(NOBODY_UID)).expect("chown nobody");
        refused_by(
            &format!("{} owned by nobody on a read-only mount", entry.display()),
            &key,
            &[&needle, "fix:"],
            ro,
        );
        lchown(&entry, Some(0), Some(0)).expect("chown root");
    }
}
