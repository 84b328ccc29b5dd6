//! The answers to an inode dump ([`super::request::inodes_request`]), read for the one field
//! they are asked for. Each socket's inode sits at a fixed offset of the kernel's fixed-size
//! header (`struct unix_diag_msg`, `struct inet_diag_msg`), so it is read there, without
//! building the message: a dump of every TCP socket of a busy host is tens of thousands of
//! messages, and decoding each one's addresses and attributes only to keep four bytes cost
//! more than the kernel's work to send them. Everything else (NLMSG_DONE and the error it
//! carries, NLMSG_ERROR, stale answers, NLM_F_DUMP_INTR) is read as [`super::parse_reply`]
//! reads it.

use netlink_packet_core::NLM_F_DUMP_INTR;

use super::{Chunk, DumpError, Expect, parse_reply};

/// nlmsg_type of a sock_diag answer.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `udiag_ino` in `struct unix_diag_msg` (16 bytes: family, type, state, pad, ino, cookie).
const UNIX_INODE_AT: usize = 4;
/// `idiag_inode` in `struct inet_diag_msg` (72 bytes: family, state, timer, retrans, the
/// 48-byte socket id, expires, rqueue, wqueue, uid, inode).
const INET_INODE_AT: usize = 68;

/// One datagram of answers to an inode dump: the inodes of the sockets it lists (0 for
/// those without a file) in [`Chunk::inodes`], the rest as [`parse_reply`] gives it. Never
/// panics on arbitrary input.
pub fn parse_inodes(buf: &[u8], expect: Option<Expect>) -> Result<Chunk, DumpError> {
    let mut chunk = Chunk::default();
    let mut offset = 0usize;
    while offset < buf.len() {
        let rest = &buf[offset..];
        let malformed = |reason: String| DumpError::Malformed { offset, reason };
        if rest.len() < 16 {
            return Err(malformed(format!(
                "{} trailing bytes, shorter than a netlink header",
                rest.len()
            )));
        }
        // nlmsghdr: u32 len, u16 type, u16 flags, u32 seq, u32 pid.
        let word =
            |at: usize| u32::from_ne_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
        let half = |at: usize| u16::from_ne_bytes([rest[at], rest[at + 1]]);
        let len = word(0) as usize;
        if len < 16 || len > rest.len() {
            return Err(malformed(format!(
                "message length {len} with {} bytes left",
                rest.len()
            )));
        }
        let next = offset + ((len + 3) & !3);
        if half(4) != SOCK_DIAG_BY_FAMILY {
            // DONE, an error or an ACK: rare, and read in full.
            let one = parse_reply(&rest[..len], expect).map_err(|e| match e {
                DumpError::Malformed { offset: at, reason } => DumpError::Malformed {
                    offset: offset + at,
                    reason,
                },
                other => other,
            })?;
            chunk.stale += one.stale;
            chunk.interrupted |= one.interrupted;
            chunk.acked |= one.acked;
            chunk.inodes.extend(one.inodes);
            if one.done {
                chunk.done = true;
                return Ok(chunk);
            }
            offset = next;
            continue;
        }
        if let Some(e) = expect
            && (word(8) != e.seq || word(12) != e.port)
        {
            chunk.stale += 1;
            offset = next;
            continue;
        }
        if half(6) & NLM_F_DUMP_INTR != 0 {
            chunk.interrupted = true;
        }
        let payload = &rest[16..len];
        let at = match payload.first() {
            Some(&family) if i32::from(family) == libc::AF_UNIX => UNIX_INODE_AT,
            _ => INET_INODE_AT,
        };
        let Some(raw) = payload.get(at..at + 4) else {
            return Err(malformed(format!(
                "a sock_diag answer of {} bytes has no inode at byte {at}",
                payload.len()
            )));
        };
        chunk.inodes.push(u64::from(u32::from_ne_bytes([
            raw[0], raw[1], raw[2], raw[3],
        ])));
        offset = next;
    }
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NLMSG_DONE: u16 = 3;
    const NLM_F_MULTI: u16 = 2;
    const US: Expect = Expect { seq: 7, port: 99 };

    fn header(len: usize, kind: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u32).to_ne_bytes()); // nlmsg_len: header + payload
        b.extend_from_slice(&kind.to_ne_bytes()); // nlmsg_type
        b.extend_from_slice(&flags.to_ne_bytes()); // nlmsg_flags
        b.extend_from_slice(&seq.to_ne_bytes()); // nlmsg_seq: the request's
        b.extend_from_slice(&US.port.to_ne_bytes()); // nlmsg_pid: our port id
        b
    }

    /// An answer to a unix dump: `struct unix_diag_msg` of the socket `inode`.
    fn unix(inode: u32, flags: u16, seq: u32) -> Vec<u8> {
        let mut m = header(32, SOCK_DIAG_BY_FAMILY, flags, seq);
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
    fn inet(inode: u32, seq: u32) -> Vec<u8> {
        let mut m = header(16 + 72 + 8, SOCK_DIAG_BY_FAMILY, NLM_F_MULTI, seq);
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

    fn done(seq: u32) -> Vec<u8> {
        let mut b = header(20, NLMSG_DONE, NLM_F_MULTI, seq);
        b.extend_from_slice(&0i32.to_ne_bytes()); // the dump's final status
        b
    }

    #[test]
    fn inodes_are_read_from_unix_and_inet_answers_and_stale_ones_skipped() {
        let mut buf = unix(41, NLM_F_MULTI, 7);
        buf.extend(inet(42, 7));
        buf.extend(inet(43, 6)); // an answer to an earlier request
        buf.extend(unix(44, NLM_F_MULTI, 7));
        buf.extend(done(6)); // the earlier request's end: not ours
        buf.extend(inet(0, 7)); // no file (TIME_WAIT, a request socket)
        buf.extend(done(7));
        buf.extend(unix(45, NLM_F_MULTI, 7)); // past the end: never read
        let chunk = parse_inodes(&buf, Some(US)).expect("valid");
        assert_eq!(chunk.inodes, [41, 42, 44, 0]);
        assert_eq!(chunk.stale, 2);
        assert!(chunk.done && !chunk.interrupted);
        assert!(chunk.sockets.is_empty(), "nothing decoded in full");
    }

    #[test]
    fn an_interrupted_dump_and_the_error_in_done_are_seen() {
        let mut buf = unix(41, NLM_F_MULTI | NLM_F_DUMP_INTR, 7);
        buf.extend(done(7));
        assert!(parse_inodes(&buf, Some(US)).expect("valid").interrupted);
        let mut failed = header(20, NLMSG_DONE, NLM_F_MULTI, 7);
        failed.extend_from_slice(&(-libc::ENOBUFS).to_ne_bytes()); // the dump's final status
        assert!(matches!(
            parse_inodes(&failed, Some(US)),
            Err(DumpError::Kernel(e)) if e.raw_os_error() == Some(libc::ENOBUFS)
        ));
    }

    #[test]
    fn short_or_lying_answers_are_malformed_never_a_panic() {
        let whole = inet(42, 7);
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
            buf.extend(unix(44, NLM_F_MULTI, 7));
            for _ in 0..(next() % 6) {
                let i = (next() as usize) % buf.len();
                buf[i] = next() as u8;
            }
            let _ = parse_inodes(&buf, Some(US));
            let _ = parse_inodes(&buf, None);
        }
    }
}
