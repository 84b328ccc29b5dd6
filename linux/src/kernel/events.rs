//! Discovery from the kernel's own events: the BPF programs of [`crate::bpf::Events`] report
//! each TCP socket entering and leaving CLOSE_WAIT and each socket's end, with the time it
//! happened. Between two full dumps (the snapshot at start, and a reconciliation now and
//! then or after any loss), a cycle reads only the events that came since: no dump, and a
//! sock_diag lookup of the exact socket for each one that entered (its inode, queues and
//! tcp_info).
//!
//! Ages are exact for every socket that entered CLOSE_WAIT while the programs were
//! attached: the entry time is the kernel's, on CLOCK_BOOTTIME. A socket that entered
//! before has none, and keeps the estimates of polling.

use std::collections::{HashMap, HashSet};

use crate::bpf::{Event, Events, Options, Unavailable};
use crate::kernel::clock::Boottime;
use crate::kernel::discover::{Changes, SocketKey, key_of};
use crate::netlink::{DiagSocket, DumpError};
use crate::netns::{Found, Namespaces};
use crate::tcp;

/// Where the daemon pins its entry times and the command line reads them:
/// `$CWREAP_BPF_DIR` when set and absolute, else [`crate::bpf::DEFAULT_PIN_DIR`].
pub fn pin_dir() -> std::path::PathBuf {
    std::env::var_os("CWREAP_BPF_DIR")
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| std::path::PathBuf::from(crate::bpf::DEFAULT_PIN_DIR))
}

/// Make sure `dir` can hold pins: its parent (or itself) is a BPF filesystem. The daemon
/// mounts one only where systemd would have at boot: as root, outside systemd, on the
/// default place's parent (/sys/fs/bpf) with nothing mounted there. Why not, otherwise;
/// Ok(true) when it mounted one.
pub fn prepare_pins(dir: &std::path::Path) -> Result<bool, String> {
    let Some(parent) = dir.parent() else {
        return Err(format!("{} has no parent directory", dir.display()));
    };
    if crate::bpf::is_bpffs(parent).unwrap_or(false) || crate::bpf::is_bpffs(dir).unwrap_or(false) {
        return Ok(false);
    }
    let under_systemd = std::env::var_os("INVOCATION_ID").is_some();
    let default = dir == std::path::Path::new(crate::bpf::DEFAULT_PIN_DIR);
    if !default || !rustix::process::geteuid().is_root() || under_systemd {
        let hint = if under_systemd {
            " (the events.conf drop-in provides it)"
        } else {
            ""
        };
        return Err(format!(
            "{} is not on a BPF filesystem{hint}",
            parent.display()
        ));
    }
    crate::bpf::mount_bpffs(parent)
        .map_err(|e| format!("mounting a BPF filesystem on {}: {e}", parent.display()))?;
    Ok(true)
}

/// A thread that says when events are queued ([`EventFeed::watch_ready`]): it calls its
/// callback once the ring buffer is readable, then waits to be [`ReadyWatch::rearm`]ed (the
/// events read) before it looks again, so one batch of events is said once. Dropping it
/// stops the thread within half a second.
pub struct ReadyWatch {
    shared: std::sync::Arc<(std::sync::Mutex<WatchState>, std::sync::Condvar)>,
}

#[derive(Default)]
struct WatchState {
    armed: bool,
    stop: bool,
}

impl ReadyWatch {
    /// The events said were read: look again.
    pub fn rearm(&self) {
        let (lock, cv) = &*self.shared;
        if let Ok(mut st) = lock.lock() {
            st.armed = true;
            cv.notify_one();
        }
    }
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        if let Ok(mut st) = lock.lock() {
            st.stop = true;
            cv.notify_one();
        }
    }
}

