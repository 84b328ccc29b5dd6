//! The bug class a CLOSE_WAIT socket points at, from what the kernel shows of it and the
//! runtime of its owner. Pure.

use serde::Serialize;

use super::runtime::Runtime;

/// The bug class a CLOSE_WAIT socket points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Watched by an event loop, EOF read (recv_q 0).
    EofIgnored,
    /// Watched by an event loop, FIN (and maybe data) unread (recv_q ≥ 1); in Node also
    /// a paused socket, which libuv takes out of its epoll set.
    NotRead,
    /// Not watched, EOF read.
    EofUnwatched,
    /// Not watched, FIN unread.
    Abandoned,
    /// A client's end, not watched, nothing but the FIN unread: an idle pooled connection
    /// the server closed.
    PoolIdle,
    /// Still in the listener's accept queue.
    Unaccepted,
    /// The connection ended (state CLOSE) and the fd is still held.
    DeadHeld,
}

/// What the kernel shows of one CLOSE_WAIT socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    pub recv_q: u32,
    /// Registered in an epoll instance of the owner.
    pub watched: bool,
    /// In the accept queue: no fd refers to it.
    pub unaccepted: bool,
    /// A dead held socket (state CLOSE).
    pub dead: bool,
    /// The client's end of its connection (no listener has its local address).
    pub outgoing: bool,
}

impl Pattern {
    pub const ALL: [Pattern; 7] = [
        Pattern::EofIgnored,
        Pattern::NotRead,
        Pattern::EofUnwatched,
        Pattern::Abandoned,
        Pattern::PoolIdle,
        Pattern::Unaccepted,
        Pattern::DeadHeld,
    ];

    /// The pattern the evidence of one socket shows, in a process running `runtime`.
    pub fn of(e: Evidence, runtime: Runtime) -> Pattern {
        if e.unaccepted {
            return Pattern::Unaccepted;
        }
        if e.dead {
            return Pattern::DeadHeld;
        }
        match (e.watched, e.recv_q) {
            (true, 0) => Pattern::EofIgnored,
            (true, _) => Pattern::NotRead,
            // libuv stops watching a paused socket (uv_read_stop, then EPOLL_CTL_DEL at its
            // next event), and Node reads every socket it has not paused: one nothing
            // watches with the FIN unread is paused.
            (false, 1..) if runtime == Runtime::Node => Pattern::NotRead,
            // Only the FIN arrived since the client last used it: a pool's idle connection.
            (false, 1) if e.outgoing => Pattern::PoolIdle,
            (false, 0) => Pattern::EofUnwatched,
            (false, _) => Pattern::Abandoned,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Pattern::EofIgnored => "eof_ignored",
            Pattern::NotRead => "not_read",
            Pattern::EofUnwatched => "eof_unwatched",
            Pattern::Abandoned => "abandoned",
            Pattern::PoolIdle => "pool_idle",
            Pattern::Unaccepted => "unaccepted",
            Pattern::DeadHeld => "dead_held",
        }
    }

    /// The evidence, in words.
    pub fn evidence(self, runtime: Runtime) -> &'static str {
        match self {
            Pattern::EofIgnored => "watched, recv_q 0",
            Pattern::NotRead if runtime == Runtime::Node => {
                "recv_q ≥ 1, paused: libuv took it out of epoll"
            }
            Pattern::NotRead => "watched, recv_q ≥ 1",
            Pattern::EofUnwatched => "not watched, recv_q 0",
            Pattern::Abandoned => "not watched, recv_q ≥ 1",
            Pattern::PoolIdle => "client end, not watched, only the FIN unread",
            Pattern::Unaccepted => "in the accept queue",
            Pattern::DeadHeld => "state CLOSE, fd held",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(recv_q: u32, watched: bool, outgoing: bool) -> Evidence {
        Evidence {
            recv_q,
            watched,
            unaccepted: false,
            dead: false,
            outgoing,
        }
    }

    #[test]
    fn the_runtime_and_the_end_decide_what_unwatched_means() {
        for rt in [
            Runtime::Python,
            Runtime::Jvm,
            Runtime::Other,
            Runtime::Unknown,
        ] {
            // A client's end with only the FIN unread: an idle pooled connection.
            assert_eq!(
                Pattern::of(ev(1, false, true), rt),
                Pattern::PoolIdle,
                "{rt:?}"
            );
            // Unread data before the FIN: the client stopped reading mid-response.
            assert_eq!(
                Pattern::of(ev(2, false, true), rt),
                Pattern::Abandoned,
                "{rt:?}"
            );
            assert_eq!(
                Pattern::of(ev(1, false, false), rt),
                Pattern::Abandoned,
                "{rt:?}"
            );
            assert_eq!(
                Pattern::of(ev(0, false, true), rt),
                Pattern::EofUnwatched,
                "{rt:?}"
            );
            // Watched: the end does not matter.
            assert_eq!(
                Pattern::of(ev(1, true, true), rt),
                Pattern::NotRead,
                "{rt:?}"
            );
            assert_eq!(
                Pattern::of(ev(0, true, true), rt),
                Pattern::EofIgnored,
                "{rt:?}"
            );
        }
        // Node reads every socket it has not paused, and libuv drops a paused one from
        // epoll: not watched with the FIN unread is paused, whichever end.
        for outgoing in [false, true] {
            for q in [1, 8193] {
                assert_eq!(
                    Pattern::of(ev(q, false, outgoing), Runtime::Node),
                    Pattern::NotRead
                );
            }
            assert_eq!(
                Pattern::of(ev(0, false, outgoing), Runtime::Node),
                Pattern::EofUnwatched
            );
        }
        assert_eq!(
            Pattern::NotRead.evidence(Runtime::Node),
            "recv_q ≥ 1, paused: libuv took it out of epoll"
        );
        assert_eq!(
            Pattern::NotRead.evidence(Runtime::Jvm),
            "watched, recv_q ≥ 1"
        );
    }
}
