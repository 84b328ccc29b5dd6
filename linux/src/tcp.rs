//! TCP states as the kernel numbers them (include/net/tcp_states.h), and their names as ss
//! prints them. Both sock_diag (`idiag_state`) and TCP_INFO (`tcpi_state`) use these numbers.

pub const ESTABLISHED: u8 = 1;
pub const SYN_SENT: u8 = 2;
/// What a CLOSE_WAIT socket becomes once shut down, and what a socket that was never
/// connected, only bound, or refused reports too.
pub const CLOSE: u8 = 7;
/// The peer closed; the local application has not.
pub const CLOSE_WAIT: u8 = 8;
pub const LISTEN: u8 = 10;

/// Offsets into struct tcp_info (include/uapi/linux/tcp.h) of the fields cwreap reads,
/// from TCP_INFO and from sock_diag's INET_DIAG_INFO alike.
pub const TCPI_STATE: usize = 0;
pub const TCPI_LAST_DATA_RECV: usize = 52;
pub const TCPI_LAST_ACK_RECV: usize = 56;
pub const TCPI_RTT: usize = 68;
pub const TCPI_DELIVERED: usize = 192;

/// The u32 at `offset` of a tcp_info the kernel gave, if it is that long: the kernel may
/// send a shorter struct than we know of.
pub fn tcp_info_u32(info: &[u8], offset: usize) -> Option<u32> {
    info.get(offset..offset + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
}

/// The name of a TCP state, like ss prints it; `UNKNOWN` for a number the kernel never uses.
pub fn state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(state_name(CLOSE_WAIT), "CLOSE_WAIT");
        assert_eq!(state_name(CLOSE), "CLOSE");
        assert_eq!(state_name(LISTEN), "LISTEN");
        assert_eq!(state_name(ESTABLISHED), "ESTABLISHED");
        assert_eq!(state_name(SYN_SENT), "SYN_SENT");
        assert_eq!(state_name(200), "UNKNOWN");
    }
}
