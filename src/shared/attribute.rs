//! Attribution: which process holds each CLOSE_WAIT socket, through which fd.
//!
//! Walks /proc/<pid>/fd only of candidate processes: the selected ones, or those whose uid
//! owns a CLOSE_WAIT socket. When asked to (reap, daemon), a pidfd is opened *before* the
//! name and the fd table are read and the process is confirmed alive after, so the fd
//! numbers recorded belong to the process the pidfd pins. Unreadable or vanished processes
//! are counted.
//!
//! A process whose thread-group leader has exited shows an empty /proc/PID/fd; its fds are
//! read through a live thread instead ([`read_fds`]), and that thread is pinned too, since
//! duplication must go through it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;

use cwreap_linux::kernel::Effects;
use cwreap_linux::kernel::HostFds;
use cwreap_linux::kernel::ProcRead;
use cwreap_linux::netlink::DiagSocket;
use cwreap_linux::netns::Found;
use cwreap_linux::procfs::FdTable;

use cwreap_linux::kernel::Boottime;

use crate::shared::age::{self, Age, Clues};
use crate::shared::selector::Selector;

mod host;
mod read;
pub use host::table_from_host;
use read::read_fds_from;
pub use read::{is_permission, process_facts, read_cmdline, read_fds, read_pid_files};

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
    /// The thread whose /proc/PID/task/TID/fd was read, when the leader's could not show
    /// the fds (it has exited); duplication goes through that thread's pidfd.
    pub thread: Option<i32>,
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
    /// The server's end: a LISTEN socket of the same namespace, of any owner, has this
    /// local port on this address or the wildcard one. Otherwise the client's end.
    pub direction: Direction,
    /// Its time in CLOSE_WAIT, from what sock_diag says; a caller that knows more (the
    /// daemon's first sight, an event) ages it again ([`crate::shared::age`]).
    pub age: Age,
}

/// Which end of a connection a socket is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The server's end (it was accepted from a listener).
    In,
    /// The client's end (it connected out).
    #[default]
    Out,
}

impl Direction {
    /// `in` or `out`, as the DIR column and the JSON show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }

    /// The end `diag` is, given the LISTEN sockets of its namespace.
    pub fn of(diag: &DiagSocket, listeners: &[DiagSocket]) -> Direction {
        if listener_for(diag, listeners).is_some() {
            Direction::In
        } else {
            Direction::Out
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerRef {
    pub inode: u64,
    pub local: std::net::SocketAddr,
    pub holders: Vec<Holder>,
}

impl Observed {
    /// A socket as sock_diag reported it, aged from what sock_diag says.
    pub fn new(
        diag: DiagSocket,
        holders: Vec<Holder>,
        listener: Option<ListenerRef>,
        direction: Direction,
    ) -> Observed {
        Observed {
            age: age::age(&Clues::of(&diag, None, None), Boottime::default()),
            diag,
            holders,
            listener,
            direction,
        }
    }

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
    /// Processes skipped because reading their command line did not return in time.
    pub stalled: usize,
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
    /// Processes skipped because reading their memory (the command line a selector needs)
    /// did not return in time: whether they match cannot be known.
    pub stalled: Vec<i32>,
    /// With [`Scope::dead`]: the socket fds of the walked processes whose inode was in no
    /// CLOSE_WAIT dump, for [`crate::shared::dead`] to tell the dead ones.
    pub unknown: Vec<SocketFd>,
}

/// One socket fd of a process: (pid, fd, inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SocketFd {
    pub pid: i32,
    pub fd: i32,
    pub inode: u64,
}

/// Which processes attribution may look at.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Only these pids (an explicit --pid list, or the pids of --pid-file).
    pub pids: Option<Vec<i32>>,
    /// Only processes the selector's process criteria accept.
    pub selector: Selector,
    /// The pids read from the selector's pid files.
    pub pids_from_files: Vec<i32>,
    /// Look for dead held sockets too: every process in scope is walked (a host-wide walk
    /// no longer stops once every CLOSE_WAIT socket has an owner), and its socket fds in no
    /// CLOSE_WAIT dump are kept in [`Snapshot::unknown`].
    pub dead: bool,
}

pub struct Attributor<'a, P: ProcRead, O: Effects> {
    pub proc: &'a P,
    /// With an Os, every walked process is pinned with a pidfd first.
    pub os: Option<&'a O>,
    /// Never attribute to (and so never act on) this pid: cwreap itself.
    pub self_pid: i32,
    /// Every process's socket fds listed at once (the BPF iterator), read instead of each
    /// /proc/PID/fd, checked to be the process pinned ([`host`]).
    pub host: Option<&'a HostFds>,
}

