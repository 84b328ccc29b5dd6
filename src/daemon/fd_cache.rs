//! The daemon's attribution cache: every socket fd of every target process, kept between
//! cycles, so a steady-state cycle reads no fd table at all.
//!
//! A target whose thread-group leader has exited is read, and counted, through the live
//! thread its entry was read through (see [`crate::shared::attribute::read_fds`]); when that thread
//! goes too, the count fails and the table is read again through another.
//!
//! Polling: a target's fd table is read again only when the process is new, when its
//! number of open fds changed (the size of /proc/PID/fd, one stat), and on every
//! `FULL_EVERY`-th cycle as a backstop.
//!
//! Events (discovery from the kernel's events, [`FdIndex::refresh_listed`]): the fd tables
//! come from one pass of the BPF socket iterator over every process, and only
//! - at start and at each reconciliation (every 10 minutes, and after an event loss),
//! - when a socket entered CLOSE_WAIT that no known fd holds (and was not already found
//!   unowned), or a new target process appeared.
//!
//! Between those, a cycle reads no fd table and runs no pass: it uses what is cached, and
//! only counts each target's open fds (one stat each). Where the iterator cannot be used,
//! the polling rules apply.
//!
//! Each read pins the process with a pidfd first; a table from the iterator is used only
//! once the pinned process's start time is the one the pass saw (see
//! [`crate::shared::attribute::table_from_host`]), and the process is checked still alive
//! after. The cache only decides what to try: every action re-verifies the socket through
//! that pidfd (inode, cookie, TCP state), so a stale entry can cost a skip, never a wrong
//! shutdown.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::shared::attribute::{
    Direction, Holder, Observed, Process, Snapshot, SocketFd, WalkStats, listener_ref, read_fds,
    table_from_host,
};
use cwreap_linux::kernel::ProcRead;
use cwreap_linux::kernel::{Effects, HostFds, ListFds};
use cwreap_linux::netns::Found;

/// Re-read every target's fd table this often (in cycles), whatever the counts say.
pub const FULL_EVERY: u32 = 10;

struct Entry<P> {
    /// None while lent to a cycle's snapshot.
    process: Option<Process<Arc<P>>>,
    sockets: Vec<(i32, u64)>,
    fd_count: usize,
    /// The live thread the table was read through (the leader has exited).
    via: Option<i32>,
}

/// Open fds of `pid`, counted where its table was read: the process, or thread `thread`.
fn fd_count(proc: &impl ProcRead, pid: i32, thread: Option<i32>) -> Option<usize> {
    proc.fd_count(pid, thread).ok()
}

/// The cache, for processes pinned as `P`.
pub struct FdIndex<P> {
    entries: HashMap<i32, Entry<P>>,
    by_inode: HashMap<u64, Vec<Holder>>,
    cycles: u32,
    /// Why the socket iterator could not be used, once said.
    unlisted: Option<String>,
    /// Passes of the socket iterator run.
    pub listings: u64,
}

impl<P> Default for FdIndex<P> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            by_inode: HashMap::new(),
            cycles: 0,
            unlisted: None,
            listings: 0,
        }
    }
}

/// What a refresh did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refresh {
    pub walked: usize,
    pub stats: WalkStats,
    /// Every target's fd table was read.
    pub full: bool,
}

impl<P> FdIndex<P> {
    /// Bring the index up to date for exactly `pids` (the current targets).
    pub fn refresh<O: Effects<Process = P>>(
        &mut self,
        proc: &impl ProcRead,
        os: &O,
        pids: &[i32],
    ) -> Refresh {
        let full = self.cycles.is_multiple_of(FULL_EVERY);
        self.cycles = self.cycles.wrapping_add(1);
        let how = if full { Reread::All } else { Reread::Changed };
        self.update(proc, os, pids, how)
    }

    /// Read every target's fd table again now, whatever the counts say: a target that
    /// closed an fd and got the number back for a new socket keeps its count, and the
    /// cache would miss the new socket until the next full refresh.
    pub fn reread<O: Effects<Process = P>>(
        &mut self,
        proc: &impl ProcRead,
        os: &O,
        pids: &[i32],
    ) -> Refresh {
        self.update(proc, os, pids, Reread::All)
    }

