//! The one reader of /proc: processes, their comm, uid, exe, cmdline and cgroup, their
//! socket fds and fd limits, and for the injector their threads (task stat and status),
//! memory maps, seccomp mode and the fdinfo of pidfds; for `explain`, which files a
//! process's epoll instances watch.
//!
//! [`ProcFs`] takes the root it reads from, so parsing is tested on plain directories. A
//! process that vanishes or cannot be read yields an error for that process only; callers
//! skip and count it. The `parse_*` functions take text, not files.
//!
//! A process whose thread-group leader has exited (`pthread_exit` in main) lives on in its
//! other threads, but the leader's entries go blank: /proc/PID/fd is empty, ns/net, exe
//! and cmdline cannot be read. Its fds are then read through a live thread,
//! /proc/PID/task/TID/fd (see [`ProcFs::fd_thread`]); [`ProcFs::exe`], [`ProcFs::cmdline`],
//! [`ProcFs::netns_path`] and [`ProcFs::fd_socket_inode`] fall back to it by themselves.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What /proc/PID/fd/N links to for an epoll instance.
const EVENTPOLL_LINK: &[u8] = b"anon_inode:[eventpoll]";

#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

/// The fds of one process: how many are open, which are sockets (fd, inode), and which
/// are epoll instances (for `explain`; found on the same walk, at no extra syscall).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdTable {
    pub open: usize,
    pub sockets: Vec<(i32, u64)>,
    pub epoll: Vec<i32>,
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

    fn task_path(&self, pid: i32, tid: i32, leaf: &str) -> PathBuf {
        self.pid_path(pid, &format!("task/{tid}/{leaf}"))
    }

    /// Walk /proc/<pid>/fd: count the fds and collect those that are sockets (and those
    /// that are epoll instances). Empty when the thread-group leader has exited (see
    /// [`ProcFs::fd_thread`]).
    pub fn fd_table(&self, pid: i32) -> io::Result<FdTable> {
        read_fd_dir(&self.pid_path(pid, "fd"))
    }

    /// Walk /proc/<pid>/task/<tid>/fd: the fds of the process as thread `tid` sees them
    /// (the same table, unless the thread unshared it with `unshare(CLONE_FILES)`).
    pub fn task_fd_table(&self, pid: i32, tid: i32) -> io::Result<FdTable> {
        read_fd_dir(&self.task_path(pid, tid, "fd"))
    }

    /// Whether the thread-group leader of `pid` has exited (zombie, `Z` or `X`) while the
    /// process lives on in other threads.
    pub fn leader_exited(&self, pid: i32) -> bool {
        matches!(self.task_state(pid, pid), Ok(Some('Z' | 'X')))
    }

    /// A live thread (not a zombie) of `pid` other than the leader, lowest tid first.
    pub fn live_thread(&self, pid: i32) -> Option<i32> {
        let mut tids = self.tasks(pid).ok()?;
        tids.sort_unstable();
        tids.into_iter()
            .filter(|&t| t != pid)
            .find(|&t| matches!(self.task_state(pid, t), Ok(Some(s)) if s != 'Z' && s != 'X'))
    }

    /// The thread to read `pid`'s fds through, when its leader cannot show them: the leader
    /// has exited and another thread lives. None for an ordinary process.
    pub fn fd_thread(&self, pid: i32) -> Option<i32> {
        if self.leader_exited(pid) {
            self.live_thread(pid)
        } else {
            None
        }
    }

    /// For a process whose /proc/PID/fd showed nothing: a live thread to read the fds
    /// through when the leader has exited or other threads remain. One read of
    /// /proc/PID/stat settles the common case (a kernel thread, a process without fds).
    pub fn thread_for_empty_table(&self, pid: i32) -> Option<i32> {
        let stat = fs::read_to_string(self.pid_path(pid, "stat")).ok()?;
        let (state, threads) = parse_stat_state_threads(&stat)?;
        if matches!(state, 'Z' | 'X') || threads > 1 {
            self.live_thread(pid)
        } else {
            None
        }
    }

    /// /proc/PID/ns/net, or a live thread's once the leader has exited (the leader's no
    /// longer resolves).
    pub fn netns_path(&self, pid: i32) -> PathBuf {
        let path = self.pid_path(pid, "ns/net");
        if fs::metadata(&path).is_err()
            && let Some(tid) = self.fd_thread(pid)
        {
            return self.task_path(pid, tid, "ns/net");
        }
        path
    }

    /// Number of open fds of thread `tid`'s table, like [`ProcFs::fd_count_fast`].
    pub fn task_fd_count_fast(&self, pid: i32, tid: i32) -> io::Result<usize> {
        let dir = self.task_path(pid, tid, "fd");
        let size = fs::metadata(&dir)?.len();
        if size > 0 {
            return Ok(usize::try_from(size).unwrap_or(usize::MAX));
        }
        count_fds(&dir)
    }
}

