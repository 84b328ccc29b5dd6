//! A recording double of [`crate::kernel::Kernel`] for unit tests of the daemon and the
//! commands: it serves scripted processes and sockets, answers every call as the kernel
//! would for them, applies effects (a shutdown moves the socket to CLOSE, a signal may end
//! the process, SOCK_DESTROY removes the socket), and records every call.
//!
//! Faults are scripted too: a dump that fails, an fd table that cannot be read, an fd that
//! another socket took between attribution and action, a process that exits, a call that
//! fails with an errno. Time moves only when a test moves it ([`FakeKernel::advance`]).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::kernel::clock::{Boottime, Clock};
use crate::kernel::discover::{Changes, Diff, Discover, SocketKey, key_of};
use crate::kernel::effects::{Destroy, Effects, Identity, SocketFacts};
use crate::kernel::procs::ProcRead;
use crate::netlink::{DiagSocket, DumpError, Listed};
use crate::netns::Found;
use crate::procfs::{FdTable, Limits};
use crate::tcp;

/// The network namespace scripted sockets and processes live in unless told otherwise.
pub const NETNS: u64 = 4026531840;

/// One call the code under test made, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Cover { pids: Vec<i32>, own: bool },
    Snapshot,
    Changes,
    Pids,
    FdTable { pid: i32 },
    OpenProcess { pid: i32 },
    Duplicate { pid: i32, fd: i32 },
    Shutdown { pid: i32, fd: i32, inode: u64 },
    Signal { pid: i32, signal: i32 },
    SetNofile { pid: i32, soft: u64, hard: u64 },
    Lookup { key: SocketKey },
    Destroy { key: SocketKey },
    ProveDestroy { netns: u64 },
    LiveInodes { listed: Listed },
    Inspect { pid: i32, fd: i32 },
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
        }
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
    /// shutdown of this inode fails with this errno.
    pub shutdown: HashMap<u64, i32>,
    /// Signals to these pids fail with this errno.
    pub signal: HashMap<i32, i32>,
    /// prlimit on these pids fails with this errno.
    pub set_nofile: HashMap<i32, i32>,
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
    /// What [`Discover::first_seen`] answers: a running daemon's published first sights.
    pub published: HashMap<SocketKey, Boottime>,
    /// Run between attribution and action: the first time the code under test duplicates
    /// an fd, this runs once on the world (a target closing an fd or exiting right then).
    pub before_first_duplicate: Option<fn(&mut World)>,
    covered: BTreeSet<u64>,
    own_covered: bool,
    failures: Vec<(u64, String)>,
    diff: Diff,
    next_cookie: u64,
    next_inode: u64,
    next_port: u16,
}

impl World {
    fn alive(&self, pid: i32) -> Option<&Process> {
        self.processes.get(&pid).filter(|p| p.alive)
    }

    fn socket_by_inode(&self, inode: u64) -> Option<&Socket> {
        self.sockets
            .values()
            .find(|s| s.diag.inode == inode && inode != 0)
    }

