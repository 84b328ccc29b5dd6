//! Attribution: which process holds each CLOSE_WAIT socket, through which fd.
//!
//! Walks /proc/<pid>/fd only of candidate processes: the selected ones, or those whose uid
//! owns a CLOSE_WAIT socket. When asked to (reap, daemon), a pidfd is opened *before* the
//! fd table is read and the process is confirmed alive after, so the fd numbers recorded
//! belong to the process the pidfd pins. Unreadable or vanished processes are counted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;

use regex::Regex;

use cwreap_linux::netlink::DiagSocket;
use cwreap_linux::netns::Found;
use cwreap_linux::os::Os;
use cwreap_linux::procfs::ProcFs;

/// One process that holds at least one CLOSE_WAIT socket (or was selected by pid).
#[derive(Debug)]
pub struct Process<H> {
    pub pid: i32,
    pub comm: String,
    pub uid: u32,
    pub open_fds: usize,
    /// Soft RLIMIT_NOFILE; None when unlimited or unreadable.
    pub nofile_soft: Option<u64>,
    /// Its epoll fds, found on the same walk (for `explain`).
    pub epoll_fds: Vec<i32>,
    /// A pidfd held since attribution (reap and daemon only).
    pub handle: Option<H>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Holder {
    pub pid: i32,
    pub fd: i32,
}

#[derive(Debug, Clone)]
pub struct Observed {
    pub diag: DiagSocket,
    /// Every (pid, fd) that refers to this socket; several after fork or SCM_RIGHTS.
    pub holders: Vec<Holder>,
    /// For a socket still in an accept queue (inode 0, no fd anywhere): the listener it
    /// waits on and who holds that listener.
    pub listener: Option<ListenerRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerRef {
    pub inode: u64,
    pub local: std::net::SocketAddr,
    pub holders: Vec<Holder>,
}

impl Observed {
    /// Never accepted by the application: only SOCK_DESTROY can reach it.
    pub fn unaccepted(&self) -> bool {
        self.diag.inode == 0
    }

    /// The processes this socket belongs to: its holders, or for an unaccepted connection
    /// the holders of its listener.
    pub fn owners(&self) -> &[Holder] {
        match (&self.listener, self.unaccepted()) {
            (Some(l), true) => &l.holders,
            _ => &self.holders,
        }
    }
}

/// For an unaccepted connection (inode 0), its listener with the holders `holders_of`
/// gives for the listener's inode.
pub fn listener_ref(
    diag: &DiagSocket,
    listeners: &[DiagSocket],
    holders_of: impl Fn(u64) -> Vec<Holder>,
) -> Option<ListenerRef> {
    if diag.inode != 0 {
        return None;
    }
    let l = listener_for(diag, listeners).filter(|l| l.inode != 0)?;
    Some(ListenerRef {
        inode: l.inode,
        local: l.local,
        holders: holders_of(l.inode),
    })
}

/// The listener a not-yet-accepted connection waits on: same namespace, same port, and the
/// same address or a wildcard one (IPv4-mapped addresses compared as IPv4).
pub fn listener_for<'a>(s: &DiagSocket, listeners: &'a [DiagSocket]) -> Option<&'a DiagSocket> {
    let norm = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    let want = norm(s.local.ip());
    let candidates = listeners
        .iter()
        .filter(|l| l.netns == s.netns && l.local.port() == s.local.port());
    let mut wildcard = None;
    for l in candidates {
        let ip = norm(l.local.ip());
        if ip == want {
            return Some(l);
        }
        if ip.is_unspecified() && wildcard.is_none() {
            wildcard = Some(l);
        }
    }
    wildcard
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WalkStats {
    /// Processes whose fd table was read.
    pub inspected: usize,
    /// Processes that exited during the walk.
    pub vanished: usize,
    /// Processes whose fd table we may not read (EACCES/EPERM).
    pub denied: usize,
}

#[derive(Debug)]
pub struct Snapshot<H> {
    pub sockets: Vec<Observed>,
    pub processes: BTreeMap<i32, Process<H>>,
    pub stats: WalkStats,
    /// Selected pids that could not be read, with the reason.
    pub unreadable: Vec<(i32, io::Error)>,
    /// Processes in scope whose fd table we were not allowed to read: their sockets show
    /// no owner, and a reap cannot act on them.
    pub denied: Vec<i32>,
}

/// Which processes attribution may look at.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Only these pids (an explicit --pid list).
    pub pids: Option<Vec<i32>>,
    /// Only processes whose comm matches.
    pub comm: Option<Regex>,
}

pub struct Attributor<'a, O: Os> {
    pub proc: &'a ProcFs,
    /// With an Os, every walked process is pinned with a pidfd first.
    pub os: Option<&'a O>,
    /// Never attribute to (and so never act on) this pid: cwreap itself.
    pub self_pid: i32,
}

