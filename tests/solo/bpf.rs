//! The BPF programs against the real kernel, on loopback connections made here. Every test
//! loads programs, so every test needs root. They run alone (no other test of this binary
//! beside them): the iterator test compares this process's whole fd table with /proc, and
//! the figures printed are cleaner alone.
//!
//! Waits are for conditions, each with a deadline; nothing sleeps and hopes.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use cwreap_linux::bpf::{
    self, Event, Events, NotExact, Options, PinnedAges, SocketIter, TaskSocket, Unavailable,
    boottime_ns,
};
use cwreap_linux::{sys, tcp};

const DEADLINE: Duration = Duration::from_secs(30);

fn serial() -> MutexGuard<'static, ()> {
    crate::alone()
}

fn load(opts: Options) -> Events {
    match Events::load(&opts) {
        Ok(e) => e,
        Err(e) => panic!("loading the BPF programs: {e}"),
    }
}

/// Events seen so far, kept so that order and absence can be checked afterwards.
struct Seen {
    events: Events,
    all: Vec<Event>,
}

impl Seen {
    fn new(events: Events) -> Seen {
        Seen {
            events,
            all: Vec::new(),
        }
    }

    /// The index of the first event matching `pred`, waiting for it until the deadline.
    fn until(&mut self, what: &str, pred: impl Fn(&Event) -> bool) -> usize {
        let end = Instant::now() + DEADLINE;
        let mut from = 0;
        loop {
            if let Some(i) = self.all[from..].iter().position(&pred) {
                return from + i;
            }
            from = self.all.len();
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {what} event within {DEADLINE:?}");
            self.events.wait(Some(left)).unwrap();
            self.events.drain(&mut self.all);
        }
    }

    fn position(&self, pred: impl Fn(&Event) -> bool) -> Option<usize> {
        self.all.iter().position(pred)
    }
}

/// Wait until `cond` holds, or fail after the deadline.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "{what}: not within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn cookie(fd: &impl AsFd) -> u64 {
    sys::socket_cookie(fd.as_fd()).unwrap()
}

fn state(fd: &impl AsFd) -> u8 {
    sys::tcp_state(fd.as_fd()).unwrap()
}

fn own_netns() -> u32 {
    u32::try_from(
        std::fs::metadata("/proc/thread-self/ns/net")
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            })
            .unwrap(),
    )
    .unwrap()
}

/// A connected pair on `addr`: (client, server end).
fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// The peer closes: the server end enters CLOSE_WAIT. Returns boottime before the close
/// and after the server end was seen in CLOSE_WAIT, which bracket the entry.
fn peer_closes(client: TcpStream, server: &TcpStream) -> (u64, u64) {
    let before = boottime_ns();
    drop(client);
    wait_until("server end in CLOSE_WAIT", || {
        state(server) == tcp::CLOSE_WAIT
    });
    (before, boottime_ns())
}