    /// Events mode: bring the index up to date from the socket iterator when due (`due`:
    /// at start and each reconciliation; or a target not in the index; or a socket of
    /// `found` that no known fd holds and not in `unowned`, once the tables whose count
    /// changed were read and did not hold it), else keep it and count open fds only. None
    /// when the iterator cannot be used (said once): refresh as when polling.
    pub fn refresh_listed<K: ListFds + ProcRead + Effects<Process = P>>(
        &mut self,
        k: &mut K,
        pids: &[i32],
        found: &cwreap_linux::netns::Found,
        unowned: &HashSet<u64>,
        due: bool,
    ) -> Option<Refresh> {
        if self.unlisted.is_some() {
            return None;
        }
        let due = due || pids.iter().any(|p| !self.entries.contains_key(p));
        let strangers = |me: &Self, also_unowned: bool| {
            found.close_wait.iter().any(|s| {
                s.inode != 0 && !me.knows(s.inode) && (also_unowned || !unowned.contains(&s.inode))
            })
        };
        if !due && !strangers(self, true) {
            return Some(self.update(&*k, &*k, pids, Reread::None));
        }
        if !due {
            // A socket no known fd holds: most often a target's new fd (or one it accepted
            // since it was seen unowned in the accept queue), found by reading only the
            // tables whose count changed; the whole host's listing only for a new one that
            // does not find.
            let changed = self.update(&*k, &*k, pids, Reread::Changed);
            if !strangers(self, false) {
                return Some(changed);
            }
        }
        match k.host_fds() {
            Ok(host) => {
                self.listings += 1;
                Some(self.update(&*k, &*k, pids, Reread::Listed(&host)))
            }
            Err(why) => {
                tracing::warn!(reason = %why,
                    "the BPF socket iterator cannot be used; fd tables are read from /proc");
                self.unlisted = Some(why);
                None
            }
        }
    }

    /// The uids of the targets in the index.
    pub fn uids(&self) -> HashSet<u32> {
        self.entries
            .values()
            .filter_map(|e| e.process.as_ref().map(|p| p.uid))
            .collect()
    }

    /// Whether the fd table of `pid` is in the index.
    pub fn indexed(&self, pid: i32) -> bool {
        self.entries.contains_key(&pid)
    }

    /// Whether some target holds the socket with this inode, as far as the index knows.
    pub fn knows(&self, inode: u64) -> bool {
        self.by_inode.contains_key(&inode)
    }

    /// The target fds that hold the socket with this inode, as far as the index knows.
    pub fn holders(&self, inode: u64) -> &[Holder] {
        self.by_inode.get(&inode).map_or(&[], Vec::as_slice)
    }

    /// Every socket fd of every target, as (pid, fd, inode).
    pub fn socket_fds_all(&self) -> Vec<SocketFd> {
        let mut out: Vec<SocketFd> = self
            .entries
            .iter()
            .flat_map(|(&pid, e)| {
                e.sockets
                    .iter()
                    .map(move |&(fd, inode)| SocketFd { pid, fd, inode })
            })
            .collect();
        out.sort_unstable();
        out
    }

    fn update<O: Effects<Process = P>>(
        &mut self,
        proc: &impl ProcRead,
        os: &O,
        pids: &[i32],
        how: Reread,
    ) -> Refresh {
        let full = matches!(how, Reread::All | Reread::Listed(_));
        let mut out = Refresh {
            full,
            ..Refresh::default()
        };
        let before = self.entries.len();
        self.entries.retain(|pid, _| pids.contains(pid));
        let mut changed = self.entries.len() != before;
        for &pid in pids {
            let known = self.entries.get(&pid);
            // Kept as they are between listings: no count is needed.
            if known.is_some() && matches!(how, Reread::None) {
                continue;
            }
            let thread = known.and_then(|e| e.via);
            let count = fd_count(proc, pid, thread);
            let same = known.is_some_and(|e| count.is_some_and(|c| c == e.fd_count));
            if same && matches!(how, Reread::Changed) {
                continue;
            }
            changed = true;
            out.walked += 1;
            let host = match how {
                Reread::Listed(h) => Some(h),
                _ => None,
            };
            match read_pinned(proc, os, pid, host) {
                Ok((process, sockets)) => {
                    // Compare like with like next time: the stat count taken before the
                    // walk (it can differ from the number of entries read by one or two),
                    // as long as it was taken where the table was read.
                    let via = process.thread;
                    let fd_count = count.filter(|_| via == thread).unwrap_or(process.open_fds);
                    self.entries.insert(
                        pid,
                        Entry {
                            process: Some(process),
                            sockets,
                            fd_count,
                            via,
                        },
                    );
                    out.stats.inspected += 1;
                }
                Err(e) => {
                    self.entries.remove(&pid);
                    if crate::shared::attribute::is_permission(&e) {
                        out.stats.denied += 1;
                    } else {
                        out.stats.vanished += 1;
                    }
                }
            }
        }
        if changed {
            self.by_inode.clear();
            for (&pid, e) in &self.entries {
                for &(fd, inode) in &e.sockets {
                    self.by_inode
                        .entry(inode)
                        .or_default()
                        .push(Holder { pid, fd });
                }
            }
            for v in self.by_inode.values_mut() {
                v.sort_unstable();
            }
        }
        // Open-fd counts move all the time; keep them fresh without re-reading tables.
        for (&pid, e) in self.entries.iter_mut() {
            if let (Some(p), Some(n)) = (e.process.as_mut(), fd_count(proc, pid, e.via)) {
                p.open_fds = n;
            }
        }
        out
    }

