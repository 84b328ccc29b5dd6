//! Discovery behind one shape, whatever finds the sockets: a full [`Discover::snapshot`],
//! the [`Discover::changes`] since the last call (sockets that entered CLOSE_WAIT, left it,
//! or ended), and an exact entry time where the source saw the state change happen.
//!
//! Polling (sock_diag dumps) can only compare one dump with the last: [`Diff`] turns a
//! series of dumps into changes, and it knows no entry times. An event source (a BPF
//! program on the state change) reports the changes as they happen, with their times.

use std::collections::HashSet;

use crate::kernel::clock::Boottime;
use crate::netlink::{DiagSocket, DumpError, Listed};
use crate::netns::Found;

/// A socket's identity while it lives: (network namespace inode, socket cookie). Cookies
/// are never reused while the kernel runs; the namespace makes a key readable on its own.
pub type SocketKey = (u64, u64);

/// The key of a socket as sock_diag reports it.
pub fn key_of(s: &DiagSocket) -> SocketKey {
    (s.netns, s.cookie)
}

/// What changed since the last [`Discover::changes`] (or [`Discover::snapshot`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Sockets now in CLOSE_WAIT that were not at the last call.
    pub entered: Vec<DiagSocket>,
    /// Sockets still in CLOSE_WAIT whose facts (queues, tcp_info) were read again. Polling
    /// reads every one each time; an event source reads none.
    pub refreshed: Vec<DiagSocket>,
    /// Sockets that were in CLOSE_WAIT at the last call and are not now (another state, or
    /// gone).
    pub left: Vec<SocketKey>,
    /// Sockets the kernel reported destroyed (their last fd closed, or reset and freed).
    /// Only an event source knows; polling sees them in `left`.
    pub ended: Vec<SocketKey>,
    /// LISTEN sockets of namespaces that have CLOSE_WAIT sockets still in an accept queue
    /// (inode 0), to find their listener.
    pub listeners: Vec<DiagSocket>,
}

impl Changes {
    /// Every socket in CLOSE_WAIT now that this call read: the entered and the refreshed.
    pub fn present(&self) -> impl Iterator<Item = &DiagSocket> {
        self.entered.iter().chain(self.refreshed.iter())
    }
}

/// Finding CLOSE_WAIT sockets, per network namespace.
pub trait Discover {
    /// Watch the network namespaces of `pids`, and our own when `own`; stop watching those
    /// none of them lives in any more.
    fn cover(&mut self, pids: &[i32], own: bool);
    /// Every CLOSE_WAIT socket of the watched namespaces now. With `all_listeners`, the
    /// LISTEN sockets of every namespace that has CLOSE_WAIT sockets come too (the command
    /// line tells a server's end from a client's by them); otherwise only those of
    /// namespaces with sockets still in an accept queue. Resets what [`Self::changes`]
    /// compares with.
    fn snapshot(&mut self, all_listeners: bool) -> Result<Found, DumpError>;
    /// What changed since the last call (or snapshot).
    fn changes(&mut self) -> Result<Changes, DumpError>;
    /// When `key` entered CLOSE_WAIT, if the source saw it happen; None when it can only
    /// estimate (polling), or the socket entered before the source started.
    fn entered_at(&self, key: SocketKey) -> Option<Boottime>;
    /// When the daemon first saw `key` in CLOSE_WAIT, where the command line can learn it
    /// (the running daemon publishes it); None for the daemon itself, which keeps its own.
    fn first_seen(&self, key: SocketKey) -> Option<Boottime> {
        let _ = key;
        None
    }
    /// Namespaces that could not be entered or read since the last call, with why.
    fn take_failures(&mut self) -> Vec<(u64, String)>;
    /// The inodes of every socket of kind `listed` the kernel lists in the watched
    /// namespaces: a socket fd whose inode is in none of them, nor in CLOSE_WAIT, may be a
    /// dead TCP socket (state CLOSE, in no table).
    fn live_inodes(&mut self, listed: Listed) -> Result<HashSet<u64>, DumpError>;
    /// How the sockets are found: `poll` (a dump every cycle) or `events` (the kernel's
    /// state changes, with exact entry times).
    fn mode(&self) -> &'static str {
        "poll"
    }
    /// The event source's counts, when there is one.
    fn event_counts(&self) -> Option<EventCounts> {
        None
    }
    /// A cycle is done (the event source tells the readers of its pins it is alive).
    fn cycle_done(&mut self) {}
}

