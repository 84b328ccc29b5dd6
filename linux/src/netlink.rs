//! Discovery: the NETLINK_SOCK_DIAG dump of CLOSE_WAIT TCP sockets.
//!
//! Owns the request (kernel-side state filter, INET_DIAG_INFO extension), the receive
//! loop (large buffer, NLMSG_DONE and the error it carries, NLMSG_ERROR, NLM_F_DUMP_INTR
//! retry, a receive timeout) and the parsing of one datagram into [`DiagSocket`]s. Parsing
//! takes bytes, not a socket, so it is tested on fixtures and fuzzed without a kernel.
//!
//! Every reply is matched to its request: the kernel addresses its answers to our port id
//! (the one `bind_auto` gave) and echoes the request's sequence number. A message that
//! carries another sequence number or port id is a stale answer to an earlier request (one
//! abandoned after an error, say): it is skipped and counted, never taken for this one's,
//! and its NLMSG_DONE or error does not end this exchange. A socket that saw any error is
//! not used again: [`crate::netns::Namespaces`] replaces it with a fresh one
//! ([`Diag::reopen`]), so leftovers of a failed dump are discarded with it.
//!
//! A dump is not a snapshot: the kernel walks its hash tables while sockets come and go,
//! and a socket that moves may be reported twice. Results are deduplicated by cookie.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use netlink_packet_core::{NLM_F_DUMP_INTR, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6};
use netlink_packet_sock_diag::inet::{InetResponse, StateFlags, nlas::Nla};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

use crate::tcp;

mod inodes;
mod request;
mod wire;
pub use request::Listed;
use request::{exact_request, inodes_request, request};
use wire::Wire;

/// A dump arrives in datagrams of up to ~32 KiB; a smaller buffer truncates silently.
const RECV_BUF: usize = 64 * 1024;
/// Kernel socket receive buffer, so a 100k-socket dump is not throttled by wakeups.
const SO_RCVBUF: usize = 4 * 1024 * 1024;
/// NLM_F_DUMP_INTR means the table changed under the dump: ask again, a bounded number of times.
const DUMP_RETRIES: usize = 5;
/// The kernel builds dump datagrams inside our recv(2), so an answer never takes long; the
/// timeout only keeps a wedged peer (or a fake one) from blocking a cycle for ever.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams in a row with nothing for the request in flight before the exchange is given
/// up as out of step.
const MAX_STALE_DATAGRAMS: usize = 256;

/// One CLOSE_WAIT socket as sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    /// Inode of the network namespace the socket lives in (0 until a [`Diag`] stamps it).
    pub netns: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// 0 for a socket that has no file yet (still in a listener's accept queue).
    pub inode: u64,
    pub uid: u32,
    pub cookie: u64,
    pub state: u8,
    pub recv_q: u32,
    pub send_q: u32,
    /// tcp_info `last_ack_recv`: ms since the last ACK from the peer. A lower bound on the
    /// time since the peer's FIN. None when the kernel sent no tcp_info.
    pub last_ack_recv_ms: Option<u32>,
    /// tcp_info `last_data_recv`: ms since data last arrived (or since the connection was
    /// set up, when none did). Neither keepalive probes nor the FIN reset it, and no data
    /// comes after a FIN: an upper bound on the time in CLOSE_WAIT.
    pub last_data_recv_ms: Option<u32>,
    /// A keepalive timer is armed (`idiag_timer` 2): probes answered by the peer keep
    /// resetting `last_ack_recv`. When the retransmit timer is armed too, it shows instead.
    pub keepalive: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("kernel answered the sock_diag dump with error {0}")]
    Kernel(io::Error),
    #[error("malformed sock_diag message at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: String },
    #[error("sock_diag dump kept being interrupted (NLM_F_DUMP_INTR) after {0} attempts")]
    Interrupted(usize),
    #[error("no answer on the sock_diag socket within {0:?}")]
    Timeout(Duration),
    #[error("{0} datagrams in a row held only stale answers (another sequence number or port id)")]
    OutOfStep(usize),
}

/// Whose answers a datagram should hold: the request's sequence number, addressed to our
/// port id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub seq: u32,
    pub port: u32,
}

/// What one datagram of a dump told us.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    pub sockets: Vec<DiagSocket>,
    /// Inodes of the sockets an inode dump listed ([`parse_inodes`]; 0 for a socket without
    /// a file).
    pub inodes: Vec<u64>,
    /// NLMSG_DONE was seen: the dump is complete.
    pub done: bool,
    /// A message carried NLM_F_DUMP_INTR: the result is inconsistent and must be redone.
    pub interrupted: bool,
    /// An NLMSG_ERROR with code 0 was seen: the ACK of a request that asked for one.
    pub acked: bool,
    /// Messages skipped as answers to another request (sequence number or port id).
    pub stale: usize,
}

/// The inet_diag cookie is two host-order u32 halves, low first (sock_diag_save_cookie).
pub fn cookie_from_id(raw: &[u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]) as u64;
    let hi = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]) as u64;
    (hi << 32) | lo
}

fn from_response(resp: &InetResponse) -> DiagSocket {
    let id = &resp.header.socket_id;
    let mut last_ack_recv_ms = None;
    let mut last_data_recv_ms = None;
    let mut state = resp.header.state;
    for nla in resp.nlas.iter() {
        if let Nla::TcpInfo(info) = nla {
            last_ack_recv_ms = tcp::tcp_info_u32(info, tcp::TCPI_LAST_ACK_RECV);
            last_data_recv_ms = tcp::tcp_info_u32(info, tcp::TCPI_LAST_DATA_RECV);
            if let Some(s) = info.get(tcp::TCPI_STATE) {
                state = *s;
            }
        }
    }
    DiagSocket {
        netns: 0,
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: SocketAddr::new(id.destination_address, id.destination_port),
        inode: u64::from(resp.header.inode),
        uid: resp.header.uid,
        cookie: cookie_from_id(&id.cookie),
        state,
        recv_q: resp.header.recv_queue,
        send_q: resp.header.send_queue,
        last_ack_recv_ms,
        last_data_recv_ms,
        keepalive: matches!(
            resp.header.timer,
            Some(netlink_packet_sock_diag::inet::Timer::KeepAlive(_))
        ),
    }
}

