//! The one reader of /proc: processes, their comm, uid, exe, cmdline and cgroup, their
//! socket fds and fd limits, and for the injector their threads (task stat and status),
//! memory maps, seccomp mode and the fdinfo of pidfds; for `explain`, which files a
//! process's epoll instances watch, and what names its runtime (runtime.rs: its
//! executable's ELF sections, its mapped files, a JVM's perf data).
//!
//! [`ProcFs`] takes the root it reads from, so parsing is tested on plain directories. A
//! process that vanishes or cannot be read yields an error for that process only; callers
//! skip and count it. Every file is read whole first and then parsed from its bytes, so an
//! I/O error keeps its kind (a vanished process is `NotFound` or `ESRCH`) and text that is
//! not what the kernel writes is `InvalidData`, never a panic.
//!
//! stat, status and limits are parsed by `procfs-core`. The fd walk (in `fd_dir`), the fd
//! counts and the fdinfo of epoll instances stay hand-written: they run per fd on the
//! attribution path, and are measured. The state letter of a thread is read by hand too (see `stat_after_comm`).
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

mod elf;
mod fd_dir;
pub mod hsperf;
mod parse;
mod runtime;
pub mod slow;

pub use fd_dir::{FdFile, FdFiles, FdTable};
use fd_dir::{read_fd_dir, read_fd_files};
pub use hsperf::{Collector, JvmGc};
pub use parse::{
    Limits, parse_epoll_fdinfo, parse_epoll_fdinfo_into, parse_fdinfo_pid, parse_maps_line,
    parse_nofile, parse_socket_link,
};
use parse::{field, in_file, parse_stat, parse_status, stat_after_comm};
use procfs_core::process::Status;
pub use runtime::{RuntimeClues, mapped_files};
pub use slow::SlowReads;

/// Room for the fdinfo of an epoll fd with several hundred registered fds; the buffer
/// doubles for larger ones and is reused across a process's epoll fds.
const FDINFO_BUF: usize = 64 * 1024;

/// Most threads [`ProcFs::fd_tables`] reads on.
const TABLE_READERS: usize = 4;

