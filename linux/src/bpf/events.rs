//! The loaded tracepoint programs and what they report: the event stream, the count of
//! events lost, and the entry time of each socket in CLOSE_WAIT.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{HashMap, Map, MapData, PerCpuArray, RingBuf};

use super::event::{EVENT_LEN, Event, parse_event};
use super::load::{self, Unavailable};
use super::pin::{self, PinOwner};

/// The programs and the tracepoints they attach to.
const TRACEPOINTS: [(&str, &str); 2] = [
    ("cw_state", "inet_sock_set_state"),
    ("cw_destroy", "tcp_destroy_sock"),
];

/// How to load the programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Pin the entry times and the daemon record in this directory on a BPF filesystem
    /// (e.g. [`pin::DEFAULT_PIN_DIR`]), for [`super::PinnedAges`] readers. `None`: no pins.
    /// The directory is created if its parent is on a BPF filesystem; nothing is mounted.
    pub pin_dir: Option<PathBuf>,
    /// Report only sockets of the network namespace with this inode. `None`: all.
    pub netns: Option<u32>,
    /// Report the destruction of every TCP socket, not only of those seen entering
    /// CLOSE_WAIT. Costs one event per connection on a busy host; useful when sockets are
    /// also learnt another way (a sock_diag dump, the socket iterator).
    pub all_destroys: bool,
    /// Ring buffer size in bytes, rounded up to a power of two of at least one page. Each
    /// event takes 72 bytes (64 and a header), so 1 MiB holds about 14,500.
    pub ring_bytes: u32,
    /// How many sockets the entry-time map holds; past that the least recently used go.
    pub max_tracked: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pin_dir: None,
            netns: None,
            all_destroys: false,
            ring_bytes: 1 << 20,
            max_tracked: 65536,
        }
    }
}

/// The tracepoint programs, attached. Dropping it detaches them (and unpins what it
/// pinned, unless a newer daemon has pinned over it).
///
/// The entry-time map is keyed by socket cookie and holds CLOCK_BOOTTIME ns. An entry is
/// made when a socket enters CLOSE_WAIT and kept until the socket is destroyed, also after
/// it leaves CLOSE_WAIT: a socket that reached CLOSE while its owner still holds the fd (a
/// dead leaked socket) keeps its entry time, which dates its leak. A socket never returns
/// to CLOSE_WAIT, so an entry is never overwritten by a later visit.
pub struct Events {
    // Owns the programs and their links; the maps below were taken out of it.
    ebpf: Ebpf,
    /// The `task_file` iterator of the same object, loaded with the tracepoints (the
    /// kernel's BTF is parsed once); why not, when it could not be.
    iter: Result<(), String>,
    iter_buf: Vec<u8>,
    ring: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    entered: HashMap<MapData, u64, u64>,
    pin: Option<PinOwner>,
    malformed: u64,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("ring_fd", &self.ring.as_raw_fd())
            .field("pinned", &self.pinned())
            .field("malformed", &self.malformed)
            .finish_non_exhaustive()
    }
}

