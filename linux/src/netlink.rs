//! Discovery: the NETLINK_SOCK_DIAG dump of CLOSE_WAIT TCP sockets.
//!
//! Owns the request (kernel-side state filter, INET_DIAG_INFO extension), the receive
//! loop (large buffer, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP_INTR retry) and the parsing of
//! one datagram into [`DiagSocket`]s. Parsing takes bytes, not a socket, so it is tested
//! on fixtures and fuzzed without a kernel.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla,
};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

/// A dump arrives in datagrams of up to ~32 KiB; a smaller buffer truncates silently.
const RECV_BUF: usize = 64 * 1024;
/// Kernel socket receive buffer, so a 100k-socket dump is not throttled by wakeups.
const SO_RCVBUF: usize = 4 * 1024 * 1024;
/// NLM_F_DUMP_INTR means the table changed under the dump: ask again, a bounded number of times.
const DUMP_RETRIES: usize = 5;

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
}

/// What one datagram of a dump told us.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    pub sockets: Vec<DiagSocket>,
    /// NLMSG_DONE was seen: the dump is complete.
    pub done: bool,
    /// A message carried NLM_F_DUMP_INTR: the result is inconsistent and must be redone.
    pub interrupted: bool,
}

/// tcp_info offsets (struct tcp_info in include/uapi/linux/tcp.h). The kernel may send a
/// shorter struct than we know of, so every read checks the length it got.
const TCPI_STATE: usize = 0;
const TCPI_LAST_ACK_RECV: usize = 56;

fn tcp_info_u32(info: &[u8], offset: usize) -> Option<u32> {
    let bytes = info.get(offset..offset + 4)?;
    Some(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
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
    let mut state = resp.header.state;
    for nla in resp.nlas.iter() {
        if let Nla::TcpInfo(info) = nla {
            last_ack_recv_ms = tcp_info_u32(info, TCPI_LAST_ACK_RECV);
            if let Some(s) = info.get(TCPI_STATE) {
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
    }
}

/// Parse one datagram of a sock_diag dump. Never panics on arbitrary input.
pub fn parse_dump(buf: &[u8]) -> Result<Chunk, DumpError> {
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
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            return Err(DumpError::Malformed {
                offset,
                reason: format!("message length {len} with {} bytes left", rest.len()),
            });
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
            NetlinkPayload::Done(_) => {
                chunk.done = true;
                return Ok(chunk);
            }
            NetlinkPayload::Error(err) => {
                // An error message with code 0 is an ACK; anything else ends the dump.
                if let Some(code) = err.code {
                    return Err(DumpError::Kernel(io::Error::from_raw_os_error(-code.get())));
                }
            }
            _ => {}
        }
        // Messages are 4-byte aligned.
        offset += (len + 3) & !3;
    }
    Ok(chunk)
}

fn request(family: u8, states: StateFlags, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states,
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

/// A request naming one socket exactly (4-tuple and cookie): SOCK_DESTROY when `destroy`,
/// else a SOCK_DIAG_BY_FAMILY lookup of that one socket.
fn exact_request(s: &DiagSocket, seq: u32, destroy: bool) -> Vec<u8> {
    let family = if s.local.is_ipv4() { AF_INET } else { AF_INET6 };
    let lo = (s.cookie & 0xffff_ffff) as u32;
    let hi = (s.cookie >> 32) as u32;
    let mut cookie = [0u8; 8];
    cookie[..4].copy_from_slice(&lo.to_ne_bytes());
    cookie[4..].copy_from_slice(&hi.to_ne_bytes());
    let req = InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::INFO,
        states: StateFlags::all(),
        socket_id: SocketId {
            source_port: s.local.port(),
            destination_port: s.remote.port(),
            source_address: s.local.ip(),
            destination_address: s.remote.ip(),
            interface_id: 0,
            cookie,
        },
    };
    let mut header = NetlinkHeader::default();
    header.sequence_number = seq;
    if destroy {
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(SockDiagDestroy::new(SockDiagMessage::InetRequest(req))),
        );
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        buf
    } else {
        header.flags = NLM_F_REQUEST;
        let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(req).into());
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        buf
    }
}

/// Where requests go and answers come from.
enum Wire {
    /// NETLINK_SOCK_DIAG: the kernel.
    Kernel(Socket),
    /// A datagram socket whose other end plays the kernel (see `Diag::over`).
    #[cfg(feature = "testing")]
    Fake(std::os::unix::net::UnixDatagram),
}

impl Wire {
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Wire::Kernel(s) => s.send(buf, 0),
            #[cfg(feature = "testing")]
            Wire::Fake(s) => s.send(buf),
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Wire::Kernel(s) => s.recv(&mut &mut buf[..], 0),
            #[cfg(feature = "testing")]
            Wire::Fake(s) => s.recv(buf),
        }
    }
}

