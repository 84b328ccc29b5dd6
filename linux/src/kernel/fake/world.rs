//! The double's world: scripted processes, sockets and faults, and the calls recorded.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::kernel::clock::Boottime;
use crate::kernel::discover::{Diff, SocketKey};
use crate::netlink::{DiagSocket, DumpError, Listed};
use crate::netns::Found;
use crate::procfs::{JvmGc, Limits, RuntimeClues};
use crate::tcp;

/// The network namespace scripted sockets and processes live in unless told otherwise.
pub const NETNS: u64 = 4026531840;

/// One call the code under test made, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Cover {
        pids: Vec<i32>,
        own: bool,
    },
    Snapshot,
    Changes,
    Pids,
    /// A host-wide listing of socket fds ([`crate::kernel::ListFds`]).
    HostFds,
    FdTable {
        pid: i32,
    },
    OpenProcess {
        pid: i32,
    },
    Duplicate {
        pid: i32,
        fd: i32,
    },
    Shutdown {
        pid: i32,
        fd: i32,
        inode: u64,
    },
    Signal {
        pid: i32,
        signal: i32,
    },
    SetNofile {
        pid: i32,
        soft: u64,
        hard: u64,
    },
    Lookup {
        key: SocketKey,
    },
    Destroy {
        key: SocketKey,
    },
    ProveDestroy {
        netns: u64,
    },
    LiveInodes {
        listed: Listed,
    },
    /// A read of the process's command line.
    Cmdline {
        pid: i32,
    },
    Protocol {
        pid: i32,
        fd: i32,
    },
    Inspect {
        pid: i32,
        fd: i32,
    },
}

/// What an fd of a scripted process refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fd {
    /// A TCP socket (see [`World::sockets`]).
    Socket(u64),
    /// A unix socket: listed by a unix dump.
    Unix(u64),
    /// A UDP socket: listed by a UDP dump.
    Udp(u64),
    /// A netlink socket: in no dump cwreap asks for, and not TCP.
    Netlink(u64),
    /// An epoll instance watching these inodes.
    Epoll(Vec<u64>),
    File,
}

/// A scripted process.
#[derive(Debug, Clone)]
pub struct Process {
    pub pid: i32,
    pub comm: String,
    pub uid: u32,
    pub exe: String,
    pub cmdline: String,
    pub cgroup: String,
    pub start_time: u64,
    pub netns: u64,
    pub fds: BTreeMap<i32, Fd>,
    pub limits: Limits,
    pub alive: bool,
    /// Closes a socket's fd as soon as it is shut down (an app that handles EPOLLHUP).
    pub closes_on_hup: bool,
    /// Exits on these signals.
    pub dies_on: BTreeSet<i32>,
    /// Reading its command line does not return in time (its memory map is locked).
    pub cmdline_stalls: bool,
    /// What its executable and memory map show; `exe` and the mapped executable by default.
    pub runtime: RuntimeClues,
    /// Reading its memory map does not return in time.
    pub maps_stall: bool,
    /// The perf data of a JVM.
    pub jvm_gc: Option<JvmGc>,
}

impl Process {
    pub fn new(pid: i32, comm: &str) -> Self {
        Process {
            pid,
            comm: comm.to_owned(),
            uid: 0,
            exe: format!("/usr/bin/{comm}"),
            cmdline: comm.to_owned(),
            cgroup: "0::/system.slice/test.service\n".to_owned(),
            start_time: 1000 + u64::try_from(pid).unwrap_or(0),
            netns: NETNS,
            fds: BTreeMap::new(),
            limits: Limits {
                soft: Some(1024),
                hard: Some(4096),
            },
            alive: true,
            closes_on_hup: false,
            dies_on: [libc::SIGTERM, libc::SIGKILL].into_iter().collect(),
            cmdline_stalls: false,
            runtime: RuntimeClues {
                exe: format!("/usr/bin/{comm}"),
                mapped: vec![format!("/usr/bin/{comm}")],
                exe_sections: Some(vec![String::new(), ".text".to_owned()]),
            },
            maps_stall: false,
            jvm_gc: None,
        }
    }

    /// Its executable and mapped files (the executable first, as in a real map), with
    /// these ELF sections.
    pub fn runs(mut self, exe: &str, libs: &[&str], sections: &[&str]) -> Self {
        self.exe = exe.to_owned();
        self.runtime = RuntimeClues {
            exe: exe.to_owned(),
            mapped: std::iter::once(exe)
                .chain(libs.iter().copied())
                .map(str::to_owned)
                .collect(),
            exe_sections: Some(sections.iter().map(|s| (*s).to_owned()).collect()),
        };
        self
    }

    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = uid;
        self
    }

    pub fn limits(mut self, soft: u64, hard: u64) -> Self {
        self.limits = Limits {
            soft: Some(soft),
            hard: Some(hard),
        };
        self
    }

    /// `n` open fds that are not sockets, from fd 100 on.
    pub fn files(mut self, n: usize) -> Self {
        for i in 0..n {
            self.fds
                .insert(100 + i32::try_from(i).unwrap_or(i32::MAX - 100), Fd::File);
        }
        self
    }

    pub fn closes_on_hup(mut self) -> Self {
        self.closes_on_hup = true;
        self
    }
}

