//! The real [`crate::kernel::Kernel`]: CLOCK_BOOTTIME, sock_diag per network namespace
//! (dumps compared one with the last for the changes), /proc, pidfds, prlimit, SOCK_DESTROY.

use std::io;

use crate::kernel::clock::{Boottime, Clock, SystemClock};
use crate::kernel::discover::{Changes, Diff, Discover, SocketKey};
use crate::kernel::effects::{Destroy, Effects, Identity, Pinned, RealOs};
use crate::kernel::procs::ProcRead;
use std::collections::HashSet;

use crate::kernel::effects::SocketFacts;
use crate::kernel::events::{EventFeed, pin_dir};
use crate::kernel::fds::{HostFds, ListFds, from_iterator};
use crate::netlink::{DiagSocket, DumpError, Listed};
use crate::netns::{Found, Namespaces};
use crate::procfs::{FdFiles, FdTable, JvmGc, Limits, ProcFs, RuntimeClues};
use crate::published::Published;

/// The system as it is: every call goes to the kernel.
#[derive(Default)]
pub struct Linux {
    proc: ProcFs,
    os: RealOs,
    clock: SystemClock,
    /// One sock_diag socket per watched network namespace, for dumps, lookups and
    /// SOCK_DESTROY.
    namespaces: Namespaces,
    diff: Diff,
    /// Read the running daemon's published first sights at each snapshot (the command
    /// line does; the daemon keeps its own).
    read_published: bool,
    published: Option<Published>,
    /// Why the published ages were not used, when a daemon seems to have published some.
    published_note: Option<String>,
    /// The daemon's event source, when loaded ([`Linux::enable_events`]).
    events: Option<EventFeed>,
    /// The command line: the running daemon's exact entry times (its pinned map), while it
    /// is alive and beating; none with `--no-bpf`.
    pinned: Option<crate::bpf::PinnedAges>,
    /// Why the pinned entry times were not used, when a daemon seems to have pinned some.
    pinned_note: Option<String>,
    no_bpf: bool,
    /// The command line's own socket iterator, loaded at the first host-wide listing (the
    /// daemon uses the one loaded with its events).
    iter: IterState,
}

/// Whether the command line's socket iterator is loaded.
#[derive(Default)]
enum IterState {
    #[default]
    Untried,
    Ready(Box<crate::bpf::SocketIter>),
    /// The daemon's: loaded with its events.
    Events,
    /// Not loadable, and worth saying why.
    Unavailable(String),
    /// Loaded, but its last pass failed, with why (the next call tries again).
    Failed(String),
    /// Not loadable, as expected (an unprivileged user).
    Quiet(String),
}

impl Linux {
    /// Reading processes under `proc` (normally /proc).
    pub fn with_proc(proc: ProcFs) -> Self {
        Linux {
            proc,
            ..Linux::default()
        }
    }

    /// The system as the command line sees it: also reading what the running daemon
    /// publishes.
    pub fn for_cli() -> Self {
        Linux {
            read_published: true,
            ..Linux::default()
        }
    }

    /// [`Linux::for_cli`] that never touches BPF (`--no-bpf`): no pinned entry times.
    pub fn for_cli_without_bpf() -> Self {
        Linux {
            no_bpf: true,
            ..Linux::for_cli()
        }
    }

    /// Why the running daemon's published ages were not used, if some were found.
    pub fn published_note(&self) -> Option<&str> {
        self.published_note.as_deref()
    }

    /// Why the running daemon's exact entry times (its pins) were not used, if it seems to
    /// have pinned some.
    pub fn pinned_note(&self) -> Option<&str> {
        self.pinned_note.as_deref()
    }

    /// Why the socket iterator was not used for attribution, when it was wanted (not with
    /// `--no-bpf`) and its absence is not just a user without the privileges to load it.
    pub fn attribution_note(&self) -> Option<&str> {
        match &self.iter {
            _ if self.no_bpf => None,
            IterState::Unavailable(why) | IterState::Failed(why) => Some(why.as_str()),
            _ => None,
        }
    }

