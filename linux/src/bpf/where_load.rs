//! `explain --where`'s programs (linux/bpf/where.bpf.o), loaded and attached for as long
//! as a [`WhereProbe`] lives.

use std::io;
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};

use super::load::{self, Unavailable};
use super::where_record::{WHERE_AT_LEN, WHERE_STACK_MAX, WhereAt, WhereRecord, parse_where};

/// linux/bpf/where.bpf.o, built by `make bpf` and checked in.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../bpf/where.bpf.o");

/// The programs and the tracepoints they attach to.
const TRACEPOINTS: [(&str, &str); 4] = [
    ("cw_where_closed", "tcp_destroy_sock"),
    ("cw_where_eof", "sock_recv_length"),
    ("cw_where_connect", "inet_sock_set_state"),
    ("cw_where_accept", "sys_exit"),
];

/// The oldest kernel with the `sock_recv_length` tracepoint.
pub const WHERE_MIN_KERNEL: (u32, u32) = (6, 3);

/// How to load the programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhereOptions {
    /// Only these processes; empty: every process (unless `follow`).
    pub pids: Vec<u32>,
    /// Only the processes of `pids`, even when it is empty, as [`WhereProbe::follow`]
    /// changes them (the daemon's targets).
    pub follow: bool,
    /// Stack bytes to copy per record, from the stack pointer up (at most
    /// [`WHERE_STACK_MAX`]; less where the stack mapping ends sooner).
    pub stack_bytes: u32,
    /// Ring buffer size in bytes (a power of two of at least a page).
    pub ring_bytes: u32,
}

impl Default for WhereOptions {
    fn default() -> Self {
        WhereOptions {
            pids: Vec::new(),
            follow: false,
            stack_bytes: 4096,
            ring_bytes: 1 << 24,
        }
    }
}

/// What the programs counted since they were loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WhereCounts {
    /// Stacks the ring buffer had no room for.
    pub lost: u64,
    /// Stacks that could not be remembered as sent because the map of sent stacks was full
    /// (each was sent whole again the next time).
    pub seen_full: u64,
    /// Stacks whose bytes could not be read.
    pub no_stack: u64,
    /// Stacks sent.
    pub full: u64,
    /// EOF reads, connects and accepts kept whose stack was sent before.
    pub short: u64,
    /// EOF reads and connects not kept: the map of open sockets was full.
    pub socks_full: u64,
    /// Accepts not kept: the map of accepted fds was full.
    pub accepts_full: u64,
    /// Records that did not parse.
    pub malformed: u64,
}

/// The attached programs. Dropping it detaches them.
pub struct WhereProbe {
    _ebpf: Ebpf,
    ring: RingBuf<MapData>,
    counts: PerCpuArray<MapData, u64>,
    trusted: HashMap<MapData, u32, u8>,
    layouts: HashMap<MapData, [u8; 16], [u8; LAYOUT_LEN]>,
    socks: HashMap<MapData, u64, [u8; 2 * WHERE_AT_LEN]>,
    accepts: HashMap<MapData, [u8; 8], [u8; WHERE_AT_LEN]>,
    /// The processes recorded, when filtered.
    pids: Option<HashMap<MapData, u32, u8>>,
    malformed: u64,
}

/// Return addresses a layout gives the offsets of (`CW_WHERE_LAYOUT_DEPTH`): deep enough
/// that two paths alike in their innermost frames (a runtime's read wrappers) differ at
/// the application's.
pub const WHERE_LAYOUT_DEPTH: usize = 16;
/// Bytes of a `struct cw_where_layout`: the count, then the offsets.
const LAYOUT_LEN: usize = 4 + 4 * WHERE_LAYOUT_DEPTH;
/// The offsets of a layout are below this (`CW_WHERE_LAYOUT_SPAN`): the programs read the
/// words in one span.
pub const WHERE_LAYOUT_SPAN: u32 = 4096;

impl std::fmt::Debug for WhereProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhereProbe")
            .field("malformed", &self.malformed)
            .finish_non_exhaustive()
    }
}

fn map_err(what: &str, e: aya::maps::MapError) -> Unavailable {
    load::classify(what, &e)
}