/// A scripted TCP socket.
#[derive(Debug, Clone)]
pub struct Socket {
    pub diag: DiagSocket,
    /// tcp_info `delivered`: 0 for a socket that never connected.
    pub delivered: u32,
    /// When it entered CLOSE_WAIT, as an event source would have seen it.
    pub entered_at: Option<Boottime>,
}

/// Faults to answer with, instead of what the scripted world would give.
#[derive(Debug, Default)]
pub struct Faults {
    /// The next dumps (snapshot or changes) fail with these errors, one each.
    pub dumps: VecDeque<DumpError>,
    /// Reading these processes' fd tables fails with this errno.
    pub fd_table: HashMap<i32, i32>,
    /// pidfd_getfd of (pid, fd) fails with this errno.
    pub duplicate: HashMap<(i32, i32), i32>,
    /// Reading the protocol name of the socket at (pid, fd) fails with this errno.
    pub protocol: HashMap<(i32, i32), i32>,
    /// shutdown of this inode fails with this errno.
    pub shutdown: HashMap<u64, i32>,
    /// Signals to these pids fail with this errno.
    pub signal: HashMap<i32, i32>,
    /// prlimit on these pids fails with this errno.
    pub set_nofile: HashMap<i32, i32>,
    /// These processes set their fd limits to these just before cwreap's prlimit lands
    /// (before a `set_nofile` fault, which then models prlimit refusing the write).
    pub nofile_changes: HashMap<i32, Limits>,
    /// SOCK_DESTROY is not supported (EOPNOTSUPP).
    pub no_destroy: bool,
    /// Network namespaces that cannot be entered, with why.
    pub netns: HashMap<u64, String>,
}

/// Everything the double knows: scripted, and changed by the effects applied.
#[derive(Debug, Default)]
pub struct World {
    pub now: Boottime,
    pub processes: BTreeMap<i32, Process>,
    pub sockets: BTreeMap<SocketKey, Socket>,
    pub faults: Faults,
    /// Answer [`Discover::entered_at`] with exact entry times, as an event source does.
    pub exact_ages: bool,
    /// Serve host-wide listings of socket fds, as the BPF iterator does; each listing
    /// records [`Call::HostFds`] and reads no fd table. Processes whose start time is in
    /// `listing_stale` are listed with another start time (their pid was reused since).
    pub listing: bool,
    pub listing_stale: BTreeSet<i32>,
    /// Say the mode is `events` ([`Discover::mode`]): the changes come as from an event
    /// source, and the daemon may keep a quiet cycle's candidates.
    pub events: bool,
    /// What [`Discover::first_seen`] answers: a running daemon's published first sights.
    pub published: HashMap<SocketKey, Boottime>,
    /// Run between attribution and action: the first time the code under test duplicates
    /// an fd, this runs once on the world (a target closing an fd or exiting right then).
    pub before_first_duplicate: Option<fn(&mut World)>,
    pub(super) covered: BTreeSet<u64>,
    pub(super) own_covered: bool,
    pub(super) failures: Vec<(u64, String)>,
    pub(super) diff: Diff,
    pub(super) next_cookie: u64,
    pub(super) next_inode: u64,
    pub(super) next_port: u16,
}

impl World {
    pub(super) fn alive(&self, pid: i32) -> Option<&Process> {
        self.processes.get(&pid).filter(|p| p.alive)
    }

    pub(super) fn socket_by_inode(&self, inode: u64) -> Option<&Socket> {
        self.sockets
            .values()
            .find(|s| s.diag.inode == inode && inode != 0)
    }

    pub(super) fn dump(&mut self, all_listeners: bool) -> Result<Found, DumpError> {
        if let Some(e) = self.faults.dumps.pop_front() {
            return Err(e);
        }
        let mut covered = self.covered.clone();
        if self.own_covered {
            covered.insert(NETNS);
        }
        let close_wait: Vec<DiagSocket> = self
            .sockets
            .values()
            .filter(|s| s.diag.state == tcp::CLOSE_WAIT && covered.contains(&s.diag.netns))
            .map(|s| s.diag.clone())
            .collect();
        let want: BTreeSet<u64> = close_wait
            .iter()
            .filter(|s| all_listeners || s.inode == 0)
            .map(|s| s.netns)
            .collect();
        let listeners = self
            .sockets
            .values()
            .filter(|s| s.diag.state == tcp::LISTEN && want.contains(&s.diag.netns))
            .map(|s| s.diag.clone())
            .collect();
        Ok(Found {
            close_wait,
            listeners,
        })
    }
}