/// The event source, and what it knows of the sockets it reported.
pub struct EventFeed {
    events: Events,
    /// The CLOSE_WAIT sockets now, as last read.
    tracked: HashMap<SocketKey, DiagSocket>,
    /// Socket cookie → network namespace, for the sockets seen in CLOSE_WAIT and not yet
    /// destroyed (left and destroyed events name only the cookie).
    netns_of: HashMap<u64, u64>,
    /// Entry times by cookie (CLOCK_BOOTTIME ns): from the events, and for the sockets of a
    /// snapshot, from the programs' map.
    entered: HashMap<u64, u64>,
    /// The LISTEN sockets of the last dump.
    listeners: Vec<DiagSocket>,
    /// Events lost when the ring buffer was full, as last read.
    lost: u64,
    /// Full dumps done to catch up (after a loss, or a socket the events could not place).
    pub reconciles: u64,
    /// The loss count read just before the dump [`Self::reset`] is given.
    lost_before_dump: Option<u64>,
    buf: Vec<Event>,
}

impl std::fmt::Debug for EventFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFeed")
            .field("tracked", &self.tracked.len())
            .field("lost", &self.lost)
            .field("reconciles", &self.reconciles)
            .finish_non_exhaustive()
    }
}

/// The most sockets whose namespace is remembered past CLOSE_WAIT (for their end events);
/// past it the memory starts over, and a missed end is caught by the next reconciliation.
const MAX_REMEMBERED: usize = 1 << 20;

impl EventFeed {
    /// Load and attach the programs.
    pub fn load(opts: &Options) -> Result<EventFeed, Unavailable> {
        let events = Events::load(opts)?;
        let lost = events.lost().unwrap_or(0);
        Ok(EventFeed {
            events,
            tracked: HashMap::new(),
            netns_of: HashMap::new(),
            entered: HashMap::new(),
            listeners: Vec::new(),
            lost,
            reconciles: 0,
            lost_before_dump: None,
            buf: Vec::new(),
        })
    }

    /// Events lost since the programs were loaded (the ring buffer was full), as last read.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// A full dump for [`Self::reset`] is about to be taken: note the losses so far.
    pub fn before_dump(&mut self) {
        self.lost_before_dump = self.events.lost().ok();
    }

    /// Whether `key` is tracked as in CLOSE_WAIT now.
    pub fn tracks(&self, key: SocketKey) -> bool {
        self.tracked.contains_key(&key)
    }

    /// The sockets tracked as in CLOSE_WAIT now.
    pub fn tracked(&self) -> impl Iterator<Item = &DiagSocket> {
        self.tracked.values()
    }

    /// Wait until events are queued or `timeout` passes; true when some are (an event loop
    /// that cycles on events rather than on a clock).
    pub fn wait(&self, timeout: Option<std::time::Duration>) -> std::io::Result<bool> {
        self.events.wait(timeout)
    }

    /// Call `on_ready` from a thread of its own each time events are queued, once per
    /// [`ReadyWatch::rearm`] (the first look needs none): an event loop waits on that
    /// instead of blocking ([`Self::wait`] blocks the calling thread).
    pub fn watch_ready(&self, on_ready: impl Fn() + Send + 'static) -> std::io::Result<ReadyWatch> {
        use std::os::fd::AsFd;
        use std::sync::{Arc, Condvar, Mutex};
        let fd = self.events.as_fd().try_clone_to_owned()?;
        let shared = Arc::new((
            Mutex::new(WatchState {
                armed: true,
                stop: false,
            }),
            Condvar::new(),
        ));
        let theirs = shared.clone();
        std::thread::Builder::new()
            .name("cwreap-ring".into())
            .spawn(move || {
                let (lock, cv) = &*theirs;
                loop {
                    {
                        let Ok(mut st) = lock.lock() else { return };
                        while !st.armed && !st.stop {
                            let Ok(next) = cv.wait(st) else { return };
                            st = next;
                        }
                        if st.stop {
                            return;
                        }
                    }
                    let half_a_second = Some(std::time::Duration::from_millis(500));
                    match crate::bpf::wait_readable(fd.as_fd(), half_a_second) {
                        Ok(true) => {
                            if let Ok(mut st) = lock.lock() {
                                st.armed = false;
                            }
                            on_ready();
                        }
                        Ok(false) => {}
                        Err(_) => return,
                    }
                }
            })?;
        Ok(ReadyWatch { shared })
    }

    /// How many sockets are tracked as in CLOSE_WAIT now.
    pub fn tracked_len(&self) -> usize {
        self.tracked.len()
    }