#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
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

    /// [`ProcFs::fd_table`] of each of `pids`, in the same order, read on as many threads
    /// as there are CPUs (at most [`TABLE_READERS`]), this one included. Reading a table
    /// is a readlink per fd, all of it kernel time, and tables are independent of each
    /// other: a walk that must read every process's table waits for them far less this
    /// way. A table no thread read (one could not be started) is read here.
    pub fn fd_tables(&self, pids: &[i32]) -> Vec<io::Result<FdTable>> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .min(TABLE_READERS)
            .min(pids.len());
        let mut out: Vec<Option<io::Result<FdTable>>> = pids.iter().map(|_| None).collect();
        if threads > 1 {
            let next = AtomicUsize::new(0);
            let read = || {
                let mut got = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&pid) = pids.get(i) else {
                        return got;
                    };
                    got.push((i, self.fd_table(pid)));
                }
            };
            let parts = std::thread::scope(|s| {
                let helpers: Vec<_> = (1..threads)
                    .filter_map(|_| std::thread::Builder::new().spawn_scoped(s, read).ok())
                    .collect();
                let mut parts = vec![read()];
                parts.extend(helpers.into_iter().filter_map(|h| h.join().ok()));
                parts
            });
            for (i, table) in parts.into_iter().flatten() {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(table);
                }
            }
        }
        out.into_iter()
            .zip(pids)
            .map(|(table, &pid)| table.unwrap_or_else(|| self.fd_table(pid)))
            .collect()
    }

    /// Walk /proc/<pid>/task/<tid>/fd: the fds of the process as thread `tid` sees them
    /// (the same table, unless the thread unshared it with `unshare(CLONE_FILES)`).
    pub fn task_fd_table(&self, pid: i32, tid: i32) -> io::Result<FdTable> {
        read_fd_dir(&self.task_path(pid, tid, "fd"))
    }

    /// Every open fd of `pid` and what it refers to, read through thread `via` when given
    /// (the leader has exited): for checking a few fds exactly, not for attribution.
    pub fn fd_files(&self, pid: i32, via: Option<i32>) -> io::Result<FdFiles> {
        read_fd_files(&match via {
            Some(tid) => self.task_path(pid, tid, "fd"),
            None => self.pid_path(pid, "fd"),
        })
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
        let stat = fs::read(self.pid_path(pid, "stat")).ok()?;
        let (state, mut fields) = stat_after_comm(&stat)?;
        // The fields after the state start at field 4; num_threads is field 20.
        let threads: usize = std::str::from_utf8(fields.nth(16)?).ok()?.parse().ok()?;
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
        Ok(join_args(&self.cmdline_raw(pid)?))
    }

    fn cmdline_raw(&self, pid: i32) -> io::Result<Vec<u8>> {
        self.leader_or_thread(pid, "cmdline", |p| fs::read(p), |r| !r.is_empty())
    }

    /// [`Self::cmdline`], read on a thread of its own and waited for at most
    /// [`slow::SLOW_READ_DEADLINE`]: the target's own memory answers it, and may never.
    /// `TimedOut` when it did not return in time, or an earlier read of `pid` is stuck.
    pub fn cmdline_within(&self, slow: &SlowReads, pid: i32) -> io::Result<String> {
        let me = self.clone();
        let raw = slow.read(pid, slow::SLOW_READ_DEADLINE, move || me.cmdline_raw(pid))?;
        Ok(join_args(&raw))
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

    /// The protocol of socket fd `fd` of `pid` (`TCP`, `TCPv6`, `UNIX-STREAM`, `UDP`,
    /// `NETLINK`...), as sockfs names it in the `system.sockprotoname` attribute of the
    /// socket's inode, reached through /proc/PID/fd/N: no duplication, so nothing of the
    /// socket changes. Read through a live thread once the leader has exited.
    pub fn socket_protocol(&self, pid: i32, fd: i32) -> io::Result<String> {
        self.leader_or_thread(
            pid,
            &format!("fd/{fd}"),
            |p| {
                let mut buf = [0u8; 64];
                let got = rustix::fs::getxattr(p, "system.sockprotoname", &mut buf[..])?;
                let name = &buf[..got.min(buf.len())];
                let name = name.split(|b| *b == 0).next().unwrap_or_default();
                Ok(String::from_utf8_lossy(name).into_owned())
            },
            |_| true,
        )
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
        let stat = fs::read(self.task_path(pid, tid, "stat"))?;
        Ok(stat_after_comm(&stat).map(|(state, _)| state))
    }

    /// The time thread `tid` of `pid` has spent on a CPU, in ns: the first field of
    /// /proc/PID/task/TID/schedstat. The kernel adds to it when the thread leaves a CPU and
    /// at each tick while it runs, so it grows only once the thread has run.
    pub fn task_cpu_ns(&self, pid: i32, tid: i32) -> io::Result<u64> {
        let text = fs::read(self.task_path(pid, tid, "schedstat"))?;
        std::str::from_utf8(&text)
            .ok()
            .and_then(|t| t.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| parse::malformed("schedstat: no run time"))
    }

    /// /proc/PID/task/TID/status, or /proc/PID/status when `tid` is None.
    fn status_path(&self, pid: i32, tid: Option<i32>) -> PathBuf {
        match tid {
            Some(tid) => self.task_path(pid, tid, "status"),
            None => self.pid_path(pid, "status"),
        }
    }

    /// The status file of a process or thread, parsed.
    fn status(&self, pid: i32, tid: Option<i32>) -> io::Result<Status> {
        let path = self.status_path(pid, tid);
        parse_status(&fs::read(&path)?).map_err(|e| in_file(&path, e))
    }

    /// One field (`Seccomp`, `TracerPid`...) of /proc/PID/task/TID/status, or of
    /// /proc/PID/status when `tid` is None.
    pub fn status_field(
        &self,
        pid: i32,
        tid: Option<i32>,
        key: &str,
    ) -> io::Result<Option<String>> {
        let text = fs::read(self.status_path(pid, tid))?;
        Ok(field(&String::from_utf8_lossy(&text), key).map(str::to_owned))
    }

    /// `Seccomp:` of the status file: 0 none, 1 strict, 2 filter; None if unknown.
    pub fn seccomp_mode(&self, pid: i32, tid: Option<i32>) -> Option<u8> {
        let mode = self.status(pid, tid).ok()?.seccomp?;
        u8::try_from(mode).ok()
    }

    /// `TracerPid:` of a thread: 0 when nobody traces it; None if unknown.
    pub fn tracer_pid(&self, pid: i32, tid: i32) -> Option<i32> {
        self.status(pid, Some(tid)).ok().map(|s| s.tracerpid)
    }

    /// Raw /proc/PID/maps (see [`parse_maps_line`]).
    pub fn maps(&self, pid: i32) -> io::Result<String> {
        fs::read_to_string(self.pid_path(pid, "maps"))
    }

    /// [`Self::maps`] with a deadline, as [`Self::cmdline_within`]: reading maps takes the
    /// target's mmap lock, which a stuck fault in it holds.
    pub fn maps_within(&self, slow: &SlowReads, pid: i32) -> io::Result<String> {
        let path = self.pid_path(pid, "maps");
        let raw = slow.read(pid, slow::SLOW_READ_DEADLINE, move || fs::read(path))?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    /// The pid a pidfd of *this* process refers to, from `Pid:` in its fdinfo (-1 once the
    /// process is gone).
    pub fn pidfd_pid(&self, pidfd: i32) -> io::Result<Option<i32>> {
        let text = fs::read_to_string(self.root.join(format!("self/fdinfo/{pidfd}")))?;
        Ok(parse_fdinfo_pid(&text))
    }

    /// RLIMIT_NOFILE of the process, soft and hard.
    pub fn nofile_limits(&self, pid: i32) -> io::Result<Limits> {
        let path = self.pid_path(pid, "limits");
        let text = fs::read(&path)?;
        parse_nofile(&String::from_utf8_lossy(&text)).map_err(|e| in_file(&path, e))
    }

    /// When the process started, in clock ticks since boot (field 22 of /proc/PID/stat):
    /// with the pid, it names one process for as long as the machine runs.
    pub fn start_time(&self, pid: i32) -> io::Result<u64> {
        let path = self.pid_path(pid, "stat");
        let stat = parse_stat(&fs::read(&path)?).map_err(|e| in_file(&path, e))?;
        Ok(stat.starttime)
    }

    /// Soft RLIMIT_NOFILE of the process; `None` when unlimited.
    pub fn nofile_soft_limit(&self, pid: i32) -> io::Result<Option<u64>> {
        Ok(self.nofile_limits(pid)?.soft)
    }
}

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

/// A command line as shown: NUL-separated arguments joined with spaces.
fn join_args(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .split('\0')
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_of_a_socket_fd_is_read_without_duplicating_it() {
        use std::os::fd::AsRawFd;
        let proc = ProcFs::default();
        let me = std::process::id() as i32;
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let (unix, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let name = |fd: i32| proc.socket_protocol(me, fd).expect("a socket has a name");
        assert_eq!(name(tcp.as_raw_fd()), "TCP");
        assert_eq!(name(udp.as_raw_fd()), "UDP");
        assert_eq!(name(unix.as_raw_fd()), "UNIX-STREAM");
        let file = std::fs::File::open("/proc/self/stat").expect("a file");
        assert!(
            proc.socket_protocol(me, file.as_raw_fd()).is_err(),
            "not a socket"
        );
    }

    #[test]
    fn socket_links() {
        assert_eq!(parse_socket_link("socket:[4026532]"), Some(4026532));
        assert_eq!(parse_socket_link("socket:[]"), None);
        assert_eq!(parse_socket_link("pipe:[123]"), None);
        assert_eq!(parse_socket_link("/dev/null"), None);
        assert_eq!(parse_socket_link("socket:[12"), None);
    }

    /// /proc/PID/limits as Linux 6.18 writes it (fs/proc/base.c, proc_pid_limits): a
    /// header, then one line per resource: its name, the soft and hard limit (a number or
    /// `unlimited`) and the units, which the two priority lines lack.
    const LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max file size             unlimited            unlimited            bytes     \n\
Max data size             unlimited            unlimited            bytes     \n\
Max stack size            8388608              unlimited            bytes     \n\
Max core file size        0                    unlimited            bytes     \n\
Max resident set          unlimited            unlimited            bytes     \n\
Max processes             96368                96368                processes \n\
Max open files            1024                 20000                files     \n\
Max locked memory         8388608              8388608              bytes     \n\
Max address space         unlimited            unlimited            bytes     \n\
Max file locks            unlimited            unlimited            locks     \n\
Max pending signals       96368                96368                signals   \n\
Max msgqueue size         819200               819200               bytes     \n\
Max nice priority         0                    0                    \n\
Max realtime priority     0                    0                    \n\
Max realtime timeout      unlimited            unlimited            us        \n";
    // Max open files: soft 1024 (select()'s limit), hard 20000 (this machine's cap).

    /// /proc/PID/stat of a process whose comm is `a b) c` (the kernel does not escape
    /// it), 52 fields as Linux 6.18 writes them (fs/proc/array.c, do_task_stat).
    const STAT: &str = "4242 (a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 3 1 0 0 20 0 3 0 \
987654 3133440 387 18446744073709551615 94558709473280 94558709493161 140722361884400 0 0 0 0 \
0 0 0 0 0 17 1 0 0 0 0 0 94558709509168 94558709510784 94559654825984 140722361891358 \
140722361891378 140722361891378 140722361892843 0\n";
    // pid 4242; comm `a b) c`: only the last `)` ends it; state S; ppid 1; pgrp and session
    // 4242; no tty (0, tpgid -1); flags; minflt 100 ...; utime 3, stime 1; priority 20,
    // nice 0; num_threads 3 (field 20); itrealvalue 0; starttime 987654 (field 22); then
    // vsize, rss, rsslim and the addresses, signals, exit_signal 17, processor 1 ...
    // exit_code 0 (field 52).

    /// /proc/2/status (kthreadd) on Linux 6.18: a kernel thread has no Vm* or Rss* lines,
    /// an empty `Groups:` and a `Kthread:` line.
    const KTHREAD_STATUS: &str = "Name:\tkthreadd\nUmask:\t0022\nState:\tS (sleeping)\n\
Tgid:\t2\nNgid:\t0\nPid:\t2\nPPid:\t0\nTracerPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n\
FDSize:\t64\nGroups:\t \nNStgid:\t2\nNSpid:\t2\nNSpgid:\t0\nNSsid:\t0\nKthread:\t1\n\
Threads:\t1\nSigQ:\t1/96368\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n\
SigBlk:\t0000000000000000\nSigIgn:\tffffffffffffffff\nSigCgt:\t0000000000000000\n\
CapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n\
CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\nSeccomp:\t0\n\
Seccomp_filters:\t0\nSpeculation_Store_Bypass:\tvulnerable\n\
SpeculationIndirectBranch:\talways enabled\nCpus_allowed:\t3\nCpus_allowed_list:\t0-1\n\
Mems_allowed:\t00000000,00000001\nMems_allowed_list:\t0\nvoluntary_ctxt_switches:\t77\n\
nonvoluntary_ctxt_switches:\t0\n";

    #[test]
    fn nofile_limits_numbers_and_unlimited() {
        assert_eq!(
            parse_nofile(LIMITS).expect("limits"),
            Limits {
                soft: Some(1024),
                hard: Some(20000)
            }
        );
        let unlimited = LIMITS.replace(
            "Max open files            1024                 20000",
            "Max open files            unlimited            unlimited",
        );
        assert_eq!(
            parse_nofile(&unlimited).expect("limits"),
            Limits {
                soft: None,
                hard: None
            }
        );
        let no_nofile: String = LIMITS
            .lines()
            .filter(|l| !l.starts_with("Max open files"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(parse_nofile(&no_nofile).is_err());
        let lots = LIMITS.replace("1024                 20000", "lots  x");
        assert!(parse_nofile(&lots).is_err());
    }

    #[test]
    fn limits_read_under_the_root() {
        let dir = std::env::temp_dir().join(format!("cwreap-procfs-lim-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("42")).expect("mkdir");
        fs::write(dir.join("42/limits"), LIMITS).expect("write");
        fs::create_dir_all(dir.join("43")).expect("mkdir");
        fs::write(dir.join("43/limits"), "Max open files  1024\n").expect("write");
        let proc = ProcFs::new(&dir);
        assert_eq!(proc.nofile_soft_limit(42).expect("limits"), Some(1024));
        let short = proc.nofile_limits(43).expect_err("too few columns");
        assert_eq!(short.kind(), io::ErrorKind::InvalidData);
        assert!(short.to_string().contains("43/limits"), "{short}");
        let gone = proc.nofile_limits(44).expect_err("no such process");
        assert_eq!(gone.kind(), io::ErrorKind::NotFound);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn stat_start_time_survives_odd_comm() {
        let stat = parse_stat(STAT.as_bytes()).expect("stat");
        assert_eq!(
            (stat.pid, stat.comm.as_str(), stat.state),
            (4242, "a b) c", 'S')
        );
        assert_eq!((stat.num_threads, stat.starttime), (3, 987654));
        // Cut after starttime: the fields that follow are not optional.
        assert!(parse_stat(b"1 (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5").is_err());
        // A comm that is not UTF-8 is read lossily, not refused.
        let (_, fields) = STAT.split_once("c) ").expect("fixture");
        let odd = [b"4242 (\xff\xfe) ".as_slice(), fields.as_bytes()].concat();
        assert_eq!(parse_stat(&odd).expect("lossy comm").starttime, 987654);
    }

    #[test]
    fn kernel_thread_status() {
        let status = parse_status(KTHREAD_STATUS.as_bytes()).expect("status");
        assert_eq!((status.seccomp, status.tracerpid), (Some(0), 0));
        assert_eq!(status.vmrss, None);
        let dir = std::env::temp_dir().join(format!("cwreap-procfs-kt-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("2/task/2")).expect("mkdir");
        fs::write(dir.join("2/status"), KTHREAD_STATUS).expect("write");
        let traced = KTHREAD_STATUS
            .replace("TracerPid:\t0", "TracerPid:\t77")
            .replace("Seccomp:\t0", "Seccomp:\t2");
        fs::write(dir.join("2/task/2/status"), traced).expect("write");
        let proc = ProcFs::new(&dir);
        assert_eq!(proc.seccomp_mode(2, None), Some(0));
        assert_eq!(proc.seccomp_mode(2, Some(2)), Some(2));
        assert_eq!(proc.tracer_pid(2, 2), Some(77));
        assert_eq!(
            proc.status_field(2, None, "Kthread").expect("status"),
            Some("1".to_string())
        );
        assert_eq!(proc.status_field(2, None, "Missing").expect("status"), None);
        // Unknown, not guessed: a status that is cut short, or a thread that is gone.
        fs::write(
            dir.join("2/task/2/status"),
            "Name:\tkthreadd\nSeccomp:\t2\n",
        )
        .expect("write");
        assert_eq!(proc.seccomp_mode(2, Some(2)), None);
        assert_eq!(proc.tracer_pid(2, 3), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_files_are_errors_not_panics() {
        // Every cut of every fixture: procfs-core slices and counts by offset, and a cut
        // in the wrong place must be an error.
        for text in [LIMITS, STAT, KTHREAD_STATUS] {
            for cut in 0..text.len() {
                let part = &text.as_bytes()[..cut];
                let _ = parse_stat(part);
                let _ = parse_status(part);
                let _ = parse_nofile(&String::from_utf8_lossy(part));
            }
        }
        for stat in [
            "",
            "42 (x",
            "42 (x)",
            "42 (x)S 1",
            "(x) S 1",
            "42 )x( S",
            "42é(x) S",
            "42 (x)é S",
            ") (",
        ] {
            assert!(parse_stat(stat.as_bytes()).is_err(), "{stat:?}");
        }
        for limits in [
            "\n",
            "Max\n",
            "Max open\n",
            "Max nice priority 0\n",
            " \n\n",
        ] {
            assert!(parse_nofile(limits).is_err(), "{limits:?}");
        }
        assert!(parse_status(b"Name\n").is_err());
        assert!(parse_status(b"\xff\xfe:\t1\n").is_err());
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
        let state = |s: &[u8]| stat_after_comm(s).map(|(c, _)| c);
        assert_eq!(state(b"42 (a) b) Z 1 2 3"), Some('Z'));
        assert_eq!(state(b"42 (node) S 1"), Some('S'));
        assert_eq!(state(b"42 (\xff) \xfe) R 1"), Some('R'));
        assert_eq!(state(b"42 (x"), None);
        assert_eq!(state(b"42 (x)"), None);
        assert_eq!(state(b""), None);
    }

    #[test]
    fn stat_state_and_threads() {
        let dir = std::env::temp_dir().join(format!("cwreap-procfs-st-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (pid, state, threads) in [(42, 'Z', 3), (43, 'S', 1), (44, 'S', 2)] {
            let stat = STAT
                .replacen("4242", &pid.to_string(), 1)
                .replace(") S 1", &format!(") {state} 1"))
                .replace(" 20 0 3 0 ", &format!(" 20 0 {threads} 0 "));
            fs::create_dir_all(dir.join(format!("{pid}/task/{pid}"))).expect("mkdir");
            fs::write(dir.join(format!("{pid}/stat")), &stat).expect("write");
            fs::write(dir.join(format!("{pid}/task/{pid}/stat")), &stat).expect("write");
        }
        fs::create_dir_all(dir.join("44/task/45")).expect("mkdir");
        fs::write(dir.join("44/task/45/stat"), "45 (a b) c) S 1\n").expect("write");
        fs::create_dir_all(dir.join("46")).expect("mkdir");
        fs::write(dir.join("46/stat"), "46 (x) S 1 2").expect("write");
        let proc = ProcFs::new(&dir);
        assert_eq!(proc.task_state(42, 42).expect("stat"), Some('Z'));
        assert_eq!(proc.start_time(42).expect("start"), 987654);
        // A zombie leader with no live thread, an ordinary process, a live second thread,
        // a stat cut before num_threads.
        assert_eq!(proc.thread_for_empty_table(42), None);
        assert_eq!(proc.thread_for_empty_table(43), None);
        assert_eq!(proc.thread_for_empty_table(44), Some(45));
        assert_eq!(proc.thread_for_empty_table(46), None);
        assert!(proc.start_time(46).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn own_stat_and_status_parse() {
        let proc = ProcFs::default();
        let me = std::process::id() as i32;
        assert!(proc.start_time(me).expect("own stat") > 0);
        assert!(proc.seccomp_mode(me, None).is_some());
        assert!(proc.tracer_pid(me, me).is_some());
        let limits = proc.nofile_limits(me).expect("own limits");
        assert!(
            limits
                .soft
                .is_some_and(|s| Some(s) <= limits.hard.or(Some(u64::MAX)))
        );
        // A thread named with spaces, parentheses and bytes that are not UTF-8.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let named = std::thread::spawn(move || {
            let name = c"\xff(a) b\xfe";
            rustix::thread::set_name(name).expect("PR_SET_NAME");
            tx.send(rustix::thread::gettid().as_raw_nonzero().get())
                .expect("send");
            let _ = wait.recv();
        });
        let tid = rx.recv().expect("tid");
        let state = proc.task_state(me, tid).expect("thread stat");
        assert!(matches!(state, Some('R' | 'S')), "{state:?}");
        let stat = fs::read(proc.task_path(me, tid, "stat")).expect("thread stat");
        assert_eq!(
            parse_stat(&stat).expect("thread stat").comm,
            "\u{fffd}(a) b\u{fffd}"
        );
        drop(done);
        named.join().expect("join");
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
        // The same fds with what each refers to; through a thread when asked.
        let files = proc.fd_files(42, None).expect("fd files");
        let want: FdFiles = [
            (0, FdFile::Other("/dev/null".into())),
            (3, FdFile::Socket(777)),
            (4, FdFile::Other("anon_inode:[eventpoll]".into())),
            (5, FdFile::Socket(778)),
        ]
        .into_iter()
        .collect();
        assert_eq!(files, want);
        let task_fd = dir.join("42/task/43/fd");
        fs::create_dir_all(&task_fd).expect("mkdir");
        std::os::unix::fs::symlink("socket:[779]", task_fd.join("6")).expect("symlink");
        let long = format!("/{}", "x".repeat(300));
        std::os::unix::fs::symlink(&long, task_fd.join("7")).expect("symlink");
        let via = proc
            .fd_files(42, Some(43))
            .expect("fd files through a thread");
        assert_eq!(via.get(&6), Some(&FdFile::Socket(779)));
        assert_eq!(
            via.get(&7),
            Some(&FdFile::Other(long)),
            "a long link is whole"
        );
        assert!(proc.fd_files(43, None).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn many_tables_read_at_once_come_back_in_order_each_its_own_process() {
        let dir = std::env::temp_dir().join(format!("cwreap-procfs-many-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        // 40 processes, process p holding p sockets (inodes 1000p + fd), and two gaps.
        let pids: Vec<i32> = (1..=40).collect();
        for &p in &pids {
            let fd_dir = dir.join(p.to_string()).join("fd");
            fs::create_dir_all(&fd_dir).expect("mkdir");
            for fd in 0..p {
                let inode = 1000 * i64::from(p) + i64::from(fd);
                std::os::unix::fs::symlink(
                    format!("socket:[{inode}]"),
                    fd_dir.join(fd.to_string()),
                )
                .expect("symlink");
            }
        }
        let proc = ProcFs::new(&dir);
        let mut asked = pids.clone();
        asked.insert(7, 99);
        asked.push(100);
        let tables = proc.fd_tables(&asked);
        assert_eq!(tables.len(), asked.len());
        for (&pid, table) in asked.iter().zip(&tables) {
            match (pid, table) {
                (99 | 100, Err(_)) => {}
                (p, Ok(t)) if p <= 40 => {
                    let want: Vec<(i32, u64)> =
                        (0..p).map(|fd| (fd, (1000 * p + fd) as u64)).collect();
                    assert_eq!(t.sockets, want, "pid {p}");
                }
                (p, other) => panic!("pid {p}: {other:?}"),
            }
        }
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
