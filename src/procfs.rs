//! Reading /proc: processes, their comm and uid, their socket fds, and their fd limits.
//!
//! [`ProcFs`] takes the root it reads from, so parsing is tested on plain directories. A
//! process that vanishes or cannot be read yields an error for that process only; callers
//! skip and count it.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

/// The fds of one process: how many are open, and which are sockets (fd, inode).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdTable {
    pub open: usize,
    pub sockets: Vec<(i32, u64)>,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn pid_path(&self, pid: i32, leaf: &str) -> PathBuf {
        let mut p = self.root.join(pid.to_string());
        if !leaf.is_empty() {
            p.push(leaf);
        }
        p
    }

    /// Every numeric entry of the root: the pids of all processes (thread-group leaders).
    pub fn pids(&self) -> io::Result<Vec<i32>> {
        let mut pids = Vec::new();
        for entry in fs::read_dir(&self.root)? {
            let Ok(entry) = entry else { continue };
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
                && pid > 0
            {
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        Ok(pids)
    }

    /// The process name (/proc/<pid>/comm), without its newline.
    pub fn comm(&self, pid: i32) -> io::Result<String> {
        let raw = fs::read(self.pid_path(pid, "comm"))?;
        Ok(String::from_utf8_lossy(&raw)
            .trim_end_matches('\n')
            .to_string())
    }

    /// The effective uid of the process, read as the owner of /proc/<pid>.
    pub fn uid(&self, pid: i32) -> io::Result<u32> {
        Ok(fs::metadata(self.pid_path(pid, ""))?.uid())
    }

    /// Walk /proc/<pid>/fd: count the fds and collect those that are sockets. One
    /// directory fd, getdents, and a readlinkat relative to it per entry into a stack
    /// buffer: no path is resolved twice and nothing is allocated per fd.
    pub fn fd_table(&self, pid: i32) -> io::Result<FdTable> {
        use rustix::fs::{Dir, Mode, OFlags, openat, readlinkat_raw};
        let dirfd = openat(
            rustix::fs::CWD,
            self.pid_path(pid, "fd").as_path(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut dir = Dir::new(dirfd)?;
        let mut table = FdTable::default();
        // "socket:[18446744073709551615]" is 29 bytes; anything longer is not a socket.
        let mut buf = [0u8; 64];
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = entry.file_name();
            let Some(fd) = std::str::from_utf8(name.to_bytes())
                .ok()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue; // "." and ".."
            };
            table.open += 1;
            let Ok(dfd) = dir.fd() else { continue };
            // The fd may be closed between getdents and readlinkat: skip it.
            let Ok(n) = readlinkat_raw(dfd, name, &mut buf[..]) else {
                continue;
            };
            if let Some(inode) = buf
                .get(..n)
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(parse_socket_link)
            {
                table.sockets.push((fd, inode));
            }
        }
        table.sockets.sort_unstable();
        Ok(table)
    }

    /// Number of open fds (a readdir of /proc/<pid>/fd without reading the links).
    pub fn fd_count(&self, pid: i32) -> io::Result<usize> {
        Ok(fs::read_dir(self.pid_path(pid, "fd"))?
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.parse::<i32>().is_ok())
            })
            .count())
    }

    /// Number of open fds, cheaply: on Linux ≥ 6.2 the size of /proc/<pid>/fd is the fd
    /// count (one stat); older kernels report 0, and then the directory is read.
    pub fn fd_count_fast(&self, pid: i32) -> io::Result<usize> {
        let size = fs::metadata(self.pid_path(pid, "fd"))?.len();
        if size > 0 {
            return Ok(usize::try_from(size).unwrap_or(usize::MAX));
        }
        self.fd_count(pid)
    }

    /// The executable's path (/proc/<pid>/exe), as the kernel shows it.
    pub fn exe(&self, pid: i32) -> io::Result<String> {
        Ok(fs::read_link(self.pid_path(pid, "exe"))?
            .to_string_lossy()
            .into_owned())
    }

    /// The command line, NUL-separated arguments joined with spaces.
    pub fn cmdline(&self, pid: i32) -> io::Result<String> {
        let raw = fs::read(self.pid_path(pid, "cmdline"))?;
        Ok(String::from_utf8_lossy(&raw)
            .split('\0')
            .filter(|a| !a.is_empty())
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// Raw /proc/<pid>/cgroup.
    pub fn cgroup(&self, pid: i32) -> io::Result<String> {
        fs::read_to_string(self.pid_path(pid, "cgroup"))
    }

    /// Which file fd `fd` of `pid` refers to now: `Some(inode)` for a socket, `None` for
    /// anything else; an error when the fd is closed or the process gone.
    pub fn fd_socket_inode(&self, pid: i32, fd: i32) -> io::Result<Option<u64>> {
        let target = fs::read_link(self.pid_path(pid, &format!("fd/{fd}")))?;
        Ok(target.to_str().and_then(parse_socket_link))
    }

    /// Soft RLIMIT_NOFILE of the process; `None` when unlimited.
    pub fn nofile_soft_limit(&self, pid: i32) -> io::Result<Option<u64>> {
        let text = fs::read_to_string(self.pid_path(pid, "limits"))?;
        parse_nofile_soft(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no 'Max open files' line in /proc/{pid}/limits"),
            )
        })
    }
}

/// `socket:[12345]` → 12345.
pub fn parse_socket_link(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The soft limit from the `Max open files` line of /proc/<pid>/limits:
/// `Some(None)` for unlimited, `None` when the line is missing or malformed.
pub fn parse_nofile_soft(limits: &str) -> Option<Option<u64>> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        Some(None)
    } else {
        soft.parse().ok().map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links() {
        assert_eq!(parse_socket_link("socket:[4026532]"), Some(4026532));
        assert_eq!(parse_socket_link("socket:[]"), None);
        assert_eq!(parse_socket_link("pipe:[123]"), None);
        assert_eq!(parse_socket_link("/dev/null"), None);
        assert_eq!(parse_socket_link("socket:[12"), None);
    }

    #[test]
    fn limits_file() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max open files            1024                 20000                files     \n";
        assert_eq!(parse_nofile_soft(text), Some(Some(1024)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_nofile_soft(unlimited), Some(None));
        assert_eq!(parse_nofile_soft("Max cpu time 1 1 seconds\n"), None);
        assert_eq!(parse_nofile_soft("Max open files  lots  x files\n"), None);
    }

    #[test]
    fn reads_a_fake_proc_tree() {
        let dir = std::env::temp_dir().join(format!("cwreap-procfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let fd_dir = dir.join("42").join("fd");
        fs::create_dir_all(&fd_dir).expect("mkdir");
        fs::create_dir_all(dir.join("self")).expect("mkdir");
        fs::write(dir.join("42").join("comm"), "leaky\n").expect("write");
        std::os::unix::fs::symlink("socket:[777]", fd_dir.join("3")).expect("symlink");
        std::os::unix::fs::symlink("/dev/null", fd_dir.join("0")).expect("symlink");
        std::os::unix::fs::symlink("socket:[778]", fd_dir.join("5")).expect("symlink");
        let proc = ProcFs::new(&dir);
        assert_eq!(proc.pids().expect("pids"), vec![42]);
        assert_eq!(proc.comm(42).expect("comm"), "leaky");
        let table = proc.fd_table(42).expect("fd table");
        assert_eq!(table.open, 3);
        assert_eq!(table.sockets, vec![(3, 777), (5, 778)]);
        assert!(proc.fd_table(43).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