fn lifecycle(listen: &str) {
    let _g = serial();
    let mut seen = Seen::new(load(Options::default()));
    let listener = TcpListener::bind(listen).unwrap();
    let (client, server) = pair(&listener);
    let c = cookie(&server);
    let (local, remote) = (server.local_addr().unwrap(), server.peer_addr().unwrap());
    let (before, after) = peer_closes(client, &server);

    let i = seen.until(
        "entered",
        |e| matches!(e, Event::Entered { cookie, .. } if *cookie == c),
    );
    let Event::Entered {
        netns,
        ts_ns,
        local: l,
        remote: r,
        ..
    } = seen.all[i]
    else {
        unreachable!()
    };
    assert!(
        before <= ts_ns && ts_ns <= after,
        "{before} <= {ts_ns} <= {after}"
    );
    assert_eq!((l, r), (local, remote));
    assert_eq!(netns, own_netns());
    assert_eq!(seen.events.entered(c).unwrap(), Some(ts_ns));

    let before_close = boottime_ns();
    drop(server);
    let left = seen.until(
        "left",
        |e| matches!(e, Event::Left { cookie, .. } if *cookie == c),
    );
    let gone = seen.until(
        "destroyed",
        |e| matches!(e, Event::Destroyed { cookie, .. } if *cookie == c),
    );
    assert!(
        i < left && left < gone,
        "entered {i}, left {left}, destroyed {gone}"
    );
    match seen.all[left] {
        // close() on CLOSE_WAIT sends the FIN and waits for its ACK in LAST_ACK.
        Event::Left {
            ts_ns, new_state, ..
        } => {
            assert_eq!(new_state, 9, "LAST_ACK");
            assert!(ts_ns >= before_close);
        }
        _ => unreachable!(),
    }
    match seen.all[gone] {
        Event::Destroyed { ts_ns, state, .. } => {
            assert_eq!(state, tcp::CLOSE);
            assert!(ts_ns >= before_close);
        }
        _ => unreachable!(),
    }
    // The entry goes with the socket.
    assert_eq!(seen.events.entered(c).unwrap(), None);
    assert_eq!(seen.events.malformed(), 0);
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn ipv4_close_wait_entered_left_destroyed() {
    lifecycle("127.0.0.1:0");
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn ipv6_close_wait_entered_left_destroyed() {
    lifecycle("[::1]:0");
}

/// One whole connection whose server end goes through CLOSE_WAIT to destruction; its
/// Destroyed event marks a point in the stream after everything done before it.
fn marker(seen: &mut Seen, listener: &TcpListener) -> usize {
    let (client, server) = pair(listener);
    let c = cookie(&server);
    peer_closes(client, &server);
    drop(server);
    seen.until(
        "marker destroyed",
        |e| matches!(e, Event::Destroyed { cookie, .. } if *cookie == c),
    )
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn dead_held_socket_is_destroyed_only_when_its_fd_closes() {
    let _g = serial();
    let mut seen = Seen::new(load(Options::default()));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (client, server) = pair(&listener);
    let c = cookie(&server);
    // Half-close first so the client can still reset the connection afterwards.
    client.shutdown(Shutdown::Write).unwrap();
    wait_until("server end in CLOSE_WAIT", || {
        state(&server) == tcp::CLOSE_WAIT
    });
    let entered = seen.until(
        "entered",
        |e| matches!(e, Event::Entered { cookie, .. } if *cookie == c),
    );
    // Linger 0: close sends RST, and the server end drops to CLOSE while its fd stays.
    rustix::net::sockopt::set_socket_linger(&client, Some(Duration::ZERO)).unwrap();
    drop(client);
    wait_until("server end in CLOSE", || state(&server) == tcp::CLOSE);
    let left = seen.until(
        "left to CLOSE",
        |e| matches!(e, Event::Left { cookie, new_state: 7, .. } if *cookie == c),
    );
    assert!(entered < left);
    // Everything up to the marker is in the stream: no Destroyed for the held socket.
    let mark = marker(&mut seen, &listener);
    assert_eq!(
        seen.position(|e| matches!(e, Event::Destroyed { cookie, .. } if *cookie == c)),
        None,
        "destroyed while its fd is still open (marker at {mark})"
    );
    // A dead held socket keeps its entry time: the age of the leak.
    assert!(seen.events.entered(c).unwrap().is_some());

    drop(server);
    let gone = seen.until(
        "destroyed",
        |e| matches!(e, Event::Destroyed { cookie, .. } if *cookie == c),
    );
    assert!(gone > mark);
    assert!(matches!(seen.all[gone], Event::Destroyed { state: 7, .. }));
    assert_eq!(seen.events.entered(c).unwrap(), None);
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn untracked_sockets_are_destroyed_silently_unless_all_destroys() {
    let _g = serial();
    let mut tracked = Seen::new(load(Options::default()));
    let mut all = Seen::new(load(Options {
        all_destroys: true,
        ..Options::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let lonely = TcpListener::bind("127.0.0.1:0").unwrap();
    let lc = cookie(&lonely);
    drop(lonely);
    let i = all.until(
        "listener destroyed",
        |e| matches!(e, Event::Destroyed { cookie, .. } if *cookie == lc),
    );
    assert!(matches!(all.all[i], Event::Destroyed { state: 7, .. }));
    marker(&mut tracked, &listener);
    assert_eq!(
        tracked.position(|e| e.cookie() == lc),
        None,
        "a listener never in CLOSE_WAIT was reported without all_destroys"
    );
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn iterator_lists_every_socket_fd_with_pid_inode_and_state() {
    let _g = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (client, server) = pair(&listener);
    let (gone_client, close_wait) = pair(&listener);
    peer_closes(gone_client, &close_wait);
    let fresh: OwnedFd = rustix::net::socket(
        rustix::net::AddressFamily::INET6,
        rustix::net::SocketType::STREAM,
        None,
    )
    .unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // A child holding a socket as its stdin; it exits when our end closes.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let child_inode = sys::inode(theirs.as_fd()).unwrap();
    let mut child = Command::new("cat")
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    let socks = bpf::task_sockets().unwrap();
    let pid = std::process::id();
    let mine: HashMap<u32, TaskSocket> = socks
        .iter()
        .filter(|s| s.pid == pid)
        .map(|s| (s.fd, *s))
        .collect();
    let expect = |fd: &dyn AsFd, family: i32, protocol: i32, state: u8| {
        let raw = u32::try_from(fd.as_fd().as_raw_fd()).unwrap();
        let s = mine
            .get(&raw)
            .unwrap_or_else(|| panic!("fd {raw} not listed"));
        assert_eq!(s.tid, pid, "fd {raw}: the leader's table");
        assert_eq!(s.inode, sys::inode(fd.as_fd()).unwrap(), "fd {raw}: inode");
        assert_eq!(s.state, state, "fd {raw}: state");
        assert_eq!(s.family, family as u16, "fd {raw}: family");
        assert_eq!(s.protocol, protocol as u16, "fd {raw}: protocol");
        assert_eq!(s.netns, own_netns(), "fd {raw}: netns");
    };
    let tcp_ = libc::IPPROTO_TCP;
    expect(&listener, libc::AF_INET, tcp_, tcp::LISTEN);
    expect(&client, libc::AF_INET, tcp_, tcp::ESTABLISHED);
    expect(&server, libc::AF_INET, tcp_, tcp::ESTABLISHED);
    expect(&close_wait, libc::AF_INET, tcp_, tcp::CLOSE_WAIT);
    expect(&fresh, libc::AF_INET6, tcp_, tcp::CLOSE);
    assert_eq!(
        mine[&(udp.as_raw_fd() as u32)].protocol,
        libc::IPPROTO_UDP as u16
    );
    assert!(mine.values().filter(|s| s.is_tcp()).count() >= 5);

    // The same (fd, inode) pairs as /proc/self/fd lists, no more, no fewer.
    let from_proc = proc_socket_fds(Path::new("/proc/self/fd"));
    let from_iter: HashMap<u32, u64> = mine.values().map(|s| (s.fd, s.inode)).collect();
    assert_eq!(from_iter, from_proc);
    // Another process's socket, under that process's pid.
    let child_sock = socks
        .iter()
        .find(|s| s.pid == child.id())
        .unwrap_or_else(|| panic!("child {} not listed", child.id()));
    assert_eq!(
        (child_sock.fd, child_sock.inode, child_sock.family),
        (0, child_inode, libc::AF_UNIX as u16)
    );
    drop(ours);
    child.wait().unwrap();
    // No thread repeats its leader's table.
    let mut keys = HashSet::new();
    for s in &socks {
        assert!(keys.insert((s.pid, s.tid, s.fd)), "listed twice: {s:?}");
    }
}

/// fd → socket inode, from readlink of every entry of a /proc/PID/fd directory.
fn proc_socket_fds(dir: &Path) -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue; // closed meanwhile (read_dir's own fd)
        };
        let Some(ino) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
        else {
            continue;
        };
        let fd = entry.file_name().to_str().unwrap().parse().unwrap();
        out.insert(fd, ino.parse().unwrap());
    }
    out
}

/// A network namespace of our own, held by a child process (`unshare --net`) with its
/// loopback up; it ends when the child reads EOF on stdin, that is when this is dropped or
/// the test process dies.
struct PrivateNetns {
    child: Child,
}

impl PrivateNetns {
    fn new() -> PrivateNetns {
        let mut child = Command::new("unshare")
            .args([
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && echo up && exec cat",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) and ip (iproute2)");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "up",
            "the namespace's loopback did not come up"
        );
        PrivateNetns { child }
    }

    /// Move the calling thread into it; returns its inode.
    fn enter(&self) -> u32 {
        let ns = std::fs::File::open(format!("/proc/{}/ns/net", self.child.id())).unwrap();
        sys::join_netns(ns.as_fd()).unwrap();
        own_netns()
    }
}

impl Drop for PrivateNetns {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn burst_every_event_arrives_or_is_counted_lost() {
    let _g = serial();
    const N: usize = 20_000;
    const BATCH: usize = 1_000;
    let netns = PrivateNetns::new();
    // Its own thread, so that only it moves into the namespace.
    std::thread::scope(|s| {
        s.spawn(|| {
            let inode = netns.enter();
            let opts = |ring_bytes| Options {
                netns: Some(inode),
                ring_bytes,
                ..Options::default()
            };
            // A ring too small for the burst (undrained until the end) and one big enough.
            let mut small = load(opts(64 * 1024));
            let mut big = load(opts(8 << 20));
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let start = Instant::now();
            for _ in 0..N / BATCH {
                let pairs: Vec<_> = (0..BATCH).map(|_| pair(&listener)).collect();
                let mut servers = Vec::with_capacity(BATCH);
                for (client, server) in pairs {
                    drop(client);
                    servers.push(server);
                }
                for server in &servers {
                    wait_until("CLOSE_WAIT", || state(server) == tcp::CLOSE_WAIT);
                }
                drop(servers);
            }
            let burst = start.elapsed();
            // Each server end: entered, left (LAST_ACK), destroyed.
            let expected = 3 * N as u64;
            let mut counts = Vec::new();
            for (name, events) in [("64 KiB ring", &mut small), ("8 MiB ring", &mut big)] {
                let mut got = Vec::new();
                let mut kinds = [0u64; 3];
                wait_until("every event seen or counted lost", || {
                    got.clear();
                    events.drain(&mut got);
                    for e in &got {
                        kinds[match e {
                            Event::Entered { .. } => 0,
                            Event::Left { .. } => 1,
                            Event::Destroyed { .. } => 2,
                        }] += 1;
                    }
                    kinds.iter().sum::<u64>() + events.lost().unwrap() >= expected
                });
                let lost = events.lost().unwrap();
                let seen: u64 = kinds.iter().sum();
                println!(
                    "burst of {N} CLOSE_WAIT transitions in {burst:?}, {name}: seen {seen} \
                     (entered {}, left {}, destroyed {}), lost {lost}",
                    kinds[0], kinds[1], kinds[2]
                );
                assert_eq!(seen + lost, expected, "{name}");
                assert_eq!(events.malformed(), 0);
                counts.push((seen, lost));
            }
            assert!(counts[0].1 > 0, "the small ring was expected to overflow");
            assert_eq!(
                counts[1],
                (expected, 0),
                "the big ring holds the whole burst"
            );
        });
    });
}

const UNPRIVILEGED: &str = "CWREAP_BPF_UNPRIVILEGED";

#[test]
#[ignore = "needs root: loads BPF programs"]
fn unprivileged_load_names_the_missing_capabilities() {
    if std::env::var_os(UNPRIVILEGED).is_some() {
        let events = Events::load(&Options::default()).map(|_| ());
        let iter = SocketIter::load().map(|_| ());
        println!("cwreap-unprivileged events {events:?}");
        println!("cwreap-unprivileged iter {iter:?}");
        if let Err(e) = events {
            println!("cwreap-unprivileged message {e}");
        }
        return;
    }
    let _g = serial();
    // A setuid to nobody clears the effective capabilities.
    let out = {
        use std::os::unix::process::CommandExt;
        Command::new(std::env::current_exe().expect("this test binary"))
            .args([
                "--exact",
                "bpf::unprivileged_load_names_the_missing_capabilities",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(UNPRIVILEGED, "1")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let want = r#"Err(MissingCapabilities { missing: ["CAP_BPF", "CAP_PERFMON"] })"#;
    assert!(
        text.contains(&format!("cwreap-unprivileged events {want}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("cwreap-unprivileged iter {want}")),
        "{text}"
    );
    assert!(
        text.contains("cwreap-unprivileged message missing CAP_BPF and CAP_PERFMON: loading"),
        "{text}"
    );
}

// ---- pinning ----

const PIN_CHILD: &str = "CWREAP_BPF_PIN_CHILD";
const PIN_READER: &str = "CWREAP_BPF_PIN_READER";
const PIN_TEST: &str = "bpf::pinned_ages_are_exact_only_while_the_daemon_lives";

/// This test binary, running only the pinning test, in one of its child roles.
fn pin_role(role: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("this test binary"));
    cmd.args([
        "--exact",
        PIN_TEST,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(role, dir);
    cmd
}

/// A reader without privileges, in a child process: prints what PinnedAges::open said.
fn pin_reader(dir: &Path) {
    match PinnedAges::open(dir, Duration::from_secs(3600)) {
        Err(NotExact::Permission { .. }) => println!("cwreap-pin-reader permission"),
        other => println!("cwreap-pin-reader {other:?}"),
    }
}

/// The pinning daemon, in a child process: pins in the directory named by PIN_CHILD,
/// says `ready`, then beats once per `beat` line on stdin until EOF.
fn pin_child(dir: &Path) {
    let mut events = load(Options {
        pin_dir: Some(dir.to_owned()),
        ..Options::default()
    });
    println!("cwreap-pin-child ready");
    for line in std::io::stdin().lock().lines() {
        if line.unwrap() == "beat" {
            events.heartbeat().unwrap();
            println!("cwreap-pin-child beat");
        }
    }
}

struct PinDaemon {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl PinDaemon {
    fn spawn(dir: &Path) -> PinDaemon {
        let mut child = pin_role(PIN_CHILD, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut d = PinDaemon { child, out };
        d.expect("cwreap-pin-child ready");
        d
    }

    fn expect(&mut self, want: &str) {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.out.read_line(&mut line).unwrap();
            assert!(n > 0, "the pinning child exited before saying {want:?}");
            if line.trim_end().ends_with(want) {
                return;
            }
        }
    }

    fn beat(&mut self) {
        writeln!(self.child.stdin.as_mut().unwrap(), "beat").unwrap();
        self.expect("cwreap-pin-child beat");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PinDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    bpf::parse_stat(&stat).map(|s| s.state)
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn pinned_ages_are_exact_only_while_the_daemon_lives() {
    if let Some(dir) = std::env::var_os(PIN_CHILD) {
        pin_child(Path::new(&dir));
        return;
    }
    if let Some(dir) = std::env::var_os(PIN_READER) {
        pin_reader(Path::new(&dir));
        return;
    }
    let _g = serial();
    let tmp = TempDir::new("pin");
    // In a thread of its own: the private mount namespace (and the bpffs in it) lives as
    // long as that thread and the child it spawns, and never reaches the host.
    std::thread::scope(|s| {
        s.spawn(|| pinning(&tmp.0));
    });
}

fn pinning(tmp: &Path) {
    bpf::enter_private_mount_namespace().unwrap();
    let plain = tmp.join("plain");
    std::fs::create_dir(&plain).unwrap();
    let fs = tmp.join("bpffs");
    std::fs::create_dir(&fs).unwrap();
    bpf::mount_bpffs(&fs).unwrap();
    assert!(bpf::is_bpffs(&fs).unwrap());
    assert!(!bpf::is_bpffs(&plain).unwrap());
    let dir = fs.join("cwreap");
    let long = Duration::from_secs(3600);

    // Nothing pinned yet; and no pinning outside a BPF filesystem.
    assert!(matches!(
        PinnedAges::open(&dir, long),
        Err(NotExact::NoPin { .. })
    ));
    match Events::load(&Options {
        pin_dir: Some(plain.join("cwreap")),
        ..Options::default()
    }) {
        Err(Unavailable::NoBpffs { path }) => assert_eq!(path, plain.join("cwreap")),
        other => panic!("{:?}", other.map(|_| ())),
    }

    let mut daemon = PinDaemon::spawn(&dir);
    let mut ages = PinnedAges::open(&dir, long).unwrap();
    assert_eq!(ages.daemon().pid, daemon.pid());

    // A user without access to the BPF filesystem gets a reason, not a wrong answer.
    let out = {
        use std::os::unix::process::CommandExt;
        pin_role(PIN_READER, &dir)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cwreap-pin-reader permission"),
        "unprivileged reader: {text}"
    );

    // A second daemon may not take the directory over while the first lives.
    match Events::load(&Options {
        pin_dir: Some(dir.clone()),
        ..Options::default()
    }) {
        Err(Unavailable::PinBusy { pid, .. }) => assert_eq!(pid, daemon.pid()),
        other => panic!("{:?}", other.map(|_| ())),
    }

    // The daemon's programs see our socket enter CLOSE_WAIT; the reader gets the time.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (client, server) = pair(&listener);
    let c = cookie(&server);
    let (before, after) = peer_closes(client, &server);
    let mut ts = None;
    wait_until("pinned entry time", || {
        ts = ages.entered(c).unwrap();
        ts.is_some()
    });
    let ts = ts.unwrap();
    assert!(before <= ts && ts <= after);
    assert!(ages.all().unwrap().contains(&(c, ts)));

    // Heartbeats: older than allowed is stale, a fresh one is accepted again.
    let hb = ages.daemon().heartbeat_ns;
    let max = Duration::from_millis(100);
    wait_until("heartbeat older than 100 ms", || {
        boottime_ns() > hb + max.as_nanos() as u64
    });
    match PinnedAges::open(&dir, max) {
        Err(NotExact::Stale { pid, since, .. }) => {
            assert_eq!(pid, daemon.pid());
            assert!(since > max);
        }
        other => panic!("{other:?}"),
    }
    daemon.beat();
    let fresh = PinnedAges::open(&dir, long).unwrap();
    assert!(fresh.daemon().heartbeat_ns > hb);
    assert!(ages.check(long).is_ok());

    // SIGKILL: the pins stay, the map freezes, and the reader refuses it, first while the
    // child is a zombie, then once it is reaped.
    let pid = daemon.pid();
    daemon.child.kill().unwrap();
    wait_until("killed child is a zombie", || proc_state(pid) == Some('Z'));
    assert!(dir.join("entered").exists() && dir.join("daemon").exists());
    assert!(matches!(
        PinnedAges::open(&dir, long),
        Err(NotExact::DaemonDead { pid: p }) if p == pid
    ));
    assert!(matches!(ages.check(long), Err(NotExact::DaemonDead { .. })));
    daemon.child.wait().unwrap();
    assert!(matches!(
        PinnedAges::open(&dir, long),
        Err(NotExact::DaemonDead { pid: p }) if p == pid
    ));
    drop(daemon);

    // A new daemon (here, this process) takes over the dead one's directory, and unpins
    // on a clean stop.
    let events = load(Options {
        pin_dir: Some(dir.clone()),
        ..Options::default()
    });
    assert_eq!(events.pinned(), Some(dir.as_path()));
    let ours = PinnedAges::open(&dir, long).unwrap();
    assert_eq!(ours.daemon().pid, std::process::id());
    // The old daemon's entry is not in the new map.
    assert_eq!(ours.entered(c).unwrap(), None);
    drop(ours);
    drop(events);
    assert!(matches!(
        PinnedAges::open(&dir, long),
        Err(NotExact::NoPin { .. })
    ));
    rustix::mount::unmount(&fs, rustix::mount::UnmountFlags::empty()).unwrap();
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("cwreap-bpf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- figures ----

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn figures_load_cost_and_iterator_against_proc() {
    let _g = serial();
    let rss0 = rss_kib();
    let t = Instant::now();
    let events = load(Options::default());
    let load_time = t.elapsed();
    let rss1 = rss_kib();
    let hwm = status_kib("VmHWM:");
    let (anon1, file1) = (status_kib("RssAnon:"), status_kib("RssFile:"));
    drop(events);
    let rss2 = rss_kib();
    println!(
        "Events::load (kernel BTF parsed, 2 tp_btf programs, 1 MiB ring): {load_time:?}; \
         RSS {rss0} -> {rss1} KiB while loaded (anon {anon1}, file {file1}; peak {hwm} KiB), \
         {rss2} KiB after drop (the first load in a process only when run alone)"
    );

    let t = Instant::now();
    let mut iter = SocketIter::load().unwrap();
    println!("SocketIter::load: {:?}", t.elapsed());

    sys::raise_own_fd_limit();
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1024);
    let want = (limit.saturating_sub(200) as usize).min(20_000);
    let socks: Vec<OwnedFd> = (0..want)
        .map(|_| {
            rustix::net::socket(
                rustix::net::AddressFamily::INET,
                rustix::net::SocketType::STREAM,
                None,
            )
            .unwrap()
        })
        .collect();
    let pid = std::process::id();

    let mut best_iter = Duration::MAX;
    let mut total = 0;
    let mut own = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let all = iter.run().unwrap();
        best_iter = best_iter.min(t.elapsed());
        total = all.len();
        own = all.iter().filter(|s| s.pid == pid).count();
    }
    let mut best_proc = Duration::MAX;
    let mut proc_count = 0;
    for _ in 0..5 {
        let t = Instant::now();
        proc_count = proc_socket_fds(Path::new("/proc/self/fd")).len();
        best_proc = best_proc.min(t.elapsed());
    }
    println!(
        "{} socket fds here: iterator pass (every process, {total} socket fds in all, {own} \
         ours) best of 5 {best_iter:?}; /proc/self/fd walk with readlink ({proc_count} \
         socket fds) best of 5 {best_proc:?}",
        socks.len()
    );
    assert_eq!(own, proc_count);
}

/// The parent pid of `pid` (field 4 of /proc/PID/stat).
fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Threads of this process (sharing its fd table) that each open sockets in several states
/// and an epoll instance, then block until `done` closes; their sockets stay open until
/// then. Returns what they hold, as (fd, inode), once all are ready.
fn threads_holding_sockets(
    listener: &TcpListener,
    threads: usize,
    done: &std::sync::Arc<std::sync::Barrier>,
) -> (Vec<std::thread::JoinHandle<()>>, Vec<(i32, u64)>) {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<(i32, u64)>>();
    let mut handles = Vec::new();
    for _ in 0..threads {
        let addr = listener.local_addr().unwrap();
        let tx = tx.clone();
        let done = done.clone();
        handles.push(std::thread::spawn(move || {
            // A client in ESTABLISHED, a listener, a fresh socket (CLOSE), an epoll fd.
            let client = TcpStream::connect(addr).unwrap();
            let own = TcpListener::bind("127.0.0.1:0").unwrap();
            let fresh = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let ep =
                rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC).unwrap();
            let ino = |fd: &dyn AsFd| (fd.as_fd().as_raw_fd(), sys::inode(fd.as_fd()).unwrap());
            let held = vec![ino(&client), ino(&own), ino(&fresh)];
            tx.send(held).unwrap();
            done.wait();
            drop((client, own, fresh, ep));
        }));
    }
    drop(tx);
    let mut held = Vec::new();
    for _ in 0..threads {
        held.extend(rx.recv_timeout(DEADLINE).unwrap());
    }
    (handles, held)
}

#[test]
#[ignore = "needs root: loads BPF programs and reads other processes' fd tables"]
fn iterator_attribution_equals_the_proc_walk() {
    use cwreap_linux::kernel::fds::from_iterator;
    use cwreap_linux::kernel::{FdSource, ListFds, ProcWalk};
    use cwreap_linux::procfs::ProcFs;
    let _g = serial();
    // Several processes holding sockets in every state: three fleets, each a server process
    // (CLOSE_WAIT and ESTABLISHED server ends, a listener, unix socketpairs, dead TCP
    // sockets) and a client process (ESTABLISHED and FIN_WAIT2 client ends).
    let mut fleets: Vec<cwreap_testkit::fleet::Fleet> = (0..3)
        .map(|i| cwreap_testkit::fleet::Fleet::start(300 + 100 * i, 200).unwrap())
        .collect();
    for f in &mut fleets {
        f.set_extras(40, 10).unwrap();
    }
    // This process: accepted ends and threads that share its table.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let done = std::sync::Arc::new(std::sync::Barrier::new(5));
    let (threads, by_threads) = threads_holding_sockets(&listener, 4, &done);
    let accepted: Vec<TcpStream> = (0..4).map(|_| listener.accept().unwrap().0).collect();
    let epoll = rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC).unwrap();

    let me = i32::try_from(std::process::id()).unwrap();
    let mut iter = SocketIter::load().unwrap();
    let raw = iter.pass().unwrap();
    let from_iter = from_iterator(raw.clone());
    let proc = ProcFs::default();
    let from_proc = ProcWalk(&proc).host_fds().unwrap();
    assert_eq!(
        (from_iter.source, from_proc.source),
        (FdSource::Iterator, FdSource::Proc)
    );

    // The threads sharing this table are not listed again under their own tids.
    assert!(
        raw.sockets
            .iter()
            .all(|s| s.pid != me as u32 || s.tid == me as u32),
        "a thread sharing the leader's table repeated its fds"
    );
    // The processes compared: this one and the fleets' (children of this process).
    let ours: Vec<i32> = from_proc
        .procs
        .keys()
        .copied()
        .filter(|&p| p == me || ppid(p) == Some(me))
        .collect();
    assert!(
        ours.len() >= 7,
        "this process and 6 fixture processes: {ours:?}"
    );
    let mut compared = 0;
    for pid in &ours {
        let (a, b) = (&from_iter.procs.get(pid), &from_proc.procs.get(pid));
        assert_eq!(a, b, "pid {pid}: iterator against /proc/{pid}/fd");
        compared += a.map_or(0, |p| p.sockets.len());
    }
    let mine = &from_iter.procs[&me];
    for fd in by_threads.iter().chain(
        accepted
            .iter()
            .map(|s| (s.as_raw_fd(), sys::inode(s.as_fd()).unwrap()))
            .collect::<Vec<_>>()
            .iter(),
    ) {
        assert!(
            mine.sockets.contains(fd),
            "fd {fd:?} of this process not listed"
        );
    }
    assert!(mine.epoll.contains(&epoll.as_raw_fd()), "the epoll fd");
    // Every fixture socket: both ends of every connection, listeners, unix, dead.
    let fixture: usize = fleets
        .iter()
        .map(|f| 2 * (f.n + f.m) + 1 + f.unix_sockets() + f.dead())
        .sum();
    assert!(
        compared >= fixture,
        "{compared} socket fds compared, {fixture} expected at least"
    );
    // States come with the sockets: the fleets' CLOSE_WAIT server ends.
    let close_wait = raw
        .sockets
        .iter()
        .filter(|s| ppid(s.pid as i32) == Some(me) && s.is_tcp() && s.state == tcp::CLOSE_WAIT)
        .count();
    assert_eq!(close_wait, fleets.iter().map(|f| f.n).sum::<usize>());
    done.wait();
    for t in threads {
        t.join().unwrap();
    }
}

/// scan's rows without their ages, sorted, for the fixture's processes only (other tests'
/// sockets come and go).
fn scan_rows(args: &[&str], pids: &HashSet<i64>) -> (Vec<String>, String) {
    let out = cwreap_testkit::cwreap(args);
    let mut rows: Vec<String> = cwreap_testkit::json_lines(&out)
        .into_iter()
        .filter(|r| r["pid"].as_i64().is_some_and(|p| pids.contains(&p)))
        .map(|mut r| {
            let o = r.as_object_mut().unwrap();
            o.retain(|k, _| !k.starts_with("age"));
            serde_json::to_string(&r).unwrap()
        })
        .collect();
    rows.sort();
    (rows, cwreap_testkit::stderr(&out))
}

#[test]
#[ignore = "needs root: the iterator needs CAP_BPF, and reading others' fd tables CAP_SYS_PTRACE"]
fn scan_with_the_iterator_equals_scan_with_no_bpf() {
    let _g = serial();
    let mut fleets: Vec<cwreap_testkit::fleet::Fleet> = (0..2)
        .map(|_| cwreap_testkit::fleet::Fleet::start(250, 100).unwrap())
        .collect();
    for f in &mut fleets {
        f.set_extras(20, 8).unwrap();
    }
    let me = std::process::id() as i32;
    let pids: HashSet<i64> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| ppid(p) == Some(me))
        .map(i64::from)
        .collect();
    let (with, err) = scan_rows(&["scan", "--json"], &pids);
    assert!(
        !err.contains("iterator is not used"),
        "the iterator was expected to load here: {err}"
    );
    let (without, _) = scan_rows(&["scan", "--json", "--no-bpf"], &pids);
    // Every CLOSE_WAIT socket and every dead one, each with its owner.
    let want: usize = fleets.iter().map(|f| f.n + f.dead()).sum();
    assert_eq!(with.len(), want, "rows with the iterator");
    assert_eq!(with, without, "scan with the iterator against --no-bpf");
}

#[test]
#[ignore = "needs root: loads BPF programs"]
fn a_socket_that_leaves_close_wait_between_a_dump_and_the_reset_is_let_go() {
    use cwreap_linux::kernel::events::EventFeed;
    use cwreap_linux::netns::Namespaces;
    let _g = serial();
    let mut feed = EventFeed::load(&Options::default()).unwrap();
    let mut ns = Namespaces::own().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (client, server) = pair(&listener);
    peer_closes(client, &server);
    let key = (u64::from(own_netns()), cookie(&server));
    let has = |found: &cwreap_linux::netns::Found| {
        found.close_wait.iter().any(|d| (d.netns, d.cookie) == key)
    };
    feed.before_dump();
    let found = ns.dump().unwrap();
    assert!(has(&found), "the dump lists the CLOSE_WAIT socket");
    // It leaves CLOSE_WAIT (LAST_ACK) after the dump, before the feed starts over from it:
    // the event is queued by then (the program runs within the state change).
    drop(server);
    wait_until("the socket out of CLOSE_WAIT", || !has(&ns.dump().unwrap()));
    feed.reset(&found);
    assert!(feed.tracks(key), "the dump had it in CLOSE_WAIT");
    let changes = feed.changes(&mut ns).unwrap();
    assert!(
        changes.left.contains(&key),
        "its exit, queued before the reset, is applied after it: {changes:?}"
    );
    assert!(!feed.tracks(key), "no longer tracked");
}
