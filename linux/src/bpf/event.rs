//! The ring-buffer record (`struct cw_event` in linux/bpf/cwreap.bpf.c) and its parser.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Size of one record; the BPF side asserts the same at compile time.
pub const EVENT_LEN: usize = 64;

const KIND_ENTERED: u8 = 1;
const KIND_LEFT: u8 = 2;
const KIND_DESTROYED: u8 = 3;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// What happened to one TCP socket, as the kernel reported it. Timestamps are
/// CLOCK_BOOTTIME nanoseconds (see [`super::boottime_ns`]), which keep counting through
/// suspend, so an age is `boottime_ns() - ts_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The socket entered CLOSE_WAIT: the peer closed, the local side has not yet.
    Entered {
        /// The socket cookie (SO_COOKIE; sock_diag's `idiag_cookie`).
        cookie: u64,
        /// Inode of the socket's network namespace (as `stat /proc/PID/ns/net` shows it).
        netns: u32,
        /// When it entered.
        ts_ns: u64,
        /// Local address and port.
        local: SocketAddr,
        /// The peer's address and port.
        remote: SocketAddr,
    },
    /// The socket left CLOSE_WAIT: LAST_ACK after the owner's close(), CLOSE after a
    /// shutdown or a reset. It stays in the entry-time map until destroyed.
    Left {
        /// The socket cookie.
        cookie: u64,
        /// When it left.
        ts_ns: u64,
        /// The state it went to (see [`crate::tcp`]).
        new_state: u8,
    },
    /// The kernel freed the socket: every holder closed it, and the connection is over.
    Destroyed {
        /// The socket cookie.
        cookie: u64,
        /// When.
        ts_ns: u64,
        /// Its state then (CLOSE, nearly always).
        state: u8,
    },
}

impl Event {
    /// The socket cookie, whatever the kind.
    pub fn cookie(&self) -> u64 {
        match *self {
            Event::Entered { cookie, .. }
            | Event::Left { cookie, .. }
            | Event::Destroyed { cookie, .. } => cookie,
        }
    }

    /// The kernel's timestamp (CLOCK_BOOTTIME ns), whatever the kind.
    pub fn ts_ns(&self) -> u64 {
        match *self {
            Event::Entered { ts_ns, .. }
            | Event::Left { ts_ns, .. }
            | Event::Destroyed { ts_ns, .. } => ts_ns,
        }
    }
}

/// Why a record could not be read. Only a mismatch between the embedded object and this
/// parser produces one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRecord {
    /// The record is not [`EVENT_LEN`] bytes.
    #[error("event record of {0} bytes, expected {EVENT_LEN}")]
    Length(usize),
    /// Unknown `kind` byte.
    #[error("event record of unknown kind {0}")]
    Kind(u8),
    /// An entered record whose address family is neither AF_INET nor AF_INET6.
    #[error("event record with address family {0}")]
    Family(u8),
}

/// Parse one ring-buffer record.
pub fn parse_event(rec: &[u8]) -> Result<Event, BadRecord> {
    let rec: &[u8; EVENT_LEN] = rec.try_into().map_err(|_| BadRecord::Length(rec.len()))?;
    let u16_ne = |at: usize| u16::from_ne_bytes([rec[at], rec[at + 1]]);
    let u32_ne = |at: usize| u32::from_ne_bytes([rec[at], rec[at + 1], rec[at + 2], rec[at + 3]]);
    let u64_ne = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&rec[at..at + 8]);
        u64::from_ne_bytes(b)
    };
    let kind = rec[0];
    let family = rec[1];
    let state = rec[2];
    // rec[3]: padding.
    // skc_num: host order.
    let lport = u16_ne(4);
    // skc_dport: network order.
    let rport = u16::from_be_bytes([rec[6], rec[7]]);
    let cookie = u64_ne(8);
    let ts_ns = u64_ne(16);
    let netns = u32_ne(24);
    // rec[28..32]: padding.
    let laddr = &rec[32..48];
    let raddr = &rec[48..64];
    match kind {
        KIND_ENTERED => {
            let (l, r) = match family {
                AF_INET => (IpAddr::V4(v4(laddr)), IpAddr::V4(v4(raddr))),
                AF_INET6 => (IpAddr::V6(v6(laddr)), IpAddr::V6(v6(raddr))),
                other => return Err(BadRecord::Family(other)),
            };
            Ok(Event::Entered {
                cookie,
                netns,
                ts_ns,
                local: SocketAddr::new(l, lport),
                remote: SocketAddr::new(r, rport),
            })
        }
        KIND_LEFT => Ok(Event::Left {
            cookie,
            ts_ns,
            new_state: state,
        }),
        KIND_DESTROYED => Ok(Event::Destroyed {
            cookie,
            ts_ns,
            state,
        }),
        other => Err(BadRecord::Kind(other)),
    }
}

