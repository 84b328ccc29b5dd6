//! The one field an inode dump ([`super::request::inodes_request`]) is asked for. Each
//! socket's inode sits at a fixed offset of the kernel's fixed-size header (`struct
//! unix_diag_msg`, `struct inet_diag_msg`), so it is read there, without decoding the
//! message: a dump of every TCP socket of a busy host is tens of thousands of messages, and
//! decoding each one's addresses and attributes only to keep four bytes cost more than the
//! kernel's work to send them. The receive loop ([`super::parse_inodes`]) reads everything
//! else (NLMSG_DONE and the error it carries, NLMSG_ERROR, stale answers, NLM_F_DUMP_INTR)
//! as for any dump.

/// nlmsg_type of a sock_diag answer.
pub(super) const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `udiag_ino` in `struct unix_diag_msg` (16 bytes: family, type, state, pad, ino, cookie).
const UNIX_INODE_AT: usize = 4;
/// `idiag_inode` in `struct inet_diag_msg` (72 bytes: family, state, timer, retrans, the
/// 48-byte socket id, expires, rqueue, wqueue, uid, inode).
const INET_INODE_AT: usize = 68;

/// The inode in the payload of one sock_diag answer (what follows its netlink header): 0
/// for a socket without a file. Why not, when the payload is too short to hold one.
pub(super) fn inode_of(payload: &[u8]) -> Result<u64, String> {
    let at = match payload.first() {
        Some(&family) if i32::from(family) == libc::AF_UNIX => UNIX_INODE_AT,
        _ => INET_INODE_AT,
    };
    match payload.get(at..at + 4) {
        Some(&[a, b, c, d]) => Ok(u64::from(u32::from_ne_bytes([a, b, c, d]))),
        _ => Err(format!(
            "a sock_diag answer of {} bytes has no inode at byte {at}",
            payload.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inode_is_read_where_each_family_puts_it() {
        let mut unix = vec![
            1, // udiag_family: AF_UNIX
            1, // udiag_type: SOCK_STREAM
            1, // udiag_state: TCP_ESTABLISHED (a connected pair)
            0, // pad
        ];
        unix.extend_from_slice(&41u32.to_ne_bytes()); // udiag_ino
        unix.extend_from_slice(&[0xab; 8]); // udiag_cookie
        assert_eq!(inode_of(&unix), Ok(41));
        let mut inet = vec![
            2, // idiag_family: AF_INET
            1, // idiag_state: TCP_ESTABLISHED
            0, // idiag_timer
            0, // idiag_retrans
        ];
        inet.extend_from_slice(&[0x5a; 48]); // id: ports, addresses, interface, cookie
        for v in [0u32, 0, 0, 1000] {
            inet.extend_from_slice(&v.to_ne_bytes()); // expires, rqueue, wqueue, uid
        }
        inet.extend_from_slice(&42u32.to_ne_bytes()); // idiag_inode
        assert_eq!(inode_of(&inet), Ok(42));
        assert!(inode_of(&inet[..71]).is_err(), "cut before the inode ends");
        assert!(inode_of(&unix[..7]).is_err());
        assert!(inode_of(&[]).is_err());
    }
}
