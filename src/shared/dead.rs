//! Dead held sockets: TCP sockets whose connection ended (the peer's RST, a keepalive probe
//! answered with RST, or cwreap's own shutdown), so they are in state CLOSE and in no
//! sock_diag dump, while a process still holds them by an fd. They are leaked fds just as
//! much as CLOSE_WAIT ones (`lsof`'s "can't identify protocol"), and only close() or a
//! restart frees them.
//!
//! Finding them costs one duplication per TCP socket fd that no dump explains: the socket
//! fds of the processes in scope whose inode is in no CLOSE_WAIT dump are checked against
//! the kernel's unix dump, then by the protocol sockfs names them by (read through
//! /proc/PID/fd without duplicating: only TCP ones stay), then against a dump of TCP
//! sockets in the other states; each dump is asked only while some fds remain. Only what
//! is left, TCP sockets in no table, is duplicated through a pidfd and asked TCP_INFO: a
//! socket in CLOSE carries no traffic, so the duplication's side effect on its cgroup
//! (netprio, classid) cannot matter. Dead means TCP, state CLOSE,
//! and `tcpi_delivered` ≥ 1: a socket that was never connected (only created, bound, or
//! refused) shows 0 and is never dead.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use cwreap_linux::kernel::{Kernel, ProcRead, SocketKind};
use cwreap_linux::netlink::{DiagSocket, DumpError, Listed};
use cwreap_linux::sys::TcpInfo;
use cwreap_linux::tcp;

use crate::shared::attribute::{Direction, Holder, Observed, Snapshot, SocketFd};

/// One dead held socket, as its duplicate showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dead {
    pub fd: SocketFd,
    pub cookie: u64,
    /// getsockname, when the socket still has its local address.
    pub local: Option<SocketAddr>,
    pub tcp: TcpInfo,
}

impl Dead {
    /// Whether a duplicate's facts are those of a dead socket: TCP, CLOSE, once connected.
    pub fn is_dead(tcp: &TcpInfo) -> bool {
        tcp.state == tcp::CLOSE && tcp.delivered >= 1
    }
}

/// What probing found.
#[derive(Debug, Default)]
pub struct Probed {
    pub dead: Vec<Dead>,
    /// Socket fds duplicated to be asked.
    pub duplicated: usize,
    /// Processes whose fds could not be duplicated for lack of privilege (EPERM).
    pub denied: Vec<i32>,
}

/// Why probing could not be done at all.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("listing the kernel's sockets: {0}")]
    Dump(#[from] DumpError),
}

/// The socket fds of `unknown` that are dead held sockets. Processes are pinned through
/// `pins` where the caller holds one, otherwise for the probe; every duplicate is checked
/// to still be the inode attribution read (a reused fd is skipped). Where `kinds` (the
/// socket iterator's listing) tells what a socket is, that decides instead of the dumps and
/// the protocol names: only a TCP socket the listing saw in CLOSE (in no table) is asked.
pub fn probe<'p, K: Kernel>(
    k: &mut K,
    unknown: &[SocketFd],
    kinds: &HashMap<u64, SocketKind>,
    pins: &dyn Fn(i32) -> Option<&'p K::Process>,
) -> Result<Probed, ProbeError>
where
    K::Process: 'p,
{
    let mut out = Probed::default();
    let (known, mut left): (Vec<SocketFd>, Vec<SocketFd>) =
        unknown.iter().partition(|s| kinds.contains_key(&s.inode));
    let listed_closed = known
        .into_iter()
        .filter(|s| kinds.get(&s.inode) == Some(&SocketKind::Tcp(tcp::CLOSE)));
    // Unix sockets first, in bulk: a host has many, and one dump lists them all.
    if !left.is_empty() {
        let live = k.live_inodes(Listed::Unix)?;
        left.retain(|s| !live.contains(&s.inode));
    }
    // Then only TCP sockets, by the protocol sockfs names (read without duplicating):
    // netlink, UDP, packet and other sockets can never be dead TCP ones.
    left.retain(|s| match k.socket_protocol(s.pid, s.fd) {
        Ok(p) => p == "TCP" || p == "TCPv6",
        // Gone since the walk: nothing to find. Unreadable: let the probe say.
        Err(e) => e.raw_os_error() != Some(libc::ENOENT),
    });
    // Then the TCP sockets the kernel still lists (in any state but CLOSE_WAIT).
    if !left.is_empty() {
        let live = k.live_inodes(Listed::TcpOthers)?;
        left.retain(|s| !live.contains(&s.inode));
    }
    left.extend(listed_closed);
    if left.is_empty() {
        return Ok(out);
    }
    // Pins opened here, for processes the caller holds none of.
    let mut own: HashMap<i32, K::Process> = HashMap::new();
    let mut gone: HashSet<i32> = HashSet::new();
    for s in &left {
        if pins(s.pid).is_none() && !own.contains_key(&s.pid) && !gone.contains(&s.pid) {
            match k.open_process(s.pid) {
                Ok(p) => {
                    own.insert(s.pid, p);
                }
                Err(e) => {
                    if is_denied(&e) && !out.denied.contains(&s.pid) {
                        out.denied.push(s.pid);
                    }
                    gone.insert(s.pid);
                }
            }
        }
    }
    for s in left {
        let pin: &K::Process = match pins(s.pid) {
            Some(p) => p,
            None => match own.get(&s.pid) {
                Some(p) => p,
                None => continue,
            },
        };
        let dup = match k.duplicate(pin, s.fd) {
            Ok(d) => d,
            Err(e) => {
                if is_denied(&e) && !out.denied.contains(&s.pid) {
                    out.denied.push(s.pid);
                }
                continue;
            }
        };
        out.duplicated += 1;
        let Ok(facts) = k.inspect(&dup) else {
            continue;
        };
        if facts.inode != s.inode {
            continue;
        }
        if let Some(info) = facts.tcp.filter(Dead::is_dead) {
            out.dead.push(Dead {
                fd: s,
                cookie: facts.cookie,
                local: facts.local,
                tcp: info,
            });
        }
    }
    Ok(out)
}