    fn dump(&mut self, all_listeners: bool) -> Result<Found, DumpError> {
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

/// The recording double.
#[derive(Debug, Default)]
pub struct FakeKernel {
    world: RefCell<World>,
    calls: RefCell<Vec<Call>>,
}

/// The pin of a scripted process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakePin {
    pub pid: i32,
    pub start_time: u64,
}

/// A duplicated fd of a scripted process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDup {
    pub pid: i32,
    pub fd: i32,
    /// The TCP socket's inode; None for anything else.
    pub inode: Option<u64>,
    /// A unix or UDP socket's inode.
    pub other: Option<u64>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl FakeKernel {
    pub fn new() -> Self {
        let k = FakeKernel::default();
        k.with(|w| {
            w.now = Boottime::from_duration(Duration::from_secs(10_000));
            w.next_cookie = 1;
            w.next_inode = 50_000;
            w.next_port = 40_000;
        });
        k
    }

    /// Change the world (script a fault, end a process, ...).
    pub fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        f(&mut self.world.borrow_mut())
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    /// Forget the calls so far.
    pub fn clear_calls(&self) {
        self.calls.borrow_mut().clear();
    }

    fn record(&self, c: Call) {
        self.calls.borrow_mut().push(c);
    }

    /// Move the clock on.
    pub fn advance(&self, d: Duration) {
        self.with(|w| w.now = w.now.checked_add(d).unwrap_or(w.now));
    }

    pub fn spawn(&self, p: Process) {
        self.with(|w| w.processes.insert(p.pid, p));
    }

    /// End process `pid` (its sockets stay as they are; the kernel would close them, which
    /// a test scripts when it matters).
    pub fn exit(&self, pid: i32) {
        self.with(|w| {
            if let Some(p) = w.processes.get_mut(&pid) {
                p.alive = false;
            }
        });
    }

    /// A LISTEN socket on `local` held by `pid` as `fd`.
    pub fn listener(&self, pid: i32, fd: i32, local: &str) -> SocketKey {
        self.socket(pid, Some(fd), local, "0.0.0.0:0", tcp::LISTEN)
    }

    /// A connection accepted by `pid` as `fd`, on `local` from `remote`, whose peer has just
    /// closed: in CLOSE_WAIT since now.
    pub fn close_wait(&self, pid: i32, fd: i32, local: &str, remote: &str) -> SocketKey {
        self.socket(pid, Some(fd), local, remote, tcp::CLOSE_WAIT)
    }

    /// A CLOSE_WAIT connection still in a listener's accept queue: no fd, inode 0.
    pub fn unaccepted(&self, pid_of_listener: i32, local: &str, remote: &str) -> SocketKey {
        self.socket(pid_of_listener, None, local, remote, tcp::CLOSE_WAIT)
    }

    /// `n` CLOSE_WAIT connections held by `pid` from fd `first_fd` on, to local `local`
    /// from distinct remote ports.
    pub fn close_wait_many(
        &self,
        pid: i32,
        first_fd: i32,
        n: usize,
        local: &str,
    ) -> Vec<SocketKey> {
        (0..n)
            .map(|i| {
                let port = self.with(|w| {
                    w.next_port = w.next_port.wrapping_add(1);
                    w.next_port
                });
                let fd = first_fd + i32::try_from(i).unwrap_or(0);
                self.close_wait(pid, fd, local, &format!("127.0.0.1:{port}"))
            })
            .collect()
    }

    fn socket(&self, pid: i32, fd: Option<i32>, local: &str, remote: &str, state: u8) -> SocketKey {
        let parse = |a: &str| {
            a.parse::<SocketAddr>()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
        };
        self.with(|w| {
            let cookie = w.next_cookie;
            w.next_cookie += 1;
            let (netns, uid) = w
                .processes
                .get(&pid)
                .map_or((NETNS, 0), |p| (p.netns, p.uid));
            let inode = match fd {
                Some(fd) => {
                    w.next_inode += 1;
                    if let Some(p) = w.processes.get_mut(&pid) {
                        p.fds.insert(fd, Fd::Socket(w.next_inode));
                    }
                    w.next_inode
                }
                None => 0,
            };
            let diag = DiagSocket {
                netns,
                local: parse(local),
                remote: parse(remote),
                inode,
                uid,
                cookie,
                state,
                recv_q: if state == tcp::CLOSE_WAIT { 1 } else { 0 },
                send_q: 0,
                last_ack_recv_ms: Some(0),
                last_data_recv_ms: None,
                keepalive: false,
            };
            let key = key_of(&diag);
            let entered_at = (state == tcp::CLOSE_WAIT).then_some(w.now);
            let delivered = u32::from(state != tcp::LISTEN);
            w.sockets.insert(
                key,
                Socket {
                    diag,
                    delivered,
                    entered_at,
                },
            );
            key
        })
    }

    /// A connection of `pid` as `fd` that ended while the process still holds the fd: the
    /// peer's RST moved it to CLOSE, and it is in no dump any more.
    pub fn dead(&self, pid: i32, fd: i32, local: &str) -> SocketKey {
        self.socket(pid, Some(fd), local, "0.0.0.0:0", tcp::CLOSE)
    }

    /// A TCP socket of `pid` as `fd` that was only created (or bound), never connected:
    /// state CLOSE, in no dump, and `delivered` 0.
    pub fn never_connected(&self, pid: i32, fd: i32) -> SocketKey {
        let key = self.socket(pid, Some(fd), "0.0.0.0:0", "0.0.0.0:0", tcp::CLOSE);
        self.with(|w| {
            if let Some(s) = w.sockets.get_mut(&key) {
                s.delivered = 0;
            }
        });
        key
    }

    /// A unix (or, with `udp`, a UDP) socket of `pid` as `fd`.
    pub fn other_socket(&self, pid: i32, fd: i32, udp: bool) -> u64 {
        self.with(|w| {
            w.next_inode += 1;
            let inode = w.next_inode;
            if let Some(p) = w.processes.get_mut(&pid) {
                p.fds
                    .insert(fd, if udp { Fd::Udp(inode) } else { Fd::Unix(inode) });
            }
            inode
        })
    }

    /// The TCP state of a socket now (None once it is gone).
    pub fn state(&self, key: SocketKey) -> Option<u8> {
        self.with(|w| w.sockets.get(&key).map(|s| s.diag.state))
    }

    /// Process `pid` closes its fd `fd`; the socket it held (if no one else holds it) is
    /// freed, as close() of the last reference does.
    pub fn close_fd(&self, pid: i32, fd: i32) {
        self.with(|w| close_fd(w, pid, fd));
    }

    /// The calls of one kind, e.g. every shutdown.
    pub fn shutdowns(&self) -> Vec<(i32, i32, u64)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Shutdown { pid, fd, inode } => Some((pid, fd, inode)),
                _ => None,
            })
            .collect()
    }

    pub fn signals(&self) -> Vec<(i32, i32)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Signal { pid, signal } => Some((pid, signal)),
                _ => None,
            })
            .collect()
    }
}

