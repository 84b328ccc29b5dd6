//! Opening the files that decide what cwreap does (its policy) or record what it did (the
//! audit log) without trusting their path.
//!
//! [`walk`] resolves a path itself, one component at a time from `/`: each component is
//! opened with `O_PATH|O_NOFOLLOW` relative to the directory fd before it and `fstat`ed
//! through the fd it got, so what is checked is what is used next, and a rename elsewhere
//! cannot slip another directory in between. Symlinks are read (`readlinkat` on their own
//! `O_PATH` fd) and followed here, not by the kernel, so each is shown to the caller first.
//! What is acceptable (owners, modes, symlinks) is the caller's decision: [`walk`] shows it
//! every directory and symlink through a callback, with the fd it was opened as (so the
//! caller may ask more of it: [`read_only_mount`]). The file itself is then opened once,
//! relative to its checked directory and with `O_NOFOLLOW` ([`open_read`],
//! [`open_append_existing`], [`create_new`]), and judged by `fstat` of that very fd, which is
//! also the fd read or written. Creating is always `O_EXCL`, so a file created is one this
//! process made, never one someone planted a moment before; opening an existing file never
//! creates one. [`rename_aside`] moves an entry out of the way without opening it.
//!
//! [`cut_torn_tail`] keeps an append-only line file whole: whatever follows its last `\n`
//! (a line cut by a crash or a full disk) is truncated away.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Access, AtFlags, CWD, FileType, Mode, OFlags, RenameFlags, StatVfsMountFlags};

/// Symlinks followed in one walk before giving up (the kernel's own limit).
const MAX_SYMLINKS: usize = 40;

/// What a file is, from `fstat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Unknown,
}

impl Kind {
    /// How an error message names it: "a FIFO", "a directory".
    pub fn article_name(self) -> &'static str {
        match self {
            Kind::Regular => "a regular file",
            Kind::Directory => "a directory",
            Kind::Symlink => "a symlink",
            Kind::Fifo => "a FIFO",
            Kind::Socket => "a socket",
            Kind::CharDevice => "a character device",
            Kind::BlockDevice => "a block device",
            Kind::Unknown => "not a regular file",
        }
    }
}

/// The parts of `struct stat` a caller judges a file by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits with setuid, setgid and sticky (`st_mode & 07777`).
    pub mode: u32,
    pub nlink: u64,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
}

impl Meta {
    // The field types of `struct stat` differ between architectures.
    #[allow(clippy::unnecessary_cast)]
    fn of(st: &rustix::fs::Stat) -> Meta {
        let kind = match FileType::from_raw_mode(st.st_mode as _) {
            FileType::RegularFile => Kind::Regular,
            FileType::Directory => Kind::Directory,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::CharDevice,
            FileType::BlockDevice => Kind::BlockDevice,
            FileType::Unknown => Kind::Unknown,
        };
        Meta {
            kind,
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode as u32 & 0o7777,
            nlink: st.st_nlink as u64,
            size: st.st_size.max(0) as u64,
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
        }
    }

    /// Whether the sticky bit is set (only an entry's owner may rename or remove it).
    pub fn sticky(&self) -> bool {
        self.mode & 0o1000 != 0
    }
}

/// `fstat` of an open file.
pub fn meta(fd: impl AsFd) -> io::Result<Meta> {
    Ok(Meta::of(&rustix::fs::fstat(fd)?))
}

/// What [`walk`] does with a directory on the way that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Fail with `NotFound`, naming it.
    Fail,
    /// Create it (`mkdirat`, then `fchmod` to this mode whatever the umask) and go on.
    Create { mode: u32 },
    /// Stop there: [`Found::missing`] names it and nothing below it is walked.
    Stop,
}

/// How to walk.
#[derive(Debug, Clone, Copy)]
pub struct Walk {
    /// Follow a symlink in the last component (after showing it), or return it as the
    /// entry (then [`open_read`] and [`open_append_existing`] refuse it: they use `O_NOFOLLOW`).
    pub follow_last: bool,
    pub missing: Missing,
}

/// The end of a walk: the directory holding the file, checked, and the file's name in it.
#[derive(Debug)]
pub struct Found {
    /// The directory (an `O_PATH` fd, or an ordinary one for a directory created here).
    pub dir: OwnedFd,
    /// Its path, symlinks resolved.
    pub dir_path: PathBuf,
    /// The last component; empty when the path names `/`.
    pub name: OsString,
    /// The last component as `lstat` sees it, if it exists.
    pub entry: Option<Meta>,
    /// With [`Missing::Stop`]: the first directory that does not exist (then `dir` is its
    /// parent and `entry` is None).
    pub missing: Option<PathBuf>,
}

