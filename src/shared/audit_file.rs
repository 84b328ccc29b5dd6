//! Where the audit log may live, and opening it.
//!
//! The audit log is written by a privileged daemon, so its path gets the policy file's
//! treatment (see [`crate::shared::config::file`]): every directory from `/` down, and every
//! symlink on the way, is checked through the fd it was opened as; each must belong to root
//! or to the daemon's own uid (under systemd's DynamicUser= the log directory is the
//! transient user's), and no directory may be writable by group or others unless sticky.
//! Below a directory that is root's and closed to everyone else (systemd's
//! /var/log/private, mode 0700) any owner is fine: nobody else can reach it. The file
//! itself is never followed as a symlink (O_NOFOLLOW), must be a regular file with one
//! link, belong to root or us, and not be writable by group or others. A missing directory
//! is created with mode 0750, so the daemon runs outside systemd (without LogsDirectory=)
//! too. The writer thread cuts a torn last line off whenever it takes a newly opened file
//! (see `crate::daemon::audit`), so the repair never races with its own writes.

use std::fs::File;
use std::path::{Path, PathBuf};

use cwreap_linux::secure_fs::{self, Kind, Meta, Missing, Walk, WalkError};

use crate::shared::config::file::{path_fix, path_problem, shell_quote};

/// Mode of the directories the daemon creates for its audit log.
pub(super) const DIR_MODE: u32 = 0o750;
/// Mode of the audit log it creates.
pub(super) const FILE_MODE: u32 = 0o600;

/// The uids that may own the audit log's directories and file: root, and us.
fn owners() -> Vec<u32> {
    let me = cwreap_linux::sys::euid();
    if me == 0 { vec![0] } else { vec![0, me] }
}

fn owner_name(owners: &[u32]) -> String {
    match owners {
        [_, me] => format!("root (or uid {me})"),
        _ => "root".to_owned(),
    }
}

/// The directory and symlink rules of the module documentation, as a walk's check.
/// `sealed` collects the directories only root can enter.
fn rules<'a>(
    owners: &'a [u32],
    sealed: &'a mut Vec<PathBuf>,
) -> impl FnMut(&Path, &Meta) -> Result<(), String> + 'a {
    move |p: &Path, m: &Meta| {
        let inside = sealed.iter().any(|s| p.starts_with(s) && p != s);
        let allowed: &[u32] = if inside { &[] } else { owners };
        if let Some(problem) = path_problem(p, m, allowed) {
            return Err(format!(
                "{problem}, so another user could swap the audit log; {}",
                path_fix(p, m, &owner_name(owners))
            ));
        }
        if m.kind == Kind::Directory && m.uid == 0 && m.mode & 0o077 == 0 {
            sealed.push(p.to_path_buf());
        }
        Ok(())
    }
}

/// What is wrong with the audit log file itself, if anything.
fn file_problem(path: &Path, m: &Meta, owners: &[u32], sealed: &[PathBuf]) -> Option<String> {
    let p = shell_quote(&path.display().to_string());
    let inside = sealed.iter().any(|s| path.starts_with(s));
    if m.kind != Kind::Regular {
        return Some(format!(
            "it is {}, not a regular file; fix: remove it (cwreap creates the file itself) or point audit_log elsewhere",
            m.kind.article_name()
        ));
    }
    if !inside && !owners.contains(&m.uid) {
        return Some(format!(
            "it is owned by uid {}, not {}; fix: chown root {p}",
            m.uid,
            owner_name(owners),
        ));
    }
    if m.mode & 0o022 != 0 {
        return Some(format!(
            "it is writable by group or others (mode {:04o}); fix: chmod 600 {p}",
            m.mode
        ));
    }
    if m.nlink > 1 {
        return Some(format!(
            "it has {} hard links, so writing it could change another file; fix: remove it (cwreap creates the file itself)",
            m.nlink
        ));
    }
    None
}

/// One line: the path, the problem, the fix.
fn message(path: &Path, problem: &str) -> String {
    format!("audit_log {}: {problem}", path.display())
}

fn walk_error(path: &Path, e: WalkError<String>) -> String {
    match e {
        WalkError::Refused(problem) => message(path, &problem),
        WalkError::Io { path: p, source } => message(
            path,
            &format!(
                "{}: {source}; fix: make the directories on the way exist and be root's, or point audit_log elsewhere",
                p.display()
            ),
        ),
        other => message(path, &format!("{other}; fix: point audit_log elsewhere")),
    }
}

