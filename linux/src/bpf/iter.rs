//! Which fds hold which sockets, for every process at once: the `iter/task_file` program
//! (`cw_task_file`) and the parser of its output (`struct cw_task_sock`). Each record also
//! carries the process's start time, so that a pidfd opened afterwards can be checked to
//! pin the process the record was about; epoll fds come too (for `explain`).

use std::fs::File;
use std::io::{self, Read};

use aya::Ebpf;
use aya::programs::Iter;

use super::load::{self, Unavailable};

/// Size of one iterator record; the BPF side asserts the same at compile time.
pub const TASK_SOCK_LEN: usize = 40;

/// `kind` of a socket fd's record.
const KIND_SOCKET: u8 = 0;
/// `kind` of an epoll fd's record.
const KIND_EPOLL: u8 = 1;

/// One socket fd of one process, as the iterator saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaskSocket {
    /// Process id (thread-group id).
    pub pid: u32,
    /// The task whose fd table holds the fd: `pid` itself, or a thread when the group's
    /// leader has exited (then pidfd_getfd must go through that thread's pidfd).
    pub tid: u32,
    /// The fd number.
    pub fd: u32,
    /// The socket's inode (fstat's `st_ino`, `socket:[INODE]` in /proc/PID/fd, sock_diag's
    /// `idiag_inode`): the join key with sock_diag, since the iterator cannot read cookies.
    pub inode: u64,
    /// Inode of the socket's network namespace.
    pub netns: u32,
    /// Address family (`AF_INET`, `AF_INET6`, `AF_UNIX`, ...).
    pub family: u16,
    /// Protocol (`IPPROTO_TCP` for TCP).
    pub protocol: u16,
    /// Socket type (`SOCK_STREAM`, ...).
    pub sock_type: u16,
    /// TCP state (see [`crate::tcp`]); other families reuse the numbers loosely.
    pub state: u8,
    /// When the process (its thread-group leader) started, CLOCK_BOOTTIME ns.
    pub start_ns: u64,
}

/// One epoll fd of one process, as the iterator saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaskEpoll {
    /// Process id (thread-group id).
    pub pid: u32,
    /// As [`TaskSocket::tid`].
    pub tid: u32,
    /// The fd number.
    pub fd: u32,
    /// As [`TaskSocket::start_ns`].
    pub start_ns: u64,
}

/// Everything one pass of the iterator wrote, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFds {
    pub sockets: Vec<TaskSocket>,
    pub epolls: Vec<TaskEpoll>,
}

impl TaskSocket {
    /// Whether this is a TCP socket (IPv4 or IPv6).
    pub fn is_tcp(&self) -> bool {
        self.protocol == libc::IPPROTO_TCP as u16
            && (self.family == libc::AF_INET as u16 || self.family == libc::AF_INET6 as u16)
    }
}

/// The iterator's output does not split into whole records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("iterator output of {0} bytes is not a whole number of known {TASK_SOCK_LEN}-byte records")]
pub struct BadOutput(pub usize);

/// The socket fds of everything the iterator wrote, in order.
pub fn parse_task_sockets(out: &[u8]) -> Result<Vec<TaskSocket>, BadOutput> {
    Ok(parse_task_fds(out)?.sockets)
}