impl WhereProbe {
    /// Check what the programs need (kernel version, BTF, capabilities), load them and
    /// attach them.
    pub fn load(opts: &WhereOptions) -> Result<WhereProbe, Unavailable> {
        if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            && let Some(version) = load::parse_release(&release)
            && version < WHERE_MIN_KERNEL
        {
            return Err(Unavailable::Other {
                context: format!("kernel {}", release.trim()),
                error: format!(
                    "explain --where needs Linux {}.{} or later (the sock_recv_length tracepoint)",
                    WHERE_MIN_KERNEL.0, WHERE_MIN_KERNEL.1
                ),
            });
        }
        let btf = load::preconditions()?;
        let page = load::page_size();
        let ring_bytes = opts
            .ring_bytes
            .max(page)
            .checked_next_power_of_two()
            .unwrap_or(1 << 24);
        let copy = opts.stack_bytes.min(WHERE_STACK_MAX as u32);
        let filter = u8::from(opts.follow || !opts.pids.is_empty());
        let mut ebpf = aya::EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("cw_where_filter", &filter, true)
            .override_global("cw_where_copy", &copy, true)
            .map_max_entries("cw_where_events", ring_bytes)
            .load(OBJECT)
            .map_err(|e| load::classify("load the where BPF object", &e))?;
        let pids = if filter == 1 {
            let mut pids: HashMap<_, u32, u8> = load::take_map(&mut ebpf, "cw_where_pids")?;
            for pid in &opts.pids {
                pids.insert(pid, 1, 0)
                    .map_err(|e| map_err("cw_where_pids", e))?;
            }
            Some(pids)
        } else {
            None
        };
        load::attach_tracepoints(&mut ebpf, &btf, &TRACEPOINTS)?;
        let ring = load::take_map(&mut ebpf, "cw_where_events")?;
        let counts = load::take_map(&mut ebpf, "cw_where_counts")?;
        let trusted = load::take_map(&mut ebpf, "cw_where_trusted")?;
        let layouts = load::take_map(&mut ebpf, "cw_where_layouts")?;
        let socks = load::take_map(&mut ebpf, "cw_where_socks")?;
        let accepts = load::take_map(&mut ebpf, "cw_where_accepts")?;
        drop(btf);
        crate::sys::release_free_heap();
        Ok(WhereProbe {
            _ebpf: ebpf,
            ring,
            counts,
            trusted,
            layouts,
            socks,
            accepts,
            pids,
            malformed: 0,
        })
    }

