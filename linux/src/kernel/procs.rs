//! What attribution and the daemon read about processes, as a trait: the real reader is
//! [`ProcFs`] (/proc), and a test double serves scripted processes.

use std::io;

use crate::procfs::{FdFiles, FdTable, JvmGc, Limits, ProcFs, RuntimeClues, SlowReads};

/// Reading processes: their ids, names, owners, fd tables, fd limits and namespaces.
/// Every call is about one process and fails for that process only.
pub trait ProcRead {
    /// Every process id on the host now.
    fn pids(&self) -> io::Result<Vec<i32>>;
    fn comm(&self, pid: i32) -> io::Result<String>;
    /// The real uid.
    fn uid(&self, pid: i32) -> io::Result<u32>;
    fn exe(&self, pid: i32) -> io::Result<String>;
    /// The command line, arguments joined with spaces.
    fn cmdline(&self, pid: i32) -> io::Result<String>;
    /// The cgroup file as the kernel shows it.
    fn cgroup(&self, pid: i32) -> io::Result<String>;
    /// The process's fds: how many, which are sockets (fd, inode), which are epoll.
    fn fd_table(&self, pid: i32) -> io::Result<FdTable>;
    /// [`ProcRead::fd_table`] of each of `pids`, in the same order, for a walk that reads
    /// every process: the real reader reads them on several threads.
    fn fd_tables(&self, pids: &[i32]) -> Vec<io::Result<FdTable>> {
        pids.iter().map(|&pid| self.fd_table(pid)).collect()
    }
    /// The fd table as thread `tid` of `pid` sees it (the same table, readable when the
    /// thread-group leader has exited).
    fn task_fd_table(&self, pid: i32, tid: i32) -> io::Result<FdTable>;
    /// When `pid`'s fd table reads empty because its leader exited: a live thread to read
    /// it through.
    fn thread_for_empty_table(&self, pid: i32) -> Option<i32>;
    /// Every open fd of `pid` and what it refers to (read through thread `via` when given),
    /// in one walk: to check exactly what became of a few fds.
    fn fd_files(&self, pid: i32, via: Option<i32>) -> io::Result<FdFiles>;
    fn task_exists(&self, pid: i32, tid: i32) -> bool;
    /// The number of open fds, cheaply, read through thread `via` when given.
    fn fd_count(&self, pid: i32, via: Option<i32>) -> io::Result<usize>;
    /// What fd `fd` of `pid` is now: Some(inode) for a socket, None for anything else; an
    /// error when it is closed or the process is gone.
    fn fd_socket_inode(&self, pid: i32, fd: i32) -> io::Result<Option<u64>>;
    /// The protocol of the socket at fd `fd` as the kernel names it ("TCP", "TCPv6",
    /// "UNIX", "NETLINK", ...), read without duplicating it.
    fn socket_protocol(&self, pid: i32, fd: i32) -> io::Result<String>;
    /// RLIMIT_NOFILE (None is unlimited).
    fn nofile_limits(&self, pid: i32) -> io::Result<Limits>;
    /// The start time (clock ticks after boot): tells a process from a later one that got
    /// its pid.
    fn start_time(&self, pid: i32) -> io::Result<u64>;
    /// The inode of the process's network namespace.
    fn netns(&self, pid: i32) -> io::Result<u64>;
    /// Inodes of the files the process's epoll instances `epoll_fds` watch.
    fn epoll_watched(&self, pid: i32, epoll_fds: &[i32]) -> io::Result<Vec<u64>>;
    /// What names the runtime the process runs: its executable, the files it maps, the
    /// executable's ELF sections. The map is read under the target's mmap lock, so under a
    /// deadline: `TimedOut` when it did not come back in time.
    fn runtime_clues(&self, pid: i32) -> io::Result<RuntimeClues>;
    /// The collections of a JVM, from the perf data it publishes (hsperfdata), read under
    /// a deadline; None when it publishes none.
    fn jvm_gc(&self, pid: i32) -> io::Result<Option<JvmGc>>;
}

impl ProcRead for ProcFs {
    fn pids(&self) -> io::Result<Vec<i32>> {
        ProcFs::pids(self)
    }
    fn comm(&self, pid: i32) -> io::Result<String> {
        ProcFs::comm(self, pid)
    }
    fn uid(&self, pid: i32) -> io::Result<u32> {
        ProcFs::uid(self, pid)
    }
    fn exe(&self, pid: i32) -> io::Result<String> {
        ProcFs::exe(self, pid)
    }
    fn cmdline(&self, pid: i32) -> io::Result<String> {
        ProcFs::cmdline(self, pid)
    }
    fn cgroup(&self, pid: i32) -> io::Result<String> {
        ProcFs::cgroup(self, pid)
    }
    fn fd_table(&self, pid: i32) -> io::Result<FdTable> {
        ProcFs::fd_table(self, pid)
    }
    fn fd_tables(&self, pids: &[i32]) -> Vec<io::Result<FdTable>> {
        ProcFs::fd_tables(self, pids)
    }
    fn task_fd_table(&self, pid: i32, tid: i32) -> io::Result<FdTable> {
        ProcFs::task_fd_table(self, pid, tid)
    }
    fn thread_for_empty_table(&self, pid: i32) -> Option<i32> {
        ProcFs::thread_for_empty_table(self, pid)
    }
    fn fd_files(&self, pid: i32, via: Option<i32>) -> io::Result<FdFiles> {
        ProcFs::fd_files(self, pid, via)
    }
    fn task_exists(&self, pid: i32, tid: i32) -> bool {
        ProcFs::task_exists(self, pid, tid)
    }
    fn fd_count(&self, pid: i32, via: Option<i32>) -> io::Result<usize> {
        match via {
            Some(tid) => self.task_fd_count_fast(pid, tid),
            None => self.fd_count_fast(pid),
        }
    }
    fn fd_socket_inode(&self, pid: i32, fd: i32) -> io::Result<Option<u64>> {
        ProcFs::fd_socket_inode(self, pid, fd)
    }
    fn socket_protocol(&self, pid: i32, fd: i32) -> io::Result<String> {
        ProcFs::socket_protocol(self, pid, fd)
    }
    fn nofile_limits(&self, pid: i32) -> io::Result<Limits> {
        ProcFs::nofile_limits(self, pid)
    }
    fn start_time(&self, pid: i32) -> io::Result<u64> {
        ProcFs::start_time(self, pid)
    }
    fn netns(&self, pid: i32) -> io::Result<u64> {
        crate::netlink::netns_inode(&self.netns_path(pid))
    }
    fn epoll_watched(&self, pid: i32, epoll_fds: &[i32]) -> io::Result<Vec<u64>> {
        ProcFs::epoll_watched(self, pid, epoll_fds)
    }
    fn runtime_clues(&self, pid: i32) -> io::Result<RuntimeClues> {
        self.runtime_clues_within(&SlowReads::global(), pid)
    }
    fn jvm_gc(&self, pid: i32) -> io::Result<Option<JvmGc>> {
        self.jvm_gc_within(&SlowReads::global(), pid)
    }
}