    /// Every socket and epoll fd of every process, from the iterator loaded with the
    /// programs; why not, when it did not load or the pass failed.
    pub fn task_fds(&mut self) -> Result<crate::bpf::TaskFds, String> {
        self.events.task_fds()
    }

    /// The pin directory, when the entry times are pinned for the command line.
    pub fn pinned(&self) -> Option<&std::path::Path> {
        self.events.pinned()
    }

    /// A cycle is done: tell the readers of the pins the daemon is alive.
    pub fn heartbeat(&mut self) -> std::io::Result<()> {
        self.events.heartbeat()
    }

    /// When `key` entered CLOSE_WAIT, if the programs saw it.
    pub fn entered_at(&self, key: SocketKey) -> Option<Boottime> {
        self.entered.get(&key.1).map(|ns| Boottime::from_nanos(*ns))
    }

    /// Start over from a full dump: it is what is in CLOSE_WAIT now. The events still
    /// queued stay queued, and the next [`Self::changes`] reads them against the dump: some
    /// happened before it, some after, and which is which cannot be told, so none may be
    /// dropped. Read against the dump, one from before changes nothing (a socket never
    /// returns to CLOSE_WAIT, and an entered one is looked up as it is now), while one from
    /// after (a socket that left between the dump and this call) is applied. Dropping them
    /// here would keep such a socket tracked until the next reconciliation.
    pub fn reset(&mut self, found: &Found) {
        // Losses up to the dump are covered by it; later ones make the next call reconcile.
        if let Some(lost) = self.lost_before_dump.take() {
            self.lost = lost;
        }
        self.tracked = found
            .close_wait
            .iter()
            .map(|d| (key_of(d), d.clone()))
            .collect();
        for (key, _) in self.tracked.iter() {
            self.netns_of.insert(key.1, key.0);
            if !self.entered.contains_key(&key.1)
                && let Ok(Some(ns)) = self.events.entered(key.1)
            {
                self.entered.insert(key.1, ns);
            }
        }
        self.listeners = found.listeners.clone();
        self.forget_ended();
    }

    /// Keep the entry time of every entered event in the buffer.
    fn note_times(&mut self) {
        for e in &self.buf {
            if let Event::Entered {
                cookie,
                netns,
                ts_ns,
                ..
            } = *e
            {
                self.entered.insert(cookie, ts_ns);
                self.netns_of.insert(cookie, u64::from(netns));
            }
        }
    }

    /// Drop what is remembered of sockets that are gone, when it grew past its bound.
    fn forget_ended(&mut self) {
        if self.netns_of.len() > MAX_REMEMBERED {
            let keep: HashSet<u64> = self.tracked.keys().map(|k| k.1).collect();
            self.netns_of.retain(|c, _| keep.contains(c));
            self.entered.retain(|c, _| keep.contains(c));
        }
    }

