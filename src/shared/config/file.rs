//! The policy file on disk, and the usage errors of the whole program.
//!
//! The policy decides which sockets of which processes get shut down, so when cwreap runs
//! privileged it refuses one that someone other than root could change or swap (sshd's
//! StrictModes, and more): the file is opened once, through directories each checked by
//! the fd it was opened as (see [`cwreap_linux::secure_fs`]), and judged and read through
//! that same fd. Every directory from `/` down must be root's and not writable by group or
//! others unless sticky; symlinks on the way must be root's; the file root's, not writable
//! by group or others, a regular file (a FIFO would hang the reader) of at most 1 MiB.
//!
//! One exception: a directory writable by others on a read-only mount (`ST_RDONLY`), as
//! several kubelets make a ConfigMap volume (mode 0777, mounted read-only into the pod).
//! Nobody can change it through that mount. But read-only is a property of the mount, not
//! of the directory, and kubelet writes it through a mount of its own: what another user
//! could do there is put their own entries in it, or rename root's. So below it, as
//! everywhere, every symlink (the key → `..data` → the timestamped directory), every
//! directory and the file must be root's, which the rules above already demand of the
//! whole path; a swap can then only ever name a root-owned file kubelet wrote.

use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;

use cwreap_linux::secure_fs::{self, Kind, Meta, Missing, Walk, WalkError};

use super::error::ConfigError;
use super::model::Config;
use super::raw;

/// The largest policy read; anything bigger is refused, not truncated.
pub const MAX_POLICY_BYTES: u64 = 1024 * 1024;

/// Load a policy for running or checking: opened once, ownership and mode of the file and
/// of every directory on its path checked first (when privileged), then the content.
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    let text = read_policy(path, cwreap_linux::sys::runs_privileged())?;
    super::parse(&text, &path.display().to_string())
}

/// The checks of [`load_config`] without parsing. Privileged means euid 0, or any
/// effective capability (the shipped unit runs as a transient user with ambient
/// CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH and CAP_NET_ADMIN).
pub fn check_file_permissions(path: &Path) -> Result<(), ConfigError> {
    read_policy(path, cwreap_linux::sys::runs_privileged()).map(drop)
}

/// Open the policy once and read it through that fd. `strict`: the ownership and mode
/// rules of the module documentation. Always: a regular file of at most 1 MiB, opened
/// without blocking.
pub(super) fn read_policy(path: &Path, strict: bool) -> Result<String, ConfigError> {
    let file = path.display().to_string();
    let read_err = |source: io::Error| ConfigError::Read {
        file: file.clone(),
        source,
    };
    let refuse = |problem: String| ConfigError::Unsafe {
        file: file.clone(),
        problem,
    };
    let how = Walk {
        follow_last: true,
        missing: Missing::Fail,
    };
    let found = secure_fs::walk(path, how, &mut |p: &Path, m: &Meta, fd: BorrowedFd<'_>| {
        if !strict {
            return Ok(());
        }
        let open_to_others = open_to_others(m);
        // The symlinks, directories and file below must be root's: path_problem and
        // permission_problem demand that of the whole path anyway (module documentation).
        if open_to_others && secure_fs::read_only_mount(fd).unwrap_or(false) {
            return Ok(());
        }
        match path_problem(p, m, &[0]) {
            Some(problem) => {
                let read_only = if open_to_others {
                    " (or mount it read-only, as kubelet mounts a ConfigMap volume, with every symlink and file in it root's)"
                } else {
                    ""
                };
                Err(format!(
                    "refusing the policy: {problem}, so a non-root user could swap the policy; {}{read_only}",
                    path_fix(p, m, "root")
                ))
            }
            None => Ok(()),
        }
    })
    .map_err(|e| match e {
        WalkError::Refused(problem) => refuse(problem),
        WalkError::Io { path: p, source } if p == path => read_err(source),
        WalkError::Io { path: p, source } => read_err(io::Error::new(
            source.kind(),
            format!("{}: {source}", p.display()),
        )),
        other => read_err(io::Error::other(other.to_string())),
    })?;
    let not_regular = |kind: Kind| {
        refuse(format!(
            "refusing the policy: it is {}, not a regular file; fix: point --config at a regular file",
            kind.article_name()
        ))
    };
    match found.entry {
        None => return Err(read_err(io::ErrorKind::NotFound.into())),
        Some(m) if m.kind != Kind::Regular => return Err(not_regular(m.kind)),
        Some(_) => {}
    }
    let (f, meta) = secure_fs::open_read(&found).map_err(read_err)?;
    if meta.kind != Kind::Regular {
        return Err(not_regular(meta.kind));
    }
    if strict && let Some(problem) = permission_problem(meta.mode, meta.uid) {
        let f = shell_quote(&file);
        return Err(refuse(format!(
            "{problem}; fix: chown root:root {f} && chmod 600 {f}"
        )));
    }
    let bytes = secure_fs::read_capped(&f, MAX_POLICY_BYTES)
        .map_err(read_err)?
        .ok_or_else(|| {
            refuse(format!(
                "refusing the policy: it is larger than {} KiB; fix: point --config at the policy itself",
                MAX_POLICY_BYTES / 1024
            ))
        })?;
    String::from_utf8(bytes)
        .map_err(|_| read_err(io::Error::new(io::ErrorKind::InvalidData, "not UTF-8")))
}

