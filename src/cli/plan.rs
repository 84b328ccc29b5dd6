//! The pure core of the command line: which observed sockets a selector matches, in which
//! order, and which of them a reap acts on. No I/O here.

use std::time::Duration;

use cwreap_linux::kernel::SocketFacts;
use cwreap_linux::tcp;

use crate::shared::age::Age;
use crate::shared::attribute::{Direction, Holder, Observed, Process, Snapshot};
use crate::shared::selector::{ProcessFacts, Selector};

/// What the user asked for: the selectors, `--older-than` and `--min-close-wait`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub selector: Selector,
    /// The pids read from the selector's pid files.
    pub pids_from_files: Vec<i32>,
    pub older_than: Option<Duration>,
    /// Only processes holding at least this many of the selected sockets.
    pub min_close_wait: Option<u32>,
}

impl Filter {
    /// A process-level selector was given (only attributed sockets can match).
    pub fn selects_processes(&self) -> bool {
        self.selector.has_process_criteria()
    }

    /// Anything narrows the selection (for the message when nothing matched).
    pub fn narrowed(&self) -> bool {
        !self.selector.is_empty()
            || !self.selector.exclude.is_empty()
            || self.older_than.is_some()
            || self.min_close_wait.is_some()
    }

    /// Whether the selector's process criteria accept a process of the snapshot, as a
    /// function of (pid, name, uid), built once per selection. Only the facts a snapshot
    /// keeps are looked at here: the criteria that need more (executable, command line,
    /// unit, cgroup) were applied by attribution, which never records a process they
    /// reject (see `snapshot::Scope`).
    fn process_matcher(&self) -> impl Fn(i32, &str, Option<u32>) -> bool + '_ {
        let known = Selector {
            exe: Vec::new(),
            cmdline: Vec::new(),
            units: Vec::new(),
            cgroups: Vec::new(),
            ..self.selector.clone()
        };
        move |pid, comm, uid| {
            let facts = ProcessFacts {
                pid,
                comm: comm.to_owned(),
                uid,
                ..ProcessFacts::default()
            };
            known.process_matches(&facts, &self.pids_from_files)
        }
    }
}

/// One line of output: a socket and the holder it is shown under.
#[derive(Debug)]
pub struct Row<'a, H> {
    pub socket: &'a Observed,
    /// Who holds the socket; for an unaccepted one, who holds its listener.
    pub holder: Option<Holder>,
    /// Still in the listener's accept queue: no fd refers to it.
    pub unaccepted: bool,
    pub process: Option<&'a Process<H>>,
    /// Its time in CLOSE_WAIT; selection takes the lower bound.
    pub age: Age,
}

impl<H> Row<'_, H> {
    /// A dead held socket (state CLOSE): the connection ended, an fd still holds it.
    pub fn dead(&self) -> bool {
        self.socket.diag.state == cwreap_linux::tcp::CLOSE
    }
}

// Manual impls: a Row only borrows, so it is Copy whatever the handle type is.
impl<H> Clone for Row<'_, H> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<H> Copy for Row<'_, H> {}