fn close_fd(w: &mut World, pid: i32, fd: i32) {
    let Some(Fd::Socket(inode)) = w.processes.get_mut(&pid).and_then(|p| p.fds.remove(&fd)) else {
        return;
    };
    let held = w
        .processes
        .values()
        .any(|p| p.alive && p.fds.values().any(|f| *f == Fd::Socket(inode)));
    if !held {
        w.sockets.retain(|_, s| s.diag.inode != inode);
    }
}

impl Clock for FakeKernel {
    fn now(&self) -> Boottime {
        self.with(|w| w.now)
    }
}

impl Discover for FakeKernel {
    fn cover(&mut self, pids: &[i32], own: bool) {
        self.record(Call::Cover {
            pids: pids.to_vec(),
            own,
        });
        self.with(|w| {
            let mut covered = BTreeSet::new();
            for pid in pids {
                let Some(p) = w.alive(*pid) else { continue };
                let ns = p.netns;
                match w.faults.netns.get(&ns) {
                    Some(why) => {
                        if !w.failures.iter().any(|(n, _)| *n == ns) {
                            w.failures.push((ns, why.clone()));
                        }
                    }
                    None => {
                        covered.insert(ns);
                    }
                }
            }
            w.covered = covered;
            w.own_covered = own;
        });
    }

    fn snapshot(&mut self, all_listeners: bool) -> Result<Found, DumpError> {
        self.record(Call::Snapshot);
        self.with(|w| {
            let found = w.dump(all_listeners)?;
            w.diff.reset(&found);
            Ok(found)
        })
    }

    fn changes(&mut self) -> Result<Changes, DumpError> {
        self.record(Call::Changes);
        self.with(|w| {
            let found = w.dump(false)?;
            Ok(w.diff.next(found))
        })
    }

    fn entered_at(&self, key: SocketKey) -> Option<Boottime> {
        self.with(|w| {
            if !w.exact_ages {
                return None;
            }
            w.sockets.get(&key).and_then(|s| s.entered_at)
        })
    }

    fn first_seen(&self, key: SocketKey) -> Option<Boottime> {
        self.with(|w| w.published.get(&key).copied())
    }

    fn take_failures(&mut self) -> Vec<(u64, String)> {
        self.with(|w| std::mem::take(&mut w.failures))
    }