fn is_denied(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

/// The dead sockets as observed sockets of the snapshot: state CLOSE, no peer (the kernel
/// gives none for a CLOSE socket), held by every fd that refers to the same inode.
pub fn add_to<H>(snap: &mut Snapshot<H>, dead: &[Dead], netns_of: &impl ProcRead) {
    let mut by_inode: BTreeMap<u64, (Dead, Vec<Holder>)> = BTreeMap::new();
    for d in dead {
        let e = by_inode
            .entry(d.fd.inode)
            .or_insert_with(|| (d.clone(), Vec::new()));
        e.1.push(Holder {
            pid: d.fd.pid,
            fd: d.fd.fd,
        });
    }
    for (inode, (d, mut holders)) in by_inode {
        holders.sort_unstable();
        let uid = snap.processes.get(&d.fd.pid).map_or(0, |p| p.uid);
        let unspecified = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        let diag = DiagSocket {
            netns: netns_of.netns(d.fd.pid).unwrap_or(0),
            local: d.local.unwrap_or(unspecified),
            remote: unspecified,
            inode,
            uid,
            cookie: d.cookie,
            state: tcp::CLOSE,
            recv_q: 0,
            send_q: 0,
            last_ack_recv_ms: Some(d.tcp.last_ack_recv_ms),
            last_data_recv_ms: Some(d.tcp.last_data_recv_ms),
            keepalive: false,
        };
        snap.sockets
            .push(Observed::new(diag, holders, None, Direction::In));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::attribute::{Attributor, Scope};
    use cwreap_linux::kernel::fake::{Call, FakeKernel, Process};
    use cwreap_linux::kernel::{Discover, Effects};

    const P: i32 = 300;

    fn look(k: &mut FakeKernel, pin: bool) -> Snapshot<<FakeKernel as Effects>::Process> {
        k.cover(&[P], false);
        let found = k.snapshot(true).expect("dump");
        let scope = Scope {
            pids: Some(vec![P]),
            dead: true,
            ..Scope::default()
        };
        Attributor {
            proc: &*k,
            os: pin.then_some(&*k),
            self_pid: 1,
            host: None,
        }
        .attribute(found, &scope)
    }

    #[test]
    fn only_connected_tcp_sockets_in_close_are_dead() {
        let mut k = FakeKernel::new();
        k.spawn(Process::new(P, "srv"));
        k.listener(P, 3, "10.0.0.1:80");
        k.close_wait(P, 4, "10.0.0.1:80", "10.0.0.2:5000");
        let dead = k.dead(P, 5, "10.0.0.1:80");
        k.never_connected(P, 6);
        k.other_socket(P, 7, false);
        k.other_socket(P, 8, true);
        let snap = look(&mut k, false);
        let fds: Vec<i32> = snap.unknown.iter().map(|s| s.fd).collect();
        assert_eq!(
            fds,
            [3, 5, 6, 7, 8],
            "every socket fd no CLOSE_WAIT dump explains"
        );
        let probed = probe(&mut k, &snap.unknown, &HashMap::new(), &|_| None).expect("probe");
        assert_eq!(probed.dead.len(), 1);
        assert_eq!(probed.dead[0].fd.fd, 5);
        assert_eq!(probed.dead[0].cookie, dead.1);
        assert_eq!(
            probed.duplicated, 2,
            "the listener, unix and UDP sockets were explained by dumps: only 5 and 6 were asked"
        );
    }

    #[test]
    fn what_the_iterator_saw_decides_without_dumps_or_protocol_names() {
        let mut k = FakeKernel::new();
        k.spawn(Process::new(P, "srv"));
        k.listener(P, 3, "10.0.0.1:80");
        let dead = k.dead(P, 5, "10.0.0.1:80");
        k.never_connected(P, 6);
        k.other_socket(P, 7, false);
        k.other_socket(P, 8, true);
        let snap = look(&mut k, false);
        let inode = |fd: i32| {
            snap.unknown
                .iter()
                .find(|s| s.fd == fd)
                .map(|s| s.inode)
                .expect("listed")
        };
        // As the iterator lists them: a listener, two sockets in CLOSE, two others. Fd 8
        // is not in the listing (opened after it): the dumps decide for it alone.
        let kinds: HashMap<u64, SocketKind> = [
            (inode(3), SocketKind::Tcp(tcp::LISTEN)),
            (inode(5), SocketKind::Tcp(tcp::CLOSE)),
            (inode(6), SocketKind::Tcp(tcp::CLOSE)),
            (inode(7), SocketKind::Other),
        ]
        .into_iter()
        .collect();
        k.clear_calls();
        let probed = probe(&mut k, &snap.unknown, &kinds, &|_| None).expect("probe");
        assert_eq!(probed.dead.len(), 1);
        assert_eq!(probed.dead[0].fd.fd, 5);
        assert_eq!(probed.dead[0].cookie, dead.1);
        assert_eq!(
            probed.duplicated, 2,
            "only the two listed in CLOSE were asked"
        );
        assert_eq!(
            k.calls()
                .iter()
                .filter(|c| matches!(c, Call::LiveInodes { .. }))
                .count(),
            1,
            "one unix dump, for fd 8 alone: {:?}",
            k.calls()
        );
        // Everything listed: no dump at all.
        let mut all = kinds.clone();
        all.insert(inode(8), SocketKind::Other);
        k.clear_calls();
        let probed = probe(&mut k, &snap.unknown, &all, &|_| None).expect("probe");
        assert_eq!(probed.dead.len(), 1);
        assert!(
            !k.calls()
                .iter()
                .any(|c| matches!(c, Call::LiveInodes { .. })),
            "{:?}",
            k.calls()
        );
    }

    #[test]
    fn nothing_unexplained_means_no_dump_and_no_duplicate() {
        let mut k = FakeKernel::new();
        k.spawn(Process::new(P, "srv"));
        k.close_wait(P, 4, "10.0.0.1:80", "10.0.0.2:5000");
        let snap = look(&mut k, false);
        assert!(snap.unknown.is_empty());
        k.clear_calls();
        let probed = probe(&mut k, &snap.unknown, &HashMap::new(), &|_| None).expect("probe");
        assert!(probed.dead.is_empty());
        assert!(k.calls().is_empty(), "{:?}", k.calls());
    }

    #[test]
    fn dumps_are_asked_only_while_something_is_left() {
        let mut k = FakeKernel::new();
        k.spawn(Process::new(P, "srv"));
        k.other_socket(P, 7, false);
        let snap = look(&mut k, false);
        k.clear_calls();
        probe(&mut k, &snap.unknown, &HashMap::new(), &|_| None).expect("probe");
        assert_eq!(
            k.calls(),
            [Call::LiveInodes {
                listed: Listed::Unix
            }],
            "one unix dump explained everything"
        );
    }

    #[test]
    fn a_denied_duplication_is_reported_never_taken_for_nothing_dead() {
        let mut k = FakeKernel::new();
        k.spawn(Process::new(P, "srv"));
        k.dead(P, 5, "10.0.0.1:80");
        k.with(|w| w.faults.duplicate.insert((P, 5), libc::EPERM));
        let snap = look(&mut k, false);
        let probed = probe(&mut k, &snap.unknown, &HashMap::new(), &|_| None).expect("probe");
        assert!(probed.dead.is_empty());
        assert_eq!(probed.denied, [P]);
    }

    #[test]
    fn a_reused_fd_is_skipped() {
        let mut k = FakeKernel::new();
        k.spawn(Process::new(P, "srv"));
        k.dead(P, 5, "10.0.0.1:80");
        let mut snap = look(&mut k, false);
        snap.unknown[0].inode += 1;
        let probed = probe(&mut k, &snap.unknown, &HashMap::new(), &|_| None).expect("probe");
        assert!(probed.dead.is_empty(), "the fd now names another inode");
    }

    #[test]
    fn dead_sockets_join_the_snapshot_in_state_close_under_every_holder() {
        let mut k = FakeKernel::new();
        k.spawn(Process::new(P, "srv"));
        k.dead(P, 5, "10.0.0.1:80");
        let mut snap = look(&mut k, true);
        let pins: HashMap<i32, _> = snap
            .processes
            .iter()
            .filter_map(|(pid, p)| p.handle.clone().map(|h| (*pid, h)))
            .collect();
        let probed = probe(&mut k, &snap.unknown, &HashMap::new(), &|pid| {
            pins.get(&pid)
        })
        .expect("probe");
        assert!(
            !k.calls()
                .iter()
                .skip_while(|c| !matches!(c, Call::LiveInodes { .. }))
                .any(|c| matches!(c, Call::OpenProcess { .. })),
            "the caller's pins were used"
        );
        add_to(&mut snap, &probed.dead, &k);
        let s = snap.sockets.last().expect("added");
        assert_eq!(s.diag.state, tcp::CLOSE);
        assert_eq!(s.holders, [Holder { pid: P, fd: 5 }]);
        assert!(
            s.diag.remote.ip().is_unspecified(),
            "a CLOSE socket has no peer to show"
        );
    }
}