    /// This cycle's snapshot: the dumped sockets with their holders among the targets. The
    /// processes (and their pidfds) are lent to it; hand them back with [`Self::restore`].
    pub fn snapshot(&mut self, found: Found) -> Snapshot<Arc<P>> {
        let listeners = found.listeners;
        let holders_of = |inode: u64| self.by_inode.get(&inode).cloned().unwrap_or_default();
        let sockets = found
            .close_wait
            .into_iter()
            .map(|diag| {
                let listener = listener_ref(&diag, &listeners, holders_of);
                let holders = if diag.inode == 0 {
                    Vec::new()
                } else {
                    holders_of(diag.inode)
                };
                // The daemon dumps listeners only where connections wait in an accept
                // queue, so this is a lower bound of the server ends; nothing acts on it.
                let direction = Direction::of(&diag, &listeners);
                Observed::new(diag, holders, listener, direction)
            })
            .collect();
        let processes: BTreeMap<i32, Process<Arc<P>>> = self
            .entries
            .iter_mut()
            .filter_map(|(pid, e)| e.process.take().map(|p| (*pid, p)))
            .collect();
        Snapshot {
            sockets,
            processes,
            stats: WalkStats::default(),
            unreadable: Vec::new(),
            denied: Vec::new(),
            stalled: Vec::new(),
            unknown: Vec::new(),
        }
    }

    pub fn restore(&mut self, processes: BTreeMap<i32, Process<Arc<P>>>) {
        for (pid, p) in processes {
            if let Some(e) = self.entries.get_mut(&pid) {
                e.process = Some(p);
            }
        }
    }

    /// Socket fds known across all targets (for memory accounting and tests).
    pub fn socket_fds(&self) -> usize {
        self.entries.values().map(|e| e.sockets.len()).sum()
    }
}

/// Which fd tables [`FdIndex::update`] reads again (new targets are always read).
#[derive(Clone, Copy)]
enum Reread<'h> {
    /// None: events mode between listings.
    None,
    /// Those whose open-fd count changed.
    Changed,
    /// Every target's, from /proc.
    All,
    /// Every target's, from this listing (checked per process; /proc for one it cannot
    /// vouch for).
    Listed(&'h HostFds),
}

/// A process read under its pidfd, with its socket fds (fd, inode).
type ReadProcess<P> = (Process<Arc<P>>, Vec<(i32, u64)>);