impl Found {
    /// The resolved path of the file.
    pub fn path(&self) -> PathBuf {
        self.dir_path.join(&self.name)
    }
}

/// Why a walk stopped.
#[derive(Debug, thiserror::Error)]
pub enum WalkError<E> {
    /// The caller's check refused a directory or symlink.
    #[error("refused")]
    Refused(E),
    /// A system call failed on `path` (`NotFound` for a missing directory with
    /// [`Missing::Fail`]).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A component on the way is neither a directory nor a symlink.
    #[error("{} is {} where a directory was expected", path.display(), kind.article_name())]
    NotADirectory { path: PathBuf, kind: Kind },
    #[error("{}: more than {MAX_SYMLINKS} symlinks", path.display())]
    TooManySymlinks { path: PathBuf },
}

/// What a walk's check is shown of one directory or symlink.
pub type Check<'a, E> = dyn FnMut(&Path, &Meta, BorrowedFd<'_>) -> Result<(), E> + 'a;

/// Walk `path` (relative paths start at the current directory, itself walked from `/`).
/// `check` sees every directory passed through (`/` first) and every symlink before it is
/// followed, with its resolved path, its `fstat` and the `O_PATH` fd they came from; an
/// `Err` from it stops the walk.
pub fn walk<E>(path: &Path, how: Walk, check: &mut Check<'_, E>) -> Result<Found, WalkError<E>> {
    let io_err = |path: &Path, source: io::Error| WalkError::Io {
        path: path.to_path_buf(),
        source,
    };
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| io_err(Path::new("."), e))?
            .join(path)
    };
    let root = open_path(CWD, Path::new("/")).map_err(|e| io_err(Path::new("/"), e))?;
    let root_meta = meta(&root).map_err(|e| io_err(Path::new("/"), e))?;
    check(Path::new("/"), &root_meta, root.as_fd()).map_err(WalkError::Refused)?;

    // The directories from `/` to where the walk is, and their names.
    let mut stack: Vec<(OwnedFd, OsString)> = vec![(root, OsString::new())];
    let here = |stack: &[(OwnedFd, OsString)]| -> PathBuf {
        let mut p = PathBuf::from("/");
        for (_, name) in &stack[1..] {
            p.push(name);
        }
        p
    };
    let mut todo: VecDeque<OsString> = components(&absolute);
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let last = todo.is_empty();
        let parent = here(&stack);
        let at = parent.join(&name);
        let dir = &stack[stack.len() - 1].0;
        let fd = match open_path(dir, Path::new(&name)) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound && last => {
                return Ok(Found {
                    dir: stack
                        .pop()
                        .map(|(fd, _)| fd)
                        .ok_or_else(|| io_err(&at, e))?,
                    dir_path: parent,
                    name,
                    entry: None,
                    missing: None,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match how.missing {
                Missing::Fail => return Err(io_err(&at, e)),
                Missing::Stop => {
                    return Ok(Found {
                        dir: stack
                            .pop()
                            .map(|(fd, _)| fd)
                            .ok_or_else(|| io_err(&at, e))?,
                        dir_path: parent,
                        name: todo.pop_back().unwrap_or_default(),
                        entry: None,
                        missing: Some(at),
                    });
                }
                Missing::Create { mode } => {
                    let fd = create_dir(dir, &name, mode).map_err(|e| io_err(&at, e))?;
                    let m = meta(&fd).map_err(|e| io_err(&at, e))?;
                    if m.kind != Kind::Directory {
                        return Err(WalkError::NotADirectory {
                            path: at,
                            kind: m.kind,
                        });
                    }
                    check(&at, &m, fd.as_fd()).map_err(WalkError::Refused)?;
                    stack.push((fd, name));
                    continue;
                }
            },
            Err(e) => return Err(io_err(&at, e)),
        };
        let m = meta(&fd).map_err(|e| io_err(&at, e))?;
        match m.kind {
            Kind::Symlink if !last || how.follow_last => {
                check(&at, &m, fd.as_fd()).map_err(WalkError::Refused)?;
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(WalkError::TooManySymlinks { path: at });
                }
                // An empty path reads the link the O_PATH fd itself names.
                let target = rustix::fs::readlinkat(&fd, "", Vec::new())
                    .map_err(|e| io_err(&at, e.into()))?;
                let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                if target.is_absolute() {
                    stack.truncate(1);
                }
                for c in components(&target).into_iter().rev() {
                    todo.push_front(c);
                }
            }
            _ if last => {
                let (dir, _) = stack
                    .pop()
                    .ok_or_else(|| io_err(&at, io::ErrorKind::NotFound.into()))?;
                return Ok(Found {
                    dir,
                    dir_path: parent,
                    name,
                    entry: Some(m),
                    missing: None,
                });
            }
            Kind::Directory => {
                check(&at, &m, fd.as_fd()).map_err(WalkError::Refused)?;
                stack.push((fd, name));
            }
            kind => return Err(WalkError::NotADirectory { path: at, kind }),
        }
    }
    // The path named a directory (`/` or one ending in `..`): the entry is that directory.
    let dir_path = here(&stack);
    let (dir, _) = stack
        .pop()
        .ok_or_else(|| io_err(&dir_path, io::ErrorKind::NotFound.into()))?;
    let m = meta(&dir).map_err(|e| io_err(&dir_path, e))?;
    Ok(Found {
        dir,
        dir_path,
        name: OsString::new(),
        entry: Some(m),
        missing: None,
    })
}