/// Parse everything the iterator wrote, in order: socket fds and epoll fds. A record of a
/// kind this parser does not know is an error (the object and the parser ship together).
pub fn parse_task_fds(out: &[u8]) -> Result<TaskFds, BadOutput> {
    if !out.len().is_multiple_of(TASK_SOCK_LEN) {
        return Err(BadOutput(out.len()));
    }
    let mut fds = TaskFds::default();
    for r in out.chunks_exact(TASK_SOCK_LEN) {
        let u16_at = |at: usize| u16::from_ne_bytes([r[at], r[at + 1]]);
        let u32_at = |at: usize| u32::from_ne_bytes([r[at], r[at + 1], r[at + 2], r[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&r[at..at + 8]);
            u64::from_ne_bytes(b)
        };
        match r[31] {
            KIND_SOCKET => fds.sockets.push(TaskSocket {
                pid: u32_at(0),
                tid: u32_at(4),
                fd: u32_at(8),
                netns: u32_at(12),
                inode: u64_at(16),
                family: u16_at(24),
                protocol: u16_at(26),
                sock_type: u16_at(28),
                state: r[30],
                start_ns: u64_at(32),
            }),
            KIND_EPOLL => fds.epolls.push(TaskEpoll {
                pid: u32_at(0),
                tid: u32_at(4),
                fd: u32_at(8),
                start_ns: u64_at(32),
            }),
            _ => return Err(BadOutput(out.len())),
        }
    }
    Ok(fds)
}

/// Why a pass of the iterator failed after it loaded.
#[derive(Debug, thiserror::Error)]
pub enum IterError {
    /// Creating the iterator or reading it failed.
    #[error("socket iterator: {0}")]
    Io(#[from] io::Error),
    /// The output did not parse.
    #[error(transparent)]
    Output(#[from] BadOutput),
    /// aya refused to attach or open the iterator.
    #[error("socket iterator: {0}")]
    Attach(String),
}

/// The loaded `iter/task_file` program, ready for any number of passes.
pub struct SocketIter {
    ebpf: Ebpf,
    buf: Vec<u8>,
}

impl std::fmt::Debug for SocketIter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketIter").finish_non_exhaustive()
    }
}

const PROGRAM: &str = "cw_task_file";

impl SocketIter {
    /// Load the iterator program. Needs the same privileges as [`super::Events::load`];
    /// the maps the object also declares are created at their smallest, since only the
    /// iterator runs.
    pub fn load() -> Result<SocketIter, Unavailable> {
        let btf = load::preconditions()?;
        let page = load::page_size();
        let mut ebpf = aya::EbpfLoader::new()
            .btf(Some(&btf))
            .map_max_entries(load::MAP_EVENTS, page)
            .map_max_entries(load::MAP_ENTERED, 1)
            .load(load::OBJECT)
            .map_err(|e| load::classify("load the BPF object", &e))?;
        load_program(&mut ebpf, &btf)?;
        drop(btf);
        // As in Events::load: hand the BTF parse's heap back.
        crate::sys::release_free_heap();
        Ok(SocketIter {
            ebpf,
            buf: Vec::new(),
        })
    }

    /// One pass over every process's fd table: every socket fd in the system, in every
    /// state, as seen from the kernel (not limited by this process's pid namespace view).
    pub fn run(&mut self) -> Result<Vec<TaskSocket>, IterError> {
        Ok(self.pass()?.sockets)
    }

    /// [`Self::run`] with the epoll fds too.
    pub fn pass(&mut self) -> Result<TaskFds, IterError> {
        pass(&mut self.ebpf, &mut self.buf)
    }
}

/// Load the iterator program of an object loaded with `btf` (also done by
/// [`super::Events::load`], so the daemon parses the kernel's BTF once).
pub(super) fn load_program(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<(), Unavailable> {
    let prog: &mut Iter = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| load::missing(PROGRAM))?
        .try_into()
        .map_err(|e| load::classify("iterator program", &e))?;
    prog.load("task_file", btf)
        .map_err(|e| load::classify("load the task_file iterator", &e))
}

/// One pass of the loaded iterator program of `ebpf`, its output read into `buf`.
pub(super) fn pass(ebpf: &mut Ebpf, buf: &mut Vec<u8>) -> Result<TaskFds, IterError> {
    let prog: &mut Iter = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| IterError::Attach(format!("program {PROGRAM} is missing")))?
        .try_into()
        .map_err(|e| IterError::Attach(load::chain(&e)))?;
    let link_id = prog
        .attach()
        .map_err(|e| IterError::Attach(load::chain(&e)))?;
    let link = prog
        .take_link(link_id)
        .map_err(|e| IterError::Attach(load::chain(&e)))?;
    let mut file: File = link
        .into_file()
        .map_err(|e| IterError::Attach(load::chain(&e)))?;
    buf.clear();
    read_all(&mut file, buf)?;
    Ok(parse_task_fds(buf)?)
}

