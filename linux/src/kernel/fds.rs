//! Which fds of which processes hold sockets, for every process at once ([`ListFds`]), from
//! one of two sources:
//! - the BPF iterator ([`crate::bpf::SocketIter`]): one pass in the kernel over every task's
//!   fd table, with each process's start time;
//! - the /proc walk ([`ProcWalk`]): /proc/PID/fd of every process, one readlink per fd.
//!
//! Both give the same [`HostFds`]; attribution takes whichever is there and falls back to
//! reading /proc process by process otherwise. A listing is a picture of one moment: the
//! pid of a record may name another process by the time it is used. So the user pins the
//! process with a pidfd, compares its start time (`/proc/PID/stat`) with the one the
//! listing saw ([`ProcFds::start_ticks`]), and checks it is still alive: only then are the
//! listed fd numbers the pinned process's. Every action checks the duplicated fd again.

use std::collections::{BTreeMap, HashMap};

use crate::bpf::TaskFds;
use crate::kernel::procs::ProcRead;

/// The socket and epoll fds of one process, as a host-wide listing saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcFds {
    /// The thread whose fd table was listed, when its thread-group leader had exited (its
    /// own table is gone); duplication must then go through that thread.
    pub via: Option<i32>,
    /// The process's start time, in clock ticks after boot (field 22 of /proc/PID/stat).
    pub start_ticks: u64,
    /// Socket fds: (fd, inode), sorted.
    pub sockets: Vec<(i32, u64)>,
    /// Epoll fds, sorted.
    pub epoll: Vec<i32>,
}

/// Where a [`HostFds`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdSource {
    /// The BPF `task_file` iterator.
    Iterator,
    /// /proc/PID/fd of every process.
    Proc,
}

impl FdSource {
    pub fn as_str(self) -> &'static str {
        match self {
            FdSource::Iterator => "iterator",
            FdSource::Proc => "proc",
        }
    }
}

/// What the listing knows a socket to be (the iterator reads it from the socket itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// TCP over IPv4 or IPv6, in this state (see [`crate::tcp`]) when listed.
    Tcp(u8),
    /// Any other socket (unix, UDP, netlink, packet, ...).
    Other,
}

/// Every process that held a socket or epoll fd at one moment, by pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFds {
    pub source: FdSource,
    pub procs: BTreeMap<i32, ProcFds>,
    /// By inode, what each listed socket is, where the listing tells (the iterator does;
    /// /proc does not: then empty).
    pub kinds: HashMap<u64, SocketKind>,
}

impl HostFds {
    /// Every socket fd listed, as (pid, fd, inode), sorted.
    pub fn socket_fds(&self) -> Vec<(i32, i32, u64)> {
        self.procs
            .iter()
            .flat_map(|(&pid, p)| p.sockets.iter().map(move |&(fd, ino)| (pid, fd, ino)))
            .collect()
    }
}

/// Listing every process's socket fds in one go.
pub trait ListFds {
    /// Every process's socket and epoll fds now; why not, when this source cannot list
    /// them (the caller then reads /proc process by process).
    fn host_fds(&mut self) -> Result<HostFds, String> {
        Err("no host-wide fd listing here".to_string())
    }
}

/// The /proc walk as a [`ListFds`]: every process's /proc/PID/fd (through a live thread
/// when the leader has exited), read on several threads.
#[derive(Debug)]
pub struct ProcWalk<'a, P: ProcRead>(pub &'a P);

impl<P: ProcRead> ListFds for ProcWalk<'_, P> {
    fn host_fds(&mut self) -> Result<HostFds, String> {
        let proc = self.0;
        let pids = proc.pids().map_err(|e| format!("listing /proc: {e}"))?;
        // Start times first: a pid reused between them and the table reads as another
        // process, which the user's check then refuses.
        let starts: Vec<Option<u64>> = pids.iter().map(|&p| proc.start_time(p).ok()).collect();
        let tables = proc.fd_tables(&pids);
        let mut procs = BTreeMap::new();
        for ((pid, start), table) in pids.into_iter().zip(starts).zip(tables) {
            let (Some(start_ticks), Ok(mut table)) = (start, table) else {
                continue; // gone, or not ours to read
            };
            let mut via = None;
            if table.open == 0
                && let Some(tid) = proc.thread_for_empty_table(pid)
                && let Ok(t) = proc.task_fd_table(pid, tid)
            {
                table = t;
                via = Some(tid);
            }
            if table.sockets.is_empty() && table.epoll.is_empty() {
                continue;
            }
            procs.insert(
                pid,
                ProcFds {
                    via,
                    start_ticks,
                    sockets: table.sockets,
                    epoll: table.epoll,
                },
            );
        }
        Ok(HostFds {
            source: FdSource::Proc,
            procs,
            kinds: HashMap::new(),
        })
    }
}

/// Inode of the initial pid namespace (PROC_PID_INIT_INO): the iterator's pids are the
/// ones it shows.
const INIT_PID_NS: u64 = 0xEFFF_FFFC;
/// Inode of the initial time namespace (PROC_TIME_INIT_INO): start times in /proc are
/// shifted in any other.
const INIT_TIME_NS: u64 = 0xEFFF_FFFA;