/// What an event source counted since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventCounts {
    /// Events the kernel could not queue (the ring buffer was full).
    pub lost: u64,
    /// Full dumps done to catch up after a loss or an event that could not be placed.
    pub reconciles: u64,
}

/// Changes from a series of full dumps: what each dump has that the last one did not, and
/// the reverse.
#[derive(Debug, Default)]
pub struct Diff {
    last: HashSet<SocketKey>,
}

impl Diff {
    /// Start over from `found` (a snapshot): the next [`Self::next`] compares with it.
    pub fn reset(&mut self, found: &Found) {
        self.last = found.close_wait.iter().map(key_of).collect();
    }

    /// The changes from the last dump to `found`.
    pub fn next(&mut self, found: Found) -> Changes {
        let now: HashSet<SocketKey> = found.close_wait.iter().map(key_of).collect();
        let mut left: Vec<SocketKey> = self.last.difference(&now).copied().collect();
        left.sort_unstable();
        let (refreshed, entered) = found
            .close_wait
            .into_iter()
            .partition(|s| self.last.contains(&key_of(s)));
        self.last = now;
        Changes {
            entered,
            refreshed,
            left,
            ended: Vec::new(),
            listeners: found.listeners,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(netns: u64, cookie: u64) -> DiagSocket {
        DiagSocket {
            netns,
            local: "127.0.0.1:80".parse().expect("addr"),
            remote: "127.0.0.1:5000".parse().expect("addr"),
            inode: cookie + 100,
            uid: 0,
            cookie,
            state: 8,
            recv_q: 1,
            send_q: 0,
            last_ack_recv_ms: Some(10),
            last_data_recv_ms: None,
            keepalive: false,
        }
    }

    fn found(socks: &[(u64, u64)]) -> Found {
        Found {
            close_wait: socks.iter().map(|&(n, c)| sock(n, c)).collect(),
            listeners: Vec::new(),
        }
    }

    #[test]
    fn consecutive_dumps_become_entered_refreshed_and_left() {
        let mut d = Diff::default();
        let first = d.next(found(&[(1, 10), (1, 11)]));
        assert_eq!(first.entered.len(), 2, "everything is new at first");
        assert!(first.refreshed.is_empty() && first.left.is_empty());

        let second = d.next(found(&[(1, 11), (2, 10), (1, 12)]));
        let keys = |v: &[DiagSocket]| v.iter().map(key_of).collect::<Vec<_>>();
        assert_eq!(keys(&second.entered), [(2, 10), (1, 12)]);
        assert_eq!(keys(&second.refreshed), [(1, 11)]);
        assert_eq!(
            second.left,
            [(1, 10)],
            "same cookie in another namespace is another socket"
        );
        assert!(
            second.ended.is_empty(),
            "a dump cannot tell an ended socket from a moved one"
        );
        assert_eq!(second.present().count(), 3);
    }

    #[test]
    fn a_snapshot_resets_the_comparison() {
        let mut d = Diff::default();
        d.next(found(&[(1, 1)]));
        d.reset(&found(&[(1, 2)]));
        let c = d.next(found(&[(1, 2), (1, 3)]));
        assert_eq!(
            c.left,
            Vec::<SocketKey>::new(),
            "(1,1) was forgotten by the reset"
        );
        assert_eq!(c.entered.iter().map(key_of).collect::<Vec<_>>(), [(1, 3)]);
    }
}