impl<'a, P: ProcRead, O: Effects> Attributor<'a, P, O> {
    pub fn attribute(&self, found: Found, scope: &Scope) -> Snapshot<O::Process> {
        let listeners = found.listeners;
        let mut snap = Snapshot {
            sockets: found
                .close_wait
                .into_iter()
                .map(|diag| {
                    let listener = listener_ref(&diag, &listeners, |_| Vec::new());
                    let direction = Direction::of(&diag, &listeners);
                    Observed::new(diag, Vec::new(), listener, direction)
                })
                .collect(),
            processes: BTreeMap::new(),
            stats: WalkStats::default(),
            unreadable: Vec::new(),
            denied: Vec::new(),
            stalled: Vec::new(),
            unknown: Vec::new(),
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
        // Nothing to attribute; but dead held sockets are looked for all the same (after a
        // reap whose targets keep their fds, they may be all there is).
        if by_inode.is_empty() && !scope.dead {
            return snap;
        }

        if let Some(host) = self.host {
            // Whoever holds a socket in question (any socket, for dead ones), any uid.
            for (&pid, p) in &host.procs {
                let wanted =
                    scope.dead || p.sockets.iter().any(|(_, ino)| by_inode.contains_key(ino));
                if pid != self.self_pid && wanted {
                    let _ = self.walk(pid, scope, &by_inode, &mut snap, false);
                }
            }
            return snap;
        }
        let Ok(all) = self.proc.pids() else {
            return snap;
        };
        if scope.dead && self.os.is_none() {
            self.walk_every(all, scope, &by_inode, &mut snap);
            return snap;
        }
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
                Ok(uid) if scope.dead || uids.contains(&uid) => {
                    if let Ok(holds) = self.walk(pid, scope, &by_inode, &mut snap, false)
                        && holds > 0
                        && !scope.dead
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
            if !scope.dead && !any_unowned(&snap) {
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
        let Some((mut handle, comm)) = self.admit(pid, scope, snap)? else {
            return Ok(0);
        };
        let listed = self
            .host
            .and_then(|host| table_from_host(self.proc, self.os, handle.as_mut(), pid, host));
        let read = match listed {
            Some(r) => r,
            None => read_fds(self.proc, self.os, handle.as_mut(), pid),
        };
        let (table, thread) = match read {
            Ok(t) => t,
            Err(e) => {
                count_failure(snap, pid, &e);
                return Err(e);
            }
        };
        let read = Read {
            table,
            thread,
            handle,
            comm,
        };
        Ok(self.record(pid, read, scope, by_inode, snap, selected))
    }

    /// Every process of `all` (a host-wide walk that looks for dead held sockets, so must
    /// read every table anyway), none pinned: the tables are independent of each other, so
    /// they are read at once ([`ProcRead::fd_tables`]: the real reader uses several
    /// threads), then recorded in pid order as [`Self::walk`] records them.
    fn walk_every(
        &self,
        all: Vec<i32>,
        scope: &Scope,
        by_inode: &HashMap<u64, Vec<Slot>>,
        snap: &mut Snapshot<O::Process>,
    ) {
        let mut admitted = Vec::new();
        for pid in all {
            if pid == self.self_pid {
                continue;
            }
            // A process that exited since the listing fails here or at its table, and is
            // counted as vanished either way.
            if let Ok(Some((_, comm))) = self.admit(pid, scope, snap) {
                admitted.push((pid, comm));
            }
        }
        let pids: Vec<i32> = admitted.iter().map(|&(pid, _)| pid).collect();
        let tables = self.proc.fd_tables(&pids);
        for ((pid, comm), table) in admitted.into_iter().zip(tables) {
            match table.and_then(|t| read_fds_from::<P, O>(self.proc, None, None, pid, t)) {
                Ok((table, thread)) => {
                    let read = Read {
                        table,
                        thread,
                        handle: None,
                        comm,
                    };
                    self.record(pid, read, scope, by_inode, snap, false);
                }
                Err(e) => count_failure(snap, pid, &e),
            }
        }
    }

    /// Whether `pid` is to be read: pinned first when pinning (the name and the fd numbers
    /// read next are then known to be those of the process the pidfd holds, checked alive
    /// once they are read), and accepted by the selector's process criteria. Its pin and,
    /// when the criteria read it, its name; None when the selector refuses it; an error
    /// (counted) when it could not be pinned or read.
    fn admit(
        &self,
        pid: i32,
        scope: &Scope,
        snap: &mut Snapshot<O::Process>,
    ) -> io::Result<Option<Admitted<O::Process>>> {
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
        // The process facts are needed up front only to filter by them; otherwise the name
        // is read once the process turns out to matter (a few syscalls saved per
        // uninteresting process).
        if !scope.selector.has_process_criteria() {
            return Ok(Some((handle, None)));
        }
        let facts = match process_facts(self.proc, pid, scope.selector.needs()) {
            Ok(f) => f,
            Err(e) => {
                count_failure(snap, pid, &e);
                return Err(e);
            }
        };
        let selector = &scope.selector;
        if !selector.process_matches_before_cmdline(&facts, &scope.pids_from_files) {
            return Ok(None);
        }
        let mut facts = facts;
        if selector.needs().cmdline {
            facts.cmdline = match read_cmdline(self.proc, pid) {
                Ok(c) => c,
                Err(e) => {
                    count_failure(snap, pid, &e);
                    return Err(e);
                }
            };
            if !selector.process_matches(&facts, &scope.pids_from_files) {
                return Ok(None);
            }
        }
        Ok(Some((handle, Some(facts.comm))))
    }

    /// Record what one process's fd table holds: the CLOSE_WAIT sockets (and listeners) it
    /// holds, with [`Scope::dead`] its other socket fds; the process itself when it holds
    /// any of them or was `selected`. How many sockets it holds.
    fn record(
        &self,
        pid: i32,
        read: Read<O::Process>,
        scope: &Scope,
        by_inode: &HashMap<u64, Vec<Slot>>,
        snap: &mut Snapshot<O::Process>,
        selected: bool,
    ) -> usize {
        let Read {
            table,
            thread,
            handle,
            comm,
        } = read;
        snap.stats.inspected += 1;
        let mut holds = 0usize;
        let mut unknown = 0usize;
        for &(fd, inode) in &table.sockets {
            let Some(slots) = by_inode.get(&inode) else {
                if scope.dead {
                    snap.unknown.push(SocketFd { pid, fd, inode });
                    unknown += 1;
                }
                continue;
            };
            for slot in slots {
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
        if holds == 0 && unknown == 0 && !selected {
            return 0;
        }
        let comm = match comm {
            Some(c) => c,
            None => self.proc.comm(pid).unwrap_or_default(),
        };
        let uid = self.proc.uid(pid).unwrap_or(u32::MAX);
        let nofile_soft = self.proc.nofile_limits(pid).ok().and_then(|l| l.soft);
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
                thread,
            },
        );
        holds
    }
}

/// A process admitted to be read: its pin (when pinning) and its name (when the selector
/// read it already).
type Admitted<H> = (Option<H>, Option<String>);

/// One process's fd table as read, with what came with it.
struct Read<H> {
    table: FdTable,
    /// The thread it was read through, when the leader's could not show it.
    thread: Option<i32>,
    /// The pin, when pinning.
    handle: Option<H>,
    /// The name, when the selector read it already.
    comm: Option<String>,
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
    if e.kind() == io::ErrorKind::TimedOut {
        snap.stats.stalled += 1;
        snap.stalled.push(pid);
    } else if is_permission(e) {
        snap.stats.denied += 1;
        snap.denied.push(pid);
    } else {
        snap.stats.vanished += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cwreap_linux::kernel::Identity;
    use cwreap_linux::procfs::ProcFs;
    use std::cell::RefCell;
    use std::fs;
    use std::path::Path;

    /// Records which threads were pinned; every process is alive.
    #[derive(Default)]
    struct PinRecorder {
        pinned: RefCell<Vec<(i32, i32)>>,
    }

    impl Effects for PinRecorder {
        type Process = i32;
        type Dup = ();
        fn open_process(&self, pid: i32) -> io::Result<i32> {
            Ok(pid)
        }
        fn pin_thread(&self, process: &mut i32, tid: i32) -> io::Result<()> {
            self.pinned.borrow_mut().push((*process, tid));
            Ok(())
        }
        fn alive(&self, _: &i32) -> bool {
            true
        }
        fn duplicate(&self, _: &i32, _: i32) -> io::Result<()> {
            Ok(())
        }
        fn identify(&self, _: &()) -> io::Result<Identity> {
            Err(io::Error::from_raw_os_error(libc::ENOTSOCK))
        }
        fn shutdown(&self, _: &()) -> io::Result<()> {
            Ok(())
        }
    }

    /// /proc/PID/stat up to num_threads (field 20).
    fn process_stat(pid: i32, state: char, threads: usize) -> String {
        format!("{pid} (srv) {state} 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 {threads} 0 0\n")
    }

    fn task(root: &Path, pid: i32, tid: i32, state: char, sockets: &[(i32, u64)]) {
        let dir = root.join(format!("{pid}/task/{tid}"));
        fs::create_dir_all(dir.join("fd")).expect("mkdir");
        fs::write(dir.join("stat"), format!("{tid} (srv) {state} 1 2 3\n")).expect("stat");
        for (fd, inode) in sockets {
            std::os::unix::fs::symlink(format!("socket:[{inode}]"), dir.join(format!("fd/{fd}")))
                .expect("symlink");
        }
    }

    #[test]
    fn a_process_whose_leader_exited_is_read_and_pinned_through_a_live_thread() {
        let root = std::env::temp_dir().join(format!("cwreap-snapshot-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        // pid 42: the leader is a zombie with an empty fd table; thread 43 is a zombie too,
        // thread 44 lives and shows the process's fds.
        fs::create_dir_all(root.join("42/fd")).expect("mkdir");
        fs::write(root.join("42/stat"), process_stat(42, 'Z', 2)).expect("stat");
        task(&root, 42, 42, 'Z', &[]);
        task(&root, 42, 43, 'Z', &[]);
        task(&root, 42, 44, 'S', &[(5, 777), (7, 778)]);
        // pid 50: an ordinary process; its own table is read and nothing extra is pinned.
        fs::create_dir_all(root.join("50/fd")).expect("mkdir");
        std::os::unix::fs::symlink("socket:[900]", root.join("50/fd/3")).expect("symlink");
        fs::write(root.join("50/stat"), process_stat(50, 'S', 1)).expect("stat");
        task(&root, 50, 50, 'S', &[]);
        // pid 60: a kernel thread, no fds, one thread: nothing else is looked at.
        fs::create_dir_all(root.join("60/fd")).expect("mkdir");
        fs::write(root.join("60/stat"), process_stat(60, 'I', 1)).expect("stat");
        let proc = ProcFs::new(&root);
        let os = PinRecorder::default();

        let mut h = os.open_process(42).expect("open");
        let (table, thread) = read_fds(&proc, Some(&os), Some(&mut h), 42).expect("read");
        assert_eq!(table.sockets, [(5, 777), (7, 778)]);
        assert_eq!(thread, Some(44));
        assert_eq!(
            *os.pinned.borrow(),
            [(42, 44)],
            "pinned before its table was read"
        );
        // Without an Os (scan), the same table, nothing pinned.
        let (table, thread) = read_fds::<_, PinRecorder>(&proc, None, None, 42).expect("read");
        assert_eq!((table.sockets.len(), thread), (2, Some(44)));

        let mut h = os.open_process(50).expect("open");
        let (table, thread) = read_fds(&proc, Some(&os), Some(&mut h), 50).expect("read");
        assert_eq!((table.sockets, thread), (vec![(3, 900)], None));
        let (table, thread) = read_fds::<_, PinRecorder>(&proc, None, None, 60).expect("read");
        assert_eq!((table.open, thread), (0, None));
        assert_eq!(os.pinned.borrow().len(), 1);
        let _ = fs::remove_dir_all(&root);
    }
}