/// Open the audit log for appending (creating it, mode 0600, and any missing directory,
/// mode 0750), after checking its path. The error is one line.
pub fn open(path: &Path) -> Result<File, String> {
    let owners = owners();
    let mut sealed = Vec::new();
    let how = Walk {
        follow_last: false,
        missing: Missing::Create { mode: DIR_MODE },
    };
    let found = {
        let mut check = rules(&owners, &mut sealed);
        secure_fs::walk(path, how, &mut check).map_err(|e| walk_error(path, e))?
    };
    let resolved = found.path();
    // A symlink, FIFO or device is refused before it is opened.
    if let Some(m) = &found.entry
        && let Some(problem) = file_problem(&resolved, m, &owners, &sealed)
    {
        return Err(message(path, &problem));
    }
    let (file, m) = secure_fs::open_append(&found, FILE_MODE).map_err(|e| {
        message(
            path,
            &format!("cannot open it: {e}; fix: point audit_log at a file the daemon may create"),
        )
    })?;
    if let Some(problem) = file_problem(&resolved, &m, &owners, &sealed) {
        return Err(message(path, &problem));
    }
    Ok(file)
}

/// What `cwreap check` says about `audit_log`: the problem `cwreap run` would hit with it,
/// if any. Creates and writes nothing: a missing directory or file is fine when the
/// directory above it is acceptable and writable.
pub fn problem(path: &Path) -> Option<String> {
    let owners = owners();
    let mut sealed = Vec::new();
    let how = Walk {
        follow_last: false,
        missing: Missing::Stop,
    };
    let found = {
        let mut check = rules(&owners, &mut sealed);
        match secure_fs::walk(path, how, &mut check) {
            Ok(f) => f,
            Err(e) => return Some(walk_error(path, e)),
        }
    };
    let me = cwreap_linux::sys::uid();
    if let Some(missing) = &found.missing {
        return (!secure_fs::writable(&found.dir, None)).then(|| {
            message(
                path,
                &format!(
                    "directory {} is missing and uid {me} may not create it in {}; fix: create it (mode 0750) or run as root",
                    missing.display(),
                    found.dir_path.display()
                ),
            )
        });
    }
    match &found.entry {
        Some(m) => {
            if let Some(problem) = file_problem(&found.path(), m, &owners, &sealed) {
                return Some(message(path, &problem));
            }
            (!secure_fs::writable(&found.dir, Some(found.name.as_os_str()))).then(|| {
                message(
                    path,
                    &format!("uid {me} may not write it; fix: run as root, or chown it"),
                )
            })
        }
        None => (!secure_fs::writable(&found.dir, None)).then(|| {
            message(
                path,
                &format!(
                    "uid {me} may not create it in {}; fix: run as root, or point audit_log elsewhere",
                    found.dir_path.display()
                ),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, chown};

    fn mkdir(path: &Path, mode: u32, uid: u32) {
        std::fs::create_dir(path).expect("mkdir");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        chown(path, Some(uid), None).expect("chown");
    }

    #[test]
    fn owners_sealed_directories_and_hard_links() {
        if cwreap_linux::sys::euid() != 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "needs root (chown), and CI=true forbids skipping"
            );
            eprintln!("SKIP: needs root (chown)");
            return;
        }
        let base = std::env::temp_dir().join(format!("cwreap-audit-path-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        mkdir(&base, 0o755, 0);
        // systemd's DynamicUser= layout: /var/log/private (root, 0700) holds the service's
        // own directory, owned by its transient uid.
        mkdir(&base.join("private"), 0o700, 0);
        mkdir(&base.join("private/svc"), 0o750, 61234);
        let sealed = base.join("private/svc/audit.jsonl");
        assert_eq!(problem(&sealed), None);
        assert!(open(&sealed).is_ok());
        // The same directory anywhere else: another user could swap the file.
        mkdir(&base.join("svc"), 0o750, 61234);
        let exposed = base.join("svc/audit.jsonl");
        let e = problem(&exposed).expect("uid 61234's directory");
        assert!(
            e.contains("directory") && e.contains("owned by uid 61234"),
            "{e}"
        );
        assert!(open(&exposed).is_err());
        // A second name for another file.
        std::fs::write(base.join("victim"), b"x\n").expect("victim");
        std::fs::hard_link(base.join("victim"), base.join("linked")).expect("link");
        let e = open(&base.join("linked")).expect_err("a hard link");
        assert!(e.contains("2 hard links"), "{e}");
        // Created: missing directories 0750, the file 0600.
        let fresh = base.join("new/dir/audit.jsonl");
        assert_eq!(problem(&fresh), None);
        assert!(!base.join("new").exists(), "a probe creates nothing");
        open(&fresh).expect("create");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&base.join("new/dir")), DIR_MODE);
        assert_eq!(mode(&fresh), FILE_MODE);
        let _ = std::fs::remove_dir_all(&base);
    }
}