/// Parse one datagram of a sock_diag dump, taking every message as ours. Never panics on
/// arbitrary input.
pub fn parse_dump(buf: &[u8]) -> Result<Chunk, DumpError> {
    parse_reply(buf, None)
}

/// Parse one datagram of answers to the request `expect` describes: messages with another
/// sequence number or port id are skipped (counted in [`Chunk::stale`]) before their
/// payload is looked at. `None` takes every message. Never panics on arbitrary input.
pub fn parse_reply(buf: &[u8], expect: Option<Expect>) -> Result<Chunk, DumpError> {
    parse_with(buf, expect, false)
}

/// [`parse_reply`] for an inode dump: of each socket only its inode, read where the kernel
/// puts it ([`inodes::inode_of`]) into [`Chunk::inodes`].
pub fn parse_inodes(buf: &[u8], expect: Option<Expect>) -> Result<Chunk, DumpError> {
    parse_with(buf, expect, true)
}

fn parse_with(buf: &[u8], expect: Option<Expect>, inodes_only: bool) -> Result<Chunk, DumpError> {
    let mut chunk = Chunk::default();
    let mut offset = 0usize;
    while offset < buf.len() {
        let rest = &buf[offset..];
        // nlmsghdr: u32 len, u16 type, u16 flags, u32 seq, u32 pid.
        if rest.len() < 16 {
            return Err(DumpError::Malformed {
                offset,
                reason: format!(
                    "{} trailing bytes, shorter than a netlink header",
                    rest.len()
                ),
            });
        }
        let word =
            |at: usize| u32::from_ne_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
        let len = word(0) as usize;
        if len < 16 || len > rest.len() {
            return Err(DumpError::Malformed {
                offset,
                reason: format!("message length {len} with {} bytes left", rest.len()),
            });
        }
        // Messages are 4-byte aligned.
        let next = offset + ((len + 3) & !3);
        if let Some(e) = expect
            && (word(8) != e.seq || word(12) != e.port)
        {
            chunk.stale += 1;
            offset = next;
            continue;
        }
        if inodes_only && u16::from_ne_bytes([rest[4], rest[5]]) == inodes::SOCK_DIAG_BY_FAMILY {
            chunk.interrupted |= u16::from_ne_bytes([rest[6], rest[7]]) & NLM_F_DUMP_INTR != 0;
            let inode = inodes::inode_of(&rest[16..len])
                .map_err(|reason| DumpError::Malformed { offset, reason })?;
            chunk.inodes.push(inode);
            offset = next;
            continue;
        }
        let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rest[..len]).map_err(|e| {
            DumpError::Malformed {
                offset,
                reason: e.to_string(),
            }
        })?;
        if msg.header.flags & NLM_F_DUMP_INTR != 0 {
            chunk.interrupted = true;
        }
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(resp)) => {
                chunk.sockets.push(from_response(&resp));
            }
            NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(resp)) => {
                chunk.inodes.push(u64::from(resp.header.inode));
            }
            NetlinkPayload::Done(done) => {
                // The dump's final status: negative when the kernel gave up part way
                // (e.g. -ENOBUFS, -EINTR); what came before is then not the whole table.
                if done.code < 0 {
                    return Err(DumpError::Kernel(io::Error::from_raw_os_error(
                        done.code.saturating_neg(),
                    )));
                }
                chunk.done = true;
                return Ok(chunk);
            }
            NetlinkPayload::Error(err) => {
                // An error message with code 0 is an ACK; anything else ends the exchange.
                match err.code {
                    Some(code) => {
                        return Err(DumpError::Kernel(io::Error::from_raw_os_error(
                            code.get().saturating_neg(),
                        )));
                    }
                    None => chunk.acked = true,
                }
            }
            _ => {}
        }
        offset = next;
    }
    Ok(chunk)
}

/// How a [`Diag`] came to be, so a fresh one can be made the same way ([`Diag::reopen`]).
enum Origin {
    /// In cwreap's own network namespace.
    Own,
    /// Inside the namespace this file (/proc/PID/ns/net, opened once) refers to. Holding it
    /// keeps nothing alive that the socket does not: a socket pins its namespace too.
    Netns(File),
    /// A fake kernel: there is nothing to reopen.
    #[cfg(test)]
    Fake,
}

/// A sock_diag netlink socket of the network namespace it was created in.
pub struct Diag {
    socket: Wire,
    buf: Vec<u8>,
    seq: u32,
    /// Our port id: the kernel addresses its answers to it.
    port: u32,
    netns: u64,
    origin: Origin,
    /// How long one recv may wait ([`RECV_TIMEOUT`]).
    timeout: Duration,
}

