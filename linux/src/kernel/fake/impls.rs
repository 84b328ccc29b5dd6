//! The kernel's answers and effects, as the double gives them for its world.

use std::collections::{BTreeSet, HashSet};
use std::io;

use super::double::{FakeDup, FakeKernel, FakePin, close_fd, errno};
use super::world::{Call, Fd, NETNS};
use crate::kernel::clock::{Boottime, Clock};
use crate::kernel::discover::{Changes, Discover, SocketKey, key_of};
use crate::kernel::effects::{Destroy, Effects, Identity, SocketFacts};
use crate::kernel::procs::ProcRead;
use crate::netlink::{DiagSocket, DumpError, Listed};
use crate::netns::Found;
use crate::procfs::{FdFile, FdFiles, FdTable, JvmGc, Limits, RuntimeClues};
use crate::tcp;

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

    fn mode(&self) -> &'static str {
        if self.with(|w| w.events) {
            "events"
        } else {
            "poll"
        }
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
        self.record(Call::Cmdline { pid });
        self.with(|w| match w.alive(pid) {
            Some(p) if p.cmdline_stalls => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("pid {pid}: reading its memory did not return in time"),
            )),
            Some(p) => Ok(p.cmdline.clone()),
            None => Err(errno(libc::ENOENT)),
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
                    Fd::Socket(inode) | Fd::Unix(inode) | Fd::Udp(inode) | Fd::Netlink(inode) => {
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
    fn fd_files(&self, pid: i32, _via: Option<i32>) -> io::Result<FdFiles> {
        self.with(|w| {
            if let Some(e) = w.faults.fd_table.get(&pid) {
                return Err(errno(*e));
            }
            let p = w.alive(pid).ok_or_else(|| errno(libc::ENOENT))?;
            Ok(p.fds
                .iter()
                .map(|(fd, f)| {
                    let file = match f {
                        Fd::Socket(inode)
                        | Fd::Unix(inode)
                        | Fd::Udp(inode)
                        | Fd::Netlink(inode) => FdFile::Socket(*inode),
                        Fd::Epoll(_) => FdFile::Other("anon_inode:[eventpoll]".into()),
                        Fd::File => FdFile::Other("/dev/null".into()),
                    };
                    (*fd, file)
                })
                .collect())
        })
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
                Some(Fd::Socket(i) | Fd::Unix(i) | Fd::Udp(i) | Fd::Netlink(i)) => Ok(Some(*i)),
                Some(_) => Ok(None),
                None => Err(errno(libc::ENOENT)),
            }
        })
    }
    fn socket_protocol(&self, pid: i32, fd: i32) -> io::Result<String> {
        self.record(Call::Protocol { pid, fd });
        self.with(|w| {
            if let Some(e) = w.faults.protocol.get(&(pid, fd)) {
                return Err(errno(*e));
            }
            let p = w.alive(pid).ok_or_else(|| errno(libc::ENOENT))?;
            match p.fds.get(&fd) {
                Some(Fd::Socket(_)) => Ok("TCP".to_owned()),
                Some(Fd::Unix(_)) => Ok("UNIX-STREAM".to_owned()),
                Some(Fd::Udp(_)) => Ok("UDP".to_owned()),
                Some(Fd::Netlink(_)) => Ok("NETLINK".to_owned()),
                // getxattr(2) on a file that is not a socket.
                Some(_) => Err(errno(libc::ENODATA)),
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
    fn runtime_clues(&self, pid: i32) -> io::Result<RuntimeClues> {
        self.with(|w| match w.alive(pid) {
            Some(p) if p.maps_stall => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("pid {pid}: reading its memory did not return in time"),
            )),
            Some(p) => Ok(p.runtime.clone()),
            None => Err(errno(libc::ENOENT)),
        })
    }
    fn jvm_gc(&self, pid: i32) -> io::Result<Option<JvmGc>> {
        self.with(|w| {
            w.alive(pid)
                .map(|p| p.jvm_gc.clone())
                .ok_or_else(|| errno(libc::ENOENT))
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
                    Fd::Unix(i) | Fd::Udp(i) | Fd::Netlink(i) => Some(*i),
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

    fn raise_nofile_soft(
        &self,
        pid: i32,
        soft: u64,
        expected: Limits,
    ) -> io::Result<crate::kernel::NofileRaise> {
        self.record(Call::SetNofile {
            pid,
            soft,
            hard: expected.hard.unwrap_or(u64::MAX),
        });
        self.with(|w| {
            // The process's own change lands first, so a fault can be prlimit refusing
            // what that change turned into a raise (EPERM without CAP_SYS_RESOURCE).
            if let Some(l) = w.faults.nofile_changes.remove(&pid)
                && let Some(p) = w.processes.get_mut(&pid).filter(|p| p.alive)
            {
                p.limits = l;
            }
            if let Some(e) = w.faults.set_nofile.get(&pid) {
                return Err(errno(*e));
            }
            let p = w
                .processes
                .get_mut(&pid)
                .filter(|p| p.alive)
                .ok_or_else(|| errno(libc::ESRCH))?;
            if p.limits != expected {
                return Ok(crate::kernel::NofileRaise::Changed(p.limits));
            }
            p.limits.soft = Some(soft);
            Ok(crate::kernel::NofileRaise::Raised)
        })
    }
}

/// A host-wide listing of the scripted processes' socket and epoll fds when
/// [`World::listing`] is on; otherwise none (attribution reads them one by one).
impl crate::kernel::fds::ListFds for FakeKernel {
    fn host_fds(&mut self) -> Result<crate::kernel::HostFds, String> {
        self.record(Call::HostFds);
        self.with(|w| {
            if !w.listing {
                return Err("no listing scripted".to_string());
            }
            let mut procs = std::collections::BTreeMap::new();
            for p in w.processes.values().filter(|p| p.alive) {
                let mut e = crate::kernel::ProcFds {
                    start_ticks: p.start_time + u64::from(w.listing_stale.contains(&p.pid)),
                    ..Default::default()
                };
                for (fd, f) in &p.fds {
                    match f {
                        Fd::Socket(i) | Fd::Unix(i) | Fd::Udp(i) | Fd::Netlink(i) => {
                            e.sockets.push((*fd, *i))
                        }
                        Fd::Epoll(_) => e.epoll.push(*fd),
                        Fd::File => {}
                    }
                }
                if !e.sockets.is_empty() || !e.epoll.is_empty() {
                    procs.insert(p.pid, e);
                }
            }
            Ok(crate::kernel::HostFds {
                source: crate::kernel::FdSource::Iterator,
                procs,
                kinds: std::collections::HashMap::new(),
            })
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