fn v4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn v6(b: &[u8]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    Ipv6Addr::from(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, family: u8, state: u8) -> [u8; EVENT_LEN] {
        let mut r = [0u8; EVENT_LEN];
        r[0] = kind; // kind
        r[1] = family; // family
        r[2] = state; // state
        r[3] = 0xee; // padding, ignored
        r[4..6].copy_from_slice(&8080u16.to_ne_bytes()); // lport, host order
        r[6..8].copy_from_slice(&54321u16.to_be_bytes()); // rport, network order
        r[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_ne_bytes()); // cookie
        r[16..24].copy_from_slice(&123_456_789_000u64.to_ne_bytes()); // ts_ns
        r[24..28].copy_from_slice(&4_026_531_840u32.to_ne_bytes()); // netns inode
        r[28..32].copy_from_slice(&[0xee; 4]); // padding, ignored
        r
    }

    #[test]
    fn entered_ipv4() {
        let mut r = record(1, 2, 8);
        r[32..36].copy_from_slice(&[127, 0, 0, 1]); // laddr
        r[48..52].copy_from_slice(&[10, 1, 2, 3]); // raddr
        assert_eq!(
            parse_event(&r),
            Ok(Event::Entered {
                cookie: 0x0102_0304_0506_0708,
                netns: 4_026_531_840,
                ts_ns: 123_456_789_000,
                local: "127.0.0.1:8080".parse().unwrap(),
                remote: "10.1.2.3:54321".parse().unwrap(),
            })
        );
    }

    #[test]
    fn entered_ipv6() {
        let mut r = record(1, 10, 8);
        r[32..48].copy_from_slice(&Ipv6Addr::LOCALHOST.octets()); // laddr
        let mapped = Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped();
        r[48..64].copy_from_slice(&mapped.octets()); // raddr
        let e = parse_event(&r).unwrap();
        let Event::Entered { local, remote, .. } = e else {
            panic!("{e:?}")
        };
        assert_eq!(local, "[::1]:8080".parse().unwrap());
        assert_eq!(remote, "[::ffff:192.0.2.7]:54321".parse().unwrap());
        assert_eq!(e.cookie(), 0x0102_0304_0506_0708);
        assert_eq!(e.ts_ns(), 123_456_789_000);
    }

    #[test]
    fn left_and_destroyed() {
        assert_eq!(
            parse_event(&record(2, 0, 9)),
            Ok(Event::Left {
                cookie: 0x0102_0304_0506_0708,
                ts_ns: 123_456_789_000,
                new_state: 9,
            })
        );
        assert_eq!(
            parse_event(&record(3, 0, 7)),
            Ok(Event::Destroyed {
                cookie: 0x0102_0304_0506_0708,
                ts_ns: 123_456_789_000,
                state: 7,
            })
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(parse_event(&[0u8; 63]), Err(BadRecord::Length(63)));
        assert_eq!(parse_event(&[0u8; 65]), Err(BadRecord::Length(65)));
        assert_eq!(parse_event(&record(0, 2, 8)), Err(BadRecord::Kind(0)));
        assert_eq!(parse_event(&record(4, 2, 8)), Err(BadRecord::Kind(4)));
        assert_eq!(parse_event(&record(1, 1, 8)), Err(BadRecord::Family(1)));
    }
}