/// read(2) until EOF: each read returns what the kernel's seq buffer holds, so a short read
/// says nothing about the end.
fn read_all(file: &mut File, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut empty_reads = 0u32;
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                empty_reads = 0;
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // EAGAIN: the kernel visited its per-read maximum of objects (a million) without
            // output and hands control back; the pass goes on where it stopped. Bounded, in
            // case a kernel ever returns it without progress.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && empty_reads < 1000 => {
                empty_reads += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Load the iterator, run it once, unload it: every socket fd of every process.
pub fn task_sockets() -> Result<Vec<TaskSocket>, TaskSocketsError> {
    let mut iter = SocketIter::load()?;
    Ok(iter.run()?)
}

/// Why [`task_sockets`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskSocketsError {
    /// The iterator could not be loaded.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// The pass failed.
    #[error(transparent)]
    Iter(#[from] IterError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32, tid: u32, fd: u32, inode: u64, state: u8) -> Vec<u8> {
        let mut r = Vec::with_capacity(TASK_SOCK_LEN);
        r.extend_from_slice(&pid.to_ne_bytes()); // tgid
        r.extend_from_slice(&tid.to_ne_bytes()); // tid
        r.extend_from_slice(&fd.to_ne_bytes()); // fd
        r.extend_from_slice(&4_026_531_840u32.to_ne_bytes()); // netns inode
        r.extend_from_slice(&inode.to_ne_bytes()); // socket inode
        r.extend_from_slice(&10u16.to_ne_bytes()); // family: AF_INET6
        r.extend_from_slice(&6u16.to_ne_bytes()); // protocol: TCP
        r.extend_from_slice(&1u16.to_ne_bytes()); // type: SOCK_STREAM
        r.push(state); // TCP state
        r.push(0); // kind: socket
        r.extend_from_slice(&77_000_000_000u64.to_ne_bytes()); // start_ns
        r
    }

    #[test]
    fn parses_records_in_order() {
        let mut out = record(100, 100, 3, 0x1_0000_0001, 8);
        out.extend(record(200, 201, 17, 42, 10));
        let socks = parse_task_sockets(&out).unwrap();
        assert_eq!(
            socks,
            vec![
                TaskSocket {
                    pid: 100,
                    tid: 100,
                    fd: 3,
                    inode: 0x1_0000_0001,
                    netns: 4_026_531_840,
                    family: 10,
                    protocol: 6,
                    sock_type: 1,
                    state: 8,
                    start_ns: 77_000_000_000,
                },
                TaskSocket {
                    pid: 200,
                    tid: 201,
                    fd: 17,
                    inode: 42,
                    netns: 4_026_531_840,
                    family: 10,
                    protocol: 6,
                    sock_type: 1,
                    state: 10,
                    start_ns: 77_000_000_000,
                },
            ]
        );
        assert!(socks[0].is_tcp());
    }

    #[test]
    fn empty_output_is_no_sockets() {
        assert_eq!(parse_task_sockets(&[]), Ok(vec![]));
    }

    #[test]
    fn partial_record_is_an_error() {
        let mut out = record(1, 1, 0, 1, 1);
        out.pop();
        assert_eq!(parse_task_sockets(&out), Err(BadOutput(39)));
    }

    #[test]
    fn epoll_records_come_apart_and_unknown_kinds_are_refused() {
        let mut out = record(5, 6, 9, 0, 0);
        out[31] = 1; // kind: epoll
        out.extend(record(5, 5, 3, 42, 8));
        let fds = parse_task_fds(&out).unwrap();
        assert_eq!(
            fds.epolls,
            vec![TaskEpoll {
                pid: 5,
                tid: 6,
                fd: 9,
                start_ns: 77_000_000_000
            }]
        );
        assert_eq!(fds.sockets.len(), 1);
        assert_eq!(fds.sockets[0].fd, 3);
        out[31] = 7;
        assert_eq!(parse_task_fds(&out), Err(BadOutput(80)));
    }

    #[test]
    fn tcp_only_for_inet() {
        let mut s = parse_task_sockets(&record(1, 1, 0, 1, 1)).unwrap()[0];
        s.family = libc::AF_UNIX as u16;
        assert!(!s.is_tcp());
        s.family = libc::AF_INET as u16;
        s.protocol = libc::IPPROTO_UDP as u16;
        assert!(!s.is_tcp());
    }
}