    /// What was kept of socket `cookie`: its EOF read and its connect.
    pub fn socket(&self, cookie: u64) -> io::Result<(Option<WhereAt>, Option<WhereAt>)> {
        match self.socks.get(&cookie, 0) {
            Ok(v) => Ok(split_sock(&v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok((None, None)),
            Err(e) => Err(io::Error::other(load::chain(&e))),
        }
    }

    /// What was kept of the last accept into fd `fd` of process `tgid`.
    pub fn accept(&self, tgid: u32, fd: u32) -> io::Result<Option<WhereAt>> {
        match self.accepts.get(&fd_key(tgid, fd), 0) {
            Ok(v) => Ok(WhereAt::parse(&v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(io::Error::other(load::chain(&e))),
        }
    }

    /// Every socket kept (not freed yet), with its EOF read and its connect. A socket
    /// freed during the walk may be missing or given as both None.
    pub fn sockets(&self) -> Vec<(u64, Option<WhereAt>, Option<WhereAt>)> {
        self.socks
            .iter()
            .filter_map(Result::ok)
            .map(|(cookie, v)| {
                let (eof, connect) = split_sock(&v);
                (cookie, eof, connect)
            })
            .collect()
    }

    /// Every accept kept, by (process, fd); first forgetting those of processes `keep`
    /// refuses (gone, or no longer recorded), whose fd numbers name nothing any more.
    pub fn accepts(&mut self, keep: impl Fn(u32) -> bool) -> Vec<((u32, u32), WhereAt)> {
        let all: Vec<([u8; 8], [u8; WHERE_AT_LEN])> =
            self.accepts.iter().filter_map(Result::ok).collect();
        let mut out = Vec::with_capacity(all.len());
        for (k, v) in all {
            let (tgid, fd) = split_fd_key(&k);
            if !keep(tgid) {
                let _ = self.accepts.remove(&k);
                continue;
            }
            if let Some(at) = WhereAt::parse(&v) {
                out.push(((tgid, fd), at));
            }
        }
        out
    }

    /// Move every waiting record into `out`, oldest first, without blocking.
    pub fn drain(&mut self, out: &mut Vec<WhereRecord>) -> usize {
        load::drain_ring(&mut self.ring, parse_where, out, &mut self.malformed)
    }

    /// Wait until records are waiting or `timeout` passes. True when some are.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        load::wait_readable(std::os::fd::AsFd::as_fd(&self.ring), Some(timeout))
    }

    /// Trust the frame-pointer stacks of process `tgid` (checked against CFI by the
    /// caller): from now on a stack of it already sent is kept as its hash only.
    pub fn trust(&mut self, tgid: u32) -> io::Result<()> {
        self.trusted
            .insert(tgid, 1, 0)
            .map_err(|e| io::Error::other(load::chain(&e)))
    }

    /// Tell the programs where the return addresses are in a stack of process `tgid`
    /// taken at instruction pointer `ip`: `offsets` from the stack pointer, innermost
    /// first (at most [`WHERE_LAYOUT_DEPTH`] are used). From now on, a stack of it at `ip`
    /// whose words at these offsets match one sent before is kept as its hash only.
    pub fn set_layout(&mut self, tgid: u32, ip: u64, offsets: &[u32]) -> io::Result<()> {
        let (key, value) = layout_entry(tgid, ip, offsets);
        self.layouts
            .insert(key, value, 0)
            .map_err(|e| io::Error::other(load::chain(&e)))
    }

    /// Record exactly the processes `pids` from now on (loaded with `follow`; otherwise
    /// an error: the filter is off).
    pub fn follow(&mut self, pids: &[u32]) -> io::Result<()> {
        let map = self
            .pids
            .as_mut()
            .ok_or_else(|| io::Error::other("the programs were loaded without a pid filter"))?;
        let want: std::collections::HashSet<u32> = pids.iter().copied().collect();
        let have: Vec<u32> = map.keys().filter_map(Result::ok).collect();
        for pid in have.iter().filter(|p| !want.contains(p)) {
            map.remove(pid)
                .map_err(|e| io::Error::other(load::chain(&e)))?;
        }
        for pid in want.iter().filter(|p| !have.contains(p)) {
            map.insert(pid, 1, 0)
                .map_err(|e| io::Error::other(load::chain(&e)))?;
        }
        Ok(())
    }

    /// The programs' counters.
    pub fn counts(&self) -> io::Result<WhereCounts> {
        let get = |i: u32| -> io::Result<u64> {
            let v = self
                .counts
                .get(&i, 0)
                .map_err(|e| io::Error::other(load::chain(&e)))?;
            Ok(v.iter().sum())
        };
        Ok(WhereCounts {
            lost: get(0)?,
            seen_full: get(1)?,
            no_stack: get(2)?,
            full: get(3)?,
            short: get(4)?,
            socks_full: get(5)?,
            accepts_full: get(6)?,
            malformed: self.malformed,
        })
    }
}

/// A `struct cw_where_sock`: the EOF read and the connect.
fn split_sock(v: &[u8; 2 * WHERE_AT_LEN]) -> (Option<WhereAt>, Option<WhereAt>) {
    (
        WhereAt::parse(&v[..WHERE_AT_LEN]),
        WhereAt::parse(&v[WHERE_AT_LEN..]),
    )
}

/// A `struct cw_where_fd` in host order.
fn fd_key(tgid: u32, fd: u32) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&tgid.to_ne_bytes());
    k[4..].copy_from_slice(&fd.to_ne_bytes());
    k
}

fn split_fd_key(k: &[u8; 8]) -> (u32, u32) {
    let mut t = [0u8; 4];
    let mut f = [0u8; 4];
    t.copy_from_slice(&k[..4]);
    f.copy_from_slice(&k[4..]);
    (u32::from_ne_bytes(t), u32::from_ne_bytes(f))
}

/// `struct cw_where_layout_key` and `struct cw_where_layout` in host order.
fn layout_entry(tgid: u32, ip: u64, offsets: &[u32]) -> ([u8; 16], [u8; LAYOUT_LEN]) {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&tgid.to_ne_bytes());
    key[8..].copy_from_slice(&ip.to_ne_bytes());
    let offsets = &offsets[..offsets.len().min(WHERE_LAYOUT_DEPTH)];
    let mut value = [0u8; LAYOUT_LEN];
    value[..4].copy_from_slice(&(offsets.len() as u32).to_ne_bytes());
    for (i, o) in offsets.iter().enumerate() {
        value[4 + 4 * i..8 + 4 * i].copy_from_slice(&o.to_ne_bytes());
    }
    (key, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::WhereKind;

    /// The programs load here, send the stacks of an EOF read, the accept and the connect
    /// of a loopback connection made by this process, and keep each under its socket (or
    /// accepted fd) until the socket is freed.
    #[test]
    #[ignore = "needs root: loads BPF programs"]
    fn keeps_the_eof_read_the_accept_and_the_connect_until_the_socket_is_freed() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let me = std::process::id();
        let mut probe = WhereProbe::load(&WhereOptions {
            pids: vec![me],
            ..WhereOptions::default()
        })
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let client_cookie = rustix::net::sockopt::socket_cookie(&client).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let server_cookie = rustix::net::sockopt::socket_cookie(&server).unwrap();
        let server_fd = u32::try_from(server.as_raw_fd()).unwrap();
        drop(client);
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).unwrap(), 0);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline
            && [WhereKind::Eof, WhereKind::Connect, WhereKind::Accept]
                .iter()
                .any(|k| !got.iter().any(|r: &WhereRecord| r.kind == *k))
        {
            probe.wait(Duration::from_millis(100)).unwrap();
            probe.drain(&mut got);
        }
        let sent = |kind| got.iter().find(|r| r.kind == kind).unwrap();
        let eof = sent(WhereKind::Eof);
        assert_eq!((eof.tgid, eof.cookie), (me, server_cookie));
        assert!(!eof.capture.frames.is_empty() && !eof.capture.stack.is_empty());
        // Kept under the socket, naming the stack sent.
        let (kept_eof, kept_connect) = probe.socket(server_cookie).unwrap();
        let kept_eof = kept_eof.expect("the server's EOF read is kept");
        assert_eq!((kept_eof.hash, kept_eof.tgid), (eof.hash, me));
        assert_eq!(kept_connect, None, "the server's end was accepted");
        let connect = sent(WhereKind::Connect);
        assert_eq!(connect.cookie, client_cookie);
        let accept = sent(WhereKind::Accept);
        assert_eq!(accept.fd, server_fd);
        let kept_accept = probe.accept(me, server_fd).unwrap().expect("kept");
        assert_eq!(kept_accept.hash, accept.hash);
        assert!(kept_accept.ts_ns <= kept_eof.ts_ns);
        let all = probe.sockets();
        assert!(
            all.iter()
                .any(|(c, e, _)| *c == server_cookie && e.is_some())
        );
        // Closing the server's end frees both ends (the client's waited in FIN_WAIT2 for
        // it): both are forgotten.
        drop(server);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let gone = |c| probe.socket(c).unwrap() == (None, None);
        while std::time::Instant::now() < deadline && !(gone(server_cookie) && gone(client_cookie))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone(server_cookie) && gone(client_cookie));
        // Accepts are forgotten with their process only.
        assert_eq!(probe.accepts(|_| true).len(), 1);
        assert!(probe.accepts(|t| t != me).is_empty());
        assert_eq!(probe.accept(me, server_fd).unwrap(), None);
        let counts = probe.counts().unwrap();
        assert!(counts.full >= 3, "{counts:?}");
        assert_eq!((counts.malformed, counts.socks_full), (0, 0));
    }

    #[test]
    fn layout_entries_are_laid_out_as_the_programs_read_them() {
        let offsets: Vec<u32> = (1..=20).map(|i| 8 * i).collect();
        let (k, v) = layout_entry(7, 0x1122, &offsets);
        assert_eq!(&k[..4], &7u32.to_ne_bytes());
        assert_eq!(&k[4..8], &[0; 4]);
        assert_eq!(&k[8..], &0x1122u64.to_ne_bytes());
        assert_eq!(v.len(), 68);
        assert_eq!(&v[..4], &16u32.to_ne_bytes(), "at most 16 offsets");
        assert_eq!(&v[4..8], &8u32.to_ne_bytes());
        assert_eq!(&v[8..12], &16u32.to_ne_bytes());
        assert_eq!(&v[64..68], &128u32.to_ne_bytes());
        let (_, v) = layout_entry(7, 0x1122, &[8, 40]);
        assert_eq!(&v[..4], &2u32.to_ne_bytes());
        assert_eq!(&v[12..], &[0; 56]);
    }

    #[test]
    fn the_embedded_object_is_an_elf_for_bpf() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247);
    }
}