impl<'a, O: Os> Attributor<'a, O> {
    pub fn attribute(&self, found: Found, scope: &Scope) -> Snapshot<O::Process> {
        let listeners = found.listeners;
        let mut snap = Snapshot {
            sockets: found
                .close_wait
                .into_iter()
                .map(|diag| {
                    let listener = listener_ref(&diag, &listeners, |_| Vec::new());
                    Observed {
                        diag,
                        holders: Vec::new(),
                        listener,
                    }
                })
                .collect(),
            processes: BTreeMap::new(),
            stats: WalkStats::default(),
            unreadable: Vec::new(),
            denied: Vec::new(),
        };
        // Socket inodes, and the inodes of listeners with unaccepted connections.
        let mut by_inode: HashMap<u64, Vec<Slot>> = HashMap::new();
        for (i, s) in snap.sockets.iter().enumerate() {
            if s.diag.inode != 0 {
                by_inode
                    .entry(s.diag.inode)
                    .or_default()
                    .push(Slot::Socket(i));
            }
            if let Some(l) = &s.listener {
                by_inode.entry(l.inode).or_default().push(Slot::Listener(i));
            }
        }

        if let Some(pids) = &scope.pids {
            for &pid in pids {
                if pid == self.self_pid {
                    continue;
                }
                if let Err(e) = self.walk(pid, scope, &by_inode, &mut snap, true) {
                    snap.unreadable.push((pid, e));
                }
            }
            return snap;
        }
        if by_inode.is_empty() {
            return snap;
        }

        let Ok(all) = self.proc.pids() else {
            return snap;
        };
        let mut uids: HashSet<u32> = snap.sockets.iter().map(|s| s.diag.uid).collect();
        for s in &snap.sockets {
            if let Some(l) = &s.listener
                && let Some(found) = listeners.iter().find(|x| x.inode == l.inode)
            {
                uids.insert(found.uid);
            }
        }
        let mut later = Vec::new();
        // A host-wide walk stops as soon as every socket has an owner: reading the fd
        // tables of every other process (clients, idle daemons) is most of the cost, and
        // one holder is all an action needs. So in a host-wide scan `holders` lists the
        // holders found up to that point; `--pid` walks the named processes in full.
        for pid in all {
            if pid == self.self_pid {
                continue;
            }
            match self.proc.uid(pid) {
                Ok(uid) if uids.contains(&uid) => {
                    if let Ok(holds) = self.walk(pid, scope, &by_inode, &mut snap, false)
                        && holds > 0
                        && !any_unowned(&snap)
                    {
                        return snap;
                    }
                }
                Ok(_) => later.push(pid),
                Err(_) => snap.stats.vanished += 1,
            }
        }
        // A socket's uid is its creator's; a process that changed uid since (or received
        // the fd over a unix socket) is missed by the uid filter. Walk the rest only when
        // some socket with a file is still unowned.
        for pid in later {
            if !any_unowned(&snap) {
                break;
            }
            let _ = self.walk(pid, scope, &by_inode, &mut snap, false);
        }
        snap
    }

    /// Read one process's fds and record the CLOSE_WAIT sockets it holds.
    fn walk(
        &self,
        pid: i32,
        scope: &Scope,
        by_inode: &HashMap<u64, Vec<Slot>>,
        snap: &mut Snapshot<O::Process>,
        selected: bool,
    ) -> io::Result<usize> {
        // The name is needed up front only to filter by it; otherwise it is read once the
        // process turns out to matter (a few syscalls saved per uninteresting process).
        let mut comm = None;
        if let Some(re) = &scope.comm {
            let c = match self.proc.comm(pid) {
                Ok(c) => c,
                Err(e) => {
                    count_failure(snap, pid, &e);
                    return Err(e);
                }
            };
            if !re.is_match(&c) {
                return Ok(0);
            }
            comm = Some(c);
        }
        let handle = match self.os {
            Some(os) => match os.open_process(pid) {
                Ok(h) => Some(h),
                Err(e) => {
                    count_failure(snap, pid, &e);
                    return Err(e);
                }
            },
            None => None,
        };
        let table = match self.proc.fd_table(pid) {
            Ok(t) => t,
            Err(e) => {
                count_failure(snap, pid, &e);
                return Err(e);
            }
        };
        // The fd numbers must belong to the process the pidfd pins: if it died during the
        // walk, the pid may already name another process.
        if let (Some(os), Some(h)) = (self.os, handle.as_ref())
            && !os.alive(h)
        {
            snap.stats.vanished += 1;
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        snap.stats.inspected += 1;
        let mut holds = 0usize;
        for &(fd, inode) in &table.sockets {
            for slot in by_inode.get(&inode).into_iter().flatten() {
                match *slot {
                    Slot::Socket(i) => snap.sockets[i].holders.push(Holder { pid, fd }),
                    Slot::Listener(i) => {
                        if let Some(l) = snap.sockets[i].listener.as_mut() {
                            l.holders.push(Holder { pid, fd });
                        }
                    }
                }
                holds += 1;
            }
        }
        if holds == 0 && !selected {
            return Ok(0);
        }
        let comm = match comm {
            Some(c) => c,
            None => self.proc.comm(pid).unwrap_or_default(),
        };
        let uid = self.proc.uid(pid).unwrap_or(u32::MAX);
        let nofile_soft = self.proc.nofile_soft_limit(pid).ok().flatten();
        snap.processes.insert(
            pid,
            Process {
                pid,
                comm,
                uid,
                open_fds: table.open,
                nofile_soft,
                epoll_fds: table.epoll,
                handle,
            },
        );
        Ok(holds)
    }
}

/// Whether some socket that has a file (or waits on a listener) has no owner yet.
fn any_unowned<H>(snap: &Snapshot<H>) -> bool {
    snap.sockets.iter().any(|s| {
        (s.diag.inode != 0 && s.holders.is_empty())
            || s.listener.as_ref().is_some_and(|l| l.holders.is_empty())
    })
}

/// Where an inode found in an fd table goes.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Socket(usize),
    Listener(usize),
}

fn count_failure<H>(snap: &mut Snapshot<H>, pid: i32, e: &io::Error) {
    if is_permission(e) {
        snap.stats.denied += 1;
        snap.denied.push(pid);
    } else {
        snap.stats.vanished += 1;
    }
}

/// Whether an attribution error means "not allowed" rather than "gone".
pub fn is_permission(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
}