impl Events {
    /// Load the embedded object and attach both tracepoint programs. The cheap
    /// preconditions are checked first (kernel version, BTF, capabilities, the pin
    /// directory's filesystem), so the reason for a refusal is exact.
    pub fn load(opts: &Options) -> Result<Events, Unavailable> {
        let btf = load::preconditions()?;
        if let Some(dir) = &opts.pin_dir {
            PinOwner::prepare(dir)?;
        }
        let page = load::page_size();
        let ring_bytes = opts
            .ring_bytes
            .max(page)
            .checked_next_power_of_two()
            .ok_or_else(|| Unavailable::Other {
                context: "ring buffer size".into(),
                error: format!("{} bytes is too large", opts.ring_bytes),
            })?;
        let netns = opts.netns.unwrap_or(0);
        let all_destroys = u8::from(opts.all_destroys);
        let mut ebpf = aya::EbpfLoader::new()
            .btf(Some(&btf))
            .override_global(load::GLOBAL_NETNS, &netns, true)
            .override_global(load::GLOBAL_ALL_DESTROYS, &all_destroys, true)
            .map_max_entries(load::MAP_EVENTS, ring_bytes)
            .map_max_entries(load::MAP_ENTERED, opts.max_tracked.max(1))
            .load(load::OBJECT)
            .map_err(|e| load::classify("load the BPF object", &e))?;
        load::attach_tracepoints(&mut ebpf, &btf, &TRACEPOINTS)?;
        let ring = load::take_map(&mut ebpf, load::MAP_EVENTS)?;
        let lost = load::take_map(&mut ebpf, load::MAP_LOST)?;
        let entered_map = ebpf
            .take_map(load::MAP_ENTERED)
            .ok_or_else(|| load::missing(load::MAP_ENTERED))?;
        let pin = match &opts.pin_dir {
            Some(dir) => {
                let Map::LruHashMap(data) = &entered_map else {
                    return Err(load::missing(load::MAP_ENTERED));
                };
                let daemon = load::take_map(&mut ebpf, load::MAP_DAEMON)?;
                Some(PinOwner::pin(dir, data, daemon)?)
            }
            None => None,
        };
        let entered =
            HashMap::try_from(entered_map).map_err(|e| load::classify(load::MAP_ENTERED, &e))?;
        // Attribution uses the iterator when it loads; the events do not need it.
        let iter = super::iter::load_program(&mut ebpf, &btf).map_err(|e| e.to_string());
        drop(btf);
        // Parsing the kernel's BTF (twice: aya's loader parses its own copy) peaks at tens
        // of MiB of short-lived heap that glibc would otherwise keep.
        crate::sys::release_free_heap();
        Ok(Events {
            ebpf,
            iter,
            iter_buf: Vec::new(),
            ring,
            lost,
            entered,
            pin,
            malformed: 0,
        })
    }

    /// Move every event waiting in the ring buffer into `out`, oldest first, without
    /// blocking. Returns how many were added.
    pub fn drain(&mut self, out: &mut Vec<Event>) -> usize {
        load::drain_ring(&mut self.ring, parse_event, out, &mut self.malformed)
    }

    /// Wait until events are waiting or `timeout` passes (`None`: no limit). True when
    /// some are. For an event loop, poll or epoll [`AsFd::as_fd`] for readability instead.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        load::wait_readable(self.ring.as_fd(), timeout)
    }

    /// Events the programs could not queue because the ring buffer was full, since load.
    pub fn lost(&self) -> io::Result<u64> {
        let per_cpu = self
            .lost
            .get(&0, 0)
            .map_err(|e| io::Error::other(load::chain(&e)))?;
        Ok(per_cpu.iter().sum())
    }

    /// Ring-buffer records that did not parse (none, unless the embedded object and this
    /// crate disagree).
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// When the socket with this cookie entered CLOSE_WAIT (CLOCK_BOOTTIME ns), if it did
    /// while the programs were attached and has not been destroyed since.
    pub fn entered(&self, cookie: u64) -> io::Result<Option<u64>> {
        pin::lookup(&self.entered, cookie)
    }

    /// Record that the daemon completed a cycle, for readers of the pins. Without pins it
    /// does nothing.
    pub fn heartbeat(&mut self) -> io::Result<()> {
        match &mut self.pin {
            Some(p) => p.beat(),
            None => Ok(()),
        }
    }

    /// The pin directory, when pinned.
    pub fn pinned(&self) -> Option<&Path> {
        self.pin.as_ref().map(|p| p.dir())
    }

    /// One pass of the `task_file` iterator loaded with the programs (see
    /// [`super::SocketIter`]); why not, when it did not load or the pass failed.
    pub fn task_fds(&mut self) -> Result<super::TaskFds, String> {
        if let Err(why) = &self.iter {
            return Err(why.clone());
        }
        super::iter::pass(&mut self.ebpf, &mut self.iter_buf).map_err(|e| e.to_string())
    }
}

impl AsFd for Events {
    /// The ring buffer's fd: readable when events are waiting.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for Events {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

// The record size the ring buffer's users budget for; keep the docs above in step.
const _: () = assert!(EVENT_LEN == 64);