/// The normal components of an absolute or relative path, `..` kept, `.` and `/` dropped.
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn open_path(dir: impl AsFd, name: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// `mkdirat` then open it (no symlink followed) and set its mode past the umask. An
/// existing directory (a concurrent creator) is fine: it is opened and checked the same.
fn create_dir(dir: &OwnedFd, name: &OsStr, mode: u32) -> io::Result<OwnedFd> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode)) {
        Ok(()) => {
            let fd = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
            Ok(fd)
        }
        Err(rustix::io::Errno::EXIST) => open_path(dir, Path::new(name)),
        Err(e) => Err(e.into()),
    }
}

/// Open the file a walk found for reading: `O_RDONLY|O_NONBLOCK|O_NOFOLLOW|O_CLOEXEC`
/// relative to its directory, so a FIFO cannot block the open and a symlink is never
/// followed. Returns the file and `fstat` of it (judge the file by that, not by the walk).
pub fn open_read(found: &Found) -> io::Result<(File, Meta)> {
    let fd = rustix::fs::openat(
        &found.dir,
        found.name.as_os_str(),
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let m = meta(&fd)?;
    Ok((File::from(fd), m))
}

/// Open the existing file a walk found for appending, never creating one:
/// `O_RDWR|O_APPEND|O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC` relative to its directory (read
/// access is for [`cut_torn_tail`]). `NotFound` when it is gone. Returns the file and
/// `fstat` of it.
pub fn open_append_existing(found: &Found) -> io::Result<(File, Meta)> {
    let fd = rustix::fs::openat(
        &found.dir,
        found.name.as_os_str(),
        OFlags::RDWR | OFlags::APPEND | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let m = meta(&fd)?;
    Ok((File::from(fd), m))
}

/// Create `name` in the directory a walk found, for appending, with `mode` (past the
/// umask): `O_RDWR|O_APPEND|O_CREAT|O_EXCL|O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC`. Fails with
/// `AlreadyExists` when anything is there, even a dangling symlink. Returns the file and
/// `fstat` of it.
pub fn create_new(found: &Found, name: &OsStr, mode: u32) -> io::Result<(File, Meta)> {
    let fd = rustix::fs::openat(
        &found.dir,
        name,
        OFlags::RDWR
            | OFlags::APPEND
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::NONBLOCK
            | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    let m = meta(&fd)?;
    Ok((File::from(fd), m))
}

/// The entry a walk found as `lstat` sees it now (None: there is none).
pub fn entry_now(found: &Found) -> io::Result<Option<Meta>> {
    match rustix::fs::statat(
        &found.dir,
        found.name.as_os_str(),
        AtFlags::SYMLINK_NOFOLLOW,
    ) {
        Ok(st) => Ok(Some(Meta::of(&st))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Rename the entry a walk found to `to` in the same directory, whatever it is (nothing is
/// opened, so a FIFO cannot block), never replacing an entry named `to`
/// (`renameat2(RENAME_NOREPLACE)`: `AlreadyExists`).
pub fn rename_aside(found: &Found, to: &OsStr) -> io::Result<()> {
    Ok(rustix::fs::renameat_with(
        &found.dir,
        found.name.as_os_str(),
        &found.dir,
        to,
        RenameFlags::NOREPLACE,
    )?)
}

/// Whether the file system `fd` is on is mounted read-only (`fstatvfs`, `ST_RDONLY`): per
/// mount, so the same directory may be writable through another mount of it.
pub fn read_only_mount(fd: impl AsFd) -> io::Result<bool> {
    Ok(rustix::fs::fstatvfs(fd)?
        .f_flag
        .contains(StatVfsMountFlags::RDONLY))
}

/// Whether this process may write to the entry `name` of `dir` (or to `dir` itself when
/// `name` is None), by its real ids: what a probe of a path it will not write asks.
pub fn writable(dir: impl AsFd, name: Option<&OsStr>) -> bool {
    let name = name.unwrap_or_else(|| OsStr::new("."));
    rustix::fs::accessat(dir, name, Access::WRITE_OK, AtFlags::empty()).is_ok()
}

/// Read all of `file`, at most `max` bytes: `Ok(None)` when it holds more.
pub fn read_capped(file: &File, max: u64) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let mut limited = file.take(max + 1);
    limited.read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= max).then_some(buf))
}

/// Cut whatever follows the last `\n` of `file` (a line torn by a crash or a full disk),
/// so the next line starts on a line of its own. Returns how many bytes were cut.
pub fn cut_torn_tail(file: &File) -> io::Result<u64> {
    let size = meta(file)?.size;
    if size == 0 {
        return Ok(0);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, size - 1)?;
    if last[0] == b'\n' {
        return Ok(0);
    }
    // Back from the end in chunks until a newline (or the start of the file).
    let mut keep = 0;
    let mut end = size;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let buf = &mut chunk[..(end - start) as usize];
        file.read_exact_at(buf, start)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    rustix::fs::ftruncate(file, keep)?;
    Ok(size - keep)
}

/// `fdatasync(2)`: the data written so far is on the disk.
pub fn sync_data(file: &File) -> io::Result<()> {
    Ok(rustix::fs::fdatasync(file)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cwreap-securefs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    /// A walk's result, and each path the check was shown.
    type Seen = (Result<Found, WalkError<()>>, Vec<(PathBuf, Kind)>);

    fn seen(path: &Path, how: Walk) -> Seen {
        let mut log = Vec::new();
        let r = walk(path, how, &mut |p: &Path, m: &Meta, _: BorrowedFd<'_>| {
            log.push((p.to_path_buf(), m.kind));
            Ok::<(), ()>(())
        });
        (r, log)
    }

    const FOLLOW: Walk = Walk {
        follow_last: true,
        missing: Missing::Fail,
    };

    #[test]
    fn walk_shows_every_directory_and_symlink_and_resolves_them() {
        let d = scratch("walk");
        std::fs::create_dir_all(d.join("real/sub")).expect("mkdir");
        std::fs::write(d.join("real/sub/file"), b"x").expect("write");
        symlink("real", d.join("link")).expect("symlink");
        symlink("../real/sub/file", d.join("real/filelink")).expect("symlink");
        let (r, log) = seen(&d.join("link/sub/./../filelink"), FOLLOW);
        let found = r.expect("walk");
        assert_eq!(found.path(), d.join("real/sub/file"));
        assert_eq!(found.entry.map(|m| m.kind), Some(Kind::Regular));
        let kinds: Vec<Kind> = log.iter().map(|(_, k)| *k).collect();
        assert!(kinds.contains(&Kind::Symlink), "{log:?}");
        assert_eq!(log[0].0, Path::new("/"));
        assert!(log.iter().any(|(p, _)| p == &d.join("link")), "{log:?}");
        assert!(
            log.iter().any(|(p, _)| p == &d.join("real/filelink")),
            "{log:?}"
        );
        let (f, m) = open_read(&found).expect("open");
        assert_eq!(m.kind, Kind::Regular);
        assert_eq!(read_capped(&f, 10).expect("read"), Some(b"x".to_vec()));
        assert_eq!(
            read_capped(&open_read(&found).expect("open").0, 0).expect("read"),
            None
        );

        // Not followed at the end: the symlink itself is the entry, and O_NOFOLLOW refuses it.
        let (r, _) = seen(
            &d.join("real/filelink"),
            Walk {
                follow_last: false,
                missing: Missing::Fail,
            },
        );
        let found = r.expect("walk");
        assert_eq!(found.entry.map(|m| m.kind), Some(Kind::Symlink));
        assert!(open_read(&found).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn missing_directories_fail_stop_or_are_created_with_their_mode() {
        let d = scratch("missing");
        let target = d.join("a/b/file");
        let (r, _) = seen(&target, FOLLOW);
        assert!(matches!(r, Err(WalkError::Io { ref path, .. }) if path == &d.join("a")));
        let (r, _) = seen(
            &target,
            Walk {
                follow_last: false,
                missing: Missing::Stop,
            },
        );
        let found = r.expect("walk");
        assert_eq!(found.missing.as_deref(), Some(d.join("a").as_path()));
        assert_eq!(found.dir_path, d);
        let (r, log) = seen(
            &target,
            Walk {
                follow_last: false,
                missing: Missing::Create { mode: 0o750 },
            },
        );
        let found = r.expect("walk");
        assert!(found.entry.is_none());
        assert!(log.iter().any(|(p, _)| p == &d.join("a/b")), "{log:?}");
        for dir in ["a", "a/b"] {
            let mode = std::fs::metadata(d.join(dir))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o750, "{dir}");
        }
        assert_eq!(
            open_append_existing(&found).map(drop).map_err(|e| e.kind()),
            Err(io::ErrorKind::NotFound),
            "opening never creates"
        );
        let (mut f, m) = create_new(&found, &found.name, 0o600).expect("create");
        assert_eq!((m.kind, m.mode), (Kind::Regular, 0o600));
        f.write_all(b"one\ntw").expect("write");
        assert_eq!(cut_torn_tail(&f).expect("cut"), 2);
        assert_eq!(cut_torn_tail(&f).expect("cut"), 0);
        f.write_all(b"two\n").expect("write");
        sync_data(&f).expect("sync");
        assert_eq!(std::fs::read(&target).expect("read"), b"one\ntwo\n");
        std::fs::write(&target, b"no newline at all").expect("write");
        assert_eq!(
            create_new(&found, &found.name, 0o600)
                .map(drop)
                .map_err(|e| e.kind()),
            Err(io::ErrorKind::AlreadyExists),
            "creating never opens what is there"
        );
        let (f, _) = open_append_existing(&found).expect("open");
        assert_eq!(cut_torn_tail(&f).expect("cut"), 17);
        assert_eq!(std::fs::metadata(&target).expect("stat").len(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn entries_are_moved_aside_unopened_and_never_over_another() {
        let d = scratch("aside");
        let fifo = d.join("fifo");
        rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
            .expect("mkfifo");
        let (r, _) = seen(
            &fifo,
            Walk {
                follow_last: false,
                missing: Missing::Fail,
            },
        );
        let found = r.expect("walk");
        assert_eq!(
            entry_now(&found).expect("lstat").map(|m| m.kind),
            Some(Kind::Fifo)
        );
        std::fs::write(d.join("taken"), b"x").expect("write");
        assert_eq!(
            rename_aside(&found, OsStr::new("taken")).map_err(|e| e.kind()),
            Err(io::ErrorKind::AlreadyExists)
        );
        rename_aside(&found, OsStr::new("fifo.aside")).expect("rename");
        assert_eq!(entry_now(&found).expect("lstat"), None);
        assert_eq!(std::fs::read(d.join("taken")).expect("read"), b"x");
        assert!(d.join("fifo.aside").exists());
        // A dangling symlink is something: O_EXCL does not create its target.
        symlink(d.join("target"), d.join("dangling")).expect("symlink");
        assert_eq!(
            create_new(&found, OsStr::new("dangling"), 0o600)
                .map(drop)
                .map_err(|e| e.kind()),
            Err(io::ErrorKind::AlreadyExists)
        );
        assert!(!d.join("target").exists());
        assert!(!read_only_mount(&found.dir).expect("statvfs"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_refusal_stops_the_walk_and_a_file_on_the_way_is_not_a_directory() {
        let d = scratch("refuse");
        std::fs::write(d.join("file"), b"").expect("write");
        let r = walk(
            &d.join("file/x"),
            FOLLOW,
            &mut |_: &Path, _: &Meta, _: BorrowedFd<'_>| Ok::<(), ()>(()),
        );
        assert!(matches!(
            r,
            Err(WalkError::NotADirectory {
                kind: Kind::Regular,
                ..
            })
        ));
        let r = walk(
            &d.join("file"),
            FOLLOW,
            &mut |p: &Path, _: &Meta, _: BorrowedFd<'_>| {
                if p == d { Err("no") } else { Ok(()) }
            },
        );
        assert!(matches!(r, Err(WalkError::Refused("no"))));
        symlink("loop", d.join("loop")).expect("symlink");
        let r = walk(
            &d.join("loop"),
            FOLLOW,
            &mut |_: &Path, _: &Meta, _: BorrowedFd<'_>| Ok::<(), ()>(()),
        );
        assert!(matches!(r, Err(WalkError::TooManySymlinks { .. })));
        let _ = std::fs::remove_dir_all(&d);
    }
}