    fn live_inodes(&mut self, listed: Listed) -> Result<HashSet<u64>, DumpError> {
        self.record(Call::LiveInodes { listed });
        self.with(|w| {
            if let Some(e) = w.faults.dumps.pop_front() {
                return Err(e);
            }
            let covered: BTreeSet<u64> = w
                .covered
                .iter()
                .copied()
                .chain(w.own_covered.then_some(NETNS))
                .collect();
            let mut out = HashSet::new();
            match listed {
                Listed::TcpOthers => out.extend(
                    w.sockets
                        .values()
                        .filter(|s| covered.contains(&s.diag.netns))
                        .filter(|s| s.diag.state != tcp::CLOSE_WAIT && s.diag.state != tcp::CLOSE)
                        .map(|s| s.diag.inode)
                        .filter(|i| *i != 0),
                ),
                Listed::Unix | Listed::Udp => {
                    for p in w.processes.values().filter(|p| covered.contains(&p.netns)) {
                        for f in p.fds.values() {
                            match (listed, f) {
                                (Listed::Unix, Fd::Unix(i)) | (Listed::Udp, Fd::Udp(i)) => {
                                    out.insert(*i);
                                }
                                _ => {}
                            }
                        }
                    }
                }
            }
            Ok(out)
        })
    }
}

impl ProcRead for FakeKernel {
    fn pids(&self) -> io::Result<Vec<i32>> {
        self.record(Call::Pids);
        Ok(self.with(|w| {
            w.processes
                .values()
                .filter(|p| p.alive)
                .map(|p| p.pid)
                .collect()
        }))
    }
    fn comm(&self, pid: i32) -> io::Result<String> {
        self.with(|w| {
            w.alive(pid)
                .map(|p| p.comm.clone())
                .ok_or_else(|| errno(libc::ENOENT))
        })
    }
    fn uid(&self, pid: i32) -> io::Result<u32> {
        self.with(|w| {
            w.alive(pid)
                .map(|p| p.uid)
                .ok_or_else(|| errno(libc::ENOENT))
        })
    }
    fn exe(&self, pid: i32) -> io::Result<String> {
        self.with(|w| {
            w.alive(pid)
                .map(|p| p.exe.clone())
                .ok_or_else(|| errno(libc::ENOENT))
        })
    }
    fn cmdline(&self, pid: i32) -> io::Result<String> {
        self.with(|w| {
            w.alive(pid)
                .map(|p| p.cmdline.clone())
                .ok_or_else(|| errno(libc::ENOENT))
        })
    }
    fn cgroup(&self, pid: i32) -> io::Result<String> {
        self.with(|w| {
            w.alive(pid)
                .map(|p| p.cgroup.clone())
                .ok_or_else(|| errno(libc::ENOENT))
        })
    }
    fn fd_table(&self, pid: i32) -> io::Result<FdTable> {
        self.record(Call::FdTable { pid });
        self.with(|w| {
            if let Some(e) = w.faults.fd_table.get(&pid) {
                return Err(errno(*e));
            }
            let p = w.alive(pid).ok_or_else(|| errno(libc::ENOENT))?;
            let mut t = FdTable {
                open: p.fds.len(),
                ..FdTable::default()
            };
            for (fd, f) in &p.fds {
                match f {
                    Fd::Socket(inode) | Fd::Unix(inode) | Fd::Udp(inode) => {
                        t.sockets.push((*fd, *inode))
                    }
                    Fd::Epoll(_) => t.epoll.push(*fd),
                    Fd::File => {}
                }
            }
            Ok(t)
        })
    }
    fn task_fd_table(&self, pid: i32, _tid: i32) -> io::Result<FdTable> {
        self.fd_table(pid)
    }
    fn thread_for_empty_table(&self, _pid: i32) -> Option<i32> {
        None
    }
    fn task_exists(&self, pid: i32, tid: i32) -> bool {
        pid == tid && self.with(|w| w.alive(pid).is_some())
    }
    fn fd_count(&self, pid: i32, _via: Option<i32>) -> io::Result<usize> {
        self.with(|w| {
            w.alive(pid)
                .map(|p| p.fds.len())
                .ok_or_else(|| errno(libc::ENOENT))
        })
    }
    fn fd_socket_inode(&self, pid: i32, fd: i32) -> io::Result<Option<u64>> {
        self.with(|w| {
            let p = w.alive(pid).ok_or_else(|| errno(libc::ENOENT))?;
            match p.fds.get(&fd) {
                Some(Fd::Socket(i) | Fd::Unix(i) | Fd::Udp(i)) => Ok(Some(*i)),
                Some(_) => Ok(None),
                None => Err(errno(libc::ENOENT)),
            }
        })
    }
    fn nofile_limits(&self, pid: i32) -> io::Result<Limits> {
        self.with(|w| {
            w.alive(pid)
                .map(|p| p.limits)
                .ok_or_else(|| errno(libc::ENOENT))
        })
    }
    fn start_time(&self, pid: i32) -> io::Result<u64> {
        self.with(|w| {
            w.alive(pid)
                .map(|p| p.start_time)
                .ok_or_else(|| errno(libc::ENOENT))
        })
    }
    fn netns(&self, pid: i32) -> io::Result<u64> {
        self.with(|w| {
            w.alive(pid)
                .map(|p| p.netns)
                .ok_or_else(|| errno(libc::ENOENT))
        })
    }
    fn epoll_watched(&self, pid: i32, epoll_fds: &[i32]) -> io::Result<Vec<u64>> {
        self.with(|w| {
            let p = w.alive(pid).ok_or_else(|| errno(libc::ENOENT))?;
            let mut out = Vec::new();
            for fd in epoll_fds {
                if let Some(Fd::Epoll(watched)) = p.fds.get(fd) {
                    out.extend(watched.iter().copied());
                }
            }
            Ok(out)
        })
    }
}