/// Walk an fd directory: count the fds and collect those that are sockets. One directory
/// fd, getdents, and a readlinkat relative to it per entry into a stack buffer: no path is
/// resolved twice and nothing is allocated per fd.
fn read_fd_dir(path: &Path) -> io::Result<FdTable> {
    use rustix::fs::{Dir, Mode, OFlags, openat, readlinkat_raw};
    let dirfd = openat(
        rustix::fs::CWD,
        path,
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
        } else if buf.get(..n) == Some(EVENTPOLL_LINK) {
            table.epoll.push(fd);
        }
    }
    table.sockets.sort_unstable();
    table.epoll.sort_unstable();
    Ok(table)
}

/// Number of entries of an fd directory that are fd numbers.
fn count_fds(dir: &Path) -> io::Result<usize> {
    Ok(fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<i32>().is_ok())
        })
        .count())
}

impl ProcFs {
    /// Number of open fds (a readdir of /proc/<pid>/fd without reading the links).
    pub fn fd_count(&self, pid: i32) -> io::Result<usize> {
        count_fds(&self.pid_path(pid, "fd"))
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

    /// `leaf` of the process, or of a live thread once the leader has exited (the
    /// leader's `exe` and `cmdline` go away with its memory map).
    fn leader_or_thread<T>(
        &self,
        pid: i32,
        leaf: &str,
        read: impl Fn(&Path) -> io::Result<T>,
        usable: impl Fn(&T) -> bool,
    ) -> io::Result<T> {
        let first = read(&self.pid_path(pid, leaf));
        if first.as_ref().is_ok_and(&usable) {
            return first;
        }
        match self.fd_thread(pid) {
            Some(tid) => read(&self.task_path(pid, tid, leaf)),
            None => first,
        }
    }

    /// The executable's path (/proc/<pid>/exe), as the kernel shows it.
    pub fn exe(&self, pid: i32) -> io::Result<String> {
        self.leader_or_thread(
            pid,
            "exe",
            |p| Ok(fs::read_link(p)?.to_string_lossy().into_owned()),
            |_| true,
        )
    }

    /// The command line, NUL-separated arguments joined with spaces.
    pub fn cmdline(&self, pid: i32) -> io::Result<String> {
        let raw = self.leader_or_thread(pid, "cmdline", |p| fs::read(p), |r| !r.is_empty())?;
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
        let target =
            self.leader_or_thread(pid, &format!("fd/{fd}"), |p| fs::read_link(p), |_| true)?;
        Ok(target.to_str().and_then(parse_socket_link))
    }

    /// The fd numbers open in the process now.
    pub fn open_fds(&self, pid: i32) -> io::Result<HashSet<i32>> {
        Ok(fs::read_dir(self.pid_path(pid, "fd"))?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect())
    }

    /// The thread ids of the process (/proc/PID/task).
    pub fn tasks(&self, pid: i32) -> io::Result<Vec<i32>> {
        Ok(fs::read_dir(self.pid_path(pid, "task"))?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect())
    }

    /// Whether thread `tid` of `pid` still has its /proc entry.
    pub fn task_exists(&self, pid: i32, tid: i32) -> bool {
        fs::metadata(self.pid_path(pid, &format!("task/{tid}"))).is_ok()
    }

    /// The state letter of a thread (`R`, `S`, `Z`...), from /proc/PID/task/TID/stat.
    pub fn task_state(&self, pid: i32, tid: i32) -> io::Result<Option<char>> {
        let stat = fs::read_to_string(self.pid_path(pid, &format!("task/{tid}/stat")))?;
        Ok(parse_stat_state(&stat))
    }

    /// One field (`Seccomp`, `TracerPid`...) of /proc/PID/task/TID/status, or of
    /// /proc/PID/status when `tid` is None.
    pub fn status_field(
        &self,
        pid: i32,
        tid: Option<i32>,
        key: &str,
    ) -> io::Result<Option<String>> {
        let leaf = match tid {
            Some(tid) => format!("task/{tid}/status"),
            None => "status".to_string(),
        };
        let text = fs::read_to_string(self.pid_path(pid, &leaf))?;
        Ok(parse_status_field(&text, key).map(str::to_owned))
    }

    /// `Seccomp:` of the status file: 0 none, 1 strict, 2 filter; None if unknown.
    pub fn seccomp_mode(&self, pid: i32, tid: Option<i32>) -> Option<u8> {
        self.status_field(pid, tid, "Seccomp")
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
    }

    /// `TracerPid:` of a thread: 0 when nobody traces it; None if unknown.
    pub fn tracer_pid(&self, pid: i32, tid: i32) -> Option<i32> {
        self.status_field(pid, Some(tid), "TracerPid")
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
    }

    /// Raw /proc/PID/maps (see [`parse_maps_line`]).
    pub fn maps(&self, pid: i32) -> io::Result<String> {
        fs::read_to_string(self.pid_path(pid, "maps"))
    }

    /// The pid a pidfd of *this* process refers to, from `Pid:` in its fdinfo (-1 once the
    /// process is gone).
    pub fn pidfd_pid(&self, pidfd: i32) -> io::Result<Option<i32>> {
        let text = fs::read_to_string(self.root.join(format!("self/fdinfo/{pidfd}")))?;
        Ok(parse_fdinfo_pid(&text))
    }

    /// RLIMIT_NOFILE of the process, soft and hard.
    pub fn nofile_limits(&self, pid: i32) -> io::Result<Limits> {
        let text = fs::read_to_string(self.pid_path(pid, "limits"))?;
        parse_nofile(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no 'Max open files' line in /proc/{pid}/limits"),
            )
        })
    }

    /// When the process started, in clock ticks since boot (field 22 of /proc/PID/stat):
    /// with the pid, it names one process for as long as the machine runs.
    pub fn start_time(&self, pid: i32) -> io::Result<u64> {
        let stat = fs::read_to_string(self.pid_path(pid, "stat"))?;
        parse_stat_start_time(&stat).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no start time in /proc/{pid}/stat"),
            )
        })
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