/// The sockets matching `filter`, oldest first. A socket held by several processes appears
/// once, under the first holder the filter accepts.
pub fn select<'a, H>(snap: &'a Snapshot<H>, filter: &Filter) -> Vec<Row<'a, H>> {
    let mut rows: Vec<Row<'a, H>> = Vec::new();
    let matches = filter.process_matcher();
    // Decided once per process, not once per socket it holds.
    let mut accepted: std::collections::HashMap<i32, bool> = std::collections::HashMap::new();
    for s in &snap.sockets {
        if !filter
            .selector
            .socket_matches(s.diag.local, Some(s.diag.remote))
        {
            continue;
        }
        // The age filter comes after the count for `min_close_wait`, which (as in the
        // daemon) counts every CLOSE_WAIT socket the selectors match, whatever its age.
        let age = s.age;
        let unaccepted = s.unaccepted();
        let chosen = s.owners().iter().find_map(|h| {
            let p = snap.processes.get(&h.pid)?;
            let ok = *accepted
                .entry(p.pid)
                .or_insert_with(|| matches(p.pid, &p.comm, Some(p.uid)));
            ok.then_some((*h, p))
        });
        match chosen {
            Some((holder, process)) => rows.push(Row {
                socket: s,
                holder: Some(holder),
                unaccepted,
                process: Some(process),
                age,
            }),
            None if !filter.selects_processes() => rows.push(Row {
                socket: s,
                holder: None,
                unaccepted,
                process: None,
                age,
            }),
            None => {}
        }
    }
    if let Some(min) = filter.min_close_wait {
        let mut per_pid: std::collections::HashMap<i32, usize> = std::collections::HashMap::new();
        for r in &rows {
            if let Some(h) = r.holder {
                *per_pid.entry(h.pid).or_default() += 1;
            }
        }
        rows.retain(|r| {
            r.holder
                .is_some_and(|h| per_pid.get(&h.pid).copied().unwrap_or(0) >= min as usize)
        });
    }
    if let Some(min) = filter.older_than {
        rows.retain(|r| u128::from(r.age.min_ms) >= min.as_millis());
    }
    rows.sort_by(|a, b| {
        b.age
            .min_ms
            .cmp(&a.age.min_ms)
            .then(a.holder.cmp(&b.holder))
            .then(a.socket.diag.inode.cmp(&b.socket.diag.inode))
    });
    rows
}

/// Per-process totals for the summary under the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSummary {
    pub pid: i32,
    pub comm: String,
    pub close_wait: usize,
    /// Dead held sockets (state CLOSE) of the process.
    pub dead: usize,
    pub oldest_ms: u64,
    pub open_fds: usize,
    pub nofile_soft: Option<u64>,
    /// Where the leak is: for a process whose CLOSE_WAIT sockets are mostly client ends,
    /// its top 3 remote endpoints (a pool to one service); else its top 3 local ports (a
    /// server's listener). Each with its count, most first.
    pub top: Top,
}

/// The top 3 places a process's CLOSE_WAIT sockets share.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Top {
    #[default]
    None,
    /// Remote endpoints (`ip:port`): a client leak.
    Remotes(Vec<(String, usize)>),
    /// Local ports: a server leak.
    LocalPorts(Vec<(u16, usize)>),
}

/// The `n` most frequent values, most first (ties by value).
fn top_n<T: Ord + Clone>(values: impl IntoIterator<Item = T>, n: usize) -> Vec<(T, usize)> {
    let mut counts: std::collections::BTreeMap<T, usize> = std::collections::BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    let mut all: Vec<(T, usize)> = counts.into_iter().collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(n);
    all
}

pub fn summarize<H>(rows: &[Row<'_, H>]) -> Vec<ProcessSummary> {
    let mut out: Vec<ProcessSummary> = Vec::new();
    let mut per_pid: std::collections::HashMap<i32, Vec<&Row<'_, H>>> =
        std::collections::HashMap::new();
    for r in rows {
        let Some(p) = r.process else { continue };
        let dead = r.dead();
        if !dead {
            per_pid.entry(p.pid).or_default().push(r);
        }
        match out.iter_mut().find(|s| s.pid == p.pid) {
            Some(s) if dead => s.dead += 1,
            Some(s) => {
                s.close_wait += 1;
                s.oldest_ms = s.oldest_ms.max(r.age.min_ms);
            }
            None => out.push(ProcessSummary {
                pid: p.pid,
                comm: p.comm.clone(),
                close_wait: usize::from(!dead),
                dead: usize::from(dead),
                oldest_ms: if dead { 0 } else { r.age.min_ms },
                open_fds: p.open_fds,
                nofile_soft: p.nofile_soft,
                top: Top::None,
            }),
        }
    }
    for s in &mut out {
        let Some(mine) = per_pid.get(&s.pid) else {
            continue;
        };
        let outbound = mine
            .iter()
            .filter(|r| r.socket.direction == Direction::Out)
            .count();
        // Only the ends of the side that leaks most: a client end's local port is
        // ephemeral and a server end's peer is any client, so neither says where.
        let of = |d: Direction| mine.iter().filter(move |r| r.socket.direction == d);
        s.top = if outbound * 2 > mine.len() {
            Top::Remotes(top_n(
                of(Direction::Out).map(|r| r.socket.diag.remote.to_string()),
                3,
            ))
        } else {
            Top::LocalPorts(top_n(
                of(Direction::In).map(|r| r.socket.diag.local.port()),
                3,
            ))
        };
    }
    out.sort_by(|a, b| {
        (b.close_wait + b.dead)
            .cmp(&(a.close_wait + a.dead))
            .then(a.pid.cmp(&b.pid))
    });
    out
}

/// Which rows a reap acts on, oldest first, at most `max`. Shutdown needs an owner, so
/// without `destroy` rows nobody holds are left out (and counted); SOCK_DESTROY reaches
/// every socket. Dead held sockets are never planned: their connection already ended, and
/// only close() frees them. Returns (to act on, matched but left out for want of an
/// owner).
pub fn plan_reap<'a, 'r, H>(
    rows: &'r [Row<'a, H>],
    max: Option<usize>,
    destroy: bool,
) -> (Vec<&'r Row<'a, H>>, usize) {
    let reachable = |r: &&Row<'a, H>| !r.dead() && (destroy || r.holder.is_some());
    let left_out = rows.iter().filter(|r| !r.dead() && !reachable(r)).count();
    let planned = rows.iter().filter(reachable);
    let planned = match max {
        Some(n) => planned.take(n).collect(),
        None => planned.collect(),
    };
    (planned, left_out)
}