/// A sock_diag netlink socket of the network namespace it was created in.
pub struct Diag {
    socket: Wire,
    buf: Vec<u8>,
    seq: u32,
    netns: u64,
}

/// Inode of the network namespace behind a /proc/<pid>/ns/net style path.
pub fn netns_inode(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

impl Diag {
    /// A socket in our own network namespace.
    pub fn new() -> io::Result<Self> {
        let netns = netns_inode(Path::new("/proc/self/ns/net")).unwrap_or(0);
        Self::create(netns)
    }

    fn create(netns: u64) -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&NlAddr::new(0, 0))?;
        // Best effort: a larger kernel buffer only saves wakeups.
        let _ = socket.set_rx_buf_sz(SO_RCVBUF);
        Ok(Self {
            socket: Wire::Kernel(socket),
            buf: vec![0u8; RECV_BUF],
            seq: 0,
            netns,
        })
    }

    /// A socket inside the network namespace at `ns_path` (e.g. /proc/PID/ns/net).
    /// A netlink socket sees only the namespace it was created in, so a short-lived thread
    /// joins the namespace, creates the socket and ends; the rest of cwreap stays put.
    pub fn in_netns(ns_path: &Path) -> io::Result<Self> {
        let file = std::fs::File::open(ns_path)?;
        let netns = file.metadata()?.ino();
        if netns_inode(Path::new("/proc/self/ns/net")).ok() == Some(netns) {
            return Self::create(netns);
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    crate::sys::join_netns(file.as_fd())?;
                    Self::create(netns)
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
        })
    }

    /// A Diag that talks to whatever answers on the other end of `peer` (a connected unix
    /// datagram socket) instead of the kernel. A seam for tests of the receive loop: the
    /// kernel's inet_diag dump never sets NLM_F_DUMP_INTR, so the retry cannot be provoked
    /// for real; a fake kernel can send it, and malformed or truncated dumps too.
    #[cfg(feature = "testing")]
    pub fn over(peer: std::os::unix::net::UnixDatagram, netns: u64) -> Self {
        Self {
            socket: Wire::Fake(peer),
            buf: vec![0u8; RECV_BUF],
            seq: 0,
            netns,
        }
    }

    /// The network namespace this socket reports on.
    pub fn netns(&self) -> u64 {
        self.netns
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
        for s in &mut out {
            s.netns = self.netns;
        }
        Ok(out)
    }

    /// The socket as the kernel sees it now, found by its exact 4-tuple and cookie; None
    /// when it no longer exists.
    pub fn lookup(&mut self, s: &DiagSocket) -> Result<Option<DiagSocket>, DumpError> {
        self.seq = self.seq.wrapping_add(1);
        let req = exact_request(s, self.seq, false);
        self.socket.send(&req)?;
        let n = self.socket.recv(&mut self.buf)?;
        match parse_dump(&self.buf[..n]) {
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
        self.seq = self.seq.wrapping_add(1);
        let req = exact_request(s, self.seq, true);
        self.socket.send(&req)?;
        let n = self.socket.recv(&mut self.buf)?;
        parse_dump(&self.buf[..n]).map(|_| ())
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

    /// One dump; None when the kernel flagged it interrupted.
    fn dump_once(
        &mut self,
        family: u8,
        states: StateFlags,
    ) -> Result<Option<Vec<DiagSocket>>, DumpError> {
        self.seq = self.seq.wrapping_add(1);
        let req = request(family, states, self.seq);
        self.socket.send(&req)?;
        let mut sockets = Vec::new();
        let mut interrupted = false;
        loop {
            let n = self.socket.recv(&mut self.buf)?;
            if n == 0 {
                return Err(DumpError::Malformed {
                    offset: 0,
                    reason: "empty datagram before NLMSG_DONE".into(),
                });
            }
            let chunk = parse_dump(&self.buf[..n])?;
            sockets.extend(chunk.sockets);
            interrupted |= chunk.interrupted;
            if chunk.done {
                break;
            }
        }
        Ok(if interrupted { None } else { Some(sockets) })
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
        let mut b = Vec::new();
        b.extend_from_slice(&len.to_ne_bytes()); // nlmsg_len: header + payload
        b.extend_from_slice(&kind.to_ne_bytes()); // nlmsg_type
        b.extend_from_slice(&flags.to_ne_bytes()); // nlmsg_flags
        b.extend_from_slice(&7u32.to_ne_bytes()); // nlmsg_seq
        b.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
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

    #[test]
    fn live_dump_works() {
        // Any host can be asked; the result just has to be self-consistent.
        let Ok(mut diag) = Diag::new() else {
            panic!("cannot open NETLINK_SOCK_DIAG");
        };
        let sockets = diag.close_wait().expect("dump");
        assert!(sockets.iter().all(|s| s.state == TCP_CLOSE_WAIT));
    }
}