/// The soft and hard limits of one resource; None is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// `socket:[12345]` → 12345.
pub fn parse_socket_link(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Both limits from the `Max open files` line of /proc/<pid>/limits; None when the line is
/// missing or malformed.
pub fn parse_nofile(limits: &str) -> Option<Limits> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut cols = line["Max open files".len()..].split_whitespace();
    let value = |v: &str| match v {
        "unlimited" => Some(None),
        n => n.parse().ok().map(Some),
    };
    let soft = value(cols.next()?)?;
    let hard = value(cols.next()?)?;
    Some(Limits { soft, hard })
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

/// The value of `key:` in a /proc status file, trimmed.
pub fn parse_status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// The pid a pidfd refers to, from `Pid:` in its fdinfo (-1 once the process is gone).
pub fn parse_fdinfo_pid(fdinfo: &str) -> Option<i32> {
    parse_status_field(fdinfo, "Pid").and_then(|v| v.parse().ok())
}

/// The state letter of /proc/PID/task/TID/stat (after the parenthesised comm, which may
/// itself contain parentheses and spaces).
pub fn parse_stat_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// Field 22 (starttime) of a /proc/PID/stat line.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields after the comm start at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The state letter and `num_threads` (field 20) of /proc/PID/stat.
pub fn parse_stat_state_threads(stat: &str) -> Option<(char, usize)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4..=19 come between the state (3) and num_threads (20).
    let threads = fields.nth(16)?.parse().ok()?;
    Some((state, threads))
}