/// Pin `pid` with a pidfd, then read its name and fd table (from `host` when it vouches for
/// the process pinned), and check it is still the same process.
fn read_pinned<O: Effects>(
    proc: &impl ProcRead,
    os: &O,
    pid: i32,
    host: Option<&HostFds>,
) -> std::io::Result<ReadProcess<O::Process>> {
    let mut handle = os.open_process(pid)?;
    let comm = proc.comm(pid)?;
    let listed = host.and_then(|h| table_from_host(proc, Some(os), Some(&mut handle), pid, h));
    let (table, thread) = match listed {
        Some(read) => read?,
        None => read_fds(proc, Some(os), Some(&mut handle), pid)?,
    };
    let process = Process {
        pid,
        comm,
        uid: proc.uid(pid).unwrap_or(u32::MAX),
        open_fds: table.open,
        nofile_soft: proc.nofile_limits(pid).ok().and_then(|l| l.soft),
        epoll_fds: table.epoll,
        handle: Some(Arc::new(handle)),
        thread,
    };
    Ok((process, table.sockets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cwreap_linux::kernel::Discover;
    use cwreap_linux::kernel::SocketKey;
    use cwreap_linux::kernel::fake::{Call, FakeKernel, FakePin, Process};

    fn count(k: &FakeKernel, f: impl Fn(&Call) -> bool) -> (usize, usize) {
        let calls = k.calls();
        let reads = calls
            .iter()
            .filter(|c| matches!(c, Call::FdTable { .. }))
            .count();
        (calls.iter().filter(|c| f(c)).count(), reads)
    }

    fn listings_and_reads(k: &FakeKernel) -> (usize, usize) {
        count(k, |c| *c == Call::HostFds)
    }

    fn inode(k: &FakeKernel, key: SocketKey) -> u64 {
        k.with(|w| w.sockets[&key].diag.inode)
    }

    #[test]
    fn with_events_the_iterator_lists_only_when_due_and_a_stale_record_is_read_from_proc() {
        let mut k = FakeKernel::new();
        k.spawn(Process::new(10, "api"));
        k.spawn(Process::new(20, "worker"));
        k.spawn(Process::new(30, "other"));
        let a = k.close_wait(10, 5, "10.0.0.1:80", "10.0.0.2:5000");
        // The worker holds a socket too, so the listing has it (a process it does not have
        // is read from /proc: the listing has no start time of it to check).
        k.other_socket(20, 4, false);
        k.with(|w| w.listing = true);
        k.cover(&[10, 20, 30], false);
        let mut idx: FdIndex<FakePin> = FdIndex::default();
        let mut unowned = HashSet::new();
        let refresh = |idx: &mut FdIndex<FakePin>,
                       k: &mut FakeKernel,
                       pids: &[i32],
                       due: bool,
                       unowned: &HashSet<u64>| {
            k.clear_calls();
            let found = k.snapshot(false).expect("dump");
            k.clear_calls();
            idx.refresh_listed(k, pids, &found, unowned, due)
                .expect("the listing is used");
            (listings_and_reads(k), idx.holders(inode(k, a)).to_vec())
        };
        let holder = |fd| vec![Holder { pid: 10, fd }];

        // At start (a snapshot): one pass, no fd table read.
        assert_eq!(
            refresh(&mut idx, &mut k, &[10], true, &unowned),
            ((1, 0), holder(5))
        );
        // Nothing new: neither.
        assert_eq!(refresh(&mut idx, &mut k, &[10], false, &unowned).0, (0, 0));
        // A CLOSE_WAIT socket no known fd holds, on a new fd: the one table whose count
        // changed is read, and holds it; no pass.
        let b = k.close_wait(10, 6, "10.0.0.1:80", "10.0.0.3:5000");
        assert_eq!(refresh(&mut idx, &mut k, &[10], false, &unowned).0, (0, 1));
        assert_eq!(idx.holders(inode(&k, b)), holder(6));
        // The same fd number closed and taken again by a new socket: the count did not
        // change, no table is read, and the pass finds it.
        k.close_fd(10, 6);
        let b2 = k.close_wait(10, 6, "10.0.0.1:80", "10.0.0.5:5000");
        assert_eq!(refresh(&mut idx, &mut k, &[10], false, &unowned).0, (1, 0));
        assert_eq!(idx.holders(inode(&k, b2)), holder(6));
        // A socket of a process outside the targets: one pass, then it is known unowned.
        let c = k.close_wait(30, 3, "10.0.0.1:81", "10.0.0.4:5000");
        assert_eq!(refresh(&mut idx, &mut k, &[10], false, &unowned).0, (1, 0));
        assert!(!idx.knows(inode(&k, c)));
        unowned.insert(inode(&k, c));
        assert_eq!(refresh(&mut idx, &mut k, &[10], false, &unowned).0, (0, 0));
        // A new target process: a pass.
        assert_eq!(
            refresh(&mut idx, &mut k, &[10, 20], false, &unowned).0,
            (1, 0)
        );
        assert_eq!(
            refresh(&mut idx, &mut k, &[10, 20], false, &unowned).0,
            (0, 0)
        );
        // A record whose start time is not the process's now (its pid was reused since the
        // pass): that process's table is read from /proc instead, the others' are not.
        k.with(|w| w.listing_stale.insert(10));
        assert_eq!(
            refresh(&mut idx, &mut k, &[10, 20], true, &unowned),
            ((1, 1), holder(5))
        );

        // No listing to be had: None, so the caller refreshes as when polling; said once.
        k.with(|w| w.listing = false);
        let mut idx: FdIndex<FakePin> = FdIndex::default();
        let found = k.snapshot(false).expect("dump");
        assert!(
            idx.refresh_listed(&mut k, &[10], &found, &unowned, true)
                .is_none()
        );
        k.clear_calls();
        assert!(
            idx.refresh_listed(&mut k, &[10], &found, &unowned, true)
                .is_none()
        );
        assert_eq!(listings_and_reads(&k), (0, 0), "not tried again");
    }
}
