//! Pid files: whoever can write one decides which process cwreap acts on, so a pid file
//! is trusted only as systemd trusts a `PIDFile=`: owned by root or by cwreap's own user,
//! in directories only they can change (sticky ones aside), reached without following a
//! symlink at the end. It is opened without blocking (a FIFO there cannot stall a cycle),
//! must be a regular file, and at most 64 bytes of it are read (a symlink to a huge file
//! or to /dev/zero costs nothing).

use std::io;
use std::path::{Path, PathBuf};

use cwreap_linux::secure_fs::{self, Kind, Meta, Missing, Walk, WalkError};

use crate::shared::config::file::{owner_names, path_fix, path_problem, shell_quote};
use crate::shared::selector::parse_pid_file;

/// The most of a pid file read: a pid and a newline fit many times over.
pub const MAX_PID_FILE_BYTES: u64 = 64;

/// Why a pid file gives no pid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PidFileError {
    /// It does not exist (the service may be restarting): no pid, and no alarm.
    #[error("pid file {0}: not found")]
    Missing(PathBuf),
    /// It exists, but trusting it would let someone else choose the process.
    #[error("pid file {path}: refused: {problem}")]
    Refused { path: PathBuf, problem: String },
    /// It could not be read, or holds no pid.
    #[error("pid file {path}: {why}")]
    Unreadable { path: PathBuf, why: String },
}

/// The uids a pid file and the directories above it may belong to: root, and this
/// process's effective user (a service's own pid file, cwreap's unit being that user).
pub fn trusted_owners() -> Vec<u32> {
    let me = cwreap_linux::sys::euid();
    if me == 0 { vec![0] } else { vec![0, me] }
}

/// The pid in the pid file at `path`, owned by one of `owners`.
pub fn read(path: &Path, owners: &[u32]) -> Result<i32, PidFileError> {
    let refused = |problem: String| PidFileError::Refused {
        path: path.to_path_buf(),
        problem,
    };
    let unreadable = |why: String| PidFileError::Unreadable {
        path: path.to_path_buf(),
        why,
    };
    let who = owner_names(owners);
    let how = Walk {
        follow_last: false,
        missing: Missing::Fail,
    };
    let found = secure_fs::walk(path, how, &mut |p: &Path, m: &Meta, _| match path_problem(
        p, m, owners,
    ) {
        Some(problem) => Err(format!(
            "{problem}, so someone else could choose the process; {}",
            path_fix(p, m, &who)
        )),
        None => Ok(()),
    })
    .map_err(|e| match e {
        WalkError::Refused(problem) => refused(problem),
        WalkError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
            PidFileError::Missing(path.to_path_buf())
        }
        other => unreadable(other.to_string()),
    })?;
    match found.entry {
        None => return Err(PidFileError::Missing(path.to_path_buf())),
        Some(m) if m.kind == Kind::Symlink => {
            return Err(refused(format!(
                "it is a symlink; fix: point the selector at the pid file itself ({})",
                found.path().display()
            )));
        }
        Some(m) if m.kind != Kind::Regular => {
            return Err(refused(format!(
                "it is {}, not a regular file",
                m.kind.article_name()
            )));
        }
        Some(_) => {}
    }
    let (f, meta) = secure_fs::open_read(&found).map_err(|e| unreadable(e.to_string()))?;
    if meta.kind != Kind::Regular {
        return Err(refused(format!(
            "it is {}, not a regular file",
            meta.kind.article_name()
        )));
    }
    if !owners.contains(&meta.uid) {
        let p = shell_quote(&path.display().to_string());
        return Err(refused(format!(
            "it is owned by uid {}, not {who}, so that user could choose the process; fix: chown {who} {p}, or name the service by --unit/systemd_unit instead",
            meta.uid
        )));
    }
    if meta.mode & 0o022 != 0 {
        let p = shell_quote(&path.display().to_string());
        return Err(refused(format!(
            "it is writable by group or others (mode {:04o}); fix: chmod go-w {p}",
            meta.mode & 0o7777
        )));
    }
    let bytes = secure_fs::read_capped(&f, MAX_PID_FILE_BYTES)
        .map_err(|e| unreadable(e.to_string()))?
        .ok_or_else(|| {
            refused(format!(
                "it holds more than {MAX_PID_FILE_BYTES} bytes, more than any pid file"
            ))
        })?;
    let text = String::from_utf8_lossy(&bytes);
    parse_pid_file(&text).ok_or_else(|| unreadable(format!("no pid in {:?}", text.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> PathBuf {
        let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("unit-scratch")
            .join(format!("pid-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        d
    }

    /// The owners these tests trust: whoever runs them (and root), with the directories
    /// above the scratch directory (the checkout's) theirs too.
    fn owners() -> Vec<u32> {
        trusted_owners()
    }

    #[test]
    fn a_plain_pid_file_gives_its_pid() {
        let d = scratch("plain");
        let p = d.join("app.pid");
        std::fs::write(&p, "4242\n").expect("write");
        assert_eq!(read(&p, &owners()), Ok(4242));
        std::fs::write(&p, "nope").expect("write");
        assert!(matches!(
            read(&p, &owners()),
            Err(PidFileError::Unreadable { .. })
        ));
        assert!(matches!(
            read(&d.join("gone.pid"), &owners()),
            Err(PidFileError::Missing(_))
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_symlink_a_fifo_a_huge_file_and_a_writable_one_are_refused_at_once() {
        let d = scratch("refused");
        let huge = d.join("huge");
        std::fs::write(&huge, vec![b'1'; 300_000]).expect("write");
        std::os::unix::fs::symlink(&huge, d.join("link.pid")).expect("symlink");
        assert!(matches!(
            read(&d.join("link.pid"), &owners()),
            Err(PidFileError::Refused { problem, .. }) if problem.contains("symlink")
        ));
        assert!(matches!(
            read(&huge, &owners()),
            Err(PidFileError::Refused { problem, .. }) if problem.contains("64 bytes")
        ));
        let fifo = d.join("fifo.pid");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .expect("mkfifo");
        let started = std::time::Instant::now();
        assert!(matches!(
            read(&fifo, &owners()),
            Err(PidFileError::Refused { problem, .. }) if problem.contains("FIFO")
        ));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "never blocks"
        );
        let w = d.join("writable.pid");
        std::fs::write(&w, "7\n").expect("write");
        std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(matches!(
            read(&w, &owners()),
            Err(PidFileError::Refused { problem, .. }) if problem.contains("writable")
        ));
        let _ = std::fs::remove_dir_all(&d);
    }
}