/// One line of /proc/PID/maps: start, end, whether it is readable and executable, and its
/// path (empty for anonymous memory).
pub fn parse_maps_line(line: &str) -> Option<(u64, u64, bool, &str)> {
    let mut cols = line.splitn(6, ' ');
    let (start, end) = cols.next()?.split_once('-')?;
    let perms = cols.next()?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let rx = perms.starts_with('r') && perms.as_bytes().get(2) == Some(&b'x');
    let path = cols.nth(3).map(str::trim).unwrap_or("");
    (end > start).then_some((start, end, rx, path))
}

/// Room for the fdinfo of an epoll fd with several hundred registered fds; the buffer
/// doubles for larger ones and is reused across a process's epoll fds.
const FDINFO_BUF: usize = 64 * 1024;

impl ProcFs {
    /// The inodes of every file registered in the epoll instances `epoll_fds` of `pid`
    /// (from [`FdTable::epoll`]), sorted and deduplicated: a socket among them is still
    /// watched by an event loop. One read of /proc/PID/fdinfo/N per epoll fd into one
    /// buffer, reused and grown by doubling (the kernel renders the whole file at the first
    /// read), parsed in place by [`parse_epoll_fdinfo_into`]. An fd closed meanwhile is
    /// skipped, and so is one that is no longer an epoll (its fdinfo has no `tfd:` lines);
    /// a process that is gone or may not be read is an error.
    pub fn epoll_watched(&self, pid: i32, epoll_fds: &[i32]) -> io::Result<Vec<u64>> {
        use std::io::Read;
        let mut inodes = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        for &fd in epoll_fds {
            buf.clear();
            let mut file = match fs::File::open(self.pid_path(pid, &format!("fdinfo/{fd}"))) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound && self.exists(pid) => continue,
                Err(e) => return Err(e),
            };
            loop {
                if buf.capacity() - buf.len() < FDINFO_BUF / 2 {
                    buf.reserve(buf.len().max(FDINFO_BUF));
                }
                let len = buf.len();
                buf.resize(buf.capacity(), 0);
                let read = file.read(&mut buf[len..]);
                buf.truncate(len + *read.as_ref().unwrap_or(&0));
                match read {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            parse_epoll_fdinfo_into(&buf, &mut inodes);
        }
        inodes.sort_unstable();
        inodes.dedup();
        Ok(inodes)
    }

    /// Whether /proc/<pid> exists (the process has not been reaped).
    fn exists(&self, pid: i32) -> bool {
        fs::metadata(self.pid_path(pid, "")).is_ok()
    }
}

/// The inodes of the files registered in an epoll instance, from its
/// /proc/PID/fdinfo/N: the hexadecimal `ino:` of each `tfd:` line, in file order.
///
/// `tfd:` (the fd number the file was registered under) is not used: once that fd is
/// closed while a dup of it keeps the file open, the entry stays with its stale `tfd`, and
/// the number may be reused by another file. The inode names the file itself.
pub fn parse_epoll_fdinfo(text: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    parse_epoll_fdinfo_into(text, &mut out);
    out
}

/// [`parse_epoll_fdinfo`] appending to `out`, without allocating per line.
pub fn parse_epoll_fdinfo_into(text: &[u8], out: &mut Vec<u64>) {
    for line in text.split(|&b| b == b'\n') {
        if !line.starts_with(b"tfd:") {
            continue;
        }
        let Some(at) = line.windows(5).position(|w| w == b" ino:") else {
            continue;
        };
        let mut ino: u64 = 0;
        let mut digits = 0;
        for &b in &line[at + 5..] {
            let d = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => break,
            };
            let Some(next) = ino
                .checked_mul(16)
                .and_then(|v| v.checked_add(u64::from(d)))
            else {
                digits = 0; // overflow: not an inode we can name
                break;
            };
            ino = next;
            digits += 1;
        }
        if digits > 0 {
            out.push(ino);
        }
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
    fn nofile_both_limits() {
        let text =
            "Max open files            1100                 8192                 files     \n";
        assert_eq!(
            parse_nofile(text),
            Some(Limits {
                soft: Some(1100),
                hard: Some(8192)
            })
        );
        assert_eq!(
            parse_nofile("Max open files  unlimited  unlimited  files\n"),
            Some(Limits {
                soft: None,
                hard: None
            })
        );
        assert_eq!(parse_nofile("Max open files  1024\n"), None);
    }

    #[test]
    fn stat_start_time() {
        let stat =
            "4242 (a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 3 1 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat_start_time(stat), Some(987654));
        assert_eq!(parse_stat_start_time("1 (x) S 1"), None);
    }

    #[test]
    fn status_fields() {
        let status = "Name:\tleaky\nTracerPid:\t0\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        assert_eq!(parse_status_field(status, "Seccomp"), Some("2"));
        assert_eq!(parse_status_field(status, "TracerPid"), Some("0"));
        assert_eq!(parse_status_field(status, "Missing"), None);
    }

    #[test]
    fn fdinfo_pid() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nPid:\t4242\nNSpid:\t4242\n";
        assert_eq!(parse_fdinfo_pid(info), Some(4242));
        assert_eq!(parse_fdinfo_pid("Pid:\t-1\n"), Some(-1));
        assert_eq!(parse_fdinfo_pid("pos:\t0\n"), None);
        assert_eq!(parse_fdinfo_pid("Pid:\tx\n"), None);
    }