    /// What changed since the last call (or [`Self::reset`]), from the events; a full dump
    /// of `ns` instead when events were lost or one could not be placed.
    pub fn changes(&mut self, ns: &mut Namespaces) -> Result<Changes, DumpError> {
        self.buf.clear();
        self.events.drain(&mut self.buf);
        self.note_times();
        let lost = self.events.lost().unwrap_or(self.lost);
        let mut catch_up = lost > self.lost;
        self.lost = lost;
        let mut out = Changes::default();
        let events = std::mem::take(&mut self.buf);
        // A socket that entered and left CLOSE_WAIT within these events (the common case
        // on a busy server whose clients close first) is never looked up: it would be
        // tracked only to be dropped a moment later.
        let passed: HashSet<u64> = events
            .iter()
            .filter_map(|e| match *e {
                Event::Left { cookie, .. } | Event::Destroyed { cookie, .. } => Some(cookie),
                Event::Entered { .. } => None,
            })
            .collect();
        for e in &events {
            match *e {
                Event::Entered {
                    cookie,
                    netns,
                    local,
                    remote,
                    ..
                } => {
                    let netns = u64::from(netns);
                    if ns.get_mut(netns).is_none() || passed.contains(&cookie) {
                        continue; // a namespace no target lives in, or gone again
                    }
                    let probe = DiagSocket {
                        netns,
                        local,
                        remote,
                        inode: 0,
                        uid: 0,
                        cookie,
                        state: tcp::CLOSE_WAIT,
                        recv_q: 0,
                        send_q: 0,
                        last_ack_recv_ms: None,
                        last_data_recv_ms: None,
                        keepalive: false,
                    };
                    match crate::kernel::Destroy::lookup(ns, &probe) {
                        Ok(Some(d)) if d.state == tcp::CLOSE_WAIT && d.inode != 0 => {
                            if self.tracked.insert(key_of(&d), d.clone()).is_none() {
                                out.entered.push(d);
                            }
                        }
                        // Still in an accept queue: its listener comes with a dump.
                        Ok(Some(d)) if d.state == tcp::CLOSE_WAIT => catch_up = true,
                        // Gone already, or left: its own events follow.
                        Ok(_) => {}
                        Err(_) => catch_up = true,
                    }
                }
                Event::Left { cookie, .. } => {
                    if let Some(&netns) = self.netns_of.get(&cookie)
                        && self.tracked.remove(&(netns, cookie)).is_some()
                    {
                        out.left.push((netns, cookie));
                    }
                }
                Event::Destroyed { cookie, .. } => {
                    if let Some(netns) = self.netns_of.remove(&cookie) {
                        if self.tracked.remove(&(netns, cookie)).is_some() {
                            out.left.push((netns, cookie));
                        }
                        out.ended.push((netns, cookie));
                    }
                    self.entered.remove(&cookie);
                }
            }
        }
        self.buf = events;
        self.accepted_since(ns, &mut out);
        if catch_up {
            return self.reconcile(ns, out);
        }
        out.listeners = self.listeners.clone();
        Ok(out)
    }

    /// Sockets tracked while they waited in an accept queue (no inode) that their server
    /// accepted since: no state changes then, so each is looked up again, and one with an
    /// inode now is refreshed.
    fn accepted_since(&mut self, ns: &mut Namespaces, out: &mut Changes) {
        let queued: Vec<DiagSocket> = self
            .tracked
            .values()
            .filter(|d| d.inode == 0)
            .cloned()
            .collect();
        for d in queued {
            if let Ok(Some(now)) = crate::kernel::Destroy::lookup(ns, &d)
                && now.state == tcp::CLOSE_WAIT
                && now.inode != 0
            {
                self.tracked.insert(key_of(&now), now.clone());
                out.refreshed.push(now);
            }
        }
    }

    /// A full dump, to catch up: every socket in CLOSE_WAIT now that is not tracked has
    /// entered, every tracked one not in it has left. The ends already read stay.
    fn reconcile(&mut self, ns: &mut Namespaces, mut out: Changes) -> Result<Changes, DumpError> {
        self.reconciles += 1;
        let found = ns.dump()?;
        let now: HashMap<SocketKey, DiagSocket> = found
            .close_wait
            .iter()
            .map(|d| (key_of(d), d.clone()))
            .collect();
        // Entered since the last call: what the events said, and what they missed.
        let known: HashSet<SocketKey> = out.entered.iter().map(key_of).collect();
        out.entered.retain(|d| now.contains_key(&key_of(d)));
        for (key, d) in &now {
            if !self.tracked.contains_key(key) && !known.contains(key) {
                out.entered.push(d.clone());
            }
        }
        for key in self.tracked.keys() {
            if !now.contains_key(key) && !out.left.contains(key) {
                out.left.push(*key);
            }
        }
        out.left.retain(|k| !now.contains_key(k));
        out.left.sort_unstable();
        self.tracked = now;
        for key in self.tracked.keys() {
            self.netns_of.insert(key.1, key.0);
            // An entry whose event was lost is still in the programs' map.
            if !self.entered.contains_key(&key.1)
                && let Ok(Some(ns)) = self.events.entered(key.1)
            {
                self.entered.insert(key.1, ns);
            }
        }
        self.listeners = found.listeners;
        out.listeners = self.listeners.clone();
        self.forget_ended();
        Ok(out)
    }
}