    /// Whether the running daemon's exact entry times are used.
    pub fn uses_pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// Find sockets from the kernel's events from now on (the daemon, `discovery: events`
    /// or `auto`): load and attach the BPF programs. Why not, when they cannot be.
    pub fn enable_events(
        &mut self,
        opts: &crate::bpf::Options,
    ) -> Result<(), crate::bpf::Unavailable> {
        self.events = Some(EventFeed::load(opts)?);
        Ok(())
    }

    /// The event source, when loaded.
    pub fn events(&self) -> Option<&EventFeed> {
        self.events.as_ref()
    }

    /// The sock_diag sockets, for what only they can do (proving SOCK_DESTROY works).
    pub fn namespaces(&mut self) -> &mut Namespaces {
        &mut self.namespaces
    }

    /// The /proc reader.
    pub fn proc(&self) -> &ProcFs {
        &self.proc
    }
}

impl Linux {
    /// Open the running daemon's pinned entry times, if it pinned some and vouches for
    /// them now (alive, beating within the staleness its published ages allow).
    fn open_pins(&mut self) {
        let staleness = self.published.as_ref().map_or(PIN_STALENESS, |p| {
            crate::published::staleness(p.header.interval)
        });
        match crate::bpf::PinnedAges::open(&pin_dir(), staleness) {
            Ok(p) => {
                self.pinned = Some(p);
                self.pinned_note = None;
            }
            Err(crate::bpf::NotExact::NoPin { .. }) => self.pinned = None,
            Err(e) => {
                self.pinned = None;
                self.pinned_note = Some(e.to_string());
            }
        }
    }
}

/// How old the pinned heartbeat may be when the daemon published no interval.
const PIN_STALENESS: std::time::Duration = std::time::Duration::from_secs(120);

impl Clock for Linux {
    fn now(&self) -> Boottime {
        self.clock.now()
    }
}

impl Discover for Linux {
    fn cover(&mut self, pids: &[i32], own: bool) {
        self.namespaces.cover(&self.proc, pids, own);
        let mut live: std::collections::HashSet<u64> = pids
            .iter()
            .filter_map(|&p| ProcRead::netns(&self.proc, p).ok())
            .collect();
        if own
            && let Ok(ino) = crate::netlink::netns_inode(std::path::Path::new("/proc/self/ns/net"))
        {
            live.insert(ino);
        }
        self.namespaces.retain(|ino| live.contains(&ino));
    }

    fn snapshot(&mut self, all_listeners: bool) -> Result<Found, DumpError> {
        if let Some(ev) = self.events.as_mut() {
            ev.before_dump();
        }
        let found = if all_listeners {
            self.namespaces.dump_with_listeners()
        } else {
            self.namespaces.dump()
        }?;
        self.diff.reset(&found);
        if let Some(ev) = self.events.as_mut() {
            ev.reset(&found);
        }
        if self.read_published {
            match crate::published::read(&crate::published::run_dir(), &self.proc, self.now()) {
                Ok(p) => {
                    self.published = Some(p);
                    self.published_note = None;
                }
                Err(crate::published::Unusable::Missing(_)) => self.published = None,
                Err(e) => {
                    self.published = None;
                    self.published_note = Some(e.to_string());
                }
            }
            if !self.no_bpf {
                self.open_pins();
            }
        }
        Ok(found)
    }

    fn changes(&mut self) -> Result<Changes, DumpError> {
        if let Some(ev) = self.events.as_mut() {
            return ev.changes(&mut self.namespaces);
        }
        let found = self.namespaces.dump()?;
        Ok(self.diff.next(found))
    }

    fn entered_at(&self, key: SocketKey) -> Option<Boottime> {
        if let Some(ev) = &self.events {
            return ev.entered_at(key);
        }
        let ns = self.pinned.as_ref()?.entered(key.1).ok()??;
        Some(Boottime::from_nanos(ns))
    }