/// Inode of the network namespace behind a /proc/<pid>/ns/net style path.
pub fn netns_inode(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

fn own_netns() -> Option<u64> {
    netns_inode(Path::new("/proc/self/ns/net")).ok()
}

impl Diag {
    /// A socket in our own network namespace.
    pub fn new() -> io::Result<Self> {
        Self::create(own_netns().unwrap_or(0), Origin::Own)
    }

    fn create(netns: u64, origin: Origin) -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        let port = socket.bind_auto()?.port_number();
        socket.connect(&NlAddr::new(0, 0))?;
        // Best effort: a larger kernel buffer only saves wakeups.
        let _ = socket.set_rx_buf_sz(SO_RCVBUF);
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(RECV_TIMEOUT),
        )?;
        Ok(Self {
            socket: Wire::Kernel(socket),
            buf: vec![0u8; RECV_BUF],
            seq: 0,
            port,
            netns,
            origin,
            timeout: RECV_TIMEOUT,
        })
    }

    /// A socket inside the network namespace at `ns_path` (e.g. /proc/PID/ns/net).
    pub fn in_netns(ns_path: &Path) -> io::Result<Self> {
        let file = File::open(ns_path)?;
        let netns = file.metadata()?.ino();
        if own_netns() == Some(netns) {
            return Self::create(netns, Origin::Own);
        }
        Self::enter(file, netns)
    }

    /// A netlink socket sees only the namespace it was created in, so a short-lived thread
    /// joins the namespace, creates the socket and ends; the rest of cwreap stays put.
    fn enter(file: File, netns: u64) -> io::Result<Self> {
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    crate::sys::join_netns(file.as_fd())?;
                    Self::create(netns, Origin::Netns(file))
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
        })
    }

    /// A fresh socket of the same namespace, made the way this one was: the one to use
    /// after an error, whose leftovers go away with this one.
    pub fn reopen(&self) -> io::Result<Self> {
        match &self.origin {
            Origin::Own => Self::create(self.netns, Origin::Own),
            Origin::Netns(file) => Self::enter(file.try_clone()?, self.netns),
            #[cfg(test)]
            Origin::Fake => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a fake kernel cannot be reopened",
            )),
        }
    }

    /// A Diag that talks to whatever answers on the other end of `peer` (a connected unix
    /// datagram socket) instead of the kernel; its port id is 0. A seam for tests of the
    /// receive loop: the kernel's inet_diag dump never sets NLM_F_DUMP_INTR, so the retry
    /// cannot be provoked for real; a fake kernel can send it, stale or malformed answers
    /// too. It cannot be reopened.
    #[cfg(test)]
    pub fn over(peer: std::os::unix::net::UnixDatagram, netns: u64) -> Self {
        // Best effort, like the kernel socket's: a fake that never answers times out.
        let _ = peer.set_read_timeout(Some(RECV_TIMEOUT));
        Self {
            socket: Wire::Fake(peer),
            buf: vec![0u8; RECV_BUF],
            seq: 0,
            port: 0,
            netns,
            origin: Origin::Fake,
            timeout: RECV_TIMEOUT,
        }
    }

    /// Wait at most `timeout` for each answer of a fake kernel (tests of a silent peer).
    #[cfg(test)]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        if let Wire::Fake(s) = &self.socket {
            let _ = s.set_read_timeout(Some(timeout));
            self.timeout = timeout;
        }
        self
    }

    /// The network namespace this socket reports on.
    pub fn netns(&self) -> u64 {
        self.netns
    }

    /// Our netlink port id (0 for a fake kernel).
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Every CLOSE_WAIT TCP socket, IPv4 and IPv6, with tcp_info.
    pub fn close_wait(&mut self) -> Result<Vec<DiagSocket>, DumpError> {
        self.dump_states(StateFlags::CLOSE_WAIT)
    }

    /// Every listening TCP socket (to place sockets still in an accept queue).
    pub fn listeners(&mut self) -> Result<Vec<DiagSocket>, DumpError> {
        self.dump_states(StateFlags::LISTEN)
    }

    fn dump_states(&mut self, states: StateFlags) -> Result<Vec<DiagSocket>, DumpError> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            out.extend(self.dump_family(family, states.clone())?);
        }
        let mut seen = HashSet::with_capacity(out.len());
        out.retain(|s| seen.insert(s.cookie));
        for s in &mut out {
            s.netns = self.netns;
        }
        Ok(out)
    }

    fn next_seq(&mut self) -> Expect {
        self.seq = self.seq.wrapping_add(1);
        Expect {
            seq: self.seq,
            port: self.port,
        }
    }

    /// Send `req` and read answers to it with `parse` until `enough` says so, skipping
    /// anything that is not an answer to it. The first error ends the exchange.
    fn exchange(
        &mut self,
        req: &[u8],
        expect: Expect,
        parse: fn(&[u8], Option<Expect>) -> Result<Chunk, DumpError>,
        enough: impl Fn(&Chunk) -> bool,
    ) -> Result<Chunk, DumpError> {
        self.socket.send(req)?;
        let mut all = Chunk::default();
        let mut idle = 0usize;
        loop {
            let (n, from_kernel) = match self.socket.recv(&mut self.buf) {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(DumpError::Timeout(self.timeout));
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(DumpError::Malformed {
                    offset: 0,
                    reason: "empty datagram before the answer was complete".into(),
                });
            }
            let chunk = if from_kernel {
                parse(&self.buf[..n], Some(expect))?
            } else {
                Chunk {
                    stale: 1,
                    ..Chunk::default()
                }
            };
            let useful =
                !chunk.sockets.is_empty() || !chunk.inodes.is_empty() || chunk.done || chunk.acked;
            idle = if useful { 0 } else { idle + 1 };
            all.sockets.extend(chunk.sockets);
            all.inodes.extend(chunk.inodes);
            all.interrupted |= chunk.interrupted;
            all.done |= chunk.done;
            all.acked |= chunk.acked;
            all.stale += chunk.stale;
            if enough(&all) {
                return Ok(all);
            }
            if idle >= MAX_STALE_DATAGRAMS {
                return Err(DumpError::OutOfStep(idle));
            }
        }
    }

    /// The socket as the kernel sees it now, found by its exact 4-tuple and cookie; None
    /// when it no longer exists.
    pub fn lookup(&mut self, s: &DiagSocket) -> Result<Option<DiagSocket>, DumpError> {
        let expect = self.next_seq();
        let req = exact_request(s.local, s.remote, s.cookie, expect.seq, false);
        // Not a dump: one answer, or an error (ENOENT when the socket is gone).
        let one = |c: &Chunk| !c.sockets.is_empty() || c.done || c.acked;
        match self.exchange(&req, expect, parse_reply, one) {
            Ok(chunk) => Ok(chunk.sockets.into_iter().next().map(|mut found| {
                found.netns = self.netns;
                found
            })),
            Err(DumpError::Kernel(e)) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// SOCK_DESTROY: reset the socket (RST to the peer, ECONNABORTED to the owner) without
    /// touching any process. Needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY; the kernel
    /// matches the exact 4-tuple and the cookie, so only this very socket can be hit.
    pub fn destroy(&mut self, s: &DiagSocket) -> Result<(), DumpError> {
        let expect = self.next_seq();
        let req = exact_request(s.local, s.remote, s.cookie, expect.seq, true);
        self.exchange(&req, expect, parse_reply, |c| c.acked || c.done)
            .map(|_| ())
    }

    fn dump_family(
        &mut self,
        family: u8,
        states: StateFlags,
    ) -> Result<Vec<DiagSocket>, DumpError> {
        for _ in 0..DUMP_RETRIES {
            if let Some(sockets) = self.dump_once(family, states.clone())? {
                return Ok(sockets);
            }
        }
        Err(DumpError::Interrupted(DUMP_RETRIES))
    }

    /// The inodes of every socket of kind `listed` the kernel lists in this namespace
    /// (both families for TCP and UDP), retried like a dump when interrupted.
    pub fn inodes(&mut self, listed: Listed) -> Result<Vec<u64>, DumpError> {
        let families: &[u8] = match listed {
            Listed::Unix => &[0],
            Listed::TcpOthers | Listed::Udp => &[AF_INET, AF_INET6],
        };
        let mut out = Vec::new();
        for &family in families {
            let mut got = None;
            for _ in 0..DUMP_RETRIES {
                let expect = self.next_seq();
                let req = inodes_request(listed, family, expect.seq);
                let chunk = self.exchange(&req, expect, parse_inodes, |c| c.done)?;
                if !chunk.interrupted {
                    got = Some(chunk);
                    break;
                }
            }
            let chunk = got.ok_or(DumpError::Interrupted(DUMP_RETRIES))?;
            out.extend(chunk.inodes.into_iter().filter(|&i| i != 0));
        }
        Ok(out)
    }

    /// One dump; None when the kernel flagged it interrupted.
    fn dump_once(
        &mut self,
        family: u8,
        states: StateFlags,
    ) -> Result<Option<Vec<DiagSocket>>, DumpError> {
        let expect = self.next_seq();
        let req = request(family, states, expect.seq);
        let chunk = self.exchange(&req, expect, parse_reply, |c| c.done)?;
        Ok((!chunk.interrupted).then_some(chunk.sockets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::CLOSE_WAIT as TCP_CLOSE_WAIT;

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_MULTI: u16 = 2;

    fn nlmsghdr(len: u32, kind: u16, flags: u16) -> Vec<u8> {
        nlmsghdr_to(len, kind, flags, 7, 0)
    }

    /// A header answering request `seq`, addressed to port id `pid`.
    fn nlmsghdr_to(len: u32, kind: u16, flags: u16, seq: u32, pid: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&len.to_ne_bytes()); // nlmsg_len: header + payload
        b.extend_from_slice(&kind.to_ne_bytes()); // nlmsg_type
        b.extend_from_slice(&flags.to_ne_bytes()); // nlmsg_flags
        b.extend_from_slice(&seq.to_ne_bytes()); // nlmsg_seq: the request's
        b.extend_from_slice(&pid.to_ne_bytes()); // nlmsg_pid: the receiver's port id
        b
    }

    /// One SOCK_DIAG_BY_FAMILY answer for 127.0.0.1:8080 ← 127.0.0.2:40000 in CLOSE_WAIT,
    /// with a tcp_info attribute of `info_len` bytes (the kernel may send fewer than we know).
    fn close_wait_msg(flags: u16, info_len: usize) -> Vec<u8> {
        let mut m = vec![
            2, // idiag_family: AF_INET
            8, // idiag_state: TCP_CLOSE_WAIT
            0, // idiag_timer
            0, // idiag_retrans
        ];
        m.extend_from_slice(&8080u16.to_be_bytes()); // id.idiag_sport (network order)
        m.extend_from_slice(&40000u16.to_be_bytes()); // id.idiag_dport (network order)
        m.extend_from_slice(&[127, 0, 0, 1]); // id.idiag_src (IPv4 uses the first 4 bytes)
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&[127, 0, 0, 2]); // id.idiag_dst
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&0u32.to_ne_bytes()); // id.idiag_if
        m.extend_from_slice(&0x0000_0001u32.to_ne_bytes()); // id.idiag_cookie[0]: low half
        m.extend_from_slice(&0x0000_0002u32.to_ne_bytes()); // id.idiag_cookie[1]: high half
        m.extend_from_slice(&0u32.to_ne_bytes()); // idiag_expires
        m.extend_from_slice(&1u32.to_ne_bytes()); // idiag_rqueue: the FIN counts as 1
        m.extend_from_slice(&0u32.to_ne_bytes()); // idiag_wqueue
        m.extend_from_slice(&1000u32.to_ne_bytes()); // idiag_uid
        m.extend_from_slice(&123_456u32.to_ne_bytes()); // idiag_inode
        assert_eq!(m.len(), 72, "struct inet_diag_msg");
        let mut info = vec![0u8; info_len];
        if info_len > 0 {
            info[0] = 8; // tcpi_state: CLOSE_WAIT
        }
        if info_len >= 60 {
            info[56..60].copy_from_slice(&90_000u32.to_ne_bytes()); // tcpi_last_ack_recv (ms)
        }
        let rta_len = 4 + info.len();
        m.extend_from_slice(&(rta_len as u16).to_ne_bytes()); // rta_len
        m.extend_from_slice(&2u16.to_ne_bytes()); // rta_type: INET_DIAG_INFO
        m.extend_from_slice(&info);
        while m.len() % 4 != 0 {
            m.push(0); // attribute padding
        }
        let mut out = nlmsghdr((16 + m.len()) as u32, SOCK_DIAG_BY_FAMILY, flags);
        out.extend_from_slice(&m);
        out
    }

    fn done() -> Vec<u8> {
        let mut b = nlmsghdr(20, NLMSG_DONE, NLM_F_MULTI);
        b.extend_from_slice(&0i32.to_ne_bytes()); // the dump's final status
        b
    }

    #[test]
    fn parses_a_close_wait_socket_and_done() {
        let mut buf = close_wait_msg(NLM_F_MULTI, 232);
        buf.extend(close_wait_msg(NLM_F_MULTI, 232));
        buf.extend(done());
        let chunk = parse_dump(&buf).expect("valid dump");
        assert!(chunk.done);
        assert!(!chunk.interrupted);
        assert_eq!(chunk.sockets.len(), 2);
        let s = &chunk.sockets[0];
        assert_eq!(s.local, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(s.remote, "127.0.0.2:40000".parse().expect("addr"));
        assert_eq!(s.inode, 123_456);
        assert_eq!(s.uid, 1000);
        assert_eq!(s.cookie, (2u64 << 32) | 1);
        assert_eq!(s.state, TCP_CLOSE_WAIT);
        assert_eq!((s.recv_q, s.send_q), (1, 0));
        assert_eq!(s.last_ack_recv_ms, Some(90_000));
    }

    #[test]
    fn short_tcp_info_gives_no_age_rather_than_garbage() {
        let mut buf = close_wait_msg(NLM_F_MULTI, 40);
        buf.extend(done());
        let chunk = parse_dump(&buf).expect("valid dump");
        assert_eq!(chunk.sockets[0].last_ack_recv_ms, None);
        assert_eq!(chunk.sockets[0].state, TCP_CLOSE_WAIT);
    }

    #[test]
    fn a_datagram_without_done_is_not_the_end() {
        let chunk = parse_dump(&close_wait_msg(NLM_F_MULTI, 232)).expect("valid");
        assert!(!chunk.done);
        assert_eq!(chunk.sockets.len(), 1);
    }

    #[test]
    fn dump_intr_is_flagged() {
        let mut buf = close_wait_msg(NLM_F_MULTI | NLM_F_DUMP_INTR, 232);
        buf.extend(done());
        assert!(parse_dump(&buf).expect("valid").interrupted);
    }

    #[test]
    fn kernel_error_is_an_error() {
        let mut b = nlmsghdr(36, NLMSG_ERROR, 0);
        b.extend_from_slice(&(-libc::EPERM).to_ne_bytes()); // nlmsgerr.error
        b.extend_from_slice(&nlmsghdr(16, SOCK_DIAG_BY_FAMILY, 0)); // the offending request
        match parse_dump(&b) {
            Err(DumpError::Kernel(e)) => assert_eq!(e.raw_os_error(), Some(libc::EPERM)),
            other => panic!("expected a kernel error, got {other:?}"),
        }
    }

    #[test]
    fn truncated_input_is_malformed_not_a_panic() {
        let full = close_wait_msg(NLM_F_MULTI, 232);
        for cut in [1, 15, 16, 40, 87, 88, full.len() - 1] {
            assert!(parse_dump(&full[..cut]).is_err(), "cut at {cut}");
        }
        // A length field pointing past the end.
        let mut lying = full.clone();
        lying[0..4].copy_from_slice(&10_000u32.to_ne_bytes());
        assert!(matches!(
            parse_dump(&lying),
            Err(DumpError::Malformed { .. })
        ));
        assert_eq!(parse_dump(&[]).expect("empty is fine").sockets.len(), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: xorshift noise, and mutations of a valid message.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid = close_wait_msg(NLM_F_MULTI, 232);
        for round in 0..20_000 {
            let mut buf = if round % 2 == 0 {
                valid.clone()
            } else {
                (0..(next() % 300) as usize).map(|_| next() as u8).collect()
            };
            if !buf.is_empty() {
                for _ in 0..(next() % 8) {
                    let i = (next() as usize) % buf.len();
                    buf[i] = next() as u8;
                }
            }
            let _ = parse_dump(&buf);
        }
    }

    /// `msg` readdressed: answering request `seq`, to port id `pid`.
    fn to(mut msg: Vec<u8>, seq: u32, pid: u32) -> Vec<u8> {
        msg[8..12].copy_from_slice(&seq.to_ne_bytes()); // nlmsg_seq
        msg[12..16].copy_from_slice(&pid.to_ne_bytes()); // nlmsg_pid
        msg
    }

    /// A CLOSE_WAIT answer whose cookie (and inode) is `id`.
    fn socket_msg(id: u32, seq: u32, pid: u32) -> Vec<u8> {
        let mut m = to(close_wait_msg(NLM_F_MULTI, 232), seq, pid);
        // nlmsghdr (16) + family, state, timer, retrans (4) + ports (4) + addresses (32)
        // + interface (4): the cookie's low half is at 60, the inode at 84.
        m[60..64].copy_from_slice(&id.to_ne_bytes()); // id.idiag_cookie[0]
        m[64..68].copy_from_slice(&0u32.to_ne_bytes()); // id.idiag_cookie[1]
        m[84..88].copy_from_slice(&id.to_ne_bytes()); // idiag_inode
        m
    }

    /// NLMSG_DONE of request `seq` to port `pid`, with the dump's final status.
    fn done_with(status: i32, seq: u32, pid: u32) -> Vec<u8> {
        let mut b = nlmsghdr_to(20, NLMSG_DONE, NLM_F_MULTI, seq, pid);
        b.extend_from_slice(&status.to_ne_bytes()); // int: 0, or -errno when the dump failed
        b
    }

    /// NLMSG_ERROR of request `seq` to port `pid`: `code` 0 is an ACK.
    fn error_with(code: i32, seq: u32, pid: u32) -> Vec<u8> {
        let mut b = nlmsghdr_to(36, NLMSG_ERROR, 0, seq, pid);
        b.extend_from_slice(&code.to_ne_bytes()); // nlmsgerr.error: -errno, or 0 for an ACK
        b.extend_from_slice(&nlmsghdr_to(16, SOCK_DIAG_BY_FAMILY, 0, seq, pid)); // nlmsgerr.msg
        b
    }

    const OURS: Expect = Expect { seq: 7, port: 4242 };

    #[test]
    fn answers_to_another_request_or_port_are_skipped() {
        let mut buf = socket_msg(1, 6, 4242); // an earlier request's answer
        buf.extend(socket_msg(2, 7, 99)); // right sequence number, someone else's port
        buf.extend(done_with(0, 6, 4242)); // the earlier request's end: not ours
        buf.extend(error_with(-libc::EPERM, 5, 4242)); // an earlier request's error
        buf.extend(socket_msg(3, 7, 4242)); // ours
        buf.extend(done_with(0, 7, 4242)); // ours: the end
        let chunk = parse_reply(&buf, Some(OURS)).expect("valid reply");
        let cookies: Vec<u64> = chunk.sockets.iter().map(|s| s.cookie).collect();
        assert_eq!(cookies, [3]);
        assert_eq!(chunk.stale, 4);
        assert!(chunk.done);
        // Without an expectation every message counts (the fuzzed entry point), and the
        // first DONE ends the datagram.
        let all = parse_dump(&buf).expect("valid dump");
        assert_eq!(all.sockets.len(), 2);
        assert!(all.done && all.stale == 0);
    }

    #[test]
    fn the_error_in_done_is_a_kernel_error() {
        let mut buf = socket_msg(1, 7, 4242);
        buf.extend(done_with(-libc::ENOBUFS, 7, 4242));
        match parse_reply(&buf, Some(OURS)) {
            Err(DumpError::Kernel(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS)),
            other => panic!("expected a kernel error, got {other:?}"),
        }
        // Status 0, and a DONE without a status at all (length 16), both end cleanly.
        assert!(
            parse_reply(&done_with(0, 7, 4242), Some(OURS))
                .expect("ok")
                .done
        );
        let bare = nlmsghdr_to(16, NLMSG_DONE, NLM_F_MULTI, 7, 4242);
        assert!(parse_reply(&bare, Some(OURS)).expect("ok").done);
    }

    #[test]
    fn an_ack_is_not_an_error() {
        let chunk = parse_reply(&error_with(0, 7, 4242), Some(OURS)).expect("an ACK");
        assert!(chunk.acked && !chunk.done && chunk.sockets.is_empty());
        assert!(matches!(
            parse_reply(&error_with(-libc::EOPNOTSUPP, 7, 4242), Some(OURS)),
            Err(DumpError::Kernel(e)) if e.raw_os_error() == Some(libc::EOPNOTSUPP)
        ));
    }

    /// A fake kernel on a socketpair: for the n-th request (from 0), with its sequence
    /// number, the datagrams `script` gives. Answers `requests` requests, then ends (a
    /// datagram socket sees no EOF when the other side closes); a recv timeout guards it.
    fn fake_kernel(
        requests: usize,
        script: impl Fn(usize, u32) -> Vec<Vec<u8>> + Send + 'static,
    ) -> (Diag, std::thread::JoinHandle<usize>) {
        let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("fake kernel timeout");
        let kernel = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut n = 0;
            while n < requests
                && let Ok(len) = theirs.recv(&mut buf)
            {
                if len < 16 {
                    break;
                }
                let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]); // nlmsg_seq
                for dgram in script(n, seq) {
                    if theirs.send(&dgram).is_err() {
                        return n;
                    }
                }
                n += 1;
            }
            n
        });
        (Diag::over(ours, 77), kernel)
    }

    #[test]
    fn a_dump_skips_stale_datagrams_and_reports_each_socket_once() {
        // The fake's port id is 0 (see Diag::over).
        let (mut diag, kernel) = fake_kernel(2, |n, seq| match n {
            // IPv4: first the tail of an abandoned earlier dump, then ours in two
            // datagrams; socket 2 moved while the kernel walked and shows up twice.
            0 => vec![
                [
                    socket_msg(9, seq.wrapping_sub(1), 0),
                    done_with(0, seq.wrapping_sub(1), 0),
                ]
                .concat(),
                [socket_msg(1, seq, 0), socket_msg(2, seq, 0)].concat(),
                [
                    socket_msg(2, seq, 0),
                    socket_msg(3, seq, 0),
                    done_with(0, seq, 0),
                ]
                .concat(),
            ],
            // IPv6: nothing.
            _ => vec![done_with(0, seq, 0)],
        });
        let sockets = diag.close_wait().expect("dump");
        let cookies: Vec<u64> = sockets.iter().map(|s| s.cookie).collect();
        assert_eq!(cookies, [1, 2, 3]);
        assert!(sockets.iter().all(|s| s.netns == 77));
        drop(diag);
        assert_eq!(
            kernel.join().expect("fake kernel"),
            2,
            "one request per family"
        );
    }

    #[test]
    fn lookup_and_destroy_wait_for_their_own_answer() {
        let (mut diag, kernel) = fake_kernel(3, |n, seq| match n {
            // lookup: an earlier request's ENOENT must not pass for this one's answer.
            0 => vec![
                error_with(-libc::ENOENT, seq.wrapping_sub(1), 0),
                to(close_wait_msg(0, 232), seq, 0),
            ],
            // destroy: a stale ACK, then ours.
            1 => vec![error_with(0, seq.wrapping_sub(1), 0), error_with(0, seq, 0)],
            // destroy: refused.
            _ => vec![error_with(-libc::EPERM, seq, 0)],
        });
        let want = parse_dump(&close_wait_msg(0, 232))
            .expect("valid")
            .sockets
            .remove(0);
        let found = diag.lookup(&want).expect("lookup").expect("still there");
        assert_eq!(found.cookie, want.cookie);
        diag.destroy(&want).expect("acked");
        assert!(
            matches!(diag.destroy(&want), Err(DumpError::Kernel(e)) if e.raw_os_error() == Some(libc::EPERM))
        );
        drop(diag);
        assert_eq!(kernel.join().expect("fake kernel"), 3);
    }

    /// The answer to request `seq`: sockets `ids` in one datagram (each message also
    /// flagged `flags`), then NLMSG_DONE in another.
    fn answer(ids: &[u32], seq: u32, flags: u16) -> Vec<Vec<u8>> {
        let mut first = Vec::new();
        for &id in ids {
            let mut m = socket_msg(id, seq, 0);
            m[6..8].copy_from_slice(&(NLM_F_MULTI | flags).to_ne_bytes()); // nlmsg_flags
            first.extend(m);
        }
        let done = done_with(0, seq, 0);
        if first.is_empty() {
            vec![done]
        } else {
            vec![first, done]
        }
    }

    #[test]
    fn an_interrupted_dump_is_retried_and_only_the_consistent_one_counts() {
        // IPv4: the first dump is interrupted (it saw 1 and 2), the retry sees 1 and 3.
        // IPv6: nothing.
        let (mut diag, kernel) = fake_kernel(3, |n, seq| match n {
            0 => answer(&[1, 2], seq, NLM_F_DUMP_INTR),
            1 => answer(&[1, 3], seq, 0),
            _ => answer(&[], seq, 0),
        });
        let mut cookies: Vec<u64> = diag
            .close_wait()
            .expect("a consistent dump after one retry")
            .iter()
            .map(|s| s.cookie)
            .collect();
        cookies.sort_unstable();
        assert_eq!(
            cookies,
            [1, 3],
            "the interrupted dump leaked into the result"
        );
        drop(diag);
        assert_eq!(
            kernel.join().expect("fake kernel"),
            3,
            "IPv4 twice, IPv6 once"
        );
    }

    #[test]
    fn a_dump_interrupted_every_time_gives_up_after_five_attempts() {
        let (mut diag, kernel) = fake_kernel(10, |_, seq| answer(&[1], seq, NLM_F_DUMP_INTR));
        assert!(matches!(
            diag.close_wait(),
            Err(DumpError::Interrupted(n)) if n == DUMP_RETRIES
        ));
        drop(diag);
        assert_eq!(
            kernel.join().expect("fake kernel"),
            DUMP_RETRIES,
            "bounded: that many attempts, then stop"
        );
    }

    #[test]
    fn a_silent_or_out_of_step_peer_ends_the_exchange() {
        let (diag, _kernel) = fake_kernel(1, |_, _| Vec::new());
        let mut diag = diag.with_timeout(Duration::from_millis(50));
        assert!(matches!(diag.close_wait(), Err(DumpError::Timeout(_))));
        // Answers that are never ours: given up after a bounded number of datagrams.
        let (mut diag, _kernel) = fake_kernel(1, |_, seq| {
            (0..MAX_STALE_DATAGRAMS + 10)
                .map(|_| done_with(0, seq.wrapping_add(100), 0))
                .collect()
        });
        assert!(
            matches!(diag.close_wait(), Err(DumpError::OutOfStep(n)) if n == MAX_STALE_DATAGRAMS)
        );
    }

    #[test]
    fn reopen_gives_a_fresh_socket_of_the_same_namespace() {
        let diag = Diag::new().expect("sock_diag socket");
        let mut fresh = diag.reopen().expect("reopen");
        assert_eq!(fresh.netns(), diag.netns());
        assert_ne!(fresh.port(), diag.port(), "a new socket, not the old one");
        assert_ne!(fresh.port(), 0);
        fresh.close_wait().expect("the fresh socket dumps");
        let (fake, _kernel) = fake_kernel(0, |_, _| Vec::new());
        assert!(fake.reopen().is_err(), "a fake kernel cannot be reopened");
    }

    #[test]
    fn live_dump_works() {
        // Any host can be asked; the result just has to be self-consistent.
        let Ok(mut diag) = Diag::new() else {
            panic!("cannot open NETLINK_SOCK_DIAG");
        };
        let sockets = diag.close_wait().expect("dump");
        assert!(sockets.iter().all(|s| s.state == TCP_CLOSE_WAIT));
    }

    #[test]
    fn inode_dumps_list_live_sockets_and_never_a_dead_one() {
        use std::net::{TcpListener, TcpStream, UdpSocket};
        let inode = |f: &dyn AsFd| rustix::fs::fstat(f.as_fd()).expect("fstat").st_ino;
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let v6 = TcpListener::bind("[::1]:0").ok();
        // A dead socket: its peer reset it (SO_LINGER 0, close): CLOSE, in no table.
        let doomed = TcpStream::connect(addr).expect("connect");
        let (dead, _) = listener.accept().expect("accept");
        rustix::net::sockopt::set_socket_linger(&doomed, Some(Duration::ZERO)).expect("linger");
        drop(doomed);
        let mut diag = Diag::new().expect("sock_diag socket");
        // The reset arrives at once on loopback; allow it a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let tcp = loop {
            let tcp: HashSet<u64> = diag
                .inodes(Listed::TcpOthers)
                .expect("tcp")
                .into_iter()
                .collect();
            if !tcp.contains(&inode(&dead)) || std::time::Instant::now() > deadline {
                break tcp;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let unix: HashSet<u64> = diag
            .inodes(Listed::Unix)
            .expect("unix")
            .into_iter()
            .collect();
        let udp_live: HashSet<u64> = diag.inodes(Listed::Udp).expect("udp").into_iter().collect();
        assert!(unix.contains(&inode(&a)) && unix.contains(&inode(&b)));
        assert!(udp_live.contains(&inode(&udp)));
        for live in [&listener as &dyn AsFd, &client, &server] {
            assert!(tcp.contains(&inode(live)), "a live TCP socket is listed");
        }
        if let Some(v6) = &v6 {
            assert!(tcp.contains(&inode(v6)), "IPv6 too");
        }
        assert!(!tcp.contains(&inode(&dead)), "a dead socket is in no table");
        assert!(
            !tcp.contains(&0) && !unix.contains(&0),
            "sockets without a file are left out"
        );
        assert!(!unix.contains(&inode(&client)) && !tcp.contains(&inode(&a)));
    }

    // Inode dumps: the inode read in place, the rest as for any dump.
    const US: Expect = Expect { seq: 7, port: 99 };

    fn inode_header(len: usize, kind: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u32).to_ne_bytes()); // nlmsg_len: header + payload
        b.extend_from_slice(&kind.to_ne_bytes()); // nlmsg_type
        b.extend_from_slice(&flags.to_ne_bytes()); // nlmsg_flags
        b.extend_from_slice(&seq.to_ne_bytes()); // nlmsg_seq: the request's
        b.extend_from_slice(&US.port.to_ne_bytes()); // nlmsg_pid: our port id
        b
    }

    /// An answer to a unix dump: `struct unix_diag_msg` of the socket `inode`.
    fn unix_answer(inode: u32, flags: u16, seq: u32) -> Vec<u8> {
        let mut m = inode_header(32, SOCK_DIAG_BY_FAMILY, flags, seq);
        m.extend_from_slice(&[
            1, // udiag_family: AF_UNIX
            1, // udiag_type: SOCK_STREAM
            1, // udiag_state: TCP_ESTABLISHED (a connected pair)
            0, // pad
        ]);
        m.extend_from_slice(&inode.to_ne_bytes()); // udiag_ino
        m.extend_from_slice(&[0xab; 8]); // udiag_cookie
        m
    }

    /// An answer to a TCP dump: `struct inet_diag_msg` of the socket `inode`, then an
    /// INET_DIAG_SHUTDOWN attribute, as the kernel sends unasked.
    fn inet_answer(inode: u32, seq: u32) -> Vec<u8> {
        let mut m = inode_header(16 + 72 + 8, SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, seq);
        m.extend_from_slice(&[
            10, // idiag_family: AF_INET6
            1,  // idiag_state: TCP_ESTABLISHED
            0,  // idiag_timer
            0,  // idiag_retrans
        ]);
        m.extend_from_slice(&[0x5a; 48]); // id: ports, addresses, interface, cookie
        m.extend_from_slice(&0u32.to_ne_bytes()); // idiag_expires
        m.extend_from_slice(&0u32.to_ne_bytes()); // idiag_rqueue
        m.extend_from_slice(&0u32.to_ne_bytes()); // idiag_wqueue
        m.extend_from_slice(&1000u32.to_ne_bytes()); // idiag_uid
        m.extend_from_slice(&inode.to_ne_bytes()); // idiag_inode
        m.extend_from_slice(&5u16.to_ne_bytes()); // rta_len
        m.extend_from_slice(&8u16.to_ne_bytes()); // rta_type: INET_DIAG_SHUTDOWN
        m.extend_from_slice(&[0, 0, 0, 0]); // sk_shutdown, padding
        m
    }

    fn inode_done(seq: u32) -> Vec<u8> {
        let mut b = inode_header(20, NLMSG_DONE, NLM_F_MULTI, seq);
        b.extend_from_slice(&0i32.to_ne_bytes()); // the dump's final status
        b
    }

    #[test]
    fn inodes_are_read_from_unix_and_inet_answers_and_stale_ones_skipped() {
        let mut buf = unix_answer(41, NLM_F_MULTI, 7);
        buf.extend(inet_answer(42, 7));
        buf.extend(inet_answer(43, 6)); // an answer to an earlier request
        buf.extend(unix_answer(44, NLM_F_MULTI, 7));
        buf.extend(inode_done(6)); // the earlier request's end: not ours
        buf.extend(inet_answer(0, 7)); // no file (TIME_WAIT, a request socket)
        buf.extend(inode_done(7));
        buf.extend(unix_answer(45, NLM_F_MULTI, 7)); // past the end: never read
        let chunk = parse_inodes(&buf, Some(US)).expect("valid");
        assert_eq!(chunk.inodes, [41, 42, 44, 0]);
        assert_eq!(chunk.stale, 2);
        assert!(chunk.done && !chunk.interrupted);
        assert!(chunk.sockets.is_empty(), "nothing decoded in full");
    }

    #[test]
    fn an_interrupted_dump_and_the_error_in_done_are_seen() {
        let mut buf = unix_answer(41, NLM_F_MULTI | NLM_F_DUMP_INTR, 7);
        buf.extend(inode_done(7));
        assert!(parse_inodes(&buf, Some(US)).expect("valid").interrupted);
        let mut failed = inode_header(20, NLMSG_DONE, NLM_F_MULTI, 7);
        failed.extend_from_slice(&(-libc::ENOBUFS).to_ne_bytes()); // the dump's final status
        assert!(matches!(
            parse_inodes(&failed, Some(US)),
            Err(DumpError::Kernel(e)) if e.raw_os_error() == Some(libc::ENOBUFS)
        ));
    }

    #[test]
    fn short_or_lying_answers_are_malformed_never_a_panic() {
        let whole = inet_answer(42, 7);
        for cut in [1, 15, 16, 60, 87, whole.len() - 1] {
            assert!(
                parse_inodes(&whole[..cut], Some(US)).is_err(),
                "cut at {cut}"
            );
        }
        // A length that ends the message before the inode.
        let mut short = whole.clone();
        short[0..4].copy_from_slice(&80u32.to_ne_bytes());
        assert!(matches!(
            parse_inodes(&short[..80], Some(US)),
            Err(DumpError::Malformed { .. })
        ));
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut buf = whole.clone();
            buf.extend(unix_answer(44, NLM_F_MULTI, 7));
            for _ in 0..(next() % 6) {
                let i = (next() as usize) % buf.len();
                buf[i] = next() as u8;
            }
            let _ = parse_inodes(&buf, Some(US));
            let _ = parse_inodes(&buf, None);
        }
    }
}
