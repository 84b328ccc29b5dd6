//! Walking an fd directory (/proc/PID/fd or /proc/PID/task/TID/fd): the compact
//! [`FdTable`] attribution reads for every process, and the exact [`FdFiles`] of one
//! process (what each fd refers to), read to check what became of a few fds.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use super::parse::parse_socket_link;

/// What /proc/PID/fd/N links to for an epoll instance.
const EVENTPOLL_LINK: &[u8] = b"anon_inode:[eventpoll]";

/// What one fd of a process refers to, as its /proc link names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdFile {
    /// A socket, by inode.
    Socket(u64),
    /// Anything else, by the link's text (`pipe:[123]`, `/dev/null`,
    /// `anon_inode:[eventpoll]`).
    Other(String),
}

/// Every open fd of a process and what it refers to, read in one walk.
pub type FdFiles = BTreeMap<i32, FdFile>;

/// The fds of one process: how many are open, which are sockets (fd, inode), and which
/// are epoll instances (for `explain`; found on the same walk, at no extra syscall).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdTable {
    pub open: usize,
    pub sockets: Vec<(i32, u64)>,
    pub epoll: Vec<i32>,
}

/// Every open fd of an fd directory and what it refers to. Slower than [`read_fd_dir`] (a
/// link text is kept per fd that is not a socket): for checking a few fds exactly, not for
/// attribution.
pub(super) fn read_fd_files(path: &Path) -> io::Result<FdFiles> {
    let mut files = FdFiles::new();
    // PATH_MAX: a link is never longer.
    let mut buf = vec![0u8; 4096];
    walk_fd_dir(path, &mut buf, |fd, link| {
        let Some(link) = link else {
            return; // closed meanwhile
        };
        let text = String::from_utf8_lossy(link);
        let file = match parse_socket_link(&text) {
            Some(inode) => FdFile::Socket(inode),
            None => FdFile::Other(text.into_owned()),
        };
        files.insert(fd, file);
    })?;
    Ok(files)
}

/// Walk an fd directory: count the fds and collect those that are sockets. One directory
/// fd, getdents, and a readlinkat relative to it per entry into a stack buffer: no path is
/// resolved twice and nothing is allocated per fd.
pub(super) fn read_fd_dir(path: &Path) -> io::Result<FdTable> {
    let mut table = FdTable::default();
    // "socket:[18446744073709551615]" is 29 bytes; anything longer is not a socket.
    let mut buf = [0u8; 64];
    walk_fd_dir(path, &mut buf, |fd, link| {
        // Counted even when closed since getdents, as it was open a moment ago.
        table.open += 1;
        let Some(link) = link else {
            return;
        };
        if let Some(inode) = std::str::from_utf8(link).ok().and_then(parse_socket_link) {
            table.sockets.push((fd, inode));
        } else if link == EVENTPOLL_LINK {
            table.epoll.push(fd);
        }
    })?;
    table.sockets.sort_unstable();
    table.epoll.sort_unstable();
    Ok(table)
}

/// Call `visit(fd, Some(link))` for each open fd of an fd directory, with its link read
/// into `buf` (cut to its length), or `visit(fd, None)` for an fd closed between getdents
/// and readlinkat (ENOENT). Any other error, EACCES or EPERM above all (the directory may
/// be listed with CAP_DAC_READ_SEARCH, but its links only read with ptrace rights), fails
/// the walk: a table read in part would pass for one without sockets.
fn walk_fd_dir(
    path: &Path,
    buf: &mut [u8],
    mut visit: impl FnMut(i32, Option<&[u8]>),
) -> io::Result<()> {
    use rustix::fs::{Dir, Mode, OFlags, openat, readlinkat_raw};
    let dirfd = openat(
        rustix::fs::CWD,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut dir = Dir::new(dirfd)?;
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name();
        let Some(fd) = std::str::from_utf8(name.to_bytes())
            .ok()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue; // "." and ".."
        };
        let dfd = dir.fd()?;
        match readlinkat_raw(dfd, name, &mut *buf) {
            Ok(n) => visit(fd, Some(buf.get(..n).unwrap_or_default())),
            Err(rustix::io::Errno::NOENT) => visit(fd, None),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
