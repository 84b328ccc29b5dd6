//! Where the audit log may live, and opening it.
//!
//! The audit log is written by a privileged daemon, so its path gets the policy file's
//! treatment (see [`crate::shared::config::file`]): every directory from `/` down, and every
//! symlink on the way, is checked through the fd it was opened as; each must belong to root
//! or to the daemon's own uid (under systemd's DynamicUser= the log directory is the
//! transient user's), and no directory may be writable by group or others unless sticky.
//! Below a directory that is root's and closed to everyone else (systemd's
//! /var/log/private, mode 0700) a directory may belong to anyone: nobody else can reach it.
//! The file itself is never followed as a symlink (O_NOFOLLOW), must be a regular file with
//! one link, belong to root or us whatever the directory (a file planted before a directory
//! was locked down stays its owner's: they may hold it open, to read it or cut it), and not
//! be writable by group or others. A missing directory is created with mode 0750, so the
//! daemon runs outside systemd (without LogsDirectory=) too. The writer thread cuts a torn
//! last line off whenever it takes a newly opened file (see `crate::daemon::audit`), so the
//! repair never races with its own writes.
//!
//! Opening never creates and creating never opens: an existing file is opened without
//! O_CREAT, a missing one is created with O_EXCL, so the file cwreap creates is one nobody
//! planted a moment before. In a sticky directory (/tmp, mode 1777) any user may create
//! the audit path while it is free, after logrotate moved the log away and before the
//! reload that reopens it. Refusing such a file would let anyone stop every reload (and
//! keep records going to the moved file, which logrotate deletes), so whatever another user
//! put there (a file, a FIFO, a symlink) is moved aside, unopened, to
//! `<name>.foreign.<unix time>` (kept: it is evidence), the move is logged with its owner,
//! and a new file is created at the audit path, which logrotate and readers keep following.
//! When the daemon may not move it (it is not root, and the directory is not its own), or
//! someone keeps planting entries as fast as they are moved, records go to a fresh file it
//! creates beside it, `<name>.fresh.<unix time>`, until the next reload, and the log says
//! why and how to fix it. Elsewhere, a file another user owns is refused: only root or the
//! directory's owner could have put it there.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use cwreap_linux::secure_fs::{self, Found, Kind, Meta, Missing, Walk, WalkError};

use crate::shared::config::file::{path_fix, path_problem, shell_quote};

/// Mode of the directories the daemon creates for its audit log.
pub(super) const DIR_MODE: u32 = 0o750;
/// Mode of the audit log it creates.
pub(super) const FILE_MODE: u32 = 0o600;
/// How many entries planted at the audit path in a row are moved aside before the daemon
/// writes beside it instead (someone keeps creating it as fast as it is moved).
const MOVES: usize = 4;

/// The uids that may own the audit log's directories and file: root, and us.
fn owners() -> Vec<u32> {
    let me = cwreap_linux::sys::euid();
    if me == 0 { vec![0] } else { vec![0, me] }
}

fn owner_name(owners: &[u32]) -> String {
    let others: Vec<String> = owners
        .iter()
        .filter(|u| **u != 0)
        .map(|u| format!("uid {u}"))
        .collect();
    if others.is_empty() {
        "root".to_owned()
    } else {
        format!("root (or {})", others.join(" or "))
    }
}