/// Why the iterator's pids or start times would not be those /proc shows this process,
/// if so: it lives in a pid namespace (the iterator lists the host's pids) or a time
/// namespace (its /proc shifts start times).
pub fn iterator_view_differs() -> Option<String> {
    let ino = |p: &str| {
        rustix::fs::stat(p)
            .map(|s| s.st_ino)
            .map_err(|e| format!("{p}: {e}"))
    };
    match ino("/proc/self/ns/pid") {
        Ok(i) if i == INIT_PID_NS => {}
        Ok(_) => {
            return Some(
                "cwreap runs in a pid namespace; the iterator lists the host's pids".to_string(),
            );
        }
        Err(e) => return Some(e),
    }
    match ino("/proc/self/ns/time") {
        // No time namespaces in this kernel: nothing shifts.
        Err(_) => None,
        Ok(i) if i == INIT_TIME_NS => None,
        Ok(_) => Some("cwreap runs in a time namespace; its /proc shifts start times".to_string()),
    }
}

/// The iterator's records as a [`HostFds`]: per process, the leader's table, or when the
/// leader has exited, one live thread's (the lowest tid listed: threads that share a table
/// list the same fds). Start times are turned into clock ticks as /proc shows them.
pub fn from_iterator(fds: TaskFds) -> HostFds {
    let hz = rustix::param::clock_ticks_per_second().max(1);
    let ns_per_tick = 1_000_000_000 / hz;
    let mut procs: BTreeMap<i32, ProcFds> = BTreeMap::new();
    // The tid each process's table is listed through.
    let mut chosen: BTreeMap<i32, i32> = BTreeMap::new();
    let ids = fds
        .sockets
        .iter()
        .map(|s| (s.pid, s.tid, s.start_ns))
        .chain(fds.epolls.iter().map(|e| (e.pid, e.tid, e.start_ns)));
    for (pid, tid, start_ns) in ids {
        let (Ok(pid), Ok(tid)) = (i32::try_from(pid), i32::try_from(tid)) else {
            continue;
        };
        let best = chosen.entry(pid).or_insert(tid);
        if tid == pid || (*best != pid && tid < *best) {
            *best = tid;
        }
        procs.entry(pid).or_insert_with(|| ProcFds {
            start_ticks: start_ns / ns_per_tick,
            ..ProcFds::default()
        });
    }
    let keep = |pid: u32, tid: u32| {
        let (Ok(pid), Ok(tid)) = (i32::try_from(pid), i32::try_from(tid)) else {
            return None;
        };
        (chosen.get(&pid) == Some(&tid)).then_some(pid)
    };
    for s in &fds.sockets {
        if let (Some(pid), Ok(fd)) = (keep(s.pid, s.tid), i32::try_from(s.fd))
            && let Some(p) = procs.get_mut(&pid)
        {
            p.sockets.push((fd, s.inode));
        }
    }
    for e in &fds.epolls {
        if let (Some(pid), Ok(fd)) = (keep(e.pid, e.tid), i32::try_from(e.fd))
            && let Some(p) = procs.get_mut(&pid)
        {
            p.epoll.push(fd);
        }
    }
    for (pid, p) in procs.iter_mut() {
        let tid = chosen.get(pid).copied().unwrap_or(*pid);
        p.via = (tid != *pid).then_some(tid);
        p.sockets.sort_unstable();
        p.sockets.dedup();
        p.epoll.sort_unstable();
        p.epoll.dedup();
    }
    let kinds = fds
        .sockets
        .iter()
        .map(|s| {
            let kind = if s.is_tcp() {
                SocketKind::Tcp(s.state)
            } else {
                SocketKind::Other
            };
            (s.inode, kind)
        })
        .collect();
    HostFds {
        source: FdSource::Iterator,
        procs,
        kinds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::{TaskEpoll, TaskSocket};

    fn sock(pid: u32, tid: u32, fd: u32, inode: u64) -> TaskSocket {
        TaskSocket {
            pid,
            tid,
            fd,
            inode,
            netns: 1,
            family: 2,
            protocol: 6,
            sock_type: 1,
            state: 8,
            start_ns: 2_000_000_000,
        }
    }

    #[test]
    fn the_leaders_table_or_one_threads_and_start_times_in_ticks() {
        let hz = rustix::param::clock_ticks_per_second();
        let fds = TaskFds {
            sockets: vec![
                sock(10, 10, 4, 100),
                sock(10, 10, 3, 101),
                // A thread of 10 with a table of its own: /proc/10/fd does not show it.
                sock(10, 12, 5, 102),
                // 20's leader has exited: threads 23 and 22 list the same shared table.
                sock(20, 23, 7, 200),
                sock(20, 22, 7, 200),
            ],
            epolls: vec![TaskEpoll {
                pid: 10,
                tid: 10,
                fd: 9,
                start_ns: 2_000_000_000,
            }],
        };
        let host = from_iterator(fds);
        assert_eq!(host.source, FdSource::Iterator);
        let p10 = &host.procs[&10];
        assert_eq!(p10.sockets, [(3, 101), (4, 100)]);
        assert_eq!(p10.epoll, [9]);
        assert_eq!(p10.via, None);
        assert_eq!(p10.start_ticks, 2 * hz);
        let p20 = &host.procs[&20];
        assert_eq!(p20.sockets, [(7, 200)]);
        assert_eq!(p20.via, Some(22));
        assert_eq!(host.socket_fds().len(), 3);
    }
}