    fn mode(&self) -> &'static str {
        if self.events.is_some() {
            "events"
        } else {
            "poll"
        }
    }

    fn event_counts(&self) -> Option<crate::kernel::EventCounts> {
        self.events.as_ref().map(|e| crate::kernel::EventCounts {
            lost: e.lost(),
            reconciles: e.reconciles,
        })
    }

    fn cycle_done(&mut self) {
        if let Some(ev) = self.events.as_mut() {
            // A failed beat only makes readers fall back; the next cycle beats again.
            let _ = ev.heartbeat();
        }
    }

    fn first_seen(&self, key: SocketKey) -> Option<Boottime> {
        self.published.as_ref()?.first_seen.get(&key).copied()
    }

    fn take_failures(&mut self) -> Vec<(u64, String)> {
        std::mem::take(&mut self.namespaces.failures)
    }

    fn live_inodes(&mut self, listed: Listed) -> Result<HashSet<u64>, DumpError> {
        self.namespaces.live_inodes(listed)
    }
}

/// Every process's socket fds from the BPF iterator: the one loaded with the events (the
/// daemon), else one loaded for the purpose at the first call (the command line). Never with
/// `--no-bpf`, nor where the iterator's pids or start times are not those this process's
/// /proc shows ([`crate::kernel::fds::iterator_view_differs`]).
impl ListFds for Linux {
    fn host_fds(&mut self) -> Result<HostFds, String> {
        if self.no_bpf {
            return Err("--no-bpf".to_string());
        }
        if let IterState::Untried = self.iter {
            self.iter = match crate::kernel::fds::iterator_view_differs() {
                Some(why) => IterState::Unavailable(why),
                None if self.events.is_some() => IterState::Events,
                None => match crate::bpf::SocketIter::load() {
                    Ok(i) => IterState::Ready(Box::new(i)),
                    // Unprivileged: /proc is the way, and no news.
                    Err(crate::bpf::Unavailable::MissingCapabilities { .. }) => {
                        IterState::Quiet("no privileges to load BPF programs".to_string())
                    }
                    Err(e) => IterState::Unavailable(e.to_string()),
                },
            };
        }
        let pass = match (&mut self.iter, self.events.as_mut()) {
            (IterState::Unavailable(why) | IterState::Quiet(why), _) => return Err(why.clone()),
            (IterState::Events, Some(ev)) => ev.task_fds(),
            (IterState::Ready(i), _) => i.pass().map_err(|e| e.to_string()),
            _ => Err("the socket iterator is not loaded".to_string()),
        };
        let fds = match pass {
            Ok(fds) => fds,
            Err(why) => {
                // Said once by the command line; a daemon's next listing tries again.
                if !matches!(self.iter, IterState::Events) {
                    self.iter = IterState::Failed(why.clone());
                }
                return Err(why);
            }
        };
        Ok(from_iterator(fds))
    }
}