/// The directory and symlink rules of the module documentation, as a walk's check.
/// `sealed` collects the directories only root can enter.
fn rules<'a>(
    owners: &'a [u32],
    sealed: &'a mut Vec<PathBuf>,
) -> impl FnMut(&Path, &Meta, BorrowedFd<'_>) -> Result<(), String> + 'a {
    move |p: &Path, m: &Meta, _: BorrowedFd<'_>| {
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

/// What is wrong with the audit log file itself, if anything. `owners`: who may own it.
fn file_problem(path: &Path, m: &Meta, owners: &[u32]) -> Option<String> {
    let p = shell_quote(&path.display().to_string());
    if m.kind != Kind::Regular {
        return Some(format!(
            "it is {}, not a regular file; fix: remove it (cwreap creates the file itself) or point audit_log elsewhere",
            m.kind.article_name()
        ));
    }
    if !owners.contains(&m.uid) {
        return Some(format!(
            "it is owned by uid {}, not {}, and its owner may hold it open to read, rewrite or cut the audit trail, whatever the directory's mode now; fix: mv {p} {p}.suspect and let cwreap create a new one (a chown would not take back a descriptor its owner holds)",
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

/// Whether an entry at the audit path was put there by another user in a sticky directory
/// (module documentation): moved aside, never refused.
fn planted(dir: &Meta, m: &Meta, owners: &[u32]) -> bool {
    dir.sticky() && !owners.contains(&m.uid)
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

/// The audit log, opened, and what had to be done about entries planted at its path.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    /// One line each, for the log: what was moved aside, or why records go elsewhere.
    pub warnings: Vec<String>,
}

/// Open the audit log for appending (creating it, mode 0600, and any missing directory,
/// mode 0750), after checking its path. In a sticky directory, an entry another user put
/// at the path is moved aside (module documentation). The error is one line.
pub fn open(path: &Path) -> Result<Opened, String> {
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
    let dir = secure_fs::meta(&found.dir).map_err(|e| {
        message(
            path,
            &format!(
                "{}: {e}; fix: point audit_log elsewhere",
                found.dir_path.display()
            ),
        )
    })?;
    let mut warnings = Vec::new();
    let mut entry = found.entry;
    for _ in 0..MOVES {
        match entry {
            None => match secure_fs::create_new(&found, &found.name, FILE_MODE) {
                Ok((file, _)) => return Ok(Opened { file, warnings }),
                // Someone was quicker: look at what they made.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(message(
                        path,
                        &format!(
                            "cannot create it: {e}; fix: point audit_log at a file the daemon may create"
                        ),
                    ));
                }
            },
            Some(m) if planted(&dir, &m, &owners) => match move_aside(&found) {
                Ok(aside) => warnings.push(message(
                    path,
                    &format!(
                        "{} owned by uid {} (mode {:04o}) was at the audit path, in sticky directory {} where any user may create entries; moved it aside, unopened, to {}, and created a new audit log; fix: find out who put it there, and keep audit_log in a directory only {} may write",
                        m.kind.article_name(),
                        m.uid,
                        m.mode,
                        found.dir_path.display(),
                        aside.display(),
                        owner_name(&owners)
                    ),
                )),
                Err(e) => {
                    let why = format!(
                        "{} owned by uid {} is at the audit path, in sticky directory {}, and uid {} may not move it aside ({e})",
                        m.kind.article_name(),
                        m.uid,
                        found.dir_path.display(),
                        cwreap_linux::sys::euid()
                    );
                    return beside(&found, path, &owners, &why, warnings);
                }
            },
            Some(m) => {
                if let Some(problem) = file_problem(&resolved, &m, &owners) {
                    return Err(message(path, &problem));
                }
                match secure_fs::open_append_existing(&found) {
                    // Replaced since it was looked at: look again.
                    Ok((_, now)) if planted(&dir, &now, &owners) => {}
                    Ok((file, now)) => {
                        return match file_problem(&resolved, &now, &owners) {
                            Some(problem) => Err(message(path, &problem)),
                            None => Ok(Opened { file, warnings }),
                        };
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(message(
                            path,
                            &format!(
                                "cannot open it: {e}; fix: point audit_log at a file the daemon may create"
                            ),
                        ));
                    }
                }
            }
        }
        entry = secure_fs::entry_now(&found).map_err(|e| {
            message(
                path,
                &format!("cannot look at it: {e}; fix: point audit_log elsewhere"),
            )
        })?;
    }
    let why = format!(
        "another user kept creating entries at the audit path, in sticky directory {}, as fast as they were moved aside ({MOVES} times)",
        found.dir_path.display()
    );
    beside(&found, path, &owners, &why, warnings)
}

/// `<name>.<tag>.<unix time>`, and `-1`, `-2`, ... after it while `try_name` finds the name
/// taken (`AlreadyExists`); gives up after a hundred.
fn unique_name<T>(
    name: &OsStr,
    tag: &str,
    mut try_name: impl FnMut(&OsStr) -> io::Result<T>,
) -> io::Result<(OsString, T)> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    for n in 0..100 {
        let mut candidate = name.to_os_string();
        candidate.push(format!(".{tag}.{secs}"));
        if n > 0 {
            candidate.push(format!("-{n}"));
        }
        match try_name(&candidate) {
            Ok(t) => return Ok((candidate, t)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Rename the entry at the audit path to `<name>.foreign.<unix time>`; its new path.
fn move_aside(found: &Found) -> io::Result<PathBuf> {
    let (aside, ()) = unique_name(&found.name, "foreign", |to| {
        secure_fs::rename_aside(found, to)
    })?;
    Ok(found.dir_path.join(aside))
}

/// Records go to a fresh file beside the audit path (`<name>.fresh.<unix time>`, created
/// with O_EXCL) until the next reload, because of `why`.
fn beside(
    found: &Found,
    path: &Path,
    owners: &[u32],
    why: &str,
    mut warnings: Vec<String>,
) -> Result<Opened, String> {
    let (fresh, (file, _)) = unique_name(&found.name, "fresh", |to| {
        secure_fs::create_new(found, to, FILE_MODE)
    })
    .map_err(|e| {
        message(
            path,
            &format!(
                "{why}, and a fresh file beside it cannot be created either ({e}); fix: remove {}, or keep audit_log in a directory only {} may write",
                shell_quote(&found.path().display().to_string()),
                owner_name(owners)
            ),
        )
    })?;
    warnings.push(message(
        path,
        &format!(
            "{why}; records go to {} until the next reload; fix: remove {} (as root or its owner) and reload, and keep audit_log in a directory only {} may write",
            found.dir_path.join(fresh).display(),
            shell_quote(&found.path().display().to_string()),
            owner_name(owners)
        ),
    ));
    Ok(Opened { file, warnings })
}

/// What `cwreap check` says about `audit_log`: the problem `cwreap run` would hit with it,
/// if any. Creates and writes nothing: a missing directory or file is fine when the
/// directory above it is acceptable and writable, and so is an entry another user put at
/// the path in a sticky directory (`run` moves it aside). The file may also belong to the
/// owner of its directory below one only root can enter: systemd's DynamicUser= layout,
/// checked by root while the daemon runs as that transient uid.
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
    let dir = match secure_fs::meta(&found.dir) {
        Ok(dir) => dir,
        Err(e) => {
            return Some(message(
                path,
                &format!(
                    "{}: {e}; fix: point audit_log elsewhere",
                    found.dir_path.display()
                ),
            ));
        }
    };
    match &found.entry {
        Some(m) if planted(&dir, m, &owners) => None,
        Some(m) => {
            let mut file_owners = owners.clone();
            if sealed.iter().any(|s| found.dir_path.starts_with(s)) && !owners.contains(&dir.uid)
            {
                file_owners.push(dir.uid);
            }
            if let Some(problem) = file_problem(&found.path(), m, &file_owners) {
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
    use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};

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
        // The file is the transient uid's too once the daemon ran as it: `check` (root)
        // accepts it there, as the daemon running as that uid would; root's daemon not.
        chown(&sealed, Some(61234), None).expect("chown");
        assert_eq!(problem(&sealed), None);
        let e = open(&sealed).expect_err("not root's, and we are root");
        assert!(e.contains("owned by uid 61234, not root"), "{e}");
        // Planted in a directory only root may enter (before it was locked): refused by
        // both, whatever the directory.
        let planted = base.join("private/audit.jsonl");
        std::fs::write(&planted, b"planted\n").expect("plant");
        chown(&planted, Some(65534), None).expect("chown");
        for e in [
            problem(&planted).expect("nobody's file"),
            open(&planted).expect_err("nobody's file"),
        ] {
            assert!(
                e.contains("owned by uid 65534, not root") && e.contains("fix: mv"),
                "{e}"
            );
        }
        assert_eq!(std::fs::read(&planted).expect("read"), b"planted\n");
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

    #[test]
    fn what_another_user_plants_in_a_sticky_directory_is_moved_aside() {
        if cwreap_linux::sys::euid() != 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "needs root (chown), and CI=true forbids skipping"
            );
            eprintln!("SKIP: needs root (chown)");
            return;
        }
        let base = std::env::temp_dir().join(format!("cwreap-audit-sticky-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        mkdir(&base, 0o755, 0);
        mkdir(&base.join("spool"), 0o1777, 0);
        let audit = base.join("spool/audit.jsonl");
        std::fs::write(&audit, b"planted\n").expect("plant");
        chown(&audit, Some(65534), None).expect("chown");
        assert_eq!(
            problem(&audit),
            None,
            "run moves it aside: no reason to refuse"
        );
        let opened = open(&audit).expect("moved aside");
        assert_eq!(opened.warnings.len(), 1, "{:?}", opened.warnings);
        let w = &opened.warnings[0];
        assert!(
            w.contains("a regular file owned by uid 65534") && w.contains("moved it aside"),
            "{w}"
        );
        let aside: Vec<_> = std::fs::read_dir(base.join("spool"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("audit.jsonl.foreign."))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert!(w.contains(&aside[0]), "{w}");
        assert_eq!(
            std::fs::read(base.join("spool").join(&aside[0])).expect("read"),
            b"planted\n",
            "moved, not opened"
        );
        let m = std::fs::metadata(&audit).expect("new file");
        assert_eq!((m.uid(), m.len()), (0, 0));
        // Ours now: opened again as it is, nothing moved.
        let again = open(&audit).expect("ours");
        assert!(again.warnings.is_empty(), "{:?}", again.warnings);
        // The same file in a directory that is not sticky: only root could have put it
        // there, so it is refused, not moved.
        mkdir(&base.join("plain"), 0o755, 0);
        let plain = base.join("plain/audit.jsonl");
        std::fs::write(&plain, b"").expect("write");
        chown(&plain, Some(65534), None).expect("chown");
        assert!(problem(&plain).is_some());
        assert!(open(&plain).is_err());
        let _ = std::fs::remove_dir_all(&base);
    }
}