/// One socket fd of a `--pid` process, as duplicating it showed (for `reap --close`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSocket {
    pub pid: i32,
    pub fd: i32,
    pub comm: String,
    pub facts: SocketFacts,
}

/// Which sockets `reap --close` may close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closable {
    /// In CLOSE_WAIT: the peer closed, the app never did.
    CloseWait,
    /// TCP state CLOSE after a connection that really existed: shut down (by cwreap or
    /// anyone) or reset, and the fd still held.
    Ended,
}

impl Closable {
    pub fn state(self) -> &'static str {
        match self {
            Closable::CloseWait => "CLOSE_WAIT",
            Closable::Ended => "CLOSE",
        }
    }
}

/// Whether `reap --close` may close this socket at all. Only two kinds: CLOSE_WAIT, and
/// CLOSE left over from a connection that ended, told by `tcpi_delivered >= 1` and
/// `tcpi_rtt > 0` (both 0 for a socket that was never connected, only bound, refused, or
/// disconnected with AF_UNSPEC, and both surviving FIN, RST and shutdown). Never a
/// listening, connecting, never-connected or non-TCP socket.
pub fn closable(facts: &SocketFacts) -> Option<Closable> {
    let tcp = facts.tcp?;
    match tcp.state {
        tcp::CLOSE_WAIT => Some(Closable::CloseWait),
        tcp::CLOSE if tcp.delivered >= 1 && tcp.rtt_us > 0 => Some(Closable::Ended),
        _ => None,
    }
}

/// What `reap --close` closes: the closable sockets every filter accepts, oldest first (age
/// from `tcpi_last_ack_recv`), at most `max`. Local criteria use getsockname; a criterion on
/// the remote end never matches an ended socket, which has no peer any more.
pub fn plan_close<'a>(
    held: &'a [HeldSocket],
    filter: &Filter,
    max: Option<usize>,
) -> Vec<(&'a HeldSocket, Closable)> {
    let matches = filter.process_matcher();
    let mut out: Vec<(&HeldSocket, Closable)> = held
        .iter()
        .filter_map(|h| closable(&h.facts).map(|k| (h, k)))
        .filter(|(h, _)| matches(h.pid, &h.comm, None))
        .filter(|(h, _)| {
            h.facts
                .local
                .is_some_and(|l| filter.selector.socket_matches(l, h.facts.remote))
        })
        .filter(|(h, _)| {
            let age = close_age_ms(h);
            filter
                .older_than
                .is_none_or(|min| u128::from(age) >= min.as_millis())
        })
        .collect();
    out.sort_by(|(a, _), (b, _)| {
        close_age_ms(b)
            .cmp(&close_age_ms(a))
            .then(a.pid.cmp(&b.pid))
            .then(a.fd.cmp(&b.fd))
    });
    if let Some(n) = max {
        out.truncate(n);
    }
    out
}