impl Effects for FakeKernel {
    type Process = FakePin;
    type Dup = FakeDup;

    fn open_process(&self, pid: i32) -> io::Result<FakePin> {
        self.record(Call::OpenProcess { pid });
        self.with(|w| {
            w.alive(pid)
                .map(|p| FakePin {
                    pid,
                    start_time: p.start_time,
                })
                .ok_or_else(|| errno(libc::ESRCH))
        })
    }

    fn alive(&self, process: &FakePin) -> bool {
        self.with(|w| {
            w.alive(process.pid)
                .is_some_and(|p| p.start_time == process.start_time)
        })
    }

    fn duplicate(&self, process: &FakePin, fd: i32) -> io::Result<FakeDup> {
        self.record(Call::Duplicate {
            pid: process.pid,
            fd,
        });
        self.with(|w| {
            if let Some(hook) = w.before_first_duplicate.take() {
                hook(w);
            }
            if let Some(e) = w.faults.duplicate.get(&(process.pid, fd)) {
                return Err(errno(*e));
            }
            let p = w
                .alive(process.pid)
                .filter(|p| p.start_time == process.start_time)
                .ok_or_else(|| errno(libc::ESRCH))?;
            let f = p.fds.get(&fd).ok_or_else(|| errno(libc::EBADF))?;
            Ok(FakeDup {
                pid: process.pid,
                fd,
                inode: match f {
                    Fd::Socket(i) => Some(*i),
                    _ => None,
                },
                other: match f {
                    Fd::Unix(i) | Fd::Udp(i) => Some(*i),
                    _ => None,
                },
            })
        })
    }

    fn identify(&self, dup: &FakeDup) -> io::Result<Identity> {
        self.with(|w| {
            if dup.other.is_some() {
                return Err(errno(libc::ENOPROTOOPT));
            }
            let inode = dup.inode.ok_or_else(|| errno(libc::ENOTSOCK))?;
            let s = w.socket_by_inode(inode).ok_or_else(|| errno(libc::EBADF))?;
            Ok(Identity {
                inode,
                cookie: s.diag.cookie,
                tcp_state: s.diag.state,
            })
        })
    }

    fn inspect(&self, dup: &FakeDup) -> io::Result<SocketFacts> {
        self.record(Call::Inspect {
            pid: dup.pid,
            fd: dup.fd,
        });
        self.with(|w| {
            if let Some(inode) = dup.other {
                return Ok(SocketFacts {
                    inode,
                    cookie: 0,
                    tcp: None,
                    local: None,
                    remote: None,
                });
            }
            let inode = dup.inode.ok_or_else(|| errno(libc::ENOTSOCK))?;
            let s = w.socket_by_inode(inode).ok_or_else(|| errno(libc::EBADF))?;
            let connected = s.diag.state != tcp::CLOSE && s.diag.state != tcp::LISTEN;
            Ok(SocketFacts {
                inode,
                cookie: s.diag.cookie,
                tcp: Some(crate::sys::TcpInfo {
                    state: s.diag.state,
                    last_ack_recv_ms: s.diag.last_ack_recv_ms.unwrap_or(0),
                    last_data_recv_ms: s.diag.last_data_recv_ms.unwrap_or(0),
                    rtt_us: if s.delivered > 0 { 100 } else { 0 },
                    delivered: s.delivered,
                }),
                local: (s.delivered > 0 || s.diag.state == tcp::LISTEN).then_some(s.diag.local),
                remote: connected.then_some(s.diag.remote),
            })
        })
    }