    #[test]
    fn stat_state_survives_odd_comm() {
        assert_eq!(parse_stat_state("42 (a) b) Z 1 2 3"), Some('Z'));
        assert_eq!(parse_stat_state("42 (node) S 1"), Some('S'));
        assert_eq!(parse_stat_state("42 (x"), None);
        assert_eq!(parse_stat_state(""), None);
    }

    #[test]
    fn stat_state_and_threads() {
        let stat = "42 (a b) c) Z 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 123 0 0";
        assert_eq!(parse_stat_state_threads(stat), Some(('Z', 3)));
        assert_eq!(parse_stat_state_threads("42 (x) S 1 2"), None);
        assert_eq!(parse_stat_state_threads(""), None);
        let own = std::fs::read_to_string("/proc/self/stat").expect("own stat");
        let (state, threads) = parse_stat_state_threads(&own).expect("parses");
        assert!(state == 'R' || state == 'S', "{state}");
        assert!(threads >= 1);
    }

    #[test]
    fn maps_lines() {
        let vdso =
            "7ffd1e5f2000-7ffd1e5f4000 r-xp 00000000 00:00 0                          [vdso]";
        assert_eq!(
            parse_maps_line(vdso),
            Some((0x7ffd1e5f2000, 0x7ffd1e5f4000, true, "[vdso]"))
        );
        let libc = "7f0000028000-7f00001bd000 r-xp 00028000 08:01 1234 /usr/lib/x86_64-linux-gnu/libc.so.6";
        assert_eq!(
            parse_maps_line(libc).map(|m| (m.2, m.3)),
            Some((true, "/usr/lib/x86_64-linux-gnu/libc.so.6"))
        );
        let anon = "7f0000000000-7f0000001000 rw-p 00000000 00:00 0";
        assert_eq!(parse_maps_line(anon).map(|m| (m.2, m.3)), Some((false, "")));
        assert_eq!(parse_maps_line("garbage"), None);
        assert_eq!(parse_maps_line("2000-1000 r-xp 0 0:0 0"), None);
        assert_eq!(parse_maps_line(""), None);
    }

