//! [`FakeKernel`]: the double itself, with the builders tests script the world with.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use super::world::{Call, Fd, NETNS, Process, Socket, World};
use crate::kernel::clock::Boottime;
use crate::kernel::discover::{SocketKey, key_of};
use crate::netlink::DiagSocket;
use crate::tcp;

/// The recording double.
#[derive(Debug, Default)]
pub struct FakeKernel {
    pub(super) world: RefCell<World>,
    pub(super) calls: RefCell<Vec<Call>>,
}

/// The pin of a scripted process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakePin {
    pub pid: i32,
    pub start_time: u64,
}

/// A duplicated fd of a scripted process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDup {
    pub pid: i32,
    pub fd: i32,
    /// The TCP socket's inode; None for anything else.
    pub inode: Option<u64>,
    /// A unix or UDP socket's inode.
    pub other: Option<u64>,
}

pub(super) fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl FakeKernel {
    pub fn new() -> Self {
        let k = FakeKernel::default();
        k.with(|w| {
            w.now = Boottime::from_duration(Duration::from_secs(10_000));
            w.next_cookie = 1;
            w.next_inode = 50_000;
            w.next_port = 40_000;
        });
        k
    }

    /// Change the world (script a fault, end a process, ...).
    pub fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        f(&mut self.world.borrow_mut())
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    /// Forget the calls so far.
    pub fn clear_calls(&self) {
        self.calls.borrow_mut().clear();
    }

    pub(super) fn record(&self, c: Call) {
        self.calls.borrow_mut().push(c);
    }

    /// Move the clock on.
    pub fn advance(&self, d: Duration) {
        self.with(|w| w.now = w.now.checked_add(d).unwrap_or(w.now));
    }

    pub fn spawn(&self, p: Process) {
        self.with(|w| w.processes.insert(p.pid, p));
    }

    /// End process `pid` (its sockets stay as they are; the kernel would close them, which
    /// a test scripts when it matters).
    pub fn exit(&self, pid: i32) {
        self.with(|w| {
            if let Some(p) = w.processes.get_mut(&pid) {
                p.alive = false;
            }
        });
    }

    /// A LISTEN socket on `local` held by `pid` as `fd`.
    pub fn listener(&self, pid: i32, fd: i32, local: &str) -> SocketKey {
        self.socket(pid, Some(fd), local, "0.0.0.0:0", tcp::LISTEN)
    }

    /// A connection accepted by `pid` as `fd`, on `local` from `remote`, whose peer has just
    /// closed: in CLOSE_WAIT since now.
    pub fn close_wait(&self, pid: i32, fd: i32, local: &str, remote: &str) -> SocketKey {
        self.socket(pid, Some(fd), local, remote, tcp::CLOSE_WAIT)
    }

    /// A CLOSE_WAIT connection still in a listener's accept queue: no fd, inode 0.
    pub fn unaccepted(&self, pid_of_listener: i32, local: &str, remote: &str) -> SocketKey {
        self.socket(pid_of_listener, None, local, remote, tcp::CLOSE_WAIT)
    }

    /// `pid` accepts the connection `key` from its listener's queue as `fd`: it gets an
    /// inode (no state change).
    pub fn accept(&self, key: SocketKey, pid: i32, fd: i32) {
        self.with(|w| {
            w.next_inode += 1;
            let inode = w.next_inode;
            if let Some(s) = w.sockets.get_mut(&key) {
                s.diag.inode = inode;
                if let Some(p) = w.processes.get_mut(&pid) {
                    p.fds.insert(fd, Fd::Socket(inode));
                }
            }
        });
    }

    /// `n` CLOSE_WAIT connections held by `pid` from fd `first_fd` on, to local `local`
    /// from distinct remote ports.
    pub fn close_wait_many(
        &self,
        pid: i32,
        first_fd: i32,
        n: usize,
        local: &str,
    ) -> Vec<SocketKey> {
        (0..n)
            .map(|i| {
                let port = self.with(|w| {
                    w.next_port = w.next_port.wrapping_add(1);
                    w.next_port
                });
                let fd = first_fd + i32::try_from(i).unwrap_or(0);
                self.close_wait(pid, fd, local, &format!("127.0.0.1:{port}"))
            })
            .collect()
    }

    fn socket(&self, pid: i32, fd: Option<i32>, local: &str, remote: &str, state: u8) -> SocketKey {
        let parse = |a: &str| {
            a.parse::<SocketAddr>()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
        };
        self.with(|w| {
            let cookie = w.next_cookie;
            w.next_cookie += 1;
            let (netns, uid) = w
                .processes
                .get(&pid)
                .map_or((NETNS, 0), |p| (p.netns, p.uid));
            let inode = match fd {
                Some(fd) => {
                    w.next_inode += 1;
                    if let Some(p) = w.processes.get_mut(&pid) {
                        p.fds.insert(fd, Fd::Socket(w.next_inode));
                    }
                    w.next_inode
                }
                None => 0,
            };
            let diag = DiagSocket {
                netns,
                local: parse(local),
                remote: parse(remote),
                inode,
                uid,
                cookie,
                state,
                recv_q: if state == tcp::CLOSE_WAIT { 1 } else { 0 },
                send_q: 0,
                last_ack_recv_ms: Some(0),
                last_data_recv_ms: None,
                keepalive: false,
            };
            let key = key_of(&diag);
            let entered_at = (state == tcp::CLOSE_WAIT).then_some(w.now);
            let delivered = u32::from(state != tcp::LISTEN);
            w.sockets.insert(
                key,
                Socket {
                    diag,
                    delivered,
                    entered_at,
                },
            );
            key
        })
    }

    /// A connection of `pid` as `fd` that ended while the process still holds the fd: the
    /// peer's RST moved it to CLOSE, and it is in no dump any more.
    pub fn dead(&self, pid: i32, fd: i32, local: &str) -> SocketKey {
        self.socket(pid, Some(fd), local, "0.0.0.0:0", tcp::CLOSE)
    }

    /// A TCP socket of `pid` as `fd` that was only created (or bound), never connected:
    /// state CLOSE, in no dump, and `delivered` 0.
    pub fn never_connected(&self, pid: i32, fd: i32) -> SocketKey {
        let key = self.socket(pid, Some(fd), "0.0.0.0:0", "0.0.0.0:0", tcp::CLOSE);
        self.with(|w| {
            if let Some(s) = w.sockets.get_mut(&key) {
                s.delivered = 0;
            }
        });
        key
    }

    /// A unix (or, with `udp`, a UDP) socket of `pid` as `fd`.
    pub fn other_socket(&self, pid: i32, fd: i32, udp: bool) -> u64 {
        self.with(|w| {
            w.next_inode += 1;
            let inode = w.next_inode;
            if let Some(p) = w.processes.get_mut(&pid) {
                p.fds
                    .insert(fd, if udp { Fd::Udp(inode) } else { Fd::Unix(inode) });
            }
            inode
        })
    }

    /// A netlink socket of `pid` as `fd`: in no dump cwreap asks for, and not TCP.
    pub fn netlink_socket(&self, pid: i32, fd: i32) -> u64 {
        self.with(|w| {
            w.next_inode += 1;
            let inode = w.next_inode;
            if let Some(p) = w.processes.get_mut(&pid) {
                p.fds.insert(fd, Fd::Netlink(inode));
            }
            inode
        })
    }

    /// The TCP state of a socket now (None once it is gone).
    pub fn state(&self, key: SocketKey) -> Option<u8> {
        self.with(|w| w.sockets.get(&key).map(|s| s.diag.state))
    }

    /// Process `pid` closes its fd `fd`; the socket it held (if no one else holds it) is
    /// freed, as close() of the last reference does.
    pub fn close_fd(&self, pid: i32, fd: i32) {
        self.with(|w| close_fd(w, pid, fd));
    }

    /// The calls of one kind, e.g. every shutdown.
    pub fn shutdowns(&self) -> Vec<(i32, i32, u64)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Shutdown { pid, fd, inode } => Some((pid, fd, inode)),
                _ => None,
            })
            .collect()
    }

    pub fn signals(&self) -> Vec<(i32, i32)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Signal { pid, signal } => Some((pid, signal)),
                _ => None,
            })
            .collect()
    }
}

pub(super) fn close_fd(w: &mut World, pid: i32, fd: i32) {
    let Some(Fd::Socket(inode)) = w.processes.get_mut(&pid).and_then(|p| p.fds.remove(&fd)) else {
        return;
    };
    let held = w
        .processes
        .values()
        .any(|p| p.alive && p.fds.values().any(|f| *f == Fd::Socket(inode)));
    if !held {
        w.sockets.retain(|_, s| s.diag.inode != inode);
    }
}
