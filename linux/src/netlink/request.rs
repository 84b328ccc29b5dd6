//! The requests cwreap sends over NETLINK_SOCK_DIAG: a dump of one family's sockets in
//! some states, and one socket named exactly (to look it up or destroy it).

use std::net::SocketAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::unix::{self, UnixRequest};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};

/// A dump of every `family` TCP socket in `states`, with tcp_info (INET_DIAG_INFO).
pub(super) fn request(family: u8, states: StateFlags, seq: u32) -> Vec<u8> {
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

/// The sockets a dump of [`inodes_request`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    /// TCP sockets in every state but CLOSE_WAIT (CLOSE sockets are in no table, so in no
    /// dump) and TIME_WAIT (a timewait socket never has a file, so no fd holds one).
    TcpOthers,
    Udp,
    Unix,
}

/// A dump of every socket of a kind (both families for TCP and UDP), without tcp_info: an
/// inode list, to tell which socket fds of a process are sockets the kernel still lists.
pub(super) fn inodes_request(listed: Listed, family: u8, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let message = match listed {
        Listed::Unix => SockDiagMessage::UnixRequest(UnixRequest {
            // Every state: unconnected datagram and unbound sockets report TCP_CLOSE.
            state_flags: unix::StateFlags::from_bits_retain(u32::MAX),
            inode: 0,
            show_flags: unix::ShowFlags::empty(),
            cookie: [0xff; 8],
        }),
        Listed::TcpOthers | Listed::Udp => SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: if listed == Listed::Udp {
                IPPROTO_UDP
            } else {
                IPPROTO_TCP
            },
            extensions: ExtensionFlags::empty(),
            states: if listed == Listed::Udp {
                StateFlags::all()
            } else {
                StateFlags::all().difference(StateFlags::CLOSE_WAIT | StateFlags::TIME_WAIT)
            },
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        }),
    };
    let mut packet = NetlinkMessage::new(header, message.into());
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

/// A request naming one socket exactly (4-tuple and cookie): SOCK_DESTROY when `destroy`,
/// else a SOCK_DIAG_BY_FAMILY lookup of that one socket. Takes the fields of a
/// `DiagSocket`, not the type: the parser's module uses this one, not the other way round.
pub(super) fn exact_request(
    local: SocketAddr,
    remote: SocketAddr,
    socket_cookie: u64,
    seq: u32,
    destroy: bool,
) -> Vec<u8> {
    let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
    let lo = (socket_cookie & 0xffff_ffff) as u32;
    let hi = (socket_cookie >> 32) as u32;
    let mut cookie = [0u8; 8];
    cookie[..4].copy_from_slice(&lo.to_ne_bytes());
    cookie[4..].copy_from_slice(&hi.to_ne_bytes());
    let req = InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::INFO,
        states: StateFlags::all(),
        socket_id: SocketId {
            source_port: local.port(),
            destination_port: remote.port(),
            source_address: local.ip(),
            destination_address: remote.ip(),
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