    fn shutdown(&self, dup: &FakeDup) -> io::Result<()> {
        let inode = dup.inode.unwrap_or(0);
        self.record(Call::Shutdown {
            pid: dup.pid,
            fd: dup.fd,
            inode,
        });
        self.with(|w| {
            if let Some(e) = w.faults.shutdown.get(&inode) {
                return Err(errno(*e));
            }
            let Some(s) = w.sockets.values_mut().find(|s| s.diag.inode == inode) else {
                return Err(errno(libc::ENOTCONN));
            };
            // shutdown(SHUT_RDWR) of a CLOSE_WAIT socket sends our FIN: LAST_ACK, then
            // CLOSE once the peer's ACK comes, which on loopback is at once.
            s.diag.state = tcp::CLOSE;
            let closers: Vec<(i32, i32)> = w
                .processes
                .values()
                .filter(|p| p.alive && p.closes_on_hup)
                .flat_map(|p| {
                    p.fds
                        .iter()
                        .filter(|(_, f)| **f == Fd::Socket(inode))
                        .map(|(fd, _)| (p.pid, *fd))
                        .collect::<Vec<_>>()
                })
                .collect();
            for (pid, fd) in closers {
                close_fd(w, pid, fd);
            }
            Ok(())
        })
    }

    fn signal(&self, process: &FakePin, signal: i32) -> io::Result<()> {
        self.record(Call::Signal {
            pid: process.pid,
            signal,
        });
        self.with(|w| {
            if let Some(e) = w.faults.signal.get(&process.pid) {
                return Err(errno(*e));
            }
            let p = w
                .processes
                .get_mut(&process.pid)
                .filter(|p| p.alive && p.start_time == process.start_time)
                .ok_or_else(|| errno(libc::ESRCH))?;
            if p.dies_on.contains(&signal) {
                p.alive = false;
            }
            Ok(())
        })
    }

    fn set_nofile(&self, pid: i32, soft: u64, hard: u64) -> io::Result<()> {
        self.record(Call::SetNofile { pid, soft, hard });
        self.with(|w| {
            if let Some(e) = w.faults.set_nofile.get(&pid) {
                return Err(errno(*e));
            }
            let p = w
                .processes
                .get_mut(&pid)
                .filter(|p| p.alive)
                .ok_or_else(|| errno(libc::ESRCH))?;
            p.limits = Limits {
                soft: Some(soft),
                hard: Some(hard),
            };
            Ok(())
        })
    }
}

impl Destroy for FakeKernel {
    fn lookup(&mut self, s: &DiagSocket) -> io::Result<Option<DiagSocket>> {
        self.record(Call::Lookup { key: key_of(s) });
        Ok(self.with(|w| {
            w.sockets
                .get(&key_of(s))
                .filter(|x| x.diag.local == s.local && x.diag.remote == s.remote)
                .map(|x| x.diag.clone())
        }))
    }

    fn destroy(&mut self, s: &DiagSocket) -> io::Result<()> {
        self.record(Call::Destroy { key: key_of(s) });
        self.with(|w| {
            if w.faults.no_destroy {
                return Err(errno(libc::EOPNOTSUPP));
            }
            match w.sockets.get_mut(&key_of(s)) {
                Some(x) => {
                    x.diag.state = tcp::CLOSE;
                    if x.diag.inode == 0 {
                        w.sockets.remove(&key_of(s));
                    }
                    Ok(())
                }
                None => Err(errno(libc::ENOENT)),
            }
        })
    }

    fn prove_destroy(&mut self, netns: u64) -> io::Result<()> {
        self.record(Call::ProveDestroy { netns });
        if self.with(|w| w.faults.no_destroy) {
            return Err(errno(libc::EOPNOTSUPP));
        }
        Ok(())
    }
}

/// Keys of the sockets in `v`, for assertions.
pub fn keys(v: &[DiagSocket]) -> HashSet<SocketKey> {
    v.iter().map(key_of).collect()
}