/// A held socket's age for `--older-than`: ms since the last ACK from the peer.
pub fn close_age_ms(h: &HeldSocket) -> u64 {
    h.facts.tcp.map_or(0, |t| u64::from(t.last_ack_recv_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::attribute::WalkStats;
    use cwreap_linux::netlink::DiagSocket;
    use std::collections::BTreeMap;

    fn sock(inode: u64, port: u16, age: Option<u32>) -> DiagSocket {
        DiagSocket {
            netns: 1,
            local: format!("127.0.0.1:{port}").parse().expect("addr"),
            remote: "127.0.0.1:50000".parse().expect("addr"),
            inode,
            uid: 0,
            cookie: inode * 10,
            state: 8,
            recv_q: 0,
            send_q: 0,
            last_ack_recv_ms: age,
            last_data_recv_ms: None,
            keepalive: false,
        }
    }

    fn proc(pid: i32, comm: &str) -> Process<()> {
        Process {
            pid,
            comm: comm.into(),
            uid: 0,
            open_fds: 10,
            nofile_soft: Some(1024),
            epoll_fds: Vec::new(),
            handle: None,
            thread: None,
        }
    }

    fn snapshot() -> Snapshot<()> {
        let mut processes = BTreeMap::new();
        processes.insert(10, proc(10, "nginx"));
        processes.insert(20, proc(20, "java"));
        let obs = |d: DiagSocket, holders: Vec<(i32, i32)>| {
            Observed::new(
                d,
                holders
                    .into_iter()
                    .map(|(pid, fd)| Holder { pid, fd })
                    .collect(),
                None,
                crate::shared::attribute::Direction::In,
            )
        };
        Snapshot {
            sockets: vec![
                obs(sock(1, 80, Some(5_000)), vec![(10, 5)]),
                obs(sock(2, 80, Some(90_000)), vec![(10, 6), (20, 3)]),
                obs(sock(3, 8080, Some(1_000)), vec![(20, 7)]),
                obs(sock(4, 8080, None), vec![(20, 8)]),
                obs(sock(5, 443, Some(600_000)), vec![]),
            ],
            processes,
            stats: WalkStats::default(),
            unreadable: Vec::new(),
            denied: Vec::new(),
            stalled: Vec::new(),
            unknown: Vec::new(),
        }
    }

    fn inodes(rows: &[Row<'_, ()>]) -> Vec<u64> {
        rows.iter().map(|r| r.socket.diag.inode).collect()
    }

    #[test]
    fn everything_oldest_first_including_unowned() {
        let snap = snapshot();
        let rows = select(&snap, &Filter::default());
        assert_eq!(inodes(&rows), vec![5, 2, 1, 3, 4]);
        assert!(rows[0].holder.is_none());
        // Shared socket appears once, under its first holder.
        assert_eq!(rows[1].holder, Some(Holder { pid: 10, fd: 6 }));
    }

    #[test]
    fn pid_selector_picks_the_matching_holder() {
        let snap = snapshot();
        let f = Filter {
            selector: Selector {
                pids: vec![20],
                ..Selector::default()
            },
            ..Filter::default()
        };
        let rows = select(&snap, &f);
        assert_eq!(inodes(&rows), vec![2, 3, 4]);
        assert_eq!(rows[0].holder, Some(Holder { pid: 20, fd: 3 }));
    }

    #[test]
    fn comm_port_and_age() {
        let snap = snapshot();
        let f = Filter {
            selector: Selector {
                comm: vec![regex::Regex::new("^ngi").expect("re")],
                ..Selector::default()
            },
            ..Filter::default()
        };
        assert_eq!(inodes(&select(&snap, &f)), vec![2, 1]);
        let f = Filter {
            selector: Selector {
                local_ports: vec![8080],
                ..Selector::default()
            },
            ..Filter::default()
        };
        assert_eq!(inodes(&select(&snap, &f)), vec![3, 4]);
        let f = Filter {
            older_than: Some(Duration::from_secs(5)),
            ..Filter::default()
        };
        // Exactly 5 s qualifies; unknown age (None) never does.
        assert_eq!(inodes(&select(&snap, &f)), vec![5, 2, 1]);
    }

    #[test]
    fn remote_criteria_and_min_close_wait() {
        let snap = snapshot();
        // Every fixture socket's peer is 127.0.0.1:50000.
        let f = Filter {
            selector: Selector {
                remote_ports: vec![50000],
                remote_cidrs: vec!["127.0.0.0/8".parse().expect("cidr")],
                ..Selector::default()
            },
            ..Filter::default()
        };
        assert_eq!(inodes(&select(&snap, &f)), vec![5, 2, 1, 3, 4]);
        let f = Filter {
            selector: Selector {
                remote_ports: vec![50001],
                ..Selector::default()
            },
            ..Filter::default()
        };
        assert!(select(&snap, &f).is_empty());
        // nginx (10) holds 2 of the selected sockets, java (20) 2 more: with
        // --min-close-wait 3 none is left; the unowned one is dropped either way.
        let f = Filter {
            min_close_wait: Some(2),
            ..Filter::default()
        };
        assert_eq!(inodes(&select(&snap, &f)), vec![2, 1, 3, 4]);
        let f = Filter {
            min_close_wait: Some(3),
            ..Filter::default()
        };
        assert!(select(&snap, &f).is_empty());
    }

    #[test]
    fn reap_plan_caps_and_skips_unowned() {
        let snap = snapshot();
        let rows = select(&snap, &Filter::default());
        let (plan, unowned) = plan_reap(&rows, Some(2), false);
        assert_eq!(unowned, 1);
        let planned: Vec<u64> = plan.iter().map(|r| r.socket.diag.inode).collect();
        assert_eq!(planned, vec![2, 1]);
        let (plan, _) = plan_reap(&rows, None, false);
        assert_eq!(plan.len(), 4);
        // SOCK_DESTROY needs no owner: the unowned socket is planned too, oldest first.
        let (plan, left_out) = plan_reap(&rows, Some(2), true);
        assert_eq!(left_out, 0);
        let planned: Vec<u64> = plan.iter().map(|r| r.socket.diag.inode).collect();
        assert_eq!(planned, vec![5, 2]);
    }

    fn held(fd: i32, state: u8, delivered: u32, rtt_us: u32, age_ms: u32, port: u16) -> HeldSocket {
        HeldSocket {
            pid: 7,
            fd,
            comm: "app".into(),
            facts: SocketFacts {
                inode: 100 + fd as u64,
                cookie: 1000 + fd as u64,
                tcp: Some(cwreap_linux::sys::TcpInfo {
                    state,
                    last_ack_recv_ms: age_ms,
                    last_data_recv_ms: age_ms,
                    rtt_us,
                    delivered,
                }),
                local: Some(format!("127.0.0.1:{port}").parse().expect("addr")),
                remote: None,
            },
        }
    }

    #[test]
    fn only_close_wait_and_ended_connections_are_closable() {
        let cw = held(3, tcp::CLOSE_WAIT, 5, 40, 1, 80);
        assert_eq!(closable(&cw.facts), Some(Closable::CloseWait));
        let ended = held(4, tcp::CLOSE, 3, 40, 1, 80);
        assert_eq!(closable(&ended.facts), Some(Closable::Ended));
        // Never connected, only bound, refused, AF_UNSPEC-disconnected: CLOSE with nothing
        // delivered or no RTT.
        for (delivered, rtt) in [(0, 0), (1, 0), (0, 40)] {
            assert_eq!(
                closable(&held(5, tcp::CLOSE, delivered, rtt, 1, 80).facts),
                None
            );
        }
        for state in [tcp::LISTEN, tcp::SYN_SENT, tcp::ESTABLISHED] {
            assert_eq!(closable(&held(6, state, 5, 40, 1, 80).facts), None);
        }
        let mut udp = held(7, tcp::CLOSE_WAIT, 5, 40, 1, 80);
        udp.facts.tcp = None;
        assert_eq!(closable(&udp.facts), None, "not TCP");
    }

    #[test]
    fn close_plan_applies_every_filter() {
        let sockets = vec![
            held(3, tcp::CLOSE_WAIT, 5, 40, 9_000, 80),
            held(4, tcp::CLOSE, 3, 40, 60_000, 80),
            held(5, tcp::CLOSE, 0, 0, 90_000, 80), // never connected: never
            held(6, tcp::CLOSE_WAIT, 5, 40, 500, 80), // too young
            held(7, tcp::CLOSE_WAIT, 5, 40, 30_000, 443), // other port
        ];
        let f = Filter {
            selector: Selector {
                pids: vec![7],
                local_ports: vec![80],
                ..Selector::default()
            },
            older_than: Some(Duration::from_secs(1)),
            ..Filter::default()
        };
        let fds: Vec<i32> = plan_close(&sockets, &f, None)
            .iter()
            .map(|(h, _)| h.fd)
            .collect();
        assert_eq!(fds, vec![4, 3], "oldest first");
        let capped: Vec<i32> = plan_close(&sockets, &f, Some(1))
            .iter()
            .map(|(h, _)| h.fd)
            .collect();
        assert_eq!(capped, vec![4]);
        let other_pid = Filter {
            selector: Selector {
                pids: vec![8],
                ..Selector::default()
            },
            ..Filter::default()
        };
        assert!(plan_close(&sockets, &other_pid, None).is_empty());
    }

    #[test]
    fn top_names_only_the_side_that_leaks_most() {
        use crate::shared::attribute::Direction;
        let mut snap = snapshot();
        snap.processes.retain(|pid, _| *pid == 10);
        let end = |inode, local: &str, remote: &str, direction| {
            Observed::new(
                DiagSocket {
                    local: local.parse().expect("addr"),
                    remote: remote.parse().expect("addr"),
                    ..sock(inode, 1, Some(1_000))
                },
                vec![Holder {
                    pid: 10,
                    fd: inode as i32,
                }],
                None,
                direction,
            )
        };
        // A pool's 3 ends towards one backend and 1 towards another, beside 2 server ends:
        // the client ends' ephemeral local ports are no place to look.
        snap.sockets = vec![
            end(1, "10.0.0.1:40001", "10.0.0.9:6379", Direction::Out),
            end(2, "10.0.0.1:40002", "10.0.0.9:6379", Direction::Out),
            end(3, "10.0.0.1:40003", "10.0.0.9:6379", Direction::Out),
            end(4, "10.0.0.1:40004", "10.0.0.8:5432", Direction::Out),
            end(5, "10.0.0.1:8080", "10.0.0.7:50001", Direction::In),
            end(6, "10.0.0.1:8080", "10.0.0.7:50002", Direction::In),
        ];
        let sum = summarize(&select(&snap, &Filter::default()));
        assert_eq!(
            sum[0].top,
            Top::Remotes(vec![
                ("10.0.0.9:6379".into(), 3),
                ("10.0.0.8:5432".into(), 1)
            ])
        );
        // Mostly server ends: the listening ports, not the one client end's local port.
        for inode in [1, 2, 3] {
            snap.sockets[inode - 1].direction = Direction::In;
            snap.sockets[inode - 1].diag.local = "10.0.0.1:9090".parse().expect("addr");
        }
        let sum = summarize(&select(&snap, &Filter::default()));
        assert_eq!(sum[0].top, Top::LocalPorts(vec![(9090, 3), (8080, 2)]));
    }

    /// `min_close_wait` counts the matching sockets whatever their age, as the daemon does;
    /// `older_than` then picks among them.
    #[test]
    fn min_close_wait_counts_young_sockets_too() {
        let snap = snapshot();
        // pid 20 holds 3 sockets: 90 s, 1 s and of unknown age (0).
        let f = Filter {
            selector: Selector {
                pids: vec![20],
                ..Selector::default()
            },
            older_than: Some(Duration::from_secs(60)),
            min_close_wait: Some(3),
            ..Filter::default()
        };
        assert_eq!(inodes(&select(&snap, &f)), vec![2]);
        let more = Filter {
            min_close_wait: Some(4),
            ..f
        };
        assert!(select(&snap, &more).is_empty());
    }

    #[test]
    fn summary_counts_per_process() {
        let snap = snapshot();
        let rows = select(&snap, &Filter::default());
        let sum = summarize(&rows);
        assert_eq!(sum.len(), 2);
        assert_eq!(
            (sum[0].pid, sum[0].close_wait, sum[0].oldest_ms),
            (10, 2, 90_000)
        );
        assert_eq!(
            (sum[1].pid, sum[1].close_wait, sum[1].oldest_ms),
            (20, 2, 1_000)
        );
    }
}