/// `owners` (uids) in words: "root or uid 1000".
pub(crate) fn owner_names(owners: &[u32]) -> String {
    owners
        .iter()
        .map(|u| {
            if *u == 0 {
                "root".to_owned()
            } else {
                format!("uid {u}")
            }
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

/// What makes a directory or symlink on the way to a file cwreap trusts unsafe: someone
/// not in `owners` (uids) could change what the path names. A directory must belong to
/// one of `owners` and not be writable by group or others, unless sticky (then only an
/// entry's owner may rename it: /tmp); a symlink must belong to one of `owners` (its own
/// mode means nothing). An empty `owners` accepts any owner (the audit log's directories
/// below one that only root may enter).
pub(crate) fn path_problem(path: &Path, m: &Meta, owners: &[u32]) -> Option<String> {
    let p = path.display();
    let owner_ok = owners.is_empty() || owners.contains(&m.uid);
    let names = || owner_names(owners);
    match m.kind {
        Kind::Symlink if !owner_ok => Some(format!(
            "symlink {p} is owned by uid {}, not {}",
            m.uid,
            names()
        )),
        Kind::Directory if !owner_ok => Some(format!(
            "directory {p} is owned by uid {}, not {}",
            m.uid,
            names()
        )),
        Kind::Directory if m.mode & 0o022 != 0 && !m.sticky() => {
            let who = if m.mode & 0o002 != 0 {
                "others"
            } else {
                "group"
            };
            Some(format!(
                "directory {p} is writable by {who} (mode {:04o}) and not sticky",
                m.mode
            ))
        }
        _ => None,
    }
}

/// A root-owned directory others may change entries of (writable by group or others, not
/// sticky): acceptable on the policy's path only on a read-only mount.
fn open_to_others(m: &Meta) -> bool {
    m.kind == Kind::Directory && m.uid == 0 && m.mode & 0o022 != 0 && !m.sticky()
}

/// The fix for a [`path_problem`]: give it to `owner`, or take the write bits away.
pub(crate) fn path_fix(path: &Path, m: &Meta, owner: &str) -> String {
    let p = shell_quote(&path.display().to_string());
    match m.kind {
        Kind::Symlink => {
            format!("fix: replace symlink {p} with one owned by {owner}, or name the file itself")
        }
        _ if m.mode & 0o022 != 0 && !m.sticky() => format!("fix: chmod go-w {p}"),
        _ => format!("fix: chown {owner} {p}"),
    }
}

pub(super) fn permission_problem(mode: u32, owner_uid: u32) -> Option<String> {
    let mut problems = Vec::new();
    if owner_uid != 0 {
        problems.push(format!("is owned by uid {owner_uid}, not root"));
    }
    let writable: Vec<&str> = [(0o020, "group"), (0o002, "others")]
        .into_iter()
        .filter(|(bit, _)| mode & bit != 0)
        .map(|(_, who)| who)
        .collect();
    if !writable.is_empty() {
        problems.push(format!(
            "is writable by {} (mode {:04o})",
            writable.join(" and "),
            mode & 0o7777
        ));
    }
    (!problems.is_empty()).then(|| {
        format!(
            "refusing the policy: it {}, so a non-root user could choose what cwreap shuts down",
            problems.join(" and ")
        )
    })
}

pub(crate) fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Read and validate the policy at `path`: a regular file of at most 1 MiB, opened
/// without blocking. Does not check ownership or modes: the daemon and `cwreap check` use
/// [`load_config`], which does.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_policy(path, false)?;
    parse(&text, &path.display().to_string())
}

/// Validate a policy given as text; `source` names it in messages.
pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
    let invalid = |p: raw::Problem| ConfigError::Invalid {
        file: source.to_owned(),
        position: p.position,
        message: p.message,
    };
    let raw: raw::RawConfig =
        serde_saphyr::from_str(text).map_err(|e| invalid(raw::yaml_problem(text, &e)))?;
    Config::from_raw(raw).map_err(invalid)
}