impl ProcRead for Linux {
    fn pids(&self) -> io::Result<Vec<i32>> {
        ProcRead::pids(&self.proc)
    }
    fn comm(&self, pid: i32) -> io::Result<String> {
        ProcRead::comm(&self.proc, pid)
    }
    fn uid(&self, pid: i32) -> io::Result<u32> {
        ProcRead::uid(&self.proc, pid)
    }
    fn exe(&self, pid: i32) -> io::Result<String> {
        ProcRead::exe(&self.proc, pid)
    }
    fn cmdline(&self, pid: i32) -> io::Result<String> {
        self.proc
            .cmdline_within(&crate::procfs::SlowReads::global(), pid)
    }
    fn cgroup(&self, pid: i32) -> io::Result<String> {
        ProcRead::cgroup(&self.proc, pid)
    }
    fn fd_table(&self, pid: i32) -> io::Result<FdTable> {
        ProcRead::fd_table(&self.proc, pid)
    }
    fn fd_tables(&self, pids: &[i32]) -> Vec<io::Result<FdTable>> {
        ProcRead::fd_tables(&self.proc, pids)
    }
    fn task_fd_table(&self, pid: i32, tid: i32) -> io::Result<FdTable> {
        ProcRead::task_fd_table(&self.proc, pid, tid)
    }
    fn thread_for_empty_table(&self, pid: i32) -> Option<i32> {
        ProcRead::thread_for_empty_table(&self.proc, pid)
    }
    fn fd_files(&self, pid: i32, via: Option<i32>) -> io::Result<FdFiles> {
        ProcRead::fd_files(&self.proc, pid, via)
    }
    fn task_exists(&self, pid: i32, tid: i32) -> bool {
        ProcRead::task_exists(&self.proc, pid, tid)
    }
    fn fd_count(&self, pid: i32, via: Option<i32>) -> io::Result<usize> {
        ProcRead::fd_count(&self.proc, pid, via)
    }
    fn fd_socket_inode(&self, pid: i32, fd: i32) -> io::Result<Option<u64>> {
        ProcRead::fd_socket_inode(&self.proc, pid, fd)
    }
    fn socket_protocol(&self, pid: i32, fd: i32) -> io::Result<String> {
        ProcRead::socket_protocol(&self.proc, pid, fd)
    }
    fn nofile_limits(&self, pid: i32) -> io::Result<Limits> {
        ProcRead::nofile_limits(&self.proc, pid)
    }
    fn start_time(&self, pid: i32) -> io::Result<u64> {
        ProcRead::start_time(&self.proc, pid)
    }
    fn netns(&self, pid: i32) -> io::Result<u64> {
        ProcRead::netns(&self.proc, pid)
    }
    fn epoll_watched(&self, pid: i32, epoll_fds: &[i32]) -> io::Result<Vec<u64>> {
        ProcRead::epoll_watched(&self.proc, pid, epoll_fds)
    }
    fn runtime_clues(&self, pid: i32) -> io::Result<RuntimeClues> {
        self.proc
            .runtime_clues_within(&crate::procfs::SlowReads::global(), pid)
    }
    fn jvm_gc(&self, pid: i32) -> io::Result<Option<JvmGc>> {
        self.proc
            .jvm_gc_within(&crate::procfs::SlowReads::global(), pid)
    }
}

impl Effects for Linux {
    type Process = Pinned;
    type Dup = std::os::fd::OwnedFd;

    fn open_process(&self, pid: i32) -> io::Result<Pinned> {
        self.os.open_process(pid)
    }
    fn pin_thread(&self, process: &mut Pinned, tid: i32) -> io::Result<()> {
        self.os.pin_thread(process, tid)
    }
    fn alive(&self, process: &Pinned) -> bool {
        self.os.alive(process)
    }
    fn duplicate(&self, process: &Pinned, fd: i32) -> io::Result<Self::Dup> {
        self.os.duplicate(process, fd)
    }
    fn identify(&self, dup: &Self::Dup) -> io::Result<Identity> {
        self.os.identify(dup)
    }
    fn shutdown(&self, dup: &Self::Dup) -> io::Result<()> {
        self.os.shutdown(dup)
    }
    fn inspect(&self, dup: &Self::Dup) -> io::Result<SocketFacts> {
        self.os.inspect(dup)
    }
    fn signal(&self, process: &Pinned, signal: i32) -> io::Result<()> {
        self.os.signal(process, signal)
    }
    fn raise_nofile_soft(
        &self,
        pid: i32,
        soft: u64,
        expected: Limits,
    ) -> io::Result<crate::kernel::NofileRaise> {
        self.os.raise_nofile_soft(pid, soft, expected)
    }
}

impl Destroy for Linux {
    fn lookup(&mut self, s: &DiagSocket) -> io::Result<Option<DiagSocket>> {
        self.namespaces.lookup(s)
    }
    fn destroy(&mut self, s: &DiagSocket) -> io::Result<()> {
        self.namespaces.destroy(s)
    }
    fn prove_destroy(&mut self, netns: u64) -> io::Result<()> {
        self.namespaces.prove_destroy(netns)
    }
}