    #[test]
    fn a_dead_leader_is_read_through_a_live_thread() {
        let dir = std::env::temp_dir().join(format!("cwreap-procfs-dead-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let stat = |tid: i32, state: char| format!("{tid} (srv) {state} 1 2 3\n");
        // The leader: a zombie, its fd table empty, its cmdline empty, no exe.
        fs::create_dir_all(dir.join("42/fd")).expect("mkdir");
        fs::create_dir_all(dir.join("42/task/42")).expect("mkdir");
        fs::write(dir.join("42/task/42/stat"), stat(42, 'Z')).expect("write");
        fs::write(dir.join("42/cmdline"), "").expect("write");
        // A live thread with everything.
        let t = dir.join("42/task/43");
        fs::create_dir_all(t.join("fd")).expect("mkdir");
        fs::create_dir_all(t.join("ns")).expect("mkdir");
        fs::write(t.join("stat"), stat(43, 'S')).expect("write");
        fs::write(t.join("cmdline"), "srv\0--port\08080\0").expect("write");
        fs::write(t.join("ns/net"), "").expect("write");
        std::os::unix::fs::symlink("/usr/bin/srv", t.join("exe")).expect("symlink");
        std::os::unix::fs::symlink("socket:[777]", t.join("fd/5")).expect("symlink");
        let proc = ProcFs::new(&dir);
        assert!(proc.leader_exited(42));
        assert_eq!(proc.live_thread(42), Some(43));
        assert_eq!(proc.fd_thread(42), Some(43));
        assert_eq!(proc.fd_table(42).expect("leader table").open, 0);
        assert_eq!(
            proc.task_fd_table(42, 43).expect("thread table").sockets,
            [(5, 777)]
        );
        assert_eq!(proc.cmdline(42).expect("cmdline"), "srv --port 8080");
        assert_eq!(proc.exe(42).expect("exe"), "/usr/bin/srv");
        assert_eq!(proc.fd_socket_inode(42, 5).expect("fd 5"), Some(777));
        assert!(proc.fd_socket_inode(42, 6).is_err(), "no such fd anywhere");
        assert_eq!(proc.netns_path(42), t.join("ns/net"));
        // Once the last live thread is a zombie too, nothing is read through it.
        fs::write(t.join("stat"), stat(43, 'Z')).expect("write");
        assert_eq!(proc.fd_thread(42), None);
        assert!(proc.exe(42).is_err());
        let _ = fs::remove_dir_all(&dir);
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
        std::os::unix::fs::symlink("anon_inode:[eventpoll]", fd_dir.join("4")).expect("symlink");
        let proc = ProcFs::new(&dir);
        assert_eq!(proc.pids().expect("pids"), vec![42]);
        assert_eq!(proc.comm(42).expect("comm"), "leaky");
        let table = proc.fd_table(42).expect("fd table");
        assert_eq!(table.open, 4);
        assert_eq!(table.sockets, vec![(3, 777), (5, 778)]);
        assert_eq!(table.epoll, vec![4]);
        assert!(proc.fd_table(43).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    /// /proc/PID/fdinfo/N of an epoll fd, as Linux 6.18 writes it (fs/eventpoll.c,
    /// ep_show_fdinfo), after `dup(6) == 7; close(6)` on a registered socket.
    const EPOLL_FDINFO: &[u8] = b"\
pos:\t0\n\
flags:\t02000002\n\
mnt_id:\t17\n\
ino:\t1038\n\
tfd:        6 events: 80000019 data:                6  pos:0 ino:135d58 sdev:9\n\
tfd:        4 events:       19 data:                4  pos:0 ino:135d56 sdev:9\n\
tfd:       12 events:       19 data:  7f00deadbeef    pos:0 ino:ffffffffffffffff sdev:8\n\
tfd:       13 events:       19 data:               d  pos:0 ino:1ffffffffffffffff sdev:8\n\
tfd:       14 events:       19 data:               e  pos:0 sdev:8\n\
lock:\t1: POSIX  ADVISORY  WRITE 4242 00:17:1038 0 EOF\n";
    // pos, flags, mnt_id: of the epoll file itself; `ino:\t1038` (decimal) is the epoll's
    //   own anonymous inode, not a registered file: only `tfd:` lines count.
    // tfd 6: registered as fd 6, which was closed after a dup: the entry stays (stale tfd);
    //   events EPOLLIN|EPOLLERR|EPOLLHUP|EPOLLET, data 6, file position 0, inode 0x135d58
    //   (1269080) on device 9 (sockfs).
    // tfd 4: a listener, level-triggered, inode 0x135d56 (1269078).
    // tfd 12: the largest inode; tfd 13: one hex digit too many (overflow, skipped);
    // tfd 14: no ino field (skipped); the `lock:` line belongs to no registration.

    #[test]
    fn epoll_fdinfo_inodes() {
        assert_eq!(
            parse_epoll_fdinfo(EPOLL_FDINFO),
            vec![0x135d58, 0x135d56, u64::MAX]
        );
        assert_eq!(parse_epoll_fdinfo(b""), Vec::<u64>::new());
        // A pidfd's fdinfo has no tfd lines.
        assert!(parse_epoll_fdinfo(b"pos:\t0\nino:\t1057\nPid:\t4242\n").is_empty());
        // No trailing newline, upper-case hex.
        assert_eq!(
            parse_epoll_fdinfo(b"tfd:        5 events: 19 data: 5  pos:0 ino:AB"),
            vec![0xab]
        );
        let mut more = vec![1];
        parse_epoll_fdinfo_into(EPOLL_FDINFO, &mut more);
        assert_eq!(more.len(), 4);
    }

    #[test]
    fn epoll_of_this_process_found_by_inode_not_tfd() {
        use rustix::event::epoll;
        use std::os::fd::AsRawFd;
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll_create");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let registered = server.try_clone().expect("dup");
        let inode = |f: &dyn std::os::fd::AsFd| rustix::fs::fstat(f.as_fd()).expect("fstat").st_ino;
        let (server_ino, client_ino) = (inode(&server), inode(&client));
        epoll::add(
            &ep,
            &registered,
            epoll::EventData::new_u64(1),
            epoll::EventFlags::IN,
        )
        .expect("epoll add");
        // Close the fd it was registered under; `server`, a dup, keeps the file (and the
        // registration) alive under another number.
        drop(registered);
        let proc = ProcFs::default();
        let me = std::process::id() as i32;
        let table = proc.fd_table(me).expect("fd table");
        assert!(table.epoll.contains(&ep.as_raw_fd()), "{table:?}");
        let watched = proc.epoll_watched(me, &table.epoll).expect("epoll watched");
        assert!(
            watched.contains(&server_ino),
            "{watched:?} lacks {server_ino}"
        );
        assert!(
            !watched.contains(&client_ino),
            "{watched:?} has {client_ino}"
        );
        // An fd that is no epoll (a socket) has no tfd lines; one that is closed is skipped.
        let socket_fd = server.as_raw_fd();
        assert_eq!(
            proc.epoll_watched(me, &[socket_fd, 1_000_000])
                .expect("no epoll"),
            Vec::<u64>::new()
        );
        assert!(
            proc.epoll_watched(i32::MAX, &[3]).is_err(),
            "a missing process is an error"
        );
    }
}
